//! OtpService against a real SoftHSM token over mTLS: RFC 4226 (HOTP) and RFC 6238
//! (TOTP) vectors through seeds wrapped in the token, TOTP replay and window rules,
//! enrolment (otpauth:// URI and subject-bound seed blobs), transaction-bound codes
//! (single use, binding to amount/payee/currency/reference, attempts, lock, expiry,
//! tampered, foreign and pre-restart challenges), sealed delivery to an operator key,
//! the open-challenge ceiling, input validation, and no code, seed or phone number in
//! the audit trail.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keyward::appliance::otp_service::seed_blob;
use keyward::client::Clients;
use keyward::crypto::otp::OtpHash;
use keyward::hsm::{Algorithm, KeyClass, KeyMeta};
use keyward::proto::{
    CodeVerdict, EnrollHotpRequest, EnrollTotpRequest, EnrollTotpResponse, ImportOtpSeedRequest, ImportOtpSeedResponse,
    IssueCodeRequest, IssueCodeResponse, OtpHashAlgorithm,
    TransactionContext, VerifyCodeRequest, VerifyHotpRequest, VerifyHotpResponse, VerifyTotpRequest, VerifyTotpResponse,
};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use tonic::{Code, Response, Status};
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------
// Published vectors (shared/vectors.md)
// ---------------------------------------------------------------------------

const SEED_SHA1: &[u8] = b"12345678901234567890";
const SEED_SHA256: &[u8] = b"12345678901234567890123456789012";
const SEED_SHA512: &[u8] = b"1234567890123456789012345678901234567890123456789012345678901234";

/// RFC 4226 Appendix D, counters 0..9.
const HOTP: [&str; 10] = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"];

/// RFC 6238 Appendix B: unix time, SHA1, SHA256, SHA512 (8 digits, 30 s).
const TOTP: [(u64, &str, &str, &str); 6] = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
];

// ---------------------------------------------------------------------------
// Known delivery keys (imported once per binary, before any server starts)
// ---------------------------------------------------------------------------

/// The operator's code delivery key: AES-256, class OTP, under the hub's `zek.*`.
const ZEK: &str = "zek.vec-operator";
const ZEK_HEX: &str = "603DEB1015CA71BE2B73AEF0857D77811F352C073B6108D72D9810A30914DFF4";
/// Under `zek.*` but of another class (D0), another algorithm (HMAC) or size (AES-128).
const ZEK_DATA: &str = "zek.vec-data";
const ZEK_HMAC: &str = "zek.vec-hmac";
const ZEK_AES128: &str = "zek.vec-aes128";
/// A seed vendor's transport KEK: the AES-192 KEK of RFC 5649 section 6.
const TRANSPORT: &str = "otp.transport.vendor";
const TRANSPORT_HEX: &str = "5840DF6E29B02AF1AB493B705BF16EA1AE8338F4DCC176A8";
/// Named as a transport KEK but not AES (ImportOtpSeed refuses it).
const TRANSPORT_TDES: &str = "otp.transport.tdes";
const TRANSPORT_TDES_HEX: &str = "0123456789ABCDEFFEDCBA9876543210";

static VECTOR_KEYS: OnceLock<Vec<KeyMeta>> = OnceLock::new();

/// Imports the known keys once per test binary (servers load the catalogue at start,
/// so every test calls this before `start`). Never call with TOKEN_WRITE held.
fn vector_keys() -> &'static [KeyMeta] {
    VECTOR_KEYS.get_or_init(|| {
        let keys: [(&str, KeyClass, Algorithm, &str); 6] = [
            (ZEK, KeyClass::Otp, Algorithm::Aes256, ZEK_HEX),
            (ZEK_DATA, KeyClass::D0, Algorithm::Aes256, ZEK_HEX),
            (ZEK_HMAC, KeyClass::Otp, Algorithm::HmacSha256, ZEK_HEX),
            (ZEK_AES128, KeyClass::Otp, Algorithm::Aes128, &ZEK_HEX[..32]),
            (TRANSPORT, KeyClass::K0, Algorithm::Aes192, TRANSPORT_HEX),
            (TRANSPORT_TDES, KeyClass::K0, Algorithm::Tdes2, TRANSPORT_TDES_HEX),
        ];
        let out = import_known_keys(&keys);
        for (m, (name, _, alg, _)) in out.iter().zip(keys.iter()) {
            assert_eq!(m.algorithm, *alg, "{name}");
        }
        out
    })
}

// ---------------------------------------------------------------------------
// Software reference (independent of src/)
// ---------------------------------------------------------------------------

fn md(hash: OtpHash) -> MessageDigest {
    match hash {
        OtpHash::Sha1 => MessageDigest::sha1(),
        OtpHash::Sha256 => MessageDigest::sha256(),
        OtpHash::Sha512 => MessageDigest::sha512(),
    }
}

/// RFC 4226 HOTP (dynamic truncation) with any HMAC hash.
fn hotp(seed: &[u8], hash: OtpHash, counter: u64, digits: u32) -> String {
    let key = PKey::hmac(seed).unwrap();
    let mut s = Signer::new(md(hash), &key).unwrap();
    let mac = s.sign_oneshot_to_vec(&counter.to_be_bytes()).unwrap();
    let off = usize::from(mac[mac.len() - 1] & 0x0F);
    let bin = (u32::from(mac[off] & 0x7F) << 24) | (u32::from(mac[off + 1]) << 16) | (u32::from(mac[off + 2]) << 8) | u32::from(mac[off + 3]);
    format!("{:0width$}", bin % 10u32.pow(digits), width = digits as usize)
}

/// RFC 6238 TOTP, T0 = 0.
fn totp(seed: &[u8], hash: OtpHash, unix: u64, period: u64, digits: u32) -> String {
    hotp(seed, hash, unix / period, digits)
}

/// A different code of the same length (last digit changed).
fn other_code(code: &str) -> String {
    let mut b = code.as_bytes().to_vec();
    let last = b.len() - 1;
    b[last] = b'0' + (b[last] - b'0' + 1) % 10;
    String::from_utf8(b).unwrap()
}

fn flip_bit(v: &[u8], byte: usize, bit: usize) -> Vec<u8> {
    let mut x = v.to_vec();
    x[byte] ^= 1 << (bit % 8);
    x
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// AES-256-GCM open of a sealed code: 12-byte IV || ciphertext || 16-byte tag.
fn operator_open(key: &[u8], aad: &[u8], sealed: &[u8]) -> Option<String> {
    if sealed.len() < 28 {
        return None;
    }
    let (iv, rest) = sealed.split_at(12);
    let (ct, tag) = rest.split_at(rest.len() - 16);
    let clear = openssl::symm::decrypt_aead(openssl::symm::Cipher::aes_256_gcm(), key, Some(iv), aad, ct, tag).ok()?;
    String::from_utf8(clear).ok()
}

/// The `secret` parameter of an otpauth:// URI, base32-decoded.
fn uri_secret(uri: &str) -> Vec<u8> {
    let b32 = uri.split(['?', '&']).find_map(|kv| kv.strip_prefix("secret=")).expect("a secret in the URI");
    data_encoding::BASE32_NOPAD.decode(b32.as_bytes()).expect("the secret is unpadded base32")
}

fn uri_param<'a>(uri: &'a str, name: &str) -> Option<&'a str> {
    let q = uri.split_once('?')?.1;
    q.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

// ---------------------------------------------------------------------------
// Request builders and calls
// ---------------------------------------------------------------------------

const PURPOSE: &str = "payment";

fn tx(amount: i64) -> TransactionContext {
    TransactionContext { amount_minor: amount, currency: "CNY".into(), payee_id: "merchant-42".into(), reference: "INV-2024.0001".into() }
}

fn issue_req(subject: &str, ctx: TransactionContext) -> IssueCodeRequest {
    IssueCodeRequest { subject: subject.into(), purpose: PURPOSE.into(), context: Some(ctx), lifetime_seconds: 0, digits: 0, sealed_for: String::new() }
}

fn verify_req(ch: &[u8], code: &str, subject: &str, ctx: TransactionContext) -> VerifyCodeRequest {
    VerifyCodeRequest { challenge: ch.to_vec(), code: code.into(), subject: subject.into(), purpose: PURPOSE.into(), context: Some(ctx) }
}

async fn issue(c: &Clients, r: IssueCodeRequest) -> Result<Response<IssueCodeResponse>, Status> {
    c.otp.clone().issue_code(r).await
}

async fn issue_ok(c: &Clients, r: IssueCodeRequest, what: &str) -> IssueCodeResponse {
    issue(c, r).await.unwrap_or_else(|s| panic!("{what}: IssueCode {:?} {:?}", s.code(), s.message())).into_inner()
}

/// The verdict and attempts left of one VerifyCode.
async fn verdict(c: &Clients, r: VerifyCodeRequest, what: &str) -> (CodeVerdict, u32) {
    let v = c.otp.clone().verify_code(r).await.unwrap_or_else(|s| panic!("{what}: VerifyCode {:?} {:?}", s.code(), s.message())).into_inner();
    (CodeVerdict::try_from(v.verdict).unwrap_or_else(|_| panic!("{what}: verdict {}", v.verdict)), v.attempts_left)
}

fn totp_req(blob: &[u8], subject: &str, code: &str, time: u64, last_step: u64, window: u32) -> VerifyTotpRequest {
    VerifyTotpRequest { seed_blob: blob.to_vec(), subject: subject.into(), code: code.into(), last_step, time, window }
}

async fn verify_totp(c: &Clients, r: VerifyTotpRequest) -> Result<Response<VerifyTotpResponse>, Status> {
    c.otp.clone().verify_totp(r).await
}

async fn totp_ok(c: &Clients, r: VerifyTotpRequest, what: &str) -> VerifyTotpResponse {
    verify_totp(c, r).await.unwrap_or_else(|s| panic!("{what}: VerifyTotp {:?} {:?}", s.code(), s.message())).into_inner()
}

fn hotp_req(blob: &[u8], subject: &str, code: &str, counter: u64, look_ahead: u32) -> VerifyHotpRequest {
    VerifyHotpRequest { seed_blob: blob.to_vec(), subject: subject.into(), code: code.into(), counter, look_ahead }
}

async fn verify_hotp(c: &Clients, r: VerifyHotpRequest) -> Result<Response<VerifyHotpResponse>, Status> {
    c.otp.clone().verify_hotp(r).await
}

async fn hotp_ok(c: &Clients, r: VerifyHotpRequest, what: &str) -> VerifyHotpResponse {
    verify_hotp(c, r).await.unwrap_or_else(|s| panic!("{what}: VerifyHotp {:?} {:?}", s.code(), s.message())).into_inner()
}

fn enroll_req(subject: &str, alg: OtpHashAlgorithm, digits: u32, period: u32) -> EnrollTotpRequest {
    EnrollTotpRequest { subject: subject.into(), issuer: "Keyward Test".into(), account_label: "alice@example.com".into(), algorithm: alg as i32, digits, period }
}

async fn enroll(c: &Clients, r: EnrollTotpRequest) -> Result<Response<EnrollTotpResponse>, Status> {
    c.otp.clone().enroll_totp(r).await
}

/// A seed blob made in the token the way EnrollTotp makes one (wrap under otp.kek, MAC
/// bound to the subject under otp).
async fn import_seed(srv: &TestServer, subject: &str, seed: &[u8], params: (OtpHash, u8, u32)) -> Vec<u8> {
    let _g = token_write();
    let (blob, kek, keys) = seed_blob(&srv.hsm, subject, Zeroizing::new(seed.to_vec()), params).await.expect("seed_blob");
    assert_eq!(kek.name, "otp.kek");
    assert!(keys.iter().any(|k| k.starts_with("otp.kek/v")) && keys.iter().any(|k| k.starts_with("otp/v")), "{keys:?}");
    blob
}


/// AES key wrap with padding (RFC 5649) in software, as a seed vendor does it: the
/// alternative IV A65959A6 || 32-bit length, the seed zero-padded to 8 bytes, then one
/// AES block (8-byte seeds) or the RFC 3394 wrap under that IV.
fn wrap_pad(kek: &[u8], seed: &[u8]) -> Vec<u8> {
    let mut aiv = [0xA6, 0x59, 0x59, 0xA6, 0, 0, 0, 0];
    aiv[4..].copy_from_slice(&u32::try_from(seed.len()).expect("a short seed").to_be_bytes());
    let mut p = seed.to_vec();
    p.resize(seed.len().div_ceil(8) * 8, 0);
    if p.len() == 8 {
        let cipher = match kek.len() {
            16 => openssl::symm::Cipher::aes_128_ecb(),
            24 => openssl::symm::Cipher::aes_192_ecb(),
            _ => openssl::symm::Cipher::aes_256_ecb(),
        };
        let mut c = openssl::symm::Crypter::new(cipher, openssl::symm::Mode::Encrypt, kek, None).expect("AES-ECB");
        c.pad(false);
        let block = [aiv.as_slice(), &p].concat();
        let mut out = vec![0u8; 32];
        let n = c.update(&block, &mut out).expect("one block");
        out.truncate(n);
        return out;
    }
    let key = openssl::aes::AesKey::new_encrypt(kek).expect("an AES KEK");
    let mut out = vec![0u8; p.len() + 8];
    let n = openssl::aes::wrap_key(&key, Some(aiv), &mut out, &p).expect("RFC 3394 wrap");
    out.truncate(n);
    out
}

fn import_req(subject: &str, wrapped: Vec<u8>, alg: OtpHashAlgorithm, digits: u32, period: u32) -> ImportOtpSeedRequest {
    ImportOtpSeedRequest {
        subject: subject.into(),
        transport_kek: TRANSPORT.into(),
        transport_kek_version: 0,
        wrapped_seed: wrapped,
        algorithm: alg as i32,
        digits,
        period,
    }
}

async fn import_otp(c: &Clients, r: ImportOtpSeedRequest) -> Result<Response<ImportOtpSeedResponse>, Status> {
    c.otp.clone().import_otp_seed(r).await
}

/// A seed imported through the public API (ImportOtpSeed as the activation role).
async fn import_api(c: &Clients, subject: &str, seed: &[u8], alg: OtpHashAlgorithm, digits: u32) -> Vec<u8> {
    let kek = h(TRANSPORT_HEX);
    let r = import_otp(c, import_req(subject, wrap_pad(&kek, seed), alg, digits, 30)).await;
    let r = r.unwrap_or_else(|s| panic!("ImportOtpSeed {alg:?}: {:?} {}", s.code(), s.message())).into_inner();
    assert_eq!(r.kek.as_ref().map(|k| k.name.as_str()), Some("otp.kek"));
    assert_eq!(r.transport_kek.as_ref().map(|k| (k.name.as_str(), k.version)), Some((TRANSPORT, 1)));
    r.seed_blob
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The software reference reproduces every published vector, so the token-path tests
/// compare against something known to be right.
#[test]
fn software_reference_reproduces_the_rfc_vectors() {
    for (c, want) in HOTP.iter().enumerate() {
        assert_eq!(hotp(SEED_SHA1, OtpHash::Sha1, c as u64, 6), *want, "HOTP counter {c}");
    }
    for (t, s1, s256, s512) in TOTP {
        assert_eq!(totp(SEED_SHA1, OtpHash::Sha1, t, 30, 8), s1, "SHA1 at {t}");
        assert_eq!(totp(SEED_SHA256, OtpHash::Sha256, t, 30, 8), s256, "SHA256 at {t}");
        assert_eq!(totp(SEED_SHA512, OtpHash::Sha512, t, 30, 8), s512, "SHA512 at {t}");
    }
    assert_eq!(other_code("755229"), "755220");
    assert_eq!(uri_secret("otpauth://totp/a:b?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=a"), SEED_SHA1);
    assert_eq!(uri_param("otpauth://totp/a:b?secret=X&digits=8&period=30", "digits"), Some("8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotp_rfc4226_vectors_through_the_token() {
    vector_keys();
    let srv = start("otp-hotp").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-hotp-vectors";
    let blob = import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;

    for (c, code) in HOTP.iter().enumerate() {
        let c = c as u64;
        let r = hotp_ok(&hub, hotp_req(&blob, subject, code, c, 1), "vector").await;
        assert!(r.valid, "counter {c}: {code} does not verify");
        assert_eq!(r.next_counter, c + 1, "counter {c}");
        // Past its counter the code is gone (a look-ahead of 1 checks only `counter`).
        let r = hotp_ok(&hub, hotp_req(&blob, subject, code, c + 1, 1), "past").await;
        assert!(!r.valid, "counter {c}: accepted at counter {}", c + 1);
        assert_eq!(r.next_counter, c + 1, "an invalid code keeps the counter");
        // A wrong code is not valid.
        let r = hotp_ok(&hub, hotp_req(&blob, subject, &other_code(code), c, 1), "wrong").await;
        assert!(!r.valid, "counter {c}: a wrong code verifies");
        assert_eq!(r.next_counter, c);
    }

    // Look-ahead: the code of counter 7 from counter 0 with the default (10) and exact windows.
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[7], 0, 0), "default look-ahead").await;
    assert!(r.valid && r.next_counter == 8, "{r:?}");
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[7], 0, 8), "look-ahead 8").await;
    assert!(r.valid && r.next_counter == 8, "{r:?}");
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[7], 0, 7), "look-ahead 7").await;
    assert!(!r.valid && r.next_counter == 0, "counters 0..=6 do not include 7: {r:?}");
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[9], 5, 5), "from 5").await;
    assert!(r.valid && r.next_counter == 10, "{r:?}");
    // Beyond the vectors: counters far away, in software.
    let far = hotp(SEED_SHA1, OtpHash::Sha1, 1_000_099, 6);
    let r = hotp_ok(&hub, hotp_req(&blob, subject, &far, 1_000_000, 100), "look-ahead 100").await;
    assert!(r.valid && r.next_counter == 1_000_100, "{r:?}");
    // Codes of the wrong shape are simply not valid.
    for code in ["75522", "7552240", "75522a", "", " 755224"] {
        let r = hotp_ok(&hub, hotp_req(&blob, subject, code, 0, 1), "shape").await;
        assert!(!r.valid, "{code:?} verifies");
    }
    // Blob bound to its subject.
    expect_code(verify_hotp(&hub, hotp_req(&blob, "acct-someone-else", HOTP[0], 0, 1)).await, Code::InvalidArgument, &["seed_blob"], "foreign subject");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_rfc6238_vectors_through_the_token() {
    vector_keys();
    let srv = start("otp-totp").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-totp-vectors";
    let blobs = [
        (OtpHash::Sha1, import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 8, 30)).await),
        (OtpHash::Sha256, import_seed(&srv, subject, SEED_SHA256, (OtpHash::Sha256, 8, 30)).await),
        (OtpHash::Sha512, import_seed(&srv, subject, SEED_SHA512, (OtpHash::Sha512, 8, 30)).await),
    ];
    for (t, s1, s256, s512) in TOTP {
        for ((hash, blob), code) in blobs.iter().zip([s1, s256, s512]) {
            let what = format!("{hash:?} at {t}");
            let r = totp_ok(&hub, totp_req(blob, subject, code, t, 0, 0), &what).await;
            assert!(r.valid, "{what}: {code} does not verify");
            assert_eq!(r.step, t / 30, "{what}");
            let r = totp_ok(&hub, totp_req(blob, subject, &other_code(code), t, 0, 0), &what).await;
            assert!(!r.valid, "{what}: a wrong code verifies");
            assert_eq!(r.step, 0, "{what}");
        }
        // Each hash's code is bound to its own seed and hash.
        let r = totp_ok(&hub, totp_req(&blobs[0].1, subject, s256, t, 0, 0), "SHA256 code, SHA1 blob").await;
        assert!(!r.valid, "the SHA256 code at {t} verifies under the SHA1 seed");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_replay_and_window() {
    vector_keys();
    let srv = start("otp-totp-replay").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-totp-replay";
    let blob = import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 8, 30)).await;
    let t = 1_111_111_111;
    let s = t / 30;
    let code = "14050471";

    let r = totp_ok(&hub, totp_req(&blob, subject, code, t, 0, 0), "first").await;
    assert!(r.valid && r.step == s, "{r:?}");
    // Replay with last_step = the returned step: refused; older steps: refused.
    for last in [s, s + 1, s + 5] {
        let r = totp_ok(&hub, totp_req(&blob, subject, code, t, last, 0), "replay").await;
        assert!(!r.valid, "last_step {last}: the code of step {s} is accepted again");
    }
    // A last_step before it: accepted (the refusals above are the rule, not the code).
    let r = totp_ok(&hub, totp_req(&blob, subject, code, t, s - 1, 0), "newer").await;
    assert!(r.valid && r.step == s, "{r:?}");
    // The next step's code after this one: accepted, and its step is returned.
    let next = totp(SEED_SHA1, OtpHash::Sha1, t + 30, 30, 8);
    let r = totp_ok(&hub, totp_req(&blob, subject, &next, t + 30, s, 0), "next step").await;
    assert!(r.valid && r.step == s + 1, "{r:?}");
    // Within the window, a replay is still refused.
    let r = totp_ok(&hub, totp_req(&blob, subject, code, t + 30, s, 0), "replay in window").await;
    assert!(!r.valid, "the code of step {s} is accepted again one step later");

    // Default window: +-1 step accepted, +-2 not.
    for (dt, ok) in [(-60i64, false), (-30, true), (0, true), (30, true), (60, false)] {
        let at = (s as i64 * 30 + dt) as u64;
        let r = totp_ok(&hub, totp_req(&blob, subject, code, at, 0, 0), "window").await;
        assert_eq!(r.valid, ok, "default window, code of step {s} at step {}", at / 30);
        if ok {
            assert_eq!(r.step, s);
        }
    }
    // Wider windows, up to 3.
    for (w, dsteps, ok) in [(2u32, 2i64, true), (2, -2, true), (2, 3, false), (3, 3, true), (3, -3, true), (3, 4, false), (1, 2, false)] {
        let at = ((s as i64 + dsteps) * 30) as u64;
        let r = totp_ok(&hub, totp_req(&blob, subject, code, at, 0, w), "wide window").await;
        assert_eq!(r.valid, ok, "window {w}, {dsteps} steps away");
    }
    for w in [4, 100] {
        expect_code(verify_totp(&hub, totp_req(&blob, subject, code, t, 0, w)).await, Code::InvalidArgument, &["window"], "window > 3");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_totp_gives_a_working_authenticator_and_a_bound_blob() {
    vector_keys();
    let srv = start("otp-enroll").await;
    let activation = srv.clients("activation").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-enroll-1";

    let e = enroll(&activation, enroll_req(subject, OtpHashAlgorithm::Unspecified, 0, 0)).await.expect("EnrollTotp").into_inner();
    let uri = e.provisioning_uri.clone();
    assert!(uri.starts_with("otpauth://totp/Keyward%20Test:alice%40example.com?"), "{uri}");
    assert_eq!(uri_param(&uri, "issuer"), Some("Keyward%20Test"));
    assert_eq!(uri_param(&uri, "algorithm"), Some("SHA1"));
    assert_eq!(uri_param(&uri, "digits"), Some("6"));
    assert_eq!(uri_param(&uri, "period"), Some("30"));
    let seed = uri_secret(&uri);
    assert_eq!(seed.len(), 20, "a SHA1 seed is 20 bytes");
    assert!(!e.seed_blob.is_empty());
    assert_eq!(e.kek.as_ref().map(|k| k.name.as_str()), Some("otp.kek"));
    // The seed is not in the blob in clear.
    assert!(!e.seed_blob.windows(seed.len()).any(|w| w == seed.as_slice()), "the blob holds the clear seed");

    // What the app shows verifies (fixed times, so no step boundary can intervene).
    let t = 1_700_000_000;
    let code = totp(&seed, OtpHash::Sha1, t, 30, 6);
    let r = totp_ok(&hub, totp_req(&e.seed_blob, subject, &code, t, 0, 0), "enrolled").await;
    assert!(r.valid && r.step == t / 30, "{r:?}");
    let r = totp_ok(&hub, totp_req(&e.seed_blob, subject, &code, t, r.step, 0), "replay").await;
    assert!(!r.valid, "replayed code accepted");
    let r = totp_ok(&hub, totp_req(&e.seed_blob, subject, &other_code(&code), t, 0, 0), "wrong").await;
    assert!(!r.valid, "wrong code accepted");
    // Now, with the default time.
    let n = now();
    let mut ok = false;
    for at in [n, n + 1] {
        let code = totp(&seed, OtpHash::Sha1, at, 30, 6);
        ok |= totp_ok(&hub, totp_req(&e.seed_blob, subject, &code, 0, 0, 0), "now").await.valid;
    }
    assert!(ok, "the current code does not verify with time = 0 (now)");

    // Other parameters: SHA256, 8 digits, 60 s; SHA512, 7 digits.
    for (alg, hash, digits, period, len) in [(OtpHashAlgorithm::Sha256, OtpHash::Sha256, 8u32, 60u32, 32usize), (OtpHashAlgorithm::Sha512, OtpHash::Sha512, 7, 30, 64)] {
        let e2 = enroll(&activation, enroll_req(subject, alg, digits, period)).await.expect("EnrollTotp").into_inner();
        let u = &e2.provisioning_uri;
        assert_eq!(uri_param(u, "algorithm"), Some(hash_name(hash)));
        assert_eq!(uri_param(u, "digits"), Some(digits.to_string().as_str()));
        assert_eq!(uri_param(u, "period"), Some(period.to_string().as_str()));
        let seed2 = uri_secret(u);
        assert_eq!(seed2.len(), len);
        assert_ne!(seed2[..20], seed[..], "a fresh seed per enrolment");
        let code = totp(&seed2, hash, t, u64::from(period), digits);
        let r = totp_ok(&hub, totp_req(&e2.seed_blob, subject, &code, t, 0, 0), "other params").await;
        assert!(r.valid && r.step == t / u64::from(period), "{hash:?}: {r:?}");
        // The first seed's code does not verify under this blob.
        let r = totp_ok(&hub, totp_req(&e2.seed_blob, subject, &totp(&seed, hash, t, u64::from(period), digits), t, 0, 0), "other seed").await;
        assert!(!r.valid);
    }

    // The blob is bound to its subject and to every bit of itself.
    expect_code(verify_totp(&hub, totp_req(&e.seed_blob, "acct-enroll-2", &code, t, 0, 0)).await, Code::InvalidArgument, &["seed_blob"], "foreign subject");
    expect_code(
        verify_hotp(&hub, hotp_req(&e.seed_blob, "acct-enroll-2", &code, t / 30, 1)).await,
        Code::InvalidArgument,
        &["seed_blob"],
        "foreign subject (HOTP)",
    );
    for i in 0..e.seed_blob.len() {
        let bad = flip_bit(&e.seed_blob, i, i);
        expect_code(verify_totp(&hub, totp_req(&bad, subject, &code, t, 0, 0)).await, Code::InvalidArgument, &["seed_blob"], &format!("bit flipped in byte {i}"));
    }
    for bad in [Vec::new(), e.seed_blob[..e.seed_blob.len() - 1].to_vec(), [e.seed_blob.clone(), vec![0]].concat()] {
        expect_code(verify_totp(&hub, totp_req(&bad, subject, &code, t, 0, 0)).await, Code::InvalidArgument, &["seed_blob"], "malformed blob");
    }
    // Still fine untouched (the refusals are about the changes).
    assert!(totp_ok(&hub, totp_req(&e.seed_blob, subject, &code, t, 0, 0), "intact").await.valid);

    // Only the activation role (and bench) enrol; activation may not verify.
    expect_code(enroll(&hub, enroll_req(subject, OtpHashAlgorithm::Sha1, 6, 30)).await, Code::PermissionDenied, &[], "hub -> EnrollTotp");
    expect_code(verify_totp(&activation, totp_req(&e.seed_blob, subject, &code, t, 0, 0)).await, Code::PermissionDenied, &[], "activation -> VerifyTotp");
    srv.stop().await;
}

fn hash_name(h: OtpHash) -> &'static str {
    match h {
        OtpHash::Sha1 => "SHA1",
        OtpHash::Sha256 => "SHA256",
        OtpHash::Sha512 => "SHA512",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_is_single_use_and_bound_to_the_transaction() {
    vector_keys();
    let srv = start("otp-code").await;
    let bench = srv.clients("bench").await;
    let subject = "acct-code-1";

    let i = issue_ok(&bench, issue_req(subject, tx(12_345)), "issue").await;
    assert_eq!(i.code.len(), 6, "default 6 digits");
    assert!(i.code.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(i.challenge_id.len(), 16);
    assert!(i.sealed_code.is_empty() && i.delivery_key.is_none(), "clear delivery");
    assert_eq!(i.key.as_ref().map(|k| k.name.as_str()), Some("otp"));
    let n = now();
    assert!(i.expires_at >= n + 298 && i.expires_at <= n + 301, "default lifetime 300 s: expires_at {} at {n}", i.expires_at);
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(12_345)), "first").await, (CodeVerdict::Valid, 0));
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(12_345)), "again").await.0, CodeVerdict::AlreadyUsed);
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &other_code(&i.code), subject, tx(12_345)), "wrong after use").await.0, CodeVerdict::AlreadyUsed);

    // Every field of the transaction is bound: each change is INVALID and counts.
    let i = issue_ok(&bench, issue_req(subject, tx(12_345)), "issue 2").await;
    let changes: [(&str, TransactionContext); 4] = [
        ("amount + 1", tx(12_346)),
        ("payee", TransactionContext { payee_id: "merchant-43".into(), ..tx(12_345) }),
        ("currency", TransactionContext { currency: "USD".into(), ..tx(12_345) }),
        ("reference", TransactionContext { reference: "INV-2024.0002".into(), ..tx(12_345) }),
    ];
    for (left, (what, ctx)) in (1..=4u32).rev().zip(changes) {
        assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, ctx), what).await, (CodeVerdict::Invalid, left), "{what}");
    }
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(12_345)), "unchanged").await.0, CodeVerdict::Valid);

    // Bound to subject and purpose.
    let i = issue_ok(&bench, issue_req(subject, tx(500)), "issue 3").await;
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, "acct-code-2", tx(500)), "other subject").await, (CodeVerdict::Invalid, 4));
    let mut r = verify_req(&i.challenge, &i.code, subject, tx(500));
    r.purpose = "activation".into();
    assert_eq!(verdict(&bench, r, "other purpose").await, (CodeVerdict::Invalid, 3));
    // A code of the wrong shape is an attempt too.
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code[..5], subject, tx(500)), "short").await, (CodeVerdict::Invalid, 2));
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(500)), "right").await.0, CodeVerdict::Valid);

    // 7 and 8 digits; a zero amount is a valid amount.
    for digits in [7u32, 8] {
        let mut r = issue_req(subject, tx(0));
        r.digits = digits;
        r.purpose = "password-change".into();
        let i = issue_ok(&bench, r, "digits").await;
        assert_eq!(i.code.len(), digits as usize);
        let mut v = verify_req(&i.challenge, &i.code[..6], subject, tx(0));
        v.purpose = "password-change".into();
        assert_eq!(verdict(&bench, v.clone(), "prefix").await.0, CodeVerdict::Invalid, "{digits} digits: a 6-digit prefix");
        v.code = i.code.clone();
        assert_eq!(verdict(&bench, v, "full").await.0, CodeVerdict::Valid, "{digits} digits");
    }
    // Two challenges for the same transaction have independent codes and state.
    let a = issue_ok(&bench, issue_req(subject, tx(1)), "a").await;
    let b = issue_ok(&bench, issue_req(subject, tx(1)), "b").await;
    assert_ne!(a.challenge_id, b.challenge_id);
    assert_eq!(verdict(&bench, verify_req(&a.challenge, &a.code, subject, tx(1)), "a").await.0, CodeVerdict::Valid);
    assert_eq!(verdict(&bench, verify_req(&b.challenge, &b.code, subject, tx(1)), "b").await.0, CodeVerdict::Valid);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_locks_after_max_attempts_and_expires() {
    vector_keys();
    let srv = start("otp-lock").await;
    let bench = srv.clients("bench").await;
    let subject = "acct-lock";

    let i = issue_ok(&bench, issue_req(subject, tx(99)), "issue").await;
    let wrong = other_code(&i.code);
    for left in (0..=4u32).rev() {
        assert_eq!(verdict(&bench, verify_req(&i.challenge, &wrong, subject, tx(99)), "wrong").await, (CodeVerdict::Invalid, left), "attempts left");
    }
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(99)), "right after 5").await.0, CodeVerdict::Locked);
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &wrong, subject, tx(99)), "wrong after 5").await.0, CodeVerdict::Locked);
    // Four wrong then the right one: still valid (the lock is at five).
    let i = issue_ok(&bench, issue_req(subject, tx(99)), "issue 2").await;
    for _ in 0..4 {
        verdict(&bench, verify_req(&i.challenge, &other_code(&i.code), subject, tx(99)), "wrong").await;
    }
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(99)), "fifth").await.0, CodeVerdict::Valid);

    // Expiry: the only sleep of this file.
    let mut r = issue_req(subject, tx(7));
    r.lifetime_seconds = 1;
    let short = issue_ok(&bench, r, "short-lived").await;
    let n = now();
    assert!(short.expires_at <= n + 1, "lifetime 1 s: expires_at {} at {n}", short.expires_at);
    let mut r = issue_req(subject, tx(7));
    r.lifetime_seconds = 600;
    let long = issue_ok(&bench, r, "long-lived").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(verdict(&bench, verify_req(&short.challenge, &short.code, subject, tx(7)), "expired").await.0, CodeVerdict::Expired);
    assert_eq!(verdict(&bench, verify_req(&short.challenge, &other_code(&short.code), subject, tx(7)), "expired, wrong").await.0, CodeVerdict::Expired);
    assert_eq!(verdict(&bench, verify_req(&long.challenge, &long.code, subject, tx(7)), "not expired").await.0, CodeVerdict::Valid);
    let dir = srv.audit_dir.clone();
    srv.stop().await;
    // The trail shows the guesses and the lock-out (the answers, never the codes).
    let details: Vec<String> = rpc_lines(&dir)
        .iter()
        .filter(|l| l["action"].as_str().unwrap_or_default().ends_with("OtpService/VerifyCode"))
        .map(|l| l["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    for expected in ["verdict=INVALID attempts_left=4", "verdict=INVALID attempts_left=0", "verdict=LOCKED attempts_left=0", "verdict=EXPIRED attempts_left=0", "verdict=VALID attempts_left=0"] {
        assert!(details.iter().any(|d| d == expected), "no {expected:?} in {details:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_foreign_and_pre_restart_challenges_are_invalid() {
    vector_keys();
    let srv = start("otp-tamper").await;
    let bench = srv.clients("bench").await;
    let subject = "acct-tamper";

    let i = issue_ok(&bench, issue_req(subject, tx(42)), "issue").await;
    for byte in 0..i.challenge.len() {
        let bad = flip_bit(&i.challenge, byte, byte * 3);
        assert_eq!(verdict(&bench, verify_req(&bad, &i.code, subject, tx(42)), "flipped").await, (CodeVerdict::Invalid, 0), "bit flipped in byte {byte}");
    }
    let len = i.challenge.len();
    for bad in [Vec::new(), i.challenge[..len - 1].to_vec(), [i.challenge.clone(), vec![0]].concat(), vec![0u8; len]] {
        assert_eq!(verdict(&bench, verify_req(&bad, &i.code, subject, tx(42)), "malformed").await, (CodeVerdict::Invalid, 0));
    }
    // Tampered copies did not consume the real challenge's attempts.
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(42)), "intact").await, (CodeVerdict::Valid, 0));

    // Another appliance on the same token (same keys) issues challenges this one refuses.
    let other = start("otp-tamper-other").await;
    let bench2 = other.clients("bench").await;
    let o = issue_ok(&bench2, issue_req(subject, tx(42)), "issue elsewhere").await;
    assert_eq!(verdict(&bench, verify_req(&o.challenge, &o.code, subject, tx(42)), "foreign appliance").await, (CodeVerdict::Invalid, 0));
    assert_eq!(verdict(&bench2, verify_req(&o.challenge, &o.code, subject, tx(42)), "its own appliance").await.0, CodeVerdict::Valid);
    other.stop().await;

    // A restart: challenges issued before it are refused, not given fresh attempts.
    let before = issue_ok(&bench, issue_req(subject, tx(43)), "before restart").await;
    let control = issue_ok(&bench, issue_req(subject, tx(43)), "control").await;
    assert_eq!(verdict(&bench, verify_req(&control.challenge, &control.code, subject, tx(43)), "control").await.0, CodeVerdict::Valid);
    drop(bench);
    srv.stop().await;
    let srv = start("otp-tamper-restarted").await;
    let bench = srv.clients("bench").await;
    assert_eq!(verdict(&bench, verify_req(&before.challenge, &before.code, subject, tx(43)), "after restart").await, (CodeVerdict::Invalid, 0));
    assert_eq!(verdict(&bench, verify_req(&before.challenge, &before.code, subject, tx(43)), "after restart again").await, (CodeVerdict::Invalid, 0));
    let after = issue_ok(&bench, issue_req(subject, tx(43)), "after restart").await;
    assert_eq!(verdict(&bench, verify_req(&after.challenge, &after.code, subject, tx(43)), "new").await.0, CodeVerdict::Valid);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_is_configurable_and_bounded() {
    vector_keys();
    let srv = start_with("otp-attempts", |c| c.otp.max_attempts = 2).await;
    let bench = srv.clients("bench").await;
    let subject = "acct-attempts";
    let i = issue_ok(&bench, issue_req(subject, tx(5)), "issue").await;
    let wrong = other_code(&i.code);
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &wrong, subject, tx(5)), "1").await, (CodeVerdict::Invalid, 1));
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &wrong, subject, tx(5)), "2").await, (CodeVerdict::Invalid, 0));
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(5)), "3").await.0, CodeVerdict::Locked);
    srv.stop().await;

    // The config file: 1-10 accepted, 0 and 11 refused with the field named.
    let path = &fixture().prepared.config;
    let text = std::fs::read_to_string(path).expect("read the prepared config");
    assert!(text.contains("max_attempts = 5"), "the prepared config sets [otp] max_attempts = 5");
    let base = path.parent().unwrap();
    for (n, ok) in [(1, true), (10, true), (0, false), (11, false)] {
        let edited = text.replace("max_attempts = 5", &format!("max_attempts = {n}"));
        match keyward::config::Config::parse(&edited, base) {
            Ok(c) => {
                assert!(ok, "max_attempts = {n} accepted");
                assert_eq!(c.otp.max_attempts, n);
            }
            Err(e) => {
                assert!(!ok, "max_attempts = {n} refused: {e}");
                assert!(e.0.iter().any(|m| m.contains("otp.max_attempts")), "{e}");
            }
        }
    }
    let edited = text.replace("max_open_challenges = 100000", "max_open_challenges = 0");
    assert_ne!(edited, text);
    let e = keyward::config::Config::parse(&edited, base).expect_err("max_open_challenges = 0 refused");
    assert!(e.0.iter().any(|m| m.contains("otp.max_open_challenges")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_sealed_for_the_operator() {
    vector_keys();
    let srv = start("otp-delivery").await;
    let hub = srv.clients("hub").await;
    let zek = h(ZEK_HEX);
    let subject = "acct-delivery";

    for digits in [0u32, 8] {
        let mut r = issue_req(subject, tx(10_000));
        r.sealed_for = ZEK.into();
        r.digits = digits;
        let i = issue_ok(&hub, r, "sealed").await;
        let want_len = if digits == 0 { 6 } else { digits as usize };
        assert!(i.code.is_empty(), "the code is not in clear");
        assert_eq!(i.sealed_code.len(), 12 + want_len + 16, "IV || ciphertext || tag");
        assert_eq!(i.delivery_key.as_ref().map(|k| (k.name.as_str(), k.version)), Some((ZEK, 1)));
        let code = operator_open(&zek, &i.challenge_id, &i.sealed_code).expect("the operator opens the sealed code");
        assert_eq!(code.len(), want_len);
        assert!(code.bytes().all(|b| b.is_ascii_digit()));
        // The challenge id is the associated data; the tag covers every byte.
        assert!(operator_open(&zek, &[0u8; 16], &i.sealed_code).is_none(), "opens with another AAD");
        assert!(operator_open(&zek, &i.challenge_id, &flip_bit(&i.sealed_code, 20, 1)).is_none(), "opens after a bit flip");
        assert!(operator_open(&h(&"00".repeat(32)), &i.challenge_id, &i.sealed_code).is_none(), "opens under another key");
        assert_eq!(verdict(&hub, verify_req(&i.challenge, &code, subject, tx(10_000)), "sealed code").await.0, CodeVerdict::Valid);
        assert_eq!(verdict(&hub, verify_req(&i.challenge, &code, subject, tx(10_000)), "again").await.0, CodeVerdict::AlreadyUsed);
    }
    // Two issues: different IVs and codes sealed separately.
    let mut r = issue_req(subject, tx(1));
    r.sealed_for = ZEK.into();
    let a = issue_ok(&hub, r.clone(), "a").await;
    let b = issue_ok(&hub, r, "b").await;
    assert_ne!(a.sealed_code[..12], b.sealed_code[..12], "fresh IV");

    // No clear code for the hub (nor for admin: "*" never implies a permission).
    expect_code(issue(&hub, issue_req(subject, tx(1))).await, Code::PermissionDenied, &["otp.clear-code"], "hub clear");
    let admin = srv.clients("admin").await;
    expect_code(issue(&admin, issue_req(subject, tx(1))).await, Code::PermissionDenied, &["otp.clear-code"], "admin clear");
    // The bench role has the permission; it may not use the operator's key.
    let bench = srv.clients("bench").await;
    let mut r = issue_req(subject, tx(1));
    r.sealed_for = ZEK.into();
    expect_code(issue(&bench, r).await, Code::PermissionDenied, &[ZEK], "bench -> operator key");

    // Not a delivery key: the service's own keys, another class, HMAC, AES-128, unknown.
    for (name, code, needle) in [
        ("otp", Code::InvalidArgument, "sealed_for"),
        ("otp.seal", Code::InvalidArgument, "sealed_for"),
        (ZEK_DATA, Code::FailedPrecondition, ZEK_DATA),
        (ZEK_HMAC, Code::FailedPrecondition, ZEK_HMAC),
        (ZEK_AES128, Code::FailedPrecondition, ZEK_AES128),
        ("zek.vec-missing", Code::NotFound, "zek.vec-missing"),
        ("otp.kek", Code::FailedPrecondition, "otp.kek"),
        ("Bad Name", Code::InvalidArgument, "sealed_for"),
    ] {
        let mut r = issue_req(subject, tx(1));
        r.sealed_for = name.into();
        expect_code(issue(&hub, r.clone()).await, code, &[needle], &format!("sealed_for {name}"));
        // Not even admin (every key) may.
        if name.starts_with("otp") {
            expect_code(issue(&admin, r).await, code, &[needle], &format!("admin: sealed_for {name}"));
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_challenge_ceiling_refuses_new_codes() {
    vector_keys();
    let srv = start_with("otp-ceiling", |c| c.otp.max_open_challenges = 3).await;
    let bench = srv.clients("bench").await;
    let subject = "acct-ceiling";
    let mut open = Vec::new();
    for n in 0..3 {
        open.push(issue_ok(&bench, issue_req(subject, tx(n)), "within the ceiling").await);
    }
    let s = expect_code(issue(&bench, issue_req(subject, tx(3))).await, Code::ResourceExhausted, &[], "the 4th open challenge");
    assert!(!s.message().contains(subject));
    // The held challenges keep their state; a used one still holds its slot until expiry.
    let first = &open[0];
    assert_eq!(verdict(&bench, verify_req(&first.challenge, &other_code(&first.code), subject, tx(0)), "wrong").await, (CodeVerdict::Invalid, 4));
    assert_eq!(verdict(&bench, verify_req(&first.challenge, &first.code, subject, tx(0)), "right").await.0, CodeVerdict::Valid);
    expect_code(issue(&bench, issue_req(subject, tx(3))).await, Code::ResourceExhausted, &[], "still full");
    for (n, i) in open.iter().enumerate().skip(1) {
        assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, subject, tx(n as i64)), "held").await.0, CodeVerdict::Valid);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_names_the_field() {
    vector_keys();
    let srv = start("otp-input").await;
    let bench = srv.clients("bench").await;
    let activation = srv.clients("activation").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-input";

    type Edit = fn(&mut IssueCodeRequest);
    let cases: [(&str, Edit, &str); 16] = [
        ("context", |r| r.context = None, ""),
        ("context.amount_minor", |r| r.context = Some(tx(-98_765)), "-98765"),
        ("context.currency", |r| r.context = Some(TransactionContext { currency: "cnq".into(), ..tx(1) }), "cnq"),
        ("context.currency", |r| r.context = Some(TransactionContext { currency: "CNYX".into(), ..tx(1) }), "CNYX"),
        ("context.currency", |r| r.context = Some(TransactionContext { currency: String::new(), ..tx(1) }), ""),
        ("context.payee_id", |r| r.context = Some(TransactionContext { payee_id: "+8613812345678".into(), ..tx(1) }), "13812345678"),
        ("context.payee_id", |r| r.context = Some(TransactionContext { payee_id: String::new(), ..tx(1) }), ""),
        ("context.reference", |r| r.context = Some(TransactionContext { reference: "ref with space".into(), ..tx(1) }), "ref with space"),
        ("lifetime_seconds", |r| r.lifetime_seconds = 601, "601"),
        ("digits", |r| r.digits = 5, ""),
        ("digits", |r| r.digits = 9, ""),
        ("subject", |r| r.subject = "+8613812345678".into(), "13812345678"),
        ("subject", |r| r.subject = "has space".into(), "has space"),
        ("subject", |r| r.subject = String::new(), ""),
        ("purpose", |r| r.purpose = "Payment".into(), "Payment"),
        ("purpose", |r| r.purpose = String::new(), ""),
    ];
    for (field, edit, value) in cases {
        let mut r = issue_req(subject, tx(1));
        edit(&mut r);
        let s = expect_code(issue(&bench, r).await, Code::InvalidArgument, &[field], &format!("IssueCode {field}"));
        assert!(s.message().starts_with(field), "{field}: {:?}", s.message());
        assert!(value.is_empty() || !s.message().contains(value), "{field}: the message echoes the value: {:?}", s.message());
    }
    // The limits themselves are accepted.
    for (lifetime, digits) in [(600, 6), (1, 8), (0, 7)] {
        let mut r = issue_req(subject, tx(1));
        r.lifetime_seconds = lifetime;
        r.digits = digits;
        let i = issue_ok(&bench, r, "limits").await;
        assert_eq!(i.code.len(), digits as usize);
    }

    // VerifyCode validates before anything else.
    let i = issue_ok(&bench, issue_req(subject, tx(1)), "issue").await;
    let mut r = verify_req(&i.challenge, &i.code, subject, tx(1));
    r.context = None;
    expect_code(bench.otp.clone().verify_code(r).await, Code::InvalidArgument, &["context"], "VerifyCode context");
    let r = verify_req(&i.challenge, &i.code, "has space", tx(1));
    expect_code(bench.otp.clone().verify_code(r).await, Code::InvalidArgument, &["subject"], "VerifyCode subject");
    let mut r = verify_req(&i.challenge, &i.code, subject, tx(1));
    r.purpose = "PAY".into();
    expect_code(bench.otp.clone().verify_code(r).await, Code::InvalidArgument, &["purpose"], "VerifyCode purpose");
    let r = verify_req(&i.challenge, &i.code, subject, tx(-1));
    expect_code(bench.otp.clone().verify_code(r).await, Code::InvalidArgument, &["context.amount_minor"], "VerifyCode amount");
    // None of those counted as attempts.
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &other_code(&i.code), subject, tx(1)), "first attempt").await, (CodeVerdict::Invalid, 4));

    // EnrollTotp.
    type EEdit = fn(&mut EnrollTotpRequest);
    let cases: [(&str, EEdit); 9] = [
        ("digits", |r| r.digits = 5),
        ("digits", |r| r.digits = 9),
        ("period", |r| r.period = 301),
        ("algorithm", |r| r.algorithm = 9),
        ("issuer", |r| r.issuer = String::new()),
        ("issuer", |r| r.issuer = "a:b".into()),
        ("account_label", |r| r.account_label = String::new()),
        ("account_label", |r| r.account_label = "x".repeat(65)),
        ("subject", |r| r.subject = "+8613812345678".into()),
    ];
    for (field, edit) in cases {
        let mut r = enroll_req(subject, OtpHashAlgorithm::Sha1, 6, 30);
        edit(&mut r);
        let s = expect_code(enroll(&activation, r).await, Code::InvalidArgument, &[field], &format!("EnrollTotp {field}"));
        assert!(!s.message().contains("13812345678"));
    }
    // VerifyTotp / VerifyHotp.
    let blob = enroll(&activation, enroll_req(subject, OtpHashAlgorithm::Sha1, 6, 30)).await.expect("enroll").into_inner().seed_blob;
    expect_code(verify_totp(&hub, totp_req(&blob, subject, "123456", 1, 0, 4)).await, Code::InvalidArgument, &["window"], "window");
    expect_code(verify_totp(&hub, totp_req(&blob, "bad subject", "123456", 1, 0, 0)).await, Code::InvalidArgument, &["subject"], "TOTP subject");
    expect_code(verify_hotp(&hub, hotp_req(&blob, subject, "123456", 0, 101)).await, Code::InvalidArgument, &["look_ahead"], "look_ahead");
    expect_code(verify_hotp(&hub, hotp_req(&blob, "", "123456", 0, 0)).await, Code::InvalidArgument, &["subject"], "HOTP subject");
    // The limits themselves are accepted.
    assert!(!totp_ok(&hub, totp_req(&blob, subject, "123456x", 1, 0, 3), "window 3").await.valid);
    let hblob = import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;
    let end = hotp(SEED_SHA1, OtpHash::Sha1, u64::MAX - 1, 6);
    let r = hotp_ok(&hub, hotp_req(&hblob, subject, &end, u64::MAX - 50, 100), "look_ahead 100 at the end").await;
    assert!(r.valid && r.next_counter == u64::MAX, "{r:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_holds_no_code_seed_or_phone_number() {
    vector_keys();
    let srv = start("otp-audit").await;
    let bench = srv.clients("bench").await;
    let hub = srv.clients("hub").await;
    let activation = srv.clients("activation").await;
    let zek = h(ZEK_HEX);
    let phone_subject = "8613812345678";
    let phone_payee = "13900001111";
    let mut codes: Vec<String> = Vec::new();
    let mut secrets: Vec<String> = vec![
        "13812345678".into(),
        phone_payee.into(),
        String::from_utf8(SEED_SHA1.to_vec()).unwrap(),
        hex::encode(SEED_SHA1),
        hex::encode(SEED_SHA256),
        data_encoding::BASE32_NOPAD.encode(SEED_SHA1),
        data_encoding::BASE32_NOPAD.encode(SEED_SHA256),
    ];
    let mut count = std::collections::BTreeMap::<&str, usize>::new();

    // IssueCode with a phone-number-like subject and payee, clear (8 digits) and sealed.
    let ctx = TransactionContext { payee_id: phone_payee.into(), ..tx(8_800) };
    let mut r = issue_req(phone_subject, ctx.clone());
    r.digits = 8;
    let i = issue_ok(&bench, r, "phone subject").await;
    codes.push(i.code.clone());
    let wrong = other_code(&i.code);
    codes.push(wrong.clone());
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &wrong, phone_subject, ctx.clone()), "wrong").await.0, CodeVerdict::Invalid);
    assert_eq!(verdict(&bench, verify_req(&i.challenge, &i.code, phone_subject, ctx.clone()), "right").await.0, CodeVerdict::Valid);
    let mut r = issue_req(phone_subject, ctx.clone());
    r.sealed_for = ZEK.into();
    let s = issue_ok(&hub, r, "sealed").await;
    let code = operator_open(&zek, &s.challenge_id, &s.sealed_code).expect("open");
    codes.push(code.clone());
    assert_eq!(verdict(&hub, verify_req(&s.challenge, &code, phone_subject, ctx.clone()), "sealed").await.0, CodeVerdict::Valid);
    expect_code(issue(&bench, issue_req("+8613812345678", tx(1))).await, Code::InvalidArgument, &["subject"], "E.164 subject");
    expect_code(issue(&hub, issue_req(phone_subject, tx(1))).await, Code::PermissionDenied, &[], "hub clear");
    *count.entry("IssueCode").or_default() += 4;
    *count.entry("VerifyCode").or_default() += 3;

    // Enrolment and TOTP.
    let mut er = enroll_req(phone_subject, OtpHashAlgorithm::Sha1, 8, 30);
    er.account_label = "13812345678".into();
    let e = enroll(&activation, er).await.expect("enroll").into_inner();
    let seed = uri_secret(&e.provisioning_uri);
    secrets.push(hex::encode(&seed));
    secrets.push(data_encoding::BASE32_NOPAD.encode(&seed));
    let t = 1_700_000_000;
    let code = totp(&seed, OtpHash::Sha1, t, 30, 8);
    codes.push(code.clone());
    assert!(totp_ok(&hub, totp_req(&e.seed_blob, phone_subject, &code, t, 0, 0), "enrolled").await.valid);
    assert!(!totp_ok(&hub, totp_req(&e.seed_blob, phone_subject, &other_code(&code), t, 0, 0), "wrong").await.valid);
    codes.push(other_code(&code));
    *count.entry("EnrollTotp").or_default() += 1;
    *count.entry("VerifyTotp").or_default() += 2;

    // The RFC seeds through the token.
    let blob1 = import_seed(&srv, phone_subject, SEED_SHA1, (OtpHash::Sha1, 8, 30)).await;
    let blob256 = import_seed(&srv, phone_subject, SEED_SHA256, (OtpHash::Sha256, 8, 30)).await;
    for (tt, s1, s256, _) in TOTP {
        assert!(totp_ok(&hub, totp_req(&blob1, phone_subject, s1, tt, 0, 0), "SHA1").await.valid);
        assert!(totp_ok(&hub, totp_req(&blob256, phone_subject, s256, tt, 0, 0), "SHA256").await.valid);
        codes.push(s1.into());
        codes.push(s256.into());
    }
    *count.entry("VerifyTotp").or_default() += 2 * TOTP.len();
    let blob_h = import_seed(&srv, phone_subject, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;
    for (c, code) in HOTP.iter().enumerate() {
        assert!(hotp_ok(&hub, hotp_req(&blob_h, phone_subject, code, c as u64, 1), "HOTP").await.valid);
        codes.push((*code).into());
    }
    expect_code(verify_hotp(&hub, hotp_req(&blob_h, "acct-other", HOTP[0], 0, 1)).await, Code::InvalidArgument, &["seed_blob"], "foreign");
    *count.entry("VerifyHotp").or_default() += HOTP.len() + 1;

    let dir = srv.audit_dir.clone();
    let hsm = srv.hsm.clone();
    drop((bench, hub, activation));
    srv.stop().await;

    // Long values in every byte of every file of the directory.
    let text = all_files_text(&dir);
    assert!(text.contains("keyward.v1.OtpService/VerifyHotp") && text.contains("\"kind\":\"checkpoint\""), "the scan sees the trail");
    for s in secrets.iter().chain(codes.iter().filter(|c| c.len() >= 8)) {
        for form in [s.to_uppercase(), s.to_lowercase()] {
            assert!(!text.contains(&form), "the audit directory contains {form}");
        }
    }
    // Codes (6 digits could occur by chance in hashes, signatures and timestamps) in
    // every other field of every line.
    let all = audit_lines(&dir);
    assert!(!all.is_empty());
    for l in &all {
        let mut rest = l.as_object().expect("a JSON object").clone();
        for random in ["ts", "seq", "prev_hash", "hash", "seal", "head", "sig", "request_id", "latency_us"] {
            rest.remove(random);
        }
        let rest = serde_json::Value::Object(rest).to_string();
        for c in &codes {
            assert!(!rest.contains(c.as_str()), "an audit line holds the code {c}: {rest}");
        }
    }
    // The calls are there.
    let lines = rpc_lines(&dir);
    for (rpc, n) in count {
        let got = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with(&format!("OtpService/{rpc}"))).count();
        assert_eq!(got, n, "audit lines of {rpc}");
    }
    let issue_lines: Vec<_> = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("/IssueCode")).collect();
    assert!(issue_lines.iter().any(|l| l["code"] == "PERMISSION_DENIED" && l["outcome"] == "denied"));
    assert!(issue_lines.iter().any(|l| l["code"] == "INVALID_ARGUMENT"));
    assert!(issue_lines.iter().any(|l| l["keys"].as_array().is_some_and(|k| k.iter().any(|k| k == &format!("{ZEK}/v1")))));
    verify_trail(&dir, &hsm);
}

/// An expired challenge whose store entry was evicted (to make room at the ceiling)
/// is still EXPIRED: its expiry is sealed in the challenge itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_challenge_stays_expired_after_eviction() {
    vector_keys();
    let srv = start_with("otp-evicted", |c| c.otp.max_open_challenges = 2).await;
    let bench = srv.clients("bench").await;
    let subject = "acct-evicted";
    let mut r = issue_req(subject, tx(7));
    r.lifetime_seconds = 1;
    let short = issue_ok(&bench, r, "short-lived").await;
    let long = issue_ok(&bench, issue_req(subject, tx(8)), "long-lived").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // At the ceiling: the expired entry is evicted to register this one.
    let third = issue_ok(&bench, issue_req(subject, tx(9)), "evicts the expired entry").await;
    assert_eq!(verdict(&bench, verify_req(&short.challenge, &short.code, subject, tx(7)), "evicted").await, (CodeVerdict::Expired, 0));
    assert_eq!(verdict(&bench, verify_req(&long.challenge, &long.code, subject, tx(8)), "long").await.0, CodeVerdict::Valid);
    assert_eq!(verdict(&bench, verify_req(&third.challenge, &third.code, subject, tx(9)), "third").await.0, CodeVerdict::Valid);
    srv.stop().await;
}

/// A counter that has been accepted is never accepted again, even at the end of the
/// counter space (next_counter saturates at u64::MAX, so counter u64::MAX would match
/// the same code forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotp_code_at_the_last_counter_is_not_replayable() {
    vector_keys();
    let srv = start("otp-hotp-end").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-hotp-end";
    let blob = import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;
    // The invariant on ordinary counters.
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[3], 0, 10), "counter 3").await;
    assert!(r.valid);
    assert!(!hotp_ok(&hub, hotp_req(&blob, subject, HOTP[3], r.next_counter, 10), "replay 3").await.valid);
    // At the end of the counter space.
    let last = hotp(SEED_SHA1, OtpHash::Sha1, u64::MAX, 6);
    let r = hotp_ok(&hub, hotp_req(&blob, subject, &last, u64::MAX, 1), "counter u64::MAX").await;
    if r.valid {
        let again = hotp_ok(&hub, hotp_req(&blob, subject, &last, r.next_counter, 1), "replay u64::MAX").await;
        assert!(!again.valid, "the code of counter u64::MAX verifies again at next_counter {}", r.next_counter);
    }
    srv.stop().await;
}

/// Wrong TOTP/HOTP codes are counted per seed: `otp.totp_max_failures` of them in a
/// row lock the seed (RESOURCE_EXHAUSTED naming the lock, even for the right code)
/// for `otp.totp_lockout_secs`, a right code before that clears the count, and other
/// seeds are not affected; the trail shows the count, never a code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotp_guessing_locks_the_seed_and_a_success_resets() {
    vector_keys();
    let (config, _) = test_config("otp-guess-defaults");
    assert_eq!((config.otp.totp_max_failures, config.otp.totp_lockout.as_secs()), (5, 900), "defaults");
    let srv = start_with("otp-guess", |c| c.otp.totp_max_failures = 3).await;
    let hub = srv.clients("hub").await;
    let subject = "acct-hotp-guess";
    let blob = import_seed(&srv, subject, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;
    let other = "acct-hotp-guess-other";
    let other_blob = import_seed(&srv, other, SEED_SHA1, (OtpHash::Sha1, 6, 30)).await;

    // Two wrong codes, then the right one: valid, and the count starts again.
    for _ in 0..2 {
        assert!(!hotp_ok(&hub, hotp_req(&blob, subject, &other_code(HOTP[0]), 0, 1), "wrong").await.valid);
    }
    let r = hotp_ok(&hub, hotp_req(&blob, subject, HOTP[0], 0, 1), "right after 2 wrong").await;
    assert!(r.valid && r.next_counter == 1, "{r:?}");
    // Two more wrong codes do not lock (the success reset the count) ...
    for _ in 0..2 {
        assert!(!hotp_ok(&hub, hotp_req(&blob, subject, &other_code(HOTP[1]), 1, 1), "wrong after reset").await.valid);
    }
    assert!(hotp_ok(&hub, hotp_req(&blob, subject, HOTP[1], 1, 1), "right after reset").await.valid);
    // ... three in a row do: the third still answers, then even the right code is refused.
    for n in 0..3 {
        let r = hotp_ok(&hub, hotp_req(&blob, subject, &other_code(HOTP[2]), 2, 1), "guess").await;
        assert!(!r.valid, "guess {n}");
    }
    let s = expect_code(verify_hotp(&hub, hotp_req(&blob, subject, HOTP[2], 2, 1)).await, Code::ResourceExhausted, &["seed_blob", "locked", "3 wrong codes"], "locked seed");
    assert!(!s.message().contains(HOTP[2]) && !s.message().contains(subject), "{:?}", s.message());
    // The same seed through VerifyTotp is locked too.
    expect_code(verify_totp(&hub, totp_req(&blob, subject, "94287082", 59, 0, 1)).await, Code::ResourceExhausted, &["locked"], "locked via TOTP");
    // Another subject's seed (the same secret, another blob) still verifies.
    assert!(hotp_ok(&hub, hotp_req(&other_blob, other, HOTP[2], 2, 1), "other seed").await.valid);
    // A blob that is refused counts nothing and says nothing about the lock.
    expect_code(verify_hotp(&hub, hotp_req(&blob, other, HOTP[2], 2, 1)).await, Code::InvalidArgument, &["seed_blob"], "foreign subject");
    let dir = srv.audit_dir.clone();
    srv.stop().await;

    let lines = rpc_lines(&dir);
    let hotp_lines: Vec<_> = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("OtpService/VerifyHotp")).collect();
    let details: Vec<String> = hotp_lines.iter().map(|l| l["detail"].as_str().unwrap_or_default().to_string()).collect();
    assert!(details.iter().any(|d| d == "valid=false otp-seed-failures=2"), "{details:?}");
    assert!(details.iter().any(|d| d == "valid=false otp-seed-failures=3 locked"), "{details:?}");
    assert!(hotp_lines.iter().any(|l| l["code"] == "RESOURCE_EXHAUSTED" && l["detail"] == "otp-seed-failures=3 locked"), "{details:?}");
    let trail = all_files_text(&dir);
    for code in &HOTP[..3] {
        assert!(!trail.contains(code), "a code in the trail");
    }
}

/// Open challenges are counted per client identity: a client at
/// `otp.challenge_quota_per_client` is refused (RESOURCE_EXHAUSTED naming its quota)
/// while another client still gets challenges that verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_at_its_quota_does_not_lock_out_another() {
    vector_keys();
    let (config, _) = test_config("otp-quota-defaults");
    assert_eq!(config.otp.challenge_quota_per_client, config.otp.max_open_challenges / 4, "default quota");
    let srv = start_with("otp-quota", |c| {
        c.otp.max_open_challenges = 10;
        c.otp.challenge_quota_per_client = 2;
    })
    .await;
    let hub = srv.clients("hub").await;
    let bench = srv.clients("bench").await;
    let subject = "acct-quota";
    let sealed = |n: i64| IssueCodeRequest { sealed_for: ZEK.into(), ..issue_req(subject, tx(n)) };
    for n in 0..2 {
        issue_ok(&hub, sealed(n), "hub within its quota").await;
    }
    let s = expect_code(issue(&hub, sealed(2)).await, Code::ResourceExhausted, &["quota of 2 open challenges", "otp.challenge_quota_per_client"], "hub at its quota");
    assert!(!s.message().contains(subject), "{:?}", s.message());
    // Another client is not affected: its challenge is issued and verifies.
    let other = issue_ok(&bench, issue_req(subject, tx(7)), "another client").await;
    assert_eq!(verdict(&bench, verify_req(&other.challenge, &other.code, subject, tx(7)), "another client's code").await.0, CodeVerdict::Valid);
    issue_ok(&bench, issue_req(subject, tx(8)), "another client, second").await;
    expect_code(issue(&bench, issue_req(subject, tx(9))).await, Code::ResourceExhausted, &["quota"], "bench at its quota");
    expect_code(issue(&hub, sealed(3)).await, Code::ResourceExhausted, &["quota"], "hub still at its quota");
    srv.stop().await;
}

/// RFC 5649's own vector (a 20-byte key under its AES-192 KEK) through the software
/// wrap, so the token-path tests below wrap the way a vendor does.
#[test]
fn software_wrap_reproduces_rfc5649() {
    let kek = h(TRANSPORT_HEX);
    assert_eq!(wrap_pad(&kek, &h("C37B7E6492584340BED12207808941155068F738")), h("138BDEAA9B8FA7FC61F97742E72248EE5AE6AE5360D1AE6A5F54F373FA543B6A"));
    assert_eq!(wrap_pad(&kek, &h("466F7250617369")), h("AFBEB0F07DFBF5419200F2CCB50BB24F"));
}

/// ImportOtpSeed: seeds wrapped under a transport KEK (RFC 5649) by their vendor are
/// unwrapped and re-wrapped in the token; the RFC 4226 and RFC 6238 vectors then run
/// through the public API alone (ImportOtpSeed, VerifyHotp, VerifyTotp). The RFC
/// 5649 vector's own wrapped bytes import too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_seeds_run_the_rfc_vectors_through_the_api() {
    vector_keys();
    let srv = start("otp-import").await;
    let activation = srv.clients("activation").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-imported";

    let hotp_blob = import_api(&activation, subject, SEED_SHA1, OtpHashAlgorithm::Sha1, 6).await;
    for (c, code) in HOTP.iter().enumerate() {
        let r = hotp_ok(&hub, hotp_req(&hotp_blob, subject, code, c as u64, 1), "imported HOTP vector").await;
        assert!(r.valid && r.next_counter == c as u64 + 1, "counter {c}: {r:?}");
    }
    let blobs = [
        import_api(&activation, subject, SEED_SHA1, OtpHashAlgorithm::Sha1, 8).await,
        import_api(&activation, subject, SEED_SHA256, OtpHashAlgorithm::Sha256, 8).await,
        import_api(&activation, subject, SEED_SHA512, OtpHashAlgorithm::Sha512, 8).await,
    ];
    for (t, s1, s256, s512) in TOTP {
        for (blob, code) in blobs.iter().zip([s1, s256, s512]) {
            let r = totp_ok(&hub, totp_req(blob, subject, code, t, 0, 0), "imported TOTP vector").await;
            assert!(r.valid && r.step == t / 30, "{code} at {t}: {r:?}");
        }
    }
    // The blob is bound to its subject like an enrolled one.
    expect_code(verify_hotp(&hub, hotp_req(&hotp_blob, "acct-other", HOTP[0], 0, 1)).await, Code::InvalidArgument, &["seed_blob"], "foreign subject");

    // RFC 5649 section 6's wrapped 20-byte key, as published, imports as a SHA1 seed.
    let published = h("138BDEAA9B8FA7FC61F97742E72248EE5AE6AE5360D1AE6A5F54F373FA543B6A");
    let r = import_otp(&activation, import_req("acct-5649", published, OtpHashAlgorithm::Sha1, 6, 30)).await;
    let blob = r.unwrap_or_else(|s| panic!("RFC 5649 vector: {} {}", s.code(), s.message())).into_inner().seed_blob;
    let code = hotp(&h("C37B7E6492584340BED12207808941155068F738"), OtpHash::Sha1, 3, 6);
    assert!(hotp_ok(&hub, hotp_req(&blob, "acct-5649", &code, 3, 1), "RFC 5649 seed").await.valid);

    let dir = srv.audit_dir.clone();
    srv.stop().await;
    let lines = rpc_lines(&dir);
    let imports: Vec<_> = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("OtpService/ImportOtpSeed")).collect();
    assert_eq!(imports.len(), 5, "one audit line per import");
    for l in &imports {
        let keys = l["keys"].to_string();
        assert!(keys.contains("otp.transport.vendor/v1") && keys.contains("otp.kek/v"), "{keys}");
    }
    let trail = all_files_text(&dir);
    assert!(!trail.contains("3132333435363738393031323334353637383930") && !trail.contains("12345678901234567890"), "a seed in the trail");
}

/// ImportOtpSeed needs its RPC and the permission "otp.import-seed"; every bad input
/// is INVALID_ARGUMENT naming its field (a wrapped seed that does not unwrap, or
/// unwraps to a seed longer than the digest, included), and a transport key that is
/// not AES is FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_otp_seed_refuses_without_permission_and_names_bad_input() {
    vector_keys();
    let srv = start("otp-import-refusals").await;
    let activation = srv.clients("activation").await;
    let kek = h(TRANSPORT_HEX);
    let good = || import_req("acct-import", wrap_pad(&kek, SEED_SHA1), OtpHashAlgorithm::Sha1, 6, 30);

    // The hub holds no ImportOtpSeed RPC; the admin holds every RPC and key but not the permission.
    expect_code(import_otp(&srv.clients("hub").await, good()).await, Code::PermissionDenied, &["ImportOtpSeed"], "hub");
    expect_code(import_otp(&srv.clients("admin").await, good()).await, Code::PermissionDenied, &["otp.import-seed"], "admin");
    assert!(import_otp(&activation, good()).await.is_ok(), "activation imports");

    let cases: Vec<(&str, ImportOtpSeedRequest, &[&str])> = vec![
        ("empty subject", ImportOtpSeedRequest { subject: String::new(), ..good() }, &["subject"]),
        ("not a transport KEK", ImportOtpSeedRequest { transport_kek: "otp.kek".into(), ..good() }, &["transport_kek", "otp.transport.<name>"]),
        ("bare prefix", ImportOtpSeedRequest { transport_kek: "otp.transport.".into(), ..good() }, &["transport_kek"]),
        ("empty wrapped seed", ImportOtpSeedRequest { wrapped_seed: Vec::new(), ..good() }, &["wrapped_seed", "24-32 bytes", "16-20 bytes"]),
        ("not a multiple of 8", ImportOtpSeedRequest { wrapped_seed: vec![0x5A; 25], ..good() }, &["wrapped_seed", "multiple of 8"]),
        ("too long for SHA1", ImportOtpSeedRequest { wrapped_seed: wrap_pad(&kek, SEED_SHA256), ..good() }, &["wrapped_seed", "24-32 bytes"]),
        ("an 8-byte seed", ImportOtpSeedRequest { wrapped_seed: wrap_pad(&kek, &[0x42; 8]), ..good() }, &["wrapped_seed", "24-32 bytes"]),
        ("does not unwrap", ImportOtpSeedRequest { wrapped_seed: vec![0x5A; 32], ..good() }, &["wrapped_seed", "does not unwrap", "otp.transport.vendor/v1", "16-20 bytes"]),
        ("another KEK's wrap", ImportOtpSeedRequest { wrapped_seed: wrap_pad(&h(&ZEK_HEX[..48]), SEED_SHA1), ..good() }, &["wrapped_seed", "does not unwrap"]),
        ("digits", ImportOtpSeedRequest { digits: 9, ..good() }, &["digits"]),
        ("period", ImportOtpSeedRequest { period: 301, ..good() }, &["period"]),
        ("algorithm", ImportOtpSeedRequest { algorithm: 99, ..good() }, &["algorithm"]),
        ("unknown version", ImportOtpSeedRequest { transport_kek_version: 9, ..good() }, &["otp.transport.vendor"]),
    ];
    for (what, r, needles) in cases {
        let code = if what == "unknown version" { None } else { Some(Code::InvalidArgument) };
        let s = err_of(import_otp(&activation, r).await, what);
        if let Some(code) = code {
            assert_eq!(s.code(), code, "{what}: {:?}", s.message());
        } else {
            assert!(matches!(s.code(), Code::NotFound | Code::InvalidArgument), "{what}: {:?} {:?}", s.code(), s.message());
        }
        for n in needles {
            assert!(s.message().contains(n), "{what}: {:?} does not name {n:?}", s.message());
        }
    }
    let r = import_otp(&activation, ImportOtpSeedRequest { transport_kek: TRANSPORT_TDES.into(), ..good() }).await;
    expect_code(r, Code::FailedPrecondition, &["otp.transport.tdes", "not an AES transport KEK"], "TDES transport key");
    srv.stop().await;
}

/// EnrollHotp: an otpauth://hotp/ URI with the seed and the initial counter; the
/// codes an authenticator computes from the URI verify against the blob from that
/// counter on, and the blob is bound to the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_hotp_gives_a_working_counter_authenticator() {
    vector_keys();
    let srv = start("otp-enroll-hotp").await;
    let activation = srv.clients("activation").await;
    let hub = srv.clients("hub").await;
    let subject = "acct-enroll-hotp";
    let req = |alg: OtpHashAlgorithm, digits: u32, counter: u64| EnrollHotpRequest {
        subject: subject.into(),
        issuer: "Keyward Test".into(),
        account_label: "alice@example.com".into(),
        algorithm: alg as i32,
        digits,
        counter,
    };
    for (alg, hash, digits) in [(OtpHashAlgorithm::Sha1, OtpHash::Sha1, 6u32), (OtpHashAlgorithm::Sha256, OtpHash::Sha256, 8), (OtpHashAlgorithm::Sha512, OtpHash::Sha512, 7)] {
        let r = activation.otp.clone().enroll_hotp(req(alg, digits, 41)).await.unwrap_or_else(|s| panic!("EnrollHotp: {s:?}")).into_inner();
        let uri = r.provisioning_uri.as_str();
        assert!(uri.starts_with("otpauth://hotp/Keyward%20Test:alice%40example.com?"), "{uri}");
        assert_eq!(uri_param(uri, "counter"), Some("41"));
        assert_eq!(uri_param(uri, "digits"), Some(digits.to_string().as_str()));
        assert_eq!(uri_param(uri, "algorithm"), Some(hash_name(hash)));
        assert_eq!(uri_param(uri, "period"), None, "no period in an HOTP URI");
        let seed = uri_secret(uri);
        assert_eq!(seed.len(), hash.digest_len());
        for c in 41..44 {
            let code = hotp(&seed, hash, c, digits);
            let v = hotp_ok(&hub, hotp_req(&r.seed_blob, subject, &code, c, 1), "enrolled HOTP").await;
            assert!(v.valid && v.next_counter == c + 1, "{alg:?} counter {c}: {v:?}");
        }
        let code = hotp(&seed, hash, 44, digits);
        expect_code(verify_hotp(&hub, hotp_req(&r.seed_blob, "acct-other", &code, 44, 1)).await, Code::InvalidArgument, &["seed_blob"], "foreign subject");
    }
    let bad = activation.otp.clone().enroll_hotp(EnrollHotpRequest { account_label: "a:b".into(), ..req(OtpHashAlgorithm::Sha1, 6, 0) }).await;
    expect_code(bad, Code::InvalidArgument, &["account_label"], "label with a colon");
    let bad = activation.otp.clone().enroll_hotp(req(OtpHashAlgorithm::Sha1, 5, 0)).await;
    expect_code(bad, Code::InvalidArgument, &["digits"], "5 digits");
    let bad = activation.otp.clone().enroll_hotp(req(OtpHashAlgorithm::Sha1, 6, u64::MAX)).await;
    expect_code(bad, Code::InvalidArgument, &["counter"], "the last counter");
    expect_code(hub.otp.clone().enroll_hotp(req(OtpHashAlgorithm::Sha1, 6, 0)).await, Code::PermissionDenied, &["EnrollHotp"], "hub");
    srv.stop().await;
}
