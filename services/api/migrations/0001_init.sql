-- The API's database: drafts and rules it manages, top-ups it materialises from Kafka.
-- Portable between SQLite and PostgreSQL: TEXT, BIGINT, no binary columns, times as
-- milliseconds since the epoch.

-- A rule being set up: waiting for its confirmation code.
CREATE TABLE drafts (
    subscriber_id   TEXT PRIMARY KEY,
    -- AutoTopUpRule, protobuf, base64.
    rule            TEXT NOT NULL,
    -- awaiting_confirmation | confirmed
    status          TEXT NOT NULL,
    -- HMAC of the code (CONFIRMATION_CODE_KEY); empty once used.
    code_hash       TEXT NOT NULL,
    code_expires_ms BIGINT NOT NULL,
    -- Wrong codes since the code was sent.
    attempts        BIGINT NOT NULL,
    locked_until_ms BIGINT NOT NULL,
    -- Compare-and-set: every change increments it.
    version         BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL
);

-- The rule as last published to topup.rules.v1.
CREATE TABLE rules (
    subscriber_id TEXT PRIMARY KEY,
    -- AutoTopUpRule (with its state), protobuf, base64.
    rule          TEXT NOT NULL,
    state         TEXT NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- One row per top-up, from topup.commands.v1 (pending) and topup.results.v1 (the outcome),
-- in whichever order they arrive; a record read twice changes nothing.
CREATE TABLE topups (
    command_id      TEXT PRIMARY KEY,
    subscriber_id   TEXT NOT NULL,
    amount_minor    BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    -- pending | succeeded | failed
    status          TEXT NOT NULL,
    reason          TEXT NOT NULL,
    -- The method charged, masked ("card •••• 4242"); empty while pending.
    method          TEXT NOT NULL,
    -- threshold | monthly
    trigger_kind    TEXT NOT NULL,
    cause_sequence  BIGINT NOT NULL,
    observed_at_ms  BIGINT NOT NULL,
    issued_at_ms    BIGINT NOT NULL,
    completed_at_ms BIGINT NOT NULL
);

CREATE INDEX topups_newest_first ON topups (subscriber_id, issued_at_ms, command_id);
