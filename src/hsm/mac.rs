//! Message authentication codes on token keys: ISO 9797-1 algorithm 1 (TDES
//! CBC-MAC) and algorithm 3 (retail MAC, ANSI X9.19, from a pair of single-DES
//! halves), AES-CMAC and HMAC. Always the full-length MAC; truncation and the
//! constant-time comparison belong to the caller.

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;

use super::keys::KeyEntry;
use super::token::Hsm;
use super::{ck, Error, Result};
use crate::crypto::mac::{pad, Padding};

/// Which MAC algorithm a key computes (decided by its class and algorithm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// ISO 9797-1 algorithm 1 with TDES (class M1).
    CbcMacTdes,
    /// ISO 9797-1 algorithm 3, single-DES halves (class M3).
    RetailMac,
    /// AES-CMAC (class M6, AES).
    AesCmac,
    /// HMAC with the key's hash (class M7).
    Hmac,
}

impl MacAlgorithm {
    /// Full MAC length in bytes.
    pub fn full_len(self, key: &KeyEntry) -> usize {
        match self {
            MacAlgorithm::CbcMacTdes | MacAlgorithm::RetailMac => 8,
            MacAlgorithm::AesCmac => 16,
            MacAlgorithm::Hmac => key.meta.algorithm.secret_len().unwrap_or(32),
        }
    }

    /// Whether the algorithm takes an ISO 9797-1 padding method.
    pub fn padded(self) -> bool {
        matches!(self, MacAlgorithm::CbcMacTdes | MacAlgorithm::RetailMac)
    }
}

/// The key(s) of one MAC computation.
pub enum MacKey {
    Single(Arc<KeyEntry>),
    /// Retail MAC: the left and right single-DES halves.
    Pair { left: Arc<KeyEntry>, right: Arc<KeyEntry> },
}

fn last_block(ct: &[u8]) -> Result<[u8; 8]> {
    ct.len()
        .checked_sub(8)
        .and_then(|start| <[u8; 8]>::try_from(&ct[start..]).ok())
        .ok_or_else(|| Error::Token { op: "cbc-mac", rv: "short output".into() })
}

impl Hsm {
    /// The full-length MAC of `data`.
    pub async fn mac(&self, alg: MacAlgorithm, key: MacKey, padding: Padding, data: Vec<u8>) -> Result<Vec<u8>> {
        self.call(move |s, cat| match (alg, &key) {
            (MacAlgorithm::CbcMacTdes, MacKey::Single(k)) => {
                let e = cat.handles_of(k)?;
                let padded = pad(padding, &data, 8);
                let ct = s.encrypt(&Mechanism::Des3Cbc([0u8; 8]), e.handle, &padded).map_err(ck("cbc-mac"))?;
                Ok(last_block(&ct)?.to_vec())
            }
            (MacAlgorithm::RetailMac, MacKey::Pair { left, right }) => {
                // Single DES keys are stored as K||K, so TDES computes single DES.
                let l = cat.handles_of(left)?;
                let r = cat.handles_of(right)?;
                let padded = pad(padding, &data, 8);
                let ct = s.encrypt(&Mechanism::Des3Cbc([0u8; 8]), l.handle, &padded).map_err(ck("retail mac"))?;
                let h = last_block(&ct)?;
                let d = s.decrypt(&Mechanism::Des3Ecb, r.handle, &h).map_err(ck("retail mac"))?;
                s.encrypt(&Mechanism::Des3Ecb, l.handle, &d).map_err(ck("retail mac"))
            }
            (MacAlgorithm::AesCmac, MacKey::Single(k)) => {
                let e = cat.handles_of(k)?;
                s.sign(&Mechanism::AesCMac, e.handle, &data).map_err(ck("cmac"))
            }
            (MacAlgorithm::Hmac, MacKey::Single(k)) => {
                let e = cat.handles_of(k)?;
                let mech = e
                    .meta
                    .algorithm
                    .hmac_mechanism()
                    .ok_or_else(|| Error::KeyUsage { key: e.key_ref(), reason: "not an HMAC key".into() })?;
                s.sign(&mech, e.handle, &data).map_err(ck("hmac"))
            }
            _ => Err(Error::InvalidInput("MAC algorithm and key do not go together".into())),
        })
        .await
    }
}
