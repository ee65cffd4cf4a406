//! Raw-socket tests: chunked and oversized registration bodies, conflicting
//! length headers and request smuggling, slow clients, requests refused
//! before the gate (`CONNECT`, two `Host` headers, a transfer coding other
//! than chunked), uploads the client does
//! not finish, and refusals a client still sending its body can read.
//!
//! The request-smuggling tests run against two homeservers: the recording
//! hyper fake of the harness, and a deliberately naive one here that frames
//! a body by `Content-Length` whenever it is present. The naive one is what a
//! desynchronised next hop looks like: if the gate ever forwarded a request
//! carrying both headers, it would read a smuggled second request.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{raw_exchange, FakeHomeserver, Gate};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const REGISTER: &str = "/_matrix/client/v3/register";
const PASS_THROUGH: &str = "/_matrix/client/v3/user/%40alice%3Aexample.org/filter";

/// `{"username":"admin"}`: 20 bytes.
const ADMIN_BODY: &str = r#"{"username":"admin"}"#;

/// A complete registration of the reserved name `admin`, as an attacker
/// would hide it inside another request's body.
fn smuggled_admin_registration() -> String {
    format!(
        "POST {REGISTER} HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{ADMIN_BODY}",
        ADMIN_BODY.len()
    )
}

// === raw HTTP/1.1 responses ===

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a Matrix error answer with this status and errcode.
    fn assert_error(&self, status: u16, errcode: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        let json = self.json();
        assert_eq!(json["errcode"], errcode, "{json}");
        assert!(json["error"].is_string(), "{json}");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body at the start of `buf`: the body and the bytes used,
/// or `None` if incomplete.
fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let line_end = at + find(&buf[at..], b"\r\n")?;
        let line = std::str::from_utf8(&buf[at..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = at + find(&buf[at..], b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some((body, at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
}

/// Parses one response at the start of `buf`: the response and the bytes
/// used, or `None` if incomplete.
fn parse_response(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).expect("response head is text");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &buf[head_end + 4..];
    let response = |body: Vec<u8>| RawResponse {
        status,
        headers: headers.clone(),
        body,
    };
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        let (body, used) = decode_chunked(rest)?;
        return Some((response(body), head_end + 4 + used));
    }
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse::<usize>().expect("numeric content-length"))
        .unwrap_or(0);
    if rest.len() < length {
        return None;
    }
    Some((response(rest[..length].to_vec()), head_end + 4 + length))
}

/// Every complete response in `buf`, in order.
fn parse_responses(buf: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((response, used)) = parse_response(&buf[at..]) {
        out.push(response);
        at += used;
    }
    out
}

/// Reads from `stream` until one complete response arrived; panics if none
/// did within `wait`. The stream stays open: the gate must answer without
/// the client finishing its request.
async fn read_response(stream: &mut TcpStream, wait: Duration) -> RawResponse {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some((response, _)) = parse_response(&buf) {
                return Some(response);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(Some(response)) => response,
        Ok(None) => panic!(
            "connection closed without a complete response: {:?}",
            String::from_utf8_lossy(&buf)
        ),
        Err(_) => panic!(
            "no complete response within {wait:?}: {:?}",
            String::from_utf8_lossy(&buf)
        ),
    }
}

/// Reads until the peer closes; `Some(bytes read)` if it did within `wait`.
async fn wait_for_close(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| buf)
}

/// A chunked body with one chunk per part.
fn chunked(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A request: request line, the given header lines, then `body` as is.
fn request(method: &str, path: &str, headers: &[String], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: gate\r\n").into_bytes();
    for header in headers {
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

// === a Content-Length-first homeserver ===

#[derive(Debug, Clone)]
struct NaiveRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl NaiveRequest {
    fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

/// A homeserver that frames bodies by `Content-Length` first, then by
/// `Transfer-Encoding: chunked`, answers `200 {"ok":true}`, and closes the
/// connection after a request carrying `Connection: close`.
struct NaiveHomeserver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<NaiveRequest>>>,
}

impl NaiveHomeserver {
    async fn start() -> NaiveHomeserver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<NaiveRequest>>> = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(naive_connection(stream, record.clone()));
            }
        });
        NaiveHomeserver { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<NaiveRequest> {
        self.seen.lock().unwrap().clone()
    }
}

async fn naive_connection(stream: TcpStream, record: Arc<Mutex<Vec<NaiveRequest>>>) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match stream.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            match stream.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if let Some(length) = get("content-length") {
            let Ok(length) = length.parse::<usize>() else {
                return;
            };
            body.resize(length, 0);
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut size = String::new();
                if stream.read_line(&mut size).await.unwrap_or(0) == 0 {
                    return;
                }
                let size = size.trim().split(';').next().unwrap_or_default();
                let Ok(size) = usize::from_str_radix(size, 16) else {
                    return;
                };
                let mut data = vec![0u8; size + 2];
                if size == 0 {
                    // The empty line after the last chunk (no trailers here).
                    let mut end = String::new();
                    let _ = stream.read_line(&mut end).await;
                    break;
                }
                if stream.read_exact(&mut data).await.is_err() {
                    return;
                }
                body.extend_from_slice(&data[..size]);
            }
        }
        let close = get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        record.lock().unwrap().push(NaiveRequest {
            method,
            target,
            headers,
            body,
        });
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
        if stream.get_mut().write_all(answer).await.is_err() || close {
            return;
        }
    }
}

// === chunked and oversized registration bodies ===

#[tokio::test]
async fn chunked_registration_body_is_forwarded_with_a_content_length() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let body = chunked(&[b"{\"use", b"rname\"", b":\"al", b"ice\"}"]);
    let raw = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            "Transfer-Encoding: chunked".into(),
            "Connection: close".into(),
        ],
        &body,
    );
    let out = raw_exchange(gate.addr, &raw, Duration::from_secs(5)).await;
    let responses = parse_responses(out.as_bytes());
    assert_eq!(responses.len(), 1, "{out}");
    assert_eq!(responses[0].status, 200, "{out}");

    let seen = hs.only_request();
    assert_eq!(seen.target, REGISTER);
    assert_eq!(seen.json()["username"], "alice");
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
    assert!(
        seen.headers.get("transfer-encoding").is_none(),
        "{:?}",
        seen.headers
    );
}

#[tokio::test]
async fn chunked_registration_body_over_the_limit_is_413() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[registration]\nmax_body_bytes = 1024\n").await;
    let json = format!(r#"{{"username":"alice","pad":"{}"}}"#, "x".repeat(2000));
    let parts: Vec<&[u8]> = json.as_bytes().chunks(300).collect();
    let raw = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            "Transfer-Encoding: chunked".into(),
            "Connection: close".into(),
        ],
        &chunked(&parts),
    );
    let out = raw_exchange(gate.addr, &raw, Duration::from_secs(5)).await;
    let responses = parse_responses(out.as_bytes());
    assert!(!responses.is_empty(), "no answer: {out:?}");
    responses[0].assert_error(413, "M_TOO_LARGE");
    hs.assert_saw_nothing("chunked body over the limit");
}

#[tokio::test]
async fn declared_length_over_the_limit_is_413_before_the_body_arrives() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        "[registration]\nmax_body_bytes = 1024\n[server]\nbody_timeout = \"10s\"\n",
    )
    .await;
    let head = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            "Content-Length: 5000".into(),
        ],
        b"",
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(&head).await.unwrap();
    let started = Instant::now();
    // Well under the 10 s body timeout: the gate did not wait for the body.
    let response = read_response(&mut stream, Duration::from_secs(5)).await;
    response.assert_error(413, "M_TOO_LARGE");
    assert!(started.elapsed() < Duration::from_secs(5));
    hs.assert_saw_nothing("declared length over the limit");
}

// === conflicting length headers and request smuggling ===

/// How a request carrying both length headers hides a second request.
#[derive(Debug, Clone, Copy)]
enum Smuggle {
    /// `Content-Length` covers the chunked body *and* a whole second
    /// request after it: a CL-reading hop swallows it, a TE-reading hop
    /// behind it reads it as a request of its own.
    LengthCoversSecondRequest,
    /// `Content-Length` covers only the first chunk-size line; the chunk
    /// data is a whole second request: a CL-reading hop behind a
    /// TE-reading one reads it as a request of its own.
    ChunkHidesSecondRequest,
}

/// Header orders tried: `Content-Length` first, then `Transfer-Encoding`
/// first.
const ORDERS: [bool; 2] = [true, false];

fn conflicting_request(path: &str, smuggle: Smuggle, length_first: bool) -> Vec<u8> {
    let smuggled = smuggled_admin_registration();
    let (body, length) = match smuggle {
        Smuggle::LengthCoversSecondRequest => {
            let mut body = chunked(&[br#"{"username":"alice"}"#]);
            body.extend_from_slice(smuggled.as_bytes());
            let length = body.len();
            (body, length)
        }
        Smuggle::ChunkHidesSecondRequest => {
            let size_line = format!("{:x}\r\n", smuggled.len());
            let body = chunked(&[smuggled.as_bytes()]);
            (body, size_line.len())
        }
    };
    let cl = format!("Content-Length: {length}");
    let te = "Transfer-Encoding: chunked".to_owned();
    let ct = "Content-Type: application/json".to_owned();
    let headers = if length_first {
        [ct, cl, te]
    } else {
        [ct, te, cl]
    };
    request("POST", path, &headers, &body)
}

fn is_admin_registration(target: &str, body: &[u8]) -> bool {
    target.contains("register")
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|json| json["username"] == "admin")
}

/// Sends one conflicting request and checks the answers: the first must be
/// hyper's `400` or the request handled as chunked; a later one can only be
/// the gate guarding a smuggled request, never a `200`.
async fn send_conflicting(gate: &Gate, path: &str, smuggle: Smuggle, length_first: bool) {
    let raw = conflicting_request(path, smuggle, length_first);
    let out = raw_exchange(gate.addr, &raw, Duration::from_secs(3)).await;
    let responses = parse_responses(out.as_bytes());
    let context = format!("{path} {smuggle:?} length_first={length_first}");
    assert!(!responses.is_empty(), "{context}: no answer: {out:?}");
    let first = &responses[0];
    let expected: &[u16] = match (path, smuggle) {
        // Read as chunked: the body is `{"username":"alice"}`.
        (REGISTER, Smuggle::LengthCoversSecondRequest) => &[200, 400],
        // Read as chunked: the body is the smuggled request's text.
        (REGISTER, Smuggle::ChunkHidesSecondRequest) => &[400],
        _ => &[200, 400],
    };
    assert!(
        expected.contains(&first.status),
        "{context}: answered {first:?}"
    );
    for later in responses.iter().skip(1) {
        assert_ne!(later.status, 200, "{context}: smuggled request passed");
    }
}

#[tokio::test]
async fn conflicting_length_headers_never_reach_the_homeserver_together() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    for path in [REGISTER, PASS_THROUGH] {
        for smuggle in [
            Smuggle::LengthCoversSecondRequest,
            Smuggle::ChunkHidesSecondRequest,
        ] {
            for length_first in ORDERS {
                send_conflicting(&gate, path, smuggle, length_first).await;
            }
        }
    }
    let seen = hs.requests();
    for request in &seen {
        assert!(
            !(request.headers.contains_key("content-length")
                && request.headers.contains_key("transfer-encoding")),
            "homeserver received both length headers: {request:?}"
        );
        assert!(
            !is_admin_registration(&request.target, &request.body),
            "smuggled registration reached the homeserver: {request:?}"
        );
    }
    // At most one request per exchange, never the smuggled one.
    assert!(seen.len() <= 8, "{seen:?}");
    for request in seen.iter().filter(|r| r.target == REGISTER) {
        assert_eq!(request.json()["username"], "alice", "{request:?}");
    }
}

#[tokio::test]
async fn request_smuggling_fails_against_a_content_length_first_homeserver() {
    let hs = NaiveHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let mut exchanges = 0;
    for path in [REGISTER, PASS_THROUGH] {
        for smuggle in [
            Smuggle::LengthCoversSecondRequest,
            Smuggle::ChunkHidesSecondRequest,
        ] {
            for length_first in ORDERS {
                send_conflicting(&gate, path, smuggle, length_first).await;
                exchanges += 1;
            }
        }
    }
    let seen = hs.requests();
    assert!(seen.len() <= exchanges, "{seen:?}");
    for request in &seen {
        assert!(
            !(request.has("content-length") && request.has("transfer-encoding")),
            "homeserver received both length headers: {request:?}"
        );
        assert!(
            !is_admin_registration(&request.target, &request.body),
            "smuggled registration reached the homeserver: {request:?}"
        );
        assert!(
            request.target == REGISTER || request.target == PASS_THROUGH,
            "homeserver parsed a request the client never sent: {request:?}"
        );
        assert_eq!(request.method, "POST", "{request:?}");
    }
}

/// Control: the naive homeserver really is fooled when a request with both
/// length headers reaches it, so the tests above can see smuggling.
#[tokio::test]
async fn naive_homeserver_reads_a_smuggled_request_when_reached_directly() {
    let hs = NaiveHomeserver::start().await;
    let raw = conflicting_request(PASS_THROUGH, Smuggle::ChunkHidesSecondRequest, true);
    let _ = raw_exchange(hs.addr, &raw, Duration::from_secs(3)).await;
    let seen = hs.requests();
    assert!(
        seen.iter()
            .any(|r| r.target == REGISTER && is_admin_registration(&r.target, &r.body)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn obfuscated_transfer_encoding_is_not_passed_on() {
    let hs = NaiveHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let smuggled = smuggled_admin_registration();
    let body = chunked(&[smuggled.as_bytes()]);
    let size_line = format!("{:x}\r\n", smuggled.len()).len();
    let variants: [&[&str]; 5] = [
        &["Transfer-Encoding: xchunked"],
        &["Transfer-Encoding: chunked, identity"],
        &["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        &["Transfer-Encoding : chunked"],
        &["Transfer-Encoding:\tchunked"],
    ];
    for variant in variants {
        for path in [REGISTER, PASS_THROUGH] {
            let mut headers = vec![format!("Content-Length: {size_line}")];
            headers.extend(variant.iter().map(|h| (*h).to_owned()));
            let raw = request("POST", path, &headers, &body);
            let out = raw_exchange(gate.addr, &raw, Duration::from_secs(3)).await;
            let responses = parse_responses(out.as_bytes());
            assert!(!responses.is_empty(), "{variant:?}: no answer: {out:?}");
            for response in responses.iter().skip(1) {
                assert_ne!(response.status, 200, "{variant:?}: {out}");
            }
        }
    }
    for request in hs.requests() {
        assert!(
            !(request.has("content-length") && request.has("transfer-encoding")),
            "homeserver received both length headers: {request:?}"
        );
        assert!(
            !is_admin_registration(&request.target, &request.body),
            "smuggled registration reached the homeserver: {request:?}"
        );
        assert!(
            request.target == REGISTER || request.target == PASS_THROUGH,
            "homeserver parsed a request the client never sent: {request:?}"
        );
    }
}

// === slow clients ===

#[tokio::test]
async fn registration_body_that_never_finishes_is_408() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[server]\nbody_timeout = \"300ms\"\n").await;
    let partial = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            "Content-Length: 20".into(),
        ],
        br#"{"use"#,
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(&partial).await.unwrap();
    let response = read_response(&mut stream, Duration::from_secs(5)).await;
    response.assert_error(408, "M_UNKNOWN");
    hs.assert_saw_nothing("unfinished body");
}

#[tokio::test]
async fn chunked_registration_body_that_never_finishes_is_408() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[server]\nbody_timeout = \"300ms\"\n").await;
    let partial = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            "Transfer-Encoding: chunked".into(),
        ],
        b"5\r\n{\"use\r\n",
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(&partial).await.unwrap();
    let response = read_response(&mut stream, Duration::from_secs(5)).await;
    response.assert_error(408, "M_UNKNOWN");
    hs.assert_saw_nothing("unfinished chunked body");
}

#[tokio::test]
async fn client_that_never_finishes_its_headers_is_disconnected() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[server]\nheader_read_timeout = \"300ms\"\n").await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"POST /_matrix/client/v3/register HTTP/1.1\r\nHost: gate\r\nContent-")
        .await
        .unwrap();
    let closed = wait_for_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "connection still open after 5 s");
    hs.assert_saw_nothing("unfinished headers");
}

#[tokio::test]
async fn client_that_sends_nothing_is_disconnected() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[server]\nheader_read_timeout = \"300ms\"\n").await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let closed = wait_for_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "idle connection still open after 5 s");
    hs.assert_saw_nothing("idle connection");
}

#[tokio::test]
async fn client_that_stalls_inside_the_http2_preface_is_disconnected() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[server]\nheader_read_timeout = \"300ms\"\n").await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let closed = wait_for_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "connection still open after 5 s");
    hs.assert_saw_nothing("stalled preface");
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_homeserver_named_by_its_address() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let answer = raw_exchange(
        gate.addr,
        b"GET /_matrix/client/versions HTTP/1.0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = hs.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("host"), Some(hs.addr.to_string().as_str()));
    assert_eq!(seen[0].header("x-forwarded-host"), None);
}

// === requests the gate does not forward ===

/// A connection to the gate. With `full_stack`, a guarded request is sent
/// and answered first, so the full stack serves what follows on it.
async fn connection(gate: &Gate, full_stack: bool) -> TcpStream {
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    if full_stack {
        let takeover = request(
            "GET",
            "/_matrix/client/v3/register/available?username=takeover",
            &[],
            b"",
        );
        stream.write_all(&takeover).await.unwrap();
        let answer = read_response(&mut stream, Duration::from_secs(5)).await;
        assert!(answer.status < 500, "takeover request: {answer:?}");
    }
    stream
}

#[tokio::test]
async fn two_host_headers_are_refused_on_both_paths() {
    let hs = NaiveHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    for full_stack in [false, true] {
        for path in [
            PASS_THROUGH,
            "/_matrix/client/v3/register/available?username=alice",
        ] {
            let mut stream = connection(&gate, full_stack).await;
            let before = hs.requests().len();
            let raw = format!("GET {path} HTTP/1.1\r\nHost: gate\r\nHost: other.example\r\n\r\n");
            stream.write_all(raw.as_bytes()).await.unwrap();
            let answer = read_response(&mut stream, Duration::from_secs(5)).await;
            answer.assert_error(400, "M_UNKNOWN");
            assert_eq!(
                hs.requests().len(),
                before,
                "{path} (full stack: {full_stack}) reached the homeserver: {:?}",
                hs.requests()
            );
        }
    }
}

#[tokio::test]
async fn connect_is_refused_and_nothing_is_forwarded() {
    let hs = NaiveHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    for full_stack in [false, true] {
        let mut stream = connection(&gate, full_stack).await;
        let before = hs.requests().len();
        stream
            .write_all(b"CONNECT hs.example:443 HTTP/1.1\r\nHost: hs.example:443\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut stream, Duration::from_secs(5)).await;
        answer.assert_error(405, "M_UNRECOGNIZED");
        assert!(answer.header("allow").is_some(), "{answer:?}");
        // A client that starts its tunnel at once is not read as HTTP.
        assert!(
            wait_for_close(&mut stream, Duration::from_secs(5))
                .await
                .is_some(),
            "the connection stayed open after a refused CONNECT"
        );
        assert_eq!(hs.requests().len(), before, "{:?}", hs.requests());
    }
}

#[tokio::test]
async fn a_body_with_a_transfer_coding_besides_chunked_is_501_and_not_forwarded() {
    // hyper undoes only the chunked framing: forwarded, the body would
    // reach the homeserver still gzip-coded with nothing saying so.
    let hs = NaiveHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let body = chunked(&[b"\x1f\x8b\x08\x00 not json"]);
    for full_stack in [false, true] {
        for path in [PASS_THROUGH, REGISTER] {
            for coding in ["gzip, chunked", "GZip ,chunked"] {
                let mut stream = connection(&gate, full_stack).await;
                let before = hs.requests().len();
                let headers = [format!("Transfer-Encoding: {coding}")];
                stream
                    .write_all(&request("POST", path, &headers, &body))
                    .await
                    .unwrap();
                let answer = read_response(&mut stream, Duration::from_secs(5)).await;
                answer.assert_error(501, "M_UNRECOGNIZED");
                let error = answer.json()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(error.to_lowercase().contains("gzip"), "{error}");
                assert_eq!(
                    hs.requests().len(),
                    before,
                    "{path} {coding:?} (full stack: {full_stack}) reached the homeserver: {:?}",
                    hs.requests()
                );
            }
        }
    }
    // Chunked alone is still forwarded.
    let raw = request(
        "POST",
        PASS_THROUGH,
        &["Transfer-Encoding: chunked".to_owned()],
        &body,
    );
    let out = raw_exchange(gate.addr, &raw, Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

// === request bodies the client does not finish ===

/// The value of `gatekeeper_upstream_errors_total{kind}`.
async fn upstream_errors(gate: &Gate, kind: &str) -> u64 {
    let metrics = common::get(&gate.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    let prefix = format!("gatekeeper_upstream_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
}

/// A gate in front of `hs` with `toml` (whose `[upstream]` table gets
/// the homeserver's URL) and an admin listener for its metrics.
async fn gate_with_metrics(hs: &FakeHomeserver, toml: &str) -> Gate {
    let toml = toml.replace(
        "[upstream]\n",
        &format!("[upstream]\nurl = \"{}\"\n", hs.url()),
    );
    let config = matrix_gatekeeper::Config::from_toml(&toml).unwrap();
    Gate::start_full(config, true, None).await
}

/// Uploads whose body stops early: 10 of 100 announced bytes, and a
/// chunked body after its first chunk.
fn unfinished_uploads() -> [Vec<u8>; 2] {
    let path = "/_matrix/media/v3/upload/x";
    [
        request("PUT", path, &["Content-Length: 100".into()], b"0123456789"),
        request(
            "PUT",
            path,
            &["Transfer-Encoding: chunked".into()],
            b"a\r\n0123456789\r\n",
        ),
    ]
}

#[tokio::test]
async fn an_upload_the_client_does_not_finish_is_its_own_400_not_a_homeserver_error() {
    let hs = FakeHomeserver::start().await;
    let gate = gate_with_metrics(&hs, "[upstream]\nresponse_timeout = \"10s\"\n").await;
    let [cut_length, cut_chunked] = unfinished_uploads();
    let bad_chunked = request(
        "PUT",
        "/_matrix/media/v3/upload/x",
        &["Transfer-Encoding: chunked".into()],
        b"a\r\n0123456789\r\nzz\r\n",
    );
    // (what, request, full stack, half-close after sending)
    let cases: [(&str, &[u8], bool, bool); 4] = [
        (
            "cut Content-Length body, fast path",
            &cut_length,
            false,
            true,
        ),
        (
            "cut Content-Length body, full stack",
            &cut_length,
            true,
            true,
        ),
        ("cut chunked body", &cut_chunked, true, true),
        ("malformed chunked body", &bad_chunked, true, false),
    ];
    for (what, raw, full_stack, half_close) in cases {
        let mut stream = connection(&gate, full_stack).await;
        stream.write_all(raw).await.unwrap();
        if half_close {
            stream.shutdown().await.unwrap();
        }
        let answer = read_response(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(answer.status, 400, "{what}: {answer:?}");
        answer.assert_error(400, "M_UNKNOWN");
        assert!(
            wait_for_close(&mut stream, Duration::from_secs(5))
                .await
                .is_some(),
            "{what}: the connection stayed open"
        );
        assert_eq!(upstream_errors(&gate, "connect").await, 0, "{what}");
    }
}

#[tokio::test]
async fn an_upload_that_stalls_is_a_408_of_its_own_on_both_paths() {
    let hs = FakeHomeserver::start().await;
    let gate = gate_with_metrics(
        &hs,
        "[server]\nupload_idle_timeout = \"300ms\"\n[upstream]\nresponse_timeout = \"30s\"\n",
    )
    .await;
    let [stalled_length, stalled_chunked] = unfinished_uploads();
    let cases: [(&str, &[u8], bool); 3] = [
        ("Content-Length body, fast path", &stalled_length, false),
        ("Content-Length body, full stack", &stalled_length, true),
        ("chunked body", &stalled_chunked, true),
    ];
    for (what, raw, full_stack) in cases {
        let mut stream = connection(&gate, full_stack).await;
        stream.write_all(raw).await.unwrap();
        // The client keeps its connection open and sends nothing more.
        let answer = read_response(&mut stream, Duration::from_secs(10)).await;
        answer.assert_error(408, "M_UNKNOWN");
        assert!(
            wait_for_close(&mut stream, Duration::from_secs(5))
                .await
                .is_some(),
            "{what}: the connection stayed open"
        );
        assert_eq!(upstream_errors(&gate, "connect").await, 0, "{what}");
        assert_eq!(upstream_errors(&gate, "timeout").await, 0, "{what}");
    }
}

// === refusals while the client is still sending ===

/// Large enough that the client is still writing when the gate answers.
const STILL_SENDING: usize = 4 * 1024 * 1024;

/// Sends the rest of a request, `body`, and reads everything the gate sends
/// until it closes: neither may be cut off by a reset.
async fn send_then_read(stream: &mut TcpStream, body: &[u8]) -> RawResponse {
    let written = stream.write_all(body).await;
    let mut got = Vec::new();
    let read = stream.read_to_end(&mut got).await;
    assert!(
        written.is_ok() && read.is_ok(),
        "write: {written:?}, read: {read:?}, got {:?}",
        String::from_utf8_lossy(&got)
    );
    let responses = parse_responses(&got);
    assert_eq!(responses.len(), 1, "{:?}", String::from_utf8_lossy(&got));
    responses.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_client_still_sending_a_body_over_the_limit_reads_the_whole_413() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[registration]\nmax_body_bytes = 1024\n").await;
    let head = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            format!("Content-Length: {STILL_SENDING}"),
        ],
        b"",
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(&head).await.unwrap();
    let answer = send_then_read(&mut stream, &vec![b' '; STILL_SENDING]).await;
    answer.assert_error(413, "M_TOO_LARGE");
    hs.assert_saw_nothing("body over the limit");
}

#[tokio::test]
async fn a_client_that_sends_its_body_after_the_408_reads_the_whole_408() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[server]\nbody_timeout = \"300ms\"\n[registration]\nmax_body_bytes = {}\n",
            2 * STILL_SENDING
        ),
    )
    .await;
    let head = request(
        "POST",
        REGISTER,
        &[
            "Content-Type: application/json".into(),
            format!("Content-Length: {}", 1 + STILL_SENDING),
        ],
        b"{",
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(&head).await.unwrap();
    // The 408 has arrived (and is left unread); the rest of the body follows.
    stream.readable().await.unwrap();
    let answer = send_then_read(&mut stream, &vec![b' '; STILL_SENDING]).await;
    answer.assert_error(408, "M_UNKNOWN");
    hs.assert_saw_nothing("body too slow");
}
