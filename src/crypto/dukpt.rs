//! DUKPT: key-serial-number parsing and validation, X9.24-3 derivation data and
//! derivation paths, and a software reference implementation of TDES DUKPT
//! (ANSI X9.24-1:2009) and AES DUKPT (ANSI X9.24-3:2017) for tests and simulated
//! terminals. In the appliance the BDK stays in the token; only the pure parts
//! ([`TdesKsn`], [`AesKsn`], [`derivation_data`], [`derivation_path`]) run there.

use openssl::symm::{Cipher, Crypter, Mode};
use zeroize::Zeroizing;

/// What can go wrong. Messages say what is wrong, never echo a KSN or a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DukptError {
    /// The KSN is malformed or its counter is not a valid DUKPT counter.
    #[error("{0}")]
    InvalidKsn(String),
    /// A key or parameter does not fit the derivation (length, usage).
    #[error("{0}")]
    InvalidParameter(String),
    /// OpenSSL refused or failed the operation.
    #[error("cipher failure: {0}")]
    Cipher(String),
}

// ---------------------------------------------------------------------------
// TDES DUKPT (X9.24-1:2009)
// ---------------------------------------------------------------------------

/// The 21-bit transaction counter of a TDES KSN.
const TDES_COUNTER_MASK: u32 = 0x1F_FFFF;
/// X9.24-1: a counter with more than 10 one-bits is never used.
const TDES_MAX_ONE_BITS: u32 = 10;

/// Variant of the BDK for the right half of the TDES IPEK (X9.24-1 A.6). The token
/// has no XOR mechanism, so the ceremony stores `BDK xor TDES_BDK_VARIANT` as a
/// companion key.
pub const TDES_BDK_VARIANT: [u8; 16] = [
    0xC0, 0xC0, 0xC0, 0xC0, 0x00, 0x00, 0x00, 0x00, 0xC0, 0xC0, 0xC0, 0xC0, 0x00, 0x00, 0x00, 0x00,
];

/// Key-register variant of the non-reversible key generation process.
const TDES_KEY_VARIANT: [u8; 16] = TDES_BDK_VARIANT;

/// PIN-encryption variant of a TDES DUKPT future key.
const TDES_PIN_VARIANT: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF];

/// A TDES DUKPT key serial number: 80 bits, the rightmost 21 the transaction counter.
/// KSNs travel in the clear with every transaction, so Debug shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TdesKsn([u8; 10]);

impl TdesKsn {
    /// A transaction KSN: 10 bytes, counter non-zero with at most 10 one-bits.
    pub fn parse(b: &[u8]) -> Result<Self, DukptError> {
        let ksn = Self::parse_initial(b)?;
        if ksn.counter() == 0 {
            return Err(DukptError::InvalidKsn("KSN transaction counter is zero".into()));
        }
        Ok(ksn)
    }

    /// An initial-key KSN for key injection: as [`TdesKsn::parse`] but a zero counter
    /// is allowed.
    pub fn parse_initial(b: &[u8]) -> Result<Self, DukptError> {
        let arr: [u8; 10] = b
            .try_into()
            .map_err(|_| DukptError::InvalidKsn("TDES KSN must be 10 bytes".into()))?;
        let ksn = TdesKsn(arr);
        if ksn.counter().count_ones() > TDES_MAX_ONE_BITS {
            return Err(DukptError::InvalidKsn(
                "TDES KSN transaction counter has more than 10 one-bits".into(),
            ));
        }
        Ok(ksn)
    }

    /// The 21-bit transaction counter.
    pub fn counter(&self) -> u32 {
        u32::from_be_bytes([0, self.0[7], self.0[8], self.0[9]]) & TDES_COUNTER_MASK
    }

    /// IPEK derivation data: the leftmost 8 bytes of the KSN with the counter bits
    /// (the low 5 bits of byte 7) cleared.
    pub fn ipek_data(&self) -> [u8; 8] {
        let mut d = [0u8; 8];
        d.copy_from_slice(&self.0[..8]);
        d[7] &= 0xE0;
        d
    }

    /// The rightmost 8 bytes with the counter cleared: the starting value of the
    /// KSN register of the future-key derivation.
    fn register_base(&self) -> u64 {
        let mut r = [0u8; 8];
        r.copy_from_slice(&self.0[2..]);
        u64::from_be_bytes(r) & !u64::from(TDES_COUNTER_MASK)
    }

    /// The 10 KSN bytes.
    pub fn bytes(&self) -> &[u8; 10] {
        &self.0
    }
}

/// Software IPEK: left = TDES_E(BDK, ipek_data), right = TDES_E(BDK xor
/// [`TDES_BDK_VARIANT`], ipek_data).
pub fn tdes_ipek(bdk: &[u8; 16], ksn: &TdesKsn) -> Result<Zeroizing<[u8; 16]>, DukptError> {
    let data = ksn.ipek_data();
    let mut ipek = Zeroizing::new([0u8; 16]);
    let mut variant = Zeroizing::new([0u8; 16]);
    variant.copy_from_slice(bdk);
    xor_in_place(&mut variant[..], &TDES_BDK_VARIANT);
    ipek[..8].copy_from_slice(&data);
    ipek[8..].copy_from_slice(&data);
    tdes_ecb_encrypt(bdk, &mut ipek[..8])?;
    tdes_ecb_encrypt(&variant, &mut ipek[8..])?;
    Ok(ipek)
}

/// The key of `ksn`'s counter from the IPEK: the non-reversible key generation
/// process (X9.24-1 A.2) applied for each set counter bit, from the high end down.
pub fn tdes_future_key(ipek: &[u8; 16], ksn: &TdesKsn) -> Result<Zeroizing<[u8; 16]>, DukptError> {
    let counter = ksn.counter();
    let mut register = ksn.register_base();
    let mut key = Zeroizing::new([0u8; 16]);
    key.copy_from_slice(ipek);
    let mut bit = 1u32 << 20;
    while bit != 0 {
        if counter & bit != 0 {
            register |= u64::from(bit);
            key = non_reversible_key_generation(&key, register)?;
        }
        bit >>= 1;
    }
    Ok(key)
}

/// The PIN-encryption key of `ksn`: future key xor 00000000000000FF00000000000000FF.
pub fn tdes_pin_key(ipek: &[u8; 16], ksn: &TdesKsn) -> Result<Zeroizing<[u8; 16]>, DukptError> {
    let mut key = tdes_future_key(ipek, ksn)?;
    xor_in_place(&mut key[..], &TDES_PIN_VARIANT);
    Ok(key)
}

/// One step of X9.24-1's non-reversible key generation process.
fn non_reversible_key_generation(key: &[u8; 16], register: u64) -> Result<Zeroizing<[u8; 16]>, DukptError> {
    let data = register.to_be_bytes();
    let mut out = Zeroizing::new([0u8; 16]);
    // Right half of the new key: DES under the left key half, whitened with the right.
    half_step(&key[..8], &key[8..], &data, &mut out[8..])?;
    // Left half: the same under the variant key.
    let mut variant = Zeroizing::new([0u8; 16]);
    variant.copy_from_slice(key);
    xor_in_place(&mut variant[..], &TDES_KEY_VARIANT);
    half_step(&variant[..8], &variant[8..], &data, &mut out[..8])?;
    Ok(out)
}

/// out = DES_E(kl, data xor kr) xor kr.
fn half_step(kl: &[u8], kr: &[u8], data: &[u8; 8], out: &mut [u8]) -> Result<(), DukptError> {
    out.copy_from_slice(data);
    xor_in_place(out, kr);
    let mut k = Zeroizing::new([0u8; 24]);
    for part in k.chunks_exact_mut(8) {
        part.copy_from_slice(kl);
    }
    ecb_encrypt(Cipher::des_ede3_ecb(), &k[..], out)?;
    xor_in_place(out, kr);
    Ok(())
}

/// Two-key TDES-ECB (K1 K2 K1) encryption in place.
fn tdes_ecb_encrypt(key: &[u8; 16], block: &mut [u8]) -> Result<(), DukptError> {
    let mut k = Zeroizing::new([0u8; 24]);
    k[..16].copy_from_slice(key);
    k[16..].copy_from_slice(&key[..8]);
    ecb_encrypt(Cipher::des_ede3_ecb(), &k[..], block)
}

// ---------------------------------------------------------------------------
// AES DUKPT (X9.24-3:2017)
// ---------------------------------------------------------------------------

/// X9.24-3: a counter with more than 16 one-bits is never used.
const AES_MAX_ONE_BITS: u32 = 16;

/// An AES DUKPT KSN: the 8-byte initial key ID (BDK ID || derivation ID) and a
/// 32-bit transaction counter. KSNs travel in the clear, so Debug shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AesKsn([u8; 12]);

impl AesKsn {
    /// A transaction KSN: 12 bytes, counter non-zero with at most 16 one-bits.
    pub fn parse(b: &[u8]) -> Result<Self, DukptError> {
        let ksn = Self::parse_initial(b)?;
        if ksn.counter() == 0 {
            return Err(DukptError::InvalidKsn("KSN transaction counter is zero".into()));
        }
        Ok(ksn)
    }

    /// An initial-key KSN for key injection: a zero counter is allowed.
    pub fn parse_initial(b: &[u8]) -> Result<Self, DukptError> {
        let arr: [u8; 12] = b
            .try_into()
            .map_err(|_| DukptError::InvalidKsn("AES KSN must be 12 bytes".into()))?;
        let ksn = AesKsn(arr);
        if ksn.counter().count_ones() > AES_MAX_ONE_BITS {
            return Err(DukptError::InvalidKsn(
                "AES KSN transaction counter has more than 16 one-bits".into(),
            ));
        }
        Ok(ksn)
    }

    /// The initial key ID: the leftmost 8 bytes.
    pub fn initial_key_id(&self) -> [u8; 8] {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.0[..8]);
        id
    }

    /// The 32-bit transaction counter: the rightmost 4 bytes.
    pub fn counter(&self) -> u32 {
        u32::from_be_bytes([self.0[8], self.0[9], self.0[10], self.0[11]])
    }

    /// The 12 KSN bytes.
    pub fn bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// The AES key types keyward derives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AesKeyType {
    Aes128,
    Aes256,
}

impl AesKeyType {
    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            AesKeyType::Aes128 => 16,
            AesKeyType::Aes256 => 32,
        }
    }

    /// X9.24-3 algorithm indicator.
    pub fn algorithm(self) -> u16 {
        match self {
            AesKeyType::Aes128 => 0x0002,
            AesKeyType::Aes256 => 0x0004,
        }
    }

    /// X9.24-3 length field: the key length in bits.
    pub fn length_bits(self) -> u16 {
        match self {
            AesKeyType::Aes128 => 0x0080,
            AesKeyType::Aes256 => 0x0100,
        }
    }

    /// The type of an AES key of `len` bytes, if keyward derives that type.
    pub fn from_key_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(AesKeyType::Aes128),
            32 => Some(AesKeyType::Aes256),
            _ => None,
        }
    }
}

/// X9.24-3 key usage indicators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUsage {
    KeyDerivation,
    InitialKey,
    PinEncryption,
    MacGeneration,
    MacVerification,
    MacBoth,
    DataEncrypt,
    DataDecrypt,
    DataBoth,
}

impl KeyUsage {
    /// The 16-bit indicator in the derivation data.
    pub fn code(self) -> u16 {
        match self {
            KeyUsage::KeyDerivation => 0x8000,
            KeyUsage::InitialKey => 0x8001,
            KeyUsage::PinEncryption => 0x1000,
            KeyUsage::MacGeneration => 0x2000,
            KeyUsage::MacVerification => 0x2001,
            KeyUsage::MacBoth => 0x2002,
            KeyUsage::DataEncrypt => 0x3000,
            KeyUsage::DataDecrypt => 0x3001,
            KeyUsage::DataBoth => 0x3002,
        }
    }

    /// Whether this usage names a working key (not a derivation or initial key).
    pub fn is_working(self) -> bool {
        !matches!(self, KeyUsage::KeyDerivation | KeyUsage::InitialKey)
    }
}

/// X9.24-3 derivation data, 16 bytes: version 01, block counter, usage, algorithm,
/// length in bits, then for [`KeyUsage::InitialKey`] the 8-byte initial key ID, else
/// the rightmost 4 bytes of the initial key ID || the 4-byte (working) counter.
pub fn derivation_data(
    usage: KeyUsage,
    derived: AesKeyType,
    initial_key_id: &[u8; 8],
    counter: u32,
    block: u8,
) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = 0x01;
    d[1] = block;
    d[2..4].copy_from_slice(&usage.code().to_be_bytes());
    d[4..6].copy_from_slice(&derived.algorithm().to_be_bytes());
    d[6..8].copy_from_slice(&derived.length_bits().to_be_bytes());
    if usage == KeyUsage::InitialKey {
        d[8..].copy_from_slice(initial_key_id);
    } else {
        d[8..12].copy_from_slice(&initial_key_id[4..]);
        d[12..].copy_from_slice(&counter.to_be_bytes());
    }
    d
}

/// The working counters of the transaction-key derivation, in order: each set bit
/// of `counter`, from the high end, ORed in turn into a register starting at zero.
/// One derivation step (usage [`KeyUsage::KeyDerivation`]) runs per entry.
pub fn derivation_path(counter: u32) -> Vec<u32> {
    let mut path = Vec::with_capacity(counter.count_ones() as usize);
    let mut working = 0u32;
    let mut bit = 1u32 << 31;
    while bit != 0 {
        if counter & bit != 0 {
            working |= bit;
            path.push(working);
        }
        bit >>= 1;
    }
    path
}

/// One derivation step in software: AES-ECB(key, derivation data with block 1),
/// followed by block 2 when the derived key is 256 bits. A derived key may not be
/// longer than the key it is derived from (X9.24-3).
pub fn aes_derive(
    key: &[u8],
    derived: AesKeyType,
    usage: KeyUsage,
    initial_key_id: &[u8; 8],
    counter: u32,
) -> Result<Zeroizing<Vec<u8>>, DukptError> {
    let cipher = match key.len() {
        16 => Cipher::aes_128_ecb(),
        24 => Cipher::aes_192_ecb(),
        32 => Cipher::aes_256_ecb(),
        _ => {
            return Err(DukptError::InvalidParameter(
                "AES derivation key must be 16, 24 or 32 bytes".into(),
            ))
        }
    };
    if derived.key_len() > key.len() {
        return Err(DukptError::InvalidParameter(
            "a derived key may not be longer than its derivation key".into(),
        ));
    }
    let blocks = derived.key_len().div_ceil(16);
    let mut out = Zeroizing::new(vec![0u8; blocks * 16]);
    for (i, chunk) in out.chunks_exact_mut(16).enumerate() {
        let block = u8::try_from(i + 1).map_err(|_| DukptError::InvalidParameter("derived key too long".into()))?;
        chunk.copy_from_slice(&derivation_data(usage, derived, initial_key_id, counter, block));
        ecb_encrypt(cipher, key, chunk)?;
    }
    out.truncate(derived.key_len());
    Ok(out)
}

/// The initial key (IK) of a device from the BDK (X9.24-3 "Derive Initial Key").
pub fn aes_initial_key(
    bdk: &[u8],
    key_type: AesKeyType,
    initial_key_id: &[u8; 8],
) -> Result<Zeroizing<Vec<u8>>, DukptError> {
    aes_derive(bdk, key_type, KeyUsage::InitialKey, initial_key_id, 0)
}

/// The transaction (intermediate derivation) key of `ksn` from the initial key,
/// whose type `key_type` is: one [`KeyUsage::KeyDerivation`] step per entry of
/// [`derivation_path`].
pub fn aes_transaction_key(
    initial_key: &[u8],
    key_type: AesKeyType,
    ksn: &AesKsn,
) -> Result<Zeroizing<Vec<u8>>, DukptError> {
    if initial_key.len() != key_type.key_len() {
        return Err(DukptError::InvalidParameter(
            "initial key length does not match its key type".into(),
        ));
    }
    let id = ksn.initial_key_id();
    let mut key = Zeroizing::new(initial_key.to_vec());
    for working in derivation_path(ksn.counter()) {
        key = aes_derive(&key, key_type, KeyUsage::KeyDerivation, &id, working)?;
    }
    Ok(key)
}

/// A working key of type `key_type` for `usage` from the transaction key of `ksn`.
pub fn aes_working_key(
    transaction_key: &[u8],
    key_type: AesKeyType,
    usage: KeyUsage,
    ksn: &AesKsn,
) -> Result<Zeroizing<Vec<u8>>, DukptError> {
    if !usage.is_working() {
        return Err(DukptError::InvalidParameter("working-key usage required".into()));
    }
    aes_derive(transaction_key, key_type, usage, &ksn.initial_key_id(), ksn.counter())
}

// ---------------------------------------------------------------------------

fn xor_in_place(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// In-place ECB encryption of whole blocks, no padding.
fn ecb_encrypt(cipher: Cipher, key: &[u8], data: &mut [u8]) -> Result<(), DukptError> {
    let err = |e: openssl::error::ErrorStack| DukptError::Cipher(e.to_string());
    let mut c = Crypter::new(cipher, Mode::Encrypt, key, None).map_err(err)?;
    c.pad(false);
    let mut out = Zeroizing::new(vec![0u8; data.len() + cipher.block_size()]);
    let n = c.update(data, &mut out[..]).map_err(err)?;
    let m = c.finalize(&mut out[n..]).map_err(err)?;
    if n + m != data.len() {
        return Err(DukptError::Cipher("ECB output length".into()));
    }
    data.copy_from_slice(&out[..data.len()]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    const TDES_BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
    const AES_BDK_128: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
    const AES_BDK_256: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1";
    const IKID: [u8; 8] = [0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56];

    fn bdk16(s: &str) -> [u8; 16] {
        h(s).try_into().unwrap()
    }

    /// TDES-ECB (K1 K2 K1) written independently of the module's helpers.
    fn tdes2_encrypt(key: &[u8; 16], block: &[u8]) -> Vec<u8> {
        let mut k = key.to_vec();
        k.extend_from_slice(&key[..8]);
        let mut c = Crypter::new(Cipher::des_ede3_ecb(), Mode::Encrypt, &k, None).unwrap();
        c.pad(false);
        let mut out = vec![0u8; block.len() + 8];
        let n = c.update(block, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn aes_ecb(key: &[u8], block: &[u8]) -> Vec<u8> {
        let cipher = if key.len() == 16 {
            Cipher::aes_128_ecb()
        } else {
            Cipher::aes_256_ecb()
        };
        let mut c = Crypter::new(cipher, Mode::Encrypt, key, None).unwrap();
        c.pad(false);
        let mut out = vec![0u8; block.len() + 16];
        let n = c.update(block, &mut out).unwrap();
        out.truncate(n);
        out
    }

    // ---- TDES ----

    /// vectors.md: X9.24-1:2009 A.4 IPEK.
    #[test]
    fn tdes_ipek_vector() {
        let ksn = TdesKsn::parse_initial(&h("FFFF9876543210E00000")).unwrap();
        assert_eq!(ksn.ipek_data().to_vec(), h("FFFF9876543210E0"));
        let ipek = tdes_ipek(&bdk16(TDES_BDK), &ksn).unwrap();
        assert_eq!(ipek.to_vec(), h("6AC292FAA1315B4D858AB3A3D7D5933A"));
        // A transaction KSN of the same device gives the same IPEK.
        let ksn = TdesKsn::parse(&h("FFFF9876543210E00003")).unwrap();
        assert_eq!(
            tdes_ipek(&bdk16(TDES_BDK), &ksn).unwrap().to_vec(),
            h("6AC292FAA1315B4D858AB3A3D7D5933A")
        );
    }

    /// vectors.md: X9.24-1:2009 A.4 encrypted PIN blocks under the PIN keys.
    #[test]
    fn tdes_pin_key_vectors() {
        let ipek: [u8; 16] = h("6AC292FAA1315B4D858AB3A3D7D5933A").try_into().unwrap();
        let clear = h("041274EDCBA9876F");
        for (ksn, expected) in [
            ("FFFF9876543210E00001", "1B9C1845EB993A7A"),
            ("FFFF9876543210E00002", "10A01C8D02C69107"),
            ("FFFF9876543210E00003", "18DC07B94797B466"),
            ("FFFF9876543210EFF800", "33365F5CC6F23C35"),
        ] {
            let ksn = TdesKsn::parse(&h(ksn)).unwrap();
            let key = tdes_pin_key(&ipek, &ksn).unwrap();
            assert_eq!(
                tdes2_encrypt(&key, &clear),
                h(expected),
                "KSN counter {:X}",
                ksn.counter()
            );
        }
    }

    #[test]
    fn tdes_ksn_fields() {
        let ksn = TdesKsn::parse(&h("FFFF9876543210EFF800")).unwrap();
        assert_eq!(ksn.counter(), 0x0F_F800);
        assert_eq!(ksn.ipek_data().to_vec(), h("FFFF9876543210E0"));
        assert_eq!(ksn.bytes().to_vec(), h("FFFF9876543210EFF800"));
        // The top 3 bits of byte 7 belong to the device, not the counter.
        let ksn = TdesKsn::parse(&h("FFFF98765432103F0000")).unwrap();
        assert_eq!(ksn.counter(), 0x1F_0000);
        assert_eq!(ksn.ipek_data().to_vec(), h("FFFF987654321020"));
    }

    #[test]
    fn tdes_future_key_of_counter_zero_is_ipek() {
        let ipek: [u8; 16] = h("6AC292FAA1315B4D858AB3A3D7D5933A").try_into().unwrap();
        let ksn = TdesKsn::parse_initial(&h("FFFF9876543210E00000")).unwrap();
        assert_eq!(*tdes_future_key(&ipek, &ksn).unwrap(), ipek);
    }

    #[test]
    fn tdes_invalid_ksns() {
        let bad = |b: &[u8]| match TdesKsn::parse(b) {
            Err(DukptError::InvalidKsn(m)) => m,
            other => panic!("accepted or wrong error: {other:?}"),
        };
        assert!(bad(&h("FFFF9876543210E00000")).contains("zero"));
        // 11 one-bits: 0x0FFE00 has bits 9..19 set.
        assert!(bad(&h("FFFF9876543210EFFE00")).contains("10 one-bits"));
        assert!(bad(&h("FFFF9876543210E000")).contains("10 bytes"));
        assert!(bad(&h("FFFF9876543210E0000001")).contains("10 bytes"));
        assert!(bad(&[]).contains("10 bytes"));
        // The message never echoes the KSN.
        assert!(!bad(&h("FFFF9876543210EFFE00")).to_uppercase().contains("9876"));
        // parse_initial allows a zero counter but not 11 bits.
        assert!(TdesKsn::parse_initial(&h("FFFF9876543210E00000")).is_ok());
        assert!(TdesKsn::parse_initial(&h("FFFF9876543210EFFE00")).is_err());
        // Exactly 10 bits is fine.
        assert!(TdesKsn::parse(&h("FFFF9876543210EFFC00")).is_ok());
    }

    // ---- AES ----

    fn ksn(counter: u32) -> AesKsn {
        let mut b = IKID.to_vec();
        b.extend_from_slice(&counter.to_be_bytes());
        AesKsn::parse(&b).unwrap()
    }

    /// vectors.md: X9.24-3:2017 supplement, AES-128 BDK.
    #[test]
    fn aes128_initial_key_vector() {
        let ik = aes_initial_key(&h(AES_BDK_128), AesKeyType::Aes128, &IKID).unwrap();
        assert_eq!(ik.to_vec(), h("1273671EA26AC29AFA4D1084127652A1"));
    }

    /// vectors.md: the transaction derivation keys of counters 1, 2, 3, FFFF0000.
    #[test]
    fn aes128_transaction_key_vectors() {
        let ik = h("1273671EA26AC29AFA4D1084127652A1");
        for (counter, expected) in [
            (1, "4F21B565BAD9835E112B6465635EAE44"),
            (2, "2F34D68DE10F68D38091A73B9E7C437C"),
            (3, "031504E530365CF81264238540518318"),
            (0xFFFF_0000, "F6BA59389BD14A9855BE9727E7C52E3C"),
        ] {
            let tk = aes_transaction_key(&ik, AesKeyType::Aes128, &ksn(counter)).unwrap();
            assert_eq!(tk.to_vec(), h(expected), "counter {counter:X}");
        }
    }

    /// X9.24-3:2017 supplement working keys (AES-128 from AES-128 BDK), as reproduced
    /// by several independent public implementations (not in vectors.md).
    #[test]
    fn aes128_working_key_vectors() {
        let ik = h("1273671EA26AC29AFA4D1084127652A1");
        for (counter, expected) in [
            (1, "AF8CB133A78F8DC2D1359F18527593FB"),
            (2, "D30BDC73EC9714B000BEC66BDB7B6D09"),
            (3, "7D69F01F3B45449F62C7816ECE723268"),
            (0xFFFF_0000, "27EFAC1D158632588F4AC69E45C247C4"),
        ] {
            let k = ksn(counter);
            let tk = aes_transaction_key(&ik, AesKeyType::Aes128, &k).unwrap();
            let pin = aes_working_key(&tk, AesKeyType::Aes128, KeyUsage::PinEncryption, &k).unwrap();
            assert_eq!(pin.to_vec(), h(expected), "counter {counter:X}");
        }
        let k = ksn(1);
        let tk = aes_transaction_key(&ik, AesKeyType::Aes128, &k).unwrap();
        for (usage, expected) in [
            (KeyUsage::MacGeneration, "A2DC23DE6FDE0824A2BC321E08E4B8B7"),
            (KeyUsage::DataEncrypt, "A35C412EFD41FDB98B69797C02DCD08F"),
        ] {
            assert_eq!(
                aes_working_key(&tk, AesKeyType::Aes128, usage, &k).unwrap().to_vec(),
                h(expected)
            );
        }
    }

    /// X9.24-3:2017 supplement, AES-256 BDK -> AES-256 initial, derivation and PIN keys.
    #[test]
    fn aes256_vectors() {
        let ik = aes_initial_key(&h(AES_BDK_256), AesKeyType::Aes256, &IKID).unwrap();
        assert_eq!(
            ik.to_vec(),
            h("CE9CE0C101D1138F97FB6CAD4DF045A7083D4EAE2D35A31789D01CCF0949550F")
        );
        let k = ksn(1);
        let tk = aes_transaction_key(&ik, AesKeyType::Aes256, &k).unwrap();
        assert_eq!(
            tk.to_vec(),
            h("54AC2B32B145EA4A554CB8BC44B17467063A799856B1CCC2A138D36E8DBF78B3")
        );
        let pin = aes_working_key(&tk, AesKeyType::Aes256, KeyUsage::PinEncryption, &k).unwrap();
        assert_eq!(
            pin.to_vec(),
            h("8C1AB7BEE973829E30242E0BBBDD4946D540C98FC1B5BDCF94790001A23FD502")
        );
    }

    /// A 256-bit derivation is two AES blocks with block counters 1 and 2; its first
    /// half equals a one-block derivation with the same data (the token path uses an
    /// AES_CBC_ENCRYPT_DATA derivation with a zero IV per block).
    #[test]
    fn aes256_derivation_is_two_blocks() {
        let key = h(AES_BDK_256);
        let out = aes_derive(&key, AesKeyType::Aes256, KeyUsage::KeyDerivation, &IKID, 7).unwrap();
        assert_eq!(out.len(), 32);
        let d1 = derivation_data(KeyUsage::KeyDerivation, AesKeyType::Aes256, &IKID, 7, 1);
        let d2 = derivation_data(KeyUsage::KeyDerivation, AesKeyType::Aes256, &IKID, 7, 2);
        assert_eq!(d1[1], 1);
        assert_eq!(d2[1], 2);
        assert_eq!(d1[..1], d2[..1]);
        assert_eq!(d1[2..], d2[2..]);
        assert_eq!(out[..16].to_vec(), aes_ecb(&key, &d1));
        assert_eq!(out[16..].to_vec(), aes_ecb(&key, &d2));
        // A 128-bit key from a 256-bit key is block 1 only.
        let short = aes_derive(&key, AesKeyType::Aes128, KeyUsage::PinEncryption, &IKID, 7).unwrap();
        assert_eq!(short.len(), 16);
        let d = derivation_data(KeyUsage::PinEncryption, AesKeyType::Aes128, &IKID, 7, 1);
        assert_eq!(short.to_vec(), aes_ecb(&key, &d));
    }

    #[test]
    fn derivation_data_layout() {
        // As printed in the X9.24-3 supplement's traces.
        let d = derivation_data(KeyUsage::PinEncryption, AesKeyType::Aes128, &IKID, 1, 1);
        assert_eq!(d.to_vec(), h("01011000000200809012345600000001"));
        // The supplement's traces show AES-256 data after the second block, counter 02.
        let d = derivation_data(KeyUsage::PinEncryption, AesKeyType::Aes256, &IKID, 0xFFFF_0000, 2);
        assert_eq!(d.to_vec(), h("010210000004010090123456FFFF0000"));
        let d = derivation_data(KeyUsage::PinEncryption, AesKeyType::Aes256, &IKID, 1, 1);
        assert_eq!(d.to_vec(), h("01011000000401009012345600000001"));
        let d = derivation_data(KeyUsage::InitialKey, AesKeyType::Aes128, &IKID, 99, 1);
        assert_eq!(d.to_vec(), h("01018001000200801234567890123456"));
        let d = derivation_data(KeyUsage::KeyDerivation, AesKeyType::Aes256, &IKID, 5, 2);
        assert_eq!(d.to_vec(), h("01028000000401009012345600000005"));
        let codes: Vec<u16> = [
            KeyUsage::KeyDerivation,
            KeyUsage::InitialKey,
            KeyUsage::PinEncryption,
            KeyUsage::MacGeneration,
            KeyUsage::MacVerification,
            KeyUsage::MacBoth,
            KeyUsage::DataEncrypt,
            KeyUsage::DataDecrypt,
            KeyUsage::DataBoth,
        ]
        .iter()
        .map(|u| u.code())
        .collect();
        assert_eq!(
            codes,
            vec![0x8000, 0x8001, 0x1000, 0x2000, 0x2001, 0x2002, 0x3000, 0x3001, 0x3002]
        );
    }

    #[test]
    fn derivation_paths() {
        assert_eq!(derivation_path(1), vec![1]);
        assert_eq!(derivation_path(3), vec![2, 3]);
        assert_eq!(derivation_path(0xFFFF_0000).len(), 16);
        assert_eq!(derivation_path(0xFFFF_0000)[0], 0x8000_0000);
        assert_eq!(derivation_path(0xFFFF_0000)[15], 0xFFFF_0000);
        assert_eq!(derivation_path(0b1010_0100), vec![0x80, 0xA0, 0xA4]);
        assert!(derivation_path(0).is_empty());
    }

    #[test]
    fn aes_ksn_fields_and_invalid_ksns() {
        let k = ksn(0x1234_5678);
        assert_eq!(k.initial_key_id(), IKID);
        assert_eq!(k.counter(), 0x1234_5678);
        assert_eq!(k.bytes()[..8], IKID);
        let with = |c: u32| {
            let mut b = IKID.to_vec();
            b.extend_from_slice(&c.to_be_bytes());
            b
        };
        let msg = |r: Result<AesKsn, DukptError>| match r {
            Err(DukptError::InvalidKsn(m)) => m,
            other => panic!("accepted or wrong error: {other:?}"),
        };
        assert!(msg(AesKsn::parse(&with(0))).contains("zero"));
        assert!(msg(AesKsn::parse(&with(0xFFFF_8000))).contains("16 one-bits")); // 17 bits
        assert!(AesKsn::parse(&with(0xFFFF_0000)).is_ok()); // 16 bits
        assert!(msg(AesKsn::parse(&IKID)).contains("12 bytes"));
        assert!(msg(AesKsn::parse(&[0u8; 13])).contains("12 bytes"));
        assert!(AesKsn::parse_initial(&with(0)).is_ok());
        assert!(AesKsn::parse_initial(&with(0xFFFF_8000)).is_err());
    }

    #[test]
    fn aes_parameter_checks() {
        let ik = h("1273671EA26AC29AFA4D1084127652A1");
        // An AES-128 key cannot yield an AES-256 key.
        assert!(matches!(
            aes_derive(&ik, AesKeyType::Aes256, KeyUsage::PinEncryption, &IKID, 1),
            Err(DukptError::InvalidParameter(_))
        ));
        assert!(matches!(
            aes_derive(&ik[..15], AesKeyType::Aes128, KeyUsage::PinEncryption, &IKID, 1),
            Err(DukptError::InvalidParameter(_))
        ));
        assert!(matches!(
            aes_transaction_key(&ik, AesKeyType::Aes256, &ksn(1)),
            Err(DukptError::InvalidParameter(_))
        ));
        assert!(matches!(
            aes_working_key(&ik, AesKeyType::Aes128, KeyUsage::KeyDerivation, &ksn(1)),
            Err(DukptError::InvalidParameter(_))
        ));
    }

    /// End to end with the X9.24-3 supplement's format 4 example: PIN 1234, PAN
    /// 4111111111111111, random 2F69ADDE2E9E7ACE, PIN keys of counters 1 and 2.
    #[test]
    fn aes_dukpt_format4_pin_block() {
        use crate::crypto::pin::{decipher, encipher, Account, Pin, PinError, PinFormat};
        #[derive(Debug)]
        struct E;
        impl From<PinError> for E {
            fn from(_: PinError) -> Self {
                E
            }
        }
        let ik = h("1273671EA26AC29AFA4D1084127652A1");
        let account = Account::from_pan("4111111111111111").unwrap();
        let pin = Pin::from_digits("1234").unwrap();
        let mut random = h("2F69ADDE2E9E7ACE");
        random.extend_from_slice(&[0u8; 8]);
        for (counter, expected) in [
            (1, "A912150391AB65A67E52883D81CE2D15"),
            (2, "52A00503BD34BA1383F6A7EE9FE2547F"),
        ] {
            let k = ksn(counter);
            let tk = aes_transaction_key(&ik, AesKeyType::Aes128, &k).unwrap();
            let key = aes_working_key(&tk, AesKeyType::Aes128, KeyUsage::PinEncryption, &k).unwrap();
            let block = encipher(
                PinFormat::Iso4,
                &pin,
                Some(&account),
                &random,
                |b: &mut [u8]| -> Result<(), E> {
                    let out = aes_ecb(&key, b);
                    b.copy_from_slice(&out);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(block, h(expected));
            let mut c = Crypter::new(Cipher::aes_128_ecb(), Mode::Decrypt, &key, None).unwrap();
            c.pad(false);
            let back = decipher(
                PinFormat::Iso4,
                &block,
                Some(&account),
                |b: &mut [u8]| -> Result<(), E> {
                    let mut out = vec![0u8; 32];
                    let n = c.update(b, &mut out).map_err(|_| E)?;
                    b.copy_from_slice(&out[..n]);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(back.digits(), &[1, 2, 3, 4]);
        }
    }
}
