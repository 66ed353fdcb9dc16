//! Scenario 5: replies as a misbehaving network and product service deliver
//! them — duplicated, reordered, contradicting, late, for orders nobody
//! knows, and not decodable at all — published straight to the stock update
//! exchange, with no participant running.

use std::collections::BTreeSet;

use order_service::proto::{CreateOrderRequest, OrderItem};
use saga_core::MessageId;

use crate::amqp::{RawPublisher, declare_probes, drain, names};
use crate::harness::{Scenario, eventually};
use crate::ledger::{CANCELLED, CONFIRMED, Expect, settle};
use crate::load::USER;
use crate::processes::OrderService;
use crate::shop::PATIENCE;

/// Places `count` orders and returns their ids.
pub async fn place_orders(service: &OrderService, count: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let request = CreateOrderRequest {
            user_id: USER.to_owned(),
            items: vec![OrderItem {
                product_id: "p0".to_owned(),
                quantity: 1,
                price: 3.0,
            }],
        };
        let order = service
            .client()
            .create_order(request)
            .await
            .expect("the order is placed")
            .into_inner()
            .order
            .expect("an order");
        ids.push(order.id);
    }
    ids
}

/// Waits until every order of `ids` has `status`.
pub async fn wait_for_status(scenario: &Scenario, ids: &[String], status: &str) {
    let db = scenario.db.clone();
    eventually(&format!("{} orders {status}", ids.len()), PATIENCE, || async {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM order_service.orders WHERE id::text = ANY($1) AND status = $2")
                .bind(ids)
                .bind(status)
                .fetch_one(&db)
                .await
                .ok()?;
        (usize::try_from(count).ok()? == ids.len()).then_some(())
    })
    .await;
}

/// Waits until the order service's reply queue is empty (nothing ready,
/// nothing being handled) and its dead-letter queue holds `dead` messages;
/// then takes them and returns their message ids.
pub async fn wait_for_dead_letters(scenario: &Scenario, dead: usize) -> BTreeSet<String> {
    let queue = names().stock_update_queue;
    let dlq = format!("{queue}.dlq");
    eventually(&format!("{queue} empty and {dead} dead letters"), PATIENCE, || async {
        let totals = scenario.queue_totals().await;
        let total = |name: &str| totals.get(name).copied().unwrap_or(0);
        (total(&queue) == 0 && total(&dlq) == dead as u64).then_some(())
    })
    .await;
    drain(&scenario.amqp_url, &dlq)
        .await
        .into_iter()
        .map(|taken| taken.message_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_reordered_contradicting_late_and_unknown_replies_decide_once() {
    let scenario = Scenario::new(
        "5. duplicate, reordered, contradicting, late and unknown replies",
        "replies",
    )
    .await;
    declare_probes(&scenario.amqp_url).await;
    // Long enough for every answered order's replies to come in time on a
    // busy machine; the late ones wait for it.
    let service = OrderService::start(&scenario, "order-service", "10s").await;
    let replies = RawPublisher::connect(&scenario.amqp_url).await;
    let mut published = 0usize;

    let duplicated = place_orders(&service, 4).await;
    let contradicted = place_orders(&service, 4).await;
    let contradicted_backwards = place_orders(&service, 4).await;
    let reordered = place_orders(&service, 6).await;
    let late = place_orders(&service, 4).await;

    // The same reply three times under one message id, once more under another.
    for id in &duplicated {
        let message = MessageId::new();
        for _ in 0..3 {
            replies.reply(id, true, &message).await;
        }
        replies.reply(id, true, &MessageId::new()).await;
        published += 4;
    }
    // Success and failure back to back, either way round: the first committed decides.
    for (ids, first) in [(&contradicted, true), (&contradicted_backwards, false)] {
        for id in ids {
            replies.reply(id, first, &MessageId::new()).await;
            replies.reply(id, !first, &MessageId::new()).await;
            published += 2;
        }
    }
    // Answers in the reverse order of the orders, then every one again, in order.
    let reordered_ids: Vec<MessageId> = reordered.iter().map(|_| MessageId::new()).collect();
    for (id, message) in reordered.iter().zip(&reordered_ids).rev() {
        replies.reply(id, true, message).await;
    }
    for (id, message) in reordered.iter().zip(&reordered_ids) {
        replies.reply(id, true, message).await;
    }
    published += 2 * reordered.len();

    // Replies for orders nobody placed, and messages that are no reply at all.
    let mut dead = BTreeSet::new();
    let unknown = [
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string().to_uppercase(),
        "not-a-uuid".to_owned(),
        String::new(),
    ];
    for (n, order) in unknown.iter().enumerate() {
        let message = MessageId::new();
        replies.reply(order, n % 2 == 0, &message).await;
        dead.insert(message.to_string());
    }
    let wrong_shape_for_a_real_order = format!(r#"{{"order_id":"{}","success":"yes"}}"#, late[0]);
    let undecodable: [&[u8]; 8] = [
        b"not json",
        b"",
        &[0xff, 0xfe, 0x00, 0x80],
        b"null",
        b"[]",
        b"{}",
        br#"{"order_id":42,"success":true}"#,
        wrong_shape_for_a_real_order.as_bytes(),
    ];
    for body in undecodable {
        let message = MessageId::new();
        replies.reply_raw(body, &message).await;
        dead.insert(message.to_string());
    }
    published += dead.len();

    let answered: Vec<String> = [&duplicated, &contradicted, &contradicted_backwards, &reordered]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let db = scenario.db.clone();
    eventually("every answered order decided", PATIENCE, || async {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM order_service.orders WHERE id::text = ANY($1) AND status = 'PENDING'",
        )
        .bind(&answered)
        .fetch_one(&db)
        .await
        .ok()?;
        (pending == 0).then_some(())
    })
    .await;
    // Nobody answered these in time: the deadline cancels them; then both answers arrive.
    wait_for_status(&scenario, &late, CANCELLED).await;
    for id in &late {
        replies.reply(id, true, &MessageId::new()).await;
        replies.reply(id, false, &MessageId::new()).await;
        published += 2;
    }
    replies.close().await;

    let dead_lettered = wait_for_dead_letters(&scenario, dead.len()).await;
    assert_eq!(
        dead_lettered, dead,
        "exactly the unknown and undecodable messages are dead-lettered"
    );

    let accepted: Vec<String> = answered.iter().chain(&late).cloned().collect();
    let expect = Expect {
        accepted: &accepted,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, PATIENCE).await;
    ledger.note(format!(
        "{published} replies published, {} dead-lettered (unknown or undecodable)",
        dead_lettered.len()
    ));
    ledger.print_and_assert();
    for id in duplicated.iter().chain(&reordered) {
        assert_eq!(ledger.status(id), Some(CONFIRMED), "order {id}");
    }
    for id in &late {
        assert_eq!(ledger.status(id), Some(CANCELLED), "late order {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_sagas_in_flight_are_counted_from_the_store() {
    let scenario = Scenario::new("5b. sagas in flight across a restart", "in_flight_gauge").await;
    declare_probes(&scenario.amqp_url).await;
    let mut service = OrderService::start(&scenario, "order-service", "60s").await;
    let pending = place_orders(&service, 3).await;
    // A process's own count would start again from zero here.
    service.kill().await;
    service.restart().await;
    in_flight(&service, 3.0).await;
    let publisher = RawPublisher::connect(&scenario.amqp_url).await;
    for id in &pending {
        publisher.reply(id, true, &MessageId::new()).await;
    }
    publisher.close().await;
    wait_for_status(&scenario, &pending, CONFIRMED).await;
    in_flight(&service, 0.0).await;
    service.assert_alive("after the restart");
}

/// Waits until `service` shows `order_sagas_in_flight` at `expected`.
async fn in_flight(service: &OrderService, expected: f64) {
    let what = format!("order_sagas_in_flight {expected}");
    eventually(&what, PATIENCE, || async {
        (service.metric("order_sagas_in_flight").await? == expected).then_some(())
    })
    .await;
}
