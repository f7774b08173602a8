//! Compiled components on disk, keyed by content.
//!
//! Compiling a component with Cranelift takes tens of milliseconds to seconds; loading a
//! precompiled one is a file map. The key is the SHA-256 of the component bytes together with
//! wasmtime's version and the engine's compatibility hash (its settings and the CPU features
//! compiled for), so a changed engine or wasmtime never loads stale code. Files are written
//! to a temporary name and renamed, so a reader never sees a partial file; a file that fails
//! to deserialize anyway is recompiled and replaced.
//!
//! A loaded component maps its cache file, so files are only ever replaced by rename, never
//! rewritten in place (truncating a mapped file would crash the process with SIGBUS). Anyone
//! cleaning the cache directory must delete or rename files, not truncate them.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::PluginError;

/// Feeds `Hash` output into SHA-256, so the key is stable across processes (unlike
/// `DefaultHasher`, whose algorithm is unspecified).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The SHA-256 (hex) of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn cache_key(engine: &Engine, component_sha256: &str) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    component_sha256.hash(&mut hasher);
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    "wasmtime-48".hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(hasher.0.finalize())
}

fn invalid(error: wasmtime::Error) -> PluginError {
    PluginError::Invalid { message: format!("{error:#}") }
}

/// Compiles `bytes`, or loads the compiled code from `cache_dir` when present. Returns the
/// component and whether the cache was hit.
pub(crate) fn compile(
    engine: &Engine,
    bytes: &[u8],
    component_sha256: &str,
    cache_dir: Option<&Path>,
) -> Result<(Component, bool), PluginError> {
    let Some(dir) = cache_dir else {
        return Component::new(engine, bytes).map(|c| (c, false)).map_err(invalid);
    };
    let path = dir.join(format!("{}.cwasm", cache_key(engine, component_sha256)));
    if path.exists() {
        // SAFETY: the file was written by `precompile_component` of an engine with the same
        // compatibility hash (it is in the name), into a directory the host owns; wasmtime
        // additionally checks the header and rejects files from other versions or settings.
        if let Ok(component) = unsafe { Component::deserialize_file(engine, &path) } {
            return Ok((component, true));
        }
    }
    let compiled = engine.precompile_component(bytes).map_err(invalid)?;
    if let Err(e) = write_atomically(dir, &path, &compiled) {
        // The cache is an optimisation: a read-only or full disk must not stop loading.
        eprintln!("plugin cache: cannot write {}: {e}", path.display());
    }
    // SAFETY: `compiled` was produced just now by `precompile_component` on this engine.
    let component = unsafe { Component::deserialize(engine, &compiled) }.map_err(invalid)?;
    Ok((component, false))
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp: PathBuf = path.with_extension(format!("tmp{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
