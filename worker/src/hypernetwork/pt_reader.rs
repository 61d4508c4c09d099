//! Reads AUTOMATIC1111 hypernetwork `.pt` files as users have them: the zip `torch.save` writes
//! (torch ≥ 1.6; entries `<name>/data.pkl`, `<name>/data/<N>`, `<name>/version`, and on
//! torch ≥ 2.1 `<name>/byteorder` and `<name>/.data/serialization_id`), unpickled by
//! [`super::restricted_pickle`], which refuses anything but state dicts of tensors and plain
//! metadata. Missing metadata takes A1111's loader defaults (`layer_structure` [1, 2, 1], linear,
//! no layer norm, `activate_output` true, dropout from `use_dropout`/`last_layer_dropout`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};
use tracing::warn;

use arbor_common::config::ConfigChoice;

use super::module::HypernetworkStructure;
use super::pt_file::{fix_old_key, HypernetworkFile};
use super::restricted_pickle::{read_pickle, PickleValue, TensorReference};
use crate::error::{Result, WorkerError};

fn invalid(path: &Path, message: impl Into<String>) -> WorkerError {
    WorkerError::Hypernetwork {
        item: path.display().to_string(),
        message: message.into(),
    }
}

fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Half | Kind::BFloat16 => 2,
        Kind::Double => 8,
        _ => 4,
    }
}

/// The raw bytes of the archive's `data/<key>` entries, by key.
type Storages = BTreeMap<String, Vec<u8>>;

/// Reads the file's zip: the pickle and the raw storages by key.
fn read_archive(path: &Path) -> Result<(Vec<u8>, Storages)> {
    let file = std::fs::File::open(path).map_err(WorkerError::io(path))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|error| {
        invalid(
            path,
            format!("is not a zip-serialized torch file ({error}); legacy pre-1.6 pickles are not supported"),
        )
    })?;
    let mut pickle = None;
    let mut storages = BTreeMap::new();
    for index in 0..archive.len() {
        let mut entry = archive
            .by_index(index)
            .map_err(|error| invalid(path, format!("zip entry {index}: {error}")))?;
        let entry_name = entry.name().to_string();
        let Some((_, relative)) = entry_name.split_once('/') else {
            return Err(invalid(
                path,
                format!("zip entry `{entry_name}` is outside an archive folder"),
            ));
        };
        let relative = relative.to_string();
        // The declared size only sizes the first allocation, capped: a zip may lie about it.
        let mut bytes = Vec::with_capacity((entry.size() as usize).min(1 << 24));
        entry
            .read_to_end(&mut bytes)
            .map_err(|error| invalid(path, format!("reading zip entry `{entry_name}`: {error}")))?;
        if relative == "data.pkl" {
            pickle = Some(bytes);
        } else if let Some(key) = relative.strip_prefix("data/") {
            storages.insert(key.to_string(), bytes);
        } else if relative == "byteorder" {
            if bytes.trim_ascii() != b"little" {
                return Err(invalid(
                    path,
                    format!(
                        "byteorder `{}` is not supported (only little)",
                        String::from_utf8_lossy(&bytes)
                    ),
                ));
            }
        } else if !matches!(
            relative.as_str(),
            "version"
                | ".format_version"
                | ".storage_alignment"
                | ".data/serialization_id"
                | ".data/version"
        ) {
            warn!(path = %path.display(), entry = %entry_name, "unknown zip entry in hypernetwork file ignored");
        }
    }
    let pickle = pickle.ok_or_else(|| invalid(path, "has no data.pkl entry"))?;
    Ok((pickle, storages))
}

fn tensor_from(
    path: &Path,
    key: &str,
    reference: &TensorReference,
    storages: &Storages,
) -> Result<Tensor> {
    let bytes = storages.get(&reference.storage_key).ok_or_else(|| {
        invalid(
            path,
            format!(
                "tensor `{key}`: storage data/{} is missing",
                reference.storage_key
            ),
        )
    })?;
    let expected = usize::try_from(reference.storage_numel)
        .ok()
        .and_then(|numel| numel.checked_mul(element_size(reference.kind)))
        .ok_or_else(|| {
            invalid(
                path,
                format!(
                    "tensor `{key}`: storage size {} is invalid",
                    reference.storage_numel
                ),
            )
        })?;
    if bytes.len() < expected {
        return Err(invalid(
            path,
            format!(
                "tensor `{key}`: storage data/{} has {} bytes, expected {expected}",
                reference.storage_key,
                bytes.len()
            ),
        ));
    }
    let storage = Tensor::f_from_data_size(
        &bytes[..expected],
        &[reference.storage_numel],
        reference.kind,
    )
    .map_err(WorkerError::torch(format!("reading tensor `{key}`")))?;
    storage
        .f_as_strided(&reference.size, &reference.stride, Some(reference.offset))
        .map(|tensor| tensor.contiguous())
        .map_err(WorkerError::torch(format!("viewing tensor `{key}`")))
}

fn float_list(path: &Path, field: &str, value: &PickleValue) -> Result<Vec<f64>> {
    let (PickleValue::List(items) | PickleValue::Tuple(items)) = value else {
        return Err(invalid(path, format!("field `{field}` is not a list")));
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Int(value) => Ok(*value as f64),
            PickleValue::Float(value) => Ok(*value),
            _ => Err(invalid(path, format!("field `{field}` holds a non-number"))),
        })
        .collect()
}

fn optional_string(
    path: &Path,
    field: &str,
    value: Option<&PickleValue>,
) -> Result<Option<String>> {
    match value {
        None | Some(PickleValue::None) => Ok(None),
        Some(PickleValue::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(invalid(path, format!("field `{field}` is not a string"))),
    }
}

/// A metadata name that is one of the config's choices (`activation_func`,
/// `weight_initialization`); absent or `None`, A1111's default (linear, `Normal`).
fn a1111_choice<Choice: ConfigChoice + Default>(
    path: &Path,
    field: &str,
    value: Option<&PickleValue>,
) -> Result<Choice> {
    let Some(name) = optional_string(path, field, value)? else {
        return Ok(Choice::default());
    };
    Choice::from_name(&name)
        .ok_or_else(|| invalid(path, format!("field `{field}`: {}", Choice::refusal(&name))))
}

fn boolean(path: &Path, field: &str, value: Option<&PickleValue>, default: bool) -> Result<bool> {
    match value {
        None | Some(PickleValue::None) => Ok(default),
        Some(PickleValue::Bool(flag)) => Ok(*flag),
        Some(PickleValue::Int(number)) => Ok(*number != 0),
        Some(_) => Err(invalid(path, format!("field `{field}` is not a bool"))),
    }
}

fn state_dict(
    path: &Path,
    size: i64,
    which: &str,
    value: &PickleValue,
    storages: &Storages,
) -> Result<Vec<(String, Tensor)>> {
    let PickleValue::Dict(entries) = value else {
        return Err(invalid(
            path,
            format!("module {size}.{which} is not a state dict"),
        ));
    };
    entries
        .iter()
        .map(|(key, value)| {
            let (PickleValue::String(key), PickleValue::Tensor(reference)) = (key, value) else {
                return Err(invalid(
                    path,
                    format!("module {size}.{which} holds an entry that is not (string, tensor)"),
                ));
            };
            let name = format!("{size}.{which}.{key}");
            Ok((
                fix_old_key(key),
                tensor_from(path, &name, reference, storages)?,
            ))
        })
        .collect()
}

/// Reads an A1111 hypernetwork `.pt`.
pub fn read_pt(path: &Path) -> Result<HypernetworkFile> {
    let (pickle, storages) = read_archive(path)?;
    let root = read_pickle(&pickle).map_err(|error| match error {
        WorkerError::Hypernetwork { message, .. } => invalid(path, format!("data.pkl: {message}")),
        other => other,
    })?;
    let PickleValue::Dict(entries) = root else {
        return Err(invalid(path, "data.pkl does not hold a dict"));
    };
    let mut metadata: BTreeMap<String, PickleValue> = BTreeMap::new();
    let mut modules = BTreeMap::new();
    for (key, value) in &entries {
        match key {
            PickleValue::Int(size) => {
                let (PickleValue::Tuple(pair) | PickleValue::List(pair)) = value else {
                    return Err(invalid(
                        path,
                        format!("module size {size} is not a (k, v) pair"),
                    ));
                };
                if pair.len() != 2 {
                    return Err(invalid(
                        path,
                        format!(
                            "module size {size} has {} state dicts, expected 2",
                            pair.len()
                        ),
                    ));
                }
                let key_state = state_dict(path, *size, "0", &pair[0], &storages)?;
                let value_state = state_dict(path, *size, "1", &pair[1], &storages)?;
                modules.insert(*size, [key_state, value_state]);
            }
            PickleValue::String(name) => {
                metadata.insert(name.clone(), value.clone());
            }
            other => return Err(invalid(path, format!("unexpected top-level key {other:?}"))),
        }
    }
    if modules.is_empty() {
        return Err(invalid(path, "holds no modules (no int keys)"));
    }
    let layer_structure = match metadata.get("layer_structure") {
        None | Some(PickleValue::None) => vec![1.0, 2.0, 1.0],
        Some(value) => float_list(path, "layer_structure", value)?,
    };
    let activation = a1111_choice(path, "activation_func", metadata.get("activation_func"))?;
    let weight_init = a1111_choice(
        path,
        "weight_initialization",
        metadata.get("weight_initialization"),
    )?;
    let use_dropout = boolean(path, "use_dropout", metadata.get("use_dropout"), false)?;
    let last_layer_dropout = boolean(
        path,
        "last_layer_dropout",
        metadata.get("last_layer_dropout"),
        false,
    )?;
    let dropout_structure = match metadata.get("dropout_structure") {
        None | Some(PickleValue::None) => HypernetworkStructure::a1111_dropout_structure(
            &layer_structure,
            use_dropout,
            last_layer_dropout,
        ),
        Some(value) => float_list(path, "dropout_structure", value)?,
    };
    let structure = HypernetworkStructure {
        layer_structure,
        activation,
        is_layer_norm: boolean(path, "is_layer_norm", metadata.get("is_layer_norm"), false)?,
        weight_init,
        dropout_structure,
        activate_output: boolean(
            path,
            "activate_output",
            metadata.get("activate_output"),
            true,
        )?,
    };
    structure
        .validate()
        .map_err(|error| invalid(path, error.to_string()))?;
    let step = match metadata.get("step") {
        Some(PickleValue::Int(step)) => *step,
        _ => 0,
    };
    let default_name = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("hypernetwork")
        .to_string();
    Ok(HypernetworkFile {
        structure,
        step,
        name: optional_string(path, "name", metadata.get("name"))?.unwrap_or(default_name),
        sd_checkpoint: optional_string(path, "sd_checkpoint", metadata.get("sd_checkpoint"))?,
        sd_checkpoint_name: optional_string(
            path,
            "sd_checkpoint_name",
            metadata.get("sd_checkpoint_name"),
        )?,
        modules,
    })
}
