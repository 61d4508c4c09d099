//! `arbor plan` end to end: the JSON shapes scripts rely on, and bad input.

use std::collections::HashSet;
use std::io::Write;

use assert_cmd::Command;
use serde_json::Value;

fn arbor() -> Command {
    Command::cargo_bin("arbor").unwrap()
}

fn write_manifest(lines: &[String]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    file
}

fn record(id: u64, width: u32, height: u32) -> String {
    format!(
        r#"{{"id":{id},"key":"img/{id}.png","width":{width},"height":{height},"caption":"tag"}}"#
    )
}

#[test]
fn buckets_json_is_the_default_table() {
    let output = arbor()
        .args(["plan", "buckets", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let value: Value = serde_json::from_slice(&output.stdout).unwrap();
    let buckets = value["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 19);
    assert_eq!(
        buckets[0],
        serde_json::json!({"id":0,"width":256,"height":1024,"aspect":0.25})
    );
    assert_eq!(buckets[8]["width"], 512);
    assert_eq!(buckets[8]["height"], 512);
    assert_eq!(
        buckets[18],
        serde_json::json!({"id":18,"width":1024,"height":256,"aspect":4.0})
    );
}

#[test]
fn buckets_refuses_invalid_parameters_with_the_field() {
    let output = arbor()
        .args(["plan", "buckets", "--min-dim", "2048"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("min_dim"), "{stderr}");
    let output = arbor()
        .args(["plan", "buckets", "--base-res", "100x512"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("base_res"));
}

#[test]
fn assign_prints_one_object_per_line_and_flags_malformed_lines() {
    let output = arbor()
        .args(["plan", "assign", "--json"])
        .write_stdin("1920 1080\n8192x1024\nnot a size\n1 1\n")
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a malformed line makes the exit status non-zero"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["bucket"], 13);
    assert_eq!(
        (
            lines[0]["bucket_width"].as_u64(),
            lines[0]["bucket_height"].as_u64()
        ),
        (Some(832), Some(448))
    );
    assert_eq!(lines[0]["kept"], true);
    assert_eq!(lines[1]["bucket"], 18);
    assert_eq!(lines[1]["ar_error"], 4.0);
    assert_eq!(lines[1]["kept"], false);
    assert_eq!(
        lines[2],
        serde_json::json!({"width":1,"height":1,"bucket":8,"bucket_width":512,"bucket_height":512,"ar_error":0.0,"kept":true})
    );

    let clean = arbor()
        .args(["plan", "assign", "--json", "--aspect-metric", "log"])
        .write_stdin("3580 1000\n")
        .output()
        .unwrap();
    assert!(clean.status.success());
    let value: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(value["bucket"], 18);
}

#[test]
fn epoch_summary_is_consistent_and_batches_partition_the_kept_items() {
    let mut lines: Vec<String> = (0..203u64)
        .map(|id| record(id * 5, 300 + (id as u32 % 9) * 150, 900))
        .collect();
    lines.push(record(9999, 8192, 1024)); // pruned panorama
    lines.push("{broken".to_string());
    let manifest = write_manifest(&lines);
    let output = arbor()
        .args(["plan", "epoch", "--manifest"])
        .arg(manifest.path())
        .args([
            "--bsz",
            "4",
            "--world-size",
            "3",
            "--seed",
            "7",
            "--epoch",
            "1",
            "--json",
            "--batches",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line=205"), "{stderr}");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["items"], 204);
    assert_eq!(summary["pruned"], 1);
    assert_eq!(summary["skipped_manifest_lines"], 1);
    assert_eq!(summary["kept_after_trim"], 192);
    assert_eq!(summary["trimmed"], 11);
    assert_eq!(summary["items_per_rank"], 64);
    assert_eq!(summary["batches_per_rank"], 16);
    let bucket_items: u64 = summary["bucket_items"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(bucket_items, 203);
    for rank in 0..3 {
        let bucket_batches: u64 = summary["bucket_batches_per_rank"][rank]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        let catchall = summary["catchall_batches_per_rank"][rank].as_u64().unwrap();
        assert_eq!(bucket_batches + catchall, 16);
        assert_eq!(
            summary["catchall_items_per_rank"][rank].as_u64().unwrap() % 4,
            0
        );
    }
    let mut seen = HashSet::new();
    let ranks = summary["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    for rank in ranks {
        let batches = rank["batches"].as_array().unwrap();
        assert_eq!(batches.len(), 16);
        for batch in batches {
            let items = batch["items"].as_array().unwrap();
            assert_eq!(items.len(), 4);
            if batch["bucket"] == "catchall" {
                assert_eq!(
                    (batch["width"].as_u64(), batch["height"].as_u64()),
                    (Some(512), Some(512))
                );
            }
            for item in items {
                let id = item.as_u64().unwrap();
                assert!(id % 5 == 0 && id != 9999, "unexpected id {id}");
                assert!(seen.insert(id), "item {id} planned twice");
            }
        }
    }
    assert_eq!(seen.len(), 192);
    // Without --grad-accum: one micro-batch per optimizer step.
    assert_eq!(summary["global_batch"], 12);
    assert_eq!(summary["steps_per_epoch"], 16);
}

#[test]
fn plan_epoch_prints_the_global_batch_steps_per_epoch_and_learning_rate() {
    let records: Vec<String> = (0..96).map(|id| record(id, 512, 512)).collect();
    let manifest = write_manifest(&records);
    let plan = |extra: &[&str]| {
        arbor()
            .args(["plan", "epoch", "--manifest"])
            .arg(manifest.path())
            .args(["--bsz", "4", "--world-size", "2", "--grad-accum", "5"])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = plan(&["--lr", "1e-4"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    // 96 items over 2 ranks of bsz 4: 12 batches per rank, windows of 5 → 3 steps.
    assert!(
        stdout.contains(
            "global batch 40 = 2 rank(s) x bsz 4 x grad_accum 5; 3 optimizer step(s) per epoch; \
             learning rate 1e-4 per optimizer step"
        ),
        "{stdout}"
    );
    let json: Value = serde_json::from_slice(&plan(&["--lr", "1e-4", "--json"]).stdout).unwrap();
    assert_eq!(
        (
            &json["global_batch"],
            &json["steps_per_epoch"],
            &json["learning_rate"]
        ),
        (&Value::from(40), &Value::from(3), &Value::from("1e-4"))
    );
    let refused = plan(&["--lr", "fast"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--lr"));
    let zero = arbor()
        .args(["plan", "epoch", "--manifest"])
        .arg(manifest.path())
        .args(["--bsz", "4", "--world-size", "2", "--grad-accum", "0"])
        .output()
        .unwrap();
    assert!(!zero.status.success());
}

#[test]
fn duplicate_ids_are_an_error_naming_the_id() {
    let manifest = write_manifest(&[
        record(1, 512, 512),
        record(2, 512, 512),
        record(1, 640, 512),
    ]);
    let output = arbor()
        .args(["plan", "epoch", "--manifest"])
        .arg(manifest.path())
        .args(["--bsz", "1", "--world-size", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("duplicate item id 1"), "{stderr}");
}

#[test]
fn zero_world_size_is_refused_not_a_panic() {
    let manifest = write_manifest(&[record(1, 512, 512)]);
    let output = arbor()
        .args(["plan", "epoch", "--manifest"])
        .arg(manifest.path())
        .args(["--bsz", "4", "--world-size", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("world_size"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn assign_reports_a_non_utf8_line_and_goes_on() {
    let mut input = b"512 512\r\n".to_vec();
    input.extend_from_slice(&[0xff, 0xfe, b' ', b'1', b'\n']);
    input.extend_from_slice(b"1920x1080\n");
    let output = arbor()
        .args(["plan", "assign", "--json"])
        .write_stdin(input)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2: not UTF-8"), "{stderr}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "the lines around the bad one are still assigned"
    );
    assert_eq!(lines[0]["bucket"], 8);
    assert_eq!(lines[1]["bucket"], 13);
}
