//! Where accepted clicks go: a sink behind a trait so handlers can be tested without a
//! broker, and its Kafka implementation.
//!
//! Invariant: `publish` returns `Ok` only after the broker acknowledged the message
//! (idempotent producer, `acks=all`); every other outcome is an error the handler turns
//! into a 503, so a 2xx always means "durably in Kafka".
//!
//! Readiness follows what the producer sees, not one probe: the broker counts as reachable
//! while the periodic metadata probe succeeds, **or** a delivery was acknowledged in the
//! last 10 s with no delivery failure after it. So a metadata request that is slow under
//! load does not turn clicks into 503s while produce works, and a broker that stops
//! acknowledging is noticed at its first failed delivery (then clicks get 503 at once
//! instead of each waiting out the produce timeout).
//!
//! # Delivery reports are served on the runtime
//! librdkafka reports deliveries a batch at a time (one produce response) on the
//! producer's main queue. rdkafka's `FutureProducer` serves that queue on a polling thread
//! of its own and completes each click's future there: a thread hop on every click's path
//! to its answer (the broker thread wakes the polling thread, which wakes the request's
//! runtime worker), and a wake-up of a runtime task from a foreign thread per click. Here
//! the queue wakes the runtime itself ([`events`]): a task serves it to empty and completes
//! the waiting requests from a runtime worker, where waking a task is a push on that
//! worker's own queue. A report whose request is gone (client disconnected) is dropped
//! harmlessly.

mod events;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use events::ServedProducer;

use crate::config::Config;
use shared::metric_names as m;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("the producer queue is full")]
    QueueFull,
    #[error("the broker did not acknowledge in time")]
    Timeout,
    #[error("the broker is not reachable")]
    NotReady,
    #[error("the broker refused the message: {0}")]
    Broker(String),
}

impl PublishError {
    /// Low-cardinality label for metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Timeout => "timeout",
            Self::NotReady => "not_ready",
            Self::Broker(_) => "broker",
        }
    }
}

pub trait ClickSink: Send + Sync + 'static {
    /// Publishes one click event; resolves once the broker acknowledged it.
    fn publish(
        &self,
        key: &[u8],
        payload: &[u8],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Publishes one conversion event, with the same guarantees.
    fn publish_conversion(
        &self,
        key: &[u8],
        payload: &[u8],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Whether the broker was reachable at the last check.
    fn is_ready(&self) -> bool;
    /// Delivers everything queued, waiting at most `timeout`.
    fn flush(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

/// What a delivery report resolves a waiting request with.
type Outcome = Result<(), PublishError>;
/// A waiting request, carried through librdkafka as the message's opaque pointer.
type Waiter = Box<oneshot::Sender<Outcome>>;
type KafkaProducer = ServedProducer<DeliveryContext>;

/// Runs where the main queue is served: completes each waiting request.
pub struct DeliveryContext;

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Waiter;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Waiter) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)) => {
                Err(PublishError::Timeout)
            }
            Err((e, _)) => Err(PublishError::Broker(e.to_string())),
        };
        // The request may be gone (client disconnected): nothing to tell.
        let _ = waiter.send(outcome);
    }
}

/// Longest wait between two servings of the main queue when librdkafka's wake-up byte
/// does not come (it always should; this only bounds the cost of a missed one).
const SERVE_AT_LEAST_EVERY: Duration = Duration::from_millis(100);
/// Events served in one go before the task yields to the runtime.
const SERVE_BATCH: usize = 4096;

/// Serves a producer's main queue whenever librdkafka says it is not empty (or every
/// [`SERVE_AT_LEAST_EVERY`]), until the producer is gone.
async fn serve_reports(producer: Weak<KafkaProducer>, wakeups: std::os::unix::net::UnixStream) {
    let wakeups = tokio::net::UnixStream::from_std(wakeups)
        .inspect_err(|e| {
            tracing::error!(error = %e, "cannot watch the producer's queue; serving it every 100 ms");
        })
        .ok();
    let mut bytes = [0u8; 64];
    loop {
        match &wakeups {
            Some(w) => {
                let _ = tokio::time::timeout(SERVE_AT_LEAST_EVERY, w.readable()).await;
                while matches!(w.try_read(&mut bytes), Ok(n) if n > 0) {}
            }
            None => tokio::time::sleep(SERVE_AT_LEAST_EVERY).await,
        }
        let Some(p) = producer.upgrade() else { return };
        // librdkafka writes again only after the queue was empty: serve it to the end.
        while serve_some(&p) {
            tokio::task::yield_now().await;
        }
    }
}

/// Serves up to [`SERVE_BATCH`] events; whether more are waiting.
fn serve_some(p: &KafkaProducer) -> bool {
    for _ in 0..SERVE_BATCH {
        if p.pending_events() == 0 {
            return false;
        }
        p.poll(Duration::ZERO);
    }
    p.pending_events() > 0
}

pub struct KafkaSink {
    /// Replaced (see `spawn_health_checks`) when librdkafka reports a fatal error: an
    /// idempotent producer in that state can never produce again and must be recreated.
    producer: RwLock<Arc<KafkaProducer>>,
    client_config: ClientConfig,
    produce_duration: metrics::Histogram,
    topic: String,
    conversions_topic: String,
    ack_timeout: Duration,
    /// The last metadata probe succeeded.
    probe_ok: Arc<AtomicBool>,
    /// Unix ms of the last acknowledged delivery, and of the last failed one.
    last_ack_ms: AtomicU64,
    last_failure_ms: AtomicU64,
}

/// Acknowledgements this recent keep ingest ready while the metadata probe fails.
const ACK_FRESH_MS: u64 = 10_000;

impl KafkaSink {
    /// Must be called within a tokio runtime: it starts the task serving delivery reports.
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.kafka_brokers)
            .set("client.id", "referral-ingest")
            // Exactly-once delivery into the log: no duplicates from producer retries, and an
            // acknowledgement only once every in-sync replica has the message.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Throughput: batch for a few ms and compress the JSON events (lz4 is cheap on CPU).
            .set("compression.type", "lz4")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("batch.num.messages", "10000")
            .set(
                "queue.buffering.max.messages",
                config.queue_max_messages.to_string(),
            )
            .set("queue.buffering.max.kbytes", "262144")
            // librdkafka gives up on a message at the same deadline the request waits for, so a
            // 503 answer is not followed by a late delivery of the same message.
            .set(
                "message.timeout.ms",
                config.produce_timeout.as_millis().to_string(),
            )
            .set("reconnect.backoff.max.ms", "1000");
        for (k, v) in config.kafka_properties.iter() {
            cc.set(k, v);
        }
        let producer = Self::create(&cc)?;
        Ok(Self {
            producer: RwLock::new(producer),
            client_config: cc,
            produce_duration: metrics::histogram!(m::PRODUCE_DURATION),
            topic: config.kafka_topic.clone(),
            conversions_topic: config.conversions_topic.clone(),
            ack_timeout: config.produce_timeout + Duration::from_secs(1),
            probe_ok: Arc::new(AtomicBool::new(false)),
            last_ack_ms: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
        })
    }

    /// A producer and the task serving its delivery reports.
    fn create(cc: &ClientConfig) -> Result<Arc<KafkaProducer>, KafkaError> {
        let base: BaseProducer<DeliveryContext> = cc.create_with_context(DeliveryContext)?;
        let (producer, wakeups) = ServedProducer::new(base)
            .map_err(|e| KafkaError::ClientCreation(format!("producer wake-ups: {e}")))?;
        let producer = Arc::new(producer);
        tokio::spawn(serve_reports(Arc::downgrade(&producer), wakeups));
        Ok(producer)
    }

    /// Checks every `every` that the broker answers and knows the topic; keeps the
    /// producer-queue gauge fresh. Runs until the process ends.
    pub fn spawn_health_checks(self: &Arc<Self>, every: Duration) {
        let sink = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let was_ready = sink.is_ready();
                let ok = sink.check_now().await;
                let ready = sink.is_ready();
                if let Some((code, reason)) = sink.current().client().fatal_error() {
                    tracing::error!(%code, %reason, "fatal producer error: replacing the Kafka producer");
                    let replacing = Arc::clone(&sink);
                    let _ = tokio::task::spawn_blocking(move || replacing.recreate()).await;
                }
                if ready != was_ready {
                    if ready {
                        tracing::info!(topic = %sink.topic, "broker reachable");
                    } else {
                        tracing::warn!(topic = %sink.topic, "broker not reachable or topic missing");
                    }
                } else if !ok && ready {
                    tracing::debug!(topic = %sink.topic, "metadata probe failed; deliveries are acknowledged, so still ready");
                }
                metrics::gauge!(m::BROKER_UP).set(if ready { 1.0 } else { 0.0 });
                metrics::gauge!(m::BROKER_PROBE_OK).set(if ok { 1.0 } else { 0.0 });
                metrics::gauge!(m::PRODUCER_QUEUE_MESSAGES)
                    .set(f64::from(sink.current().in_flight_count()));
                tokio::time::sleep(if ready {
                    every
                } else {
                    every.min(Duration::from_millis(500))
                })
                .await;
            }
        });
    }

    /// Publishes to another topic with the same producer (refusal counts), waiting for the
    /// broker's acknowledgement at most `timeout`.
    pub async fn publish_to(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let delivery = self.enqueue(topic, key.as_bytes(), payload)?;
        match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(PublishError::Broker("delivery report lost".into())),
            Err(_) => Err(PublishError::Timeout),
        }
    }

    /// Hands one message to librdkafka; the receiver resolves with its delivery report.
    fn enqueue(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Outcome>, PublishError> {
        let (waiter, delivery) = oneshot::channel();
        let record = BaseRecord::with_opaque_to(topic, Box::new(waiter))
            .key(key)
            .payload(payload);
        match self.producer().send(record) {
            Ok(()) => Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(PublishError::QueueFull)
            }
            Err((e, _)) => Err(PublishError::Broker(e.to_string())),
        }
    }

    /// The producer in use; held only for a call that does not wait.
    fn producer(&self) -> RwLockReadGuard<'_, Arc<KafkaProducer>> {
        match self.producer.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The producer in use, to keep across a wait.
    fn current(&self) -> Arc<KafkaProducer> {
        Arc::clone(&self.producer())
    }

    /// Swaps in a new producer. Messages still queued in the old one are purged: their
    /// requests get an error (503), never a 200 for a message that may not arrive.
    fn recreate(&self) {
        let fresh = match Self::create(&self.client_config) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "could not create a new producer");
                return;
            }
        };
        let old = match self.producer.write() {
            Ok(mut p) => std::mem::replace(&mut *p, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        old.purge(PurgeConfig::default().queue().inflight());
        drop(old);
    }

    fn broker_knows_topic(&self) -> bool {
        match self
            .current()
            .client()
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
        {
            Ok(md) => md.topics().iter().any(|t| {
                t.name() == self.topic && t.error().is_none() && !t.partitions().is_empty()
            }),
            Err(_) => false,
        }
    }

    /// Checks the broker now and records the answer (start-up and the health loop).
    pub async fn check_now(self: &Arc<Self>) -> bool {
        let probe = Arc::clone(self);
        let ok = tokio::task::spawn_blocking(move || probe.broker_knows_topic())
            .await
            .unwrap_or(false);
        self.probe_ok.store(ok, Ordering::Relaxed);
        ok
    }

    /// See the module doc: the probe, or a fresh acknowledgement not followed by a failure.
    fn reachable(&self, now_ms: u64) -> bool {
        if self.probe_ok.load(Ordering::Relaxed) {
            return true;
        }
        let ack = self.last_ack_ms.load(Ordering::Relaxed);
        ack + ACK_FRESH_MS > now_ms && ack >= self.last_failure_ms.load(Ordering::Relaxed)
    }

    fn fresh_ack(&self, now_ms: u64) -> bool {
        let ack = self.last_ack_ms.load(Ordering::Relaxed);
        ack + 50 > now_ms && ack >= self.last_failure_ms.load(Ordering::Relaxed)
    }

    fn record(&self, result: &Result<(), PublishError>) {
        let now = shared::now_ms();
        match result {
            // Every worker acknowledges clicks: skip the shared write while the last
            // acknowledgement is this fresh and after any failure (readiness reads it in
            // seconds).
            Ok(()) if self.fresh_ack(now) => 0,
            Ok(()) => self.last_ack_ms.fetch_max(now, Ordering::Relaxed),
            Err(PublishError::Timeout | PublishError::Broker(_)) => {
                self.last_failure_ms.fetch_max(now, Ordering::Relaxed)
            }
            Err(PublishError::QueueFull | PublishError::NotReady) => 0,
        };
    }
}

impl KafkaSink {
    /// What both streams' publishing does: refuse at once while the broker is not
    /// reachable, wait for the acknowledgement, record the outcome.
    async fn publish_on(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<(), PublishError> {
        if !self.reachable(shared::now_ms()) {
            return Err(PublishError::NotReady);
        }
        let started = Instant::now();
        let delivery = self.enqueue(topic, key, payload)?;
        // librdkafka reports every message by `message.timeout.ms`; this bound only guards
        // against a report that never comes.
        let result = match tokio::time::timeout(self.ack_timeout, delivery).await {
            Err(_) => Err(PublishError::Timeout),
            Ok(Err(_dropped)) => Err(PublishError::Broker("delivery report lost".into())),
            Ok(Ok(outcome)) => outcome,
        };
        self.produce_duration
            .record(started.elapsed().as_secs_f64());
        self.record(&result);
        result
    }
}

impl ClickSink for KafkaSink {
    async fn publish(&self, key: &[u8], payload: &[u8]) -> Result<(), PublishError> {
        self.publish_on(&self.topic, key, payload).await
    }

    async fn publish_conversion(&self, key: &[u8], payload: &[u8]) -> Result<(), PublishError> {
        self.publish_on(&self.conversions_topic, key, payload).await
    }

    fn is_ready(&self) -> bool {
        self.reachable(shared::now_ms())
    }

    async fn flush(&self, timeout: Duration) {
        let producer = self.current();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}
