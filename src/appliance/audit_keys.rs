//! The audit trail's token keys: the `audit` HMAC key seals the line chain (one HMAC
//! per group commit, and per seal checked by the verifier, so it is session-copied like
//! every hot-path key), `audit.sign` (ECDSA
//! P-256, used in place and non-modifiable) signs checkpoints.

use super::audit::{AuditError, AuditKeys};
use crate::hsm::{Hsm, KeyClass};

/// Name of the chain key and of the checkpoint key.
pub const CHAIN_KEY: &str = "audit";
pub const SIGN_KEY: &str = "audit.sign";

pub struct TokenAuditKeys {
    hsm: Hsm,
}

impl TokenAuditKeys {
    pub fn new(hsm: Hsm) -> Self {
        TokenAuditKeys { hsm }
    }
}

fn token_err(e: crate::hsm::Error) -> AuditError {
    AuditError::Token(e.to_string())
}

impl AuditKeys for TokenAuditKeys {
    fn chain_mac(&self, data: &[u8]) -> Result<[u8; 32], AuditError> {
        let key = self.hsm.catalogue().for_new(CHAIN_KEY, &[KeyClass::M7]).map_err(token_err)?;
        let mac = self.hsm.hmac_blocking(&key, data).map_err(token_err)?;
        <[u8; 32]>::try_from(mac.as_slice()).map_err(|_| AuditError::Token("audit key is not HMAC-SHA256".into()))
    }

    fn checkpoint_sign(&self, data: &[u8]) -> Result<Vec<u8>, AuditError> {
        let key = self.hsm.catalogue().for_new(SIGN_KEY, &[KeyClass::S0]).map_err(token_err)?;
        self.hsm.ecdsa_sign_blocking(&key, data).map_err(token_err)
    }

    fn checkpoint_public_key(&self) -> Result<(Vec<u8>, String), AuditError> {
        let key = self.hsm.catalogue().for_new(SIGN_KEY, &[KeyClass::S0]).map_err(token_err)?;
        let der = key.public_der.clone().ok_or_else(|| AuditError::Token("audit.sign has no public key".into()))?;
        Ok((der, key.key_ref()))
    }

    fn chain_key_label(&self) -> String {
        self.hsm
            .catalogue()
            .for_new(CHAIN_KEY, &[KeyClass::M7])
            .map(|k| k.key_ref())
            .unwrap_or_else(|_| format!("{CHAIN_KEY}/?"))
    }
}
