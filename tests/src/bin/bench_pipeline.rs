//! Pipeline benchmarks, with ceilings measured side by side in the same run.
//!
//!     deploy/local/bench            (builds release binaries, needs wrk, oha, tansu, ClickHouse)
//!
//! Prints: ingest max requests/s (realistic body mix, keep-alive, wrk) vs a bare hyper
//! server, and the same bare hyper answering after a 3 ms wait (the floor for a server
//! that waits for its broker's acknowledgement); ingest latency percentiles at 50% and 90% of its max rate (oha, fixed rate,
//! latency correction); ingest peak RSS and CPU-seconds per million clicks; consumer rows/s
//! from a pre-filled topic vs raw consume and raw RowBinary insert ceilings and vs
//! ClickHouse's own Kafka engine (same topic, same table and views, same run); end-to-end
//! freshness under moderate load; conversions/s through ingest alone and beside a click
//! stream, with their share of ingest's CPU.
//! Throughput runs use tansu on memory storage (our binaries are measured, not tansu's
//! sqlite); the durable-storage ingest figure is printed too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use shared::metric_names as m;

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

/// Codes and accounts of the benchmark registry: 10,000 codes of 2,000 accounts.
const CODES: usize = 10_000;
const ACCOUNTS: usize = 2_000;

fn bench_code(i: usize) -> String {
    format!("BENCH{:07}", i % CODES)
}

fn click_body(i: usize) -> String {
    format!(
        r#"{{"code":"{}","landing_path":"https://shop.example/pricing?ref=x","utm_source":"newsletter","utm_medium":"email","utm_campaign":"spring-launch"}}"#,
        bench_code(i)
    )
}

/// The wrk Lua script: a realistic mix of bodies over the benchmark's 10,000 codes,
/// rotating per request.
fn write_mix(dir: &Path) -> PathBuf {
    use std::fmt::Write as _;
    let mut lua = String::from(
        r#"local ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
local json = {["Content-Type"] = "application/json", ["User-Agent"] = ua}
local beacon = {["Content-Type"] = "text/plain;charset=UTF-8", ["User-Agent"] = ua}
local gzipped = {["Content-Type"] = "application/json", ["Content-Encoding"] = "gzip", ["User-Agent"] = ua}
local reqs = {}
local function add(headers, body) reqs[#reqs + 1] = wrk.format("POST", "/api/v1/referrals/click", headers, body) end
local function gz(path) local f = io.open(path, "rb"); local b = f:read("*all"); f:close(); return b end
"#,
    );
    // 70% JSON, 10% sendBeacon text/plain, 10% gzip, 10% invalid (400), every code in turn.
    for i in 0..CODES {
        let body = click_body(i);
        match i % 10 {
            0..=6 => writeln!(lua, "add(json, '{body}')"),
            7 => writeln!(lua, "add(beacon, '{body}')"),
            8 => {
                let gz = dir.join(format!("click{}.gz", i % 100));
                if !gz.exists() {
                    std::fs::write(&gz, gzip(body.as_bytes())).expect("write");
                }
                writeln!(lua, "add(gzipped, gz(\"{}\"))", gz.display())
            }
            _ => writeln!(lua, "add(json, '{{\"code\":\"nope\"}}')"),
        }
        .expect("lua");
    }
    lua.push_str("local i = 0\nrequest = function() i = i + 1; return reqs[(i % #reqs) + 1] end\n");
    let path = dir.join("mix.lua");
    std::fs::write(&path, lua).expect("write");
    // The latency runs' bodies, one per line: a valid JSON click for every code in turn.
    let lines: String = (0..CODES).map(|i| click_body(i) + "\n").collect();
    std::fs::write(dir.join("valid.jsonl"), lines).expect("write");
    path
}

/// The benchmark catalogue: the docs page's six plans with every figure × 1000, so the
/// load passes while the limiter does all its work (leases, counters, give-backs).
fn bench_catalogue() -> PathBuf {
    let mut cat: serde_json::Value =
        serde_json::from_slice(shared::plans::BUILTIN_JSON).expect("catalogue");
    for plan in cat["plans"].as_array_mut().expect("plans") {
        for field in [
            "included_credits_month",
            "daily_cap",
            "rate_limit_per_minute",
        ] {
            if let Some(v) = plan[field].as_u64() {
                plan[field] = (v * 1000).into();
            }
        }
    }
    write_catalogue(&cat)
}

/// 2,000 accounts on the six plans in turn, 5 codes each.
async fn bench_registry(brokers: &str, registry: &RegistryTopics) {
    use shared::registry::{AccountRecord, AccountStatus, CodeRecord, CodeStatus};
    registry.create(brokers).await;
    let plans = ["free", "starter", "growth", "pro", "business", "enterprise"];
    let accounts: Vec<(String, Vec<u8>)> = (0..ACCOUNTS)
        .map(|a| {
            let record =
                AccountRecord::new(plans[a % plans.len()], a % 2 == 0, AccountStatus::Active);
            (format!("acct_{a:05}"), record.encode())
        })
        .collect();
    let messages: Vec<(Option<&str>, &[u8])> = accounts
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(brokers, &registry.accounts, &messages).await;
    let codes: Vec<(String, Vec<u8>)> = (0..CODES)
        .map(|i| {
            let record = CodeRecord::new(&format!("acct_{:05}", i % ACCOUNTS), CodeStatus::Active);
            (bench_code(i), record.encode())
        })
        .collect();
    let messages: Vec<(Option<&str>, &[u8])> = codes
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(brokers, &registry.codes, &messages).await;
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// wrk max throughput: (requests/s, requests, non-2xx).
fn wrk(url: &str, script: &Path, secs: u32) -> (f64, f64, f64) {
    wrk_on(url, script, secs, 2, 256)
}

/// [`wrk`] with `threads` threads and `connections` connections.
fn wrk_on(url: &str, script: &Path, secs: u32, threads: u32, connections: u32) -> (f64, f64, f64) {
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let grab = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let total = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (
        grab("Requests/sec:"),
        total,
        grab("Non-2xx or 3xx responses:"),
    )
}

/// oha at a fixed rate, one body per request from the lines of `body` in turn: (p50, p99,
/// p99.9) in ms, and the share answered 2xx.
/// The `origin` labels of the lease calls metric.
const ORIGINS: [&str; 4] = ["click_waits", "click_ahead", "sweep_ahead", "sweep_owed"];

/// Lease calls so far at a /metrics URL, per [`ORIGINS`] entry.
async fn calls_by_origin(metrics: &str) -> [f64; ORIGINS.len()] {
    let mut calls = [0.0; ORIGINS.len()];
    for (n, o) in calls.iter_mut().zip(ORIGINS) {
        *n = metric_where(metrics, m::LIMITS_LEASES_TOTAL, &format!(r#"origin="{o}""#)).await;
    }
    calls
}

/// "click_waits 12/s, ...": lease calls per second of `secs`, per [`ORIGINS`] entry.
fn per_second_by_origin(calls: &[f64; ORIGINS.len()], secs: f64) -> String {
    let rates: Vec<String> = ORIGINS
        .iter()
        .zip(calls)
        .map(|(o, n)| format!("{o} {:.0}/s", n / secs.max(1e-3)))
        .collect();
    rates.join(", ")
}

/// Seconds of load before a latency run is measured.
const WARM_UP_SECS: u32 = 3;
/// Seconds of a measured latency run.
const LATENCY_SECS: u32 = 10;

fn oha(url: &str, body: &Path, rate: f64, secs: u32) -> (f64, f64, f64, f64) {
    let out = Command::new("oha")
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
            "-c",
            "256",
        ])
        .args([
            "-z",
            &format!("{secs}s"),
            "-q",
            &format!("{rate:.0}"),
            "-m",
            "POST",
            "-T",
            "application/json",
            "-Z",
        ])
        .arg(body)
        .arg(url)
        .output()
        .expect("oha (cargo install oha)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let p = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let count = |ok: bool| -> f64 {
        codes
            .iter()
            .filter(|(c, _)| c.starts_with('2') == ok)
            .filter_map(|(_, n)| n.as_f64())
            .sum()
    };
    let errors: f64 = v["errorDistribution"]
        .as_object()
        .map_or(0.0, |e| e.values().filter_map(|n| n.as_f64()).sum());
    let (ok, other) = (count(true), count(false) + errors);
    (p("p50"), p("p99"), p("p99.9"), ok / (ok + other).max(1.0))
}

fn release_env() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    std::env::set_var("E2E_BIN_DIR", dir);
}

async fn private_broker(memory: bool) -> (PrivateBroker, String) {
    let addr = free_addr();
    let broker = PrivateBroker::start_with(addr, addr, memory).await;
    let brokers = broker.brokers();
    (broker, brokers)
}

fn unlimited() -> Vec<(String, String)> {
    vec![
        ("INGEST_RATE_LIMIT_PER_MINUTE".into(), "1000000000".into()),
        ("INGEST_RATE_LIMIT_BURST".into(), "1000000000".into()),
        ("LOG_LEVEL".into(), "warn".into()),
    ]
}

async fn start_ingest(
    brokers: &str,
    registry: &RegistryTopics,
    catalogue: &Path,
    limits: &str,
) -> Ingest {
    let mut opts = IngestOptions::new(brokers, "referral_clicks");
    opts.registry = registry.clone();
    opts.extra_env = unlimited();
    opts.extra_env.extend([
        ("INGEST_PLANS_FILE".into(), catalogue.display().to_string()),
        ("INGEST_PLAN_LIMITS".into(), limits.into()),
    ]);
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    ingest
}

/// Alternating ingest rounds (`BENCH_ROUNDS`, default 5; at least 3 for a median the
/// targets accept): the machine's noise moves single 10 s runs by ±20 %.
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(5)
}

/// The wait of the bare hyper that stands in for an acknowledgement (ingest's median
/// produce latency under the wrk load is 3-5 ms here).
const ACK_LIKE_WAIT_MS: u64 = 3;

/// `bench_bare_hyper` on a free port, answering after `wait_ms` if given.
async fn start_bare_hyper(wait_ms: Option<u64>) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let mut cmd = Command::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/bench_bare_hyper"),
    );
    cmd.arg(addr.to_string());
    if let Some(ms) = wait_ms {
        cmd.arg(ms.to_string());
    }
    let proc = Proc::spawn("bare_hyper", cmd);
    eventually("bare hyper", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    (proc, addr)
}

async fn bench_ingest(dir: &Path, script: &Path) {
    println!("\n## ingest (tansu on memory storage; wrk -t2 -c256, 70% JSON / 10% text/plain / 10% gzip / 10% invalid, 10,000 codes of 2,000 accounts on mixed plans; plan limits through the real Redis)\n");
    let (broker, brokers) = private_broker(true).await;
    let broker_pid = broker.pid();
    create_topic(&brokers, "referral_clicks", 8).await;
    let registry = RegistryTopics::for_topic("referral_clicks");
    bench_registry(&brokers, &registry).await;
    let catalogue = bench_catalogue();
    let on = start_ingest(&brokers, &registry, &catalogue, "on").await;
    let off = start_ingest(&brokers, &registry, &catalogue, "off").await;
    let (bare, bare_addr) = start_bare_hyper(None).await;
    // The floor for a server that answers only after an acknowledgement: the same HTTP
    // work, each answer after a wait of about ingest's own at full load, so its
    // connections sit idle between request and answer as ingest's do.
    let (waiting, waiting_addr) = start_bare_hyper(Some(ACK_LIKE_WAIT_MS)).await;
    let waiting_url = format!("http://{waiting_addr}/api/v1/referrals/click");
    let bare_url = format!("http://{bare_addr}/api/v1/referrals/click");
    let (on_url, off_url) = (
        on.url("/api/v1/referrals/click"),
        off.url("/api/v1/referrals/click"),
    );
    let pid = on.proc.child.id();
    for url in [&on_url, &bare_url, &off_url, &waiting_url] {
        wrk(url, script, 3); // warm-up
    }
    // BENCH_PERF=DIR: CPU profiles of ingest with limits on and off under the same load, in
    // DIR/ingest-on.perf and DIR/ingest-off.perf (`perf report -i DIR/ingest-on.perf`).
    if let Ok(out) = std::env::var("BENCH_PERF") {
        for (name, url, pid) in [("on", &on_url, pid), ("off", &off_url, off.proc.child.id())] {
            let mut perf = Command::new("perf")
                .args(["record", "-F", "997", "-g", "-o"])
                .arg(Path::new(&out).join(format!("ingest-{name}.perf")))
                .args(["-p", &pid.to_string(), "--", "sleep", "10"])
                .spawn()
                .expect("perf (apt-get install linux-perf)");
            wrk(url, script, 10);
            let _ = perf.wait();
        }
        // Where the time goes besides our code: system calls and context switches per
        // request of each server under the same load.
        println!("| server | requests/s | syscalls / request | context switches / request | CPU ms / 1,000 requests |\n|---|---|---|---|---|");
        for (name, url, pid) in [
            ("ingest, limits on", &on_url, pid),
            ("ingest, limits off", &off_url, off.proc.child.id()),
            ("bare hyper", &bare_url, bare.child.id()),
        ] {
            let stat = Command::new("perf")
                .args([
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    "raw_syscalls:sys_enter,context-switches,task-clock",
                ])
                .args(["-p", &pid.to_string(), "--", "sleep", "10"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("perf (apt-get install linux-perf)");
            let (rps, n, _) = wrk(url, script, 10);
            let text = stat
                .wait_with_output()
                .map(|o| o.stderr)
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let count = |event: &str| {
                text.lines()
                    .find(|l| l.contains(event))
                    .and_then(|l| l.split(',').next())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let n = n.max(1.0);
            println!(
                "| {name} | {rps:.0} | {:.1} | {:.2} | {:.1} |",
                count("raw_syscalls:sys_enter") / n,
                count("context-switches") / n,
                count("task-clock") / n * 1000.0
            );
        }
        println!();
    }
    // Alternating runs (limits on, limits off, bare hyper) x rounds: this machine is noisy, and
    // the on/off pair, the ratio nearest its target, runs back to back.
    let (mut on_rps, mut bare_rps, mut off_rps, mut ratios, mut costs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cpu, mut accepted, mut total) = (0.0, 0.0, 0.0);
    let (mut off_cpu, mut off_accepted) = (0.0, 0.0);
    let (mut bare_cpu, mut bare_answered) = (0.0, 0.0);
    let (mut waiting_rps, mut waiting_cpu, mut waiting_answered) = (Vec::new(), 0.0, 0.0);
    let mut broker_cpu = 0.0;
    // Redis' own CPU and the lease calls behind the limits-on runs: the cost of the
    // limits that ingest's CPU figure does not show (Redis shares the machine's cores).
    let redis_pid: Option<u32> = std::env::var("BENCH_REDIS_PID")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let (mut redis_cpu, mut leases, mut pipelines, mut on_secs) = (0.0, 0.0, 0.0, 0.0);
    let mut by_origin = [0.0; ORIGINS.len()];
    let on_metrics = on.url("/metrics");
    let off_pid = off.proc.child.id();
    println!("| run | limits on | limits off | bare hyper | on / bare | on / off |\n|---|---|---|---|---|---|");
    let rounds = rounds();
    for run in 1..=rounds {
        let (cpu0, redis0) = (cpu_secs(pid), redis_pid.map_or(0.0, cpu_secs));
        let leases0 = metric_value(&on_metrics, m::LIMITS_LEASES_TOTAL).await;
        let origins0 = calls_by_origin(&on_metrics).await;
        let pipelines0 = metric_value(&on_metrics, m::LIMITS_LEASE_PIPELINES_TOTAL).await;
        let broker0 = broker_pid.map_or(0.0, cpu_secs);
        let t0 = Instant::now();
        let (rps, n, non2xx) = wrk(&on_url, script, 10);
        on_secs += t0.elapsed().as_secs_f64();
        broker_cpu += broker_pid.map_or(0.0, cpu_secs) - broker0;
        cpu += cpu_secs(pid) - cpu0;
        redis_cpu += redis_pid.map_or(0.0, cpu_secs) - redis0;
        leases += metric_value(&on_metrics, m::LIMITS_LEASES_TOTAL).await - leases0;
        let origins = calls_by_origin(&on_metrics).await;
        for (total, (n1, n0)) in by_origin.iter_mut().zip(origins.iter().zip(&origins0)) {
            *total += n1 - n0;
        }
        pipelines += metric_value(&on_metrics, m::LIMITS_LEASE_PIPELINES_TOTAL).await - pipelines0;
        accepted += n - non2xx;
        total += n;
        let off_cpu0 = cpu_secs(off_pid);
        let (o, off_n, off_non2xx) = wrk(&off_url, script, 10);
        off_cpu += cpu_secs(off_pid) - off_cpu0;
        off_accepted += off_n - off_non2xx;
        let bare_cpu0 = cpu_secs(bare.child.id());
        let (b, bare_n, _) = wrk(&bare_url, script, 10);
        bare_cpu += cpu_secs(bare.child.id()) - bare_cpu0;
        bare_answered += bare_n;
        let waiting_cpu0 = cpu_secs(waiting.child.id());
        let (w, waiting_n, _) = wrk(&waiting_url, script, 10);
        waiting_cpu += cpu_secs(waiting.child.id()) - waiting_cpu0;
        waiting_answered += waiting_n;
        waiting_rps.push(w);
        println!(
            "| {run} | {rps:.0} req/s | {o:.0} req/s | {b:.0} req/s | {:.2} | {:.2} |",
            rps / b,
            rps / o
        );
        on_rps.push(rps);
        bare_rps.push(b);
        off_rps.push(o);
        ratios.push(rps / b);
        costs.push(rps / o);
    }
    let max = median(&mut on_rps);
    println!("\n| figure | value | target |\n|---|---|---|");
    println!("| ingest max with plan limits on (median of {rounds}) | {max:.0} req/s ({:.1} % of requests accepted) | |", accepted / total * 100.0);
    println!(
        "| bare hyper 1.x ceiling, same load (median of {rounds}) | {:.0} req/s | |",
        median(&mut bare_rps)
    );
    println!(
        "| ingest max with plan limits off (median of {rounds}) | {:.0} req/s | |",
        median(&mut off_rps)
    );
    println!(
        "| **ingest (limits on) / ceiling**, median of the {rounds} same-run ratios | **{:.2}** | ≥ 0.5 |",
        median(&mut ratios)
    );
    println!(
        "| **limits on / limits off**, median of the {rounds} same-run ratios | **{:.2}** | ≥ 0.9 |",
        median(&mut costs)
    );
    println!(
        "| ingest CPU-seconds per million accepted clicks, limits on / off | {:.1} s / {:.1} s | ≤ 15 |",
        cpu / accepted.max(1.0) * 1e6,
        off_cpu / off_accepted.max(1.0) * 1e6
    );
    // The floor under that figure on this machine: what the same requests cost a server
    // that only reads them and answers (HTTP parsing and the loopback TCP stack).
    println!(
        "| bare hyper CPU-seconds per million answered requests, same load | {:.1} s | |",
        bare_cpu / bare_answered.max(1.0) * 1e6
    );
    println!(
        "| bare hyper answering after a {ACK_LIKE_WAIT_MS} ms wait (as if for an ack), same load: requests/s (median of {rounds}); CPU-seconds per million answered requests (the floor for a server that waits for its broker) | {:.0} req/s ({:.2} of the ceiling); {:.1} s | |",
        median(&mut waiting_rps),
        median(&mut waiting_rps) / median(&mut bare_rps).max(1.0),
        waiting_cpu / waiting_answered.max(1.0) * 1e6
    );
    println!(
        "| broker (tansu) CPU-seconds per million accepted clicks, limits on | {:.1} s | |",
        broker_cpu / accepted.max(1.0) * 1e6
    );
    if redis_pid.is_some() {
        println!(
            "| Redis CPU-seconds per million accepted clicks (limits on); lease calls; round trips | {:.1} s; {:.0} calls/s ({:.1} clicks a call); {:.0} pipelines/s ({:.1} calls each) | |",
            redis_cpu / accepted.max(1.0) * 1e6,
            leases / on_secs.max(1e-3),
            accepted / leases.max(1.0),
            pipelines / on_secs.max(1e-3),
            leases / pipelines.max(1.0)
        );
        println!(
            "| lease calls by origin (limits on) | {} | |",
            per_second_by_origin(&by_origin, on_secs)
        );
        // The machine is CPU-bound (load generator, ingest, broker and Redis on 2 cores), so
        // CPU per click is what limits cost in throughput, without the runs' noise.
        let on_cost = (cpu + redis_cpu) / accepted.max(1.0);
        let off_cost = off_cpu / off_accepted.max(1.0);
        println!(
            "| **CPU per accepted click, limits on (ingest + Redis) / limits off (ingest)** | **{:.2}** | ≤ 1.10 |",
            on_cost / off_cost.max(1e-12)
        );
    }
    if std::env::var("BENCH_LATENCY").is_ok_and(|v| v == "0") {
        return;
    }
    let valid = dir.join("valid.jsonl");
    // Limits off at the same rates, in the order on, off, off, on (what the limits add to
    // latency, with the drift of the machine cancelled); clicks that waited out the lease
    // budget are counted.
    let wait_count = format!("{}_count", m::LIMITS_LEASE_WAIT);
    let wait_sum = format!("{}_sum", m::LIMITS_LEASE_WAIT);
    let reasons = ["first", "spent", "expired"];
    let waits = || async {
        let mut v = Vec::new();
        for reason in reasons {
            let label = format!(r#"reason="{reason}""#);
            v.push((
                metric_where(&on_metrics, &wait_count, &label).await,
                metric_where(&on_metrics, &wait_sum, &label).await,
            ));
        }
        v
    };
    let waited_out = || {
        metric_where(
            &on_metrics,
            m::LIMITS_LOCAL_DECISIONS_TOTAL,
            r#"cause="wait_budget""#,
        )
    };
    for share in [0.5, 0.9] {
        let rate = max * share;
        let mut waited = 0.0;
        let mut by_reason = vec![(0.0, 0.0); reasons.len()];
        let mut calls = [0.0; ORIGINS.len()];
        for (limits, url) in [
            ("on", &on_url),
            ("off", &off_url),
            ("off", &off_url),
            ("on", &on_url),
        ] {
            // Steady state: 3 s at the rate first (the instance sat idle during the other
            // runs, and every account's first click after a pause waits for a lease).
            oha(url, &valid, rate, WARM_UP_SECS);
            let (waited0, waits0) = (waited_out().await, waits().await);
            let origins0 = calls_by_origin(&on_metrics).await;
            let (p50, p99, p999, ok) = oha(url, &valid, rate, LATENCY_SECS);
            println!(
                "| latency at {:.0}% of max, limits {limits} ({rate:.0} req/s, valid JSON clicks over the 10,000 codes, oha with latency correction, after {WARM_UP_SECS} s at that rate) | p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, {:.1} % answered 2xx | p99 ≤ 10 ms at 50 % |",
                share * 100.0,
                ok * 100.0
            );
            if limits == "on" {
                waited += waited_out().await - waited0;
                let origins = calls_by_origin(&on_metrics).await;
                for (total, (n1, n0)) in calls.iter_mut().zip(origins.iter().zip(&origins0)) {
                    *total += n1 - n0;
                }
                for (acc, ((n1, s1), (n0, s0))) in
                    by_reason.iter_mut().zip(waits().await.iter().zip(&waits0))
                {
                    acc.0 += n1 - n0;
                    acc.1 += s1 - s0;
                }
            }
        }
        println!("| clicks that waited out the lease budget in the two limits-on runs at {:.0}% | {waited:.0} | |", share * 100.0);
        let sent = 2.0 * rate * f64::from(LATENCY_SECS);
        let by_reason: Vec<String> = reasons
            .iter()
            .zip(&by_reason)
            .map(|(reason, (n, sum))| {
                format!(
                    "{reason} {n:.0} ({:.2} % of clicks, mean {:.1} ms)",
                    n / sent * 100.0,
                    sum / n.max(1.0) * 1e3
                )
            })
            .collect();
        println!(
            "| clicks that waited for a lease in the two limits-on runs at {:.0}%, by why the lease had no token | {} | |",
            share * 100.0,
            by_reason.join("; ")
        );
        println!(
            "| lease calls by origin in the two limits-on runs at {:.0}% ({:.0} clicks/s) | {} | |",
            share * 100.0,
            rate,
            per_second_by_origin(&calls, 2.0 * f64::from(LATENCY_SECS))
        );
    }
    println!(
        "| ingest peak RSS (limits on, after all runs; 10,000 codes) | {:.1} MiB | ≤ 64 MiB + registry |",
        peak_rss_mib(pid)
    );
    drop(on);
    drop(off);

    // Durable storage, for the record.
    let (_broker, brokers) = private_broker(false).await;
    create_topic(&brokers, "referral_clicks", 8).await;
    bench_registry(&brokers, &registry).await;
    let ingest = start_ingest(&brokers, &registry, &catalogue, "on").await;
    let (drps, _, _) = wrk(&ingest.url("/api/v1/referrals/click"), script, 10);
    println!(
        "| ingest max with tansu on sqlite (durable) storage, limits on | {drps:.0} req/s | |"
    );
}

/// `bench_pipeline hold`: the ingest benchmark's setup (tansu on memory storage, the
/// registry, the catalogue, the wrk mix) without the runs, for profiling by hand. Writes
/// `DIR/ingest.env` (the environment of the benchmark's ingest, limits on) and prints how
/// to use it; holds until killed.
async fn hold_ingest_setup(dir: &Path, script: &Path) {
    let (broker, brokers) = private_broker(true).await;
    create_topic(&brokers, "referral_clicks", 8).await;
    let registry = RegistryTopics::for_topic("referral_clicks");
    bench_registry(&brokers, &registry).await;
    let catalogue = bench_catalogue();
    let mut env: Vec<(String, String)> = vec![
        ("INGEST_KAFKA_BROKERS".into(), brokers.clone()),
        ("INGEST_KAFKA_TOPIC".into(), "referral_clicks".into()),
        ("INGEST_ACCOUNTS_TOPIC".into(), registry.accounts.clone()),
        ("INGEST_CODES_TOPIC".into(), registry.codes.clone()),
        ("INGEST_REFUSALS_TOPIC".into(), registry.refusals.clone()),
        ("INGEST_KEYS_TOPIC".into(), registry.keys.clone()),
        (
            "INGEST_CONVERSIONS_TOPIC".into(),
            registry.conversions.clone(),
        ),
        ("INGEST_PLANS_FILE".into(), catalogue.display().to_string()),
        ("INGEST_REDIS_URL".into(), redis_url()),
        ("INGEST_REDIS_PREFIX".into(), format!("{}:", unique("hold"))),
        ("INGEST_REGISTRY_CLICKHOUSE_URL".into(), String::new()),
        (
            "INGEST_RATE_LIMIT_NETWORK_PER_MINUTE".into(),
            "1000000000".into(),
        ),
        (
            "INGEST_RATE_LIMIT_NETWORK_BURST".into(),
            "1000000000".into(),
        ),
        ("INGEST_HASH_KEY".into(), HASH_KEY.into()),
        ("INGEST_HASH_KEY_ID".into(), "e2e1".into()),
        ("INGEST_PLAN_LIMITS".into(), "on".into()),
    ];
    env.extend(unlimited());
    let text: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    let file = dir.join("ingest.env");
    std::fs::write(&file, text).expect("write");
    println!(
        "broker {brokers} (tansu, memory storage, pid {:?})",
        broker.pid()
    );
    println!("ingest environment: source {}", file.display());
    println!(
        "wrk mix: wrk -t2 -c256 -d10s -s {} http://ADDR/api/v1/referrals/click",
        script.display()
    );
    println!(
        "valid clicks for oha: {}",
        dir.join("valid.jsonl").display()
    );
    println!("holding; Ctrl-C to stop");
    let _ = tokio::signal::ctrl_c().await;
}

fn event(i: u64) -> Vec<u8> {
    sample_event(
        &random_click_id(),
        &format!("C{:011}", i % 5000),
        &format!("/p/{}", i % 200),
        i % 20 == 0,
    )
}

async fn bench_consumer(rows: u64) {
    println!("\n## consumer ({rows} events pre-filled, tansu on memory storage, default batch settings, buffer above the backlog)\n");
    let (_broker, brokers) = private_broker(true).await;
    let topic = unique("bench_clicks");
    create_topic(&brokers, &topic, 8).await;
    create_topic(&brokers, &format!("{topic}_dlq"), 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..rows {
        let payload = event(i);
        let key = format!("k{i}");
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                // Queue full: wait for what is in flight, then try again.
                Err(_) => {
                    futures::future::join_all(pending.drain(..)).await;
                }
            }
        }
        if pending.len() >= 50_000 {
            futures::future::join_all(pending.drain(..)).await;
        }
    }
    futures::future::join_all(pending).await;
    eprintln!(
        "pre-filled {rows} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let url = clickhouse_url();
    let ch = ClickHouse::new(&url);
    let cli = <consumer::config::Cli as clap::Parser>::try_parse_from([
        "consumer",
        "--clickhouse-url",
        &url,
    ])
    .expect("cli");
    let migrated = |db: String| {
        let cli = &cli;
        async move {
            let _ = ch_drop(&ClickHouse::new(&clickhouse_url()), &db).await;
            consumer::migrations::apply(
                &consumer::writer::base_client(&cli.config),
                &db,
                "referral_clicks",
            )
            .await
            .expect("migrate");
            db
        }
    };
    // BENCH_BASELINE_BIN: another consumer binary (the previous release's), run in the same
    // rounds as ours, alternating, so a regression shows as a ratio in the run that makes it.
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok().map(PathBuf::from);
    let mut baseline_rows: Vec<(f64, f64, f64, f64)> = Vec::new();
    // A conversions stream beside the clicks: 1 conversion for every 100 clicks, pre-filled
    // in a topic of its own; the clicks-only runs read an empty one.
    let no_conversions = format!("{topic}_noconv");
    let conversions_topic = format!("{topic}_conv");
    create_topic(&brokers, &no_conversions, 2).await;
    create_topic(&brokers, &conversions_topic, 2).await;
    prefill_conversions(&brokers, &conversions_topic, rows / 100).await;
    let mut beside_rows: Vec<(f64, f64, f64)> = Vec::new();
    let (mut ratios, mut peer_ratios) = (Vec::new(), Vec::new());
    let (mut consumer_rates, mut consume_rates, mut insert_rates, mut peer_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rss, mut cpu_per_m) = (0.0f64, Vec::new());
    println!("| round | raw consume | raw insert | consumer (first → last row; from start) | Kafka engine peer (first → last row; stored) | consumer / min(ceilings) | consumer / peer |\n|---|---|---|---|---|---|---|");
    for round in 1..=3 {
        // Ceiling 1: raw consume of the topic (what kcat -o beginning > /dev/null measures).
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("raw"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        reader.subscribe(&[&topic]).expect("subscribe");
        let mut events = Vec::with_capacity(rows as usize);
        let mut started = None;
        while (events.len() as u64) < rows
            && started.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(300))
        {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
                started.get_or_insert_with(Instant::now);
                events.push((
                    m.partition(),
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                ));
            }
        }
        let consume_rate = events.len() as f64 / started.map_or(1.0, |t| t.elapsed().as_secs_f64());
        drop(reader);

        // Ceiling 2: raw RowBinary insert of the same rows, same batch size, same table shape.
        let insert_db = migrated(unique("bench_insert")).await;
        let writer = consumer::writer::Writer::new(&{
            let mut c = cli.config.clone();
            c.clickhouse_database = insert_db.clone();
            c
        });
        let rows_vec: Vec<consumer::row::ClickRow> = events
            .iter()
            .filter_map(|(p, o, payload)| consumer::row::from_message(payload, &topic, *p, *o).ok())
            .collect();
        let started = Instant::now();
        for (i, chunk) in rows_vec.chunks(50_000).enumerate() {
            writer
                .insert_plan(chunk.iter(), &format!("bench-{insert_db}-{i}"))
                .await
                .expect("insert");
        }
        let insert_rate = rows_vec.len() as f64 / started.elapsed().as_secs_f64();
        drop(rows_vec);
        drop(events);
        let _ = ch_drop(&ch, &insert_db).await;

        // The consumer itself (its database migrated beforehand, as in production), then
        // the baseline binary, then ours with a conversions stream beside the clicks.
        let run = |binary: PathBuf, conversions: String| {
            let (topic, brokers, url) = (&topic, &brokers, &url);
            async move {
                let database = migrated(unique("bench_consumer")).await;
                let mut registry = RegistryTopics::for_topic(topic);
                registry.conversions = conversions;
                registry.create(brokers).await;
                let opts = ConsumerOptions {
                    brokers: brokers.clone(),
                    topic: topic.clone(),
                    registry,
                    group: unique("bench_group"),
                    clickhouse_url: url.clone(),
                    database: database.clone(),
                    // The whole backlog may be in hand: fetching never pauses. tansu's memory
                    // storage cannot answer a fetch from inside a record batch (it skips to
                    // the next batch), which is where a resumed partition fetches from; the
                    // durable storage can (`a_full_buffer_pauses_fetching_and_skips_no_message`).
                    // So peak RSS below includes up to the whole backlog.
                    extra_env: vec![
                        ("LOG_LEVEL".into(), consumer_log_level()),
                        (
                            "CONSUMER_MAX_BUFFERED_ROWS".into(),
                            (rows + 1).max(200_000).to_string(),
                        ),
                    ],
                };
                let started = Instant::now();
                let consumer = ConsumerProc::start_binary(binary, &opts);
                let pid = consumer.proc.child.id();
                let fill = fill_rate(
                    &ch_of(url),
                    &format!("{database}.referral_clicks"),
                    rows,
                    started,
                )
                .await;
                let cpu = cpu_secs(pid) / rows as f64 * 1e6;
                let rss = peak_rss_mib(pid);
                let (count, uniq) = ch_of(url)
                    .counts(&format!("{database}.referral_clicks"))
                    .await;
                assert_eq!(
                    (count, uniq),
                    (rows, rows),
                    "the consumer wrote every event once"
                );
                drop(consumer);
                let _ = ch_drop(&ch_of(url), &database).await;
                (fill, cpu, rss)
            }
        };
        let (fill, cpu, peak) = run(bin("consumer"), no_conversions.clone()).await;
        cpu_per_m.push(cpu);
        rss = rss.max(peak);
        if let Some(base) = &baseline {
            let (base_fill, base_cpu, _) = run(base.clone(), no_conversions.clone()).await;
            baseline_rows.push((fill.steady, base_fill.steady, cpu, base_cpu));
        }
        let (beside, beside_cpu, _) = run(bin("consumer"), conversions_topic.clone()).await;
        beside_rows.push((fill.steady, beside.steady, beside_cpu));

        // The peer: ClickHouse's own Kafka table engine + a materialized view reading the
        // same topic into the same table with the same views (the migrations).
        let peer_db = migrated(unique("bench_peer")).await;
        let peer = kafka_engine_peer(&ch, &brokers, &topic, &peer_db, rows).await;
        let _ = ch_drop(&ch, &peer_db).await;

        let ceiling = consume_rate.min(insert_rate);
        let ratio = fill.steady / ceiling;
        let (peer_cell, peer_ratio) = match &peer {
            Ok(p) => (
                format!("{:.0} rows/s ({} of {rows})", p.steady, p.stored),
                Some(fill.steady / p.steady),
            ),
            Err(why) => (format!("not comparable: {why}"), None),
        };
        println!(
            "| {round} | {consume_rate:.0} msg/s | {insert_rate:.0} rows/s | {:.0} rows/s; {:.0} rows/s | {peer_cell} | {ratio:.2} | {} |",
            fill.steady,
            fill.from_start,
            peer_ratio.map_or("–".into(), |r| format!("{r:.2}"))
        );
        consumer_rates.push(fill.steady);
        consume_rates.push(consume_rate);
        insert_rates.push(insert_rate);
        ratios.push(ratio);
        if let (Ok(p), Some(r)) = (peer, peer_ratio) {
            peer_rates.push(p.steady);
            peer_ratios.push(r);
        }
    }
    println!("\n| figure | value | target |\n|---|---|---|");
    println!(
        "| consumer, topic → ClickHouse (median of 3) | {:.0} rows/s | |",
        median(&mut consumer_rates)
    );
    println!(
        "| ceilings: raw consume / raw insert (medians) | {:.0} msg/s / {:.0} rows/s | |",
        median(&mut consume_rates),
        median(&mut insert_rates)
    );
    println!(
        "| **consumer / min(ceilings)**, median of the 3 same-round ratios | **{:.2}** | ≥ 0.9 |",
        median(&mut ratios)
    );
    if !peer_ratios.is_empty() {
        println!(
            "| peer: ClickHouse {} Kafka engine + MV ({PEER_SETTINGS}), median | {:.0} rows/s | |",
            ch.query("SELECT version() FORMAT TSV").await.trim(),
            median(&mut peer_rates)
        );
        println!(
            "| **consumer / peer**, median of the same-round ratios | **{:.2}** | ≥ 2 |",
            median(&mut peer_ratios)
        );
    }
    println!(
        "| consumer peak RSS / CPU-seconds per million rows (median) | {rss:.1} MiB / {:.1} s | ≤ 4 s |",
        median(&mut cpu_per_m)
    );
    let mut beside_ratio: Vec<f64> = beside_rows
        .iter()
        .map(|(alone, with, _)| with / alone)
        .collect();
    println!(
        "| clicks with a conversions stream beside them (1 per 100 clicks) / clicks alone, median of the same-round ratios | **{:.2}** ({:.0} vs {:.0} rows/s; {:.1} CPU-s per M clicks) | ≥ 0.90 |",
        median(&mut beside_ratio),
        median(&mut beside_rows.iter().map(|r| r.1).collect::<Vec<_>>()),
        median(&mut beside_rows.iter().map(|r| r.0).collect::<Vec<_>>()),
        median(&mut beside_rows.iter().map(|r| r.2).collect::<Vec<_>>()),
    );
    if let Some(base) = &baseline {
        println!("\n| round | this build | baseline ({}) | this / baseline | CPU-s per M: this / baseline |\n|---|---|---|---|---|", base.display());
        for (i, (ours, theirs, cpu, base_cpu)) in baseline_rows.iter().enumerate() {
            println!(
                "| {} | {ours:.0} rows/s | {theirs:.0} rows/s | {:.2} | {cpu:.1} / {base_cpu:.1} |",
                i + 1,
                ours / theirs
            );
        }
        let mut r: Vec<f64> = baseline_rows.iter().map(|(a, b, _, _)| a / b).collect();
        println!(
            "\n**this build / baseline, median of the same-round ratios: {:.2}**",
            median(&mut r)
        );
    }
}

/// `n` conversion events (sales of random customers) in `topic`, as ingest publishes them.
async fn prefill_conversions(brokers: &str, topic: &str, n: u64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let now = shared::now_ms();
    let sends = (0..n).map(|i| {
        let event = shared::conversion::ConversionEvent {
            v: 1,
            kind: shared::conversion::ConversionType::Sale,
            event_id: format!("inv_{i}"),
            customer_hash: format!("{:064x}", rand::random::<u128>()),
            key_id: "k1".into(),
            click_id: random_click_id(),
            amount: 4900,
            currency: "EUR".into(),
            occurred_at_ms: now,
            received_at_ms: now,
            account_id: format!("acct_{}", i % 100),
            api_key_id: "key_0123456789abcdef".into(),
        };
        let (key, payload) = (event.dedup_id(), event.encode());
        let producer = &producer;
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .expect("conversion produced");
        }
    });
    futures::future::join_all(sends).await;
}

fn ch_of(url: &str) -> ClickHouse {
    ClickHouse::new(url)
}

/// The consumer's log level in the benchmarks: `warn`, or `BENCH_CONSUMER_LOG` (the log is
/// the file `ConsumerProc` names on its start line).
fn consumer_log_level() -> String {
    std::env::var("BENCH_CONSUMER_LOG").unwrap_or_else(|_| "warn".into())
}

async fn ch_drop(ch: &ClickHouse, db: &str) -> Result<String, String> {
    ch.try_query(&format!("DROP DATABASE IF EXISTS {db} SYNC"))
        .await
}

/// How fast a table filled with `rows`: from its first row to its last (the steady rate),
/// and from `started` (start-up included).
struct Fill {
    steady: f64,
    from_start: f64,
}

async fn fill_rate(ch: &ClickHouse, table: &str, rows: u64, started: Instant) -> Fill {
    let (mut first, mut last, mut got) = (None::<(Instant, u64)>, started, 0);
    while got < rows && started.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = ch.count(table).await;
        if now > got {
            got = now;
            last = Instant::now();
            first.get_or_insert((last, now));
        }
    }
    let (t0, n0) = first.unwrap_or((started, 0));
    let span = last.duration_since(t0).as_secs_f64().max(1e-3);
    Fill {
        // The first observation's rows arrived before it: counted from it on.
        steady: (got - n0) as f64 / span,
        from_start: got as f64 / last.duration_since(started).as_secs_f64().max(1e-3),
    }
}

/// Kafka-engine settings a careful operator would choose on this machine: blocks as large
/// as our consumer's batches, a flush at least every 500 ms when traffic is low, one
/// consumer (and flushing thread) per core.
const PEER_SETTINGS: &str = "kafka_max_block_size = 50000, kafka_flush_interval_ms = 500, kafka_num_consumers = 2, kafka_thread_per_consumer = 1";

/// Rows/s of ClickHouse's Kafka engine + MV reading `rows` of `topic` into
/// `database.referral_clicks` (migrated, views included), and how many rows it stored, or
/// why it could not be measured.
struct Peer {
    steady: f64,
    stored: u64,
}

async fn kafka_engine_peer(
    ch: &ClickHouse,
    brokers: &str,
    topic: &str,
    database: &str,
    rows: u64,
) -> Result<Peer, String> {
    ch.try_query(&format!(
        "CREATE TABLE {database}.kafka_queue (v UInt16, click_id String, code String, landing_path String, \
         utm_source String, utm_medium String, utm_campaign String, ip_hash String, ua_hash String, \
         key_id String, is_bot UInt8, received_at_ms UInt64) \
         ENGINE = Kafka SETTINGS kafka_broker_list = '{brokers}', kafka_topic_list = '{topic}', \
         kafka_group_name = '{}', kafka_format = 'JSONEachRow', {PEER_SETTINGS}",
        unique("peer")
    ))
    .await
    .map_err(|e| format!("Kafka table: {}", e.lines().next().unwrap_or("")))?;
    let started = Instant::now();
    ch.try_query(&format!(
        "CREATE MATERIALIZED VIEW {database}.kafka_mv TO {database}.referral_clicks AS \
         SELECT click_id, code, landing_path, utm_source, utm_medium, utm_campaign, \
         toFixedString(unhex(ip_hash), 32) AS ip_hash, toFixedString(unhex(ua_hash), 32) AS ua_hash, \
         key_id, is_bot, toDateTime(intDiv(received_at_ms, 1000)) AS received_at, received_at_ms, \
         _topic AS kafka_topic, _partition AS kafka_partition, _offset AS kafka_offset \
         FROM {database}.kafka_queue"
    ))
    .await
    .map_err(|e| format!("view: {}", e.lines().next().unwrap_or("")))?;
    let table = format!("{database}.referral_clicks");
    // Until every row is in, or none arrived for 15 s (the engine may leave a tail behind).
    let (mut got, mut last_growth, mut first) = (0, started.elapsed(), None);
    while got < rows
        && started.elapsed() < Duration::from_secs(600)
        && started.elapsed() - last_growth < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = ch.count(&table).await;
        if now > got {
            (got, last_growth) = (now, started.elapsed());
            first.get_or_insert((last_growth, now));
        }
    }
    // Stop the engine before the database goes, so it does not hold the group.
    let _ = ch
        .try_query(&format!("DROP TABLE IF EXISTS {database}.kafka_mv"))
        .await;
    let _ = ch
        .try_query(&format!("DROP TABLE IF EXISTS {database}.kafka_queue"))
        .await;
    let (count, distinct) = ch.counts(&table).await;
    let secs = last_growth.as_secs_f64();
    eprintln!("peer: {count} rows, {distinct} distinct click ids, last row after {secs:.1} s");
    let Some((t0, n0)) = first else {
        return Err(format!(
            "read no row in {:.0} s",
            started.elapsed().as_secs_f64()
        ));
    };
    Ok(Peer {
        steady: (got - n0) as f64 / (secs - t0.as_secs_f64()).max(1e-3),
        stored: got,
    })
}

async fn bench_freshness() {
    println!("\n## freshness (tansu on sqlite, default settings, 200 clicks/s for 15 s)\n");
    let (_broker, brokers) = private_broker(false).await;
    let scope = Scope::with_brokers("bench_fresh", 8, &brokers).await;
    let mut copts = scope.consumer_options();
    copts
        .extra_env
        .push(("LOG_LEVEL".into(), consumer_log_level()));
    let consumer = ConsumerProc::start(&copts);
    let ingest = Ingest::start(&IngestOptions {
        extra_env: unlimited(),
        ..scope.ingest_options()
    });
    ingest.ready().await;
    consumer.ready().await;
    let url = ingest.url("/api/v1/referrals/click");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let sender = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let c = http();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let end = Instant::now() + Duration::from_secs(15);
            let mut tasks = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                let (c, url, acked) = (c.clone(), url.clone(), acked.clone());
                tasks.push(tokio::spawn(async move {
                    let (id, status) = post_fresh_click(&c, &url).await;
                    if status == 200 {
                        if let Ok(mut a) = acked.lock() {
                            a.push((id, Instant::now()));
                        }
                    }
                }));
            }
            futures::future::join_all(tasks).await;
        })
    };
    let mut seen: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = scope
            .ch
            .query(&format!("SELECT click_id FROM {} FORMAT TSV", scope.table))
            .await;
        let now = Instant::now();
        for id in text.lines() {
            seen.entry(id.to_owned()).or_insert(now);
        }
        let done = sender.is_finished()
            && acked
                .lock()
                .map(|a| a.iter().all(|(id, _)| seen.contains_key(id)))
                .unwrap_or(false);
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let mut lags: Vec<f64> = acked
        .iter()
        .filter_map(|(id, t)| {
            seen.get(id)
                .map(|s| s.saturating_duration_since(*t).as_secs_f64())
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!("| figure | value |\n|---|---|");
    println!(
        "| clicks answered 200 / visible in ClickHouse | {} / {} |",
        acked.len(),
        lags.len()
    );
    println!(
        "| freshness p50 (200 answer → row visible, 20 ms polling) | {:.0} ms |",
        pct(0.5) * 1e3
    );
    println!(
        "| **freshness p99** (target ≤ 1 s, issue 14) | **{:.0} ms** |",
        pct(0.99) * 1e3
    );
    // Where the time goes: one plan insert (each partition's, several at once) and the
    // flush's batch age.
    let metrics_url = consumer.url("/metrics");
    let (sum, count) = (
        metric_value(&metrics_url, &format!("{}_sum", m::INSERT_DURATION)).await,
        metric_value(&metrics_url, &format!("{}_count", m::INSERT_DURATION)).await,
    );
    println!(
        "| plan inserts; mean insert time | {count:.0}; {:.0} ms |",
        sum / count.max(1.0) * 1e3
    );
    println!(
        "| CONSUMER_BATCH_MAX_AGE_MS | {} |",
        std::env::var("CONSUMER_BATCH_MAX_AGE_MS").unwrap_or_else(|_| "default".into())
    );
    scope.drop_database().await;
}

/// The wrk script of the conversions benchmark: leads and sales (one in three) with fresh
/// event ids, a customer id of 5,000, a click id each, under one key.
fn write_conversion_mix(dir: &Path, secret: &str) -> PathBuf {
    let lua = format!(
        r#"local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {secret}"}}
local n = 0
local me = 0
function setup(thread) me = me + 1; thread:set("me", me) end
function init(args) math.randomseed(os.time() + (me or 0)) end
function request()
  n = n + 1
  local id = string.format("%d_%d_%d", me or 0, n, math.random(1000000000))
  local body
  if n % 3 == 0 then
    body = string.format('{{"type":"sale","event_id":"inv_%s","customer_id":"cust_%d@example.com","click_id":"refclk_b%s","amount":%d,"currency":"EUR"}}', id, n % 5000, id, n % 100000)
  else
    body = string.format('{{"type":"lead","event_id":"su_%s","customer_id":"cust_%d@example.com","click_id":"refclk_b%s"}}', id, n % 5000, id)
  end
  return wrk.format("POST", "/api/v1/referrals/conversions", headers, body)
end
"#
    );
    let path = dir.join("conversions.lua");
    std::fs::write(&path, lua).expect("write the conversions script");
    path
}

/// Conversions per second through ingest, alone and beside a click stream at full load,
/// and the share of ingest's CPU they take (from each kind's CPU per request measured
/// alone in the same run).
async fn bench_conversions(dir: &Path, click_script: &Path) {
    println!("\n## conversions (tansu on memory storage; ingest with plan limits off; clicks: the ingest mix, wrk -t2 -c256; conversions: wrk -t1 -c32, one key, a lead or sale with a fresh event id each)\n");
    let (_broker, brokers) = private_broker(true).await;
    create_topic(&brokers, "referral_clicks", 8).await;
    let registry = RegistryTopics::for_topic("referral_clicks");
    bench_registry(&brokers, &registry).await;
    let key = shared::keys::new_key("acct_00000", "bench").expect("key");
    produce_raw(
        &brokers,
        &registry.keys,
        &[(Some(key.id.as_str()), &key.record.encode())],
    )
    .await;
    let catalogue = bench_catalogue();
    let mut opts = IngestOptions::new(&brokers, "referral_clicks");
    opts.registry = registry.clone();
    opts.extra_env = unlimited();
    opts.extra_env.extend([
        ("INGEST_PLANS_FILE".into(), catalogue.display().to_string()),
        ("INGEST_PLAN_LIMITS".into(), "off".into()),
        ("INGEST_KEY_RATE_PER_MINUTE".into(), "1000000000".into()),
        ("INGEST_KEY_RATE_BURST".into(), "1000000000".into()),
    ]);
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    let pid = ingest.proc.child.id();
    let conversion_script = write_conversion_mix(dir, &key.secret);
    let click_url = ingest.url("/api/v1/referrals/click");
    let conversion_url = ingest.url("/api/v1/referrals/conversions");
    wrk(&click_url, click_script, 3);
    wrk_on(&conversion_url, &conversion_script, 3, 1, 32);
    let secs = 10;
    println!("| run | clicks/s | conversions/s | non-2xx conversions | ingest CPU (cores) |\n|---|---|---|---|---|");
    let (mut click_cost, mut conversion_cost) = (Vec::new(), Vec::new());
    let mut shares = Vec::new();
    for round in 1..=rounds().min(3) {
        let cpu0 = cpu_secs(pid);
        let (clicks, n_clicks, _) = wrk(&click_url, click_script, secs);
        let cpu1 = cpu_secs(pid);
        let (conversions, n_conv, bad) = wrk_on(&conversion_url, &conversion_script, secs, 1, 32);
        let cpu2 = cpu_secs(pid);
        click_cost.push((cpu1 - cpu0) / n_clicks.max(1.0));
        conversion_cost.push((cpu2 - cpu1) / n_conv.max(1.0));
        println!(
            "| {round}: clicks alone | {clicks:.0} | – | – | {:.2} |",
            (cpu1 - cpu0) / f64::from(secs)
        );
        println!(
            "| {round}: conversions alone | – | {conversions:.0} | {bad:.0} | {:.2} |",
            (cpu2 - cpu1) / f64::from(secs)
        );
        let side = {
            let (url, script) = (conversion_url.clone(), conversion_script.clone());
            std::thread::spawn(move || wrk_on(&url, &script, secs, 1, 32))
        };
        let cpu3 = cpu_secs(pid);
        let (clicks_b, n_clicks_b, _) = wrk(&click_url, click_script, secs);
        let (conversions_b, n_conv_b, bad_b) = side.join().expect("wrk thread");
        let cpu4 = cpu_secs(pid);
        let cost = |c: &Vec<f64>| c[c.len() - 1];
        let conv_cpu = n_conv_b * cost(&conversion_cost);
        let share = conv_cpu / (conv_cpu + n_clicks_b * cost(&click_cost)).max(1e-9);
        shares.push(share);
        println!(
            "| {round}: both at once | {clicks_b:.0} | {conversions_b:.0} | {bad_b:.0} | {:.2} (conversions ≈ {:.0} %) |",
            (cpu4 - cpu3) / f64::from(secs),
            share * 100.0
        );
    }
    println!(
        "\nCPU per request, median: click {:.1} µs, conversion {:.1} µs; conversions' share of ingest CPU with both running, median: {:.0} %",
        median(&mut click_cost) * 1e6,
        median(&mut conversion_cost) * 1e6,
        median(&mut shares) * 100.0
    );
}

#[tokio::main]
async fn main() {
    release_env();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("all", String::as_str);
    let rows: u64 = args
        .get(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(unique("bench"));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = write_mix(&dir);
    println!(
        "# pipeline benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if which == "hold" {
        hold_ingest_setup(&dir, &script).await;
        return;
    }
    if matches!(which, "all" | "ingest") {
        bench_ingest(&dir, &script).await;
    }
    if matches!(which, "all" | "conversions") {
        bench_conversions(&dir, &script).await;
    }
    if matches!(which, "all" | "consumer") {
        bench_consumer(rows).await;
    }
    if matches!(which, "all" | "freshness") {
        bench_freshness().await;
    }
}
