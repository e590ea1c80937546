-- A file its sender deleted, or that outlived the retention, keeps its row as
-- a tombstone while messages refer to it: its parts are gone and it counts
-- no more against the quota, and the messages show it as deleted
-- (docs/files.md).
ALTER TABLE blobs ADD COLUMN deleted_at INTEGER;
-- The retention sweep's scan: oldest blobs not yet deleted.
CREATE INDEX blobs_created ON blobs (created_at) WHERE deleted_at IS NULL;
-- A page of messages asks which of its files were deleted.
CREATE INDEX blob_refs_message ON blob_refs (conv_id, seq);
