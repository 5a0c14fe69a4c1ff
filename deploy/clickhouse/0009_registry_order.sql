-- The registry mirror decides each key by the one order every reader applies
-- (shared::registry::message_version): the newer Kafka timestamp, then the higher
-- partition, then the later offset. From now on `version` holds that order instead of the
-- offset alone (one key's messages may sit in several partitions: another writer's
-- partitioner, or partitions added), and `kafka_offset` holds the offset, for ingest to
-- know how far the snapshot reaches in each partition. Rows mirrored before hold their
-- offset in `version`: every newer message outranks them.
ALTER TABLE codes ADD COLUMN IF NOT EXISTS kafka_offset UInt64 DEFAULT version;
