//! Adapter manifests (`openlora.toml` beside a PEFT adapter): who owns it, under which license,
//! which datasets trained it and who contributed them, and what it costs.
//!
//! ```toml
//! owner = "alice"
//! license = "apache-2.0"
//! description = "Answers like a pirate."
//! tags = ["style", "fun"]
//! price_per_1k_tokens = 2000          # integer micro-units per 1,000 tokens
//!
//! [[datasets]]
//! id = "pirate-qa-v1"
//! sha256 = "<64 hex digits of the dataset file>"
//! license = "cc-by-4.0"
//! contributors = [{ name = "alice", share = 3 }, { name = "bob", share = 1 }]
//! ```
//!
//! An adapter without a manifest is served as *unpriced*: owner `"unknown"`, price 0, no
//! datasets (see [`Manifest::unpriced`]). A manifest that is present but invalid refuses the
//! adapter with the key and the reason.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The manifest file's name inside an adapter folder.
pub const MANIFEST_FILE: &str = "openlora.toml";

/// One contributor's integer share of a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contributor {
    /// Who (the name payments are made to).
    pub name: String,
    /// Relative share (> 0).
    pub share: u64,
}

/// A dataset that trained an adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Its identifier.
    pub id: String,
    /// SHA-256 of its content, lowercase hex.
    pub sha256: String,
    /// Its license.
    #[serde(default)]
    pub license: String,
    /// Its files, relative to the adapter folder (JSONL: one document per line; any other
    /// file: one document). When given, their bytes in this order must hash to `sha256`, and
    /// the node indexes them for verbatim-overlap evidence (see `attribution::index`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The Merkle root of the dataset's canonical text (`openlora ledger index` prints it),
    /// checked against the built index when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merkle_root: Option<String>,
    /// Who contributed it.
    pub contributors: Vec<Contributor>,
}

/// Ownership, licensing, provenance and price of a model or adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Who owns it (receives the owner's part of payments).
    pub owner: String,
    /// License.
    #[serde(default)]
    pub license: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Free-form tags (routers may use them).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Price per 1,000 tokens (prompt + completion) in integer micro-units.
    #[serde(default)]
    pub price_per_1k_tokens: u64,
    /// Training datasets.
    #[serde(default)]
    pub datasets: Vec<Dataset>,
}

/// A manifest could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ManifestError {
    /// The file.
    pub path: String,
    /// The key and what is wrong with it.
    pub reason: String,
}

impl Manifest {
    /// The documented default for adapters without a manifest: owner `unknown`, free.
    pub fn unpriced() -> Self {
        Self {
            owner: "unknown".into(),
            license: String::new(),
            description: String::new(),
            tags: Vec::new(),
            price_per_1k_tokens: 0,
            datasets: Vec::new(),
        }
    }

    /// Reads `dir/openlora.toml`; `Ok(None)` when there is none.
    pub fn load_for(dir: &Path) -> Result<Option<Self>, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ManifestError { path: path.display().to_string(), reason: e.to_string() }),
        };
        Self::parse(&text, &path.display().to_string()).map(Some)
    }

    /// Parses and validates manifest TOML (`source` names it in errors).
    pub fn parse(text: &str, source: &str) -> Result<Self, ManifestError> {
        let m: Manifest =
            toml::from_str(text).map_err(|e| ManifestError { path: source.into(), reason: e.to_string() })?;
        m.validate().map_err(|reason| ManifestError { path: source.into(), reason })?;
        Ok(m)
    }

    /// Checks the values (the error names the key).
    pub fn validate(&self) -> Result<(), String> {
        if self.owner.trim().is_empty() {
            return Err("`owner` must not be empty".into());
        }
        for (i, d) in self.datasets.iter().enumerate() {
            if d.id.trim().is_empty() {
                return Err(format!("`datasets[{i}].id` must not be empty"));
            }
            if d.sha256.len() != 64 || !d.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(format!("`datasets[{i}].sha256` must be 64 lowercase hex digits"));
            }
            for (j, f) in d.files.iter().enumerate() {
                if f.is_empty() || Path::new(f).is_absolute() {
                    return Err(format!("`datasets[{i}].files[{j}]` must be a path relative to the adapter folder"));
                }
            }
            if let Some(r) = &d.merkle_root
                && (r.len() != 64 || !r.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            {
                return Err(format!("`datasets[{i}].merkle_root` must be 64 lowercase hex digits"));
            }
            if d.contributors.is_empty() {
                return Err(format!("`datasets[{i}].contributors` must name at least one contributor"));
            }
            let mut names = std::collections::HashSet::new();
            for (j, c) in d.contributors.iter().enumerate() {
                if c.name.trim().is_empty() {
                    return Err(format!("`datasets[{i}].contributors[{j}].name` must not be empty"));
                }
                if c.share == 0 {
                    return Err(format!("`datasets[{i}].contributors[{j}].share` must be at least 1"));
                }
                if !names.insert(c.name.as_str()) {
                    return Err(format!("`datasets[{i}].contributors`: {:?} is listed twice", c.name));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_validate_with_the_key_named() {
        let good = format!(
            "owner = \"alice\"\nprice_per_1k_tokens = 5\n[[datasets]]\nid = \"d\"\nsha256 = \"{}\"\ncontributors = [{{ name = \"a\", share = 1 }}]",
            "ab".repeat(32)
        );
        let m = Manifest::parse(&good, "m.toml").expect("valid");
        assert_eq!(m.datasets[0].contributors[0].share, 1);
        let err = |t: &str| Manifest::parse(t, "m.toml").expect_err("invalid").to_string();
        assert!(err("owner = \"\"").contains("owner"));
        assert!(err("owner = \"a\"\nprice = 3").contains("price"));
        assert!(err(&good.replace("share = 1", "share = 0")).contains("contributors[0].share"));
        assert!(err(&good.replace(&"ab".repeat(32), &"AB".repeat(32))).contains("sha256"));
    }
}
