//! Reading the JSON files of model folders (configs, vocabularies) with errors naming the file.

use std::path::Path;

use crate::error::{Result, WorkerError};

/// Reads and parses a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(WorkerError::io(path))?;
    serde_json::from_str(&text).map_err(|source| WorkerError::Json {
        path: path.to_path_buf(),
        source,
    })
}
