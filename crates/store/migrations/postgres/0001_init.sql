-- confab schema (PostgreSQL), version 1: the same data as SQLite's schema 9,
-- laid out for several writers (docs/storage.md, "The contract for
-- concurrent writers"). Applied by sqlx's migrator, each file once, in a
-- transaction.

CREATE TABLE users (
    id            BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL,
    read_receipts BOOLEAN NOT NULL DEFAULT TRUE,
    last_seen     BIGINT
);

-- Devices are never deleted, only marked removed, so that an id is never
-- reused and old messages keep a valid sender device.
CREATE TABLE devices (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    name       TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    removed_at BIGINT,
    sign_key   BYTEA,
    kem_key    BYTEA
);
CREATE INDEX devices_user ON devices (user_id);

-- Only the SHA-256 of a token is kept: a stolen database holds no usable token.
CREATE TABLE sessions (
    token_hash BYTEA  PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    device_id  BIGINT NOT NULL REFERENCES devices (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX sessions_device ON sessions (device_id);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- Every version of each user's device list, as signed by one of the
-- user's devices; the newest epoch is the current list.
CREATE TABLE device_lists (
    user_id    BIGINT NOT NULL REFERENCES users (id),
    epoch      BIGINT NOT NULL,
    signed     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, epoch)
);

-- The row is the conversation's lock: an append takes it FOR UPDATE, reads
-- last_seq and last_ts, and writes them back with its message. Unlike the
-- SQLite store (one writer, which derives the head from the newest
-- message), several writers need one row to serialize on; last_seq is in no
-- index, so the update is a HOT update in the room fillfactor leaves.
-- direct_key ("<low user id>:<high user id>") makes the 1:1 conversation of
-- a pair unique.
CREATE TABLE conversations (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT   NOT NULL DEFAULT 'direct',
    direct_key TEXT   UNIQUE,
    name       TEXT,
    created_at BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL DEFAULT 0,
    last_ts    BIGINT
) WITH (fillfactor = 50);

-- Per member: receipt cursors aggregated over its devices (only ever moved
-- forward, with GREATEST), whether it has sent or accepted, its role and
-- the span it sees (joined_seq, left_seq), and in groups the newest moves
-- of each cursor (16 bytes each: seq and time, big-endian).
CREATE TABLE members (
    conv_id         BIGINT  NOT NULL REFERENCES conversations (id),
    user_id         BIGINT  NOT NULL REFERENCES users (id),
    delivered_seq   BIGINT  NOT NULL DEFAULT 0,
    read_seq        BIGINT  NOT NULL DEFAULT 0,
    has_sent        BOOLEAN NOT NULL DEFAULT FALSE,
    accepted        BOOLEAN NOT NULL DEFAULT FALSE,
    role            TEXT    NOT NULL DEFAULT 'member',
    joined_seq      BIGINT  NOT NULL DEFAULT 0,
    left_seq        BIGINT,
    delivered_moves BYTEA,
    read_moves      BYTEA,
    PRIMARY KEY (conv_id, user_id)
) WITH (fillfactor = 70);
CREATE INDEX members_user ON members (user_id, conv_id);

-- Per device: the highest seq it confirmed, where its next sync starts.
CREATE TABLE device_cursors (
    device_id     BIGINT NOT NULL REFERENCES devices (id),
    conv_id       BIGINT NOT NULL REFERENCES conversations (id),
    delivered_seq BIGINT NOT NULL,
    PRIMARY KEY (device_id, conv_id)
) WITH (fillfactor = 70);

CREATE TABLE messages (
    conv_id       BIGINT NOT NULL REFERENCES conversations (id),
    seq           BIGINT NOT NULL,
    sender_id     BIGINT NOT NULL REFERENCES users (id),
    sender_device BIGINT NOT NULL REFERENCES devices (id),
    client_id     TEXT   NOT NULL,
    ts            BIGINT NOT NULL,
    body          TEXT   NOT NULL,
    -- A membership event the server wrote (JSON, the protocol's ConvEvent).
    event         TEXT,
    PRIMARY KEY (conv_id, seq)
);
-- A client id is stored once per sender: a resend finds the original, and
-- two writers racing with the same id end in one row.
CREATE UNIQUE INDEX messages_client_id ON messages (client_id, sender_id);

CREATE TABLE blocks (
    blocker    BIGINT NOT NULL REFERENCES users (id),
    blocked    BIGINT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (blocker, blocked)
);

-- Blobs (docs/files.md): one row per upload, one per part object.
CREATE TABLE blobs (
    id          TEXT   PRIMARY KEY,
    owner       BIGINT NOT NULL REFERENCES users (id),
    length      BIGINT NOT NULL,
    received    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);
CREATE INDEX blobs_owner ON blobs (owner);
CREATE INDEX blobs_expiry ON blobs (expires_at);
CREATE INDEX blobs_created ON blobs (created_at) WHERE deleted_at IS NULL;

CREATE TABLE blob_parts (
    blob_id TEXT   NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    idx     BIGINT NOT NULL,
    start   BIGINT NOT NULL,
    len     BIGINT NOT NULL,
    object  TEXT   NOT NULL,
    PRIMARY KEY (blob_id, idx)
);

-- Which messages refer to which blobs, written in the message's commit.
CREATE TABLE blob_refs (
    blob_id TEXT   NOT NULL REFERENCES blobs (id),
    conv_id BIGINT NOT NULL,
    seq     BIGINT NOT NULL,
    PRIMARY KEY (blob_id, conv_id, seq)
);
CREATE INDEX blob_refs_message ON blob_refs (conv_id, seq);
