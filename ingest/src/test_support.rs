//! Helpers the unit tests of several modules share.

use hyper::header::{HeaderMap, HeaderValue};

/// A header map from static name/value pairs (repeated names are appended).
pub fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}
