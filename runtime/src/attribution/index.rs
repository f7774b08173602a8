//! Dataset indexes for verbatim-overlap evidence: the canonical text of a dataset's documents,
//! a suffix array over it, who owns each document, and a Merkle root over the text.
//!
//! A manifest's dataset names its files (`files = ["data/train.jsonl"]`, relative to the
//! adapter folder). Their bytes, concatenated in the listed order, must hash to the dataset's
//! `sha256`: that hash is the index's key, so adapters trained on the same data share one index.
//!
//! **Documents.** A `.jsonl` file has one document per non-blank line: a JSON object whose
//! string values (nested ones too, in document order) are the text, except the keys
//! `contributor` (the document's owner, who must be one of the dataset's contributors), `role`
//! and `id`. Any other file is one document. Document ordinals count documents in file order
//! from 0, duplicates included, so an ordinal names a line a contributor can find.
//!
//! **Canonical text.** Every run of whitespace becomes one space, the ends are trimmed, NUL
//! bytes are dropped ([`canonical`]). Identical canonical documents are kept once (the first
//! one, with its owner), so copying a document a hundred times earns nothing more. The index's
//! text is each unique document followed by a NUL byte; a NUL never occurs inside canonical
//! text, so no match crosses a document boundary.
//!
//! **Word-start suffix array.** The matcher only ever looks for runs of whole words that start
//! at a word start of the data, so the index sorts only the suffixes that begin at word starts
//! (a byte after a space or a NUL), in byte order: one `u32` per word, about a sixth of the
//! suffixes of a full suffix array for English-like text. It is built by libsais (Ilya Grebnov's
//! SA-IS implementation; bindings in the `libsais` crate, single-threaded) over the text as a
//! sequence of *tokens*, each a word with the one separator after it, numbered in byte order of
//! the tokens. Canonical text has exactly one separator after every word, so no token is a
//! proper prefix of another (except at the very end of the text), and the order of token
//! sequences is the byte order of the suffixes they spell ([`word_suffixes`]). A dataset's
//! canonical text is below 2 GiB.
//!
//! **Shingle filter.** A blocked Bloom filter of every run of [`FILTER_WORDS`] words at a word
//! start (each word followed by a space), ~10 bits per word, rebuilt from the text when an index
//! is built or opened: the matcher asks it first and skips a word start it rules out, which is
//! most of them, with one memory access. No false negatives, so it changes no evidence.
//!
//! **Merkle root** over the text in [`CHUNK_BYTES`] chunks: leaf = SHA-256(0x00 ‖ chunk),
//! node = SHA-256(0x01 ‖ left ‖ right), an odd node is carried up unchanged. Receipts record
//! the root, so anyone holding the data can check a span against it ([`inclusion_proof`]).
//!
//! **Cache.** Built indexes are written under `$OPENLORA_CACHE/datasets/<sha256>/` (default
//! `~/.cache/openlora/datasets`) as `text`, `sa` and `docs` (little-endian) and `meta.json`,
//! then memory-mapped; a cached index is re-read (its root recomputed) instead of rebuilt.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapters::manifest::Dataset;

/// The index format (part of every receipt's evidence, so a change of canonicalization is a
/// new version).
pub const FORMAT: &str = "openlora-dataset-index/2";

/// Bytes per Merkle leaf.
pub const CHUNK_BYTES: usize = 4096;

/// The largest canonical text one index holds (suffix positions are 32-bit).
pub const MAX_TEXT_BYTES: usize = (i32::MAX - 1) as usize;

/// Keys of a JSONL document that are not its text.
const NOT_TEXT: [&str; 3] = ["contributor", "role", "id"];

/// `text` with whitespace runs as single spaces, trimmed, without NUL bytes.
pub fn canonical(text: &str) -> String {
    canonical_with_map(text).0
}

/// [`canonical`], and for each canonical byte the offset of the byte it came from in `text`.
pub fn canonical_with_map(text: &str) -> (String, Vec<u32>) {
    let mut out = String::with_capacity(text.len());
    let mut map = Vec::with_capacity(text.len());
    let mut pending_space: Option<usize> = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if !out.is_empty() && pending_space.is_none() {
                pending_space = Some(i);
            }
            continue;
        }
        if c == '\0' {
            continue;
        }
        if let Some(at) = pending_space.take() {
            out.push(' ');
            map.push(at as u32);
        }
        let mut buf = [0u8; 4];
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        for (k, _) in bytes.iter().enumerate() {
            map.push((i + k) as u32);
        }
        out.push(c);
    }
    (out, map)
}

/// One unique document of an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocEntry {
    /// Where its text starts in the index's text.
    pub start: u64,
    /// Its ordinal among the dataset's documents (the first copy's).
    pub ordinal: u32,
    /// Its owner (an index into [`DatasetIndex::owners`]), if the document names one.
    pub owner: Option<u32>,
}

/// The documents of a dataset, read and canonicalized (before the suffix array).
#[derive(Debug, Default)]
pub struct Corpus {
    /// Unique canonical documents, each followed by NUL.
    pub text: Vec<u8>,
    /// The unique documents.
    pub docs: Vec<DocEntry>,
    /// Owners named by documents, in order of first appearance.
    pub owners: Vec<String>,
    /// Documents read, duplicates included.
    pub read: u32,
    /// Documents dropped as copies of an earlier one.
    pub duplicates: u32,
}

impl Corpus {
    /// Adds one document (`owner` as the file named it).
    fn push(&mut self, text: &str, owner: Option<&str>, seen: &mut HashSet<[u8; 32]>) -> Result<(), String> {
        let ordinal = self.read;
        self.read = self.read.checked_add(1).ok_or("more than 2^32 documents")?;
        let doc = canonical(text);
        if doc.is_empty() {
            return Ok(());
        }
        if !seen.insert(Sha256::digest(doc.as_bytes()).into()) {
            self.duplicates += 1;
            return Ok(());
        }
        if self.text.len() + doc.len() + 1 > MAX_TEXT_BYTES {
            return Err(format!("the canonical text is over {MAX_TEXT_BYTES} bytes (the limit of one index)"));
        }
        let owner = owner.map(|o| match self.owners.iter().position(|x| x == o) {
            Some(i) => i as u32,
            None => {
                self.owners.push(o.to_owned());
                (self.owners.len() - 1) as u32
            }
        });
        self.docs.push(DocEntry { start: self.text.len() as u64, ordinal, owner });
        self.text.extend_from_slice(doc.as_bytes());
        self.text.push(0);
        Ok(())
    }

    /// Reads the documents of one file's bytes (`name` for errors and the format).
    pub fn add_file(&mut self, name: &str, bytes: &[u8], seen: &mut HashSet<[u8; 32]>) -> Result<(), String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("{name}: not UTF-8 ({e})"))?;
        if !name.ends_with(".jsonl") {
            return self.push(text, None, seen);
        }
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{name} line {}: {e}", n + 1))?;
            let serde_json::Value::Object(map) = &value else {
                return Err(format!("{name} line {}: a document must be a JSON object", n + 1));
            };
            let owner = match map.get("contributor") {
                None => None,
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s.as_str()),
                Some(_) => return Err(format!("{name} line {}: `contributor` must be a non-empty string", n + 1)),
            };
            let mut parts = Vec::new();
            for (k, v) in map {
                if !NOT_TEXT.contains(&k.as_str()) {
                    strings(v, &mut parts);
                }
            }
            self.push(&parts.join("\n"), owner, seen)?;
        }
        Ok(())
    }
}

/// The string values of `v`, in document order (keys in [`NOT_TEXT`] skipped at every depth).
fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if !NOT_TEXT.contains(&k.as_str()) {
                    strings(x, out);
                }
            }
        }
        _ => {}
    }
}

/// Reads dataset `d`'s files from the adapter folder `dir`, checking their SHA-256.
pub fn read_dataset(dir: &Path, d: &Dataset) -> Result<Corpus, String> {
    if d.files.is_empty() {
        return Err(format!("dataset {:?} names no files", d.id));
    }
    let mut hash = Sha256::new();
    let mut corpus = Corpus::default();
    let mut seen = HashSet::new();
    for f in &d.files {
        let path = dataset_file(dir, f)?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        hash.update(&bytes);
        corpus.add_file(f, &bytes, &mut seen)?;
    }
    let got = hex::encode(hash.finalize());
    if got != d.sha256 {
        return Err(format!(
            "dataset {:?}: the SHA-256 of its files is {got}, the manifest says {} (the files changed, or the manifest is wrong)",
            d.id, d.sha256
        ));
    }
    Ok(corpus)
}

/// The path of a manifest's dataset file: relative to the adapter folder.
pub fn dataset_file(dir: &Path, f: &str) -> Result<PathBuf, String> {
    let p = Path::new(f);
    if f.is_empty() || p.is_absolute() {
        return Err(format!("dataset file {f:?} must be a path relative to the adapter folder"));
    }
    Ok(dir.join(p))
}

/// The Merkle leaves of `text`.
pub fn merkle_leaves(text: &[u8]) -> Vec<[u8; 32]> {
    let leaf = |c: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(c);
        h.finalize().into()
    };
    if text.is_empty() {
        return vec![leaf(&[])];
    }
    text.chunks(CHUNK_BYTES).map(leaf).collect()
}

fn node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

/// The root over `leaves`.
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level.chunks(2).map(|p| if p.len() == 2 { node(&p[0], &p[1]) } else { p[0] }).collect();
    }
    level[0]
}

/// The siblings from leaf `i` up to the root: `(sibling is on the right, hash)`.
pub fn inclusion_proof(leaves: &[[u8; 32]], mut i: usize) -> Vec<(bool, [u8; 32])> {
    let mut proof = Vec::new();
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        let sibling = i ^ 1;
        if sibling < level.len() {
            proof.push((sibling > i, level[sibling]));
        }
        level = level.chunks(2).map(|p| if p.len() == 2 { node(&p[0], &p[1]) } else { p[0] }).collect();
        i /= 2;
    }
    proof
}

/// Whether `chunk` is leaf number `i` under `root`, by `proof` ([`inclusion_proof`]).
pub fn verify_inclusion(chunk: &[u8], proof: &[(bool, [u8; 32])], root: &[u8; 32]) -> bool {
    let mut h = merkle_leaves(chunk)[0];
    if chunk.len() > CHUNK_BYTES {
        return false;
    }
    for (right, s) in proof {
        h = if *right { node(&h, s) } else { node(s, &h) };
    }
    h == *root
}

/// Bytes held in memory or mapped from the cache.
enum Bytes {
    Mem(Vec<u8>),
    Map(memmap2::Mmap),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mem(v) => v,
            Bytes::Map(m) => m,
        }
    }
}

/// The word-start suffix array, in memory or mapped.
enum Suffixes {
    Mem(Vec<u32>),
    Map(memmap2::Mmap),
}

/// A dataset's index: canonical text, suffix array, documents and owners, Merkle root.
pub struct DatasetIndex {
    /// The dataset's content hash (its key).
    pub sha256: String,
    /// The Merkle root of the text, hex.
    pub root: String,
    text: Bytes,
    sa: Suffixes,
    /// `buckets[k]..buckets[k + 1]`: the suffixes whose first two bytes are `k` (big-endian).
    buckets: Vec<u32>,
    /// Which runs of [`FILTER_WORDS`] words occur at word starts (rebuilt on open).
    filter: ShingleFilter,
    docs: Vec<DocEntry>,
    /// Owners named by the documents.
    pub owners: Vec<String>,
    /// Documents read, duplicates included.
    pub documents: u32,
    /// Copies dropped.
    pub duplicates: u32,
}

impl std::fmt::Debug for DatasetIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetIndex")
            .field("sha256", &self.sha256)
            .field("root", &self.root)
            .field("bytes", &self.text().len())
            .field("unique_documents", &self.docs.len())
            .finish()
    }
}

/// What `meta.json` of a cached index holds.
#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    sha256: String,
    root: String,
    bytes: u64,
    /// Entries of the word-start suffix array.
    suffixes: u64,
    documents: u32,
    duplicates: u32,
    owners: Vec<String>,
}

impl DatasetIndex {
    /// Builds the index of `corpus` (whose files hash to `sha256`).
    pub fn build(sha256: &str, corpus: Corpus) -> Result<Self, String> {
        let sa: Vec<u32> = if corpus.text.is_empty() { Vec::new() } else { word_suffixes(&corpus.text)? };
        let root = hex::encode(merkle_root(&merkle_leaves(&corpus.text)));
        let buckets = buckets(&corpus.text, &sa);
        let filter = ShingleFilter::build(&corpus.text, sa.len());
        Ok(Self {
            sha256: sha256.to_owned(),
            root,
            text: Bytes::Mem(corpus.text),
            sa: Suffixes::Mem(sa),
            buckets,
            filter,
            docs: corpus.docs,
            owners: corpus.owners,
            documents: corpus.read,
            duplicates: corpus.duplicates,
        })
    }

    /// The canonical text (unique documents, each followed by NUL).
    pub fn text(&self) -> &[u8] {
        self.text.as_slice()
    }

    /// The word-start suffix array: every word start of [`Self::text`], in the sorted order of
    /// the suffixes that begin there.
    pub fn suffixes(&self) -> &[u32] {
        match &self.sa {
            Suffixes::Mem(v) => v,
            Suffixes::Map(m) => bytemuck::cast_slice(m),
        }
    }

    /// The range of [`Self::suffixes`] that starts with `needle`'s first two bytes (all of it
    /// for a shorter needle): where a search for `needle` begins.
    pub fn bucket(&self, needle: &[u8]) -> (usize, usize) {
        match needle {
            [a, b, ..] => {
                let k = usize::from(*a) << 8 | usize::from(*b);
                (self.buckets[k] as usize, self.buckets[k + 1] as usize)
            }
            _ => (0, self.suffixes().len()),
        }
    }

    /// False when no run of [`FILTER_WORDS`] words of the data, each followed by a space, is
    /// `key` (`FILTER_WORDS` words, each followed by one space); true means "perhaps". Never
    /// false for a run that occurs at a word start inside one document.
    pub fn may_contain_words(&self, key: &[u8]) -> bool {
        self.filter.may_contain(key)
    }

    /// This index with a filter that rejects nothing (tests: the evidence must not change).
    #[cfg(test)]
    pub(crate) fn without_filter(mut self) -> Self {
        self.filter = ShingleFilter { blocks: vec![[u64::MAX; 8]] };
        self
    }

    /// The unique documents.
    pub fn docs(&self) -> &[DocEntry] {
        &self.docs
    }

    /// The document holding text position `pos`, and `pos`'s offset in it.
    pub fn doc_at(&self, pos: usize) -> (DocEntry, usize) {
        let i = self.docs.partition_point(|d| d.start as usize <= pos).saturating_sub(1);
        let d = self.docs[i];
        (d, pos - d.start as usize)
    }

    /// Bytes of memory (or mapped file) the index uses.
    pub fn resident_bytes(&self) -> usize {
        self.text().len() + self.suffixes().len() * 4 + self.docs.len() * 16 + self.filter.blocks.len() * 64
    }

    /// Writes the index under `dir/<sha256>/` (atomically: a temporary folder renamed). When
    /// another writer got there first, its copy (of the same content) is kept.
    pub fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        let final_dir = dir.join(&self.sha256);
        let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.tmp-{}-{n}", self.sha256, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("text"), self.text())?;
        let mut sa = std::io::BufWriter::new(std::fs::File::create(tmp.join("sa"))?);
        for s in self.suffixes() {
            sa.write_all(&s.to_le_bytes())?;
        }
        sa.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let mut docs = Vec::with_capacity(self.docs.len() * 16);
        for d in &self.docs {
            docs.extend_from_slice(&d.start.to_le_bytes());
            docs.extend_from_slice(&d.ordinal.to_le_bytes());
            docs.extend_from_slice(&d.owner.unwrap_or(u32::MAX).to_le_bytes());
        }
        std::fs::write(tmp.join("docs"), docs)?;
        let meta = Meta {
            format: FORMAT.into(),
            sha256: self.sha256.clone(),
            root: self.root.clone(),
            bytes: self.text().len() as u64,
            suffixes: self.suffixes().len() as u64,
            documents: self.documents,
            duplicates: self.duplicates,
            owners: self.owners.clone(),
        };
        std::fs::write(tmp.join("meta.json"), serde_json::to_vec(&meta).unwrap_or_default())?;
        if let Err(e) = std::fs::rename(&tmp, &final_dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !final_dir.join("meta.json").is_file() {
                return Err(e);
            }
        }
        Ok(final_dir)
    }

    /// Maps a cached index (`dir/<sha256>/`), checking its format, sizes and Merkle root.
    pub fn open(dir: &Path, sha256: &str) -> Result<Self, String> {
        let d = dir.join(sha256);
        let err = |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", d.display());
        let meta: Meta = serde_json::from_slice(&std::fs::read(d.join("meta.json")).map_err(|e| err("meta.json", &e))?)
            .map_err(|e| err("meta.json", &e))?;
        if meta.format != FORMAT || meta.sha256 != sha256 {
            return Err(err("meta.json", &"another format or dataset"));
        }
        let map = |name: &str| -> Result<Option<memmap2::Mmap>, String> {
            let f = std::fs::File::open(d.join(name)).map_err(|e| err(name, &e))?;
            if f.metadata().map_err(|e| err(name, &e))?.len() == 0 {
                return Ok(None);
            }
            // SAFETY: the cache files are written once (renamed into place) and never modified;
            // a file replaced underneath would at worst give wrong evidence, which the root
            // check below and the verifier detect.
            unsafe { memmap2::Mmap::map(&f) }.map(Some).map_err(|e| err(name, &e))
        };
        let text = map("text")?;
        let sa = map("sa")?;
        let text_len = text.as_ref().map_or(0, |m| m.len());
        let sa_len = sa.as_ref().map_or(0, |m| m.len());
        if text_len as u64 != meta.bytes || sa_len as u64 != meta.suffixes * 4 {
            return Err(err("sizes", &"text and suffix array do not match meta.json"));
        }
        let docs_bytes = std::fs::read(d.join("docs")).map_err(|e| err("docs", &e))?;
        if docs_bytes.len() % 16 != 0 {
            return Err(err("docs", &"truncated"));
        }
        let docs: Vec<DocEntry> = docs_bytes
            .chunks_exact(16)
            .map(|c| {
                let owner = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
                DocEntry {
                    start: u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
                    ordinal: u32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                    owner: (owner != u32::MAX).then_some(owner),
                }
            })
            .collect();
        let text = text.map_or(Bytes::Mem(Vec::new()), Bytes::Map);
        let root = hex::encode(merkle_root(&merkle_leaves(text.as_slice())));
        if root != meta.root {
            return Err(err("text", &"its Merkle root differs from meta.json (corrupt cache)"));
        }
        if docs.iter().any(|x| x.owner.is_some_and(|o| o as usize >= meta.owners.len())) {
            return Err(err("docs", &"an owner out of range"));
        }
        let sa = sa.map_or(Suffixes::Mem(Vec::new()), Suffixes::Map);
        let buckets = buckets(
            text.as_slice(),
            match &sa {
                Suffixes::Mem(v) => v,
                Suffixes::Map(m) => bytemuck::cast_slice(m),
            },
        );
        let filter = ShingleFilter::build(text.as_slice(), sa_len / 4);
        Ok(Self {
            sha256: sha256.to_owned(),
            root,
            text,
            sa,
            buckets,
            filter,
            docs,
            owners: meta.owners,
            documents: meta.documents,
            duplicates: meta.duplicates,
        })
    }
}

/// The two-byte bucket boundaries of a suffix array (65,537 entries; a suffix one byte long
/// counts as followed by 0, which keeps the keys in suffix order).
/// Words per key of an index's [`ShingleFilter`]. The matcher uses the filter when `min_words`
/// is larger, so a span always has a whole key before its last word.
pub const FILTER_WORDS: usize = 4;

/// A blocked Bloom filter (one 512-bit block per key, three bits) over the runs of
/// [`FILTER_WORDS`] tokens of the text that start at a word start and whose words are each
/// followed by a space: the bytes a span of more than `FILTER_WORDS` words starts with. It lets
/// the matcher reject most word starts of an answer with one memory access instead of a binary
/// search. It has no false negatives, so the evidence is the same with or without it; it is not
/// stored in the cache (rebuilt from the text on open, ~10 bits per word).
struct ShingleFilter {
    blocks: Vec<[u64; 8]>,
}

impl ShingleFilter {
    fn hash(key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6f70_656e_6c6f_7261).hash_one(key)
    }

    /// The block and the three bits of a key's hash.
    fn place(&self, h: u64) -> (usize, [u32; 3]) {
        let block = ((u128::from(h) * self.blocks.len() as u128) >> 64) as usize;
        let bits = [(h & 511) as u32, ((h >> 9) & 511) as u32, ((h >> 18) & 511) as u32];
        (block, bits)
    }

    /// Calls `f` with every key of `text`.
    fn keys(text: &[u8], mut f: impl FnMut(&[u8])) {
        let mut ring = [0usize; FILTER_WORDS];
        let (mut run, mut count, mut start) = (0usize, 0usize, None);
        for (i, &b) in text.iter().enumerate() {
            if !is_separator(b) {
                if start.is_none() {
                    start = Some(i);
                }
                continue;
            }
            let Some(s) = start.take() else { continue };
            ring[count % FILTER_WORDS] = s;
            count += 1;
            if b == b' ' {
                run += 1;
                if run >= FILTER_WORDS {
                    f(&text[ring[count % FILTER_WORDS]..=i]);
                }
            } else {
                run = 0;
            }
        }
    }

    /// The filter of `text`, sized for `words` keys (its word count, an upper bound).
    fn build(text: &[u8], words: usize) -> Self {
        let mut filter = Self { blocks: vec![[0u64; 8]; (words * 10).div_ceil(512).max(1)] };
        // Hashes first, then the inserts in a tight loop: the inserts miss the cache, and a loop
        // with nothing else in it keeps many misses in flight.
        let mut batch: Vec<u64> = Vec::with_capacity(4096);
        let flush = |batch: &mut Vec<u64>, filter: &mut Self| {
            for &h in batch.iter() {
                let (block, bits) = filter.place(h);
                let b = &mut filter.blocks[block];
                for bit in bits {
                    b[(bit / 64) as usize] |= 1 << (bit % 64);
                }
            }
            batch.clear();
        };
        Self::keys(text, |key| {
            batch.push(Self::hash(key));
            if batch.len() == batch.capacity() {
                flush(&mut batch, &mut filter);
            }
        });
        flush(&mut batch, &mut filter);
        filter
    }

    fn may_contain(&self, key: &[u8]) -> bool {
        let (block, bits) = self.place(Self::hash(key));
        bits.iter().all(|&b| self.blocks[block][(b / 64) as usize] & (1 << (b % 64)) != 0)
    }
}

/// Whether `b` separates words in canonical text (a space, or the NUL after each document).
fn is_separator(b: u8) -> bool {
    b == b' ' || b == 0
}

/// The word starts of `text` (canonical documents, each followed by a NUL), sorted by the byte
/// order of the suffixes that begin there.
///
/// Each word with the separator after it is a token; tokens are numbered in their byte order
/// and libsais sorts the suffixes of the token sequence. Because every word is followed by
/// exactly one separator and separators never occur inside a word, a token can only be a proper
/// prefix of another when it ends the text, so comparing two token sequences token by token
/// orders them as comparing the bytes they spell would. Text with two separators in a row
/// (never canonical) is refused.
pub fn word_suffixes(text: &[u8]) -> Result<Vec<u32>, String> {
    let mut starts: Vec<u32> = Vec::new();
    let mut ends: Vec<u32> = Vec::new();
    let mut in_word = false;
    for (i, &b) in text.iter().enumerate() {
        match (is_separator(b), in_word) {
            (false, false) => {
                starts.push(i as u32);
                in_word = true;
            }
            (true, true) => {
                ends.push(i as u32 + 1);
                in_word = false;
            }
            (true, false) if i > 0 => return Err(format!("two separators in a row at byte {i} (not canonical text)")),
            _ => {}
        }
    }
    if in_word {
        ends.push(text.len() as u32);
    }
    if starts.is_empty() {
        return Ok(Vec::new());
    }
    // Provisional ids in order of first appearance, then ranks in byte order.
    let mut ids: HashMap<&[u8], u32, foldhash::fast::RandomState> = HashMap::default();
    let mut distinct: Vec<&[u8]> = Vec::new();
    let mut seq: Vec<i32> = starts
        .iter()
        .zip(&ends)
        .map(|(&s, &e)| {
            let token = &text[s as usize..e as usize];
            *ids.entry(token).or_insert_with(|| {
                distinct.push(token);
                distinct.len() as u32 - 1
            }) as i32
        })
        .collect();
    drop(ids);
    let mut order: Vec<u32> = (0..distinct.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| distinct[a as usize].cmp(distinct[b as usize]));
    let mut rank = vec![0i32; distinct.len()];
    for (r, &id) in order.iter().enumerate() {
        rank[id as usize] = r as i32;
    }
    for x in &mut seq {
        *x = rank[*x as usize];
    }
    drop((order, rank, ends));
    let alphabet = distinct.len() as i32;
    let mut construction =
        libsais::SuffixArrayConstruction::for_text_mut(&mut seq).in_owned_buffer32().single_threaded();
    // SAFETY: every value of `seq` is a rank in `0..alphabet`.
    unsafe {
        construction = construction.with_alphabet_size(libsais::suffix_array::AlphabetSize::new(alphabet));
    }
    let sa = construction.run().map_err(|e| format!("suffix array construction failed: {e:?}"))?.into_vec();
    Ok(sa.into_iter().map(|w| starts[w as usize]).collect())
}

fn buckets(text: &[u8], sa: &[u32]) -> Vec<u32> {
    let key = |x: u32| {
        let x = x as usize;
        usize::from(text[x]) << 8 | usize::from(text.get(x + 1).copied().unwrap_or(0))
    };
    (0..=65_536usize).map(|k| sa.partition_point(|&x| key(x) < k) as u32).collect()
}

/// Builds (or opens from the cache) the index of dataset `d` of the adapter folder `dir`.
pub fn load_or_build(cache: Option<&Path>, dir: &Path, d: &Dataset) -> Result<DatasetIndex, String> {
    if let Some(c) = cache
        && c.join(&d.sha256).join("meta.json").is_file()
    {
        match DatasetIndex::open(c, &d.sha256) {
            Ok(ix) => return Ok(ix),
            Err(e) => {
                eprintln!("openlora: dataset index cache: {e}; rebuilding");
                // A corrupt entry is replaced by the rebuilt one.
                let _ = std::fs::remove_dir_all(c.join(&d.sha256));
            }
        }
    }
    let corpus = read_dataset(dir, d)?;
    let ix = DatasetIndex::build(&d.sha256, corpus)?;
    if let Some(c) = cache
        && let Err(e) = ix.save(c)
    {
        eprintln!("openlora: dataset index {}: not cached ({e})", d.sha256);
    }
    Ok(ix)
}

/// Where an index stands.
#[derive(Clone, Debug)]
pub enum IndexState {
    /// Being read and built off the request path.
    Building,
    /// Ready.
    Ready(Arc<DatasetIndex>),
    /// It could not be built (the reason).
    Failed(String),
}

type Slot = Arc<OnceLock<Result<Arc<DatasetIndex>, String>>>;

/// The indexes of every dataset the deployment's adapters name, by content hash; each is built
/// once, on a background thread, when an adapter naming it is registered.
pub struct IndexStore {
    cache: Option<PathBuf>,
    slots: Mutex<HashMap<String, Slot>>,
}

impl IndexStore {
    /// A store caching built indexes under `cache` (none: memory only).
    pub fn new(cache: Option<PathBuf>) -> Self {
        Self { cache, slots: Mutex::new(HashMap::new()) }
    }

    /// The store the service uses: `$OPENLORA_CACHE/datasets` (default
    /// `~/.cache/openlora/datasets`).
    pub fn with_default_cache() -> Self {
        let cache = std::env::var_os("OPENLORA_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/openlora")));
        Self::new(cache.map(|c| c.join("datasets")))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts building `d`'s index from the folder `dir` unless it exists or is being built.
    pub fn ensure(&self, dir: &Path, d: &Dataset) {
        if d.files.is_empty() {
            return;
        }
        let slot = {
            let mut slots = self.slots();
            if slots.contains_key(&d.sha256) {
                return;
            }
            let slot: Slot = Arc::new(OnceLock::new());
            slots.insert(d.sha256.clone(), slot.clone());
            slot
        };
        let (cache, dir, d) = (self.cache.clone(), dir.to_path_buf(), d.clone());
        let spawned = std::thread::Builder::new().name("openlora-index".into()).spawn({
            let slot = slot.clone();
            move || {
                let started = Instant::now();
                let result = load_or_build(cache.as_deref(), &dir, &d).map(Arc::new);
                match &result {
                    Ok(ix) => eprintln!(
                        "openlora: dataset {:?} indexed: {} documents ({} duplicates), {} bytes, root {}, {:.2} s",
                        d.id,
                        ix.documents,
                        ix.duplicates,
                        ix.text().len(),
                        &ix.root[..12],
                        started.elapsed().as_secs_f64()
                    ),
                    Err(e) => eprintln!("openlora: dataset {:?} not indexed: {e}", d.id),
                }
                let _ = slot.set(result);
            }
        });
        if let Err(e) = spawned {
            let _ = slot.set(Err(format!("could not start the index thread: {e}")));
        }
    }

    /// The state of the index for content hash `sha256`; `None` if it was never asked for.
    pub fn state(&self, sha256: &str) -> Option<IndexState> {
        let slot = self.slots().get(sha256).cloned()?;
        Some(match slot.get() {
            None => IndexState::Building,
            Some(Ok(ix)) => IndexState::Ready(ix.clone()),
            Some(Err(e)) => IndexState::Failed(e.clone()),
        })
    }

    /// Waits up to `timeout` until no index is building; whether none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let busy = self.slots().values().any(|s| s.get().is_none());
            if !busy {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::manifest::Contributor;

    #[test]
    fn canonical_text_collapses_whitespace_and_maps_back() {
        let raw = "  Hello,\n\n  wörld\t!\0 ";
        let (c, map) = canonical_with_map(raw);
        assert_eq!(c, "Hello, wörld !");
        assert_eq!(map.len(), c.len());
        for (k, &r) in map.iter().enumerate() {
            let cb = c.as_bytes()[k];
            let rb = raw.as_bytes()[r as usize];
            assert!(cb == rb || (cb == b' ' && rb.is_ascii_whitespace()), "{k}");
        }
    }

    #[test]
    fn jsonl_documents_owners_and_duplicates() {
        let mut c = Corpus::default();
        let mut seen = HashSet::new();
        let data = "{\"contributor\": \"ann\", \"q\": \"Hi  there\", \"a\": [\"x\", {\"role\": \"user\", \"t\": \"y\"}]}\n\n{\"text\": \"Hi there x y\", \"contributor\": \"bob\"}\n{\"contributor\": \"bob\", \"text\": \"other\"}\n";
        c.add_file("d.jsonl", data.as_bytes(), &mut seen).expect("reads");
        // The second line's canonical text equals the first's: a duplicate, owner stays ann.
        assert_eq!(c.read, 3);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.text, b"Hi there x y\0other\0");
        assert_eq!(c.owners, vec!["ann".to_owned(), "bob".to_owned()]);
        assert_eq!(c.docs[1], DocEntry { start: 13, ordinal: 2, owner: Some(1) });
        let bad = c.add_file("e.jsonl", b"[1]\n", &mut seen).expect_err("not an object");
        assert!(bad.contains("e.jsonl line 1"), "{bad}");
    }

    #[test]
    fn merkle_proofs_verify_and_fail_on_tampering() {
        for n in [1usize, 2, 3, 5, 8, 13] {
            let text: Vec<u8> = (0..n * CHUNK_BYTES - 7).map(|i| (i % 251) as u8).collect();
            let leaves = merkle_leaves(&text);
            let root = merkle_root(&leaves);
            for (i, chunk) in text.chunks(CHUNK_BYTES).enumerate() {
                let proof = inclusion_proof(&leaves, i);
                assert!(verify_inclusion(chunk, &proof, &root), "n={n} i={i}");
                let mut bad = chunk.to_vec();
                bad[0] ^= 1;
                assert!(!verify_inclusion(&bad, &proof, &root));
            }
        }
    }

    /// The word-start suffix array is the full suffix array's word starts, in its order: checked
    /// against a plain sort on texts built to trip token ordering (words that are prefixes of
    /// others, punctuation and control bytes that sort below the space, multi-byte characters,
    /// document ends).
    #[test]
    fn word_suffixes_are_the_sorted_word_starts() {
        let docs = [
            "ab abc ab c ab",
            "ab",
            "abc",
            "a\u{1}b a ab. ab, ab",
            "\u{e9}t\u{e9} \u{e9}t\u{e9}s \u{e9}",
            "ab c ab c ab d",
            "z",
            "ab c",
        ];
        let mut rng = 7u64;
        let mut text = Vec::new();
        for round in 0..40 {
            let d = if round < docs.len() {
                docs[round].to_string()
            } else {
                let n = 1 + (round % 9);
                (0..n)
                    .map(|_| {
                        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ["a", "ab", "abc", "b", "ab.", "a!", "\u{1}"][(rng >> 33) as usize % 7]
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            text.extend_from_slice(d.as_bytes());
            text.push(0);
        }
        let got = word_suffixes(&text).expect("canonical");
        let mut want: Vec<u32> = (0..text.len() as u32)
            .filter(|&i| !is_separator(text[i as usize]) && (i == 0 || is_separator(text[i as usize - 1])))
            .collect();
        want.sort_by(|&a, &b| text[a as usize..].cmp(&text[b as usize..]));
        assert_eq!(got, want);
        assert!(word_suffixes(b"ab  c\0").expect_err("double space").contains("two separators"));
        assert_eq!(word_suffixes(b"").expect("empty"), Vec::<u32>::new());
    }

    #[test]
    fn indexes_build_save_and_reopen_identically() {
        let tmp = tempfile::tempdir().expect("tmp");
        let data =
            "{\"contributor\": \"ann\", \"text\": \"the quick brown fox\"}\n{\"text\": \"jumps over the lazy dog\"}\n";
        std::fs::write(tmp.path().join("d.jsonl"), data).expect("write");
        let d = Dataset {
            id: "d".into(),
            sha256: hex::encode(Sha256::digest(data.as_bytes())),
            license: String::new(),
            files: vec!["d.jsonl".into()],
            merkle_root: None,
            contributors: vec![Contributor { name: "ann".into(), share: 1 }],
        };
        let cache = tmp.path().join("cache");
        let built = load_or_build(Some(&cache), tmp.path(), &d).expect("builds");
        let text = built.text();
        let sa = built.suffixes();
        assert_eq!(sa.len(), 9, "one suffix per word");
        for w in sa.windows(2) {
            assert!(text[w[0] as usize..] < text[w[1] as usize..], "sorted");
        }
        let opened = DatasetIndex::open(&cache, &d.sha256).expect("opens");
        assert_eq!(opened.text(), built.text());
        assert_eq!(opened.suffixes(), built.suffixes());
        assert_eq!(opened.docs(), built.docs());
        assert_eq!(opened.root, built.root);
        assert_eq!(opened.doc_at(25), (built.docs()[1], 5));
        let wrong = Dataset { sha256: "0".repeat(64), ..d };
        assert!(read_dataset(tmp.path(), &wrong).expect_err("hash").contains("SHA-256 of its files"));
    }
}
