//! The hyper 1 accept loop and graceful shutdown.
//!
//! On shutdown: stop accepting, let in-flight requests finish (bounded by the grace
//! period), then flush the producer so every click answered 200 is delivered. Slow
//! clients are bounded by the header read timeout here and the body timeout in the
//! handler; headers larger than 16 KiB are refused by hyper (431).
//!
//! Open connections are capped (`INGEST_MAX_CONNECTIONS`), as in mini-redis: a connection
//! holds a semaphore permit for its lifetime and the loop accepts only with a permit in
//! hand, so past the cap new connections wait in the kernel's listen backlog (and are
//! refused by the kernel when that is full) instead of costing memory and descriptors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use shared::metric_names as m;

use crate::http::App;
use crate::producer::ClickSink;

pub struct ServerOptions {
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
}

pub async fn serve<S: ClickSink>(
    listener: TcpListener,
    app: Arc<App<S>>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout)
        .max_buf_size(16 * 1024)
        .keep_alive(true);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = Arc::clone(&app);
                let service = service_fn(move |req| Arc::clone(&app).serve(req, peer));
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                metrics::gauge!(m::OPEN_CONNECTIONS).increment(1.0);
                tokio::spawn(async move {
                    // Client resets and timeouts end a connection; nothing to report.
                    let _ = conn.await;
                    metrics::gauge!(m::OPEN_CONNECTIONS).decrement(1.0);
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.shutdown_grace, "in-flight requests did not finish in time");
    }
}
