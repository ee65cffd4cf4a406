//! Large fixed-length bodies moved from socket to socket by the kernel
//! (`splice(2)` through a pipe): the bytes never pass through the gate's
//! memory, and a large download or upload costs a few system calls per
//! pipe-full instead of a read and a write per buffer-full.
//!
//! Only a body whose length is known is moved this way, and never more than
//! what is left of that length: a request the client pipelined after its
//! upload, or bytes the homeserver sent past its answer, stay in their
//! socket for the framing that reads them (the next request head; the idle
//! pool's check, which then drops the connection). The count is the
//! framing, as it is for the copying path.
//!
//! The pipe is filled only while it is empty, so a fill that finds nothing
//! to move can only mean the source has nothing yet (an empty pipe has room)
//! and the wait is for the right socket; it is then emptied whole into the
//! sink before the next fill. At most one pipe-full is held in the kernel
//! per transfer, and the pipe is closed with the transfer. A system short
//! of pipe memory (`/proc/sys/fs/pipe-user-pages-soft`, reached with many
//! transfers at once) gives smaller pipes: the transfer still works, a
//! little less at a time.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use super::client::Timer;

/// The part of a body left to move from which it is spliced: below it, the
/// pipe's setup (four system calls) costs more than copying would.
pub(super) const SPLICE_FROM: u64 = 64 * 1024;

/// How a splice ended without failing.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Spliced {
    /// The whole body was moved.
    Whole,
    /// Splicing is not available (another system, no file descriptor left,
    /// a filter refusing the call): nothing was moved, copy instead.
    Unavailable,
}

/// Why a splice did not move the whole body.
#[derive(Debug)]
pub(super) enum Failure {
    /// The source closed before the body was complete.
    SourceEnded,
    /// Reading the source failed.
    Source(io::Error),
    /// The source sent nothing for the idle time it was allowed.
    SourceIdle,
    /// Writing to the sink failed.
    Sink(io::Error),
}

#[cfg(target_os = "linux")]
mod linux {
    use std::future::poll_fn;
    use std::io;
    use std::task::Poll;
    use std::time::Duration;

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use nix::unistd::pipe2;
    use tokio::io::Interest;
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::{Failure, Spliced, Timer};

    /// The pipe size asked for: the most one fill moves. The system's
    /// default (one page per slot, 16 slots) is kept if it refuses.
    const PIPE_SIZE: usize = 256 * 1024;

    pub(super) async fn splice_exact(
        from: &TcpStream,
        to: &TcpStream,
        len: u64,
        idle: Option<Duration>,
        timer: &mut Timer,
    ) -> Result<Spliced, Failure> {
        let Ok((pipe_out, pipe_in)) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) else {
            return Ok(Spliced::Unavailable);
        };
        let _ = fcntl(&pipe_in, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let mut left = len;
        let mut moved = false;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(PIPE_SIZE);
            let mut held = loop {
                let filled = from.try_io(Interest::READABLE, || {
                    splice(from, None, &pipe_in, None, want, flags).map_err(io::Error::from)
                });
                match filled {
                    Ok(0) => return Err(Failure::SourceEnded),
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if !moved && unsupported(&e) => return Ok(Spliced::Unavailable),
                    Err(e) => return Err(Failure::Source(e)),
                }
                wait_readable(from, idle, timer).await?;
            };
            moved = true;
            left -= held as u64;
            while held > 0 {
                let emptied = to.try_io(Interest::WRITABLE, || {
                    splice(&pipe_out, None, to, None, held, flags).map_err(io::Error::from)
                });
                match emptied {
                    Ok(0) => return Err(Failure::Sink(io::ErrorKind::WriteZero.into())),
                    Ok(n) => held -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        to.writable().await.map_err(Failure::Sink)?;
                    }
                    Err(e) => return Err(Failure::Sink(e)),
                }
            }
        }
        Ok(Spliced::Whole)
    }

    /// Errors meaning this socket pair or system cannot splice at all.
    fn unsupported(error: &io::Error) -> bool {
        matches!(
            error.raw_os_error(),
            Some(libc_errno) if libc_errno == nix::libc::EINVAL
                || libc_errno == nix::libc::ENOSYS
                || libc_errno == nix::libc::EPERM
                || libc_errno == nix::libc::EOPNOTSUPP
        )
    }

    /// Waits until `from` has something to read, at most `idle`.
    async fn wait_readable(
        from: &TcpStream,
        idle: Option<Duration>,
        timer: &mut Timer,
    ) -> Result<(), Failure> {
        timer.deadline = idle.map(|idle| Instant::now() + idle);
        let ready = poll_fn(|cx| {
            if let Poll::Ready(ready) = from.poll_read_ready(cx) {
                return Poll::Ready(ready.map_err(Failure::Source));
            }
            timer.poll_expired(cx).map(|()| Err(Failure::SourceIdle))
        })
        .await;
        timer.deadline = None;
        ready
    }
}

/// Moves exactly `len` bytes from `from` to `to`. With `idle`, the source
/// may pause at most that long between arrivals.
pub(super) async fn splice_exact(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    idle: Option<Duration>,
    timer: &mut Timer,
) -> Result<Spliced, Failure> {
    #[cfg(target_os = "linux")]
    return linux::splice_exact(from, to, len, idle, timer).await;
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (from, to, len, idle, timer);
        Ok(Spliced::Unavailable)
    }
}
