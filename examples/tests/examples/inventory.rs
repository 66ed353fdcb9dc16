//! The inventory service as a participant: reservations all or nothing,
//! refusals, idempotency per message and per order, releases.

use std::str::FromStr;

use order_service::wire::{ORDER_CANCELLED, OrderCancelled, StockUpdateResult};
use saga_core::{CommandHandler, Message, MessageId, SagaStore};
use saga_examples::inventory::{Inventory, Reservation, ReservationStatus, SchemaName, StockKeeper, StockLevel};
use saga_postgres::PostgresStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{TestEnv, eventually, new_order_id, order_cancelled, order_created};

#[tokio::test]
async fn an_order_reserves_all_its_items() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100,p2=5").await;
    let mut broker = env.broker().await;

    let order = new_order_id();
    broker.place_order(&order, &[("p1", 2), ("p2", 5), ("p1", 1)]).await;
    let reply = broker.reply_for(&order).await;
    assert!(reply.success, "{reply:?}");
    assert_eq!(reply.reason, None);

    assert_eq!(inventory.units("p1").await, (97, 3));
    assert_eq!(inventory.units("p2").await, (0, 5));
    let reservation = inventory
        .inventory
        .reservation(&order)
        .await
        .expect("readable")
        .expect("a reservation");
    assert_eq!(reservation.status, ReservationStatus::Reserved);
    assert_eq!(reservation.items, vec![("p1".to_owned(), 3), ("p2".to_owned(), 5)]);

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn an_order_out_of_stock_is_refused_and_reserves_nothing() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100,p2=5").await;
    let mut broker = env.broker().await;

    let short = new_order_id();
    broker.place_order(&short, &[("p1", 2), ("p2", 6)]).await;
    let reply = broker.reply_for(&short).await;
    assert!(!reply.success);
    let reason = reply.reason.expect("a reason");
    assert!(reason.contains("p2"), "{reason}");

    let unknown = new_order_id();
    broker.place_order(&unknown, &[("p1", 1), ("unobtainium", 1)]).await;
    let reply = broker.reply_for(&unknown).await;
    assert!(!reply.success);
    assert!(reply.reason.unwrap_or_default().contains("unobtainium"));

    assert_eq!(inventory.units("p1").await, (100, 0));
    assert_eq!(inventory.units("p2").await, (5, 0));
    let reservation = inventory.inventory.reservation(&short).await.expect("readable");
    assert_eq!(
        reservation.map(|r| (r.status, r.items.len())),
        Some((ReservationStatus::Rejected, 0))
    );

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn a_redelivered_order_created_reserves_and_replies_once() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100").await;
    let mut broker = env.broker().await;

    // The same message (same id) twice, as after a relay crash.
    let order = new_order_id();
    let message = order_created(broker.names(), &order, &[("p1", 2)]);
    broker.publish(&message).await;
    broker.publish(&message).await;
    // One queue, one message at a time: once a later message is handled,
    // both copies were.
    let later = new_order_id();
    let sentinel = broker.place_order(&later, &[("p1", 1)]).await;
    inventory.wait_until_handled(sentinel.id.as_str()).await;

    assert_eq!(inventory.units("p1").await, (97, 3));
    assert_eq!(inventory.replies_for(&order).await, 1);
    assert!(broker.reply_for(&order).await.success);

    // The same order under another message id (a platform publisher that
    // re-sends): the first answer again, nothing reserved twice.
    let again = order_created(broker.names(), &order, &[("p1", 2)]).with_id(MessageId::new());
    broker.publish(&again).await;
    inventory.wait_until_handled(again.id.as_str()).await;
    assert!(broker.reply_for(&order).await.success);
    assert_eq!(inventory.units("p1").await, (97, 3));

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn order_cancelled_releases_exactly_once() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100,p2=10").await;
    let mut broker = env.broker().await;

    let order = new_order_id();
    broker.place_order(&order, &[("p1", 3), ("p2", 4)]).await;
    assert!(broker.reply_for(&order).await.success);
    assert_eq!(inventory.units("p1").await, (97, 3));

    // Delivered twice, then cancelled again under another message id.
    let cancel = order_cancelled(broker.names(), &order);
    broker.publish(&cancel).await;
    broker.publish(&cancel).await;
    let again = broker.cancel_order(&order).await;
    inventory.wait_until_handled(again.id.as_str()).await;

    assert_eq!(inventory.units("p1").await, (100, 0));
    assert_eq!(inventory.units("p2").await, (10, 0));
    let reservation = inventory.inventory.reservation(&order).await.expect("readable");
    assert_eq!(reservation.map(|r| r.status), Some(ReservationStatus::Released));

    // A refused order holds nothing: its cancellation releases nothing.
    let refused = new_order_id();
    broker.place_order(&refused, &[("p1", 1), ("p2", 11)]).await;
    assert!(!broker.reply_for(&refused).await.success);
    let cancelled = broker.cancel_order(&refused).await;
    inventory.wait_until_handled(cancelled.id.as_str()).await;
    assert_eq!(inventory.units("p1").await, (100, 0));
    assert_eq!(inventory.units("p2").await, (10, 0));

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn a_cancellation_whose_reason_holds_a_nul_still_releases_the_stock() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100").await;
    let mut broker = env.broker().await;

    let order = new_order_id();
    broker.place_order(&order, &[("p1", 3)]).await;
    assert!(broker.reply_for(&order).await.success);
    // JSON allows it; PostgreSQL refuses it in a text.
    let body = OrderCancelled {
        order_id: order.clone(),
        user_id: "alice".to_owned(),
        reason: "timed\0out".to_owned(),
    };
    let cancel = Message::json(ORDER_CANCELLED, broker.names().order_cancelled_exchange.clone(), &body).expect("JSON");
    broker.publish(&cancel).await;
    inventory.wait_until_handled(cancel.id.as_str()).await;
    assert_eq!(inventory.units("p1").await, (100, 0), "released, not reserved for good");

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn an_order_the_database_refuses_for_good_is_dead_lettered_at_once_not_retried_for_minutes() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100").await;
    let mut broker = env.broker().await;

    // JSON allows a NUL; PostgreSQL refuses it in a text, every time.
    broker.place_order("order\0with-a-nul", &[("p1", 1)]).await;
    let queue = env.names.orders_queue.clone();
    let broker_ref = &broker;
    eventually("dead-lettered within the patience", || {
        let queue = queue.clone();
        async move { (broker_ref.dead_letters(&queue).await >= 1).then_some(()) }
    })
    .await;
    let order = new_order_id();
    broker.place_order(&order, &[("p1", 1)]).await;
    assert!(broker.reply_for(&order).await.success);
    assert_eq!(inventory.units("p1").await, (99, 1), "the refused order holds nothing");

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn a_cancellation_before_the_order_releases_nothing_and_refuses_it_later() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100").await;
    let mut broker = env.broker().await;

    // The cancellations queue got ahead of the orders queue.
    let order = new_order_id();
    let cancelled = broker.cancel_order(&order).await;
    inventory.wait_until_handled(cancelled.id.as_str()).await;
    assert_eq!(inventory.units("p1").await, (100, 0));

    broker.place_order(&order, &[("p1", 5)]).await;
    let reply = broker.reply_for(&order).await;
    assert!(!reply.success, "a cancelled order must not hold stock");
    assert_eq!(inventory.units("p1").await, (100, 0));

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn an_undecodable_message_is_dead_lettered_and_does_not_stop_the_service() {
    let env = TestEnv::new().await;
    let inventory = env.spawn_inventory("p1=100").await;
    let mut broker = env.broker().await;

    let poison = saga_core::Message::new("", broker.names().orders_exchange.clone(), b"not json".to_vec());
    broker.publish(&poison).await;
    let order = new_order_id();
    broker.place_order(&order, &[("p1", 1)]).await;
    assert!(broker.reply_for(&order).await.success);
    assert!(!inventory.has_handled(poison.id.as_str()).await);

    broker.close().await;
    inventory.stop().await;
}

#[tokio::test]
async fn two_replicas_never_sell_the_same_unit_twice() {
    let env = TestEnv::new().await;
    let config = saga_examples::inventory::InventoryConfig {
        concurrency: 8,
        ..env.inventory_config("p1=5,p2=100")
    };
    let first = env.spawn_inventory_with(config.clone()).await;
    let second = env.spawn_inventory_with(config).await;
    let mut broker = env.broker().await;

    // 12 orders of one p1 each (and p2 in a varying order, to cross locks).
    let orders: Vec<String> = (0..12).map(|_| new_order_id()).collect();
    for (n, order) in orders.iter().enumerate() {
        let items: &[(&str, u32)] = if n % 2 == 0 {
            &[("p1", 1), ("p2", 1)]
        } else {
            &[("p2", 1), ("p1", 1)]
        };
        broker.place_order(order, items).await;
    }
    let mut confirmed = 0;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        if seen.len() == orders.len() {
            break;
        }
        let (_, reply) = broker.next_reply().await;
        if seen.insert(reply.order_id.clone()) && reply.success {
            confirmed += 1;
        }
    }
    assert_eq!(seen.len(), orders.len(), "a reply for every order");
    assert_eq!(confirmed, 5);
    assert_eq!(first.units("p1").await, (0, 5));
    assert_eq!(first.units("p2").await, (95, 5));

    broker.close().await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn metrics_are_served_where_asked() {
    let env = TestEnv::new().await;
    let config = saga_examples::inventory::InventoryConfig {
        metrics: Some(order_service::config::ListenAddr::localhost(0)),
        ..env.inventory_config("p1=10")
    };
    let inventory = env.spawn_inventory_with(config).await;
    let mut broker = env.broker().await;
    let order = new_order_id();
    broker.place_order(&order, &[("p1", 1)]).await;
    assert!(broker.reply_for(&order).await.success);

    // The relay counts a message once its confirm is back, which may be
    // after the reply arrived: polled, within a bound.
    let expected = ["saga_messages_total{outcome=\"ack\"}", "saga_outbox_published_total"];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = inventory.metrics().await;
        assert_eq!(status, 200);
        match expected.iter().find(|name| !body.contains(*name)) {
            None => break,
            Some(missing) if std::time::Instant::now() > deadline => panic!("/metrics lacks `{missing}`:\n{body}"),
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    broker.close().await;
    inventory.stop().await;
}

/// The inventory's tables in schema `schema` of the test's database,
/// seeded with `seed`, and its store there.
async fn inventory_in(env: &TestEnv, schema: &str, seed: &str) -> (PostgresStore, Inventory) {
    let schema = SchemaName::from_str(schema).expect("a schema name");
    let options = PgConnectOptions::from_str(&env.database_url)
        .expect("a database URL")
        .options([("search_path", schema.as_str())])
        .options(saga_postgres::SESSION_SETTINGS);
    let pool = PgPoolOptions::new().max_connections(2).connect_lazy_with(options);
    let seed = seed.parse().expect("a seed");
    saga_examples::inventory::migrate(&pool, &schema, &seed)
        .await
        .expect("migrated");
    (PostgresStore::new(pool.clone()), Inventory::new(pool))
}

/// What the keeper answered each command (`None`: no reply).
fn answers(replies: Vec<Vec<saga_core::Command>>) -> Vec<Option<StockUpdateResult>> {
    replies
        .into_iter()
        .map(|mut replies| {
            assert!(replies.len() <= 1, "at most one reply per command");
            replies
                .pop()
                .map(|reply| serde_json::from_slice(&reply.payload).expect("a StockUpdateResult"))
        })
        .collect()
}

/// What the keeper answers `commands` handled as one batch in a
/// transaction of `batched`, after checking that it answers the same when
/// they are handled one by one in a transaction of `alone`.
async fn batched_and_one_by_one(
    keeper: &StockKeeper,
    batched: &PostgresStore,
    alone: &PostgresStore,
    commands: &[&Message],
) -> Vec<Option<StockUpdateResult>> {
    let mut tx = batched.begin().await.expect("begun");
    let in_batch = answers(keeper.handle_batch(tx.as_mut(), commands).await.expect("handled"));
    tx.commit().await.expect("committed");

    let mut tx = alone.begin().await.expect("begun");
    let mut replies = Vec::new();
    for command in commands {
        replies.push(keeper.handle(tx.as_mut(), command).await.expect("handled"));
    }
    tx.commit().await.expect("committed");
    assert_eq!(in_batch, answers(replies), "the same answers, batched or one by one");
    in_batch
}

/// `product`'s stock level.
fn level(product: &str, available: i64, reserved: i64) -> StockLevel {
    StockLevel {
        product_id: product.to_owned(),
        available,
        reserved,
    }
}

/// Each answer as (granted, the reason given).
fn outcomes(answers: Vec<Option<StockUpdateResult>>) -> Vec<Option<(bool, Option<String>)>> {
    answers.into_iter().map(|r| r.map(|r| (r.success, r.reason))).collect()
}

/// What an inventory holds: every product's stock and the orders' reservations.
async fn holdings(inventory: &Inventory, orders: &[&str]) -> (Vec<StockLevel>, Vec<Option<Reservation>>) {
    let levels = inventory.levels().await.expect("readable");
    let mut reservations = Vec::new();
    for order in orders {
        reservations.push(inventory.reservation(order).await.expect("readable"));
    }
    (levels, reservations)
}

#[tokio::test]
async fn a_batch_of_orders_is_decided_as_if_one_after_another() {
    let env = TestEnv::new().await;
    let (a, b, c, d, e) = (
        new_order_id(),
        new_order_id(),
        new_order_id(),
        new_order_id(),
        new_order_id(),
    );
    let names = &env.names;
    let commands: Vec<Message> = vec![
        order_created(names, &a, &[("p1", 3)]),
        // Two units left: refused.
        order_created(names, &b, &[("p1", 3)]),
        // Seen before (another message id): the same answers, nothing taken twice.
        order_created(names, &a, &[("p1", 3)]),
        order_created(names, &b, &[("p1", 1)]),
        order_created(names, &c, &[("p2", 2), ("p1", 2), ("p2", 1)]),
        order_created(names, &d, &[("unobtainium", 2)]),
        // Splits the run of OrderCreated; gives c's units back.
        order_cancelled(names, &c),
        order_created(names, &e, &[("p2", 3), ("p1", 2)]),
    ];
    let commands: Vec<&Message> = commands.iter().collect();
    let keeper = StockKeeper::new(names.stock_update_exchange.clone());
    let seed = "p1=5,p2=3";

    let (store, batched) = inventory_in(&env, "batched", seed).await;
    let (one_store, alone) = inventory_in(&env, "one_by_one", seed).await;
    let in_batch = batched_and_one_by_one(&keeper, &store, &one_store, &commands).await;

    let outcome = outcomes(in_batch);
    let refused_b = Some("insufficient stock for `p1`: 2 available, 3 wanted".to_owned());
    assert_eq!(
        outcome,
        [
            Some((true, None)),
            Some((false, refused_b.clone())),
            Some((true, None)),
            Some((false, refused_b)),
            Some((true, None)),
            Some((false, Some("unknown product `unobtainium`".to_owned()))),
            None,
            Some((true, None)),
        ]
    );
    let orders = [a.as_str(), b.as_str(), c.as_str(), d.as_str(), e.as_str()];
    let held = holdings(&batched, &orders).await;
    assert_eq!(held, holdings(&alone, &orders).await, "the same stock and reservations");
    assert_eq!(
        held.0,
        [level("p1", 0, 5), level("p2", 0, 3)],
        "a's 3 and e's 2 of p1, e's 3 of p2"
    );
    let statuses: Vec<Option<ReservationStatus>> = held.1.iter().map(|r| r.as_ref().map(|r| r.status)).collect();
    use ReservationStatus::{Rejected, Released, Reserved};
    assert_eq!(
        statuses,
        [
            Some(Reserved),
            Some(Rejected),
            Some(Released),
            Some(Rejected),
            Some(Reserved)
        ]
    );
}

#[tokio::test]
async fn a_batch_that_fits_is_granted_at_once_as_if_one_after_another() {
    let env = TestEnv::new().await;
    let names = &env.names;
    let (earlier_refused, earlier_granted) = (new_order_id(), new_order_id());
    let before: Vec<Message> = vec![
        order_created(names, &earlier_refused, &[("p1", 20)]),
        order_created(names, &earlier_granted, &[("p2", 1)]),
    ];
    let (a, b, c, d) = (new_order_id(), new_order_id(), new_order_id(), new_order_id());
    // The fresh orders want 6 of p1 and 5 of p2 between them, which the
    // stock holds: all are granted at once.
    let batch: Vec<Message> = vec![
        order_created(names, &a, &[("p1", 2)]),
        order_created(names, &b, &[("p1", 1), ("p2", 2)]),
        order_created(names, &earlier_refused, &[("p1", 1)]),
        order_created(names, &a, &[("p1", 2)]),
        order_created(names, &c, &[("p2", 3)]),
        order_created(names, &earlier_granted, &[("p2", 1)]),
        order_created(names, &d, &[("p1", 3)]),
    ];
    let keeper = StockKeeper::new(names.stock_update_exchange.clone());
    let seed = "p1=10,p2=10";

    let (store, batched) = inventory_in(&env, "fits_batched", seed).await;
    let (one_store, alone) = inventory_in(&env, "fits_one_by_one", seed).await;
    for store in [&store, &one_store] {
        let mut tx = store.begin().await.expect("begun");
        for command in &before {
            keeper.handle(tx.as_mut(), command).await.expect("handled");
        }
        tx.commit().await.expect("committed");
    }

    let commands: Vec<&Message> = batch.iter().collect();
    let in_batch = batched_and_one_by_one(&keeper, &store, &one_store, &commands).await;

    let outcome = outcomes(in_batch);
    let refused = Some("insufficient stock for `p1`: 10 available, 20 wanted".to_owned());
    let granted = Some((true, None));
    assert_eq!(
        outcome,
        [
            granted.clone(),
            granted.clone(),
            Some((false, refused)),
            granted.clone(),
            granted.clone(),
            granted.clone(),
            granted,
        ]
    );
    let orders = [a.as_str(), b.as_str(), c.as_str(), d.as_str(), earlier_refused.as_str()];
    let held = holdings(&batched, &orders).await;
    assert_eq!(held, holdings(&alone, &orders).await, "the same stock and reservations");
    assert_eq!(
        held.0,
        [level("p1", 4, 6), level("p2", 4, 6)],
        "a's 2, b's 1 and d's 3 of p1; the earlier 1, b's 2 and c's 3 of p2"
    );

    // A product nobody stocks: that order is refused, the others granted,
    // as one after another.
    let next: Vec<String> = (0..5).map(|_| new_order_id()).collect();
    let batch: Vec<Message> = next
        .iter()
        .enumerate()
        .map(|(n, order)| match n {
            2 => order_created(names, order, &[("p1", 1), ("unobtainium", 1)]),
            _ => order_created(names, order, &[("p2", 1)]),
        })
        .collect();
    let commands: Vec<&Message> = batch.iter().collect();
    let in_batch = batched_and_one_by_one(&keeper, &store, &one_store, &commands).await;
    let outcome: Vec<bool> = in_batch.iter().map(|r| r.as_ref().is_some_and(|r| r.success)).collect();
    assert_eq!(outcome, [true, true, false, true, true]);
    assert_eq!(
        in_batch[2].as_ref().and_then(|r| r.reason.as_deref()),
        Some("unknown product `unobtainium`")
    );
    let levels = batched.levels().await.expect("readable");
    assert_eq!(levels, alone.levels().await.expect("readable"), "the same stock");
    assert_eq!(
        levels,
        [level("p1", 4, 6), level("p2", 0, 10)],
        "p1 untouched, p2 four more"
    );
}

#[tokio::test]
async fn a_batch_of_new_orders_that_fits_is_granted_with_one_answer_each_in_order() {
    let env = TestEnv::new().await;
    let names = &env.names;
    let (a, b, c) = (new_order_id(), new_order_id(), new_order_id());
    // All new and all fit: the function answers them from its own decision
    // (no lookup of the recorded reservations), one answer per order, in order.
    let batch: Vec<Message> = vec![
        order_created(names, &a, &[("p1", 2)]),
        order_created(names, &b, &[("p2", 1), ("p1", 1)]),
        order_created(names, &c, &[("p2", 4)]),
    ];
    let keeper = StockKeeper::new(names.stock_update_exchange.clone());
    let seed = "p1=3,p2=5";
    let (store, batched) = inventory_in(&env, "new_batched", seed).await;
    let (one_store, alone) = inventory_in(&env, "new_one_by_one", seed).await;

    let commands: Vec<&Message> = batch.iter().collect();
    let in_batch = batched_and_one_by_one(&keeper, &store, &one_store, &commands).await;
    let order_ids: Vec<Option<&str>> = in_batch
        .iter()
        .map(|r| r.as_ref().map(|r| r.order_id.as_str()))
        .collect();
    assert_eq!(order_ids, [Some(a.as_str()), Some(b.as_str()), Some(c.as_str())]);
    assert_eq!(outcomes(in_batch), vec![Some((true, None)); 3]);
    let orders = [a.as_str(), b.as_str(), c.as_str()];
    let held = holdings(&batched, &orders).await;
    assert_eq!(held, holdings(&alone, &orders).await, "the same stock and reservations");
    assert_eq!(held.0, [level("p1", 0, 3), level("p2", 0, 5)], "every unit taken");

    // The same orders again (new message ids), now with nothing left: each is
    // answered with what was recorded, and nothing is taken twice.
    let again: Vec<Message> = vec![
        order_created(names, &c, &[("p2", 4)]),
        order_created(names, &a, &[("p1", 2)]),
    ];
    let commands: Vec<&Message> = again.iter().collect();
    let in_batch = batched_and_one_by_one(&keeper, &store, &one_store, &commands).await;
    assert_eq!(outcomes(in_batch), vec![Some((true, None)); 2]);
    assert_eq!(
        batched.levels().await.expect("readable"),
        [level("p1", 0, 3), level("p2", 0, 5)]
    );
}
