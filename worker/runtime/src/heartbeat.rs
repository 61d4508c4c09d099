//! The heartbeat: a background task that reports progress (and the ledger's completed batches)
//! every `heartbeat_interval_s` and turns the coordinator's replies into a [`Control`] the
//! batch loop obeys.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_proto::v1::{Command, CompletedBatch, HeartbeatRequest};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::client::{is_transient, Client};

/// What the coordinator asked this worker to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Regroup(String),
    Stop(String),
    /// The job failed: exit with its reason, without final exports.
    Fail(String),
}

/// A checkpoint the coordinator asked for: when `batch` batches of the plan of (`epoch`,
/// `segment`) are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedCheckpoint {
    pub epoch: u64,
    pub segment: u64,
    pub batch: u64,
    /// Also export the weights of that step.
    pub export: bool,
}

/// Progress of this rank, shared by the batch loop and the heartbeat task.
#[derive(Debug, Default)]
pub struct Progress {
    pub generation: u64,
    pub rank: u32,
    pub epoch: u64,
    pub segment: u64,
    pub batches_done: u64,
    pub loss: f64,
    pub items_per_second: f64,
    pub data_wait_seconds: f64,
    pub learning_rate: f64,
    /// Prompts encoded since the last heartbeat, by token-length bin.
    pub token_length_counts: [u64; 4],
    /// Completed batches not yet acknowledged by the coordinator.
    pub completed: Vec<CompletedBatch>,
    /// A failure to report (a collective error), sent once.
    pub error: String,
    /// `error` means this rank cannot train the job at all (its trainer did not start).
    pub fatal: bool,
    /// Why the job must fail at once (the data failure budget spent), sent until answered.
    pub job_failure: String,
    /// The checkpoint this rank could not resume from (with `error` saying why).
    pub unusable_checkpoint: String,
    /// The latest validation loss and its step (rank 0), sent with every heartbeat.
    pub validation: Option<(f64, u64)>,
    pub control: Option<Control>,
    /// The latest checkpoint the coordinator asked for (COMMAND_CHECKPOINT).
    pub requested_checkpoint: Option<RequestedCheckpoint>,
}

pub type SharedProgress = Arc<Mutex<Progress>>;

fn lock(progress: &SharedProgress) -> std::sync::MutexGuard<'_, Progress> {
    progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends one heartbeat now. Completed batches are only dropped once the coordinator
/// acknowledged them.
pub async fn send_heartbeat(client: &Client, worker_id: &str, progress: &SharedProgress) {
    let (request, sent) = {
        let mut state = lock(progress);
        let sent = std::mem::take(&mut state.completed);
        let request = HeartbeatRequest {
            worker_id: worker_id.to_string(),
            generation: state.generation,
            rank: state.rank,
            epoch: state.epoch,
            segment: state.segment,
            batches_done: state.batches_done,
            loss: state.loss,
            items_per_second: state.items_per_second,
            completed: sent.clone(),
            error: std::mem::take(&mut state.error),
            fatal: std::mem::take(&mut state.fatal),
            job_failure: state.job_failure.clone(),
            unusable_checkpoint: std::mem::take(&mut state.unusable_checkpoint),
            data_wait_seconds: std::mem::take(&mut state.data_wait_seconds),
            learning_rate: state.learning_rate,
            token_length_counts: std::mem::take(&mut state.token_length_counts).to_vec(),
            validation_loss: state.validation.map(|(loss, _)| loss),
            validation_step: state.validation.map_or(0, |(_, step)| step),
        };
        (request, sent)
    };
    let error_sent = request.error.clone();
    let (epoch_sent, segment_sent) = (request.epoch, request.segment);
    let request_counts = request.token_length_counts.clone();
    match client.clone().heartbeat(request).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            let command = Command::try_from(reply.command).unwrap_or(Command::Continue);
            let mut state = lock(progress);
            match command {
                Command::Regroup => {
                    if state.control.is_none() {
                        info!(reason = %reply.reason, "coordinator asks to regroup");
                    }
                    state.control = Some(Control::Regroup(reply.reason));
                }
                Command::Stop => state.control = Some(Control::Stop(reply.reason)),
                Command::Fail => state.control = Some(Control::Fail(reply.reason)),
                Command::Checkpoint => {
                    let requested = RequestedCheckpoint {
                        epoch: epoch_sent,
                        segment: segment_sent,
                        batch: reply.checkpoint_batch,
                        export: reply.export,
                    };
                    if state.requested_checkpoint != Some(requested) {
                        info!(batch = requested.batch, reason = %reply.reason, "coordinator asks for a checkpoint");
                    }
                    state.requested_checkpoint = Some(requested);
                }
                Command::Continue | Command::Unspecified => {}
            }
        }
        Err(status) => {
            let mut state = lock(progress);
            // Put the unacknowledged batches back in front of any newer ones.
            let newer = std::mem::replace(&mut state.completed, sent);
            state.completed.extend(newer);
            if state.error.is_empty() {
                state.error = error_sent;
            }
            // Counts not delivered go with the next heartbeat.
            for (pending, unsent) in state.token_length_counts.iter_mut().zip(&request_counts) {
                *pending += unsent;
            }
            if status.code() == tonic::Code::NotFound {
                // The coordinator restarted or dropped us: join again.
                state.control = Some(Control::Regroup(status.message().to_string()));
            } else if is_transient(&status) {
                debug!(status = %status, "heartbeat failed; retrying");
            } else {
                warn!(status = %status, "heartbeat refused");
            }
        }
    }
}

/// Runs heartbeats until `stop` turns true.
pub async fn heartbeat_loop(
    client: Client,
    worker_id: String,
    progress: SharedProgress,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        send_heartbeat(&client, &worker_id, &progress).await;
    }
}
