//! Ed25519 as the second signature algorithm of the appliance's e-cash keys: with a
//! key profile that makes `voucher.issuer` and `ecash.root` Ed25519 keys, the token
//! signs vouchers and the trust bundle with pure EdDSA; the PEM `ceremony export-public`
//! prints verifies them with openssl; a terminal holding the Ed25519 root takes the
//! bundle, verifies payments on an Ed25519-signed voucher offline, and VerifyPayments
//! agrees, next to the P-256 device certificate. A binary of its own: its token is
//! made from that profile.

#![allow(clippy::await_holding_lock)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use keyward::ecash::{DeviceCertificate, KeyAlgorithm, PublicKey, Signed, Terminal, Voucher, Wallet};
use keyward::hsm::Algorithm;
use keyward::proto::{
    CertifyDeviceRequest, IssueVoucherRequest, OfflineLimits, PaymentVerdict, TrustBundleRequest, VerifyPaymentsRequest,
};
use openssl::pkey::PKey;
use openssl::sign::Verifier;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The PEM `keyward ceremony export-public NAME --version V` prints (the real binary).
fn cli_export_public(name: &str, version: u32) -> String {
    let cfg = fixture().prepared.config.to_string_lossy().into_owned();
    let mut cmd = keyward_cli();
    cmd.args(["ceremony", "--config", &cfg, "export-public", name, "--version", &version.to_string()]);
    let out = run_cli(cmd, b"");
    assert!(out.status.success(), "export-public {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_issuer_and_root_keys_sign_in_the_token_and_verify_offline() {
    // The example profile with voucher.issuer and ecash.root as Ed25519 keys.
    let text = std::fs::read_to_string("pkcs11-config/key-profile.toml").expect("the example profile");
    let mut out = String::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            current = name.trim_matches('"').to_string();
        }
        if line.starts_with("algorithm = ") && (current == "voucher.issuer" || current == "ecash.root") {
            out.push_str("algorithm = \"Ed25519\"\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let dir = std::env::temp_dir().join(format!("keyward-ed25519-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("key-profile.toml");
    std::fs::write(&profile, out).unwrap();
    use_profile(profile);
    let keys = &fixture().init_keys;
    let find = |name: &str| keys.iter().find(|k| k.name == name).cloned().unwrap_or_else(|| panic!("{name} made"));
    let (issuer, root) = (find("voucher.issuer"), find("ecash.root"));
    assert_eq!((issuer.algorithm, root.algorithm), (Algorithm::Ed25519, Algorithm::Ed25519));
    assert_eq!(find("device.ca").algorithm, Algorithm::EcP256);
    let srv = start("ed25519").await;
    let ecash = srv.clients("ecash").await;

    let mut wallet = Wallet::new().expect("wallet");
    let req = wallet.certification_request(b"ed-account", now()).expect("request");
    let cert = ecash
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest {
            certification_request: req.encode(),
            limits: Some(OfflineLimits { max_balance: 100_000, max_single_payment: 50_000, max_consecutive_offline: 10 }),
            validity_seconds: 0,
        })
        .await
        .expect("CertifyDevice")
        .into_inner();
    wallet.install_certificate(Signed::<DeviceCertificate>::decode(&cert.certificate).unwrap()).unwrap();
    let v = ecash
        .voucher
        .clone()
        .issue_voucher(IssueVoucherRequest {
            certificate: cert.certificate.clone(),
            currency: "CNY".into(),
            balance: 50_000,
            counter_at_issue: wallet.counter(),
            validity_seconds: 0,
        })
        .await
        .expect("IssueVoucher")
        .into_inner();
    let key = v.key.clone().expect("key ref");
    assert_eq!((key.name.as_str(), key.version), ("voucher.issuer", issuer.version));
    let voucher = Signed::<Voucher>::decode(&v.voucher).expect("the voucher decodes");
    assert_eq!(voucher.encode(), v.voucher, "byte-identical re-encoding");

    // openssl, from the exported PEM: pure Ed25519 over the tbs bytes.
    let pem = cli_export_public("voucher.issuer", issuer.version);
    let pkey = PKey::public_key_from_pem(pem.as_bytes()).expect("PEM");
    assert_eq!(pkey.id(), openssl::pkey::Id::ED25519);
    let mut verifier = Verifier::new_without_digest(&pkey).unwrap();
    assert!(verifier.verify_oneshot(&voucher.signature, &voucher.body.tbs()).unwrap(), "openssl verifies the token's EdDSA");
    let mut changed = voucher.body.tbs();
    changed[40] ^= 1;
    let mut verifier = Verifier::new_without_digest(&pkey).unwrap();
    assert!(!verifier.verify_oneshot(&voucher.signature, &changed).unwrap_or(false));
    let issuer_key = PublicKey::from_pem(pem.as_bytes()).expect("keyward reads the Ed25519 PEM");
    assert_eq!(issuer_key.algorithm(), KeyAlgorithm::Ed25519);
    voucher.verify(&issuer_key).expect("Signed::verify with the Ed25519 key");
    // And not under the P-256 device.ca key.
    let ca_pem = cli_export_public("device.ca", 1);
    assert!(voucher.verify(&PublicKey::from_pem(ca_pem.as_bytes()).unwrap()).is_err());

    // The bundle: signed by the Ed25519 root, carrying both algorithms.
    let b = ecash.voucher.clone().trust_bundle(TrustBundleRequest {}).await.expect("TrustBundle").into_inner();
    assert_eq!(b.key.clone().map(|k| k.version), Some(root.version));
    let root_key = PublicKey::from_pem(cli_export_public("ecash.root", root.version).as_bytes()).unwrap();
    let mut terminal = Terminal::new("T-ED", "M-ED", vec![(root.version, root_key)]).unwrap();
    terminal.update_bundle(&b.bundle).expect("the terminal verifies the Ed25519-signed bundle");
    let algs: Vec<KeyAlgorithm> = terminal.bundle().unwrap().bundle().keys.iter().map(|k| k.algorithm).collect();
    assert!(algs.contains(&KeyAlgorithm::P256) && algs.contains(&KeyAlgorithm::Ed25519), "{algs:?}");
    // A terminal holding another key under the root's version refuses it.
    let other_root = PublicKey::from_pem(ca_pem.as_bytes()).unwrap();
    let mut other = Terminal::new("T-ED", "M-ED", vec![(root.version, other_root)]).unwrap();
    assert!(other.update_bundle(&b.bundle).is_err());

    wallet.load_voucher(voucher).unwrap();
    let mut uploads = Vec::new();
    for amount in [10_000u64, 15_000] {
        let ch = terminal.challenge(now()).unwrap();
        let p = wallet.pay(&ch, amount, "M-ED", "T-ED").unwrap();
        terminal.verify_with_held_bundle(&ch, amount, &p).expect("verified offline");
        uploads.push(p.encode());
    }
    let mut tampered = keyward::ecash::Presented::decode(&uploads[0]).unwrap();
    tampered.voucher.signature[5] ^= 1;
    uploads.push(tampered.encode());
    let r = ecash.voucher.clone().verify_payments(VerifyPaymentsRequest { payments: uploads }).await.unwrap().into_inner();
    let verdicts: Vec<PaymentVerdict> = r.verdicts.iter().map(|v| PaymentVerdict::try_from(*v).unwrap()).collect();
    assert_eq!(verdicts, [PaymentVerdict::Valid, PaymentVerdict::Valid, PaymentVerdict::BadSignature]);
    srv.stop().await;
}
