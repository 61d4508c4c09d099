//! Image fit geometry (docs/architecture.md §2 "Image fit"): pure functions the loader and the
//! planner share.
//!
//! An image of `width x height` trained in a bucket of `bucket_width x bucket_height` is scaled by
//! `s = max(bw / w, bh / h)` so that it covers the bucket while keeping its aspect ratio, resized
//! to `max(bw, round(w * s)) x max(bh, round(h * s))`, and cropped at a uniformly random offset
//! drawn from the `(seed, epoch, item id)` stream, so a crop is reproducible on its own.

use crate::error::CommonError;
use crate::stream::{RandomStream, StreamDomain};

/// How one image maps onto one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoverGeometry {
    /// The scale factor `max(bw / w, bh / h)`.
    pub scale: f64,
    /// The resized width, at least the bucket width.
    pub resized_width: u32,
    /// The resized height, at least the bucket height.
    pub resized_height: u32,
    /// The largest valid horizontal crop offset (`resized_width - bucket_width`); offsets run
    /// over `0..=max_offset_x`.
    pub max_offset_x: u32,
    /// The largest valid vertical crop offset (`resized_height - bucket_height`).
    pub max_offset_y: u32,
}

impl CoverGeometry {
    /// Pixels cut away by the crop, measured on the resized image: the larger of the two excess
    /// dimensions (one of them is zero up to rounding).
    pub fn cropped_pixels(&self) -> u32 {
        self.max_offset_x.max(self.max_offset_y)
    }
}

/// A crop's top-left corner in the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CropOffset {
    pub x: u32,
    pub y: u32,
}

/// The cover scale `max(bw / w, bh / h)`.
pub fn cover_scale(width: u32, height: u32, bucket_width: u32, bucket_height: u32) -> f64 {
    let horizontal = f64::from(bucket_width) / f64::from(width);
    let vertical = f64::from(bucket_height) / f64::from(height);
    horizontal.max(vertical)
}

/// The resize and crop-range geometry of an image in a bucket. Zero dimensions are refused.
pub fn cover_geometry(
    item_id: u64,
    width: u32,
    height: u32,
    bucket_width: u32,
    bucket_height: u32,
) -> Result<CoverGeometry, CommonError> {
    if width == 0 || height == 0 {
        return Err(CommonError::InvalidImageSize {
            item_id,
            width,
            height,
        });
    }
    if bucket_width == 0 || bucket_height == 0 {
        return Err(crate::error::invalid(
            "bucket",
            format!("bucket {bucket_width}x{bucket_height} has a zero dimension"),
        ));
    }
    let scale = cover_scale(width, height, bucket_width, bucket_height);
    let resized_width = bucket_width.max(round_to_u32(f64::from(width) * scale));
    let resized_height = bucket_height.max(round_to_u32(f64::from(height) * scale));
    Ok(CoverGeometry {
        scale,
        resized_width,
        resized_height,
        max_offset_x: resized_width - bucket_width,
        max_offset_y: resized_height - bucket_height,
    })
}

/// The crop offset of `item_id` in `epoch`: uniform over the valid range, drawn from the
/// `(seed, epoch, item id)` crop stream (x first, then y).
pub fn crop_offset(seed: u64, epoch: u64, item_id: u64, geometry: &CoverGeometry) -> CropOffset {
    let mut stream = RandomStream::new(StreamDomain::Crop, &[seed, epoch, item_id]);
    let x = stream.below(u64::from(geometry.max_offset_x) + 1) as u32;
    let y = stream.below(u64::from(geometry.max_offset_y) + 1) as u32;
    CropOffset { x, y }
}

/// The VAE's downsampling factor: a latent pixel covers 8×8 image pixels.
pub const LATENT_FACTOR: u32 = 8;

/// How one image is encoded for the latent cache: the whole cover-resized image (not one crop
/// of it), cut at its right and bottom edges to a multiple of [`LATENT_FACTOR`], so that each
/// epoch's crop can be taken from the latent instead of from the pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentGeometry {
    /// The cover-resized size the pixel path crops from.
    pub resized_width: u32,
    pub resized_height: u32,
    /// The encoded size: the resized size rounded down to a multiple of 8 (at least the bucket).
    pub encoded_width: u32,
    pub encoded_height: u32,
}

impl LatentGeometry {
    /// The geometry of an image whose cover-resized size is `resized` in `bucket`.
    pub fn new(geometry: &CoverGeometry) -> Self {
        Self {
            resized_width: geometry.resized_width,
            resized_height: geometry.resized_height,
            encoded_width: geometry.resized_width / LATENT_FACTOR * LATENT_FACTOR,
            encoded_height: geometry.resized_height / LATENT_FACTOR * LATENT_FACTOR,
        }
    }

    /// The latent's width and height.
    pub fn latent_size(&self) -> (u32, u32) {
        (
            self.encoded_width / LATENT_FACTOR,
            self.encoded_height / LATENT_FACTOR,
        )
    }

    /// The crop of epoch `epoch` in latent pixels: the pixel path's `(seed, epoch, item)` offset
    /// ([`crop_offset`]) rounded to the nearest multiple of 8 pixels, and clamped so that the
    /// bucket stays inside the encoded image. `bucket_width` and `bucket_height` are multiples
    /// of 8 (every bucket is); the result is in latent units.
    pub fn latent_crop_offset(
        &self,
        seed: u64,
        epoch: u64,
        item_id: u64,
        bucket_width: u32,
        bucket_height: u32,
    ) -> CropOffset {
        let cover = CoverGeometry {
            scale: 1.0,
            resized_width: self.resized_width,
            resized_height: self.resized_height,
            max_offset_x: self.resized_width.saturating_sub(bucket_width),
            max_offset_y: self.resized_height.saturating_sub(bucket_height),
        };
        let pixel_offset = crop_offset(seed, epoch, item_id, &cover);
        let (latent_width, latent_height) = self.latent_size();
        let max_x = latent_width.saturating_sub(bucket_width / LATENT_FACTOR);
        let max_y = latent_height.saturating_sub(bucket_height / LATENT_FACTOR);
        let round = |pixels: u32| (pixels + LATENT_FACTOR / 2) / LATENT_FACTOR;
        CropOffset {
            x: round(pixel_offset.x).min(max_x),
            y: round(pixel_offset.y).min(max_y),
        }
    }
}

fn round_to_u32(value: f64) -> u32 {
    // Rounds half away from zero, as Python's `round` would not (banker's) but as NovelAI's
    // `int(w * s + 0.5)`-style arithmetic and `f64::round` do.
    value.round().min(f64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_crops_are_the_pixel_crops_rounded_to_8_pixels() {
        let bucket = (512, 512);
        for (item, width, height) in [(1u64, 700u32, 512u32), (2, 512, 901), (3, 1000, 517)] {
            let cover = cover_geometry(item, width, height, bucket.0, bucket.1).unwrap();
            let latent = LatentGeometry::new(&cover);
            assert_eq!(latent.encoded_width % 8, 0);
            assert_eq!(latent.encoded_height % 8, 0);
            assert!(latent.encoded_width >= bucket.0 && latent.encoded_height >= bucket.1);
            assert!(cover.resized_width - latent.encoded_width < 8);
            for epoch in 0..50 {
                let pixel = crop_offset(7, epoch, item, &cover);
                let offset = latent.latent_crop_offset(7, epoch, item, bucket.0, bucket.1);
                let (latent_width, latent_height) = latent.latent_size();
                assert!(offset.x + bucket.0 / 8 <= latent_width);
                assert!(offset.y + bucket.1 / 8 <= latent_height);
                // Within half a latent pixel of the pixel crop, or at the clamped edge.
                assert!(
                    (i64::from(offset.x * 8) - i64::from(pixel.x)).abs() <= 4
                        || offset.x * 8 + bucket.0 == latent.encoded_width
                );
                assert!(
                    (i64::from(offset.y * 8) - i64::from(pixel.y)).abs() <= 4
                        || offset.y * 8 + bucket.1 == latent.encoded_height
                );
                assert_eq!(
                    offset,
                    latent.latent_crop_offset(7, epoch, item, bucket.0, bucket.1)
                );
            }
        }
    }

    #[test]
    fn landscape_image_covers_a_square_bucket() {
        let geometry = cover_geometry(1, 1024, 512, 512, 512).unwrap();
        assert_eq!(geometry.scale, 1.0);
        assert_eq!(
            (geometry.resized_width, geometry.resized_height),
            (1024, 512)
        );
        assert_eq!((geometry.max_offset_x, geometry.max_offset_y), (512, 0));
        assert_eq!(geometry.cropped_pixels(), 512);
    }

    #[test]
    fn small_image_is_upscaled_to_cover() {
        let geometry = cover_geometry(1, 100, 150, 512, 768).unwrap();
        assert!((geometry.scale - 5.12).abs() < 1e-12);
        assert_eq!(
            (geometry.resized_width, geometry.resized_height),
            (512, 768)
        );
        assert_eq!((geometry.max_offset_x, geometry.max_offset_y), (0, 0));
    }

    #[test]
    fn rounding_never_undershoots_the_bucket() {
        // 3x7 into 512x768: s = max(170.67, 109.71); w*s = 512 exactly, h*s = 1194.67 -> 1195.
        let geometry = cover_geometry(1, 3, 7, 512, 768).unwrap();
        assert_eq!(
            (geometry.resized_width, geometry.resized_height),
            (512, 1195)
        );
        for (width, height) in [(1, 1), (999, 1001), (7, 3), (4000, 3)] {
            let geometry = cover_geometry(1, width, height, 448, 832).unwrap();
            assert!(geometry.resized_width >= 448 && geometry.resized_height >= 832);
        }
    }

    #[test]
    fn zero_sizes_are_refused_with_the_item() {
        let error = cover_geometry(9, 0, 10, 512, 512).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid image size 0x10 for item 9: width and height must be positive"
        );
    }

    #[test]
    fn crop_offsets_are_reproducible_and_in_range() {
        let geometry = cover_geometry(5, 2000, 512, 512, 512).unwrap();
        let offset = crop_offset(42, 1, 5, &geometry);
        assert_eq!(offset, crop_offset(42, 1, 5, &geometry));
        assert!(offset.x <= geometry.max_offset_x && offset.y == 0);
        let offsets: std::collections::HashSet<_> = (0..50)
            .map(|epoch| crop_offset(42, epoch, 5, &geometry))
            .collect();
        assert!(offsets.len() > 40, "offsets should vary by epoch");
    }
}
