//! Development PKI: a throwaway CA, a server certificate and client certificates for demos and tests.
//!
//! Everything here is for development only: the CA's private key lives in a file (`ca.key`,
//! mode 0600) next to the certificates. Layout of a PKI directory:
//!
//! ```text
//! ca.crt  ca.key  server.crt  server.key  clients/<name>.crt  clients/<name>.key
//! foreign/ca.crt  foreign/ca.key  foreign/clients/<name>.{crt,key}   (write_foreign_client)
//! ```
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM; private keys are written 0600, atomically
//! (temporary file + rename). [`write_dev_pki`] keeps an existing CA (`ca.crt` + `ca.key`)
//! so that certificates issued earlier stay valid, and (re)issues the server and the named
//! client certificates.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::x509::X509;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// CA certificate file name.
pub const CA_CERT_FILE: &str = "ca.crt";
/// CA private key file name (0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Server certificate file name.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// Server private key file name (0600).
pub const SERVER_KEY_FILE: &str = "server.key";
/// Directory (inside a PKI directory) holding `<name>.crt` and `<name>.key`.
pub const CLIENTS_DIR: &str = "clients";
/// Directory (inside a PKI directory) of the unrelated "foreign" CA.
pub const FOREIGN_DIR: &str = "foreign";
/// Prefix of a client certificate's SAN URI; the client name follows.
pub const CLIENT_URI_PREFIX: &str = "spiffe://keyward/client/";

/// Lifetime of the CA and of the certificates it issues (capped at the CA's own expiry).
const VALIDITY_DAYS: i64 = 825;
/// Certificates start one day in the past, so clock skew does not reject them.
const BACKDATE_DAYS: i64 = 1;
const FOREIGN_CA_NAME: &str = "keyward foreign test CA";

/// Errors of the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A client name outside `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid client name {0:?}: it must match [a-z0-9][a-z0-9._-]{{0,62}}")]
    InvalidClientName(String),
    /// The same client name twice in one request.
    #[error("client name {0:?} given more than once")]
    DuplicateClientName(String),
    /// A server name that is neither an IP address nor a DNS name.
    #[error("invalid server name {0:?}: expected a DNS name or an IP address")]
    InvalidServerName(String),
    /// No server names at all.
    #[error("at least one server name is required")]
    NoServerNames,
    /// An empty CA name.
    #[error("the CA name must not be empty")]
    EmptyCaName,
    /// `not_before` is not earlier than `not_after`.
    #[error("invalid validity period: not_before must be earlier than not_after")]
    InvalidValidity,
    /// The CA in a directory is missing, incomplete or unusable.
    #[error("CA in {dir}: {reason}")]
    Ca {
        /// The PKI directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Parsing or checking a certificate failed.
    #[error("certificate check failed: {0}")]
    Check(#[from] openssl::error::ErrorStack),
}

/// Paths of a development PKI written by [`write_dev_pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The CA certificate (trust anchor for both server and client certificates).
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// The server private key (0600).
    pub server_key: PathBuf,
    /// One entry per client: (name, certificate, private key).
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Options of [`write_dev_pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPkiOptions {
    /// Subject alternative names of the server certificate: DNS names or IP addresses.
    pub server_names: Vec<String>,
    /// Common name of a newly created CA (an existing CA keeps its name).
    pub ca_name: String,
}

impl Default for DevPkiOptions {
    fn default() -> Self {
        Self {
            server_names: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ca_name: "keyward dev CA".to_owned(),
        }
    }
}

/// Writes a development PKI into `dir`: a CA (created unless `ca.crt` and `ca.key` already
/// exist), a server certificate for `opts.server_names`, and one certificate per client.
///
/// All inputs are validated before anything is written.
pub fn write_dev_pki(
    dir: &Path,
    clients: &[String],
    opts: &DevPkiOptions,
) -> Result<DevPki, PkiError> {
    for (i, name) in clients.iter().enumerate() {
        validate_client_name(name)?;
        if clients[..i].contains(name) {
            return Err(PkiError::DuplicateClientName(name.clone()));
        }
    }
    let server_sans = server_sans(&opts.server_names)?;
    if opts.ca_name.trim().is_empty() {
        return Err(PkiError::EmptyCaName);
    }

    let now = OffsetDateTime::now_utc();
    let ca = ensure_ca(dir, &opts.ca_name, now)?;
    let not_before = now - Duration::days(BACKDATE_DAYS);
    let not_after = (now + Duration::days(VALIDITY_DAYS)).min(ca.not_after);

    let mut server = leaf_params(not_before, not_after);
    let cn = opts
        .server_names
        .first()
        .map(String::as_str)
        .unwrap_or("keyward server");
    server.distinguished_name.push(DnType::CommonName, cn);
    server.subject_alt_names = server_sans;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = dir.join(SERVER_CERT_FILE);
    let server_key = dir.join(SERVER_KEY_FILE);
    ca.issue(server, &server_cert, &server_key)?;

    let mut issued = Vec::with_capacity(clients.len());
    for name in clients {
        let (cert, key) = issue_client_with(dir, &ca, name, not_before, not_after)?;
        issued.push((name.clone(), cert, key));
    }

    Ok(DevPki {
        ca_cert: dir.join(CA_CERT_FILE),
        server_cert,
        server_key,
        clients: issued,
    })
}

/// Issues one extra client certificate from the CA in `dir` (`ca.crt` + `ca.key`), with the
/// given validity (which may lie in the past: tests use it for an expired client).
///
/// Writes `dir/clients/<name>.crt` and `dir/clients/<name>.key` (0600), replacing earlier
/// ones, and returns their paths.
pub fn issue_client(
    dir: &Path,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_client_name(name)?;
    if not_before >= not_after {
        return Err(PkiError::InvalidValidity);
    }
    let ca = load_ca(dir)?;
    issue_client_with(dir, &ca, name, not_before, not_after)
}

/// Writes a completely separate CA under `dir/foreign/` (kept if it already exists) and one
/// client certificate signed by it, `dir/foreign/clients/<name>.{crt,key}`; returns
/// (certificate, key). A server trusting only `dir/ca.crt` must refuse this client.
pub fn write_foreign_client(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_client_name(name)?;
    let foreign = dir.join(FOREIGN_DIR);
    let now = OffsetDateTime::now_utc();
    let ca = ensure_ca(&foreign, FOREIGN_CA_NAME, now)?;
    let not_before = now - Duration::days(BACKDATE_DAYS);
    let not_after = (now + Duration::days(VALIDITY_DAYS)).min(ca.not_after);
    issue_client_with(&foreign, &ca, name, not_before, not_after)
}

/// File name of the CRL [`write_dev_crl`] writes.
pub const CRL_FILE: &str = "ca.crl";

/// Writes `dir/ca.crl`: a CRL signed by the CA in `dir`, valid for 30 days, revoking the
/// certificates at `revoked` (PEM files issued by that CA); answers its path. The
/// appliance's `server.client_crl` takes it; an empty list revokes nothing.
pub fn write_dev_crl(dir: &Path, revoked: &[PathBuf]) -> Result<PathBuf, PkiError> {
    let ca = load_ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for path in revoked {
        let cert = X509::from_pem(read_file(path)?.as_bytes())?;
        if cert.issuer_name().to_der()? != ca.cert.subject_name().to_der()? {
            return Err(ca.error(&format!("{} was not issued by this CA", path.display())));
        }
        let serial = cert.serial_number().to_bn()?.to_vec();
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: now - Duration::minutes(1),
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - Duration::minutes(1),
        next_update: now + Duration::days(30),
        crl_number: rcgen::SerialNumber::from(now.unix_timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: if ca.has_key_id { ca_key_id_method(&ca)? } else { KeyIdMethod::Sha256 },
    };
    let crl = params.signed_by(&ca.issuer)?;
    let path = dir.join(CRL_FILE);
    write_file(&path, crl.pem()?.as_bytes(), 0o644)?;
    Ok(path)
}

/// The key identifier of the CA certificate, as CRLs name their issuer's key.
fn ca_key_id_method(ca: &Ca) -> Result<KeyIdMethod, PkiError> {
    match ca.cert.subject_key_id() {
        Some(id) => Ok(KeyIdMethod::PreSpecified(id.as_slice().to_vec())),
        None => Err(ca.error("the CA certificate has no subject key identifier")),
    }
}

/// Checks a client name against `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate_client_name(name: &str) -> Result<(), PkiError> {
    let bytes = name.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes
        .iter()
        .skip(1)
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if first_ok && rest_ok && bytes.len() <= 63 {
        Ok(())
    } else {
        Err(PkiError::InvalidClientName(name.to_owned()))
    }
}

/// A loaded CA: its certificate (for checks) and an rcgen issuer whose subject and key
/// identifier reproduce the certificate's exactly.
struct Ca {
    dir: PathBuf,
    cert: X509,
    issuer: Issuer<'static, KeyPair>,
    /// The CA has a subject key identifier, so leaves get a matching authority key identifier.
    has_key_id: bool,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Signs `params` for a fresh P-256 key, checks the result against the CA certificate,
    /// and writes the certificate and key.
    fn issue(
        &self,
        mut params: CertificateParams,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), PkiError> {
        params.use_authority_key_identifier_extension = self.has_key_id;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let pem = cert.pem();

        // Self-check: the new certificate must chain to the CA certificate byte for byte
        // (rustls compares issuer and subject names as raw DER).
        let parsed = X509::from_pem(pem.as_bytes())?;
        let ca_key = self.cert.public_key()?;
        if !parsed.verify(&ca_key)?
            || parsed.issuer_name().to_der()? != self.cert.subject_name().to_der()?
        {
            return Err(self.error("a certificate it issued does not chain to ca.crt"));
        }

        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, pem.as_bytes(), 0o644)?;
        Ok(())
    }

    fn error(&self, reason: &str) -> PkiError {
        PkiError::Ca {
            dir: self.dir.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// Loads the CA in `dir`, or creates one named `ca_name` if neither `ca.crt` nor `ca.key` exists.
fn ensure_ca(dir: &Path, ca_name: &str, now: OffsetDateTime) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => {}
        (false, false) => {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, ca_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = now - Duration::days(BACKDATE_DAYS);
            params.not_after = now + Duration::days(VALIDITY_DAYS);
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let cert = params.self_signed(&key)?;
            create_dir(dir)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        }
        _ => {
            return Err(PkiError::Ca {
                dir: dir.to_path_buf(),
                reason: "only one of ca.crt and ca.key exists; remove it or restore the other"
                    .to_owned(),
            })
        }
    }
    load_ca(dir)
}

/// Loads `dir/ca.crt` and `dir/ca.key` and rebuilds an issuer from them.
fn load_ca(dir: &Path) -> Result<Ca, PkiError> {
    let ca_err = |reason: String| PkiError::Ca {
        dir: dir.to_path_buf(),
        reason,
    };
    let cert_pem = read_file(&dir.join(CA_CERT_FILE))?;
    let key_pem = read_file(&dir.join(CA_KEY_FILE))?;
    let cert = X509::from_pem(cert_pem.as_bytes())
        .map_err(|e| ca_err(format!("ca.crt is not a PEM certificate: {e}")))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| ca_err(format!("ca.key is not a PKCS#8 PEM private key: {e}")))?;

    let key_public =
        PKey::public_key_from_der(&rcgen::PublicKeyData::subject_public_key_info(&key))?;
    if !cert.public_key()?.public_eq(&key_public) {
        return Err(ca_err("ca.key does not belong to ca.crt".to_owned()));
    }

    // rcgen (without its x509-parser feature) cannot read a certificate, so rebuild the
    // issuer's subject from ca.crt. Issue-time checks compare the DER byte for byte.
    let mut dn = DistinguishedName::new();
    for entry in cert.subject_name().entries() {
        if entry.object().nid() != Nid::COMMONNAME {
            return Err(ca_err(
                "ca.crt's subject has attributes other than a common name".to_owned(),
            ));
        }
        dn.push(DnType::CommonName, entry.data().to_string()?);
    }

    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let has_key_id = match cert.subject_key_id() {
        Some(id) => {
            params.key_identifier_method = KeyIdMethod::PreSpecified(id.as_slice().to_vec());
            true
        }
        None => false,
    };

    // ca.crt's expiry, as an OffsetDateTime: now + (not_after - now).
    let now = OffsetDateTime::now_utc();
    let diff = Asn1Time::from_unix(now.unix_timestamp())?.diff(cert.not_after())?;
    let not_after =
        now + Duration::days(i64::from(diff.days)) + Duration::seconds(i64::from(diff.secs));
    if not_after <= now {
        return Err(ca_err(
            "ca.crt has expired; remove the directory to start afresh".to_owned(),
        ));
    }

    Ok(Ca {
        dir: dir.to_path_buf(),
        cert,
        issuer: Issuer::new(params, key),
        has_key_id,
        not_after,
    })
}

fn issue_client_with(
    dir: &Path,
    ca: &Ca,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let mut params = leaf_params(not_before, not_after);
    params.distinguished_name.push(DnType::CommonName, name);
    let uri = format!("{CLIENT_URI_PREFIX}{name}");
    let uri = uri
        .try_into()
        .map_err(|_| PkiError::InvalidClientName(name.to_owned()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];

    let clients = dir.join(CLIENTS_DIR);
    create_dir(&clients)?;
    let cert = clients.join(format!("{name}.crt"));
    let key = clients.join(format!("{name}.key"));
    ca.issue(params, &cert, &key)?;
    Ok((cert, key))
}

/// Parameters shared by server and client certificates (end entity, digital signature).
fn leaf_params(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

fn server_sans(names: &[String]) -> Result<Vec<SanType>, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoServerNames);
    }
    names
        .iter()
        .map(|name| {
            if let Ok(ip) = name.parse::<IpAddr>() {
                return Ok(SanType::IpAddress(ip));
            }
            if !is_dns_name(name) {
                return Err(PkiError::InvalidServerName(name.clone()));
            }
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|_| PkiError::InvalidServerName(name.clone()))?;
            Ok(SanType::DnsName(ia5))
        })
        .collect()
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens (an optional
/// leading `*.` wildcard label), at most 253 characters.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` atomically: a temporary file created with `mode` in the same
/// directory, synced, then renamed over `path`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::stack::Stack;
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::verify::X509VerifyParam;
    use openssl::x509::X509StoreContext;

    fn load(path: &Path) -> X509 {
        X509::from_pem(&fs::read(path).unwrap()).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn cn(cert: &X509) -> String {
        let entry = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .unwrap();
        entry.data().to_string().unwrap()
    }

    fn uris(cert: &X509) -> Vec<String> {
        cert.subject_alt_names()
            .map(|sans| {
                sans.iter()
                    .filter_map(|n| n.uri().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Full chain verification with OpenSSL's verifier (names, signature, validity, CA flags).
    fn chain_ok(ca: &X509, leaf: &X509) -> Result<(), String> {
        verify(ca, leaf, None)
    }

    /// `chain_ok`, and the leaf must also be valid for `host` (a DNS name or an IP address).
    fn server_ok(ca: &X509, leaf: &X509, host: &str) -> bool {
        verify(ca, leaf, Some(host)).is_ok()
    }

    fn verify(ca: &X509, leaf: &X509, host: Option<&str>) -> Result<(), String> {
        let mut store = X509StoreBuilder::new().unwrap();
        store.add_cert(ca.clone()).unwrap();
        if let Some(host) = host {
            let mut param = X509VerifyParam::new().unwrap();
            match host.parse::<IpAddr>() {
                Ok(ip) => param.set_ip(ip).unwrap(),
                Err(_) => param.set_host(host).unwrap(),
            }
            store.set_param(&param).unwrap();
        }
        let store = store.build();
        let mut ctx = X509StoreContext::new().unwrap();
        let chain = Stack::new().unwrap();
        let ok = ctx
            .init(&store, leaf, &chain, |c| {
                let ok = c.verify_cert()?;
                Ok((ok, c.error().to_string()))
            })
            .unwrap();
        if ok.0 {
            Ok(())
        } else {
            Err(ok.1)
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn writes_a_complete_pki() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let pki =
            write_dev_pki(dir, &names(&["hub", "ecash-1"]), &DevPkiOptions::default()).unwrap();

        assert_eq!(pki.ca_cert, dir.join("ca.crt"));
        assert_eq!(pki.server_cert, dir.join("server.crt"));
        assert_eq!(pki.server_key, dir.join("server.key"));
        for file in ["ca.crt", "ca.key", "server.crt", "server.key"] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("server.key")), 0o600);
        assert_eq!(pki.clients.len(), 2);
        for (name, cert, key) in &pki.clients {
            assert_eq!(cert, &dir.join("clients").join(format!("{name}.crt")));
            assert_eq!(key, &dir.join("clients").join(format!("{name}.key")));
            assert!(cert.is_file() && key.is_file());
            assert_eq!(mode(key), 0o600);
        }
        // No temporary files left behind.
        for entry in fs::read_dir(dir)
            .unwrap()
            .chain(fs::read_dir(dir.join("clients")).unwrap())
        {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "leftover {name}");
        }

        let ca = load(&pki.ca_cert);
        assert_eq!(cn(&ca), "keyward dev CA");
        assert!(
            ca.verify(&ca.public_key().unwrap()).unwrap(),
            "CA is self-signed"
        );

        let client = load(&pki.clients[0].1);
        assert_eq!(cn(&client), "hub");
        assert_eq!(
            uris(&client),
            vec!["spiffe://keyward/client/hub".to_owned()]
        );
        assert!(client.verify(&ca.public_key().unwrap()).unwrap());
        chain_ok(&ca, &client).unwrap();

        // The client key belongs to the client certificate.
        let key = PKey::private_key_from_pem(&fs::read(&pki.clients[0].2).unwrap()).unwrap();
        assert!(client.public_key().unwrap().public_eq(&key));

        let server = load(&pki.server_cert);
        chain_ok(&ca, &server).unwrap();
        let sans = server.subject_alt_names().unwrap();
        let dns: Vec<_> = sans
            .iter()
            .filter_map(|n| n.dnsname().map(str::to_owned))
            .collect();
        let ips: Vec<_> = sans
            .iter()
            .filter_map(|n| n.ipaddress().map(<[u8]>::to_vec))
            .collect();
        assert_eq!(dns, vec!["localhost".to_owned()]);
        assert_eq!(ips, vec![vec![127, 0, 0, 1]]);
        assert!(server_ok(&ca, &server, "localhost"));
        assert!(server_ok(&ca, &server, "127.0.0.1"));
        assert!(!server_ok(&ca, &server, "example.com"));
    }

    #[test]
    fn certificates_carry_the_intended_purposes() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = write_dev_pki(tmp.path(), &names(&["ops"]), &DevPkiOptions::default()).unwrap();
        let text = |p: &Path| String::from_utf8(load(p).to_text().unwrap()).unwrap();
        let ca = text(&pki.ca_cert);
        assert!(ca.contains("CA:TRUE"), "{ca}");
        assert!(ca.contains("Certificate Sign, CRL Sign"), "{ca}");
        assert!(
            ca.contains("ecdsa-with-SHA256") && ca.contains("prime256v1"),
            "{ca}"
        );
        let server = text(&pki.server_cert);
        assert!(server.contains("TLS Web Server Authentication"), "{server}");
        assert!(
            !server.contains("TLS Web Client Authentication"),
            "{server}"
        );
        assert!(server.contains("CA:FALSE"), "{server}");
        let client = text(&pki.clients[0].1);
        assert!(client.contains("TLS Web Client Authentication"), "{client}");
        assert!(
            !client.contains("TLS Web Server Authentication"),
            "{client}"
        );
    }

    #[test]
    fn rerun_keeps_the_ca_and_reissues_leaves() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let first = write_dev_pki(dir, &names(&["a"]), &DevPkiOptions::default()).unwrap();
        let ca_before = fs::read(&first.ca_cert).unwrap();
        let client_before = fs::read(&first.clients[0].1).unwrap();
        let second = write_dev_pki(dir, &names(&["a", "b"]), &DevPkiOptions::default()).unwrap();
        assert_eq!(fs::read(&second.ca_cert).unwrap(), ca_before);
        assert_ne!(fs::read(&second.clients[0].1).unwrap(), client_before);
        let ca = load(&second.ca_cert);
        // The earlier certificate is still valid under the kept CA.
        chain_ok(&ca, &X509::from_pem(&client_before).unwrap()).unwrap();
        chain_ok(&ca, &load(&second.clients[1].1)).unwrap();
    }

    #[test]
    fn expired_client_from_issue_client() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_dev_pki(dir, &[], &DevPkiOptions::default()).unwrap();
        let now = OffsetDateTime::now_utc();
        let (cert, key) = issue_client(
            dir,
            "expired",
            now - Duration::days(10),
            now - Duration::days(1),
        )
        .unwrap();
        assert_eq!(cert, dir.join("clients/expired.crt"));
        assert_eq!(mode(&key), 0o600);

        let ca = load(&dir.join("ca.crt"));
        let client = load(&cert);
        assert_eq!(cn(&client), "expired");
        assert_eq!(
            uris(&client),
            vec!["spiffe://keyward/client/expired".to_owned()]
        );
        let in_past = client.not_after() < Asn1Time::days_from_now(0).unwrap();
        assert!(
            in_past,
            "not_after {} is not in the past",
            client.not_after()
        );
        assert!(
            client.verify(&ca.public_key().unwrap()).unwrap(),
            "signed by the CA"
        );
        let err = chain_ok(&ca, &client).unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn issue_client_needs_a_ca_and_a_sane_period() {
        let tmp = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let later = now + Duration::days(1);
        assert!(matches!(
            issue_client(tmp.path(), "x", now, later),
            Err(PkiError::Io { .. })
        ));
        write_dev_pki(tmp.path(), &[], &DevPkiOptions::default()).unwrap();
        assert!(matches!(
            issue_client(tmp.path(), "x", later, now),
            Err(PkiError::InvalidValidity)
        ));
        fs::remove_file(tmp.path().join("ca.crt")).unwrap();
        assert!(matches!(
            write_dev_pki(tmp.path(), &[], &DevPkiOptions::default()),
            Err(PkiError::Ca { .. })
        ));
    }

    #[test]
    fn mismatched_ca_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        write_dev_pki(&a, &[], &DevPkiOptions::default()).unwrap();
        write_dev_pki(&b, &[], &DevPkiOptions::default()).unwrap();
        fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
        let now = OffsetDateTime::now_utc();
        let err = issue_client(&a, "x", now, now + Duration::days(1)).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn foreign_client_does_not_chain_to_the_dev_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_dev_pki(dir, &names(&["hub"]), &DevPkiOptions::default()).unwrap();
        let (cert, key) = write_foreign_client(dir, "hub").unwrap();
        assert!(cert.starts_with(dir.join("foreign")));
        assert_eq!(mode(&key), 0o600);
        let foreign = load(&cert);
        assert_eq!(cn(&foreign), "hub");
        assert_eq!(
            uris(&foreign),
            vec!["spiffe://keyward/client/hub".to_owned()]
        );

        let ca = load(&dir.join("ca.crt"));
        assert!(!foreign.verify(&ca.public_key().unwrap()).unwrap());
        assert!(chain_ok(&ca, &foreign).is_err());
        let foreign_ca = load(&dir.join("foreign/ca.crt"));
        chain_ok(&foreign_ca, &foreign).unwrap();
        // The dev CA's own files are untouched by the foreign one.
        assert_ne!(ca.to_der().unwrap(), foreign_ca.to_der().unwrap());
    }

    #[test]
    fn custom_names() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = DevPkiOptions {
            server_names: names(&["keyward.internal", "*.hsm.test", "::1", "10.0.0.7"]),
            ca_name: "Test Root".to_owned(),
        };
        let pki = write_dev_pki(tmp.path(), &[], &opts).unwrap();
        assert!(pki.clients.is_empty());
        assert_eq!(cn(&load(&pki.ca_cert)), "Test Root");
        let ca = load(&pki.ca_cert);
        let server = load(&pki.server_cert);
        assert_eq!(cn(&server), "keyward.internal");
        for host in ["keyward.internal", "a.hsm.test", "::1", "10.0.0.7"] {
            assert!(server_ok(&ca, &server, host), "{host}");
        }
        assert!(!server_ok(&ca, &server, "localhost"));
        assert!(!server_ok(&ca, &server, "127.0.0.1"));
    }

    #[test]
    fn rejects_bad_input_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let long = "a".repeat(64);
        for bad in [
            "",
            "Hub",
            "-x",
            ".x",
            "a b",
            "a/b",
            "../x",
            "é",
            long.as_str(),
        ] {
            let err = write_dev_pki(&dir, &[bad.to_owned()], &DevPkiOptions::default());
            assert!(
                matches!(err, Err(PkiError::InvalidClientName(_))),
                "{bad:?}: {err:?}"
            );
            assert!(matches!(
                write_foreign_client(&dir, bad),
                Err(PkiError::InvalidClientName(_))
            ));
        }
        for good in ["a", "0", "hub.v2_x-y", &"a".repeat(63)] {
            validate_client_name(good).unwrap();
        }
        let dup = write_dev_pki(&dir, &names(&["a", "a"]), &DevPkiOptions::default());
        assert!(matches!(dup, Err(PkiError::DuplicateClientName(_))));
        let mut opts = DevPkiOptions {
            server_names: names(&["bad name"]),
            ..DevPkiOptions::default()
        };
        assert!(matches!(
            write_dev_pki(&dir, &[], &opts),
            Err(PkiError::InvalidServerName(_))
        ));
        opts.server_names.clear();
        assert!(matches!(
            write_dev_pki(&dir, &[], &opts),
            Err(PkiError::NoServerNames)
        ));
        let opts = DevPkiOptions {
            ca_name: " ".to_owned(),
            ..DevPkiOptions::default()
        };
        assert!(matches!(
            write_dev_pki(&dir, &[], &opts),
            Err(PkiError::EmptyCaName)
        ));
        assert!(!dir.exists(), "nothing may be written for invalid input");
    }
}
