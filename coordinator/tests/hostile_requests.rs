//! Hostile requests against the real `arbor coordinator`, from a client that holds the right
//! token (a worker with a bug, a stale binary or a leaked token): every one must be refused
//! with a clear status naming the field, or answered without harm, and the coordinator must
//! keep serving with its ledger and counters sound. The last line prints
//! `N/M hostile requests refused cleanly`.

mod support;

use std::time::{Duration, Instant};

use arbor_proto::v1::{
    CheckpointDoneRequest, CompletedBatch, HeartbeatRequest, JoinRequest, RequestCheckpointRequest,
    ShardRequest, StatusRequest,
};
use support::{client_when_up, Job, JobSpec};
use tonic::Code;

type Client = arbor_runtime::client::Client;

/// What a hostile request must get back.
struct Expect {
    code: Code,
    /// The message starts with this (the field the refusal names).
    field: &'static str,
}

fn expect(code: Code, field: &'static str) -> Expect {
    Expect { code, field }
}

fn join(worker_id: &str, host: &str, port: u32) -> JoinRequest {
    JoinRequest {
        worker_id: worker_id.into(),
        node: "n".into(),
        local_rank: 0,
        advertise_host: host.into(),
        store_port: port,
    }
}

/// One hostile request, built for the member (`worker_id`, `generation`, rank 0) it claims to
/// come from.
enum Hostile {
    Join(JoinRequest),
    Heartbeat(fn(&mut HeartbeatRequest)),
    Shard { epoch: u64, start_index: u64 },
    CheckpointDone { batch: u64, step: u64 },
    RequestCheckpoint(RequestCheckpointRequest),
}

/// Joins (again) as `worker_id`, the only member of a one-worker group; returns the generation.
async fn member(client: &mut Client, worker_id: &str) -> u64 {
    client
        .join(join(worker_id, "127.0.0.1", 29500))
        .await
        .unwrap()
        .into_inner()
        .generation
}

async fn send(client: &mut Client, hostile: Hostile) -> Result<(), tonic::Status> {
    let worker_id = "member".to_string();
    // Every hostile request comes from a fresh member: lies are counted per registration, and
    // this suite is about each refusal, not the drop (tested below).
    let generation = if matches!(hostile, Hostile::Join(_) | Hostile::RequestCheckpoint(_)) {
        0
    } else {
        member(client, &worker_id).await
    };
    match hostile {
        Hostile::Join(request) => client.join(request).await.map(|_| ()),
        Hostile::Heartbeat(edit) => {
            let mut request = HeartbeatRequest {
                worker_id,
                generation,
                rank: 0,
                ..Default::default()
            };
            edit(&mut request);
            client.heartbeat(request).await.map(|_| ())
        }
        Hostile::Shard { epoch, start_index } => {
            let request = ShardRequest {
                worker_id,
                generation,
                rank: 0,
                epoch,
                start_index,
            };
            let asked = Instant::now();
            let result = client.shard(request).await.map(|_| ());
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "refused at once, not at the deadline"
            );
            result
        }
        Hostile::CheckpointDone { batch, step } => client
            .checkpoint_done(CheckpointDoneRequest {
                worker_id,
                generation,
                rank: 0,
                epoch: 0,
                segment: 0,
                batch,
                step,
            })
            .await
            .map(|_| ()),
        Hostile::RequestCheckpoint(request) => client.request_checkpoint(request).await.map(|_| ()),
    }
}

#[test]
fn hostile_requests_are_refused_cleanly_and_the_job_goes_on() {
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 2,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let address = job.address();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases: Vec<(&str, Hostile, Expect)> = vec![
        (
            "join: store_port above 65535",
            Hostile::Join(join("j", "127.0.0.1", 70_000)),
            expect(Code::InvalidArgument, "join.store_port"),
        ),
        (
            "join: store_port 0",
            Hostile::Join(join("j", "127.0.0.1", 0)),
            expect(Code::InvalidArgument, "join.store_port"),
        ),
        (
            "join: a host with a space",
            Hostile::Join(join("j", "evil host", 1)),
            expect(Code::InvalidArgument, "join.advertise_host"),
        ),
        (
            "join: host:port as the host",
            Hostile::Join(join("j", "10.0.0.1:80", 1)),
            expect(Code::InvalidArgument, "join.advertise_host"),
        ),
        (
            "join: an empty host",
            Hostile::Join(join("j", "", 1)),
            expect(Code::InvalidArgument, "join.advertise_host"),
        ),
        (
            "join: an empty worker id",
            Hostile::Join(join("", "127.0.0.1", 1)),
            expect(Code::InvalidArgument, "join.worker_id"),
        ),
        (
            "join: a newline in the worker id",
            Hostile::Join(join("a\nb", "127.0.0.1", 1)),
            expect(Code::InvalidArgument, "join.worker_id"),
        ),
        (
            "join: a 300-byte worker id",
            Hostile::Join(join(&"w".repeat(300), "127.0.0.1", 1)),
            expect(Code::InvalidArgument, "join.worker_id"),
        ),
        (
            "heartbeat: NaN items/s",
            Hostile::Heartbeat(|r| r.items_per_second = f64::NAN),
            expect(Code::InvalidArgument, "heartbeat.items_per_second"),
        ),
        (
            "heartbeat: infinite items/s",
            Hostile::Heartbeat(|r| r.items_per_second = f64::INFINITY),
            expect(Code::InvalidArgument, "heartbeat.items_per_second"),
        ),
        (
            "heartbeat: negative items/s",
            Hostile::Heartbeat(|r| r.items_per_second = -5.0),
            expect(Code::InvalidArgument, "heartbeat.items_per_second"),
        ),
        (
            "heartbeat: NaN learning rate",
            Hostile::Heartbeat(|r| r.learning_rate = f64::NAN),
            expect(Code::InvalidArgument, "heartbeat.learning_rate"),
        ),
        (
            "heartbeat: a negative validation loss",
            Hostile::Heartbeat(|r| r.validation_loss = Some(-1.0)),
            expect(Code::InvalidArgument, "heartbeat.validation_loss"),
        ),
        (
            "heartbeat: batches_done u64::MAX",
            Hostile::Heartbeat(|r| r.batches_done = u64::MAX),
            expect(Code::OutOfRange, "heartbeat.batches_done"),
        ),
        (
            "heartbeat: nine token-length bins",
            Hostile::Heartbeat(|r| r.token_length_counts = vec![1; 9]),
            expect(Code::InvalidArgument, "heartbeat.token_length_counts"),
        ),
        (
            "heartbeat: an epoch not started",
            Hostile::Heartbeat(|r| r.epoch = 99),
            expect(Code::OutOfRange, "heartbeat.epoch"),
        ),
        (
            "heartbeat: ledger items from no shard",
            Hostile::Heartbeat(|r| {
                r.completed = vec![CompletedBatch {
                    batch: 0,
                    item_ids: vec![1, 2, 3, 4],
                }]
            }),
            expect(Code::InvalidArgument, "heartbeat.completed.item_ids"),
        ),
        (
            "heartbeat: a ledger batch past the plan",
            Hostile::Heartbeat(|r| {
                r.completed = vec![CompletedBatch {
                    batch: 1_000_000,
                    item_ids: vec![1000],
                }]
            }),
            expect(Code::OutOfRange, "heartbeat.completed.batch"),
        ),
        (
            "shard: epoch u64::MAX",
            Hostile::Shard {
                epoch: u64::MAX,
                start_index: 0,
            },
            expect(Code::OutOfRange, "shard.epoch"),
        ),
        (
            "shard: start_index past the shard",
            Hostile::Shard {
                epoch: 0,
                start_index: u64::MAX,
            },
            expect(Code::InvalidArgument, "shard.start_index"),
        ),
        (
            "checkpoint_done: a batch past the plan",
            Hostile::CheckpointDone {
                batch: u64::MAX,
                step: 0,
            },
            expect(Code::InvalidArgument, "checkpoint_done.batch"),
        ),
        (
            "checkpoint_done: a step no batches explain",
            Hostile::CheckpointDone {
                batch: 2,
                step: u64::MAX,
            },
            expect(Code::InvalidArgument, "checkpoint_done.step"),
        ),
        (
            "request_checkpoint: a 2000-byte reason",
            Hostile::RequestCheckpoint(RequestCheckpointRequest {
                reason: "x".repeat(2000),
                export: false,
            }),
            expect(Code::InvalidArgument, "request_checkpoint.reason"),
        ),
    ];
    let total = cases.len();
    let failures = runtime.block_on(async {
        let mut client = client_when_up(&address).await;
        let mut failures = Vec::new();
        for (name, hostile, expected) in cases {
            let verdict = match send(&mut client, hostile).await {
                Ok(()) => Some("accepted".to_string()),
                Err(status)
                    if status.code() == expected.code
                        && status.message().starts_with(expected.field) =>
                {
                    None
                }
                Err(status) => Some(format!("{:?}: {}", status.code(), status.message())),
            };
            if let Some(why) = verdict {
                failures.push(format!("{name}: {why}"));
            }
        }
        // A worker that keeps lying is dropped: its next request is from a stranger.
        let generation = member(&mut client, "liar").await;
        for _ in 0..3 {
            let lie = HeartbeatRequest {
                worker_id: "liar".into(),
                generation,
                rank: 0,
                batches_done: u64::MAX,
                ..Default::default()
            };
            assert_eq!(
                client.heartbeat(lie).await.unwrap_err().code(),
                Code::OutOfRange
            );
        }
        let after = HeartbeatRequest {
            worker_id: "liar".into(),
            generation,
            rank: 0,
            ..Default::default()
        };
        assert_eq!(
            client.heartbeat(after).await.unwrap_err().code(),
            Code::NotFound
        );
        // The coordinator still serves, the job goes on with a truthful member, and nothing
        // wrapped.
        member(&mut client, "member").await;
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.phase, "running", "{status:?}");
        let progress = status.progress.unwrap();
        assert!(
            (0.0..=1.0).contains(&progress.fraction_done),
            "{progress:?}"
        );
        failures
    });
    // No hostile line reached the ledger.
    let ledger =
        std::fs::read_to_string(job.run_dir().join("ledger/epoch-0.jsonl")).unwrap_or_default();
    assert!(ledger.trim().is_empty(), "{ledger}");
    println!(
        "{}/{total} hostile requests refused cleanly",
        total - failures.len()
    );
    assert!(
        failures.is_empty(),
        "not refused cleanly:\n{}",
        failures.join("\n")
    );
}
