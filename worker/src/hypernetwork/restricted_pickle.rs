//! A restricted pickle reader for PyTorch checkpoints of state dicts: it never executes
//! anything. It understands the opcodes `torch.save` emits for dicts, lists, tuples, strings,
//! numbers, booleans, None and tensors (protocols 2 to 4), and resolves only these globals:
//!
//! - `collections.OrderedDict` (called with no arguments; a BUILD of its `_metadata` is ignored),
//! - `torch._utils._rebuild_tensor_v2` and `torch._utils._rebuild_parameter`,
//! - `torch.{Float,Half,BFloat16,Double}Storage` (inside persistent ids only).
//!
//! Any other global, opcode or call is refused with an error naming it.
//!
//! The memo holds values, not references: a BINGET returns the value as it was when it was
//! memoized. `torch.save` only re-fetches immutable values (globals, strings, tuples), so this is
//! exact for the files this reader is for; a dict or list that is mutated after being memoized and
//! fetched again would be seen as it was at the BINPUT.

use std::collections::HashMap;

use tch::Kind;

use crate::error::{Result, WorkerError};

/// A global the reader resolves.
#[derive(Debug, Clone, PartialEq)]
pub enum AllowedGlobal {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Kind),
}

/// A reference to a tensor stored in the archive's `data/<storage_key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReference {
    pub storage_key: String,
    pub kind: Kind,
    /// Elements in the storage.
    pub storage_numel: i64,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// A value of the restricted pickle language.
#[derive(Debug, Clone, PartialEq)]
pub enum PickleValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Tuple(Vec<PickleValue>),
    List(Vec<PickleValue>),
    /// A dict or an OrderedDict, in insertion order.
    Dict(Vec<(PickleValue, PickleValue)>),
    Global(AllowedGlobal),
    Storage {
        key: String,
        kind: Kind,
        numel: i64,
    },
    Tensor(TensorReference),
    Mark,
}

fn refused(message: String) -> WorkerError {
    WorkerError::Hypernetwork {
        item: "data.pkl".to_string(),
        message,
    }
}

fn resolve_global(module: &str, name: &str) -> Result<AllowedGlobal> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(AllowedGlobal::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(AllowedGlobal::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(AllowedGlobal::RebuildParameter),
        ("torch", "FloatStorage") => Ok(AllowedGlobal::Storage(Kind::Float)),
        ("torch", "HalfStorage") => Ok(AllowedGlobal::Storage(Kind::Half)),
        ("torch", "BFloat16Storage") => Ok(AllowedGlobal::Storage(Kind::BFloat16)),
        ("torch", "DoubleStorage") => Ok(AllowedGlobal::Storage(Kind::Double)),
        _ => Err(refused(format!(
            "pickle global `{module}.{name}` is not allowed (only OrderedDict, tensor rebuilds and float storages)"
        ))),
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8]> {
        let end = self
            .position
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| refused(format!("truncated at byte {}", self.position)))?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.position..];
        let length = rest
            .iter()
            .position(|byte| *byte == b'\n')
            .ok_or_else(|| refused("unterminated GLOBAL line".to_string()))?;
        let line = std::str::from_utf8(&rest[..length])
            .map_err(|_| refused("GLOBAL line is not utf-8".to_string()))?
            .to_string();
        self.position += length + 1;
        Ok(line)
    }

    fn utf8(&mut self, length: usize) -> Result<String> {
        let bytes = self.take(length)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| refused(format!("string before byte {} is not utf-8", self.position)))
    }
}

struct Machine {
    stack: Vec<PickleValue>,
    memo: HashMap<u64, PickleValue>,
}

impl Machine {
    fn pop(&mut self) -> Result<PickleValue> {
        self.stack
            .pop()
            .ok_or_else(|| refused("stack underflow".to_string()))
    }

    /// Pops everything above the topmost MARK (and the MARK).
    fn pop_mark(&mut self) -> Result<Vec<PickleValue>> {
        let mark = self
            .stack
            .iter()
            .rposition(|value| matches!(value, PickleValue::Mark))
            .ok_or_else(|| refused("no MARK on the stack".to_string()))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Result<&mut PickleValue> {
        self.stack
            .last_mut()
            .ok_or_else(|| refused("stack underflow".to_string()))
    }

    fn set_items(&mut self, items: Vec<PickleValue>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(refused("SETITEMS with an odd number of items".to_string()));
        }
        let PickleValue::Dict(entries) = self.top()? else {
            return Err(refused(
                "SETITEM(S) on something that is not a dict".to_string(),
            ));
        };
        let mut iterator = items.into_iter();
        while let (Some(key), Some(value)) = (iterator.next(), iterator.next()) {
            match entries.iter_mut().find(|(existing, _)| *existing == key) {
                Some(entry) => entry.1 = value,
                None => entries.push((key, value)),
            }
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<PickleValue>) -> Result<()> {
        let PickleValue::List(list) = self.top()? else {
            return Err(refused(
                "APPEND(S) on something that is not a list".to_string(),
            ));
        };
        list.extend(items);
        Ok(())
    }

    fn reduce(&mut self) -> Result<()> {
        let arguments = self.pop()?;
        let callable = self.pop()?;
        let PickleValue::Tuple(arguments) = arguments else {
            return Err(refused("REDUCE arguments are not a tuple".to_string()));
        };
        let value = match callable {
            PickleValue::Global(AllowedGlobal::OrderedDict) => {
                if !arguments.is_empty() {
                    return Err(refused("OrderedDict called with arguments".to_string()));
                }
                PickleValue::Dict(Vec::new())
            }
            PickleValue::Global(AllowedGlobal::RebuildTensorV2) => rebuild_tensor(arguments)?,
            PickleValue::Global(AllowedGlobal::RebuildParameter) => match arguments.first() {
                Some(PickleValue::Tensor(tensor)) => PickleValue::Tensor(tensor.clone()),
                _ => return Err(refused("_rebuild_parameter of a non-tensor".to_string())),
            },
            other => return Err(refused(format!("REDUCE of {other:?} is not allowed"))),
        };
        self.stack.push(value);
        Ok(())
    }

    fn persistent_load(&mut self) -> Result<()> {
        let PickleValue::Tuple(pid) = self.pop()? else {
            return Err(refused("persistent id is not a tuple".to_string()));
        };
        match pid.as_slice() {
            [PickleValue::String(tag), PickleValue::Global(AllowedGlobal::Storage(kind)), PickleValue::String(key), PickleValue::String(_location), PickleValue::Int(numel)]
                if tag == "storage" =>
            {
                self.stack.push(PickleValue::Storage {
                    key: key.clone(),
                    kind: *kind,
                    numel: *numel,
                });
                Ok(())
            }
            _ => Err(refused(format!("persistent id {pid:?} is not a storage"))),
        }
    }
}

fn int_tuple(value: &PickleValue, field: &str) -> Result<Vec<i64>> {
    let PickleValue::Tuple(items) = value else {
        return Err(refused(format!("tensor {field} is not a tuple")));
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Int(value) => Ok(*value),
            _ => Err(refused(format!("tensor {field} holds a non-int"))),
        })
        .collect()
}

fn rebuild_tensor(arguments: Vec<PickleValue>) -> Result<PickleValue> {
    if arguments.len() < 4 {
        return Err(refused(format!(
            "_rebuild_tensor_v2 takes at least 4 arguments, got {}",
            arguments.len()
        )));
    }
    let PickleValue::Storage { key, kind, numel } = &arguments[0] else {
        return Err(refused("_rebuild_tensor_v2 of a non-storage".to_string()));
    };
    let PickleValue::Int(offset) = arguments[1] else {
        return Err(refused("tensor storage offset is not an int".to_string()));
    };
    let size = int_tuple(&arguments[2], "size")?;
    let stride = int_tuple(&arguments[3], "stride")?;
    if size.len() != stride.len()
        || size.iter().chain(&stride).any(|value| *value < 0)
        || offset < 0
    {
        return Err(refused(format!(
            "tensor of storage `{key}` has an invalid size {size:?} / stride {stride:?}"
        )));
    }
    // i128: sizes and strides come from the file and may be absurd.
    let last_index = size
        .iter()
        .zip(&stride)
        .map(|(size, stride)| i128::from((size - 1).max(0)) * i128::from(*stride))
        .sum::<i128>()
        + i128::from(offset);
    let empty = size.contains(&0);
    if !empty && last_index >= i128::from(*numel) {
        return Err(refused(format!(
            "tensor of storage `{key}` reaches element {last_index}, beyond its {numel} elements"
        )));
    }
    Ok(PickleValue::Tensor(TensorReference {
        storage_key: key.clone(),
        kind: *kind,
        storage_numel: *numel,
        offset,
        size,
        stride,
    }))
}

/// Runs the restricted machine over `bytes` and returns the unpickled value.
pub fn read_pickle(bytes: &[u8]) -> Result<PickleValue> {
    let mut cursor = Cursor { bytes, position: 0 };
    let mut machine = Machine {
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let at = cursor.position;
        let opcode = cursor.byte()?;
        match opcode {
            0x80 => {
                let protocol = cursor.byte()?;
                if !(2..=5).contains(&protocol) {
                    return Err(refused(format!(
                        "pickle protocol {protocol} is not supported"
                    )));
                }
            }
            0x95 => {
                cursor.u64()?; // FRAME: a length hint only
            }
            b'.' => return machine.pop(),
            b'(' => machine.stack.push(PickleValue::Mark),
            b'N' => machine.stack.push(PickleValue::None),
            0x88 => machine.stack.push(PickleValue::Bool(true)),
            0x89 => machine.stack.push(PickleValue::Bool(false)),
            b'K' => machine
                .stack
                .push(PickleValue::Int(i64::from(cursor.byte()?))),
            b'M' => machine
                .stack
                .push(PickleValue::Int(i64::from(cursor.u16()?))),
            b'J' => machine
                .stack
                .push(PickleValue::Int(i64::from(cursor.u32()? as i32))),
            0x8a => {
                let length = usize::from(cursor.byte()?);
                if length > 8 {
                    return Err(refused(format!("LONG1 of {length} bytes is too large")));
                }
                let bytes = cursor.take(length)?;
                let mut buffer = if bytes.last().is_some_and(|last| last & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                buffer[..length].copy_from_slice(bytes);
                machine
                    .stack
                    .push(PickleValue::Int(i64::from_le_bytes(buffer)));
            }
            b'G' => {
                let bytes: [u8; 8] = cursor.take(8)?.try_into().expect("8 bytes");
                machine
                    .stack
                    .push(PickleValue::Float(f64::from_be_bytes(bytes)));
            }
            b'X' => {
                let length = cursor.u32()? as usize;
                let text = cursor.utf8(length)?;
                machine.stack.push(PickleValue::String(text));
            }
            0x8c => {
                let length = usize::from(cursor.byte()?);
                let text = cursor.utf8(length)?;
                machine.stack.push(PickleValue::String(text));
            }
            0x8d => {
                let length = usize::try_from(cursor.u64()?)
                    .map_err(|_| refused("BINUNICODE8 length overflows".to_string()))?;
                let text = cursor.utf8(length)?;
                machine.stack.push(PickleValue::String(text));
            }
            b')' => machine.stack.push(PickleValue::Tuple(Vec::new())),
            b't' => {
                let items = machine.pop_mark()?;
                machine.stack.push(PickleValue::Tuple(items));
            }
            0x85..=0x87 => {
                let count = usize::from(opcode - 0x84);
                if machine.stack.len() < count {
                    return Err(refused("stack underflow".to_string()));
                }
                let items = machine.stack.split_off(machine.stack.len() - count);
                if items.iter().any(|item| matches!(item, PickleValue::Mark)) {
                    return Err(refused("MARK inside a TUPLE1-3".to_string()));
                }
                machine.stack.push(PickleValue::Tuple(items));
            }
            b']' => machine.stack.push(PickleValue::List(Vec::new())),
            b'l' => {
                let items = machine.pop_mark()?;
                machine.stack.push(PickleValue::List(items));
            }
            b'a' => {
                let item = machine.pop()?;
                machine.append(vec![item])?;
            }
            b'e' => {
                let items = machine.pop_mark()?;
                machine.append(items)?;
            }
            b'}' => machine.stack.push(PickleValue::Dict(Vec::new())),
            b'd' => {
                let items = machine.pop_mark()?;
                machine.stack.push(PickleValue::Dict(Vec::new()));
                machine.set_items(items)?;
            }
            b's' => {
                let value = machine.pop()?;
                let key = machine.pop()?;
                machine.set_items(vec![key, value])?;
            }
            b'u' => {
                let items = machine.pop_mark()?;
                machine.set_items(items)?;
            }
            b'q' | b'r' | 0x94 => {
                let key = match opcode {
                    b'q' => u64::from(cursor.byte()?),
                    b'r' => u64::from(cursor.u32()?),
                    _ => machine.memo.len() as u64,
                };
                let top = machine.top()?.clone();
                machine.memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = if opcode == b'h' {
                    u64::from(cursor.byte()?)
                } else {
                    u64::from(cursor.u32()?)
                };
                let value = machine
                    .memo
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| refused(format!("memo key {key} is not set")))?;
                machine.stack.push(value);
            }
            b'c' => {
                let module = cursor.line()?;
                let name = cursor.line()?;
                let global = resolve_global(&module, &name)?;
                machine.stack.push(PickleValue::Global(global));
            }
            0x93 => {
                let name = machine.pop()?;
                let module = machine.pop()?;
                let (PickleValue::String(module), PickleValue::String(name)) = (module, name)
                else {
                    return Err(refused("STACK_GLOBAL of non-strings".to_string()));
                };
                let global = resolve_global(&module, &name)?;
                machine.stack.push(PickleValue::Global(global));
            }
            b'R' => machine.reduce()?,
            b'Q' => machine.persistent_load()?,
            b'b' => {
                let state = machine.pop()?;
                match (machine.top()?, &state) {
                    // OrderedDict's `_metadata` (module versions): not needed to load weights.
                    (PickleValue::Dict(_), PickleValue::Dict(_)) => {}
                    (target, _) => {
                        return Err(refused(format!(
                            "BUILD of {} is not allowed",
                            short_name(target)
                        )))
                    }
                }
            }
            other => {
                return Err(refused(format!(
                    "pickle opcode 0x{other:02x} at byte {at} is not allowed"
                )))
            }
        }
    }
}

fn short_name(value: &PickleValue) -> &'static str {
    match value {
        PickleValue::Tensor(_) => "a tensor",
        PickleValue::List(_) => "a list",
        PickleValue::Tuple(_) => "a tuple",
        _ => "this value",
    }
}
