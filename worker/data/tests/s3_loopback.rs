//! Indexing and loading over a real S3-protocol server on loopback: the moto server from PyPI
//! (`moto[server]`, installed by scripts/setup.sh), started by the test itself. The S3 results
//! must equal the local-folder results exactly; a server that dies mid-job gives reported
//! fetch failures, never a panic or a short batch.

use std::path::Path;
use std::time::Duration;

use arbor_data::batch_loader::{BatchLoader, BatchRequest, LoadFailure, LoadItem, LoaderOptions};
use arbor_data::indexer::{index_dataset, IndexOptions};
use arbor_data::item_id::item_id;
use arbor_data::store::DatasetStore;
use arbor_testkit::moto::MotoServer;
use arbor_testkit::{make_odd_corpus, runtime};
use object_store::PutPayload;

const BUCKET: &str = "arbor-test";

async fn upload_folder(store: &DatasetStore, folder: &Path) {
    let mut pending = vec![folder.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let key = path
                .strip_prefix(folder)
                .unwrap()
                .to_str()
                .unwrap()
                .replace('\\', "/");
            let bytes = std::fs::read(&path).unwrap();
            store
                .object_store()
                .put(&store.object_path(&key), PutPayload::from(bytes))
                .await
                .unwrap();
        }
    }
}

#[test]
fn s3_index_and_load_match_the_local_folder() {
    let corpus = tempfile::tempdir().unwrap();
    make_odd_corpus(corpus.path());
    let mut server = MotoServer::start();
    server.create_bucket(BUCKET);
    let runtime = runtime();
    let location = format!("s3://{BUCKET}/datasets/odd");
    let s3 = DatasetStore::open_with_options(&location, server.options()).unwrap();
    runtime.block_on(upload_folder(&s3, corpus.path()));
    let local = DatasetStore::open(corpus.path().to_str().unwrap()).unwrap();

    let options = IndexOptions {
        concurrency: 8,
        ..IndexOptions::default()
    };
    let from_s3 = runtime
        .block_on(index_dataset(&s3, &options, &|_| {}))
        .unwrap();
    let from_local = runtime
        .block_on(index_dataset(&local, &options, &|_| {}))
        .unwrap();
    assert_eq!(from_s3.records.len(), 21);
    assert_eq!(from_s3.records, from_local.records);
    assert_eq!(from_s3.skipped, from_local.skipped);

    let request = BatchRequest {
        items: [
            "orientation/o6.jpg",
            "alpha.png",
            "cmyk.jpg",
            "truncated_body.png",
            "absent.png",
        ]
        .iter()
        .map(|key| LoadItem {
            id: item_id(key),
            key: (*key).to_owned(),
        })
        .collect(),
        bucket_width: 32,
        bucket_height: 32,
        seed: 9,
        epoch: 4,
    };
    let s3_loader = BatchLoader::new(s3.clone(), LoaderOptions::default()).unwrap();
    let local_loader = BatchLoader::new(local, LoaderOptions::default()).unwrap();
    let s3_batch = runtime.block_on(s3_loader.load_batch(&request)).unwrap();
    let local_batch = runtime.block_on(local_loader.load_batch(&request)).unwrap();
    assert_eq!(s3_batch.pixels, local_batch.pixels);
    assert_eq!(s3_batch.items, local_batch.items);
    let failed: Vec<&str> = s3_batch
        .failures
        .iter()
        .map(|failure| failure.key.as_str())
        .collect();
    assert_eq!(failed, vec!["truncated_body.png", "absent.png"]);
    assert!(matches!(s3_batch.failures[1].reason, LoadFailure::Fetch(_)));
    assert_eq!(s3_loader.totals().items_loaded, 3);
    assert_eq!(s3_loader.totals().items_failed, 2);

    // Failure injection: the server dies; every fetch fails and is reported, the batch keeps
    // its shape.
    server.stop();
    let fast_retry = LoaderOptions {
        retry_backoff: Duration::from_millis(10),
        ..LoaderOptions::default()
    };
    let dead_loader = BatchLoader::new(s3, fast_retry).unwrap();
    let dead_batch = runtime.block_on(dead_loader.load_batch(&request)).unwrap();
    assert_eq!(dead_batch.len(), 5);
    assert_eq!(dead_batch.failures.len(), 5);
    assert!(dead_batch
        .failures
        .iter()
        .all(|failure| matches!(failure.reason, LoadFailure::Fetch(_))));
    assert!(dead_batch.pixels.iter().all(|value| *value == 0.0));
}
