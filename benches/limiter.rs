//! Cost of one rate-limit decision and memory per tracked client.
//!
//! `cargo bench --bench limiter` measures (criterion):
//! - memory store: one decision on a hot key, and on a new key while 1M
//!   keys are tracked;
//! - Redis store: one decision (two keys) against a private `redis-server`
//!   started on a free port;
//!
//! and prints bytes allocated per tracked client (counting allocator) and
//! the Redis commands per decision (exactly one `EVALSHA`).
//!
//! It measures; it asserts nothing about time.

#![allow(unsafe_code)] // the counting allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, Criterion};

use governor::clock::MonotonicClock;
use matrix_gatekeeper::client_ip::ClientKey;
use matrix_gatekeeper::config::{HumanDuration, LimitSpec};
use matrix_gatekeeper::ratelimit::memory::MemoryStore;
use matrix_gatekeeper::ratelimit::redis::RedisStore;
use matrix_gatekeeper::ratelimit::{LimitKind, LimitSpecs};

struct Counting;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn specs(kind: LimitKind, count: u32, period: HumanDuration) -> LimitSpecs {
    let mut specs = LimitSpecs::default();
    specs.0[kind as usize] = Some(LimitSpec { count, period });
    specs
}

fn key(i: u64) -> ClientKey {
    ClientKey::v4(std::net::Ipv4Addr::from(i as u32))
}

fn memory_store(c: &mut Criterion) {
    let kind = LimitKind::AttemptsPerIp;
    let many = specs(kind, 1_000_000_000, HumanDuration::secs(1));
    let store = MemoryStore::new(&many, 4_000_000, MonotonicClock);
    let hot = key(1);
    c.bench_function("limiter memory: hot key", |b| {
        b.iter(|| black_box(store.acquire(&[kind], black_box(hot)).is_ok()))
    });
    let n: u64 = 1_000_000;
    for i in 0..n {
        let _ = store.acquire(&[kind], key(i));
    }
    let mut next = n;
    c.bench_function("limiter memory: new key among 1M", |b| {
        b.iter(|| {
            next += 1;
            black_box(store.acquire(&[kind], key(next)).is_ok())
        })
    });
}

fn memory_per_client() {
    let kind = LimitKind::AttemptsPerIp;
    let n: u64 = 1_000_000;
    let before = ALLOCATED.load(Ordering::Relaxed);
    let store = MemoryStore::new(
        &specs(kind, 3, HumanDuration::secs(3600)),
        2_000_000,
        MonotonicClock,
    );
    for i in 0..n {
        let _ = store.acquire(&[kind], key(i));
    }
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    println!(
        "memory per tracked client: {:.1} bytes ({} clients, {:.1} MiB allocated)",
        bytes as f64 / n as f64,
        store.tracked(),
        bytes as f64 / (1024.0 * 1024.0)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct PrivateRedis {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_redis() -> Option<PrivateRedis> {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("mgk-bench-redis-{port}"));
    std::fs::create_dir_all(&dir).ok()?;
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some(PrivateRedis {
        child,
        dir,
        url: format!("redis://127.0.0.1:{port}"),
    })
}

fn redis_store(c: &mut Criterion) {
    let Some(redis) = start_redis() else {
        println!("redis store: not run (redis-server not on PATH)");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kinds = [
        LimitKind::RegistrationsPerIp,
        LimitKind::RegistrationsGlobal,
    ];
    let mut limits = specs(kinds[0], 1_000_000_000, HumanDuration::secs(3600));
    limits.0[kinds[1] as usize] = Some(LimitSpec {
        count: 1_000_000_000,
        period: HumanDuration::secs(3600),
    });
    let store = runtime.block_on(async {
        let store = RedisStore::new(&redis.url, false, limits, Duration::from_millis(500)).unwrap();
        // Connect and load the script.
        for _ in 0..100 {
            let _ = store.acquire(&kinds, key(0)).await;
        }
        store
    });
    let mut con = runtime.block_on(async {
        redis::Client::open(redis.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let _: () = runtime
        .block_on(redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut con))
        .unwrap();
    let mut decisions = 0u64;
    c.bench_function("limiter redis: one decision (client + global key)", |b| {
        b.iter(|| {
            decisions += 1;
            black_box(
                runtime
                    .block_on(store.acquire(&kinds, key(decisions % 1000)))
                    .is_ok(),
            )
        })
    });
    let stats: String = runtime
        .block_on(redis::cmd("INFO").arg("commandstats").query_async(&mut con))
        .unwrap();
    let calls = |name: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{name}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    println!(
        "redis commands per decision: evalsha {:.3}, eval {:.3} ({decisions} decisions)",
        calls("evalsha") as f64 / decisions as f64,
        calls("eval") as f64 / decisions as f64,
    );
}

criterion_group!(benches, memory_store, redis_store);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    memory_per_client();
}
