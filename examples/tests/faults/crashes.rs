//! Scenarios 1, 2 and 7: SIGKILL of the order service or of the inventory
//! participant under steady load, and a reply deadline that passes while the
//! order service is down.

use std::time::Duration;

use order_service::proto::{CreateOrderRequest, OrderItem};
use tonic::Code;

use crate::amqp::declare_probes;
use crate::harness::{Scenario, eventually};
use crate::ledger::{CANCELLED, CONFIRMED, Expect, Ledger, settle};
use crate::load::{Load, USER};
use crate::processes::OrderService;
use crate::shop::{CRASH_DEADLINE, DRAIN, PATIENCE, RATE, Shop, basket};

/// Kill-and-restart rounds per scenario.
const ROUNDS: usize = 2;

/// Orders acknowledged between faults.
const BETWEEN_FAULTS: usize = 12;

/// Calls sent at once just before a kill of the order service.
const IN_FLIGHT_AT_KILL: usize = 16;

/// How far into that burst the kill comes.
const KILL_INTO_BURST: Duration = Duration::from_millis(15);

/// How long the last restarted process may take to finish what the killed
/// one left: the messages it had claimed wait for the relay lease (5 s),
/// plus room for a busy machine. A reply lost or held back for long would
/// cancel its order at the reply deadline, which the ledger counts.
const RECOVERY: Duration = Duration::from_secs(15);

/// Everything flowed again soon after the last fault, not a reply deadline later.
fn assert_recovered(ledger: &Ledger) {
    assert!(
        ledger.quiet_in() <= RECOVERY,
        "quiet only {:?} after the load stopped (at most {RECOVERY:?}): {}",
        ledger.quiet_in(),
        ledger.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_order_service_mid_stream_loses_nothing() {
    let scenario = Scenario::new("1. kill -9 order-service mid-stream", "kill_order_service").await;
    let mut shop = Shop::open(&scenario, CRASH_DEADLINE).await;
    let mut load = Load::start(vec![shop.orders.channel()], RATE, basket);
    for _ in 0..ROUNDS {
        load.wait_for_accepted(BETWEEN_FAULTS, PATIENCE).await;
        // Calls in flight when it dies: some committed, their answer lost.
        load.burst(&shop.orders.channel(), IN_FLIGHT_AT_KILL);
        tokio::time::sleep(KILL_INTO_BURST).await;
        shop.orders.kill().await;
        // Calls fail while it is down (connection refused).
        load.wait_for_failures(Code::Unavailable, 2, PATIENCE).await;
        shop.orders.restart().await;
    }
    load.wait_for_accepted(BETWEEN_FAULTS, PATIENCE).await;
    let calls = load.stop().await;

    let expect = Expect {
        accepted: &calls.accepted,
        seed: Some(&shop.seed),
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    ledger.note(format!("{ROUNDS} kills; failed calls {:?}", calls.failed));
    ledger.print_and_assert();
    // Stock is ample: every order stored, acknowledged or not, is confirmed.
    assert_eq!(ledger.count(CONFIRMED), ledger.orders().len(), "{}", ledger.line());
    assert_recovered(&ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_inventory_participant_mid_stream_loses_no_stock() {
    let scenario = Scenario::new("2. kill -9 inventory-service mid-stream", "kill_inventory").await;
    let mut shop = Shop::open(&scenario, CRASH_DEADLINE).await;
    let load = Load::start(vec![shop.orders.channel()], RATE, basket);
    for _ in 0..ROUNDS {
        load.wait_for_accepted(BETWEEN_FAULTS, PATIENCE).await;
        shop.inventory.kill().await;
        // Orders are still taken while the participant is down.
        load.wait_for_accepted(RATE as usize / 2, PATIENCE).await;
        shop.inventory.restart().await;
    }
    load.wait_for_accepted(BETWEEN_FAULTS, PATIENCE).await;
    let calls = load.stop().await;
    assert_eq!(
        calls.failures(),
        0,
        "the order service refused calls: {:?}",
        calls.failed
    );

    let expect = Expect {
        accepted: &calls.accepted,
        seed: Some(&shop.seed),
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    ledger.note(format!("{ROUNDS} kills"));
    ledger.print_and_assert();
    assert_eq!(ledger.count(CONFIRMED), ledger.orders().len(), "{}", ledger.line());
    assert_recovered(&ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_deadline_that_passes_while_the_service_is_down_fires_after_restart() {
    const ORDERS: usize = 10;
    // Long enough that a slow restart's first scans come well inside it:
    // deadlines re-armed at the restart would take all of it.
    const TIMEOUT: Duration = Duration::from_secs(10);
    let scenario = Scenario::new("7. deadline after restart", "deadline_after_restart").await;
    declare_probes(&scenario.amqp_url).await;
    // Nobody answers OrderCreated.
    let mut service = OrderService::start(&scenario, "order-service", "10s").await;
    let mut accepted = Vec::new();
    for n in 0..ORDERS {
        let request = CreateOrderRequest {
            user_id: USER.to_owned(),
            items: vec![OrderItem {
                product_id: format!("nobody-sells-{n}"),
                quantity: 1,
                price: 1.0,
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
        accepted.push(order.id);
    }
    let last_placed = tokio::time::Instant::now();
    service.kill().await;
    // The deadlines pass while nothing runs.
    tokio::time::sleep_until(last_placed + TIMEOUT + Duration::from_millis(500)).await;

    service.restart().await;
    let serving = tokio::time::Instant::now();
    let db = scenario.db.clone();
    eventually("every order cancelled after the restart", PATIENCE, || async {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM order_service.orders WHERE status = 'PENDING'")
            .fetch_one(&db)
            .await
            .ok()?;
        (pending == 0).then_some(())
    })
    .await;
    let after_restart = serving.elapsed();

    let expect = Expect {
        accepted: &accepted,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, PATIENCE).await;
    ledger.note(format!(
        "all cancelled {:.2} s after the restarted service was SERVING (timeout {TIMEOUT:?})",
        after_restart.as_secs_f64()
    ));
    ledger.print_and_assert();
    assert_eq!(ledger.count(CANCELLED), ORDERS, "{}", ledger.line());
    // Promptly: the overdue deadlines fire at the first scans, not a full timeout later.
    assert!(
        after_restart < TIMEOUT,
        "the overdue deadlines took {after_restart:?} after the restart"
    );
}
