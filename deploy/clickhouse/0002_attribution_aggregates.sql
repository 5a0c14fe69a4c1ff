-- Aggregates for dashboards, filled by materialized views as rows are inserted, so each
-- dashboard query reads a small table shaped for it. The consumer writes each click once,
-- so every aggregate counts each click once.
--
-- Unique visitors are uniqHLL12 states of the (ip_hash, ua_hash) pair: a fixed 2.5 KB
-- state that merges fast, exact up to 16 visitors and about 1.6% off beyond (exact `uniq`
-- states made 30-day panels take seconds at 100 M clicks on 2 cores). Exact numbers for one
-- code come from the raw table: uniqExact(ip_hash, ua_hash) WHERE code = '…'.

-- Clicks per code and day, no visitor state: ranks codes cheaply (top-N subqueries).
CREATE TABLE IF NOT EXISTS code_clicks_daily
(
    day    Date,
    code   String,
    is_bot UInt8,
    clicks UInt64
)
ENGINE = SummingMergeTree(clicks)
PARTITION BY toYYYYMM(day)
ORDER BY (day, code, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS code_clicks_daily_mv TO code_clicks_daily AS
SELECT toDate(received_at) AS day, code, is_bot, count() AS clicks
FROM {{clicks_table}}
GROUP BY day, code, is_bot;

-- Per code × day × utm source/medium/campaign × bot flag; ordered by code.
CREATE TABLE IF NOT EXISTS clicks_daily
(
    code         String,
    day          Date,
    utm_source   LowCardinality(String),
    utm_medium   LowCardinality(String),
    utm_campaign LowCardinality(String),
    is_bot       UInt8,
    clicks       AggregateFunction(count),
    visitors     AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (code, day, utm_source, utm_medium, utm_campaign, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_daily_mv TO clicks_daily AS
SELECT
    code, toDate(received_at) AS day, utm_source, utm_medium, utm_campaign, is_bot,
    countState() AS clicks,
    uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY code, day, utm_source, utm_medium, utm_campaign, is_bot;

-- Per code × hour × bot flag: time series; ordered by code.
CREATE TABLE IF NOT EXISTS clicks_hourly
(
    code     String,
    hour     DateTime('UTC'),
    is_bot   UInt8,
    clicks   AggregateFunction(count),
    visitors AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (code, hour, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_hourly_mv TO clicks_hourly AS
SELECT
    code, toStartOfHour(received_at) AS hour, is_bot,
    countState() AS clicks,
    uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY code, hour, is_bot;

-- Per day × utm triple × bot flag (all codes).
CREATE TABLE IF NOT EXISTS utm_daily
(
    day          Date,
    utm_source   LowCardinality(String),
    utm_medium   LowCardinality(String),
    utm_campaign LowCardinality(String),
    is_bot       UInt8,
    clicks       AggregateFunction(count),
    visitors     AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, utm_source, utm_medium, utm_campaign, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS utm_daily_mv TO utm_daily AS
SELECT
    toDate(received_at) AS day, utm_source, utm_medium, utm_campaign, is_bot,
    countState() AS clicks,
    uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY day, utm_source, utm_medium, utm_campaign, is_bot;

-- Per day × landing path × bot flag.
CREATE TABLE IF NOT EXISTS clicks_by_path_daily
(
    day          Date,
    landing_path String,
    is_bot       UInt8,
    clicks       AggregateFunction(count),
    visitors     AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, landing_path, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_by_path_daily_mv TO clicks_by_path_daily AS
SELECT
    toDate(received_at) AS day, landing_path, is_bot,
    countState() AS clicks,
    uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY day, landing_path, is_bot;

-- Per day × bot flag: totals and bot share.
CREATE TABLE IF NOT EXISTS totals_daily
(
    day      Date,
    is_bot   UInt8,
    clicks   AggregateFunction(count),
    visitors AggregateFunction(uniqHLL12, FixedString(32), FixedString(32))
)
ENGINE = AggregatingMergeTree
ORDER BY (day, is_bot);

CREATE MATERIALIZED VIEW IF NOT EXISTS totals_daily_mv TO totals_daily AS
SELECT
    toDate(received_at) AS day, is_bot,
    countState() AS clicks,
    uniqHLL12State(ip_hash, ua_hash) AS visitors
FROM {{clicks_table}}
GROUP BY day, is_bot;

-- Per hour × code × ip_hash: the suspected-abuse question (one address clicking one code
-- many times an hour). Its cardinality is about that of the clicks, so its panel looks at
-- the last 24 hours.
CREATE TABLE IF NOT EXISTS ip_code_hourly
(
    hour    DateTime('UTC'),
    code    String,
    ip_hash FixedString(32),
    clicks  UInt64
)
ENGINE = SummingMergeTree(clicks)
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, code, ip_hash);

CREATE MATERIALIZED VIEW IF NOT EXISTS ip_code_hourly_mv TO ip_code_hourly AS
SELECT toStartOfHour(received_at) AS hour, code, ip_hash, count() AS clicks
FROM {{clicks_table}}
GROUP BY hour, code, ip_hash;

-- Metering: one accepted click = one credit (4xx/5xx never reach Kafka).
CREATE TABLE IF NOT EXISTS credits_daily
(
    day     Date,
    credits UInt64
)
ENGINE = SummingMergeTree(credits)
ORDER BY day;

CREATE MATERIALIZED VIEW IF NOT EXISTS credits_daily_mv TO credits_daily AS
SELECT toDate(received_at) AS day, count() AS credits
FROM {{clicks_table}}
GROUP BY day;
