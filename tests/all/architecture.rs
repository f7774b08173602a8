//! The rules of the house that a `grep` can check (ARCHITECTURE.md, "Rules of the house"):
//! the HTTP layer speaks only to the service; `model/` and `adapters/` meet only through the
//! `lora` leaf (plus `adapters/` reading the base model's shape from `model::config`); the
//! leaves import nothing from the crate; the README's links resolve inside the repository.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(file, line number, line)` of every line under `dir` (recursively, `.rs` files).
fn lines(dir: &Path) -> Vec<(PathBuf, usize, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read");
                out.extend(text.lines().enumerate().map(|(i, l)| (p.clone(), i + 1, l.to_owned())));
            }
        }
    }
    assert!(!out.is_empty(), "no sources under {}", dir.display());
    out
}

fn forbid(dir: &str, needles: &[&str], why: &str) {
    let src = repo().join("runtime/src").join(dir);
    let bad: Vec<String> = if src.is_dir() {
        lines(&src)
    } else {
        let text = std::fs::read_to_string(&src).expect("read");
        text.lines().enumerate().map(|(i, l)| (src.clone(), i + 1, l.to_owned())).collect()
    }
    .into_iter()
    .filter(|(_, _, l)| !l.trim_start().starts_with("//") && needles.iter().any(|n| l.contains(n)))
    .map(|(p, n, l)| format!("{}:{n}: {l}", p.display()))
    .collect();
    assert!(bad.is_empty(), "{why}:\n{}", bad.join("\n"));
}

#[test]
fn the_http_layer_imports_nothing_from_the_engine_or_the_kernels() {
    forbid("server", &["crate::engine", "openlora_kernels"], "server/ must speak only to the service");
}

#[test]
fn model_and_adapters_meet_only_through_the_lora_leaf() {
    forbid("model", &["crate::adapters"], "model/ must not import adapters/ (use crate::lora)");
    let src = repo().join("runtime/src/adapters");
    let bad: Vec<String> = lines(&src)
        .into_iter()
        .filter(|(_, _, l)| l.contains("crate::model::") && !l.contains("crate::model::config"))
        .map(|(p, n, l)| format!("{}:{n}: {l}", p.display()))
        .collect();
    assert!(bad.is_empty(), "adapters/ may read only the base model's config from model/:\n{}", bad.join("\n"));
}

#[test]
fn the_leaf_modules_import_nothing_from_the_crate() {
    forbid("lora.rs", &["crate::", "super::"], "lora.rs is a leaf");
    forbid("metrics.rs", &["crate::", "super::"], "metrics.rs is a leaf");
}

#[test]
fn the_readme_links_resolve_inside_the_repository() {
    let root = repo();
    for doc in ["README.md", "ARCHITECTURE.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        let mut rest = text.as_str();
        let mut checked = 0;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = root.join(target);
            assert!(path.exists(), "{doc} links to {target}, which is not in the repository");
            assert!(
                path.canonicalize().expect("canonical").starts_with(root.canonicalize().expect("root")),
                "{doc} links to {target}, outside the repository"
            );
            checked += 1;
        }
        assert!(checked > 0, "{doc} has no local links to check");
    }
}
