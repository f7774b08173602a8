//! Inference records, the attribution of their price, and receipts: the record and its
//! attribution in a canonical byte encoding, chained to the previous receipt and signed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::evidence::{Evidence, evidence_weights};
use crate::adapters::manifest::{Dataset, Manifest};

/// The base model as a receipt names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelUse {
    /// The id clients use.
    pub id: String,
    /// SHA-256 of the weights file(s).
    pub sha256: String,
    /// Owner (from the deployment's base-model manifest).
    pub owner: String,
    /// Price per 1,000 tokens in micro-units.
    pub price_per_1k_tokens: u64,
}

/// One adapter that acted on a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterUse {
    /// Its name at the time.
    pub name: String,
    /// Its generation (content hash).
    pub generation: String,
    /// The weight it was applied (or merged) with.
    pub weight: f32,
    /// Owner.
    pub owner: String,
    /// Price per 1,000 tokens in micro-units.
    pub price_per_1k_tokens: u64,
    /// Datasets that trained it, with their contributors.
    pub datasets: Vec<Dataset>,
}

impl AdapterUse {
    /// Describes an adapter from its manifest.
    pub fn new(name: &str, generation: String, weight: f32, m: &Manifest) -> Self {
        Self {
            name: name.to_owned(),
            generation,
            weight,
            owner: m.owner.clone(),
            price_per_1k_tokens: m.price_per_1k_tokens,
            datasets: m.datasets.clone(),
        }
    }
}

/// A plugin that acted on a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginUse {
    /// Its name in the deployment.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Content hash of the component.
    pub version: String,
}

/// What happened in one finished request (never the text itself: hashes of it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceRecord {
    /// The response's id.
    pub request_id: String,
    /// The tenant that asked.
    pub tenant: String,
    /// When it finished (Unix milliseconds).
    pub time_ms: u64,
    /// The base model.
    pub base_model: ModelUse,
    /// The adapters, in request order.
    pub adapters: Vec<AdapterUse>,
    /// The merge recipe when the adapters were merged (`method` and parameters), else None.
    pub merge: Option<String>,
    /// Prompt tokens (per choice).
    pub prompt_tokens: u64,
    /// Generated tokens (all choices).
    pub completion_tokens: u64,
    /// Why it ended (`stop`, `length`, `cancelled`, `error`).
    pub finish_reason: String,
    /// Plugins that acted.
    pub plugins: Vec<PluginUse>,
    /// SHA-256 of the prompt token ids (little-endian u32s).
    pub prompt_sha256: String,
    /// SHA-256 of the output text (choices joined by NUL).
    pub output_sha256: String,
    /// The request's `user` (the caller's id for its own end user), when it sent one. Absent
    /// from the signed body otherwise, so receipts written before the field verify unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Verbatim-overlap evidence from the adapters' datasets (see `attribution::evidence`),
    /// when an adapter's manifest names dataset files. Absent otherwise, so older receipts
    /// verify unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
}

impl InferenceRecord {
    /// Tokens billed: prompt (once per choice is not charged twice) plus completion.
    pub fn billed_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// The price of this request in micro-units: `floor(tokens * sum of prices / 1000)`.
    pub fn total_price(&self) -> u64 {
        let per_1k: u128 = u128::from(self.base_model.price_per_1k_tokens)
            + self.adapters.iter().map(|a| u128::from(a.price_per_1k_tokens)).sum::<u128>();
        let total = u128::from(self.billed_tokens()) * per_1k / 1000;
        u64::try_from(total).unwrap_or(u64::MAX)
    }
}

/// One payment to one party.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    /// Who.
    pub party: String,
    /// Why (`base-owner`, `adapter-owner`, `dataset-contributor`, `platform`).
    pub role: String,
    /// What it pays for: the adapter, or `adapter/dataset`; empty for the base model.
    pub source: String,
    /// How much, in micro-units.
    pub micros: u64,
}

/// How a request's price was split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribution {
    /// What decided the split (`builtin` or `plugin NAME@VERSION`).
    pub attributor: String,
    /// The price charged, in micro-units.
    pub total_micros: u64,
    /// The payments; they sum exactly to `total_micros`.
    pub payments: Vec<Payment>,
}

/// Splits `total` in proportion to `weights` exactly (largest remainder: the parts sum to
/// `total`; ties go to the earlier entry). All-zero weights split equally.
pub fn split_exact(total: u64, weights: &[u128]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u128 = weights.iter().sum();
    let (weights, sum): (Vec<u128>, u128) =
        if sum == 0 { (vec![1; weights.len()], weights.len() as u128) } else { (weights.to_vec(), sum) };
    let t = u128::from(total);
    let mut parts: Vec<u64> = weights.iter().map(|w| u64::try_from(t * w / sum).unwrap_or(u64::MAX)).collect();
    let assigned: u64 = parts.iter().sum();
    let mut left = total - assigned;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest remainder first; stable, so ties keep input order.
    order.sort_by(|&a, &b| ((t * weights[b]) % sum).cmp(&((t * weights[a]) % sum)));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

/// The part of an adapter's dataset share the built-in split pays by evidence when the answer
/// has any for that adapter, in basis points (the rest goes by the manifest's declaration).
pub const BUILTIN_EVIDENCE_BPS: u64 = 5000;

/// The evidence weights of `r`: `(adapter, dataset, contributor, weight)` (see
/// [`evidence_weights`]), empty without evidence.
pub fn record_evidence_weights(r: &InferenceRecord) -> Vec<(String, String, String, u128)> {
    let Some(ev) = &r.evidence else { return Vec::new() };
    let lookup = |adapter: &str, dataset: &str| {
        r.adapters.iter().find(|a| a.name == adapter)?.datasets.iter().find(|d| d.id == dataset).cloned()
    };
    evidence_weights(ev, &lookup)
}

/// The built-in split (used without an attributor plugin, and as its fail-open fallback): the
/// price is shared between the base model and each adapter in proportion to their prices; an
/// adapter's part goes half to its owner and half to its datasets' contributors, or all to the
/// owner when it names no datasets. The datasets' half: by declaration (datasets equally,
/// contributors by share), except that when the answer has verbatim-overlap evidence from this
/// adapter's datasets, [`BUILTIN_EVIDENCE_BPS`] of it goes by evidence (each contributor by the
/// words of the spans found in their documents; a span in a document without an owner counts
/// for its dataset's contributors by share). Payments to the same party in the same role and
/// source are summed.
pub fn builtin_attribution(r: &InferenceRecord) -> Attribution {
    let total = r.total_price();
    let mut weights = vec![u128::from(r.base_model.price_per_1k_tokens)];
    weights.extend(r.adapters.iter().map(|a| u128::from(a.price_per_1k_tokens)));
    let parts = split_exact(total, &weights);
    let weights_of = record_evidence_weights(r);
    let mut payments: Vec<Payment> = Vec::new();
    let mut pay = |party: &str, role: &str, source: String, micros: u64| {
        if micros == 0 {
            return;
        }
        if let Some(p) = payments.iter_mut().find(|p| p.party == party && p.role == role && p.source == source) {
            p.micros += micros;
        } else {
            payments.push(Payment { party: party.to_owned(), role: role.to_owned(), source, micros });
        }
    };
    pay(&r.base_model.owner, "base-owner", String::new(), parts[0]);
    for (a, &part) in r.adapters.iter().zip(&parts[1..]) {
        if a.datasets.is_empty() {
            pay(&a.owner, "adapter-owner", a.name.clone(), part);
            continue;
        }
        let halves = split_exact(part, &[1, 1]);
        pay(&a.owner, "adapter-owner", a.name.clone(), halves[0]);
        let evidence: Vec<_> = weights_of.iter().filter(|w| w.0 == a.name).collect();
        let declared = if evidence.is_empty() {
            halves[1]
        } else {
            let parts =
                split_exact(halves[1], &[u128::from(10_000 - BUILTIN_EVIDENCE_BPS), u128::from(BUILTIN_EVIDENCE_BPS)]);
            let ws: Vec<u128> = evidence.iter().map(|w| w.3).collect();
            for (w, micros) in evidence.iter().zip(split_exact(parts[1], &ws)) {
                pay(&w.2, "dataset-contributor", format!("{}/{}", a.name, w.1), micros);
            }
            parts[0]
        };
        let per_dataset = split_exact(declared, &vec![1; a.datasets.len()]);
        for (d, &dpart) in a.datasets.iter().zip(&per_dataset) {
            let shares: Vec<u128> = d.contributors.iter().map(|c| u128::from(c.share)).collect();
            for (c, &cpart) in d.contributors.iter().zip(&split_exact(dpart, &shares)) {
                pay(&c.name, "dataset-contributor", format!("{}/{}", a.name, d.id), cpart);
            }
        }
    }
    Attribution { attributor: "builtin".into(), total_micros: total, payments }
}

/// What is signed: the receipt's position in the chain, the node's key, the record and its
/// attribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    /// Position in the ledger (0 first).
    pub seq: u64,
    /// Hash of the previous receipt's body (64 zeros for the first).
    pub prev: String,
    /// The signing node's Ed25519 public key, hex.
    pub node_key: String,
    /// The record.
    pub record: InferenceRecord,
    /// The split of its price.
    pub attribution: Attribution,
}

impl ReceiptBody {
    /// The canonical encoding: compact JSON, fields in declaration order.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// SHA-256 of the canonical encoding.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.canonical()).into()
    }
}

/// One ledger line: the body, its hash (the receipt id) and the node's signature of the hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// What is signed.
    pub body: ReceiptBody,
    /// SHA-256 of `body`'s canonical encoding, lowercase hex (the receipt id).
    pub hash: String,
    /// Ed25519 signature of the 32 hash bytes, lowercase hex.
    pub sig: String,
}

/// SHA-256 of little-endian token ids.
pub fn tokens_sha256(tokens: &[u32]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// SHA-256 of text.
pub fn text_sha256(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[test]
    fn exact_splits_always_sum_to_the_total() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let n = rng.gen_range(1..8);
            let total = rng.gen_range(0..1_000_000u64);
            let w: Vec<u128> = (0..n).map(|_| rng.gen_range(0..1000u128)).collect();
            let parts = split_exact(total, &w);
            assert_eq!(parts.iter().sum::<u64>(), total, "{w:?}");
        }
        assert_eq!(split_exact(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(split_exact(7, &[0, 0]), vec![4, 3]);
    }

    #[test]
    fn builtin_payments_sum_exactly_to_the_price() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..500 {
            let dataset = |rng: &mut StdRng, i: usize| Dataset {
                id: format!("d{i}"),
                sha256: "0".repeat(64),
                license: String::new(),
                files: Vec::new(),
                merkle_root: None,
                contributors: (0..rng.gen_range(1..5))
                    .map(|j| crate::adapters::manifest::Contributor {
                        name: format!("c{j}"),
                        share: rng.gen_range(1..10),
                    })
                    .collect(),
            };
            let adapters = (0..rng.gen_range(0..4))
                .map(|i| AdapterUse {
                    name: format!("a{i}"),
                    generation: String::new(),
                    weight: 1.0,
                    owner: format!("o{i}"),
                    price_per_1k_tokens: rng.gen_range(0..10_000),
                    datasets: (0..rng.gen_range(0..3)).map(|k| dataset(&mut rng, k)).collect(),
                })
                .collect();
            let r = InferenceRecord {
                request_id: String::new(),
                tenant: String::new(),
                time_ms: 0,
                base_model: ModelUse {
                    id: "m".into(),
                    sha256: String::new(),
                    owner: "base".into(),
                    price_per_1k_tokens: rng.gen_range(0..5000),
                },
                adapters,
                merge: None,
                prompt_tokens: rng.gen_range(1..4000),
                completion_tokens: rng.gen_range(0..4000),
                finish_reason: "stop".into(),
                plugins: Vec::new(),
                prompt_sha256: String::new(),
                output_sha256: String::new(),
                user: None,
                evidence: None,
            };
            let a = builtin_attribution(&r);
            assert_eq!(a.total_micros, r.total_price());
            assert_eq!(a.payments.iter().map(|p| p.micros).sum::<u64>(), a.total_micros);
        }
    }
}
