//! Scenarios 3 and 4: RabbitMQ and PostgreSQL go away under load and come
//! back; neither service is restarted. Both stop the backend for the whole
//! machine; their guards always start it again.

use tonic::Code;

use crate::backends::{BrokerOutage, PostgresOutage};
use crate::harness::Scenario;
use crate::ledger::{CONFIRMED, Expect, settle};
use crate::load::Load;
use crate::shop::{DRAIN, NO_DEADLINE, PATIENCE, RATE, Shop, basket};

/// Orders acknowledged before and after an outage.
const AROUND: usize = 12;

/// Orders acknowledged while RabbitMQ is away, at least.
const DURING_BROKER_OUTAGE: usize = 40;

/// How long RabbitMQ stays away, at least ("several seconds").
const BROKER_DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_taken_while_rabbitmq_is_down_and_drain_when_it_returns() {
    let scenario = Scenario::new("3. RabbitMQ outage", "broker_outage").await;
    let mut shop = Shop::open(&scenario, NO_DEADLINE).await;
    let load = Load::start(vec![shop.orders.channel()], RATE, basket);
    load.wait_for_accepted(AROUND, PATIENCE).await;

    let outage = BrokerOutage::begin().await;
    let started = tokio::time::Instant::now();
    // CreateOrder's whole critical path is the database: it keeps succeeding.
    load.wait_for_accepted(DURING_BROKER_OUTAGE, PATIENCE).await;
    tokio::time::sleep_until(started + BROKER_DOWN_FOR).await;
    let down_for = started.elapsed();
    outage.end().await;

    load.wait_for_accepted(AROUND, PATIENCE).await;
    // Counted over the whole run: a call that was slow during the outage
    // and failed after the broker returned counts too.
    let calls = load.stop().await;
    assert_eq!(
        calls.failures(),
        0,
        "CreateOrder failed while only RabbitMQ was down: {:?}",
        calls.failed
    );
    let expect = Expect {
        accepted: &calls.accepted,
        seed: Some(&shop.seed),
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    ledger.note(format!(
        "broker down {:.1} s; failed calls {:?}",
        down_for.as_secs_f64(),
        calls.failed
    ));
    shop.orders.assert_alive("riding out the broker outage");
    shop.inventory.assert_alive("riding out the broker outage");
    ledger.print_and_assert();
    assert_eq!(ledger.count(CONFIRMED), ledger.orders().len(), "{}", ledger.line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_answers_unavailable_and_loses_nothing_committed() {
    let scenario = Scenario::new("4. PostgreSQL restart", "postgres_restart").await;
    let mut shop = Shop::open(&scenario, NO_DEADLINE).await;
    let load = Load::start(vec![shop.orders.channel()], RATE, basket);
    load.wait_for_accepted(AROUND, PATIENCE).await;

    let outage = PostgresOutage::begin().await;
    let started = tokio::time::Instant::now();
    load.wait_for_failures(Code::Unavailable, 3, PATIENCE).await;
    let down_for = started.elapsed();
    outage.end().await;

    // Recovered without a restart.
    load.wait_for_accepted(AROUND, PATIENCE).await;
    let calls = load.stop().await;
    let unexpected: Vec<_> = calls
        .failed
        .keys()
        .filter(|code| code.as_str() != "Unavailable")
        .collect();
    assert!(
        unexpected.is_empty(),
        "calls failed otherwise than UNAVAILABLE: {:?}",
        calls.failed
    );
    let expect = Expect {
        accepted: &calls.accepted,
        seed: Some(&shop.seed),
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    ledger.note(format!(
        "PostgreSQL down {:.1} s; failed calls {:?}",
        down_for.as_secs_f64(),
        calls.failed
    ));
    shop.orders.assert_alive("riding out the database restart");
    shop.inventory.assert_alive("riding out the database restart");
    ledger.print_and_assert();
    assert_eq!(ledger.count(CONFIRMED), ledger.orders().len(), "{}", ledger.line());
}
