-- Plan groups (consumer/src/pipeline.rs, "Plan groups"): the plans a member records in one
-- flush form a group that goes into ClickHouse as one INSERT under the group's
-- deduplication token, instead of one INSERT per partition (each INSERT makes a part in the
-- table and in every view's target table, which is most of what a flush costs the server).
-- `group_id` names the group (a digest of its plans' tokens); `group_starts` lists the
-- (partition, lo) of all its plans, so a member holding only some of them can tell whether
-- the group can ever be inserted whole. Plans recorded before this migration have no group
-- and are inserted alone, as before.
ALTER TABLE {{clicks_table}}_plans ADD COLUMN IF NOT EXISTS group_id String DEFAULT '';
ALTER TABLE {{clicks_table}}_plans ADD COLUMN IF NOT EXISTS group_starts Array(Tuple(UInt16, UInt64));
