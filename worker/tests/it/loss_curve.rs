//! `loss.png` (`worker/src/train/loss_curve.rs`): tick labels beside the axes, none on small
//! images, the smoothed line falling with the loss, the validation series only when given.

use arbor_worker::train::loss_curve::{render_loss_curve, render_loss_curve_with_validation};

const LINE: [u8; 3] = [20, 70, 180];
const VALIDATION: [u8; 3] = [230, 120, 20];
const AXIS: [u8; 3] = [160, 160, 160];

fn decode_loss_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a valid png")
        .to_rgb8()
}

/// A falling, slightly noisy loss series over steps 1..=count.
fn falling_losses(count: u64) -> Vec<(u64, f64)> {
    (1..=count)
        .map(|step| {
            (
                step,
                1.0 / (1.0 + step as f64 * 0.02) + 0.05 * ((step * 7919 % 97) as f64 / 97.0),
            )
        })
        .collect()
}

/// Text pixels: dark grey, which no line, grid or axis colour of the plot is.
fn is_text(pixel: &image::Rgb<u8>) -> bool {
    pixel.0.iter().all(|channel| *channel < 128)
}

fn count_in(
    image: &image::RgbImage,
    columns: std::ops::Range<u32>,
    rows: std::ops::Range<u32>,
    test: impl Fn(&image::Rgb<u8>) -> bool,
) -> usize {
    image
        .enumerate_pixels()
        .filter(|(x, y, pixel)| columns.contains(x) && rows.contains(y) && test(pixel))
        .count()
}

/// The column of the y axis and the row of the x axis: the longest runs of the axis colour.
fn axes(image: &image::RgbImage) -> (u32, u32) {
    let (width, height) = image.dimensions();
    let column = (0..width)
        .filter(|x| {
            (0..height)
                .filter(|y| image.get_pixel(*x, *y).0 == AXIS)
                .count()
                > height as usize / 2
        })
        .min()
        .expect("a y axis");
    let row = (0..height)
        .filter(|y| {
            (0..width)
                .filter(|x| image.get_pixel(*x, *y).0 == AXIS)
                .count()
                > width as usize / 2
        })
        .max()
        .expect("an x axis");
    (column, row)
}

fn count_colour(image: &image::RgbImage, colour: [u8; 3]) -> usize {
    image.pixels().filter(|pixel| pixel.0 == colour).count()
}

#[test]
fn loss_curve_has_tick_labels_left_and_below() {
    let image = decode_loss_png(&render_loss_curve(&falling_losses(300), 640, 360).unwrap());
    assert_eq!(image.dimensions(), (640, 360));
    let (axis_x, axis_y) = axes(&image);
    assert!(
        axis_x >= 30 && axis_y <= 330,
        "no room for labels: axes at {axis_x}, {axis_y}"
    );
    // The loss numbers and the name "loss" sit left of the y axis; the step numbers and "step"
    // below the x axis.
    let left = count_in(&image, 0..axis_x, 0..360, is_text);
    let bottom = count_in(&image, 0..640, axis_y + 1..360, is_text);
    assert!(left > 100, "only {left} text pixels left of the plot");
    assert!(bottom > 100, "only {bottom} text pixels below the plot");
    // The numbers are spread along the axes, not in one clump: text in each third.
    for third in 0..3 {
        let rows = axis_y * third / 3..axis_y * (third + 1) / 3;
        let columns =
            axis_x + (640 - axis_x) * third / 3..axis_x + (640 - axis_x) * (third + 1) / 3;
        assert!(
            count_in(&image, 0..axis_x, rows.clone(), is_text) > 10,
            "left, rows {rows:?}"
        );
        assert!(
            count_in(&image, columns.clone(), axis_y + 1..360, is_text) > 10,
            "below, columns {columns:?}"
        );
    }
    // Without validation there is no legend, so no text inside the plot.
    let inside = count_in(&image, axis_x + 1..640, 0..axis_y, is_text);
    assert_eq!(inside, 0, "text pixels inside the plot");
}

#[test]
fn small_loss_curves_have_no_text() {
    for (width, height) in [(199, 360), (640, 119), (200, 100), (16, 16), (40, 300)] {
        let png = render_loss_curve_with_validation(
            &falling_losses(50),
            &[(10, 0.5), (40, 0.4)],
            width,
            height,
        )
        .unwrap();
        let image = decode_loss_png(&png);
        assert_eq!(image.dimensions(), (width, height));
        let text = count_in(&image, 0..width, 0..height, is_text);
        assert_eq!(text, 0, "{width}x{height} has {text} text pixels");
    }
}

#[test]
fn loss_curve_average_line_falls_from_left_to_right() {
    let mut points = falling_losses(300);
    points.push((301, f64::NAN));
    points.push((302, f64::INFINITY));
    let image = decode_loss_png(&render_loss_curve(&points, 640, 360).unwrap());
    let line_pixels = count_colour(&image, LINE);
    assert!(
        line_pixels > 300,
        "only {line_pixels} pixels of the average line"
    );
    let columns: Vec<u32> = image
        .enumerate_pixels()
        .filter(|(_, _, pixel)| pixel.0 == LINE)
        .map(|(x, _, _)| x)
        .collect();
    let (first, last) = (
        *columns.iter().min().unwrap(),
        *columns.iter().max().unwrap(),
    );
    assert!(
        last - first > 400,
        "the line spans only columns {first}..{last}"
    );
    let mean_row = |range: std::ops::Range<u32>| {
        let rows: Vec<u32> = image
            .enumerate_pixels()
            .filter(|(x, _, pixel)| range.contains(x) && pixel.0 == LINE)
            .map(|(_, y, _)| y)
            .collect();
        assert!(!rows.is_empty(), "no line pixels in columns {range:?}");
        rows.iter().sum::<u32>() as f64 / rows.len() as f64
    };
    let tenth = (last - first) / 10;
    assert!(mean_row(first..first + tenth) < mean_row(last - tenth..last + 1));
}

#[test]
fn validation_loss_is_drawn_only_when_given() {
    let points = falling_losses(300);
    let without = decode_loss_png(&render_loss_curve(&points, 640, 360).unwrap());
    assert_eq!(count_colour(&without, VALIDATION), 0);
    let empty =
        decode_loss_png(&render_loss_curve_with_validation(&points, &[], 640, 360).unwrap());
    assert_eq!(count_colour(&empty, VALIDATION), 0);
    assert_eq!(empty, without);

    let validation = [(50, 0.8), (150, 0.6), (250, 0.5), (260, f64::NAN)];
    let with = decode_loss_png(
        &render_loss_curve_with_validation(&points, &validation, 640, 360).unwrap(),
    );
    let orange = count_colour(&with, VALIDATION);
    assert!(orange > 30, "only {orange} validation pixels");
    // The legend adds text inside the plot area, upper right.
    let (axis_x, axis_y) = axes(&with);
    let legend_text = count_in(&with, axis_x + 1..640, 0..axis_y, is_text);
    assert!(legend_text > 50, "only {legend_text} legend text pixels");
    // The training line is still there.
    assert!(count_colour(&with, LINE) > 300);
}

#[test]
fn empty_and_non_finite_series_still_render_axes() {
    for points in [
        vec![],
        vec![(1u64, f64::NAN), (2, f64::INFINITY)],
        vec![(5, 0.3)],
    ] {
        for validation in [vec![], vec![(3u64, f64::NAN)], vec![(4, 0.25)]] {
            let png = render_loss_curve_with_validation(&points, &validation, 640, 360).unwrap();
            let image = decode_loss_png(&png);
            assert_eq!(image.dimensions(), (640, 360));
            let (axis_x, axis_y) = axes(&image);
            let left = count_in(&image, 0..axis_x, 0..360, is_text);
            let bottom = count_in(&image, 0..640, axis_y + 1..360, is_text);
            assert!(
                left > 50 && bottom > 50,
                "{points:?}/{validation:?}: {left}, {bottom}"
            );
        }
    }
    assert!(render_loss_curve(&[(1, 0.1)], 15, 100).is_err());
    assert!(render_loss_curve_with_validation(&[(1, 0.1)], &[], 100, 0).is_err());
}

#[test]
fn tiny_losses_and_large_steps_render() {
    let points: Vec<(u64, f64)> = (0..200)
        .map(|index| (1_000_000 + index * 500, 2e-4 - index as f64 * 5e-7))
        .collect();
    for (width, height) in [(640, 360), (900, 500), (200, 120)] {
        let image = decode_loss_png(&render_loss_curve(&points, width, height).unwrap());
        assert_eq!(image.dimensions(), (width, height));
        assert!(count_colour(&image, LINE) > 100);
    }
}
