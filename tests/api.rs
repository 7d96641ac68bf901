//! The gRPC surface over real mTLS: client certificates refused (none, foreign CA,
//! expired), authorisation by role and key, input validation that names the field and
//! never answers INTERNAL, and the standard health service.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use keyward::client::{self, ClientTls, Clients};
use keyward::proto::{DecryptRequest, EncryptRequest, GetKeyRequest, ListKeysRequest, PingRequest, ReloadKeysRequest};
use time::{Duration as TimeDuration, OffsetDateTime};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn enc(key: &str, pt: &[u8], aad: &[u8]) -> EncryptRequest {
    EncryptRequest { key_name: key.into(), plaintext: pt.to_vec(), aad: aad.to_vec() }
}

fn dec(key: &str, ct: &[u8], aad: &[u8]) -> DecryptRequest {
    DecryptRequest { key_name: key.into(), ciphertext: ct.to_vec(), aad: aad.to_vec() }
}

/// A client with these certificates must not get an answer: either the connection
/// fails or (TLS 1.3: the server checks the client certificate after the client
/// considers the handshake done) the first RPC does.
async fn assert_refused(addr: &str, tls: &ClientTls, what: &str) {
    let ch = match client::connect(addr, tls).await {
        Err(_) => return,
        Ok(ch) => ch,
    };
    let c = Clients::new(ch);
    match c.admin.clone().ping(PingRequest { payload: b"hi".to_vec() }).await {
        Ok(r) => panic!("{what}: the appliance answered Ping: {:?}", r.get_ref()),
        Err(s) => assert_ne!(s.code(), Code::Ok, "{what}"),
    }
    let r = c.data.clone().encrypt(enc("data", b"x", b"y")).await;
    assert!(r.is_err(), "{what}: the appliance answered Encrypt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_missing_foreign_and_expired_client_certificates() {
    let fx = fixture();
    let pki = &fx.prepared.pki;
    let srv = start("mtls").await;

    let none = ClientTls { ca: pki.join("ca.crt"), cert: None, key: None, server_name: "localhost".into() };
    assert_refused(&srv.addr, &none, "no client certificate").await;

    let (fcert, fkey) = keyward::pki::write_foreign_client(pki, "mallory").expect("foreign client");
    let foreign = ClientTls { ca: pki.join("ca.crt"), cert: Some(fcert), key: Some(fkey), server_name: "localhost".into() };
    assert_refused(&srv.addr, &foreign, "client certificate from a foreign CA").await;

    let now = OffsetDateTime::now_utc();
    let (ecert, ekey) = keyward::pki::issue_client(pki, "hub-expired", now - TimeDuration::days(10), now - TimeDuration::days(1))
        .expect("expired client");
    let expired = ClientTls { ca: pki.join("ca.crt"), cert: Some(ecert), key: Some(ekey), server_name: "localhost".into() };
    assert_refused(&srv.addr, &expired, "expired client certificate").await;

    // The server still serves a good client afterwards.
    let admin = srv.clients("admin").await;
    admin.admin.clone().ping(PingRequest { payload: b"ok".to_vec() }).await.expect("a valid client is served");
    // None of the refused clients reached the request path: no audit line names them.
    let dir = srv.audit_dir.clone();
    let lines = rpc_lines(&dir);
    srv.stop().await;
    let lines_after = rpc_lines(&dir);
    assert!(lines_after.len() >= lines.len());
    for l in &lines_after {
        let client = l["client"].as_str().unwrap_or_default();
        assert!(!client.contains("mallory") && !client.contains("hub-expired"), "a refused client got an audit line: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorisation_by_role_and_key() {
    let fx = fixture();
    let pki = &fx.prepared.pki;
    let srv = start("authz").await;

    let auditor = srv.clients("auditor").await;
    expect_code(auditor.data.clone().encrypt(enc("data", b"x", b"y")).await, Code::PermissionDenied, &[], "auditor -> Encrypt");
    // ...but what its role allows works.
    auditor.keys.clone().list_keys(ListKeysRequest::default()).await.expect("auditor ListKeys");

    // A certificate from our CA whose identity is not in [clients].
    let now = OffsetDateTime::now_utc();
    let (scert, skey) = keyward::pki::issue_client(pki, "stranger", now - TimeDuration::days(1), now + TimeDuration::days(1))
        .expect("issue stranger");
    let tls = ClientTls { ca: pki.join("ca.crt"), cert: Some(scert), key: Some(skey), server_name: "localhost".into() };
    let stranger = Clients::new(client::connect(&srv.addr, &tls).await.expect("a valid certificate connects"));
    expect_code(stranger.admin.clone().ping(PingRequest::default()).await, Code::PermissionDenied, &[], "stranger -> Ping");
    expect_code(stranger.data.clone().encrypt(enc("data", b"x", b"y")).await, Code::PermissionDenied, &[], "stranger -> Encrypt");

    let hub = srv.clients("hub").await;
    expect_code(hub.data.clone().encrypt(enc("voucher.issuer", b"x", b"y")).await, Code::PermissionDenied, &[], "hub -> Encrypt(voucher.issuer)");
    expect_code(
        hub.keys.clone().get_key(GetKeyRequest { name: "voucher.issuer".into(), version: 0 }).await,
        Code::PermissionDenied,
        &[],
        "hub -> GetKey(voucher.issuer)",
    );
    expect_code(hub.admin.clone().reload_keys(ReloadKeysRequest {}).await, Code::PermissionDenied, &[], "hub -> ReloadKeys");
    hub.data.clone().encrypt(enc("data", b"x", b"y")).await.expect("hub -> Encrypt(data)");

    let bench = srv.clients("bench").await;
    expect_code(bench.keys.clone().list_keys(ListKeysRequest::default()).await, Code::PermissionDenied, &[], "bench -> ListKeys");
    let dir = srv.audit_dir.clone();
    srv.stop().await;

    // Every refusal was audited as denied.
    let denied = rpc_lines(&dir).into_iter().filter(|l| l["outcome"] == "denied").count();
    assert_eq!(denied, 7, "denied calls in the audit trail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_is_never_internal() {
    let srv = start("input").await;
    let max = srv.state.config.limits.max_message_bytes;
    let admin = srv.clients("admin").await;
    let hub = srv.clients("hub").await;
    let mut data = hub.data.clone();

    expect_code(data.encrypt(enc("data", b"pt", b"")).await, Code::InvalidArgument, &["aad"], "empty aad (encrypt)");
    let good = data.encrypt(enc("data", b"payload", b"aad")).await.expect("encrypt").into_inner();
    let ct = good.ciphertext.clone();
    expect_code(data.decrypt(dec("data", &ct, b"")).await, Code::InvalidArgument, &["aad"], "empty aad (decrypt)");

    // Just above the plaintext limit, below the message limit.
    let big = vec![0x5Au8; max - 4096 + 1];
    expect_code(data.encrypt(enc("data", &big, b"aad")).await, Code::InvalidArgument, &["plaintext"], "oversized plaintext");
    // At the limit it is accepted.
    let at_limit = vec![0x5Au8; max - 4096];
    data.encrypt(enc("data", &at_limit, b"aad")).await.expect("plaintext at the limit");

    expect_code(admin.data.clone().encrypt(enc("nosuch", b"x", b"y")).await, Code::NotFound, &["nosuch"], "unknown key");
    expect_code(
        admin.data.clone().decrypt(dec("nosuch", &ct, b"aad")).await,
        Code::NotFound,
        &["nosuch"],
        "unknown key (decrypt)",
    );
    for bad in ["Data", "data!", "../data", "da ta", ".data", &"d".repeat(65)] {
        expect_code(admin.data.clone().encrypt(enc(bad, b"x", b"y")).await, Code::InvalidArgument, &["key_name"], &format!("key name {bad:?}"));
    }
    expect_code(data.encrypt(enc("", b"x", b"y")).await, Code::InvalidArgument, &["key_name"], "empty key_name");
    expect_code(data.decrypt(dec("", &ct, b"aad")).await, Code::InvalidArgument, &["key_name"], "empty key_name (decrypt)");

    // Malformed ciphertexts.
    expect_code(data.decrypt(dec("data", &ct[..10], b"aad")).await, Code::InvalidArgument, &["ciphertext"], "too short");
    expect_code(data.decrypt(dec("data", &[], b"aad")).await, Code::InvalidArgument, &["ciphertext"], "empty ciphertext");
    expect_code(data.decrypt(dec("data", &ct[..17 + 15], b"aad")).await, Code::InvalidArgument, &["ciphertext"], "shorter than a tag");
    let mut wrong_format = ct.clone();
    wrong_format[0] = 2;
    expect_code(data.decrypt(dec("data", &wrong_format, b"aad")).await, Code::InvalidArgument, &["ciphertext"], "wrong format byte");
    let mut v0 = ct.clone();
    v0[1..5].copy_from_slice(&0u32.to_be_bytes());
    expect_code(data.decrypt(dec("data", &v0, b"aad")).await, Code::InvalidArgument, &["ciphertext"], "version 0");
    let mut v99 = ct.clone();
    v99[1..5].copy_from_slice(&99u32.to_be_bytes());
    expect_code(data.decrypt(dec("data", &v99, b"aad")).await, Code::NotFound, &["99"], "unknown key version");

    // Tampering anywhere: IV, body, tag.
    for (i, what) in [(5usize, "IV"), (17, "ciphertext body"), (ct.len() - 1, "tag")] {
        let mut t = ct.clone();
        t[i] ^= 0x01;
        let s = expect_code(data.decrypt(dec("data", &t, b"aad")).await, Code::InvalidArgument, &[], &format!("flipped bit in the {what}"));
        assert!(s.message().contains("ciphertext"), "{what}: {:?}", s.message());
    }
    expect_code(data.decrypt(dec("data", &ct, b"other aad")).await, Code::InvalidArgument, &["ciphertext"], "wrong aad");

    // KeyService / AdminService inputs.
    expect_code(admin.keys.clone().get_key(GetKeyRequest { name: String::new(), version: 0 }).await, Code::InvalidArgument, &["name"], "GetKey empty name");
    expect_code(admin.keys.clone().get_key(GetKeyRequest { name: "BAD".into(), version: 0 }).await, Code::InvalidArgument, &["name"], "GetKey bad name");
    expect_code(admin.keys.clone().get_key(GetKeyRequest { name: "data".into(), version: 99 }).await, Code::NotFound, &[], "GetKey v99");
    expect_code(admin.keys.clone().list_keys(ListKeysRequest { name_prefix: "x".repeat(65) }).await, Code::InvalidArgument, &["name_prefix"], "long prefix");
    expect_code(
        admin.admin.clone().ping(PingRequest { payload: vec![0; 64 * 1024 + 1] }).await,
        Code::InvalidArgument,
        &["payload"],
        "ping payload",
    );

    // The good ciphertext still decrypts (nothing above disturbed the appliance).
    let back = data.decrypt(dec("data", &ct, b"aad")).await.expect("decrypt").into_inner();
    assert_eq!(back.plaintext, b"payload");
    assert_eq!(back.key.map(|k| (k.name, k.version)), Some(("data".to_string(), 1)));
    let dir = srv.audit_dir.clone();
    srv.stop().await;

    // No call of this test was answered INTERNAL, as the trail records it.
    let lines = rpc_lines(&dir);
    assert!(lines.len() > 30);
    assert!(!lines.iter().any(|l| l["code"] == "INTERNAL"), "INTERNAL in the trail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let srv = start("health").await;
    let mut health = HealthClient::new(srv.channel("admin").await);
    for service in ["", "keyward.v1.DataService", "keyward.v1.KeyService", "keyward.v1.AdminService"] {
        let ok = eventually(5, || {
            let mut h = health.clone();
            async move {
                matches!(h.check(HealthCheckRequest { service: service.into() }).await,
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
            }
        })
        .await;
        assert!(ok, "health of {service:?} is not SERVING");
    }
    let s = err_of(health.check(HealthCheckRequest { service: "no.such.Service".into() }).await, "unknown service");
    assert_eq!(s.code(), Code::NotFound);
    // The hub's role allows health too; health probes need no key.
    let mut hub_health = HealthClient::new(srv.channel("hub").await);
    let r = hub_health.check(HealthCheckRequest { service: String::new() }).await.expect("hub health").into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    srv.stop().await;
}

/// gRPC reflection lists keyward's services (what grpcurl relies on), over mTLS and
/// through the authorisation layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let srv = start("reflection").await;
    let mut refl = ServerReflectionClient::new(srv.channel("admin").await);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection stream")
        .into_inner();
    let first = answers.message().await.expect("reflection answer").expect("one answer");
    let names: Vec<String> = match first.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer: {other:?}"),
    };
    for svc in ["keyward.v1.KeyService", "keyward.v1.DataService", "keyward.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == svc), "{svc} missing from {names:?}");
    }
    // A role without reflection (hub) is refused.
    let mut hub_refl = ServerReflectionClient::new(srv.channel("hub").await);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let denied = match hub_refl.server_reflection_info(tokio_stream::iter(vec![req])).await {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("hub may not use reflection"),
    };
    assert_eq!(denied.code(), Code::PermissionDenied);
    srv.stop().await;
}

/// Opens `n` TCP connections to `addr` that never start TLS, spread over `sources`
/// loopback addresses (127.0.0.2, 127.0.0.3, ...).
async fn idle_sockets(addr: &str, n: usize, sources: u8) -> Vec<tokio::net::TcpStream> {
    let target: std::net::SocketAddr = addr.parse().expect("server address");
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let src = std::net::SocketAddr::from(([127, 0, 0, 2 + (i % sources as usize) as u8], 0));
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(src).expect("bind a loopback source address");
        out.push(sock.connect(target).await.expect("TCP connect"));
    }
    out
}

/// A valid client's ping, on a new connection, within `deadline`.
async fn ping_within(addr: &str, deadline: std::time::Duration) -> Result<(), String> {
    let fx = fixture();
    let tls = ClientTls::dev(&fx.prepared.pki, "admin");
    let call = async {
        let ch = client::endpoint(addr, &tls).map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
        Clients::new(ch).admin.ping(PingRequest { payload: b"up".to_vec() }).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    tokio::time::timeout(deadline, call).await.map_err(|_| format!("no answer within {deadline:?}"))?
}

/// Whether the server closed a socket (EOF or reset) rather than keeping it open.
async fn closed_by_server(sock: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 16];
    matches!(tokio::time::timeout(std::time::Duration::from_millis(50), sock.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_without_tls_do_not_starve_a_valid_client() {
    use keyward::appliance::front::Refusal;
    // The test process holds 2,000 sockets of its own.
    keyward::appliance::front::raise_fd_limit().expect("raise the test's open-files limit");
    let srv = start_with("idle", |c| c.limits.handshake_timeout = std::time::Duration::from_secs(2)).await;
    let front = std::sync::Arc::clone(&srv.state.front);
    let limits = srv.state.config.limits.clone();

    // 1,000 idle sockets from one address: the per-source cap holds.
    let mut one = idle_sockets(&srv.addr, 1000, 1).await;
    assert!(eventually(10, || async { front.counters.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1000 }).await);
    ping_within(&srv.addr, std::time::Duration::from_secs(2)).await.expect("a valid client behind 1,000 idle sockets");
    assert!(front.pending() <= limits.max_pending_handshakes_per_source, "pending {}", front.pending());
    assert!(front.counters.refused(Refusal::EvictedPerSource) >= (1000 - limits.max_pending_handshakes_per_source) as u64);

    // 1,000 more from 40 addresses (25 each, under the per-source cap): the global cap holds.
    let mut many = idle_sockets(&srv.addr, 1000, 40).await;
    assert!(eventually(10, || async { front.counters.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2001 }).await);
    ping_within(&srv.addr, std::time::Duration::from_secs(2)).await.expect("a valid client behind 2,000 idle sockets");
    assert!(front.pending() <= limits.max_pending_handshakes, "pending {}", front.pending());
    assert!(front.counters.refused(Refusal::EvictedAtCap) >= (1000 - limits.max_pending_handshakes) as u64);

    // The handshake timeout closes whatever was left, and says so.
    assert!(eventually(10, || async { front.pending() == 0 }).await, "{} handshakes still pending", front.pending());
    assert!(front.counters.refused(Refusal::HandshakeTimeout) > 0);
    let mut open = 0;
    for s in one.iter_mut().chain(many.iter_mut()) {
        if !closed_by_server(s).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "idle sockets the server kept open");
    ping_within(&srv.addr, std::time::Duration::from_secs(2)).await.expect("still serving");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_at_the_tls_layer_are_counted_by_reason() {
    use keyward::appliance::front::Refusal;
    use tokio::io::AsyncWriteExt;
    let fx = fixture();
    let pki = &fx.prepared.pki;
    let srv = start("tls-refusals").await;
    let c = &srv.state.front.counters;

    let mut plain = tokio::net::TcpStream::connect(&srv.addr).await.expect("connect");
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let none = ClientTls { ca: pki.join("ca.crt"), cert: None, key: None, server_name: "localhost".into() };
    assert_refused(&srv.addr, &none, "no client certificate").await;
    let (fcert, fkey) = keyward::pki::write_foreign_client(pki, "mallory").expect("foreign client");
    let foreign = ClientTls { ca: pki.join("ca.crt"), cert: Some(fcert), key: Some(fkey), server_name: "localhost".into() };
    assert_refused(&srv.addr, &foreign, "foreign CA").await;

    for reason in [Refusal::Protocol, Refusal::NoCertificate, Refusal::BadCertificate] {
        assert!(eventually(5, || async { c.refused(reason) >= 1 }).await, "{} not counted", reason.name());
    }
    assert_eq!(c.refused(Refusal::Revoked), 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_only_refuses_a_tls12_client() {
    let fx = fixture();
    let srv = start_with("tls13", |c| c.server.tls13_only = true).await;
    ping_within(&srv.addr, std::time::Duration::from_secs(5)).await.expect("a TLS 1.3 client");
    // openssl s_client speaks TLS 1.2 only when told to; the server must refuse it.
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect", &srv.addr, "-CAfile"])
        .arg(fx.prepared.pki.join("ca.crt"))
        .arg("-cert")
        .arg(fx.prepared.pki.join("clients/admin.crt"))
        .arg("-key")
        .arg(fx.prepared.pki.join("clients/admin.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "TLS 1.2 handshake succeeded:\n{text}");
    assert!(
        srv.state.front.counters.refused(keyward::appliance::front::Refusal::Protocol) >= 1,
        "the refused TLS 1.2 handshake is counted"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_request_is_invalid_argument_and_audited() {
    use keyward::proto::EncryptResponse;
    /// Field 1 of EncryptRequest (key_name, a string) sent as a varint: not decodable.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Bogus {
        #[prost(uint64, tag = "1")]
        key_name: u64,
    }
    let srv = start("undecodable").await;
    let ch = srv.channel("hub").await;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/keyward.v1.DataService/Encrypt");
    let r = grpc
        .unary(tonic::Request::new(Bogus { key_name: 7 }), path, tonic_prost::ProstCodec::<Bogus, EncryptResponse>::default())
        .await;
    let s = expect_code(r, Code::InvalidArgument, &["not a valid Encrypt request"], "undecodable Encrypt");
    assert!(!s.message().contains("Protobuf"), "{s:?}");
    let dir = srv.audit_dir.clone();
    srv.stop().await;
    let lines = rpc_lines(&dir);
    let line = lines.iter().find(|l| l["action"] == "keyward.v1.DataService/Encrypt").expect("the call's audit line");
    assert_eq!(line["code"], "INVALID_ARGUMENT", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_puts_a_crl_in_force_on_open_connections_and_refuses_a_bad_config() {
    use keyward::appliance::front::Refusal;
    let fx = fixture();
    let pki = &fx.prepared.pki;
    let now = OffsetDateTime::now_utc();
    let (cert, key) =
        keyward::pki::issue_client(pki, "revokee", now - TimeDuration::days(1), now + TimeDuration::days(30)).expect("issue");
    // Start with a CRL that revokes nothing.
    let crl = keyward::pki::write_dev_crl(pki, &[]).expect("empty CRL");
    let crl_line = format!("client_crl = {:?}", crl.display().to_string());
    let client_line = "\"spiffe://keyward/client/revokee\" = \"hub\"";
    let edit = |t: String| in_section(&in_section(&t, "server", &crl_line), "clients", client_line);
    let path = config_file("crl", edit);
    let srv = start_from_file("crl", &path).await;
    let tls = ClientTls { ca: pki.join("ca.crt"), cert: Some(cert.clone()), key: Some(key), server_name: "localhost".into() };
    let revokee = Clients::new(client::connect(&srv.addr, &tls).await.expect("connect as revokee"));
    revokee.admin.clone().ping(PingRequest::default()).await.expect("revokee before revocation");
    let admin = srv.clients("admin").await;

    // A config that does not validate is refused; the policy in force stays.
    std::fs::write(&path, "[server\nbroken").expect("write a broken config");
    let s = expect_code(admin.admin.clone().reload_keys(ReloadKeysRequest {}).await, Code::FailedPrecondition, &["not reloaded"], "bad config");
    assert!(!s.message().contains("broken"), "the message quotes the file: {s:?}");
    revokee.admin.clone().ping(PingRequest::default()).await.expect("revokee after a refused reload");

    // Revoke, reload: the open connection is refused at its next call, a new one at the handshake.
    keyward::pki::write_dev_crl(pki, &[cert]).expect("CRL revoking revokee");
    config_file("crl", edit);
    let r = admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("reload").into_inner();
    assert_eq!(r.revoked_certificates, 1, "{r:?}");
    assert!(r.keys_loaded > 0 && r.clients_loaded > 1 && r.roles_loaded > 1, "{r:?}");
    expect_code(revokee.admin.clone().ping(PingRequest::default()).await, Code::Unauthenticated, &["revoked"], "revoked, open connection");
    assert_refused(&srv.addr, &tls, "revoked certificate, new connection").await;
    assert!(eventually(5, || async { srv.state.front.counters.refused(Refusal::Revoked) >= 1 }).await, "revocation not counted");
    admin.admin.clone().ping(PingRequest::default()).await.expect("other clients unaffected");

    // A CRL not signed by the client CA is refused at reload.
    let foreign_dir = pki.join(keyward::pki::FOREIGN_DIR);
    keyward::pki::write_foreign_client(pki, "mallory").expect("foreign CA");
    let foreign_crl = keyward::pki::write_dev_crl(&foreign_dir, &[]).expect("foreign CRL");
    config_file("crl", |t| in_section(&t, "server", &format!("client_crl = {:?}", foreign_crl.display().to_string())));
    expect_code(admin.admin.clone().reload_keys(ReloadKeysRequest {}).await, Code::FailedPrecondition, &["not signed by the client CA"], "foreign CRL");
    expect_code(revokee.admin.clone().ping(PingRequest::default()).await, Code::Unauthenticated, &["revoked"], "still revoked");
    srv.stop().await;
}

/// `eval "$(softhsm-setup/setup.sh DIR)"` must be enough to serve the example config:
/// every `${VAR}` it uses without a default is exported.
#[test]
fn setup_script_exports_every_variable_the_example_config_needs() {
    let fx = fixture();
    let full = std::fs::read_to_string("pkcs11-config/appliance.toml").expect("example config");
    let text: String = full.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    let mut needed = Vec::new();
    for (i, _) in text.match_indices("${") {
        let expr = &text[i + 2..i + 2 + text[i + 2..].find('}').expect("closed ${")];
        if !expr.contains(":-") && !needed.contains(&expr) {
            needed.push(expr);
        }
    }
    assert!(needed.contains(&"KEYWARD_STATE"), "{needed:?}");
    for var in needed {
        assert!(fx.prepared.exports.contains_key(var), "setup.sh does not export {var}: {:?}", fx.prepared.exports.keys());
    }
}
