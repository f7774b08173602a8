//! `openlora plugin new | build | check`: the plugin author's path, one command a step.
//!
//! - `new NAME --kind KIND` writes a crate (anywhere) whose trait implementation is a small
//!   working example, with native tests against the SDK's mock host and a README.
//! - `build [DIR]` compiles the crate for wasm32 and encodes the component, with the same code
//!   as `cargo xtask plugins` (`openlora-plugin-build`).
//! - `check FILE --kind KIND` loads a component exactly as the server does (ABI version,
//!   exports, the imports its kind is granted, the self-test under the default limits) and
//!   says what is wrong in terms of what to change.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use openlora::plugins::{HostOptions, PluginError, PluginHost, PluginKind, PluginSpec};
use openlora_plugin_build::CargoBuild;

/// `openlora plugin ...`.
#[derive(Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin crate: the kind's trait implemented as a working example, native
    /// tests against the SDK's mock host, and a README.
    New(NewArgs),
    /// Build a plugin crate for wasm32 and encode its component; prints the component's path.
    Build(BuildArgs),
    /// Load a component as the server would (ABI version, granted imports, self-test) and say
    /// what is wrong.
    Check(CheckArgs),
}

/// `openlora plugin new`.
#[derive(Args)]
pub struct NewArgs {
    /// The crate's name (lower case letters, digits and dashes, starting with a letter).
    pub name: String,
    /// The plugin's kind.
    #[arg(long, value_parser = parse_kind)]
    pub kind: PluginKind,
    /// Where to write it (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The SDK crate's folder, for a path dependency (default: this build's own
    /// `plugin-sdk/` when it is there, else the crates.io release).
    #[arg(long)]
    pub sdk: Option<PathBuf>,
}

/// `openlora plugin build`.
#[derive(Args)]
pub struct BuildArgs {
    /// The plugin crate's folder (default: the current one).
    pub dir: Option<PathBuf>,
    /// Where to write the component (default: TARGET/plugin/CRATE.wasm, TARGET being cargo's
    /// target directory). Only for a crate with one plugin.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `openlora plugin check`.
#[derive(Args)]
pub struct CheckArgs {
    /// The component (`.wasm`).
    pub file: PathBuf,
    /// The kind it is meant to be.
    #[arg(long, value_parser = parse_kind)]
    pub kind: PluginKind,
    /// A config value the self-test should see (`KEY=VALUE`, flattened keys such as
    /// `keywords.arr=pirate`; values are strings); repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    pub config: Vec<String>,
}

fn parse_kind(s: &str) -> Result<PluginKind, String> {
    PluginKind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("`{s}` is not a plugin kind (router, preprocessor, merger, attributor)"))
}

/// Runs a `plugin` subcommand.
pub fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::New(a) => new(a),
        PluginCommand::Build(a) => build(a),
        PluginCommand::Check(a) => check(a),
    }
}

/// This build's own SDK folder, when the binary runs where it was built.
fn bundled_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("plugin-sdk");
    sdk.join("Cargo.toml").is_file().then(|| sdk.canonicalize().unwrap_or(sdk))
}

fn template(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Router => include_str!("plugin_templates/router.rs.txt"),
        PluginKind::Preprocessor => include_str!("plugin_templates/preprocessor.rs.txt"),
        PluginKind::Merger => include_str!("plugin_templates/merger.rs.txt"),
        PluginKind::Attributor => include_str!("plugin_templates/attributor.rs.txt"),
    }
}

/// The deployment snippet's `config` lines for a kind's example.
fn config_example(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Router => "[plugins.config.keywords]\nshout = \"caps\"",
        PluginKind::Preprocessor => "[plugins.config]\nredact = \"password\"\nblock = \"forbidden\"",
        PluginKind::Merger => "[plugins.config]\ndensity = 0.5",
        PluginKind::Attributor => "[plugins.config]\nbase_share_bps = 5000",
    }
}

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// `my-router` -> `MyRouter`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn new(a: NewArgs) -> Result<()> {
    if !valid_name(&a.name) {
        bail!(
            "`{}` is not a plugin crate name: use lower case letters, digits and single dashes, starting with a letter (e.g. `my-router`)",
            a.name
        );
    }
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(&a.name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; choose another --dir", dir.display());
    }
    let sdk = a.sdk.clone().or_else(bundled_sdk);
    let sdk_dep = match &sdk {
        Some(path) => {
            let path = path.canonicalize().with_context(|| format!("--sdk {}", path.display()))?;
            if !path.join("Cargo.toml").is_file() {
                bail!("--sdk {}: no Cargo.toml there (point it at the plugin-sdk folder)", path.display());
            }
            format!("{{ path = {:?} }}", path.display().to_string())
        }
        None => format!("\"{}\"", env!("CARGO_PKG_VERSION")),
    };
    let sdk_readme = sdk.as_ref().map_or_else(
        || "https://docs.rs/openlora-plugin-sdk".to_owned(),
        |p| p.join("README.md").display().to_string(),
    );
    let kind = a.kind.name();
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# A plugin is a cdylib: `openlora plugin build` compiles it for wasm32-unknown-unknown and
# encodes the component; `cargo test` runs its tests natively against the SDK's mock host.
crate-type = ["cdylib"]

[dependencies]
openlora-plugin-sdk = {sdk_dep}

# Small, self-contained components: what the examples in openlora's repository use.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
debug = false

# A workspace of its own, so it builds wherever it is put.
[workspace]
"#,
        name = a.name
    );
    let fill = |text: &str| {
        text.replace("{{name}}", &a.name)
            .replace("{{type}}", &type_name(&a.name))
            .replace("{{kind}}", kind)
            .replace("{{wasm}}", &format!("target/plugin/{}.wasm", a.name))
            .replace("{{abs_wasm}}", &format!("/path/to/{}/target/plugin/{}.wasm", a.name, a.name))
            .replace("{{config_example}}", config_example(a.kind))
            .replace("{{sdk_readme}}", &sdk_readme)
    };
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("Cargo.toml", &manifest)?;
    write("src/lib.rs", &fill(template(a.kind)))?;
    write("README.md", &fill(include_str!("plugin_templates/README.md.txt")))?;
    write(".gitignore", "/target\n")?;
    eprintln!("openlora: wrote the {kind} plugin `{}` in {}", a.name, dir.display());
    if sdk.is_none() {
        eprintln!(
            "openlora: the SDK is taken from crates.io (openlora-plugin-sdk {}); pass --sdk DIR for a local copy",
            env!("CARGO_PKG_VERSION")
        );
    }
    eprintln!("next: cd {} && cargo test && openlora plugin build", dir.display());
    Ok(())
}

fn build(a: BuildArgs) -> Result<()> {
    let dir = a.dir.unwrap_or_else(|| PathBuf::from("."));
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("{}: no Cargo.toml (run it in a plugin crate, or pass its folder)", dir.display());
    }
    let options = CargoBuild { target_dir: None, workspace: false, current_dir: Some(dir.clone()) };
    let modules = openlora_plugin_build::cargo_build(&manifest, &options)?;
    if modules.is_empty() {
        return Err(openlora_plugin_build::BuildError::NoCdylib { manifest }.into());
    }
    if a.out.is_some() && modules.len() > 1 {
        bail!("--out names one file, but the build made {} plugins", modules.len());
    }
    for module in modules {
        let component = openlora_plugin_build::componentize_file(&module.path)?;
        let out = match &a.out {
            Some(out) => out.clone(),
            // <target>/wasm32-unknown-unknown/release/x.wasm -> <target>/plugin/x.wasm
            None => {
                let target = module.path.ancestors().nth(3).unwrap_or(Path::new("target"));
                target.join("plugin").join(format!("{}.wasm", module.crate_name))
            }
        };
        openlora_plugin_build::write_atomically(&out, &component)?;
        eprintln!("openlora: built {} ({} KiB component)", module.crate_name, component.len().div_ceil(1024));
        println!("{}", out.display());
    }
    Ok(())
}

/// What a failure to load means for the author: the error, then what to change.
fn advice(kind: PluginKind, error: &PluginError) -> String {
    let granted = kind.granted_imports().iter().map(|i| format!("openlora:plugin/{i}")).collect::<Vec<_>>().join(", ");
    match error {
        PluginError::WrongKind { .. } => format!(
            "the component does not implement a {kind}: export it with `export_{kind}!` (or pass the --kind it was built as)"
        ),
        PluginError::ForbiddenImport { .. } => format!(
            "a {kind} may import only {granted}. A `wasi:` import means it was built for a WASI target or uses std's files, clock or randomness: build it with `openlora plugin build` (wasm32-unknown-unknown) and drop the dependency that needs them"
        ),
        PluginError::UnsupportedAbi { .. } => {
            "rebuild it against an openlora-plugin-sdk whose ABI this server supports".to_owned()
        }
        PluginError::Invalid { .. } | PluginError::Io { .. } => {
            "this is not a component built by `openlora plugin build` (a core module from `cargo build` must be encoded first)".to_owned()
        }
        e if e.is_guest_fault() => format!(
            "the load-time self-test failed, so the server would refuse to load it. It calls the plugin once under its limits with a canned input: {}. Run `cargo test` on the crate with the same input (openlora_plugin_sdk::testing) to see why",
            self_test_input(kind)
        ),
        _ => String::new(),
    }
}

/// What the self-test sends a plugin of `kind` (see `PluginHost::load`).
fn self_test_input(kind: PluginKind) -> &'static str {
    match kind {
        PluginKind::Router | PluginKind::Preprocessor => {
            "model `base`, one user message \"Hello! This is the openlora plugin self-test.\", metadata openlora-self-test=1, tenant `self-test`, an empty catalog; any decision passes"
        }
        PluginKind::Merger => {
            "adapters self-test-a and self-test-b at weight 1.0, metadata openlora-self-test=1; a refusal passes, a recipe must have 2 finite weights and a density in (0, 1]"
        }
        PluginKind::Attributor => {
            "a record of 500 + 500 tokens priced 1000 micros, base model owner `self-test`, no adapters; a refusal passes, payments must sum to 1000"
        }
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let mut spec = PluginSpec::new(
        a.file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into()),
        a.kind,
        &a.file,
    );
    for kv in &a.config {
        let (k, v) = kv.split_once('=').with_context(|| format!("--config {kv}: expected KEY=VALUE"))?;
        spec.config.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    let host = PluginHost::new(HostOptions::default()).context("starting the plugin host")?;
    match host.load(spec) {
        Ok(report) => {
            println!(
                "ok: {} is a {} for openlora:plugin@{}; it imports only what a {} is granted ({}) and passed the self-test ({}); sha256 {}",
                a.file.display(),
                a.kind,
                report.abi_version,
                a.kind,
                a.kind.granted_imports().join(", "),
                self_test_input(a.kind),
                report.component_sha256
            );
            Ok(())
        }
        Err(f) => {
            let advice = advice(a.kind, &f.error);
            if advice.is_empty() {
                bail!("{}: {f}", a.file.display());
            }
            bail!("{}: {f}\n  what to do: {advice}", a.file.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_types() {
        assert!(valid_name("my-router") && valid_name("r2"));
        assert!(
            !valid_name("My") && !valid_name("a--b") && !valid_name("a-") && !valid_name("1a") && !valid_name("a_b")
        );
        assert_eq!(type_name("my-router"), "MyRouter");
        assert_eq!(type_name("r2"), "R2");
    }
}
