//! A DNS responder for DNSBL tests: a real UDP server on 127.0.0.1:0 that
//! reads the question and answers by zone, counting every query.
//!
//! - a name in the `listed` set: `A 127.0.0.2`, TTL 300;
//! - a name under `servfail.test`: SERVFAIL;
//! - a name under `slow.test`: no answer at all;
//! - a name under `lossy.test`: the first query is dropped (a lost
//!   datagram), later ones are answered as under any other zone;
//! - anything else: NXDOMAIN with an SOA record (minimum 300).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// A running responder; stops when dropped.
pub struct DnsResponder {
    pub addr: SocketAddr,
    queries: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsResponder {
    /// Starts a responder that lists exactly the names in `listed`.
    pub async fn start(listed: &[&str]) -> DnsResponder {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let listed: HashSet<String> = listed.iter().map(|n| n.to_ascii_lowercase()).collect();
        let queries: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = queries.clone();
        let task = tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let Some((name, question_end)) = question(&buffer[..n]) else {
                    continue;
                };
                let first = !seen.lock().unwrap().contains(&name);
                seen.lock().unwrap().push(name.clone());
                if first && name.ends_with(".lossy.test") {
                    continue;
                }
                let reply = if name.ends_with(".slow.test") {
                    continue;
                } else if name.ends_with(".servfail.test") {
                    reply(&buffer[..question_end], 2, None)
                } else if listed.contains(&name) {
                    reply(&buffer[..question_end], 0, Some([127, 0, 0, 2]))
                } else {
                    reply(&buffer[..question_end], 3, None)
                };
                let _ = socket.send_to(&reply, from).await;
            }
        });
        DnsResponder {
            addr,
            queries,
            task,
        }
    }

    /// Every name asked so far, in order.
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }

    /// How often `name` was asked.
    pub fn count(&self, name: &str) -> usize {
        self.queries().iter().filter(|q| *q == name).count()
    }
}

/// The question name (lowercase, dotted) and where the question ends.
fn question(packet: &[u8]) -> Option<(String, usize)> {
    if packet.len() < 12 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(packet.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    // QTYPE and QCLASS.
    packet.get(at..at + 4)?;
    Some((labels.join("."), at + 4))
}

/// A reply echoing the header and question, with `rcode`, and an `A`
/// answer or, for NXDOMAIN, an SOA record in the authority section.
fn reply(query: &[u8], rcode: u8, address: Option<[u8; 4]>) -> Vec<u8> {
    let mut packet = query.to_vec();
    packet[2] = 0x80 | (query[2] & 0x01); // QR, RD echoed
    packet[3] = 0x80 | rcode; // RA
    packet[6..12].copy_from_slice(&[0; 6]);
    let record_header = |packet: &mut Vec<u8>, rtype: u16, data_len: usize| {
        packet.extend_from_slice(&[0xc0, 12]); // the question's name
        packet.extend_from_slice(&rtype.to_be_bytes());
        packet.extend_from_slice(&1u16.to_be_bytes());
        packet.extend_from_slice(&300u32.to_be_bytes());
        packet.extend_from_slice(&(data_len as u16).to_be_bytes());
    };
    if let Some(address) = address {
        packet[7] = 1;
        record_header(&mut packet, 1, 4);
        packet.extend_from_slice(&address);
    } else if rcode == 3 {
        packet[9] = 1;
        let mut data = vec![2, b'n', b's', 0, 4, b'h', b'o', b's', b't', 0];
        for field in [1u32, 3600, 600, 86400, 300] {
            data.extend_from_slice(&field.to_be_bytes());
        }
        record_header(&mut packet, 6, data.len());
        packet.extend_from_slice(&data);
    }
    packet
}
