//! Token ids equal transformers' CLIPTokenizer (goldens from make_fixtures.py), from both
//! tokenizer file layouts, and `arbor-worker tokenize` prints them with the long-prompt framing.

use std::path::Path;

use crate::model_fixtures::fixtures_dir;
use arbor_worker::prompt::{PromptFraming, DEFAULT_MAX_CHUNKS};
use arbor_worker::tokenizer::ClipTokenizer;
use assert_cmd::Command;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct TokenGolden {
    name: String,
    text: String,
    ids: Vec<i64>,
    chunks: Vec<Vec<i64>>,
}

fn token_goldens() -> Vec<TokenGolden> {
    let path = fixtures_dir().join("tokens.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("tokens.json")).expect("parse")
}

fn assert_matches_transformers(tokenizer: &ClipTokenizer, layout: &str) {
    let goldens = token_goldens();
    let names: Vec<&str> = goldens.iter().map(|golden| golden.name.as_str()).collect();
    for required in [
        "tag_style",
        "unicode",
        "empty",
        "exactly_75",
        "exactly_76",
        "over_225",
    ] {
        assert!(
            names.contains(&required),
            "golden prompt {required} is missing"
        );
    }
    let framing = PromptFraming::for_tokenizer(tokenizer, DEFAULT_MAX_CHUNKS);
    for golden in &goldens {
        let ids = tokenizer.encode(&golden.text);
        assert_eq!(ids, golden.ids, "{layout}: ids of prompt {}", golden.name);
        let chunks = framing.frame(&ids, framing.chunk_count(ids.len()));
        assert_eq!(
            chunks, golden.chunks,
            "{layout}: chunks of prompt {}",
            golden.name
        );
    }
}

#[test]
fn tokenizer_json_gives_transformers_ids() {
    let tokenizer = ClipTokenizer::from_model_dir(&fixtures_dir().join("model")).expect("load");
    assert_eq!(tokenizer.vocab_size(), 49408);
    assert_eq!(
        (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
        (49406, 49407, 49407)
    );
    assert_matches_transformers(&tokenizer, "tokenizer.json");
}

#[test]
fn vocab_and_merges_give_transformers_ids() {
    let tokenizer =
        ClipTokenizer::from_tokenizer_dir(&fixtures_dir().join("tokenizer_src")).expect("load");
    assert_matches_transformers(&tokenizer, "vocab.json + merges.txt");
}

#[test]
fn golden_lengths_cover_the_chunk_boundaries() {
    let goldens = token_goldens();
    let length = |name: &str| {
        goldens
            .iter()
            .find(|g| g.name == name)
            .expect(name)
            .ids
            .len()
    };
    assert_eq!(length("empty"), 0);
    assert_eq!(length("exactly_75"), 75);
    assert_eq!(length("exactly_76"), 76);
    assert!(length("over_225") > 225);
    let chunks = |name: &str| {
        goldens
            .iter()
            .find(|g| g.name == name)
            .expect(name)
            .chunks
            .len()
    };
    assert_eq!(
        (chunks("empty"), chunks("exactly_75"), chunks("exactly_76")),
        (1, 1, 2)
    );
    assert_eq!(chunks("over_225"), 3);
}

#[test]
fn a_folder_without_tokenizer_files_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = ClipTokenizer::from_model_dir(dir.path()).expect_err("no tokenizer");
    let message = error.to_string();
    assert!(message.contains("tokenizer.json"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

fn tokenize_command(model: &Path) -> Command {
    let mut command = Command::cargo_bin("arbor-worker").expect("binary");
    command.arg("tokenize").arg("--model").arg(model);
    command
}

#[test]
fn tokenize_command_prints_ids_and_chunks_per_prompt() {
    let goldens = token_goldens();
    let stdin: String = goldens
        .iter()
        .map(|golden| golden.text.replace('\n', " ") + "\n")
        .collect();
    let output = tokenize_command(&fixtures_dir().join("model"))
        .arg("--json")
        .write_stdin(stdin)
        .output()
        .expect("run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(lines.len(), goldens.len());
    let tokenizer = ClipTokenizer::from_model_dir(&fixtures_dir().join("model")).expect("load");
    for (line, golden) in lines.iter().zip(&goldens) {
        // the command reads one prompt per line, so compare with the prompt as a line
        let ids = tokenizer.encode(&golden.text.replace('\n', " "));
        assert_eq!(line["tokens"], ids.len(), "{}", golden.name);
        assert_eq!(line["ids"], serde_json::json!(ids), "{}", golden.name);
        if !golden.text.contains('\n') {
            assert_eq!(
                line["chunks"],
                serde_json::json!(golden.chunks),
                "{}",
                golden.name
            );
        }
    }
}

#[test]
fn tokenize_command_respects_max_chunks_and_reports_bad_utf8() {
    let goldens = token_goldens();
    let long = goldens
        .iter()
        .find(|g| g.name == "over_225")
        .expect("over_225");
    let output = tokenize_command(&fixtures_dir().join("model"))
        .args(["--json", "--max-chunks", "1"])
        .write_stdin(format!("{}\n", long.text))
        .output()
        .expect("run");
    assert!(output.status.success());
    let line: serde_json::Value =
        serde_json::from_slice(output.stdout.split(|&b| b == b'\n').next().unwrap()).expect("json");
    assert_eq!(line["chunks"].as_array().expect("chunks").len(), 1);
    assert_eq!(line["tokens"], long.ids.len());

    let mut bad = b"1girl, solo\n".to_vec();
    bad.extend_from_slice(&[0xff, 0xfe, b'\n']);
    bad.extend_from_slice(b"red dress\n");
    let output = tokenize_command(&fixtures_dir().join("model"))
        .arg("--json")
        .write_stdin(bad)
        .output()
        .expect("run");
    assert!(!output.status.success(), "a bad line fails the command");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).lines().count(),
        2,
        "good lines still print"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("not valid UTF-8"));
}

#[test]
fn tokenize_command_without_json_prints_a_summary_line_per_prompt() {
    let output = tokenize_command(&fixtures_dir().join("model"))
        .write_stdin("1girl, solo\n\n")
        .output()
        .expect("run");
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("4 tokens, 1 chunk(s): ["), "{stdout}");
    assert!(lines[1].starts_with("0 tokens, 1 chunk(s): []"), "{stdout}");
}
