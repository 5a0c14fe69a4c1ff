//! Dashboard query speed on a large data set.
//!
//! Loads N synthetic clicks (default 100 million) through the consumer's own insert path
//! (`Writer::insert`, RowBinary, into a database migrated like production, so the
//! materialized views do their real work), then times every named query of
//! deploy/clickhouse/queries over the dashboards' default range (7 days) and over 30 days.
//! Target: each under one second on this 2-core machine.
//!
//! Conversions: about 1 M (0.7 % of the clicks bring a lead, 70 % of them naming their
//! click; 40 % of those customers pay a day later without naming it, so the sale is
//! attributed through the customer), written with SQL from the loaded clicks (their views
//! fill the consumer's indexes), then attributed as the consumer attributes them. The
//! per-flush steps at two data sizes are `bench_link`'s.
//!
//!     cargo run --release -p e2e --bin bench_queries -- [ROWS] [--reuse]
//!
//! `--reuse` skips loading when the bench database already holds ROWS rows.

use std::time::{Duration, Instant};

use clap::Parser as _;
use consumer::config::Cli;
use consumer::row::ClickRow;
use consumer::writer::Writer;

const DATABASE: &str = "bench_queries";
const CODES: u64 = 10_000;
const VISITORS: u64 = 2_000_000;
const DAYS: u64 = 30;

/// splitmix64: fast, deterministic, good enough for synthetic data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn digest(seed: u64) -> [u8; 32] {
    let mut r = Rng(seed);
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&r.next().to_le_bytes());
    }
    out
}

const SOURCES: [&str; 8] = [
    "newsletter",
    "twitter",
    "facebook",
    "google",
    "linkedin",
    "reddit",
    "partner",
    "",
];
const MEDIA: [&str; 5] = ["email", "social", "cpc", "referral", ""];

fn row(r: &mut Rng, now: u64, topic: &str, offset: u64, rows: u64) -> ClickRow {
    // Skewed popularity: a few codes and visitors get most clicks.
    let code = (CODES as f64 * r.unit().powi(3)) as u64;
    let visitor = (VISITORS as f64 * r.unit().powi(2)) as u64;
    let is_bot = r.next() % 20 == 0;
    // Evenly over the last DAYS days, in time order (as clicks arrive), a few seconds of
    // jitter.
    let span = DAYS * 86_400_000;
    let at_ms = now * 1000 - span + offset * span / rows.max(1) + r.next() % 5000;
    let at_ms = at_ms.min(now * 1000);
    ClickRow {
        click_id: format!("refclk_{:016x}{:016x}", r.next(), r.next()),
        code: format!("C{code:011}"),
        landing_path: format!("/p/{}", (code * 7 + visitor) % 500),
        utm_source: SOURCES[(code % 8) as usize].to_owned(),
        utm_medium: MEDIA[(code % 5) as usize].to_owned(),
        utm_campaign: format!("campaign-{}", code % 50),
        ip_hash: digest(visitor),
        ua_hash: digest(visitor % 97 + 1_000_000_007),
        key_id: "k1".into(),
        is_bot: u8::from(is_bot),
        received_at: (at_ms / 1000) as u32,
        received_at_ms: at_ms,
        kafka_topic: topic.to_owned(),
        kafka_partition: (offset % 8) as u16,
        kafka_offset: offset,
        // 10,000 codes of 2,000 accounts.
        account_id: format!("acct_{:05}", code % 2000),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: u64 = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000_000);
    let reuse = args.iter().any(|a| a == "--reuse");
    let url = e2e::clickhouse_url();
    let cli = Cli::try_parse_from([
        "consumer",
        "--clickhouse-url",
        &url,
        "--clickhouse-database",
        DATABASE,
        // A 500k-row block with every view attached, while merges run: minutes at worst.
        "--insert-timeout-ms",
        "600000",
    ])?;
    let config = cli.config;
    let ch = e2e::ClickHouse::new(&url);
    let table = format!("{DATABASE}.referral_clicks");

    let existing = ch.counts_if_exists(&table).await.0;
    if !(reuse && existing == rows) {
        ch.query(&format!("DROP DATABASE IF EXISTS {DATABASE}"))
            .await;
        let client = consumer::writer::base_client(&config);
        consumer::migrations::apply(&client, DATABASE, "referral_clicks").await?;
        let writer = Writer::new(&config);
        let now = shared::now_ms() / 1000;
        let block = 500_000u64;
        let started = Instant::now();
        let mut rng = Rng(42);
        let mut offset = 0u64;
        let mut buf = Vec::with_capacity(block as usize);
        while offset < rows {
            buf.clear();
            for _ in 0..block.min(rows - offset) {
                buf.push(row(&mut rng, now, "bench", offset, rows));
                offset += 1;
            }
            writer
                .insert_plan(buf.iter(), &format!("bench-{offset}"))
                .await?;
            if offset % 10_000_000 == 0 || offset == rows {
                let s = started.elapsed().as_secs_f64();
                eprintln!(
                    "loaded {offset} rows in {s:.0} s ({:.0} rows/s)",
                    offset as f64 / s
                );
            }
        }
        let s = started.elapsed().as_secs_f64();
        println!("load: {rows} rows in {s:.1} s = {:.0} rows/s (insert path of the consumer, with the materialized views of the migrations attached)", rows as f64 / s);
        // Let background merges settle so timings reflect a steady table.
        ch.query(&format!("OPTIMIZE TABLE {DATABASE}.clicks_hourly"))
            .await;
    }
    // The registry side of the billing panels: 2,000 accounts on mixed plans, the catalogue.
    ch.query(&format!(
        "INSERT INTO {DATABASE}.accounts SELECT concat('acct_', leftPad(toString(number), 5, '0')), \
         ['free', 'starter', 'growth', 'pro', 'business', 'enterprise'][number % 6 + 1], 1, 'active', now64(3), 1, 0, 90 \
         FROM numbers(2000)"
    ))
    .await;
    consumer::registry::store_catalogue(
        &config,
        &shared::plans::Catalogue::load_or_builtin(None).map_err(anyhow::Error::msg)?,
    )
    .await?;
    load_conversions(&ch, &db_url(&url), &config).await;
    let disk = ch
        .query(&format!("SELECT table, formatReadableSize(sum(bytes)) FROM system.parts WHERE active AND database = '{DATABASE}' GROUP BY table ORDER BY table FORMAT TSV"))
        .await;
    println!("table sizes:\n{disk}");

    let now = shared::now_ms() / 1000;
    let db = e2e::ClickHouse::new(&db_url(&url));
    let mut queries: Vec<(String, String)> = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/clickhouse/queries"
    ))?
    .filter_map(Result::ok)
    .map(|e| e.path())
    .filter(|p| p.extension().is_some_and(|x| x == "sql"))
    .map(|p| {
        (
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::fs::read_to_string(&p).unwrap_or_default(),
        )
    })
    .collect();
    queries.sort();
    println!(
        "\n| query | range | min | median | max | ratio to 1 s target |\n|---|---|---|---|---|---|"
    );
    let mut worst = Duration::ZERO;
    for (name, sql) in &queries {
        // The abuse panel has a fixed range of its own (24 h, `timeFrom` in the dashboard).
        let ranges: &[(&str, u64)] = if name == "suspected_abuse" {
            &[("24 h (panel)", 86_400)]
        } else {
            &[
                ("6 hours", 6 * 3600),
                ("7 days", 7 * 86_400),
                ("30 days", 30 * 86_400),
            ]
        };
        for &(label, secs) in ranges {
            let sql = e2e::expand_macros(sql, now - secs, now);
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                db.query(&format!("{sql} FORMAT Null")).await;
                times.push(t.elapsed());
            }
            times.sort();
            worst = worst.max(times[2]);
            println!(
                "| {name} | {label} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} |",
                times[0].as_secs_f64() * 1e3,
                times[2].as_secs_f64() * 1e3,
                times[4].as_secs_f64() * 1e3,
                times[2].as_secs_f64()
            );
        }
    }
    println!(
        "\nworst median: {:.0} ms over {rows} rows ({})",
        worst.as_secs_f64() * 1e3,
        if worst < Duration::from_secs(1) {
            "every query under 1 s"
        } else {
            "TARGET MISSED"
        }
    );
    Ok(())
}

fn db_url(url: &str) -> String {
    format!("{url}/?database={DATABASE}")
}

/// About 1 M conversions over the loaded clicks (see the module doc), attributed as the
/// consumer attributes them.
async fn load_conversions(ch: &e2e::ClickHouse, db_url: &str, config: &consumer::config::Config) {
    let db = e2e::ClickHouse::new(db_url);
    if db
        .scalar("SELECT count() FROM conversions FORMAT TSV")
        .await
        == 0
    {
        let started = Instant::now();
        let sampled = "SELECT click_id, account_id, cityHash64(click_id) AS h, \
            least(received_at_ms + cityHash64(click_id, 1) % 259200000, toUInt64(toUnixTimestamp64Milli(now64(3)))) AS at \
            FROM referral_clicks WHERE cityHash64(click_id) % 1000 < 7";
        let columns = "(conversion_key, account_id, type, event_id, customer_hash, key_id, click_id, \
            amount, currency, occurred_at_ms, received_at, received_at_ms, api_key_id, kafka_topic, kafka_partition, kafka_offset)";
        db.query(&format!(
            "INSERT INTO conversions {columns} SELECT concat(account_id, '/lead/L', hex(h)), account_id, 'lead', \
             concat('L', hex(h)), SHA256(click_id), 'k1', if(h % 10 < 7, click_id, ''), 0, '', at, \
             toDateTime(intDiv(at, 1000)), at, 'key_0123456789abcdef', 'bench_conversions', h % 8, h FROM ({sampled})"
        ))
        .await;
        db.query(&format!(
            "INSERT INTO conversions {columns} SELECT concat(account_id, '/sale/S', hex(h)), account_id, 'sale', \
             concat('S', hex(h)), SHA256(click_id), 'k1', '', h % 50000, ['EUR', 'USD', 'GBP'][h % 3 + 1], \
             least(at + 86400000, toUInt64(toUnixTimestamp64Milli(now64(3)))), \
             toDateTime(intDiv(at, 1000)), at, 'key_0123456789abcdef', 'bench_conversions', h % 8, h + 1 \
             FROM ({sampled}) WHERE h % 10 < 4"
        ))
        .await;
        println!(
            "conversions: written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    // Attribution as the consumer computes it: all at once here (a backfill), then the
    // incremental computation a conversions plan triggers, for 100 and 5,000 conversions.
    let client = consumer::writer::base_client(config).with_database(DATABASE);
    if db
        .scalar("SELECT count() FROM conversion_attribution FORMAT TSV")
        .await
        == 0
    {
        let started = Instant::now();
        consumer::attribution::recompute(&client, consumer::attribution::Scope::All, "3600")
            .await
            .expect("attribution backfill");
        println!(
            "attribution of every conversion computed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    for n in [100usize, 5_000] {
        // What a plan of n conversions seeds: their customers, from when they occurred.
        let seeds: Vec<consumer::attribution::Seed> = db
            .query(&format!(
                "SELECT account_id, hex(customer_hash), occurred_at_ms FROM conversions \
                 ORDER BY cityHash64(conversion_key, 3) LIMIT {n} FORMAT TSV"
            ))
            .await
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let account_id = f.next()?.to_owned();
                let mut customer_hash = [0u8; 32];
                hex::decode_to_slice(f.next()?, &mut customer_hash).ok()?;
                let occurred_at_ms = f.next()?.parse().ok()?;
                Some(consumer::attribution::Seed {
                    account_id,
                    customer_hash,
                    occurred_at_ms,
                })
            })
            .collect();
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            consumer::attribution::recompute(
                &client,
                consumer::attribution::Scope::Customers(&seeds),
                "600",
            )
            .await
            .expect("attribution");
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "attribution computed anew for {n} conversions and their customers' later ones (what a plan of {n} triggers): median of 5 {:.0} ms",
            times[2].as_secs_f64() * 1e3
        );
    }
    let counts = db
        .query("SELECT countIf(type = 'lead'), countIf(type = 'sale'), countIf(click_id != '') FROM conversions FORMAT TSV")
        .await;
    println!(
        "conversions (leads, sales, naming a click): {}",
        counts.trim()
    );
    let _ = ch;
}
