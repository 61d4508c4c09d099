//! Helpers shared by arbor's integration tests, so that no test folder carries its own copy:
//! free ports, a tokio runtime, the repository's paths and Python, child processes
//! ([`process`]), peer ranks that re-run the test binary ([`peer`]), the loopback job's
//! `job.toml` and processes ([`job`]) and the run's ledger ([`ledger`]).
//!
//! A dev-dependency only (`publish = false`), and free of tch: the coordinator's tests use it too.

use std::path::{Path, PathBuf};

pub mod job;
pub mod ledger;
pub mod moto;
pub mod peer;
pub mod process;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it for a listener that is
/// closed again before this returns).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A tokio runtime for tests that drive async code from a plain `#[test]`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate lives in the repository")
        .to_path_buf()
}

/// The project's virtualenv (scripts/setup.sh makes it; `ARBOR_VENV` overrides its location).
pub fn venv() -> PathBuf {
    match std::env::var_os("ARBOR_VENV") {
        Some(path) => PathBuf::from(path),
        None => repo_root().join(".venv"),
    }
}

/// `name` from the virtualenv's `bin/`; panics when scripts/setup.sh has not installed it.
pub fn venv_tool(name: &str) -> PathBuf {
    let tool = venv().join("bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/setup.sh (it installs scripts/requirements/data.txt)",
        tool.display()
    );
    tool
}

/// Writes the `kind` corpus of bench/loader/make_corpus.py into `out`.
pub fn make_corpus(kind: &str, out: &Path) {
    let status = std::process::Command::new(venv_tool("python"))
        .arg(repo_root().join("bench/loader/make_corpus.py"))
        .arg(kind)
        .arg(out)
        .status()
        .expect("running make_corpus.py");
    assert!(status.success(), "make_corpus.py {kind} failed: {status}");
}

/// Writes the odd-file corpus (every kind of file the indexer must skip or survive) into `out`.
pub fn make_odd_corpus(out: &Path) {
    make_corpus("odd", out);
}

/// The project's Python (`ARBOR_PYTHON_BIN`, else the repository's `.venv/bin/python`).
pub fn python_bin() -> PathBuf {
    std::env::var_os("ARBOR_PYTHON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// FNV-1a of `bytes`: names a cache folder of generated fixtures after the script's version.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3)
    })
}
