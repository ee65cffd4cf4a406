//! A DNS responder for DNSBL tests: a real server on 127.0.0.1, UDP and TCP
//! on the same port, that reads the question and answers by zone, counting
//! every query.
//!
//! - the RFC 5782 test points of any zone, as a working list answers
//!   them: `2.0.0.127.<zone>` listed (`A 127.0.0.2`), `1.0.0.127.<zone>`
//!   NXDOMAIN, whatever the zone does with other names, except:
//! - a name under `lists-everything.test`: `A 127.0.0.2`, test points
//!   included (a list that has turned against every resolver);
//! - a name in the `listed` set: `A 127.0.0.2`, TTL 300;
//! - a name under `servfail.test`: SERVFAIL;
//! - a name under `slow.test`: no answer at all;
//! - a name under `lossy.test`: the first query is dropped (a lost
//!   datagram), later ones are answered as under any other zone;
//! - a name under `truncated.test`: over UDP an empty answer with the
//!   truncation bit set (too large for a datagram), over TCP answered as
//!   under any other zone;
//! - anything else: NXDOMAIN with an SOA record (minimum 300).
//!
//! Answers echo the query's header and question; the query's additional
//! records (an EDNS `OPT` record) are not echoed, as by a server without
//! EDNS.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A running responder; stops when dropped.
pub struct DnsResponder {
    pub addr: SocketAddr,
    zones: Arc<Zones>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the responder lists, and what it was asked.
struct Zones {
    listed: HashSet<String>,
    /// Every name asked, and whether over TCP.
    queries: Mutex<Vec<(String, bool)>>,
}

impl DnsResponder {
    /// Starts a responder that lists exactly the names in `listed`.
    pub async fn start(listed: &[&str]) -> DnsResponder {
        let (socket, listener) = bind_udp_and_tcp().await;
        let addr = socket.local_addr().unwrap();
        let zones = Arc::new(Zones {
            listed: listed.iter().map(|n| n.to_ascii_lowercase()).collect(),
            queries: Mutex::default(),
        });
        let udp = tokio::spawn(serve_udp(socket, zones.clone()));
        let tcp = tokio::spawn(serve_tcp(listener, zones.clone()));
        DnsResponder {
            addr,
            zones,
            tasks: vec![udp, tcp],
        }
    }

    /// Every name asked so far about a client, in order: the test points
    /// the gate checks in the background are left out.
    pub fn queries(&self) -> Vec<String> {
        let queries = self.zones.queries.lock().unwrap();
        queries
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| !is_test_point(name))
            .collect()
    }

    /// How often the test points of `zone` were asked: (`127.0.0.2`,
    /// `127.0.0.1`).
    pub fn test_point_counts(&self, zone: &str) -> (usize, usize) {
        let queries = self.zones.queries.lock().unwrap();
        let count = |point: &str| {
            let name = format!("{point}.{zone}");
            queries.iter().filter(|(q, _)| *q == name).count()
        };
        (count("2.0.0.127"), count("1.0.0.127"))
    }

    /// How often `name` was asked.
    pub fn count(&self, name: &str) -> usize {
        self.queries().iter().filter(|q| *q == name).count()
    }

    /// How often `name` was asked over TCP.
    pub fn tcp_count(&self, name: &str) -> usize {
        let queries = self.zones.queries.lock().unwrap();
        queries.iter().filter(|(q, tcp)| q == name && *tcp).count()
    }
}

/// A UDP socket on a free loopback port, and a TCP listener on the same.
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        if let Ok(listener) = TcpListener::bind(addr).await {
            return (socket, listener);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

async fn serve_udp(socket: UdpSocket, zones: Arc<Zones>) {
    let mut buffer = [0u8; 1500];
    while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
        if let Some(reply) = zones.answer(&buffer[..n], false) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zones: Arc<Zones>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(serve_tcp_connection(stream, zones.clone()));
    }
}

/// Messages over TCP, each after its 2-byte length, until the client
/// closes.
async fn serve_tcp_connection(mut stream: TcpStream, zones: Arc<Zones>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut query = vec![0; usize::from(len)];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = zones.answer(&query, true) else {
            continue;
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

impl Zones {
    /// The reply to one query, or `None` to stay silent.
    fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let (name, question_end) = question(query)?;
        let first = {
            let mut queries = self.queries.lock().unwrap();
            let first = !queries.iter().any(|(q, _)| *q == name);
            queries.push((name.clone(), tcp));
            first
        };
        let question = &query[..question_end];
        if name.ends_with(".lists-everything.test") || name.starts_with("2.0.0.127.") {
            Some(reply(question, 0, Some([127, 0, 0, 2])))
        } else if name.starts_with("1.0.0.127.") {
            Some(reply(question, 3, None))
        } else if name.ends_with(".slow.test") || first && name.ends_with(".lossy.test") {
            None
        } else if name.ends_with(".truncated.test") && !tcp {
            let mut reply = reply(question, 0, None);
            reply[2] |= 0x02; // TC
            Some(reply)
        } else if name.ends_with(".servfail.test") {
            Some(reply(question, 2, None))
        } else if self.listed.contains(&name) {
            Some(reply(question, 0, Some([127, 0, 0, 2])))
        } else {
            Some(reply(question, 3, None))
        }
    }
}

/// Whether `name` is an RFC 5782 test point of some zone.
fn is_test_point(name: &str) -> bool {
    name.starts_with("2.0.0.127.") || name.starts_with("1.0.0.127.")
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
