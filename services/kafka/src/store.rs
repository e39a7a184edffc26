//! A partition's state on local disk (Kafka Streams' state store): a copy of the partition's
//! changelog records under their changelog keys, the changelog offset that copy reflects
//! (the checkpoint) and an index of when each key comes due. One embedded redb file per
//! assigned partition, under `<state dir>/<instance>/<changelog topic>-<partition>.redb`;
//! without a state directory the same store lives in memory and every assignment restores
//! it from the changelog.
//!
//! The store is written only after the Kafka transaction that produced its records has
//! committed, in one redb transaction with the checkpoint: a crash at any point leaves it
//! at or behind the committed changelog, never ahead, and a restart replays the changelog
//! from the checkpoint (replaying a record twice changes nothing: each one replaces its key).
use std::path::PathBuf;
use std::time::Instant;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::{Error, Result};

/// Changelog records by changelog key.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Keys by the second (since the epoch) they come due.
const DUE: TableDefinition<(i64, &str), ()> = TableDefinition::new("due");
/// The second each key with an entry in `DUE` comes due.
const DUE_OF: TableDefinition<&str, i64> = TableDefinition::new("due_of");
/// The checkpoint.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// The changelog offset the next record to apply has (everything before it is in the store).
const CHECKPOINT: &str = "checkpoint";
/// When the checkpoint was written, seconds since the epoch.
const CHECKPOINTED_AT: &str = "checkpointed_at";

/// Commits in a row that may be lost by a crash (they are replayed from the changelog)
/// before one is made durable; bounds redb's pages kept for non-durable commits.
const DURABLE_EVERY: u32 = 64;
/// At most this long between durable commits.
const DURABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a partition's store is kept.
#[derive(Debug, Clone, Default)]
pub struct StoreConfig {
    /// Directory of this instance's stores; `None` keeps them in memory.
    pub dir: Option<PathBuf>,
    /// Parsed states kept in memory per partition (the rest are read from the store).
    pub cache_entries: usize,
    /// Bytes of redb's page cache per partition.
    pub page_cache_bytes: usize,
}

/// What the store reflects of the changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The changelog offset of the next record to apply.
    pub(crate) offset: i64,
    /// When it was written, seconds since the epoch.
    pub(crate) at_seconds: i64,
}

/// Changes to apply to a store at once: changelog records in order, due times, and the
/// checkpoint they bring it to.
#[derive(Debug, Default)]
pub(crate) struct StoreBatch {
    /// Changelog records (key, value; `None` deletes the key), in changelog order.
    pub(crate) records: Vec<(String, Option<Vec<u8>>)>,
    /// When each key now comes due (`None`: never).
    pub(crate) due: Vec<(String, Option<i64>)>,
    /// The checkpoint after these records, when known.
    pub(crate) checkpoint: Option<i64>,
}

impl StoreBatch {
    /// Nothing to apply.
    pub(crate) fn is_empty(&self) -> bool {
        self.records.is_empty() && self.due.is_empty() && self.checkpoint.is_none()
    }
}

/// One partition's store.
pub(crate) struct PartitionStore {
    db: Database,
    since_durable: u32,
    last_durable: Instant,
}

macro_rules! redb_try {
    ($what:expr, $e:expr) => {
        $e.map_err(|e| Error::Store(format!("{}: {e}", $what)))?
    };
}

/// A file name part made of `raw`'s letters, digits, `.`, `-` and `_` (others become `_`).
fn file_safe(raw: &str) -> String {
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' })
        .collect()
}

impl PartitionStore {
    /// Opens (or creates) the store of `topic`/`partition` for `instance`.
    pub(crate) fn open(
        config: &StoreConfig,
        instance: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Self> {
        let mut builder = Database::builder();
        builder.set_cache_size(config.page_cache_bytes.max(1 << 20));
        let db = match &config.dir {
            Some(dir) => {
                let dir = dir.join(file_safe(instance));
                std::fs::create_dir_all(&dir).map_err(|e| {
                    Error::Store(format!(
                        "cannot create the state directory {}: {e}",
                        dir.display()
                    ))
                })?;
                let path = dir.join(format!("{}-{partition}.redb", file_safe(topic)));
                redb_try!(format!("opening {}", path.display()), builder.create(&path))
            }
            None => redb_try!(
                "creating an in-memory store",
                builder.create_with_backend(redb::backends::InMemoryBackend::new())
            ),
        };
        let store = Self { db, since_durable: 0, last_durable: Instant::now() };
        // Every table exists from here on, so that readers need not tell "empty" from "new".
        let txn = redb_try!("opening a write transaction", store.db.begin_write());
        {
            redb_try!("creating a table", txn.open_table(RECORDS));
            redb_try!("creating a table", txn.open_table(DUE));
            redb_try!("creating a table", txn.open_table(DUE_OF));
            redb_try!("creating a table", txn.open_table(META));
        }
        redb_try!("committing", txn.commit());
        Ok(store)
    }

    /// What the store reflects, `None` when it was never checkpointed.
    pub(crate) fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        let txn = redb_try!("opening a read transaction", self.db.begin_read());
        let meta = redb_try!("opening the checkpoint", txn.open_table(META));
        let offset = redb_try!("reading the checkpoint", meta.get(CHECKPOINT)).map(|v| v.value());
        let at = redb_try!("reading the checkpoint", meta.get(CHECKPOINTED_AT)).map(|v| v.value());
        Ok(offset.map(|offset| Checkpoint { offset, at_seconds: at.unwrap_or(0) }))
    }

    /// The value of changelog key `key`.
    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = redb_try!("opening a read transaction", self.db.begin_read());
        let records = redb_try!("opening the records", txn.open_table(RECORDS));
        Ok(redb_try!("reading a record", records.get(key)).map(|v| v.value().to_vec()))
    }

    /// Changelog records held.
    pub(crate) fn len(&self) -> Result<u64> {
        let txn = redb_try!("opening a read transaction", self.db.begin_read());
        let records = redb_try!("opening the records", txn.open_table(RECORDS));
        Ok(redb_try!("counting records", records.len()))
    }

    /// Whether no changelog record is held.
    pub(crate) fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Up to `limit` keys due at or before `second`, earliest first.
    pub(crate) fn due_until(&self, second: i64, limit: usize) -> Result<Vec<String>> {
        let txn = redb_try!("opening a read transaction", self.db.begin_read());
        let due = redb_try!("opening the due index", txn.open_table(DUE));
        let mut keys = Vec::new();
        // Every entry due at or before `second` sorts before (second + 1, "").
        let end: (i64, &str) = (second.saturating_add(1), "");
        let range = redb_try!(
            "reading the due index",
            due.range((std::ops::Bound::Unbounded, std::ops::Bound::Excluded(end)))
        );
        for entry in range.take(limit) {
            let (key, _) = redb_try!("reading the due index", entry);
            keys.push(key.value().1.to_string());
        }
        Ok(keys)
    }

    /// Applies `batch` in one transaction: all of it or, after a crash, none.
    pub(crate) fn apply(&mut self, batch: &StoreBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut txn = redb_try!("opening a write transaction", self.db.begin_write());
        let durable =
            self.since_durable + 1 >= DURABLE_EVERY || self.last_durable.elapsed() >= DURABLE_AFTER;
        if !durable {
            redb_try!("choosing durability", txn.set_durability(Durability::None));
        }
        {
            let mut records = redb_try!("opening the records", txn.open_table(RECORDS));
            for (key, value) in &batch.records {
                match value {
                    Some(value) => {
                        redb_try!(
                            "writing a record",
                            records.insert(key.as_str(), value.as_slice())
                        );
                    }
                    None => {
                        redb_try!("deleting a record", records.remove(key.as_str()));
                    }
                }
            }
            let mut due = redb_try!("opening the due index", txn.open_table(DUE));
            let mut due_of = redb_try!("opening the due index", txn.open_table(DUE_OF));
            for (key, when) in &batch.due {
                let old =
                    redb_try!("reading the due index", due_of.get(key.as_str())).map(|v| v.value());
                if old == *when {
                    continue;
                }
                if let Some(old) = old {
                    redb_try!("updating the due index", due.remove((old, key.as_str())));
                }
                match when {
                    Some(when) => {
                        redb_try!("updating the due index", due.insert((*when, key.as_str()), ()));
                        redb_try!("updating the due index", due_of.insert(key.as_str(), *when));
                    }
                    None => {
                        redb_try!("updating the due index", due_of.remove(key.as_str()));
                    }
                }
            }
            if let Some(offset) = batch.checkpoint {
                let mut meta = redb_try!("opening the checkpoint", txn.open_table(META));
                redb_try!("writing the checkpoint", meta.insert(CHECKPOINT, offset));
                redb_try!("writing the checkpoint", meta.insert(CHECKPOINTED_AT, now_seconds()));
            }
        }
        redb_try!("committing", txn.commit());
        if durable {
            self.since_durable = 0;
            self.last_durable = Instant::now();
        } else {
            self.since_durable += 1;
        }
        Ok(())
    }

    /// Makes everything applied so far durable (before the store is closed).
    pub(crate) fn sync(&mut self) -> Result<()> {
        if self.since_durable == 0 {
            return Ok(());
        }
        let txn = redb_try!("opening a write transaction", self.db.begin_write());
        redb_try!("committing", txn.commit());
        self.since_durable = 0;
        self.last_durable = Instant::now();
        Ok(())
    }

    /// [`PartitionStore::sync`] when the last durable commit is older than
    /// [`DURABLE_AFTER`].
    pub(crate) fn sync_if_stale(&mut self) -> Result<()> {
        if self.last_durable.elapsed() >= DURABLE_AFTER {
            self.sync()?;
        }
        Ok(())
    }

    /// Forgets everything: the store is rebuilt from the changelog's beginning.
    pub(crate) fn wipe(&mut self) -> Result<()> {
        let txn = redb_try!("opening a write transaction", self.db.begin_write());
        redb_try!("wiping", txn.delete_table(RECORDS));
        redb_try!("wiping", txn.delete_table(DUE));
        redb_try!("wiping", txn.delete_table(DUE_OF));
        redb_try!("wiping", txn.delete_table(META));
        {
            redb_try!("creating a table", txn.open_table(RECORDS));
            redb_try!("creating a table", txn.open_table(DUE));
            redb_try!("creating a table", txn.open_table(DUE_OF));
            redb_try!("creating a table", txn.open_table(META));
        }
        redb_try!("committing", txn.commit());
        self.since_durable = 0;
        Ok(())
    }
}

impl Drop for PartitionStore {
    fn drop(&mut self) {
        if let Err(error) = self.sync() {
            tracing::warn!(%error, "state store not synced on close; replayed from the changelog");
        }
    }
}

/// Seconds since the epoch.
pub(crate) fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(
        records: &[(&str, Option<&str>)],
        due: &[(&str, Option<i64>)],
        checkpoint: i64,
    ) -> StoreBatch {
        StoreBatch {
            records: records
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            due: due.iter().map(|(k, w)| (k.to_string(), *w)).collect(),
            checkpoint: Some(checkpoint),
        }
    }

    #[test]
    fn records_due_times_and_the_checkpoint_survive_a_reopen() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Store(e.to_string()))?;
        let config = StoreConfig { dir: Some(dir.path().to_path_buf()), ..StoreConfig::default() };
        {
            let mut store = PartitionStore::open(&config, "evaluator/0", "state", 3)?;
            assert_eq!(store.checkpoint()?, None);
            store.apply(&batch(
                &[("a", Some("1")), ("b", Some("2"))],
                &[("a", Some(50)), ("b", Some(10))],
                7,
            ))?;
            store.apply(&batch(&[("b", None)], &[("b", None), ("a", Some(20))], 9))?;
        }
        let store = PartitionStore::open(&config, "evaluator/0", "state", 3)?;
        assert!(dir.path().join("evaluator_0/state-3.redb").is_file());
        assert_eq!(store.checkpoint()?.map(|c| c.offset), Some(9));
        assert_eq!(store.get("a")?, Some(b"1".to_vec()));
        assert_eq!(store.get("b")?, None);
        assert_eq!(store.due_until(19, 10)?, Vec::<String>::new());
        assert_eq!(store.due_until(20, 10)?, vec!["a".to_string()]);
        Ok(())
    }

    #[test]
    fn a_wiped_store_holds_nothing() -> Result<()> {
        let mut store = PartitionStore::open(&StoreConfig::default(), "i", "t", 0)?;
        store.apply(&batch(&[("a", Some("1"))], &[("a", Some(1))], 3))?;
        store.wipe()?;
        assert_eq!((store.len()?, store.checkpoint()?), (0, None));
        assert!(store.due_until(i64::MAX, 10)?.is_empty());
        Ok(())
    }
}
