//! The signed e-cash objects and their encodings (docs/ecash-format.md).
//!
//! To-be-signed (tbs) bytes = `domain_separated(TAG, [[1], field, ...])`: an ASCII tag
//! per kind, a zero byte, then each field as a 4-byte big-endian length and its bytes;
//! the first field is the format version byte 1, integers are fixed-width big-endian.
//! Wire bytes of a [`Signed`] object = tbs || 64-byte raw `r || s` (low-S). Decoding is
//! strict (tag, version, every length, every rule, no trailing bytes), so a decoded
//! object re-encodes byte-identically and one byte string never decodes as two kinds.

use std::fmt;

use openssl::sha::Sha256;

use super::sig::{self, KeyAlgorithm, PublicKey, SigningKey, SEC1_LEN, SIG_LEN};
use super::EcashError;

/// Format version, the first field of every tbs encoding.
pub const FORMAT_V1: u8 = 1;

pub const TAG_CERTIFICATION_REQUEST: &str = "keyward/v1/ecash/certification-request";
pub const TAG_DEVICE_CERTIFICATE: &str = "keyward/v1/ecash/device-certificate";
pub const TAG_VOUCHER: &str = "keyward/v1/ecash/voucher";
pub const TAG_PAYMENT: &str = "keyward/v1/ecash/payment";
pub const TAG_TRUST_BUNDLE: &str = "keyward/v1/ecash/trust-bundle";
/// Tag of the (unsigned) [`Presented`] container.
pub const TAG_PRESENTED: &str = "keyward/v1/ecash/presented";

/// Bounds of the variable-length fields, in bytes.
pub const MAX_ACCOUNT_REF: usize = 64;
pub const MAX_MERCHANT_ID: usize = 32;
pub const MAX_TERMINAL_ID: usize = 16;
pub const MAX_BUNDLE_KEYS: usize = 64;
/// Encoded length of a trusted key, by algorithm: role, algorithm, version, key,
/// not_before, not_after.
pub fn trusted_key_len(alg: KeyAlgorithm) -> usize {
    1 + 1 + 4 + alg.key_len() + 8 + 8
}

fn bad(kind: &'static str, field: &'static str, msg: &'static str) -> EcashError {
    EcashError::Malformed { kind, field, msg }
}

/// An object that is signed: its tag, its fields in order, strict decoding and rules.
pub trait Signable: Sized + Clone + PartialEq + Eq + fmt::Debug {
    /// Domain-separation tag of the tbs encoding.
    const TAG: &'static str;
    /// Kind name used in error messages.
    const KIND: &'static str;
    /// Signed by a device key, which is always P-256: decoding already refuses a
    /// non-canonical (high-S) signature. Objects of the appliance's keys (P-256 or
    /// Ed25519) are checked when verified, once the key's algorithm is known.
    const DEVICE_SIGNED: bool = false;

    /// Calls `f` with each tbs field in order, starting with the version byte.
    fn visit_fields(&self, f: &mut dyn FnMut(&[u8]));

    /// The validation rules of this kind (checked by `decode` and by [`Signed::sign`]).
    fn validate(&self) -> Result<(), EcashError>;

    /// Strict inverse of [`Signable::tbs`]: tag, version, field lengths, rules, no
    /// trailing bytes.
    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError>;

    /// The to-be-signed bytes: `domain_separated(TAG, [[1], fields...])`.
    fn tbs(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        write_tbs(self, &mut |b| out.extend_from_slice(b));
        out
    }
}

/// Streams the tbs bytes of `body` into `out` (shared by encoding and hashing, so
/// hashing allocates nothing).
fn write_tbs<T: Signable>(body: &T, out: &mut dyn FnMut(&[u8])) {
    out(T::TAG.as_bytes());
    out(&[0]);
    body.visit_fields(&mut |field| {
        out(&(field.len() as u32).to_be_bytes());
        out(field);
    });
}

/// Reader of a domain-separated tbs encoding.
struct Fields<'a> {
    rest: &'a [u8],
    kind: &'static str,
}

impl<'a> Fields<'a> {
    /// Checks the tag and the version field.
    fn open(b: &'a [u8], tag: &str, kind: &'static str) -> Result<Fields<'a>, EcashError> {
        let rest = b
            .strip_prefix(tag.as_bytes())
            .and_then(|r| r.strip_prefix(&[0u8][..]))
            .ok_or(bad(kind, "tag", "wrong tag"))?;
        let mut r = Fields { rest, kind };
        if r.raw("version")? != [FORMAT_V1] {
            return Err(bad(kind, "version", "unsupported format version"));
        }
        Ok(r)
    }

    fn raw(&mut self, field: &'static str) -> Result<&'a [u8], EcashError> {
        let (len, rest) = self
            .rest
            .split_first_chunk::<4>()
            .ok_or(bad(self.kind, field, "truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            return Err(bad(self.kind, field, "truncated"));
        }
        let (value, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(value)
    }

    fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EcashError> {
        self.raw(field)?
            .try_into()
            .map_err(|_| bad(self.kind, field, "wrong length"))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, EcashError> {
        self.fixed(field).map(u64::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, EcashError> {
        self.fixed(field).map(u32::from_be_bytes)
    }

    fn string(&mut self, field: &'static str) -> Result<String, EcashError> {
        let b = self.raw(field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| bad(self.kind, field, "not UTF-8"))
    }

    fn finish(self) -> Result<(), EcashError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(bad(self.kind, "end", "trailing bytes"))
        }
    }
}

/// Domain tag of a device id's derivation.
pub const TAG_DEVICE_ID: &str = "keyward/v1/ecash/device-id";

/// The device id of a device key: the first 16 bytes of SHA-256 over the
/// domain-separated SEC1 point. Ids are derived, never chosen, so no device can be
/// certified under another device's id and spend its vouchers.
pub fn device_id_of(device_public_key: &[u8; SEC1_LEN]) -> [u8; 16] {
    let digest = crate::crypto::sha256(&crate::crypto::encoding::domain_separated(TAG_DEVICE_ID, &[device_public_key]));
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

fn check_device_id(kind: &'static str, id: &[u8; 16], pk: &[u8; SEC1_LEN]) -> Result<(), EcashError> {
    if *id == device_id_of(pk) {
        Ok(())
    } else {
        Err(bad(kind, "device_id", "not the id derived from the device key"))
    }
}

fn check_point(kind: &'static str, field: &'static str, pk: &[u8; SEC1_LEN]) -> Result<(), EcashError> {
    PublicKey::from_sec1(pk)
        .map(|_| ())
        .map_err(|_| bad(kind, field, "not a SEC1 uncompressed P-256 point"))
}

fn check_currency(kind: &'static str, c: &[u8; 3]) -> Result<(), EcashError> {
    if c.iter().all(u8::is_ascii_uppercase) {
        Ok(())
    } else {
        Err(bad(kind, "currency", "must be 3 letters A-Z"))
    }
}

/// 1..=`max` bytes of printable ASCII without space (0x21..=0x7E).
pub(crate) fn check_printable(kind: &'static str, field: &'static str, s: &str, max: usize) -> Result<(), EcashError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| (0x21..=0x7E).contains(&b)) {
        return Err(bad(
            kind,
            field,
            "must be 1 to its maximum of printable ASCII (0x21-0x7E)",
        ));
    }
    Ok(())
}

fn check_account_ref(kind: &'static str, a: &[u8]) -> Result<(), EcashError> {
    if a.is_empty() || a.len() > MAX_ACCOUNT_REF {
        return Err(bad(kind, "account_ref", "must be 1 to 64 bytes"));
    }
    Ok(())
}

/// Offline limits a device certificate grants (amounts in minor currency units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfflineLimits {
    pub max_balance: u64,
    pub max_single_payment: u64,
    pub max_consecutive_offline: u32,
}

/// A wallet's request for a device certificate, signed by the device key (proof of
/// possession). Debug shows the account reference's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct CertificationRequest {
    pub device_id: [u8; 16],
    /// SEC1 uncompressed P-256 point.
    pub device_public_key: [u8; SEC1_LEN],
    /// Opaque account reference, 1..=64 bytes.
    pub account_ref: Vec<u8>,
    /// Unix seconds.
    pub timestamp: u64,
}

impl Signable for CertificationRequest {
    const TAG: &'static str = TAG_CERTIFICATION_REQUEST;
    const KIND: &'static str = "certification request";
    const DEVICE_SIGNED: bool = true;

    fn visit_fields(&self, f: &mut dyn FnMut(&[u8])) {
        f(&[FORMAT_V1]);
        f(&self.device_id);
        f(&self.device_public_key);
        f(&self.account_ref);
        f(&self.timestamp.to_be_bytes());
    }

    fn validate(&self) -> Result<(), EcashError> {
        check_point(Self::KIND, "device_public_key", &self.device_public_key)?;
        check_device_id(Self::KIND, &self.device_id, &self.device_public_key)?;
        check_account_ref(Self::KIND, &self.account_ref)
    }

    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError> {
        let mut r = Fields::open(tbs, Self::TAG, Self::KIND)?;
        let v = CertificationRequest {
            device_id: r.fixed("device_id")?,
            device_public_key: r.fixed("device_public_key")?,
            account_ref: r.raw("account_ref")?.to_vec(),
            timestamp: r.u64("timestamp")?,
        };
        r.finish()?;
        v.validate()?;
        Ok(v)
    }
}

impl fmt::Debug for CertificationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificationRequest")
            .field("device_id", &hex::encode(self.device_id))
            .field("device_public_key", &hex::encode(self.device_public_key))
            .field("account_ref_len", &self.account_ref.len())
            .field("timestamp", &self.timestamp)
            .finish()
    }
}

/// A device certificate: binds a device key to a device id, an account and offline
/// limits; signed by `device.ca` version `ca_key_version`. Debug shows the account
/// reference's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCertificate {
    pub device_id: [u8; 16],
    pub device_public_key: [u8; SEC1_LEN],
    pub account_ref: Vec<u8>,
    pub limits: OfflineLimits,
    /// Unix seconds, `< not_after`.
    pub not_before: u64,
    pub not_after: u64,
    /// Version of `device.ca` that signs, `>= 1`.
    pub ca_key_version: u32,
}

impl Signable for DeviceCertificate {
    const TAG: &'static str = TAG_DEVICE_CERTIFICATE;
    const KIND: &'static str = "device certificate";

    fn visit_fields(&self, f: &mut dyn FnMut(&[u8])) {
        f(&[FORMAT_V1]);
        f(&self.device_id);
        f(&self.device_public_key);
        f(&self.account_ref);
        f(&self.limits.max_balance.to_be_bytes());
        f(&self.limits.max_single_payment.to_be_bytes());
        f(&self.limits.max_consecutive_offline.to_be_bytes());
        f(&self.not_before.to_be_bytes());
        f(&self.not_after.to_be_bytes());
        f(&self.ca_key_version.to_be_bytes());
    }

    fn validate(&self) -> Result<(), EcashError> {
        let k = Self::KIND;
        check_point(k, "device_public_key", &self.device_public_key)?;
        check_device_id(k, &self.device_id, &self.device_public_key)?;
        check_account_ref(k, &self.account_ref)?;
        if self.limits.max_single_payment > self.limits.max_balance {
            return Err(bad(k, "max_single_payment", "must not exceed max_balance"));
        }
        if self.limits.max_consecutive_offline == 0 {
            return Err(bad(k, "max_consecutive_offline", "must be at least 1"));
        }
        if self.not_before >= self.not_after {
            return Err(bad(k, "not_after", "must be after not_before"));
        }
        if self.ca_key_version == 0 {
            return Err(bad(k, "ca_key_version", "must be at least 1"));
        }
        Ok(())
    }

    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError> {
        let mut r = Fields::open(tbs, Self::TAG, Self::KIND)?;
        let v = DeviceCertificate {
            device_id: r.fixed("device_id")?,
            device_public_key: r.fixed("device_public_key")?,
            account_ref: r.raw("account_ref")?.to_vec(),
            limits: OfflineLimits {
                max_balance: r.u64("max_balance")?,
                max_single_payment: r.u64("max_single_payment")?,
                max_consecutive_offline: r.u32("max_consecutive_offline")?,
            },
            not_before: r.u64("not_before")?,
            not_after: r.u64("not_after")?,
            ca_key_version: r.u32("ca_key_version")?,
        };
        r.finish()?;
        v.validate()?;
        Ok(v)
    }
}

impl fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("device_id", &hex::encode(self.device_id))
            .field("device_public_key", &hex::encode(self.device_public_key))
            .field("account_ref_len", &self.account_ref.len())
            .field("limits", &self.limits)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("ca_key_version", &self.ca_key_version)
            .finish()
    }
}

/// An e-cash voucher: a balance a device may spend offline; signed by
/// `voucher.issuer` version `issuer_key_version`.
#[derive(Clone, PartialEq, Eq)]
pub struct Voucher {
    pub voucher_id: [u8; 16],
    pub device_id: [u8; 16],
    /// ISO 4217 alphabetic code, A-Z only.
    pub currency: [u8; 3],
    pub balance: u64,
    /// The device's payment counter when issued; the first payment carries this + 1.
    pub counter_at_issue: u64,
    pub issued_at: u64,
    /// `> issued_at`.
    pub expires_at: u64,
    /// `>= 1`.
    pub issuer_key_version: u32,
}

impl Signable for Voucher {
    const TAG: &'static str = TAG_VOUCHER;
    const KIND: &'static str = "voucher";

    fn visit_fields(&self, f: &mut dyn FnMut(&[u8])) {
        f(&[FORMAT_V1]);
        f(&self.voucher_id);
        f(&self.device_id);
        f(&self.currency);
        f(&self.balance.to_be_bytes());
        f(&self.counter_at_issue.to_be_bytes());
        f(&self.issued_at.to_be_bytes());
        f(&self.expires_at.to_be_bytes());
        f(&self.issuer_key_version.to_be_bytes());
    }

    fn validate(&self) -> Result<(), EcashError> {
        let k = Self::KIND;
        check_currency(k, &self.currency)?;
        if self.expires_at <= self.issued_at {
            return Err(bad(k, "expires_at", "must be after issued_at"));
        }
        if self.issuer_key_version == 0 {
            return Err(bad(k, "issuer_key_version", "must be at least 1"));
        }
        Ok(())
    }

    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError> {
        let mut r = Fields::open(tbs, Self::TAG, Self::KIND)?;
        let v = Voucher {
            voucher_id: r.fixed("voucher_id")?,
            device_id: r.fixed("device_id")?,
            currency: r.fixed("currency")?,
            balance: r.u64("balance")?,
            counter_at_issue: r.u64("counter_at_issue")?,
            issued_at: r.u64("issued_at")?,
            expires_at: r.u64("expires_at")?,
            issuer_key_version: r.u32("issuer_key_version")?,
        };
        r.finish()?;
        v.validate()?;
        Ok(v)
    }
}

impl fmt::Debug for Voucher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Voucher")
            .field("voucher_id", &hex::encode(self.voucher_id))
            .field("device_id", &hex::encode(self.device_id))
            .field("currency", &String::from_utf8_lossy(&self.currency))
            .field("balance", &self.balance)
            .field("counter_at_issue", &self.counter_at_issue)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("issuer_key_version", &self.issuer_key_version)
            .finish()
    }
}

/// An offline payment, signed by the device key. `prev_hash` is the
/// [`Signed::hash`] of the previous payment of the voucher, or of the voucher itself
/// for the first payment.
#[derive(Clone, PartialEq, Eq)]
pub struct Payment {
    pub voucher_id: [u8; 16],
    pub device_id: [u8; 16],
    pub counter: u64,
    pub prev_hash: [u8; 32],
    /// `> 0`.
    pub amount: u64,
    pub balance_after: u64,
    pub currency: [u8; 3],
    /// 1..=32 printable ASCII (0x21..=0x7E).
    pub merchant_id: String,
    /// 1..=16 printable ASCII (0x21..=0x7E).
    pub terminal_id: String,
    /// The terminal's random challenge.
    pub challenge: [u8; 16],
    /// The terminal's clock (unix seconds) when it issued the challenge.
    pub terminal_time: u64,
}

impl Signable for Payment {
    const TAG: &'static str = TAG_PAYMENT;
    const KIND: &'static str = "payment";
    const DEVICE_SIGNED: bool = true;

    fn visit_fields(&self, f: &mut dyn FnMut(&[u8])) {
        f(&[FORMAT_V1]);
        f(&self.voucher_id);
        f(&self.device_id);
        f(&self.counter.to_be_bytes());
        f(&self.prev_hash);
        f(&self.amount.to_be_bytes());
        f(&self.balance_after.to_be_bytes());
        f(&self.currency);
        f(self.merchant_id.as_bytes());
        f(self.terminal_id.as_bytes());
        f(&self.challenge);
        f(&self.terminal_time.to_be_bytes());
    }

    fn validate(&self) -> Result<(), EcashError> {
        let k = Self::KIND;
        if self.amount == 0 {
            return Err(bad(k, "amount", "must be positive"));
        }
        check_currency(k, &self.currency)?;
        check_printable(k, "merchant_id", &self.merchant_id, MAX_MERCHANT_ID)?;
        check_printable(k, "terminal_id", &self.terminal_id, MAX_TERMINAL_ID)
    }

    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError> {
        let mut r = Fields::open(tbs, Self::TAG, Self::KIND)?;
        let v = Payment {
            voucher_id: r.fixed("voucher_id")?,
            device_id: r.fixed("device_id")?,
            counter: r.u64("counter")?,
            prev_hash: r.fixed("prev_hash")?,
            amount: r.u64("amount")?,
            balance_after: r.u64("balance_after")?,
            currency: r.fixed("currency")?,
            merchant_id: r.string("merchant_id")?,
            terminal_id: r.string("terminal_id")?,
            challenge: r.fixed("challenge")?,
            terminal_time: r.u64("terminal_time")?,
        };
        r.finish()?;
        v.validate()?;
        Ok(v)
    }
}

impl fmt::Debug for Payment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payment")
            .field("voucher_id", &hex::encode(self.voucher_id))
            .field("device_id", &hex::encode(self.device_id))
            .field("counter", &self.counter)
            .field("prev_hash", &hex::encode(self.prev_hash))
            .field("amount", &self.amount)
            .field("balance_after", &self.balance_after)
            .field("currency", &String::from_utf8_lossy(&self.currency))
            .field("merchant_id", &self.merchant_id)
            .field("terminal_id", &self.terminal_id)
            .field("challenge", &hex::encode(self.challenge))
            .field("terminal_time", &self.terminal_time)
            .finish()
    }
}

/// The role of a key in a trust bundle (one byte on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum KeyRole {
    /// `device.ca`: signs device certificates.
    DeviceCa = 1,
    /// `voucher.issuer`: signs vouchers.
    VoucherIssuer = 2,
}

impl KeyRole {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<KeyRole> {
        match code {
            1 => Some(KeyRole::DeviceCa),
            2 => Some(KeyRole::VoucherIssuer),
            _ => None,
        }
    }
}

/// One trusted key of a bundle. `not_after = u64::MAX` means no end.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub role: KeyRole,
    pub algorithm: KeyAlgorithm,
    /// `>= 1`.
    pub version: u32,
    /// SEC1 uncompressed point (P-256, 65 bytes) or the Ed25519 key (32 bytes).
    pub public_key: Vec<u8>,
    /// Unix seconds, `< not_after`.
    pub not_before: u64,
    pub not_after: u64,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKey")
            .field("role", &self.role)
            .field("algorithm", &self.algorithm)
            .field("version", &self.version)
            .field("public_key", &hex::encode(&self.public_key))
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The keys terminals trust, signed by `ecash.root` version `root_key_version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    pub bundle_version: u64,
    pub issued_at: u64,
    /// `>= 1`.
    pub root_key_version: u32,
    /// 1..=64 keys, strictly increasing by (role, version).
    pub keys: Vec<TrustedKey>,
}

impl TrustBundle {
    /// The `keys` field: count u16 BE, then each key as role(1) algorithm(1)
    /// version(4) public key (65 for P-256, 32 for Ed25519) not_before(8) not_after(8).
    fn keys_field(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.keys.len() * trusted_key_len(KeyAlgorithm::P256));
        out.extend_from_slice(&(self.keys.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        for k in &self.keys {
            out.push(k.role.code());
            out.push(k.algorithm.code());
            out.extend_from_slice(&k.version.to_be_bytes());
            out.extend_from_slice(&k.public_key);
            out.extend_from_slice(&k.not_before.to_be_bytes());
            out.extend_from_slice(&k.not_after.to_be_bytes());
        }
        out
    }

    fn parse_keys(b: &[u8]) -> Result<Vec<TrustedKey>, EcashError> {
        let k = Self::KIND;
        let (count, mut rest) = b.split_first_chunk::<2>().ok_or(bad(k, "keys", "truncated"))?;
        let count = usize::from(u16::from_be_bytes(*count));
        if count == 0 || count > MAX_BUNDLE_KEYS {
            return Err(bad(k, "keys", "must hold 1 to 64 keys"));
        }
        let mut keys = Vec::with_capacity(count);
        while let Some((role, r)) = rest.split_first() {
            if keys.len() == count {
                return Err(bad(k, "keys", "wrong length"));
            }
            let role = KeyRole::from_code(*role).ok_or(bad(k, "keys.role", "unknown role"))?;
            let (algorithm, r) = r.split_first().ok_or(bad(k, "keys", "truncated"))?;
            let algorithm = KeyAlgorithm::from_code(*algorithm).ok_or(bad(k, "keys.algorithm", "unknown algorithm"))?;
            let (version, r) = r.split_first_chunk::<4>().ok_or(bad(k, "keys", "truncated"))?;
            if r.len() < algorithm.key_len() {
                return Err(bad(k, "keys", "truncated"));
            }
            let (public_key, r) = r.split_at(algorithm.key_len());
            let (not_before, r) = r.split_first_chunk::<8>().ok_or(bad(k, "keys", "truncated"))?;
            let (not_after, r) = r.split_first_chunk::<8>().ok_or(bad(k, "keys", "truncated"))?;
            keys.push(TrustedKey {
                role,
                algorithm,
                version: u32::from_be_bytes(*version),
                public_key: public_key.to_vec(),
                not_before: u64::from_be_bytes(*not_before),
                not_after: u64::from_be_bytes(*not_after),
            });
            rest = r;
        }
        if keys.len() != count {
            return Err(bad(k, "keys", "wrong length"));
        }
        Ok(keys)
    }
}

impl Signable for TrustBundle {
    const TAG: &'static str = TAG_TRUST_BUNDLE;
    const KIND: &'static str = "trust bundle";

    fn visit_fields(&self, f: &mut dyn FnMut(&[u8])) {
        f(&[FORMAT_V1]);
        f(&self.bundle_version.to_be_bytes());
        f(&self.issued_at.to_be_bytes());
        f(&self.root_key_version.to_be_bytes());
        f(&self.keys_field());
    }

    fn validate(&self) -> Result<(), EcashError> {
        let k = Self::KIND;
        if self.root_key_version == 0 {
            return Err(bad(k, "root_key_version", "must be at least 1"));
        }
        if self.keys.is_empty() || self.keys.len() > MAX_BUNDLE_KEYS {
            return Err(bad(k, "keys", "must hold 1 to 64 keys"));
        }
        for key in &self.keys {
            if key.version == 0 {
                return Err(bad(k, "keys.version", "must be at least 1"));
            }
            if key.not_before >= key.not_after {
                return Err(bad(k, "keys.not_after", "must be after not_before"));
            }
            PublicKey::from_raw(key.algorithm, &key.public_key)
                .map_err(|_| bad(k, "keys.public_key", "not a public key of its algorithm"))?;
        }
        let sorted = self
            .keys
            .windows(2)
            .all(|w| matches!(w, [a, b] if (a.role, a.version) < (b.role, b.version)));
        if !sorted {
            return Err(bad(k, "keys", "must be sorted by (role, version) without duplicates"));
        }
        Ok(())
    }

    fn decode_tbs(tbs: &[u8]) -> Result<Self, EcashError> {
        let mut r = Fields::open(tbs, Self::TAG, Self::KIND)?;
        let bundle_version = r.u64("bundle_version")?;
        let issued_at = r.u64("issued_at")?;
        let root_key_version = r.u32("root_key_version")?;
        let keys = Self::parse_keys(r.raw("keys")?)?;
        r.finish()?;
        let v = TrustBundle {
            bundle_version,
            issued_at,
            root_key_version,
            keys,
        };
        v.validate()?;
        Ok(v)
    }
}

macro_rules! inherent_tbs {
    ($($t:ty),*) => {
        $(impl $t {
            /// The to-be-signed bytes (see [`Signable::tbs`]).
            pub fn tbs(&self) -> Vec<u8> {
                Signable::tbs(self)
            }
        })*
    };
}
inherent_tbs!(CertificationRequest, DeviceCertificate, Voucher, Payment, TrustBundle);

/// A signed object: `body` and the 64-byte raw `r || s` signature over SHA-256 of its
/// tbs bytes. Wire bytes: tbs || signature.
#[derive(Clone, PartialEq, Eq)]
pub struct Signed<T> {
    pub body: T,
    pub signature: [u8; SIG_LEN],
}

impl<T: Signable> Signed<T> {
    /// Checks `body`'s rules, then signs its tbs bytes with `key` (low-S).
    pub fn sign(body: T, key: &SigningKey) -> Result<Signed<T>, EcashError> {
        body.validate()?;
        Self::sign_unchecked(body, key)
    }

    /// Signs without checking the rules (simulators and tests forging bad objects).
    pub(crate) fn sign_unchecked(body: T, key: &SigningKey) -> Result<Signed<T>, EcashError> {
        let signature = key.sign_digest(&tbs_digest(&body))?;
        Ok(Signed { body, signature })
    }

    /// Wire bytes: tbs || signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        write_tbs(&self.body, &mut |b| out.extend_from_slice(b));
        out.extend_from_slice(&self.signature);
        out
    }

    /// Strict inverse of [`Signed::encode`]: the tbs part must decode strictly as `T`,
    /// the last 64 bytes must be a canonical (low-S, in-range) P-256 signature. Does
    /// not verify the signature: see [`Signed::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Signed<T>, EcashError> {
        let split = bytes
            .len()
            .checked_sub(SIG_LEN)
            .ok_or(bad(T::KIND, "signature", "truncated"))?;
        let (tbs, sig) = bytes.split_at(split);
        let body = T::decode_tbs(tbs)?;
        let signature: [u8; SIG_LEN] = sig.try_into().map_err(|_| bad(T::KIND, "signature", "truncated"))?;
        if T::DEVICE_SIGNED && !sig::is_canonical(&signature) {
            return Err(bad(T::KIND, "signature", "not a canonical low-S P-256 signature"));
        }
        Ok(Signed { body, signature })
    }

    /// SHA-256 of the wire bytes (computed without building them).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        write_tbs(&self.body, &mut |b| h.update(b));
        h.update(&self.signature);
        h.finish()
    }

    /// Verifies the signature over the tbs bytes under `key`: ECDSA P-256 (refusing
    /// high-S) or pure Ed25519, by the key's algorithm.
    pub fn verify(&self, key: &PublicKey) -> Result<(), EcashError> {
        match key.algorithm() {
            KeyAlgorithm::P256 => sig::verify_digest(key, &tbs_digest(&self.body), &self.signature),
            KeyAlgorithm::Ed25519 => sig::verify(key, &self.body.tbs(), &self.signature),
        }
    }
}

/// SHA-256 of the tbs bytes (computed without building them).
fn tbs_digest<T: Signable>(body: &T) -> [u8; 32] {
    let mut h = Sha256::new();
    write_tbs(body, &mut |b| h.update(b));
    h.finish()
}

impl<T: fmt::Debug> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("body", &self.body)
            .field("signature", &hex::encode(self.signature))
            .finish()
    }
}

/// What a wallet hands a terminal and what a ledger uploads: the device certificate,
/// the voucher, the previous payment of the voucher (absent for the first) and the
/// payment. Encoded as `domain_separated("keyward/v1/ecash/presented", [[1],
/// certificate, voucher, previous or empty, payment])`, each part its wire bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presented {
    pub certificate: Signed<DeviceCertificate>,
    pub voucher: Signed<Voucher>,
    pub previous: Option<Signed<Payment>>,
    pub payment: Signed<Payment>,
}

impl Presented {
    pub fn encode(&self) -> Vec<u8> {
        let previous = self.previous.as_ref().map(Signed::encode).unwrap_or_default();
        crate::crypto::encoding::domain_separated(
            TAG_PRESENTED,
            &[
                &[FORMAT_V1],
                &self.certificate.encode(),
                &self.voucher.encode(),
                &previous,
                &self.payment.encode(),
            ],
        )
    }

    /// Strict inverse of [`Presented::encode`]; each part decodes strictly. Signatures
    /// and the payment rules are judged by [`super::check_payment`].
    pub fn decode(bytes: &[u8]) -> Result<Presented, EcashError> {
        let mut r = Fields::open(bytes, TAG_PRESENTED, "presented payment")?;
        let certificate = Signed::decode(r.raw("certificate")?)?;
        let voucher = Signed::decode(r.raw("voucher")?)?;
        let previous = match r.raw("previous")? {
            [] => None,
            b => Some(Signed::decode(b)?),
        };
        let payment = Signed::decode(r.raw("payment")?)?;
        r.finish()?;
        Ok(Presented {
            certificate,
            voucher,
            previous,
            payment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::encoding::domain_separated;
    use crate::ecash::testkit::*;

    fn fields_of<T: Signable>(body: &T) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        body.visit_fields(&mut |f| v.push(f.to_vec()));
        v
    }

    fn same_as_domain_separated<T: Signable>(body: &T) {
        let fields = fields_of(body);
        let refs: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
        assert_eq!(body.tbs(), domain_separated(T::TAG, &refs));
        assert_eq!(fields[0], vec![1u8]);
    }

    /// Round trip, hash, truncation, trailing bytes and the version byte.
    fn strict_round_trip<T: Signable>(s: &Signed<T>) {
        same_as_domain_separated(&s.body);
        let e = s.encode();
        let d = Signed::<T>::decode(&e).unwrap();
        assert_eq!(&d, s);
        assert_eq!(d.encode(), e);
        assert_eq!(s.hash(), crate::crypto::sha256(&e));
        assert_eq!(&e[..e.len() - 64], &s.body.tbs()[..]);
        for n in 0..e.len() {
            assert!(Signed::<T>::decode(&e[..n]).is_err(), "{} truncated to {n}", T::KIND);
        }
        let mut longer = e.clone();
        longer.push(0);
        assert!(Signed::<T>::decode(&longer).is_err());
        let mut longer = e.clone();
        longer.extend_from_slice(&[0; 64]);
        assert!(Signed::<T>::decode(&longer).is_err());
        // Version byte: tag, 0, length 00000001, then the version.
        let pos = T::TAG.len() + 1 + 4;
        assert_eq!(e[pos], 1);
        for v in [0u8, 2, 0xff] {
            let mut x = e.clone();
            x[pos] = v;
            assert!(matches!(
                Signed::<T>::decode(&x),
                Err(EcashError::Malformed { field: "version", .. })
            ));
        }
        let mut x = e.clone();
        x[0] ^= 0x20;
        assert!(matches!(
            Signed::<T>::decode(&x),
            Err(EcashError::Malformed { field: "tag", .. })
        ));
    }

    /// Every byte of the tbs part matters: the raw signature check fails, and a
    /// tampered object either does not decode or does not verify.
    fn every_tbs_byte_matters<T: Signable>(s: &Signed<T>, key: &PublicKey) {
        s.verify(key).unwrap();
        let e = s.encode();
        let tbs_len = e.len() - 64;
        sig::verify_p256(key, &e[..tbs_len], &s.signature).unwrap();
        for i in 0..tbs_len {
            for flip in [0x01u8, 0x80] {
                let mut x = e.clone();
                x[i] ^= flip;
                assert!(
                    sig::verify_p256(key, &x[..tbs_len], &s.signature).is_err(),
                    "{} byte {i}",
                    T::KIND
                );
                if let Ok(d) = Signed::<T>::decode(&x) {
                    assert!(d.verify(key).is_err(), "{} byte {i} still verifies", T::KIND);
                }
            }
        }
    }

    #[test]
    fn every_kind_round_trips_strictly() {
        let k = Kit::new();
        strict_round_trip(&k.wallet.certification_request(b"acct-ref-1", T0).unwrap());
        strict_round_trip(&k.certificate);
        strict_round_trip(&k.voucher);
        strict_round_trip(&k.bundle_signed);
        let mut k = k;
        let (_, p) = k.pay(100);
        strict_round_trip(&p.payment);
    }

    #[test]
    fn every_tbs_byte_is_signed() {
        let mut k = Kit::new();
        every_tbs_byte_matters(&k.certificate, &k.ca.public_key());
        every_tbs_byte_matters(&k.voucher, &k.issuer.public_key());
        every_tbs_byte_matters(&k.bundle_signed, &k.root.public_key());
        let req = k.wallet.certification_request(b"acct-ref-1", T0).unwrap();
        every_tbs_byte_matters(&req, &k.wallet.public_key());
        let (_, p) = k.pay(100);
        every_tbs_byte_matters(&p.payment, &k.wallet.public_key());
    }

    #[test]
    fn device_ids_are_derived_from_device_keys() {
        let k = Kit::new();
        let pk = k.certificate.body.device_public_key;
        let mut input = b"keyward/v1/ecash/device-id\0\0\0\0\x41".to_vec();
        input.extend_from_slice(&pk);
        assert_eq!(device_id_of(&pk)[..], crate::crypto::sha256(&input)[..16]);
        assert_eq!(k.wallet.device_id(), device_id_of(&pk));
        // A request or certificate naming another id for the key does not decode.
        let req = k.wallet.certification_request(b"acct", T0).unwrap();
        let mut body = req.body.clone();
        body.device_id[0] ^= 1;
        let forged = Signed::sign_unchecked(body, &k.ca).unwrap();
        assert!(matches!(
            Signed::<CertificationRequest>::decode(&forged.encode()),
            Err(EcashError::Malformed { field: "device_id", .. })
        ));
        let mut cert = k.certificate.body.clone();
        cert.device_id = [0xD1; 16];
        let forged = Signed::sign_unchecked(cert, &k.ca).unwrap();
        assert!(matches!(
            Signed::<DeviceCertificate>::decode(&forged.encode()),
            Err(EcashError::Malformed { field: "device_id", .. })
        ));
    }

    #[test]
    fn signature_bytes_matter_and_high_s_is_not_decoded() {
        let mut k = Kit::new();
        let e = k.voucher.encode();
        let n = e.len();
        for i in n - 64..n {
            let mut x = e.clone();
            x[i] ^= 1;
            if let Ok(d) = Signed::<Voucher>::decode(&x) {
                assert!(d.verify(&k.issuer.public_key()).is_err(), "signature byte {i}");
            }
        }
        let mut high = k.voucher.clone();
        high.signature[32..].copy_from_slice(&n_minus_s(&k.voucher.signature));
        assert_eq!(high.verify(&k.issuer.public_key()), Err(EcashError::BadSignature));
        // An appliance object may carry an Ed25519 signature: its P-256 high-S is
        // refused when verified, once the key's algorithm is known.
        let decoded = Signed::<Voucher>::decode(&high.encode()).unwrap();
        assert_eq!(decoded.verify(&k.issuer.public_key()), Err(EcashError::BadSignature));
        // A device-signed object (always P-256) is not even decoded.
        let (_, p) = k.pay(100);
        let mut hp = p.payment.clone();
        hp.signature[32..].copy_from_slice(&n_minus_s(&p.payment.signature));
        assert!(matches!(
            Signed::<Payment>::decode(&hp.encode()),
            Err(EcashError::Malformed { field: "signature", .. })
        ));
    }

    #[test]
    fn kinds_never_cross_decode() {
        let mut k = Kit::new();
        let (_, p) = k.pay(100);
        let req = k.wallet.certification_request(b"acct-ref-1", T0).unwrap();
        let all = [
            req.encode(),
            k.certificate.encode(),
            k.voucher.encode(),
            p.payment.encode(),
            k.bundle_signed.encode(),
        ];
        for (i, e) in all.iter().enumerate() {
            assert_eq!(Signed::<CertificationRequest>::decode(e).is_ok(), i == 0);
            assert_eq!(Signed::<DeviceCertificate>::decode(e).is_ok(), i == 1);
            assert_eq!(Signed::<Voucher>::decode(e).is_ok(), i == 2);
            assert_eq!(Signed::<Payment>::decode(e).is_ok(), i == 3);
            assert_eq!(Signed::<TrustBundle>::decode(e).is_ok(), i == 4);
            assert!(Presented::decode(e).is_err());
        }
        assert!(matches!(
            Signed::<Payment>::decode(&k.voucher.encode()),
            Err(EcashError::Malformed { field: "tag", .. })
        ));
    }

    /// Signs `body` without the rules, then expects decoding to refuse it.
    fn refused<T: Signable>(body: T, key: &SigningKey, field: &str) {
        let s = Signed::sign_unchecked(body.clone(), key).unwrap();
        match Signed::<T>::decode(&s.encode()) {
            Err(EcashError::Malformed { field: f, .. }) => assert_eq!(f, field, "{body:?}"),
            other => panic!("{body:?} decoded: {other:?}"),
        }
        assert!(Signed::sign(body, key).is_err());
    }

    #[test]
    fn invalid_fields_refused() {
        let k = Kit::new();
        let key = &k.issuer;
        let v = k.voucher.body.clone();
        refused(
            Voucher {
                currency: *b"usd",
                ..v.clone()
            },
            key,
            "currency",
        );
        refused(
            Voucher {
                currency: *b"U1D",
                ..v.clone()
            },
            key,
            "currency",
        );
        refused(
            Voucher {
                expires_at: v.issued_at,
                ..v.clone()
            },
            key,
            "expires_at",
        );
        refused(
            Voucher {
                issuer_key_version: 0,
                ..v.clone()
            },
            key,
            "issuer_key_version",
        );

        let c = k.certificate.body.clone();
        let mut off_curve = c.device_public_key;
        off_curve[64] ^= 1;
        refused(
            DeviceCertificate {
                device_public_key: off_curve,
                ..c.clone()
            },
            key,
            "device_public_key",
        );
        let mut compressed = c.device_public_key;
        compressed[0] = 2;
        refused(
            DeviceCertificate {
                device_public_key: compressed,
                ..c.clone()
            },
            key,
            "device_public_key",
        );
        refused(
            DeviceCertificate {
                account_ref: vec![],
                ..c.clone()
            },
            key,
            "account_ref",
        );
        refused(
            DeviceCertificate {
                account_ref: vec![7; 65],
                ..c.clone()
            },
            key,
            "account_ref",
        );
        refused(
            DeviceCertificate {
                not_after: c.not_before,
                ..c.clone()
            },
            key,
            "not_after",
        );
        refused(
            DeviceCertificate {
                ca_key_version: 0,
                ..c.clone()
            },
            key,
            "ca_key_version",
        );
        let limits = OfflineLimits {
            max_single_payment: c.limits.max_balance + 1,
            ..c.limits
        };
        refused(DeviceCertificate { limits, ..c.clone() }, key, "max_single_payment");
        let limits = OfflineLimits {
            max_consecutive_offline: 0,
            ..c.limits
        };
        refused(
            DeviceCertificate { limits, ..c.clone() },
            key,
            "max_consecutive_offline",
        );
        Signed::sign(
            DeviceCertificate {
                account_ref: vec![7; 64],
                ..c.clone()
            },
            key,
        )
        .unwrap();

        let p = sample_payment(&k);
        refused(Payment { amount: 0, ..p.clone() }, key, "amount");
        refused(
            Payment {
                currency: *b"CN\0",
                ..p.clone()
            },
            key,
            "currency",
        );
        refused(
            Payment {
                merchant_id: String::new(),
                ..p.clone()
            },
            key,
            "merchant_id",
        );
        refused(
            Payment {
                merchant_id: "m".repeat(33),
                ..p.clone()
            },
            key,
            "merchant_id",
        );
        refused(
            Payment {
                merchant_id: "shop 1".into(),
                ..p.clone()
            },
            key,
            "merchant_id",
        );
        refused(
            Payment {
                merchant_id: "caf\u{e9}".into(),
                ..p.clone()
            },
            key,
            "merchant_id",
        );
        refused(
            Payment {
                terminal_id: "t".repeat(17),
                ..p.clone()
            },
            key,
            "terminal_id",
        );
        refused(
            Payment {
                terminal_id: "t\x7f".into(),
                ..p.clone()
            },
            key,
            "terminal_id",
        );
        let ok = Payment {
            merchant_id: "m".repeat(32),
            terminal_id: "!~".repeat(8),
            ..p.clone()
        };
        let s = Signed::sign(ok, key).unwrap();
        assert_eq!(Signed::<Payment>::decode(&s.encode()).unwrap(), s);

        let b = k.bundle_signed.body.clone();
        refused(
            TrustBundle {
                keys: vec![],
                ..b.clone()
            },
            key,
            "keys",
        );
        refused(
            TrustBundle {
                root_key_version: 0,
                ..b.clone()
            },
            key,
            "root_key_version",
        );
        let mut dup = b.clone();
        dup.keys.push(dup.keys[1].clone());
        refused(dup, key, "keys");
        let mut unsorted = b.clone();
        unsorted.keys.reverse();
        refused(unsorted, key, "keys");
        let mut v0 = b.clone();
        v0.keys[0].version = 0;
        refused(v0, key, "keys.version");
        let mut window = b.clone();
        window.keys[0].not_after = window.keys[0].not_before;
        refused(window, key, "keys.not_after");
        let mut pk = b.clone();
        pk.keys[0].public_key[64] ^= 1;
        refused(pk, key, "keys.public_key");
        let mut many = b.clone();
        many.keys = (1..=65u32)
            .map(|version| TrustedKey {
                version,
                ..b.keys[0].clone()
            })
            .collect();
        refused(many.clone(), key, "keys");
        many.keys.truncate(64);
        let s = Signed::sign(many, key).unwrap();
        assert_eq!(Signed::<TrustBundle>::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn bundle_key_list_is_strict() {
        let k = Kit::new();
        let e = k.bundle_signed.encode();
        // Locate the keys field: tag, 0, version(4+1), bundle_version(4+8), issued_at(4+8),
        // root_key_version(4+4), then the keys field length and its count.
        let keys_at = TAG_TRUST_BUNDLE.len() + 1 + 5 + 12 + 12 + 8;
        let len = u32::from_be_bytes(e[keys_at..keys_at + 4].try_into().unwrap()) as usize;
        assert_eq!(len, 2 + 2 * trusted_key_len(KeyAlgorithm::P256));
        assert_eq!(&e[keys_at + 4..keys_at + 6], &[0, 2]);
        for count in [0u8, 1, 3] {
            let mut x = e.clone();
            x[keys_at + 5] = count;
            assert!(Signed::<TrustBundle>::decode(&x).is_err(), "count {count}");
        }
        let role_at = keys_at + 6;
        for role in [0u8, 3] {
            let mut x = e.clone();
            x[role_at] = role;
            assert!(matches!(
                Signed::<TrustBundle>::decode(&x),
                Err(EcashError::Malformed { field: "keys.role", .. })
            ));
        }
    }

    #[test]
    fn field_length_changes_refused() {
        let k = Kit::new();
        let e = k.voucher.encode();
        // currency field: tag, 0, version(5), voucher_id(4+16), device_id(4+16), then
        // the currency length.
        let at = TAG_VOUCHER.len() + 1 + 5 + 20 + 20;
        assert_eq!(&e[at..at + 4], &[0, 0, 0, 3]);
        for len in [2u8, 4] {
            let mut x = e.clone();
            x[at + 3] = len;
            assert!(Signed::<Voucher>::decode(&x).is_err());
        }
        let mut x = e.clone();
        x[at] = 0x80;
        assert!(Signed::<Voucher>::decode(&x).is_err());
    }

    #[test]
    fn presented_round_trip_and_strictness() {
        let mut k = Kit::new();
        let (_, first) = k.pay(100);
        let (_, second) = k.pay(200);
        assert!(first.previous.is_none());
        assert_eq!(second.previous.as_ref(), Some(&first.payment));
        for p in [&first, &second] {
            let e = p.encode();
            let d = Presented::decode(&e).unwrap();
            assert_eq!(&d, p);
            assert_eq!(d.encode(), e);
            for n in 0..e.len() {
                assert!(Presented::decode(&e[..n]).is_err(), "truncated to {n}");
            }
            let mut longer = e.clone();
            longer.push(0);
            assert!(Presented::decode(&longer).is_err());
        }
        // Parts in the wrong slot are refused.
        let swapped = domain_separated(
            TAG_PRESENTED,
            &[
                &[1],
                &first.voucher.encode(),
                &first.certificate.encode(),
                &[],
                &first.payment.encode(),
            ],
        );
        assert!(Presented::decode(&swapped).is_err());
        let prev_as_voucher = domain_separated(
            TAG_PRESENTED,
            &[
                &[1],
                &first.certificate.encode(),
                &first.voucher.encode(),
                &first.voucher.encode(),
                &first.payment.encode(),
            ],
        );
        assert!(Presented::decode(&prev_as_voucher).is_err());
        let v2 = domain_separated(
            TAG_PRESENTED,
            &[
                &[2],
                &first.certificate.encode(),
                &first.voucher.encode(),
                &[],
                &first.payment.encode(),
            ],
        );
        assert!(Presented::decode(&v2).is_err());
    }

    #[test]
    fn debug_hides_account_ref() {
        let k = Kit::new();
        let secret = b"6222020200112233445";
        let c = DeviceCertificate {
            account_ref: secret.to_vec(),
            ..k.certificate.body.clone()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("6222") && !s.contains(&hex::encode(&secret[..4])), "{s}");
        assert!(s.contains("account_ref_len: 19"), "{s}");
        let r = CertificationRequest {
            device_id: [1; 16],
            device_public_key: c.device_public_key,
            account_ref: secret.to_vec(),
            timestamp: 1,
        };
        let s = format!("{r:?}");
        assert!(!s.contains("6222") && !s.contains(&hex::encode(&secret[..4])), "{s}");
    }

    /// The worked example of docs/ecash-format.md decodes, re-encodes byte-identically
    /// and verifies under the documented public key (SEC1 and PEM forms).
    #[test]
    fn documented_voucher_example() {
        const DOC: &str = include_str!("../../docs/ecash-format.md");
        let block = |marker: &str| -> String {
            let start = DOC.find(marker).unwrap_or_else(|| panic!("marker {marker}"));
            let rest = &DOC[start..];
            let open = rest.find("```").unwrap();
            let body = &rest[open..];
            let body = &body[body.find('\n').unwrap() + 1..];
            body[..body.find("```").unwrap()].to_string()
        };
        let hex_of = |marker: &str| -> Vec<u8> {
            let text: String = block(marker)
                .lines()
                .map(|l| l.split('#').next().unwrap_or(""))
                .flat_map(|l| l.split_whitespace())
                .collect();
            hex::decode(text).unwrap()
        };
        let wire = hex_of("<!-- example:voucher-wire -->");
        let sec1: [u8; 65] = hex_of("<!-- example:voucher-key-sec1 -->").try_into().unwrap();
        let pem = block("<!-- example:voucher-key-pem -->");
        let key = PublicKey::from_sec1(&sec1).unwrap();
        assert_eq!(PublicKey::from_pem(pem.as_bytes()).unwrap(), key);
        let v = Signed::<Voucher>::decode(&wire).unwrap();
        assert_eq!(v.encode(), wire);
        v.verify(&key).unwrap();
        assert_eq!(v.body, example_voucher_body());
        let hash = hex_of("<!-- example:voucher-hash -->");
        assert_eq!(v.hash().to_vec(), hash);
    }
}
