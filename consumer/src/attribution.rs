//! Attribution: which click each conversion is credited to, kept in ClickHouse's
//! `conversion_attribution` (the rules: `consumer/README.md`, "Conversions and
//! attribution").
//!
//! Computed in ClickHouse, where the stored conversions, the clicks and the accounts'
//! windows are, by one statement ([`recompute`]) over the conversions a change can affect.
//! A conversion's attribution depends on itself, its own click, its account's window and
//! (rule 2) the customer's *earlier* conversions. So a change to conversion `X` (stored,
//! or its click stored) can only change `X` and the customer's conversions after it: the
//! statement writes exactly those, reading the customer's conversions through an index
//! ordered by (account, customer) and their clicks through one ordered by click id. A
//! customer's new conversion rewrites none of the earlier ones. What triggers it
//! ([`crate::settle`]):
//! * a conversions plan stored: the plan's conversions;
//! * clicks stored: the conversions that name them;
//! * an account's record mirrored (its window may have changed): the whole account.
//!
//! Why the result is exact whatever the order of events: each change is committed before
//! the computation it triggers begins, every computation that can be affected by a change
//! includes the conversions it affects, and a computation's rows carry the server's time
//! when it began (`computed_at`, the table's version). So the newest computation of a
//! conversion began after every change to what it depends on, saw them all, and wins; an
//! older one that finishes late loses. Computing again is harmless.

use clickhouse::Client;

/// A conversion a change touched, as the seed of a computation: its customer (account
/// and customer hash) and when it occurred. The customer's conversions from then on are
/// computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub account_id: String,
    pub customer_hash: [u8; 32],
    pub occurred_at_ms: u64,
}

/// Which conversions to compute.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The seeds' customers, each from its earliest seed on. The seeds come as data, from
    /// the rows in hand or an index, so nothing is looked up by conversion key.
    Customers(&'a [Seed]),
    /// Every conversion of these accounts.
    Accounts(&'a [&'a str]),
    /// Everything (a backfill).
    All,
}

/// The migration that brings the attribution table to databases made before it: applying
/// it computes every conversion's attribution once.
pub const BACKFILL_AT_MIGRATION: u32 = 11;

/// Keys sent in one statement (as a literal list: the statement text holds them).
const KEYS_PER_STATEMENT: usize = 5_000;

/// Ingest instances' clocks may differ by minutes: a click stamped up to this long after
/// its conversion still counts as before it.
pub const CLOCK_ALLOWANCE_MS: u64 = 300_000;

/// The statement; `{seeds}` yields (account_id, customer_hash, from_ms): the customers to
/// compute and, for each, the time from which their conversions may change. Every input
/// is read once: ClickHouse evaluates a `WITH` subquery at each reference, so rule 2 is a
/// window over each customer's earlier conversions, not a second pass.
const RECOMPUTE: &str = "
INSERT INTO conversion_attribution (conversion_key, account_id, type, event_id,
    customer_hash, amount, currency, occurred_at, received_at, named_click_id,
    attribution, click_id, code, landing_path, utm_source, utm_medium, utm_campaign,
    clicked_at, seconds_to_convert, computed_at)
WITH
    seeds AS ({seeds}),
    customer AS
    (
        SELECT c.*, s.from_ms AS from_ms
        FROM conversions_by_customer AS c
        INNER JOIN seeds AS s ON s.account_id = c.account_id AND s.customer_hash = c.customer_hash
        WHERE (c.account_id, c.customer_hash) IN (SELECT account_id, customer_hash FROM seeds)
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
        FROM clicks_by_id
        WHERE click_id IN (SELECT click_id FROM customer WHERE click_id != '')
        GROUP BY click_id
    ),
    direct AS
    (
        SELECT c.conversion_key AS conversion_key, c.account_id AS account_id, c.type AS type,
               c.event_id AS event_id, c.customer_hash AS customer_hash,
               c.click_id AS named_click_id, c.amount AS amount, c.currency AS currency,
               c.occurred_at_ms AS occurred_at_ms, c.received_at AS received_at,
               c.from_ms AS from_ms,
               toUInt64(if(w.account_id = '', 90, w.attribution_window_days)) * 86400000 AS window_ms,
               k.click_id != '' AND k.click_account = c.account_id
                   AND k.click_at_ms <= c.occurred_at_ms + {allowance}
                   AND c.occurred_at_ms + {allowance} - k.click_at_ms <= window_ms + {allowance} AS own,
               k.click_id AS k_click_id, k.click_code AS k_code,
               k.click_landing_path AS k_landing_path, k.click_utm_source AS k_utm_source,
               k.click_utm_medium AS k_utm_medium, k.click_utm_campaign AS k_utm_campaign,
               k.click_at_ms AS k_click_at_ms
        FROM customer AS c
        LEFT JOIN linked AS k ON k.click_id = c.click_id
        LEFT JOIN
        (
            SELECT account_id, attribution_window_days FROM accounts FINAL
            WHERE is_deleted = 0 AND account_id IN (SELECT account_id FROM seeds)
        ) AS w ON w.account_id = c.account_id
    ),
    ordered AS
    (
        -- Per conversion, the customer's earlier conversions attributed by rule 1, in one
        -- total order: time, a lead before a sale of the same millisecond, then the key.
        SELECT *,
               groupArrayIf((k_click_id, k_click_at_ms, k_code, k_landing_path, k_utm_source,
                             k_utm_medium, k_utm_campaign), own)
                   OVER (PARTITION BY account_id, customer_hash
                         ORDER BY occurred_at_ms, type = 'sale', conversion_key
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS attributed_before
        FROM direct
    )
SELECT * EXCEPT (earlier) FROM
(
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
        arrayFirst(x -> d.occurred_at_ms + {allowance} - x.2 <= d.window_ms + {allowance},
                   d.attributed_before) AS earlier,
        multiIf(d.own, 'click', earlier.1 != '', 'customer', 'none') AS attribution,
        if(d.own, d.k_click_id, earlier.1) AS click_id,
        if(d.own, d.k_code, earlier.3) AS code,
        if(d.own, d.k_landing_path, earlier.4) AS landing_path,
        if(d.own, d.k_utm_source, earlier.5) AS utm_source,
        if(d.own, d.k_utm_medium, earlier.6) AS utm_medium,
        if(d.own, d.k_utm_campaign, earlier.7) AS utm_campaign,
        if(attribution = 'none', NULL, fromUnixTimestamp64Milli(toInt64(if(d.own, d.k_click_at_ms, earlier.2)), 'UTC')) AS clicked_at,
        if(attribution = 'none', NULL, (toInt64(d.occurred_at_ms) - toInt64(if(d.own, d.k_click_at_ms, earlier.2))) / 1000) AS seconds_to_convert,
        now64(6, 'UTC') AS computed_at
    FROM ordered AS d
    WHERE d.occurred_at_ms >= d.from_ms
)
";

/// The seeds of each scope: the customers to compute, and from when.
const SEEDS_OF_CUSTOMERS: &str = "SELECT account_id, toFixedString(unhex(customer), 32) AS customer_hash, \
     min(from_ms) AS from_ms FROM format(TSV, 'account_id String, customer String, from_ms UInt64', $${rows}$$) \
     GROUP BY account_id, customer_hash";
const SEEDS_OF_ACCOUNTS: &str = "SELECT account_id, customer_hash, toUInt64(0) AS from_ms \
     FROM conversions_by_customer WHERE account_id IN {ids} GROUP BY account_id, customer_hash";
const SEEDS_OF_ALL: &str = "SELECT account_id, customer_hash, toUInt64(0) AS from_ms \
     FROM conversions_by_customer GROUP BY account_id, customer_hash";

/// The statement's text for one scope's seeds.
fn statement(seeds: &str) -> String {
    RECOMPUTE
        .replace("{seeds}", seeds)
        .replace("{allowance}", &CLOCK_ALLOWANCE_MS.to_string())
}

/// Computes the attribution of the conversions `scope` names (see the module doc).
pub async fn recompute(
    client: &Client,
    scope: Scope<'_>,
    timeout_secs: &str,
) -> clickhouse::error::Result<()> {
    let (seeds, ids) = match scope {
        Scope::All => (SEEDS_OF_ALL, &[][..]),
        Scope::Customers(seeds) => {
            for chunk in seeds.chunks(KEYS_PER_STATEMENT) {
                run_statement(client, &statement(&customers_sql(chunk)), &[], timeout_secs).await?;
            }
            return Ok(());
        }
        Scope::Accounts(accounts) => (SEEDS_OF_ACCOUNTS, accounts),
    };
    let sql = statement(seeds);
    // `All` has no ids: one statement.
    let chunks: Vec<&[&str]> = if ids.is_empty() {
        vec![&[]]
    } else {
        ids.chunks(KEYS_PER_STATEMENT).collect()
    };
    for chunk in chunks {
        run_statement(client, &sql, chunk, timeout_secs).await?;
    }
    Ok(())
}

async fn run_statement(
    client: &Client,
    sql: &str,
    ids: &[&str],
    timeout_secs: &str,
) -> clickhouse::error::Result<()> {
    crate::idset::query_in(client, sql, ids)
        .with_setting("max_execution_time", timeout_secs)
        .with_setting("max_query_size", "16777216")
        .with_setting("async_insert", "0")
        .execute()
        .await
}

/// The seeds as rows of TSV in the statement (account ids are `A-Za-z0-9_-`, hashes hex):
/// the server reads them as one literal.
fn customers_sql(seeds: &[Seed]) -> String {
    let mut rows = String::with_capacity(seeds.len() * 96);
    for seed in seeds {
        if !seed
            .account_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            continue; // not an account id: no conversion of it is stored
        }
        rows.push_str(&seed.account_id);
        rows.push('\t');
        rows.push_str(&hex::encode(seed.customer_hash));
        rows.push('\t');
        rows.push_str(&seed.occurred_at_ms.to_string());
        rows.push('\n');
    }
    SEEDS_OF_CUSTOMERS.replace("{rows}", &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_fills_the_seeds_and_the_allowance() {
        let seed = Seed {
            account_id: "acct_1".into(),
            customer_hash: [0xab; 32],
            occurred_at_ms: 42,
        };
        let bad = Seed {
            account_id: "a$$b".into(),
            ..seed.clone()
        };
        let customers = customers_sql(&[seed, bad]);
        assert!(customers.contains(&format!("$$acct_1\t{}\t42\n$$", "ab".repeat(32))));
        assert!(!customers.contains("a$$b"));
        for seeds in [customers.as_str(), SEEDS_OF_ACCOUNTS, SEEDS_OF_ALL] {
            let sql = statement(seeds);
            assert_eq!(sql.contains("{ids}"), seeds.contains("{ids}"), "{sql}");
            assert!(!sql.replace("{ids}", "").contains('{'), "{sql}");
            assert!(!sql.contains('?'), "{sql}");
            assert!(sql.contains("seeds AS (SELECT account_id, "), "{sql}");
        }
    }
}
