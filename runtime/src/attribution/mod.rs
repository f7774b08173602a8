//! Attribution: an inference record for every finished request, receipts
//! that add the split of its price, signed with the node's Ed25519 key and chained by hash, in
//! a durable, tamper-evident ledger. The manifests that say who owns an adapter and
//! what it was trained on live beside the adapters (`adapters::manifest`).

pub mod evidence;
pub mod index;
pub mod ledger;
pub mod receipt;

pub use ledger::{Ledger, LedgerError, load_or_create_key, verify_file, verify_receipt};
pub use receipt::{Attribution, InferenceRecord, Payment, Receipt, builtin_attribution};

/// Per-party totals over receipts: `(party, role) -> micro-units`, sorted.
pub fn totals(receipts: &[Receipt]) -> Vec<(String, String, u64)> {
    let mut m: std::collections::BTreeMap<(String, String), u64> = std::collections::BTreeMap::new();
    for r in receipts {
        for p in &r.body.attribution.payments {
            *m.entry((p.party.clone(), p.role.clone())).or_default() += p.micros;
        }
    }
    m.into_iter().map(|((p, r), v)| (p, r, v)).collect()
}
