-- The raw clicks: one row per accepted click, written only by the consumer.
-- Ordered for per-code time-range queries, partitioned by month. kafka_* say where the
-- row came from: the consumer's exactly-once check reads them after a failure or a
-- rebalance.
CREATE TABLE IF NOT EXISTS {{clicks_table}}
(
    click_id        String,
    code            String,
    landing_path    String,
    utm_source      LowCardinality(String),
    utm_medium      LowCardinality(String),
    utm_campaign    LowCardinality(String),
    ip_hash         FixedString(32),
    ua_hash         FixedString(32),
    key_id          LowCardinality(String),
    is_bot          UInt8,
    received_at     DateTime('UTC'),
    received_at_ms  UInt64,
    kafka_topic     LowCardinality(String),
    kafka_partition UInt16,
    kafka_offset    UInt64,
    inserted_at     DateTime('UTC') DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (code, received_at);
