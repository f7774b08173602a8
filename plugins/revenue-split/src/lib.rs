//! revenue-split: splits a request's price among the base model's owner, the adapters'
//! owners and their datasets' contributors, by the manifests, exactly.
//!
//! Configuration:
//!
//! ```toml
//! [plugins.config]
//! platform_bps = 500            # the platform's cut first, in basis points (default 0)
//! platform_party = "openlora"   # default "platform"
//! base_model_bps = 3000         # the base model's fixed part of the rest (default: by prices)
//! dataset_bps = 5000            # the part of an adapter's share owed to its datasets (default 5000)
//! evidence_bps = 5000           # the part of the datasets' share paid by evidence (default 5000)
//! ```
//!
//! The split, level by level:
//! 1. the platform's cut, if any;
//! 2. the rest between the base model and the adapters in proportion to their manifest
//!    prices (`price_per_1k_tokens`; all free: equal parts), or, with `base_model_bps`, that
//!    fixed part to the base model and the remainder among the adapters by price;
//! 3. an adapter's part: `dataset_bps` to its datasets (all of it to the owner when the
//!    manifest names none), the rest to its owner;
//! 4. the datasets' part: when the answer has verbatim-overlap evidence from this adapter's
//!    datasets, `evidence_bps` of it by evidence (each contributor by its evidence weight:
//!    the words of the answer found in their documents), and the rest by declaration; without
//!    evidence (none found, or a host older than ABI 0.1.1) all of it by declaration;
//! 5. by declaration: equally per dataset, then among its contributors by their `share`.
//!
//! The blend keeps a declared floor (data that shaped the adapter without being quoted still
//! earns) while an answer that repeats a contributor's documents verbatim pays that
//! contributor more. Evidence is overlap, not influence: paraphrase earns nothing extra.
//!
//! Every level is a largest-remainder split (floors, then the left-over micros to the largest
//! fractional remainders, ties to the earlier party), so the payments sum to the price to the
//! micro, and the same record always gives the same payments.

use openlora_plugin_sdk::attributor::{Attributor, EvidenceShare, InferenceRecord, PayeeRole, Payment, split_exact};
use openlora_plugin_sdk::{config, export_attributor};

const BPS: u64 = 10_000;

struct RevenueSplit;

fn bps(key: &str) -> Result<Option<u64>, String> {
    let Some(text) = config::get(key) else { return Ok(None) };
    match text.parse::<u64>() {
        Ok(value) if value <= BPS => Ok(Some(value)),
        _ => Err(format!("{key} = `{text}` is not a whole number of basis points (0..=10000)")),
    }
}

/// `split_exact` with equal parts when every weight is zero.
fn split(total: u64, weights: &[u128]) -> Result<Vec<u64>, String> {
    if weights.iter().all(|w| *w == 0) {
        return split_exact(total, &vec![1; weights.len()]).ok_or_else(|| "nothing to split among".to_owned());
    }
    split_exact(total, weights).ok_or_else(|| "the split overflows".to_owned())
}

impl Attributor for RevenueSplit {
    fn attribute(record: InferenceRecord) -> Result<Vec<Payment>, String> {
        Self::attribute_with_evidence(record, Vec::new())
    }

    fn attribute_with_evidence(record: InferenceRecord, evidence: Vec<EvidenceShare>) -> Result<Vec<Payment>, String> {
        let mut payments = Vec::new();
        let mut pay = |party: &str, role: PayeeRole, source: String, micros: u64| {
            if micros > 0 {
                payments.push(Payment { party: party.to_owned(), role, source, micros });
            }
        };

        // 1. The platform's cut.
        let platform_bps = bps("platform_bps")?.unwrap_or(0);
        let cut = split(record.price_micros, &[u128::from(platform_bps), u128::from(BPS - platform_bps)])?;
        let platform_party = config::get("platform_party").unwrap_or_else(|| "platform".to_owned());
        pay(&platform_party, PayeeRole::Platform, String::new(), cut[0]);

        // 2. Base model and adapters.
        let prices: Vec<u128> = record.adapters.iter().map(|a| u128::from(a.price_per_1k_tokens)).collect();
        let weights: Vec<u128> = match bps("base_model_bps")? {
            Some(base_bps) if !prices.is_empty() => {
                // Adapters share the rest by price (equally when all are free).
                let free = prices.iter().all(|p| *p == 0);
                let prices: Vec<u128> = if free { vec![1; prices.len()] } else { prices };
                let sum: u128 = prices.iter().sum();
                std::iter::once(u128::from(base_bps) * sum)
                    .chain(prices.iter().map(|p| u128::from(BPS - base_bps) * p))
                    .collect()
            }
            _ => std::iter::once(u128::from(record.base_model.price_per_1k_tokens)).chain(prices).collect(),
        };
        let parts = split(cut[1], &weights)?;
        pay(&record.base_model.owner, PayeeRole::BaseOwner, String::new(), parts[0]);

        // 3. to 5. Each adapter's part: owner, datasets (by evidence, then by declaration).
        let dataset_bps = bps("dataset_bps")?.unwrap_or(5000);
        let evidence_bps = bps("evidence_bps")?.unwrap_or(5000);
        for (adapter, &part) in record.adapters.iter().zip(&parts[1..]) {
            if adapter.datasets.is_empty() {
                pay(&adapter.owner, PayeeRole::AdapterOwner, adapter.name.clone(), part);
                continue;
            }
            let halves = split(part, &[u128::from(BPS - dataset_bps), u128::from(dataset_bps)])?;
            pay(&adapter.owner, PayeeRole::AdapterOwner, adapter.name.clone(), halves[0]);
            let found: Vec<&EvidenceShare> =
                evidence.iter().filter(|e| e.adapter == adapter.name && e.weight > 0).collect();
            let declared = if found.is_empty() {
                halves[1]
            } else {
                let parts = split(halves[1], &[u128::from(BPS - evidence_bps), u128::from(evidence_bps)])?;
                let weights: Vec<u128> = found.iter().map(|e| u128::from(e.weight)).collect();
                for (e, micros) in found.iter().zip(split(parts[1], &weights)?) {
                    let source = format!("{}/{}", adapter.name, e.dataset);
                    pay(&e.contributor, PayeeRole::DatasetContributor, source, micros);
                }
                parts[0]
            };
            let per_dataset = split(declared, &vec![1; adapter.datasets.len()])?;
            for (dataset, &dataset_part) in adapter.datasets.iter().zip(&per_dataset) {
                if dataset.contributors.is_empty() {
                    // Nobody to pay for this dataset: the owner keeps its part.
                    pay(&adapter.owner, PayeeRole::AdapterOwner, adapter.name.clone(), dataset_part);
                    continue;
                }
                let shares: Vec<u128> = dataset.contributors.iter().map(|c| u128::from(c.share)).collect();
                for (contributor, micros) in dataset.contributors.iter().zip(split(dataset_part, &shares)?) {
                    let source = format!("{}/{}", adapter.name, dataset.id);
                    pay(&contributor.name, PayeeRole::DatasetContributor, source, micros);
                }
            }
        }
        Ok(payments)
    }
}

export_attributor!(RevenueSplit);

#[cfg(test)]
mod tests;
