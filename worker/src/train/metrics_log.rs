//! `metrics.jsonl` in the run directory: one JSON object ([`StepMetrics`]) per optimizer step,
//! in step order.
//!
//! Object stores cannot append, so the log keeps every record in memory and
//! [`MetricsLog::flush`] rewrites the whole file with [`RunDir::put`] (atomic on a local
//! folder); flush every few dozen steps, not every step. A resumed run opens the log with the
//! step of the checkpoint it resumed from: records after that step are dropped, so a stretch
//! that was rolled back does not appear twice. A line that does not parse (a hand-edited file)
//! is kept verbatim and counted, never lost.

use crate::error::{Result, WorkerError};
use crate::train::phase_clock::PhaseSeconds;
use crate::train::run_dir::RunDir;

/// The key of the log in the run directory.
pub const METRICS_KEY: &str = "metrics.jsonl";

/// One optimizer step, as reported by one rank.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps done, counting this one (the first step is 1).
    pub step: u64,
    pub epoch: u64,
    pub batch: u64,
    pub rank: u32,
    pub world_size: u32,
    pub generation: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub images_per_second: f64,
    /// The share of the step's wall time spent waiting for data.
    pub data_wait_fraction: f64,
    pub token_length_histogram: TokenLengthHistogram,
    pub failed_items: u32,
    /// The bucket resolution, `"WxH"`.
    pub bucket: String,
    pub unix_time: f64,
    /// The step's time by phase, on the steps `train.time_phases_every` times (this rank's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_seconds: Option<PhaseSeconds>,
    /// The most bytes this rank's CUDA device has had allocated so far, on the steps whose loss
    /// was read back (CUDA builds only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The validation loss measured after this step (worker/src/train/validation.rs), on the
    /// steps `samples.validation_every` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
}

/// How many prompts had how many tokens (without BOS/EOS): CLIP chunks of 75, up to the 225
/// tokens that are encoded; longer prompts are truncated.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLengthHistogram {
    /// 0 to 75 tokens (one chunk).
    pub up_to_75: u64,
    /// 76 to 150 tokens (two chunks).
    pub from_76_to_150: u64,
    /// 151 to 225 tokens (three chunks).
    pub from_151_to_225: u64,
    /// More than 225 tokens: truncated to 225.
    pub over_225_truncated: u64,
}

impl TokenLengthHistogram {
    pub fn record(&mut self, token_count: usize) {
        match token_count {
            0..=75 => self.up_to_75 += 1,
            76..=150 => self.from_76_to_150 += 1,
            151..=225 => self.from_151_to_225 += 1,
            _ => self.over_225_truncated += 1,
        }
    }

    /// The counts in the order of `arbor_runtime::trainer::TOKEN_LENGTH_BINS`.
    pub fn counts(&self) -> [u64; 4] {
        [
            self.up_to_75,
            self.from_76_to_150,
            self.from_151_to_225,
            self.over_225_truncated,
        ]
    }

    pub fn total(&self) -> u64 {
        self.up_to_75 + self.from_76_to_150 + self.from_151_to_225 + self.over_225_truncated
    }

    /// Adds another histogram's counts (for example another rank's).
    pub fn merge(&mut self, other: &TokenLengthHistogram) {
        self.up_to_75 += other.up_to_75;
        self.from_76_to_150 += other.from_76_to_150;
        self.from_151_to_225 += other.from_151_to_225;
        self.over_225_truncated += other.over_225_truncated;
    }
}

/// A line of the file: a record, or a line that did not parse, kept verbatim.
#[derive(Debug, Clone)]
enum Line {
    Record(Box<StepMetrics>),
    Unparsed(String),
}

/// The metrics log of one run directory (it holds its own handle on the run directory).
pub struct MetricsLog {
    run_dir: RunDir,
    lines: Vec<Line>,
    unparsed_lines: usize,
}

impl std::fmt::Debug for MetricsLog {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MetricsLog")
            .field("run_dir", &self.run_dir.location())
            .field("lines", &self.lines.len())
            .field("unparsed_lines", &self.unparsed_lines)
            .finish()
    }
}

impl MetricsLog {
    /// Opens run_dir's metrics.jsonl; keeps the existing records (a resumed run continues the
    /// file; records with step > resume_step are dropped from the history so a rolled-back
    /// stretch does not show twice).
    pub fn open(run_dir: &RunDir, resume_step: u64) -> Result<Self> {
        let run_dir = RunDir::open(run_dir.location())?;
        let mut lines = Vec::new();
        let mut unparsed_lines = 0;
        if let Some(bytes) = run_dir.get(METRICS_KEY)? {
            let text = String::from_utf8_lossy(&bytes);
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<StepMetrics>(line) {
                    Ok(record) if record.step > resume_step => {}
                    Ok(record) => lines.push(Line::Record(Box::new(record))),
                    Err(error) => {
                        tracing::warn!(
                            location = run_dir.location(),
                            line = index + 1,
                            %error,
                            "metrics.jsonl line does not parse; kept verbatim"
                        );
                        unparsed_lines += 1;
                        lines.push(Line::Unparsed(line.to_string()));
                    }
                }
            }
        }
        Ok(Self {
            run_dir,
            lines,
            unparsed_lines,
        })
    }

    /// Adds a record; it reaches the file at the next [`MetricsLog::flush`].
    pub fn append(&mut self, record: StepMetrics) -> Result<()> {
        if !record.bucket.is_empty() && !is_bucket_label(&record.bucket) {
            return Err(WorkerError::Input {
                name: "StepMetrics.bucket".to_string(),
                message: format!("expected \"WxH\", got `{}`", record.bucket),
            });
        }
        self.lines.push(Line::Record(Box::new(record)));
        Ok(())
    }

    /// Writes the whole file with RunDir::put (object stores cannot append).
    pub fn flush(&mut self) -> Result<()> {
        let mut text = String::new();
        for line in &self.lines {
            match line {
                Line::Record(record) => {
                    let json = serde_json::to_string(record).map_err(|error| {
                        WorkerError::Training(format!(
                            "serializing the metrics of step {}: {error}",
                            record.step
                        ))
                    })?;
                    text.push_str(&json);
                }
                Line::Unparsed(raw) => text.push_str(raw),
            }
            text.push('\n');
        }
        self.run_dir.put(METRICS_KEY, text.into_bytes())
    }

    /// `(step, loss)` of every record, in file order.
    pub fn loss_history(&self) -> Vec<(u64, f64)> {
        self.records()
            .map(|record| (record.step, record.loss))
            .collect()
    }

    /// `(step, validation loss)` of the records that have one, in file order.
    pub fn validation_history(&self) -> Vec<(u64, f64)> {
        self.records()
            .filter_map(|record| Some((record.step, record.validation_loss?)))
            .collect()
    }

    /// Every record, in file order.
    pub fn records(&self) -> impl Iterator<Item = &StepMetrics> {
        self.lines.iter().filter_map(|line| match line {
            Line::Record(record) => Some(record.as_ref()),
            Line::Unparsed(_) => None,
        })
    }

    /// Lines of the opened file that did not parse as a record (kept verbatim).
    pub fn unparsed_lines(&self) -> usize {
        self.unparsed_lines
    }
}

fn is_bucket_label(label: &str) -> bool {
    let Some((width, height)) = label.split_once('x') else {
        return false;
    };
    width.parse::<u32>().is_ok() && height.parse::<u32>().is_ok()
}
