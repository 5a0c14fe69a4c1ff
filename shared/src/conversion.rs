//! Conversions: the leads and sales a referral program's owner reports, server to server,
//! and the rules that make one valid; and the Kafka event a valid one becomes.
//!
//! Invariants:
//! * every field is checked and every bad field is listed at once, with a fixed reason
//!   that never quotes the input;
//! * the customer id never leaves ingest raw: the event carries its keyed hash (the same
//!   HMAC and key id as the click's IP hash), since sites often use an e-mail address;
//! * a conversion's identity is its account, type and `event_id` ([`ConversionEvent::dedup_id`]):
//!   the Kafka key, and what the consumer stores once however often and however late it
//!   is posted again;
//! * decoding re-checks every rule, so the consumer never stores what ingest would refuse.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::click::{json_object, string_field, ClickId, FieldError, Loose};
use crate::event::{decode_digest, decode_major, encode_digest, DecodeError};
use crate::hashing::{is_valid_key_id, Digest};

pub const CONVERSION_EVENT_VERSION: u16 = 1;
/// Longest `event_id` and `customer_id`.
pub const ID_MAX_LEN: usize = 128;
/// Largest sale amount, in the currency's minor units.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// How far in the future `occurred_at` may be (clocks differ).
pub const MAX_FUTURE_MS: u64 = 5 * 60_000;
/// How far in the past `occurred_at` may be.
pub const MAX_PAST_MS: u64 = 400 * 86_400_000;

/// ISO 4217 codes in use (and the funds, metals and units the standard lists), without
/// `XXX` (no currency) and `XTS` (testing).
const CURRENCIES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND \
BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF \
DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR \
IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA \
MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR \
PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB \
TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU \
XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XUA YER ZAR ZMW ZWG ZWL";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversionType {
    /// A signup, a trial, a form.
    Lead,
    /// Money received.
    Sale,
}

impl ConversionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Sale => "sale",
        }
    }
}

/// A JSON value where an amount belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LooseAmount {
    Integer(u64),
    Negative,
    /// A whole number above `u64` (JSON has no integer limit).
    Huge,
    /// A fraction, a string, or any other type.
    NotInteger,
}

impl<'de> Deserialize<'de> for LooseAmount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AmountVisitor;
        impl<'de> Visitor<'de> for AmountVisitor {
            type Value = LooseAmount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LooseAmount, E> {
                Ok(LooseAmount::Integer(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LooseAmount, E> {
                Ok(u64::try_from(v).map_or(LooseAmount::Negative, LooseAmount::Integer))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LooseAmount, E> {
                Ok(if v.fract() != 0.0 || !v.is_finite() {
                    LooseAmount::NotInteger
                } else if v < 0.0 {
                    LooseAmount::Negative
                } else {
                    LooseAmount::Huge
                })
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LooseAmount, E> {
                Ok(LooseAmount::NotInteger)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LooseAmount, E> {
                Ok(LooseAmount::NotInteger)
            }
            fn visit_unit<E: de::Error>(self) -> Result<LooseAmount, E> {
                Ok(LooseAmount::NotInteger)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<LooseAmount, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LooseAmount::NotInteger)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LooseAmount, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LooseAmount::NotInteger)
            }
        }
        deserializer.deserialize_any(AmountVisitor)
    }
}

/// The request body as posted; unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct ConversionInput {
    #[serde(default, rename = "type")]
    pub kind: Option<Loose>,
    #[serde(default)]
    pub event_id: Option<Loose>,
    #[serde(default)]
    pub customer_id: Option<Loose>,
    #[serde(default)]
    pub click_id: Option<Loose>,
    #[serde(default)]
    pub amount: Option<LooseAmount>,
    #[serde(default)]
    pub currency: Option<Loose>,
    #[serde(default)]
    pub occurred_at: Option<Loose>,
}

impl ConversionInput {
    /// Parses a request body. The error never quotes the input back.
    pub fn from_json(body: &[u8]) -> Result<Self, FieldError> {
        json_object(body)
    }
}

/// A conversion that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidConversion {
    pub kind: ConversionType,
    pub event_id: String,
    pub customer_id: String,
    pub click_id: Option<ClickId>,
    /// Minor units; 0 for a lead.
    pub amount: u64,
    /// ISO 4217, upper-case; empty for a lead.
    pub currency: String,
    /// When it happened, Unix ms, if the site said.
    pub occurred_at_ms: Option<u64>,
}

/// 1–128 of `A-Za-z0-9` and `extra`.
fn site_id(raw: &str, extra: &[u8], what: &str) -> Result<String, String> {
    let id = raw.trim();
    let ok = (1..=ID_MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
    if ok {
        Ok(id.to_owned())
    } else {
        let extra: String = extra.iter().map(|b| char::from(*b)).collect();
        Err(format!(
            "{what} must be 1 to {ID_MAX_LEN} of A-Za-z0-9 and {extra}"
        ))
    }
}

pub fn parse_event_id(raw: &str) -> Result<String, String> {
    site_id(raw, b"_.:-", "an event id")
}

pub fn parse_customer_id(raw: &str) -> Result<String, String> {
    site_id(raw, b"_.:@+-", "a customer id")
}

/// An ISO 4217 code; lower case is accepted and upper-cased (payment providers send both).
pub fn parse_currency(raw: &str) -> Result<String, String> {
    let code = raw.trim().to_ascii_uppercase();
    let known = code.len() == 3
        && code.bytes().all(|b| b.is_ascii_uppercase())
        && CURRENCIES.split(' ').any(|c| c == code);
    if known {
        Ok(code)
    } else {
        Err("must be an ISO 4217 currency code such as USD or EUR".into())
    }
}

/// An RFC 3339 time within `MAX_PAST_MS` before and `MAX_FUTURE_MS` after `now_ms`.
pub fn parse_occurred_at(raw: &str, now_ms: u64) -> Result<u64, String> {
    let at =
        time::OffsetDateTime::parse(raw.trim(), &time::format_description::well_known::Rfc3339)
            .map_err(|_| "must be an RFC 3339 time such as 2026-03-01T12:00:00Z".to_owned())?;
    let ms = at.unix_timestamp_nanos() / 1_000_000;
    let ms = u64::try_from(ms).map_err(|_| "must be at most 400 days ago".to_owned())?;
    if ms > now_ms.saturating_add(MAX_FUTURE_MS) {
        return Err("must be at most 5 minutes in the future".into());
    }
    if ms < now_ms.saturating_sub(MAX_PAST_MS) {
        return Err("must be at most 400 days ago".into());
    }
    Ok(ms)
}

/// Applies every rule to a parsed body at `now_ms`; lists every bad field.
pub fn validate(input: &ConversionInput, now_ms: u64) -> Result<ValidConversion, Vec<FieldError>> {
    let mut errors = Vec::new();
    let required = |field: &'static str,
                    value: &Option<Loose>,
                    parse: &dyn Fn(&str) -> Result<String, String>,
                    missing: &str,
                    errors: &mut Vec<FieldError>| {
        let raw = string_field(field, value, errors);
        match raw {
            None if matches!(value, Some(Loose::NotString)) => None,
            None => {
                errors.push(FieldError::new(field, missing));
                None
            }
            Some(raw) => parse(raw)
                .map_err(|reason| errors.push(FieldError::new(field, reason)))
                .ok(),
        }
    };
    let kind = required(
        "type",
        &input.kind,
        &|raw| match raw.trim() {
            "lead" | "sale" => Ok(raw.trim().to_owned()),
            _ => Err("must be lead or sale".into()),
        },
        "a conversion needs a type: lead or sale",
        &mut errors,
    )
    .map(|k| {
        if k == "sale" {
            ConversionType::Sale
        } else {
            ConversionType::Lead
        }
    });
    let event_id = required(
        "event_id",
        &input.event_id,
        &parse_event_id,
        "a conversion needs an event_id",
        &mut errors,
    );
    let customer_id = required(
        "customer_id",
        &input.customer_id,
        &parse_customer_id,
        "a conversion needs a customer_id",
        &mut errors,
    );
    let click_id = match string_field("click_id", &input.click_id, &mut errors) {
        None => Some(None),
        Some(raw) => ClickId::parse(raw)
            .map(Some)
            .map_err(|reason| errors.push(FieldError::new("click_id", reason)))
            .ok(),
    };
    let currency_raw = string_field("currency", &input.currency, &mut errors);
    let (amount, currency) = match kind {
        Some(ConversionType::Sale) => {
            let amount = match input.amount {
                None => {
                    errors.push(FieldError::new("amount", "a sale needs an amount"));
                    None
                }
                Some(a) => amount(a)
                    .map_err(|reason| errors.push(FieldError::new("amount", reason)))
                    .ok(),
            };
            let currency = match currency_raw {
                None if matches!(input.currency, Some(Loose::NotString)) => None,
                None => {
                    errors.push(FieldError::new("currency", "a sale needs a currency"));
                    None
                }
                Some(raw) => parse_currency(raw)
                    .map_err(|reason| errors.push(FieldError::new("currency", reason)))
                    .ok(),
            };
            (amount, currency)
        }
        _ => {
            if input.amount.is_some() {
                errors.push(FieldError::new("amount", "a lead has no amount"));
            }
            if currency_raw.is_some() {
                errors.push(FieldError::new("currency", "a lead has no currency"));
            }
            (Some(0), Some(String::new()))
        }
    };
    let occurred_at_ms = match string_field("occurred_at", &input.occurred_at, &mut errors) {
        None => Some(None),
        Some(raw) => parse_occurred_at(raw, now_ms)
            .map(Some)
            .map_err(|reason| errors.push(FieldError::new("occurred_at", reason)))
            .ok(),
    };
    match (
        kind,
        event_id,
        customer_id,
        click_id,
        amount,
        currency,
        occurred_at_ms,
    ) {
        (
            Some(kind),
            Some(event_id),
            Some(customer_id),
            Some(click_id),
            Some(amount),
            Some(currency),
            Some(occurred_at_ms),
        ) if errors.is_empty() => Ok(ValidConversion {
            kind,
            event_id,
            customer_id,
            click_id,
            amount,
            currency,
            occurred_at_ms,
        }),
        _ => Err(errors),
    }
}

fn amount(a: LooseAmount) -> Result<u64, String> {
    match a {
        LooseAmount::Integer(v) if v <= MAX_AMOUNT => Ok(v),
        LooseAmount::Integer(_) | LooseAmount::Huge => {
            Err("must be at most 1000000000000 (minor units)".into())
        }
        LooseAmount::Negative => Err("must be 0 or more".into()),
        LooseAmount::NotInteger => {
            Err("must be a whole number of the currency's minor units".into())
        }
    }
}

/// The event of an accepted conversion, as published to the conversions topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionEvent {
    pub v: u16,
    #[serde(rename = "type")]
    pub kind: ConversionType,
    pub event_id: String,
    /// HMAC-SHA-256 of the customer id, lower-case hex.
    pub customer_hash: String,
    /// The hash key's id.
    pub key_id: String,
    /// The named click, or empty.
    pub click_id: String,
    pub amount: u64,
    pub currency: String,
    /// When it happened (the site's time, else when ingest received it), Unix ms.
    pub occurred_at_ms: u64,
    /// When ingest accepted it, Unix ms.
    pub received_at_ms: u64,
    /// The account of the API key.
    pub account_id: String,
    /// The API key's public id.
    pub api_key_id: String,
}

impl ConversionEvent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conversion: &ValidConversion,
        customer_hash: &Digest,
        key_id: &str,
        received_at_ms: u64,
        account_id: &str,
        api_key_id: &str,
    ) -> Self {
        Self {
            v: CONVERSION_EVENT_VERSION,
            kind: conversion.kind,
            event_id: conversion.event_id.clone(),
            customer_hash: encode_digest(customer_hash),
            key_id: key_id.to_owned(),
            click_id: conversion
                .click_id
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            amount: conversion.amount,
            currency: conversion.currency.clone(),
            occurred_at_ms: conversion.occurred_at_ms.unwrap_or(received_at_ms),
            received_at_ms,
            account_id: account_id.to_owned(),
            api_key_id: api_key_id.to_owned(),
        }
    }

    /// The conversion's identity: account, type and event id (the Kafka key too, so a
    /// repeat lands in the partition of the first).
    pub fn dedup_id(&self) -> String {
        dedup_id(&self.account_id, self.kind, &self.event_id)
    }

    pub fn encode(&self) -> Vec<u8> {
        // Strings and integers: cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and re-validates an event; also gives the customer hash as bytes.
    pub fn decode(payload: &[u8]) -> Result<(Self, Digest), DecodeError> {
        let event: Self = decode_major(payload, CONVERSION_EVENT_VERSION, |e: &Self| e.v)?;
        let invalid =
            |field: &'static str| move |reason: String| DecodeError::Invalid { field, reason };
        let same = |field: &'static str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(invalid(field)("is not in its normal form".into()))
            }
        };
        same(
            "event_id",
            parse_event_id(&event.event_id).map_err(invalid("event_id"))? == event.event_id,
        )?;
        let customer_hash =
            decode_digest(&event.customer_hash).map_err(invalid("customer_hash"))?;
        if !is_valid_key_id(&event.key_id) {
            return Err(invalid("key_id")("must be 1 to 32 of A-Za-z0-9_-".into()));
        }
        if !event.click_id.is_empty() {
            let id = ClickId::parse(&event.click_id).map_err(invalid("click_id"))?;
            same("click_id", id.as_str() == event.click_id)?;
        }
        match event.kind {
            ConversionType::Sale => {
                if event.amount > MAX_AMOUNT {
                    return Err(invalid("amount")("must be at most 10^12".into()));
                }
                same(
                    "currency",
                    parse_currency(&event.currency).map_err(invalid("currency"))? == event.currency,
                )?;
            }
            ConversionType::Lead => {
                if event.amount != 0 || !event.currency.is_empty() {
                    return Err(invalid("amount")("a lead has no amount".into()));
                }
            }
        }
        crate::registry::check_account_id(&event.account_id).map_err(invalid("account_id"))?;
        crate::keys::KeyId::parse(&event.api_key_id).map_err(invalid("api_key_id"))?;
        Ok((event, customer_hash))
    }
}

/// `account/type/event_id`: account ids and event ids hold no `/`.
pub fn dedup_id(account_id: &str, kind: ConversionType, event_id: &str) -> String {
    format!("{account_id}/{}/{event_id}", kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_780_000_000_000; // 2026-05-28

    fn check(json: &str) -> Result<ValidConversion, Vec<FieldError>> {
        let input = ConversionInput::from_json(json.as_bytes()).map_err(|e| vec![e])?;
        validate(&input, NOW)
    }

    fn fields(json: &str) -> Vec<(&'static str, String)> {
        check(json)
            .expect_err("must be refused")
            .into_iter()
            .map(|e| (e.field, e.reason))
            .collect()
    }

    #[test]
    fn a_sale_and_a_lead_are_accepted_and_normalized() {
        let sale = check(
            r#"{"type":"sale","event_id":" inv_42 ","customer_id":"ann+1@example.com",
                "click_id":"refclk_abc","amount":4200,"currency":"usd",
                "occurred_at":"2026-05-28T07:00:00+02:00","extra":[1]}"#,
        )
        .expect("valid");
        assert_eq!(sale.kind, ConversionType::Sale);
        assert_eq!(sale.event_id, "inv_42");
        assert_eq!(sale.currency, "USD");
        assert_eq!(sale.amount, 4200);
        assert_eq!(sale.occurred_at_ms, Some(1_779_944_400_000));
        assert_eq!(
            sale.click_id.as_ref().map(ClickId::as_str),
            Some("refclk_abc")
        );
        let lead =
            check(r#"{"type":"lead","event_id":"signup:1","customer_id":"c1","click_id":null}"#)
                .expect("valid");
        assert_eq!(
            (lead.amount, lead.currency.as_str(), lead.click_id),
            (0, "", None)
        );
    }

    #[test]
    fn every_bad_field_is_listed_with_a_reason_that_quotes_nothing() {
        let errors = fields(
            r#"{"type":"refund","event_id":"a b","customer_id":"<x>","click_id":"nope",
                "occurred_at":"yesterday"}"#,
        );
        let names: Vec<_> = errors.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            names,
            ["type", "event_id", "customer_id", "click_id", "occurred_at"]
        );
        for (_, reason) in &errors {
            assert!(
                !reason.contains("refund") && !reason.contains("<x>"),
                "{reason}"
            );
        }
        assert_eq!(
            fields("{}").iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            ["type", "event_id", "customer_id"]
        );
    }

    #[test]
    fn a_sale_needs_a_whole_amount_in_range_and_a_known_currency() {
        let sale = |amount: &str, currency: &str| {
            fields(&format!(
                r#"{{"type":"sale","event_id":"e","customer_id":"c","amount":{amount},"currency":{currency}}}"#
            ))
        };
        assert_eq!(sale("-1", "\"USD\"")[0].1, "must be 0 or more");
        assert_eq!(sale("1.5", "\"USD\"")[0].0, "amount");
        assert_eq!(sale("\"100\"", "\"USD\"")[0].0, "amount");
        assert_eq!(sale("1000000000001", "\"USD\"")[0].0, "amount");
        assert_eq!(sale("100000000000000000000000", "\"USD\"")[0].0, "amount");
        assert_eq!(sale("1", "\"XYZ\"")[0].0, "currency");
        assert_eq!(sale("1", "\"US\"")[0].0, "currency");
        assert_eq!(sale("1", "5")[0], ("currency", "must be a string".into()));
        assert!(check(r#"{"type":"sale","event_id":"e","customer_id":"c","amount":1000000000000,"currency":"EUR"}"#).is_ok());
        assert!(check(
            r#"{"type":"sale","event_id":"e","customer_id":"c","amount":0,"currency":"JPY"}"#
        )
        .is_ok());
        let missing = fields(r#"{"type":"sale","event_id":"e","customer_id":"c"}"#);
        assert_eq!(
            missing.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            ["amount", "currency"]
        );
        let lead = fields(
            r#"{"type":"lead","event_id":"e","customer_id":"c","amount":1,"currency":"USD"}"#,
        );
        assert_eq!(
            lead.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            ["amount", "currency"]
        );
    }

    #[test]
    fn occurred_at_is_bounded_around_now() {
        let at = |t: &str| {
            check(&format!(
                r#"{{"type":"lead","event_id":"e","customer_id":"c","occurred_at":"{t}"}}"#
            ))
        };
        assert!(at("2026-05-28T20:24:00Z").is_ok()); // 4 minutes ahead
        assert_eq!(
            at("2026-05-28T20:40:00Z").expect_err("future")[0].reason,
            "must be at most 5 minutes in the future"
        );
        assert!(at("2025-04-25T00:00:00Z").is_ok());
        assert_eq!(
            at("2025-04-20T00:00:00Z").expect_err("past")[0].reason,
            "must be at most 400 days ago"
        );
        assert_eq!(
            at("1960-01-01T00:00:00Z").expect_err("past")[0].field,
            "occurred_at"
        );
    }

    #[test]
    fn ids_keep_to_their_alphabets() {
        assert!(parse_event_id(&"a".repeat(128)).is_ok());
        assert!(parse_event_id(&"a".repeat(129)).is_err());
        assert!(parse_event_id("in@1").is_err());
        assert!(parse_customer_id("ann+tag@example.com").is_ok());
        assert!(parse_customer_id("ann/x").is_err());
    }

    fn event() -> ConversionEvent {
        let v = check(r#"{"type":"sale","event_id":"inv_1","customer_id":"c","click_id":"refclk_x","amount":5,"currency":"EUR"}"#)
            .expect("valid");
        ConversionEvent::new(&v, &[7; 32], "k1", NOW, "acct_1", "key_0123456789abcdef")
    }

    #[test]
    fn the_event_round_trips_and_holds_no_raw_customer_id() {
        let e = event();
        assert_eq!(e.occurred_at_ms, NOW);
        assert_eq!(e.dedup_id(), "acct_1/sale/inv_1");
        let bytes = e.encode();
        assert!(!String::from_utf8_lossy(&bytes).contains("\"c\""));
        let (back, hash) = ConversionEvent::decode(&bytes).expect("decodes");
        assert_eq!((back, hash), (e, [7; 32]));
    }

    #[test]
    fn a_bad_event_is_refused_by_field() {
        let bad = |f: &dyn Fn(&mut ConversionEvent)| {
            let mut e = event();
            f(&mut e);
            ConversionEvent::decode(&e.encode()).expect_err("refused")
        };
        let field = |e: DecodeError| match e {
            DecodeError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other:?}"),
        };
        assert_eq!(field(bad(&|e| e.amount = MAX_AMOUNT + 1)), "amount");
        assert_eq!(field(bad(&|e| e.currency = "usd".into())), "currency");
        assert_eq!(field(bad(&|e| e.event_id = " x".into())), "event_id");
        assert_eq!(field(bad(&|e| e.api_key_id = "k".into())), "api_key_id");
        assert!(matches!(bad(&|e| e.v = 2), DecodeError::Version(2)));
        assert!(matches!(
            ConversionEvent::decode(b"{"),
            Err(DecodeError::Malformed(_))
        ));
    }
}
