-- End-to-end encryption (docs/encryption.md). The server keeps only public
-- keys: each device's signing and key-agreement keys, uploaded at login.
ALTER TABLE devices ADD COLUMN sign_key BLOB;
ALTER TABLE devices ADD COLUMN kem_key BLOB;

-- Every version of each user's device list, as signed by one of the user's
-- devices. The server stores the signed JSON as it was sent; clients verify
-- the chain of signatures themselves. The newest epoch is the current list,
-- whose devices every send must be encrypted for.
CREATE TABLE device_lists (
    user_id    INTEGER NOT NULL REFERENCES users (id),
    epoch      INTEGER NOT NULL,
    signed     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, epoch)
) WITHOUT ROWID;
