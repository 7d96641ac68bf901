//! Reload on SIGHUP (its own test binary: the signal goes to the whole process). A key
//! the ceremony adds while the appliance runs is served after SIGHUP, and a client
//! removed from the config file is refused, on the connection it already has too.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use keyward::hsm::{Algorithm, KeyClass};
use keyward::proto::{DecryptRequest, EncryptRequest, GetKeyRequest, PingRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_catalogue() {
    let path = config_file("sighup", |t| t);
    let srv = start_from_file("sighup", &path).await;
    let admin = srv.clients("admin").await;
    let hub = srv.clients("hub").await;
    hub.admin.clone().ping(PingRequest::default()).await.expect("hub before the reload");
    let name = "data.hup";

    let missing = err_of(admin.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 0 }).await, "before");
    assert_eq!(missing.code(), Code::NotFound);

    {
        let _g = token_write();
        let c = ceremony();
        let m = c.generate(name, KeyClass::D0, Algorithm::Aes256).expect("generate data.hup");
        assert_eq!(m.version, 1);
        c.close().expect("close the ceremony");
    }
    // The running appliance does not see it until told to reload.
    let still = err_of(admin.keys.clone().get_key(GetKeyRequest { name: name.into(), version: 0 }).await, "before SIGHUP");
    assert_eq!(still.code(), Code::NotFound);

    // The hub is taken out of the config file.
    let hub_line = "\"spiffe://keyward/client/hub\" = \"hub\"\n";
    config_file("sighup", |t| {
        assert!(t.contains(hub_line));
        t.replace(hub_line, "")
    });
    hub.admin.clone().ping(PingRequest::default()).await.expect("hub until the reload");

    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());

    let seen = eventually(10, || {
        let mut k = admin.keys.clone();
        async move { k.get_key(GetKeyRequest { name: name.into(), version: 0 }).await.is_ok() }
    })
    .await;
    assert!(seen, "data.hup not served after SIGHUP");
    expect_code(hub.admin.clone().ping(PingRequest::default()).await, Code::PermissionDenied, &["not authorised"], "removed client");

    let aad = b"sighup".to_vec();
    let enc = admin
        .data
        .clone()
        .encrypt(EncryptRequest { key_name: name.into(), plaintext: b"reloaded".to_vec(), aad: aad.clone() })
        .await
        .expect("encrypt under the reloaded key")
        .into_inner();
    let dec = admin
        .data
        .clone()
        .decrypt(DecryptRequest { key_name: name.into(), ciphertext: enc.ciphertext, aad })
        .await
        .expect("decrypt")
        .into_inner();
    assert_eq!(dec.plaintext, b"reloaded");
    // The reload kept the other keys' session copies working.
    let data = admin
        .data
        .clone()
        .encrypt(EncryptRequest { key_name: "data".into(), plaintext: b"x".to_vec(), aad: b"y".to_vec() })
        .await
        .expect("encrypt under data after the reload")
        .into_inner();
    assert_eq!(data.key.map(|k| k.name), Some("data".to_string()));
    srv.stop().await;
}
