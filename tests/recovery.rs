//! Token session loss (its own test binary: closing every session logs the whole
//! process out of SoftHSM). The appliance must log in again, re-copy its keys and keep
//! serving, and data encrypted before the loss must decrypt after it.

// TOKEN_WRITE (a std Mutex) is held across awaits on purpose: it serialises token
// writes between tests, each on its own runtime, so no runtime can deadlock on it.
#![allow(clippy::await_holding_lock)]

mod common;

use common::*;
use keyward::proto::{DecryptRequest, EncryptRequest, ListKeysRequest, PingRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliance_recovers_after_all_sessions_are_closed() {
    let srv = start("recovery").await;
    let hub = srv.clients("hub").await;
    let admin = srv.clients("admin").await;
    let aad = b"recovery".to_vec();

    let before = hub
        .data
        .clone()
        .encrypt(EncryptRequest { key_name: "data".into(), plaintext: b"before the loss".to_vec(), aad: aad.clone() })
        .await
        .expect("encrypt before")
        .into_inner();
    let gen0 = srv.hsm.generation();
    assert!(srv.hsm.is_live());

    srv.hsm.close_all_sessions_for_test();

    // Every kind of call works again, on the same connections.
    let after = hub
        .data
        .clone()
        .encrypt(EncryptRequest { key_name: "data".into(), plaintext: b"after the loss".to_vec(), aad: aad.clone() })
        .await
        .expect("encrypt after the session loss")
        .into_inner();
    assert_eq!(after.key.as_ref().map(|k| k.version), Some(1));
    let gen1 = srv.hsm.generation();
    assert!(gen1 > gen0, "no recovery happened (generation {gen0} -> {gen1})");
    assert!(srv.hsm.is_live());

    let old = hub
        .data
        .clone()
        .decrypt(DecryptRequest { key_name: "data".into(), ciphertext: before.ciphertext.clone(), aad: aad.clone() })
        .await
        .expect("decrypt data encrypted before the loss")
        .into_inner();
    assert_eq!(old.plaintext, b"before the loss");
    let new = hub
        .data
        .clone()
        .decrypt(DecryptRequest { key_name: "data".into(), ciphertext: after.ciphertext.clone(), aad: aad.clone() })
        .await
        .expect("decrypt data encrypted after the loss")
        .into_inner();
    assert_eq!(new.plaintext, b"after the loss");
    let list = admin.keys.clone().list_keys(ListKeysRequest::default()).await.expect("ListKeys after the loss").into_inner();
    assert_eq!(list.keys.len(), fixture().init_keys.len(), "catalogue after recovery");
    admin.admin.clone().ping(PingRequest { payload: b"p".to_vec() }).await.expect("Ping");

    // A second loss is recovered as well.
    srv.hsm.close_all_sessions_for_test();
    hub.data
        .clone()
        .decrypt(DecryptRequest { key_name: "data".into(), ciphertext: before.ciphertext.clone(), aad: aad.clone() })
        .await
        .expect("decrypt after a second loss");
    assert!(srv.hsm.generation() > gen1, "second recovery");

    // The session key copies were made again: the keys in use are not the token originals
    // and are still sensitive.
    let cat = srv.hsm.catalogue();
    let e = cat.get("data", 1).expect("data/v1");
    let flags = srv.hsm.key_flags(e).expect("flags after recovery");
    assert!(flags.sensitive && !flags.extractable);

    let hsm = srv.hsm.clone();
    let audit_dir = srv.audit_dir.clone();
    srv.stop().await;
    // Every call had its audit line and the chain survived the recoveries.
    let report = verify_trail(&audit_dir, &hsm);
    assert!(report.lines > 0);
    assert_eq!(rpc_lines(&audit_dir).len(), 7);
    assert!(rpc_lines(&audit_dir).iter().all(|l| l["code"] == "OK"));
}
