//! Loading ahead of the consumer: a background thread runs the loader on its own tokio runtime
//! (fetches are async; decode and resize run on the loader's worker pool of blocking threads)
//! and keeps up to `depth` batches in flight, handing them over in request order, so the
//! training step finds the next batch ready.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use futures::StreamExt;

use crate::batch_loader::{Batch, BatchLoader, BatchRequest, LoaderTotals};
use crate::error::{invalid, DataError};

/// Batches loaded in the background, in request order.
pub struct Prefetcher {
    receiver: Option<Receiver<Result<Batch, DataError>>>,
    thread: Option<JoinHandle<()>>,
    loader: BatchLoader,
}

impl Prefetcher {
    /// Starts loading `requests` with up to `depth` batches in flight (at least 1).
    pub fn spawn(
        loader: BatchLoader,
        requests: impl IntoIterator<Item = BatchRequest, IntoIter: Send + 'static>,
        depth: usize,
    ) -> Result<Self, DataError> {
        if depth == 0 {
            return Err(invalid("prefetch_depth", "must be at least 1"));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("arbor-data-io")
            .enable_all()
            .build()
            .map_err(DataError::Runtime)?;
        let (sender, receiver) = sync_channel(depth);
        let requests = requests.into_iter();
        let background_loader = loader.clone();
        let thread = std::thread::Builder::new()
            .name("arbor-data-prefetch".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut batches = futures::stream::iter(requests)
                        .map(|request| {
                            let loader = background_loader.clone();
                            // Spawned so that loading continues while this thread waits for room.
                            tokio::spawn(async move { loader.load_batch(&request).await })
                        })
                        .buffered(depth);
                    while let Some(joined) = batches.next().await {
                        let result = joined.unwrap_or_else(|join_error| {
                            Err(invalid("batch", format!("load task failed: {join_error}")))
                        });
                        // The receiver hanging up means the consumer stopped: stop too.
                        let sender = sender.clone();
                        let sent = tokio::task::spawn_blocking(move || sender.send(result).is_ok())
                            .await
                            .unwrap_or(false);
                        if !sent {
                            break;
                        }
                    }
                });
            })
            .map_err(DataError::Runtime)?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
            loader,
        })
    }

    /// The next batch, waiting for it if needed; `None` after the last.
    pub fn next_batch(&mut self) -> Option<Result<Batch, DataError>> {
        self.receiver.as_ref()?.recv().ok()
    }

    /// The loader's running totals.
    pub fn totals(&self) -> LoaderTotals {
        self.loader.totals()
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Hang up first so the background thread stops at its next hand-over, then wait for it.
        self.receiver.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
