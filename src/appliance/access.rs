//! Who may call: the client -> role map, the roles, and the client certificates the CRL
//! revokes. Built from the config at start and again on every reload (SIGHUP,
//! AdminService.ReloadKeys); a reload that does not validate leaves the old one in force.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use openssl::x509::{CrlStatus, X509Crl, X509};

use super::front::tls_config;
use super::AppState;
use crate::config::{Config, Role};

/// The access policy in force.
#[derive(Default)]
pub struct Access {
    clients: BTreeMap<String, String>,
    roles: BTreeMap<String, Arc<Role>>,
    crls: Vec<X509Crl>,
}

impl Access {
    /// The policy of a validated config; the CRL file (when set) must parse and be
    /// signed by the client CA.
    pub fn of(config: &Config) -> Result<Access, String> {
        let crls = match &config.server.client_crl {
            Some(path) => load_crls(path, &config.server.client_ca)?,
            None => Vec::new(),
        };
        Ok(Access { clients: config.clients.clone(), roles: config.roles.clone(), crls })
    }

    /// The role of a client identity, if the policy names it.
    pub fn role_of(&self, identity: &str) -> Option<&Arc<Role>> {
        self.clients.get(identity).and_then(|r| self.roles.get(r))
    }

    /// Whether a CRL in force revokes this certificate.
    pub fn revokes(&self, cert: &X509) -> bool {
        self.crls.iter().any(|crl| matches!(crl.get_by_cert(cert), CrlStatus::Revoked(_) | CrlStatus::RemoveFromCrl(_)))
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    pub fn roles(&self) -> usize {
        self.roles.len()
    }

    /// Revoked serial numbers over all CRLs.
    pub fn revoked(&self) -> usize {
        self.crls.iter().map(|c| c.get_revoked().map_or(0, |r| r.len())).sum()
    }
}

fn load_crls(path: &Path, ca: &Path) -> Result<Vec<X509Crl>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ca_pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let cas = X509::stack_from_pem(&ca_pem).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut out = Vec::new();
    // A PEM file may hold several CRLs, one per "X509 CRL" block.
    let text = String::from_utf8_lossy(&pem);
    for block in text.split_inclusive("-----END X509 CRL-----").filter(|b| b.contains("-----BEGIN X509 CRL-----")) {
        let crl = X509Crl::from_pem(block.as_bytes()).map_err(|e| format!("{}: not a PEM CRL: {e}", path.display()))?;
        let signed = cas.iter().any(|ca| {
            ca.subject_name().try_cmp(crl.issuer_name()).is_ok_and(|o| o.is_eq())
                && ca.public_key().and_then(|k| crl.verify(&k)).unwrap_or(false)
        });
        if !signed {
            return Err(format!("{}: a CRL is not signed by the client CA", path.display()));
        }
        out.push(crl);
    }
    if out.is_empty() {
        return Err(format!("{}: no CRL in the file", path.display()));
    }
    Ok(out)
}

/// What a reload changed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reloaded {
    pub keys: usize,
    pub clients: usize,
    pub roles: usize,
    pub revoked: usize,
}

impl AppState {
    /// The access policy in force.
    pub fn access(&self) -> Arc<Access> {
        Arc::clone(&self.access.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the config file again and puts its clients, roles, rate limits and CRL in
    /// force (validated first: on any error nothing changes), then reloads the key
    /// catalogue. Other settings take effect at the next start.
    pub async fn reload(&self) -> Result<Reloaded, super::Error> {
        use super::Error;
        let (access, tls) = match &self.config.source {
            Some(path) => {
                let config = Config::load(path).map_err(|e| Error::FailedPrecondition(format!("config not reloaded: {e}")))?;
                let access = Access::of(&config).map_err(|e| Error::FailedPrecondition(format!("config not reloaded: {e}")))?;
                let tls = tls_config(&config).map_err(|e| Error::FailedPrecondition(format!("config not reloaded: {e}")))?;
                (Some(access), Some(tls))
            }
            None => (None, None),
        };
        let hsm = self.hsm.clone();
        let keys = match tokio::task::spawn_blocking(move || hsm.reload()).await {
            Ok(r) => r.map_err(Error::from)?,
            Err(e) => return Err(Error::Internal(format!("reload task: {e}"))),
        };
        if let (Some(access), Some(tls)) = (access, tls) {
            *self.access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
            self.front.set_tls(tls);
        }
        let a = self.access();
        Ok(Reloaded { keys, clients: a.clients(), roles: a.roles(), revoked: a.revoked() })
    }
}
