//! Kafka plumbing of the consumer: the group member and its context (rebalance events and
//! lag from librdkafka statistics), topic creation, and the dead-letter producer.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

use crate::config::{Config, MAX_POLL_INTERVAL_MS};
use shared::metric_names as m;

/// What a rebalance did, as seen by the loop after `recv()` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalanced {
    Revoked(Vec<i32>),
    Assigned(Vec<i32>),
}

/// Rebalance callbacks run inside `recv()`, on the loop's own task, so no insert is in
/// flight when they run. They only record what happened; the loop acts on it before it
/// handles the next message.
pub struct Context {
    topic: String,
    events: Mutex<Vec<Rebalanced>>,
    gate: Arc<FlushGate>,
}

/// Whether a flush is running in its own task. A revoke waits here until it is done, so
/// that no insert for a partition happens after its revoke returned (invariant 4 of the
/// pipeline), however long the flush takes up to its deadline.
pub struct FlushGate {
    busy: Mutex<bool>,
    idle: Condvar,
    limit: Duration,
}

impl FlushGate {
    pub fn new(limit: Duration) -> Self {
        Self {
            busy: Mutex::new(false),
            idle: Condvar::new(),
            limit,
        }
    }

    /// Marks a flush as running until the guard is dropped (also on a panic).
    pub fn enter(self: &Arc<Self>) -> FlushGuard {
        if let Ok(mut b) = self.busy.lock() {
            *b = true;
        }
        FlushGuard(Arc::clone(self))
    }

    fn wait_idle(&self) {
        let wait = || {
            if let Ok(guard) = self.busy.lock() {
                let _ = self
                    .idle
                    .wait_timeout_while(guard, self.limit, |busy| *busy);
            }
        };
        // The callback runs on a runtime worker (inside `recv`): let the runtime move that
        // worker's other tasks, the flush among them perhaps, to another thread meanwhile.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }
}

pub struct FlushGuard(Arc<FlushGate>);

impl Drop for FlushGuard {
    fn drop(&mut self) {
        if let Ok(mut b) = self.0.busy.lock() {
            *b = false;
        }
        self.0.idle.notify_all();
    }
}

impl Context {
    pub fn gate(&self) -> &Arc<FlushGate> {
        &self.gate
    }

    pub fn has_events(&self) -> bool {
        self.events.lock().is_ok_and(|e| !e.is_empty())
    }

    pub fn take_events(&self) -> Vec<Rebalanced> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    fn record(&self, event: Rebalanced) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    fn partitions(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        if let Some(topic) = stats.topics.get(&self.topic) {
            for (partition, p) in &topic.partitions {
                if *partition < 0 {
                    continue;
                }
                // -1: not assigned to this member; report 0 so sums over members are right.
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag as f64
                } else {
                    0.0
                };
                metrics::gauge!(m::PARTITION_LAG, "topic" => self.topic.clone(), "partition" => partition.to_string())
                    .set(lag);
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = self.partitions(tpl);
            self.gate.wait_idle();
            tracing::info!(topic = %self.topic, partitions = ?parts, "partitions revoked");
            self.record(Rebalanced::Revoked(parts));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.partitions(tpl);
            tracing::info!(topic = %self.topic, partitions = ?parts, "partitions assigned");
            self.record(Rebalanced::Assigned(parts));
        }
    }
}

pub type Consumer = StreamConsumer<Context>;

/// Brokers plus the operator's extra properties (validated: none of the protected keys).
pub(crate) fn client_config(config: &Config) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.kafka_brokers);
    for (k, v) in config.kafka_properties.iter() {
        cc.set(k, v);
    }
    cc
}

pub fn consumer(config: &Config) -> rdkafka::error::KafkaResult<Consumer> {
    let context = Context {
        topic: config.kafka_topic.clone(),
        events: Mutex::new(Vec::new()),
        gate: Arc::new(FlushGate::new(config.flush_deadline)),
    };
    client_config(config)
        .set("group.id", &config.group_id)
        .set("client.id", "referral-consumer")
        // Offsets are committed by hand, only after ClickHouse accepted the rows.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A dead member's partitions move on within ~10 s.
        .set("session.timeout.ms", "10000")
        // A flush is bounded by CONSUMER_FLUSH_DEADLINE_MS, well below this.
        .set("max.poll.interval.ms", MAX_POLL_INTERVAL_MS.to_string())
        .set("heartbeat.interval.ms", "1000")
        // Freshness: do not hold fetches long when the topic is quiet.
        .set("fetch.wait.max.ms", "100")
        .set("statistics.interval.ms", "5000")
        .set("reconnect.backoff.max.ms", "1000")
        .create_with_context(context)
}

/// Idempotent, acks=all producer for dead letters.
pub fn dlq_producer(config: &Config) -> rdkafka::error::KafkaResult<FutureProducer> {
    client_config(config)
        .set("client.id", "referral-consumer-dlq")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
}

/// A message that cannot become a row: its bytes and where it came from.
pub struct DeadLetter<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

/// Why a dead letter could not be published. Either way its offset must not be
/// committed, and the process stops: a consumer that cannot dead-letter would otherwise
/// wedge (stop polling and fall out of its group) or lose the message.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("the broker refused the dead letter for good ({0}); check CONSUMER_DLQ_TOPIC exists and accepts messages of this size")]
    Permanent(RDKafkaErrorCode),
    #[error("the dead-letter topic did not take the message within {0:?} (last error: {1})")]
    TimedOut(Duration, String),
}

/// Errors that retrying cannot fix.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::UnknownTopic
    )
}

/// Publishes a dead letter, retrying transient errors for at most `limit`.
pub async fn send_dead_letter(
    producer: &FutureProducer,
    config: &Config,
    letter: &DeadLetter<'_>,
    limit: Duration,
) -> Result<(), DeadLetterError> {
    let partition = letter.partition.to_string();
    let offset = letter.offset.to_string();
    let deadline = tokio::time::Instant::now() + limit;
    let mut backoff = Duration::from_millis(100);
    loop {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "dlq_reason",
                value: Some(letter.reason),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(config.kafka_topic.as_str()),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(offset.as_str()),
            });
        let mut record = FutureRecord::to(&config.dlq_topic)
            .payload(letter.payload)
            .headers(headers);
        if let Some(key) = letter.key {
            record = record.key(key);
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        // `send`'s own timeout only bounds queueing; delivery is bounded here. A letter
        // given up on may still arrive later: dead letters are at-least-once.
        let error = match tokio::time::timeout(left, producer.send(record, left)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err((e, _))) => e,
            Err(_) => {
                return Err(DeadLetterError::TimedOut(
                    limit,
                    "no delivery report".into(),
                ))
            }
        };
        if let Some(code) = error.rdkafka_error_code() {
            if is_permanent(code) {
                return Err(DeadLetterError::Permanent(code));
            }
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            return Err(DeadLetterError::TimedOut(limit, error.to_string()));
        }
        tracing::warn!(error = %error, "dead letter not accepted; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Creates the clicks and dead-letter topics; existing topics are left as they are.
pub async fn create_topics(config: &Config) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    let replication = || TopicReplication::Fixed(config.topic_replication);
    let topics = [
        NewTopic::new(&config.kafka_topic, config.topic_partitions, replication()),
        NewTopic::new(
            &config.conversions_topic,
            config.topic_partitions,
            replication(),
        ),
        NewTopic::new(
            &config.dlq_topic,
            config.topic_partitions.min(4),
            replication(),
        ),
        // The registry: the latest message of each key is all that matters.
        NewTopic::new(&config.accounts_topic, 1, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(
            &config.codes_topic,
            config.topic_partitions.min(4),
            replication(),
        )
        .set("cleanup.policy", "compact"),
        // Read whole by every ingest instance, like the accounts: one partition.
        NewTopic::new(&config.keys_topic, 1, replication()).set("cleanup.policy", "compact"),
        NewTopic::new(&config.refusals_topic, 1, replication()),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::info!(topic = %name, "topic exists")
            }
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
