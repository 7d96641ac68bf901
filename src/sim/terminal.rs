//! A simulated AES DUKPT PIN pad: loaded by a key-injection facility with its
//! initial key (unwrapped from the transport key, AES key wrap), it encrypts each
//! PIN block under the PIN working key of the next KSN (ANSI X9.24-3), format 4.
//! Software only: a real PIN pad keeps these keys in its secure element.

use openssl::aes::{unwrap_key, AesKey};
use zeroize::Zeroizing;

use crate::crypto::dukpt::{self, AesKeyType, AesKsn, KeyUsage};
use crate::crypto::pin::{self, Account, Pin, PinError};

/// What a terminal can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("initial key does not unwrap under the transport key (wrong key or altered blob)")]
    Unwrap,
    #[error("initial key check value {got} does not match the expected {expected}")]
    Kcv { got: String, expected: String },
    #[error("the transaction counter is exhausted")]
    Exhausted,
    #[error("{0}")]
    Dukpt(#[from] dukpt::DukptError),
    #[error("{0}")]
    Pin(#[from] PinError),
    #[error("cipher: {0}")]
    Cipher(String),
}

/// One AES DUKPT PIN pad.
pub struct Terminal {
    key_type: AesKeyType,
    initial_key: Zeroizing<Vec<u8>>,
    initial_key_id: [u8; 8],
    counter: u32,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal").field("key_type", &self.key_type).field("counter", &self.counter).finish_non_exhaustive()
    }
}

fn cipher_err(e: openssl::error::ErrorStack) -> TerminalError {
    TerminalError::Cipher(e.to_string())
}

/// AES-CMAC KCV (first 3 bytes of CMAC(K, 0^16)), upper-case hex.
fn aes_kcv(key: &[u8]) -> Result<String, TerminalError> {
    let mac = crate::crypto::mac::aes_cmac(key, &[0u8; 16]).map_err(|e| TerminalError::Cipher(e.to_string()))?;
    Ok(hex::encode_upper(&mac[..3]))
}

impl Terminal {
    /// Loads a terminal from its initial key wrapped under the transport key `tmk`
    /// (as `PinService.ExportTerminalKey` returns it), checking the KCV.
    pub fn inject(tmk: &[u8], wrapped: &[u8], kcv: &str, initial_ksn: &[u8]) -> Result<Terminal, TerminalError> {
        let ksn = AesKsn::parse_initial(initial_ksn)?;
        let kek = AesKey::new_decrypt(tmk).map_err(|_| TerminalError::Unwrap)?;
        if wrapped.len() < 24 || !wrapped.len().is_multiple_of(8) {
            return Err(TerminalError::Unwrap);
        }
        let mut ik = Zeroizing::new(vec![0u8; wrapped.len() - 8]);
        unwrap_key(&kek, None, &mut ik, wrapped).map_err(|_| TerminalError::Unwrap)?;
        let key_type = AesKeyType::from_key_len(ik.len()).ok_or(TerminalError::Unwrap)?;
        let got = aes_kcv(&ik)?;
        if !got.eq_ignore_ascii_case(kcv) {
            return Err(TerminalError::Kcv { got, expected: kcv.to_uppercase() });
        }
        Ok(Terminal { key_type, initial_key: ik, initial_key_id: ksn.initial_key_id(), counter: 0 })
    }

    /// A terminal loaded directly with a BDK-derived initial key (tests, bench).
    pub fn from_bdk(bdk: &[u8], initial_key_id: [u8; 8]) -> Result<Terminal, TerminalError> {
        let key_type = AesKeyType::from_key_len(bdk.len())
            .ok_or_else(|| TerminalError::Cipher("BDK must be 16 or 32 bytes".into()))?;
        let initial_key = dukpt::aes_initial_key(bdk, key_type, &initial_key_id)?;
        Ok(Terminal { key_type, initial_key, initial_key_id, counter: 0 })
    }

    /// The KSN of the last transaction.
    pub fn ksn(&self) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..8].copy_from_slice(&self.initial_key_id);
        k[8..].copy_from_slice(&self.counter.to_be_bytes());
        k
    }

    /// Advances to the next valid counter (at most 16 one-bits, X9.24-3).
    fn next_counter(&mut self) -> Result<u32, TerminalError> {
        loop {
            self.counter = self.counter.checked_add(1).ok_or(TerminalError::Exhausted)?;
            if self.counter.count_ones() <= 16 {
                return Ok(self.counter);
            }
        }
    }

    /// Encrypts `pin` for `account` as an ISO format 4 block under the next KSN's PIN
    /// working key: (KSN, block).
    pub fn pin_block(&mut self, pin_digits: &str, account: &Account) -> Result<([u8; 12], Vec<u8>), TerminalError> {
        let pin = Pin::from_digits(pin_digits)?;
        self.next_counter()?;
        let ksn_bytes = self.ksn();
        let ksn = AesKsn::parse(&ksn_bytes)?;
        let tk = dukpt::aes_transaction_key(&self.initial_key, self.key_type, &ksn)?;
        let wk = dukpt::aes_working_key(&tk, self.key_type, KeyUsage::PinEncryption, &ksn)?;
        let mut random = Zeroizing::new([0u8; 16]);
        openssl::rand::rand_bytes(&mut random[..]).map_err(cipher_err)?;
        let cipher = match self.key_type {
            AesKeyType::Aes128 => openssl::symm::Cipher::aes_128_ecb(),
            AesKeyType::Aes256 => openssl::symm::Cipher::aes_256_ecb(),
        };
        let block = pin::encipher(pin::PinFormat::Iso4, &pin, Some(account), &random[..], |b: &mut [u8]| {
            let mut c = openssl::symm::Crypter::new(cipher, openssl::symm::Mode::Encrypt, &wk, None).map_err(cipher_err)?;
            c.pad(false);
            let mut out = Zeroizing::new(vec![0u8; b.len() + 16]);
            let n = c.update(b, &mut out).map_err(cipher_err)?;
            b.copy_from_slice(&out[..n.min(b.len())]);
            Ok::<(), TerminalError>(())
        })?;
        Ok((ksn_bytes, block))
    }
}
