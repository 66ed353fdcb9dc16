//! The order saga, declared with saga-core.
//!
//! 1. `create-order` (local): store the order `PENDING`. Undone by marking it
//!    `CANCELLED` and publishing `OrderCancelled`.
//! 2. `reserve-stock` (remote): publish `OrderCreated`; wait for the product
//!    service's `StockUpdateResult` for this order (correlated by the
//!    `order_id` in its body) until the stock reply deadline. A failure or the
//!    deadline compensates step 1.
//! 3. `confirm-order` (local): mark the order `CONFIRMED`, publish `OrderConfirmed`.
//!
//! The saga id is the order id. The first committed reply decides; the engine
//! ignores duplicate, contradicting or late replies once the saga has moved on.

use std::time::Duration;

use saga_core::{Command, DefinitionError, ReplyOutcome, SagaDefinition, Step};
use serde::{Deserialize, Serialize};

use crate::domain::{Order, OrderId, OrderStatus};
use crate::wire::{
    ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_CREATED, OrderCancelled, OrderConfirmed, OrderCreated, STOCK_UPDATE_RESULT,
    StockUpdateResult, WireNames,
};

/// The saga's registered name.
pub const ORDER_SAGA: &str = "order";

/// The default stock reply deadline.
pub const DEFAULT_STOCK_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an order is cancelled when nothing more precise is known (the engine
/// always records why a step failed, so this is a fallback).
pub const NO_STOCK_REPLY: &str = "no stock reservation reply before the deadline";

/// Why an order is cancelled when the product service said no without a reason.
pub const OUT_OF_STOCK: &str = "out of stock";

/// The longest refusal reason kept, in bytes: it is stored in the saga's
/// data and history and republished in `OrderCancelled`, and the product
/// service is another party.
pub const MAX_REASON_BYTES: usize = 1024;

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary, ending in
/// `…` when cut.
fn bounded(reason: String) -> String {
    saga_core::shortened(reason, MAX_REASON_BYTES)
}

/// What the order saga carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSagaData {
    /// The order as placed.
    pub order: Order,
    /// Why stock could not be reserved, once the product service said so.
    pub cancel_reason: Option<String>,
}

impl OrderSagaData {
    /// The data of the saga for a newly placed `order`.
    pub fn new(order: Order) -> Self {
        Self {
            order,
            cancel_reason: None,
        }
    }
}

/// Changes to the orders table, applied in the saga transition's transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderEffect {
    /// Store a new order with its items.
    Insert(Order),
    /// Set an order's status.
    SetStatus(OrderId, OrderStatus),
}

/// How the saga is wired to the outside world.
#[derive(Clone, Debug)]
pub struct OrderSagaConfig {
    /// Exchange names.
    pub names: WireNames,
    /// How long to wait for `StockUpdateResult`.
    pub stock_reply_timeout: Duration,
}

impl Default for OrderSagaConfig {
    fn default() -> Self {
        Self {
            names: WireNames::default(),
            stock_reply_timeout: DEFAULT_STOCK_REPLY_TIMEOUT,
        }
    }
}

/// The order saga.
pub fn order_saga(config: &OrderSagaConfig) -> Result<SagaDefinition<OrderSagaData, OrderEffect>, DefinitionError> {
    let orders_exchange = config.names.orders_exchange.clone();
    let confirmed_exchange = config.names.order_confirmed_exchange.clone();
    let cancelled_exchange = config.names.order_cancelled_exchange.clone();

    SagaDefinition::builder(ORDER_SAGA)
        .key(|data: &OrderSagaData| data.order.id.to_string())
        .step(
            Step::local("create-order", |data: &mut OrderSagaData, ctx| {
                ctx.effect(OrderEffect::Insert(data.order.clone()));
                Ok(())
            })
            .compensate(move |data, ctx| {
                let order = &data.order;
                // The product service's refusal when there was one; otherwise the
                // engine's account of the failure (no reply before the deadline,
                // cancelled by an operator).
                let reason = data
                    .cancel_reason
                    .as_deref()
                    .or(ctx.failure())
                    .unwrap_or(NO_STOCK_REPLY);
                let cancelled = OrderCancelled::new(order.id, &order.user_id, reason);
                ctx.effect(OrderEffect::SetStatus(order.id, OrderStatus::Cancelled));
                ctx.send(Command::json(ORDER_CANCELLED, &cancelled_exchange, &cancelled)?);
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve-stock", move |data: &OrderSagaData| {
                Ok(Command::json(
                    ORDER_CREATED,
                    &orders_exchange,
                    &OrderCreated::from(&data.order),
                )?)
            })
            .on_reply_keyed(
                STOCK_UPDATE_RESULT,
                StockUpdateResult::order_key,
                |data, result: StockUpdateResult| {
                    if result.success {
                        ReplyOutcome::Success
                    } else {
                        let reason = result
                            .reason
                            .filter(|r| !r.trim().is_empty())
                            .map_or_else(|| OUT_OF_STOCK.to_owned(), bounded);
                        data.cancel_reason = Some(reason.clone());
                        ReplyOutcome::Failure(reason)
                    }
                },
            )
            .timeout(config.stock_reply_timeout),
        )
        .step(Step::local("confirm-order", move |data: &mut OrderSagaData, ctx| {
            let order = &data.order;
            ctx.effect(OrderEffect::SetStatus(order.id, OrderStatus::Confirmed));
            let confirmed = OrderConfirmed::new(order.id, &order.user_id);
            ctx.send(Command::json(ORDER_CONFIRMED, &confirmed_exchange, &confirmed)?);
            Ok(())
        }))
        .build()
}

#[cfg(test)]
mod tests {
    use saga_core::testkit::SagaTest;
    use saga_core::{Handled, SagaStatus};
    use serde_json::{Value, json};

    use super::*;
    use crate::domain::{OrderItem, UserId};

    fn placed_order() -> Order {
        let items = vec![
            OrderItem::parse("apple".to_owned(), 2, 10.25).expect("valid item"),
            OrderItem::parse("pear".to_owned(), 1, 0.5).expect("valid item"),
        ];
        Order::place(OrderId::new(), UserId::parse("alice").expect("valid user"), items).expect("valid order")
    }

    fn started() -> (SagaTest<OrderSagaData, OrderEffect>, Order) {
        let definition = order_saga(&OrderSagaConfig::default()).expect("the order saga is well formed");
        let mut test = SagaTest::new(definition);
        let order = placed_order();
        test.start(OrderSagaData::new(order.clone()));
        (test, order)
    }

    fn body(test: &SagaTest<OrderSagaData, OrderEffect>, index: usize) -> Value {
        serde_json::from_slice(&test.sent()[index].payload).expect("JSON body")
    }

    fn result(order: &Order, success: bool, reason: Option<&str>) -> StockUpdateResult {
        StockUpdateResult {
            order_id: order.id.to_string(),
            success,
            reason: reason.map(str::to_owned),
        }
    }

    #[test]
    fn placing_an_order_stores_it_pending_and_asks_for_stock() {
        let (test, order) = started();
        assert_eq!(test.status(), SagaStatus::Running);
        assert_eq!(test.effects(), [OrderEffect::Insert(order.clone())]);
        assert_eq!(test.sent_kinds(), [ORDER_CREATED]);
        assert_eq!(test.sent()[0].destination, "orders_exchange");
        assert_eq!(
            body(&test, 0),
            json!({
                "order_id": order.id.to_string(),
                "user_id": "alice",
                "total_price": 21.0,
                "items": [
                    {"product_id": "apple", "quantity": 2, "price": 10.25},
                    {"product_id": "pear", "quantity": 1, "price": 0.5},
                ],
            })
        );
    }

    #[test]
    fn reserved_stock_confirms_the_order() {
        let (mut test, order) = started();
        let handled = test.reply(STOCK_UPDATE_RESULT, &result(&order, true, None));
        assert!(matches!(handled, Ok(Handled::Applied { .. })), "{handled:?}");
        assert_eq!(test.status(), SagaStatus::Completed);
        assert_eq!(
            test.effects().last(),
            Some(&OrderEffect::SetStatus(order.id, OrderStatus::Confirmed))
        );
        assert_eq!(test.sent_kinds(), [ORDER_CREATED, ORDER_CONFIRMED]);
        assert_eq!(test.sent()[1].destination, "order_confirmed_exchange");
        assert_eq!(
            body(&test, 1),
            json!({"order_id": order.id.to_string(), "user_id": "alice"})
        );
    }

    #[test]
    fn out_of_stock_cancels_the_order_with_the_reason() {
        let (mut test, order) = started();
        test.reply(STOCK_UPDATE_RESULT, &result(&order, false, Some("pear: only 0 left")))
            .expect("handled");
        assert_eq!(test.status(), SagaStatus::Compensated);
        assert_eq!(
            test.effects().last(),
            Some(&OrderEffect::SetStatus(order.id, OrderStatus::Cancelled))
        );
        assert_eq!(test.sent_kinds(), [ORDER_CREATED, ORDER_CANCELLED]);
        assert_eq!(test.sent()[1].destination, "order_cancelled_exchange");
        assert_eq!(
            body(&test, 1),
            json!({"order_id": order.id.to_string(), "user_id": "alice", "reason": "pear: only 0 left"})
        );
    }

    #[test]
    fn a_long_refusal_reason_is_cut_where_it_is_kept_and_sent() {
        let (mut test, order) = started();
        // Multi-byte characters, so a cut by bytes alone would split one.
        let reason = "é".repeat(MAX_REASON_BYTES);
        test.reply(STOCK_UPDATE_RESULT, &result(&order, false, Some(&reason)))
            .expect("handled");
        assert_eq!(test.status(), SagaStatus::Compensated);
        let sent = body(&test, 1)["reason"].as_str().map(str::to_owned).unwrap_or_default();
        let kept = test.data().cancel_reason.unwrap_or_default();
        let noted = test.history().iter().filter_map(|t| t.note.clone()).collect::<Vec<_>>();
        for (what, text) in [("sent", &sent), ("kept", &kept)] {
            assert!(text.len() <= MAX_REASON_BYTES, "{what}: {} bytes", text.len());
            assert!(text.starts_with("éé") && text.ends_with('…'), "{what}: {text}");
        }
        assert!(
            noted.iter().all(|note| note.len() <= MAX_REASON_BYTES + 100),
            "the history notes the cut reason: {:?}",
            noted.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(
            bounded("pear: only 0 left".to_owned()),
            "pear: only 0 left",
            "short ones stay"
        );
    }

    #[test]
    fn a_refusal_without_reason_reads_out_of_stock() {
        let (mut test, order) = started();
        test.reply(STOCK_UPDATE_RESULT, &result(&order, false, None))
            .expect("handled");
        assert_eq!(body(&test, 1)["reason"], OUT_OF_STOCK);
    }

    #[test]
    fn no_reply_before_the_deadline_cancels_the_order() {
        let (mut test, order) = started();
        test.advance(DEFAULT_STOCK_REPLY_TIMEOUT - Duration::from_secs(1));
        assert_eq!(test.status(), SagaStatus::Running);
        test.advance(Duration::from_secs(1));
        assert_eq!(test.status(), SagaStatus::Compensated);
        assert_eq!(test.sent_kinds(), [ORDER_CREATED, ORDER_CANCELLED]);
        let reason = body(&test, 1)["reason"].as_str().map(str::to_owned).unwrap_or_default();
        assert!(reason.contains("no reply before its deadline"), "{reason}");
        assert_eq!(
            test.effects().last(),
            Some(&OrderEffect::SetStatus(order.id, OrderStatus::Cancelled))
        );
    }

    #[test]
    fn a_duplicate_reply_changes_nothing() {
        let (mut test, order) = started();
        let reply = saga_core::Message::json(
            STOCK_UPDATE_RESULT,
            "stock_update_exchange",
            &result(&order, true, None),
        )
        .expect("JSON");
        test.deliver(&reply).expect("handled");
        let (sent, effects) = (test.sent().len(), test.effects().len());
        assert_eq!(test.deliver(&reply).expect("handled"), Handled::Duplicate);
        assert_eq!((test.sent().len(), test.effects().len()), (sent, effects));
    }

    #[test]
    fn the_first_reply_decides_and_a_contradicting_one_is_ignored() {
        let (mut test, order) = started();
        test.reply(STOCK_UPDATE_RESULT, &result(&order, true, None))
            .expect("handled");
        let handled = test
            .reply(STOCK_UPDATE_RESULT, &result(&order, false, Some("sorry")))
            .expect("handled");
        assert!(matches!(handled, Handled::Ignored(_)), "{handled:?}");
        assert_eq!(test.status(), SagaStatus::Completed);
        assert_eq!(test.sent_kinds(), [ORDER_CREATED, ORDER_CONFIRMED]);
        assert_eq!(test.effects().len(), 2);
    }

    #[test]
    fn a_reply_after_the_deadline_changes_nothing() {
        let (mut test, order) = started();
        test.advance(DEFAULT_STOCK_REPLY_TIMEOUT + Duration::from_secs(1));
        assert_eq!(test.status(), SagaStatus::Compensated);
        let handled = test
            .reply(STOCK_UPDATE_RESULT, &result(&order, true, None))
            .expect("handled");
        assert!(matches!(handled, Handled::Ignored(_)), "{handled:?}");
        assert_eq!(test.status(), SagaStatus::Compensated);
        assert_eq!(test.sent_kinds(), [ORDER_CREATED, ORDER_CANCELLED]);
        assert_eq!(test.effects().len(), 2);
    }

    #[test]
    fn replies_find_their_order_by_the_id_in_the_body_in_any_case() {
        let order = placed_order();
        let reply = result(&order, true, None);
        let shouting = StockUpdateResult {
            order_id: order.id.to_string().to_uppercase(),
            ..reply.clone()
        };
        assert_eq!(shouting.order_key(), order.id.to_string());
        assert_eq!(
            StockUpdateResult {
                order_id: "junk".to_owned(),
                ..reply
            }
            .order_key(),
            "junk"
        );
    }

    #[test]
    fn the_timeout_comes_from_configuration() {
        let config = OrderSagaConfig {
            stock_reply_timeout: Duration::from_millis(500),
            ..OrderSagaConfig::default()
        };
        let definition = order_saga(&config).expect("well formed");
        assert_eq!(definition.steps()[1].reply_timeout(), Some(Duration::from_millis(500)));
    }
}
