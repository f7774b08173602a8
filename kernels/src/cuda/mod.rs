//! The CUDA backend (work in progress in this file's history; see below).

pub mod nvrtc;

/// Why the CUDA backend is unavailable or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library (driver, NVRTC, cuBLAS) could not be loaded.
    #[error("CUDA library unavailable: {0}")]
    NoLibrary(String),
    /// The driver loaded but there is no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC refused a kernel source.
    #[error("NVRTC could not compile {module}: {log}")]
    Nvrtc {
        /// Module and architecture.
        module: String,
        /// NVRTC's log.
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(String),
}
