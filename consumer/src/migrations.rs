//! ClickHouse schema migrations: the numbered SQL files of `deploy/clickhouse/`, embedded
//! at build time, applied in order and recorded in `schema_migrations`.
//!
//! * A file is `NNNN_name.sql`; statements end with `;` at the end of a line.
//! * `{{clicks_table}}` stands for the configured raw clicks table.
//! * Every file may use what ClickHouse 24.8 has (the oldest supported server, the
//!   compose file's image): `apply` refuses an older server with a clear message rather
//!   than leave a schema half made.
//! * Statements are written to be idempotent (`IF NOT EXISTS`), so two consumers starting
//!   at once, or a crash between a statement and its record, do no harm.

use include_dir::{include_dir, Dir};

static MIGRATIONS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../deploy/clickhouse");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: String,
    pub statements: Vec<String>,
}

/// All embedded migrations, ordered by version.
pub fn all(clicks_table: &str) -> Result<Vec<Migration>, String> {
    let mut out = Vec::new();
    for file in MIGRATIONS.files() {
        let Some(name) = file.path().file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.ends_with(".sql") {
            continue;
        }
        let version: u32 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("migration {name}: name must start with a number"))?;
        let text = file
            .contents_utf8()
            .ok_or_else(|| format!("migration {name}: not UTF-8"))?
            .replace("{{clicks_table}}", clicks_table);
        out.push(parse(version, name, &text)?);
    }
    out.sort_by_key(|m| m.version);
    if out.windows(2).any(|w| w[0].version == w[1].version) {
        return Err("two migrations share a version number".into());
    }
    Ok(out)
}

/// The oldest ClickHouse release the schema and the consumer's insert settings support.
pub const MIN_SERVER_VERSION: (u32, u32) = (24, 8);

pub fn parse(version: u32, name: &str, text: &str) -> Result<Migration, String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                statements.push(stmt);
            }
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        return Err(format!(
            "migration {name}: last statement lacks a closing `;`"
        ));
    }
    Ok(Migration {
        version,
        name: name.to_owned(),
        statements,
    })
}

/// `18.16.1` → (18, 16); `24.8.4.13` → (24, 8).
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.split('.');
    Some((
        parts.next()?.trim().parse().ok()?,
        parts.next()?.trim().parse().ok()?,
    ))
}

/// Applies what is missing. Returns the versions applied now.
pub async fn apply(
    client: &clickhouse::Client,
    database: &str,
    clicks_table: &str,
) -> anyhow::Result<Vec<u32>> {
    let server = client
        .query("SELECT version()")
        .fetch_one::<String>()
        .await?;
    let server_version = parse_version(&server)
        .ok_or_else(|| anyhow::anyhow!("unreadable server version {server}"))?;
    if server_version < MIN_SERVER_VERSION {
        let (major, minor) = MIN_SERVER_VERSION;
        anyhow::bail!(
            "ClickHouse {server} is too old: the schema needs {major}.{minor} or newer (TTL, \
             insert deduplication tokens, async_insert settings); upgrade the server"
        );
    }
    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    let db = client.clone().with_database(database);
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied_at DateTime('UTC') DEFAULT now()) \
         ENGINE = MergeTree ORDER BY version",
    )
    .execute()
    .await?;
    let done: Vec<u32> = db
        .query("SELECT DISTINCT version FROM schema_migrations")
        .fetch_all()
        .await?;
    let mut applied = Vec::new();
    for m in all(clicks_table).map_err(anyhow::Error::msg)? {
        if done.contains(&m.version) {
            continue;
        }
        for stmt in &m.statements {
            db.query(stmt)
                .execute()
                .await
                .map_err(|e| anyhow::anyhow!("migration {}: {e}", m.name))?;
        }
        // Names are file names from this repo: letters, digits, `_` and `.`.
        db.query(&format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}')",
            m.version, m.name
        ))
        .execute()
        .await?;
        tracing::info!(migration = %m.name, "applied");
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_migrations_parse_in_order() {
        let all = all("clicks_x").expect("migrations");
        assert!(all.len() >= 2);
        assert_eq!(all[0].version, 1);
        assert!(all[0].statements[0].contains("CREATE TABLE IF NOT EXISTS clicks_x"));
        assert!(all.windows(2).all(|w| w[0].version < w[1].version));
        assert!(all
            .iter()
            .all(|m| m.statements.iter().all(|s| !s.contains("{{"))));
    }

    #[test]
    fn parses_statements_and_versions() {
        let m = parse(7, "0007_x.sql", "-- comment\nCREATE X\n  (a);\nALTER Y;\n").expect("parse");
        assert_eq!(m.statements, vec!["CREATE X\n  (a)", "ALTER Y"]);
        assert!(parse(8, "0008_y.sql", "CREATE X").is_err());
        assert_eq!(parse_version("18.16.1"), Some((18, 16)));
        assert!(parse_version("18").is_none());
        assert_eq!(parse_version("26.9.2.1"), Some((26, 9)));
        assert!((18, 16) < MIN_SERVER_VERSION && (26, 9) >= MIN_SERVER_VERSION);
    }
}
