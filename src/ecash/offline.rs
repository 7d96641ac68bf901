//! The offline side: a merchant [`Terminal`] (challenges, trust-bundle updates,
//! offline verification) and a simulated secure-element [`Wallet`] (device key,
//! certificate, voucher, counter, payment log).

use std::fmt;

use super::bundle::VerifiedBundle;
use super::format::{
    check_printable, device_id_of, CertificationRequest, DeviceCertificate, Payment, Presented, Signable, Signed,
    TrustBundle, Voucher, MAX_MERCHANT_ID, MAX_TERMINAL_ID,
};
use super::sig::{PublicKey, SigningKey};
use super::verify::{check_payment, Verdict};
use super::EcashError;

/// A terminal's challenge: 16 random bytes and the terminal's clock when issued. The
/// payment answering it must carry both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub bytes: [u8; 16],
    pub terminal_time: u64,
}

/// A merchant terminal: its ids, the `ecash.root` keys it trusts, and the newest trust
/// bundle it has accepted.
pub struct Terminal {
    terminal_id: String,
    merchant_id: String,
    roots: Vec<(u32, PublicKey)>,
    bundle: Option<VerifiedBundle>,
}

impl Terminal {
    /// A terminal with no bundle yet. Ids: 1..=16 (terminal) and 1..=32 (merchant)
    /// printable ASCII characters (0x21..=0x7E), the payment format's rules.
    pub fn new(terminal_id: &str, merchant_id: &str, roots: Vec<(u32, PublicKey)>) -> Result<Terminal, EcashError> {
        check_printable("terminal", "terminal_id", terminal_id, MAX_TERMINAL_ID)?;
        check_printable("terminal", "merchant_id", merchant_id, MAX_MERCHANT_ID)?;
        Ok(Terminal {
            terminal_id: terminal_id.to_owned(),
            merchant_id: merchant_id.to_owned(),
            roots,
            bundle: None,
        })
    }

    pub fn terminal_id(&self) -> &str {
        &self.terminal_id
    }

    pub fn merchant_id(&self) -> &str {
        &self.merchant_id
    }

    /// The bundle held, if any.
    pub fn bundle(&self) -> Option<&VerifiedBundle> {
        self.bundle.as_ref()
    }

    /// Verifies and installs a trust bundle; returns its version. Refuses a bundle older
    /// than the one held ([`EcashError::OlderBundle`]). A bundle of the version held is a
    /// refresh: with the same keys and root version it changes nothing (another
    /// appliance, or a restart, signs the same content with another issue time and
    /// signature); with other keys it is refused ([`EcashError::BundleConflict`]). On
    /// refusal the held bundle stays.
    pub fn update_bundle(&mut self, encoded: &[u8]) -> Result<u64, EcashError> {
        let held = self.bundle.as_ref();
        let min = held.map_or(0, VerifiedBundle::version);
        let verified = TrustBundle::verify(encoded, &self.roots, min)?;
        if let Some(h) = held {
            if verified.version() == h.version() {
                let (new, old) = (verified.bundle(), h.bundle());
                if new.keys != old.keys || new.root_key_version != old.root_key_version {
                    return Err(EcashError::BundleConflict(h.version()));
                }
                return Ok(h.version());
            }
        }
        let version = verified.version();
        self.bundle = Some(verified);
        Ok(version)
    }

    /// A fresh challenge (16 bytes from openssl's CSPRNG) stamped with `now`.
    pub fn challenge(&self, now: u64) -> Result<Challenge, EcashError> {
        let mut bytes = [0u8; 16];
        openssl::rand::rand_bytes(&mut bytes).map_err(|_| EcashError::Crypto("random challenge"))?;
        Ok(Challenge {
            bytes,
            terminal_time: now,
        })
    }

    /// Offline verification of a payment answering `challenge` for `amount`:
    /// the payment's challenge, terminal time, terminal id, merchant id and amount must
    /// be this terminal's request (else [`Verdict::WrongChallenge`]: a payment for a
    /// different amount answers a different request), then [`check_payment`] against
    /// `bundle` at the challenge's time.
    pub fn verify_offline(
        &self,
        bundle: &VerifiedBundle,
        challenge: &Challenge,
        amount: u64,
        presented: &Presented,
    ) -> Result<(), Verdict> {
        let pay = &presented.payment.body;
        let answers = pay.challenge == challenge.bytes
            && pay.terminal_time == challenge.terminal_time
            && pay.terminal_id == self.terminal_id
            && pay.merchant_id == self.merchant_id
            && pay.amount == amount;
        if !answers {
            return Err(Verdict::WrongChallenge);
        }
        match check_payment(bundle, presented, challenge.terminal_time) {
            Verdict::Valid => Ok(()),
            v => Err(v),
        }
    }

    /// [`Terminal::verify_offline`] with the held bundle; [`Verdict::BundleInvalid`]
    /// when the terminal holds none.
    pub fn verify_with_held_bundle(
        &self,
        challenge: &Challenge,
        amount: u64,
        presented: &Presented,
    ) -> Result<(), Verdict> {
        let bundle = self.bundle.as_ref().ok_or(Verdict::BundleInvalid)?;
        self.verify_offline(bundle, challenge, amount, presented)
    }
}

impl fmt::Debug for Terminal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terminal")
            .field("terminal_id", &self.terminal_id)
            .field("merchant_id", &self.merchant_id)
            .field("roots", &self.roots.iter().map(|(v, _)| *v).collect::<Vec<_>>())
            .field("bundle_version", &self.bundle.as_ref().map(VerifiedBundle::version))
            .finish()
    }
}

/// Why a wallet refused. Nothing changes in the wallet on a refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("insufficient balance")]
    InsufficientBalance,
    #[error("offline limit exceeded: {0}")]
    LimitExceeded(&'static str),
    #[error("no device certificate installed")]
    NoCertificate,
    #[error("no voucher loaded")]
    NoVoucher,
    /// A certificate or voucher that is not for this wallet (device id, key, counter).
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error(transparent)]
    Ecash(#[from] EcashError),
}

/// A simulated secure element: a device id, a P-256 key generated inside and never
/// exported, the installed certificate and voucher, the payment counter, the remaining
/// balance and the log of its signed payments. Debug shows no key material.
pub struct Wallet {
    device_id: [u8; 16],
    key: SigningKey,
    certificate: Option<Signed<DeviceCertificate>>,
    voucher: Option<Signed<Voucher>>,
    balance: u64,
    counter: u64,
    /// The last payment of the current voucher.
    last: Option<Signed<Payment>>,
    log: Vec<Signed<Payment>>,
}

impl Wallet {
    /// A new wallet with a fresh device key (its device id derived from it, see
    /// [`device_id_of`]), counter 0, no certificate or voucher.
    pub fn new() -> Result<Wallet, WalletError> {
        let key = SigningKey::generate()?;
        Ok(Wallet {
            device_id: device_id_of(&key.sec1()),
            key,
            certificate: None,
            voucher: None,
            balance: 0,
            counter: 0,
            last: None,
            log: Vec::new(),
        })
    }

    pub fn device_id(&self) -> [u8; 16] {
        self.device_id
    }

    /// The device public key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// A certification request for `account_ref` (1..=64 bytes), signed by the device
    /// key.
    pub fn certification_request(
        &self,
        account_ref: &[u8],
        now: u64,
    ) -> Result<Signed<CertificationRequest>, WalletError> {
        let body = CertificationRequest {
            device_id: self.device_id,
            device_public_key: self.key.sec1(),
            account_ref: account_ref.to_vec(),
            timestamp: now,
        };
        Ok(Signed::sign(body, &self.key)?)
    }

    /// Installs a device certificate; it must carry this wallet's device id and public
    /// key (the CA signature is the terminals' business: the wallet holds no roots).
    /// Replaces any earlier certificate; the voucher stays.
    pub fn install_certificate(&mut self, cert: Signed<DeviceCertificate>) -> Result<(), WalletError> {
        cert.body.validate()?;
        if cert.body.device_id != self.device_id {
            return Err(WalletError::Refused("certificate for another device"));
        }
        if cert.body.device_public_key != self.key.sec1() {
            return Err(WalletError::Refused("certificate for another key"));
        }
        self.certificate = Some(cert);
        Ok(())
    }

    /// Loads a voucher: needs a certificate; the voucher's device id must be this
    /// wallet's, its `counter_at_issue` the wallet's current counter and its balance at
    /// most the certificate's `max_balance`. The voucher REPLACES any earlier one: the
    /// earlier voucher's remaining balance is dropped from the wallet (the issuer folds
    /// it into the new voucher's balance, knowing it from the counter and the uploaded
    /// payments), and its payment chain ends.
    pub fn load_voucher(&mut self, voucher: Signed<Voucher>) -> Result<(), WalletError> {
        voucher.body.validate()?;
        let cert = self.certificate.as_ref().ok_or(WalletError::NoCertificate)?;
        if voucher.body.device_id != self.device_id {
            return Err(WalletError::Refused("voucher for another device"));
        }
        if voucher.body.counter_at_issue != self.counter {
            return Err(WalletError::Refused("voucher issued at another counter"));
        }
        if voucher.body.balance > cert.body.limits.max_balance {
            return Err(WalletError::LimitExceeded("voucher balance above max_balance"));
        }
        self.balance = voucher.body.balance;
        self.voucher = Some(voucher);
        self.last = None;
        Ok(())
    }

    /// Remaining balance of the current voucher (0 without one).
    pub fn balance(&self) -> u64 {
        self.balance
    }

    /// The payment counter: the counter of the last payment signed (0 before any).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Every payment this wallet signed, oldest first.
    pub fn log(&self) -> &[Signed<Payment>] {
        &self.log
    }

    pub fn certificate(&self) -> Option<&Signed<DeviceCertificate>> {
        self.certificate.as_ref()
    }

    pub fn voucher(&self) -> Option<&Signed<Voucher>> {
        self.voucher.as_ref()
    }

    /// Pays `amount` answering `challenge`: refuses (changing nothing) amount 0, no
    /// certificate or voucher, amount above the balance, above `max_single_payment`, or
    /// a payment beyond `max_consecutive_offline` since the voucher. On success the
    /// counter advances, the balance drops, the payment joins the log, and the result
    /// carries the previous payment of this voucher (if any).
    pub fn pay(
        &mut self,
        challenge: &Challenge,
        amount: u64,
        merchant_id: &str,
        terminal_id: &str,
    ) -> Result<Presented, WalletError> {
        if amount == 0 {
            return Err(WalletError::ZeroAmount);
        }
        let cert = self.certificate.as_ref().ok_or(WalletError::NoCertificate)?;
        let voucher = self.voucher.as_ref().ok_or(WalletError::NoVoucher)?;
        let balance_after = self
            .balance
            .checked_sub(amount)
            .ok_or(WalletError::InsufficientBalance)?;
        let limits = cert.body.limits;
        if amount > limits.max_single_payment {
            return Err(WalletError::LimitExceeded("amount above max_single_payment"));
        }
        let counter = self
            .counter
            .checked_add(1)
            .ok_or(WalletError::LimitExceeded("counter exhausted"))?;
        let offline = counter.saturating_sub(voucher.body.counter_at_issue);
        if offline > u64::from(limits.max_consecutive_offline) {
            return Err(WalletError::LimitExceeded("too many consecutive offline payments"));
        }
        let prev_hash = match &self.last {
            Some(p) => p.hash(),
            None => voucher.hash(),
        };
        let body = Payment {
            voucher_id: voucher.body.voucher_id,
            device_id: self.device_id,
            counter,
            prev_hash,
            amount,
            balance_after,
            currency: voucher.body.currency,
            merchant_id: merchant_id.to_owned(),
            terminal_id: terminal_id.to_owned(),
            challenge: challenge.bytes,
            terminal_time: challenge.terminal_time,
        };
        let payment = Signed::sign(body, &self.key)?;
        let presented = Presented {
            certificate: cert.clone(),
            voucher: voucher.clone(),
            previous: self.last.clone(),
            payment: payment.clone(),
        };
        self.counter = counter;
        self.balance = balance_after;
        self.last = Some(payment.clone());
        self.log.push(payment);
        Ok(presented)
    }

    /// FOR SIMULATORS AND TESTS: signs any payment body with the device key, without
    /// the format rules or the wallet's checks, and without touching counter, balance or
    /// log; how tests forge payments a genuine secure element would never sign.
    pub fn sign_payment_unchecked(&self, body: Payment) -> Result<Signed<Payment>, EcashError> {
        Signed::sign_unchecked(body, &self.key)
    }
}

impl fmt::Debug for Wallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wallet")
            .field("device_id", &hex::encode(self.device_id))
            .field("key", &self.key)
            .field("certificate", &self.certificate.is_some())
            .field(
                "voucher",
                &self.voucher.as_ref().map(|v| hex::encode(v.body.voucher_id)),
            )
            .field("balance", &self.balance)
            .field("counter", &self.counter)
            .field("log_len", &self.log.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecash::format::{KeyRole, TrustedKey};
    use crate::ecash::testkit::*;

    // ---- terminal -------------------------------------------------------------------

    #[test]
    fn terminal_accepts_a_genuine_payment_chain() {
        let mut k = Kit::new();
        for amount in [100, 250, 4_000] {
            let (ch, p) = k.pay(amount);
            assert_eq!(k.terminal.verify_with_held_bundle(&ch, amount, &p), Ok(()));
            let round = Presented::decode(&p.encode()).unwrap();
            assert_eq!(k.terminal.verify_with_held_bundle(&ch, amount, &round), Ok(()));
        }
    }

    #[test]
    fn terminal_refuses_replay_and_foreign_requests() {
        let mut k = Kit::new();
        let (ch, p) = k.pay(100);
        // Replayed against a new challenge.
        let ch2 = k.terminal.challenge(ch.terminal_time).unwrap();
        assert_ne!(ch2.bytes, ch.bytes);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch2, 100, &p),
            Err(Verdict::WrongChallenge)
        );
        // Same bytes, other time.
        let later = Challenge {
            terminal_time: ch.terminal_time + 1,
            ..ch
        };
        assert_eq!(
            k.terminal.verify_with_held_bundle(&later, 100, &p),
            Err(Verdict::WrongChallenge)
        );
        // Other amount.
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 101, &p),
            Err(Verdict::WrongChallenge)
        );
        // Another terminal or merchant.
        let roots = vec![(1, k.root.public_key())];
        let mut other = Terminal::new("T-0002", MERCHANT, roots.clone()).unwrap();
        other.update_bundle(&k.bundle_signed.encode()).unwrap();
        assert_eq!(
            other.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::WrongChallenge)
        );
        let mut other = Terminal::new(TERMINAL, "M-other", roots).unwrap();
        other.update_bundle(&k.bundle_signed.encode()).unwrap();
        assert_eq!(
            other.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::WrongChallenge)
        );
    }

    #[test]
    fn terminal_refuses_unknown_voucher_key_version() {
        let mut k = Kit::new();
        k.reissue(|v| v.issuer_key_version = 2, None);
        let (ch, p) = k.pay(100);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::UnknownKeyVersion)
        );
    }

    #[test]
    fn terminal_refuses_voucher_key_not_in_bundle() {
        let mut k = Kit::new();
        // Version 1 as the bundle says, but signed by a key the bundle does not hold.
        let rogue = SigningKey::generate().unwrap();
        k.reissue(|_| {}, Some(&rogue));
        let (ch, p) = k.pay(100);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::BadSignature)
        );
        // A bundle without any voucher key at all.
        let mut body = k.bundle_signed.body.clone();
        body.bundle_version += 1;
        body.keys.retain(|key| key.role == KeyRole::DeviceCa);
        k.terminal
            .update_bundle(&Signed::sign(body, &k.root).unwrap().encode())
            .unwrap();
        k.reissue(|_| {}, None);
        let (ch, p) = k.pay(100);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::UnknownKeyVersion)
        );
    }

    #[test]
    fn terminal_refuses_certificate_past_validity() {
        let mut k = Kit::new();
        let (_, _) = k.pay(100);
        let ch = k.terminal.challenge(CERT_NOT_AFTER + 1).unwrap();
        let p = k.wallet.pay(&ch, 100, MERCHANT, TERMINAL).unwrap();
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::CertExpired)
        );
    }

    #[test]
    fn terminal_refuses_amount_above_single_limit() {
        let k = Kit::new();
        let ch = k.terminal.challenge(T0 + 5).unwrap();
        let body = Payment {
            amount: MAX_SINGLE + 1,
            balance_after: VOUCHER_BALANCE - MAX_SINGLE - 1,
            challenge: ch.bytes,
            terminal_time: ch.terminal_time,
            prev_hash: k.voucher.hash(),
            counter: VOUCHER_COUNTER + 1,
            ..sample_payment(&k)
        };
        let p = Presented {
            certificate: k.certificate.clone(),
            voucher: k.voucher.clone(),
            previous: None,
            payment: k.wallet.sign_payment_unchecked(body).unwrap(),
        };
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, MAX_SINGLE + 1, &p),
            Err(Verdict::LimitExceeded)
        );
    }

    #[test]
    fn terminal_refuses_too_many_consecutive_offline_payments() {
        let mut k = Kit::new();
        for _ in 0..MAX_CONSECUTIVE {
            let (ch, p) = k.pay(10);
            assert_eq!(k.terminal.verify_with_held_bundle(&ch, 10, &p), Ok(()));
        }
        // The wallet itself refuses the next one; a forged one is refused by the terminal.
        let ch = k.terminal.challenge(T0 + 999).unwrap();
        assert_eq!(
            k.wallet.pay(&ch, 10, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::LimitExceeded("too many consecutive offline payments")
        );
        let last = k.wallet.log().last().unwrap().clone();
        let body = Payment {
            counter: last.body.counter + 1,
            prev_hash: last.hash(),
            amount: 10,
            balance_after: last.body.balance_after - 10,
            challenge: ch.bytes,
            terminal_time: ch.terminal_time,
            ..last.body.clone()
        };
        let p = Presented {
            certificate: k.certificate.clone(),
            voucher: k.voucher.clone(),
            previous: Some(last),
            payment: k.wallet.sign_payment_unchecked(body).unwrap(),
        };
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 10, &p),
            Err(Verdict::LimitExceeded)
        );
    }

    #[test]
    fn terminal_refuses_balance_that_does_not_add_up() {
        let mut k = Kit::new();
        let (ch, p) = k.pay(100);
        let mut body = p.payment.body.clone();
        body.balance_after += 50;
        let forged = Presented {
            payment: k.wallet.sign_payment_unchecked(body).unwrap(),
            ..p
        };
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &forged),
            Err(Verdict::BalanceMismatch)
        );
    }

    #[test]
    fn terminal_refuses_certificate_signed_by_key_not_in_bundle() {
        let mut k = Kit::new();
        let rogue = SigningKey::generate().unwrap();
        let cert = Signed::sign(k.certificate.body.clone(), &rogue).unwrap();
        k.wallet.install_certificate(cert).unwrap();
        let (ch, p) = k.pay(100);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::BadSignature)
        );
        // Signed by the CA under a version the bundle does not hold.
        let body = DeviceCertificate {
            ca_key_version: 2,
            ..k.certificate.body.clone()
        };
        k.wallet
            .install_certificate(Signed::sign(body, &k.ca).unwrap())
            .unwrap();
        let (ch, p) = k.pay(100);
        assert_eq!(
            k.terminal.verify_with_held_bundle(&ch, 100, &p),
            Err(Verdict::UnknownKeyVersion)
        );
    }

    #[test]
    fn terminal_bundle_updates() {
        let k = Kit::new();
        let roots = vec![(1, k.root.public_key())];
        let mut t = Terminal::new(TERMINAL, MERCHANT, roots).unwrap();
        // No bundle: nothing verifies.
        let mut k = k;
        let (ch, p) = k.pay(100);
        assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Err(Verdict::BundleInvalid));
        assert_eq!(t.update_bundle(&k.bundle_signed.encode()), Ok(BUNDLE_V));
        assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Ok(()));
        // Same version, same bytes: accepted again.
        assert_eq!(t.update_bundle(&k.bundle_signed.encode()), Ok(BUNDLE_V));
        // Same version and keys, signed again later: a refresh, the held bundle stays.
        let again = TrustBundle { issued_at: k.bundle_signed.body.issued_at + 60, ..k.bundle_signed.body.clone() };
        let again = Signed::sign(again, &k.root).unwrap();
        assert_eq!(t.update_bundle(&again.encode()), Ok(BUNDLE_V));
        assert_eq!(t.bundle().map(|b| b.encoded().to_vec()), Some(k.bundle_signed.encode()));
        // Same version, other keys: refused.
        let mut other = k.bundle_signed.body.clone();
        other.keys.truncate(1);
        let other = Signed::sign(other, &k.root).unwrap();
        assert_eq!(t.update_bundle(&other.encode()), Err(EcashError::BundleConflict(BUNDLE_V)));
        // Older bundle.
        let older = TrustBundle {
            bundle_version: BUNDLE_V - 1,
            ..k.bundle_signed.body.clone()
        };
        let older = Signed::sign(older, &k.root).unwrap();
        assert!(matches!(
            t.update_bundle(&older.encode()),
            Err(EcashError::OlderBundle { got, min }) if got == BUNDLE_V - 1 && min == BUNDLE_V
        ));
        // Bad signature: by another key, or tampered.
        let newer = TrustBundle {
            bundle_version: BUNDLE_V + 1,
            ..k.bundle_signed.body.clone()
        };
        let rogue = SigningKey::generate().unwrap();
        assert_eq!(
            t.update_bundle(&Signed::sign(newer.clone(), &rogue).unwrap().encode()),
            Err(EcashError::BadSignature)
        );
        let mut tampered = Signed::sign(newer.clone(), &k.root).unwrap();
        tampered.body.issued_at += 1;
        assert_eq!(t.update_bundle(&tampered.encode()), Err(EcashError::BadSignature));
        // Unknown root version.
        let other_root = TrustBundle {
            root_key_version: 2,
            ..newer.clone()
        };
        assert_eq!(
            t.update_bundle(&Signed::sign(other_root, &k.root).unwrap().encode()),
            Err(EcashError::UnknownRoot(2))
        );
        assert_eq!(t.bundle().map(VerifiedBundle::version), Some(BUNDLE_V));
        // A newer bundle that drops the CA key: the held one is replaced.
        let mut dropped = newer;
        dropped.keys.retain(|key| key.role != KeyRole::DeviceCa);
        let ca_rotated = TrustedKey {
            role: KeyRole::DeviceCa,
            version: 2,
            ..k.bundle_signed.body.keys[0].clone()
        };
        dropped.keys.insert(0, ca_rotated);
        assert_eq!(
            t.update_bundle(&Signed::sign(dropped, &k.root).unwrap().encode()),
            Ok(BUNDLE_V + 1)
        );
        assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Err(Verdict::UnknownKeyVersion));
    }

    #[test]
    fn terminal_ids_checked() {
        assert!(Terminal::new("", MERCHANT, vec![]).is_err());
        assert!(Terminal::new(&"t".repeat(17), MERCHANT, vec![]).is_err());
        assert!(Terminal::new(TERMINAL, "with space", vec![]).is_err());
        let t = Terminal::new(TERMINAL, MERCHANT, vec![]).unwrap();
        assert!(format!("{t:?}").contains(TERMINAL));
    }

    // ---- wallet ---------------------------------------------------------------------

    #[test]
    fn wallet_three_payments_chain() {
        let mut k = Kit::new();
        let v_hash = k.voucher.hash();
        let (c1, p1) = k.pay(1_000);
        let (c2, p2) = k.pay(2_000);
        let (c3, p3) = k.pay(3_000);
        assert_eq!(k.wallet.balance(), VOUCHER_BALANCE - 6_000);
        assert_eq!(k.wallet.counter(), VOUCHER_COUNTER + 3);
        assert_eq!(
            k.wallet.log(),
            &[p1.payment.clone(), p2.payment.clone(), p3.payment.clone()]
        );
        assert_eq!(p1.payment.body.prev_hash, v_hash);
        assert_eq!(p2.payment.body.prev_hash, p1.payment.hash());
        assert_eq!(p3.payment.body.prev_hash, p2.payment.hash());
        assert_eq!(p3.previous.as_ref(), Some(&p2.payment));
        assert_eq!(p3.payment.body.balance_after, VOUCHER_BALANCE - 6_000);
        for (c, a, p) in [(c1, 1_000, &p1), (c2, 2_000, &p2), (c3, 3_000, &p3)] {
            assert_eq!(k.terminal.verify_with_held_bundle(&c, a, p), Ok(()));
        }
    }

    #[test]
    fn wallet_refusals_change_nothing() {
        let mut k = Kit::new();
        k.pay(1_000);
        let before = (k.wallet.balance(), k.wallet.counter(), k.wallet.log().to_vec());
        let ch = k.terminal.challenge(T0 + 100).unwrap();
        let remaining = k.wallet.balance();
        assert_eq!(
            k.wallet.pay(&ch, remaining + 1, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::InsufficientBalance
        );
        assert_eq!(
            k.wallet.pay(&ch, 0, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::ZeroAmount
        );
        assert_eq!(
            k.wallet.pay(&ch, MAX_SINGLE + 1, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::LimitExceeded("amount above max_single_payment")
        );
        assert!(matches!(
            k.wallet.pay(&ch, 10, "bad merchant", TERMINAL).unwrap_err(),
            WalletError::Ecash(EcashError::Malformed {
                field: "merchant_id",
                ..
            })
        ));
        let after = (k.wallet.balance(), k.wallet.counter(), k.wallet.log().to_vec());
        assert_eq!(before, after);
        // Spending exactly the balance works, then nothing more.
        let mut k = Kit::with_balance(MAX_SINGLE);
        let (ch, p) = k.pay(MAX_SINGLE);
        assert_eq!(p.payment.body.balance_after, 0);
        assert_eq!(k.terminal.verify_with_held_bundle(&ch, MAX_SINGLE, &p), Ok(()));
        let ch = k.terminal.challenge(T0 + 100).unwrap();
        assert_eq!(
            k.wallet.pay(&ch, 1, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::InsufficientBalance
        );
    }

    #[test]
    fn wallet_needs_certificate_and_voucher() {
        let mut w = Wallet::new().unwrap();
        let ch = Challenge {
            bytes: [1; 16],
            terminal_time: T0,
        };
        assert_eq!(
            w.pay(&ch, 1, MERCHANT, TERMINAL).unwrap_err(),
            WalletError::NoCertificate
        );
        let k = Kit::new();
        assert_eq!(
            w.load_voucher(k.voucher.clone()).unwrap_err(),
            WalletError::NoCertificate
        );
        let req = w.certification_request(b"acct-ref-1", T0).unwrap();
        req.verify(&w.public_key()).unwrap();
        w.install_certificate(issue_certificate(&k.ca, &req)).unwrap();
        assert_eq!(w.pay(&ch, 1, MERCHANT, TERMINAL).unwrap_err(), WalletError::NoVoucher);
        assert_eq!(w.balance(), 0);
        assert!(w.log().is_empty());
    }

    #[test]
    fn wallet_checks_what_it_installs() {
        let mut k = Kit::new();
        // Certificate of another wallet (other key, other id).
        let other = Wallet::new().unwrap();
        let req = other.certification_request(b"x", T0).unwrap();
        let foreign = issue_certificate(&k.ca, &req);
        assert_eq!(
            k.wallet.install_certificate(foreign.clone()).unwrap_err(),
            WalletError::Refused("certificate for another device")
        );
        // This wallet's id with another key: not even a valid certificate (ids are
        // derived from keys).
        let same_id = DeviceCertificate {
            device_id: k.wallet.device_id(),
            ..foreign.body
        };
        assert!(matches!(
            k.wallet.install_certificate(Signed::sign_unchecked(same_id, &k.ca).unwrap()),
            Err(WalletError::Ecash(EcashError::Malformed { field: "device_id", .. }))
        ));
        // Voucher for another device, at another counter, above max_balance.
        let v = k.voucher.body.clone();
        let bad = [
            (
                Voucher {
                    device_id: [0x99; 16],
                    ..v.clone()
                },
                WalletError::Refused("voucher for another device"),
            ),
            (
                Voucher {
                    counter_at_issue: 7,
                    ..v.clone()
                },
                WalletError::Refused("voucher issued at another counter"),
            ),
            (
                Voucher {
                    balance: MAX_BALANCE + 1,
                    ..v.clone()
                },
                WalletError::LimitExceeded("voucher balance above max_balance"),
            ),
        ];
        for (body, err) in bad {
            assert_eq!(
                k.wallet
                    .load_voucher(Signed::sign(body, &k.issuer).unwrap())
                    .unwrap_err(),
                err
            );
        }
        assert_eq!(k.wallet.voucher(), Some(&k.voucher));
    }

    #[test]
    fn wallet_new_voucher_replaces_the_old() {
        let mut k = Kit::new();
        k.pay(1_000);
        k.pay(1_000);
        let counter = k.wallet.counter();
        k.reissue(|v| v.balance = 20_000, None);
        assert_eq!(k.voucher.body.counter_at_issue, counter);
        assert_eq!(k.wallet.balance(), 20_000);
        let (ch, p) = k.pay(500);
        assert!(p.previous.is_none());
        assert_eq!(p.payment.body.counter, counter + 1);
        assert_eq!(p.payment.body.prev_hash, k.voucher.hash());
        assert_eq!(k.terminal.verify_with_held_bundle(&ch, 500, &p), Ok(()));
        assert_eq!(k.wallet.log().len(), 3);
    }

    #[test]
    fn wallet_debug_shows_no_private_key() {
        let k = Kit::new();
        let s = format!("{:?}", k.wallet);
        assert!(s.contains("SigningKey {") && s.contains("balance"), "{s}");
        assert!(!s.to_lowercase().contains("private"), "{s}");
    }
}
