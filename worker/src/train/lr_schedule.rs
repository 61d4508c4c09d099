//! The learning rate of each optimizer step (docs/architecture.md §4): a constant or a warmup +
//! cosine decay as diffusers' `get_constant_schedule_with_warmup` /
//! `get_cosine_schedule_with_warmup`, or AUTOMATIC1111's piecewise `"rate:step, rate:step, rate"`
//! strings.
//!
//! Step numbering is diffusers' `LambdaLR`: `learning_rate(step)` is the rate of the optimizer
//! step taken after `step` steps, so with a warmup the very first step (step 0) has rate 0.
//!
//! **Warmup** multiplies the rate linearly by `step / warmup_steps` while `step < warmup_steps`.
//! **Cosine** then decays `0.5 · (1 + cos(π · progress))` to 0 at `total_steps`, with
//! `progress = (step − warmup) / max(1, total − warmup)` (diffusers' `num_cycles = 0.5`). Past
//! `total_steps` the rate stays 0 (diffusers' cosine would rise again; no run goes there).
//!
//! **A1111 strings** (modules/textual_inversion/learn_schedule.py, `LearnScheduleIterator` and
//! `LearnRateScheduler`): `"0.005:100, 1e-3:1000, 1e-5"` means 0.005 while fewer than 100 steps
//! are done, then 1e-3 until 1000, then 1e-5 to the end. An entry's end step `-1` (or no end
//! step) means "to the end of training". When the last entry has an end step, training ends
//! there ([`LrSchedule::final_step`]), as A1111's scheduler sets `finished`. Empty entries are
//! skipped, and whitespace around numbers is allowed, like Python's `float()`/`int()`.
//! Stricter than A1111, which silently accepts them, these are errors naming the entry:
//! entries after a to-the-end entry, end steps that are 0 or do not increase, more than one
//! `:`, and rates that are negative or not finite. The scheduler named in the config is not
//! applied to A1111 strings (the config documents this); a warmup still is.

use crate::error::{Result, WorkerError};

/// One A1111 schedule entry: `rate` until `end_step` optimizer steps are done (`None`: to the
/// end of training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleEntry {
    pub rate: f64,
    pub end_step: Option<u64>,
}

/// A learning-rate schedule, resolved from the config once.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// `rate`, after a linear warmup.
    Constant { rate: f64, warmup_steps: u64 },
    /// `rate`, after a linear warmup, decayed by a half cosine to 0 at `total_steps`.
    Cosine {
        rate: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
    /// A1111's piecewise constant schedule, after a linear warmup.
    Piecewise {
        entries: Vec<ScheduleEntry>,
        warmup_steps: u64,
    },
}

fn lr_error(message: impl Into<String>) -> WorkerError {
    WorkerError::Input {
        name: "train.lr".to_string(),
        message: message.into(),
    }
}

fn parse_rate(text: &str, entry: &str) -> Result<f64> {
    let rate: f64 = text.trim().parse().map_err(|_| {
        lr_error(format!(
            "entry `{entry}`: rate `{}` is not a number",
            text.trim()
        ))
    })?;
    if !rate.is_finite() || rate < 0.0 {
        return Err(lr_error(format!(
            "entry `{entry}`: rate must be a finite number >= 0, got {rate}"
        )));
    }
    Ok(rate)
}

/// Parses A1111's `"rate:step, rate:step, rate"` into entries.
pub fn parse_a1111_schedule(text: &str) -> Result<Vec<ScheduleEntry>> {
    let mut entries: Vec<ScheduleEntry> = Vec::new();
    for raw_entry in text.split(',') {
        let entry = raw_entry.trim();
        if entry.is_empty() {
            continue;
        }
        if let Some(previous) = entries.last() {
            if previous.end_step.is_none() {
                return Err(lr_error(format!(
                    "entry `{entry}` follows an entry that already runs to the end of training"
                )));
            }
        }
        let parts: Vec<&str> = entry.split(':').collect();
        let parsed = match parts.as_slice() {
            [rate] => ScheduleEntry {
                rate: parse_rate(rate, entry)?,
                end_step: None,
            },
            [rate, step] => {
                let rate = parse_rate(rate, entry)?;
                let step: i64 = step.trim().parse().map_err(|_| {
                    lr_error(format!(
                        "entry `{entry}`: end step `{}` is not an integer",
                        step.trim()
                    ))
                })?;
                let end_step = match step {
                    -1 => None,
                    step if step >= 1 => Some(step as u64),
                    step => {
                        return Err(lr_error(format!(
                            "entry `{entry}`: end step must be >= 1 (or -1 for the end), got {step}"
                        )))
                    }
                };
                ScheduleEntry { rate, end_step }
            }
            _ => {
                return Err(lr_error(format!(
                    "entry `{entry}`: expected `rate` or `rate:step`"
                )))
            }
        };
        if let (Some(previous), Some(end_step)) = (
            entries.last().and_then(|previous| previous.end_step),
            parsed.end_step,
        ) {
            if end_step <= previous {
                return Err(lr_error(format!(
                    "entry `{entry}`: end step {end_step} must be greater than the previous end step {previous}"
                )));
            }
        }
        entries.push(parsed);
    }
    if entries.is_empty() {
        return Err(lr_error(format!(
            "`{text}` holds no rate; expected a number or a schedule like \"0.001:100, 1e-5:1000, 1e-6\""
        )));
    }
    Ok(entries)
}

impl LrSchedule {
    /// lr: config `train.lr` (a number, or A1111's "rate:step, rate:step, rate"); scheduler:
    /// "constant" | "cosine"; warmup_steps linear from 0; total_steps: optimizer steps of the
    /// whole run (for cosine).
    pub fn from_config(
        lr: &str,
        scheduler: &str,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self> {
        let trimmed = lr.trim();
        let is_a1111 = trimmed.contains(':') || trimmed.contains(',');
        if is_a1111 {
            let entries = parse_a1111_schedule(trimmed)?;
            return Ok(Self::Piecewise {
                entries,
                warmup_steps,
            });
        }
        let rate = parse_rate(trimmed, trimmed)?;
        match scheduler {
            "constant" => Ok(Self::Constant { rate, warmup_steps }),
            "cosine" => Ok(Self::Cosine {
                rate,
                warmup_steps,
                total_steps,
            }),
            other => Err(WorkerError::Input {
                name: "train.lr_scheduler".to_string(),
                message: format!("unknown scheduler `{other}`; expected constant or cosine"),
            }),
        }
    }

    fn warmup_factor(step: u64, warmup_steps: u64) -> f64 {
        if step < warmup_steps {
            step as f64 / warmup_steps.max(1) as f64
        } else {
            1.0
        }
    }

    /// The rate of the optimizer step taken after `step` steps (0 for the first step).
    pub fn learning_rate(&self, step: u64) -> f64 {
        match self {
            Self::Constant { rate, warmup_steps } => {
                rate * Self::warmup_factor(step, *warmup_steps)
            }
            Self::Cosine {
                rate,
                warmup_steps,
                total_steps,
            } => {
                if step < *warmup_steps {
                    return rate * Self::warmup_factor(step, *warmup_steps);
                }
                let progress = ((step - warmup_steps) as f64
                    / total_steps.saturating_sub(*warmup_steps).max(1) as f64)
                    .min(1.0);
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos());
                rate * factor.max(0.0)
            }
            Self::Piecewise {
                entries,
                warmup_steps,
            } => {
                let entry = entries
                    .iter()
                    .find(|entry| entry.end_step.is_none_or(|end_step| step < end_step))
                    .or(entries.last());
                let rate = entry.map_or(0.0, |entry| entry.rate);
                rate * Self::warmup_factor(step, *warmup_steps)
            }
        }
    }

    /// A1111: a last entry with an end step ends training there.
    pub fn final_step(&self) -> Option<u64> {
        match self {
            Self::Piecewise { entries, .. } => entries.last().and_then(|entry| entry.end_step),
            Self::Constant { .. } | Self::Cosine { .. } => None,
        }
    }
}
