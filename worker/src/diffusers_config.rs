//! Reading diffusers' component configs (`unet/config.json`, `vae/config.json`,
//! `scheduler/scheduler_config.json`) into typed structs, with errors naming the file and the
//! field.
//!
//! The structs (worker/src/unet_2d_config.rs, worker/src/vae.rs, worker/src/ddpm.rs) take
//! container-level `#[serde(default)]` with an `impl Default` holding the defaults of the
//! upstream class's `__init__`, so a key `save_pretrained` left out reads as diffusers would
//! read it. Unknown keys are ignored on purpose: these are upstream formats that grow keys over
//! releases; each struct checks the keys that change the computation.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Result, WorkerError};

/// Reads a diffusers config file. Invalid JSON is a [`WorkerError::Json`]; a value of the wrong
/// type or outside an enum is a [`WorkerError::Config`] naming its key.
pub fn load_diffusers_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(WorkerError::io(path))?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    let config = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| deserialize_error(path, error))?;
    deserializer.end().map_err(|source| WorkerError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(config)
}

/// Reads an already parsed diffusers config (presets, tests); `source` names it in errors.
pub fn parse_diffusers_config<T: DeserializeOwned>(
    value: &serde_json::Value,
    source: &Path,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|error| deserialize_error(source, error))
}

/// A config value the model does not support: the file, the key and why.
pub fn config_error(source: &Path, field: &str, message: impl Into<String>) -> WorkerError {
    WorkerError::Config {
        path: source.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn deserialize_error(
    source: &Path,
    error: serde_path_to_error::Error<serde_json::Error>,
) -> WorkerError {
    let field = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_data() {
        config_error(source, &field, inner.to_string())
    } else {
        WorkerError::Json {
            path: source.to_path_buf(),
            source: inner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(default)]
    struct Example {
        channels: i64,
        types: Vec<String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Self {
                channels: 4,
                types: vec!["DownBlock2D".to_string()],
            }
        }
    }

    #[test]
    fn absent_keys_take_the_defaults_and_unknown_keys_are_ignored() {
        let value = serde_json::json!({ "channels": 8, "_diffusers_version": "0.30.0" });
        let example: Example = parse_diffusers_config(&value, Path::new("config.json")).unwrap();
        assert_eq!(
            example,
            Example {
                channels: 8,
                ..Example::default()
            }
        );
    }

    #[test]
    fn a_wrong_type_names_the_file_and_the_key() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("config.json");
        std::fs::write(&path, r#"{"types": ["DownBlock2D", 3]}"#).unwrap();
        let error = load_diffusers_config::<Example>(&path).unwrap_err();
        assert!(
            matches!(&error, WorkerError::Config { field, .. } if field == "types[1]"),
            "{error}"
        );
        assert!(error.to_string().contains("config.json"), "{error}");
        std::fs::write(&path, r#"{"channels": 8"#).unwrap();
        let error = load_diffusers_config::<Example>(&path).unwrap_err();
        assert!(matches!(error, WorkerError::Json { .. }), "{error}");
    }
}
