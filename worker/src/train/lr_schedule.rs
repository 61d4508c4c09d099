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
//! are done, then 1e-3 until 1000, then 1e-5 to the end; they are parsed, and refused naming the
//! entry at fault, with the config (common/src/learning_rate.rs). When the last entry has an end
//! step, training ends there ([`LrSchedule::final_step`]), as A1111's scheduler sets `finished`.
//! The scheduler named in the config is not applied to A1111 strings (the config documents
//! this); a warmup still is.

use arbor_common::config::{LearningRate, LrScheduler, ScheduleEntry};

use crate::error::Result;

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

impl LrSchedule {
    /// lr: config `train.lr` (a number, or A1111's "rate:step, rate:step, rate"); scheduler:
    /// `train.lr_scheduler`; warmup_steps linear from 0; total_steps: optimizer steps of the
    /// whole run (for cosine).
    pub fn from_config(
        lr: &str,
        scheduler: LrScheduler,
        warmup_steps: u64,
        total_steps: u64,
    ) -> Result<Self> {
        let rate = match LearningRate::parse(lr)? {
            LearningRate::Piecewise(entries) => {
                return Ok(Self::Piecewise {
                    entries,
                    warmup_steps,
                })
            }
            LearningRate::Constant(rate) => rate,
        };
        Ok(match scheduler {
            LrScheduler::Constant => Self::Constant { rate, warmup_steps },
            LrScheduler::Cosine => Self::Cosine {
                rate,
                warmup_steps,
                total_steps,
            },
        })
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
