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
