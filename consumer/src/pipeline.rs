//! The consume → plan → insert → commit loop, and why it writes every click exactly once.
//!
//! # Invariants
//! 1. **Nothing is committed that is not stored.** A partition's offset `hi + 1` is
//!    committed only after ClickHouse accepted the insert of the plan ending at `hi`.
//! 2. **Every insert is a plan, and a plan is inserted at most once at the server.** A plan
//!    is one partition's offsets `lo..=hi` plus the digest of the messages there
//!    ([`crate::plan`]). Its rows go in one INSERT with `insert_deduplication_token` made
//!    from the plan, into a table with a deduplication window, with
//!    `deduplicate_blocks_in_dependent_materialized_views`: sending a plan again (our retry
//!    after an error or a timeout, another member's replay, an insert that outlived its
//!    sender) stores nothing new in the table or in any view's target, while a view that
//!    failed the first time gets its rows.
//! 3. **Every member cuts the same plans.** Before inserting, a member records its
//!    proposal (`{table}_plans`) and reads back every plan recorded at that start offset;
//!    the first one in commit order (`_block_number`) whose messages are the ones in hand
//!    wins, and everyone inserts exactly the winner. So a new owner after a rebalance, a
//!    crash or an offset reset follows the cuts of whoever wrote there before, even while
//!    that member's insert is still running on the server, or if a stalled member wakes up
//!    and sends a late insert or a late proposal. Plans of an older incarnation of the topic
//!    (same offsets, other messages) have other digests and are passed over.
//! 4. **Bounded work, bounded time; no insert after a revoke.** A flush (ownership check,
//!    id reload, proposal, plan read, inserts) has one deadline (`CONSUMER_FLUSH_DEADLINE_MS`)
//!    far below `max.poll.interval.ms`, so the member keeps polling and stays in its group;
//!    each query reads only the keys it needs. When the deadline passes, the plans in hand
//!    stay as they are and are sent again (invariant 2). Right before proposing and before
//!    inserting, partitions no longer in the assignment are dropped unwritten.
//!    A flush runs in a task of its own on the partitions it writes, moved out of the loop,
//!    while the loop goes on receiving and decoding into fresh buffers (fetching and
//!    inserting overlap; they are merged back when the flush returns). At most one flush is
//!    in flight. A revoke callback (it runs inside `recv`) waits until that flush is done,
//!    and rebalance events are applied only after its partitions are back: no insert for a
//!    partition happens after its revoke returned.
//! 5. **A client retry is one click.** The message key is the click id, so a retried click
//!    lands in the partition of the first one; a row whose click id was written within the
//!    dedup window of *ingest* time (remembered per partition after every stored plan,
//!    replays included; reloaded from ClickHouse on assignment) or appears earlier in the
//!    plan is not sent.
//! 6. **Bad messages never block a partition.** An undecodable or invalid message goes to
//!    the dead-letter topic (acknowledged before its offset can be in a plan). A dead letter
//!    the broker refuses for good, or does not take within the deadline, stops the process
//!    with a clear message: its offset is never committed.
//! 7. **Bounded memory.** With ClickHouse down the loop retries with capped exponential
//!    backoff and keeps buffering until `max_buffered_rows`, then pauses fetching.
//!
//! Old replays: the server's deduplication window is a number of blocks. A plan recorded
//! by another member longer ago than `CONSUMER_DEDUP_TRUST_SECS` may have left the window,
//! so before replaying it the member asks which of its offsets are stored (bounded to the
//! plan's offsets and ingest months) and sends only the rest.
//!
//! # Plan groups
//! Each insert makes a part in the table and in every view's target table, which costs the
//! server far more than the rows of a small batch (consumer/README.md, "Plan groups"). So the plans a
//! member proposes in one flush are recorded as one group (a few groups for a large flush,
//! about `GROUP_MIN_ROWS` each, at most `CONSUMER_INSERT_CONCURRENCY`) and go in as one
//! INSERT under the group's token ([`PlanGroup`]). What keeps invariant 2:
//! * A group is **whole** when, at each of its start offsets, the plan everyone follows is
//!   the group's own ([`group_is_whole`], decided from the plans table alone, so every
//!   member decides alike, and for good). Only a whole group is ever inserted as a group,
//!   always with all of its plans, by a member holding all of them.
//! * A plan whose group is not whole can never go in with its group: it goes in alone
//!   under its own token, like a plan without a group (plans recorded before groups).
//! * A member holding only part of a whole group (its other partitions moved elsewhere
//!   after a failed insert, a crash or a lost session) does not insert its part while the
//!   group's insert may still land somewhere: it waits until the group was recorded
//!   `CONSUMER_DEDUP_TRUST_SECS` ago, then asks which rows are stored and sends the rest
//!   alone, exactly like an old replay. Those partitions stall that long; the others go on.
//!
//! Clustered ClickHouse: see deploy/README.md ("Clustered ClickHouse"). In short: replicated
//! tables deduplicate by default (`replicated_deduplication_window`), views too with the
//! insert setting used here; the plans table must be replicated, and the plan read-back
//! must see every plan committed before it (`select_sequential_consistency = 1` with
//! `insert_quorum`, or one replica for the consumer's traffic).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{self, Consumer, DeadLetter, DeadLetterError, Rebalanced};
use crate::partition::{Agreement, PartitionState, RecentIds};
use crate::plan::{group_is_whole, message_hash, PlanGroup, PlanRange, RecordedPlan};
use crate::row::{Stored, Stream};
use crate::settle;
use crate::writer::Writer;
use shared::metric_names as m;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// After a flush in which a partition had to wait for more messages (an earlier plan
/// reaches past them), the next flush comes no sooner than this.
const WAIT_FOR_MESSAGES: Duration = Duration::from_millis(100);
/// Messages taken per pass of the loop when librdkafka already holds them.
const DRAIN_MAX: u64 = 1024;

type Partitions<R> = BTreeMap<i32, PartitionState<R>>;

/// What a flush needs besides the partitions it writes; shared with the flush's task.
struct Flusher {
    config: Config,
    consumer: Arc<Consumer>,
    writer: Writer,
    /// This process in the plans table.
    member: String,
}

/// A flush in its own task: it gives back the partitions it took, and its outcome.
type InFlight<R> = tokio::task::JoinHandle<(Partitions<R>, Result<bool, FlushError>)>;

pub struct Pipeline<R: Stored> {
    config: Config,
    consumer: Arc<Consumer>,
    dlq: FutureProducer,
    flusher: Arc<Flusher>,
    partitions: Partitions<R>,
    in_flight: Option<InFlight<R>>,
    /// Rows the flush in flight took with it.
    in_flight_rows: usize,
    retry_at: Option<Instant>,
    backoff: Duration,
    paused: bool,
    /// Since when this member has had no partitions (see `Config::rejoin_idle_secs`).
    idle_since: Option<Instant>,
    consumed: metrics::Counter,
}

#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("the flush did not finish within {0:?}; the plans in hand will be sent again")]
    Deadline(Duration),
}

/// Ends the loop: the process must stop (see invariant 6).
#[derive(Debug, thiserror::Error)]
#[error("partition {partition} offset {offset}: {cause}")]
pub struct Fatal {
    partition: i32,
    offset: i64,
    cause: DeadLetterError,
}

impl<R: Stored> Pipeline<R> {
    pub fn new(
        config: Config,
        consumer: Arc<Consumer>,
        dlq: FutureProducer,
        writer: Writer,
    ) -> Self {
        let flusher = Arc::new(Flusher {
            config: config.clone(),
            consumer: Arc::clone(&consumer),
            writer,
            member: format!("consumer-{:016x}", rand::random::<u64>()),
        });
        Self {
            config,
            consumer,
            dlq,
            flusher,
            partitions: BTreeMap::new(),
            in_flight: None,
            in_flight_rows: 0,
            retry_at: None,
            backoff: MIN_BACKOFF,
            paused: false,
            idle_since: Some(Instant::now()),
            consumed: metrics::counter!(m::CONSUMED_TOTAL, "stream" => R::STREAM.label()),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.consumer.subscribe(&[&self.config.kafka_topic])?;
        let consumer = Arc::clone(&self.consumer);
        // One stream for the loop's life: `recv()` would register and drop a waker slot
        // per message.
        let mut messages = consumer.stream();
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Callbacks run inside `recv()`, also when it returns nothing to us (a quiet
            // topic, or the timer won the select): apply them before anything may flush.
            self.apply_rebalances().await;
            if self.in_flight.is_none() && self.flush_due() {
                self.start_flush(CommitMode::Async);
                continue;
            }
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                done = async { self.in_flight.as_mut().expect("guarded").await }, if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.finish_flush(done);
                }
                Some(msg) = messages.next() => {
                    // Then what librdkafka already holds, without a pass through this
                    // `select!` (its timers and clock reads) per message.
                    let mut next = Some(msg);
                    let mut taken = 0;
                    while let Some(msg) = next.take() {
                        self.apply_rebalances().await;
                        taken += 1;
                        match msg {
                            Ok(msg) => {
                                if let Err(fatal) = self.handle(&msg).await {
                                    tracing::error!(error = %fatal, "stopping: a dead letter could not be published; nothing from this offset on is committed");
                                    self.consumer.unsubscribe();
                                    return Err(fatal.into());
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                        }
                        self.apply_backpressure();
                        if taken < DRAIN_MAX && self.take_more() {
                            next = messages.next().now_or_never().flatten();
                        }
                    }
                    self.consumed.increment(taken);
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

    /// SIGTERM: insert what is in hand (retrying within the grace period), commit
    /// synchronously, leave the group. Giving up is safe: the plans recorded so far are
    /// followed by the next owner (invariant 3).
    async fn drain(&mut self) {
        tracing::info!(
            rows = self.buffered_rows(),
            "shutting down: flushing the rows in hand"
        );
        self.wait_for_flush().await;
        let deadline = Instant::now() + self.config.shutdown_grace;
        while self.partitions.values().any(|p| !p.is_empty()) {
            self.start_flush(CommitMode::Sync);
            if self.wait_for_flush().await && self.partitions.values().all(PartitionState::is_empty)
            {
                break;
            }
            let wait = self.retry_at.map_or(WAIT_FOR_MESSAGES, |t| {
                t.saturating_duration_since(Instant::now())
            });
            if Instant::now() + wait >= deadline {
                tracing::error!(
                    rows = self.buffered_rows(),
                    "could not insert the last rows; not committed, they will be read again"
                );
                break;
            }
            tokio::time::sleep(wait).await;
        }
        self.consumer.unsubscribe();
        self.apply_rebalances().await;
        self.update_gauges();
        tracing::info!("consumer stopped");
    }

    fn buffered_rows(&self) -> usize {
        self.in_flight_rows
            + self
                .partitions
                .values()
                .map(PartitionState::rows)
                .sum::<usize>()
    }

    fn oldest(&self) -> Option<Instant> {
        self.partitions
            .values()
            .filter_map(PartitionState::oldest)
            .min()
    }

    fn flush_due(&self) -> bool {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        if self.partitions.values().all(PartitionState::is_empty) {
            return false;
        }
        self.retry_at.is_some()
            || self.buffered_rows() >= self.config.batch_max_rows
            || self
                .oldest()
                .is_some_and(|t| t.elapsed() >= self.config.batch_max_age)
    }

    /// Whether the loop may take another message before its next pass: not paused, and
    /// no flush due by size (an age-due flush waits at most `DRAIN_MAX` messages; no clock
    /// is read here).
    fn take_more(&self) -> bool {
        !self.paused
            && (self.in_flight.is_some() || self.buffered_rows() < self.config.batch_max_rows)
    }

    /// When the loop must look at the buffers again without a message arriving. Never
    /// while a flush is in flight: none can start before it returns (and wakes the loop),
    /// and an age already past would make the `select!` spin until then.
    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        if self.in_flight.is_some() {
            return far;
        }
        let age = self.oldest().map_or(far, |t| t + self.config.batch_max_age);
        // While a retry is scheduled, nothing flushes before it.
        self.retry_at.unwrap_or(age)
    }

    fn partition_state(&mut self, partition: i32) -> &mut PartitionState<R> {
        let window_ms = shared::as_ms(self.config.dedup_window);
        let max = self.config.dedup_max_ids;
        self.partitions
            .entry(partition)
            .or_insert_with(|| PartitionState::new(partition, RecentIds::new(window_ms, max)))
    }

    async fn handle(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), Fatal> {
        let (partition, offset) = (msg.partition(), msg.offset());
        let payload = msg.payload().unwrap_or_default();
        let hash = message_hash(msg.key(), payload);
        match R::from_message(payload, &self.config.kafka_topic, partition, offset) {
            Ok(row) => self
                .partition_state(partition)
                .push(offset, hash, Some(row)),
            Err(rejection) => {
                let reason = rejection.to_string();
                tracing::warn!(partition, offset, %reason, "dead-lettering message");
                let letter = DeadLetter {
                    key: msg.key(),
                    payload,
                    partition,
                    offset,
                    reason: &reason,
                };
                let limit = self.config.flush_deadline;
                kafka::send_dead_letter(&self.dlq, &self.config, &letter, limit)
                    .await
                    .map_err(|cause| Fatal {
                        partition,
                        offset,
                        cause,
                    })?;
                metrics::counter!(m::DLQ_TOTAL, "reason" => rejection.label()).increment(1);
                self.partition_state(partition).push(offset, hash, None);
            }
        }
        Ok(())
    }

    /// Applies rebalance events, after the flush in flight (if any) gave its partitions
    /// back: a revoke returned only once it was done (see `kafka::FlushGate`).
    async fn apply_rebalances(&mut self) {
        if !self.consumer.context().has_events() {
            return;
        }
        self.wait_for_flush().await;
        for event in self.consumer.context().take_events() {
            match event {
                Rebalanced::Revoked(parts) => {
                    let dropped: usize = parts
                        .iter()
                        .filter_map(|p| self.partitions.remove(p))
                        .map(|state| state.rows())
                        .sum();
                    metrics::counter!(m::ROWS_DROPPED_UNWRITTEN_TOTAL, "when" => "revoked")
                        .increment(dropped as u64);
                }
                Rebalanced::Assigned(parts) => {
                    self.idle_since = parts.is_empty().then(Instant::now);
                    for p in parts {
                        self.partitions.remove(&p);
                        self.partition_state(p);
                    }
                    if self.paused {
                        self.set_paused(true, true);
                    }
                }
            }
        }
    }

    fn rejoin_if_idle(&mut self) {
        let limit = self.config.rejoin_idle;
        if limit.is_zero() || self.idle_since.is_none_or(|t| t.elapsed() < limit) {
            return;
        }
        tracing::warn!(topic = %self.config.kafka_topic, idle = ?limit, "no partitions assigned for a while: re-joining the group");
        self.consumer.unsubscribe();
        if let Err(e) = self.consumer.subscribe(&[&self.config.kafka_topic]) {
            tracing::warn!(error = %e, "re-subscribe failed");
        }
        self.idle_since = Some(Instant::now());
    }

    fn apply_backpressure(&mut self) {
        let rows = self.buffered_rows();
        if !self.paused && rows >= self.config.max_buffered_rows {
            tracing::warn!(
                rows,
                "buffer full: pausing fetch until ClickHouse takes rows"
            );
            metrics::counter!(m::FETCH_PAUSES_TOTAL).increment(1);
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

    /// Starts a flush of the partitions in hand in a task of its own; the loop keeps
    /// receiving into fresh buffers meanwhile.
    fn start_flush(&mut self, commit: CommitMode) {
        if self.in_flight.is_some() {
            return;
        }
        let mut partitions = std::mem::take(&mut self.partitions);
        self.in_flight_rows = partitions.values().map(PartitionState::rows).sum();
        let flusher = Arc::clone(&self.flusher);
        let guard = self.consumer.context().gate().enter();
        self.in_flight = Some(tokio::spawn(async move {
            let _guard = guard;
            let deadline = flusher.config.flush_deadline;
            let result =
                match tokio::time::timeout(deadline, flusher.write_plans(&mut partitions, commit))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(FlushError::Deadline(deadline)),
                };
            (partitions, result)
        }));
    }

    /// Waits for the flush in flight, if any; whether it succeeded (true without one).
    async fn wait_for_flush(&mut self) -> bool {
        match self.in_flight.take() {
            Some(handle) => {
                let done = handle.await;
                self.finish_flush(done)
            }
            None => true,
        }
    }

    /// Takes the flushed partitions back (with what arrived meanwhile) and applies the
    /// outcome. On failure, schedules the retry and returns false.
    fn finish_flush(
        &mut self,
        done: Result<(Partitions<R>, Result<bool, FlushError>), tokio::task::JoinError>,
    ) -> bool {
        self.in_flight_rows = 0;
        let (flushed, result) = match done {
            Ok(done) => done,
            Err(e) => {
                // A panic in the flush: its partitions are gone (nothing was committed past
                // what was stored); they are read again after the restart.
                tracing::error!(error = %e, "the flush task failed; stopping");
                std::process::exit(3);
            }
        };
        let arrived = std::mem::replace(&mut self.partitions, flushed);
        for (p, newer) in arrived {
            match self.partitions.get_mut(&p) {
                Some(state) => state.append(newer),
                None => {
                    self.partitions.insert(p, newer);
                }
            }
        }
        match result {
            Ok(waiting) => {
                self.backoff = MIN_BACKOFF;
                self.retry_at = waiting.then(|| Instant::now() + WAIT_FOR_MESSAGES);
                metrics::gauge!(m::CLICKHOUSE_UP).set(1.0);
                if self.paused && self.buffered_rows() < self.config.max_buffered_rows {
                    self.set_paused(false, false);
                }
                true
            }
            Err(e) => {
                metrics::counter!(m::INSERT_ERRORS_TOTAL).increment(1);
                metrics::gauge!(m::CLICKHOUSE_UP).set(0.0);
                tracing::warn!(topic = %self.config.kafka_topic, error = %e, rows = self.buffered_rows(), retry_in = ?self.backoff, "flush failed; keeping the plans in hand");
                self.retry_at = Some(Instant::now() + self.backoff);
                let max = self.config.retry_max_backoff;
                self.backoff = (self.backoff * 2).min(max);
                false
            }
        }
    }

    fn update_gauges(&self) {
        let age = self.oldest().map_or(0.0, |t| t.elapsed().as_secs_f64());
        // Both streams run in one process: each has its own series.
        let stream = R::STREAM.label();
        metrics::gauge!(m::OLDEST_UNFLUSHED_AGE, "stream" => stream).set(age);
        metrics::gauge!(m::BUFFERED_ROWS, "stream" => stream).set(self.buffered_rows() as f64);
    }
}

impl Flusher {
    /// The steps of a flush. Returns whether a partition waits for more messages.
    async fn write_plans<R: Stored>(
        &self,
        partitions: &mut Partitions<R>,
        commit: CommitMode,
    ) -> Result<bool, FlushError> {
        self.drop_partitions_not_ours(partitions);
        self.load_recent_ids(partitions).await?;
        let (waiting, recorded) = self.agree_on_plans(partitions).await?;
        self.drop_partitions_not_ours(partitions);
        let result = self.insert_agreed_plans(partitions, recorded).await;
        self.commit(&result.completed, commit);
        // Never spin: a flush that stored nothing while rows wait counts as waiting.
        let stalled = result.completed.is_empty() && partitions.values().any(|p| !p.is_empty());
        result
            .error
            .map_or(Ok(waiting || result.waiting || stalled), Err)
    }

    /// Invariant 4: only partitions still assigned to us are written.
    fn drop_partitions_not_ours<R: Stored>(&self, partitions: &mut Partitions<R>) {
        let ours: HashSet<i32> = if self.consumer.assignment_lost() {
            HashSet::new()
        } else {
            match self.consumer.assignment() {
                Ok(tpl) => tpl
                    .elements_for_topic(&self.config.kafka_topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect(),
                // Unknown: keep what we have; the next flush checks again.
                Err(_) => return,
            }
        };
        let before = partitions.len();
        let mut rows = 0;
        partitions.retain(|p, state| {
            let keep = ours.contains(p);
            if !keep {
                rows += state.rows();
            }
            keep
        });
        if partitions.len() < before {
            metrics::counter!(m::ROWS_DROPPED_UNWRITTEN_TOTAL, "when" => "before_write")
                .increment(rows as u64);
            tracing::info!(
                dropped = before - partitions.len(),
                rows,
                "partitions no longer ours dropped before writing"
            );
        }
    }

    /// Invariant 5: once per assignment, the click ids written within the window before
    /// the first click in hand (ingest time).
    async fn load_recent_ids<R: Stored>(
        &self,
        partitions: &mut Partitions<R>,
    ) -> Result<(), FlushError> {
        let window_ms = shared::as_ms(self.config.dedup_window);
        let topic = &self.config.kafka_topic;
        for state in partitions.values_mut() {
            if state.ids_loaded {
                continue;
            }
            let Some(first) = state.first_received_ms() else {
                continue;
            };
            let first = crate::partition::trusted_stamp(first, shared::now_ms());
            let since = u32::try_from(first.saturating_sub(window_ms) / 1000).unwrap_or(u32::MAX);
            for (id, at) in self
                .writer
                .recent_ids::<R>(topic, state.partition, since)
                .await?
            {
                state.recent.insert(&id, at);
            }
            state.ids_loaded = true;
        }
        Ok(())
    }

    /// Invariant 3: record our proposals (in groups, see "Plan groups"), read back what is
    /// recorded at their start offsets, follow the first plan there. Returns whether a
    /// partition must wait, and the plans read.
    async fn agree_on_plans<R: Stored>(
        &self,
        partitions: &mut Partitions<R>,
    ) -> Result<(bool, Recorded), FlushError> {
        let proposals: Vec<(PlanRange, usize)> = partitions
            .values_mut()
            .filter_map(|state| state.propose().map(|range| (range, state.rows())))
            .collect();
        if proposals.is_empty() {
            return Ok((false, Recorded::new()));
        }
        let topic = &self.config.kafka_topic;
        let proposals = if self.config.plan_groups {
            group_proposals(topic, proposals, self.config.insert_concurrency)
        } else {
            proposals
                .into_iter()
                .map(|(range, _)| (range, None))
                .collect()
        };
        self.writer
            .record_plans(topic, &proposals, &self.member)
            .await?;
        let starts: Vec<(i32, i64)> = proposals.iter().map(|(p, _)| (p.partition, p.lo)).collect();
        let recorded = self.writer.recorded_plans(topic, &starts).await?;
        let now = shared::now_ms();
        let mut waiting = false;
        for (proposal, _) in &proposals {
            let Some(state) = partitions.get_mut(&proposal.partition) else {
                continue;
            };
            let plans = recorded
                .get(&proposal.partition)
                .map_or(&[][..], Vec::as_slice);
            if state.agree(plans, &self.member, now) == Agreement::Wait {
                waiting = true;
                metrics::counter!(m::PLAN_WAITS_TOTAL).increment(1);
            }
        }
        Ok((waiting, recorded))
    }

    /// How each agreed plan goes in (see "Plan groups"): alone, with its whole group, or
    /// not yet. `recorded` holds the plans read in this flush; what the groups need
    /// besides is read here. Whether a group is whole is remembered with the plan.
    async fn routes<R: Stored>(
        &self,
        partitions: &mut Partitions<R>,
        mut recorded: Recorded,
    ) -> Result<BTreeMap<i32, Route>, FlushError> {
        let topic = &self.config.kafka_topic;
        let unknown: Vec<PlanGroup> = partitions
            .values()
            .filter(|s| s.agreed_group_whole().is_none())
            .filter_map(|s| s.agreed_group().map(|(g, _)| g.clone()))
            .collect();
        let missing: Vec<(i32, i64)> = unknown
            .iter()
            .flat_map(|g| g.starts.iter().copied())
            .filter(|(p, lo)| {
                !recorded
                    .get(p)
                    .is_some_and(|plans| plans.iter().any(|r| r.range.lo == *lo))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            for (p, plans) in self.writer.recorded_plans(topic, &missing).await? {
                recorded.entry(p).or_default().extend(plans);
            }
        }
        for state in partitions.values_mut() {
            if state.agreed_group_whole().is_none() {
                if let Some(whole) = state
                    .agreed_group()
                    .and_then(|(g, _)| group_is_whole(g, &recorded))
                {
                    state.set_agreed_group_whole(whole);
                }
            }
        }
        let trust_ms = shared::as_ms(self.config.dedup_trust);
        let now = shared::now_ms();
        let agreed = &*partitions;
        let in_group = |p: &i32, group: &PlanGroup| {
            agreed.get(p).is_some_and(|s| {
                s.agreed_group().is_some_and(|(g, _)| g.id == group.id)
                    && s.agreed_group_whole() == Some(true)
            })
        };
        let mut routes = BTreeMap::new();
        for state in partitions.values() {
            let Some((_, _, replayed_age_ms)) = state.agreed() else {
                continue;
            };
            let old = replayed_age_ms.is_some_and(|age| age > trust_ms);
            let route = match (state.agreed_group(), state.agreed_group_whole()) {
                _ if old => Route::Alone { check_stored: true },
                (None, _) | (Some(_), Some(false)) => Route::Alone {
                    check_stored: false,
                },
                (Some((group, _)), Some(true))
                    if group.starts.iter().all(|(p, _)| in_group(p, group)) =>
                {
                    Route::Group(group.clone())
                }
                // Part of a group that its other plans' holder may still insert whole: only
                // once that insert has settled, and then only the rows not stored.
                (Some((_, planned_at_ms)), _) if now.saturating_sub(planned_at_ms) > trust_ms => {
                    Route::Alone { check_stored: true }
                }
                (Some(_), _) => Route::Wait,
            };
            routes.insert(state.partition, route);
        }
        Ok(routes)
    }

    /// Inserts the agreed plans: finds which rows of old replays are stored already,
    /// builds the inserts (a group's plans in one, under its token), runs them at most
    /// `CONSUMER_INSERT_CONCURRENCY` at a time, and accounts for the results.
    async fn insert_agreed_plans<R: Stored>(
        &self,
        partitions: &mut Partitions<R>,
        recorded: Recorded,
    ) -> InsertOutcome {
        let routes = match self.routes(partitions, recorded).await {
            Ok(routes) => routes,
            Err(e) => {
                return InsertOutcome {
                    completed: Vec::new(),
                    waiting: false,
                    error: Some(e),
                }
            }
        };
        let topic = &self.config.kafka_topic;
        let claimed_elsewhere = match self.claim(partitions, &routes).await {
            Ok(positions) => positions,
            Err(e) => {
                return InsertOutcome {
                    completed: Vec::new(),
                    waiting: false,
                    error: Some(e),
                }
            }
        };
        let (stored, mut error) = self.stored_rows(partitions, &routes).await;
        let plan = plan_inserts(topic, partitions, &routes, &stored, &claimed_elsewhere);
        plan.count(R::STREAM);
        let results = self
            .run_inserts(partitions, &plan.jobs, &claimed_elsewhere)
            .await;
        let mut completed = Vec::new();
        for (job, result, took) in results {
            match result {
                Ok(rows) => {
                    metrics::histogram!(m::INSERT_DURATION).record(took.as_secs_f64());
                    metrics::histogram!(m::BATCH_ROWS).record(rows as f64);
                    metrics::counter!(m::INSERTED_ROWS_TOTAL, "stream" => R::STREAM.label())
                        .increment(rows as u64);
                    for (partition, _) in &plan.jobs[job].plans {
                        if let Some(next) = partitions
                            .get_mut(partition)
                            .and_then(PartitionState::complete)
                        {
                            completed.push((*partition, next));
                        }
                    }
                }
                Err(e) => error = Some(e.into()),
            }
        }
        InsertOutcome {
            completed,
            waiting: plan.waiting,
            error,
        }
    }

    /// Conversions: claims every row of the plans that go in this flush, and returns the
    /// positions (partition, offset) of those whose conversion is stored, or claimed, at
    /// another position: repeats, in this partition or any other, read now or days ago,
    /// by this member or another (see `Writer::claim`). Clicks claim nothing: a retry of a
    /// click id lands in the partition of the first (invariant 5).
    async fn claim<R: Stored>(
        &self,
        partitions: &Partitions<R>,
        routes: &BTreeMap<i32, Route>,
    ) -> Result<Positions, FlushError> {
        if R::STREAM != Stream::Conversions {
            return Ok(Positions::new());
        }
        let mut claims: Vec<(&str, u16, u64)> = Vec::new();
        for state in partitions.values() {
            let Some((_, rows, _)) = state.agreed() else {
                continue;
            };
            if matches!(routes.get(&state.partition), None | Some(Route::Wait)) {
                continue;
            }
            let partition = u16::try_from(state.partition).unwrap_or(u16::MAX);
            claims.extend(rows.map(|r| (r.id(), partition, r.kafka_offset())));
        }
        let winners = self.writer.claim(&self.config.kafka_topic, &claims).await?;
        Ok(claims
            .iter()
            .filter(|(key, p, o)| winners.get(*key).is_some_and(|w| *w != (*p, *o)))
            .map(|(_, p, o)| (i32::from(*p), *o))
            .collect())
    }

    /// The rows already stored of each plan routed `Alone { check_stored: true }` (another
    /// member's old plan, which may have left the server's deduplication window). A
    /// partition whose check failed is left out of this flush, with the error.
    async fn stored_rows<R: Stored>(
        &self,
        partitions: &Partitions<R>,
        routes: &BTreeMap<i32, Route>,
    ) -> (StoredRows, Option<FlushError>) {
        let mut stored = StoredRows::new();
        let mut error = None;
        for state in partitions.values() {
            let Some((range, rows, _)) = state.agreed() else {
                continue;
            };
            if routes.get(&state.partition) != Some(&Route::Alone { check_stored: true }) {
                continue;
            }
            let received = rows.fold((u32::MAX, 0), |(lo, hi), r| {
                (lo.min(r.received_at()), hi.max(r.received_at()))
            });
            match self
                .writer
                .stored_in_plan::<R>(&self.config.kafka_topic, range, received)
                .await
            {
                Ok(found) => {
                    stored.insert(state.partition, found.into_iter().collect());
                }
                Err(e) => {
                    stored.insert(state.partition, StoredCheck::Failed);
                    error = Some(e.into());
                }
            }
        }
        (stored, error)
    }

    /// Runs the inserts, at most `CONSUMER_INSERT_CONCURRENCY` at once: per job, its
    /// index, the result and how long it took.
    async fn run_inserts<R: Stored>(
        &self,
        agreed: &Partitions<R>,
        jobs: &[InsertJob],
        claimed_elsewhere: &Positions,
    ) -> Vec<(usize, clickhouse::error::Result<usize>, Duration)> {
        let writer = &self.writer;
        type Job<'a> = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = (usize, clickhouse::error::Result<usize>, Duration),
                    > + Send
                    + 'a,
            >,
        >;
        // Boxed with an explicit `Send`: the flush runs in a task of its own, and the
        // compiler cannot prove that of these closures' futures unaided.
        let inserts: Vec<Job<'_>> = jobs
            .iter()
            .enumerate()
            .map(|(job, InsertJob { plans, token })| -> Job<'_> {
                Box::pin(async move {
                    let started = Instant::now();
                    let rows = rows_to_insert(agreed, plans);
                    let mut result = if rows.is_empty() {
                        Ok(0)
                    } else {
                        writer.insert_plan(rows.iter().copied(), token).await
                    };
                    if result.is_ok() {
                        // Stored, then settled: a failed settle fails the insert, which is
                        // sent again (a no-op) and settled again before the commit.
                        let settled = rows_to_settle(agreed, plans, claimed_elsewhere);
                        if let Err(e) = settle::after_store(writer, &settled).await {
                            result = Err(e);
                        }
                    }
                    (job, result, started.elapsed())
                })
            })
            .collect();
        futures::stream::iter(inserts)
            .buffer_unordered(self.config.insert_concurrency)
            .collect()
            .await
    }

    /// Commits `hi + 1` of every stored plan. A failed commit is harmless: the next reader
    /// of these offsets follows the recorded plans and their inserts are no-ops.
    fn commit(&self, completed: &[(i32, i64)], mode: CommitMode) {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in completed {
            if let Err(e) =
                tpl.add_partition_offset(&self.config.kafka_topic, *p, Offset::Offset(*next))
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
}

/// Positions (partition, offset) of rows in hand.
type Positions = HashSet<(i32, u64)>;

struct InsertOutcome {
    completed: Vec<(i32, i64)>,
    /// A plan waits for its group (see "Plan groups").
    waiting: bool,
    error: Option<FlushError>,
}

/// What the stored-rows check found for a partition's plan.
#[derive(Debug, PartialEq, Eq)]
enum StoredCheck {
    Found(HashSet<(u64, String)>),
    /// The check failed: the plan sits this flush out.
    Failed,
}

impl FromIterator<(u64, String)> for StoredCheck {
    fn from_iter<I: IntoIterator<Item = (u64, String)>>(rows: I) -> Self {
        Self::Found(rows.into_iter().collect())
    }
}

type StoredRows = HashMap<i32, StoredCheck>;

/// The inserts of a flush, and what building them found (counted by [`Self::count`]).
#[derive(Debug, Default)]
struct InsertPlan {
    jobs: Vec<InsertJob>,
    /// A plan waits for its group (see "Plan groups").
    waiting: bool,
    group_waits: u64,
    replayed: u64,
    skipped_stored: u64,
    skipped_repeat: u64,
    /// Conversions stored, or claimed, at another position.
    skipped_claimed: u64,
}

impl InsertPlan {
    fn count(&self, stream: Stream) {
        let stream = stream.label();
        metrics::counter!(m::PLAN_GROUP_WAITS_TOTAL).increment(self.group_waits);
        metrics::counter!(m::PLANS_REPLAYED_TOTAL).increment(self.replayed);
        metrics::counter!(m::DUPLICATES_SKIPPED_TOTAL, "stream" => stream, "cause" => "already_stored")
            .increment(self.skipped_stored);
        metrics::counter!(m::DUPLICATES_SKIPPED_TOTAL, "stream" => stream, "cause" => "same_click_id")
            .increment(self.skipped_repeat);
        metrics::counter!(m::DUPLICATES_SKIPPED_TOTAL, "stream" => stream, "cause" => "claimed_elsewhere")
            .increment(self.skipped_claimed);
    }
}

/// Builds a flush's inserts from its agreed plans (pure): a plan routed to a group joins
/// the group's insert under the group's token, any other goes alone under its own; rows
/// stored already, repeating a click id, or claimed at another position are flagged not
/// to be sent.
fn plan_inserts<R: Stored>(
    topic: &str,
    partitions: &Partitions<R>,
    routes: &BTreeMap<i32, Route>,
    stored: &StoredRows,
    claimed_elsewhere: &Positions,
) -> InsertPlan {
    let mut plan = InsertPlan::default();
    let mut grouped: HashMap<&str, usize> = HashMap::new();
    let none = HashSet::new();
    for state in partitions.values() {
        let Some((range, _, replayed_age_ms)) = state.agreed() else {
            continue;
        };
        let route = routes.get(&state.partition).unwrap_or(&Route::Wait);
        if *route == Route::Wait {
            plan.waiting = true;
            plan.group_waits += 1;
            continue;
        }
        let stored = match stored.get(&state.partition) {
            Some(StoredCheck::Failed) => continue,
            Some(StoredCheck::Found(rows)) => rows,
            None => &none,
        };
        if replayed_age_ms.is_some() {
            plan.replayed += 1;
        }
        let mut flags = state.rows_to_send(stored);
        let skipped_stored = stored.len();
        plan.skipped_stored += skipped_stored as u64;
        plan.skipped_repeat +=
            (flags.iter().filter(|send| !**send).count() - skipped_stored.min(flags.len())) as u64;
        if let Some((_, rows, _)) = state.agreed() {
            for (row, send) in rows.zip(flags.iter_mut()) {
                if claimed_elsewhere.contains(&(state.partition, row.kafka_offset())) {
                    plan.skipped_claimed += u64::from(*send);
                    *send = false;
                }
            }
        }
        match route {
            Route::Group(group) => match grouped.get(group.id.as_str()) {
                Some(&job) => plan.jobs[job].plans.push((state.partition, flags)),
                None => {
                    grouped.insert(&group.id, plan.jobs.len());
                    plan.jobs.push(InsertJob {
                        plans: vec![(state.partition, flags)],
                        token: group.token(topic),
                    });
                }
            },
            _ => plan.jobs.push(InsertJob {
                plans: vec![(state.partition, flags)],
                token: range.token(topic),
            }),
        }
    }
    plan
}

/// One INSERT: plans (partition, which of its rows to send) under one token.
#[derive(Debug)]
struct InsertJob {
    plans: Vec<(i32, Vec<bool>)>,
    token: String,
}

/// The rows of one insert: of each plan, those flagged to be sent.
fn rows_to_insert<'a, R: Stored>(
    agreed: &'a Partitions<R>,
    plans: &'a [(i32, Vec<bool>)],
) -> Vec<&'a R> {
    let mut out = Vec::new();
    for (partition, flags) in plans {
        if let Some((_, rows, _)) = agreed.get(partition).and_then(PartitionState::agreed) {
            out.extend(rows.zip(flags).filter(|(_, send)| **send).map(|(r, _)| r));
        }
    }
    out
}

/// One insert's rows to settle ([`settle`]): every row of its plans stored at its own
/// position, sent now or by an earlier attempt; each id once.
fn rows_to_settle<'a, R: Stored>(
    agreed: &'a Partitions<R>,
    plans: &[(i32, Vec<bool>)],
    claimed_elsewhere: &Positions,
) -> Vec<&'a R> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (partition, _) in plans {
        if let Some((_, rows, _)) = agreed.get(partition).and_then(PartitionState::agreed) {
            for row in rows {
                if !claimed_elsewhere.contains(&(*partition, row.kafka_offset()))
                    && seen.insert(row.id())
                {
                    out.push(row);
                }
            }
        }
    }
    out
}

/// The plans recorded at some start offsets, by partition, in commit order.
type Recorded = HashMap<i32, Vec<RecordedPlan>>;

/// How an agreed plan goes in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// In an insert of its own, under its own token; first asking which of its rows are
    /// stored where the server's window may no longer cover an earlier insert of it.
    Alone { check_stored: bool },
    /// With every other plan of its group, in one insert under the group's token.
    Group(PlanGroup),
    /// Not in this flush: the holder of the group's other plans may insert it whole.
    Wait,
}

/// Below this many rows a group, a flush's plans share inserts: the fixed cost of an
/// insert (a part in the table and in every view's target) was about that of 20,000 rows
/// here (consumer/README.md, "Plan groups").
const GROUP_MIN_ROWS: usize = 20_000;

/// Splits a flush's proposals (with their rows) into groups, as many as keep each at
/// `GROUP_MIN_ROWS` or more, at most `max_groups`, of about equal rows. A group of one
/// plan is no group: that plan goes in alone.
fn group_proposals(
    topic: &str,
    mut proposals: Vec<(PlanRange, usize)>,
    max_groups: usize,
) -> Vec<(PlanRange, Option<PlanGroup>)> {
    let total: usize = proposals.iter().map(|(_, rows)| rows).sum();
    let n = (total / GROUP_MIN_ROWS).clamp(1, max_groups.max(1));
    let mut bins: Vec<(usize, Vec<PlanRange>)> = vec![(0, Vec::new()); n];
    proposals.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.partition.cmp(&b.0.partition)));
    for (range, rows) in proposals {
        if let Some(bin) = bins.iter_mut().min_by_key(|(sum, _)| *sum) {
            bin.0 += rows;
            bin.1.push(range);
        }
    }
    let mut out = Vec::new();
    for (_, plans) in bins {
        let group = PlanGroup::of(topic, &plans);
        out.extend(plans.into_iter().map(|p| (p, group.clone())));
    }
    out.sort_by_key(|(p, _)| p.partition);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::message_hash;
    use crate::row::ClickRow;

    fn proposal(partition: i32, rows: usize) -> (PlanRange, usize) {
        let hashes: Vec<(i64, crate::plan::MessageHash)> = (0..3)
            .map(|o| (o, message_hash(None, format!("{partition}/{o}").as_bytes())))
            .collect();
        let range = PlanRange::over(partition, hashes.iter().map(|(o, h)| (*o, h)));
        (range.expect("range"), rows)
    }

    fn groups(plans: &[(PlanRange, Option<PlanGroup>)]) -> Vec<Vec<i32>> {
        let mut by_id: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (p, g) in plans {
            let key = g
                .as_ref()
                .map_or(format!("alone {}", p.partition), |g| g.id.clone());
            by_id.entry(key).or_default().push(p.partition);
        }
        let mut out: Vec<Vec<i32>> = by_id.into_values().collect();
        out.sort();
        out
    }

    fn agreed_state(partition: i32, rows: i64) -> PartitionState<ClickRow> {
        let mut s = PartitionState::new(partition, RecentIds::new(60_000, 100));
        for o in 0..rows {
            let id = format!("refclk_{partition}_{o}");
            let row = crate::row::test_row(partition as u16, o as u64, &id, 1000);
            s.push(o, message_hash(None, id.as_bytes()), Some(row));
        }
        let range = s.propose().expect("plan");
        let ours = RecordedPlan {
            range,
            member: "me".into(),
            planned_at_ms: 0,
            group: None,
        };
        assert_eq!(s.agree(&[ours], "me", 0), Agreement::Agreed);
        s
    }

    #[test]
    fn rows_claimed_elsewhere_are_not_sent_and_stored_ones_are_still_settled() {
        let mut partitions: Partitions<ClickRow> =
            (0..2).map(|p| (p, agreed_state(p, 3))).collect();
        // Partition 0's row at offset 2 was stored by an earlier attempt (a remembered id).
        if let Some(state) = partitions.get_mut(&0) {
            state.recent.insert("refclk_0_2", 1000);
        }
        let routes: BTreeMap<i32, Route> = (0..2)
            .map(|p| {
                (
                    p,
                    Route::Alone {
                        check_stored: false,
                    },
                )
            })
            .collect();
        // The conversion at 1/0 is stored (or claimed) at another position: a repeat.
        let elsewhere: Positions = [(1, 0)].into_iter().collect();
        let plan = plan_inserts("t", &partitions, &routes, &StoredRows::new(), &elsewhere);
        assert_eq!(plan.jobs[0].plans, vec![(0, vec![true, true, false])]);
        assert_eq!(plan.jobs[1].plans, vec![(1, vec![false, true, true])]);
        assert_eq!((plan.skipped_claimed, plan.skipped_repeat), (1, 1));
        // Settled: everything stored at its own position, sent now or before; not the repeat.
        let settled = |job: usize| -> Vec<&str> {
            rows_to_settle(&partitions, &plan.jobs[job].plans, &elsewhere)
                .iter()
                .map(|r| r.click_id.as_str())
                .collect()
        };
        assert_eq!(settled(0), ["refclk_0_0", "refclk_0_1", "refclk_0_2"]);
        assert_eq!(settled(1), ["refclk_1_1", "refclk_1_2"]);
    }

    #[test]
    fn inserts_are_planned_by_route_with_stored_rows_left_out() {
        let partitions: Partitions<ClickRow> = (0..5).map(|p| (p, agreed_state(p, 3))).collect();
        let group = PlanGroup {
            id: "g".repeat(32),
            starts: vec![(0, 0), (1, 0)],
        };
        let routes: BTreeMap<i32, Route> = [
            (0, Route::Group(group.clone())),
            (1, Route::Group(group.clone())),
            (2, Route::Alone { check_stored: true }),
            (3, Route::Wait),
            (4, Route::Alone { check_stored: true }),
        ]
        .into_iter()
        .collect();
        let stored: StoredRows = [
            (2, [(0, "refclk_2_0".to_owned())].into_iter().collect()),
            (4, StoredCheck::Failed),
        ]
        .into_iter()
        .collect();
        let plan = plan_inserts("t", &partitions, &routes, &stored, &Positions::new());
        // The group's plans in one insert under its token; partition 2 alone under its own,
        // without its stored first row; 3 waits for its group; 4's check failed.
        assert_eq!(plan.jobs.len(), 2, "{plan:?}");
        assert_eq!(plan.jobs[0].token, group.token("t"));
        assert_eq!(
            plan.jobs[0].plans,
            vec![(0, vec![true; 3]), (1, vec![true; 3])]
        );
        let range2 = partitions[&2].agreed().expect("agreed").0;
        assert_eq!(plan.jobs[1].token, range2.token("t"));
        assert_eq!(plan.jobs[1].plans, vec![(2, vec![false, true, true])]);
        assert!(plan.waiting);
        assert_eq!(
            (plan.group_waits, plan.skipped_stored, plan.skipped_repeat),
            (1, 1, 0)
        );
        let rows: Vec<&str> = rows_to_insert(&partitions, &plan.jobs[1].plans)
            .iter()
            .map(|r| r.click_id.as_str())
            .collect();
        assert_eq!(rows, ["refclk_2_1", "refclk_2_2"]);
    }

    #[test]
    fn small_flushes_share_one_insert_large_ones_spread_over_the_concurrency() {
        // 8 partitions at 200 clicks/s: one group.
        let small: Vec<_> = (0..8).map(|p| proposal(p, 25)).collect();
        let grouped = group_proposals("t", small, 4);
        assert_eq!(groups(&grouped), vec![(0..8).collect::<Vec<_>>()]);
        let g = grouped[0].1.clone().expect("a group");
        assert_eq!(g.starts.len(), 8);
        assert!(grouped.iter().all(|(_, x)| x.as_ref() == Some(&g)));

        // A backlog: 8 x 12,500 rows = 100,000, five groups' worth, at most 4 inserts, each
        // of about the same rows.
        let large: Vec<_> = (0..8).map(|p| proposal(p, 12_500)).collect();
        let grouped = group_proposals("t", large, 4);
        let sets = groups(&grouped);
        assert_eq!(sets.len(), 4, "{sets:?}");
        assert!(sets.iter().all(|s| s.len() == 2), "{sets:?}");

        // One partition, or groups of one: no group, the plan's own token.
        let one = group_proposals("t", vec![proposal(3, 10)], 4);
        assert_eq!(one.len(), 1);
        assert!(one[0].1.is_none());
        let spread = group_proposals("t", vec![proposal(0, 30_000), proposal(1, 30_000)], 4);
        assert!(spread.iter().all(|(_, g)| g.is_none()));
        // Output in partition order, every proposal once.
        assert_eq!(
            spread.iter().map(|(p, _)| p.partition).collect::<Vec<_>>(),
            vec![0, 1]
        );
    }
}
