//! Shared helpers for openlora's end-to-end tests: fixture paths and the default model.

#![deny(missing_docs)]

use std::path::PathBuf;
use std::sync::OnceLock;

use openlora::model::LoadedModel;
use openlora::model::default_model;
use openlora_kernels::CpuBackend;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Reads and parses a JSON fixture.
pub fn json_fixture(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The default model, fetched into the cache on first use and loaded once per test binary.
pub fn default_model() -> &'static LoadedModel<CpuBackend> {
    static MODEL: OnceLock<LoadedModel<CpuBackend>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = default_model::ensure_default_model().unwrap_or_else(|e| panic!("fetching the default model: {e}"));
        LoadedModel::open(&path, CpuBackend::new()).unwrap_or_else(|e| panic!("loading the default model: {e}"))
    })
}
