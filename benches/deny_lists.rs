//! Deny lists at published-list scale: 1,000,000 random address and CIDR
//! entries (IPv4 and IPv6), 100,000 random domains. Measures loading a
//! generated file (read, parse, sort, merge), one lookup that hits and one
//! that misses, and prints the bytes kept per entry.
//! Targets: load under 2 s, lookup under 1 µs. `cargo bench --bench deny_lists`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use matrix_gatekeeper::defences::lists::{AddressLists, AddressSet, DomainLists};

const ADDRESS_ENTRIES: usize = 1_000_000;
const DOMAIN_ENTRIES: usize = 100_000;

/// splitmix64: reproducible entries without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// A FireHOL-like file: mostly IPv4 hosts, some IPv4 networks, a tenth
/// IPv6 (hosts and /48–/64 networks), comments and blank lines. Returns
/// the file and some listed addresses.
fn address_file() -> (PathBuf, Vec<IpAddr>) {
    let mut random = Random(0x5eed);
    let mut text = String::with_capacity(ADDRESS_ENTRIES * 18);
    text.push_str("# generated: 1,000,000 entries\n\n");
    let mut listed = Vec::new();
    for i in 0..ADDRESS_ENTRIES {
        let r = random.next();
        let ip = match r % 10 {
            0 => {
                let v6 = Ipv6Addr::from(
                    (u128::from(0x2001_0db8_u32) << 96) | u128::from(random.next()) << 32,
                );
                let prefix = [48, 56, 64, 128][(r >> 8) as usize % 4];
                let _ = writeln!(text, "{v6}/{prefix}");
                IpAddr::V6(v6)
            }
            1 | 2 => {
                let v4 = Ipv4Addr::from((r >> 16) as u32 & 0xffff_ff00);
                let _ = writeln!(text, "{v4}/24 # network");
                IpAddr::V4(v4)
            }
            _ => {
                let v4 = Ipv4Addr::from((r >> 16) as u32);
                let _ = writeln!(text, "{v4}");
                IpAddr::V4(v4)
            }
        };
        if i % 1000 == 0 {
            listed.push(ip);
        }
    }
    let path = scratch("deny-lists-bench-addresses.netset");
    std::fs::write(&path, text).expect("write the generated list");
    (path, listed)
}

fn domain_file() -> (PathBuf, Vec<String>) {
    let mut random = Random(0xd0);
    let mut text = String::with_capacity(DOMAIN_ENTRIES * 20);
    let mut listed = Vec::new();
    let tlds = ["com", "net", "org", "info", "xyz"];
    for i in 0..DOMAIN_ENTRIES {
        let r = random.next();
        let domain = format!("tmp{r:x}.{}", tlds[(r >> 60) as usize % tlds.len()]);
        let _ = writeln!(text, "{domain}");
        if i % 100 == 0 {
            listed.push(domain);
        }
    }
    let path = scratch("deny-lists-bench-domains.txt");
    std::fs::write(&path, text).expect("write the generated list");
    (path, listed)
}

fn address_lists(c: &mut Criterion) {
    let (path, listed) = address_file();
    let shown = path.display().to_string();
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let mut group = c.benchmark_group("deny lists: addresses");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("load 1,000,000 entries (read, parse, merge)", |b| {
        b.iter(|| black_box(AddressLists::load(std::slice::from_ref(&shown)).unwrap()))
    });
    group.finish();

    let lists = AddressLists::load(std::slice::from_ref(&shown)).unwrap();
    let set = AddressSet::parse(&shown, &std::fs::read(&path).unwrap()).unwrap();
    let mut random = Random(7);
    let misses: Vec<IpAddr> = (0..1000)
        .map(|_| IpAddr::V4(Ipv4Addr::from(random.next() as u32)))
        .filter(|ip| !set.contains(*ip))
        .take(512)
        .collect();
    assert!(listed.iter().all(|ip| lists.find(*ip).is_some()));
    let mut n = 0usize;
    c.bench_function("deny lists: address lookup, hit", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(lists.find(black_box(listed[n % listed.len()])))
        })
    });
    c.bench_function("deny lists: address lookup, miss", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(lists.find(black_box(misses[n % misses.len()])))
        })
    });
    let v6_miss = IpAddr::V6("2001:db9::1".parse().unwrap());
    c.bench_function("deny lists: address lookup, IPv6 miss", |b| {
        b.iter(|| black_box(lists.find(black_box(v6_miss))))
    });
    println!(
        "address list: {ADDRESS_ENTRIES} entries, {file_bytes} bytes of file, {} ranges after merging, \
         {} bytes kept ({:.2} bytes per entry, {:.2} per range)",
        set.ranges(),
        set.heap_bytes(),
        set.heap_bytes() as f64 / ADDRESS_ENTRIES as f64,
        set.heap_bytes() as f64 / set.ranges() as f64,
    );
    let _ = std::fs::remove_file(&path);
}

fn domain_lists(c: &mut Criterion) {
    let (path, listed) = domain_file();
    let shown = path.display().to_string();

    let mut group = c.benchmark_group("deny lists: domains");
    group.sample_size(10);
    group.bench_function("load 100,000 domains", |b| {
        b.iter(|| black_box(DomainLists::load(std::slice::from_ref(&shown)).unwrap()))
    });
    group.finish();

    let lists = DomainLists::load(std::slice::from_ref(&shown)).unwrap();
    let hits: Vec<String> = listed.iter().map(|d| format!("mx.Mail.{d}")).collect();
    assert!(hits.iter().all(|d| lists.find(d).is_some()));
    let misses: Vec<String> = (0..512)
        .map(|i| format!("mail.user{i}.example.org"))
        .collect();
    assert!(misses.iter().all(|d| lists.find(d).is_none()));
    let mut n = 0usize;
    c.bench_function("deny lists: domain lookup, subdomain hit", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(lists.find(black_box(&hits[n % hits.len()])))
        })
    });
    c.bench_function("deny lists: domain lookup, miss (4 labels)", |b| {
        b.iter(|| {
            n = n.wrapping_add(1);
            black_box(lists.find(black_box(&misses[n % misses.len()])))
        })
    });
    println!(
        "domain list: {} domains, {} bytes kept ({:.1} bytes per domain)",
        lists.len(),
        lists.heap_bytes(),
        lists.heap_bytes() as f64 / lists.len() as f64,
    );
    let _ = std::fs::remove_file(&path);
}

criterion_group!(benches, address_lists, domain_lists);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
