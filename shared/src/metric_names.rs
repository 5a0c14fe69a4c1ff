//! Metric names, in one place so dashboards, alerts and code agree. Prometheus conventions:
//! `snake_case`, unit suffixes, counters end in `_total`, low-cardinality labels only.

// ingest
pub const HTTP_REQUESTS_TOTAL: &str = "ingest_http_requests_total"; // labels: route, status
pub const HTTP_REQUEST_DURATION: &str = "ingest_http_request_duration_seconds"; // labels: route
pub const CLICKS_ACCEPTED_TOTAL: &str = "ingest_clicks_accepted_total";
pub const CLICKS_REJECTED_TOTAL: &str = "ingest_clicks_rejected_total"; // labels: reason
pub const PRODUCE_DURATION: &str = "ingest_produce_duration_seconds";
pub const PRODUCE_ERRORS_TOTAL: &str = "ingest_produce_errors_total"; // labels: cause
pub const PRODUCER_QUEUE_MESSAGES: &str = "ingest_producer_queue_messages";
pub const RATE_LIMITED_TOTAL: &str = "ingest_rate_limited_total";
pub const BROKER_UP: &str = "ingest_broker_up";

// consumer
pub const CONSUMED_TOTAL: &str = "consumer_messages_consumed_total";
pub const INSERTED_ROWS_TOTAL: &str = "consumer_rows_inserted_total";
pub const DUPLICATES_SKIPPED_TOTAL: &str = "consumer_duplicates_skipped_total"; // labels: cause
pub const DLQ_TOTAL: &str = "consumer_dead_letters_total"; // labels: reason
pub const BATCH_ROWS: &str = "consumer_batch_rows";
pub const INSERT_DURATION: &str = "consumer_insert_duration_seconds";
pub const INSERT_ERRORS_TOTAL: &str = "consumer_insert_errors_total";
pub const PARTITION_LAG: &str = "consumer_partition_lag_messages"; // labels: partition
pub const OLDEST_UNFLUSHED_AGE: &str = "consumer_oldest_unflushed_age_seconds";
pub const BUFFERED_ROWS: &str = "consumer_buffered_rows";
pub const CLICKHOUSE_UP: &str = "consumer_clickhouse_up";
