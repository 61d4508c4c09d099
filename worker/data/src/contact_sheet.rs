//! Contact sheets for `arbor preview`: loaded batches drawn as a PNG grid, one row per batch and
//! one cell per item, each cell labelled with a tiny built-in bitmap font (no font files), so a
//! user sees exactly what the model will see after cover-resize and crop.

use std::path::Path;

use image::{imageops, Rgb, RgbImage};

use crate::batch_loader::Batch;

/// The label font: 3x5 glyphs drawn at this scale.
const GLYPH_SCALE: u32 = 2;
const GLYPH_WIDTH: u32 = 3;
const GLYPH_HEIGHT: u32 = 5;
/// Height of the label band above each cell's image.
pub const LABEL_HEIGHT: u32 = GLYPH_HEIGHT * GLYPH_SCALE + 4;
const GAP: u32 = 4;

/// Rows of a glyph, three bits per row, most significant bit leftmost.
fn glyph(character: char) -> [u8; 5] {
    match character {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'B' => [6, 5, 6, 5, 6],
        'C' => [7, 4, 4, 4, 7],
        '#' => [5, 7, 5, 7, 5],
        'x' => [0, 5, 2, 5, 0],
        '!' => [2, 2, 2, 0, 2],
        _ => [0, 0, 0, 0, 0],
    }
}

/// Draws `text` (digits, `B`, `C`, `#`, `x`, `!`, space) with its top-left corner at (x, y),
/// within `max_width` pixels: at double size when it fits, else at single size, else cut.
pub fn draw_label(
    canvas: &mut RgbImage,
    text: &str,
    x: u32,
    y: u32,
    max_width: u32,
    colour: Rgb<u8>,
) {
    let length = text.chars().count() as u32;
    let scale = if length * (GLYPH_WIDTH + 1) * GLYPH_SCALE <= max_width {
        GLYPH_SCALE
    } else {
        1
    };
    let fitting = (max_width / ((GLYPH_WIDTH + 1) * scale)) as usize;
    for (index, character) in text.chars().take(fitting).enumerate() {
        let left = x + index as u32 * (GLYPH_WIDTH + 1) * scale;
        for (row, bits) in glyph(character).iter().enumerate() {
            for column in 0..GLYPH_WIDTH {
                if bits & (1 << (GLYPH_WIDTH - 1 - column)) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = left + column * scale + dx;
                        let py = y + row as u32 * scale + dy;
                        if px < canvas.width() && py < canvas.height() {
                            canvas.put_pixel(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

/// Slot `index` of a batch as an RGB8 image (from f32 CHW in [-1, 1]).
pub fn batch_item_image(batch: &Batch, index: usize) -> RgbImage {
    let (width, height) = (batch.bucket_width, batch.bucket_height);
    let plane = (width * height) as usize;
    let values = batch.item_pixels(index);
    let to_byte = |value: f32| ((value.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    RgbImage::from_fn(width, height, |x, y| {
        let offset = (y * width + x) as usize;
        Rgb([
            to_byte(values[offset]),
            to_byte(values[plane + offset]),
            to_byte(values[2 * plane + offset]),
        ])
    })
}

/// One row of the sheet: a batch and the label of each of its cells.
pub struct SheetRow<'a> {
    pub batch: &'a Batch,
    pub labels: Vec<String>,
}

/// Lays out rows of cells `cell_size` pixels on their longer side (images keep their aspect
/// ratio), each under its label, on a light gray background.
pub fn render_sheet(rows: &[SheetRow<'_>], cell_size: u32) -> RgbImage {
    let columns = rows.iter().map(|row| row.batch.len()).max().unwrap_or(0) as u32;
    let cell_height = cell_size + LABEL_HEIGHT;
    let width = GAP + columns.max(1) * (cell_size + GAP);
    let height = GAP + (rows.len() as u32).max(1) * (cell_height + GAP);
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([230, 230, 230]));
    for (row_index, row) in rows.iter().enumerate() {
        let top = GAP + row_index as u32 * (cell_height + GAP);
        for slot in 0..row.batch.len() {
            let left = GAP + slot as u32 * (cell_size + GAP);
            if let Some(label) = row.labels.get(slot) {
                draw_label(
                    &mut canvas,
                    label,
                    left + 1,
                    top + 2,
                    cell_size - 1,
                    Rgb([0, 0, 0]),
                );
            }
            let image = batch_item_image(row.batch, slot);
            let longer = image.width().max(image.height());
            let scale = f64::from(cell_size) / f64::from(longer);
            let thumb_width = ((f64::from(image.width()) * scale).round() as u32).max(1);
            let thumb_height = ((f64::from(image.height()) * scale).round() as u32).max(1);
            // Not the training path: a preview thumbnail, so image's resize is fine here.
            let thumbnail = imageops::resize(
                &image,
                thumb_width,
                thumb_height,
                imageops::FilterType::Triangle,
            );
            imageops::replace(
                &mut canvas,
                &thumbnail,
                i64::from(left),
                i64::from(top + LABEL_HEIGHT),
            );
        }
    }
    canvas
}

/// Writes the sheet as PNG.
pub fn save_png(canvas: &RgbImage, path: &Path) -> Result<(), String> {
    canvas
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|error| format!("cannot write {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_loader::ItemCrop;

    #[test]
    fn sheet_places_each_item_under_its_label() {
        let crop = |id| ItemCrop {
            id,
            loaded_id: Some(id),
            original_width: 8,
            original_height: 4,
            resized_width: 8,
            resized_height: 4,
            crop_x: 0,
            crop_y: 0,
        };
        // Two 8x4 items: black, then white.
        let mut pixels = vec![-1.0f32; 3 * 32];
        pixels.extend(vec![1.0f32; 3 * 32]);
        let batch = Batch {
            bucket_width: 8,
            bucket_height: 4,
            pixels,
            items: vec![crop(1), crop(2)],
            failures: Vec::new(),
        };
        let rows = [SheetRow {
            batch: &batch,
            labels: vec!["B1 #1".to_owned(), "B1 #2".to_owned()],
        }];
        let sheet = render_sheet(&rows, 16);
        assert_eq!(sheet.width(), GAP + 2 * (16 + GAP));
        assert_eq!(sheet.height(), GAP + 16 + LABEL_HEIGHT + GAP);
        let image_top = GAP + LABEL_HEIGHT;
        assert_eq!(sheet.get_pixel(GAP + 8, image_top + 4).0, [0, 0, 0]);
        assert_eq!(
            sheet.get_pixel(2 * GAP + 16 + 8, image_top + 4).0,
            [255, 255, 255]
        );
        // Below the 16x8 thumbnail is background; the label drew black pixels in its band.
        assert_eq!(sheet.get_pixel(GAP + 8, image_top + 12).0, [230, 230, 230]);
        let label_band_has_ink = (0..LABEL_HEIGHT)
            .flat_map(|y| (GAP..GAP + 16).map(move |x| (x, GAP + y)))
            .any(|(x, y)| sheet.get_pixel(x, y).0 == [0, 0, 0]);
        assert!(label_band_has_ink);
    }
}
