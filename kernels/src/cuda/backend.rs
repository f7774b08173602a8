//! [`CudaBackend`]: the [`Backend`] trait on an NVIDIA GPU, through cudarc (driver API, NVRTC,
//! cuBLAS, all loaded at run time).
//!
//! Design:
//! - **Weights are held once.** A block-quantized weight (Q8_0, Q4_0, Q4_1) stays in its stored
//!   format: the decode path (`gemv`: few rows, dequantized in registers, f32 accumulation, the
//!   weight streamed once) reads it as is, and a product with many rows (prefill) dequantizes
//!   a slice of its rows at a time into one scratch buffer the backend reuses (at most
//!   [`GEMM_SCRATCH_VALUES`] values) and multiplies each slice into its columns of the output:
//!   cuBLAS `GemmEx` (bf16 inputs, f32 accumulation and output) when libcublas is present, the
//!   built-in tiled kernel otherwise. An f32/f16/bf16 weight is held as one dense copy in the
//!   backend's [`Precision`]. 1-D tensors are kept in f32. [`weight_device_bytes`] says what a
//!   weight costs; `openlora cuda plan` adds a model's up before any GPU is involved.
//! - **Activations** are f32, like the CPU backend's, so every kernel is compared with the CPU
//!   reference one to one.
//! - **Streams**: compute runs on one stream; uploads of weights (model load, the adapter
//!   pager's loads on its loader threads) run on a second stream, so host-to-device copies of
//!   adapters overlap the forward passes in flight. A weight is handed out only after its copy
//!   stream synchronized; dropping one first makes the copy stream wait for the compute work
//!   queued so far, so its stream-ordered free never overtakes a kernel still reading it.
//!   (cudarc's per-buffer event tracking is off: it would record an event per kernel argument.)
//! - **KV cache**: pools in device memory in the CPU's slot layout, f32 or (with
//!   [`CudaOptions::kv_precision`] = bf16) half the bytes; the engine's block tables are
//!   uploaded per call.
//! - **Sampling**: [`Backend::pick_rows`] reduces greedy and top-k rows on the device (argmax /
//!   top-k kernels that also flag non-finite rows), so such a step reads back a few values per
//!   row instead of the vocabulary.
//!
//! Non-guarantees: results are not bit-identical to the CPU (summation order, FMA contraction;
//! bf16 rounding of GEMM inputs under [`Precision::Bf16`]). The LoRA expand kernel adds with
//! atomics, so rows with several adapters may differ in the last bit between runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc;
use super::{CudaError, DeviceInfo, guarded, probe};
use crate::backend::{AttnSeq, Backend, KvLayout, LoraSegment, PickedRow, RopeTable, RowPick};
use crate::error::{KernelError, Result, ensure_shape};
use crate::quant::DType;
use crate::weight::HostWeight;

/// Rows up to which `matmul` uses the streaming `gemv` kernel (must equal GEMV_MAX_ROWS in
/// kernels/cuda/matmul.cu).
pub const GEMV_MAX_ROWS: usize = 8;
/// Keys per split of the decode kernel, at least; longer contexts get longer splits so a call
/// never has more than [`ATT_MAX_SPLITS`] (bounding its scratch buffers).
const ATT_PARTITION: usize = 256;
const ATT_MAX_SPLITS: usize = 32;
const ATT_MAX_GROUP: usize = 8;
const ATT_MAX_HEAD_DIM: usize = 128;
/// The largest `k` the top-k kernel serves.
pub const TOPK_MAX: usize = 64;
/// Most values of the scratch buffer a quantized weight's rows are dequantized into for a
/// many-row product (32 MiB in bf16, 64 MiB in f32).
pub const GEMM_SCRATCH_VALUES: usize = 16 << 20;

/// Number type of the dense weight copies (GEMM and LoRA operands).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// bfloat16 operands, f32 accumulation: half the memory and tensor-core GEMMs.
    #[default]
    Bf16,
    /// f32 operands: matches the CPU reference most closely.
    F32,
}

impl Precision {
    /// "bf16" or "f32".
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// How to start a [`CudaBackend`].
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Dense weight precision.
    pub precision: Precision,
    /// KV cache values: f32 (the default, as the CPU) or bf16 (half the bytes).
    pub kv_precision: Precision,
    /// Where compiled cubins are cached (`None`: [`nvrtc::default_cache_dir`]).
    pub kernel_cache: Option<PathBuf>,
    /// Use the built-in GEMM even when cuBLAS is present (for tests).
    pub no_cublas: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            ordinal: 0,
            precision: Precision::Bf16,
            kv_precision: Precision::F32,
            kernel_cache: None,
            no_cublas: false,
        }
    }
}

/// Bytes a weight of `dtype` and shape `[rows, cols]` takes on the device once prepared with
/// dense precision `precision`: a block-quantized weight its stored bytes alone, any other its
/// dense copy; a `[1, n]` tensor also keeps an f32 vector (norm weights, biases).
pub fn weight_device_bytes(dtype: DType, rows: usize, cols: usize, precision: Precision) -> usize {
    let n = rows * cols;
    let vector = if rows == 1 { cols * 4 } else { 0 };
    let stored = if dtype.is_quantized() {
        dtype.row_bytes(cols).unwrap_or(0) * rows
    } else {
        match precision {
            Precision::Bf16 => n * 2,
            Precision::F32 => n * 4,
        }
    };
    stored + vector
}

/// Bytes of the scratch buffer a many-row product with a quantized `[rows, cols]` weight uses.
pub fn gemm_scratch_bytes(rows: usize, cols: usize, precision: Precision) -> usize {
    let values = (rows * cols).min(GEMM_SCRATCH_VALUES.max(cols));
    values * if precision == Precision::Bf16 { 2 } else { 4 }
}
/// An f32 activation buffer on the device.
#[derive(Debug)]
pub struct CudaBuf {
    data: CudaSlice<f32>,
    len: usize,
}

impl CudaBuf {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Dense copy of a 2-D weight.
#[derive(Debug)]
enum Dense {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// A weight on the device.
#[derive(Debug)]
pub struct CudaWeight {
    dtype: DType,
    rows: usize,
    cols: usize,
    /// Stored blocks (block-quantized weights only).
    raw: Option<CudaSlice<u8>>,
    /// Dense copy in the backend's precision (every other weight).
    dense: Option<Dense>,
    /// f32 values of a `[1, n]` tensor (norm weights, biases; also kept for rank-1 LoRA
    /// factors, which are 2-D too).
    vector: Option<CudaSlice<f32>>,
    /// (copy stream, compute stream): dropping the weight orders its frees (on the copy stream
    /// that allocated it) after the compute work queued so far.
    streams: (Arc<CudaStream>, Arc<CudaStream>),
}

impl Drop for CudaWeight {
    fn drop(&mut self) {
        // The slices are freed (stream-ordered, on the copy stream) right after this; make the
        // copy stream wait for every kernel already queued on the compute stream, which may
        // still read them. Nothing blocks on the host.
        let (copy, compute) = &self.streams;
        let _ = copy.join(compute);
    }
}

/// What the row-reading kernels (gemv, embedding) read: the stored blocks of a quantized
/// weight, else the dense copy.
enum Stored<'a> {
    Raw(&'a CudaSlice<u8>),
    Bf16(&'a CudaSlice<u16>),
    F32(&'a CudaSlice<f32>),
}

impl CudaWeight {
    fn stored(&self, op: &'static str) -> Result<(Stored<'_>, i32)> {
        match (&self.raw, &self.dense) {
            (Some(r), _) => Ok((Stored::Raw(r), dtype_code(self.dtype))),
            (None, Some(Dense::Bf16(d))) => Ok((Stored::Bf16(d), dtype_code(DType::BF16))),
            (None, Some(Dense::F32(d))) => Ok((Stored::F32(d), dtype_code(DType::F32))),
            (None, None) => {
                Err(KernelError::Shape { op, detail: format!("[{}, {}] has no 2-D data", self.rows, self.cols) })
            }
        }
    }

    /// Bytes this weight holds in device memory.
    pub fn device_bytes(&self) -> usize {
        let dense = match &self.dense {
            Some(Dense::Bf16(s)) => s.len() * 2,
            Some(Dense::F32(s)) => s.len() * 4,
            None => 0,
        };
        self.raw.as_ref().map_or(0, |r| r.len()) + dense + self.vector.as_ref().map_or(0, |v| v.len() * 4)
    }
}

/// One layer's paged K/V pools on the device.
#[derive(Debug)]
pub struct CudaKvCache {
    /// Geometry.
    pub layout: KvLayout,
    pools: KvPools,
}

#[derive(Debug)]
enum KvPools {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    Bf16(CudaSlice<u16>, CudaSlice<u16>),
}

impl CudaKvCache {
    /// Bytes the pools take on the device.
    pub fn device_bytes(&self) -> usize {
        match &self.pools {
            KvPools::F32(k, v) => (k.len() + v.len()) * 4,
            KvPools::Bf16(k, v) => (k.len() + v.len()) * 2,
        }
    }
}

struct Kernels {
    embedding: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    add_assign: CudaFunction,
    add_bias: CudaFunction,
    gather_rows: CudaFunction,
    f32_to_bf16: CudaFunction,
    dequantize: CudaFunction,
    gemv: CudaFunction,
    gemm_bf16: CudaFunction,
    gemm_f32: CudaFunction,
    write_kv: CudaFunction,
    write_kv_bf16: CudaFunction,
    paged_decode: CudaFunction,
    paged_decode_bf16: CudaFunction,
    paged_decode_reduce: CudaFunction,
    prefill_flash: CudaFunction,
    prefill_flash_bf16: CudaFunction,
    shrink_bf16: CudaFunction,
    shrink_f32: CudaFunction,
    expand_bf16: CudaFunction,
    expand_f32: CudaFunction,
    argmax: CudaFunction,
    topk: CudaFunction,
}

/// Recently uploaded index arrays (positions, slots, block tables, LoRA work tables), keyed by
/// content: every layer of a step uploads the same positions and tables, and in steady decoding
/// consecutive steps repeat each layer's LoRA tables, so most uploads become a hash lookup.
/// Content-addressed, so a hit is always the right data. Cleared when it grows past the cap.
#[derive(Default)]
struct UploadCache {
    entries: HashMap<Vec<u32>, Arc<CudaSlice<u32>>>,
}

const UPLOAD_CACHE_ENTRIES: usize = 2048;

/// (address of the host cos table, its length, head_dim, bits of the last cos and sin).
type RopeKey = (usize, usize, usize, u32, u32);
/// cos and sin tables on the device.
type RopeDev = Arc<(CudaSlice<f32>, CudaSlice<f32>)>;

/// The CUDA backend. Cheap to clone (shared device state).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy_stream: Arc<CudaStream>,
    k: Kernels,
    _modules: Vec<Arc<CudaModule>>,
    blas: Option<Mutex<CudaBlas>>,
    blas_note: String,
    precision: Precision,
    kv_precision: Precision,
    uploads: Mutex<UploadCache>,
    rope: Mutex<Option<(RopeKey, RopeDev)>>,
    /// bf16 copy of GEMM activations, reused between calls.
    x_bf16: Mutex<Option<CudaSlice<u16>>>,
    /// Dequantized rows of a quantized weight for a many-row product, reused between calls.
    w_scratch: Mutex<Option<Dense>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

fn drv(e: impl std::fmt::Debug) -> KernelError {
    KernelError::Device(format!("CUDA: {e:?}"))
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn blocks_for(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Q8_0 => 3,
        DType::Q4_0 => 4,
        DType::Q4_1 => 5,
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| KernelError::Device(format!("{what} = {v} does not fit the kernels' 32-bit indices")))
}

impl CudaBackend {
    /// Opens device `opts.ordinal`, loads (or compiles with NVRTC and caches) every kernel for
    /// its architecture, and creates the streams and the cuBLAS handle.
    pub fn new(opts: &CudaOptions) -> Result<Self, CudaError> {
        let info = probe(opts.ordinal)?;
        guarded("starting the CUDA backend", || Self::start(info, opts))
    }

    fn start(info: DeviceInfo, opts: &CudaOptions) -> Result<Self, CudaError> {
        let d = |e: cudarc::driver::DriverError| CudaError::Driver(format!("{e:?}"));
        let ctx = CudaContext::new(info.ordinal).map_err(d)?;
        // No per-buffer event tracking: compute uses one stream, and weights uploaded on the
        // copy stream are synchronized before they are handed out; every forward pass ends
        // with a synchronous download, so buffers dropped afterwards are idle. This saves an
        // event record per kernel argument.
        // SAFETY: called before any buffer or stream exists on this context.
        unsafe { ctx.disable_event_tracking() };
        // Keep memory freed by one step in the pool for the next (the default threshold of 0
        // hands it back to the driver at every synchronization). Best effort.
        // SAFETY: plain driver calls on the current device with valid out-parameters.
        unsafe {
            use cudarc::driver::sys;
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
                let mut threshold: u64 = u64::MAX;
                let _ = sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                );
            }
        }
        let stream = ctx.new_stream().map_err(d)?;
        let copy_stream = ctx.new_stream().map_err(d)?;
        let arch = info.arch();
        let cache = opts.kernel_cache.clone().or_else(nvrtc::default_cache_dir);
        let mut modules = Vec::new();
        for (name, src) in nvrtc::MODULES {
            let m = nvrtc::load_or_compile(name, src, &arch, cache.as_deref())?;
            let module = match ctx.load_module(Ptx::from_binary(m.cubin.clone())) {
                Ok(module) => module,
                // A cached cubin the driver refuses (corrupt, or from an incompatible build):
                // compile afresh and replace it.
                Err(_) if m.cached => {
                    let fresh = nvrtc::compile(name, src, &arch)?;
                    if let Some(dir) = &cache {
                        let _ = std::fs::write(
                            dir.join(format!("{}.cubin", nvrtc::cache_key(name, src, &arch))),
                            &fresh.cubin,
                        );
                    }
                    ctx.load_module(Ptx::from_binary(fresh.cubin)).map_err(d)?
                }
                Err(e) => return Err(d(e)),
            };
            modules.push(module);
        }
        let find = |name: &str| -> Result<CudaFunction, CudaError> {
            for m in &modules {
                if let Ok(f) = m.load_function(name) {
                    return Ok(f);
                }
            }
            Err(CudaError::Driver(format!("kernel {name} is in no module")))
        };
        let k = Kernels {
            embedding: find("embedding")?,
            rms_norm: find("rms_norm")?,
            rope: find("rope")?,
            silu_mul: find("silu_mul")?,
            add_assign: find("add_assign")?,
            add_bias: find("add_bias")?,
            gather_rows: find("gather_rows")?,
            f32_to_bf16: find("f32_to_bf16_kernel")?,
            dequantize: find("dequantize")?,
            gemv: find("gemv")?,
            gemm_bf16: find("gemm_nt_bf16")?,
            gemm_f32: find("gemm_nt_f32")?,
            write_kv: find("write_kv")?,
            write_kv_bf16: find("write_kv_bf16")?,
            paged_decode: find("paged_decode")?,
            paged_decode_bf16: find("paged_decode_bf16")?,
            paged_decode_reduce: find("paged_decode_reduce")?,
            prefill_flash: find("prefill_flash")?,
            prefill_flash_bf16: find("prefill_flash_bf16")?,
            shrink_bf16: find("lora_shrink_bf16")?,
            shrink_f32: find("lora_shrink_f32")?,
            expand_bf16: find("lora_expand_bf16")?,
            expand_f32: find("lora_expand_f32")?,
            argmax: find("argmax_rows")?,
            topk: find("topk_rows")?,
        };
        let (blas, blas_note) = if opts.no_cublas {
            (None, "built-in GEMM (cuBLAS disabled)".to_string())
        } else if opts.precision == Precision::Bf16 && info.compute_capability.0 < 8 {
            // cuBLAS bf16 GEMMs need sm_80+; the built-in kernel converts bf16 in software.
            (None, format!("built-in GEMM (bf16 cuBLAS needs sm_80+, this is {arch})"))
        } else {
            // SAFETY: only tries to open the library.
            let present = guarded("loading cuBLAS", || Ok(unsafe { blas_sys::is_culib_present() })).unwrap_or(false);
            if present {
                match guarded("creating a cuBLAS handle", || {
                    CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))
                }) {
                    Ok(b) => (Some(Mutex::new(b)), "cuBLAS".to_string()),
                    Err(e) => (None, format!("built-in GEMM ({e})")),
                }
            } else {
                (None, "built-in GEMM (libcublas not found)".to_string())
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                info,
                ctx,
                stream,
                copy_stream,
                k,
                _modules: modules,
                blas,
                blas_note,
                precision: opts.precision,
                kv_precision: opts.kv_precision,
                uploads: Mutex::new(UploadCache::default()),
                rope: Mutex::new(None),
                x_bf16: Mutex::new(None),
                w_scratch: Mutex::new(None),
            }),
        })
    }

    /// The device.
    pub fn device(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Whether dense products go through cuBLAS.
    pub fn uses_cublas(&self) -> bool {
        self.inner.blas.is_some()
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(drv)
    }

    fn s(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn upload_u32(&self, data: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut cache = self.inner.uploads.lock().map_err(|_| KernelError::Device("upload cache poisoned".into()))?;
        if let Some(s) = cache.entries.get(data) {
            return Ok(s.clone());
        }
        let padded: Vec<u32> = if data.is_empty() { vec![0] } else { data.to_vec() };
        let s = Arc::new(self.s().clone_htod(&padded).map_err(drv)?);
        if cache.entries.len() >= UPLOAD_CACHE_ENTRIES {
            cache.entries.clear();
        }
        cache.entries.insert(data.to_vec(), s.clone());
        Ok(s)
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.s().alloc_zeros::<f32>(len.max(1)).map_err(drv)
    }

    /// A buffer the next kernel overwrites entirely.
    fn alloc_uninit(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: f32 has no invalid bit patterns, and callers only read what a kernel wrote.
        unsafe { self.s().alloc::<f32>(len.max(1)) }.map_err(drv)
    }

    fn launch_1d(n: usize) -> LaunchConfig {
        cfg((blocks_for(n, 256), 1, 1), 256)
    }

    fn vector<'a>(&self, w: &'a CudaWeight, op: &'static str) -> Result<&'a CudaSlice<f32>> {
        w.vector.as_ref().ok_or_else(|| KernelError::Shape {
            op,
            detail: format!("expected a 1-D weight, got [{}, {}]", w.rows, w.cols),
        })
    }

    fn rope_tables(&self, t: &RopeTable) -> Result<RopeDev> {
        // The address identifies the model's table; its last values (which depend on theta
        // and scaling at the largest position) guard against a new table at a reused address.
        let last = |v: &[f32]| v.last().map_or(0, |x| x.to_bits());
        let key = (t.cos.as_ptr() as usize, t.cos.len(), t.head_dim, last(&t.cos), last(&t.sin));
        let mut g = self.inner.rope.lock().map_err(|_| KernelError::Device("rope cache poisoned".into()))?;
        if let Some((k, v)) = g.as_ref()
            && *k == key
        {
            return Ok(v.clone());
        }
        let cos = self.s().clone_htod(&t.cos).map_err(drv)?;
        let sin = self.s().clone_htod(&t.sin).map_err(drv)?;
        let v = Arc::new((cos, sin));
        *g = Some((key, v.clone()));
        Ok(v)
    }

    /// RMSNorm of `x` into `out`; with `delta`, `x += delta` first (the kernel writes x back).
    fn norm_launch(
        &self,
        x: &CudaBuf,
        delta: Option<&CudaBuf>,
        weight: &CudaWeight,
        eps: f32,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let w = self.vector(weight, "rms_norm")?;
        let d = weight.cols;
        ensure_shape(d > 0 && x.len.is_multiple_of(d) && x.len == out.len, "rms_norm", || {
            format!("x {} out {} width {d}", x.len, out.len)
        })?;
        if let Some(dl) = delta {
            ensure_shape(dl.len == x.len, "add_rms_norm", || format!("x {} delta {}", x.len, dl.len))?;
        }
        let rows = x.len / d;
        if rows == 0 {
            return Ok(());
        }
        let width = u32_of(d, "width")?;
        let null: u64 = 0;
        let mut b = self.s().launch_builder(&self.inner.k.rms_norm);
        b.arg(&x.data);
        match delta {
            Some(dl) => b.arg(&dl.data),
            None => b.arg(&null),
        };
        b.arg(w).arg(&width).arg(&eps).arg(&mut out.data);
        // SAFETY: shapes checked above; the kernel touches `rows * width` values of x, delta and
        // out and `width` of w. All work is on one stream, so writing x through a shared
        // handle is ordered with every other use of it.
        unsafe { b.launch(cfg((u32_of(rows, "rows")?, 1, 1), 256)) }.map_err(drv)?;
        Ok(())
    }

    /// Many-row product `out = x · Wᵀ`: a dense weight in one call; a quantized one a slice of
    /// rows at a time, dequantized into the reused scratch buffer.
    fn gemm(&self, x: &CudaBuf, rows: usize, w: &CudaWeight, out: &mut CudaBuf) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let bf16 = match (&w.dense, &w.raw) {
            (Some(Dense::Bf16(_)), _) => true,
            (Some(Dense::F32(_)), _) => false,
            (None, Some(_)) => self.inner.precision == Precision::Bf16,
            (None, None) => return Err(KernelError::Device("weight has no 2-D data".into())),
        };
        // cuBLAS multiplies bf16 by bf16: a bf16 copy of x, made once for every slice.
        let mut xb_guard = None;
        let x_ptr = if self.inner.blas.is_some() && bf16 {
            let mut g = self.inner.x_bf16.lock().map_err(|_| KernelError::Device("scratch poisoned".into()))?;
            if g.as_ref().is_none_or(|s| s.len() < rows * k) {
                *g = Some(self.s().alloc_zeros::<u16>((rows * k).max(1)).map_err(drv)?);
            }
            let scratch = g.as_mut().ok_or_else(|| KernelError::Device("scratch".into()))?;
            let total = (rows * k) as u64;
            let mut lb = self.s().launch_builder(&self.inner.k.f32_to_bf16);
            lb.arg(&x.data).arg(&mut *scratch).arg(&total);
            // SAFETY: scratch holds at least rows * k values; x holds rows * k.
            unsafe { lb.launch(Self::launch_1d(rows * k)) }.map_err(drv)?;
            let p = scratch.device_ptr(self.s()).0;
            xb_guard = Some(g);
            p
        } else {
            x.data.device_ptr(self.s()).0
        };
        // Event tracking is off (see `start`), so the pointer guards order nothing.
        let out_ptr = out.data.device_ptr_mut(self.s()).0;
        match (&w.dense, &w.raw) {
            (Some(d), _) => {
                let w_ptr = match d {
                    Dense::Bf16(s) => s.device_ptr(self.s()).0,
                    Dense::F32(s) => s.device_ptr(self.s()).0,
                };
                self.gemm_slice(x_ptr, rows, w_ptr, bf16, n, k, out_ptr, n)?;
            }
            (None, Some(raw)) => {
                let row_bytes = w.dtype.row_bytes(k).ok_or_else(|| KernelError::Device("row bytes".into()))?;
                let slice = (GEMM_SCRATCH_VALUES / k).clamp(1, n);
                let mut g = self.inner.w_scratch.lock().map_err(|_| KernelError::Device("scratch poisoned".into()))?;
                let fits = match g.as_ref() {
                    Some(Dense::Bf16(s)) => bf16 && s.len() >= slice * k,
                    Some(Dense::F32(s)) => !bf16 && s.len() >= slice * k,
                    None => false,
                };
                if !fits {
                    *g = None; // free the old buffer before allocating the new one
                    *g = Some(if bf16 {
                        Dense::Bf16(self.s().alloc_zeros::<u16>(slice * k).map_err(drv)?)
                    } else {
                        Dense::F32(self.s().alloc_zeros::<f32>(slice * k).map_err(drv)?)
                    });
                }
                let scratch = g.as_mut().ok_or_else(|| KernelError::Device("scratch".into()))?;
                let s_ptr = match scratch {
                    Dense::Bf16(s) => s.device_ptr_mut(self.s()).0,
                    Dense::F32(s) => s.device_ptr_mut(self.s()).0,
                };
                let raw_ptr = raw.device_ptr(self.s()).0;
                let (dt, k32, to_bf16) = (dtype_code(w.dtype), u32_of(k, "k")?, i32::from(bf16));
                for n0 in (0..n).step_by(slice) {
                    let m = slice.min(n - n0);
                    let src = raw_ptr + (n0 * row_bytes) as u64;
                    let m32 = u32_of(m, "rows")?;
                    let mut b = self.s().launch_builder(&self.inner.k.dequantize);
                    b.arg(&src).arg(&dt).arg(&m32).arg(&k32).arg(&to_bf16).arg(&s_ptr);
                    // SAFETY: rows n0..n0 + m of the weight lie in `raw`; the scratch holds
                    // slice * k >= m * k values. Kernels on one stream run in order, so the
                    // next slice's dequantize waits for this slice's product.
                    unsafe { b.launch(Self::launch_1d(m * k)) }.map_err(drv)?;
                    self.gemm_slice(x_ptr, rows, s_ptr, bf16, m, k, out_ptr + (n0 * 4) as u64, n)?;
                }
            }
            (None, None) => unreachable!("checked above"),
        }
        drop(xb_guard);
        Ok(())
    }

    /// `out[r, j] = x[r, :] · w[j, :]` for `j < n`, `out` with row stride `ldo` (device
    /// addresses): cuBLAS when present (`x` is then bf16 when `w` is), the built-in kernel
    /// (always f32 `x`) otherwise.
    #[allow(clippy::too_many_arguments)]
    fn gemm_slice(
        &self,
        x_ptr: u64,
        rows: usize,
        w_ptr: u64,
        bf16: bool,
        n: usize,
        k: usize,
        out_ptr: u64,
        ldo: usize,
    ) -> Result<()> {
        let (m32, n32, k32, ldo32) = (u32_of(rows, "rows")?, u32_of(n, "n")?, u32_of(k, "k")?, u32_of(ldo, "ldo")?);
        if let Some(blas) = &self.inner.blas {
            let blas = blas.lock().map_err(|_| KernelError::Device("cuBLAS handle poisoned".into()))?;
            let (alpha, beta) = (1.0f32, 0.0f32);
            let t = if bf16 { blas_sys::cudaDataType::CUDA_R_16BF } else { blas_sys::cudaDataType::CUDA_R_32F };
            // Row-major out[rows, n] (stride ldo) = x[rows, k] · Wᵀ is column-major outᵀ[n, rows]
            // (ld = ldo) = op(W)[n, k] · xᵀ[k, rows] with W seen column-major as [k, n] (lda = k),
            // transposed.
            // SAFETY: pointers are live device allocations of the sizes checked by `matmul`.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    n32 as i32,
                    m32 as i32,
                    k32 as i32,
                    (&alpha as *const f32).cast(),
                    w_ptr as *const std::ffi::c_void,
                    t,
                    k32 as i32,
                    x_ptr as *const std::ffi::c_void,
                    t,
                    k32 as i32,
                    (&beta as *const f32).cast(),
                    out_ptr as *mut std::ffi::c_void,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    ldo32 as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| KernelError::Device(format!("cublasGemmEx: {e:?}")))?;
            return Ok(());
        }
        let grid = (blocks_for(n, 64), blocks_for(rows, 64), 1);
        let f = if bf16 { &self.inner.k.gemm_bf16 } else { &self.inner.k.gemm_f32 };
        let mut b = self.s().launch_builder(f);
        b.arg(&x_ptr).arg(&w_ptr).arg(&out_ptr).arg(&m32).arg(&n32).arg(&k32).arg(&ldo32);
        // SAFETY: x is rows * k f32 values, w is n * k, out holds rows rows of stride ldo >= n.
        unsafe { b.launch(cfg(grid, 256)) }.map_err(drv)?;
        Ok(())
    }

    /// Index of the largest logit per row (first on ties; `u32::MAX` for a row without a
    /// number) and whether the row holds a non-finite value, computed on the device.
    pub fn argmax_device(&self, logits: &CudaBuf, rows: usize, width: usize) -> Result<(Vec<u32>, Vec<bool>)> {
        ensure_shape(width > 0 && logits.len == rows * width, "argmax_rows", || {
            format!("{} values for {rows} rows of {width}", logits.len)
        })?;
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut out = self.s().alloc_zeros::<u32>(2 * rows).map_err(drv)?;
        let w = u32_of(width, "width")?;
        let base = out.device_ptr_mut(self.s()).0;
        let (idx, bad) = (base, base + 4 * rows as u64);
        let mut b = self.s().launch_builder(&self.inner.k.argmax);
        b.arg(&logits.data).arg(&w).arg(&idx).arg(&bad);
        // SAFETY: logits hold rows * width values; out holds 2 * rows (indices, then flags).
        unsafe { b.launch(cfg((u32_of(rows, "rows")?, 1, 1), 256)) }.map_err(drv)?;
        let v = self.s().clone_dtoh(&out).map_err(drv)?;
        Ok((v[..rows].to_vec(), v[rows..].iter().map(|&f| f != 0).collect()))
    }

    /// The `k` largest logits per row, descending (ties: lower index first), and whether the
    /// row holds a non-finite value, computed on the device; `k <= 64`.
    pub fn top_k_device(&self, logits: &CudaBuf, rows: usize, width: usize, k: usize) -> Result<(TopRows, Vec<bool>)> {
        ensure_shape(width > 0 && logits.len == rows * width && k > 0 && k <= TOPK_MAX, "top_k_rows", || {
            format!("{} values for {rows} rows of {width}, k {k} (at most {TOPK_MAX})", logits.len)
        })?;
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut ov = self.s().alloc_zeros::<f32>(rows * k).map_err(drv)?;
        let mut oi = self.s().alloc_zeros::<u32>(rows * k + rows).map_err(drv)?;
        let (w, k32) = (u32_of(width, "width")?, u32_of(k, "k")?);
        let base = oi.device_ptr_mut(self.s()).0;
        let (idx, bad) = (base, base + 4 * (rows * k) as u64);
        let mut b = self.s().launch_builder(&self.inner.k.topk);
        b.arg(&logits.data).arg(&w).arg(&k32).arg(&mut ov).arg(&idx).arg(&bad);
        // SAFETY: logits hold rows * width values, ov rows * k, oi rows * k indices + rows flags.
        unsafe { b.launch(cfg((u32_of(rows, "rows")?, 1, 1), 256)) }.map_err(drv)?;
        let v = self.s().clone_dtoh(&ov).map_err(drv)?;
        let i = self.s().clone_dtoh(&oi).map_err(drv)?;
        let top = (0..rows)
            .map(|r| (0..k).filter(|&j| i[r * k + j] != u32::MAX).map(|j| (i[r * k + j], v[r * k + j])).collect())
            .collect();
        Ok((top, i[rows * k..].iter().map(|&f| f != 0).collect()))
    }

    /// Bytes the device holds for `w`.
    pub fn weight_bytes(&self, w: &CudaWeight) -> usize {
        w.device_bytes()
    }

    /// The KV pool precision.
    pub fn kv_precision(&self) -> Precision {
        self.inner.kv_precision
    }

    /// Bytes of the dequantization scratch buffer allocated so far.
    pub fn scratch_bytes(&self) -> usize {
        let w = self.inner.w_scratch.lock().map(|g| match g.as_ref() {
            Some(Dense::Bf16(s)) => s.len() * 2,
            Some(Dense::F32(s)) => s.len() * 4,
            None => 0,
        });
        let x = self.inner.x_bf16.lock().map(|g| g.as_ref().map_or(0, |s| s.len() * 2));
        w.unwrap_or(0) + x.unwrap_or(0)
    }
}

/// Per row, its top candidates `(index, logit)`.
pub type TopRows = Vec<Vec<(u32, f32)>>;

/// One LoRA segment as the kernels see it: rows, rank, device addresses of A `[rank, in]` and
/// Bᵀ `[rank, out]`, scale.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LoraSegmentRef {
    pub rows: std::ops::Range<usize>,
    pub rank: usize,
    pub a: u64,
    pub b: u64,
    pub scale: f32,
}

/// The flattened work of one `lora_sgmv` call, uploaded as one buffer:
/// `[A/B addresses (u64 pairs) | (first row, rank, tmp offset) per segment | scale bits |
/// (segment, row) per work item]` (the layout kernels/cuda/lora.cu reads).
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPlan {
    pub blob: Vec<u32>,
    pub meta_off: usize,
    pub scale_off: usize,
    pub item_off: usize,
    pub items: usize,
    pub tmp_len: usize,
}

/// Builds the [`LoraPlan`] for segments over a batch of `rows` rows (segments of rank 0 or no
/// rows are skipped).
#[doc(hidden)]
pub fn plan_lora(segs: &[LoraSegmentRef], rows: usize) -> Result<LoraPlan> {
    let mut ptr_words: Vec<u32> = Vec::with_capacity(segs.len() * 4);
    let mut meta: Vec<u32> = Vec::with_capacity(segs.len() * 3);
    let mut scales: Vec<u32> = Vec::with_capacity(segs.len());
    let mut items: Vec<u32> = Vec::new();
    let mut tmp_len = 0usize;
    for (si, seg) in segs.iter().enumerate() {
        ensure_shape(seg.rows.start <= seg.rows.end && seg.rows.end <= rows, "lora_sgmv", || {
            format!("segment {si}: rows {:?} of {rows}", seg.rows)
        })?;
        if seg.rank == 0 || seg.rows.is_empty() {
            continue;
        }
        let seg_idx = u32_of(meta.len() / 3, "segments")?;
        ptr_words.extend([seg.a as u32, (seg.a >> 32) as u32, seg.b as u32, (seg.b >> 32) as u32]);
        meta.extend([u32_of(seg.rows.start, "row")?, u32_of(seg.rank, "rank")?, u32_of(tmp_len, "tmp")?]);
        scales.push(seg.scale.to_bits());
        for row in seg.rows.clone() {
            items.extend([seg_idx, u32_of(row, "row")?]);
        }
        tmp_len += seg.rows.len() * seg.rank;
    }
    let mut blob = ptr_words;
    let meta_off = blob.len();
    blob.extend(&meta);
    let scale_off = blob.len();
    blob.extend(&scales);
    let item_off = blob.len();
    let n_items = items.len() / 2;
    blob.extend(&items);
    Ok(LoraPlan { blob, meta_off, scale_off, item_off, items: n_items, tmp_len })
}

/// The work lists of one `paged_attention` call (kernels/cuda/attention.cu's layouts):
/// concatenated block tables, `(row, table offset, keys)` per decode row, `(q_start, q_len,
/// ctx_len, table offset)` per prefill sequence, the split count of the decode kernel.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct AttnPlan {
    pub tables: Vec<u32>,
    pub decode_meta: Vec<u32>,
    pub prefill_meta: Vec<u32>,
    pub rows: usize,
    pub covered: usize,
    pub splits: usize,
    pub partition: usize,
    pub max_q: usize,
}

/// Validates a `paged_attention` call (like the CPU backend) and builds its [`AttnPlan`].
#[doc(hidden)]
pub fn plan_attention(q_values: usize, l: KvLayout, seqs: &[AttnSeq<'_>], heads: usize) -> Result<AttnPlan> {
    let hd = l.head_dim;
    ensure_shape(heads > 0 && l.kv_heads > 0 && heads.is_multiple_of(l.kv_heads), "paged_attention", || {
        format!("{heads} query heads is not a multiple of {} kv heads", l.kv_heads)
    })?;
    let group = heads / l.kv_heads;
    if hd > ATT_MAX_HEAD_DIM || hd == 0 || !hd.is_multiple_of(8) || group > ATT_MAX_GROUP {
        return Err(KernelError::Device(format!(
            "the CUDA attention kernels support head_dim <= {ATT_MAX_HEAD_DIM} (a multiple of 8) and up to \
             {ATT_MAX_GROUP} query heads per KV head; this model has head_dim {hd}, {group}"
        )));
    }
    let width = heads * hd;
    ensure_shape(q_values.is_multiple_of(width), "paged_attention", || {
        format!("q has {q_values} values, row width {width}")
    })?;
    let rows = q_values / width;
    let mut tables: Vec<u32> = Vec::new();
    let mut decode_meta: Vec<u32> = Vec::new();
    let mut prefill_meta: Vec<u32> = Vec::new();
    let mut is_covered = vec![false; rows];
    let (mut max_keys, mut max_q) = (0usize, 0usize);
    for (si, s) in seqs.iter().enumerate() {
        s.check(si, rows, l)?;
        if s.q_len == 0 {
            continue;
        }
        is_covered[s.q_start..s.q_start + s.q_len].fill(true);
        let off = u32_of(tables.len(), "block tables")?;
        tables.extend_from_slice(&s.block_table[..s.ctx_len.div_ceil(l.block_size)]);
        if s.q_len == 1 {
            decode_meta.extend([u32_of(s.q_start, "row")?, off, u32_of(s.ctx_len, "ctx_len")?]);
            max_keys = max_keys.max(s.ctx_len);
        } else {
            prefill_meta.extend([
                u32_of(s.q_start, "row")?,
                u32_of(s.q_len, "q_len")?,
                u32_of(s.ctx_len, "ctx_len")?,
                off,
            ]);
            max_q = max_q.max(s.q_len);
        }
    }
    let covered = is_covered.iter().filter(|&&c| c).count();
    let partition = ATT_PARTITION.max(max_keys.div_ceil(ATT_MAX_SPLITS).next_multiple_of(ATT_PARTITION));
    let splits = max_keys.div_ceil(partition).max(1);
    Ok(AttnPlan { tables, decode_meta, prefill_meta, rows, covered, splits, partition, max_q })
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;

    fn name(&self) -> String {
        let i = &self.inner.info;
        format!(
            "cuda:{} ({}, {}, {}, {} weights)",
            i.ordinal,
            i.name,
            i.arch(),
            self.inner.blas_note,
            self.inner.precision.name()
        )
    }

    fn execute<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // Kernel launches need the context current on the calling thread; cudarc binds it in
        // most calls, this makes it explicit for the whole pass.
        let _ = self.inner.ctx.bind_to_thread();
        f()
    }

    fn prepare_weight(&self, w: HostWeight) -> Result<CudaWeight> {
        let cs = &self.inner.copy_stream;
        let (rows, cols, dtype) = (w.rows(), w.cols(), w.dtype());
        let streams = (cs.clone(), self.inner.stream.clone());
        // A `[1, n]` tensor may be a norm weight or bias (read as a vector) or a rank-1 LoRA
        // factor (read as a matrix): keep both forms, as the CPU backend does.
        let vector = if rows == 1 { Some(cs.clone_htod(&w.to_f32()).map_err(drv)?) } else { None };
        let bytes = w.bytes();
        let raw = cs.clone_htod(if bytes.is_empty() { &[0u8][..] } else { bytes }).map_err(drv)?;
        let n = rows * cols;
        let to_bf16 = i32::from(self.inner.precision == Precision::Bf16);
        let (r32, c32, dt) = (u32_of(rows, "rows")?, u32_of(cols, "cols")?, dtype_code(dtype));
        // One copy: a quantized weight keeps its blocks (prefill dequantizes slices of them into
        // the shared scratch), any other a dense copy in the backend's precision.
        let dense = if n == 0 || dtype.is_quantized() {
            None
        } else if to_bf16 == 1 {
            let mut d = cs.alloc_zeros::<u16>(n).map_err(drv)?;
            let mut b = cs.launch_builder(&self.inner.k.dequantize);
            b.arg(&raw).arg(&dt).arg(&r32).arg(&c32).arg(&to_bf16).arg(&mut d);
            // SAFETY: raw holds rows row_bytes(cols); d holds rows * cols values.
            unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), 256)) }.map_err(drv)?;
            Some(Dense::Bf16(d))
        } else {
            let mut d = cs.alloc_zeros::<f32>(n).map_err(drv)?;
            let mut b = cs.launch_builder(&self.inner.k.dequantize);
            b.arg(&raw).arg(&dt).arg(&r32).arg(&c32).arg(&to_bf16).arg(&mut d);
            // SAFETY: as above, f32 output.
            unsafe { b.launch(cfg((blocks_for(n, 256), 1, 1), 256)) }.map_err(drv)?;
            Some(Dense::F32(d))
        };
        // The upload is done when the weight is handed out (the pager counts it resident).
        cs.synchronize().map_err(drv)?;
        // f32/f16/bf16 weights are read from the dense copy alone (so an f32 LoRA weight takes 2
        // bytes per value under bf16, 4 under f32: never more than the pager's f32 accounting).
        let raw = dtype.is_quantized().then_some(raw);
        Ok(CudaWeight { dtype, rows, cols, raw, dense, vector, streams })
    }

    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn weight_bytes(&self, w: &CudaWeight) -> usize {
        w.device_bytes()
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf { data: self.alloc(len)?, len })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let data_dev = if data.is_empty() { self.alloc(0)? } else { self.s().clone_htod(data).map_err(drv)? };
        Ok(CudaBuf { data: data_dev, len: data.len() })
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let mut v = self.s().clone_dtoh(&buf.data).map_err(drv)?;
        v.truncate(buf.len);
        Ok(v)
    }

    fn buf_len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaBuf) -> Result<()> {
        let (stored, dt) = table.stored("embedding")?;
        ensure_shape(out.len == ids.len() * table.cols, "embedding", || {
            format!("{} ids x {} cols vs out {}", ids.len(), table.cols, out.len)
        })?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(KernelError::Shape {
                op: "embedding",
                detail: format!("token id {bad} >= vocabulary {}", table.rows),
            });
        }
        if ids.is_empty() {
            return Ok(());
        }
        let idv = self.upload_u32(ids)?;
        let cols = u32_of(table.cols, "cols")?;
        let mut b = self.s().launch_builder(&self.inner.k.embedding);
        match &stored {
            Stored::Raw(s) => b.arg(*s),
            Stored::Bf16(s) => b.arg(*s),
            Stored::F32(s) => b.arg(*s),
        };
        b.arg(&dt).arg(&cols).arg(&*idv).arg(&mut out.data);
        // SAFETY: ids are < rows; out holds ids * cols values.
        unsafe { b.launch(cfg((u32_of(ids.len(), "ids")?, 1, 1), 256)) }.map_err(drv)?;
        Ok(())
    }

    fn rms_norm(&self, x: &CudaBuf, weight: &CudaWeight, eps: f32, out: &mut CudaBuf) -> Result<()> {
        self.norm_launch(x, None, weight, eps, out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaBuf,
        delta: &CudaBuf,
        weight: &CudaWeight,
        eps: f32,
        out: &mut CudaBuf,
    ) -> Result<()> {
        self.norm_launch(x, Some(delta), weight, eps, out)
    }

    fn matmul(&self, x: &CudaBuf, rows: usize, w: &CudaWeight, out: &mut CudaBuf) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        ensure_shape(x.len == rows * k && out.len == rows * n, "matmul", || {
            format!("x {} ({rows} x {k}), w [{n}, {k}], out {}", x.len, out.len)
        })?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if rows <= GEMV_MAX_ROWS {
            let (stored, dt) = w.stored("matmul")?;
            let (n32, k32, r32) = (u32_of(n, "n")?, u32_of(k, "k")?, rows as u32);
            let mut b = self.s().launch_builder(&self.inner.k.gemv);
            match &stored {
                Stored::Raw(s) => b.arg(*s),
                Stored::Bf16(s) => b.arg(*s),
                Stored::F32(s) => b.arg(*s),
            };
            b.arg(&dt).arg(&n32).arg(&k32).arg(&x.data).arg(&r32).arg(&mut out.data);
            // SAFETY: w is [n, k] in its format, x rows * k, out rows * n, rows <= 8.
            unsafe { b.launch(cfg((blocks_for(n, 4), 1, 1), 128)) }.map_err(drv)?;
            return Ok(());
        }
        self.gemm(x, rows, w, out)
    }

    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaWeight) -> Result<()> {
        let b = self.vector(bias, "add_bias")?;
        let w = bias.cols;
        ensure_shape(w > 0 && x.len.is_multiple_of(w), "add_bias", || format!("x {} bias {w}", x.len))?;
        if x.len == 0 {
            return Ok(());
        }
        let (w32, n) = (u32_of(w, "width")?, x.len as u64);
        let mut lb = self.s().launch_builder(&self.inner.k.add_bias);
        lb.arg(&mut x.data).arg(b).arg(&w32).arg(&n);
        // SAFETY: n values in x, width in bias.
        unsafe { lb.launch(Self::launch_1d(x.len)) }.map_err(drv)?;
        Ok(())
    }

    fn add_assign(&self, acc: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        ensure_shape(acc.len == x.len, "add_assign", || format!("{} vs {}", acc.len, x.len))?;
        if x.len == 0 {
            return Ok(());
        }
        let n = x.len as u64;
        let mut b = self.s().launch_builder(&self.inner.k.add_assign);
        b.arg(&mut acc.data).arg(&x.data).arg(&n);
        // SAFETY: both hold n values.
        unsafe { b.launch(Self::launch_1d(x.len)) }.map_err(drv)?;
        Ok(())
    }

    fn rope(&self, x: &mut CudaBuf, positions: &[u32], heads: usize, table: &RopeTable) -> Result<()> {
        let hd = table.head_dim;
        ensure_shape(x.len == positions.len() * heads * hd && hd.is_multiple_of(2), "rope", || {
            format!("x {} for {} rows of {heads} x {hd}", x.len, positions.len())
        })?;
        if let Some(p) = positions.iter().find(|&&p| p as usize >= table.max_positions) {
            return Err(KernelError::Shape {
                op: "rope",
                detail: format!("position {p} >= table size {}", table.max_positions),
            });
        }
        if positions.is_empty() {
            return Ok(());
        }
        let t = self.rope_tables(table)?;
        let pos = self.upload_u32(positions)?;
        let (h32, hd32) = (u32_of(heads, "heads")?, u32_of(hd, "head_dim")?);
        let mut b = self.s().launch_builder(&self.inner.k.rope);
        b.arg(&mut x.data).arg(&*pos).arg(&h32).arg(&hd32).arg(&t.0).arg(&t.1);
        // SAFETY: positions < max_positions; x holds rows * heads * hd values.
        unsafe { b.launch(cfg((u32_of(positions.len(), "rows")?, 1, 1), 128)) }.map_err(drv)?;
        Ok(())
    }

    fn silu_mul(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        ensure_shape(gate.len == up.len && up.len == out.len, "silu_mul", || {
            format!("gate {} up {} out {}", gate.len, up.len, out.len)
        })?;
        if out.len == 0 {
            return Ok(());
        }
        let n = out.len as u64;
        let mut b = self.s().launch_builder(&self.inner.k.silu_mul);
        b.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n);
        // SAFETY: all hold n values.
        unsafe { b.launch(Self::launch_1d(out.len)) }.map_err(drv)?;
        Ok(())
    }

    fn gather_rows(&self, x: &CudaBuf, width: usize, rows: &[u32], out: &mut CudaBuf) -> Result<()> {
        ensure_shape(width > 0 && out.len == rows.len() * width, "gather_rows", || {
            format!("{} rows x {width} vs out {}", rows.len(), out.len)
        })?;
        let have = x.len / width;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= have) {
            return Err(KernelError::Shape { op: "gather_rows", detail: format!("row {r} of {have}") });
        }
        if rows.is_empty() {
            return Ok(());
        }
        let rv = self.upload_u32(rows)?;
        let w32 = u32_of(width, "width")?;
        let mut b = self.s().launch_builder(&self.inner.k.gather_rows);
        b.arg(&x.data).arg(&w32).arg(&*rv).arg(&mut out.data);
        // SAFETY: rows < have; out holds rows * width.
        unsafe { b.launch(cfg((u32_of(rows.len(), "rows")?, 1, 1), 256)) }.map_err(drv)?;
        Ok(())
    }

    fn lora_sgmv(
        &self,
        x: &CudaBuf,
        in_dim: usize,
        out: &mut CudaBuf,
        out_dim: usize,
        segments: &[LoraSegment<'_, CudaWeight>],
    ) -> Result<()> {
        ensure_shape(in_dim > 0 && x.len.is_multiple_of(in_dim), "lora_sgmv", || {
            format!("x {} is not rows of {in_dim}", x.len)
        })?;
        let rows = x.len / in_dim;
        ensure_shape(out.len == rows * out_dim, "lora_sgmv", || {
            format!("out {} for {rows} rows of {out_dim}", out.len)
        })?;
        if segments.is_empty() || rows == 0 {
            return Ok(());
        }
        let mut refs = Vec::with_capacity(segments.len());
        let mut guards = Vec::with_capacity(segments.len() * 2);
        let mut kind: Option<bool> = None; // Some(true) = bf16
        for (si, seg) in segments.iter().enumerate() {
            let r = seg.a.rows;
            ensure_shape(seg.a.cols == in_dim && seg.b.rows == r && seg.b.cols == out_dim, "lora_sgmv", || {
                format!(
                    "segment {si}: A [{}, {}], Bᵀ [{}, {}] for in {in_dim}, out {out_dim}",
                    seg.a.rows, seg.a.cols, seg.b.rows, seg.b.cols
                )
            })?;
            let (ap, bp, is_bf16) = match (&seg.a.dense, &seg.b.dense) {
                (Some(Dense::Bf16(a)), Some(Dense::Bf16(b))) => {
                    let (pa, ga) = a.device_ptr(self.s());
                    let (pb, gb) = b.device_ptr(self.s());
                    guards.push(ga);
                    guards.push(gb);
                    (pa, pb, true)
                }
                (Some(Dense::F32(a)), Some(Dense::F32(b))) => {
                    let (pa, ga) = a.device_ptr(self.s());
                    let (pb, gb) = b.device_ptr(self.s());
                    guards.push(ga);
                    guards.push(gb);
                    (pa, pb, false)
                }
                _ if r == 0 => (0, 0, kind.unwrap_or(true)),
                _ => {
                    return Err(KernelError::Device(format!(
                        "segment {si}: A and B must both be dense in the backend's precision"
                    )));
                }
            };
            if r > 0 && *kind.get_or_insert(is_bf16) != is_bf16 {
                return Err(KernelError::Device("segments mix bf16 and f32 weights".into()));
            }
            refs.push(LoraSegmentRef { rows: seg.rows.clone(), rank: r, a: ap, b: bp, scale: seg.scale });
        }
        let plan = plan_lora(&refs, rows)?;
        let Some(is_bf16) = kind else { return Ok(()) };
        if plan.items == 0 {
            return Ok(());
        }
        let LoraPlan { blob, meta_off, scale_off, item_off, items: n_items, tmp_len } = plan;
        let dev = self.upload_u32(&blob)?;
        let seg_ptr = dev.slice(0..meta_off);
        let seg_meta = dev.slice(meta_off..scale_off);
        let seg_scale = dev.slice(scale_off..item_off);
        let item = dev.slice(item_off..blob.len());
        let mut tmp = self.alloc_uninit(tmp_len)?;
        let in32 = u32_of(in_dim, "in_dim")?;
        let out32 = u32_of(out_dim, "out_dim")?;
        let (shrink, expand) = if is_bf16 {
            (&self.inner.k.shrink_bf16, &self.inner.k.expand_bf16)
        } else {
            (&self.inner.k.shrink_f32, &self.inner.k.expand_f32)
        };
        let items32 = u32_of(n_items, "items")?;
        let mut b = self.s().launch_builder(shrink);
        b.arg(&x.data).arg(&in32).arg(&seg_ptr).arg(&seg_meta).arg(&item).arg(&mut tmp);
        // SAFETY: every pointer in the table is a live dense weight of the checked shape; tmp
        // holds the sum of rows * rank over segments.
        unsafe { b.launch(cfg((items32, 1, 1), 128)) }.map_err(drv)?;
        let mut b = self.s().launch_builder(expand);
        b.arg(&tmp).arg(&seg_ptr).arg(&seg_meta).arg(&seg_scale).arg(&item).arg(&mut out.data).arg(&out32);
        // SAFETY: as above; out holds rows * out_dim values.
        unsafe { b.launch(cfg((items32, blocks_for(out_dim, 256), 1), 256)) }.map_err(drv)?;
        drop(guards);
        Ok(())
    }

    fn alloc_kv_cache(&self, layout: KvLayout) -> Result<CudaKvCache> {
        let len = (layout.num_blocks * layout.block_size * layout.token_width()).max(1);
        let z = |e| drv(e);
        let pools = match self.inner.kv_precision {
            Precision::F32 => KvPools::F32(self.alloc(len)?, self.alloc(len)?),
            Precision::Bf16 => KvPools::Bf16(
                self.s().alloc_zeros::<u16>(len).map_err(z)?,
                self.s().alloc_zeros::<u16>(len).map_err(z)?,
            ),
        };
        Ok(CudaKvCache { layout, pools })
    }

    fn kv_value_bytes(&self) -> usize {
        match self.inner.kv_precision {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    fn write_kv(&self, cache: &mut CudaKvCache, k: &CudaBuf, v: &CudaBuf, slots: &[u32]) -> Result<()> {
        let w = cache.layout.token_width();
        ensure_shape(k.len == slots.len() * w && v.len == k.len, "write_kv", || {
            format!("{} slots of width {w}, k has {}, v has {}", slots.len(), k.len, v.len)
        })?;
        let capacity = cache.layout.num_blocks * cache.layout.block_size;
        if let Some(&s) = slots.iter().find(|&&s| s as usize >= capacity) {
            return Err(KernelError::KvCache(format!("slot {s} is outside the {capacity}-slot pool")));
        }
        if slots.is_empty() {
            return Ok(());
        }
        let sv = self.upload_u32(slots)?;
        let w32 = u32_of(w, "width")?;
        let mut b;
        match &mut cache.pools {
            KvPools::F32(kc, vc) => {
                b = self.s().launch_builder(&self.inner.k.write_kv);
                b.arg(kc).arg(vc);
            }
            KvPools::Bf16(kc, vc) => {
                b = self.s().launch_builder(&self.inner.k.write_kv_bf16);
                b.arg(kc).arg(vc);
            }
        }
        b.arg(&k.data).arg(&v.data).arg(&*sv).arg(&w32);
        // SAFETY: slots < capacity; k/v hold slots * width values.
        unsafe { b.launch(cfg((u32_of(slots.len(), "slots")?, 1, 1), 128)) }.map_err(drv)?;
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CudaBuf,
        cache: &CudaKvCache,
        seqs: &[AttnSeq<'_>],
        heads: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let l = cache.layout;
        ensure_shape(q.len == out.len, "paged_attention", || format!("q has {} values, out {}", q.len, out.len))?;
        let plan = plan_attention(q.len, l, seqs, heads)?;
        if plan.covered < plan.rows {
            // Rows no sequence covers are zeros, like the CPU backend.
            self.s().memset_zeros(&mut out.data).map_err(drv)?;
        }
        if plan.covered == 0 {
            return Ok(());
        }
        let AttnPlan { tables, decode_meta, prefill_meta, splits, partition, max_q, .. } = plan;
        let hd = l.head_dim;
        let tables_dev = self.upload_u32(&tables)?;
        let (h32, kvh32, hd32, bs32) = (
            u32_of(heads, "heads")?,
            u32_of(l.kv_heads, "kv_heads")?,
            u32_of(hd, "head_dim")?,
            u32_of(l.block_size, "block_size")?,
        );
        let scale = 1.0 / (hd as f32).sqrt();
        if !decode_meta.is_empty() {
            let items = decode_meta.len() / 3;
            let meta = self.upload_u32(&decode_meta)?;
            // Every partial is written by the kernel: no zero fill.
            let mut pm = self.alloc_uninit(items * heads * splits)?;
            let mut pl = self.alloc_uninit(items * heads * splits)?;
            let mut po = self.alloc_uninit(items * heads * splits * hd)?;
            let part32 = u32_of(partition, "partition")?;
            let mut b;
            match &cache.pools {
                KvPools::F32(kc, vc) => {
                    b = self.s().launch_builder(&self.inner.k.paged_decode);
                    b.arg(&q.data).arg(kc).arg(vc);
                }
                KvPools::Bf16(kc, vc) => {
                    b = self.s().launch_builder(&self.inner.k.paged_decode_bf16);
                    b.arg(&q.data).arg(kc).arg(vc);
                }
            }
            b.arg(&*tables_dev)
                .arg(&*meta)
                .arg(&h32)
                .arg(&kvh32)
                .arg(&hd32)
                .arg(&bs32)
                .arg(&scale)
                .arg(&part32)
                .arg(&mut pm)
                .arg(&mut pl)
                .arg(&mut po);
            let grid = (u32_of(items, "items")?, kvh32, u32_of(splits, "splits")?);
            // SAFETY: block tables validated against the pool; partial buffers sized
            // items * heads * splits (* head_dim).
            unsafe { b.launch(cfg(grid, 128)) }.map_err(drv)?;
            let sp32 = splits as u32;
            let mut b = self.s().launch_builder(&self.inner.k.paged_decode_reduce);
            b.arg(&pm).arg(&pl).arg(&po).arg(&*meta).arg(&h32).arg(&hd32).arg(&sp32).arg(&mut out.data);
            // SAFETY: as above; out holds rows * heads * head_dim.
            unsafe { b.launch(cfg((grid.0, h32, 1), 128)) }.map_err(drv)?;
        }
        if !prefill_meta.is_empty() {
            let n_seqs = prefill_meta.len() / 4;
            let meta = self.upload_u32(&prefill_meta)?;
            let mut b;
            match &cache.pools {
                KvPools::F32(kc, vc) => {
                    b = self.s().launch_builder(&self.inner.k.prefill_flash);
                    b.arg(&q.data).arg(kc).arg(vc);
                }
                KvPools::Bf16(kc, vc) => {
                    b = self.s().launch_builder(&self.inner.k.prefill_flash_bf16);
                    b.arg(&q.data).arg(kc).arg(vc);
                }
            }
            b.arg(&*tables_dev).arg(&*meta).arg(&h32).arg(&kvh32).arg(&hd32).arg(&bs32).arg(&scale).arg(&mut out.data);
            let grid = (blocks_for(max_q, 16), h32, u32_of(n_seqs, "sequences")?);
            // SAFETY: as above.
            unsafe { b.launch(cfg(grid, 128)) }.map_err(drv)?;
        }
        Ok(())
    }

    fn picks_on_device(&self) -> bool {
        true
    }

    fn pick_rows(&self, logits: &CudaBuf, width: usize, picks: &[RowPick]) -> Result<Vec<PickedRow>> {
        let rows = picks.len();
        ensure_shape(width > 0 && logits.len == rows * width, "pick_rows", || {
            format!("{} values for {rows} rows of {width}", logits.len)
        })?;
        let full: Vec<u32> = (0..rows as u32).filter(|&r| picks[r as usize] == RowPick::Full).collect();
        if full.len() == rows {
            return crate::backend::pick_host(&self.download(logits)?, width, picks);
        }
        // Only the rows that need every value come back whole.
        let mut full_rows = if full.is_empty() {
            Vec::new()
        } else {
            let mut g = self.zeros(full.len() * width)?;
            self.gather_rows(logits, width, &full, &mut g)?;
            self.download(&g)?
        };
        let argmax =
            if picks.contains(&RowPick::Argmax) { Some(self.argmax_device(logits, rows, width)?) } else { None };
        let k = picks.iter().map(|p| if let RowPick::TopK(k) = p { *k } else { 0 }).max().unwrap_or(0);
        let top = if k == 0 {
            None
        } else if k <= TOPK_MAX {
            Some(self.top_k_device(logits, rows, width, k)?)
        } else {
            // Beyond the kernel's limit: the host reduces (the engine never asks for this).
            let v = self.download(logits)?;
            let bad = v.chunks_exact(width).map(|r| r.iter().any(|x| !x.is_finite())).collect();
            Some((crate::backend::top_k_host(&v, rows, width, k), bad))
        };
        let mut out = Vec::with_capacity(rows);
        let mut rest = full_rows.as_mut_slice();
        for (r, pick) in picks.iter().enumerate() {
            out.push(match pick {
                RowPick::Full => {
                    let (row, tail) = std::mem::take(&mut rest).split_at_mut(width);
                    rest = tail;
                    PickedRow::Full(row.to_vec())
                }
                RowPick::Argmax => match &argmax {
                    Some((_, bad)) if bad[r] => PickedRow::NonFinite,
                    Some((idx, _)) => PickedRow::Argmax(idx[r]),
                    None => unreachable!("computed when any row asks"),
                },
                RowPick::TopK(kr) => match &top {
                    _ if *kr == 0 => PickedRow::TopK(Vec::new()),
                    Some((_, bad)) if bad[r] => PickedRow::NonFinite,
                    Some((t, _)) => PickedRow::TopK(t[r].iter().take(*kr).copied().collect()),
                    None => unreachable!("computed when any row asks"),
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_stay_bounded_and_cover_every_key() {
        let l = KvLayout { num_blocks: 4096, block_size: 16, kv_heads: 2, head_dim: 64 };
        for ctx in [1usize, 255, 256, 257, 8191, 8192, 8193, 32768, 65000] {
            let table: Vec<u32> = (0..ctx.div_ceil(16) as u32).collect();
            let seqs = [AttnSeq { q_start: 0, q_len: 1, ctx_len: ctx, block_table: &table }];
            let p = plan_attention(6 * 64, l, &seqs, 6).expect("plan");
            assert!(p.splits <= ATT_MAX_SPLITS, "ctx {ctx}: {} splits", p.splits);
            assert!(p.partition.is_multiple_of(ATT_PARTITION), "ctx {ctx}: partition {}", p.partition);
            assert!(p.splits * p.partition >= ctx, "ctx {ctx}: keys left out");
            assert!((p.splits - 1) * p.partition < ctx, "ctx {ctx}: an empty split");
            assert_eq!(p.decode_meta, vec![0, 0, ctx as u32]);
        }
    }

    #[test]
    fn coverage_counts_distinct_rows_and_tables_hold_only_needed_blocks() {
        let l = KvLayout { num_blocks: 16, block_size: 16, kv_heads: 1, head_dim: 8 };
        let (t0, t1) = ([3u32, 7, 9], [1u32, 2]);
        // Two sequences claiming the same row: one row covered, not two; row 2 uncovered.
        let seqs = [
            AttnSeq { q_start: 0, q_len: 1, ctx_len: 20, block_table: &t0 },
            AttnSeq { q_start: 0, q_len: 1, ctx_len: 5, block_table: &t1 },
            AttnSeq { q_start: 1, q_len: 0, ctx_len: 0, block_table: &[] },
        ];
        let p = plan_attention(3 * 8, l, &seqs, 1).expect("plan");
        assert_eq!((p.rows, p.covered), (3, 1));
        assert_eq!(p.tables, vec![3, 7, 1], "only ceil(ctx / block) blocks per sequence");
        // Out-of-pool blocks and short tables are refused like the CPU backend does.
        let bad = [AttnSeq { q_start: 0, q_len: 1, ctx_len: 20, block_table: &[3, 99] }];
        assert!(matches!(plan_attention(8, l, &bad, 1), Err(KernelError::KvCache(_))));
        let short = [AttnSeq { q_start: 0, q_len: 1, ctx_len: 40, block_table: &[3, 4] }];
        assert!(matches!(plan_attention(8, l, &short, 1), Err(KernelError::KvCache(_))));
    }

    #[test]
    fn lora_plan_layout_matches_the_kernels() {
        let segs = [
            LoraSegmentRef { rows: 0..2, rank: 4, a: 0x1_0000_0010, b: 0x2_0000_0020, scale: 0.5 },
            LoraSegmentRef { rows: 1..1, rank: 8, a: 1, b: 2, scale: 1.0 },
            LoraSegmentRef { rows: 3..4, rank: 0, a: 1, b: 2, scale: 1.0 },
            LoraSegmentRef { rows: 2..3, rank: 2, a: 0x30, b: 0x40, scale: 2.0 },
        ];
        let p = plan_lora(&segs, 4).expect("plan");
        // Two real segments: addresses as (lo, hi) u32 pairs first.
        assert_eq!(&p.blob[..p.meta_off], &[0x10, 1, 0x20, 2, 0x30, 0, 0x40, 0]);
        // (first row, rank, tmp offset): the second segment's rows start after 2 rows x rank 4.
        assert_eq!(&p.blob[p.meta_off..p.scale_off], &[0, 4, 0, 2, 2, 8]);
        assert_eq!(&p.blob[p.scale_off..p.item_off], &[0.5f32.to_bits(), 2.0f32.to_bits()]);
        assert_eq!(&p.blob[p.item_off..], &[0, 0, 0, 1, 1, 2]);
        assert_eq!((p.items, p.tmp_len), (3, 10));
    }
}
