//! The fault table: one row per fault test, printed by `deploy/local/test`.

use std::path::PathBuf;

/// One row of the fault/attack table in tests/README.md, measured by a test.
pub struct FaultRow<'a> {
    pub fault: &'a str,
    pub load: &'a str,
    pub sent: usize,
    /// 2xx answers (HTTP) or broker acknowledgements (events produced directly).
    pub accepted: usize,
    /// `None`: not measured by that test (printed `–`).
    pub rows: Option<u64>,
    pub duplicates: Option<u64>,
    pub lost: Option<u64>,
}

/// Appends a row to `$E2E_REPORT` (default `target/fault-report.md`) and prints it.
pub fn report(row: &FaultRow<'_>) {
    use std::io::Write;
    let path = std::env::var("E2E_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fault-report.md")
        });
    let cell = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
    let line = format!(
        "| {} | {} | {} | {} | {} | {} | {} |\n",
        row.fault,
        row.load,
        row.sent,
        row.accepted,
        cell(row.rows),
        cell(row.duplicates),
        cell(row.lost)
    );
    print!("REPORT {line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
