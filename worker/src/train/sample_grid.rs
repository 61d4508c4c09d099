//! A grid of sample images as one PNG: `images` `[N, 3, H, W]` with values in `[-1, 1]` (any
//! device and floating kind), `columns` per row, left to right then top to bottom, no gaps;
//! cells of a last, incomplete row stay black. Values map to bytes as diffusers'
//! `VaeImageProcessor.postprocess` + `numpy_to_pil` do in fp32: `(x / 2 + 0.5).clamp(0, 1)`,
//! then `(· × 255).round()`.

use std::io::Cursor;

use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};

fn grid_error(message: impl Into<String>) -> WorkerError {
    WorkerError::Input {
        name: "sample images".to_string(),
        message: message.into(),
    }
}

/// The images as an RGB PNG grid, `columns` images per row (fewer when there are fewer images).
pub fn images_to_grid_png(images: &Tensor, columns: usize) -> Result<Vec<u8>> {
    if columns == 0 {
        return Err(WorkerError::Input {
            name: "columns".to_string(),
            message: "must be at least 1".to_string(),
        });
    }
    let size = images.size();
    let [count, channels, height, width] = size.as_slice() else {
        return Err(grid_error(format!(
            "expected a [N, 3, H, W] tensor, got shape {size:?}"
        )));
    };
    let (count, height, width) = (*count as usize, *height as usize, *width as usize);
    if *channels != 3 || count == 0 || height == 0 || width == 0 {
        return Err(grid_error(format!(
            "expected a [N, 3, H, W] tensor with N, H, W >= 1, got shape {size:?}"
        )));
    }
    let bytes_tensor = tch::no_grad(|| {
        images
            .f_to_device(Device::Cpu)
            .and_then(|cpu| cpu.f_to_kind(Kind::Float))
            .and_then(|float| float.f_div_scalar(2.0))
            .and_then(|halved| halved.f_add_scalar(0.5))
            .and_then(|shifted| shifted.f_clamp(0.0, 1.0))
            .and_then(|unit| unit.f_mul_scalar(255.0))
            .and_then(|scaled| scaled.f_round())
            .and_then(|rounded| rounded.f_to_kind(Kind::Uint8))
            .and_then(|bytes| bytes.f_permute([0, 2, 3, 1]))
            .and_then(|channels_last| channels_last.f_contiguous())
    })
    .map_err(WorkerError::torch("converting sample images to bytes"))?;
    let pixels = Vec::<u8>::try_from(&bytes_tensor.flatten(0, -1))
        .map_err(WorkerError::torch("reading sample image bytes"))?;
    let grid_columns = columns.min(count);
    let grid_rows = count.div_ceil(columns);
    let grid_width = grid_columns * width;
    let grid_height = grid_rows * height;
    let mut grid = vec![0u8; grid_width * grid_height * 3];
    let row_bytes = width * 3;
    for index in 0..count {
        let (cell_row, cell_column) = (index / columns, index % columns);
        let image = &pixels[index * height * row_bytes..(index + 1) * height * row_bytes];
        for y in 0..height {
            let target = ((cell_row * height + y) * grid_width + cell_column * width) * 3;
            grid[target..target + row_bytes]
                .copy_from_slice(&image[y * row_bytes..(y + 1) * row_bytes]);
        }
    }
    let buffer = image::RgbImage::from_raw(grid_width as u32, grid_height as u32, grid)
        .ok_or_else(|| grid_error("grid buffer size mismatch"))?;
    let mut png = Vec::new();
    buffer
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|error| grid_error(format!("png encoding failed: {error}")))?;
    Ok(png)
}
