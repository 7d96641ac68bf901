//! Public keys (parsed once): P-256 for devices and, for the appliance's signing keys,
//! P-256 or Ed25519. Strict ECDSA-P256-SHA256 verification of raw `r || s` signatures
//! (low-S only), pure Ed25519 verification,
//! and a software P-256 signer for the simulated wallet and for tests.

use std::cmp::Ordering;
use std::fmt;
use std::sync::OnceLock;

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcGroupRef, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::sign::Verifier;

use super::EcashError;

/// Order n of the P-256 group, big-endian.
const N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xBC, 0xE6, 0xFA,
    0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
];
/// floor(n / 2), big-endian: the largest low-S value.
const HALF_N: [u8; 32] = [
    0x7F, 0xFF, 0xFF, 0xFF, 0x80, 0x00, 0x00, 0x00, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xDE, 0x73, 0x7D,
    0x56, 0xD3, 0x8B, 0xCF, 0x42, 0x79, 0xDC, 0xE5, 0x61, 0x7E, 0x31, 0x92, 0xA8,
];

/// Length of a SEC1 uncompressed P-256 point.
pub const SEC1_LEN: usize = 65;
/// Length of a raw `r || s` signature (and of an Ed25519 signature).
pub const SIG_LEN: usize = 64;
/// Length of an Ed25519 public key.
pub const ED25519_LEN: usize = 32;

/// The signature algorithm of a public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 over SHA-256, raw `r || s`, low-S; keys as SEC1 uncompressed points.
    P256 = 1,
    /// Pure Ed25519 (RFC 8032); keys as 32 bytes.
    Ed25519 = 2,
}

impl KeyAlgorithm {
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<KeyAlgorithm> {
        match code {
            1 => Some(KeyAlgorithm::P256),
            2 => Some(KeyAlgorithm::Ed25519),
            _ => None,
        }
    }

    /// Length of a public key of this algorithm in the formats.
    pub fn key_len(self) -> usize {
        match self {
            KeyAlgorithm::P256 => SEC1_LEN,
            KeyAlgorithm::Ed25519 => ED25519_LEN,
        }
    }
}

/// The P-256 group, built once per process.
fn p256() -> Result<&'static EcGroupRef, EcashError> {
    static GROUP: OnceLock<Option<EcGroup>> = OnceLock::new();
    GROUP
        .get_or_init(|| EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).ok())
        .as_deref()
        .ok_or(EcashError::Crypto("P-256 group"))
}

/// A public key, parsed and checked once; verification never re-parses it.
#[derive(Clone)]
pub struct PublicKey {
    key: Inner,
    /// SEC1 uncompressed point (P-256) or the 32 key bytes (Ed25519).
    raw: Vec<u8>,
}

#[derive(Clone)]
enum Inner {
    P256(EcKey<Public>),
    Ed25519(PKey<Public>),
}

impl PublicKey {
    /// From the bytes the formats carry for `alg` (SEC1 point or 32 Ed25519 bytes).
    pub fn from_raw(alg: KeyAlgorithm, raw: &[u8]) -> Result<PublicKey, EcashError> {
        match alg {
            KeyAlgorithm::P256 => {
                let sec1: &[u8; SEC1_LEN] = raw.try_into().map_err(|_| EcashError::InvalidKey("not a SEC1 uncompressed point"))?;
                Self::from_sec1(sec1)
            }
            KeyAlgorithm::Ed25519 => {
                let pkey = PKey::public_key_from_raw_bytes(raw, Id::ED25519)
                    .map_err(|_| EcashError::InvalidKey("not an Ed25519 public key"))?;
                Ok(PublicKey { key: Inner::Ed25519(pkey), raw: raw.to_vec() })
            }
        }
    }

    /// From a SEC1 uncompressed point (`0x04 || X || Y`); refuses any other first byte
    /// and any point not on the curve.
    pub fn from_sec1(sec1: &[u8; SEC1_LEN]) -> Result<PublicKey, EcashError> {
        if sec1[0] != 0x04 {
            return Err(EcashError::InvalidKey("not a SEC1 uncompressed point"));
        }
        let group = p256()?;
        let mut ctx = BigNumContext::new().map_err(|_| EcashError::Crypto("bignum context"))?;
        let point =
            EcPoint::from_bytes(group, sec1, &mut ctx).map_err(|_| EcashError::InvalidKey("not a point on P-256"))?;
        // P-256 has cofactor 1: a point on the curve (not at infinity, which has no
        // uncompressed encoding) is in the group; EC_KEY_check_key's n·P test would only
        // repeat that at the cost of a scalar multiplication.
        if !point.is_on_curve(group, &mut ctx).map_err(|_| EcashError::Crypto("point check"))? {
            return Err(EcashError::InvalidKey("not a point on P-256"));
        }
        let key = EcKey::from_public_key(group, &point).map_err(|_| EcashError::InvalidKey("not a point on P-256"))?;
        Ok(PublicKey { key: Inner::P256(key), raw: sec1.to_vec() })
    }

    /// From a DER SubjectPublicKeyInfo holding a P-256 or Ed25519 key.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, EcashError> {
        let pkey =
            PKey::public_key_from_der(der).map_err(|_| EcashError::InvalidKey("not a DER SubjectPublicKeyInfo"))?;
        Self::from_pkey(&pkey)
    }

    /// From a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) holding a P-256 or Ed25519 key.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, EcashError> {
        let pkey = PKey::public_key_from_pem(pem).map_err(|_| EcashError::InvalidKey("not a PEM public key"))?;
        Self::from_pkey(&pkey)
    }

    fn from_pkey(pkey: &PKey<Public>) -> Result<PublicKey, EcashError> {
        if pkey.id() == Id::ED25519 {
            let raw = pkey.raw_public_key().map_err(|_| EcashError::InvalidKey("not an Ed25519 public key"))?;
            return Self::from_raw(KeyAlgorithm::Ed25519, &raw);
        }
        let ec = pkey.ec_key().map_err(|_| EcashError::InvalidKey("not an EC key"))?;
        if ec.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            return Err(EcashError::InvalidKey("not a P-256 key"));
        }
        let group = p256()?;
        let mut ctx = BigNumContext::new().map_err(|_| EcashError::Crypto("bignum context"))?;
        let bytes = ec
            .public_key()
            .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
            .map_err(|_| EcashError::InvalidKey("not a point on P-256"))?;
        let sec1: [u8; SEC1_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| EcashError::InvalidKey("not a point on P-256"))?;
        Self::from_sec1(&sec1)
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.key {
            Inner::P256(_) => KeyAlgorithm::P256,
            Inner::Ed25519(_) => KeyAlgorithm::Ed25519,
        }
    }

    /// The key as the formats carry it: a SEC1 uncompressed point (P-256) or 32 bytes (Ed25519).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The SEC1 uncompressed point of a P-256 key (device keys are always P-256);
    /// `None` for an Ed25519 key.
    pub fn sec1(&self) -> Option<[u8; SEC1_LEN]> {
        match self.key {
            Inner::P256(_) => self.raw.as_slice().try_into().ok(),
            Inner::Ed25519(_) => None,
        }
    }

    fn pkey(&self) -> Result<PKey<Public>, EcashError> {
        match &self.key {
            Inner::P256(k) => PKey::from_ec_key(k.clone()).map_err(|_| EcashError::Crypto("public key export")),
            Inner::Ed25519(k) => Ok(k.clone()),
        }
    }

    /// DER SubjectPublicKeyInfo (the export form).
    pub fn to_spki_der(&self) -> Result<Vec<u8>, EcashError> {
        self.pkey()?.public_key_to_der().map_err(|_| EcashError::Crypto("public key export"))
    }

    /// PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn to_pem(&self) -> Result<Vec<u8>, EcashError> {
        self.pkey()?.public_key_to_pem().map_err(|_| EcashError::Crypto("public key export"))
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.algorithm() == other.algorithm() && self.raw == other.raw
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({:?}, {})", self.algorithm(), hex::encode(&self.raw))
    }
}

/// True when `x` is in `1..=max` (32-byte big-endian numbers).
fn in_range(x: &[u8], max: &[u8; 32]) -> bool {
    x.iter().any(|&b| b != 0) && x.cmp(&max[..]) != Ordering::Greater
}

/// True when `sig` is a canonical P-256 signature: `1 <= r < n`, `1 <= s <= n/2`.
pub fn is_canonical(sig: &[u8; SIG_LEN]) -> bool {
    let (r, s) = sig.split_at(32);
    // r < n  <=>  r <= n - 1; n is odd, so comparing with n and excluding equality works.
    in_range(r, &N) && r != &N[..] && in_range(s, &HALF_N)
}

/// Normalises `sig` to low-S: replaces `s` by `n - s` when `s > n/2`. Leaves an `s`
/// of zero or `>= n` alone (such a signature is refused by [`verify_p256`] anyway).
pub fn low_s(sig: &mut [u8; SIG_LEN]) {
    let s = &mut sig[32..];
    if (*s).cmp(&HALF_N[..]) != Ordering::Greater || (*s).cmp(&N[..]) != Ordering::Less {
        return;
    }
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        s[i] = (d + (borrow << 8)) as u8;
    }
}

/// ECDSA P-256 over SHA-256(`msg`). Refuses a high-S signature and `r` or `s` zero or
/// `>= n` before openssl sees it.
pub fn verify_p256(key: &PublicKey, msg: &[u8], sig: &[u8; SIG_LEN]) -> Result<(), EcashError> {
    verify_digest(key, &crate::crypto::sha256(msg), sig)
}

/// Verifies `sig` over `msg` by the key's algorithm: ECDSA P-256 over SHA-256 (low-S
/// only) or pure Ed25519 (openssl refuses a non-canonical S).
pub fn verify(key: &PublicKey, msg: &[u8], sig: &[u8; SIG_LEN]) -> Result<(), EcashError> {
    match &key.key {
        Inner::P256(_) => verify_p256(key, msg, sig),
        Inner::Ed25519(pkey) => {
            let mut v = Verifier::new_without_digest(pkey).map_err(|_| EcashError::Crypto("Ed25519 verifier"))?;
            match v.verify_oneshot(sig, msg) {
                Ok(true) => Ok(()),
                _ => Err(EcashError::BadSignature),
            }
        }
    }
}

/// [`verify_p256`] of an already computed SHA-256 digest (P-256 keys only).
pub(crate) fn verify_digest(key: &PublicKey, digest: &[u8; 32], sig: &[u8; SIG_LEN]) -> Result<(), EcashError> {
    let Inner::P256(ec) = &key.key else {
        return Err(EcashError::BadSignature);
    };
    if !is_canonical(sig) {
        return Err(EcashError::BadSignature);
    }
    let r = BigNum::from_slice(&sig[..32]).map_err(|_| EcashError::Crypto("bignum"))?;
    let s = BigNum::from_slice(&sig[32..]).map_err(|_| EcashError::Crypto("bignum"))?;
    let sig = EcdsaSig::from_private_components(r, s).map_err(|_| EcashError::Crypto("ECDSA signature"))?;
    match sig.verify(digest, ec) {
        Ok(true) => Ok(()),
        _ => Err(EcashError::BadSignature),
    }
}

/// A software P-256 signing key (the simulated wallet's secure element, tests). The
/// private key never leaves it: no accessor, no Clone, Debug shows the public key's
/// first bytes only.
pub struct SigningKey {
    key: EcKey<Private>,
    public: PublicKey,
}

impl SigningKey {
    /// A fresh key from openssl's CSPRNG.
    pub fn generate() -> Result<SigningKey, EcashError> {
        let group = p256()?;
        let key = EcKey::generate(group).map_err(|_| EcashError::Crypto("key generation"))?;
        let mut ctx = BigNumContext::new().map_err(|_| EcashError::Crypto("bignum context"))?;
        let bytes = key
            .public_key()
            .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
            .map_err(|_| EcashError::Crypto("key generation"))?;
        let sec1: [u8; SEC1_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| EcashError::Crypto("key generation"))?;
        let public = PublicKey::from_sec1(&sec1)?;
        Ok(SigningKey { key, public })
    }

    /// Signs SHA-256(`msg`): raw `r || s`, low-S.
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; SIG_LEN], EcashError> {
        self.sign_digest(&crate::crypto::sha256(msg))
    }

    /// Signs an already computed SHA-256 digest: raw `r || s`, low-S.
    pub(crate) fn sign_digest(&self, digest: &[u8; 32]) -> Result<[u8; SIG_LEN], EcashError> {
        let sig = EcdsaSig::sign(digest, &self.key).map_err(|_| EcashError::Crypto("ECDSA signing"))?;
        let r = sig
            .r()
            .to_vec_padded(32)
            .map_err(|_| EcashError::Crypto("ECDSA signing"))?;
        let s = sig
            .s()
            .to_vec_padded(32)
            .map_err(|_| EcashError::Crypto("ECDSA signing"))?;
        let mut out = [0u8; SIG_LEN];
        out[..32].copy_from_slice(&r);
        out[32..].copy_from_slice(&s);
        low_s(&mut out);
        Ok(out)
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    /// The public half as a SEC1 uncompressed point.
    pub fn sec1(&self) -> [u8; SEC1_LEN] {
        let mut out = [0u8; SEC1_LEN];
        out.copy_from_slice(&self.public.raw);
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &hex::encode(&self.public.raw[..9]))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n_minus(s: &[u8]) -> [u8; 32] {
        let n = BigNum::from_slice(&N).unwrap();
        let s = BigNum::from_slice(s).unwrap();
        let mut d = BigNum::new().unwrap();
        d.checked_sub(&n, &s).unwrap();
        d.to_vec_padded(32).unwrap().try_into().unwrap()
    }

    #[test]
    fn constants_match_openssl() {
        let group = p256().unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let mut order = BigNum::new().unwrap();
        group.order(&mut order, &mut ctx).unwrap();
        assert_eq!(order.to_vec_padded(32).unwrap(), N.to_vec());
        let mut half = BigNum::new().unwrap();
        half.rshift1(&order).unwrap();
        assert_eq!(half.to_vec_padded(32).unwrap(), HALF_N.to_vec());
    }

    #[test]
    fn sign_verify_and_low_s() {
        let k = SigningKey::generate().unwrap();
        let pk = k.public_key();
        for i in 0..32u8 {
            let msg = [i; 7];
            let sig = k.sign(&msg).unwrap();
            assert!(is_canonical(&sig));
            verify_p256(&pk, &msg, &sig).unwrap();
            assert_eq!(verify_p256(&pk, b"other", &sig), Err(EcashError::BadSignature));
        }
        let other = SigningKey::generate().unwrap().public_key();
        let sig = k.sign(b"m").unwrap();
        assert_eq!(verify_p256(&other, b"m", &sig), Err(EcashError::BadSignature));
    }

    #[test]
    fn high_s_refused_though_openssl_accepts_it() {
        let k = SigningKey::generate().unwrap();
        let pk = k.public_key();
        let sig = k.sign(b"msg").unwrap();
        let mut high = sig;
        high[32..].copy_from_slice(&n_minus(&sig[32..]));
        // openssl itself accepts the malleated signature...
        let r = BigNum::from_slice(&high[..32]).unwrap();
        let s = BigNum::from_slice(&high[32..]).unwrap();
        let os = EcdsaSig::from_private_components(r, s).unwrap();
        let Inner::P256(ec) = &pk.key else { panic!("a P-256 key") };
        assert!(os.verify(&crate::crypto::sha256(b"msg"), ec).unwrap());
        // ...but it is refused here, and low_s brings it back.
        assert!(!is_canonical(&high));
        assert_eq!(verify_p256(&pk, b"msg", &high), Err(EcashError::BadSignature));
        let mut back = high;
        low_s(&mut back);
        assert_eq!(back, sig);
        verify_p256(&pk, b"msg", &back).unwrap();
        // low_s leaves low values alone.
        let mut same = sig;
        low_s(&mut same);
        assert_eq!(same, sig);
    }

    #[test]
    fn out_of_range_scalars_refused() {
        let k = SigningKey::generate().unwrap();
        let pk = k.public_key();
        let sig = k.sign(b"msg").unwrap();
        let cases: [(std::ops::Range<usize>, [u8; 32]); 4] =
            [(0..32, [0; 32]), (32..64, [0; 32]), (0..32, N), (0..32, [0xFF; 32])];
        for (range, val) in cases {
            let mut bad = sig;
            bad[range].copy_from_slice(&val);
            assert!(!is_canonical(&bad));
            assert_eq!(verify_p256(&pk, b"msg", &bad), Err(EcashError::BadSignature));
        }
        let mut s_n = sig;
        s_n[32..].copy_from_slice(&N);
        low_s(&mut s_n);
        assert_eq!(&s_n[32..], &N[..]);
        assert!(!is_canonical(&s_n));
        // s = n/2 is the largest low value; n/2 + 1 is high.
        let mut edge = sig;
        edge[32..].copy_from_slice(&HALF_N);
        assert!(is_canonical(&edge));
        edge[63] += 1;
        assert!(!is_canonical(&edge));
    }

    #[test]
    fn key_encodings() {
        let pk = SigningKey::generate().unwrap().public_key();
        let der = pk.to_spki_der().unwrap();
        assert_eq!(PublicKey::from_spki_der(&der).unwrap(), pk);
        let pem = pk.to_pem().unwrap();
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), pk);
        assert_eq!(PublicKey::from_sec1(&pk.sec1().unwrap()).unwrap(), pk);
        let mut bad = pk.sec1().unwrap();
        bad[0] = 0x02;
        assert!(PublicKey::from_sec1(&bad).is_err());
        let mut off = pk.sec1().unwrap();
        off[64] ^= 1;
        assert!(PublicKey::from_sec1(&off).is_err());
        assert!(PublicKey::from_sec1(&[0u8; 65]).is_err());
        assert!(PublicKey::from_spki_der(b"junk").is_err());
        // A P-384 key is refused.
        let g = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
        let k384 = PKey::from_ec_key(EcKey::generate(&g).unwrap()).unwrap();
        let der384 = k384.public_key_to_der().unwrap();
        assert!(PublicKey::from_spki_der(&der384).is_err());
    }

    #[test]
    fn signing_key_debug_shows_no_private_key() {
        let k = SigningKey::generate().unwrap();
        let s = format!("{k:?}");
        let private = k.key.private_key().to_vec();
        assert!(!s.contains(&hex::encode(&private)), "{s}");
        assert!(!s.contains(&hex::encode(&private[..4])), "{s}");
        assert!(
            s.starts_with("SigningKey {") && s.contains(&hex::encode(&k.public.raw[..9])),
            "{s}"
        );
    }
}
