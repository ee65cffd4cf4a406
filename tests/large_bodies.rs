//! Bodies of known length large enough for the fast path to move them
//! socket to socket (splicing, where the system has it) rather than through
//! its buffers: they must arrive byte-exact, and the framing must hold as it
//! does for copied bodies — never a byte more than the length moved, a
//! request pipelined after an upload served as its own, bytes a homeserver
//! sends past its answer never relayed, a body cut or stalled on either side
//! answered or closed as on the copying path.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Gate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// Sizes around the point where the fast path stops copying (64 KiB left
/// to move), and well past it.
const SIZES: [usize; 8] = [
    1,
    65_535,
    65_536,
    65_537,
    70_000,
    300_000,
    3 * MIB,
    17 * MIB + 3,
];

/// Deterministic, non-periodic bytes (xorshift64*), different per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fnv(bytes: &[u8], mut hash: u64) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A request as the homeserver received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    body_len: u64,
    body_fnv: u64,
    /// The whole declared body arrived.
    complete: bool,
}

/// A homeserver stand-in speaking raw HTTP/1.1, answers framed by
/// `Content-Length`: `…/upload` answers `{"len":N,"fnv":H}` of the body it
/// read; `…/download/N` answers N bytes of `noise(N)`; `…/cut/N` declares N
/// bytes, sends a third of them and closes; `…/extra/N` sends N bytes and
/// then bytes that belong to no answer; anything else answers `ok`.
struct Homeserver {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<AtomicUsize>,
    /// Answers whose writing failed because the gate closed the connection.
    cut_off: Arc<AtomicUsize>,
}

impl Homeserver {
    async fn start() -> Homeserver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hs = Homeserver {
            url,
            seen: Arc::default(),
            accepted: Arc::default(),
            cut_off: Arc::default(),
        };
        let (seen, accepted, cut_off) = (hs.seen.clone(), hs.accepted.clone(), hs.cut_off.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, seen.clone(), cut_off.clone()));
            }
        });
        hs
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits up to five seconds for `check` to hold of what was seen.
    async fn wait_for(&self, what: &str, check: impl Fn(&[Seen]) -> bool) {
        for _ in 0..250 {
            if check(&self.seen()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what}: the homeserver saw {:?}", self.seen());
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Seen>>>, cut_off: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        let (method, path, head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
                let body: u64 = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().parse().unwrap()
                    });
                break (
                    req.method.unwrap().to_owned(),
                    req.path.unwrap().to_owned(),
                    len,
                    body,
                );
            }
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..head_len);
        // The body, hashed as it arrives; what follows it stays in `buf`.
        let mut left = body_len;
        let mut hash = FNV_OFFSET;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let here = (buf.len() as u64).min(left) as usize;
            hash = fnv(&buf[..here], hash);
            buf.drain(..here);
            left -= here as u64;
            if left == 0 {
                break;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let complete = left == 0;
        seen.lock().unwrap().push(Seen {
            method,
            path: path.clone(),
            body_len: body_len - left,
            body_fnv: hash,
            complete,
        });
        if !complete {
            return;
        }
        let number = |prefix: &str| {
            path.split_once(prefix)
                .and_then(|(_, n)| n.parse::<usize>().ok())
        };
        let (head, body, close) = if path.ends_with("/upload") {
            let json = format!("{{\"len\":{body_len},\"fnv\":{hash}}}");
            (ok_head(json.len()), json.into_bytes(), false)
        } else if let Some(n) = number("/download/") {
            (ok_head(n), noise(n as u64, n), false)
        } else if let Some(n) = number("/cut/") {
            (ok_head(n), noise(n as u64, n / 3), true)
        } else if let Some(n) = number("/extra/") {
            let mut body = noise(n as u64, n);
            body.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle");
            (ok_head(n), body, false)
        } else {
            (ok_head(2), b"ok".to_vec(), false)
        };
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in body.chunks(64 * 1024) {
            if stream.write_all(piece).await.is_err() {
                cut_off.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if close {
            return;
        }
    }
}

fn ok_head(len: usize) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n")
}

/// One answer read by a raw client: status and body (framed by its
/// `Content-Length`; `buf` keeps what follows it).
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (u16, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut chunk = vec![0u8; 256 * 1024];
    let (status, head_len, body_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let body: usize = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                    .expect("a Content-Length answer");
                break (response.code.unwrap(), len, body);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => panic!("not an answer ({e}): {:?}", String::from_utf8_lossy(buf)),
        }
        read_more(stream, buf, &mut chunk, deadline).await;
    };
    while buf.len() < head_len + body_len {
        read_more(stream, buf, &mut chunk, deadline).await;
    }
    let body = buf[head_len..head_len + body_len].to_vec();
    buf.drain(..head_len + body_len);
    (status, body)
}

async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
    deadline: tokio::time::Instant,
) {
    match tokio::time::timeout_at(deadline, stream.read(chunk)).await {
        Ok(Ok(0)) => panic!("the gate closed the connection; got {} bytes", buf.len()),
        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        Ok(Err(e)) => panic!("read failed: {e}"),
        Err(_) => panic!(
            "no answer in time; got {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ),
    }
}

/// Reads until the gate closes the connection (at most ten seconds).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the connection was not closed; got {} bytes",
        got.len()
    );
    got
}

fn upload_head(host: &str, len: usize) -> Vec<u8> {
    format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes()
}

fn get(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

const VERSIONS: &str = "/_matrix/client/versions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_arrive_exact_and_a_request_pipelined_after_one_is_its_own() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "").await;
    let host = gate.addr.to_string();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    let mut want = Vec::new();
    for (i, size) in SIZES.into_iter().enumerate() {
        let body = noise(i as u64 + 1, size);
        let mut request = upload_head(&host, size);
        if i % 2 == 0 {
            // Head, body and the next request in one go.
            request.extend_from_slice(&body);
            request.extend_from_slice(&get(&host, VERSIONS));
            stream.write_all(&request).await.unwrap();
        } else {
            // The body in pieces with pauses: the gate waits for the rest.
            stream.write_all(&request).await.unwrap();
            for piece in body.chunks(body.len().div_ceil(5)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                stream.write_all(piece).await.unwrap();
            }
            stream.write_all(&get(&host, VERSIONS)).await.unwrap();
        }
        let (status, answer) = read_answer(&mut stream, &mut buf).await;
        assert_eq!(
            status,
            200,
            "upload of {size}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        let json: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(
            json["len"].as_u64(),
            Some(size as u64),
            "upload of {size}: {json}"
        );
        assert_eq!(
            json["fnv"].as_u64(),
            Some(fnv(&body, FNV_OFFSET)),
            "upload of {size}: {json}"
        );
        let (status, answer) = read_answer(&mut stream, &mut buf).await;
        assert_eq!(
            (status, answer.as_slice()),
            (200, &b"ok"[..]),
            "after the upload of {size}"
        );
        want.push((size as u64, fnv(&body, FNV_OFFSET)));
    }
    let seen = hs.seen();
    assert_eq!(seen.len(), 2 * SIZES.len(), "{seen:?}");
    for (pair, (len, hash)) in seen.chunks(2).zip(want) {
        assert_eq!(
            pair[0],
            Seen {
                method: "POST".into(),
                path: "/_matrix/media/v3/upload".into(),
                body_len: len,
                body_fnv: hash,
                complete: true,
            }
        );
        assert_eq!(
            (
                pair[1].method.as_str(),
                pair[1].path.as_str(),
                pair[1].body_len
            ),
            ("GET", VERSIONS, 0)
        );
    }
    assert_eq!(
        hs.accepted.load(Ordering::SeqCst),
        1,
        "the homeserver connection was not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_arrive_exact_and_both_connections_carry_on() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "").await;
    let host = gate.addr.to_string();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    for size in SIZES {
        let path = format!("/_matrix/client/v1/media/download/{size}");
        stream.write_all(&get(&host, &path)).await.unwrap();
        let (status, body) = read_answer(&mut stream, &mut buf).await;
        assert_eq!(status, 200, "download of {size}");
        assert_eq!(body.len(), size);
        assert!(
            body == noise(size as u64, size),
            "download of {size} differs"
        );
        stream.write_all(&get(&host, VERSIONS)).await.unwrap();
        let (status, body) = read_answer(&mut stream, &mut buf).await;
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"ok"[..]),
            "after the download of {size}"
        );
    }
    assert!(buf.is_empty(), "bytes after the last answer: {}", buf.len());
    assert_eq!(
        hs.accepted.load(Ordering::SeqCst),
        1,
        "the homeserver connection was not reused"
    );
}

#[tokio::test]
async fn a_large_download_cut_short_ends_the_client_connection_at_the_cut() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "").await;
    let host = gate.addr.to_string();
    let size = 3 * MIB;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(&get(
            &host,
            &format!("/_matrix/client/v1/media/download/cut/{size}"),
        ))
        .await
        .unwrap();
    let got = read_to_close(&mut stream).await;
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an answer head")
        + 4;
    let head = String::from_utf8_lossy(&got[..head_end]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains(&format!("Content-Length: {size}")), "{head}");
    // Exactly what the homeserver sent, and the connection closed short of
    // the declared length: the client can tell the answer is incomplete.
    assert!(
        got[head_end..] == noise(size as u64, size / 3),
        "{} body bytes",
        got.len() - head_end
    );
}

#[tokio::test]
async fn bytes_after_a_large_answer_are_never_relayed_nor_its_connection_reused() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "").await;
    let host = gate.addr.to_string();
    let size = 300_000;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    stream
        .write_all(&get(
            &host,
            &format!("/_matrix/client/v1/media/download/extra/{size}"),
        ))
        .await
        .unwrap();
    let (status, body) = read_answer(&mut stream, &mut buf).await;
    assert_eq!(status, 200);
    assert!(body == noise(size as u64, size), "the body differs");
    // Give the gate time to see the bytes past the answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(&get(&host, VERSIONS)).await.unwrap();
    let (status, body) = read_answer(&mut stream, &mut buf).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"ok"[..]),
        "the next answer came from the leftover bytes"
    );
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    assert_eq!(
        hs.accepted.load(Ordering::SeqCst),
        2,
        "a connection with bytes past its answer was reused"
    );
}

#[tokio::test]
async fn an_upload_stalled_or_cut_midway_is_answered_and_never_completes_upstream() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "[server]\nupload_idle_timeout = \"300ms\"\n").await;
    let host = gate.addr.to_string();
    let size = 2 * MIB;
    let part = noise(7, 300_000);
    // (what, the client ends its side after the part, status)
    for (what, half_close, status) in [("stalled", false, 408), ("cut", true, 400)] {
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        stream.write_all(&upload_head(&host, size)).await.unwrap();
        stream.write_all(&part).await.unwrap();
        if half_close {
            stream.shutdown().await.unwrap();
        }
        let got = read_to_close(&mut stream).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {text}"
        );
        assert!(text.contains("\"errcode\":\"M_UNKNOWN\""), "{what}: {text}");
    }
    // The homeserver saw two requests it could not complete, and its
    // connections were closed with them.
    hs.wait_for("two incomplete uploads", |seen| seen.len() == 2)
        .await;
    for seen in hs.seen() {
        assert!(!seen.complete, "{seen:?}");
        assert_eq!(seen.body_len, part.len() as u64, "{seen:?}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_midway_through_a_large_download_closes_the_homeserver_connection() {
    let hs = Homeserver::start().await;
    let gate = Gate::start(&hs.url, "").await;
    let host = gate.addr.to_string();
    let size = 256 * MIB;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(&get(
            &host,
            &format!("/_matrix/client/v1/media/download/{size}"),
        ))
        .await
        .unwrap();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < MIB {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    drop(stream);
    for _ in 0..250 {
        if hs.cut_off.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hs.cut_off.load(Ordering::SeqCst),
        1,
        "the homeserver went on sending"
    );
    // The gate serves the next client.
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    stream.write_all(&get(&host, VERSIONS)).await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buf).await,
        (200, b"ok".to_vec())
    );
}
