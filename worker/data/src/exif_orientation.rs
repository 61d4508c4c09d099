//! The EXIF orientation of a JPEG, read from its APP1 `Exif` segment the way the `image` crate's
//! JPEG decoder reads it (the last `Exif` segment before the scan wins; an unreadable or absent
//! block means "no transform"), without decoding anything.

use image::metadata::Orientation;

/// The EXIF orientation stored in the JPEG `bytes` (`NoTransforms` when there is none).
pub fn jpeg_orientation(bytes: &[u8]) -> Orientation {
    exif_payload(bytes)
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// The TIFF structure of the last APP1 `Exif` segment before the first scan.
fn exif_payload(bytes: &[u8]) -> Option<&[u8]> {
    const START_OF_IMAGE: [u8; 2] = [0xFF, 0xD8];
    const APP1: u8 = 0xE1;
    const START_OF_SCAN: u8 = 0xDA;
    const END_OF_IMAGE: u8 = 0xD9;
    if bytes.get(..2)? != START_OF_IMAGE {
        return None;
    }
    let mut position = 2;
    let mut payload = None;
    loop {
        // A marker is 0xFF (any number of fill bytes) then its code.
        if *bytes.get(position)? != 0xFF {
            return payload;
        }
        while *bytes.get(position)? == 0xFF {
            position += 1;
        }
        let marker = *bytes.get(position)?;
        position += 1;
        match marker {
            START_OF_SCAN | END_OF_IMAGE => return payload,
            // Markers without a length field.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let length = usize::from(u16::from_be_bytes([
            *bytes.get(position)?,
            *bytes.get(position + 1)?,
        ]));
        if length < 2 {
            return payload;
        }
        let segment = bytes.get(position + 2..position + length)?;
        if marker == APP1 && segment.len() > 6 && segment.starts_with(b"Exif\0\0") {
            payload = Some(&segment[6..]);
        }
        position += length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiff_with_orientation(value: u16) -> Vec<u8> {
        // Little-endian TIFF, IFD0 at offset 8 with one entry: 0x0112 SHORT 1 value.
        let mut tiff = b"II*\0\x08\0\0\0".to_vec();
        tiff.extend_from_slice(&1u16.to_le_bytes());
        tiff.extend_from_slice(&0x0112u16.to_le_bytes());
        tiff.extend_from_slice(&3u16.to_le_bytes());
        tiff.extend_from_slice(&1u32.to_le_bytes());
        tiff.extend_from_slice(&value.to_le_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        tiff
    }

    fn jpeg_with_segments(segments: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8];
        for (marker, body) in segments {
            bytes.extend_from_slice(&[0xFF, *marker]);
            bytes.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
            bytes.extend_from_slice(body);
        }
        bytes.extend_from_slice(&[0xFF, 0xDA, 0, 2, 0xFF, 0xD9]);
        bytes
    }

    fn exif(value: u16) -> Vec<u8> {
        let mut body = b"Exif\0\0".to_vec();
        body.extend(tiff_with_orientation(value));
        body
    }

    #[test]
    fn reads_the_orientation_after_other_segments() {
        let jfif = b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0".to_vec();
        let bytes = jpeg_with_segments(&[(0xE0, jfif), (0xE1, exif(6))]);
        assert_eq!(jpeg_orientation(&bytes), Orientation::Rotate90);
    }

    #[test]
    fn the_last_exif_segment_wins_and_xmp_is_ignored() {
        let xmp = b"http://ns.adobe.com/xap/1.0/\0<x/>".to_vec();
        let bytes = jpeg_with_segments(&[(0xE1, exif(3)), (0xE1, xmp), (0xE1, exif(8))]);
        assert_eq!(jpeg_orientation(&bytes), Orientation::Rotate270);
    }

    #[test]
    fn missing_truncated_or_invalid_exif_means_no_transform() {
        assert_eq!(
            jpeg_orientation(&jpeg_with_segments(&[])),
            Orientation::NoTransforms
        );
        let mut truncated = jpeg_with_segments(&[(0xE1, exif(6))]);
        truncated.truncate(12);
        assert_eq!(jpeg_orientation(&truncated), Orientation::NoTransforms);
        let bytes = jpeg_with_segments(&[(0xE1, exif(9))]);
        assert_eq!(jpeg_orientation(&bytes), Orientation::NoTransforms);
        assert_eq!(jpeg_orientation(b"not a jpeg"), Orientation::NoTransforms);
    }
}
