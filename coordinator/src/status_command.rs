//! `arbor status`: what a running job is doing.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use arbor_proto::v1::{JobEvent, Progress, StatusReply, StatusRequest};
use clap::Args;
use serde_json::json;

use arbor_runtime::trainer::TOKEN_LENGTH_BINS;

use crate::client_flags::ClientFlags;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientFlags,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let (runtime, mut client) = args.client.connect()?;
    let coordinator = &args.client.coordinator;
    let reply = runtime.block_on(async {
        let reply = tokio::time::timeout(Duration::from_secs(10), client.status(StatusRequest {}))
            .await
            .context("the coordinator did not answer within 10s")?
            .with_context(|| format!("status from {coordinator}"))?;
        anyhow::Ok(reply.into_inner())
    })?;
    let mut out = std::io::stdout().lock();
    let now = SystemTime::now();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &status_json(&reply, now))?;
        writeln!(out)?;
    } else {
        write_status(&mut out, &reply, now)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The event's time as RFC 3339 UTC (`2026-12-03T12:34:56Z`).
fn event_time(event: &JobEvent) -> SystemTime {
    let seconds = if event.unix_seconds.is_finite() && event.unix_seconds > 0.0 {
        event.unix_seconds
    } else {
        0.0
    };
    UNIX_EPOCH + Duration::from_secs_f64(seconds)
}

/// `42 s`, `3 min 5 s`, `2 h 10 min`: a short age or duration for people.
pub fn short_duration(seconds: f64) -> String {
    let seconds = if seconds.is_finite() {
        seconds.max(0.0)
    } else {
        0.0
    };
    let whole = seconds.round() as u64;
    match whole {
        0..=59 => format!("{whole} s"),
        60..=3599 => format!("{} min {} s", whole / 60, whole % 60),
        _ => format!("{} h {} min", whole / 3600, (whole % 3600) / 60),
    }
}

fn progress_json(progress: &Progress) -> serde_json::Value {
    json!({
        "total_steps": progress.total_steps,
        "current_step": progress.current_step,
        "fraction_done": progress.fraction_done,
        "eta_seconds": progress.eta_seconds,
        "steps_per_second": progress.steps_per_second,
        "epoch_batches_done": progress.epoch_batches_done,
        "epoch_batches": progress.epoch_batches,
        "epochs": progress.epochs,
        "seconds_since_checkpoint": progress.seconds_since_checkpoint,
    })
}

pub fn status_json(reply: &StatusReply, now: SystemTime) -> serde_json::Value {
    let workers: Vec<_> = reply
        .workers
        .iter()
        .map(|w| {
            json!({
                "worker_id": w.worker_id, "node": w.node, "local_rank": w.local_rank,
                "rank": if w.rank < 0 { serde_json::Value::Null } else { json!(w.rank) },
                "batches_done": w.batches_done, "items_per_second": w.items_per_second,
                "loss": w.loss, "seconds_since_heartbeat": w.seconds_since_heartbeat,
                "learning_rate": w.learning_rate,
                "non_finite_losses": w.non_finite_losses,
                "token_length_counts": TOKEN_LENGTH_BINS.iter().zip(&w.token_length_counts)
                    .map(|(bin, count)| (bin.to_string(), json!(count)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    json!({
        "job": reply.job,
        "phase": reply.phase,
        "generation": reply.generation,
        "world_size": reply.world_size,
        "epoch": reply.epoch,
        "segment": reply.segment,
        "batches_per_rank": reply.batches_per_rank,
        "step": reply.step,
        "regroups": reply.regroups,
        "pending_checkpoint_batch": (reply.pending_checkpoint_batch > 0).then_some(reply.pending_checkpoint_batch),
        "failure": if reply.failure.is_empty() { serde_json::Value::Null } else { json!(reply.failure) },
        "last_checkpoint": reply.last_checkpoint.as_ref().map(|c| json!({
            "epoch": c.epoch, "segment": c.segment, "batch": c.batch, "step": c.step, "path": c.checkpoint,
        })),
        "progress": reply.progress.as_ref().map(progress_json),
        "validation_loss": reply.validation_loss,
        "validation_step": reply.validation_loss.map(|_| reply.validation_step),
        "workers": workers,
        "recent_events": reply.recent_events,
        "events": reply.events.iter().map(|event| {
            let at = event_time(event);
            json!({
                "time": humantime::format_rfc3339_seconds(at).to_string(),
                "age_seconds": now.duration_since(at).unwrap_or_default().as_secs_f64(),
                "text": event.text,
            })
        }).collect::<Vec<_>>(),
    })
}

fn write_progress(out: &mut impl Write, reply: &StatusReply) -> anyhow::Result<()> {
    let Some(progress) = &reply.progress else {
        return Ok(());
    };
    let eta = match progress.eta_seconds {
        _ if reply.phase == "finished" => "finished".to_string(),
        Some(seconds) => format!("ETA {}", short_duration(seconds)),
        None => "ETA unknown (no step rate yet)".to_string(),
    };
    writeln!(
        out,
        "progress: step {} of {} ({:.1}%)  {}  {:.2} steps/s",
        progress.current_step,
        progress.total_steps,
        progress.fraction_done * 100.0,
        eta,
        progress.steps_per_second
    )?;
    writeln!(
        out,
        "epoch {} of {}: batch {} of {} (slowest rank)  last checkpoint {} ago",
        (reply.epoch + 1).min(progress.epochs.max(1)),
        progress.epochs,
        progress.epoch_batches_done,
        progress.epoch_batches,
        short_duration(progress.seconds_since_checkpoint)
    )?;
    Ok(())
}

fn write_status(out: &mut impl Write, reply: &StatusReply, now: SystemTime) -> anyhow::Result<()> {
    writeln!(
        out,
        "job {}: {}  generation {}  world size {}  epoch {} (segment {})  step {}  regroups {}",
        reply.job,
        reply.phase,
        reply.generation,
        reply.world_size,
        reply.epoch,
        reply.segment,
        reply.step,
        reply.regroups
    )?;
    if !reply.failure.is_empty() {
        writeln!(out, "failure: {}", reply.failure)?;
    }
    write_progress(out, reply)?;
    if let Some(loss) = reply.validation_loss {
        writeln!(
            out,
            "validation loss {loss:.5} at step {}",
            reply.validation_step
        )?;
    }
    match &reply.last_checkpoint {
        Some(c) => writeln!(
            out,
            "last checkpoint: {} (epoch {} batch {})",
            c.checkpoint, c.epoch, c.batch
        )?,
        None => writeln!(out, "last checkpoint: none")?,
    }
    if reply.pending_checkpoint_batch > 0 {
        writeln!(
            out,
            "requested checkpoint: at batch {}",
            reply.pending_checkpoint_batch
        )?;
    }
    writeln!(
        out,
        "\n{:>5}  {:<32} {:>10} {:>10} {:>9} {:>10} {:>8}  prompts by tokens (<=75/150/225/more)",
        "rank", "worker", "batches", "items/s", "loss", "lr", "seen"
    )?;
    for w in &reply.workers {
        let rank = if w.rank < 0 {
            "-".to_string()
        } else {
            w.rank.to_string()
        };
        let prompts: Vec<String> = w.token_length_counts.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "{rank:>5}  {:<32} {:>4}/{:<5} {:>10.1} {:>9.4} {:>10.3e} {:>7.1}s  {}",
            w.worker_id,
            w.batches_done,
            reply.batches_per_rank,
            w.items_per_second,
            w.loss,
            w.learning_rate,
            w.seconds_since_heartbeat,
            prompts.join("/")
        )?;
    }
    writeln!(out, "\nrecent events (UTC):")?;
    for event in reply.events.iter().rev().take(10).rev() {
        let at = event_time(event);
        let clock = humantime::format_rfc3339_seconds(at).to_string();
        // `2026-12-03T12:34:56Z` -> `2026-12-03 12:34:56`
        let clock = clock.trim_end_matches('Z').replacen('T', " ", 1);
        let age = short_duration(now.duration_since(at).unwrap_or_default().as_secs_f64());
        writeln!(out, "  {clock}  ({age:>10} ago)  {}", event.text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> StatusReply {
        StatusReply {
            job: "demo".into(),
            phase: "running".into(),
            epoch: 1,
            progress: Some(Progress {
                total_steps: 480,
                current_step: 36,
                fraction_done: 0.075,
                eta_seconds: Some(444.0),
                steps_per_second: 1.0,
                epoch_batches_done: 12,
                epoch_batches: 24,
                epochs: 20,
                seconds_since_checkpoint: 75.0,
            }),
            events: vec![JobEvent {
                unix_seconds: 1_796_284_354.0,
                text: "epoch 0 complete".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_text_shows_progress_eta_and_utc_event_times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_284_366);
        let mut text = Vec::new();
        write_status(&mut text, &reply(), now).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("progress: step 36 of 480 (7.5%)  ETA 7 min 24 s"),
            "{text}"
        );
        assert!(text.contains("epoch 2 of 20: batch 12 of 24"), "{text}");
        assert!(text.contains("last checkpoint 1 min 15 s ago"), "{text}");
        assert!(
            text.contains("2026-12-03 07:52:34  (      12 s ago)  epoch 0 complete"),
            "{text}"
        );
        assert!(!text.contains("[1796284354]"), "{text}");
    }

    #[test]
    fn the_json_carries_progress_and_rfc3339_times() {
        let now = UNIX_EPOCH + Duration::from_secs(1_796_284_366);
        let value = status_json(&reply(), now);
        assert_eq!(value["progress"]["total_steps"], 480);
        assert_eq!(value["progress"]["eta_seconds"], 444.0);
        assert_eq!(value["events"][0]["time"], "2026-12-03T07:52:34Z");
        assert_eq!(value["events"][0]["age_seconds"], 12.0);
    }
}
