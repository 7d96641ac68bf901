//! DataService: AES-256-GCM for stored and transmitted data under class D0 keys.
//! Ciphertexts are self-describing (format byte, key version, IV, ciphertext+tag);
//! the caller's associated data is mandatory and bound together with the key name
//! and version.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, Caller, Error, Note};
use crate::crypto::encoding::domain_separated;
use crate::hsm::{self, KeyClass};
use crate::proto::data_service_server::DataService;
use crate::proto::{DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, KeyRef};

/// First byte of every DataService ciphertext.
pub const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 4 + 12;
const TAG_LEN: usize = 16;
/// Upper bound of the associated data.
pub const MAX_AAD: usize = 64 * 1024;

pub struct DataSvc {
    pub state: Arc<AppState>,
}

impl DataSvc {
    fn max_plaintext(&self) -> usize {
        self.state.config.limits.max_message_bytes.saturating_sub(4096)
    }

    fn gcm_aad(name: &str, version: u32, aad: &[u8]) -> Vec<u8> {
        domain_separated("keyward/v1/data", &[name.as_bytes(), &version.to_be_bytes(), aad])
    }

    fn check_common(caller: &Caller, key_name: &str, aad: &[u8]) -> Result<(), Error> {
        if key_name.is_empty() {
            return Err(Error::invalid("key_name", "required"));
        }
        hsm::validate_name(key_name).map_err(|m| Error::invalid("key_name", m))?;
        if aad.is_empty() {
            return Err(Error::invalid("aad", "required: associated data must not be empty"));
        }
        if aad.len() > MAX_AAD {
            return Err(Error::invalid("aad", format!("{} bytes exceeds the limit of {MAX_AAD}", aad.len())));
        }
        caller.may_use_key(key_name)
    }

    async fn encrypt_inner(&self, caller: &Caller, note: &mut Note, r: EncryptRequest) -> Result<EncryptResponse, Error> {
        Self::check_common(caller, &r.key_name, &r.aad)?;
        if r.plaintext.len() > self.max_plaintext() {
            return Err(Error::invalid(
                "plaintext",
                format!("{} bytes exceeds the limit of {}", r.plaintext.len(), self.max_plaintext()),
            ));
        }
        let key = self.state.hsm.catalogue().for_new(&r.key_name, &[KeyClass::D0])?;
        note.keys.push(key.key_ref());
        let version = key.meta.version;
        let aad = Self::gcm_aad(&r.key_name, version, &r.aad);
        let (iv, ct) = self.state.hsm.gcm_encrypt(&key, aad, r.plaintext).await?;
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(EncryptResponse { ciphertext: out, key: Some(KeyRef { name: r.key_name, version }) })
    }

    async fn decrypt_inner(&self, caller: &Caller, note: &mut Note, r: DecryptRequest) -> Result<DecryptResponse, Error> {
        Self::check_common(caller, &r.key_name, &r.aad)?;
        let c = &r.ciphertext;
        if c.len() < HEADER_LEN + TAG_LEN {
            return Err(Error::invalid("ciphertext", format!("too short ({} bytes)", c.len())));
        }
        if c[0] != FORMAT_V1 {
            return Err(Error::invalid("ciphertext", format!("unknown format {}", c[0])));
        }
        let version = u32::from_be_bytes([c[1], c[2], c[3], c[4]]);
        if version == 0 {
            return Err(Error::invalid("ciphertext", "key version 0 is invalid"));
        }
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&c[5..HEADER_LEN]);
        let key = self
            .state
            .hsm
            .catalogue()
            .for_existing(&r.key_name, version, &[KeyClass::D0])
            .map_err(|e| match e {
                hsm::Error::KeyNotFound(k) => Error::KeyNotFound(format!("ciphertext: key version {k}")),
                other => other.into(),
            })?;
        note.keys.push(key.key_ref());
        let aad = Self::gcm_aad(&r.key_name, version, &r.aad);
        let pt = self.state.hsm.gcm_decrypt(&key, iv, aad, c[HEADER_LEN..].to_vec()).await.map_err(|e| match e {
            hsm::Error::VerifyFailed => Error::VerificationFailed(
                "ciphertext: does not authenticate with this key and aad (altered, or a different aad)".into(),
            ),
            other => other.into(),
        })?;
        Ok(DecryptResponse { plaintext: pt.to_vec(), key: Some(KeyRef { name: r.key_name, version }) })
    }
}

#[tonic::async_trait]
impl DataService for DataSvc {
    async fn encrypt(&self, req: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.encrypt_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn decrypt(&self, req: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.decrypt_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }
}
