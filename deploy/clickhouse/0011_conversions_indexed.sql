-- Conversions held to the clicks' guarantees (consumer/README.md, "Conversions and
-- attribution"): every step after a plan is stored reads an index ordered by the key it
-- looks up, so its cost follows the batch, not the data stored.
--
-- * conversion_attribution: one row per conversion, computed by the consumer for the
--   conversions a change can affect (consumer/src/attribution.rs); the newest computation
--   wins (`computed_at` is the server's time when it began). Released databases may have
--   it already.
-- * clicks_by_id: every click of the longest attribution window, ordered by click id
--   (filled by a view): a conversion finds its click in a few small granules.
-- * conversions_by_click: the conversions that name a click, ordered by click id: a
--   click stored after its conversion finds the conversions to attribute anew.
-- * conversions_by_customer: conversions ordered by (account, customer hash, time): rule
--   2 reads a customer's conversions through it.
-- * conversion_claims: where each conversion is stored. Before inserting a plan the
--   consumer records a claim for each of its conversions and reads every claim of those
--   keys back; the first claim in commit order (_block_number, then partition and offset)
--   is the one copy stored, whichever partition, member or day the others come from.
-- * conversions_stored: when each conversion was stored, for two days: the consumer's
--   gauge of conversions stored but not attributed reads the last day through it.
-- The bloom filters on click_id (0010) are dropped: with thousands of ids per lookup
-- nearly every granule passed them, so they cost inserts and saved no reads.
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
CREATE OR REPLACE VIEW conversions_attributed AS
SELECT * EXCEPT (computed_at) FROM conversion_attribution FINAL;

-- Small granules: a lookup of N random ids reads at most N granules of 256 rows,
-- however many clicks are stored; compressed blocks of about a granule, so that each
-- granule read decompresses little more than itself (with the default 64 KiB blocks, a
-- lookup of 3,500 ids took twice as long at 30 M rows). Kept one day past the longest
-- window (400 days).
CREATE TABLE IF NOT EXISTS clicks_by_id
(
    click_id        String,
    account_id      LowCardinality(String),
    code            String,
    landing_path    String,
    utm_source      LowCardinality(String),
    utm_medium      LowCardinality(String),
    utm_campaign    LowCardinality(String),
    clicked_at_ms   UInt64,
    received_at     DateTime('UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY click_id
TTL received_at + INTERVAL 401 DAY
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 16384,
         ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS clicks_by_id_mv TO clicks_by_id AS
SELECT click_id, account_id, code, landing_path, utm_source, utm_medium, utm_campaign,
       received_at_ms AS clicked_at_ms, received_at
FROM {{clicks_table}};

-- The clicks stored before the view existed (a copy twice is harmless: the first click of
-- an id counts).
INSERT INTO clicks_by_id
SELECT click_id, account_id, code, landing_path, utm_source, utm_medium, utm_campaign,
       received_at_ms, received_at
FROM {{clicks_table}}
WHERE received_at >= now() - INTERVAL 401 DAY;

-- With each conversion's customer and time: what attribution starts from.
CREATE TABLE IF NOT EXISTS conversions_by_click
(
    click_id        String,
    conversion_key  String,
    account_id      LowCardinality(String),
    customer_hash   FixedString(32),
    occurred_at_ms  UInt64
)
ENGINE = MergeTree
ORDER BY click_id
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 16384,
         non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS conversions_by_click_mv TO conversions_by_click AS
SELECT click_id, conversion_key, account_id, customer_hash, occurred_at_ms
FROM conversions WHERE click_id != '';

INSERT INTO conversions_by_click
SELECT click_id, conversion_key, account_id, customer_hash, occurred_at_ms
FROM conversions WHERE click_id != '';

CREATE TABLE IF NOT EXISTS conversions_by_customer
(
    account_id      LowCardinality(String),
    customer_hash   FixedString(32),
    occurred_at_ms  UInt64,
    conversion_key  String,
    type            LowCardinality(String),
    event_id        String,
    click_id        String,
    amount          UInt64,
    currency        LowCardinality(String),
    received_at     DateTime('UTC')
)
ENGINE = MergeTree
ORDER BY (account_id, customer_hash, occurred_at_ms, conversion_key)
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 16384,
         non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS conversions_by_customer_mv TO conversions_by_customer AS
SELECT account_id, customer_hash, occurred_at_ms, conversion_key, type, event_id, click_id,
       amount, currency, received_at
FROM conversions;

INSERT INTO conversions_by_customer
SELECT account_id, customer_hash, occurred_at_ms, conversion_key, type, event_id, click_id,
       amount, currency, received_at
FROM conversions;

CREATE TABLE IF NOT EXISTS conversion_claims
(
    conversion_key   String,
    kafka_topic      LowCardinality(String),
    kafka_partition  UInt16,
    kafka_offset     UInt64,
    claimed_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY conversion_key
SETTINGS index_granularity = 256, min_compress_block_size = 4096, max_compress_block_size = 16384,
         enable_block_number_column = 1;

-- The conversions stored so far hold their claims.
INSERT INTO conversion_claims (conversion_key, kafka_topic, kafka_partition, kafka_offset)
SELECT conversion_key, kafka_topic, kafka_partition, kafka_offset FROM conversions;

CREATE TABLE IF NOT EXISTS conversions_stored
(
    stored_at       DateTime('UTC'),
    conversion_key  String
)
ENGINE = MergeTree
PARTITION BY toDate(stored_at)
ORDER BY (stored_at, conversion_key)
TTL stored_at + INTERVAL 2 DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS conversions_stored_mv TO conversions_stored AS
SELECT now() AS stored_at, conversion_key FROM conversions;

ALTER TABLE {{clicks_table}} DROP INDEX IF EXISTS click_id_bloom;
ALTER TABLE conversions DROP INDEX IF EXISTS click_id_bloom;
DROP TABLE IF EXISTS conversion_clicks;
