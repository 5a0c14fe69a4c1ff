//! Reading /metrics: a missing endpoint or series fails the test.

use std::time::{Duration, Instant};

/// The Prometheus text of a /metrics URL. A failed request, a status other than 200 or a
/// body that is not text fails the test; a refused connection is retried for 10 s only
/// (a process still starting).
pub async fn metrics_text(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let r = loop {
        match client.get(url).send().await {
            Ok(r) => break r,
            Err(e) if e.is_connect() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("GET {url}: {e}"),
        }
    };
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Sum of the series of `name` whose labels contain `labels` (all series for ""), or
/// `None` when the text has no such series. A sample that does not parse fails the test.
pub fn metric_in(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.split(['{', ' ']).next() != Some(name) || !line.contains(labels) {
            continue;
        }
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("unparsable sample: {line}"));
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Sum of all series of `name` at a /metrics URL. A missing series fails the test, like
/// an unreachable endpoint: use [`metric_or_zero`] where absence means zero.
pub async fn metric_value(url: &str, name: &str) -> f64 {
    metric_where(url, name, "").await
}

/// Sum of the series of `name` whose labels contain `labels` (e.g. `result="skipped"`);
/// a missing series fails the test.
pub async fn metric_where(url: &str, name: &str, labels: &str) -> f64 {
    let text = metrics_text(url).await;
    metric_in(&text, name, labels)
        .unwrap_or_else(|| panic!("no series {name}{{{labels}}} at {url}"))
}

/// [`metric_where`], but 0 for a series not exported yet (a counter nothing has
/// incremented); an unreachable endpoint still fails the test.
pub async fn metric_or_zero(url: &str, name: &str, labels: &str) -> f64 {
    metric_in(&metrics_text(url).await, name, labels).unwrap_or(0.0)
}
