//! GGUF files: a bounds-checked parser for the header, metadata and tensor directory, and
//! zero-copy access to tensor data through a memory map.
//!
//! Every read is checked against the file length, and counts are checked against the bytes
//! left before anything is allocated, so a truncated or hostile file produces an error naming
//! the file (and the key or tensor), never a panic or a huge allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openlora_kernels::{DType, HostWeight, SharedBytes};

use super::error::{ModelError, Result};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// GGML dimensions, innermost first (`dims[0]` is the row length).
    pub dims: Vec<u64>,
    /// Element type id as stored.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    data: SharedBytes,
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata, by key.
    pub metadata: HashMap<String, Value>,
    /// Tensor directory, by name, in file order.
    pub tensors: Vec<(String, TensorInfo)>,
    data_start: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Malformed {
            path: self.path.to_path_buf(),
            reason: format!("{} (at byte {})", reason.into(), self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err("unexpected end of file (truncated?)"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A count of items each at least `min_item_bytes` long, checked against what is left.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(self.err(format!("{what} count {n} does not fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count("string length", 1)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.u8()?)),
            1 => Value::I64(i64::from(self.u8()? as i8)),
            2 => Value::U64(u64::from(self.u16()?)),
            3 => Value::I64(i64::from(self.u16()? as i16)),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(self.u32()? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.count("array length", 1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every inference runtime we rely on model files not
        // being truncated while mapped (a truncation would raise SIGBUS, not corrupt memory).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Arc::new(map))
    }

    /// Parses a GGUF image already in memory (`path` is used in error messages).
    pub fn parse(path: &Path, data: SharedBytes) -> Result<Self> {
        let buf: &[u8] = (*data).as_ref();
        let mut r = Reader { buf, pos: 0, path };
        if r.take(4)? != b"GGUF" {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.count("tensor", 8 + 4 + 4 + 8)?;
        let n_kv = r.count("metadata", 8 + 4)?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0).map_err(|e| match e {
                ModelError::Malformed { path, reason } => {
                    ModelError::Malformed { path, reason: format!("metadata `{key}`: {reason}") }
                }
                e => e,
            })?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    reason: format!("{n_dims} dimensions (at most 4)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push((name, TensorInfo { dims, ggml_type, offset }));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(ModelError::Config {
                        path: path.to_path_buf(),
                        key: "general.alignment".into(),
                        reason: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;
        Ok(Self { path: path.to_path_buf(), data, version, metadata, tensors, data_start })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn config_err(&self, key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.clone(), key: key.into(), reason: reason.into() }
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| self.config_err(key, "missing"))?;
        v.as_u64().ok_or_else(|| self.config_err(key, format!("expected an unsigned integer, found {v:?}")))
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.config_err(key, "missing"))?;
        v.as_f64().ok_or_else(|| self.config_err(key, format!("expected a number, found {v:?}")))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.config_err(key, "missing"))?;
        v.as_str().ok_or_else(|| self.config_err(key, "expected a string"))
    }

    /// An optional array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| self.config_err(key, "expected strings")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.config_err(key, "expected an array of strings")),
        }
    }

    /// An optional array of integers.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    match v {
                        Value::I64(i) => i32::try_from(*i).ok(),
                        Value::U64(u) => i32::try_from(*u).ok(),
                        _ => None,
                    }
                    .ok_or_else(|| self.config_err(key, "expected 32-bit integers"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.config_err(key, "expected an array of integers")),
        }
    }

    /// The tensor `name` as a 2-D weight (`[rows, cols]`; 1-D tensors have one row), checked
    /// against the file's bounds. `None` when absent.
    pub fn tensor(&self, name: &str) -> Result<Option<HostWeight>> {
        let Some((_, info)) = self.tensors.iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        let terr = |reason: String| ModelError::Tensor { path: self.path.clone(), tensor: name.to_owned(), reason };
        let dtype = DType::from_ggml_id(info.ggml_type)
            .ok_or_else(|| terr(format!("unsupported GGML type id {}", info.ggml_type)))?;
        let cols = *info.dims.first().unwrap_or(&1);
        let rows = info
            .dims
            .iter()
            .skip(1)
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| terr("dimensions overflow".into()))?;
        let (rows, cols) = (
            usize::try_from(rows).map_err(|_| terr("too large".into()))?,
            usize::try_from(cols).map_err(|_| terr("too large".into()))?,
        );
        let row_bytes = dtype
            .row_bytes(cols)
            .ok_or_else(|| terr(format!("row length {cols} is not a multiple of the {} block", dtype.name())))?;
        let len = row_bytes.checked_mul(rows).ok_or_else(|| terr("size overflows".into()))?;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start))
            .ok_or_else(|| terr("offset overflows".into()))?;
        let end = start.checked_add(len).ok_or_else(|| terr("size overflows".into()))?;
        let file_len = (*self.data).as_ref().len();
        if end > file_len {
            return Err(terr(format!(
                "data {start}..{end} runs past the end of the {file_len}-byte file (truncated?)"
            )));
        }
        HostWeight::new(dtype, rows, cols, self.data.clone(), start..end).map(Some).map_err(|e| terr(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a minimal GGUF image with the given metadata strings and f32 tensors.
    pub(crate) fn build_gguf(meta: &[(&str, Value)], tensors: &[(&str, Vec<u64>, DType, Vec<u8>)]) -> Vec<u8> {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend((v.len() as u64).to_le_bytes());
            out.extend(v.as_bytes());
        }
        fn val(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U64(x) => {
                    out.extend(10u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Value::I64(x) => {
                    out.extend(11u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Value::F64(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend((*x as f32).to_le_bytes());
                }
                Value::Bool(b) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(u8::from(*b));
                }
                Value::Str(x) => {
                    out.extend(8u32.to_le_bytes());
                    s(out, x);
                }
                Value::Array(items) => {
                    out.extend(9u32.to_le_bytes());
                    let mut inner: Vec<u8> = Vec::new();
                    let mut ty = 8u32;
                    for it in items {
                        let mut one = Vec::new();
                        val(&mut one, it);
                        ty = u32::from_le_bytes([one[0], one[1], one[2], one[3]]);
                        inner.extend(&one[4..]);
                    }
                    out.extend(ty.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    out.extend(inner);
                }
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            s(&mut out, k);
            val(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, dtype, data) in tensors {
            s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            let id: u32 = match dtype {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::Q4_0 => 2,
                DType::Q4_1 => 3,
                DType::Q8_0 => 8,
                DType::BF16 => 30,
            };
            out.extend(id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, data) in tensors {
            out.extend(data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(Path::new("test.gguf"), Arc::new(bytes))
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let data: Vec<u8> = [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let img =
            build_gguf(&[("general.architecture", Value::Str("llama".into()))], &[("w", vec![3, 2], DType::F32, data)]);
        let g = parse(img).expect("parse");
        assert_eq!(g.get_str("general.architecture").expect("arch"), "llama");
        let w = g.tensor("w").expect("ok").expect("present");
        assert_eq!((w.rows(), w.cols()), (2, 3));
        assert_eq!(w.to_f32(), vec![1., 2., 3., 4., 5., 6.]);
        assert!(g.tensor("missing").expect("ok").is_none());
    }

    #[test]
    fn truncated_files_are_errors_naming_the_problem_at_every_cut() {
        let data: Vec<u8> = (0..64).map(|i| i as u8).collect();
        let img = build_gguf(&[("k", Value::Str("v".into()))], &[("w", vec![16], DType::F32, data)]);
        for cut in 0..img.len() {
            let r = parse(img[..cut].to_vec()).and_then(|g| g.tensor("w").map(|_| ()));
            let e = r.expect_err(&format!("cut at {cut} must fail"));
            let msg = e.to_string();
            assert!(msg.contains("test.gguf"), "{msg}");
        }
    }

    #[test]
    fn unknown_dtype_and_huge_counts_are_errors() {
        let mut img = build_gguf(&[], &[("w", vec![32], DType::F32, vec![0; 128])]);
        let needle = 0u32.to_le_bytes();
        // name "w" (8+1) + n_dims (4) + dim (8) follows the 24-byte header.
        let at = 24 + 9 + 4 + 8;
        assert_eq!(&img[at..at + 4], &needle);
        img[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = parse(img).expect("header parses").tensor("w").expect_err("bad dtype");
        assert!(e.to_string().contains("`w`") && e.to_string().contains("99"), "{e}");

        let mut img = build_gguf(&[], &[]);
        img[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(img).is_err());
    }
}
