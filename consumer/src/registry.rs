//! The referral-program registry from the consumer's side: the operator commands that
//! write it (`accounts set`, `codes add|disable|import`) and the mirror that copies it,
//! with ingest's refusal counts, into ClickHouse for billing and dashboards.
//!
//! Invariants: a command validates everything before it writes anything (a CSV import
//! with one bad line writes nothing) and returns only after the broker acknowledged every
//! message (idempotent producer, acks=all). The mirror commits a message's offset only
//! after its row is in ClickHouse; a message read twice becomes the same row (same key
//! and version, or the same refusal id), which the tables' FINAL reads collapse. A
//! malformed message is skipped with a log line and a metric, never blocking the rest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clickhouse::Row;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AccountsCommand, CodesCommand, Config};
use crate::kafka::client_config;
use shared::click::ReferralCode;
use shared::metric_names as m;
use shared::plans::Catalogue;
use shared::registry::{
    check_account_id, AccountRecord, AccountStatus, CodeRecord, CodeStatus, RefusalCount,
};

/// One message of a registry topic as read back.
pub struct TopicMessage {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Its place in the registry's order ([`shared::registry::message_version`]).
    pub version: u64,
}

/// librdkafka also reports each end of partition as a global error; reading to the end is
/// what this reader is for, so those are not logged.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "registry reader error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Reads a whole topic as it is now, in the registry's order (oldest version first, so the
/// last message of a key is the one in force, whatever partitions its messages are in;
/// blocking: run off the runtime).
pub fn read_to_end(config: &Config, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer<ReaderContext> = client_config(config)
        .set(
            "group.id",
            format!("registry-reader-{:016x}", rand::random::<u64>()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(ReaderContext)?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() => t.partitions().iter().map(|p| p.id()).collect(),
        _ => bail!(
            "topic {topic} does not exist on {}: run `consumer setup` first",
            config.kafka_brokers
        ),
    };
    let mut tpl = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            remaining.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !remaining.is_empty() {
        if std::time::Instant::now() > deadline {
            bail!("reading {topic} did not finish within 300 s");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(msg)) => {
                out.push(TopicMessage {
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec),
                    version: shared::registry::message_version(
                        msg.timestamp().to_millis(),
                        msg.partition(),
                    ),
                });
                if remaining
                    .get(&msg.partition())
                    .is_some_and(|&high| msg.offset() + 1 >= high)
                {
                    remaining.remove(&msg.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                remaining.remove(&p);
            }
            Some(Err(e)) => return Err(e).context(format!("reading {topic}")),
            None => {}
        }
    }
    // Stable: messages of one partition and one version keep their offset order.
    out.sort_by_key(|m| m.version);
    Ok(out)
}

pub(crate) async fn read_topic(config: &Config, topic: &str) -> anyhow::Result<Vec<TopicMessage>> {
    let config = config.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_to_end(&config, &topic)).await?
}

/// The newest valid record of every key of a compacted registry topic, in the registry's
/// order (tombstoned keys removed; a message `decode` refuses changes nothing).
pub(crate) async fn current<T, E>(
    config: &Config,
    topic: &str,
    decode: fn(&[u8]) -> Result<T, E>,
) -> anyhow::Result<HashMap<String, T>> {
    let mut current = HashMap::new();
    for msg in read_topic(config, topic).await? {
        let Some(key) = msg.key.and_then(|k| String::from_utf8(k).ok()) else {
            continue;
        };
        match msg.value {
            None => {
                current.remove(&key);
            }
            Some(v) => {
                if let Ok(record) = decode(&v) {
                    current.insert(key, record);
                }
            }
        }
    }
    Ok(current)
}

/// The newest valid record of every account.
pub(crate) async fn current_accounts(
    config: &Config,
) -> anyhow::Result<HashMap<String, AccountRecord>> {
    current(config, &config.accounts_topic, AccountRecord::decode).await
}

fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    Ok(client_config(config)
        .set("client.id", "referral-registry-writer")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .set("message.timeout.ms", "60000")
        .create()?)
}

/// A progress bar on stderr for a long command. indicatif draws it only when stderr is a
/// terminal: in a script, a pipe or a log nothing is printed.
fn progress(len: usize, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>22} {wide_bar} {human_pos}/{human_len} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}

/// Publishes every message and returns once the broker acknowledged all of them.
pub(crate) async fn publish_all(
    config: &Config,
    topic: &str,
    messages: Vec<(String, Option<Vec<u8>>)>,
) -> anyhow::Result<()> {
    publish_all_with(config, topic, messages, &ProgressBar::hidden()).await
}

/// [`publish_all`], counting acknowledged messages on `acked`.
async fn publish_all_with(
    config: &Config,
    topic: &str,
    messages: Vec<(String, Option<Vec<u8>>)>,
    acked: &ProgressBar,
) -> anyhow::Result<()> {
    let producer = producer(config)?;
    let mut in_flight = FuturesUnordered::new();
    let total = messages.len();
    for (key, value) in &messages {
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(key.as_str());
        if let Some(v) = value {
            record = record.payload(v.as_slice());
        }
        in_flight.push(producer.send(record, Duration::from_secs(60)));
        // Bounded in flight: the producer queue holds at most 500,000.
        while in_flight.len() >= 200_000 {
            if let Some(Err((e, _))) = in_flight.next().await {
                bail!("the broker did not take a message of {topic}: {e}");
            }
            acked.inc(1);
        }
    }
    while let Some(result) = in_flight.next().await {
        if let Err((e, _)) = result {
            bail!("the broker did not take a message of {topic}: {e}");
        }
        acked.inc(1);
    }
    acked.finish();
    tracing::info!(topic, messages = total, "registry messages acknowledged");
    Ok(())
}

fn parse_code(config: &Config, raw: &str) -> Result<String, String> {
    ReferralCode::parse(raw, config.code_length)
        .map(|c| c.as_str().to_owned())
        .map_err(|reason| format!("malformed code {raw:?}: {reason}"))
}

pub async fn accounts(
    config: &Config,
    catalogue: &Catalogue,
    cmd: AccountsCommand,
) -> anyhow::Result<()> {
    let AccountsCommand::Set {
        account,
        plan,
        overage,
        status,
        attribution_window_days,
    } = cmd;
    check_account_id(&account).map_err(|e| anyhow!("account {account:?}: {e}"))?;
    let plan_def = catalogue.get(&plan).ok_or_else(|| {
        anyhow!(
            "unknown plan {plan:?}; the catalogue has: {}",
            catalogue.names()
        )
    })?;
    if overage == Some(true) && plan_def.overage_usd_per_1000.is_none() {
        bail!("plan {plan} has no overage: --overage on is not possible");
    }
    let current = current_accounts(config).await?.remove(&account);
    let has_overage = plan_def.overage_usd_per_1000.is_some();
    let overage = overage
        .or_else(|| current.as_ref().filter(|_| has_overage).map(|c| c.overage))
        .unwrap_or(plan_def.overage_default)
        && has_overage;
    let status = match status.as_deref() {
        Some("suspended") => AccountStatus::Suspended,
        Some(_) => AccountStatus::Active,
        None => current.as_ref().map_or(AccountStatus::Active, |c| c.status),
    };
    let mut record = AccountRecord::new(&plan, overage, status);
    record.attribution_window_days = attribution_window_days
        .or(current.map(|c| c.attribution_window_days))
        .unwrap_or(shared::registry::DEFAULT_ATTRIBUTION_WINDOW_DAYS);
    publish_all(
        config,
        &config.accounts_topic,
        vec![(account.clone(), Some(record.encode()))],
    )
    .await?;
    println!(
        "account {account}: plan {plan}, overage {}, {}, attribution window {} days",
        if overage { "on" } else { "off" },
        if status == AccountStatus::Active {
            "active"
        } else {
            "suspended"
        },
        record.attribution_window_days
    );
    Ok(())
}

pub async fn codes(config: &Config, cmd: CodesCommand) -> anyhow::Result<()> {
    match cmd {
        CodesCommand::Add { code, account } => {
            let code = parse_code(config, &code).map_err(anyhow::Error::msg)?;
            if !current_accounts(config).await?.contains_key(&account) {
                bail!("unknown account {account:?}: create it first with `consumer accounts set {account} --plan PLAN`");
            }
            let record = CodeRecord::new(&account, CodeStatus::Active);
            publish_all(
                config,
                &config.codes_topic,
                vec![(code.clone(), Some(record.encode()))],
            )
            .await?;
            println!("code {code}: active, account {account}");
        }
        CodesCommand::Disable { code } => {
            let code = parse_code(config, &code).map_err(anyhow::Error::msg)?;
            let mut owner = None;
            for msg in read_topic(config, &config.codes_topic).await? {
                if msg.key.as_deref() != Some(code.as_bytes()) {
                    continue;
                }
                owner = msg
                    .value
                    .and_then(|v| CodeRecord::decode(&v).ok())
                    .map(|r| r.account);
            }
            let Some(account) = owner else {
                bail!("unknown code {code}");
            };
            let record = CodeRecord::new(&account, CodeStatus::Disabled);
            publish_all(
                config,
                &config.codes_topic,
                vec![(code.clone(), Some(record.encode()))],
            )
            .await?;
            println!("code {code}: disabled (account {account})");
        }
        CodesCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let accounts = current_accounts(config).await?;
            let checked = progress(text.lines().count(), "lines checked");
            let lines = parse_csv(config, &text, |a| accounts.contains_key(a), &checked).map_err(
                |errors| {
                    checked.abandon();
                    anyhow!(
                        "{}: nothing written:\n{}",
                        file.display(),
                        errors.join("\n")
                    )
                },
            )?;
            checked.finish();
            let count = lines.len();
            let messages = lines
                .into_iter()
                .map(|(code, account)| {
                    (
                        code,
                        Some(CodeRecord::new(&account, CodeStatus::Active).encode()),
                    )
                })
                .collect();
            let acked = progress(count, "messages acknowledged");
            publish_all_with(config, &config.codes_topic, messages, &acked).await?;
            println!("{count} codes imported from {}", file.display());
        }
    }
    Ok(())
}

/// `code,account` lines (an optional `code,account` header, blank lines ignored). On any
/// bad line: the first 20 errors, each with its line number.
fn parse_csv(
    config: &Config,
    text: &str,
    account_exists: impl Fn(&str) -> bool,
    checked: &ProgressBar,
) -> Result<Vec<(String, String)>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if n % 4096 == 0 {
            checked.set_position(n as u64);
        }
        let line = line.trim();
        if line.is_empty() || (n == 1 && line.eq_ignore_ascii_case("code,account")) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let result = match fields.as_slice() {
            [code, account] => parse_code(config, code).and_then(|code| {
                check_account_id(account).map_err(|e| format!("account {account:?}: {e}"))?;
                if account_exists(account) {
                    Ok((code, (*account).to_owned()))
                } else {
                    Err(format!("unknown account {account:?}"))
                }
            }),
            _ => Err(format!(
                "expected 2 fields (code,account), found {}",
                fields.len()
            )),
        };
        match result {
            Ok(pair) => out.push(pair),
            Err(e) if errors.len() < 20 => errors.push(format!("line {n}: {e}")),
            Err(_) => {}
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

// --- the mirror into ClickHouse -------------------------------------------------------

#[derive(Row, Serialize)]
struct AccountRow {
    account_id: String,
    plan: String,
    overage: u8,
    status: &'static str,
    updated_at: i64,
    version: u64,
    is_deleted: u8,
    attribution_window_days: u16,
}

#[derive(Row, Serialize)]
struct CodeRow {
    code: String,
    account_id: String,
    status: &'static str,
    updated_at: i64,
    version: u64,
    is_deleted: u8,
    topic: String,
    partition: u16,
    kafka_offset: u64,
}

#[derive(Row, Serialize)]
struct PlanRow<'a> {
    plan: &'a str,
    price_usd_month: f64,
    included_credits_month: u64,
    daily_cap: Option<u64>,
    rate_limit_per_minute: u32,
    overage_usd_per_1000: Option<f64>,
    loaded_at: i64,
}

#[derive(Row, Serialize)]
struct RefusalRow {
    account_id: String,
    limit_name: String,
    plan: String,
    window_start: u32,
    refusals: u64,
    id: String,
}

#[derive(Default)]
struct Batch {
    accounts: Vec<AccountRow>,
    codes: Vec<CodeRow>,
    refusals: Vec<RefusalRow>,
}

impl Batch {
    fn len(&self) -> usize {
        self.accounts.len() + self.codes.len() + self.refusals.len()
    }
}

fn skipped(kind: &'static str, topic: &str, offset: i64, why: &dyn std::fmt::Display) {
    tracing::warn!(topic, offset, error = %why, "registry message skipped");
    metrics::counter!(m::REGISTRY_MIRRORED_TOTAL, "kind" => kind, "result" => "skipped")
        .increment(1);
}

/// Turns one message into its row (or skips it, logged and counted).
fn add_message(config: &Config, catalogue: &Catalogue, batch: &mut Batch, msg: &impl Message) {
    let topic = msg.topic();
    let offset = msg.offset();
    // The order every reader applies (ingest too), whatever partition a key's messages are in.
    let version = shared::registry::message_version(msg.timestamp().to_millis(), msg.partition());
    let kafka_offset = u64::try_from(offset).unwrap_or(0);
    let key = msg
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .unwrap_or("");
    if topic == config.accounts_topic {
        if let Err(e) = check_account_id(key) {
            return skipped("account", topic, offset, &e);
        }
        let row = match msg.payload() {
            None => AccountRow {
                account_id: key.into(),
                plan: String::new(),
                overage: 0,
                status: "deleted",
                updated_at: 0,
                version,
                is_deleted: 1,
                attribution_window_days: shared::registry::DEFAULT_ATTRIBUTION_WINDOW_DAYS,
            },
            Some(v) => match AccountRecord::decode(v) {
                Ok(r) if catalogue.get(&r.plan).is_none() => {
                    return skipped(
                        "account",
                        topic,
                        offset,
                        &format!("unknown plan {:?}", r.plan),
                    )
                }
                Ok(r) => AccountRow {
                    account_id: key.into(),
                    overage: u8::from(r.overage),
                    status: if r.status == AccountStatus::Active {
                        "active"
                    } else {
                        "suspended"
                    },
                    updated_at: i64::try_from(r.updated_at_ms).unwrap_or(0),
                    plan: r.plan,
                    version,
                    is_deleted: 0,
                    attribution_window_days: r.attribution_window_days,
                },
                Err(e) => return skipped("account", topic, offset, &e),
            },
        };
        batch.accounts.push(row);
    } else if topic == config.codes_topic {
        if let Err(e) = shared::registry::check_code(key) {
            return skipped("code", topic, offset, &e);
        }
        let row = match msg.payload() {
            None => CodeRow {
                code: key.into(),
                account_id: String::new(),
                status: "deleted",
                updated_at: 0,
                version,
                is_deleted: 1,
                topic: topic.into(),
                partition: u16::try_from(msg.partition()).unwrap_or(0),
                kafka_offset,
            },
            Some(v) => match CodeRecord::decode(v) {
                Ok(r) => CodeRow {
                    code: key.into(),
                    status: if r.status == CodeStatus::Active {
                        "active"
                    } else {
                        "disabled"
                    },
                    updated_at: i64::try_from(r.updated_at_ms).unwrap_or(0),
                    account_id: r.account,
                    version,
                    is_deleted: 0,
                    topic: topic.into(),
                    partition: u16::try_from(msg.partition()).unwrap_or(0),
                    kafka_offset,
                },
                Err(e) => return skipped("code", topic, offset, &e),
            },
        };
        batch.codes.push(row);
    } else {
        match msg.payload().map(RefusalCount::decode) {
            Some(Ok(r)) => batch.refusals.push(RefusalRow {
                account_id: r.account_id,
                limit_name: r.limit,
                plan: r.plan,
                window_start: u32::try_from(r.window_start_ms / 1000).unwrap_or(0),
                refusals: r.count,
                id: r.id,
            }),
            Some(Err(e)) => skipped("refusal", topic, offset, &e),
            None => skipped("refusal", topic, offset, &"empty payload"),
        }
    }
}

async fn insert_rows<T>(
    client: &clickhouse::Client,
    table: &str,
    rows: &[T],
) -> clickhouse::error::Result<()>
where
    for<'a> T: Row<Value<'a> = T> + Serialize,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client
        .insert::<T>(table)
        .await?
        .with_setting("async_insert", "0")
        .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30)));
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

async fn write_batch(client: &clickhouse::Client, batch: &Batch) -> clickhouse::error::Result<()> {
    insert_rows(client, "accounts", &batch.accounts).await?;
    insert_rows(client, "codes", &batch.codes).await?;
    insert_rows(client, "account_refusals", &batch.refusals).await?;
    // An account's window may have changed: its conversions' attribution is computed anew.
    let mut accounts: Vec<&str> = batch
        .accounts
        .iter()
        .map(|a| a.account_id.as_str())
        .collect();
    accounts.sort_unstable();
    accounts.dedup();
    if !accounts.is_empty() {
        crate::attribution::recompute(client, crate::attribution::Scope::Accounts(&accounts), "60")
            .await?;
    }
    for (kind, n) in [
        ("account", batch.accounts.len()),
        ("code", batch.codes.len()),
        ("refusal", batch.refusals.len()),
    ] {
        metrics::counter!(m::REGISTRY_MIRRORED_TOTAL, "kind" => kind, "result" => "stored")
            .increment(n as u64);
    }
    Ok(())
}

/// Writes the catalogue into the `plans` table (the billing view prices overage from it).
pub async fn store_catalogue(config: &Config, catalogue: &Catalogue) -> anyhow::Result<()> {
    let client = crate::writer::base_client(config).with_database(&config.clickhouse_database);
    let mut insert = client
        .insert::<PlanRow<'_>>("plans")
        .await?
        .with_setting("async_insert", "0");
    let now = i64::try_from(shared::now_ms()).unwrap_or(0);
    for p in catalogue.plans() {
        insert
            .write(&PlanRow {
                plan: &p.name,
                price_usd_month: p.price_usd_month,
                included_credits_month: p.included_credits_month,
                daily_cap: p.daily_cap,
                rate_limit_per_minute: p.rate_limit_per_minute,
                overage_usd_per_1000: p.overage_usd_per_1000,
                loaded_at: now,
            })
            .await?;
    }
    insert.end().await?;
    Ok(())
}

/// Copies the registry topics and the refusal counts into ClickHouse until `stop`.
pub async fn mirror(config: Config, catalogue: Arc<Catalogue>, stop: CancellationToken) {
    let consumer: StreamConsumer = match client_config(&config)
        .set("group.id", format!("{}_registry", config.group_id))
        .set("client.id", "referral-registry-mirror")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "registry mirror not started");
            return;
        }
    };
    let topics = [
        config.accounts_topic.as_str(),
        config.codes_topic.as_str(),
        config.refusals_topic.as_str(),
    ];
    if let Err(e) = consumer.subscribe(&topics) {
        tracing::error!(error = %e, "registry mirror not started");
        return;
    }
    let client = crate::writer::base_client(&config).with_database(&config.clickhouse_database);
    loop {
        let mut batch = Batch::default();
        let mut offsets = TopicPartitionList::new();
        let window = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(window);
        while batch.len() < 10_000 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut window => break,
                received = consumer.recv() => match received {
                    Ok(msg) => {
                        add_message(&config, &catalogue, &mut batch, &msg);
                        let _ = offsets.add_partition_offset(msg.topic(), msg.partition(), Offset::Offset(msg.offset() + 1));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "registry mirror: consume error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        if offsets.count() == 0 {
            continue;
        }
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = write_batch(&client, &batch).await {
            tracing::warn!(error = %e, "registry mirror: insert failed; retrying");
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
            tracing::warn!(error = %e, "registry mirror: commit failed (the rows are stored; a replay is harmless)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_bad_csv_line_names_its_number_and_nothing_is_accepted() {
        let config = crate::config::Cli::try_parse_from(["consumer"])
            .expect("cli")
            .config;
        let exists = |a: &str| a == "acct_1";
        let ok = parse_csv(
            &config,
            "code,account\nA1B2C3D4E5F6,acct_1\n\n b1b2c3d4e5f6 , acct_1\n",
            exists,
            &ProgressBar::hidden(),
        )
        .expect("valid");
        assert_eq!(
            ok,
            [
                ("A1B2C3D4E5F6".to_owned(), "acct_1".to_owned()),
                ("B1B2C3D4E5F6".to_owned(), "acct_1".to_owned())
            ]
        );
        let errors = parse_csv(&config, "A1B2C3D4E5F6,acct_1\nSHORT,acct_1\nA1B2C3D4E5F7,acct_9\nA1B2C3D4E5F8\nA1B2C3D4E5F9,a,b\n", exists, &ProgressBar::hidden())
            .expect_err("bad lines");
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            errors[0].starts_with("line 2: malformed code"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("line 3: unknown account"),
            "{errors:?}"
        );
        assert!(
            errors[2].starts_with("line 4: expected 2 fields"),
            "{errors:?}"
        );
        assert!(
            errors[3].starts_with("line 5: expected 2 fields"),
            "{errors:?}"
        );
    }
}
