//! Per-client-IP limits: GCRA token buckets from the `governor` crate, kept in a bounded
//! state store of our own.
//!
//! * A bucket per address (`per_minute` a minute, bursts of `burst`), IPv6 per /64 (one
//!   host usually owns a whole /64 and could otherwise rotate addresses freely), and on top
//!   a bucket per network, /24 for IPv4 and /48 for IPv6, with `prefix_per_minute` /
//!   `prefix_burst`: an attacker with a /48 no longer gets 65,536 buckets of its own.
//! * Memory is bounded whatever the traffic: each of the two tables tracks at most
//!   `max_tracked` keys (governor's default store grows with every new address, and its
//!   cleanup walks the whole map). A new key that finds its shard full shares one of 1,024
//!   overflow buckets (chosen by a keyed hash of the key) with other untracked keys, so a
//!   flood of fresh addresses can neither grow memory nor bypass the limit; clients already
//!   tracked are not affected.
//! * A bucket that has refilled is the same as no bucket, so cleanup drops such entries,
//!   one small shard at a time from a background task that yields between shards: no
//!   request ever waits for a walk over the tables.
//!
//! Rejected requests are answered 429 with `Retry-After`, are not charged and publish
//! nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use shared::metric_names as m;

const SHARDS: usize = 64;
const OVERFLOW_BUCKETS: usize = 1024;

/// A governor state store with at most `capacity` keys (see the module doc).
pub struct BoundedStore {
    shards: Vec<Mutex<HashMap<IpAddr, u64>>>,
    per_shard: usize,
    /// Shared buckets of keys that could not be tracked; 0 = full bucket.
    overflow: Vec<AtomicU64>,
    hasher: RandomState,
    table: &'static str,
}

impl BoundedStore {
    fn new(capacity: usize, table: &'static str) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            overflow: (0..OVERFLOW_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            table,
        }
    }

    fn shard(&self, key: &IpAddr) -> (usize, u64) {
        let h = self.hasher.hash_one(key);
        ((h % SHARDS as u64) as usize, h)
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the entries of one shard whose bucket has refilled by `now` (nanoseconds on
    /// the limiter's clock).
    fn forget_idle_in(&self, shard: usize, now: u64) {
        if let Ok(mut map) = self.shards[shard].lock() {
            map.retain(|_, tat| *tat > now);
        }
    }
}

/// The store as governor holds it; the limiter keeps another handle for cleanup.
pub struct SharedStore(Arc<BoundedStore>);

impl StateStore for SharedStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl BoundedStore {
    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let (shard, hash) = self.shard(key);
        {
            let mut map = match self.shards[shard].lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(tat) = map.get_mut(key) {
                let (t, next) = f(Some(Nanos::from(*tat)))?;
                *tat = next.as_u64();
                return Ok(t);
            }
            if map.len() < self.per_shard {
                let (t, next) = f(None)?;
                map.insert(*key, next.as_u64());
                return Ok(t);
            }
        }
        metrics::counter!(m::RATE_LIMIT_UNTRACKED_TOTAL, "table" => self.table).increment(1);
        let slot = &self.overflow[(hash >> 32) as usize % OVERFLOW_BUCKETS];
        let mut current = slot.load(Ordering::Acquire);
        loop {
            let prev = (current != 0).then(|| Nanos::from(current));
            let (t, next) = f(prev)?;
            match slot.compare_exchange_weak(
                current,
                next.as_u64().max(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(t),
                Err(actual) => current = actual,
            }
        }
    }
}

type Limiter = RateLimiter<IpAddr, SharedStore, DefaultClock>;

/// Limits of the per-IP buckets.
#[derive(Debug, Clone, Copy)]
pub struct IpLimits {
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
    pub prefix_per_minute: NonZeroU32,
    pub prefix_burst: NonZeroU32,
    pub max_tracked: usize,
}

#[derive(Clone)]
pub struct IpRateLimiter {
    addresses: Arc<Limiter>,
    networks: Arc<Limiter>,
    address_store: Arc<BoundedStore>,
    network_store: Arc<BoundedStore>,
    clock: DefaultClock,
    /// When the limiters were made: their state is nanoseconds since about then.
    started: Instant,
}

impl IpRateLimiter {
    pub fn new(limits: IpLimits) -> Self {
        let started = Instant::now();
        let clock = DefaultClock::default();
        let address_store = Arc::new(BoundedStore::new(limits.max_tracked, "addresses"));
        let network_store = Arc::new(BoundedStore::new(limits.max_tracked, "networks"));
        let limiter = |per_minute, burst, store: &Arc<BoundedStore>| {
            Arc::new(RateLimiter::new(
                Quota::per_minute(per_minute).allow_burst(burst),
                SharedStore(Arc::clone(store)),
                clock.clone(),
            ))
        };
        Self {
            addresses: limiter(limits.per_minute, limits.burst, &address_store),
            networks: limiter(
                limits.prefix_per_minute,
                limits.prefix_burst,
                &network_store,
            ),
            address_store,
            network_store,
            clock,
            started,
        }
    }

    /// `Ok` when both the address and its network had a token; otherwise how long until
    /// the next one.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let (address, network) = keys(ip);
        let now = self.clock.now();
        self.addresses
            .check_key(&address)
            .map_err(|not_until| not_until.wait_time_from(now))?;
        self.networks
            .check_key(&network)
            .map_err(|not_until| not_until.wait_time_from(now))
    }

    /// Keys tracked now (addresses, networks).
    pub fn tracked(&self) -> (usize, usize) {
        (self.address_store.len(), self.network_store.len())
    }

    /// Forgets refilled buckets, one shard at a time, yielding in between. The limiters'
    /// clock started a moment after `started`, so their "now" is at most that moment
    /// behind ours: the one-second margin keeps every bucket that may still be limiting.
    pub async fn forget_idle(&self) {
        for shard in 0..SHARDS {
            let now = self
                .started
                .elapsed()
                .saturating_sub(Duration::from_secs(1))
                .as_nanos() as u64;
            self.address_store.forget_idle_in(shard, now);
            self.network_store.forget_idle_in(shard, now);
            tokio::task::yield_now().await;
        }
        let (a, n) = self.tracked();
        metrics::gauge!(m::RATE_LIMIT_TRACKED_KEYS, "table" => "addresses").set(a as f64);
        metrics::gauge!(m::RATE_LIMIT_TRACKED_KEYS, "table" => "networks").set(n as f64);
    }
}

/// The address bucket's key (IPv6: the /64) and the network bucket's key (/24, /48).
fn keys(ip: IpAddr) -> (IpAddr, IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut o = v4.octets();
            o[3] = 0;
            (ip, IpAddr::V4(o.into()))
        }
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            let address = IpAddr::V6(s.into());
            s[3] = 0;
            (address, IpAddr::V6(s.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    fn limiter(per_minute: u32, burst: u32, prefix: u32, max_tracked: usize) -> IpRateLimiter {
        IpRateLimiter::new(IpLimits {
            per_minute: nz(per_minute),
            burst: nz(burst),
            prefix_per_minute: nz(prefix),
            prefix_burst: nz(prefix),
            max_tracked,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn burst_then_refusal_with_wait_time() {
        let rl = limiter(60, 3, 1000, 1000);
        let a = ip("198.51.100.1");
        for _ in 0..3 {
            assert!(rl.check(a).is_ok());
        }
        let wait = rl.check(a).expect_err("limited");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another client is unaffected.
        assert!(rl.check(ip("198.51.100.2")).is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let rl = limiter(60, 1, 1000, 1000);
        assert!(rl.check(ip("2001:db8::1")).is_ok());
        assert!(rl.check(ip("2001:db8::ffff:2")).is_err());
        assert!(rl.check(ip("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn a_network_has_one_bucket_on_top_of_its_addresses() {
        // 10 a minute per /48 (and per /24): 65,536 /64s of one /48 get 10 in all.
        let rl = limiter(60, 5, 10, 100_000);
        let ok = (0..1000)
            .filter(|i| rl.check(ip(&format!("2001:db8:7:{i:x}::1"))).is_ok())
            .count();
        assert_eq!(ok, 10);
        let ok = (0..255)
            .filter(|i| rl.check(ip(&format!("203.0.113.{i}"))).is_ok())
            .count();
        assert_eq!(ok, 10);
        // Another network is unaffected.
        assert!(rl.check(ip("2001:db8:8::1")).is_ok());
        assert!(rl.check(ip("203.0.114.1")).is_ok());
    }

    #[test]
    fn a_flood_of_fresh_addresses_stays_within_the_cap_and_cannot_bypass_it() {
        // One request a minute, burst 1: a bucket the flood emptied stays empty for the
        // whole test.
        let rl = limiter(1, 1, 1_000_000, 1000);
        let known = ip("192.0.2.1");
        assert!(rl.check(known).is_ok());
        for i in 0..100_000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 256 + 1);
            let _ = rl.check(IpAddr::V4(a));
        }
        let (addresses, networks) = rl.tracked();
        assert!(
            addresses <= 1000 + SHARDS && networks <= 1000 + SHARDS,
            "{addresses} {networks}"
        );
        // The tracked client still has its own (empty) bucket.
        assert!(rl.check(known).is_err());
        // An untracked address is limited through its overflow bucket. About 99,000
        // untracked addresses hit 1,024 buckets, so each was emptied many times over (the
        // chance that one was never hit is below e^-90): none of them may pass now.
        let fresh = (0..50)
            .filter(|i| {
                rl.check(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i * 256)))
                    .is_ok()
            })
            .count();
        assert_eq!(
            fresh, 0,
            "untracked addresses passed through emptied overflow buckets"
        );
    }

    #[tokio::test]
    async fn refilled_buckets_are_forgotten() {
        let rl = limiter(60_000, 1, 60_000, 10_000);
        for i in 0..500u32 {
            let _ = rl.check(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert_eq!(rl.tracked().0, 500);
        // 1 ms per token (the two /24s took 250 each): all refilled after the margin.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        rl.forget_idle().await;
        assert_eq!(rl.tracked(), (0, 0));
    }
}
