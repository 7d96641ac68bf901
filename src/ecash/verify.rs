//! The payment verdicts and [`check_payment`], the one place the offline payment rules
//! live (terminals and the ledger both call it).

use std::fmt;

use openssl::sha::Sha256;

use super::format::{KeyRole, Presented, Signable, Signed};
use super::sig::PublicKey;

/// The outcome of checking a presented payment.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Valid,
    BadSignature,
    UnknownKeyVersion,
    CertExpired,
    VoucherExpired,
    WrongDevice,
    BalanceMismatch,
    LimitExceeded,
    ChainBroken,
    WrongChallenge,
    BundleInvalid,
}

impl Verdict {
    /// Stable SCREAMING_SNAKE name (logs, audit lines, wire enums).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Valid => "VALID",
            Verdict::BadSignature => "BAD_SIGNATURE",
            Verdict::UnknownKeyVersion => "UNKNOWN_KEY_VERSION",
            Verdict::CertExpired => "CERT_EXPIRED",
            Verdict::VoucherExpired => "VOUCHER_EXPIRED",
            Verdict::WrongDevice => "WRONG_DEVICE",
            Verdict::BalanceMismatch => "BALANCE_MISMATCH",
            Verdict::LimitExceeded => "LIMIT_EXCEEDED",
            Verdict::ChainBroken => "CHAIN_BROKEN",
            Verdict::WrongChallenge => "WRONG_CHALLENGE",
            Verdict::BundleInvalid => "BUNDLE_INVALID",
        }
    }

    /// Every verdict, in declaration order.
    pub const ALL: [Verdict; 11] = [
        Verdict::Valid,
        Verdict::BadSignature,
        Verdict::UnknownKeyVersion,
        Verdict::CertExpired,
        Verdict::VoucherExpired,
        Verdict::WrongDevice,
        Verdict::BalanceMismatch,
        Verdict::LimitExceeded,
        Verdict::ChainBroken,
        Verdict::WrongChallenge,
        Verdict::BundleInvalid,
    ];
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the verifier finds the issuer keys (a terminal's [`super::VerifiedBundle`],
/// the appliance's key catalogue).
pub trait KeySource {
    /// The public key of `role` version `version`, if trusted (not retired) and valid
    /// at unix time `at`.
    fn key(&self, role: KeyRole, version: u32, at: u64) -> Option<&PublicKey>;
}

/// Checks a presented payment; the first failing rule decides (docs/ecash-format.md,
/// "Payment rules"):
///
/// 1. certificate: `device.ca` version `ca_key_version` known at `not_before`, else
///    UnknownKeyVersion; signature, else BadSignature; the payment's `terminal_time` in
///    `[not_before, not_after]`, else CertExpired.
/// 2. voucher: `voucher.issuer` version `issuer_key_version` known at `issued_at`, else
///    UnknownKeyVersion; signature, else BadSignature; device id the certificate's,
///    else WrongDevice; `terminal_time` in `[issued_at, expires_at]`, else
///    VoucherExpired; balance `<= max_balance`, else LimitExceeded.
/// 3. payment: device id, voucher id and currency the voucher's, else WrongDevice;
///    signature under the certificate's device key, else BadSignature; amount `<=
///    max_single_payment`, else LimitExceeded; counter `> counter_at_issue`, else
///    ChainBroken; `counter - counter_at_issue <= max_consecutive_offline`, else
///    LimitExceeded.
/// 4. chain: without `previous`, counter `= counter_at_issue + 1` and `prev_hash =`
///    the voucher's hash, else ChainBroken; the base balance is the voucher's. With
///    `previous`: signed by the device key, else BadSignature; same voucher, device and
///    currency, a payment of this voucher (`counter > counter_at_issue`), counter one
///    less and hash equal to `prev_hash`, else ChainBroken; its `balance_after` (at most
///    the voucher's balance, else BalanceMismatch) is the base. `base - amount` must be
///    exactly `balance_after`, else BalanceMismatch.
///
/// Every time rule judges the payment at its `terminal_time` (which the device
/// signed); `now` is the verifier's clock and is not used by the current rules (kept so
/// callers need not change when a clock rule is added; a terminal passes its challenge
/// time). Four signature verifications at most.
pub fn check_payment(keys: &dyn KeySource, p: &Presented, now: u64) -> Verdict {
    check_payment_memo(keys, p, now, &NoMemo)
}

/// [`check_payment`], skipping signature checks `memo` has already seen succeed (a
/// ledger verifying a device's upload checks its certificate and voucher once, and
/// each payment once although it is also the next one's `previous`). Same verdicts.
pub fn check_payment_memo(keys: &dyn KeySource, p: &Presented, now: u64, memo: &dyn SignatureMemo) -> Verdict {
    let _ = now;
    match check(keys, p, memo) {
        Ok(()) => Verdict::Valid,
        Err(v) => v,
    }
}

/// Signature checks that succeeded, each identified by SHA-256(object hash || SEC1 of
/// the verifying key): an entry means "these exact bytes verified under this exact key".
pub trait SignatureMemo {
    fn seen(&self, id: &[u8; 32]) -> bool;
    fn remember(&self, id: [u8; 32]);
}

/// Remembers nothing.
pub struct NoMemo;

impl SignatureMemo for NoMemo {
    fn seen(&self, _: &[u8; 32]) -> bool {
        false
    }
    fn remember(&self, _: [u8; 32]) {}
}

fn verify<T: Signable>(s: &Signed<T>, key: &PublicKey, memo: &dyn SignatureMemo) -> Result<(), Verdict> {
    let mut h = Sha256::new();
    h.update(&s.hash());
    h.update(key.raw());
    let id = h.finish();
    if memo.seen(&id) {
        return Ok(());
    }
    s.verify(key).map_err(|_| Verdict::BadSignature)?;
    memo.remember(id);
    Ok(())
}

fn check(keys: &dyn KeySource, p: &Presented, memo: &dyn SignatureMemo) -> Result<(), Verdict> {
    let cert = &p.certificate.body;
    let voucher = &p.voucher.body;
    let pay = &p.payment.body;
    let t = pay.terminal_time;

    // 1. certificate
    let ca = keys
        .key(KeyRole::DeviceCa, cert.ca_key_version, cert.not_before)
        .ok_or(Verdict::UnknownKeyVersion)?;
    verify(&p.certificate, ca, memo)?;
    if t < cert.not_before || t > cert.not_after {
        return Err(Verdict::CertExpired);
    }

    // 2. voucher
    let issuer = keys
        .key(KeyRole::VoucherIssuer, voucher.issuer_key_version, voucher.issued_at)
        .ok_or(Verdict::UnknownKeyVersion)?;
    verify(&p.voucher, issuer, memo)?;
    if voucher.device_id != cert.device_id {
        return Err(Verdict::WrongDevice);
    }
    if t > voucher.expires_at || t < voucher.issued_at {
        return Err(Verdict::VoucherExpired);
    }
    if voucher.balance > cert.limits.max_balance {
        return Err(Verdict::LimitExceeded);
    }

    // 3. payment
    if pay.device_id != voucher.device_id || pay.voucher_id != voucher.voucher_id || pay.currency != voucher.currency {
        return Err(Verdict::WrongDevice);
    }
    let device = PublicKey::from_sec1(&cert.device_public_key).map_err(|_| Verdict::BadSignature)?;
    verify(&p.payment, &device, memo)?;
    if pay.amount > cert.limits.max_single_payment {
        return Err(Verdict::LimitExceeded);
    }
    if pay.counter <= voucher.counter_at_issue {
        return Err(Verdict::ChainBroken);
    }
    if pay.counter - voucher.counter_at_issue > u64::from(cert.limits.max_consecutive_offline) {
        return Err(Verdict::LimitExceeded);
    }

    // 4. chain
    let base = match &p.previous {
        None => {
            if voucher.counter_at_issue.checked_add(1) != Some(pay.counter) || pay.prev_hash != p.voucher.hash() {
                return Err(Verdict::ChainBroken);
            }
            voucher.balance
        }
        Some(prev_signed) => {
            verify(prev_signed, &device, memo)?;
            let prev = &prev_signed.body;
            let same = prev.voucher_id == voucher.voucher_id
                && prev.device_id == voucher.device_id
                && prev.currency == voucher.currency
                && prev.counter > voucher.counter_at_issue
                && prev.counter.checked_add(1) == Some(pay.counter);
            if !same || pay.prev_hash != prev_signed.hash() {
                return Err(Verdict::ChainBroken);
            }
            if prev.balance_after > voucher.balance {
                return Err(Verdict::BalanceMismatch);
            }
            prev.balance_after
        }
    };
    if base.checked_sub(pay.amount) != Some(pay.balance_after) {
        return Err(Verdict::BalanceMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecash::format::{DeviceCertificate, OfflineLimits, Payment, Signed, Voucher};
    use crate::ecash::testkit::*;

    #[test]
    fn names_are_stable_and_distinct() {
        let names: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            names,
            [
                "VALID",
                "BAD_SIGNATURE",
                "UNKNOWN_KEY_VERSION",
                "CERT_EXPIRED",
                "VOUCHER_EXPIRED",
                "WRONG_DEVICE",
                "BALANCE_MISMATCH",
                "LIMIT_EXCEEDED",
                "CHAIN_BROKEN",
                "WRONG_CHALLENGE",
                "BUNDLE_INVALID"
            ]
        );
        assert_eq!(Verdict::ChainBroken.to_string(), "CHAIN_BROKEN");
    }

    /// A kit whose wallet made one payment: (kit, first presented payment).
    fn first() -> (Kit, Presented) {
        let mut k = Kit::new();
        let (_, p) = k.pay(1_000);
        (k, p)
    }

    fn check(k: &Kit, p: &Presented) -> Verdict {
        check_payment(&k.bundle, p, p.payment.body.terminal_time)
    }

    /// Re-signs `p`'s payment body after `f` changed it (a device that signs anything).
    fn forge(k: &Kit, p: &Presented, f: impl FnOnce(&mut Payment)) -> Presented {
        let mut body = p.payment.body.clone();
        f(&mut body);
        Presented {
            payment: k.wallet.sign_payment_unchecked(body).unwrap(),
            ..p.clone()
        }
    }

    fn with_cert(k: &Kit, p: &Presented, f: impl FnOnce(&mut DeviceCertificate)) -> Presented {
        let mut body = p.certificate.body.clone();
        f(&mut body);
        Presented {
            certificate: Signed::sign_unchecked(body, &k.ca).unwrap(),
            ..p.clone()
        }
    }

    fn with_voucher(k: &Kit, p: &Presented, f: impl FnOnce(&mut Voucher)) -> Presented {
        let mut body = p.voucher.body.clone();
        f(&mut body);
        let voucher = Signed::sign_unchecked(body, &k.issuer).unwrap();
        // Keep the chain pointing at the new voucher, so only the intended rule fails.
        let hash = voucher.hash();
        let p = Presented { voucher, ..p.clone() };
        forge(k, &p, |b| b.prev_hash = hash)
    }

    #[test]
    fn valid() {
        let (mut k, p) = first();
        assert_eq!(check(&k, &p), Verdict::Valid);
        let (_, p2) = k.pay(2_000);
        assert_eq!(check(&k, &p2), Verdict::Valid);
        assert_eq!(p2.payment.body.balance_after, VOUCHER_BALANCE - 3_000);
    }

    /// Records every remembered check.
    #[derive(Default)]
    struct Memo(std::cell::RefCell<std::collections::HashSet<[u8; 32]>>);

    impl SignatureMemo for Memo {
        fn seen(&self, id: &[u8; 32]) -> bool {
            self.0.borrow().contains(id)
        }
        fn remember(&self, id: [u8; 32]) {
            self.0.borrow_mut().insert(id);
        }
    }

    /// An Ed25519 `voucher.issuer` version next to the P-256 one: its vouchers verify
    /// through the bundle, a changed byte or the other version's key does not.
    #[test]
    fn ed25519_issuer_keys_verify_through_the_bundle() {
        use crate::ecash::format::{TrustBundle, TrustedKey, Voucher};
        use crate::ecash::sig::KeyAlgorithm;
        use openssl::pkey::PKey;
        use openssl::sign::Signer;

        let mut k = Kit::new();
        let ed = PKey::generate_ed25519().unwrap();
        let mut body = k.bundle_signed.body.clone();
        body.bundle_version += 1;
        body.keys.push(TrustedKey {
            role: KeyRole::VoucherIssuer,
            algorithm: KeyAlgorithm::Ed25519,
            version: 2,
            public_key: ed.raw_public_key().unwrap(),
            not_before: 0,
            not_after: u64::MAX,
        });
        let bundle = Signed::sign(body, &k.root).unwrap();
        let roots = [(1, k.root.public_key())];
        let vb = TrustBundle::verify(&bundle.encode(), &roots, 0).unwrap();
        assert_eq!(Signed::<TrustBundle>::decode(&bundle.encode()).unwrap(), bundle);

        let voucher_body = Voucher {
            voucher_id: [9; 16],
            counter_at_issue: k.wallet.counter(),
            issuer_key_version: 2,
            ..k.voucher.body.clone()
        };
        let signature: [u8; 64] = Signer::new_without_digest(&ed)
            .unwrap()
            .sign_oneshot_to_vec(&voucher_body.tbs())
            .unwrap()
            .try_into()
            .unwrap();
        let voucher = Signed { body: voucher_body, signature };
        assert_eq!(Signed::<Voucher>::decode(&voucher.encode()).unwrap(), voucher);
        k.wallet.load_voucher(voucher.clone()).unwrap();
        k.voucher = voucher;
        let (_, p) = k.pay(1_000);
        assert_eq!(check_payment(&vb, &p, 0), Verdict::Valid);
        // The terminal's old bundle has no version 2.
        assert_eq!(check(&k, &p), Verdict::UnknownKeyVersion);
        let mut x = p.clone();
        x.voucher.signature[10] ^= 1;
        assert_eq!(check_payment(&vb, &x, 0), Verdict::BadSignature);
        let mut y = p.clone();
        y.voucher.body.issuer_key_version = 1;
        assert_eq!(check_payment(&vb, &y, 0), Verdict::BadSignature);
    }

    #[test]
    fn memo_skips_only_what_verified_under_the_same_key() {
        let (mut k, p) = first();
        let memo = Memo::default();
        let t = p.payment.body.terminal_time;
        assert_eq!(check_payment_memo(&k.bundle, &p, t, &memo), Verdict::Valid);
        assert_eq!(memo.0.borrow().len(), 3, "certificate, voucher, payment");
        assert_eq!(check_payment_memo(&k.bundle, &p, t, &memo), Verdict::Valid);
        assert_eq!(memo.0.borrow().len(), 3);
        // The next payment: its previous payment is already known.
        let (_, p2) = k.pay(10);
        assert_eq!(check_payment_memo(&k.bundle, &p2, t, &memo), Verdict::Valid);
        assert_eq!(memo.0.borrow().len(), 4);
        // A payment known good under its device key is checked again under another
        // certificate's key (a certificate of the same device id with a rogue key, which
        // does not decode: ids derive from keys; made in memory here).
        let rogue = crate::ecash::sig::SigningKey::generate().unwrap();
        let ca = &k.ca;
        let mut body = p.certificate.body.clone();
        body.device_public_key = rogue.sec1();
        let x = Presented { certificate: Signed::sign_unchecked(body, ca).unwrap(), ..p.clone() };
        assert_eq!(check_payment_memo(&k.bundle, &x, t, &memo), Verdict::BadSignature);
        // Bad signatures are never remembered.
        let mut y = p.clone();
        y.voucher.signature = p.certificate.signature;
        assert_eq!(check_payment_memo(&k.bundle, &y, t, &memo), Verdict::BadSignature);
        assert_eq!(check_payment_memo(&k.bundle, &y, t, &memo), Verdict::BadSignature);
    }

    #[test]
    fn bad_signature() {
        let (mut k, p) = first();
        // Certificate, voucher, payment and previous payment signatures.
        let mut x = p.clone();
        x.certificate.signature = k.voucher.signature;
        assert_eq!(check(&k, &x), Verdict::BadSignature);
        let mut x = p.clone();
        x.voucher.signature = k.certificate.signature;
        assert_eq!(check(&k, &x), Verdict::BadSignature);
        let mut x = p.clone();
        x.payment.body.amount += 1;
        x.payment.body.balance_after -= 1;
        assert_eq!(check(&k, &x), Verdict::BadSignature);
        // A certificate signed by another key of the same version.
        let rogue = crate::ecash::sig::SigningKey::generate().unwrap();
        let x = Presented {
            certificate: Signed::sign(p.certificate.body.clone(), &rogue).unwrap(),
            ..p.clone()
        };
        assert_eq!(check(&k, &x), Verdict::BadSignature);
        let (_, mut p2) = k.pay(10);
        let prev = p2.previous.as_mut().unwrap();
        prev.signature = p.voucher.signature;
        assert_eq!(check(&k, &p2), Verdict::BadSignature);
    }

    #[test]
    fn unknown_key_version() {
        let (k, p) = first();
        let x = with_cert(&k, &p, |c| c.ca_key_version = 2);
        assert_eq!(check(&k, &x), Verdict::UnknownKeyVersion);
        let x = with_voucher(&k, &p, |v| v.issuer_key_version = 9);
        assert_eq!(check(&k, &x), Verdict::UnknownKeyVersion);
        // Signed before the CA key's validity.
        let x = with_cert(&k, &p, |c| c.not_before = KEY_NOT_BEFORE - 1);
        assert_eq!(check(&k, &x), Verdict::UnknownKeyVersion);
    }

    #[test]
    fn cert_expired() {
        let (k, p) = first();
        let t = p.payment.body.terminal_time;
        let x = with_cert(&k, &p, |c| c.not_after = t - 1);
        assert_eq!(check(&k, &x), Verdict::CertExpired);
        let x = with_cert(&k, &p, |c| {
            c.not_before = t + 1;
            c.not_after = t + 1000;
        });
        assert_eq!(check(&k, &x), Verdict::CertExpired);
        // Boundaries are inclusive.
        let x = with_cert(&k, &p, |c| c.not_after = t);
        assert_eq!(check(&k, &x), Verdict::Valid);
    }

    #[test]
    fn voucher_expired() {
        let (k, p) = first();
        let t = p.payment.body.terminal_time;
        let x = with_voucher(&k, &p, |v| {
            v.issued_at = t - 100;
            v.expires_at = t - 1;
        });
        assert_eq!(check(&k, &x), Verdict::VoucherExpired);
        let x = with_voucher(&k, &p, |v| {
            v.issued_at = t + 1;
            v.expires_at = t + 100;
        });
        assert_eq!(check(&k, &x), Verdict::VoucherExpired);
        let x = with_voucher(&k, &p, |v| v.expires_at = t);
        assert_eq!(check(&k, &x), Verdict::Valid);
    }

    #[test]
    fn wrong_device() {
        let (k, p) = first();
        // Voucher for another device.
        let x = with_voucher(&k, &p, |v| v.device_id = [0xEE; 16]);
        assert_eq!(check(&k, &x), Verdict::WrongDevice);
        // Payment naming another voucher, another device, another currency.
        let x = forge(&k, &p, |b| b.voucher_id = [0xEE; 16]);
        assert_eq!(check(&k, &x), Verdict::WrongDevice);
        let x = forge(&k, &p, |b| b.device_id = [0xEE; 16]);
        assert_eq!(check(&k, &x), Verdict::WrongDevice);
        let x = forge(&k, &p, |b| b.currency = *b"USD");
        assert_eq!(check(&k, &x), Verdict::WrongDevice);
    }

    #[test]
    fn balance_mismatch() {
        let (mut k, p) = first();
        let x = forge(&k, &p, |b| b.balance_after += 1);
        assert_eq!(check(&k, &x), Verdict::BalanceMismatch);
        let x = forge(&k, &p, |b| b.balance_after -= 1);
        assert_eq!(check(&k, &x), Verdict::BalanceMismatch);
        // Amount above the remaining balance (no wrap-around).
        let x = with_voucher(&k, &p, |v| v.balance = 10);
        let x = forge(&k, &x, |b| b.balance_after = 10u64.wrapping_sub(b.amount));
        assert_eq!(check(&k, &x), Verdict::BalanceMismatch);
        // Second payment computed from a wrong base.
        let (_, p2) = k.pay(500);
        let x = forge(&k, &p2, |b| b.balance_after = VOUCHER_BALANCE - 500);
        assert_eq!(check(&k, &x), Verdict::BalanceMismatch);
        // A previous payment claiming more than the voucher holds.
        let mut prev = p2.previous.clone().unwrap().body;
        prev.balance_after = VOUCHER_BALANCE + 1;
        let prev = k.wallet.sign_payment_unchecked(prev).unwrap();
        let hash = prev.hash();
        let x = Presented {
            previous: Some(prev),
            ..p2.clone()
        };
        let x = forge(&k, &x, |b| {
            b.prev_hash = hash;
            b.balance_after = VOUCHER_BALANCE + 1 - 500;
        });
        assert_eq!(check(&k, &x), Verdict::BalanceMismatch);
    }

    #[test]
    fn limit_exceeded() {
        let (k, p) = first();
        // Voucher above the certificate's max balance.
        let x = with_voucher(&k, &p, |v| v.balance = MAX_BALANCE + 1);
        assert_eq!(check(&k, &x), Verdict::LimitExceeded);
        // Amount above the single-payment limit.
        let x = forge(&k, &p, |b| {
            b.amount = MAX_SINGLE + 1;
            b.balance_after = VOUCHER_BALANCE - MAX_SINGLE - 1;
        });
        assert_eq!(check(&k, &x), Verdict::LimitExceeded);
        // Too many consecutive offline payments: one allowed, the second refused.
        let one = |c: &mut DeviceCertificate| {
            c.limits = OfflineLimits {
                max_consecutive_offline: 1,
                ..c.limits
            }
        };
        assert_eq!(check(&k, &with_cert(&k, &p, one)), Verdict::Valid);
        let mut k = k;
        let (_, p2) = k.pay(100);
        assert_eq!(check(&k, &p2), Verdict::Valid);
        assert_eq!(check(&k, &with_cert(&k, &p2, one)), Verdict::LimitExceeded);
    }

    #[test]
    fn chain_broken() {
        let (mut k, p) = first();
        // First payment not pointing at the voucher.
        let x = forge(&k, &p, |b| b.prev_hash = [0; 32]);
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        // First payment skipping a counter value.
        let x = forge(&k, &p, |b| b.counter += 1);
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        // Counter at or below the voucher's.
        let x = forge(&k, &p, |b| b.counter = VOUCHER_COUNTER);
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        let (_, p2) = k.pay(100);
        assert_eq!(check(&k, &p2), Verdict::Valid);
        // Second payment presented without its predecessor.
        let x = Presented {
            previous: None,
            ..p2.clone()
        };
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        // Predecessor with another hash, another counter gap, or of another voucher.
        let x = forge(&k, &p2, |b| b.prev_hash = p.voucher.hash());
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        let x = forge(&k, &p2, |b| b.counter += 1);
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        let mut prev = p.payment.body.clone();
        prev.voucher_id = [0xEE; 16];
        let prev = k.wallet.sign_payment_unchecked(prev).unwrap();
        let hash = prev.hash();
        let x = forge(
            &k,
            &Presented {
                previous: Some(prev),
                ..p2.clone()
            },
            |b| b.prev_hash = hash,
        );
        assert_eq!(check(&k, &x), Verdict::ChainBroken);
        // A predecessor at the voucher's own counter is not a payment of the voucher.
        let x = forge(&k, &p, |b| b.counter = VOUCHER_COUNTER);
        let hash = x.payment.hash();
        let y = forge(
            &k,
            &Presented {
                previous: Some(x.payment.clone()),
                ..p.clone()
            },
            |b| b.prev_hash = hash,
        );
        assert_eq!(check(&k, &y), Verdict::ChainBroken);
    }

    #[test]
    fn first_failure_wins() {
        let (k, p) = first();
        // Expired certificate and a bad balance: the certificate rule comes first.
        let x = with_cert(&k, &p, |c| c.not_after = p.payment.body.terminal_time - 1);
        let x = forge(&k, &x, |b| b.balance_after += 1);
        assert_eq!(check(&k, &x), Verdict::CertExpired);
        // Unknown key version beats a bad signature.
        let mut y = with_cert(&k, &p, |c| c.ca_key_version = 5);
        y.certificate.signature = p.voucher.signature;
        assert_eq!(check(&k, &y), Verdict::UnknownKeyVersion);
    }
}
