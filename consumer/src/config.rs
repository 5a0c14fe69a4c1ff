//! Typed configuration from flags and `CONSUMER_*` environment variables, validated at
//! start-up with a message naming the variable.

use shared::kafka_properties::{KafkaProperties, CONSUMER_PROTECTED};
use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand};
use shared::cli::{millis, secs};

/// The consumer's `max.poll.interval.ms` (librdkafka's default, set explicitly): the
/// flush deadline is validated against it, and `kafka.rs` sets it.
pub const MAX_POLL_INTERVAL_MS: u64 = 300_000;

#[derive(Debug, Parser)]
#[command(
    name = "consumer",
    about = "Batches referral clicks from Kafka into ClickHouse, exactly once"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Consume until SIGTERM (the default).
    Run,
    /// Create the topics (clicks, dead letters, registry, refusals) and apply the
    /// ClickHouse migrations, then exit.
    Setup,
    /// Apply the ClickHouse migrations, then exit.
    Migrate,
    /// Referral-program accounts (the `referral_accounts` topic).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Referral codes (the `referral_codes` topic).
    #[command(subcommand)]
    Codes(CodesCommand),
    /// API keys of the conversions endpoint (the `referral_keys` topic).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Makes a key for an account and prints its secret, once: only its hash is stored.
    Create {
        account: String,
        /// What the key is for (shown by `keys list`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revokes a key: requests with its secret get 401.
    Revoke { key_id: String },
    /// Lists keys (ids, names, accounts, statuses; never secrets), of one account or all.
    List { account: Option<String> },
}

#[derive(Debug, Clone, Subcommand)]
pub enum AccountsCommand {
    /// Creates or changes an account; flags left out keep their current value (for a
    /// new account: the plan's overage default and `active`).
    Set {
        account: String,
        #[arg(long)]
        plan: String,
        #[arg(long, value_parser = on_off)]
        overage: Option<bool>,
        #[arg(long, value_parser = ["active", "suspended"])]
        status: Option<String>,
        /// How long after a click a conversion is attributed to it (default 90 days).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(shared::registry::MAX_ATTRIBUTION_WINDOW_DAYS)))]
        attribution_window_days: Option<u16>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum CodesCommand {
    /// Adds a code to an account, or re-activates it (a code moves to the named account).
    Add {
        code: String,
        #[arg(long)]
        account: String,
    },
    /// Disables a code: its clicks get 400 `unknown referral code`.
    Disable { code: String },
    /// Adds every `code,account` line of a CSV file, or nothing when any line is bad.
    Import { file: std::path::PathBuf },
}

fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("must be on or off".into()),
    }
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "CONSUMER_LISTEN",
        default_value = "127.0.0.1:9101",
        global = true
    )]
    pub listen: SocketAddr,

    #[arg(
        long,
        env = "CONSUMER_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    pub kafka_brokers: String,

    #[arg(
        long,
        env = "CONSUMER_KAFKA_TOPIC",
        default_value = "referral_clicks",
        global = true
    )]
    pub kafka_topic: String,

    /// Where undecodable or invalid messages go, with the reason in a header.
    #[arg(
        long,
        env = "CONSUMER_DLQ_TOPIC",
        default_value = "referral_clicks_dlq",
        global = true
    )]
    pub dlq_topic: String,

    #[arg(
        long,
        env = "CONSUMER_GROUP_ID",
        default_value = "referral-clicks-clickhouse",
        global = true
    )]
    pub group_id: String,

    /// Partitions of the topics `setup` creates.
    #[arg(
        long,
        env = "CONSUMER_TOPIC_PARTITIONS",
        value_parser = clap::value_parser!(i32).range(1..=10_000),
        default_value_t = 8,
        global = true
    )]
    pub topic_partitions: i32,

    /// Replication factor of the topics `setup` creates.
    #[arg(
        long,
        env = "CONSUMER_TOPIC_REPLICATION",
        value_parser = clap::value_parser!(i32).range(1..),
        default_value_t = 1,
        global = true
    )]
    pub topic_replication: i32,

    #[arg(
        long,
        env = "CONSUMER_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123",
        global = true
    )]
    pub clickhouse_url: String,

    #[arg(
        long,
        env = "CONSUMER_CLICKHOUSE_DATABASE",
        default_value = "referrals",
        global = true
    )]
    pub clickhouse_database: String,

    #[arg(
        long,
        env = "CONSUMER_CLICKHOUSE_TABLE",
        default_value = "referral_clicks",
        global = true
    )]
    pub clickhouse_table: String,

    #[arg(
        long,
        env = "CONSUMER_CLICKHOUSE_USER",
        default_value = "default",
        global = true
    )]
    pub clickhouse_user: String,

    #[arg(
        long,
        env = "CONSUMER_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true,
        global = true
    )]
    pub clickhouse_password: String,

    /// Flush when this many rows are buffered.
    #[arg(
        long,
        env = "CONSUMER_BATCH_MAX_ROWS",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..),
        default_value_t = 50_000,
        global = true
    )]
    pub batch_max_rows: usize,

    /// Flush when the oldest buffered row is this old. With plan groups a flush is a few
    /// inserts whatever the partitions, so 500 ms keeps freshness p99 under 1 s (tests/README.md).
    #[arg(
        long = "batch-max-age-ms",
        env = "CONSUMER_BATCH_MAX_AGE_MS",
        default_value = "500",
        value_parser = millis(1..),
        global = true
    )]
    pub batch_max_age: Duration,

    /// Fetching pauses above this many buffered rows (ClickHouse slow or down).
    #[arg(
        long,
        env = "CONSUMER_MAX_BUFFERED_ROWS",
        default_value_t = 200_000,
        global = true
    )]
    pub max_buffered_rows: usize,

    /// A click id seen again within this window is the same click (a client retry).
    #[arg(
        long = "dedup-window-secs",
        env = "CONSUMER_DEDUP_WINDOW_SECS",
        default_value = "3600",
        value_parser = secs(1..),
        global = true
    )]
    pub dedup_window: Duration,

    /// Most click ids remembered per partition for the retry check.
    #[arg(
        long,
        env = "CONSUMER_DEDUP_MAX_IDS",
        default_value_t = 1_000_000,
        global = true
    )]
    pub dedup_max_ids: usize,

    /// Extra librdkafka properties for the consumer, the dead-letter producer and the admin
    /// client, `key=value` separated by commas (SASL, TLS). Keys the exactly-once design
    /// depends on (group.id, auto commit and offset store, auto.offset.reset,
    /// max.poll.interval.ms, acks, idempotence) are refused.
    #[arg(
        long,
        env = "CONSUMER_KAFKA_PROPERTIES",
        default_value = "",
        value_parser = KafkaProperties::parse,
        global = true
    )]
    pub kafka_properties: KafkaProperties,

    #[arg(
        long = "flush-deadline-ms",
        env = "CONSUMER_FLUSH_DEADLINE_MS",
        default_value = "60000",
        value_parser = millis(1..=MAX_POLL_INTERVAL_MS / 2),
        help = "One deadline for a whole flush (plans, inserts, reloads) and for a dead letter; must stay below max.poll.interval.ms (300000)",
        global = true
    )]
    pub flush_deadline: Duration,

    #[arg(
        long = "dedup-trust-secs",
        env = "CONSUMER_DEDUP_TRUST_SECS",
        default_value = "600",
        value_parser = secs(..),
        help = "Another member's plan younger than this is replayed on the server's deduplication window alone; older ones first ask which rows are stored",
        global = true
    )]
    pub dedup_trust: Duration,

    #[arg(
        long,
        env = "CONSUMER_INSERT_CONCURRENCY",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..),
        default_value_t = 4,
        help = "Partitions inserted at the same time in one flush",
        global = true
    )]
    pub insert_concurrency: usize,

    /// `on`: the plans of a flush are recorded in groups, each inserted as one (consumer/README.md,
    /// "How a click stays exactly once"). `off` while consumers older than plan groups
    /// (migration 0008) still run in the same group: such a member replays a plan of a
    /// group alone, under the plan's own token, which the server does not take for the
    /// group's insert. Turn it on once every member runs this version.
    #[arg(long, env = "CONSUMER_PLAN_GROUPS", default_value = "on", value_parser = on_off, action = clap::ArgAction::Set, global = true)]
    pub plan_groups: bool,

    /// Timeout of one insert attempt (and of each plan and id query).
    #[arg(
        long = "insert-timeout-ms",
        env = "CONSUMER_INSERT_TIMEOUT_MS",
        default_value = "30000",
        value_parser = millis(1..),
        global = true
    )]
    pub insert_timeout: Duration,

    /// Longest wait between insert retries (exponential backoff from 100 ms).
    #[arg(
        long = "retry-max-backoff-ms",
        env = "CONSUMER_RETRY_MAX_BACKOFF_MS",
        default_value = "10000",
        value_parser = millis(100..),
        global = true
    )]
    pub retry_max_backoff: Duration,

    /// Re-join the group when this member has had no partitions for this many seconds
    /// (0: never). Apache Kafka does not need it (keep 0 there: with more members than
    /// partitions it would cause needless rebalances). The tansu broker of the local stack
    /// does: after it evicts a crashed group leader it does not tell the other members to
    /// rejoin, leaving them with the empty assignment of the dead generation.
    #[arg(
        long = "rejoin-idle-secs",
        env = "CONSUMER_REJOIN_IDLE_SECS",
        default_value = "0",
        value_parser = secs(..),
        global = true
    )]
    pub rejoin_idle: Duration,

    /// The registry's accounts topic (compacted).
    #[arg(long, env = "CONSUMER_ACCOUNTS_TOPIC", default_value = shared::registry::ACCOUNTS_TOPIC, global = true)]
    pub accounts_topic: String,

    /// The registry's codes topic (compacted).
    #[arg(long, env = "CONSUMER_CODES_TOPIC", default_value = shared::registry::CODES_TOPIC, global = true)]
    pub codes_topic: String,

    /// The API keys of the conversions endpoint (compacted; hashes, never secrets).
    #[arg(long, env = "CONSUMER_KEYS_TOPIC", default_value = shared::registry::KEYS_TOPIC, global = true)]
    pub keys_topic: String,

    /// Conversions published by ingest; stored in the `conversions` table by the same
    /// pipeline as the clicks, in the consumer group `CONSUMER_GROUP_ID` + `-conversions`.
    #[arg(long, env = "CONSUMER_CONVERSIONS_TOPIC", default_value = shared::registry::CONVERSIONS_TOPIC, global = true)]
    pub conversions_topic: String,

    /// Refused-click counts published by ingest.
    #[arg(long, env = "CONSUMER_REFUSALS_TOPIC", default_value = shared::registry::REFUSALS_TOPIC, global = true)]
    pub refusals_topic: String,

    /// The plan catalogue (validated at start; written to ClickHouse's `plans` table);
    /// default: the copy built into the binary (deploy/plans/catalogue.json).
    #[arg(long, env = "CONSUMER_PLANS_FILE", global = true)]
    pub plans_file: Option<std::path::PathBuf>,

    /// Length of referral codes (as ingest's INGEST_CODE_LENGTH): the commands refuse others.
    #[arg(
        long,
        env = "CONSUMER_CODE_LENGTH",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=shared::click::MAX_CODE_LEN as u64),
        default_value_t = 12,
        global = true
    )]
    pub code_length: usize,

    /// Apply migrations when `run` starts.
    #[arg(long, env = "CONSUMER_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub migrate_on_start: bool,

    /// On SIGTERM, how long the last insert may keep retrying before giving up (nothing
    /// is committed then, so the clicks are read again by the next consumer).
    #[arg(
        long = "shutdown-grace-secs",
        env = "CONSUMER_SHUTDOWN_GRACE_SECS",
        default_value = "25",
        value_parser = secs(..),
        global = true
    )]
    pub shutdown_grace: Duration,
}

/// Conversions that start a flush; at most four times this are held (fetching pauses), so
/// one flush never holds more. Each flush also claims its conversions and computes their
/// attribution (`crate::settle`), a fraction of a second per 5,000 whatever is stored
/// (tests/README.md): small flushes keep every one far inside the flush deadline.
pub const CONVERSIONS_BATCH_MAX_ROWS: usize = 5_000;

impl Config {
    /// The settings of the conversions pipeline: its topic and consumer group, batches of
    /// at most [`CONVERSIONS_BATCH_MAX_ROWS`], the rest shared with the clicks'.
    pub fn for_conversions(&self) -> Self {
        Self {
            kafka_topic: self.conversions_topic.clone(),
            group_id: format!("{}-conversions", self.group_id),
            batch_max_rows: self.batch_max_rows.min(CONVERSIONS_BATCH_MAX_ROWS),
            // A flush takes all in hand (after an outage, everything buffered): bounded so.
            max_buffered_rows: self.max_buffered_rows.min(4 * CONVERSIONS_BATCH_MAX_ROWS),
            ..self.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let ident = |name: &str, value: &str| {
            let ok = !value.is_empty()
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !value.as_bytes()[0].is_ascii_digit();
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{name}: must be a plain identifier (letters, digits, _)"
                ))
            }
        };
        ident("CONSUMER_CLICKHOUSE_DATABASE", &self.clickhouse_database)?;
        ident("CONSUMER_CLICKHOUSE_TABLE", &self.clickhouse_table)?;
        if !(self.clickhouse_url.starts_with("http://")
            || self.clickhouse_url.starts_with("https://"))
        {
            return Err("CONSUMER_CLICKHOUSE_URL: must be an http(s) URL".into());
        }
        if self.kafka_topic.is_empty()
            || self.dlq_topic.is_empty()
            || self.kafka_topic == self.dlq_topic
        {
            return Err(
                "CONSUMER_KAFKA_TOPIC and CONSUMER_DLQ_TOPIC: must be set and differ".into(),
            );
        }
        self.kafka_properties
            .refuse("CONSUMER_KAFKA_PROPERTIES", CONSUMER_PROTECTED)?;
        let registry = [
            &self.accounts_topic,
            &self.codes_topic,
            &self.keys_topic,
            &self.refusals_topic,
            &self.conversions_topic,
        ];
        let clash = registry.iter().enumerate().any(|(i, t)| {
            t.is_empty()
                || **t == self.kafka_topic
                || **t == self.dlq_topic
                || registry[..i].contains(t)
        });
        if clash {
            return Err("CONSUMER_ACCOUNTS_TOPIC, CONSUMER_CODES_TOPIC, CONSUMER_KEYS_TOPIC, CONSUMER_REFUSALS_TOPIC, CONSUMER_CONVERSIONS_TOPIC: must be set and differ from each other and from the click topics".into());
        }
        if self.group_id.is_empty() {
            return Err("CONSUMER_GROUP_ID: must not be empty".into());
        }
        if self.max_buffered_rows < self.batch_max_rows {
            return Err(
                "CONSUMER_MAX_BUFFERED_ROWS: must be at least CONSUMER_BATCH_MAX_ROWS".into(),
            );
        }
        // Each bound is declared at its field; what is left relates two settings.
        if self.insert_timeout > self.flush_deadline {
            return Err("CONSUMER_FLUSH_DEADLINE_MS: at least CONSUMER_INSERT_TIMEOUT_MS".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn plan_groups_are_on_unless_turned_off() {
        let cli = Cli::try_parse_from(["consumer"]).expect("parses");
        assert!(cli.config.plan_groups);
        let cli = Cli::try_parse_from(["consumer", "--plan-groups", "off"]).expect("parses");
        assert!(!cli.config.plan_groups);
        let cli = Cli::try_parse_from(["consumer", "--plan-groups", "on"]).expect("parses");
        assert!(cli.config.plan_groups);
        assert!(Cli::try_parse_from(["consumer", "--plan-groups", "yes"]).is_err());
    }

    #[test]
    fn the_conversions_pipeline_has_its_topic_group_and_small_flushes() {
        let cli = Cli::try_parse_from(["consumer", "--group-id", "g"]).expect("parses");
        let c = cli.config.for_conversions();
        assert_eq!(
            (c.kafka_topic.as_str(), c.group_id.as_str()),
            ("referral_conversions", "g-conversions")
        );
        assert_eq!((c.batch_max_rows, c.max_buffered_rows), (5_000, 20_000));
        assert_eq!(c.dlq_topic, cli.config.dlq_topic);
        // Smaller settings of the operator's stand.
        let cli = Cli::try_parse_from([
            "consumer",
            "--batch-max-rows",
            "300",
            "--max-buffered-rows",
            "2000",
        ])
        .expect("parses");
        let c = cli.config.for_conversions();
        assert_eq!((c.batch_max_rows, c.max_buffered_rows), (300, 2000));
    }

    #[test]
    fn defaults_are_valid_and_subcommand_optional() {
        let cli = Cli::try_parse_from(["consumer"]).expect("parses");
        assert!(cli.command.is_none());
        assert!(cli.config.validate().is_ok());
        assert_eq!(cli.config.listen.to_string(), "127.0.0.1:9101");
        let cli =
            Cli::try_parse_from(["consumer", "setup", "--topic-partitions", "4"]).expect("parses");
        assert!(matches!(cli.command, Some(Command::Setup)));
        assert_eq!(cli.config.topic_partitions, 4);
    }

    #[test]
    fn protected_kafka_properties_are_refused() {
        let cli = Cli::try_parse_from(["consumer", "--kafka-properties", "security.protocol=SSL"])
            .expect("parses");
        assert!(cli.config.validate().is_ok());
        let cli =
            Cli::try_parse_from(["consumer", "--kafka-properties", "enable.auto.commit=true"])
                .expect("parses");
        assert!(cli
            .config
            .validate()
            .expect_err("refused")
            .starts_with("CONSUMER_KAFKA_PROPERTIES"));
    }

    #[test]
    fn ranges_are_declared_at_the_fields_and_name_the_variable() {
        let cli = Cli::try_parse_from(["consumer"]).expect("parses");
        assert_eq!(cli.config.batch_max_age, Duration::from_millis(500));
        assert_eq!(cli.config.dedup_window, Duration::from_secs(3600));
        for (flag, value, var) in [
            (
                "--flush-deadline-ms",
                "150001",
                "CONSUMER_FLUSH_DEADLINE_MS",
            ),
            (
                "--retry-max-backoff-ms",
                "99",
                "CONSUMER_RETRY_MAX_BACKOFF_MS",
            ),
            ("--topic-partitions", "0", "CONSUMER_TOPIC_PARTITIONS"),
            ("--batch-max-rows", "0", "CONSUMER_BATCH_MAX_ROWS"),
        ] {
            let err = Cli::try_parse_from(["consumer", flag, value]).expect_err("out of range");
            let msg = shared::cli::naming_env(err, &mut Cli::command()).to_string();
            assert!(
                msg.contains(&format!("{var} ({flag}): invalid value `{value}`")),
                "{msg}"
            );
        }
        let cli = Cli::try_parse_from([
            "consumer",
            "--insert-timeout-ms",
            "20000",
            "--flush-deadline-ms",
            "10000",
        ])
        .expect("each in range");
        assert!(cli
            .config
            .validate()
            .expect_err("insert timeout over the flush deadline")
            .starts_with("CONSUMER_FLUSH_DEADLINE_MS"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cli =
            Cli::try_parse_from(["consumer", "--clickhouse-table", "x; DROP"]).expect("parses");
        assert!(cli
            .config
            .validate()
            .expect_err("bad")
            .starts_with("CONSUMER_CLICKHOUSE_TABLE"));
        let cli = Cli::try_parse_from([
            "consumer",
            "--batch-max-rows",
            "10",
            "--max-buffered-rows",
            "5",
        ])
        .expect("parses");
        assert!(cli
            .config
            .validate()
            .expect_err("bad")
            .starts_with("CONSUMER_MAX_BUFFERED_ROWS"));
    }
}
