//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the
//! process is alive) and `/readyz` (the homeserver is reachable; the
//! limiter store's state is reported: Redis is asked for a `PING`).
//!
//! With `[admin] token_file`, it also serves the admin API under `/v1/`
//! ([`api`]).
//!
//! It is a separate listener, meant for loopback or a private network, and
//! is off unless `[server] admin_listen` is set.

pub mod api;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::gate::RegistrationGateLayer;
use api::AdminApi;

/// What the admin endpoints look at.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The gate (its metrics and current limiter).
    pub gate: RegistrationGateLayer,
    /// `host:port` of the homeserver, for readiness.
    pub upstream: String,
    /// The admin API (on with a token).
    pub api: AdminApi,
}

impl AdminState {
    /// Answers one admin request.
    pub async fn answer(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.uri().path().starts_with(api::PREFIX) {
            if let Some(response) = self.api.answer(request).await {
                return Ok(response);
            }
            return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        Ok(match request.uri().path() {
            "/metrics" => {
                let mut body = self.gate.metrics().render(&self.gate.limiter());
                crate::telemetry::render_lockdown(&mut body, &self.gate.lockdown());
                crate::telemetry::render_dnsbl_health(&mut body, &self.gate.dnsbl_health());
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readiness().await,
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        })
    }

    async fn readiness(&self) -> Response<Full<Bytes>> {
        let limiter = self.gate.limiter();
        let (upstream, store) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&self.upstream)),
            limiter.store_health(),
        );
        let reachable = matches!(upstream, Ok(Ok(_)));
        let body = serde_json::json!({
            "upstream": if reachable { "reachable" } else { "unreachable" },
            "store": store,
        });
        let mut response = text(
            if reachable {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            format!("{body}\n"),
        );
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
