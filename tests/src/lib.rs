//! Harness of the end-to-end tests: real `ingest` and `consumer` processes, the real broker
//! (tansu) and the real ClickHouse, started by `deploy/local/test`.
//!
//! Every test gets its own topic and database (random names), so tests run in parallel
//! without seeing each other's clicks. Fault tests can start a private broker and put a
//! TCP proxy they can cut in front of ClickHouse, so an "outage" hits only that test.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

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

// --- Kafka -------------------------------------------------------------------------------

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        if let Err((name, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {name}"
            );
        }
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads every message of `topic` (all partitions, from the start) until `expected`
/// have arrived or `timeout` passes.
pub fn read_topic(brokers: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("e2e_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Produces a tombstone (a message without a value) for `key`.
pub async fn produce_tombstone(brokers: &str, topic: &str, key: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<str, [u8]>::to(topic).key(key),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

/// Produces raw payloads (e.g. poison messages) with acks=all.
pub async fn produce_raw(brokers: &str, topic: &str, messages: &[(Option<&str>, &[u8])]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    for (key, payload) in messages {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("produce");
    }
}

// --- ClickHouse --------------------------------------------------------------------------

pub struct ClickHouse {
    url: String,
    http: reqwest::Client,
}

impl ClickHouse {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn try_query(&self, sql: &str) -> Result<String, String> {
        let r = self
            .http
            .post(&self.url)
            .query(&[("output_format_json_quote_64bit_integers", "0")])
            .body(sql.to_owned())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(text)
        } else {
            Err(text)
        }
    }

    pub async fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .await
            .unwrap_or_else(|e| panic!("query failed: {sql}\n{e}"))
    }

    /// Rows of `sql` as JSON objects (FORMAT JSONEachRow appended).
    pub async fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .await
            .lines()
            .map(|l| serde_json::from_str(l).expect("json row"))
            .collect()
    }

    pub async fn scalar(&self, sql: &str) -> u64 {
        self.query(sql)
            .await
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number from {sql}"))
    }

    /// `count()` of a table (0 when it does not exist): cheap enough to poll.
    pub async fn count(&self, table: &str) -> u64 {
        self.try_query(&format!("SELECT count() FROM {table} FORMAT TSV"))
            .await
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `(count(), uniqExact(click_id))` of the clicks table, without FINAL.
    pub async fn counts(&self, table: &str) -> (u64, u64) {
        match self
            .try_query(&format!(
                "SELECT count(), uniqExact(click_id) FROM {table} FORMAT TSV"
            ))
            .await
        {
            Ok(text) => {
                let mut it = text
                    .split_whitespace()
                    .map(|v| v.parse::<u64>().unwrap_or(0));
                (it.next().unwrap_or(0), it.next().unwrap_or(0))
            }
            Err(_) => (0, 0),
        }
    }
}

// --- processes ---------------------------------------------------------------------------

/// A child process that is stopped (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .env("LOG_LEVEL", "info,rdkafka=warn")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to `timeout`) for the process to exit on its own; its exit status.
    pub async fn exited(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let what = format!("{} exits", self.name);
        let child = &mut self.child;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn wait_ready(url: &str, timeout: Duration) {
    let http = reqwest::Client::new();
    eventually(url, timeout, || {
        let http = http.clone();
        async move {
            match http.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

// --- the referral-program registry ---------------------------------------------------------

/// The registry topics of one test (named after its click topic).
#[derive(Clone, Debug)]
pub struct RegistryTopics {
    pub accounts: String,
    pub codes: String,
    pub refusals: String,
}

impl RegistryTopics {
    pub fn for_topic(topic: &str) -> Self {
        Self {
            accounts: format!("{topic}_accounts"),
            codes: format!("{topic}_codes"),
            refusals: format!("{topic}_refusals"),
        }
    }

    pub async fn create(&self, brokers: &str) {
        create_topic(brokers, &self.accounts, 1).await;
        create_topic(brokers, &self.codes, 2).await;
        create_topic(brokers, &self.refusals, 1).await;
    }

    /// Runs a `consumer` operator command (accounts, codes) against these topics; its exit
    /// code and everything it printed.
    pub async fn consumer_command(
        &self,
        brokers: &str,
        click_topic: &str,
        args: &[&str],
        plans: &std::path::Path,
    ) -> (i32, String) {
        let mut cmd = tokio::process::Command::new(bin("consumer"));
        cmd.args(args)
            .env("CONSUMER_KAFKA_BROKERS", brokers)
            .env("CONSUMER_KAFKA_TOPIC", click_topic)
            .env("CONSUMER_ACCOUNTS_TOPIC", &self.accounts)
            .env("CONSUMER_CODES_TOPIC", &self.codes)
            .env("CONSUMER_REFUSALS_TOPIC", &self.refusals)
            .env("CONSUMER_PLANS_FILE", plans)
            .env("LOG_LEVEL", "warn");
        let out = cmd.output().await.expect("consumer command");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Writes an account record, as `consumer accounts set` does.
    pub async fn set_account(
        &self,
        brokers: &str,
        id: &str,
        plan: &str,
        overage: bool,
        active: bool,
    ) {
        use shared::registry::{AccountRecord, AccountStatus};
        let status = if active {
            AccountStatus::Active
        } else {
            AccountStatus::Suspended
        };
        let value = AccountRecord::new(plan, overage, status).encode();
        produce_raw(brokers, &self.accounts, &[(Some(id), &value)]).await;
    }

    /// Writes code records (active, or disabled), as `consumer codes add|disable` do.
    pub async fn set_codes(&self, brokers: &str, account: &str, codes: &[&str], active: bool) {
        use shared::registry::{CodeRecord, CodeStatus};
        let status = if active {
            CodeStatus::Active
        } else {
            CodeStatus::Disabled
        };
        let value = CodeRecord::new(account, status).encode();
        let messages: Vec<(Option<&str>, &[u8])> =
            codes.iter().map(|c| (Some(*c), value.as_slice())).collect();
        produce_raw(brokers, &self.codes, &messages).await;
    }
}

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

pub struct ConsumerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl ConsumerProc {
    pub fn start(opts: &ConsumerOptions) -> Self {
        let addr = free_addr();
        let mut cmd = Command::new(bin("consumer"));
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

/// Sum of all series of `name` at a /metrics URL (0 when absent).
pub async fn metric_value(url: &str, name: &str) -> f64 {
    let text = match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of the series of `name` whose labels contain `labels` (e.g. `result="skipped"`).
pub async fn metric_where(url: &str, name: &str, labels: &str) -> f64 {
    let text = match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A topic + database + consumer options, isolated for one test.
pub struct Scope {
    pub topic: String,
    pub database: String,
    pub table: String,
    pub brokers: String,
    pub ch: ClickHouse,
    pub registry: RegistryTopics,
    /// The scope's account (plan [`TEST_PLAN`]), which owns the docs page's code
    /// `A1B2C3D4E5F6`.
    pub account: String,
    pub redis_prefix: String,
}

/// The docs page's example code, registered in every scope.
pub const DOCS_CODE: &str = "A1B2C3D4E5F6";

impl Scope {
    pub async fn new(name: &str, partitions: i32) -> Self {
        Self::with_brokers(name, partitions, &kafka_brokers()).await
    }

    pub async fn with_brokers(name: &str, partitions: i32, brokers: &str) -> Self {
        let topic = unique(name);
        create_topic(brokers, &topic, partitions).await;
        create_topic(brokers, &format!("{topic}_dlq"), 1).await;
        let registry = RegistryTopics::for_topic(&topic);
        registry.create(brokers).await;
        let account = unique("acct");
        registry
            .set_account(brokers, &account, TEST_PLAN, true, true)
            .await;
        registry
            .set_codes(brokers, &account, &[DOCS_CODE], true)
            .await;
        let database = unique(&format!("e2e_{name}"));
        Self {
            table: format!("{database}.referral_clicks"),
            topic,
            database,
            brokers: brokers.to_owned(),
            ch: ClickHouse::new(&clickhouse_url()),
            registry,
            account,
            redis_prefix: format!("{}:", unique("e2e")),
        }
    }

    /// Runs a `consumer` operator command (accounts, codes) against this scope's registry;
    /// its exit code and everything it printed.
    pub async fn consumer_command(&self, args: &[&str], plans: &std::path::Path) -> (i32, String) {
        self.registry
            .consumer_command(&self.brokers, &self.topic, args, plans)
            .await
    }

    /// Registers more codes for the scope's account.
    pub async fn register_codes(&self, codes: &[&str]) {
        self.registry
            .set_codes(&self.brokers, &self.account, codes, true)
            .await;
    }

    pub fn ingest_options(&self) -> IngestOptions {
        IngestOptions {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            registry: self.registry.clone(),
            redis_prefix: self.redis_prefix.clone(),
            extra_env: Vec::new(),
        }
    }

    pub fn consumer_options(&self) -> ConsumerOptions {
        ConsumerOptions {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            registry: self.registry.clone(),
            group: format!("{}_group", self.topic),
            clickhouse_url: clickhouse_url(),
            database: self.database.clone(),
            extra_env: Vec::new(),
        }
    }

    /// Waits until the table holds `n` rows; returns `(count, uniqExact(click_id))`.
    pub async fn wait_rows(&self, n: u64, timeout: Duration) -> (u64, u64) {
        let table = self.table.clone();
        let ch = &self.ch;
        eventually(&format!("{n} rows in {table}"), timeout, || {
            let table = table.clone();
            async move {
                let (count, uniq) = ch.counts(&table).await;
                (count >= n).then_some((count, uniq))
            }
        })
        .await
    }

    pub async fn drop_database(&self) {
        let _ = self
            .ch
            .try_query(&format!("DROP DATABASE IF EXISTS {}", self.database))
            .await;
    }
}

// --- clients -----------------------------------------------------------------------------

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn post_click(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    let json = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Posts a valid click with a fresh random click id; returns the id and the status.
pub async fn post_fresh_click(client: &reqwest::Client, url: &str) -> (String, u16) {
    let id = random_click_id();
    let (status, _) = post_click(
        client,
        url,
        &serde_json::json!({"code": "A1B2C3D4E5F6", "click_id": id}),
    )
    .await;
    (id, status)
}

// --- a TCP proxy whose link can be cut or stalled ----------------------------------------

/// Forwards connections from a local port to `target`. While `down`, it refuses new
/// connections and resets open ones, like a server that went away. While `stalled`, it
/// keeps connections open but forwards nothing, like a server that hangs.
pub struct CutProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(listener, target)
    }

    /// A proxy on a chosen (free) address, e.g. one a broker advertises.
    pub async fn start_on(addr: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        Self::serve(listener, target)
    }

    fn serve(listener: tokio::net::TcpListener, target: SocketAddr) -> Self {
        let addr = listener.local_addr().expect("addr");
        let down = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (d, st, g) = (
            Arc::clone(&down),
            Arc::clone(&stalled),
            Arc::clone(&generation),
        );
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (d, st, g) = (Arc::clone(&d), Arc::clone(&st), Arc::clone(&g));
                tokio::spawn(async move {
                    let my_gen = g.load(Ordering::SeqCst);
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let alive = {
                        let (d, g) = (Arc::clone(&d), Arc::clone(&g));
                        move || !d.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == my_gen
                    };
                    let up = pump(ri, wo, Arc::clone(&st), alive.clone());
                    let back = pump(ro, wi, st, alive);
                    tokio::select! { () = up => {}, () = back => {} }
                });
            }
        });
        Self {
            addr,
            down,
            stalled,
            generation,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
    }

    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies one direction, pausing while `stalled` and ending when `alive()` turns false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    alive: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                if !alive() { return; }
                continue;
            }
        };
        while stalled.load(Ordering::SeqCst) {
            if !alive() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !alive() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy in front of a Kafka broker that understands request framing (a 4-byte
/// size, then the API key): while `slow_metadata` is set it holds every Metadata request
/// (API key 3) for `delay` and forwards everything else at once. librdkafka matches
/// responses to requests by correlation id, so produce requests overtake a held Metadata
/// request: the metadata probe is slow while producing works.
pub struct KafkaProxy {
    pub addr: SocketAddr,
    slow: Arc<AtomicBool>,
}

impl KafkaProxy {
    pub async fn start_on(addr: SocketAddr, target: SocketAddr, delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let slow = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&slow);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let flag = Arc::clone(&flag);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                    let writer = tokio::spawn(async move {
                        while let Some(frame) = rx.recv().await {
                            if wo.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    });
                    let reader = async move {
                        loop {
                            let mut size = [0u8; 4];
                            if ri.read_exact(&mut size).await.is_err() {
                                return;
                            }
                            let n = u32::from_be_bytes(size) as usize;
                            let mut frame = size.to_vec();
                            frame.resize(4 + n, 0);
                            if ri.read_exact(&mut frame[4..]).await.is_err() {
                                return;
                            }
                            let api_key = i16::from_be_bytes([frame[4], frame[5]]);
                            if api_key == 3 && flag.load(Ordering::SeqCst) {
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = tx.send(frame);
                                });
                            } else if tx.send(frame).is_err() {
                                return;
                            }
                        }
                    };
                    let back = async move {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    };
                    tokio::select! { () = reader => {}, () = back => {} }
                    writer.abort();
                });
            }
        });
        Self { addr, slow }
    }

    pub fn slow_metadata(&self, on: bool) {
        self.slow.store(on, Ordering::SeqCst);
    }
}

/// A private tansu broker on a free port with its own sqlite file, for fault tests that
/// restart the broker.
pub struct PrivateBroker {
    pub proc: Option<Proc>,
    pub addr: SocketAddr,
    /// What the broker tells clients to connect to (a proxy, in some fault tests).
    pub advertised: SocketAddr,
    /// `memory://` storage (benchmarks of our binaries) instead of durable sqlite.
    memory: bool,
    dir: PathBuf,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let addr = free_addr();
        Self::start_with(addr, addr, false).await
    }

    /// A broker that advertises `advertised` (e.g. a proxy in front of it).
    pub async fn start_advertising(advertised: SocketAddr) -> Self {
        Self::start_with(free_addr(), advertised, false).await
    }

    pub async fn start_with(addr: SocketAddr, advertised: SocketAddr, memory: bool) -> Self {
        let dir = std::env::temp_dir().join(unique("tansu"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut broker = Self {
            proc: None,
            addr,
            advertised,
            memory,
            dir,
        };
        broker.restart().await;
        broker
    }

    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    pub async fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let tansu = std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
                format!("{}/.cargo", std::env::var("HOME").unwrap_or_default())
            });
            let installed = format!("{home}/bin/tansu");
            if std::path::Path::new(&installed).exists() {
                installed
            } else {
                "tansu".into()
            }
        });
        let url = format!("tcp://{}", self.addr);
        let advertised = format!("tcp://{}", self.advertised);
        let mut cmd = Command::new(tansu);
        cmd.current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args([
                "--storage-engine",
                if self.memory {
                    "memory://tansu/"
                } else {
                    "sqlite://tansu.db"
                },
            ]);
        self.proc = Some(Proc::spawn("tansu", cmd));
        let addr = self.addr;
        eventually(
            "private broker port",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private ClickHouse 26.9 (the local stack's launcher, `deploy/local/clickhouse/serve.py`)
/// on free ports with its own data directory, for fault tests that stop the server itself.
/// The Python of the chdb-core virtual environment comes from `E2E_CHDB_PYTHON`
/// (`deploy/local/test` sets it).
pub struct PrivateClickHouse {
    pub proc: Proc,
    pub http: SocketAddr,
    dir: PathBuf,
}

impl PrivateClickHouse {
    pub async fn start() -> Self {
        let python = std::env::var("E2E_CHDB_PYTHON").unwrap_or_else(|_| {
            format!(
                "{}/../.local/chdb-venv/bin/python",
                env!("CARGO_MANIFEST_DIR")
            )
        });
        let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/clickhouse");
        let dir = std::env::temp_dir().join(unique("clickhouse"));
        for sub in ["data", "tmp", "user_files", "format_schemas", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("dir");
        }
        let (http, tcp) = (free_addr(), free_addr());
        let config = std::fs::read_to_string(deploy.join("config.xml.in"))
            .expect("config template")
            .replace("@STATE@", &dir.display().to_string())
            .replace("@HTTP_PORT@", &http.port().to_string())
            .replace("@TCP_PORT@", &tcp.port().to_string());
        std::fs::write(dir.join("config.xml"), config).expect("config");
        std::fs::copy(deploy.join("users.xml"), dir.join("users.xml")).expect("users");
        let mut cmd = Command::new(python);
        cmd.arg(deploy.join("serve.py")).arg(&dir).env("TZ", "UTC");
        let proc = Proc::spawn("clickhouse", cmd);
        let ping = format!("http://{http}/ping");
        wait_ready(&ping, Duration::from_secs(60)).await;
        Self { proc, http, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.proc.signal("CONT");
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis (Debian's `redis-server`) on a free port, without persistence, for
/// tests that stop it.
pub struct PrivateRedis {
    pub proc: Option<Proc>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut redis = Self {
            proc: None,
            addr: free_addr(),
            dir,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub async fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(&self.dir).args([
            "--port",
            &self.addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        self.proc = Some(Proc::spawn("redis", cmd));
        let addr = self.addr;
        eventually(
            "private redis port",
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// --- the fault report ----------------------------------------------------------------------

/// One row of the fault/attack table in tests/README.md, measured by a test.
pub struct FaultRow<'a> {
    pub fault: &'a str,
    pub load: &'a str,
    pub sent: usize,
    /// 2xx answers (HTTP) or broker acknowledgements (events produced directly).
    pub accepted: usize,
    pub rows: u64,
    pub duplicates: u64,
    pub lost: u64,
}

/// Appends a row to `$E2E_REPORT` (default `target/fault-report.md`) and prints it.
pub fn report(row: &FaultRow<'_>) {
    use std::io::Write;
    let path = std::env::var("E2E_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fault-report.md")
        });
    let line = format!(
        "| {} | {} | {} | {} | {} | {} | {} |\n",
        row.fault, row.load, row.sent, row.accepted, row.rows, row.duplicates, row.lost
    );
    print!("REPORT {line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

// --- shared helpers of tests and benchmarks -------------------------------------------------

/// A valid v1 click event (as ingest would publish it) with random hashes.
pub fn sample_event(click_id: &str, code: &str, landing_path: &str, is_bot: bool) -> Vec<u8> {
    shared::event::ClickEvent {
        v: 1,
        click_id: click_id.to_owned(),
        code: code.to_owned(),
        landing_path: landing_path.to_owned(),
        utm_source: "newsletter".into(),
        utm_medium: "email".into(),
        utm_campaign: "spring".into(),
        ip_hash: format!("{:064x}", rand::random::<u128>()),
        ua_hash: format!("{:064x}", rand::random::<u128>()),
        key_id: "k1".into(),
        is_bot,
        received_at_ms: shared::now_ms(),
        account_id: String::new(),
    }
    .encode()
}

/// Expands the Grafana ClickHouse plugin's time macros the way the plugin does.
pub fn expand_macros(sql: &str, from: u64, to: u64) -> String {
    const FILTER: &str = "$__timeFilter(";
    let mut out = sql
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"));
    while let Some(start) = out.find(FILTER) {
        let rest = &out[start + FILTER.len()..];
        let Some(end) = rest.find(')') else { break };
        let column = rest[..end].trim().to_owned();
        let replacement =
            format!("{column} >= toDateTime({from}) AND {column} <= toDateTime({to})");
        out.replace_range(start..start + FILTER.len() + end + 1, &replacement);
    }
    out
}

/// `E2E_SOAK_SECS` (default 0): extra seconds the load-holding fault tests keep going
/// (broker restart under load, ClickHouse outage, repeated consumer SIGKILLs). The normal
/// run fits in a few minutes; `E2E_SOAK_SECS=600 deploy/local/test -- --test exactly_once`
/// is the long soak.
pub fn soak_secs() -> u64 {
    std::env::var("E2E_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// --- process figures (benchmarks) ----------------------------------------------------------

const CLOCK_TICKS: f64 = 100.0;

/// User + system CPU seconds of a process so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / CLOCK_TICKS
}

/// Peak resident memory of a process (VmHWM), MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident memory of a process now (VmRSS), MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
