//! The inventory service's configuration, parsed once from environment
//! variables into typed values. A bad value is a [`ConfigError`] naming the
//! variable.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use order_service::config::{DEFAULT_LINGER, ListenAddr, Retention, SecretUrl, parse_linger};

/// The PostgreSQL URL used when `DATABASE_URL` is not set.
/// (The tables go to their own schema, `INVENTORY_SCHEMA`, so sharing the
/// `postgres` database is harmless.)
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The RabbitMQ URL used when `RABBITMQ_URL` is not set.
pub const DEFAULT_RABBITMQ_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The catalogue seeded when `INVENTORY_SEED` is not set (the same products
/// as the order service's embedded demo).
pub const DEFAULT_SEED: &str = "apple=100,banana=100,coffee=50,book=20,laptop=5";

/// A variable that does not hold a usable value (shared with the order service).
pub use order_service::ConfigError;

/// A PostgreSQL schema name: lower-case ASCII letters, digits and `_`,
/// starting with a letter or `_`, at most 63 bytes. Parsed, so it can be
/// spliced into DDL safely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaName(String);

impl SchemaName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SchemaName {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut chars = value.chars();
        let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if starts_well && rest_ok && value.len() <= 63 {
            Ok(Self(value.to_owned()))
        } else {
            Err(format!(
                "`{value}` is not a schema name (lower-case letters, digits and `_`, at most 63, not starting with a digit)"
            ))
        }
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self("inventory".to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The products and units the `stock` table is seeded with at start-up.
/// Seeding only adds products that are missing: a restart never resets stock.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Catalogue(Vec<(String, u32)>);

impl Catalogue {
    /// A catalogue of `(product id, units)`.
    pub fn new(entries: impl IntoIterator<Item = (impl Into<String>, u32)>) -> Self {
        Self(entries.into_iter().map(|(id, units)| (id.into(), units)).collect())
    }

    /// The entries, in the order given.
    pub fn entries(&self) -> &[(String, u32)] {
        &self.0
    }
}

impl FromStr for Catalogue {
    type Err = String;

    /// `p1=100,p2=5`: product ids (no `=` or `,`, not blank), units 0 ..= 2^31-1;
    /// each product once. Blank entries are ignored.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut entries: Vec<(String, u32)> = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((product, units)) = entry.split_once('=') else {
                return Err(format!("`{entry}` is not `product=units`"));
            };
            let product = product.trim();
            if product.is_empty() || product.len() > 128 {
                return Err(format!("`{entry}`: the product id must be 1 to 128 bytes"));
            }
            let units: u32 = units
                .trim()
                .parse()
                .ok()
                .filter(|u| i32::try_from(*u).is_ok())
                .ok_or_else(|| format!("`{entry}`: units must be a whole number from 0 to 2147483647"))?;
            if entries.iter().any(|(p, _)| p == product) {
                return Err(format!("product `{product}` appears twice"));
            }
            entries.push((product.to_owned(), units));
        }
        Ok(Self(entries))
    }
}

/// Exchange and queue names. The exchanges are the platform's (fanout,
/// durable); the queues belong to this service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventoryNames {
    /// Where `OrderCreated` is published (`ORDERS_EXCHANGE`).
    pub orders_exchange: String,
    /// Where `OrderCancelled` is published (`ORDER_CANCELLED_EXCHANGE`).
    pub order_cancelled_exchange: String,
    /// Where `StockUpdateResult` replies go (`STOCK_UPDATE_EXCHANGE`).
    pub stock_update_exchange: String,
    /// The durable queue bound to the orders exchange (`INVENTORY_ORDERS_QUEUE`).
    pub orders_queue: String,
    /// The durable queue bound to the cancellations exchange (`INVENTORY_CANCELLED_QUEUE`).
    pub cancelled_queue: String,
}

impl InventoryNames {
    /// The exchanges of the order service's `wire` names, with this
    /// service's own queues.
    pub fn beside(wire: &order_service::wire::WireNames, orders_queue: String, cancelled_queue: String) -> Self {
        Self {
            orders_exchange: wire.orders_exchange.clone(),
            order_cancelled_exchange: wire.order_cancelled_exchange.clone(),
            stock_update_exchange: wire.stock_update_exchange.clone(),
            orders_queue,
            cancelled_queue,
        }
    }
}

impl Default for InventoryNames {
    fn default() -> Self {
        Self::beside(
            &order_service::wire::WireNames::default(),
            "product_service_orders_queue".to_owned(),
            "product_service_order_cancelled_queue".to_owned(),
        )
    }
}

/// Everything the inventory service needs to start.
#[derive(Clone, Debug)]
pub struct InventoryConfig {
    /// `DATABASE_URL`.
    pub database_url: SecretUrl,
    /// `RABBITMQ_URL`.
    pub rabbitmq_url: SecretUrl,
    /// `INVENTORY_SCHEMA` (default `inventory`): the schema holding the
    /// stock tables and this service's saga store (inbox, outbox).
    pub schema: SchemaName,
    /// `INVENTORY_SEED` (default [`DEFAULT_SEED`]).
    pub seed: Catalogue,
    /// Exchange and queue names.
    pub names: InventoryNames,
    /// `INVENTORY_CONCURRENCY` (default 64): messages handled at once per
    /// queue. Those in flight together share transactions (up to
    /// [`batch`](Self::batch) each), so near the machine's limit more of
    /// them mean fewer, larger ones (16 held the load test's closed loop at
    /// 2,371–2,374 sagas/s, orders queueing for the stock; 48 gave
    /// 2,481–2,482; docs/performance.md).
    pub concurrency: usize,
    /// `INVENTORY_BATCH` (default 32): commands that arrive together share
    /// a transaction, this many at most (1: each its own).
    pub batch: usize,
    /// `INVENTORY_LINGER` (default `1ms`, `0` never waits): how long a
    /// transaction that would carry one command waits for another (it goes
    /// as soon as one has), while
    /// commands arrive that densely, or faster than transactions finish
    /// (`CommandBatching::linger`).
    pub linger: Duration,
    /// `INVENTORY_METRICS_PORT` (`:port` or `host:port`; unset by default):
    /// where `/metrics` is served, if anywhere.
    pub metrics: Option<ListenAddr>,
    /// `INBOX_RETENTION`, `SENT_MESSAGE_RETENTION` and `RETENTION_INTERVAL`,
    /// as for the order service (`FINISHED_SAGA_RETENTION` is accepted and
    /// has nothing to delete: a participant keeps no saga instances).
    pub retention: Retention,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            database_url: SecretUrl::new(DEFAULT_DATABASE_URL),
            rabbitmq_url: SecretUrl::new(DEFAULT_RABBITMQ_URL),
            schema: SchemaName::default(),
            seed: DEFAULT_SEED.parse().unwrap_or_default(),
            names: InventoryNames::default(),
            concurrency: 64,
            batch: 32,
            linger: DEFAULT_LINGER,
            metrics: None,
            retention: Retention::default(),
        }
    }
}

impl InventoryConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        order_service::config::from_process_env(|lookup| Self::from_lookup(lookup))
    }

    /// Reads variables through `lookup` (unset and blank are the same).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let defaults = Self::default();
        let url = |variable: &'static str, schemes: &[&str], default: SecretUrl| match get(variable) {
            None => Ok(default),
            Some(value) if schemes.iter().any(|s| value.starts_with(&format!("{s}://"))) => Ok(SecretUrl::new(value)),
            Some(_) => Err(ConfigError::new(
                variable,
                format_args!("expected a {} URL", schemes.join(":// or ") + "://"),
            )),
        };
        let name = |variable: &'static str, default: String| match get(variable) {
            None => Ok(default),
            Some(value) if value.len() <= 255 && !value.contains(char::is_whitespace) => Ok(value),
            Some(_) => Err(ConfigError::new(
                variable,
                "expected a name without spaces, at most 255 bytes",
            )),
        };
        let count = |variable: &'static str, default: usize| match get(variable) {
            None => Ok(default),
            Some(value) => value
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| ConfigError::new(variable, "expected a number from 1 to 256")),
        };
        let names = InventoryNames {
            orders_exchange: name("ORDERS_EXCHANGE", defaults.names.orders_exchange)?,
            order_cancelled_exchange: name("ORDER_CANCELLED_EXCHANGE", defaults.names.order_cancelled_exchange)?,
            stock_update_exchange: name("STOCK_UPDATE_EXCHANGE", defaults.names.stock_update_exchange)?,
            orders_queue: name("INVENTORY_ORDERS_QUEUE", defaults.names.orders_queue)?,
            cancelled_queue: name("INVENTORY_CANCELLED_QUEUE", defaults.names.cancelled_queue)?,
        };
        if names.orders_queue == names.cancelled_queue {
            return Err(ConfigError::new(
                "INVENTORY_CANCELLED_QUEUE",
                "must differ from INVENTORY_ORDERS_QUEUE",
            ));
        }
        Ok(Self {
            database_url: url("DATABASE_URL", &["postgres", "postgresql"], defaults.database_url)?,
            rabbitmq_url: url("RABBITMQ_URL", &["amqp", "amqps"], defaults.rabbitmq_url)?,
            schema: match get("INVENTORY_SCHEMA") {
                None => defaults.schema,
                Some(value) => value.parse().map_err(|e| ConfigError::new("INVENTORY_SCHEMA", e))?,
            },
            seed: match get("INVENTORY_SEED") {
                None => defaults.seed,
                Some(value) => value.parse().map_err(|e| ConfigError::new("INVENTORY_SEED", e))?,
            },
            concurrency: count("INVENTORY_CONCURRENCY", defaults.concurrency)?,
            batch: count("INVENTORY_BATCH", defaults.batch)?,
            linger: match get("INVENTORY_LINGER") {
                None => defaults.linger,
                Some(value) => parse_linger(value.trim()).map_err(|why| ConfigError::new("INVENTORY_LINGER", why))?,
            },
            metrics: get("INVENTORY_METRICS_PORT")
                .map(|value| ListenAddr::parse("INVENTORY_METRICS_PORT", value.trim()))
                .transpose()?,
            retention: Retention::from_lookup(get)?,
            names,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<InventoryConfig, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        InventoryConfig::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_are_loopback_and_the_platform_names() {
        let config = config(&[]).expect("defaults are valid");
        assert!(
            config
                .database_url
                .expose()
                .starts_with("postgres://postgres@127.0.0.1:5432/")
        );
        assert_eq!(config.rabbitmq_url.expose(), DEFAULT_RABBITMQ_URL);
        assert_eq!(config.names.orders_exchange, "orders_exchange");
        assert_eq!(config.schema.as_str(), "inventory");
        assert_eq!(config.seed.entries().len(), 5);
        assert_eq!((config.concurrency, config.batch), (64, 32));
    }

    #[test]
    fn metrics_are_served_only_where_asked() {
        assert_eq!(config(&[]).expect("defaults").metrics, None);
        let config = config(&[("INVENTORY_METRICS_PORT", ":9005")]).expect("valid");
        assert_eq!(config.metrics, Some(ListenAddr::any(9005)));
    }

    #[test]
    fn a_batch_of_one_turns_batching_off() {
        let config = config(&[("INVENTORY_BATCH", " 1 ")]).expect("valid");
        assert_eq!(config.batch, 1);
    }

    #[test]
    fn the_linger_defaults_to_a_millisecond_and_zero_turns_it_off() {
        assert_eq!(config(&[]).expect("defaults").linger, Duration::from_millis(1));
        let off = config(&[("INVENTORY_LINGER", "0")]).expect("valid");
        assert_eq!(off.linger, Duration::ZERO);
        for bad in ["1", "1s", "often"] {
            let error = config(&[("INVENTORY_LINGER", bad)]).expect_err(bad);
            assert_eq!(error.variable, "INVENTORY_LINGER", "{bad}");
        }
    }

    #[test]
    fn seed_is_parsed() {
        let config = config(&[("INVENTORY_SEED", "p1=100, p2=5")]).expect("valid");
        assert_eq!(config.seed, Catalogue::new([("p1", 100), ("p2", 5)]));
    }

    #[test]
    fn retention_reads_the_order_service_variables() {
        let config = config(&[("SENT_MESSAGE_RETENTION", "0"), ("RETENTION_INTERVAL", "10m")]).expect("valid");
        assert_eq!(config.retention.store.sent_messages, std::time::Duration::ZERO);
        assert_eq!(config.retention.interval, std::time::Duration::from_secs(600));
        assert_eq!(config.retention.store.inbox, Retention::default().store.inbox);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (variable, value) in [
            ("INVENTORY_SEED", "p1=lots"),
            ("INVENTORY_SEED", "p1=1,p1=2"),
            ("INVENTORY_SEED", "=3"),
            ("INVENTORY_SEED", "p1=4294967295"),
            ("INVENTORY_SCHEMA", "Robert'); DROP TABLE stock;--"),
            ("DATABASE_URL", "mysql://x"),
            ("RABBITMQ_URL", "http://x"),
            ("INVENTORY_CONCURRENCY", "0"),
            ("INVENTORY_BATCH", "257"),
            ("INVENTORY_METRICS_PORT", "metrics"),
            ("ORDERS_EXCHANGE", "two words"),
            ("INBOX_RETENTION", "5m"),
            ("RETENTION_INTERVAL", "soon"),
        ] {
            let error = config(&[(variable, value)]).expect_err(value);
            assert_eq!(error.variable, variable, "{value}");
        }
    }

    #[test]
    fn secrets_are_not_in_errors() {
        let error = config(&[("RABBITMQ_URL", "http://user:hunter2@host")]).expect_err("invalid");
        assert!(!error.to_string().contains("hunter2"));
    }
}
