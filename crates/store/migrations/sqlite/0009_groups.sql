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
-- When each member's cursors moved, for "delivered at, read at" of any one
-- message (`info`): one row per move, never a row per message per member.
-- The first move at or past a seq is when the member got that far. kind: 0
-- delivered, 1 read.
CREATE TABLE cursor_moves (
    conv_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    PRIMARY KEY (conv_id, user_id, kind, seq)
) WITHOUT ROWID;
