-- What each user used per UTC day (days since the epoch): message body
-- bytes and conversations started. Counted in the commits that use them,
-- so that the daily limits survive restarts; rows of past days are
-- deleted now and then.
CREATE TABLE usage (
    day           INTEGER NOT NULL,
    user_id       INTEGER NOT NULL,
    bytes         INTEGER NOT NULL DEFAULT 0,
    conversations INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id)
) WITHOUT ROWID;
