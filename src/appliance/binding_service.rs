//! BindingService: phone-to-account bindings sealed with AES-256-GCM under `binding`
//! (the associated data binds each record to its blind index), found by a blind index
//! (HMAC-SHA-256 under `binding.index`, a separate key so rotating `binding` never
//! changes an index). Records are validated before any token call, exist in clear
//! only in zeroizing memory, and the audit trail names them by blind index only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{key_ref, AppState, Caller, Error, Note};
use crate::crypto::binding::{
    frame_sealed, normalise_phone, parse_blind_index, parse_sealed, seal_aad, BindingRecord, FieldError, RawRecord,
};
use crate::hsm::{self, Algorithm, KeyClass, KeyEntry, Resealable};
use crate::proto::binding_service_server::BindingService;
use crate::proto::{
    open_binding_response, Binding, BlindIndexRequest, BlindIndexResponse, Identity,
    MaskedBinding, OpenBindingRequest, OpenBindingResponse, RewrapBindingsRequest, RewrapBindingsResponse,
    SealBindingRequest, SealBindingResponse,
};

/// Key names of the service.
pub const SEAL_KEY: &str = "binding";
pub const INDEX_KEY: &str = "binding.index";
/// Records re-sealed per token job.
const RESEAL_JOB: usize = 100;
/// The RPC a masked-view role may not combine with BlindIndex.
const OPEN_RPC: &str = "keyward.v1.BindingService/OpenBinding";

impl From<FieldError> for Error {
    fn from(e: FieldError) -> Self {
        Error::InvalidArgument { field: e.field, msg: e.reason }
    }
}


fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

fn raw_record(b: Binding) -> Result<RawRecord, Error> {
    let id = b.identity.ok_or_else(|| Error::invalid("identity", "required"))?;
    Ok(RawRecord {
        phone: b.phone,
        bank_code: b.bank_code,
        account_number: b.account_number,
        account_state: b.account_state,
        name: id.name,
        sex: id.sex,
        birth_date: id.birth_date,
        address: id.address,
        resident_id: id.resident_id,
        id_valid_until: id.id_valid_until,
        issuing_office: id.issuing_office,
    })
}

fn full_view(r: &BindingRecord) -> Binding {
    let id = &r.identity;
    Binding {
        phone: r.phone.as_e164().to_string(),
        bank_code: r.bank_code.clone(),
        account_number: r.account_number.clone(),
        account_state: i32::from(r.account_state.as_u8()),
        identity: Some(Identity {
            name: id.name.clone(),
            sex: i32::from(id.sex.as_u8()),
            birth_date: format!("{:04}-{:02}-{:02}", id.birth_date.year(), u8::from(id.birth_date.month()), id.birth_date.day()),
            address: id.address.clone(),
            resident_id: id.resident_id.clone(),
            id_valid_until: id.id_valid_until.to_text().to_string(),
            issuing_office: id.issuing_office.clone(),
        }),
    }
}

fn masked_view(r: &BindingRecord) -> MaskedBinding {
    let m = r.masked();
    MaskedBinding {
        phone: m.phone,
        bank_code: m.bank_code,
        account_number: m.account_number,
        account_state: i32::from(m.account_state.as_u8()),
        name: m.name,
    }
}

pub struct BindingSvc {
    pub state: Arc<AppState>,
}

impl BindingSvc {
    fn seal_key(&self, caller: &Caller) -> Result<Arc<KeyEntry>, Error> {
        caller.may_use_key(SEAL_KEY)?;
        let k = self.state.hsm.catalogue().for_new(SEAL_KEY, &[KeyClass::Bind])?;
        if k.meta.algorithm != Algorithm::Aes256 {
            return Err(Error::FailedPrecondition(format!("key {}: bindings are sealed with AES-256", k.key_ref())));
        }
        Ok(k)
    }

    fn index_key(&self, caller: &Caller) -> Result<Arc<KeyEntry>, Error> {
        caller.may_use_key(INDEX_KEY)?;
        let k = self.state.hsm.catalogue().for_new(INDEX_KEY, &[KeyClass::Bind])?;
        if k.meta.algorithm != Algorithm::HmacSha256 {
            return Err(Error::FailedPrecondition(format!("key {}: the blind index is HMAC-SHA-256", k.key_ref())));
        }
        Ok(k)
    }

    /// The key version a sealed record names, usable for opening.
    fn opening_key(&self, caller: &Caller, version: u32, field: &'static str) -> Result<Arc<KeyEntry>, Error> {
        caller.may_use_key(SEAL_KEY)?;
        self.state.hsm.catalogue().for_existing(SEAL_KEY, version, &[KeyClass::Bind]).map_err(|e| match e {
            hsm::Error::KeyNotFound(_) => Error::KeyNotFound(format!("{field}: key {SEAL_KEY}/v{version}")),
            hsm::Error::KeyUsage { key, reason } => Error::FailedPrecondition(format!("{field}: key {key}: {reason}")),
            other => other.into(),
        })
    }

    /// SealBinding and BlindIndex both answer a blind index: a role that sees masked
    /// bindings may call neither (masked data plus index lookups unmask a number).
    fn may_compute_indexes(caller: &Caller) -> Result<(), Error> {
        if caller.role.sees_masked_bindings_only() && caller.role.allows_rpc(OPEN_RPC) {
            return Err(Error::PermissionDenied(format!(
                "role {} sees masked bindings and may not compute blind indexes",
                caller.role.name
            )));
        }
        Ok(())
    }

    async fn seal_inner(&self, caller: &Caller, note: &mut Note, r: SealBindingRequest) -> Result<SealBindingResponse, Error> {
        Self::may_compute_indexes(caller)?;
        let b = r.binding.ok_or_else(|| Error::invalid("binding", "required"))?;
        let record = BindingRecord::validate(raw_record(b)?, today())?;
        let (ik, sk) = (self.index_key(caller)?, self.seal_key(caller)?);
        note.keys.push(ik.key_ref());
        note.keys.push(sk.key_ref());
        let (index, iv, ct) =
            self.state.hsm.seal_binding(&ik, &sk, record.phone.index_input(), seal_aad, record.encode()).await?;
        note.subjects.push(hex::encode(index));
        Ok(SealBindingResponse {
            sealed: frame_sealed(sk.meta.version, &iv, &ct),
            blind_index: index.to_vec(),
            key: Some(key_ref(&sk)),
        })
    }

    async fn index_inner(&self, caller: &Caller, note: &mut Note, r: BlindIndexRequest) -> Result<BlindIndexResponse, Error> {
        Self::may_compute_indexes(caller)?;
        let phone = normalise_phone(&r.phone)?;
        let ik = self.index_key(caller)?;
        note.keys.push(ik.key_ref());
        let index = self.state.hsm.blind_index(&ik, phone.index_input()).await?;
        note.subjects.push(hex::encode(index));
        Ok(BlindIndexResponse { blind_index: index.to_vec(), key: Some(key_ref(&ik)) })
    }

    async fn open_inner(&self, caller: &Caller, note: &mut Note, r: OpenBindingRequest) -> Result<OpenBindingResponse, Error> {
        let index = parse_blind_index(&r.blind_index)?;
        let (header, ct) = parse_sealed(&r.sealed)?;
        note.subjects.push(hex::encode(index));
        let key = self.opening_key(caller, header.key_version, "sealed")?;
        note.keys.push(key.key_ref());
        let clear = self
            .state
            .hsm
            .open_binding(Resealable { key: Arc::clone(&key), iv: header.iv, aad: seal_aad(&index), ciphertext: ct.to_vec() })
            .await
            .map_err(|e| match e {
                hsm::Error::VerifyFailed => Error::VerificationFailed(
                    "sealed: does not open with this blind index (altered, or another row's record)".into(),
                ),
                other => other.into(),
            })?;
        let record = BindingRecord::decode(&clear, today())
            .map_err(|_| Error::Internal(format!("a record sealed under {} does not decode", key.key_ref())))?;
        let view = if caller.role.sees_masked_bindings_only() {
            note.detail = Some("view=masked".into());
            open_binding_response::View::Masked(masked_view(&record))
        } else {
            note.detail = Some("view=full".into());
            open_binding_response::View::Full(full_view(&record))
        };
        Ok(OpenBindingResponse { view: Some(view), key: Some(key_ref(&key)) })
    }

    async fn rewrap_inner(
        &self,
        caller: &Caller,
        note: &mut Note,
        r: RewrapBindingsRequest,
    ) -> Result<RewrapBindingsResponse, Error> {
        let max = self.state.config.binding.max_batch;
        if r.records.is_empty() {
            return Err(Error::invalid("records", "required: at least one record"));
        }
        if r.records.len() > max {
            return Err(Error::invalid("records", format!("{} records exceed the batch limit of {max}", r.records.len())));
        }
        let active = self.seal_key(caller)?;
        let version = active.meta.version;
        note.keys.push(active.key_ref());
        // Parse everything before any token work.
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(r.records.len());
        let mut todo = Vec::new();
        let mut positions = Vec::new();
        for (i, rec) in r.records.into_iter().enumerate() {
            let at = |e: FieldError| Error::invalid("records", format!("item {i}: {e}"));
            let index = parse_blind_index(&rec.blind_index).map_err(at)?;
            let (header, ct) = parse_sealed(&rec.sealed).map_err(at)?;
            if header.key_version == version {
                out.push(Some(rec.sealed));
                continue;
            }
            let key = self.opening_key(caller, header.key_version, "records").map_err(|e| match e {
                Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("item {i}: {m}")),
                Error::KeyNotFound(m) => Error::KeyNotFound(format!("item {i}: {m}")),
                other => other,
            })?;
            if !note.keys.contains(&key.key_ref()) {
                note.keys.push(key.key_ref());
            }
            todo.push(Resealable { key, iv: header.iv, aad: seal_aad(&index), ciphertext: ct.to_vec() });
            positions.push(i);
            out.push(None);
        }
        let already_current = (out.len() - todo.len()) as u32;
        // Token jobs of at most RESEAL_JOB records, so a large batch does not hold one
        // token worker; all or nothing: the answer carries no record unless all opened.
        let mut resealed = Vec::with_capacity(todo.len());
        let mut todo = todo.into_iter().peekable();
        while todo.peek().is_some() {
            let job: Vec<Resealable> = todo.by_ref().take(RESEAL_JOB).collect();
            let done = resealed.len();
            let part = self.state.hsm.reseal_bindings(job, &active).await?.map_err(|j| {
                Error::VerificationFailed(format!(
                    "records: item {} does not open with its blind index; nothing was re-sealed",
                    positions.get(done + j).copied().unwrap_or(done + j)
                ))
            })?;
            resealed.extend(part);
        }
        for (pos, (iv, ct)) in positions.into_iter().zip(resealed) {
            out[pos] = Some(frame_sealed(version, &iv, &ct));
        }
        let sealed: Vec<Vec<u8>> = out.into_iter().flatten().collect();
        note.detail = Some(format!("records={} already_current={already_current}", sealed.len()));
        Ok(RewrapBindingsResponse { sealed, already_current, key: Some(key_ref(&active)) })
    }
}

#[tonic::async_trait]
impl BindingService for BindingSvc {
    async fn seal_binding(&self, req: Request<SealBindingRequest>) -> Result<Response<SealBindingResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.seal_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn blind_index(&self, req: Request<BlindIndexRequest>) -> Result<Response<BlindIndexResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.index_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn open_binding(&self, req: Request<OpenBindingRequest>) -> Result<Response<OpenBindingResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.open_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn rewrap_bindings(&self, req: Request<RewrapBindingsRequest>) -> Result<Response<RewrapBindingsResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.rewrap_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }
}
