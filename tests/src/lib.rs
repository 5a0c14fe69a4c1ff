//! Harness of the end-to-end tests: real `ingest` and `consumer` processes, the real broker
//! (tansu) and the real ClickHouse, started by `deploy/local/test`.
//!
//! Every test gets its own topic and database (random names), so tests run in parallel
//! without seeing each other's clicks. Fault tests can start a private broker and put a
//! TCP proxy they can cut in front of ClickHouse, so an "outage" hits only that test.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const HASH_KEY: &str = "e2e-test-key-e2e-test-key-e2e-test-key-0123";

pub fn kafka_brokers() -> String {
    std::env::var("E2E_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("E2E_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

pub fn redis_url() -> String {
    std::env::var("E2E_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The plan every test account is on unless a test says otherwise: limits no test reaches.
pub const TEST_PLAN: &str = "e2e";

/// The shipped catalogue plus [`TEST_PLAN`], written once per test process.
pub fn test_catalogue() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let mut cat: serde_json::Value =
            serde_json::from_slice(shared::plans::BUILTIN_JSON).expect("catalogue");
        cat["plans"].as_array_mut().expect("plans").push(serde_json::json!({
            "name": TEST_PLAN, "price_usd_month": 0, "included_credits_month": 1_000_000_000_000u64,
            "daily_cap": null, "rate_limit_per_minute": 100_000_000u64,
            "overage_usd_per_1000": 0.1, "overage_default": true
        }));
        write_catalogue(&cat)
    })
    .clone()
}

/// Writes a catalogue to a file of its own; its path.
pub fn write_catalogue(catalogue: &serde_json::Value) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.json", unique("e2e_plans")));
    std::fs::write(&path, catalogue.to_string()).expect("catalogue file");
    path
}

/// The workspace's target directory for the current profile.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var("E2E_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (deploy/local/test does)",
        path.display()
    );
    path
}

/// A release binary (`deploy/local/test` builds them), for tests that measure throughput
/// or memory under heavy load.
pub fn release_bin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --bins` first (deploy/local/test does)",
        path.display()
    );
    path
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

pub fn free_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

pub fn random_click_id() -> String {
    format!("refclk_{:032x}", rand::random::<u128>())
}

/// Waits until `check` returns `Some`, polling; panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

mod binaries;
mod browser;
mod clickhouse;
mod clients;
mod conversions;
mod dashboards;
mod figures;
mod fixtures;
mod kafka;
mod metrics;
mod private;
mod processes;
mod proxy;
mod registry;
mod report;
mod scope;

pub use binaries::*;
pub use browser::*;
pub use clickhouse::*;
pub use clients::*;
pub use conversions::*;
pub use dashboards::*;
pub use figures::*;
pub use fixtures::*;
pub use kafka::*;
pub use metrics::*;
pub use private::*;
pub use processes::*;
pub use proxy::*;
pub use registry::*;
pub use report::*;
pub use scope::*;
