//! Per-appliance attempt and single-use state of issued OTP challenges (one store per
//! appliance; see the README's multi-appliance rule): attempts are counted before the code is compared, a challenge is
//! used at most once, entries leave only after they expire, and at a ceiling new
//! challenges are refused rather than old state forgotten. Challenge ids are random
//! and carry no secret; codes never enter this module.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The answer to one verification attempt, decided before the code is compared.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// This attempt was counted; compare the code. `attempt` is 1-based, `remaining`
    /// the attempts left after this one.
    Counted { attempt: u8, remaining: u8 },
    /// The challenge was already verified successfully.
    AlreadyUsed,
    /// Every allowed attempt was already counted.
    Locked,
    /// The challenge expired.
    Expired,
    /// Never registered here (another appliance, an earlier boot) or evicted after
    /// expiry.
    Unknown,
}

/// Refusal of a new challenge: at the ceiling, or the client at its quota (every
/// counted entry still open).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many open challenges ({0}); retry later")]
    Full(usize),
    #[error("this client's quota of {0} open challenges is reached; retry later")]
    Quota(usize),
}

/// State of one challenge.
struct Entry {
    /// The identity of the client it was issued to.
    client: Arc<str>,
    expires_at: u64,
    max_attempts: u8,
    attempts: u8,
    used: bool,
}

struct Inner {
    entries: HashMap<[u8; 16], Entry>,
    /// Entries held per client identity (clients with none are absent).
    per_client: HashMap<Arc<str>, usize>,
    /// One element per entry, earliest expiry on top: eviction pops expired entries in
    /// O(log n) each, so every call is O(log n) amortised.
    expiries: BinaryHeap<Reverse<(u64, [u8; 16])>>,
}

impl Inner {
    /// Removes every entry expired at `now` (`now > expires_at`).
    fn evict_expired(&mut self, now: u64) {
        while let Some(&Reverse((expires_at, id))) = self.expiries.peek() {
            if now <= expires_at {
                break;
            }
            self.expiries.pop();
            if let Some(e) = self.entries.remove(&id) {
                if let Some(n) = self.per_client.get_mut(&e.client) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_client.remove(&e.client);
                    }
                }
            }
        }
    }

    fn held_by(&self, client: &str) -> usize {
        self.per_client.get(client).copied().unwrap_or(0)
    }
}

/// Per-appliance state of issued challenges: attempts counted BEFORE the comparison,
/// single use, expiry-based eviction, a ceiling beyond which new challenges are
/// refused rather than old state forgotten, and a quota per client identity so one
/// client cannot fill the store for every other. Every call takes one short lock, so
/// concurrent attempts on one challenge are counted exactly.
pub struct AttemptStore {
    ceiling: usize,
    quota: usize,
    inner: Mutex<Inner>,
}

impl AttemptStore {
    /// An empty store holding at most `ceiling` challenges, at most `quota` of them
    /// for one client (0 refuses every one).
    pub fn new(ceiling: usize, quota: usize) -> AttemptStore {
        AttemptStore {
            ceiling,
            quota: quota.min(ceiling),
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                per_client: HashMap::new(),
                expiries: BinaryHeap::new(),
            }),
        }
    }

    /// The lock. No critical section here can panic part-way through an update (each
    /// changes one entry with plain stores, or inserts/removes an entry and its heap
    /// element together), so a poisoned lock still guards consistent state and is
    /// taken over rather than turning every later call into a failure.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new challenge of `client` (its identity); when at the ceiling, or
    /// the client at its quota, first evicts entries expired at `now` (unix s), then
    /// refuses with [`Refused::Quota`] or [`Refused::Full`]. Registering an id that is
    /// already present changes nothing (its attempts are never reset).
    pub fn register(&self, id: [u8; 16], client: &str, expires_at: u64, max_attempts: u8, now: u64) -> Result<(), Refused> {
        let mut g = self.lock();
        if g.entries.contains_key(&id) {
            return Ok(());
        }
        if g.entries.len() >= self.ceiling || g.held_by(client) >= self.quota {
            g.evict_expired(now);
            if g.entries.len() >= self.ceiling {
                return Err(Refused::Full(self.ceiling));
            }
            if g.held_by(client) >= self.quota {
                return Err(Refused::Quota(self.quota));
            }
        }
        let client: Arc<str> = match g.per_client.get_key_value(client) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(client),
        };
        *g.per_client.entry(Arc::clone(&client)).or_insert(0) += 1;
        g.entries.insert(
            id,
            Entry {
                client,
                expires_at,
                max_attempts,
                attempts: 0,
                used: false,
            },
        );
        g.expiries.push(Reverse((expires_at, id)));
        Ok(())
    }

    /// Counts one attempt atomically: `Expired` if `now > expires_at`; `AlreadyUsed`
    /// once marked used; `Locked` when `max_attempts` attempts were already counted;
    /// `Unknown` for an id never registered (or evicted after expiry); otherwise
    /// `Counted`, and only then may the caller compare the code.
    pub fn admit(&self, id: &[u8; 16], now: u64) -> Admission {
        let mut g = self.lock();
        let Some(e) = g.entries.get_mut(id) else {
            return Admission::Unknown;
        };
        if now > e.expires_at {
            Admission::Expired
        } else if e.used {
            Admission::AlreadyUsed
        } else if e.attempts >= e.max_attempts {
            Admission::Locked
        } else {
            e.attempts += 1;
            Admission::Counted {
                attempt: e.attempts,
                remaining: e.max_attempts - e.attempts,
            }
        }
    }

    /// Marks the challenge used (after a successful comparison); it stays remembered
    /// as used until it expires. An unknown id is ignored.
    pub fn mark_used(&self, id: &[u8; 16]) {
        if let Some(e) = self.lock().entries.get_mut(id) {
            e.used = true;
        }
    }

    /// Marks the challenge used and says whether this call did so: `true` for exactly
    /// one caller, `false` if it was already used or is unknown. Two requests carrying
    /// the right code may both be admitted and both compare equal; only the one that
    /// gets `true` here may answer "valid" (the other answers "already used").
    pub fn claim_use(&self, id: &[u8; 16]) -> bool {
        match self.lock().entries.get_mut(id) {
            Some(e) if !e.used => {
                e.used = true;
                true
            }
            _ => false,
        }
    }

    /// Challenges currently held (open, used, locked or expired but not yet evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no challenge is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most challenges held at once.
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The most challenges held at once for one client.
    pub fn quota(&self) -> usize {
        self.quota
    }
}

/// The answer to one TOTP/HOTP verification attempt, decided before the code is
/// compared.
#[derive(Debug, PartialEq, Eq)]
pub enum SeedAdmission {
    /// Counted as a failure until [`FailureStore::succeeded`] clears it: `failures` is
    /// the count with this attempt; `locks` says this attempt reached the limit (a
    /// wrong code now locks the seed).
    Counted { failures: u32, locks: bool },
    /// The seed is locked for `secs` more seconds.
    Locked { secs: u64 },
    /// Every tracked seed has recent failures (the ceiling): retry later.
    Full(usize),
}

/// Failure state of one seed.
struct Failures {
    failures: u32,
    /// Unix s; the entry is forgotten after this (`lockout` after the last failure,
    /// or the end of the lock-out).
    expires_at: u64,
    locked_until: Option<u64>,
}

/// Failed TOTP/HOTP codes per seed, keyed by a hash of the subject and its seed blob
/// (never a seed or a code): `max_failures` consecutive failures lock the seed for
/// `lockout` seconds, a success clears the count, and failures are forgotten
/// `lockout` seconds after the last one. Attempts are counted before the code is
/// compared, so concurrent guesses cannot pass the limit. At most `ceiling` seeds are
/// tracked; at the ceiling expired entries are evicted, then new seeds are refused
/// rather than old failures forgotten.
pub struct FailureStore {
    max_failures: u32,
    lockout: u64,
    ceiling: usize,
    inner: Mutex<HashMap<[u8; 32], Failures>>,
}

impl FailureStore {
    pub fn new(max_failures: u32, lockout_secs: u64, ceiling: usize) -> FailureStore {
        FailureStore { max_failures, lockout: lockout_secs, ceiling, inner: Mutex::new(HashMap::new()) }
    }

    /// As [`AttemptStore::lock`]: every update is a few plain stores.
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Failures>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The seed's lock-out left at `now` (unix s), without counting anything.
    pub fn locked(&self, key: &[u8; 32], now: u64) -> Option<u64> {
        let g = self.lock();
        match g.get(key)?.locked_until {
            Some(until) if until > now => Some(until - now),
            _ => None,
        }
    }

    /// Counts one attempt (as a failure until [`FailureStore::succeeded`]) at `now`.
    pub fn admit(&self, key: &[u8; 32], now: u64) -> SeedAdmission {
        let mut g = self.lock();
        if let Some(e) = g.get(key) {
            if let Some(until) = e.locked_until.filter(|u| *u > now) {
                return SeedAdmission::Locked { secs: until - now };
            }
            // Expired, or a lock-out that is over: the seed starts afresh.
            if now > e.expires_at || e.locked_until.is_some() {
                g.remove(key);
            }
        }
        if !g.contains_key(key) && g.len() >= self.ceiling {
            g.retain(|_, e| now <= e.expires_at);
            if g.len() >= self.ceiling {
                return SeedAdmission::Full(self.ceiling);
            }
        }
        let e = g.entry(*key).or_insert(Failures { failures: 0, expires_at: now, locked_until: None });
        e.failures = e.failures.saturating_add(1);
        e.expires_at = now.saturating_add(self.lockout);
        let locks = e.failures >= self.max_failures;
        if locks {
            e.locked_until = Some(now.saturating_add(self.lockout));
        }
        SeedAdmission::Counted { failures: e.failures, locks }
    }

    /// The code matched: the seed's failures (and a lock set by this attempt) are cleared.
    pub fn succeeded(&self, key: &[u8; 32]) {
        self.lock().remove(key);
    }

    /// Seeds tracked (with failures, locked, or expired but not yet evicted).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no seed is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sizes only; no keys.
impl fmt::Debug for FailureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailureStore")
            .field("max_failures", &self.max_failures)
            .field("lockout", &self.lockout)
            .field("ceiling", &self.ceiling)
            .field("len", &self.len())
            .finish()
    }
}

/// Sizes only; no challenge ids.
impl fmt::Debug for AttemptStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptStore")
            .field("ceiling", &self.ceiling)
            .field("quota", &self.quota)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn counts_attempts_then_locks() {
        let s = AttemptStore::new(10, 10);
        s.register(id(1), "c", NOW + 300, 3, NOW).unwrap();
        assert_eq!(
            s.admit(&id(1), NOW),
            Admission::Counted {
                attempt: 1,
                remaining: 2
            }
        );
        assert_eq!(
            s.admit(&id(1), NOW + 1),
            Admission::Counted {
                attempt: 2,
                remaining: 1
            }
        );
        assert_eq!(
            s.admit(&id(1), NOW + 2),
            Admission::Counted {
                attempt: 3,
                remaining: 0
            }
        );
        assert_eq!(s.admit(&id(1), NOW + 3), Admission::Locked);
        assert_eq!(s.admit(&id(1), NOW + 4), Admission::Locked);
        // Re-registering never resets the count.
        s.register(id(1), "c", NOW + 600, 10, NOW + 5).unwrap();
        assert_eq!(s.admit(&id(1), NOW + 5), Admission::Locked);
        assert_eq!(s.len(), 1);
        // Locked is still reported as expired once the challenge expires.
        assert_eq!(s.admit(&id(1), NOW + 301), Admission::Expired);
    }

    #[test]
    fn zero_attempts_is_locked() {
        let s = AttemptStore::new(10, 10);
        s.register(id(1), "c", NOW + 300, 0, NOW).unwrap();
        assert_eq!(s.admit(&id(1), NOW), Admission::Locked);
    }

    #[test]
    fn single_use() {
        let s = AttemptStore::new(10, 10);
        s.register(id(1), "c", NOW + 300, 5, NOW).unwrap();
        assert_eq!(
            s.admit(&id(1), NOW),
            Admission::Counted {
                attempt: 1,
                remaining: 4
            }
        );
        s.mark_used(&id(1));
        assert_eq!(s.admit(&id(1), NOW + 1), Admission::AlreadyUsed);
        assert_eq!(s.admit(&id(1), NOW + 2), Admission::AlreadyUsed);
        s.register(id(1), "c", NOW + 300, 5, NOW + 3).unwrap();
        assert_eq!(s.admit(&id(1), NOW + 3), Admission::AlreadyUsed);
        // Marking an unknown id does nothing.
        s.mark_used(&id(2));
        assert_eq!(s.admit(&id(2), NOW), Admission::Unknown);
    }

    #[test]
    fn expiry() {
        let s = AttemptStore::new(10, 10);
        s.register(id(1), "c", NOW + 300, 5, NOW).unwrap();
        // The expiry instant itself is still valid.
        assert_eq!(
            s.admit(&id(1), NOW + 300),
            Admission::Counted {
                attempt: 1,
                remaining: 4
            }
        );
        assert_eq!(s.admit(&id(1), NOW + 301), Admission::Expired);
        s.mark_used(&id(1));
        assert_eq!(s.admit(&id(1), NOW + 301), Admission::Expired);
        assert_eq!(s.admit(&id(9), NOW), Admission::Unknown);
    }

    #[test]
    fn ceiling_without_expired_entries_refuses_and_keeps_state() {
        let s = AttemptStore::new(3, 3);
        for n in 0..3 {
            s.register(id(n), "c", NOW + 300, 2, NOW).unwrap();
        }
        assert_eq!(
            s.admit(&id(0), NOW),
            Admission::Counted {
                attempt: 1,
                remaining: 1
            }
        );
        assert_eq!(s.register(id(3), "c", NOW + 300, 2, NOW + 10), Err(Refused::Full(3)));
        assert_eq!(Refused::Full(3).to_string(), "too many open challenges (3); retry later");
        assert_eq!(s.len(), 3);
        // Old state is kept: the count of id 0 continues; id 3 was never registered.
        assert_eq!(
            s.admit(&id(0), NOW + 10),
            Admission::Counted {
                attempt: 2,
                remaining: 0
            }
        );
        assert_eq!(s.admit(&id(3), NOW + 10), Admission::Unknown);
        // At the expiry instant nothing is expired yet.
        assert_eq!(s.register(id(3), "c", NOW + 600, 2, NOW + 300), Err(Refused::Full(3)));
        // Re-registering a present id at the ceiling is not a refusal.
        assert_eq!(s.register(id(1), "c", NOW + 300, 2, NOW + 10), Ok(()));
    }

    #[test]
    fn ceiling_with_expired_entries_evicts_only_those() {
        let s = AttemptStore::new(3, 3);
        s.register(id(0), "c", NOW + 100, 2, NOW).unwrap();
        s.register(id(1), "c", NOW + 300, 2, NOW).unwrap();
        s.register(id(2), "c", NOW + 50, 2, NOW).unwrap();
        s.mark_used(&id(1));
        // Below the ceiling nothing is evicted: expired entries answer Expired.
        assert_eq!(s.admit(&id(2), NOW + 60), Admission::Expired);
        // At the ceiling at NOW + 101, ids 0 and 2 are expired and evicted; id 1 stays.
        s.register(id(3), "c", NOW + 400, 2, NOW + 101).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.admit(&id(0), NOW + 101), Admission::Unknown);
        assert_eq!(s.admit(&id(2), NOW + 101), Admission::Unknown);
        assert_eq!(s.admit(&id(1), NOW + 101), Admission::AlreadyUsed);
        assert_eq!(
            s.admit(&id(3), NOW + 101),
            Admission::Counted {
                attempt: 1,
                remaining: 1
            }
        );
        s.register(id(4), "c", NOW + 400, 2, NOW + 101).unwrap();
        assert_eq!(s.register(id(5), "c", NOW + 400, 2, NOW + 101), Err(Refused::Full(3)));
        assert!(!s.is_empty());
    }

    #[test]
    fn zero_ceiling_refuses_everything() {
        let s = AttemptStore::new(0, 0);
        assert_eq!(s.register(id(0), "c", NOW + 1, 1, NOW), Err(Refused::Full(0)));
        assert!(s.is_empty());
    }

    #[test]
    fn many_entries_evict_in_expiry_order() {
        let s = AttemptStore::new(1000, 1000);
        // Registered out of expiry order.
        for n in 0..1000u32 {
            s.register(id(n), "c", NOW + u64::from((n * 7919) % 1000), 1, NOW).unwrap();
        }
        // At NOW + 500, expiries NOW..=NOW+499 are gone (500 of them).
        s.register(id(5000), "c", NOW + 2000, 1, NOW + 500).unwrap();
        assert_eq!(s.len(), 501);
        for n in 0..1000u32 {
            let exp = u64::from((n * 7919) % 1000);
            let want = if exp < 500 {
                Admission::Unknown
            } else {
                Admission::Counted {
                    attempt: 1,
                    remaining: 0,
                }
            };
            assert_eq!(s.admit(&id(n), NOW + 500), want, "id {n}");
        }
    }

    #[test]
    fn concurrent_admits_count_exactly() {
        for max in [1u8, 3, 5, 10] {
            let s = Arc::new(AttemptStore::new(16, 16));
            s.register(id(7), "c", NOW + 300, max, NOW).unwrap();
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let s = Arc::clone(&s);
                    std::thread::spawn(move || (0..50).map(|_| s.admit(&id(7), NOW)).collect::<Vec<_>>())
                })
                .collect();
            let mut counted = Vec::new();
            let mut locked = 0;
            for h in handles {
                for a in h.join().unwrap() {
                    match a {
                        Admission::Counted { attempt, remaining } => {
                            assert_eq!(attempt + remaining, max);
                            counted.push(attempt);
                        }
                        Admission::Locked => locked += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            counted.sort_unstable();
            assert_eq!(counted, (1..=max).collect::<Vec<_>>());
            assert_eq!(locked, 8 * 50 - usize::from(max));
        }
    }

    #[test]
    fn claim_use_succeeds_once() {
        let s = AttemptStore::new(4, 4);
        s.register(id(1), "c", NOW + 300, 5, NOW).unwrap();
        assert!(s.claim_use(&id(1)));
        assert!(!s.claim_use(&id(1)));
        assert_eq!(s.admit(&id(1), NOW), Admission::AlreadyUsed);
        assert!(!s.claim_use(&id(2)));
        s.register(id(3), "c", NOW + 300, 5, NOW).unwrap();
        s.mark_used(&id(3));
        assert!(!s.claim_use(&id(3)));
    }

    #[test]
    fn concurrent_correct_codes_succeed_once() {
        let s = Arc::new(AttemptStore::new(16, 16));
        s.register(id(7), "c", NOW + 300, 10, NOW).unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (s, barrier) = (Arc::clone(&s), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    // Every thread "compares equal" after admission.
                    matches!(s.admit(&id(7), NOW), Admission::Counted { .. }) && s.claim_use(&id(7))
                })
            })
            .collect();
        let wins = handles.into_iter().map(|h| h.join().unwrap()).filter(|&w| w).count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn debug_shows_sizes_only() {
        let s = AttemptStore::new(4, 4);
        s.register([0xAB; 16], "c", NOW + 1, 1, NOW).unwrap();
        let d = format!("{s:?}");
        assert_eq!(d, "AttemptStore { ceiling: 4, quota: 4, len: 1 }");
    }

    #[test]
    fn a_client_at_its_quota_is_refused_and_others_are_not() {
        let s = AttemptStore::new(10, 2);
        s.register(id(1), "a", NOW + 100, 3, NOW).unwrap();
        s.register(id(2), "a", NOW + 300, 3, NOW).unwrap();
        assert_eq!(s.register(id(3), "a", NOW + 300, 3, NOW), Err(Refused::Quota(2)));
        assert_eq!(
            Refused::Quota(2).to_string(),
            "this client's quota of 2 open challenges is reached; retry later"
        );
        // Another client still gets challenges.
        s.register(id(4), "b", NOW + 300, 3, NOW).unwrap();
        s.register(id(5), "b", NOW + 300, 3, NOW).unwrap();
        assert_eq!(s.register(id(6), "b", NOW + 300, 3, NOW), Err(Refused::Quota(2)));
        // A used challenge holds its slot until it expires; then the client gets one again.
        assert!(s.claim_use(&id(1)));
        assert_eq!(s.register(id(3), "a", NOW + 300, 3, NOW + 100), Err(Refused::Quota(2)));
        s.register(id(3), "a", NOW + 400, 3, NOW + 101).unwrap();
        assert_eq!(s.admit(&id(1), NOW + 101), Admission::Unknown);
        assert_eq!(s.len(), 4);
        // The quota is never above the ceiling.
        assert_eq!(AttemptStore::new(3, 10).quota(), 3);
        // The ceiling still holds when every client is within its quota.
        let s = AttemptStore::new(3, 2);
        s.register(id(1), "a", NOW + 300, 3, NOW).unwrap();
        s.register(id(2), "b", NOW + 300, 3, NOW).unwrap();
        s.register(id(3), "c", NOW + 300, 3, NOW).unwrap();
        assert_eq!(s.register(id(4), "d", NOW + 300, 3, NOW), Err(Refused::Full(3)));
    }

    #[test]
    fn seed_failures_lock_and_a_success_resets() {
        let s = FailureStore::new(3, 900, 10);
        let k = [7u8; 32];
        assert_eq!(s.admit(&k, NOW), SeedAdmission::Counted { failures: 1, locks: false });
        // A success clears the count.
        s.succeeded(&k);
        assert!(s.is_empty());
        for n in 1..=2 {
            assert_eq!(s.admit(&k, NOW), SeedAdmission::Counted { failures: n, locks: false });
        }
        assert_eq!(s.locked(&k, NOW), None);
        assert_eq!(s.admit(&k, NOW + 1), SeedAdmission::Counted { failures: 3, locks: true });
        assert_eq!(s.locked(&k, NOW + 1), Some(900));
        assert_eq!(s.admit(&k, NOW + 2), SeedAdmission::Locked { secs: 899 });
        // Another seed is not affected.
        assert_eq!(s.admit(&[8u8; 32], NOW + 2), SeedAdmission::Counted { failures: 1, locks: false });
        // After the lock-out the seed starts afresh.
        assert_eq!(s.admit(&k, NOW + 902), SeedAdmission::Counted { failures: 1, locks: false });
        // The limit-reaching attempt that matches clears the lock.
        let s = FailureStore::new(1, 60, 10);
        assert_eq!(s.admit(&k, NOW), SeedAdmission::Counted { failures: 1, locks: true });
        s.succeeded(&k);
        assert_eq!(s.admit(&k, NOW), SeedAdmission::Counted { failures: 1, locks: true });
    }

    #[test]
    fn seed_failures_are_forgotten_and_bounded() {
        let s = FailureStore::new(5, 100, 2);
        s.admit(&[1u8; 32], NOW);
        s.admit(&[2u8; 32], NOW + 50);
        assert_eq!(s.admit(&[3u8; 32], NOW + 60), SeedAdmission::Full(2));
        // Seed 1's failures are forgotten 100 s after the last one: evicted at the ceiling.
        assert_eq!(s.admit(&[3u8; 32], NOW + 101), SeedAdmission::Counted { failures: 1, locks: false });
        assert_eq!(s.len(), 2);
        assert_eq!(s.admit(&[2u8; 32], NOW + 140), SeedAdmission::Counted { failures: 2, locks: false });
        assert_eq!(format!("{s:?}"), "FailureStore { max_failures: 5, lockout: 100, ceiling: 2, len: 2 }");
    }
}
