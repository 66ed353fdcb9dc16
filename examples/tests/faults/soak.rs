//! The soak: steady load for `FAULT_SOAK` (e.g. `30m`) with one of the two
//! services killed (`kill -9`) and restarted at every `FAULT_SOAK_KILL_EVERY`
//! (default 20 s), alternating, then the same accounting as every scenario.
//! Without `FAULT_SOAK` (CI) it runs for a few seconds with one kill of each,
//! so the command keeps working.
//!
//! ```sh
//! FAULT_SOAK=30m cargo test -p saga-examples --test faults soak -- --nocapture
//! ```

use std::time::Duration;

use order_service::config::parse_duration;

use crate::harness::Scenario;
use crate::ledger::{CONFIRMED, Expect, settle};
use crate::load::Load;
use crate::shop::{DRAIN, RATE, Shop, basket};

/// The soak's length when `FAULT_SOAK` is not set.
const CI_SOAK: Duration = Duration::from_secs(6);

fn setting(variable: &str, default: Duration) -> Duration {
    match std::env::var(variable) {
        Ok(value) if !value.trim().is_empty() => {
            parse_duration(value.trim()).unwrap_or_else(|e| panic!("{variable}: {e}"))
        }
        _ => default,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_periodic_kills_loses_nothing() {
    let length = setting("FAULT_SOAK", CI_SOAK);
    let every = setting("FAULT_SOAK_KILL_EVERY", Duration::from_secs(20)).min(length / 3);
    let scenario = Scenario::new("soak: steady load, periodic kill -9", "soak").await;
    let mut shop = Shop::open(&scenario, "30s").await;
    let load = Load::start(vec![shop.orders.channel()], RATE, basket);
    let started = tokio::time::Instant::now();
    let mut kills = (0, 0);
    let mut next_kill = started + every;
    while next_kill < started + length {
        tokio::time::sleep_until(next_kill).await;
        if (kills.0 + kills.1) % 2 == 0 {
            shop.orders.kill().await;
            shop.orders.restart().await;
            kills.0 += 1;
        } else {
            shop.inventory.kill().await;
            shop.inventory.restart().await;
            kills.1 += 1;
        }
        next_kill += every;
    }
    tokio::time::sleep_until(started + length).await;
    let calls = load.stop().await;

    let expect = Expect {
        accepted: &calls.accepted,
        seed: Some(&shop.seed),
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, DRAIN).await;
    ledger.note(format!(
        "{:.0} s, {} order-service and {} inventory kills; failed calls {:?}",
        length.as_secs_f64(),
        kills.0,
        kills.1,
        calls.failed
    ));
    ledger.print_and_assert();
    assert_eq!(ledger.count(CONFIRMED), ledger.orders().len(), "{}", ledger.line());
}
