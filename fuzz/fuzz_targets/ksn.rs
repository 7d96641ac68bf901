//! DUKPT key serial numbers: `TdesKsn::parse`/`parse_initial` (10 bytes, 21-bit
//! counter, at most 10 one-bits) and `AesKsn::parse`/`parse_initial` (12 bytes,
//! 32-bit counter, at most 16 one-bits), then what the appliance computes from an
//! accepted KSN without keys: the TDES IPEK data, the AES derivation path and data.
//!
//! Invariants: an accepted KSN gives back its bytes; a transaction KSN is also an
//! initial one; the counter obeys the one-bit limit; the derivation path has one
//! step per set bit, strictly increasing, ending at the counter.
#![no_main]

use keyward::crypto::dukpt::{derivation_data, derivation_path, AesKeyType, AesKsn, KeyUsage, TdesKsn};
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    let tdes_initial = TdesKsn::parse_initial(data);
    if let Ok(k) = TdesKsn::parse(data) {
        assert_eq!(tdes_initial.as_ref().ok(), Some(&k));
        assert_ne!(k.counter(), 0);
    }
    if let Ok(k) = tdes_initial {
        assert_eq!(k.bytes().as_slice(), data);
        assert!(k.counter() < (1 << 21) && k.counter().count_ones() <= 10);
        let _ = k.ipek_data();
    }
    let aes_initial = AesKsn::parse_initial(data);
    if let Ok(k) = AesKsn::parse(data) {
        assert_eq!(aes_initial.as_ref().ok(), Some(&k));
        assert_ne!(k.counter(), 0);
    }
    if let Ok(k) = aes_initial {
        assert_eq!(k.bytes().as_slice(), data);
        let c = k.counter();
        assert!(c.count_ones() <= 16);
        let path = derivation_path(c);
        assert_eq!(path.len(), c.count_ones() as usize);
        assert!(path.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(path.last().copied().unwrap_or(0), c);
        let id = k.initial_key_id();
        assert_eq!(&data[..8], id.as_slice());
        for w in path {
            let d = derivation_data(KeyUsage::KeyDerivation, AesKeyType::Aes128, &id, w, 1);
            assert_eq!(&d[12..], w.to_be_bytes().as_slice());
        }
    }
});

fn seeds() -> Vec<Vec<u8>> {
    vec![
        // X9.24-1 test KSN, counter 1 and its initial KSN.
        hex::decode("FFFF9876543210E00001").unwrap_or_default(),
        hex::decode("FFFF9876543210E00000").unwrap_or_default(),
        // Counter with exactly 10 one-bits, and with 11.
        hex::decode("FFFF9876543210E003FF").unwrap_or_default(),
        hex::decode("FFFF9876543210E007FF").unwrap_or_default(),
        // X9.24-3 AES KSN: initial key id 1234567890123456, counters 1 and 0x0000FFFF.
        hex::decode("123456789012345600000001").unwrap_or_default(),
        hex::decode("12345678901234560000FFFF").unwrap_or_default(),
        hex::decode("1234567890123456FFFF0000").unwrap_or_default(),
        hex::decode("123456789012345600000000").unwrap_or_default(),
    ]
}
