//! ISO 9797-1 padding, software reference MACs (retail MAC, TDES CBC-MAC, AES-CMAC)
//! for tests and simulated counterparties, and the constant-time comparison every
//! verifier uses. The appliance's own MAC keys stay in the token; nothing here is on
//! its request path except [`pad`] and [`ct_eq`].

use openssl::symm::{Cipher, Crypter, Mode};
use zeroize::Zeroizing;

/// What can go wrong computing a software MAC. Messages name the problem, never a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    /// A key of the wrong length for the algorithm.
    #[error("{0}")]
    InvalidKey(String),
    /// OpenSSL refused or failed the operation.
    #[error("cipher failure: {0}")]
    Cipher(String),
}

/// ISO 9797-1 padding methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Zero bytes up to a multiple of the block length; nothing is added to data that
    /// already fills whole blocks, and empty data becomes one zero block.
    Method1,
    /// One 0x80 byte, then zero bytes up to a multiple of the block length (always adds).
    Method2,
}

/// Pads `data` to a multiple of `block` bytes (a `block` of 0 is treated as 1).
pub fn pad(method: Padding, data: &[u8], block: usize) -> Vec<u8> {
    let block = block.max(1);
    let mut out = Vec::with_capacity(data.len() + block);
    out.extend_from_slice(data);
    match method {
        Padding::Method1 => {
            if out.is_empty() {
                out.resize(block, 0);
            }
        }
        Padding::Method2 => out.push(0x80),
    }
    let rem = out.len() % block;
    if rem != 0 {
        out.resize(out.len() + block - rem, 0);
    }
    out
}

/// ISO 9797-1 MAC algorithm 3 (ANSI X9.19 "retail MAC") with single-DES halves `k1`
/// and `k2`: single-DES CBC-MAC under `k1`, then the last block decrypted under `k2`
/// and encrypted under `k1`. Software reference; the token computes the real ones.
pub fn retail_mac(k1: &[u8; 8], k2: &[u8; 8], padding: Padding, data: &[u8]) -> Result<[u8; 8], MacError> {
    let padded = Zeroizing::new(pad(padding, data, 8));
    let key1 = single_des(k1);
    let key2 = single_des(k2);
    let mut h = cbc_last_block(Cipher::des_ede3_cbc(), &key1[..], &padded)?;
    ecb(Cipher::des_ede3_ecb(), &key2[..], Mode::Decrypt, &mut h[..])?;
    ecb(Cipher::des_ede3_ecb(), &key1[..], Mode::Encrypt, &mut h[..])?;
    let mut out = [0u8; 8];
    out.copy_from_slice(&h[..8]);
    Ok(out)
}

/// ISO 9797-1 MAC algorithm 1 with TDES (double-length `key` of 16 bytes used as
/// K1 K2 K1, or triple-length of 24 bytes): the last block of a TDES CBC encryption
/// with a zero IV.
pub fn cbc_mac_tdes(key: &[u8], padding: Padding, data: &[u8]) -> Result<[u8; 8], MacError> {
    let key = tdes_key(key)?;
    let padded = Zeroizing::new(pad(padding, data, 8));
    let h = cbc_last_block(Cipher::des_ede3_cbc(), &key[..], &padded)?;
    let mut out = [0u8; 8];
    out.copy_from_slice(&h[..8]);
    Ok(out)
}

/// AES-CMAC (NIST SP 800-38B, RFC 4493) with a 16-, 24- or 32-byte key, via OpenSSL.
pub fn aes_cmac(key: &[u8], data: &[u8]) -> Result<[u8; 16], MacError> {
    let cipher = match key.len() {
        16 => Cipher::aes_128_cbc(),
        24 => Cipher::aes_192_cbc(),
        32 => Cipher::aes_256_cbc(),
        _ => return Err(MacError::InvalidKey("AES key must be 16, 24 or 32 bytes".into())),
    };
    let pkey = openssl::pkey::PKey::cmac(&cipher, key).map_err(cipher_err)?;
    let mut signer = openssl::sign::Signer::new_without_digest(&pkey).map_err(cipher_err)?;
    signer.update(data).map_err(cipher_err)?;
    let mac = signer.sign_to_vec().map_err(cipher_err)?;
    let mut out = [0u8; 16];
    if mac.len() != out.len() {
        return Err(MacError::Cipher("unexpected CMAC length".into()));
    }
    out.copy_from_slice(&mac);
    Ok(out)
}

/// Constant-time equality (OpenSSL's `CRYPTO_memcmp`); different lengths are unequal
/// (the length itself is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && openssl::memcmp::eq(a, b)
}

fn cipher_err(e: openssl::error::ErrorStack) -> MacError {
    MacError::Cipher(e.to_string())
}

/// A single-DES key as the TDES key K||K||K (the default OpenSSL 3 provider has no
/// single DES).
fn single_des(k: &[u8; 8]) -> Zeroizing<[u8; 24]> {
    let mut key = Zeroizing::new([0u8; 24]);
    for part in key.chunks_exact_mut(8) {
        part.copy_from_slice(k);
    }
    key
}

/// A 16-byte key as K1 K2 K1; a 24-byte key as is.
fn tdes_key(key: &[u8]) -> Result<Zeroizing<[u8; 24]>, MacError> {
    let mut out = Zeroizing::new([0u8; 24]);
    match key.len() {
        16 => {
            out[..16].copy_from_slice(key);
            out[16..].copy_from_slice(&key[..8]);
        }
        24 => out.copy_from_slice(key),
        _ => return Err(MacError::InvalidKey("TDES key must be 16 or 24 bytes".into())),
    }
    Ok(out)
}

/// In-place ECB over whole blocks, no padding.
fn ecb(cipher: Cipher, key: &[u8], mode: Mode, data: &mut [u8]) -> Result<(), MacError> {
    let mut c = Crypter::new(cipher, mode, key, None).map_err(cipher_err)?;
    c.pad(false);
    let mut out = Zeroizing::new(vec![0u8; data.len() + cipher.block_size()]);
    let n = c.update(data, &mut out[..]).map_err(cipher_err)?;
    let m = c.finalize(&mut out[n..]).map_err(cipher_err)?;
    if n + m != data.len() {
        return Err(MacError::Cipher("ECB output length".into()));
    }
    data.copy_from_slice(&out[..data.len()]);
    Ok(())
}

/// The last ciphertext block of a CBC encryption with a zero IV (`data` already padded).
fn cbc_last_block(cipher: Cipher, key: &[u8], data: &[u8]) -> Result<Zeroizing<Vec<u8>>, MacError> {
    let bs = cipher.block_size();
    if data.is_empty() || !data.len().is_multiple_of(bs) {
        return Err(MacError::Cipher("CBC input is not whole blocks".into()));
    }
    let iv = vec![0u8; bs];
    let mut c = Crypter::new(cipher, Mode::Encrypt, key, Some(&iv)).map_err(cipher_err)?;
    c.pad(false);
    let mut out = Zeroizing::new(vec![0u8; data.len() + bs]);
    let n = c.update(data, &mut out[..]).map_err(cipher_err)?;
    let m = c.finalize(&mut out[n..]).map_err(cipher_err)?;
    if n + m != data.len() {
        return Err(MacError::Cipher("CBC output length".into()));
    }
    Ok(Zeroizing::new(out[data.len() - bs..data.len()].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn padding_method_1() {
        assert_eq!(pad(Padding::Method1, b"", 8), vec![0u8; 8]);
        assert_eq!(pad(Padding::Method1, b"abc", 8), b"abc\0\0\0\0\0".to_vec());
        assert_eq!(pad(Padding::Method1, b"abcdefgh", 8), b"abcdefgh".to_vec());
        assert_eq!(pad(Padding::Method1, b"abcdefghi", 8).len(), 16);
        assert_eq!(pad(Padding::Method1, b"a", 16).len(), 16);
    }

    #[test]
    fn padding_method_2() {
        assert_eq!(pad(Padding::Method2, b"", 8), h("8000000000000000"));
        assert_eq!(pad(Padding::Method2, b"abc", 8), b"abc\x80\0\0\0\0".to_vec());
        assert_eq!(
            pad(Padding::Method2, b"abcdefgh", 8),
            b"abcdefgh\x80\0\0\0\0\0\0\0".to_vec()
        );
        assert_eq!(pad(Padding::Method2, b"abcdefg", 8), b"abcdefg\x80".to_vec());
        assert_eq!(pad(Padding::Method2, &[0u8; 16], 16).len(), 32);
    }

    #[test]
    fn padding_block_zero_does_not_panic() {
        assert_eq!(pad(Padding::Method1, b"ab", 0), b"ab".to_vec());
        assert_eq!(pad(Padding::Method2, b"ab", 0), b"ab\x80".to_vec());
    }

    /// vectors.md: ISO 9797-1 algorithm 3, ANSI X9.19.
    #[test]
    fn retail_mac_x9_19_vector() {
        let k1 = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF];
        let k2 = [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10];
        let mac = retail_mac(&k1, &k2, Padding::Method1, b"Now is the time for all ").unwrap();
        assert_eq!(mac.to_vec(), h("A1C72E74EA3FA9B6"));
    }

    /// With K2 = K1 the output transformation cancels out: the retail MAC is the plain
    /// single-DES CBC-MAC, which equals algorithm 1 with the TDES key K1 K1.
    #[test]
    fn retail_mac_with_equal_halves_is_cbc_mac() {
        let k = [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF];
        let data = b"any message that spans more than one block";
        let mut kk = k.to_vec();
        kk.extend_from_slice(&k);
        for p in [Padding::Method1, Padding::Method2] {
            assert_eq!(
                retail_mac(&k, &k, p, data).unwrap(),
                cbc_mac_tdes(&kk, p, data).unwrap()
            );
        }
    }

    /// Algorithm 1 checked against a block-by-block computation with TDES-ECB.
    #[test]
    fn cbc_mac_tdes_matches_manual_chaining() {
        let key = h("0123456789ABCDEFFEDCBA9876543210");
        let data = b"Now is the time for all good men";
        let mut k24 = key.clone();
        k24.extend_from_slice(&key[..8]);
        let mut chain = [0u8; 8];
        for block in pad(Padding::Method2, data, 8).chunks(8) {
            for (c, d) in chain.iter_mut().zip(block) {
                *c ^= d;
            }
            let out = openssl::symm::encrypt(Cipher::des_ede3_ecb(), &k24, None, &chain).unwrap();
            chain.copy_from_slice(&out[..8]);
        }
        assert_eq!(cbc_mac_tdes(&key, Padding::Method2, data).unwrap(), chain);
        assert_eq!(cbc_mac_tdes(&k24, Padding::Method2, data).unwrap(), chain);
    }

    /// vectors.md: TDES KCV of 0123456789ABCDEFFEDCBA9876543210 is 08D7B4 (one zero block).
    #[test]
    fn cbc_mac_of_zero_block_gives_tdes_kcv() {
        let mac = cbc_mac_tdes(&h("0123456789ABCDEFFEDCBA9876543210"), Padding::Method1, &[0u8; 8]).unwrap();
        assert_eq!(mac[..3].to_vec(), h("08D7B4"));
    }

    #[test]
    fn bad_key_lengths() {
        assert!(matches!(
            cbc_mac_tdes(&[0u8; 8], Padding::Method1, b"x"),
            Err(MacError::InvalidKey(_))
        ));
        assert!(matches!(aes_cmac(&[0u8; 15], b"x"), Err(MacError::InvalidKey(_))));
    }

    /// RFC 4493 section 4, examples 1 and 2, and the AES KCV of vectors.md.
    #[test]
    fn aes_cmac_rfc4493() {
        let k = h("2B7E151628AED2A6ABF7158809CF4F3C");
        assert_eq!(
            aes_cmac(&k, b"").unwrap().to_vec(),
            h("BB1D6929E95937287FA37D129B756746")
        );
        assert_eq!(
            aes_cmac(&k, &h("6BC1BEE22E409F96E93D7E117393172A")).unwrap().to_vec(),
            h("070A16B46B4D4144F79BDD9DD04A287C")
        );
        assert_eq!(aes_cmac(&k, &[0u8; 16]).unwrap()[..3].to_vec(), h("7AD386"));
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }
}
