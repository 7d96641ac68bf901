//! Pure formats of dynamic codes (OTP): RFC 4226 truncation, TOTP steps, the
//! transaction context a payment code is bound to, the HMAC input of a challenge's
//! code, the sealed challenge and its token framing, wrapped TOTP/HOTP seed blobs and
//! otpauth:// provisioning URIs. The HMACs themselves run in the PKCS#11 token; codes
//! and seeds handled here live in zeroizing memory and never appear in Debug output
//! or error messages.

use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::encoding::domain_separated;

/// Domain tag of a challenge code's HMAC input.
const TAG_CODE: &str = "keyward/v1/otp";
/// Domain tag of the transaction-context digest.
const TAG_CONTEXT: &str = "keyward/v1/otp-context";
/// Domain tag of the challenge seal's AES-GCM associated data.
const TAG_CHALLENGE: &str = "keyward/v1/otp-challenge";
/// Domain tag of the seed blob's MAC input.
const TAG_SEED: &str = "keyward/v1/otp-seed";

/// Format version byte of [`Challenge`], [`SeedBlob`] and challenge tokens.
const FORMAT_V1: u8 = 1;
/// Encoded length of a [`Challenge`]: version, id, nonce, key version, issued,
/// expires, digits, boot, max attempts.
const CHALLENGE_LEN: usize = 1 + 16 + 16 + 4 + 8 + 8 + 1 + 16 + 1;
/// AES-GCM IV and tag lengths of a challenge token.
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Shortest challenge token: version, seal key version, IV, tag (empty ciphertext).
const MIN_TOKEN_LEN: usize = 1 + 4 + IV_LEN + TAG_LEN;
/// Length of a seed blob's MAC (HMAC-SHA-256).
pub const SEED_MAC_LEN: usize = 32;
/// Fixed header of a seed blob before the wrapped seed.
const SEED_HEADER_LEN: usize = 1 + 4 + 4 + 1 + 1 + 4 + 2;
/// Longest TOTP period a seed blob may carry, in seconds.
const MAX_PERIOD: u32 = 300;

/// Longest subject, payee id and reference, in characters (all ASCII).
const MAX_SUBJECT: usize = 128;
const MAX_PURPOSE: usize = 32;
const MAX_CONTEXT_ID: usize = 64;

/// What went wrong with an OTP input. Messages name the field and the rule, never the
/// value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtpError {
    #[error("{field}: {msg}")]
    Invalid { field: &'static str, msg: String },
}

fn invalid(field: &'static str, msg: &str) -> OtpError {
    OtpError::Invalid {
        field,
        msg: msg.to_owned(),
    }
}

/// The HMAC hash of an OTP key or seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtpHash {
    Sha1,
    Sha256,
    Sha512,
}

impl OtpHash {
    /// Digest (and HMAC output) length in bytes: 20, 32 or 64.
    pub fn digest_len(self) -> usize {
        match self {
            OtpHash::Sha1 => 20,
            OtpHash::Sha256 => 32,
            OtpHash::Sha512 => 64,
        }
    }

    /// The `algorithm` value of the Key Uri Format: "SHA1", "SHA256" or "SHA512".
    pub fn uri_name(self) -> &'static str {
        match self {
            OtpHash::Sha1 => "SHA1",
            OtpHash::Sha256 => "SHA256",
            OtpHash::Sha512 => "SHA512",
        }
    }

    /// The one-byte code of the seed-blob encoding: 1, 2 or 3.
    pub fn code(self) -> u8 {
        match self {
            OtpHash::Sha1 => 1,
            OtpHash::Sha256 => 2,
            OtpHash::Sha512 => 3,
        }
    }

    /// The hash of a seed-blob code; `None` for any other byte.
    pub fn from_code(code: u8) -> Option<OtpHash> {
        match code {
            1 => Some(OtpHash::Sha1),
            2 => Some(OtpHash::Sha256),
            3 => Some(OtpHash::Sha512),
            _ => None,
        }
    }
}

/// RFC 4226 dynamic truncation of an HMAC output to `digits` (6..=8) decimal digits,
/// zero-left-padded. The HMAC must be at least 20 bytes (SHA-1, SHA-256 or SHA-512);
/// the offset is the low nibble of its last byte for every hash (RFC 6238).
pub fn truncate(hmac: &[u8], digits: u32) -> Result<Zeroizing<String>, OtpError> {
    if !(6..=8).contains(&digits) {
        return Err(invalid("digits", "must be 6, 7 or 8"));
    }
    if hmac.len() < 20 {
        return Err(invalid("hmac", "must be at least 20 bytes"));
    }
    let last = hmac
        .last()
        .ok_or_else(|| invalid("hmac", "must be at least 20 bytes"))?;
    let offset = usize::from(last & 0x0f);
    let window = hmac
        .get(offset..offset + 4)
        .ok_or_else(|| invalid("hmac", "must be at least 20 bytes"))?;
    let mut word = Zeroizing::new([0u8; 4]);
    word.copy_from_slice(window);
    word[0] &= 0x7f;
    let modulus = 10u32.pow(digits);
    let value = Zeroizing::new(u32::from_be_bytes(*word) % modulus);
    // Written digit by digit into a buffer of its final size: no formatting machinery,
    // no reallocation leaving copies of the code behind.
    let mut code = Zeroizing::new(String::with_capacity(8));
    let mut div = modulus / 10;
    while div > 0 {
        let d = (*value / div) % 10;
        code.push(char::from(b'0' + d as u8));
        div /= 10;
    }
    Ok(code)
}

/// The 8-byte big-endian moving factor of HOTP (RFC 4226) and TOTP (RFC 6238).
pub fn counter_bytes(counter: u64) -> [u8; 8] {
    counter.to_be_bytes()
}

/// TOTP time step with T0 = 0: `unix / period`. A period of 0 is treated as 1 (seed
/// blobs never carry one: [`SeedBlob::decode`] refuses it).
pub fn totp_step(unix: u64, period: u32) -> u64 {
    unix / u64::from(period.max(1))
}

/// Checks that `s` is `min..=max` bytes, each accepted by `allowed`. The message
/// names the rule, never the value.
fn check_chars(field: &'static str, s: &str, max: usize, allowed: fn(u8) -> bool, rule: &str) -> Result<(), OtpError> {
    if s.is_empty() || s.len() > max || !s.bytes().all(allowed) {
        return Err(OtpError::Invalid {
            field,
            msg: format!("must be 1 to {max} characters of {rule}"),
        });
    }
    Ok(())
}

fn is_context_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

fn is_subject_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
}

fn is_purpose_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

/// The transaction a payment code is bound to (dynamic linking, PSD2 RTS art. 5): the
/// code authenticates this amount to this payee, not just the user.
#[derive(Clone, PartialEq, Eq)]
pub struct TxContext {
    /// Amount in the currency's minor unit (cents, fen); never negative.
    pub amount_minor: i64,
    /// ISO 4217 alphabetic code: three upper-case ASCII letters.
    pub currency: String,
    /// Payee identifier: 1-64 characters of `[A-Za-z0-9._:-]`.
    pub payee_id: String,
    /// Transaction reference: 1-64 characters of `[A-Za-z0-9._:-]`.
    pub reference: String,
}

impl TxContext {
    /// Checks every field; the error names the first bad one, never its value.
    pub fn validate(&self) -> Result<(), OtpError> {
        if self.amount_minor < 0 {
            return Err(invalid("context.amount_minor", "must not be negative"));
        }
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid("context.currency", "must be 3 upper-case ASCII letters"));
        }
        check_chars(
            "context.payee_id",
            &self.payee_id,
            MAX_CONTEXT_ID,
            is_context_id_char,
            "A-Z a-z 0-9 . _ : -",
        )?;
        check_chars(
            "context.reference",
            &self.reference,
            MAX_CONTEXT_ID,
            is_context_id_char,
            "A-Z a-z 0-9 . _ : -",
        )?;
        Ok(())
    }

    /// SHA-256 of `domain_separated("keyward/v1/otp-context", [amount as 8-byte
    /// big-endian two's complement, currency, payee_id, reference])`. Callers validate
    /// first; the digest of an invalid context is well defined but never issued.
    pub fn digest(&self) -> [u8; 32] {
        let amount = self.amount_minor.to_be_bytes();
        let input = domain_separated(
            TAG_CONTEXT,
            &[
                &amount,
                self.currency.as_bytes(),
                self.payee_id.as_bytes(),
                self.reference.as_bytes(),
            ],
        );
        crate::crypto::sha256(&input)
    }
}

/// Shows amount and currency only: payee ids may be phone numbers.
impl fmt::Debug for TxContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxContext")
            .field("amount_minor", &self.amount_minor)
            .field("currency", &self.currency)
            .finish_non_exhaustive()
    }
}

/// HMAC input of a challenge's code: `domain_separated("keyward/v1/otp", [nonce,
/// subject, purpose, context digest])`. Callers validate subject and purpose first.
pub fn code_input(nonce: &[u8; 16], subject: &str, purpose: &str, context_digest: &[u8; 32]) -> Vec<u8> {
    domain_separated(
        TAG_CODE,
        &[nonce, subject.as_bytes(), purpose.as_bytes(), context_digest],
    )
}

/// A subject is an opaque account id: 1-128 characters of `[A-Za-z0-9._:@-]`.
pub fn validate_subject(s: &str) -> Result<(), OtpError> {
    check_chars("subject", s, MAX_SUBJECT, is_subject_char, "A-Z a-z 0-9 . _ : @ -")
}

/// A purpose names what the code authorises ("activation", "payment",
/// "password-change"): 1-32 characters of `[a-z0-9-]`.
pub fn validate_purpose(p: &str) -> Result<(), OtpError> {
    check_chars("purpose", p, MAX_PURPOSE, is_purpose_char, "a-z 0-9 -")
}

/// What the sealed challenge token carries (encrypted by the appliance with AES-GCM).
/// Wiped on drop; Debug shows only the id and the times.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Challenge {
    /// Random challenge id (also the attempt-store key and the routing key).
    pub id: [u8; 16],
    /// Random nonce entering the code's HMAC input.
    pub nonce: [u8; 16],
    /// Version of the `otp` key that computes the code.
    pub otp_key_version: u32,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the code is refused after this instant.
    pub expires_at: u64,
    /// Code length, 6..=8.
    pub digits: u8,
    /// Boot epoch of the issuing appliance (challenges of an earlier boot are refused).
    pub boot: [u8; 16],
    /// Attempts allowed, at least 1.
    pub max_attempts: u8,
}

impl Challenge {
    /// Fixed layout, 71 bytes: `0x01 | id 16 | nonce 16 | otp_key_version u32 |
    /// issued_at u64 | expires_at u64 | digits u8 | boot 16 | max_attempts u8`, all
    /// integers big-endian.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(CHALLENGE_LEN));
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.otp_key_version.to_be_bytes());
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(self.digits);
        out.extend_from_slice(&self.boot);
        out.push(self.max_attempts);
        out
    }

    /// Strict inverse of [`Challenge::encode`]: `None` for a wrong length or version
    /// byte, key version 0, digits outside 6..=8, no attempts, or an expiry not after
    /// issue.
    pub fn decode(b: &[u8]) -> Option<Challenge> {
        if b.len() != CHALLENGE_LEN {
            return None;
        }
        let mut r = Reader(b);
        if r.u8()? != FORMAT_V1 {
            return None;
        }
        let c = Challenge {
            id: r.array()?,
            nonce: r.array()?,
            otp_key_version: r.u32()?,
            issued_at: r.u64()?,
            expires_at: r.u64()?,
            digits: r.u8()?,
            boot: r.array()?,
            max_attempts: r.u8()?,
        };
        let ok = r.is_empty()
            && c.otp_key_version != 0
            && (6..=8).contains(&c.digits)
            && c.max_attempts >= 1
            && c.expires_at > c.issued_at;
        ok.then_some(c)
    }
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenge")
            .field("id", &hex::encode(self.id))
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Challenge token framing: `0x01 | seal key version u32 BE | 12-byte IV |
/// ciphertext || tag`.
pub fn frame_token(seal_version: u32, iv: &[u8; 12], ct: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 + IV_LEN + ct.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&seal_version.to_be_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(ct);
    out
}

/// Splits a challenge token into seal key version, IV and ciphertext||tag. `None` when
/// shorter than version + key version + IV + tag, with a wrong first byte, or with key
/// version 0.
pub fn parse_token(t: &[u8]) -> Option<(u32, [u8; 12], &[u8])> {
    if t.len() < MIN_TOKEN_LEN {
        return None;
    }
    let mut r = Reader(t);
    if r.u8()? != FORMAT_V1 {
        return None;
    }
    let version = r.u32()?;
    if version == 0 {
        return None;
    }
    let iv = r.array()?;
    Some((version, iv, r.rest()))
}

/// AES-GCM associated data of the challenge seal: `domain_separated(
/// "keyward/v1/otp-challenge", [seal key name, version u32 BE])`.
pub fn seal_aad(seal_key: &str, version: u32) -> Vec<u8> {
    domain_separated(TAG_CHALLENGE, &[seal_key.as_bytes(), &version.to_be_bytes()])
}

/// A TOTP/HOTP seed wrapped under a KEK, bound to its subject by a MAC
/// (HMAC-SHA-256 over [`SeedBlob::mac_input`]). Debug shows no wrapped bytes or MAC.
#[derive(Clone, PartialEq, Eq)]
pub struct SeedBlob {
    pub kek_version: u32,
    pub mac_key_version: u32,
    pub hash: OtpHash,
    /// Code length, 6..=8.
    pub digits: u8,
    /// TOTP period in seconds, 1..=300.
    pub period: u32,
    /// The seed wrapped under the KEK (1..=65535 bytes).
    pub wrapped: Vec<u8>,
    /// 32-byte MAC over [`SeedBlob::mac_input`].
    pub mac: Vec<u8>,
}

impl SeedBlob {
    /// `0x01 | kek_version u32 | mac_key_version u32 | hash code u8 | digits u8 |
    /// period u32 | wrapped len u16 | wrapped | mac`, integers big-endian. Encoding is
    /// total: a blob whose fields break the rules of [`SeedBlob::decode`] (for
    /// example more than 65535 wrapped bytes, whose length field then saturates)
    /// encodes to bytes that `decode` refuses, never to a different valid blob.
    pub fn encode(&self) -> Vec<u8> {
        let wrapped_len = u16::try_from(self.wrapped.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(SEED_HEADER_LEN + self.wrapped.len() + self.mac.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.kek_version.to_be_bytes());
        out.extend_from_slice(&self.mac_key_version.to_be_bytes());
        out.push(self.hash.code());
        out.push(self.digits);
        out.extend_from_slice(&self.period.to_be_bytes());
        out.extend_from_slice(&wrapped_len.to_be_bytes());
        out.extend_from_slice(&self.wrapped);
        out.extend_from_slice(&self.mac);
        out
    }

    /// Strict inverse of [`SeedBlob::encode`]: `None` for a wrong version byte, key
    /// version 0, an unknown hash code, digits outside 6..=8, a period outside
    /// 1..=300, an empty wrapped seed, or anything but exactly 32 MAC bytes after it.
    pub fn decode(b: &[u8]) -> Option<SeedBlob> {
        let mut r = Reader(b);
        if r.u8()? != FORMAT_V1 {
            return None;
        }
        let kek_version = r.u32()?;
        let mac_key_version = r.u32()?;
        let hash = OtpHash::from_code(r.u8()?)?;
        let digits = r.u8()?;
        let period = r.u32()?;
        let wrapped_len = usize::from(r.u16()?);
        let wrapped = r.take(wrapped_len)?.to_vec();
        let mac = r.rest();
        let ok = kek_version != 0
            && mac_key_version != 0
            && (6..=8).contains(&digits)
            && (1..=MAX_PERIOD).contains(&period)
            && wrapped_len > 0
            && mac.len() == SEED_MAC_LEN;
        ok.then(|| SeedBlob {
            kek_version,
            mac_key_version,
            hash,
            digits,
            period,
            wrapped,
            mac: mac.to_vec(),
        })
    }

    /// What the MAC covers: `domain_separated("keyward/v1/otp-seed", [subject,
    /// kek_version u32 BE, mac_key_version u32 BE, hash code, digits, period u32 BE,
    /// wrapped])`, the blob's fields except the MAC in the encoding's order.
    pub fn mac_input(&self, subject: &str) -> Vec<u8> {
        domain_separated(
            TAG_SEED,
            &[
                subject.as_bytes(),
                &self.kek_version.to_be_bytes(),
                &self.mac_key_version.to_be_bytes(),
                &[self.hash.code()],
                &[self.digits],
                &self.period.to_be_bytes(),
                &self.wrapped,
            ],
        )
    }
}

impl fmt::Debug for SeedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedBlob")
            .field("kek_version", &self.kek_version)
            .field("mac_key_version", &self.mac_key_version)
            .field("hash", &self.hash)
            .field("digits", &self.digits)
            .field("period", &self.period)
            .field("wrapped_len", &self.wrapped.len())
            .finish_non_exhaustive()
    }
}

/// Characters percent-encoded in the issuer and account of an otpauth URI: all but
/// the RFC 3986 unreserved ones (so a space becomes `%20` and a `:` `%3A`).
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The Key Uri Format provisioning URI of a TOTP seed:
/// `otpauth://totp/<issuer>:<account>?secret=<BASE32, no padding>&issuer=<issuer>&
/// algorithm=<SHA1|SHA256|SHA512>&digits=<d>&period=<p>`, issuer and account
/// percent-encoded. The URI carries the seed: it stays in zeroizing memory.
pub fn otpauth_uri(
    issuer: &str,
    account: &str,
    secret: &[u8],
    hash: OtpHash,
    digits: u8,
    period: u32,
) -> Zeroizing<String> {
    key_uri("totp", issuer, account, secret, hash, digits, ("&period=", period.to_string()))
}

/// The Key Uri Format provisioning URI of an HOTP seed: as [`otpauth_uri`], with
/// `otpauth://hotp/` and `&counter=<initial counter>` instead of the period.
pub fn otpauth_hotp_uri(
    issuer: &str,
    account: &str,
    secret: &[u8],
    hash: OtpHash,
    digits: u8,
    counter: u64,
) -> Zeroizing<String> {
    key_uri("hotp", issuer, account, secret, hash, digits, ("&counter=", counter.to_string()))
}

/// `otpauth://<kind>/...` with the last parameter `last` (name with its `&` and `=`,
/// value).
fn key_uri(
    kind: &str,
    issuer: &str,
    account: &str,
    secret: &[u8],
    hash: OtpHash,
    digits: u8,
    last: (&str, String),
) -> Zeroizing<String> {
    let issuer = utf8_percent_encode(issuer, URI_COMPONENT).to_string();
    let account = utf8_percent_encode(account, URI_COMPONENT).to_string();
    let enc = &data_encoding::BASE32_NOPAD;
    let mut b32 = Zeroizing::new(vec![0u8; enc.encode_len(secret.len())]);
    enc.encode_mut(secret, &mut b32);
    let digits = digits.to_string();
    let (last_name, last_value) = last;
    let parts: [&str; 15] = [
        "otpauth://",
        kind,
        "/",
        &issuer,
        ":",
        &account,
        "?secret=",
        "", // the secret, pushed separately below
        "&issuer=",
        &issuer,
        "&algorithm=",
        hash.uri_name(),
        "&digits=",
        &digits,
        last_name,
    ];
    let cap = parts.iter().map(|p| p.len()).sum::<usize>() + b32.len() + last_value.len();
    // Sized once so that no reallocation leaves a copy of the secret behind.
    let mut uri = Zeroizing::new(String::with_capacity(cap));
    for (i, p) in parts.iter().enumerate() {
        if i == 7 {
            uri.extend(b32.iter().map(|&b| char::from(b)));
        } else {
            uri.push_str(p);
        }
    }
    uri.push_str(&last_value);
    uri
}

/// Zero-pads an HOTP/TOTP seed shorter than the digest to the digest length
/// (HMAC pads short keys with zeros anyway, so codes do not change, and
/// SoftHSM accepts the key). An empty seed or one longer than the digest is refused.
pub fn pad_seed(seed: &[u8], hash: OtpHash) -> Result<Zeroizing<Vec<u8>>, OtpError> {
    let n = hash.digest_len();
    if seed.is_empty() || seed.len() > n {
        return Err(OtpError::Invalid {
            field: "seed",
            msg: format!("must be 1 to {n} bytes for {}", hash.uri_name()),
        });
    }
    let mut out = Zeroizing::new(vec![0u8; n]);
    out.iter_mut().zip(seed).for_each(|(o, s)| *o = *s);
    Ok(out)
}

/// A bounds-checked big-endian reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;

    fn hmac(hash: OtpHash, key: &[u8], data: &[u8]) -> Vec<u8> {
        let md = match hash {
            OtpHash::Sha1 => MessageDigest::sha1(),
            OtpHash::Sha256 => MessageDigest::sha256(),
            OtpHash::Sha512 => MessageDigest::sha512(),
        };
        let pkey = PKey::hmac(key).unwrap();
        let mut s = Signer::new(md, &pkey).unwrap();
        s.update(data).unwrap();
        s.sign_to_vec().unwrap()
    }

    const SEED_SHA1: &[u8] = b"12345678901234567890";
    const SEED_SHA256: &[u8] = b"12345678901234567890123456789012";
    const SEED_SHA512: &[u8] = b"1234567890123456789012345678901234567890123456789012345678901234";

    #[test]
    fn rfc4226_appendix_d() {
        let want = [
            "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489",
        ];
        for (c, w) in want.iter().enumerate() {
            let mac = hmac(OtpHash::Sha1, SEED_SHA1, &counter_bytes(c as u64));
            assert_eq!(truncate(&mac, 6).unwrap().as_str(), *w, "counter {c}");
        }
    }

    #[test]
    fn rfc6238_appendix_b() {
        let rows: [(u64, &str, &str, &str); 6] = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        assert_eq!(SEED_SHA512.len(), 64);
        for (t, s1, s256, s512) in rows {
            let msg = counter_bytes(totp_step(t, 30));
            for (hash, seed, want) in [
                (OtpHash::Sha1, SEED_SHA1, s1),
                (OtpHash::Sha256, SEED_SHA256, s256),
                (OtpHash::Sha512, SEED_SHA512, s512),
            ] {
                let mac = hmac(hash, seed, &msg);
                assert_eq!(mac.len(), hash.digest_len());
                assert_eq!(truncate(&mac, 8).unwrap().as_str(), want, "{hash:?} at {t}");
            }
        }
    }

    #[test]
    fn truncate_pads_and_refuses() {
        // Offset 0, word 0x00000007 -> 7 digits of zero padding.
        let mut mac = [0u8; 20];
        mac[3] = 7;
        assert_eq!(truncate(&mac, 8).unwrap().as_str(), "00000007");
        assert_eq!(truncate(&mac, 6).unwrap().as_str(), "000007");
        // The top bit of the word is masked.
        mac[0] = 0x80;
        assert_eq!(truncate(&mac, 6).unwrap().as_str(), "000007");
        // Offset 15 reaches the last four bytes of a SHA-1 HMAC.
        let mut mac = [0u8; 20];
        mac[15..20].copy_from_slice(&[0x12, 0x34, 0x56, 0x78, 0x0f]);
        assert_eq!(truncate(&mac, 7).unwrap().as_str(), "5419896"); // 0x12345678 = 305419896
                                                                    // Longer HMACs use the low nibble of their last byte too.
        let mut mac = [0u8; 64];
        mac[63] = 0x0a;
        mac[10..14].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]); // masked: 2147483647
        assert_eq!(truncate(&mac, 8).unwrap().as_str(), "47483647");
        assert_eq!(truncate(&mac, 8).unwrap().len(), 8);
    }

    #[test]
    fn truncate_errors_name_the_field() {
        assert!(matches!(
            truncate(&[0u8; 20], 5),
            Err(OtpError::Invalid { field: "digits", .. })
        ));
        assert!(matches!(
            truncate(&[0u8; 20], 9),
            Err(OtpError::Invalid { field: "digits", .. })
        ));
        assert!(matches!(
            truncate(&[0u8; 19], 6),
            Err(OtpError::Invalid { field: "hmac", .. })
        ));
        assert!(matches!(truncate(&[], 6), Err(OtpError::Invalid { field: "hmac", .. })));
    }

    #[test]
    fn totp_step_basics() {
        assert_eq!(totp_step(59, 30), 1);
        assert_eq!(totp_step(60, 30), 2);
        assert_eq!(totp_step(59, 0), 59);
        assert_eq!(totp_step(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn pad_seed_keeps_codes() {
        let seed = b"0123456789"; // 10 bytes, a legacy authenticator seed
        for hash in [OtpHash::Sha1, OtpHash::Sha256, OtpHash::Sha512] {
            let padded = pad_seed(seed, hash).unwrap();
            assert_eq!(padded.len(), hash.digest_len());
            assert_eq!(&padded[..10], seed);
            assert!(padded[10..].iter().all(|&b| b == 0));
            for c in 0..20u64 {
                let a = hmac(hash, seed, &counter_bytes(c));
                let b = hmac(hash, &padded, &counter_bytes(c));
                assert_eq!(a, b);
                assert_eq!(truncate(&a, 6).unwrap(), truncate(&b, 6).unwrap());
            }
        }
        assert_eq!(pad_seed(SEED_SHA1, OtpHash::Sha1).unwrap().as_slice(), SEED_SHA1);
        assert!(matches!(
            pad_seed(SEED_SHA256, OtpHash::Sha1),
            Err(OtpError::Invalid { field: "seed", .. })
        ));
        assert!(matches!(
            pad_seed(&[], OtpHash::Sha256),
            Err(OtpError::Invalid { field: "seed", .. })
        ));
        assert!(pad_seed(&[1u8; 65], OtpHash::Sha512).is_err());
    }

    #[test]
    fn hash_codes_round_trip() {
        for h in [OtpHash::Sha1, OtpHash::Sha256, OtpHash::Sha512] {
            assert_eq!(OtpHash::from_code(h.code()), Some(h));
        }
        assert_eq!(OtpHash::from_code(0), None);
        assert_eq!(OtpHash::from_code(4), None);
        assert_eq!(OtpHash::Sha256.uri_name(), "SHA256");
    }

    fn ctx() -> TxContext {
        TxContext {
            amount_minor: 12_345,
            currency: "CNY".into(),
            payee_id: "merchant:4711".into(),
            reference: "INV-2024.001".into(),
        }
    }

    #[test]
    fn context_digest_binds_every_field() {
        let base = ctx();
        base.validate().unwrap();
        let d = base.digest();
        assert_eq!(d, ctx().digest());
        let mut c = ctx();
        c.amount_minor += 1;
        assert_ne!(c.digest(), d);
        let mut c = ctx();
        c.payee_id = "merchant:4712".into();
        assert_ne!(c.digest(), d);
        let mut c = ctx();
        c.currency = "USD".into();
        assert_ne!(c.digest(), d);
        let mut c = ctx();
        c.reference = "INV-2024.002".into();
        assert_ne!(c.digest(), d);
        // Field boundaries are unambiguous.
        let mut a = ctx();
        a.payee_id = "ab".into();
        a.reference = "c".into();
        let mut b = ctx();
        b.payee_id = "a".into();
        b.reference = "bc".into();
        assert_ne!(a.digest(), b.digest());
        // Known layout.
        let want = crate::crypto::sha256(&domain_separated(
            "keyward/v1/otp-context",
            &[&12_345i64.to_be_bytes(), b"CNY", b"merchant:4711", b"INV-2024.001"],
        ));
        assert_eq!(d, want);
    }

    fn field_of(e: OtpError) -> (&'static str, String) {
        let text = e.to_string();
        let OtpError::Invalid { field, .. } = e;
        (field, text)
    }

    /// Expected field, how to break the context, and the value that must not be echoed.
    type Case = (&'static str, fn(&mut TxContext), &'static str);

    #[test]
    fn context_validation_names_field_not_value() {
        let cases: [Case; 9] = [
            ("context.amount_minor", |c| c.amount_minor = -98765, "-98765"),
            ("context.currency", |c| c.currency = "cnq".into(), "cnq"),
            ("context.currency", |c| c.currency = "CNYX".into(), "CNYX"),
            (
                "context.payee_id",
                |c| c.payee_id = "+8613812345678".into(),
                "13812345678",
            ),
            ("context.payee_id", |c| c.payee_id = "has space".into(), "has space"),
            ("context.payee_id", |c| c.payee_id = "p".repeat(65), "ppppp"),
            ("context.payee_id", |c| c.payee_id = String::new(), "\u{0}"),
            ("context.reference", |c| c.reference = "ref/secret".into(), "ref/secret"),
            ("context.reference", |c| c.reference = "r\u{e9}f".into(), "r\u{e9}f"),
        ];
        for (want_field, mutate, value) in cases {
            let mut c = ctx();
            mutate(&mut c);
            let (field, text) = field_of(c.validate().unwrap_err());
            assert_eq!(field, want_field);
            assert!(text.starts_with(want_field), "{text}");
            assert!(!text.contains(value), "{text} echoes the value");
        }
        let mut c = ctx();
        c.payee_id = "p".repeat(64);
        c.amount_minor = 0;
        c.validate().unwrap();
    }

    #[test]
    fn context_debug_hides_payee_and_reference() {
        let mut c = ctx();
        c.payee_id = "+8613812345678".into();
        let s = format!("{c:?}");
        assert!(!s.contains("13812345678") && !s.contains("INV-2024"), "{s}");
        assert!(s.contains("12345") && s.contains("CNY"));
    }

    #[test]
    fn subject_and_purpose_validation() {
        validate_subject("acct:8613812345678@bank-a.example").unwrap();
        validate_subject(&"a".repeat(128)).unwrap();
        for bad in ["", "has space", "semi;colon", "+8613812345678", "\u{e9}"] {
            let (field, text) = field_of(validate_subject(bad).unwrap_err());
            assert_eq!(field, "subject");
            assert!(bad.is_empty() || !text.contains(bad), "{text}");
        }
        let long = "b".repeat(129);
        let (_, text) = field_of(validate_subject(&long).unwrap_err());
        assert!(!text.contains("bbbb"));

        for ok in ["activation", "payment", "password-change", "step-2"] {
            validate_purpose(ok).unwrap();
        }
        for bad in ["", "Payment", "pay_ment", "pay ment", &"p".repeat(33)] {
            let (field, text) = field_of(validate_purpose(bad).unwrap_err());
            assert_eq!(field, "purpose");
            assert!(bad.is_empty() || !text.contains(bad), "{text}");
        }
    }

    #[test]
    fn code_input_layout() {
        let nonce = [7u8; 16];
        let digest = ctx().digest();
        let input = code_input(&nonce, "acct:1", "payment", &digest);
        assert_eq!(
            input,
            domain_separated("keyward/v1/otp", &[&nonce, b"acct:1", b"payment", &digest])
        );
        assert!(input.starts_with(b"keyward/v1/otp\0"));
        assert_ne!(input, code_input(&nonce, "acct:1", "activation", &digest));
        assert_ne!(input, code_input(&[8u8; 16], "acct:1", "payment", &digest));
    }

    fn challenge() -> Challenge {
        Challenge {
            id: [0x11; 16],
            nonce: [0xA5; 16],
            otp_key_version: 3,
            issued_at: 1_700_000_000,
            expires_at: 1_700_000_300,
            digits: 6,
            boot: [0x22; 16],
            max_attempts: 5,
        }
    }

    #[test]
    fn challenge_round_trip() {
        let c = challenge();
        let e = c.encode();
        assert_eq!(e.len(), CHALLENGE_LEN);
        assert_eq!(e[0], 1);
        assert_eq!(Challenge::decode(&e), Some(c.clone()));
        for digits in [6, 7, 8] {
            let c2 = Challenge {
                digits,
                id: [digits; 16],
                ..challenge()
            };
            assert_eq!(Challenge::decode(&c2.encode()), Some(c2));
        }
    }

    #[test]
    fn challenge_malformed_is_none() {
        let e = challenge().encode();
        for n in 0..e.len() {
            assert_eq!(Challenge::decode(&e[..n]), None, "truncated to {n}");
        }
        let mut longer = e.to_vec();
        longer.push(0);
        assert_eq!(Challenge::decode(&longer), None);
        let bad = [
            Challenge {
                digits: 5,
                ..challenge()
            },
            Challenge {
                digits: 9,
                ..challenge()
            },
            Challenge {
                max_attempts: 0,
                ..challenge()
            },
            Challenge {
                otp_key_version: 0,
                ..challenge()
            },
            Challenge {
                expires_at: 1_700_000_000,
                ..challenge()
            },
            Challenge {
                expires_at: 1_600_000_000,
                ..challenge()
            },
        ];
        for b in bad {
            assert_eq!(Challenge::decode(&b.encode()), None, "{b:?}");
        }
        for v in [0u8, 2, 0xff] {
            let mut x = e.to_vec();
            x[0] = v;
            assert_eq!(Challenge::decode(&x), None);
        }
        // Corrupting a structural field (key version, times, digits, attempts) is caught;
        // the rest is authenticated by the seal's GCM tag.
        let corrupt = |range: std::ops::Range<usize>, val: u8| {
            let mut x = e.to_vec();
            x[range].fill(val);
            Challenge::decode(&x)
        };
        assert_eq!(corrupt(33..37, 0), None); // otp_key_version
        assert_eq!(corrupt(45..53, 0), None); // expires_at
        assert_eq!(corrupt(37..45, 0xff), None); // issued_at after expiry
        assert_eq!(corrupt(53..54, 0), None); // digits
        assert_eq!(corrupt(53..54, 200), None);
        assert_eq!(corrupt(70..71, 0), None); // max_attempts
    }

    #[test]
    fn challenge_debug_hides_nonce() {
        let s = format!("{:?}", challenge());
        assert!(s.contains(&hex::encode([0x11u8; 16])));
        assert!(s.contains("1700000300"));
        assert!(
            !s.to_lowercase().contains("a5a5") && !s.contains("nonce") && !s.contains("165"),
            "{s}"
        );
        assert!(!s.contains("boot") && !s.contains("34, 34"), "{s}");
    }

    #[test]
    fn token_framing() {
        let iv = [9u8; 12];
        let ct = [0xCCu8; 16 + 71];
        let t = frame_token(7, &iv, &ct);
        assert_eq!(t[0], 1);
        assert_eq!(&t[1..5], &[0, 0, 0, 7]);
        assert_eq!(parse_token(&t), Some((7, iv, &ct[..])));
        // Tag only (empty ciphertext) is the shortest token.
        let t = frame_token(1, &iv, &[0u8; 16]);
        assert_eq!(t.len(), MIN_TOKEN_LEN);
        assert!(parse_token(&t).is_some());
        for n in 0..t.len() {
            assert_eq!(parse_token(&t[..n]), None);
        }
        let mut x = t.clone();
        x[0] = 2;
        assert_eq!(parse_token(&x), None);
        assert_eq!(parse_token(&frame_token(0, &iv, &ct)), None);
    }

    #[test]
    fn seal_aad_layout() {
        assert_eq!(
            seal_aad("otp.seal", 2),
            domain_separated("keyward/v1/otp-challenge", &[b"otp.seal", &[0, 0, 0, 2]])
        );
        assert_ne!(seal_aad("otp.seal", 2), seal_aad("otp.seal", 3));
    }

    fn blob() -> SeedBlob {
        SeedBlob {
            kek_version: 2,
            mac_key_version: 4,
            hash: OtpHash::Sha256,
            digits: 6,
            period: 30,
            wrapped: (0..40u8).collect(),
            mac: vec![0x5A; 32],
        }
    }

    #[test]
    fn seed_blob_round_trip() {
        let b = blob();
        let e = b.encode();
        assert_eq!(e.len(), SEED_HEADER_LEN + 40 + 32);
        assert_eq!(e[0], 1);
        assert_eq!(&e[15..17], &[0, 40]);
        assert_eq!(SeedBlob::decode(&e), Some(b));
        for hash in [OtpHash::Sha1, OtpHash::Sha512] {
            let b = SeedBlob {
                hash,
                digits: 8,
                period: 300,
                wrapped: vec![1],
                ..blob()
            };
            assert_eq!(SeedBlob::decode(&b.encode()), Some(b));
        }
    }

    #[test]
    fn seed_blob_malformed_is_none() {
        let e = blob().encode();
        for n in 0..e.len() {
            assert_eq!(SeedBlob::decode(&e[..n]), None, "truncated to {n}");
        }
        let mut longer = e.clone();
        longer.push(0);
        assert_eq!(SeedBlob::decode(&longer), None);
        let bad = [
            SeedBlob {
                kek_version: 0,
                ..blob()
            },
            SeedBlob {
                mac_key_version: 0,
                ..blob()
            },
            SeedBlob { digits: 5, ..blob() },
            SeedBlob { digits: 9, ..blob() },
            SeedBlob { period: 0, ..blob() },
            SeedBlob { period: 301, ..blob() },
            SeedBlob {
                wrapped: vec![],
                ..blob()
            },
            SeedBlob {
                mac: vec![0; 31],
                ..blob()
            },
            SeedBlob {
                mac: vec![0; 33],
                ..blob()
            },
            SeedBlob {
                wrapped: vec![0; 70_000],
                ..blob()
            },
        ];
        for b in bad {
            assert_eq!(SeedBlob::decode(&b.encode()), None, "{b:?}");
        }
        let corrupt = |pos: usize, val: u8| {
            let mut x = e.clone();
            x[pos] = val;
            SeedBlob::decode(&x)
        };
        assert_eq!(corrupt(0, 2), None); // version
        assert_eq!(corrupt(9, 0), None); // hash code
        assert_eq!(corrupt(9, 4), None);
        assert_eq!(corrupt(10, 0), None); // digits
        assert_eq!(corrupt(14, 0), None); // period 0
        assert_eq!(corrupt(13, 2), None); // period 542
        assert_eq!(corrupt(11, 1), None); // period high byte
        assert_eq!(corrupt(16, 41), None); // wrapped length one too long
        assert_eq!(corrupt(16, 39), None); // one too short
        assert_eq!(corrupt(16, 0), None); // empty wrapped seed
        assert_eq!(corrupt(15, 1), None);
    }

    #[test]
    fn seed_blob_mac_input_covers_every_field() {
        let base = blob().mac_input("acct:1");
        let want = domain_separated(
            "keyward/v1/otp-seed",
            &[
                b"acct:1",
                &[0, 0, 0, 2],
                &[0, 0, 0, 4],
                &[2],
                &[6],
                &[0, 0, 0, 30],
                &(0..40u8).collect::<Vec<_>>(),
            ],
        );
        assert_eq!(base, want);
        assert_ne!(blob().mac_input("acct:2"), base);
        let variants = [
            SeedBlob {
                kek_version: 3,
                ..blob()
            },
            SeedBlob {
                mac_key_version: 5,
                ..blob()
            },
            SeedBlob {
                hash: OtpHash::Sha1,
                ..blob()
            },
            SeedBlob { digits: 8, ..blob() },
            SeedBlob { period: 60, ..blob() },
            SeedBlob {
                wrapped: vec![1; 40],
                ..blob()
            },
        ];
        for v in variants {
            assert_ne!(v.mac_input("acct:1"), base, "{v:?}");
        }
        // The MAC itself is not covered.
        assert_eq!(
            SeedBlob {
                mac: vec![0; 32],
                ..blob()
            }
            .mac_input("acct:1"),
            base
        );
    }

    #[test]
    fn seed_blob_debug_hides_bytes() {
        let s = format!("{:?}", blob());
        assert!(
            !s.contains("90") && !s.contains("wrapped:") && !s.contains("mac:"),
            "{s}"
        );
        assert!(s.contains("wrapped_len: 40"));
    }

    #[test]
    fn otpauth_uri_known_secret() {
        let uri = otpauth_uri("Keyward", "alice@example.com", SEED_SHA1, OtpHash::Sha1, 6, 30);
        assert_eq!(
            uri.as_str(),
            "otpauth://totp/Keyward:alice%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Keyward&algorithm=SHA1&digits=6&period=30"
        );
        assert_eq!(uri.len(), uri.capacity());
    }

    #[test]
    fn otpauth_hotp_uri_known_secret() {
        let uri = otpauth_hotp_uri("Keyward", "alice@example.com", SEED_SHA1, OtpHash::Sha1, 6, 42);
        assert_eq!(
            uri.as_str(),
            "otpauth://hotp/Keyward:alice%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=Keyward&algorithm=SHA1&digits=6&counter=42"
        );
        assert_eq!(uri.len(), uri.capacity());
    }

    #[test]
    fn otpauth_uri_percent_encodes() {
        let uri = otpauth_uri("Bank A", "acct:1 2", b"\x00\x01", OtpHash::Sha512, 8, 60);
        assert_eq!(
            uri.as_str(),
            "otpauth://totp/Bank%20A:acct%3A1%202?secret=AAAQ&issuer=Bank%20A&algorithm=SHA512&digits=8&period=60"
        );
        let uri = otpauth_uri("Bank&Co?", "x", b"12345678901234567890", OtpHash::Sha256, 7, 30);
        assert!(uri.starts_with("otpauth://totp/Bank%26Co%3F:x?"));
        assert!(uri.contains("&issuer=Bank%26Co%3F&algorithm=SHA256&digits=7&period=30"));
        let uri = otpauth_uri("\u{94f6}\u{884c}", "x", b"1", OtpHash::Sha1, 6, 30);
        assert!(uri.starts_with("otpauth://totp/%E9%93%B6%E8%A1%8C:x?"));
    }
}
