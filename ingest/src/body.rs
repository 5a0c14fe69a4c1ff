//! Reading a click request body: media type and encoding checks, a bounded read under a
//! deadline, and gzip decoding that stops at the limit (a gzip bomb costs at most
//! `limit` bytes of memory).

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};

use crate::envelope::ApiError;
use shared::click::FieldError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

/// Gzip framing may make a small body slightly larger than its decoded form.
const GZIP_SLACK: usize = 1024;

/// Checks `Content-Type`, `Content-Encoding` and `Content-Length` before any byte is read.
pub fn check_headers(headers: &HeaderMap, limit: usize) -> Result<Encoding, ApiError> {
    let media_error = |field: &'static str, reason: &str| {
        ApiError::UnsupportedMediaType(FieldError {
            field,
            reason: reason.to_owned(),
        })
    };
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    if !(essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/plain"))
    {
        return Err(media_error(
            "content-type",
            "must be application/json or text/plain",
        ));
    }
    for param in parts {
        if let Some((name, value)) = param.split_once('=') {
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("charset")
                && !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8"))
            {
                return Err(media_error("content-type", "charset must be utf-8"));
            }
        }
    }
    let mut encoding = Encoding::Identity;
    for value in headers.get_all(CONTENT_ENCODING) {
        for coding in value.to_str().unwrap_or("?").split(',').map(str::trim) {
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                if encoding == Encoding::Gzip {
                    return Err(media_error(
                        "content-encoding",
                        "must be gzip or identity, once",
                    ));
                }
                encoding = Encoding::Gzip;
            } else if !(coding.is_empty() || coding.eq_ignore_ascii_case("identity")) {
                return Err(media_error("content-encoding", "must be gzip or identity"));
            }
        }
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > wire_limit(limit, encoding) as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(encoding)
}

fn wire_limit(limit: usize, encoding: Encoding) -> usize {
    match encoding {
        Encoding::Identity => limit,
        Encoding::Gzip => limit + GZIP_SLACK,
    }
}

/// Reads the whole body within `timeout`, then decodes it; at most `limit` decoded bytes.
pub async fn read(
    body: Incoming,
    encoding: Encoding,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(
        timeout,
        Limited::new(body, wire_limit(limit, encoding)).collect(),
    )
    .await
    .map_err(|_| ApiError::RequestTimeout)?;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::PayloadTooLarge);
        }
        // The client went away or broke the framing mid-body.
        Err(_) => {
            return Err(ApiError::InvalidParams(vec![FieldError {
                field: "body",
                reason: "incomplete request body".into(),
            }]));
        }
    };
    match encoding {
        Encoding::Identity => Ok(raw),
        Encoding::Gzip => gunzip(&raw, limit),
    }
}

pub fn gunzip(raw: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit + 1));
    // Reading one byte past the limit tells "exactly at the limit" from "over it". The
    // bytes are in memory already: the `bufread` decoder reads them in place (the `read`
    // one would copy them through a zeroed 32 KiB buffer of its own, per request).
    let read = MultiGzDecoder::new(raw)
        .take(limit as u64 + 1)
        .read_to_end(&mut out);
    match read {
        Ok(_) if out.len() > limit => Err(ApiError::PayloadTooLarge),
        Ok(_) => Ok(Bytes::from(out)),
        Err(_) => Err(ApiError::InvalidParams(vec![FieldError {
            field: "body",
            reason: "invalid gzip data".into(),
        }])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use hyper::header::HeaderValue;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).expect("write");
        e.finish().expect("finish")
    }

    #[test]
    fn accepts_json_and_beacon_types() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "text/plain;charset=UTF-8",
            "TEXT/PLAIN",
        ] {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(check_headers(&h, 100).expect(ct), Encoding::Identity);
        }
    }

    #[test]
    fn refuses_other_types_charsets_and_encodings() {
        for h in [
            headers(&[]),
            headers(&[("content-type", "application/x-www-form-urlencoded")]),
            headers(&[("content-type", "text/plain; charset=latin1")]),
            headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "br"),
            ]),
            headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip, gzip"),
            ]),
        ] {
            assert!(
                matches!(
                    check_headers(&h, 100),
                    Err(ApiError::UnsupportedMediaType(_))
                ),
                "{h:?}"
            );
        }
    }

    #[test]
    fn declared_length_over_limit_is_413_before_reading() {
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-length", "101"),
        ]);
        assert!(matches!(
            check_headers(&h, 100),
            Err(ApiError::PayloadTooLarge)
        ));
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-length", "100"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(check_headers(&h, 100).expect("ok"), Encoding::Gzip);
    }

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let bomb = gz(&vec![b' '; 10 * 1024 * 1024]);
        assert!(bomb.len() < 20 * 1024, "{}", bomb.len());
        assert!(matches!(
            gunzip(&bomb, 16 * 1024),
            Err(ApiError::PayloadTooLarge)
        ));
        assert_eq!(
            gunzip(&gz(&[b'a'; 100]), 100).expect("at the limit").len(),
            100
        );
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(ApiError::InvalidParams(_))
        ));
    }
}
