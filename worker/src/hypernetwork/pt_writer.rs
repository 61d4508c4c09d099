//! Writes AUTOMATIC1111's hypernetwork `.pt` by hand (no crate writes PyTorch's format).
//!
//! The file is what `torch.save` (zip serialization, pickle protocol 2) writes for A1111's
//! `Hypernetwork.save` dict, restricted to what A1111's safe loader accepts:
//!
//! - a zip whose entries are all **stored** (not deflated), 64-byte aligned like torch's writer,
//!   and only `<name>/data.pkl`, `<name>/data/<N>` and `<name>/version` (`3`). No `byteorder`,
//!   `.format_version` or `.data/serialization_id`: older A1111 loaders refuse them.
//! - `data.pkl`: protocol 2. The top-level dict maps each module size (int) to a tuple
//!   `(k_state_dict, v_state_dict)`, each a `collections.OrderedDict` of A1111 keys → tensors, and
//!   holds every metadata key: `layer_structure` (list of floats), `activation_func`,
//!   `is_layer_norm`, `weight_initialization`, `use_dropout`, `dropout_structure`,
//!   `last_layer_dropout`, `activate_output`, `step`, `name`, `sd_checkpoint`,
//!   `sd_checkpoint_name`.
//! - each tensor is `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
//!   OrderedDict())` where `storage` is the persistent id
//!   `('storage', torch.FloatStorage|HalfStorage, '<N>', 'cpu', numel)`, whose bytes
//!   (little-endian, contiguous) are `<name>/data/<N>`.
//!
//! Every global is in `torch.load(weights_only=True)`'s allowed set.

use std::io::Write;
use std::path::Path;

use tch::{Device, Kind, Tensor};
use zip::write::FileOptions;
use zip::CompressionMethod;

use super::pt_file::HypernetworkFile;
use crate::error::{Result, WorkerError};

/// The element type tensors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtDtype {
    Float32,
    Float16,
}

impl PtDtype {
    fn kind(self) -> Kind {
        match self {
            PtDtype::Float32 => Kind::Float,
            PtDtype::Float16 => Kind::Half,
        }
    }

    fn storage_name(self) -> &'static str {
        match self {
            PtDtype::Float32 => "FloatStorage",
            PtDtype::Float16 => "HalfStorage",
        }
    }

    fn element_size(self) -> usize {
        match self {
            PtDtype::Float32 => 4,
            PtDtype::Float16 => 2,
        }
    }
}

// Pickle opcodes used by the writer (a subset of protocol 2).
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';
const BINPERSID: u8 = b'Q';
const BINUNICODE: u8 = b'X';
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE2: u8 = 0x86;
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const SETITEMS: u8 = b'u';

/// Emits pickle opcodes and collects the storages' bytes.
struct PickleEmitter {
    out: Vec<u8>,
    storages: Vec<Vec<u8>>,
    dtype: PtDtype,
}

impl PickleEmitter {
    fn op(&mut self, opcode: u8) {
        self.out.push(opcode);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.op(GLOBAL);
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }

    fn string(&mut self, value: &str) {
        self.op(BINUNICODE);
        self.out
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.out.extend_from_slice(value.as_bytes());
    }

    fn optional_string(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.string(value),
            None => self.op(NONE),
        }
    }

    fn int(&mut self, value: i64) {
        if (0..=0xff).contains(&value) {
            self.op(BININT1);
            self.out.push(value as u8);
        } else if (0..=0xffff).contains(&value) {
            self.op(BININT2);
            self.out.extend_from_slice(&(value as u16).to_le_bytes());
        } else if i32::try_from(value).is_ok() {
            self.op(BININT);
            self.out.extend_from_slice(&(value as i32).to_le_bytes());
        } else {
            self.op(LONG1);
            self.out.push(8);
            self.out.extend_from_slice(&value.to_le_bytes());
        }
    }

    fn float(&mut self, value: f64) {
        self.op(BINFLOAT);
        self.out.extend_from_slice(&value.to_be_bytes());
    }

    fn bool(&mut self, value: bool) {
        self.op(if value { NEWTRUE } else { NEWFALSE });
    }

    fn float_list(&mut self, values: &[f64]) {
        self.op(EMPTY_LIST);
        if values.is_empty() {
            return;
        }
        self.op(MARK);
        for value in values {
            self.float(*value);
        }
        self.op(APPENDS);
    }

    fn int_tuple(&mut self, values: &[i64]) {
        if values.is_empty() {
            self.op(EMPTY_TUPLE);
            return;
        }
        self.op(MARK);
        for value in values {
            self.int(*value);
        }
        self.op(TUPLE);
    }

    /// `collections.OrderedDict()`; items follow with MARK … SETITEMS.
    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(EMPTY_TUPLE);
        self.op(REDUCE);
    }

    fn tensor(&mut self, key: &str, tensor: &Tensor) -> Result<()> {
        let data = tensor
            .detach()
            .to_device(Device::Cpu)
            .to_kind(self.dtype.kind())
            .contiguous();
        let size = data.size();
        let numel = data.numel();
        let mut bytes = vec![0u8; numel * self.dtype.element_size()];
        data.f_copy_data_u8(&mut bytes, numel)
            .map_err(WorkerError::torch(format!(
                "reading tensor `{key}` for export"
            )))?;
        let storage_key = self.storages.len();
        self.storages.push(bytes);
        let mut stride = vec![1i64; size.len()];
        for index in (0..size.len().saturating_sub(1)).rev() {
            stride[index] = stride[index + 1] * size[index + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(MARK);
        self.op(MARK);
        self.string("storage");
        self.global("torch", self.dtype.storage_name());
        self.string(&storage_key.to_string());
        self.string("cpu");
        self.int(numel as i64);
        self.op(TUPLE);
        self.op(BINPERSID);
        self.int(0);
        self.int_tuple(&size);
        self.int_tuple(&stride);
        self.bool(false);
        self.empty_ordered_dict();
        self.op(TUPLE);
        self.op(REDUCE);
        Ok(())
    }

    fn state_dict(&mut self, entries: &[(String, Tensor)]) -> Result<()> {
        self.empty_ordered_dict();
        if entries.is_empty() {
            return Ok(());
        }
        self.op(MARK);
        for (key, tensor) in entries {
            self.string(key);
            self.tensor(key, tensor)?;
        }
        self.op(SETITEMS);
        Ok(())
    }
}

/// The pickle (`data.pkl`) and the storages (`data/<N>`) of a hypernetwork file.
pub fn pickle_hypernetwork(
    file: &HypernetworkFile,
    dtype: PtDtype,
) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let structure = &file.structure;
    let mut emitter = PickleEmitter {
        out: Vec::new(),
        storages: Vec::new(),
        dtype,
    };
    emitter.op(PROTO);
    emitter.out.push(2);
    emitter.op(EMPTY_DICT);
    emitter.op(MARK);
    for (size, [key_state, value_state]) in &file.modules {
        emitter.int(*size);
        emitter.state_dict(key_state)?;
        emitter.state_dict(value_state)?;
        emitter.op(TUPLE2);
    }
    emitter.string("step");
    emitter.int(file.step);
    emitter.string("name");
    emitter.string(&file.name);
    emitter.string("layer_structure");
    emitter.float_list(&structure.layer_structure);
    emitter.string("activation_func");
    emitter.string(structure.activation.as_str());
    emitter.string("is_layer_norm");
    emitter.bool(structure.is_layer_norm);
    emitter.string("weight_initialization");
    emitter.string(structure.weight_init.as_str());
    emitter.string("sd_checkpoint");
    emitter.optional_string(file.sd_checkpoint.as_deref());
    emitter.string("sd_checkpoint_name");
    emitter.optional_string(file.sd_checkpoint_name.as_deref());
    emitter.string("activate_output");
    emitter.bool(structure.activate_output);
    emitter.string("use_dropout");
    emitter.bool(structure.use_dropout());
    emitter.string("dropout_structure");
    emitter.float_list(&structure.dropout_structure);
    emitter.string("last_layer_dropout");
    emitter.bool(structure.last_layer_dropout());
    emitter.op(SETITEMS);
    emitter.op(STOP);
    Ok((emitter.out, emitter.storages))
}

/// The archive folder name torch.save would use: the file stem, kept to `[A-Za-z0-9_-]`.
fn archive_name(path: &Path) -> String {
    let stem: String = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("archive")
        .chars()
        .filter(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '-'))
        .collect();
    if stem.is_empty() {
        "archive".to_string()
    } else {
        stem
    }
}

/// Writes the `.pt` to `path` (through a temporary file renamed into place).
pub fn write_pt(file: &HypernetworkFile, path: &Path, dtype: PtDtype) -> Result<()> {
    file.structure.validate()?;
    let (pickle, storages) = pickle_hypernetwork(file, dtype)?;
    let name = archive_name(path);
    let staging = path.with_extension("pt.partial");
    let zip_error = |error: zip::result::ZipError| WorkerError::Hypernetwork {
        item: path.display().to_string(),
        message: format!("writing the zip: {error}"),
    };
    let output = std::fs::File::create(&staging).map_err(WorkerError::io(&staging))?;
    let mut zip = zip::ZipWriter::new(output);
    let options = FileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    let mut entries: Vec<(String, &[u8])> = vec![(format!("{name}/data.pkl"), &pickle)];
    for (index, bytes) in storages.iter().enumerate() {
        entries.push((format!("{name}/data/{index}"), bytes));
    }
    entries.push((format!("{name}/version"), b"3\n"));
    for (entry_name, bytes) in entries {
        zip.start_file_aligned(entry_name, options, 64)
            .map_err(zip_error)?;
        zip.write_all(bytes).map_err(WorkerError::io(&staging))?;
    }
    zip.finish().map_err(zip_error)?;
    std::fs::rename(&staging, path).map_err(WorkerError::io(path))?;
    Ok(())
}
