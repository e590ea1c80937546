-- Which messages refer to which blobs (docs/files.md): written in the commit
-- of the message, so that a blob is bound to exactly the messages that list
-- it, and the members of their conversations may download it. A referenced
-- blob no longer expires (its expires_at is set to the largest integer).
CREATE TABLE blob_refs (
    blob_id TEXT NOT NULL REFERENCES blobs(id),
    conv_id INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (blob_id, conv_id, seq)
) WITHOUT ROWID;
