//! Counters and latency histograms, kept as plain atomics so that any room (the service, the
//! pager) can count without depending on the HTTP layer that exposes them. It is a leaf: it
//! imports nothing from the crate. The Prometheus exposition that reads these lives in
//! `service::exposition`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Cumulative latency buckets (a Prometheus histogram).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with upper bounds `bounds` (seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `(upper bound, cumulative count)` pairs, the sum in seconds and the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let buckets = self.bounds.iter().zip(&self.counts).map(|(b, c)| (*b, c.load(Ordering::Relaxed))).collect();
        (buckets, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6, self.count.load(Ordering::Relaxed))
    }
}

/// Buckets (seconds) of the evidence matcher's time per receipt.
pub const EVIDENCE_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0];

/// Buckets (seconds) of request latencies.
pub const LATENCY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Counts by a label value (finish reason, refusal kind).
#[derive(Debug, Default)]
pub struct LabelledCounter(Mutex<HashMap<&'static str, u64>>);

impl LabelledCounter {
    /// Adds one under `label`.
    pub fn add(&self, label: &'static str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner).entry(label).or_default() += 1;
    }

    /// Every label and its count, sorted by label.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> =
            self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, n)| (*k, *n)).collect();
        v.sort();
        v
    }
}

/// What the service counts about requests and adapter administration (the engine and the
/// pager keep their own figures).
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Requests finished, by finish reason.
    pub finished: LabelledCounter,
    /// Requests refused, by error kind.
    pub refused: LabelledCounter,
    /// Time to first token.
    pub ttft: Histogram,
    /// Whole-request latency.
    pub e2e: Histogram,
    /// Adapter loads through the admin API.
    pub adapter_loads: AtomicU64,
    /// Adapter unloads.
    pub adapter_unloads: AtomicU64,
    /// Time to read and prepare an adapter loaded through the admin API.
    pub adapter_load_seconds: Histogram,
    /// Time the evidence matcher took per receipt that searched datasets.
    pub evidence_seconds: Histogram,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self {
            finished: LabelledCounter::default(),
            refused: LabelledCounter::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            adapter_loads: AtomicU64::new(0),
            adapter_unloads: AtomicU64::new(0),
            adapter_load_seconds: Histogram::new(LATENCY_BUCKETS),
            evidence_seconds: Histogram::new(EVIDENCE_BUCKETS),
        }
    }
}
