//! The library both binaries share: the click model with its validation and sanitizing
//! rules, keyed hashing, the versioned Kafka event, bot classification, metric names and
//! telemetry set-up. Everything here is pure or local, and unit-tested beside the code.

pub mod bot;
pub mod cli;
pub mod click;
pub mod conversion;
pub mod event;
pub mod hashing;
pub mod kafka_properties;
pub mod keys;
pub mod metric_names;
pub mod plans;
pub mod registry;
pub mod telemetry;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, as_ms)
}

/// A duration in whole milliseconds, for arithmetic with [`now_ms`] stamps (saturating).
pub fn as_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
