//! The echo baseline: a bare tonic server on the appliance's own TLS front door and
//! limits, answering AdminService.Ping with its payload and nothing else (no
//! authorisation layer, no audit trail, no token), so `keyward bench --op echo-baseline`
//! measures what gRPC over mTLS costs here before keyward adds anything.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::appliance::front::{tls_config, Front, FrontLimits};
use crate::config::Config;
use crate::proto::admin_service_server::{AdminService, AdminServiceServer};
use crate::proto::{GetStatusRequest, GetStatusResponse, PingRequest, PingResponse, ReloadKeysRequest, ReloadKeysResponse};

struct Echo;

#[tonic::async_trait]
impl AdminService for Echo {
    async fn reload_keys(&self, _: Request<ReloadKeysRequest>) -> Result<Response<ReloadKeysResponse>, Status> {
        Err(Status::unimplemented("the echo baseline answers Ping only"))
    }

    async fn get_status(&self, _: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        Err(Status::unimplemented("the echo baseline answers Ping only"))
    }

    async fn ping(&self, req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse { payload: req.into_inner().payload, boot_epoch: 0 }))
    }
}

/// Serves the echo baseline on `listen` with the config's certificates and limits until
/// `stop` resolves.
pub async fn serve(config: &Config, listen: SocketAddr, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let front = Arc::new(Front::new(tls_config(config)?, FrontLimits::of(config)));
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("listen on {listen}: {e}"))?;
    let echo = AdminServiceServer::new(Echo).max_decoding_message_size(config.limits.max_message_bytes);
    Server::builder()
        .timeout(config.limits.deadline + std::time::Duration::from_secs(1))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.limits.concurrency))
        .add_service(echo)
        .serve_with_incoming_shutdown(front.serve(listener), stop)
        .await
        .map_err(|e| format!("echo server: {e}"))
}
