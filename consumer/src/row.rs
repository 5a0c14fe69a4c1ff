//! The row of `referral_clicks`, built from a decoded event and where it sat in Kafka.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use shared::event::{ClickEvent, DecodeError};
use shared::hashing::Digest;

/// Why a message cannot become a row (it goes to the dead-letter topic with this reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("empty payload")]
    Empty,
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("invalid {0}")]
    OutOfRange(&'static str),
}

impl Rejection {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Decode(DecodeError::Malformed(_)) => "malformed",
            Self::Decode(DecodeError::Version(_)) => "version",
            Self::Decode(DecodeError::Invalid { .. }) | Self::OutOfRange(_) => "invalid",
        }
    }
}

/// Field order and types match `deploy/clickhouse/0001_referral_clicks.sql` (plain
/// RowBinary carries no names, so order matters). `inserted_at` is left to its default.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct ClickRow {
    pub click_id: String,
    pub code: String,
    pub landing_path: String,
    pub utm_source: String,
    pub utm_medium: String,
    pub utm_campaign: String,
    pub ip_hash: [u8; 32],
    pub ua_hash: [u8; 32],
    pub key_id: String,
    pub is_bot: u8,
    /// DateTime: seconds since the epoch.
    pub received_at: u32,
    pub received_at_ms: u64,
    pub kafka_topic: String,
    pub kafka_partition: u16,
    pub kafka_offset: u64,
    pub account_id: String,
}

impl ClickRow {
    /// `event` and its digests must come from [`ClickEvent::decode_with_digests`].
    pub fn new(
        event: ClickEvent,
        (ip_hash, ua_hash): (Digest, Digest),
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Self, Rejection> {
        Ok(Self {
            ip_hash,
            ua_hash,
            click_id: event.click_id,
            code: event.code,
            landing_path: event.landing_path,
            utm_source: event.utm_source,
            utm_medium: event.utm_medium,
            utm_campaign: event.utm_campaign,
            key_id: event.key_id,
            is_bot: u8::from(event.is_bot),
            received_at: u32::try_from(event.received_at_ms / 1000)
                .map_err(|_| Rejection::OutOfRange("received_at"))?,
            received_at_ms: event.received_at_ms,
            kafka_topic: topic.to_owned(),
            kafka_partition: u16::try_from(partition)
                .map_err(|_| Rejection::OutOfRange("partition"))?,
            kafka_offset: u64::try_from(offset).map_err(|_| Rejection::OutOfRange("offset"))?,
            account_id: event.account_id,
        })
    }
}

/// Decodes a message into a row, or says why it cannot be one.
pub fn from_message(
    payload: &[u8],
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<ClickRow, Rejection> {
    if payload.is_empty() {
        return Err(Rejection::Empty);
    }
    let (event, ip_hash, ua_hash) = ClickEvent::decode_with_digests(payload)?;
    ClickRow::new(event, (ip_hash, ua_hash), topic, partition, offset)
}

/// A row for unit tests: click `id` at `offset` of `partition`, received at `at_ms`.
#[cfg(test)]
pub(crate) fn test_row(partition: u16, offset: u64, id: &str, at_ms: u64) -> ClickRow {
    ClickRow {
        click_id: id.into(),
        code: "A1B2C3D4E5F6".into(),
        landing_path: String::new(),
        utm_source: String::new(),
        utm_medium: String::new(),
        utm_campaign: String::new(),
        ip_hash: [0; 32],
        ua_hash: [0; 32],
        key_id: "k1".into(),
        is_bot: 0,
        received_at: 0,
        received_at_ms: at_ms,
        kafka_topic: "t".into(),
        kafka_partition: partition,
        kafka_offset: offset,
        account_id: "acct_1".into(),
    }
}
