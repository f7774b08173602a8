//! The subcommands, one room each (`plugin` is the plugin author's new/build/check), and the start-up steps they share (thread pool, device,
//! model, service).

pub mod adapters;
pub mod bench;
pub mod cuda;
pub mod generate;
pub mod ledger;
pub mod plugin;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use openlora::config::Deployment;
use openlora::model::{LoadedModel, default_model};
use openlora::service::{Service, ServingBackend};
use openlora_kernels::{DeviceBackend, DeviceRequest, Precision};

/// Sizes the global thread pool (all cores when `None`).
pub fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

/// Whether the CPU's int8 matmuls are asked for and worth it: they need AVX-512 VNNI (without
/// it the portable kernel is slower than the f32 path: BENCHMARKS.md), so on other CPUs the
/// f32 path runs and one log line says so.
pub fn cpu_int8_usable(asked: bool) -> bool {
    if asked && !openlora_kernels::cpu::int8::has_vnni() {
        eprintln!(
            "openlora: engine.cpu_activations = \"int8\" needs AVX-512 VNNI, which this CPU lacks (or \
             OPENLORA_SIMD caps); the CPU's matmuls use f32 activations"
        );
        return false;
    }
    asked
}

/// Starts the requested device; with "auto" and no usable GPU, says so in one line and uses
/// the CPU.
pub fn start_device(req: &DeviceRequest, precision: Precision, kv: Precision, cpu_int8: bool) -> Result<DeviceBackend> {
    let cpu_int8 = cpu_int8_usable(cpu_int8);
    let (backend, fallback) = DeviceBackend::start(req, precision, kv, cpu_int8)
        .map_err(|e| anyhow::anyhow!("device \"{req}\" could not start: {e}"))?;
    if let Some(why) = fallback {
        eprintln!("openlora: device \"auto\": no usable CUDA GPU ({why}); running on the CPU");
    }
    if !backend.is_gpu() && kv == Precision::Bf16 {
        eprintln!("openlora: engine.gpu_kv_dtype = \"bf16\" applies on a GPU; the CPU keeps its KV cache in f32");
    }
    Ok(backend)
}

/// The model file a deployment names (`"default"`: the default model, fetched if missing).
pub fn model_path(d: &Deployment) -> Result<PathBuf> {
    if d.model.path == "default" {
        Ok(default_model::ensure_default_model()?)
    } else {
        Ok(PathBuf::from(&d.model.path))
    }
}

/// Loads `d`'s model on its device and starts the service (engine, pager, plugins, ledger).
pub fn start_service(d: &Deployment) -> Result<Arc<Service<ServingBackend>>> {
    init_threads(d.model.threads)?;
    let path = model_path(d)?;
    let model_id = d.model.name.clone().unwrap_or_else(|| model_id_of(&path));
    let backend =
        start_device(&d.engine.device_request(), d.engine.precision(), d.engine.kv_precision(), d.engine.cpu_int8())?;
    if backend.is_gpu() && path.is_file() {
        // What the load will take on the device, before it starts (`openlora cuda plan`).
        let settings = openlora::model::device_plan::PlanSettings::of(d);
        match openlora::model::device_plan::DevicePlan::for_gguf(&path, settings) {
            Ok(plan) => eprintln!("openlora: device memory plan for {}:\n{plan}", path.display()),
            Err(e) => eprintln!("openlora: no device memory plan for {}: {e}", path.display()),
        }
    }
    let mut loaded =
        LoadedModel::open(&path, backend.clone()).with_context(|| format!("loading {}", path.display()))?;
    if let Some(t) = &d.model.chat_template {
        let src = std::fs::read_to_string(t).with_context(|| format!("model.chat_template: reading {t}"))?;
        let own = &loaded.chat_template;
        loaded.chat_template =
            openlora::model::chat_template::ChatTemplate::new(&src, own.bos_token(), own.eos_token())
                .with_context(|| format!("model.chat_template: {t}"))?;
    }
    let loaded = Arc::new(loaded);
    let sha = openlora::service::weights_sha256(&path).with_context(|| format!("hashing {}", path.display()))?;
    Ok(Service::start(d, loaded, model_id, backend, sha)?)
}

/// A model's default id: its file (or folder) name without the extension.
pub fn model_id_of(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}
