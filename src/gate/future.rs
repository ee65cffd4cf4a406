//! The future of [`RegistrationGate`](super::RegistrationGate): unboxed on
//! pass-through, boxed on guarded routes; both record the time to response
//! headers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Response;
use http_body_util::Either;
use pin_project_lite::pin_project;

use super::GateResponseBody;
use crate::telemetry::Metrics;

pub(super) type GuardedFuture<RB, E> =
    Pin<Box<dyn Future<Output = Result<Response<GateResponseBody<RB>>, E>> + Send>>;

pin_project! {
    /// The future of [`RegistrationGate`](super::RegistrationGate): the inner future itself on
    /// pass-through, a boxed one on guarded routes. Both record the time to
    /// response headers.
    #[project = ResponseFutureProj]
    #[allow(missing_docs)] // the variant fields are the futures named above
    pub enum ResponseFuture<F, RB, E> {
        /// Pass-through: the inner service's future, unboxed.
        PassThrough { #[pin] future: F, started: Instant, metrics: Arc<Metrics> },
        /// A guarded route.
        Guarded { future: GuardedFuture<RB, E>, started: Instant, metrics: Arc<Metrics> },
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<GateResponseBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::PassThrough {
                future,
                started,
                metrics,
            } => {
                let output = std::task::ready!(future.poll(cx));
                metrics.observe(false, started.elapsed());
                Poll::Ready(output.map(|response| response.map(Either::Left)))
            }
            ResponseFutureProj::Guarded {
                future,
                started,
                metrics,
            } => {
                let output = std::task::ready!(future.as_mut().poll(cx));
                metrics.observe(true, started.elapsed());
                Poll::Ready(output)
            }
        }
    }
}
