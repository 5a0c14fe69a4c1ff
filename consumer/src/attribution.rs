//! Attribution: which click each conversion is credited to, kept in ClickHouse's
//! `conversion_attribution` (`deploy/clickhouse/0010_conversions.sql` has the rules).
//!
//! Computed in ClickHouse, where the stored conversions, the linked clicks and the
//! accounts' windows are, by one statement ([`recompute`]) over the customers a change
//! touches: every conversion of a customer depends on the customer's other conversions
//! (rule 2), so the unit of work is the customer. What triggers it:
//! * a conversions plan stored (and its clicks linked): the plan's conversions;
//! * clicks linked from the clicks' side: the conversions naming them;
//! * an account's record mirrored (its window may have changed): the whole account.
//!
//! Why the result is exact whatever the order of events: each change is committed before
//! the computation it triggers begins, and a computation's rows carry the server's time
//! when it began (`computed_at`, the table's version). So the newest computation of a
//! customer began after every change committed before it, saw them all, and wins; an older
//! computation that finishes late loses. Computing again is harmless.

use clickhouse::Client;

/// Which conversions' customers to compute.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The customers of these conversions (conversion keys).
    Conversions(&'a [&'a str]),
    /// Every customer of these accounts.
    Accounts(&'a [&'a str]),
    /// Everything (a backfill).
    All,
}

/// Keys sent in one statement (as a literal list: the statement text holds them).
const KEYS_PER_STATEMENT: usize = 5_000;

/// The statement, with `{scope}` a condition on `conversions`.
const RECOMPUTE: &str = "
INSERT INTO conversion_attribution
WITH
    touched AS
    (
        SELECT * FROM conversions
        WHERE (account_id, customer_hash) IN (SELECT account_id, customer_hash FROM conversions WHERE {scope})
    ),
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
        WHERE click_id IN (SELECT click_id FROM touched WHERE click_id != '')
        GROUP BY click_id
    ),
    direct AS
    (
        SELECT c.conversion_key AS conversion_key, c.account_id AS account_id, c.type AS type,
               c.event_id AS event_id, c.customer_hash AS customer_hash,
               c.click_id AS named_click_id, c.amount AS amount, c.currency AS currency,
               c.occurred_at_ms AS occurred_at_ms, c.received_at AS received_at,
               toUInt64(if(w.account_id = '', 90, w.attribution_window_days)) * 86400000 AS window_ms,
               k.click_id != '' AND k.click_account = c.account_id
                   AND k.click_at_ms <= c.occurred_at_ms + 300000
                   AND c.occurred_at_ms + 300000 - k.click_at_ms <= window_ms + 300000 AS own,
               k.click_id AS k_click_id, k.click_code AS k_code,
               k.click_landing_path AS k_landing_path, k.click_utm_source AS k_utm_source,
               k.click_utm_medium AS k_utm_medium, k.click_utm_campaign AS k_utm_campaign,
               k.click_at_ms AS k_click_at_ms
        FROM touched AS c
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
    d.conversion_key AS conversion_key,
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
                    AND d.occurred_at_ms + 300000 - x.4 <= d.window_ms + 300000,
               c.attributed) AS earlier,
    multiIf(d.own, 'click', earlier.3 != '', 'customer', 'none') AS attribution,
    if(d.own, d.k_click_id, earlier.3) AS click_id,
    if(d.own, d.k_code, earlier.5) AS code,
    if(d.own, d.k_landing_path, earlier.6) AS landing_path,
    if(d.own, d.k_utm_source, earlier.7) AS utm_source,
    if(d.own, d.k_utm_medium, earlier.8) AS utm_medium,
    if(d.own, d.k_utm_campaign, earlier.9) AS utm_campaign,
    if(attribution = 'none', NULL, fromUnixTimestamp64Milli(toInt64(if(d.own, d.k_click_at_ms, earlier.4)), 'UTC')) AS clicked_at,
    if(attribution = 'none', NULL, (toInt64(d.occurred_at_ms) - toInt64(if(d.own, d.k_click_at_ms, earlier.4))) / 1000) AS seconds_to_convert,
    now64(6, 'UTC') AS computed_at
FROM direct AS d
LEFT JOIN customers AS c ON c.account_id = d.account_id AND c.customer_hash = d.customer_hash
";

/// The statement's text for `condition` (see [`RECOMPUTE`]), with the helper column
/// `earlier` left out of the insert.
fn statement(condition: &str) -> String {
    let sql = RECOMPUTE.replace("{scope}", condition);
    // `earlier` is an intermediate, not a column of the table: select it under the name
    // the outer query uses, but insert only the table's columns.
    sql.replacen(
        "INSERT INTO conversion_attribution",
        "INSERT INTO conversion_attribution (conversion_key, account_id, type, event_id, \
         customer_hash, amount, currency, occurred_at, received_at, named_click_id, \
         attribution, click_id, code, landing_path, utm_source, utm_medium, utm_campaign, \
         clicked_at, seconds_to_convert, computed_at) SELECT * EXCEPT (earlier) FROM (",
        1,
    ) + ")"
}

/// Computes the attribution of every conversion of the customers `scope` names.
pub async fn recompute(
    client: &Client,
    scope: Scope<'_>,
    timeout_secs: &str,
) -> clickhouse::error::Result<()> {
    let run = |condition: &str| {
        client
            .query(&statement(condition))
            .with_setting("max_execution_time", timeout_secs)
            .with_setting("max_query_size", "4194304")
    };
    match scope {
        Scope::All => run("1").execute().await,
        Scope::Conversions(keys) => {
            for chunk in keys.chunks(KEYS_PER_STATEMENT) {
                run("conversion_key IN ?").bind(chunk).execute().await?;
            }
            Ok(())
        }
        Scope::Accounts(accounts) => {
            for chunk in accounts.chunks(KEYS_PER_STATEMENT) {
                run("account_id IN ?").bind(chunk).execute().await?;
            }
            Ok(())
        }
    }
}
