-- confab schema v1 (SQLite). Applied once, inside a transaction, at start.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    read_receipts INTEGER NOT NULL DEFAULT 1,
    last_seen     INTEGER
);

-- Devices are never deleted, only marked removed, so that an id is never
-- reused and old messages keep a valid sender device.
CREATE TABLE devices (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    removed_at INTEGER
);
CREATE INDEX devices_user ON devices (user_id);

-- Only the SHA-256 of a token is kept: a stolen database holds no usable token.
CREATE TABLE sessions (
    token_hash BLOB    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users (id),
    device_id  INTEGER NOT NULL REFERENCES devices (id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_device ON sessions (device_id);

-- last_seq is assigned by the store's writer inside the commit that stores
-- the message. direct_key ("<low user id>:<high user id>") makes the 1:1
-- conversation of a pair unique, and so its id stable.
CREATE TABLE conversations (
    id         INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL DEFAULT 'direct',
    direct_key TEXT    UNIQUE,
    created_at INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    last_ts    INTEGER
);

-- Per member: receipt cursors aggregated over the member's devices (the
-- highest any device reached), and whether the member has ever sent here
-- (presence and typing are visible to a peer only after that).
CREATE TABLE members (
    conv_id       INTEGER NOT NULL REFERENCES conversations (id),
    user_id       INTEGER NOT NULL REFERENCES users (id),
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    read_seq      INTEGER NOT NULL DEFAULT 0,
    has_sent      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conv_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_user ON members (user_id, conv_id);

-- Per device: the highest seq the device confirmed, which is where its
-- next sync starts. A missing row means 0 (the conversation began after the
-- device was made); devices made later get rows at the head.
CREATE TABLE device_cursors (
    device_id     INTEGER NOT NULL REFERENCES devices (id),
    conv_id       INTEGER NOT NULL REFERENCES conversations (id),
    delivered_seq INTEGER NOT NULL,
    PRIMARY KEY (device_id, conv_id)
) WITHOUT ROWID;

CREATE TABLE messages (
    conv_id       INTEGER NOT NULL REFERENCES conversations (id),
    seq           INTEGER NOT NULL,
    sender_id     INTEGER NOT NULL REFERENCES users (id),
    sender_device INTEGER NOT NULL REFERENCES devices (id),
    client_id     TEXT    NOT NULL,
    ts            INTEGER NOT NULL,
    body          TEXT    NOT NULL,
    PRIMARY KEY (conv_id, seq)
);
-- A client id is stored once per sender: a resend finds the original.
CREATE UNIQUE INDEX messages_client_id ON messages (sender_id, client_id);

CREATE TABLE blocks (
    blocker    INTEGER NOT NULL REFERENCES users (id),
    blocked    INTEGER NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (blocker, blocked)
) WITHOUT ROWID;
