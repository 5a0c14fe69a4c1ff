//! Helpers shared by tests and benchmarks: sample events, Grafana macros, soak length.

/// A valid v1 click event (as ingest would publish it) with random hashes.
pub fn sample_event(click_id: &str, code: &str, landing_path: &str, is_bot: bool) -> Vec<u8> {
    shared::event::ClickEvent {
        v: 1,
        click_id: click_id.to_owned(),
        code: code.to_owned(),
        landing_path: landing_path.to_owned(),
        utm_source: "newsletter".into(),
        utm_medium: "email".into(),
        utm_campaign: "spring".into(),
        ip_hash: format!("{:064x}", rand::random::<u128>()),
        ua_hash: format!("{:064x}", rand::random::<u128>()),
        key_id: "k1".into(),
        is_bot,
        received_at_ms: shared::now_ms(),
        account_id: String::new(),
    }
    .encode()
}

/// Expands the Grafana ClickHouse plugin's time macros the way the plugin does.
pub fn expand_macros(sql: &str, from: u64, to: u64) -> String {
    const FILTER: &str = "$__timeFilter(";
    let mut out = sql
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"));
    while let Some(start) = out.find(FILTER) {
        let rest = &out[start + FILTER.len()..];
        let Some(end) = rest.find(')') else { break };
        let column = rest[..end].trim().to_owned();
        let replacement =
            format!("{column} >= toDateTime({from}) AND {column} <= toDateTime({to})");
        out.replace_range(start..start + FILTER.len() + end + 1, &replacement);
    }
    out
}

/// `E2E_SOAK_SECS` (default 0): extra seconds the load-holding fault tests keep going
/// (broker restart under load, ClickHouse outage, repeated consumer SIGKILLs). The normal
/// run fits in a few minutes; `E2E_SOAK_SECS=600 deploy/local/test -- --test exactly_once`
/// is the long soak.
pub fn soak_secs() -> u64 {
    std::env::var("E2E_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
