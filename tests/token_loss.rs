//! The token disappearing under a running appliance (its own test binary: bringing the
//! token back re-initialises the PKCS#11 module for the whole process). While it is
//! gone, calls get UNAVAILABLE and health says NOT_SERVING; nothing crashes or hangs;
//! once it is back the appliance attaches again by itself and serves.
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::*;
use keyward::proto::{DecryptRequest, EncryptRequest, GetStatusRequest};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_unavailable_until_it_is_back() {
    let srv = start("token-loss").await;
    let hub = srv.clients("hub").await;
    let health = HealthClient::new(srv.channel("admin").await);
    let aad = b"token-loss".to_vec();
    let enc = |p: &[u8]| EncryptRequest { key_name: "data".into(), plaintext: p.to_vec(), aad: aad.clone() };
    let before = hub.data.clone().encrypt(enc(b"before")).await.expect("encrypt before").into_inner();

    // Take the token away: its files leave the token directory, and the sessions go.
    let tokens = fixture().prepared.dir.join("tokens");
    let away = fixture().prepared.dir.join("tokens-away");
    std::fs::rename(&tokens, &away).expect("move the token away");
    std::fs::create_dir(&tokens).expect("empty token directory");
    srv.hsm.close_all_sessions_for_test();

    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_secs(10), hub.data.clone().encrypt(enc(b"during"))).await;
        let status = r.expect("no hang while the token is gone").expect_err("no token, no encryption");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(!status.message().to_lowercase().contains("during"), "{status:?}");
    }
    let not_serving = eventually(5, || {
        let mut h = health.clone();
        async move {
            matches!(h.check(HealthCheckRequest { service: String::new() }).await,
                Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    assert!(not_serving, "health must report NOT_SERVING while the token is gone");
    assert!(!srv.hsm.is_live());

    // Bring it back: the appliance re-attaches by itself.
    std::fs::remove_dir(&tokens).expect("remove the empty directory");
    std::fs::rename(&away, &tokens).expect("bring the token back");
    let serving = eventually(15, || {
        let mut h = health.clone();
        async move {
            matches!(h.check(HealthCheckRequest { service: String::new() }).await,
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving, "health must report SERVING once the token is back");
    let after = hub.data.clone().encrypt(enc(b"after")).await.expect("encrypt once the token is back").into_inner();
    assert_eq!(after.key.map(|k| k.name), Some("data".to_string()));
    let old = hub
        .data
        .clone()
        .decrypt(DecryptRequest { key_name: "data".into(), ciphertext: before.ciphertext, aad: aad.clone() })
        .await
        .expect("data from before the loss decrypts")
        .into_inner();
    assert_eq!(old.plaintext, b"before");

    // A different token under the same label and PIN (a re-initialised or substituted
    // token): its serial differs from the one first attached, so it is refused with an
    // alarm, calls get UNAVAILABLE and health says NOT_SERVING, without any call
    // needed to notice the loss (the appliance probes the token).
    let admin = srv.clients("admin").await;
    let first = admin.admin.clone().get_status(GetStatusRequest {}).await.expect("status").into_inner();
    assert!(!first.token_serial.is_empty() && first.token_refused.is_empty(), "{first:?}");
    std::fs::rename(&tokens, &away).expect("move the token away again");
    std::fs::create_dir(&tokens).expect("empty token directory");
    let user_pin = std::fs::read_to_string(fixture().prepared.dir.join("user.pin")).expect("user PIN file");
    let init = std::process::Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", srv.hsm.token_label(), "--so-pin", "impostor-so-pin", "--pin"])
        .arg(user_pin.trim())
        .output()
        .expect("softhsm2-util");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    srv.hsm.close_all_sessions_for_test();
    let not_serving = eventually(15, || {
        let mut h = health.clone();
        async move {
            matches!(h.check(HealthCheckRequest { service: String::new() }).await,
                Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    assert!(not_serving, "health must report NOT_SERVING with another token attached, before any call");
    let status = hub.data.clone().encrypt(enc(b"impostor")).await.expect_err("no calls on another token");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!srv.hsm.is_live());
    let refused = srv.hsm.identity().refused.unwrap_or_default();
    assert!(refused.contains("serial number") && refused.contains(&first.token_serial), "{refused}");

    // The real token back: attached again, the same serial.
    std::fs::remove_dir_all(&tokens).expect("remove the impostor");
    std::fs::rename(&away, &tokens).expect("bring the token back");
    let serving = eventually(15, || {
        let mut h = health.clone();
        async move {
            matches!(h.check(HealthCheckRequest { service: String::new() }).await,
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving, "health must report SERVING once the right token is back");
    let again = admin.admin.clone().get_status(GetStatusRequest {}).await.expect("status").into_inner();
    assert_eq!((again.token_serial.as_str(), again.token_refused.as_str()), (first.token_serial.as_str(), ""));
    hub.data.clone().encrypt(enc(b"after")).await.expect("encrypt on the right token");
    srv.stop().await;
}
