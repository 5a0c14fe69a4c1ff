-- Where each code's latest message sits in Kafka (`version` is already its offset), so an
-- ingest instance can load the registry's codes from here at start and read only the
-- topic's tail (a million codes from tansu's sqlite storage take 45 s to read; from here,
-- about a second). Rows mirrored before this migration have topic '' and are not used.
ALTER TABLE codes ADD COLUMN IF NOT EXISTS topic LowCardinality(String) DEFAULT '';
ALTER TABLE codes ADD COLUMN IF NOT EXISTS partition UInt16 DEFAULT 0;
