//! Conversions hold the clicks' guarantees, against the real broker, ClickHouse and
//! binaries: complete (every stored conversion attributed, every click linked, whatever
//! fails between the store and the attribution), once across partitions, attribution
//! rows written in proportion to the change, customer hashes that survive a rotation of
//! the visitor hash key, and a database of an earlier release upgraded to the current
//! schema.

use std::time::Duration;

use e2e::*;
use serde_json::json;

fn lead(event: &str, customer: &str, click: Option<&str>) -> serde_json::Value {
    let mut body = json!({"type": "lead", "event_id": event, "customer_id": customer});
    if let Some(c) = click {
        body["click_id"] = json!(c);
    }
    body
}

fn sale(event: &str, customer: &str, amount: u64) -> serde_json::Value {
    json!({"type": "sale", "event_id": event, "customer_id": customer,
           "amount": amount, "currency": "EUR"})
}

/// Makes the attribution table unavailable (as an operator's mistake or a failing disk
/// would), and gives it back.
async fn attribution_table(scope: &Scope, available: bool) {
    let db = &scope.database;
    let (from, to) = if available {
        ("ca_off", "conversion_attribution")
    } else {
        ("conversion_attribution", "ca_off")
    };
    scope
        .ch
        .query(&format!("RENAME TABLE {db}.{from} TO {db}.{to}"))
        .await;
}

async fn stored(scope: &Scope, table: &str, condition: &str) -> u64 {
    scope
        .ch
        .scalar(&format!(
            "SELECT count() FROM {}.{table} WHERE {condition}",
            scope.database
        ))
        .await
}

/// Waits until the consumer has failed a flush (the settle step after the store).
async fn a_flush_failed(consumer: &ConsumerProc) {
    eventually("a failed flush", Duration::from_secs(30), || async {
        (consumer.metric("consumer_insert_errors_total").await > 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_stored_before_a_crash_is_attributed_by_the_next_owner() {
    let scope = Scope::new("conv_complete", 2).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    let mut consumer = ConsumerProc::start(&scope.consumer_options());
    ingest.ready().await;
    consumer.ready().await;
    let client = http();
    let (click, status) = post_fresh_click(&client, &ingest.url("/api/v1/referrals/click")).await;
    assert_eq!(status, 200);
    scope.wait_rows(1, Duration::from_secs(30)).await;

    // The lead is stored, its attribution cannot be written, the consumer dies.
    attribution_table(&scope, false).await;
    let a = post_conversion(&client, &ingest, &secret, &lead("L1", "ann", Some(&click))).await;
    assert_eq!(a.status, 200, "{}", a.text);
    eventually("L1 stored", Duration::from_secs(30), || async {
        (stored(&scope, "conversions", "event_id = 'L1'").await == 1).then_some(())
    })
    .await;
    a_flush_failed(&consumer).await;
    consumer.proc.kill();
    attribution_table(&scope, true).await;
    assert_eq!(
        stored(&scope, "conversion_attribution", "event_id = 'L1'").await,
        0,
        "attributed before the crash: the test shows nothing"
    );

    // The next owner replays the plan: its row is stored already, and is attributed.
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    wait_attribution(&scope, "L1", ("click", &click)).await;
    assert_eq!(stored(&scope, "conversions", "1").await, 1);
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_stored_before_a_crash_is_linked_to_its_earlier_conversion() {
    let scope = Scope::new("conv_click_complete", 2).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    let mut consumer = ConsumerProc::start(&scope.consumer_options());
    ingest.ready().await;
    consumer.ready().await;
    let client = http();
    // The conversion first: its click is still on its way.
    let a = post_conversion(
        &client,
        &ingest,
        &secret,
        &lead("L1", "ann", Some("refclk_late")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    wait_attribution(&scope, "L1", ("none", "")).await;

    // The click is stored, attributing its conversion fails, the consumer dies.
    attribution_table(&scope, false).await;
    let at = shared::now_ms() - 60_000;
    produce_raw(
        &scope.brokers,
        &scope.topic,
        &[(
            Some("refclk_late"),
            &click_event("refclk_late", DOCS_CODE, &scope.account, at),
        )],
    )
    .await;
    scope.wait_rows(1, Duration::from_secs(30)).await;
    a_flush_failed(&consumer).await;
    consumer.proc.kill();
    attribution_table(&scope, true).await;
    assert_eq!(
        attributions(&scope, &scope.account).await["L1"].0,
        "none",
        "linked before the crash: the test shows nothing"
    );

    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    wait_attribution(&scope, "L1", ("click", "refclk_late")).await;
    assert_eq!(scope.wait_rows(1, Duration::from_secs(1)).await, (1, 1));
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_conversion_without_attribution_shows_in_the_gauge() {
    let scope = Scope::new("conv_gauge", 1).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    let gauge = || async {
        metric_value(
            &consumer.url("/metrics"),
            "consumer_conversions_unattributed",
        )
        .await
    };
    assert_eq!(gauge().await, 0.0);
    // A conversion stored two minutes ago by something that never attributed it (what a
    // lost settle step would leave).
    let db = &scope.database;
    scope
        .ch
        .query(&format!(
            "INSERT INTO {db}.conversions (conversion_key, account_id, type, event_id, customer_hash, \
             key_id, click_id, amount, currency, occurred_at_ms, received_at, received_at_ms, \
             api_key_id, kafka_topic, kafka_partition, kafka_offset) VALUES \
             ('a/lead/lost', 'a', 'lead', 'lost', '{}', 'e2e1', '', 0, '', 0, now(), 0, 'key_x', 't', 0, 0)",
            "x".repeat(32)
        ))
        .await;
    scope
        .ch
        .query(&format!(
            "INSERT INTO {db}.conversions_stored VALUES (now() - INTERVAL 2 MINUTE, 'a/lead/lost')"
        ))
        .await;
    eventually("the gauge counts it", Duration::from_secs(40), || async {
        (gauge().await == 1.0).then_some(())
    })
    .await;
    scope.drop_database().await;
}

/// A sale event as ingest publishes it.
fn sale_event(account: &str, event_id: &str, amount: u64) -> shared::conversion::ConversionEvent {
    let now = shared::now_ms();
    shared::conversion::ConversionEvent {
        v: 1,
        kind: shared::conversion::ConversionType::Sale,
        event_id: event_id.into(),
        customer_hash: format!("{:064x}", rand::random::<u128>()),
        key_id: "e2e1".into(),
        click_id: String::new(),
        amount,
        currency: "EUR".into(),
        occurred_at_ms: now,
        received_at_ms: now,
        account_id: account.to_owned(),
        api_key_id: "key_0123456789abcdef".into(),
    }
}

/// Writes the same record (key and value) to each of `partitions`: what a writer with
/// another partitioner, or partitions added to the topic, do.
async fn in_partitions(
    scope: &Scope,
    event: &shared::conversion::ConversionEvent,
    partitions: &[i32],
) {
    let (key, value) = (event.dedup_id(), event.encode());
    let placed: Vec<Placed<'_>> = partitions
        .iter()
        .map(|&partition| Placed {
            partition,
            timestamp_ms: i64::try_from(shared::now_ms()).unwrap_or(i64::MAX),
            key: &key,
            value: Some(&value),
        })
        .collect();
    produce_placed(&scope.brokers, &scope.registry.conversions, &placed).await;
}

/// (rows, revenue, attributed rows, credits) of one event id.
async fn counted(scope: &Scope, event_id: &str) -> (u64, u64, u64, u64) {
    let db = &scope.database;
    let q = |sql: String| async move { scope.ch.scalar(&sql).await };
    (
        q(format!("SELECT count() FROM {db}.conversions WHERE event_id = '{event_id}'")).await,
        q(format!("SELECT sum(amount) FROM {db}.conversions_attributed WHERE event_id = '{event_id}'")).await,
        q(format!("SELECT count() FROM {db}.conversions_attributed WHERE event_id = '{event_id}'")).await,
        q(format!(
            "SELECT sum(conversion_credits) FROM {db}.account_all_credits_daily WHERE account_id = '{}'",
            scope.account
        ))
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversion_in_two_partitions_is_counted_once() {
    // The scope's conversions topic has 2 partitions.
    let scope = Scope::new("conv_partitions", 2).await;
    // Until the members have read `messages` conversions in all and hold none unwritten.
    let drained = |members: Vec<&ConsumerProc>, messages: f64| {
        let urls: Vec<String> = members.iter().map(|c| c.url("/metrics")).collect();
        async move {
            let what = format!("{messages} conversions read and written");
            eventually(&what, Duration::from_secs(60), || {
                let urls = urls.clone();
                async move {
                    let (mut read, mut held) = (0.0, 0.0);
                    for url in &urls {
                        read += metric_or_zero(url, "consumer_messages_consumed_total", "").await;
                        held +=
                            metric_or_zero(url, "consumer_buffered_rows", "stream=\"conversions\"")
                                .await;
                    }
                    (read >= messages && held == 0.0).then_some(())
                }
            })
            .await;
            // The last flush's attribution is part of it (see settle.rs).
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };

    // 1. Both copies unstored, read by one member in one flush.
    let one = sale_event(&scope.account, "inv_one_flush", 4900);
    in_partitions(&scope, &one, &[0, 1]).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    drained(vec![&consumer], 2.0).await;
    assert_eq!(counted(&scope, "inv_one_flush").await, (1, 4900, 1, 1));

    // 2. Days apart: stored, the consumer restarted (it forgets its retry window), then
    //    the same record arrives in the other partition.
    let later = sale_event(&scope.account, "inv_later", 1200);
    in_partitions(&scope, &later, &[0]).await;
    drained(vec![&consumer], 3.0).await;
    assert_eq!(counted(&scope, "inv_later").await.0, 1);
    drop(consumer);
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    in_partitions(&scope, &later, &[1]).await;
    drained(vec![&consumer], 1.0).await;
    assert_eq!(counted(&scope, "inv_later").await, (1, 1200, 1, 2));
    drop(consumer);

    // 3. Two members at once, each holding one of the copies.
    let twice = sale_event(&scope.account, "inv_two_members", 700);
    let a = ConsumerProc::start(&scope.consumer_options());
    let b = ConsumerProc::start(&scope.consumer_options());
    a.ready().await;
    b.ready().await;
    in_partitions(&scope, &twice, &[1, 0]).await;
    drained(vec![&a, &b], 2.0).await;
    assert_eq!(counted(&scope, "inv_two_members").await, (1, 700, 1, 3));
    let billed = scope
        .ch
        .scalar(&format!(
            "SELECT sum(conversion_credits) FROM {}.account_billing_monthly WHERE account_id = '{}'",
            scope.database, scope.account
        ))
        .await;
    assert_eq!(billed, 3, "one credit per conversion on the bill");
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_new_conversion_does_not_rewrite_the_earlier_ones() {
    const K: u64 = 20;
    let scope = Scope::new("conv_rewrites", 1).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    let consumer = ConsumerProc::start(&scope.consumer_options());
    ingest.ready().await;
    consumer.ready().await;
    let db = &scope.database;
    scope
        .ch
        .query(&format!("SYSTEM STOP MERGES {db}.conversion_attribution"))
        .await;
    let client = http();
    let (click, _) = post_fresh_click(&client, &ingest.url("/api/v1/referrals/click")).await;
    scope.wait_rows(1, Duration::from_secs(30)).await;
    // One customer: a lead by its own click, then sales, each in a flush of its own.
    for i in 0..K {
        let body = if i == 0 {
            lead("L0", "ann@example.com", Some(&click))
        } else {
            sale(&format!("S{i}"), "ann@example.com", 100)
        };
        let a = post_conversion(&client, &ingest, &secret, &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
        eventually(
            "the conversion attributed",
            Duration::from_secs(30),
            || async {
                (scope
                    .ch
                    .scalar(&format!(
                        "SELECT uniqExact(conversion_key) FROM {db}.conversion_attribution"
                    ))
                    .await
                    == i + 1)
                    .then_some(())
            },
        )
        .await;
    }
    let written = scope
        .ch
        .scalar(&format!("SELECT count() FROM {db}.conversion_attribution"))
        .await;
    println!("{K} conversions of one customer in {K} flushes: {written} attribution rows written");
    assert!(
        written <= 2 * K,
        "{written} rows written for {K} conversions"
    );
    let got = attributions(&scope, &scope.account).await;
    assert_eq!(got["L0"], ("click".to_owned(), click.clone()));
    assert!(
        got.iter()
            .filter(|(e, _)| e.starts_with('S'))
            .all(|(_, a)| *a == ("customer".to_owned(), click.clone())),
        "{got:?}"
    );
    scope
        .ch
        .query(&format!("SYSTEM START MERGES {db}.conversion_attribution"))
        .await;
    scope.drop_database().await;
}

const ROTATED_KEY: &str = "e2e-rotated-key-e2e-rotated-key-e2e-rotated";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_hashes_survive_a_key_rotation_and_stay_in_their_account() {
    let scope = Scope::new("conv_rotation", 1).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let other = unique("acct_other");
    scope.set_account(&other, &[]).await;
    let (_, other_secret) = scope.create_key(&other).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    let before = Ingest::start(&scope.ingest_options());
    before.ready().await;
    consumer.ready().await;
    let client = http();
    let (click, _) = post_fresh_click(&client, &before.url("/api/v1/referrals/click")).await;
    scope.wait_rows(1, Duration::from_secs(30)).await;
    let a = post_conversion(
        &client,
        &before,
        &secret,
        &lead("L1", "ann@example.com", Some(&click)),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    // The same e-mail in another account; a customer id that is an IP address's text.
    let b = post_conversion(
        &client,
        &before,
        &other_secret,
        &lead("L1", "ann@example.com", None),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.text);
    let c = post_conversion(&client, &before, &secret, &lead("L_ip", "127.0.0.1", None)).await;
    assert_eq!(c.status, 200, "{}", c.text);
    wait_attribution(&scope, "L1", ("click", &click)).await;
    drop(before);

    // The rotation (deploy/README.md): the visitor hash key changes, the customer hash key
    // keeps the old key's value.
    let mut rotated = scope.ingest_options();
    rotated.extra_env = vec![
        ("INGEST_HASH_KEY".into(), ROTATED_KEY.into()),
        ("INGEST_HASH_KEY_ID".into(), "e2e2".into()),
        ("INGEST_CUSTOMER_HASH_KEY".into(), HASH_KEY.into()),
    ];
    let after = Ingest::start(&rotated);
    after.ready().await;
    let s = post_conversion(
        &client,
        &after,
        &secret,
        &sale("S1", "ann@example.com", 4900),
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.text);
    wait_attribution(&scope, "S1", ("customer", &click)).await;
    drop(after);
    // Without the customer key the rotation would have split the customer in two: the
    // same sale through such an instance is attributed to no one.
    let mut careless = scope.ingest_options();
    careless.extra_env = vec![
        ("INGEST_HASH_KEY".into(), ROTATED_KEY.into()),
        ("INGEST_HASH_KEY_ID".into(), "e2e2".into()),
    ];
    let careless = Ingest::start(&careless);
    careless.ready().await;
    let s = post_conversion(
        &client,
        &careless,
        &secret,
        &sale("S2", "ann@example.com", 4900),
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.text);
    wait_attribution(&scope, "S2", ("none", "")).await;

    let db = &scope.database;
    let hashes = scope
        .ch
        .query(&format!(
            "SELECT uniqExact(customer_hash) FROM {db}.conversions WHERE event_id = 'L1' FORMAT TSV"
        ))
        .await;
    assert_eq!(hashes.trim(), "2", "one e-mail in two accounts: two hashes");
    let same_as_ip = scope
        .ch
        .scalar(&format!(
            "SELECT count() FROM {db}.conversions WHERE event_id = 'L_ip' \
             AND customer_hash IN (SELECT ip_hash FROM {db}.referral_clicks)"
        ))
        .await;
    assert_eq!(
        same_as_ip, 0,
        "a customer id equal to the client's IP is not its ip_hash"
    );
    scope.drop_database().await;
}
