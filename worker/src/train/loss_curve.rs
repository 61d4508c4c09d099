//! The loss-curve PNG written beside the samples (docs/architecture.md §4): every `(step, loss)`
//! point drawn faint, and an exponential moving average (TensorBoard-style smoothing 0.9 with its
//! start-up bias corrected) drawn as a solid line on top, on a white background with a light grid.
//!
//! The plot has no text (no axis labels or numbers): plotters needs a font for text, and this
//! crate embeds none. The numbers are in `metrics.jsonl`; the picture is for the trend.
//! Points whose step or loss is not finite are skipped.

use std::io::Cursor;

use plotters::prelude::*;

use crate::error::{Result, WorkerError};

/// Weight of the history in the moving average.
const SMOOTHING: f64 = 0.9;

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

/// PNG bytes of the loss curve of `points`, `width` × `height` pixels.
pub fn render_loss_curve(points: &[(u64, f64)], width: u32, height: u32) -> Result<Vec<u8>> {
    if width < 16 || height < 16 {
        return Err(WorkerError::Input {
            name: "loss curve size".to_string(),
            message: format!("must be at least 16x16 pixels, got {width}x{height}"),
        });
    }
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, loss)| loss.is_finite())
        .map(|(step, loss)| (*step as f64, *loss))
        .collect();
    let mut buffer = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(curve_error)?;
        let (min_step, max_step) = finite
            .iter()
            .fold((f64::MAX, f64::MIN), |(low, high), point| {
                (low.min(point.0), high.max(point.0))
            });
        let (min_loss, max_loss) = finite
            .iter()
            .fold((f64::MAX, f64::MIN), |(low, high), point| {
                (low.min(point.1), high.max(point.1))
            });
        let (min_step, max_step) = if finite.is_empty() {
            (0.0, 1.0)
        } else if max_step > min_step {
            (min_step, max_step)
        } else {
            (min_step - 0.5, max_step + 0.5)
        };
        let loss_margin = if finite.is_empty() {
            1.0
        } else if max_loss > min_loss {
            (max_loss - min_loss) * 0.05
        } else {
            max_loss.abs().max(1.0) * 0.05
        };
        let (min_loss, max_loss) = if finite.is_empty() {
            (0.0, 1.0)
        } else {
            (min_loss - loss_margin, max_loss + loss_margin)
        };
        let margin = (width.min(height) / 40).max(2);
        let mut chart = ChartBuilder::on(&root)
            .margin(margin)
            .build_cartesian_2d(min_step..max_step, min_loss..max_loss)
            .map_err(curve_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(5)
            .y_label_formatter(&|_| String::new())
            .light_line_style(WHITE)
            .bold_line_style(RGBColor(225, 225, 225))
            .axis_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(curve_error)?;
        let faint = RGBColor(150, 180, 230);
        chart
            .draw_series(LineSeries::new(finite.iter().copied(), faint))
            .map_err(curve_error)?;
        let losses: Vec<f64> = finite.iter().map(|point| point.1).collect();
        let average = smoothed(&losses);
        let line = RGBColor(20, 70, 180).stroke_width((width.min(height) / 200).max(2));
        chart
            .draw_series(LineSeries::new(
                finite
                    .iter()
                    .zip(average)
                    .map(|(point, value)| (point.0, value)),
                line,
            ))
            .map_err(curve_error)?;
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
