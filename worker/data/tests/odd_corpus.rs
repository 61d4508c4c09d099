//! Indexing and loading the odd-file corpus (bench/loader/make_corpus.py) from a local folder:
//! the report item by item, EXIF orientations 1-8 pixel by pixel, colour conversions, crop
//! placement, and failures that keep the batch's shape.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use arbor_common::crop::{cover_geometry, crop_offset, CropOffset};
use arbor_data::batch_loader::{
    Batch, BatchLoader, BatchRequest, LoadFailure, LoadItem, LoaderOptions,
};
use arbor_data::decode::DecodeError;
use arbor_data::indexer::{index_dataset, IndexOptions, IndexOutcome};
use arbor_data::item_id::item_id;
use arbor_data::skip_reason::{skip_summary, SkipReason};
use arbor_data::store::DatasetStore;
use arbor_testkit::{make_odd_corpus, runtime};
use support::{assert_close, pixel};

fn index(root: &Path, options: &IndexOptions) -> IndexOutcome {
    let store = DatasetStore::open(root.to_str().unwrap()).unwrap();
    runtime()
        .block_on(index_dataset(&store, options, &|_| {}))
        .unwrap()
}

fn load(root: &Path, keys: &[&str], bucket: (u32, u32), seed: u64) -> Batch {
    let store = DatasetStore::open(root.to_str().unwrap()).unwrap();
    let loader = BatchLoader::new(store, LoaderOptions::default()).unwrap();
    let request = BatchRequest {
        items: keys
            .iter()
            .map(|key| LoadItem {
                id: item_id(key),
                key: (*key).to_owned(),
            })
            .collect(),
        bucket_width: bucket.0,
        bucket_height: bucket.1,
        seed,
        epoch: 0,
    };
    runtime().block_on(loader.load_batch(&request)).unwrap()
}

#[test]
fn index_reports_every_odd_file_with_its_reason() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let outcome = index(corpus.path(), &IndexOptions::default());

    let sizes: BTreeMap<&str, (u32, u32, &str)> = outcome
        .records
        .iter()
        .map(|record| {
            (
                record.key.as_str(),
                (record.width, record.height, record.caption.as_str()),
            )
        })
        .collect();
    let mut expected: BTreeMap<&str, (u32, u32, &str)> = BTreeMap::from([
        ("alpha.png", (32, 32, "a caption")),
        ("bom_crlf.png", (16, 16, "1girl, red dress\nsmiling")),
        ("caption_ext.png", (16, 16, "from .caption")),
        ("cmyk.jpg", (32, 32, "a caption")),
        ("exact_64x128.png", (64, 128, "a caption")),
        ("gray.jpg", (40, 24, "a caption")),
        ("gray16.png", (32, 16, "a caption")),
        ("image.webp", (48, 40, "a caption")),
        ("nested/deeper/UPPER.PNG", (20, 20, "nested")),
        ("one_pixel.png", (1, 1, "a caption")),
        ("palette.png", (24, 24, "a caption")),
        ("rgb16.png", (16, 16, "a caption")),
        // The header is intact; the body is cut: indexed, then refused by the loader.
        ("truncated_body.png", (64, 64, "a caption")),
    ]);
    let orientation_captions: Vec<String> = (1..=8)
        .map(|orientation| format!("orientation {orientation}"))
        .collect();
    let orientation_keys: Vec<String> = (1..=8)
        .map(|orientation| format!("orientation/o{orientation}.jpg"))
        .collect();
    for orientation in 1..=8usize {
        // Stored 64x32 or 32x64; upright always 64x32.
        expected.insert(
            &orientation_keys[orientation - 1],
            (64, 32, &orientation_captions[orientation - 1]),
        );
    }
    assert_eq!(sizes, expected);
    for record in &outcome.records {
        assert_eq!(record.id, item_id(&record.key), "id of {}", record.key);
    }

    let skipped: BTreeMap<&str, SkipReason> = outcome
        .skipped
        .iter()
        .map(|file| (file.key.as_str(), file.reason))
        .collect();
    assert_eq!(
        skipped,
        BTreeMap::from([
            ("bad_caption.png", SkipReason::CaptionNotUtf8),
            ("bomb.png", SkipReason::TooManyPixels),
            ("no_caption.png", SkipReason::MissingCaption),
            ("not_image.jpg", SkipReason::NotAnImage),
            ("truncated_header.png", SkipReason::CorruptHeader),
            ("zero.png", SkipReason::ZeroBytes),
        ])
    );
    let bomb = outcome
        .skipped
        .iter()
        .find(|file| file.key == "bomb.png")
        .unwrap();
    assert_eq!(
        bomb.detail,
        "30000x30000 = 900000000 pixels is over the cap of 89478485"
    );
    assert_eq!(
        outcome.images_found,
        outcome.records.len() + outcome.skipped.len()
    );
    assert_eq!(
        skip_summary(&outcome.skipped),
        "6 skipped (1 zero_bytes, 1 not_an_image, 1 corrupt_header, 1 too_many_pixels, 1 caption_not_utf8, 1 missing_caption)"
    );

    // Re-indexing gives the same ids; optional captions index the uncaptioned image.
    let optional = index(
        corpus.path(),
        &IndexOptions {
            require_captions: false,
            ..IndexOptions::default()
        },
    );
    assert_eq!(optional.uncaptioned, vec!["no_caption.png".to_owned()]);
    assert_eq!(optional.records.len(), outcome.records.len() + 1);
    for record in &outcome.records {
        assert!(
            optional.records.contains(record),
            "{} changed on re-index",
            record.key
        );
    }
}

const RED: [u8; 3] = [255, 0, 0];
const GREEN: [u8; 3] = [0, 255, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const WHITE: [u8; 3] = [255, 255, 255];

#[test]
fn every_exif_orientation_loads_upright() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let keys: Vec<String> = (1..=8)
        .map(|orientation| format!("orientation/o{orientation}.jpg"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    // At the image's own size (a pure crop) and downscaled by 2 (through Lanczos3).
    for (bucket, scale) in [((64, 32), 1), ((32, 16), 2)] {
        let batch = load(corpus.path(), &keys, bucket, 1);
        assert!(batch.failures.is_empty(), "{:?}", batch.failures);
        for (index, key) in keys.iter().enumerate() {
            let crop = batch.items[index];
            assert_eq!(
                (crop.original_width, crop.original_height),
                (64, 32),
                "{key}"
            );
            assert_eq!((crop.crop_x, crop.crop_y), (0, 0), "{key}");
            for (x, y, colour) in [(8, 4, RED), (56, 4, GREEN), (8, 28, BLUE), (56, 28, WHITE)] {
                let got = pixel(&batch, index, x / scale, y / scale);
                assert_close(
                    got,
                    colour,
                    40,
                    &format!("{key} at ({x}, {y}) in {bucket:?}"),
                );
            }
        }
    }
}

#[test]
fn colour_models_convert_to_rgb() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let batch = load(corpus.path(), &["alpha.png"], (32, 32), 0);
    assert_close(pixel(&batch, 0, 8, 10), RED, 0, "opaque red");
    // Blue at alpha 128 over white: (255 * 127 + 127) / 255 = 127 for red and green.
    assert_close(
        pixel(&batch, 0, 17, 10),
        [127, 127, 255],
        0,
        "half-transparent blue",
    );
    assert_close(pixel(&batch, 0, 28, 10), WHITE, 0, "transparent on white");

    // (key, bucket, expected colour everywhere, tolerance)
    type ColourCase = (&'static str, (u32, u32), [u8; 3], u8);
    let cases: [ColourCase; 7] = [
        ("cmyk.jpg", (32, 32), [0, 255, 255], 8),
        ("rgb16.png", (16, 16), [255, 128, 0], 0),
        ("palette.png", (24, 24), [10, 200, 30], 0),
        ("gray.jpg", (40, 24), [77, 77, 77], 2),
        ("image.webp", (48, 40), [30, 60, 90], 0),
        ("one_pixel.png", (64, 64), [200, 100, 50], 1),
        ("nested/deeper/UPPER.PNG", (20, 20), [1, 2, 3], 0),
    ];
    for (key, bucket, colour, tolerance) in cases {
        let batch = load(corpus.path(), &[key], bucket, 0);
        assert!(batch.failures.is_empty(), "{key}: {:?}", batch.failures);
        for (x, y) in [
            (0, 0),
            (bucket.0 / 2, bucket.1 / 2),
            (bucket.0 - 1, bucket.1 - 1),
        ] {
            assert_close(
                pixel(&batch, 0, x, y),
                colour,
                tolerance,
                &format!("{key} at ({x}, {y})"),
            );
        }
    }
    // 16-bit gray: the stored value 2048 * x + 255 maps to round(value / 257) in 8 bits.
    let batch = load(corpus.path(), &["gray16.png"], (32, 16), 0);
    for x in [0u32, 10, 31] {
        let value = ((2048.0 * f64::from(x) + 255.0) / 257.0).round() as u8;
        assert_close(
            pixel(&batch, 0, x, 7),
            [value; 3],
            0,
            &format!("gray16 at x {x}"),
        );
    }
}

#[test]
fn an_image_at_the_bucket_size_is_copied_exactly() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let batch = load(corpus.path(), &["exact_64x128.png"], (64, 128), 3);
    let source = image::open(corpus.path().join("exact_64x128.png"))
        .unwrap()
        .into_rgb8();
    for (x, y, expected) in source.enumerate_pixels() {
        assert_eq!(pixel(&batch, 0, x, y), expected.0, "pixel ({x}, {y})");
    }
}

fn write_gradient(path: &Path, width: u32, height: u32, divisor: u32) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x / divisor) as u8, (y % 256) as u8, 100])
    });
    image.save(path).unwrap();
}

#[test]
fn crops_land_at_the_offset_of_the_seed_epoch_item_stream() {
    let corpus = tempfile::tempdir().unwrap();
    // 256x64 into 64x64: scale 1, 193 possible x offsets; the red channel encodes x.
    write_gradient(&corpus.path().join("wide.png"), 256, 64, 1);
    // 512x128 into 64x64: scale 0.5 (resized 256x64); red encodes source x / 2 = resized x.
    write_gradient(&corpus.path().join("wider.png"), 512, 128, 2);
    for seed in [1u64, 2, 3] {
        for (key, tolerance) in [("wide.png", 0u8), ("wider.png", 1)] {
            let batch = load(corpus.path(), &[key], (64, 64), seed);
            let crop = batch.items[0];
            let geometry = cover_geometry(
                item_id(key),
                crop.original_width,
                crop.original_height,
                64,
                64,
            )
            .unwrap();
            let expected = crop_offset(seed, 0, item_id(key), &geometry);
            assert_eq!(
                CropOffset {
                    x: crop.crop_x,
                    y: crop.crop_y
                },
                expected,
                "{key} seed {seed}"
            );
            assert_eq!((crop.resized_width, crop.resized_height), (256, 64));
            for column in [0u32, 20, 63] {
                let red = pixel(&batch, 0, column, 32)[0];
                let expected_red = (expected.x + column) as u8;
                assert!(
                    red.abs_diff(expected_red) <= tolerance,
                    "{key} seed {seed} column {column}: red {red}, expected {expected_red}"
                );
            }
        }
    }
}

#[test]
fn failed_items_keep_the_batch_shape_and_are_reported() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let keys = [
        "orientation/o1.jpg",
        "truncated_body.png",
        "bomb.png",
        "zero.png",
        "not_image.jpg",
        "missing/object.png",
    ];
    let batch = load(corpus.path(), &keys, (64, 32), 0);
    assert_eq!(batch.len(), keys.len());
    assert_eq!(batch.pixels.len(), keys.len() * 3 * 64 * 32);
    let failed: Vec<&str> = batch
        .failures
        .iter()
        .map(|failure| failure.key.as_str())
        .collect();
    assert_eq!(failed, keys[1..].to_vec());
    for failure in &batch.failures {
        assert_eq!(failure.id, item_id(&failure.key));
    }
    assert_eq!(
        batch.failures[1].reason,
        LoadFailure::Decode(DecodeError::TooManyPixels {
            width: 30000,
            height: 30000,
            max_pixels: 89_478_485
        })
    );
    assert!(
        matches!(
            batch.failures[0].reason,
            LoadFailure::Decode(DecodeError::Corrupt(_))
        ),
        "{:?}",
        batch.failures[0]
    );
    assert!(matches!(
        batch.failures[3].reason,
        LoadFailure::Decode(DecodeError::NotAnImage(_))
    ));
    assert!(matches!(batch.failures[4].reason, LoadFailure::Fetch(_)));
    for slot in 1..keys.len() {
        assert_eq!(
            batch.item_pixels(slot),
            batch.item_pixels(0),
            "slot {slot} repeats slot 0"
        );
        assert_eq!(batch.items[slot].id, item_id(keys[slot]));
        assert_eq!(batch.items[slot].loaded_id, Some(item_id(keys[0])));
    }

    // A batch where everything fails is zeros (mid-gray), still full-sized.
    let batch = load(corpus.path(), &["zero.png", "bomb.png"], (16, 8), 0);
    assert_eq!(batch.pixels.len(), 2 * 3 * 16 * 8);
    assert!(batch.pixels.iter().all(|value| *value == 0.0));
    assert!(batch.items.iter().all(|item| item.loaded_id.is_none()));
}

#[test]
fn prefetcher_hands_over_batches_in_request_order() {
    use arbor_data::prefetcher::Prefetcher;

    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let store = DatasetStore::open(corpus.path().to_str().unwrap()).unwrap();
    let loader = BatchLoader::new(store, LoaderOptions::default()).unwrap();
    let keys = [
        "orientation/o3.jpg",
        "bomb.png",
        "alpha.png",
        "cmyk.jpg",
        "gray.jpg",
        "zero.png",
    ];
    let requests: Vec<BatchRequest> = keys
        .chunks(2)
        .enumerate()
        .map(|(index, pair)| BatchRequest {
            items: pair
                .iter()
                .map(|key| LoadItem {
                    id: item_id(key),
                    key: (*key).to_owned(),
                })
                .collect(),
            bucket_width: 16 + 8 * index as u32,
            bucket_height: 16,
            seed: 5,
            epoch: 1,
        })
        .collect();
    let mut prefetcher = Prefetcher::spawn(loader, requests, 2).unwrap();
    let mut widths = Vec::new();
    let mut ids = Vec::new();
    for batch in prefetcher.by_ref() {
        let batch = batch.unwrap();
        widths.push(batch.bucket_width);
        ids.extend(batch.items.iter().map(|item| item.id));
    }
    assert_eq!(widths, vec![16, 24, 32]);
    assert_eq!(ids, keys.iter().map(|key| item_id(key)).collect::<Vec<_>>());
    let totals = prefetcher.totals();
    assert_eq!((totals.items_loaded, totals.items_failed), (4, 2));

    // Dropping a prefetcher mid-stream stops its thread without hanging.
    let store = DatasetStore::open(corpus.path().to_str().unwrap()).unwrap();
    let loader = BatchLoader::new(store, LoaderOptions::default()).unwrap();
    let endless = (0..).map(|_| BatchRequest {
        items: vec![LoadItem {
            id: 1,
            key: "alpha.png".to_owned(),
        }],
        bucket_width: 8,
        bucket_height: 8,
        seed: 0,
        epoch: 0,
    });
    let mut prefetcher = Prefetcher::spawn(loader, endless, 3).unwrap();
    assert!(prefetcher.next_batch().unwrap().is_ok());
    drop(prefetcher);
}
