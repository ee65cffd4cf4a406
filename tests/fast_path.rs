//! The HTTP/1.1 fast path against the full stack: a request served by the
//! fast path (the first plain request on a connection) and the same request
//! served by hyper and the tower service (on a connection the full stack
//! took over, after a guarded request) must reach the homeserver alike, and
//! their answers must reach the client alike. A guarded request is gated
//! whichever path its connection was on.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FakeHomeserver, Gate, Recorded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request that the full stack serves (a guarded route): the connection
/// it is sent on stays with the full stack.
const TAKEOVER: &str = "/_matrix/client/v3/register/available?username=takeover";

fn takeover_request(host: &str) -> Vec<u8> {
    format!("GET {TAKEOVER} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// One answer as a raw client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawAnswer {
    status: u16,
    reason: String,
    /// Lowercased names, sorted; `date` left out (it changes by the second).
    headers: Vec<(String, String)>,
    has_date: bool,
    body: Vec<u8>,
}

/// Reads one answer from `stream` (with `buf` holding bytes already read).
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> RawAnswer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = response.parse(buf) {
            let status = response.code.unwrap();
            let reason = response.reason.unwrap_or("").to_owned();
            let mut list = Vec::new();
            let mut has_date = false;
            let mut length = None;
            let mut chunked = false;
            for h in response.headers.iter() {
                let name = h.name.to_ascii_lowercase();
                let value = String::from_utf8_lossy(h.value).into_owned();
                match name.as_str() {
                    "date" => {
                        has_date = true;
                        continue;
                    }
                    "content-length" => length = Some(value.parse::<usize>().unwrap()),
                    "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                    _ => {}
                }
                list.push((name, value));
            }
            list.sort();
            buf.drain(..len);
            let body = if head_request || status == 204 || status == 304 {
                Vec::new()
            } else if chunked {
                loop {
                    if let Some((body, used)) = decode_chunked(buf) {
                        buf.drain(..used);
                        break body;
                    }
                    read_more(stream, buf, deadline).await;
                }
            } else if let Some(length) = length {
                while buf.len() < length {
                    read_more(stream, buf, deadline).await;
                }
                buf.drain(..length).collect()
            } else {
                panic!("an answer without framing reached the client: {list:?}");
            };
            return RawAnswer {
                status,
                reason,
                headers: list,
                has_date,
                body,
            };
        }
        read_more(stream, buf, deadline).await;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: tokio::time::Instant) {
    let mut chunk = [0u8; 16384];
    let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
        .await
        .expect("answer within 10 s")
        .unwrap();
    assert!(
        n > 0,
        "connection closed mid-answer; got {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// A whole chunked body at the front of `buf`: the data and the bytes used.
fn decode_chunked(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let line_end = pos + buf[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[pos..line_end]).unwrap();
        let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
        pos = line_end + 2;
        if size == 0 {
            // No trailers are relayed.
            if buf.len() < pos + 2 {
                return None;
            }
            assert_eq!(&buf[pos..pos + 2], b"\r\n", "trailers reached the client");
            return Some((body, pos + 2));
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        assert_eq!(&buf[pos + size..pos + size + 2], b"\r\n");
        pos += size + 2;
    }
}

/// Sends `request` on a new connection, either straight (the fast path) or
/// after a takeover request (the full stack), and reads the answer.
async fn exchange(gate: &Gate, request: &[u8], head: bool, full_stack: bool) -> RawAnswer {
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    if full_stack {
        stream
            .write_all(&takeover_request(&gate.addr.to_string()))
            .await
            .unwrap();
        let answer = read_answer(&mut stream, &mut buf, false).await;
        assert_eq!(answer.status, 200, "takeover request: {answer:?}");
    }
    stream.write_all(request).await.unwrap();
    read_answer(&mut stream, &mut buf, head).await
}

/// What the homeserver received, comparable: headers lowercased and sorted.
fn comparable(recorded: &Recorded) -> (String, String, Vec<(String, String)>, Vec<u8>) {
    let mut headers: Vec<(String, String)> = recorded
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    headers.sort();
    (
        recorded.method.to_string(),
        recorded.target.clone(),
        headers,
        recorded.body.to_vec(),
    )
}

/// The requests of the comparison: every kind of header the fast path
/// treats on its own.
fn requests(host: &str) -> Vec<(&'static str, Vec<u8>)> {
    let big_body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut big = format!(
        "PUT /_matrix/media/v3/upload/big HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        big_body.len()
    )
    .into_bytes();
    big.extend_from_slice(&big_body);
    vec![
        (
            "plain GET",
            format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test/1\r\nAccept: */*\r\n\r\n").into_bytes(),
        ),
        (
            "hop-by-hop and spoofed forwarding headers",
            format!(
                "GET /_matrix/client/v3/account/whoami HTTP/1.1\r\nHost: {host}\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
                 Trailer: x-t\r\nUpgrade: websocket\r\nProxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n\
                 X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: evil\r\n\
                 X-Forwarded-Proto: https\r\nTrue-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\n\
                 Authorization: Bearer syt_token\r\nConnection: keep-alive\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "PUT with a body",
            format!(
                "PUT /_matrix/client/v3/rooms/%21r%3Aexample.org/send/m.room.message/txn1 HTTP/1.1\r\nHost: {host}\r\n\
                 Content-Type: application/json\r\nContent-Length: 30\r\n\r\n{{\"msgtype\":\"m.text\",\"body\":\"x\"}}"
            )
            .into_bytes(),
        ),
        (
            "POST with an empty body",
            format!("POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
        ),
        (
            "DELETE",
            format!("DELETE /_matrix/client/v3/devices/ABC HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
        ),
        (
            "OPTIONS",
            format!("OPTIONS /_matrix/client/v3/sync HTTP/1.1\r\nHost: {host}\r\nOrigin: https://app.example\r\n\r\n").into_bytes(),
        ),
        (
            "query and reserved characters",
            format!(
                "GET /_matrix/client/v3/rooms/!a:b/messages;x=(1)*+,$'@?dir=b&limit=10&filter=%7B%7D HTTP/1.1\r\nHost: {host}\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "repeated headers and odd case",
            format!(
                "GET /_matrix/client/versions HTTP/1.1\r\nHOST: {host}\r\nAccept: a\r\nX-Many: 1\r\naccept: b\r\nx-many: 2\r\n\r\n"
            )
            .into_bytes(),
        ),
        ("a body larger than the read buffer", big),
        (
            "the last request on a connection",
            format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes(),
        ),
    ]
}

async fn compare_requests(extra_toml: &str) {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), extra_toml).await;
    let host = gate.addr.to_string();
    for (what, request) in requests(&host) {
        let head = request.starts_with(b"HEAD");
        let mut seen = Vec::new();
        let mut answers = Vec::new();
        for full_stack in [false, true] {
            hs.clear();
            answers.push(exchange(&gate, &request, head, full_stack).await);
            let recorded: Vec<Recorded> = hs
                .requests()
                .into_iter()
                .filter(|r| r.target != TAKEOVER)
                .collect();
            assert_eq!(recorded.len(), 1, "{what}: {recorded:?}");
            seen.push(comparable(&recorded[0]));
        }
        assert_eq!(
            seen[0], seen[1],
            "{what}: the homeserver saw the two paths differently"
        );
        assert_eq!(
            answers[0], answers[1],
            "{what}: the client saw the two paths differently"
        );
        assert_eq!(answers[0].status, 200, "{what}");
    }
}

#[tokio::test]
async fn requests_reach_the_homeserver_alike_on_both_paths() {
    compare_requests("").await;
}

#[tokio::test]
async fn a_trusted_proxys_client_address_is_resolved_alike_on_both_paths() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
    )
    .await;
    let host = gate.addr.to_string();
    let request = format!(
        "GET /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.7\r\n\
         X-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: https\r\n\r\n"
    );
    let mut seen = Vec::new();
    for full_stack in [false, true] {
        hs.clear();
        exchange(&gate, request.as_bytes(), false, full_stack).await;
        let recorded: Vec<Recorded> = hs
            .requests()
            .into_iter()
            .filter(|r| r.target != TAKEOVER)
            .collect();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].header("x-forwarded-for"), Some("198.51.100.7"));
        assert_eq!(recorded[0].header("x-forwarded-proto"), Some("https"));
        seen.push(comparable(&recorded[0]));
    }
    assert_eq!(seen[0], seen[1]);
    // The fast path's own code is exercised here too, not only its equality.
    compare_requests("[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
}

/// A stand-in homeserver that answers each request with the raw answer its
/// path names, and closes the connection after it if the script says so.
/// An empty answer is never sent: the connection is held until the gate
/// closes it. The counter counts connections accepted, plus 1000 for each
/// held connection the gate closed.
async fn scripted_homeserver(
    script: Vec<(&'static str, &'static [u8], bool)>,
) -> (String, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            *count.lock().unwrap() += 1;
            let count = count.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let (path, used) = loop {
                        let mut headers = [httparse::EMPTY_HEADER; 64];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
                            let path = req.path.unwrap().to_owned();
                            let body: usize = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .map_or(0, |h| {
                                    std::str::from_utf8(h.value).unwrap().parse().unwrap()
                                });
                            if buf.len() >= len + body {
                                break (path, len + body);
                            }
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    buf.drain(..used);
                    let (answer, close) = script
                        .iter()
                        .find(|(name, _, _)| path.ends_with(name))
                        .map_or(
                            (
                                &b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"[..],
                                false,
                            ),
                            |(_, a, c)| (*a, *c),
                        );
                    if answer.is_empty() {
                        // Never answer; count the connection's end.
                        let mut rest = [0u8; 1024];
                        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                        *count.lock().unwrap() += 1000;
                        return;
                    }
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

const ANSWERS: [(&str, &[u8], bool); 10] = [
    (
        "takeover",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"available\":true}",
        false,
    ),
    (
        "/length",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
        false,
    ),
    (
        "/chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        false,
    ),
    (
        "/until-close",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nthe body ends with the connection",
        true,
    ),
    ("/no-content", b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n", false),
    (
        "/not-modified",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n",
        false,
    ),
    (
        "/interim",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        false,
    ),
    (
        "/named-hop",
        b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-End: kept\r\nContent-Length: 2\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\r\nok",
        false,
    ),
    (
        "/length-closes",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nbye!!",
        true,
    ),
    // Transfer-Encoding overrides the stale Content-Length (RFC 9112 6.3).
    (
        "/length-and-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        false,
    ),
];

/// Answers the gate cannot relay as they are: both paths answer `502`.
const UNRELAYABLE_ANSWERS: [(&str, &[u8], bool); 3] = [
    // The gate never asks for an upgrade.
    (
        "/switching",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        true,
    ),
    // A transfer coding other than chunked would be lost with the header.
    (
        "/gzip-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    ),
    (
        "/chunked-gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nthe body ends with the connection",
        true,
    ),
];

#[tokio::test]
async fn answers_reach_the_client_alike_on_both_paths() {
    let mut script = ANSWERS.to_vec();
    script.extend(UNRELAYABLE_ANSWERS);
    let (url, _) = scripted_homeserver(script).await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    for (path, _, _) in ANSWERS[1..].iter().chain(&UNRELAYABLE_ANSWERS) {
        for method in ["GET", "HEAD"] {
            let request =
                format!("{method} /_matrix/client/v3/x{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let head = method == "HEAD";
            let fast = exchange(&gate, request.as_bytes(), head, false).await;
            let full = exchange(&gate, request.as_bytes(), head, true).await;
            assert_eq!(
                fast, full,
                "{method} {path}: the client saw the two paths differently"
            );
            assert!(fast.has_date, "{method} {path}: no Date");
            assert!(
                !fast
                    .headers
                    .iter()
                    .any(|(n, _)| n == "x-hop" || n == "keep-alive" || n == "connection"),
                "{method} {path}: hop-by-hop headers reached the client: {fast:?}"
            );
            if UNRELAYABLE_ANSWERS.iter().any(|(p, _, _)| p == path) {
                assert_eq!(fast.status, 502, "{method} {path}: {fast:?}");
            }
        }
    }
    // The bodies themselves, on the fast path.
    let body_of = |path: &str| {
        let request = format!("GET /_matrix/client/v3/x{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let gate = &gate;
        async move { exchange(gate, request.as_bytes(), false, false).await }
    };
    assert_eq!(body_of("/chunked").await.body, b"hello world");
    assert_eq!(
        body_of("/until-close").await.body,
        b"the body ends with the connection"
    );
    assert_eq!(body_of("/interim").await.body, b"ok");
    let both = body_of("/length-and-chunked").await;
    assert_eq!(both.body, b"hello world");
    assert!(
        !both.headers.iter().any(|(n, _)| n == "content-length"),
        "{both:?}"
    );
    let named = body_of("/named-hop").await;
    assert!(
        named.headers.contains(&("x-end".into(), "kept".into())),
        "{named:?}"
    );
}

#[tokio::test]
async fn keep_alive_connections_carry_every_kind_of_answer_in_order() {
    let (url, _) = scripted_homeserver(ANSWERS.to_vec()).await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    // One at a time, then all written at once (pipelined).
    for pipelined in [false, true] {
        let mut all = Vec::new();
        for (path, _, _) in &ANSWERS[1..] {
            let request =
                format!("GET /_matrix/client/v3/x{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            if pipelined {
                all.extend_from_slice(request.as_bytes());
            } else {
                stream.write_all(request.as_bytes()).await.unwrap();
                let answer = read_answer(&mut stream, &mut buf, false).await;
                assert!(answer.status < 400, "{path}: {answer:?}");
            }
        }
        if pipelined {
            stream.write_all(&all).await.unwrap();
            for (path, raw, _) in &ANSWERS[1..] {
                let answer = read_answer(&mut stream, &mut buf, false).await;
                let want = std::str::from_utf8(raw).unwrap();
                let status = want.rsplit("HTTP/1.1 ").next().unwrap()[..3]
                    .parse::<u16>()
                    .unwrap();
                assert_eq!(answer.status, status, "{path}: {answer:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_registration_after_pass_through_requests_is_gated() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let host = gate.addr.to_string();
    let plain = format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let body = r#"{"username":"admin","password":"x","auth":{"type":"m.login.dummy"}}"#;
    let register = format!(
        "POST /_matrix/client/v3/register HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Sent one after another on one connection, then all in one write.
    for pipelined in [false, true] {
        hs.clear();
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        let mut buf = Vec::new();
        if pipelined {
            let all = [
                plain.as_str(),
                plain.as_str(),
                register.as_str(),
                plain.as_str(),
            ]
            .concat();
            stream.write_all(all.as_bytes()).await.unwrap();
        }
        let mut statuses = Vec::new();
        for request in [&plain, &plain, &register, &plain] {
            if !pipelined {
                stream.write_all(request.as_bytes()).await.unwrap();
            }
            let answer = read_answer(&mut stream, &mut buf, false).await;
            statuses.push(answer.status);
            if request == &register {
                let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
                assert_eq!(json["errcode"], "M_USER_IN_USE", "{json}");
            }
        }
        assert_eq!(statuses, [200, 200, 400, 200], "pipelined: {pipelined}");
        let targets: Vec<String> = hs.requests().into_iter().map(|r| r.target).collect();
        assert_eq!(targets.len(), 3, "{targets:?}");
        assert!(
            targets.iter().all(|t| t == "/_matrix/client/versions"),
            "the refused registration reached the homeserver: {targets:?}"
        );
    }
}

#[tokio::test]
async fn connections_the_homeserver_closes_after_each_answer_are_not_reused() {
    // Every answer comes without `Connection: close`, and the stand-in
    // closes right after it: the gate must notice before reusing.
    let (url, accepted) = scripted_homeserver(vec![(
        "/versions",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        true,
    )])
    .await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..50 {
        // POSTs with a body: never sent twice, so a stale connection would
        // show as a 502.
        let request = format!(
            "POST /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buf, false).await;
        assert_eq!(answer.status, 200, "request {i}: {answer:?}");
        assert_eq!(answer.body, b"ok");
    }
    assert_eq!(*accepted.lock().unwrap(), 50);
}

#[tokio::test]
async fn keep_alive_connections_to_the_homeserver_are_reused() {
    let (url, accepted) = scripted_homeserver(vec![(
        "/versions",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        false,
    )])
    .await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        let mut buf = Vec::new();
        for _ in 0..10 {
            let request = format!("GET /_matrix/client/versions HTTP/1.1\r\nHost: {host}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            assert_eq!(read_answer(&mut stream, &mut buf, false).await.status, 200);
        }
    }
    assert_eq!(*accepted.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_malformed_answer_is_a_502_and_a_cut_one_closes_the_connection() {
    let (url, _) = scripted_homeserver(vec![
        ("/garbage", b"SPDY/9 200 OK\r\n\r\n", true),
        (
            "/two-lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            true,
        ),
        (
            "/cut",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a little",
            true,
        ),
    ])
    .await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    for path in ["/garbage", "/two-lengths"] {
        let request = format!("GET /_matrix/client/v3/x{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let answer = exchange(&gate, request.as_bytes(), false, false).await;
        assert_eq!(answer.status, 502, "{path}: {answer:?}");
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(json["errcode"], "M_UNKNOWN");
    }
    // The head was relayed before the body was cut: the client sees the
    // connection end short of the declared length.
    let request = format!("GET /_matrix/client/v3/x/cut HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("only a little"), "{text}");
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_abandons_its_request_upstream() {
    let (url, counter) = scripted_homeserver(vec![("/hang", b"", false)]).await;
    let gate = Gate::start(&url, "").await;
    let host = gate.addr.to_string();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let request = format!("GET /_matrix/client/v3/sync/hang HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *counter.lock().unwrap(),
        1,
        "the request reached the homeserver"
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while *counter.lock().unwrap() < 1000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the homeserver connection stayed open after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Header names a request may carry in the generated comparison: every kind
/// the fast path treats on its own, and ordinary ones.
const HEADER_POOL: [&str; 21] = [
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Connection",
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Client-IP",
    "Authorization",
    "User-Agent",
    "Accept",
    "X-Custom",
    "Connection",
    "Cookie",
    "Content-Type",
];

fn generated_request(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(usize, bool, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (index, upper, value) in headers {
        let name = HEADER_POOL[*index];
        let name = if *upper {
            name.to_ascii_uppercase()
        } else {
            name.to_ascii_lowercase()
        };
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    request
}

#[test]
fn generated_requests_reach_the_homeserver_alike_on_both_paths() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (hs, gates) = runtime.block_on(async {
        let hs = FakeHomeserver::start().await;
        let plain = Gate::start(&hs.url(), "").await;
        let trusting = Gate::start(
            &hs.url(),
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
        )
        .await;
        (hs, [plain, trusting])
    });
    let value = prop_oneof![
        "[a-zA-Z0-9 ,;=./:_-]{0,24}",
        Just("close".to_owned()),
        Just("keep-alive".to_owned()),
        Just("Keep-Alive".to_owned()),
        Just("keep-alive, x-custom".to_owned()),
        Just("6.6.6.6, 10.1.2.3".to_owned()),
        Just("10.1.2.3".to_owned()),
        Just("https".to_owned()),
    ];
    let strategy = (
        0usize..2,
        prop::sample::select(vec!["GET", "PUT", "POST", "DELETE", "OPTIONS"]),
        "(/[a-zA-Z0-9._~!$&'()*+,;=:@%-]{0,12}){1,4}(\\?[a-zA-Z0-9=&%._-]{0,16})?",
        prop::collection::vec((0..HEADER_POOL.len(), any::<bool>(), value), 0..8),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    let mut runner = TestRunner::new(Config::with_cases(300));
    runner
        .run(&strategy, |(which, method, path, headers, body)| {
            let gate = &gates[which];
            let host = gate.addr.to_string();
            let request = generated_request(&host, method, &path, &headers, &body);
            let mut seen = Vec::new();
            let mut answers = Vec::new();
            for full_stack in [false, true] {
                hs.clear();
                let answer = runtime.block_on(exchange(gate, &request, false, full_stack));
                let recorded: Vec<Recorded> = hs
                    .requests()
                    .into_iter()
                    .filter(|r| r.target != TAKEOVER)
                    .collect();
                prop_assert_eq!(recorded.len(), 1, "{:?}", recorded);
                seen.push(comparable(&recorded[0]));
                answers.push(answer);
            }
            prop_assert_eq!(
                &seen[0],
                &seen[1],
                "the homeserver saw the two paths differently"
            );
            prop_assert_eq!(
                &answers[0],
                &answers[1],
                "the client saw the two paths differently"
            );
            Ok(())
        })
        .unwrap();
    drop(gates);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Sends `request` twice on one connection through the fast path, then
/// once on a connection the full stack took over; returns the three answers.
async fn answered_on_both_paths(gate: &Gate, request: &[u8]) -> Vec<RawAnswer> {
    let mut answers = Vec::new();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        stream.write_all(request).await.unwrap();
        answers.push(read_answer(&mut stream, &mut buf, false).await);
    }
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let mut buf = Vec::new();
    stream
        .write_all(&takeover_request(&gate.addr.to_string()))
        .await
        .unwrap();
    read_answer(&mut stream, &mut buf, false).await;
    stream.write_all(request).await.unwrap();
    answers.push(read_answer(&mut stream, &mut buf, false).await);
    answers
}

#[tokio::test]
async fn a_502_or_504_is_answered_alike_and_keeps_the_connection() {
    // Nothing listens: 502.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let gate = Gate::start(&format!("http://{closed}"), "").await;
    let request = format!(
        "GET /_matrix/client/versions HTTP/1.1\r\nHost: {}\r\n\r\n",
        gate.addr
    );
    let answers = answered_on_both_paths(&gate, request.as_bytes()).await;
    assert_eq!(answers[0].status, 502, "{answers:?}");
    assert_eq!(answers[0], answers[1]);
    assert_eq!(
        answers[0], answers[2],
        "the client saw the two paths differently"
    );

    // No answer within the response timeout: 504.
    let (url, _) = scripted_homeserver(vec![("/hang", b"", false)]).await;
    let config = matrix_gatekeeper::Config::from_toml(&format!(
        "[upstream]\nurl = \"{url}\"\nresponse_timeout = \"300ms\"\n"
    ))
    .unwrap();
    let gate = Gate::start_with(config).await;
    let request = format!(
        "GET /_matrix/client/v3/x/hang HTTP/1.1\r\nHost: {}\r\n\r\n",
        gate.addr
    );
    let answers = answered_on_both_paths(&gate, request.as_bytes()).await;
    assert_eq!(answers[0].status, 504, "{answers:?}");
    assert_eq!(answers[0], answers[1]);
    assert_eq!(
        answers[0], answers[2],
        "the client saw the two paths differently"
    );

    // With a body that may not have been read, the connection closes.
    let request = format!(
        "PUT /_matrix/client/v3/x/hang HTTP/1.1\r\nHost: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        gate.addr
    );
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}
