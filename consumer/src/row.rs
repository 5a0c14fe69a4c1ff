//! The rows the consumer stores, built from a decoded event and where it sat in Kafka:
//! `referral_clicks` ([`ClickRow`]) and `conversions` ([`ConversionRow`]). The pipeline is
//! the same for both ([`Stored`]): what differs is how a message becomes a row and the
//! column naming a row's identity (a client retry of it is the same row). What follows a
//! stored plan, for either stream, is [`crate::settle`].

use clickhouse::{Row, RowOwned, RowWrite};
use serde::{Deserialize, Serialize};

use shared::conversion::ConversionEvent;
use shared::event::{ClickEvent, DecodeError};
use shared::hashing::Digest;

/// Which of the two streams a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Clicks,
    Conversions,
}

impl Stream {
    /// The `stream` label of the per-stream metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Clicks => "clicks",
            Self::Conversions => "conversions",
        }
    }
}

/// A row the pipeline stores exactly once (see [`crate::pipeline`]).
pub trait Stored: RowOwned + RowWrite + Sized + Send + Sync + std::fmt::Debug + 'static {
    const STREAM: Stream;
    /// The column holding [`Stored::id`].
    const ID_COLUMN: &'static str;
    fn from_message(
        payload: &[u8],
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Self, Rejection>;
    /// The row's identity: a message with the same id is a client retry of it.
    fn id(&self) -> &str;
    /// When ingest accepted it, Unix ms.
    fn received_at_ms(&self) -> u64;
    /// The same, in seconds (the table's `received_at`).
    fn received_at(&self) -> u32;
    fn kafka_offset(&self) -> u64;
    /// A conversion's customer and time, where attribution starts from ([`crate::settle`]).
    fn seed(&self) -> Option<crate::attribution::Seed> {
        None
    }
}

impl Stored for ClickRow {
    const STREAM: Stream = Stream::Clicks;
    const ID_COLUMN: &'static str = "click_id";
    fn from_message(
        payload: &[u8],
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Self, Rejection> {
        from_message(payload, topic, partition, offset)
    }
    fn id(&self) -> &str {
        &self.click_id
    }
    fn received_at_ms(&self) -> u64 {
        self.received_at_ms
    }
    fn received_at(&self) -> u32 {
        self.received_at
    }
    fn kafka_offset(&self) -> u64 {
        self.kafka_offset
    }
}

/// Field order and types match `deploy/clickhouse/0010_conversions.sql`. One row per
/// conversion: `conversion_key` (account/type/event_id) is its identity.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct ConversionRow {
    pub conversion_key: String,
    pub account_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event_id: String,
    pub customer_hash: [u8; 32],
    pub key_id: String,
    pub click_id: String,
    pub amount: u64,
    pub currency: String,
    pub occurred_at_ms: u64,
    pub received_at: u32,
    pub received_at_ms: u64,
    pub api_key_id: String,
    pub kafka_topic: String,
    pub kafka_partition: u16,
    pub kafka_offset: u64,
}

impl Stored for ConversionRow {
    const STREAM: Stream = Stream::Conversions;
    const ID_COLUMN: &'static str = "conversion_key";
    fn from_message(
        payload: &[u8],
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Self, Rejection> {
        if payload.is_empty() {
            return Err(Rejection::Empty);
        }
        let (event, customer_hash) = ConversionEvent::decode(payload)?;
        Ok(Self {
            conversion_key: event.dedup_id(),
            account_id: event.account_id,
            kind: event.kind.as_str().to_owned(),
            event_id: event.event_id,
            customer_hash,
            key_id: event.key_id,
            click_id: event.click_id,
            amount: event.amount,
            currency: event.currency,
            occurred_at_ms: event.occurred_at_ms,
            received_at: u32::try_from(event.received_at_ms / 1000)
                .map_err(|_| Rejection::OutOfRange("received_at"))?,
            received_at_ms: event.received_at_ms,
            api_key_id: event.api_key_id,
            kafka_topic: topic.to_owned(),
            kafka_partition: u16::try_from(partition)
                .map_err(|_| Rejection::OutOfRange("partition"))?,
            kafka_offset: u64::try_from(offset).map_err(|_| Rejection::OutOfRange("offset"))?,
        })
    }
    fn id(&self) -> &str {
        &self.conversion_key
    }
    fn received_at_ms(&self) -> u64 {
        self.received_at_ms
    }
    fn received_at(&self) -> u32 {
        self.received_at
    }
    fn kafka_offset(&self) -> u64 {
        self.kafka_offset
    }
    fn seed(&self) -> Option<crate::attribution::Seed> {
        Some(crate::attribution::Seed {
            account_id: self.account_id.clone(),
            customer_hash: self.customer_hash,
            occurred_at_ms: self.occurred_at_ms,
        })
    }
}

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
