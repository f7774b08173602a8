//! recipe-merger: picks TIES or a linear merge from the request's metadata.
//!
//! The request's `merge` metadata key chooses: `ties` or `linear`. Without it, two adapters
//! merge linearly (cheap, exact for compatible adapters) and three or more with TIES (which
//! resolves sign conflicts between many task vectors). Any other value is refused.
//!
//! Configuration:
//!
//! ```toml
//! [plugins.config]
//! density = 0.5            # fraction TIES keeps (default 0.5); metadata `merge-density` overrides
//! majority_sign = "total"  # or "frequency"
//! normalize = true         # scale the weights to sum to 1 (default false)
//! ```

use openlora_plugin_sdk::merger::{MajoritySign, MergeMethod, MergeRecipe, MergeRequest, Merger};
use openlora_plugin_sdk::{config, export_merger, metadata_get};

struct RecipeMerger;

impl Merger for RecipeMerger {
    fn merge(request: MergeRequest) -> Result<MergeRecipe, String> {
        if request.adapters.is_empty() {
            return Err("nothing to merge".to_owned());
        }
        let method = match metadata_get(&request.metadata, "merge") {
            Some("ties") => MergeMethod::Ties,
            Some("linear") => MergeMethod::Linear,
            Some(other) => return Err(format!("unknown merge `{other}` (ties, linear)")),
            None if request.adapters.len() >= 3 => MergeMethod::Ties,
            None => MergeMethod::Linear,
        };
        let mut weights: Vec<f32> = request.adapters.iter().map(|a| a.weight).collect();
        if config::get("normalize").as_deref() == Some("true") {
            let sum: f32 = weights.iter().sum();
            if sum == 0.0 {
                return Err("weights sum to zero".to_owned());
            }
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        let density = match method {
            MergeMethod::Ties => {
                let text = metadata_get(&request.metadata, "merge-density")
                    .map(str::to_owned)
                    .or_else(|| config::get("density"))
                    .unwrap_or_else(|| "0.5".to_owned());
                let density: f32 = text.parse().map_err(|_| format!("density `{text}` is not a number"))?;
                if !(density > 0.0 && density <= 1.0) {
                    return Err(format!("density {density} is not in (0, 1]"));
                }
                Some(density)
            }
            _ => None,
        };
        let majority_sign = match config::get("majority_sign").as_deref() {
            Some("frequency") => MajoritySign::Frequency,
            _ => MajoritySign::Total,
        };
        Ok(MergeRecipe { method, weights, density, majority_sign, layer_overrides: Vec::new() })
    }
}

export_merger!(RecipeMerger);

#[cfg(test)]
mod tests;
