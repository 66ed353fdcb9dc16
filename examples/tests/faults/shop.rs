//! The platform slice most scenarios run: the inventory service seeded with
//! a few products, one order service, the probe queues, and the baskets the
//! load orders.

use std::time::Duration;

use order_service::proto::OrderItem;

use crate::amqp::declare_probes;
use crate::harness::Scenario;
use crate::ledger::Seed;
use crate::processes::{InventoryService, OrderService};

/// The products the inventory sells in these scenarios.
pub const PRODUCTS: [&str; 4] = ["p0", "p1", "p2", "p3"];

/// Orders per second of the steady load (a few dozen orders per scenario).
pub const RATE: u32 = 12;

/// How long anything may take before a scenario gives up waiting for it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How long a scenario may take to go quiet once the faults are over:
/// messages a killed relay had claimed wait for its lease (30 s) to run out.
pub const DRAIN: Duration = Duration::from_secs(120);

/// A reply timeout no scenario with a participant should reach.
pub const NO_DEADLINE: &str = "60s";

/// The reply timeout of the crash scenarios: ample for a participant that
/// answers, even one restarted after a kill, but short enough that a reply
/// held back by a dead process's claims for long would cancel its order.
pub const CRASH_DEADLINE: &str = "10s";

/// The `n`-th order: one or two of the products, one to three units each.
pub fn basket(n: u64) -> Vec<OrderItem> {
    let product = |k: u64| PRODUCTS[usize::try_from(k % 4).unwrap_or(0)].to_owned();
    let mut items = vec![OrderItem {
        product_id: product(n),
        quantity: i32::try_from(1 + n % 3).unwrap_or(1),
        price: 2.5,
    }];
    if n.is_multiple_of(2) {
        items.push(OrderItem {
            product_id: product(n + 1),
            quantity: 1,
            price: 10.25,
        });
    }
    items
}

/// The inventory (ample stock of [`PRODUCTS`]) and one order service, with
/// the probe queues declared first so no event is missed.
pub struct Shop {
    /// What the inventory was seeded with.
    pub seed: Seed,
    /// The participant.
    pub inventory: InventoryService,
    /// The orchestrator.
    pub orders: OrderService,
}

impl Shop {
    /// Starts the slice with `STOCK_REPLY_TIMEOUT=stock_reply_timeout`.
    pub async fn open(scenario: &Scenario, stock_reply_timeout: &str) -> Self {
        declare_probes(&scenario.amqp_url).await;
        let seed = Seed::uniform(&PRODUCTS, 100_000);
        let inventory = InventoryService::start(scenario, &seed.as_env()).await;
        let orders = OrderService::start(scenario, "order-service", stock_reply_timeout).await;
        Self {
            seed,
            inventory,
            orders,
        }
    }
}
