//! The accept loop: HTTP/1.1 and HTTP/2 on every listen address, header
//! read timeouts, `TCP_NODELAY`, a graceful drain with a deadline, the
//! admin listener, and configuration reloads (SIGHUP, or a changed file).
//!
//! Each connection starts on the HTTP/1.1 fast path (`src/fast_path/`);
//! the first request it does not take hands the connection to hyper and
//! the tower service, which serve it from then on.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tower::{ServiceBuilder, ServiceExt};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

use crate::admin::api::{AdminApi, AdminToken};
use crate::admin::AdminState;
use crate::config::Config;
use crate::defences::lists::Stamp;
use crate::error::MatrixError;
use crate::fast_path::{linger, Ending, FastPath, Rewind};
use crate::gate::{GateRequestBody, PeerAddress, RegistrationGate, RegistrationGateLayer};
use crate::notify::Notifier;
use crate::telemetry::Metrics;
use crate::upstream::{unforwardable, Upstream};

mod reload;

use reload::{list_files, refresh_remote_lists, reload_on_change, reload_on_signal, FileStamp};
pub use reload::{Hangups, Reloader};

/// The exact service production runs: credentials marked sensitive (so no
/// log or debug output prints them), then the gate in front of the pooled
/// upstream client.
pub type GatekeeperService =
    SetSensitiveRequestHeaders<RegistrationGate<Upstream<GateRequestBody<Incoming>>>>;

/// Request headers that carry credentials.
const SENSITIVE_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// Builds the production service stack from a validated configuration.
pub fn build_service(config: &Config) -> GatekeeperService {
    build_stack(config).0
}

/// Builds the production stack and returns it with the gate layer (for
/// reloads and metrics).
pub fn build_stack(config: &Config) -> (GatekeeperService, RegistrationGateLayer) {
    let metrics = Arc::new(Metrics::default());
    let notifier = Notifier::start(&config.notify).unwrap_or_else(|error| {
        tracing::error!(%error, "webhook notifications off");
        Notifier::disabled()
    });
    let gate = RegistrationGateLayer::with_notifier(config, metrics.clone(), notifier);
    let service = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(SENSITIVE_HEADERS))
        .layer(gate.clone())
        .service(Upstream::with_upload_idle_timeout(
            &config.upstream,
            config.server.upload_idle_timeout.0,
            metrics,
        ));
    (service, gate)
}

/// A bound, not yet running gatekeeper.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    service: GatekeeperService,
    reloader: Reloader,
    upstream_authority: String,
    fast_path: FastPath,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
    watch_config: bool,
    /// The watched files as they were when read, when known: the watcher
    /// starts from these, so a change made while the gate started is seen.
    read_stamps: Option<Vec<FileStamp>>,
    /// What SIGHUPs it reloads on; caught from when the server was built
    /// (or earlier, [`Server::with_hangups`]), not from when it runs.
    hangups: Option<Hangups>,
}

impl Server {
    /// Binds every `server.listen` address and the admin listener.
    pub async fn bind(config: &Config) -> Result<Server, BindError> {
        let mut listeners = Vec::new();
        for addr in &config.server.listen.0 {
            listeners.push(bind("server.listen", *addr).await?);
        }
        let mut server = Server::from_listeners(config, listeners);
        if let Some(admin) = config.server.admin_listen {
            server.admin = Some(bind("server.admin_listen", admin.0).await?);
        }
        Ok(server)
    }

    /// Uses listeners the caller bound (tests bind `127.0.0.1:0`). Must be
    /// called inside a Tokio runtime.
    pub fn from_listeners(config: &Config, listeners: Vec<TcpListener>) -> Server {
        let (service, gate) = build_stack(config);
        let url = &config.upstream.url;
        let upstream_authority = match url.port_u16() {
            Some(_) => url.authority().map(|a| a.to_string()).unwrap_or_default(),
            None => format!("{}:80", url.host().unwrap_or("127.0.0.1")),
        };
        Server {
            listeners,
            admin: None,
            service,
            reloader: Reloader {
                gate: gate.clone(),
                path: None,
                running: Arc::new(config.clone()),
                lists: Arc::new(Mutex::new(list_files(config))),
                remote_lists: Arc::new(watch::channel(config.remote_set()).0),
                admin_token: AdminToken::new(config.admin.token()),
            },
            upstream_authority,
            fast_path: FastPath::new(config, gate.clone()),
            header_read_timeout: config.server.header_read_timeout.0,
            shutdown_timeout: config.server.shutdown_timeout.0,
            watch_config: config.server.watch_config,
            read_stamps: None,
            hangups: Hangups::listen()
                .map_err(|error| tracing::error!(%error, "cannot catch SIGHUP; reload by it off"))
                .ok(),
        }
    }

    /// Serves the admin endpoints on `listener`.
    pub fn with_admin_listener(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// Reloads on SIGHUPs caught since `hangups` was made (a process
    /// catches them before reading its configuration, so that a reload
    /// asked for while it starts neither ends it nor is lost).
    pub fn with_hangups(mut self, hangups: Hangups) -> Self {
        self.hangups = Some(hangups);
        self
    }

    /// The file a reload (SIGHUP, or a change with `watch_config`) reads.
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.reloader.path = Some(path);
        self
    }

    /// `config` (the one given to [`Server::from_listeners`]) was read from
    /// the configuration file when it had `config_stamp`, its lists when
    /// they had the stamps `config` keeps: with `watch_config`, a file
    /// changed since then, while the gate started, is reloaded at the
    /// watcher's first look. Call after [`Server::with_config_path`].
    pub fn read_when(mut self, config: &Config, config_stamp: Stamp) -> Self {
        self.read_stamps = Some(self.reloader.watched_when_read(config, config_stamp));
        self
    }

    /// The addresses actually bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The admin listener's address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle that reloads the configuration.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets
    /// in-flight requests finish for at most `server.shutdown_timeout`.
    /// SIGHUP reloads the configuration file.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let (accepted_tx, mut accepted) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
        let mut background = Vec::new();
        for listener in self.listeners {
            let tx = accepted_tx.clone();
            background.push(tokio::spawn(accept_loop(listener, tx)));
        }
        drop(accepted_tx);
        if let Some(admin) = self.admin {
            let state = AdminState {
                api: AdminApi {
                    gate: self.reloader.gate.clone(),
                    token: self.reloader.admin_token.clone(),
                },
                gate: self.reloader.gate.clone(),
                upstream: self.upstream_authority.clone(),
            };
            background.push(tokio::spawn(admin_loop(admin, state)));
        }
        if let Some(hangups) = self.hangups {
            background.push(tokio::spawn(reload_on_signal(
                self.reloader.clone(),
                hangups,
            )));
        }
        background.push(tokio::spawn(refresh_remote_lists(self.reloader.clone())));
        if self.watch_config {
            background.push(tokio::spawn(reload_on_change(
                self.reloader.clone(),
                self.read_stamps.take(),
            )));
        }

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        // HTTP/2 peers that vanish are found by pings.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        // Every connection task watches `stop` and holds a clone of
        // `done_tx`: `done` closes when the last one has ended.
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, mut done) = mpsc::channel::<()>(1);

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                next = accepted.recv() => {
                    let Some((stream, peer)) = next else { break };
                    let fast_path = self.fast_path.clone();
                    let builder = builder.clone();
                    let service = self.service.clone();
                    let activity = Arc::new(Activity::new());
                    let seen = activity.clone();
                    let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                        let in_flight = seen.request(request.version());
                        // Refused before the gate: not a registration decision.
                        if let Some(refusal) = unforwardable(request.method(), request.headers()) {
                            return Tracked {
                                future: None,
                                refused: Some(Ok(refusal_response(refusal, &request))),
                                in_flight,
                            };
                        }
                        request.extensions_mut().insert(PeerAddress(peer));
                        Tracked {
                            future: Some(service.clone().oneshot(request)),
                            refused: None,
                            in_flight,
                        }
                    });
                    let timeout = self.header_read_timeout;
                    let mut stop = stop_rx.clone();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        let mut stream = stream;
                        // Plain HTTP/1.1 pass-through first; the full stack
                        // takes the connection over when a request needs it.
                        let ending = {
                            let stopped = stop.wait_for(|stop| *stop);
                            tokio::pin!(stopped);
                            fast_path.serve(&mut stream, peer, stopped).await
                        };
                        match ending {
                            Ending::Handoff(prefix) => {
                                let connection = builder
                                    .serve_connection(TokioIo::new(Rewind::new(prefix, stream)), hyper_service)
                                    .into_owned();
                                supervise(connection, activity, stop, timeout, peer).await;
                            }
                            Ending::Linger => linger(stream).await,
                            Ending::Closed => {}
                        }
                        drop(done);
                    });
                }
                () = &mut shutdown => break,
            }
        }
        for task in &background {
            task.abort();
        }
        tracing::info!(
            connections = done_tx.strong_count() - 1,
            "shutting down: draining in-flight requests"
        );
        let _ = stop_tx.send(true);
        drop(done_tx);
        if tokio::time::timeout(self.shutdown_timeout, done.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?self.shutdown_timeout,
                "drain deadline passed; closing remaining connections"
            );
        }
    }
}

/// What one client connection is doing, as its requests see it.
struct Activity {
    born: Instant,
    /// A request has arrived.
    used: AtomicBool,
    /// The connection speaks HTTP/2 (its idleness is the gate's to judge;
    /// hyper closes idle HTTP/1 connections with the header timeout).
    http2: AtomicBool,
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since `born`.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            born: Instant::now(),
            used: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Notes a request; an HTTP/2 request is counted until its response
    /// body is gone.
    fn request(self: &Arc<Self>, version: Version) -> Option<InFlight> {
        self.used.store(true, Ordering::Relaxed);
        if version != Version::HTTP_2 {
            return None;
        }
        self.http2.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(self.clone()))
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// When an idle HTTP/2 connection is due to close, if it is idle now.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_end_ms.load(Ordering::Acquire);
        Some(self.born + Duration::from_millis(last) + timeout)
    }
}

/// One HTTP/2 request in flight; dropped with its response body (or with
/// the request, if it never got one).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_end_ms.store(self.0.millis(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to `request`, refused before the gate. A refused `CONNECT`
/// also closes an HTTP/1 connection: the client may have started its
/// tunnel already, and those bytes are not HTTP.
fn refusal_response<T, B>(
    refusal: MatrixError,
    request: &Request<T>,
) -> http::Response<Either<B, Full<Bytes>>> {
    let mut response = refusal.into_response().map(Either::Right);
    if request.method() == http::Method::CONNECT && request.version() < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    response
}

pin_project! {
    /// The service's future (or the answer to a request refused before
    /// it), whose response body carries the request's [`InFlight`] mark.
    struct Tracked<F, R> {
        #[pin]
        future: Option<F>,
        refused: Option<R>,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> Future for Tracked<F, Result<http::Response<B>, E>>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = match this.future.as_pin_mut() {
            Some(future) => std::task::ready!(future.poll(cx)),
            None => match this.refused.take() {
                Some(refused) => refused,
                // Polled again after it completed.
                None => return Poll::Pending,
            },
        };
        let in_flight = this.in_flight.take();
        Poll::Ready(output.map(|response| {
            response.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            })
        }))
    }
}

pin_project! {
    /// A response body and its request's [`InFlight`] mark.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Drives one client connection to its end:
/// - a client that sends no request within the header timeout is cut
///   (hyper's own header timeout starts only once the protocol is known);
/// - an HTTP/2 connection with no request in flight for the header timeout
///   is closed with a GOAWAY (hyper closes idle HTTP/1 connections itself);
/// - on shutdown, the connection finishes its requests and closes.
async fn supervise<C>(
    connection: C,
    activity: Arc<Activity>,
    mut stop: watch::Receiver<bool>,
    timeout: Duration,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulShutdownable,
{
    tokio::pin!(connection);
    let mut first_request = Some(Box::pin(tokio::time::sleep(timeout)));
    let mut idle: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut stopping = false;
    let mut stop_signal = Box::pin(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    let result = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(Some(result));
        }
        if stopping {
            return Poll::Pending;
        }
        let mut shut_down = |cx: &mut Context<'_>| {
            stopping = true;
            connection.as_mut().shut_down();
            connection.as_mut().poll(cx).map(Some)
        };
        if stop_signal.as_mut().poll(cx).is_ready() {
            return shut_down(cx);
        }
        if let Some(sleep) = first_request.as_mut() {
            if activity.used.load(Ordering::Relaxed) {
                first_request = None;
            } else if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if activity.http2.load(Ordering::Relaxed) {
            let sleep = idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            while sleep.as_mut().poll(cx).is_ready() {
                match activity.idle_deadline(timeout) {
                    Some(due) if due <= Instant::now() => {
                        tracing::debug!(%peer, "HTTP/2 connection idle; closing");
                        return shut_down(cx);
                    }
                    Some(due) => sleep.as_mut().reset(due.into()),
                    None => sleep.as_mut().reset(tokio::time::Instant::now() + timeout),
                }
            }
        }
        Poll::Pending
    })
    .await;
    match result {
        None => tracing::debug!(%peer, "no request within the header timeout; closing"),
        Some(Err(error)) => tracing::debug!(%peer, %error, "connection ended with an error"),
        Some(Ok(())) => {}
    }
}

/// A connection that can be asked to finish its requests and close.
trait GracefulShutdownable {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulShutdownable for auto::Connection<'static, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Body + Send + 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A listen address that could not be bound, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}): {source}")]
pub struct BindError {
    /// `server.listen` or `server.admin_listen`.
    pub key: &'static str,
    /// The address tried.
    pub addr: SocketAddr,
    /// What the operating system said.
    #[source]
    pub source: io::Error,
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { key, addr, source })
}

async fn admin_loop(listener: TcpListener, state: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { state.answer(request).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn accept_loop(listener: TcpListener, accepted: mpsc::Sender<(TcpStream, SocketAddr)>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
                }
                if accepted.send((stream, peer)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                // Out of file descriptors and similar: back off briefly
                // instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// while the server is still starting is not lost (nor kills the process
/// the default way). Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        let terminate = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                () = received(terminate) => {},
                () = received(interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
