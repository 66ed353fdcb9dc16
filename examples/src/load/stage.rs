//! The scene of a run: a fresh database and broker names of its own, the
//! order and inventory services started in-process on runtimes of their own
//! (so their threads can be told apart), and the clean-up afterwards.

use std::time::{Duration, Instant};

use order_service::config::{Backend, ListenAddr, SecretUrl};
use order_service::wire::WireNames;
use order_service::{Application, Config};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{BoxError, CancellationToken};
use sqlx::Connection;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::config::LoadConfig;
use super::error::LoadError;
use crate::inventory::{Catalogue, InventoryConfig, InventoryNames, InventoryService};

/// The name given to the in-process order service's runtime threads; their
/// CPU time is read per thread under this name.
pub(crate) const ORDER_SERVICE_THREADS: &str = "order-service";

/// The name given to the in-process inventory's runtime threads.
pub(crate) const INVENTORY_THREADS: &str = "inventory";

/// The name lapin gives the I/O thread of each AMQP connection.
pub(crate) const AMQP_IO_THREADS: &str = "lapin-io-loop";

/// Units of each product seeded: enough never to run out.
const STOCK_PER_PRODUCT: u32 = 1_000_000_000;

/// How long connecting, starting and stopping may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// A fresh database and the names of this run.
pub(crate) struct Stage {
    admin_url: SecretUrl,
    /// RabbitMQ.
    pub rabbitmq_url: SecretUrl,
    database: String,
    /// The fresh database.
    pub database_url: SecretUrl,
    /// The order service's exchanges (and its reply queue).
    pub wire: WireNames,
    /// The inventory's names.
    pub inventory: InventoryNames,
    /// Whether the exchanges are this run's own (deleted at the end).
    own_exchanges: bool,
    /// The observer's queue bound to the `OrderConfirmed` exchange.
    pub confirmed_queue: String,
    /// The observer's queue bound to the `OrderCancelled` exchange.
    pub cancelled_queue: String,
    /// The raw broker measurement's exchange and queue.
    pub raw_exchange: String,
    /// See [`raw_exchange`](Self::raw_exchange).
    pub raw_queue: String,
}

impl Stage {
    /// Creates the database; fails saying what to start when PostgreSQL or
    /// RabbitMQ cannot be reached.
    pub(crate) async fn create(config: &LoadConfig) -> Result<Self, LoadError> {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let admin_url = config.database_url.clone();
        let unreachable = |source| LoadError::DatabaseUnreachable {
            url: admin_url.to_string(),
            source,
        };
        let mut conn = tokio::time::timeout(PATIENCE, sqlx::PgConnection::connect(admin_url.expose()))
            .await
            .map_err(|_| unreachable(sqlx::Error::PoolTimedOut))?
            .map_err(unreachable)?;
        let database = format!("saga_load_{suffix}");
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        created.map_err(|source| LoadError::Database {
            url: admin_url.to_string(),
            what: "creating the run's database".to_owned(),
            source,
        })?;
        let stage = Self::named(config, &suffix, database);
        // Probe the broker now, so an absent one is named before anything runs.
        if let Err(error) = stage.probe_broker().await {
            stage.clean_up().await;
            return Err(error);
        }
        Ok(stage)
    }

    fn named(config: &LoadConfig, suffix: &str, database: String) -> Self {
        let admin = config.database_url.expose();
        let (base, query) = match admin.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin, String::new()),
        };
        let base = base.rsplit_once('/').map_or(base, |(base, _)| base);
        let own_exchanges = config.grpc_addr.is_none();
        let wire = if own_exchanges {
            WireNames {
                orders_exchange: format!("orders_exchange_{suffix}"),
                stock_update_exchange: format!("stock_update_exchange_{suffix}"),
                stock_update_queue: format!("order_service_stock_update_queue_{suffix}"),
                order_confirmed_exchange: format!("order_confirmed_exchange_{suffix}"),
                order_cancelled_exchange: format!("order_cancelled_exchange_{suffix}"),
            }
        } else {
            WireNames::default()
        };
        Self {
            admin_url: config.database_url.clone(),
            rabbitmq_url: config.rabbitmq_url.clone(),
            database_url: SecretUrl::new(format!("{base}/{database}{query}")),
            database,
            inventory: InventoryNames::beside(
                &wire,
                format!("load_inventory_orders_{suffix}"),
                format!("load_inventory_cancelled_{suffix}"),
            ),
            wire,
            own_exchanges,
            confirmed_queue: format!("load_observe_confirmed_{suffix}"),
            cancelled_queue: format!("load_observe_cancelled_{suffix}"),
            raw_exchange: format!("load_raw_{suffix}"),
            raw_queue: format!("load_raw_{suffix}"),
        }
    }

    async fn probe_broker(&self) -> Result<(), LoadError> {
        let connect = saga_amqp::lapin::Connection::connect(self.rabbitmq_url.expose(), Default::default());
        let unreachable = |source: saga_core::BoxError| LoadError::BrokerUnreachable {
            url: self.rabbitmq_url.to_string(),
            source,
        };
        let conn = tokio::time::timeout(PATIENCE, connect)
            .await
            .map_err(|_| unreachable("no answer within 30 s".into()))?
            .map_err(|e| unreachable(Box::new(e)))?;
        let _ = conn.close(0, "probe".into()).await;
        Ok(())
    }

    /// Runs `work` on a connection of its own to the run's database, closed
    /// afterwards; an error names `what` was being done.
    pub(crate) async fn on_database<T>(
        &self,
        what: &str,
        work: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, LoadError> {
        let failed = |source| LoadError::Database {
            url: self.database_url.to_string(),
            what: what.to_owned(),
            source,
        };
        let mut conn = sqlx::PgConnection::connect(self.database_url.expose())
            .await
            .map_err(failed)?;
        let done = work(&mut conn).await.map_err(failed)?;
        conn.close().await.map_err(failed)?;
        Ok(done)
    }

    /// A transport of its own (named `connection_name` in RabbitMQ) with the
    /// raw measurements' scratch exchange and queue declared.
    pub(crate) async fn scratch_transport(&self, connection_name: &str) -> Result<AmqpTransport, LoadError> {
        let topology = Topology::new()
            .exchange(&self.raw_exchange, ExchangeKind::Fanout)
            .queue(&self.raw_queue)
            .bind(&self.raw_exchange, &self.raw_queue, "");
        let mut config = AmqpConfig::new(self.rabbitmq_url.expose(), topology);
        config.connection_name = connection_name.to_owned();
        AmqpTransport::connect(config)
            .await
            .map_err(|e| self.broker_failed("connecting")(Box::new(e)))
    }

    /// What a broker error is while `what` is being done.
    pub(crate) fn broker_failed(&self, what: &str) -> impl FnOnce(BoxError) -> LoadError + use<> {
        let (url, what) = (self.rabbitmq_url.to_string(), what.to_owned());
        move |source| LoadError::Broker { url, what, source }
    }

    /// Deletes the queues (with their dead-letter queues), this run's
    /// exchanges and the database. Best effort, bounded in time.
    pub(crate) async fn clean_up(&self) {
        let mut queues = vec![
            self.confirmed_queue.clone(),
            self.cancelled_queue.clone(),
            self.raw_queue.clone(),
        ];
        let mut exchanges = vec![self.raw_exchange.clone()];
        if self.own_exchanges {
            queues.extend([
                self.inventory.orders_queue.clone(),
                self.inventory.cancelled_queue.clone(),
                self.wire.stock_update_queue.clone(),
            ]);
            exchanges.extend([
                self.wire.orders_exchange.clone(),
                self.wire.stock_update_exchange.clone(),
                self.wire.order_confirmed_exchange.clone(),
                self.wire.order_cancelled_exchange.clone(),
            ]);
        }
        let broker = crate::broker::delete_topology(self.rabbitmq_url.expose(), &queues, &exchanges);
        if tokio::time::timeout(PATIENCE, broker).await.is_err() {
            tracing::warn!("the run's queues and exchanges could not all be deleted in time");
        }
        let database = async {
            let mut conn = sqlx::PgConnection::connect(self.admin_url.expose()).await.ok()?;
            let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
            let dropped = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await.ok();
            let _ = conn.close().await;
            dropped
        };
        if !matches!(tokio::time::timeout(PATIENCE, database).await, Ok(Some(_))) {
            tracing::warn!(database = %self.database, "the run's database could not be dropped");
        }
    }
}

/// A service running on a runtime of its own in this process.
struct Hosted {
    runtime: Runtime,
    shutdown: CancellationToken,
    running: JoinHandle<()>,
}

impl Hosted {
    /// Runs `service` on a runtime of its own; it gets the token that stops it.
    fn spawn<F>(threads: &str, service: impl FnOnce(CancellationToken) -> F) -> Result<Self, LoadError>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let runtime = Self::runtime(threads)?;
        let shutdown = CancellationToken::new();
        let running = runtime.spawn(service(shutdown.clone()));
        Ok(Self {
            runtime,
            shutdown,
            running,
        })
    }

    /// Waits for the hosted service to report that it started; stops it when
    /// it failed to, or did not say so within [`PATIENCE`].
    async fn started<T, E>(
        self,
        name: &str,
        started: tokio::sync::oneshot::Receiver<Result<T, E>>,
        failed: impl FnOnce(E) -> LoadError,
    ) -> Result<(Self, T), LoadError> {
        match tokio::time::timeout(PATIENCE, started).await {
            Ok(Ok(Ok(value))) => Ok((self, value)),
            outcome => {
                self.stop(name).await;
                Err(match outcome {
                    Ok(Ok(Err(error))) => failed(error),
                    _ => LoadError::Grpc {
                        addr: "in-process".to_owned(),
                        what: format!("{name} did not start within {PATIENCE:?}"),
                    },
                })
            }
        }
    }

    fn runtime(threads: &str) -> Result<Runtime, LoadError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(threads)
            .enable_all()
            .build()
            .map_err(|source| LoadError::Io {
                what: format!("starting the `{threads}` runtime"),
                source,
            })
    }

    /// Stops it as SIGTERM would, waits (bounded), and shuts its runtime down.
    async fn stop(self, what: &str) {
        self.shutdown.cancel();
        if tokio::time::timeout(PATIENCE, self.running).await.is_err() {
            tracing::warn!("{what} did not stop within {PATIENCE:?}");
        }
        let runtime = self.runtime;
        let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5))).await;
    }
}

/// The services under load: in-process, or an external order service.
pub(crate) struct Services {
    /// Where `CreateOrder` goes.
    pub grpc_addr: String,
    order: Option<Hosted>,
    inventory: Option<Hosted>,
}

impl Services {
    /// Starts the inventory (its queues must exist before orders are
    /// published), then the order service in production mode, and waits
    /// until the order service reports SERVING. With an external service,
    /// only waits for it.
    pub(crate) async fn start(config: &LoadConfig, stage: &Stage) -> Result<Self, LoadError> {
        let mut services = Self {
            grpc_addr: String::new(),
            order: None,
            inventory: None,
        };
        let started = services.start_all(config, stage).await;
        if let Err(error) = started {
            services.stop().await;
            return Err(error);
        }
        Ok(services)
    }

    async fn start_all(&mut self, config: &LoadConfig, stage: &Stage) -> Result<(), LoadError> {
        if let Some(addr) = &config.grpc_addr {
            self.grpc_addr = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
        } else {
            self.inventory = Some(start_inventory(config, stage).await?);
            let (hosted, port) = start_order_service(config, stage).await?;
            self.order = Some(hosted);
            self.grpc_addr = format!("http://127.0.0.1:{port}");
        }
        wait_until_serving(&self.grpc_addr).await
    }

    /// Stops what this run started: the order service first (it finishes
    /// its transitions in flight), then the inventory.
    pub(crate) async fn stop(self) {
        if let Some(order) = self.order {
            order.stop("the order service").await;
        }
        if let Some(inventory) = self.inventory {
            inventory.stop("the inventory service").await;
        }
    }
}

async fn start_inventory(config: &LoadConfig, stage: &Stage) -> Result<Hosted, LoadError> {
    let inventory = InventoryConfig {
        database_url: stage.database_url.clone(),
        rabbitmq_url: stage.rabbitmq_url.clone(),
        seed: Catalogue::new(config.products.iter().map(|p| (p.clone(), STOCK_PER_PRODUCT))),
        names: stage.inventory.clone(),
        retention: config.retention.clone(),
        batch: config.inventory_batch,
        concurrency: config.inventory_concurrency,
        linger: config.linger,
        ..InventoryConfig::default()
    };
    let (built, started) = tokio::sync::oneshot::channel();
    let hosted = Hosted::spawn(INVENTORY_THREADS, |shutdown| async move {
        match InventoryService::build(inventory).await {
            Ok(service) => {
                let _ = built.send(Ok(()));
                service.run_until_stopped(shutdown).await;
            }
            Err(error) => {
                let _ = built.send(Err(error));
            }
        }
    })?;
    let (hosted, ()) = hosted
        .started("the inventory service", started, |error| {
            LoadError::Inventory(Box::new(error))
        })
        .await?;
    Ok(hosted)
}

async fn start_order_service(config: &LoadConfig, stage: &Stage) -> Result<(Hosted, u16), LoadError> {
    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        backend: Backend::Production {
            database_url: stage.database_url.clone(),
            rabbitmq_url: stage.rabbitmq_url.clone(),
        },
        names: stage.wire.clone(),
        retention: config.retention.clone(),
        commit_linger: config.linger,
        stock_reply_concurrency: config.stock_reply_concurrency,
        ..Config::default()
    };
    let (built, started) = tokio::sync::oneshot::channel();
    let hosted = Hosted::spawn(ORDER_SERVICE_THREADS, |shutdown| async move {
        match Application::build(config).await {
            Ok(app) => {
                let _ = built.send(Ok(app.grpc_port()));
                if let Err(error) = app.run_until_stopped(shutdown).await {
                    tracing::error!(%error, "the order service failed");
                }
            }
            Err(error) => {
                let _ = built.send(Err(error));
            }
        }
    })?;
    hosted
        .started("the order service", started, |error| {
            LoadError::OrderService(Box::new(error))
        })
        .await
}

/// Connects to `addr` (bounded in time).
pub(crate) async fn connect(addr: &str) -> Result<Channel, LoadError> {
    let failed = |what: String| LoadError::Grpc {
        addr: addr.to_owned(),
        what,
    };
    Channel::from_shared(addr.to_owned())
        .map_err(|e| failed(format!("not a URI: {e}")))?
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .map_err(|e| failed(format!("cannot connect: {e}")))
}

/// Waits until gRPC health says SERVING (its database and broker are ready).
async fn wait_until_serving(addr: &str) -> Result<(), LoadError> {
    let channel = connect(addr).await?;
    let deadline = Instant::now() + PATIENCE * 2;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let request = HealthCheckRequest { service: String::new() };
        match HealthClient::new(channel.clone()).check(request).await {
            Ok(response) if response.get_ref().status() == ServingStatus::Serving => return Ok(()),
            Ok(response) => last = format!("{:?}", response.get_ref().status()),
            Err(status) => last = status.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(LoadError::Grpc {
        addr: addr.to_owned(),
        what: format!("not SERVING within {:?} (last: {last})", PATIENCE * 2),
    })
}
