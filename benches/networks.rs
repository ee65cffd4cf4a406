//! Network databases at published scale: an ASN database of 300,000
//! networks (200,000 IPv4 /16–/24, 100,000 IPv6 /32–/48) over 60,000
//! autonomous systems, and a country database over the same networks,
//! written by the test writer. Measures loading one (read whole, check
//! from end to end), and what a guarded request pays: one lookup in both
//! databases that hits (IPv4, IPv6) and one that misses. Pass-through
//! requests never look up. `cargo bench --bench networks`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use matrix_gatekeeper::defences::networks::NetworkDatabase;
use matrix_gatekeeper::Config;

#[path = "../tests/common/mmdb.rs"]
mod mmdb;

const V4_NETWORKS: usize = 200_000;
const V6_NETWORKS: usize = 100_000;
const SYSTEMS: u64 = 60_000;
const COUNTRIES: [&str; 8] = ["NL", "DE", "US", "FR", "BR", "IN", "JP", "ZA"];

/// splitmix64: reproducible networks without a dependency.
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

/// Both databases, and addresses inside some of their networks.
fn databases() -> (PathBuf, PathBuf, Vec<IpAddr>) {
    let mut random = Random(0x5eed);
    let mut asn = mmdb::Writer::new("GeoLite2-ASN");
    let mut country = mmdb::Writer::new("GeoLite2-Country");
    let mut inside = Vec::new();
    for i in 0..V4_NETWORKS + V6_NETWORKS {
        let r = random.next();
        let (network, address) = if i < V4_NETWORKS {
            let prefix = 16 + (r % 9) as u32;
            let base = (random.next() as u32) & (u32::MAX << (32 - prefix));
            let base = Ipv4Addr::from(base | 0x0100_0000);
            (format!("{base}/{prefix}"), IpAddr::V4(base))
        } else {
            let prefix = 32 + (r % 17) as u32;
            let bits = (u128::from(random.next()) << 64) >> 3 | (1u128 << 125);
            let base = bits & (u128::MAX << (128 - prefix));
            let base = Ipv6Addr::from(base);
            (format!("{base}/{prefix}"), IpAddr::V6(base))
        };
        let system = (r >> 20) % SYSTEMS + 1;
        asn.insert(
            &network,
            mmdb::asn_record(system as u32, &format!("Example Network {system}")),
        );
        country.insert(
            &network,
            mmdb::country_record(COUNTRIES[(r >> 40) as usize % COUNTRIES.len()]),
        );
        if i % 1000 == 0 {
            inside.push(address);
        }
    }
    let (asn_path, country_path) = (scratch("bench-asn.mmdb"), scratch("bench-country.mmdb"));
    asn.write(&asn_path);
    country.write(&country_path);
    (asn_path, country_path, inside)
}

fn bench(c: &mut Criterion) {
    let started = Instant::now();
    let (asn, country, inside) = databases();
    println!("written in {:?}", started.elapsed());
    for path in [&asn, &country] {
        let size = std::fs::metadata(path).unwrap().len();
        let started = Instant::now();
        NetworkDatabase::load(&path.display().to_string()).unwrap();
        println!(
            "{}: {:.1} MiB, loaded and checked in {:?}",
            path.file_name().unwrap().to_string_lossy(),
            size as f64 / (1 << 20) as f64,
            started.elapsed()
        );
    }
    let config = Config::from_toml(&format!(
        "[reputation]\nasn_database = {:?}\ncountry_database = {:?}\n\
         [rate_limit]\nregistrations_per_asn = {{ count = 20, period = \"1h\" }}\n",
        asn.display().to_string(),
        country.display().to_string()
    ))
    .unwrap();
    let networks = config.networks();
    let v4 = *inside.iter().find(|ip| ip.is_ipv4()).unwrap();
    let v6 = *inside.iter().find(|ip| ip.is_ipv6()).unwrap();
    assert!(networks.lookup(v4).asn.is_some() && networks.lookup(v6).asn.is_some());
    let miss: IpAddr = "fd00::1".parse().unwrap();
    assert!(networks.lookup(miss).is_unknown());
    let mut group = c.benchmark_group("networks");
    group.bench_function("lookup ASN and country, IPv4 hit", |b| {
        b.iter(|| black_box(networks.lookup(black_box(v4))))
    });
    group.bench_function("lookup ASN and country, IPv6 hit", |b| {
        b.iter(|| black_box(networks.lookup(black_box(v6))))
    });
    group.bench_function("lookup ASN and country, miss", |b| {
        b.iter(|| black_box(networks.lookup(black_box(miss))))
    });
    group.bench_function("lookup and rules, 1,000 addresses", |b| {
        b.iter(|| {
            for ip in &inside {
                let network = networks.lookup(*ip);
                black_box(networks.verdict(&network));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
