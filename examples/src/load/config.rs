//! What a load run does. Defaults are sized for a small machine and loopback
//! servers.

use std::path::PathBuf;
use std::time::Duration;

use order_service::config::{Retention, SecretUrl};

use super::competitor::Competing;

/// The PostgreSQL URL used when `DATABASE_URL` is not set. It is used to
/// create (and finally drop) a fresh database `saga_load_<random>`; the role
/// must be allowed to create databases. Without TLS: on loopback it would
/// only cost CPU (the local server offers it, and sqlx takes it when
/// offered), and the RabbitMQ connection is plain too.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

/// The RabbitMQ URL used when `RABBITMQ_URL` is not set.
pub const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How orders are offered.
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Each of the clients places an order, waits until its `OrderConfirmed`
    /// (or `OrderCancelled`) is seen, and places the next: maximum throughput
    /// at that concurrency.
    Closed,
    /// Orders are sent on a fixed schedule at each rate (orders per second)
    /// in turn, whatever the service's latency; at most `clients` `CreateOrder`
    /// calls are open at once, and latency counts from the scheduled time, so
    /// a late send is not hidden (no coordinated omission).
    Open {
        /// The offered rates, one run each.
        rates: Vec<f64>,
    },
}

/// Everything a load run needs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// PostgreSQL (`DATABASE_URL`): where the fresh database is created.
    pub database_url: SecretUrl,
    /// RabbitMQ (`RABBITMQ_URL`).
    pub rabbitmq_url: SecretUrl,
    /// An order service already running (`http://host:port`) instead of one
    /// started in this process. It and its participant must already use the
    /// platform's default exchange names and sell [`products`](Self::products);
    /// only the observer queues (and the scratch database and queue of the raw
    /// measurements) are created by the run.
    pub grpc_addr: Option<String>,
    /// The external order service's process id, for its CPU time and peak RSS.
    pub service_pid: Option<u32>,
    /// Closed or open loop.
    pub mode: Mode,
    /// Concurrent clients (closed loop), the cap on open `CreateOrder` calls
    /// (open loop), and the concurrency of the raw measurements.
    pub clients: usize,
    /// How long orders are offered in each run.
    pub duration: Duration,
    /// At most this many orders per run (`None`: as many as the duration allows).
    pub max_orders: Option<u64>,
    /// Orders placed (closed loop, and not measured) before the first run;
    /// the database is analyzed after seven eighths of them.
    pub warmup_orders: u64,
    /// How long each raw ceiling (PostgreSQL, RabbitMQ) is measured; `None` skips them.
    pub raw_duration: Option<Duration>,
    /// How long to wait after the last order for the events still due.
    pub drain_timeout: Duration,
    /// Products seeded (in-process inventory) and ordered round-robin, so
    /// orders do not all queue on one stock row lock.
    pub products: Vec<String>,
    /// Where `<timestamp>.json` (and the SVG plot) go; `None` writes nothing.
    pub results_dir: Option<PathBuf>,
    /// How the services started in this process purge their saga stores
    /// (the services' defaults, or `SENT_MESSAGE_RETENTION` and the other
    /// variables the services read).
    pub retention: Retention,
    /// Commands the in-process inventory lets share a transaction at most
    /// (its `INVENTORY_BATCH`).
    pub inventory_batch: usize,
    /// Deliveries the in-process inventory handles at once per queue (its
    /// `INVENTORY_CONCURRENCY`).
    pub inventory_concurrency: usize,
    /// Stock replies the in-process order service handles at once (its
    /// `STOCK_REPLY_CONCURRENCY`).
    pub stock_reply_concurrency: usize,
    /// How long both hosted services let a lone commit wait for company
    /// (their `COMMIT_LINGER` and `INVENTORY_LINGER`).
    pub linger: Duration,
    /// A process taking a share of one core beside the run, limits and
    /// floor included (`None`: nothing runs beside it).
    pub competing: Option<Competing>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            database_url: SecretUrl::new(DEFAULT_DATABASE_URL),
            rabbitmq_url: SecretUrl::new(DEFAULT_RABBITMQ_URL),
            grpc_addr: None,
            service_pid: None,
            mode: Mode::Closed,
            clients: 32,
            duration: Duration::from_secs(10),
            max_orders: None,
            warmup_orders: 2000,
            raw_duration: Some(Duration::from_secs(5)),
            drain_timeout: Duration::from_secs(30),
            products: (0..64).map(|i| format!("load-{i}")).collect(),
            results_dir: Some(PathBuf::from("results")),
            retention: Retention::default(),
            inventory_batch: crate::inventory::InventoryConfig::default().batch,
            inventory_concurrency: crate::inventory::InventoryConfig::default().concurrency,
            stock_reply_concurrency: order_service::config::DEFAULT_STOCK_REPLY_CONCURRENCY,
            linger: order_service::config::DEFAULT_LINGER,
            competing: None,
        }
    }
}

impl LoadConfig {
    /// Checks the settings that would make a run meaningless.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 || self.clients > 4096 {
            return Err("clients must be from 1 to 4096".to_owned());
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return Err("duration must be more than 0 and at most an hour".to_owned());
        }
        if self.products.is_empty() {
            return Err("at least one product is needed".to_owned());
        }
        if let Some(competing) = &self.competing {
            competing.validate()?;
        }
        if let Mode::Open { rates } = &self.mode {
            if rates.is_empty() {
                return Err("open loop needs at least one rate".to_owned());
            }
            if let Some(bad) = rates.iter().find(|r| !r.is_finite() || **r <= 0.0 || **r > 1_000_000.0) {
                return Err(format!(
                    "rate {bad} is not a number of orders per second from 0 to 1000000"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(LoadConfig::default().validate(), Ok(()));
    }

    #[test]
    fn meaningless_settings_are_refused() {
        let open = |rates: Vec<f64>| LoadConfig {
            mode: Mode::Open { rates },
            ..LoadConfig::default()
        };
        assert!(open(vec![]).validate().is_err());
        assert!(open(vec![f64::NAN]).validate().is_err());
        assert!(open(vec![-1.0]).validate().is_err());
        let none = LoadConfig {
            clients: 0,
            ..LoadConfig::default()
        };
        assert!(none.validate().is_err());
    }
}
