//! Start-up wiring: the pool on the inventory schema (migrated and seeded),
//! the saga store, the RabbitMQ topology, the participant's two consumers
//! and the outbox relay, all run until one cancellation token says stop.

use std::sync::Arc;
use std::time::Duration;

use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology, TracedHandler};
use saga_core::{
    CancellationToken, CommandBatching, Consumer, ConsumerConfig, Participant, Relay, RelayConfig, RetryPolicy,
};
use saga_postgres::{PostgresStore, PostgresStoreConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::config::InventoryConfig;
use super::keeper::{Inventory, StockKeeper};
use super::schema::{self, MigrateError};
use order_service::wire::{ORDER_CANCELLED, ORDER_CREATED};

/// The participant's inbox consumer name.
pub(crate) const PARTICIPANT: &str = "inventory-service";

/// How long shutdown waits for messages in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the inventory service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// PostgreSQL could not be reached: start it, check `DATABASE_URL`.
    #[error("PostgreSQL ({url}) is not reachable: {source}; start it or check DATABASE_URL")]
    Database {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// The tables could not be created or seeded: check the role's rights on
    /// the database and `INVENTORY_SCHEMA`.
    #[error("PostgreSQL ({url}): migrating schema `{schema}`: {source}")]
    Migrate {
        /// The URL, password masked.
        url: String,
        /// The schema.
        schema: String,
        /// The cause.
        #[source]
        source: MigrateError,
    },
    /// The metrics address could not be bound: free it or change
    /// `INVENTORY_METRICS_PORT`.
    #[error("INVENTORY_METRICS_PORT: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// RabbitMQ could not be reached or its topology declared: start it,
    /// check `RABBITMQ_URL` and the exchange and queue names.
    #[error("RabbitMQ ({url}): {source}; start it or check RABBITMQ_URL")]
    Broker {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: saga_amqp::AmqpError,
    },
}

/// How a queue is consumed: `concurrency` messages at once, untyped
/// messages taken for `kind`, and failures that may pass (the database is
/// away) retried through a restart ([`RetryPolicy::THROUGH_A_RESTART`],
/// about three minutes) before the message is dead-lettered. A PostgreSQL
/// restart must not turn an `OrderCreated` into a dead letter (its order
/// would time out) nor an `OrderCancelled` (its stock would stay reserved
/// for good).
fn consumer_config(queue: &str, kind: &str, concurrency: usize) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(queue).with_default_kind(kind);
    config.concurrency = concurrency;
    config.retry = RetryPolicy::THROUGH_A_RESTART;
    config
}

/// A built, not yet running, inventory service.
pub struct InventoryService {
    inventory: Inventory,
    store: PostgresStore,
    transport: Arc<AmqpTransport>,
    relay: Relay,
    consumers: Vec<Consumer>,
    retention_interval: Duration,
    /// `/metrics`, bound, if asked for.
    metrics: Option<(TcpListener, u16)>,
}

impl InventoryService {
    /// Connects to PostgreSQL (migrating and seeding the inventory schema)
    /// and RabbitMQ (declaring the exchanges, queues and bindings).
    pub async fn build(config: InventoryConfig) -> Result<Self, InventoryError> {
        // First: a taken port fails at once, before any connection is made.
        let metrics = match &config.metrics {
            Some(addr) => {
                let bound = addr.bind().await.map_err(|source| InventoryError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                tracing::info!(%addr, port = bound.1, "serving /metrics");
                Some(bound)
            }
            None => None,
        };
        let url = config.database_url.to_string();
        tracing::info!(database = %config.database_url, broker = %config.rabbitmq_url, schema = %config.schema, "connecting");
        let pool = schema::pool(config.database_url.expose(), &config.schema)
            .await
            .map_err(|source| InventoryError::Database {
                url: url.clone(),
                source,
            })?;
        schema::migrate(&pool, &config.schema, &config.seed)
            .await
            .map_err(|source| InventoryError::Migrate {
                url,
                schema: config.schema.to_string(),
                source,
            })?;
        let store = PostgresStore::with_config(
            pool.clone(),
            PostgresStoreConfig {
                notify_channel: format!("{}_outbox", config.schema),
                retention: config.retention.store.clone(),
                ..PostgresStoreConfig::default()
            },
        );

        let names = &config.names;
        let topology = Topology::new()
            .exchange(&names.orders_exchange, ExchangeKind::Fanout)
            .exchange(&names.order_cancelled_exchange, ExchangeKind::Fanout)
            .exchange(&names.stock_update_exchange, ExchangeKind::Fanout)
            .queue(&names.orders_queue)
            .queue(&names.cancelled_queue)
            .bind(&names.orders_exchange, &names.orders_queue, "")
            .bind(&names.order_cancelled_exchange, &names.cancelled_queue, "");
        let mut amqp = AmqpConfig::new(config.rabbitmq_url.expose(), topology);
        amqp.connection_name = PARTICIPANT.to_owned();
        let transport = Arc::new(
            AmqpTransport::connect(amqp)
                .await
                .map_err(|source| InventoryError::Broker {
                    url: config.rabbitmq_url.to_string(),
                    source,
                })?,
        );

        // One shared transaction at a time: its stock locks then never
        // wait on another batch of this replica's.
        let participant = Arc::new(
            Participant::new(
                PARTICIPANT,
                Arc::new(store.clone()),
                StockKeeper::new(names.stock_update_exchange.clone()),
            )
            .with_batching(CommandBatching::up_to(config.batch).with_linger(config.linger)),
        );
        let consumers = [
            (&names.orders_queue, ORDER_CREATED),
            (&names.cancelled_queue, ORDER_CANCELLED),
        ]
        .into_iter()
        .map(|(queue, kind)| {
            // The platform's publishers may leave the AMQP `type` unset;
            // each queue carries one type.
            let handler = Arc::new(TracedHandler::new(participant.clone()));
            Consumer::new(
                handler,
                transport.clone(),
                consumer_config(queue, kind, config.concurrency),
            )
        })
        .collect();
        let relay = Relay::new(Arc::new(store.clone()), transport.clone(), RelayConfig::default());
        tracing::info!("PostgreSQL migrated and seeded, RabbitMQ topology declared");
        Ok(Self {
            inventory: Inventory::new(pool),
            store,
            transport,
            relay,
            consumers,
            retention_interval: config.retention.interval,
            metrics,
        })
    }

    /// The bound port of `/metrics`, if it is served.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(_, port)| *port)
    }

    /// Reads of the stock and reservations.
    pub fn inventory(&self) -> Inventory {
        self.inventory.clone()
    }

    /// Consumes and relays until `shutdown` is cancelled, then lets the
    /// messages in flight finish (within a grace period) and closes the
    /// broker connection.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        if let Some((listener, _)) = self.metrics {
            // The process-wide recorder (the order service's): the consumer,
            // relay, participant batching and store metrics of this service.
            let prometheus = order_service::telemetry::prometheus();
            let render = move || {
                let prometheus = prometheus.clone();
                async move { order_service::telemetry::render(&prometheus) }
            };
            let http = axum::Router::new().route("/metrics", axum::routing::get(render));
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let serve = axum::serve(listener, http).with_graceful_shutdown(shutdown.cancelled_owned());
                if let Err(error) = serve.await {
                    tracing::error!(%error, "the metrics endpoint failed");
                }
            });
        }
        tasks.spawn(self.relay.run(shutdown.clone()));
        for consumer in self.consumers {
            tasks.spawn(consumer.run(shutdown.clone()));
        }
        {
            let store = self.store.clone();
            let (interval, shutdown) = (self.retention_interval, shutdown.clone());
            tasks.spawn(async move { store.run_retention(interval, shutdown).await });
        }
        tracing::info!("ready");
        shutdown.cancelled().await;
        tracing::info!("shutting down: finishing the messages in flight");
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(error) = joined {
                    tracing::error!(%error, "a background task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("work still in flight after {SHUTDOWN_GRACE:?}; abandoning it (it will be redelivered)");
        }
        self.transport.close().await;
        tracing::info!("stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_ride_out_a_database_restart_of_a_few_minutes() {
        let config = consumer_config("q", ORDER_CREATED, 4);
        assert_eq!(config.concurrency, 4);
        assert_eq!(config.default_kind.as_deref(), Some(ORDER_CREATED));
        let policy = config.retry;
        let mut waited = Duration::ZERO;
        let mut attempts = 1;
        while policy.allows_another(attempts) {
            waited += policy.backoff(attempts);
            attempts += 1;
        }
        assert!(waited >= Duration::from_secs(180), "dead-lettered after {waited:?}");
        assert!(waited <= Duration::from_secs(600), "retried for {waited:?}");
    }
}
