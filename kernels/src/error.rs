//! The one error type of the compute layer.

/// A kernel refused its inputs. Kernels check shapes before touching memory, so a caller's
/// mistake is reported, never turned into an out-of-bounds read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Two operands (or an operand and its declared shape) disagree.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The operation that checked.
        op: &'static str,
        /// The sizes involved.
        detail: String,
    },
    /// The raw bytes of a tensor do not fit its declared dtype and shape.
    #[error("tensor data: {0}")]
    Data(String),
    /// The operation is not available for this dtype on this backend.
    #[error("{op} is not supported for dtype {dtype}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The dtype's name.
        dtype: &'static str,
    },
    /// A KV-cache slot or block index is outside the cache.
    #[error("kv cache: {0}")]
    KvCache(String),
    /// The device (GPU driver, kernel launch, device memory) failed or cannot run this shape.
    #[error("device: {0}")]
    Device(String),
}

/// Shorthand for kernel results.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Returns a shape error unless `cond` holds.
pub(crate) fn ensure_shape(cond: bool, op: &'static str, detail: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { Err(KernelError::Shape { op, detail: detail() }) }
}
