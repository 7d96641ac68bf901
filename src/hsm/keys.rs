//! Key catalogue: names and versions (`kw/<name>/v<n>`), classes and the usage each
//! class allows, lifecycle states, the metadata object kept next to every key in
//! the token, the flag check that refuses widened keys, and the in-memory handle map.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};

use super::{ck, Error, Result};

/// CKA_APPLICATION of keyward's metadata objects.
pub(crate) const META_APPLICATION: &[u8] = b"keyward/key-metadata/v1";
/// CKA_APPLICATION of the AES-GCM invocation reservation objects (value: u64 big-endian).
pub(crate) const GCM_APPLICATION: &[u8] = b"keyward/gcm-reserved/v1";
/// DER OID of prime256v1, the CKA_EC_PARAMS of P-256 keys.
pub(crate) const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// CKA_EC_PARAMS of Ed25519: the DER OID 1.3.101.112 (id-Ed25519).
pub(crate) const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x70];
/// AES-GCM: at most 2^32 invocations per key version (NIST SP 800-38D 8.3).
pub const GCM_LIMIT: u64 = 1 << 32;
/// Invocations reserved in the token's metadata at a time, so a crash never reuses a count.
pub(crate) const GCM_RESERVE_STEP: u64 = 1 << 20;

/// Key usage class, in the TR-31 vocabulary plus keyward's OTP and BIND classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum KeyClass {
    /// Key encryption / wrapping key.
    K0,
    /// Base derivation key (DUKPT).
    B0,
    /// PIN encryption key.
    P0,
    /// PIN verification, keyward HMAC method.
    V0,
    /// PIN verification, IBM 3624.
    V1,
    /// PIN verification, Visa PVV.
    V2,
    /// ISO 9797-1 MAC algorithm 1.
    M1,
    /// ISO 9797-1 MAC algorithm 3 (retail MAC).
    M3,
    /// ISO 9797-1:2011 MAC algorithm 5 (CMAC).
    M6,
    /// HMAC.
    M7,
    /// Data encryption.
    D0,
    /// Asymmetric signature.
    S0,
    /// One-time codes: code derivation (HMAC) and challenge sealing (AES).
    #[serde(rename = "OTP")]
    Otp,
    /// Phone-to-account bindings: sealing (AES) and blind index (HMAC).
    #[serde(rename = "BIND")]
    Bind,
}

impl KeyClass {
    pub const ALL: [KeyClass; 14] = [
        KeyClass::K0,
        KeyClass::B0,
        KeyClass::P0,
        KeyClass::V0,
        KeyClass::V1,
        KeyClass::V2,
        KeyClass::M1,
        KeyClass::M3,
        KeyClass::M6,
        KeyClass::M7,
        KeyClass::D0,
        KeyClass::S0,
        KeyClass::Otp,
        KeyClass::Bind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyClass::K0 => "K0",
            KeyClass::B0 => "B0",
            KeyClass::P0 => "P0",
            KeyClass::V0 => "V0",
            KeyClass::V1 => "V1",
            KeyClass::V2 => "V2",
            KeyClass::M1 => "M1",
            KeyClass::M3 => "M3",
            KeyClass::M6 => "M6",
            KeyClass::M7 => "M7",
            KeyClass::D0 => "D0",
            KeyClass::S0 => "S0",
            KeyClass::Otp => "OTP",
            KeyClass::Bind => "BIND",
        }
    }

    /// Token attributes a key of this class and algorithm gets, or `None` when the
    /// combination is not allowed. Each set is no wider than the class needs plus
    /// what its KCV needs (AES: CMAC sign; DES: ECB encrypt; HMAC: sign).
    pub fn usage(self, alg: Algorithm) -> Option<Usage> {
        use Family::*;
        let fam = alg.family();
        let kcv = Usage { sign: fam == Aes || fam == Hmac, encrypt: fam == Des, ..Usage::NONE };
        // Single DES only as one half of an ISO 9797-1 retail MAC key.
        if alg == Algorithm::Des && self != KeyClass::M3 {
            return None;
        }
        let u = match (self, fam) {
            (KeyClass::K0, Aes | Des) => Usage { wrap: true, unwrap: true, ..kcv },
            // AES DUKPT derives in the token (AES_CBC_ENCRYPT_DATA); TDES DUKPT needs the
            // IPEK halves as ECB encryptions of the KSN under the BDK and its variant.
            (KeyClass::B0, Aes) => Usage { derive: true, ..kcv },
            (KeyClass::B0, Des) if alg == Algorithm::Tdes2 => Usage { encrypt: true, ..kcv },
            (KeyClass::P0, Aes | Des) => Usage { encrypt: true, decrypt: true, ..kcv },
            (KeyClass::V0, Hmac) => Usage { sign: true, verify: true, ..kcv },
            (KeyClass::V1 | KeyClass::V2, Des) => Usage { encrypt: true, ..kcv },
            (KeyClass::M1, Des) if alg != Algorithm::Des => Usage { encrypt: true, ..kcv },
            (KeyClass::M3, Des) => Usage { encrypt: true, decrypt: true, ..kcv },
            (KeyClass::M6, Aes | Des) => Usage { sign: true, verify: true, ..kcv },
            (KeyClass::M7, Hmac) => Usage { sign: true, verify: true, ..kcv },
            (KeyClass::D0, Aes) => Usage { encrypt: true, decrypt: true, ..kcv },
            (KeyClass::S0, Ec) => Usage { sign: true, ..Usage::NONE },
            (KeyClass::Otp | KeyClass::Bind, Hmac) => Usage { sign: true, verify: true, ..kcv },
            (KeyClass::Otp | KeyClass::Bind, Aes) => Usage { encrypt: true, decrypt: true, ..kcv },
            _ => return None,
        };
        Some(u)
    }
}

impl fmt::Display for KeyClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyClass {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        KeyClass::ALL
            .iter()
            .copied()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown key class {s:?} (one of K0 B0 P0 V0 V1 V2 M1 M3 M6 M7 D0 S0 OTP BIND)"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Aes,
    Des,
    Hmac,
    Ec,
}

/// Key algorithm and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    #[serde(rename = "AES-128")]
    Aes128,
    #[serde(rename = "AES-192")]
    Aes192,
    #[serde(rename = "AES-256")]
    Aes256,
    /// Single DES: only as one half of a retail-MAC key pair.
    #[serde(rename = "DES")]
    Des,
    #[serde(rename = "TDES-2KEY")]
    Tdes2,
    #[serde(rename = "TDES-3KEY")]
    Tdes3,
    #[serde(rename = "HMAC-SHA1")]
    HmacSha1,
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256,
    #[serde(rename = "HMAC-SHA512")]
    HmacSha512,
    #[serde(rename = "EC-P256")]
    EcP256,
    /// EdDSA on edwards25519 (pure Ed25519), signing keys of class S0.
    #[serde(rename = "Ed25519")]
    Ed25519,
}

impl Algorithm {
    pub const ALL: [Algorithm; 11] = [
        Algorithm::Aes128,
        Algorithm::Aes192,
        Algorithm::Aes256,
        Algorithm::Des,
        Algorithm::Tdes2,
        Algorithm::Tdes3,
        Algorithm::HmacSha1,
        Algorithm::HmacSha256,
        Algorithm::HmacSha512,
        Algorithm::EcP256,
        Algorithm::Ed25519,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes128 => "AES-128",
            Algorithm::Aes192 => "AES-192",
            Algorithm::Aes256 => "AES-256",
            Algorithm::Des => "DES",
            Algorithm::Tdes2 => "TDES-2KEY",
            Algorithm::Tdes3 => "TDES-3KEY",
            Algorithm::HmacSha1 => "HMAC-SHA1",
            Algorithm::HmacSha256 => "HMAC-SHA256",
            Algorithm::HmacSha512 => "HMAC-SHA512",
            Algorithm::EcP256 => "EC-P256",
            Algorithm::Ed25519 => "Ed25519",
        }
    }

    pub(crate) fn family(self) -> Family {
        match self {
            Algorithm::Aes128 | Algorithm::Aes192 | Algorithm::Aes256 => Family::Aes,
            Algorithm::Des | Algorithm::Tdes2 | Algorithm::Tdes3 => Family::Des,
            Algorithm::HmacSha1 | Algorithm::HmacSha256 | Algorithm::HmacSha512 => Family::Hmac,
            Algorithm::EcP256 | Algorithm::Ed25519 => Family::Ec,
        }
    }

    /// Length of the secret value in bytes (HMAC keys: the digest length; shorter seeds
    /// are zero-padded to it, see `crypto::otp::pad_seed`). `None` for asymmetric keys.
    pub fn secret_len(self) -> Option<usize> {
        match self {
            Algorithm::Aes128 => Some(16),
            Algorithm::Aes192 => Some(24),
            Algorithm::Aes256 => Some(32),
            Algorithm::Des => Some(8),
            Algorithm::Tdes2 => Some(16),
            Algorithm::Tdes3 => Some(24),
            Algorithm::HmacSha1 => Some(20),
            Algorithm::HmacSha256 => Some(32),
            Algorithm::HmacSha512 => Some(64),
            Algorithm::EcP256 | Algorithm::Ed25519 => None,
        }
    }

    pub fn is_asymmetric(self) -> bool {
        self.family() == Family::Ec
    }

    /// Token key type. Single DES keys are stored as double-length keys with equal
    /// halves (K||K), which two-key TDES computes as single DES: SoftHSM 2.6.1 on
    /// OpenSSL 3 refuses CKM_DES_ECB/CBC (MechanismInvalid).
    pub(crate) fn key_type(self) -> KeyType {
        match self {
            Algorithm::Aes128 | Algorithm::Aes192 | Algorithm::Aes256 => KeyType::AES,
            Algorithm::Des => KeyType::DES2,
            Algorithm::Tdes2 => KeyType::DES2,
            Algorithm::Tdes3 => KeyType::DES3,
            Algorithm::HmacSha1 | Algorithm::HmacSha256 | Algorithm::HmacSha512 => KeyType::GENERIC_SECRET,
            Algorithm::EcP256 => KeyType::EC,
            Algorithm::Ed25519 => KeyType::EC_EDWARDS,
        }
    }

    pub(crate) fn hmac_mechanism(self) -> Option<Mechanism<'static>> {
        match self {
            Algorithm::HmacSha1 => Some(Mechanism::Sha1Hmac),
            Algorithm::HmacSha256 => Some(Mechanism::Sha256Hmac),
            Algorithm::HmacSha512 => Some(Mechanism::Sha512Hmac),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.as_str()).collect();
        Algorithm::ALL
            .iter()
            .copied()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown algorithm {s:?} (one of {})", names.join(" ")))
    }
}

/// Lifecycle state of a key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    Active,
    VerifyOnly,
    Retired,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::VerifyOnly => "verify-only",
            KeyState::Retired => "retired",
        }
    }
}

/// PKCS#11 usage flags of one key object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    pub encrypt: bool,
    pub decrypt: bool,
    pub sign: bool,
    pub verify: bool,
    pub wrap: bool,
    pub unwrap: bool,
    pub derive: bool,
}

impl Usage {
    pub const NONE: Usage = Usage {
        encrypt: false,
        decrypt: false,
        sign: false,
        verify: false,
        wrap: false,
        unwrap: false,
        derive: false,
    };

    pub(crate) fn attributes(self) -> Vec<Attribute> {
        vec![
            Attribute::Encrypt(self.encrypt),
            Attribute::Decrypt(self.decrypt),
            Attribute::Sign(self.sign),
            Attribute::Verify(self.verify),
            Attribute::Wrap(self.wrap),
            Attribute::Unwrap(self.unwrap),
            Attribute::Derive(self.derive),
        ]
    }

    /// Names of the flags set in `self` but not in `allowed`.
    pub(crate) fn widened_beyond(self, allowed: Usage) -> Vec<&'static str> {
        let pairs = [
            ("ENCRYPT", self.encrypt, allowed.encrypt),
            ("DECRYPT", self.decrypt, allowed.decrypt),
            ("SIGN", self.sign, allowed.sign),
            ("VERIFY", self.verify, allowed.verify),
            ("WRAP", self.wrap, allowed.wrap),
            ("UNWRAP", self.unwrap, allowed.unwrap),
            ("DERIVE", self.derive, allowed.derive),
        ];
        pairs.iter().filter(|(_, has, may)| *has && !*may).map(|(n, _, _)| *n).collect()
    }
}

/// Metadata kept in the token next to each key version (CKO_DATA, same label).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    pub name: String,
    pub version: u32,
    pub class: KeyClass,
    pub algorithm: Algorithm,
    pub state: KeyState,
    /// RFC 3339 creation time.
    pub created: String,
    /// Upper-case hex key check value, computed in the token.
    pub kcv: String,
    /// Revision of this metadata, raised by every change; of two copies left by an
    /// interrupted change the higher one wins.
    #[serde(default)]
    pub rev: u32,
}

impl KeyMeta {
    pub fn label(&self) -> String {
        label(&self.name, self.version)
    }

    /// `name/vN`, the form used in responses and the audit trail.
    pub fn key_ref(&self) -> String {
        format!("{}/v{}", self.name, self.version)
    }
}

/// Token label (and CKA_ID) of a key version.
pub fn label(name: &str, version: u32) -> String {
    format!("kw/{name}/v{version}")
}

/// Key names: lower-case letters, digits, '.', '-'; 1 to 64 characters, starting with a letter or digit.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key name must be 1-64 bytes of a-z 0-9 . - starting with a letter or digit (got {} bytes)",
            name.len()
        ))
    }
}

/// Suffixes of the token keys that make up one logical key:
/// a retail-MAC key is two single-DES halves; a TDES BDK has a companion holding
/// BDK xor C0C0C0C000000000C0C0C0C000000000, since the token has no XOR mechanism.
pub const LEFT_SUFFIX: &str = ".left";
pub const RIGHT_SUFFIX: &str = ".right";
pub const VARIANT_SUFFIX: &str = ".variant";

/// A logical key stored as several token keys of one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compound {
    /// Class M3, TDES-2KEY: `<name>.left` and `<name>.right`, single DES each.
    RetailMacPair,
    /// Class B0, TDES-2KEY: `<name>` and `<name>.variant`.
    TdesBdk,
}

impl Compound {
    pub fn of(class: KeyClass, alg: Algorithm) -> Option<Compound> {
        match (class, alg) {
            (KeyClass::M3, Algorithm::Tdes2) => Some(Compound::RetailMacPair),
            (KeyClass::B0, Algorithm::Tdes2) => Some(Compound::TdesBdk),
            _ => None,
        }
    }

    /// The token keys (name, algorithm, value) making up `name` with clear `value`.
    pub fn parts(
        self,
        name: &str,
        alg: Algorithm,
        value: &zeroize::Zeroizing<Vec<u8>>,
    ) -> Vec<(String, Algorithm, zeroize::Zeroizing<Vec<u8>>)> {
        match self {
            Compound::RetailMacPair => vec![
                (format!("{name}{LEFT_SUFFIX}"), Algorithm::Des, zeroize::Zeroizing::new(value[..8].to_vec())),
                (format!("{name}{RIGHT_SUFFIX}"), Algorithm::Des, zeroize::Zeroizing::new(value[8..16].to_vec())),
            ],
            Compound::TdesBdk => {
                let mut variant = zeroize::Zeroizing::new(value.to_vec());
                for (i, b) in variant.iter_mut().enumerate() {
                    *b ^= crate::crypto::dukpt::TDES_BDK_VARIANT[i];
                }
                vec![(name.to_string(), alg, zeroize::Zeroizing::new(value.to_vec())), (format!("{name}{VARIANT_SUFFIX}"), alg, variant)]
            }
        }
    }

    /// Names of the token keys of `name`.
    pub fn part_names(self, name: &str) -> Vec<String> {
        match self {
            Compound::RetailMacPair => vec![format!("{name}{LEFT_SUFFIX}"), format!("{name}{RIGHT_SUFFIX}")],
            Compound::TdesBdk => vec![name.to_string(), format!("{name}{VARIANT_SUFFIX}")],
        }
    }
}

/// Sets odd parity in every byte of a DES key value.
pub fn set_des_parity(value: &mut [u8]) {
    for b in value.iter_mut() {
        if (*b >> 1).count_ones() % 2 == 0 {
            *b |= 1;
        } else {
            *b &= 0xFE;
        }
    }
}

/// Whether a key is copied into a session object for speed, leaving a modifiable
/// token original; KEKs, BDKs and the audit checkpoint key are used in place and
/// created non-modifiable (SoftHSM cannot copy non-modifiable keys).
/// The audit chain key signs one HMAC per group commit of the trail, so it is a
/// hot-path key: copied (measured 20 us per HMAC in place against 7 us on a session copy).
pub fn uses_session_copy(name: &str, class: KeyClass) -> bool {
    !matches!(class, KeyClass::K0 | KeyClass::B0) && name != "audit.sign"
}

/// Counts AES-GCM invocations of one key version against [`GCM_LIMIT`]. The token
/// holds the reservation (a data object replaced at every step), so a restart
/// continues above every count that may have been used.
#[derive(Debug)]
pub(crate) struct GcmCounter {
    pub(crate) used: AtomicU64,
    pub(crate) reserved: AtomicU64,
    /// The 90% warning was logged.
    pub(crate) warned: std::sync::atomic::AtomicBool,
}

/// One loaded key version.
#[derive(Debug)]
pub struct KeyEntry {
    pub meta: KeyMeta,
    /// Handle used for operations: the session copy, or the token original.
    pub(crate) handle: ObjectHandle,
    /// The token original (for ceremony updates).
    pub(crate) token_handle: ObjectHandle,
    /// The metadata object.
    pub(crate) meta_handle: ObjectHandle,
    /// DER SubjectPublicKeyInfo for asymmetric keys.
    pub public_der: Option<Vec<u8>>,
    pub(crate) gcm: Arc<GcmCounter>,
}

impl KeyEntry {
    pub fn key_ref(&self) -> String {
        self.meta.key_ref()
    }

    /// Fraction of the GCM invocation budget used.
    pub fn gcm_used(&self) -> u64 {
        self.gcm.used.load(Ordering::Relaxed)
    }
}

/// The loaded catalogue: every usable key version, by name and version.
#[derive(Debug, Default)]
pub struct Catalogue {
    /// Generation of the token attachment whose handles this catalogue holds.
    generation: u64,
    keys: BTreeMap<String, BTreeMap<u32, Arc<KeyEntry>>>,
    /// Keys present in the token but refused (flags widened, metadata unreadable): label -> reason.
    refused: Vec<(String, String)>,
}

impl Catalogue {
    /// Generation of the token attachment the handles belong to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.keys.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every loaded version, by name then version.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys.values().flat_map(|v| v.values())
    }

    /// Keys found in the token but refused, with the reason.
    pub fn refused(&self) -> &[(String, String)] {
        &self.refused
    }

    /// One version; `version == 0` means the active one.
    pub fn get(&self, name: &str, version: u32) -> Result<&Arc<KeyEntry>> {
        if version == 0 {
            return self.active(name);
        }
        self.keys
            .get(name)
            .and_then(|v| v.get(&version))
            .ok_or_else(|| Error::KeyNotFound(label_ref(name, version)))
    }

    /// Whether any version of `name` is loaded.
    pub fn versions_exist(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }

    /// The active version (the highest active one).
    pub fn active(&self, name: &str) -> Result<&Arc<KeyEntry>> {
        let versions = self.keys.get(name).ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
        versions
            .values()
            .rev()
            .find(|e| e.meta.state == KeyState::Active)
            .ok_or_else(|| Error::KeyUsage { key: name.to_string(), reason: "no active version".into() })
    }

    /// The key for a new operation (encrypt, sign, MAC generation): active, of one of `classes`.
    pub fn for_new(&self, name: &str, classes: &[KeyClass]) -> Result<Arc<KeyEntry>> {
        let e = self.active(name)?;
        check_class(e, classes)?;
        Ok(Arc::clone(e))
    }

    /// The key for decrypting / verifying existing data: any non-retired version of one of `classes`.
    pub fn for_existing(&self, name: &str, version: u32, classes: &[KeyClass]) -> Result<Arc<KeyEntry>> {
        let e = self.get(name, version)?;
        if e.meta.state == KeyState::Retired {
            return Err(Error::KeyUsage { key: e.key_ref(), reason: "version is retired".into() });
        }
        check_class(e, classes)?;
        Ok(Arc::clone(e))
    }

    /// The current entry of a key resolved earlier (the catalogue may have been reloaded since).
    pub(crate) fn handles_of(&self, entry: &KeyEntry) -> Result<&Arc<KeyEntry>> {
        self.keys
            .get(&entry.meta.name)
            .and_then(|v| v.get(&entry.meta.version))
            .ok_or_else(|| Error::KeyNotFound(entry.key_ref()))
    }

    pub(crate) fn next_version(&self, name: &str) -> u32 {
        self.keys.get(name).and_then(|v| v.keys().next_back().copied()).unwrap_or(0) + 1
    }

    pub(crate) fn versions(&self, name: &str) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.keys.get(name).into_iter().flat_map(|v| v.values())
    }
}

fn label_ref(name: &str, version: u32) -> String {
    format!("{name}/v{version}")
}

fn check_class(e: &KeyEntry, classes: &[KeyClass]) -> Result<()> {
    if classes.contains(&e.meta.class) {
        Ok(())
    } else {
        let wanted: Vec<&str> = classes.iter().map(|c| c.as_str()).collect();
        Err(Error::KeyUsage {
            key: e.key_ref(),
            reason: format!("class {} cannot be used here (needs {})", e.meta.class, wanted.join(" or ")),
        })
    }
}

fn read_bool(attrs: &[Attribute], t: AttributeType) -> Option<bool> {
    attrs.iter().find_map(|a| match (a, t) {
        (Attribute::Sensitive(v), AttributeType::Sensitive)
        | (Attribute::Extractable(v), AttributeType::Extractable)
        | (Attribute::Private(v), AttributeType::Private)
        | (Attribute::Modifiable(v), AttributeType::Modifiable)
        | (Attribute::Encrypt(v), AttributeType::Encrypt)
        | (Attribute::Decrypt(v), AttributeType::Decrypt)
        | (Attribute::Sign(v), AttributeType::Sign)
        | (Attribute::Verify(v), AttributeType::Verify)
        | (Attribute::Wrap(v), AttributeType::Wrap)
        | (Attribute::Unwrap(v), AttributeType::Unwrap)
        | (Attribute::Derive(v), AttributeType::Derive) => Some(*v),
        _ => None,
    })
}

/// The security-relevant flags of a key object, as the token reports them.
#[derive(Debug, Clone, Copy)]
pub struct KeyFlags {
    pub sensitive: bool,
    pub extractable: bool,
    pub private: bool,
    pub modifiable: bool,
    pub usage: Usage,
}

pub(crate) fn read_flags(session: &Session, h: ObjectHandle) -> Result<KeyFlags> {
    let types = [
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Private,
        AttributeType::Modifiable,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Sign,
        AttributeType::Verify,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Derive,
    ];
    let attrs = session.get_attributes(h, &types).map_err(ck("get_attributes"))?;
    let b = |t| read_bool(&attrs, t).unwrap_or(false);
    Ok(KeyFlags {
        // An attribute the token does not report counts against the key.
        sensitive: read_bool(&attrs, AttributeType::Sensitive).unwrap_or(false),
        extractable: read_bool(&attrs, AttributeType::Extractable).unwrap_or(true),
        private: b(AttributeType::Private),
        modifiable: b(AttributeType::Modifiable),
        usage: Usage {
            encrypt: b(AttributeType::Encrypt),
            decrypt: b(AttributeType::Decrypt),
            sign: b(AttributeType::Sign),
            verify: b(AttributeType::Verify),
            wrap: b(AttributeType::Wrap),
            unwrap: b(AttributeType::Unwrap),
            derive: b(AttributeType::Derive),
        },
    })
}

/// Why a secret or private key object must not be served, if it must not.
pub(crate) fn flag_problems(flags: &KeyFlags, allowed: Usage, in_place: bool) -> Option<String> {
    let mut problems = Vec::new();
    if in_place && flags.modifiable {
        // A key used in place must not be modifiable, or its flags could be widened
        // after the start-up check.
        problems.push("MODIFIABLE but used in place".to_string());
    }
    if !flags.sensitive {
        problems.push("not SENSITIVE".to_string());
    }
    if flags.extractable {
        problems.push("EXTRACTABLE".to_string());
    }
    if !flags.private {
        problems.push("not PRIVATE".to_string());
    }
    let widened = flags.usage.widened_beyond(allowed);
    if !widened.is_empty() {
        problems.push(format!("usage widened: {}", widened.join(",")));
    }
    if problems.is_empty() {
        None
    } else {
        Some(problems.join("; "))
    }
}

fn find(session: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>> {
    session.find_objects(template).map_err(ck("find_objects"))
}

/// Every keyward metadata object in the token: (handle, parsed metadata or the parse problem).
/// One metadata object: its handle, its label, and the parsed metadata or why it is unreadable.
pub(crate) type MetaObject = (ObjectHandle, String, Result<KeyMeta, String>);

pub(crate) fn read_metadata(session: &Session) -> Result<Vec<MetaObject>> {
    let handles = find(
        session,
        &[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(META_APPLICATION.to_vec()),
        ],
    )?;
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        // A vanished object (replaced by another process) fails the whole read, so
        // the caller loads again and sees its replacement.
        let attrs = session
            .get_attributes(h, &[AttributeType::Label, AttributeType::Value])
            .map_err(ck("get_attributes"))?;
        let mut label = String::new();
        let mut value = Vec::new();
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Value(v) => value = v,
                _ => {}
            }
        }
        let meta = serde_json::from_slice::<KeyMeta>(&value)
            .map_err(|e| format!("metadata unreadable: {e}"))
            .and_then(|m| {
                if m.label() == label {
                    Ok(m)
                } else {
                    Err("metadata does not match its label".to_string())
                }
            });
        out.push((h, label, meta));
    }
    Ok(out)
}

/// Replaces a metadata object (SoftHSM keeps CKA_VALUE of data objects read-only):
/// the new object is created before the old one is destroyed, so a failure in
/// between leaves two copies, and the loader keeps the newest-looking one.
pub(crate) fn write_metadata(session: &Session, old: ObjectHandle, meta: &mut KeyMeta) -> Result<ObjectHandle> {
    meta.rev += 1;
    let h = create_metadata(session, meta)?;
    destroy_if_present(session, old)?;
    Ok(h)
}

/// Reads the GCM reservation objects of a label: (handles, highest value).
pub(crate) fn read_gcm_reserved(session: &Session, label: &str) -> Result<(Vec<ObjectHandle>, u64)> {
    let handles = find(
        session,
        &[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(GCM_APPLICATION.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ],
    )?;
    let mut max = 0u64;
    let mut live = Vec::with_capacity(handles.len());
    for h in &handles {
        let attrs = match session.get_attributes(*h, &[AttributeType::Value]).map_err(ck("get_attributes")) {
            Ok(a) => a,
            Err(Error::ObjectVanished(_)) => continue,
            Err(e) => return Err(e),
        };
        live.push(*h);
        for a in attrs {
            if let Attribute::Value(v) = a {
                match <[u8; 8]>::try_from(v.as_slice()) {
                    Ok(b) => max = max.max(u64::from_be_bytes(b)),
                    // Counting from zero again could reuse IVs: refuse instead.
                    Err(_) => return Err(Error::Catalogue(format!("{label}: unreadable AES-GCM reservation"))),
                }
            }
        }
    }
    Ok((live, max))
}

/// Raises the GCM reservation of `label` to at least `at_least` + one step, above
/// every reservation in the token (another appliance on the same token may have
/// reserved more), then destroys the objects it replaces. Returns the new value.
pub(crate) fn reserve_gcm(session: &Session, label: &str, at_least: u64) -> Result<u64> {
    let (old, max) = read_gcm_reserved(session, label)?;
    let value = (at_least.max(max) + GCM_RESERVE_STEP).min(GCM_LIMIT);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Application(GCM_APPLICATION.to_vec()),
            Attribute::Value(value.to_be_bytes().to_vec()),
        ])
        .map_err(ck("create_object"))?;
    for o in old {
        destroy_if_present(session, o)?;
    }
    Ok(value)
}

/// Destroys an object; one already destroyed (by another process) is fine.
pub(crate) fn destroy_if_present(session: &Session, h: ObjectHandle) -> Result<()> {
    match session.destroy_object(h).map_err(ck("destroy_object")) {
        Ok(()) | Err(Error::ObjectVanished(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn create_metadata(session: &Session, meta: &KeyMeta) -> Result<ObjectHandle> {
    let value = serde_json::to_vec(meta).map_err(|e| Error::Catalogue(e.to_string()))?;
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(true),
            Attribute::Label(meta.label().into_bytes()),
            Attribute::Application(META_APPLICATION.to_vec()),
            Attribute::Value(value),
        ])
        .map_err(ck("create_object"))
}

/// Token key objects (secret or private, and public) carrying a label.
pub(crate) struct KeyObjects {
    pub(crate) secret_or_private: ObjectHandle,
    pub(crate) public: Option<ObjectHandle>,
}

pub(crate) fn find_key_objects(session: &Session, label: &str, asymmetric: bool) -> Result<Option<KeyObjects>> {
    let id = label.as_bytes().to_vec();
    if asymmetric {
        let private = find(
            session,
            &[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Token(true), Attribute::Id(id.clone())],
        )?;
        let public = find(
            session,
            &[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Token(true), Attribute::Id(id)],
        )?;
        Ok(private.first().map(|p| KeyObjects { secret_or_private: *p, public: public.first().copied() }))
    } else {
        let secret = find(
            session,
            &[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true), Attribute::Id(id)],
        )?;
        Ok(secret.first().map(|s| KeyObjects { secret_or_private: *s, public: None }))
    }
}

/// Loads the catalogue through the anchor session. With `copies`, hot-path keys are
/// copied into non-modifiable session objects; copies already made for an unchanged
/// key in `previous` are reused (in-flight operations may still use them).
pub(crate) fn load(session: &Session, previous: Option<&Catalogue>, copies: bool, generation: u64) -> Result<Catalogue> {
    // Copies are reused only from a catalogue of the same attachment.
    let previous = previous.filter(|p| p.generation == generation);
    let mut attempt = 0;
    loop {
        match load_once(session, previous, copies, generation) {
            Err(Error::ObjectVanished(op)) if attempt < 5 => {
                tracing::debug!(op, "token object replaced during the catalogue load: loading again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn load_once(session: &Session, previous: Option<&Catalogue>, copies: bool, generation: u64) -> Result<Catalogue> {
    let mut cat = Catalogue { generation, ..Catalogue::default() };
    for (meta_handle, label, meta) in read_metadata(session)? {
        let meta = match meta {
            Ok(m) => m,
            Err(reason) => {
                tracing::error!(key = %label, %reason, "key refused");
                cat.refused.push((label, reason));
                continue;
            }
        };
        let Some(objects) = find_key_objects(session, &label, meta.algorithm.is_asymmetric())? else {
            let reason = "metadata without a key object".to_string();
            tracing::error!(key = %label, %reason, "key refused");
            cat.refused.push((label, reason));
            continue;
        };
        let Some(allowed) = meta.class.usage(meta.algorithm) else {
            let reason = format!("class {} does not allow {}", meta.class, meta.algorithm);
            cat.refused.push((label, reason));
            continue;
        };
        let flags = read_flags(session, objects.secret_or_private)?;
        if let Some(reason) = flag_problems(&flags, allowed, !uses_session_copy(&meta.name, meta.class)) {
            tracing::error!(key = %label, %reason, "key refused: flags do not match its class");
            cat.refused.push((label, reason));
            continue;
        }
        let copy = copies && uses_session_copy(&meta.name, meta.class);
        let reused = previous
            .and_then(|p| p.keys.get(&meta.name))
            .and_then(|v| v.get(&meta.version))
            .filter(|e| e.token_handle == objects.secret_or_private && e.meta.class == meta.class);
        let handle = match (copy, reused) {
            (true, Some(prev)) if prev.handle != prev.token_handle => prev.handle,
            (true, _) => match session
                .copy_object(objects.secret_or_private, &[Attribute::Token(false), Attribute::Modifiable(false)])
            {
                Ok(h) => {
                    super::token::note_created();
                    h
                }
                // A token that cannot copy this key (non-modifiable original, or no
                // C_CopyObject) still serves it, in place: slower, not weaker.
                Err(e) => {
                    tracing::warn!(key = %label, error = %e, "session copy refused by the token: key used in place");
                    objects.secret_or_private
                }
            },
            (false, _) => objects.secret_or_private,
        };
        let public_der = match objects.public {
            Some(p) => Some(super::ops::public_key_der(session, p, meta.algorithm)?),
            None => None,
        };
        let gcm = match reused {
            Some(prev) => Arc::clone(&prev.gcm),
            None if meta.algorithm.family() == Family::Aes => {
                let (_, reserved) = read_gcm_reserved(session, &label)?;
                Arc::new(GcmCounter {
                    used: AtomicU64::new(reserved),
                    reserved: AtomicU64::new(reserved),
                    warned: Default::default(),
                })
            }
            None => Arc::new(GcmCounter {
                used: AtomicU64::new(0),
                reserved: AtomicU64::new(0),
                warned: Default::default(),
            }),
        };
        let entry = KeyEntry {
            handle,
            token_handle: objects.secret_or_private,
            meta_handle,
            public_der,
            gcm,
            meta,
        };
        let versions = cat.keys.entry(entry.meta.name.clone()).or_default();
        if versions.get(&entry.meta.version).is_some_and(|e| e.meta.rev > entry.meta.rev) {
            continue;
        }
        versions.insert(entry.meta.version, Arc::new(entry));
    }
    Ok(cat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_class_both_wraps_and_decrypts_or_extracts() {
        for class in KeyClass::ALL {
            for alg in Algorithm::ALL {
                if let Some(u) = class.usage(alg) {
                    assert!(!(u.wrap && u.decrypt), "{class} {alg}: wrap+decrypt would let wrapped keys be read");
                }
            }
        }
    }

    #[test]
    fn classes_accept_only_their_algorithms() {
        assert!(KeyClass::D0.usage(Algorithm::Tdes2).is_none());
        assert!(KeyClass::S0.usage(Algorithm::Aes256).is_none());
        assert!(KeyClass::M7.usage(Algorithm::Aes128).is_none());
        assert!(KeyClass::B0.usage(Algorithm::Des).is_none());
        assert!(KeyClass::K0.usage(Algorithm::Des).is_none());
        assert!(KeyClass::P0.usage(Algorithm::Des).is_none());
        assert!(KeyClass::M3.usage(Algorithm::Des).is_some());
        assert!(KeyClass::M1.usage(Algorithm::Des).is_none());
        let b0 = KeyClass::B0.usage(Algorithm::Aes128).unwrap_or(Usage::NONE);
        assert!(b0.derive && !b0.encrypt && !b0.decrypt);
        let d0 = KeyClass::D0.usage(Algorithm::Aes256).unwrap_or(Usage::NONE);
        assert!(d0.encrypt && d0.decrypt && d0.sign && !d0.wrap && !d0.unwrap && !d0.derive && !d0.verify);
    }

    #[test]
    fn widened_flags_are_named() {
        let allowed = Usage { encrypt: true, ..Usage::NONE };
        let actual = Usage { encrypt: true, decrypt: true, wrap: true, ..Usage::NONE };
        assert_eq!(actual.widened_beyond(allowed), vec!["DECRYPT", "WRAP"]);
        let flags = KeyFlags { sensitive: true, extractable: false, private: true, modifiable: true, usage: actual };
        let p = flag_problems(&flags, allowed, false).unwrap_or_default();
        assert!(p.contains("DECRYPT") && p.contains("WRAP"), "{p}");
        let ok = KeyFlags { usage: allowed, ..flags };
        assert!(flag_problems(&ok, allowed, false).is_none());
        let p = flag_problems(&ok, allowed, true).unwrap_or_default();
        assert!(p.contains("MODIFIABLE"), "{p}");
    }

    #[test]
    fn compound_parts() {
        let v = zeroize::Zeroizing::new(hex::decode("0123456789ABCDEFFEDCBA9876543210").unwrap_or_default());
        let p = Compound::TdesBdk.parts("bdk.t", Algorithm::Tdes2, &v);
        assert_eq!(p[1].0, "bdk.t.variant");
        assert_eq!(hex::encode_upper(&*p[1].2), "C1E385A789ABCDEF3E1C7A5876543210");
        let p = Compound::RetailMacPair.parts("mac.r", Algorithm::Tdes2, &v);
        assert_eq!((p[0].0.as_str(), hex::encode_upper(&*p[1].2)), ("mac.r.left", "FEDCBA9876543210".to_string()));
        let mut k = [0u8, 0x01, 0xFE, 0x13];
        set_des_parity(&mut k);
        assert_eq!(k, [0x01, 0x01, 0xFE, 0x13]);
    }

    #[test]
    fn names_and_labels() {
        assert_eq!(label("zpk.bank-a", 3), "kw/zpk.bank-a/v3");
        assert!(validate_name("zpk.bank-a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(".x").is_err());
        assert!(validate_name("Data").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
        assert_eq!("hmac-sha256".parse::<Algorithm>(), Ok(Algorithm::HmacSha256));
        assert_eq!("bind".parse::<KeyClass>(), Ok(KeyClass::Bind));
    }
}
