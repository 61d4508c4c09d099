//! The loss-curve PNG written beside the samples (docs/architecture.md §4): every `(step, loss)`
//! point drawn faint, and an exponential moving average (TensorBoard-style smoothing 0.9 with its
//! start-up bias corrected) drawn as a solid line on top, on a white background with a light grid.
//! When there is a validation loss, its points are drawn in orange, joined by a thin line, and a
//! small legend names the three series ("train", "smoothed", "validation").
//!
//! The axes are labelled: "step" along the bottom with integer ticks, "loss" up the left side with
//! ticks printed to as many digits as their spacing needs (`0.105`, `1.2e-4` for tiny losses); see
//! [`format_tick`]. The text is set in Hack Regular, embedded in the binary through the
//! `epaint_default_fonts` crate (egui's font bundle; Hack is © Source Foundry Authors under the
//! MIT License, with Bitstream Vera License terms for the glyphs derived from Bitstream Vera) and
//! rasterised by plotters' `ab_glyph` backend, so no system font is needed. Images smaller than
//! 200×120 pixels get no text: the numbers would not fit; they are in `metrics.jsonl` anyway.
//! Points whose loss is not finite are skipped.

use std::io::Cursor;
use std::ops::Range;
use std::sync::OnceLock;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Result, WorkerError};

/// Weight of the history in the moving average.
const SMOOTHING: f64 = 0.9;

/// Every point of the training loss, drawn faint.
const RAW_COLOUR: RGBColor = RGBColor(150, 180, 230);
/// The moving average, the solid line.
const LINE_COLOUR: RGBColor = RGBColor(20, 70, 180);
/// The validation loss.
const VALIDATION_COLOUR: RGBColor = RGBColor(230, 120, 20);
/// Tick labels, axis names and legend text.
const TEXT_COLOUR: RGBColor = RGBColor(30, 30, 30);
const GRID_COLOUR: RGBColor = RGBColor(225, 225, 225);
const AXIS_COLOUR: RGBColor = RGBColor(160, 160, 160);

/// The family name the embedded font is registered under in plotters' font table.
const FONT_FAMILY: &str = "arbor-loss-curve";
/// Below this width or height the plot has no text.
const MIN_TEXT_WIDTH: u32 = 200;
const MIN_TEXT_HEIGHT: u32 = 120;

fn curve_error(message: impl std::fmt::Display) -> WorkerError {
    WorkerError::Training(format!("loss curve: {message}"))
}

/// The moving average of a loss series, one value at a time, debiased like TensorBoard's
/// smoothing (the TensorBoard log's `loss/smoothed` continues it across sessions).
#[derive(Debug, Clone, Default)]
pub struct LossSmoother {
    average: f64,
    weight: f64,
}

impl LossSmoother {
    /// Adds the next loss; returns the average so far.
    pub fn push(&mut self, loss: f64) -> f64 {
        self.average = SMOOTHING * self.average + (1.0 - SMOOTHING) * loss;
        self.weight = SMOOTHING * self.weight + (1.0 - SMOOTHING);
        self.average / self.weight
    }
}

/// The moving average of `losses`, debiased like TensorBoard's smoothing.
pub fn smoothed(losses: &[f64]) -> Vec<f64> {
    let mut smoother = LossSmoother::default();
    losses.iter().map(|loss| smoother.push(*loss)).collect()
}

/// Registers the embedded font with plotters, once per process; false if it could not be
/// (the plot is then drawn without text rather than failing).
fn font_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT_FAMILY,
            FontStyle::Normal,
            epaint_default_fonts::HACK_REGULAR,
        )
        .is_ok()
    })
}

/// Evenly spaced "nice" tick values (1, 2 or 5 times a power of ten apart, and never closer than
/// `min_step`) inside `low..=high`, at most `max_count` of them, with their spacing. Empty when
/// the range is empty or not finite.
pub fn nice_ticks(low: f64, high: f64, max_count: usize, min_step: f64) -> (Vec<f64>, f64) {
    let span = high - low;
    if !(low.is_finite() && high.is_finite() && span.is_finite() && span > 0.0) || max_count == 0 {
        return (Vec::new(), 0.0);
    }
    let rough = (span / max_count.max(2) as f64).max(min_step);
    let mut power = 10f64.powi(rough.log10().floor() as i32);
    // Walk up 1, 2, 5, 10, … times `power` until the ticks fit; a few dozen steps at most.
    for _ in 0..64 {
        for factor in [1.0, 2.0, 5.0] {
            let step = factor * power;
            if step < min_step || step <= 0.0 {
                continue;
            }
            let first = (low / step).ceil();
            let last = (high / step).floor();
            if !(first.is_finite() && last.is_finite()) {
                return (Vec::new(), 0.0);
            }
            let count = last - first + 1.0;
            if count <= max_count as f64 {
                let ticks = (0..count.max(0.0) as usize)
                    .map(|index| (first + index as f64) * step)
                    .collect();
                return (ticks, step);
            }
        }
        power *= 10.0;
    }
    (Vec::new(), 0.0)
}

/// The label of the tick `value` on an axis whose ticks are `step` apart and whose largest
/// magnitude is `largest`: zero as `0`; fixed-point with just enough decimals to tell
/// neighbouring ticks apart (`0.105`, `2.5`, `120`) when `largest` lies in 0.001..1e6;
/// otherwise scientific, again with just enough mantissa digits (`1.2e-4`, `5e-5`, `3.0e7`).
pub fn format_tick(value: f64, step: f64, largest: f64) -> String {
    if !value.is_finite() {
        return String::new();
    }
    let step = if step.is_finite() && step > 0.0 {
        step
    } else {
        value.abs().max(f64::MIN_POSITIVE)
    };
    if value.abs() < step * 1e-6 {
        return "0".to_string();
    }
    // The decimal exponent of the step's leading digit (0.05 -> -2, 20 -> 1); the small nudge
    // keeps 0.1, 1e-4 and friends, whose logarithms are not exact, on the right side.
    let step_exponent = (step.log10() + 1e-9).floor() as i32;
    let largest = largest.abs().max(value.abs());
    if (1e-3..1e6).contains(&largest) {
        let decimals = (-step_exponent).max(0) as usize;
        format!("{value:.decimals$}")
    } else {
        let value_exponent = (value.abs().log10() + 1e-9).floor() as i32;
        let decimals = (value_exponent - step_exponent).clamp(0, 15) as usize;
        format!("{value:.decimals$e}")
    }
}

/// A linear axis over `low..high` whose grid lines and labels sit at precomputed ticks.
#[derive(Clone)]
struct TickedAxis {
    low: f64,
    high: f64,
    ticks: Vec<f64>,
    step: f64,
    largest: f64,
    integer: bool,
}

impl TickedAxis {
    fn new(low: f64, high: f64, max_ticks: usize, integer: bool) -> Self {
        let min_step = if integer { 1.0 } else { 0.0 };
        let (ticks, step) = nice_ticks(low, high, max_ticks, min_step);
        Self {
            low,
            high,
            ticks,
            step,
            largest: low.abs().max(high.abs()),
            integer,
        }
    }

    fn label(&self, value: f64) -> String {
        if self.integer && self.step >= 1000.0 && self.largest >= 10_000.0 {
            // Thousands of steps: 25k, 1050k.
            let label = format_tick(value / 1000.0, self.step / 1000.0, self.largest / 1000.0);
            if label == "0" {
                label
            } else {
                label + "k"
            }
        } else if self.integer && value.abs() < 1e15 {
            format!("{}", value.round() as i64)
        } else {
            format_tick(value, self.step, self.largest)
        }
    }

    fn labels(&self) -> Vec<String> {
        self.ticks.iter().map(|tick| self.label(*tick)).collect()
    }
}

impl Ranged for TickedAxis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.high - self.low;
        let fraction = if span > 0.0 {
            (value - self.low) / span
        } else {
            0.5
        };
        let pixel = f64::from(limit.0) + f64::from(limit.1 - limit.0) * fraction;
        // Far-off values still map somewhere harmless (plotters clips to the plotting area).
        pixel.round().clamp(-1e7, 1e7) as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Only the bold grid lines (which carry the labels); no light ones in between.
        if hint.max_num_points() == 0 || hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.low..self.high
    }
}

impl ValueFormatter<f64> for TickedAxis {
    fn format(value: &f64) -> String {
        format!("{value}")
    }

    fn format_ext(&self, value: &f64) -> String {
        self.label(*value)
    }
}

/// The sizes of the text and of the areas around the plot, in pixels.
struct Layout {
    font_size: u32,
    tick_size: u32,
    x_label_area: u32,
    y_label_area: u32,
    margin_top: u32,
    margin_right: u32,
    margin_other: u32,
}

fn finite_points(points: &[(u64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|(_, loss)| loss.is_finite())
        .map(|(step, loss)| (*step as f64, *loss))
        .collect()
}

/// The step and loss ranges shown: every point with a little room above and below.
fn plot_ranges(points: impl Iterator<Item = (f64, f64)> + Clone) -> ((f64, f64), (f64, f64)) {
    let (min_step, max_step) = points
        .clone()
        .fold((f64::MAX, f64::MIN), |(low, high), point| {
            (low.min(point.0), high.max(point.0))
        });
    let (min_loss, max_loss) = points.fold((f64::MAX, f64::MIN), |(low, high), point| {
        (low.min(point.1), high.max(point.1))
    });
    if min_step > max_step {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let steps = if max_step > min_step {
        (min_step, max_step)
    } else {
        (min_step - 0.5, max_step + 0.5)
    };
    let loss_margin = if max_loss > min_loss {
        (max_loss - min_loss) * 0.05
    } else {
        max_loss.abs().max(1.0) * 0.05
    };
    let losses = (min_loss - loss_margin, max_loss + loss_margin);
    let losses = if losses.1 - losses.0 > 0.0 && (losses.1 - losses.0).is_finite() {
        losses
    } else {
        (
            min_loss.max(f64::MIN / 4.0),
            max_loss.min(f64::MAX / 4.0) + 1.0,
        )
    };
    (steps, losses)
}

/// PNG bytes of the loss curve of `points`, `width` × `height` pixels.
pub fn render_loss_curve(points: &[(u64, f64)], width: u32, height: u32) -> Result<Vec<u8>> {
    render_loss_curve_with_validation(points, &[], width, height)
}

/// PNG bytes of the loss curve of `points` with the validation losses `validation` (may be
/// empty) drawn over it, `width` × `height` pixels.
pub fn render_loss_curve_with_validation(
    points: &[(u64, f64)],
    validation: &[(u64, f64)],
    width: u32,
    height: u32,
) -> Result<Vec<u8>> {
    if width < 16 || height < 16 {
        return Err(WorkerError::Input {
            name: "loss curve size".to_string(),
            message: format!("must be at least 16x16 pixels, got {width}x{height}"),
        });
    }
    let finite = finite_points(points);
    let validation = finite_points(validation);
    let ((min_step, max_step), (min_loss, max_loss)) =
        plot_ranges(finite.iter().chain(validation.iter()).copied());
    let text = width >= MIN_TEXT_WIDTH && height >= MIN_TEXT_HEIGHT && font_registered();
    let margin = (width.min(height) / 40).max(2);

    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(curve_error)?;

        let font_size = (width.min(height * 16 / 9) / 40).clamp(11, 30);
        let font = (FONT_FAMILY, font_size).into_font().color(&TEXT_COLOUR);
        let text_width = |label: &str| -> u32 {
            root.estimate_text_size(label, &font)
                .map(|(w, _)| w)
                .unwrap_or(font_size * label.len() as u32)
        };

        // Tick counts from a first guess at the plot's size, then the label areas from the
        // labels those ticks get.
        let (x_axis, y_axis, layout) = if text {
            let tick_size = (font_size / 3).max(3);
            let guess_width = width.saturating_sub(2 * margin + 5 * font_size + 3 * tick_size);
            let guess_height = height.saturating_sub(2 * margin + 3 * font_size + 2 * tick_size);
            let widest_step =
                text_width(&format!("{}", max_step.abs().max(min_step.abs()).round()))
                    .max(font_size);
            let x_count = (guess_width / (widest_step * 3 / 2 + font_size)).clamp(2, 10) as usize;
            let y_count = (guess_height / (font_size * 5 / 2)).clamp(2, 8) as usize;
            let x_axis = TickedAxis::new(min_step, max_step, x_count, true);
            let y_axis = TickedAxis::new(min_loss, max_loss, y_count, false);
            let widest = |labels: Vec<String>| labels.iter().map(|l| text_width(l)).max();
            let y_labels_width = widest(y_axis.labels()).unwrap_or(font_size);
            let x_labels_width = widest(x_axis.labels()).unwrap_or(font_size);
            let gap = (font_size / 2).max(2);
            let layout = Layout {
                font_size,
                tick_size,
                // plotters puts labels 2 tick lengths from the axis, the axis name at the edge.
                y_label_area: (2 * tick_size + y_labels_width + gap + font_size + gap / 2)
                    .min(width / 3),
                x_label_area: (2 * tick_size + font_size + gap + font_size + gap / 2)
                    .min(height / 3),
                margin_top: margin.max(font_size / 2 + 2),
                margin_right: margin.max(x_labels_width / 2 + 2),
                margin_other: margin,
            };
            (x_axis, y_axis, layout)
        } else {
            let layout = Layout {
                font_size,
                tick_size: 0,
                x_label_area: 0,
                y_label_area: 0,
                margin_top: margin,
                margin_right: margin,
                margin_other: margin,
            };
            (
                TickedAxis::new(min_step, max_step, 5, true),
                TickedAxis::new(min_loss, max_loss, 5, false),
                layout,
            )
        };

        let mut chart = ChartBuilder::on(&root)
            .margin_top(layout.margin_top)
            .margin_right(layout.margin_right)
            .margin_left(layout.margin_other)
            .margin_bottom(layout.margin_other)
            .x_label_area_size(layout.x_label_area)
            .y_label_area_size(layout.y_label_area)
            .build_cartesian_2d(x_axis, y_axis)
            .map_err(curve_error)?;
        {
            let mut mesh = chart.configure_mesh();
            mesh.light_line_style(WHITE)
                .bold_line_style(GRID_COLOUR)
                .axis_style(AXIS_COLOUR);
            if text {
                mesh.x_label_style(font.clone())
                    .y_label_style(font.clone())
                    .axis_desc_style(font.clone())
                    .set_all_tick_mark_size(layout.tick_size)
                    .x_desc("step")
                    .y_desc("loss");
            }
            mesh.draw().map_err(curve_error)?;
        }

        let legend_length = (layout.font_size * 3 / 2) as i32;
        let raw = chart
            .draw_series(LineSeries::new(finite.iter().copied(), RAW_COLOUR))
            .map_err(curve_error)?;
        raw.label("train").legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + legend_length, y)], RAW_COLOUR)
        });

        let losses: Vec<f64> = finite.iter().map(|point| point.1).collect();
        let average = smoothed(&losses);
        let line = LINE_COLOUR.stroke_width((width.min(height) / 200).max(2));
        let smooth = chart
            .draw_series(LineSeries::new(
                finite
                    .iter()
                    .zip(average)
                    .map(|(point, value)| (point.0, value)),
                line,
            ))
            .map_err(curve_error)?;
        smooth
            .label("smoothed")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + legend_length, y)], line));

        if !validation.is_empty() {
            let radius = (width.min(height) / 90).clamp(2, 6) as i32;
            let joining = VALIDATION_COLOUR.stroke_width(1);
            let dots = VALIDATION_COLOUR.filled();
            chart
                .draw_series(LineSeries::new(validation.iter().copied(), joining))
                .map_err(curve_error)?
                .label("validation")
                .legend(move |(x, y)| {
                    EmptyElement::at((x + legend_length / 2, y))
                        + PathElement::new(
                            vec![(-legend_length / 2, 0), (legend_length / 2, 0)],
                            joining,
                        )
                        + Circle::new((0, 0), radius, dots)
                });
            chart
                .draw_series(
                    validation
                        .iter()
                        .map(|point| Circle::new(*point, radius, dots)),
                )
                .map_err(curve_error)?;
            if text {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .margin(layout.font_size / 2)
                    .legend_area_size(legend_length as u32 + layout.font_size / 2)
                    .label_font(font.clone())
                    .background_style(WHITE.mix(0.85))
                    .border_style(AXIS_COLOUR)
                    .draw()
                    .map_err(curve_error)?;
            }
        }
        root.present().map_err(curve_error)?;
    }
    let image = image::RgbImage::from_raw(width, height, buffer)
        .ok_or_else(|| curve_error("bitmap size mismatch"))?;
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|error| curve_error(format!("png encoding failed: {error}")))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_ticks_get_the_decimals_their_spacing_needs() {
        assert_eq!(format_tick(0.1234, 0.001, 0.2), "0.123");
        assert_eq!(format_tick(0.105, 0.005, 0.2), "0.105");
        assert_eq!(format_tick(0.15, 0.05, 0.3), "0.15");
        assert_eq!(format_tick(0.3, 0.1, 1.2), "0.3");
        assert_eq!(format_tick(0.30000000000000004, 0.1, 1.2), "0.3");
        assert_eq!(format_tick(2.5, 0.5, 3.0), "2.5");
        assert_eq!(format_tick(2.0, 0.5, 3.0), "2.0");
        assert_eq!(format_tick(120.0, 20.0, 200.0), "120");
        assert_eq!(format_tick(2.30255, 0.00005, 2.31), "2.30255");
        assert_eq!(format_tick(0.0, 0.2, 1.0), "0");
        assert_eq!(format_tick(-0.4, 0.2, 1.0), "-0.4");
        assert_eq!(format_tick(0.002, 0.0005, 0.003), "0.0020");
    }

    #[test]
    fn tiny_and_huge_ticks_are_scientific() {
        assert_eq!(format_tick(1.2e-4, 2e-5, 1.5e-4), "1.2e-4");
        assert_eq!(format_tick(1e-4, 2e-5, 1.5e-4), "1.0e-4");
        assert_eq!(format_tick(8e-5, 2e-5, 1.5e-4), "8e-5");
        assert_eq!(format_tick(0.0, 2e-5, 1.5e-4), "0");
        assert_eq!(format_tick(3e7, 1e7, 5e7), "3e7");
        assert_eq!(format_tick(3.5e7, 5e6, 5e7), "3.5e7");
        assert_eq!(format_tick(f64::NAN, 0.1, 1.0), "");
    }

    #[test]
    fn nice_ticks_are_round_and_inside_the_range() {
        let (ticks, step) = nice_ticks(0.03, 1.02, 6, 0.0);
        assert_eq!(step, 0.2);
        assert_eq!(ticks.len(), 5);
        assert!((ticks[0] - 0.2).abs() < 1e-12 && (ticks[4] - 1.0).abs() < 1e-12);
        let (ticks, step) = nice_ticks(1.0, 300.0, 8, 1.0);
        assert_eq!(step, 50.0);
        assert_eq!(ticks, vec![50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        // Integer axes never get fractional steps.
        let (ticks, step) = nice_ticks(4.5, 5.5, 10, 1.0);
        assert_eq!((ticks, step), (vec![5.0], 1.0));
        let (ticks, _) = nice_ticks(1.3e-4, 1.9e-4, 5, 0.0);
        assert!(!ticks.is_empty() && ticks.len() <= 5);
        assert!(ticks.iter().all(|t| (1.3e-4..=1.9e-4).contains(t)));
        assert!(nice_ticks(1.0, 1.0, 5, 0.0).0.is_empty());
        assert!(nice_ticks(0.0, f64::INFINITY, 5, 0.0).0.is_empty());
        assert!(nice_ticks(0.0, 1.0, 0, 0.0).0.is_empty());
    }

    #[test]
    fn step_labels_are_integers_and_thousands_get_a_k() {
        let axis = TickedAxis::new(1.0, 300.0, 8, true);
        assert_eq!(axis.labels(), ["50", "100", "150", "200", "250", "300"]);
        let axis = TickedAxis::new(1_000_000.0, 1_099_500.0, 5, true);
        assert_eq!(axis.labels(), ["1000k", "1020k", "1040k", "1060k", "1080k"]);
        let axis = TickedAxis::new(0.0, 12_000.0, 4, true);
        assert_eq!(axis.labels(), ["0", "5k", "10k"]);
        let axis = TickedAxis::new(4.5, 5.5, 10, true);
        assert_eq!(axis.labels(), ["5"]);
    }

    #[test]
    fn neighbouring_tick_labels_differ() {
        for (low, high) in [
            (0.031, 0.187),
            (1.2e-4, 1.9e-4),
            (2.3021, 2.3029),
            (0.0, 7.5),
        ] {
            for count in 2..9 {
                let (ticks, step) = nice_ticks(low, high, count, 0.0);
                let largest = low.abs().max(high.abs());
                let labels: Vec<String> = ticks
                    .iter()
                    .map(|t| format_tick(*t, step, largest))
                    .collect();
                for pair in labels.windows(2) {
                    assert_ne!(pair[0], pair[1], "{low}..{high} with {count}: {labels:?}");
                }
            }
        }
    }
}
