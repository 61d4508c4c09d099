//! Bytes to an upright RGB8 image: decode (refusing decompression bombs before any pixel is
//! decoded), apply the EXIF orientation, and convert every colour model to RGB — alpha is
//! composited on white; grayscale, CMYK/YCCK JPEGs, palette and 16-bit images are converted.
//!
//! JPEGs go through libjpeg-turbo ([`crate::turbojpeg`]) and can be decoded at a reduced scale
//! in the DCT domain ([`decode_rgb_covering`]): never below the size the caller needs, which it
//! computes from the full-resolution upright size in [`probe_jpeg`]. Every other format, and any
//! JPEG libjpeg-turbo does not decode cleanly, takes the `image` crate's path ([`decode_rgb`]), so
//! errors are classified the same way whichever decoder would have run.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

use crate::exif_orientation::jpeg_orientation;
use crate::image_header::orientation_swaps_dimensions;
use crate::turbojpeg::{self, JpegColorModel, JpegHeader, JpegScale};

/// An upright RGB8 image, rows top to bottom, 3 bytes per pixel.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    /// The EXIF orientation that was applied.
    pub orientation: Orientation,
}

/// An upright RGB8 image decoded at `scale` of its full resolution (`full_width x
/// full_height` after orientation); `image` is `scale.scaled(full)` on each side.
#[derive(Debug, Clone)]
pub struct DecodedImage {
    pub image: RgbImage,
    pub full_width: u32,
    pub full_height: u32,
    pub scale: JpegScale,
}

impl DecodedImage {
    /// An image decoded at full resolution.
    pub fn full(image: RgbImage) -> Self {
        Self {
            full_width: image.width,
            full_height: image.height,
            image,
            scale: JpegScale::FULL,
        }
    }
}

/// A JPEG's header as libjpeg-turbo reads it, with its EXIF orientation, checked against the
/// pixel cap. Nothing has been decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegProbe {
    pub header: JpegHeader,
    pub orientation: Orientation,
    /// The full-resolution size after orientation.
    pub width: u32,
    pub height: u32,
}

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// No format arbor decodes recognises the bytes.
    NotAnImage(String),
    /// The header announces more pixels than the cap; nothing was decoded.
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The image is truncated or corrupt.
    Corrupt(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::NotAnImage(detail) => write!(formatter, "not an image: {detail}"),
            DecodeError::TooManyPixels {
                width,
                height,
                max_pixels,
            } => write!(
                formatter,
                "image of {width}x{height} pixels is over the cap of {max_pixels} pixels"
            ),
            DecodeError::Corrupt(detail) => write!(formatter, "corrupt image: {detail}"),
        }
    }
}

/// Decodes `bytes` into an upright RGB8 image, refusing images over `max_pixels` pixels from
/// their header (and bounding the decoder's allocations accordingly).
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|error| DecodeError::Corrupt(error.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::NotAnImage(
            "unrecognised file signature".to_owned(),
        ));
    }
    let mut limits = Limits::default();
    // 16-bit RGBA is the widest common decode target: 8 bytes per pixel, plus slack for the
    // decoders' own row buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!(
            "image has a zero size {width}x{height}"
        )));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            max_pixels,
        });
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(classify)?;
    image.apply_orientation(orientation);
    let (width, height) = (image.width(), image.height());
    let pixels = to_rgb_on_white(image);
    Ok(RgbImage {
        width,
        height,
        pixels,
        orientation,
    })
}

/// Reads a JPEG's header with libjpeg-turbo: `Ok(None)` when `bytes` is not a JPEG
/// libjpeg-turbo can read (the caller then takes [`decode_rgb`], which classifies the error),
/// `TooManyPixels` when the header announces more than `max_pixels` pixels.
pub fn probe_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Option<JpegProbe>, DecodeError> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(None);
    }
    let Ok(header) = turbojpeg::read_header(bytes) else {
        return Ok(None);
    };
    if u64::from(header.width) * u64::from(header.height) > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width: header.width,
            height: header.height,
            max_pixels,
        });
    }
    let orientation = jpeg_orientation(bytes);
    let (width, height) = if orientation_swaps_dimensions(orientation) {
        (header.height, header.width)
    } else {
        (header.width, header.height)
    };
    Ok(Some(JpegProbe {
        header,
        orientation,
        width,
        height,
    }))
}

/// The smallest scale among `scales` at which the probed JPEG still covers
/// `min_width x min_height` (upright), in exact arithmetic; full scale when none does.
pub fn covering_scale(
    probe: &JpegProbe,
    min_width: u32,
    min_height: u32,
    scales: &[JpegScale],
) -> JpegScale {
    let covers = |scale: &JpegScale| {
        let numerator = u64::from(scale.numerator);
        let denominator = u64::from(scale.denominator);
        u64::from(probe.width) * numerator >= u64::from(min_width) * denominator
            && u64::from(probe.height) * numerator >= u64::from(min_height) * denominator
    };
    scales
        .iter()
        .copied()
        .filter(|scale| scale.numerator <= scale.denominator && covers(scale))
        .min_by(|a, b| a.as_f64().total_cmp(&b.as_f64()))
        .unwrap_or(JpegScale::FULL)
}

/// Decodes a probed JPEG at `scale` (see [`covering_scale`]) into an upright RGB8 image. When
/// libjpeg-turbo reports any problem, even a warning such as a truncated scan, the image is
/// decoded by [`decode_rgb`] instead, at full resolution, and its verdict stands.
pub fn decode_jpeg_scaled(
    bytes: &[u8],
    probe: &JpegProbe,
    scale: JpegScale,
    max_pixels: u64,
) -> Result<DecodedImage, DecodeError> {
    decode_jpeg_scaled_reusing(bytes, probe, scale, max_pixels, Vec::new())
}

/// [`decode_jpeg_scaled`] decoding into `buffer`'s allocation (see
/// [`turbojpeg::decompress_reusing`]); an upright RGB JPEG's pixels end up in it.
pub fn decode_jpeg_scaled_reusing(
    bytes: &[u8],
    probe: &JpegProbe,
    scale: JpegScale,
    max_pixels: u64,
    buffer: Vec<u8>,
) -> Result<DecodedImage, DecodeError> {
    let decoded = match turbojpeg::decompress_reusing(bytes, &probe.header, scale, buffer) {
        Ok(decoded) => decoded,
        Err(_) => return decode_rgb(bytes, max_pixels).map(DecodedImage::full),
    };
    let pixels = match probe.header.color_model {
        JpegColorModel::Rgb => decoded.pixels,
        JpegColorModel::Cmyk => cmyk_to_rgb(&decoded.pixels),
    };
    let image = orient(pixels, decoded.width, decoded.height, probe.orientation)?;
    Ok(DecodedImage {
        image,
        full_width: probe.width,
        full_height: probe.height,
        scale: decoded.scale,
    })
}

/// Decodes `bytes` into an upright RGB8 image at the smallest scale in `scales` that still
/// covers `cover(full_width, full_height)` (JPEGs only; other formats decode at full size).
pub fn decode_rgb_covering(
    bytes: &[u8],
    max_pixels: u64,
    scales: &[JpegScale],
    cover: impl FnOnce(u32, u32) -> Option<(u32, u32)>,
) -> Result<DecodedImage, DecodeError> {
    decode_rgb_covering_reusing(bytes, max_pixels, scales, cover, Vec::new())
}

/// [`decode_rgb_covering`] decoding JPEGs into `buffer`'s allocation (see
/// [`turbojpeg::decompress_reusing`]): hand the previous image's pixels back in to reuse them.
pub fn decode_rgb_covering_reusing(
    bytes: &[u8],
    max_pixels: u64,
    scales: &[JpegScale],
    cover: impl FnOnce(u32, u32) -> Option<(u32, u32)>,
    buffer: Vec<u8>,
) -> Result<DecodedImage, DecodeError> {
    let Some(probe) = probe_jpeg(bytes, max_pixels)? else {
        return decode_rgb(bytes, max_pixels).map(DecodedImage::full);
    };
    let scale = match cover(probe.width, probe.height) {
        Some((min_width, min_height)) => covering_scale(&probe, min_width, min_height, scales),
        None => JpegScale::FULL,
    };
    decode_jpeg_scaled_reusing(bytes, &probe, scale, max_pixels, buffer)
}

/// Applies `orientation` to stored RGB8 pixels.
fn orient(
    pixels: Vec<u8>,
    width: u32,
    height: u32,
    orientation: Orientation,
) -> Result<RgbImage, DecodeError> {
    if orientation == Orientation::NoTransforms {
        return Ok(RgbImage {
            width,
            height,
            pixels,
            orientation,
        });
    }
    let Some(stored) = image::RgbImage::from_raw(width, height, pixels) else {
        return Err(DecodeError::Corrupt(format!(
            "decoded buffer does not hold {width}x{height} pixels"
        )));
    };
    let mut image = DynamicImage::ImageRgb8(stored);
    image.apply_orientation(orientation);
    Ok(RgbImage {
        width: image.width(),
        height: image.height(),
        pixels: image.into_rgb8().into_raw(),
        orientation,
    })
}

/// Adobe-style (inverted) CMYK as stored to RGB, exactly as the `image` crate's JPEG decoder
/// (zune-jpeg) converts it: `channel * k / 255` with rounding. libjpeg-turbo hands YCCK files
/// over already converted to this CMYK.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    fn multiply(value: u8, key: u8) -> u8 {
        let product = u32::from(value) * u32::from(key) + 128;
        ((product + (product >> 8)) >> 8) as u8
    }
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for pixel in cmyk.chunks_exact(4) {
        rgb.extend_from_slice(&[
            multiply(pixel[0], pixel[3]),
            multiply(pixel[1], pixel[3]),
            multiply(pixel[2], pixel[3]),
        ]);
    }
    rgb
}

fn classify(error: ImageError) -> DecodeError {
    match error {
        ImageError::Unsupported(_) => DecodeError::NotAnImage(error.to_string()),
        ImageError::Limits(_) => DecodeError::Corrupt(format!("over the decoder limits: {error}")),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

/// RGB8 bytes; images with alpha are composited on white.
fn to_rgb_on_white(image: DynamicImage) -> Vec<u8> {
    if !image.color().has_alpha() {
        return image.into_rgb8().into_raw();
    }
    let rgba = image.into_rgba8().into_raw();
    let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
    for pixel in rgba.chunks_exact(4) {
        let alpha = u32::from(pixel[3]);
        for &channel in &pixel[..3] {
            let composited = (u32::from(channel) * alpha + 255 * (255 - alpha) + 127) / 255;
            rgb.push(composited as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_common::crop::cover_geometry;

    const POWER_OF_TWO_SCALES: [JpegScale; 3] = [
        JpegScale {
            numerator: 1,
            denominator: 2,
        },
        JpegScale {
            numerator: 1,
            denominator: 4,
        },
        JpegScale {
            numerator: 1,
            denominator: 8,
        },
    ];

    fn probe(width: u32, height: u32, orientation: Orientation) -> JpegProbe {
        let (stored_width, stored_height) = if orientation_swaps_dimensions(orientation) {
            (height, width)
        } else {
            (width, height)
        };
        JpegProbe {
            header: JpegHeader {
                width: stored_width,
                height: stored_height,
                color_model: JpegColorModel::Rgb,
            },
            orientation,
            width,
            height,
        }
    }

    #[test]
    fn the_covering_scale_never_decodes_below_the_cover_size_and_is_the_smallest() {
        for width in (64..6000).step_by(97) {
            for height in (64..6000).step_by(113) {
                for orientation in [Orientation::NoTransforms, Orientation::Rotate90] {
                    for (bucket_width, bucket_height) in [(512, 512), (448, 832), (832, 448)] {
                        let probe = probe(width, height, orientation);
                        let geometry =
                            cover_geometry(1, width, height, bucket_width, bucket_height).unwrap();
                        let (need_width, need_height) =
                            (geometry.resized_width, geometry.resized_height);
                        let scale =
                            covering_scale(&probe, need_width, need_height, &POWER_OF_TWO_SCALES);
                        let context = format!("{width}x{height} {orientation:?} in {bucket_width}x{bucket_height}: {scale:?}");
                        // Full scale is the fallback (an image smaller than its cover size
                        // is upscaled from full resolution); a reduced scale must cover.
                        if !scale.is_full() {
                            assert!(scale.scaled(width) >= need_width, "{context}");
                            assert!(scale.scaled(height) >= need_height, "{context}");
                        }
                        let half = JpegScale {
                            numerator: scale.numerator,
                            denominator: scale.denominator * 2,
                        };
                        if scale.denominator < 8 {
                            // The next smaller factor would not cover (exactly, before ceil).
                            let covers = u64::from(width) * u64::from(half.numerator)
                                >= u64::from(need_width) * u64::from(half.denominator)
                                && u64::from(height) * u64::from(half.numerator)
                                    >= u64::from(need_height) * u64::from(half.denominator);
                            assert!(!covers, "{context}: {half:?} would also cover");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn cmyk_conversion_matches_the_image_crate_formula() {
        // Adobe-inverted CMYK: RGB = stored channel * stored key / 255, rounded.
        let rgb = cmyk_to_rgb(&[255, 0, 128, 255, 255, 255, 255, 0]);
        assert_eq!(rgb, vec![255, 0, 128, 0, 0, 0]);
    }
}
