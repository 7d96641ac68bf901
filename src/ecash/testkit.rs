//! Test fixtures: a root, CA and issuer key, a signed trust bundle, a certified wallet
//! holding a voucher, and a terminal that trusts the bundle.

use openssl::bn::BigNum;

use super::bundle::VerifiedBundle;
use super::format::{
    CertificationRequest, DeviceCertificate, KeyRole, OfflineLimits, Payment, Presented, Signed, TrustBundle,
    TrustedKey, Voucher,
};
use super::offline::{Challenge, Terminal, Wallet};
use super::sig::{KeyAlgorithm, SigningKey};

pub const T0: u64 = 1_700_000_000;
pub const DAY: u64 = 86_400;
pub const KEY_NOT_BEFORE: u64 = T0 - 10 * DAY;
pub const CERT_NOT_BEFORE: u64 = T0 - DAY;
pub const CERT_NOT_AFTER: u64 = T0 + 365 * DAY;
pub const BUNDLE_V: u64 = 5;
pub const VOUCHER_BALANCE: u64 = 10_000;
pub const VOUCHER_COUNTER: u64 = 0;
pub const MAX_BALANCE: u64 = 50_000;
pub const MAX_SINGLE: u64 = 5_000;
pub const MAX_CONSECUTIVE: u32 = 5;
pub const MERCHANT: &str = "M-shop-42";
pub const TERMINAL: &str = "T-0001";

pub const LIMITS: OfflineLimits = OfflineLimits {
    max_balance: MAX_BALANCE,
    max_single_payment: MAX_SINGLE,
    max_consecutive_offline: MAX_CONSECUTIVE,
};

pub struct Kit {
    pub root: SigningKey,
    pub ca: SigningKey,
    pub issuer: SigningKey,
    pub bundle_signed: Signed<TrustBundle>,
    pub bundle: VerifiedBundle,
    pub certificate: Signed<DeviceCertificate>,
    pub voucher: Signed<Voucher>,
    pub wallet: Wallet,
    pub terminal: Terminal,
    /// Seconds after T0 of the next challenge.
    pub tick: u64,
}

/// What the appliance does with a certification request (checked here: proof of
/// possession), with the kit's limits and validity.
pub fn issue_certificate(ca: &SigningKey, req: &Signed<CertificationRequest>) -> Signed<DeviceCertificate> {
    let pk = crate::ecash::sig::PublicKey::from_sec1(&req.body.device_public_key).unwrap();
    req.verify(&pk).unwrap();
    let body = DeviceCertificate {
        device_id: req.body.device_id,
        device_public_key: req.body.device_public_key,
        account_ref: req.body.account_ref.clone(),
        limits: LIMITS,
        not_before: CERT_NOT_BEFORE,
        not_after: CERT_NOT_AFTER,
        ca_key_version: 1,
    };
    Signed::sign(body, ca).unwrap()
}

impl Kit {
    pub fn new() -> Kit {
        Kit::with_balance(VOUCHER_BALANCE)
    }

    pub fn with_balance(balance: u64) -> Kit {
        let root = SigningKey::generate().unwrap();
        let ca = SigningKey::generate().unwrap();
        let issuer = SigningKey::generate().unwrap();
        let body = TrustBundle {
            bundle_version: BUNDLE_V,
            issued_at: T0 - DAY,
            root_key_version: 1,
            keys: vec![
                TrustedKey {
                    role: KeyRole::DeviceCa,
                    algorithm: KeyAlgorithm::P256,
                    version: 1,
                    public_key: ca.sec1().to_vec(),
                    not_before: KEY_NOT_BEFORE,
                    not_after: u64::MAX,
                },
                TrustedKey {
                    role: KeyRole::VoucherIssuer,
                    algorithm: KeyAlgorithm::P256,
                    version: 1,
                    public_key: issuer.sec1().to_vec(),
                    not_before: 0,
                    not_after: u64::MAX,
                },
            ],
        };
        let bundle_signed = Signed::sign(body, &root).unwrap();
        let roots = vec![(1, root.public_key())];
        let bundle = TrustBundle::verify(&bundle_signed.encode(), &roots, 0).unwrap();
        let mut wallet = Wallet::new().unwrap();
        let req = wallet.certification_request(b"acct-ref-1", T0 - DAY).unwrap();
        let certificate = issue_certificate(&ca, &req);
        wallet.install_certificate(certificate.clone()).unwrap();
        let voucher = Signed::sign(
            Voucher {
                voucher_id: [0x56; 16],
                device_id: wallet.device_id(),
                currency: *b"CNY",
                balance,
                counter_at_issue: VOUCHER_COUNTER,
                issued_at: T0,
                expires_at: T0 + 30 * DAY,
                issuer_key_version: 1,
            },
            &issuer,
        )
        .unwrap();
        wallet.load_voucher(voucher.clone()).unwrap();
        let mut terminal = Terminal::new(TERMINAL, MERCHANT, roots).unwrap();
        terminal.update_bundle(&bundle_signed.encode()).unwrap();
        Kit {
            root,
            ca,
            issuer,
            bundle_signed,
            bundle,
            certificate,
            voucher,
            wallet,
            terminal,
            tick: 60,
        }
    }

    /// A challenge from the kit's terminal and the wallet's payment answering it.
    pub fn pay(&mut self, amount: u64) -> (Challenge, Presented) {
        let ch = self.terminal.challenge(T0 + self.tick).unwrap();
        self.tick += 60;
        let p = self.wallet.pay(&ch, amount, MERCHANT, TERMINAL).unwrap();
        (ch, p)
    }

    /// Issues a new voucher at the wallet's counter (fresh id, `f` applied), signed by
    /// `signer` (the kit's issuer when `None`), and loads it.
    pub fn reissue(&mut self, f: impl FnOnce(&mut Voucher), signer: Option<&SigningKey>) {
        let mut body = Voucher {
            voucher_id: [self.voucher.body.voucher_id[0].wrapping_add(1); 16],
            counter_at_issue: self.wallet.counter(),
            ..self.voucher.body.clone()
        };
        f(&mut body);
        let v = Signed::sign(body, signer.unwrap_or(&self.issuer)).unwrap();
        self.wallet.load_voucher(v.clone()).unwrap();
        self.voucher = v;
    }
}

/// A valid (unchained) payment body of the kit's voucher.
pub fn sample_payment(k: &Kit) -> Payment {
    Payment {
        voucher_id: k.voucher.body.voucher_id,
        device_id: k.wallet.device_id(),
        counter: 1,
        prev_hash: [0x42; 32],
        amount: 100,
        balance_after: VOUCHER_BALANCE - 100,
        currency: *b"CNY",
        merchant_id: MERCHANT.into(),
        terminal_id: TERMINAL.into(),
        challenge: [0x33; 16],
        terminal_time: T0 + 1,
    }
}

/// n - s of a signature's s.
pub fn n_minus_s(sig: &[u8; 64]) -> [u8; 32] {
    let n = BigNum::from_hex_str("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551").unwrap();
    let s = BigNum::from_slice(&sig[32..]).unwrap();
    let mut d = BigNum::new().unwrap();
    d.checked_sub(&n, &s).unwrap();
    d.to_vec_padded(32).unwrap().try_into().unwrap()
}

/// The voucher of the worked example in docs/ecash-format.md.
pub fn example_voucher_body() -> Voucher {
    Voucher {
        voucher_id: *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff",
        device_id: [0xD1; 16],
        currency: *b"CNY",
        balance: 50_000,
        counter_at_issue: 7,
        issued_at: 1_735_689_600,
        expires_at: 1_738_368_000,
        issuer_key_version: 1,
    }
}

/// Prints the worked example (run once with --ignored --nocapture to refresh the doc).
#[test]
#[ignore]
fn print_doc_example() {
    let key = SigningKey::generate().unwrap();
    let v = Signed::sign(example_voucher_body(), &key).unwrap();
    println!("WIRE {}", hex::encode(v.encode()));
    println!("SEC1 {}", hex::encode(key.sec1()));
    println!(
        "PEM\n{}",
        String::from_utf8(key.public_key().to_pem().unwrap()).unwrap()
    );
    println!("HASH {}", hex::encode(v.hash()));
}
