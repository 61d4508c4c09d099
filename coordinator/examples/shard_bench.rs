//! Shard streaming benchmark (issue 6): a real `arbor coordinator` process over a generated
//! manifest of N items, one rank joining, and its whole shard streamed over loopback gRPC.
//! Prints time to the first item, items/s, and the coordinator's resident memory per item.
//!
//! `cargo run --release -p arbor-coordinator --example shard_bench -- 1e7`
//! (build `arbor` in release first: `cargo build --release -p arbor-coordinator`).

use std::io::{BufWriter, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arbor_proto::v1::{JoinRequest, ShardRequest, StatusRequest};

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() -> anyhow::Result<()> {
    let items: u64 = std::env::args()
        .nth(1)
        .map(|text| text.parse::<f64>().expect("ITEMS is a number such as 1e7") as u64)
        .unwrap_or(1_000_000);
    let directory = tempfile::tempdir()?;
    let started = Instant::now();
    {
        let mut manifest = BufWriter::new(std::fs::File::create(
            directory.path().join("manifest.jsonl"),
        )?);
        for id in 0..items {
            let (width, height) =
                [(512, 768), (768, 512), (512, 512), (1920, 1080)][(id % 4) as usize];
            writeln!(
                manifest,
                r#"{{"id":{id},"key":"shards/{:04}/{id:010}.jpg","width":{width},"height":{height},"caption":"1girl, solo, long hair, red dress, smile, outdoors, tag{}"}}"#,
                id % 1000,
                id % 97
            )?;
        }
    }
    eprintln!(
        "manifest of {items} items written in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        directory.path().join("job.toml"),
        format!(
            "[job]\nname = \"bench\"\nrun_dir = \"run\"\n[data]\nmanifest = \"manifest.jsonl\"\n[schedule]\nbsz = 4\nepochs = 1\n[cluster]\nlisten = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nmin_workers = 1\nmax_workers = 1\n"
        ),
    )?;
    let arbor = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|release| release.join("arbor"))
        .expect("target directory");
    let mut coordinator = Command::new(&arbor)
        .args(["coordinator", "--config"])
        .arg(directory.path().join("job.toml"))
        .env("ARBOR_TOKEN", "bench")
        .env("ARBOR_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let load_started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut client =
            arbor_runtime::client::connect(&format!("127.0.0.1:{port}"), "bench", None)?;
        while client.status(StatusRequest {}).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let load_seconds = load_started.elapsed().as_secs_f64();
        let rss = rss_bytes(coordinator.id());
        let reply = client
            .join(JoinRequest {
                worker_id: "bench".into(),
                node: "n".into(),
                local_rank: 0,
                advertise_host: "127.0.0.1".into(),
                store_port: 1,
            })
            .await?
            .into_inner();
        let request = ShardRequest {
            worker_id: "bench".into(),
            generation: reply.generation,
            rank: 0,
            epoch: 0,
            start_index: 0,
        };
        let stream_started = Instant::now();
        let mut stream = client.shard(request).await?.into_inner();
        let mut received = 0u64;
        let mut first_item = None;
        while let Some(chunk) = stream.message().await? {
            first_item.get_or_insert_with(|| stream_started.elapsed().as_secs_f64());
            received += chunk.items.len() as u64;
        }
        let stream_seconds = stream_started.elapsed().as_secs_f64();
        let peak_rss = rss_bytes(coordinator.id()).max(rss);
        anyhow::Ok((
            load_seconds,
            rss,
            peak_rss,
            first_item.unwrap_or(0.0),
            received,
            stream_seconds,
        ))
    });
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    let (load_seconds, rss, peak_rss, first_item, received, stream_seconds) = result?;
    println!(
        "{{\"items\":{items},\"manifest_load_seconds\":{load_seconds:.2},\"coordinator_rss_bytes_per_item\":{:.1},\"rss_after_stream_bytes_per_item\":{:.1},\"time_to_first_item_ms\":{:.1},\"streamed_items\":{received},\"items_per_second\":{:.0}}}",
        rss as f64 / items as f64,
        peak_rss as f64 / items as f64,
        first_item * 1000.0,
        received as f64 / stream_seconds
    );
    Ok(())
}
