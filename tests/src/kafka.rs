//! Kafka: topics, reading them back, producing raw messages.

use crate::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        if let Err((name, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {name}"
            );
        }
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Reads every message of `topic` (all partitions, from the start) until `expected`
/// have arrived or `timeout` passes.
/// Every record of `topic` up to its current end (the high watermark of each partition),
/// however many: for checks that must see what lies past the expected count.
pub fn read_whole_topic(brokers: &str, topic: &str, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("watermark client");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let mut total = 0;
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                .expect("watermarks");
            total += usize::try_from(high - low).expect("watermarks in order");
        }
    }
    let records = read_topic(brokers, topic, total, timeout);
    assert_eq!(
        records.len(),
        total,
        "{topic}: read {} of {total}",
        records.len()
    );
    records
}

pub fn read_topic(brokers: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("e2e_reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Produces a tombstone (a message without a value) for `key`.
pub async fn produce_tombstone(brokers: &str, topic: &str, key: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::<str, [u8]>::to(topic).key(key),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

/// Produces raw payloads (e.g. poison messages) with acks=all.
pub async fn produce_raw(brokers: &str, topic: &str, messages: &[(Option<&str>, &[u8])]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    for (key, payload) in messages {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("produce");
    }
}

/// One message placed by hand: its partition and Kafka timestamp (what another writer, with
/// its own partitioner and clock, may produce); `None` is a tombstone.
pub struct Placed<'a> {
    pub partition: i32,
    pub timestamp_ms: i64,
    pub key: &'a str,
    pub value: Option<&'a [u8]>,
}

/// Produces each message to its partition with its timestamp, acks=all, in order.
pub async fn produce_placed(brokers: &str, topic: &str, messages: &[Placed<'_>]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .expect("producer");
    for m in messages {
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .key(m.key)
            .partition(m.partition)
            .timestamp(m.timestamp_ms);
        if let Some(v) = m.value {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("produce");
    }
}
