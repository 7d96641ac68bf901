//! AdminService: reload (access policy, CRL and key catalogue), the status a monitor
//! keeps (health, audit chain head, token identity, connection counters) and the
//! authenticated, audited ping.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, Caller, Error, Note};
use crate::proto::admin_service_server::AdminService;
use super::front::Refusal;
use crate::proto::{
    GetStatusRequest, GetStatusResponse, PingRequest, PingResponse, ReloadKeysRequest, ReloadKeysResponse,
};

/// Largest ping payload echoed back.
pub const MAX_PING_PAYLOAD: usize = 64 * 1024;

pub struct AdminSvc {
    pub state: Arc<AppState>,
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn reload_keys(&self, req: Request<ReloadKeysRequest>) -> Result<Response<ReloadKeysResponse>, Status> {
        let caller = Caller::of(&req)?;
        let state = Arc::clone(&self.state);
        let reload = async move {
            let r = state.reload().await?;
            Ok::<_, Error>(ReloadKeysResponse {
                keys_loaded: r.keys as u32,
                clients_loaded: r.clients as u32,
                roles_loaded: r.roles as u32,
                revoked_certificates: r.revoked as u32,
            })
        };
        let r = self.state.within_deadline(&caller, reload).await;
        self.state.finish(&caller, Note::default(), r).await
    }

    async fn get_status(&self, req: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let caller = Caller::of(&req)?;
        let st = &self.state;
        let head = st.audit.head();
        let token = st.hsm.identity();
        let front = &st.front.counters;
        let (aggregated_refusal_lines, aggregated_refusals) = st.refusals.totals();
        let audit_healthy = st.audit.healthy();
        let token_attached = st.hsm.is_live();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let r = GetStatusResponse {
            serving: audit_healthy && token_attached,
            audit_healthy,
            token_attached,
            boot_epoch: st.boot_epoch,
            audit_head_seq: head.seq,
            audit_head_hash: head.hash.to_vec(),
            audit_head: head.to_arg(),
            audit_checkpoint_seq: head.checkpoint_seq,
            token_label: st.hsm.token_label().to_string(),
            token_serial: token.serial,
            token_refused: token.refused.unwrap_or_default(),
            keys_loaded: st.hsm.catalogue().len() as u32,
            aggregated_refusal_lines,
            aggregated_refusals,
            connections_accepted: load(&front.accepted),
            handshakes_completed: load(&front.handshakes),
            connections_closed_early: load(&front.closed_early),
            accept_errors: load(&front.accept_errors),
            pending_handshakes: st.front.pending() as u64,
            refused_evicted_at_cap: front.refused(Refusal::EvictedAtCap),
            refused_evicted_per_source: front.refused(Refusal::EvictedPerSource),
            refused_handshake_timeout: front.refused(Refusal::HandshakeTimeout),
            refused_no_certificate: front.refused(Refusal::NoCertificate),
            refused_revoked: front.refused(Refusal::Revoked),
            refused_bad_certificate: front.refused(Refusal::BadCertificate),
            refused_protocol: front.refused(Refusal::Protocol),
            token_session_objects: st.hsm.objects_since_recycle(),
            token_recycles: st.hsm.recycles(),
        };
        st.finish(&caller, Note::default(), Ok(r)).await
    }

    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let caller = Caller::of(&req)?;
        let payload = req.into_inner().payload;
        let r = if payload.len() > MAX_PING_PAYLOAD {
            Err(Error::invalid("payload", format!("{} bytes exceeds the limit of {MAX_PING_PAYLOAD}", payload.len())))
        } else {
            Ok(PingResponse { payload, boot_epoch: self.state.boot_epoch })
        };
        self.state.finish(&caller, Note::default(), r).await
    }
}
