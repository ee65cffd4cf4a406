//! Idle keep-alive connections to the homeserver: the one mechanism both of
//! the gate's homeserver connection pools are built on.
//!
//! The gate holds two kinds of homeserver connection. The full stack sends
//! through hyper's client, whose connection lives in a task of its own and
//! is reached only through a `SendRequest` handle ([`super::pool`]); the
//! HTTP/1.1 fast path writes and reads a plain socket itself
//! (`crate::fast_path`). One pool cannot serve both: a socket handed to
//! hyper never comes back out of it, and a `SendRequest` cannot carry the
//! fast path's raw bytes. So each path pools its own kind of connection,
//! and everything about keeping them is here, once, generic over the
//! connection ([`Reusable`]):
//!
//! - where the homeserver is and how a connection to it is opened
//!   ([`IdlePool::connect`], `TCP_NODELAY`, the connect timeout);
//! - one stack of idle connections (the gate talks to one origin only, so
//!   no map keyed by origin), handed out newest first so that the ones left
//!   over after a burst age out;
//! - a liveness check before reuse: closed ones are dropped, busy ones left
//!   for a later request;
//! - at most [`MAX_IDLE`] idle connections, none at all when
//!   `pool_idle_timeout` is zero;
//! - the reaper, which closes connections idle for longer than
//!   `pool_idle_timeout` or found closed.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// At most this many idle connections are kept; more are closed.
pub(crate) const MAX_IDLE: usize = 1024;

/// What a pooled connection can do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It can take a request.
    Ready,
    /// It is still finishing its last exchange: left idle for later.
    Busy,
    /// It is closed (or failed): dropped.
    Closed,
}

/// A homeserver connection that can wait in an [`IdlePool`].
pub(crate) trait Reusable {
    /// Checked before the connection is handed out again and by the
    /// reaper; cheap, without a system call as long as the homeserver sent
    /// nothing on an idle connection.
    fn liveness(&self) -> Liveness;

    /// Whether the connection is known to be closed without looking at its
    /// socket: checked when it is given back.
    fn known_closed(&self) -> bool;
}

/// Idle connections of kind `C` to the homeserver.
pub(crate) struct IdlePool<C> {
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Oldest at the front, most recently given back at the back.
    idle: Mutex<VecDeque<Idle<C>>>,
    reaper: Once,
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C> fmt::Debug for IdlePool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdlePool")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl<C: Reusable> IdlePool<C> {
    /// A pool of connections to `host:port` (`host` a name, or an address;
    /// IPv6 addresses with or without brackets). A zero `idle_timeout`
    /// keeps no connection for reuse.
    pub(crate) fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(IdlePool {
            host: bare_host(host).to_owned(),
            port,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
            reaper: Once::new(),
        })
    }

    /// The most recently given back idle connection that is ready for a
    /// request; closed ones met on the way are dropped.
    pub(crate) fn take(&self) -> Option<C> {
        let mut idle = self.lock();
        let mut index = idle.len();
        while index > 0 {
            index -= 1;
            match idle[index].conn.liveness() {
                Liveness::Ready => return idle.remove(index).map(|entry| entry.conn),
                Liveness::Closed => drop(idle.remove(index)),
                Liveness::Busy => {}
            }
        }
        None
    }

    /// Keeps `conn` for reuse, unless it is closed, reuse is off or the
    /// pool is full (then it closes).
    pub(crate) fn give_back(&self, conn: C) {
        if self.idle_timeout.is_zero() || conn.known_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// How many idle connections the pool holds (for tests).
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Idle<C>>> {
        // A panic while holding the lock cannot leave the stack inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<C: Reusable + Send + 'static> IdlePool<C> {
    /// Opens a new TCP connection to the homeserver (with `TCP_NODELAY`),
    /// or fails with `TimedOut` after the connect timeout. The first call
    /// starts the reaper.
    pub(crate) async fn connect(self: &Arc<Self>) -> io::Result<TcpStream> {
        self.reaper
            .call_once(|| spawn_reaper(Arc::downgrade(self), self.idle_timeout));
        let timeout = self.connect_timeout;
        let stream =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {timeout:?}"),
                    )
                })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Closes the connections idle for too long, and those found closed.
    fn sweep(&self) {
        let timeout = self.idle_timeout;
        self.lock().retain(|entry| {
            entry.since.elapsed() < timeout && entry.conn.liveness() != Liveness::Closed
        });
    }
}

/// `host` as a name or address to connect to: IPv6 brackets removed.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Sweeps the pool every half `idle_timeout` (at least every 500 ms), for
/// as long as the pool lives.
fn spawn_reaper<C: Reusable + Send + 'static>(pool: Weak<IdlePool<C>>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(500));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            pool.sweep();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    /// A connection whose liveness the test sets.
    #[derive(Clone)]
    struct Fake {
        id: u8,
        state: Arc<AtomicU8>,
    }

    impl Fake {
        fn new(id: u8) -> Self {
            Fake {
                id,
                state: Arc::new(AtomicU8::new(0)),
            }
        }

        fn set(&self, liveness: Liveness) {
            self.state.store(liveness as u8, Ordering::SeqCst);
        }
    }

    impl Reusable for Fake {
        fn liveness(&self) -> Liveness {
            match self.state.load(Ordering::SeqCst) {
                0 => Liveness::Ready,
                1 => Liveness::Busy,
                _ => Liveness::Closed,
            }
        }

        fn known_closed(&self) -> bool {
            self.liveness() == Liveness::Closed
        }
    }

    fn pool(idle_timeout: Duration) -> Arc<IdlePool<Fake>> {
        IdlePool::new("[::1]", 1, Duration::from_secs(1), idle_timeout)
    }

    #[test]
    fn the_newest_ready_connection_is_handed_out_and_closed_ones_dropped() {
        let pool = pool(Duration::from_secs(60));
        let (a, b, c) = (Fake::new(1), Fake::new(2), Fake::new(3));
        for conn in [&a, &b, &c] {
            pool.give_back(conn.clone());
        }
        c.set(Liveness::Closed);
        b.set(Liveness::Busy);
        assert_eq!(pool.take().map(|conn| conn.id), Some(1));
        // The closed one is gone, the busy one waits.
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.take().is_none());
        b.set(Liveness::Ready);
        assert_eq!(pool.take().map(|conn| conn.id), Some(2));
        assert!(pool.take().is_none());
    }

    #[test]
    fn closed_connections_zero_timeouts_and_a_full_pool_keep_nothing() {
        let pool_of = pool(Duration::from_secs(60));
        let closed = Fake::new(1);
        closed.set(Liveness::Closed);
        pool_of.give_back(closed);
        assert_eq!(pool_of.idle_count(), 0);

        let off = pool(Duration::ZERO);
        off.give_back(Fake::new(1));
        assert_eq!(off.idle_count(), 0);

        for _ in 0..MAX_IDLE + 5 {
            pool_of.give_back(Fake::new(0));
        }
        assert_eq!(pool_of.idle_count(), MAX_IDLE);
    }

    #[test]
    fn hosts_lose_their_ipv6_brackets() {
        assert_eq!(bare_host("[::1]"), "::1");
        assert_eq!(bare_host("::1"), "::1");
        assert_eq!(bare_host("hs.example"), "hs.example");
        assert_eq!(pool(Duration::ZERO).host, "::1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_closes_old_and_closed_connections() {
        let pool = pool(Duration::from_secs(10));
        spawn_reaper(Arc::downgrade(&pool), pool.idle_timeout);
        let (old, closed) = (Fake::new(1), Fake::new(2));
        pool.give_back(old);
        tokio::time::sleep(Duration::from_secs(6)).await;
        pool.give_back(closed.clone());
        pool.give_back(Fake::new(3));
        closed.set(Liveness::Closed);
        assert_eq!(pool.idle_count(), 3);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pool.take().map(|conn| conn.id), Some(3));
        assert!(pool.take().is_none());
    }
}
