//! The RabbitMQ wire contract shared with the platform: message names, the
//! exchanges and queue they travel through, and their JSON bodies exactly as
//! the existing services read and write them (prices as JSON numbers).

use serde::{Deserialize, Serialize};

use crate::domain::{Order, OrderId, UserId};

/// `OrderCreated`, published to the orders exchange.
pub const ORDER_CREATED: &str = "OrderCreated";
/// `StockUpdateResult`, the product service's answer to `OrderCreated`.
pub const STOCK_UPDATE_RESULT: &str = "StockUpdateResult";
/// `OrderConfirmed`, published once stock is reserved.
pub const ORDER_CONFIRMED: &str = "OrderConfirmed";
/// `OrderCancelled`, published when an order is given up.
pub const ORDER_CANCELLED: &str = "OrderCancelled";

/// Exchange and queue names (all exchanges fanout and durable). They come
/// from configuration; the defaults are the platform's names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireNames {
    /// Where `OrderCreated` is published.
    pub orders_exchange: String,
    /// Where the product service publishes `StockUpdateResult`.
    pub stock_update_exchange: String,
    /// The durable queue this service consumes `StockUpdateResult` from
    /// (its dead letters go to `<queue>.dlq`).
    pub stock_update_queue: String,
    /// Where `OrderConfirmed` is published.
    pub order_confirmed_exchange: String,
    /// Where `OrderCancelled` is published.
    pub order_cancelled_exchange: String,
}

impl Default for WireNames {
    fn default() -> Self {
        Self {
            orders_exchange: "orders_exchange".to_owned(),
            stock_update_exchange: "stock_update_exchange".to_owned(),
            stock_update_queue: "order_service_stock_update_queue".to_owned(),
            order_confirmed_exchange: "order_confirmed_exchange".to_owned(),
            order_cancelled_exchange: "order_cancelled_exchange".to_owned(),
        }
    }
}

/// One item of an `OrderCreated`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderCreatedItem {
    /// The product.
    pub product_id: String,
    /// How many.
    pub quantity: u32,
    /// The unit price.
    pub price: f64,
}

/// `{"order_id", "user_id", "total_price", "items": [{"product_id", "quantity", "price"}]}`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order (a UUID).
    pub order_id: String,
    /// Its owner.
    pub user_id: String,
    /// The exact total, as the nearest double.
    pub total_price: f64,
    /// What to reserve.
    pub items: Vec<OrderCreatedItem>,
}

impl From<&Order> for OrderCreated {
    fn from(order: &Order) -> Self {
        Self {
            order_id: order.id.to_string(),
            user_id: order.user_id.to_string(),
            total_price: order.total.to_f64(),
            items: order
                .items
                .iter()
                .map(|item| OrderCreatedItem {
                    product_id: item.product_id.to_string(),
                    quantity: item.quantity.get(),
                    price: item.price.to_f64(),
                })
                .collect(),
        }
    }
}

/// `{"order_id", "success", "reason"}` (`reason` optional).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockUpdateResult {
    /// The order the result is for.
    pub order_id: String,
    /// Whether every item was reserved.
    pub success: bool,
    /// Why not, usually.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl StockUpdateResult {
    /// The order id in canonical form, so `ABC…` and `abc…` find the same
    /// saga; text that is no UUID is passed through (and matches nothing).
    pub fn order_key(&self) -> String {
        self.order_id
            .parse::<OrderId>()
            .map_or_else(|_| self.order_id.clone(), |id| id.to_string())
    }
}

/// `{"order_id", "user_id"}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
    /// Its owner.
    pub user_id: String,
}

/// `{"order_id", "user_id", "reason"}`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// Its owner.
    pub user_id: String,
    /// Why it was cancelled.
    pub reason: String,
}

impl OrderConfirmed {
    /// The message for `order`.
    pub fn new(id: OrderId, user: &UserId) -> Self {
        Self {
            order_id: id.to_string(),
            user_id: user.to_string(),
        }
    }
}

impl OrderCancelled {
    /// The message for `order`, with `reason`.
    pub fn new(id: OrderId, user: &UserId, reason: impl Into<String>) -> Self {
        Self {
            order_id: id.to_string(),
            user_id: user.to_string(),
            reason: reason.into(),
        }
    }
}

/// The decoders of what arrives from outside (a reply from the product
/// service, or any bytes a publisher puts on the reply queue): they never
/// panic, and the messages this service and its participants write read back
/// as written.
#[cfg(test)]
mod properties {
    use std::sync::Arc;

    use proptest::prelude::*;
    use saga_core::memory::InMemoryStore;
    use saga_core::{Engine, EngineError, Handled, Message, SagaId};

    use super::*;
    use crate::domain::{OrderId, OrderItem};
    use crate::repository::InMemoryOrders;
    use crate::saga::{ORDER_SAGA, OrderSagaConfig, OrderSagaData, order_saga};

    /// Bytes a reply queue may carry: anything, JSON-looking text, and
    /// replies of every shape for `order_id`.
    fn reply_bytes(order_id: String) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            "[\\[\\]{}\":,0-9a-z ]{0,64}".prop_map(String::into_bytes),
            (any::<bool>(), proptest::option::of(any::<String>())).prop_map(move |(success, reason)| {
                serde_json::to_vec(&StockUpdateResult {
                    order_id: order_id.clone(),
                    success,
                    reason,
                })
                .unwrap_or_default()
            }),
            Just(br#"{"order_id":null,"success":true}"#.to_vec()),
            Just(br#"{"order_id":"x","success":"true"}"#.to_vec()),
        ]
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    proptest! {
        #[test]
        fn stock_update_results_round_trip(order_id in any::<String>(), success in any::<bool>(), reason in proptest::option::of(any::<String>())) {
            let sent = StockUpdateResult { order_id, success, reason };
            let bytes = serde_json::to_vec(&sent).expect("encodable");
            let got: StockUpdateResult = serde_json::from_slice(&bytes).expect("decodable");
            let _ = got.order_key();
            prop_assert_eq!(got, sent);
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(result) = serde_json::from_slice::<StockUpdateResult>(&bytes) {
                let _ = result.order_key();
            }
            let _ = serde_json::from_slice::<OrderCreated>(&bytes);
            let _ = serde_json::from_slice::<OrderCancelled>(&bytes);
            let _ = serde_json::from_slice::<OrderConfirmed>(&bytes);
        }

        #[test]
        fn order_keys_are_canonical_whatever_the_uuid_form(bits in any::<u128>()) {
            let id = uuid::Uuid::from_u128(bits);
            let canonical = id.to_string();
            for form in [
                canonical.clone(),
                canonical.to_uppercase(),
                id.simple().to_string(),
                id.braced().to_string(),
                id.urn().to_string(),
            ] {
                let reply = StockUpdateResult { order_id: form, success: true, reason: None };
                prop_assert_eq!(reply.order_key(), canonical.clone());
            }
        }

        #[test]
        fn orders_created_read_back_as_placed(
            items in prop::collection::vec(("[a-z0-9-]{1,20}", 1..=10_000i32, 0..=100_000_000_000i64), 1..8),
        ) {
            let items = items
                .into_iter()
                .map(|(product, quantity, cents)| OrderItem::parse(product, quantity, cents as f64 / 100.0))
                .collect::<Result<Vec<_>, _>>()
                .expect("valid items");
            let order = Order::place(OrderId::new(), UserId::parse("alice").expect("valid"), items).expect("valid order");
            let sent = OrderCreated::from(&order);
            let got: OrderCreated = serde_json::from_slice(&serde_json::to_vec(&sent).expect("encodable")).expect("decodable");
            prop_assert_eq!(got, sent);
        }

        /// Whatever arrives as a `StockUpdateResult`, the engine decides the
        /// order at most once, and what it cannot act on is an error the
        /// consumer dead-letters (not retryable), never a panic.
        #[test]
        fn any_reply_is_decided_once_or_refused(bodies in prop::collection::vec(reply_bytes(String::new()), 1..6), for_the_order in prop::collection::vec(any::<bool>(), 6)) {
            runtime().block_on(async {
                let store = InMemoryStore::new();
                let engine = Engine::builder(Arc::new(store))
                    .register_with_effects(order_saga(&OrderSagaConfig::default()).expect("valid saga"), InMemoryOrders::new())
                    .build()
                    .expect("engine");
                let order = Order::place(
                    OrderId::new(),
                    UserId::parse("alice").expect("valid"),
                    vec![OrderItem::parse("apple".to_owned(), 1, 1.0).expect("valid")],
                )
                .expect("valid order");
                let id = order.id.to_string();
                engine
                    .start_with_id(ORDER_SAGA, SagaId::from_uuid(*order.id.as_uuid()), OrderSagaData::new(order))
                    .await
                    .expect("started");
                let mut decided = 0;
                for (body, aimed) in bodies.into_iter().zip(for_the_order) {
                    // Point valid replies at the order half of the time.
                    let body = match serde_json::from_slice::<StockUpdateResult>(&body) {
                        Ok(mut reply) if aimed => {
                            reply.order_id.clone_from(&id);
                            serde_json::to_vec(&reply).expect("encodable")
                        }
                        _ => body,
                    };
                    match engine.handle(&Message::new(STOCK_UPDATE_RESULT, "stock_update_exchange", body)).await {
                        Ok(Handled::Applied { .. }) => decided += 1,
                        Ok(_) => {}
                        Err(error) => prop_assert!(
                            !error.is_retryable() && !matches!(error, EngineError::Store(_)),
                            "{error}"
                        ),
                    }
                }
                prop_assert!(decided <= 1, "decided {decided} times");
                Ok(())
            })?;
        }
    }
}
