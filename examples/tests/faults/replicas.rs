//! Scenario 6: two and three order-service replicas on one database and one
//! virtual host (competing consumers on the reply queue, racing relays and
//! deadline scanners), one of them killed mid-stream for good. Some orders
//! are confirmed, some refused, and some never answered, so their reply
//! deadline decides them — once, whichever replica's scanner gets there.

use std::collections::HashMap;

use order_service::proto::OrderItem;
use sqlx::Row;

use crate::amqp::{Answer, TestParticipant, declare_probes};
use crate::harness::Scenario;
use crate::ledger::{CANCELLED, CONFIRMED, Expect, settle};
use crate::load::Load;
use crate::processes::OrderService;
use crate::shop::{DRAIN, PATIENCE, RATE};

/// Reply deadline of these replicas: short, so unanswered orders are decided
/// in the run, but longer than the relay lease (5 s), so an `OrderCreated`
/// the killed replica had claimed still gets its answer in time, with room
/// for a busy machine.
const TIMEOUT: &str = "15s";

/// Orders acknowledged before the kill, and after it.
const BEFORE_KILL: usize = 15;
const AFTER_KILL: usize = 20;

/// One order in five is for a product nobody answers for, one in five is refused.
fn basket(n: u64) -> Vec<OrderItem> {
    let product = match n % 5 {
        3 => "refused",
        4 => "ghost",
        _ => "apple",
    };
    vec![OrderItem {
        product_id: product.to_owned(),
        quantity: 1,
        price: 4.0,
    }]
}

fn script(product: &str) -> Answer {
    match product {
        "refused" => Answer::Refuse,
        "ghost" => Answer::Ignore,
        _ => Answer::Reserve,
    }
}

async fn replicas_with_one_killed(replicas: usize, title: &'static str, slug: &str) {
    let scenario = Scenario::new(title, slug).await;
    declare_probes(&scenario.amqp_url).await;
    let participant = TestParticipant::start(&scenario.amqp_url, script).await;
    let mut services = Vec::with_capacity(replicas);
    for n in 1..=replicas {
        services.push(OrderService::start(&scenario, &format!("order-service-{n}"), TIMEOUT).await);
    }
    let load = Load::start(services.iter().map(OrderService::channel).collect(), RATE, basket);
    load.wait_for_accepted(BEFORE_KILL, PATIENCE).await;
    // The last replica dies mid-stream and stays dead: its claims, deadlines
    // and the orders it took are the survivors' to finish.
    if let Some(victim) = services.last_mut() {
        victim.kill().await;
    }
    load.wait_for_accepted(AFTER_KILL, PATIENCE).await;
    let calls = load.stop().await;

    let expect = Expect {
        accepted: &calls.accepted,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    participant.stop().await;

    let products: HashMap<String, String> =
        sqlx::query("SELECT order_id::text AS id, product_id FROM order_service.order_items WHERE position = 0")
            .fetch_all(&scenario.db)
            .await
            .expect("the order items are readable")
            .iter()
            .map(|row| (row.get("id"), row.get("product_id")))
            .collect();
    let mut by_deadline = 0;
    for (id, status) in ledger.orders() {
        let product = products.get(id).map_or("", String::as_str);
        let expected = if product == "apple" { CONFIRMED } else { CANCELLED };
        assert_eq!(status, expected, "order {id} for `{product}`");
        by_deadline += usize::from(product == "ghost");
    }
    // Each deadline fired once, whichever replica's scanner got there: one
    // deadline transition per order its deadline decided, none for the others.
    let fired: HashMap<String, i64> = sqlx::query(
        "SELECT saga_id::text AS id, count(*) AS fired FROM public.saga_history \
         WHERE cause->>'type' = 'deadline' GROUP BY saga_id",
    )
    .fetch_all(&scenario.db)
    .await
    .expect("the saga history is readable")
    .iter()
    .map(|row| (row.get("id"), row.get("fired")))
    .collect();
    for (id, times) in &fired {
        let product = products.get(id).map_or("", String::as_str);
        assert_eq!(
            (*times, product),
            (1, "ghost"),
            "order {id}: deadlines fired {times} time(s) for `{product}`"
        );
    }
    assert_eq!(
        fired.len(),
        by_deadline,
        "every unanswered order decided by its deadline, once"
    );
    for alive in &mut services[..replicas - 1] {
        alive.assert_alive("finishing the killed replica's work");
    }
    ledger.note(format!(
        "{replicas} replicas, 1 killed; {by_deadline} decided by their deadline; failed calls {:?}",
        calls.failed
    ));
    ledger.print_and_assert();
    assert!(by_deadline > 0, "no order was left to its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_killed_decide_every_order_once() {
    replicas_with_one_killed(2, "6a. two replicas, one killed", "two_replicas").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_killed_decide_every_order_once() {
    replicas_with_one_killed(3, "6b. three replicas, one killed", "three_replicas").await;
}
