//! The whole pipeline: a click posted over HTTP to a real ingest reaches the real
//! ClickHouse through the real broker and consumer, with every field as the contract says.

use std::time::Duration;

use e2e::*;
use serde_json::json;

const USER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64) E2E-Privacy-Probe/1.0 Chrome/120.0 Safari/537.36";

#[tokio::test(flavor = "multi_thread")]
async fn docs_example_reaches_clickhouse_with_every_field() {
    let scope = Scope::new("pipeline", 4).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    let ingest = Ingest::start(&scope.ingest_options());
    ingest.ready().await;
    consumer.ready().await;

    let click_id = random_click_id();
    let body = json!({
        "click_id": click_id, "code": "a1b2c3d4e5f6", "landing_path": "https://shop.example/pricing?email=x@y.z#plans",
        "utm_campaign": "spring-launch", "utm_medium": " email ", "utm_source": "news\u{200b}letter",
        "unknown_field": {"ignored": true}
    });
    let r = http()
        .post(ingest.url("/api/v1/referrals/click"))
        .header("content-type", "application/json")
        .header("user-agent", USER_AGENT)
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        answer,
        json!({"code":200,"msg":"ok","data":{"click_id": click_id, "code":"A1B2C3D4E5F6"}})
    );

    scope.wait_rows(1, Duration::from_secs(20)).await;
    let rows = scope
        .ch
        .rows(&format!(
            "SELECT click_id, code, landing_path, utm_source, utm_medium, utm_campaign, key_id, is_bot, \
             hex(ip_hash) AS ip, hex(ua_hash) AS ua, kafka_topic, toUnixTimestamp(received_at) AS at FROM {}",
            scope.table
        ))
        .await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["click_id"], click_id.as_str());
    assert_eq!(row["code"], "A1B2C3D4E5F6");
    assert_eq!(row["landing_path"], "/pricing");
    assert_eq!(row["utm_source"], "newsletter");
    assert_eq!(row["utm_medium"], "email");
    assert_eq!(row["utm_campaign"], "spring-launch");
    assert_eq!(row["key_id"], "e2e1");
    assert_eq!(row["is_bot"], 0);
    assert_eq!(row["kafka_topic"], scope.topic.as_str());
    assert_eq!(row["ip"].as_str().map(str::len), Some(64));
    let now = shared::now_ms() / 1000;
    let at = row["at"].as_u64().expect("time");
    assert!(now.abs_diff(at) < 60, "received_at {at} vs now {now}");

    // The same event, read back from Kafka, field by field.
    let records = read_topic(&scope.brokers, &scope.topic, 1, Duration::from_secs(10));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key, click_id.as_bytes());
    let event: serde_json::Value = serde_json::from_slice(&records[0].payload).expect("event json");
    assert_eq!(event["v"], 1);
    assert_eq!(event["click_id"], click_id.as_str());
    assert_eq!(event["code"], "A1B2C3D4E5F6");
    assert_eq!(event["landing_path"], "/pricing");
    assert_eq!(event["utm_source"], "newsletter");
    assert_eq!(event["key_id"], "e2e1");
    assert_eq!(event["is_bot"], false);
    assert_eq!(
        event["ip_hash"].as_str().map(str::to_uppercase).as_deref(),
        row["ip"].as_str()
    );
    assert_eq!(
        event["ua_hash"].as_str().map(str::to_uppercase).as_deref(),
        row["ua"].as_str()
    );
    scope.drop_database().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_ip_and_user_agent_appear_nowhere() {
    let scope = Scope::new("privacy", 2).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    let ingest = Ingest::start(&scope.ingest_options());
    ingest.ready().await;
    consumer.ready().await;

    let client = http();
    for _ in 0..5 {
        let r = client
            .post(ingest.url("/api/v1/referrals/click"))
            .header("content-type", "text/plain;charset=UTF-8")
            .header("user-agent", USER_AGENT)
            .body(json!({"code": "A1B2C3D4E5F6", "landing_path": "/p"}).to_string())
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200);
    }
    scope.wait_rows(5, Duration::from_secs(20)).await;

    let records = read_topic(&scope.brokers, &scope.topic, 5, Duration::from_secs(10));
    assert_eq!(records.len(), 5);
    for r in &records {
        let text = String::from_utf8_lossy(&r.payload);
        assert!(!text.contains("127.0.0.1"), "raw IP in Kafka: {text}");
        assert!(
            !text.contains("E2E-Privacy-Probe"),
            "raw UA in Kafka: {text}"
        );
    }
    let dump = scope
        .ch
        .query(&format!("SELECT * FROM {} FORMAT TSV", scope.table))
        .await;
    assert!(!dump.contains("127.0.0.1") && !dump.contains("E2E-Privacy-Probe"));
    // The stored hash is the keyed one, not a plain SHA-256 of the address.
    let plain = scope
        .ch
        .scalar(&format!(
            "SELECT count() FROM {} WHERE ip_hash = SHA256('127.0.0.1')",
            scope.table
        ))
        .await;
    assert_eq!(plain, 0);
    for log in [ingest.proc.log_text(), consumer.proc.log_text()] {
        assert!(!log.contains("E2E-Privacy-Probe") && !log.contains(HASH_KEY));
    }
    scope.drop_database().await;
}
