#!/usr/bin/env python3
"""Writes the provisioned Grafana dashboards (deploy/grafana/dashboards/*.json).

The SQL panels take their text from deploy/clickhouse/queries/*.sql, and the end-to-end
tests check that each SQL panel equals one of those files, so dashboards and the named
queries cannot drift. Run after changing a query or a panel:
    python3 deploy/grafana/build_dashboards.py
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUERIES = ROOT / "deploy" / "clickhouse" / "queries"
OUT = ROOT / "deploy" / "grafana" / "dashboards"

CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}


def sql(name):
    return (QUERIES / f"{name}.sql").read_text().strip()


def grid(i, w=12, h=8):
    per_row = 24 // w
    return {"h": h, "w": w, "x": (i % per_row) * w, "y": (i // per_row) * h}


def sql_panel(i, title, query, kind="table", w=12, time_from=None):
    fmt = 0 if kind == "timeseries" else 1
    extra = {"timeFrom": time_from} if time_from else {}
    return {
        **extra,
        "id": i + 1,
        "title": title,
        "type": kind,
        "datasource": CLICKHOUSE,
        "gridPos": grid(i, w),
        "targets": [
            {
                "refId": "A",
                "datasource": CLICKHOUSE,
                "editorType": "sql",
                "queryType": "table" if fmt == 1 else "timeseries",
                "format": fmt,
                "rawSql": sql(query),
            }
        ],
    }


def prom_panel(i, title, exprs, unit="short"):
    return {
        "id": i + 1,
        "title": title,
        "type": "timeseries",
        "datasource": PROMETHEUS,
        "gridPos": grid(i),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
            for n, (expr, legend) in enumerate(exprs)
        ],
    }


def dashboard(uid, title, panels, time_from):
    return {
        "uid": uid,
        "title": title,
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "timezone": "utc",
        "tags": ["referrals"],
        "panels": panels,
    }


attribution = dashboard(
    "referral-attribution",
    "Referral attribution",
    [
        sql_panel(0, "Totals (human clicks, unique visitors, bot clicks)", "totals", "stat"),
        sql_panel(1, "Credits used per day", "credits_per_day", "timeseries"),
        sql_panel(2, "Clicks and unique visitors per hour, top 10 codes", "clicks_over_time", "timeseries"),
        sql_panel(3, "Top codes", "top_codes"),
        sql_panel(4, "By utm source / medium / campaign", "utm_breakdown"),
        sql_panel(5, "By landing path", "landing_paths"),
        sql_panel(6, "Bot share per day", "bot_share", "timeseries"),
        sql_panel(7, "Suspected abuse, last 24 h (one ip_hash, one code, ≥ 30 clicks an hour)", "suspected_abuse", time_from="24h"),
    ],
    "now-7d",
)

billing = dashboard(
    "plans-billing",
    "Plans and billing",
    [
        sql_panel(0, "Credits per hour, top 10 accounts", "account_credits_over_time", "timeseries"),
        sql_panel(1, "Top accounts (credits, plan, refused clicks)", "top_accounts"),
        sql_panel(2, "Accounts near or over their caps (day and month of the range's end)", "accounts_near_caps"),
        sql_panel(3, "Overage revenue per account and month (USD)", "overage_revenue"),
        sql_panel(4, "Refused clicks by limit", "refusals_by_limit"),
        sql_panel(5, "Credits per account and day: clicks and conversions", "account_credits_by_kind"),
    ],
    "now-24h",
)

conversions = dashboard(
    "conversions",
    "Conversions",
    [
        sql_panel(0, "Funnel: clicks, leads, sales, rates, unattributed share", "conversions_funnel", "stat"),
        sql_panel(1, "Leads and sales per day", "conversions_over_time", "timeseries"),
        sql_panel(2, "Revenue per currency (minor units) and per click", "conversions_revenue"),
        sql_panel(3, "How conversions are attributed, time from click to conversion", "conversions_attribution"),
        sql_panel(4, "By account", "conversions_by_account"),
        sql_panel(5, "By referral code", "conversions_by_code"),
        sql_panel(6, "By utm source / medium / campaign", "conversions_by_utm"),
        sql_panel(7, "By landing path", "conversions_by_landing_path"),
    ],
    "now-30d",
)

health = dashboard(
    "pipeline-health",
    "Pipeline health",
    [
        prom_panel(0, "Ingest requests by status", [
            ('sum by (status) (rate(ingest_http_requests_total{route="click"}[1m]))', "{{status}}"),
        ], "reqps"),
        prom_panel(1, "Ingest 5xx ratio", [
            ('(sum(rate(ingest_http_requests_total{status=~"5.."}[5m])) or vector(0)) / clamp_min(sum(rate(ingest_http_requests_total[5m])), 1e-9)', "5xx ratio"),
        ], "percentunit"),
        prom_panel(2, "Ingest latency (click route)", [
            ('histogram_quantile(0.5, sum by (le) (rate(ingest_http_request_duration_seconds_bucket{route="click"}[1m])))', "p50"),
            ('histogram_quantile(0.99, sum by (le) (rate(ingest_http_request_duration_seconds_bucket{route="click"}[1m])))', "p99"),
            ('histogram_quantile(0.999, sum by (le) (rate(ingest_http_request_duration_seconds_bucket{route="click"}[1m])))', "p99.9"),
        ], "s"),
        prom_panel(3, "Produce latency (broker ack)", [
            ("histogram_quantile(0.5, sum by (le) (rate(ingest_produce_duration_seconds_bucket[1m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(ingest_produce_duration_seconds_bucket[1m])))", "p99"),
        ], "s"),
        prom_panel(4, "Clicks accepted and rejected", [
            ("sum(rate(ingest_clicks_accepted_total[1m]))", "accepted"),
            ("sum by (reason) (rate(ingest_clicks_rejected_total[1m]))", "rejected: {{reason}}"),
            ("sum(rate(ingest_rate_limited_total[1m]))", "rate limited"),
        ], "reqps"),
        prom_panel(5, "Producer queue and broker", [
            ("sum(ingest_producer_queue_messages)", "queued messages"),
            ("min(ingest_broker_up)", "broker up"),
        ]),
        prom_panel(6, "Consumer lag per partition", [
            ("sum by (topic, partition) (consumer_partition_lag_messages)", "{{topic}} {{partition}}"),
        ]),
        prom_panel(7, "Rows inserted and dead letters", [
            ("sum(rate(consumer_rows_inserted_total[1m]))", "rows/s"),
            ("sum(rate(consumer_dead_letters_total[5m]))", "dead letters/s"),
            ("sum(rate(consumer_insert_errors_total[5m]))", "insert errors/s"),
        ]),
        prom_panel(8, "Batch size", [
            ("histogram_quantile(0.5, sum by (le) (rate(consumer_batch_rows_bucket[5m])))", "p50 rows"),
            ("histogram_quantile(0.99, sum by (le) (rate(consumer_batch_rows_bucket[5m])))", "p99 rows"),
        ]),
        prom_panel(9, "Insert latency", [
            ("histogram_quantile(0.5, sum by (le) (rate(consumer_insert_duration_seconds_bucket[5m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(consumer_insert_duration_seconds_bucket[5m])))", "p99"),
        ], "s"),
        prom_panel(10, "Oldest unflushed click and buffer", [
            ("max by (stream) (consumer_oldest_unflushed_age_seconds)", "{{stream}} oldest unflushed (s)"),
            ("sum by (stream) (consumer_buffered_rows)", "{{stream}} buffered rows"),
        ]),
        prom_panel(11, "Targets up", [
            ('up{job=~"ingest|consumer"}', "{{job}} {{instance}}"),
        ]),
        prom_panel(12, "Plan limits: refusals and Redis", [
            ("sum by (limit) (rate(ingest_plan_limited_total[1m]))", "refused: {{limit}}"),
            ("sum(rate(ingest_limits_local_decisions_total[1m]))", "decided without Redis"),
            ("min(ingest_limits_redis_up)", "Redis up (all instances)"),
        ]),
        prom_panel(14, "Conversions accepted and rejected", [
            ("sum by (type) (rate(ingest_conversions_accepted_total[1m]))", "accepted: {{type}}"),
            ("sum by (reason) (rate(ingest_conversions_rejected_total[1m]))", "rejected: {{reason}}"),
        ], "reqps"),
        prom_panel(13, "Referral registry", [
            ("max(ingest_registry_codes)", "codes held"),
            ("sum by (result) (rate(ingest_registry_messages_total[5m]))", "messages {{result}}"),
        ]),
    ],
    "now-1h",
)

OUT.mkdir(parents=True, exist_ok=True)
for board in (attribution, billing, conversions, health):
    (OUT / f"{board['uid']}.json").write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {board['uid']}.json")
