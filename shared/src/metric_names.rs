//! Metric names, in one place so dashboards, alerts and code agree. Prometheus conventions:
//! `snake_case`, unit suffixes, counters end in `_total`, low-cardinality labels only.

// ingest
pub const HTTP_REQUESTS_TOTAL: &str = "ingest_http_requests_total"; // labels: route, status
pub const HTTP_REQUEST_DURATION: &str = "ingest_http_request_duration_seconds"; // labels: route
pub const OPEN_CONNECTIONS: &str = "ingest_open_connections";
/// Connections closed at once because their client address held its share already.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "ingest_connections_refused_total";
pub const CLICKS_ACCEPTED_TOTAL: &str = "ingest_clicks_accepted_total";
pub const CLICKS_REJECTED_TOTAL: &str = "ingest_clicks_rejected_total"; // labels: reason
pub const CONVERSIONS_ACCEPTED_TOTAL: &str = "ingest_conversions_accepted_total"; // labels: type
pub const CONVERSIONS_REJECTED_TOTAL: &str = "ingest_conversions_rejected_total"; // labels: reason
pub const PRODUCE_DURATION: &str = "ingest_produce_duration_seconds";
pub const PRODUCE_ERRORS_TOTAL: &str = "ingest_produce_errors_total"; // labels: cause
pub const PRODUCER_QUEUE_MESSAGES: &str = "ingest_producer_queue_messages";
pub const RATE_LIMITED_TOTAL: &str = "ingest_rate_limited_total";
/// Clients the per-IP limiter could not track on their own (table full): they share
/// overflow buckets.
pub const RATE_LIMIT_UNTRACKED_TOTAL: &str = "ingest_rate_limit_untracked_total"; // labels: table
/// Keys the per-IP limiter tracks (addresses, networks).
pub const RATE_LIMIT_TRACKED_KEYS: &str = "ingest_rate_limit_tracked_keys"; // labels: table
/// 1 while ingest counts the broker as reachable (probe, or fresh acknowledgements).
pub const BROKER_UP: &str = "ingest_broker_up";
/// 1 when the last metadata probe succeeded.
pub const BROKER_PROBE_OK: &str = "ingest_broker_probe_ok";
/// Registry messages applied or skipped (malformed), by topic kind and result.
pub const REGISTRY_MESSAGES_TOTAL: &str = "ingest_registry_messages_total"; // labels: kind, result
pub const REGISTRY_CODES: &str = "ingest_registry_codes";
/// 1 once both registry topics were read to their end at start.
pub const REGISTRY_READY: &str = "ingest_registry_ready";
/// Plan-limit refusals, by limit (per account counts go to ClickHouse, not here).
pub const PLAN_LIMITED_TOTAL: &str = "ingest_plan_limited_total"; // labels: limit
/// 1 while the shared limit counters in Redis answer; 0: each instance enforces its share.
pub const LIMITS_REDIS_UP: &str = "ingest_limits_redis_up";
/// Plan-limit decisions made without Redis, by cause: `redis_degraded` (the instance is in a
/// fallback: Redis failed, timed out or is slow) or `wait_budget` (one click's lease was late).
pub const LIMITS_LOCAL_DECISIONS_TOTAL: &str = "ingest_limits_local_decisions_total";
/// Token lease calls to Redis (one script run each), by result and by origin (`click_waits`,
/// `click_ahead`, `sweep_ahead`, `sweep_owed`: who asked, and why).
pub const LIMITS_LEASES_TOTAL: &str = "ingest_limits_leases_total"; // labels: result, origin
/// Pipelines the lease calls went to Redis in (a round trip each).
pub const LIMITS_LEASE_PIPELINES_TOTAL: &str = "ingest_limits_lease_pipelines_total";
/// How long clicks that found no token waited for a lease call, by why the lease in hand had
/// none (`first`: the account's first on this instance, `spent`, `expired`).
pub const LIMITS_LEASE_WAIT: &str = "ingest_limits_lease_wait_seconds"; // labels: reason
/// Ingest instances sharing the limits, as last seen in Redis.
pub const LIMITS_INSTANCES: &str = "ingest_limits_instances";

// consumer
pub const CONSUMED_TOTAL: &str = "consumer_messages_consumed_total";
pub const INSERTED_ROWS_TOTAL: &str = "consumer_rows_inserted_total";
pub const DUPLICATES_SKIPPED_TOTAL: &str = "consumer_duplicates_skipped_total"; // labels: stream, cause
pub const DLQ_TOTAL: &str = "consumer_dead_letters_total"; // labels: reason
pub const BATCH_ROWS: &str = "consumer_batch_rows";
pub const INSERT_DURATION: &str = "consumer_insert_duration_seconds";
pub const INSERT_ERRORS_TOTAL: &str = "consumer_insert_errors_total";
pub const PARTITION_LAG: &str = "consumer_partition_lag_messages"; // labels: partition
pub const OLDEST_UNFLUSHED_AGE: &str = "consumer_oldest_unflushed_age_seconds";
pub const BUFFERED_ROWS: &str = "consumer_buffered_rows";
/// Times fetching paused because `CONSUMER_MAX_BUFFERED_ROWS` were in hand.
/// Rows in hand dropped unwritten because their partition was no longer ours (another
/// member writes them), by when it was found: at a revoke, or right before writing.
pub const ROWS_DROPPED_UNWRITTEN_TOTAL: &str = "consumer_rows_dropped_unwritten_total"; // labels: when
pub const FETCH_PAUSES_TOTAL: &str = "consumer_fetch_pauses_total";
pub const CLICKHOUSE_UP: &str = "consumer_clickhouse_up";
/// Plans recorded by another member that this one inserted again (a no-op at the server).
pub const PLANS_REPLAYED_TOTAL: &str = "consumer_plans_replayed_total";
/// Flushes in which a partition waited because an earlier plan reaches past its messages.
pub const PLAN_WAITS_TOTAL: &str = "consumer_plan_waits_total";
/// Flushes in which a partition's plan waited because its group may still be inserted
/// whole by the member holding the group's other plans.
pub const PLAN_GROUP_WAITS_TOTAL: &str = "consumer_plan_group_waits_total";
/// Registry and refusal messages mirrored into ClickHouse or skipped, by kind and result.
pub const REGISTRY_MIRRORED_TOTAL: &str = "consumer_registry_messages_total"; // labels: kind, result
/// Conversions stored between a day and a minute ago without an attribution row.
pub const CONVERSIONS_UNATTRIBUTED: &str = "consumer_conversions_unattributed";

/// Describes the ingest metrics and creates every counter at zero (with its known label
/// values), so dashboards and alerts see a 0 instead of "no data" on a healthy pipeline.
pub fn register_ingest() {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP responses by route and status");
    describe_gauge!(
        OPEN_CONNECTIONS,
        "Client connections open (at most INGEST_MAX_CONNECTIONS)"
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at accept: the client address held INGEST_MAX_CONNECTIONS_PER_CLIENT"
    );
    counter!(CONNECTIONS_REFUSED_TOTAL).increment(0);
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration by route"
    );
    describe_counter!(
        CLICKS_ACCEPTED_TOTAL,
        "Clicks acknowledged by the broker and answered 200"
    );
    describe_counter!(CLICKS_REJECTED_TOTAL, "Click requests refused, by reason");
    describe_counter!(
        CONVERSIONS_ACCEPTED_TOTAL,
        "Conversions acknowledged by the broker and answered 200, by type"
    );
    describe_counter!(
        CONVERSIONS_REJECTED_TOTAL,
        "Conversion requests refused, by reason (unauthorized: a bad, revoked or suspended key)"
    );
    describe_histogram!(
        PRODUCE_DURATION,
        Unit::Seconds,
        "Time from produce to the broker's acknowledgement"
    );
    describe_counter!(PRODUCE_ERRORS_TOTAL, "Clicks not published, by cause");
    describe_gauge!(
        PRODUCER_QUEUE_MESSAGES,
        "Messages in the producer queue awaiting acknowledgement"
    );
    describe_counter!(
        RATE_LIMITED_TOTAL,
        "Requests refused by the per-IP rate limit"
    );
    describe_gauge!(
        BROKER_UP,
        "1 while the broker counts as reachable: the metadata probe succeeds, or deliveries were acknowledged in the last 10 s without a failure since"
    );
    describe_gauge!(BROKER_PROBE_OK, "1 when the last metadata probe succeeded");
    describe_counter!(
        REGISTRY_MESSAGES_TOTAL,
        "Registry messages applied or skipped as malformed, by kind and result"
    );
    describe_gauge!(REGISTRY_CODES, "Referral codes held in memory");
    describe_gauge!(
        REGISTRY_READY,
        "1 once the registry topics were read to their end"
    );
    describe_counter!(
        PLAN_LIMITED_TOTAL,
        "Clicks refused by a plan limit, by limit"
    );
    describe_gauge!(
        LIMITS_REDIS_UP,
        "1 while Redis answers; 0: limits are enforced per instance (its share)"
    );
    describe_counter!(
        LIMITS_LOCAL_DECISIONS_TOTAL,
        "Plan-limit decisions made without Redis (down or slow)"
    );
    describe_counter!(
        LIMITS_LEASES_TOTAL,
        "Token lease calls to Redis, by result and origin"
    );
    describe_counter!(
        LIMITS_LEASE_PIPELINES_TOTAL,
        "Round trips to Redis carrying lease calls (several calls each when batched)"
    );
    describe_histogram!(
        LIMITS_LEASE_WAIT,
        Unit::Seconds,
        "Waits of clicks that found no token, until the lease call answered or the budget ran out, by why the lease had none"
    );
    describe_gauge!(LIMITS_INSTANCES, "Ingest instances sharing the limits");
    describe_counter!(
        RATE_LIMIT_UNTRACKED_TOTAL,
        "Requests of clients the per-IP limiter had no room to track (shared overflow buckets)"
    );
    describe_gauge!(
        RATE_LIMIT_TRACKED_KEYS,
        "Keys tracked by the per-IP limiter, per table (addresses, networks)"
    );
    for table in ["addresses", "networks"] {
        counter!(RATE_LIMIT_UNTRACKED_TOTAL, "table" => table).increment(0);
    }
    counter!(CLICKS_ACCEPTED_TOTAL).increment(0);
    counter!(LIMITS_LEASE_PIPELINES_TOTAL).increment(0);
    counter!(RATE_LIMITED_TOTAL).increment(0);
    for cause in ["redis_degraded", "wait_budget"] {
        counter!(LIMITS_LOCAL_DECISIONS_TOTAL, "cause" => cause).increment(0);
    }
    for limit in ["plan_rate", "daily_cap", "monthly_credits"] {
        counter!(PLAN_LIMITED_TOTAL, "limit" => limit).increment(0);
    }
    for kind in ["lead", "sale"] {
        counter!(CONVERSIONS_ACCEPTED_TOTAL, "type" => kind).increment(0);
    }
    for kind in ["account", "code", "key"] {
        for result in ["applied", "skipped"] {
            counter!(REGISTRY_MESSAGES_TOTAL, "kind" => kind, "result" => result).increment(0);
        }
    }
    for reason in [
        "invalid_params",
        "payload_too_large",
        "unsupported_media_type",
        "rate_limited",
        "request_timeout",
        "unavailable",
        "internal",
    ] {
        counter!(CLICKS_REJECTED_TOTAL, "reason" => reason).increment(0);
        counter!(CONVERSIONS_REJECTED_TOTAL, "reason" => reason).increment(0);
    }
    counter!(CONVERSIONS_REJECTED_TOTAL, "reason" => "unauthorized").increment(0);
    for cause in ["queue_full", "timeout", "not_ready", "broker"] {
        counter!(PRODUCE_ERRORS_TOTAL, "cause" => cause).increment(0);
    }
}

/// Describes the consumer metrics and creates every counter at zero.
pub fn register_consumer() {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CONSUMED_TOTAL,
        "Messages read, by stream (clicks, conversions)"
    );
    describe_counter!(INSERTED_ROWS_TOTAL, "Rows ClickHouse accepted, by stream");
    describe_counter!(
        DUPLICATES_SKIPPED_TOTAL,
        "Rows not inserted because they were already stored, repeat a click id, or are a conversion claimed at another position"
    );
    describe_gauge!(
        CONVERSIONS_UNATTRIBUTED,
        "Conversions stored between a day and a minute ago that have no attribution"
    );
    describe_counter!(
        DLQ_TOTAL,
        "Messages sent to the dead-letter topic, by reason"
    );
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per insert");
    describe_histogram!(
        INSERT_DURATION,
        Unit::Seconds,
        "Duration of successful inserts"
    );
    describe_counter!(
        INSERT_ERRORS_TOTAL,
        "Failed flush attempts (the batch is kept and retried)"
    );
    describe_gauge!(
        PARTITION_LAG,
        "Messages behind the partition's high watermark"
    );
    describe_gauge!(
        OLDEST_UNFLUSHED_AGE,
        Unit::Seconds,
        "Age of the oldest message not yet in ClickHouse"
    );
    describe_gauge!(BUFFERED_ROWS, "Rows held in memory awaiting insert");
    describe_counter!(
        ROWS_DROPPED_UNWRITTEN_TOTAL,
        "Rows in hand dropped unwritten because their partition moved to another member"
    );
    describe_counter!(
        FETCH_PAUSES_TOTAL,
        "Times fetching paused because the buffer was full"
    );
    describe_gauge!(
        CLICKHOUSE_UP,
        "1 when ClickHouse answered the last check or insert"
    );
    describe_counter!(
        PLANS_REPLAYED_TOTAL,
        "Plans recorded by another member and inserted again (no-ops at the server)"
    );
    describe_counter!(
        PLAN_WAITS_TOTAL,
        "Flushes in which a partition waited for the messages of an earlier plan"
    );
    describe_counter!(
        PLAN_GROUP_WAITS_TOTAL,
        "Flushes in which a partition's plan waited: its group may still be inserted whole by another member"
    );
    describe_counter!(
        REGISTRY_MIRRORED_TOTAL,
        "Registry and refusal messages written to ClickHouse or skipped as malformed"
    );
    for kind in ["account", "code", "refusal"] {
        for result in ["stored", "skipped"] {
            counter!(REGISTRY_MIRRORED_TOTAL, "kind" => kind, "result" => result).increment(0);
        }
    }
    for stream in ["clicks", "conversions"] {
        counter!(CONSUMED_TOTAL, "stream" => stream).increment(0);
        counter!(INSERTED_ROWS_TOTAL, "stream" => stream).increment(0);
    }
    counter!(FETCH_PAUSES_TOTAL).increment(0);
    metrics::gauge!(CONVERSIONS_UNATTRIBUTED).set(0.0);
    counter!(INSERT_ERRORS_TOTAL).increment(0);
    counter!(PLANS_REPLAYED_TOTAL).increment(0);
    counter!(PLAN_WAITS_TOTAL).increment(0);
    counter!(PLAN_GROUP_WAITS_TOTAL).increment(0);
    for when in ["revoked", "before_write"] {
        counter!(ROWS_DROPPED_UNWRITTEN_TOTAL, "when" => when).increment(0);
    }
    for stream in ["clicks", "conversions"] {
        for cause in ["already_stored", "same_click_id", "claimed_elsewhere"] {
            counter!(DUPLICATES_SKIPPED_TOTAL, "stream" => stream, "cause" => cause).increment(0);
        }
    }
    for reason in ["malformed", "version", "invalid", "empty"] {
        counter!(DLQ_TOTAL, "reason" => reason).increment(0);
    }
}
