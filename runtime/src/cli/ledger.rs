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
