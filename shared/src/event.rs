//! The Kafka event: the one schema both binaries agree on.
//!
//! Versioned JSON (`"v": 1`). `v` is the *major* version: within it, fields are only ever
//! added, so a reader ignores fields it does not know (a newer ingest may add an optional
//! field while older consumers still run); a different major is refused as such. It
//! carries only sanitized fields and keyed hashes: the raw IP and User-Agent have no place
//! in it. Decoding re-checks every rule, so a consumer never
//! writes a value the ingest contract would have refused (such a message is dead-lettered).

use serde::{Deserialize, Serialize};

use crate::click::{ClickId, LandingPath, ReferralCode, UtmValue, ValidClick};
use crate::hashing::{is_valid_key_id, Digest};

pub const EVENT_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClickEvent {
    pub v: u16,
    pub click_id: String,
    pub code: String,
    pub landing_path: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    /// HMAC-SHA-256 of the client IP, lower-case hex.
    pub ip_hash: String,
    /// HMAC-SHA-256 of the User-Agent, lower-case hex.
    pub ua_hash: String,
    pub key_id: String,
    pub is_bot: bool,
    /// When ingest accepted the click, Unix milliseconds.
    pub received_at_ms: u64,
    /// The account owning `code` when ingest accepted the click (stamped so analytics
    /// join nothing at query time). Added within v1: absent in older events.
    #[serde(default)]
    pub account_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a click event: {0}")]
    Malformed(String),
    #[error("unsupported event version {0}")]
    Version(u16),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The event of an accepted click, borrowed from its parts: what ingest serializes for
/// every click (it only ever needs the bytes, and copying the eleven strings into a
/// [`ClickEvent`] first was a fifth of the encoding cost). The same fields in the same
/// order as [`ClickEvent`]; unit tests and the fuzz target hold the two to the same bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClickEventRef<'a> {
    v: u16,
    click_id: &'a str,
    code: &'a str,
    landing_path: &'a str,
    utm_source: &'a str,
    utm_medium: &'a str,
    utm_campaign: &'a str,
    #[serde(serialize_with = "serialize_digest")]
    ip_hash: &'a Digest,
    #[serde(serialize_with = "serialize_digest")]
    ua_hash: &'a Digest,
    key_id: &'a str,
    is_bot: bool,
    received_at_ms: u64,
    account_id: &'a str,
}

impl<'a> ClickEventRef<'a> {
    pub fn new(
        click: &'a ValidClick,
        ip_hash: &'a Digest,
        ua_hash: &'a Digest,
        key_id: &'a str,
        is_bot: bool,
        received_at_ms: u64,
        account_id: &'a str,
    ) -> Self {
        Self {
            v: EVENT_VERSION,
            click_id: click.click_id.as_str(),
            code: click.code.as_str(),
            landing_path: click.landing_path.as_str(),
            utm_source: click.utm_source.as_str(),
            utm_medium: click.utm_medium.as_str(),
            utm_campaign: click.utm_campaign.as_str(),
            ip_hash,
            ua_hash,
            key_id,
            is_bot,
            received_at_ms,
            account_id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // About 400 bytes of JSON: one allocation.
        let mut out = Vec::with_capacity(512);
        // Serializing strings, bools and integers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, self);
        out
    }

    /// The owned event (what a reader decodes).
    pub fn to_event(&self) -> ClickEvent {
        ClickEvent {
            v: self.v,
            click_id: self.click_id.to_owned(),
            code: self.code.to_owned(),
            landing_path: self.landing_path.to_owned(),
            utm_source: self.utm_source.to_owned(),
            utm_medium: self.utm_medium.to_owned(),
            utm_campaign: self.utm_campaign.to_owned(),
            ip_hash: encode_digest(self.ip_hash),
            ua_hash: encode_digest(self.ua_hash),
            key_id: self.key_id.to_owned(),
            is_bot: self.is_bot,
            received_at_ms: self.received_at_ms,
            account_id: self.account_id.to_owned(),
        }
    }
}

fn serialize_digest<S: serde::Serializer>(digest: &&Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(digest_hex(digest, &mut [0u8; 64]))
}

impl ClickEvent {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, bools and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and re-validates an event.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_with_digests(payload).map(|(event, _, _)| event)
    }

    /// [`Self::decode`], also giving the IP and User-Agent digests it decoded while
    /// checking them (the consumer's row holds them as bytes).
    pub fn decode_with_digests(payload: &[u8]) -> Result<(Self, Digest, Digest), DecodeError> {
        let event: Self = decode_major(payload, EVENT_VERSION, |e: &Self| e.v)?;
        let invalid =
            |field: &'static str| move |reason: String| DecodeError::Invalid { field, reason };
        ClickId::parse(&event.click_id).map_err(invalid("click_id"))?;
        if event.click_id.trim() != event.click_id {
            return Err(invalid("click_id")("must be trimmed".into()));
        }
        ReferralCode::parse_normalized(&event.code).map_err(invalid("code"))?;
        LandingPath::parse_normalized(&event.landing_path).map_err(invalid("landing_path"))?;
        UtmValue::parse_normalized(&event.utm_source).map_err(invalid("utm_source"))?;
        UtmValue::parse_normalized(&event.utm_medium).map_err(invalid("utm_medium"))?;
        UtmValue::parse_normalized(&event.utm_campaign).map_err(invalid("utm_campaign"))?;
        let ip_hash = decode_digest(&event.ip_hash).map_err(invalid("ip_hash"))?;
        let ua_hash = decode_digest(&event.ua_hash).map_err(invalid("ua_hash"))?;
        if !is_valid_key_id(&event.key_id) {
            return Err(invalid("key_id")("must be 1 to 32 of A-Za-z0-9_-".into()));
        }
        if !event.account_id.is_empty() {
            crate::registry::check_account_id(&event.account_id).map_err(invalid("account_id"))?;
        }
        Ok((event, ip_hash, ua_hash))
    }
}

/// Parses a versioned JSON event of major `major` (`v` of the parsed value). One parse in
/// the common case. Another major may have another shape altogether, so the version
/// decides first whenever it is not ours, and when the event does not parse as ours (then
/// the version alone is read, to say which it is). A malformed payload is reported by its
/// position only: it may be anything.
pub fn decode_major<T: for<'de> Deserialize<'de>>(
    payload: &[u8],
    major: u16,
    version_of: impl Fn(&T) -> u16,
) -> Result<T, DecodeError> {
    #[derive(Deserialize)]
    struct Major {
        v: u16,
    }
    match serde_json::from_slice::<T>(payload) {
        Ok(event) if version_of(&event) == major => Ok(event),
        Ok(event) => Err(DecodeError::Version(version_of(&event))),
        Err(e) => Err(match serde_json::from_slice::<Major>(payload) {
            Ok(other) if other.v != major => DecodeError::Version(other.v),
            _ => DecodeError::Malformed(format!(
                "line {} column {}: {:?}",
                e.line(),
                e.column(),
                e.classify()
            )),
        }),
    }
}

/// A 64-character lower-case hex digest back to its 32 bytes. Table-driven: the consumer
/// decodes two digests per message, and `hex`'s per-character decoding plus a separate
/// case check showed up at 7 % of its CPU (when it decoded each twice).
pub fn decode_digest(hex_digest: &str) -> Result<Digest, String> {
    /// A nibble's value per byte, `INVALID` for anything but `0-9a-f`.
    const INVALID: u8 = 0xff;
    const NIBBLE: [u8; 256] = {
        let mut t = [INVALID; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let digits = hex_digest.as_bytes();
    let mut out = [0u8; 32];
    // Every valid nibble is below 16, so one high bit anywhere marks a bad digit.
    let mut bad = u8::from(digits.len() != 64) << 4;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        bad |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    if bad & 0xf0 != 0 {
        return Err("must be 64 lower-case hex digits".into());
    }
    Ok(out)
}

/// A digest as 64 lower-case hex digits (`hex::encode` collects characters one by one).
pub fn encode_digest(digest: &Digest) -> String {
    let mut out = [0u8; 64];
    digest_hex(digest, &mut out).to_owned()
}

/// A digest as 64 lower-case hex digits written into `out`.
fn digest_hex<'a>(digest: &Digest, out: &'a mut [u8; 64]) -> &'a str {
    // The buffer is exactly twice the input, so this cannot fail, and hex digits are ASCII.
    let _ = hex::encode_to_slice(digest, out);
    std::str::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::click::{validate, ClickInput};

    fn sample() -> ClickEvent {
        let input = ClickInput::from_json(
            br#"{"code":"a1b2c3d4e5f6","click_id":"refclk_abc","landing_path":"https://x.io/p?q=1","utm_source":"news\u200bletter"}"#,
        )
        .expect("json");
        let click = validate(&input, 12).expect("valid");
        ClickEventRef::new(
            &click,
            &[1; 32],
            &[2; 32],
            "k1",
            false,
            1_700_000_000_123,
            "acct_1",
        )
        .to_event()
    }

    #[test]
    fn digests_round_trip_as_lower_case_hex_and_nothing_else_decodes() {
        let digest: Digest = std::array::from_fn(|i| (i * 37 + 11) as u8);
        let text = encode_digest(&digest);
        assert_eq!(text, hex::encode(digest));
        assert_eq!(decode_digest(&text), Ok(digest));
        assert_eq!(
            decode_digest(&"0123456789abcdef".repeat(4)).map(|d| d[..8].to_vec()),
            Ok(vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef])
        );
        let upper = text.to_ascii_uppercase();
        let mut one_bad = text.clone();
        one_bad.replace_range(63..64, "g");
        let mut multibyte = text[..62].to_string();
        multibyte.push('é');
        for bad in [
            upper,
            one_bad,
            multibyte,
            text[..62].to_string(),
            format!("{text}00"),
            String::new(),
        ] {
            assert!(decode_digest(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_borrowed_encoding_is_byte_for_byte_the_event() {
        let inputs: [&[u8]; 2] = [
            br#"{"code":"a1b2c3d4e5f6","click_id":"refclk_q-x_1","landing_path":"https://x.io/caf\u00e9?q=1","utm_campaign":"a\\b \"c\" \u00e9t\u00e9","utm_source":"tab\there"}"#,
            br#"{"code":"a1b2c3d4e5f6"}"#,
        ];
        for json in inputs {
            let input = ClickInput::from_json(json).expect("json");
            let click = validate(&input, 12).expect("valid");
            for (is_bot, account) in [(false, "acct_1"), (true, "")] {
                let ip: Digest = std::array::from_fn(|i| i as u8);
                let ua: Digest = std::array::from_fn(|i| 255 - i as u8);
                let at = 1_700_000_000_123;
                let event = ClickEventRef::new(&click, &ip, &ua, "k1", is_bot, at, account);
                let (owned, borrowed) = (event.to_event(), event.encode());
                assert_eq!(
                    String::from_utf8_lossy(&borrowed),
                    String::from_utf8_lossy(&owned.encode())
                );
                assert_eq!(ClickEvent::decode(&borrowed), Ok(owned));
            }
        }
    }

    #[test]
    fn round_trips() {
        let event = sample();
        assert_eq!(event.landing_path, "/p");
        assert_eq!(event.utm_source, "newsletter");
        assert_eq!(ClickEvent::decode(&event.encode()), Ok(event));
    }

    #[test]
    fn carries_no_raw_ip_or_user_agent_fields() {
        let json: serde_json::Value = serde_json::from_slice(&sample().encode()).expect("json");
        let keys: Vec<_> = json.as_object().expect("object").keys().cloned().collect();
        assert!(
            !keys
                .iter()
                .any(|k| k == "ip" || k == "user_agent" || k == "ua"),
            "{keys:?}"
        );
    }

    #[test]
    fn decode_rejects_what_ingest_would_refuse() {
        let mut e = sample();
        e.landing_path = "//evil.com".into();
        assert!(matches!(
            ClickEvent::decode(&e.encode()),
            Err(DecodeError::Invalid {
                field: "landing_path",
                ..
            })
        ));
        let mut e = sample();
        e.code = "lower".into();
        assert!(matches!(
            ClickEvent::decode(&e.encode()),
            Err(DecodeError::Invalid { field: "code", .. })
        ));
        let mut e = sample();
        e.ip_hash = "zz".into();
        assert!(matches!(
            ClickEvent::decode(&e.encode()),
            Err(DecodeError::Invalid {
                field: "ip_hash",
                ..
            })
        ));
        let mut e = sample();
        e.v = 2;
        assert_eq!(
            ClickEvent::decode(&e.encode()),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            ClickEvent::decode(b"not json"),
            Err(DecodeError::Malformed(_))
        ));
        // A newer ingest within major 1 added a field: still a v1 event.
        let mut newer: serde_json::Value =
            serde_json::from_slice(&sample().encode()).expect("json");
        newer["landing_host"] = "shop.example".into();
        assert_eq!(
            ClickEvent::decode(newer.to_string().as_bytes()),
            Ok(sample())
        );
        // Major 2, shaped differently: refused for its version, not as malformed.
        assert_eq!(
            ClickEvent::decode(br#"{"v":2,"click":{"id":"x"}}"#),
            Err(DecodeError::Version(2))
        );
        assert!(matches!(
            ClickEvent::decode(br#"{"v":1}"#),
            Err(DecodeError::Malformed(_))
        ));
    }
}
