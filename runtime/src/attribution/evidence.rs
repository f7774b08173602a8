//! Verbatim-overlap evidence: which spans of an answer occur word for word in the datasets
//! that trained the adapters that produced it, found at receipt time in each dataset's index
//! ([`super::index`]) and recorded in the receipt.
//!
//! This is evidence of *verbatim overlap*, not of influence: an answer that paraphrases its
//! training data, or draws on it in any way other than repeating it, earns its data nothing
//! here, and a span common enough to be everyday language is not counted.
//!
//! The matcher ([`find_matches`], method [`METHOD`]): the answer is canonicalized like the
//! data (whitespace runs as one space). From each word start, left to right, it finds the
//! longest run of whole words (at most [`MAX_SPAN_BYTES`]) that occurs in the dataset with a
//! word boundary on both sides (before: start, space or document start; after: end, space,
//! document end or ASCII punctuation). The run is a span when it has at least `min_words`
//! words, occurs at most `max_occurrences` times in the dataset (rare enough to be that
//! dataset's, not the language's), and does not occur in the prompt (the model copying its
//! user earns nothing); the next search starts at the first word after the span. At most
//! `max_spans` spans are kept per receipt, the longest first.

use serde::{Deserialize, Serialize};

use super::index::{DatasetIndex, FILTER_WORDS, FORMAT, IndexState, canonical, canonical_with_map};
use crate::adapters::manifest::Dataset;

/// The method's name and version, recorded in every receipt's evidence.
pub const METHOD: &str = "verbatim-overlap/1";

/// The longest span searched from one word start (a longer verbatim run is several spans).
pub const MAX_SPAN_BYTES: usize = 1024;

/// The matcher's parameters (recorded in every receipt that has evidence).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceParams {
    /// The fewest words a span has.
    pub min_words: u32,
    /// The most times a span may occur in a dataset.
    pub max_occurrences: u32,
    /// The most spans one receipt records.
    pub max_spans: u32,
}

impl Default for EvidenceParams {
    /// `min_words` 6: the null test (`tests/all/evidence.rs`: the base model's 40-token answers
    /// to the 20 canary prompts against the canary dataset) gave dataset credit on 90% of
    /// answers at 1 word, 65% at 2, 5% at 3 and none from 4 up; 6 leaves a margin for larger
    /// datasets, where common 4- and 5-word phrases do occur. `max_occurrences` 8 drops phrases
    /// common enough to be anyone's.
    fn default() -> Self {
        Self { min_words: 6, max_occurrences: 8, max_spans: 8 }
    }
}

/// One dataset the matcher was asked to search.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRef {
    /// The adapter whose manifest names it.
    pub adapter: String,
    /// The dataset's id.
    pub dataset: String,
    /// The Merkle root of its canonical text (when it was searched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// `searched`, `building` (not yet indexed: not searched), or `failed: REASON`.
    pub state: String,
}

/// One span of the answer found in a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    /// Which of [`Evidence::indexes`].
    pub index: u32,
    /// Its byte range in the answer (the choices' texts joined by NUL, as `output_sha256`
    /// hashes them).
    pub start: u32,
    /// End (exclusive).
    pub end: u32,
    /// Words in the span.
    pub words: u32,
    /// The document's ordinal in the dataset (its first copy's).
    pub doc: u32,
    /// Byte offset of the span in that document's canonical text.
    pub doc_offset: u32,
    /// How many times the span occurs in the dataset.
    pub count: u32,
    /// The document's owner, when the document names one (else the dataset's contributors
    /// share the credit by their declared shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The evidence of one answer, as its receipt records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// [`METHOD`].
    pub method: String,
    /// The index format ([`FORMAT`]).
    pub index_format: String,
    /// The parameters.
    pub params: EvidenceParams,
    /// SHA-256 of the prompt text the matcher excluded (the prompt as the model read it).
    pub prompt_sha256: String,
    /// The datasets asked for, in order (spans point here).
    pub indexes: Vec<IndexRef>,
    /// The spans, in answer order.
    pub spans: Vec<Span>,
}

/// One span found by [`find_matches`], in canonical answer bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// Start in the canonical answer.
    pub start: usize,
    /// End (exclusive).
    pub end: usize,
    /// Words.
    pub words: u32,
    /// The first occurrence's position in the index's text.
    pub pos: usize,
    /// Occurrences with word boundaries.
    pub count: u32,
}

/// `text[p..]` against `needle` over `needle`'s length (a shorter suffix equal so far is less).
fn cmp_prefix(text: &[u8], p: usize, needle: &[u8]) -> std::cmp::Ordering {
    let end = (p + needle.len()).min(text.len());
    text[p..end].cmp(needle)
}

/// Whether the occurrence at `p` of `len` bytes ends at a word boundary (it starts at one:
/// the index holds only word starts).
fn bounded(text: &[u8], p: usize, len: usize) -> bool {
    let q = p + len;
    q >= text.len() || matches!(text[q], b' ' | 0) || text[q].is_ascii_punctuation()
}

/// The spans of canonical `answer` found in `ix` (see the module documentation), excluding
/// those that occur in canonical `prompt`.
pub fn find_matches(ix: &DatasetIndex, answer: &str, prompt: &str, p: &EvidenceParams) -> Vec<Match> {
    let text = ix.text();
    let sa = ix.suffixes();
    let bytes = answer.as_bytes();
    let mut out = Vec::new();
    if sa.is_empty() || bytes.is_empty() || p.min_words == 0 {
        return out;
    }
    // More occurrences than this in the suffix-array range: too common to scan, so too common.
    let scan_limit = (p.max_occurrences as usize).saturating_mul(8).max(64);
    let starts: Vec<usize> =
        (0..bytes.len()).filter(|&i| bytes[i] != b' ' && (i == 0 || bytes[i - 1] == b' ')).collect();
    let min = p.min_words as usize;
    let mut w = 0;
    while w + min <= starts.len() {
        let s = starts[w];
        // A span has more than FILTER_WORDS words, so its first FILTER_WORDS words (each with
        // the space after it) are a key of the index's filter: one memory access rejects most
        // word starts.
        if min > FILTER_WORDS && !ix.may_contain_words(&bytes[s..starts[w + FILTER_WORDS]]) {
            w += 1;
            continue;
        }
        // Then one search: do the first `min_words` words occur at all (the last one without
        // trailing punctuation)? Most word starts of most answers stop here.
        let probe_end = starts.get(w + min).map_or(bytes.len(), |&n| n - 1);
        let probe = &bytes[s..probe_end];
        let probe = &probe[..probe.len() - probe.iter().rev().take_while(|c| c.is_ascii_punctuation()).count()];
        let (lo0, hi0) = ix.bucket(probe);
        let at = lo0 + sa[lo0..hi0].partition_point(|&x| cmp_prefix(text, x as usize, probe).is_lt());
        if probe.is_empty() || at == hi0 || cmp_prefix(text, sa[at] as usize, probe).is_ne() {
            w += 1;
            continue;
        }
        // Candidates: (end, lo, hi, words) for each whole-word prefix found.
        let mut cands: Vec<(usize, usize, usize, u32)> = Vec::new();
        let (mut lo, mut hi) = ix.bucket(&bytes[s..]);
        let mut e = s;
        let mut words = 0u32;
        loop {
            let next = bytes[e + 1..].iter().position(|&b| b == b' ').map_or(bytes.len(), |k| e + 1 + k);
            if next - s > MAX_SPAN_BYTES {
                break;
            }
            let needle = &bytes[s..next];
            let range = &sa[lo..hi];
            let find = |needle: &[u8]| {
                let a = range.partition_point(|&x| cmp_prefix(text, x as usize, needle).is_lt());
                (a, a + range[a..].partition_point(|&x| cmp_prefix(text, x as usize, needle).is_eq()))
            };
            let (a, b) = find(needle);
            if a == b {
                // The word without its trailing punctuation (`bridge,` for `bridge at`) may still
                // end the span.
                let trimmed = needle.len() - needle.iter().rev().take_while(|c| c.is_ascii_punctuation()).count();
                if trimmed > e - s + usize::from(e > s) && trimmed < needle.len() {
                    let (a, b) = find(&needle[..trimmed]);
                    if a < b {
                        cands.push((s + trimmed, lo + a, lo + b, words + 1));
                    }
                }
                break;
            }
            (lo, hi) = (lo + a, lo + b);
            words += 1;
            cands.push((next, lo, hi, words));
            if next == bytes.len() {
                break;
            }
            e = next;
        }
        let mut accepted = None;
        for &(end, lo, hi, words) in cands.iter().rev() {
            if words < p.min_words || hi - lo > scan_limit {
                break;
            }
            let len = end - s;
            let valid = sa[lo..hi].iter().map(|&x| x as usize).filter(|&x| bounded(text, x, len));
            let (count, first) = valid.fold((0u32, usize::MAX), |(n, f), x| (n + 1, f.min(x)));
            if count == 0 {
                continue;
            }
            if count > p.max_occurrences || prompt.contains(&answer[s..end]) {
                break;
            }
            accepted = Some(Match { start: s, end, words, pos: first, count });
            break;
        }
        match accepted {
            Some(m) => {
                out.push(m);
                w = starts.partition_point(|&x| x < m.end);
            }
            None => w += 1,
        }
    }
    out
}

/// One dataset to search: the adapter naming it, the manifest's entry, the index's state.
pub struct Source<'a> {
    /// The adapter.
    pub adapter: &'a str,
    /// The manifest's dataset.
    pub dataset: &'a Dataset,
    /// Its index.
    pub state: IndexState,
}

/// Why an index cannot be used for this manifest's dataset, if it cannot.
fn unusable(ix: &DatasetIndex, d: &Dataset) -> Option<String> {
    if let Some(root) = &d.merkle_root
        && *root != ix.root
    {
        return Some(format!("the manifest's merkle_root is {root}, the data's is {}", ix.root));
    }
    let listed = |o: &String| d.contributors.iter().any(|c| &c.name == o);
    ix.owners
        .iter()
        .find(|o| !listed(o))
        .map(|o| format!("a document's contributor {o:?} is not listed in the manifest"))
}

/// The evidence of `outputs` (one per choice) against `sources`, `prompt` excluded. `None`
/// when no source has indexed files.
pub fn evidence(sources: &[Source<'_>], outputs: &[&str], prompt: &str, p: &EvidenceParams) -> Option<Evidence> {
    if sources.is_empty() {
        return None;
    }
    let prompt_canon = canonical(prompt);
    let answers: Vec<(usize, String, Vec<u32>)> = {
        let mut base = 0;
        outputs
            .iter()
            .map(|o| {
                let (c, map) = canonical_with_map(o);
                let at = base;
                base += o.len() + 1;
                (at, c, map)
            })
            .collect()
    };
    let mut indexes = Vec::with_capacity(sources.len());
    let mut spans = Vec::new();
    for (k, src) in sources.iter().enumerate() {
        let mut r = IndexRef {
            adapter: src.adapter.to_owned(),
            dataset: src.dataset.id.clone(),
            root: None,
            state: String::new(),
        };
        match &src.state {
            IndexState::Building => r.state = "building".into(),
            IndexState::Failed(e) => r.state = format!("failed: {e}"),
            IndexState::Ready(ix) => match unusable(ix, src.dataset) {
                Some(e) => r.state = format!("failed: {e}"),
                None => {
                    r.state = "searched".into();
                    r.root = Some(ix.root.clone());
                    for (base, answer, map) in &answers {
                        for m in find_matches(ix, answer, &prompt_canon, p) {
                            let (doc, offset) = ix.doc_at(m.pos);
                            spans.push(Span {
                                index: k as u32,
                                start: (base + map[m.start] as usize) as u32,
                                end: (base + map[m.end - 1] as usize + 1) as u32,
                                words: m.words,
                                doc: doc.ordinal,
                                doc_offset: offset as u32,
                                count: m.count,
                                owner: doc.owner.map(|o| ix.owners[o as usize].clone()),
                            });
                        }
                    }
                }
            },
        }
        indexes.push(r);
    }
    if spans.len() > p.max_spans as usize {
        spans.sort_by(|a, b| b.words.cmp(&a.words).then(a.start.cmp(&b.start)).then(a.index.cmp(&b.index)));
        spans.truncate(p.max_spans as usize);
    }
    spans.sort_by(|a, b| a.start.cmp(&b.start).then(a.index.cmp(&b.index)));
    Some(Evidence {
        method: METHOD.into(),
        index_format: FORMAT.into(),
        params: p.clone(),
        prompt_sha256: super::receipt::text_sha256(prompt),
        indexes,
        spans,
    })
}

/// Evidence weight per party: `(adapter, dataset, contributor, words)`, a span without an
/// owner spread over the dataset's contributors by their declared shares (as whole-word
/// weights scaled by the shares). Sorted, one entry per key.
pub fn evidence_weights(
    ev: &Evidence,
    datasets: &dyn Fn(&str, &str) -> Option<Dataset>,
) -> Vec<(String, String, String, u128)> {
    let mut m: std::collections::BTreeMap<(String, String, String), u128> = std::collections::BTreeMap::new();
    for s in &ev.spans {
        let Some(ix) = ev.indexes.get(s.index as usize) else { continue };
        let Some(d) = datasets(&ix.adapter, &ix.dataset) else { continue };
        let total: u128 = d.contributors.iter().map(|c| u128::from(c.share)).sum();
        match &s.owner {
            Some(o) => {
                // Scaled like the shared case so both kinds of span weigh the same per word.
                *m.entry((ix.adapter.clone(), ix.dataset.clone(), o.clone())).or_default() +=
                    u128::from(s.words) * total;
            }
            None => {
                for c in &d.contributors {
                    *m.entry((ix.adapter.clone(), ix.dataset.clone(), c.name.clone())).or_default() +=
                        u128::from(s.words) * u128::from(c.share);
                }
            }
        }
    }
    m.into_iter().map(|((a, d, c), w)| (a, d, c, w)).collect()
}

/// What [`verify_evidence`] checked.
#[derive(Debug, Default)]
pub struct EvidenceCheck {
    /// Datasets rebuilt and searched again.
    pub datasets: usize,
    /// Spans reproduced, each found byte for byte at its document offset with its chunks
    /// included under the dataset's root.
    pub spans: usize,
}

/// Re-runs the matcher of `receipt` from scratch and checks its evidence: the receipt's
/// signature (by `pinned_key` when given), `output` (the choices joined by NUL) against the
/// record's `output_sha256`, `prompt` (the prompt as the model read it) against the evidence's
/// `prompt_sha256`, each searched dataset rebuilt from the folder `data_dir(adapter)` gives
/// (its files' SHA-256 and Merkle root as recorded), the spans found again identical to the
/// recorded ones (their JSON compared byte for byte), and each span's text at its document
/// and offset, with Merkle inclusion of the chunks that hold it.
pub fn verify_evidence(
    receipt: &super::Receipt,
    pinned_key: Option<&str>,
    prompt: &str,
    output: &str,
    data_dir: &dyn Fn(&str) -> Option<std::path::PathBuf>,
) -> Result<EvidenceCheck, String> {
    use super::index::{CHUNK_BYTES, DatasetIndex, inclusion_proof, merkle_leaves, read_dataset, verify_inclusion};
    super::verify_receipt(receipt, pinned_key).map_err(|e| format!("the receipt does not verify: {e}"))?;
    let record = &receipt.body.record;
    let ev = record.evidence.as_ref().ok_or("the receipt has no evidence")?;
    if ev.method != METHOD || ev.index_format != FORMAT {
        return Err(format!(
            "the evidence was made by {} over {}; this verifier speaks {METHOD} over {FORMAT}",
            ev.method, ev.index_format
        ));
    }
    if super::receipt::text_sha256(output) != record.output_sha256 {
        return Err(
            "the output does not match the receipt's output_sha256 (give the choices' texts joined by NUL)".into()
        );
    }
    if super::receipt::text_sha256(prompt) != ev.prompt_sha256 {
        return Err(
            "the prompt does not match the evidence's prompt_sha256 (give the prompt as the model read it)".into()
        );
    }
    let mut check = EvidenceCheck::default();
    let mut datasets = Vec::new();
    let mut states = Vec::new();
    for r in &ev.indexes {
        let d = record
            .adapters
            .iter()
            .find(|a| a.name == r.adapter)
            .and_then(|a| a.datasets.iter().find(|d| d.id == r.dataset))
            .ok_or_else(|| {
                format!(
                    "the evidence names dataset {:?} of adapter {:?}, which the record does not",
                    r.dataset, r.adapter
                )
            })?;
        let state = if r.state == "searched" {
            let dir =
                data_dir(&r.adapter).ok_or_else(|| format!("no data folder given for adapter {:?}", r.adapter))?;
            let ix = DatasetIndex::build(&d.sha256, read_dataset(&dir, d)?)?;
            if Some(&ix.root) != r.root.as_ref() {
                return Err(format!(
                    "dataset {:?}: Merkle root {} where the receipt says {:?}",
                    r.dataset, ix.root, r.root
                ));
            }
            check.datasets += 1;
            IndexState::Ready(std::sync::Arc::new(ix))
        } else if r.state == "building" {
            IndexState::Building
        } else {
            IndexState::Failed(r.state.strip_prefix("failed: ").unwrap_or(&r.state).to_owned())
        };
        datasets.push(d.clone());
        states.push(state);
    }
    let sources: Vec<Source<'_>> = ev
        .indexes
        .iter()
        .zip(&datasets)
        .zip(&states)
        .map(|((r, d), s)| Source { adapter: &r.adapter, dataset: d, state: s.clone() })
        .collect();
    let outputs: Vec<&str> = output.split('\0').collect();
    let again = evidence(&sources, &outputs, prompt, &ev.params).ok_or("no datasets to search")?;
    let (a, b) = (serde_json::to_vec(&again).unwrap_or_default(), serde_json::to_vec(ev).unwrap_or_default());
    if a != b {
        return Err(format!(
            "the matcher finds other evidence:\n  recorded: {}\n  found:    {}",
            String::from_utf8_lossy(&b),
            String::from_utf8_lossy(&a)
        ));
    }
    let mut leaves_of = std::collections::HashMap::new();
    for s in &ev.spans {
        let IndexState::Ready(ix) = &states[s.index as usize] else {
            return Err(format!("span {}..{} points at a dataset that was not searched", s.start, s.end));
        };
        let doc = ix.docs().iter().find(|d| d.ordinal == s.doc).ok_or_else(|| format!("no document {}", s.doc))?;
        let span = canonical(output.get(s.start as usize..s.end as usize).ok_or("a span outside the output")?);
        let pos = doc.start as usize + s.doc_offset as usize;
        if ix.text().get(pos..pos + span.len()) != Some(span.as_bytes()) {
            return Err(format!("span {}..{} is not at offset {} of document {}", s.start, s.end, s.doc_offset, s.doc));
        }
        let leaves = leaves_of.entry(s.index).or_insert_with(|| merkle_leaves(ix.text()));
        let mut root = [0u8; 32];
        hex::decode_to_slice(&ix.root, &mut root).map_err(|e| e.to_string())?;
        for chunk in pos / CHUNK_BYTES..=(pos + span.len().max(1) - 1) / CHUNK_BYTES {
            let bytes = &ix.text()[chunk * CHUNK_BYTES..((chunk + 1) * CHUNK_BYTES).min(ix.text().len())];
            if !verify_inclusion(bytes, &inclusion_proof(leaves, chunk), &root) {
                return Err(format!(
                    "chunk {chunk} of dataset {:?} is not under its root",
                    ev.indexes[s.index as usize].dataset
                ));
            }
        }
        check.spans += 1;
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::index::Corpus;

    fn index(docs: &[(&str, Option<&str>)]) -> DatasetIndex {
        let mut c = Corpus::default();
        let mut lines = String::new();
        for (t, o) in docs {
            let mut v = serde_json::json!({ "text": t });
            if let Some(o) = o {
                v["contributor"] = serde_json::json!(o);
            }
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
        c.add_file("d.jsonl", lines.as_bytes(), &mut Default::default()).expect("reads");
        DatasetIndex::build("x", c).expect("builds")
    }

    fn params(min_words: u32) -> EvidenceParams {
        EvidenceParams { min_words, max_occurrences: 2, max_spans: 8 }
    }

    /// The shingle filter only skips work: on random data drawn from a small vocabulary (so
    /// runs repeat, end documents and carry punctuation) and answers that quote it, cut it and
    /// mix it with noise, the matches are the same with and without it, for every `min_words`.
    #[test]
    fn the_filter_never_changes_the_matches() {
        let vocab = ["a", "ab", "abc", "b", "bridge", "bridge,", "the", "old", "x.", "night", "é", "a!"];
        let mut rng = 22u64;
        let mut next = |n: usize| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as usize % n
        };
        let docs: Vec<String> = (0..60)
            .map(|_| (0..1 + next(14)).map(|_| vocab[next(vocab.len())]).collect::<Vec<_>>().join(" "))
            .collect();
        let refs: Vec<(&str, Option<&str>)> = docs.iter().map(|d| (d.as_str(), None)).collect();
        let with = index(&refs);
        let without = index(&refs).without_filter();
        let mut checked = 0;
        for round in 0..300 {
            let mut words: Vec<&str> = Vec::new();
            while words.len() < 30 {
                if next(3) == 0 {
                    words.push(vocab[next(vocab.len())]);
                } else {
                    let d: Vec<&str> = docs[next(docs.len())].split(' ').collect();
                    let from = next(d.len());
                    words.extend(&d[from..(from + 1 + next(8)).min(d.len())]);
                }
            }
            let answer = words.join(" ");
            let min_words = 1 + round % 8;
            let p = EvidenceParams { min_words: min_words as u32, max_occurrences: 50, max_spans: 8 };
            let a = find_matches(&with, &answer, "", &p);
            let b = find_matches(&without, &answer, "", &p);
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{answer:?} at min_words {min_words}");
            checked += a.len();
        }
        assert!(checked > 100, "the answers quote the data ({checked} matches)");
    }

    #[test]
    fn finds_maximal_whole_word_spans_with_their_documents() {
        let ix = index(&[
            ("the weather was fine today", None),
            ("purple elephants dance quietly under the old bridge at night", Some("ann")),
        ]);
        let answer = "I saw that purple elephants dance quietly under the old bridge, said Bob.";
        let m = find_matches(&ix, &canonical(answer), "", &params(3));
        assert_eq!(m.len(), 1, "{m:?}");
        let span = &canonical(answer)[m[0].start..m[0].end];
        // The answer's word is `bridge,`: without its comma it ends the span.
        assert_eq!(span, "purple elephants dance quietly under the old bridge");
        assert_eq!(m[0].words, 8);
        let (doc, off) = ix.doc_at(m[0].pos);
        assert_eq!((doc.ordinal, off, doc.owner), (1, 0, Some(0)));
        // Not at a word boundary in the data: "lephants dance quietly" starts inside a word.
        assert!(find_matches(&ix, "lephants dance quietly", "", &params(3)).is_empty());
        // Too short.
        assert!(find_matches(&ix, "purple elephants", "", &params(3)).is_empty());
        // In the prompt: the model copied its user.
        let prompt = "Repeat: purple elephants dance quietly under the old bridge";
        assert!(find_matches(&ix, "purple elephants dance quietly under the old", prompt, &params(3)).is_empty());
    }

    #[test]
    fn common_spans_are_not_evidence() {
        let docs: Vec<String> = (0..10).map(|i| format!("doc {i} says: on the other hand it rains")).collect();
        let refs: Vec<(&str, Option<&str>)> = docs.iter().map(|d| (d.as_str(), None)).collect();
        let ix = index(&refs);
        assert!(find_matches(&ix, "on the other hand it rains", "", &params(3)).is_empty());
        let m = find_matches(&ix, "doc 7 says: on the other", "", &params(3));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].count, 1);
    }

    #[test]
    fn spans_map_back_to_the_raw_answer() {
        let ix = index(&[("alpha beta gamma delta epsilon", Some("ann"))]);
        let d = Dataset {
            id: "d".into(),
            sha256: "x".into(),
            license: String::new(),
            files: vec!["d.jsonl".into()],
            merkle_root: None,
            contributors: vec![crate::adapters::manifest::Contributor { name: "ann".into(), share: 1 }],
        };
        let ix = std::sync::Arc::new(ix);
        let src = [Source { adapter: "a", dataset: &d, state: IndexState::Ready(ix) }];
        let outputs = ["first choice", "x  alpha\n beta   gamma delta and more"];
        let ev = evidence(&src, &outputs, "prompt", &params(3)).expect("evidence");
        assert_eq!(ev.spans.len(), 1);
        let s = &ev.spans[0];
        let joined = outputs.join("\0");
        assert_eq!(&joined[s.start as usize..s.end as usize], "alpha\n beta   gamma delta");
        assert_eq!(ev.indexes[0].state, "searched");
        assert_eq!(s.owner.as_deref(), Some("ann"));
        // A document owner the manifest does not list makes the index unusable for it.
        let other = Dataset {
            contributors: vec![crate::adapters::manifest::Contributor { name: "bob".into(), share: 1 }],
            ..d.clone()
        };
        let src = [Source { adapter: "a", dataset: &other, state: src[0].state.clone() }];
        let ev = evidence(&src, &outputs, "prompt", &params(3)).expect("evidence");
        assert!(ev.spans.is_empty() && ev.indexes[0].state.contains("\"ann\" is not listed"), "{ev:?}");
    }
}
