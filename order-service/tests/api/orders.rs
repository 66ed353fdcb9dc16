use order_service::proto::OrderStatus;
use tonic::Code;
use uuid::Uuid;

use crate::helpers::{item, spawn_app};

#[tokio::test]
async fn placing_an_order_stores_it_pending_then_confirms_it() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("apple", 2, 10.25), item("banana", 1, 0.5)])
        .await
        .expect("the order is placed");
    assert!(Uuid::parse_str(&placed.id).is_ok(), "id {} is a UUID", placed.id);
    assert_eq!(placed.user_id, "alice");
    assert_eq!(placed.status(), OrderStatus::Pending);
    assert_eq!(placed.total_price, 21.0);
    assert_eq!(placed.items.len(), 2);

    let decided = app.wait_until_decided(&placed.id, "alice").await;
    assert_eq!(decided.status(), OrderStatus::Confirmed);
    assert_eq!(decided.items, placed.items);
    assert_eq!(decided.total_price, 21.0);
}

#[tokio::test]
async fn totals_are_exact_decimal_sums() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("apple", 1, 0.1), item("banana", 1, 0.2)])
        .await
        .expect("the order is placed");
    assert_eq!(placed.total_price, 0.3, "not 0.30000000000000004");
}

#[tokio::test]
async fn an_order_for_an_unknown_product_is_cancelled() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("apple", 1, 1.0), item("unobtainium", 1, 99.0)])
        .await
        .expect("the order is placed");
    let decided = app.wait_until_decided(&placed.id, "alice").await;
    assert_eq!(decided.status(), OrderStatus::Cancelled);
}

#[tokio::test]
async fn an_order_for_more_than_is_in_stock_is_cancelled_and_releases_nothing_it_did_not_take() {
    let app = spawn_app().await;
    let too_many = app
        .place_order("alice", vec![item("laptop", 6, 999.0)])
        .await
        .expect("the order is placed");
    assert_eq!(
        app.wait_until_decided(&too_many.id, "alice").await.status(),
        OrderStatus::Cancelled
    );
    // All five laptops are still there for the next customer.
    let all = app
        .place_order("bob", vec![item("laptop", 5, 999.0)])
        .await
        .expect("the order is placed");
    assert_eq!(
        app.wait_until_decided(&all.id, "bob").await.status(),
        OrderStatus::Confirmed
    );
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_same_order() {
    let app = spawn_app().await;
    let items = || vec![item("coffee", 2, 4.5)];
    let first = app
        .place_order_with_key("alice", "checkout-42", items())
        .await
        .expect("placed");
    let retry = app
        .place_order_with_key("alice", "checkout-42", items())
        .await
        .expect("placed again");
    assert_eq!(retry.id, first.id);
    assert_eq!(retry.items, first.items);

    let other_key = app
        .place_order_with_key("alice", "checkout-43", items())
        .await
        .expect("placed");
    assert_ne!(other_key.id, first.id);
    let other_user = app
        .place_order_with_key("bob", "checkout-42", items())
        .await
        .expect("placed");
    assert_ne!(other_user.id, first.id);

    let different = app
        .place_order_with_key("alice", "checkout-42", vec![item("coffee", 3, 4.5)])
        .await
        .expect_err("a reused key with other items is refused");
    assert_eq!(different.code(), Code::InvalidArgument);
    assert!(
        different.message().contains("idempotency-key"),
        "{}",
        different.message()
    );

    // The retry started no second saga: the order is decided once and stays so.
    let decided = app.wait_until_decided(&first.id, "alice").await;
    assert_eq!(decided.status(), OrderStatus::Confirmed);
    let after = app
        .place_order_with_key("alice", "checkout-42", items())
        .await
        .expect("placed again");
    assert_eq!(after.id, first.id);
    assert_eq!(
        after.status(),
        OrderStatus::Confirmed,
        "a retry returns the order as it stands"
    );
}

#[tokio::test]
async fn another_users_order_is_not_found() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("book", 1, 12.0)])
        .await
        .expect("placed");
    let stranger = app.get_order(&placed.id, "mallory").await.expect_err("hidden");
    assert_eq!(stranger.code(), Code::NotFound);
    let unknown = app
        .get_order(&Uuid::now_v7().to_string(), "alice")
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        stranger.message().replace(&placed.id, "<id>"),
        unknown.message().replace(&unknown_id(&unknown), "<id>"),
        "a hidden order looks exactly like a missing one"
    );
    assert!(app.get_order(&placed.id, "alice").await.is_ok());
}

fn unknown_id(status: &tonic::Status) -> String {
    status
        .message()
        .split_whitespace()
        .find(|word| Uuid::parse_str(word).is_ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn reading_an_order_needs_a_user_and_a_well_formed_id() {
    let app = spawn_app().await;
    let placed = app
        .place_order("alice", vec![item("book", 1, 12.0)])
        .await
        .expect("placed");
    let no_user = app.get_order(&placed.id, "").await.expect_err("no user");
    assert_eq!(no_user.code(), Code::InvalidArgument);
    assert!(no_user.message().starts_with("user_id"), "{}", no_user.message());
    let malformed = app.get_order("not-a-uuid", "alice").await.expect_err("malformed");
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().starts_with("order_id"), "{}", malformed.message());
}
