//! The adapter catalog: every PEFT adapter a server *could* serve, registered from directories
//! without reading a single weight.
//!
//! A deployment may hold tens of thousands of adapters on disk while only a few are in use, so
//! registration reads three small things per adapter: `adapter_config.json`, the safetensors
//! *header* (the first 8 bytes give its length, then a JSON table of tensor names, dtypes,
//! shapes and offsets) and the optional `openlora.toml` manifest. That is enough to refuse an
//! adapter for another base model, an unsupported PEFT variant or a truncated file up front, and
//! to know how many bytes the adapter will take once loaded, which the
//! [pager](super::pager) needs to respect its budgets. The weights themselves are read, hashed
//! and fully validated by [`LoraHost::load`](super::LoraHost::load) when the pager loads them.
//!
//! Each registered folder carries a *revision* number, replaced whenever the catalog sees the
//! folder change (size, modification time, inode or header). The pager binds a name to the
//! generation (content hash) it read under one revision, so after a [`Catalog::rescan`] a
//! changed folder is read again and never served from stale weights.
//!
//! Guarantees and non-guarantees:
//! - A bad adapter never stops a scan; its error names the adapter and the problem and lands in
//!   [`ScanReport::errors`].
//! - Registration checks tensor names, dtypes, shapes against the base model, A/B pairing, ranks
//!   and that every tensor's bytes lie inside the file. It does not check values (non-finite
//!   weights) or `rank_pattern` regexes; the full load does.
//! - A rewrite that keeps a file's size, modification time and inode is not seen by
//!   [`Catalog::rescan`]; loads stay correct regardless, because the generation is computed
//!   from the bytes actually read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use rayon::prelude::*;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};

use super::Proj;
use super::manifest::{MANIFEST_FILE, Manifest, ManifestError};
use super::peft::{AdapterError, LoraHost, MAX_RANK, proj_dims};
use crate::model::config::LlamaConfig;

/// The PEFT config file every adapter folder has.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The PEFT weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Largest safetensors header accepted (PEFT headers are tens of KiB).
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// A catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The adapter itself is unreadable or invalid (the error names it).
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The adapter's manifest is invalid.
    #[error("adapter `{adapter}`: manifest {source}")]
    Manifest {
        /// The adapter's name.
        adapter: String,
        /// What is wrong.
        source: ManifestError,
    },
    /// A directory to scan could not be listed.
    #[error("adapter directory {path}: {source}")]
    Root {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Two folders would register the same name.
    #[error("adapter `{name}`: found in both {first} and {second}; names must be unique (the second is ignored)")]
    Duplicate {
        /// The name.
        name: String,
        /// The folder registered.
        first: PathBuf,
        /// The folder ignored.
        second: PathBuf,
    },
    /// A folder name cannot be an adapter name.
    #[error("adapter folder {path}: {reason}")]
    BadName {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No adapter is registered under this name.
    #[error("adapter `{0}` is not in the catalog")]
    NotFound(String),
}

/// What identifies one file's version without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    /// Size in bytes.
    pub len: u64,
    /// Modification time.
    pub modified: Option<SystemTime>,
    /// Inode number (0 where the platform has none); a replace-by-rename changes it.
    pub inode: u64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Self { len: meta.len(), modified: meta.modified().ok(), inode }
    }
}

/// The versions of an adapter folder's three files (`manifest` is `None` when absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderStamp {
    /// `adapter_config.json`.
    pub config: FileStamp,
    /// `adapter_model.safetensors`.
    pub weights: FileStamp,
    /// `openlora.toml`.
    pub manifest: Option<FileStamp>,
}

impl FolderStamp {
    fn read(name: &str, dir: &Path) -> Result<Self, AdapterError> {
        let stat = |file: &str| {
            let path = dir.join(file);
            std::fs::metadata(&path).map(|m| FileStamp::of(&m)).map_err(|source| AdapterError::Io {
                adapter: name.to_owned(),
                path,
                source,
            })
        };
        let manifest = match std::fs::metadata(dir.join(MANIFEST_FILE)) {
            Ok(m) => Some(FileStamp::of(&m)),
            Err(_) => None,
        };
        Ok(Self { config: stat(CONFIG_FILE)?, weights: stat(WEIGHTS_FILE)?, manifest })
    }
}

/// How an entry came into the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Found by scanning one of the catalog's directories; a rescan removes it when its folder
    /// disappears from there.
    Scanned,
    /// Registered by [`Catalog::add`]; only [`Catalog::remove`] (or its folder vanishing)
    /// removes it.
    Added,
}

/// One registered adapter: where it is, what it will cost once loaded, and its manifest.
#[derive(Clone, Debug)]
pub struct CatalogEntry {
    /// The name requests use (the folder name for scanned adapters).
    pub name: String,
    /// The PEFT folder.
    pub dir: PathBuf,
    /// Changes whenever the catalog sees the folder change; unique across the catalog's life.
    pub revision: u64,
    /// The file versions this entry was registered from.
    pub stamp: FolderStamp,
    /// The manifest (`openlora.toml`), if the folder has one.
    pub manifest: Option<Manifest>,
    /// Bytes of f32 weights once loaded: what [`LoraHost::bytes`] will report, and what a load
    /// reserves before it reads the file. The prepared
    /// [`LoraAdapter::bytes`](super::LoraAdapter::bytes) is what the backend holds, the file's
    /// precision on the CPU (half of this for a 16-bit adapter); the reservation shrinks to it.
    pub loaded_bytes: usize,
    /// The largest rank of any module.
    pub max_rank: usize,
    /// Targeted modules (A/B pairs).
    pub modules: usize,
    /// How it was registered.
    pub origin: Origin,
    /// The tenants that may see and use it (`None`: every tenant). Set from the catalog's
    /// visibility rules whenever the entry is registered, so a reload or a rescan of a private
    /// adapter keeps it private.
    pub visible_to: Option<Vec<String>>,
}

impl CatalogEntry {
    /// Whether `tenant` may see and use this adapter (admins are checked by the caller).
    pub fn visible_to(&self, tenant: &str) -> bool {
        self.visible_to.as_ref().is_none_or(|v| v.iter().any(|t| t == tenant))
    }
}

/// What a scan or rescan did.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Names registered for the first time.
    pub added: Vec<String>,
    /// Names whose folder changed (they have a new revision).
    pub changed: Vec<String>,
    /// Names no longer registered (folder gone, or now invalid: see `errors`).
    pub removed: Vec<String>,
    /// Names seen again unchanged.
    pub unchanged: usize,
    /// Adapters refused, each naming the adapter and the problem.
    pub errors: Vec<CatalogError>,
}

/// The set of adapters known to one base model. Safe to share between threads; every method
/// takes `&self`.
pub struct Catalog {
    base: LlamaConfig,
    roots: Vec<PathBuf>,
    /// Adapter name -> the tenants that may use it; names not listed are public.
    visibility: BTreeMap<String, Vec<String>>,
    entries: RwLock<HashMap<String, Arc<CatalogEntry>>>,
    next_revision: AtomicU64,
}

impl Catalog {
    /// An empty catalog for adapters of `base`, scanning `roots` on [`Catalog::rescan`].
    pub fn new(base: LlamaConfig, roots: Vec<PathBuf>) -> Self {
        Self {
            base,
            roots,
            visibility: BTreeMap::new(),
            entries: RwLock::new(HashMap::new()),
            next_revision: AtomicU64::new(1),
        }
    }

    /// Restricts the named adapters to the listed tenants (a deployment's
    /// `[adapters.visibility]`). The rule belongs to the name: every registration under it
    /// (scan, rescan, [`Catalog::add`]) carries it.
    pub fn with_visibility(mut self, visibility: BTreeMap<String, Vec<String>>) -> Self {
        self.visibility = visibility;
        self
    }

    /// [`Catalog::scan`] with visibility rules.
    pub fn scan_with_visibility(
        base: LlamaConfig,
        roots: Vec<PathBuf>,
        visibility: BTreeMap<String, Vec<String>>,
    ) -> (Self, ScanReport) {
        let catalog = Self::new(base, roots).with_visibility(visibility);
        let report = catalog.rescan();
        (catalog, report)
    }

    /// The visibility rules.
    pub fn visibility(&self) -> &BTreeMap<String, Vec<String>> {
        &self.visibility
    }

    /// A catalog of every adapter folder directly under `roots`, registered in parallel. Bad
    /// adapters are left out and reported.
    pub fn scan(base: LlamaConfig, roots: Vec<PathBuf>) -> (Self, ScanReport) {
        let catalog = Self::new(base, roots);
        let report = catalog.rescan();
        (catalog, report)
    }

    /// The base model adapters must fit.
    pub fn base(&self) -> &LlamaConfig {
        &self.base
    }

    /// The directories scanned.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<CatalogEntry>>> {
        // Each update is a single map operation, so a panic elsewhere cannot leave it torn.
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<CatalogEntry>>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry registered under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<CatalogEntry>> {
        self.read().get(name).cloned()
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of registered adapters.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no adapter is registered.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Registers (or re-registers) the PEFT folder `dir` under `name`. On error nothing changes.
    pub fn add(&self, name: &str, dir: &Path) -> Result<Arc<CatalogEntry>, CatalogError> {
        let stamp = FolderStamp::read(name, dir)?;
        let entry = Arc::new(self.register(name, dir, stamp, Origin::Added)?);
        self.write().insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Removes `name` from the catalog and returns its entry. Memory it occupies in a pager is
    /// freed by the pager (see [`Pager::remove`](super::pager::Pager::remove)).
    pub fn remove(&self, name: &str) -> Result<Arc<CatalogEntry>, CatalogError> {
        self.write().remove(name).ok_or_else(|| CatalogError::NotFound(name.to_owned()))
    }

    /// Brings the catalog up to date with the disk: scans the roots for new folders, drops
    /// entries whose folders are gone, and re-registers entries whose files changed (size,
    /// modification time or inode), giving them a new revision. Unchanged folders are only
    /// `stat`ed. Folders that became invalid are removed and reported.
    pub fn rescan(&self) -> ScanReport {
        let mut report = ScanReport::default();
        // 1. What is on disk now: explicitly added entries at their own folders, then each
        // root's subfolders; the first folder seen for a name wins and the others are reported.
        let current: Vec<Arc<CatalogEntry>> = self.read().values().cloned().collect();
        let mut found: Vec<(String, PathBuf)> = Vec::new();
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        for e in current.iter().filter(|e| e.origin == Origin::Added) {
            seen.insert(e.name.clone(), e.dir.clone());
            found.push((e.name.clone(), e.dir.clone()));
        }
        for root in &self.roots {
            let listing = match std::fs::read_dir(root) {
                Ok(l) => l,
                Err(source) => {
                    report.errors.push(CatalogError::Root { path: root.clone(), source });
                    continue;
                }
            };
            let mut dirs: Vec<PathBuf> = listing.filter_map(|e| e.ok().map(|e| e.path())).collect();
            dirs.sort();
            for dir in dirs {
                if !dir.join(CONFIG_FILE).is_file() {
                    continue;
                }
                let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                    report.errors.push(CatalogError::BadName { path: dir, reason: "the name is not UTF-8".into() });
                    continue;
                };
                if let Some(first) = seen.get(&name) {
                    if *first != dir {
                        report.errors.push(CatalogError::Duplicate { name, first: first.clone(), second: dir });
                    }
                    continue;
                }
                seen.insert(name.clone(), dir.clone());
                found.push((name, dir));
            }
        }
        let by_name: HashMap<&str, &Arc<CatalogEntry>> = current.iter().map(|e| (e.name.as_str(), e)).collect();

        // 2. Stat everything (cheap) and register what is new or changed, in parallel.
        enum Outcome {
            Unchanged,
            Registered(Box<CatalogEntry>, bool),
            Failed(CatalogError),
        }
        let outcomes: Vec<(String, Outcome)> = found
            .par_iter()
            .map(|(name, dir)| {
                let old = by_name.get(name.as_str()).filter(|e| &e.dir == dir);
                let stamp = match FolderStamp::read(name, dir) {
                    Ok(s) => s,
                    Err(e) => return (name.clone(), Outcome::Failed(e.into())),
                };
                if old.is_some_and(|o| o.stamp == stamp) {
                    return (name.clone(), Outcome::Unchanged);
                }
                let origin = old.map_or(Origin::Scanned, |o| o.origin);
                match self.register(name, dir, stamp, origin) {
                    Ok(e) => (name.clone(), Outcome::Registered(Box::new(e), old.is_some())),
                    Err(e) => (name.clone(), Outcome::Failed(e)),
                }
            })
            .collect();

        // 3. Apply.
        let mut present: HashSet<String> = HashSet::with_capacity(outcomes.len());
        let mut map = self.write();
        for (name, outcome) in outcomes {
            match outcome {
                Outcome::Unchanged => {
                    report.unchanged += 1;
                    present.insert(name);
                }
                Outcome::Registered(entry, was_known) => {
                    if was_known || map.contains_key(&name) {
                        report.changed.push(name.clone());
                    } else {
                        report.added.push(name.clone());
                    }
                    map.insert(name.clone(), Arc::from(entry));
                    present.insert(name);
                }
                Outcome::Failed(e) => report.errors.push(e),
            }
        }
        let gone: Vec<String> = map.keys().filter(|n| !present.contains(*n)).cloned().collect();
        for name in gone {
            // Only entries that were there when the scan started: an `add` racing with this
            // rescan keeps its entry.
            if by_name.contains_key(name.as_str()) {
                map.remove(&name);
                report.removed.push(name);
            }
        }
        report.added.sort();
        report.changed.sort();
        report.removed.sort();
        report
    }

    /// Reads config, header and manifest of one folder.
    fn register(
        &self,
        name: &str,
        dir: &Path,
        stamp: FolderStamp,
        origin: Origin,
    ) -> Result<CatalogEntry, CatalogError> {
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(CatalogError::BadName {
                path: dir.to_path_buf(),
                reason: format!("{name:?} is not a usable adapter name"),
            });
        }
        let io = |path: PathBuf| move |source| AdapterError::Io { adapter: name.to_owned(), path, source };
        let cfg_path = dir.join(CONFIG_FILE);
        let cfg_bytes = std::fs::read(&cfg_path).map_err(io(cfg_path.clone()))?;
        let cfg = check_config(name, &cfg_bytes)?;
        let w_path = dir.join(WEIGHTS_FILE);
        let (header, file_len) = read_header(name, &w_path)?;
        let shape = check_header(name, &header, file_len, &cfg, &self.base)?;
        let manifest =
            Manifest::load_for(dir).map_err(|source| CatalogError::Manifest { adapter: name.to_owned(), source })?;
        Ok(CatalogEntry {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            revision: self.next_revision.fetch_add(1, Ordering::Relaxed),
            stamp,
            manifest,
            loaded_bytes: shape.loaded_bytes,
            max_rank: shape.max_rank,
            modules: shape.modules,
            origin,
            visible_to: self.visibility.get(name).cloned(),
        })
    }
}

/// The parts of `adapter_config.json` registration checks.
struct ConfigFacts {
    r: usize,
    has_rank_pattern: bool,
}

fn check_config(name: &str, bytes: &[u8]) -> Result<ConfigFacts, AdapterError> {
    let cerr =
        |key: &str, reason: String| AdapterError::Config { adapter: name.to_owned(), key: key.to_owned(), reason };
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| cerr("(json)", e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| cerr("(json)", "not a JSON object".into()))?;
    let truthy = |k: &str| obj.get(k).and_then(serde_json::Value::as_bool).unwrap_or(false);
    if let Some(t) = obj.get("peft_type").and_then(serde_json::Value::as_str)
        && t != "LORA"
    {
        return Err(cerr("peft_type", format!("`{t}` is not supported (only LORA)")));
    }
    if truthy("use_dora") {
        return Err(cerr("use_dora", "DoRA adapters are not supported".into()));
    }
    if truthy("fan_in_fan_out") {
        return Err(cerr("fan_in_fan_out", "transposed (Conv1D-style) weights are not supported".into()));
    }
    if obj.get("bias").and_then(serde_json::Value::as_str).is_some_and(|b| b != "none") || truthy("lora_bias") {
        return Err(cerr("bias", "LoRA bias terms are not supported".into()));
    }
    if obj.get("modules_to_save").is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(cerr("modules_to_save", "full-module replacements are not supported".into()));
    }
    let r = match obj.get("r") {
        None => return Err(cerr("r", "missing".into())),
        Some(r) => r.as_u64().ok_or_else(|| cerr("r", format!("{r} is not a positive integer")))? as usize,
    };
    let has_rank_pattern =
        obj.get("rank_pattern").and_then(serde_json::Value::as_object).is_some_and(|m| !m.is_empty());
    Ok(ConfigFacts { r, has_rank_pattern })
}

/// One tensor's row in a safetensors header.
#[derive(Deserialize)]
struct HeaderTensor {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// A safetensors header: tensors in file order, `__metadata__` skipped.
struct Header(Vec<(String, HeaderTensor)>);

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a safetensors header (a JSON object of tensors)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(64));
                while let Some(k) = map.next_key::<String>()? {
                    if k == "__metadata__" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        let t: HeaderTensor = map.next_value()?;
                        out.push((k, t));
                    }
                }
                Ok(Header(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads only the header of a safetensors file; returns it with the file's length.
fn read_header(name: &str, path: &Path) -> Result<(Header, u64), AdapterError> {
    let io = |source| AdapterError::Io { adapter: name.to_owned(), path: path.to_path_buf(), source };
    let bad = |reason: String| AdapterError::Invalid {
        adapter: name.to_owned(),
        tensor: String::new(),
        reason: format!("{WEIGHTS_FILE} is malformed: {reason}"),
    };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad(format!("{file_len} bytes is too short for a header")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES || n + 8 > file_len {
        return Err(bad(format!("header length {n} does not fit a {file_len}-byte file")));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let header: Header = serde_json::from_slice(&buf).map_err(|e| bad(format!("header JSON: {e}")))?;
    Ok((header, file_len - 8 - n))
}

/// Where a PEFT tensor name points: `(layer, projection)` or the LM head (`None`), and whether
/// it is `lora_A`.
fn parse_tensor_name(name: &str) -> Option<(Option<(usize, Proj)>, bool)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (module, is_a) = match rest.strip_suffix(".lora_A.weight") {
        Some(m) => (m, true),
        None => (rest.strip_suffix(".lora_B.weight")?, false),
    };
    if module == "lm_head" {
        return Some((None, is_a));
    }
    let (layer, path) = module.strip_prefix("model.layers.")?.split_once('.')?;
    let proj = Proj::ALL.into_iter().find(|p| p.path() == path)?;
    Some((Some((layer.parse().ok()?, proj)), is_a))
}

/// What the header says the loaded adapter will be.
struct HeaderFacts {
    loaded_bytes: usize,
    max_rank: usize,
    modules: usize,
}

fn check_header(
    name: &str,
    header: &Header,
    data_len: u64,
    cfg: &ConfigFacts,
    base: &LlamaConfig,
) -> Result<HeaderFacts, AdapterError> {
    let terr = |tensor: &str, reason: String| AdapterError::Invalid {
        adapter: name.to_owned(),
        tensor: tensor.to_owned(),
        reason,
    };
    // (layer, proj) or LM head -> (A shape, B shape)
    type Pair = (Option<[usize; 2]>, Option<[usize; 2]>);
    let mut modules: HashMap<Option<(usize, Proj)>, Pair> = HashMap::with_capacity(header.0.len() / 2);
    let mut loaded_bytes = 0usize;
    for (tname, t) in &header.0 {
        if tname.ends_with(".base_layer.weight") {
            continue;
        }
        if tname.contains("lora_embedding") {
            return Err(terr(tname, "embedding LoRA is not supported".into()));
        }
        if tname.contains("lora_magnitude_vector") {
            return Err(terr(tname, "DoRA magnitude vectors are not supported".into()));
        }
        let Some((target, is_a)) = parse_tensor_name(tname) else {
            return Err(terr(
                tname,
                "not a LoRA weight of a known module (q/k/v/o/gate/up/down projections, lm_head)".into(),
            ));
        };
        let width = match t.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => return Err(terr(tname, format!("dtype {other} is not supported (f32, f16, bf16)"))),
        };
        let [rows, cols] = t.shape[..] else {
            return Err(terr(tname, format!("shape {:?} is not 2-D", t.shape)));
        };
        let [start, end] = t.data_offsets;
        let elements = rows.checked_mul(cols).ok_or_else(|| terr(tname, "shape overflows".into()))?;
        let bytes = (elements as u64).checked_mul(width).ok_or_else(|| terr(tname, "shape overflows".into()))?;
        if end < start || end > data_len || (end - start) != bytes {
            return Err(terr(
                tname,
                format!(
                    "data offsets [{start}, {end}] do not hold {elements} {} values inside the file's {data_len} data bytes (truncated?)",
                    t.dtype
                ),
            ));
        }
        let (in_dim, out_dim) = match target {
            Some((l, p)) => {
                if l >= base.num_layers {
                    return Err(terr(
                        tname,
                        format!("layer {l} does not exist; the base model has {} layers", base.num_layers),
                    ));
                }
                proj_dims(base, p)
            }
            None => (base.hidden_size, base.vocab_size),
        };
        if is_a && cols != in_dim {
            return Err(terr(
                tname,
                format!(
                    "shape [{rows}, {cols}] does not fit the base model: input features are {in_dim} (an adapter for another base?)"
                ),
            ));
        }
        if !is_a && rows != out_dim {
            return Err(terr(
                tname,
                format!(
                    "shape [{rows}, {cols}] does not fit the base model: output features are {out_dim} (an adapter for another base?)"
                ),
            ));
        }
        let slot = modules.entry(target).or_default();
        if is_a {
            slot.0 = Some([rows, cols]);
        } else {
            slot.1 = Some([rows, cols]);
        }
        loaded_bytes += elements * 4;
    }
    if modules.is_empty() {
        return Err(terr("", "the adapter has no LoRA weights".into()));
    }
    let mut max_rank = 0;
    for (target, pair) in &modules {
        let module = match target {
            Some((l, p)) => format!("base_model.model.model.layers.{l}.{}", p.path()),
            None => "base_model.model.lm_head".to_owned(),
        };
        let (a, b) = match pair {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => {
                return Err(terr(&format!("{module}.lora_B.weight"), "missing (lora_A present without lora_B)".into()));
            }
            (None, _) => {
                return Err(terr(&format!("{module}.lora_A.weight"), "missing (lora_B present without lora_A)".into()));
            }
        };
        let rank = a[0];
        if b[1] != rank {
            return Err(terr(
                &format!("{module}.lora_B.weight"),
                format!("rank {} differs from lora_A's rank {rank}", b[1]),
            ));
        }
        if rank == 0 || rank > MAX_RANK {
            return Err(terr(&format!("{module}.lora_A.weight"), format!("rank {rank} is outside 1..={MAX_RANK}")));
        }
        if !cfg.has_rank_pattern && rank != cfg.r {
            return Err(terr(
                &format!("{module}.lora_A.weight"),
                format!("rank {rank} does not match the config's rank {} for this module", cfg.r),
            ));
        }
        max_rank = max_rank.max(rank);
    }
    Ok(HeaderFacts { loaded_bytes, max_rank, modules: modules.len() })
}

/// The dtype [`write_peft`] stores weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// IEEE half precision (what PEFT saves for half-precision training; half the disk).
    F16,
    /// Single precision (exact).
    F32,
}

/// Writes `host` as a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`)
/// that [`LoraHost::load`] and HF PEFT read back. The config records each module's rank and
/// alpha (`rank_pattern` / `alpha_pattern` where they differ from the first module's) and
/// `target_modules` from the projections present. `base_model` goes into
/// `base_model_name_or_path`. Files are written to temporaries and renamed into place, so a
/// concurrent reader sees the old or the new adapter, never half of one.
pub fn write_peft(dir: &Path, host: &LoraHost, dtype: SaveDtype, base_model: &str) -> Result<(), AdapterError> {
    let io = |path: PathBuf| move |source| AdapterError::Io { adapter: host.name.clone(), path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let modules: Vec<(String, &super::LoraModuleHost)> = host.modules().collect();
    let Some((_, first)) = modules.first() else {
        return Err(AdapterError::Invalid {
            adapter: host.name.clone(),
            tensor: String::new(),
            reason: "the adapter has no LoRA weights".into(),
        });
    };
    let (r, alpha) = (first.rank, first.alpha);
    let mut targets: Vec<&str> = Vec::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (path, m) in &modules {
        let short = path.rsplit('.').next().unwrap_or(path);
        if !targets.contains(&short) {
            targets.push(short);
        }
        if m.rank != r {
            rank_pattern.insert(path.clone(), m.rank.into());
        }
        if m.alpha != alpha {
            alpha_pattern.insert(path.clone(), serde_json::json!(m.alpha));
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": host.use_rslora,
        "use_dora": false,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": true,
    });

    let (dname, width) = match dtype {
        SaveDtype::F16 => ("F16", 2),
        SaveDtype::F32 => ("F32", 4),
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut tensors: Vec<(String, &[f32])> = Vec::with_capacity(modules.len() * 2);
    for (path, m) in &modules {
        for (ab, shape, values) in [("A", [m.rank, m.in_dim], &m.a), ("B", [m.out_dim, m.rank], &m.b)] {
            let tname = format!("base_model.model.{path}.lora_{ab}.weight");
            let end = offset + values.len() * width;
            header.insert(
                tname.clone(),
                serde_json::json!({"dtype": dname, "shape": shape, "data_offsets": [offset, end]}),
            );
            offset = end;
            tensors.push((tname, values));
        }
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| AdapterError::Invalid {
        adapter: host.name.clone(),
        tensor: String::new(),
        reason: e.to_string(),
    })?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, values) in &tensors {
        match dtype {
            SaveDtype::F16 => out.extend(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes())),
            SaveDtype::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        }
    }
    let write_atomic = |file: &str, bytes: &[u8]| -> Result<(), AdapterError> {
        let path = dir.join(file);
        let tmp = dir.join(format!(".{file}.tmp"));
        let mut f = File::create(&tmp).map_err(io(tmp.clone()))?;
        f.write_all(bytes).map_err(io(tmp.clone()))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(path.clone()))
    };
    // Weights first: a reader that sees the new config also sees the weights it describes.
    write_atomic(WEIGHTS_FILE, &out)?;
    write_atomic(CONFIG_FILE, config.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_modules() {
        assert!(matches!(
            parse_tensor_name("base_model.model.model.layers.3.mlp.up_proj.lora_A.weight"),
            Some((Some((3, Proj::Up)), true))
        ));
        assert!(matches!(parse_tensor_name("base_model.model.lm_head.lora_B.weight"), Some((None, false))));
        assert!(parse_tensor_name("base_model.model.model.layers.x.mlp.up_proj.lora_A.weight").is_none());
        assert!(parse_tensor_name("base_model.model.model.layers.3.mlp.act.lora_A.weight").is_none());
    }

    #[test]
    fn headers_skip_metadata() {
        let h: Header = serde_json::from_str(
            r#"{"__metadata__":{"format":"pt"},"x.lora_A.weight":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]}}"#,
        )
        .expect("header");
        assert_eq!(h.0.len(), 1);
        assert_eq!(h.0[0].1.shape, vec![2, 4]);
    }
}
