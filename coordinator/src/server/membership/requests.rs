//! Workers' requests as domain values. Converting a protobuf request checks every field that
//! can be judged without the job (ids, hosts, ports, finite numbers); what depends on the plan
//! (batch numbers, items) is checked by the membership logic. Either way a refusal names the
//! field and the bound.

use std::net::IpAddr;

use arbor_proto::v1::{CheckpointDoneRequest, HeartbeatRequest, JoinRequest, ShardRequest};

use super::error::MembershipError;
use arbor_runtime::trainer::TOKEN_LENGTH_BINS;

/// The longest worker id, node name or reported error text kept.
pub const MAX_NAME_BYTES: usize = 256;
/// The longest error text a heartbeat may carry; longer texts are cut, not refused.
pub const MAX_ERROR_BYTES: usize = 4096;
/// The most local ranks one node may run.
pub const MAX_LOCAL_RANK: u32 = 4096;

/// A validated Join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerJoin {
    pub worker_id: String,
    pub node: String,
    pub local_rank: u32,
    /// An IP address or a DNS name: rank 0's is every rank's store address.
    pub advertise_host: String,
    pub store_port: u16,
}

/// Who sends a request after joining: its id and the rank and generation it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    pub worker_id: String,
    pub generation: u64,
    pub rank: u32,
}

/// A batch a rank reports as trained, for the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedBatch {
    pub batch: u64,
    pub item_ids: Vec<u64>,
}

/// A validated heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerHeartbeat {
    pub member: MemberRef,
    pub epoch: u64,
    pub segment: u64,
    pub batches_done: u64,
    /// May be NaN or infinite: a diverged step is a real event, reported rather than refused.
    pub loss: f64,
    pub items_per_second: f64,
    pub learning_rate: f64,
    pub token_length_counts: [u64; TOKEN_LENGTH_BINS.len()],
    pub completed: Vec<ReportedBatch>,
    /// Empty, or what went wrong on the rank (cut to [`MAX_ERROR_BYTES`]).
    pub error: String,
    /// `error` means the rank cannot train this job at all: the job fails.
    pub fatal: bool,
    /// Empty, or why the job must fail at once (the data failure budget spent), cut to
    /// [`MAX_ERROR_BYTES`].
    pub job_failure: String,
    /// Empty, or the checkpoint this rank could not resume from (`error` says why).
    pub unusable_checkpoint: String,
    /// A validation loss and the step it was measured at (rank 0, when one was measured).
    pub validation: Option<(f64, u64)>,
}

/// `text` cut to [`MAX_ERROR_BYTES`] on a character boundary, marked when cut.
fn cut_error_text(mut text: String) -> String {
    if text.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" …");
    }
    text
}

/// A validated Shard request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardAsk {
    pub member: MemberRef,
    pub epoch: u64,
    pub start_index: u64,
}

/// A validated CheckpointDone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    pub member: MemberRef,
    pub epoch: u64,
    pub segment: u64,
    pub batch: u64,
    pub step: u64,
}

impl TryFrom<JoinRequest> for WorkerJoin {
    type Error = MembershipError;

    fn try_from(request: JoinRequest) -> Result<Self, MembershipError> {
        let worker_id = check_worker_id("join.worker_id", request.worker_id)?;
        let node = check_name("join.node", request.node, true)?;
        if request.local_rank >= MAX_LOCAL_RANK {
            return Err(MembershipError::malformed(
                "join.local_rank",
                format!("{} is not below {MAX_LOCAL_RANK}", request.local_rank),
            ));
        }
        let advertise_host = check_host("join.advertise_host", request.advertise_host)?;
        let store_port = u16::try_from(request.store_port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                MembershipError::malformed(
                    "join.store_port",
                    format!("{} is not a TCP port (1 to 65535)", request.store_port),
                )
            })?;
        Ok(Self {
            worker_id,
            node,
            local_rank: request.local_rank,
            advertise_host,
            store_port,
        })
    }
}

impl WorkerJoin {
    /// `host:port` as a TCP client connects to it (IPv6 literals in brackets).
    pub fn store_address(&self) -> String {
        match self.advertise_host.parse::<IpAddr>() {
            Ok(IpAddr::V6(address)) => format!("[{address}]:{}", self.store_port),
            _ => format!("{}:{}", self.advertise_host, self.store_port),
        }
    }
}

fn member(
    request: &'static str,
    worker_id: String,
    generation: u64,
    rank: u32,
) -> Result<MemberRef, MembershipError> {
    Ok(MemberRef {
        worker_id: check_worker_id(&format!("{request}.worker_id"), worker_id)?,
        generation,
        rank,
    })
}

impl TryFrom<HeartbeatRequest> for WorkerHeartbeat {
    type Error = MembershipError;

    fn try_from(request: HeartbeatRequest) -> Result<Self, MembershipError> {
        let member = member(
            "heartbeat",
            request.worker_id,
            request.generation,
            request.rank,
        )?;
        let items_per_second = check_rate("heartbeat.items_per_second", request.items_per_second)?;
        let learning_rate = check_rate("heartbeat.learning_rate", request.learning_rate)?;
        check_rate("heartbeat.data_wait_seconds", request.data_wait_seconds)?;
        if request.token_length_counts.len() > TOKEN_LENGTH_BINS.len() {
            return Err(MembershipError::malformed(
                "heartbeat.token_length_counts",
                format!(
                    "{} bins, at most {} ({})",
                    request.token_length_counts.len(),
                    TOKEN_LENGTH_BINS.len(),
                    TOKEN_LENGTH_BINS.join(", ")
                ),
            ));
        }
        let mut token_length_counts = [0u64; TOKEN_LENGTH_BINS.len()];
        token_length_counts[..request.token_length_counts.len()]
            .copy_from_slice(&request.token_length_counts);
        if let Some(loss) = request.validation_loss {
            // A mean squared error: NaN or infinite reports a divergence, negative is a lie.
            if loss < 0.0 {
                return Err(MembershipError::malformed(
                    "heartbeat.validation_loss",
                    format!("{loss} is negative; a mean squared error is not"),
                ));
            }
        }
        let error = cut_error_text(request.error);
        Ok(Self {
            member,
            epoch: request.epoch,
            segment: request.segment,
            batches_done: request.batches_done,
            loss: request.loss,
            items_per_second,
            learning_rate,
            token_length_counts,
            completed: request
                .completed
                .into_iter()
                .map(|batch| ReportedBatch {
                    batch: batch.batch,
                    item_ids: batch.item_ids,
                })
                .collect(),
            fatal: request.fatal && !error.is_empty(),
            error,
            job_failure: cut_error_text(request.job_failure),
            unusable_checkpoint: cut_error_text(request.unusable_checkpoint),
            validation: request
                .validation_loss
                .map(|loss| (loss, request.validation_step)),
        })
    }
}

impl TryFrom<ShardRequest> for ShardAsk {
    type Error = MembershipError;

    fn try_from(request: ShardRequest) -> Result<Self, MembershipError> {
        Ok(Self {
            member: member("shard", request.worker_id, request.generation, request.rank)?,
            epoch: request.epoch,
            start_index: request.start_index,
        })
    }
}

impl TryFrom<CheckpointDoneRequest> for CheckpointReport {
    type Error = MembershipError;

    fn try_from(request: CheckpointDoneRequest) -> Result<Self, MembershipError> {
        Ok(Self {
            member: member(
                "checkpoint_done",
                request.worker_id,
                request.generation,
                request.rank,
            )?,
            epoch: request.epoch,
            segment: request.segment,
            batch: request.batch,
            step: request.step,
        })
    }
}

/// A rate, a learning rate or a duration: finite and not negative.
fn check_rate(field: &str, value: f64) -> Result<f64, MembershipError> {
    if value.is_finite() && value >= 0.0 {
        return Ok(value);
    }
    Err(MembershipError::malformed(
        field,
        format!("{value} is not a finite number of at least 0"),
    ))
}

fn check_worker_id(field: &str, worker_id: String) -> Result<String, MembershipError> {
    if worker_id.is_empty() {
        return Err(MembershipError::malformed(field, "is empty"));
    }
    check_name(field, worker_id, false)
}

/// A name shown in logs and status: at most [`MAX_NAME_BYTES`], printable, no whitespace.
fn check_name(field: &str, name: String, may_be_empty: bool) -> Result<String, MembershipError> {
    if name.is_empty() && !may_be_empty {
        return Err(MembershipError::malformed(field, "is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(MembershipError::malformed(
            field,
            format!("{} bytes, at most {MAX_NAME_BYTES}", name.len()),
        ));
    }
    if let Some(bad) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(MembershipError::malformed(
            field,
            format!("{name:?} contains {bad:?}: no whitespace or control characters"),
        ));
    }
    Ok(name)
}

/// An IP address, or a DNS name (RFC 1123: dot-separated labels of 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen; 253 bytes in all).
fn check_host(field: &str, host: String) -> Result<String, MembershipError> {
    if host.is_empty() {
        return Err(MembershipError::malformed(field, "is empty"));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host);
    }
    let name = host.strip_suffix('.').unwrap_or(&host);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(host);
    }
    Err(MembershipError::malformed(
        field,
        format!("{host:?} is neither an IP address nor a DNS name"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(host: &str, port: u32) -> JoinRequest {
        JoinRequest {
            worker_id: "w0".into(),
            node: "node-a".into(),
            local_rank: 0,
            advertise_host: host.into(),
            store_port: port,
        }
    }

    #[test]
    fn join_ports_and_hosts_are_checked() {
        for host in [
            "10.0.0.7",
            "::1",
            "worker-0.arbor.svc.cluster.local",
            "localhost",
        ] {
            assert!(WorkerJoin::try_from(join(host, 29500)).is_ok(), "{host}");
        }
        for port in [0, 65536, u32::MAX] {
            let error = WorkerJoin::try_from(join("10.0.0.7", port)).unwrap_err();
            assert_eq!(
                error.code(),
                super::super::error::RefusalCode::InvalidArgument
            );
            assert!(
                error.to_string().starts_with("join.store_port: "),
                "{error}"
            );
        }
        for host in [
            "",
            "evil host",
            "a:1",
            "-lead.example",
            "x..y",
            "ok/path",
            &"a".repeat(64),
        ] {
            let error = WorkerJoin::try_from(join(host, 29500)).unwrap_err();
            assert!(
                error.to_string().starts_with("join.advertise_host: "),
                "{host:?}: {error}"
            );
        }
    }

    #[test]
    fn ipv6_store_addresses_are_bracketed() {
        let join = WorkerJoin::try_from(join("fd00::7", 29500)).unwrap();
        assert_eq!(join.store_address(), "[fd00::7]:29500");
        let join = WorkerJoin::try_from(super::tests::join("10.0.0.7", 29500)).unwrap();
        assert_eq!(join.store_address(), "10.0.0.7:29500");
    }

    #[test]
    fn heartbeat_rates_must_be_finite_but_a_nan_loss_is_kept() {
        let heartbeat = |rate: f64, loss: f64| HeartbeatRequest {
            worker_id: "w0".into(),
            items_per_second: rate,
            loss,
            ..Default::default()
        };
        for rate in [f64::NAN, f64::INFINITY, -1.0] {
            let error = WorkerHeartbeat::try_from(heartbeat(rate, 0.1)).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("heartbeat.items_per_second: "),
                "{error}"
            );
        }
        let kept = WorkerHeartbeat::try_from(heartbeat(3.0, f64::NAN)).unwrap();
        assert!(kept.loss.is_nan());
    }

    #[test]
    fn heartbeat_bins_and_error_text_are_bounded() {
        let too_many = HeartbeatRequest {
            worker_id: "w0".into(),
            token_length_counts: vec![1; TOKEN_LENGTH_BINS.len() + 1],
            ..Default::default()
        };
        assert!(WorkerHeartbeat::try_from(too_many)
            .unwrap_err()
            .to_string()
            .starts_with("heartbeat.token_length_counts: "));
        let long = HeartbeatRequest {
            worker_id: "w0".into(),
            error: "é".repeat(MAX_ERROR_BYTES),
            ..Default::default()
        };
        let kept = WorkerHeartbeat::try_from(long).unwrap();
        assert!(kept.error.len() <= MAX_ERROR_BYTES + " …".len());
    }

    #[test]
    fn worker_ids_are_bounded_names() {
        for id in ["", "two words", "tab\tid", &"w".repeat(MAX_NAME_BYTES + 1)] {
            let request = JoinRequest {
                worker_id: id.into(),
                ..join("10.0.0.7", 29500)
            };
            let error = WorkerJoin::try_from(request).unwrap_err();
            assert!(error.to_string().starts_with("join.worker_id: "), "{error}");
        }
    }
}
