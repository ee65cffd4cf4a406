//! Chunked answers: decoding the homeserver's chunks on whatever bytes are
//! at hand and re-encoding them for the client; and answers delimited by
//! the connection's end, re-chunked.

use std::future::Future;
use std::io;
use std::ops::Range;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::upstream::{cut_short, invalid, read_some};
use super::Conn;

/// A chunk-size line longer than this is not HTTP.
const MAX_CHUNK_LINE: usize = 1024;

impl<F: Future> Conn<'_, F> {
    /// Relays a chunked body, chunk by chunk, re-encoded; trailers are
    /// dropped. `Ok(true)`: nothing followed the body.
    pub(super) async fn relay_chunked(
        &mut self,
        upstream: &mut TcpStream,
        leftover: Range<usize>,
    ) -> io::Result<bool> {
        // Compact the unread bytes to the front of `ubuf`.
        self.ubuf.copy_within(leftover.clone(), 0);
        let mut filled = leftover.len();
        let mut pos = 0;
        let mut decoder = ChunkDecoder::default();
        loop {
            while pos < filled {
                match decoder.step(&self.ubuf[pos..filled]).map_err(invalid)? {
                    None => break,
                    Some(Step::Data(n)) => {
                        chunk_header(&mut self.out, n);
                        self.out.extend_from_slice(&self.ubuf[pos..pos + n]);
                        self.out.extend_from_slice(b"\r\n");
                        pos += n;
                    }
                    Some(Step::Consumed(n)) => pos += n,
                    Some(Step::End(n)) => {
                        pos += n;
                        self.out.extend_from_slice(b"0\r\n\r\n");
                        self.client.write_all(&self.out).await?;
                        return Ok(pos == filled);
                    }
                }
            }
            if !self.out.is_empty() {
                self.client.write_all(&self.out).await?;
                self.out.clear();
            }
            // Keep an incomplete size line; drop what was consumed.
            self.ubuf.copy_within(pos..filled, 0);
            filled -= pos;
            pos = 0;
            if filled == self.ubuf.len() {
                return Err(invalid("a chunk-size line is too long"));
            }
            let n = read_some(upstream, &mut self.ubuf[filled..]).await?;
            if n == 0 {
                return Err(cut_short());
            }
            filled += n;
        }
    }

    /// Relays a body delimited by the connection's end, re-chunked: the
    /// homeserver connection is not reused (`Ok(false)`).
    pub(super) async fn relay_until_close(
        &mut self,
        upstream: &mut TcpStream,
        leftover: Range<usize>,
    ) -> io::Result<bool> {
        let mut pending = leftover;
        loop {
            if !pending.is_empty() {
                chunk_header(&mut self.out, pending.len());
                self.out.extend_from_slice(&self.ubuf[pending.clone()]);
                self.out.extend_from_slice(b"\r\n");
            }
            self.client.write_all(&self.out).await?;
            self.out.clear();
            let n = read_some(upstream, &mut self.ubuf).await?;
            if n == 0 {
                self.client.write_all(b"0\r\n\r\n").await?;
                return Ok(false);
            }
            pending = 0..n;
        }
    }
}

/// A chunked body decoder that works on whatever bytes are at hand.
#[derive(Default)]
struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

enum Step {
    /// These many bytes at the front are chunk data.
    Data(usize),
    /// These many bytes were framing.
    Consumed(usize),
    /// The body ended after these many bytes.
    End(usize),
}

impl ChunkDecoder {
    /// One step over `input` (not empty); `None` when a line is not
    /// complete yet.
    fn step(&mut self, input: &[u8]) -> Result<Option<Step>, &'static str> {
        match self.state {
            ChunkState::Data(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
                Ok(Some(Step::Data(n)))
            }
            ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailers => {
                let Some(line_end) = input.iter().position(|&b| b == b'\n') else {
                    if input.len() > MAX_CHUNK_LINE {
                        return Err("a chunk-size line is too long");
                    }
                    return Ok(None);
                };
                let line = &input[..line_end];
                let line = line
                    .strip_suffix(b"\r")
                    .ok_or("a bare LF in a chunked body")?;
                let consumed = line_end + 1;
                match self.state {
                    ChunkState::DataEnd => {
                        if !line.is_empty() {
                            return Err("chunk data longer than its size");
                        }
                        self.state = ChunkState::Size;
                        Ok(Some(Step::Consumed(consumed)))
                    }
                    ChunkState::Trailers => {
                        if line.is_empty() {
                            Ok(Some(Step::End(consumed)))
                        } else {
                            Ok(Some(Step::Consumed(consumed)))
                        }
                    }
                    _ => {
                        let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                        let digits = digits.trim_ascii_end();
                        if digits.is_empty() || digits.len() > 15 {
                            return Err("an invalid chunk size");
                        }
                        let mut size = 0u64;
                        for &d in digits {
                            let v = (d as char).to_digit(16).ok_or("an invalid chunk size")?;
                            size = size * 16 + u64::from(v);
                        }
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                        Ok(Some(Step::Consumed(consumed)))
                    }
                }
            }
        }
    }
}

fn chunk_header(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes, as the relay does.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut decoder = ChunkDecoder::default();
        let mut data = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut consumed = 0;
        loop {
            let mut pos = 0;
            while pos < pending.len() {
                match decoder.step(&pending[pos..])? {
                    None => break,
                    Some(Step::Data(n)) => {
                        data.extend_from_slice(&pending[pos..pos + n]);
                        pos += n;
                    }
                    Some(Step::Consumed(n)) => pos += n,
                    Some(Step::End(n)) => return Ok((data, consumed + pos + n)),
                }
            }
            pending.drain(..pos);
            consumed += pos;
            if fed == input.len() {
                return Err("cut short");
            }
            let next = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, used) = decode(body, step).unwrap();
            assert_eq!(data, b"hello world0123456789abcdef", "step {step}");
            assert_eq!(&body[used..], b"NEXT", "step {step}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"g\r\nhello\r\n0\r\n\r\n",
            b"3\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n",
            b"1000000000000000\r\n",
        ] {
            assert!(
                decode(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode(&endless, endless.len()).is_err());
    }

    #[test]
    fn chunk_headers_are_lowercase_hex() {
        for (len, text) in [
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65535, "ffff\r\n"),
        ] {
            let mut out = Vec::new();
            chunk_header(&mut out, len);
            assert_eq!(out, text.as_bytes());
        }
    }
}
