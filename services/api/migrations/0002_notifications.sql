-- What the subscriber was told about each top-up, from topup.notifications.v1 (kinds only:
-- no parameters, so nothing sealed or personal is kept). One row per notification id.
CREATE TABLE notifications (
    notification_id TEXT PRIMARY KEY,
    subscriber_id   TEXT NOT NULL,
    command_id      TEXT NOT NULL,
    kind            TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

CREATE INDEX notifications_by_command ON notifications (command_id);
