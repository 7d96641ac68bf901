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

/// Windows kept at most; beyond, every refusal gets its own line again.
const MAX_WINDOWS: usize = 10_000;

/// Refusals of one (client, RPC) within one second.
struct Window {
    second: u64,
    /// Refusals after the first, which got its own line.
    more: u64,
}

/// The refusals of a window that got no line of their own, to write as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub client: String,
    pub rpc: String,
    /// Unix second the refusals fell in.
    pub second: u64,
    /// How many.
    pub count: u64,
}

/// Aggregates repeated rate-limit refusals: the first of each client and RPC within a
/// second is audited on its own line before it is answered; the rest of that second are
/// answered at once and written as one line with their count when the second is over
/// ([`Refusals::due`], called at least every 200 ms, and at shutdown). So a client
/// hammering a limited RPC costs at most two fsync'd lines per second, not one per call.
#[derive(Default)]
pub struct Refusals {
    windows: Mutex<HashMap<(String, String), Window>>,
    lines: std::sync::atomic::AtomicU64,
    counted: std::sync::atomic::AtomicU64,
}

impl Refusals {
    /// Notes a refusal at unix second `now`. True: write its own line (the first of its
    /// second, or no room to aggregate); false: counted into the window's line. A
    /// finished window of the same key is returned to be written first.
    pub fn note(&self, client: &str, rpc: &str, now: u64) -> (bool, Option<Aggregate>) {
        let Ok(mut w) = self.windows.lock() else {
            return (true, None);
        };
        let key = (client.to_string(), rpc.to_string());
        let room = w.len() < MAX_WINDOWS;
        match w.get_mut(&key) {
            Some(win) if win.second == now => {
                win.more += 1;
                (false, None)
            }
            Some(win) => {
                let done = (win.more > 0).then(|| Aggregate {
                    client: key.0.clone(),
                    rpc: key.1.clone(),
                    second: win.second,
                    count: win.more,
                });
                *win = Window { second: now, more: 0 };
                (true, done)
            }
            None if room => {
                w.insert(key, Window { second: now, more: 0 });
                (true, None)
            }
            None => (true, None),
        }
    }

    /// Removes the windows of seconds before `now` (every window when `now` is
    /// `u64::MAX`) and returns those with refusals to write.
    pub fn due(&self, now: u64) -> Vec<Aggregate> {
        let Ok(mut w) = self.windows.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        w.retain(|(client, rpc), win| {
            if win.second >= now {
                return true;
            }
            if win.more > 0 {
                out.push(Aggregate { client: client.clone(), rpc: rpc.clone(), second: win.second, count: win.more });
            }
            false
        });
        out
    }

    /// Records that `agg`'s line was written.
    pub fn written(&self, agg: &Aggregate) {
        use std::sync::atomic::Ordering::Relaxed;
        self.lines.fetch_add(1, Relaxed);
        self.counted.fetch_add(agg.count, Relaxed);
    }

    /// Aggregated lines written, and the refusals they counted.
    pub fn totals(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.lines.load(Relaxed), self.counted.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refusals_of_one_second_share_a_line() {
        let r = Refusals::default();
        assert_eq!(r.note("a", "rpc", 100), (true, None));
        for _ in 0..5 {
            assert_eq!(r.note("a", "rpc", 100), (false, None));
        }
        // Another client, another RPC: their own first lines.
        assert_eq!(r.note("b", "rpc", 100), (true, None));
        assert_eq!(r.note("a", "other", 100), (true, None));
        // Nothing is due within the second.
        assert!(r.due(100).is_empty());
        // The next second: its first refusal gets a line, and the last second's count.
        let (own, done) = r.note("a", "rpc", 101);
        assert!(own);
        assert_eq!(done, Some(Aggregate { client: "a".into(), rpc: "rpc".into(), second: 100, count: 5 }));
        assert_eq!(r.note("a", "rpc", 101), (false, None));
        let due = r.due(102);
        assert_eq!(due, vec![Aggregate { client: "a".into(), rpc: "rpc".into(), second: 101, count: 1 }]);
        // Windows without extra refusals leave nothing to write.
        assert!(r.due(u64::MAX).is_empty());
    }

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
