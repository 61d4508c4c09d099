//! Regroup by process restart: the worker replaces itself (`execve` of the same binary with the
//! same arguments) and joins again under the same worker id, so the coordinator sees a re-join of
//! a known worker, and the new process loads the last complete checkpoint as any joining worker
//! does.
//!
//! Why: an NCCL communicator whose peer died cannot be relied on to abort cleanly inside the
//! process (PyTorch's elastic agents restart the process too), whereas Gloo re-forms in-process
//! under a new store prefix. The runtime restarts when the trainer says it cannot regroup
//! in-process ([`crate::trainer::Trainer::regroups_in_process`]) or when `--restart-on-regroup`
//! forces it.
//!
//! `exec` keeps the process id, the standard streams (so a launcher's log pipes keep flowing)
//! and the environment; every other descriptor is closed, so the old process's collective store
//! socket does not outlive it and the new one can listen on the same port.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::error::RuntimeError;

/// The environment variable that carries the worker id across a restart.
pub const WORKER_ID_ENV: &str = "ARBOR_WORKER_ID";
/// The environment variable that counts this worker's restarts.
pub const RESTARTS_ENV: &str = "ARBOR_WORKER_RESTARTS";

/// The worker id a restarted process inherits, if this process is one.
pub fn inherited_worker_id() -> Option<String> {
    std::env::var(WORKER_ID_ENV)
        .ok()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// How many times this worker has restarted itself (0 for a fresh process).
pub fn restart_count() -> u32 {
    std::env::var(RESTARTS_ENV)
        .ok()
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// A restart the runtime asked for: re-run this binary as worker `worker_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRestart {
    pub worker_id: String,
}

impl ProcessRestart {
    /// The command that replaces this process: the same binary and arguments, with the worker
    /// id and the incremented restart count in the environment.
    pub fn command(&self) -> Result<Command, RuntimeError> {
        let program = std::env::current_exe().map_err(|error| RuntimeError::Restart {
            program: "the current executable".to_string(),
            message: error.to_string(),
        })?;
        let arguments: Vec<OsString> = std::env::args_os().skip(1).collect();
        Ok(self.command_for(program, arguments))
    }

    fn command_for(&self, program: PathBuf, arguments: Vec<OsString>) -> Command {
        let mut command = Command::new(program);
        command
            .args(arguments)
            .env(WORKER_ID_ENV, &self.worker_id)
            .env(RESTARTS_ENV, (restart_count() + 1).to_string());
        command
    }

    /// Replaces this process. Returns only when the replacement could not be started; nothing
    /// of this process (its collectives included) is torn down first.
    pub fn exec(self) -> RuntimeError {
        let mut command = match self.command() {
            Ok(command) => command,
            Err(error) => return error,
        };
        close_descriptors_on_exec();
        let program = format!("{:?}", command.get_program());
        let error = command.exec();
        RuntimeError::Restart {
            program,
            message: error.to_string(),
        }
    }
}

/// Marks every open descriptor above the standard streams close-on-exec (libtorch's store and
/// collective sockets are not all opened with it).
fn close_descriptors_on_exec() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let descriptors: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&descriptor| descriptor > 2)
        .collect();
    for descriptor in descriptors {
        // SAFETY: fcntl on a descriptor number only changes its flags; a number that has been
        // closed meanwhile (the directory's own) fails harmlessly with EBADF.
        unsafe {
            let flags = libc::fcntl(descriptor, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(descriptor, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restart_command_keeps_the_arguments_and_carries_the_worker_id() {
        let restart = ProcessRestart {
            worker_id: "node-a-1-4242-beef".to_string(),
        };
        let command = restart.command_for(
            PathBuf::from("/opt/arbor/arbor-worker"),
            vec!["train".into(), "--coordinator".into(), "c:1".into()],
        );
        assert_eq!(command.get_program(), "/opt/arbor/arbor-worker");
        let arguments: Vec<_> = command.get_args().collect();
        assert_eq!(arguments, ["train", "--coordinator", "c:1"]);
        let environment: Vec<_> = command.get_envs().collect();
        assert!(environment.contains(&(
            std::ffi::OsStr::new(WORKER_ID_ENV),
            Some(std::ffi::OsStr::new("node-a-1-4242-beef"))
        )));
        let expected_count = (restart_count() + 1).to_string();
        assert!(environment.contains(&(
            std::ffi::OsStr::new(RESTARTS_ENV),
            Some(std::ffi::OsStr::new(expected_count.as_str()))
        )));
    }
}
