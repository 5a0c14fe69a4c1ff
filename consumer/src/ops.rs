//! `/metrics`, `/healthz` and `/readyz` of the consumer. Readiness means both dependencies
//! answer: ClickHouse (`SELECT 1`) and the broker (metadata for the topic), checked in
//! the background every 2 s so probes never wait on them.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::Consumer as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kafka::Consumer;
use crate::writer::Writer;
use shared::metric_names as m;

#[derive(Default)]
pub struct Health {
    clickhouse: AtomicBool,
    kafka: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.clickhouse.load(Ordering::Relaxed) && self.kafka.load(Ordering::Relaxed)
    }
}

pub fn spawn_health_checks(
    health: Arc<Health>,
    writer: Writer,
    consumer: Arc<Consumer>,
    topic: String,
) {
    tokio::spawn(async move {
        loop {
            let ch = writer.ping().await;
            let probe = Arc::clone(&consumer);
            let topic = topic.clone();
            let kafka = tokio::task::spawn_blocking(move || {
                probe
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .is_ok_and(|md| {
                        md.topics()
                            .iter()
                            .any(|t| t.name() == topic && t.error().is_none())
                    })
            })
            .await
            .unwrap_or(false);
            health.clickhouse.store(ch, Ordering::Relaxed);
            health.kafka.store(kafka, Ordering::Relaxed);
            metrics::gauge!(m::CLICKHOUSE_UP).set(if ch { 1.0 } else { 0.0 });
            tokio::time::sleep(Duration::from_secs(if ch && kafka { 2 } else { 1 })).await;
        }
    });
}

/// Every 15 s: the conversions stored but not attributed (a gauge, alerted on; see
/// [`Writer::unattributed_conversions`]). A failed query leaves the last value.
pub fn spawn_attribution_check(writer: Writer) {
    tokio::spawn(async move {
        loop {
            match writer.unattributed_conversions().await {
                Ok(n) => metrics::gauge!(m::CONVERSIONS_UNATTRIBUTED).set(n as f64),
                Err(e) => tracing::debug!(error = %e, "unattributed conversions not counted"),
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
    });
}

pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
            () = stop.cancelled() => return,
        };
        let health = Arc::clone(&health);
        let metrics = metrics.clone();
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            let response = respond(&req, &health, &metrics);
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond<B>(
    req: &Request<B>,
    health: &Health,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => (
            StatusCode::OK,
            "application/json",
            r#"{"code":200,"msg":"ok","data":null}"#.into(),
        ),
        (&Method::GET | &Method::HEAD, "/readyz") if health.ready() => (
            StatusCode::OK,
            "application/json",
            r#"{"code":200,"msg":"ok","data":null}"#.into(),
        ),
        (&Method::GET | &Method::HEAD, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            r#"{"code":503,"msg":"service unavailable","data":null}"#.into(),
        ),
        (_, "/metrics" | "/healthz" | "/readyz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            r#"{"code":405,"msg":"method not allowed","data":null}"#.into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"code":404,"msg":"not found","data":null}"#.into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}
