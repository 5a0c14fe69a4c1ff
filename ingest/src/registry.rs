//! The referral-program registry as every ingest instance holds it: the three compacted
//! topics (`referral_accounts`, `referral_codes`, and `referral_keys`, the conversions
//! endpoint's API keys) read into memory at start and followed after.
//!
//! Invariants:
//! * ingest is not ready (`/readyz` 503, clicks 503) until the topics were read up to the
//!   end offsets they had when reading began: a code is never refused as unknown because
//!   its message was still on its way;
//! * after that, a registry message is in force as soon as its batch is applied (the
//!   follower waits at most `fetch.wait.max.ms` = 100 ms for new messages), so a command's
//!   change reaches every instance well within the 2 s the contract promises;
//! * a malformed message (bad JSON, unknown plan, another major version, bad key) changes
//!   nothing, is logged with its position and counted, and never stops the follower;
//! * lookups take a read lock only; the follower applies a whole fetched batch under one
//!   write lock, so catching up on a million codes does not take a million lock rounds.
//!
//! Each topic has its own consumer and thread (no group: every instance reads everything),
//! so an end-of-partition event always names a partition of a known topic.
//!
//! One key's messages may sit in several partitions (any backend may write the registry,
//! with its own partitioner, and an operator may add partitions, which the followers pick
//! up within a second): every message is applied by its version
//! (`shared::registry::message_version`: Kafka timestamp, then partition, then offset), so
//! every instance, in whatever order it reads the partitions, holds the newest message of
//! each key.
//!
//! A large codes topic can take long to read from the beginning (tansu's sqlite storage
//! serves about 25,000 messages a second: 45 s for a million codes). The consumer mirrors
//! the codes into ClickHouse with their topic, partition and offset, so the codes follower
//! first loads that snapshot and then reads each partition only from after the newest
//! offset the snapshot holds. The result is the same state as a full read: the snapshot
//! holds, per code, its newest message (with its version) among those mirrored, and every
//! message after the snapshot's offsets is read and applied by version. It is used only when it fits the topic (every offset between the partition's
//! first and end offset; no partitions the topic lacks); otherwise, and whenever
//! ClickHouse does not answer, the topic is read from the beginning.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use shared::metric_names as m;
use shared::plans::Catalogue;
use shared::registry::{message_version, Authenticated, Registry, Resolved};

/// The registry shared by the request handlers and the two follower threads.
pub struct SharedRegistry {
    inner: RwLock<Registry>,
    catalogue: Arc<Catalogue>,
    topics_caught_up: AtomicUsize,
    ready: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Accounts,
    Codes,
    Keys,
}

/// How many topics the registry reads before it is ready.
const TOPICS: usize = 3;

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Accounts => "account",
            Self::Codes => "code",
            Self::Keys => "key",
        }
    }
}

impl SharedRegistry {
    pub fn new(catalogue: Arc<Catalogue>) -> Self {
        Self {
            inner: RwLock::new(Registry::default()),
            catalogue,
            topics_caught_up: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// A registry that is ready at once (tests of the handlers without a broker).
    pub fn loaded(registry: Registry, catalogue: Arc<Catalogue>) -> Self {
        let shared = Self::new(catalogue);
        *shared.write() = registry;
        shared.ready.store(true, Ordering::Release);
        shared
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The account of an active code of an active account, or `None` (one answer for
    /// unknown, disabled and suspended, so codes cannot be probed).
    pub fn resolve(&self, code: &str) -> Option<Resolved> {
        match self.inner.read() {
            Ok(r) => r.resolve(code),
            Err(poisoned) => poisoned.into_inner().resolve(code),
        }
    }

    /// The account and key of a presented API secret, or `None` (one answer for a
    /// malformed, unknown or revoked key and for a key of a suspended account).
    pub fn authenticate(&self, secret: &str) -> Option<Authenticated> {
        match self.inner.read() {
            Ok(r) => r.authenticate(secret),
            Err(poisoned) => poisoned.into_inner().authenticate(secret),
        }
    }

    /// Whether every topic was read to its end at start.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        match self.inner.write() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn caught_up(&self, kind: Kind, started: Instant) {
        let done = self.topics_caught_up.fetch_add(1, Ordering::AcqRel) + 1;
        let (codes, accounts) = {
            let r = self.write();
            (r.code_count(), r.account_count())
        };
        tracing::info!(
            topic = kind.label(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            codes,
            accounts,
            "registry topic read to its end"
        );
        if done == TOPICS {
            crate::memory::release_freed_c_memory();
            self.ready.store(true, Ordering::Release);
            metrics::gauge!(m::REGISTRY_READY).set(1.0);
            tracing::info!(
                codes,
                accounts,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "registry loaded: ready"
            );
        }
    }

    /// Applies one fetched batch under one write lock.
    fn apply(&self, kind: Kind, batch: &[BorrowedMessage<'_>], skipped: &mut u64) {
        if batch.is_empty() {
            return;
        }
        let mut applied = 0u64;
        let mut newly_skipped = 0u64;
        let codes = {
            let mut r = self.write();
            for msg in batch {
                let result = match kind {
                    Kind::Accounts => r.apply_account(
                        msg.key(),
                        msg.payload(),
                        &self.catalogue,
                        message_version(msg.timestamp().to_millis(), msg.partition()),
                    ),
                    Kind::Codes => r.apply_code(
                        msg.key(),
                        msg.payload(),
                        message_version(msg.timestamp().to_millis(), msg.partition()),
                    ),
                    Kind::Keys => r.apply_key(
                        msg.key(),
                        msg.payload(),
                        message_version(msg.timestamp().to_millis(), msg.partition()),
                    ),
                };
                match result {
                    Ok(()) => applied += 1,
                    Err(e) => {
                        newly_skipped += 1;
                        // A writer gone wrong may send millions: log the first ones, then
                        // every ten-thousandth; the counter has them all.
                        let n = *skipped + newly_skipped;
                        if n <= 20 || n % 10_000 == 0 {
                            tracing::warn!(
                                topic = msg.topic(),
                                partition = msg.partition(),
                                offset = msg.offset(),
                                reason = e.label(),
                                error = %e,
                                skipped_so_far = n,
                                "registry message skipped"
                            );
                        }
                    }
                }
            }
            r.code_count()
        };
        *skipped += newly_skipped;
        let label = kind.label();
        metrics::counter!(m::REGISTRY_MESSAGES_TOTAL, "kind" => label, "result" => "applied")
            .increment(applied);
        metrics::counter!(m::REGISTRY_MESSAGES_TOTAL, "kind" => label, "result" => "skipped")
            .increment(newly_skipped);
        metrics::gauge!(m::REGISTRY_CODES).set(codes as f64);
    }
}

/// Where the registry lives.
#[derive(Debug, Clone)]
pub struct Topics {
    pub accounts: String,
    pub codes: String,
    pub keys: String,
    /// The consumer's ClickHouse mirror of the codes, when configured.
    pub snapshot: Option<Snapshot>,
}

/// ClickHouse's `codes` table, as the consumer mirrors it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

/// Starts one follower thread per topic. They run until the process ends.
pub fn spawn_followers(client: &ClientConfig, topics: &Topics, registry: &Arc<SharedRegistry>) {
    for (kind, topic, snapshot) in [
        (Kind::Accounts, topics.accounts.clone(), None),
        (Kind::Codes, topics.codes.clone(), topics.snapshot.clone()),
        (Kind::Keys, topics.keys.clone(), None),
    ] {
        let client = client.clone();
        let registry = Arc::clone(registry);
        let spawned = std::thread::Builder::new()
            .name(format!("registry-{}", kind.label()))
            .spawn(move || follow(&client, kind, &topic, snapshot.as_ref(), &registry));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start a registry follower thread");
        }
    }
}

/// librdkafka also reports reaching the end of a partition as a global error; here it is
/// the expected, frequent event that tells the follower it caught up, not worth a log line.
struct FollowerContext;

impl ClientContext for FollowerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "registry consumer error");
        }
    }
}

impl ConsumerContext for FollowerContext {}

type Follower = BaseConsumer<FollowerContext>;

fn consumer_for(client: &ClientConfig, topic: &str) -> Result<Follower, KafkaError> {
    client
        .clone()
        // No group membership and no commits: every instance reads the whole topic.
        .set(
            "group.id",
            format!("referral-ingest-registry-{:016x}", rand::random::<u64>()),
        )
        .set("client.id", format!("referral-ingest-registry-{topic}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // Following: a change waits at most 100 ms at the broker. Catching up: large
        // fetches keep the broker busy (smaller ones made catch-up 1.7x slower, measured);
        // the buffers they leave in the C heap are handed back once the registry is loaded
        // (see `crate::memory`).
        .set("fetch.wait.max.ms", "100")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "8388608")
        .set("reconnect.backoff.max.ms", "1000")
        .create_with_context(FollowerContext)
}

/// `(partition, first offset, end offset)` of every partition of `topic`.
fn watermarks(consumer: &Follower, topic: &str) -> Result<Vec<(i32, i64, i64)>, String> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => {
            return Err(format!(
                "topic {topic} does not exist (run `consumer setup`)"
            ))
        }
    };
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| e.to_string())?;
            Ok((p, low, high))
        })
        .collect()
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Position {
    partition: u16,
    version: u64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct CodeState {
    code: String,
    account_id: String,
    active: u8,
    version: u64,
}

/// Loads the codes of `topic` from the snapshot into the registry; the offset to read each
/// partition from. An error (ClickHouse not answering, a snapshot that does not fit the
/// topic) leaves what was loaded, which a read from the beginning then brings up to date.
fn load_snapshot(
    snapshot: &Snapshot,
    topic: &str,
    partitions: &[(i32, i64, i64)],
    registry: &SharedRegistry,
) -> Result<(Vec<(i32, i64)>, usize), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let client = clickhouse::Client::default()
        .with_url(&snapshot.url)
        .with_database(&snapshot.database)
        .with_user(&snapshot.user)
        .with_password(&snapshot.password)
        .with_validation(false);
    runtime.block_on(async {
        let timeout = Duration::from_secs(30);
        let positions: Vec<Position> = tokio::time::timeout(
            timeout,
            client
                .query("SELECT partition, max(kafka_offset) AS version FROM codes WHERE topic = ? GROUP BY partition")
                .bind(topic)
                .fetch_all(),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let mut starts = Vec::new();
        for (p, low, high) in partitions {
            let start = match positions.iter().find(|x| i32::from(x.partition) == *p) {
                Some(x) => i64::try_from(x.version).unwrap_or(i64::MAX).saturating_add(1),
                None => *low,
            };
            // Offsets the topic does not have: it was recreated, or compacted past them.
            if start < *low || start > *high {
                return Err(format!(
                    "partition {p}: the snapshot reaches offset {start}, the topic holds {low}..{high}"
                ));
            }
            starts.push((*p, start));
        }
        if let Some(x) = positions
            .iter()
            .find(|x| !partitions.iter().any(|(p, _, _)| *p == i32::from(x.partition)))
        {
            return Err(format!("the snapshot has partition {} the topic lacks", x.partition));
        }
        let mut cursor = client
            .query("SELECT code, account_id, status = 'active' AS active, version FROM codes FINAL WHERE topic = ? AND is_deleted = 0")
            .bind(topic)
            .with_setting("max_execution_time", "60")
            .fetch::<CodeState>()
            .map_err(|e| e.to_string())?;
        let mut loaded = 0;
        let mut chunk = Vec::with_capacity(10_000);
        loop {
            let row = cursor.next().await.map_err(|e| e.to_string())?;
            let done = row.is_none();
            chunk.extend(row);
            if done || chunk.len() == chunk.capacity() {
                let mut r = registry.write();
                for c in chunk.drain(..) {
                    // A row the topic would not hold (cannot happen through the mirror) is
                    // left out, as a malformed message would be.
                    if r.set_code(&c.code, &c.account_id, c.active == 1, c.version).is_ok() {
                        loaded += 1;
                    }
                }
            }
            if done {
                break;
            }
        }
        Ok((starts, loaded))
    })
}

fn follow(
    client: &ClientConfig,
    kind: Kind,
    topic: &str,
    snapshot: Option<&Snapshot>,
    registry: &SharedRegistry,
) {
    let started = Instant::now();
    let mut last_warning: Option<Instant> = None;
    let (consumer, partitions) = loop {
        let attempt = consumer_for(client, topic)
            .map_err(|e| e.to_string())
            .and_then(|c| watermarks(&c, topic).map(|w| (c, w)));
        match attempt {
            Ok(ready) => break ready,
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(topic, error = %e, "registry topic not readable yet; not ready");
                    last_warning = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    if kind == Kind::Codes {
        // At most this many codes arrive while catching up (fewer if keys repeat); capped so
        // that a long uncompacted history does not reserve more than 10 M entries.
        let messages: i64 = partitions.iter().map(|(_, low, high)| high - low).sum();
        registry
            .write()
            .reserve_codes(usize::try_from(messages).unwrap_or(0).min(10_000_000));
    }
    let mut starts: Vec<(i32, i64)> = partitions.iter().map(|(p, low, _)| (*p, *low)).collect();
    if let Some(snapshot) = snapshot {
        let loading = Instant::now();
        match load_snapshot(snapshot, topic, &partitions, registry) {
            Ok((resume, codes)) => {
                let tail: i64 = resume
                    .iter()
                    .zip(&partitions)
                    .map(|((_, start), (_, _, high))| high - start)
                    .sum();
                tracing::info!(
                    topic,
                    codes,
                    tail_messages = tail,
                    elapsed_ms = loading.elapsed().as_millis() as u64,
                    "registry codes loaded from ClickHouse; reading the topic's tail"
                );
                starts = resume;
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "registry snapshot in ClickHouse not used; reading the whole topic")
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (p, start) in &starts {
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*start));
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::error!(topic, error = %e, "registry topic not assigned; not ready");
        return;
    }
    // Partitions still to read up to their end offset at start.
    let mut pending: Vec<(i32, i64)> = partitions
        .iter()
        .zip(&starts)
        .filter(|((_, _, high), (_, start))| high > start)
        .map(|((p, _, high), _)| (*p, *high))
        .collect();
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut skipped = 0u64;
    let mut caught_up = false;
    let mut known: HashSet<i32> = partitions.iter().map(|(p, _, _)| *p).collect();
    let mut looked = Instant::now();
    if pending.is_empty() {
        registry.caught_up(kind, started);
        caught_up = true;
    }
    loop {
        let mut batch = Vec::new();
        let mut wait = Duration::from_millis(100);
        while batch.len() < 20_000 {
            match consumer.poll(wait) {
                Some(Ok(msg)) => batch.push(msg),
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => {
                    tracing::debug!(topic, error = %e, "registry consumer error");
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        registry.apply(kind, &batch, &mut skipped);
        if !caught_up {
            for msg in &batch {
                let (p, next) = (msg.partition(), msg.offset() + 1);
                pending.retain(|&(q, end)| !(q == p && next >= end));
            }
            pending.retain(|(p, _)| !at_end.contains(p));
            if pending.is_empty() {
                registry.caught_up(kind, started);
                caught_up = true;
            }
        }
        at_end.clear();
        if looked.elapsed() >= NEW_PARTITIONS_EVERY {
            looked = Instant::now();
            follow_new_partitions(&consumer, topic, &mut known);
        }
    }
}

/// How often a follower looks for partitions added to its topic while it runs.
const NEW_PARTITIONS_EVERY: Duration = Duration::from_secs(1);

/// Partitions added to the topic since the follower started (an operator may add them,
/// and another writer may use them at once) are read from their beginning. Their messages
/// take their place by version like any other, so the order they are read in is no matter.
fn follow_new_partitions(consumer: &Follower, topic: &str, known: &mut HashSet<i32>) {
    // Short: the follower applies nothing while it waits (a change is due within 2 s).
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_millis(500)) else {
        return;
    };
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return;
    };
    let mut added = TopicPartitionList::new();
    for p in t.partitions().iter().map(|p| p.id()) {
        if !known.contains(&p) {
            let _ = added.add_partition_offset(topic, p, Offset::Beginning);
        }
    }
    if added.count() == 0 {
        return;
    }
    match consumer.incremental_assign(&added) {
        Ok(()) => {
            for e in added.elements() {
                known.insert(e.partition());
            }
            tracing::info!(
                topic,
                added = added.count(),
                "registry topic has new partitions: reading them"
            );
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "new registry partitions not assigned; retrying")
        }
    }
}
