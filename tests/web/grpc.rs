//! The same over gRPC: `tonic_users` as a real process, a tonic client
//! carrying (or not) the token in the `x-consistency-token` metadata key.

mod pb {
    #![allow(clippy::all, clippy::pedantic, dead_code, unreachable_pub)]
    include!("../../examples/generated/users.v1.rs");
}

use std::time::Duration;

use pb::users_client::UsersClient;
use pb::{CreateUserRequest, GetUserRequest, UpdateUserRequest};
use tonic::Code;
use tonic::transport::Channel;
use tower_scale::testing::LocalCluster;

use crate::{KEY, common};

fn tonic_users(local: &LocalCluster) -> common::Running {
    crate::start_users("tonic_users", local, KEY, &[])
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("x-consistency-token", t.parse().unwrap());
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_travel_in_grpc_metadata() {
    let local = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_secs(1))
        .start()
        .unwrap();
    let app = tokio::task::block_in_place(|| tonic_users(&local));
    local
        .wait_for_replicas(Duration::from_secs(30))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UsersClient::new(channel);

    let mut token: Option<String> = None;
    let mut id = 0;
    for i in 0..100 {
        let want = format!("grpc-{i}");
        let res = if i % 2 == 0 {
            client
                .create_user(with_token(
                    CreateUserRequest { name: want.clone() },
                    token.as_deref(),
                ))
                .await
                .unwrap()
        } else {
            client
                .update_user(with_token(
                    UpdateUserRequest {
                        id,
                        name: want.clone(),
                    },
                    token.as_deref(),
                ))
                .await
                .unwrap()
        };
        assert_eq!(res.metadata().get("x-served-by").unwrap(), "primary");
        token = Some(
            res.metadata()
                .get("x-consistency-token")
                .expect("a token after a write")
                .to_str()
                .unwrap()
                .to_string(),
        );
        id = res.get_ref().id;
        let got = client
            .get_user(with_token(GetUserRequest { id }, token.as_deref()))
            .await
            .unwrap();
        assert_eq!(
            got.get_ref().name,
            want,
            "pair {i}: the token's read saw the write"
        );
        assert!(got.metadata().get("x-served-by").is_some());
    }
    // Without the token, the lagging replica answers: at least one miss.
    let mut stale = 0;
    for i in 0..20 {
        let created = client
            .create_user(CreateUserRequest {
                name: format!("nt-{i}"),
            })
            .await
            .unwrap();
        match client
            .get_user(GetUserRequest {
                id: created.get_ref().id,
            })
            .await
        {
            Err(s) if s.code() == Code::NotFound => stale += 1,
            Ok(_) => {}
            Err(s) => panic!("{s}"),
        }
    }
    assert!(
        stale >= 1,
        "without the token no read was stale: the test could not fail"
    );
    // Statuses, and bad tokens ignored.
    let missing = client
        .get_user(GetUserRequest { id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let empty = client
        .create_user(CreateUserRequest { name: " ".into() })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    for bad in [
        "garbage",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = client
            .get_user(with_token(GetUserRequest { id }, Some(bad)))
            .await;
        assert!(r.is_ok() || r.unwrap_err().code() == Code::NotFound);
    }
    let huge = "A".repeat(4000);
    let r = client
        .get_user(with_token(GetUserRequest { id }, Some(&huge)))
        .await;
    assert!(r.is_ok() || r.unwrap_err().code() == Code::NotFound);
}
