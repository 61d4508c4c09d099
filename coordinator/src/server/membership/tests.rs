//! Unit tests of the membership logic without processes or sockets: an in-memory dataset, a
//! run directory in a temporary folder, a clock moved by hand, and hostile requests.

use std::sync::Arc;
use std::time::Duration;

use arbor_common::config::JobConfig;
use arbor_proto::v1::{CheckpointDoneRequest, Command, HeartbeatRequest, JoinRequest};
use proptest::prelude::*;

use super::clock::ManualClock;
use super::requests::{CheckpointReport, MemberRef, ShardAsk, WorkerHeartbeat, WorkerJoin};
use super::*;
use crate::server::job_state::JobState;
use crate::server::ledger::EpochLedger;
use crate::server::run_store::LocalRunStore;

const ITEMS: u64 = 96;
const BSZ: u32 = 2;

struct Harness {
    membership: Membership,
    clock: Arc<ManualClock>,
    run_dir: tempfile::TempDir,
    metrics: Metrics,
}

fn job_config() -> JobConfig {
    JobConfig::load(
        &format!(
            "[job]\nname = \"unit\"\nrun_dir = \"run\"\nseed = 5\n[data]\nmanifest = \"m.jsonl\"\n\
             [schedule]\nbsz = {BSZ}\nepochs = 2\ncheckpoint_every = 4\n\
             [cluster]\nmin_workers = 2\nmax_workers = 2\nheartbeat_interval_s = 1.0\n\
             heartbeat_timeout_s = 2.0\njoin_timeout_s = 60\n"
        ),
        &[],
    )
    .unwrap()
}

fn dataset(config: &JobConfig) -> Dataset {
    let manifest: String = (0..ITEMS)
        .map(|index| {
            let (width, height) = if index % 3 == 0 {
                (768, 512)
            } else {
                (512, 512)
            };
            format!(
                "{{\"id\":{},\"key\":\"{index}.png\",\"width\":{width},\"height\":{height}}}\n",
                1000 + index * 3
            )
        })
        .collect();
    Dataset::read(manifest.as_bytes(), "unit.jsonl", config).unwrap()
}

impl Harness {
    fn new() -> Self {
        let config = Arc::new(job_config());
        let dataset = Arc::new(dataset(&config));
        let run_dir = tempfile::tempdir().unwrap();
        let run_store: Arc<dyn RunStore> =
            Arc::new(LocalRunStore::new(run_dir.path().to_path_buf()));
        let state = JobState::new("unit", &dataset.digest, &config.digest());
        let clock = Arc::new(ManualClock::new());
        let metrics = Metrics::new();
        let membership = Membership::new(
            config,
            dataset,
            run_store,
            metrics.clone(),
            state,
            clock.clone(),
        )
        .unwrap();
        Self {
            membership,
            clock,
            run_dir,
            metrics,
        }
    }

    fn join(&mut self, worker_id: &str, local_rank: u32) {
        let join = WorkerJoin::try_from(JoinRequest {
            worker_id: worker_id.into(),
            node: "node".into(),
            local_rank,
            advertise_host: "10.0.0.1".into(),
            store_port: 29500 + local_rank,
        })
        .unwrap();
        self.membership.register_join(join).unwrap();
    }

    /// Two workers joined and a group formed: generation 1, ranks by local rank.
    fn running() -> Self {
        let mut harness = Self::new();
        harness.join("w0", 0);
        harness.join("w1", 1);
        harness.membership.tick().unwrap();
        assert_eq!(harness.membership.phase(), &Phase::Running);
        harness
    }

    fn generation(&self) -> u64 {
        self.membership.state.generation
    }

    fn member(&self, worker_id: &str, rank: u32) -> MemberRef {
        MemberRef {
            worker_id: worker_id.into(),
            generation: self.generation(),
            rank,
        }
    }

    fn heartbeat(&self, worker_id: &str, rank: u32) -> WorkerHeartbeat {
        WorkerHeartbeat::try_from(HeartbeatRequest {
            worker_id: worker_id.into(),
            generation: self.generation(),
            rank,
            epoch: self.membership.state.epoch,
            segment: self.membership.current_segment(),
            ..Default::default()
        })
        .unwrap()
    }

    /// The items the sampler gives `rank` for `batch` of the current plan.
    fn items(&self, rank: u32, batch: u64) -> Vec<u64> {
        let plan = self.membership.plan.clone().unwrap();
        let dataset = &self.membership.dataset;
        let mut sampler = plan.sampler(&dataset.items, &dataset.table, rank).unwrap();
        sampler.skip(batch);
        let drawn = sampler.next_batch().unwrap();
        drawn
            .positions
            .iter()
            .map(|&p| dataset.records[p as usize].id)
            .collect()
    }

    /// A truthful heartbeat from `rank` after training batches `from..to`.
    fn trained(&mut self, worker_id: &str, rank: u32, from: u64, to: u64) -> HeartbeatReply {
        let mut heartbeat = self.heartbeat(worker_id, rank);
        heartbeat.batches_done = to;
        heartbeat.items_per_second = 2.0;
        heartbeat.completed = (from..to)
            .map(|batch| requests::ReportedBatch {
                batch,
                item_ids: self.items(rank, batch),
            })
            .collect();
        self.membership.heartbeat(&heartbeat).unwrap()
    }

    fn checkpoint(&mut self, worker_id: &str, rank: u32, batch: u64, step: u64) -> bool {
        let report = CheckpointReport::try_from(CheckpointDoneRequest {
            worker_id: worker_id.into(),
            generation: self.generation(),
            rank,
            epoch: self.membership.state.epoch,
            segment: self.membership.current_segment(),
            batch,
            step,
        })
        .unwrap();
        self.membership.checkpoint_done(&report).unwrap()
    }

    fn ledger_lines(&self) -> Vec<LedgerLine> {
        let path = self
            .run_dir
            .path()
            .join(EpochLedger::key(self.membership.state.epoch));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// The batches of the ledger's rollback lines, in file order.
    fn rolled_back_batches(&self) -> Vec<u64> {
        self.ledger_lines()
            .iter()
            .filter(|line| line.rolled_back)
            .map(|line| line.batch)
            .collect()
    }

    fn events(&self) -> String {
        self.membership.status().recent_events.join("\n")
    }
}

#[test]
fn a_group_forms_once_min_workers_wait_and_the_ranks_follow_local_ranks() {
    let mut harness = Harness::new();
    harness.join("second", 1);
    harness.membership.tick().unwrap();
    assert_eq!(harness.membership.phase(), &Phase::Forming);
    harness.join("first", 0);
    harness.membership.tick().unwrap();
    assert_eq!(harness.membership.phase(), &Phase::Running);
    assert_eq!(harness.membership.group, ["first", "second"]);
    let reply = harness
        .membership
        .join_reply("second", "toml")
        .unwrap()
        .unwrap();
    assert_eq!((reply.rank, reply.world_size), (1, 2));
    assert_eq!(reply.store_address, "10.0.0.1:29500", "rank 0's store");
}

#[test]
fn a_silent_member_is_lost_after_the_heartbeat_timeout_and_the_group_re_forms() {
    let mut harness = Harness::running();
    harness.clock.advance(Duration::from_millis(1500));
    harness.trained("w0", 0, 0, 1);
    assert!(!harness.membership.tick().unwrap());
    harness.clock.advance(Duration::from_millis(600));
    assert!(harness.membership.tick().unwrap());
    assert_eq!(harness.membership.phase(), &Phase::Forming);
    let events = harness.events();
    assert!(
        events.contains("worker w1 (rank 1) lost: no heartbeat for 2.1s"),
        "{events}"
    );
    assert!(!harness.membership.workers.contains_key("w1"));
}

#[test]
fn a_regroup_resumes_at_the_last_complete_checkpoint_and_rolls_back_the_rest() {
    let mut harness = Harness::running();
    harness.trained("w0", 0, 0, 6);
    harness.trained("w1", 1, 0, 6);
    assert!(!harness.checkpoint("w0", 0, 4, 4));
    assert!(harness.checkpoint("w1", 1, 4, 4));
    assert_eq!(harness.membership.state.step, 4);
    // w1 re-joins (it restarted): same world size, same plan, from batch 4.
    harness.join("w1", 1);
    assert_eq!(harness.membership.phase(), &Phase::Forming);
    harness.join("w0", 0);
    harness.clock.advance(Duration::from_secs(1));
    harness.membership.tick().unwrap();
    assert_eq!(harness.membership.resume_batch, 4);
    let reply = harness.membership.join_reply("w0", "").unwrap().unwrap();
    assert_eq!(reply.resume.unwrap().batch, 4);
    let rolled = harness.rolled_back_batches();
    assert_eq!(
        rolled,
        [4, 5, 4, 5],
        "batches after the checkpoint are rolled back"
    );
}

#[test]
fn a_heartbeat_past_the_plan_is_refused_and_nothing_of_it_is_booked() {
    let mut harness = Harness::running();
    let total = harness.membership.plan.as_ref().unwrap().batches_per_rank();
    let mut lying = harness.heartbeat("w0", 0);
    lying.batches_done = total + 1;
    let error = harness.membership.heartbeat(&lying).unwrap_err();
    assert_eq!(error.code(), RefusalCode::OutOfRange);
    assert!(
        error.to_string().starts_with("heartbeat.batches_done: "),
        "{error}"
    );
    assert_eq!(harness.membership.workers["w0"].batches_done, 0);

    let mut past = harness.heartbeat("w0", 0);
    past.completed = vec![requests::ReportedBatch {
        batch: total,
        item_ids: vec![1000, 1003],
    }];
    let error = harness.membership.heartbeat(&past).unwrap_err();
    assert!(error.to_string().contains("past the plan's"), "{error}");
    assert!(harness.ledger_lines().is_empty());
}

#[test]
fn forged_ledger_items_are_refused_and_a_worker_that_keeps_lying_is_dropped() {
    let mut harness = Harness::running();
    let mut forged = harness.heartbeat("w1", 1);
    let mut items = harness.items(1, 0);
    items[1] = harness.items(0, 0)[0];
    forged.completed = vec![requests::ReportedBatch {
        batch: 0,
        item_ids: items,
    }];
    for attempt in 1..=LIES_BEFORE_DROP {
        let error = harness.membership.heartbeat(&forged).unwrap_err();
        assert_eq!(
            error.code(),
            RefusalCode::InvalidArgument,
            "attempt {attempt}"
        );
        assert!(
            error
                .to_string()
                .starts_with("heartbeat.completed.item_ids: batch 0 of rank 1"),
            "{error}"
        );
    }
    assert!(
        harness.ledger_lines().is_empty(),
        "no forged line reached the ledger"
    );
    assert!(!harness.membership.workers.contains_key("w1"));
    assert_eq!(harness.membership.phase(), &Phase::Forming);
    assert!(harness
        .events()
        .contains("worker w1 dropped after 3 refused requests"));
    let metrics = harness.metrics.render();
    assert!(
        metrics.contains("arbor_refused_requests_total{reason=\"worker_dropped\"} 1"),
        "{metrics}"
    );
    // The truthful worker keeps its place and the job goes on once the group re-forms.
    harness.join("w0", 0);
    harness.join("w2", 1);
    harness.clock.advance(Duration::from_secs(1));
    harness.membership.tick().unwrap();
    assert_eq!(harness.membership.phase(), &Phase::Running);
}

#[test]
fn a_truthful_heartbeat_books_its_batches_once() {
    let mut harness = Harness::running();
    assert_eq!(
        harness.trained("w0", 0, 0, 2).command,
        Command::Continue as i32
    );
    // Sent again (its reply was lost): nothing is written twice.
    harness.trained("w0", 0, 0, 2);
    let batches: Vec<(u32, u64)> = harness
        .ledger_lines()
        .iter()
        .map(|line| (line.rank, line.batch))
        .collect();
    assert_eq!(batches, [(0, 0), (0, 1)]);
}

#[test]
fn a_nan_loss_is_accepted_and_surfaced() {
    let mut harness = Harness::running();
    let mut diverged = harness.heartbeat("w0", 0);
    diverged.loss = f64::NAN;
    diverged.batches_done = 3;
    harness.membership.heartbeat(&diverged).unwrap();
    harness.membership.heartbeat(&diverged).unwrap();
    let status = harness.membership.status();
    assert_eq!(status.workers[0].non_finite_losses, 2);
    let events = harness.events();
    assert_eq!(
        events.matches("non-finite loss").count(),
        1,
        "one event per worker: {events}"
    );
    assert!(harness
        .metrics
        .render()
        .contains("arbor_non_finite_losses_total 2"));
}

#[test]
fn a_far_future_epoch_is_refused_at_once_and_the_next_one_waits() {
    let mut harness = Harness::running();
    let ask = |epoch| ShardAsk {
        member: harness.member("w0", 0),
        epoch,
        start_index: 0,
    };
    let (next, far) = (ask(1), ask(7));
    assert!(harness.membership.shard_source(&next).unwrap().is_none());
    let error = harness.membership.shard_source(&far).err().unwrap();
    assert_eq!(error.code(), RefusalCode::OutOfRange);
    assert!(
        error.to_string().starts_with("shard.epoch: epoch 7"),
        "{error}"
    );
}

#[test]
fn a_missed_checkpoint_request_is_asked_again_further_ahead_then_dropped() {
    let mut harness = Harness::running();
    harness.trained("w0", 0, 0, 2);
    let requested = harness
        .membership
        .request_checkpoint("test", false)
        .unwrap();
    // 1 batch/s (2 items/s at bsz 2), heartbeat 1 s: 2 + 1 ahead of batch 2, on a window end.
    assert_eq!(requested.batch, 5);
    let reply = harness.trained("w0", 0, 2, 8);
    assert_eq!(reply.command, Command::Checkpoint as i32);
    assert_eq!(reply.checkpoint_batch, 13, "twice the lead past batch 8");
    let events = harness.events();
    assert!(events.contains("rank 0 passed the requested checkpoint at batch 5 (it is at 8)"));
}

#[test]
fn a_checkpoint_waits_for_the_ledger_to_hold_every_batch_it_covers() {
    let mut harness = Harness::running();
    harness.trained("w0", 0, 0, 4);
    // Rank 1's heartbeat with batches 2 and 3 is still on its way when it reports batch 4.
    harness.trained("w1", 1, 0, 2);
    assert!(!harness.checkpoint("w0", 0, 4, 4));
    let report = CheckpointReport::try_from(CheckpointDoneRequest {
        worker_id: "w1".into(),
        generation: harness.generation(),
        rank: 1,
        epoch: 0,
        segment: 0,
        batch: 4,
        step: 4,
    })
    .unwrap();
    let error = harness.membership.checkpoint_done(&report).unwrap_err();
    assert_eq!(
        error,
        MembershipError::LedgerBehind {
            rank: 1,
            batch: 4,
            missing: 2
        }
    );
    assert_eq!(error.code(), RefusalCode::Unavailable, "the worker retries");
    assert!(!error.is_lie(), "a late heartbeat is not a lie");
    assert!(harness.membership.state.last_checkpoint.is_none());
    harness.trained("w1", 1, 2, 4);
    assert!(harness.membership.checkpoint_done(&report).unwrap());
    assert_eq!(
        harness
            .membership
            .state
            .last_checkpoint
            .as_ref()
            .unwrap()
            .batch,
        4
    );
}

#[test]
fn checkpoint_reports_outside_the_plan_or_with_impossible_steps_are_refused() {
    let mut harness = Harness::running();
    let report = |batch, step| {
        CheckpointReport::try_from(CheckpointDoneRequest {
            worker_id: "w0".into(),
            generation: 1,
            rank: 0,
            epoch: 0,
            segment: 0,
            batch,
            step,
        })
        .unwrap()
    };
    let error = harness
        .membership
        .checkpoint_done(&report(4, 9))
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("checkpoint_done.step: step 9"),
        "{error}"
    );
    let error = harness
        .membership
        .checkpoint_done(&report(999, 4))
        .unwrap_err();
    assert!(
        error.to_string().starts_with("checkpoint_done.batch: "),
        "{error}"
    );
    assert!(harness.membership.state.last_checkpoint.is_none());
}

#[test]
fn progress_reports_planned_steps_and_an_eta() {
    let mut harness = Harness::running();
    let batches = harness.membership.plan.as_ref().unwrap().batches_per_rank();
    harness.trained("w0", 0, 0, 4);
    harness.trained("w1", 1, 0, 4);
    harness.clock.advance(Duration::from_secs(2));
    harness.trained("w0", 0, 4, 8);
    harness.trained("w1", 1, 4, 8);
    let progress = harness.membership.status().progress.unwrap();
    assert_eq!(progress.total_steps, 2 * batches, "2 epochs, grad_accum 1");
    assert_eq!(progress.current_step, 8);
    assert_eq!(progress.epoch_batches_done, 8);
    assert_eq!(progress.steps_per_second, 2.0);
    let eta = progress.eta_seconds.unwrap();
    assert_eq!(eta, (2 * batches - 8) as f64 / 2.0);
}

#[test]
fn a_state_that_does_not_fit_the_job_stops_the_coordinator() {
    let config = Arc::new(job_config());
    let dataset = Arc::new(dataset(&config));
    let run_dir = tempfile::tempdir().unwrap();
    let run_store: Arc<dyn RunStore> = Arc::new(LocalRunStore::new(run_dir.path().to_path_buf()));
    let mut state = JobState::new("unit", &dataset.digest, &config.digest());
    state.generation = 1;
    state.segments = vec![crate::server::job_state::SegmentRecord {
        segment: 0,
        world_size: 2,
        checkpoint_batch: 500,
        generations: vec![1],
    }];
    let error = Membership::new(
        config,
        dataset,
        run_store,
        Metrics::new(),
        state,
        Arc::new(ManualClock::new()),
    )
    .err()
    .unwrap();
    let text = format!("{error:#}");
    assert!(text.contains("state.json"), "{text}");
    assert!(text.contains("segments[0].checkpoint_batch: 500"), "{text}");
}

impl Harness {
    /// A coordinator restarted on this harness's run directory (the same job).
    fn restarted(&self) -> anyhow::Result<Membership> {
        let run_store: Arc<dyn RunStore> =
            Arc::new(LocalRunStore::new(self.run_dir.path().to_path_buf()));
        let state = JobState::load(run_store.as_ref())?.expect("a persisted state");
        Membership::new(
            self.membership.config.clone(),
            self.membership.dataset.clone(),
            run_store,
            Metrics::new(),
            state,
            Arc::new(ManualClock::new()),
        )
    }

    /// Two complete checkpoints of the running plan: at batches 2 (step 2) and 4 (step 4).
    fn two_checkpoints() -> Self {
        let mut harness = Self::running();
        harness.trained("w0", 0, 0, 4);
        harness.trained("w1", 1, 0, 4);
        assert!(!harness.checkpoint("w0", 0, 2, 2));
        assert!(harness.checkpoint("w1", 1, 2, 2));
        assert!(!harness.checkpoint("w0", 0, 4, 4));
        assert!(harness.checkpoint("w1", 1, 4, 4));
        harness
    }
}

#[test]
fn an_unusable_last_checkpoint_falls_back_to_the_previous_complete_one() {
    let harness = Harness::two_checkpoints();
    std::fs::remove_file(harness.run_dir.path().join("checkpoints/step-4/COMPLETE")).unwrap();
    let restarted = harness.restarted().unwrap();
    let last = restarted.state.last_checkpoint.clone().unwrap();
    assert_eq!((last.path.as_str(), last.batch), ("checkpoints/step-2", 2));
    assert_eq!(restarted.state.step, 2);
    assert_eq!(restarted.state.segments.last().unwrap().checkpoint_batch, 2);
    let events = restarted.status().recent_events.join("\n");
    assert!(
        events.contains("checkpoint checkpoints/step-4 is unusable (")
            && events.contains(
                "checkpoints/step-4/COMPLETE: missing); falling back to checkpoints/step-2"
            ),
        "{events}"
    );
    // Persisted: the next restart starts from step-2 without another fallback.
    let again = harness.restarted().unwrap();
    assert_eq!(again.state.last_checkpoint, Some(last));
}

#[test]
fn a_checkpoint_that_names_another_and_nothing_to_fall_back_to_stops_the_coordinator() {
    let harness = Harness::two_checkpoints();
    let described = |step: u64| {
        harness
            .run_dir
            .path()
            .join(format!("checkpoints/step-{step}/coordinator.json"))
    };
    let text = std::fs::read_to_string(described(4)).unwrap();
    std::fs::write(described(4), text.replace("\"batch\": 4", "\"batch\": 3")).unwrap();
    std::fs::write(described(2), "{ not json").unwrap();
    let error = harness.restarted().err().expect("refused");
    let text = format!("{error:#}");
    assert!(
        text.contains(
            "checkpoints/step-4/coordinator.json: batch differs from state.json's last_checkpoint"
        ),
        "{text}"
    );
    assert!(
        text.contains("checkpoints/step-2/coordinator.json: "),
        "{text}"
    );
    assert!(text.contains("no earlier complete checkpoint"), "{text}");
}

#[test]
fn a_rank_that_cannot_resume_from_the_last_checkpoint_makes_the_job_fall_back() {
    let mut harness = Harness::two_checkpoints();
    let mut heartbeat = harness.heartbeat("w1", 1);
    heartbeat.batches_done = 4;
    heartbeat.error =
        "weights.safetensors is 10 bytes but position.json records 99 (truncated or overwritten)"
            .into();
    heartbeat.unusable_checkpoint = "checkpoints/step-4".into();
    let reply = harness.membership.heartbeat(&heartbeat).unwrap();
    assert_eq!(reply.command, Command::Regroup as i32);
    assert!(
        reply.reason.contains("falling back to checkpoints/step-2"),
        "{}",
        reply.reason
    );
    let last = harness.membership.state.last_checkpoint.clone().unwrap();
    assert_eq!(last.path, "checkpoints/step-2");
    assert!(harness
        .events()
        .contains("rank 1: weights.safetensors is 10 bytes"));
    // The group re-forms from batch 2, rolling back what was trained after it.
    harness.join("w0", 0);
    harness.join("w1", 1);
    harness.clock.advance(Duration::from_secs(1));
    harness.membership.tick().unwrap();
    assert_eq!(harness.membership.resume_batch, 2);
    let rolled = harness.rolled_back_batches();
    assert_eq!(rolled, [2, 3, 2, 3]);
    // Nothing older left: the next unusable report fails the job with the reasons.
    let mut heartbeat = harness.heartbeat("w0", 0);
    heartbeat.error = "position.json: missing".into();
    heartbeat.unusable_checkpoint = "checkpoints/step-2".into();
    let reply = harness.membership.heartbeat(&heartbeat).unwrap();
    assert_eq!(reply.command, Command::Fail as i32, "{}", reply.reason);
    assert!(
        reply.reason.contains("no earlier complete checkpoint"),
        "{}",
        reply.reason
    );
}

#[test]
fn a_ledger_line_outside_the_plan_stops_the_coordinator_naming_the_file() {
    let harness = Harness::two_checkpoints();
    let ledger = harness.run_dir.path().join(EpochLedger::key(0));
    let forged = LedgerLine {
        generation: harness.generation(),
        rank: 1,
        batch: 9999,
        items: Some(vec![1000]),
        rolled_back: false,
    };
    let mut text = std::fs::read_to_string(&ledger).unwrap();
    text.push_str(&serde_json::to_string(&forged).unwrap());
    text.push('\n');
    std::fs::write(&ledger, text).unwrap();
    let error = format!("{:#}", harness.restarted().err().expect("refused"));
    assert!(
        error.contains(
            "ledger/epoch-0.jsonl: batch 9999 of rank 1 (generation 1) is past the plan's"
        ),
        "{error}"
    );
}

/// One request of an arbitrary client: field values drawn from small, plausible and extreme
/// ranges.
#[derive(Debug, Clone)]
enum Hostile {
    Join {
        worker: u8,
        port: u32,
        host: u8,
    },
    Heartbeat {
        worker: u8,
        generation: u64,
        rank: u32,
        epoch: u64,
        batches_done: u64,
        rate: f64,
        loss: f64,
        counts: Vec<u64>,
        completed: Vec<(u64, Vec<u64>)>,
    },
    Shard {
        worker: u8,
        generation: u64,
        rank: u32,
        epoch: u64,
        start_index: u64,
    },
    CheckpointDone {
        worker: u8,
        generation: u64,
        rank: u32,
        batch: u64,
        step: u64,
    },
    Tick {
        millis: u64,
    },
    /// A truthful heartbeat of a current member (so the ledger does get lines to check).
    Truthful {
        rank: u32,
        from: u64,
        count: u64,
    },
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..40, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0f64..10.0,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-1.0),
        Just(f64::MAX)
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        (0u8..4, prop_oneof![Just(29500u32), any::<u32>()], 0u8..3)
            .prop_map(|(worker, port, host)| Hostile::Join { worker, port, host }),
        (
            0u8..4,
            0u64..4,
            0u32..3,
            0u64..3,
            number(),
            float(),
            float(),
            prop::collection::vec(number(), 0..6),
            prop::collection::vec((number(), prop::collection::vec(1000u64..1150, 0..4)), 0..3),
        )
            .prop_map(
                |(worker, generation, rank, epoch, batches_done, rate, loss, counts, completed)| {
                    Hostile::Heartbeat {
                        worker,
                        generation,
                        rank,
                        epoch,
                        batches_done,
                        rate,
                        loss,
                        counts,
                        completed,
                    }
                }
            ),
        (0u8..4, 0u64..4, 0u32..3, number(), number()).prop_map(
            |(worker, generation, rank, epoch, start_index)| Hostile::Shard {
                worker,
                generation,
                rank,
                epoch,
                start_index
            }
        ),
        (0u8..4, 0u64..4, 0u32..3, number(), number()).prop_map(
            |(worker, generation, rank, batch, step)| Hostile::CheckpointDone {
                worker,
                generation,
                rank,
                batch,
                step
            }
        ),
        (0u64..3000).prop_map(|millis| Hostile::Tick { millis }),
        (0u32..2, 0u64..30, 0u64..4).prop_map(|(rank, from, count)| Hostile::Truthful {
            rank,
            from,
            count
        }),
    ]
}

fn drive(harness: &mut Harness, request: Hostile) {
    let id = |worker: u8| format!("w{worker}");
    let membership = &mut harness.membership;
    match request {
        Hostile::Join { worker, port, host } => {
            let request = JoinRequest {
                worker_id: id(worker),
                node: "n".into(),
                local_rank: u32::from(worker),
                advertise_host: ["10.0.0.1", "bad host", ""][usize::from(host)].into(),
                store_port: port,
            };
            if let Ok(join) = WorkerJoin::try_from(request) {
                let _ = membership.register_join(join);
            }
        }
        Hostile::Heartbeat {
            worker,
            generation,
            rank,
            epoch,
            batches_done,
            rate,
            loss,
            counts,
            completed,
        } => {
            let request = HeartbeatRequest {
                worker_id: id(worker),
                generation,
                rank,
                epoch,
                segment: 0,
                batches_done,
                loss,
                items_per_second: rate,
                token_length_counts: counts,
                completed: completed
                    .into_iter()
                    .map(|(batch, item_ids)| arbor_proto::v1::CompletedBatch { batch, item_ids })
                    .collect(),
                ..Default::default()
            };
            if let Ok(heartbeat) = WorkerHeartbeat::try_from(request) {
                let _ = membership.heartbeat(&heartbeat);
            }
        }
        Hostile::Shard {
            worker,
            generation,
            rank,
            epoch,
            start_index,
        } => {
            let ask = ShardAsk {
                member: MemberRef {
                    worker_id: id(worker),
                    generation,
                    rank,
                },
                epoch,
                start_index,
            };
            let _ = membership.shard_source(&ask);
        }
        Hostile::CheckpointDone {
            worker,
            generation,
            rank,
            batch,
            step,
        } => {
            let report = CheckpointReport {
                member: MemberRef {
                    worker_id: id(worker),
                    generation,
                    rank,
                },
                epoch: 0,
                segment: 0,
                batch,
                step,
            };
            let _ = membership.checkpoint_done(&report);
        }
        Hostile::Tick { millis } => {
            harness.clock.advance(Duration::from_millis(millis));
            let _ = membership.tick();
        }
        Hostile::Truthful { rank, from, count } => {
            let Some(worker_id) = harness.membership.group.get(rank as usize).cloned() else {
                return;
            };
            let Some(plan) = harness.membership.plan.clone() else {
                return;
            };
            let total = plan.batches_per_rank();
            let from = from.max(harness.membership.resume_batch).min(total);
            let to = (from + count).min(total);
            let mut heartbeat = harness.heartbeat(&worker_id, rank);
            heartbeat.batches_done = to;
            heartbeat.completed = (from..to)
                .map(|batch| requests::ReportedBatch {
                    batch,
                    item_ids: harness.items(rank, batch),
                })
                .collect();
            let outcome = harness.membership.heartbeat(&heartbeat);
            if harness.membership.phase() == &Phase::Running {
                assert!(
                    outcome.is_ok(),
                    "a truthful heartbeat was refused: {outcome:?}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever arrives, in whatever order: no panic, no counter wraps, and every ledger line
    /// is inside the plan with exactly the sampler's items.
    #[test]
    fn arbitrary_request_sequences_keep_the_ledger_and_counters_sound(
        requests in prop::collection::vec(hostile(), 1..60)
    ) {
        let mut harness = Harness::running();
        for request in requests {
            drive(&mut harness, request);
            let status = harness.membership.status();
            let progress = status.progress.unwrap();
            prop_assert!(progress.fraction_done.is_finite() && (0.0..=1.0).contains(&progress.fraction_done));
            prop_assert!(progress.current_step <= progress.total_steps.max(progress.current_step));
            for worker in &status.workers {
                prop_assert!(worker.items_per_second.is_finite() && worker.items_per_second >= 0.0);
            }
        }
        let lines = harness.ledger_lines();
        let current = harness.membership.state.segments.last().cloned();
        if let (Some(plan), Some(current)) = (harness.membership.plan.clone(), current) {
            if harness.membership.state.epoch == 0 {
                let of_this_plan = |line: &&LedgerLine| {
                    !line.rolled_back && current.generations.contains(&line.generation)
                };
                for line in lines.iter().filter(of_this_plan) {
                    prop_assert!(line.batch < plan.batches_per_rank());
                    let dataset = &harness.membership.dataset;
                    let rank_plan = harness.membership.rebuild_plan().unwrap();
                    let mut sampler = rank_plan.sampler(&dataset.items, &dataset.table, line.rank).unwrap();
                    sampler.skip(line.batch);
                    let expected: Vec<u64> = sampler.next_batch().unwrap().positions.iter().map(|&p| dataset.records[p as usize].id).collect();
                    prop_assert_eq!(line.items.clone().unwrap(), expected);
                }
            }
        }
    }
}

#[test]
fn the_same_start_failure_max_start_failures_times_fails_the_job() {
    let mut harness = Harness::running();
    let error = "the trainer did not start: model.path /nope: no such file";
    let fatal = |harness: &Harness| {
        let mut fatal = harness.heartbeat("w1", 1);
        fatal.error = error.into();
        fatal.fatal = true;
        fatal
    };
    // The default limit is 3: twice the group re-forms and tries again.
    for attempt in 1..=2 {
        let reply = harness.membership.heartbeat(&fatal(&harness)).unwrap();
        assert_eq!(reply.command, Command::Regroup as i32, "attempt {attempt}");
        assert!(
            reply.reason.contains(&format!("({attempt} of 3)")),
            "{}",
            reply.reason
        );
        harness.join("w0", 0);
        harness.join("w1", 1);
        harness.clock.advance(Duration::from_secs(1));
        harness.membership.tick().unwrap();
        assert_eq!(harness.membership.phase(), &Phase::Running);
    }
    let reply = harness.membership.heartbeat(&fatal(&harness)).unwrap();
    assert_eq!(reply.command, Command::Fail as i32);
    match harness.membership.phase() {
        Phase::Failed(reason) => assert!(
            reason.contains("rank 1 cannot train this job (3 start failures")
                && reason.contains("model.path /nope"),
            "{reason}"
        ),
        other => panic!("the job goes on: {other:?}"),
    }
    let persisted = JobState::load(&LocalRunStore::new(harness.run_dir.path().to_path_buf()))
        .unwrap()
        .unwrap();
    assert!(persisted.failure.unwrap().contains("cannot train this job"));
}
