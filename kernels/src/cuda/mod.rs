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

mod backend;

#[doc(hidden)]
pub use backend::{AttnPlan, LoraPlan, LoraSegmentRef, plan_attention, plan_lora};
pub use backend::{
    CudaBackend, CudaBuf, CudaKvCache, CudaOptions, CudaWeight, GEMM_SCRATCH_VALUES, GEMV_MAX_ROWS, Precision,
    TOPK_MAX, gemm_scratch_bytes, weight_device_bytes,
};

use cudarc::driver::CudaContext;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_mem: usize,
}

impl DeviceInfo {
    /// NVRTC's architecture name for this device, `sm_XY`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

/// Runs `f`, turning a panic (cudarc panics when a symbol is missing from an old library) into
/// an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(CudaError::NoLibrary(format!("{what}: {msg}")))
        }
    }
}

/// Looks for the NVIDIA driver and device `ordinal` without allocating anything on it.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    guarded("probing the CUDA driver", || {
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoLibrary("libcuda (the NVIDIA driver library) was not found".into()));
        }
        cudarc::driver::result::init().map_err(|e| CudaError::NoDevice(format!("cuInit failed: {e:?}")))?;
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice(format!("device cuda:{ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        Ok(DeviceInfo {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            compute_capability: ctx.compute_capability().map_err(|e| CudaError::Driver(format!("{e:?}")))?,
            total_mem: ctx.total_mem().unwrap_or(0),
        })
    })
}
