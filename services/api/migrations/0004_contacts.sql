-- A subscriber's contacts (phone numbers, e-mail addresses, push tokens), each verified
-- once with a code sent to it: a rule may name only verified contacts, so confirmation
-- codes go only there.
CREATE TABLE contacts (
    subscriber_id   TEXT NOT NULL,
    -- CHANNEL_KIND_SMS | CHANNEL_KIND_EMAIL | CHANNEL_KIND_PUSH
    kind            TEXT NOT NULL,
    address         TEXT NOT NULL,
    -- HMAC of the code sent (CONFIRMATION_CODE_KEY); empty once used or withdrawn.
    code_hash       TEXT NOT NULL,
    code_expires_ms BIGINT NOT NULL,
    -- 0: not verified yet.
    verified_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, kind, address)
);

-- Every code sent (for a contact or a draft), for the limits per subscriber and per
-- destination ("<kind> <address>").
CREATE TABLE codes_sent (
    subscriber_id TEXT NOT NULL,
    destination   TEXT NOT NULL,
    sent_at_ms    BIGINT NOT NULL
);
CREATE INDEX codes_sent_by_subscriber ON codes_sent (subscriber_id, sent_at_ms);
CREATE INDEX codes_sent_by_destination ON codes_sent (destination, sent_at_ms);

-- Every wrong code, for the cap per subscriber per day across drafts and contacts.
CREATE TABLE wrong_codes (
    subscriber_id TEXT NOT NULL,
    at_ms         BIGINT NOT NULL
);
CREATE INDEX wrong_codes_by_subscriber ON wrong_codes (subscriber_id, at_ms);
