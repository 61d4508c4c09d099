//! The ledger, `run_dir/ledger/epoch-<E>.jsonl` (docs/architecture.md §7): one line per completed
//! batch, `{"generation":g,"rank":r,"batch":k,"items":[ids]}`, and a later
//! `{"generation":g,"rank":r,"batch":k,"rolled_back":true}` for a batch undone by a regroup
//! (trained after the checkpoint the job resumed from). "Nothing lost, nothing twice" is checkable
//! by anyone from these files alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::run_store::RunStore;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLine {
    pub generation: u64,
    pub rank: u32,
    pub batch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
}

/// The ledger of one epoch, with an index of the batches that stand (not rolled back).
pub struct EpochLedger {
    run_store: Arc<dyn RunStore>,
    key: String,
    standing: HashMap<(u64, u32), BTreeSet<u64>>,
}

impl EpochLedger {
    pub fn key(epoch: u64) -> String {
        format!("ledger/epoch-{epoch}.jsonl")
    }

    /// Opens (and indexes) the ledger of `epoch`, creating nothing until the first append.
    pub fn open(run_store: Arc<dyn RunStore>, epoch: u64) -> anyhow::Result<Self> {
        let key = Self::key(epoch);
        let bytes = run_store.read(&key)?;
        let mut ledger = Self {
            run_store,
            key,
            standing: HashMap::new(),
        };
        let Some(bytes) = bytes else {
            return Ok(ledger);
        };
        let text = String::from_utf8_lossy(&bytes);
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            // A line cut by a crash mid-write is the only one that can be partial: the last.
            let Ok(entry) = serde_json::from_str::<LedgerLine>(line) else {
                tracing::warn!(ledger = %ledger.key, line = index + 1, "unreadable ledger line ignored");
                continue;
            };
            ledger.index(&entry);
        }
        Ok(ledger)
    }

    fn index(&mut self, entry: &LedgerLine) {
        let batches = self
            .standing
            .entry((entry.generation, entry.rank))
            .or_default();
        if entry.rolled_back {
            batches.remove(&entry.batch);
        } else {
            batches.insert(entry.batch);
        }
    }

    /// Whether batch `batch` of `(generation, rank)` is recorded and standing.
    pub fn contains(&self, generation: u64, rank: u32, batch: u64) -> bool {
        self.standing
            .get(&(generation, rank))
            .is_some_and(|batches| batches.contains(&batch))
    }

    /// Appends lines (durable at once on a local run directory, at the next flush of an
    /// object-store one).
    pub fn append(&mut self, entries: &[LedgerLine]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for entry in entries {
            text.push_str(&serde_json::to_string(entry)?);
            text.push('\n');
        }
        self.run_store.append(&self.key, text.as_bytes())?;
        for entry in entries {
            self.index(entry);
        }
        Ok(())
    }

    /// Rolls back every standing batch `>= from_batch` of the given generations.
    pub fn roll_back_from(
        &mut self,
        generations: &[u64],
        from_batch: u64,
    ) -> anyhow::Result<usize> {
        let mut lines = Vec::new();
        for (&(generation, rank), batches) in &self.standing {
            if !generations.contains(&generation) {
                continue;
            }
            for &batch in batches.range(from_batch..) {
                lines.push(LedgerLine {
                    generation,
                    rank,
                    batch,
                    items: None,
                    rolled_back: true,
                });
            }
        }
        lines.sort_by_key(|line| (line.generation, line.rank, line.batch));
        self.append(&lines)?;
        Ok(lines.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::run_store::LocalRunStore;

    #[test]
    fn rollbacks_remove_batches_and_survive_reopening() {
        let directory = tempfile::tempdir().unwrap();
        let run_store: Arc<dyn RunStore> = Arc::new(LocalRunStore::new(directory.path().into()));
        let mut ledger = EpochLedger::open(run_store.clone(), 3).unwrap();
        let line = |generation, rank, batch| LedgerLine {
            generation,
            rank,
            batch,
            items: Some(vec![batch * 10]),
            rolled_back: false,
        };
        ledger
            .append(&[
                line(1, 0, 0),
                line(1, 0, 1),
                line(1, 1, 0),
                line(1, 1, 1),
                line(1, 1, 2),
            ])
            .unwrap();
        assert_eq!(ledger.roll_back_from(&[1], 1).unwrap(), 3);
        assert!(ledger.contains(1, 0, 0) && !ledger.contains(1, 1, 2));
        let reopened = EpochLedger::open(run_store, 3).unwrap();
        assert!(reopened.contains(1, 1, 0) && !reopened.contains(1, 0, 1));
        let text = std::fs::read_to_string(directory.path().join(EpochLedger::key(3))).unwrap();
        assert!(text
            .lines()
            .last()
            .unwrap()
            .contains(r#""rolled_back":true"#));
    }
}
