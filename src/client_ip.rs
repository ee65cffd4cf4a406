//! The client address the gate resolved for a request.
//!
//! The server puts a [`ClientAddress`] into every request's extensions; the
//! upstream writes it as the only `X-Forwarded-For` entry, so the homeserver's
//! own limits and logs see the address the gate decided on, never one the
//! client wrote.

use std::net::IpAddr;

/// The resolved client address of a request (for now, the TCP peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

impl ClientAddress {
    /// The address, with IPv4-mapped IPv6 addresses read as IPv4.
    pub fn new(ip: IpAddr) -> Self {
        ClientAddress(ip.to_canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv6_is_read_as_ipv4() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(ClientAddress::new(mapped).0.to_string(), "192.0.2.7");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ClientAddress::new(v6).0, v6);
    }
}
