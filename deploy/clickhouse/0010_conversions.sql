-- Conversions (consumer/README.md, "Conversions and attribution").
-- * conversions: one row per conversion, written only by the consumer with the clicks'
--   design (plans, deduplication tokens, dead letters), plus one more check: before a plan
--   is inserted, the consumer looks its conversion keys up here (ordered by the key: a
--   primary-key lookup) and leaves out every row whose key is stored at another offset.
--   So a repeat of an event_id, however late, is never stored: every count and every
--   amount below, and every view fed from this table, counts each conversion once.
-- * conversion_clicks: the clicks conversions name, copied by the consumer from whichever
--   side is stored last (writer.rs, `link_clicks`), so attribution joins two small tables
--   instead of looking click ids up among all clicks.
-- * conversion_attribution: attribution by the three rules, computed by the consumer in
--   ClickHouse from what is stored, for the customers each change touches (below), so the
--   answer does not depend on the order clicks and conversions arrived in; the panels
--   read it through the view conversions_attributed.
CREATE TABLE IF NOT EXISTS conversions
(
    conversion_key  String,
    account_id      LowCardinality(String),
    type            LowCardinality(String),
    event_id        String,
    customer_hash   FixedString(32),
    key_id          LowCardinality(String),
    click_id        String,
    amount          UInt64,
    currency        LowCardinality(String),
    occurred_at_ms  UInt64,
    received_at     DateTime('UTC'),
    received_at_ms  UInt64,
    api_key_id      LowCardinality(String),
    kafka_topic     LowCardinality(String),
    kafka_partition UInt16,
    kafka_offset    UInt64,
    inserted_at     DateTime('UTC') DEFAULT now(),
    occurred_at     DateTime64(3, 'UTC') MATERIALIZED fromUnixTimestamp64Milli(toInt64(occurred_at_ms), 'UTC'),
    INDEX click_id_bloom click_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
ORDER BY conversion_key
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS conversions_plans AS {{clicks_table}}_plans;

CREATE TABLE IF NOT EXISTS conversion_clicks
(
    click_id       String,
    account_id     LowCardinality(String),
    code           String,
    landing_path   String,
    utm_source     LowCardinality(String),
    utm_medium     LowCardinality(String),
    utm_campaign   LowCardinality(String),
    clicked_at_ms  UInt64
)
ENGINE = ReplacingMergeTree
ORDER BY (click_id, clicked_at_ms);

-- The conversions side looks clicks up by id among all of them.
ALTER TABLE {{clicks_table}} ADD INDEX IF NOT EXISTS click_id_bloom click_id TYPE bloom_filter(0.001) GRANULARITY 1;
ALTER TABLE {{clicks_table}} MATERIALIZE INDEX click_id_bloom;

ALTER TABLE accounts ADD COLUMN IF NOT EXISTS attribution_window_days UInt16 DEFAULT 90;

-- Credits: one per stored conversion (each once), per account and UTC day of receipt.
CREATE TABLE IF NOT EXISTS account_conversion_credits_daily
(
    account_id  String,
    day         Date,
    credits     UInt64
)
ENGINE = SummingMergeTree(credits)
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS account_conversion_credits_daily_mv TO account_conversion_credits_daily AS
SELECT account_id, toDate(received_at) AS day, count() AS credits
FROM conversions
GROUP BY account_id, day;

-- Click and conversion credits side by side, per account and day, and per month.
CREATE VIEW IF NOT EXISTS account_all_credits_daily AS
SELECT account_id, day, sum(clicks) AS click_credits, sum(conversions) AS conversion_credits,
       click_credits + conversion_credits AS credits
FROM
(
    SELECT account_id, day, credits AS clicks, toUInt64(0) AS conversions FROM account_credits_daily
    UNION ALL
    SELECT account_id, day, toUInt64(0), credits FROM account_conversion_credits_daily
)
GROUP BY account_id, day;

-- The bill now counts both: credits = click credits + conversion credits.
CREATE OR REPLACE VIEW account_billing_monthly AS
SELECT
    m.account_id AS account_id,
    m.month AS month,
    m.credits AS credits,
    m.click_credits AS click_credits,
    m.conversion_credits AS conversion_credits,
    a.plan AS plan,
    a.overage AS overage_on,
    p.price_usd_month AS price_usd,
    p.included_credits_month AS included_credits,
    least(m.credits, p.included_credits_month) AS included_used,
    m.credits - least(m.credits, p.included_credits_month) AS overage_credits,
    round(if(a.overage = 1, overage_credits * ifNull(p.overage_usd_per_1000, 0) / 1000, 0), 2) AS overage_usd
FROM
(
    SELECT account_id, toStartOfMonth(day) AS month, sum(click_credits) AS click_credits,
           sum(conversion_credits) AS conversion_credits, sum(credits) AS credits
    FROM account_all_credits_daily
    GROUP BY account_id, month
) AS m
INNER JOIN (SELECT account_id, plan, overage FROM accounts FINAL) AS a ON a.account_id = m.account_id
LEFT JOIN (SELECT * FROM plans FINAL) AS p ON p.plan = a.plan;

-- Attribution (the three rules), computed by the consumer (consumer/src/attribution.rs)
-- for the customers a change touches, and kept here, one row per conversion (the newest
-- computation wins: `computed_at` is the server's time when it began, so a computation
-- that saw more always wins over one that saw less):
-- 1. the conversion's own click_id, a click of the same account, clicked at or before the
--    conversion and within the account's window: attribution = 'click'. Ingest instances'
--    clocks may differ by minutes: a click stamped up to 5 minutes after the conversion
--    still counts as before it;
-- 2. otherwise the customer's earliest earlier conversion attributed by rule 1 whose
--    click is within the window of this conversion: attribution = 'customer';
-- 3. otherwise 'none'.
-- Of two clicks with one id (a client may reuse an id long after), the first counts.
CREATE TABLE IF NOT EXISTS conversion_attribution
(
    conversion_key      String,
    account_id          LowCardinality(String),
    type                LowCardinality(String),
    event_id            String,
    customer_hash       FixedString(32),
    amount              UInt64,
    currency            LowCardinality(String),
    occurred_at         DateTime64(3, 'UTC'),
    received_at         DateTime('UTC'),
    named_click_id      String,
    attribution         LowCardinality(String),
    click_id            String,
    code                String,
    landing_path        String,
    utm_source          LowCardinality(String),
    utm_medium          LowCardinality(String),
    utm_campaign        LowCardinality(String),
    clicked_at          Nullable(DateTime64(3, 'UTC')),
    seconds_to_convert  Nullable(Float64),
    computed_at         DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
ORDER BY conversion_key;

-- What the panels read: each conversion once, as last computed.
CREATE VIEW IF NOT EXISTS conversions_attributed AS
SELECT * EXCEPT (computed_at) FROM conversion_attribution FINAL;
