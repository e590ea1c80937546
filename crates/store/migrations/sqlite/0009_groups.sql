-- Groups (docs/protocol.md §5.10): every conversation is a set of members.
-- A group has a name; a member a role and the span of the conversation it
-- sees: the messages after joined_seq and, once it left or was removed, up
-- to left_seq (its own `left`/`removed` event). A former member's row
-- stays, so that what it saw stays readable to it; a member added again
-- starts a new span.
ALTER TABLE conversations ADD COLUMN name TEXT;
ALTER TABLE members ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
ALTER TABLE members ADD COLUMN joined_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN left_seq INTEGER;
-- A membership event the server wrote into the stream (JSON, the protocol's
-- ConvEvent); its body is empty. NULL for a message.
ALTER TABLE messages ADD COLUMN event TEXT;
-- When each member of a group last moved its cursors, for "delivered at,
-- read at" of a message (`info`): the newest 16 moves of each cursor, 16
-- bytes each (seq and time, i64 big-endian), in the member's own row. The
-- first move at or past a seq is when the member got that far. Kept in the
-- row the cursor update writes anyway, and only in groups, whose rows sit
-- together: a table of moves, or these columns filled for the many small
-- rows of one-to-one conversations, made each commit write several times
-- the pages (1:1 throughput fell to about half).
ALTER TABLE members ADD COLUMN delivered_moves BLOB;
ALTER TABLE members ADD COLUMN read_moves BLOB;
