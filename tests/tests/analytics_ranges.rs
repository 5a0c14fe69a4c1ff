//! Dashboards honest to their range: clicks at chosen times over three past UTC days go
//! through the broker, the consumer and the views; then every panel of the attribution
//! dashboard is run over ranges that start and end mid-day (and a 6-hour one) and compared
//! with answers computed here from the data set by the documented rule: a click counts when
//! its UTC hour overlaps the range, i.e. `toStartOfHour(received_at)` lies in
//! `[toStartOfHour(from), to]`.

use ingest::limits::calendar::civil_from_days;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use e2e::*;
use serde_json::Value;

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

#[derive(Clone)]
struct Click {
    at_ms: u64,
    code: &'static str,
    path: &'static str,
    utm: (&'static str, &'static str, &'static str),
    visitor: u32,
    is_bot: bool,
}

fn hash(n: u32, salt: u8) -> String {
    let mut h = format!("{salt:02x}{n:08x}");
    while h.len() < 64 {
        h.push('0');
    }
    h
}

/// Three days ago at 00:00 UTC, the first day of the data set.
fn day0() -> u64 {
    (shared::now_ms() / DAY - 3) * DAY
}

fn data_set(d0: u64) -> Vec<Click> {
    let mut v = Vec::new();
    let mut add = |at: u64, n: usize, code, path, utm, visitor, is_bot| {
        for i in 0..n {
            v.push(Click {
                at_ms: at + i as u64 * 1000,
                code,
                path,
                utm,
                visitor: visitor + i as u32 % 3,
                is_bot,
            });
        }
    };
    let news = ("newsletter", "email", "spring");
    let social = ("twitter", "social", "launch");
    let none = ("", "", "");
    // Visitors: a few per group and shared between groups, so that unique-visitor
    // estimates stay in uniqHLL12's exact range (16).
    let h = |day: u64, hour: u64, min: u64| d0 + day * DAY + hour * HOUR + min * 60_000;
    add(h(0, 9, 15), 3, "CODEAAAAAAAA", "/pricing", news, 1, false);
    add(h(0, 10, 40), 2, "CODEAAAAAAAA", "/pricing", news, 1, false);
    add(h(0, 10, 41), 1, "CODEAAAAAAAA", "/pricing", news, 90, true);
    add(
        h(0, 23, 30),
        2,
        "CODEBBBBBBBB",
        "/signup",
        social,
        10,
        false,
    );
    add(h(1, 0, 30), 1, "CODEBBBBBBBB", "/signup", social, 10, false);
    add(h(1, 5, 5), 35, "CODEBBBBBBBB", "/signup", social, 50, false);
    add(h(1, 12, 0), 4, "CODEAAAAAAAA", "/", none, 1, false);
    add(h(2, 8, 10), 5, "CODECCCCCCCC", "/", none, 20, false);
    add(h(2, 14, 50), 6, "CODEAAAAAAAA", "/pricing", news, 1, false);
    add(
        h(2, 15, 30),
        7,
        "CODEBBBBBBBB",
        "/signup",
        social,
        10,
        false,
    );
    add(h(2, 15, 31), 2, "CODEBBBBBBBB", "/signup", social, 91, true);
    // The abuse hour: one address, 35 clicks within 05:00-06:00 of day 1.
    for c in v
        .iter_mut()
        .filter(|c| c.at_ms >= h(1, 5, 0) && c.at_ms < h(1, 6, 0))
    {
        c.visitor = 50;
    }
    v
}

fn date(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / DAY) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

fn date_time(ms: u64) -> String {
    let s = ms / 1000 % 86_400;
    format!(
        "{} {:02}:{:02}:{:02}",
        date(ms),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The documented rule.
fn in_range(c: &Click, from_ms: u64, to_ms: u64) -> bool {
    let hour = c.at_ms / HOUR * HOUR;
    hour >= from_ms / HOUR * HOUR && hour <= to_ms
}

type Rows = Vec<Vec<String>>;

/// Rows grouped by `key`, with (human clicks, distinct visitors), sorted by clicks desc then key.
fn by<K: Ord + Clone>(clicks: &[&Click], key: impl Fn(&Click) -> K) -> Vec<(K, usize, usize)> {
    let mut m: BTreeMap<K, (usize, BTreeSet<u32>)> = BTreeMap::new();
    for c in clicks.iter().filter(|c| !c.is_bot) {
        let e = m.entry(key(c)).or_default();
        e.0 += 1;
        e.1.insert(c.visitor);
    }
    let mut v: Vec<_> = m
        .into_iter()
        .map(|(k, (n, vis))| (k, n, vis.len()))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

fn expected(
    data: &[Click],
    from: u64,
    to: u64,
    hasher: &shared::hashing::KeyedHasher,
) -> BTreeMap<&'static str, Rows> {
    let _ = hasher;
    let s = |v: &dyn ToString| v.to_string();
    let clicks: Vec<&Click> = data.iter().filter(|c| in_range(c, from, to)).collect();
    let mut m = BTreeMap::new();
    let humans: Vec<&&Click> = clicks.iter().filter(|c| !c.is_bot).collect();
    let visitors: BTreeSet<u32> = humans.iter().map(|c| c.visitor).collect();
    m.insert(
        "totals",
        vec![vec![
            s(&humans.len()),
            s(&visitors.len()),
            s(&(clicks.len() - humans.len())),
        ]],
    );
    let mut per_day: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for c in &clicks {
        let e = per_day.entry(date(c.at_ms)).or_default();
        e.0 += 1;
        e.1 += usize::from(c.is_bot);
    }
    m.insert(
        "credits_per_day",
        per_day
            .iter()
            .map(|(d, (n, _))| vec![d.clone(), s(n)])
            .collect(),
    );
    m.insert(
        "bot_share",
        per_day
            .iter()
            .map(|(d, (n, b))| vec![d.clone(), s(n), s(b), format!("={}", *b as f64 / *n as f64)])
            .collect(),
    );
    let codes = by(&clicks, |c| c.code);
    m.insert(
        "top_codes",
        codes
            .iter()
            .take(20)
            .map(|(k, n, v)| vec![s(k), s(n), s(v)])
            .collect(),
    );
    m.insert(
        "utm_breakdown",
        by(&clicks, |c| c.utm)
            .iter()
            .map(|((a, b, c), n, v)| vec![s(a), s(b), s(c), s(n), s(v)])
            .collect(),
    );
    m.insert(
        "landing_paths",
        by(&clicks, |c| c.path)
            .iter()
            .map(|(k, n, v)| vec![s(k), s(n), s(v)])
            .collect(),
    );
    let top10: BTreeSet<&str> = codes.iter().take(10).map(|(k, _, _)| *k).collect();
    let mut series: Vec<_> = by(&clicks, |c| (c.at_ms / HOUR * HOUR, c.code))
        .into_iter()
        .filter(|((_, code), _, _)| top10.contains(code))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    m.insert(
        "clicks_over_time",
        series
            .iter()
            .map(|((h, code), n, v)| vec![date_time(*h), s(code), s(n), s(v)])
            .collect(),
    );
    let mut abuse: BTreeMap<(u64, &str, u32), usize> = BTreeMap::new();
    for c in &clicks {
        *abuse
            .entry((c.at_ms / HOUR * HOUR, c.code, c.visitor))
            .or_default() += 1;
    }
    m.insert(
        "suspected_abuse",
        abuse
            .iter()
            .filter(|(_, n)| **n >= 30)
            .map(|((h, code, v), n)| vec![date_time(*h), s(code), hash(*v, 1).to_uppercase(), s(n)])
            .collect(),
    );
    m
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The SQL of every panel of the attribution dashboard, by named query.
fn attribution_panels() -> BTreeMap<String, String> {
    let board: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("deploy/grafana/dashboards/referral-attribution.json"),
        )
        .expect("read"),
    )
    .expect("json");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("deploy/clickhouse/queries")).expect("queries") {
        let path = entry.expect("entry").path();
        let sql = std::fs::read_to_string(&path)
            .expect("read")
            .trim()
            .to_owned();
        let used = board["panels"].as_array().expect("panels").iter().any(|p| {
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["rawSql"].as_str() == Some(sql.as_str()))
        });
        if used {
            out.insert(
                path.file_stem()
                    .expect("stem")
                    .to_string_lossy()
                    .into_owned(),
                sql,
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn panels_cover_exactly_their_range_in_utc_hours() {
    let scope = Scope::new("analytics_ranges", 4).await;
    let consumer = ConsumerProc::start(&scope.consumer_options());
    consumer.ready().await;
    let d0 = day0();
    let data = data_set(d0);
    let events: Vec<(String, Vec<u8>)> = data
        .iter()
        .map(|c| {
            let id = random_click_id();
            let event = shared::event::ClickEvent {
                v: 1,
                click_id: id.clone(),
                code: c.code.into(),
                landing_path: c.path.into(),
                utm_source: c.utm.0.into(),
                utm_medium: c.utm.1.into(),
                utm_campaign: c.utm.2.into(),
                ip_hash: hash(c.visitor, 1),
                ua_hash: hash(c.visitor, 2),
                key_id: "k1".into(),
                is_bot: c.is_bot,
                received_at_ms: c.at_ms,
                account_id: scope.account.clone(),
            };
            (id, event.encode())
        })
        .collect();
    let messages: Vec<(Option<&str>, &[u8])> = events
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(&scope.brokers, &scope.topic, &messages).await;
    scope
        .wait_rows(data.len() as u64, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let db = ClickHouse::new(&format!(
        "{}/?database={}",
        clickhouse_url(),
        scope.database
    ));
    let panels = attribution_panels();
    assert_eq!(panels.len(), 8, "{:?}", panels.keys());
    let hasher = shared::hashing::KeyedHasher::new(HASH_KEY.as_bytes(), "e2e1").expect("key");
    let at = |day: u64, hour: u64, min: u64| d0 + day * DAY + hour * HOUR + min * 60_000;
    let ranges = [
        (
            "mid-day to mid-day over three days",
            at(0, 10, 20),
            at(2, 14, 15),
        ),
        ("6 hours within one day", at(1, 3, 30), at(1, 9, 30)),
        ("one hour across midnight", at(0, 23, 45), at(1, 0, 45)),
        ("whole days", at(0, 0, 0), at(2, 23, 59) + 59_000),
    ];
    for (what, from, to) in ranges {
        let want = expected(&data, from, to, &hasher);
        for (name, sql) in &panels {
            let text = db
                .query(&format!(
                    "{} FORMAT TSV",
                    expand_macros(sql, from / 1000, to / 1000)
                ))
                .await;
            let got: Rows = text
                .lines()
                .map(|l| l.split('\t').map(str::to_owned).collect())
                .collect();
            let want = &want[name.as_str()];
            assert_eq!(got.len(), want.len(), "{what}, {name}: {got:?} vs {want:?}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(
                    g.len(),
                    w.len(),
                    "{what}, {name}: a row has {} columns, the answer {}: {g:?} vs {w:?}",
                    g.len(),
                    w.len()
                );
                for (gc, wc) in g.iter().zip(w) {
                    match wc.strip_prefix('=') {
                        Some(f) => {
                            let (g, w): (f64, f64) =
                                (gc.parse().expect("float"), f.parse().expect("float"));
                            assert!((g - w).abs() < 1e-9, "{what}, {name}: {gc} vs {f}");
                        }
                        None => assert_eq!(gc, wc, "{what}, {name}: {g:?} vs {w:?}"),
                    }
                }
            }
        }
    }
    scope.drop_database().await;
}
