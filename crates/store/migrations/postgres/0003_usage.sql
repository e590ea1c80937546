-- What each user used per UTC day (days since the epoch): message body
-- bytes and conversations started. Counted in the commits that use them,
-- so that the daily limits hold for every node together, not once per
-- node, and survive restarts. Rows of past days are deleted now and then;
-- the key leads with the day so that is a range.
CREATE TABLE usage (
    day           BIGINT  NOT NULL,
    user_id       BIGINT  NOT NULL,
    bytes         BIGINT  NOT NULL DEFAULT 0,
    conversations INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id)
);

-- confab_append (migration 2), with the sender's body bytes of the day
-- counted in the same commit. Counted once every other check has passed,
-- so that only what is stored counts. A message that takes the sender past
-- p_daily_bytes raises CQ001: the transaction rolls back, the message and
-- its seq with it, and the node answers over_quota. The usage row is
-- locked last, after the conversation, the device lists and the files, so
-- the lock order stays the same for every append.
CREATE FUNCTION confab_append_counted(
    p_daily_bytes BIGINT,
    p_day         BIGINT,
    p_conv        BIGINT,
    p_sender      BIGINT,
    p_device      BIGINT,
    p_client_id   TEXT,
    p_body        TEXT,
    p_now         BIGINT,
    p_epoch_users BIGINT[],
    p_epochs      BIGINT[],
    p_limit       BIGINT,
    p_blobs       TEXT[],
    OUT outcome           TEXT,
    OUT seq               BIGINT,
    OUT ts                BIGINT,
    OUT first_from_sender BOOLEAN,
    OUT members           BIGINT[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_bytes BIGINT;
BEGIN
    SELECT a.outcome, a.seq, a.ts, a.first_from_sender, a.members
      INTO outcome, seq, ts, first_from_sender, members
      FROM confab_append(p_conv, p_sender, p_device, p_client_id, p_body, p_now,
                         p_epoch_users, p_epochs, p_limit, p_blobs) a;
    IF outcome = 'new' AND p_daily_bytes IS NOT NULL THEN
        INSERT INTO usage AS u (day, user_id, bytes)
        VALUES (p_day, p_sender, octet_length(p_body))
        ON CONFLICT (day, user_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
        RETURNING u.bytes INTO v_bytes;
        IF v_bytes > p_daily_bytes THEN
            RAISE EXCEPTION 'over the daily byte quota' USING ERRCODE = 'CQ001';
        END IF;
    END IF;
END;
$$;
