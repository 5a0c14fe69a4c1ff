//! Talking to ClickHouse: plan records, plan inserts under their deduplication token, and
//! the two bounded questions a new owner asks (which rows of an old plan are stored, which
//! click ids a partition saw recently). Every query carries the settings it relies on.

use std::collections::HashMap;
use std::time::Duration;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use crate::attribution::{self, Scope};
use crate::config::Config;
use crate::plan::{PlanGroup, PlanRange, RecordedPlan};
use crate::row::{ClickRow, ConversionRow, Stored};

#[derive(Clone)]
pub struct Writer {
    client: Client,
    table: String,
    /// The raw clicks table (the conversions stream links its rows to clicks there).
    clicks_table: String,
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

/// Ids sent in one lookup query (as a literal list: the query text holds them).
const IDS_PER_QUERY: usize = 5_000;
/// Room for [`IDS_PER_QUERY`] ids of the longest kind (conversion keys, ~200 bytes) in the
/// query text; the server's default is 256 KiB.
const MAX_QUERY_SIZE: &str = "4194304";

/// A row of `conversion_clicks`: a click some conversion names.
#[derive(Debug, Row, Serialize)]
struct LinkedClick {
    click_id: String,
    account_id: String,
    code: String,
    landing_path: String,
    utm_source: String,
    utm_medium: String,
    utm_campaign: String,
    clicked_at_ms: u64,
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
            clicks_table: config.clickhouse_table.clone(),
            plans_table: format!("{table}_plans"),
            timeout: config.insert_timeout,
        }
    }

    fn timeout_secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }

    /// Where each of `ids` is stored already, if anywhere: `(id, partition, offset)`. The
    /// conversions stream asks this of every plan, so that a repeat of an event is stored
    /// once however late it comes (the retry window of invariant 5 is bounded; this is
    /// not). The table is ordered by the id: a primary-key lookup.
    pub async fn stored_ids<R: Stored>(
        &self,
        topic: &str,
        ids: &[&str],
    ) -> clickhouse::error::Result<Vec<(String, u16, u64)>> {
        let sql = format!(
            "SELECT {id}, kafka_partition, kafka_offset FROM {} WHERE {id} IN ? AND kafka_topic = ?",
            self.table,
            id = R::ID_COLUMN,
        );
        let mut found = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            found.extend(
                self.client
                    .query(&sql)
                    .bind(chunk)
                    .bind(topic)
                    .with_setting("max_execution_time", self.timeout_secs())
                    .with_setting("max_query_size", MAX_QUERY_SIZE)
                    .fetch_all::<(String, u16, u64)>()
                    .await?,
            );
        }
        Ok(found)
    }

    /// Links stored clicks and conversions (attribution reads the links, see
    /// `deploy/clickhouse/0010_conversions.sql`): after a plan of either stream is stored,
    /// the clicks its rows name or are named by are copied into `conversion_clicks`.
    /// Each side stores first and looks second, so whichever of a click and its conversion
    /// is stored last finds the other: the link is made whatever order they arrive in.
    /// Copying again is harmless (one row per click id).
    pub async fn link_clicks(&self, clicks: &[&ClickRow]) -> clickhouse::error::Result<()> {
        if clicks.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = clicks.iter().map(|c| c.click_id.as_str()).collect();
        // (click id, conversion key) of the conversions naming these clicks.
        let mut naming: Vec<(String, String)> = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            naming.extend(
                self.client
                    .query("SELECT click_id, conversion_key FROM conversions WHERE click_id IN ?")
                    .bind(chunk)
                    .with_setting("max_execution_time", self.timeout_secs())
                    .with_setting("max_query_size", MAX_QUERY_SIZE)
                    .fetch_all::<(String, String)>()
                    .await?,
            );
        }
        if naming.is_empty() {
            return Ok(());
        }
        let named: std::collections::HashSet<&str> =
            naming.iter().map(|(click, _)| click.as_str()).collect();
        let mut insert = self
            .client
            .insert::<LinkedClick>("conversion_clicks")
            .await?
            .with_setting("async_insert", "0")
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        for c in clicks
            .iter()
            .filter(|c| named.contains(c.click_id.as_str()))
        {
            insert
                .write(&LinkedClick {
                    click_id: c.click_id.clone(),
                    account_id: c.account_id.clone(),
                    code: c.code.clone(),
                    landing_path: c.landing_path.clone(),
                    utm_source: c.utm_source.clone(),
                    utm_medium: c.utm_medium.clone(),
                    utm_campaign: c.utm_campaign.clone(),
                    clicked_at_ms: c.received_at_ms,
                })
                .await?;
        }
        insert.end().await?;
        let keys: Vec<&str> = naming.iter().map(|(_, key)| key.as_str()).collect();
        attribution::recompute(
            &self.client,
            Scope::Conversions(&keys),
            &self.timeout_secs(),
        )
        .await
    }

    /// [`Self::link_clicks`] from the conversions' side: copies the clicks they name. Then,
    /// on both sides, the attribution of the customers concerned is computed anew
    /// ([`crate::attribution`]).
    pub async fn link_conversions(
        &self,
        conversions: &[&ConversionRow],
    ) -> clickhouse::error::Result<()> {
        let keys: Vec<&str> = conversions
            .iter()
            .map(|c| c.conversion_key.as_str())
            .collect();
        let mut ids: Vec<&str> = conversions
            .iter()
            .map(|c| c.click_id.as_str())
            .filter(|id| !id.is_empty())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let sql = format!(
            "INSERT INTO conversion_clicks (click_id, account_id, code, landing_path, \
             utm_source, utm_medium, utm_campaign, clicked_at_ms) \
             SELECT click_id, account_id, code, landing_path, utm_source, utm_medium, \
             utm_campaign, received_at_ms FROM {} WHERE click_id IN ?",
            self.clicks_table
        );
        for chunk in ids.chunks(IDS_PER_QUERY) {
            self.client
                .query(&sql)
                .bind(chunk)
                .with_setting("max_execution_time", self.timeout_secs())
                .with_setting("max_query_size", MAX_QUERY_SIZE)
                .execute()
                .await?;
        }
        // Stored and linked: the attribution of their customers is computed anew.
        attribution::recompute(
            &self.client,
            Scope::Conversions(&keys),
            &self.timeout_secs(),
        )
        .await
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
