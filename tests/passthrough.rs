//! Non-registration traffic through the gate: bodies byte-exact and streamed
//! both ways, forwarding and hop-by-hop headers rewritten, upstream failures
//! answered as Matrix errors, long-polls left alone, and a graceful drain.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, send, FakeHomeserver, Gate};
use http::{Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matrix_gatekeeper::Config;
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1024 * 1024;

async fn setup(extra: &str) -> (FakeHomeserver, Gate) {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), extra).await;
    (hs, gate)
}

/// A gate whose `[upstream]` table is written here, not by the harness.
async fn gate_with_upstream(url: &str, upstream_settings: &str) -> Gate {
    let toml = format!("[upstream]\nurl = \"{url}\"\n{upstream_settings}");
    Gate::start_with(Config::from_toml(&toml).expect("test config is valid")).await
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Deterministic, non-periodic test bytes (xorshift64*).
struct Noise(u64);

impl Noise {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let word = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        Noise(seed).fill(&mut out);
        out
    }
}

/// What an [`Upload`] has produced so far: length and FNV-1a hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Produced {
    len: u64,
    fnv: u64,
}

/// A request body of `remaining` pseudo-random bytes, generated frame by
/// frame; it never holds more than one frame and hashes what it hands out.
struct Upload {
    remaining: u64,
    noise: Noise,
    produced: Arc<Mutex<Produced>>,
}

impl futures_core::Stream for Upload {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(256 * 1024);
        self.remaining -= n;
        let mut chunk = vec![0u8; n as usize];
        self.noise.fill(&mut chunk);
        {
            let mut produced = self.produced.lock().unwrap();
            produced.len += n;
            let mut hash = produced.fnv;
            for b in &chunk {
                hash = (hash ^ u64::from(*b)).wrapping_mul(FNV_PRIME);
            }
            produced.fnv = hash;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

/// An upstream that answers every request with its own body, streamed back
/// as it arrives: a byte-exact mirror for binary bodies.
async fn start_streaming_echo() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(http::Response::new(req.into_body()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn binary_request_body_reaches_the_homeserver_byte_exact() {
    let (hs, gate) = setup("").await;
    // Every byte value, CR LF runs and a chunk-terminator look-alike.
    let mut body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    body.extend_from_slice(b"\r\n\r\n0\r\n\r\n\x00\xff\xfe");
    let answer = send(
        Method::POST,
        &gate.url("/echo"),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, "/echo");
    assert_eq!(seen.body.as_ref(), body.as_slice());
    assert_eq!(
        seen.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bodies_are_byte_exact_both_ways() {
    let echo = start_streaming_echo().await;
    let gate = Gate::start(&echo, "").await;
    let body = Noise::bytes(7, 4 * MIB as usize + 13);
    let answer = send(
        Method::POST,
        &gate.url("/echo"),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), body.len());
    assert!(
        answer.body.as_ref() == body.as_slice(),
        "echoed body differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_is_streamed_complete_and_unaltered() {
    let (hs, gate) = setup("").await;
    let size = 256 * MIB;
    let produced = Arc::new(Mutex::new(Produced {
        len: 0,
        fnv: FNV_OFFSET,
    }));
    let upload = Upload {
        remaining: size,
        noise: Noise(0x9e37_79b9_7f4a_7c15),
        produced: produced.clone(),
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<Upload>>();
    let request = Request::post(gate.url("/_matrix/media/v3/upload?filename=big.bin"))
        .header("content-type", "application/octet-stream")
        .body(StreamBody::new(upload))
        .unwrap();
    let response = client.request(request).await.expect("gate answered");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();

    let sent = *produced.lock().unwrap();
    assert_eq!(sent.len, size);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["len"].as_u64(), Some(sent.len), "{answer}");
    assert_eq!(answer["fnv"].as_u64(), Some(sent.fnv), "{answer}");

    let seen = hs.only_request();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, "/_matrix/media/v3/upload?filename=big.bin");
    assert_eq!(
        seen.header("content-type"),
        Some("application/octet-stream")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_arrives_complete_without_hop_by_hop_headers() {
    let (hs, gate) = setup("").await;
    let size = 128 * MIB;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::get(gate.url(&format!("/download?bytes={size}")))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.expect("gate answered");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(
        headers
            .get("x-upstream-header")
            .map(|v| v.to_str().unwrap()),
        Some("kept")
    );
    assert!(headers.get("x-hop").is_none(), "{headers:?}");
    assert!(headers.get("connection").is_none(), "{headers:?}");

    // Compared, frame by frame, with the same download fetched from the
    // homeserver directly: the test never holds the whole body.
    let direct = client
        .request(
            Request::get(format!("{}/download?bytes={size}", hs.url()))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("homeserver answered");
    let compared = compare_streams(response.into_body(), direct.into_body()).await;
    assert_eq!(compared, size);
}

/// Next non-empty data frame of `body`, or `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            if !data.is_empty() {
                return Some(data);
            }
        }
    }
    None
}

/// Asserts two streamed bodies are byte-identical; returns their length.
async fn compare_streams(mut got: Incoming, mut want: Incoming) -> u64 {
    let (mut a, mut b) = (Bytes::new(), Bytes::new());
    let mut offset: u64 = 0;
    loop {
        if a.is_empty() {
            a = next_data(&mut got).await.unwrap_or_default();
        }
        if b.is_empty() {
            b = next_data(&mut want).await.unwrap_or_default();
        }
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return offset,
            (true, false) => panic!("body through the gate ended early at byte {offset}"),
            (false, true) => panic!("body through the gate is longer than {offset} bytes"),
            (false, false) => {}
        }
        let n = a.len().min(b.len());
        if a[..n] != b[..n] {
            let i = (0..n).find(|&i| a[i] != b[i]).unwrap_or(0);
            panic!(
                "byte {} differs: {} through the gate, {} from the homeserver",
                offset + i as u64,
                a[i],
                b[i]
            );
        }
        offset += n as u64;
        let _ = a.split_to(n);
        let _ = b.split_to(n);
    }
}

#[tokio::test]
async fn spoofed_forwarding_headers_are_replaced() {
    let (hs, gate) = setup("").await;
    let answer = send(
        Method::GET,
        &gate.url("/_matrix/client/v3/account/whoami"),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-proto", "https"),
            ("true-client-ip", "6.6.6.6"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = hs.only_request();
    let all = |name: &str| -> Vec<String> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all("x-forwarded-proto"), ["http"]);
    assert_eq!(all("x-forwarded-host"), [gate.addr.to_string()]);
    assert!(all("forwarded").is_empty(), "{:?}", seen.headers);
    assert!(all("x-real-ip").is_empty(), "{:?}", seen.headers);
    assert!(all("true-client-ip").is_empty(), "{:?}", seen.headers);
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_dropped_and_end_to_end_ones_kept() {
    let (hs, gate) = setup("").await;
    let target = "/_matrix/client/v3/rooms/%21abc%3Aexample.org/messages?dir=b&limit=10";
    let answer = send(
        Method::GET,
        &gate.url(target),
        &[
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA=="),
            ("authorization", "Bearer syt_token"),
            ("user-agent", "gatekeeper-test/1.0"),
            ("x-custom", "custom value"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.target, target);
    for dropped in [
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(
            seen.headers.get(dropped).is_none(),
            "{dropped} reached the homeserver: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("authorization"), Some("Bearer syt_token"));
    assert_eq!(seen.header("user-agent"), Some("gatekeeper-test/1.0"));
    assert_eq!(seen.header("x-custom"), Some("custom value"));
}

#[tokio::test]
async fn unreachable_homeserver_is_a_quick_502() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gate = Gate::start(&format!("http://{closed}"), "").await;
    let started = Instant::now();
    let answer = get(&gate.url("/_matrix/client/versions")).await;
    answer.assert_error(502, "M_UNKNOWN");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "502 took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn slow_homeserver_is_a_504_after_the_response_timeout() {
    let hs = FakeHomeserver::start().await;
    let gate = gate_with_upstream(&hs.url(), "response_timeout = \"300ms\"\n").await;
    let started = Instant::now();
    let answer = get(&gate.url("/slow?ms=3000")).await;
    answer.assert_error(504, "M_UNKNOWN");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "504 took {:?}",
        started.elapsed()
    );
    assert_eq!(hs.only_request().target, "/slow?ms=3000");
}

#[tokio::test]
async fn long_poll_within_the_response_timeout_is_not_cut() {
    let (hs, gate) = setup("").await;
    let started = Instant::now();
    let answer = get(&gate.url("/_matrix/client/v3/sync?timeout=1500&since=s0")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.as_ref(), br#"{"next_batch":"s1"}"#);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        hs.only_request().target,
        "/_matrix/client/v3/sync?timeout=1500&since=s0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests_and_stops_accepting() {
    let (hs, gate) = setup("").await;
    let addr = gate.addr;
    let in_flight = tokio::spawn({
        let url = gate.url("/slow?ms=800");
        async move { get(&url).await }
    });
    // Wait until the homeserver holds the request: it is now in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while hs.requests().is_empty() {
        assert!(Instant::now() < deadline, "request never reached upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), gate.shutdown())
        .await
        .expect("shutdown drained within its bound");

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.as_ref(), br#"{"slow":true}"#);

    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "a connection was accepted after shutdown");
}

#[tokio::test]
async fn put_passes_through_with_method_body_and_answer_unchanged() {
    let (hs, gate) = setup("").await;
    let body = r#"{"msgtype":"m.text","body":"héllo \u0000 wörld"}"#;
    let answer = send(
        Method::PUT,
        &gate.url("/_matrix/client/v3/rooms/%21r%3Aexample.org/send/m.room.message/t1"),
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.as_ref(), br#"{"ok":true}"#);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.body.as_ref(), body.as_bytes());
}

#[tokio::test]
async fn http2_clients_are_served_and_forwarded_as_http1() {
    let (hs, gate) = setup("").await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let request = |method: Method, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(gate.url(path))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from_static(
                body.as_bytes(),
            )))
            .unwrap()
    };
    // Pass-through over HTTP/2.
    let response = client
        .request(request(Method::GET, "/_matrix/client/versions", ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    // A refusal over HTTP/2 never reaches the homeserver.
    let response = client
        .request(request(
            Method::POST,
            "/_matrix/client/v3/register",
            r#"{"username":"admin"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(br#"{"errcode":"M_USER_IN_USE""#));
    // An accepted registration reaches it as HTTP/1.1 with a Host header.
    let response = client
        .request(request(
            Method::POST,
            "/_matrix/client/v3/register",
            r#"{"username":"Alice"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = hs.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].json()["username"], "alice");
    assert_eq!(seen[1].header("host"), Some(gate.addr.to_string().as_str()));
    assert_eq!(
        seen[1].header("x-forwarded-host"),
        Some(gate.addr.to_string().as_str())
    );
}

#[tokio::test]
async fn idle_http2_connections_are_closed_but_busy_ones_are_not() {
    let (_hs, gate) = setup("[server]\nheader_read_timeout = \"1s\"\n").await;
    let stream = TcpStream::connect(gate.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let opened = Instant::now();
    let closed = tokio::spawn(async move {
        let result = connection.await;
        (opened.elapsed(), result.is_ok())
    });
    // A request that takes longer than the idle timeout is not cut...
    let request = Request::get(gate.url("/_matrix/client/versions"))
        .header("x-test-delay-ms", "2500")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let answered = opened.elapsed();
    assert!(answered >= Duration::from_millis(2500), "{answered:?}");
    // ...and, once nothing is in flight, the connection is closed cleanly
    // (GOAWAY) about one timeout later.
    let (lifetime, clean) = tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the idle HTTP/2 connection was not closed")
        .unwrap();
    assert!(clean, "the connection ended with an error");
    assert!(
        lifetime >= answered + Duration::from_millis(900),
        "closed {lifetime:?} after opening, answered at {answered:?}"
    );
    assert!(sender.is_closed());
}

#[tokio::test]
async fn a_client_still_uploading_when_the_homeserver_is_unreachable_reads_the_whole_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gate = Gate::start(&format!("http://{closed}"), "").await;
    // Large enough that the client is still writing when the gate answers.
    let body = vec![b'x'; 4 * MIB as usize];
    for full_stack in [false, true] {
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        if full_stack {
            // A guarded request hands the connection to the full stack.
            stream
                .write_all(b"GET /_matrix/client/v3/register/available?username=a HTTP/1.1\r\nHost: gate\r\n\r\n")
                .await
                .unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"}") {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 502"), "{head:?}");
        }
        let upload = format!(
            "PUT /_matrix/media/v3/upload HTTP/1.1\r\nHost: gate\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(upload.as_bytes()).await.unwrap();
        let written = stream.write_all(&body).await;
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            written.is_ok() && read.is_ok(),
            "full stack: {full_stack}: write {written:?}, read {read:?}, got {text:?}"
        );
        assert!(text.starts_with("HTTP/1.1 502"), "{text}");
        assert!(
            text.ends_with(r#""The homeserver could not be reached."}"#),
            "{text}"
        );
    }
}
