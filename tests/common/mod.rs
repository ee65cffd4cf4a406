//! Shared harness for the integration tests: a recording fake homeserver (a
//! real hyper server on 127.0.0.1:0) and the gate built by the library's own
//! constructor in front of it.

#![allow(dead_code)]

pub mod admin;
pub mod binary;
pub mod certificates;
pub mod dns_responder;
pub mod mmdb;
pub mod redis_server;
pub mod webhook;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matrix_gatekeeper::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// One request as the fake homeserver received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("homeserver received JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A fake homeserver that records every request.
///
/// Answers: `/slow?ms=N` waits N ms before answering; `/_matrix/client/v3/sync`
/// waits for its `timeout` parameter (a long-poll); `/download?bytes=N`
/// streams N bytes; `POST /echo` answers with the request body; a pick at
/// the SSO username picker is accepted the way Synapse accepts one (`302`
/// to `/_synapse/client/sso_register`); every other request gets
/// `200 {"ok":true}`, unless the homeserver was started with a
/// [`FixedAnswer`] for its path.
pub struct FakeHomeserver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    _stop: oneshot::Sender<()>,
}

/// An answer the fake homeserver gives to every request for one exact path
/// (query ignored), whatever the method: a status and a JSON body.
#[derive(Debug, Clone, Copy)]
pub struct FixedAnswer {
    pub path: &'static str,
    pub status: u16,
    pub json: &'static str,
}

impl FakeHomeserver {
    pub async fn start() -> FakeHomeserver {
        FakeHomeserver::start_answering(&[]).await
    }

    /// A fake homeserver that gives `fixed` answers to their paths, and
    /// answers every other request as [`FakeHomeserver::start`]'s does.
    pub async fn start_answering(fixed: &[FixedAnswer]) -> FakeHomeserver {
        let fixed: Arc<[FixedAnswer]> = fixed.into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = &mut stop_rx => return,
                };
                let record = record.clone();
                let fixed = fixed.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let record = record.clone();
                        let fixed = fixed.clone();
                        async move { Ok::<_, Infallible>(answer(req, record, &fixed).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeHomeserver {
            addr,
            seen,
            _stop: stop_tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// Asserts the homeserver received nothing.
    pub fn assert_saw_nothing(&self, context: &str) {
        let seen = self.requests();
        assert!(seen.is_empty(), "{context}: homeserver received {seen:?}");
    }

    /// The only request received; panics otherwise.
    pub fn only_request(&self) -> Recorded {
        let seen = self.requests();
        assert_eq!(seen.len(), 1, "expected exactly one request, got {seen:?}");
        seen.into_iter().next().unwrap()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

fn query_param(target: &str, name: &str) -> Option<u64> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn answer(
    req: Request<Incoming>,
    record: Arc<Mutex<Vec<Recorded>>>,
    fixed: &[FixedAnswer],
) -> Response<http_body_util::Either<Full<Bytes>, http_body_util::StreamBody<StreamOfBytes>>> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    // Large uploads are hashed and counted rather than kept.
    let body = if path == "/_matrix/media/v3/upload" {
        let mut body = body;
        let mut len: u64 = 0;
        let mut hash: u64 = 0xcbf29ce484222325;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                len += data.len() as u64;
                for b in data.iter() {
                    hash = (hash ^ *b as u64).wrapping_mul(0x100000001b3);
                }
            }
        }
        Bytes::from(format!("{{\"len\":{len},\"fnv\":{hash}}}"))
    } else {
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    };
    record.lock().unwrap().push(Recorded {
        method: parts.method.clone(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let json = |status: StatusCode, text: String| {
        let mut response =
            Response::new(http_body_util::Either::Left(Full::new(Bytes::from(text))));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        response
    };
    // Test controls: `x-test-delay-ms` delays the answer, `x-test-status`
    // picks its status (a 401 is a UIA step, a 200 a completed registration).
    let control = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = control("x-test-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = control("x-test-status") {
        let status = StatusCode::from_u16(status as u16).unwrap();
        let text = if status == StatusCode::UNAUTHORIZED {
            r#"{"flows":[{"stages":["m.login.dummy"]}],"params":{},"session":"sess"}"#
        } else if status.is_success() {
            r#"{"user_id":"@someone:example.org","access_token":"t","device_id":"D"}"#
        } else {
            r#"{"errcode":"M_USER_IN_USE","error":"taken"}"#
        };
        return json(status, text.to_owned());
    }
    if let Some(fixed) = fixed.iter().find(|fixed| fixed.path == path) {
        let status = StatusCode::from_u16(fixed.status).unwrap();
        return json(status, fixed.json.to_owned());
    }
    match path.as_str() {
        "/slow" => {
            let ms = query_param(&target, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, "{\"slow\":true}".into())
        }
        "/_matrix/client/v3/sync" => {
            let ms = query_param(&target, "timeout").unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, "{\"next_batch\":\"s1\"}".into())
        }
        "/download" => {
            let n = query_param(&target, "bytes").unwrap_or(0);
            let mut response = Response::new(http_body_util::Either::Right(
                http_body_util::StreamBody::new(StreamOfBytes {
                    remaining: n,
                    offset: 0,
                }),
            ));
            response
                .headers_mut()
                .insert("x-upstream-header", "kept".parse().unwrap());
            response
                .headers_mut()
                .insert("connection", "x-hop".parse().unwrap());
            response
                .headers_mut()
                .insert("x-hop", "dropped".parse().unwrap());
            response
        }
        "/_synapse/client/pick_username/account_details" if parts.method == Method::POST => {
            let mut response = json(StatusCode::FOUND, String::new());
            response.headers_mut().remove("content-type");
            response
                .headers_mut()
                .insert("location", "/_synapse/client/sso_register".parse().unwrap());
            response
        }
        "/echo" | "/_matrix/media/v3/upload" => {
            json(StatusCode::OK, String::from_utf8_lossy(&body).into_owned())
        }
        _ => json(StatusCode::OK, "{\"ok\":true}".into()),
    }
}

/// A body of `remaining` bytes (byte `i` is [`pattern_byte`]`(i)`), in
/// 64 KiB frames.
pub struct StreamOfBytes {
    pub remaining: u64,
    pub offset: u64,
}

/// The byte at offset `i` of a [`StreamOfBytes`].
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

impl futures_core::Stream for StreamOfBytes {
    type Item = Result<http_body::Frame<Bytes>, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(65536);
        let start = self.offset;
        self.remaining -= n;
        self.offset += n;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(chunk)))))
    }
}

/// A running gate.
pub struct Gate {
    pub addr: SocketAddr,
    /// The admin listener, when started with [`Gate::start_full`].
    pub admin: Option<SocketAddr>,
    /// Reloads the configuration file given to [`Gate::start_full`].
    pub reloader: matrix_gatekeeper::server::Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gate {
    /// Starts the gate in front of `upstream` with extra TOML appended to a
    /// minimal configuration.
    pub async fn start(upstream: &str, extra_toml: &str) -> Gate {
        let toml = format!(
            "[upstream]\nurl = \"{upstream}\"\nresponse_timeout = \"10s\"\nconnect_timeout = \"2s\"\n{extra_toml}"
        );
        Gate::start_with(Config::from_toml(&toml).expect("test config is valid")).await
    }

    pub async fn start_with(config: Config) -> Gate {
        Gate::start_full(config, false, None).await
    }

    /// Starts the gate with an admin listener (if `admin`) and a
    /// configuration file to reload from (if `path`).
    pub async fn start_full(config: Config, admin: bool, path: Option<std::path::PathBuf>) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = Server::from_listeners(&config, vec![listener]);
        if admin {
            let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
            server = server.with_admin_listener(admin);
        }
        if let Some(path) = path {
            server = server.with_config_path(path);
        }
        Gate::serve(server)
    }

    /// Runs `server` (bound to loopback) until the gate is dropped.
    pub fn serve(server: Server) -> Gate {
        let addr = server.local_addrs()[0];
        let admin = server.admin_addr();
        let reloader = server.reloader();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stop_rx.await;
        }));
        Gate {
            addr,
            admin,
            reloader,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.admin.expect("started with an admin listener")
        )
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// Where a running gate listens, however it was started (the library's
/// [`Gate`] or the binary's [`binary::Served`]).
pub trait Listeners {
    /// A URL on the public listener.
    fn url(&self, path: &str) -> String;
    /// A URL on the admin listener.
    fn admin_url(&self, path: &str) -> String;

    /// The admin listener's `/metrics` text.
    fn metrics(&self) -> impl std::future::Future<Output = String> {
        let url = self.admin_url("/metrics");
        async move { String::from_utf8(get(&url).await.body.to_vec()).unwrap() }
    }
}

impl Listeners for Gate {
    fn url(&self, path: &str) -> String {
        Gate::url(self, path)
    }

    fn admin_url(&self, path: &str) -> String {
        Gate::admin_url(self, path)
    }
}

impl Listeners for binary::Served {
    fn url(&self, path: &str) -> String {
        binary::Served::url(self, path)
    }

    fn admin_url(&self, path: &str) -> String {
        binary::Served::admin_url(self, path)
    }
}

/// A simple answer: status, headers, body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", self.body))
    }

    pub fn errcode(&self) -> String {
        self.json()["errcode"].as_str().unwrap_or("").to_owned()
    }

    /// The gate's decision on a guarded route (its marker header), if the
    /// gate answered.
    pub fn gate_decision(&self) -> Option<&str> {
        self.headers
            .get(matrix_gatekeeper::gate::MARKER_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    /// Asserts a Matrix error answer with this status and errcode.
    pub fn assert_error(&self, status: u16, errcode: &str) {
        assert_eq!(self.status.as_u16(), status, "status of {:?}", self.body);
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/json")
        );
        assert_eq!(
            self.headers
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap()),
            Some("*"),
            "refusals carry CORS headers"
        );
        let json = self.json();
        assert_eq!(json["errcode"], errcode, "{json}");
        assert!(json["error"].is_string(), "{json}");
    }
}

/// Sends one request with hyper's client and collects the answer.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = client.request(request).await.expect("gate answered");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

pub async fn post_json(url: &str, body: &str) -> Answer {
    send(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_owned(),
    )
    .await
}

pub async fn get(url: &str) -> Answer {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// Writes raw bytes to the gate and reads until the connection closes or
/// the timeout passes; returns everything read.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Retries `check` until it holds; returns how long that took, failing
/// after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Log output kept in memory: a `tracing_subscriber` writer (`with_writer(move
/// || captured.clone())`) whose text the test reads back.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures `filter`'s events process-wide, in the text format (the one
    /// the fail2ban filter reads).
    pub fn text_global(filter: &str) -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_env_filter(filter)
            .init();
        captured
    }

    /// A subscriber writing `filter`'s events here, one flat JSON object
    /// per line; install it globally or for a scope.
    pub fn json(filter: &str) -> (Captured, impl tracing::Subscriber + Send + Sync) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .with_env_filter(filter)
            .finish();
        (captured, subscriber)
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The cargo target directory: venvs and reports of the tests live under
/// it, next to the build.
pub fn target_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// A Python venv `target/<name>` holding `packages` (pinned requirement
/// strings), created with `python3 -m venv` and `pip` the first time, and
/// again whenever the pins change.
pub fn python_venv(name: &str, packages: &[&str]) -> std::path::PathBuf {
    let venv = target_dir().join(name);
    let marker = venv.join(".installed");
    let wanted = packages.join(" ");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return venv;
    }
    eprintln!("creating {} with {wanted} (once)", venv.display());
    let status = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 must be installed");
    assert!(status.success(), "python3 -m venv failed");
    let status = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .expect("pip runs");
    assert!(status.success(), "pip install {wanted} failed");
    std::fs::write(&marker, &wanted).unwrap();
    venv
}
