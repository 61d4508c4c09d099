//! Reading a run's ledger (`ledger/epoch-<E>.jsonl`, docs/architecture.md §7) back in tests: which
//! items stand as trained once a run is over. Shared with the worker's end-to-end tests
//! (`worker/tests/e2e_support`), which include this file by path.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// The JSON lines of a ledger file.
pub fn parse_ledger(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
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
