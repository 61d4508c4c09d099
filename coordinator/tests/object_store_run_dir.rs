//! A whole dry-run job with its manifest, its images and its run directory in S3: a moto
//! server from PyPI (`moto[server]`, installed by scripts/setup.sh) on loopback, with the
//! credentials and endpoint in the usual `AWS_*` environment variables. The state, job.toml,
//! checkpoint markers and ledgers land in the bucket, and a restarted coordinator resumes the
//! finished job from there instead of starting over.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arbor_data::store::DatasetStore;
use arbor_testkit::ledger::{parse_ledger, trained_items};
use arbor_testkit::moto::MotoServer;
use object_store::PutPayload;
use support::{Job, JobSpec};

const BUCKET: &str = "arbor-runs";

/// Object-store calls with the job's environment applied as store options.
struct Bucket {
    store: DatasetStore,
    runtime: tokio::runtime::Runtime,
}

impl Bucket {
    fn open(server: &MotoServer, prefix: &str) -> Self {
        let store =
            DatasetStore::open_with_options(&format!("s3://{BUCKET}/{prefix}"), server.options())
                .unwrap();
        let runtime = arbor_testkit::runtime();
        Self { store, runtime }
    }

    fn upload_folder(&self, folder: &Path) {
        let mut pending = vec![folder.to_path_buf()];
        while let Some(directory) = pending.pop() {
            for entry in std::fs::read_dir(&directory).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                let key = path.strip_prefix(folder).unwrap().to_str().unwrap();
                let payload = PutPayload::from(std::fs::read(&path).unwrap());
                self.runtime
                    .block_on(
                        self.store
                            .object_store()
                            .put(&self.store.object_path(key), payload),
                    )
                    .unwrap();
            }
        }
    }

    fn text(&self, key: &str) -> Option<String> {
        let bytes = self.runtime.block_on(self.store.get(key)).ok()?;
        Some(String::from_utf8(bytes.to_vec()).unwrap())
    }
}

#[test]
fn a_job_runs_with_its_manifest_images_and_run_directory_in_s3() {
    let server = MotoServer::start();
    server.create_bucket(BUCKET);
    let mut job = Job::new(&JobSpec {
        items: 60,
        epochs: 2,
        min_workers: 2,
        max_workers: 2,
        checkpoint_every: 3,
        real_images: true,
        ..JobSpec::default()
    });
    job.env = server.environment();
    Bucket::open(&server, "data").upload_folder(&job.path().join("data"));
    std::fs::remove_dir_all(job.path().join("data")).unwrap();
    let config_path = job.path().join("job.toml");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace(
            "manifest = \"data/manifest.jsonl\"",
            &format!("manifest = \"s3://{BUCKET}/data/manifest.jsonl\""),
        )
        .replace(
            "run_dir = \"run\"",
            &format!("run_dir = \"s3://{BUCKET}/runs/test\""),
        );
    std::fs::write(&config_path, config).unwrap();

    job.start_coordinator();
    job.start_worker(0, 0);
    job.start_worker(1, 0);
    assert!(
        job.wait_coordinator(Duration::from_secs(120)),
        "{}\n{}",
        job.coordinator_log(),
        job.worker_log(0)
    );
    assert!(!job.run_dir().exists(), "nothing is written locally");

    let run = Bucket::open(&server, "runs/test");
    let state: serde_json::Value = serde_json::from_str(&run.text("state.json").unwrap()).unwrap();
    assert_eq!(state["finished"], true, "{state}");
    assert_eq!(state["epoch"], 2);
    let checkpoint = state["last_checkpoint"]["path"].as_str().unwrap();
    assert!(run.text(&format!("{checkpoint}/COMPLETE")).is_some());
    assert!(run.text("job.toml").unwrap().contains("[schedule]"));
    // 60 items, one pruned panorama: 59 kept, trimmed to 56 for 2 ranks × bsz 4.
    for epoch in 0..2 {
        let lines = parse_ledger(&run.text(&format!("ledger/epoch-{epoch}.jsonl")).unwrap());
        let trained = trained_items(&lines);
        assert_eq!(trained.len(), 56, "epoch {epoch}");
        assert!(trained.values().all(|&count| count == 1), "epoch {epoch}");
    }
    for rank in 0..2 {
        let log = job.worker_log(rank);
        let finished = log
            .lines()
            .find(|line| line.contains("dry run finished"))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(
            finished.contains("failed=0"),
            "images load from S3: {finished}"
        );
    }

    // A restarted coordinator reads the finished state back from the bucket.
    job.start_coordinator();
    assert!(job.wait_coordinator(Duration::from_secs(30)));
    assert!(
        job.coordinator_log().contains("resuming job state"),
        "{}",
        job.coordinator_log()
    );
}

/// Runs `arbor` with the server's environment; returns (success, stdout, stderr).
fn arbor_with(server: &MotoServer, arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(arguments)
        .envs(server.environment())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn index_plan_and_preview_read_and_write_object_store_urls() {
    let server = MotoServer::start();
    server.create_bucket(BUCKET);
    let folder = tempfile::tempdir().unwrap();
    for index in 0..12u32 {
        let (width, height) = (64 + index * 8, 96 - index * 3);
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, index as u8 * 20])
        });
        image
            .save(folder.path().join(format!("{index:02}.png")))
            .unwrap();
        std::fs::write(
            folder.path().join(format!("{index:02}.txt")),
            format!("tag{index}, s3"),
        )
        .unwrap();
    }
    // One file that is not an image: skipped and reported, in the bucket.
    std::fs::write(folder.path().join("broken.jpg"), b"not a jpeg").unwrap();
    Bucket::open(&server, "dataset").upload_folder(folder.path());

    let manifest = format!("s3://{BUCKET}/dataset/manifest.jsonl");
    let report = format!("s3://{BUCKET}/reports/index.json");
    let source = format!("s3://{BUCKET}/dataset");
    let (ok, stdout, stderr) = arbor_with(
        &server,
        &["index", &source, "--out", &manifest, "--report", &report],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("12 written to {manifest}")),
        "{stdout}"
    );

    let bucket = Bucket::open(&server, "");
    let lines: Vec<serde_json::Value> = bucket
        .text("dataset/manifest.jsonl")
        .expect("the manifest is in the bucket")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    assert!(lines.iter().any(|line| line["caption"] == "tag3, s3"));
    let report: serde_json::Value =
        serde_json::from_str(&bucket.text("reports/index.json").unwrap()).unwrap();
    assert_eq!(report["skipped_count"], 1, "{report}");
    assert_eq!(report["skipped"][0]["key"], "broken.jpg", "{report}");

    let (ok, stdout, stderr) = arbor_with(
        &server,
        &[
            "plan",
            "epoch",
            "--manifest",
            &manifest,
            "--bsz",
            "2",
            "--world-size",
            "2",
            "--json",
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["items"], 12, "{plan}");

    // The preview's images come from the manifest's prefix in the bucket.
    let grid = folder.path().join("grid.png");
    let (ok, stdout, stderr) = arbor_with(
        &server,
        &[
            "preview",
            "--manifest",
            &manifest,
            "--bsz",
            "2",
            "--world-size",
            "1",
            "--batches",
            "2",
            "--cell",
            "32",
            "--out",
            grid.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("0 failed"), "{stdout}");
    assert_eq!(&std::fs::read(&grid).unwrap()[..4], b"\x89PNG");
}
