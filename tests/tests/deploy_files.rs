//! The deployment files are checked by the tools that will read them.

use std::path::PathBuf;
use std::process::Command;

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

#[test]
fn docker_compose_file_is_valid() {
    let text = run(Command::new("docker-compose")
        .current_dir(root())
        .env(
            "INGEST_HASH_KEY",
            "compose-check-compose-check-compose-check",
        )
        .args(["-f", "docker-compose.yml", "config"]));
    for service in [
        "kafka:",
        "clickhouse:",
        "prometheus:",
        "grafana:",
        "ingest:",
        "consumer:",
        "setup:",
        "redis:",
    ] {
        assert!(text.contains(service), "service {service} missing");
    }
    assert!(
        text.contains("INGEST_REDIS_URL: redis://redis:6379"),
        "ingest must share its limit counters in the compose file's Redis"
    );
    assert!(
        text.contains("KAFKA_PROCESS_ROLES: broker,controller"),
        "Kafka must run in KRaft mode"
    );
}

#[test]
fn docker_compose_refuses_to_start_without_a_hash_key() {
    let out = Command::new("docker-compose")
        .current_dir(root())
        .env_remove("INGEST_HASH_KEY")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .output()
        .expect("docker-compose");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("INGEST_HASH_KEY"));
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
