//! Cost of the DNSBL check on the gate's side: building a query name and
//! packet, reading an answer, and a check served from the cache (what most
//! requests of a wave from one address pay). `cargo bench --bench dnsbl`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::dnsbl::{decode_answer, encode_query, query_name, Dnsbl, Verdict};

/// An answer to `query`: `A 127.0.0.2`, TTL 300, its name a pointer to the
/// question.
fn listed_answer(query: &[u8]) -> Vec<u8> {
    let mut packet = query.to_vec();
    packet[2] |= 0x80;
    packet[3] = 0x80;
    packet[7] = 1;
    packet.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 127, 0, 0, 2]);
    packet
}

fn dnsbl(c: &mut Criterion) {
    let v4: IpAddr = "192.0.2.66".parse().unwrap();
    let v6: IpAddr = "2001:db8::66".parse().unwrap();
    c.bench_function("dnsbl: IPv6 query name", |b| {
        b.iter(|| black_box(query_name(black_box(v6), "dnsbl.example.net")))
    });
    let name = query_name(v4, "dnsbl.example.net");
    let query = encode_query(7, &name).unwrap();
    let answer = listed_answer(&query);
    c.bench_function("dnsbl: encode a query", |b| {
        b.iter(|| black_box(encode_query(7, black_box(&name)).unwrap()))
    });
    c.bench_function("dnsbl: decode a listing", |b| {
        b.iter(|| black_box(decode_answer(7, &name, black_box(&answer))))
    });

    // A cached answer: a responder on loopback answers once, then every
    // check is served from the cache.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let checker = runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
                let _ = socket.send_to(&listed_answer(&buffer[..n]), from).await;
            }
        });
        let config = Config::from_toml(&format!(
            "[reputation]\ndnsbl = [\"dnsbl.example.net\"]\ndns_server = \"{server}\"\n\
             dnsbl_timeout = \"5s\"\n"
        ))
        .unwrap();
        let checker = Dnsbl::new(&config.reputation, Arc::default()).unwrap();
        assert!(matches!(checker.check(v4).await, Verdict::Listed(_)));
        checker
    });
    c.bench_function("dnsbl: check served from the cache", |b| {
        b.iter(|| black_box(runtime.block_on(checker.check(black_box(v4)))))
    });
}

criterion_group!(benches, dnsbl);
criterion_main!(benches);
