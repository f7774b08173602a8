//! Weights as they come from a file: a dtype, a 2-D shape and bytes that may be memory-mapped.
//!
//! A `HostWeight` never copies on its own: it holds a shared handle to the bytes (an mmap of the
//! model file, or an owned buffer when a loader had to transform them) and a byte range. Backends
//! turn it into their own prepared form (`Backend::prepare_weight`).

use std::ops::Range;
use std::sync::Arc;

use crate::error::{KernelError, Result};
use crate::quant::{DType, dequantize_row};

/// Shared, immutable bytes: an mmap, a `Vec<u8>`, anything that derefs to `[u8]`.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A 2-D weight `[rows, cols]` in row-major order (PyTorch's `[out_features, in_features]` for
/// linear layers); 1-D tensors (norms, biases) have `rows == 1`.
#[derive(Clone)]
pub struct HostWeight {
    dtype: DType,
    // 32 bits each: a server may hold thousands of adapters of ~60 small tensors each.
    rows: u32,
    cols: u32,
    bytes: SharedBytes,
    range: Range<usize>,
}

impl std::fmt::Debug for HostWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWeight")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.range.len())
            .finish()
    }
}

impl HostWeight {
    /// Wraps `bytes[range]` as a `[rows, cols]` tensor of `dtype`, checking that the byte length
    /// matches exactly and that the columns are a whole number of blocks.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: SharedBytes, range: Range<usize>) -> Result<Self> {
        let row_bytes = dtype.row_bytes(cols).ok_or_else(|| {
            KernelError::Data(format!(
                "{cols} columns is not a multiple of the {} block size {}",
                dtype.name(),
                dtype.block_len()
            ))
        })?;
        let want = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| KernelError::Data(format!("shape [{rows}, {cols}] overflows")))?;
        if range.len() != want {
            return Err(KernelError::Data(format!(
                "shape [{rows}, {cols}] of {} needs {want} bytes, found {}",
                dtype.name(),
                range.len()
            )));
        }
        let dim = |n: usize| {
            u32::try_from(n).map_err(|_| KernelError::Data(format!("shape [{rows}, {cols}] has a dimension over 2^32")))
        };
        let (rows32, cols32) = (dim(rows)?, dim(cols)?);
        let total = (*bytes).as_ref().len();
        if range.end > total || range.start > range.end {
            return Err(KernelError::Data(format!(
                "byte range {}..{} is outside the {total}-byte buffer (truncated file?)",
                range.start, range.end
            )));
        }
        Ok(Self { dtype, rows: rows32, cols: cols32, bytes, range })
    }

    /// An owned f32 tensor.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        let bytes: Vec<u8> = bytemuck::cast_slice(values).to_vec();
        let len = bytes.len();
        Self::new(DType::F32, rows, cols, Arc::new(bytes), 0..len)
    }

    /// An owned tensor from raw bytes in `dtype`'s format.
    pub fn from_bytes(dtype: DType, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<Self> {
        let len = bytes.len();
        Self::new(dtype, rows, cols, Arc::new(bytes), 0..len)
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of rows (output features for a linear layer).
    pub fn rows(&self) -> usize {
        self.rows as usize
    }

    /// Number of columns (input features for a linear layer).
    pub fn cols(&self) -> usize {
        self.cols as usize
    }

    /// The raw bytes, row-major.
    pub fn bytes(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }

    /// Tells the OS this weight's bytes will not be read for a while (a backend made its own
    /// copy of them): `madvise(MADV_PAGEOUT)` on the whole pages inside them. Pages of a
    /// memory-mapped model file leave resident memory and come back from the file if touched
    /// again (the embedding gather reads a few rows of a tied table); anonymous memory keeps
    /// its contents (it can only go to swap). Only a hint: errors are ignored, and other
    /// systems do nothing.
    pub fn advise_not_needed(&self) {
        #[cfg(target_os = "linux")]
        {
            let b = self.bytes();
            // SAFETY: sysconf has no preconditions.
            let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
            let start = (b.as_ptr() as usize).next_multiple_of(page);
            let end = (b.as_ptr() as usize + b.len()) / page * page;
            if end > start {
                // SAFETY: [start, end) lies inside `b`, which stays mapped and readable; PAGEOUT
                // changes no contents (file pages are re-read, anonymous ones swapped), so every
                // reference to these bytes stays valid.
                unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
            }
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.range.len() / self.rows().max(1)
    }

    /// The raw bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// Dequantizes the whole tensor to f32 (row-major).
    pub fn to_f32(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        if cols > 0 {
            for (r, dst) in out.chunks_exact_mut(cols).enumerate() {
                dequantize_row(self.dtype, self.row(r), dst);
            }
        }
        out
    }

    /// A new owned tensor whose row `i` is this tensor's row `order[i]`. Used to undo GGUF's
    /// row permutation of attention projections without dequantizing.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows() || order.iter().any(|&r| r >= self.rows()) {
            return Err(KernelError::Shape {
                op: "permute_rows",
                detail: format!("{} indices for {} rows", order.len(), self.rows),
            });
        }
        let mut bytes = Vec::with_capacity(self.range.len());
        for &r in order {
            bytes.extend_from_slice(self.row(r));
        }
        Self::from_bytes(self.dtype, self.rows(), self.cols(), bytes)
    }
}
