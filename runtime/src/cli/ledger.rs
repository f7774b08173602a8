//! `openlora ledger`: verify a receipt ledger, or export it with per-party totals.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Check every receipt's signature, hash, chain link and sums; names the first bad entry.
    ///
    /// Pin the signer: `openlora ledger verify --public-key KEY PATH`, with KEY from the node
    /// (`curl http://NODE/v1/attribution/key`). Without --public-key the signatures are only
    /// checked against the key the ledger itself names, so a ledger edited and re-signed with
    /// another key also passes.
    Verify {
        /// The ledger file (STATE_DIR/ledger.jsonl).
        path: PathBuf,
        /// The node's Ed25519 public key (64 hex digits, as GET /v1/attribution/key serves it):
        /// every receipt must be signed by it. The way to verify who wrote the ledger.
        #[arg(long, value_name = "HEX")]
        public_key: Option<String>,
    },
    /// Write the receipts as JSON lines and print per-party totals (JSON) on stdout, after
    /// verifying them as `verify` does (pin the signer with --public-key before paying anyone).
    Export {
        /// The ledger file.
        path: PathBuf,
        /// Where to write the receipts (JSON lines).
        #[arg(long)]
        out: PathBuf,
        /// The node's Ed25519 public key (64 hex digits): export only a ledger it signed.
        #[arg(long, value_name = "HEX")]
        public_key: Option<String>,
    },
    /// Re-run the verbatim-overlap matcher of one receipt and check its evidence byte for byte:
    /// the datasets rebuilt from their files (SHA-256 and Merkle root as recorded), the same
    /// spans found, each span's text at its document offset, its chunks under the root. So a
    /// contributor who holds the data can audit their credit without trusting the node.
    VerifyEvidence {
        /// The receipt: a JSON file as GET /v1/receipts/ID serves it, or a ledger
        /// (STATE_DIR/ledger.jsonl) with --id.
        receipt: PathBuf,
        /// The receipt id, when RECEIPT is a ledger.
        #[arg(long)]
        id: Option<String>,
        /// The prompt as the model read it (for chat, the rendered template: POST /tokenize
        /// then /detokenize gives it), as a file.
        #[arg(long)]
        prompt: PathBuf,
        /// The answer as a file (several choices: their texts joined by NUL bytes).
        #[arg(long)]
        output: PathBuf,
        /// ADAPTER=DIR: the folder whose manifest's dataset `files` paths resolve against (the
        /// adapter's folder), for each adapter whose datasets were searched.
        #[arg(long = "data", value_name = "ADAPTER=DIR")]
        data: Vec<String>,
        /// The node's Ed25519 public key (64 hex digits): the receipt must be signed by it.
        #[arg(long, value_name = "HEX")]
        public_key: Option<String>,
    },
    /// Benchmark the evidence index and matcher on synthetic data: build the index of MIB
    /// mebibytes of text (words drawn Zipf-like from a 20,000-word vocabulary, documents of
    /// 50-400 words), then match ANSWERS answers of about 500 tokens (375 words; half of them
    /// quote three 20-word passages of the data) and print build time, index size per byte of
    /// text and the matcher's p50/p99 per answer, as JSON. One core (the matcher is one thread;
    /// libsais runs single-threaded).
    BenchEvidence {
        /// Text to index, in MiB.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Answers to match.
        #[arg(long, default_value_t = 400)]
        answers: usize,
    },
    /// Index the datasets an adapter's manifest names (as the server does when it registers the
    /// adapter) and print, per dataset, its documents, duplicates, bytes and Merkle root (the
    /// manifest's optional `merkle_root`).
    Index {
        /// The adapter folder (with openlora.toml).
        dir: PathBuf,
    },
}

pub fn run(c: LedgerCommand) -> Result<()> {
    use openlora::attribution::{totals, verify_file};
    match c {
        LedgerCommand::Verify { path, public_key } => {
            let pinned = public_key.as_deref().map(parse_public_key).transpose()?;
            let v = verify_file(&path, pinned.as_deref())?;
            if let Some(e) = v.error {
                bail!("{}: {e} ({} entries before it verified)", path.display(), v.receipts.len());
            }
            let n = v.receipts.len();
            match &pinned {
                Some(key) => {
                    println!("ok: {n} receipts, one unbroken chain, sums exact, all signed by the pinned key {key}")
                }
                None => {
                    let key = v.receipts.first().map_or("-", |r| r.body.node_key.as_str());
                    println!("ok: {n} receipts, one unbroken chain, sums exact, all signed by {key}");
                    eprintln!(
                        "warning: the signer was not pinned: signatures were checked only against the key the ledger itself names, \
                         so a ledger re-signed with another key passes too. Pin the node's key (GET /v1/attribution/key serves it): \
                         openlora ledger verify --public-key KEY {}",
                        path.display()
                    );
                }
            }
            Ok(())
        }
        LedgerCommand::VerifyEvidence { receipt, id, prompt, output, data, public_key } => {
            let pinned = public_key.as_deref().map(parse_public_key).transpose()?;
            let r = read_receipt(&receipt, id.as_deref())?;
            let prompt = std::fs::read_to_string(&prompt).with_context(|| format!("reading {}", prompt.display()))?;
            let output = std::fs::read_to_string(&output).with_context(|| format!("reading {}", output.display()))?;
            let mut dirs = std::collections::HashMap::new();
            for d in &data {
                let (name, dir) = d.split_once('=').with_context(|| format!("--data {d}: expected ADAPTER=DIR"))?;
                dirs.insert(name.to_owned(), PathBuf::from(dir));
            }
            let found = |adapter: &str| dirs.get(adapter).cloned();
            let check =
                openlora::attribution::evidence::verify_evidence(&r, pinned.as_deref(), &prompt, &output, &found)
                    .map_err(|e| anyhow::anyhow!("receipt {}: {e}", r.hash))?;
            println!(
                "ok: receipt {}: {} spans reproduced byte for byte from {} datasets, each at its document offset and under its Merkle root{}",
                r.hash,
                check.spans,
                check.datasets,
                if pinned.is_some() { ", signed by the pinned key" } else { "" }
            );
            Ok(())
        }
        LedgerCommand::BenchEvidence { mib, answers } => bench_evidence(mib, answers),
        LedgerCommand::Index { dir } => {
            let m = openlora::adapters::manifest::Manifest::load_for(&dir)?
                .with_context(|| format!("{}: no openlora.toml", dir.display()))?;
            let mut out = Vec::new();
            for d in m.datasets.iter().filter(|d| !d.files.is_empty()) {
                let started = std::time::Instant::now();
                let corpus = openlora::attribution::index::read_dataset(&dir, d).map_err(anyhow::Error::msg)?;
                let ix =
                    openlora::attribution::index::DatasetIndex::build(&d.sha256, corpus).map_err(anyhow::Error::msg)?;
                out.push(serde_json::json!({
                    "dataset": d.id,
                    "sha256": d.sha256,
                    "documents": ix.documents,
                    "duplicates": ix.duplicates,
                    "bytes": ix.text().len(),
                    "index_bytes": ix.resident_bytes(),
                    "merkle_root": ix.root,
                    "seconds": started.elapsed().as_secs_f64(),
                }));
            }
            if out.is_empty() {
                bail!("{}: the manifest names no dataset files", dir.display());
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        LedgerCommand::Export { path, out, public_key } => {
            let pinned = public_key.as_deref().map(parse_public_key).transpose()?;
            let v = verify_file(&path, pinned.as_deref())?;
            if let Some(e) = v.error {
                bail!("{}: {e}; not exporting an unverified ledger", path.display());
            }
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
            );
            for r in &v.receipts {
                serde_json::to_writer(&mut w, r)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            if pinned.is_none() {
                eprintln!(
                    "warning: the signer was not pinned (--public-key KEY, from GET /v1/attribution/key): these totals are only as \
                     trustworthy as whoever could write {}",
                    path.display()
                );
            }
            let t: Vec<serde_json::Value> = totals(&v.receipts)
                .into_iter()
                .map(|(party, role, micros)| serde_json::json!({"party": party, "role": role, "micros": micros}))
                .collect();
            let charged: u64 = v.receipts.iter().map(|r| r.body.attribution.total_micros).sum();
            println!("{}", serde_json::json!({"receipts": v.receipts.len(), "total_micros": charged, "totals": t}));
            Ok(())
        }
    }
}

/// `openlora ledger bench-evidence`.
fn bench_evidence(mib: usize, answers: usize) -> Result<()> {
    use openlora::adapters::manifest::Dataset;
    use openlora::attribution::evidence::{EvidenceParams, Source, evidence};
    use openlora::attribution::index::{Corpus, DatasetIndex, IndexState};
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(22);
    // A vocabulary of pronounceable words; rank r drawn with probability ~ 1/(r+10).
    let syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "po", "de", "an", "or", "el", "is", "um", "ba"];
    let vocab: Vec<String> =
        (0..20_000).map(|_| (0..rng.gen_range(1..4)).map(|_| syll[rng.gen_range(0..syll.len())]).collect()).collect();
    let harmonic: Vec<f64> = {
        let mut acc = 0.0;
        (0..vocab.len())
            .map(|r| {
                acc += 1.0 / (r as f64 + 10.0);
                acc
            })
            .collect()
    };
    let total = *harmonic.last().unwrap_or(&1.0);
    let word = |rng: &mut StdRng| -> &str {
        let x = rng.r#gen::<f64>() * total;
        &vocab[harmonic.partition_point(|&h| h < x).min(vocab.len() - 1)]
    };
    let target = mib << 20;
    let mut lines = String::with_capacity(target + (1 << 20));
    let mut doc = String::new();
    while lines.len() < target {
        doc.clear();
        for i in 0..rng.gen_range(50..400) {
            if i > 0 {
                doc.push(' ');
            }
            doc.push_str(word(&mut rng));
        }
        lines.push_str(&doc);
        lines.push('\n');
    }
    // Each line one document, added as `read_dataset` adds a plain-text file.
    let started = std::time::Instant::now();
    let mut corpus = Corpus::default();
    let mut seen = Default::default();
    for line in lines.lines() {
        corpus.add_file("doc.txt", line.as_bytes(), &mut seen).map_err(anyhow::Error::msg)?;
    }
    let read_s = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let ix = DatasetIndex::build("bench", corpus).map_err(anyhow::Error::msg)?;
    let build_s = started.elapsed().as_secs_f64();
    let ix = std::sync::Arc::new(ix);
    let text = ix.text();
    let p = EvidenceParams::default();
    let dataset = Dataset {
        id: "bench".into(),
        sha256: "0".repeat(64),
        license: String::new(),
        files: vec!["doc.txt".into()],
        merkle_root: Some(ix.root.clone()),
        contributors: Vec::new(),
    };
    let src = [Source { adapter: "bench", dataset: &dataset, state: IndexState::Ready(ix.clone()) }];
    let mut times = Vec::with_capacity(answers);
    let (mut spans, mut evidence_bytes) = (0usize, 0usize);
    for a in 0..answers {
        let mut answer = String::new();
        let mut words = 0;
        let quotes = if a % 2 == 0 { 3 } else { 0 };
        let mut quoted = 0;
        while words < 375 {
            if quoted < quotes && words >= 100 * quoted + 40 {
                // 20 words from a random place in the data, from a word start.
                let mut at = rng.gen_range(0..text.len() - 4096);
                while text[at] == b' ' || text[at] == 0 || (at > 0 && text[at - 1] != b' ' && text[at - 1] != 0) {
                    at += 1;
                }
                let passage: Vec<&str> =
                    std::str::from_utf8(&text[at..at + 4000]).unwrap_or("").split(['\0', ' ']).take(20).collect();
                answer.push(' ');
                answer.push_str(&passage.join(" "));
                words += 20;
                quoted += 1;
            } else {
                answer.push(' ');
                answer.push_str(word(&mut rng));
                words += 1;
            }
        }
        let answer = answer.trim().to_owned();
        let t = std::time::Instant::now();
        let ev = evidence(&src, &[answer.as_str()], "", &p).context("evidence")?;
        times.push(t.elapsed().as_secs_f64());
        spans += ev.spans.len();
        evidence_bytes = evidence_bytes.max(serde_json::to_vec(&ev)?.len());
    }
    times.sort_by(f64::total_cmp);
    let q = |f: f64| times[((times.len() - 1) as f64 * f).round() as usize] * 1e3;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "text_bytes": text.len(),
            "documents": ix.documents,
            "read_seconds": read_s,
            "build_seconds": build_s,
            "build_seconds_per_gib": build_s / (text.len() as f64 / f64::from(1u32 << 30)),
            "index_bytes_per_text_byte": ix.resident_bytes() as f64 / text.len() as f64,
            "answers": answers,
            "answer_words": 375,
            "spans_found": spans,
            "match_ms_p50": q(0.5),
            "match_ms_p99": q(0.99),
            "match_ms_max": q(1.0),
            "evidence_json_bytes_max": evidence_bytes,
            "params": p,
        }))?
    );
    Ok(())
}

/// One receipt from a JSON file, or from a ledger by id.
fn read_receipt(path: &std::path::Path, id: Option<&str>) -> Result<openlora::attribution::Receipt> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let Some(id) = id else {
        return serde_json::from_str(text.trim())
            .with_context(|| format!("{}: not a receipt (a ledger needs --id)", path.display()));
    };
    for line in text.lines() {
        let r: openlora::attribution::Receipt =
            serde_json::from_str(line).with_context(|| format!("{}: not a ledger", path.display()))?;
        if r.hash == id {
            return Ok(r);
        }
    }
    bail!("{}: no receipt {id}", path.display())
}

/// Checks a `--public-key` value: 32 bytes of hex, returned in the ledger's lowercase form.
fn parse_public_key(key: &str) -> Result<String> {
    let key = key.trim();
    match hex::decode(key) {
        Ok(bytes) if bytes.len() == 32 => Ok(hex::encode(bytes)),
        _ => bail!(
            "--public-key must be an Ed25519 public key as 64 hex digits (GET /v1/attribution/key serves it), got `{key}`"
        ),
    }
}
