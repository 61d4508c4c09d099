//! Reading a run's ledger (`ledger/epoch-<E>.jsonl`, docs/architecture.md §7) back in tests: which
//! items stand as trained once a run is over. The coordinator's loopback jobs
//! (`coordinator/tests/support/mod.rs`) and the worker's end-to-end jobs
//! (`worker/tests/it/e2e_support.rs`) read their run directories with it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

/// The JSON lines of a ledger file.
pub fn parse_ledger(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The ledger lines of `epoch` in `run_dir` (none when the file does not exist yet).
pub fn read_ledger(run_dir: &Path, epoch: u64) -> Vec<Value> {
    let path = run_dir.join("ledger").join(format!("epoch-{epoch}.jsonl"));
    parse_ledger(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The run's `state.json` (`Value::Null` while it does not exist or is not JSON yet).
pub fn read_state(run_dir: &Path) -> Value {
    let text = std::fs::read_to_string(run_dir.join("state.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Item ids of every batch that stands (not rolled back) in ledger lines, with the number of
/// times each was trained. Panics on a rollback of an unknown batch or a batch recorded twice.
pub fn trained_items(lines: &[Value]) -> HashMap<u64, u32> {
    let mut batches: BTreeMap<(u64, u64, u64), Vec<u64>> = BTreeMap::new();
    for line in lines {
        let key = (
            line["generation"].as_u64().unwrap(),
            line["rank"].as_u64().unwrap(),
            line["batch"].as_u64().unwrap(),
        );
        if line["rolled_back"].as_bool() == Some(true) {
            assert!(
                batches.remove(&key).is_some(),
                "rollback of an unknown batch {key:?}"
            );
        } else {
            let items = line["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert!(
                batches.insert(key, items).is_none(),
                "batch {key:?} recorded twice"
            );
        }
    }
    let mut counts = HashMap::new();
    for items in batches.values() {
        for &id in items {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}
