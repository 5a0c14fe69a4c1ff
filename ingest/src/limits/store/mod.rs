//! The shared counters behind the plan limits: Redis in production ([`RedisStore`]), and,
//! for tests, [`MemoryStore`], which runs the very same Lua script in process against an
//! emulation of the Redis commands it uses (unit tests share one between simulated
//! instances). The rules exist once: in `lease.lua`.
//!
//! One call ([`QuotaStore::lease`]) does, atomically for one account: give back the unused
//! tokens of the instance's previous lease, add the clicks the instance accepted on its own
//! while the store was unreachable, then check the three limits in the contract's order and
//! grant up to `want` tokens.
//!
//! The rules, and why a lease never lets more through than the limit:
//! * The rolling 60 s limit counts grants in 1 s slots. A lease is spent within
//!   [`LEASE_MS`] (2 s) of the time it was asked at, so the clicks accepted in any real
//!   60 s window `[s, s + 60)` were granted at times in `(s - 2, s + 60)`, which touch at
//!   most 63 consecutive slots ([`WINDOW_SLOTS`]); every check therefore sums all slots
//!   from `slot - 62` on (future slots of instances whose clock runs ahead included). The
//!   grant checked last among those clicks saw all the others: at most `limit` pass. The
//!   price is a window of up to 63 s instead of 60 s for an account that sends steadily
//!   above its limit (it gets 95 % of its nominal rate); the gain is half the Redis calls
//!   of a one-second lease (measured: about 1,200 calls a second for 2,000 busy accounts).
//! * Day and month counters are keyed by the UTC day and month of the instance's clock,
//!   the same clock that stamps `received_at`, and a lease never outlives its day, so the
//!   clicks of a day in ClickHouse are the grants of that day's counter.
//! * A grant is at most an even share (`ceil(room / instances)`) of what is left, so one
//!   instance cannot hold the rest of a small limit in a lease while others refuse.

use std::collections::BTreeMap;

use super::calendar;
use super::{AccountLimits, Limit};

#[cfg(any(test, feature = "memory-store"))]
mod memory;
mod redis;

#[cfg(any(test, feature = "memory-store"))]
pub use memory::MemoryStore;
pub use redis::{RedisStore, BATCH_LINGER_MS};

/// How long a lease may be spent after the time it was asked at.
pub const LEASE_MS: u64 = 2000;
/// A lease asks for its successor this long before it runs out or expires, so a steady
/// account never waits for a lease call (and the call can be batched).
pub const AHEAD_MS: u64 = 150;
/// Slots of the rolling window a check sums (60 s + the lease's 2 s + the slot boundary).
pub const WINDOW_SLOTS: u64 = 63;

/// Unused tokens of a lease, returned to the counters it was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiveBack {
    pub slot: u64,
    pub day: u32,
    pub month: u32,
    pub tokens: u32,
}

/// Clicks an instance accepted while the store was unreachable, to be added to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalSpends {
    pub day: u32,
    pub month: u32,
    /// Per 1 s slot.
    pub slots: BTreeMap<u64, u32>,
    pub total: u32,
}

#[derive(Debug, Clone)]
pub struct LeaseRequest<'a> {
    pub account: &'a str,
    pub now_ms: u64,
    /// 0: only give back and add.
    pub want: u32,
    pub limits: AccountLimits,
    pub instances: u32,
    pub give_back: Option<GiveBack>,
    pub spends: Option<&'a LocalSpends>,
    /// Whether a click waits for the answer (then the call goes at once, not batched with
    /// later ones). It may become set after the call was made.
    pub urgent: Urgency,
}

/// Whether a click waits for a lease call. The limiter sets it when a click starts waiting
/// for a call already made, which may be queued for a batch by then, or not yet.
#[derive(Debug, Clone, Default)]
pub struct Urgency(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Urgency {
    pub fn new(urgent: bool) -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
            urgent,
        )))
    }

    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAnswer {
    Granted {
        tokens: u32,
        day_used: u64,
        month_used: u64,
    },
    Refused {
        limit: Limit,
        /// For the rate limit: until a slot leaves the window. Day and month limits end
        /// with their period (computed by the caller).
        retry_after_ms: u64,
        day_used: u64,
        month_used: u64,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("limit store: {0}")]
pub struct StoreError(pub String);

pub trait QuotaStore: Send + Sync + 'static {
    fn lease(
        &self,
        req: LeaseRequest<'_>,
    ) -> impl std::future::Future<Output = Result<LeaseAnswer, StoreError>> + Send;

    /// Records this instance as alive; answers how many instances are.
    fn heartbeat(
        &self,
        instance: &str,
        now_ms: u64,
    ) -> impl std::future::Future<Output = Result<u32, StoreError>> + Send;

    /// Removes this instance (clean shutdown).
    fn leave(&self, instance: &str) -> impl std::future::Future<Output = ()> + Send;

    /// A click now waits for a call made ahead of need (its [`Urgency`] is set): send it
    /// without waiting for others.
    fn hurry(&self) {}
}

/// An instance counts as alive this long after its last heartbeat.
pub const INSTANCE_TTL_MS: u64 = 10_000;

fn limit_of(code: i64) -> Option<Limit> {
    match code {
        1 => Some(Limit::PlanRate),
        2 => Some(Limit::DailyCap),
        3 => Some(Limit::MonthlyCredits),
        _ => None,
    }
}

/// The lease, as one Lua script (atomic on the server). Keys of one account share a hash
/// tag, so the script also runs on Redis Cluster. Day counters live 2 days after their last
/// write and month counters 40, so a late give-back still finds its counter.
///
/// Redis runs it about 1,100 times a second for 2,000 busy accounts on one ingest, on the
/// cores ingest needs, so it makes as few Redis calls as it can (measured: about 11 for a
/// grant with a give-back, down from 20): one HMGET and one MGET for the state, TTLs set when
/// a key is created (and the window's once a minute of window movement), and a give-back
/// applied with one decrement that is corrected only when it went below zero.
pub(crate) const LEASE_SCRIPT: &str = include_str!("lease.lua");

/// Records an instance as alive (a sorted set scored by time) and answers how many are.
pub(crate) const HEARTBEAT_SCRIPT: &str = include_str!("heartbeat.lua");

/// One lease call as the script takes it: its keys and arguments, built the same way for
/// Redis and for the in-process store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseCall {
    pub keys: [String; 7],
    pub args: Vec<i64>,
}

impl LeaseCall {
    /// `prefix` namespaces the keys; the account's name is a hash tag, so all of an
    /// account's keys live on one Redis Cluster slot. `caller_time`: the script takes the
    /// request's `now_ms` as the time instead of the server's clock (tests that simulate
    /// days against the real Redis; never in production).
    pub fn new(prefix: &str, req: &LeaseRequest<'_>, caller_time: bool) -> Self {
        let day = calendar::day(req.now_ms);
        let month = calendar::month(req.now_ms);
        let gb = req.give_back.unwrap_or(GiveBack {
            slot: 0,
            day,
            month,
            tokens: 0,
        });
        let empty = LocalSpends {
            day,
            month,
            ..LocalSpends::default()
        };
        let spends = req.spends.unwrap_or(&empty);
        let key = |suffix: &str| format!("{prefix}{{{}}}:{suffix}", req.account);
        let wide = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let signed = |limit: Option<u64>| limit.map_or(-1, wide);
        // `w2`: the window with its running sum (`w` held the slots alone; not mixed up).
        let keys = [
            key("w2"),
            key(&format!("d{day}")),
            key(&format!("m{month}")),
            key(&format!("d{}", gb.day)),
            key(&format!("m{}", gb.month)),
            key(&format!("d{}", spends.day)),
            key(&format!("m{}", spends.month)),
        ];
        let mut args = vec![
            wide(req.now_ms),
            i64::from(req.want),
            i64::from(req.limits.rate_per_minute),
            signed(req.limits.daily_cap),
            signed(req.limits.monthly),
            i64::from(req.instances.max(1)),
            i64::from(gb.tokens),
            wide(gb.slot),
            i64::from(spends.total),
            wide(WINDOW_SLOTS),
            i64::from(caller_time),
        ];
        for (slot, count) in &spends.slots {
            args.push(wide(*slot));
            args.push(i64::from(*count));
        }
        Self { keys, args }
    }
}

/// The script's answer: `{granted, refused limit (0: none), retry ms, day used, month used}`.
pub(crate) fn parse_lease_reply(reply: &[i64]) -> Result<LeaseAnswer, StoreError> {
    let [granted, refused, retry, day_used, month_used] = reply[..] else {
        return Err(StoreError(format!("unexpected lease reply {reply:?}")));
    };
    let (day_used, month_used) = (day_used.max(0) as u64, month_used.max(0) as u64);
    Ok(match limit_of(refused) {
        Some(limit) => LeaseAnswer::Refused {
            limit,
            retry_after_ms: retry.max(0) as u64,
            day_used,
            month_used,
        },
        None => LeaseAnswer::Granted {
            tokens: u32::try_from(granted.max(0)).unwrap_or(u32::MAX),
            day_used,
            month_used,
        },
    })
}
