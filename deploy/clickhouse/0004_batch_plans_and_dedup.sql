-- Exactly-once at the server (consumer/src/pipeline.rs has the reasoning):
-- * Every insert of the consumer is one partition's batch plan, sent with an
--   insert_deduplication_token made from the plan. A repeated insert of the same plan, by
--   whichever member and whenever, is dropped by the table's deduplication window, and
--   (deduplicate_blocks_in_dependent_materialized_views) by every view's target table, so a
--   view that failed once gets its rows on the retry while the others do not count twice.
-- * {{clicks_table}}_plans records each plan before its rows are inserted. At each start
--   offset of a partition, the plan committed first (lowest _block_number) wins and every
--   member follows it, so a slow, stalled or replaced member and its successor cut the
--   same batches. Old plans expire after 7 days.
-- On replicated tables the window is replicated_deduplication_window (server default);
-- see deploy/README.md "Clustered ClickHouse" for what an operator must set there.
CREATE TABLE IF NOT EXISTS {{clicks_table}}_plans
(
    topic       LowCardinality(String),
    partition   UInt16,
    lo          UInt64,
    hi          UInt64,
    digest      String,
    head        String,
    member      String,
    planned_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY (topic, partition, lo)
TTL toDateTime(planned_at) + INTERVAL 7 DAY
SETTINGS enable_block_number_column = 1;

ALTER TABLE {{clicks_table}} MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE code_clicks_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE clicks_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE clicks_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE utm_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE clicks_by_path_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE totals_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE ip_code_hourly MODIFY SETTING non_replicated_deduplication_window = 10000;
ALTER TABLE credits_daily MODIFY SETTING non_replicated_deduplication_window = 10000;
