//! `train.lr` (docs/architecture.md §4): a number, or AUTOMATIC1111's piecewise
//! `"rate:step, rate:step, rate"` string (modules/textual_inversion/learn_schedule.py,
//! `LearnScheduleIterator`), parsed when the config is loaded so a bad rate is refused before a
//! worker starts.
//!
//! `"0.005:100, 1e-3:1000, 1e-5"` means 0.005 while fewer than 100 steps are done, then 1e-3 until
//! 1000, then 1e-5 to the end. An entry's end step `-1` (or no end step) means "to the end of
//! training". Empty entries are skipped, and whitespace around numbers is allowed, like Python's
//! `float()`/`int()`. Stricter than A1111, which silently accepts them, these are errors naming
//! the entry: entries after a to-the-end entry, end steps that are 0 or do not increase, more
//! than one `:`, and rates that are negative or not finite. A plain number must be positive.

use crate::error::{invalid, CommonError};

/// One A1111 schedule entry: `rate` until `end_step` optimizer steps are done (`None`: to the
/// end of training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleEntry {
    pub rate: f64,
    pub end_step: Option<u64>,
}

/// A parsed `train.lr`.
#[derive(Debug, Clone, PartialEq)]
pub enum LearningRate {
    /// A plain number: the rate that `train.lr_scheduler` shapes.
    Constant(f64),
    /// A1111's piecewise schedule (the scheduler is not applied to it).
    Piecewise(Vec<ScheduleEntry>),
}

impl LearningRate {
    /// Parses `train.lr`, refusing it with the field and the entry at fault.
    pub fn parse(text: &str) -> Result<Self, CommonError> {
        let trimmed = text.trim();
        if trimmed.contains(':') || trimmed.contains(',') {
            return parse_a1111_schedule(trimmed).map(Self::Piecewise);
        }
        let rate = parse_rate(trimmed, trimmed)?;
        if rate <= 0.0 {
            return Err(lr_error(format!(
                "`{trimmed}`: a learning rate must be a finite number > 0"
            )));
        }
        Ok(Self::Constant(rate))
    }
}

fn lr_error(message: impl Into<String>) -> CommonError {
    invalid("train.lr", message)
}

fn parse_rate(text: &str, entry: &str) -> Result<f64, CommonError> {
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
fn parse_a1111_schedule(text: &str) -> Result<Vec<ScheduleEntry>, CommonError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_rate_must_be_positive_and_finite() {
        assert_eq!(
            LearningRate::parse(" 1e-4 "),
            Ok(LearningRate::Constant(1e-4))
        );
        for text in ["0", "-1e-4", "NaN", "inf", "fast"] {
            let error = LearningRate::parse(text).unwrap_err().to_string();
            assert!(
                error.contains("train.lr") && error.contains(text),
                "`{text}`: {error}"
            );
        }
    }

    #[test]
    fn an_a1111_string_is_a_piecewise_schedule() {
        assert_eq!(
            LearningRate::parse("0.005:100, 1e-3:-1"),
            Ok(LearningRate::Piecewise(vec![
                ScheduleEntry {
                    rate: 0.005,
                    end_step: Some(100)
                },
                ScheduleEntry {
                    rate: 1e-3,
                    end_step: None
                },
            ]))
        );
        let error = LearningRate::parse("0.01:10, 0.001:5")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("train.lr") && error.contains("0.001:5"),
            "{error}"
        );
    }
}
