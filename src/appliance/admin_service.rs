//! AdminService: reload (access policy, CRL and key catalogue) and the authenticated,
//! audited ping.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, Caller, Error, Note};
use crate::proto::admin_service_server::AdminService;
use crate::proto::{PingRequest, PingResponse, ReloadKeysRequest, ReloadKeysResponse};

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
