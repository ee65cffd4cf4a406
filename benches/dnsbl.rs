//! Cost of the DNSBL check on the gate's side: building a query name,
//! reading a resolver's answer as a listing, and a check served from the
//! cache (what most requests of a wave from one address pay).
//! `cargo bench --bench dnsbl`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::proto::op::{Message, Query};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::defences::dnsbl::{interpret, query_name, Dnsbl, Verdict};

/// `A 127.0.0.2`, TTL 300, for `name`.
fn listing(name: &Name) -> Record {
    Record::from_rdata(name.clone(), 300, RData::A(A::new(127, 0, 0, 2)))
}

/// The answer to a query packet: its question, listed.
fn listed_answer(packet: &[u8]) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    let question = query.queries.first()?.clone();
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.add_answer(listing(question.name()));
    reply.add_query(question);
    reply.to_vec().ok()
}

fn dnsbl(c: &mut Criterion) {
    let v4: IpAddr = "192.0.2.66".parse().unwrap();
    let v6: IpAddr = "2001:db8::66".parse().unwrap();
    c.bench_function("dnsbl: IPv6 query name", |b| {
        b.iter(|| black_box(query_name(black_box(v6), "dnsbl.example.net")))
    });
    let name = Name::from_ascii(query_name(v4, "dnsbl.example.net") + ".").unwrap();
    let answer =
        Lookup::new_with_max_ttl(Query::query(name.clone(), RecordType::A), [listing(&name)]);
    c.bench_function("dnsbl: read a listing", |b| {
        b.iter(|| black_box(interpret(Ok(black_box(&answer).clone()))))
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
                if let Some(reply) = listed_answer(&buffer[..n]) {
                    let _ = socket.send_to(&reply, from).await;
                }
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
