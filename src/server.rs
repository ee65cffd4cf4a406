//! The accept loop: HTTP/1.1 and HTTP/2 on every listen address, header
//! read timeouts, `TCP_NODELAY`, and a graceful drain with a deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

use crate::client_ip::ClientResolver;
use crate::config::Config;
use crate::gate::{GateRequestBody, RegistrationGate, RegistrationGateLayer};
use crate::upstream::Upstream;

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
    ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(SENSITIVE_HEADERS))
        .layer(RegistrationGateLayer::new(config))
        .service(Upstream::new(&config.upstream))
}

/// A bound, not yet running gatekeeper.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<TcpListener>,
    service: GatekeeperService,
    resolver: Arc<ClientResolver>,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Server {
    /// Binds every `server.listen` address.
    pub async fn bind(config: &Config) -> io::Result<Server> {
        let mut listeners = Vec::new();
        for addr in &config.server.listen.0 {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push(listener);
        }
        Ok(Server::from_listeners(config, listeners))
    }

    /// Uses listeners the caller bound (tests bind `127.0.0.1:0`). Must be
    /// called inside a Tokio runtime.
    pub fn from_listeners(config: &Config, listeners: Vec<TcpListener>) -> Server {
        Server {
            listeners,
            service: build_service(config),
            resolver: Arc::new(config.client_ip.resolver()),
            header_read_timeout: config.server.header_read_timeout.0,
            shutdown_timeout: config.server.shutdown_timeout.0,
        }
    }

    /// The addresses actually bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets
    /// in-flight requests finish for at most `server.shutdown_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (accepted_tx, mut accepted) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
        let mut acceptors = Vec::new();
        for listener in self.listeners {
            let tx = accepted_tx.clone();
            acceptors.push(tokio::spawn(accept_loop(listener, tx)));
        }
        drop(accepted_tx);

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
        let graceful = GracefulShutdown::new();

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                next = accepted.recv() => {
                    let Some((stream, peer)) = next else { break };
                    let service = self.service.clone();
                    let resolver = self.resolver.clone();
                    let first_request = Arc::new(AtomicBool::new(false));
                    let seen = first_request.clone();
                    let hyper_service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                        seen.store(true, Ordering::Relaxed);
                        let client = resolver.resolve(peer.ip(), request.headers());
                        let proto = resolver.forwarded_proto(peer.ip(), request.headers());
                        request.extensions_mut().insert(client);
                        if let Some(proto) = proto {
                            request.extensions_mut().insert(proto);
                        }
                        service.clone().oneshot(request)
                    });
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), hyper_service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    let first_request_timeout = self.header_read_timeout;
                    tokio::spawn(async move {
                        tokio::pin!(connection);
                        // hyper's header timeout starts only once the protocol
                        // is known; a client that sends nothing, or stalls in
                        // the HTTP/2 preface, is cut here.
                        let result = tokio::select! {
                            result = &mut connection => result,
                            () = tokio::time::sleep(first_request_timeout) => {
                                if !first_request.load(Ordering::Relaxed) {
                                    tracing::debug!(%peer, "no request within the header timeout; closing");
                                    return;
                                }
                                connection.await
                            }
                        };
                        if let Err(error) = result {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        for acceptor in &acceptors {
            acceptor.abort();
        }
        tracing::info!(
            connections = graceful.count(),
            "shutting down: draining in-flight requests"
        );
        if tokio::time::timeout(self.shutdown_timeout, graceful.shutdown())
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
