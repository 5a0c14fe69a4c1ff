//! The consumer against the real broker and the real ClickHouse: every event acknowledged
//! by the broker ends up in `referral_clicks` exactly once (count() == uniqExact(click_id)
//! == events, without FINAL), through crashes, rebalances, outages and bad messages.

use std::collections::HashSet;
use std::time::Duration;

use e2e::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;

/// A valid v1 event.
fn event(click_id: &str) -> Vec<u8> {
    sample_event(
        click_id,
        &format!("CODE{:08}", rand::random::<u32>() % 100),
        "/pricing",
        false,
    )
}

struct Feeder {
    producer: FutureProducer,
    topic: String,
    sent: Vec<String>,
}

impl Feeder {
    fn new(brokers: &str, topic: &str) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        Self {
            producer,
            topic: topic.to_owned(),
            sent: Vec::new(),
        }
    }

    /// Produces `n` fresh clicks into one partition; returns `(offset, click id, payload)`
    /// of each, in offset order, once the broker acknowledged all of them.
    async fn send_to(&mut self, partition: i32, n: usize) -> Vec<(i64, String, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let id = random_click_id();
            let payload = event(&id);
            let offset = self
                .producer
                .send(
                    FutureRecord::to(&self.topic)
                        .partition(partition)
                        .key(id.as_str())
                        .payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .expect("acknowledged")
                .offset;
            self.sent.push(id.clone());
            out.push((offset, id, payload));
        }
        out
    }

    /// Produces `n` fresh clicks; returns once the broker acknowledged all of them.
    async fn send(&mut self, n: usize) {
        let ids: Vec<String> = (0..n).map(|_| random_click_id()).collect();
        let futures = ids.iter().map(|id| {
            let payload = event(id);
            let producer = &self.producer;
            let topic = &self.topic;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(id.as_str()).payload(&payload),
                        Duration::from_secs(30),
                    )
                    .await
                    .expect("acknowledged")
            }
        });
        futures::future::join_all(futures).await;
        self.sent.extend(ids);
    }
}

/// Asserts exactly-once and reports the measured row for the fault table.
async fn assert_exactly_reported(
    scope: &Scope,
    expected: &[String],
    fault: &str,
    load: &str,
    sent: usize,
) {
    // The row is measured before anything is asserted, each figure from its own source:
    // the stored rows' ids (duplicates: ids stored more than once) against the ids
    // answered 200 or acknowledged (lost: acknowledged, not stored).
    let stored = stored_ids(scope, expected.len()).await;
    let distinct: HashSet<&str> = stored.iter().map(String::as_str).collect();
    let lost = expected
        .iter()
        .filter(|id| !distinct.contains(id.as_str()))
        .count();
    let unexpected = distinct.len() + lost - expected.len();
    report(&FaultRow {
        fault,
        load,
        sent,
        accepted: expected.len(),
        rows: Some(stored.len() as u64),
        duplicates: Some((stored.len() - distinct.len()) as u64),
        lost: Some(lost as u64),
    });
    assert_eq!(
        stored.len() - distinct.len(),
        0,
        "{fault}: click ids stored twice"
    );
    assert_eq!(lost, 0, "{fault}: acknowledged clicks not stored");
    assert_eq!(unexpected, 0, "{fault}: rows that were never acknowledged");
}

/// Every stored row's click id, once `n` rows are there (or 90 s passed) and no more came
/// for 2 s.
async fn stored_ids(scope: &Scope, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while scope.ch.counts_if_exists(&scope.table).await.0 < n as u64
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids = || async {
        scope
            .ch
            .query(&format!("SELECT click_id FROM {} FORMAT TSV", scope.table))
            .await
            .lines()
            .map(str::to_owned)
            .collect::<Vec<String>>()
    };
    // Give stragglers (a duplicate insert would come late) a moment.
    let mut last = ids().await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = ids().await;
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
}

async fn assert_exactly(scope: &Scope, expected: &[String]) {
    let stored = stored_ids(scope, expected.len()).await;
    let distinct: HashSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(stored.len(), distinct.len(), "click ids stored twice");
    let missing = expected
        .iter()
        .filter(|id| !distinct.contains(id.as_str()))
        .count();
    assert_eq!(missing, 0, "acknowledged clicks not stored");
    assert_eq!(
        stored.len(),
        expected.len(),
        "rows that were never acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_repeatedly_loses_and_duplicates_nothing() {
    let scope = Scope::new("eo_sigkill", 4).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(3000).await;
    let mut consumer = ConsumerProc::start(&opts);
    // Each soak minute adds six kill/restart rounds.
    let rounds = 5 + soak_secs() / 10;
    let mut before = 0;
    for round in 0..rounds {
        feeder.send(1500).await;
        // Kill it without warning while batches are being written: rows grew since the
        // last kill, and clicks sent just before it are still to be stored.
        let at_kill = loop {
            feeder.send(25).await;
            let now = scope.ch.counts_if_exists(&scope.table).await.0;
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
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "consumer SIGKILL mid-batch, 5 times",
        &format!("{} events produced while killing", feeder.sent.len()),
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

/// A crash after the insert and before the commit, made deterministic: rows for offsets
/// that were never committed are already in ClickHouse when the consumer starts. The
/// second member replays the first one's plans; with `CONSUMER_DEDUP_TRUST_SECS=0` it
/// first asks which rows are stored, and that question must stay bounded (sequence 8):
/// 200,000 unrelated rows of other days must not be read.
#[tokio::test(flavor = "multi_thread")]
async fn rows_stored_but_not_committed_are_not_written_again() {
    let scope = Scope::new("eo_uncommitted", 1).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(200).await;

    // A first consumer that writes everything; we kill it once the rows are in, and then
    // wipe the group's offsets by using a new group for the second consumer.
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let mut first = ConsumerProc::start(&opts);
    scope.wait_rows(200, Duration::from_secs(30)).await;
    first.proc.kill();

    let table = &scope.table;
    scope
        .ch
        .query(&format!(
            "INSERT INTO {table} (click_id, code, ip_hash, ua_hash, received_at, received_at_ms, kafka_topic, kafka_partition, kafka_offset) \
             SELECT concat('refclk_unrelated', toString(number)), 'UNRELATED000', '', '', now() - INTERVAL 2 DAY, 0, 'unrelated', 0, number FROM numbers(200000)"
        ))
        .await;

    opts.group = format!("{}_fresh", opts.group);
    opts.extra_env
        .push(("CONSUMER_DEDUP_TRUST_SECS".into(), "0".into()));
    let second = ConsumerProc::start(&opts);
    second.ready().await;
    feeder.send(50).await;
    scope.wait_rows(200_250, Duration::from_secs(60)).await;
    let skipped = eventually("skip metric", Duration::from_secs(10), || async {
        let v = second.metric("consumer_duplicates_skipped_total").await;
        (v >= 200.0).then_some(v)
    })
    .await;
    assert_eq!(skipped, 200.0);
    assert!(second.metric("consumer_plans_replayed_total").await >= 1.0);
    scope.ch.query("SYSTEM FLUSH LOGS").await;
    let db = &scope.database;
    let most_read = scope
        .ch
        .scalar(&format!(
            "SELECT max(read_rows) FROM system.query_log WHERE type = 'QueryFinish' \
             AND query LIKE '%kafka_offset >=%' AND has(databases, '{db}')"
        ))
        .await;
    assert!(
        most_read < 10_000,
        "the stored-rows check read {most_read} rows"
    );
    scope
        .ch
        .query(&format!(
            "ALTER TABLE {table} DELETE WHERE kafka_topic = 'unrelated' SETTINGS mutations_sync = 2"
        ))
        .await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "crash after insert, before commit (rows stored, offsets not committed; old plans re-checked, bounded)",
        "250 events + 200,000 unrelated rows",
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_share_partitions_through_join_and_leave() {
    let scope = Scope::new("eo_group", 4).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    let a = ConsumerProc::start(&opts);
    a.ready().await;
    feeder.send(2000).await;
    let mut b = ConsumerProc::start(&opts);
    b.ready().await;
    for _ in 0..6 {
        feeder.send(500).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Both members wrote rows: the partitions were shared.
    let b_rows = eventually("second member inserts", Duration::from_secs(40), || async {
        let v = b.metric("consumer_rows_inserted_total").await;
        (v > 0.0).then_some(v)
    })
    .await;
    assert!(b_rows > 0.0);
    // The second one leaves (SIGTERM) while clicks keep coming.
    let leave = tokio::task::spawn_blocking(move || b.proc.terminate(Duration::from_secs(40)));
    feeder.send(2000).await;
    let status = leave.await.expect("join");
    assert!(
        status.is_some_and(|s| s.success()),
        "clean exit on SIGTERM: {status:?}"
    );
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "second consumer joins, then leaves (SIGTERM)",
        "7,000 events in waves",
        feeder.sent.len(),
    )
    .await;
    assert!(a.metric("consumer_rows_inserted_total").await > 0.0);
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_outage_keeps_data_and_resumes() {
    let scope = Scope::new("eo_ch_outage", 2).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let proxy = opts.behind_cut_proxy().await;
    let consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(1000).await;
    scope.wait_rows(1, Duration::from_secs(30)).await;

    proxy.cut();
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(30 + soak_secs()) {
        feeder.send(200).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let errors = consumer.metric("consumer_insert_errors_total").await;
    assert!(errors > 0.0, "inserts must have failed during the outage");
    assert!(
        reqwest::get(consumer.url("/readyz"))
            .await
            .expect("readyz")
            .status()
            == 503
    );
    proxy.restore();
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "ClickHouse unreachable for 30 s",
        "events produced throughout the outage",
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_inserts_commit_nothing_until_accepted() {
    let scope = Scope::new("eo_refused", 2).await;
    // Schema first, as the writing user.
    let mut setup = scope.consumer_options();
    setup
        .extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let first = ConsumerProc::start(&setup);
    first.ready().await;
    drop(first);

    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(500).await;
    let mut refused = setup.clone();
    refused
        .extra_env
        .push(("CONSUMER_CLICKHOUSE_USER".into(), "no_insert".into()));
    refused
        .extra_env
        .push(("CONSUMER_MIGRATE_ON_START".into(), "false".into()));
    let mut readonly = ConsumerProc::start(&refused);
    eventually("refused inserts", Duration::from_secs(60), || async {
        (readonly.metric("consumer_insert_errors_total").await > 0.0).then_some(())
    })
    .await;
    assert_eq!(scope.ch.counts(&scope.table).await, (0, 0));
    assert_eq!(readonly.metric("consumer_rows_inserted_total").await, 0.0);
    readonly.proc.kill();

    // The writing consumer of the same group gets all of them: nothing was committed.
    let writer = ConsumerProc::start(&setup);
    writer.ready().await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "inserts refused (user without INSERT rights)",
        "500 events",
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_the_dead_letter_topic_without_blocking() {
    let scope = Scope::new("eo_dlq", 1).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(100).await;
    let mut bad_version: Value = serde_json::from_slice(&event("refclk_v2")).expect("json");
    bad_version["v"] = 2.into();
    let mut bad_path: Value = serde_json::from_slice(&event("refclk_path")).expect("json");
    bad_path["landing_path"] = "//evil.example".into();
    let bad_version = bad_version.to_string();
    let bad_path = bad_path.to_string();
    produce_raw(
        &scope.brokers,
        &scope.topic,
        &[
            (Some("k1"), b"not json at all"),
            (None, b""),
            (Some("k2"), bad_version.as_bytes()),
            (Some("k3"), bad_path.as_bytes()),
        ],
    )
    .await;
    feeder.send(100).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "4 poison messages among valid ones",
        "200 valid events",
        feeder.sent.len(),
    )
    .await;
    let dlq = read_topic(
        &scope.brokers,
        &format!("{}_dlq", scope.topic),
        4,
        Duration::from_secs(20),
    );
    assert_eq!(dlq.len(), 4);
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|r| r.headers.get("dlq_reason").map_or("", String::as_str))
        .collect();
    assert!(reasons[0].starts_with("not a click event"), "{reasons:?}");
    assert!(reasons[1].contains("empty"), "{reasons:?}");
    assert!(reasons[2].contains("version 2"), "{reasons:?}");
    assert!(reasons[3].contains("landing_path"), "{reasons:?}");
    assert_eq!(dlq[0].payload, b"not json at all");
    assert_eq!(dlq[0].headers.get("source_topic"), Some(&scope.topic));
    assert_eq!(consumer.metric("consumer_dead_letters_total").await, 4.0);
    scope.drop_database().await;
}

/// The same click id posted twice (a client retry) is one row, also when the retry
/// arrives after a consumer restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_click_id_is_one_row() {
    let scope = Scope::new("eo_retry", 2).await;
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let ingest = Ingest::start(&scope.ingest_options());
    ingest.ready().await;
    let c = http();
    let body = serde_json::json!({"code":"A1B2C3D4E5F6","click_id":"refclk_retry_1"});
    for _ in 0..3 {
        assert_eq!(
            post_click(&c, &ingest.url("/api/v1/referrals/click"), &body)
                .await
                .0,
            200
        );
    }
    let mut consumer = ConsumerProc::start(&opts);
    scope.wait_rows(1, Duration::from_secs(30)).await;
    consumer.proc.kill();
    // The retry comes after a restart: the id set is reloaded from ClickHouse.
    assert_eq!(
        post_click(&c, &ingest.url("/api/v1/referrals/click"), &body)
            .await
            .0,
        200
    );
    let other = serde_json::json!({"code":"A1B2C3D4E5F6","click_id":"refclk_retry_2"});
    assert_eq!(
        post_click(&c, &ingest.url("/api/v1/referrals/click"), &other)
            .await
            .0,
        200
    );
    let consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    assert_exactly_reported(
        &scope,
        &["refclk_retry_1".to_owned(), "refclk_retry_2".to_owned()],
        "client retries of one click id, across a consumer restart (5 posts answered 200, 2 distinct clicks)",
        "4 posts of 1 id + 1 other",
        5,
    )
    .await;
    scope.drop_database().await;
}

/// SIGTERM with a batch in hand: it is inserted and committed before the process exits.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_the_batch_in_hand_and_commits() {
    let scope = Scope::new("eo_sigterm", 2).await;
    let mut opts = scope.consumer_options();
    // Nothing would flush on its own for a minute.
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "60000".into()));
    let mut consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(500).await;
    eventually("batch in hand", Duration::from_secs(30), || async {
        (consumer.metric("consumer_messages_consumed_total").await >= 500.0).then_some(())
    })
    .await;
    assert_eq!(scope.ch.counts(&scope.table).await.0, 0);
    let status =
        tokio::task::spawn_blocking(move || consumer.proc.terminate(Duration::from_secs(30)))
            .await
            .expect("join");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(scope.ch.counts(&scope.table).await, (500, 500));

    // The next member starts after the committed offsets: nothing to skip.
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let next = ConsumerProc::start(&opts);
    next.ready().await;
    feeder.send(10).await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "consumer SIGTERM with a batch in hand",
        "510 events",
        feeder.sent.len(),
    )
    .await;
    assert_eq!(next.metric("consumer_duplicates_skipped_total").await, 0.0);
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_under_load_loses_nothing() {
    let mut broker = PrivateBroker::start().await;
    let scope = Scope::with_brokers("eo_broker_restart", 2, &broker.brokers()).await;
    let mut opts = scope.consumer_options();
    opts.fast_batches();
    let consumer = ConsumerProc::start(&opts);
    let ingest = Ingest::start(&IngestOptions {
        extra_env: vec![
            ("INGEST_RATE_LIMIT_BURST".into(), "1000000".into()),
            ("INGEST_RATE_LIMIT_PER_MINUTE".into(), "1000000".into()),
            ("INGEST_QUEUE_MAX_MESSAGES".into(), "1".into()),
        ],
        ..scope.ingest_options()
    });
    ingest.ready().await;
    consumer.ready().await;

    let url = ingest.url("/api/v1/referrals/click");
    let gate = std::sync::Arc::new(LoadGate::default());
    // Two clients posting one click after another, each retrying a 503 with the same click
    // id (the broker may have kept the first attempt; the same id is the same click).
    let worker = |url: String, gate: std::sync::Arc<LoadGate>| async move {
        let c = http();
        let (mut accepted, mut refused) = (Vec::new(), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(8 + soak_secs());
        while std::time::Instant::now() < deadline {
            let id = random_click_id();
            loop {
                let body = serde_json::json!({"code": DOCS_CODE, "click_id": id});
                let posting = gate.enter().await;
                let status = post_click(&c, &url, &body).await.0;
                drop(posting);
                match status {
                    200 => break,
                    503 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
            accepted.push(id);
        }
        (accepted, refused)
    };
    let load = {
        let (a, b) = (
            tokio::spawn(worker(url.clone(), std::sync::Arc::clone(&gate))),
            tokio::spawn(worker(url, std::sync::Arc::clone(&gate))),
        );
        async move {
            let (mut a, b) = (a.await.expect("worker"), b.await.expect("worker"));
            a.0.extend(b.0);
            (a.0, a.1 + b.1)
        }
    };
    // Restart the broker every few seconds while the load lasts, down for a second (under
    // the produce timeout) each time. The producer's queue holds one message: while one
    // client's click waits in it for the broker, the other's is refused at once (503), so
    // the retry path runs in every run. The broker goes down between posts (LoadGate), and
    // no message times out in the producer: tansu 0.6 cannot take an idempotent producer's
    // retry after a timeout (consumer/README.md, known limits).
    let restarts = 1 + soak_secs() / 5;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.close().await;
        broker.stop();
        gate.open();
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker.restart().await;
    }
    let (accepted, refused) = load.await;
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
        "broker restart during HTTP load (503s retried with the same click id)",
        "8 s of posts by 2 clients",
        accepted.len() + refused,
    )
    .await;
    scope.drop_database().await;
}

// --- issue 11: sequences that used to write a click twice or lose it -----------------------

/// Every aggregate counts each stored click once (credits included).
async fn assert_aggregates(scope: &Scope, n: u64) {
    let db = &scope.database;
    for (what, sql) in [
        (
            "code_clicks_daily",
            format!("SELECT sum(clicks) FROM {db}.code_clicks_daily"),
        ),
        (
            "clicks_daily",
            format!("SELECT countMerge(clicks) FROM {db}.clicks_daily"),
        ),
        (
            "clicks_hourly",
            format!("SELECT countMerge(clicks) FROM {db}.clicks_hourly"),
        ),
        (
            "utm_daily",
            format!("SELECT countMerge(clicks) FROM {db}.utm_daily"),
        ),
        (
            "clicks_by_path_daily",
            format!("SELECT countMerge(clicks) FROM {db}.clicks_by_path_daily"),
        ),
        (
            "totals_daily",
            format!("SELECT countMerge(clicks) FROM {db}.totals_daily"),
        ),
        (
            "ip_code_hourly",
            format!("SELECT sum(clicks) FROM {db}.ip_code_hourly"),
        ),
        (
            "credits_daily",
            format!("SELECT sum(credits) FROM {db}.credits_daily"),
        ),
    ] {
        assert_eq!(scope.ch.scalar(&sql).await, n, "{what}");
    }
}

/// The schema of `scope`, applied ahead of the consumer (for tests that add their own views).
async fn migrate(scope: &Scope) {
    let cli = <consumer::config::Cli as clap::Parser>::try_parse_from([
        "consumer",
        "--clickhouse-url",
        &clickhouse_url(),
    ])
    .expect("cli");
    consumer::migrations::apply(
        &consumer::writer::base_client(&cli.config),
        &scope.database,
        "referral_clicks",
    )
    .await
    .expect("migrations");
}

/// A view on the raw table that fails (`fail = 1`) or sleeps ~`sleep_ms` per insert
/// while its control row says so, counting into `{db}.probe_counts` (deduplicated like
/// the real aggregates).
async fn add_probe_view(scope: &Scope) {
    let db = &scope.database;
    for sql in [
        // Append-only (latest row wins): changing it never waits for a running insert.
        format!(
            "CREATE TABLE {db}.probe_control (at DateTime64(6) DEFAULT now64(6), fail UInt8, sleep_ms UInt32) \
             ENGINE = MergeTree ORDER BY at"
        ),
        format!("INSERT INTO {db}.probe_control (fail, sleep_ms) VALUES (0, 0)"),
        format!(
            "CREATE TABLE {db}.probe_counts (day Date, clicks UInt64) ENGINE = SummingMergeTree \
             ORDER BY day SETTINGS non_replicated_deduplication_window = 10000"
        ),
        // sleepEachRow over a 100-row constant block: sleep_ms in one step, whatever the batch.
        format!(
            "CREATE MATERIALIZED VIEW {db}.probe_mv TO {db}.probe_counts AS \
             SELECT toDate(received_at) AS day, count() AS clicks FROM {db}.referral_clicks \
             WHERE throwIf((SELECT argMax(fail, at) FROM {db}.probe_control) = 1, 'probe view failed on demand') = 0 \
             AND (SELECT count() FROM numbers(100) WHERE sleepEachRow((SELECT argMax(sleep_ms, at) FROM {db}.probe_control) / 100000.0) = 0) >= 0 \
             GROUP BY day"
        ),
    ] {
        scope.ch.query(&sql).await;
    }
}

async fn set_probe(scope: &Scope, fail: u8, sleep_ms: u32) {
    let db = &scope.database;
    scope
        .ch
        .query(&format!(
            "INSERT INTO {db}.probe_control (fail, sleep_ms) VALUES ({fail}, {sleep_ms})"
        ))
        .await;
}

/// Sequence 7: the raw insert succeeds and one view fails; the retry must give that view
/// its rows without counting them twice anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_view_that_fails_gets_its_rows_on_the_retry() {
    let scope = Scope::new("eo_view_fails", 2).await;
    migrate(&scope).await;
    add_probe_view(&scope).await;
    set_probe(&scope, 1, 0).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(400).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    // The raw rows land, the view refuses, the insert reports an error.
    scope.wait_rows(400, Duration::from_secs(60)).await;
    eventually("insert errors", Duration::from_secs(30), || async {
        (consumer.metric("consumer_insert_errors_total").await >= 2.0).then_some(())
    })
    .await;
    set_probe(&scope, 0, 0).await;
    let db = &scope.database;
    eventually(
        "the failed view catches up",
        Duration::from_secs(60),
        || async {
            (scope
                .ch
                .scalar(&format!("SELECT sum(clicks) FROM {db}.probe_counts"))
                .await
                >= 400)
                .then_some(())
        },
    )
    .await;
    feeder.send(100).await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "a materialized view fails after the raw insert, then recovers",
        "500 events, 2 partitions",
        feeder.sent.len(),
    )
    .await;
    assert_aggregates(&scope, 500).await;
    assert_eq!(
        scope
            .ch
            .scalar(&format!("SELECT sum(clicks) FROM {db}.probe_counts"))
            .await,
        500
    );
    scope.drop_database().await;
}

/// Sequence 2: an insert keeps running on the server after its sender gave up and left;
/// the next owner must not write the same clicks beside it.
#[tokio::test(flavor = "multi_thread")]
async fn an_insert_that_outlives_its_sender_is_not_written_twice() {
    let scope = Scope::new("eo_outlives", 2).await;
    migrate(&scope).await;
    // Inserts in the next 15 s are held ~50 ms per row *before* their rows are stored (a
    // column default is computed before the part is written): the old insert's rows are
    // invisible while the next owner looks.
    let until = shared::now_ms() / 1000 + 15;
    scope
        .ch
        .query(&format!(
            "ALTER TABLE {} MODIFY COLUMN inserted_at DateTime('UTC') \
             DEFAULT now() + sleepEachRow(if(now() < toDateTime({until}), 0.05, 0))",
            scope.table
        ))
        .await;
    let ch_addr: std::net::SocketAddr = clickhouse_url()
        .trim_start_matches("http://")
        .parse()
        .expect("ClickHouse address");
    let proxy = CutProxy::start(ch_addr).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(300).await;

    // The first member reaches ClickHouse through the proxy and gives up quickly.
    let mut first_opts = scope.consumer_options();
    first_opts.clickhouse_url = proxy.url();
    first_opts.extra_env.extend([
        ("CONSUMER_INSERT_TIMEOUT_MS".to_owned(), "20000".to_owned()),
        ("CONSUMER_SHUTDOWN_GRACE_SECS".to_owned(), "1".to_owned()),
        ("CONSUMER_BATCH_MAX_AGE_MS".to_owned(), "200".to_owned()),
    ]);
    let mut first = ConsumerProc::start(&first_opts);
    // Its insert is running on the server (held up by the slow default): cut the connection,
    // so the member sees a failure while the server carries on.
    let db = scope.database.clone();
    eventually("the first insert runs on the server", Duration::from_secs(60), || async {
        let running = scope
            .ch
            .scalar(&format!(
                "SELECT count() FROM system.processes WHERE current_database = '{db}' AND query_kind = 'Insert' AND query NOT LIKE '%_plans%'"
            ))
            .await;
        (running > 0).then_some(())
    })
    .await;
    proxy.cut();
    let status = first.proc.terminate(Duration::from_secs(15));
    assert!(
        status.is_some(),
        "the first member stops within its grace period"
    );

    // More clicks arrive; the next owner starts at once and writes while the old insert
    // may still run (its first batch holds more rows than the old one).
    feeder.send(100).await;
    let second = ConsumerProc::start(&scope.consumer_options());
    second.ready().await;
    // Count only once the old insert is done on the server, whatever it did.
    eventually("the old insert ends", Duration::from_secs(90), || async {
        let running = scope
            .ch
            .scalar(&format!(
                "SELECT count() FROM system.processes WHERE current_database = '{db}' AND query_kind = 'Insert' AND query NOT LIKE '%_plans%'"
            ))
            .await;
        (running == 0).then_some(())
    })
    .await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "an insert outlives its sender (connection cut mid-insert, member leaves, next owner writes at once)",
        "400 events, 2 partitions",
        feeder.sent.len(),
    )
    .await;
    assert_aggregates(&scope, 400).await;
    scope.drop_database().await;
}

/// Sequence 3: a member stalls (SIGSTOP) past its session, another takes over, then the
/// stalled one wakes up with rows in hand.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_member_that_wakes_up_writes_nothing_twice() {
    let scope = Scope::new("eo_stalled", 2).await;
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "4000".into()));
    // When the takeover splits a plan group the second member recorded, the part's new
    // owner waits this long before it checks the table and writes the rest ("Plan groups"
    // in consumer/src/pipeline.rs): 600 s by default, longer than the test waits.
    opts.extra_env
        .push(("CONSUMER_DEDUP_TRUST_SECS".into(), "20".into()));
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(300).await;
    let first = ConsumerProc::start(&opts);
    scope.wait_rows(300, Duration::from_secs(60)).await;
    // Rows in hand, then frozen: the member has read the next 200 and not written them.
    feeder.send(200).await;
    eventually(
        "the first member holds 200 more rows",
        Duration::from_secs(30),
        || async {
            (first.metric("consumer_messages_consumed_total").await >= 500.0).then_some(())
        },
    )
    .await;
    let handled = |c: &ConsumerProc| {
        let url = c.url("/metrics");
        async move {
            metric_value(&url, "consumer_rows_dropped_unwritten_total").await
                + metric_value(&url, "consumer_plans_replayed_total").await
                + metric_value(&url, "consumer_duplicates_skipped_total").await
        }
    };
    let before = handled(&first).await;
    first.proc.signal("STOP");
    assert_eq!(
        scope.ch.count(&scope.table).await,
        300,
        "the frozen member must hold its rows unwritten (raise the batch age)"
    );
    let second = ConsumerProc::start(&opts);
    feeder.send(200).await;
    scope.wait_rows(700, Duration::from_secs(90)).await;
    // The stalled member wakes up long after its session ended, its rows' age well past
    // the flush age, and more clicks arrive while it finds out.
    first.proc.signal("CONT");
    feeder.send(200).await;
    // Evidence that it dealt with its stale rows after waking: dropped unwritten (its
    // partitions had moved), or its flush followed the plans the other member recorded.
    eventually(
        "the woken member's stale flush",
        Duration::from_secs(60),
        || async { (handled(&first).await > before).then_some(()) },
    )
    .await;
    feeder.send(100).await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "a member stalls (SIGSTOP) past its session, another takes over, the first wakes up",
        "1,000 events, 2 partitions",
        feeder.sent.len(),
    )
    .await;
    assert_aggregates(&scope, 1000).await;
    drop(second);
    scope.drop_database().await;
}

/// Sequence 4: the topic is recreated (here: the same name on another cluster, where
/// offsets start at 0 again); new clicks at old offsets are new clicks.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_loses_no_click() {
    let scope = Scope::new("eo_recreated", 1).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(200).await;
    let mut first = ConsumerProc::start(&scope.consumer_options());
    scope.wait_rows(200, Duration::from_secs(60)).await;
    first.proc.terminate(Duration::from_secs(30));

    let mut other = PrivateBroker::start().await;
    let brokers = other.brokers();
    create_topic(&brokers, &scope.topic, 1).await;
    create_topic(&brokers, &format!("{}_dlq", scope.topic), 1).await;
    let mut new_feeder = Feeder::new(&brokers, &scope.topic);
    new_feeder.send(150).await;
    let mut opts = scope.consumer_options();
    opts.brokers = brokers;
    let second = ConsumerProc::start(&opts);
    second.ready().await;
    let mut all = feeder.sent.clone();
    all.extend(new_feeder.sent.iter().cloned());
    assert_exactly_reported(
        &scope,
        &all,
        "the topic is recreated (same name, offsets from 0 again, other clicks)",
        "200 events, then 150 at the same offsets",
        all.len(),
    )
    .await;
    assert_aggregates(&scope, 350).await;
    drop(second);
    other.stop();
    scope.drop_database().await;
}

/// Sequence 5: after an outage longer than the dedup window, a client retry that
/// arrived 30 s after the first attempt is still one click.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_retry_after_a_long_outage_is_one_click() {
    let scope = Scope::new("eo_long_lag", 1).await;
    let two_hours_ago = shared::now_ms() - 2 * 3600 * 1000;
    let at = |id: &str, ms: u64| -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(&event(id)).expect("json");
        v["received_at_ms"] = ms.into();
        v.to_string().into_bytes()
    };
    let retried = random_click_id();
    let others: Vec<String> = (0..60).map(|_| random_click_id()).collect();
    let mut messages: Vec<(String, Vec<u8>)> = vec![(retried.clone(), at(&retried, two_hours_ago))];
    for (i, id) in others.iter().enumerate() {
        messages.push((id.clone(), at(id, two_hours_ago + 500 * i as u64)));
    }
    // The retry: same click id, received 30 s after the first attempt.
    messages.push((retried.clone(), at(&retried, two_hours_ago + 30_000)));
    let refs: Vec<(Option<&str>, &[u8])> = messages
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(&scope.brokers, &scope.topic, &refs).await;
    let mut opts = scope.consumer_options();
    // Small plans: the first attempt and the retry are inserted separately.
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_ROWS".into(), "20".into()));
    let _consumer = ConsumerProc::start(&opts);
    let mut expected = others.clone();
    expected.push(retried);
    assert_exactly_reported(
        &scope,
        &expected,
        "a client retry 30 s after the first attempt, consumed 2 h later (dedup window 1 h)",
        "62 messages, 61 clicks",
        messages.len(),
    )
    .await;
    scope.drop_database().await;
}

/// Sequence 3 (the dead-letter part): a dead letter the broker will never take stops the
/// process with a clear message instead of wedging it; nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn an_unpublishable_dead_letter_stops_the_consumer_cleanly() {
    let scope = Scope::new("eo_dlq_missing", 1).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(50).await;
    produce_raw(&scope.brokers, &scope.topic, &[(Some("k"), b"not json")]).await;
    feeder.send(50).await;
    let mut opts = scope.consumer_options();
    opts.extra_env.extend([
        (
            "CONSUMER_DLQ_TOPIC".to_owned(),
            format!("{}_no_such_topic", scope.topic),
        ),
        ("CONSUMER_FLUSH_DEADLINE_MS".to_owned(), "5000".to_owned()),
        ("CONSUMER_INSERT_TIMEOUT_MS".to_owned(), "5000".to_owned()),
    ]);
    let mut stuck = ConsumerProc::start(&opts);
    let status = stuck.proc.exited(Duration::from_secs(60)).await;
    assert!(!status.success(), "exit status {status}");
    assert!(
        stuck.proc.log_text().contains("dead letter"),
        "{}",
        stuck.proc.log_text()
    );
    // With the dead-letter topic in place, everything arrives exactly once.
    let fixed = ConsumerProc::start(&scope.consumer_options());
    fixed.ready().await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "the dead-letter topic refuses a poison message (the consumer stops with a message), then is fixed",
        "100 valid events + 1 poison",
        feeder.sent.len() + 1,
    )
    .await;
    let dlq = read_topic(
        &scope.brokers,
        &format!("{}_dlq", scope.topic),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(dlq.len(), 1);
    scope.drop_database().await;
}

/// ClickHouse itself freezes (SIGSTOP) with inserts in flight and thaws (SIGCONT) after
/// the consumer's flush deadline passed: the frozen inserts complete late, beside the
/// consumer's retries of the same plans.
#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_frozen_mid_insert_then_thawed_writes_everything_once() {
    let private = PrivateClickHouse::start().await;
    let ch = ClickHouse::new(&private.url());
    let mut scope = Scope::new("eo_ch_frozen", 2).await;
    scope.ch = ch;
    let mut opts = scope.consumer_options();
    opts.clickhouse_url = private.url();
    opts.extra_env.extend([
        ("CONSUMER_FLUSH_DEADLINE_MS".to_owned(), "4000".to_owned()),
        ("CONSUMER_INSERT_TIMEOUT_MS".to_owned(), "3000".to_owned()),
        ("CONSUMER_BATCH_MAX_AGE_MS".to_owned(), "200".to_owned()),
        (
            "CONSUMER_RETRY_MAX_BACKOFF_MS".to_owned(),
            "1000".to_owned(),
        ),
    ]);
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(500).await;
    let consumer = ConsumerProc::start(&opts);
    scope.wait_rows(500, Duration::from_secs(60)).await;
    // Freeze the server while clicks keep coming, so inserts are caught in flight.
    for _ in 0..3 {
        let sending = feeder.send(300);
        tokio::time::sleep(Duration::from_millis(150)).await;
        private.proc.signal("STOP");
        sending.await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        private.proc.signal("CONT");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(consumer.metric("consumer_insert_errors_total").await >= 1.0);
    feeder.send(100).await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "ClickHouse frozen (SIGSTOP) for 6 s with inserts in flight, 3 times, then thawed",
        "1,500 events, 2 partitions",
        feeder.sent.len(),
    )
    .await;
    assert_aggregates(&scope, 1500).await;
}

/// Rolling upgrades: an event of the same major version with a field this consumer does
/// not know is written; an event of another major version goes to the dead-letter topic
/// with its own reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_minor_event_is_written_and_a_new_major_is_dead_lettered() {
    let scope = Scope::new("eo_versions", 1).await;
    let newer_id = random_click_id();
    let mut newer: Value = serde_json::from_slice(&event(&newer_id)).expect("json");
    newer["landing_host"] = "shop.example".into();
    let newer = newer.to_string();
    let major = r#"{"v":2,"click":{"id":"refclk_v2"}}"#;
    produce_raw(
        &scope.brokers,
        &scope.topic,
        &[
            (Some(newer_id.as_str()), newer.as_bytes()),
            (Some("k2"), major.as_bytes()),
        ],
    )
    .await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(20).await;
    let _consumer = ConsumerProc::start(&scope.consumer_options());
    let mut expected = feeder.sent.clone();
    expected.push(newer_id);
    assert_exactly(&scope, &expected).await;
    let dlq = read_topic(
        &scope.brokers,
        &format!("{}_dlq", scope.topic),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].headers.get("dlq_reason").map(String::as_str),
        Some("unsupported event version 2")
    );
    scope.drop_database().await;
}

/// A full buffer pauses fetching and a flush resumes it, many times over a backlog: no
/// message is skipped or written twice. At a pause librdkafka drops what it prefetched
/// and resumes at the message after the last one handed to the consumer, usually inside
/// a record batch; the broker must answer such a fetch from that offset (tansu's
/// `memory://` storage does not, see deploy/README.md's tansu section).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_buffer_pauses_fetching_and_skips_no_message() {
    let scope = Scope::new("eo_paused", 4).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    for _ in 0..6 {
        feeder.send(5000).await;
    }
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_ROWS".into(), "1000".into()));
    opts.extra_env
        .push(("CONSUMER_MAX_BUFFERED_ROWS".into(), "2000".into()));
    let consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "consumer buffer full (CONSUMER_MAX_BUFFERED_ROWS=2000): fetching paused and resumed",
        "30,000 events pre-filled",
        feeder.sent.len(),
    )
    .await;
    let pauses = consumer.metric("consumer_fetch_pauses_total").await;
    assert!(pauses >= 3.0, "fetching paused {pauses} times");
    scope.drop_database().await;
}

/// Plan groups: a member recorded one group for two partitions and may still insert it
/// whole (here a member that never comes back, its plan for the other partition at offsets
/// not written yet). The next owner of one partition holds only part of the group: it must
/// not insert its plan alone while the group's insert may land (it waits
/// `CONSUMER_DEDUP_TRUST_SECS`), and then only the rows not stored, which here are the rows
/// the group's late insert did store.
#[tokio::test(flavor = "multi_thread")]
async fn part_of_a_plan_group_waits_for_the_group_then_writes_only_what_is_missing() {
    use consumer::plan::{message_hash, PlanGroup, PlanRange};

    let scope = Scope::new("eo_group_split", 2).await;
    migrate(&scope).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    let first = feeder.send_to(0, 120).await;
    let later = feeder.send_to(1, 30).await;
    let hashes: Vec<(i64, consumer::plan::MessageHash)> = first
        .iter()
        .map(|(o, id, payload)| (*o, message_hash(Some(id.as_bytes()), payload)))
        .collect();
    let mine = PlanRange::over(0, hashes.iter().map(|(o, h)| (*o, h))).expect("plan");
    let elsewhere = PlanRange {
        partition: 1,
        lo: 1_000_000,
        hi: 1_000_009,
        digest: "0".repeat(32),
        head: "0".repeat(32),
    };
    let group = PlanGroup::of(&scope.topic, &[mine.clone(), elsewhere.clone()]).expect("group");
    let starts = format!(
        "[{}]",
        group
            .starts
            .iter()
            .map(|(p, lo)| format!("({p}, {lo})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let values: Vec<String> = [&mine, &elsewhere]
        .iter()
        .map(|r| {
            format!(
                "('{}', {}, {}, {}, '{}', '{}', 'ghost', now64(3), '{}', {starts})",
                scope.topic, r.partition, r.lo, r.hi, r.digest, r.head, group.id
            )
        })
        .collect();
    scope
        .ch
        .query(&format!(
            "INSERT INTO {}_plans (topic, partition, lo, hi, digest, head, member, planned_at, group_id, group_starts) VALUES {}",
            scope.table,
            values.join(", ")
        ))
        .await;

    let mut opts = scope.consumer_options();
    opts.extra_env.extend([
        ("CONSUMER_DEDUP_TRUST_SECS".to_owned(), "15".to_owned()),
        ("CONSUMER_BATCH_MAX_AGE_MS".to_owned(), "200".to_owned()),
    ]);
    let consumer = ConsumerProc::start(&opts);
    consumer.ready().await;
    // Partition 1 is not held up; partition 0 waits for the group.
    let count = |partition: u8| {
        let sql = format!(
            "SELECT count() FROM {} WHERE kafka_partition = {partition}",
            scope.table
        );
        let ch = &scope.ch;
        async move { ch.scalar(&sql).await }
    };
    eventually("partition 1 stored", Duration::from_secs(30), || async {
        (count(1).await == later.len() as u64).then_some(())
    })
    .await;
    eventually(
        "partition 0 waits for its group",
        Duration::from_secs(10),
        || async {
            (consumer.metric("consumer_plan_group_waits_total").await >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        count(0).await,
        0,
        "a plan of the group went in alone at once"
    );
    // The group's insert lands late, with some of partition 0's rows.
    scope
        .ch
        .query(&format!(
            "INSERT INTO {} (click_id, code, ip_hash, ua_hash, received_at, received_at_ms, kafka_topic, kafka_partition, kafka_offset) VALUES {}",
            scope.table,
            first[..40]
                .iter()
                .map(|(o, id, payload)| {
                    let event: Value = serde_json::from_slice(payload).expect("event");
                    let ms = event["received_at_ms"].as_u64().expect("received_at_ms");
                    format!(
                        "('{id}', 'GHOSTGROUP00', '', '', toDateTime({}), {ms}, '{}', 0, {o})",
                        ms / 1000,
                        scope.topic
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .await;
    eventually(
        "partition 0 stored after the wait",
        Duration::from_secs(60),
        || async { (count(0).await == first.len() as u64).then_some(()) },
    )
    .await;
    let skipped = consumer.metric("consumer_duplicates_skipped_total").await;
    assert_eq!(skipped, 40.0, "the rows the group stored are skipped");
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "part of a plan group, its group's insert landing late",
        "150 events, 2 partitions, a recorded group of another member",
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// While a slow insert is in flight, messages that arrive meanwhile grow older than the
/// batch age; the loop must wait for the flush, not spin on an age already past (it did:
/// a whole core, taken from ClickHouse, until the insert returned).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_insert_in_flight_does_not_make_the_consumer_spin() {
    let scope = Scope::new("eo_no_spin", 2).await;
    migrate(&scope).await;
    add_probe_view(&scope).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(50).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    scope.wait_rows(50, Duration::from_secs(60)).await;
    // Every insert now takes 6 s in the probe view.
    set_probe(&scope, 0, 6000).await;
    feeder.send(50).await;
    // The flush of those 50 is in flight (batch age 500 ms); 50 more arrive meanwhile
    // and are older than the batch age within the window measured below.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    feeder.send(50).await;
    // The window is only a test of waiting if an insert runs through all of it.
    let insert_running = || async {
        let sql = format!(
            "SELECT count() FROM system.processes WHERE query_kind = 'Insert' \
             AND current_database = '{}' FORMAT TSV",
            scope.database
        );
        scope.ch.scalar(&sql).await > 0
    };
    assert!(
        insert_running().await,
        "no insert in flight when the window opens"
    );
    let pid = consumer.proc.child.id();
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        insert_running().await,
        "no insert in flight when the window closes"
    );
    assert!(
        used < 0.5,
        "the consumer used {used:.2} CPU-s in 3 s while waiting for its insert"
    );
    set_probe(&scope, 0, 0).await;
    assert_exactly(&scope, &feeder.sent).await;
    scope.drop_database().await;
}

/// `CONSUMER_PLAN_GROUPS=off` (a rolling upgrade from consumers older than plan groups):
/// every plan is recorded and inserted alone, so an old member replaying it uses the same
/// token; with the default, a flush over several partitions is recorded as a group.
#[tokio::test(flavor = "multi_thread")]
async fn plan_groups_off_records_every_plan_alone() {
    for (groups, name) in [("off", "eo_groups_off"), ("on", "eo_groups_on")] {
        let scope = Scope::new(name, 4).await;
        let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
        feeder.send(400).await;
        let mut opts = scope.consumer_options();
        opts.extra_env
            .push(("CONSUMER_PLAN_GROUPS".into(), groups.into()));
        let _consumer = ConsumerProc::start(&opts);
        assert_exactly(&scope, &feeder.sent).await;
        let db = &scope.database;
        let (plans, grouped) = (
            scope
                .ch
                .scalar(&format!("SELECT count() FROM {db}.referral_clicks_plans"))
                .await,
            scope
                .ch
                .scalar(&format!(
                    "SELECT countIf(group_id != '') FROM {db}.referral_clicks_plans"
                ))
                .await,
        );
        assert!(plans >= 4, "{groups}: {plans} plans for 4 partitions");
        if groups == "off" {
            assert_eq!(grouped, 0, "plans recorded in a group with groups off");
        } else {
            assert!(
                grouped >= 2,
                "{grouped} of {plans} plans in a group with groups on"
            );
        }
        scope.drop_database().await;
    }
}

/// A click stamped an hour ahead (published by an instance whose clock runs fast) does not
/// make the partition forget the clicks before it: client retries of earlier clicks that
/// arrive after it are each stored once. (Measured against the newest stamp alone, the
/// retry window moved an hour on, and the retries were stored and charged twice.)
#[tokio::test(flavor = "multi_thread")]
async fn a_click_stamped_an_hour_ahead_does_not_make_retries_count_twice() {
    let scope = Scope::new("eo_skew", 1).await;
    let earlier: Vec<String> = (0..3).map(|_| random_click_id()).collect();
    let send = |ids: Vec<(String, Vec<u8>)>| {
        let scope = &scope;
        async move {
            let messages: Vec<(Option<&str>, &[u8])> = ids
                .iter()
                .map(|(id, e)| (Some(id.as_str()), e.as_slice()))
                .collect();
            produce_raw(&scope.brokers, &scope.topic, &messages).await;
        }
    };
    send(earlier.iter().map(|id| (id.clone(), event(id))).collect()).await;
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let _consumer = ConsumerProc::start(&opts);
    scope.wait_rows(3, Duration::from_secs(30)).await;

    let ahead = random_click_id();
    let mut fast: Value = serde_json::from_slice(&event(&ahead)).expect("json");
    fast["received_at_ms"] = (shared::now_ms() + 3_600_000).into();
    send(vec![(ahead.clone(), fast.to_string().into_bytes())]).await;
    scope.wait_rows(4, Duration::from_secs(30)).await;

    // The clients retry (ingest stamps a retry when it arrives), then one new click: once
    // it is stored, the retries before it in the partition have been read.
    let last = random_click_id();
    let mut retries: Vec<(String, Vec<u8>)> =
        earlier.iter().map(|id| (id.clone(), event(id))).collect();
    retries.push((last.clone(), event(&last)));
    send(retries).await;
    let sql = format!(
        "SELECT count() FROM {} WHERE click_id = '{last}'",
        scope.table
    );
    eventually("the last click stored", Duration::from_secs(30), || async {
        (scope.ch.scalar(&sql).await == 1).then_some(())
    })
    .await;
    assert_eq!(scope.ch.counts(&scope.table).await, (5, 5));
    scope.drop_database().await;
}

/// The other half of the clamp: a member that starts with a click stamped an hour ahead
/// first in hand reloads the retry window from the clamped stamp, not from an hour ahead,
/// so the retries after it are still recognized.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_a_click_stamped_ahead_in_hand_still_reloads_the_retry_window() {
    let scope = Scope::new("eo_skew_reload", 1).await;
    let earlier: Vec<String> = (0..3).map(|_| random_click_id()).collect();
    let send = |ids: Vec<(String, Vec<u8>)>| {
        let scope = &scope;
        async move {
            let messages: Vec<(Option<&str>, &[u8])> = ids
                .iter()
                .map(|(id, e)| (Some(id.as_str()), e.as_slice()))
                .collect();
            produce_raw(&scope.brokers, &scope.topic, &messages).await;
        }
    };
    send(earlier.iter().map(|id| (id.clone(), event(id))).collect()).await;
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let mut first = ConsumerProc::start(&opts);
    scope.wait_rows(3, Duration::from_secs(30)).await;
    let exited = first.proc.terminate(Duration::from_secs(30));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");

    // While no member runs: a click stamped an hour ahead, then the clients' retries and
    // one new click. The next member's first row in hand is the one from the future.
    let ahead = random_click_id();
    let mut fast: Value = serde_json::from_slice(&event(&ahead)).expect("json");
    fast["received_at_ms"] = (shared::now_ms() + 3_600_000).into();
    let last = random_click_id();
    let mut messages = vec![(ahead.clone(), fast.to_string().into_bytes())];
    messages.extend(earlier.iter().map(|id| (id.clone(), event(id))));
    messages.push((last.clone(), event(&last)));
    send(messages).await;
    let _next = ConsumerProc::start(&opts);
    let sql = format!(
        "SELECT count() FROM {} WHERE click_id = '{last}'",
        scope.table
    );
    eventually("the last click stored", Duration::from_secs(30), || async {
        (scope.ch.scalar(&sql).await == 1).then_some(())
    })
    .await;
    assert_eq!(scope.ch.counts(&scope.table).await, (5, 5));
    scope.drop_database().await;
}
