//! # openlora-plugin-build
//!
//! Turns an openlora plugin crate into the WebAssembly component the host loads, in two
//! steps: `cargo build --release --target wasm32-unknown-unknown`, then `wit-component`'s
//! encoder on each core module. `openlora plugin build` (for one crate, anywhere) and `cargo
//! xtask plugins` (for this repository's plugin workspaces) both call this crate, so a plugin
//! built outside the repository is encoded exactly like the examples.
//!
//! Design decisions:
//! - The SDK generates bindings for all four plugin worlds, and the linker may keep the
//!   `component-type` sections of all of them. The encoder would then expect the union of the
//!   worlds' exports, so before encoding, exports the module does not implement are pruned
//!   from the embedded world ([`componentize`]).
//! - Plugins get a 64 KiB shadow stack ([`WASM_RUSTFLAGS`]) unless the caller's environment
//!   sets the wasm32 rustflags itself: a call's working set then stays in the first pages of
//!   its memory, which the host keeps resident between calls. The same flags as this
//!   repository's `.cargo/config.toml`, so a shared target directory reuses compiled crates.
//! - Flags meant for the host build (coverage, sanitizers, `target-cpu`) never leak into the
//!   wasm build: `RUSTFLAGS` and friends are removed from cargo's environment.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::{WorldItem, WorldKey};

/// The target plugins are compiled for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The rustflags of a plugin build (a 64 KiB stack; see the crate docs).
pub const WASM_RUSTFLAGS: &str = "-C link-arg=-zstack-size=65536";

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
    /// `cargo build` failed.
    #[error("cargo build of {manifest} failed ({status}):\n{stderr}")]
    Cargo {
        /// The manifest built.
        manifest: PathBuf,
        /// Cargo's exit status.
        status: String,
        /// Cargo's diagnostics.
        stderr: String,
    },
    /// The build produced no `cdylib` (a plugin crate needs `crate-type = ["cdylib"]`).
    #[error(
        "cargo build of {manifest} produced no wasm cdylib; a plugin crate needs `[lib] crate-type = [\"cdylib\"]`"
    )]
    NoCdylib {
        /// The manifest built.
        manifest: PathBuf,
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

/// One core module cargo built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreModule {
    /// The crate's name, with dashes (`my-router`).
    pub crate_name: String,
    /// The `.wasm` core module.
    pub path: PathBuf,
}

/// How to run cargo for a plugin build.
#[derive(Clone, Debug, Default)]
pub struct CargoBuild {
    /// `--target-dir` (None: cargo's choice, which honours `CARGO_TARGET_DIR`).
    pub target_dir: Option<PathBuf>,
    /// Build every member of the workspace (`--workspace`) rather than the manifest's package.
    pub workspace: bool,
    /// The directory cargo runs in (its config files are found from there).
    pub current_dir: Option<PathBuf>,
}

/// Runs `cargo build --release --target wasm32-unknown-unknown` on `manifest` and returns
/// the core modules of its cdylib crates.
pub fn cargo_build(manifest: &Path, options: &CargoBuild) -> Result<Vec<CoreModule>, BuildError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", WASM_TARGET, "--message-format=json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(manifest)
        // Flags meant for the host build (coverage, sanitizers, target-cpu) must not leak in.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    if options.workspace {
        cmd.arg("--workspace");
    }
    if let Some(dir) = &options.target_dir {
        cmd.arg("--target-dir").arg(dir).env_remove("CARGO_TARGET_DIR");
    }
    if let Some(dir) = &options.current_dir {
        cmd.current_dir(dir);
    }
    let flags = "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS";
    if std::env::var_os(flags).is_none() {
        cmd.env(flags, WASM_RUSTFLAGS);
    }
    let output = cmd.output().map_err(io(manifest))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(BuildError::Cargo {
            manifest: manifest.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
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
        let crate_name = message["target"]["name"].as_str().unwrap_or_default().replace('_', "-");
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"))
            .map(PathBuf::from);
        if let Some(path) = wasm {
            modules.push(CoreModule { crate_name, path });
        }
    }
    Ok(modules)
}

/// Reads the core module at `module` and returns its component.
pub fn componentize_file(module: &Path) -> Result<Vec<u8>, BuildError> {
    let bytes = std::fs::read(module).map_err(io(module))?;
    componentize(&bytes).map_err(|e| BuildError::Componentize { module: module.to_owned(), message: format!("{e:#}") })
}

/// Writes `bytes` to `path` through a temporary file and a rename (readers never see half).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
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
