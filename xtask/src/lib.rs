//! # xtask
//!
//! openlora's build chores, as a library (so tests call the same code path) and a binary
//! (`cargo xtask plugins`).
//!
//! Building a plugin takes two steps: `cargo build --target wasm32-unknown-unknown` of the
//! plugin workspace, then turning each core module into a component with `wit-component`'s
//! encoder. Nothing is downloaded but crates.
//!
//! Design decisions:
//! - A plugin workspace (`plugins/`, `tests/fixtures/plugins/`) is built by one cargo
//!   invocation into `target/wasm-plugins`, a target directory of its own, so a build started
//!   from inside `cargo test` never waits on the host build's lock.
//! - The result is cached by content: the SHA-256 of every input file (the workspace's
//!   sources, the SDK and its WIT) is written next to the components, and an unchanged input
//!   set skips cargo entirely. Tests therefore pay for the build once.
//! - The SDK generates bindings for all four plugin worlds, and the linker may keep the
//!   `component-type` sections of all of them. The encoder would then expect the union of the
//!   worlds' exports, so before encoding, exports the module does not implement are pruned
//!   from the embedded world.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::{WorldItem, WorldKey};

/// Errors from building plugins.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `cargo build` of the plugin workspace failed.
    #[error("cargo build of {workspace} failed ({status}):\n{stderr}")]
    Cargo {
        /// The workspace's manifest.
        workspace: PathBuf,
        /// Cargo's exit status.
        status: String,
        /// Cargo's diagnostics.
        stderr: String,
    },
    /// A core module could not be turned into a component.
    #[error("componentizing {module}: {message}")]
    Componentize {
        /// The core module.
        module: PathBuf,
        /// What went wrong (wit-component's error chain).
        message: String,
    },
}

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

    let modules = cargo_build(workspace)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // Remove stale components (a renamed crate must not linger).
    for old in list_components(out_dir)?.values() {
        std::fs::remove_file(old).map_err(io(old))?;
    }
    let mut components = BTreeMap::new();
    for (name, module) in modules {
        let bytes = std::fs::read(&module).map_err(io(&module))?;
        let component = componentize(&bytes)
            .map_err(|e| BuildError::Componentize { module: module.clone(), message: format!("{e:#}") })?;
        let path = out_dir.join(format!("{name}.wasm"));
        write_atomically(&path, &component)?;
        components.insert(name, path);
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

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// SHA-256 over the relative paths and contents of every file that can change the build:
/// the workspace (without `target/`), the SDK's manifest, sources and WIT, the toolchain
/// pin, the cargo config (wasm rustflags), and this tool's version.
fn inputs_hash(workspace: &Path) -> Result<String, BuildError> {
    let mut files = Vec::new();
    collect_files(workspace, &mut files)?;
    let sdk = repo_root().join("plugin-sdk");
    files.push(sdk.join("Cargo.toml"));
    collect_files(&sdk.join("src"), &mut files)?;
    collect_files(&sdk.join("wit"), &mut files)?;
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

/// Runs cargo on the workspace and returns (crate name with dashes, core module path).
fn cargo_build(workspace: &Path) -> Result<Vec<(String, PathBuf)>, BuildError> {
    let manifest = workspace.join("Cargo.toml");
    let target_dir = repo_root().join("target").join("wasm-plugins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(repo_root())
        .args(["build", "--release", "--workspace", "--target", "wasm32-unknown-unknown", "--message-format=json"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build (coverage, sanitizers, target-cpu) must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(io(&manifest))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // With JSON output, rustc's diagnostics are in stdout; show them rendered.
        let mut stderr: String = stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-message")
            .filter_map(|m| m["message"]["rendered"].as_str().map(str::to_owned))
            .collect();
        stderr.push_str(&String::from_utf8_lossy(&output.stderr));
        return Err(BuildError::Cargo { workspace: manifest, status: output.status.to_string(), stderr });
    }
    let mut modules = Vec::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if !is_cdylib {
            continue;
        }
        let name = message["target"]["name"].as_str().unwrap_or_default().replace('_', "-");
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"))
            .map(PathBuf::from);
        if let Some(wasm) = wasm {
            modules.push((name, wasm));
        }
    }
    Ok(modules)
}

/// Turns a core module built with `wit-bindgen` into a component.
///
/// Exports named in the embedded world(s) that the module does not implement are dropped
/// first (see the crate docs), so a plugin exports exactly the interface of its kind.
pub fn componentize(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (stripped, mut bindgen) = wit_component::metadata::decode(module)?;
    let mut stripped =
        stripped.ok_or_else(|| anyhow::anyhow!("no component-type section (not built with wit-bindgen?)"))?;
    let core_exports = core_export_names(module)?;
    let resolve = &bindgen.resolve;
    let keep: Vec<WorldKey> = resolve.worlds[bindgen.world]
        .exports
        .iter()
        .filter(|(key, item)| {
            let name = resolve.name_world_key(key);
            match item {
                WorldItem::Interface { .. } => core_exports.iter().any(|e| e.starts_with(&format!("{name}#"))),
                WorldItem::Function { .. } => core_exports.contains(&name),
                WorldItem::Type { .. } => true,
            }
        })
        .map(|(key, _)| key.clone())
        .collect();
    bindgen.resolve.worlds[bindgen.world].exports.retain(|key, _| keep.contains(key));
    wit_component::embed_component_metadata(&mut stripped, &bindgen.resolve, bindgen.world, StringEncoding::UTF8)?;
    ComponentEncoder::default().module(&stripped)?.validate(true).encode()
}

fn core_export_names(module: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        if let wasmparser::Payload::ExportSection(reader) = payload? {
            for export in reader {
                names.push(export?.name.to_owned());
            }
        }
    }
    Ok(names)
}
