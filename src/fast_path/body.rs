//! What the homeserver receives: the rewritten head, then the body, copied
//! from the client as it arrives (or, when much is left, spliced).

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::client::Wait;
use super::request::Plan;
use super::response::HeadError;
use super::splice::{splice_exact, Failure, Spliced, SPLICE_FROM};
use super::upstream::is_reset;
use super::Conn;
use crate::upstream::UploadStalled;

impl<F: Future> Conn<'_, F> {
    /// Writes the request head and body to the homeserver.
    pub(super) async fn send(
        &mut self,
        upstream: &mut TcpStream,
        plan: &Plan,
    ) -> Result<(), HeadError> {
        let buffered = (self.end - self.start) as u64;
        if plan.body_len <= buffered {
            return self.send_whole(upstream, plan.body_len as usize).await;
        }
        upstream
            .write_all(&self.request)
            .await
            .map_err(upstream_failed)?;
        let mut left = plan.body_len;
        let mut spliceable = true;
        loop {
            let here = (self.end - self.start).min(usize::try_from(left).unwrap_or(usize::MAX));
            if here > 0 {
                upstream
                    .write_all(&self.buf[self.start..self.start + here])
                    .await
                    .map_err(upstream_failed)?;
                self.start += here;
                left -= here as u64;
            }
            self.consumed();
            if left == 0 {
                return Ok(());
            }
            if spliceable && left >= SPLICE_FROM {
                // Everything buffered is sent: the rest comes from the socket.
                match self.splice_body(upstream, left).await {
                    Ok(Spliced::Whole) => return Ok(()),
                    Ok(Spliced::Unavailable) => spliceable = false,
                    Err(failure) => return Err(self.body_failure(failure)),
                }
            }
            self.more_body().await?;
        }
    }

    /// Moves the rest of the body, `left` bytes, from the client's socket
    /// to the homeserver's without copying it.
    async fn splice_body(&mut self, upstream: &TcpStream, left: u64) -> Result<Spliced, Failure> {
        let idle = Some(self.fast.upload_idle_timeout);
        splice_exact(self.client, upstream, left, idle, &mut self.timer).await
    }

    /// The error a failed splice of the body is, by whose side failed.
    fn body_failure(&self, failure: Failure) -> HeadError {
        match failure {
            Failure::SourceEnded => client_ended(),
            Failure::Source(error) => HeadError::ClientBody(error),
            Failure::SourceIdle => client_idle(self.fast.upload_idle_timeout),
            Failure::Sink(error) => upstream_failed(error),
        }
    }

    /// The whole body (`body_len` bytes) is in the buffer: head and body go
    /// in one write.
    async fn send_whole(
        &mut self,
        upstream: &mut TcpStream,
        body_len: usize,
    ) -> Result<(), HeadError> {
        let body_end = self.start + body_len;
        if body_len == 0 {
            upstream
                .write_all(&self.request)
                .await
                .map_err(upstream_failed)?;
        } else {
            self.request
                .extend_from_slice(&self.buf[self.start..body_end]);
            let result = upstream.write_all(&self.request).await;
            let head_len = self.request.len() - body_len;
            self.request.truncate(head_len);
            result.map_err(upstream_failed)?;
        }
        self.start = body_end;
        self.consumed();
        Ok(())
    }

    /// Rewinds the client buffer once everything in it is used.
    fn consumed(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more of the body from the client. The client's body failing,
    /// or pausing too long, is the client's doing.
    async fn more_body(&mut self) -> Result<(), HeadError> {
        let idle = self.fast.upload_idle_timeout;
        match self.read_client(Some(Instant::now() + idle), false).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(Wait::TimedOut)) => Err(client_idle(idle)),
            Ok(Err(_)) => Err(client_ended()),
            Err(error) => Err(HeadError::ClientBody(error)),
        }
    }
}

/// The client paused its body longer than `idle`.
fn client_idle(idle: Duration) -> HeadError {
    HeadError::ClientBody(io::Error::new(io::ErrorKind::TimedOut, UploadStalled(idle)))
}

/// The client closed its side before its body was complete.
fn client_ended() -> HeadError {
    HeadError::ClientBody(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the client closed before its body was complete",
    ))
}

/// A failed write to the homeserver: a reset means it had closed the
/// connection.
fn upstream_failed(error: io::Error) -> HeadError {
    if is_reset(&error) {
        HeadError::Closed
    } else {
        HeadError::Io(error)
    }
}
