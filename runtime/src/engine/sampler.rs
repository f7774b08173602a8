//! Turning logits into the next token: penalties, temperature, top-k, top-p, seeded randomness.
//!
//! Semantics follow what OpenAI-compatible servers (vLLM) do: the repetition penalty (HF/CTRL
//! style) covers prompt and output tokens; frequency and presence penalties cover output tokens
//! only; temperature 0 is greedy. The same seed and inputs give the same tokens.

use std::collections::{HashMap, HashSet};

use openlora_kernels::RowPick;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Sampling settings for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already seen; 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once per previous occurrence in the output.
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the output.
    pub presence_penalty: f32,
    /// Seed for the random choice; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

/// A sampling parameter is out of range.
#[derive(Debug, thiserror::Error)]
#[error("invalid sampling parameter `{name}`: {reason}")]
pub struct InvalidParam {
    /// The parameter.
    pub name: &'static str,
    /// Why.
    pub reason: String,
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// Checks ranges (the OpenAI API's where it defines them).
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |name, reason: String| Err(InvalidParam { name, reason });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("{} must be a number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", format!("{} must be > 0", self.repetition_penalty));
        }
        for (name, v) in [("frequency_penalty", self.frequency_penalty), ("presence_penalty", self.presence_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(name, format!("{v} must be in [-2, 2]"));
            }
        }
        Ok(())
    }
}

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    seen: HashSet<u32>,
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Self { params, rng, seen: prompt.iter().copied().collect(), output_counts: HashMap::new() }
    }

    /// Picks the next token from `logits` (modified in place) and records it.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.temperature == 0.0 {
            openlora_kernels::cpu::ops::argmax(logits).unwrap_or(0) as u32
        } else {
            self.sample_random(logits)
        };
        self.take(token)
    }

    /// The reduced logits row this sampler can choose from as it would from every logit, or
    /// `None` when it needs them all: greedy decoding needs the argmax, top-k sampling with
    /// `top_k <= max_k` the top k; penalties read every seen token's logit.
    pub fn reduced_pick(&self, max_k: usize) -> Option<RowPick> {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            return None;
        }
        if p.temperature == 0.0 {
            Some(RowPick::Argmax)
        } else if (1..=max_k).contains(&p.top_k) {
            Some(RowPick::TopK(p.top_k))
        } else {
            None
        }
    }

    /// Records `token`, chosen from a reduced argmax row, as the next token.
    pub fn take(&mut self, token: u32) -> u32 {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_default() += 1;
        token
    }

    /// Samples from the `top_k` largest logits (descending, ties by lower index, as
    /// [`openlora_kernels::Backend::pick_rows`] gives them): the same draw, with the same
    /// seed, as [`Self::sample`] over the whole row.
    pub fn sample_candidates(&mut self, mut cand: Vec<(u32, f32)>) -> u32 {
        cand.truncate(self.params.top_k.max(1));
        let token = if cand.is_empty() { 0 } else { self.sample_sorted(&cand) };
        self.take(token)
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }

    fn sample_random(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // Candidates sorted by logit, descending; ties by id for determinism.
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l)).collect();
        if cand.is_empty() {
            return 0;
        }
        let k = if p.top_k > 0 { p.top_k.min(cand.len()) } else { cand.len() };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        self.sample_sorted(&cand)
    }

    /// Draws from candidates sorted by logit, descending: temperature, then top-p.
    fn sample_sorted(&mut self, cand: &[(u32, f32)]) -> u32 {
        let p = &self.params;
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, l)| ((l - max) / p.temperature).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.r#gen::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect()
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let params = SamplingParams { temperature: 1.5, seed: Some(42), ..Default::default() };
        let run = |params: SamplingParams| {
            let mut s = Sampler::new(params, &[]);
            (0..32).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(run(params.clone()), run(SamplingParams { seed: Some(7), ..params }));
    }

    #[test]
    fn greedy_takes_the_argmax_and_top_k_one_is_greedy() {
        let mut l = logits();
        let best = openlora_kernels::cpu::ops::argmax(&l).expect("non-empty") as u32;
        assert_eq!(Sampler::new(SamplingParams::greedy(), &[]).sample(&mut l), best);
        let p = SamplingParams { temperature: 2.0, top_k: 1, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p, &[]);
        for _ in 0..10 {
            assert_eq!(s.sample(&mut logits()), best);
        }
    }

    #[test]
    fn reduced_rows_draw_the_same_tokens_as_whole_rows() {
        let seeded =
            |top_k, temperature| SamplingParams { temperature, top_k, top_p: 0.9, seed: Some(5), ..Default::default() };
        for (params, want) in [
            (SamplingParams::greedy(), Some(RowPick::Argmax)),
            (seeded(7, 1.3), Some(RowPick::TopK(7))),
            (seeded(65, 1.3), None),
            (seeded(0, 1.3), None),
            (SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() }, None),
            (SamplingParams { presence_penalty: 0.5, ..seeded(7, 1.3) }, None),
        ] {
            assert_eq!(Sampler::new(params.clone(), &[]).reduced_pick(64), want, "{params:?}");
            let (mut whole, mut reduced) = (Sampler::new(params.clone(), &[]), Sampler::new(params.clone(), &[]));
            for step in 0..40 {
                let mut l: Vec<f32> = (0..50).map(|i| ((i * 7919 + step * 31) % 23) as f32 * 0.25).collect();
                let row = openlora_kernels::backend::pick_host(&l, 50, &[want.unwrap_or(RowPick::Full)]).expect("pick");
                let got = match row.into_iter().next() {
                    Some(openlora_kernels::PickedRow::Argmax(t)) => reduced.take(t),
                    Some(openlora_kernels::PickedRow::TopK(c)) => reduced.sample_candidates(c),
                    _ => reduced.sample(&mut l.clone()),
                };
                assert_eq!(got, whole.sample(&mut l), "{params:?} step {step}");
            }
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut l = vec![-10.0; 10];
        l[3] = 10.0;
        l[4] = 9.0;
        let p = SamplingParams { temperature: 1.0, top_p: 0.5, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p, &[]);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut l.clone()), 3);
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut l = vec![1.0, 0.9];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        assert_eq!(Sampler::new(p, &[0]).sample(&mut l), 1);
        let p = SamplingParams { frequency_penalty: 1.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&mut [1.0, 0.9]), 0);
        assert_eq!(s.sample(&mut [1.0, 0.9]), 1);
    }

    #[test]
    fn out_of_range_params_are_rejected_by_name() {
        let e = SamplingParams { top_p: 0.0, ..Default::default() }.validate().expect_err("top_p");
        assert_eq!(e.name, "top_p");
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate().expect_err("t");
        assert_eq!(e.name, "temperature");
    }
}
