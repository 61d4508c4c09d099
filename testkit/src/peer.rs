//! Peer ranks for multi-process tests: the test process is rank 0 and re-runs its own test
//! executable as the other ranks, on a helper test that is `#[ignore]`d (a normal run lists it as
//! ignored, it tests nothing itself) and that [`Peer::spawn`] runs with `--ignored --exact`.
//! Peers report events as stdout lines that start with [`PEER_LINE`].
//!
//! ```ignore
//! #[test]
//! #[ignore = "peer helper: a multi-process test runs it as another rank"]
//! fn peer_entry() {
//!     arbor_testkit::peer::entry("MY_PEER_SCENARIO", run_peer);
//! }
//! // in a test:
//! let peer = Peer::spawn(&peer::test_name(module_path!(), "peer_entry"), &[("MY_PEER_SCENARIO", "x".into())])?;
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The prefix of a peer's event lines on its stdout.
pub const PEER_LINE: &str = "ARBOR_PEER ";

/// The libtest name of test function `function` in the module `module_path` (the caller's
/// `module_path!()`): the path without the crate's name, so `it::ddp_equivalence` gives
/// `ddp_equivalence::peer_entry` and a test crate's root gives `peer_entry`.
pub fn test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, module)) => format!("{module}::{function}"),
        None => function.to_string(),
    }
}

/// A child rank; killed on drop so a failing test leaves no process behind.
pub struct Peer {
    child: Child,
    lines: Receiver<String>,
}

impl Peer {
    /// Runs this test executable's ignored test `entry` (a full name, see [`test_name`]) with
    /// `env` in a child process.
    pub fn spawn(entry: &str, env: &[(&str, String)]) -> Result<Self> {
        let executable = std::env::current_exe().context("current test executable")?;
        let mut child = Command::new(executable)
            .args([
                entry,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn peer process")?;
        let stdout = child.stdout.take().context("peer stdout")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest prints "test peer_entry ... " without a newline before our first line.
                if let Some(start) = line.find(PEER_LINE) {
                    let event = &line[start + PEER_LINE.len()..];
                    if sender.send(event.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for an event that starts with `wanted`; fails on a `failed` event or the timeout.
    pub fn expect_event(&self, wanted: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .lines
                .recv_timeout(left)
                .with_context(|| format!("waiting {timeout:?} for peer event {wanted:?}"))?;
            if event.starts_with(wanted) {
                return Ok(event);
            }
            if event.starts_with("failed") {
                bail!("peer reported {event:?} while we waited for {wanted:?}");
            }
        }
    }

    /// Waits for the peer to exit successfully within `timeout`.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("peer exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("peer still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the peer and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("kill peer")?;
        self.child.wait().context("reap peer")?;
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reports `event` to the parent (a [`PEER_LINE`] line on stdout).
pub fn report(event: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{PEER_LINE}{event}");
    let _ = stdout.flush();
}

/// The body of a peer helper test: runs `run` on the scenario named by the variable
/// `scenario_variable`, reports `failed …` and panics when it fails. Without the variable (the
/// helper run by `--include-ignored`, not as a peer) it returns at once.
pub fn entry(scenario_variable: &str, run: impl FnOnce(&str) -> Result<()>) {
    let Ok(scenario) = std::env::var(scenario_variable) else {
        return;
    };
    if let Err(error) = run(&scenario) {
        report(&format!("failed {error:#}"));
        panic!("peer scenario {scenario} failed: {error:#}");
    }
}
