//! The harness's own checks: the helpers that read metrics and row counts fail loudly on
//! an error, so a test that expects zero cannot pass because an endpoint or a table is
//! missing.

use std::panic::AssertUnwindSafe;

use e2e::*;
use futures::FutureExt;

async fn panics<F: std::future::Future>(f: F) -> bool {
    AssertUnwindSafe(f).catch_unwind().await.is_err()
}

#[test]
fn metric_series_are_summed_and_absence_is_not_zero() {
    let text = "# TYPE a counter\na{x=\"1\"} 2\na{x=\"2\"} 3.5\nab 7\n";
    assert_eq!(metric_in(text, "a", ""), Some(5.5));
    assert_eq!(metric_in(text, "a", "x=\"2\""), Some(3.5));
    assert_eq!(metric_in(text, "ab", ""), Some(7.0));
    assert_eq!(metric_in(text, "b", ""), None);
    assert_eq!(metric_in(text, "a", "x=\"3\""), None);
    assert!(std::panic::catch_unwind(|| metric_in("a{x=\"1\"} oops\n", "a", "")).is_err());
}

#[tokio::test]
async fn metrics_fail_loudly_when_the_endpoint_or_series_is_missing() {
    // ClickHouse answers /metrics with 404: not a metrics endpoint.
    let url = format!("{}/metrics", clickhouse_url());
    assert!(panics(metrics_text(&url)).await, "a 404 must fail");
    assert!(panics(metric_value(&url, "anything")).await);
    assert!(panics(metric_or_zero(&url, "anything", "")).await);
}

#[tokio::test]
async fn row_counts_fail_loudly_on_a_missing_table() {
    let ch = ClickHouse::new(&clickhouse_url());
    let missing = format!("{}.nothing_here", unique("e2e_missing"));
    assert!(panics(ch.count(&missing)).await, "count of a missing table");
    assert!(
        panics(ch.counts(&missing)).await,
        "counts of a missing table"
    );
    // Only the polling variant reads a missing table as empty.
    assert_eq!(ch.counts_if_exists(&missing).await, (0, 0));
    // Other errors still fail it.
    assert!(
        panics(ch.counts_if_exists("system.one")).await,
        "no click_id column"
    );
    assert_eq!(ch.count("system.one").await, 1);
}
