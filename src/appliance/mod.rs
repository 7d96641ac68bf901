//! The gRPC appliance: TLS server, authorisation layer, audit trail and one file
//! per service. Request path: mTLS -> identity -> authorise -> validate -> handler
//! -> hsm -> audit -> response.

pub mod access;
pub mod admin_service;
pub mod audit;
pub mod audit_keys;
pub mod auth;
pub mod binding_service;
pub mod data_service;
pub mod error;
pub mod front;
pub mod key_service;
pub mod mac_service;
pub mod otp_service;
pub mod otp_store;
pub mod pin_service;
pub mod rate;
pub mod server;
pub mod voucher_service;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tonic::{Code, Response, Status};

use crate::config::{Config, Role};
use crate::hsm::Hsm;
use audit::{AuditEvent, AuditTrail};
pub use error::Error;

/// Shared state of every service.
pub struct AppState {
    /// The config read at start; its clients and roles are only the first [`access::Access`].
    pub config: Arc<Config>,
    /// Clients, roles and the CRL in force (replaced by a reload).
    access: RwLock<Arc<access::Access>>,
    /// The TLS front door: its counters and the handshake configuration.
    pub front: Arc<front::Front>,
    pub hsm: Hsm,
    pub audit: Arc<AuditTrail>,
    /// Unix seconds of this process's start.
    pub boot_epoch: u64,
    /// Rate-limit refusals waiting to be written as one line per client, RPC and second.
    pub refusals: rate::Refusals,
}

/// The authenticated caller of one RPC, put into the request by the auth layer.
#[derive(Clone, Debug)]
pub struct Caller {
    /// First SAN URI of the client certificate, else its subject CN.
    pub identity: String,
    pub role: Arc<Role>,
    /// gRPC path without the leading '/'.
    pub rpc: String,
    pub request_id: String,
    pub started: Instant,
    /// The call's deadline: the configured one, or the client's grpc-timeout if sooner.
    pub deadline: Instant,
    /// Set once the call's audit line is written (the auth layer audits calls whose
    /// handler never ran, such as requests the transport refused to decode).
    pub audited: Arc<AtomicBool>,
}

impl Caller {
    /// The caller of a request that passed the auth layer.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
    }

    /// Refuses a key name the role may not use (before any HSM call).
    pub fn may_use_key(&self, name: &str) -> Result<(), Error> {
        if self.role.allows_key(name) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("role {} may not use key {name}", self.role.name)))
        }
    }
}

/// The key version an operation used, as responses name it.
pub(crate) fn key_ref(e: &crate::hsm::KeyEntry) -> crate::proto::KeyRef {
    crate::proto::KeyRef { name: e.meta.name.clone(), version: e.meta.version }
}

/// What a handler reports for the audit line besides its result.
#[derive(Default, Debug)]
pub struct Note {
    /// Keys used, "name/vN".
    pub keys: Vec<String>,
    /// HMAC'd subject identifiers.
    pub subjects: Vec<String>,
    /// The answer of a verification call ("verdict=LOCKED", "matched=false"), so the
    /// trail shows guessing and lock-outs; never a value from the request.
    pub detail: Option<String>,
    /// The detail of a call that fails (a lock-out, a failure count); never a value
    /// from the request.
    pub error_detail: Option<String>,
}

impl AppState {
    /// Writes the line of refusals that were answered without one of their own.
    pub async fn record_aggregate(&self, agg: &rate::Aggregate) {
        let ev = AuditEvent::rpc(
            &agg.client,
            "",
            &agg.rpc,
            Vec::new(),
            "denied",
            error::code_name(Code::ResourceExhausted),
            0,
            &format!("{:x}-agg-{}", self.boot_epoch, agg.second),
            Vec::new(),
        )
        .with_detail(format!("{} more refusal(s) in unix second {}, aggregated", agg.count, agg.second));
        match self.audit.record(ev).await {
            Ok(_) => self.refusals.written(agg),
            Err(e) => tracing::error!(error = %e, count = agg.count, "audit: aggregated refusals not written"),
        }
    }

    /// Runs a handler body within the caller's deadline; past it the call fails with
    /// DEADLINE_EXCEEDED (and is audited as such). A token operation already started
    /// finishes on its blocking thread; its result is dropped.
    pub async fn within_deadline<T>(
        &self,
        caller: &Caller,
        fut: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout_at(caller.deadline.into(), fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::DeadlineExceeded),
        }
    }

    /// Writes the call's audit line, then answers. If the line cannot be written the
    /// call fails with UNAVAILABLE, whatever its result (the trail fails closed).
    pub async fn finish<T>(&self, caller: &Caller, note: Note, result: Result<T, Error>) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        let outcome = match code {
            Code::Ok => "ok",
            Code::PermissionDenied | Code::Unauthenticated => "denied",
            _ => "error",
        };
        let detail = if result.is_ok() { note.detail } else { note.error_detail };
        let mut ev = AuditEvent::rpc(
            &caller.identity,
            &caller.role.name,
            &caller.rpc,
            note.keys,
            outcome,
            error::code_name(code),
            caller.started.elapsed().as_micros() as u64,
            &caller.request_id,
            note.subjects,
        );
        if let Some(d) = detail {
            ev = ev.with_detail(d);
        }
        caller.audited.store(true, Ordering::Release);
        if let Err(e) = self.audit.record(ev).await {
            tracing::error!(error = %e, rpc = %caller.rpc, "audit write failed: refusing the call");
            return Err(Status::unavailable("audit trail unavailable"));
        }
        result.map(Response::new).map_err(Status::from)
    }
}
