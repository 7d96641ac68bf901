//! PinService against a real SoftHSM token over mTLS: ISO 9564 format 0/4 and TDES/AES
//! DUKPT vectors through imported known keys, translation across every format pair with
//! and without an account change (and its permission), uniform refusal of malformed
//! blocks, PIN verification (keyward HMAC, IBM 3624, Visa PVV) with ChangePin, key-class
//! and role refusals, and no clear PIN, block or account number in the audit trail.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::OnceLock;

use common::*;
use keyward::client::Clients;
use keyward::crypto::dukpt::{self, AesKeyType, AesKsn, KeyUsage};
use keyward::hsm::{Algorithm, KeyClass, KeyMeta};
use keyward::proto::{
    account, pin_source, Account, ChangePinRequest, Dukpt, EncryptRequest, EncryptedPin, ExportTerminalKeyRequest,
    GeneratePinVerificationDataRequest, PinBlockFormat, PinSource, PinVerificationMethod, TranslatePinRequest,
    TranslatePinResponse, VerifyPinRequest, ZoneKey,
};
use keyward::sim::terminal::Terminal;
use openssl::symm::{Cipher, Crypter, Mode};
use tonic::{Code, Response, Status};

// ---------------------------------------------------------------------------
// Known keys (shared/vectors.md) and the names they are imported under
// ---------------------------------------------------------------------------

/// TDES zone key of the format 0 vectors (also the X9.24-1 BDK value).
const TDES_ZPK: &str = "0123456789ABCDEFFEDCBA9876543210";
/// A second TDES zone (odd parity), the destination of zone-to-zone translations.
const TDES_ZPK_B: &str = "89ABCDEF0123456776543210FEDCBA98";
/// AES-128 zone key of the format 4 known answers.
const AES_ZPK: &str = "000102030405060708090A0B0C0D0E0F";
/// A second AES zone.
const AES_ZPK_B: &str = "F0E1D2C3B4A5968778695A4B3C2D1E0F";
const TDES_BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
const AES_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
const AES256_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1";
/// Terminal transport KEK (K0 AES-256); `tmk.*` is what the kif role may use.
const TMK: &str = "6B8F2A1C9D3E4F5061728394A5B6C7D8E9FA0B1C2D3E4F506172839405A6B7C8";
/// Known PIN verification keys, for answers computed in software.
const PVK_IBM: &str = "0123456789ABCDEFFEDCBA9876543210";
const PVK_VISA: &str = "89ABCDEF0123456776543210FEDCBA98";

const Z_TDES: Zone = Zone { name: "zpk.vec-tdes", hex: TDES_ZPK, aes: false };
const Z_TDES_B: Zone = Zone { name: "zpk.vec-tdes-b", hex: TDES_ZPK_B, aes: false };
const Z_AES: Zone = Zone { name: "zpk.vec-aes", hex: AES_ZPK, aes: true };
const Z_AES_B: Zone = Zone { name: "zpk.vec-aes-b", hex: AES_ZPK_B, aes: true };

const PAN: &str = "4111111111111111";
const PHONE: &str = "13812345678";
const PHONE_E164: &str = "+8613812345678";
const VIRTUAL_PAN: &str = "138123456780";
/// The account of the X9.24-1 DUKPT PIN blocks.
const DUKPT_PAN: &str = "4012345678909";
const DUKPT_CLEAR: &str = "041274EDCBA9876F";

/// Format 4 known answers: PIN field 441234AAAAAAAAAA2F69ADDE2E9E7ACE under AES_ZPK.
const F4_PIN_FIELD: &str = "441234AAAAAAAAAA2F69ADDE2E9E7ACE";
const F4_PAN_BLOCK: &str = "4EB686DCB6D4C515052CE434DF8A1F71";
const F4_PHONE_BLOCK: &str = "910EFE2D76A9525ABF8E6CB5FB5761C8";
const F0_PAN_CLEAR: &str = "041225EEEEEEEEEE";
const F0_PHONE_CLEAR: &str = "041235C7EDCBA987";

/// The one answer for every malformed block.
const BAD_BLOCK: &str = "pin.block: PIN block does not contain valid values";

static VECTOR_KEYS: OnceLock<Vec<KeyMeta>> = OnceLock::new();

/// Imports the known keys once per test binary (before any server of this binary
/// starts: servers load the catalogue at start). Never call with TOKEN_WRITE held.
fn vector_keys() -> &'static [KeyMeta] {
    VECTOR_KEYS.get_or_init(|| {
        let keys: [(&str, KeyClass, Algorithm, &str); 12] = [
            ("zpk.vec-tdes", KeyClass::P0, Algorithm::Tdes2, TDES_ZPK),
            ("zpk.vec-tdes-b", KeyClass::P0, Algorithm::Tdes2, TDES_ZPK_B),
            ("zpk.vec-aes", KeyClass::P0, Algorithm::Aes128, AES_ZPK),
            ("zpk.vec-aes-b", KeyClass::P0, Algorithm::Aes128, AES_ZPK_B),
            ("bdk.vec-tdes", KeyClass::B0, Algorithm::Tdes2, TDES_BDK),
            ("bdk.vec-aes", KeyClass::B0, Algorithm::Aes128, AES_BDK),
            ("bdk.vec-aes256", KeyClass::B0, Algorithm::Aes256, AES256_BDK),
            ("tmk.vec", KeyClass::K0, Algorithm::Aes256, TMK),
            ("pvk.vec-ibm", KeyClass::V1, Algorithm::Tdes2, PVK_IBM),
            ("pvk.vec-visa", KeyClass::V2, Algorithm::Tdes2, PVK_VISA),
            // A second, unrelated KEK for the kif role's refusals.
            ("tmk.vec-other", KeyClass::K0, Algorithm::Aes128, AES_ZPK_B),
            // A K0 key under a name kif may not use.
            ("kek.vec", KeyClass::K0, Algorithm::Aes256, TMK),
        ];
        let out = import_known_keys(&keys);
        for (m, (name, _, alg, _)) in out.iter().zip(keys.iter()) {
            assert_eq!(m.algorithm, *alg, "{name}");
        }
        out
    })
}

fn meta(name: &str) -> &'static KeyMeta {
    vector_keys().iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} was not imported"))
}

// ---------------------------------------------------------------------------
// Software reference: ciphers, account fields, PIN blocks (independent of src/)
// ---------------------------------------------------------------------------

fn ecb(cipher: Cipher, key: &[u8], mode: Mode, data: &[u8]) -> Vec<u8> {
    let mut c = Crypter::new(cipher, mode, key, None).unwrap();
    c.pad(false);
    let mut out = vec![0u8; data.len() + 32];
    let n = c.update(data, &mut out).unwrap();
    let m = c.finalize(&mut out[n..]).unwrap();
    out.truncate(n + m);
    assert_eq!(out.len(), data.len());
    out
}

/// Two-key TDES-ECB as OpenSSL's K1 K2 K1.
fn tdes(key16: &[u8], mode: Mode, data: &[u8]) -> Vec<u8> {
    assert_eq!(key16.len(), 16);
    let mut k = key16.to_vec();
    k.extend_from_slice(&key16[..8]);
    ecb(Cipher::des_ede3_ecb(), &k, mode, data)
}

fn aes(key: &[u8], mode: Mode, data: &[u8]) -> Vec<u8> {
    let cipher = match key.len() {
        16 => Cipher::aes_128_ecb(),
        32 => Cipher::aes_256_ecb(),
        n => panic!("AES key of {n} bytes"),
    };
    ecb(cipher, key, mode, data)
}

/// A zone key known to the test: its token name and clear value.
#[derive(Clone, Copy, Debug)]
struct Zone {
    name: &'static str,
    hex: &'static str,
    aes: bool,
}

impl Zone {
    fn cipher(&self, mode: Mode, data: &[u8]) -> Vec<u8> {
        if self.aes {
            aes(&h(self.hex), mode, data)
        } else {
            tdes(&h(self.hex), mode, data)
        }
    }
    fn enc(&self, data: &[u8]) -> Vec<u8> {
        self.cipher(Mode::Encrypt, data)
    }
    fn dec(&self, data: &[u8]) -> Vec<u8> {
        self.cipher(Mode::Decrypt, data)
    }
}

fn pack(nibbles: &[u8]) -> Vec<u8> {
    nibbles.chunks(2).map(|p| (p[0] << 4) | p[1]).collect()
}

fn unpack(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|b| [b >> 4, b & 0x0F]).collect()
}

fn digits_of(s: &str) -> Vec<u8> {
    s.bytes().map(|c| c - b'0').collect()
}

fn rand_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    openssl::rand::rand_bytes(&mut v).unwrap();
    v
}

/// Luhn check digit of `body`.
fn luhn(body: &str) -> u8 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = u32::from(c - b'0');
            if i % 2 == 0 {
                let x = 2 * d;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// An 11-digit national mobile number and its Luhn digit.
fn virtual_pan(phone: &str) -> String {
    let national = phone.strip_prefix("+86").unwrap_or(phone);
    format!("{national}{}", luhn(national))
}

/// Format 0/3 account field: 0000 and the 12 rightmost digits before the check digit.
fn acct0(account: &str) -> Vec<u8> {
    let body = &account[..account.len() - 1];
    let take = &body[body.len().saturating_sub(12)..];
    let mut n = vec![0u8; 16 - take.len()];
    n.extend(digits_of(take));
    pack(&n)
}

/// Format 4 account field: length - 12, every digit, zero fill to 32 nibbles.
fn acct4(account: &str) -> Vec<u8> {
    let mut n = vec![(account.len() - 12) as u8];
    n.extend(digits_of(account));
    n.resize(32, 0);
    pack(&n)
}

fn control(f: PinBlockFormat) -> u8 {
    match f {
        PinBlockFormat::Iso0 => 0,
        PinBlockFormat::Iso1 => 1,
        PinBlockFormat::Iso3 => 3,
        PinBlockFormat::Iso4 => 4,
        PinBlockFormat::Unspecified => unreachable!(),
    }
}

/// A clear PIN field with the format's fill (random where the format says so).
fn pin_field(f: PinBlockFormat, pin: &str) -> Vec<u8> {
    let r = rand_bytes(16);
    let mut n = vec![control(f), pin.len() as u8];
    n.extend(digits_of(pin));
    for &x in &r[n.len()..] {
        n.push(match f {
            PinBlockFormat::Iso0 => 0xF,
            PinBlockFormat::Iso1 => x & 0xF,
            PinBlockFormat::Iso3 => 0xA + x % 6,
            _ => 0xA,
        });
    }
    let mut field = pack(&n);
    if f == PinBlockFormat::Iso4 {
        field.extend_from_slice(&r[..8]);
    }
    field
}

/// Enciphers a clear PIN field as format `f` (0/3: xor account field; 4: two passes).
fn encipher_field(f: PinBlockFormat, field: &[u8], account: Option<&str>, z: Zone) -> Vec<u8> {
    match f {
        PinBlockFormat::Iso0 | PinBlockFormat::Iso3 => z.enc(&xor(field, &acct0(account.unwrap()))),
        PinBlockFormat::Iso1 => z.enc(field),
        PinBlockFormat::Iso4 => z.enc(&xor(&z.enc(field), &acct4(account.unwrap()))),
        PinBlockFormat::Unspecified => unreachable!(),
    }
}

fn encode(f: PinBlockFormat, pin: &str, account: Option<&str>, z: Zone) -> Vec<u8> {
    encipher_field(f, &pin_field(f, pin), account, z)
}

/// The clear PIN field of a block.
fn clear_field(f: PinBlockFormat, block: &[u8], account: Option<&str>, z: Zone) -> Vec<u8> {
    match f {
        PinBlockFormat::Iso0 | PinBlockFormat::Iso3 => xor(&z.dec(block), &acct0(account.unwrap())),
        PinBlockFormat::Iso1 => z.dec(block),
        PinBlockFormat::Iso4 => z.dec(&xor(&z.dec(block), &acct4(account.unwrap()))),
        PinBlockFormat::Unspecified => unreachable!(),
    }
}

/// Deciphers and checks a block; the PIN digits, or what is wrong.
fn decode(f: PinBlockFormat, block: &[u8], account: Option<&str>, z: Zone) -> Result<String, String> {
    let expected_len = if f == PinBlockFormat::Iso4 { 16 } else { 8 };
    if block.len() != expected_len {
        return Err(format!("block of {} bytes", block.len()));
    }
    let n = unpack(&clear_field(f, block, account, z)[..8]);
    if n[0] != control(f) {
        return Err(format!("control nibble {}", n[0]));
    }
    let len = usize::from(n[1]);
    if !(4..=12).contains(&len) {
        return Err(format!("PIN length {len}"));
    }
    if n[2..2 + len].iter().any(|d| *d > 9) {
        return Err("non-digit PIN".into());
    }
    let fill_ok = n[2 + len..].iter().all(|v| match f {
        PinBlockFormat::Iso0 => *v == 0xF,
        PinBlockFormat::Iso1 => true,
        PinBlockFormat::Iso3 => *v >= 0xA,
        _ => *v == 0xA,
    });
    if !fill_ok {
        return Err("fill".into());
    }
    Ok(n[2..2 + len].iter().map(|d| char::from(b'0' + d)).collect())
}

fn tdes_kcv(key: &[u8]) -> String {
    hex::encode_upper(&tdes(key, Mode::Encrypt, &[0u8; 8])[..3])
}

fn aes_kcv(key: &[u8]) -> String {
    let cipher = if key.len() == 32 { Cipher::aes_256_cbc() } else { Cipher::aes_128_cbc() };
    let pkey = openssl::pkey::PKey::cmac(&cipher, key).unwrap();
    let mut s = openssl::sign::Signer::new_without_digest(&pkey).unwrap();
    s.update(&[0u8; 16]).unwrap();
    hex::encode_upper(&s.sign_to_vec().unwrap()[..3])
}

fn aes_unwrap(kek: &[u8], wrapped: &[u8]) -> Vec<u8> {
    let key = openssl::aes::AesKey::new_decrypt(kek).unwrap();
    let mut out = vec![0u8; wrapped.len() - 8];
    let n = openssl::aes::unwrap_key(&key, None, &mut out, wrapped).expect("the exported key unwraps under the KEK");
    out.truncate(n);
    out
}

// ---------------------------------------------------------------------------
// Request builders
// ---------------------------------------------------------------------------

fn pan(s: &str) -> Option<Account> {
    Some(Account { kind: Some(account::Kind::Pan(s.into())) })
}

fn phone(s: &str) -> Option<Account> {
    Some(Account { kind: Some(account::Kind::Phone(s.into())) })
}

fn zone_src(name: &str) -> Option<PinSource> {
    Some(PinSource { kind: Some(pin_source::Kind::Zone(ZoneKey { key_name: name.into(), version: 0 })) })
}

fn dukpt_src(bdk: &str, ksn: &[u8]) -> Option<PinSource> {
    Some(PinSource { kind: Some(pin_source::Kind::Dukpt(Dukpt { bdk_name: bdk.into(), bdk_version: 0, ksn: ksn.to_vec() })) })
}

fn epin(block: &[u8], f: PinBlockFormat, account: Option<Account>, source: Option<PinSource>) -> EncryptedPin {
    EncryptedPin { block: block.to_vec(), format: f as i32, account, source }
}

/// A zone-key PIN block of `pin` for `acct` (account digits) as format `f` under `z`.
fn zpin(f: PinBlockFormat, pin: &str, acct: &str, z: Zone) -> EncryptedPin {
    epin(&encode(f, pin, Some(acct), z), f, pan(acct), zone_src(z.name))
}

fn treq(pin: EncryptedPin, dest: &str, f: PinBlockFormat, dest_account: Option<Account>) -> TranslatePinRequest {
    TranslatePinRequest { pin: Some(pin), destination_key: dest.into(), destination_format: f as i32, destination_account: dest_account }
}

async fn translate(c: &Clients, r: TranslatePinRequest) -> Result<Response<TranslatePinResponse>, Status> {
    c.pin.clone().translate_pin(r).await
}

async fn translate_ok(c: &Clients, r: TranslatePinRequest, what: &str) -> TranslatePinResponse {
    translate(c, r).await.unwrap_or_else(|s| panic!("{what}: {:?} {:?}", s.code(), s.message())).into_inner()
}

fn key_of(r: &Option<keyward::proto::KeyRef>) -> (String, u32) {
    r.as_ref().map(|k| (k.name.clone(), k.version)).unwrap_or_default()
}

const FORMATS: [PinBlockFormat; 4] = [PinBlockFormat::Iso0, PinBlockFormat::Iso1, PinBlockFormat::Iso3, PinBlockFormat::Iso4];

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The software reference of this file reproduces every ISO 9564 vector, so the
/// token-path tests below compare against something known to be right.
#[test]
fn software_reference_reproduces_the_iso_vectors() {
    assert_eq!(virtual_pan(PHONE), VIRTUAL_PAN);
    assert_eq!(virtual_pan(PHONE_E164), VIRTUAL_PAN);
    assert_eq!(hex::encode_upper(acct4(PAN)), "44111111111111111000000000000000");
    assert_eq!(hex::encode_upper(acct4(VIRTUAL_PAN)), "01381234567800000000000000000000");
    assert_eq!(hex::encode_upper(acct0(PAN)), "0000111111111111");
    assert_eq!(hex::encode_upper(acct0(VIRTUAL_PAN)), "0000013812345678");
    let f0 = pin_field(PinBlockFormat::Iso0, "1234");
    assert_eq!(hex::encode_upper(&f0), "041234FFFFFFFFFF");
    assert_eq!(hex::encode_upper(xor(&f0, &acct0(PAN))), F0_PAN_CLEAR);
    assert_eq!(hex::encode_upper(xor(&f0, &acct0(VIRTUAL_PAN))), F0_PHONE_CLEAR);
    assert_eq!(hex::encode_upper(xor(&f0, &acct0(DUKPT_PAN))), DUKPT_CLEAR);
    let field = h(F4_PIN_FIELD);
    assert_eq!(hex::encode_upper(encipher_field(PinBlockFormat::Iso4, &field, Some(PAN), Z_AES)), F4_PAN_BLOCK);
    assert_eq!(hex::encode_upper(encipher_field(PinBlockFormat::Iso4, &field, Some(VIRTUAL_PAN), Z_AES)), F4_PHONE_BLOCK);
    assert_eq!(decode(PinBlockFormat::Iso4, &h(F4_PAN_BLOCK), Some(PAN), Z_AES), Ok("1234".into()));
    assert_eq!(tdes_kcv(&h(TDES_ZPK)), "08D7B4");
    assert_eq!(aes_kcv(&h("2B7E151628AED2A6ABF7158809CF4F3C")), "7AD386");
    for f in FORMATS {
        for pin in ["0000", "98765", "123456789012"] {
            let b = encode(f, pin, Some(PAN), if f == PinBlockFormat::Iso4 { Z_AES } else { Z_TDES });
            assert_eq!(decode(f, &b, Some(PAN), if f == PinBlockFormat::Iso4 { Z_AES } else { Z_TDES }), Ok(pin.to_string()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iso_format_0_and_4_vectors_through_the_token() {
    vector_keys();
    assert_eq!(meta("zpk.vec-tdes").kcv, "08D7B4", "TDES zone key KCV (X9.24-1 A.2)");
    assert_eq!(meta("zpk.vec-aes").kcv, aes_kcv(&h(AES_ZPK)));
    let srv = start("pin-vectors").await;
    let switch = srv.clients("switch").await;

    // Format 4 known answers -> format 0 under the TDES zone key, decrypted in software.
    let cases = [
        (F4_PAN_BLOCK, pan(PAN), F0_PAN_CLEAR, "PAN"),
        (F4_PHONE_BLOCK, phone(PHONE), F0_PHONE_CLEAR, "phone"),
        (F4_PHONE_BLOCK, phone(PHONE_E164), F0_PHONE_CLEAR, "phone +86"),
        (F4_PHONE_BLOCK, pan(VIRTUAL_PAN), F0_PHONE_CLEAR, "virtual PAN"),
    ];
    for (block, account, clear0, what) in cases.clone() {
        let pin = epin(&h(block), PinBlockFormat::Iso4, account, zone_src(Z_AES.name));
        let r = translate_ok(&switch, treq(pin, Z_TDES.name, PinBlockFormat::Iso0, None), what).await;
        assert_eq!(r.format, PinBlockFormat::Iso0 as i32, "{what}");
        assert_eq!(r.block.len(), 8, "{what}");
        assert_eq!(hex::encode_upper(tdes(&h(TDES_ZPK), Mode::Decrypt, &r.block)), clear0, "{what}: 4 -> 0");
        assert_eq!(key_of(&r.source_key), ("zpk.vec-aes".into(), 1), "{what}");
        assert_eq!(key_of(&r.destination_key), ("zpk.vec-tdes".into(), 1), "{what}");
        assert!(!r.account_changed, "{what}");
    }

    // The other way: the clear vector blocks enciphered in software, sent as format 0.
    for (_, account, clear0, what) in cases {
        let digits = match account.as_ref().and_then(|a| a.kind.clone()) {
            Some(account::Kind::Pan(p)) => p,
            Some(account::Kind::Phone(p)) => virtual_pan(&p),
            None => unreachable!(),
        };
        let block0 = tdes(&h(TDES_ZPK), Mode::Encrypt, &h(clear0));
        let pin = epin(&block0, PinBlockFormat::Iso0, account.clone(), zone_src(Z_TDES.name));
        let a = translate_ok(&switch, treq(pin.clone(), Z_AES.name, PinBlockFormat::Iso4, None), what).await;
        let b = translate_ok(&switch, treq(pin.clone(), Z_AES.name, PinBlockFormat::Iso4, None), what).await;
        assert_eq!(a.block.len(), 16);
        for r in [&a, &b] {
            let field = clear_field(PinBlockFormat::Iso4, &r.block, Some(&digits), Z_AES);
            assert_eq!(hex::encode_upper(&field[..8]), "441234AAAAAAAAAA", "{what}: 0 -> 4 PIN field");
        }
        assert_ne!(a.block, b.block, "{what}: format 4 blocks carry fresh random fill");
        // Format 0 is deterministic: zone to zone gives exactly the vector's clear block.
        let r = translate_ok(&switch, treq(pin, Z_TDES_B.name, PinBlockFormat::Iso0, None), what).await;
        assert_eq!(hex::encode_upper(tdes(&h(TDES_ZPK_B), Mode::Decrypt, &r.block)), clear0, "{what}: 0 -> 0");
        // Format 4 zone to zone.
        let pin4 = epin(&a.block, PinBlockFormat::Iso4, account, zone_src(Z_AES.name));
        let r = translate_ok(&switch, treq(pin4, Z_AES_B.name, PinBlockFormat::Iso4, None), what).await;
        let field = clear_field(PinBlockFormat::Iso4, &r.block, Some(&digits), Z_AES_B);
        assert_eq!(hex::encode_upper(&field[..8]), "441234AAAAAAAAAA", "{what}: 4 -> 4");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tdes_dukpt_vectors_and_ipek_export() {
    vector_keys();
    let srv = start("pin-tdes-dukpt").await;
    // The ceremony stored the C0C0 variant companion at import.
    let cat = srv.hsm.catalogue();
    let variant = cat.get("bdk.vec-tdes.variant", 1).expect("bdk.vec-tdes.variant is in the token");
    assert_eq!((variant.meta.class, variant.meta.algorithm), (KeyClass::B0, Algorithm::Tdes2));
    let mut v = h(TDES_BDK);
    for (i, b) in v.iter_mut().enumerate() {
        if i % 8 < 4 {
            *b ^= 0xC0;
        }
    }
    assert_eq!(variant.meta.kcv, tdes_kcv(&v), "the companion is BDK xor C0C0C0C000000000C0C0C0C000000000");
    drop(cat);

    let hub = srv.clients("hub").await;
    let vectors = [
        ("FFFF9876543210E00001", "1B9C1845EB993A7A"),
        ("FFFF9876543210E00002", "10A01C8D02C69107"),
        ("FFFF9876543210E00003", "18DC07B94797B466"),
        ("FFFF9876543210EFF800", "33365F5CC6F23C35"),
    ];
    for (ksn, block) in vectors {
        let pin = epin(&h(block), PinBlockFormat::Iso0, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes", &h(ksn)));
        let r = translate_ok(&hub, treq(pin.clone(), Z_TDES.name, PinBlockFormat::Iso0, None), ksn).await;
        assert_eq!(hex::encode_upper(tdes(&h(TDES_ZPK), Mode::Decrypt, &r.block)), DUKPT_CLEAR, "KSN {ksn}");
        assert_eq!(key_of(&r.source_key), ("bdk.vec-tdes".into(), 1), "KSN {ksn}");
        assert!(!r.account_changed);
        // Across key families: TDES DUKPT -> AES zone, format 4.
        let r = translate_ok(&hub, treq(pin, Z_AES.name, PinBlockFormat::Iso4, None), ksn).await;
        assert_eq!(decode(PinBlockFormat::Iso4, &r.block, Some(DUKPT_PAN), Z_AES), Ok("1234".into()), "KSN {ksn} -> format 4");
    }
    // The same block under another KSN is not the same PIN.
    let pin = epin(&h(vectors[0].1), PinBlockFormat::Iso0, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes", &h(vectors[1].0)));
    expect_code(translate(&hub, treq(pin, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::InvalidArgument, &[BAD_BLOCK], "wrong KSN");

    // Invalid TDES KSNs: zero counter, 11 one-bits, wrong lengths.
    for (ksn, what) in [
        ("FFFF9876543210E00000", "zero counter"),
        ("FFFF9876543210E007FF", "11 one-bits"),
        ("FFFF9876543210E001", "9 bytes"),
        ("FFFF9876543210E0000001", "11 bytes"),
    ] {
        let pin = epin(&h(vectors[0].1), PinBlockFormat::Iso0, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes", &h(ksn)));
        let s = expect_code(
            translate(&hub, treq(pin, Z_TDES.name, PinBlockFormat::Iso0, None)).await,
            Code::InvalidArgument,
            &["pin.source.dukpt.ksn"],
            what,
        );
        assert!(!s.message().to_uppercase().contains(&ksn[..12]), "{what}: the message echoes the KSN");
    }
    // A TDES DUKPT terminal sends 8-byte blocks; the variant companion is no BDK.
    let pin = epin(&[0u8; 16], PinBlockFormat::Iso4, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes", &h(vectors[0].0)));
    expect_code(translate(&hub, treq(pin, Z_AES.name, PinBlockFormat::Iso4, None)).await, Code::InvalidArgument, &["pin.format"], "format 4 from TDES DUKPT");
    let pin = epin(&h(vectors[0].1), PinBlockFormat::Iso0, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes.variant", &h(vectors[0].0)));
    expect_code(
        translate(&hub, treq(pin, Z_TDES.name, PinBlockFormat::Iso0, None)).await,
        Code::InvalidArgument,
        &["pin.source.dukpt.bdk_name"],
        "variant named as BDK",
    );

    // IPEK export: the kif client, initial KSN, under the known K0 KEK.
    let kif = srv.clients("kif").await;
    let r = kif
        .pin
        .clone()
        .export_terminal_key(ExportTerminalKeyRequest {
            bdk_name: "bdk.vec-tdes".into(),
            initial_ksn: h("FFFF9876543210E00000"),
            kek_name: "tmk.vec".into(),
        })
        .await
        .expect("ExportTerminalKey (TDES)")
        .into_inner();
    let ipek = aes_unwrap(&h(TMK), &r.wrapped_key);
    assert_eq!(hex::encode_upper(&ipek), "6AC292FAA1315B4D858AB3A3D7D5933A", "IPEK (X9.24-1 A.4)");
    assert_eq!(r.kcv, tdes_kcv(&ipek), "KCV of the IPEK");
    assert_eq!(key_of(&r.bdk), ("bdk.vec-tdes".into(), 1));
    assert_eq!(key_of(&r.kek), ("tmk.vec".into(), 1));
    // The wrapped key does not unwrap under another KEK.
    let other = openssl::aes::AesKey::new_decrypt(&h(AES_ZPK_B)).unwrap();
    let mut out = vec![0u8; r.wrapped_key.len() - 8];
    assert!(openssl::aes::unwrap_key(&other, None, &mut out, &r.wrapped_key).is_err());
    srv.stop().await;
}

/// One AES-128 DUKPT PIN block built in software for counter `counter` (for KSNs a
/// simulated terminal would not reach quickly).
fn aes_dukpt_block(ik: &[u8], id: [u8; 8], counter: u32, pin: &str, acct: &str) -> ([u8; 12], Vec<u8>) {
    let mut ksn = [0u8; 12];
    ksn[..8].copy_from_slice(&id);
    ksn[8..].copy_from_slice(&counter.to_be_bytes());
    let k = AesKsn::parse(&ksn).unwrap();
    let tk = dukpt::aes_transaction_key(ik, AesKeyType::Aes128, &k).unwrap();
    let wk = dukpt::aes_working_key(&tk, AesKeyType::Aes128, KeyUsage::PinEncryption, &k).unwrap();
    let field = pin_field(PinBlockFormat::Iso4, pin);
    let z = |mode, d: &[u8]| aes(&wk, mode, d);
    let block = z(Mode::Encrypt, &xor(&z(Mode::Encrypt, &field), &acct4(acct)));
    (ksn, block)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_dukpt_export_and_translation() {
    vector_keys();
    let srv = start("pin-aes-dukpt").await;
    let kif = srv.clients("kif").await;
    let hub = srv.clients("hub").await;
    let id: [u8; 8] = h("1234567890123456").try_into().unwrap();
    let initial_ksn = h("123456789012345600000000");

    // Initial key: exported for the key-injection facility, unwrapped in software.
    let r = kif
        .pin
        .clone()
        .export_terminal_key(ExportTerminalKeyRequest { bdk_name: "bdk.vec-aes".into(), initial_ksn: initial_ksn.clone(), kek_name: "tmk.vec".into() })
        .await
        .expect("ExportTerminalKey (AES-128)")
        .into_inner();
    let ik = aes_unwrap(&h(TMK), &r.wrapped_key);
    assert_eq!(hex::encode_upper(&ik), "1273671EA26AC29AFA4D1084127652A1", "X9.24-3 initial key");
    assert_eq!(r.kcv, aes_kcv(&ik));
    // Transaction keys of the supplement (the pure reference this test builds blocks with).
    for (counter, tk) in [
        (1u32, "4F21B565BAD9835E112B6465635EAE44"),
        (2, "2F34D68DE10F68D38091A73B9E7C437C"),
        (3, "031504E530365CF81264238540518318"),
        (0xFFFF0000, "F6BA59389BD14A9855BE9727E7C52E3C"),
    ] {
        let mut ksn = initial_ksn.clone();
        ksn[8..].copy_from_slice(&counter.to_be_bytes());
        let k = AesKsn::parse(&ksn).unwrap();
        assert_eq!(hex::encode_upper(&*dukpt::aes_transaction_key(&ik, AesKeyType::Aes128, &k).unwrap()), tk, "counter {counter:08X}");
    }

    // A terminal injected with that key: consecutive KSNs, round-tripped through the token.
    let mut term = Terminal::inject(&h(TMK), &r.wrapped_key, &r.kcv, &initial_ksn).expect("inject the terminal");
    let acct = keyward::crypto::pin::Account::from_pan(PAN).unwrap();
    let pins = ["1234", "98765", "555555", "1029384", "00000000", "123456789012"];
    for (i, pin) in pins.iter().enumerate() {
        let (ksn, block) = term.pin_block(pin, &acct).expect("terminal PIN block");
        assert_eq!(u32::from_be_bytes(ksn[8..].try_into().unwrap()), i as u32 + 1, "consecutive counters");
        let p = epin(&block, PinBlockFormat::Iso4, pan(PAN), dukpt_src("bdk.vec-aes", &ksn));
        let r = translate_ok(&hub, treq(p.clone(), Z_AES.name, PinBlockFormat::Iso4, None), pin).await;
        assert_eq!(decode(PinBlockFormat::Iso4, &r.block, Some(PAN), Z_AES), Ok(pin.to_string()), "counter {}", i + 1);
        assert_eq!(key_of(&r.source_key), ("bdk.vec-aes".into(), 1));
        let r = translate_ok(&hub, treq(p, Z_TDES.name, PinBlockFormat::Iso0, None), pin).await;
        assert_eq!(decode(PinBlockFormat::Iso0, &r.block, Some(PAN), Z_TDES), Ok(pin.to_string()), "counter {} -> format 0", i + 1);
    }

    // A jump far ahead (16 one-bits, the most allowed), then back, then another
    // terminal of the same BDK in between: the cached derivation path must follow.
    let other_id: [u8; 8] = h("FEDCBA0987654321").try_into().unwrap();
    let other_ik = dukpt::aes_initial_key(&h(AES_BDK), AesKeyType::Aes128, &other_id).unwrap();
    for (ik, id, counter, pin) in [
        (&ik[..], id, 0xFFFF0000u32, "8642"),
        (&ik[..], id, 0x0001FFFE, "97531"),
        (&other_ik[..], other_id, 5, "246810"),
        (&ik[..], id, 7, "13579"),
        (&other_ik[..], other_id, 0x80000000, "11112222"),
        (&ik[..], id, 0xFFFF0000, "4444"),
    ] {
        let (ksn, block) = aes_dukpt_block(ik, id, counter, pin, PAN);
        let p = epin(&block, PinBlockFormat::Iso4, pan(PAN), dukpt_src("bdk.vec-aes", &ksn));
        let r = translate_ok(&hub, treq(p, Z_AES_B.name, PinBlockFormat::Iso4, None), &format!("counter {counter:08X}")).await;
        assert_eq!(decode(PinBlockFormat::Iso4, &r.block, Some(PAN), Z_AES_B), Ok(pin.to_string()), "counter {counter:08X}");
    }

    // Invalid KSNs are refused before any token work, naming the field.
    let (_, good_block) = aes_dukpt_block(&ik, id, 1, "1234", PAN);
    for (ksn, what) in [
        ("123456789012345600000000", "zero counter"),
        ("12345678901234560001FFFF", "17 one-bits"),
        ("1234567890123456FFFFFFFF", "32 one-bits"),
        ("12345678901234560001", "10 bytes"),
        ("12345678901234560000000101", "13 bytes"),
        ("", "empty"),
    ] {
        let p = epin(&good_block, PinBlockFormat::Iso4, pan(PAN), dukpt_src("bdk.vec-aes", &h(ksn)));
        let s = expect_code(
            translate(&hub, treq(p, Z_AES.name, PinBlockFormat::Iso4, None)).await,
            Code::InvalidArgument,
            &["pin.source.dukpt.ksn"],
            what,
        );
        if !ksn.is_empty() {
            assert!(!s.message().to_uppercase().contains(&ksn[..12]), "{what}: the message echoes the KSN");
        }
    }
    // AES DUKPT terminals send format 4.
    let p = epin(&good_block[..8], PinBlockFormat::Iso0, pan(PAN), dukpt_src("bdk.vec-aes", &h("123456789012345600000001")));
    expect_code(translate(&hub, treq(p, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::InvalidArgument, &["pin.format"], "format 0 from AES DUKPT");

    // AES-256 BDK: a terminal loaded from the known BDK; export matches the software key.
    let bdk256 = h(AES256_BDK);
    let id256: [u8; 8] = h("0102030405060708").try_into().unwrap();
    let mut ksn256 = id256.to_vec();
    ksn256.extend_from_slice(&[0u8; 4]);
    let r = kif
        .pin
        .clone()
        .export_terminal_key(ExportTerminalKeyRequest { bdk_name: "bdk.vec-aes256".into(), initial_ksn: ksn256.clone(), kek_name: "tmk.vec".into() })
        .await
        .expect("ExportTerminalKey (AES-256)")
        .into_inner();
    let ik256 = aes_unwrap(&h(TMK), &r.wrapped_key);
    assert_eq!(ik256.len(), 32);
    assert_eq!(ik256, dukpt::aes_initial_key(&bdk256, AesKeyType::Aes256, &id256).unwrap().to_vec());
    assert_eq!(r.kcv, aes_kcv(&ik256));
    let mut injected = Terminal::inject(&h(TMK), &r.wrapped_key, &r.kcv, &ksn256).expect("inject an AES-256 terminal");
    let mut direct = Terminal::from_bdk(&bdk256, id256).expect("terminal from the AES-256 BDK");
    for pin in ["2580", "147258369", "0123456789"] {
        for term in [&mut injected, &mut direct] {
            let (ksn, block) = term.pin_block(pin, &acct).expect("PIN block");
            let p = epin(&block, PinBlockFormat::Iso4, pan(PAN), dukpt_src("bdk.vec-aes256", &ksn));
            let r = translate_ok(&hub, treq(p, Z_AES.name, PinBlockFormat::Iso4, None), pin).await;
            assert_eq!(decode(PinBlockFormat::Iso4, &r.block, Some(PAN), Z_AES), Ok(pin.to_string()), "AES-256 DUKPT");
            assert_eq!(key_of(&r.source_key), ("bdk.vec-aes256".into(), 1));
        }
    }

    // Export refusals: a KEK kif may not use, a non-KEK, a non-BDK, roles without the RPC.
    let export = |bdk: &str, kek: &str| ExportTerminalKeyRequest { bdk_name: bdk.into(), initial_ksn: initial_ksn.clone(), kek_name: kek.into() };
    expect_code(kif.pin.clone().export_terminal_key(export("bdk.vec-aes", "kek.vec")).await, Code::PermissionDenied, &[], "kif -> kek.*");
    expect_code(hub.pin.clone().export_terminal_key(export("bdk.vec-aes", "tmk.vec")).await, Code::PermissionDenied, &[], "hub -> Export");
    let admin = srv.clients("admin").await;
    expect_code(admin.pin.clone().export_terminal_key(export("zpk.vec-aes", "tmk.vec")).await, Code::FailedPrecondition, &[], "zone key as BDK");
    expect_code(admin.pin.clone().export_terminal_key(export("bdk.vec-aes", "zpk.vec-aes")).await, Code::FailedPrecondition, &[], "zone key as KEK");
    expect_code(
        kif.pin.clone().export_terminal_key(ExportTerminalKeyRequest { bdk_name: "bdk.vec-aes".into(), initial_ksn: h("1234567890123456"), kek_name: "tmk.vec".into() }).await,
        Code::InvalidArgument,
        &["initial_ksn"],
        "8-byte initial KSN",
    );
    srv.stop().await;
}

/// Every source format to every destination format, same account and changed
/// account, round-tripped in software.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translation_across_formats_and_accounts() {
    vector_keys();
    let srv = start("pin-matrix").await;
    let switch = srv.clients("switch").await;
    let hub = srv.clients("hub").await;
    let admin = srv.clients("admin").await;
    let src_zone = |f| if f == PinBlockFormat::Iso4 { Z_AES } else { Z_TDES };
    let dst_zone = |f| if f == PinBlockFormat::Iso4 { Z_AES_B } else { Z_TDES_B };
    let other_pan = "5522334455667788";
    let bank = "6222021234567890123";
    let pins = ["4821", "90210", "314159", "2718281", "16180339", "141421356", "1732050807", "22360679774", "264575131106"];
    let mut n = 0usize;
    for src in FORMATS {
        for dst in FORMATS {
            let pin = pins[n % pins.len()];
            n += 1;
            let what = format!("{src:?} -> {dst:?}");
            let (sz, dz) = (src_zone(src), dst_zone(dst));
            if src == PinBlockFormat::Iso1 {
                let p = epin(&encode(src, pin, None, sz), src, None, zone_src(sz.name));
                if dst == PinBlockFormat::Iso1 {
                    let r = translate_ok(&switch, treq(p, dz.name, dst, None), &what).await;
                    assert_eq!(decode(dst, &r.block, None, dz), Ok(pin.to_string()), "{what}");
                    assert!(!r.account_changed);
                } else {
                    // No account in the source: binding it to one is the account change's
                    // permission; the destination account must be given, and adding one is
                    // not reported as a change of account.
                    for c in [&switch, &admin] {
                        expect_code(translate(c, treq(p.clone(), dz.name, dst, pan(PAN))).await, Code::PermissionDenied, &["pin.change-account", "format 1"], &what);
                    }
                    expect_code(translate(&hub, treq(p.clone(), dz.name, dst, None)).await, Code::InvalidArgument, &["destination_account"], &what);
                    for (acct, digits) in [(pan(PAN), PAN.to_string()), (phone(PHONE), VIRTUAL_PAN.to_string())] {
                        let r = translate_ok(&hub, treq(p.clone(), dz.name, dst, acct), &what).await;
                        assert_eq!(decode(dst, &r.block, Some(&digits), dz), Ok(pin.to_string()), "{what} ({digits})");
                        assert!(!r.account_changed, "{what}");
                        assert_eq!(r.format, dst as i32);
                    }
                }
                continue;
            }
            for (src_acct, src_digits, new_acct, new_digits) in
                [(pan(PAN), PAN, pan(other_pan), other_pan), (phone(PHONE), VIRTUAL_PAN, pan(bank), bank)]
            {
                let p = epin(&encode(src, pin, Some(src_digits), sz), src, src_acct.clone(), zone_src(sz.name));
                if dst == PinBlockFormat::Iso1 {
                    for c in [&switch, &hub, &admin] {
                        expect_code(translate(c, treq(p.clone(), dz.name, dst, None)).await, Code::InvalidArgument, &["destination_format"], &what);
                    }
                    continue;
                }
                // Same account: any role with TranslatePin, except that a format 3 block
                // leaves its format only with the account change's permission.
                let same_client = if src == PinBlockFormat::Iso3 && dst != src {
                    for c in [&switch, &admin] {
                        expect_code(translate(c, treq(p.clone(), dz.name, dst, None)).await, Code::PermissionDenied, &["pin.change-account", "format 3"], &what);
                    }
                    &hub
                } else {
                    &switch
                };
                let r = translate_ok(same_client, treq(p.clone(), dz.name, dst, None), &what).await;
                assert_eq!(decode(dst, &r.block, Some(src_digits), dz), Ok(pin.to_string()), "{what}");
                assert!(!r.account_changed, "{what}");
                assert_eq!(r.format, dst as i32, "{what}");
                assert_eq!(key_of(&r.destination_key), (dz.name.to_string(), 1));
                // The same account given explicitly (another form of the phone number) is no change.
                let same = if src_digits == PAN { pan(PAN) } else { phone(PHONE_E164) };
                let r = translate_ok(same_client, treq(p.clone(), dz.name, dst, same), &what).await;
                assert!(!r.account_changed, "{what}: same account given");
                assert_eq!(decode(dst, &r.block, Some(src_digits), dz), Ok(pin.to_string()), "{what}");
                // Another account: only with the permission.
                for c in [&switch, &admin] {
                    expect_code(
                        translate(c, treq(p.clone(), dz.name, dst, new_acct.clone())).await,
                        Code::PermissionDenied,
                        &["pin.change-account"],
                        &format!("{what}: account change without the permission"),
                    );
                }
                let r = translate_ok(&hub, treq(p.clone(), dz.name, dst, new_acct.clone()), &what).await;
                assert!(r.account_changed, "{what}: account change");
                assert_eq!(decode(dst, &r.block, Some(new_digits), dz), Ok(pin.to_string()), "{what}: new account");
                assert_ne!(decode(dst, &r.block, Some(src_digits), dz), Ok(pin.to_string()), "{what}: still bound to the old account");
            }
        }
    }

    // Format and key family must go together, on both sides.
    let p0 = zpin(PinBlockFormat::Iso0, "1234", PAN, Z_TDES);
    let p4 = zpin(PinBlockFormat::Iso4, "1234", PAN, Z_AES);
    let mut p4_tdes = p4.clone();
    p4_tdes.source = zone_src(Z_TDES.name);
    let mut p0_aes = p0.clone();
    p0_aes.source = zone_src(Z_AES.name);
    for (req, field, what) in [
        (treq(p4_tdes, Z_AES.name, PinBlockFormat::Iso4, None), "pin.format", "format 4 under a TDES key"),
        (treq(p0_aes, Z_TDES.name, PinBlockFormat::Iso0, None), "pin.format", "format 0 under an AES key"),
        (treq(p0.clone(), Z_TDES.name, PinBlockFormat::Iso4, None), "destination_format", "format 4 to a TDES key"),
        (treq(p4.clone(), Z_AES.name, PinBlockFormat::Iso0, None), "destination_format", "format 0 to an AES key"),
        (treq(p4.clone(), Z_AES.name, PinBlockFormat::Iso3, None), "destination_format", "format 3 to an AES key"),
        (treq(p0.clone(), Z_TDES.name, PinBlockFormat::Unspecified, None), "destination_format", "no destination format"),
        (treq(epin(&p0.block, PinBlockFormat::Unspecified, pan(PAN), zone_src(Z_TDES.name)), Z_TDES.name, PinBlockFormat::Iso0, None), "pin.format", "no source format"),
        (treq(epin(&p0.block, PinBlockFormat::Iso0, None, zone_src(Z_TDES.name)), Z_TDES.name, PinBlockFormat::Iso0, None), "pin.account", "format 0 without account"),
        (treq(epin(&p0.block, PinBlockFormat::Iso0, pan("41111111111"), zone_src(Z_TDES.name)), Z_TDES.name, PinBlockFormat::Iso0, None), "pin.account", "11-digit PAN"),
        (treq(epin(&p0.block, PinBlockFormat::Iso0, phone("+4413812345678"), zone_src(Z_TDES.name)), Z_TDES.name, PinBlockFormat::Iso0, None), "pin.account", "foreign phone"),
        (treq(p0.clone(), Z_TDES.name, PinBlockFormat::Iso0, pan("4111x11111111111")), "destination_account", "bad destination account"),
        (treq(epin(&p0.block, PinBlockFormat::Iso0, pan(PAN), None), Z_TDES.name, PinBlockFormat::Iso0, None), "pin.source", "no source"),
        (treq(p0.clone(), "", PinBlockFormat::Iso0, None), "destination_key", "no destination key"),
    ] {
        let s = expect_code(translate(&hub, req).await, Code::InvalidArgument, &[field], what);
        assert!(!s.message().contains(PAN) && !s.message().contains("1234"), "{what}: {:?}", s.message());
    }
    let mut missing = treq(p0.clone(), Z_TDES.name, PinBlockFormat::Iso0, None);
    missing.pin = None;
    expect_code(translate(&hub, missing).await, Code::InvalidArgument, &["pin"], "no pin");
    expect_code(translate(&hub, treq(p0.clone(), "zpk.nosuch", PinBlockFormat::Iso0, None)).await, Code::NotFound, &["zpk.nosuch"], "unknown destination");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pin_blocks_get_one_answer() {
    vector_keys();
    // Many failing blocks from one client: the oracle lock is out of the way here.
    let srv = start_with("pin-malformed", |c| c.pin.max_decode_failures = 1000).await;
    let switch = srv.clients("switch").await;
    let hub = srv.clients("hub").await;
    let f0 = |n: &[u8]| xor(&pack(n), &acct0(PAN));
    let digits12: Vec<u8> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3];
    let mut len13 = vec![0x0, 0xD];
    len13.extend_from_slice(&digits12);
    len13.push(0xF);
    let mut len13_4 = vec![0x4, 0xD];
    len13_4.extend_from_slice(&digits12);
    len13_4.push(0xA);
    let tail = rand_bytes(8);
    let f4 = |n: &[u8]| {
        let mut v = pack(n);
        v.extend_from_slice(&tail);
        v
    };
    // Clear fields that do not decode, and how they are enciphered.
    let cases: Vec<(PinBlockFormat, Vec<u8>, &str)> = vec![
        (PinBlockFormat::Iso0, f0(&[1, 4, 1, 2, 3, 4, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF]), "format 0: control nibble 1"),
        (PinBlockFormat::Iso0, f0(&[2, 4, 1, 2, 3, 4, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF]), "format 0: control nibble 2"),
        (PinBlockFormat::Iso0, f0(&[0, 3, 1, 2, 3, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF]), "format 0: PIN length 3"),
        (PinBlockFormat::Iso0, f0(&len13), "format 0: PIN length 13"),
        (PinBlockFormat::Iso0, f0(&[0, 4, 1, 2, 0xA, 4, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF]), "format 0: non-digit PIN"),
        (PinBlockFormat::Iso0, f0(&[0, 4, 1, 2, 3, 4, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xE]), "format 0: bad fill (E)"),
        (PinBlockFormat::Iso0, f0(&[0, 4, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "format 0: zero fill"),
        (PinBlockFormat::Iso3, f0(&[3, 4, 1, 2, 3, 4, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 5, 0xA, 0xB, 0xC]), "format 3: digit in the fill"),
        (PinBlockFormat::Iso3, f0(&[0, 4, 1, 2, 3, 4, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0xA, 0xA, 0xB, 0xC]), "format 3: control nibble 0"),
        (PinBlockFormat::Iso1, pack(&[0, 4, 1, 2, 3, 4, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 5, 0xA, 0xB, 0xC]), "format 1: control nibble 0"),
        (PinBlockFormat::Iso4, f4(&[3, 4, 1, 2, 3, 4, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA]), "format 4: control nibble 3"),
        (PinBlockFormat::Iso4, f4(&[4, 3, 1, 2, 3, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA]), "format 4: PIN length 3"),
        (PinBlockFormat::Iso4, f4(&len13_4), "format 4: PIN length 13"),
        (PinBlockFormat::Iso4, f4(&[4, 4, 1, 0xC, 3, 4, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA]), "format 4: non-digit PIN"),
        (PinBlockFormat::Iso4, f4(&[4, 4, 1, 2, 3, 4, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xA, 0xB]), "format 4: bad fill (B)"),
        (PinBlockFormat::Iso4, f4(&[4, 4, 1, 2, 3, 4, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF, 0xF]), "format 4: format 0 fill"),
    ];
    // A same-format translation of format 0 or 3 checks only what the account does not
    // touch (control nibble, length, first two digits) and re-enciphers the clear block
    // as it was: these reach the destination unchanged, for it to refuse. Translated
    // with an account change (decoded with the account), they are refused here.
    let passes_same_format = ["format 0: non-digit PIN", "format 0: bad fill (E)", "format 0: zero fill", "format 3: digit in the fill"];
    let mut requests: Vec<(TranslatePinRequest, String)> = Vec::new();
    for (f, clear, what) in &cases {
        if passes_same_format.contains(what) {
            let block = Z_TDES.enc(clear);
            let p = epin(&block, *f, pan(PAN), zone_src(Z_TDES.name));
            let r = translate_ok(&switch, treq(p.clone(), Z_TDES_B.name, *f, None), what).await;
            assert_eq!(Z_TDES_B.dec(&r.block), *clear, "{what}: the clear block changed");
            requests.push((treq(p, Z_TDES_B.name, *f, pan("5522334455667788")), format!("{what}, account change")));
            continue;
        }
        let z = if *f == PinBlockFormat::Iso4 { Z_AES } else { Z_TDES };
        let block = match f {
            PinBlockFormat::Iso4 => z.enc(&xor(&z.enc(clear), &acct4(PAN))),
            _ => z.enc(clear),
        };
        let account = if *f == PinBlockFormat::Iso1 { None } else { pan(PAN) };
        let dest = if *f == PinBlockFormat::Iso4 { Z_AES_B } else { Z_TDES_B };
        let df = if *f == PinBlockFormat::Iso1 { PinBlockFormat::Iso1 } else { *f };
        requests.push((treq(epin(&block, *f, account, zone_src(z.name)), dest.name, df, None), what.to_string()));
    }
    // Wrong block lengths (the block itself is never looked at).
    let good0 = encode(PinBlockFormat::Iso0, "1234", Some(PAN), Z_TDES);
    let good4 = encode(PinBlockFormat::Iso4, "1234", Some(PAN), Z_AES);
    for (block, f, what) in [
        (good0[..7].to_vec(), PinBlockFormat::Iso0, "format 0: 7 bytes"),
        ([good0.clone(), vec![0]].concat(), PinBlockFormat::Iso0, "format 0: 9 bytes"),
        (good4.clone(), PinBlockFormat::Iso0, "format 0: 16 bytes"),
        (Vec::new(), PinBlockFormat::Iso0, "format 0: empty"),
        (good0.clone(), PinBlockFormat::Iso4, "format 4: 8 bytes"),
        (good4[..15].to_vec(), PinBlockFormat::Iso4, "format 4: 15 bytes"),
        ([good4.clone(), vec![0]].concat(), PinBlockFormat::Iso4, "format 4: 17 bytes"),
    ] {
        let z = if f == PinBlockFormat::Iso4 { Z_AES } else { Z_TDES };
        requests.push((treq(epin(&block, f, pan(PAN), zone_src(z.name)), z.name, f, None), what.to_string()));
    }
    // DUKPT sources: garbage under a terminal key, wrong length.
    let dk = dukpt_src("bdk.vec-aes", &h("123456789012345600000009"));
    requests.push((treq(epin(&[0u8; 16], PinBlockFormat::Iso4, pan(PAN), dk.clone()), Z_AES.name, PinBlockFormat::Iso4, None), "AES DUKPT: garbage".into()));
    requests.push((treq(epin(&[0u8; 8], PinBlockFormat::Iso4, pan(PAN), dk), Z_AES.name, PinBlockFormat::Iso4, None), "AES DUKPT: 8 bytes".into()));
    let tk = dukpt_src("bdk.vec-tdes", &h("FFFF9876543210E00001"));
    requests.push((treq(epin(&h("0000000000000000"), PinBlockFormat::Iso0, pan(DUKPT_PAN), tk), Z_TDES.name, PinBlockFormat::Iso0, None), "TDES DUKPT: garbage".into()));

    let mut answers = Vec::new();
    for (req, what) in requests {
        let client = if what.contains("DUKPT") || what.contains("account change") { &hub } else { &switch };
        let s = expect_code(translate(client, req).await, Code::InvalidArgument, &[], &what);
        assert_eq!(s.message(), BAD_BLOCK, "{what}");
        answers.push((s.code(), s.message().to_string(), what));
    }
    assert!(answers.len() >= 25);
    assert!(answers.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 == w[1].1), "not one answer: {answers:?}");
    // The good block still translates on the same connection.
    let r = translate_ok(&switch, treq(epin(&good0, PinBlockFormat::Iso0, pan(PAN), zone_src(Z_TDES.name)), Z_TDES_B.name, PinBlockFormat::Iso0, None), "good").await;
    assert_eq!(decode(PinBlockFormat::Iso0, &r.block, Some(PAN), Z_TDES_B), Ok("1234".into()));
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// PIN verification
// ---------------------------------------------------------------------------

fn method_name(m: PinVerificationMethod) -> &'static str {
    match m {
        PinVerificationMethod::Ibm3624 => "ibm3624",
        PinVerificationMethod::VisaPvv => "pvv",
        _ => "hmac",
    }
}

struct Pv<'a> {
    activation: &'a Clients,
    hub: &'a Clients,
    method: PinVerificationMethod,
    pvk: &'a str,
    pvki: u32,
}

impl Pv<'_> {
    async fn generate(&self, pin: EncryptedPin) -> String {
        let r = self
            .activation
            .pin
            .clone()
            .generate_pin_verification_data(GeneratePinVerificationDataRequest {
                pin: Some(pin),
                method: self.method as i32,
                pvk_name: self.pvk.into(),
                pvki: self.pvki,
            })
            .await
            .unwrap_or_else(|s| panic!("{}: generate: {:?} {}", self.pvk, s.code(), s.message()))
            .into_inner();
        assert_eq!(key_of(&r.key), (self.pvk.to_string(), 1));
        r.verification_data
    }

    async fn verify(&self, pin: EncryptedPin, pvd: &str) -> bool {
        let r = self
            .hub
            .pin
            .clone()
            .verify_pin(VerifyPinRequest { pin: Some(pin), verification_data: pvd.into() })
            .await
            .unwrap_or_else(|s| panic!("{}: verify: {:?} {}", self.pvk, s.code(), s.message()))
            .into_inner();
        assert_eq!(key_of(&r.key), (self.pvk.to_string(), 1));
        r.matched
    }

    async fn change(&self, old: EncryptedPin, new: EncryptedPin, pvd: &str) -> (bool, String) {
        let r = self
            .hub
            .pin
            .clone()
            .change_pin(ChangePinRequest { old_pin: Some(old), new_pin: Some(new), verification_data: pvd.into() })
            .await
            .unwrap_or_else(|s| panic!("{}: change: {:?} {}", self.pvk, s.code(), s.message()))
            .into_inner();
        (r.matched, r.verification_data)
    }

    /// The first candidate whose verification data differs from `pvd` (the short
    /// methods can collide by chance; a collision makes "does not match" untrue).
    async fn differing(&self, candidates: &[(&str, &str)], pvd: &str) -> (String, String, String) {
        for (pin, acct) in candidates {
            let other = self.generate(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES)).await;
            if other != pvd {
                return (pin.to_string(), acct.to_string(), other);
            }
        }
        panic!("{}: every candidate has the same verification data", self.pvk);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_verification_and_change_for_each_method() {
    vector_keys();
    let srv = start("pin-verify").await;
    let activation = srv.clients("activation").await;
    let hub = srv.clients("hub").await;
    let acct = "4929387651023847";
    for (method, pvk, pvki) in [
        (PinVerificationMethod::KeywardHmac, "pvk.hub", 0u32),
        (PinVerificationMethod::Ibm3624, "pvk.ibm", 0),
        (PinVerificationMethod::VisaPvv, "pvk.visa", 1),
    ] {
        let pv = Pv { activation: &activation, hub: &hub, method, pvk, pvki };
        let pin = "4821";
        // Generated from a format 0 block; verified from a format 4 block and a DUKPT block.
        let pvd = pv.generate(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES)).await;
        let prefix = format!("kwpvd1:{}:{pvk}:1:", method_name(method));
        assert!(pvd.starts_with(&prefix), "{pvk}: {pvd}");
        if method == PinVerificationMethod::VisaPvv {
            assert_eq!(&pvd[prefix.len()..prefix.len() + 1], "1", "{pvk}: PVKI");
        }
        assert!(!pvd.contains(acct), "{pvk}: the account is in the data");
        // Deterministic: the same PIN in another format gives the same data.
        assert_eq!(pv.generate(zpin(PinBlockFormat::Iso4, pin, acct, Z_AES)).await, pvd, "{pvk}: format independence");

        assert!(pv.verify(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES), &pvd).await, "{pvk}: right PIN (format 0)");
        assert!(pv.verify(zpin(PinBlockFormat::Iso4, pin, acct, Z_AES), &pvd).await, "{pvk}: right PIN (format 4)");
        assert!(pv.verify(zpin(PinBlockFormat::Iso3, pin, acct, Z_TDES_B), &pvd).await, "{pvk}: right PIN (format 3, zone B)");
        let (tksn, tblock) = aes_dukpt_block(
            &dukpt::aes_initial_key(&h(AES_BDK), AesKeyType::Aes128, &h("0A0B0C0D0E0F1011").try_into().unwrap()).unwrap(),
            h("0A0B0C0D0E0F1011").try_into().unwrap(),
            3,
            pin,
            acct,
        );
        assert!(
            pv.verify(epin(&tblock, PinBlockFormat::Iso4, pan(acct), dukpt_src("bdk.vec-aes", &tksn)), &pvd).await,
            "{pvk}: right PIN from a DUKPT terminal"
        );

        // Wrong PIN.
        let (wrong, _, _) = pv.differing(&[("4822", acct), ("9999", acct), ("1357", acct), ("4821000", acct)], &pvd).await;
        assert!(!pv.verify(zpin(PinBlockFormat::Iso0, &wrong, acct, Z_TDES), &pvd).await, "{pvk}: wrong PIN {wrong}");
        // Data made for another account (same PIN) does not verify this account's block.
        let (_, other_acct, other_pvd) =
            pv.differing(&[(pin, "4000123412341234"), (pin, "6011000990139424"), (pin, "3530111333300000")], &pvd).await;
        assert!(!pv.verify(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES), &other_pvd).await, "{pvk}: another account's data");
        assert!(pv.verify(zpin(PinBlockFormat::Iso0, pin, &other_acct, Z_TDES), &other_pvd).await, "{pvk}: that account verifies");
        // A malformed block is a mismatch, not an error (bad fill; wrong length).
        let bad_fill = tdes(&h(TDES_ZPK), Mode::Encrypt, &xor(&h("041234FFFFFFFFFE"), &acct0(acct)));
        assert!(!pv.verify(epin(&bad_fill, PinBlockFormat::Iso0, pan(acct), zone_src(Z_TDES.name)), &pvd).await, "{pvk}: bad fill");
        let short = encode(PinBlockFormat::Iso0, pin, Some(acct), Z_TDES)[..7].to_vec();
        assert!(!pv.verify(epin(&short, PinBlockFormat::Iso0, pan(acct), zone_src(Z_TDES.name)), &pvd).await, "{pvk}: 7-byte block");

        // ChangePin: the old PIN right -> data for the new PIN, which is exactly what
        // activation would make for it.
        let (new_pin, _, new_expected) = pv.differing(&[("660099", acct), ("7315", acct), ("80808080", acct)], &pvd).await;
        let (matched, new_pvd) = pv
            .change(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES), zpin(PinBlockFormat::Iso4, &new_pin, acct, Z_AES), &pvd)
            .await;
        assert!(matched, "{pvk}: change with the right old PIN");
        assert_eq!(new_pvd, new_expected, "{pvk}: ChangePin data = GeneratePinVerificationData data");
        assert!(pv.verify(zpin(PinBlockFormat::Iso0, &new_pin, acct, Z_TDES), &new_pvd).await, "{pvk}: the new PIN verifies");
        assert!(!pv.verify(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES), &new_pvd).await, "{pvk}: the old PIN no longer verifies");
        // The old PIN wrong (or malformed) -> nothing generated.
        for (old, what) in [
            (zpin(PinBlockFormat::Iso0, &wrong, acct, Z_TDES), "wrong old PIN"),
            (epin(&bad_fill, PinBlockFormat::Iso0, pan(acct), zone_src(Z_TDES.name)), "malformed old PIN"),
        ] {
            let (matched, data) = pv.change(old, zpin(PinBlockFormat::Iso0, &new_pin, acct, Z_TDES), &pvd).await;
            assert!(!matched, "{pvk}: {what}");
            assert!(data.is_empty(), "{pvk}: {what}: data returned");
        }
        // The new PIN must be for the same account.
        expect_code(
            hub.pin
                .clone()
                .change_pin(ChangePinRequest {
                    old_pin: Some(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES)),
                    new_pin: Some(zpin(PinBlockFormat::Iso0, &new_pin, &other_acct, Z_TDES)),
                    verification_data: pvd.clone(),
                })
                .await,
            Code::InvalidArgument,
            &["new_pin.account"],
            "change to another account",
        );
    }

    // Known keys: IBM 3624 offset and Visa PVV computed in software.
    for (method, pvk, pvki, pin) in [
        (PinVerificationMethod::Ibm3624, "pvk.vec-ibm", 0u32, "4821"),
        (PinVerificationMethod::Ibm3624, "pvk.vec-ibm", 0, "905172364"),
        (PinVerificationMethod::VisaPvv, "pvk.vec-visa", 1, "4821"),
        (PinVerificationMethod::VisaPvv, "pvk.vec-visa", 6, "90517"),
    ] {
        let pv = Pv { activation: &activation, hub: &hub, method, pvk, pvki };
        let pvd = pv.generate(zpin(PinBlockFormat::Iso0, pin, acct, Z_TDES)).await;
        let expected = match method {
            PinVerificationMethod::Ibm3624 => ibm3624_offset(&h(PVK_IBM), acct, pin),
            _ => format!("{pvki}{}", visa_pvv(&h(PVK_VISA), acct, pvki as u8, pin)),
        };
        assert_eq!(pvd, format!("kwpvd1:{}:{pvk}:1:{expected}", method_name(method)), "{pvk} known answer");
        assert!(pv.verify(zpin(PinBlockFormat::Iso4, pin, acct, Z_AES), &pvd).await);
    }

    // Roles and parameters.
    let req = |pvk: &str, method: PinVerificationMethod, pvki: u32| GeneratePinVerificationDataRequest {
        pin: Some(zpin(PinBlockFormat::Iso0, "4821", acct, Z_TDES)),
        method: method as i32,
        pvk_name: pvk.into(),
        pvki,
    };
    expect_code(hub.pin.clone().generate_pin_verification_data(req("pvk.hub", PinVerificationMethod::KeywardHmac, 0)).await, Code::PermissionDenied, &[], "hub -> Generate");
    let switch = srv.clients("switch").await;
    let pvd = Pv { activation: &activation, hub: &hub, method: PinVerificationMethod::KeywardHmac, pvk: "pvk.hub", pvki: 0 }
        .generate(zpin(PinBlockFormat::Iso0, "4821", acct, Z_TDES))
        .await;
    expect_code(
        switch.pin.clone().verify_pin(VerifyPinRequest { pin: Some(zpin(PinBlockFormat::Iso0, "4821", acct, Z_TDES)), verification_data: pvd.clone() }).await,
        Code::PermissionDenied,
        &[],
        "switch -> VerifyPin",
    );
    expect_code(activation.pin.clone().generate_pin_verification_data(req("pvk.visa", PinVerificationMethod::VisaPvv, 7)).await, Code::InvalidArgument, &["pvki"], "PVKI 7");
    expect_code(activation.pin.clone().generate_pin_verification_data(req("pvk.ibm", PinVerificationMethod::Ibm3624, 1)).await, Code::InvalidArgument, &["pvki"], "PVKI for IBM");
    expect_code(activation.pin.clone().generate_pin_verification_data(req("pvk.hub", PinVerificationMethod::Ibm3624, 0)).await, Code::FailedPrecondition, &[], "V0 key for IBM 3624");
    expect_code(activation.pin.clone().generate_pin_verification_data(req("pvk.ibm", PinVerificationMethod::KeywardHmac, 0)).await, Code::FailedPrecondition, &[], "V1 key for HMAC");
    for bad in ["", "kwpvd1:hmac:pvk.hub:1", "kwpvd2:hmac:pvk.hub:1:00112233445566778899AABBCCDDEEFF", "kwpvd1:pvv:pvk.visa:1:9999"] {
        expect_code(
            hub.pin.clone().verify_pin(VerifyPinRequest { pin: Some(zpin(PinBlockFormat::Iso0, "4821", acct, Z_TDES)), verification_data: bad.into() }).await,
            Code::InvalidArgument,
            &["verification_data"],
            &format!("verification data {bad:?}"),
        );
    }
    srv.stop().await;
}

/// IBM 3624 offset, written from the method's description: validation data = the
/// 12 account digits before the check digit and FFFF, enciphered, decimalised with
/// 0123456789012345, offset = PIN - natural PIN digit by digit mod 10.
fn ibm3624_offset(pvk: &[u8], account: &str, pin: &str) -> String {
    let mut vd = acct0(account)[2..].to_vec();
    vd.extend_from_slice(&[0xFF, 0xFF]);
    let e = unpack(&tdes(pvk, Mode::Encrypt, &vd));
    pin.bytes()
        .zip(e)
        .map(|(p, n)| char::from(b'0' + ((p - b'0') + 10 - n % 10) % 10))
        .collect()
}

/// Visa PVV: TSP = 11 rightmost account digits before the check digit, PVKI, 4 PIN
/// digits; enciphered; decimal nibbles left to right, then A-F as 0-5.
fn visa_pvv(pvk: &[u8], account: &str, pvki: u8, pin: &str) -> String {
    let body = &account[..account.len() - 1];
    let mut n = digits_of(&body[body.len() - 11..]);
    n.push(pvki);
    n.extend(digits_of(&pin[..4]));
    let e = unpack(&tdes(pvk, Mode::Encrypt, &pack(&n)));
    let mut out: Vec<u8> = e.iter().copied().filter(|v| *v <= 9).take(4).collect();
    out.extend(e.iter().copied().filter(|v| *v > 9).map(|v| v - 10).take(4 - out.len()));
    out.iter().map(|d| char::from(b'0' + d)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_and_data_keys_stay_in_their_classes() {
    vector_keys();
    let srv = start("pin-classes").await;
    let hub = srv.clients("hub").await;
    let admin = srv.clients("admin").await;
    let p0 = zpin(PinBlockFormat::Iso0, "4821", PAN, Z_TDES);

    // The D0 data key as a zone key (source or destination) or as a PVK.
    let mut from_data = p0.clone();
    from_data.source = zone_src("data");
    expect_code(translate(&hub, treq(from_data, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::FailedPrecondition, &["data"], "data as source zone key");
    expect_code(translate(&hub, treq(p0.clone(), "data", PinBlockFormat::Iso0, None)).await, Code::FailedPrecondition, &["data"], "data as destination zone key");
    expect_code(
        admin
            .pin
            .clone()
            .generate_pin_verification_data(GeneratePinVerificationDataRequest {
                pin: Some(p0.clone()),
                method: PinVerificationMethod::KeywardHmac as i32,
                pvk_name: "data".into(),
                pvki: 0,
            })
            .await,
        Code::FailedPrecondition,
        &["data"],
        "data as PVK",
    );
    expect_code(
        hub.pin
            .clone()
            .verify_pin(VerifyPinRequest { pin: Some(p0.clone()), verification_data: "kwpvd1:hmac:data:1:00112233445566778899AABBCCDDEEFF".into() })
            .await,
        Code::FailedPrecondition,
        &["data"],
        "verification data naming the data key",
    );
    // Other keys of the wrong class: a BDK as zone key, a zone key as BDK, a PVK as zone key.
    let mut from_bdk = p0.clone();
    from_bdk.source = zone_src("bdk.vec-tdes");
    expect_code(translate(&hub, treq(from_bdk, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::FailedPrecondition, &[], "BDK as zone key");
    let mut from_zpk_dukpt = p0.clone();
    from_zpk_dukpt.source = dukpt_src(Z_TDES.name, &h("FFFF9876543210E00001"));
    expect_code(translate(&hub, treq(from_zpk_dukpt, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::FailedPrecondition, &[], "zone key as BDK");
    expect_code(translate(&hub, treq(p0.clone(), "pvk.hub", PinBlockFormat::Iso0, None)).await, Code::FailedPrecondition, &[], "PVK as destination");

    // PIN keys never encrypt data.
    for key in [Z_TDES.name, Z_AES.name, "zpk.switch", "zpk.bank-a", "pvk.hub", "pvk.ibm", "bdk.vec-aes"] {
        expect_code(
            hub.data.clone().encrypt(EncryptRequest { key_name: key.into(), plaintext: b"4111111111111111".to_vec(), aad: b"pin".to_vec() }).await,
            Code::FailedPrecondition,
            &[key],
            &format!("DataService.Encrypt with {key}"),
        );
    }
    // Roles: keys outside the role's patterns, RPCs outside the role.
    let switch = srv.clients("switch").await;
    let mut dukpt_pin = p0.clone();
    dukpt_pin.source = dukpt_src("bdk.vec-tdes", &h("FFFF9876543210E00001"));
    expect_code(translate(&switch, treq(dukpt_pin, Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::PermissionDenied, &[], "switch -> bdk.*");
    let kif = srv.clients("kif").await;
    expect_code(translate(&kif, treq(p0.clone(), Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::PermissionDenied, &[], "kif -> TranslatePin");
    let activation = srv.clients("activation").await;
    expect_code(translate(&activation, treq(p0.clone(), Z_TDES.name, PinBlockFormat::Iso0, None)).await, Code::PermissionDenied, &[], "activation -> TranslatePin");
    // The data key still encrypts for the hub (the refusals above were about classes).
    hub.data.clone().encrypt(EncryptRequest { key_name: "data".into(), plaintext: b"x".to_vec(), aad: b"y".to_vec() }).await.expect("D0 encrypt");
    srv.stop().await;
}


#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_holds_no_pin_block_or_account_number() {
    vector_keys();
    let srv = start("pin-audit").await;
    let hub = srv.clients("hub").await;
    let switch = srv.clients("switch").await;
    let activation = srv.clients("activation").await;
    let kif = srv.clients("kif").await;
    // Long PINs: a 4-digit PIN could occur by chance in hashes and timestamps.
    let (pin, new_pin, wrong_pin) = ("80517293", "64920381", "57302846");
    let card = "4929387651023847";
    let bank = "6222021234567890123";
    let mut secrets: Vec<String> = vec![
        pin.into(),
        new_pin.into(),
        wrong_pin.into(),
        card.into(),
        bank.into(),
        PAN.into(),
        PHONE.into(),
        PHONE_E164.into(),
        VIRTUAL_PAN.into(),
        DUKPT_PAN.into(),
        F4_PAN_BLOCK.into(),
        F4_PHONE_BLOCK.into(),
        F0_PAN_CLEAR.into(),
        F0_PHONE_CLEAR.into(),
        DUKPT_CLEAR.into(),
        "1B9C1845EB993A7A".into(),
    ];
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut count = std::collections::BTreeMap::<&str, usize>::new();

    // TranslatePin: vectors (PAN, phone -> bank account), a DUKPT block, a bad block, a refusal.
    let r = translate_ok(&switch, treq(epin(&h(F4_PAN_BLOCK), PinBlockFormat::Iso4, pan(PAN), zone_src(Z_AES.name)), Z_TDES.name, PinBlockFormat::Iso0, None), "pan").await;
    blocks.push(r.block);
    let r = translate_ok(&hub, treq(epin(&h(F4_PHONE_BLOCK), PinBlockFormat::Iso4, phone(PHONE_E164), zone_src(Z_AES.name)), Z_TDES.name, PinBlockFormat::Iso0, pan(bank)), "phone").await;
    assert!(r.account_changed);
    blocks.push(r.block);
    let r = translate_ok(&hub, treq(epin(&h(F4_PHONE_BLOCK), PinBlockFormat::Iso4, phone(PHONE), zone_src(Z_AES.name)), Z_AES_B.name, PinBlockFormat::Iso4, pan(VIRTUAL_PAN)), "phone").await;
    blocks.push(r.block);
    let r = translate_ok(&hub, treq(epin(&h("1B9C1845EB993A7A"), PinBlockFormat::Iso0, pan(DUKPT_PAN), dukpt_src("bdk.vec-tdes", &h("FFFF9876543210E00001"))), Z_TDES.name, PinBlockFormat::Iso0, None), "dukpt").await;
    blocks.push(r.block);
    let p = zpin(PinBlockFormat::Iso0, pin, card, Z_TDES);
    blocks.push(p.block.clone());
    let r = translate_ok(&hub, treq(p.clone(), Z_AES.name, PinBlockFormat::Iso4, pan(bank)), "card").await;
    blocks.push(r.block);
    expect_code(translate(&switch, treq(p.clone(), Z_TDES.name, PinBlockFormat::Iso0, pan(bank))).await, Code::PermissionDenied, &[], "switch change");
    let bad = tdes(&h(TDES_ZPK), Mode::Encrypt, &xor(&h("0480517293FFFFFE"), &acct0(card)));
    blocks.push(bad.clone());
    expect_code(translate(&switch, treq(epin(&bad, PinBlockFormat::Iso0, pan(card), zone_src(Z_TDES.name)), Z_AES.name, PinBlockFormat::Iso4, None)).await, Code::InvalidArgument, &[], "bad");
    *count.entry("TranslatePin").or_default() += 7;

    // Verification, with phone-number accounts too.
    let pv = Pv { activation: &activation, hub: &hub, method: PinVerificationMethod::KeywardHmac, pvk: "pvk.hub", pvki: 0 };
    let mut phone_pin = zpin(PinBlockFormat::Iso4, pin, VIRTUAL_PAN, Z_AES);
    phone_pin.account = phone(PHONE_E164);
    blocks.push(phone_pin.block.clone());
    let pvd = pv.generate(phone_pin.clone()).await;
    let pvd_card = pv.generate(p.clone()).await;
    *count.entry("GeneratePinVerificationData").or_default() += 2;
    assert!(pv.verify(phone_pin.clone(), &pvd).await);
    let wrong = zpin(PinBlockFormat::Iso0, wrong_pin, card, Z_TDES);
    blocks.push(wrong.block.clone());
    assert!(!pv.verify(wrong.clone(), &pvd_card).await);
    assert!(!pv.verify(epin(&bad, PinBlockFormat::Iso0, pan(card), zone_src(Z_TDES.name)), &pvd_card).await);
    *count.entry("VerifyPin").or_default() += 3;
    let newp = zpin(PinBlockFormat::Iso0, new_pin, card, Z_TDES);
    blocks.push(newp.block.clone());
    assert!(pv.change(p.clone(), newp.clone(), &pvd_card).await.0);
    assert!(!pv.change(wrong, newp, &pvd_card).await.0);
    *count.entry("ChangePin").or_default() += 2;
    let e = kif
        .pin
        .clone()
        .export_terminal_key(ExportTerminalKeyRequest { bdk_name: "bdk.vec-aes".into(), initial_ksn: h("123456789012345600000000"), kek_name: "tmk.vec".into() })
        .await
        .expect("export")
        .into_inner();
    blocks.push(e.wrapped_key);
    *count.entry("ExportTerminalKey").or_default() += 1;

    let dir = srv.audit_dir.clone();
    let hsm = srv.hsm.clone();
    srv.stop().await;
    for b in &blocks {
        secrets.push(hex::encode_upper(b));
    }
    let text = all_files_text(&dir);
    assert!(!text.is_empty());
    for s in &secrets {
        for form in [s.to_uppercase(), s.to_lowercase()] {
            assert!(!text.contains(&form), "the audit trail contains {form}");
        }
    }
    // The vectors' 4-digit PIN 1234 went through too: too short to look for in hashes,
    // signatures, request ids and timestamps, so look in every other field.
    let all = audit_lines(&dir);
    assert!(!all.is_empty());
    for l in &all {
        let mut rest = l.as_object().expect("a JSON object").clone();
        for random in ["ts", "seq", "prev_hash", "hash", "seal", "head", "sig", "request_id", "latency_us"] {
            rest.remove(random);
        }
        let rest = serde_json::Value::Object(rest).to_string();
        assert!(!rest.contains("1234"), "an audit line holds 1234: {rest}");
    }
    // The calls are there.
    let lines = rpc_lines(&dir);
    for (rpc, n) in count {
        let got = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with(&format!("PinService/{rpc}"))).count();
        assert_eq!(got, n, "audit lines of {rpc}");
    }
    let t: Vec<_> = lines.iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("/TranslatePin")).collect();
    assert!(t.iter().any(|l| l["code"] == "PERMISSION_DENIED" && l["outcome"] == "denied"));
    assert!(t.iter().any(|l| l["code"] == "INVALID_ARGUMENT"));
    assert!(t.iter().any(|l| l["keys"].as_array().is_some_and(|k| k.iter().any(|k| k == "bdk.vec-tdes/v1"))));
    // And the trail with these lines is intact.
    verify_trail(&dir, &hsm);
}

/// pin.proto: ExportTerminalKey takes the *initial* KSN (zero counter), and a format 1
/// block's account is never taken as a translation's destination account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_input_contracts_are_enforced() {
    vector_keys();
    let srv = start("pin-contracts").await;
    let kif = srv.clients("kif").await;
    for (bdk, ksn) in [("bdk.vec-aes", "123456789012345600000005"), ("bdk.vec-tdes", "FFFF9876543210E00005")] {
        expect_code(
            kif.pin
                .clone()
                .export_terminal_key(ExportTerminalKeyRequest { bdk_name: bdk.into(), initial_ksn: h(ksn), kek_name: "tmk.vec".into() })
                .await,
            Code::InvalidArgument,
            &["initial_ksn"],
            &format!("{bdk}: initial KSN with counter 5"),
        );
    }
    let hub = srv.clients("hub").await;
    let b = encode(PinBlockFormat::Iso1, "1234", None, Z_TDES);
    expect_code(
        translate(&hub, treq(epin(&b, PinBlockFormat::Iso1, pan(PAN), zone_src(Z_TDES.name)), Z_TDES.name, PinBlockFormat::Iso0, None)).await,
        Code::InvalidArgument,
        &["destination_account"],
        "format 1 source with an account but no destination account",
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// The PIN-block oracle (issue 11): probing the stated account
// ---------------------------------------------------------------------------

/// Everything the appliance logs in this test binary (the alarm is an error-level line).
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures the process's log from here on (once per binary).
fn capture_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_max_level(tracing::Level::WARN).with_writer(|| LogWriter).finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// `account` with the digit that lands on nibble `nibble` (4-15) of the format 0/3 account
/// field replaced by `value`.
fn alter_account(account: &str, nibble: usize, value: u8) -> String {
    let i = account.len() - 17 + nibble;
    let mut b = account.as_bytes().to_vec();
    b[i] = b'0' + value;
    String::from_utf8(b).unwrap()
}

/// The switch's probe for 4-digit PINs: the stated account altered on the nibbles of PIN
/// digits 3 and 4 and of the first fill nibble, to each of the 9 other digit values.
fn probes(account: &str) -> Vec<(usize, u8, String)> {
    let mut out = Vec::new();
    for nibble in 4..=6 {
        let real = account.as_bytes()[account.len() - 17 + nibble] - b'0';
        for v in (0..10u8).filter(|v| *v != real) {
            out.push((nibble, real ^ v, alter_account(account, nibble, v)));
        }
    }
    out
}

/// What a format 0 oracle answers to `probes` for `pin` (true: the block decodes): the
/// PIN digit xor the account change must stay decimal, the F fill must stay F.
fn oracle_answers(pin: &[u8], probes: &[(usize, u8, String)]) -> Vec<bool> {
    probes.iter().map(|(nibble, delta, _)| if *nibble < 6 { (pin[nibble - 2] ^ delta) <= 9 } else { 0xF ^ delta == 0xF }).collect()
}

/// PINs of 4 digits consistent with `answers` (None: the call told nothing).
fn candidates(probes: &[(usize, u8, String)], answers: &[Option<bool>]) -> usize {
    (0..10_000u32)
        .filter(|c| {
            let d = [(c / 1000 % 10) as u8, (c / 100 % 10) as u8, (c / 10 % 10) as u8, (c % 10) as u8];
            oracle_answers(&d, probes).iter().zip(answers).all(|(o, a)| a.is_none_or(|a| a == *o))
        })
        .count()
}

fn random_pins(n: usize) -> Vec<String> {
    rand_bytes(2 * n).chunks(2).map(|b| format!("{:04}", u32::from(u16::from_be_bytes([b[0], b[1]])) % 10_000)).collect()
}

/// The finding: a role without `pin.change-account` states a source account altered in
/// the digits overlapping the PIN field; OK versus INVALID_ARGUMENT told which PIN digits
/// stayed decimal. Same format: the answers are the same for every PIN and the block
/// stays with its own account. Across formats (the account is needed to decode): three
/// failures lock the client, raise the alarm and are in the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_the_stated_account_learns_nothing_about_the_pin() {
    capture_log();
    vector_keys();
    let srv = start("pin-oracle").await;
    let switch = srv.clients("switch").await;
    let hub = srv.clients("hub").await;
    let pins = random_pins(12);
    let probe = probes(PAN);
    assert_eq!(probe.len(), 27);
    assert_eq!(pins.len() * probe.len(), 324);
    // The probe is sharp: an oracle would have cut every PIN's candidates.
    for pin in &pins {
        let answers: Vec<Option<bool>> = oracle_answers(&digits_of(pin), &probe).into_iter().map(Some).collect();
        assert!(candidates(&probe, &answers) < 10_000, "the probe tells nothing about {pin}?");
    }

    // 0 -> 0: re-enciphered as it is, whatever account is stated.
    let mut sequences = Vec::new();
    for pin in &pins {
        let block = encode(PinBlockFormat::Iso0, pin, Some(PAN), Z_TDES);
        let mut answers = Vec::new();
        for (_, _, stated) in &probe {
            let p = epin(&block, PinBlockFormat::Iso0, pan(stated), zone_src(Z_TDES.name));
            let r = translate(&switch, treq(p, Z_TDES_B.name, PinBlockFormat::Iso0, None)).await;
            answers.push(r.as_ref().map(|_| ()).map_err(|s| (s.code(), s.message().to_string())));
            if let Ok(r) = r {
                let r = r.into_inner();
                assert!(!r.account_changed);
                assert_eq!(decode(PinBlockFormat::Iso0, &r.block, Some(PAN), Z_TDES_B), Ok(pin.clone()), "the PIN left its account");
                assert_ne!(decode(PinBlockFormat::Iso0, &r.block, Some(stated), Z_TDES_B), Ok(pin.clone()), "the PIN moved to the stated account");
            }
        }
        let seen: Vec<Option<bool>> = answers.iter().map(|a| Some(a.is_ok())).collect();
        assert_eq!(candidates(&probe, &seen), 0, "answers an oracle could give: {answers:?}");
        sequences.push(answers);
    }
    assert!(sequences.iter().all(|s| *s == sequences[0]), "the answers depend on the PIN");
    assert!(sequences[0].iter().all(|a| a.is_ok()), "{:?}", sequences[0]);

    // 0 -> 4: the account is needed to decode. Three failures lock the switch.
    let mut failures = 0;
    let mut locked = 0;
    let mut per_pin: Vec<Vec<Option<bool>>> = Vec::new();
    for pin in &pins {
        let block = encode(PinBlockFormat::Iso0, pin, Some(PAN), Z_TDES);
        let mut seen = Vec::new();
        for (_, _, stated) in &probe {
            let p = epin(&block, PinBlockFormat::Iso0, pan(stated), zone_src(Z_TDES.name));
            match translate(&switch, treq(p, Z_AES.name, PinBlockFormat::Iso4, None)).await {
                Ok(_) => {
                    assert!(failures < 3, "answered after the lock");
                    seen.push(Some(true));
                }
                Err(s) if s.code() == Code::InvalidArgument => {
                    assert_eq!(s.message(), BAD_BLOCK);
                    failures += 1;
                    seen.push(Some(false));
                }
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                    assert!(s.message().contains("TranslatePin refused to this client"), "{}", s.message());
                    assert!(!s.message().contains(PAN) && !s.message().contains(pin.as_str()), "{}", s.message());
                    locked += 1;
                    seen.push(None);
                }
            }
        }
        per_pin.push(seen);
    }
    assert_eq!(failures, 3, "the lock trips at the third failure");
    assert_eq!(locked, 324 - failures - per_pin.iter().flatten().filter(|a| **a == Some(true)).count());
    // What the answers leave: the first PIN's two probed digits at most; the other PINs
    // got nothing but refusals.
    assert!(candidates(&probe, &per_pin[0]) >= 100, "{:?}", per_pin[0]);
    for seen in &per_pin[1..] {
        assert!(seen.iter().all(Option::is_none));
        assert_eq!(candidates(&probe, seen), 10_000);
    }
    // Every TranslatePin of the locked client is refused, a same-format one too; others go on.
    let p = zpin(PinBlockFormat::Iso0, &pins[0], PAN, Z_TDES);
    expect_code(translate(&switch, treq(p.clone(), Z_TDES_B.name, PinBlockFormat::Iso0, None)).await, Code::ResourceExhausted, &["seconds"], "locked switch");
    let r = translate_ok(&hub, treq(p, Z_TDES_B.name, PinBlockFormat::Iso0, None), "hub").await;
    assert_eq!(decode(PinBlockFormat::Iso0, &r.block, Some(PAN), Z_TDES_B), Ok(pins[0].clone()));

    // The alarm names the client, never a block, account or PIN.
    let log = log_text();
    let alarms: Vec<&str> = log.lines().filter(|l| l.contains("TranslatePin locked for this client")).collect();
    assert!(alarms.iter().any(|l| l.contains("ERROR") && l.contains("spiffe://keyward/client/switch") && l.contains("failures=3")), "no alarm in:\n{log}");
    for l in &alarms {
        let body = l.split_once("Z ").map(|(_, b)| b).unwrap_or(l);
        assert!(!body.contains(PAN) && !pins.iter().any(|p| body.contains(p.as_str())), "{l}");
    }
    assert!(!log.contains(PAN), "the log holds the account");

    // The audit trail: the counted failures, the locking one, the refusals.
    let dir = srv.audit_dir.clone();
    srv.stop().await;
    let lines: Vec<_> = rpc_lines(&dir).into_iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("/TranslatePin")).collect();
    let detail = |l: &serde_json::Value| l["detail"].as_str().unwrap_or_default().to_string();
    let bad: Vec<String> = lines.iter().filter(|l| l["code"] == "INVALID_ARGUMENT").map(detail).collect();
    assert_eq!(bad, ["pin-format-failures=1", "pin-format-failures=2", "pin-format-failures=3 locked"]);
    let refused: Vec<_> = lines.iter().filter(|l| l["code"] == "RESOURCE_EXHAUSTED").collect();
    assert_eq!(refused.len(), locked + 1);
    assert!(refused.iter().all(|l| detail(l) == "pin-format-failures=3 locked"));
    assert!(lines.iter().filter(|l| l["code"] == "OK").all(|l| l.get("detail").is_none()));
}

/// Format 3: flipping the stated account on fill positions (xor 1 keeps A-F fill valid)
/// no longer moves the PIN; format 1 and 3 sources leave their format only with the
/// account change's permission; the hub still can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format3_fill_flip_and_format1_binding_need_the_permission() {
    vector_keys();
    let srv = start("pin-fill-flip").await;
    let switch = srv.clients("switch").await;
    let hub = srv.clients("hub").await;
    let pin = "4821";
    // Nibble 8 is fill for a 4-digit PIN; PAN's digit there is 1, flipped to 0.
    let flipped = alter_account(PAN, 8, 0);
    let block = encode(PinBlockFormat::Iso3, pin, Some(PAN), Z_TDES);
    assert_eq!(decode(PinBlockFormat::Iso3, &block, Some(&flipped), Z_TDES), Ok(pin.to_string()), "the fill flip decodes");
    let p = epin(&block, PinBlockFormat::Iso3, pan(&flipped), zone_src(Z_TDES.name));
    let r = translate_ok(&switch, treq(p.clone(), Z_TDES_B.name, PinBlockFormat::Iso3, None), "3 -> 3").await;
    assert!(!r.account_changed);
    assert_eq!(decode(PinBlockFormat::Iso3, &r.block, Some(PAN), Z_TDES_B), Ok(pin.to_string()));
    // The clear block is the source's, bit for bit: still bound to the real account, the
    // fill flip undone by nothing (a fresh block for the stated account would differ).
    assert_eq!(Z_TDES_B.dec(&r.block), Z_TDES.dec(&block), "the clear block was rebuilt for the stated account");
    for (dest, f) in [(Z_TDES_B, PinBlockFormat::Iso0), (Z_AES_B, PinBlockFormat::Iso4)] {
        expect_code(translate(&switch, treq(p.clone(), dest.name, f, None)).await, Code::PermissionDenied, &["pin.change-account", "format 3"], &format!("3 -> {f:?}"));
    }
    // Format 1: no account; binding it to one is the hub's.
    let b1 = encode(PinBlockFormat::Iso1, pin, None, Z_TDES);
    let p1 = epin(&b1, PinBlockFormat::Iso1, None, zone_src(Z_TDES.name));
    for (dest, f) in [(Z_TDES_B, PinBlockFormat::Iso0), (Z_TDES_B, PinBlockFormat::Iso3), (Z_AES_B, PinBlockFormat::Iso4)] {
        let s = expect_code(translate(&switch, treq(p1.clone(), dest.name, f, pan(PAN))).await, Code::PermissionDenied, &["pin.change-account", "format 1", "no account"], &format!("1 -> {f:?}"));
        assert!(!s.message().contains(PAN));
        let r = translate_ok(&hub, treq(p1.clone(), dest.name, f, pan(PAN)), &format!("hub 1 -> {f:?}")).await;
        assert_eq!(decode(f, &r.block, Some(PAN), dest), Ok(pin.to_string()));
    }
    let r = translate_ok(&switch, treq(p1, Z_TDES_B.name, PinBlockFormat::Iso1, None), "1 -> 1").await;
    assert_eq!(decode(PinBlockFormat::Iso1, &r.block, None, Z_TDES_B), Ok(pin.to_string()));
    let dir = srv.audit_dir.clone();
    srv.stop().await;
    let denied = rpc_lines(&dir).into_iter().filter(|l| l["action"].as_str().unwrap_or_default().ends_with("/TranslatePin") && l["code"] == "PERMISSION_DENIED").count();
    assert_eq!(denied, 5);
}

/// A role's `rate_limits` bound its clients' TranslatePin calls (each call one guess).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translate_pin_rate_limit_per_client() {
    vector_keys();
    let srv = start_with("pin-rate", |c| {
        let mut role = (*c.roles["switch"]).clone();
        role.rate_limits.insert("keyward.v1.PinService/TranslatePin".into(), keyward::config::RateLimit { per_minute: 1, burst: 2 });
        c.roles.insert("switch".into(), std::sync::Arc::new(role));
    })
    .await;
    let switch = srv.clients("switch").await;
    let p = zpin(PinBlockFormat::Iso0, "4821", PAN, Z_TDES);
    for _ in 0..2 {
        translate_ok(&switch, treq(p.clone(), Z_TDES_B.name, PinBlockFormat::Iso0, None), "within the burst").await;
    }
    expect_code(translate(&switch, treq(p, Z_TDES_B.name, PinBlockFormat::Iso0, None)).await, Code::ResourceExhausted, &["rate limit", "TranslatePin"], "past the burst");
    srv.stop().await;
}

/// SoftHSM below 2.7 keeps the memory of every destroyed session object until
/// `C_Finalize`; with `hsm.recycle_after_objects` the appliance re-initialises the
/// module and attaches again once that many were made. AES-128 DUKPT translations make
/// session objects (derivation steps, the working key): across several recycles every
/// one answers, and right. A child process, since `C_Finalize` ends every session of its
/// process and this binary runs many appliances at once (which never recycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_recycles_free_session_objects_and_no_call_fails() {
    use keyward::client::{self, ClientTls};
    use keyward::proto::{GetStatusRequest, PingRequest};

    vector_keys();
    let fx = fixture();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let addr = format!("127.0.0.1:{port}");
    let audit = fresh_dir("recycle").join("audit");
    let path = config_file("recycle", |t| {
        let t = in_section(&t, "hsm", "recycle_after_objects = 40");
        let t: Vec<String> = t
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = \"{addr}\"")
                } else if l.starts_with("dir = ") {
                    format!("dir = \"{}\"", audit.display())
                } else {
                    l.to_string()
                }
            })
            .collect();
        t.join("\n") + "\n"
    });
    let mut cmd = keyward_cli();
    cmd.arg("serve").arg("--config").arg(&path).stdin(std::process::Stdio::null());
    let child = {
        let _g = token_write();
        cmd.spawn().expect("spawn keyward serve")
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(child);
    let tls = |who: &str| ClientTls::dev(&fx.prepared.pki, who);
    let up = eventually(30, || {
        let (addr, tls) = (addr.clone(), tls("admin"));
        async move {
            match client::connect(&addr, &tls).await {
                Ok(ch) => Clients::new(ch).admin.ping(PingRequest::default()).await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(up, "the appliance child did not answer within 30 s");
    let hub = Clients::new(client::connect(&addr, &tls("hub")).await.expect("connect as hub"));
    let admin = Clients::new(client::connect(&addr, &tls("admin")).await.expect("connect as admin"));
    let status = || {
        let mut a = admin.admin.clone();
        async move { a.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner() }
    };
    assert_eq!(status().await.token_recycles, 0);

    let id: [u8; 8] = h("1234567890123456").try_into().unwrap();
    let ik = dukpt::aes_initial_key(&h(AES_BDK), AesKeyType::Aes128, &id).unwrap();
    let pins = ["1234", "98765", "555555", "1029384"];
    let mut seen = std::collections::BTreeSet::new();
    for counter in 1..=120u32 {
        let pin = pins[counter as usize % pins.len()];
        let (ksn, block) = aes_dukpt_block(&ik, id, counter, pin, PAN);
        let p = epin(&block, PinBlockFormat::Iso4, pan(PAN), dukpt_src("bdk.vec-aes", &ksn));
        let r = translate_ok(&hub, treq(p, Z_AES.name, PinBlockFormat::Iso4, None), &format!("counter {counter}")).await;
        assert_eq!(decode(PinBlockFormat::Iso4, &r.block, Some(PAN), Z_AES), Ok(pin.to_string()), "counter {counter}");
        let st = status().await;
        assert!(st.serving && st.token_attached, "counter {counter}: not serving");
        assert!(st.token_session_objects < 40 + 40, "counter {counter}: {} session objects, no recycle", st.token_session_objects);
        seen.insert(st.token_recycles);
    }
    let st = status().await;
    assert!(st.token_recycles >= 3, "{} recycles over 120 DUKPT translations at 40 objects", st.token_recycles);
    assert!(seen.len() >= 3, "recycle counts seen: {seen:?}");
    assert_eq!(st.token_serial, status().await.token_serial);
    assert!(st.token_refused.is_empty());
    assert!(child.0.try_wait().expect("child status").is_none(), "the appliance exited");
}
