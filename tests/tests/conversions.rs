//! Conversions end to end, against the real broker, ClickHouse and binaries: the endpoint's
//! keys, validation and limit; exactly-once storage with late repeats; attribution by
//! the three rules whatever order clicks and conversions arrive in; credits.

use std::time::{Duration, Instant};

use e2e::*;
use serde_json::json;

/// A lead of `customer`, naming `click` when given.
fn lead(event: &str, customer: &str, click: Option<&str>) -> serde_json::Value {
    let mut body = json!({"type": "lead", "event_id": event, "customer_id": customer});
    if let Some(c) = click {
        body["click_id"] = json!(c);
    }
    body
}

fn sale(event: &str, customer: &str, amount: u64, click: Option<&str>) -> serde_json::Value {
    let mut body = json!({"type": "sale", "event_id": event, "customer_id": customer,
                          "amount": amount, "currency": "EUR"});
    if let Some(c) = click {
        body["click_id"] = json!(c);
    }
    body
}

fn fields(answer: &Answer) -> Vec<String> {
    answer.json["data"]["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_checks_keys_fields_and_rate_and_publishes_once_acknowledged() {
    let scope = Scope::new("conv_api", 1).await;
    let (key_id, secret) = scope.create_key(&scope.account).await;
    let (revoked_id, revoked) = scope.create_key(&scope.account).await;
    let suspended_account = unique("acct_susp");
    scope.set_account(&suspended_account, &[]).await;
    let (_, suspended) = scope.create_key(&suspended_account).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_KEY_RATE_PER_MINUTE".into(), "60".into()),
        ("INGEST_KEY_RATE_BURST".into(), "40".into()),
    ];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    let client = http();

    // Accepted: a lead and a sale, answered after the broker's acknowledgement.
    let a = post_conversion(
        &client,
        &ingest,
        &secret,
        &lead("signup_1", "ann@example.com", None),
    )
    .await;
    assert_eq!(
        (a.status, &a.json),
        (
            200,
            &json!({"code": 200, "msg": "ok", "data": {"type": "lead", "event_id": "signup_1"}})
        )
    );
    let s = post_conversion(
        &client,
        &ingest,
        &secret,
        &sale("inv_1", "ann@example.com", 4200, Some("refclk_abc")),
    )
    .await;
    assert_eq!(s.status, 200, "{}", s.text);
    // The whole topic: each accepted conversion published once, nothing else.
    let published = read_whole_topic(
        &scope.brokers,
        &scope.registry.conversions,
        Duration::from_secs(10),
    );
    let mut keys: Vec<String> = published
        .iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            format!("{}/lead/signup_1", scope.account),
            format!("{}/sale/inv_1", scope.account)
        ]
    );
    for r in &published {
        let text = String::from_utf8_lossy(&r.payload);
        assert!(
            !text.contains("ann@example.com"),
            "raw customer id published: {text}"
        );
        let (event, _) = shared::conversion::ConversionEvent::decode(&r.payload).expect("an event");
        assert_eq!(
            (event.account_id.as_str(), event.api_key_id.as_str()),
            (scope.account.as_str(), key_id.as_str())
        );
    }

    // Every 401 is the same answer, naming no account.
    scope
        .consumer_command(&["keys", "revoke", &revoked_id], &test_catalogue())
        .await;
    scope
        .set_account(&suspended_account, &["--status", "suspended"])
        .await;
    let unknown = format!("rk_0123456789abcdef_{}", "A".repeat(32));
    let body = lead("e1", "c1", None).to_string();
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("another scheme", Some(format!("Basic {secret}"))),
        ("no scheme", Some(secret.clone())),
        ("malformed", Some("Bearer rk_nothing".into())),
        ("unknown", Some(format!("Bearer {unknown}"))),
        (
            "wrong secret of a real key",
            Some(format!("Bearer {}AAAA", &secret[..secret.len() - 4])),
        ),
        ("revoked", Some(format!("Bearer {revoked}"))),
        ("suspended account", Some(format!("Bearer {suspended}"))),
    ];
    let mut answers = Vec::new();
    for (what, auth) in &cases {
        // Revocation and suspension take effect within 2 s.
        let started = Instant::now();
        let answer = loop {
            let answer = post_conversion_raw(&client, &ingest, auth.as_deref(), &body).await;
            if answer.status == 401 || started.elapsed() > Duration::from_secs(2) {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(answer.status, 401, "{what}: {}", answer.text);
        assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"), "{what}");
        assert!(!answer.text.contains("acct"), "{what}: {}", answer.text);
        answers.push(answer.text);
    }
    assert!(
        answers.iter().all(|t| *t == answers[0]),
        "401 answers differ: {answers:?}"
    );
    assert_eq!(
        answers[0],
        r#"{"code":401,"msg":"unauthorized","data":null}"#
    );

    // The validation table, field by field: every bad field listed.
    let table: Vec<(serde_json::Value, Vec<&str>)> = vec![
        (json!({}), vec!["type", "event_id", "customer_id"]),
        (
            json!({"type": "refund", "event_id": "e", "customer_id": "c"}),
            vec!["type"],
        ),
        (
            json!({"type": "lead", "event_id": "has space", "customer_id": "c"}),
            vec!["event_id"],
        ),
        (
            json!({"type": "lead", "event_id": "x".repeat(129), "customer_id": "c"}),
            vec!["event_id"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "a/b"}),
            vec!["customer_id"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "click_id": "nope"}),
            vec!["click_id"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "amount": 5}),
            vec!["amount"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "currency": "EUR"}),
            vec!["currency"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c"}),
            vec!["amount", "currency"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c", "amount": -1, "currency": "EUR"}),
            vec!["amount"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c", "amount": 1.5, "currency": "EUR"}),
            vec!["amount"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c", "amount": 1_000_000_000_001u64, "currency": "EUR"}),
            vec!["amount"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c", "amount": 1, "currency": "EURO"}),
            vec!["currency"],
        ),
        (
            json!({"type": "sale", "event_id": "e", "customer_id": "c", "amount": 1, "currency": "ABC"}),
            vec!["currency"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "occurred_at": "yesterday"}),
            vec!["occurred_at"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "occurred_at": "2099-01-01T00:00:00Z"}),
            vec!["occurred_at"],
        ),
        (
            json!({"type": "lead", "event_id": "e", "customer_id": "c", "occurred_at": "2020-01-01T00:00:00Z"}),
            vec!["occurred_at"],
        ),
        (
            json!({"type": 1, "event_id": ["e"], "customer_id": {"c": 1}}),
            vec!["type", "event_id", "customer_id"],
        ),
    ];
    for (body, expected) in &table {
        let answer = post_conversion(&client, &ingest, &secret, body).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.text);
        assert_eq!(answer.json["msg"], "invalid params");
        assert_eq!(fields(&answer), *expected, "{body}");
        assert!(
            !answer.text.contains("refund") && !answer.text.contains("nope"),
            "{}",
            answer.text
        );
    }
    let not_json =
        post_conversion_raw(&client, &ingest, Some(&format!("Bearer {secret}")), "{").await;
    assert_eq!(
        (not_json.status, fields(&not_json)),
        (400, vec!["body".to_owned()])
    );
    // Accepted with every optional field, lower-case currency normalized.
    let full = json!({"type": "sale", "event_id": "inv:2024-09.7", "customer_id": "ann+1@example.com",
                      "click_id": "refclk_x", "amount": 0, "currency": "usd",
                      "occurred_at": "2026-01-01T00:00:00+01:00", "unknown": true});
    let at_full = post_conversion(&client, &ingest, &secret, &full).await;
    assert_eq!(at_full.status, 200, "{}", at_full.text);
    let full_key = format!("{}/sale/inv:2024-09.7", scope.account);
    let record = read_whole_topic(
        &scope.brokers,
        &scope.registry.conversions,
        Duration::from_secs(10),
    )
    .into_iter()
    .find(|r| r.key == full_key.as_bytes())
    .expect("the sale published");
    let (event, _) =
        shared::conversion::ConversionEvent::decode(&record.payload).expect("an event");
    assert_eq!(
        (
            event.currency.as_str(),
            event.occurred_at_ms,
            event.click_id.as_str()
        ),
        ("USD", 1_767_222_000_000, "refclk_x")
    );

    // The per-key limit (60 a minute, burst 40 here): a 429 naming `key_rate`.
    let mut limited = None;
    for i in 0..60 {
        let answer = post_conversion(
            &client,
            &ingest,
            &secret,
            &lead(&format!("burst_{i}"), "c", None),
        )
        .await;
        if answer.status == 429 {
            limited = Some(answer);
            break;
        }
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let limited = limited.expect("a 429 within 60 conversions");
    assert_eq!(limited.json["data"], json!({"limit": "key_rate"}));
    assert!(limited.retry_after.is_some());
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_on_every_instance_within_two_seconds() {
    let scope = Scope::new("conv_revoke", 1).await;
    let (key_id, secret) = scope.create_key(&scope.account).await;
    let opts = scope.ingest_options();
    let instances = [Ingest::start(&opts), Ingest::start(&opts)];
    for i in &instances {
        i.ready().await;
    }
    let client = http();
    for i in &instances {
        let a = post_conversion(&client, i, &secret, &lead("before", "c", None)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let (code, out) = scope
        .consumer_command(&["keys", "revoke", &key_id], &test_catalogue())
        .await;
    assert_eq!(code, 0, "{out}");
    // The command returns once the broker acknowledged the revocation.
    let revoked_at = Instant::now();
    for i in &instances {
        loop {
            let a = post_conversion(&client, i, &secret, &lead("after", "c", None)).await;
            if a.status == 401 {
                break;
            }
            assert_eq!(a.status, 200, "{}", a.text);
            assert!(
                revoked_at.elapsed() < Duration::from_secs(2),
                "still accepted {:?} after the revocation",
                revoked_at.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "revocation in force on both instances after {:?}",
        revoked_at.elapsed()
    );
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_land_once_and_are_attributed_by_the_three_rules_in_any_order() {
    let scope = Scope::new("conv_attr", 2).await;
    let other_account = unique("acct_other");
    let other_code = "B2B2B2B2B2B2";
    scope
        .registry
        .set_account(&scope.brokers, &other_account, TEST_PLAN, true, true)
        .await;
    scope
        .registry
        .set_codes(&scope.brokers, &other_account, &[other_code], true)
        .await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    let mut consumer = ConsumerProc::start(&scope.consumer_options());
    ingest.ready().await;
    consumer.ready().await;
    let client = http();
    let click_url = ingest.url("/api/v1/referrals/click");
    let conv = |body: serde_json::Value| {
        let (client, ingest, secret) = (&client, &ingest, &secret);
        async move {
            let a = post_conversion(client, ingest, secret, &body).await;
            assert_eq!(a.status, 200, "{body}: {}", a.text);
        }
    };
    let day_ms = 86_400_000;
    let now = shared::now_ms();

    // Rule 1: the conversion's own click. Rule 2: the customer's later sale inherits it.
    let (c1, status) = post_fresh_click(&client, &click_url).await;
    assert_eq!(status, 200);
    scope.wait_rows(1, Duration::from_secs(30)).await;
    conv(lead("L1", "customer_x", Some(&c1))).await;
    conv(sale("S1", "customer_x", 4200, None)).await;
    // A click of another account attributes nothing.
    let (status, _) = post_click(
        &client,
        &click_url,
        &json!({"code": other_code, "click_id": "refclk_other_account"}),
    )
    .await;
    assert_eq!(status, 200);
    scope.wait_rows(2, Duration::from_secs(30)).await;
    conv(lead("L3", "customer_z", Some("refclk_other_account"))).await;
    // A click three days old: inside the default window of 90 days.
    produce_raw(
        &scope.brokers,
        &scope.topic,
        &[(
            Some("refclk_three_days"),
            &click_event(
                "refclk_three_days",
                DOCS_CODE,
                &scope.account,
                now - 3 * day_ms,
            ),
        )],
    )
    .await;
    scope.wait_rows(3, Duration::from_secs(30)).await;
    conv(lead("L4", "customer_w", Some("refclk_three_days"))).await;
    // A conversion stored before its click reaches ClickHouse (the click was accepted a
    // minute before the conversion, and delayed on its way).
    conv(lead("L2", "customer_y", Some("refclk_late"))).await;

    wait_attribution(&scope, "L1", ("click", &c1)).await;
    wait_attribution(&scope, "S1", ("customer", &c1)).await;
    wait_attribution(&scope, "L3", ("none", "")).await;
    wait_attribution(&scope, "L4", ("click", "refclk_three_days")).await;
    wait_attribution(&scope, "L2", ("none", "")).await;
    produce_raw(
        &scope.brokers,
        &scope.topic,
        &[(
            Some("refclk_late"),
            &click_event("refclk_late", DOCS_CODE, &scope.account, now - 60_000),
        )],
    )
    .await;
    wait_attribution(&scope, "L2", ("click", "refclk_late")).await;

    // A window of one day: the three-day-old click no longer attributes; the others stay.
    scope
        .set_account(&scope.account, &["--attribution-window-days", "1"])
        .await;
    wait_attribution(&scope, "L4", ("none", "")).await;
    let got = attributions(&scope, &scope.account).await;
    assert_eq!(got["S1"], ("customer".to_owned(), c1.clone()));

    // A sale first received two days ago (its event stamped so), then retried three times
    // now through ingest, after a consumer restart (which forgets the retry window): one
    // sale, one amount.
    let sale_event = shared::conversion::ConversionEvent {
        v: 1,
        kind: shared::conversion::ConversionType::Sale,
        event_id: "S9".into(),
        customer_hash: format!("{:064x}", 9),
        key_id: "e2e1".into(),
        click_id: String::new(),
        amount: 1000,
        currency: "EUR".into(),
        occurred_at_ms: now - 2 * day_ms,
        received_at_ms: now - 2 * day_ms,
        account_id: scope.account.clone(),
        api_key_id: "key_0123456789abcdef".into(),
    };
    produce_raw(
        &scope.brokers,
        &scope.registry.conversions,
        &[(Some(sale_event.dedup_id().as_str()), &sale_event.encode())],
    )
    .await;
    let count_s9 = format!(
        "SELECT count() FROM {}.conversions WHERE event_id = 'S9'",
        scope.database
    );
    eventually("S9 stored", Duration::from_secs(30), || async {
        (scope.ch.scalar(&count_s9).await == 1).then_some(())
    })
    .await;
    // The restart must really end the first process: its retry window goes with it.
    let exited = consumer.proc.terminate(Duration::from_secs(30));
    assert!(
        exited.is_some_and(|status| status.success()),
        "the consumer did not stop on SIGTERM: {exited:?}"
    );
    drop(consumer);
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    for _ in 0..3 {
        conv(sale("S9", "customer_v", 1000, None)).await;
    }
    eventually(
        "the three repeats skipped",
        Duration::from_secs(30),
        || async {
            // The conversions stream's skips only (claimed elsewhere, or repeated in a plan).
            let skipped = metric_or_zero(
                &consumer.url("/metrics"),
                "consumer_duplicates_skipped_total",
                "stream=\"conversions\"",
            )
            .await;
            (skipped >= 3.0).then_some(())
        },
    )
    .await;
    let db = &scope.database;
    assert_eq!(scope.ch.scalar(&count_s9).await, 1);
    assert_eq!(
        scope
            .ch
            .scalar(&format!(
                "SELECT sum(amount) FROM {db}.conversions_attributed WHERE type = 'sale'"
            ))
            .await,
        4200 + 1000
    );
    // Each conversion once in ClickHouse, and one credit each.
    let stored = scope
        .ch
        .scalar(&format!(
            "SELECT count() FROM {db}.conversions WHERE account_id = '{}'",
            scope.account
        ))
        .await;
    assert_eq!(stored, 6, "L1 S1 L2 L3 L4 S9");
    let unique_keys = scope
        .ch
        .scalar(&format!(
            "SELECT uniqExact(conversion_key) FROM {db}.conversions"
        ))
        .await;
    assert_eq!(unique_keys, stored);
    let credits = scope
        .ch
        .scalar(&format!(
            "SELECT sum(conversion_credits) FROM {db}.account_all_credits_daily WHERE account_id = '{}'",
            scope.account
        ))
        .await;
    assert_eq!(credits, 6);
    let billed = scope
        .ch
        .scalar(&format!(
            "SELECT sum(conversion_credits) FROM {db}.account_billing_monthly WHERE account_id = '{}'",
            scope.account
        ))
        .await;
    assert_eq!(billed, 6);
    scope.drop_database().await;
}

const HUMAN_UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";

/// The "Conversions" dashboard and its named queries on a known data set: 4 human clicks
/// on two codes, six conversions (two by their own click, one inherited, two of a
/// customer no click brought, one by its own click on the other code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversions_dashboard_answers_the_known_data_set() {
    // The clicks must land within one clock hour (the hourly rollups at the range's edge).
    let secs_in_hour = (shared::now_ms() / 1000) % 3600;
    if secs_in_hour > 3540 {
        tokio::time::sleep(Duration::from_secs(3600 - secs_in_hour + 1)).await;
    }
    let scope = Scope::new("conv_dash", 2).await;
    let second_code = "CODEA2A2A2A2";
    scope.register_codes(&[second_code]).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    let consumer = ConsumerProc::start(&scope.consumer_options());
    ingest.ready().await;
    consumer.ready().await;
    let client = http();
    let clicks = [
        (
            "refclk_k1",
            DOCS_CODE,
            "/pricing",
            ("news", "email", "spring"),
        ),
        (
            "refclk_k2",
            DOCS_CODE,
            "/pricing",
            ("news", "email", "spring"),
        ),
        ("refclk_k3", second_code, "/blog", ("ads", "cpc", "launch")),
        ("refclk_k4", second_code, "/blog", ("ads", "cpc", "launch")),
    ];
    for (id, code, path, (source, medium, campaign)) in clicks {
        let r = client
            .post(ingest.url("/api/v1/referrals/click"))
            .header("content-type", "application/json")
            .header("user-agent", HUMAN_UA)
            .body(
                json!({"code": code, "click_id": id, "landing_path": path,
                       "utm_source": source, "utm_medium": medium, "utm_campaign": campaign})
                .to_string(),
            )
            .send()
            .await
            .expect("click");
        assert_eq!(r.status(), 200);
    }
    scope.wait_rows(4, Duration::from_secs(30)).await;
    for body in [
        lead("L1", "cust1", Some("refclk_k1")),
        sale("S1", "cust1", 5000, None),
        lead("L2", "cust2", Some("refclk_k3")),
        json!({"type": "sale", "event_id": "S2", "customer_id": "cust2", "click_id": "refclk_k3",
               "amount": 1000, "currency": "USD"}),
        lead("L3", "cust3", None),
        sale("S3", "cust3", 300, None),
    ] {
        let a = post_conversion(&client, &ingest, &secret, &body).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let db = ClickHouse::new(&format!(
        "{}/?database={}",
        clickhouse_url(),
        scope.database
    ));
    eventually(
        "six conversions attributed",
        Duration::from_secs(30),
        || async {
            (db.scalar(
                "SELECT countIf(attribution != 'none') FROM conversions_attributed FORMAT TSV",
            )
            .await
                == 4)
                .then_some(())
        },
    )
    .await;

    // Time to convert, from the raw times: each attributed conversion and its click.
    let at = |sql: &str| {
        let db = &db;
        let sql = sql.to_owned();
        async move {
            db.query(&format!("{sql} FORMAT TSV"))
                .await
                .lines()
                .map(|l| {
                    let (k, v) = l.split_once('\t').expect("two columns");
                    (k.to_owned(), v.parse::<i64>().expect("ms"))
                })
                .collect::<std::collections::BTreeMap<String, i64>>()
        }
    };
    let clicked = at("SELECT click_id, received_at_ms FROM referral_clicks").await;
    let occurred = at("SELECT event_id, occurred_at_ms FROM conversions").await;
    let secs = |event: &str, click: &str| (occurred[event] - clicked[click]) as f64 / 1000.0;
    // ClickHouse's quantileExact(0.5): the value at position n / 2 of the sorted values.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("<secs>{}", v[v.len() / 2])
    };
    let max = |v: Vec<f64>| format!("<secs>{}", v.into_iter().fold(f64::MIN, f64::max));
    let (l1, s1, l2, s2) = (
        secs("L1", "refclk_k1"),
        secs("S1", "refclk_k1"),
        secs("L2", "refclk_k3"),
        secs("S2", "refclk_k3"),
    );
    let (leads_median, leads_max) = (median(vec![l1, l2]), max(vec![l1, l2]));
    let (s2_cell, s1_cell) = (median(vec![s2]), median(vec![s1]));
    let all_median = median(vec![l1, s1, l2, s2]);
    let (k1_median, k3_median) = (median(vec![l1, s1]), median(vec![l2, s2]));
    let rows = |r: &[&[&str]]| -> Vec<Vec<String>> {
        r.iter()
            .map(|row| row.iter().map(|c| (*c).to_owned()).collect())
            .collect()
    };
    let me = scope.account.as_str();
    let mut expected = std::collections::BTreeMap::new();
    expected.insert(
        "conversions_funnel",
        rows(&[&["4", "3", "3", "0.5", "0.5", "0.3333"]]),
    );
    expected.insert("conversions_over_time", rows(&[&["<hour>", "3", "3"]]));
    expected.insert(
        "conversions_revenue",
        rows(&[
            &["EUR", "2", "5300", "5000", "1250"],
            &["USD", "1", "1000", "1000", "250"],
        ]),
    );
    expected.insert(
        "conversions_attribution",
        rows(&[
            &["lead", "click", "2", "0.6667", &leads_median, &leads_max],
            &["lead", "none", "1", "0.3333", "\\N", "\\N"],
            &["sale", "click", "1", "0.3333", &s2_cell, &s2_cell],
            &["sale", "customer", "1", "0.3333", &s1_cell, &s1_cell],
            &["sale", "none", "1", "0.3333", "\\N", "\\N"],
        ]),
    );
    expected.insert(
        "conversions_by_account",
        rows(&[&[
            me,
            "4",
            "3",
            "3",
            "0.5",
            "0.5",
            "EUR 5300, USD 1000",
            "EUR 1325, USD 250",
            &all_median,
            "0.3333",
        ]]),
    );
    expected.insert(
        "conversions_by_code",
        rows(&[
            &[
                DOCS_CODE, "2", "1", "1", "0.5", "0.5", "EUR 5000", "EUR 2500", &k1_median,
            ],
            &[
                second_code,
                "2",
                "1",
                "1",
                "0.5",
                "0.5",
                "USD 1000",
                "USD 500",
                &k3_median,
            ],
        ]),
    );
    expected.insert(
        "conversions_by_utm",
        rows(&[
            &[
                "ads", "cpc", "launch", "2", "1", "1", "0.5", "0.5", "USD 1000", "USD 500",
                &k3_median,
            ],
            &[
                "news", "email", "spring", "2", "1", "1", "0.5", "0.5", "EUR 5000", "EUR 2500",
                &k1_median,
            ],
        ]),
    );
    expected.insert(
        "conversions_by_landing_path",
        rows(&[
            &[
                "/blog", "2", "1", "1", "0.5", "0.5", "USD 1000", "USD 500", &k3_median,
            ],
            &[
                "/pricing", "2", "1", "1", "0.5", "0.5", "EUR 5000", "EUR 2500", &k1_median,
            ],
        ]),
    );
    let now = shared::now_ms() / 1000;
    check_dashboard(&db, "conversions", &expected, (now - 86_400, now + 5)).await;
    scope.drop_database().await;
}

/// The 200 comes only after the broker acknowledged the conversion: with the broker
/// frozen, the answer waits; once it thaws, the answer is 200 and the record is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_is_answered_only_after_the_broker_acknowledged_it() {
    let broker = PrivateBroker::start().await;
    let scope = Scope::with_brokers("conv_ack", 1, &broker.brokers()).await;
    let (_, secret) = scope.create_key(&scope.account).await;
    let ingest = Ingest::start(&scope.ingest_options());
    ingest.ready().await;
    let pid = broker.pid().expect("broker pid").to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let posting = tokio::spawn(async move {
        let answer = post_conversion(&http(), &ingest, &secret, &lead("held_1", "ann", None)).await;
        (answer.status, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !posting.is_finished(),
        "answered while the broker was frozen"
    );
    let thawed = Instant::now();
    signal("-CONT");
    let (status, answered) = tokio::time::timeout(Duration::from_secs(20), posting)
        .await
        .expect("answered after the thaw")
        .expect("task");
    assert_eq!(status, 200);
    assert!(answered >= thawed);
    let keys: Vec<Vec<u8>> = read_whole_topic(
        &scope.brokers,
        &scope.registry.conversions,
        Duration::from_secs(10),
    )
    .into_iter()
    .map(|r| r.key)
    .collect();
    assert_eq!(
        keys,
        [format!("{}/lead/held_1", scope.account).into_bytes()]
    );
    scope.drop_database().await;
}
