//! Unary gRPC caching in front of a real tonic server, called by a real
//! tonic client over loopback HTTP/2. The messages are prost types written
//! by hand (no code generation needed for the test).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower::Service;
use tower_scale::grpc::GrpcCacheLayer;

mod service;
mod store;

#[derive(Clone, PartialEq, prost::Message)]
struct GetUserRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct User {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(string, tag = "2")]
    name: String,
}

const GET: &str = "/users.v1.Users/GetUser";
const CREATE: &str = "/users.v1.Users/CreateUser";

/// A tonic server with two unary methods, counting its calls.
#[derive(Clone, Default)]
struct Users {
    calls: Arc<AtomicUsize>,
}

impl tonic::server::NamedService for Users {
    const NAME: &'static str = "users.v1.Users";
}

impl Service<http::Request<tonic::body::Body>> for Users {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let calls = self.calls.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let handler = tower::service_fn(move |r: Request<GetUserRequest>| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                let path = path.clone();
                async move {
                    let id = r.get_ref().id;
                    if id == 404 {
                        return Err(Status::not_found("no such user"));
                    }
                    let tenant = r
                        .metadata()
                        .get("x-tenant")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    let name = format!("{path} {id} for {tenant} #{n}");
                    Ok(Response::new(User { id, name }))
                }
            });
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<User, GetUserRequest>::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

struct Setup {
    users: Users,
    layer: GrpcCacheLayer,
    channel: Channel,
}

async fn setup(
    configure: impl FnOnce(
        tower_scale::grpc::GrpcCacheLayerBuilder,
    ) -> tower_scale::grpc::GrpcCacheLayerBuilder,
) -> Setup {
    let users = Users::default();
    let layer = configure(GrpcCacheLayer::builder().method(GET, Duration::from_secs(60)))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(layer.clone())
        .add_service(users.clone())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Setup {
        users,
        layer,
        channel,
    }
}

impl Setup {
    async fn call(
        &self,
        path: &'static str,
        id: i64,
        metadata: &[(&'static str, &str)],
    ) -> Result<User, Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.unwrap();
        let mut req = Request::new(GetUserRequest { id });
        for (k, v) in metadata {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        grpc.unary(
            req,
            PathAndQuery::from_static(path),
            ProstCodec::<GetUserRequest, User>::default(),
        )
        .await
        .map(Response::into_inner)
    }

    fn calls(&self) -> usize {
        self.users.calls.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn unary_calls_are_cached_by_path_and_message() {
    let s = setup(|b| b).await;
    let a = s.call(GET, 1, &[]).await.unwrap();
    let b = s.call(GET, 1, &[]).await.unwrap();
    assert_eq!(
        a, b,
        "the hit returns the stored message (and its OK trailers)"
    );
    assert_eq!(s.calls(), 1);
    let c = s.call(GET, 2, &[]).await.unwrap();
    assert_eq!(c.id, 2);
    assert_eq!(s.calls(), 2, "another message is another key");
    assert_eq!(s.layer.stats().hits, 1);
}

#[tokio::test]
async fn errors_are_not_stored_even_though_they_travel_as_http_200() {
    let s = setup(|b| b).await;
    for _ in 0..2 {
        let err = s.call(GET, 404, &[]).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    assert_eq!(s.calls(), 2);
}

#[tokio::test]
async fn methods_not_opted_in_pass_through() {
    let s = setup(|b| b).await;
    s.call(CREATE, 1, &[]).await.unwrap();
    s.call(CREATE, 1, &[]).await.unwrap();
    assert_eq!(s.calls(), 2);
}

#[tokio::test]
async fn authorization_bypasses_unless_it_is_in_the_key() {
    let s = setup(|b| b).await;
    s.call(GET, 1, &[("authorization", "Bearer alice")])
        .await
        .unwrap();
    s.call(GET, 1, &[("authorization", "Bearer alice")])
        .await
        .unwrap();
    assert_eq!(s.calls(), 2, "credentialed calls bypass the cache");

    let s = setup(|b| b.key_metadata("authorization")).await;
    let alice = s
        .call(GET, 1, &[("authorization", "Bearer alice")])
        .await
        .unwrap();
    let alice2 = s
        .call(GET, 1, &[("authorization", "Bearer alice")])
        .await
        .unwrap();
    let bob = s
        .call(GET, 1, &[("authorization", "Bearer bob")])
        .await
        .unwrap();
    assert_eq!(alice, alice2);
    assert_ne!(alice, bob, "bob never gets alice's entry");
    assert_eq!(s.calls(), 2);
}

#[tokio::test]
async fn chosen_metadata_is_part_of_the_key() {
    let s = setup(|b| b.key_metadata("x-tenant")).await;
    let a = s.call(GET, 1, &[("x-tenant", "a")]).await.unwrap();
    let b = s.call(GET, 1, &[("x-tenant", "b")]).await.unwrap();
    assert!(a.name.contains("for a") && b.name.contains("for b"));
    assert_eq!(s.call(GET, 1, &[("x-tenant", "a")]).await.unwrap(), a);
    assert_eq!(s.calls(), 2);
}

#[test]
fn bad_configuration_is_refused() {
    assert!(
        GrpcCacheLayer::builder()
            .method("GetUser", Duration::from_secs(1))
            .build()
            .is_err()
    );
    assert!(
        GrpcCacheLayer::builder()
            .method(GET, Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(
        GrpcCacheLayer::builder()
            .key_metadata("bad header")
            .build()
            .is_err()
    );
}
