//! The response envelope `{"code", "msg", "data"}` and the one mapping from an error to
//! its HTTP response. The HTTP status always equals `code`. Error bodies are built with
//! `serde_json`, so nothing a client sent is ever echoed back unescaped; field reasons are
//! fixed texts that do not quote the input.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use shared::click::FieldError;

use crate::limits::Refusal;

pub type Body = Full<Bytes>;

#[derive(Debug)]
pub enum ApiError {
    InvalidParams(Vec<FieldError>),
    /// A missing, malformed, unknown or revoked API key, or one of a suspended account.
    Unauthorized,
    NotFound,
    MethodNotAllowed(&'static str),
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType(FieldError),
    RateLimited(Refusal),
    Unavailable(Duration),
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidParams(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn msg(&self) -> &'static str {
        match self {
            Self::InvalidParams(_) => "invalid params",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not found",
            Self::MethodNotAllowed(_) => "method not allowed",
            Self::RequestTimeout => "request timeout",
            Self::PayloadTooLarge => "payload too large",
            Self::UnsupportedMediaType(_) => "unsupported media type",
            Self::RateLimited(_) => "rate limit exceeded",
            Self::Unavailable(_) => "service unavailable",
            Self::Internal => "internal error",
        }
    }

    /// Label for the rejected-clicks metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidParams(_) => "invalid_params",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::RateLimited(_) => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The one place an error becomes a response.
    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct Errors<'a> {
            errors: &'a [FieldError],
        }
        let status = self.status();
        let data = match &self {
            Self::InvalidParams(errors) => serde_json::to_value(Errors { errors }).ok(),
            Self::UnsupportedMediaType(error) => serde_json::to_value(Errors {
                errors: std::slice::from_ref(error),
            })
            .ok(),
            Self::RateLimited(r) => Some(match &r.plan {
                Some(plan) => serde_json::json!({"limit": r.limit.name(), "plan": plan}),
                None => serde_json::json!({"limit": r.limit.name()}),
            }),
            _ => None,
        };
        let mut response = envelope(status, self.msg(), data);
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Self::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited(r) => {
                let secs = retry_after_secs(r.retry_after);
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
                // draft-ietf-httpapi-ratelimit-headers-09: the policy that refused, and its
                // state (nothing remaining, `t` seconds until a click would pass).
                let name = r.limit.name();
                let policy = format!("\"{name}\";q={};w={}", r.quota, r.window_secs);
                let state = format!("\"{name}\";r=0;t={secs}");
                for (header, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(header, v);
                    }
                }
            }
            Self::Unavailable(wait) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
            }
            _ => {}
        }
        response
    }
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

pub fn envelope(status: StatusCode, msg: &str, data: Option<serde_json::Value>) -> Response<Body> {
    envelope_with(status, msg, &data)
}

/// The envelope around any serializable `data` (`None` is `null`).
pub fn envelope_with<T: Serialize>(status: StatusCode, msg: &str, data: &T) -> Response<Body> {
    #[derive(Serialize)]
    struct Envelope<'a, T> {
        code: u16,
        msg: &'a str,
        data: &'a T,
    }
    let mut body = Vec::with_capacity(128);
    // Serializing into a Vec fails only for maps with non-string keys, which no `data` has.
    let _ = serde_json::to_writer(
        &mut body,
        &Envelope {
            code: status.as_u16(),
            msg,
            data,
        },
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(r: Response<Body>) -> serde_json::Value {
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn a_plan_refusal_names_its_limit_and_plan() {
        let r = ApiError::RateLimited(Refusal {
            limit: crate::limits::Limit::DailyCap,
            plan: Some("free".into()),
            retry_after: Duration::from_secs(3600),
            quota: 500,
            window_secs: 86_400,
        })
        .into_response();
        assert_eq!(
            r.headers()["ratelimit-policy"],
            r#""daily_cap";q=500;w=86400"#
        );
        assert_eq!(r.headers()["ratelimit"], r#""daily_cap";r=0;t=3600"#);
        assert_eq!(
            json_of(r).await,
            serde_json::json!({"code":429,"msg":"rate limit exceeded","data":{"limit":"daily_cap","plan":"free"}})
        );
    }

    #[tokio::test]
    async fn invalid_params_lists_fields() {
        let r = ApiError::InvalidParams(vec![FieldError {
            field: "code",
            reason: "must be 12 letters or digits".into(),
        }])
        .into_response();
        assert_eq!(r.status(), 400);
        assert_eq!(
            json_of(r).await,
            serde_json::json!({"code":400,"msg":"invalid params","data":{"errors":[{"field":"code","reason":"must be 12 letters or digits"}]}})
        );
    }

    #[tokio::test]
    async fn status_equals_code_and_headers_are_set() {
        let cases = [
            (ApiError::NotFound, 404),
            (ApiError::MethodNotAllowed("OPTIONS, POST"), 405),
            (ApiError::PayloadTooLarge, 413),
            (
                ApiError::RateLimited(Refusal {
                    limit: crate::limits::Limit::Ip,
                    plan: None,
                    retry_after: Duration::from_millis(1500),
                    quota: 120,
                    window_secs: 60,
                }),
                429,
            ),
            (ApiError::Unavailable(Duration::from_secs(1)), 503),
            (ApiError::Internal, 500),
        ];
        for (err, code) in cases {
            let r = err.into_response();
            assert_eq!(r.status().as_u16(), code);
            if code == 405 {
                assert_eq!(r.headers()[ALLOW], "OPTIONS, POST");
            }
            if code == 429 {
                assert_eq!(r.headers()[RETRY_AFTER], "2");
                assert_eq!(r.headers()["ratelimit-policy"], r#""ip";q=120;w=60"#);
                assert_eq!(r.headers()["ratelimit"], r#""ip";r=0;t=2"#);
                assert_eq!(json_of(r).await["data"], serde_json::json!({"limit": "ip"}));
                continue;
            }
            if code == 503 {
                assert_eq!(r.headers()[RETRY_AFTER], "1");
            }
            let body = json_of(r).await;
            assert_eq!(body["code"], code);
            assert!(body["data"].is_null());
        }
    }
}
