//! revenue-split: splits a request's price among the base model, the adapters' owners and
//! their dataset contributors, by the catalog's manifest shares, exactly.
//!
//! Configuration:
//!
//! ```toml
//! [plugins.config]
//! base_model_bps = 3000          # the base model's part of the price, in basis points (default 3000)
//! base_model_payee = "meta"      # default: "base:<base model name>"
//! platform_bps = 500             # the platform's cut (default 0)
//! platform_payee = "openlora"    # default: "platform"
//! ```
//!
//! What is left after the base model and the platform goes to the adapters in proportion to
//! their weights; each adapter's part goes to its dataset contributors by their `share-bps`
//! and the rest to its owner. Every payee's exact share is a rational number; the parts are
//! the floors of those shares plus one micro for the largest remainders (largest-remainder
//! method), so the payments sum to the price to the micro. A request without adapters pays
//! the base model and the platform only.

use openlora_plugin_sdk::attributor::{Attributor, InferenceRecord, PayeeRole, Payment, split_exact};
use openlora_plugin_sdk::{catalog, config, export_attributor};

const BPS: u128 = 10_000;
/// Adapter weights are f32; they are counted in millionths so the split is integer math.
const WEIGHT_SCALE: f32 = 1_000_000.0;

struct RevenueSplit;

fn bps(key: &str, default: u32) -> Result<u128, String> {
    let value = config::get(key)
        .map_or(Ok(default), |v| v.parse::<u32>().map_err(|_| format!("{key} = `{v}` is not an integer")))?;
    if value > 10_000 {
        return Err(format!("{key} = {value} is more than 10000 basis points"));
    }
    Ok(u128::from(value))
}

impl Attributor for RevenueSplit {
    fn attribute(record: InferenceRecord) -> Result<Vec<Payment>, String> {
        let base_bps = bps("base_model_bps", 3000)?;
        let platform_bps = bps("platform_bps", 0)?;
        if base_bps + platform_bps > BPS {
            return Err("base_model_bps + platform_bps exceed 10000".to_owned());
        }
        let base_payee = config::get("base_model_payee").unwrap_or_else(|| format!("base:{}", record.base_model));
        let platform_payee = config::get("platform_payee").unwrap_or_else(|| "platform".to_owned());

        // Integer weights of the adapters (equal if they are all zero).
        let mut adapter_weights: Vec<u128> =
            record.adapters.iter().map(|a| (a.weight.max(0.0) * WEIGHT_SCALE).round() as u128).collect();
        if adapter_weights.iter().all(|w| *w == 0) {
            adapter_weights.iter_mut().for_each(|w| *w = 1);
        }
        let total_weight: u128 = adapter_weights.iter().sum();
        let adapters_bps = if record.adapters.is_empty() { 0 } else { BPS - base_bps - platform_bps };
        // Without adapters the base model takes the adapters' part too.
        let base_bps = BPS - platform_bps - adapters_bps;

        // Every party's share of the price is numerator / (BPS * total_weight * BPS).
        let mut lines: Vec<(Payment, u128)> = Vec::new();
        let unit = total_weight.max(1) * BPS;
        let mut push = |payee: String, role: PayeeRole, source: String, numerator: u128| {
            if numerator > 0 {
                lines.push((Payment { payee, role, source, micros: 0 }, numerator));
            }
        };
        push(base_payee, PayeeRole::BaseModel, String::new(), base_bps * unit);
        push(platform_payee, PayeeRole::Platform, String::new(), platform_bps * unit);
        for (choice, weight) in record.adapters.iter().zip(&adapter_weights) {
            let facts = catalog::adapter(&choice.name)
                .ok_or_else(|| format!("adapter `{}` is not in the catalog", choice.name))?;
            let datasets_bps: u128 = facts.datasets.iter().map(|d| u128::from(d.share_bps)).sum();
            if datasets_bps > BPS {
                return Err(format!("adapter `{}`: dataset shares exceed 10000 basis points", facts.name));
            }
            let adapter_part = adapters_bps * weight;
            push(facts.owner.clone(), PayeeRole::AdapterOwner, facts.name.clone(), adapter_part * (BPS - datasets_bps));
            for dataset in &facts.datasets {
                push(
                    dataset.contributor.clone(),
                    PayeeRole::DatasetContributor,
                    format!("{}/{}", facts.name, dataset.name),
                    adapter_part * u128::from(dataset.share_bps),
                );
            }
        }

        let weights: Vec<u128> = lines.iter().map(|(_, n)| *n).collect();
        let parts = split_exact(record.price_micros, &weights).ok_or("the split overflows")?;
        Ok(lines
            .into_iter()
            .zip(parts)
            .map(|((mut payment, _), micros)| {
                payment.micros = micros;
                payment
            })
            .collect())
    }
}

export_attributor!(RevenueSplit);
