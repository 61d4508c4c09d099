//! The `arbor` binary's log output as collectors and terminals see it (common/src/logging.rs):
//! plain text when stderr is piped, colour only on a terminal without `NO_COLOR`, one JSON object
//! per line with `--log-format json` or `ARBOR_LOG_FORMAT=json`, children of `--nproc` logging
//! as their parent does. The worker runs `--dry-run` against a port where no coordinator
//! listens, so it logs a retry and fails after a second.

use std::process::{Command, Output};

const ANSI_ESCAPE: &str = "\u{1b}[";

/// `arbor worker --dry-run` failing to reach a coordinator, with `nproc` local ranks.
fn unreachable_worker(nproc: u32) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_arbor"));
    command
        .args(["worker", "--dry-run", "--coordinator", "127.0.0.1:1"])
        .args(["--connect-timeout-s", "1", "--nproc", &nproc.to_string()])
        .env("ARBOR_TOKEN", "log-output-test")
        .env("ARBOR_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("ARBOR_LOG_COLOR")
        .env_remove("ARBOR_LOG_FORMAT");
    command
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `command` under a pseudo-terminal (util-linux `script`): what a user at a terminal sees.
fn on_a_terminal(command: &Command) -> String {
    let mut line = format!("{:?}", command.get_program());
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&format!("{arg:?}"));
    }
    let mut script = Command::new("script");
    script.args(["-qec", &line, "/dev/null"]);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    let output = script
        .output()
        .expect("util-linux `script` runs the command under a pseudo-terminal");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn piped_logs_are_plain_text_from_the_parent_and_its_children() {
    let output = unreachable_worker(2).output().unwrap();
    let text = stderr_of(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("coordinator unreachable"), "{text}");
    for local_rank in 0..2 {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("[local {local_rank}] "))
                    && line.contains("WARN")),
            "{text}"
        );
    }
    assert!(text.contains("error: 2 of 2 local ranks failed"), "{text}");
    assert!(!text.contains(ANSI_ESCAPE), "{text:?}");
}

#[test]
fn colour_appears_on_a_terminal_unless_no_color_is_set_and_can_be_forced() {
    let mut command = unreachable_worker(1);
    let coloured = on_a_terminal(&command);
    assert!(coloured.contains("coordinator unreachable"), "{coloured}");
    assert!(coloured.contains(ANSI_ESCAPE), "{coloured:?}");

    command.env("NO_COLOR", "1");
    let plain = on_a_terminal(&command);
    assert!(plain.contains("coordinator unreachable"), "{plain}");
    assert!(!plain.contains(ANSI_ESCAPE), "{plain:?}");

    // Forced on through a pipe, for the parent and for its children.
    let forced = unreachable_worker(2)
        .env("ARBOR_LOG_COLOR", "always")
        .output()
        .unwrap();
    let text = stderr_of(&forced);
    assert!(
        text.lines()
            .any(|line| line.starts_with("[local 1] ") && line.contains(ANSI_ESCAPE)),
        "{text:?}"
    );
}

/// Every line of `text` as a JSON object; panics naming the first line that is not one.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}\n{text}"));
            assert!(
                value["level"].is_string() && value["fields"].is_object(),
                "no level or fields: {line}"
            );
            value
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line_by_flag_or_variable() {
    let by_flag = unreachable_worker(1)
        .args(["--log-format", "json"])
        .output()
        .unwrap();
    let records = json_lines(&stderr_of(&by_flag));
    assert!(records.iter().any(|record| record["level"] == "WARN"
        && record["fields"]["message"] == "coordinator unreachable; retrying"));
    // The command's error is a record too.
    assert!(records.iter().any(
        |record| record["level"] == "ERROR" && record["fields"]["message"] == "command failed"
    ));

    // The variable, inherited by the children: their records name the process.
    let by_variable = unreachable_worker(2)
        .env("ARBOR_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let records = json_lines(&stderr_of(&by_variable));
    for local_rank in 0..2 {
        let process = format!("local {local_rank}");
        assert!(
            records
                .iter()
                .any(|record| record["process"] == process.as_str()
                    && record["fields"]["message"] == "coordinator unreachable; retrying"),
            "no record of {process}: {records:?}"
        );
    }
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_known_ones() {
    let by_flag = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["plan", "buckets", "--log-format", "yaml"])
        .env_remove("ARBOR_LOG_FORMAT")
        .output()
        .unwrap();
    let by_variable = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["plan", "buckets"])
        .env("ARBOR_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    for output in [by_flag, by_variable] {
        let text = stderr_of(&output);
        assert_eq!(output.status.code(), Some(2), "{text}");
        assert!(
            text.contains("invalid log format `yaml`: expected `text` or `json`"),
            "{text}"
        );
    }
    let bad_colour = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["plan", "buckets"])
        .env("ARBOR_LOG_COLOR", "sometimes")
        .output()
        .unwrap();
    let text = stderr_of(&bad_colour);
    assert_eq!(bad_colour.status.code(), Some(2), "{text}");
    assert!(
        text.contains("invalid ARBOR_LOG_COLOR `sometimes`"),
        "{text}"
    );
}
