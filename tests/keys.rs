//! Key model against a real SoftHSM token: ceremony-made keys are sensitive,
//! unextractable and private with the profile's classes; widened keys are refused;
//! KCVs of imported components match the published vectors (library and CLI);
//! classes are enforced on every call; rotation and retirement; KeyService never
//! returns secret material.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use keyward::ceremony::ProfileKey;
use keyward::hsm::{Algorithm, Compound, KeyClass, KeyState, Usage};
use keyward::proto::{DecryptRequest, EncryptRequest, GetKeyRequest, KeyState as WireState, ListKeysRequest, ReloadKeysRequest};
use tonic::Code;
use zeroize::Zeroizing;

const TDES_KEY: &str = "0123456789ABCDEFFEDCBA9876543210";
const TDES_KCV: &str = "08D7B4";
const AES_KEY: &str = "2B7E151628AED2A6ABF7158809CF4F3C";
const AES_KCV: &str = "7AD386";

fn usage_within(have: Usage, allowed: Usage) -> Vec<&'static str> {
    let pairs = [
        ("ENCRYPT", have.encrypt, allowed.encrypt),
        ("DECRYPT", have.decrypt, allowed.decrypt),
        ("SIGN", have.sign, allowed.sign),
        ("VERIFY", have.verify, allowed.verify),
        ("WRAP", have.wrap, allowed.wrap),
        ("UNWRAP", have.unwrap, allowed.unwrap),
        ("DERIVE", have.derive, allowed.derive),
    ];
    pairs.iter().filter(|(_, h, a)| *h && !*a).map(|(n, _, _)| *n).collect()
}

/// Two components that XOR to `key_hex`.
fn components_of(key_hex: &str) -> [Zeroizing<Vec<u8>>; 2] {
    let key = hex::decode(key_hex).unwrap();
    let c1 = component1(key.len());
    let c2 = xor(&key, &c1);
    assert_ne!(c1, key);
    assert_ne!(c2, key);
    [Zeroizing::new(c1), Zeroizing::new(c2)]
}

fn enc(key: &str, pt: &[u8], aad: &[u8]) -> EncryptRequest {
    EncryptRequest { key_name: key.into(), plaintext: pt.to_vec(), aad: aad.to_vec() }
}

fn dec(key: &str, ct: &[u8], aad: &[u8]) -> DecryptRequest {
    DecryptRequest { key_name: key.into(), ciphertext: ct.to_vec(), aad: aad.to_vec() }
}

/// A well-formed ciphertext header for `version` with a zero IV and a zero "ciphertext+tag".
fn forged_ciphertext(version: u32) -> Vec<u8> {
    let mut c = vec![1u8];
    c.extend_from_slice(&version.to_be_bytes());
    c.extend_from_slice(&[0u8; 12]);
    c.extend_from_slice(&[0u8; 32]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremony_keys_are_sensitive_unextractable_private_with_profile_classes() {
    let fx = fixture();
    let srv = start("init-flags").await;
    let cat = srv.hsm.catalogue();
    assert!(!fx.profile.is_empty());
    // Compound keys (retail-MAC pair, TDES BDK + variant) are two token keys each.
    let parts = |pk: &ProfileKey| -> Vec<(String, Algorithm)> {
        match Compound::of(pk.class, pk.algorithm) {
            Some(Compound::RetailMacPair) => {
                Compound::RetailMacPair.part_names(&pk.name).into_iter().map(|n| (n, Algorithm::Des)).collect()
            }
            Some(kind) => kind.part_names(&pk.name).into_iter().map(|n| (n, pk.algorithm)).collect(),
            None => vec![(pk.name.clone(), pk.algorithm)],
        }
    };
    let expected: Vec<(String, Algorithm, KeyClass)> =
        fx.profile.iter().flat_map(|pk| parts(pk).into_iter().map(|(n, a)| (n, a, pk.class))).collect();
    assert!(expected.len() > fx.profile.len(), "the profile has compound keys");
    assert_eq!(fx.init_keys.len(), expected.len(), "ceremony init reported every profile key and part");
    for (name, algorithm, class) in &expected {
        let pk = ProfileKey { name: name.clone(), class: *class, algorithm: *algorithm, purpose: String::new() };
        let e = cat.get(&pk.name, 1).unwrap_or_else(|err| panic!("{} missing from the catalogue: {err}", pk.name));
        assert_eq!(e.meta.name, pk.name);
        assert_eq!(e.meta.version, 1);
        assert_eq!(e.meta.class, pk.class, "{}: class", pk.name);
        assert_eq!(e.meta.algorithm, pk.algorithm, "{}: algorithm", pk.name);
        assert_eq!(e.meta.state, KeyState::Active, "{}: state", pk.name);
        assert_eq!(e.meta.label(), format!("kw/{}/v1", pk.name));
        assert_eq!(e.meta.kcv.len(), 6, "{}: KCV is 3 bytes of hex", pk.name);
        assert!(e.meta.kcv.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()), "{}: KCV upper-case hex", pk.name);
        assert!(
            !cat.refused().iter().any(|(l, _)| l == &e.meta.label()),
            "{}: a ceremony key is refused",
            pk.name
        );

        let flags = srv.hsm.key_flags(e).unwrap_or_else(|err| panic!("{}: key_flags: {err}", pk.name));
        assert!(flags.sensitive, "{}: not SENSITIVE", pk.name);
        assert!(!flags.extractable, "{}: EXTRACTABLE", pk.name);
        assert!(flags.private, "{}: not PRIVATE", pk.name);
        let allowed = pk.class.usage(pk.algorithm).expect("the profile only has allowed class/algorithm pairs");
        let widened = usage_within(flags.usage, allowed);
        assert!(widened.is_empty(), "{}: usage wider than class {} allows: {widened:?}", pk.name, pk.class);
        // KEKs, BDKs and the audit signing key are MODIFIABLE=false, used in
        // place. (The `audit` chain key is a hot-path key copied into a session object.)
        if matches!(pk.class, KeyClass::K0 | KeyClass::B0) || pk.name == "audit.sign" {
            assert!(!flags.modifiable, "{}: KEK/BDK/audit.sign must be MODIFIABLE=false", pk.name);
        }
        let value = srv.hsm.try_read_value(e).unwrap_or_else(|err| panic!("{}: try_read_value: {err}", pk.name));
        assert!(value.is_none(), "{}: CKA_VALUE readable ({} bytes)", pk.name, value.map(|v| v.len()).unwrap_or(0));
        if pk.algorithm.is_asymmetric() {
            assert!(e.public_der.is_some(), "{}: no public key", pk.name);
        } else {
            assert!(e.public_der.is_none(), "{}: a symmetric key with a public key", pk.name);
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_key_is_refused_at_startup_and_reload() {
    // M6 (CMAC) keys may sign/verify only: the hook adds ENCRYPT and DECRYPT.
    let name = "mac.widen";
    let old = start("widen-old").await;
    {
        let _g = token_write();
        old.hsm
            .create_key(name, KeyClass::M6, Algorithm::Aes128, None, KeyState::Active)
            .expect("create mac.widen");
        old.hsm.reload().expect("reload");
    }
    let admin = old.clients("admin").await;
    // Served before the change: a class error, not NOT_FOUND.
    let s = err_of(admin.data.clone().encrypt(enc(name, b"x", b"y")).await, "encrypt with an M6 key");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let entry = old.hsm.catalogue().get(name, 1).expect("mac.widen loaded").clone();
    {
        let _g = token_write();
        old.hsm.widen_usage_for_test(&entry).expect("widen the token original");
    }
    let flags = old.hsm.key_flags(&entry).expect("flags");
    assert!(flags.usage.encrypt && flags.usage.decrypt, "the hook widened nothing");

    let new = start("widen-new").await;
    let cat = new.hsm.catalogue();
    assert!(cat.get(name, 1).is_err(), "a widened key is served by a new instance");
    assert!(!cat.iter().any(|e| e.meta.name == name), "a widened key is in the catalogue");
    let refused: Vec<_> = cat.refused().iter().filter(|(l, _)| l == "kw/mac.widen/v1").collect();
    assert_eq!(refused.len(), 1, "refused() must name kw/mac.widen/v1: {:?}", cat.refused());
    assert!(refused[0].1.contains("ENCRYPT") || refused[0].1.contains("widened"), "reason: {}", refused[0].1);
    // Other keys are unaffected.
    assert!(cat.get("data", 1).is_ok());

    let admin_new = new.clients("admin").await;
    let s = err_of(admin_new.data.clone().encrypt(enc(name, b"x", b"y")).await, "encrypt with a refused key");
    assert_ne!(s.code(), Code::Internal, "{s:?}");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = err_of(admin_new.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 1 }).await, "GetKey of a refused key");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");

    // The old instance refuses it at its next reload.
    {
        let _g = token_write();
        old.hsm.reload().expect("reload on the old instance");
    }
    let cat = old.hsm.catalogue();
    assert!(cat.get(name, 1).is_err(), "reload keeps serving a widened key");
    assert!(cat.refused().iter().any(|(l, _)| l == "kw/mac.widen/v1"), "{:?}", cat.refused());
    let s = err_of(admin.data.clone().encrypt(enc(name, b"x", b"y")).await, "encrypt after reload");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    new.stop().await;
    old.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_component_kcvs_match_published_vectors() {
    let srv = start("kcv").await;
    {
        let _g = token_write();
        let c = ceremony();
        let m = c
            .import_components("kcv.tdes", KeyClass::P0, Algorithm::Tdes2, &components_of(TDES_KEY), None)
            .expect("import TDES components");
        assert_eq!(m.kcv, TDES_KCV, "TDES KCV (X9.24-1 A.2)");
        assert_eq!((m.class, m.algorithm, m.version, m.state), (KeyClass::P0, Algorithm::Tdes2, 1, KeyState::Active));

        let m = c
            .import_components("kcv.aes", KeyClass::D0, Algorithm::Aes128, &components_of(AES_KEY), Some(&AES_KCV.to_lowercase()))
            .expect("import AES components with the right expected KCV");
        assert_eq!(m.kcv, AES_KCV, "AES CMAC KCV (RFC 4493)");
        assert_eq!((m.class, m.algorithm, m.version), (KeyClass::D0, Algorithm::Aes128, 1));

        // A single component's KCV is not the key's.
        let [c1, _] = components_of(AES_KEY);
        assert_ne!(c.component_kcv(Algorithm::Aes128, &c1).expect("component kcv"), AES_KCV);

        // Wrong expected KCV: refused, nothing imported.
        let r = c.import_components("kcv.wrong", KeyClass::D0, Algorithm::Aes128, &components_of(AES_KEY), Some("000000"));
        let e = r.expect_err("a wrong expected KCV must refuse the import");
        assert!(e.to_string().contains("KCV"), "{e}");
        assert!(!c.list().iter().any(|k| k.name == "kcv.wrong"), "kcv.wrong was imported");
        // Components of the wrong length are refused too.
        let short = [Zeroizing::new(vec![1u8; 15]), Zeroizing::new(vec![2u8; 15])];
        assert!(c.import_components("kcv.short", KeyClass::D0, Algorithm::Aes128, &short, None).is_err());
        c.close().expect("close the ceremony");
        srv.hsm.reload().expect("reload");
    }
    let cat = srv.hsm.catalogue();
    assert_eq!(cat.get("kcv.tdes", 1).expect("kcv.tdes served").meta.kcv, TDES_KCV);
    let aes = cat.get("kcv.aes", 1).expect("kcv.aes served");
    assert_eq!(aes.meta.kcv, AES_KCV);
    assert!(cat.get("kcv.wrong", 1).is_err() && cat.get("kcv.short", 1).is_err());
    // Imported keys are as locked down as generated ones.
    let flags = srv.hsm.key_flags(aes).expect("flags");
    assert!(flags.sensitive && !flags.extractable && flags.private);
    assert!(srv.hsm.try_read_value(aes).expect("read attempt").is_none(), "imported key value readable");

    // The imported AES key really is the RFC 4493 key: the appliance serves it (D0).
    let admin = srv.clients("admin").await;
    let ct = admin.data.clone().encrypt(enc("kcv.aes", b"known key", b"kcv")).await.expect("encrypt under kcv.aes").into_inner();
    let pt = admin.data.clone().decrypt(dec("kcv.aes", &ct.ciphertext, b"kcv")).await.expect("decrypt").into_inner();
    assert_eq!(pt.plaintext, b"known key");
    let info = admin.keys.clone().get_key(GetKeyRequest { name: "kcv.tdes".into(), version: 0 }).await.expect("GetKey").into_inner();
    assert_eq!(info.kcv, TDES_KCV);
    srv.stop().await;
}

/// A retail-MAC key (class M3) is stored as two single-DES halves; the CLI prints, and
/// --expect-kcv checks, the KCV of the whole double-length key (what the sending bank
/// quotes), never the left half's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_import_components_of_a_retail_mac_key_prints_the_double_length_kcv() {
    let fx = fixture();
    let cfg = fx.prepared.config.to_string_lossy().into_owned();
    let [c1, c2] = components_of(TDES_KEY);
    let dir = fresh_dir("m3-components");
    let (f1, f2) = (dir.join("c1.hex"), dir.join("c2.hex"));
    std::fs::write(&f1, hex::encode_upper(&*c1)).expect("write component 1");
    std::fs::write(&f2, hex::encode_upper(&*c2)).expect("write component 2");
    let out = {
        let _g = token_write();
        let mut cmd = keyward_cli();
        cmd.args(["ceremony", "--config", &cfg, "import-components", "mac.kcv-m3", "--class", "M3", "--algorithm", "TDES-2KEY"])
            .args(["--components", "2", "--component-files"])
            .args([&f1, &f2])
            .args(["--expect-kcv", TDES_KCV]);
        run_cli(cmd, b"")
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "import failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("combined KCV {TDES_KCV}")), "stdout:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_import_components_prints_the_published_kcv() {
    let fx = fixture();
    let cfg = fx.prepared.config.to_string_lossy().into_owned();
    let [c1, c2] = components_of(AES_KEY);
    let stdin = format!("{}\n{}\n", hex::encode_upper(&*c1), hex::encode_upper(&*c2));
    let (ok, bad) = {
        let _g = token_write();
        let mut cmd = keyward_cli();
        cmd.args(["ceremony", "--config", &cfg, "import-components", "kcv.cli", "--class", "D0", "--algorithm", "AES-128"])
            .args(["--components", "2", "--stdin", "--expect-kcv", AES_KCV]);
        let ok = run_cli(cmd, stdin.as_bytes());
        let mut cmd = keyward_cli();
        cmd.args(["ceremony", "--config", &cfg, "import-components", "kcv.cli-bad", "--class", "D0", "--algorithm", "AES-128"])
            .args(["--components", "2", "--stdin", "--expect-kcv", "000000"]);
        let bad = run_cli(cmd, stdin.as_bytes());
        (ok, bad)
    };
    let out = String::from_utf8_lossy(&ok.stdout);
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "import-components failed ({}):\n{out}\n{err}", ok.status);
    assert!(out.contains("combined KCV 7AD386"), "stdout does not show the combined KCV:\n{out}");
    assert!(out.contains("kcv.cli/v1"), "stdout does not name the key:\n{out}");
    // Component KCVs are printed for the custodians; no component or key value is.
    assert!(out.contains("component 1 KCV") && out.contains("component 2 KCV"), "{out}");
    for secret in [hex::encode_upper(&*c1), hex::encode_upper(&*c2), AES_KEY.to_string()] {
        for text in [&out, &err] {
            assert!(!text.to_uppercase().contains(&secret), "the CLI printed key material");
        }
    }
    assert!(!bad.status.success(), "a wrong --expect-kcv must fail");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not match"), "{}", String::from_utf8_lossy(&bad.stderr));

    let srv = start("kcv-cli").await;
    let cat = srv.hsm.catalogue();
    let e = cat.get("kcv.cli", 1).expect("kcv.cli in the token");
    assert_eq!(e.meta.kcv, AES_KCV);
    assert_eq!((e.meta.class, e.meta.algorithm), (KeyClass::D0, Algorithm::Aes128));
    assert!(cat.get("kcv.cli-bad", 1).is_err(), "a refused import left a key");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_service_refuses_keys_of_other_classes() {
    let srv = start("usage").await;
    let admin = srv.clients("admin").await;
    // Every non-D0 key of the profile, whatever its algorithm.
    for key in ["zpk.switch", "zpk.bank-a", "otp", "otp.seal", "audit", "audit.sign", "kek.bank-a", "bdk.pos", "binding", "mac.switch", "voucher.issuer"] {
        let s = err_of(admin.data.clone().encrypt(enc(key, b"data", b"aad")).await, &format!("Encrypt with {key}"));
        assert!(
            matches!(s.code(), Code::FailedPrecondition | Code::PermissionDenied),
            "Encrypt with {key}: {:?} {:?}",
            s.code(),
            s.message()
        );
        let s = err_of(admin.data.clone().decrypt(dec(key, &forged_ciphertext(1), b"aad")).await, &format!("Decrypt with {key}"));
        assert!(
            matches!(s.code(), Code::FailedPrecondition | Code::PermissionDenied),
            "Decrypt with {key}: {:?} {:?}",
            s.code(),
            s.message()
        );
    }
    // A D0 key still works on the same connection.
    admin.data.clone().encrypt(enc("data", b"data", b"aad")).await.expect("D0 encrypt");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_ciphertexts_until_retired() {
    let name = "data.rot";
    let srv = start("rotate").await;
    {
        let _g = token_write();
        let c = ceremony();
        let m = c.generate(name, KeyClass::D0, Algorithm::Aes256).expect("generate data.rot");
        assert_eq!(m.version, 1);
        c.close().expect("close");
    }
    let admin = srv.clients("admin").await;
    let loaded = {
        // The reload copies the new key into a session object: a token write.
        let _g = token_write();
        admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("ReloadKeys").into_inner()
    };
    assert!(loaded.keys_loaded as usize > fixture().profile.len(), "{loaded:?}");

    let aad = b"rotation-test";
    let e1 = admin.data.clone().encrypt(enc(name, b"under v1", aad)).await.expect("encrypt v1").into_inner();
    assert_eq!(e1.key.as_ref().map(|k| (k.name.as_str(), k.version)), Some((name, 1)));
    assert_eq!(u32::from_be_bytes(e1.ciphertext[1..5].try_into().unwrap()), 1, "version inside the ciphertext");

    {
        let _g = token_write();
        let c = ceremony();
        let m = c.rotate(name).expect("rotate");
        assert_eq!(m.version, 2);
        assert_eq!(m.state, KeyState::Active);
        c.close().expect("close");
        srv.hsm.reload().expect("reload");
    }
    let d1 = admin.data.clone().decrypt(dec(name, &e1.ciphertext, aad)).await.expect("v1 ciphertext after rotation").into_inner();
    assert_eq!(d1.plaintext, b"under v1");
    assert_eq!(d1.key.as_ref().map(|k| k.version), Some(1), "decrypt names the version used");
    let e2 = admin.data.clone().encrypt(enc(name, b"under v2", aad)).await.expect("encrypt v2").into_inner();
    assert_eq!(e2.key.as_ref().map(|k| k.version), Some(2), "new encryptions use the new version");
    let v1 = admin.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 1 }).await.expect("GetKey v1").into_inner();
    assert_eq!(v1.state, WireState::VerifyOnly as i32);
    let active = admin.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 0 }).await.expect("GetKey active").into_inner();
    assert_eq!((active.version, active.state), (2, WireState::Active as i32));

    {
        let _g = token_write();
        let c = ceremony();
        let refused = c.retire(name, 2).expect_err("retiring the active version is refused");
        assert!(refused.to_string().contains("rotate"), "{refused}");
        let m = c.retire(name, 1).expect("retire v1");
        assert_eq!((m.version, m.state), (1, KeyState::Retired));
        c.close().expect("close");
    }
    {
        let _g = token_write();
        admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("ReloadKeys");
    }
    let s = err_of(admin.data.clone().decrypt(dec(name, &e1.ciphertext, aad)).await, "v1 ciphertext after retirement");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let d2 = admin.data.clone().decrypt(dec(name, &e2.ciphertext, aad)).await.expect("v2 still decrypts").into_inner();
    assert_eq!((d2.plaintext.as_slice(), d2.key.map(|k| k.version)), (&b"under v2"[..], Some(2)));
    let e3 = admin.data.clone().encrypt(enc(name, b"again", aad)).await.expect("encrypt").into_inner();
    assert_eq!(e3.key.map(|k| k.version), Some(2));
    let v1 = admin.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 1 }).await.expect("GetKey v1").into_inner();
    assert_eq!(v1.state, WireState::Retired as i32);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_service_never_returns_secret_material() {
    let srv = start("no-secrets").await;
    {
        let _g = token_write();
        let c = ceremony();
        c.import_components("probe.known", KeyClass::D0, Algorithm::Aes128, &components_of(AES_KEY), Some(AES_KCV))
            .expect("import a known key");
        c.close().expect("close");
        srv.hsm.reload().expect("reload");
    }
    let key = hex::decode(AES_KEY).unwrap();
    let needles: Vec<Vec<u8>> = vec![
        key.clone(),
        AES_KEY.as_bytes().to_vec(),
        AES_KEY.to_lowercase().into_bytes(),
        component1(16),
        xor(&key, &component1(16)),
    ];
    let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
    let admin = srv.clients("admin").await;
    let list = admin.keys.clone().list_keys(ListKeysRequest::default()).await.expect("ListKeys").into_inner();
    assert!(list.keys.iter().any(|k| k.name == "probe.known"), "ListKeys misses the imported key");
    for k in &list.keys {
        let fields: [&[u8]; 6] = [k.name.as_bytes(), k.class.as_bytes(), k.algorithm.as_bytes(), k.kcv.as_bytes(), k.created.as_bytes(), &k.public_key_der];
        for f in fields {
            for n in &needles {
                assert!(!contains(f, n), "{}: a KeyInfo field carries key material", k.name);
            }
        }
        assert_eq!(k.kcv.len(), 6, "{}: KCV", k.name);
        if k.algorithm == "EC-P256" {
            assert!(openssl::pkey::PKey::public_key_from_der(&k.public_key_der).is_ok(), "{}: public key", k.name);
            assert!(openssl::pkey::PKey::private_key_from_der(&k.public_key_der).is_err(), "{}: a private key", k.name);
        } else {
            assert!(k.public_key_der.is_empty(), "{}: symmetric key with key bytes", k.name);
        }
    }
    let probe = admin.keys.clone().get_key(GetKeyRequest { name: "probe.known".into(), version: 0 }).await.expect("GetKey").into_inner();
    assert_eq!(probe.kcv, AES_KCV);
    assert!(probe.public_key_der.is_empty());
    for n in &needles {
        assert!(!contains(format!("{probe:?}").as_bytes(), n));
    }

    // The EC public key: DER SPKI of a P-256 key, the one the token holds, KCV = SHA-256(SPKI).
    let info = admin.keys.clone().get_key(GetKeyRequest { name: "voucher.issuer".into(), version: 0 }).await.expect("GetKey EC").into_inner();
    let pkey = openssl::pkey::PKey::public_key_from_der(&info.public_key_der).expect("DER SPKI");
    let ec = pkey.ec_key().expect("an EC key");
    assert_eq!(ec.group().curve_name(), Some(openssl::nid::Nid::X9_62_PRIME256V1), "not P-256");
    ec.check_key().expect("a valid point");
    assert_eq!(pkey.public_key_to_der().unwrap(), info.public_key_der, "not canonical DER SPKI");
    assert_eq!(info.kcv, hex::encode_upper(&openssl::sha::sha256(&info.public_key_der)[..3]));
    let cat = srv.hsm.catalogue();
    assert_eq!(cat.get("voucher.issuer", 1).unwrap().public_der.as_deref(), Some(info.public_key_der.as_slice()));

    // Roles filter the list: the hub sees only the keys it may use (data, zpk.*, bdk.*,
    // pvk.*, mac.*, otp, otp.seal, otp.kek, zek.*, binding, binding.index).
    let hub = srv.clients("hub").await;
    let hub_list = hub.keys.clone().list_keys(ListKeysRequest::default()).await.expect("hub ListKeys").into_inner();
    let names: Vec<&str> = hub_list.keys.iter().map(|k| k.name.as_str()).collect();
    assert!(names.contains(&"data") && names.contains(&"zpk.bank-a") && names.contains(&"mac.bank-a.left"), "{names:?}");
    for n in &names {
        assert!(
            ["data", "otp", "otp.seal", "otp.kek", "binding", "binding.index"].contains(n) || ["zpk.", "bdk.", "pvk.", "mac.", "zek."].iter().any(|p| n.starts_with(p)),
            "hub sees {n}, outside its role"
        );
    }
    assert!(!names.iter().any(|n| n.starts_with("audit") || n.starts_with("voucher") || n.starts_with("tmk.")), "{names:?}");
    srv.stop().await;
}

/// Two appliances on one token (scale-out): the first Encrypt of a key on each must not
/// make the other's first Encrypt lose its sessions. Each instance loads the key's AES-GCM
/// reservation object; the first to encrypt replaces (destroys) it, and the second then
/// destroys a handle that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_appliances_on_one_token_encrypt_without_session_recovery() {
    let name = "data.pair";
    let first = start("pair-0").await;
    {
        let _g = token_write();
        first.hsm.create_key(name, KeyClass::D0, Algorithm::Aes256, None, KeyState::Active).expect("create data.pair");
        first.hsm.reload().expect("reload");
    }
    // One encryption makes the token hold a reservation object for data.pair/v1.
    first.stop().await;

    let a = start("pair-a").await;
    let b = start("pair-b").await;
    let (ga, gb) = (a.hsm.generation(), b.hsm.generation());
    let ca = a.clients("admin").await;
    let cb = b.clients("admin").await;
    // The first encryptions write reservation objects: serialised with other token writes.
    let (ra, rb) = {
        let _g = token_write();
        let ra = ca.data.clone().encrypt(enc(name, b"from a", b"aad")).await;
        let rb = cb.data.clone().encrypt(enc(name, b"from b", b"aad")).await;
        (ra, rb)
    };
    let ra = ra.expect("encrypt on appliance A");
    let rb = rb.expect("encrypt on appliance B");
    // Each decrypts the other's ciphertext: same key.
    cb.data.clone().decrypt(dec(name, &ra.get_ref().ciphertext, b"aad")).await.expect("B decrypts A's");
    ca.data.clone().decrypt(dec(name, &rb.get_ref().ciphertext, b"aad")).await.expect("A decrypts B's");
    assert_eq!(a.hsm.generation(), ga, "appliance A went through a session recovery on a healthy token");
    assert_eq!(b.hsm.generation(), gb, "appliance B went through a session recovery on a healthy token");
    a.stop().await;
    b.stop().await;
}

/// The AES-GCM invocation count (NIST SP 800-38D limit) is reserved in the token, so a
/// restarted appliance continues at or above every count the previous one may have used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcm_invocation_count_survives_restart() {
    let name = "data.gcm";
    let a = start("gcm-a").await;
    {
        let _g = token_write();
        a.hsm.create_key(name, KeyClass::D0, Algorithm::Aes256, None, KeyState::Active).expect("create data.gcm");
    }
    let admin = a.clients("admin").await;
    for i in 0..5u8 {
        admin.data.clone().encrypt(enc(name, &[i], b"gcm")).await.expect("encrypt");
    }
    let used_a = a.hsm.catalogue().get(name, 1).expect("data.gcm").gcm_used();
    assert!(used_a >= 5, "GCM invocations not counted: {used_a}");
    a.stop().await;
    let b = start("gcm-b").await;
    let start_b = b.hsm.catalogue().get(name, 1).expect("data.gcm").gcm_used();
    assert!(start_b >= used_a, "a restart reuses GCM invocation counts: {start_b} < {used_a}");
    {
        // The first encryption on B writes a new reservation: a token write.
        let _g = token_write();
        let admin = b.clients("admin").await;
        admin.data.clone().encrypt(enc(name, b"after", b"gcm")).await.expect("encrypt after restart");
    }
    assert!(b.hsm.catalogue().get(name, 1).unwrap().gcm_used() > start_b);
    b.stop().await;
}


/// Compound keys are made, rotated and retired as one: all parts share each version, and
/// the part names are never accepted as names of keys of their own.
#[test]
fn compound_keys_move_together_and_part_names_are_refused() {
    let _g = token_write();
    let c = ceremony();
    let m = c.generate("mac.pair-test", KeyClass::M3, Algorithm::Tdes2).expect("generate a retail-MAC pair");
    assert_eq!((m.name.as_str(), m.version), ("mac.pair-test.left", 1));
    let b = c.generate("bdk.pair-test", KeyClass::B0, Algorithm::Tdes2).expect("generate a TDES BDK");
    assert_eq!((b.name.as_str(), b.version), ("bdk.pair-test", 1));
    for bad in ["mac.x.left", "mac.x.right", "bdk.x.variant"] {
        let e = c.generate(bad, KeyClass::M3, Algorithm::Tdes2).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("parts of compound keys"), "{bad}: {e}");
    }
    let r = c.rotate("mac.pair-test").expect("rotate the pair by its name");
    assert_eq!(r.version, 2);
    assert!(c.rotate("mac.pair-test.left").is_err(), "a half alone cannot be rotated");
    c.rotate("bdk.pair-test").expect("rotate the BDK with its variant");
    c.retire("mac.pair-test", 1).expect("retire v1 of both halves");
    let list = c.list();
    let state = |n: &str, v: u32| list.iter().find(|k| k.name == n && k.version == v).map(|k| k.state);
    assert_eq!(state("mac.pair-test.left", 1), Some(KeyState::Retired));
    assert_eq!(state("mac.pair-test.right", 1), Some(KeyState::Retired));
    assert_eq!(state("mac.pair-test.right", 2), Some(KeyState::Active));
    assert_eq!(state("bdk.pair-test.variant", 1), Some(KeyState::VerifyOnly));
    assert_eq!(state("bdk.pair-test.variant", 2), Some(KeyState::Active));
    assert_eq!(state("bdk.pair-test", 2), Some(KeyState::Active));
    c.close().expect("close");
}
