//! `consumer`: a Kafka consumer-group member that writes referral clicks into ClickHouse
//! in batches, exactly once (see [`pipeline`] for the invariants).

pub mod attribution;
pub mod config;
pub mod idset;
pub mod kafka;
pub mod keys;
pub mod migrations;
pub mod ops;
pub mod partition;
pub mod pipeline;
pub mod plan;
pub mod registry;
pub mod row;
pub mod settle;
pub mod writer;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Command, Config};

pub async fn main(
    command: Command,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let catalogue = shared::plans::Catalogue::load_or_builtin(config.plans_file.as_deref())
        .map_err(|e| anyhow::anyhow!("CONSUMER_PLANS_FILE: {e}"))?;
    match command {
        Command::Migrate => migrate(&config, &catalogue).await,
        Command::Setup => {
            kafka::create_topics(&config).await?;
            migrate(&config, &catalogue).await
        }
        Command::Accounts(cmd) => registry::accounts(&config, &catalogue, cmd).await,
        Command::Codes(cmd) => registry::codes(&config, cmd).await,
        Command::Keys(cmd) => keys::keys(&config, cmd).await,
        Command::Run => run(config, Arc::new(catalogue), shutdown).await,
    }
}

/// Applies the migrations and writes the plan catalogue (the billing views price from it).
async fn migrate(config: &Config, catalogue: &shared::plans::Catalogue) -> anyhow::Result<()> {
    let client = writer::base_client(config);
    let applied = migrations::apply(
        &client,
        &config.clickhouse_database,
        &config.clickhouse_table,
    )
    .await?;
    registry::store_catalogue(config, catalogue).await?;
    if applied.contains(&attribution::BACKFILL_AT_MIGRATION) {
        // Databases migrated before the attribution table was: every conversion once.
        writer::Writer::for_table(config, "conversions")
            .attribute(attribution::Scope::All)
            .await?;
    }
    tracing::info!(?applied, database = %config.clickhouse_database, plans = %catalogue.names(), "migrations up to date");
    Ok(())
}

async fn run(
    config: Config,
    catalogue: Arc<shared::plans::Catalogue>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = shared::telemetry::install_metrics().map_err(anyhow::Error::msg)?;
    shared::metric_names::register_consumer();
    let listener = TcpListener::bind(config.listen).await?;
    let health = Arc::new(ops::Health::default());
    let stop_ops = CancellationToken::new();
    tokio::spawn(ops::serve(
        listener,
        Arc::clone(&health),
        metrics,
        stop_ops.clone(),
    ));

    if config.migrate_on_start {
        // ClickHouse may still be starting: retry instead of failing the process.
        let mut wait = std::time::Duration::from_millis(200);
        while let Err(e) = migrate(&config, &catalogue).await {
            tracing::warn!(error = %e, "migrations not applied yet; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(10));
        }
    }

    let writer = writer::Writer::new(&config);
    let consumer = Arc::new(kafka::consumer(&config)?);
    let dlq = kafka::dlq_producer(&config)?;
    ops::spawn_attribution_check(writer.clone());
    ops::spawn_health_checks(
        Arc::clone(&health),
        writer.clone(),
        Arc::clone(&consumer),
        config.kafka_topic.clone(),
    );
    tracing::info!(listen = %config.listen, topic = %config.kafka_topic, group = %config.group_id, "consumer started");

    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let mirror_stop = stop.clone();
    let mirror = tokio::spawn(registry::mirror(
        config.clone(),
        Arc::clone(&catalogue),
        mirror_stop.clone(),
    ));
    // Conversions: the same pipeline over their own topic, group and table.
    let conversions_config = config.for_conversions();
    let conversions = pipeline::Pipeline::<row::ConversionRow>::new(
        conversions_config.clone(),
        Arc::new(kafka::consumer(&conversions_config)?),
        kafka::dlq_producer(&conversions_config)?,
        writer::Writer::for_table(&conversions_config, "conversions"),
    );
    let clicks = pipeline::Pipeline::<row::ClickRow>::new(config, consumer, dlq, writer);
    // Either ending (a fatal dead letter) stops the other, which drains as on SIGTERM.
    let (clicks, conversions) = tokio::join!(
        async {
            let r = clicks.run(stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = conversions.run(stop.clone()).await;
            stop.cancel();
            r
        }
    );
    let result = clicks.and(conversions);
    // The pipeline also ends on its own (a fatal dead letter): the mirror ends with it.
    mirror_stop.cancel();
    let _ = mirror.await;
    stop_ops.cancel();
    result
}
