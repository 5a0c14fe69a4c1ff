//! Routing and handlers: `POST /api/v1/referrals/click` (+ CORS preflight),
//! `POST /api/v1/referrals/conversions` ([`conversions`]), the browser script
//! `GET /referral.js`, `/metrics`, `/healthz`, `/readyz`.
//!
//! Order of work for a click, cheapest refusal first: per-IP rate limit (429 costs nothing
//! and publishes nothing), registry loaded (else 503), media type and declared length,
//! bounded body read, decoding, validation with the code looked up in the registry (an
//! unknown, disabled or suspended-account code is a 400), the account's plan limits (429),
//! hashing, publish, and only after the broker's acknowledgement a 200. A click refused
//! after its plan token was taken (no broker acknowledgement) gives the token back: 4xx
//! and 5xx are never charged. A panic anywhere in a handler becomes a 500 envelope, never
//! a dropped connection.

mod conversions;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use strum::EnumCount as _;

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, ORIGIN, SET_COOKIE, USER_AGENT, VARY,
};
use hyper::{Method, Request, Response, StatusCode};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::body;
use crate::client_ip::client_ip;
use crate::config::{Config, CorsOrigins, OnOff, Validated};
use crate::envelope::{envelope, envelope_with, ApiError, Body};
use crate::limits::store::RedisStore;
use crate::limits::{Limit, PlanLimiter, Refusal};
use crate::producer::{ClickSink, PublishError};
use crate::rate_limit::{IpLimits, IpRateLimiter};
use crate::refusals::RefusalCounts;
use crate::registry::SharedRegistry;
use crate::script::{Script, SCRIPT_PATH};
use shared::bot::BotDetector;
use shared::click::{validate_with, ClickInput};
use shared::event::ClickEventRef;
use shared::hashing::KeyedHasher;
use shared::metric_names as m;

use conversions::KeyLimiter;
pub use conversions::CONVERSIONS_PATH;

pub const CLICK_PATH: &str = "/api/v1/referrals/click";
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub struct App<S> {
    config: Config,
    hasher: KeyedHasher,
    customer_hasher: KeyedHasher,
    cors: CorsOrigins,
    sink: Arc<S>,
    limiter: IpRateLimiter,
    key_limiter: KeyLimiter,
    registry: Arc<SharedRegistry>,
    /// `None` with `INGEST_PLAN_LIMITS=off`.
    plan_limits: Option<Arc<PlanLimiter<RedisStore>>>,
    refusals: Arc<RefusalCounts>,
    bots: BotDetector,
    metrics: Option<PrometheusHandle>,
    http_metrics: HttpMetrics,
    script: Script,
}

/// What the app is built from besides its config.
pub struct Parts<S> {
    pub sink: Arc<S>,
    pub registry: Arc<SharedRegistry>,
    pub plan_limits: Option<Arc<PlanLimiter<RedisStore>>>,
    pub refusals: Arc<RefusalCounts>,
    pub metrics: Option<PrometheusHandle>,
}

impl<S: ClickSink> App<S> {
    pub fn new(config: Config, validated: Validated, parts: Parts<S>) -> Self {
        let nz = |v: u32| std::num::NonZeroU32::new(v).unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            limiter: IpRateLimiter::new(IpLimits {
                per_minute: nz(config.rate_limit_per_minute),
                burst: nz(config.rate_limit_burst),
                prefix_per_minute: nz(config.rate_limit_network_per_minute),
                prefix_burst: nz(config.rate_limit_network_burst),
                max_tracked: config.rate_limit_max_tracked,
            }),
            key_limiter: KeyLimiter::new(config.key_rate_per_minute, config.key_rate_burst),
            config,
            hasher: validated.hasher,
            customer_hasher: validated.customer_hasher,
            cors: validated.cors,
            sink: parts.sink,
            registry: parts.registry,
            plan_limits: parts.plan_limits,
            refusals: parts.refusals,
            bots: BotDetector::new(),
            metrics: parts.metrics,
            http_metrics: HttpMetrics::default(),
            script: Script::default(),
        }
    }

    /// Ready: the broker is reachable and the registry is loaded.
    fn is_ready(&self) -> bool {
        self.sink.is_ready() && self.registry.is_ready()
    }

    pub fn limiter(&self) -> &IpRateLimiter {
        &self.limiter
    }

    /// The hyper service: never fails, never panics outward.
    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let request_id = incoming_request_id(req.headers()).unwrap_or_else(new_request_id);
        let route = Route::of(req.uri().path());
        let origin = req.headers().get(ORIGIN).cloned();
        let mut response = match AssertUnwindSafe(self.route(req, peer.ip()))
            .catch_unwind()
            .await
        {
            Ok(response) => response,
            Err(_) => {
                tracing::error!(request_id = ?request_id, route = route.label(), "handler panicked");
                ApiError::Internal.into_response()
            }
        };
        if route == Route::Click {
            self.add_cors(&mut response, origin.as_ref());
        }
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        self.http_metrics
            .answered(route, response.status(), started);
        Ok(response)
    }

    async fn route(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        let method = req.method().clone();
        match (req.uri().path(), method) {
            (CLICK_PATH, Method::POST) => match self.click(req, peer).await {
                Ok(response) => response,
                Err(e) => {
                    metrics::counter!(m::CLICKS_REJECTED_TOTAL, "reason" => e.reason())
                        .increment(1);
                    e.into_response()
                }
            },
            (CLICK_PATH, Method::OPTIONS) => self.preflight(req.headers()),
            (CLICK_PATH, _) => ApiError::MethodNotAllowed("OPTIONS, POST").into_response(),
            (CONVERSIONS_PATH, Method::POST) => match self.conversion(req).await {
                Ok(response) => response,
                Err(e) => {
                    metrics::counter!(m::CONVERSIONS_REJECTED_TOTAL, "reason" => e.reason())
                        .increment(1);
                    e.into_response()
                }
            },
            (CONVERSIONS_PATH, _) => ApiError::MethodNotAllowed("POST").into_response(),
            (SCRIPT_PATH, Method::GET | Method::HEAD) => self.script.respond(req.headers()),
            ("/metrics", Method::GET | Method::HEAD) => self.metrics_text(),
            ("/healthz", Method::GET | Method::HEAD) => envelope(StatusCode::OK, "ok", None),
            ("/readyz", Method::GET | Method::HEAD) => {
                if self.is_ready() {
                    envelope(StatusCode::OK, "ok", None)
                } else {
                    ApiError::Unavailable(Duration::from_secs(1)).into_response()
                }
            }
            (SCRIPT_PATH | "/metrics" | "/healthz" | "/readyz", _) => {
                ApiError::MethodNotAllowed("GET, HEAD").into_response()
            }
            _ => ApiError::NotFound.into_response(),
        }
    }

    async fn click(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
    ) -> Result<Response<Body>, ApiError> {
        // For the refusal counts; the accepted click's `received_at` is the time its plan
        // token was taken, so it counts in the day and window it is stored under.
        let now_ms = shared::now_ms();
        let ip = client_ip(
            peer,
            req.headers(),
            &self.config.trusted_proxies.0,
            self.config.client_ip_header,
        );
        if let Err(wait) = self.limiter.check(ip) {
            metrics::counter!(m::RATE_LIMITED_TOTAL).increment(1);
            self.refusals.record(None, Limit::Ip, now_ms);
            return Err(ApiError::RateLimited(Refusal {
                limit: Limit::Ip,
                plan: None,
                retry_after: wait,
                quota: u64::from(self.config.rate_limit_per_minute),
                window_secs: 60,
            }));
        }
        if !self.registry.is_ready() {
            // Which codes exist is not known yet: refuse rather than guess.
            return Err(ApiError::Unavailable(Duration::from_secs(1)));
        }
        let limit = self.config.body_limit_bytes;
        let encoding = body::check_headers(req.headers(), limit)?;
        // A handle on the header's bytes (shared with hyper's buffer), kept past the body.
        let user_agent = req.headers().get(USER_AGENT).cloned();
        let raw = body::read(req.into_body(), encoding, limit, self.config.body_timeout).await?;
        let input = ClickInput::from_json(&raw).map_err(|e| ApiError::InvalidParams(vec![e]))?;
        let (click, account) = validate_with(&input, self.config.code_length, |code| {
            self.registry.resolve(code.as_str())
        })
        .map_err(ApiError::InvalidParams)?;

        let ticket = match &self.plan_limits {
            Some(limits) => match limits.check(&account).await {
                Ok(ticket) => Some(ticket),
                Err(refusal) => {
                    let plan = refusal.plan.as_deref().unwrap_or("");
                    self.refusals
                        .record(Some((&account.account_id, plan)), refusal.limit, now_ms);
                    return Err(ApiError::RateLimited(refusal));
                }
            },
            None => None,
        };

        // Accepted at the moment the plan token was taken (see `limits::Ticket::at_ms`).
        let received_at_ms = ticket.map_or_else(shared::now_ms, |t| t.at_ms());
        let user_agent = user_agent.as_ref().map_or(&[][..], HeaderValue::as_bytes);
        let ip_hash = self.hasher.hash(ip_text(ip, &mut [0u8; 64]));
        let ua_hash = self.hasher.hash(user_agent);
        let is_bot = self.bots.is_bot(&String::from_utf8_lossy(user_agent));
        let event = ClickEventRef::new(
            &click,
            &ip_hash,
            &ua_hash,
            self.hasher.key_id(),
            is_bot,
            received_at_ms,
            &account.account_id,
        )
        .encode();

        // Keyed by click id: random ids spread evenly over partitions, so one viral code
        // cannot make a partition hot, and a client retry (same id) lands in the same
        // partition, where the consumer recognizes it as the same click.
        let published = self
            .sink
            .publish(click.click_id.as_str().as_bytes(), &event)
            .await;
        if let Err(e) = published {
            if let (Some(limits), Some(ticket)) = (&self.plan_limits, ticket) {
                limits.refund(ticket);
            }
            return Err(not_published(&e, "click"));
        }
        self.http_metrics.accepted();

        #[derive(Serialize)]
        struct Accepted<'a> {
            click_id: &'a str,
            code: &'a str,
        }
        let mut response = envelope_with(
            StatusCode::OK,
            "ok",
            &Accepted {
                click_id: click.click_id.as_str(),
                code: click.code.as_str(),
            },
        );
        if !self.config.cookie_name.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&self.cookie(click.click_id.as_str())) {
                response.headers_mut().insert(SET_COOKIE, v);
            }
        }
        Ok(response)
    }

    fn cookie(&self, click_id: &str) -> String {
        let c = &self.config;
        let mut cookie = format!(
            "{}={click_id}; Max-Age={}; Path=/",
            c.cookie_name,
            c.cookie_max_age.as_secs()
        );
        if !c.cookie_domain.is_empty() {
            cookie.push_str("; Domain=");
            cookie.push_str(&c.cookie_domain);
        }
        // Secure always: browsers refuse SameSite=None without it.
        cookie.push_str("; ");
        cookie.push_str(c.cookie_samesite.attribute());
        cookie.push_str("; Secure");
        cookie
    }

    /// How the click route answers a request from `origin` (none: not a cross-origin
    /// request, nothing to say).
    fn cors_answer<'a>(&self, origin: Option<&'a HeaderValue>) -> Option<CorsAnswer<'a>> {
        let origin = origin?;
        let listed = origin.to_str().is_ok_and(|o| self.cors.allows(o));
        match (&self.cors, listed, self.config.cors_any_origin) {
            (CorsOrigins::Any, _, _) => Some(CorsAnswer::Star),
            (_, true, _) => Some(CorsAnswer::WithCredentials(origin)),
            (_, false, OnOff::On) => Some(CorsAnswer::Star),
            (_, false, OnOff::Off) => None,
        }
    }

    fn preflight(&self, headers: &HeaderMap) -> Response<Body> {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        if self.cors_answer(headers.get(ORIGIN)).is_some() {
            let h = response.headers_mut();
            h.insert(
                "access-control-allow-methods",
                HeaderValue::from_static("POST, OPTIONS"),
            );
            h.insert(
                "access-control-allow-headers",
                HeaderValue::from_static("content-type, content-encoding, x-request-id"),
            );
            h.insert("access-control-max-age", HeaderValue::from_static("600"));
        }
        response
    }

    /// CORS headers on every response of the click route. A listed origin is echoed with
    /// credentials allowed (so browsers accept the click cookie); any other origin gets
    /// `*` (unless `INGEST_CORS_ANY_ORIGIN=off`), which browsers honour only for requests
    /// without credentials: echoing every origin with credentials would let any site read
    /// answers made with the visitor's cookies. The answer holds only what the page sent.
    fn add_cors(&self, response: &mut Response<Body>, origin: Option<&HeaderValue>) {
        let h = response.headers_mut();
        h.append(VARY, HeaderValue::from_static("Origin"));
        if let Some(answer) = self.cors_answer(origin) {
            match answer {
                CorsAnswer::Star => {
                    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
                }
                CorsAnswer::WithCredentials(origin) => {
                    h.insert("access-control-allow-origin", origin.clone());
                    h.insert(
                        "access-control-allow-credentials",
                        HeaderValue::from_static("true"),
                    );
                }
            }
            h.insert(
                "access-control-expose-headers",
                HeaderValue::from_static("x-request-id, retry-after"),
            );
        }
    }

    fn metrics_text(&self) -> Response<Body> {
        let text = self
            .metrics
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        response
    }
}

/// The answer to an event the broker did not take (counted and logged): a 503 whose
/// `Retry-After` is short when only the producer queue was full.
fn not_published(e: &PublishError, what: &'static str) -> ApiError {
    metrics::counter!(m::PRODUCE_ERRORS_TOTAL, "cause" => e.cause()).increment(1);
    tracing::warn!(error = %e, what, "not published");
    ApiError::Unavailable(match e {
        PublishError::QueueFull => Duration::from_secs(1),
        _ => Duration::from_secs(5),
    })
}

/// The address as text (what is hashed: `IpAddr`'s `Display`), written into `buf`.
fn ip_text(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write as _;
    let mut w = &mut buf[..];
    // The longest address text is 45 bytes.
    let _ = write!(w, "{ip}");
    let left = w.len();
    &buf[..buf.len() - left]
}

/// The routes, as the metrics label them. `Route::COUNT` (derived) sizes the per-route
/// metric handles, which are indexed by the variant.
enum CorsAnswer<'a> {
    /// `Access-Control-Allow-Origin: *`, never with credentials.
    Star,
    /// The listed origin, credentials allowed.
    WithCredentials(&'a HeaderValue),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumCount)]
enum Route {
    Click,
    Conversions,
    Script,
    Metrics,
    Healthz,
    Readyz,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            CLICK_PATH => Self::Click,
            CONVERSIONS_PATH => Self::Conversions,
            SCRIPT_PATH => Self::Script,
            "/metrics" => Self::Metrics,
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            _ => Self::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Click => "click",
            Self::Conversions => "conversions",
            Self::Script => "script",
            Self::Metrics => "metrics",
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::Unknown => "unknown",
        }
    }
}

/// The statuses ingest answers with, in the order of [`HttpMetrics::requests`]' columns.
const STATUSES: [u16; 13] = [
    200, 204, 304, 400, 401, 404, 405, 408, 413, 415, 429, 500, 503,
];

/// The per-request metric handles, each looked up in the registry once (the `metrics`
/// macros hash the name and labels and look the series up on every call, and the status
/// label cost a `to_string`). Series appear on first use, as before.
#[derive(Default)]
struct HttpMetrics {
    requests: [[OnceLock<Counter>; STATUSES.len()]; Route::COUNT],
    durations: [OnceLock<Histogram>; Route::COUNT],
    accepted: OnceLock<Counter>,
}

impl HttpMetrics {
    fn answered(&self, route: Route, status: StatusCode, started: Instant) {
        let label = route.label();
        let code = status.as_u16();
        let series = || metrics::counter!(m::HTTP_REQUESTS_TOTAL, "route" => label, "status" => code.to_string());
        match STATUSES.iter().position(|s| *s == code) {
            Some(i) => self.requests[route as usize][i]
                .get_or_init(series)
                .increment(1),
            None => series().increment(1),
        }
        self.durations[route as usize]
            .get_or_init(|| metrics::histogram!(m::HTTP_REQUEST_DURATION, "route" => label))
            .record(started.elapsed().as_secs_f64());
    }

    fn accepted(&self) {
        self.accepted
            .get_or_init(|| metrics::counter!(m::CLICKS_ACCEPTED_TOTAL))
            .increment(1);
    }
}

/// An incoming id is echoed only when it is sane: 1–128 of `A-Za-z0-9._:-`.
fn incoming_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let sane = (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    sane.then(|| v.clone())
}

/// 128 random bits as 32 lower-case hex digits.
fn new_request_id() -> HeaderValue {
    let mut hex = [0u8; 32];
    // 16 bytes into 32 digits: cannot fail.
    let _ = hex::encode_to_slice(rand::random::<u128>().to_be_bytes(), &mut hex);
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hashed_address_text_is_its_display() {
        for ip in [
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:192.168.100.200",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_text(ip, &mut [0u8; 64]), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn request_ids_are_echoed_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(
            incoming_request_id(&h).as_ref().map(HeaderValue::as_bytes),
            Some(&b"abc-123_x.y:z"[..])
        );
        for bad in ["<script>", "a b", ""] {
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).expect("header"));
            assert_eq!(incoming_request_id(&h), None, "{bad}");
        }
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(129)).expect("header"),
        );
        assert_eq!(incoming_request_id(&h), None);
        assert_eq!(new_request_id().len(), 32);
    }
}
