//! Per-client-IP token bucket (the `governor` crate, GCRA): `per_minute` tokens a minute,
//! bursts of `burst`. Rejected requests are answered 429 with `Retry-After`, are not
//! charged and publish nothing. IPv6 clients are limited per /64, since one host
//! usually owns a whole /64 and could otherwise rotate addresses freely.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

#[derive(Clone)]
pub struct IpRateLimiter {
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl IpRateLimiter {
    pub fn new(per_minute: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Self {
            limiter: Arc::new(RateLimiter::keyed(quota)),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` when a token was taken; otherwise how long until the next one.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&bucket_key(ip))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops buckets that are full again, so memory follows active clients only.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    #[test]
    fn burst_then_refusal_with_wait_time() {
        let rl = IpRateLimiter::new(nz(60), nz(3));
        let a: IpAddr = "198.51.100.1".parse().expect("ip");
        for _ in 0..3 {
            assert!(rl.check(a).is_ok());
        }
        let wait = rl.check(a).expect_err("limited");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another client is unaffected.
        assert!(rl.check("198.51.100.2".parse().expect("ip")).is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let rl = IpRateLimiter::new(nz(60), nz(1));
        assert!(rl.check("2001:db8::1".parse().expect("ip")).is_ok());
        assert!(rl.check("2001:db8::ffff:2".parse().expect("ip")).is_err());
        assert!(rl.check("2001:db8:0:1::1".parse().expect("ip")).is_ok());
    }
}
