//! The API's database through sqlx's `Any` driver: SQLite (the default, a file next to the
//! process) or PostgreSQL (`DATABASE_URL=postgres://...`), one schema (`migrations/`) for
//! both. Changes to a draft or a rule are compare-and-set on a `version` column, so two
//! requests for one subscriber cannot both win.
use base64::Engine as _;
use prost::Message as _;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Row};
use topup_proto::v1::AutoTopUpRule;

/// The database.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    /// "sqlite" or "postgres", for logs.
    pub kind: &'static str,
}

/// A draft rule waiting for its code.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Whose.
    pub subscriber_id: String,
    /// The rule as it will be published (state aside).
    pub rule: AutoTopUpRule,
    /// `awaiting_confirmation` or `confirmed`.
    pub status: String,
    /// The code's keyed hash; empty once used.
    pub code_hash: String,
    /// When the code stops working.
    pub code_expires_ms: i64,
    /// Wrong codes so far.
    pub attempts: i64,
    /// Locked until then (0: not locked).
    pub locked_until_ms: i64,
    /// Compare-and-set version (0: not stored yet).
    pub version: i64,
    /// Last change.
    pub updated_at_ms: i64,
}

/// The rule as last published.
#[derive(Debug, Clone)]
pub struct StoredRule {
    /// The rule, its state included.
    pub rule: AutoTopUpRule,
    /// Compare-and-set version.
    pub version: i64,
    /// Last change.
    pub updated_at_ms: i64,
    /// Why the evaluator refused it, if it did (empty otherwise).
    pub rejected: String,
}

/// A contact of a subscriber (see `crate::contacts`).
#[derive(Debug, Clone)]
pub struct Contact {
    /// `CHANNEL_KIND_SMS`, `CHANNEL_KIND_EMAIL` or `CHANNEL_KIND_PUSH`.
    pub kind: String,
    /// The phone number, e-mail address or push token.
    pub address: String,
    /// The code's keyed hash; empty once used or withdrawn.
    pub code_hash: String,
    /// When the code stops working.
    pub code_expires_ms: i64,
    /// When it was verified (0: not yet).
    pub verified_at_ms: i64,
}

/// A rule change waiting in the outbox.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Whose.
    pub subscriber_id: String,
    /// The rule's version after the change.
    pub version: i64,
    /// The `RuleUpdated` record.
    pub record: Vec<u8>,
}

/// One top-up of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUpRow {
    /// The command id.
    pub command_id: String,
    /// Whose.
    pub subscriber_id: String,
    /// Amount, minor units.
    pub amount_minor: i64,
    /// ISO 4217.
    pub currency: String,
    /// pending, succeeded, failed, cancelled.
    pub status: String,
    /// Failure reason name, or empty.
    pub reason: String,
    /// Masked method, or empty.
    pub method: String,
    /// threshold or monthly.
    pub trigger: String,
    /// The balance sequence that caused it.
    pub cause_sequence: i64,
    /// When the carrier saw the balance.
    pub observed_at_ms: i64,
    /// When the command was issued.
    pub issued_at_ms: i64,
    /// When the result came (0: pending).
    pub completed_at_ms: i64,
}

fn encode(rule: &AutoTopUpRule) -> String {
    base64::engine::general_purpose::STANDARD.encode(rule.encode_to_vec())
}

fn decode(text: &str) -> Result<AutoTopUpRule, sqlx::Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    AutoTopUpRule::decode(bytes.as_slice()).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl Db {
    /// Connects to `url` and brings the schema up to date.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            "sqlite"
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            "postgres"
        } else {
            anyhow::bail!(
                "DATABASE_URL must start with sqlite: or postgres:, got {:?}",
                url.split(':').next().unwrap_or_default()
            );
        };
        let options: AnyConnectOptions =
            url.parse().map_err(|e| anyhow::anyhow!("DATABASE_URL is not a database URL: {e}"))?;
        // One in-memory SQLite database is one connection.
        let max = if kind == "sqlite" && url.contains(":memory:") { 1 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the {kind} database: {e}"))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("migrating the {kind} database: {e}"))?;
        Ok(Self { pool, kind })
    }

    /// The pool, for transactions.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// The subscriber's draft.
    pub async fn draft(&self, subscriber: &str) -> Result<Option<Draft>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT subscriber_id, rule, status, code_hash, code_expires_ms, attempts, \
             locked_until_ms, version, updated_at_ms FROM drafts WHERE subscriber_id = $1",
        )
        .bind(subscriber)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Draft {
                subscriber_id: row.try_get("subscriber_id")?,
                rule: decode(&row.try_get::<String, _>("rule")?)?,
                status: row.try_get("status")?,
                code_hash: row.try_get("code_hash")?,
                code_expires_ms: row.try_get("code_expires_ms")?,
                attempts: row.try_get("attempts")?,
                locked_until_ms: row.try_get("locked_until_ms")?,
                version: row.try_get("version")?,
                updated_at_ms: row.try_get("updated_at_ms")?,
            })
        })
        .transpose()
    }

    /// Stores `draft` if its stored version is still `draft.version` (0: not stored yet);
    /// returns whether it did. The stored version becomes `draft.version + 1`.
    pub async fn save_draft(conn: &mut AnyConnection, draft: &Draft) -> Result<bool, sqlx::Error> {
        let rule = encode(&draft.rule);
        let done = if draft.version == 0 {
            sqlx::query(
                "INSERT INTO drafts (subscriber_id, rule, status, code_hash, code_expires_ms, \
                 attempts, locked_until_ms, version, updated_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8) ON CONFLICT (subscriber_id) DO NOTHING",
            )
            .bind(&draft.subscriber_id)
            .bind(rule)
            .bind(&draft.status)
            .bind(&draft.code_hash)
            .bind(draft.code_expires_ms)
            .bind(draft.attempts)
            .bind(draft.locked_until_ms)
            .bind(draft.updated_at_ms)
            .execute(&mut *conn)
            .await?
        } else {
            sqlx::query(
                "UPDATE drafts SET rule = $1, status = $2, code_hash = $3, code_expires_ms = $4, \
                 attempts = $5, locked_until_ms = $6, version = version + 1, updated_at_ms = $7 \
                 WHERE subscriber_id = $8 AND version = $9",
            )
            .bind(rule)
            .bind(&draft.status)
            .bind(&draft.code_hash)
            .bind(draft.code_expires_ms)
            .bind(draft.attempts)
            .bind(draft.locked_until_ms)
            .bind(draft.updated_at_ms)
            .bind(&draft.subscriber_id)
            .bind(draft.version)
            .execute(&mut *conn)
            .await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// The subscriber's rule as last published.
    pub async fn rule(&self, subscriber: &str) -> Result<Option<StoredRule>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT rule, version, updated_at_ms, rejected FROM rules WHERE subscriber_id = $1",
        )
        .bind(subscriber)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(StoredRule {
                rule: decode(&row.try_get::<String, _>("rule")?)?,
                version: row.try_get("version")?,
                updated_at_ms: row.try_get("updated_at_ms")?,
                rejected: row.try_get("rejected")?,
            })
        })
        .transpose()
    }

    /// Puts `record` (a `RuleUpdated`) in the outbox, in the transaction of the change.
    pub async fn enqueue(
        conn: &mut AnyConnection,
        subscriber: &str,
        version: i64,
        record: &[u8],
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO outbox (subscriber_id, version, record, created_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(subscriber)
        .bind(version)
        .bind(base64::engine::general_purpose::STANDARD.encode(record))
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Up to `limit` rows of the outbox, each subscriber's in version order.
    pub async fn outbox(&self, limit: i64) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT subscriber_id, version, record FROM outbox \
             ORDER BY subscriber_id, version LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let record: String = row.try_get("record")?;
                Ok(OutboxRow {
                    subscriber_id: row.try_get("subscriber_id")?,
                    version: row.try_get("version")?,
                    record: base64::engine::general_purpose::STANDARD
                        .decode(record)
                        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                })
            })
            .collect()
    }

    /// Whether the change to `version` of `subscriber`'s rule is still waiting.
    pub async fn in_outbox(&self, subscriber: &str, version: i64) -> Result<bool, sqlx::Error> {
        let row =
            sqlx::query("SELECT version FROM outbox WHERE subscriber_id = $1 AND version = $2")
                .bind(subscriber)
                .bind(version)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Removes a row Kafka has acknowledged.
    pub async fn published(&self, subscriber: &str, version: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM outbox WHERE subscriber_id = $1 AND version = $2")
            .bind(subscriber)
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes (or keeps) the relay's lease for `holder` until `until_ms`: false while
    /// another holder's lease has not run out.
    pub async fn take_lease(
        &self,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE outbox_lease SET holder = $1, until_ms = $2 \
             WHERE name = 'relay' AND (holder = $3 OR until_ms < $4)",
        )
        .bind(holder)
        .bind(until_ms)
        .bind(holder)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `subscriber`'s contact `kind`/`address`, if known: (code hash, code expiry,
    /// verified at; 0 = not verified).
    pub async fn contact(
        &self,
        subscriber: &str,
        kind: &str,
        address: &str,
    ) -> Result<Option<Contact>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT code_hash, code_expires_ms, verified_at_ms FROM contacts \
             WHERE subscriber_id = $1 AND kind = $2 AND address = $3",
        )
        .bind(subscriber)
        .bind(kind)
        .bind(address)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(Contact {
                kind: kind.to_string(),
                address: address.to_string(),
                code_hash: row.try_get("code_hash")?,
                code_expires_ms: row.try_get("code_expires_ms")?,
                verified_at_ms: row.try_get("verified_at_ms")?,
            })
        })
        .transpose()
    }

    /// Every contact of `subscriber`.
    pub async fn contacts(&self, subscriber: &str) -> Result<Vec<Contact>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kind, address, code_hash, code_expires_ms, verified_at_ms FROM contacts \
             WHERE subscriber_id = $1 ORDER BY kind, address",
        )
        .bind(subscriber)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Contact {
                    kind: row.try_get("kind")?,
                    address: row.try_get("address")?,
                    code_hash: row.try_get("code_hash")?,
                    code_expires_ms: row.try_get("code_expires_ms")?,
                    verified_at_ms: row.try_get("verified_at_ms")?,
                })
            })
            .collect()
    }

    /// Stores `contact` for `subscriber` (a new code, or its verification).
    pub async fn save_contact(
        conn: &mut AnyConnection,
        subscriber: &str,
        contact: &Contact,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO contacts (subscriber_id, kind, address, code_hash, code_expires_ms, \
             verified_at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (subscriber_id, kind, address) DO UPDATE SET \
             code_hash = excluded.code_hash, code_expires_ms = excluded.code_expires_ms, \
             verified_at_ms = excluded.verified_at_ms",
        )
        .bind(subscriber)
        .bind(&contact.kind)
        .bind(&contact.address)
        .bind(&contact.code_hash)
        .bind(contact.code_expires_ms)
        .bind(contact.verified_at_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records a code sent to `destination` for `subscriber`.
    pub async fn code_sent(
        conn: &mut AnyConnection,
        subscriber: &str,
        destination: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO codes_sent (subscriber_id, destination, sent_at_ms) VALUES ($1, $2, $3)",
        )
        .bind(subscriber)
        .bind(destination)
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// The times of the codes sent since `since_ms`, oldest first: to `subscriber` when
    /// `by_destination` is false, else to `key` as a destination (whoever asked).
    pub async fn codes_sent_since(
        &self,
        key: &str,
        by_destination: bool,
        since_ms: i64,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let query = if by_destination {
            "SELECT sent_at_ms FROM codes_sent WHERE destination = $1 AND sent_at_ms >= $2 \
             ORDER BY sent_at_ms"
        } else {
            "SELECT sent_at_ms FROM codes_sent WHERE subscriber_id = $1 AND sent_at_ms >= $2 \
             ORDER BY sent_at_ms"
        };
        let rows = sqlx::query(query).bind(key).bind(since_ms).fetch_all(&self.pool).await?;
        rows.iter().map(|row| row.try_get("sent_at_ms")).collect()
    }

    /// Records a wrong code given for `subscriber`.
    pub async fn wrong_code(
        conn: &mut AnyConnection,
        subscriber: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO wrong_codes (subscriber_id, at_ms) VALUES ($1, $2)")
            .bind(subscriber)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// The times of `subscriber`'s wrong codes since `since_ms`, oldest first.
    pub async fn wrong_codes_since(
        &self,
        subscriber: &str,
        since_ms: i64,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT at_ms FROM wrong_codes WHERE subscriber_id = $1 AND at_ms >= $2 ORDER BY at_ms",
        )
        .bind(subscriber)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| row.try_get("at_ms")).collect()
    }

    /// Records why the evaluator refused `subscriber`'s rule as published at `updated_at_ms`
    /// (a later change clears it). False when the rule has changed since.
    pub async fn reject_rule(
        &self,
        subscriber: &str,
        updated_at_ms: i64,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE rules SET rejected = $1 WHERE subscriber_id = $2 AND updated_at_ms = $3",
        )
        .bind(reason)
        .bind(subscriber)
        .bind(updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores `rule` if the stored version is still `version` (0: none stored yet).
    pub async fn save_rule(
        conn: &mut AnyConnection,
        rule: &AutoTopUpRule,
        state: &str,
        version: i64,
        now_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = if version == 0 {
            sqlx::query(
                "INSERT INTO rules (subscriber_id, rule, state, version, updated_at_ms) \
                 VALUES ($1, $2, $3, 1, $4) ON CONFLICT (subscriber_id) DO NOTHING",
            )
            .bind(&rule.subscriber_id)
            .bind(encode(rule))
            .bind(state)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?
        } else {
            sqlx::query(
                "UPDATE rules SET rule = $1, state = $2, version = version + 1, updated_at_ms = $3, \
                 rejected = '' WHERE subscriber_id = $4 AND version = $5",
            )
            .bind(encode(rule))
            .bind(state)
            .bind(now_ms)
            .bind(&rule.subscriber_id)
            .bind(version)
            .execute(&mut *conn)
            .await?
        };
        Ok(done.rows_affected() == 1)
    }

    /// Records a top-up command: a pending row, or the command's details on a row its
    /// result made first. Idempotent.
    pub async fn record_command(&self, row: &TopUpRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO topups (command_id, subscriber_id, amount_minor, currency, status, reason, \
             method, trigger_kind, cause_sequence, observed_at_ms, issued_at_ms, completed_at_ms) \
             VALUES ($1, $2, $3, $4, 'pending', '', '', $5, $6, $7, $8, 0) \
             ON CONFLICT (command_id) DO UPDATE SET trigger_kind = excluded.trigger_kind, \
             cause_sequence = excluded.cause_sequence, observed_at_ms = excluded.observed_at_ms, \
             issued_at_ms = excluded.issued_at_ms",
        )
        .bind(&row.command_id)
        .bind(&row.subscriber_id)
        .bind(row.amount_minor)
        .bind(&row.currency)
        .bind(&row.trigger)
        .bind(row.cause_sequence)
        .bind(row.observed_at_ms)
        .bind(row.issued_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a top-up result on its row (made now if the command has not been seen).
    /// Idempotent.
    pub async fn record_result(&self, row: &TopUpRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO topups (command_id, subscriber_id, amount_minor, currency, status, reason, \
             method, trigger_kind, cause_sequence, observed_at_ms, issued_at_ms, completed_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'threshold', 0, $8, $9, $10) \
             ON CONFLICT (command_id) DO UPDATE SET status = excluded.status, \
             reason = excluded.reason, method = excluded.method, \
             amount_minor = excluded.amount_minor, currency = excluded.currency, \
             completed_at_ms = excluded.completed_at_ms",
        )
        .bind(&row.command_id)
        .bind(&row.subscriber_id)
        .bind(row.amount_minor)
        .bind(&row.currency)
        .bind(&row.status)
        .bind(&row.reason)
        .bind(&row.method)
        .bind(row.observed_at_ms)
        .bind(row.issued_at_ms)
        .bind(row.completed_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that the subscriber was told `kind` about top-up `command_id`. Idempotent.
    pub async fn record_notification(
        &self,
        notification_id: &str,
        subscriber_id: &str,
        command_id: &str,
        kind: &str,
        created_at_ms: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO notifications (notification_id, subscriber_id, command_id, kind, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (notification_id) DO NOTHING",
        )
        .bind(notification_id)
        .bind(subscriber_id)
        .bind(command_id)
        .bind(kind)
        .bind(created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The notification kinds sent about `command_id`, oldest first.
    pub async fn notifications_about(&self, command_id: &str) -> Result<Vec<String>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT kind FROM notifications WHERE command_id = $1 ORDER BY created_at_ms, kind",
        )
        .bind(command_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| row.try_get("kind")).collect()
    }

    /// Up to `limit` top-ups of `subscriber`, newest first, after `cursor` (issued at,
    /// command id) when given.
    pub async fn history(
        &self,
        subscriber: &str,
        cursor: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<TopUpRow>, sqlx::Error> {
        const COLUMNS: &str = "command_id, subscriber_id, amount_minor, currency, status, reason, \
             method, trigger_kind, cause_sequence, observed_at_ms, issued_at_ms, completed_at_ms";
        let rows = match cursor {
            None => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM topups WHERE subscriber_id = $1 \
                     ORDER BY issued_at_ms DESC, command_id DESC LIMIT $2"
                ))
                .bind(subscriber)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some((issued, command)) => {
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM topups WHERE subscriber_id = $1 \
                     AND (issued_at_ms < $2 OR (issued_at_ms = $3 AND command_id < $4)) \
                     ORDER BY issued_at_ms DESC, command_id DESC LIMIT $5"
                ))
                .bind(subscriber)
                .bind(issued)
                .bind(issued)
                .bind(command)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter()
            .map(|row| {
                Ok(TopUpRow {
                    command_id: row.try_get("command_id")?,
                    subscriber_id: row.try_get("subscriber_id")?,
                    amount_minor: row.try_get("amount_minor")?,
                    currency: row.try_get("currency")?,
                    status: row.try_get("status")?,
                    reason: row.try_get("reason")?,
                    method: row.try_get("method")?,
                    trigger: row.try_get("trigger_kind")?,
                    cause_sequence: row.try_get("cause_sequence")?,
                    observed_at_ms: row.try_get("observed_at_ms")?,
                    issued_at_ms: row.try_get("issued_at_ms")?,
                    completed_at_ms: row.try_get("completed_at_ms")?,
                })
            })
            .collect()
    }
}
