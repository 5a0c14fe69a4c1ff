//! What the consumer holds for one assigned partition: the messages in hand, the plan
//! being written, and the click ids written recently. Pure data, no I/O.
//!
//! Messages are kept in offset order, each with its hash (for plan digests) and its row
//! (`None` for a dead-lettered message, whose offset still belongs to the plan). A plan is
//! always a prefix of the messages in hand; once inserted, that prefix is removed.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use crate::plan::{MessageHash, PlanGroup, PlanRange, RecordedPlan};
use crate::row::Stored;

#[derive(Debug)]
pub struct Entry<R> {
    pub offset: i64,
    pub hash: MessageHash,
    /// Boxed: the queue then moves 40-byte entries when it grows, not whole rows.
    pub row: Option<Box<R>>,
}

/// Where the partition's next insert stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanState {
    /// Proposed by us; not yet known whether an earlier plan holds this start offset.
    Proposed(PlanRange),
    /// The plan every member follows for this start offset: insert exactly it.
    Agreed {
        range: PlanRange,
        /// How many entries (from the front) it covers.
        len: usize,
        /// Recorded by another member (a replay of its work) and how long ago.
        replayed_age_ms: Option<u64>,
        /// The group the followed plan was recorded in, and when.
        group: Option<PlanGroup>,
        planned_at_ms: u64,
        /// Whether that group can be inserted whole, once known ([`crate::plan::group_is_whole`]).
        group_whole: Option<bool>,
    },
}

#[derive(Debug)]
pub struct PartitionState<R> {
    pub partition: i32,
    entries: VecDeque<Entry<R>>,
    rows: usize,
    oldest: Option<Instant>,
    pub plan: Option<PlanState>,
    pub recent: RecentIds,
    /// Whether `recent` was loaded from ClickHouse since the assignment.
    pub ids_loaded: bool,
}

/// What agreeing on a recorded plan came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Agreement {
    /// Insert this plan now.
    Agreed,
    /// An earlier plan reaches past the messages in hand: wait for more messages.
    Wait,
}

impl<R: Stored> PartitionState<R> {
    pub fn new(partition: i32, recent: RecentIds) -> Self {
        Self {
            partition,
            entries: VecDeque::new(),
            rows: 0,
            oldest: None,
            plan: None,
            recent,
            ids_loaded: false,
        }
    }

    pub fn push(&mut self, offset: i64, hash: MessageHash, row: Option<R>) {
        self.push_entry(Entry {
            offset,
            hash,
            row: row.map(Box::new),
        });
    }

    fn push_entry(&mut self, entry: Entry<R>) {
        // Kafka delivers a partition in offset order; after a seek or a re-delivery an
        // offset may come again, and the first copy stands.
        if self
            .entries
            .back()
            .is_some_and(|e| e.offset >= entry.offset)
        {
            return;
        }
        self.oldest.get_or_insert_with(Instant::now);
        self.rows += usize::from(entry.row.is_some());
        self.entries.push_back(entry);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes the messages that arrived while this state was away being flushed (`newer`
    /// holds only later offsets); this state's plan and remembered ids stand.
    pub fn append(&mut self, newer: Self) {
        if self.oldest.is_none() {
            self.oldest = newer.oldest;
        }
        self.entries.reserve(newer.entries.len());
        for e in newer.entries {
            self.push_entry(e);
        }
    }

    /// Rows in hand (dead-lettered messages excluded).
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn oldest(&self) -> Option<Instant> {
        self.oldest
    }

    pub fn first_received_ms(&self) -> Option<u64> {
        self.entries
            .iter()
            .find_map(|e| e.row.as_ref().map(|r| r.received_at_ms()))
    }

    /// Our proposal for the next insert: every message in hand. A proposal whose
    /// agreement did not finish (the flush deadline passed) is proposed again as it was:
    /// recording a plan twice is harmless.
    pub fn propose(&mut self) -> Option<PlanRange> {
        match &self.plan {
            Some(PlanState::Proposed(range)) => return Some(range.clone()),
            Some(PlanState::Agreed { .. }) => return None,
            None => {}
        }
        let range = PlanRange::over(
            self.partition,
            self.entries.iter().map(|e| (e.offset, &e.hash)),
        )?;
        self.plan = Some(PlanState::Proposed(range.clone()));
        Some(range)
    }

    /// Follows the first recorded plan (in commit order) at our start offset whose
    /// messages are the ones in hand. Plans of another incarnation of the topic (same
    /// offsets, other messages) are passed over. Our own proposal is among `recorded`, so
    /// the search ends there at the latest.
    pub fn agree(&mut self, recorded: &[RecordedPlan], member: &str, now_ms: u64) -> Agreement {
        let Some(PlanState::Proposed(ours)) = &self.plan else {
            return Agreement::Agreed;
        };
        let ours = ours.clone();
        // Plans about other messages at these offsets (an older incarnation of the topic).
        for plan in recorded
            .iter()
            .filter(|p| p.range.lo == ours.lo && p.range.head == ours.head)
        {
            if plan.range == ours {
                let len = self
                    .entries
                    .iter()
                    .take_while(|e| e.offset <= ours.hi)
                    .count();
                let replayed_age_ms =
                    (plan.member != member).then(|| now_ms.saturating_sub(plan.planned_at_ms));
                self.plan = Some(PlanState::Agreed {
                    range: ours,
                    len,
                    replayed_age_ms,
                    group: plan.group.clone(),
                    planned_at_ms: plan.planned_at_ms,
                    group_whole: None,
                });
                return Agreement::Agreed;
            }
            let Some(last) = self.entries.back() else {
                break;
            };
            if plan.range.hi > last.offset {
                // Cannot tell yet whether it covers these messages: wait for more of them.
                self.plan = None;
                return Agreement::Wait;
            }
            let len = self
                .entries
                .iter()
                .take_while(|e| e.offset <= plan.range.hi)
                .count();
            let prefix = PlanRange::over(
                self.partition,
                self.entries.iter().take(len).map(|e| (e.offset, &e.hash)),
            );
            if prefix.as_ref() == Some(&plan.range) {
                self.plan = Some(PlanState::Agreed {
                    range: plan.range.clone(),
                    len,
                    replayed_age_ms: Some(now_ms.saturating_sub(plan.planned_at_ms)),
                    group: plan.group.clone(),
                    planned_at_ms: plan.planned_at_ms,
                    group_whole: None,
                });
                return Agreement::Agreed;
            }
        }
        // Not even our own proposal is recorded (it cannot be read back yet): propose again.
        self.plan = None;
        Agreement::Wait
    }

    /// The agreed plan and its rows, if any.
    pub fn agreed(&self) -> Option<(&PlanRange, impl Iterator<Item = &R>, Option<u64>)> {
        match &self.plan {
            Some(PlanState::Agreed {
                range,
                len,
                replayed_age_ms,
                ..
            }) => Some((
                range,
                self.entries
                    .iter()
                    .take(*len)
                    .filter_map(|e| e.row.as_deref()),
                *replayed_age_ms,
            )),
            _ => None,
        }
    }

    /// The group of the agreed plan (if it was recorded in one) and when it was recorded.
    pub fn agreed_group(&self) -> Option<(&PlanGroup, u64)> {
        match &self.plan {
            Some(PlanState::Agreed {
                group: Some(group),
                planned_at_ms,
                ..
            }) => Some((group, *planned_at_ms)),
            _ => None,
        }
    }

    /// Whether the agreed plan's group can be inserted whole, once known.
    pub fn agreed_group_whole(&self) -> Option<bool> {
        match &self.plan {
            Some(PlanState::Agreed { group_whole, .. }) => *group_whole,
            _ => None,
        }
    }

    pub fn set_agreed_group_whole(&mut self, whole: bool) {
        if let Some(PlanState::Agreed { group_whole, .. }) = &mut self.plan {
            *group_whole = Some(whole);
        }
    }

    /// Which rows of the agreed plan to send: not a click id written recently, not a
    /// repeat within the plan, and not in `stored` (offsets found in the table, for old
    /// replays only). Returns one flag per row of the plan.
    pub fn rows_to_send(&self, stored: &HashSet<(u64, String)>) -> Vec<bool> {
        let mut seen = HashSet::new();
        self.agreed()
            .map(|(_, rows, _)| {
                rows.map(|r| {
                    !self.recent.contains(r.id())
                        && (stored.is_empty()
                            || !stored.contains(&(r.kafka_offset(), r.id().to_owned())))
                        && seen.insert(r.id())
                })
                .collect()
            })
            .unwrap_or_default()
    }

    /// The agreed plan is stored: remember its click ids, drop its messages. Returns the
    /// offset to commit (`hi + 1`).
    pub fn complete(&mut self) -> Option<i64> {
        let Some(PlanState::Agreed { range, len, .. }) = self.plan.take() else {
            return None;
        };
        let mut newest = 0;
        let now_ms = shared::now_ms();
        for entry in self.entries.drain(..len) {
            if let Some(row) = entry.row {
                self.rows -= 1;
                newest = newest.max(trusted_stamp(row.received_at_ms(), now_ms));
                self.recent.insert(row.id(), row.received_at_ms());
            }
        }
        self.recent.expire(newest);
        if self.entries.is_empty() {
            self.oldest = None;
        }
        Some(range.hi + 1)
    }
}

/// How far ahead of this consumer's clock an ingest stamp may move the retry window.
/// Instances' clocks may be off by minutes; a stamp further ahead (an instance an hour
/// fast) would otherwise make the partition forget every id of the last hour, and the
/// client retries of those clicks would be stored and charged twice.
pub const FUTURE_STAMP_TOLERANCE_MS: u64 = 5 * 60_000;

/// An ingest stamp as far as the retry window trusts it: at most
/// [`FUTURE_STAMP_TOLERANCE_MS`] ahead of `now_ms` (the stamp stored is not changed).
pub fn trusted_stamp(received_at_ms: u64, now_ms: u64) -> u64 {
    received_at_ms.min(now_ms.saturating_add(FUTURE_STAMP_TOLERANCE_MS))
}

/// Click ids of one partition written within a window of *ingest* time, bounded in count.
///
/// The window is measured against the newest click seen in the partition, not the
/// consumer's clock: after an outage longer than the window, clicks that were received
/// close together are still compared with each other. Eviction is oldest-first (by ingest
/// time), also after a reload from ClickHouse in any order.
///
/// Ids are kept as 128-bit hashes (two SipHash-1-3 passes): 40 bytes an id instead of
/// ~150 for two copies of the string (measured: 307 MiB peak RSS for 1 M ids before). A
/// collision would drop a distinct click as a repeat; at 2^-128 per pair, the chance over a
/// million ids is about 10^-27.
#[derive(Debug)]
pub struct RecentIds {
    ids: HashSet<u128>,
    /// (received_at_ms, id) in time order.
    order: std::collections::BTreeSet<(u64, u128)>,
    window_ms: u64,
    max: usize,
}

fn id_hash(id: &str) -> u128 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
}

impl RecentIds {
    pub fn new(window_ms: u64, max: usize) -> Self {
        Self {
            ids: HashSet::new(),
            order: std::collections::BTreeSet::new(),
            window_ms,
            max: max.max(1),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains(&id_hash(id))
    }

    pub fn insert(&mut self, id: &str, received_at_ms: u64) {
        let key = id_hash(id);
        if self.ids.insert(key) {
            self.order.insert((received_at_ms, key));
        }
        while self.order.len() > self.max {
            self.evict_oldest();
        }
    }

    /// Forgets ids received more than the window before `newest_ms` (ingest time).
    pub fn expire(&mut self, newest_ms: u64) {
        let horizon = newest_ms.saturating_sub(self.window_ms);
        while self.order.first().is_some_and(|(t, _)| *t < horizon) {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_first() {
            self.ids.remove(&key);
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::message_hash;
    use crate::row::ClickRow;

    fn row(o: u64, id: &str, at: u64) -> ClickRow {
        crate::row::test_row(0, o, id, at)
    }

    fn state(offsets: std::ops::Range<i64>) -> PartitionState<ClickRow> {
        let mut s = PartitionState::new(0, RecentIds::new(60_000, 100));
        for o in offsets {
            let id = format!("refclk_{o}");
            s.push(
                o,
                message_hash(None, id.as_bytes()),
                Some(row(o as u64, &id, 1000)),
            );
        }
        s
    }

    fn recorded(range: PlanRange, member: &str) -> RecordedPlan {
        RecordedPlan {
            range,
            member: member.into(),
            planned_at_ms: 0,
            group: None,
        }
    }

    #[test]
    fn messages_that_arrived_during_a_flush_join_the_state_after_it() {
        let mut away = state(0..5);
        let range = away.propose().expect("plan");
        let recorded = [RecordedPlan {
            range: range.clone(),
            member: "me".into(),
            planned_at_ms: 0,
            group: None,
        }];
        assert_eq!(away.agree(&recorded, "me", 0), Agreement::Agreed);
        let mut meanwhile = PartitionState::new(0, RecentIds::new(60_000, 100));
        for o in 5..8 {
            let id = format!("refclk_{o}");
            meanwhile.push(
                o,
                message_hash(None, id.as_bytes()),
                Some(row(o as u64, &id, 2000)),
            );
        }
        assert_eq!(away.complete(), Some(5));
        away.append(meanwhile);
        assert_eq!(away.rows(), 3);
        assert!(
            away.recent.contains("refclk_4"),
            "the ids of the flushed plan stay known"
        );
        let next = away.propose().expect("next plan");
        assert_eq!((next.lo, next.hi), (5, 7));
    }

    #[test]
    fn our_own_plan_wins_when_first() {
        let mut s = state(10..15);
        let ours = s.propose().expect("proposal");
        assert_eq!((ours.lo, ours.hi), (10, 14));
        assert_eq!(
            s.agree(&[recorded(ours.clone(), "me")], "me", 0),
            Agreement::Agreed
        );
        let (range, rows, replayed) = s.agreed().expect("agreed");
        assert_eq!(range, &ours);
        assert_eq!(rows.count(), 5);
        assert_eq!(replayed, None);
        assert_eq!(s.complete(), Some(15));
        assert!(s.is_empty() && s.recent.contains("refclk_12"));
    }

    #[test]
    fn an_unfinished_proposal_is_proposed_again_unchanged() {
        let mut s = state(10..15);
        let first = s.propose().expect("proposal");
        // The flush ended before agreeing; more messages arrived meanwhile.
        let id = "refclk_15".to_owned();
        s.push(
            15,
            message_hash(None, id.as_bytes()),
            Some(row(15, &id, 1000)),
        );
        assert_eq!(s.propose(), Some(first.clone()));
        assert_eq!(
            s.agree(&[recorded(first, "me")], "me", 0),
            Agreement::Agreed
        );
        assert_eq!(s.propose(), None);
        assert_eq!(s.complete(), Some(15));
        assert_eq!(s.propose().map(|r| (r.lo, r.hi)), Some((15, 15)));
    }

    #[test]
    fn an_earlier_plan_of_another_member_is_followed_exactly() {
        let mut other = state(10..13);
        let theirs = other.propose().expect("theirs");
        let mut s = state(10..20);
        let ours = s.propose().expect("ours");
        let log = [recorded(theirs.clone(), "old"), recorded(ours, "me")];
        assert_eq!(s.agree(&log, "me", 0), Agreement::Agreed);
        let (range, rows, replayed) = s.agreed().expect("agreed");
        assert_eq!(range, &theirs);
        assert_eq!(rows.count(), 3);
        assert!(replayed.is_some());
        assert_eq!(s.complete(), Some(13));
        // The replayed rows' ids are remembered (client retries of them are dropped).
        assert!(s.recent.contains("refclk_11"));
        // The rest stays for the next plan.
        let next = s.propose().expect("next");
        assert_eq!((next.lo, next.hi), (13, 19));
    }

    #[test]
    fn an_earlier_plan_past_our_messages_makes_us_wait() {
        let mut other = state(10..30);
        let theirs = other.propose().expect("theirs");
        let mut s = state(10..20);
        let ours = s.propose().expect("ours");
        assert_eq!(
            s.agree(&[recorded(theirs, "old"), recorded(ours, "me")], "me", 0),
            Agreement::Wait
        );
        assert!(s.agreed().is_none());
    }

    #[test]
    fn plans_of_another_topic_incarnation_are_passed_over() {
        // Same offsets, other messages (the topic was recreated): shorter than ours, or
        // reaching past our messages (which must not make us wait for them).
        for old_offsets in [10..13, 10..40] {
            let mut old = PartitionState::<ClickRow>::new(0, RecentIds::new(60_000, 100));
            for o in old_offsets {
                old.push(o, message_hash(None, format!("old{o}").as_bytes()), None);
            }
            let stale = old.propose().expect("stale");
            let mut s = state(10..15);
            let ours = s.propose().expect("ours");
            assert_eq!(
                s.agree(
                    &[recorded(stale, "old"), recorded(ours.clone(), "me")],
                    "me",
                    0
                ),
                Agreement::Agreed
            );
            assert_eq!(s.agreed().expect("agreed").0, &ours);
        }
    }

    #[test]
    fn rows_to_send_skip_recent_ids_repeats_and_stored_rows() {
        let mut s = PartitionState::new(0, RecentIds::new(60_000, 100));
        for (o, id) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "d")] {
            s.push(
                o,
                message_hash(None, &[o as u8]),
                Some(row(o as u64, id, 1000)),
            );
        }
        s.recent.insert("c", 900);
        let ours = s.propose().expect("ours");
        s.agree(&[recorded(ours, "me")], "me", 0);
        let stored = HashSet::from([(5, "d".to_owned())]);
        assert_eq!(
            s.rows_to_send(&stored),
            vec![true, true, false, false, false]
        );
    }

    #[test]
    fn a_stamp_far_ahead_moves_the_window_only_as_far_as_the_tolerance() {
        let now = 1_796_212_800_000;
        assert_eq!(trusted_stamp(now - 5, now), now - 5);
        assert_eq!(trusted_stamp(now + 60_000, now), now + 60_000);
        assert_eq!(
            trusted_stamp(now + 3_600_000, now),
            now + FUTURE_STAMP_TOLERANCE_MS
        );
        // An hour's window: ids of the last 55 minutes survive a stamp an hour ahead.
        let mut ids = RecentIds::new(3_600_000, 100);
        ids.insert("recent", now - 10 * 60_000);
        ids.expire(trusted_stamp(now + 3_600_000, now));
        assert!(ids.contains("recent"));
    }

    #[test]
    fn recent_ids_expire_by_ingest_time_and_evict_oldest_first() {
        let mut ids = RecentIds::new(1000, 3);
        // Reloaded out of order: eviction still takes the oldest.
        ids.insert("c", 900);
        ids.insert("a", 0);
        ids.insert("b", 500);
        ids.insert("d", 950);
        assert!(!ids.contains("a") && ids.contains("b") && ids.contains("d"));
        // Long after (an outage), clicks received together are still compared.
        ids.expire(1_000);
        assert!(ids.contains("b") && ids.contains("c"));
        ids.expire(1600);
        assert!(!ids.contains("b") && ids.contains("c"));
        assert_eq!(ids.len(), 2);
    }
}
