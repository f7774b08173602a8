//! Per-plugin counters and a call-latency histogram, readable at any time as a snapshot
//! (`PluginHost::metrics`) for `/metrics` and the logs.
//!
//! The histogram is log-linear (8 buckets per power of two of microseconds), lock-free, and
//! reports quantiles as the upper bound of the bucket they fall in: within 12.5% above the
//! true value, never below it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::config::PluginKind;

const LINEAR: u64 = 16;
const SUB_BUCKETS: u64 = 8;
const OCTAVES: u64 = 40;
const BUCKETS: usize = (LINEAR + (OCTAVES - 4) * SUB_BUCKETS) as usize;

/// A lock-free latency histogram in microseconds.
pub(crate) struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let octave = 63 - u64::from(us.leading_zeros()); // >= 4
    let sub = (us >> (octave - 3)) & (SUB_BUCKETS - 1);
    let index = LINEAR + (octave - 4) * SUB_BUCKETS + sub;
    (index as usize).min(BUCKETS - 1)
}

/// The largest value that falls in bucket `index`.
fn upper_bound(index: usize) -> u64 {
    let index = index as u64;
    if index < LINEAR {
        return index;
    }
    let octave = (index - LINEAR) / SUB_BUCKETS + 4;
    let sub = (index - LINEAR) % SUB_BUCKETS;
    let width = 1u64 << (octave - 3);
    (1u64 << octave) + (sub + 1) * width - 1
}

impl LatencyHistogram {
    pub(crate) fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let quantile = |q: f64| -> u64 {
            if count == 0 {
                return 0;
            }
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (index, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper_bound(index);
                }
            }
            upper_bound(BUCKETS - 1)
        };
        LatencySnapshot {
            count,
            sum_us: self.sum_us.load(Ordering::Relaxed),
            p50_us: quantile(0.50),
            p99_us: quantile(0.99),
            max_us: self.max_us.load(Ordering::Relaxed),
            buckets: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(index, c)| (upper_bound(index), *c))
                .collect(),
        }
    }
}

/// Call latencies of one plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Calls measured.
    pub count: u64,
    /// Their total duration in microseconds.
    pub sum_us: u64,
    /// Median, as the upper bound of its bucket.
    pub p50_us: u64,
    /// 99th percentile, as the upper bound of its bucket.
    pub p99_us: u64,
    /// The slowest call.
    pub max_us: u64,
    /// Non-empty buckets: (largest value in the bucket in µs, calls), ascending; for a
    /// Prometheus histogram, accumulate them.
    pub buckets: Vec<(u64, u64)>,
}

/// One plugin's counters at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginMetrics {
    /// The plugin's name.
    pub name: String,
    /// Its kind.
    pub kind: PluginKind,
    /// The ABI version its component exports.
    pub abi_version: String,
    /// SHA-256 (hex) of the component file currently loaded.
    pub component_sha256: String,
    /// Calls attempted (including those refused by quarantine).
    pub calls: u64,
    /// Calls that failed (trap, timeout, bad answer, quarantine, overload).
    pub failures: u64,
    /// Failures answered with the fail-open fallback.
    pub fallbacks: u64,
    /// Failures of an overloaded host, not counted towards quarantine: no sandbox slot came
    /// free within the plugin's time limit ([`super::PluginError::Busy`]), or the host could
    /// not instantiate it ([`super::PluginError::Host`]).
    pub busy: u64,
    /// Timeouts while the call's thread got less than half its time limit on the CPU
    /// ([`super::PluginError::Starved`]), not counted towards quarantine.
    pub starved: u64,
    /// Failures in a row right now.
    pub consecutive_failures: u32,
    /// Whether the plugin is quarantined (not called until reloaded).
    pub quarantined: bool,
    /// Successful reloads since it was first loaded.
    pub reloads: u64,
    /// Latency of the calls that ran (waiting for a sandbox slot, store creation,
    /// instantiation and the call).
    pub latency: LatencySnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_and_bound_them_from_above() {
        for us in [0u64, 1, 15, 16, 17, 31, 32, 100, 1000, 12_345, 1 << 30] {
            let bound = upper_bound(bucket_of(us));
            assert!(bound >= us, "{us} -> {bound}");
            assert!(bound as f64 <= us as f64 * 1.125 + 1.0, "{us} -> {bound}");
        }
        let histogram = LatencyHistogram::new();
        for us in 1..=100u64 {
            histogram.record(Duration::from_micros(us));
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 100);
        assert_eq!(snapshot.max_us, 100);
        assert!((50..=56).contains(&snapshot.p50_us), "{snapshot:?}");
        assert!((99..=111).contains(&snapshot.p99_us), "{snapshot:?}");
        assert_eq!(snapshot.buckets.iter().map(|b| b.1).sum::<u64>(), 100);
    }
}
