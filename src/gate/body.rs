//! The body the inner service receives from the gate.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

use super::BoxError;

pin_project! {
    /// The client's own body, streamed (pass-through); the gate's canonical
    /// body (guarded routes); or, in shadow mode, the bytes the gate already
    /// read followed by whatever the client still sends.
    #[project = GateBodyProj]
    #[derive(Debug)]
    #[allow(missing_docs)] // the variants are documented above
    pub enum GateBody<B> {
        /// The client's body, untouched.
        Client { #[pin] body: B },
        /// The canonical body the gate wrote.
        Canonical { body: Full<Bytes> },
        /// Bytes already read from the client, then the rest of its body.
        Replay { prefix: Option<Bytes>, #[pin] rest: B },
    }
}

impl<B> GateBody<B> {
    /// The client's body, untouched.
    pub fn client(body: B) -> Self {
        GateBody::Client { body }
    }

    /// A body the gate wrote.
    pub fn canonical(bytes: Bytes) -> Self {
        GateBody::Canonical {
            body: Full::new(bytes),
        }
    }

    /// `prefix`, then the rest of `body`.
    pub fn replay(prefix: Bytes, rest: B) -> Self {
        GateBody::Replay {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl<B> Body for GateBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            GateBodyProj::Client { body } => body.poll_frame(cx).map_err(Into::into),
            GateBodyProj::Canonical { body } => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            GateBodyProj::Replay { prefix, rest } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => rest.poll_frame(cx).map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GateBody::Client { body } => body.is_end_stream(),
            GateBody::Canonical { body } => body.is_end_stream(),
            GateBody::Replay { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GateBody::Client { body } => body.size_hint(),
            GateBody::Canonical { body } => body.size_hint(),
            GateBody::Replay { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn replay_yields_the_prefix_then_the_rest() {
        let body = GateBody::replay(
            Bytes::from_static(b"hello "),
            Full::new(Bytes::from_static(b"world")),
        );
        assert_eq!(body.size_hint().exact(), Some(11));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");
        let empty = GateBody::replay(Bytes::new(), Full::new(Bytes::new()));
        assert!(empty.is_end_stream());
    }
}
