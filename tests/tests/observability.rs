//! A real Prometheus scrapes the running binaries; every PromQL expression of the
//! "Pipeline health" dashboard and of the alert rules evaluates without error and returns
//! series (alert expressions are checked without their threshold, which is meant to be
//! false on a healthy pipeline).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::*;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboard_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/pipeline-health.json"))
            .expect("dashboard");
    let board: Value = serde_json::from_str(&text).expect("json");
    board["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

/// `expr:` values of alerts.yml, including `|` blocks.
fn alert_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).expect("alerts");
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(value) = line.trim_start().strip_prefix("expr:") {
            let indent = line.len() - line.trim_start().len();
            if value.trim() == "|" {
                let mut block = Vec::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    block.push(lines[i].trim());
                    i += 1;
                }
                out.push(block.join(" "));
                continue;
            }
            out.push(value.trim().to_owned());
        }
        i += 1;
    }
    out
}

/// The expression without its final threshold (`… > 0.05`), and without `and …` guards.
fn without_threshold(expr: &str) -> String {
    let base = expr.split(" and ").next().unwrap_or(expr).trim();
    for op in [" > ", " >= ", " == ", " < "] {
        if let Some(i) = base.rfind(op) {
            let rhs = base[i + op.len()..].trim();
            if rhs.parse::<f64>().is_ok() {
                return base[..i].trim().to_owned();
            }
        }
    }
    base.to_owned()
}

async fn query(prom: &str, expr: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .expect("query");
    r.json().await.expect("json")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_and_alert_expression_returns_series() {
    let scope = Scope::new("observability", 2).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![("INGEST_RATE_LIMIT_BURST".into(), "30".into())];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    consumer.ready().await;

    // A private Prometheus scraping both binaries every second, with the real alert rules.
    let dir = std::env::temp_dir().join(unique("prometheus"));
    std::fs::create_dir_all(dir.join("data")).expect("dir");
    std::fs::copy(
        root().join("deploy/prometheus/alerts.yml"),
        dir.join("alerts.yml"),
    )
    .expect("rules");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\nscrape_configs:\n  - job_name: ingest\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: consumer\n    static_configs: [{{targets: ['{}']}}]\n",
        ingest.addr, consumer.addr
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let prom_addr = free_addr();
    let mut cmd = Command::new("prometheus");
    cmd.current_dir(&dir).args([
        "--config.file=prometheus.yml",
        "--storage.tsdb.path=data",
        &format!("--web.listen-address={prom_addr}"),
    ]);
    let _prometheus = Proc::spawn("prometheus", cmd);
    let prom = format!("http://{prom_addr}");
    wait_ready(&format!("{prom}/-/ready"), Duration::from_secs(30)).await;

    // Traffic of every kind the panels show: accepted, rejected, rate limited, dead letters.
    let c = http();
    let url = ingest.url("/api/v1/referrals/click");
    for round in 0..6 {
        for _ in 0..10 {
            post_click(&c, &url, &json!({"code":"A1B2C3D4E5F6"})).await;
        }
        post_click(&c, &url, &json!({"code":"bad"})).await;
        if round == 0 {
            produce_raw(&scope.brokers, &scope.topic, &[(None, b"poison")]).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let mut exprs: Vec<String> = dashboard_exprs();
    let alerts = alert_exprs();
    assert!(alerts.len() >= 5, "{alerts:?}");
    exprs.extend(alerts.iter().map(|a| without_threshold(a)));
    assert!(exprs.len() >= 20, "{}", exprs.len());

    for expr in &exprs {
        let result = eventually(
            &format!("series for {expr}"),
            Duration::from_secs(30),
            || {
                let prom = prom.clone();
                async move {
                    let v = query(&prom, expr).await;
                    assert_eq!(v["status"], "success", "{expr}: {v}");
                    let n = v["data"]["result"].as_array().map_or(0, Vec::len);
                    (n > 0).then_some(v)
                }
            },
        )
        .await;
        assert!(!result["data"]["result"]
            .as_array()
            .expect("result")
            .is_empty());
    }
    // The full alert expressions evaluate too (they may be empty: nothing is wrong).
    for expr in &alerts {
        assert_eq!(query(&prom, expr).await["status"], "success", "{expr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    scope.drop_database().await;
}

#[test]
fn thresholds_are_stripped() {
    assert_eq!(without_threshold("max(x) > 60"), "max(x)");
    assert_eq!(
        without_threshold("sum(a) > 10000 and deriv(b[5m]) > 0"),
        "sum(a)"
    );
    assert_eq!(without_threshold("up{job=\"x\"} == 0"), "up{job=\"x\"}");
}
