//! A webhook receiver: a real HTTP server on loopback that answers 200 to
//! everything and hands each delivery to the test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matrix_gatekeeper::notify::SIGNATURE_HEADER;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What a webhook receiver got: the signature header and the body.
pub type Delivery = (Option<String>, Bytes);

/// Starts a receiver; its deliveries arrive on the channel.
pub async fn receiver() -> (SocketAddr, mpsc::UnboundedReceiver<Delivery>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let signature = req
                            .headers()
                            .get(SIGNATURE_HEADER)
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let _ = tx.send((signature, body));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// The next delivery; fails after 10 s without one.
pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a webhook event within 10 s")
        .expect("receiver running")
}

/// The body of the next delivery, as JSON.
pub async fn next_event_json(rx: &mut mpsc::UnboundedReceiver<Delivery>) -> serde_json::Value {
    let (_, body) = next_event(rx).await;
    serde_json::from_slice(&body).unwrap()
}
