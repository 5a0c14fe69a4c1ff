//! `GET /referral.js`: the browser script (`ingest/referral.js`), embedded in the binary.
//!
//! Public and the same for everyone: `Access-Control-Allow-Origin: *`, cacheable for an
//! hour and revalidated with its `ETag` (a 304 costs a few bytes), gzip for clients that
//! accept it (compressed once, at start). Not limited per IP or plan, and never charged.

use std::io::Write as _;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, ACCESS_CONTROL_ALLOW_ORIGIN, CACHE_CONTROL,
    CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY, X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::envelope::Body;

pub const SCRIPT_PATH: &str = "/referral.js";
pub const SOURCE: &str = include_str!("../referral.js");

pub struct Script {
    plain: Bytes,
    gzip: Bytes,
    etag: HeaderValue,
}

impl Default for Script {
    fn default() -> Self {
        Self::new(SOURCE)
    }
}

impl Script {
    pub fn new(source: &str) -> Self {
        let digest = Sha256::digest(source.as_bytes());
        let etag = format!("\"{}\"", hex::encode(&digest[..12]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let gzip = gz
            .write_all(source.as_bytes())
            .and_then(|()| gz.finish())
            .unwrap_or_default();
        Self {
            plain: Bytes::copy_from_slice(source.as_bytes()),
            gzip: Bytes::from(gzip),
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
        }
    }

    /// The answer to a GET or HEAD (hyper sends no body for HEAD).
    pub fn respond(&self, request: &HeaderMap) -> Response<Body> {
        let not_modified = request
            .get_all(IF_NONE_MATCH)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| matches_etag(v, &self.etag)));
        let gzip = !self.gzip.is_empty()
            && request
                .get_all(ACCEPT_ENCODING)
                .iter()
                .any(|v| v.to_str().is_ok_and(accepts_gzip));
        let (status, body) = match (not_modified, gzip) {
            (true, _) => (StatusCode::NOT_MODIFIED, Bytes::new()),
            (false, true) => (StatusCode::OK, self.gzip.clone()),
            (false, false) => (StatusCode::OK, self.plain.clone()),
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(ETAG, self.etag.clone());
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600, stale-while-revalidate=86400"),
        );
        h.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        h.insert(
            "cross-origin-resource-policy",
            HeaderValue::from_static("cross-origin"),
        );
        if status == StatusCode::OK {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            if gzip {
                h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
        }
        response
    }
}

/// `If-None-Match` uses the weak comparison: `*`, or any listed tag equal to ours with or
/// without `W/`.
fn matches_etag(header: &str, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

/// `Accept-Encoding` lists gzip with a non-zero weight (`gzip;q=0` refuses it).
fn accepts_gzip(header: &str) -> bool {
    header.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;
    use http_body_util::BodyExt;

    async fn body_of(r: Response<Body>) -> Bytes {
        r.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn served_whole_with_its_headers_and_revalidated_with_the_etag() {
        let script = Script::default();
        let r = script.respond(&HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        let etag = r.headers()[ETAG].clone();
        assert_eq!(r.headers()[CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert_eq!(r.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(r.headers()[CACHE_CONTROL]
            .to_str()
            .is_ok_and(|v| v.contains("max-age=3600")));
        assert_eq!(body_of(r).await, SOURCE.as_bytes());

        let tag = etag.to_str().expect("ascii").to_owned();
        for header in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                IF_NONE_MATCH,
                HeaderValue::from_str(&header).expect("header"),
            );
            let r = script.respond(&h);
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{header}");
            assert_eq!(r.headers()[ETAG], etag);
            assert!(body_of(r).await.is_empty());
        }
        let r = script.respond(&headers(&[("if-none-match", "\"stale\"")]));
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn another_script_has_another_etag() {
        let a = Script::new("var a = 1;").respond(&HeaderMap::new());
        let b = Script::new("var a = 2;").respond(&HeaderMap::new());
        assert_ne!(a.headers()[ETAG], b.headers()[ETAG]);
    }

    #[tokio::test]
    async fn gzip_only_when_accepted() {
        let script = Script::default();
        let r = script.respond(&headers(&[("accept-encoding", "br, gzip;q=0.8")]));
        assert_eq!(r.headers()[CONTENT_ENCODING], "gzip");
        let zipped = body_of(r).await;
        let mut plain = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut plain)
            .expect("gzip");
        assert_eq!(plain, SOURCE);
        for refused in ["gzip;q=0", "br", "identity"] {
            let mut h = HeaderMap::new();
            h.insert(ACCEPT_ENCODING, HeaderValue::from_static(refused));
            let r = script.respond(&h);
            assert!(r.headers().get(CONTENT_ENCODING).is_none(), "{refused}");
        }
    }

    /// The script stays a few KB on the wire (it is loaded on every page of a site).
    #[test]
    fn the_script_is_small() {
        let script = Script::default();
        assert!(
            script.gzip.len() < 3 * 1024,
            "{} bytes gzipped",
            script.gzip.len()
        );
    }
}
