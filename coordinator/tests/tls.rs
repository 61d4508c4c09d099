//! The coordinator over TLS (`cluster.tls_cert` / `cluster.tls_key`, rustls): a worker and
//! `arbor status` that trust the CA get through; clients that do not trust it, or that speak
//! plain text to the TLS port, are refused.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Job, JobSpec, TOKEN};

fn status(job: &Job, address: &str, with_ca: bool) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_arbor"));
    command
        .args(["status", "--json", "--coordinator", address])
        .env("ARBOR_TOKEN", TOKEN);
    if with_ca {
        command.arg("--tls-ca").arg(job.tls_ca());
    }
    command.output().unwrap()
}

#[test]
fn a_tls_coordinator_serves_clients_that_trust_its_ca_and_refuses_the_rest() {
    let mut job = Job::new(&JobSpec {
        items: 40,
        epochs: 1,
        min_workers: 1,
        max_workers: 1,
        real_images: true,
        tls: true,
        ..JobSpec::default()
    });
    job.start_coordinator();
    let address = job.address();
    assert!(address.starts_with("https://"), "{address}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let trusted = loop {
        let output = status(&job, &address, true);
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        trusted.status.success(),
        "status with the CA: {}\n{}",
        String::from_utf8_lossy(&trusted.stderr),
        job.coordinator_log()
    );
    let reply: serde_json::Value = serde_json::from_slice(&trusted.stdout).unwrap();
    assert!(reply.get("generation").is_some(), "{reply}");

    let untrusted = status(&job, &address, false);
    assert!(
        !untrusted.status.success(),
        "a client without the CA must not get through"
    );
    let plain_address = address.replace("https://", "http://");
    let plain = status(&job, &plain_address, false);
    assert!(
        !plain.status.success(),
        "plain text to the TLS port must not get through"
    );

    job.start_worker(0, 0);
    assert!(
        job.wait_coordinator(Duration::from_secs(90)),
        "{}\n{}",
        job.coordinator_log(),
        job.worker_log(0)
    );
    let state = job.state();
    assert_eq!(state["finished"], true, "{state}");
    let trained = job.trained_items(0);
    // 40 items, a multiple of bsz 4 on one rank: nothing pruned or trimmed.
    assert_eq!(trained.len(), 40, "every kept item trained over TLS");
    assert!(trained.values().all(|&count| count == 1), "{trained:?}");
}
