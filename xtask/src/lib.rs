//! # xtask
//!
//! openlora's build chores, as a library (so tests call the same code path) and a binary
//! (`cargo xtask plugins`).
//!
//! Building a plugin takes two steps: `cargo build --target wasm32-unknown-unknown` of the
//! plugin workspace, then turning each core module into a component with `wit-component`'s
//! encoder. Both live in `openlora-plugin-build`, which `openlora plugin build` uses too.
//! Nothing is downloaded but crates.
//!
//! Design decisions:
//! - A plugin workspace (`plugins/`, `tests/fixtures/plugins/`) is built by one cargo
//!   invocation into `target/wasm-plugins`, a target directory of its own, so a build started
//!   from inside `cargo test` never waits on the host build's lock.
//! - The result is cached by content: the SHA-256 of every input file (the workspace's
//!   sources, the SDK and its WIT) is written next to the components, and an unchanged input
//!   set skips cargo entirely. Tests therefore pay for the build once.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use openlora_plugin_build::{BuildError, componentize};
use openlora_plugin_build::{CargoBuild, write_atomically};
use sha2::{Digest, Sha256};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io { path: path.to_owned(), source }
}

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned).unwrap_or_else(|| PathBuf::from("."))
}

/// The example plugins' workspace.
pub fn examples_workspace() -> PathBuf {
    repo_root().join("plugins")
}

/// The test fixture plugins' workspace.
pub fn fixtures_workspace() -> PathBuf {
    repo_root().join("tests").join("fixtures").join("plugins")
}

/// Where the components of a workspace named `label` are written: `target/plugins/<label>`.
pub fn output_dir(label: &str) -> PathBuf {
    repo_root().join("target").join("plugins").join(label)
}

/// Components built from one workspace: crate name (with dashes) -> component file.
#[derive(Debug, Clone)]
pub struct BuiltPlugins {
    /// Each plugin crate's component.
    pub components: BTreeMap<String, PathBuf>,
    /// Whether the content-hash cache was hit (no cargo run).
    pub cached: bool,
}

impl BuiltPlugins {
    /// The component of the crate `name`.
    pub fn get(&self, name: &str) -> Option<&Path> {
        self.components.get(name).map(PathBuf::as_path)
    }
}

const STAMP: &str = "inputs.sha256";

/// Builds every crate of the plugin workspace at `workspace` into components in `out_dir`,
/// unless the inputs are unchanged since the last build there.
pub fn build_workspace(workspace: &Path, out_dir: &Path) -> Result<BuiltPlugins, BuildError> {
    let hash = inputs_hash(workspace)?;
    let stamp = out_dir.join(STAMP);
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(hash.as_str()) {
        let components = list_components(out_dir)?;
        if !components.is_empty() {
            return Ok(BuiltPlugins { components, cached: true });
        }
    }

    // One cargo invocation for the workspace, into a target directory of its own (see the
    // crate docs), from the repository root so its `.cargo/config.toml` applies.
    let options = CargoBuild {
        target_dir: Some(repo_root().join("target").join("wasm-plugins")),
        workspace: true,
        current_dir: Some(repo_root()),
    };
    let modules = openlora_plugin_build::cargo_build(&workspace.join("Cargo.toml"), &options)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // Remove stale components (a renamed crate must not linger).
    for old in list_components(out_dir)?.values() {
        std::fs::remove_file(old).map_err(io(old))?;
    }
    let mut components = BTreeMap::new();
    for module in modules {
        let component = openlora_plugin_build::componentize_file(&module.path)?;
        let path = out_dir.join(format!("{}.wasm", module.crate_name));
        write_atomically(&path, &component)?;
        components.insert(module.crate_name, path);
    }
    write_atomically(&stamp, hash.as_bytes())?;
    Ok(BuiltPlugins { components, cached: false })
}

fn list_components(dir: &Path) -> Result<BTreeMap<String, PathBuf>, BuildError> {
    let mut found = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(BuildError::Io { path: dir.to_owned(), source: e }),
    };
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        if path.extension().is_some_and(|e| e == "wasm")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            found.insert(stem.to_owned(), path.clone());
        }
    }
    Ok(found)
}

/// SHA-256 over the relative paths and contents of every file that can change the build:
/// the workspace (without `target/`), the SDK's manifest, sources and WIT, the encoder, the
/// toolchain pin, the cargo config (wasm rustflags), and this tool's version.
fn inputs_hash(workspace: &Path) -> Result<String, BuildError> {
    let mut files = Vec::new();
    collect_files(workspace, &mut files)?;
    let sdk = repo_root().join("plugin-sdk");
    files.push(sdk.join("Cargo.toml"));
    collect_files(&sdk.join("src"), &mut files)?;
    collect_files(&sdk.join("wit"), &mut files)?;
    files.push(repo_root().join("plugin-build").join("src").join("lib.rs"));
    files.push(repo_root().join("rust-toolchain.toml"));
    files.push(repo_root().join(".cargo").join("config.toml"));
    files.sort();
    let mut hasher = Sha256::new();
    hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
    for file in files {
        let contents = std::fs::read(&file).map_err(io(&file))?;
        hasher.update(file.strip_prefix(repo_root()).unwrap_or(&file).to_string_lossy().as_bytes());
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BuildError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io(&path))?;
        if path.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        // Symlinked WIT files are followed: their content is what matters.
        if file_type.is_dir() || (file_type.is_symlink() && path.is_dir()) {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}
