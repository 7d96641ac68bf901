//! KeyService: the catalogue's metadata (names, versions, classes, states, KCVs,
//! public keys). Never secret material; only keys the caller's role may use.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, Caller, Error, Note};
use crate::hsm::{self, KeyEntry, KeyState as HState};
use crate::proto::key_service_server::KeyService;
use crate::proto::{GetKeyRequest, KeyInfo, KeyState, ListKeysRequest, ListKeysResponse};

pub struct KeySvc {
    pub state: Arc<AppState>,
}

/// The wire view of a catalogue entry.
pub fn key_info(e: &KeyEntry) -> KeyInfo {
    KeyInfo {
        name: e.meta.name.clone(),
        version: e.meta.version,
        class: e.meta.class.as_str().to_string(),
        algorithm: e.meta.algorithm.as_str().to_string(),
        state: match e.meta.state {
            HState::Active => KeyState::Active,
            HState::VerifyOnly => KeyState::VerifyOnly,
            HState::Retired => KeyState::Retired,
        } as i32,
        kcv: e.meta.kcv.clone(),
        created: e.meta.created.clone(),
        public_key_der: e.public_der.clone().unwrap_or_default(),
    }
}

impl KeySvc {
    fn list(&self, caller: &Caller, r: ListKeysRequest) -> Result<ListKeysResponse, Error> {
        if r.name_prefix.len() > 64 {
            return Err(Error::invalid("name_prefix", "longer than 64 bytes"));
        }
        let cat = self.state.hsm.catalogue();
        let keys = cat
            .iter()
            .filter(|e| e.meta.name.starts_with(&r.name_prefix) && caller.role.allows_key(&e.meta.name))
            .map(|e| key_info(e))
            .collect();
        Ok(ListKeysResponse { keys })
    }

    fn get(&self, caller: &Caller, note: &mut Note, r: GetKeyRequest) -> Result<KeyInfo, Error> {
        if r.name.is_empty() {
            return Err(Error::invalid("name", "required"));
        }
        hsm::validate_name(&r.name).map_err(|m| Error::invalid("name", m))?;
        caller.may_use_key(&r.name)?;
        let cat = self.state.hsm.catalogue();
        let e = cat.get(&r.name, r.version)?;
        note.keys.push(e.key_ref());
        Ok(key_info(e))
    }
}

#[tonic::async_trait]
impl KeyService for KeySvc {
    async fn list_keys(&self, req: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        let caller = Caller::of(&req)?;
        let r = self.list(&caller, req.into_inner());
        self.state.finish(&caller, Note::default(), r).await
    }

    async fn get_key(&self, req: Request<GetKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.get(&caller, &mut note, req.into_inner());
        self.state.finish(&caller, note, r).await
    }
}
