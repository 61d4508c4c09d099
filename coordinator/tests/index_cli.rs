//! `arbor index` end to end on the odd-file corpus (bench/loader/make_corpus.py, run with the
//! project's virtualenv from scripts/setup.sh): exit status, summary line, manifest and report.

use arbor_testkit::make_odd_corpus;
use assert_cmd::Command;
use serde_json::Value;

#[test]
fn index_writes_the_manifest_and_reports_every_skip() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let out = tempfile::tempdir().unwrap();
    let manifest = out.path().join("manifest.jsonl");
    let report = out.path().join("report.json");
    let output = Command::cargo_bin("arbor")
        .unwrap()
        .arg("index")
        .arg(corpus.path())
        .arg("--out")
        .arg(&manifest)
        .arg("--report")
        .arg(&report)
        .args(["--concurrency", "4"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains(
            "27 images found, 21 written to"
        ) && stdout.trim_end().ends_with(
            "6 skipped (1 zero_bytes, 1 not_an_image, 1 corrupt_header, 1 too_many_pixels, 1 caption_not_utf8, 1 missing_caption)"
        ),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines = text.lines();
    // Written outside the image folder: the header names it, so the manifest can live anywhere.
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        header["image_root"].as_str().map(std::path::Path::new),
        Some(corpus.path().canonicalize().unwrap().as_path())
    );
    let records: Vec<Value> = lines
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 21);
    let rotated = records
        .iter()
        .find(|record| record["key"] == "orientation/o6.jpg")
        .unwrap();
    assert_eq!(
        (rotated["width"].as_u64(), rotated["height"].as_u64()),
        (Some(64), Some(32))
    );
    let crlf = records
        .iter()
        .find(|record| record["key"] == "bom_crlf.png")
        .unwrap();
    assert_eq!(crlf["caption"], "1girl, red dress\nsmiling");
    // The manifest is readable by arbor-common.
    let parsed = arbor_common::manifest::read_manifest(text.as_bytes()).unwrap();
    assert_eq!(parsed.records.len(), 21);
    assert_eq!(
        parsed.image_root.as_deref(),
        header["image_root"].as_str(),
        "arbor-common reads the header"
    );
    assert!(parsed.skipped_lines.is_empty());

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["written"], 21);
    assert_eq!(report["skipped_count"], 6);
    assert_eq!(report["counts_by_reason"]["too_many_pixels"], 1);
    let skipped: Vec<(String, String)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|file| {
            (
                file["key"].as_str().unwrap().to_owned(),
                file["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("bad_caption.png", "caption_not_utf8"),
        ("bomb.png", "too_many_pixels"),
        ("no_caption.png", "missing_caption"),
        ("not_image.jpg", "not_an_image"),
        ("truncated_header.png", "corrupt_header"),
        ("zero.png", "zero_bytes"),
    ]
    .iter()
    .map(|(key, reason)| (key.to_string(), reason.to_string()))
    .collect();
    assert_eq!(skipped, expected);

    // Re-indexing gives identical bytes (stable ids, stable order).
    let again = out.path().join("again.jsonl");
    Command::cargo_bin("arbor")
        .unwrap()
        .arg("index")
        .arg(corpus.path())
        .arg("--out")
        .arg(&again)
        .assert()
        .success();
    assert_eq!(std::fs::read(&again).unwrap(), text.as_bytes());
}

#[test]
fn index_of_a_missing_folder_fails_with_the_location() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::cargo_bin("arbor")
        .unwrap()
        .args(["index", "/nonexistent/dataset", "--out"])
        .arg(out.path().join("m.jsonl"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid dataset location `/nonexistent/dataset`"),
        "{stderr}"
    );
}

/// `arbor index SRC --out MANIFEST`, which must succeed.
fn index(src: &std::path::Path, manifest: &std::path::Path) {
    Command::cargo_bin("arbor")
        .unwrap()
        .arg("index")
        .arg(src)
        .arg("--out")
        .arg(manifest)
        .assert()
        .success();
}

#[test]
fn a_manifest_in_its_image_folder_has_no_header() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let manifest = corpus.path().join("manifest.jsonl");
    index(corpus.path(), &manifest);
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        text.lines().all(|line| line.starts_with("{\"id\":")),
        "the folder and its manifest move together: {}",
        text.lines().next().unwrap_or_default()
    );
}

#[test]
fn preview_renders_the_first_batches_of_a_rank() {
    // Indexed into another folder: preview finds the images through the manifest's header.
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let manifest = elsewhere.path().join("manifest.jsonl");
    index(corpus.path(), &manifest);
    let out = tempfile::tempdir().unwrap();
    let grid = out.path().join("grid.png");
    let output = Command::cargo_bin("arbor")
        .unwrap()
        .args(["preview", "--manifest"])
        .arg(&manifest)
        .args([
            "--bsz",
            "2",
            "--world-size",
            "2",
            "--rank",
            "1",
            "--epoch",
            "3",
            "--batches",
            "3",
            "--cell",
            "64",
            "--out",
        ])
        .arg(&grid)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    // truncated_body.png is indexed (intact header) and may be drawn: it fails to load and its
    // slot repeats the other item, so 0 or 1 failures are both valid outcomes here.
    assert!(
        stdout.contains("rank 1 epoch 3, 3 batches of 2 (140x250 pixels)"),
        "{stdout}"
    );
    let failed: usize = stdout
        .trim_end()
        .strip_suffix(" failed items")
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in {stdout}"));
    assert!(failed <= 1, "the images were not found: {stdout}");
    let png = std::fs::read(&grid).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    // 4 + 2 * (64 + 4) wide; 4 + 3 * (64 + 14 + 4) high.
    assert_eq!((width, height), (140, 250));
}
