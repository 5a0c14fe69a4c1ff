//! The consume → batch → insert → commit loop, and why it writes every click exactly once.
//!
//! # Invariants
//! 1. **Nothing is committed that is not stored.** Offsets (`hi + 1` per partition) are
//!    committed only after ClickHouse accepted the INSERT holding the batch's rows.
//! 2. **Nothing is stored twice.** Every row carries `(kafka_topic, kafka_partition,
//!    kafka_offset)`. A partition is *checking* after it is assigned (a previous owner may
//!    have inserted rows whose commit never happened) and after a failed insert (the
//!    server may have stored some parts of it). Before inserting rows of a checking
//!    partition, the loop asks ClickHouse which offsets `>= lo` of that partition are
//!    already stored and drops those rows. The partition stops checking once a check
//!    finds nothing stored beyond the batch. This does not need dedup tokens, which 18.16
//!    lacks, and it holds whether or not the last commit reached the broker.
//! 3. **No check races an insert.** Inserts carry a `query_id`; after a failure the loop
//!    waits until that query has left `system.processes` before it checks. Rebalance
//!    callbacks run inside `recv()` on this task, never during an insert, and every insert
//!    attempt is bounded by a timeout far below `max.poll.interval.ms`, so a partition is
//!    never written by two members at once. Rows of revoked partitions are dropped
//!    unwritten: the next owner reads them again from the committed offset.
//! 4. **A client retry is one click.** The message key is the click id, so a retried click
//!    lands in the partition of the first one; rows whose click id was written within the
//!    dedup window (remembered per partition, reloaded from ClickHouse on assignment) or
//!    appears earlier in the batch are dropped.
//! 5. **Bad messages never block a partition.** An undecodable or invalid message goes to
//!    the dead-letter topic (acknowledged before its offset can be committed) and its
//!    offset is covered by the batch range.
//! 6. **Bounded memory.** With ClickHouse down the loop retries with capped exponential
//!    backoff and keeps buffering until `max_buffered_rows`, then pauses fetching until an
//!    insert succeeds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, RecentIds};
use crate::config::Config;
use crate::kafka::{self, Consumer, DeadLetter, Rebalanced};
use crate::row::ClickRow;
use crate::writer::Writer;
use shared::event::ClickEvent;
use shared::metric_names as m;

const MIN_BACKOFF: Duration = Duration::from_millis(100);

pub struct Pipeline {
    config: Config,
    consumer: Arc<Consumer>,
    dlq: FutureProducer,
    writer: Writer,
    batch: Batch,
    recent: HashMap<i32, RecentIds>,
    checking: HashSet<i32>,
    ids_to_load: HashSet<i32>,
    failed_query: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    paused: bool,
    /// Since when this member has had no partitions (see `Config::rejoin_idle_secs`).
    idle_since: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("the failed insert {0} is still running on the server")]
    StillRunning(String),
}

impl Pipeline {
    pub fn new(
        config: Config,
        consumer: Arc<Consumer>,
        dlq: FutureProducer,
        writer: Writer,
    ) -> Self {
        Self {
            config,
            consumer,
            dlq,
            writer,
            batch: Batch::default(),
            recent: HashMap::new(),
            checking: HashSet::new(),
            ids_to_load: HashSet::new(),
            failed_query: None,
            retry_at: None,
            backoff: MIN_BACKOFF,
            paused: false,
            idle_since: Some(Instant::now()),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.config.kafka_topic])?;
        let consumer = Arc::clone(&self.consumer);
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Callbacks run inside `recv()`, also when it returns nothing to us (a quiet
            // topic, or the timer won the select): apply them before anything may flush.
            self.apply_rebalances();
            if self.flush_due() {
                self.flush(CommitMode::Async).await;
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                msg = consumer.recv() => {
                    self.apply_rebalances();
                    match msg {
                        Ok(msg) => self.handle(&msg).await,
                        Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                    }
                    self.apply_backpressure();
                }
                () = tokio::time::sleep_until(wake.into()) => {}
                _ = gauges.tick() => {
                    self.update_gauges();
                    self.rejoin_if_idle();
                }
            }
        }
        self.drain().await;
        Ok(())
    }

    /// SIGTERM: insert the batch in hand (retrying within the grace period), commit
    /// synchronously, leave the group.
    async fn drain(&mut self) {
        tracing::info!(
            rows = self.batch.len(),
            "shutting down: flushing the batch in hand"
        );
        let deadline = Instant::now() + Duration::from_secs(self.config.shutdown_grace_secs);
        while !self.batch.is_empty() {
            if self.flush(CommitMode::Sync).await {
                break;
            }
            let wait = self
                .retry_at
                .map_or(MIN_BACKOFF, |t| t.saturating_duration_since(Instant::now()));
            if Instant::now() + wait >= deadline {
                tracing::error!(
                    rows = self.batch.len(),
                    "could not insert the last batch; not committed, it will be read again"
                );
                break;
            }
            tokio::time::sleep(wait).await;
        }
        self.consumer.unsubscribe();
        self.apply_rebalances();
        self.update_gauges();
        tracing::info!("consumer stopped");
    }

    fn flush_due(&self) -> bool {
        if self.batch.is_empty() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        self.batch.len() >= self.config.batch_max_rows
            || self
                .batch
                .oldest()
                .is_some_and(|t| t.elapsed() >= self.config.batch_max_age())
            || self.retry_at.is_some()
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let age = self
            .batch
            .oldest()
            .map_or(far, |t| t + self.config.batch_max_age());
        // While a retry is scheduled, nothing flushes before it.
        self.retry_at.unwrap_or(age)
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>) {
        metrics::counter!(m::CONSUMED_TOTAL).increment(1);
        let (partition, offset) = (msg.partition(), msg.offset());
        let payload = msg.payload().unwrap_or_default();
        let row = if payload.is_empty() {
            Err("empty payload".to_owned())
        } else {
            ClickEvent::decode(payload)
                .map_err(|e| e.to_string())
                .and_then(|event| ClickRow::new(event, &self.config.kafka_topic, partition, offset))
        };
        match row {
            Ok(row) => self.batch.push(row, partition, offset),
            Err(reason) => {
                tracing::warn!(partition, offset, %reason, "dead-lettering message");
                let letter = DeadLetter {
                    key: msg.key(),
                    payload,
                    partition,
                    offset,
                    reason: &reason,
                };
                kafka::send_dead_letter(&self.dlq, &self.config, &letter).await;
                metrics::counter!(m::DLQ_TOTAL, "reason" => short_reason(&reason)).increment(1);
                self.batch.cover(partition, offset);
            }
        }
    }

    fn apply_rebalances(&mut self) {
        for event in self.consumer.context().take_events() {
            match event {
                Rebalanced::Revoked(parts) => {
                    let parts: HashSet<i32> = parts.into_iter().collect();
                    self.batch.drop_partitions(&parts);
                    for p in &parts {
                        self.recent.remove(p);
                        self.checking.remove(p);
                        self.ids_to_load.remove(p);
                    }
                }
                Rebalanced::Assigned(parts) => {
                    self.idle_since = parts.is_empty().then(Instant::now);
                    let window_ms = self.config.dedup_window_secs * 1000;
                    for p in parts {
                        self.checking.insert(p);
                        self.ids_to_load.insert(p);
                        self.recent
                            .insert(p, RecentIds::new(window_ms, self.config.dedup_max_ids));
                    }
                    if self.paused {
                        self.set_paused(true, true);
                    }
                }
            }
        }
    }

    fn rejoin_if_idle(&mut self) {
        let limit = Duration::from_secs(self.config.rejoin_idle_secs);
        if limit.is_zero() || self.idle_since.is_none_or(|t| t.elapsed() < limit) {
            return;
        }
        tracing::warn!(idle = ?limit, "no partitions assigned for a while: re-joining the group");
        self.consumer.unsubscribe();
        if let Err(e) = self.consumer.subscribe(&[&self.config.kafka_topic]) {
            tracing::warn!(error = %e, "re-subscribe failed");
        }
        self.idle_since = Some(Instant::now());
    }

    fn apply_backpressure(&mut self) {
        if !self.paused && self.batch.len() >= self.config.max_buffered_rows {
            tracing::warn!(
                rows = self.batch.len(),
                "buffer full: pausing fetch until ClickHouse takes rows"
            );
            self.set_paused(true, false);
        }
    }

    fn set_paused(&mut self, pause: bool, force: bool) {
        if self.paused == pause && !force {
            return;
        }
        match self.consumer.assignment() {
            Ok(assignment) => {
                let result = if pause {
                    self.consumer.pause(&assignment)
                } else {
                    self.consumer.resume(&assignment)
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, pause, "could not change fetch state");
                }
            }
            Err(e) => tracing::warn!(error = %e, "no assignment to pause or resume"),
        }
        self.paused = pause;
    }

    /// One flush attempt. On failure, schedules the retry and returns false.
    async fn flush(&mut self, commit: CommitMode) -> bool {
        match self.try_flush(commit).await {
            Ok(()) => {
                self.backoff = MIN_BACKOFF;
                self.retry_at = None;
                metrics::gauge!(m::CLICKHOUSE_UP).set(1.0);
                if self.paused {
                    self.set_paused(false, false);
                }
                true
            }
            Err(e) => {
                metrics::counter!(m::INSERT_ERRORS_TOTAL).increment(1);
                metrics::gauge!(m::CLICKHOUSE_UP).set(0.0);
                tracing::warn!(error = %e, rows = self.batch.len(), retry_in = ?self.backoff, "insert failed; keeping the batch");
                self.checking.extend(self.batch.ranges().keys().copied());
                self.retry_at = Some(Instant::now() + self.backoff);
                let max = Duration::from_millis(self.config.retry_max_backoff_ms);
                self.backoff = (self.backoff * 2).min(max);
                false
            }
        }
    }

    async fn try_flush(&mut self, commit: CommitMode) -> Result<(), FlushError> {
        if let Some(query_id) = self.failed_query.take() {
            if !self
                .writer
                .wait_until_finished(&query_id, Duration::from_secs(30))
                .await?
            {
                self.failed_query = Some(query_id.clone());
                return Err(FlushError::StillRunning(query_id));
            }
        }
        let topic = self.config.kafka_topic.clone();

        // Invariant 2: drop rows a previous attempt or owner already stored.
        let to_check: Vec<(i32, i64)> = self
            .batch
            .ranges()
            .iter()
            .filter(|(p, _)| self.checking.contains(p))
            .map(|(p, (lo, _))| (*p, *lo))
            .collect();
        let mut settled = Vec::new();
        if !to_check.is_empty() {
            let stored = self.writer.stored_offsets(&topic, &to_check).await?;
            let dropped = self.batch.drop_stored(&stored);
            if dropped > 0 {
                tracing::info!(dropped, "rows already in ClickHouse skipped");
                metrics::counter!(m::DUPLICATES_SKIPPED_TOTAL, "cause" => "already_stored")
                    .increment(dropped as u64);
            }
            for (p, _) in &to_check {
                let hi = self.batch.ranges().get(p).map_or(i64::MAX, |r| r.1);
                if stored
                    .get(p)
                    .is_none_or(|offsets| offsets.iter().all(|o| *o <= hi))
                {
                    settled.push(*p);
                }
            }
        }

        // Invariant 4: load the click ids this partition saw recently, once per assignment.
        let load: Vec<i32> = self
            .batch
            .ranges()
            .keys()
            .filter(|p| self.ids_to_load.contains(p))
            .copied()
            .collect();
        let window_ms = self.config.dedup_window_secs * 1000;
        let since =
            u32::try_from(shared::now_ms().saturating_sub(window_ms) / 1000).unwrap_or(u32::MAX);
        for p in load {
            let ids = self.writer.recent_click_ids(&topic, p, since).await?;
            let recent = self
                .recent
                .entry(p)
                .or_insert_with(|| RecentIds::new(window_ms, self.config.dedup_max_ids));
            for (id, at) in ids {
                recent.insert(&id, at);
            }
            self.ids_to_load.remove(&p);
        }
        let repeated = self.batch.drop_repeated_ids(&self.recent);
        if repeated > 0 {
            metrics::counter!(m::DUPLICATES_SKIPPED_TOTAL, "cause" => "same_click_id")
                .increment(repeated as u64);
        }

        let rows = self.batch.rows();
        if !rows.is_empty() {
            let query_id = format!("referral-consumer-{:032x}", rand::random::<u128>());
            let started = Instant::now();
            if let Err(e) = self.writer.insert(rows, &query_id).await {
                self.failed_query = Some(query_id);
                return Err(e.into());
            }
            metrics::histogram!(m::INSERT_DURATION).record(started.elapsed().as_secs_f64());
            metrics::histogram!(m::BATCH_ROWS).record(rows.len() as f64);
            metrics::counter!(m::INSERTED_ROWS_TOTAL).increment(rows.len() as u64);
        }

        // Stored: remember the ids, settle checks, commit.
        let now = shared::now_ms();
        for row in self.batch.rows() {
            if let Some(recent) = self.recent.get_mut(&i32::from(row.kafka_partition)) {
                recent.insert(&row.click_id, row.received_at_ms);
            }
        }
        for recent in self.recent.values_mut() {
            recent.expire(now);
        }
        for p in settled {
            self.checking.remove(&p);
        }
        self.commit(commit);
        self.batch.clear();
        Ok(())
    }

    /// Commits `hi + 1` for each partition of the batch. A failed commit is harmless: the
    /// rows are stored, and invariant 2 skips them when they are read again.
    fn commit(&self, mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        for (p, (_, hi)) in self.batch.ranges() {
            if let Err(e) =
                tpl.add_partition_offset(&self.config.kafka_topic, *p, Offset::Offset(hi + 1))
            {
                tracing::warn!(error = %e, partition = p, "bad offset for commit");
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "offset commit failed; rows are stored and will be skipped if read again");
        }
    }

    fn update_gauges(&self) {
        let age = self
            .batch
            .oldest()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        metrics::gauge!(m::OLDEST_UNFLUSHED_AGE).set(age);
        metrics::gauge!(m::BUFFERED_ROWS).set(self.batch.len() as f64);
    }
}

/// A low-cardinality label from a decode error text.
fn short_reason(reason: &str) -> &'static str {
    if reason.starts_with("not a click event") {
        "malformed"
    } else if reason.starts_with("unsupported event version") {
        "version"
    } else if reason.starts_with("invalid") {
        "invalid"
    } else if reason.starts_with("empty") {
        "empty"
    } else {
        "other"
    }
}
