//! `ingest`: the HTTP front of the referral click pipeline. Validates, sanitizes and
//! hashes clicks and publishes them to Kafka; answers 2xx only after the broker's ack.

pub mod body;
pub mod client_ip;
pub mod config;
pub mod envelope;
pub mod http;
pub mod producer;
pub mod rate_limit;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use config::Config;
use http::App;
use producer::{ClickSink, KafkaSink};

/// Runs ingest until `shutdown` resolves, then drains and flushes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let validated = config.validate().map_err(anyhow::Error::msg)?;
    let metrics = shared::telemetry::install_metrics().map_err(anyhow::Error::msg)?;
    shared::metric_names::register_ingest();
    let sink = Arc::new(KafkaSink::new(&config)?);
    // Broker down at start: start anyway, report not ready, recover by itself.
    if !sink.check_now().await {
        tracing::warn!(brokers = %config.kafka_brokers, topic = %config.kafka_topic, "broker not reachable yet; answering 503 until it is");
    }
    sink.spawn_health_checks(Duration::from_secs(2));

    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, topic = %config.kafka_topic, key_id = %validated.hasher.key_id(), "ingest listening");
    let options = server::ServerOptions {
        header_timeout: Duration::from_millis(config.header_timeout_ms),
        shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
        max_connections: config.max_connections,
    };
    let app = Arc::new(App::new(
        config,
        validated,
        Arc::clone(&sink),
        Some(metrics),
    ));

    let limiter = app.limiter().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            limiter.forget_idle();
        }
    });

    server::serve(listener, app, options, shutdown).await;
    tracing::info!("flushing the producer");
    sink.flush(Duration::from_secs(30)).await;
    tracing::info!("ingest stopped");
    Ok(())
}
