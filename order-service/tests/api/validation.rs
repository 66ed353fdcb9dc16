use order_service::proto::{CreateOrderRequest, OrderItem};
use tonic::{Code, Request};

use crate::helpers::{item, spawn_app};

fn request(user_id: &str, items: Vec<OrderItem>) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user_id.to_owned(),
        items,
    }
}

#[tokio::test]
async fn invalid_orders_are_rejected_naming_the_field() {
    let app = spawn_app().await;
    let ok = || item("apple", 1, 1.0);
    let cases: Vec<(&str, CreateOrderRequest, &str)> = vec![
        ("empty user", request("", vec![ok()]), "user_id"),
        ("blank user", request("   ", vec![ok()]), "user_id"),
        ("huge user", request(&"u".repeat(100_000), vec![ok()]), "user_id"),
        ("no items", request("alice", vec![]), "items"),
        ("too many items", request("alice", vec![ok(); 101]), "items"),
        (
            "empty product",
            request("alice", vec![ok(), item("", 1, 1.0)]),
            "items[1].product_id",
        ),
        (
            "huge product",
            request("alice", vec![item(&"p".repeat(10_000), 1, 1.0)]),
            "items[0].product_id",
        ),
        (
            "zero quantity",
            request("alice", vec![item("apple", 0, 1.0)]),
            "items[0].quantity",
        ),
        (
            "negative quantity",
            request("alice", vec![item("apple", -3, 1.0)]),
            "items[0].quantity",
        ),
        (
            "huge quantity",
            request("alice", vec![item("apple", i32::MAX, 1.0)]),
            "items[0].quantity",
        ),
        (
            "NaN price",
            request("alice", vec![ok(), ok(), item("apple", 1, f64::NAN)]),
            "items[2].price",
        ),
        (
            "infinite price",
            request("alice", vec![item("apple", 1, f64::INFINITY)]),
            "items[0].price",
        ),
        (
            "negative price",
            request("alice", vec![item("apple", 1, -0.01)]),
            "items[0].price",
        ),
        (
            "huge price",
            request("alice", vec![item("apple", 1, 1e300)]),
            "items[0].price",
        ),
    ];
    for (case, body, field) in cases {
        let status = app.send_create(Request::new(body)).await.expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{case}: expected the message to name `{field}`, got `{}`",
            status.message()
        );
        assert!(status.message().len() < 300, "{case}: the message echoes too much");
    }
}

#[tokio::test]
async fn a_bad_idempotency_key_is_rejected() {
    let app = spawn_app().await;
    let status = app
        .place_order_with_key("alice", &"k".repeat(500), vec![item("apple", 1, 1.0)])
        .await
        .expect_err("too long");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("idempotency-key:"), "{}", status.message());
}

#[tokio::test]
async fn a_rejected_request_stores_nothing() {
    let app = spawn_app().await;
    let rejected = app
        .place_order_with_key("alice", "k-1", vec![item("apple", 1, f64::NAN)])
        .await
        .expect_err("invalid");
    assert_eq!(rejected.code(), Code::InvalidArgument);
    // Had anything been stored under the key, a different valid order with it would be refused.
    let placed = app
        .place_order_with_key("alice", "k-1", vec![item("apple", 1, 1.0)])
        .await
        .expect("the key is still unused");
    assert_eq!(placed.total_price, 1.0);
}

/// `CreateOrderRequest` and `GetOrderRequest` as they are on the wire
/// (protobuf strings are length-delimited bytes), so a test can send
/// strings that are not UTF-8.
mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CreateOrder {
        #[prost(bytes = "vec", tag = "1")]
        pub user_id: Vec<u8>,
        #[prost(message, repeated, tag = "2")]
        pub items: Vec<Item>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Item {
        #[prost(bytes = "vec", tag = "1")]
        pub product_id: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub quantity: i32,
        #[prost(double, tag = "3")]
        pub price: f64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetOrder {
        #[prost(bytes = "vec", tag = "1")]
        pub order_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub user_id: Vec<u8>,
    }
}

/// Sends `request` to `method` of `order.OrderService`.
async fn call_raw<T, U>(app: &crate::helpers::TestApp, method: &'static str, request: T) -> Result<U, tonic::Status>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.expect("the channel is ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(Request::new(request), path, tonic_prost::ProstCodec::default())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_string_that_is_not_utf8_is_rejected_naming_the_field() {
    let app = spawn_app().await;
    let not_utf8 = vec![b'a', 0xff, 0xfe];
    let item = |product_id: &[u8]| wire::Item {
        product_id: product_id.to_vec(),
        quantity: 1,
        price: 1.0,
    };
    let create = "/order.OrderService/CreateOrder";
    let cases = [
        (
            "user id",
            wire::CreateOrder {
                user_id: not_utf8.clone(),
                items: vec![item(b"apple")],
            },
            "user_id",
        ),
        (
            "product id",
            wire::CreateOrder {
                user_id: b"alice".to_vec(),
                items: vec![item(b"apple"), item(&not_utf8)],
            },
            "product_id",
        ),
    ];
    for (case, request, field) in cases {
        let status = call_raw::<_, order_service::proto::CreateOrderResponse>(&app, create, request)
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(
            status.message().contains(field),
            "{case}: expected the message to name `{field}`, got `{}`",
            status.message()
        );
    }
    let status = call_raw::<_, order_service::proto::GetOrderResponse>(
        &app,
        "/order.OrderService/GetOrder",
        wire::GetOrder {
            order_id: not_utf8.clone(),
            user_id: b"alice".to_vec(),
        },
    )
    .await
    .expect_err("a read");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("order_id"), "{}", status.message());

    // The same bytes as UTF-8 go through: the codec refused only the encoding.
    let placed: order_service::proto::CreateOrderResponse = call_raw(
        &app,
        create,
        wire::CreateOrder {
            user_id: b"alice".to_vec(),
            items: vec![item(b"apple")],
        },
    )
    .await
    .expect("a valid order in the same wire form");
    assert!(placed.order.is_some_and(|order| order.user_id == "alice"));
}
