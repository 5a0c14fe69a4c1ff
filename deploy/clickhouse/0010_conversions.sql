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
-- * conversions_attributed: attribution by the three rules, computed at query time from
--   what is stored, so the answer does not depend on the order clicks and conversions
--   arrived in, and a window change applies at once.
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

-- Attribution (the three rules):
-- 1. the conversion's own click_id, a click of the same account, clicked at or before the
--    conversion and within the account's window: attribution = 'click';
-- 2. otherwise the customer's earliest earlier conversion attributed by rule 1 whose
--    click is within the window of this conversion: attribution = 'customer';
-- 3. otherwise 'none'.
-- Of two clicks with one id (a client may reuse an id long after), the first counts.
CREATE VIEW IF NOT EXISTS conversions_attributed AS
WITH
    linked AS
    (
        SELECT click_id,
               argMin(account_id, clicked_at_ms) AS click_account,
               argMin(code, clicked_at_ms) AS click_code,
               argMin(landing_path, clicked_at_ms) AS click_landing_path,
               argMin(utm_source, clicked_at_ms) AS click_utm_source,
               argMin(utm_medium, clicked_at_ms) AS click_utm_medium,
               argMin(utm_campaign, clicked_at_ms) AS click_utm_campaign,
               min(clicked_at_ms) AS click_at_ms
        FROM conversion_clicks
        GROUP BY click_id
    ),
    direct AS
    (
        SELECT c.account_id AS account_id, c.type AS type, c.event_id AS event_id,
               c.customer_hash AS customer_hash, c.click_id AS named_click_id,
               c.amount AS amount, c.currency AS currency,
               c.occurred_at_ms AS occurred_at_ms, c.received_at AS received_at,
               toUInt64(if(w.account_id = '', 90, w.attribution_window_days)) * 86400000 AS window_ms,
               k.click_id != '' AND k.click_account = c.account_id
                   AND k.click_at_ms <= c.occurred_at_ms
                   AND c.occurred_at_ms - k.click_at_ms <= window_ms AS own,
               k.click_id AS k_click_id, k.click_code AS k_code,
               k.click_landing_path AS k_landing_path, k.click_utm_source AS k_utm_source,
               k.click_utm_medium AS k_utm_medium, k.click_utm_campaign AS k_utm_campaign,
               k.click_at_ms AS k_click_at_ms
        FROM conversions AS c
        LEFT JOIN linked AS k ON k.click_id = c.click_id
        LEFT JOIN
        (
            SELECT account_id, attribution_window_days FROM accounts FINAL WHERE is_deleted = 0
        ) AS w ON w.account_id = c.account_id
    ),
    customers AS
    (
        SELECT account_id, customer_hash,
               arraySort(x -> (x.1, x.2),
                   groupArray((occurred_at_ms, type = 'sale', k_click_id, k_click_at_ms, k_code,
                               k_landing_path, k_utm_source, k_utm_medium, k_utm_campaign))) AS attributed
        FROM direct
        WHERE own
        GROUP BY account_id, customer_hash
    )
SELECT
    d.account_id AS account_id,
    d.type AS type,
    d.event_id AS event_id,
    d.customer_hash AS customer_hash,
    d.amount AS amount,
    d.currency AS currency,
    fromUnixTimestamp64Milli(toInt64(d.occurred_at_ms), 'UTC') AS occurred_at,
    d.received_at AS received_at,
    d.named_click_id AS named_click_id,
    arrayFirst(x -> ((x.1 < d.occurred_at_ms) OR (x.1 = d.occurred_at_ms AND x.2 < (d.type = 'sale')))
                    AND d.occurred_at_ms - x.4 <= d.window_ms,
               c.attributed) AS earlier,
    multiIf(d.own, 'click', earlier.3 != '', 'customer', 'none') AS attribution,
    if(d.own, d.k_click_id, earlier.3) AS click_id,
    if(d.own, d.k_code, earlier.5) AS code,
    if(d.own, d.k_landing_path, earlier.6) AS landing_path,
    if(d.own, d.k_utm_source, earlier.7) AS utm_source,
    if(d.own, d.k_utm_medium, earlier.8) AS utm_medium,
    if(d.own, d.k_utm_campaign, earlier.9) AS utm_campaign,
    if(attribution = 'none', NULL, fromUnixTimestamp64Milli(toInt64(if(d.own, d.k_click_at_ms, earlier.4)), 'UTC')) AS clicked_at,
    if(attribution = 'none', NULL, (d.occurred_at_ms - if(d.own, d.k_click_at_ms, earlier.4)) / 1000) AS seconds_to_convert
FROM direct AS d
LEFT JOIN customers AS c ON c.account_id = d.account_id AND c.customer_hash = d.customer_hash;
