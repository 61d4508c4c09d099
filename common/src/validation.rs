//! Validation items: the items a job holds out of training to measure a validation loss on
//! (`data.validation_fraction`, `data.validation_manifest`).
//!
//! An item is held out when the hash of its id alone ([`StreamDomain::Validation`]) falls in the
//! lowest `fraction` of the 64-bit range. The decision depends on nothing else, so the same items
//! stay out when the dataset grows or is re-indexed (ids are stable), whatever the seed or world
//! size. Of the validation items, the `max_items` with the smallest hashes are evaluated, again
//! a choice that a growing dataset only extends.

use crate::stream::{derive_key, StreamDomain};

/// The item's validation hash.
pub fn validation_hash(id: u64) -> u64 {
    derive_key(StreamDomain::Validation, &[id])
}

/// Whether `id` is held out of training at `fraction` (0 holds out nothing).
pub fn is_held_out(id: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    (validation_hash(id) as f64) < fraction * 2f64.powi(64)
}

/// The positions of the items to evaluate: at most `max_items` of `ids`, those with the
/// smallest validation hashes, in that order.
pub fn evaluated_positions(ids: &[u64], max_items: usize) -> Vec<usize> {
    let mut positions: Vec<usize> = (0..ids.len()).collect();
    positions.sort_by_key(|&position| (validation_hash(ids[position]), ids[position]));
    positions.truncate(max_items);
    positions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_out_fraction_is_close_and_stable_as_the_dataset_grows() {
        let held: Vec<u64> = (0..100_000).filter(|&id| is_held_out(id, 0.05)).collect();
        let fraction = held.len() as f64 / 100_000.0;
        assert!((fraction - 0.05).abs() < 0.004, "{fraction}");
        // The first 100k ids decide the same way inside a larger dataset.
        let grown: Vec<u64> = (0..200_000)
            .filter(|&id| is_held_out(id, 0.05))
            .take_while(|&id| id < 100_000)
            .collect();
        assert_eq!(grown, held);
        assert!((0..1000).all(|id| !is_held_out(id, 0.0)));
    }

    #[test]
    fn evaluated_items_are_the_smallest_hashes_and_a_grown_set_keeps_them_when_they_stay_smallest()
    {
        let ids: Vec<u64> = (0..500).collect();
        let picked = evaluated_positions(&ids, 20);
        assert_eq!(picked.len(), 20);
        let largest_picked = picked
            .iter()
            .map(|&p| validation_hash(ids[p]))
            .max()
            .unwrap();
        let not_picked_smaller = (0..500)
            .filter(|p| !picked.contains(p))
            .filter(|&p| validation_hash(ids[p]) < largest_picked)
            .count();
        assert_eq!(not_picked_smaller, 0);
        assert_eq!(evaluated_positions(&ids, 1000).len(), 500);
    }
}
