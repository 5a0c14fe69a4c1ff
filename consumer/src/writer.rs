//! Talking to ClickHouse: plan records, plan inserts under their deduplication token, and
//! the two bounded questions a new owner asks (which rows of an old plan are stored, which
//! click ids a partition saw recently). Every query carries the settings it relies on.

use std::collections::HashMap;
use std::time::Duration;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::attribution::{self, Scope, Seed};
use crate::config::Config;
use crate::idset::query_in;
use crate::plan::{PlanGroup, PlanRange, RecordedPlan};
use crate::row::Stored;

#[derive(Clone)]
pub struct Writer {
    client: Client,
    table: String,
    plans_table: String,
    /// Of one insert, and of each plan or id query.
    timeout: Duration,
}

/// A row of `{clicks_table}_plans` as written (`planned_at` is the server's default).
#[derive(Debug, Row, Serialize)]
struct PlanRow<'a> {
    topic: &'a str,
    partition: u16,
    lo: u64,
    hi: u64,
    digest: &'a str,
    head: &'a str,
    member: &'a str,
    group_id: &'a str,
    group_starts: Vec<(u16, u64)>,
}

#[derive(Debug, Row, Deserialize)]
struct RecordedRow {
    partition: u16,
    lo: u64,
    hi: u64,
    digest: String,
    head: String,
    member: String,
    planned_at_ms: u64,
    group_id: String,
    group_starts: Vec<(u16, u64)>,
}

/// Ids sent in one lookup query (the query text holds them).
const IDS_PER_QUERY: usize = 5_000;

/// Room for [`IDS_PER_QUERY`] ids of the longest kind (conversion keys, ~200 bytes) in the
/// query text; the server's default is 256 KiB.
const MAX_QUERY_SIZE: &str = "4194304";

/// A row of `conversion_claims` as written (`claimed_at` is the server's default).
#[derive(Debug, Row, Serialize)]
struct Claim<'a> {
    conversion_key: &'a str,
    kafka_topic: &'a str,
    kafka_partition: u16,
    kafka_offset: u64,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Writer {
    /// The writer of the clicks table.
    pub fn new(config: &Config) -> Self {
        Self::for_table(config, &config.clickhouse_table)
    }

    /// The writer of another table of the same design (its plans in `{table}_plans`).
    pub fn for_table(config: &Config, table: &str) -> Self {
        Self {
            client: base_client(config).with_database(&config.clickhouse_database),
            table: table.to_owned(),
            plans_table: format!("{table}_plans"),
            timeout: config.insert_timeout,
        }
    }

    fn timeout_secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }

    /// Records a claim for each conversion of the plans in hand (`(key, partition,
    /// offset)`), then reads every claim of those keys back: for each key, the position
    /// of the first claim in commit order (`_block_number`, then partition and offset),
    /// which is where that conversion is stored, whoever claimed it and whenever
    /// (migration 0011). Claims are never deduplicated: two identical ones are harmless.
    pub async fn claim(
        &self,
        topic: &str,
        claims: &[(&str, u16, u64)],
    ) -> clickhouse::error::Result<HashMap<String, (u16, u64)>> {
        let mut winners = HashMap::new();
        if claims.is_empty() {
            return Ok(winners);
        }
        let mut insert = self
            .client
            .insert::<Claim<'_>>("conversion_claims")
            .await?
            .with_setting("async_insert", "0")
            .with_setting("insert_deduplicate", "0")
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        for (key, partition, offset) in claims {
            insert
                .write(&Claim {
                    conversion_key: key,
                    kafka_topic: topic,
                    kafka_partition: *partition,
                    kafka_offset: *offset,
                })
                .await?;
        }
        insert.end().await?;
        let keys: Vec<&str> = claims.iter().map(|(key, _, _)| *key).collect();
        for chunk in keys.chunks(IDS_PER_QUERY) {
            let rows: Vec<(String, u16, u64)> = query_in(
                &self.client,
                "SELECT conversion_key, \
                 argMin(kafka_partition, (_block_number, kafka_partition, kafka_offset)), \
                 argMin(kafka_offset, (_block_number, kafka_partition, kafka_offset)) \
                 FROM conversion_claims WHERE conversion_key IN {ids} AND kafka_topic = ? \
                 GROUP BY conversion_key",
                chunk,
            )
            .bind(topic)
            .with_setting("max_execution_time", self.timeout_secs())
            .with_setting("max_query_size", MAX_QUERY_SIZE)
            .with_setting("select_sequential_consistency", "1")
            .fetch_all()
            .await?;
            winners.extend(rows.into_iter().map(|(key, p, o)| (key, (p, o))));
        }
        Ok(winners)
    }

    /// The stored conversions that name any of `click_ids`, as attribution seeds (an index
    /// ordered by click id: a few granules per id, whatever is stored).
    pub async fn conversions_naming(
        &self,
        click_ids: &[&str],
    ) -> clickhouse::error::Result<Vec<Seed>> {
        let mut seeds = Vec::new();
        for chunk in click_ids.chunks(IDS_PER_QUERY) {
            let rows: Vec<(String, String, u64)> = query_in(
                &self.client,
                "SELECT account_id, hex(customer_hash), occurred_at_ms FROM conversions_by_click \
                 WHERE click_id IN {ids}",
                chunk,
            )
            .with_setting("max_execution_time", self.timeout_secs())
            .with_setting("max_query_size", MAX_QUERY_SIZE)
            .fetch_all()
            .await?;
            seeds.extend(
                rows.into_iter()
                    .filter_map(|(account_id, hash, occurred_at_ms)| {
                        let mut customer_hash = [0u8; 32];
                        hex::decode_to_slice(&hash, &mut customer_hash).ok()?;
                        Some(Seed {
                            account_id,
                            customer_hash,
                            occurred_at_ms,
                        })
                    }),
            );
        }
        Ok(seeds)
    }

    /// The attribution of the conversions `scope` names, computed anew
    /// ([`crate::attribution`]).
    pub async fn attribute(&self, scope: Scope<'_>) -> clickhouse::error::Result<()> {
        attribution::recompute(&self.client, scope, &self.timeout_secs()).await
    }

    /// Records our proposals (one insert for all partitions), each with the group it is
    /// inserted in. Plans are never deduplicated: two identical proposals are harmless, a
    /// lost one is not.
    pub async fn record_plans(
        &self,
        topic: &str,
        plans: &[(PlanRange, Option<PlanGroup>)],
        member: &str,
    ) -> clickhouse::error::Result<()> {
        let mut insert = self
            .client
            .insert::<PlanRow<'_>>(&self.plans_table)
            .await?
            .with_setting("async_insert", "0")
            .with_setting("insert_deduplicate", "0")
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        for (p, group) in plans {
            insert
                .write(&PlanRow {
                    topic,
                    partition: u16::try_from(p.partition).unwrap_or(u16::MAX),
                    lo: to_u64(p.lo),
                    hi: to_u64(p.hi),
                    digest: &p.digest,
                    head: &p.head,
                    member,
                    group_id: group.as_ref().map_or("", |g| g.id.as_str()),
                    group_starts: group.as_ref().map_or_else(Vec::new, |g| {
                        g.starts
                            .iter()
                            .map(|(p, lo)| (u16::try_from(*p).unwrap_or(u16::MAX), to_u64(*lo)))
                            .collect()
                    }),
                })
                .await?;
        }
        insert.end().await
    }

    /// Every recorded plan starting at one of `starts` (partition, lo), per partition in
    /// commit order (`_block_number`): the first one at a start offset is the one to follow.
    /// Reads only the given keys of the plans table's sort key.
    pub async fn recorded_plans(
        &self,
        topic: &str,
        starts: &[(i32, i64)],
    ) -> clickhouse::error::Result<HashMap<i32, Vec<RecordedPlan>>> {
        let mut out: HashMap<i32, Vec<RecordedPlan>> = HashMap::new();
        if starts.is_empty() {
            return Ok(out);
        }
        let keys: Vec<String> = starts
            .iter()
            .map(|(p, lo)| format!("({p}, {lo})"))
            .collect();
        let sql = format!(
            "SELECT partition, lo, hi, digest, head, member, \
             toUInt64(toUnixTimestamp64Milli(planned_at)) AS planned_at_ms, group_id, group_starts \
             FROM {} WHERE topic = ? AND (partition, lo) IN ({}) \
             ORDER BY partition, lo, _block_number",
            self.plans_table,
            keys.join(", ")
        );
        let rows: Vec<RecordedRow> = self
            .client
            .query(&sql)
            .bind(topic)
            .with_setting(
                "max_execution_time",
                self.timeout.as_secs().max(1).to_string(),
            )
            .with_setting("select_sequential_consistency", "1")
            .fetch_all()
            .await?;
        for r in rows {
            out.entry(i32::from(r.partition))
                .or_default()
                .push(RecordedPlan {
                    range: PlanRange {
                        partition: i32::from(r.partition),
                        lo: i64::try_from(r.lo).unwrap_or(i64::MAX),
                        hi: i64::try_from(r.hi).unwrap_or(i64::MAX),
                        digest: r.digest,
                        head: r.head,
                    },
                    member: r.member,
                    planned_at_ms: r.planned_at_ms,
                    group: (!r.group_id.is_empty() && r.group_starts.len() >= 2).then(|| {
                        PlanGroup {
                            id: r.group_id,
                            starts: r
                                .group_starts
                                .iter()
                                .map(|(p, lo)| {
                                    (i32::from(*p), i64::try_from(*lo).unwrap_or(i64::MAX))
                                })
                                .collect(),
                        }
                    }),
                });
        }
        Ok(out)
    }

    /// One INSERT of one plan's rows (or a plan group's) under its deduplication token:
    /// inserting the same plan again (a retry, a replay by another member, an insert that
    /// outlived its sender) is a no-op in the table and in every view's target table.
    pub async fn insert_plan<'a, R: Stored>(
        &self,
        rows: impl Iterator<Item = &'a R>,
        token: &str,
    ) -> clickhouse::error::Result<usize> {
        let mut insert = self
            .client
            .insert::<R>(&self.table)
            .await?
            // Done when the server answers (a current server may default this to 1).
            .with_setting("async_insert", "0")
            .with_setting("insert_deduplicate", "1")
            .with_setting("insert_deduplication_token", token)
            .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
            // One block per plan: the token names the whole plan.
            .with_setting("max_insert_block_size", "10000000")
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        let mut n = 0;
        for row in rows {
            insert.write(row).await?;
            n += 1;
        }
        insert.end().await?;
        Ok(n)
    }

    /// `(offset, id)` of the rows of one partition stored at offsets `lo..=hi`,
    /// looked up within the months of `received` (min, max ingest time in seconds) so that
    /// only those partitions of the table are read.
    pub async fn stored_in_plan<R: Stored>(
        &self,
        topic: &str,
        range: &PlanRange,
        received: (u32, u32),
    ) -> clickhouse::error::Result<Vec<(u64, String)>> {
        let sql = format!(
            "SELECT kafka_offset, {} FROM {} \
             WHERE received_at >= toDateTime(?) AND received_at <= toDateTime(?) \
             AND kafka_topic = ? AND kafka_partition = ? AND kafka_offset >= ? AND kafka_offset <= ?",
            R::ID_COLUMN, self.table
        );
        self.client
            .query(&sql)
            .bind(received.0)
            .bind(received.1)
            .bind(topic)
            .bind(range.partition)
            .bind(to_u64(range.lo))
            .bind(to_u64(range.hi))
            .with_setting(
                "max_execution_time",
                self.timeout.as_secs().max(1).to_string(),
            )
            .fetch_all()
            .await
    }

    /// Ids of one partition's rows received at or after `since_secs`, with their times.
    pub async fn recent_ids<R: Stored>(
        &self,
        topic: &str,
        partition: i32,
        since_secs: u32,
    ) -> clickhouse::error::Result<Vec<(String, u64)>> {
        let sql = format!(
            "SELECT {}, received_at_ms FROM {} WHERE received_at >= toDateTime(?) \
             AND kafka_topic = ? AND kafka_partition = ?",
            R::ID_COLUMN,
            self.table
        );
        self.client
            .query(&sql)
            .bind(since_secs)
            .bind(topic)
            .bind(partition)
            .with_setting(
                "max_execution_time",
                self.timeout.as_secs().max(1).to_string(),
            )
            .fetch_all()
            .await
    }

    /// Conversions stored between a day and a minute ago that have no attribution row:
    /// zero unless a stored plan was never settled (see [`crate::settle`]). Reads the
    /// last day only, through indexes ordered by the time stored and by the key.
    pub async fn unattributed_conversions(&self) -> clickhouse::error::Result<u64> {
        self.client
            .query(
                "SELECT count() FROM conversions_stored \
                 WHERE stored_at >= now() - INTERVAL 1 DAY AND stored_at < now() - INTERVAL 1 MINUTE \
                 AND conversion_key NOT IN (SELECT conversion_key FROM conversion_attribution \
                 WHERE conversion_key IN (SELECT conversion_key FROM conversions_stored \
                 WHERE stored_at >= now() - INTERVAL 1 DAY))",
            )
            .with_setting("max_execution_time", self.timeout_secs())
            .fetch_one()
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
