//! The referral-program registry as every ingest instance holds it: both compacted topics
//! (`referral_accounts`, `referral_codes`) read into memory at start and followed after.
//!
//! Invariants:
//! * ingest is not ready (`/readyz` 503, clicks 503) until both topics were read up to the
//!   end offsets they had when reading began: a code is never refused as unknown because
//!   its message was still on its way;
//! * after that, a registry message is in force as soon as its batch is applied (the
//!   follower waits at most `fetch.wait.max.ms` = 100 ms for new messages), so a command's
//!   change reaches every instance well within the SPEC's 2 s;
//! * a malformed message (bad JSON, unknown plan, another major version, bad key) changes
//!   nothing, is logged with its position and counted, and never stops the follower;
//! * lookups take a read lock only; the follower applies a whole fetched batch under one
//!   write lock, so catching up on a million codes does not take a million lock rounds.
//!
//! Each topic has its own consumer and thread (no group: every instance reads everything),
//! so an end-of-partition event always names a partition of a known topic.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use shared::metric_names as m;
use shared::plans::Catalogue;
use shared::registry::{Registry, Resolved};

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
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Accounts => "account",
            Self::Codes => "code",
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

    /// Whether both topics were read to their end at start.
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
        if done == 2 {
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
                    Kind::Accounts => r.apply_account(msg.key(), msg.payload(), &self.catalogue),
                    Kind::Codes => r.apply_code(msg.key(), msg.payload()),
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
}

/// Starts one follower thread per topic. They run until the process ends.
pub fn spawn_followers(client: &ClientConfig, topics: &Topics, registry: &Arc<SharedRegistry>) {
    for (kind, topic) in [
        (Kind::Accounts, topics.accounts.clone()),
        (Kind::Codes, topics.codes.clone()),
    ] {
        let client = client.clone();
        let registry = Arc::clone(registry);
        let spawned = std::thread::Builder::new()
            .name(format!("registry-{}", kind.label()))
            .spawn(move || follow(&client, kind, &topic, &registry));
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
        if !matches!(error, KafkaError::PartitionEOF(_)) {
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
        // Catching up: large fetches. Following: a change waits at most 100 ms at the broker.
        .set("fetch.wait.max.ms", "100")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "8388608")
        .set("queued.max.messages.kbytes", "262144")
        .set("reconnect.backoff.max.ms", "1000")
        .create_with_context(FollowerContext)
}

/// Assigns every partition of `topic` from the beginning; returns the partitions that hold
/// messages, with the end offset each had.
fn assign_all(consumer: &Follower, topic: &str) -> Result<Vec<(i32, i64)>, String> {
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
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| e.to_string())?;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        if high > low {
            ends.push((p, high));
        }
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(ends)
}

fn follow(client: &ClientConfig, kind: Kind, topic: &str, registry: &SharedRegistry) {
    let started = Instant::now();
    let mut last_warning: Option<Instant> = None;
    let (consumer, ends) = loop {
        let attempt = consumer_for(client, topic)
            .map_err(|e| e.to_string())
            .and_then(|c| assign_all(&c, topic).map(|ends| (c, ends)));
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
    // Partitions still to read up to their end offset at start.
    let mut pending: Vec<(i32, i64)> = ends;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut skipped = 0u64;
    let mut caught_up = false;
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
    }
}
