//! Deploying a version 2 of the order saga while orders are in flight.
//!
//! Version 2 screens orders before reserving stock (a new local step,
//! `screen-order`, refusing totals above a limit) and records the verdict in
//! its data, so its data has a new shape (data version 2). Two ways to ship
//! it, both shown on the service's own version 1, effect handler and wire
//! messages:
//! - side by side: v1 stays registered, orders started under v1 finish
//!   under v1 (never screened), new orders run v2;
//! - with a typed upgrade: only v2 is registered, and orders in flight move
//!   to it at their next transition, their data converted and their step
//!   counter shifted past the new step.
//!
//! Before deploying, `saga_core::testkit::assert_resumable` checks stored
//! states (here: samples of every shape an order can be stored in) against
//! the new engine; it fails for a deployment that would strand them.

use std::sync::Arc;

use order_service::domain::{Order, OrderId, OrderItem, OrderStatus, UserId};
use order_service::repository::{InMemoryOrders, OrderRepository};
use order_service::saga::{ORDER_SAGA, OrderEffect, OrderSagaConfig, OrderSagaData, order_saga};
use order_service::wire::{
    ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_CREATED, OrderCancelled, OrderConfirmed, OrderCreated, STOCK_UPDATE_RESULT,
    StockUpdateResult, WireNames,
};
use saga_core::memory::InMemoryStore;
use saga_core::testkit::assert_resumable;
use saga_core::{
    Cause, Command, Engine, EngineError, Message, QueryStore, ReplyOutcome, SagaDefinition, SagaId, SagaInstance,
    SagaStatus, SagaStore, Step, StepError, Upgrade,
};
use serde::{Deserialize, Serialize};

/// Version 2 refuses orders above this total.
const SCREENING_LIMIT: f64 = 1_000.0;

/// Version 2's data: version 1's, plus the screening verdict (`None` for
/// orders placed before screening existed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct OrderSagaDataV2 {
    order: Order,
    cancel_reason: Option<String>,
    screening: Option<String>,
}

/// Version 2 of the order saga: version 1 with `screen-order` before
/// `reserve-stock`.
fn order_saga_v2(names: &WireNames) -> SagaDefinition<OrderSagaDataV2, OrderEffect> {
    let orders_exchange = names.orders_exchange.clone();
    let confirmed_exchange = names.order_confirmed_exchange.clone();
    let cancelled_exchange = names.order_cancelled_exchange.clone();
    SagaDefinition::builder(ORDER_SAGA)
        .version(2)
        .data_version(2)
        .key(|data: &OrderSagaDataV2| data.order.id.to_string())
        .step(
            Step::local("create-order", |data: &mut OrderSagaDataV2, ctx| {
                ctx.effect(OrderEffect::Insert(data.order.clone()));
                Ok(())
            })
            .compensate(move |data, ctx| {
                let order = &data.order;
                let reason = data.cancel_reason.as_deref().unwrap_or("cancelled");
                ctx.effect(OrderEffect::SetStatus(order.id, OrderStatus::Cancelled));
                let cancelled = OrderCancelled::new(order.id, &order.user_id, reason);
                ctx.send(Command::json(ORDER_CANCELLED, &cancelled_exchange, &cancelled)?);
                Ok(())
            }),
        )
        .step(Step::local("screen-order", |data: &mut OrderSagaDataV2, _| {
            if data.order.total.to_f64() > SCREENING_LIMIT {
                let reason = format!("refused by screening: total above {SCREENING_LIMIT}");
                data.cancel_reason = Some(reason.clone());
                return Err(StepError::terminal(reason));
            }
            data.screening = Some("passed".to_owned());
            Ok(())
        }))
        .step(
            Step::remote("reserve-stock", move |data: &OrderSagaDataV2| {
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
                        let reason = result.reason.unwrap_or_else(|| "out of stock".to_owned());
                        data.cancel_reason = Some(reason.clone());
                        ReplyOutcome::Failure(reason)
                    }
                },
            ),
        )
        .step(Step::local("confirm-order", move |data: &mut OrderSagaDataV2, ctx| {
            let order = &data.order;
            ctx.effect(OrderEffect::SetStatus(order.id, OrderStatus::Confirmed));
            let confirmed = OrderConfirmed::new(order.id, &order.user_id);
            ctx.send(Command::json(ORDER_CONFIRMED, &confirmed_exchange, &confirmed)?);
            Ok(())
        }))
        .build()
        .expect("version 2 of the order saga is well formed")
}

/// Moves an order from version 1 to 2: its data gains an empty verdict (it
/// was never screened, and will not be), and a step counter past
/// `create-order` moves one on, past the new step.
fn upgrade_to_v2() -> Upgrade {
    Upgrade::new(ORDER_SAGA, 1, 2, |old: OrderSagaData| OrderSagaDataV2 {
        order: old.order,
        cancel_reason: old.cancel_reason,
        screening: None,
    })
    // Running: the step being run; compensating: how many remain to
    // compensate. Either way a counter of 1 or more counts v1's
    // `reserve-stock` or later, which v2 has one position further on.
    .map_step(|step, _status| if step >= 1 { step + 1 } else { step })
}

fn v1() -> SagaDefinition<OrderSagaData, OrderEffect> {
    order_saga(&OrderSagaConfig::default()).expect("the order saga is well formed")
}

/// The service as deployed: version 1 only.
fn engine_v1(store: &InMemoryStore, orders: &InMemoryOrders) -> Engine {
    Engine::builder(Arc::new(store.clone()))
        .register_with_effects(v1(), orders.clone())
        .build()
        .expect("engine")
}

fn order(product: &str, quantity: i32, price: f64) -> Order {
    let items = vec![OrderItem::parse(product.to_owned(), quantity, price).expect("a valid item")];
    Order::place(OrderId::new(), UserId::parse("alice").expect("a user"), items).expect("a valid order")
}

fn saga_id(order: &Order) -> SagaId {
    SagaId::from_uuid(*order.id.as_uuid())
}

fn stock_reply(order: &Order, success: bool) -> Message {
    let result = StockUpdateResult {
        order_id: order.id.to_string(),
        success,
        reason: None,
    };
    Message::json(STOCK_UPDATE_RESULT, "stock_update_exchange", &result).expect("JSON")
}

async fn stored(store: &InMemoryStore, order: &Order) -> SagaInstance {
    store
        .load(saga_id(order))
        .await
        .expect("the store answers")
        .expect("the saga is stored")
}

async fn order_status(orders: &InMemoryOrders, order: &Order) -> OrderStatus {
    orders
        .get(order.id, &order.user_id)
        .await
        .expect("the orders table answers")
        .expect("the order is stored")
        .status
}

/// Every shape a version 1 order is stored in, from a real one waiting for
/// its stock reply: running (waiting), compensating, needing attention, and
/// finished both ways.
fn v1_samples(waiting: &SagaInstance) -> Vec<SagaInstance> {
    let failure = Some("step `reserve-stock` failed: out of stock".to_owned());
    vec![
        waiting.clone(),
        SagaInstance {
            status: SagaStatus::Compensating,
            step: 1,
            awaiting: None,
            deadline: None,
            failure: failure.clone(),
            ..waiting.clone()
        },
        SagaInstance {
            status: SagaStatus::NeedsAttention,
            step: 1,
            attempt: 5,
            awaiting: None,
            deadline: None,
            failure,
            ..waiting.clone()
        },
        SagaInstance {
            status: SagaStatus::Completed,
            step: 3,
            awaiting: None,
            deadline: None,
            ..waiting.clone()
        },
        SagaInstance {
            status: SagaStatus::Compensated,
            step: 0,
            awaiting: None,
            deadline: None,
            ..waiting.clone()
        },
    ]
}

#[tokio::test]
async fn orders_in_flight_finish_under_v1_while_new_ones_run_v2() {
    let store = InMemoryStore::new();
    let orders = InMemoryOrders::new();
    let before = order("apple", 2, 10.0);
    engine_v1(&store, &orders)
        .start_with_id(ORDER_SAGA, saga_id(&before), OrderSagaData::new(before.clone()))
        .await
        .expect("started under v1");

    // Deploy: both versions side by side.
    let deployed = Engine::builder(Arc::new(store.clone()))
        .register_with_effects(v1(), orders.clone())
        .register_with_effects(order_saga_v2(&WireNames::default()), orders.clone())
        .build()
        .expect("v1 and v2 register side by side");
    let waiting = stored(&store, &before).await;
    assert_resumable(&deployed, &v1_samples(&waiting));

    let after = order("apple", 1, 10.0);
    let big = order("laptop", 1, 5_000.0);
    for new in [&after, &big] {
        deployed
            .start_with_id(
                ORDER_SAGA,
                saga_id(new),
                OrderSagaDataV2 {
                    order: new.clone(),
                    cancel_reason: None,
                    screening: None,
                },
            )
            .await
            .expect("started under v2");
        assert_eq!(
            stored(&store, new).await.definition_version,
            2,
            "new orders run the newest"
        );
    }
    // Screening is new: it refuses the big order at once.
    assert_eq!(stored(&store, &big).await.status, SagaStatus::Compensated);
    assert_eq!(order_status(&orders, &big).await, OrderStatus::Cancelled);

    // The stock replies arrive; each order finishes under its own version.
    for placed in [&before, &after] {
        deployed.handle(&stock_reply(placed, true)).await.expect("applied");
        assert_eq!(order_status(&orders, placed).await, OrderStatus::Confirmed);
    }
    let old = stored(&store, &before).await;
    assert_eq!(
        (old.status, old.definition_version, old.data_version),
        (SagaStatus::Completed, 1, 1),
        "the order placed before the deployment finished under v1"
    );
    let old_data: OrderSagaData = serde_json::from_str(&old.data).expect("still v1 data");
    assert_eq!(old_data.order.id, before.id);
    let new = stored(&store, &after).await;
    assert_eq!(
        (new.status, new.definition_version, new.data_version),
        (SagaStatus::Completed, 2, 2)
    );
    let new_data: OrderSagaDataV2 = serde_json::from_str(&new.data).expect("v2 data");
    assert_eq!(new_data.screening.as_deref(), Some("passed"), "screened");
}

#[tokio::test]
async fn the_resume_check_catches_a_deployment_that_drops_v1() {
    let store = InMemoryStore::new();
    let orders = InMemoryOrders::new();
    let placed = order("apple", 2, 10.0);
    engine_v1(&store, &orders)
        .start_with_id(ORDER_SAGA, saga_id(&placed), OrderSagaData::new(placed.clone()))
        .await
        .expect("started under v1");
    let samples = v1_samples(&stored(&store, &placed).await);

    // Version 2 alone, without v1 or an upgrade: every stored order is stranded.
    let v2_only = Engine::builder(Arc::new(store.clone()))
        .register_with_effects(order_saga_v2(&WireNames::default()), orders.clone())
        .build()
        .expect("engine");
    for sample in &samples {
        let checked = v2_only.check_resumable(sample);
        assert!(
            matches!(&checked, Err(EngineError::UnknownDefinition { version: 1, .. })),
            "{:?} at step {}: {checked:?}",
            sample.status,
            sample.step
        );
    }
    // Nothing is shared across the panic but what the assertion reads.
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_resumable(&v2_only, &samples)));
    let message = refused
        .expect_err("the CI check fails")
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    assert!(
        message.contains("5 stored instance(s) cannot resume") && message.contains("version 1"),
        "it lists them and says why: {message}"
    );

    // A stored order whose data does not decode is caught too.
    let mut corrupt = samples[0].clone();
    corrupt.data = r#"{"order": 5}"#.to_owned();
    let with_v1 = Engine::builder(Arc::new(store.clone()))
        .register_with_effects(v1(), orders.clone())
        .build()
        .expect("engine");
    let checked = with_v1.check_resumable(&corrupt);
    assert!(matches!(checked, Err(EngineError::NotResumable { .. })), "{checked:?}");
}

#[tokio::test]
async fn a_typed_upgrade_moves_orders_in_flight_to_v2() {
    let store = InMemoryStore::new();
    let orders = InMemoryOrders::new();
    let placed = order("apple", 2, 10.0);
    engine_v1(&store, &orders)
        .start_with_id(ORDER_SAGA, saga_id(&placed), OrderSagaData::new(placed.clone()))
        .await
        .expect("started under v1");
    let waiting = stored(&store, &placed).await;

    // Deploy: v2 only, with the upgrade from v1.
    let upgraded = Engine::builder(Arc::new(store.clone()))
        .register_with_effects(order_saga_v2(&WireNames::default()), orders.clone())
        .upgrade(upgrade_to_v2())
        .build()
        .expect("v2 with an upgrade from v1");
    let samples = v1_samples(&waiting);
    assert_resumable(&upgraded, &samples);
    let moved = upgraded.check_resumable(&waiting).expect("resumable");
    assert_eq!(
        (moved.definition_version, moved.data_version, moved.step),
        (2, 2, 2),
        "waiting at v2's `reserve-stock`"
    );
    let data: OrderSagaDataV2 = serde_json::from_str(&moved.data).expect("v2 data");
    assert_eq!((data.order.id, data.screening), (placed.id, None), "never screened");
    let compensating = upgraded.check_resumable(&samples[1]).expect("resumable");
    assert_eq!(
        compensating.step, 2,
        "compensates v2's `screen-order`, then `create-order`"
    );

    // Stored as v1 until something happens to it; the reply moves it.
    assert_eq!(stored(&store, &placed).await.definition_version, 1);
    upgraded.handle(&stock_reply(&placed, true)).await.expect("applied");
    let done = stored(&store, &placed).await;
    assert_eq!(
        (done.status, done.definition_version, done.data_version),
        (SagaStatus::Completed, 2, 2)
    );
    assert_eq!(order_status(&orders, &placed).await, OrderStatus::Confirmed);
    let history = store.history(saga_id(&placed)).await.expect("history");
    let last = history.last().expect("the reply's transition");
    assert!(matches!(&last.cause, Cause::Message { kind, .. } if kind == STOCK_UPDATE_RESULT));
    assert_eq!(
        last.emitted.iter().map(|(_, kind)| kind.as_str()).collect::<Vec<_>>(),
        [ORDER_CONFIRMED],
        "confirmed by v2's `confirm-order`"
    );
}
