//! The control plane with real processes on loopback (issue 6): dry-run jobs, failure
//! injection (SIGKILL, SIGSTOP, a killed coordinator), refused requests and cut streams.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use arbor_proto::v1::{HeartbeatRequest, JoinRequest, ShardRequest, StatusRequest};
use arbor_testkit::process::{signal, wait_exit};
use arbor_testkit::runtime;
use support::{assert_nothing_twice_nothing_lost, client_when_up, Job, JobSpec, TOKEN};

fn assert_exactly_once(job: &Job, epoch: u64, global_batch: usize) {
    let trained = job.trained_items(epoch);
    let kept = job.kept_ids();
    let kept_set: HashSet<u64> = kept.iter().copied().collect();
    for (&id, &count) in &trained {
        assert!(
            kept_set.contains(&id),
            "epoch {epoch}: item {id} is not a kept item"
        );
        assert_eq!(count, 1, "epoch {epoch}: item {id} trained {count} times");
    }
    let expected = kept.len() - kept.len() % global_batch;
    assert_eq!(
        trained.len(),
        expected,
        "epoch {epoch}: every kept item but the trim"
    );
}

#[test]
fn three_worker_dry_run_trains_every_kept_item_once_per_epoch() {
    let mut job = Job::new(&JobSpec {
        real_images: true,
        ..JobSpec::default()
    });
    job.start_coordinator();
    for rank in 0..3 {
        job.start_worker(rank, 0);
    }
    assert!(
        job.wait_coordinator(Duration::from_secs(90)),
        "{}",
        job.coordinator_log()
    );
    for epoch in 0..2 {
        assert_exactly_once(&job, epoch, 12);
    }
    let state = job.state();
    assert_eq!(state["finished"], true);
    assert_eq!(state["epoch"], 2);
    assert!(job
        .run_dir()
        .join(format!(
            "{}/COMPLETE",
            state["last_checkpoint"]["path"].as_str().unwrap()
        ))
        .exists());
    for worker in &mut job.workers {
        assert!(worker.wait().unwrap().success());
    }
    for rank in 0..3 {
        let log = job.worker_log(rank);
        let finished = log
            .lines()
            .find(|line| line.contains("dry run finished"))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(
            finished.contains("failed=0"),
            "every image decodes: {finished}"
        );
        assert!(
            finished.contains("items=200"),
            "two epochs of 100 items per rank: {finished}"
        );
    }
}

#[test]
fn unreadable_images_are_reported_and_the_dry_run_still_finishes() {
    // With the data failure budget off (`data.max_failed_fraction = 1.0`).
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 1,
        epochs: 1,
        max_failed_fraction: Some(1.0),
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker(0, 0);
    assert!(
        job.wait_coordinator(Duration::from_secs(90)),
        "{}",
        job.coordinator_log()
    );
    assert_exactly_once(&job, 0, 4);
    let log = job.worker_log(0);
    assert!(log.contains("item failed to load"), "{log}");
    assert!(
        log.contains("failed=300"),
        "every 1-byte file is counted: {log}"
    );
}

#[test]
fn a_dataset_that_fails_to_load_fails_the_job_with_the_first_reasons() {
    // Every image is a 1-byte file: past 1% of a 1000-item window (10 items), the job fails.
    let spec = JobSpec {
        min_workers: 2,
        max_workers: 2,
        epochs: 3,
        max_failed_fraction: Some(0.01),
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker(0, 0);
    job.start_worker(1, 0);
    assert!(
        !job.wait_coordinator(Duration::from_secs(90)),
        "a job that trained on nothing but repeats must not succeed:\n{}",
        job.coordinator_log()
    );
    let state = job.state();
    assert_eq!(state["finished"], false);
    let failure = state["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("items failed to load")
            && failure.contains("data.max_failed_fraction 0.01")
            && failure.contains("first reasons: item "),
        "{failure}"
    );
    // Stopped within the allowance: 10 failures are allowed, so the third batch of 4 spends it.
    let batches: usize = (0..3).map(|epoch| job.ledger_lines(epoch).len()).sum();
    assert!(
        batches <= 2 * 3,
        "{batches} batches trained before the job failed"
    );
    for (rank, worker) in job.workers.iter_mut().enumerate() {
        let status = worker.wait().unwrap();
        assert!(!status.success(), "worker {rank} exited with {status}");
    }
    let log = job.worker_log(0) + &job.worker_log(1);
    assert!(log.contains("the data failure budget is spent"), "{log}");
    assert!(log.contains("job failed"), "{log}");
}

#[test]
fn a_worker_killed_mid_epoch_regroups_to_two_and_the_ledger_stays_exact() {
    let spec = JobSpec {
        items: 400,
        min_workers: 2,
        max_workers: 3,
        epochs: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    for rank in 0..3 {
        job.start_worker(rank, 40);
    }
    job.wait_until(
        Duration::from_secs(60),
        "batches past the first checkpoint",
        |job| job.ledger_lines(0).len() >= 24,
    );
    let killed_at = Instant::now();
    signal(job.workers[1].id(), "-KILL");
    job.wait_until(Duration::from_secs(30), "the regroup", |job| {
        job.state()["generation"].as_u64() >= Some(2)
    });
    let regroup_seconds = killed_at.elapsed().as_secs_f64();
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}",
        job.coordinator_log()
    );
    eprintln!("regroup after SIGKILL: {regroup_seconds:.2}s");
    let state = job.state();
    assert_eq!(state["finished"], true);
    assert!(
        regroup_seconds < 2.0 + 3.0,
        "detected after {regroup_seconds}s"
    );
    let log = job.coordinator_log();
    assert!(log.contains("lost: no heartbeat"), "{log}");
    // The epoch ended on the regrouped plan of two ranks.
    assert_eq!(state["segments"][0]["world_size"], 2, "{state}");
    let after_regroup = job
        .ledger_lines(0)
        .iter()
        .filter(|line| line["generation"] == 2)
        .count();
    assert!(
        after_regroup > 0,
        "the two survivors trained after the regroup"
    );
    assert_nothing_twice_nothing_lost(&job, 0, 2, 12);
}

#[test]
fn a_stopped_worker_is_detected_within_the_heartbeat_timeout() {
    let spec = JobSpec {
        items: 600,
        min_workers: 2,
        max_workers: 3,
        epochs: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    for rank in 0..3 {
        job.start_worker(rank, 40);
    }
    job.wait_until(Duration::from_secs(60), "training to start", |job| {
        job.ledger_lines(0).len() >= 6
    });
    let stopped_at = Instant::now();
    signal(job.workers[2].id(), "-STOP");
    job.wait_until(Duration::from_secs(20), "the lost worker", |job| {
        job.coordinator_log().contains("lost: no heartbeat")
    });
    let detection = stopped_at.elapsed().as_secs_f64();
    eprintln!("SIGSTOP detected after {detection:.2}s (heartbeat timeout 2s)");
    assert!(detection >= 1.5, "detected too early: {detection}s");
    assert!(detection < 2.0 + 2.5, "detected after {detection}s");
    // The survivors carry on; the stopped worker, resumed, re-joins and the job still finishes.
    signal(job.workers[2].id(), "-CONT");
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}",
        job.coordinator_log()
    );
    assert_nothing_twice_nothing_lost(&job, 0, 4, 12);
}

#[test]
fn a_restarted_coordinator_resumes_the_job_with_the_ledger_intact() {
    let spec = JobSpec {
        items: 400,
        epochs: 2,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    for rank in 0..3 {
        job.start_worker(rank, 30);
    }
    job.wait_until(Duration::from_secs(60), "a checkpoint", |job| {
        !job.state()["last_checkpoint"].is_null()
    });
    let coordinator = job.coordinator.as_mut().unwrap();
    signal(coordinator.id(), "-KILL");
    coordinator.wait().unwrap();
    let generation_before = job.state()["generation"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    job.start_coordinator();
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}",
        job.coordinator_log()
    );
    let state = job.state();
    assert_eq!(state["finished"], true);
    assert!(state["generation"].as_u64().unwrap() > generation_before);
    for epoch in 0..2 {
        assert_nothing_twice_nothing_lost(&job, epoch, 1, 12);
    }
    for worker in &mut job.workers {
        assert!(worker.wait().unwrap().success());
    }
}

#[test]
fn bad_requests_are_refused_with_a_reason_and_the_server_keeps_serving() {
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let address = job.address();
    let runtime = runtime();
    runtime.block_on(async {
        let mut client = client_when_up(&address).await;

        let mut wrong = arbor_runtime::client::connect(&address, "not-the-token", None).unwrap();
        let status = wrong.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), "invalid job token");

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut anonymous = arbor_proto::v1::coordinator_client::CoordinatorClient::new(channel);
        let status = anonymous.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("missing"), "{}", status.message());

        let status = client
            .heartbeat(HeartbeatRequest {
                worker_id: "stranger".into(),
                generation: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("unknown worker stranger"),
            "{}",
            status.message()
        );

        let status = client
            .join(JoinRequest {
                worker_id: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        // A request over cluster.max_request_bytes (default 4 MiB) is refused before decoding.
        let status = client
            .join(JoinRequest {
                worker_id: "x".repeat(5 << 20),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(
            status.message().contains("message length too large"),
            "{}",
            status.message()
        );

        // A real member, then a call with a stale generation.
        let reply = client
            .join(JoinRequest {
                worker_id: "w0".into(),
                node: "n".into(),
                local_rank: 0,
                advertise_host: "127.0.0.1".into(),
                store_port: 29500,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((reply.rank, reply.world_size, reply.generation), (0, 1, 1));
        assert_eq!(reply.store_address, "127.0.0.1:29500");
        assert_eq!(reply.store_prefix, "job/test/gen/1");
        let status = match client
            .shard(ShardRequest {
                worker_id: "w0".into(),
                generation: 0,
                rank: 0,
                epoch: 0,
                start_index: 0,
            })
            .await
        {
            Ok(_) => panic!("a stale generation must be refused"),
            Err(status) => status,
        };
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("stale generation 0"),
            "{}",
            status.message()
        );
    });

    // Garbage bytes on the gRPC port: the connection is dropped, the server keeps serving.
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    socket
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage \x16\x03\x01")
        .unwrap();
    drop(socket);
    let mut oversized = std::net::TcpStream::connect(&address).unwrap();
    let _ = oversized.write_all(&vec![0x42u8; 1 << 20]);
    drop(oversized);
    runtime.block_on(async {
        let mut client = arbor_runtime::client::connect(&address, TOKEN, None).unwrap();
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.job, "test");
        assert_eq!(status.phase, "running");
    });
    let metrics = reqwest_metrics(job.metrics_port);
    assert!(
        metrics.contains("arbor_refused_requests_total{reason=\"wrong_token\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbor_refused_requests_total{reason=\"missing_token\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbor_refused_requests_total{reason=\"stale_generation\"} 1"),
        "{metrics}"
    );
}

/// A minimal HTTP GET of /metrics over a plain socket.
/// Fails unless the coordinator's metrics hold every one of `lines`.
fn assert_metrics_contain(port: u16, lines: &[&str]) {
    let metrics = reqwest_metrics(port);
    for line in lines {
        assert!(metrics.contains(line), "no `{line}` in:\n{metrics}");
    }
}

fn reqwest_metrics(port: u16) -> String {
    use std::io::Read;
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    response
}

/// A job of `items` items at `bsz` for one worker, its coordinator started.
fn one_worker_job(items: usize, bsz: u32) -> Job {
    let mut job = Job::new(&JobSpec {
        items,
        bsz,
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    });
    job.start_coordinator();
    job
}

/// Connects and joins as the single worker `w` of a one-worker job, retrying while the
/// coordinator starts.
async fn join_as_worker_w(
    address: &str,
) -> (arbor_runtime::client::Client, arbor_proto::v1::JoinReply) {
    let mut client = arbor_runtime::client::connect(address, TOKEN, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let join = JoinRequest {
        worker_id: "w".into(),
        node: "n".into(),
        local_rank: 0,
        advertise_host: "127.0.0.1".into(),
        store_port: 1,
    };
    loop {
        match client.join(join.clone()).await {
            Ok(reply) => return (client, reply.into_inner()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(status) => panic!("join failed: {status}"),
        }
    }
}

#[test]
fn a_cut_shard_stream_resumes_without_duplicates() {
    let job = one_worker_job(2600, 2);
    let address = job.address();
    runtime().block_on(async {
        let (mut client, reply) = join_as_worker_w(&address).await;
        let request = |start_index| ShardRequest {
            worker_id: "w".into(),
            generation: reply.generation,
            rank: 0,
            epoch: 0,
            start_index,
        };
        let mut full = Vec::new();
        let mut stream = client.shard(request(0)).await.unwrap().into_inner();
        while let Some(chunk) = stream.message().await.unwrap() {
            full.extend(chunk.items.into_iter().map(|item| item.id));
        }
        // Cut after the first chunk, then resume where it stopped.
        let mut cut = client.shard(request(0)).await.unwrap().into_inner();
        let first = cut.message().await.unwrap().unwrap();
        let header = first.header.unwrap();
        assert_eq!(header.shard_len as usize, full.len());
        let mut resumed: Vec<u64> = first.items.iter().map(|item| item.id).collect();
        drop(cut);
        let mut rest = client
            .shard(request(resumed.len() as u64))
            .await
            .unwrap()
            .into_inner();
        let mut first_index = None;
        while let Some(chunk) = rest.message().await.unwrap() {
            first_index.get_or_insert(chunk.first_index);
            resumed.extend(chunk.items.into_iter().map(|item| item.id));
        }
        assert_eq!(first_index, Some(1024));
        assert_eq!(resumed, full);
        let unique: HashSet<u64> = full.iter().copied().collect();
        assert_eq!(unique.len(), full.len());
        let past_the_end = match client.shard(request(full.len() as u64 + 1)).await {
            Ok(_) => panic!("a start_index past the end must be refused"),
            Err(status) => status,
        };
        assert_eq!(past_the_end.code(), tonic::Code::InvalidArgument);
    });
}

#[test]
fn ranks_are_contiguous_per_node_and_a_collective_error_regroups() {
    let spec = JobSpec {
        min_workers: 4,
        max_workers: 4,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let address = job.address();
    runtime().block_on(async {
        let client = client_when_up(&address).await;
        let joins = [("b", 1), ("a", 1), ("b", 0), ("a", 0)].map(|(node, local_rank)| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = JoinRequest {
                    worker_id: format!("{node}{local_rank}"),
                    node: node.into(),
                    local_rank,
                    advertise_host: format!("10.0.0.{local_rank}"),
                    store_port: 29500 + local_rank,
                };
                client.join(request).await.unwrap().into_inner()
            })
        });
        let mut ranks = Vec::new();
        for join in joins {
            let reply = join.await.unwrap();
            assert_eq!(reply.world_size, 4);
            // Rank 0 is node a's local rank 0, whose store the group uses.
            assert_eq!(reply.store_address, "10.0.0.0:29500");
            ranks.push(reply.rank);
        }
        // Joined as b1, a1, b0, a0: node a gets ranks 0-1 and node b 2-3, local ranks in order.
        assert_eq!(ranks, vec![3, 1, 2, 0]);

        let mut client = client.clone();
        let reply = client
            .heartbeat(HeartbeatRequest {
                worker_id: "a1".into(),
                generation: 1,
                rank: 1,
                error: "allreduce: Connection closed by peer".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.command, arbor_proto::v1::Command::Regroup as i32);
        assert!(
            reply.reason.contains("Connection closed by peer"),
            "{}",
            reply.reason
        );
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!((status.phase.as_str(), status.regroups), ("forming", 1));
        // The other members hear it on their next heartbeat.
        let reply = client
            .heartbeat(HeartbeatRequest {
                worker_id: "b0".into(),
                generation: 1,
                rank: 2,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.command, arbor_proto::v1::Command::Regroup as i32);
    });
}

/// Replaces the first `from` of the job's `job.toml` by `to`.
fn edit_config(job: &Job, from: &str, to: &str) {
    let path = job.path().join("job.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "job.toml has no `{from}`");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn a_changed_config_or_manifest_under_a_job_is_refused_with_the_reason() {
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.wait_until(Duration::from_secs(30), "state.json", |job| {
        !job.state().is_null()
    });
    let coordinator = job.coordinator.as_mut().unwrap();
    signal(coordinator.id(), "-KILL");
    coordinator.wait().unwrap();

    edit_config(&job, "seed = 5", "seed = 6");
    job.start_coordinator();
    assert!(
        !job.wait_coordinator(Duration::from_secs(30)),
        "a changed config must be refused"
    );
    let log = job.coordinator_log();
    assert!(log.contains("the config changed under the job"), "{log}");

    edit_config(&job, "seed = 6", "seed = 5");
    let manifest = job.path().join("data/manifest.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&manifest)
        .unwrap();
    writeln!(
        file,
        r#"{{"id":7,"key":"images/new.bin","width":512,"height":512,"caption":"new"}}"#
    )
    .unwrap();
    job.start_coordinator();
    assert!(
        !job.wait_coordinator(Duration::from_secs(30)),
        "a changed manifest must be refused"
    );
    let log = job.coordinator_log();
    assert!(log.contains("the manifest changed under the job"), "{log}");
    // The refusals left the job's state as it was.
    assert_eq!(job.state()["finished"], false);
}

#[test]
fn losing_workers_below_min_workers_fails_the_job_after_the_join_timeout() {
    let spec = JobSpec {
        items: 400,
        min_workers: 2,
        max_workers: 2,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    edit_config(&job, "join_timeout_s = 60", "join_timeout_s = 2");
    job.start_coordinator();
    job.start_worker(0, 30);
    job.start_worker(1, 30);
    job.wait_until(Duration::from_secs(60), "a checkpoint", |job| {
        !job.state()["last_checkpoint"].is_null()
    });
    let killed_at = Instant::now();
    signal(job.workers[1].id(), "-KILL");
    job.workers[1].wait().unwrap();
    assert!(
        !job.wait_coordinator(Duration::from_secs(60)),
        "the job must fail below min_workers; log:\n{}",
        job.coordinator_log()
    );
    let failed_after = killed_at.elapsed();
    println!("below min_workers: the job failed {failed_after:?} after the kill (heartbeat timeout 2 s + join timeout 2 s)");
    let state = job.state();
    let failure = state["failure"].as_str().unwrap_or_default().to_string();
    // The survivor may or may not have re-joined within the 2 s (a loaded machine is slow).
    assert!(
        ["only 0 of", "only 1 of"]
            .iter()
            .any(|count| failure.starts_with(count))
            && failure.ends_with("of min_workers 2 joined within join_timeout_s 2"),
        "{state}"
    );
    assert!(failed_after < Duration::from_secs(30));
    // The survivor is told and exits rather than waiting forever.
    wait_exit(
        &mut job.workers[0],
        Duration::from_secs(30),
        "the surviving worker",
    );
}

#[test]
fn with_keep_serving_a_finished_coordinator_answers_status_until_sigterm() {
    let spec = JobSpec {
        items: 60,
        epochs: 1,
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator_with(&["--keep-serving"]);
    job.start_worker(0, 0);
    job.wait_until(Duration::from_secs(60), "the job to finish", |job| {
        job.state()["finished"] == true
    });
    wait_exit(&mut job.workers[0], Duration::from_secs(30), "the worker");
    // Well past the grace after which a coordinator without --keep-serving exits.
    std::thread::sleep(Duration::from_secs(3));
    let coordinator = job.coordinator.as_mut().unwrap();
    assert!(
        coordinator.try_wait().unwrap().is_none(),
        "the coordinator exited despite --keep-serving"
    );
    let address = job.address();
    let phase = runtime().block_on(async {
        let mut client = arbor_runtime::client::connect(&address, TOKEN, None).unwrap();
        client
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .phase
    });
    assert_eq!(phase, "finished");
    signal(job.coordinator.as_ref().unwrap().id(), "-TERM");
    assert!(job.wait_coordinator(Duration::from_secs(30)));
}

#[test]
fn a_requested_checkpoint_is_written_by_every_rank_at_the_batch_the_coordinator_chose() {
    let spec = JobSpec {
        items: 600,
        min_workers: 2,
        max_workers: 2,
        epochs: 1,
        // Only the epoch's end is scheduled: any other checkpoint is the requested one.
        checkpoint_every: 10_000,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    for rank in 0..2 {
        job.start_worker(rank, 40);
    }
    job.wait_until(Duration::from_secs(60), "training to start", |job| {
        job.ledger_lines(0).len() >= 8
    });
    let output = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["checkpoint", "--coordinator", &job.address()])
        .args(["--reason", "before maintenance", "--wait", "30", "--export"])
        .env("ARBOR_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        job.coordinator_log()
    );
    let batch: u64 = stdout
        .split("at batch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no batch in {stdout}"));
    // grad_accum 1 and a fresh job: the step is the batch.
    let path = format!("checkpoints/step-{batch}");
    assert!(
        stdout.contains(&format!("checkpoint complete: {path}")),
        "{stdout}"
    );
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job.run_dir().join(&path).join("coordinator.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["batch"], batch, "{record}");
    assert_eq!(record["world_size"], 2, "{record}");
    assert!(job.run_dir().join(&path).join("COMPLETE").exists());
    let log = job.coordinator_log();
    assert!(
        log.contains(&format!(
            "checkpoint with exports requested at batch {batch}"
        )) && log.contains("before maintenance"),
        "{log}"
    );
    // The ranks had not reached the batch when they were asked, and both wrote it.
    let ledger_at_request = 8;
    assert!(batch as usize > ledger_at_request / 2, "batch {batch}");
    assert!(
        !log.contains("passed the requested checkpoint"),
        "a rank missed the request: {log}"
    );
    // The dry run has nothing to export, but each rank is told to, right after the checkpoint.
    for rank in 0..2 {
        let worker_log = job.worker_log(rank);
        assert!(
            worker_log.contains("export requested")
                && worker_log.contains(&format!("step={batch}")),
            "{worker_log}"
        );
    }
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}",
        job.coordinator_log()
    );
    let state = job.state();
    assert_eq!(state["finished"], true);
    // The requested checkpoint fell before the epoch's end: it was not the scheduled one.
    let mut steps: Vec<u64> = std::fs::read_dir(job.run_dir().join("checkpoints"))
        .unwrap()
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort_unstable();
    assert_eq!(
        steps.len(),
        2,
        "the requested one and the epoch's end: {steps:?}"
    );
    assert_eq!(steps[0], batch);
    assert_nothing_twice_nothing_lost(&job, 0, 1, 8);
}

#[test]
fn a_checkpoint_request_without_a_running_group_is_refused_with_the_reason() {
    let spec = JobSpec {
        min_workers: 2,
        max_workers: 2,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let address = job.address();
    runtime().block_on(async {
        let client = client_when_up(&address).await;
        let refused = client
            .clone()
            .request_checkpoint(arbor_proto::v1::RequestCheckpointRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("no running group") && refused.message().contains("forming"),
            "{}",
            refused.message()
        );
    });
}

#[test]
fn a_shard_stream_cut_and_not_resumed_marks_the_worker_lost_even_while_it_heartbeats() {
    // Enough items that the coordinator is still streaming when the worker walks away.
    let job = one_worker_job(24_000, 2);
    let address = job.address();
    runtime().block_on(async {
        let (mut client, reply) = join_as_worker_w(&address).await;
        let heartbeats = {
            let mut client = client.clone();
            let generation = reply.generation;
            tokio::spawn(async move {
                loop {
                    let request = HeartbeatRequest {
                        worker_id: "w".into(),
                        generation,
                        rank: 0,
                        ..Default::default()
                    };
                    let _ = client.heartbeat(request).await;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        // A client with HTTP/2's smallest default window, so that the coordinator cannot push
        // the whole shard into its buffers before the stream is dropped.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap();
        let mut streaming_client =
            arbor_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
                channel,
                |mut request: tonic::Request<()>| {
                    let bearer = format!("Bearer {TOKEN}").parse().unwrap();
                    request.metadata_mut().insert("authorization", bearer);
                    Ok(request)
                },
            );
        let mut stream = streaming_client
            .shard(ShardRequest {
                worker_id: "w".into(),
                generation: reply.generation,
                rank: 0,
                epoch: 0,
                start_index: 0,
            })
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        let cut_at = Instant::now();
        drop(stream);
        let lost = loop {
            let status = client.status(StatusRequest {}).await.unwrap().into_inner();
            if let Some(event) = status
                .recent_events
                .iter()
                .find(|event| event.contains("lost"))
            {
                break event.clone();
            }
            assert!(
                cut_at.elapsed() < Duration::from_secs(15),
                "the cut stream was never noticed: {:?}\n{}",
                status.recent_events,
                job.coordinator_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let detection = cut_at.elapsed().as_secs_f64();
        heartbeats.abort();
        eprintln!("cut shard stream detected after {detection:.2}s (heartbeat timeout 2s)");
        assert!(
            lost.contains("shard stream was cut and not resumed"),
            "{lost}"
        );
        assert!(detection >= 1.5, "detected too early: {detection}s");
    });
}

#[test]
fn a_rank_that_passes_a_requested_checkpoint_gets_it_again_further_ahead_then_it_is_dropped() {
    let job = one_worker_job(2600, 2);
    let address = job.address();
    runtime().block_on(async {
        let (mut client, reply) = join_as_worker_w(&address).await;
        // 8 items/s at bsz 2 is 4 batches/s: two heartbeat intervals (0.25 s) are 2 batches.
        let heartbeat = |batches_done: u64| {
            let mut client = client.clone();
            let request = HeartbeatRequest {
                worker_id: "w".into(),
                generation: reply.generation,
                rank: 0,
                batches_done,
                items_per_second: 8.0,
                ..Default::default()
            };
            async move { client.heartbeat(request).await.unwrap().into_inner() }
        };
        heartbeat(10).await;
        let requested = client
            .clone()
            .request_checkpoint(arbor_proto::v1::RequestCheckpointRequest {
                reason: "test".into(),
                export: true,
            })
            .await
            .unwrap()
            .into_inner();
        // Ahead of batch 10 by 2 batches plus one.
        assert_eq!(requested.batch, 13);
        let checkpoint = arbor_proto::v1::Command::Checkpoint as i32;
        let command = heartbeat(11).await;
        assert_eq!(
            (command.command, command.checkpoint_batch),
            (checkpoint, 13)
        );
        assert!(command.export, "the request asked for exports");
        // Asking again while it is pending gives the same batch.
        let again = client
            .clone()
            .request_checkpoint(arbor_proto::v1::RequestCheckpointRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.batch, 13);
        // The rank passed batch 13 without writing it: asked again with twice the lead.
        let command = heartbeat(20).await;
        assert_eq!(
            (command.command, command.checkpoint_batch),
            (checkpoint, 25)
        );
        let command = heartbeat(30).await;
        assert_eq!(
            (command.command, command.checkpoint_batch),
            (checkpoint, 37)
        );
        // The third miss drops the request.
        let command = heartbeat(40).await;
        assert_eq!(command.command, arbor_proto::v1::Command::Continue as i32);
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.pending_checkpoint_batch, 0);
        let events = status.recent_events.join("\n");
        assert!(
            events.contains("rank 0 passed the requested checkpoint at batch 13 (it is at 20)")
                && events.contains("giving the request up"),
            "{events}"
        );
    });
}

#[test]
fn heartbeats_report_the_learning_rate_and_prompt_lengths_to_status_and_metrics() {
    let job = one_worker_job(JobSpec::default().items, JobSpec::default().bsz);
    let address = job.address();
    runtime().block_on(async {
        let (mut client, reply) = join_as_worker_w(&address).await;
        for counts in [vec![3, 1, 0, 0], vec![2, 0, 1, 1]] {
            client
                .heartbeat(HeartbeatRequest {
                    worker_id: "w".into(),
                    generation: reply.generation,
                    rank: 0,
                    learning_rate: 2.5e-4,
                    token_length_counts: counts,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        let worker = &status.workers[0];
        assert_eq!(worker.learning_rate, 2.5e-4);
        assert_eq!(worker.token_length_counts, [5, 1, 1, 1]);
    });
    assert_metrics_contain(
        job.metrics_port,
        &[
            "arbor_learning_rate 0.00025",
            "arbor_prompts_total{tokens=\"up_to_75\"} 5",
            "arbor_prompts_total{tokens=\"over_225\"} 1",
        ],
    );
}

#[test]
fn lying_requests_are_refused_by_field_counted_by_reason_and_a_persistent_liar_is_dropped() {
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 2,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    let address = job.address();
    runtime().block_on(async {
        let mut client = client_when_up(&address).await;
        let join = |port: u32, host: &str| JoinRequest {
            worker_id: "w0".into(),
            node: "n".into(),
            local_rank: 0,
            advertise_host: host.into(),
            store_port: port,
        };
        for (request, field) in [
            (join(70000, "127.0.0.1"), "join.store_port"),
            (join(0, "127.0.0.1"), "join.store_port"),
            (join(29500, "evil host:1"), "join.advertise_host"),
        ] {
            let status = client.join(request).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(field), "{}", status.message());
        }
        let reply = client
            .join(join(29500, "127.0.0.1"))
            .await
            .unwrap()
            .into_inner();
        let heartbeat = |batches_done: u64, rate: f64| HeartbeatRequest {
            worker_id: "w0".into(),
            generation: reply.generation,
            rank: 0,
            batches_done,
            items_per_second: rate,
            ..Default::default()
        };
        let status = client.heartbeat(heartbeat(0, f64::NAN)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("heartbeat.items_per_second"),
            "{}",
            status.message()
        );
        // A Shard request far in the future is refused at once, not after its deadline.
        let asked = Instant::now();
        let refused = client
            .shard(ShardRequest {
                worker_id: "w0".into(),
                generation: reply.generation,
                rank: 0,
                epoch: 1_000_000,
                start_index: 0,
            })
            .await;
        let Err(status) = refused else {
            panic!("a far-future epoch must be refused");
        };
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(
            status.message().starts_with("shard.epoch"),
            "{}",
            status.message()
        );
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
        // The third lie drops the worker: its next heartbeat is from a stranger.
        let status = client
            .heartbeat(heartbeat(u64::MAX, 1.0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(
            status.message().starts_with("heartbeat.batches_done"),
            "{}",
            status.message()
        );
        let status = client.heartbeat(heartbeat(0, 1.0)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        assert!(
            status
                .recent_events
                .iter()
                .any(|event| event.contains("worker w0 dropped after 3 refused requests")),
            "{:?}",
            status.recent_events
        );
    });
    assert_metrics_contain(
        job.metrics_port,
        &[
            "arbor_refused_requests_total{reason=\"malformed\"} 4",
            "arbor_refused_requests_total{reason=\"out_of_range\"} 2",
            "arbor_refused_requests_total{reason=\"worker_dropped\"} 1",
        ],
    );
}

#[test]
fn a_manifest_written_outside_its_image_folder_is_refused_before_the_job_starts() {
    let spec = JobSpec {
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    // `arbor index data/ --out elsewhere/manifest.jsonl`, and a job without data.root.
    std::fs::create_dir(job.path().join("elsewhere")).unwrap();
    std::fs::copy(
        job.path().join("data/manifest.jsonl"),
        job.path().join("elsewhere/manifest.jsonl"),
    )
    .unwrap();
    edit_config(
        &job,
        "manifest = \"data/manifest.jsonl\"",
        "manifest = \"elsewhere/manifest.jsonl\"",
    );
    job.start_coordinator();
    assert!(
        !job.wait_coordinator(Duration::from_secs(30)),
        "a job whose every image is missing must not run"
    );
    let log = job.coordinator_log();
    let root = job.path().join("elsewhere");
    assert!(
        log.contains(&format!("data.root {}: none of", root.display())),
        "{log}"
    );
    assert!(log.contains("images/00000.bin"), "{log}");
    // With data.root set, the same manifest runs.
    edit_config(
        &job,
        "manifest = \"elsewhere/manifest.jsonl\"",
        "manifest = \"elsewhere/manifest.jsonl\"\nroot = \"data\"",
    );
    job.start_coordinator();
    job.wait_until(Duration::from_secs(30), "the coordinator serving", |job| {
        job.coordinator_log().matches("coordinator serving").count() == 1
    });
}

/// The job config the coordinator sends a joining worker.
fn config_sent_to_a_worker(job: &Job) -> arbor_common::config::JobConfig {
    let address = job.address();
    let config_toml = runtime().block_on(async {
        let (_, reply) = join_as_worker_w(&address).await;
        reply.job_config_toml
    });
    arbor_common::config::JobConfig::load(&config_toml, &[]).unwrap()
}

#[test]
fn a_manifest_whose_header_names_the_image_folder_runs_from_anywhere() {
    let job = Job::new(&JobSpec {
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    });
    // What `arbor index data/ --out elsewhere/manifest.jsonl` writes: a header line first.
    std::fs::create_dir(job.path().join("elsewhere")).unwrap();
    let records = std::fs::read_to_string(job.path().join("data/manifest.jsonl")).unwrap();
    let header = arbor_common::manifest::ManifestHeader {
        image_root: job.path().join("data").display().to_string(),
    };
    std::fs::write(
        job.path().join("elsewhere/manifest.jsonl"),
        format!("{}\n{records}", header.to_line()),
    )
    .unwrap();
    edit_config(
        &job,
        "manifest = \"data/manifest.jsonl\"",
        "manifest = \"elsewhere/manifest.jsonl\"",
    );
    let mut job = job;
    job.start_coordinator();
    let config = config_sent_to_a_worker(&job);
    assert_eq!(
        config.data.root.as_deref().map(std::path::Path::new),
        Some(job.path().join("data").as_path()),
        "{}",
        job.coordinator_log()
    );
}

#[test]
fn workers_get_the_model_path_relative_to_the_job_file() {
    let mut job = Job::new(&JobSpec {
        min_workers: 1,
        max_workers: 1,
        ..JobSpec::default()
    });
    edit_config(&job, "[data]", "[model]\npath = \"models/sd15\"\n\n[data]");
    job.start_coordinator();
    let config = config_sent_to_a_worker(&job);
    assert_eq!(
        std::path::Path::new(&config.model.path),
        job.path().join("models/sd15")
    );
}
