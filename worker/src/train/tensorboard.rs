//! TensorBoard event files in `run_dir/tensorboard/`, written by rank 0 beside `metrics.jsonl`
//! (docs/architecture.md §7), so `tensorboard --logdir RUN_DIR` (or a folder of runs) shows a run
//! the way kohya's, OneTrainer's and diffusers' scripts do.
//!
//! **Format.** Written by hand: TFRecord framing (the record's length as a little-endian u64, the
//! masked CRC32C of those 8 bytes, the record, the masked CRC32C of the record) around `Event`
//! protobufs, encoded by prost from the few messages declared in [`proto`] with the field numbers
//! of TensorFlow's `event.proto` and `summary.proto`. The `tensorboard-rs` crate was not used: it
//! is built on rust-protobuf 2 and image 0.23 rather than the prost and image already here, and
//! it writes through a local file handle, which a run directory in object storage does not have.
//!
//! **What is written** ([`tags`]), at the optimizer step of each `metrics.jsonl` record and with
//! its `unix_time` as the wall time: the loss raw and smoothed (the exponential moving average of
//! `loss.png`, [`crate::train::loss_curve::LossSmoother`]: factor 0.9, start-up bias corrected,
//! non-finite losses skipped), the learning rate, images/s, the data-wait fraction, the gradient
//! norm, the failed items and the step's prompts by token length (one scalar per bin of
//! `arbor_runtime::trainer::TOKEN_LENGTH_BINS`); the sample grids as PNG image summaries at
//! their steps. A validation loss goes in as [`tags::VALIDATION_LOSS`] through
//! [`TensorBoardLog::append_scalars`] once there is one.
//!
//! **Files.** Every session (each formation of the group, on the rank 0 of that group) starts a
//! file of its own, named as TensorFlow 2 names them:
//! `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`, n counting the files of the process,
//! zero-padded so that names sort in the order the files were started (the order TensorBoard
//! reads them in). Its first record is the `file_version: "brain.Event:2"` event. A session that
//! resumes from a checkpoint at step s then writes a `SessionLog` START event at step s + 1:
//! TensorBoard drops everything an earlier file recorded from that step on (the rolled-back
//! stretch), so no step shows twice. Records reach storage at [`TensorBoardLog::flush`], which the
//! trainer calls where it flushes `metrics.jsonl`: on a local run directory the new records are
//! appended to the file (what TensorFlow's writer does, so a running `tensorboard` follows it);
//! object stores cannot append, so there the whole file is rewritten with [`RunDir::put`], like
//! `metrics.jsonl`. A file past [`ROTATE_BYTES`] (sample images add up) is closed at a flush and
//! the next records go to a new one, which bounds what a rewrite uploads.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;

use crate::error::{Result, WorkerError};
use crate::train::loss_curve::LossSmoother;
use crate::train::metrics_log::StepMetrics;
use crate::train::run_dir::RunDir;

/// The folder of the event files in the run directory.
pub const TENSORBOARD_PREFIX: &str = "tensorboard";
/// The size past which a flushed file is closed and the next records start a new one.
pub const ROTATE_BYTES: usize = 16 << 20;
/// The event file format version TensorBoard expects first in every file.
const FILE_VERSION: &str = "brain.Event:2";

/// The tags of the scalars and images.
pub mod tags {
    pub const LOSS: &str = "loss/raw";
    pub const SMOOTHED_LOSS: &str = "loss/smoothed";
    /// The validation loss, on the steps it is measured.
    pub const VALIDATION_LOSS: &str = "loss/validation";
    pub const LEARNING_RATE: &str = "learning_rate";
    pub const IMAGES_PER_SECOND: &str = "images_per_second";
    pub const DATA_WAIT_FRACTION: &str = "data_wait_fraction";
    pub const GRAD_NORM: &str = "grad_norm";
    pub const FAILED_ITEMS: &str = "failed_items";
    /// Followed by a bin name of `arbor_runtime::trainer::TOKEN_LENGTH_BINS`.
    pub const PROMPT_TOKENS_PREFIX: &str = "prompt_tokens/";
    pub const SAMPLES: &str = "samples";
}

/// The messages of TensorFlow's `tensorflow/core/util/event.proto` and
/// `tensorflow/core/framework/summary.proto` that arbor writes, with their field numbers (fields
/// arbor never sets are left out; readers skip what they do not know anyway).
pub mod proto {
    /// `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    /// `Event.what`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    /// `tensorflow.SessionLog`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        /// `SessionLog.SessionStatus`: 1 = START.
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(string, tag = "3")]
        pub msg: String,
    }

    /// `SessionLog.SessionStatus.START`: readers drop the events at this step and later.
    pub const SESSION_START: i32 = 1;

    /// `tensorflow.Summary`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<SummaryValue>,
    }

    /// `tensorflow.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryValue {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(oneof = "Value", tags = "2, 4")]
        pub value: Option<Value>,
    }

    /// `Summary.Value.value`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "4")]
        Image(Image),
    }

    /// `tensorflow.Summary.Image`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        #[prost(int32, tag = "1")]
        pub height: i32,
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 1 grayscale, 2 grayscale + alpha, 3 RGB, 4 RGBA.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }
}

/// TFRecord's masked CRC32C: the CRC rotated right by 15 bits plus a constant, so a CRC of data
/// that itself holds CRCs is not trivially related to them.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The CRC32C a masked one was made from.
pub fn unmask_crc32c(masked: u32) -> u32 {
    masked.wrapping_sub(0xa282_ead8).rotate_left(15)
}

/// Appends `data` to `out` as one TFRecord.
pub fn write_record(out: &mut Vec<u8>, data: &[u8]) {
    let length = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
}

fn framing_error(message: impl std::fmt::Display) -> WorkerError {
    WorkerError::Input {
        name: "tfrecord".to_string(),
        message: message.to_string(),
    }
}

/// The records of TFRecord bytes, each checked against its CRCs.
pub fn read_records(mut bytes: &[u8]) -> Result<Vec<&[u8]>> {
    let mut records = Vec::new();
    let u32_at = |bytes: &[u8], at: usize| {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
    };
    while !bytes.is_empty() {
        if bytes.len() < 12 {
            return Err(framing_error(format!(
                "record {}: truncated header",
                records.len()
            )));
        }
        let length_bytes = &bytes[..8];
        if masked_crc32c(length_bytes) != u32_at(bytes, 8) {
            return Err(framing_error(format!(
                "record {}: length crc mismatch",
                records.len()
            )));
        }
        let length = u64::from_le_bytes(length_bytes.try_into().expect("eight bytes"));
        let end = usize::try_from(length)
            .ok()
            .and_then(|length| length.checked_add(16))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| framing_error(format!("record {}: truncated data", records.len())))?;
        let data = &bytes[12..end - 4];
        if masked_crc32c(data) != u32_at(bytes, end - 4) {
            return Err(framing_error(format!(
                "record {}: data crc mismatch",
                records.len()
            )));
        }
        records.push(data);
        bytes = &bytes[end..];
    }
    Ok(records)
}

fn now_unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// The key of a new event file, unique within the process.
fn new_file_key() -> String {
    static FILES: AtomicU64 = AtomicU64::new(0);
    let number = FILES.fetch_add(1, Ordering::Relaxed);
    let host: String = arbor_runtime::worker_args::host_name()
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                character
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{TENSORBOARD_PREFIX}/events.out.tfevents.{}.{host}.{}.{number:06}",
        now_unix_seconds() as u64,
        std::process::id()
    )
}

fn scalar(tag: &str, value: f64) -> proto::SummaryValue {
    proto::SummaryValue {
        tag: tag.to_string(),
        value: Some(proto::Value::SimpleValue(value as f32)),
    }
}

/// One session's event file (see the module documentation), held by rank 0.
pub struct TensorBoardLog {
    run_dir: RunDir,
    /// The key of the file being written.
    key: String,
    /// The file's bytes: all of them on an object store (rewritten whole), those not yet
    /// appended on a local folder.
    pending: Vec<u8>,
    /// Bytes of the file already written.
    written: usize,
    smoother: LossSmoother,
}

impl std::fmt::Debug for TensorBoardLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TensorBoardLog")
            .field("run_dir", &self.run_dir.location())
            .field("key", &self.key)
            .field("written", &self.written)
            .finish()
    }
}

impl TensorBoardLog {
    /// Starts a new event file for a session resuming at `resume_step` (0: from the start);
    /// `history` is the loss of every earlier step in order (the smoothing continues from its
    /// finite values).
    pub fn open(
        run_dir: &RunDir,
        resume_step: u64,
        history: impl IntoIterator<Item = f64>,
    ) -> Result<Self> {
        let mut smoother = LossSmoother::default();
        for loss in history.into_iter().filter(|loss| loss.is_finite()) {
            smoother.push(loss);
        }
        let mut log = Self {
            run_dir: RunDir::open(run_dir.location())?,
            key: String::new(),
            pending: Vec::new(),
            written: 0,
            smoother,
        };
        log.start_file();
        if resume_step > 0 {
            log.append_event(proto::Event {
                wall_time: now_unix_seconds(),
                step: step_i64(resume_step + 1),
                what: Some(proto::What::SessionLog(proto::SessionLog {
                    status: proto::SESSION_START,
                    msg: format!("resumed from step {resume_step}"),
                })),
            });
        }
        Ok(log)
    }

    /// The key of the file being written (relative to the run directory).
    pub fn key(&self) -> &str {
        &self.key
    }

    fn start_file(&mut self) {
        self.key = new_file_key();
        self.pending.clear();
        self.written = 0;
        self.append_event(proto::Event {
            wall_time: now_unix_seconds(),
            step: 0,
            what: Some(proto::What::FileVersion(FILE_VERSION.to_string())),
        });
    }

    fn append_event(&mut self, event: proto::Event) {
        write_record(&mut self.pending, &event.encode_to_vec());
    }

    /// The scalars of one optimizer step.
    pub fn append_step(&mut self, record: &StepMetrics) {
        let mut values = vec![
            (tags::LOSS.to_string(), record.loss),
            (tags::LEARNING_RATE.to_string(), record.lr),
            (
                tags::IMAGES_PER_SECOND.to_string(),
                record.images_per_second,
            ),
            (
                tags::DATA_WAIT_FRACTION.to_string(),
                record.data_wait_fraction,
            ),
            (tags::GRAD_NORM.to_string(), record.grad_norm),
            (
                tags::FAILED_ITEMS.to_string(),
                f64::from(record.failed_items),
            ),
        ];
        if record.loss.is_finite() {
            values.push((
                tags::SMOOTHED_LOSS.to_string(),
                self.smoother.push(record.loss),
            ));
        }
        if let Some(validation_loss) = record.validation_loss {
            values.push((tags::VALIDATION_LOSS.to_string(), validation_loss));
        }
        let counts = record.token_length_histogram.counts();
        for (bin, count) in arbor_runtime::trainer::TOKEN_LENGTH_BINS.iter().zip(counts) {
            values.push((format!("{}{bin}", tags::PROMPT_TOKENS_PREFIX), count as f64));
        }
        let values: Vec<(&str, f64)> = values
            .iter()
            .map(|(tag, value)| (tag.as_str(), *value))
            .collect();
        self.append_scalars(record.step, record.unix_time, &values);
    }

    /// Scalars at `step` (a validation loss, for example).
    pub fn append_scalars(&mut self, step: u64, wall_time: f64, values: &[(&str, f64)]) {
        self.append_event(proto::Event {
            wall_time,
            step: step_i64(step),
            what: Some(proto::What::Summary(proto::Summary {
                value: values
                    .iter()
                    .map(|(tag, value)| scalar(tag, *value))
                    .collect(),
            })),
        });
    }

    /// A PNG image at `step` under `tag` (a sample grid).
    pub fn append_png(&mut self, step: u64, tag: &str, png: &[u8]) -> Result<()> {
        let image =
            image::load_from_memory_with_format(png, image::ImageFormat::Png).map_err(|error| {
                WorkerError::Input {
                    name: format!("tensorboard image `{tag}` of step {step}"),
                    message: error.to_string(),
                }
            })?;
        let colorspace = match image.color().channel_count() {
            1 => 1,
            2 => 2,
            4 => 4,
            _ => 3,
        };
        let size = |value: u32| i32::try_from(value).unwrap_or(i32::MAX);
        self.append_event(proto::Event {
            wall_time: now_unix_seconds(),
            step: step_i64(step),
            what: Some(proto::What::Summary(proto::Summary {
                value: vec![proto::SummaryValue {
                    tag: tag.to_string(),
                    value: Some(proto::Value::Image(proto::Image {
                        height: size(image.height()),
                        width: size(image.width()),
                        colorspace,
                        encoded_image_string: png.to_vec(),
                    })),
                }],
            })),
        });
        Ok(())
    }

    /// Writes what was appended since the last flush (see the module documentation); a file
    /// past [`ROTATE_BYTES`] is then closed and the next records start a new one.
    pub fn flush(&mut self) -> Result<()> {
        let size = match self.run_dir.local_path() {
            Some(folder) => {
                if !self.pending.is_empty() {
                    let path = folder.join(&self.key);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(WorkerError::io(parent))?;
                    }
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(WorkerError::io(&path))?;
                    file.write_all(&self.pending)
                        .and_then(|()| file.flush())
                        .map_err(WorkerError::io(&path))?;
                    self.written += self.pending.len();
                    self.pending.clear();
                }
                self.written
            }
            None => {
                self.run_dir.put(&self.key, self.pending.clone())?;
                self.written = self.pending.len();
                self.written
            }
        };
        if size >= ROTATE_BYTES {
            self.start_file();
        }
        Ok(())
    }
}

fn step_i64(step: u64) -> i64 {
    i64::try_from(step).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics_log::TokenLengthHistogram;

    #[test]
    fn crc32c_matches_the_standard_check_value_and_masking_round_trips() {
        // The CRC-32C check value (RFC 3720, iSCSI).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        for data in [&b""[..], b"123456789", b"\x00\x00\x00\x00\x00\x00\x00\x00"] {
            let masked = masked_crc32c(data);
            assert_ne!(masked, crc32c::crc32c(data));
            assert_eq!(unmask_crc32c(masked), crc32c::crc32c(data));
        }
        // TensorFlow's masking, ((crc >> 15) | (crc << 17)) + 0xa282ead8, of the check value (as
        // the tensorboard package's masked_crc32c computes it).
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_round_trip_and_a_flipped_bit_is_caught() {
        let mut bytes = Vec::new();
        write_record(&mut bytes, b"first");
        write_record(&mut bytes, b"");
        write_record(&mut bytes, &[7u8; 300]);
        assert_eq!(bytes.len(), 3 * 16 + 5 + 300);
        assert_eq!(&bytes[..8], &5u64.to_le_bytes());
        let records = read_records(&bytes).unwrap();
        assert_eq!(records, vec![&b"first"[..], b"", &[7u8; 300][..]]);
        let mut corrupt = bytes.clone();
        corrupt[14] ^= 1;
        let error = read_records(&corrupt).unwrap_err().to_string();
        assert!(error.contains("record 0: data crc mismatch"), "{error}");
        let error = read_records(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(error.contains("record 2: truncated data"), "{error}");
    }

    fn record(step: u64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: 0,
            batch: step - 1,
            rank: 0,
            world_size: 1,
            generation: 1,
            loss,
            lr: 1e-4,
            grad_norm: 0.5,
            images_per_second: 12.0,
            data_wait_fraction: 0.25,
            token_length_histogram: TokenLengthHistogram {
                up_to_75: 3,
                from_76_to_150: 1,
                ..TokenLengthHistogram::default()
            },
            failed_items: 0,
            bucket: "32x32".to_string(),
            unix_time: 1_800_000_000.0 + step as f64,
            phase_seconds: None,
            peak_memory_bytes: None,
            validation_loss: None,
        }
    }

    fn events(bytes: &[u8]) -> Vec<proto::Event> {
        read_records(bytes)
            .unwrap()
            .into_iter()
            .map(|record| proto::Event::decode(record).unwrap())
            .collect()
    }

    fn scalars(event: &proto::Event) -> Vec<(String, f32)> {
        match &event.what {
            Some(proto::What::Summary(summary)) => summary
                .value
                .iter()
                .filter_map(|value| match value.value {
                    Some(proto::Value::SimpleValue(number)) => Some((value.tag.clone(), number)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_resumed_session_writes_its_own_file_with_a_session_start_and_continued_smoothing() {
        let folder = tempfile::tempdir().unwrap();
        let run_dir = RunDir::open(folder.path().to_str().unwrap()).unwrap();
        let mut log = TensorBoardLog::open(&run_dir, 2, [1.0, 0.5]).unwrap();
        log.append_step(&record(3, 0.25));
        log.append_step(&record(4, f64::NAN));
        log.flush().unwrap();
        let key = log.key().to_string();
        assert!(key.starts_with("tensorboard/events.out.tfevents."), "{key}");
        let events = events(&std::fs::read(folder.path().join(&key)).unwrap());
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0].what,
            Some(proto::What::FileVersion("brain.Event:2".to_string()))
        );
        assert!(matches!(
            &events[1].what,
            Some(proto::What::SessionLog(log)) if log.status == proto::SESSION_START
        ));
        assert_eq!(events[1].step, 3);
        assert_eq!(events[2].step, 3);
        assert_eq!(events[2].wall_time, 1_800_000_003.0);
        let step_three = scalars(&events[2]);
        let mut smoother = LossSmoother::default();
        for loss in [1.0, 0.5] {
            smoother.push(loss);
        }
        let expected = smoother.push(0.25) as f32;
        assert!(step_three.contains(&("loss/smoothed".to_string(), expected)));
        assert!(step_three.contains(&("loss/raw".to_string(), 0.25)));
        assert!(step_three.contains(&("prompt_tokens/up_to_75".to_string(), 3.0)));
        assert!(step_three.contains(&("prompt_tokens/76_to_150".to_string(), 1.0)));
        assert!(step_three.contains(&("data_wait_fraction".to_string(), 0.25)));
        // A non-finite loss is written raw, and left out of the smoothing.
        let step_four = scalars(&events[3]);
        assert!(step_four
            .iter()
            .any(|(tag, value)| tag == "loss/raw" && value.is_nan()));
        assert!(!step_four.iter().any(|(tag, _)| tag == "loss/smoothed"));

        // Later flushes append; a second session writes a second file.
        log.append_png(4, tags::SAMPLES, &tiny_png()).unwrap();
        log.flush().unwrap();
        let events = super::tests::events(&std::fs::read(folder.path().join(&key)).unwrap());
        assert_eq!(events.len(), 5);
        assert!(matches!(
            &events[4].what,
            Some(proto::What::Summary(summary)) if matches!(
                &summary.value[0].value,
                Some(proto::Value::Image(image)) if image.width == 3 && image.height == 2
                    && image.colorspace == 3 && image.encoded_image_string == tiny_png()
            )
        ));
        let second = TensorBoardLog::open(&run_dir, 0, []).unwrap();
        assert_ne!(second.key(), key);
    }

    fn tiny_png() -> Vec<u8> {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    #[test]
    fn a_large_file_is_closed_and_the_next_records_start_a_new_one() {
        let folder = tempfile::tempdir().unwrap();
        let run_dir = RunDir::open(folder.path().to_str().unwrap()).unwrap();
        let mut log = TensorBoardLog::open(&run_dir, 0, []).unwrap();
        let first = log.key().to_string();
        log.append_scalars(1, 0.0, &[(tags::LOSS, 1.0)]);
        log.pending.resize(log.pending.len() + ROTATE_BYTES, 0);
        log.flush().unwrap();
        assert_ne!(log.key(), first);
        log.append_scalars(2, 0.0, &[(tags::LOSS, 1.0)]);
        log.flush().unwrap();
        let events = events(&std::fs::read(folder.path().join(log.key())).unwrap());
        assert_eq!(events.len(), 2, "the new file starts with its version");
        assert_eq!(events[1].step, 2);
    }
}
