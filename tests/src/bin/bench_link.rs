//! What a flush costs after its rows are stored, at two sizes of stored data in one run:
//! the steps must cost in proportion to the batch, not to what is stored.
//!
//! For each size (default 10 M clicks with 0.1 M conversions, then 100 M with 1 M), a
//! database migrated like production gets the clicks in `clicks_by_id` (the index every
//! link reads; the raw clicks table is read by no step here) and the conversions through
//! `conversions` (its views fill `conversions_by_customer` and `conversions_by_click`),
//! with their claims and attribution. Then, median of 5 rounds:
//! * a conversions flush of 5,000 new conversions (of existing customers, half naming a
//!   stored click): the insert, the claims (`Writer::claim`), the attribution
//!   (`settle::after_store`);
//! * a click plan of 20,000 new clicks: the lookup of the conversions naming them, and
//!   their attribution (what `settle::after_store` does for clicks; 50 of the ids are
//!   named by stored conversions).
//!
//!     cargo run --release -p e2e --bin bench_link -- [CLICKS_SMALL CLICKS_LARGE]

use std::time::{Duration, Instant};

use clap::Parser as _;
use consumer::config::Cli;
use consumer::row::ConversionRow;
use consumer::writer::Writer;

const ROUNDS: usize = 5;
const FLUSH: u64 = 5_000;
const CLICK_PLAN: u64 = 20_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A deterministic click id for click number `i`.
fn click_sql(i: &str) -> String {
    format!("concat('refclk_', lower(hex(cityHash64({i}, 1))), lower(hex(cityHash64({i}, 2))))")
}

struct Figures {
    clicks: u64,
    conversions: u64,
    insert: Duration,
    claims: Duration,
    attribute: Duration,
    flush: Duration,
    click_lookup: Duration,
    click_settle: Duration,
    rows_written: u64,
}

async fn run_size(cli: &Cli, clicks: u64, conversions: u64, round_base: u64) -> Figures {
    let url = e2e::clickhouse_url();
    let ch = e2e::ClickHouse::new(&url);
    let database = format!("bench_link_{clicks}");
    let _ = ch
        .try_query(&format!("DROP DATABASE IF EXISTS {database} SYNC"))
        .await;
    let mut config = cli.config.clone();
    config.clickhouse_database = database.clone();
    consumer::migrations::apply(
        &consumer::writer::base_client(&config),
        &database,
        "referral_clicks",
    )
    .await
    .expect("migrate");
    let db = e2e::ClickHouse::new(&format!("{url}/?database={database}"));
    let started = Instant::now();
    // Clicks spread over 30 days, 1,000 accounts.
    db.query(&format!(
        "INSERT INTO clicks_by_id SELECT {}, concat('acct_', toString(number % 1000)), \
         concat('C', leftPad(toString(number % 10000), 11, '0')), concat('/p/', toString(number % 200)), \
         'news', 'email', 'spring', toUInt64(toUnixTimestamp64Milli(now64(3))) - number % 2592000000, \
         toDateTime(intDiv(toUInt64(toUnixTimestamp64Milli(now64(3))) - number % 2592000000, 1000)) \
         FROM numbers({clicks}) SETTINGS max_insert_threads = 2, max_execution_time = 7200",
        click_sql("number")
    ))
    .await;
    // Conversions: a lead per sampled click (70 % naming it), customers of their own.
    let step = clicks / conversions;
    let columns = "(conversion_key, account_id, type, event_id, customer_hash, key_id, click_id, \
        amount, currency, occurred_at_ms, received_at, received_at_ms, api_key_id, kafka_topic, \
        kafka_partition, kafka_offset)";
    db.query(&format!(
        "INSERT INTO conversions {columns} SELECT concat('acct_', toString(n % 1000), '/lead/L', toString(n)), \
         concat('acct_', toString(n % 1000)), 'lead', concat('L', toString(n)), \
         toFixedString(unhex(hex(SHA256(toString(n)))), 32), 'k1', if(n % 10 < 7, {}, ''), 0, '', \
         toUInt64(toUnixTimestamp64Milli(now64(3))), now(), toUInt64(toUnixTimestamp64Milli(now64(3))), \
         'key_x', 'bench', n % 8, n FROM (SELECT number * {step} AS n FROM numbers({conversions})) \
         SETTINGS max_execution_time = 3600",
        click_sql("n")
    ))
    .await;
    db.query(
        "INSERT INTO conversion_claims (conversion_key, kafka_topic, kafka_partition, kafka_offset) \
         SELECT conversion_key, kafka_topic, kafka_partition, kafka_offset FROM conversions",
    )
    .await;
    let writer = Writer::for_table(&config, "conversions");
    let client = consumer::writer::base_client(&config).with_database(&database);
    consumer::attribution::recompute(&client, consumer::attribution::Scope::All, "3600")
        .await
        .expect("backfill");
    db.query("OPTIMIZE TABLE clicks_by_id FINAL SETTINGS max_execution_time = 7200")
        .await;
    eprintln!(
        "{database}: {clicks} clicks, {conversions} conversions loaded in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    let (mut insert, mut claims, mut attribute, mut flush) = (vec![], vec![], vec![], vec![]);
    let (mut click_lookup, mut click_settle) = (vec![], vec![]);
    let before = db
        .scalar("SELECT count() FROM conversion_attribution")
        .await;
    for round in 0..ROUNDS as u64 {
        // 5,000 new conversions: sales of existing customers, half naming a stored click.
        let base = round_base + round * FLUSH;
        let rows: Vec<ConversionRow> = db
            .query(&format!(
                "SELECT account_id, hex(customer_hash), \
                 if(rowNumberInAllBlocks() % 2 = 0, {}, '') FROM \
                 (SELECT account_id, customer_hash, conversion_key FROM conversions_by_customer \
                  ORDER BY cityHash64(conversion_key, {round}) LIMIT {FLUSH}) FORMAT TSV",
                click_sql(&format!("(cityHash64(conversion_key, {round}) % {clicks})"))
            ))
            .await
            .lines()
            .enumerate()
            .map(|(i, line)| {
                let mut f = line.split('\t');
                let account = f.next().unwrap_or_default().to_owned();
                let hash = hex::decode(f.next().unwrap_or_default()).expect("hex");
                let click = f.next().unwrap_or_default().to_owned();
                let now = shared::now_ms();
                let n = base + i as u64;
                ConversionRow {
                    conversion_key: format!("{account}/sale/S{n}"),
                    account_id: account,
                    kind: "sale".into(),
                    event_id: format!("S{n}"),
                    customer_hash: hash.try_into().expect("32 bytes"),
                    key_id: "k1".into(),
                    click_id: click,
                    amount: 4900,
                    currency: "EUR".into(),
                    occurred_at_ms: now,
                    received_at: u32::try_from(now / 1000).unwrap_or(u32::MAX),
                    received_at_ms: now,
                    api_key_id: "key_x".into(),
                    kafka_topic: "bench".into(),
                    kafka_partition: 0,
                    kafka_offset: n,
                }
            })
            .collect();
        assert_eq!(rows.len() as u64, FLUSH);
        let t0 = Instant::now();
        writer
            .insert_plan(rows.iter(), &format!("bench-link-{base}"))
            .await
            .expect("insert");
        let t1 = Instant::now();
        let claimed: Vec<(&str, u16, u64)> = rows
            .iter()
            .map(|r| (r.conversion_key.as_str(), r.kafka_partition, r.kafka_offset))
            .collect();
        writer.claim("bench", &claimed).await.expect("claims");
        let t2 = Instant::now();
        let settled: Vec<&ConversionRow> = rows.iter().collect();
        consumer::settle::after_store(&writer, &settled)
            .await
            .expect("settle");
        let t3 = Instant::now();
        insert.push(t1 - t0);
        claims.push(t2 - t1);
        attribute.push(t3 - t2);
        flush.push(t3 - t0);

        // A click plan of 20,000 new ids, 50 of them named by stored conversions.
        let named: Vec<String> = db
            .query(&format!(
                "SELECT click_id FROM conversions_by_click ORDER BY cityHash64(click_id, {round}) LIMIT 50 FORMAT TSV"
            ))
            .await
            .lines()
            .map(str::to_owned)
            .collect();
        let mut ids: Vec<String> = (0..CLICK_PLAN - named.len() as u64)
            .map(|i| format!("refclk_new_{base}_{i:08}"))
            .collect();
        ids.extend(named);
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        // What settle::after_store does for a click plan: the lookup, then the attribution
        // of the conversions found.
        let t0 = Instant::now();
        let found = writer.conversions_naming(&ids).await.expect("lookup");
        let t1 = Instant::now();
        writer
            .attribute(consumer::attribution::Scope::Customers(&found))
            .await
            .expect("settle clicks");
        click_lookup.push(t1 - t0);
        click_settle.push(t0.elapsed());
        assert!(!found.is_empty());
    }
    let after = db
        .scalar("SELECT count() FROM conversion_attribution")
        .await;
    let figures = Figures {
        clicks,
        conversions,
        insert: median(insert),
        claims: median(claims),
        attribute: median(attribute),
        flush: median(flush),
        click_lookup: median(click_lookup),
        click_settle: median(click_settle),
        rows_written: (after - before) / ROUNDS as u64,
    };
    let _ = ch
        .try_query(&format!("DROP DATABASE IF EXISTS {database} SYNC"))
        .await;
    figures
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (small, large) = match args.as_slice() {
        [a, b] => (*a, *b),
        _ => (10_000_000, 100_000_000),
    };
    let url = e2e::clickhouse_url();
    let cli = Cli::try_parse_from(["consumer", "--clickhouse-url", &url]).expect("cli");
    println!(
        "\n## after-store steps at two sizes (ClickHouse {}, median of {ROUNDS})\n",
        e2e::ClickHouse::new(&url)
            .query("SELECT version() FORMAT TSV")
            .await
            .trim()
    );
    let a = run_size(&cli, small, small / 100, 0).await;
    let b = run_size(&cli, large, large / 100, 1_000_000).await;
    println!("| stored | conversions flush of {FLUSH}: insert / claims / attribution / total | attribution rows written per flush | click plan of {CLICK_PLAN}: lookup / with attribution |");
    println!("|---|---|---|---|");
    for f in [&a, &b] {
        println!(
            "| {} M clicks, {} M conversions | {:.0} / {:.0} / {:.0} / **{:.0} ms** | {} | {:.0} / **{:.0} ms** |",
            f.clicks as f64 / 1e6,
            f.conversions as f64 / 1e6,
            ms(f.insert),
            ms(f.claims),
            ms(f.attribute),
            ms(f.flush),
            f.rows_written,
            ms(f.click_lookup),
            ms(f.click_settle)
        );
    }
    println!(
        "\nlarger / smaller: conversions flush {:.2}, click plan {:.2} (target: within 1.30)",
        b.flush.as_secs_f64() / a.flush.as_secs_f64(),
        b.click_settle.as_secs_f64() / a.click_settle.as_secs_f64()
    );
}
