//! `openlora ledger`: verify a receipt ledger, or export it with per-party totals.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Check every receipt's signature, hash and chain link; names the first bad entry.
    Verify {
        /// The ledger file (STATE_DIR/ledger.jsonl).
        path: PathBuf,
        /// Require this signer (hex Ed25519 public key, as GET /v1/attribution/key serves it).
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Write the receipts as JSON lines and print per-party totals (JSON) on stdout.
    Export {
        /// The ledger file.
        path: PathBuf,
        /// Where to write the receipts (JSON lines).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(c: LedgerCommand) -> Result<()> {
    use openlora::attribution::{totals, verify_file};
    match c {
        LedgerCommand::Verify { path, public_key } => {
            let v = verify_file(&path, public_key.as_deref())?;
            if let Some(e) = v.error {
                bail!("{}: {e} ({} entries before it verified)", path.display(), v.receipts.len());
            }
            let key = v.receipts.first().map_or("-", |r| r.body.node_key.as_str());
            println!("ok: {} receipts, one unbroken chain, all signed by {key}", v.receipts.len());
            Ok(())
        }
        LedgerCommand::Export { path, out } => {
            let v = verify_file(&path, None)?;
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
