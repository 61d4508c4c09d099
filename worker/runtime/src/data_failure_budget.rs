//! The data failure budget: a rank counts the items that failed to load over its most recent
//! `data.failure_window` items, and once more than `data.max_failed_fraction` of that window
//! failed, the job stops with the count and the first reasons. One unreadable image in a long
//! job costs nothing (its slot repeats another item of the batch); a dataset that is mostly
//! missing must not train on repeats of the few items that load and then report "finished".
//!
//! The allowance is a count, `floor(max_failed_fraction × failure_window)`, so the first few
//! batches of a job are judged by the same number of failures as the rest: a single failure in
//! the first batch is no reason to stop. `max_failed_fraction = 1` turns the budget off.

use std::collections::VecDeque;

/// How many failure reasons a spent budget quotes.
const QUOTED_REASONS: usize = 3;

/// One batch in the window.
struct WindowBatch {
    items: u64,
    failed: u64,
    reasons: Vec<String>,
}

/// A rank's sliding window of loaded items and failures.
pub struct DataFailureBudget {
    max_failed_fraction: f64,
    window: u64,
    allowed: u64,
    batches: VecDeque<WindowBatch>,
    items: u64,
    failed: u64,
}

impl DataFailureBudget {
    pub fn new(max_failed_fraction: f64, window: u32) -> Self {
        let window = u64::from(window.max(1));
        Self {
            max_failed_fraction,
            window,
            allowed: (max_failed_fraction.clamp(0.0, 1.0) * window as f64).floor() as u64,
            batches: VecDeque::new(),
            items: 0,
            failed: 0,
        }
    }

    /// Books a loaded batch of `items` items, `reasons.len()` of which failed (each reason names
    /// the item, its key and what went wrong). Returns why the job must stop once the window
    /// holds more failures than the budget allows.
    pub fn record(&mut self, items: u64, reasons: &[String]) -> Option<String> {
        if self.max_failed_fraction >= 1.0 {
            return None;
        }
        let failed = reasons.len() as u64;
        self.batches.push_back(WindowBatch {
            items,
            failed,
            reasons: reasons.iter().take(QUOTED_REASONS).cloned().collect(),
        });
        self.items += items;
        self.failed += failed;
        while let Some(oldest) = self.batches.front() {
            if self.items - oldest.items < self.window {
                break;
            }
            self.items -= oldest.items;
            self.failed -= oldest.failed;
            self.batches.pop_front();
        }
        if self.failed <= self.allowed {
            return None;
        }
        let quoted: Vec<&str> = self
            .batches
            .iter()
            .flat_map(|batch| batch.reasons.iter().map(String::as_str))
            .take(QUOTED_REASONS)
            .collect();
        Some(format!(
            "{} of the last {} items failed to load, more than data.max_failed_fraction {} of a \
             {}-item window (data.failure_window) allows; first reasons: {}",
            self.failed,
            self.items,
            self.max_failed_fraction,
            self.window,
            quoted.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(count: usize) -> Vec<String> {
        (0..count)
            .map(|index| format!("item {index} `images/{index}.png`: not found"))
            .collect()
    }

    #[test]
    fn a_dataset_that_is_all_missing_stops_within_the_allowance() {
        let mut budget = DataFailureBudget::new(0.01, 1000);
        // Ten failures are allowed (1% of 1000); the eleventh stops the job.
        assert_eq!(budget.record(4, &reasons(4)), None);
        assert_eq!(budget.record(4, &reasons(4)), None);
        let reason = budget.record(4, &reasons(4)).expect("the budget is spent");
        assert!(
            reason.starts_with("12 of the last 12 items failed to load"),
            "{reason}"
        );
        assert!(reason.contains("data.max_failed_fraction 0.01"), "{reason}");
        assert!(
            reason.ends_with(
                "first reasons: item 0 `images/0.png`: not found; item 1 `images/1.png`: not \
                 found; item 2 `images/2.png`: not found"
            ),
            "{reason}"
        );
    }

    #[test]
    fn scattered_failures_under_the_fraction_never_stop_a_long_job() {
        let mut budget = DataFailureBudget::new(0.01, 1000);
        // One failure in every 200 items (0.5%), for 100,000 items.
        for batch in 0..25_000u64 {
            let failed = if batch % 50 == 0 {
                reasons(1)
            } else {
                reasons(0)
            };
            assert_eq!(budget.record(4, &failed), None, "batch {batch}");
        }
    }

    #[test]
    fn failures_leave_the_window_as_newer_items_come() {
        let mut budget = DataFailureBudget::new(0.01, 100);
        // One failure is allowed per 100 items: one now, and one more once it has left.
        assert_eq!(budget.record(10, &reasons(1)), None);
        for _ in 0..9 {
            assert_eq!(budget.record(10, &[]), None);
        }
        assert_eq!(
            budget.record(10, &reasons(1)),
            None,
            "the first one has left"
        );
        assert!(budget.record(10, &reasons(1)).is_some(), "two in 100 items");
    }

    #[test]
    fn a_zero_budget_stops_at_the_first_failure_and_one_never_stops() {
        let mut strict = DataFailureBudget::new(0.0, 1000);
        assert_eq!(strict.record(4, &[]), None);
        assert!(strict.record(4, &reasons(1)).is_some());
        let mut off = DataFailureBudget::new(1.0, 1000);
        for _ in 0..1000 {
            assert_eq!(off.record(4, &reasons(4)), None);
        }
    }
}
