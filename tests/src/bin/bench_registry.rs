//! Registry benchmark: what a million referral codes cost.
//!
//!     deploy/local/bench registry [CODES]      (default 1,000,000; release binaries)
//!
//! On a private tansu broker with durable (sqlite) storage, as in production: the time of
//! `consumer codes import` for CODES codes of 2,000 accounts (target: 1 M under a minute);
//! an ingest's catch-up on them at start (target: 1 M under 10 s) and its resident memory
//! against an ingest holding one code (target: at most 64 MiB more per million); and the
//! time from a `consumer codes add` returning to the code being in force on the running
//! ingest, p50/p99 over 50 changes (target: p99 under 2 s).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::*;

const ACCOUNTS: usize = 2000;

/// An ingest on `registry`; with `snapshot`, the database whose `codes` mirror it loads.
async fn started_ingest(
    brokers: &str,
    registry: &RegistryTopics,
    snapshot: Option<&str>,
) -> (Ingest, Duration) {
    let mut opts = IngestOptions::new(brokers, "bench_clicks");
    opts.registry = registry.clone();
    opts.extra_env = vec![
        ("LOG_LEVEL".into(), "warn,ingest::registry=info".into()),
        ("LOG_FORMAT".into(), "json".into()),
    ];
    if let Some(db) = snapshot {
        opts.extra_env.extend([
            ("INGEST_REGISTRY_CLICKHOUSE_URL".into(), clickhouse_url()),
            ("INGEST_REGISTRY_CLICKHOUSE_DATABASE".into(), db.to_owned()),
        ]);
    }
    let started = Instant::now();
    let ingest = Ingest::start(&opts);
    wait_ready(&ingest.url("/readyz"), Duration::from_secs(300)).await;
    (ingest, started.elapsed())
}

#[tokio::main]
async fn main() {
    std::env::set_var(
        "E2E_BIN_DIR",
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release"),
    );
    let codes: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("# registry benchmark: {codes} codes of {ACCOUNTS} accounts (tansu on sqlite)\n");
    let addr = free_addr();
    let _broker = PrivateBroker::start_with(addr, addr, false).await;
    let brokers = addr.to_string();
    create_topic(&brokers, "bench_clicks", 8).await;
    let plans = test_catalogue();

    // An ingest holding one code: the baseline of the memory figure.
    let small = RegistryTopics::for_topic("bench_small");
    small.create(&brokers).await;
    small
        .set_account(&brokers, "acct_small", "pro", true, true)
        .await;
    small
        .set_codes(&brokers, "acct_small", &[DOCS_CODE], true)
        .await;
    let (base, _) = started_ingest(&brokers, &small, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base_rss = rss_mib(base.proc.child.id());
    drop(base);

    // The accounts, then the import.
    let big = RegistryTopics {
        accounts: "bench_accounts".into(),
        codes: "bench_codes".into(),
        keys: "bench_keys".into(),
        refusals: "bench_refusals".into(),
        conversions: "bench_conversions".into(),
    };
    create_topic(&brokers, &big.accounts, 1).await;
    create_topic(&brokers, &big.codes, 4).await;
    create_topic(&brokers, &big.keys, 1).await;
    create_topic(&brokers, &big.refusals, 1).await;
    create_topic(&brokers, &big.conversions, 1).await;
    let record =
        shared::registry::AccountRecord::new("pro", true, shared::registry::AccountStatus::Active)
            .encode();
    let ids: Vec<String> = (0..ACCOUNTS).map(|a| format!("acct_{a:05}")).collect();
    let messages: Vec<(Option<&str>, &[u8])> = ids
        .iter()
        .map(|id| (Some(id.as_str()), record.as_slice()))
        .collect();
    produce_raw(&brokers, &big.accounts, &messages).await;
    let csv = std::env::temp_dir().join(format!("{}.csv", unique("bench_codes")));
    let mut text = String::with_capacity(codes * 26);
    text.push_str("code,account\n");
    for i in 0..codes {
        text.push_str(&format!("C{i:011},acct_{:05}\n", i % ACCOUNTS));
    }
    std::fs::write(&csv, text).expect("csv");
    let started = Instant::now();
    let (status, out) = big
        .consumer_command(
            &brokers,
            "bench_clicks",
            &["codes", "import", &csv.display().to_string()],
            &plans,
        )
        .await;
    let import = started.elapsed();
    assert_eq!(status, 0, "{out}");
    let _ = std::fs::remove_file(&csv);

    // The ceiling: a plain consumer reading the codes topic to its end.
    let started = Instant::now();
    let read = {
        let (brokers, topic) = (brokers.clone(), big.codes.clone());
        tokio::task::spawn_blocking(move || {
            read_topic(&brokers, &topic, codes, Duration::from_secs(600)).len()
        })
        .await
        .expect("read")
    };
    let raw_read = started.elapsed();
    assert_eq!(read, codes);

    // Catch-up at start, and memory.
    let (ingest, catch_up) = started_ingest(&brokers, &big, None).await;
    let pid = ingest.proc.child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mib(pid);
    let peak = peak_rss_mib(pid);
    let per_million = (rss - base_rss) / (codes as f64 / 1e6);
    let loaded = ingest
        .proc
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "registry loaded: ready")
        .map(|l| l["fields"]["elapsed_ms"].to_string())
        .unwrap_or_default();

    // The consumer's mirror of the codes in ClickHouse, and an ingest starting from it.
    let database = unique("bench_registry");
    let consumer = ConsumerProc::start(&ConsumerOptions {
        brokers: brokers.clone(),
        topic: "bench_clicks".into(),
        registry: big.clone(),
        group: unique("bench_registry_group"),
        clickhouse_url: clickhouse_url(),
        database: database.clone(),
        extra_env: vec![("LOG_LEVEL".into(), "warn".into())],
    });
    let ch = ClickHouse::new(&clickhouse_url());
    let mirrored = Instant::now();
    let count = format!("SELECT uniqExact(code) FROM {database}.codes FORMAT TSV");
    eventually("codes mirrored", Duration::from_secs(600), || {
        let (ch, count) = (&ch, &count);
        async move {
            (ch.try_query(count)
                .await
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()?
                >= codes)
                .then_some(())
        }
    })
    .await;
    let mirror_secs = mirrored.elapsed().as_secs_f64();
    drop(consumer);
    let (from_ch, from_ch_ready) = started_ingest(&brokers, &big, Some(&database)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from_ch_rss = rss_mib(from_ch.proc.child.id());
    let from_ch_line = from_ch
        .proc
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("registry codes loaded from ClickHouse"))
        })
        .map(|l| l["fields"].to_string())
        .unwrap_or_else(|| "not loaded from ClickHouse".into());
    drop(from_ch);
    let _ = ch
        .try_query(&format!("DROP DATABASE IF EXISTS {database}"))
        .await;

    // Propagation: a command's return to the change in force on the running ingest.
    let c = http();
    let url = ingest.url("/api/v1/referrals/click");
    let mut lags = Vec::new();
    for i in 0..50 {
        let code = format!("PROPAGATE{i:03}");
        let (status, out) = big
            .consumer_command(
                &brokers,
                "bench_clicks",
                &["codes", "add", &code, "--account", "acct_00001"],
                &plans,
            )
            .await;
        assert_eq!(status, 0, "{out}");
        let t = Instant::now();
        loop {
            if post_click(&c, &url, &serde_json::json!({"code": code}))
                .await
                .0
                == 200
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{code} never in force"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags.push(t.elapsed());
    }
    lags.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| figure | measured | target |\n|---|---|---|");
    println!(
        "| `consumer codes import` of {codes} codes (validated, all acknowledged) | {:.1} s | 1 M under 60 s |",
        import.as_secs_f64()
    );
    println!(
        "| ingest start → ready with {codes} codes (registry read to its end: {loaded} ms) | {:.1} s | 1 M under 10 s |",
        catch_up.as_secs_f64()
    );
    println!(
        "| ceiling: a plain librdkafka consumer reading the codes topic to its end | {:.1} s ({:.0} msg/s) | |",
        raw_read.as_secs_f64(),
        codes as f64 / raw_read.as_secs_f64()
    );
    println!(
        "| ingest start → ready with {codes} codes from the consumer's ClickHouse mirror + the topic's tail ({from_ch_line}) | {:.1} s | 1 M under 10 s |",
        from_ch_ready.as_secs_f64()
    );
    println!("| (the consumer's mirror of {codes} codes into ClickHouse, for the record) | {mirror_secs:.1} s | |");
    println!("| ingest RSS holding 1 code / {codes} codes read from the topic (peak {peak:.1} MiB) / from ClickHouse | {base_rss:.1} / {rss:.1} / {from_ch_rss:.1} MiB | |");
    println!("| **RSS per million codes** | **{per_million:.1} MiB** | ≤ 64 MiB |");
    println!(
        "| change in force after the command returns (50 `codes add`) | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | p99 < 2 s |",
        ms(lags[25]),
        ms(lags[49]),
        ms(lags[49])
    );
}
