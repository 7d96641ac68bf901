//! Per-client call rates: one token bucket per (client identity, bucket), refilled
//! continuously at the role's `per_minute` and holding at most `burst` calls. A bucket
//! is an RPC, or several RPCs that give the same thing away (see
//! [`crate::config::rate_bucket`]). Buckets live in each appliance's memory: behind a
//! load balancer over N appliances a client gets up to N times the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::RateLimit;

/// Buckets kept before full (idle) ones are dropped.
const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
    /// The limit the bucket was last used with (for eviction).
    per_sec: f64,
    burst: f64,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl RateLimiter {
    /// Takes one call from the bucket of (`client`, `bucket`); false when it is empty.
    pub fn admit(&self, client: &str, bucket: &str, limit: RateLimit) -> bool {
        self.admit_at(client, bucket, limit, Instant::now())
    }

    fn admit_at(&self, client: &str, rpc: &str, limit: RateLimit, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let burst = f64::from(limit.burst);
        let per_sec = f64::from(limit.per_minute) / 60.0;
        if buckets.len() >= MAX_BUCKETS {
            // Drop buckets that have refilled: forgetting them changes nothing.
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * b.per_sec < b.burst);
        }
        let key = (client.to_string(), rpc.to_string());
        let b = buckets.entry(key).or_insert(Bucket { tokens: burst, at: now, per_sec, burst });
        (b.per_sec, b.burst) = (per_sec, burst);
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_per_client() {
        let l = RateLimiter::default();
        let limit = RateLimit { per_minute: 60, burst: 3 };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.admit_at("a", "rpc", limit, t0));
        }
        assert!(!l.admit_at("a", "rpc", limit, t0));
        // Another client and another bucket have their own.
        assert!(l.admit_at("b", "rpc", limit, t0));
        assert_eq!(crate::config::rate_bucket("/keyward.v1.BindingService/SealBinding"), "blind-index");
        assert_eq!(crate::config::rate_bucket("keyward.v1.BindingService/BlindIndex"), "blind-index");
        assert_eq!(crate::config::rate_bucket("keyward.v1.BindingService/OpenBinding"), "keyward.v1.BindingService/OpenBinding");
        assert!(l.admit_at("a", "other", limit, t0));
        // One call per second comes back.
        assert!(!l.admit_at("a", "rpc", limit, t0 + Duration::from_millis(500)));
        assert!(l.admit_at("a", "rpc", limit, t0 + Duration::from_millis(1100)));
        assert!(!l.admit_at("a", "rpc", limit, t0 + Duration::from_millis(1200)));
        // Never more than the burst after a long pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.admit_at("a", "rpc", limit, later));
        }
        assert!(!l.admit_at("a", "rpc", limit, later));
    }
}
