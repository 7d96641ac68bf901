//! E-cash signed objects (src/ecash/format.rs): `Signed::<T>::decode` for the
//! certification request, the device certificate, the voucher, the payment and the
//! trust bundle (strict tbs decoding, field rules, the low-S signature check of
//! device-signed objects). The first input byte picks the kind, the rest is the wire
//! encoding.
//!
//! Invariants: encode(decode(b)) == b; `hash()` is SHA-256 of the wire bytes; a
//! decoded body passes its own `validate` and decodes again from its tbs.
#![no_main]

use keyward::ecash::{CertificationRequest, DeviceCertificate, Payment, Signable, Signed, TrustBundle, Voucher};
use libfuzzer_sys::fuzz_target;

fn check<T: Signable>(b: &[u8]) {
    if let Ok(s) = Signed::<T>::decode(b) {
        assert_eq!(s.encode(), b, "{} round trip", T::KIND);
        assert_eq!(s.hash(), openssl::sha::sha256(b), "{} hash", T::KIND);
        assert!(s.body.validate().is_ok(), "{} decoded but breaks its rules", T::KIND);
        let tbs = s.body.tbs();
        assert_eq!(tbs.as_slice(), &b[..b.len() - 64]);
        assert_eq!(T::decode_tbs(&tbs).as_ref().ok(), Some(&s.body));
    }
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 5 {
        0 => check::<CertificationRequest>(rest),
        1 => check::<DeviceCertificate>(rest),
        2 => check::<Voucher>(rest),
        3 => check::<Payment>(rest),
        _ => check::<TrustBundle>(rest),
    }
});

fn seeds() -> Vec<Vec<u8>> {
    let Ok(k) = keyward_fuzz::ecash_kit::build() else { return Vec::new() };
    let with = |kind: u8, b: Vec<u8>| {
        let mut v = vec![kind];
        v.extend(b);
        v
    };
    let mut out = vec![
        with(0, k.request.encode()),
        with(1, k.certificate.encode()),
        with(2, k.voucher.encode()),
        with(4, k.bundle.encode()),
    ];
    for (_, p) in &k.payments {
        out.push(with(3, p.payment.encode()));
    }
    out
}
