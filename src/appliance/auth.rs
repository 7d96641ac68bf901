//! Authorisation layer (tower): identity from the TLS client certificate (first SAN
//! URI, else subject CN), role from the config, RPC allowed by the role — deny by
//! default, decided before any handler or HSM call runs. Refusals are audited. While
//! the audit trail cannot be written every call is refused with UNAVAILABLE.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use openssl::nid::Nid;
use openssl::x509::X509;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tower::{Layer, Service};

use super::audit::AuditEvent;
use super::error::code_name;
use super::rate::RateLimiter;
use super::{AppState, Caller};

/// Parses a gRPC `grpc-timeout` header value ("100m", "5S", at most 8 digits).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Identity of a DER certificate: its first SAN URI, else its subject CN.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let cert = X509::from_der(der).ok()?;
    if let Some(sans) = cert.subject_alt_names() {
        if let Some(uri) = sans.iter().find_map(|g| g.uri().map(str::to_string)) {
            return Some(uri);
        }
    }
    let cn = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
    cn.data().to_string().ok()
}

const HEALTH_PREFIX: &str = "grpc.health.v1.Health/";

/// A client certificate seen on a connection, parsed once.
struct Peer {
    identity: String,
    cert: X509,
}

/// Parsed client certificates by SHA-256 of their DER (None: no usable identity).
type PeerCache = Mutex<HashMap<[u8; 32], Option<Arc<Peer>>>>;

#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<AppState>,
    cache: Arc<PeerCache>,
    counter: Arc<AtomicU64>,
    rates: Arc<RateLimiter>,
}

impl AuthLayer {
    pub fn new(state: Arc<AppState>) -> Self {
        AuthLayer { state, cache: Arc::default(), counter: Arc::default(), rates: Arc::default() }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl AuthLayer {
    /// The connection's client certificate and identity (cached by certificate digest).
    fn peer(&self, req: &Request<Body>) -> Option<Arc<Peer>> {
        let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
        let certs = info.peer_certs()?;
        let der = certs.first()?;
        let digest = crate::crypto::sha256(der.as_ref());
        if let Some(peer) = self.cache.lock().ok().and_then(|c| c.get(&digest).cloned()) {
            return peer;
        }
        let peer = X509::from_der(der.as_ref())
            .ok()
            .and_then(|cert| identity_of(der.as_ref()).map(|identity| Arc::new(Peer { identity, cert })));
        if let Ok(mut c) = self.cache.lock() {
            if c.len() > 4096 {
                c.clear();
            }
            c.insert(digest, peer.clone());
        }
        peer
    }

    fn request_id(&self, req: &Request<Body>) -> String {
        match req.headers().get("x-request-id").and_then(|v| v.to_str().ok()) {
            Some(v) if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {
                v.to_string()
            }
            _ => format!("{:x}-{:x}", self.state.boot_epoch, self.counter.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The caller, or the status that refuses the request.
    fn authorise(&self, req: &Request<Body>, started: Instant) -> Result<Caller, (Status, Option<String>, String)> {
        let rpc = req.uri().path().trim_start_matches('/').to_string();
        let request_id = self.request_id(req);
        let Some(peer) = self.peer(req) else {
            return Err((Status::unauthenticated("client certificate required"), None, request_id));
        };
        let identity = peer.identity.clone();
        // The policy in force now: a client removed or a certificate revoked by a reload
        // is refused on connections opened before it too.
        let access = self.state.access();
        if access.revokes(&peer.cert) {
            return Err((Status::unauthenticated("client certificate revoked"), Some(identity), request_id));
        }
        if !self.state.audit.healthy() && !rpc.starts_with(HEALTH_PREFIX) {
            return Err((Status::unavailable("audit trail unavailable"), Some(identity), request_id));
        }
        let Some(role) = access.role_of(&identity) else {
            return Err((
                Status::permission_denied("client is not authorised for any role"),
                Some(identity),
                request_id,
            ));
        };
        if !role.allows_rpc(&rpc) {
            return Err((
                Status::permission_denied(format!("role {} may not call {rpc}", role.name)),
                Some(identity),
                request_id,
            ));
        }
        if let Some(limit) = role.rate_limit(&rpc) {
            if !self.rates.admit(&identity, crate::config::rate_bucket(&rpc), limit) {
                return Err((
                    Status::resource_exhausted(format!(
                        "rate limit of role {} for {rpc} reached ({} per minute per client)",
                        role.name, limit.per_minute
                    )),
                    Some(identity),
                    request_id,
                ));
            }
        }
        let mut budget = self.state.config.limits.deadline;
        if let Some(client) = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout) {
            // Answer a little before the client's own timer (and the transport's) fires,
            // so the client gets DEADLINE_EXCEEDED rather than a reset stream.
            let margin = (client / 10).min(Duration::from_millis(5));
            budget = budget.min(client.saturating_sub(margin));
        }
        Ok(Caller {
            identity,
            role: Arc::clone(role),
            rpc,
            request_id,
            started,
            deadline: started + budget,
            audited: Arc::default(),
        })
    }
}

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        // Take the service that was polled ready; leave a clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            match layer.authorise(&req, started) {
                Ok(caller) if caller.rpc.starts_with("keyward.") => {
                    // keyward handlers write their own line, with keys and outcome. The
                    // call runs in its own task: a client that resets the stream (its
                    // deadline, a cancel) cannot stop a started token operation from
                    // being audited.
                    let audited = Arc::clone(&caller.audited);
                    let fallback = caller.clone();
                    req.extensions_mut().insert(caller);
                    let state = Arc::clone(&layer.state);
                    let task = tokio::spawn(async move {
                        let resp = inner.call(req).await?;
                        if audited.load(Ordering::Acquire) {
                            return Ok(resp);
                        }
                        // The handler never ran: audit the status the client gets.
                        let mut code = resp
                            .headers()
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<i32>().ok())
                            .map(Code::from_i32)
                            .unwrap_or(Code::Unknown);
                        // tonic's codec answers INTERNAL for a body that is not a valid
                        // message of the method, before any handler runs; nothing else
                        // ends a keyward call there with INTERNAL. It is the client's fault.
                        let mut resp = resp;
                        if code == Code::Internal {
                            code = Code::InvalidArgument;
                            let method = fallback.rpc.rsplit('/').next().unwrap_or("");
                            resp = Status::invalid_argument(format!("request: not a valid {method} request message"))
                                .into_http();
                        }
                        let ev = AuditEvent::rpc(
                            &fallback.identity,
                            &fallback.role.name,
                            &fallback.rpc,
                            Vec::new(),
                            if code == Code::Ok { "ok" } else { "error" },
                            code_name(code),
                            fallback.started.elapsed().as_micros() as u64,
                            &fallback.request_id,
                            Vec::new(),
                        );
                        match state.audit.record(ev).await {
                            Ok(_) => Ok(resp),
                            Err(_) => Ok(Status::unavailable("audit trail unavailable").into_http()),
                        }
                    });
                    match task.await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "call task failed");
                            Ok(Status::internal("internal error").into_http())
                        }
                    }
                }
                Ok(caller) if caller.rpc.starts_with(HEALTH_PREFIX) => {
                    // Health probes use no key and must answer NOT_SERVING while the
                    // trail is down, so they are not audited.
                    inner.call(req).await
                }
                Ok(caller) => {
                    // Other standard services (reflection): audited as authorised, then served.
                    let ev = AuditEvent::rpc(
                        &caller.identity,
                        &caller.role.name,
                        &caller.rpc,
                        Vec::new(),
                        "ok",
                        "OK",
                        started.elapsed().as_micros() as u64,
                        &caller.request_id,
                        Vec::new(),
                    );
                    if layer.state.audit.record(ev).await.is_err() {
                        return Ok(Status::unavailable("audit trail unavailable").into_http());
                    }
                    inner.call(req).await
                }
                Err((status, identity, request_id)) => {
                    let rpc = req.uri().path().trim_start_matches('/').to_string();
                    if status.code() == Code::ResourceExhausted {
                        // A rate-limit refusal: the first of its client, RPC and second
                        // gets its own line, the rest one line with their count.
                        if let Some(client) = identity.as_deref() {
                            let (own, done) = layer.state.refusals.note(client, &rpc, crate::unix_now());
                            if let Some(agg) = done {
                                layer.state.record_aggregate(&agg).await;
                            }
                            if !own {
                                return Ok(status.into_http());
                            }
                        }
                    }
                    let ev = AuditEvent::rpc(
                        identity.as_deref().unwrap_or("(none)"),
                        "",
                        &rpc,
                        Vec::new(),
                        "denied",
                        code_name(status.code()),
                        started.elapsed().as_micros() as u64,
                        &request_id,
                        Vec::new(),
                    );
                    let status = match layer.state.audit.record(ev).await {
                        Ok(_) => status,
                        Err(_) => Status::new(Code::Unavailable, "audit trail unavailable"),
                    };
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn identity_prefers_san_uri_then_cn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::pki::write_dev_pki(dir.path(), &["hub".to_string()], &crate::pki::DevPkiOptions::default())
            .expect("dev pki");
        let pem = std::fs::read(&pki.clients[0].1).expect("client cert");
        let der = X509::from_pem(&pem).and_then(|c| c.to_der()).expect("der");
        assert_eq!(identity_of(&der).as_deref(), Some("spiffe://keyward/client/hub"));
        // The server certificate has DNS/IP SANs but no URI: its CN is the identity.
        let pem = std::fs::read(&pki.server_cert).expect("server cert");
        let der = X509::from_pem(&pem).and_then(|c| c.to_der()).expect("der");
        assert_eq!(identity_of(&der).as_deref(), Some("localhost"));
        assert_eq!(identity_of(b"not a certificate"), None);
    }
}
