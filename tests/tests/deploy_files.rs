//! The deployment files are checked by the tools that will read them.

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (deploy/local/test installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// A fresh `.env` as `deploy/compose/init` writes it, in a folder of its own.
fn compose_env() -> PathBuf {
    let dir = std::env::temp_dir().join(e2e::unique("compose_env"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(".env");
    run(Command::new(root().join("deploy/compose/init")).env("COMPOSE_ENV_FILE", &file));
    file
}

fn env_value(file: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(file).expect("read env file");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} missing from {}", file.display()))
        .to_string()
}

/// `docker-compose config` with that env file, parsed.
fn rendered(env_file: &Path) -> Yaml {
    let text = run(Command::new("docker-compose")
        .current_dir(root())
        .env_remove("INGEST_HASH_KEY")
        .env_remove("CLICKHOUSE_PASSWORD")
        .arg("--env-file")
        .arg(env_file)
        .args(["-f", "docker-compose.yml", "config"]));
    let yaml = text
        .find("services:")
        .map(|i| &text[i..])
        .expect("rendered configuration");
    YamlLoader::load_from_str(yaml)
        .expect("docker-compose config prints YAML")
        .remove(0)
}

fn str_of(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn env_of(config: &Yaml, service: &str, name: &str) -> Option<String> {
    let v = &config["services"][service]["environment"][name];
    (!v.is_badvalue()).then(|| str_of(v))
}

/// The mount targets of a service that are named volumes.
fn volume_targets(config: &Yaml, service: &str) -> Vec<String> {
    let mounts = config["services"][service]["volumes"]
        .as_vec()
        .unwrap_or_else(|| panic!("{service} mounts nothing"));
    mounts
        .iter()
        .filter_map(|m| match m {
            // Long form (docker-compose 2) or short form "name:/path[:ro]".
            Yaml::Hash(_) => (str_of(&m["type"]) == "volume").then(|| str_of(&m["target"])),
            Yaml::String(s) => {
                let mut parts = s.split(':');
                let source = parts.next().unwrap_or("");
                let target = parts.next().unwrap_or("");
                (!source.starts_with('/') && !source.starts_with('.')).then(|| target.to_string())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn docker_compose_file_is_valid() {
    let config = rendered(&compose_env());
    let services = config["services"].as_hash().expect("services");
    for service in [
        "kafka",
        "clickhouse",
        "prometheus",
        "grafana",
        "ingest",
        "consumer",
        "setup",
        "redis",
    ] {
        assert!(
            services.contains_key(&Yaml::String(service.into())),
            "service {service} missing"
        );
    }
    assert_eq!(
        env_of(&config, "ingest", "INGEST_REDIS_URL").as_deref(),
        Some("redis://redis:6379"),
        "ingest must share its limit counters in the compose file's Redis"
    );
    assert_eq!(
        env_of(&config, "kafka", "KAFKA_PROCESS_ROLES").as_deref(),
        Some("broker,controller"),
        "Kafka must run in KRaft mode"
    );
}

#[test]
fn every_stateful_service_keeps_its_data_on_a_volume() {
    let config = rendered(&compose_env());
    // Kafka writes where KAFKA_LOG_DIRS says (the image's default is under /tmp).
    let log_dirs = env_of(&config, "kafka", "KAFKA_LOG_DIRS")
        .expect("KAFKA_LOG_DIRS must be set: the image's default is /tmp/kraft-combined-logs");
    let on_volume = |service: &str, path: &str| {
        volume_targets(&config, service)
            .iter()
            .any(|t| path == t || path.starts_with(&format!("{t}/")))
    };
    for dir in log_dirs.split(',') {
        assert!(on_volume("kafka", dir), "Kafka's {dir} is not on a volume");
    }
    for (service, dir) in [
        ("clickhouse", "/var/lib/clickhouse"),
        ("redis", "/data"),
        ("prometheus", "/prometheus"),
        ("grafana", "/var/lib/grafana"),
    ] {
        assert!(
            on_volume(service, dir),
            "{service}'s {dir} is not on a volume"
        );
    }
    // The command's words: `--appendonly` must be followed by `yes` (`--appendonly no`
    // keeps nothing).
    let words: Vec<String> = match &config["services"]["redis"]["command"] {
        Yaml::Array(items) => items
            .iter()
            .map(|w| w.as_str().unwrap_or_default().to_owned())
            .collect(),
        other => other
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
    };
    let appendonly = words
        .iter()
        .position(|w| w == "--appendonly")
        .and_then(|i| words.get(i + 1));
    assert_eq!(
        appendonly.map(String::as_str),
        Some("yes"),
        "Redis must keep an append-only file: {words:?}"
    );
}

#[test]
fn the_hash_key_is_made_once_and_kept() {
    let file = compose_env();
    let key = env_value(&file, "INGEST_HASH_KEY");
    let password = env_value(&file, "CLICKHOUSE_PASSWORD");
    assert!(key.len() >= 32, "the hash key must be at least 32 bytes");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the secrets file must be private");
    }
    // Run again: nothing changes.
    run(Command::new(root().join("deploy/compose/init")).env("COMPOSE_ENV_FILE", &file));
    assert_eq!(env_value(&file, "INGEST_HASH_KEY"), key);
    assert_eq!(env_value(&file, "CLICKHOUSE_PASSWORD"), password);
    // Another stack gets another key.
    assert_ne!(env_value(&compose_env(), "INGEST_HASH_KEY"), key);
    // Every compose command sees the key from the file, not a new one.
    let config = rendered(&file);
    assert_eq!(env_of(&config, "ingest", "INGEST_HASH_KEY"), Some(key));
    let ignored = std::fs::read_to_string(root().join(".gitignore")).expect(".gitignore");
    assert!(
        ignored.lines().any(|l| l == "/.env"),
        ".env must be git-ignored"
    );
}

#[test]
fn ingest_reads_the_registry_snapshot_from_the_clickhouse_service() {
    let file = compose_env();
    let config = rendered(&file);
    let password = env_value(&file, "CLICKHOUSE_PASSWORD");
    let user = env_of(&config, "clickhouse", "CLICKHOUSE_USER").expect("CLICKHOUSE_USER");
    assert_eq!(
        env_of(&config, "ingest", "INGEST_REGISTRY_CLICKHOUSE_URL").as_deref(),
        Some("http://clickhouse:8123")
    );
    assert_eq!(
        env_of(&config, "ingest", "INGEST_REGISTRY_CLICKHOUSE_USER"),
        Some(user.clone())
    );
    assert_eq!(
        env_of(&config, "ingest", "INGEST_REGISTRY_CLICKHOUSE_PASSWORD"),
        Some(password.clone())
    );
    for service in ["setup", "consumer"] {
        assert_eq!(
            env_of(&config, service, "CONSUMER_CLICKHOUSE_USER"),
            Some(user.clone())
        );
        assert_eq!(
            env_of(&config, service, "CONSUMER_CLICKHOUSE_PASSWORD"),
            Some(password.clone())
        );
    }
    assert_eq!(
        env_of(&config, "clickhouse", "CLICKHOUSE_PASSWORD"),
        Some(password)
    );
    // With CLICKHOUSE_DB the image first serves on 127.0.0.1 only, the healthcheck passes
    // then, and `setup` meets a server that is about to restart.
    assert_eq!(
        env_of(&config, "clickhouse", "CLICKHOUSE_DB"),
        None,
        "`consumer setup` creates the database; CLICKHOUSE_DB starts a temporary server"
    );
}

#[test]
fn long_running_services_restart_and_the_build_context_is_small() {
    let config = rendered(&compose_env());
    for (name, service) in config["services"].as_hash().expect("services") {
        let name = str_of(name);
        let restart = &service["restart"];
        if name == "setup" {
            assert!(
                restart.is_badvalue(),
                "setup is one-shot and must not restart"
            );
        } else {
            let policy = if restart.is_badvalue() {
                String::new()
            } else {
                str_of(restart)
            };
            assert!(
                policy == "unless-stopped" || policy == "always",
                "{name} has restart policy {policy:?}"
            );
        }
    }
    let ignored = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    for pattern in ["**/target", ".env", "shared/fuzz/corpus"] {
        assert!(
            ignored.lines().any(|l| l == pattern),
            ".dockerignore must exclude {pattern}"
        );
    }
    // The header shows the commands that make the first click work.
    let file = std::fs::read_to_string(root().join("docker-compose.yml")).expect("compose file");
    let header: String = file
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for step in [
        "deploy/compose/init",
        "accounts set",
        "codes add",
        "/api/v1/referrals/click",
    ] {
        assert!(
            header.contains(step),
            "the compose header must show `{step}`"
        );
    }
}

#[test]
fn docker_compose_refuses_to_start_without_a_hash_key() {
    let empty = std::env::temp_dir().join(e2e::unique("empty_env"));
    std::fs::write(&empty, "").expect("empty env file");
    let out = Command::new("docker-compose")
        .current_dir(root())
        .env_remove("INGEST_HASH_KEY")
        .arg("--env-file")
        .arg(&empty)
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .output()
        .expect("docker-compose");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INGEST_HASH_KEY") && err.contains("deploy/compose/init"),
        "the refusal must name the variable and the script: {err}"
    );
}

#[test]
fn prometheus_configs_and_rules_are_valid() {
    let dir = root().join("deploy/prometheus");
    run(Command::new("promtool").current_dir(&dir).args([
        "check",
        "config",
        "prometheus.local.yml",
    ]));
    run(Command::new("promtool").current_dir(&dir).args([
        "check",
        "config",
        "--syntax-only",
        "prometheus.yml",
    ]));
    let text =
        run(Command::new("promtool")
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]));
    assert!(text.contains("SUCCESS"));
}
