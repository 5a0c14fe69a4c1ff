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
    assert_exactly(scope, expected).await;
    let (rows, uniq) = scope.ch.counts(&scope.table).await;
    report(&FaultRow {
        fault,
        load,
        sent,
        accepted: expected.len(),
        rows,
        duplicates: rows - uniq,
        lost: expected.len() as u64 - uniq.min(expected.len() as u64),
    });
}

async fn assert_exactly(scope: &Scope, expected: &[String]) {
    let n = expected.len() as u64;
    let (count, uniq) = scope.wait_rows(n, Duration::from_secs(90)).await;
    // Give stragglers (a duplicate insert would come late) a moment before the final count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (count2, uniq2) = scope.ch.counts(&scope.table).await;
    assert_eq!((count, uniq), (count2, uniq2), "rows kept arriving");
    assert_eq!(count, n, "count() = {count}, expected {n}");
    assert_eq!(uniq, n, "uniqExact(click_id) = {uniq}, expected {n}");
    let stored: HashSet<String> = scope
        .ch
        .query(&format!("SELECT click_id FROM {} FORMAT TSV", scope.table))
        .await
        .lines()
        .map(str::to_owned)
        .collect();
    let missing = expected.iter().filter(|id| !stored.contains(*id)).count();
    assert_eq!(missing, 0);
}

fn fast_batches(opts: &mut ConsumerOptions) {
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_ROWS".into(), "300".into()));
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "200".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_repeatedly_loses_and_duplicates_nothing() {
    let scope = Scope::new("eo_sigkill", 4).await;
    let mut opts = scope.consumer_options();
    fast_batches(&mut opts);
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(3000).await;
    let mut consumer = ConsumerProc::start(&opts);
    // Each soak minute adds six kill/restart rounds.
    let rounds = 5 + soak_secs() / 10;
    for round in 0..rounds {
        feeder.send(1500).await;
        // Let it get into the middle of the stream, then kill it without warning.
        tokio::time::sleep(Duration::from_millis(700 + 150 * (round % 8))).await;
        consumer.proc.kill();
        consumer = ConsumerProc::start(&opts);
    }
    consumer.ready().await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "consumer SIGKILL mid-batch, 5 times",
        "10,500 events produced while killing",
        feeder.sent.len(),
    )
    .await;
    scope.drop_database().await;
}

/// A crash after the insert and before the commit, made deterministic: rows for offsets
/// that were never committed are already in ClickHouse when the consumer starts.
#[tokio::test(flavor = "multi_thread")]
async fn rows_stored_but_not_committed_are_not_written_again() {
    let scope = Scope::new("eo_uncommitted", 1).await;
    let mut feeder = Feeder::new(&scope.brokers, &scope.topic);
    feeder.send(200).await;

    // A first consumer that writes everything but never commits: we kill it once the
    // rows are in, before its commit could matter, and then wipe the group's offsets by
    // using a new group for the second consumer.
    let mut opts = scope.consumer_options();
    opts.extra_env
        .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "100".into()));
    let mut first = ConsumerProc::start(&opts);
    scope.wait_rows(200, Duration::from_secs(30)).await;
    first.proc.kill();

    opts.group = format!("{}_fresh", opts.group);
    let second = ConsumerProc::start(&opts);
    second.ready().await;
    feeder.send(50).await;
    assert_exactly_reported(
        &scope,
        &feeder.sent,
        "crash after insert, before commit (rows stored, offsets not committed)",
        "250 events",
        feeder.sent.len(),
    )
    .await;
    let skipped = eventually("skip metric", Duration::from_secs(10), || async {
        let v = second.metric("consumer_duplicates_skipped_total").await;
        (v >= 200.0).then_some(v)
    })
    .await;
    assert_eq!(skipped, 200.0);
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_share_partitions_through_join_and_leave() {
    let scope = Scope::new("eo_group", 4).await;
    let mut opts = scope.consumer_options();
    fast_batches(&mut opts);
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
    let ch_addr: std::net::SocketAddr = clickhouse_url()
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let proxy = CutProxy::start(ch_addr).await;
    let mut opts = scope.consumer_options();
    fast_batches(&mut opts);
    opts.clickhouse_url = proxy.url();
    opts.extra_env
        .push(("CONSUMER_RETRY_MAX_BACKOFF_MS".into(), "1000".into()));
    opts.extra_env
        .push(("CONSUMER_INSERT_TIMEOUT_MS".into(), "3000".into()));
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
    fast_batches(&mut opts);
    let consumer = ConsumerProc::start(&opts);
    let ingest = Ingest::start(&IngestOptions {
        extra_env: vec![
            ("INGEST_RATE_LIMIT_BURST".into(), "1000000".into()),
            ("INGEST_RATE_LIMIT_PER_MINUTE".into(), "1000000".into()),
        ],
        ..scope.ingest_options()
    });
    ingest.ready().await;
    consumer.ready().await;

    let url = ingest.url("/api/v1/referrals/click");
    let load = tokio::spawn(async move {
        let c = http();
        let mut accepted = Vec::new();
        let mut refused = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(8 + soak_secs());
        while std::time::Instant::now() < deadline {
            let (id, status) = post_fresh_click(&c, &url).await;
            match status {
                200 => accepted.push(id),
                503 => refused += 1,
                s => panic!("unexpected status {s}"),
            }
        }
        (accepted, refused)
    });
    // Restart the broker every few seconds while the load lasts.
    let restarts = 1 + soak_secs() / 5;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker.restart().await;
    }
    let (accepted, refused) = load.await.expect("load");
    assert!(
        accepted.len() > 50,
        "{} accepted, {refused} refused",
        accepted.len()
    );
    assert_exactly_reported(
        &scope,
        &accepted,
        "broker restart during HTTP load",
        "8 s of sequential posts",
        accepted.len() + refused,
    )
    .await;
    scope.drop_database().await;
}
