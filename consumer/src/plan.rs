//! Batch plans: which offsets of one partition go into one insert, named so that any
//! member that inserts the same offsets sends the same `insert_deduplication_token`.
//!
//! A plan is `(partition, lo..=hi, digest)`. The digest is SHA-256 over the per-message
//! hashes of every offset in the range (dead-lettered messages included), so it names the
//! *messages*, not just their positions: after a topic is recreated (or mirrored), the same
//! offsets carry other messages, get another digest, another token, and are never taken
//! for rows already stored.

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

/// A plan as recorded in the plans table by some member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPlan {
    pub range: PlanRange,
    pub member: String,
    pub planned_at_ms: u64,
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
    fn key_and_payload_boundaries_matter() {
        assert_ne!(
            message_hash(Some(b"ab"), b"c"),
            message_hash(Some(b"a"), b"bc")
        );
        assert_eq!(message_hash(None, b"x"), message_hash(Some(b""), b"x"));
    }
}
