//! Attribution analytics: a data set with known answers goes through the real pipeline
//! (HTTP → ingest → broker → consumer → ClickHouse materialized views); then every SQL
//! panel of the provisioned dashboards — taken from the dashboard JSON, and required to
//! equal one of the named queries in deploy/clickhouse/queries — must return those answers.

use ingest::limits::calendar::civil_from_days;
use std::collections::BTreeMap;
use std::time::Duration;

use e2e::*;
use serde_json::{json, Value};

const HUMAN_UA: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const BOT_UA: &str = "Googlebot/2.1 (+http://www.google.com/bot.html)";
const A: &str = "CODEAAAAAAAA";
const B: &str = "CODEBBBBBBBB";
const C: &str = "CODECCCCCCCC";

struct Click {
    code: &'static str,
    ip: String,
    ua: &'static str,
    path: &'static str,
    utm: (&'static str, &'static str, &'static str),
    click_id: String,
}

fn data_set() -> Vec<Click> {
    let mut clicks = Vec::new();
    let mut add = |code, ip: String, ua, path, utm| {
        clicks.push(Click {
            code,
            ip,
            ua,
            path,
            utm,
            click_id: random_click_id(),
        });
    };
    // A: 10 visitors × 5 clicks, newsletter/email/spring, /pricing.
    for v in 0..10 {
        for _ in 0..5 {
            add(
                A,
                format!("10.1.0.{v}"),
                HUMAN_UA,
                "/pricing",
                ("newsletter", "email", "spring"),
            );
        }
    }
    // B: 20 visitors × 1 click plus one address clicking 35 times (suspected abuse).
    for v in 0..20 {
        add(
            B,
            format!("10.2.0.{v}"),
            HUMAN_UA,
            "/signup",
            ("twitter", "social", "launch"),
        );
    }
    for _ in 0..35 {
        add(
            B,
            "10.7.7.7".into(),
            HUMAN_UA,
            "/signup",
            ("twitter", "social", "launch"),
        );
    }
    // C: one human visitor × 5 clicks, and a crawler × 10.
    for _ in 0..5 {
        add(C, "10.3.0.1".into(), HUMAN_UA, "/", ("", "", ""));
    }
    for _ in 0..10 {
        add(C, "10.9.9.9".into(), BOT_UA, "/", ("", "", ""));
    }
    clicks
}

/// The answer of each named query for the data set, as rows of strings (TSV cells).
fn expected(abuse_ip_hash: &str) -> BTreeMap<&'static str, Vec<Vec<String>>> {
    let rows = |r: &[&[&str]]| {
        r.iter()
            .map(|row| row.iter().map(|c| (*c).to_owned()).collect())
            .collect()
    };
    let today = chrono_free_today();
    let mut m = BTreeMap::new();
    // "~N": a uniqHLL12 estimate (exact up to 16), accepted within max(2, 5%) of N.
    m.insert("totals", rows(&[&["110", "~32", "10"]]));
    m.insert("credits_per_day", rows(&[&[&today, "120"]]));
    m.insert(
        "top_codes",
        rows(&[&[B, "55", "~21"], &[A, "50", "10"], &[C, "5", "1"]]),
    );
    m.insert(
        "utm_breakdown",
        rows(&[
            &["twitter", "social", "launch", "55", "~21"],
            &["newsletter", "email", "spring", "50", "10"],
            &["", "", "", "5", "1"],
        ]),
    );
    m.insert(
        "landing_paths",
        rows(&[
            &["/signup", "55", "~21"],
            &["/pricing", "50", "10"],
            &["/", "5", "1"],
        ]),
    );
    m.insert(
        "bot_share",
        rows(&[&[&today, "120", "10", "0.08333333333333333"]]),
    );
    m.insert(
        "suspected_abuse",
        rows(&[&["<hour>", B, abuse_ip_hash, "35"]]),
    );
    m.insert(
        "clicks_over_time",
        rows(&[
            &["<hour>", A, "50", "10"],
            &["<hour>", B, "55", "~21"],
            &["<hour>", C, "5", "1"],
        ]),
    );
    m
}

fn chrono_free_today() -> String {
    // YYYY-MM-DD in UTC from the Unix time, without a date crate.
    let days = (shared::now_ms() / 1000 / 86_400) as i64;
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}")
}

/// Dashboards and named queries cannot drift: every SQL panel is a named query, and every
/// named query is a panel.
#[test]
fn every_sql_panel_is_a_named_query_and_every_named_query_a_panel() {
    let queries = named_queries();
    let panels = dashboard_sql_panels();
    for (uid, title, sql) in &panels {
        assert!(
            queries.values().any(|q| q == sql),
            "{uid}: panel {title:?} has SQL that is not a named query (drift)"
        );
    }
    let unused: Vec<_> = queries
        .iter()
        .filter(|(_, q)| !panels.iter().any(|(_, _, sql)| sql == *q))
        .map(|(n, _)| n)
        .collect();
    assert!(unused.is_empty(), "named queries no panel uses: {unused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_named_queries_answer_the_known_data_set() {
    // The data set must land within one clock hour (the hourly answers assume it).
    let secs_in_hour = (shared::now_ms() / 1000) % 3600;
    if secs_in_hour > 3540 {
        tokio::time::sleep(Duration::from_secs(3600 - secs_in_hour + 1)).await;
    }

    let scope = Scope::new("analytics", 4).await;
    scope.register_codes(&[A, B, C]).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_TRUSTED_PROXIES".into(), "127.0.0.0/8".into()),
        ("INGEST_RATE_LIMIT_BURST".into(), "1000".into()),
    ];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    consumer.ready().await;

    let c = http();
    let url = ingest.url("/api/v1/referrals/click");
    let clicks = data_set();
    for click in &clicks {
        let body = json!({
            "code": click.code, "click_id": click.click_id, "landing_path": click.path,
            "utm_source": click.utm.0, "utm_medium": click.utm.1, "utm_campaign": click.utm.2,
        });
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .header("x-forwarded-for", &click.ip)
            .header("user-agent", click.ua)
            .body(body.to_string())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
    }
    // A client retry of an existing click and refused requests change nothing.
    let retry = json!({"code": A, "click_id": clicks[0].click_id, "landing_path": "/pricing", "utm_source": "newsletter", "utm_medium": "email", "utm_campaign": "spring"});
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("x-forwarded-for", "10.1.0.0")
        .header("user-agent", HUMAN_UA)
        .body(retry.to_string())
        .send()
        .await
        .expect("retry");
    assert_eq!(r.status(), 200);
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"code":"bad"}"#)
        .send()
        .await
        .expect("bad");
    assert_eq!(r.status(), 400);

    let (count, uniq) = scope
        .wait_rows(clicks.len() as u64, Duration::from_secs(30))
        .await;
    // The retry is consumed after the originals; wait until the consumer has seen it.
    eventually("retry consumed", Duration::from_secs(20), || async {
        (consumer.metric("consumer_messages_consumed_total").await >= clicks.len() as f64 + 1.0)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(scope.ch.counts(&scope.table).await, (count, uniq));
    assert_eq!((count, uniq), (120, 120));

    let hasher = shared::hashing::KeyedHasher::new(HASH_KEY.as_bytes(), "e2e1").expect("key");
    let abuse_hash = hex_upper(&hasher.hash(b"10.7.7.7"));
    let now = shared::now_ms() / 1000;
    let db = ClickHouse::new(&format!(
        "{}/?database={}",
        clickhouse_url(),
        scope.database
    ));
    check_dashboard(
        &db,
        "referral-attribution",
        &expected(&abuse_hash),
        (now - 86_400, now + 3600),
    )
    .await;

    // The raw table answers the same as the aggregates (the views count each click once).
    let raw = db
        .query(&format!("SELECT countIf(is_bot = 0), uniqExactIf((ip_hash, ua_hash), is_bot = 0), countIf(is_bot = 1) FROM {} FORMAT TSV", scope.table))
        .await;
    assert_eq!(raw.trim(), "110\t32\t10");
    scope.drop_database().await;
}

/// The "Plans and billing" dashboard through the real pipeline with plan limits on (real
/// Redis): credits per account, a daily cap reached, overage billed, refusals by limit; a
/// client retry is charged once, 4xx never.
#[tokio::test(flavor = "multi_thread")]
async fn the_billing_dashboard_answers_the_known_data_set() {
    // The data set lands within one clock hour and one UTC day.
    let secs_in_hour = (shared::now_ms() / 1000) % 3600;
    if secs_in_hour > 3480 {
        tokio::time::sleep(Duration::from_secs(3600 - secs_in_hour + 1)).await;
    }
    let scope = Scope::new("billing", 2).await;
    let mut catalogue: Value =
        serde_json::from_str(&std::fs::read_to_string(test_catalogue()).expect("catalogue"))
            .expect("json");
    let plans = catalogue["plans"].as_array_mut().expect("plans");
    plans.push(json!({"name": "kt_capped", "price_usd_month": 1, "included_credits_month": 20, "daily_cap": 10, "rate_limit_per_minute": 1000, "overage_usd_per_1000": null, "overage_default": false}));
    plans.push(json!({"name": "kt_over", "price_usd_month": 1, "included_credits_month": 5, "daily_cap": null, "rate_limit_per_minute": 1000, "overage_usd_per_1000": 1.0, "overage_default": true}));
    let catalogue = write_catalogue(&catalogue);
    // Account ids sort after the scope's own (`acct_…`): capped, then over.
    let capped = unique("kta");
    let over = unique("ktb");
    scope
        .registry
        .set_account(&scope.brokers, &capped, "kt_capped", false, true)
        .await;
    scope
        .registry
        .set_account(&scope.brokers, &over, "kt_over", true, true)
        .await;
    scope
        .registry
        .set_codes(&scope.brokers, &capped, &["KTCAPPED0001"], true)
        .await;
    scope
        .registry
        .set_codes(&scope.brokers, &over, &["KTOVER000001"], true)
        .await;
    let mut copts = scope.consumer_options();
    copts.extra_env.push((
        "CONSUMER_PLANS_FILE".into(),
        catalogue.display().to_string(),
    ));
    let consumer = ConsumerProc::start(&copts);
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_PLANS_FILE".into(), catalogue.display().to_string()),
        ("INGEST_RATE_LIMIT_BURST".into(), "1000".into()),
        ("INGEST_REFUSALS_INTERVAL_SECS".into(), "1".into()),
    ];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    consumer.ready().await;

    let c = http();
    let url = ingest.url("/api/v1/referrals/click");
    let post = |body: Value| {
        let c = c.clone();
        let url = url.clone();
        async move {
            c.post(&url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("post")
                .status()
                .as_u16()
        }
    };
    let mut statuses = BTreeMap::<(&str, u16), usize>::new();
    for (code, n) in [("KTCAPPED0001", 12), ("KTOVER000001", 25), (DOCS_CODE, 3)] {
        for _ in 0..n {
            let status = post(json!({"code": code, "click_id": random_click_id()})).await;
            *statuses.entry((code, status)).or_default() += 1;
        }
    }
    assert_eq!(
        statuses,
        BTreeMap::from([
            (("KTCAPPED0001", 200), 10),
            (("KTCAPPED0001", 429), 2),
            (("KTOVER000001", 200), 25),
            ((DOCS_CODE, 200), 3)
        ])
    );
    // A client retry is the same click; a 400 and an unknown code are never charged.
    let retry = random_click_id();
    assert_eq!(
        post(json!({"code": DOCS_CODE, "click_id": retry})).await,
        200
    );
    assert_eq!(
        post(json!({"code": DOCS_CODE, "click_id": retry})).await,
        200
    );
    assert_eq!(
        post(json!({"code": DOCS_CODE, "landing_path": "//evil.example"})).await,
        400
    );
    assert_eq!(post(json!({"code": "UNKNOWNCODE1"})).await, 400);
    scope.wait_rows(39, Duration::from_secs(30)).await;
    eventually("the retry consumed", Duration::from_secs(20), || async {
        (consumer.metric("consumer_messages_consumed_total").await >= 40.0).then_some(())
    })
    .await;
    let db = ClickHouse::new(&format!(
        "{}/?database={}",
        clickhouse_url(),
        scope.database
    ));
    eventually(
        "refusal counts in ClickHouse",
        Duration::from_secs(20),
        || async {
            (db.scalar("SELECT count() FROM account_refusals FORMAT TSV")
                .await
                > 0)
            .then_some(())
        },
    )
    .await;
    eventually("accounts mirrored", Duration::from_secs(20), || async {
        (db.scalar("SELECT count() FROM accounts FINAL FORMAT TSV")
            .await
            >= 3)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(scope.ch.counts(&scope.table).await, (39, 39));
    // Three conversions of the over-plan account (stored as the consumer stores them):
    // the month's panel counts what the bill counts, clicks and conversions.
    db.query(&format!(
        "INSERT INTO conversions (conversion_key, account_id, type, event_id, customer_hash, \
         key_id, click_id, amount, currency, occurred_at_ms, received_at, received_at_ms, \
         api_key_id, kafka_topic, kafka_partition, kafka_offset) \
         SELECT concat('{over}/lead/e', toString(number)), '{over}', 'lead', \
         concat('e', toString(number)), toFixedString(repeat('x', 32), 32), 'e2e1', '', 0, '', \
         toUnixTimestamp64Milli(now64(3)), now(), toUnixTimestamp64Milli(now64(3)), 'key_x', \
         't', 0, number FROM numbers(3)"
    ))
    .await;

    let rows = |r: &[&[&str]]| -> Vec<Vec<String>> {
        r.iter()
            .map(|row| row.iter().map(|c| (*c).to_owned()).collect())
            .collect()
    };
    let today = chrono_free_today();
    let month = format!("{}-01", &today[..7]);
    let me = scope.account.as_str();
    let mut expected = BTreeMap::new();
    expected.insert(
        "account_credits_over_time",
        rows(&[
            &["<hour>", me, "4"],
            &["<hour>", &capped, "10"],
            &["<hour>", &over, "25"],
        ]),
    );
    expected.insert(
        "top_accounts",
        rows(&[
            &[&over, "kt_over", "25", "0"],
            &[&capped, "kt_capped", "10", "2"],
            &[me, TEST_PLAN, "4", "0"],
        ]),
    );
    expected.insert(
        "accounts_near_caps",
        rows(&[
            &[&over, "kt_over", "1", "25", "\\N", "\\N", "28", "5", "560"],
            &[
                &capped,
                "kt_capped",
                "0",
                "10",
                "10",
                "100",
                "10",
                "20",
                "50",
            ],
        ]),
    );
    expected.insert(
        "overage_revenue",
        rows(&[&[&month, &over, "kt_over", "28", "5", "23", "0.02"]]),
    );
    expected.insert("refusals_by_limit", rows(&[&["daily_cap", "2", "1"]]));
    expected.insert(
        "account_credits_by_kind",
        rows(&[
            &[&today, &over, "25", "3", "28"],
            &[&today, &capped, "10", "0", "10"],
            &[&today, me, "4", "0", "4"],
        ]),
    );
    let now = shared::now_ms() / 1000;
    check_dashboard(&db, "plans-billing", &expected, (now - 86_400, now + 5)).await;

    // The documented per-account question, and the month's bill.
    let credits = db
        .scalar(&format!("SELECT sum(credits) FROM account_credits_daily WHERE account_id = '{over}' AND day = today() FORMAT TSV"))
        .await;
    assert_eq!(credits, 25);

    // The registry mirror: the latest version of each key wins.
    let code_row = |code: &'static str| {
        let db = &db;
        async move {
            db.query(&format!(
                "SELECT account_id, status FROM codes FINAL WHERE code = '{code}' FORMAT TSV"
            ))
            .await
            .trim()
            .to_owned()
        }
    };
    assert_eq!(code_row("KTCAPPED0001").await, format!("{capped}\tactive"));
    scope
        .registry
        .set_codes(&scope.brokers, &over, &["KTOVER000001"], false)
        .await;
    eventually(
        "the disabled code mirrored",
        Duration::from_secs(20),
        || async { (code_row("KTOVER000001").await == format!("{over}\tdisabled")).then_some(()) },
    )
    .await;
    assert_eq!(
        db.query(&format!("SELECT plan, overage, status FROM accounts FINAL WHERE account_id = '{over}' FORMAT TSV")).await.trim(),
        "kt_over\t1\tactive"
    );
    scope.drop_database().await;
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[test]
fn macros_expand_like_the_grafana_plugin() {
    assert_eq!(
        expand_macros(
            "WHERE $__timeFilter(hour) AND day >= toDate($__fromTime)",
            10,
            20
        ),
        "WHERE hour >= toDateTime(10) AND hour <= toDateTime(20) AND day >= toDate(toDateTime(10))"
    );
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(20_000), (2024, 10, 4));
}
