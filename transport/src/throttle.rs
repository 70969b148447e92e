//! Token bucket for the snapshot byte rate (`snapshot_bytes_per_sec_max`).

use std::time::{Duration, Instant};

/// A token bucket in reservation style: a caller takes `n` bytes now and is told how long to wait before
/// sending them. Tokens may go negative (debt), which queues concurrent senders fairly without a lock held
/// across the wait. Time is an argument so the arithmetic is testable without sleeping.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; 0 means unlimited.
    rate_bytes_per_sec: u64,
    burst_bytes: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket that starts full (one burst may go out immediately).
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate_bytes_per_sec,
            burst_bytes,
            tokens: burst_bytes as f64,
            last: now,
        }
    }

    /// Takes `n` bytes and returns how long the caller must wait before sending them.
    pub fn reserve(&mut self, now: Instant, n: u64) -> Duration {
        if self.rate_bytes_per_sec == 0 {
            return Duration::ZERO;
        }
        let rate = self.rate_bytes_per_sec as f64;
        if now > self.last {
            let refill = now.duration_since(self.last).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(self.burst_bytes as f64);
            self.last = now;
        }
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, 100_000, t0);
        assert_eq!(
            b.reserve(t0, 100_000),
            Duration::ZERO,
            "a full burst goes out at once"
        );
        assert_eq!(
            ms(b.reserve(t0, 500_000)),
            500,
            "then 500 KB at 1 MB/s takes 500 ms"
        );
        // A second sender queued behind the first waits for both reservations.
        assert_eq!(ms(b.reserve(t0, 250_000)), 750);
        // After the debt is paid off time refills the bucket again, but never above the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.reserve(later, 100_000), Duration::ZERO);
        assert_eq!(ms(b.reserve(later, 1_000)), 1);
    }

    #[test]
    fn sustained_rate_matches_configuration() {
        // Sending 10 MB in 128 KiB chunks, sleeping as told, must take ~10 s of (simulated) time at 1 MB/s.
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::new(1_000_000, 131_072, t0);
        let mut sent = 0u64;
        while sent < 10_000_000 {
            now += b.reserve(now, 131_072);
            sent += 131_072;
        }
        let elapsed = now.duration_since(t0).as_secs_f64();
        let expected = (sent - 131_072) as f64 / 1_000_000.0;
        assert!(
            (elapsed - expected).abs() < 0.01,
            "elapsed {elapsed} expected {expected}"
        );
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 0, t0);
        assert_eq!(b.reserve(t0, u64::MAX / 2), Duration::ZERO);
    }

    #[test]
    fn time_going_backwards_does_not_refill() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut b = TokenBucket::new(1_000, 1_000, t0);
        assert_eq!(b.reserve(t0, 1_000), Duration::ZERO);
        assert_eq!(ms(b.reserve(t0 - Duration::from_secs(5), 1_000)), 1_000);
    }
}
