//! Bytes to an upright RGB8 image: decode (refusing decompression bombs before any pixel is
//! decoded), apply the EXIF orientation, and convert every colour model to RGB — alpha is
//! composited on white; grayscale, CMYK/YCCK JPEGs, palette and 16-bit images are converted.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

/// An upright RGB8 image, rows top to bottom, 3 bytes per pixel.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    /// The EXIF orientation that was applied.
    pub orientation: Orientation,
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
