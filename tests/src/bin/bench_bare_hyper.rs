//! The ceiling for ingest benchmarks: a bare hyper 1 server (same accept loop shape,
//! same runtime) that answers every request with a fixed 200 JSON body after reading it.
//!
//!     bench_bare_hyper 127.0.0.1:18080 [DELAY_MS]
//!
//! With `DELAY_MS`, every answer waits that long first (a timer per request), like ingest
//! waiting for the broker's acknowledgement: what the same HTTP work costs a server whose
//! connections sit idle between request and answer.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] =
    br#"{"code":200,"msg":"ok","data":{"click_id":"refclk_abc123","code":"A1B2C3D4E5F6"}}"#;

async fn answer(
    req: Request<hyper::body::Incoming>,
    delay: Option<std::time::Duration>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body like ingest does, so the ceiling does the same socket work.
    let _ = req.into_body().collect().await;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut r = Response::new(Full::new(Bytes::from_static(BODY)));
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into());
    let delay = std::env::args()
        .nth(2)
        .and_then(|ms| ms.parse().ok())
        .map(std::time::Duration::from_millis);
    let listener = TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| answer(req, delay)),
                )
                .await;
        });
    }
}
