//! `ingest`: the HTTP front of the referral click pipeline. Validates, sanitizes and
//! hashes clicks, checks their code against the registry and their account's plan limits,
//! and publishes them to Kafka; answers 2xx only after the broker's ack.

pub mod body;
pub mod client_ip;
pub mod config;
pub mod envelope;
pub mod http;
pub mod limits;
pub mod memory;
pub mod producer;
pub mod rate_limit;
pub mod refusals;
pub mod registry;
pub mod script;
pub mod server;
#[cfg(test)]
mod test_support;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use config::{Config, OnOff};
use http::{App, Parts};
use limits::store::RedisStore;
use limits::{LimiterOptions, PlanLimiter};
use producer::{ClickSink, KafkaSink};
use refusals::RefusalCounts;
use registry::SharedRegistry;

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

    let catalogue = Arc::clone(&validated.catalogue);
    let registry = Arc::new(SharedRegistry::new(Arc::clone(&catalogue)));
    registry::spawn_followers(
        &config.kafka_client(),
        &registry::Topics {
            accounts: config.accounts_topic.clone(),
            codes: config.codes_topic.clone(),
            keys: config.keys_topic.clone(),
            snapshot: (!config.registry_clickhouse_url.is_empty()).then(|| registry::Snapshot {
                url: config.registry_clickhouse_url.clone(),
                database: config.registry_clickhouse_database.clone(),
                user: config.registry_clickhouse_user.clone(),
                password: config.registry_clickhouse_password.clone(),
            }),
        },
        &registry,
    );
    let plan_limits = match config.plan_limits {
        OnOff::On => {
            let timeout = config.limits_redis_timeout;
            let store = RedisStore::new(
                &config.redis_url,
                &config.redis_prefix,
                timeout.max(Duration::from_millis(250)),
            )
            .map_err(|e| anyhow::anyhow!("INGEST_REDIS_URL: {e}"))?;
            let limiter = PlanLimiter::new(
                Arc::new(store),
                Arc::clone(&catalogue),
                LimiterOptions {
                    wait_budget: timeout,
                    store_timeout: Duration::from_secs(1).max(timeout * 2),
                    expected_instances: config.limits_expected_instances,
                },
            );
            limiter.spawn_background();
            Some(limiter)
        }
        OnOff::Off => None,
    };
    let refusals = Arc::new(RefusalCounts::new());
    spawn_refusal_publisher(&config, &sink, &refusals);

    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, topic = %config.kafka_topic, key_id = %validated.hasher.key_id(), plans = %catalogue.names(), plan_limits = ?config.plan_limits, "ingest listening");
    let options = server::ServerOptions {
        header_timeout: config.header_timeout,
        shutdown_grace: config.shutdown_grace,
        max_connections: config.max_connections,
        max_connections_per_client: config.max_connections_per_client,
        max_requests_per_connection: config.max_requests_per_connection,
        uncapped_peers: config.trusted_proxies.0.clone(),
    };
    let refusals_topic = config.refusals_topic.clone();
    let app = Arc::new(App::new(
        config,
        validated,
        Parts {
            sink: Arc::clone(&sink),
            registry,
            plan_limits: plan_limits.clone(),
            refusals: Arc::clone(&refusals),
            metrics: Some(metrics),
        },
    ));

    let limiter = app.limiter().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 0u64.. {
            tick.tick().await;
            limiter.forget_idle().await;
            if n % 60 == 59 {
                memory::release_freed_c_memory();
            }
        }
    });

    server::serve(listener, app, options, shutdown).await;
    publish_refusals(&sink, &refusals_topic, &refusals).await;
    if let Some(limits) = plan_limits {
        limits.leave().await;
    }
    tracing::info!("flushing the producer");
    sink.flush(Duration::from_secs(30)).await;
    tracing::info!("ingest stopped");
    Ok(())
}

fn spawn_refusal_publisher(config: &Config, sink: &Arc<KafkaSink>, refusals: &Arc<RefusalCounts>) {
    let (sink, refusals) = (Arc::clone(sink), Arc::clone(refusals));
    let topic = config.refusals_topic.clone();
    let every = config.refusals_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            publish_refusals(&sink, &topic, &refusals).await;
        }
    });
}

async fn publish_refusals(sink: &KafkaSink, topic: &str, refusals: &RefusalCounts) {
    let messages = refusals.take();
    if messages.is_empty() {
        return;
    }
    let sends = messages
        .iter()
        .map(|(id, payload)| sink.publish_to(topic, id, payload, Duration::from_secs(10)));
    let results = futures::future::join_all(sends).await;
    let failed: Vec<(String, Vec<u8>)> = messages
        .into_iter()
        .zip(results)
        .filter(|(_, r)| r.is_err())
        .map(|(m, _)| m)
        .collect();
    if !failed.is_empty() {
        tracing::warn!(
            messages = failed.len(),
            topic,
            "refusal counts not published; kept for the next window"
        );
        refusals.restore(&failed);
    }
}
