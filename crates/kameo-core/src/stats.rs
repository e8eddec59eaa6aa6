//! Counters and the latency histogram of a pool: behind `Pool.stats()` in the Python parent,
//! and the same figures for the Rust host's pool. No Python.

use std::time::Duration;

/// Counters and a latency histogram for `Pool.stats()` (or the Rust host's stats).
pub struct Stats {
    /// Answers (replies, errors, ends of streams) that reached a caller still waiting.
    pub completed: u64,
    /// Error answers among those.
    pub errors: u64,
    /// Requests sent again after their worker was lost.
    pub retries: u64,
    /// Answers that arrived for requests the caller had given up on (a future already done,
    /// a cancelled stream): not counted above.
    pub abandoned: u64,
    /// Geometric buckets, eight per power of two of the latency in nanoseconds (~9% wide).
    buckets: Vec<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    const PER_OCTAVE: f64 = 8.0;

    /// All counters at zero, an empty histogram.
    pub fn new() -> Self {
        Stats {
            completed: 0,
            errors: 0,
            retries: 0,
            abandoned: 0,
            buckets: vec![0; 64 * 8],
        }
    }

    /// One more answer that reached its caller, `d` after it was sent.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        self.completed += 1;
        let ns = d.as_nanos().max(1) as f64;
        let i = ((ns.log2() * Self::PER_OCTAVE) as usize).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
    }

    /// The latency (seconds) below which a fraction `q` of completed requests fell.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(2f64.powf((i as f64 + 1.0) / Self::PER_OCTAVE) / 1e9);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;
    use std::time::Duration;

    #[test]
    fn quantiles_of_an_empty_histogram_are_none() {
        assert_eq!(Stats::new().quantile(0.5), None);
    }

    #[test]
    fn quantiles_fall_within_a_bucket_of_the_truth() {
        let mut s = Stats::new();
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.completed, 100);
        let p50 = s.quantile(0.5).expect("some");
        let p99 = s.quantile(0.99).expect("some");
        // Buckets are ~9% wide and report their upper bound.
        assert!((50e-6..=50e-6 * 1.1).contains(&p50), "{p50}");
        assert!((99e-6..=99e-6 * 1.1).contains(&p99), "{p99}");
        assert!(s.quantile(0.0).expect("some") <= 1.1e-6);
    }

    #[test]
    fn latencies_beyond_the_last_bucket_land_in_it() {
        let mut s = Stats::new();
        s.record(Duration::from_secs(u64::MAX / 2));
        s.record(Duration::ZERO);
        assert_eq!(s.completed, 2);
        assert!(s.quantile(1.0).expect("some") > 1e9);
        assert!(s.quantile(0.5).expect("some") <= 1.1e-9);
    }
}
