//! Client side of the mTLS gRPC API, shared by the demo, the benchmark, tests and
//! the platform's thin clients.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::data_service_client::DataServiceClient;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::mac_service_client::MacServiceClient;
use crate::proto::otp_service_client::OtpServiceClient;
use crate::proto::voucher_service_client::VoucherServiceClient;
use crate::proto::binding_service_client::BindingServiceClient;
use crate::proto::pin_service_client::PinServiceClient;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("connect: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Certificates of one client.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name the server certificate must carry (default "localhost").
    pub server_name: String,
}

impl ClientTls {
    /// The dev-pki layout: DIR/ca.crt and DIR/clients/NAME.{crt,key}.
    pub fn dev(pki_dir: &Path, client: &str) -> ClientTls {
        ClientTls {
            ca: pki_dir.join("ca.crt"),
            cert: Some(pki_dir.join("clients").join(format!("{client}.crt"))),
            key: Some(pki_dir.join("clients").join(format!("{client}.key"))),
            server_name: "localhost".into(),
        }
    }
}

fn read(p: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(p).map_err(|err| ClientError::Read { path: p.to_path_buf(), err })
}

/// An endpoint for `addr` ("127.0.0.1:50051") with the client's TLS identity.
pub fn endpoint(addr: &str, tls: &ClientTls) -> Result<Endpoint, ClientError> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .domain_name(tls.server_name.clone());
    if let (Some(c), Some(k)) = (&tls.cert, &tls.key) {
        cfg = cfg.identity(Identity::from_pem(read(c)?, read(k)?));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(cfg)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30)))
}

/// Connects (TLS handshake included).
pub async fn connect(addr: &str, tls: &ClientTls) -> Result<Channel, ClientError> {
    Ok(endpoint(addr, tls)?.connect().await?)
}

/// The keyward service clients on one channel.
#[derive(Clone)]
pub struct Clients {
    pub keys: KeyServiceClient<Channel>,
    pub data: DataServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    pub pin: PinServiceClient<Channel>,
    pub mac: MacServiceClient<Channel>,
    pub otp: OtpServiceClient<Channel>,
    pub voucher: VoucherServiceClient<Channel>,
    pub binding: BindingServiceClient<Channel>,
}

impl Clients {
    pub fn new(ch: Channel) -> Clients {
        Clients {
            keys: KeyServiceClient::new(ch.clone()),
            data: DataServiceClient::new(ch.clone()),
            admin: AdminServiceClient::new(ch.clone()),
            pin: PinServiceClient::new(ch.clone()),
            mac: MacServiceClient::new(ch.clone()),
            otp: OtpServiceClient::new(ch.clone()),
            voucher: VoucherServiceClient::new(ch.clone()),
            binding: BindingServiceClient::new(ch),
        }
    }
}
