//! AdminService: catalogue reload and the authenticated, audited ping.

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
        let hsm = self.state.hsm.clone();
        let reload = async move {
            match tokio::task::spawn_blocking(move || hsm.reload()).await {
                Ok(Ok(n)) => Ok(ReloadKeysResponse { keys_loaded: n as u32 }),
                Ok(Err(e)) => Err(Error::from(e)),
                Err(e) => Err(Error::Internal(e.to_string())),
            }
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
