//! Talking to ClickHouse: inserts under a known `query_id`, and the two questions the
//! exactly-once check asks (which offsets of a partition are stored, which click ids of a
//! partition were seen recently).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clickhouse::Client;

use crate::config::Config;
use crate::row::ClickRow;

#[derive(Clone)]
pub struct Writer {
    client: Client,
    table: String,
    insert_timeout: Duration,
}

impl Writer {
    pub fn new(config: &Config) -> Self {
        Self {
            client: base_client(config).with_database(&config.clickhouse_database),
            table: config.clickhouse_table.clone(),
            insert_timeout: Duration::from_millis(config.insert_timeout_ms),
        }
    }

    /// One INSERT of all `rows`, tagged with `query_id` so that after a failure we can wait
    /// until the server is really done with it.
    pub async fn insert(&self, rows: &[ClickRow], query_id: &str) -> clickhouse::error::Result<()> {
        let mut insert = self
            .client
            .insert::<ClickRow>(&self.table)
            .await?
            .with_setting("query_id", query_id)
            // The exactly-once design needs the insert to be synchronous: done when the
            // server answers. A current server may default `async_insert` to 1 (26.9 does),
            // where the answer can come before the rows are in a part.
            .with_setting("async_insert", "0")
            .with_timeouts(Some(self.insert_timeout), Some(self.insert_timeout));
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Waits (up to `limit`) until `query_id` no longer runs on the server.
    pub async fn wait_until_finished(
        &self,
        query_id: &str,
        limit: Duration,
    ) -> clickhouse::error::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let running: u64 = self
                .client
                .query("SELECT count() FROM system.processes WHERE query_id = ?")
                .bind(query_id)
                .fetch_one()
                .await?;
            if running == 0 {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stored offsets `>= from` for each given partition of `topic`.
    pub async fn stored_offsets(
        &self,
        topic: &str,
        from: &[(i32, i64)],
    ) -> clickhouse::error::Result<HashMap<i32, Vec<i64>>> {
        let mut out: HashMap<i32, Vec<i64>> = HashMap::new();
        if from.is_empty() {
            return Ok(out);
        }
        let conditions: Vec<String> = from
            .iter()
            .map(|(p, lo)| format!("(kafka_partition = {p} AND kafka_offset >= {lo})"))
            .collect();
        let sql = format!(
            "SELECT kafka_partition, kafka_offset FROM {} WHERE kafka_topic = ? AND ({})",
            self.table,
            conditions.join(" OR ")
        );
        let rows: Vec<(u16, u64)> = self.client.query(&sql).bind(topic).fetch_all().await?;
        for (p, o) in rows {
            out.entry(i32::from(p))
                .or_default()
                .push(i64::try_from(o).unwrap_or(i64::MAX));
        }
        Ok(out)
    }

    /// Click ids of one partition received at or after `since_secs`, with their times.
    pub async fn recent_click_ids(
        &self,
        topic: &str,
        partition: i32,
        since_secs: u32,
    ) -> clickhouse::error::Result<Vec<(String, u64)>> {
        let sql = format!(
            "SELECT click_id, received_at_ms FROM {} WHERE kafka_topic = ? AND kafka_partition = ? AND received_at >= toDateTime(?)",
            self.table
        );
        self.client
            .query(&sql)
            .bind(topic)
            .bind(partition)
            .bind(since_secs)
            .fetch_all()
            .await
    }

    pub async fn ping(&self) -> bool {
        self.client
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .is_ok()
    }
}

/// A client for the server, without a default database (migrations create it).
pub fn base_client(config: &Config) -> Client {
    Client::default()
        .with_url(&config.clickhouse_url)
        .with_user(&config.clickhouse_user)
        .with_password(&config.clickhouse_password)
        // Plain RowBinary: the row types mirror the migrations (checked by the end-to-end
        // tests); schema validation costs 5-10 % per row on the insert path (crate docs).
        .with_validation(false)
}
