//! `POST /api/v1/referrals/conversions`: leads and sales, server to server.
//!
//! Order of work, cheapest refusal first: registry loaded (else 503: which keys exist is
//! not known yet), the bearer key (401, one answer for every reason), the key's rate
//! (429 `key_rate`), media type and declared length, bounded body read, decoding and
//! validation (400 with every bad field), the customer id's keyed hash, publish, and only
//! after the broker's acknowledgement a 200. No per-IP limit (a site's one backend sends
//! them all) and no plan limit: a conversion is never refused for the daily cap or the
//! included credits (a refused sale is lost revenue data); it costs one credit on the
//! bill, counted from ClickHouse.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::App;
use crate::body;
use crate::envelope::{envelope_with, ApiError, Body};
use crate::limits::{Limit, Refusal};
use crate::producer::ClickSink;
use shared::conversion::{validate, ConversionEvent, ConversionInput};
use shared::metric_names as m;

pub const CONVERSIONS_PATH: &str = "/api/v1/referrals/conversions";

/// A token bucket per API key, on this instance. Only authenticated keys reach it, so it
/// holds at most one entry per key in the registry.
pub struct KeyLimiter {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    clock: DefaultClock,
    per_minute: u32,
}

impl KeyLimiter {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let nz = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(nz(per_minute)).allow_burst(nz(burst));
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            per_minute,
        }
    }

    /// `Ok` when the key may send one more now; else how long until it may.
    pub fn check(&self, key: &Arc<str>) -> Result<(), Duration> {
        let now = self.clock.now();
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(now))
    }
}

/// The secret of an `Authorization: Bearer <secret>` header (scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim())
}

impl<S: ClickSink> App<S> {
    pub(super) async fn conversion(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        if !self.registry.is_ready() {
            return Err(ApiError::Unavailable(Duration::from_secs(1)));
        }
        let key = bearer(req.headers())
            .and_then(|secret| self.registry.authenticate(secret))
            .ok_or(ApiError::Unauthorized)?;
        if let Err(wait) = self.key_limiter.check(&key.key_id) {
            return Err(ApiError::RateLimited(Refusal {
                limit: Limit::KeyRate,
                plan: None,
                retry_after: wait,
                quota: u64::from(self.key_limiter.per_minute),
                window_secs: 60,
            }));
        }
        let limit = self.config.body_limit_bytes;
        let encoding = body::check_headers(req.headers(), limit)?;
        let raw = body::read(req.into_body(), encoding, limit, self.config.body_timeout).await?;
        let input =
            ConversionInput::from_json(&raw).map_err(|e| ApiError::InvalidParams(vec![e]))?;
        let received_at_ms = shared::now_ms();
        let conversion = validate(&input, received_at_ms).map_err(ApiError::InvalidParams)?;
        let customer_hash = self
            .customer_hasher
            .hash_customer(&key.account_id, &conversion.customer_id);
        let event = ConversionEvent::new(
            &conversion,
            &customer_hash,
            self.hasher.key_id(),
            received_at_ms,
            &key.account_id,
            &key.key_id,
        );
        // Keyed by the conversion's identity: a repeat lands in the partition of the first,
        // where the consumer recognizes it.
        let published = self
            .sink
            .publish_conversion(event.dedup_id().as_bytes(), &event.encode())
            .await;
        if let Err(e) = published {
            return Err(super::not_published(&e, "conversion"));
        }
        metrics::counter!(m::CONVERSIONS_ACCEPTED_TOTAL, "type" => conversion.kind.as_str())
            .increment(1);

        #[derive(Serialize)]
        struct Accepted<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            event_id: &'a str,
        }
        Ok(envelope_with(
            StatusCode::OK,
            "ok",
            &Accepted {
                kind: conversion.kind.as_str(),
                event_id: &conversion.event_id,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    #[test]
    fn only_a_bearer_header_names_a_secret() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer rk_x")])),
            Some("rk_x")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  rk_x ")])),
            Some("rk_x")
        );
        assert_eq!(bearer(&headers(&[("authorization", "Basic rk_x")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "rk_x")])), None);
        assert_eq!(bearer(&headers(&[])), None);
    }

    #[test]
    fn a_key_gets_its_burst_then_waits() {
        let limiter = KeyLimiter::new(60, 3);
        let (a, b): (Arc<str>, Arc<str>) = ("key_a".into(), "key_b".into());
        for _ in 0..3 {
            assert!(limiter.check(&a).is_ok());
        }
        let wait = limiter.check(&a).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert!(limiter.check(&b).is_ok());
    }
}
