//! Child processes of a test: waiting with a limit, and signals.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The child's exit status once it exits within `limit`, else `None` (it keeps running).
pub fn try_wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `limit` for a child to exit; kills it and panics if it does not.
pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) {
    if try_wait_for(child, limit).is_none() {
        let _ = child.kill();
        panic!("{what} still running after {limit:?}");
    }
}

/// Sends `signal` (a `kill` flag such as `-STOP`) to process `pid`; panics when `kill` fails.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Polls `condition` every `poll` until it holds; after `limit` panics with what was awaited and
/// `diagnostics()` (logs, say).
pub fn wait_until(
    limit: Duration,
    poll: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
    diagnostics: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !condition() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", diagnostics());
        }
        std::thread::sleep(poll);
    }
}
