//! Redis, which holds the plan-limit counters all ingest instances share, hanging and then
//! stopped under load. In a test binary of its own, so the latency it measures is not
//! disturbed by the other tests' load.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::json;

const PATH: &str = "/api/v1/referrals/click";

async fn post(c: &reqwest::Client, url: &str, code: &str) -> u16 {
    c.post(url)
        .header("content-type", "application/json")
        .body(json!({"code": code, "click_id": random_click_id()}).to_string())
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// Redis hanging, then stopped, under load: no 5xx, no request slower than the normal p99
/// + 50 ms (one outlier allowed, none over 1 s), each instance within its share, a metric
/// says so, and all recover by themselves.
#[tokio::test(flavor = "multi_thread")]
async fn redis_hanging_or_stopped_falls_back_to_each_instances_share() {
    let outage_secs: u64 = std::env::var("E2E_PLANS_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut redis = PrivateRedis::start().await;
    let proxy = CutProxy::start(redis.addr).await;
    let scope = Scope::new("plans_redis", 2).await;
    let catalogue = write_catalogue(&json!({"v": 1, "plans": [
        {"name": "outage", "price_usd_month": 0, "included_credits_month": 1000000000, "daily_cap": null, "rate_limit_per_minute": 120, "overage_usd_per_1000": 0.1, "overage_default": true}
    ]}));
    let account = unique("acct_outage");
    // Plan "outage": 120 a minute, sent 360 a minute.
    scope
        .registry
        .set_account(&scope.brokers, &account, "outage", true, true)
        .await;
    scope
        .registry
        .set_codes(&scope.brokers, &account, &["OUTAGE000001"], true)
        .await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_PLANS_FILE".into(), catalogue.display().to_string()),
        ("INGEST_REDIS_URL".into(), format!("redis://{}", proxy.addr)),
        ("INGEST_RATE_LIMIT_PER_MINUTE".into(), "100000000".into()),
        ("INGEST_RATE_LIMIT_BURST".into(), "100000000".into()),
    ];
    let ingests: Vec<Ingest> = (0..3).map(|_| Ingest::start(&opts)).collect();
    for i in &ingests {
        i.ready().await;
    }
    let metrics: Vec<String> = ingests.iter().map(|i| i.url("/metrics")).collect();
    for url in &metrics {
        eventually("3 instances", Duration::from_secs(10), || async move {
            // The gauge appears with the first heartbeat: absent means not yet.
            (metric_or_zero(url, "ingest_limits_instances", "").await >= 3.0).then_some(())
        })
        .await;
    }
    let urls: Vec<String> = ingests.iter().map(|i| i.url(PATH)).collect();
    let c = http();

    // One phase: 6 clicks a second for `secs`, round-robin; sorted latencies, and the
    // statuses each instance answered.
    let phase = |secs: u64| {
        let (c, urls) = (c.clone(), urls.clone());
        async move {
            let mut lat = Vec::new();
            let mut per_instance = vec![BTreeMap::<u16, usize>::new(); 3];
            let mut tick = tokio::time::interval(Duration::from_micros(166_667));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut n = 0;
            while Instant::now() < end {
                tick.tick().await;
                let t = Instant::now();
                let status = post(&c, &urls[n % 3], "OUTAGE000001").await;
                lat.push(t.elapsed());
                *per_instance[n % 3].entry(status).or_default() += 1;
                n += 1;
            }
            lat.sort();
            (lat, per_instance)
        }
    };
    let all_report = |want: f64| {
        let metrics = metrics.clone();
        async move {
            eventually(
                &format!("ingest_limits_redis_up == {want} everywhere"),
                Duration::from_secs(20),
                || {
                    let metrics = metrics.clone();
                    async move {
                        for u in &metrics {
                            let text = metrics_text(u).await;
                            if metric_in(&text, "ingest_limits_redis_up", "") != Some(want) {
                                return None;
                            }
                        }
                        Some(())
                    }
                },
            )
            .await;
        }
    };

    let (normal, _) = phase(8).await;
    let p99 = normal[normal.len() * 99 / 100];
    let bound = p99 + Duration::from_millis(50);
    let mut lines = Vec::new();
    for (what, stopped) in [
        ("hanging (connections open, no answers)", false),
        ("stopped", true),
    ] {
        // The counter only grows: each phase is judged by what it added.
        let mut local_before = Vec::new();
        for url in &metrics {
            local_before.push(metric_value(url, "ingest_limits_local_decisions_total").await);
        }
        if stopped {
            redis.stop();
            proxy.cut();
        } else {
            proxy.stall();
        }
        let (lat, per_instance) = phase(outage_secs).await;
        all_report(0.0).await;
        // A click waits for Redis at most its 20 ms budget. One request of the ~180 may
        // still stall on something else on this shared machine (a broker commit: a CI run
        // saw one of 330 ms); two over the bound, or any over 1 s, is a wait on Redis.
        let worst = *lat.last().expect("latencies");
        let slow: Vec<_> = lat.iter().filter(|l| **l > bound).collect();
        assert!(
            slow.len() <= 1 && worst <= Duration::from_secs(1),
            "Redis {what}: requests over the normal p99 {p99:?} + 50 ms: {slow:?}"
        );
        for (i, statuses) in per_instance.iter().enumerate() {
            assert!(
                statuses.keys().all(|s| *s == 200 || *s == 429),
                "Redis {what}: {per_instance:?}"
            );
            // 120 a minute shared by 3 instances: 40 each per window (its own window also
            // holds what it accepted just before), and the share is used, not refused.
            let ok = statuses.get(&200).copied().unwrap_or(0);
            assert!(
                ok <= 40 + 2,
                "Redis {what}: instance {i} accepted {ok}: {per_instance:?}"
            );
            if outage_secs >= 30 {
                assert!(
                    statuses.contains_key(&429),
                    "the share binds: {per_instance:?}"
                );
            }
            // Every instance decided clicks of this phase without Redis.
            let local = metric_value(&metrics[i], "ingest_limits_local_decisions_total").await
                - local_before[i];
            assert!(
                local > 0.0,
                "Redis {what}: instance {i} made no local decision in this phase"
            );
        }
        lines.push(format!("Redis {what} for {outage_secs} s: {} requests, slowest {worst:?} (normal p99 {p99:?}), per instance {per_instance:?}", lat.len()));
        // It recovers by itself: shared counters again, leases from Redis.
        if stopped {
            redis.restart().await;
        }
        proxy.restore();
        all_report(1.0).await;
        let before = metric_where(
            &metrics[0],
            "ingest_limits_leases_total",
            r#"result="answered""#,
        )
        .await;
        let (_, per_instance) = phase(3).await;
        assert!(per_instance
            .iter()
            .all(|s| s.keys().all(|k| *k == 200 || *k == 429)));
        let after = metric_where(
            &metrics[0],
            "ingest_limits_leases_total",
            r#"result="answered""#,
        )
        .await;
        assert!(after > before, "leases from Redis again after it came back");
    }
    for l in lines {
        println!("{l}");
    }
}
