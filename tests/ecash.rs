//! VoucherService and the offline e-cash library against a real SoftHSM token over
//! mTLS: token signatures verified with openssl from the keys `ceremony
//! export-public` prints (low-S), strict round trips of every appliance-made object
//! and the signature over every tbs byte, CertifyDevice (proof of possession, its
//! age, limits, validity), IssueVoucher (balance, currency, forged certificates,
//! expiry bounded by the certificate), offline terminal refusals with appliance-made
//! objects and the exported root key, VerifyPayments (one verdict per item, batch
//! limits, a 200-payment upload, the signature memo), `voucher.issuer` rotation and
//! retirement seen by terminals and VerifyPayments, roles, and no account reference
//! in the audit trail.
//!
//! Only `voucher_issuer_rotation_and_retirement` rotates or retires a key (of
//! `voucher.issuer`); every other test reads key versions from responses, never from
//! constants, as it may run before, during or after that test.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keyward::client::Clients;
use keyward::ecash::{
    CertificationRequest, Challenge, DeviceCertificate, EcashError, KeyRole, KeySource, Payment, Presented, PublicKey,
    Signable, Signed, SigningKey, Terminal, TrustBundle, Verdict, Voucher, Wallet, WalletError,
};
use keyward::hsm::KeyState;
use keyward::proto::{
    CertifyDeviceRequest, CertifyDeviceResponse, IssueVoucherRequest, IssueVoucherResponse, OfflineLimits as WireLimits,
    PaymentVerdict, ReloadKeysRequest, TrustBundleRequest, TrustBundleResponse, VerifyPaymentsRequest, VerifyPaymentsResponse,
};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::EcGroup;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::sign::Verifier;
use tonic::Code;

const CA: &str = "device.ca";
const ISSUER: &str = "voucher.issuer";
const ROOT: &str = "ecash.root";
const MERCHANT: &str = "M-ECASH-TEST";
const TERMINAL: &str = "T-0001";
const ACCOUNT: &[u8] = b"acct-ecash-test-0001";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn lim(max_balance: u64, max_single_payment: u64, max_consecutive_offline: u32) -> WireLimits {
    WireLimits { max_balance, max_single_payment, max_consecutive_offline }
}

/// A fresh wallet (fresh device key, its device id derived from it).
fn wallet() -> Wallet {
    Wallet::new().expect("a wallet")
}

/// The PEM `keyward ceremony export-public NAME --version V` prints (the real binary).
fn cli_export_public(name: &str, version: u32) -> String {
    let cfg = fixture().prepared.config.to_string_lossy().into_owned();
    let mut cmd = keyward_cli();
    cmd.args(["ceremony", "--config", &cfg, "export-public", name, "--version", &version.to_string()]);
    // The child loads the catalogue while this process may be changing the token.
    let out = {
        let _g = token_write();
        run_cli(cmd, b"")
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "export-public {name} --version {version} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("-----BEGIN PUBLIC KEY-----"), "not a PEM public key:\n{text}");
    text
}

/// The public key of `name` version `version`, exported by the ceremony (cached: a
/// version's key never changes). Never call with TOKEN_WRITE held.
fn public_key(name: &str, version: u32) -> PublicKey {
    static CACHE: OnceLock<Mutex<HashMap<(String, u32), PublicKey>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&(name.to_string(), version)) {
        return k.clone();
    }
    let pem = {
        let _g = token_write();
        let c = ceremony();
        let pem = c.export_public(name, version).unwrap_or_else(|e| panic!("export {name}/v{version}: {e}"));
        c.close().expect("close the ceremony");
        pem
    };
    let k = PublicKey::from_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("{name}/v{version} PEM: {e}"));
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert((name.to_string(), version), k.clone());
    k
}

/// CertifyDevice for `wallet` (account [`ACCOUNT`], timestamp now); installs the
/// certificate into the wallet.
async fn certify(c: &Clients, wallet: &mut Wallet, limits: WireLimits, validity: u64) -> (Signed<DeviceCertificate>, CertifyDeviceResponse) {
    let req = wallet.certification_request(ACCOUNT, now()).expect("certification request");
    let r = c
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest { certification_request: req.encode(), limits: Some(limits), validity_seconds: validity })
        .await
        .expect("CertifyDevice")
        .into_inner();
    let cert = Signed::<DeviceCertificate>::decode(&r.certificate).expect("the certificate decodes");
    wallet.install_certificate(cert.clone()).expect("the wallet installs its certificate");
    (cert, r)
}

/// IssueVoucher of `balance` CNY for `cert` at `counter`.
async fn issue(c: &Clients, cert: &Signed<DeviceCertificate>, balance: u64, counter: u64, validity: u64) -> (Signed<Voucher>, IssueVoucherResponse) {
    let r = c
        .voucher
        .clone()
        .issue_voucher(IssueVoucherRequest {
            certificate: cert.encode(),
            currency: "CNY".into(),
            balance,
            counter_at_issue: counter,
            validity_seconds: validity,
        })
        .await
        .expect("IssueVoucher")
        .into_inner();
    let v = Signed::<Voucher>::decode(&r.voucher).expect("the voucher decodes");
    (v, r)
}

/// A certified wallet holding a voucher of `balance`.
async fn funded(c: &Clients, limits: WireLimits, cert_validity: u64, balance: u64, voucher_validity: u64) -> Wallet {
    let mut w = wallet();
    let (cert, _) = certify(c, &mut w, limits, cert_validity).await;
    let (v, _) = issue(c, &cert, balance, w.counter(), voucher_validity).await;
    w.load_voucher(v).expect("the wallet loads its voucher");
    w
}

async fn bundle(c: &Clients) -> TrustBundleResponse {
    c.voucher.clone().trust_bundle(TrustBundleRequest {}).await.expect("TrustBundle").into_inner()
}

/// The root keys a terminal is provisioned with: `ecash.root` of the bundle's version.
fn roots_for(b: &TrustBundleResponse) -> Vec<(u32, PublicKey)> {
    let k = b.key.as_ref().expect("TrustBundle names its key");
    assert_eq!(k.name, ROOT);
    vec![(k.version, public_key(ROOT, k.version))]
}

/// A terminal with the exported root key, holding bundle `b`.
fn terminal(b: &TrustBundleResponse) -> Terminal {
    let mut t = Terminal::new(TERMINAL, MERCHANT, roots_for(b)).expect("a terminal");
    let v = t.update_bundle(&b.bundle).expect("the terminal accepts the appliance's bundle");
    assert_eq!(v, b.bundle_version);
    t
}

fn pay(w: &mut Wallet, t: &Terminal, at: u64, amount: u64) -> (Challenge, Presented) {
    let ch = t.challenge(at).expect("challenge");
    let p = w.pay(&ch, amount, t.merchant_id(), t.terminal_id()).expect("the wallet pays");
    (ch, p)
}

/// `base` with its payment body changed by `f` (answering `ch` if given) and re-signed
/// by the device key: what a device that signs anything would present.
fn forge(w: &Wallet, base: &Presented, ch: Option<&Challenge>, f: impl FnOnce(&mut Payment)) -> Presented {
    let mut body = base.payment.body.clone();
    if let Some(ch) = ch {
        body.challenge = ch.bytes;
        body.terminal_time = ch.terminal_time;
    }
    f(&mut body);
    Presented { payment: w.sign_payment_unchecked(body).expect("device signature"), ..base.clone() }
}

/// `base` (a first payment) with `voucher` instead of its voucher, the payment's chain
/// re-pointed at it and re-signed, so only the voucher's own rules can fail.
fn with_voucher(w: &Wallet, base: &Presented, voucher: Signed<Voucher>, ch: Option<&Challenge>) -> Presented {
    assert!(base.previous.is_none());
    let hash = voucher.hash();
    let p = Presented { voucher, ..base.clone() };
    forge(w, &p, ch, |b| b.prev_hash = hash)
}

fn verdicts(r: &VerifyPaymentsResponse) -> Vec<PaymentVerdict> {
    r.verdicts.iter().map(|v| PaymentVerdict::try_from(*v).unwrap_or_else(|_| panic!("unknown verdict {v}"))).collect()
}

async fn verify_batch(c: &Clients, items: &[Presented]) -> VerifyPaymentsResponse {
    verify_raw(c, items.iter().map(Presented::encode).collect()).await
}

async fn verify_raw(c: &Clients, payments: Vec<Vec<u8>>) -> VerifyPaymentsResponse {
    let n = payments.len();
    let r = c.voucher.clone().verify_payments(VerifyPaymentsRequest { payments }).await.expect("VerifyPayments").into_inner();
    assert_eq!(r.verdicts.len(), n, "one verdict per item");
    r
}

/// Asserts `sig` (raw r || s) is canonical: 1 <= r < n and 1 <= s <= n/2 (openssl's
/// group order, independent of the library's constants).
fn assert_low_s(sig: &[u8], what: &str) {
    assert_eq!(sig.len(), 64, "{what}");
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let mut n = BigNum::new().unwrap();
    group.order(&mut n, &mut ctx).unwrap();
    let mut half = BigNum::new().unwrap();
    half.rshift1(&n).unwrap();
    let zero = BigNum::new().unwrap();
    let r = BigNum::from_slice(&sig[..32]).unwrap();
    let s = BigNum::from_slice(&sig[32..]).unwrap();
    assert!(r.ucmp(&zero) == Ordering::Greater && r.ucmp(&n) == Ordering::Less, "{what}: r out of range");
    assert!(s.ucmp(&zero) == Ordering::Greater, "{what}: s is zero");
    assert_ne!(s.ucmp(&half), Ordering::Greater, "{what}: high-S signature from the token");
}

/// Verifies a raw r || s signature over SHA-256(`tbs`) with openssl alone, from a PEM.
fn openssl_verifies(pem: &str, tbs: &[u8], sig: &[u8]) -> bool {
    let pkey = PKey::public_key_from_pem(pem.as_bytes()).expect("PEM public key");
    let ec = pkey.ec_key().expect("an EC key");
    assert_eq!(ec.group().curve_name(), Some(Nid::X9_62_PRIME256V1));
    let r = BigNum::from_slice(&sig[..32]).unwrap();
    let s = BigNum::from_slice(&sig[32..]).unwrap();
    let esig = EcdsaSig::from_private_components(r, s).unwrap();
    let raw = esig.verify(&openssl::sha::sha256(tbs), &ec).expect("ECDSA verify");
    // The same through the EVP interface, with the DER form of the signature.
    let der = esig.to_der().unwrap();
    let mut v = Verifier::new(MessageDigest::sha256(), &pkey).unwrap();
    v.update(tbs).unwrap();
    let evp = v.verify(&der).unwrap_or(false);
    assert_eq!(raw, evp, "raw and EVP verification disagree");
    raw
}

/// Strict round trip, then every tbs byte changed (two ways) makes decoding or
/// verification under `key` fail.
fn every_tbs_byte_is_signed<T: Signable>(wire: &[u8], key: &PublicKey, what: &str) -> Signed<T> {
    let s = Signed::<T>::decode(wire).unwrap_or_else(|e| panic!("{what} does not decode: {e}"));
    assert_eq!(s.encode(), wire, "{what}: re-encoding is not byte-identical");
    assert_eq!(s.hash(), openssl::sha::sha256(wire), "{what}: hash");
    assert_eq!(&wire[..wire.len() - 64], &s.body.tbs()[..], "{what}: tbs");
    s.verify(key).unwrap_or_else(|e| panic!("{what} does not verify: {e}"));
    let tbs_len = wire.len() - 64;
    for i in 0..tbs_len {
        for flip in [0x01u8, 0xff] {
            let mut x = wire.to_vec();
            x[i] ^= flip;
            if let Ok(d) = Signed::<T>::decode(&x) {
                assert!(d.verify(key).is_err(), "{what}: byte {i} ^ {flip:#04x} still verifies");
            }
        }
    }
    // Trailing and missing bytes.
    let mut longer = wire.to_vec();
    longer.push(0);
    assert!(Signed::<T>::decode(&longer).is_err(), "{what}: trailing byte accepted");
    assert!(Signed::<T>::decode(&wire[..wire.len() - 1]).is_err(), "{what}: truncation accepted");
    s
}

// ---------------------------------------------------------------------------
// 1. Token signatures and the exported keys
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signature_verifies_with_openssl_from_the_exported_pem() {
    let srv = start("ecash-openssl").await;
    let c = srv.clients("ecash").await;
    let mut w = wallet();
    let (cert, cr) = certify(&c, &mut w, lim(100_000, 10_000, 5), 0).await;
    let (voucher, vr) = issue(&c, &cert, 50_000, 0, 0).await;
    let vk = vr.key.clone().expect("IssueVoucher names its key");
    assert_eq!(vk.name, ISSUER);
    assert_eq!(vk.version, voucher.body.issuer_key_version);
    let ck = cr.key.clone().expect("CertifyDevice names its key");
    assert_eq!((ck.name.as_str(), ck.version), (CA, cert.body.ca_key_version));

    let issuer_pem = cli_export_public(ISSUER, vk.version);
    let ca_pem = cli_export_public(CA, ck.version);
    assert_ne!(issuer_pem, ca_pem);

    // openssl alone, from the PEM the CLI printed.
    let tbs = &vr.voucher[..vr.voucher.len() - 64];
    let sig = &vr.voucher[vr.voucher.len() - 64..];
    assert!(openssl_verifies(&issuer_pem, tbs, sig), "the voucher does not verify under the exported voucher.issuer PEM");
    assert!(!openssl_verifies(&ca_pem, tbs, sig), "the voucher verifies under device.ca");
    let mut other_tbs = tbs.to_vec();
    let last = other_tbs.len() - 1;
    other_tbs[last] ^= 1;
    assert!(!openssl_verifies(&issuer_pem, &other_tbs, sig), "a changed tbs verifies");
    // The certificate under device.ca, not under voucher.issuer.
    let ctbs = &cr.certificate[..cr.certificate.len() - 64];
    let csig = &cr.certificate[cr.certificate.len() - 64..];
    assert!(openssl_verifies(&ca_pem, ctbs, csig));
    assert!(!openssl_verifies(&issuer_pem, ctbs, csig));

    // The library, from the same PEMs.
    let issuer_key = PublicKey::from_pem(issuer_pem.as_bytes()).expect("issuer PEM");
    let ca_key = PublicKey::from_pem(ca_pem.as_bytes()).expect("CA PEM");
    voucher.verify(&issuer_key).expect("Signed::verify under the exported issuer key");
    assert_eq!(voucher.verify(&ca_key), Err(EcashError::BadSignature));
    cert.verify(&ca_key).expect("certificate under the exported CA key");
    assert_eq!(cert.verify(&issuer_key), Err(EcashError::BadSignature));

    // The trust bundle carries exactly these keys, and verifies under the exported root.
    let b = bundle(&c).await;
    let rk = b.key.clone().expect("TrustBundle names its key");
    let root_pem = cli_export_public(ROOT, rk.version);
    let btbs = &b.bundle[..b.bundle.len() - 64];
    let bsig = &b.bundle[b.bundle.len() - 64..];
    assert!(openssl_verifies(&root_pem, btbs, bsig));
    assert!(!openssl_verifies(&issuer_pem, btbs, bsig));
    let vb = TrustBundle::verify(&b.bundle, &[(rk.version, PublicKey::from_pem(root_pem.as_bytes()).unwrap())], 0)
        .expect("the bundle verifies under the exported root");
    assert_eq!(vb.key(KeyRole::VoucherIssuer, vk.version, voucher.body.issued_at), Some(&issuer_key));
    assert_eq!(vb.key(KeyRole::DeviceCa, ck.version, cert.body.not_before), Some(&ca_key));

    // Every token signature is low-S (ECDSA is randomised: half of unnormalised
    // signatures would be high-S, so 24 of them all low is no accident).
    assert_low_s(sig, "voucher");
    assert_low_s(csig, "certificate");
    assert_low_s(bsig, "bundle");
    for i in 0..12 {
        let (v, r) = issue(&c, &cert, 1 + i, 0, 0).await;
        assert_low_s(&v.signature, &format!("voucher {i}"));
        assert!(openssl_verifies(&issuer_pem, &r.voucher[..r.voucher.len() - 64], &v.signature), "voucher {i}");
        let b = bundle(&c).await;
        assert_low_s(&b.bundle[b.bundle.len() - 64..], &format!("bundle {i}"));
    }
    for i in 0..6 {
        let mut w = wallet();
        let (cert, _) = certify(&c, &mut w, lim(100, 10, 1), 0).await;
        assert_low_s(&cert.signature, &format!("certificate {i}"));
        assert!(openssl_verifies(&ca_pem, &cert.body.tbs(), &cert.signature), "certificate {i}");
    }
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 2. Strict encodings of everything the appliance makes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_objects_round_trip_and_every_tbs_byte_is_signed() {
    let srv = start("ecash-strict").await;
    let c = srv.clients("ecash").await;
    let mut w = wallet();
    let (_, cr) = certify(&c, &mut w, lim(80_000, 20_000, 3), 3_600).await;
    let cert = Signed::<DeviceCertificate>::decode(&cr.certificate).unwrap();
    let (_, vr) = issue(&c, &cert, 60_000, 0, 600).await;
    let b = bundle(&c).await;

    let ca = public_key(CA, cert.body.ca_key_version);
    let cert = every_tbs_byte_is_signed::<DeviceCertificate>(&cr.certificate, &ca, "certificate");
    assert_eq!(cert.body.device_id, w.device_id());
    assert_eq!(cert.body.account_ref, ACCOUNT);
    assert_eq!(cert.body.not_after, cr.not_after);

    let voucher = Signed::<Voucher>::decode(&vr.voucher).unwrap();
    let issuer = public_key(ISSUER, voucher.body.issuer_key_version);
    let voucher = every_tbs_byte_is_signed::<Voucher>(&vr.voucher, &issuer, "voucher");
    assert_eq!(voucher.body.voucher_id.to_vec(), vr.voucher_id);
    assert_eq!(voucher.body.expires_at, vr.expires_at);
    // A voucher never verifies under the certificate's key and vice versa.
    assert!(voucher.verify(&ca).is_err());
    assert!(cert.verify(&issuer).is_err());

    let rk = b.key.clone().unwrap();
    let root = public_key(ROOT, rk.version);
    let sb = every_tbs_byte_is_signed::<TrustBundle>(&b.bundle, &root, "trust bundle");
    assert_eq!(sb.body.bundle_version, b.bundle_version);
    assert_eq!(sb.body.root_key_version, rk.version);
    // Through the bundle verifier too: every changed tbs byte is refused.
    let roots = vec![(rk.version, root.clone())];
    TrustBundle::verify(&b.bundle, &roots, 0).expect("bundle verifies");
    for i in 0..b.bundle.len() - 64 {
        let mut x = b.bundle.clone();
        x[i] ^= 0x01;
        assert!(TrustBundle::verify(&x, &roots, 0).is_err(), "bundle byte {i} changed still verifies");
    }
    // The bundle holds the keys that made the certificate and the voucher.
    let vb = TrustBundle::verify(&b.bundle, &roots, 0).unwrap();
    assert_eq!(vb.key(KeyRole::DeviceCa, cert.body.ca_key_version, cert.body.not_before), Some(&ca));
    assert_eq!(vb.key(KeyRole::VoucherIssuer, voucher.body.issuer_key_version, voucher.body.issued_at), Some(&issuer));

    // The objects never decode as one another.
    assert!(Signed::<Voucher>::decode(&cr.certificate).is_err());
    assert!(Signed::<DeviceCertificate>::decode(&vr.voucher).is_err());
    assert!(Signed::<TrustBundle>::decode(&vr.voucher).is_err());
    assert!(Signed::<Payment>::decode(&b.bundle).is_err());

    // A presented payment of appliance objects round-trips too.
    w.load_voucher(voucher).unwrap();
    let t = terminal(&b);
    let (ch, p) = pay(&mut w, &t, now(), 1_234);
    let e = p.encode();
    assert_eq!(Presented::decode(&e).unwrap().encode(), e);
    assert_eq!(t.verify_with_held_bundle(&ch, 1_234, &p), Ok(()));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 3. CertifyDevice
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_device_checks_possession_age_limits_and_validity() {
    let srv = start("ecash-certify").await;
    let c = srv.clients("ecash").await;
    let cfg = srv.state.config.ecash.clone();
    let good = lim(100_000, 20_000, 4);
    let w = wallet();
    let call = |req: Vec<u8>, limits: Option<WireLimits>, validity: u64| {
        let mut v = c.voucher.clone();
        async move { v.certify_device(CertifyDeviceRequest { certification_request: req, limits, validity_seconds: validity }).await }
    };

    // Proof of possession: the device key must sign the request.
    let body = CertificationRequest {
        device_id: w.device_id(),
        device_public_key: w.public_key().sec1().expect("a P-256 device key"),
        account_ref: ACCOUNT.to_vec(),
        timestamp: now(),
    };
    let stranger = SigningKey::generate().unwrap();
    let foreign = Signed::sign(body.clone(), &stranger).unwrap();
    expect_code(call(foreign.encode(), Some(good), 0).await, Code::InvalidArgument, &["certification_request"], "signed by another key");
    // Another device's id with this device's key (to spend the other device's
    // vouchers): ids are derived from keys, so the request does not even decode.
    let victim = wallet();
    let attacker = SigningKey::generate().unwrap();
    let body = CertificationRequest { device_id: victim.device_id(), device_public_key: attacker.sec1(), ..body };
    let hijack = Signed { signature: attacker.sign(&body.tbs()).unwrap(), body };
    expect_code(call(hijack.encode(), Some(good), 0).await, Code::InvalidArgument, &["device_id"], "another device's id");
    // A request whose signature bytes were changed.
    let mut req = w.certification_request(ACCOUNT, now()).unwrap().encode();
    let n = req.len();
    req[n - 40] ^= 0x01;
    let s = err_of(call(req, Some(good), 0).await, "changed signature");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // Garbage.
    expect_code(call(b"not a request".to_vec(), Some(good), 0).await, Code::InvalidArgument, &["certification_request"], "garbage");

    // Age: more than five minutes old or ahead is refused.
    for (ts, what) in [
        (now() - 400, "400 s old"),
        (now() - 3_600, "an hour old"),
        (now() + 400, "400 s ahead"),
        (now() + 86_400, "a day ahead"),
        (0, "epoch"),
        (u64::MAX, "u64::MAX"),
    ] {
        let req = w.certification_request(ACCOUNT, ts).unwrap();
        expect_code(call(req.encode(), Some(good), 0).await, Code::InvalidArgument, &["certification_request", "timestamp"], what);
    }
    // Within five minutes either way is accepted.
    for ts in [now() - 200, now() + 200] {
        let req = w.certification_request(ACCOUNT, ts).unwrap();
        call(req.encode(), Some(good), 0).await.unwrap_or_else(|s| panic!("timestamp {ts}: {s:?}"));
    }

    // A good request: the device's key and id, the account, the limits, device.ca.
    let before = now();
    let req = w.certification_request(ACCOUNT, now()).unwrap();
    let r = call(req.encode(), Some(good), 7_200).await.expect("CertifyDevice").into_inner();
    let after = now();
    let cert = Signed::<DeviceCertificate>::decode(&r.certificate).unwrap();
    assert_eq!(cert.body.device_id, w.device_id());
    assert_eq!(cert.body.device_public_key, w.public_key().sec1().expect("a P-256 device key"));
    assert_eq!(cert.body.account_ref, ACCOUNT);
    assert_eq!(
        (cert.body.limits.max_balance, cert.body.limits.max_single_payment, cert.body.limits.max_consecutive_offline),
        (100_000, 20_000, 4)
    );
    assert!(before <= cert.body.not_before && cert.body.not_before <= after, "not_before is the appliance's now");
    assert_eq!(cert.body.not_after - cert.body.not_before, 7_200);
    assert_eq!(r.not_after, cert.body.not_after);
    let k = r.key.clone().unwrap();
    let active_ca = srv.hsm.catalogue().active(CA).expect("active device.ca").meta.version;
    assert_eq!((k.name.as_str(), k.version), (CA, active_ca));
    assert_eq!(cert.body.ca_key_version, active_ca);
    cert.verify(&public_key(CA, active_ca)).expect("signed by the active device.ca");
    assert!(cert.verify(&stranger.public_key()).is_err());

    // Default and maximal validity.
    let req = w.certification_request(ACCOUNT, now()).unwrap();
    let r = call(req.encode(), Some(good), 0).await.expect("default validity").into_inner();
    let d = Signed::<DeviceCertificate>::decode(&r.certificate).unwrap();
    assert_eq!(d.body.not_after - d.body.not_before, cfg.certificate_validity.as_secs());
    let max = cfg.max_certificate_validity.as_secs();
    let req = w.certification_request(ACCOUNT, now()).unwrap();
    let r = call(req.encode(), Some(good), max).await.expect("maximal validity").into_inner();
    let d = Signed::<DeviceCertificate>::decode(&r.certificate).unwrap();
    assert_eq!(d.body.not_after - d.body.not_before, max);
    for validity in [max + 1, u64::MAX] {
        let req = w.certification_request(ACCOUNT, now()).unwrap();
        expect_code(call(req.encode(), Some(good), validity).await, Code::InvalidArgument, &["validity_seconds"], "validity above the maximum");
    }

    // Bad limits name their field.
    let cases: [(Option<WireLimits>, &str); 6] = [
        (None, "limits"),
        (Some(lim(1_000, 1_001, 3)), "max_single_payment"),
        (Some(lim(1_000, 0, 3)), "max_single_payment"),
        (Some(lim(0, 0, 3)), "max_balance"),
        (Some(lim(1_000, 500, 0)), "max_consecutive_offline"),
        (Some(lim(u64::MAX, u64::MAX, 0)), "max_consecutive_offline"),
    ];
    for (limits, field) in cases {
        let req = w.certification_request(ACCOUNT, now()).unwrap();
        expect_code(call(req.encode(), limits, 0).await, Code::InvalidArgument, &[field], &format!("limits {limits:?}"));
    }
    // max_single_payment == max_balance is allowed.
    let req = w.certification_request(ACCOUNT, now()).unwrap();
    call(req.encode(), Some(lim(500, 500, 1)), 0).await.expect("single payment = balance");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 4. IssueVoucher
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_voucher_checks_balance_currency_certificate_and_expiry() {
    let srv = start("ecash-issue").await;
    let c = srv.clients("ecash").await;
    let cfg = srv.state.config.ecash.clone();
    let mut w = wallet();
    let (cert, _) = certify(&c, &mut w, lim(50_000, 10_000, 3), 0).await;
    let req = |cert: &Signed<DeviceCertificate>, currency: &str, balance: u64, validity: u64| IssueVoucherRequest {
        certificate: cert.encode(),
        currency: currency.into(),
        balance,
        counter_at_issue: 7,
        validity_seconds: validity,
    };

    // A good voucher: bound to the device, the request's fields, the active issuer.
    let before = now();
    let r = c.voucher.clone().issue_voucher(req(&cert, "CNY", 50_000, 0)).await.expect("IssueVoucher").into_inner();
    let v = Signed::<Voucher>::decode(&r.voucher).unwrap();
    assert_eq!(v.body.device_id, w.device_id());
    assert_eq!((&v.body.currency, v.body.balance, v.body.counter_at_issue), (b"CNY", 50_000, 7));
    assert!(v.body.issued_at >= before);
    assert_eq!(v.body.expires_at - v.body.issued_at, cfg.voucher_validity.as_secs());
    assert_eq!(r.voucher_id, v.body.voucher_id.to_vec());
    let k = r.key.clone().unwrap();
    assert_eq!((k.name.as_str(), k.version), (ISSUER, v.body.issuer_key_version));
    v.verify(&public_key(ISSUER, k.version)).unwrap();
    // Voucher ids are fresh.
    let r2 = c.voucher.clone().issue_voucher(req(&cert, "CNY", 1, 0)).await.unwrap().into_inner();
    assert_ne!(r2.voucher_id, r.voucher_id);

    // Balance above the certificate's max_balance, or zero.
    expect_code(c.voucher.clone().issue_voucher(req(&cert, "CNY", 50_001, 0)).await, Code::InvalidArgument, &["balance"], "balance above max_balance");
    expect_code(c.voucher.clone().issue_voucher(req(&cert, "CNY", u64::MAX, 0)).await, Code::InvalidArgument, &["balance"], "balance u64::MAX");
    expect_code(c.voucher.clone().issue_voucher(req(&cert, "CNY", 0, 0)).await, Code::InvalidArgument, &["balance"], "zero balance");
    // Currencies.
    for bad in ["cny", "CN", "CNYY", "", "C1Y", "Cny", "CN ", "ÇNY"] {
        expect_code(c.voucher.clone().issue_voucher(req(&cert, bad, 100, 0)).await, Code::InvalidArgument, &["currency"], &format!("currency {bad:?}"));
    }
    c.voucher.clone().issue_voucher(req(&cert, "USD", 100, 0)).await.expect("USD");
    // Validity above the maximum.
    let max = cfg.max_voucher_validity.as_secs();
    expect_code(c.voucher.clone().issue_voucher(req(&cert, "CNY", 100, max + 1)).await, Code::InvalidArgument, &["validity_seconds"], "voucher validity");

    // Certificates not signed by device.ca are refused.
    let soft_ca = SigningKey::generate().unwrap();
    let forged = Signed::sign(cert.body.clone(), &soft_ca).unwrap();
    let s = expect_code(c.voucher.clone().issue_voucher(req(&forged, "CNY", 100, 0)).await, Code::InvalidArgument, &["certificate"], "software-CA certificate");
    assert!(s.message().contains("does not verify"), "{s:?}");
    let forged99 = Signed::sign(DeviceCertificate { ca_key_version: 99, ..cert.body.clone() }, &soft_ca).unwrap();
    expect_code(c.voucher.clone().issue_voucher(req(&forged99, "CNY", 100, 0)).await, Code::FailedPrecondition, &["certificate", "device.ca/v99"], "unknown CA version");
    // A genuine certificate with its limits raised (original signature kept).
    let mut raised = cert.clone();
    raised.body.limits.max_balance = 10_000_000;
    expect_code(c.voucher.clone().issue_voucher(req(&raised, "CNY", 1_000_000, 0)).await, Code::InvalidArgument, &["certificate"], "tampered certificate");
    // Garbage and a voucher in the certificate's place.
    let garbage = IssueVoucherRequest { certificate: b"junk".to_vec(), ..req(&cert, "CNY", 100, 0) };
    expect_code(c.voucher.clone().issue_voucher(garbage).await, Code::InvalidArgument, &["certificate"], "garbage certificate");
    let swapped = IssueVoucherRequest { certificate: r.voucher.clone(), ..req(&cert, "CNY", 100, 0) };
    expect_code(c.voucher.clone().issue_voucher(swapped).await, Code::InvalidArgument, &["certificate"], "a voucher as certificate");

    // The voucher never outlives the certificate.
    let mut w2 = wallet();
    let (short, _) = certify(&c, &mut w2, lim(50_000, 10_000, 3), 120).await;
    for validity in [0, 60, 119, 120, 121, 3_600, max] {
        let r = c.voucher.clone().issue_voucher(req(&short, "CNY", 100, validity)).await.expect("IssueVoucher").into_inner();
        let v = Signed::<Voucher>::decode(&r.voucher).unwrap();
        assert!(v.body.expires_at <= short.body.not_after, "validity {validity}: voucher expires after its certificate");
        assert!(v.body.expires_at > v.body.issued_at);
        assert_eq!(r.expires_at, v.body.expires_at);
        if validity != 0 {
            assert_eq!(v.body.expires_at, (v.body.issued_at + validity).min(short.body.not_after), "validity {validity}");
        }
    }
    // An expired certificate: no voucher.
    let mut w3 = wallet();
    let (tiny, _) = certify(&c, &mut w3, lim(50_000, 10_000, 3), 1).await;
    while now() <= tiny.body.not_after {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    expect_code(c.voucher.clone().issue_voucher(req(&tiny, "CNY", 100, 0)).await, Code::FailedPrecondition, &["certificate"], "expired certificate");
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Offline terminal refusals with appliance-made objects
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_refuses_bad_payments_offline() {
    let srv = start("ecash-terminal").await;
    let c = srv.clients("ecash").await;
    let b = bundle(&c).await;
    let t = terminal(&b);
    let limits = lim(100_000, 20_000, 5);
    let mut w = funded(&c, limits, 0, 50_000, 0).await;

    // A terminal without a bundle, or with the wrong root key.
    let bare = Terminal::new(TERMINAL, MERCHANT, roots_for(&b)).unwrap();
    let (ch0, p0) = pay(&mut w, &t, now(), 1_000);
    assert_eq!(bare.verify_with_held_bundle(&ch0, 1_000, &p0), Err(Verdict::BundleInvalid));
    let rk = b.key.clone().unwrap().version;
    let mut wrong_root = Terminal::new(TERMINAL, MERCHANT, vec![(rk, SigningKey::generate().unwrap().public_key())]).unwrap();
    assert_eq!(wrong_root.update_bundle(&b.bundle), Err(EcashError::BadSignature));
    let mut other_version = Terminal::new(TERMINAL, MERCHANT, vec![(rk + 1, public_key(ROOT, rk))]).unwrap();
    assert_eq!(other_version.update_bundle(&b.bundle), Err(EcashError::UnknownRoot(rk)));

    // Genuine payments verify; a chained second one too.
    assert_eq!(t.verify_with_held_bundle(&ch0, 1_000, &p0), Ok(()));
    let (ch1, p1) = pay(&mut w, &t, now(), 2_000);
    assert_eq!(t.verify_with_held_bundle(&ch1, 2_000, &p1), Ok(()));

    // Replay: the payment answers another challenge (or another amount, terminal, merchant).
    let ch_new = t.challenge(now()).unwrap();
    assert_eq!(t.verify_with_held_bundle(&ch_new, 1_000, &p0), Err(Verdict::WrongChallenge));
    assert_eq!(t.verify_with_held_bundle(&ch0, 1_001, &p0), Err(Verdict::WrongChallenge));
    let mut other_t = Terminal::new("T-0002", MERCHANT, roots_for(&b)).unwrap();
    other_t.update_bundle(&b.bundle).unwrap();
    assert_eq!(other_t.verify_with_held_bundle(&ch0, 1_000, &p0), Err(Verdict::WrongChallenge));

    // A voucher signed by an unknown issuer key version (software key, version 99).
    let soft = SigningKey::generate().unwrap();
    let v99 = Signed::sign(Voucher { issuer_key_version: 99, ..p0.voucher.body.clone() }, &soft).unwrap();
    let ch = t.challenge(now()).unwrap();
    let p = with_voucher(&w, &p0, v99, Some(&ch));
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p), Err(Verdict::UnknownKeyVersion));
    // Same, but naming the real issuer version: a bad signature.
    let vreal = Signed::sign(p0.voucher.body.clone(), &soft).unwrap();
    let ch = t.challenge(now()).unwrap();
    let p = with_voucher(&w, &p0, vreal, Some(&ch));
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p), Err(Verdict::BadSignature));

    // A certificate past its validity at the terminal's time.
    let mut short = funded(&c, limits, 60, 10_000, 0).await;
    let cert = short.certificate().unwrap().clone();
    let (ch, p) = pay(&mut short, &t, cert.body.not_after + 1, 100);
    assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Err(Verdict::CertExpired));
    // Before not_before too.
    let mut early = funded(&c, limits, 600, 10_000, 0).await;
    let nb = early.certificate().unwrap().body.not_before;
    let (ch, p) = pay(&mut early, &t, nb - 1, 100);
    assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Err(Verdict::CertExpired));
    // At not_after exactly it is still valid (the window is inclusive).
    let mut edge = funded(&c, limits, 600, 10_000, 0).await;
    let na = edge.certificate().unwrap().body.not_after;
    let (ch, p) = pay(&mut edge, &t, na, 100);
    assert_eq!(t.verify_with_held_bundle(&ch, 100, &p), Ok(()));

    // Amount above the single-payment limit (the wallet refuses; a forged one).
    let ch = t.challenge(now()).unwrap();
    assert!(matches!(w.pay(&ch, 20_001, MERCHANT, TERMINAL), Err(WalletError::LimitExceeded(_))));
    let p = forge(&w, &p0, Some(&ch), |b| {
        b.amount = 20_001;
        b.balance_after = 50_000 - 20_001;
    });
    assert_eq!(t.verify_with_held_bundle(&ch, 20_001, &p), Err(Verdict::LimitExceeded));

    // Too many consecutive offline payments: limit 2, the third forged.
    let mut two = funded(&c, lim(100_000, 20_000, 2), 0, 10_000, 0).await;
    let (cha, pa) = pay(&mut two, &t, now(), 100);
    let (chb, pb) = pay(&mut two, &t, now(), 200);
    assert_eq!(t.verify_with_held_bundle(&cha, 100, &pa), Ok(()));
    assert_eq!(t.verify_with_held_bundle(&chb, 200, &pb), Ok(()));
    let ch = t.challenge(now()).unwrap();
    assert!(matches!(two.pay(&ch, 300, MERCHANT, TERMINAL), Err(WalletError::LimitExceeded(_))));
    let third = Presented { previous: Some(pb.payment.clone()), ..pb.clone() };
    let third = forge(&two, &third, Some(&ch), |b| {
        b.counter = pb.payment.body.counter + 1;
        b.prev_hash = pb.payment.hash();
        b.amount = 300;
        b.balance_after = pb.payment.body.balance_after - 300;
    });
    assert_eq!(t.verify_with_held_bundle(&ch, 300, &third), Err(Verdict::LimitExceeded));

    // A balance that does not add up.
    let ch = t.challenge(now()).unwrap();
    let p = forge(&w, &p0, Some(&ch), |b| b.balance_after += 1);
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p), Err(Verdict::BalanceMismatch));
    let ch = t.challenge(now()).unwrap();
    let p = forge(&w, &p1, Some(&ch), |b| b.balance_after = 50_000);
    assert_eq!(t.verify_with_held_bundle(&ch, 2_000, &p), Err(Verdict::BalanceMismatch));

    // A certificate from a CA not in the bundle: naming the real device.ca version it
    // is a bad signature (rule 1: the key is found, its signature fails); naming a
    // version the bundle lacks it is an unknown key version.
    let soft_ca = SigningKey::generate().unwrap();
    let ch = t.challenge(now()).unwrap();
    let fresh = forge(&w, &p0, Some(&ch), |_| {});
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &fresh), Ok(()), "the re-signed payment itself is fine");
    let cert_same = Signed::sign(p0.certificate.body.clone(), &soft_ca).unwrap();
    let p = Presented { certificate: cert_same, ..fresh.clone() };
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p), Err(Verdict::BadSignature));
    let cert99 = Signed::sign(DeviceCertificate { ca_key_version: 99, ..p0.certificate.body.clone() }, &soft_ca).unwrap();
    let p = Presented { certificate: cert99, ..fresh.clone() };
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p), Err(Verdict::UnknownKeyVersion));
    srv.stop().await;
}

/// A terminal that re-fetches the trust bundle while no key changed receives the same
/// `bundle_version`; docs/ecash-format.md has terminals accept a bundle of the version
/// they hold only when byte-identical, so the appliance must serve one byte string per
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refetched_unchanged_bundle_is_accepted_by_a_terminal() {
    let srv = start("ecash-refetch").await;
    let c = srv.clients("ecash").await;
    let a = bundle(&c).await;
    let b = bundle(&c).await;
    assert_eq!(a.bundle_version, b.bundle_version, "no key changed on this server");
    let mut t = terminal(&a);
    // The very same bytes again are accepted.
    assert_eq!(t.update_bundle(&a.bundle), Ok(a.bundle_version));
    assert_eq!(
        t.update_bundle(&b.bundle),
        Ok(a.bundle_version),
        "a terminal refreshing an unchanged bundle is refused: the appliance re-signs (new issued_at, new ECDSA nonce) \
         the same bundle_version on every TrustBundle call"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 5 + 7. Rotation and retirement of voucher.issuer (the only test changing keys)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voucher_issuer_rotation_and_retirement() {
    let srv = start("ecash-rotate").await;
    let c = srv.clients("ecash").await;
    let admin = srv.clients("admin").await;
    let limits = lim(100_000, 10_000, 10);

    // Under version n.
    let mut old = funded(&c, limits, 0, 50_000, 0).await;
    let vn = old.voucher().unwrap().body.issuer_key_version;
    assert_eq!(srv.hsm.catalogue().active(ISSUER).unwrap().meta.version, vn);
    let b1 = bundle(&c).await;
    let mut t = terminal(&b1);
    let (ch, p0) = pay(&mut old, &t, now(), 1_000);
    assert_eq!(t.verify_with_held_bundle(&ch, 1_000, &p0), Ok(()));
    assert_eq!(verdicts(&verify_batch(&c, std::slice::from_ref(&p0)).await), [PaymentVerdict::Valid]);

    // Rotate: new vouchers name n + 1.
    let vnext = {
        let _g = token_write();
        let cer = ceremony();
        let m = cer.rotate(ISSUER).expect("rotate voucher.issuer");
        cer.close().expect("close the ceremony");
        admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("ReloadKeys");
        m.version
    };
    assert_eq!(vnext, vn + 1);
    let mut new = funded(&c, limits, 0, 40_000, 0).await;
    assert_eq!(new.voucher().unwrap().body.issuer_key_version, vnext);
    let (_, vr) = issue(&c, new.certificate().unwrap(), 1, 0, 0).await;
    assert_eq!(vr.key.unwrap().version, vnext);
    new.voucher().unwrap().verify(&public_key(ISSUER, vnext)).unwrap();
    assert!(new.voucher().unwrap().verify(&public_key(ISSUER, vn)).is_err());

    // The new bundle holds both versions and is newer.
    let b2 = bundle(&c).await;
    assert!(b2.bundle_version > b1.bundle_version, "rotation must raise the bundle version: {} -> {}", b1.bundle_version, b2.bundle_version);
    let vb2 = TrustBundle::verify(&b2.bundle, &roots_for(&b2), 0).unwrap();
    let issuers: Vec<u32> = vb2.bundle().keys.iter().filter(|k| k.role == KeyRole::VoucherIssuer).map(|k| k.version).collect();
    assert!(issuers.contains(&vn) && issuers.contains(&vnext), "{issuers:?}");
    assert_eq!(t.update_bundle(&b2.bundle), Ok(b2.bundle_version));
    // An older bundle is refused after a newer one; the newer one stays.
    assert_eq!(
        t.update_bundle(&b1.bundle),
        Err(EcashError::OlderBundle { got: b1.bundle_version, min: b2.bundle_version })
    );
    assert_eq!(t.bundle().map(|b| b.version()), Some(b2.bundle_version));

    // The old voucher still pays at a terminal with the new bundle; the new one too.
    let (ch, p1) = pay(&mut old, &t, now(), 2_000);
    assert_eq!(t.verify_with_held_bundle(&ch, 2_000, &p1), Ok(()), "v{vn} voucher after rotation");
    let (ch, q0) = pay(&mut new, &t, now(), 3_000);
    assert_eq!(t.verify_with_held_bundle(&ch, 3_000, &q0), Ok(()), "v{vnext} voucher");
    let r = verify_batch(&c, &[p0.clone(), p1.clone(), q0.clone()]).await;
    assert_eq!(verdicts(&r), [PaymentVerdict::Valid; 3]);
    assert_eq!(r.valid, 3);

    // Retire version n.
    {
        let _g = token_write();
        let cer = ceremony();
        let m = cer.retire(ISSUER, vn).expect("retire voucher.issuer v_n");
        assert_eq!((m.version, m.state), (vn, KeyState::Retired));
        cer.close().expect("close the ceremony");
        admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("ReloadKeys");
    }
    let b3 = bundle(&c).await;
    assert!(b3.bundle_version > b2.bundle_version, "retirement must raise the bundle version");
    let vb3 = TrustBundle::verify(&b3.bundle, &roots_for(&b3), 0).unwrap();
    let issuers: Vec<u32> = vb3.bundle().keys.iter().filter(|k| k.role == KeyRole::VoucherIssuer).map(|k| k.version).collect();
    assert!(!issuers.contains(&vn) && issuers.contains(&vnext), "{issuers:?}");
    assert!(vb3.bundle().keys.iter().any(|k| k.role == KeyRole::DeviceCa), "device.ca stays");
    assert_eq!(t.update_bundle(&b3.bundle), Ok(b3.bundle_version));
    assert!(matches!(t.update_bundle(&b2.bundle), Err(EcashError::OlderBundle { .. })));

    // A v_n voucher: UNKNOWN_KEY_VERSION at the terminal with the new bundle, and in
    // VerifyPayments, even for payments VerifyPayments already found valid.
    let (ch, p2) = pay(&mut old, &t, now(), 500);
    assert_eq!(t.verify_with_held_bundle(&ch, 500, &p2), Err(Verdict::UnknownKeyVersion));
    let mut fresh = Terminal::new(TERMINAL, MERCHANT, roots_for(&b3)).unwrap();
    fresh.update_bundle(&b3.bundle).unwrap();
    assert_eq!(fresh.verify_with_held_bundle(&ch, 500, &p2), Err(Verdict::UnknownKeyVersion));
    let (ch, q1) = pay(&mut new, &t, now(), 700);
    assert_eq!(t.verify_with_held_bundle(&ch, 700, &q1), Ok(()), "v{vnext} vouchers stay valid");
    let r = verify_batch(&c, &[p0, p1, p2, q0, q1]).await;
    use PaymentVerdict::{UnknownKeyVersion as Ukv, Valid};
    assert_eq!(verdicts(&r), [Ukv, Ukv, Ukv, Valid, Valid]);
    assert_eq!(r.valid, 2);

    // Issuing uses v_{n+1}; the retired version is never used again.
    let mut later = funded(&c, limits, 0, 1_000, 0).await;
    assert_eq!(later.voucher().unwrap().body.issuer_key_version, vnext);
    let (ch, p) = pay(&mut later, &t, now(), 10);
    assert_eq!(t.verify_with_held_bundle(&ch, 10, &p), Ok(()));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 6. VerifyPayments
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_payments_gives_the_right_verdict_per_item_in_order() {
    let srv = start("ecash-verify").await;
    let c = srv.clients("ecash").await;
    let b = bundle(&c).await;
    let t = terminal(&b);
    let limits = lim(100_000, 30_000, 5);

    // Another device, certified before the payments below (so its certificate is valid
    // at their terminal time).
    let other = funded(&c, limits, 0, 10_000, 0).await;
    let mut w = funded(&c, limits, 0, 50_000, 0).await;
    let (_, good) = pay(&mut w, &t, now(), 1_000);
    let (_, good2) = pay(&mut w, &t, now(), 4_000);
    assert!(good2.previous.is_some());

    // BAD_SIGNATURE: the payment changed after signing.
    let mut bad_sig = good.clone();
    bad_sig.payment.body.merchant_id = "M-OTHER".into();
    // UNKNOWN_KEY_VERSION: a voucher under issuer version 99.
    let soft = SigningKey::generate().unwrap();
    let v99 = Signed::sign(Voucher { issuer_key_version: 99, ..good.voucher.body.clone() }, &soft).unwrap();
    let unknown = with_voucher(&w, &good, v99, None);
    // CERT_EXPIRED: a 60-second certificate, paid after it.
    let mut short = funded(&c, limits, 60, 10_000, 0).await;
    let na = short.certificate().unwrap().body.not_after;
    let (_, cert_expired) = pay(&mut short, &t, na + 1, 100);
    // VOUCHER_EXPIRED: a 60-second voucher, paid after it (the certificate still valid).
    let mut vshort = funded(&c, limits, 0, 10_000, 60).await;
    let ve = vshort.voucher().unwrap().body.expires_at;
    assert!(ve < vshort.certificate().unwrap().body.not_after);
    let (_, voucher_expired) = pay(&mut vshort, &t, ve + 1, 100);
    // WRONG_DEVICE: the voucher and payment of one device with another's certificate.
    let wrong_device = Presented { certificate: other.certificate().unwrap().clone(), ..good.clone() };
    // BALANCE_MISMATCH, LIMIT_EXCEEDED, CHAIN_BROKEN: forged by the device.
    let mismatch = forge(&w, &good, None, |b| b.balance_after -= 1);
    let over = forge(&w, &good, None, |b| {
        b.amount = 30_001;
        b.balance_after = 50_000 - 30_001;
    });
    let broken = forge(&w, &good, None, |b| b.prev_hash = [0x5a; 32]);
    let broken_counter = forge(&w, &good, None, |b| b.counter += 1);
    let broken_prev = Presented { previous: Some(good.payment.clone()), ..good.clone() };
    // A chained payment that deducts nothing from its previous balance.
    let no_deduction = forge(&w, &good2, None, |b| b.balance_after = good.payment.body.balance_after);

    use PaymentVerdict as V;
    let items: Vec<(Vec<u8>, V)> = vec![
        (good.encode(), V::Valid),
        (bad_sig.encode(), V::BadSignature),
        (unknown.encode(), V::UnknownKeyVersion),
        (cert_expired.encode(), V::CertExpired),
        (voucher_expired.encode(), V::VoucherExpired),
        (wrong_device.encode(), V::WrongDevice),
        (mismatch.encode(), V::BalanceMismatch),
        (over.encode(), V::LimitExceeded),
        (broken.encode(), V::ChainBroken),
        (b"garbage bytes".to_vec(), V::Malformed),
        (good2.encode(), V::Valid),
        (broken_counter.encode(), V::ChainBroken),
        (broken_prev.encode(), V::ChainBroken),
        (Vec::new(), V::Malformed),
        (good.payment.encode(), V::Malformed),
        (no_deduction.encode(), V::BalanceMismatch),
    ];
    // The library agrees with every expectation (offline, with the same bundle).
    let vb = t.bundle().unwrap();
    for (i, (bytes, want)) in items.iter().enumerate() {
        if let Ok(p) = Presented::decode(bytes) {
            let got = keyward::ecash::check_payment(vb, &p, p.payment.body.terminal_time);
            assert_eq!(got.as_str(), want.as_str_name().trim_start_matches("PAYMENT_VERDICT_"), "item {i} offline");
        }
    }
    let payments: Vec<Vec<u8>> = items.iter().map(|(b, _)| b.clone()).collect();
    let want: Vec<V> = items.iter().map(|(_, v)| *v).collect();
    let r = verify_raw(&c, payments.clone()).await;
    assert_eq!(verdicts(&r), want);
    assert_eq!(r.valid, 2);
    // Again (now with memoised signature checks): the same verdicts.
    let r = verify_raw(&c, payments.clone()).await;
    assert_eq!(verdicts(&r), want);
    assert_eq!(r.valid, 2);
    // Reversed: each verdict follows its item.
    let mut rev = payments;
    rev.reverse();
    let mut want_rev = want;
    want_rev.reverse();
    assert_eq!(verdicts(&verify_raw(&c, rev).await), want_rev);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_payments_batch_limits() {
    let srv = start_with("ecash-batch", |cfg| cfg.ecash.max_batch = 3).await;
    let c = srv.clients("ecash").await;
    let b = bundle(&c).await;
    let t = terminal(&b);
    let mut w = funded(&c, lim(10_000, 1_000, 10), 0, 10_000, 0).await;
    let ps: Vec<Vec<u8>> = (1..=4).map(|i| pay(&mut w, &t, now(), i).1.encode()).collect();

    expect_code(
        c.voucher.clone().verify_payments(VerifyPaymentsRequest { payments: vec![] }).await,
        Code::InvalidArgument,
        &["payments"],
        "empty batch",
    );
    expect_code(
        c.voucher.clone().verify_payments(VerifyPaymentsRequest { payments: ps.clone() }).await,
        Code::InvalidArgument,
        &["payments", "3"],
        "batch above max_batch",
    );
    let r = verify_raw(&c, ps[..3].to_vec()).await;
    assert_eq!(verdicts(&r), [PaymentVerdict::Valid; 3]);
    assert_eq!(r.valid, 3);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_payments_200_chained_payments_and_the_signature_memo() {
    let srv = start("ecash-200").await;
    let c = srv.clients("ecash").await;
    let b = bundle(&c).await;
    let t = terminal(&b);

    // Four devices, 50 chained payments each, interleaved.
    let mut wallets = Vec::new();
    for _ in 0..4 {
        wallets.push(funded(&c, lim(100_000, 1_000, 50), 0, 100_000, 0).await);
    }
    let mut items = Vec::new();
    for round in 0..50u64 {
        for w in wallets.iter_mut() {
            items.push(pay(w, &t, now(), 1 + round).1);
        }
    }
    assert_eq!(items.len(), 200);
    let r = verify_batch(&c, &items).await;
    assert_eq!(verdicts(&r), vec![PaymentVerdict::Valid; 200]);
    assert_eq!(r.valid, 200);
    let again = verify_batch(&c, &items).await;
    assert_eq!(again, r, "the same batch gives the same verdicts");

    // The memo never vouches for changed bytes: tampered copies of objects already
    // verified (payment, previous payment, voucher, certificate) are BAD_SIGNATURE.
    let good = items[4 * 10].clone();
    assert!(good.previous.is_some());
    let mut pay_t = good.clone();
    pay_t.payment.body.terminal_id = "T-9999".into();
    let mut prev_t = good.clone();
    if let Some(p) = prev_t.previous.as_mut() {
        p.body.merchant_id = "M-9999".into();
    }
    let mut voucher_t = good.clone();
    voucher_t.voucher.body.expires_at += 1;
    let mut cert_t = good.clone();
    cert_t.certificate.body.limits.max_single_payment += 1;
    let mut cert_t2 = good.clone();
    cert_t2.certificate.body.not_after += 1;
    use PaymentVerdict as V;
    let batch = vec![good.clone(), pay_t, prev_t, voucher_t, cert_t, cert_t2, good.clone()];
    let want = [V::Valid, V::BadSignature, V::BadSignature, V::BadSignature, V::BadSignature, V::BadSignature, V::Valid];
    let r = verify_batch(&c, &batch).await;
    assert_eq!(verdicts(&r), want);
    assert_eq!(r.valid, 2);
    // One at a time, after the good one: still refused.
    for (i, p) in batch.iter().enumerate() {
        let r = verify_batch(&c, std::slice::from_ref(p)).await;
        assert_eq!(verdicts(&r), [want[i]], "item {i} alone");
    }
    // A certificate for the same device id with another device key (even signed by a
    // CA): ids derive from keys, so it does not decode.
    let rogue = wallet();
    let body = DeviceCertificate { device_public_key: rogue.public_key().sec1().expect("a P-256 device key"), ..good.certificate.body.clone() };
    let signature = SigningKey::generate().unwrap().sign(&body.tbs()).unwrap();
    let p = Presented { certificate: Signed { body, signature }, ..good.clone() };
    assert_eq!(verdicts(&verify_batch(&c, &[p]).await), [V::Malformed]);
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// 8. Roles and the audit trail
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_is_denied_and_the_account_reference_never_reaches_the_audit_trail() {
    let account: &[u8] = b"ACCT/ZQXW-6222020200112233445";
    let srv = start("ecash-roles").await;
    let dir = srv.audit_dir.clone();
    let c = srv.clients("ecash").await;
    let hub = srv.clients("hub").await;

    // Calls by the ecash role with the account reference, good and bad.
    let mut w = wallet();
    let req = w.certification_request(account, now()).unwrap();
    let cr = c
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest { certification_request: req.encode(), limits: Some(lim(10_000, 1_000, 3)), validity_seconds: 0 })
        .await
        .expect("CertifyDevice")
        .into_inner();
    let cert = Signed::<DeviceCertificate>::decode(&cr.certificate).unwrap();
    assert_eq!(cert.body.account_ref, account);
    w.install_certificate(cert.clone()).unwrap();
    let stale = w.certification_request(account, now() - 3_600).unwrap();
    let r = c
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest { certification_request: stale.encode(), limits: Some(lim(10_000, 1_000, 3)), validity_seconds: 0 })
        .await;
    expect_code(r, Code::InvalidArgument, &[], "stale request");
    let forged = Signed::sign(req.body.clone(), &SigningKey::generate().unwrap()).unwrap();
    let r = c
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest { certification_request: forged.encode(), limits: Some(lim(10_000, 1_000, 3)), validity_seconds: 0 })
        .await;
    expect_code(r, Code::InvalidArgument, &[], "no proof of possession");
    let (v, _) = issue(&c, &cert, 5_000, 0, 0).await;
    w.load_voucher(v).unwrap();
    let b = bundle(&c).await;
    let t = terminal(&b);
    let (_, p) = pay(&mut w, &t, now(), 100);
    let r = verify_batch(&c, std::slice::from_ref(&p)).await;
    assert_eq!(r.valid, 1);
    let mut raised = cert.clone();
    raised.body.limits.max_balance += 1;
    expect_code(
        c.voucher
            .clone()
            .issue_voucher(IssueVoucherRequest { certificate: raised.encode(), currency: "CNY".into(), balance: 1, counter_at_issue: 0, validity_seconds: 0 })
            .await,
        Code::InvalidArgument,
        &[],
        "tampered certificate",
    );

    // The hub: PERMISSION_DENIED for every VoucherService RPC.
    let req2 = w.certification_request(account, now()).unwrap();
    expect_code(
        hub.voucher
            .clone()
            .certify_device(CertifyDeviceRequest { certification_request: req2.encode(), limits: Some(lim(10_000, 1_000, 3)), validity_seconds: 0 })
            .await,
        Code::PermissionDenied,
        &[],
        "hub CertifyDevice",
    );
    expect_code(
        hub.voucher
            .clone()
            .issue_voucher(IssueVoucherRequest { certificate: cert.encode(), currency: "CNY".into(), balance: 1, counter_at_issue: 0, validity_seconds: 0 })
            .await,
        Code::PermissionDenied,
        &[],
        "hub IssueVoucher",
    );
    expect_code(hub.voucher.clone().trust_bundle(TrustBundleRequest {}).await, Code::PermissionDenied, &[], "hub TrustBundle");
    expect_code(
        hub.voucher.clone().verify_payments(VerifyPaymentsRequest { payments: vec![p.encode()] }).await,
        Code::PermissionDenied,
        &[],
        "hub VerifyPayments",
    );
    srv.stop().await;

    let lines = rpc_lines(&dir);
    let voucher_lines: Vec<_> = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().contains("VoucherService/")).collect();
    for m in ["CertifyDevice", "IssueVoucher", "TrustBundle", "VerifyPayments"] {
        let denied = voucher_lines
            .iter()
            .filter(|l| {
                l["action"].as_str().unwrap_or_default().ends_with(&format!("/{m}")) && l["client"] == "spiffe://keyward/client/hub"
            })
            .collect::<Vec<_>>();
        assert_eq!(denied.len(), 1, "{m}: one hub line");
        assert_eq!((denied[0]["outcome"].as_str(), denied[0]["code"].as_str()), (Some("denied"), Some("PERMISSION_DENIED")), "{m}");
    }
    let certified = voucher_lines
        .iter()
        .find(|l| l["action"].as_str().unwrap_or_default().ends_with("/CertifyDevice") && l["code"] == "OK")
        .expect("the CertifyDevice line");
    assert!(certified["keys"].to_string().contains("device.ca/v"), "{certified}");
    assert_eq!(voucher_lines.iter().filter(|l| l["role"] == "ecash").count(), 7, "every ecash call is audited");

    // Nothing of the account reference anywhere in the trail files, in any encoding.
    let mut text = String::new();
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        if f.path().is_file() {
            text.push_str(&String::from_utf8_lossy(&std::fs::read(f.path()).unwrap()));
        }
    }
    assert!(!text.is_empty());
    let mut needles = vec![
        hex::encode(account),
        hex::encode_upper(account),
        data_encoding::BASE64.encode(account),
        data_encoding::BASE64URL_NOPAD.encode(account),
        format!("{account:?}"),
    ];
    for win in account.windows(10) {
        needles.push(String::from_utf8_lossy(win).into_owned());
    }
    for n in needles {
        assert!(!text.contains(&n), "the audit trail holds {n:?} of the account reference");
    }
}
