-- An append as one function, called as one statement in a transaction of
-- its own: one round trip from the node instead of six or seven, and the
-- conversation's lock held for the function and the commit only. Appends
-- to one conversation take turns on that lock, so the time it is held is
-- the conversation's throughput; with a round trip per check it was held
-- across six network waits (docs/storage.md has the figures).
--
-- Inside a function each statement reads what was committed when it
-- began (READ COMMITTED), so everything read after the lock (members, the
-- resend, device lists) sees the group change or device list the lock
-- waited for.
--
-- outcome: new | duplicate | not_member | devices_changed | not_accepted |
-- unknown_blob | not_found. `duplicate`: the caller reads the original.
CREATE FUNCTION confab_append(
    p_conv        BIGINT,
    p_sender      BIGINT,
    p_device      BIGINT,
    p_client_id   TEXT,
    p_body        TEXT,
    p_now         BIGINT,
    -- The members the envelope was encrypted for and their device-list
    -- epochs, in the same order; empty: not checked.
    p_epoch_users BIGINT[],
    p_epochs      BIGINT[],
    -- Messages a sender may have in a request nobody answered; NULL: none.
    p_limit       BIGINT,
    p_blobs       TEXT[],
    OUT outcome           TEXT,
    OUT seq               BIGINT,
    OUT ts                BIGINT,
    OUT first_from_sender BOOLEAN,
    OUT members           BIGINT[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_kind     TEXT;
    v_last_seq BIGINT;
    v_last_ts  BIGINT;
BEGIN
    -- The conversation's lock: seqs are taken one at a time, in commit
    -- order, with no gap.
    SELECT c.kind, c.last_seq, COALESCE(c.last_ts, 0)
      INTO v_kind, v_last_seq, v_last_ts
      FROM conversations c WHERE c.id = p_conv FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found';
        RETURN;
    END IF;
    -- A resend is recognised before anything is checked or taken.
    IF EXISTS (SELECT 1 FROM messages m WHERE m.client_id = p_client_id AND m.sender_id = p_sender) THEN
        outcome := 'duplicate';
        RETURN;
    END IF;
    members := ARRAY(SELECT m.user_id FROM members m
                      WHERE m.conv_id = p_conv AND m.left_seq IS NULL ORDER BY m.user_id);
    IF NOT p_sender = ANY (members) THEN
        outcome := 'not_member';
        RETURN;
    END IF;
    IF cardinality(p_epoch_users) > 0 THEN
        IF cardinality(p_epoch_users) <> cardinality(members)
           OR NOT p_epoch_users <@ members THEN
            outcome := 'devices_changed';
            RETURN;
        END IF;
        -- Held to the commit, in user order: a new device list of any of
        -- them (which takes its user's lock exclusively) waits for this
        -- message, or this message for it.
        PERFORM pg_advisory_xact_lock_shared(u)
           FROM (SELECT unnest(p_epoch_users) AS u ORDER BY 1) s;
        IF EXISTS (
            SELECT 1 FROM unnest(p_epoch_users, p_epochs) AS e(u, epoch)
             WHERE e.epoch <> COALESCE((SELECT max(d.epoch) FROM device_lists d WHERE d.user_id = e.u), 0)
        ) THEN
            outcome := 'devices_changed';
            RETURN;
        END IF;
    END IF;
    -- The request limit is for one-to-one conversations.
    IF p_limit IS NOT NULL AND v_kind = 'direct'
       AND EXISTS (SELECT 1 FROM members m WHERE m.conv_id = p_conv AND m.user_id <> p_sender AND NOT m.accepted)
       AND (SELECT count(*) FROM messages m WHERE m.conv_id = p_conv AND m.sender_id = p_sender) >= p_limit THEN
        outcome := 'not_accepted';
        RETURN;
    END IF;
    -- Files the message refers to: the sender's, complete, not deleted;
    -- locked to the commit so that a deletion waits for the message. Not
    -- FOR SHARE: the message then updates them (their expiry), and two
    -- messages sharing a file in two conversations would each hold the
    -- share the other's update waits for.
    IF cardinality(p_blobs) > 0 THEN
        IF (SELECT count(*) FROM (
                SELECT b.id FROM blobs b
                 WHERE b.id = ANY (p_blobs) AND b.owner = p_sender
                   AND b.received = b.length AND b.deleted_at IS NULL
                 ORDER BY b.id FOR NO KEY UPDATE) ready)
           <> (SELECT count(DISTINCT x) FROM unnest(p_blobs) AS x) THEN
            outcome := 'unknown_blob';
            RETURN;
        END IF;
    END IF;
    seq := v_last_seq + 1;
    -- Time never runs backwards within a conversation, whichever node's
    -- clock wrote the last message.
    ts := GREATEST(p_now, v_last_ts);
    INSERT INTO messages (conv_id, seq, sender_id, sender_device, client_id, ts, body)
    VALUES (p_conv, seq, p_sender, p_device, p_client_id, ts, p_body)
    ON CONFLICT (client_id, sender_id) DO NOTHING;
    IF NOT FOUND THEN
        -- The same client id committed meanwhile, in another
        -- conversation's transaction.
        outcome := 'duplicate';
        seq := NULL;
        ts := NULL;
        RETURN;
    END IF;
    UPDATE conversations SET last_seq = seq, last_ts = ts WHERE id = p_conv;
    UPDATE members m SET has_sent = TRUE, accepted = TRUE
     WHERE m.conv_id = p_conv AND m.user_id = p_sender AND NOT m.has_sent;
    first_from_sender := FOUND;
    IF cardinality(p_blobs) > 0 THEN
        INSERT INTO blob_refs (blob_id, conv_id, seq)
        SELECT DISTINCT x, p_conv, seq FROM unnest(p_blobs) AS x
        ON CONFLICT DO NOTHING;
        -- Referred to: it no longer expires.
        UPDATE blobs b SET expires_at = 9223372036854775807 WHERE b.id = ANY (p_blobs);
    END IF;
    outcome := 'new';
END;
$$;
