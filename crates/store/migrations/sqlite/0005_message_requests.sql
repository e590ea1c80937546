-- Message requests (docs/protocol.md §5.9): a conversation a member neither
-- created nor sent in is a request for that member until it accepts
-- (sends, or `accept`). Until then the other side gets no receipts from it
-- and may send only a few messages.
ALTER TABLE members ADD COLUMN accepted INTEGER NOT NULL DEFAULT 0;
-- Existing conversations: whoever has sent has accepted; where nobody has
-- sent yet, there is nothing to hold back, so both have.
UPDATE members SET accepted = 1
 WHERE has_sent = 1
    OR conv_id NOT IN (SELECT conv_id FROM members WHERE has_sent = 1);
