//! MacService against a real SoftHSM token over mTLS: retail MAC (ISO 9797-1 alg 3) and
//! AES-CMAC (RFC 4493) published vectors through imported known keys, TDES CBC-MAC
//! (alg 1, padding methods 1 and 2) and HMAC-SHA256 against software references,
//! truncation, limits and refusals (data size, MAC lengths, padding, key classes,
//! audit keys, retail-MAC halves), and verification with older key versions.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::OnceLock;

use common::*;
use keyward::client::Clients;
use keyward::crypto::mac::{self as soft, Padding};
use keyward::hsm::{Algorithm, KeyClass, KeyMeta, KeyState};
use keyward::proto::{GenerateMacRequest, GenerateMacResponse, GetKeyRequest, MacPadding, VerifyMacRequest};
use openssl::symm::{Cipher, Crypter, Mode};
use tonic::Code;

const RETAIL_KEY: &str = "0123456789ABCDEFFEDCBA9876543210";
const RETAIL_DATA: &[u8] = b"Now is the time for all ";
const RETAIL_MAC: &str = "A1C72E74EA3FA9B6";
const CMAC_KEY: &str = "2B7E151628AED2A6ABF7158809CF4F3C";
const CMAC_KCV: &str = "7AD386";
/// RFC 4493 section 4 message (64 bytes; examples use its first 0, 16, 40, 64 bytes).
const RFC4493_M: &str = "6BC1BEE22E409F96E93D7E117393172AAE2D8A571E03AC9C9EB76FAC45AF8E5130C81C46A35CE411E5FBC1191A0A52EFF69F2445DF4F9B17AD2B417BE66C3710";
const CBC_KEY: &str = "89ABCDEF0123456776543210FEDCBA98";
const HMAC_KEY: &str = "4A6F686E2053746F6E65202D2074657374206B657920666F7220484D41432121";
/// Lengths the software comparisons run over (64 KiB is the service's limit).
const LENGTHS: [usize; 10] = [0, 1, 7, 8, 9, 15, 16, 17, 1000, 64 * 1024];

static VECTOR_KEYS: OnceLock<Vec<KeyMeta>> = OnceLock::new();

/// Imports the known keys once per test binary, before any server of this binary
/// starts. Never call with TOKEN_WRITE held.
fn vector_keys() -> &'static [KeyMeta] {
    VECTOR_KEYS.get_or_init(|| {
        let keys: [(&str, KeyClass, Algorithm, &str); 6] = [
            ("mac.vec-retail", KeyClass::M3, Algorithm::Tdes2, RETAIL_KEY),
            ("mac.vec-cmac", KeyClass::M6, Algorithm::Aes128, CMAC_KEY),
            ("mac.vec-cbc", KeyClass::M1, Algorithm::Tdes2, CBC_KEY),
            ("mac.vec-hmac", KeyClass::M7, Algorithm::HmacSha256, HMAC_KEY),
            // Rotated and retired by one test only.
            ("mac.vec-rot", KeyClass::M6, Algorithm::Aes128, CMAC_KEY),
            ("mac.vec-rot-retail", KeyClass::M3, Algorithm::Tdes2, RETAIL_KEY),
        ];
        import_known_keys(&keys)
    })
}

fn gen(key: &str, data: &[u8], padding: MacPadding, mac_length: u32) -> GenerateMacRequest {
    GenerateMacRequest { key_name: key.into(), data: data.to_vec(), padding: padding as i32, mac_length }
}

fn ver(key: &str, version: u32, data: &[u8], padding: MacPadding, mac: &[u8]) -> VerifyMacRequest {
    VerifyMacRequest { key_name: key.into(), version, data: data.to_vec(), padding: padding as i32, mac: mac.to_vec() }
}

async fn mac_ok(c: &Clients, r: GenerateMacRequest) -> GenerateMacResponse {
    let what = format!("GenerateMac {} ({} bytes)", r.key_name, r.data.len());
    c.mac.clone().generate_mac(r).await.unwrap_or_else(|s| panic!("{what}: {:?} {}", s.code(), s.message())).into_inner()
}

async fn valid(c: &Clients, r: VerifyMacRequest) -> bool {
    let what = format!("VerifyMac {} ({} bytes)", r.key_name, r.data.len());
    c.mac.clone().verify_mac(r).await.unwrap_or_else(|s| panic!("{what}: {:?} {}", s.code(), s.message())).into_inner().valid
}

fn key_of(r: &Option<keyward::proto::KeyRef>) -> (String, u32) {
    r.as_ref().map(|k| (k.name.clone(), k.version)).unwrap_or_default()
}

fn flip(v: &[u8], bit: usize) -> Vec<u8> {
    let mut v = v.to_vec();
    v[bit / 8] ^= 0x80 >> (bit % 8);
    v
}

/// Test data of `n` bytes (not all equal, so a wrong block order changes the MAC).
fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + 7) as u8).collect()
}

/// ISO 9797-1 alg 1 written against OpenSSL directly: TDES-CBC (K1 K2 K1), zero IV,
/// the last ciphertext block.
fn openssl_cbc_mac(key16: &[u8], padding: Padding, data: &[u8]) -> Vec<u8> {
    let mut padded = data.to_vec();
    match padding {
        Padding::Method1 => {
            if padded.is_empty() {
                padded.resize(8, 0);
            }
        }
        Padding::Method2 => padded.push(0x80),
    }
    while !padded.len().is_multiple_of(8) {
        padded.push(0);
    }
    let mut k = key16.to_vec();
    k.extend_from_slice(&key16[..8]);
    let mut c = Crypter::new(Cipher::des_ede3_cbc(), Mode::Encrypt, &k, Some(&[0u8; 8])).unwrap();
    c.pad(false);
    let mut out = vec![0u8; padded.len() + 8];
    let n = c.update(&padded, &mut out).unwrap();
    out.truncate(n);
    out[n - 8..].to_vec()
}

fn openssl_hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = openssl::pkey::PKey::hmac(key).unwrap();
    let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
    s.update(data).unwrap();
    s.sign_to_vec().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retail_mac_vector() {
    vector_keys();
    let srv = start("mac-retail").await;
    // Stored as two single-DES halves.
    let cat = srv.hsm.catalogue();
    for half in ["mac.vec-retail.left", "mac.vec-retail.right"] {
        let e = cat.get(half, 1).unwrap_or_else(|_| panic!("{half} is in the token"));
        assert_eq!((e.meta.class, e.meta.algorithm), (KeyClass::M3, Algorithm::Des), "{half}");
    }
    assert!(cat.get("mac.vec-retail", 1).is_err(), "no double-length key object under the logical name");
    drop(cat);

    let hub = srv.clients("hub").await;
    let r = mac_ok(&hub, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Method1, 0)).await;
    assert_eq!(hex::encode_upper(&r.mac), RETAIL_MAC, "ISO 9797-1 alg 3 / X9.19 vector");
    assert_eq!(key_of(&r.key), ("mac.vec-retail".into(), 1));
    // Padding method 1 is the default for the DES algorithms.
    assert_eq!(mac_ok(&hub, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Unspecified, 0)).await.mac, r.mac);
    let k: [u8; 16] = h(RETAIL_KEY).try_into().unwrap();
    let (k1, k2): ([u8; 8], [u8; 8]) = (k[..8].try_into().unwrap(), k[8..].try_into().unwrap());
    assert_eq!(soft::retail_mac(&k1, &k2, Padding::Method1, RETAIL_DATA).unwrap().to_vec(), r.mac, "software reference");

    assert!(valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method1, &r.mac)).await, "VerifyMac of the vector");
    assert!(valid(&hub, ver("mac.vec-retail", 1, RETAIL_DATA, MacPadding::Method1, &h(RETAIL_MAC))).await, "VerifyMac by version");
    for bit in [0, 77, RETAIL_DATA.len() * 8 - 1] {
        assert!(!valid(&hub, ver("mac.vec-retail", 0, &flip(RETAIL_DATA, bit), MacPadding::Method1, &r.mac)).await, "data bit {bit} flipped");
    }
    assert!(!valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method1, &flip(&r.mac, 63))).await, "MAC bit flipped");
    // Truncated to 4 bytes: generated as the prefix, and the prefix verifies.
    let short = mac_ok(&hub, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Method1, 4)).await;
    assert_eq!(short.mac, r.mac[..4]);
    assert!(valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method1, &r.mac[..4])).await, "4-byte MAC");
    assert!(valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method1, &r.mac[..6])).await, "6-byte MAC");
    assert!(!valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method1, &r.mac[4..])).await, "the wrong 4 bytes");
    assert!(!valid(&hub, ver("mac.vec-retail", 0, &flip(RETAIL_DATA, 5), MacPadding::Method1, &r.mac[..4])).await, "4-byte MAC, flipped data");
    // Padding method 2 is another MAC (the data is a whole number of blocks).
    let m2 = mac_ok(&hub, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Method2, 0)).await;
    assert_ne!(m2.mac, r.mac);
    assert_eq!(m2.mac, soft::retail_mac(&k1, &k2, Padding::Method2, RETAIL_DATA).unwrap().to_vec());
    assert!(!valid(&hub, ver("mac.vec-retail", 0, RETAIL_DATA, MacPadding::Method2, &r.mac)).await, "method 1 MAC checked as method 2");
    // The switch role may use mac.* keys too.
    let switch = srv.clients("switch").await;
    assert_eq!(mac_ok(&switch, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Method1, 0)).await.mac, r.mac);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_cmac_rfc4493() {
    let metas = vector_keys();
    let m = metas.iter().find(|m| m.name == "mac.vec-cmac").unwrap();
    assert_eq!(m.kcv, CMAC_KCV, "import KCV of the RFC 4493 key");
    let srv = start("mac-cmac").await;
    let hub = srv.clients("hub").await;
    let info = hub.keys.clone().get_key(GetKeyRequest { name: "mac.vec-cmac".into(), version: 0 }).await.expect("GetKey").into_inner();
    assert_eq!((info.kcv.as_str(), info.class.as_str(), info.algorithm.as_str()), (CMAC_KCV, "M6", "AES-128"));

    let msg = h(RFC4493_M);
    for (len, expected) in [
        (0usize, "BB1D6929E95937287FA37D129B756746"),
        (16, "070A16B46B4D4144F79BDD9DD04A287C"),
        (40, "DFA66747DE9AE63030CA32611497C827"),
        (64, "51F0BEBF7E3B9D92FC49741779363CFE"),
    ] {
        let r = mac_ok(&hub, gen("mac.vec-cmac", &msg[..len], MacPadding::Unspecified, 0)).await;
        assert_eq!(hex::encode_upper(&r.mac), expected, "RFC 4493, Mlen = {len}");
        assert_eq!(key_of(&r.key), ("mac.vec-cmac".into(), 1));
        assert!(valid(&hub, ver("mac.vec-cmac", 0, &msg[..len], MacPadding::Unspecified, &r.mac)).await, "Mlen = {len}");
        assert!(!valid(&hub, ver("mac.vec-cmac", 0, &msg[..len], MacPadding::Unspecified, &flip(&r.mac, 100))).await, "Mlen = {len}, MAC bit flipped");
        if len > 0 {
            assert!(!valid(&hub, ver("mac.vec-cmac", 0, &flip(&msg[..len], 3), MacPadding::Unspecified, &r.mac)).await, "Mlen = {len}, data bit flipped");
        }
        // Truncation to 8 bytes (the NIST minimum).
        let t = mac_ok(&hub, gen("mac.vec-cmac", &msg[..len], MacPadding::Unspecified, 8)).await;
        assert_eq!(t.mac, r.mac[..8]);
        assert!(valid(&hub, ver("mac.vec-cmac", 0, &msg[..len], MacPadding::Unspecified, &r.mac[..8])).await);
    }
    // Longer data against the software reference.
    for n in LENGTHS {
        let d = data(n);
        let r = mac_ok(&hub, gen("mac.vec-cmac", &d, MacPadding::Unspecified, 0)).await;
        assert_eq!(r.mac, soft::aes_cmac(&h(CMAC_KEY), &d).unwrap().to_vec(), "CMAC of {n} bytes");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbc_mac_and_hmac_match_software_references() {
    vector_keys();
    let srv = start("mac-soft").await;
    let hub = srv.clients("hub").await;
    let cbc_key = h(CBC_KEY);
    let hmac_key = h(HMAC_KEY);
    for n in LENGTHS {
        let d = data(n);
        // ISO 9797-1 algorithm 1, padding methods 1 and 2.
        for (padding, wire) in [(Padding::Method1, MacPadding::Method1), (Padding::Method2, MacPadding::Method2)] {
            let r = mac_ok(&hub, gen("mac.vec-cbc", &d, wire, 0)).await;
            let reference = openssl_cbc_mac(&cbc_key, padding, &d);
            assert_eq!(r.mac, reference, "CBC-MAC {padding:?}, {n} bytes (OpenSSL)");
            assert_eq!(r.mac, soft::cbc_mac_tdes(&cbc_key, padding, &d).unwrap().to_vec(), "CBC-MAC {padding:?}, {n} bytes (crypto::mac)");
            assert_eq!(key_of(&r.key), ("mac.vec-cbc".into(), 1));
            assert!(valid(&hub, ver("mac.vec-cbc", 0, &d, wire, &r.mac)).await, "CBC-MAC {padding:?}, {n} bytes");
            assert!(valid(&hub, ver("mac.vec-cbc", 0, &d, wire, &r.mac[..4])).await, "4-byte CBC-MAC");
            if n > 0 {
                assert!(!valid(&hub, ver("mac.vec-cbc", 0, &flip(&d, n * 8 - 1), wire, &r.mac)).await, "CBC-MAC {padding:?}, {n} bytes, last bit flipped");
            }
        }
        // Method 1 and method 2 differ for every length (method 2 always adds 0x80).
        let m1 = mac_ok(&hub, gen("mac.vec-cbc", &d, MacPadding::Method1, 0)).await.mac;
        let m2 = mac_ok(&hub, gen("mac.vec-cbc", &d, MacPadding::Method2, 0)).await.mac;
        assert_ne!(m1, m2, "{n} bytes: padding methods give the same MAC");

        // HMAC-SHA256, full length and truncated to 16 bytes.
        let r = mac_ok(&hub, gen("mac.vec-hmac", &d, MacPadding::Unspecified, 0)).await;
        assert_eq!(r.mac, openssl_hmac_sha256(&hmac_key, &d), "HMAC-SHA256 of {n} bytes");
        assert_eq!(r.mac.len(), 32);
        let t = mac_ok(&hub, gen("mac.vec-hmac", &d, MacPadding::Unspecified, 16)).await;
        assert_eq!(t.mac, r.mac[..16]);
        assert!(valid(&hub, ver("mac.vec-hmac", 0, &d, MacPadding::Unspecified, &r.mac)).await);
        assert!(valid(&hub, ver("mac.vec-hmac", 0, &d, MacPadding::Unspecified, &r.mac[..16])).await);
        assert!(!valid(&hub, ver("mac.vec-hmac", 0, &d, MacPadding::Unspecified, &flip(&r.mac, 255))).await);
        if n > 0 {
            assert!(!valid(&hub, ver("mac.vec-hmac", 0, &flip(&d, 0), MacPadding::Unspecified, &r.mac)).await, "HMAC, {n} bytes, flipped");
        }
    }
    // Padding method 1 makes trailing zeros invisible (a known property of method 1);
    // method 2 does not.
    let d = data(7);
    let mut z = d.clone();
    z.push(0);
    assert_eq!(mac_ok(&hub, gen("mac.vec-cbc", &d, MacPadding::Method1, 0)).await.mac, mac_ok(&hub, gen("mac.vec-cbc", &z, MacPadding::Method1, 0)).await.mac);
    assert_ne!(mac_ok(&hub, gen("mac.vec-cbc", &d, MacPadding::Method2, 0)).await.mac, mac_ok(&hub, gen("mac.vec-cbc", &z, MacPadding::Method2, 0)).await.mac);

    // The profile's own MAC keys (generated by ceremony init) round-trip too.
    for (key, padding) in [("mac.switch", MacPadding::Unspecified), ("mac.bank-a", MacPadding::Method1), ("mac.legacy", MacPadding::Method2), ("mac.clearing", MacPadding::Unspecified)] {
        let d = data(100);
        let r = mac_ok(&hub, gen(key, &d, padding, 0)).await;
        assert_eq!(key_of(&r.key), (key.to_string(), 1));
        assert!(valid(&hub, ver(key, 0, &d, padding, &r.mac)).await, "{key}");
        assert!(!valid(&hub, ver(key, 0, &flip(&d, 9), padding, &r.mac)).await, "{key}: flipped");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_refusals() {
    vector_keys();
    let srv = start("mac-limits").await;
    let hub = srv.clients("hub").await;
    let admin = srv.clients("admin").await;
    let switch = srv.clients("switch").await;
    let max = 64 * 1024;

    // Data size: 64 KiB accepted, one byte more refused (generate and verify).
    for key in ["mac.vec-retail", "mac.vec-cmac", "mac.vec-hmac"] {
        let pad = if key == "mac.vec-retail" { MacPadding::Method1 } else { MacPadding::Unspecified };
        let ok = mac_ok(&hub, gen(key, &vec![7u8; max], pad, 0)).await;
        assert!(valid(&hub, ver(key, 0, &vec![7u8; max], pad, &ok.mac)).await);
        expect_code(hub.mac.clone().generate_mac(gen(key, &vec![7u8; max + 1], pad, 0)).await, Code::InvalidArgument, &["data"], &format!("{key}: 64 KiB + 1"));
        expect_code(hub.mac.clone().verify_mac(ver(key, 0, &vec![7u8; max + 1], pad, &ok.mac)).await, Code::InvalidArgument, &["data"], &format!("{key}: verify 64 KiB + 1"));
    }

    // MAC lengths per algorithm: (key, padding, allowed range, a length beyond it on each side).
    for (key, pad, lo, hi) in [
        ("mac.vec-retail", MacPadding::Method1, 4u32, 8u32),
        ("mac.vec-cbc", MacPadding::Method1, 4, 8),
        ("mac.vec-cmac", MacPadding::Unspecified, 8, 16),
        ("mac.vec-hmac", MacPadding::Unspecified, 16, 32),
    ] {
        let full = mac_ok(&hub, gen(key, b"len", pad, 0)).await.mac;
        assert_eq!(full.len() as u32, hi, "{key}: full length");
        for len in [lo, hi] {
            let r = mac_ok(&hub, gen(key, b"len", pad, len)).await;
            assert_eq!(r.mac, full[..len as usize], "{key}: {len} bytes");
        }
        for bad in [1, lo - 1, hi + 1, 64] {
            expect_code(hub.mac.clone().generate_mac(gen(key, b"len", pad, bad)).await, Code::InvalidArgument, &["mac_length"], &format!("{key}: mac_length {bad}"));
        }
        let mut long = full.clone();
        long.push(0);
        for (mac, what) in [(full[..lo as usize - 1].to_vec(), "short"), (long, "long"), (Vec::new(), "empty")] {
            expect_code(hub.mac.clone().verify_mac(ver(key, 0, b"len", pad, &mac)).await, Code::InvalidArgument, &["mac"], &format!("{key}: {what} MAC"));
        }
    }

    // CMAC and HMAC take no padding method; unknown padding values are refused.
    for key in ["mac.vec-cmac", "mac.vec-hmac"] {
        for pad in [MacPadding::Method1, MacPadding::Method2] {
            expect_code(hub.mac.clone().generate_mac(gen(key, b"x", pad, 0)).await, Code::InvalidArgument, &["padding"], &format!("{key}: {pad:?}"));
            expect_code(hub.mac.clone().verify_mac(ver(key, 0, b"x", pad, &[0u8; 16])).await, Code::InvalidArgument, &["padding"], &format!("{key}: verify {pad:?}"));
        }
    }
    let mut r = gen("mac.vec-retail", b"x", MacPadding::Method1, 0);
    r.padding = 9;
    expect_code(hub.mac.clone().generate_mac(r).await, Code::InvalidArgument, &["padding"], "padding 9");

    // Keys of other classes: P0 zone keys, the D0 data key, a V0 PIN verification key.
    for key in ["zpk.switch", "zpk.bank-a", "data", "pvk.hub"] {
        expect_code(hub.mac.clone().generate_mac(gen(key, b"x", MacPadding::Unspecified, 0)).await, Code::FailedPrecondition, &[key], &format!("GenerateMac with {key}"));
        expect_code(hub.mac.clone().verify_mac(ver(key, 0, b"x", MacPadding::Unspecified, &[0u8; 16])).await, Code::FailedPrecondition, &[key], &format!("VerifyMac with {key}"));
    }
    // Other classes through admin (every key allowed): a KEK, a BDK, the OTP key.
    for key in ["kek.bank-a", "bdk.pos", "otp", "binding.index"] {
        expect_code(admin.mac.clone().generate_mac(gen(key, b"x", MacPadding::Unspecified, 0)).await, Code::FailedPrecondition, &[key], &format!("admin GenerateMac with {key}"));
    }
    // The audit keys are never reachable, even for admin.
    for key in ["audit", "audit.sign"] {
        expect_code(admin.mac.clone().generate_mac(gen(key, b"x", MacPadding::Unspecified, 0)).await, Code::PermissionDenied, &[], &format!("admin GenerateMac with {key}"));
        expect_code(admin.mac.clone().verify_mac(ver(key, 0, b"x", MacPadding::Unspecified, &[0u8; 32])).await, Code::PermissionDenied, &[], &format!("admin VerifyMac with {key}"));
    }
    // A retail-MAC half is not a key of its own.
    for key in ["mac.vec-retail.left", "mac.vec-retail.right", "mac.bank-a.left"] {
        expect_code(hub.mac.clone().generate_mac(gen(key, RETAIL_DATA, MacPadding::Method1, 0)).await, Code::InvalidArgument, &["key_name"], &format!("GenerateMac with {key}"));
        expect_code(admin.mac.clone().verify_mac(ver(key, 1, RETAIL_DATA, MacPadding::Method1, &h(RETAIL_MAC))).await, Code::InvalidArgument, &["key_name"], &format!("VerifyMac with {key}"));
    }
    // Names and versions.
    expect_code(hub.mac.clone().generate_mac(gen("", b"x", MacPadding::Unspecified, 0)).await, Code::InvalidArgument, &["key_name"], "empty key name");
    expect_code(hub.mac.clone().generate_mac(gen("MAC.x", b"x", MacPadding::Unspecified, 0)).await, Code::InvalidArgument, &["key_name"], "bad key name");
    expect_code(hub.mac.clone().generate_mac(gen("mac.nosuch", b"x", MacPadding::Unspecified, 0)).await, Code::NotFound, &["mac.nosuch"], "unknown key");
    expect_code(hub.mac.clone().verify_mac(ver("mac.vec-cmac", 9, b"x", MacPadding::Unspecified, &[0u8; 16])).await, Code::NotFound, &[], "unknown version");
    expect_code(hub.mac.clone().verify_mac(ver("mac.vec-retail", 9, b"x", MacPadding::Method1, &[0u8; 8])).await, Code::NotFound, &[], "unknown retail version");
    // Roles: switch may not use the data key (nor is it a MAC key); activation has no MacService.
    expect_code(switch.mac.clone().generate_mac(gen("data", b"x", MacPadding::Unspecified, 0)).await, Code::PermissionDenied, &[], "switch -> data");
    let activation = srv.clients("activation").await;
    expect_code(activation.mac.clone().generate_mac(gen("mac.vec-cmac", b"x", MacPadding::Unspecified, 0)).await, Code::PermissionDenied, &[], "activation -> MacService");

    // Nothing above disturbed the service; no refusal was INTERNAL.
    assert_eq!(hex::encode_upper(mac_ok(&hub, gen("mac.vec-retail", RETAIL_DATA, MacPadding::Method1, 0)).await.mac), RETAIL_MAC);
    let dir = srv.audit_dir.clone();
    srv.stop().await;
    let lines = rpc_lines(&dir);
    assert!(lines.len() > 60, "{} audit lines", lines.len());
    assert!(!lines.iter().any(|l| l["code"] == "INTERNAL"), "INTERNAL in the trail");
    // Retail MACs are audited with both halves.
    assert!(lines
        .iter()
        .any(|l| l["code"] == "OK" && l["keys"] == serde_json::json!(["mac.vec-retail.left/v1", "mac.vec-retail.right/v1"])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_versions_verify_until_retired() {
    vector_keys();
    let srv = start("mac-rotate").await;
    let hub = srv.clients("hub").await;
    let msg = b"interbank message 0001".to_vec();
    let cases = [("mac.vec-rot", MacPadding::Unspecified), ("mac.vec-rot-retail", MacPadding::Method1)];
    let mut v1 = Vec::new();
    for (key, pad) in cases {
        let r = mac_ok(&hub, gen(key, &msg, pad, 0)).await;
        assert_eq!(key_of(&r.key), (key.to_string(), 1));
        v1.push(r.mac);
    }
    // Known keys: version 1 is the published one.
    assert_eq!(v1[0], soft::aes_cmac(&h(CMAC_KEY), &msg).unwrap().to_vec());

    {
        let _g = token_write();
        let c = ceremony();
        for (key, _) in cases {
            let m = c.rotate(key).unwrap_or_else(|e| panic!("rotate {key}: {e}"));
            assert_eq!(m.version, 2, "{key}");
        }
        c.close().expect("close");
        srv.hsm.reload().expect("reload");
    }
    let cat = srv.hsm.catalogue();
    assert_eq!(cat.get("mac.vec-rot", 1).unwrap().meta.state, KeyState::VerifyOnly);
    assert_eq!(cat.get("mac.vec-rot-retail.right", 1).unwrap().meta.state, KeyState::VerifyOnly);
    drop(cat);
    for ((key, pad), old) in cases.iter().zip(&v1) {
        let r = mac_ok(&hub, gen(key, &msg, *pad, 0)).await;
        assert_eq!(key_of(&r.key), (key.to_string(), 2), "{key}: new MACs use the new version");
        assert_ne!(&r.mac, old, "{key}: a new key value");
        let vr = hub.mac.clone().verify_mac(ver(key, 1, &msg, *pad, old)).await.expect("verify v1").into_inner();
        assert!(vr.valid, "{key}: the old version still verifies when named");
        assert_eq!(key_of(&vr.key), (key.to_string(), 1));
        assert!(!valid(&hub, ver(key, 0, &msg, *pad, old)).await, "{key}: the active version is not the old one");
        assert!(valid(&hub, ver(key, 0, &msg, *pad, &r.mac)).await, "{key}: v2 MAC, active version");
        assert!(valid(&hub, ver(key, 2, &msg, *pad, &r.mac)).await, "{key}: v2 MAC, named");
        assert!(!valid(&hub, ver(key, 1, &msg, *pad, &r.mac)).await, "{key}: v2 MAC under v1");
    }

    // Retired: refused, not "invalid".
    {
        let _g = token_write();
        let c = ceremony();
        for (key, _) in cases {
            c.retire(key, 1).unwrap_or_else(|e| panic!("retire {key} v1: {e}"));
        }
        c.close().expect("close");
        srv.hsm.reload().expect("reload");
    }
    for ((key, pad), old) in cases.iter().zip(&v1) {
        expect_code(hub.mac.clone().verify_mac(ver(key, 1, &msg, *pad, old)).await, Code::FailedPrecondition, &["retired"], &format!("{key} v1 retired"));
        let r = mac_ok(&hub, gen(key, &msg, *pad, 0)).await;
        assert!(valid(&hub, ver(key, 2, &msg, *pad, &r.mac)).await, "{key}: v2 unaffected");
    }
    srv.stop().await;
}
