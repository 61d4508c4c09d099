//! Fitting an upright image to its bucket (docs/architecture.md §2 "Image fit"): cover-scale
//! keeping the aspect ratio, crop at the `(seed, epoch, item)` offset, output f32 CHW in [-1, 1].
//!
//! The geometry (scale, resized size, offset range, offset) is `arbor-common`'s. The resize is
//! fast_image_resize's antialiased Lanczos3 convolution, applied only to the source region that
//! maps onto the crop: resizing the whole image to the resized size and then cropping computes
//! the same pixels (the convolution of each output pixel reads the same source pixels, edge
//! clamping aside), but costs the whole resized area.
//!
//! The source may have been decoded at a reduced scale (libjpeg-turbo's DCT-domain
//! downscaling, [`crate::decode::DecodedImage`]): the geometry and the crop box are always those
//! of the full-resolution image, and the box is mapped into the reduced image by the decode
//! scale (a reduced pixel `i` covers full-resolution pixels `[i / s, (i + 1) / s)`), so the
//! output geometry is the same whichever scale was decoded.

use std::cell::RefCell;

use arbor_common::crop::{CoverGeometry, CropOffset};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::decode::DecodedImage;

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Resizes and crops `decoded` into `bucket_width x bucket_height` RGB8 bytes; `geometry` is
/// the cover geometry of its full-resolution size.
pub fn fit_rgb8(
    decoded: &DecodedImage,
    geometry: &CoverGeometry,
    offset: CropOffset,
    bucket_width: u32,
    bucket_height: u32,
) -> Result<Vec<u8>, String> {
    let image = &decoded.image;
    let (width, height) = (image.width, image.height);
    if decoded.scale.is_full()
        && geometry.resized_width == width
        && geometry.resized_height == height
    {
        return Ok(copy_crop(image, offset, bucket_width, bucket_height));
    }
    let source = ImageRef::new(width, height, &image.pixels, PixelType::U8x3)
        .map_err(|error| format!("invalid source buffer: {error}"))?;
    let mut destination = Image::new(bucket_width, bucket_height, PixelType::U8x3);
    let (full_left, full_top, full_crop_width, full_crop_height) = source_crop_box(
        decoded.full_width,
        decoded.full_height,
        geometry,
        offset,
        bucket_width,
        bucket_height,
    );
    let scale = decoded.scale.as_f64();
    let left = full_left * scale;
    let top = full_top * scale;
    let crop_width = (full_crop_width * scale).min(f64::from(width) - left);
    let crop_height = (full_crop_height * scale).min(f64::from(height) - top);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3))
        .crop(left, top, crop_width, crop_height);
    RESIZER
        .with(|resizer| {
            resizer
                .borrow_mut()
                .resize(&source, &mut destination, &options)
        })
        .map_err(|error| format!("resize failed: {error}"))?;
    Ok(destination.into_vec())
}

/// The crop rectangle mapped back into source coordinates, `(left, top, width, height)`, with
/// the per-axis scales of the resized image (rounding and the `max` of the cover geometry make
/// them differ slightly from the cover scale).
pub fn source_crop_box(
    width: u32,
    height: u32,
    geometry: &CoverGeometry,
    offset: CropOffset,
    bucket_width: u32,
    bucket_height: u32,
) -> (f64, f64, f64, f64) {
    let scale_x = f64::from(geometry.resized_width) / f64::from(width);
    let scale_y = f64::from(geometry.resized_height) / f64::from(height);
    // (offset + bucket) / scale <= resized / scale = source size exactly; clamp away the
    // floating-point excess so the box never leaves the source.
    let left = f64::from(offset.x) / scale_x;
    let top = f64::from(offset.y) / scale_y;
    let crop_width = (f64::from(bucket_width) / scale_x).min(f64::from(width) - left);
    let crop_height = (f64::from(bucket_height) / scale_y).min(f64::from(height) - top);
    (left, top, crop_width, crop_height)
}

fn copy_crop(
    image: &crate::decode::RgbImage,
    offset: CropOffset,
    bucket_width: u32,
    bucket_height: u32,
) -> Vec<u8> {
    let row_bytes = bucket_width as usize * 3;
    let mut out = Vec::with_capacity(row_bytes * bucket_height as usize);
    for row in 0..bucket_height as usize {
        let start = ((offset.y as usize + row) * image.width as usize + offset.x as usize) * 3;
        out.extend_from_slice(&image.pixels[start..start + row_bytes]);
    }
    out
}

/// Writes interleaved RGB8 as planar f32 CHW in [-1, 1] (`v / 127.5 - 1`) into `out`, which
/// holds `3 * width * height` values.
///
/// Pixels go 16 at a time through fixed-size blocks the compiler vectorises (the IEEE division
/// gives the same values bit for bit whatever the vector width), with AVX2 where the CPU has it.
pub fn rgb8_to_chw_f32(rgb: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { rgb8_to_chw_f32_avx2(rgb, out) };
        return;
    }
    rgb8_to_chw_f32_blocks(rgb, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rgb8_to_chw_f32_avx2(rgb: &[u8], out: &mut [f32]) {
    rgb8_to_chw_f32_blocks(rgb, out);
}

#[inline(always)]
fn rgb8_to_chw_f32_blocks(rgb: &[u8], out: &mut [f32]) {
    const BLOCK: usize = 16;
    let convert = |value: u8| f32::from(value) / 127.5 - 1.0;
    let plane = rgb.len() / 3;
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    let mut pixels = rgb.chunks_exact(3 * BLOCK);
    let mut reds = red.chunks_exact_mut(BLOCK);
    let mut greens = green.chunks_exact_mut(BLOCK);
    let mut blues = blue.chunks_exact_mut(BLOCK);
    for (((block, red), green), blue) in (&mut pixels)
        .zip(&mut reds)
        .zip(&mut greens)
        .zip(&mut blues)
    {
        for index in 0..BLOCK {
            red[index] = convert(block[3 * index]);
            green[index] = convert(block[3 * index + 1]);
            blue[index] = convert(block[3 * index + 2]);
        }
    }
    for (((pixel, red), green), blue) in pixels
        .remainder()
        .chunks_exact(3)
        .zip(reds.into_remainder())
        .zip(greens.into_remainder())
        .zip(blues.into_remainder())
    {
        *red = convert(pixel[0]);
        *green = convert(pixel[1]);
        *blue = convert(pixel[2]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::RgbImage;
    use arbor_common::crop::cover_geometry;
    use image::metadata::Orientation;

    fn gradient(width: u32, height: u32) -> DecodedImage {
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                pixels.extend_from_slice(&[(x % 256) as u8, (y % 256) as u8, 7]);
            }
        }
        DecodedImage::full(RgbImage {
            width,
            height,
            pixels,
            orientation: Orientation::NoTransforms,
        })
    }

    #[test]
    fn same_size_crop_is_an_exact_copy_at_the_offset() {
        let image = gradient(100, 40);
        let geometry = cover_geometry(1, 100, 40, 64, 40).unwrap();
        let out = fit_rgb8(&image, &geometry, CropOffset { x: 17, y: 0 }, 64, 40).unwrap();
        assert_eq!(&out[..3], &[17, 0, 7]);
        let last = out.len() - 3;
        assert_eq!(&out[last..], &[17 + 63, 39, 7]);
    }

    #[test]
    fn downscaled_crop_lands_on_the_scaled_offset() {
        // A 200x100 horizontal gradient in a 64x64 bucket: scale 0.64, resized 128x64; the crop
        // at x=40 of the resized image starts at source x=62.5.
        let image = gradient(200, 100);
        let geometry = cover_geometry(1, 200, 100, 64, 64).unwrap();
        assert_eq!((geometry.resized_width, geometry.resized_height), (128, 64));
        let out = fit_rgb8(&image, &geometry, CropOffset { x: 40, y: 0 }, 64, 64).unwrap();
        // Output column c covers source x = (40 + c + 0.5) / 0.64 - 0.5.
        for column in [5u32, 30, 60] {
            let expected = (f64::from(40 + column) + 0.5) / 0.64 - 0.5;
            let got = f64::from(out[(32 * 64 + column as usize) * 3]);
            assert!(
                (got - expected).abs() < 1.0,
                "column {column}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn crop_boxes_never_leave_the_source_through_rounding() {
        for width in (1..4000).step_by(37) {
            for height in (1..4000).step_by(41) {
                for (bucket_width, bucket_height) in
                    [(448, 832), (832, 448), (512, 512), (1024, 256)]
                {
                    let geometry =
                        cover_geometry(1, width, height, bucket_width, bucket_height).unwrap();
                    let last = CropOffset {
                        x: geometry.max_offset_x,
                        y: geometry.max_offset_y,
                    };
                    for offset in [CropOffset { x: 0, y: 0 }, last] {
                        let (left, top, box_width, box_height) = source_crop_box(
                            width,
                            height,
                            &geometry,
                            offset,
                            bucket_width,
                            bucket_height,
                        );
                        assert!(left >= 0.0 && top >= 0.0 && box_width > 0.0 && box_height > 0.0);
                        assert!(
                            left + box_width <= f64::from(width),
                            "{width}x{height} {offset:?}"
                        );
                        assert!(
                            top + box_height <= f64::from(height),
                            "{width}x{height} {offset:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn chw_conversion_is_exact_and_planar_for_every_length() {
        for pixels in [0usize, 1, 15, 16, 17, 33, 1000] {
            let rgb: Vec<u8> = (0..pixels * 3)
                .map(|index| (index * 7919 % 256) as u8)
                .collect();
            let mut out = vec![f32::NAN; rgb.len()];
            rgb8_to_chw_f32(&rgb, &mut out);
            for (index, pixel) in rgb.chunks_exact(3).enumerate() {
                for channel in 0..3 {
                    let expected = f32::from(pixel[channel]) / 127.5 - 1.0;
                    let got = out[channel * pixels + index];
                    assert_eq!(
                        got.to_bits(),
                        expected.to_bits(),
                        "{pixels} px, {index}/{channel}"
                    );
                }
            }
        }
    }

    #[test]
    fn chw_values_span_minus_one_to_one() {
        let mut out = vec![0.0f32; 6];
        rgb8_to_chw_f32(&[0, 128, 255, 255, 0, 0], &mut out);
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 1.0);
        assert!((out[2] - (128.0 / 127.5 - 1.0)).abs() < 1e-7);
        assert_eq!(out[3], -1.0);
        assert_eq!(out[4], 1.0);
        assert_eq!(out[5], -1.0);
    }
}
