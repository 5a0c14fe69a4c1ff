//! Typed configuration from flags and `INGEST_*` environment variables, validated at
//! start-up: a wrong value stops the process with a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

use clap::builder::RangedU64ValueParser;
use shared::cli::{millis, secs};
use shared::click::MAX_CODE_LEN;
use shared::hashing::KeyedHasher;
use shared::kafka_properties::{KafkaProperties, PRODUCER_PROTECTED};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ingest",
    about = "Referral click endpoint: validates, hashes and publishes clicks to Kafka"
)]
pub struct Config {
    /// Address of the API, /metrics, /healthz and /readyz.
    #[arg(long, env = "INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers.
    #[arg(long, env = "INGEST_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// Topic the clicks are published to.
    #[arg(long, env = "INGEST_KAFKA_TOPIC", default_value = "referral_clicks")]
    pub kafka_topic: String,

    /// Extra librdkafka producer properties, `key=value` separated by commas
    /// (e.g. `security.protocol=SASL_SSL,sasl.mechanisms=PLAIN`).
    /// `acks` and `enable.idempotence` are refused: 2xx-after-ack depends on them.
    #[arg(long, env = "INGEST_KAFKA_PROPERTIES", default_value = "", value_parser = KafkaProperties::parse)]
    pub kafka_properties: KafkaProperties,

    /// Secret key of the IP/User-Agent hashes, at least 32 bytes. Required; never logged.
    #[arg(long, env = "INGEST_HASH_KEY", hide_env_values = true)]
    pub hash_key: String,

    /// Secret key of the customer-id hashes of conversions, at least 32 bytes; default:
    /// `INGEST_HASH_KEY`. Set it to the current hash key before rotating that one, and
    /// never change it: a customer's conversions are joined by this hash. Never logged.
    #[arg(long, env = "INGEST_CUSTOMER_HASH_KEY", hide_env_values = true)]
    pub customer_hash_key: Option<String>,

    /// Id stored beside each hash, so the key can be rotated.
    #[arg(long, env = "INGEST_HASH_KEY_ID", default_value = "k1")]
    pub hash_key_id: String,

    /// Length of a referral code.
    #[arg(long, env = "INGEST_CODE_LENGTH", default_value_t = 12,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_CODE_LEN as u64))]
    pub code_length: usize,

    /// Largest request body after gzip decoding, in bytes.
    #[arg(long, env = "INGEST_BODY_LIMIT_BYTES", default_value_t = 16 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(64..=1 << 20))]
    pub body_limit_bytes: usize,

    /// Requests a minute per client IP (token bucket refill).
    #[arg(long, env = "INGEST_RATE_LIMIT_PER_MINUTE", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_minute: u32,

    /// Burst size of the per-IP token bucket.
    #[arg(long, env = "INGEST_RATE_LIMIT_BURST", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,

    /// Requests a minute per network (/24 for IPv4, /48 for IPv6), on top of the per-IP limit.
    #[arg(
        long,
        env = "INGEST_RATE_LIMIT_NETWORK_PER_MINUTE",
        default_value_t = 1920,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub rate_limit_network_per_minute: u32,

    /// Burst size of the per-network bucket.
    #[arg(long, env = "INGEST_RATE_LIMIT_NETWORK_BURST", default_value_t = 320,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_network_burst: u32,

    /// Most addresses (and most networks) the per-IP limiter tracks; past it, new clients
    /// share overflow buckets. Bounds memory under a flood of fresh addresses.
    #[arg(long, env = "INGEST_RATE_LIMIT_MAX_TRACKED", default_value_t = 100_000,
          value_parser = RangedU64ValueParser::<usize>::new().range(1000..=100_000_000))]
    pub rate_limit_max_tracked: usize,

    /// CIDRs of proxies whose X-Forwarded-For / Forwarded headers are believed, comma-separated.
    #[arg(long, env = "INGEST_TRUSTED_PROXIES", default_value = "", value_parser = parse_cidrs)]
    pub trusted_proxies: Cidrs,

    /// The one header trusted proxies write the client address into: `x-forwarded-for`
    /// or `forwarded`. The other header is ignored.
    #[arg(
        long,
        env = "INGEST_CLIENT_IP_HEADER",
        value_enum,
        default_value = "x-forwarded-for"
    )]
    pub client_ip_header: crate::client_ip::ClientIpHeader,

    /// Origins allowed to post from a browser (CORS), comma-separated; `*` for any (then
    /// answered with `*` and without credentials, so browsers send and store no cookie).
    #[arg(long, env = "INGEST_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,

    /// `on`: the click route answers requests without credentials (what the browser script
    /// sends) from any origin with `Access-Control-Allow-Origin: *`, so a page can read
    /// whether its click was accepted; origins in INGEST_CORS_ORIGINS still get their own
    /// origin with credentials. `off`: only the listed origins get an answer they can read.
    #[arg(long, env = "INGEST_CORS_ANY_ORIGIN", value_enum, default_value = "on")]
    pub cors_any_origin: OnOff,

    /// Name of the click cookie set on success; empty: no cookie.
    #[arg(long, env = "INGEST_COOKIE_NAME", default_value = "")]
    pub cookie_name: String,

    /// Domain attribute of the click cookie; empty: host-only.
    #[arg(long, env = "INGEST_COOKIE_DOMAIN", default_value = "")]
    pub cookie_domain: String,

    /// SameSite of the click cookie: `lax` (browsers keep it for same-site requests only),
    /// or `none` for a tracking domain that pages on other sites call (always `Secure`).
    #[arg(
        long,
        env = "INGEST_COOKIE_SAMESITE",
        value_enum,
        default_value = "lax"
    )]
    pub cookie_samesite: SameSite,

    /// Max-Age of the click cookie, in seconds.
    #[arg(long = "cookie-max-age-secs", env = "INGEST_COOKIE_MAX_AGE_SECS",
          default_value = "2592000", value_parser = secs(..))]
    pub cookie_max_age: Duration,

    /// How long a request waits for the broker's acknowledgement before a 503.
    #[arg(long = "produce-timeout-ms", env = "INGEST_PRODUCE_TIMEOUT_MS",
          default_value = "5000", value_parser = millis(100..))]
    pub produce_timeout: Duration,

    /// Producer queue bound (messages); when full, requests get 503 at once.
    #[arg(long, env = "INGEST_QUEUE_MAX_MESSAGES", default_value_t = 100_000)]
    pub queue_max_messages: u32,

    /// Producer linger: how long librdkafka waits to fill a batch. Every click waits for its
    /// ack, so linger adds to each request; measured here: 1 ms gives 2.4x the throughput of
    /// 5 ms at 64 connections (batches still fill while earlier requests are in flight).
    #[arg(long = "linger-ms", env = "INGEST_LINGER_MS", default_value = "1",
          value_parser = millis(..=900_000))]
    pub linger: Duration,

    /// Time a client has to send the request headers.
    #[arg(long = "header-timeout-ms", env = "INGEST_HEADER_TIMEOUT_MS",
          default_value = "5000", value_parser = millis(1..))]
    pub header_timeout: Duration,

    /// Time a client has to send the whole body.
    #[arg(long = "body-timeout-ms", env = "INGEST_BODY_TIMEOUT_MS",
          default_value = "10000", value_parser = millis(1..))]
    pub body_timeout: Duration,

    /// Most connections open at once; more wait in the listen backlog until one closes.
    #[arg(long, env = "INGEST_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Most connections one client address (an IPv6 /64) may hold open; more are closed at
    /// once, so one host cannot take every connection. Peers in INGEST_TRUSTED_PROXIES are
    /// not capped by it (behind a proxy every connection is the proxy's).
    #[arg(long, env = "INGEST_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 256,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_client: usize,

    /// Requests served on one connection before it is closed (with the last answer), so a
    /// client cannot keep one forever; a 429 closes its connection too.
    #[arg(long, env = "INGEST_MAX_REQUESTS_PER_CONNECTION", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_requests_per_connection: u32,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long = "shutdown-grace-secs", env = "INGEST_SHUTDOWN_GRACE_SECS",
          default_value = "25", value_parser = secs(..))]
    pub shutdown_grace: Duration,

    /// The registry's accounts topic (compacted; read whole at start, then followed).
    #[arg(long, env = "INGEST_ACCOUNTS_TOPIC", default_value = shared::registry::ACCOUNTS_TOPIC)]
    pub accounts_topic: String,

    /// The registry's codes topic (compacted; read whole at start, then followed).
    #[arg(long, env = "INGEST_CODES_TOPIC", default_value = shared::registry::CODES_TOPIC)]
    pub codes_topic: String,

    /// The API keys topic of the conversions endpoint (compacted; read whole at start,
    /// then followed, like the codes).
    #[arg(long, env = "INGEST_KEYS_TOPIC", default_value = shared::registry::KEYS_TOPIC)]
    pub keys_topic: String,

    /// Where accepted conversions are published.
    #[arg(long, env = "INGEST_CONVERSIONS_TOPIC", default_value = shared::registry::CONVERSIONS_TOPIC)]
    pub conversions_topic: String,

    /// Conversions a minute per API key (a token bucket per key, on each instance).
    #[arg(long, env = "INGEST_KEY_RATE_PER_MINUTE", default_value_t = 6000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub key_rate_per_minute: u32,

    /// Burst size of the per-key token bucket.
    #[arg(long, env = "INGEST_KEY_RATE_BURST", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub key_rate_burst: u32,

    /// ClickHouse holding the consumer's mirror of the codes topic: at start, codes are
    /// loaded from it and only the topic's tail is read (a full read of a large registry is
    /// slow on some brokers). Empty: always read the whole topic. Unreachable or out of date
    /// for the topic: the whole topic is read.
    #[arg(
        long,
        env = "INGEST_REGISTRY_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub registry_clickhouse_url: String,

    #[arg(
        long,
        env = "INGEST_REGISTRY_CLICKHOUSE_DATABASE",
        default_value = "referrals"
    )]
    pub registry_clickhouse_database: String,

    #[arg(
        long,
        env = "INGEST_REGISTRY_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub registry_clickhouse_user: String,

    #[arg(
        long,
        env = "INGEST_REGISTRY_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub registry_clickhouse_password: String,

    /// Where refused-click counts per account and limit are published (counts, not clicks).
    #[arg(long, env = "INGEST_REFUSALS_TOPIC", default_value = shared::registry::REFUSALS_TOPIC)]
    pub refusals_topic: String,

    /// How often the refusal counts are published, in seconds.
    #[arg(long = "refusals-interval-secs", env = "INGEST_REFUSALS_INTERVAL_SECS",
          default_value = "5", value_parser = secs(1..=3600))]
    pub refusals_interval: Duration,

    /// The plan catalogue (JSON, see deploy/plans/catalogue.json); empty: the copy built
    /// into the binary.
    #[arg(long, env = "INGEST_PLANS_FILE")]
    pub plans_file: Option<std::path::PathBuf>,

    /// Plan limits per account (rate, daily cap, included credits): `on` or `off`.
    #[arg(long, env = "INGEST_PLAN_LIMITS", value_enum, default_value = "on")]
    pub plan_limits: OnOff,

    /// Redis holding the limit counters all ingest instances share.
    #[arg(
        long,
        env = "INGEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Prefix of the keys ingest writes in Redis.
    #[arg(long, env = "INGEST_REDIS_PREFIX", default_value = "refclk:")]
    pub redis_prefix: String,

    /// How long a click may wait for Redis before this instance decides alone (its share).
    #[arg(long = "limits-redis-timeout-ms", env = "INGEST_LIMITS_REDIS_TIMEOUT_MS",
          default_value = "20", value_parser = millis(1..=10_000))]
    pub limits_redis_timeout: Duration,

    /// Ingest instances to assume at least when sharing limits without Redis.
    #[arg(long, env = "INGEST_LIMITS_EXPECTED_INSTANCES", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub limits_expected_instances: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SameSite {
    Lax,
    None,
}

impl SameSite {
    pub fn attribute(self) -> &'static str {
        match self {
            Self::Lax => "SameSite=Lax",
            Self::None => "SameSite=None",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Cidrs(pub Vec<IpNet>);

fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{c}` is not an IP address or CIDR"))
        })
        .collect::<Result<_, _>>()
        .map(Cidrs)
}

/// Everything derived from the config that can fail, checked once at start-up.
pub struct Validated {
    pub hasher: KeyedHasher,
    /// Of customer ids ([`KeyedHasher::hash_customer`]).
    pub customer_hasher: KeyedHasher,
    pub cors: CorsOrigins,
    pub catalogue: std::sync::Arc<shared::plans::Catalogue>,
}

#[derive(Debug, Clone)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

impl CorsOrigins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Self::Any => true,
            Self::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<Validated, String> {
        let hasher =
            KeyedHasher::new(self.hash_key.as_bytes(), &self.hash_key_id).map_err(|e| match e {
                shared::hashing::KeyError::TooShort(_) => format!("INGEST_HASH_KEY: {e}"),
                shared::hashing::KeyError::BadKeyId => format!("INGEST_HASH_KEY_ID: {e}"),
            })?;
        let customer_key = self.customer_hash_key.as_deref().unwrap_or(&self.hash_key);
        let customer_hasher = KeyedHasher::new(customer_key.as_bytes(), "customer")
            .map_err(|e| format!("INGEST_CUSTOMER_HASH_KEY: {e}"))?;
        self.kafka_properties
            .refuse("INGEST_KAFKA_PROPERTIES", PRODUCER_PROTECTED)?;
        if self.kafka_topic.is_empty() || self.kafka_brokers.is_empty() {
            return Err("INGEST_KAFKA_TOPIC and INGEST_KAFKA_BROKERS: must not be empty".into());
        }
        if !self.cookie_name.is_empty() && !is_cookie_token(&self.cookie_name) {
            return Err(
                "INGEST_COOKIE_NAME: must be a cookie token (letters, digits, !#$%&'*+-.^_`|~)"
                    .into(),
            );
        }
        if !self.cookie_domain.is_empty()
            && !self
                .cookie_domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err("INGEST_COOKIE_DOMAIN: must be a host name".into());
        }
        let origins: Vec<String> = self
            .cors_origins
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        let cors = if origins.iter().any(|o| o == "*") {
            CorsOrigins::Any
        } else {
            for o in &origins {
                if !(o.starts_with("http://") || o.starts_with("https://"))
                    || o.bytes().any(|b| b.is_ascii_control() || b == b' ')
                {
                    return Err(format!(
                        "INGEST_CORS_ORIGINS: `{o}` is not an http(s) origin"
                    ));
                }
            }
            CorsOrigins::List(origins)
        };
        let catalogue = shared::plans::Catalogue::load_or_builtin(self.plans_file.as_deref())
            .map_err(|e| format!("INGEST_PLANS_FILE: {e}"))?;
        let topics = [
            &self.kafka_topic,
            &self.accounts_topic,
            &self.codes_topic,
            &self.refusals_topic,
            &self.keys_topic,
            &self.conversions_topic,
        ];
        for (i, t) in topics.iter().enumerate() {
            if t.is_empty() || topics[..i].contains(t) {
                return Err("INGEST_KAFKA_TOPIC, INGEST_ACCOUNTS_TOPIC, INGEST_CODES_TOPIC, INGEST_REFUSALS_TOPIC, INGEST_KEYS_TOPIC, INGEST_CONVERSIONS_TOPIC: must be set and all differ".into());
            }
        }
        let url = &self.registry_clickhouse_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err("INGEST_REGISTRY_CLICKHOUSE_URL: an http(s) URL, or empty".into());
        }
        if !self
            .registry_clickhouse_database
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err("INGEST_REGISTRY_CLICKHOUSE_DATABASE: letters, digits and _ only".into());
        }
        redis::Client::open(self.redis_url.as_str())
            .map_err(|e| format!("INGEST_REDIS_URL: {e}"))?;
        if !self
            .redis_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b))
        {
            return Err("INGEST_REDIS_PREFIX: letters, digits and _-:. only".into());
        }
        Ok(Validated {
            hasher,
            customer_hasher,
            cors,
            catalogue: std::sync::Arc::new(catalogue),
        })
    }

    /// Brokers plus the operator's extra properties: the base of every Kafka client.
    pub fn kafka_client(&self) -> rdkafka::ClientConfig {
        let mut cc = rdkafka::ClientConfig::new();
        cc.set("bootstrap.servers", &self.kafka_brokers);
        for (k, v) in self.kafka_properties.iter() {
            cc.set(k, v);
        }
        cc
    }
}

fn is_cookie_token(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn base() -> Vec<&'static str> {
        vec!["ingest", "--hash-key", "0123456789abcdef0123456789abcdef"]
    }

    #[test]
    fn defaults_work_on_a_laptop() {
        let c = Config::try_parse_from(base()).expect("parses");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.kafka_topic, "referral_clicks");
        assert_eq!((c.rate_limit_per_minute, c.rate_limit_burst), (120, 20));
        assert_eq!(c.body_limit_bytes, 16 * 1024);
        assert_eq!(c.produce_timeout, Duration::from_secs(5));
        assert_eq!(c.cookie_max_age, Duration::from_secs(30 * 24 * 3600));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn wrong_values_name_the_variable() {
        let mut args = base();
        args[2] = "short";
        let err = Config::try_parse_from(args)
            .expect("parses")
            .validate()
            .err()
            .expect("invalid");
        assert!(err.starts_with("INGEST_HASH_KEY:"), "{err}");
        let mut args = base();
        args.extend(["--customer-hash-key", "short"]);
        let err = Config::try_parse_from(args)
            .expect("parses")
            .validate()
            .err()
            .expect("invalid");
        assert!(err.starts_with("INGEST_CUSTOMER_HASH_KEY:"), "{err}");

        // Ranges are declared at the fields: clap refuses the value, and the message names
        // the variable as well as the flag.
        for (flags, var) in [
            (&["--code-length", "0"][..], "INGEST_CODE_LENGTH"),
            (
                &["--produce-timeout-ms", "99"][..],
                "INGEST_PRODUCE_TIMEOUT_MS",
            ),
            (
                &["--refusals-interval-secs", "3601"][..],
                "INGEST_REFUSALS_INTERVAL_SECS",
            ),
            (&["--max-connections", "0"][..], "INGEST_MAX_CONNECTIONS"),
        ] {
            let mut args = base();
            args.extend(flags);
            let err = Config::try_parse_from(args).expect_err("out of range");
            let msg = shared::cli::naming_env(err, &mut Config::command()).to_string();
            assert!(
                msg.contains(&format!("{var} ({}): invalid value", flags[0])),
                "{msg}"
            );
        }

        let mut args = base();
        args.extend(["--cors-origins", "example.com"]);
        let err = Config::try_parse_from(args)
            .expect("parses")
            .validate()
            .err()
            .expect("invalid");
        assert!(err.starts_with("INGEST_CORS_ORIGINS"), "{err}");

        let mut args = base();
        args.extend(["--trusted-proxies", "10.0.0.0/8,not-an-ip"]);
        assert!(Config::try_parse_from(args).is_err());

        for (flags, var) in [
            (
                &["--plans-file", "/nonexistent/plans.json"][..],
                "INGEST_PLANS_FILE",
            ),
            (&["--redis-url", "nonsense://x"][..], "INGEST_REDIS_URL"),
            (
                &["--codes-topic", "referral_clicks"][..],
                "INGEST_KAFKA_TOPIC",
            ),
        ] {
            let mut args = base();
            args.extend(flags);
            let err = Config::try_parse_from(args)
                .expect("parses")
                .validate()
                .err()
                .expect("invalid");
            assert!(err.starts_with(var), "{err}");
        }
    }

    #[test]
    fn parses_lists() {
        let mut args = base();
        args.extend([
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.1.1",
            "--kafka-properties",
            "a=b, c = d",
        ]);
        let c = Config::try_parse_from(args).expect("parses");
        assert_eq!(c.trusted_proxies.0.len(), 2);
        assert_eq!(
            c.kafka_properties.0,
            vec![("a".into(), "b".into()), ("c".into(), "d".into())]
        );
    }
}
