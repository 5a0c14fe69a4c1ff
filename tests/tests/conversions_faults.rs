//! Conversions through the faults the clicks are held to (rows of the fault table): the
//! consumer killed mid-batch, ClickHouse unreachable, the broker restarted under HTTP
//! load. Every acknowledged conversion is stored once, repeats of an event included, the
//! revenue total is exact, and every stored conversion has its attribution row.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use shared::conversion::{ConversionEvent, ConversionType};

/// Produces conversion events straight to the topic (what ingest publishes), remembering
/// each event's amount; a repeat of an event id carries the same amount.
struct Feeder {
    producer: FutureProducer,
    topic: String,
    account: String,
    /// event id → amount.
    sent: BTreeMap<String, u64>,
    messages: usize,
}

impl Feeder {
    fn new(scope: &Scope) -> Self {
        Self {
            producer: ClientConfig::new()
                .set("bootstrap.servers", &scope.brokers)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .create()
                .expect("producer"),
            topic: scope.registry.conversions.clone(),
            account: scope.account.clone(),
            sent: BTreeMap::new(),
            messages: 0,
        }
    }

    fn event(&self, event_id: &str, amount: u64) -> ConversionEvent {
        let now = shared::now_ms();
        ConversionEvent {
            v: 1,
            kind: ConversionType::Sale,
            event_id: event_id.to_owned(),
            customer_hash: format!("{:064x}", rand::random::<u128>()),
            key_id: "e2e1".into(),
            click_id: String::new(),
            amount,
            currency: "EUR".into(),
            occurred_at_ms: now,
            received_at_ms: now,
            account_id: self.account.clone(),
            api_key_id: "key_0123456789abcdef".into(),
        }
    }

    /// Produces `n` new sales and, when `repeat_every` > 0, a repeat of every
    /// `repeat_every`-th event sent so far; returns once the broker acknowledged all.
    async fn send(&mut self, n: usize, repeat_every: usize) {
        let mut events: Vec<ConversionEvent> = (0..n)
            .map(|_| {
                let id = format!("inv_{:016x}", rand::random::<u64>());
                let amount = rand::random::<u64>() % 100_000;
                self.sent.insert(id.clone(), amount);
                self.event(&id, amount)
            })
            .collect();
        if repeat_every > 0 {
            let repeats: Vec<ConversionEvent> = self
                .sent
                .iter()
                .step_by(repeat_every)
                .map(|(id, amount)| self.event(id, *amount))
                .collect();
            events.extend(repeats);
        }
        self.messages += events.len();
        let sends = events.iter().map(|e| {
            let (key, payload) = (e.dedup_id(), e.encode());
            let (producer, topic) = (&self.producer, &self.topic);
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .expect("acknowledged");
            }
        });
        futures::future::join_all(sends).await;
    }

    fn revenue(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// Waits until the conversions table holds every event, checks it holds nothing more and
/// that the revenue is exact, and reports the row.
async fn assert_exactly_reported(
    scope: &Scope,
    expected: &BTreeMap<String, u64>,
    fault: &str,
    load: &str,
    sent: usize,
) {
    let table = format!("{}.conversions", scope.database);
    let n = expected.len() as u64;
    let counts =
        format!("SELECT count(), uniqExact(conversion_key), sum(amount) FROM {table} FORMAT TSV");
    let read = |text: String| -> (u64, u64, u64) {
        let v: Vec<u64> = text
            .split_whitespace()
            .map(|c| c.parse().unwrap_or(0))
            .collect();
        (v[0], v[1], v[2])
    };
    eventually(
        &format!("{n} conversions in {table}"),
        Duration::from_secs(90),
        || async {
            let (rows, _, _) = read(
                scope
                    .ch
                    .try_query(&counts)
                    .await
                    .unwrap_or_else(|_| "0 0 0".into()),
            );
            (rows >= n).then_some(())
        },
    )
    .await;
    // A duplicate insert would come late: give it a moment before the final count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rows, unique, revenue) = read(scope.ch.query(&counts).await);
    let stored: std::collections::HashSet<String> = scope
        .ch
        .query(&format!("SELECT event_id FROM {table} FORMAT TSV"))
        .await
        .lines()
        .map(str::to_owned)
        .collect();
    let lost = expected.keys().filter(|id| !stored.contains(*id)).count() as u64;
    let expected_revenue: u64 = expected.values().sum();
    // Complete: each stored conversion is attributed (click, customer or none) within
    // seconds of being stored.
    let attributed_sql = format!(
        "SELECT count() FROM {}.conversions_attributed",
        scope.database
    );
    let attributed = eventually_or_last(Duration::from_secs(20), || async {
        let got = scope.ch.scalar(&attributed_sql).await;
        (got >= rows, got)
    })
    .await;
    report(&FaultRow {
        fault: &format!(
            "{fault}; revenue {revenue} of {expected_revenue}; attributed {attributed} of {rows}"
        ),
        load,
        sent,
        accepted: expected.len(),
        rows: Some(rows),
        duplicates: Some(rows - unique),
        lost: Some(lost),
    });
    assert_eq!((rows, unique, lost), (n, n, 0), "{fault}");
    assert_eq!(revenue, expected_revenue, "{fault}: revenue");
    assert_eq!(
        attributed, rows,
        "{fault}: every stored conversion attributed"
    );
}

/// Polls `check` (done, value) until done or `timeout`; the last value either way.
async fn eventually_or_last<F, Fut>(timeout: Duration, mut check: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, u64)>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (done, value) = check().await;
        if done || std::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conversions_survive_consumer_sigkill_mid_batch() {
    let scope = Scope::new("conv_sigkill", 2).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let mut feeder = Feeder::new(&scope);
    feeder.send(1000, 0).await;
    let mut consumer = ConsumerProc::start(&opts);
    let count = format!("SELECT count() FROM {}.conversions", scope.database);
    let stored = || async {
        scope
            .ch
            .try_query(&count)
            .await
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut before = 0;
    for round in 0..4 {
        // New sales and a repeat of every 7th sale so far (a site retrying).
        feeder.send(800, 7).await;
        // The kill lands while batches are being written: rows grew since the last kill,
        // and sales sent just before it are still to be stored.
        let at_kill = loop {
            feeder.send(25, 0).await;
            let now = stored().await;
            if now > before {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            at_kill < feeder.sent.len() as u64,
            "round {round}: everything was stored before the kill"
        );
        before = at_kill;
        consumer.proc.kill();
        consumer = ConsumerProc::start(&opts);
    }
    consumer.ready().await;
    let messages = feeder.messages;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "conversions: consumer SIGKILL mid-batch, 4 times, with repeated event ids",
        &format!("{} sales + repeats of every 7th", feeder.sent.len()),
        messages,
    )
    .await;
    assert!(feeder.revenue() > 0);
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conversions_survive_a_clickhouse_outage() {
    let scope = Scope::new("conv_ch_outage", 2).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let proxy = opts.behind_cut_proxy().await;
    let consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    let mut feeder = Feeder::new(&scope);
    feeder.send(500, 0).await;
    eventually(
        "first conversions stored",
        Duration::from_secs(30),
        || async {
            let n = scope
                .ch
                .try_query(&format!(
                    "SELECT count() FROM {}.conversions",
                    scope.database
                ))
                .await
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            (n > 0).then_some(())
        },
    )
    .await;
    proxy.cut();
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(20 + soak_secs()) {
        feeder.send(100, 5).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let errors = consumer.metric("consumer_insert_errors_total").await;
    assert!(errors > 0.0, "inserts must have failed during the outage");
    proxy.restore();
    let messages = feeder.messages;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "conversions: ClickHouse unreachable for 20 s, with repeated event ids",
        "sales produced throughout the outage",
        messages,
    )
    .await;
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conversions_survive_a_broker_restart_under_http_load() {
    let mut broker = PrivateBroker::start().await;
    let scope = Scope::with_brokers("conv_broker_restart", 2, &broker.brokers()).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let consumer = ConsumerProc::start(&opts);
    let mut ingest_opts = scope.ingest_options();
    ingest_opts.extra_env = vec![
        ("INGEST_KEY_RATE_PER_MINUTE".into(), "1000000".into()),
        ("INGEST_KEY_RATE_BURST".into(), "1000000".into()),
        ("INGEST_QUEUE_MAX_MESSAGES".into(), "1".into()),
    ];
    let ingest = Ingest::start(&ingest_opts);
    ingest.ready().await;
    consumer.ready().await;

    // A site's backend, two workers: each posts sales one after another and retries a 503
    // with the same event id until it is accepted (what the contract asks of a client).
    let gate = std::sync::Arc::new(LoadGate::default());
    let ingest = std::sync::Arc::new(ingest);
    let worker = |gate: std::sync::Arc<LoadGate>,
                  ingest: std::sync::Arc<Ingest>,
                  secret: String| async move {
        let client = http();
        let mut accepted = BTreeMap::new();
        let (mut posts, mut refused) = (0usize, 0usize);
        let deadline = std::time::Instant::now() + Duration::from_secs(8 + soak_secs());
        while std::time::Instant::now() < deadline {
            let id = format!("inv_{:016x}", rand::random::<u64>());
            let amount = rand::random::<u64>() % 100_000;
            let body = serde_json::json!({"type": "sale", "event_id": id, "customer_id": "c",
                                          "amount": amount, "currency": "EUR"});
            loop {
                posts += 1;
                let posting = gate.enter().await;
                let answer = post_conversion(&client, &ingest, &secret, &body).await;
                drop(posting);
                match answer.status {
                    200 => break,
                    503 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    s => panic!("unexpected status {s}: {}", answer.text),
                }
            }
            accepted.insert(id, amount);
        }
        (accepted, posts, refused)
    };
    let workers = [
        tokio::spawn(worker(
            std::sync::Arc::clone(&gate),
            std::sync::Arc::clone(&ingest),
            secret.clone(),
        )),
        tokio::spawn(worker(
            std::sync::Arc::clone(&gate),
            std::sync::Arc::clone(&ingest),
            secret.clone(),
        )),
    ];
    // Down for a second (under the produce timeout) between posts, with one message of
    // room in the producer's queue: one worker's sale waits there, the other's is refused
    // at once (see exactly_once::broker_restart_under_load_loses_nothing).
    let restarts = 1 + soak_secs() / 5;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.close().await;
        broker.stop();
        gate.open();
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker.restart().await;
    }
    let (mut accepted, mut posts, mut refused) = (BTreeMap::new(), 0, 0);
    for w in workers {
        let (a, p, r) = w.await.expect("worker");
        accepted.extend(a);
        posts += p;
        refused += r;
    }
    assert!(
        accepted.len() > 50,
        "{} accepted, {refused} refused",
        accepted.len()
    );
    assert!(
        refused > 0,
        "no post was refused: the broker-down path never ran"
    );
    assert_exactly_reported(
        &scope,
        &accepted,
        "conversions: broker restart during HTTP load (503s retried with the same event id)",
        "8 s of sales by 2 clients",
        posts,
    )
    .await;
    drop(consumer);
    scope.drop_database().await;
}
