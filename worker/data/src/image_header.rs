//! Image sizes from headers only (no pixel decode), with the EXIF orientation applied: a photo
//! stored 4000x3000 with orientation 6 (rotate 90°) is indexed as 3000x4000, the size it is
//! trained at.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{ImageDecoder, ImageError, ImageFormat, ImageReader};

/// What the header of an image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    /// The size as stored, before orientation.
    pub stored_width: u32,
    pub stored_height: u32,
    pub orientation: Orientation,
    /// The size after orientation (what the manifest records).
    pub width: u32,
    pub height: u32,
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// No format arbor decodes recognises the bytes.
    NotAnImage(String),
    /// A recognised format whose header is cut short or corrupt.
    Corrupt(String),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::NotAnImage(detail) => write!(formatter, "not an image: {detail}"),
            HeaderError::Corrupt(detail) => write!(formatter, "corrupt image header: {detail}"),
        }
    }
}

/// Whether an orientation swaps width and height (EXIF 5, 6, 7 and 8).
pub fn orientation_swaps_dimensions(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Reads the format, size and orientation from the first bytes of an image (or all of it).
/// An unreadable EXIF block counts as "no orientation", as in every viewer.
pub fn read_header(bytes: &[u8]) -> Result<ImageHeader, HeaderError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|error| HeaderError::Corrupt(error.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(HeaderError::NotAnImage(
            "unrecognised file signature".to_owned(),
        ));
    };
    let mut decoder = reader.into_decoder().map_err(|error| match error {
        ImageError::Unsupported(_) => HeaderError::NotAnImage(error.to_string()),
        other => HeaderError::Corrupt(other.to_string()),
    })?;
    let (stored_width, stored_height) = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (width, height) = if orientation_swaps_dimensions(orientation) {
        (stored_height, stored_width)
    } else {
        (stored_width, stored_height)
    };
    Ok(ImageHeader {
        format,
        stored_width,
        stored_height,
        orientation,
        width,
        height,
    })
}
