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
    /// The newest generation read at open, and its line.
    newest_generation: Option<(u64, usize)>,
    /// The file ended without a newline (a write cut by a crash): the next append starts a
    /// new line first.
    ends_mid_line: bool,
}

/// Whether an unreadable line is an unfinished JSON object (a write cut by a crash).
fn is_cut_short(line: &str) -> bool {
    let line = line.trim();
    line.starts_with('{') && !line.ends_with('}')
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
            newest_generation: None,
            ends_mid_line: false,
        };
        let Some(bytes) = bytes else {
            return Ok(ledger);
        };
        ledger.ends_mid_line = bytes.last().is_some_and(|&last| last != b'\n');
        let text = String::from_utf8_lossy(&bytes);
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<LedgerLine>(line) {
                Ok(entry) => {
                    if ledger
                        .newest_generation
                        .is_none_or(|(generation, _)| entry.generation > generation)
                    {
                        ledger.newest_generation = Some((entry.generation, index + 1));
                    }
                    ledger.index(&entry);
                }
                // A line cut by a crash mid-write is an unfinished JSON object; the next append
                // starts on a line of its own. Anything else is not a ledger this code wrote.
                Err(_) if is_cut_short(line) => {
                    tracing::warn!(ledger = %ledger.key, line = index + 1, "ledger line cut short by a crash ignored");
                }
                Err(error) => {
                    anyhow::bail!(
                        "{}/{} line {}: not a ledger line ({error}): {}",
                        ledger.run_store.location(),
                        ledger.key,
                        index + 1,
                        line.chars().take(120).collect::<String>()
                    );
                }
            }
        }
        Ok(ledger)
    }

    /// Checks the ledger against the job state that names it: no line may come from a
    /// generation after the state's last one.
    pub fn check_generations(&self, state_generation: u64) -> anyhow::Result<()> {
        if let Some((generation, line)) = self.newest_generation {
            if generation > state_generation {
                anyhow::bail!(
                    "{}/{} line {line}: generation {generation} is after state.json's generation {state_generation}",
                    self.run_store.location(),
                    self.key
                );
            }
        }
        Ok(())
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
        if std::mem::take(&mut self.ends_mid_line) {
            text.push('\n');
        }
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

    /// Checks the standing batches of the current plan's `generations` against it: every rank
    /// inside its world size, every batch inside its batches per rank.
    pub fn check_plan(
        &self,
        generations: &[u64],
        world_size: u32,
        batches_per_rank: u64,
    ) -> anyhow::Result<()> {
        for (&(generation, rank), batches) in &self.standing {
            if !generations.contains(&generation) {
                continue;
            }
            if rank >= world_size {
                anyhow::bail!(
                    "{}/{}: rank {rank} of generation {generation} is outside the plan's world size {world_size}",
                    self.run_store.location(),
                    self.key
                );
            }
            if let Some(&batch) = batches.range(batches_per_rank..).next() {
                anyhow::bail!(
                    "{}/{}: batch {batch} of rank {rank} (generation {generation}) is past the plan's {batches_per_rank} batches per rank",
                    self.run_store.location(),
                    self.key
                );
            }
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

    #[test]
    fn a_line_cut_by_a_crash_is_skipped_and_the_next_append_starts_a_new_line() {
        let directory = tempfile::tempdir().unwrap();
        let run_store: Arc<dyn RunStore> =
            Arc::new(LocalRunStore::new(directory.path().to_path_buf()));
        let path = directory.path().join(EpochLedger::key(0));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            "{\"generation\":1,\"rank\":0,\"batch\":0,\"items\":[1]}\n{\"generation\":1,\"ra",
        )
        .unwrap();
        let mut ledger = EpochLedger::open(run_store.clone(), 0).unwrap();
        assert!(ledger.contains(1, 0, 0));
        ledger
            .append(&[LedgerLine {
                generation: 1,
                rank: 0,
                batch: 1,
                items: Some(vec![2]),
                rolled_back: false,
            }])
            .unwrap();
        let reopened = EpochLedger::open(run_store, 0).unwrap();
        assert!(reopened.contains(1, 0, 0) && reopened.contains(1, 0, 1));
    }

    #[test]
    fn a_ledger_that_is_not_one_is_refused_by_file_and_line() {
        let directory = tempfile::tempdir().unwrap();
        let run_store: Arc<dyn RunStore> =
            Arc::new(LocalRunStore::new(directory.path().to_path_buf()));
        let path = directory.path().join(EpochLedger::key(0));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let good = "{\"generation\":1,\"rank\":0,\"batch\":0,\"items\":[1]}";
        std::fs::write(&path, format!("{good}\n{{\"generation\":\"x\"}}\n{good}\n")).unwrap();
        let error = format!(
            "{:#}",
            EpochLedger::open(run_store.clone(), 0).err().unwrap()
        );
        assert!(
            error.contains("ledger/epoch-0.jsonl line 2: not a ledger line"),
            "{error}"
        );
        std::fs::write(&path, format!("{good}\n{}\n", good.replace(":1,", ":7,"))).unwrap();
        let ledger = EpochLedger::open(run_store, 0).unwrap();
        let error = ledger.check_generations(3).unwrap_err().to_string();
        assert!(
            error.contains("line 2: generation 7 is after state.json's generation 3"),
            "{error}"
        );
        ledger.check_generations(7).unwrap();
    }
}
