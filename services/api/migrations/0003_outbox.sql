-- Rule changes waiting to be published to topup.rules.v1 (the outbox): written in the
-- same database transaction as the change itself, so that a change committed here reaches
-- Kafka even if the API dies before publishing it. The relay publishes each subscriber's
-- rows in version order and deletes a row once Kafka has acknowledged it.
CREATE TABLE outbox (
    subscriber_id TEXT NOT NULL,
    -- The rule's version after the change (rules.version).
    version       BIGINT NOT NULL,
    -- RuleUpdated, protobuf, base64.
    record        TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (subscriber_id, version)
);

-- Which API instance relays the outbox: one at a time, so that no two of them publish one
-- subscriber's changes out of order. A lease, taken over once it has run out.
CREATE TABLE outbox_lease (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
INSERT INTO outbox_lease (name, holder, until_ms) VALUES ('relay', '', 0);

-- Why the evaluator refused the rule as last published, if it did (empty otherwise).
ALTER TABLE rules ADD COLUMN rejected TEXT NOT NULL DEFAULT '';
