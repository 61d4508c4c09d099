//! The latent cache's store side against damaged and hostile contents: packs round-trip byte
//! for byte through a second handle; an index that is not JSON, has another format or lies
//! about its entries' sizes or ranges is skipped and counted; an entry whose pack is gone (a torn upload)
//! or truncated makes its item be encoded again, never a failed batch; invalid writes are
//! refused with the field named. The images' content tags key the entries: rewriting an image
//! with the same bytes keeps its ETag on S3 (moto), so its latent is still found.

use std::path::Path;

use arbor_data::batch_loader::{BatchLoader, BatchRequest, LoadItem, LoaderOptions};
use arbor_data::latent_batch::{load_latent_batch, reuse_cached, LatentSource};
use arbor_data::latent_cache::{LatentCache, NewLatent};
use arbor_data::store::DatasetStore;
use arbor_testkit::moto::MotoServer;
use arbor_testkit::runtime;
use object_store::PutPayload;

fn latent(key: &str, fill: u8) -> NewLatent {
    let shape = [8, 8, 9];
    NewLatent {
        key: key.to_owned(),
        shape,
        resized_width: 72,
        resized_height: 64,
        data: vec![fill; 8 * 8 * 9 * 2],
    }
}

fn put(store: &DatasetStore, key: &str, bytes: &[u8]) {
    runtime()
        .block_on(
            store
                .object_store()
                .put(&store.object_path(key), PutPayload::from(bytes.to_vec())),
        )
        .unwrap();
}

#[test]
fn packs_round_trip_and_damaged_indexes_are_skipped_and_counted() {
    let folder = tempfile::tempdir().unwrap();
    let location = folder.path().join("cache").display().to_string();
    let runtime = runtime();
    let writer = LatentCache::open(&location).unwrap();
    runtime
        .block_on(writer.write_pack("e0-r0-b0", &[latent("a", 1), latent("b", 2)]))
        .unwrap();

    let store = DatasetStore::open(&location).unwrap();
    put(
        &store,
        "v1/index/99999999999999999990-garbage.json",
        b"{not json",
    );
    put(
        &store,
        "v1/index/99999999999999999991-format.json",
        br#"{"format":"other/v9","pack":"v1/packs/x.safetensors","dtype":"F16","entries":[]}"#,
    );
    put(
        &store,
        "v1/index/99999999999999999992-lies.json",
        br#"{"format":"arbor-latent-cache/v1","pack":"v1/packs/x.safetensors","dtype":"F16","entries":[{"key":"c","offset":0,"length":4,"shape":[8,8,8],"resized_width":64,"resized_height":64}]}"#,
    );
    put(
        &store,
        "v1/index/99999999999999999995-overflow.json",
        br#"{"format":"arbor-latent-cache/v1","pack":"v1/packs/x.safetensors","dtype":"F16","entries":[{"key":"o","offset":18446744073709551615,"length":1152,"shape":[8,8,9],"resized_width":72,"resized_height":64}]}"#,
    );
    // A pack that never arrived, and one cut short.
    put(
        &store,
        "v1/index/99999999999999999993-torn.json",
        br#"{"format":"arbor-latent-cache/v1","pack":"v1/packs/gone.safetensors","dtype":"F16","entries":[{"key":"d","offset":100,"length":1152,"shape":[8,8,9],"resized_width":72,"resized_height":64}]}"#,
    );
    put(&store, "v1/packs/short.safetensors", &[0u8; 200]);
    put(
        &store,
        "v1/index/99999999999999999994-short.json",
        br#"{"format":"arbor-latent-cache/v1","pack":"v1/packs/short.safetensors","dtype":"F16","entries":[{"key":"e","offset":100,"length":1152,"shape":[8,8,9],"resized_width":72,"resized_height":64}]}"#,
    );

    let reader = LatentCache::open(&location).unwrap();
    assert_eq!(runtime.block_on(reader.refresh()).unwrap(), 4);
    assert_eq!(reader.totals().bad_indexes, 4);
    for (key, fill) in [("a", 1u8), ("b", 2)] {
        let located = reader.lookup(key).unwrap();
        let bytes = runtime.block_on(reader.read(&located)).unwrap();
        assert!(bytes.iter().all(|&byte| byte == fill), "{key}");
        assert_eq!(located.entry.shape, [8, 8, 9]);
        assert_eq!(
            (located.entry.resized_width, located.entry.resized_height),
            (72, 64)
        );
    }
    for key in ["d", "e"] {
        let located = reader.lookup(key).unwrap();
        assert!(runtime.block_on(reader.read(&located)).is_err(), "{key}");
    }
    assert!(reader.lookup("c").is_none());
    // A second refresh reads nothing twice.
    assert_eq!(runtime.block_on(reader.refresh()).unwrap(), 4);
    assert_eq!(reader.totals().bad_indexes, 4);

    let refused = |name: &str, latents: &[NewLatent]| {
        runtime
            .block_on(writer.write_pack(name, latents))
            .unwrap_err()
            .to_string()
    };
    assert!(refused("../escape", &[latent("f", 0)]).contains("pack_name"));
    let mut short = latent("g", 0);
    short.data.truncate(10);
    assert!(refused("ok", &[short]).contains("latent"));
    assert!(refused("ok", &[latent("h", 0), latent("h", 1)]).contains("twice"));
}

fn write_png(path: &Path, width: u32, height: u32, shade: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([shade, (x * 3) as u8, (y * 5) as u8])
    });
    image.save(path).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn on_s3_an_unchanged_image_keeps_its_entry_and_a_torn_pack_means_a_re_encode() {
    let mut server = MotoServer::start();
    server.create_bucket("arbor-data");
    let runtime = runtime();
    let images = tempfile::tempdir().unwrap();
    let dataset =
        DatasetStore::open_with_options("s3://arbor-data/images", server.options()).unwrap();
    let mut originals = Vec::new();
    for index in 0..3u32 {
        let bytes = write_png(
            &images.path().join("image.png"),
            80 + index * 8,
            64,
            index as u8,
        );
        put(&dataset, &format!("{index}.png"), &bytes);
        originals.push(bytes);
    }
    let loader = BatchLoader::new(dataset.clone(), LoaderOptions::default()).unwrap();
    let cache_store =
        DatasetStore::open_with_options("s3://arbor-data/cache", server.options()).unwrap();
    let cache = LatentCache::from_store(cache_store.clone());
    let request = BatchRequest {
        items: (0..3)
            .map(|index| LoadItem {
                id: 10 + index,
                key: format!("{index}.png"),
            })
            .collect(),
        bucket_width: 64,
        bucket_height: 64,
        seed: 1,
        epoch: 0,
    };
    let first = runtime
        .block_on(load_latent_batch(&loader, &cache, &request, "vae"))
        .unwrap();
    let mut new_latents = Vec::new();
    for item in &first.items {
        let LatentSource::Encode { pixels } = &item.source else {
            panic!("an empty cache had {}", item.id);
        };
        let (width, height) = (item.geometry.encoded_width, item.geometry.encoded_height);
        assert_eq!(pixels.len() as u32, 3 * width * height);
        let shape = [8, height / 8, width / 8];
        new_latents.push(NewLatent {
            key: item.cache_key.clone(),
            shape,
            resized_width: item.geometry.resized_width,
            resized_height: item.geometry.resized_height,
            data: vec![item.id as u8; (shape[0] * shape[1] * shape[2] * 2) as usize],
        });
    }
    runtime
        .block_on(cache.write_pack("e0-r0-b0", &new_latents))
        .unwrap();

    // The same bytes uploaded again keep their ETag (their MD5), new bytes do not.
    put(&dataset, "0.png", &originals[0]);
    let changed = write_png(&images.path().join("changed.png"), 88, 64, 200);
    put(&dataset, "1.png", &changed);
    let reader = LatentCache::from_store(cache_store.clone());
    let second = runtime
        .block_on(load_latent_batch(&loader, &reader, &request, "vae"))
        .unwrap();
    let cached: Vec<bool> = second
        .items
        .iter()
        .map(|item| matches!(item.source, LatentSource::Cached { .. }))
        .collect();
    assert_eq!(cached, [true, false, true]);
    if let LatentSource::Cached { data, .. } = &second.items[2].source {
        assert!(data.iter().all(|&byte| byte == 12));
    }

    // The pack disappears (a torn upload): items are encoded again, the batch is whole.
    let packs: Vec<String> = runtime
        .block_on(cache_store.list_keys())
        .unwrap()
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| key.starts_with("v1/packs/"))
        .collect();
    for pack in &packs {
        runtime
            .block_on(
                cache_store
                    .object_store()
                    .delete(&cache_store.object_path(pack)),
            )
            .unwrap();
    }
    let fresh_reader = LatentCache::from_store(cache_store);
    let mut third = runtime
        .block_on(load_latent_batch(&loader, &fresh_reader, &request, "vae"))
        .unwrap();
    runtime.block_on(reuse_cached(&fresh_reader, &mut third, &request));
    assert!(third.failures.is_empty());
    assert!(third
        .items
        .iter()
        .all(|item| matches!(item.source, LatentSource::Encode { .. })));
    assert_eq!(fresh_reader.totals().misses, 3);
    server.stop();
}
