//! OTP wire formats: `Challenge::decode` (the 71-byte challenge inside the sealed
//! token), `parse_token` (the token's framing: version, seal key version, IV,
//! ciphertext) and `SeedBlob::decode` (a wrapped TOTP/HOTP seed), each on the whole
//! input; a decoded challenge then goes through the appliance's `AttemptStore`
//! (src/appliance/otp_store.rs) the way VerifyCode uses it.
//!
//! Invariants: each decoder is the strict inverse of its encoder (encode(decode(b))
//! == b); a registered challenge is counted exactly `max_attempts` times, then
//! locked, and claimed at most once.
#![no_main]

use keyward::appliance::otp_store::{Admission, AttemptStore};
use keyward::crypto::otp::{frame_token, parse_token, Challenge, OtpHash, SeedBlob};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    if let Some(c) = Challenge::decode(data) {
        assert_eq!(c.encode().as_slice(), data, "challenge round trip");
        let store = AttemptStore::new(4, 2);
        let now = c.issued_at;
        assert!(store.register(c.id, "fuzz", c.expires_at, c.max_attempts, now).is_ok());
        for attempt in 1..=c.max_attempts {
            assert_eq!(
                store.admit(&c.id, now),
                Admission::Counted { attempt, remaining: c.max_attempts - attempt }
            );
        }
        assert_eq!(store.admit(&c.id, now), Admission::Locked);
        assert!(store.claim_use(&c.id));
        assert!(!store.claim_use(&c.id));
        assert_eq!(store.admit(&c.id, c.expires_at.saturating_add(1)), if c.expires_at == u64::MAX { Admission::AlreadyUsed } else { Admission::Expired });
    }
    if let Some((version, iv, ct)) = parse_token(data) {
        assert_ne!(version, 0);
        assert_eq!(frame_token(version, &iv, ct), data, "token round trip");
    }
    if let Some(blob) = SeedBlob::decode(data) {
        assert_eq!(blob.encode(), data, "seed blob round trip");
        assert_eq!(SeedBlob::decode(&blob.encode()).as_ref(), Some(&blob));
        let _ = blob.mac_input("alice");
    }
});

fn seeds() -> Vec<Vec<u8>> {
    let c = Challenge {
        id: [0x11; 16],
        nonce: [0x22; 16],
        otp_key_version: 1,
        issued_at: 1_700_000_000,
        expires_at: 1_700_000_300,
        digits: 6,
        boot: [0x33; 16],
        max_attempts: 3,
    };
    let c8 = Challenge { digits: 8, max_attempts: 1, otp_key_version: 7, ..c.clone() };
    let mut out = vec![c.encode().to_vec(), c8.encode().to_vec()];
    // A token as the appliance frames it (72 ciphertext bytes: 71 + ... + the 16-byte tag).
    out.push(frame_token(1, &[0x44; 12], &[0x55; 71 + 16]));
    out.push(frame_token(3, &[0x00; 12], &[0xAA; 16]));
    for (hash, digits, period, wrapped) in [
        (OtpHash::Sha1, 6u8, 30u32, 40usize),
        (OtpHash::Sha256, 8, 60, 48),
        (OtpHash::Sha512, 7, 300, 80),
    ] {
        let blob = SeedBlob {
            kek_version: 1,
            mac_key_version: 2,
            hash,
            digits,
            period,
            wrapped: vec![0x66; wrapped],
            mac: vec![0x77; 32],
        };
        out.push(blob.encode());
    }
    out
}
