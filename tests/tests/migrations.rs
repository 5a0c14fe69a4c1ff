//! Migrations are append-only: a database migrated by an earlier release reaches, with
//! the current `consumer migrate`, exactly the schema of a fresh install. The earlier
//! releases' migration files are read from this repository's history.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::*;

/// Releases whose migrations an operator may have applied: before conversions, the first
/// conversions release, and the release before migration 0011.
const RELEASES: [&str; 3] = ["6a99132", "12c4ccf", "c05fd3e"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn git(args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {} (the test reads earlier releases from the history: a full clone is needed)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The migrations of `commit`'s tree, parsed as that release's runner did.
fn migrations_at(commit: &str) -> Vec<consumer::migrations::Migration> {
    let mut out: Vec<_> = git(&["ls-tree", "--name-only", commit, "deploy/clickhouse/"])
        .lines()
        .filter(|p| p.ends_with(".sql"))
        .map(|path| {
            let name = path.rsplit('/').next().expect("name");
            let version: u32 = name[..4].parse().expect("version");
            let text = git(&["show", &format!("{commit}:{path}")])
                .replace("{{clicks_table}}", "referral_clicks");
            consumer::migrations::parse(version, name, &text).expect("parses")
        })
        .collect();
    out.sort_by_key(|m| m.version);
    out
}

/// Applies `migrations` to a new database the way their release's runner did.
async fn apply_release(database: &str, migrations: &[consumer::migrations::Migration]) {
    let server = clickhouse::Client::default().with_url(clickhouse_url());
    server
        .query(&format!("CREATE DATABASE {database}"))
        .execute()
        .await
        .expect("database");
    let db = server.with_database(database);
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) \
         ENGINE = MergeTree ORDER BY version",
    )
    .execute()
    .await
    .expect("schema_migrations");
    for m in migrations {
        for stmt in &m.statements {
            db.query(stmt)
                .execute()
                .await
                .unwrap_or_else(|e| panic!("{}: {e}\n{stmt}", m.name));
        }
        db.query(&format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}')",
            m.version, m.name
        ))
        .execute()
        .await
        .expect("record");
    }
}

/// `consumer migrate` of this build on `database`.
async fn migrate_current(database: &str) {
    let mut cmd = Command::new(bin("consumer"));
    cmd.arg("migrate")
        .env("CONSUMER_CLICKHOUSE_URL", clickhouse_url())
        .env("CONSUMER_CLICKHOUSE_DATABASE", database)
        .env("CONSUMER_PLANS_FILE", test_catalogue());
    let mut p = Proc::spawn("consumer-migrate", cmd);
    let status = p.exited(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", p.log_text());
}

/// Every table and view with its definition, and every column, the database's name left
/// out.
async fn schema(ch: &ClickHouse, database: &str) -> String {
    let tables = ch
        .query(&format!(
            "SELECT name, engine, replaceAll(create_table_query, '{database}.', '') \
             FROM system.tables WHERE database = '{database}' ORDER BY name FORMAT TSV"
        ))
        .await;
    let columns = ch
        .query(&format!(
            "SELECT table, name, type, default_kind, default_expression, position \
             FROM system.columns WHERE database = '{database}' ORDER BY table, position FORMAT TSV"
        ))
        .await;
    format!("{tables}\n{columns}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_each_earlier_release_upgrades_to_the_fresh_schema() {
    let ch = ClickHouse::new(&clickhouse_url());
    let fresh = unique("e2e_fresh");
    migrate_current(&fresh).await;
    let expected = schema(&ch, &fresh).await;
    assert!(expected.contains("conversion_attribution") && expected.contains("clicks_by_id"));
    for release in RELEASES {
        let old = migrations_at(release);
        assert!(old.len() >= 8, "{release}: {} migrations", old.len());
        let database = unique(&format!("e2e_upgrade_{release}"));
        apply_release(&database, &old).await;
        migrate_current(&database).await;
        let got = schema(&ch, &database).await;
        if got != expected {
            let diff: Vec<String> = got
                .lines()
                .zip(expected.lines())
                .filter(|(a, b)| a != b)
                .take(5)
                .map(|(a, b)| format!("upgraded: {a}\nfresh:    {b}"))
                .collect();
            panic!(
                "the database of {release} upgraded differs from a fresh install:\n{}",
                diff.join("\n")
            );
        }
        let _ = ch.try_query(&format!("DROP DATABASE {database}")).await;
    }
    let _ = ch.try_query(&format!("DROP DATABASE {fresh}")).await;
}
