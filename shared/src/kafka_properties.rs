//! Extra librdkafka properties from the environment (`key=value` separated by commas), for
//! what a deployment needs (SASL, TLS, client ids). Keys a binary's guarantees depend on
//! are refused at start-up instead of being silently overridden.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(pub Vec<(String, String)>);

/// What ingest's "2xx only after the broker acknowledged" relies on.
pub const PRODUCER_PROTECTED: &[&str] = &["acks", "request.required.acks", "enable.idempotence"];

/// What the consumer's "commit only what ClickHouse stored" relies on.
pub const CONSUMER_PROTECTED: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "max.poll.interval.ms",
    "acks",
    "request.required.acks",
    "enable.idempotence",
];

impl KafkaProperties {
    pub fn parse(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("`{pair}` is not key=value"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// An error naming `variable` and the first key of `protected` that is set.
    pub fn refuse(&self, variable: &str, protected: &[&str]) -> Result<(), String> {
        match self
            .0
            .iter()
            .find(|(k, _)| protected.iter().any(|p| p.eq_ignore_ascii_case(k)))
        {
            Some((k, _)) => Err(format!(
                "{variable}: `{k}` cannot be set here: the delivery guarantees depend on its fixed value"
            )),
            None => Ok(()),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_refuses_protected_keys() {
        let p = KafkaProperties::parse(" security.protocol=SASL_SSL , sasl.mechanisms=PLAIN,")
            .expect("parses");
        assert_eq!(p.0.len(), 2);
        assert!(p.refuse("X", PRODUCER_PROTECTED).is_ok());
        assert!(KafkaProperties::parse("nonsense").is_err());
        for key in [
            "acks",
            "ACKS",
            "enable.idempotence",
            "request.required.acks",
        ] {
            let p = KafkaProperties::parse(&format!("{key}=1")).expect("parses");
            let err = p
                .refuse("INGEST_KAFKA_PROPERTIES", PRODUCER_PROTECTED)
                .expect_err("refused");
            assert!(err.starts_with("INGEST_KAFKA_PROPERTIES: `"), "{err}");
        }
        let p = KafkaProperties::parse("enable.auto.commit=true").expect("parses");
        assert!(p
            .refuse("CONSUMER_KAFKA_PROPERTIES", CONSUMER_PROTECTED)
            .is_err());
    }
}
