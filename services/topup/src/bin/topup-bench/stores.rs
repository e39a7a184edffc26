//! Phase 7, the embedded store chosen by measuring (`stores`): redb (the pipeline's state
//! store, `topup_kafka::store`) and fjall (an LSM tree) given a partition store's work, with
//! a map in memory as the baseline, each in a process of its own so that its resident
//! memory is its own. The work: load the evaluator's two records for each subscriber (its
//! rule, about 330 bytes, and its state, about 40) in transactions of 500 subscribers with
//! a checkpoint, durable every 64th as the pipeline's store does; rewrite a fifth of the
//! state records (balance events) in the same transactions; read a fifth of the subscribers
//! (both records) at random, the path of a state not in the task's cache; reopen.
//! Both stores get the same 16 MiB cache (`STATE_PAGE_CACHE_BYTES`' default).
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use topup_proto::evaluator::v1 as changelog;
use topup_proto::v1::{Money, RuleUpdated};
use topup_proto::Message;

use super::{current_rss_bytes, subscriber};

/// Subscribers per transaction.
const BATCH: u64 = 500;
/// Every how many transactions one is durable (`topup_kafka::store`'s `DURABLE_EVERY`).
const DURABLE_EVERY: u64 = 64;
/// Cache of either store, bytes.
const CACHE_BYTES: usize = 16 << 20;

/// The stores compared; `Memory` is the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub(crate) enum Engine {
    Memory,
    Redb,
    Fjall,
}

impl Engine {
    const ALL: [Self; 3] = [Self::Memory, Self::Redb, Self::Fjall];

    fn name(self) -> &'static str {
        match self {
            Self::Memory => "in memory (BTreeMap, baseline)",
            Self::Redb => "redb 4 (B-tree, copy-on-write)",
            Self::Fjall => "fjall 3 (LSM tree)",
        }
    }
}

/// One store's figures.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EngineFigures {
    pub engine: Engine,
    pub subscribers: u64,
    pub load_records_per_s: f64,
    pub update_records_per_s: f64,
    pub reads_per_s: f64,
    pub reopen_ms: f64,
    pub disk_mib: f64,
    pub resident_mib: f64,
}

/// What the three stores are given to do.
trait Store: Sized {
    /// Writes `records` (and the checkpoint) in one transaction.
    fn commit(
        &mut self,
        records: &[(String, Vec<u8>)],
        checkpoint: i64,
        durable: bool,
    ) -> anyhow::Result<()>;
    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Closes and opens it again.
    fn reopen(self) -> anyhow::Result<Self>;
}

#[derive(Default)]
struct Memory(BTreeMap<String, Vec<u8>>, i64);

impl Store for Memory {
    fn commit(
        &mut self,
        records: &[(String, Vec<u8>)],
        checkpoint: i64,
        _: bool,
    ) -> anyhow::Result<()> {
        for (key, value) in records {
            self.0.insert(key.clone(), value.clone());
        }
        self.1 = checkpoint;
        Ok(())
    }

    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.0.get(key).cloned())
    }

    fn reopen(self) -> anyhow::Result<Self> {
        Ok(self)
    }
}

const RECORDS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
const META: redb::TableDefinition<&str, i64> = redb::TableDefinition::new("meta");

struct Redb {
    path: std::path::PathBuf,
    db: redb::Database,
}

impl Redb {
    fn open(path: std::path::PathBuf) -> anyhow::Result<Self> {
        let mut builder = redb::Database::builder();
        builder.set_cache_size(CACHE_BYTES);
        let db = builder.create(&path)?;
        Ok(Self { path, db })
    }
}

impl Store for Redb {
    fn commit(
        &mut self,
        records: &[(String, Vec<u8>)],
        checkpoint: i64,
        durable: bool,
    ) -> anyhow::Result<()> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(redb::Durability::None)?;
        }
        {
            let mut table = txn.open_table(RECORDS)?;
            for (key, value) in records {
                table.insert(key.as_str(), value.as_slice())?;
            }
            txn.open_table(META)?.insert("checkpoint", checkpoint)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn reopen(self) -> anyhow::Result<Self> {
        let path = self.path.clone();
        drop(self);
        Self::open(path)
    }
}

struct Fjall {
    path: std::path::PathBuf,
    db: fjall::Database,
    records: fjall::Keyspace,
    meta: fjall::Keyspace,
}

impl Fjall {
    fn open(path: std::path::PathBuf) -> anyhow::Result<Self> {
        let db = fjall::Database::builder(&path).cache_size(CACHE_BYTES as u64).open()?;
        let records = db.keyspace("records", fjall::KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default)?;
        Ok(Self { path, db, records, meta })
    }
}

impl Store for Fjall {
    fn commit(
        &mut self,
        records: &[(String, Vec<u8>)],
        checkpoint: i64,
        durable: bool,
    ) -> anyhow::Result<()> {
        let mut batch = self.db.batch();
        for (key, value) in records {
            batch.insert(&self.records, key.as_str(), value.as_slice());
        }
        batch.insert(&self.meta, "checkpoint", checkpoint.to_be_bytes());
        batch.commit()?;
        if durable {
            self.db.persist(fjall::PersistMode::SyncAll)?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.records.get(key)?.map(|v| v.to_vec()))
    }

    fn reopen(self) -> anyhow::Result<Self> {
        let path = self.path.clone();
        drop(self);
        Self::open(path)
    }
}

/// A subscriber's state record as a balance event leaves it.
fn state_record(n: u64, sequence: u64) -> Vec<u8> {
    changelog::SubscriberState {
        balance: Some(Money { currency: "CNY".into(), amount_minor: 8_000 + (n % 97) as i64 }),
        balance_sequence: sequence,
        balance_observed_at: Some(topup_kafka::now_timestamp()),
        armed: true,
        reminder_armed: true,
        rule_version: n + 1,
        ..Default::default()
    }
    .encode_to_vec()
}

/// The `i`th of a spread of subscribers below `subscribers` (a fixed pseudo-random order).
fn spread(i: u64, subscribers: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) % subscribers.max(1)
}

fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn work<S: Store>(
    mut store: S,
    engine: Engine,
    subscribers: u64,
    dir: &Path,
) -> anyhow::Result<EngineFigures> {
    let mut commits = 0u64;
    let mut commit = |store: &mut S, records: &[(String, Vec<u8>)]| -> anyhow::Result<()> {
        commits += 1;
        store.commit(records, commits as i64, commits.is_multiple_of(DURABLE_EVERY))
    };
    let started = Instant::now();
    let mut start = 0;
    while start < subscribers {
        let end = (start + BATCH).min(subscribers);
        let mut records = Vec::with_capacity(2 * BATCH as usize);
        for n in start..end {
            let id = subscriber(n);
            let rule =
                RuleUpdated { rule: Some(super::state::realistic_rule(n, &id)), updated_at: None };
            let rule = rule.rule.map(|r| r.encode_to_vec()).unwrap_or_default();
            records.push((format!("{id} rule"), rule));
            records.push((id, state_record(n, 1)));
        }
        commit(&mut store, &records)?;
        start = end;
    }
    let load_s = started.elapsed().as_secs_f64();

    let updates = (subscribers / 5).max(1);
    let started = Instant::now();
    let mut i = 0;
    while i < updates {
        let end = (i + BATCH).min(updates);
        let records: Vec<_> = (i..end)
            .map(|i| {
                let n = spread(i, subscribers);
                (subscriber(n), state_record(n, 2))
            })
            .collect();
        commit(&mut store, &records)?;
        i = end;
    }
    let update_s = started.elapsed().as_secs_f64();

    let reads = (subscribers / 5).max(1);
    let started = Instant::now();
    for i in 0..reads {
        let id = subscriber(spread(i.wrapping_add(7), subscribers));
        anyhow::ensure!(store.get(&id)?.is_some(), "{id}'s state is missing");
        anyhow::ensure!(store.get(&format!("{id} rule"))?.is_some(), "{id}'s rule is missing");
    }
    let read_s = started.elapsed().as_secs_f64();
    let resident = current_rss_bytes();

    let started = Instant::now();
    let store = store.reopen()?;
    anyhow::ensure!(store.get(&subscriber(0))?.is_some(), "the reopened store lost a record");
    let reopen_ms = started.elapsed().as_secs_f64() * 1e3;
    drop(store);
    Ok(EngineFigures {
        engine,
        subscribers,
        load_records_per_s: (2 * subscribers) as f64 / load_s,
        update_records_per_s: updates as f64 / update_s,
        reads_per_s: (2 * reads) as f64 / read_s,
        reopen_ms,
        disk_mib: disk_bytes(dir) as f64 / f64::from(1 << 20),
        resident_mib: resident as f64 / f64::from(1 << 20),
    })
}

/// In the child process: runs the work on the store `TOPUP_BENCH_STORE` names with
/// `TOPUP_BENCH_STORE_SUBSCRIBERS`, prints its figures as JSON.
pub(crate) fn child() -> anyhow::Result<()> {
    use clap::ValueEnum;
    let engine = std::env::var("TOPUP_BENCH_STORE").context("TOPUP_BENCH_STORE")?;
    let engine = Engine::from_str(&engine, true).map_err(anyhow::Error::msg)?;
    let subscribers: u64 = std::env::var("TOPUP_BENCH_STORE_SUBSCRIBERS")
        .context("TOPUP_BENCH_STORE_SUBSCRIBERS")?
        .parse()?;
    let dir = tempfile::tempdir()?;
    let figures = match engine {
        Engine::Memory => work(Memory::default(), engine, subscribers, dir.path())?,
        Engine::Redb => {
            work(Redb::open(dir.path().join("store.redb"))?, engine, subscribers, dir.path())?
        }
        Engine::Fjall => {
            work(Fjall::open(dir.path().join("store"))?, engine, subscribers, dir.path())?
        }
    };
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

/// Each store in a process of its own (this program, told by `TOPUP_BENCH_CHILD`).
pub(crate) fn compare(subscribers: u64) -> anyhow::Result<Vec<EngineFigures>> {
    let mut all = Vec::new();
    for engine in Engine::ALL {
        let output = std::process::Command::new(std::env::current_exe()?)
            .env("TOPUP_BENCH_CHILD", "store")
            .env("TOPUP_BENCH_STORE", format!("{engine:?}").to_lowercase())
            .env("TOPUP_BENCH_STORE_SUBSCRIBERS", subscribers.to_string())
            .stdin(std::process::Stdio::null())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "the {} run failed ({}): {}",
            engine.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let figures: EngineFigures = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("the {} run's figures", engine.name()))?;
        eprintln!(
            "stores: {} loaded {subscribers} subscribers at {:.0} records/s",
            engine.name(),
            figures.load_records_per_s
        );
        all.push(figures);
    }
    Ok(all)
}

/// Prints the figures side by side.
pub(crate) fn print(figures: &[EngineFigures]) {
    let Some(first) = figures.first() else { return };
    println!(
        "\nembedded stores given a partition store's work ({} subscribers, two records each; \
         {} MiB cache):\n",
        first.subscribers,
        CACHE_BYTES >> 20
    );
    println!("| store | load (records/s) | balance updates (records/s) | random reads (records/s) | reopen (ms) | on disk (MiB) | resident (MiB) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} |",
            f.engine.name(),
            f.load_records_per_s,
            f.update_records_per_s,
            f.reads_per_s,
            f.reopen_ms,
            f.disk_mib,
            f.resident_mib
        );
    }
}
