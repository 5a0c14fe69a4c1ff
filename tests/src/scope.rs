//! One test's isolated topic, database, registry and Redis prefix.

use crate::*;
use std::time::Duration;

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

    pub async fn consumer_command_on_terminal(
        &self,
        args: &[&str],
        plans: &std::path::Path,
    ) -> (i32, String) {
        self.registry
            .consumer_command_on_terminal(&self.brokers, &self.topic, args, plans)
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
                let (count, uniq) = ch.counts_if_exists(&table).await;
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
