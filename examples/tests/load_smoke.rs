//! A CI-sized run of the load benchmark: a few seconds at a low rate against
//! real PostgreSQL and RabbitMQ, asserting only that every saga completed
//! (each order's `OrderConfirmed` consumed), never a speed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use order_service::config::SecretUrl;
use saga_examples::load::competitor::{Competing, Competitor};
use saga_examples::load::{self, DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, LoadConfig, Mode};

const ORDERS: u64 = 20;

/// A competing process spinning `share` of every 10 ms: the load test's binary.
fn competing(share: f64) -> Competing {
    Competing {
        share,
        program: PathBuf::from(env!("CARGO_BIN_EXE_load-test")),
    }
}

#[test]
fn a_competing_process_takes_its_share_of_a_core_and_stops_when_dropped() {
    let competitor = Competitor::start(&competing(0.5)).expect("the load test's binary starts");
    let pid = competitor.pid();
    std::thread::sleep(Duration::from_secs(2));
    let used = competitor.cpu_time().expect("its CPU time is readable on Linux");
    // Half of 2 s is 1 s. A busy machine (the smoke run beside this test
    // spins its own) gives it less; it never spins more.
    assert!(
        used >= Duration::from_millis(50) && used <= Duration::from_millis(1500),
        "spun {used:?} of 2 s at half a core"
    );
    drop(competitor);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the competing process is gone once dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saga_of_a_small_run_is_confirmed() {
    let results = std::env::temp_dir().join(format!("saga_load_smoke_{}", uuid::Uuid::new_v4().simple()));
    let config = LoadConfig {
        database_url: SecretUrl::new(std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())),
        rabbitmq_url: SecretUrl::new(std::env::var("RABBITMQ_URL").unwrap_or_else(|_| DEFAULT_RABBITMQ_URL.to_owned())),
        mode: Mode::Open { rates: vec![10.0] },
        clients: 4,
        duration: Duration::from_secs(2),
        max_orders: Some(ORDERS),
        // A few, so the warm-up and the ANALYZE after it run too.
        warmup_orders: 5,
        raw_duration: Some(Duration::from_millis(500)),
        drain_timeout: Duration::from_secs(20),
        products: vec!["smoke-a".to_owned(), "smoke-b".to_owned()],
        results_dir: Some(results.clone()),
        // Starts and stops with the run; recorded in its result.
        competing: Some(competing(0.2)),
        ..LoadConfig::default()
    };
    let report = tokio::time::timeout(Duration::from_secs(180), load::run(config))
        .await
        .expect("the smoke run finishes within 3 minutes")
        .unwrap_or_else(|error| panic!("the load smoke run could not run: {error}"));

    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    assert_eq!(run.sent, ORDERS, "every order is accepted:\n{}", report.render());
    assert!(
        run.all_confirmed(),
        "every saga is seen confirmed through its OrderConfirmed event:\n{}",
        report.render()
    );
    let ceiling = report.ceiling.as_ref().expect("the raw ceilings are measured");
    for figure in [&ceiling.postgres_commits, &ceiling.rabbitmq_messages] {
        assert_eq!(
            figure.measured_per_second.len(),
            2,
            "before and after the runs: {figure:?}"
        );
        assert!(figure.per_second > 0.0, "{figure:?}");
    }
    assert!(
        run.ratio_of_ceiling.is_some_and(|r| r > 0.0),
        "the run is compared with the ceiling"
    );
    let floor = report.latency_floor.as_ref().expect("the latency floor is measured");
    for part in [&floor.postgres_commit, &floor.rabbitmq_hop] {
        assert!(
            part.operations > 0 && part.ms.p50 > 0.0 && part.ms.p50 <= part.ms.p99,
            "{floor:?}"
        );
    }
    // No saga is quicker than its three commits and three hops in turn.
    assert!(
        run.median_over_floor.is_some_and(|m| m > 1.0),
        "the median saga is compared with the floor: {:?} over {floor:?}",
        run.median_over_floor
    );
    let legs = run
        .legs
        .as_ref()
        .unwrap_or_else(|| panic!("the legs are read off the run's database:\n{}", report.render()));
    assert_eq!(
        legs.sagas, ORDERS,
        "each saga of the run is found in both services' tables"
    );
    // Clocks stamp milliseconds: a leg may read up to 1 ms below zero.
    let outer = |leg: &Option<load::Percentiles>| {
        leg.clone()
            .unwrap_or_else(|| panic!("the load generator's times join the database's: {legs:?}"))
    };
    let (to_start, to_confirmation) = (outer(&legs.to_start_ms), outer(&legs.to_confirmation_ms));
    for leg in [
        &to_start,
        &legs.to_inventory_ms,
        &legs.in_inventory_ms,
        &legs.back_to_order_service_ms,
        &to_confirmation,
    ] {
        assert!(leg.p50 >= -1.0 && leg.p50 <= leg.p99 && leg.p99 <= leg.max, "{legs:?}");
    }
    assert!(
        legs.start_to_decision_ms.p50 > 0.0 && legs.start_to_decision_ms.max <= run.latency_ms.max,
        "the legs together end before the confirmation is seen: {legs:?}, {:?}",
        run.latency_ms
    );

    let written = report.write(&results).expect("the report is written");
    let json = std::fs::read_to_string(&written[0]).expect("the JSON is readable");
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("the JSON parses");
    assert_eq!(parsed["runs"][0]["confirmed"], ORDERS);
    assert_eq!(parsed["competing_cpu"], 0.2);
    assert!(report.render().contains("a process spun 20 % of every 10 ms"));
    assert_eq!(parsed["runs"][0]["legs"]["sagas"], ORDERS);
    // Recorded whether or not the clock was stepped (then it is about 0).
    assert!(
        parsed["runs"][0]["system_clock_step_ms"].as_f64().is_some(),
        "{}",
        parsed["runs"][0]
    );
    // The slowest sagas' windows are lined up with the machine's counters.
    let slowest = &parsed["runs"][0]["legs"]["slowest"];
    assert!(
        slowest["first_sent_unix_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{slowest}"
    );
    if cfg!(target_os = "linux") {
        for figures in [&slowest["bursts"][0]["machine"], &slowest["typical_machine"]] {
            assert!(figures["disk_written_mib"].as_f64().is_some(), "{slowest}");
        }
    }
    assert!(
        parsed["latency_floor"]["saga_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{}",
        parsed["latency_floor"]
    );
    // The server's own analyses and the kernel's writeback shape the tail:
    // the result says how they were set.
    let autovacuum = &parsed["tail_settings"]["postgres"]["autovacuum"];
    assert!(autovacuum == "on" || autovacuum == "off", "{}", parsed["tail_settings"]);
    if cfg!(target_os = "linux") {
        assert!(
            parsed["tail_settings"]["kernel"]["dirty_expire_centisecs"].is_u64(),
            "{}",
            parsed["tail_settings"]
        );
    }
    let _ = std::fs::remove_dir_all(&results);
}
