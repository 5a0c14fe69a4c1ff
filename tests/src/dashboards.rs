//! The provisioned dashboards and the named queries they are made of.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `deploy/clickhouse/queries/*.sql`, by name.
pub fn named_queries() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("deploy/clickhouse/queries")).expect("queries dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "sql") {
            let name = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            m.insert(
                name,
                std::fs::read_to_string(&path)
                    .expect("read")
                    .trim()
                    .to_owned(),
            );
        }
    }
    m
}

/// `(dashboard uid, panel title, SQL)` of every SQL panel of the provisioned dashboards.
pub fn dashboard_sql_panels() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/grafana/dashboards")).expect("dashboards") {
        let path = entry.expect("entry").path();
        let board: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
            .expect("dashboard json");
        for panel in board["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(sql) = target["rawSql"].as_str() {
                    out.push((
                        board["uid"].as_str().unwrap_or("").to_owned(),
                        panel["title"].as_str().unwrap_or("").to_owned(),
                        sql.trim().to_owned(),
                    ));
                }
            }
        }
    }
    out
}

/// Runs every SQL panel of dashboard `uid` over `[from, to]` and compares each with its
/// expected rows (TSV cells; `<hour>`: any whole hour; `~N`: an estimate within max(2, 5 %);
/// `<any>`: a value that depends on timing; `<secs>N`: N seconds, to the millisecond).
pub async fn check_dashboard(
    db: &ClickHouse,
    uid: &str,
    expected: &BTreeMap<&'static str, Vec<Vec<String>>>,
    (from, to): (u64, u64),
) {
    let queries = named_queries();
    let panels: Vec<_> = dashboard_sql_panels()
        .into_iter()
        .filter(|(u, _, _)| u == uid)
        .collect();
    assert!(!panels.is_empty(), "no SQL panels in {uid}");
    // Every panel has an expected answer and every expected answer a panel.
    let shown: std::collections::BTreeSet<String> = panels
        .iter()
        .filter_map(|(_, _, sql)| {
            queries
                .iter()
                .find(|(_, q)| *q == sql)
                .map(|(n, _)| n.clone())
        })
        .collect();
    let wanted: std::collections::BTreeSet<String> =
        expected.keys().map(|k| (*k).to_owned()).collect();
    assert_eq!(
        shown, wanted,
        "{uid}: the panels and the expected answers differ"
    );
    for (_, title, sql) in &panels {
        let name = queries
            .iter()
            .find(|(_, q)| *q == sql)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| panic!("panel {title:?} has SQL that is not a named query (drift)"));
        let text = db
            .query(&format!("{} FORMAT TSV", expand_macros(sql, from, to)))
            .await;
        let got: Vec<Vec<String>> = text
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect();
        let want = expected
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no expected answer for {name}"));
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.len(), w.len(), "{name}: {g:?} vs {w:?}");
            for (gc, wc) in g.iter().zip(w) {
                if wc == "<any>" {
                    continue;
                }
                if let Some(secs) = wc.strip_prefix("<secs>") {
                    // Seconds computed by the test from the raw times (ms precision).
                    let (g, w): (f64, f64) = (
                        gc.parse().unwrap_or(f64::NAN),
                        secs.parse().expect("number"),
                    );
                    assert!(
                        (g - w).abs() < 0.0015 && g > 0.0,
                        "{name}: {gc} seconds, expected {w}"
                    );
                } else if wc == "<hour>" {
                    assert!(gc.ends_with(":00:00"), "{name}: {gc} is not an hour");
                } else if let Some(approx) = wc.strip_prefix('~') {
                    let (g, w): (f64, f64) =
                        (gc.parse().expect("number"), approx.parse().expect("number"));
                    assert!(
                        (g - w).abs() <= (w * 0.05).max(2.0),
                        "{name}: estimate {g} too far from {w}"
                    );
                } else {
                    assert_eq!(gc, wc, "{name}: {g:?} vs {w:?}");
                }
            }
        }
    }
}
