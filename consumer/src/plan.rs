//! Batch plans: which offsets of one partition go into one insert, named so that any
//! member that inserts the same offsets sends the same `insert_deduplication_token`.
//!
//! A plan is `(partition, lo..=hi, digest)`. The digest is SHA-256 over the per-message
//! hashes of every offset in the range (dead-lettered messages included), so it names the
//! *messages*, not just their positions: after a topic is recreated (or mirrored), the same
//! offsets carry other messages, get another digest, another token, and are never taken
//! for rows already stored.

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};

/// The hash of one message (key and payload), the unit a plan digest is built from.
pub type MessageHash = [u8; 16];

pub fn message_hash(key: Option<&[u8]>, payload: &[u8]) -> MessageHash {
    let mut h = Sha256::new();
    // Lengths first, so (key, payload) pairs cannot run into each other.
    let key = key.unwrap_or_default();
    h.update((key.len() as u64).to_le_bytes());
    h.update(key);
    h.update((payload.len() as u64).to_le_bytes());
    h.update(payload);
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A partition's offsets `lo..=hi` and the digest of the messages at them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRange {
    pub partition: i32,
    pub lo: i64,
    pub hi: i64,
    /// 32 lower-case hex digits.
    pub digest: String,
    /// The hash of the message at `lo` (32 hex digits): tells at once whether a recorded
    /// plan is about the messages in hand, even before all of its messages arrived.
    pub head: String,
}

impl PlanRange {
    /// The range over `(offset, hash)` entries, which must be consecutive messages of one
    /// partition in offset order.
    pub fn over<'a>(
        partition: i32,
        entries: impl IntoIterator<Item = (i64, &'a MessageHash)>,
    ) -> Option<Self> {
        let mut h = Sha256::new();
        let mut bounds: Option<(i64, i64)> = None;
        let mut head = String::new();
        for (offset, hash) in entries {
            h.update(offset.to_le_bytes());
            h.update(hash);
            if bounds.is_none() {
                head = hex::encode(hash);
            }
            bounds = Some(bounds.map_or((offset, offset), |(lo, _)| (lo, offset)));
        }
        let (lo, hi) = bounds?;
        Some(Self {
            partition,
            lo,
            hi,
            digest: hex::encode(&h.finalize()[..16]),
            head,
        })
    }

    /// The server-side deduplication token of this plan's insert. The same for every
    /// member that inserts these messages; different for other messages at these offsets.
    pub fn token(&self, topic: &str) -> String {
        format!(
            "referral-clicks:v1:{topic}:{}:{}-{}:{}",
            self.partition, self.lo, self.hi, self.digest
        )
    }
}

/// The plans one member recorded in one flush, inserted together under one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlanGroup {
    /// 32 lower-case hex digits: a digest of the member plans' tokens.
    pub id: String,
    /// `(partition, lo)` of every plan in it, in partition order.
    pub starts: Vec<(i32, i64)>,
}

impl PlanGroup {
    /// The group of `plans` (of distinct partitions); `None` for fewer than two, which are
    /// inserted alone under their own token.
    pub fn of(topic: &str, plans: &[PlanRange]) -> Option<Self> {
        if plans.len() < 2 {
            return None;
        }
        let mut plans: Vec<&PlanRange> = plans.iter().collect();
        plans.sort_by_key(|p| p.partition);
        let mut h = Sha256::new();
        for token in plans.iter().map(|p| p.token(topic)) {
            h.update((token.len() as u64).to_le_bytes());
            h.update(token.as_bytes());
        }
        Some(Self {
            id: hex::encode(&h.finalize()[..16]),
            starts: plans.iter().map(|p| (p.partition, p.lo)).collect(),
        })
    }

    /// The server-side deduplication token of the group's insert: the same for every
    /// member that inserts all of its plans.
    pub fn token(&self, topic: &str) -> String {
        format!("referral-clicks:v1:{topic}:group:{}", self.id)
    }
}

/// Whether `group` can be inserted whole: at each of its start offsets, the plan every
/// member follows (the first recorded there, in commit order, about the same messages) is
/// the group's own. Once true or false it stays so (later records come later in commit
/// order). `None` when `recorded` (plans by partition, in commit order) lacks a start.
pub fn group_is_whole(
    group: &PlanGroup,
    recorded: &HashMap<i32, Vec<RecordedPlan>>,
) -> Option<bool> {
    let mut whole = true;
    for (partition, lo) in &group.starts {
        let at_start = || {
            recorded
                .get(partition)
                .into_iter()
                .flatten()
                .filter(move |r| r.range.lo == *lo)
        };
        let ours = at_start().find(|r| r.group.as_ref().is_some_and(|g| g.id == group.id))?;
        let followed = at_start().find(|r| r.range.head == ours.range.head)?;
        whole &= followed.group.as_ref().is_some_and(|g| g.id == group.id);
    }
    Some(whole)
}

/// A plan as recorded in the plans table by some member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPlan {
    pub range: PlanRange,
    pub member: String,
    pub planned_at_ms: u64,
    /// The group it was recorded in (`None`: inserted alone).
    pub group: Option<PlanGroup>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: i64) -> Vec<(i64, MessageHash)> {
        (0..n)
            .map(|o| {
                (
                    100 + o,
                    message_hash(Some(b"k"), format!("m{o}").as_bytes()),
                )
            })
            .collect()
    }

    #[test]
    fn same_messages_same_token_other_messages_other_token() {
        let entries = hashes(5);
        let a = PlanRange::over(3, entries.iter().map(|(o, h)| (*o, h))).expect("range");
        let b = PlanRange::over(3, entries.iter().map(|(o, h)| (*o, h))).expect("range");
        assert_eq!(a, b);
        assert_eq!((a.lo, a.hi), (100, 104));
        assert_eq!(a.token("t"), b.token("t"));
        assert!(a.token("t").starts_with("referral-clicks:v1:t:3:100-104:"));

        // A recreated topic: the same offsets, other messages.
        let other: Vec<(i64, MessageHash)> = (0..5)
            .map(|o| {
                (
                    100 + o,
                    message_hash(Some(b"k"), format!("new{o}").as_bytes()),
                )
            })
            .collect();
        let c = PlanRange::over(3, other.iter().map(|(o, h)| (*o, h))).expect("range");
        assert_eq!((c.lo, c.hi), (a.lo, a.hi));
        assert_ne!(c.token("t"), a.token("t"));

        // A shorter cut of the same messages is another plan.
        let d = PlanRange::over(3, entries[..4].iter().map(|(o, h)| (*o, h))).expect("range");
        assert_ne!(d.digest, a.digest);
        assert!(PlanRange::over(3, std::iter::empty()).is_none());
    }

    #[test]
    fn a_group_is_named_by_its_plans_in_any_order() {
        let entries = hashes(4);
        let plan = |partition: i32, n: usize| {
            PlanRange::over(partition, entries[..n].iter().map(|(o, h)| (*o, h))).expect("range")
        };
        let (a, b) = (plan(0, 4), plan(1, 3));
        let g = PlanGroup::of("t", &[a.clone(), b.clone()]).expect("group");
        assert_eq!(g.starts, vec![(0, 100), (1, 100)]);
        assert_eq!(PlanGroup::of("t", &[b.clone(), a.clone()]), Some(g.clone()));
        assert!(g.token("t").starts_with("referral-clicks:v1:t:group:"));
        // Another cut of one member, another topic: another group.
        assert_ne!(
            PlanGroup::of("t", &[a.clone(), plan(1, 4)]),
            Some(g.clone())
        );
        assert_ne!(
            PlanGroup::of("u", &[a.clone(), b]).map(|x| x.id),
            Some(g.id)
        );
        // One plan is no group: it keeps its own token.
        assert_eq!(PlanGroup::of("t", &[a]), None);
    }

    #[test]
    fn a_group_is_whole_only_where_each_of_its_plans_is_followed() {
        let entries = hashes(4);
        let plan = |partition: i32, n: usize| {
            PlanRange::over(partition, entries[..n].iter().map(|(o, h)| (*o, h))).expect("range")
        };
        let record = |range: PlanRange, group: Option<&PlanGroup>| RecordedPlan {
            range,
            member: "m".into(),
            planned_at_ms: 0,
            group: group.cloned(),
        };
        let (a, b) = (plan(0, 4), plan(1, 4));
        let g = PlanGroup::of("t", &[a.clone(), b.clone()]).expect("group");
        let mut recorded: HashMap<i32, Vec<RecordedPlan>> = HashMap::new();
        recorded.insert(0, vec![record(a.clone(), Some(&g))]);
        // A start not read yet: cannot tell.
        assert_eq!(group_is_whole(&g, &recorded), None);
        recorded.insert(1, vec![record(b.clone(), Some(&g))]);
        assert_eq!(group_is_whole(&g, &recorded), Some(true));
        // Recorded twice (a proposal made again as it was): still whole.
        recorded
            .get_mut(&1)
            .expect("p1")
            .push(record(b.clone(), Some(&g)));
        assert_eq!(group_is_whole(&g, &recorded), Some(true));
        // An earlier plan at partition 1's start (a shorter cut by someone else) is followed
        // there: nobody can insert the group whole.
        recorded.insert(
            1,
            vec![record(plan(1, 2), None), record(b.clone(), Some(&g))],
        );
        assert_eq!(group_is_whole(&g, &recorded), Some(false));
        // ... unless it is about other messages (an older incarnation of the topic).
        let other = [(100, message_hash(None, b"old"))];
        let old = PlanRange::over(1, other.iter().map(|(o, h)| (*o, h))).expect("range");
        recorded.insert(1, vec![record(old, None), record(b, Some(&g))]);
        assert_eq!(group_is_whole(&g, &recorded), Some(true));
    }

    #[test]
    fn key_and_payload_boundaries_matter() {
        assert_ne!(
            message_hash(Some(b"ab"), b"c"),
            message_hash(Some(b"a"), b"bc")
        );
        assert_eq!(message_hash(None, b"x"), message_hash(Some(b""), b"x"));
    }
}
