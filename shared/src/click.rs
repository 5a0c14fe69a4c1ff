//! The referral click as the public endpoint receives it, and the rules that turn it into
//! a valid, sanitized click.
//!
//! Invariants:
//! * every newtype here (`ReferralCode`, `ClickId`, `LandingPath`, `UtmValue`) can only be
//!   built through a constructor that enforces its rule, so an invalid value cannot exist;
//! * sanitizing never silently changes meaning: trimming, ASCII-uppercasing a code,
//!   dropping a query string/fragment and removing invisible characters from utm values
//!   are the only changes; anything else that breaks a rule is an error, never truncated;
//! * every rule is checked for every field, so a 400 lists all bad fields at once.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use unicode_general_category::{get_general_category, GeneralCategory};

/// Default length of a referral code.
pub const DEFAULT_CODE_LEN: usize = 12;
/// Longest code length an operator may configure.
pub const MAX_CODE_LEN: usize = 64;
pub const CLICK_ID_PREFIX: &str = "refclk_";
pub const CLICK_ID_MAX_SUFFIX: usize = 64;
pub const LANDING_PATH_MAX_BYTES: usize = 2048;
pub const UTM_MAX_CHARS: usize = 256;

/// One rejected field, as listed in the error envelope's `data.errors`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// A normalized referral code: ASCII `A-Z0-9`, exactly the configured length.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReferralCode(String);

impl ReferralCode {
    /// Trims, ASCII-uppercases and checks the code against `len`.
    pub fn parse(raw: &str, len: usize) -> Result<Self, String> {
        let code = raw.trim().to_ascii_uppercase();
        if code.len() == len
            && code
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            Ok(Self(code))
        } else {
            Err(format!("must be {len} letters or digits"))
        }
    }

    /// Accepts an already-normalized code of any length from 1 to [`MAX_CODE_LEN`]; used
    /// where the configured length is not known (decoding events).
    pub fn parse_normalized(raw: &str) -> Result<Self, String> {
        let ok = (1..=MAX_CODE_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {MAX_CODE_LEN} upper-case letters or digits"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `refclk_` followed by 1–64 of `A-Za-z0-9_-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClickId(String);

impl ClickId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let id = raw.trim();
        let valid = id.strip_prefix(CLICK_ID_PREFIX).is_some_and(|suffix| {
            (1..=CLICK_ID_MAX_SUFFIX).contains(&suffix.len())
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if valid {
            Ok(Self(id.to_owned()))
        } else {
            Err(format!(
                "must be {CLICK_ID_PREFIX} followed by 1 to {CLICK_ID_MAX_SUFFIX} letters, digits, _ or -"
            ))
        }
    }

    /// A fresh id: `refclk_` + 128 random bits, URL-safe base64 without padding.
    pub fn generate() -> Self {
        let bits: [u8; 16] = rand::random();
        let suffix = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bits);
        Self(format!("{CLICK_ID_PREFIX}{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A site-relative path: starts with `/` (not `//`), no query string or fragment, no
/// control or invisible characters, at most [`LANDING_PATH_MAX_BYTES`] bytes. Empty means
/// "not given".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LandingPath(String);

/// The origin relative landing paths are resolved against (only its path is kept).
fn relative_base() -> &'static url::Url {
    static BASE: std::sync::OnceLock<url::Url> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        #[allow(clippy::expect_used)]
        url::Url::parse("https://landing.invalid/").expect("a constant, valid URL")
    })
}

impl LandingPath {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(Self::default());
        }
        let path = if starts_with_ignore_case(trimmed, "http://")
            || starts_with_ignore_case(trimmed, "https://")
        {
            let url =
                url::Url::parse(trimmed).map_err(|_| "must be a valid http(s) URL".to_owned())?;
            if url.host_str().is_none_or(str::is_empty) {
                return Err("must be a valid http(s) URL".to_owned());
            }
            url.path().to_owned()
        } else {
            // Query string and fragment may carry personal data: they are dropped.
            let end = trimmed.find(['?', '#']).unwrap_or(trimmed.len());
            let raw_path = &trimmed[..end];
            // The refusals apply to what was sent; then the path is normalized exactly as
            // the path of an absolute URL is (percent-encoding, dot segments), so one page
            // is one row whichever way it was reported.
            Self::check_path(raw_path)?;
            relative_base()
                .join(raw_path)
                .map_err(|_| {
                    "must be a path starting with a single / or an http(s) URL".to_owned()
                })?
                .path()
                .to_owned()
        };
        Self::check_path(&path)?;
        Ok(Self(path))
    }

    /// Accepts only a value that is already a sanitized path (or empty).
    pub fn parse_normalized(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        if raw.contains(['?', '#']) {
            return Err("must not carry a query string or fragment".to_owned());
        }
        Self::check_path(raw)?;
        Ok(Self(raw.to_owned()))
    }

    fn check_path(path: &str) -> Result<(), String> {
        let bytes = path.as_bytes();
        // `//host` and `/\host` are treated by browsers as another host, not a path.
        if bytes.first() != Some(&b'/') || matches!(bytes.get(1), Some(b'/' | b'\\')) {
            return Err("must be a path starting with a single / or an http(s) URL".to_owned());
        }
        if path.len() > LANDING_PATH_MAX_BYTES {
            return Err(format!("must be at most {LANDING_PATH_MAX_BYTES} bytes"));
        }
        if path
            .chars()
            .any(|c| c.is_whitespace() || is_control_or_invisible(c))
        {
            return Err("must not contain spaces, control or invisible characters".to_owned());
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A utm value: trimmed, control and invisible format characters removed, at most
/// [`UTM_MAX_CHARS`] characters. Empty means "not given".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UtmValue(String);

impl UtmValue {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let cleaned: String = raw
            .chars()
            .filter(|&c| !is_control_or_invisible(c))
            .collect();
        Self::check(cleaned.trim())
    }

    /// Accepts only a value that is already sanitized.
    pub fn parse_normalized(raw: &str) -> Result<Self, String> {
        if raw.trim() != raw || raw.chars().any(is_control_or_invisible) {
            return Err("must be trimmed and free of control or invisible characters".to_owned());
        }
        Self::check(raw)
    }

    fn check(value: &str) -> Result<Self, String> {
        if value.chars().count() > UTM_MAX_CHARS {
            return Err(format!("must be at most {UTM_MAX_CHARS} characters"));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Control (Cc) and invisible format (Cf: bidi controls, zero-width characters, BOM, …)
/// characters, plus the line and paragraph separators.
pub fn is_control_or_invisible(c: char) -> bool {
    matches!(
        get_general_category(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// A JSON value where a string belongs: a string, or anything else (a wrong type).
/// `null` never reaches this type: `Option<Loose>` turns it into `None` (missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loose {
    Str(String),
    NotString,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor;
        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
                Ok(Loose::Str(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::NotString)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Loose, E> {
                Ok(Loose::NotString)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Loose, E> {
                Ok(Loose::NotString)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose, E> {
                Ok(Loose::NotString)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::NotString)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::NotString)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::NotString)
            }
        }
        deserializer.deserialize_any(LooseVisitor)
    }
}

/// The request body as posted; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct ClickInput {
    #[serde(default)]
    pub code: Option<Loose>,
    #[serde(default)]
    pub click_id: Option<Loose>,
    #[serde(default)]
    pub landing_path: Option<Loose>,
    #[serde(default)]
    pub utm_source: Option<Loose>,
    #[serde(default)]
    pub utm_medium: Option<Loose>,
    #[serde(default)]
    pub utm_campaign: Option<Loose>,
}

impl ClickInput {
    /// Parses a request body. The error never quotes the input back.
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        json_object(body)
    }
}

/// Parses a request body that must be one JSON object into `T` (whose fields are all
/// optional). The error never quotes the input back.
pub fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FieldError> {
    // A derived struct would also accept a JSON array (fields by position): refuse it.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        let reason = if matches!(
            first,
            Some(b'[' | b'"' | b'0'..=b'9' | b'-' | b't' | b'f' | b'n')
        ) {
            "must be a JSON object"
        } else {
            "invalid JSON at line 1"
        };
        return Err(FieldError::new("body", reason));
    }
    serde_json::from_slice(body).map_err(|e| {
        let reason = match e.classify() {
            serde_json::error::Category::Data => {
                if e.to_string().starts_with("duplicate field") {
                    "must not repeat a field".to_owned()
                } else {
                    "must be a JSON object".to_owned()
                }
            }
            _ => format!("invalid JSON at line {} column {}", e.line(), e.column()),
        };
        FieldError::new("body", reason)
    })
}

/// A click that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidClick {
    pub code: ReferralCode,
    pub click_id: ClickId,
    /// True when the server made the id (the client sent none).
    pub click_id_generated: bool,
    pub landing_path: LandingPath,
    pub utm_source: UtmValue,
    pub utm_medium: UtmValue,
    pub utm_campaign: UtmValue,
}

/// The one reason for an unknown code, a disabled code and a code of a suspended account,
/// so that codes cannot be probed.
pub const UNKNOWN_CODE_REASON: &str = "unknown referral code";

/// Applies every rule of the contract to a parsed body; lists every bad field.
pub fn validate(input: &ClickInput, code_len: usize) -> Result<ValidClick, Vec<FieldError>> {
    validate_with(input, code_len, |_| Some(())).map(|(click, ())| click)
}

/// [`validate`], plus the registry: `resolve` answers what a well-formed code belongs to,
/// or `None` for an unknown one, which is then listed among the bad fields (the code's
/// error first, as always).
pub fn validate_with<T>(
    input: &ClickInput,
    code_len: usize,
    resolve: impl FnOnce(&ReferralCode) -> Option<T>,
) -> Result<(ValidClick, T), Vec<FieldError>> {
    let mut errors = Vec::new();

    let code = match string_field("code", &input.code, &mut errors) {
        None if matches!(input.code, Some(Loose::NotString)) => None,
        None => {
            errors.push(FieldError::new("code", "a click needs a code"));
            None
        }
        Some(raw) => ReferralCode::parse(raw, code_len)
            .map_err(|reason| errors.push(FieldError::new("code", reason)))
            .ok(),
    };
    let resolved = code.as_ref().and_then(|c| {
        let found = resolve(c);
        if found.is_none() {
            errors.push(FieldError::new("code", UNKNOWN_CODE_REASON));
        }
        found
    });
    let (click_id, click_id_generated) =
        match string_field("click_id", &input.click_id, &mut errors) {
            None => (Some(ClickId::generate()), true),
            Some(raw) => (
                ClickId::parse(raw)
                    .map_err(|reason| errors.push(FieldError::new("click_id", reason)))
                    .ok(),
                false,
            ),
        };
    let landing_path = optional(
        "landing_path",
        &input.landing_path,
        LandingPath::parse,
        &mut errors,
    );
    let utm_source = optional(
        "utm_source",
        &input.utm_source,
        UtmValue::parse,
        &mut errors,
    );
    let utm_medium = optional(
        "utm_medium",
        &input.utm_medium,
        UtmValue::parse,
        &mut errors,
    );
    let utm_campaign = optional(
        "utm_campaign",
        &input.utm_campaign,
        UtmValue::parse,
        &mut errors,
    );

    match (
        code,
        resolved,
        click_id,
        landing_path,
        utm_source,
        utm_medium,
        utm_campaign,
    ) {
        (
            Some(code),
            Some(resolved),
            Some(click_id),
            Some(landing_path),
            Some(utm_source),
            Some(utm_medium),
            Some(utm_campaign),
        ) if errors.is_empty() => Ok((
            ValidClick {
                code,
                click_id,
                click_id_generated,
                landing_path,
                utm_source,
                utm_medium,
                utm_campaign,
            },
            resolved,
        )),
        _ => Err(errors),
    }
}

/// The string value of a field, `None` when missing, null or blank; records a type error.
pub(crate) fn string_field<'a>(
    field: &'static str,
    value: &'a Option<Loose>,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match value {
        None => None,
        Some(Loose::NotString) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
        Some(Loose::Str(s)) if s.trim().is_empty() => None,
        Some(Loose::Str(s)) => Some(s),
    }
}

/// An optional field: missing or blank gives the default (empty), a bad value an error.
fn optional<T: Default>(
    field: &'static str,
    value: &Option<Loose>,
    parse: fn(&str) -> Result<T, String>,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    if matches!(value, Some(Loose::NotString)) {
        errors.push(FieldError::new(field, "must be a string"));
        return None;
    }
    match string_field(field, value, errors) {
        None => Some(T::default()),
        Some(raw) => parse(raw)
            .map_err(|reason| errors.push(FieldError::new(field, reason)))
            .ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(json: &str) -> ClickInput {
        ClickInput::from_json(json.as_bytes()).expect("valid JSON")
    }

    fn errors_of(json: &str) -> Vec<FieldError> {
        validate(&input(json), DEFAULT_CODE_LEN).expect_err("must be rejected")
    }

    #[test]
    fn docs_example_is_accepted_as_is() {
        let click = validate(
            &input(r#"{"click_id":"refclk_abc123","code":"A1B2C3D4E5F6","landing_path":"/pricing","utm_campaign":"spring-launch","utm_medium":"email","utm_source":"newsletter"}"#),
            DEFAULT_CODE_LEN,
        )
        .expect("valid");
        assert_eq!(click.code.as_str(), "A1B2C3D4E5F6");
        assert_eq!(click.click_id.as_str(), "refclk_abc123");
        assert!(!click.click_id_generated);
        assert_eq!(click.landing_path.as_str(), "/pricing");
        assert_eq!(click.utm_source.as_str(), "newsletter");
        assert_eq!(click.utm_medium.as_str(), "email");
        assert_eq!(click.utm_campaign.as_str(), "spring-launch");
    }

    #[test]
    fn code_is_trimmed_and_uppercased() {
        let click = validate(&input(r#"{"code":"  a1b2c3d4e5f6 "}"#), 12).expect("valid");
        assert_eq!(click.code.as_str(), "A1B2C3D4E5F6");
    }

    #[test]
    fn code_is_required() {
        for body in [r#"{}"#, r#"{"code":null}"#, r#"{"code":"   "}"#] {
            assert_eq!(
                errors_of(body),
                vec![FieldError::new("code", "a click needs a code")],
                "{body}"
            );
        }
    }

    #[test]
    fn bad_codes_are_rejected_not_truncated() {
        for code in [
            "A1B2C3D4E5F",
            "A1B2C3D4E5F6X",
            "A1B2C3-4E5F6",
            "A1B2C3D4E5FÄ",
            "A1B2C3\u{200b}D4E5F",
        ] {
            let body = serde_json::json!({ "code": code }).to_string();
            assert_eq!(errors_of(&body)[0].field, "code", "{code}");
        }
    }

    #[test]
    fn code_length_is_configurable() {
        assert!(validate(&input(r#"{"code":"ABC123"}"#), 6).is_ok());
        // An unknown code is listed like any bad field, with the other bad fields.
        let errors = validate_with(
            &input(r#"{"code":"abc123","landing_path":"//x"}"#),
            6,
            |c| (c.as_str() == "KNOWN1").then_some(()),
        )
        .expect_err("unknown");
        assert_eq!(
            errors,
            [
                FieldError::new("code", UNKNOWN_CODE_REASON),
                FieldError::new(
                    "landing_path",
                    "must be a path starting with a single / or an http(s) URL"
                ),
            ]
        );
        assert!(
            validate_with(&input(r#"{"code":"known1"}"#), 6, |c| (c.as_str()
                == "KNOWN1")
                .then_some(()))
            .is_ok()
        );
        assert!(validate(&input(r#"{"code":"ABC123"}"#), 12).is_err());
    }

    #[test]
    fn wrong_types_are_listed_per_field() {
        let errors = errors_of(
            r#"{"code":5,"click_id":[],"landing_path":{},"utm_source":true,"utm_medium":1.5,"utm_campaign":"ok"}"#,
        );
        let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "code",
                "click_id",
                "landing_path",
                "utm_source",
                "utm_medium"
            ]
        );
        assert!(errors.iter().all(|e| e.reason == "must be a string"));
    }

    #[test]
    fn missing_click_id_is_generated_unique_and_valid() {
        let a = validate(&input(r#"{"code":"A1B2C3D4E5F6"}"#), 12).expect("valid");
        let b = validate(&input(r#"{"code":"A1B2C3D4E5F6","click_id":""}"#), 12).expect("valid");
        assert!(a.click_id_generated && b.click_id_generated);
        assert_ne!(a.click_id, b.click_id);
        // 128 bits in URL-safe base64 without padding: 22 characters.
        assert_eq!(a.click_id.as_str().len(), CLICK_ID_PREFIX.len() + 22);
        assert!(ClickId::parse(a.click_id.as_str()).is_ok());
    }

    #[test]
    fn click_id_rules() {
        assert!(ClickId::parse("refclk_a").is_ok());
        assert!(ClickId::parse(&format!("refclk_{}", "a".repeat(64))).is_ok());
        for bad in [
            "refclk_",
            "clk_abc",
            "refclk_a b",
            "refclk_ä",
            "REFCLK_abc",
            &format!("refclk_{}", "a".repeat(65)),
        ] {
            assert!(ClickId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn landing_path_rules() {
        let ok = |raw: &str| LandingPath::parse(raw).expect(raw).as_str().to_owned();
        assert_eq!(ok("/pricing"), "/pricing");
        assert_eq!(ok("  /pricing?email=a@b.c#top "), "/pricing");
        assert_eq!(ok("https://example.com/a/b?x=1#y"), "/a/b");
        assert_eq!(ok("HTTP://example.com"), "/");
        assert_eq!(ok(""), "");
        for bad in [
            "pricing",
            "//evil.com/x",
            "/\\evil.com",
            "javascript:alert(1)",
            "ftp://x/y",
            "/a b",
            "/a\u{202e}b",
            "/a\u{0}b",
        ] {
            assert!(LandingPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(LandingPath::parse(&format!("/{}", "a".repeat(2047))).is_ok());
        assert!(LandingPath::parse(&format!("/{}", "a".repeat(2048))).is_err());
    }

    #[test]
    fn relative_and_absolute_forms_of_a_page_are_one_path() {
        let ok = |raw: &str| LandingPath::parse(raw).expect(raw).as_str().to_owned();
        for (relative, absolute) in [
            ("/a/./b/../c", "https://shop.example/a/./b/../c"),
            ("/caf\u{e9}", "https://shop.example/caf\u{e9}"),
            ("/%7Euser", "https://shop.example/%7Euser"),
            ("/a/%2e%2E/b", "https://shop.example/a/%2e%2E/b"),
            ("/p\"q<r>", "https://shop.example/p\"q<r>"),
        ] {
            assert_eq!(ok(relative), ok(absolute), "{relative} vs {absolute}");
        }
        assert_eq!(ok("/a/./b/../c"), "/a/c");
        assert_eq!(ok("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(ok("/../../etc"), "/etc");
        // Normalizing is idempotent, and what comes out passes the strict event check.
        for raw in ["/a/./b/../c", "/caf\u{e9}", "/x/%2e%2e/y"] {
            let once = ok(raw);
            assert_eq!(ok(&once), once);
            assert!(LandingPath::parse_normalized(&once).is_ok());
        }
    }

    #[test]
    fn utm_values_lose_invisible_characters_only() {
        let ok = |raw: &str| UtmValue::parse(raw).expect(raw).as_str().to_owned();
        assert_eq!(ok("  newsletter "), "newsletter");
        assert_eq!(ok("news\u{200b}letter\u{202e}"), "newsletter");
        assert_eq!(ok("\u{feff} spring\tlaunch\n"), "springlaunch");
        assert_eq!(ok("été 🎉"), "été 🎉");
        assert!(UtmValue::parse(&"é".repeat(256)).is_ok());
        assert!(UtmValue::parse(&"é".repeat(257)).is_err());
    }

    #[test]
    fn body_errors_do_not_quote_input() {
        for body in [
            "",
            "nope<script>",
            "[1,2]",
            "\"str\"",
            "{\"code\":\"A\"",
            "{} trailing",
        ] {
            let err = ClickInput::from_json(body.as_bytes()).expect_err(body);
            assert_eq!(err.field, "body");
            assert!(
                !err.reason.contains("script") && !err.reason.contains("str"),
                "{}",
                err.reason
            );
        }
        let dup = ClickInput::from_json(br#"{"code":"A","code":"B"}"#).expect_err("duplicate");
        assert_eq!(dup.reason, "must not repeat a field");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(validate(
            &input(r#"{"code":"A1B2C3D4E5F6","extra":{"deep":[1,2]}}"#),
            12
        )
        .is_ok());
    }

    /// A mix of well-formed and broken values for one field, so a run exercises both the
    /// accepting and the refusing paths of [`validate`].
    fn field(valid: &'static str, broken: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![3 => valid, 1 => broken]
    }

    /// A JSON value of any type, strings mostly (so most bodies reach [`validate`]).
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        prop_oneof![
            6 => "\\PC{0,40}".prop_map(Value::from),
            2 => "[a-zA-Z0-9]{12}".prop_map(Value::from),
            1 => Just(Value::Null),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<bool>().prop_map(Value::from),
            1 => proptest::collection::vec(any::<u8>(), 0..3).prop_map(Value::from),
            1 => Just(serde_json::json!({"deep": {"er": [1, "x"]}})),
        ]
    }

    /// A JSON object over the click's fields and a stranger, each present or not.
    fn json_object() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
        let keys = prop_oneof![
            Just("code"),
            Just("click_id"),
            Just("landing_path"),
            Just("utm_source"),
            Just("utm_medium"),
            Just("utm_campaign"),
            Just("extra"),
        ];
        proptest::collection::vec((keys, json_value()), 0..8)
            .prop_map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// Runs `cases` inputs through `check` and returns how many were accepted.
    fn count_accepted<S: Strategy>(
        cases: u32,
        strategy: S,
        check: impl Fn(S::Value) -> Result<bool, TestCaseError>,
    ) -> u32 {
        let accepted = std::sync::atomic::AtomicU32::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            ..ProptestConfig::default()
        });
        runner
            .run(&strategy, |value| {
                if check(value)? {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            })
            .expect("property holds");
        accepted.into_inner()
    }

    #[test]
    fn validation_never_panics_on_any_json_object() {
        let cases = 1024;
        let reached = count_accepted(cases, json_object(), |object| {
            let body = serde_json::Value::Object(object.clone()).to_string();
            let Ok(input) = ClickInput::from_json(body.as_bytes()) else {
                // Only a field of the wrong type may stop the body short of validation.
                let typed = object
                    .iter()
                    .all(|(k, v)| k == "extra" || v.is_string() || v.is_null());
                prop_assert!(!typed, "a well-typed object was refused: {body}");
                return Ok(false);
            };
            let _ = validate(&input, DEFAULT_CODE_LEN);
            Ok(true)
        });
        // Most objects have string fields only, so most must reach validate.
        assert!(
            reached * 3 > cases,
            "only {reached} of {cases} objects reached validate"
        );
    }

    #[test]
    fn any_mix_of_fields_gives_a_result_and_valid_output() {
        let cases = 1024;
        let strategy = (
            field("[ ]{0,2}[a-zA-Z0-9]{12}[ ]{0,2}", ".{0,20}"),
            field(
                "(https://[a-z]{1,8}\\.com)?/[a-z0-9/._-]{0,30}(\\?[a-z=&]{0,10})?",
                ".{0,40}",
            ),
            field("[a-z -]{0,30}", ".{0,300}"),
            field("(refclk_[A-Za-z0-9_-]{1,30})?", ".{0,30}"),
        );
        let accepted = count_accepted(cases, strategy, |(code, path, utm, id)| {
            let body = serde_json::json!({"code": code, "landing_path": path, "utm_source": utm, "click_id": id});
            let parsed = ClickInput::from_json(body.to_string().as_bytes()).expect("json");
            match validate(&parsed, DEFAULT_CODE_LEN) {
                Ok(click) => {
                    // Whatever was accepted passes the strict check used when decoding events.
                    prop_assert!(ReferralCode::parse_normalized(click.code.as_str()).is_ok());
                    prop_assert!(LandingPath::parse_normalized(click.landing_path.as_str()).is_ok());
                    prop_assert!(UtmValue::parse_normalized(click.utm_source.as_str()).is_ok());
                    prop_assert!(ClickId::parse(click.click_id.as_str()).is_ok());
                    // A blank id (whitespace only) counts as missing: the server makes one.
                    prop_assert_eq!(click.click_id_generated, id.trim().is_empty());
                    Ok(true)
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    Ok(false)
                }
            }
        });
        // Each field is well-formed 3 times in 4, so about 0.75^4 = 32 % are accepted.
        assert!(
            accepted * 5 > cases && accepted * 5 < cases * 4,
            "{accepted} of {cases} accepted: the mix no longer tests both paths"
        );
    }

    proptest! {
        #[test]
        fn valid_codes_normalize_idempotently(code in "[a-zA-Z0-9]{12}", pad in " {0,3}") {
            let raw = format!("{pad}{code}{pad}");
            let once = ReferralCode::parse(&raw, 12).expect("valid");
            prop_assert_eq!(once.as_str(), code.to_ascii_uppercase());
            let twice = ReferralCode::parse(once.as_str(), 12).expect("valid");
            prop_assert_eq!(once, twice);
        }

        #[test]
        fn sanitized_utm_has_no_invisible_chars(raw in "\\PC{0,50}[\u{200b}\u{202e}\u{0}\u{7f}]{0,5}\\PC{0,50}") {
            if let Ok(v) = UtmValue::parse(&raw) {
                prop_assert!(!v.as_str().chars().any(is_control_or_invisible));
                prop_assert_eq!(v.as_str().trim(), v.as_str());
                prop_assert!(v.as_str().chars().count() <= UTM_MAX_CHARS);
            }
        }

        #[test]
        fn accepted_paths_never_escape_the_site(raw in "(https?://[a-z]{1,8}\\.com)?[/\\\\?#a-z%.]{0,30}") {
            if let Ok(p) = LandingPath::parse(&raw) {
                let s = p.as_str();
                prop_assert!(s.is_empty() || (s.starts_with('/') && !s.starts_with("//") && !s.starts_with("/\\")));
                prop_assert!(!s.contains('?') && !s.contains('#'));
            }
        }
    }
}
