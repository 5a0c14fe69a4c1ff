//! Schemathesis (property-based API testing from the OpenAPI description in
//! ingest/openapi.yaml) against the live ingest and the real broker: no 5xx, and every
//! response matches the description (status code, content type, headers, body schema).

use std::path::PathBuf;
use std::process::Command;

use e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn live_ingest_conforms_to_its_openapi_description() {
    let scope = Scope::new("schemathesis", 2).await;
    // Every request carries a valid key: the conversions operation gets past 401 to its
    // validation and its 200s (the other routes ignore the header).
    let (_, secret) = scope.create_key(&scope.account).await;
    let mut opts = scope.ingest_options();
    opts.extra_env = vec![
        ("INGEST_RATE_LIMIT_PER_MINUTE".into(), "1000000000".into()),
        ("INGEST_RATE_LIMIT_BURST".into(), "1000000000".into()),
        ("INGEST_KEY_RATE_PER_MINUTE".into(), "1000000000".into()),
        ("INGEST_KEY_RATE_BURST".into(), "1000000000".into()),
    ];
    let ingest = Ingest::start(&opts);
    ingest.ready().await;
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ingest/openapi.yaml");
    let url = ingest.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("st")
            .arg("run")
            .arg(&spec)
            .args(["-u", &url, "-n", "150", "--request-timeout", "10"])
            .args(["-H", &format!("Authorization: Bearer {secret}")])
            .args(["-c", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"])
            .output()
            .expect("schemathesis `st` (deploy/local/test installs it with pip)")
    })
    .await
    .expect("join");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // The summary is the line "N generated, N passed, ..."; schemathesis 4.3x also prints
    // warnings that mention generated data (e.g. "Schema validation mismatch": random
    // codes that match the pattern are mostly not in the registry, and their 400 is the
    // contract), so the summary is the line that counts outcomes.
    let summary = text
        .lines()
        .find(|l| l.contains("generated") && (l.contains("passed") || l.contains("failed")))
        .unwrap_or_default();
    for warning in text.lines().filter(|l| l.contains("mismatch")) {
        println!("schemathesis warning: {}", warning.trim());
    }
    assert!(
        summary.contains("passed") && !summary.contains("failed"),
        "{summary}"
    );
    println!("schemathesis: {}", summary.trim());
    // It reached past validation on the conversions operation too.
    let accepted = metric_value(&ingest.url("/metrics"), "ingest_conversions_accepted_total").await;
    println!("schemathesis: {accepted} conversions accepted");
    assert!(accepted > 0.0, "no generated conversion was accepted");
}
