//! The real `ingest` and `consumer` binaries, started with a test's settings.

use crate::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Settings of one ingest process.
#[derive(Clone)]
pub struct IngestOptions {
    pub brokers: String,
    pub topic: String,
    pub registry: RegistryTopics,
    /// Keys in Redis: instances sharing a prefix share limits.
    pub redis_prefix: String,
    pub extra_env: Vec<(String, String)>,
}

impl IngestOptions {
    /// Registry topics named after `topic`, a Redis prefix of its own.
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            registry: RegistryTopics::for_topic(topic),
            redis_prefix: format!("{}:", unique("e2e")),
            extra_env: Vec::new(),
        }
    }

    /// Creates the registry topics with one account on [`TEST_PLAN`] owning [`DOCS_CODE`].
    pub async fn seed_registry(&self) -> String {
        let account = unique("acct");
        self.registry.create(&self.brokers).await;
        self.registry
            .set_account(&self.brokers, &account, TEST_PLAN, true, true)
            .await;
        self.registry
            .set_codes(&self.brokers, &account, &[DOCS_CODE], true)
            .await;
        account
    }
}

pub struct Ingest {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Ingest {
    pub fn start(opts: &IngestOptions) -> Self {
        Self::start_binary(bin("ingest"), opts)
    }

    pub fn start_binary(binary: PathBuf, opts: &IngestOptions) -> Self {
        let addr = free_addr();
        let mut cmd = Command::new(binary);
        cmd.env("INGEST_LISTEN", addr.to_string())
            .env("INGEST_KAFKA_BROKERS", &opts.brokers)
            .env("INGEST_KAFKA_TOPIC", &opts.topic)
            .env("INGEST_ACCOUNTS_TOPIC", &opts.registry.accounts)
            .env("INGEST_CODES_TOPIC", &opts.registry.codes)
            .env("INGEST_REFUSALS_TOPIC", &opts.registry.refusals)
            .env("INGEST_KEYS_TOPIC", &opts.registry.keys)
            .env("INGEST_CONVERSIONS_TOPIC", &opts.registry.conversions)
            .env("INGEST_PLANS_FILE", test_catalogue())
            .env("INGEST_REDIS_URL", redis_url())
            .env("INGEST_REDIS_PREFIX", &opts.redis_prefix)
            // The registry from the topics only, unless a test points at its mirror.
            .env("INGEST_REGISTRY_CLICKHOUSE_URL", "")
            // Every test client is 127.0.0.1: one /24. The network bucket has unit tests;
            // here it would limit all of a test's clients together.
            .env("INGEST_RATE_LIMIT_NETWORK_PER_MINUTE", "1000000000")
            .env("INGEST_RATE_LIMIT_NETWORK_BURST", "1000000000")
            .env("INGEST_HASH_KEY", HASH_KEY)
            .env("INGEST_HASH_KEY_ID", "e2e1");
        for (k, v) in &opts.extra_env {
            cmd.env(k, v);
        }
        Self {
            proc: Proc::spawn("ingest", cmd),
            addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn ready(&self) {
        wait_ready(&self.url("/readyz"), Duration::from_secs(30)).await;
    }
}

/// Settings of one consumer process.
#[derive(Clone)]
pub struct ConsumerOptions {
    pub brokers: String,
    pub topic: String,
    pub registry: RegistryTopics,
    pub group: String,
    pub clickhouse_url: String,
    pub database: String,
    pub extra_env: Vec<(String, String)>,
}

impl ConsumerOptions {
    /// Small, frequent batches (300 rows or 200 ms): many plans, so faults land mid-batch.
    pub fn fast_batches(&mut self) {
        self.extra_env
            .push(("CONSUMER_BATCH_MAX_ROWS".into(), "300".into()));
        self.extra_env
            .push(("CONSUMER_BATCH_MAX_AGE_MS".into(), "200".into()));
    }

    /// Points the consumer at ClickHouse through a proxy the test can cut, with short
    /// insert timeouts and retries; returns the proxy.
    pub async fn behind_cut_proxy(&mut self) -> CutProxy {
        let ch_addr: std::net::SocketAddr = self
            .clickhouse_url
            .trim_start_matches("http://")
            .parse()
            .expect("addr");
        let proxy = CutProxy::start(ch_addr).await;
        self.clickhouse_url = proxy.url();
        self.extra_env
            .push(("CONSUMER_RETRY_MAX_BACKOFF_MS".into(), "1000".into()));
        self.extra_env
            .push(("CONSUMER_INSERT_TIMEOUT_MS".into(), "3000".into()));
        proxy
    }
}

pub struct ConsumerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl ConsumerProc {
    pub fn start(opts: &ConsumerOptions) -> Self {
        Self::start_binary(bin("consumer"), opts)
    }

    /// Another build of the consumer (a previous release's, for a benchmark's baseline).
    pub fn start_binary(binary: PathBuf, opts: &ConsumerOptions) -> Self {
        let addr = free_addr();
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .env("CONSUMER_LISTEN", addr.to_string())
            .env("CONSUMER_KAFKA_BROKERS", &opts.brokers)
            .env("CONSUMER_KAFKA_TOPIC", &opts.topic)
            .env("CONSUMER_DLQ_TOPIC", format!("{}_dlq", opts.topic))
            .env("CONSUMER_GROUP_ID", &opts.group)
            .env("CONSUMER_CLICKHOUSE_URL", &opts.clickhouse_url)
            .env("CONSUMER_CLICKHOUSE_DATABASE", &opts.database)
            .env("CONSUMER_ACCOUNTS_TOPIC", &opts.registry.accounts)
            .env("CONSUMER_CODES_TOPIC", &opts.registry.codes)
            .env("CONSUMER_REFUSALS_TOPIC", &opts.registry.refusals)
            .env("CONSUMER_KEYS_TOPIC", &opts.registry.keys)
            .env("CONSUMER_CONVERSIONS_TOPIC", &opts.registry.conversions)
            .env("CONSUMER_PLANS_FILE", test_catalogue())
            // tansu leaves survivors of a crashed leader without partitions (see config.rs).
            .env("CONSUMER_REJOIN_IDLE_SECS", "5");
        for (k, v) in &opts.extra_env {
            cmd.env(k, v);
        }
        Self {
            proc: Proc::spawn("consumer", cmd),
            addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn ready(&self) {
        wait_ready(&self.url("/readyz"), Duration::from_secs(60)).await;
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.url("/metrics"), name).await
    }
}
