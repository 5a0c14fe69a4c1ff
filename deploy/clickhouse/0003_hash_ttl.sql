-- The keyed IP/UA hashes are only needed for abuse and unique-visitor analytics of recent
-- months; after 13 months they are reset to zeros, so old rows keep their counts but no
-- longer link visitors. (Until 2026-11 this file was 0100 and skipped on ClickHouse 18.16;
-- re-applying it where it already ran is harmless.)
ALTER TABLE {{clicks_table}} MODIFY COLUMN ip_hash FixedString(32) TTL received_at + INTERVAL 13 MONTH;
ALTER TABLE {{clicks_table}} MODIFY COLUMN ua_hash FixedString(32) TTL received_at + INTERVAL 13 MONTH;
