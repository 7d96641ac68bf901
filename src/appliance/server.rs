//! The TLS server: mandatory mTLS (rustls through tonic), the authorisation layer,
//! request limits (message size, deadline, global concurrency), health, reflection,
//! the audit trail's lifecycle, SIGHUP reload and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::admin_service::AdminSvc;
use super::audit::{AuditEvent, AuditOptions, AuditTrail, EventKind};
use super::auth::AuthLayer;
use super::data_service::DataSvc;
use super::mac_service::MacSvc;
use super::binding_service::BindingSvc;
use super::otp_service::OtpSvc;
use super::voucher_service::VoucherSvc;
use super::pin_service::PinSvc;
use super::key_service::KeySvc;
use super::access::Access;
use super::front::{self, Front, FrontLimits};
use super::AppState;
use crate::config::Config;
use crate::hsm::{Hsm, HsmOptions};
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::data_service_server::DataServiceServer;
use crate::proto::mac_service_server::MacServiceServer;
use crate::proto::binding_service_server::BindingServiceServer;
use crate::proto::otp_service_server::OtpServiceServer;
use crate::proto::voucher_service_server::VoucherServiceServer;
use crate::proto::pin_service_server::PinServiceServer;
use crate::proto::key_service_server::KeyServiceServer;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("token: {0}")]
    Hsm(#[from] crate::hsm::Error),
    #[error("audit trail: {0}")]
    Audit(#[from] super::audit::AuditError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listen on {addr}: {err}")]
    Bind { addr: SocketAddr, err: std::io::Error },
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("service set-up: {0}")]
    Setup(String),
}

/// Opens the token with the config's settings (keys copied into session objects).
pub fn open_hsm(config: &Config) -> Result<Hsm, crate::hsm::Error> {
    Hsm::open(HsmOptions {
        module: config.hsm.module.clone(),
        token_label: config.hsm.token_label.clone(),
        user_pin: config.hsm.user_pin.clone(),
        pool_size: config.hsm.sessions,
        session_copies: true,
        recycle_after_objects: config.hsm.recycle_after_objects,
    })
}

/// A started appliance.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Stops accepting, lets calls in flight finish, writes the final audit checkpoint.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Tls(format!("server task: {e}"))),
        }
    }
}

/// Starts the appliance on the configured address (port 0 picks a free one) and
/// returns once it accepts connections.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    // Every connection holds a descriptor: take what the hard limit allows.
    if let Some((before, after)) = front::raise_fd_limit() {
        if before != after {
            tracing::info!(before, after, "open-files limit raised");
        }
    }
    let config = Arc::new(config);
    // TLS and the access policy are checked before the token is opened.
    let tls = front::tls_config(&config).map_err(ServeError::Tls)?;
    let access = Access::of(&config).map_err(ServeError::Tls)?;
    let front = Arc::new(Front::new(tls, FrontLimits::of(&config)));
    let hsm = {
        let c = Arc::clone(&config);
        tokio::task::spawn_blocking(move || open_hsm(&c))
            .await
            .map_err(|e| ServeError::Tls(format!("start-up task: {e}")))??
    };
    for (label, reason) in hsm.catalogue().refused() {
        tracing::error!(key = %label, %reason, "key refused at start-up: not served");
    }
    let audit_keys = Arc::new(super::audit_keys::TokenAuditKeys::new(hsm.clone()));
    let audit = AuditTrail::open(
        &config.audit.dir,
        audit_keys,
        AuditOptions {
            checkpoint_every: config.audit.checkpoint_every,
            checkpoint_interval: config.audit.checkpoint_interval,
            writer_name: "appliance".into(),
            ..AuditOptions::default()
        },
    )?;
    let boot_epoch = crate::unix_now();
    let state = Arc::new(AppState {
        config: Arc::clone(&config),
        access: std::sync::RwLock::new(Arc::new(access)),
        front: Arc::clone(&front),
        hsm,
        audit: Arc::new(audit),
        boot_epoch,
        refusals: Default::default(),
    });

    let (health, health_svc) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let max = config.limits.max_message_bytes;
    let keys = KeyServiceServer::new(KeySvc { state: Arc::clone(&state) }).max_decoding_message_size(max);
    let data = DataServiceServer::new(DataSvc { state: Arc::clone(&state) }).max_decoding_message_size(max);
    let admin = AdminServiceServer::new(AdminSvc { state: Arc::clone(&state) }).max_decoding_message_size(max);
    let pin = PinServiceServer::new(PinSvc::new(Arc::clone(&state))).max_decoding_message_size(max);
    let mac = MacServiceServer::new(MacSvc { state: Arc::clone(&state) }).max_decoding_message_size(max);
    let otp = OtpServiceServer::new(OtpSvc::new(Arc::clone(&state)).map_err(|e| ServeError::Setup(e.to_string()))?)
        .max_decoding_message_size(max);
    let voucher = VoucherServiceServer::new(VoucherSvc::new(Arc::clone(&state))).max_decoding_message_size(max);
    let binding = BindingServiceServer::new(BindingSvc { state: Arc::clone(&state) }).max_decoding_message_size(max);

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|err| ServeError::Bind { addr: config.server.listen, err })?;
    let addr = listener.local_addr().map_err(|err| ServeError::Bind { addr: config.server.listen, err })?;
    let incoming = Arc::clone(&front).serve(listener);

    let router = Server::builder()
        // Backstop only: handlers enforce the deadline themselves so the call is audited.
        .timeout(config.limits.deadline + Duration::from_secs(1))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.limits.concurrency))
        .layer(AuthLayer::new(Arc::clone(&state)))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(keys)
        .add_service(data)
        .add_service(admin)
        .add_service(pin)
        .add_service(mac)
        .add_service(otp)
        .add_service(voucher)
        .add_service(binding);

    // Health follows the token and the audit trail: NOT_SERVING while either is down.
    let watch_state = Arc::clone(&state);
    let watcher = tokio::spawn(async move {
        let mut last = None;
        let mut tick: u64 = 0;
        loop {
            tick += 1;
            if tick.is_multiple_of(5) {
                // Once a second: is the token still there (or back)? Health must not
                // wait for a call to fail.
                let hsm = watch_state.hsm.clone();
                let _ = tokio::task::spawn_blocking(move || hsm.probe()).await;
            }
            if !watch_state.audit.healthy() {
                // Nothing else writes while calls are refused: probe, so the trail (and
                // health) come back as soon as the directory is writable again.
                let probe = AuditEvent::new(EventKind::Start, "audit.resume")
                    .with_client("appliance", "system")
                    .with_detail("audit trail writable again after a failure");
                let _ = watch_state.audit.record(probe).await;
            }
            for agg in watch_state.refusals.due(crate::unix_now()) {
                watch_state.record_aggregate(&agg).await;
            }
            let ok = watch_state.audit.healthy() && watch_state.hsm.is_live();
            if last != Some(ok) {
                let status = if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status("", status).await;
                for svc in [
                    "keyward.v1.KeyService",
                    "keyward.v1.DataService",
                    "keyward.v1.AdminService",
                    "keyward.v1.PinService",
                    "keyward.v1.MacService",
                    "keyward.v1.OtpService",
                    "keyward.v1.VoucherService",
                    "keyward.v1.BindingService",
                ] {
                    health.set_service_status(svc, status).await;
                }
                if !ok {
                    tracing::error!("appliance NOT_SERVING: audit trail or token unavailable");
                }
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // SIGHUP reloads the clients, roles, CRL and the key catalogue.
    let hup_state = Arc::clone(&state);
    let hup = tokio::spawn(async move {
        let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while sig.recv().await.is_some() {
            match hup_state.reload().await {
                Ok(r) => tracing::info!(
                    keys = r.keys,
                    clients = r.clients,
                    roles = r.roles,
                    revoked = r.revoked,
                    "SIGHUP: configuration and key catalogue reloaded"
                ),
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload refused; the previous configuration stays in force"),
            }
        }
    });

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run_state = Arc::clone(&state);
    let task = tokio::spawn(async move {
        let r = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        watcher.abort();
        hup.abort();
        for agg in run_state.refusals.due(u64::MAX) {
            run_state.record_aggregate(&agg).await;
        }
        let audit = Arc::clone(&run_state.audit);
        let closed = tokio::task::spawn_blocking(move || audit.shutdown())
            .await
            .map_err(|e| ServeError::Tls(format!("audit shutdown task: {e}")))?;
        r?;
        closed?;
        Ok(())
    });
    tracing::info!(%addr, "keyward appliance listening (mTLS required)");
    Ok(Running { addr, state, shutdown: Some(tx), task })
}

/// Runs until `stop` resolves (e.g. Ctrl-C / SIGTERM).
pub async fn serve(config: Config, stop: impl Future<Output = ()>) -> Result<(), ServeError> {
    let running = start(config).await?;
    stop.await;
    tracing::info!("shutting down");
    running.shutdown().await
}
