//! Cost of one rate-limit decision and memory per tracked client.
//!
//! `cargo bench --bench limiter` prints:
//! - memory store: ns per decision on a hot key, and on new keys while 1M
//!   keys are tracked;
//! - bytes allocated per tracked client (counting allocator);
//! - Redis store: latency per decision against a private `redis-server`
//!   started on a free port, and Redis-side script calls per decision.
//!
//! It measures; it asserts nothing about time.

#![allow(unsafe_code)] // the counting allocator

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

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

fn memory_store() {
    let kind = LimitKind::AttemptsPerIp;
    let n: u64 = 1_000_000;

    let store = MemoryStore::new(
        &specs(kind, 1000, HumanDuration::secs(3600)),
        2_000_000,
        MonotonicClock,
    );
    let hot = key(1);
    let started = Instant::now();
    let mut allowed = 0u64;
    for _ in 0..n {
        allowed += u64::from(store.acquire(&[kind], hot).is_ok());
    }
    let hot_ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "memory store, hot key:            {hot_ns:8.1} ns/decision ({allowed} allowed of {n})"
    );

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
        "memory per tracked client:        {:8.1} bytes ({} clients, {:.1} MiB)",
        bytes as f64 / n as f64,
        store.tracked(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    let started = Instant::now();
    for i in n..2 * n {
        let _ = store.acquire(&[kind], key(i));
    }
    let new_ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("memory store, new key (1M-2M):    {new_ns:8.1} ns/decision");
    let started = Instant::now();
    for i in 0..n {
        let _ = store.acquire(&[kind], key(i * 7 % (2 * n)));
    }
    let warm_ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("memory store, among 2M keys:      {warm_ns:8.1} ns/decision");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn redis_store() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("mgk-bench-redis-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
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
        .spawn();
    let Ok(mut child) = child else {
        println!("redis store: not run (redis-server not on PATH)");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kinds = [
        LimitKind::RegistrationsPerIp,
        LimitKind::RegistrationsGlobal,
    ];
    let mut limits = specs(kinds[0], 1_000_000, HumanDuration::secs(3600));
    limits.0[kinds[1] as usize] = Some(LimitSpec {
        count: 1_000_000,
        period: HumanDuration::secs(3600),
    });
    let store = RedisStore::new(&url, false, limits, Duration::from_millis(500)).unwrap();
    // Warm up: connect and load the script.
    for _ in 0..100 {
        let _ = store.acquire(&kinds, key(0)).await;
    }
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut con)
        .await
        .unwrap();
    let n = 20_000u64;
    let mut samples = Vec::with_capacity(n as usize);
    let mut errors = 0;
    for i in 0..n {
        let started = Instant::now();
        if store.acquire(&kinds, key(i % 1000)).await.is_err() {
            errors += 1;
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / n as u32;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
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
        "redis store, one decision (2 keys): mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs ({errors} errors)",
        mean.as_secs_f64() * 1e6,
        samples[samples.len() / 2].as_secs_f64() * 1e6,
        samples[samples.len() * 99 / 100].as_secs_f64() * 1e6
    );
    println!(
        "redis commands per decision:      evalsha {:.3}, eval {:.3}, other script loads {}",
        calls("evalsha") as f64 / n as f64,
        calls("eval") as f64 / n as f64,
        calls("script|load") + calls("script")
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    memory_store();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(redis_store());
}
