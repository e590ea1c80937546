-- Blobs (docs/files.md): a file's encrypted bytes, uploaded with tus and kept
-- in blob storage as numbered part objects; the rows say which parts make up
-- which blob, so that an upload survives a restart and downloads and ranges
-- are served from the parts.
CREATE TABLE blobs (
    id          TEXT PRIMARY KEY,          -- random, made by the server
    owner       INTEGER NOT NULL REFERENCES users(id),
    length      INTEGER NOT NULL,          -- tus Upload-Length
    received    INTEGER NOT NULL DEFAULT 0, -- tus Upload-Offset
    created_at  INTEGER NOT NULL,
    -- An upload not complete by then is deleted (tus expiration).
    expires_at  INTEGER NOT NULL
);
CREATE INDEX blobs_owner ON blobs (owner);
CREATE INDEX blobs_expiry ON blobs (expires_at);

CREATE TABLE blob_parts (
    blob_id TEXT NOT NULL REFERENCES blobs(id) ON DELETE CASCADE,
    idx     INTEGER NOT NULL,
    start   INTEGER NOT NULL,              -- offset of its first byte in the blob
    len     INTEGER NOT NULL,
    object  TEXT NOT NULL,                 -- its key in blob storage
    PRIMARY KEY (blob_id, idx)
) WITHOUT ROWID;
