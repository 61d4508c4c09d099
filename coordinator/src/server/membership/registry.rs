//! The workers the coordinator knows: what they joined with, when they were last heard from,
//! what their heartbeats report, and which of them are lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbor_runtime::trainer::TOKEN_LENGTH_BINS;

use super::requests::{WorkerHeartbeat, WorkerJoin};

/// Refused requests that claim something false (a batch past the plan, forged items, a NaN
/// rate) after which a worker is dropped from the group.
pub const LIES_BEFORE_DROP: u32 = 3;

/// A worker's rank in one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub rank: u32,
    pub generation: u64,
}

#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub join: WorkerJoin,
    pub last_seen: Instant,
    /// Blocked in Join, waiting for a group.
    pub waiting: bool,
    pub assignment: Option<Assignment>,
    pub batches_done: u64,
    pub loss: f64,
    pub items_per_second: f64,
    pub learning_rate: f64,
    /// Prompts it encoded in this generation, by token-length bin (`TOKEN_LENGTH_BINS`);
    /// saturating.
    pub token_length_counts: [u64; TOKEN_LENGTH_BINS.len()],
    /// Steps whose loss it reported as NaN or infinite.
    pub non_finite_losses: u64,
    /// Its refused requests that claimed something false, in this registration.
    pub lies: u32,
    /// The number of its latest Shard stream.
    pub shard_stream: u64,
    /// When its latest Shard stream was cut before the end; cleared by its next Shard call. A
    /// stream not resumed within the heartbeat timeout marks the worker lost.
    pub stream_cut_at: Option<Instant>,
}

impl WorkerEntry {
    pub fn new(join: WorkerJoin, now: Instant) -> Self {
        Self {
            join,
            last_seen: now,
            waiting: true,
            assignment: None,
            batches_done: 0,
            loss: 0.0,
            items_per_second: 0.0,
            learning_rate: 0.0,
            token_length_counts: [0; TOKEN_LENGTH_BINS.len()],
            non_finite_losses: 0,
            lies: 0,
            shard_stream: 0,
            stream_cut_at: None,
        }
    }

    /// Books a heartbeat's figures; returns the prompt counts actually added per bin (the
    /// totals saturate instead of wrapping).
    /// `of_current_plan` says whether the heartbeat's epoch and segment are the current plan's:
    /// only then is its batch count this worker's progress.
    pub fn record_heartbeat(
        &mut self,
        heartbeat: &WorkerHeartbeat,
        of_current_plan: bool,
    ) -> [u64; TOKEN_LENGTH_BINS.len()] {
        if of_current_plan {
            self.batches_done = heartbeat.batches_done;
        }
        self.loss = heartbeat.loss;
        if !heartbeat.loss.is_finite() {
            self.non_finite_losses = self.non_finite_losses.saturating_add(1);
        }
        self.items_per_second = heartbeat.items_per_second;
        self.learning_rate = heartbeat.learning_rate;
        let mut added = [0u64; TOKEN_LENGTH_BINS.len()];
        for ((total, &count), added) in self
            .token_length_counts
            .iter_mut()
            .zip(&heartbeat.token_length_counts)
            .zip(&mut added)
        {
            let next = total.saturating_add(count);
            *added = next - *total;
            *total = next;
        }
        added
    }
}

/// Why a group member counts as lost.
#[derive(Debug, Clone, PartialEq)]
pub struct LostWorker {
    pub rank: u32,
    pub worker_id: String,
    pub why: String,
}

/// The group members that are lost at `now`: silent for longer than `timeout`, or with a Shard
/// stream cut and not resumed for longer than `timeout`. In rank order.
pub fn lost_members(
    group: &[String],
    workers: &HashMap<String, WorkerEntry>,
    now: Instant,
    timeout: Duration,
) -> Vec<LostWorker> {
    group
        .iter()
        .enumerate()
        .filter_map(|(rank, id)| {
            let entry = workers.get(id)?;
            let silent = now.saturating_duration_since(entry.last_seen);
            let lost = |why: String| LostWorker {
                rank: rank as u32,
                worker_id: id.clone(),
                why,
            };
            if silent > timeout {
                return Some(lost(format!(
                    "no heartbeat for {:.1}s",
                    silent.as_secs_f64()
                )));
            }
            let cut_for = now.saturating_duration_since(entry.stream_cut_at?);
            (cut_for > timeout).then(|| {
                lost(format!(
                    "its shard stream was cut and not resumed for {:.1}s",
                    cut_for.as_secs_f64()
                ))
            })
        })
        .collect()
}

/// Workers that left a group (not waiting in Join) and stopped heartbeating while a new one
/// forms: they are gone.
pub fn stale_while_forming(
    workers: &HashMap<String, WorkerEntry>,
    now: Instant,
    timeout: Duration,
) -> Vec<String> {
    let mut stale: Vec<String> = workers
        .iter()
        .filter(|(_, entry)| {
            !entry.waiting && now.saturating_duration_since(entry.last_seen) > timeout
        })
        .map(|(id, _)| id.clone())
        .collect();
    stale.sort();
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(now: Instant) -> WorkerEntry {
        WorkerEntry::new(
            WorkerJoin {
                worker_id: "w".into(),
                node: "n".into(),
                local_rank: 0,
                advertise_host: "127.0.0.1".into(),
                store_port: 29500,
            },
            now,
        )
    }

    #[test]
    fn a_member_is_lost_after_the_timeout_of_silence_or_of_a_cut_stream() {
        let start = Instant::now();
        let timeout = Duration::from_secs(2);
        let mut workers = HashMap::new();
        workers.insert("a".to_string(), entry(start));
        let mut cut = entry(start);
        cut.stream_cut_at = Some(start);
        workers.insert("b".to_string(), cut);
        let group = vec!["a".to_string(), "b".to_string()];
        assert!(lost_members(&group, &workers, start + timeout, timeout).is_empty());
        // b keeps heartbeating but never resumes its stream.
        workers.get_mut("b").unwrap().last_seen = start + Duration::from_millis(2070);
        let lost = lost_members(
            &group,
            &workers,
            start + Duration::from_millis(2070),
            timeout,
        );
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert_eq!((lost[0].rank, lost[0].worker_id.as_str()), (0, "a"));
        assert!(
            lost[0].why.starts_with("no heartbeat for 2.1s"),
            "{}",
            lost[0].why
        );
        assert_eq!((lost[1].rank, lost[1].worker_id.as_str()), (1, "b"));
        assert!(
            lost[1].why.contains("shard stream was cut"),
            "{}",
            lost[1].why
        );
    }

    #[test]
    fn only_workers_outside_join_go_stale_while_forming() {
        let start = Instant::now();
        let timeout = Duration::from_secs(1);
        let mut workers = HashMap::new();
        workers.insert("waiting".to_string(), entry(start));
        let mut left = entry(start);
        left.waiting = false;
        workers.insert("left".to_string(), left);
        let later = start + Duration::from_secs(5);
        assert_eq!(stale_while_forming(&workers, later, timeout), ["left"]);
    }

    #[test]
    fn prompt_counts_saturate_instead_of_wrapping() {
        let now = Instant::now();
        let mut worker = entry(now);
        let heartbeat = |counts: [u64; 4]| WorkerHeartbeat {
            member: super::super::requests::MemberRef {
                worker_id: "w".into(),
                generation: 1,
                rank: 0,
            },
            epoch: 0,
            segment: 0,
            batches_done: 0,
            loss: f64::NAN,
            items_per_second: 0.0,
            learning_rate: 0.0,
            token_length_counts: counts,
            completed: Vec::new(),
            error: String::new(),
            fatal: false,
            job_failure: String::new(),
            unusable_checkpoint: String::new(),
            validation: None,
        };
        assert_eq!(
            worker.record_heartbeat(&heartbeat([u64::MAX - 1, 1, 0, 0]), true),
            [u64::MAX - 1, 1, 0, 0]
        );
        assert_eq!(
            worker.record_heartbeat(&heartbeat([5, 1, 0, 0]), true),
            [1, 1, 0, 0]
        );
        assert_eq!(worker.token_length_counts, [u64::MAX, 2, 0, 0]);
        assert_eq!(worker.non_finite_losses, 2);
    }
}
