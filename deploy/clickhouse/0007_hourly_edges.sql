-- Dashboards cover exactly their time range, to the UTC hour: whole days in the middle come
-- from the daily tables, the partial days at both ends from these hourly ones (a 6-hour
-- range reads at most 7 hours, not two days). Same shapes as their daily twins.
--
-- Each view is created first; then the rows inserted before it existed (inserted_at before
-- the view's creation second) are copied in once. Rows inserted during that very second,
-- before the view, are the only ones that can be missing (migrations run when a consumer
-- starts, before it inserts).
CREATE TABLE IF NOT EXISTS totals_hourly
(
    hour     DateTime('UTC'),
    is_bot   UInt8,
    clicks   AggregateFunction(count),
    visitors AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, is_bot)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS totals_hourly_mv TO totals_hourly AS
SELECT toStartOfHour(received_at) AS hour, is_bot, countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY hour, is_bot;

INSERT INTO totals_hourly
SELECT toStartOfHour(received_at) AS hour, is_bot, countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
WHERE inserted_at < (SELECT min(metadata_modification_time) FROM system.tables WHERE database = currentDatabase() AND name = 'totals_hourly_mv')
GROUP BY hour, is_bot;

CREATE TABLE IF NOT EXISTS utm_hourly
(
    hour         DateTime('UTC'),
    utm_source   LowCardinality(String),
    utm_medium   LowCardinality(String),
    utm_campaign LowCardinality(String),
    is_bot       UInt8,
    clicks       AggregateFunction(count),
    visitors     AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, utm_source, utm_medium, utm_campaign, is_bot)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS utm_hourly_mv TO utm_hourly AS
SELECT toStartOfHour(received_at) AS hour, utm_source, utm_medium, utm_campaign, is_bot,
    countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY hour, utm_source, utm_medium, utm_campaign, is_bot;

INSERT INTO utm_hourly
SELECT toStartOfHour(received_at) AS hour, utm_source, utm_medium, utm_campaign, is_bot,
    countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
WHERE inserted_at < (SELECT min(metadata_modification_time) FROM system.tables WHERE database = currentDatabase() AND name = 'utm_hourly_mv')
GROUP BY hour, utm_source, utm_medium, utm_campaign, is_bot;

CREATE TABLE IF NOT EXISTS clicks_by_path_hourly
(
    hour         DateTime('UTC'),
    landing_path String,
    is_bot       UInt8,
    clicks       AggregateFunction(count),
    visitors     AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, landing_path, is_bot)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_by_path_hourly_mv TO clicks_by_path_hourly AS
SELECT toStartOfHour(received_at) AS hour, landing_path, is_bot,
    countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY hour, landing_path, is_bot;

INSERT INTO clicks_by_path_hourly
SELECT toStartOfHour(received_at) AS hour, landing_path, is_bot,
    countState() AS clicks, uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
WHERE inserted_at < (SELECT min(metadata_modification_time) FROM system.tables WHERE database = currentDatabase() AND name = 'clicks_by_path_hourly_mv')
GROUP BY hour, landing_path, is_bot;
