//! Materialized merges of several adapters into one, matching PEFT's `add_weighted_adapter`.
//!
//! Composition at request time (several adapters applied together, each with a weight) needs
//! no merge: the forward pass adds every adapter's term. A *materialized* merge builds a new
//! adapter whose weights combine the inputs; it is a derived adapter like any other, identified
//! by the hash of its recipe and its inputs' generations, so the same recipe is built once.
//!
//! Semantics (PEFT 0.21, `LoraModel.add_weighted_adapter`):
//! - The merged adapter has `r = lora_alpha = new_rank`, so its scale is 1 (or `sqrt(new_rank)`
//!   when the first input uses rsLoRA, which PEFT carries over). `new_rank` is the inputs'
//!   common rank for `linear`/`ties`/`dare_*`/`magnitude_prune`, their sum for `cat`, and
//!   `svd_rank` (default: the largest input rank) for the `*svd` methods. Each input's rank is
//!   its config `r`, or the largest `rank_pattern` value.
//! - It targets the union of the inputs' modules; per module, inputs lacking it are skipped.
//! - `cat`: `A = concat_rows(w_i * scale_i * A_i)`, `B = concat_cols(B_i)`.
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the method combines the A
//!   matrices and the B matrices separately, with per-input weights `sign(w s) sqrt(|w s|)` for A
//!   and `sqrt(|w s|)` for B (`s` the input's scale).
//! - `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the method
//!   combines the dense updates `scale_i B_i A_i`, then the result is factored by a truncated SVD:
//!   `B = U_r S_r`, `A = V_rᵀ`.
//! - Methods on tensors: task arithmetic `sum w_i t_i`; magnitude pruning keeps the
//!   `int(density * n)` entries of largest magnitude of each input; TIES prunes by magnitude,
//!   elects a sign per entry (`total`: sign of the sum of the pruned inputs; `frequency`: of the
//!   sum of their signs; ties go to +), and averages the weighted entries that agree with it; DARE
//!   drops entries at random with probability `1 - density` and rescales the rest by
//!   `1 / density`. `density >= 1` prunes nothing.
//!
//! Where we differ: DARE's random mask comes from a seeded `StdRng` (the recipe's `seed`), not
//! torch's generator, so DARE merges are reproducible here but not bit-identical to PEFT's. The
//! truncated SVD is computed from the eigen-decomposition of the Gram matrix in f64 (the top
//! singular triplets agree with `torch.linalg.svd` to within f32 rounding; signs may differ,
//! which does not change `B·A`). PEFT's `svd_clamp` is not implemented.

use openlora_kernels::DType;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

use super::peft::{AdapterError, LoraHost, LoraModuleHost};
use super::{Generation, Proj};

/// A merge method (PEFT's `combination_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMethod {
    /// Weighted sum of A's and of B's (equal ranks).
    Linear,
    /// Concatenation (exact).
    Cat,
    /// Truncated SVD of the weighted sum of updates.
    Svd,
    /// TIES on A's and B's.
    Ties,
    /// TIES on the updates, then SVD.
    TiesSvd,
    /// DARE on A's and B's.
    DareLinear,
    /// DARE then TIES sign election on A's and B's.
    DareTies,
    /// DARE on the updates, then SVD.
    DareLinearSvd,
    /// DARE + TIES on the updates, then SVD.
    DareTiesSvd,
    /// Magnitude pruning on A's and B's.
    MagnitudePrune,
    /// Magnitude pruning on the updates, then SVD.
    MagnitudePruneSvd,
}

impl MergeMethod {
    /// Parses PEFT's spelling.
    pub fn parse(s: &str) -> Result<Self, AdapterError> {
        Ok(match s {
            "linear" => Self::Linear,
            "cat" => Self::Cat,
            "svd" => Self::Svd,
            "ties" => Self::Ties,
            "ties_svd" => Self::TiesSvd,
            "dare_linear" => Self::DareLinear,
            "dare_ties" => Self::DareTies,
            "dare_linear_svd" => Self::DareLinearSvd,
            "dare_ties_svd" => Self::DareTiesSvd,
            "magnitude_prune" => Self::MagnitudePrune,
            "magnitude_prune_svd" => Self::MagnitudePruneSvd,
            other => {
                return Err(AdapterError::Merge(format!(
                    "unknown method `{other}` (linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)"
                )));
            }
        })
    }

    /// PEFT's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Svd => "svd",
            Self::Ties => "ties",
            Self::TiesSvd => "ties_svd",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    fn is_svd(self) -> bool {
        matches!(self, Self::Svd | Self::TiesSvd | Self::DareLinearSvd | Self::DareTiesSvd | Self::MagnitudePruneSvd)
    }

    /// The tensor combination applied (to A/B or to updates).
    fn tensor_op(self) -> TensorOp {
        match self {
            Self::Linear | Self::Svd | Self::Cat => TensorOp::Sum,
            Self::Ties | Self::TiesSvd => TensorOp::Ties,
            Self::DareLinear | Self::DareLinearSvd => TensorOp::Dare,
            Self::DareTies | Self::DareTiesSvd => TensorOp::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => TensorOp::Magnitude,
        }
    }
}

#[derive(Clone, Copy)]
enum TensorOp {
    Sum,
    Ties,
    Dare,
    DareTies,
    Magnitude,
}

/// How TIES elects the sign of each entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// Sign of the sum of the inputs.
    Total,
    /// Sign of the sum of the inputs' signs.
    Frequency,
}

/// A merge recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeRecipe {
    /// The method.
    pub method: MergeMethod,
    /// One weight per input adapter.
    pub weights: Vec<f32>,
    /// Fraction of entries kept by pruning methods (PEFT's default is 1: keep all).
    pub density: f64,
    /// TIES sign election.
    pub majority_sign: MajoritySign,
    /// Rank of the result of `*svd` methods (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random mask.
    pub seed: u64,
}

impl MergeRecipe {
    /// A recipe with PEFT's defaults for everything but method and weights.
    pub fn new(method: MergeMethod, weights: Vec<f32>) -> Self {
        Self { method, weights, density: 1.0, majority_sign: MajoritySign::Total, svd_rank: None, seed: 0 }
    }

    /// The derived adapter's identity: a hash of the recipe and the inputs' generations.
    pub fn generation(&self, inputs: &[&LoraHost]) -> Generation {
        let gens: Vec<Generation> = inputs.iter().map(|i| i.generation).collect();
        self.generation_of(&gens)
    }

    /// [`Self::generation`] from the inputs' generations alone (no weights needed).
    pub fn generation_of(&self, inputs: &[Generation]) -> Generation {
        let mut h = Sha256::new();
        h.update(b"openlora-merge-v1\0");
        h.update(self.method.name().as_bytes());
        for w in &self.weights {
            h.update(w.to_le_bytes());
        }
        h.update(self.density.to_le_bytes());
        h.update([u8::from(self.majority_sign == MajoritySign::Frequency)]);
        h.update((self.svd_rank.unwrap_or(0) as u64).to_le_bytes());
        h.update(self.seed.to_le_bytes());
        for g in inputs {
            h.update(g.0);
        }
        Generation(h.finalize().into())
    }
}

fn err(msg: impl Into<String>) -> AdapterError {
    AdapterError::Merge(msg.into())
}

/// Builds the merged adapter `name` from `inputs` (at least one) by `recipe`.
pub fn merge(name: &str, inputs: &[&LoraHost], recipe: &MergeRecipe) -> Result<LoraHost, AdapterError> {
    let Some(first) = inputs.first() else {
        return Err(err("no adapters to merge"));
    };
    if recipe.weights.len() != inputs.len() {
        return Err(err(format!("{} weights for {} adapters", recipe.weights.len(), inputs.len())));
    }
    if let Some(w) = recipe.weights.iter().find(|w| !w.is_finite()) {
        return Err(err(format!("weight {w} is not finite")));
    }
    if !(recipe.density.is_finite() && recipe.density >= 0.0) {
        return Err(err(format!("density {} must be >= 0", recipe.density)));
    }
    let layers = first.layers.len();
    if inputs.iter().any(|i| i.layers.len() != layers) {
        return Err(err("the adapters are for bases with different layer counts"));
    }
    // PEFT merges a single adapter linearly, whatever the method.
    let method = if inputs.len() == 1 { MergeMethod::Linear } else { recipe.method };
    let ranks: Vec<usize> = inputs.iter().map(|i| i.config_rank).collect();
    let new_rank = match method {
        MergeMethod::Cat => ranks.iter().sum(),
        m if m.is_svd() => recipe.svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
        _ => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(err(format!("`{}` needs adapters of equal rank, got {ranks:?}", method.name())));
            }
            ranks[0]
        }
    };
    if new_rank == 0 {
        return Err(err("the merged rank would be 0"));
    }
    let scale = if first.use_rslora { (new_rank as f32).sqrt() } else { 1.0 };
    let mut rng = StdRng::seed_from_u64(recipe.seed);
    let mut merge_module =
        |mods: Vec<(&LoraModuleHost, f32)>, what: &str| -> Result<Option<LoraModuleHost>, AdapterError> {
            if mods.is_empty() {
                return Ok(None);
            }
            merge_one(method, recipe, &mods, new_rank, scale, &mut rng).map(Some).map_err(|e| match e {
                AdapterError::Merge(m) => err(format!("{what}: {m}")),
                e => e,
            })
        };
    let mut out_layers = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut mods: [Option<LoraModuleHost>; 7] = Default::default();
        for p in Proj::ALL {
            let present: Vec<(&LoraModuleHost, f32)> = inputs
                .iter()
                .zip(&recipe.weights)
                .filter_map(|(i, &w)| i.layers[l][p.index()].as_ref().map(|m| (m, w)))
                .collect();
            mods[p.index()] = merge_module(present, &format!("model.layers.{l}.{}", p.path()))?;
        }
        out_layers.push(mods);
    }
    let head: Vec<(&LoraModuleHost, f32)> =
        inputs.iter().zip(&recipe.weights).filter_map(|(i, &w)| i.lm_head.as_ref().map(|m| (m, w))).collect();
    let lm_head = merge_module(head, "lm_head")?;
    Ok(LoraHost {
        name: name.to_owned(),
        generation: recipe.generation(inputs),
        layers: out_layers,
        lm_head,
        use_rslora: first.use_rslora,
        config_rank: new_rank,
    })
}

fn merge_one(
    method: MergeMethod,
    recipe: &MergeRecipe,
    mods: &[(&LoraModuleHost, f32)],
    new_rank: usize,
    scale: f32,
    rng: &mut StdRng,
) -> Result<LoraModuleHost, AdapterError> {
    let (in_dim, out_dim) = (mods[0].0.in_dim, mods[0].0.out_dim);
    if mods.iter().any(|(m, _)| m.in_dim != in_dim || m.out_dim != out_dim) {
        return Err(err("the adapters disagree on this module's shape"));
    }
    let alpha = new_rank as f32;
    if method == MergeMethod::Cat {
        let rank: usize = mods.iter().map(|(m, _)| m.rank).sum();
        let mut a = Vec::with_capacity(rank * in_dim);
        for (m, w) in mods {
            a.extend(m.a.iter().map(|v| v * w * m.scale));
        }
        let mut b = vec![0f32; out_dim * rank];
        let mut col = 0;
        for (m, _) in mods {
            for o in 0..out_dim {
                b[o * rank + col..o * rank + col + m.rank].copy_from_slice(&m.b[o * m.rank..(o + 1) * m.rank]);
            }
            col += m.rank;
        }
        return Ok(LoraModuleHost { rank, in_dim, out_dim, alpha, scale, a, b, dtype: DType::F32 });
    }
    let op = method.tensor_op();
    if method == MergeMethod::Svd {
        // A weighted sum of low-rank updates is low rank: factor it without the dense matrix.
        let (a, b, rank) = low_rank_svd(mods, out_dim, in_dim, new_rank);
        return Ok(LoraModuleHost { rank, in_dim, out_dim, alpha, scale, a, b, dtype: DType::F32 });
    }
    if method.is_svd() {
        let deltas: Vec<Vec<f32>> = mods.iter().map(|(m, _)| m.delta()).collect();
        let weights: Vec<f32> = mods.iter().map(|(_, w)| *w).collect();
        let combined = combine(op, &deltas, &weights, recipe, rng);
        let (a, b, rank) = truncated_svd(&combined, out_dim, in_dim, new_rank);
        return Ok(LoraModuleHost { rank, in_dim, out_dim, alpha, scale, a, b, dtype: DType::F32 });
    }
    let rank = mods[0].0.rank;
    if mods.iter().any(|(m, _)| m.rank != rank) {
        return Err(err(format!("`{}` needs equal ranks per module", method.name())));
    }
    let ws: Vec<f32> = mods.iter().map(|(m, w)| w * m.scale).collect();
    let wa: Vec<f32> = ws.iter().map(|v| v.abs().sqrt() * if *v >= 0.0 { 1.0 } else { -1.0 }).collect();
    let wb: Vec<f32> = ws.iter().map(|v| v.abs().sqrt()).collect();
    let a_in: Vec<Vec<f32>> = mods.iter().map(|(m, _)| m.a.clone()).collect();
    let b_in: Vec<Vec<f32>> = mods.iter().map(|(m, _)| m.b.clone()).collect();
    let a = combine(op, &a_in, &wa, recipe, rng);
    let b = combine(op, &b_in, &wb, recipe, rng);
    Ok(LoraModuleHost { rank, in_dim, out_dim, alpha, scale, a, b, dtype: DType::F32 })
}

/// Keeps the `int(density * n)` largest-magnitude entries.
fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    let mut out = vec![0f32; t.len()];
    for &i in &idx[..k] {
        out[i] = t[i];
    }
    out
}

/// Drops entries with probability `1 - density`, rescaling the rest.
fn random_prune(t: &[f32], density: f64, rng: &mut StdRng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    t.iter().map(|&v| if rng.r#gen::<f64>() < density { (f64::from(v) / density) as f32 } else { 0.0 }).collect()
}

fn combine(op: TensorOp, tensors: &[Vec<f32>], weights: &[f32], recipe: &MergeRecipe, rng: &mut StdRng) -> Vec<f32> {
    let pruned: Vec<Vec<f32>> = match op {
        TensorOp::Sum => tensors.to_vec(),
        TensorOp::Ties | TensorOp::Magnitude => tensors.iter().map(|t| magnitude_prune(t, recipe.density)).collect(),
        TensorOp::Dare | TensorOp::DareTies => tensors.iter().map(|t| random_prune(t, recipe.density, rng)).collect(),
    };
    let n = pruned[0].len();
    let mut out = vec![0f32; n];
    match op {
        TensorOp::Sum | TensorOp::Dare | TensorOp::Magnitude => {
            for (t, w) in pruned.iter().zip(weights) {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v * w;
                }
            }
        }
        TensorOp::Ties | TensorOp::DareTies => {
            for (j, o) in out.iter_mut().enumerate() {
                let elect: f32 = match recipe.majority_sign {
                    MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
                };
                let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut count) = (0f32, 0f32);
                for (t, w) in pruned.iter().zip(weights) {
                    if sign(t[j]) == majority {
                        sum += t[j] * w;
                        count += 1.0;
                    }
                }
                *o = sum / count.max(1.0);
            }
        }
    }
    out
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The truncated SVD of `Σ w_i s_i B_i A_i` without forming it: with `Bc = [w_i s_i B_i]`
/// (`out x R`) and `Ac = [A_i]` (`R x in`), `R = Σ r_i`, QR both (`Bc = Qb Rb`, `Acᵀ = Qa Ra`), so
/// the update is `Qb (Rb Raᵀ) Qaᵀ`, and the SVD of the small core `Rb Raᵀ = U S Vᵀ` gives
/// `B = Qb U_r S_r`, `A = (Qa V_r)ᵀ`. Exact, in f64, and `O((out + in) R² + R³)` instead of the
/// dense route's `O(out·in² + in³)`: the cost is bounded by the ranks, which
/// `server.max_merged_rank` and `max_adapters_per_request` bound.
fn low_rank_svd(
    mods: &[(&LoraModuleHost, f32)],
    out_dim: usize,
    in_dim: usize,
    rank: usize,
) -> (Vec<f32>, Vec<f32>, usize) {
    let total: usize = mods.iter().map(|(m, _)| m.rank).sum();
    let mut bc = nalgebra::DMatrix::<f64>::zeros(out_dim, total);
    let mut act = nalgebra::DMatrix::<f64>::zeros(in_dim, total);
    let mut col = 0;
    for (m, w) in mods {
        let f = f64::from(*w) * f64::from(m.scale);
        for r in 0..m.rank {
            for o in 0..out_dim {
                bc[(o, col + r)] = f * f64::from(m.b[o * m.rank + r]);
            }
            for j in 0..in_dim {
                act[(j, col + r)] = f64::from(m.a[r * in_dim + j]);
            }
        }
        col += m.rank;
    }
    let (qb, rb) = bc.qr().unpack();
    let (qa, ra) = act.qr().unpack();
    let core = &rb * ra.transpose();
    let svd = core.svd(true, true);
    let (Some(u), Some(vt)) = (svd.u, svd.v_t) else { unreachable!("both factors were asked for") };
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let r = rank.min(order.len()).min(out_dim).min(in_dim);
    let mut a = vec![0f32; r * in_dim];
    let mut b = vec![0f32; out_dim * r];
    for (k, &e) in order.iter().take(r).enumerate() {
        let left = &qb * (u.column(e) * svd.singular_values[e]);
        let right = &qa * vt.row(e).transpose();
        for i in 0..out_dim {
            b[i * r + k] = left[i] as f32;
        }
        for j in 0..in_dim {
            a[k * in_dim + j] = right[j] as f32;
        }
    }
    (a, b, r)
}

/// Factors `d` (`out x in`, row-major) as `B·A` with `B = U_r S_r` (`out x r`) and `A = V_rᵀ`
/// (`r x in`) from the top-`r` eigenpairs of `dᵀd`, in f64. Returns `(A, B, r)`; `r` is capped
/// at `min(out, in)`.
fn truncated_svd(d: &[f32], out_dim: usize, in_dim: usize, rank: usize) -> (Vec<f32>, Vec<f32>, usize) {
    let r = rank.min(out_dim).min(in_dim);
    let dm = nalgebra::DMatrix::<f64>::from_fn(out_dim, in_dim, |i, j| f64::from(d[i * in_dim + j]));
    let gram = dm.transpose() * &dm;
    let eig = nalgebra::SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..in_dim).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let mut a = vec![0f32; r * in_dim];
    let mut b = vec![0f32; out_dim * r];
    for (k, &e) in order.iter().take(r).enumerate() {
        let v = eig.eigenvectors.column(e);
        for j in 0..in_dim {
            a[k * in_dim + j] = v[j] as f32;
        }
        let u = &dm * v;
        for i in 0..out_dim {
            b[i * r + k] = u[i] as f32;
        }
    }
    (a, b, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(rank: usize, seed: u64) -> LoraModuleHost {
        let mut rng = StdRng::seed_from_u64(seed);
        let (in_dim, out_dim) = (6, 5);
        LoraModuleHost {
            rank,
            in_dim,
            out_dim,
            alpha: 2.0 * rank as f32,
            scale: 2.0,
            a: (0..rank * in_dim).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            b: (0..out_dim * rank).map(|_| rng.gen_range(-1.0..1.0)).collect(),
            dtype: DType::F32,
        }
    }

    fn host(m: LoraModuleHost, seed: u8) -> LoraHost {
        let mut layer: [Option<LoraModuleHost>; 7] = Default::default();
        let rank = m.rank;
        layer[0] = Some(m);
        LoraHost {
            name: "x".into(),
            generation: Generation([seed; 32]),
            layers: vec![layer],
            lm_head: None,
            use_rslora: false,
            config_rank: rank,
        }
    }

    fn dense(h: &LoraHost) -> Vec<f32> {
        h.layers[0][0].as_ref().expect("module").delta()
    }

    #[test]
    fn cat_and_full_rank_svd_are_exact_weighted_sums() {
        let (x, y) = (host(module(2, 1), 1), host(module(3, 2), 2));
        let want: Vec<f32> = dense(&x).iter().zip(dense(&y)).map(|(a, b)| 0.7 * a + 0.5 * b).collect();
        for (method, svd_rank) in [(MergeMethod::Cat, None), (MergeMethod::Svd, Some(5))] {
            let recipe = MergeRecipe { svd_rank, ..MergeRecipe::new(method, vec![0.7, 0.5]) };
            let m = merge("m", &[&x, &y], &recipe).expect("merge");
            for (g, w) in dense(&m).iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{method:?}: {g} vs {w}");
            }
        }
    }

    /// The low-rank route of `svd` gives the dense route's truncation (same `B·A`), and a rank
    /// above the update's own stops at the update's rank.
    #[test]
    fn svd_without_the_dense_update_matches_the_dense_truncation() {
        let (x, y) = (module(2, 3), module(3, 4));
        let mods = [(&x, 0.7f32), (&y, -0.4f32)];
        let d: Vec<f32> = x.delta().iter().zip(y.delta()).map(|(a, b)| 0.7 * a - 0.4 * b).collect();
        let product = |a: &[f32], b: &[f32], r: usize| -> Vec<f32> {
            (0..5 * 6).map(|k| (0..r).map(|j| b[(k / 6) * r + j] * a[j * 6 + k % 6]).sum()).collect()
        };
        for rank in [1, 3, 5] {
            let (a, b, r) = low_rank_svd(&mods, 5, 6, rank);
            let (da, db, dr) = truncated_svd(&d, 5, 6, rank);
            assert_eq!(r, dr);
            for (g, w) in product(&a, &b, r).iter().zip(product(&da, &db, dr)) {
                assert!((g - w).abs() < 1e-4, "rank {rank}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn linear_needs_equal_ranks_and_the_identity_follows_the_recipe() {
        let (x, y) = (host(module(2, 1), 1), host(module(3, 2), 2));
        assert!(merge("m", &[&x, &y], &MergeRecipe::new(MergeMethod::Linear, vec![1.0, 1.0])).is_err());
        let z = host(module(2, 3), 3);
        let r1 = MergeRecipe::new(MergeMethod::Linear, vec![1.0, 1.0]);
        let r2 = MergeRecipe::new(MergeMethod::Linear, vec![1.0, 0.5]);
        assert_ne!(r1.generation(&[&x, &z]), r2.generation(&[&x, &z]));
        assert_eq!(
            merge("a", &[&x, &z], &r1).expect("m").generation,
            merge("b", &[&x, &z], &r1).expect("m").generation
        );
    }

    #[test]
    fn ties_elects_signs_and_averages_agreeing_entries() {
        let t = vec![vec![1.0, -2.0, 0.5], vec![3.0, 1.0, -0.5]];
        let recipe = MergeRecipe::new(MergeMethod::Ties, vec![1.0, 1.0]);
        let mut rng = StdRng::seed_from_u64(0);
        // entry 0: both +, mean 2; entry 1: total -1 -> keep -2; entry 2: total 0 -> + wins, 0.5.
        assert_eq!(combine(TensorOp::Ties, &t, &[1.0, 1.0], &recipe, &mut rng), vec![2.0, -2.0, 0.5]);
    }

    #[test]
    fn dare_is_seeded_and_magnitude_prune_keeps_the_largest() {
        let t: Vec<f32> = (1..=10).map(|v| v as f32).collect();
        assert_eq!(magnitude_prune(&t, 0.3), vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0, 9.0, 10.0]);
        let a = random_prune(&t, 0.5, &mut StdRng::seed_from_u64(9));
        let b = random_prune(&t, 0.5, &mut StdRng::seed_from_u64(9));
        assert_eq!(a, b);
        assert!(a.iter().all(|&v| v == 0.0 || t.iter().any(|&x| (x * 2.0 - v).abs() < 1e-6)));
    }

    #[test]
    fn unknown_method_is_named() {
        let e = MergeMethod::parse("average").expect_err("unknown");
        assert!(e.to_string().contains("average"));
    }
}
