-- Referral programs and billing (consumer/README.md, "Billing in ClickHouse").
-- * Every click row carries the account that owned its code when ingest accepted it,
--   so analytics join nothing at query time. Rows of older events have ''.
-- * accounts / codes mirror the compacted registry topics; the latest Kafka message of a
--   key wins (version = its offset: one key lives in one partition), a tombstone is a row
--   with is_deleted = 1. Read them with FINAL.
-- * plans is the catalogue the consumer was started with (deploy/plans/catalogue.json).
-- * account_credits_daily counts credits (accepted, stored clicks: each click once, a
--   client retry of a click id once, 4xx/5xx never) per account and UTC day, filled by a
--   view from the raw table with the same deduplication window as the other aggregates.
-- * account_refusals holds the refused-click counts ingest publishes (one row per message
--   id; a replayed message collapses under FINAL).
ALTER TABLE {{clicks_table}} ADD COLUMN IF NOT EXISTS account_id LowCardinality(String) DEFAULT '';

CREATE TABLE IF NOT EXISTS accounts
(
    account_id  String,
    plan        LowCardinality(String),
    overage     UInt8,
    status      LowCardinality(String),
    updated_at  DateTime64(3, 'UTC'),
    version     UInt64,
    is_deleted  UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY account_id;

CREATE TABLE IF NOT EXISTS codes
(
    code        String,
    account_id  String,
    status      LowCardinality(String),
    updated_at  DateTime64(3, 'UTC'),
    version     UInt64,
    is_deleted  UInt8
)
ENGINE = ReplacingMergeTree(version, is_deleted)
ORDER BY code;

CREATE TABLE IF NOT EXISTS plans
(
    plan                    String,
    price_usd_month         Float64,
    included_credits_month  UInt64,
    daily_cap               Nullable(UInt64),
    rate_limit_per_minute   UInt32,
    overage_usd_per_1000    Nullable(Float64),
    loaded_at               DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY plan;

CREATE TABLE IF NOT EXISTS account_credits_daily
(
    account_id  String,
    day         Date,
    credits     UInt64
)
ENGINE = SummingMergeTree(credits)
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS account_credits_daily_mv TO account_credits_daily AS
SELECT account_id, toDate(received_at) AS day, count() AS credits
FROM {{clicks_table}}
GROUP BY account_id, day;

-- Credits per account and hour: the edges of a dashboard range that starts or ends
-- mid-day, and usage "today so far".
CREATE TABLE IF NOT EXISTS account_credits_hourly
(
    account_id  String,
    hour        DateTime('UTC'),
    credits     UInt64
)
ENGINE = SummingMergeTree(credits)
PARTITION BY toYYYYMM(hour)
ORDER BY (account_id, hour)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS account_credits_hourly_mv TO account_credits_hourly AS
SELECT account_id, toStartOfHour(received_at) AS hour, count() AS credits
FROM {{clicks_table}}
GROUP BY account_id, hour;

CREATE VIEW IF NOT EXISTS account_credits_monthly AS
SELECT account_id, toStartOfMonth(day) AS month, sum(credits) AS credits
FROM account_credits_daily
GROUP BY account_id, month;

-- The bill of a month under the account's current plan and overage switch: credits up to
-- the included ones, the rest as overage, priced at the plan's rate when the account's
-- overage is on (with it off, ingest refuses past the included credits; the few that the
-- limiter's documented overshoot lets through are shown but not priced).
CREATE VIEW IF NOT EXISTS account_billing_monthly AS
SELECT
    m.account_id AS account_id,
    m.month AS month,
    m.credits AS credits,
    a.plan AS plan,
    a.overage AS overage_on,
    p.price_usd_month AS price_usd,
    p.included_credits_month AS included_credits,
    least(m.credits, p.included_credits_month) AS included_used,
    m.credits - least(m.credits, p.included_credits_month) AS overage_credits,
    round(if(a.overage = 1, overage_credits * ifNull(p.overage_usd_per_1000, 0) / 1000, 0), 2) AS overage_usd
FROM account_credits_monthly AS m
INNER JOIN (SELECT account_id, plan, overage FROM accounts FINAL) AS a ON a.account_id = m.account_id
LEFT JOIN (SELECT * FROM plans FINAL) AS p ON p.plan = a.plan;

CREATE TABLE IF NOT EXISTS account_refusals
(
    account_id    String,
    limit_name    LowCardinality(String),
    plan          LowCardinality(String),
    window_start  DateTime('UTC'),
    refusals      UInt64,
    id            String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (account_id, limit_name, window_start, id);
