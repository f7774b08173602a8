//! Compiling the CUDA C sources in `kernels/cuda/` with NVRTC, and the on-disk cubin cache.
//!
//! NVRTC is loaded at run time (cudarc's dynamic loading). It needs no GPU and no driver, so
//! the same code compiles every kernel for `sm_80` and `sm_90` in CI on a CPU-only machine
//! (from the `nvidia-cuda-nvrtc-cu12` wheel), and on a GPU machine compiles for the device's
//! architecture at start. Compiled cubins are cached on disk under a key made of the source,
//! the options and the architecture, so a restart (or a machine without NVRTC, given a filled
//! cache) loads them without compiling.

use std::ffi::{CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use super::CudaError;

/// Prepended to every module's source.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// The kernel modules: (name, source). One cubin each.
pub const MODULES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../cuda/elementwise.cu")),
    ("matmul", include_str!("../../cuda/matmul.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
    ("lora", include_str!("../../cuda/lora.cu")),
    ("sampling", include_str!("../../cuda/sampling.cu")),
];

/// Options every module is compiled with (besides the architecture). No fast-math: results are
/// compared with the CPU reference.
const OPTIONS: &[&str] = &["-std=c++17", "--ptxas-options=-v", "-lineinfo"];

/// Environment variable naming libnvrtc's path when it is not on the loader's search path.
pub const NVRTC_ENV: &str = "OPENLORA_NVRTC";

/// One compiled module.
#[derive(Debug, Clone)]
pub struct CompiledModule {
    /// Module name (the .cu file's stem).
    pub name: &'static str,
    /// Target architecture, `sm_XY`.
    pub arch: String,
    /// The cubin.
    pub cubin: Vec<u8>,
    /// NVRTC's log: warnings and ptxas's per-kernel register/spill report.
    pub log: String,
    /// Whether it came from the disk cache (then `log` is empty).
    pub cached: bool,
}

/// Per-kernel resource usage parsed from ptxas's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// Kernel (function) name.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes reloaded from spills.
    pub spill_loads: u32,
    /// Static shared memory in bytes.
    pub shared_bytes: u32,
}

impl CompiledModule {
    /// The register/spill report of every kernel in the module (from ptxas's verbose output).
    pub fn resources(&self) -> Vec<KernelResources> {
        parse_ptxas_report(&self.log)
    }
}

/// Parses ptxas `-v` output: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes
/// spill stores, M bytes spill loads", then "Used R registers, ... S bytes smem".
pub fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let idx = line.find(word)?;
        line[..idx].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources { kernel: name, registers: 0, spill_stores: 0, spill_loads: 0, shared_bytes: 0 });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Candidate locations of libnvrtc outside the loader's search path: `$OPENLORA_NVRTC`, then the
/// `nvidia-cuda-nvrtc-cu12` wheel that `.ci/run` installs under the cache directory.
fn nvrtc_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os(NVRTC_ENV) {
        v.push(PathBuf::from(p));
    }
    let caches = [
        std::env::var_os("OPENLORA_CACHE").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("openlora")),
    ];
    for c in caches.into_iter().flatten() {
        v.push(c.join("cuda-nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"));
    }
    v
}

/// Makes libnvrtc loadable: if the dynamic loader cannot find it by name, loads it by full
/// path from [`nvrtc_candidates`] and keeps it loaded, so cudarc's lookup by soname finds it.
/// Returns where it came from.
pub fn ensure_nvrtc() -> Result<String, CudaError> {
    static LOADED: OnceLock<Result<String, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            for path in nvrtc_candidates() {
                if path.is_file() {
                    // SAFETY: loading NVIDIA's library runs its initialisers, which have no
                    // preconditions; the handle is leaked so the library stays loaded.
                    match unsafe { libloading::Library::new(&path) } {
                        Ok(lib) => {
                            std::mem::forget(lib);
                            return Ok(path.display().to_string());
                        }
                        Err(e) => return Err(format!("loading {}: {e}", path.display())),
                    }
                }
            }
            // SAFETY: only probes whether the library can be opened.
            if unsafe { nvrtc_sys::is_culib_present() } {
                return Ok("the dynamic loader's search path".into());
            }
            Err(format!(
                "libnvrtc was not found: install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc-cu12` and \
                 set {NVRTC_ENV} to its lib/libnvrtc.so.12"
            ))
        })
        .clone()
        .map_err(CudaError::NoLibrary)
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    ensure_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc { module: "version".into(), log: format!("{r:?}") });
    }
    Ok((major, minor))
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The full source NVRTC compiles for a module.
pub fn full_source(src: &str) -> String {
    format!("{COMMON}\n#line 1\n{src}")
}

/// Cache key of a module for an architecture.
pub fn cache_key(name: &str, src: &str, arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(full_source(src).as_bytes());
    for o in OPTIONS {
        h.update(o.as_bytes());
        h.update([0]);
    }
    h.update(arch.as_bytes());
    format!("{name}-{arch}-{}", &hex::encode(h.finalize())[..16])
}

/// Compiles one module to a cubin for `arch` (`sm_80`, `sm_90`, ...).
pub fn compile(name: &'static str, src: &str, arch: &str) -> Result<CompiledModule, CudaError> {
    ensure_nvrtc()?;
    let fail = |log: String| CudaError::Nvrtc { module: format!("{name} ({arch})"), log };
    let source = CString::new(full_source(src)).map_err(|e| fail(e.to_string()))?;
    let file = CString::new(format!("{name}.cu")).map_err(|e| fail(e.to_string()))?;
    let prog = nvrtc_result::create_program(&source, Some(&file)).map_err(|e| fail(format!("{e:?}")))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    // SAFETY: `prog` was just created and is destroyed once below.
    let compiled = unsafe { nvrtc_result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { nvrtc_result::get_program_log(prog) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
    let result = compiled.map_err(|e| fail(format!("{e:?}\n{log}"))).and_then(|()| {
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reported.
        unsafe {
            let r = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size);
            if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                return Err(fail(format!("no cubin ({r:?}); was a real sm_XY architecture given?")));
            }
            let mut cubin = vec![0u8; size];
            let r = nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast());
            if r != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(fail(format!("nvrtcGetCUBIN: {r:?}")));
            }
            Ok(cubin)
        }
    });
    // SAFETY: `prog` is not used after this.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    Ok(CompiledModule { name, arch: arch.to_string(), cubin: result?, log, cached: false })
}

/// Compiles every module for `arch`.
pub fn compile_all(arch: &str) -> Result<Vec<CompiledModule>, CudaError> {
    MODULES.iter().map(|(name, src)| compile(name, src, arch)).collect()
}

/// Loads a module's cubin from `cache_dir` or compiles it (and stores it there).
pub fn load_or_compile(
    name: &'static str,
    src: &str,
    arch: &str,
    cache_dir: Option<&Path>,
) -> Result<CompiledModule, CudaError> {
    let path = cache_dir.map(|d| d.join(format!("{}.cubin", cache_key(name, src, arch))));
    if let Some(p) = &path
        && let Ok(cubin) = std::fs::read(p)
        && !cubin.is_empty()
    {
        return Ok(CompiledModule { name, arch: arch.to_string(), cubin, log: String::new(), cached: true });
    }
    let m = compile(name, src, arch)?;
    if let Some(p) = &path {
        // Best effort: a read-only cache only costs a compile next time.
        if let Some(dir) = p.parent()
            && std::fs::create_dir_all(dir).is_ok()
        {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &m.cubin).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(m)
}

/// The default cubin cache: `$OPENLORA_CACHE/kernels` or `~/.cache/openlora/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("OPENLORA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("openlora")))
        .map(|c| c.join("kernels"))
}
