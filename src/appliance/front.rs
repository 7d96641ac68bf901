//! The TLS front door: accepts TCP connections and bounds what a peer without a
//! certificate can hold (handshake time; connections in their handshake, in all and per
//! source address, the oldest closed at a cap), runs the rustls handshake with the
//! client-certificate verifier (client CA, optional CRL, optional TLS 1.3 only), and
//! counts and logs (rate-limited) every refusal with its reason.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::Config;

/// Why a connection ended before it carried a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Closed to make room: the most connections in their handshake were open.
    EvictedAtCap,
    /// Closed to make room: the most connections in their handshake from one address.
    EvictedPerSource,
    /// No handshake within the time allowed.
    HandshakeTimeout,
    /// The client sent no certificate.
    NoCertificate,
    /// The client's certificate is revoked by the configured CRL.
    Revoked,
    /// The certificate does not chain to the client CA, has expired, or is otherwise bad.
    BadCertificate,
    /// Not TLS, no common version or cipher suite, or another protocol error.
    Protocol,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 7] = [
        Refusal::EvictedAtCap,
        Refusal::EvictedPerSource,
        Refusal::HandshakeTimeout,
        Refusal::NoCertificate,
        Refusal::Revoked,
        Refusal::BadCertificate,
        Refusal::Protocol,
    ];

    /// The reason's name in logs and status answers.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::EvictedAtCap => "evicted_at_cap",
            Refusal::EvictedPerSource => "evicted_per_source",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NoCertificate => "no_certificate",
            Refusal::Revoked => "revoked",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Protocol => "protocol",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn of(err: &std::io::Error) -> Refusal {
        use rustls::{CertificateError, Error};
        match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            Some(Error::NoCertificatesPresented) => Refusal::NoCertificate,
            Some(Error::InvalidCertificate(CertificateError::Revoked)) => Refusal::Revoked,
            Some(Error::InvalidCertificate(_)) => Refusal::BadCertificate,
            _ => Refusal::Protocol,
        }
    }
}

/// What the front door has done since start (for status answers and metrics).
#[derive(Debug, Default)]
pub struct FrontCounters {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Handshakes completed with a valid client certificate.
    pub handshakes: AtomicU64,
    /// Connections closed by the peer before the handshake ended (port probes).
    pub closed_early: AtomicU64,
    /// accept(2) failures (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl FrontCounters {
    /// Connections refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Connections refused for any reason.
    pub fn refused_total(&self) -> u64 {
        Refusal::ALL.iter().map(|r| self.refused(*r)).sum()
    }

    fn count(&self, reason: Refusal) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// At most one warning per reason every [`LOG_EVERY`]; the suppressed ones are counted
/// into the next.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct LogLimiter {
    last: Mutex<[Option<Instant>; Refusal::ALL.len() + 1]>,
    suppressed: [AtomicU64; Refusal::ALL.len() + 1],
}

impl LogLimiter {
    /// Whether to log now, and how many were suppressed since the last line.
    fn admit(&self, slot: usize) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last[slot] {
            Some(t) if now.duration_since(t) < LOG_EVERY => {
                self.suppressed[slot].fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                last[slot] = Some(now);
                Some(self.suppressed[slot].swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// Connections in their handshake: each holds a cancel handle; dropping it closes the
/// connection.
#[derive(Default)]
struct Pending {
    next: u64,
    by_id: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    per_source: HashMap<IpAddr, usize>,
}

impl Pending {
    fn remove(&mut self, id: u64) -> bool {
        let Some((ip, _cancel)) = self.by_id.remove(&id) else { return false };
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
        true
    }
}

/// The limits of the front door.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    pub handshake_timeout: Duration,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
}

impl FrontLimits {
    pub fn of(config: &Config) -> FrontLimits {
        FrontLimits {
            handshake_timeout: config.limits.handshake_timeout,
            max_pending: config.limits.max_pending_handshakes,
            max_pending_per_source: config.limits.max_pending_handshakes_per_source,
        }
    }
}

/// The front door of one listener.
pub struct Front {
    tls: RwLock<Arc<rustls::ServerConfig>>,
    limits: FrontLimits,
    pending: Mutex<Pending>,
    pub counters: FrontCounters,
    logs: LogLimiter,
}

/// Builds the rustls server configuration: the server identity, the client CA (a client
/// certificate is REQUIRED), the CRL when configured, ALPN h2, and TLS 1.3 only if asked.
pub fn tls_config(config: &Config) -> Result<rustls::ServerConfig, String> {
    let s = &config.server;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in pem_certs(&s.client_ca)? {
        roots.add(cert).map_err(|e| format!("{}: not a usable CA certificate: {e}", s.client_ca.display()))?;
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
    if let Some(crl) = &s.client_crl {
        let crls = CertificateRevocationListDer::pem_file_iter(crl)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", crl.display()))?;
        if crls.is_empty() {
            return Err(format!("{}: no CRL in the file", crl.display()));
        }
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| format!("client certificate verifier: {e}"))?;
    let versions: &[&rustls::SupportedProtocolVersion] =
        if s.tls13_only { &[&rustls::version::TLS13] } else { rustls::DEFAULT_VERSIONS };
    let chain = pem_certs(&s.tls_cert)?;
    let key = PrivateKeyDer::from_pem_file(&s.tls_key).map_err(|e| format!("{}: {e}", s.tls_key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate and key: {e}"))?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

impl Front {
    pub fn new(tls: rustls::ServerConfig, limits: FrontLimits) -> Front {
        Front {
            tls: RwLock::new(Arc::new(tls)),
            limits,
            pending: Mutex::default(),
            counters: FrontCounters::default(),
            logs: LogLimiter::default(),
        }
    }

    /// New handshakes use `tls` (a reloaded CRL); open connections keep theirs.
    pub fn set_tls(&self, tls: rustls::ServerConfig) {
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
    }

    fn current_tls(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.tls.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Connections in their handshake now.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).by_id.len()
    }

    fn refuse(&self, reason: Refusal, peer: SocketAddr) {
        self.counters.count(reason);
        if let Some(suppressed) = self.logs.admit(reason.index()) {
            tracing::warn!(
                reason = reason.name(),
                peer = %peer.ip(),
                suppressed,
                total = self.counters.refused(reason),
                "connection refused before authentication"
            );
        }
    }

    /// Registers a new connection, closing the oldest of its source or of all when at a
    /// cap; answers its id and cancel receiver.
    fn admit(&self, peer: SocketAddr) -> (u64, oneshot::Receiver<()>) {
        let ip = peer.ip();
        let mut evicted = Vec::new();
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.per_source.get(&ip).copied().unwrap_or(0) >= self.limits.max_pending_per_source {
            if let Some(id) = p.by_id.iter().find(|(_, (src, _))| *src == ip).map(|(id, _)| *id) {
                p.remove(id);
                evicted.push(Refusal::EvictedPerSource);
            }
        }
        while p.by_id.len() >= self.limits.max_pending {
            let Some(id) = p.by_id.keys().next().copied() else { break };
            p.remove(id);
            evicted.push(Refusal::EvictedAtCap);
        }
        let id = p.next;
        p.next += 1;
        let (tx, rx) = oneshot::channel();
        p.by_id.insert(id, (ip, tx));
        *p.per_source.entry(ip).or_insert(0) += 1;
        drop(p);
        for reason in evicted {
            self.refuse(reason, peer);
        }
        (id, rx)
    }

    fn done(&self, id: u64) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Runs the handshake of one connection; answers the TLS stream of an authenticated
    /// client, or None (counted and logged).
    async fn handshake(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
        let (id, cancelled) = self.admit(peer);
        // The slot is given back however this future ends (also when the server stops).
        struct Slot<'a>(&'a Front, u64);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.done(self.1);
            }
        }
        let _slot = Slot(self, id);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current_tls());
        tokio::select! {
            // Evicted: the counter was bumped by the evictor; dropping `tcp` closes it.
            _ = cancelled => None,
            r = tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)) => match r {
                Err(_) => {
                    self.refuse(Refusal::HandshakeTimeout, peer);
                    None
                }
                Ok(Err(e)) if e.get_ref().is_none() => {
                    // The peer went away (EOF, reset) before sending anything TLS could judge.
                    self.counters.closed_early.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %peer.ip(), error = %e, "connection closed before the TLS handshake ended");
                    None
                }
                Ok(Err(e)) => {
                    self.refuse(Refusal::of(&e), peer);
                    tracing::debug!(peer = %peer.ip(), error = %e, "TLS handshake refused");
                    None
                }
                Ok(Ok(tls)) => {
                    self.counters.handshakes.fetch_add(1, Ordering::Relaxed);
                    Some(tls)
                }
            },
        }
    }

    /// Accepts connections on `listener` until the returned stream is dropped, yielding
    /// the TLS streams of authenticated clients.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.logs.admit(Refusal::ALL.len()) {
                            tracing::warn!(error = %e, suppressed, "accept failed");
                        }
                        // Out of descriptors or memory: give closing connections a moment.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = tcp.set_nodelay(true);
                let front = Arc::clone(&self);
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(tls) = front.handshake(tcp, peer).await {
                        let _ = tx.send(Ok(tls)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Raises the soft open-files limit to the hard one (each connection holds a descriptor);
/// answers (before, after).
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let before = now.current?;
    let Some(max) = now.maximum else {
        // No hard ceiling: a generous soft limit.
        let want = before.max(1 << 20);
        return setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: None }).ok().map(|_| (before, want));
    };
    if before >= max {
        return Some((before, before));
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(max), maximum: Some(max) }).ok().map(|_| (before, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_suppresses_within_the_window() {
        let l = LogLimiter::default();
        assert_eq!(l.admit(0), Some(0));
        assert_eq!(l.admit(0), None);
        assert_eq!(l.admit(0), None);
        assert_eq!(l.admit(1), Some(0), "each reason has its own window");
    }

    #[test]
    fn pending_counts_per_source() {
        let mut p = Pending::default();
        let a: IpAddr = [127, 0, 0, 2].into();
        for id in 0..3 {
            let (tx, _rx) = oneshot::channel();
            p.by_id.insert(id, (a, tx));
            *p.per_source.entry(a).or_insert(0) += 1;
        }
        assert!(p.remove(1));
        assert!(!p.remove(1));
        assert_eq!(p.per_source.get(&a), Some(&2));
        assert!(p.remove(0) && p.remove(2));
        assert!(p.per_source.is_empty());
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let (before, after) = raise_fd_limit().expect("getrlimit");
        assert!(after >= before);
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(now.current, Some(after));
    }
}
