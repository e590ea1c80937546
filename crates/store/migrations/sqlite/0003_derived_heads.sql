-- Written for speed under load (docs/performance.md):
-- A conversation's last seq and time are read from its newest message (one
-- step down the primary key) instead of being rewritten at every commit:
-- one random page less per conversation per commit.
ALTER TABLE conversations DROP COLUMN last_seq;
ALTER TABLE conversations DROP COLUMN last_ts;
-- The client-id index leads with the id: clients use time-ordered ids
-- (UUIDv7), so new entries land at the end of the index instead of on a
-- random page. It is still unique per (sender, id).
DROP INDEX messages_client_id;
CREATE UNIQUE INDEX messages_client_id ON messages (client_id, sender_id);
