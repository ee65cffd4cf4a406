//! A fast static upstream for the load benchmark (`bench/run`).
//!
//! `cargo run --release --example bench_upstream -- PORT [THREADS]`
//!
//! Every request is answered `200` with a small JSON body once its request
//! body has been read (and discarded, so a 1 GiB upload costs no memory
//! here); `POST …/register` is answered like a completed registration, and
//! a media upload (`…/media/…/upload`) with the number of body bytes read:
//! `{"content_uri":"mxc://example.org/bench","bytes":N}`.
//!
//! `GET /_matrix/client/v1/media/download/bench/N` is answered with `N`
//! zero bytes (`Content-Length: N`), sent as 256 KiB slices of one static
//! buffer, so that a bulk download costs this process little CPU.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const VERSIONS: &[u8] = br#"{"versions":["r0.6.1","v1.1","v1.2","v1.3","v1.4","v1.5","v1.6","v1.7","v1.8","v1.9","v1.10","v1.11"]}"#;
const REGISTERED: &[u8] =
    br#"{"user_id":"@bench:example.org","access_token":"syt_bench","device_id":"BENCH"}"#;
/// A download of `N` bytes: this prefix, then `N`.
const DOWNLOAD: &str = "/_matrix/client/v1/media/download/bench/";
/// The size of each body frame of a download.
const CHUNK: usize = 256 * 1024;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// `left` zero bytes, in frames of at most [`CHUNK`] bytes that all share
/// [`ZEROS`].
struct Zeros {
    left: u64,
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.left).map_or(CHUNK, |left| left.min(CHUNK));
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&ZEROS[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

type Body = Either<Full<Bytes>, Zeros>;

async fn answer(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path();
    let register = path.ends_with("/register");
    let upload = path.contains("/media/") && path.ends_with("/upload");
    let download = path
        .strip_prefix(DOWNLOAD)
        .and_then(|size| size.parse::<u64>().ok());
    let mut body = request.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received += frame.data_ref().map_or(0, |data| data.len() as u64),
            Err(_) => break,
        }
    }
    let (body, content_type) = if let Some(size) = download {
        (
            Either::Right(Zeros { left: size }),
            "application/octet-stream",
        )
    } else if upload {
        let json = format!(r#"{{"content_uri":"mxc://example.org/bench","bytes":{received}}}"#);
        (
            Either::Left(Full::new(Bytes::from(json))),
            "application/json",
        )
    } else {
        let json = if register { REGISTERED } else { VERSIONS };
        (
            Either::Left(Full::new(Bytes::from_static(json))),
            "application/json",
        )
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    if let Some(size) = download {
        response.headers_mut().insert("content-length", size.into());
    }
    Ok(response)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(18080);
    let threads: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
}
