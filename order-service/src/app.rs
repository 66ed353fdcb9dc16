//! Start-up wiring: picks the backends, builds the engine, relay, consumers,
//! deadline scanner, gRPC server and operations endpoints, and runs them
//! until one cancellation token says stop.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeConfig, ExchangeKind, Topology, TracedHandler};
use saga_core::memory::{InMemoryStore, InMemoryTransport};
use saga_core::{
    CancellationToken, Consumer, ConsumerConfig, EffectHandler, Engine, EngineConfig, Participant, Relay, RelayConfig,
    RetryPolicy, Store,
};
use saga_postgres::{PostgresStore, PostgresStoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::{self, AdminGrpc, AdminServer, DeadLetterSource, Operations};
use crate::config::{Backend, Config, ListenAddr, Retention, SecretUrl};
use crate::dashboard::{self, DashboardConfig};
use crate::demo_stock::{DEMO_CATALOGUE, DemoStock};
use crate::grpc::OrderGrpc;
use crate::orders::Orders;
use crate::proto;
use crate::proto::order_service_server::OrderServiceServer;
use crate::repository::{InMemoryOrders, PostgresOrders};
use crate::saga::{ORDER_SAGA, OrderEffect, OrderSagaConfig, order_saga};
use crate::telemetry::{self, TracedPublisher};
use crate::wire::{STOCK_UPDATE_RESULT, WireNames};

/// The queue the embedded demo stock service consumes (bound to the orders,
/// confirmed and cancelled exchanges).
pub const DEMO_STOCK_QUEUE: &str = "demo_stock_service_queue";

/// How long shutdown waits for gRPC calls in flight (long-lived streams such
/// as a health `Watch` would otherwise hold it forever).
const GRPC_DRAIN: Duration = Duration::from_secs(5);

/// How long an idle gRPC client connection may go unanswered before the
/// kernel probes it: a client whose host vanished without a FIN is found
/// and its connection closed, rather than kept for good.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(60);

/// The gRPC server's connections. tonic sets `TCP_NODELAY` only on sockets
/// it binds itself; on ours Nagle would hold a response's last small write
/// (its trailers) until the client's delayed ACK, up to 40 ms.
fn grpc_incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(GRPC_KEEPALIVE))
}

/// How long shutdown waits for background work before giving up on it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A port could not be bound: free it or choose another (`GRPC_PORT`, `METRICS_PORT`).
    #[error("cannot listen on {addr} ({variable}): {source}")]
    Bind {
        /// The variable that chose the address.
        variable: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `DATABASE_URL` is not a usable PostgreSQL URL: fix it. (An unreachable
    /// database is waited for, not an error.)
    #[error("PostgreSQL ({url}): {source}")]
    Database {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: saga_core::BoxError,
    },
    /// The saga definition or reflection could not be built (a bug).
    #[error("start-up failed: {0}")]
    Internal(#[source] saga_core::BoxError),
    /// The gRPC server failed while running.
    #[error("the gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// The state behind the operations endpoints.
#[derive(Clone)]
struct Ops {
    ready: Arc<AtomicBool>,
    prometheus: PrometheusHandle,
    refresh: Arc<dyn Fn() + Send + Sync>,
}

/// The background machinery of the chosen backend.
enum Workers {
    /// Embedded mode: everything is in process and ready at once.
    Ready(Box<Running>),
    /// Production mode: PostgreSQL and RabbitMQ are waited for when the
    /// service runs.
    Production(Box<ProductionStart>),
}

/// Running machinery: relay, consumers and the deadline scanner.
struct Running {
    engine: Engine,
    relay: Relay,
    consumers: Vec<Consumer>,
    deadline_interval: Duration,
    dead_letters: DeadLetterSource,
    /// The in-memory store, purged as production's tables are.
    store: InMemoryStore,
    retention: Retention,
}

/// Production mode before its backends are reachable.
struct ProductionStart {
    saga: OrderSagaConfig,
    database_url: SecretUrl,
    rabbitmq_url: SecretUrl,
    pool: PgPool,
    /// The engine's store, purged every `retention_interval`.
    store: PostgresStore,
    retention_interval: Duration,
    /// Stock replies handled at once.
    reply_concurrency: usize,
    engine: Engine,
    /// Opens the order API once the database is migrated.
    open: Arc<AtomicBool>,
    /// Connected to RabbitMQ once it is reached.
    dead_letters: DeadLetterSource,
}

/// Reports readiness through gRPC health and `/readyz`.
#[derive(Clone)]
struct Readiness {
    reporter: HealthReporter,
    ready: Arc<AtomicBool>,
    /// Set once shutdown began; held while readiness changes, so a change
    /// under way when shutdown comes cannot land after its NOT_SERVING.
    stopped: Arc<tokio::sync::Mutex<bool>>,
}

impl Readiness {
    /// Ready (`true`) or not, unless shutdown began.
    async fn set(&self, ready: bool) {
        let stopped = self.stopped.lock().await;
        if *stopped || self.ready.load(Ordering::SeqCst) == ready {
            return;
        }
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&self.reporter, status).await;
        self.ready.store(ready, Ordering::SeqCst);
        if ready {
            tracing::info!("ready");
        }
    }

    /// Not ready, for good.
    async fn stop(&self) {
        let mut stopped = self.stopped.lock().await;
        *stopped = true;
        self.ready.store(false, Ordering::SeqCst);
        set_health(&self.reporter, ServingStatus::NotServing).await;
    }
}

/// How often a serving replica checks that PostgreSQL answers.
const DATABASE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Checks in a row without an answer (each within a second) before a
/// replica reports itself not ready: one slow answer under load is not an
/// outage.
const DATABASE_CHECKS_MISSED: u32 = 3;

/// Keeps readiness true to PostgreSQL while serving: every order call needs
/// it, so a replica that cannot reach it reports NOT_SERVING (and `/readyz`
/// 503) until it answers again. RabbitMQ is left out: orders are accepted
/// while it is away, their messages waiting in the outbox. The check has a
/// connection of its own: through the request pool, a busy pool's wait
/// would count as a miss, and every replica under load would go unready.
async fn watch_database(options: PgConnectOptions, readiness: Readiness, shutdown: CancellationToken) {
    let mut connection: Option<PgConnection> = None;
    let mut missed = 0u32;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DATABASE_CHECK_INTERVAL) => {}
        }
        let check = async {
            let checked = match connection.as_mut() {
                Some(open) => open,
                None => connection.insert(PgConnection::connect_with(&options).await?),
            };
            sqlx::query("SELECT 1").execute(checked).await.map(|_| ())
        };
        let failure = match tokio::time::timeout(Duration::from_secs(1), check).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("no answer within 1 s".to_owned()),
        };
        let Some(failure) = failure else {
            if missed >= DATABASE_CHECKS_MISSED {
                tracing::info!("PostgreSQL answers again");
            }
            missed = 0;
            readiness.set(true).await;
            continue;
        };
        // A fresh connection next time: this one may be the broken part.
        connection = None;
        missed += 1;
        if missed == DATABASE_CHECKS_MISSED {
            tracing::warn!(error = %failure, "PostgreSQL does not answer; not ready until it does");
            readiness.set(false).await;
        }
    }
}

/// First and longest pause between attempts to reach PostgreSQL or RabbitMQ at start-up.
const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// How often the outbox backlog gauge is refreshed in production mode.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// A built, not yet running, service.
///
/// Embedded mode (the default [`Config`]) needs nothing else running: an
/// in-memory store and transport and a demo stock service.
///
/// ```
/// use order_service::config::ListenAddr;
/// use order_service::proto::order_service_client::OrderServiceClient;
/// use order_service::proto::{CreateOrderRequest, GetOrderRequest, OrderItem, OrderStatus};
/// use order_service::{Application, Config};
/// use saga_core::CancellationToken;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config {
///     grpc: ListenAddr::localhost(0),
///     metrics: ListenAddr::localhost(0),
///     ..Config::default()
/// };
/// let app = Application::build(config).await?;
/// let addr = format!("http://127.0.0.1:{}", app.grpc_port());
/// let shutdown = CancellationToken::new();
/// let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
///
/// let mut orders = OrderServiceClient::connect(addr).await?;
/// let item = OrderItem { product_id: "apple".into(), quantity: 2, price: 1.25 };
/// let request = CreateOrderRequest { user_id: "alice".into(), items: vec![item] };
/// let order = orders.create_order(request).await?.into_inner().order.ok_or("no order")?;
/// assert_eq!(order.total_price, 2.5);
///
/// // The saga runs in the background: the demo stock service confirms it.
/// let mut status = OrderStatus::Pending;
/// for _ in 0..100 {
///     let request = GetOrderRequest { order_id: order.id.clone(), user_id: "alice".into() };
///     status = orders.get_order(request).await?.into_inner().order.ok_or("no order")?.status();
///     if status != OrderStatus::Pending {
///         break;
///     }
///     tokio::time::sleep(std::time::Duration::from_millis(20)).await;
/// }
/// assert_eq!(status, OrderStatus::Confirmed);
///
/// shutdown.cancel();
/// running.await??;
/// # Ok(()) }
/// ```
pub struct Application {
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    grpc_port: u16,
    metrics_port: u16,
    orders: Orders,
    workers: Workers,
    ops: Ops,
    /// The web dashboard's routes, served beside the operations endpoints.
    dashboard: Router,
    /// The admin API, when `ADMIN_TOKEN` is set.
    admin: Option<AdminServer>,
}

impl Application {
    /// Binds the ports and wires the backends chosen by `config`. Does not
    /// reach PostgreSQL or RabbitMQ: [`run_until_stopped`](Self::run_until_stopped)
    /// waits for them.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let (grpc_listener, grpc_port) = bind("GRPC_PORT", &config.grpc).await?;
        let (metrics_listener, metrics_port) = bind("METRICS_PORT", &config.metrics).await?;
        let saga = OrderSagaConfig {
            names: config.names.clone(),
            stock_reply_timeout: config.stock_reply_timeout,
        };
        let tuning = EngineConfig {
            cached_instances: config.cached_instances,
            ..EngineConfig::default()
        };
        let (orders, workers, refresh) = match &config.backend {
            Backend::Embedded => embedded(&saga, &tuning, &config.retention)?,
            Backend::Production {
                database_url,
                rabbitmq_url,
            } => production(&saga, &tuning, database_url, rabbitmq_url, &config)?,
        };
        let dashboard = dashboard::routes(
            workers.engine().clone(),
            workers.open(),
            config.admin_token.as_ref(),
            DashboardConfig {
                window_minutes: config.dashboard_window_minutes,
                stuck_after: config.dashboard_stuck_after,
                ..DashboardConfig::default()
            },
        );
        let admin = config
            .admin_token
            .clone()
            .map(|token| AdminGrpc::server(workers.operations(), token));
        Ok(Self {
            grpc_listener,
            metrics_listener,
            grpc_port,
            metrics_port,
            orders,
            workers,
            ops: Ops {
                ready: Arc::new(AtomicBool::new(false)),
                prometheus: telemetry::prometheus(),
                refresh,
            },
            dashboard,
            admin,
        })
    }

    /// The bound gRPC port.
    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    /// The bound port of `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Serves until `shutdown` is cancelled: then reports NOT_SERVING, stops
    /// accepting, finishes requests and transitions in flight, and returns.
    ///
    /// In production mode the gRPC and HTTP ports serve at once, NOT_SERVING
    /// (and `UNAVAILABLE` for orders) while PostgreSQL and RabbitMQ are waited
    /// for with backoff; orders are accepted once the database is migrated,
    /// and health turns SERVING once the broker topology is declared too.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Self {
            grpc_listener,
            metrics_listener,
            orders,
            workers,
            ops,
            dashboard,
            admin,
            ..
        } = self;

        let mut tasks = JoinSet::new();
        let (reporter, health) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        let readiness = Readiness {
            reporter: reporter.clone(),
            ready: Arc::clone(&ops.ready),
            stopped: Arc::default(),
        };
        let reflection_v1 = reflection(admin.is_some())
            .build_v1()
            .map_err(|e| StartError::Internal(Box::new(e)))?;
        let reflection_v1alpha = reflection(admin.is_some())
            .build_v1alpha()
            .map_err(|e| StartError::Internal(Box::new(e)))?;

        let http = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .with_state(ops.clone())
            .merge(dashboard);
        {
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let serve = axum::serve(metrics_listener, http).with_graceful_shutdown(shutdown.cancelled_owned());
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "the metrics endpoint failed");
                }
            });
        }

        // Reports SERVING once its backends are reachable.
        tasks.spawn(workers.run(readiness.clone(), shutdown.clone()));

        let stopping = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: no new requests, finishing those in flight");
                readiness.stop().await;
            }
        };
        let serve = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(OrderGrpc::server(orders))
            .add_optional_service(admin)
            .serve_with_incoming_shutdown(grpc_incoming(grpc_listener), stopping);
        let drain_limit = async {
            shutdown.cancelled().await;
            tokio::time::sleep(GRPC_DRAIN).await;
        };
        let served = tokio::select! {
            served = serve => served,
            () = drain_limit => {
                tracing::warn!("gRPC calls still open after {GRPC_DRAIN:?} (streams?); closing them");
                Ok(())
            }
        };
        // Whatever ended the server, stop the rest too.
        shutdown.cancel();

        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a background task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("background work did not finish within {SHUTDOWN_GRACE:?}; abandoning it");
        }
        tracing::info!("stopped");
        served.map_err(StartError::Serve)
    }
}

/// Reflection over the services served: the admin API only when it is.
fn reflection(admin: bool) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    if admin {
        builder.register_encoded_file_descriptor_set(admin::proto::FILE_DESCRIPTOR_SET)
    } else {
        builder
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <OrderServiceServer<OrderGrpc> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

async fn bind(variable: &'static str, addr: &ListenAddr) -> Result<(TcpListener, u16), StartError> {
    addr.bind().await.map_err(|source| StartError::Bind {
        variable,
        addr: addr.to_string(),
        source,
    })
}

type Refresh = Arc<dyn Fn() + Send + Sync>;

/// The order saga's engine over `store`, its effects writing `table`: the
/// same in both modes but for the backends.
fn order_engine(
    store: Arc<dyn Store>,
    saga: &OrderSagaConfig,
    table: impl EffectHandler<OrderEffect>,
    tuning: &EngineConfig,
) -> Result<Engine, StartError> {
    let definition = order_saga(saga).map_err(|e| StartError::Internal(Box::new(e)))?;
    Engine::builder(store)
        .config(tuning.clone())
        .message_headers(saga_amqp::inject_current)
        .on_committed(telemetry::saga_committed)
        .register_with_effects(definition, table)
        .build()
        .map_err(|e| StartError::Internal(Box::new(e)))
}

/// In-memory store, in-process transport with the wire contract's topology,
/// and the demo stock service.
fn embedded(
    saga: &OrderSagaConfig,
    tuning: &EngineConfig,
    retention: &Retention,
) -> Result<(Orders, Workers, Refresh), StartError> {
    let names: &WireNames = &saga.names;
    tracing::warn!(
        "EMBEDDED MODE: orders live in memory and are lost when the process stops; \
         stock comes from a built-in demo catalogue ({}). \
         Set DATABASE_URL and RABBITMQ_URL to run on PostgreSQL + RabbitMQ.",
        DEMO_CATALOGUE
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let store = InMemoryStore::new();
    let transport = InMemoryTransport::new();
    transport
        .bind(&names.stock_update_exchange, &names.stock_update_queue)
        .bind(&names.orders_exchange, DEMO_STOCK_QUEUE)
        .bind(&names.order_confirmed_exchange, DEMO_STOCK_QUEUE)
        .bind(&names.order_cancelled_exchange, DEMO_STOCK_QUEUE);

    let table = InMemoryOrders::new();
    let engine = order_engine(Arc::new(store.clone()), saga, table.clone(), tuning)?;
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(transport.clone()),
        RelayConfig::default(),
    );
    let engine_consumer = Consumer::new(
        Arc::new(engine.clone()),
        Arc::new(transport.clone()),
        ConsumerConfig::new(names.stock_update_queue.clone()),
    );
    let stock = Participant::new(
        "demo-stock",
        Arc::new(store.clone()),
        DemoStock::new(DEMO_CATALOGUE, names.stock_update_exchange.clone()),
    );
    let stock_consumer = Consumer::new(
        Arc::new(stock),
        Arc::new(transport.clone()),
        ConsumerConfig {
            concurrency: 1,
            ..ConsumerConfig::new(DEMO_STOCK_QUEUE)
        },
    );

    // Embedded mode answers the admin API's dead-letter calls from the in-process queues.
    let dead_letters = DeadLetterSource::ready(
        vec![names.stock_update_queue.clone(), DEMO_STOCK_QUEUE.to_owned()],
        Arc::new(transport.clone()),
    );
    let refresh: Refresh = {
        let (queue, store) = (names.stock_update_queue.clone(), store.clone());
        Arc::new(move || {
            metrics::gauge!(telemetry::OUTBOX_BACKLOG).set(store.unsent() as f64);
            metrics::gauge!(telemetry::DEAD_LETTERS).set(transport.stats(&queue).dead_lettered as f64);
        })
    };
    let deadline_interval = deadline_interval(saga);
    let orders = Orders::new(engine.clone(), Arc::new(table));
    Ok((
        orders,
        Workers::Ready(Box::new(Running {
            engine,
            relay,
            consumers: vec![engine_consumer, stock_consumer],
            deadline_interval,
            dead_letters,
            store,
            retention: retention.clone(),
        })),
        refresh,
    ))
}

/// Bounds on the service's statements, set per connection: a lock held by
/// an operator's `ALTER TABLE` or `VACUUM FULL` ends the wait in 2 s, and a
/// statement stuck in an overloaded server in 30 s, in an error the store
/// reports as transient (the caller gets `UNAVAILABLE`, a message goes back
/// to its queue) instead of holding every request behind it. The statement
/// bound is generous: the pool also serves the operators' listings (which
/// scan `saga_instances`) and retention's batched deletes; gRPC calls have
/// their own, shorter bound ([`crate::orders::ANSWER_WITHIN`]). Migrations
/// run on a connection of their own.
const DATABASE_SESSION_LIMITS: [(&str, &str); 2] = [("statement_timeout", "30s"), ("lock_timeout", "2s")];

/// Pins a new connection's search path to `public` when the login role is
/// named like the order tables' schema (`order_service`) and the path is
/// the server's stock `"$user", public`. There `"$user"` finds that schema
/// first once it exists, and on the next start the saga migrator would read
/// the order tables' migration history as its own and fail for good (such
/// a deployment never got past its first restart, so no saga tables can be
/// there). A path the URL's `options`, the role or the database set is left
/// alone, and so is `"$user"` for any other role: a role with a schema of
/// its own keeps its saga tables there.
const PIN_STOCK_SEARCH_PATH: &str = r#"SELECT set_config('search_path', 'public', false)
     WHERE current_user = 'order_service'
       AND current_setting('search_path') ~ '^\s*"\$user"\s*,\s*public\s*$'"#;

/// `pool` with [`PIN_STOCK_SEARCH_PATH`] run on each new connection.
fn pinning_search_path(pool: PgPoolOptions) -> PgPoolOptions {
    pool.after_connect(|connection, _| {
        Box::pin(async move {
            sqlx::query(PIN_STOCK_SEARCH_PATH).execute(&mut *connection).await?;
            Ok(())
        })
    })
}

/// PostgreSQL (saga store and order tables) and RabbitMQ, wired but not yet
/// reached: the pool connects lazily, and [`Workers::run`] waits for both.
fn production(
    saga: &OrderSagaConfig,
    tuning: &EngineConfig,
    database_url: &SecretUrl,
    rabbitmq_url: &SecretUrl,
    config: &Config,
) -> Result<(Orders, Workers, Refresh), StartError> {
    let options = PgConnectOptions::from_str(database_url.expose())
        .map_err(|e| StartError::Database {
            url: database_url.to_string(),
            source: Box::new(e),
        })?
        .options(saga_postgres::SESSION_SETTINGS)
        .options(DATABASE_SESSION_LIMITS);
    let pool = pinning_search_path(PgPoolOptions::new())
        .max_connections(config.database_max_connections)
        // Bounds how long a request waits while the database is away.
        .acquire_timeout(Duration::from_secs(2))
        // No ping per acquire (a round trip, several per saga): a connection
        // the database dropped fails its first statement, which the store
        // reports as transient and the caller retries on a fresh one.
        .test_before_acquire(false)
        .connect_lazy_with(options);
    let store = PostgresStore::with_config(
        pool.clone(),
        PostgresStoreConfig {
            retention: config.retention.store.clone(),
            commit_linger: config.commit_linger,
            ..PostgresStoreConfig::default()
        },
    );
    let table = PostgresOrders::new(pool.clone());
    let engine = order_engine(Arc::new(store.clone()), saga, table.clone(), tuning)?;
    let (orders, open) = Orders::closed(engine.clone(), Arc::new(table));
    Ok((
        orders,
        Workers::Production(Box::new(ProductionStart {
            saga: saga.clone(),
            database_url: database_url.clone(),
            rabbitmq_url: rabbitmq_url.clone(),
            pool,
            store,
            retention_interval: config.retention.interval,
            reply_concurrency: config.stock_reply_concurrency,
            engine,
            open,
            dead_letters: DeadLetterSource::pending(vec![saga.names.stock_update_queue.clone()]),
        })),
        Arc::new(|| {}),
    ))
}

/// Stock replies, `concurrency` at once (the replies in flight together
/// share the engine's group commits). Those that fail retryably (the
/// database is away) are retried through a restart
/// ([`RetryPolicy::THROUGH_A_RESTART`], about three minutes) before they are
/// dead-lettered, so a database restart does not turn replies into dead
/// letters (and orders into timeouts).
fn reply_consumer_config(queue: &str, concurrency: usize) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(queue);
    config.concurrency = concurrency;
    config.retry = RetryPolicy::THROUGH_A_RESTART;
    // Within the service's own shutdown grace, so the consumer gives its
    // stuck handlers' deliveries back and the transport closes cleanly,
    // rather than being abandoned mid-wait when the service's grace ends.
    config.shutdown_grace = SHUTDOWN_GRACE / 2;
    config
}

fn deadline_interval(saga: &OrderSagaConfig) -> Duration {
    (saga.stock_reply_timeout / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// Retries `attempt` with backoff until it succeeds or `shutdown` is
/// cancelled (`None`), logging what it waits for.
async fn wait_for<T, E: std::fmt::Display, F: Future<Output = Result<T, E>> + Send + 'static>(
    what: &str,
    url: &SecretUrl,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let (mut backoff, longest) = STARTUP_BACKOFF;
    loop {
        let result = tokio::select! {
            () = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => return Some(value),
            Err(error) => {
                tracing::warn!(url = %url, %error, retry_in = ?backoff, "waiting for {what}");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(longest);
            }
        }
    }
}

/// How long a migration waits for a lock before the attempt fails and is
/// tried again later. Waiting on, an `ALTER TABLE` behind a long
/// transaction (an operator's idle `psql`) would hold every other
/// replica's statements on that table behind it, for as long as that
/// transaction stays open, and this replica would never say why.
const MIGRATION_LIMITS: [(&str, &str); 1] = [("lock_timeout", "5s")];

/// Migrates the saga store and the order tables, on a thread of its own.
///
/// sqlx's `Migrator::run` future is not `Send` in a generic context (its
/// `Acquire` bound is higher-ranked), so it cannot be awaited inside a spawned
/// task. It runs on a dedicated thread with its own small runtime and its own
/// connection instead, so an attempt still waiting when the process stops
/// never touches the main runtime while it shuts down.
fn migrate(url: SecretUrl) -> Pin<Box<dyn Future<Output = Result<(), saga_core::BoxError>> + Send>> {
    let (done, migrated) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("migrate".to_owned()).spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(saga_core::BoxError::from)
            .and_then(|runtime| {
                runtime.block_on(async {
                    let options = PgConnectOptions::from_str(url.expose())?.options(MIGRATION_LIMITS);
                    let pool = pinning_search_path(PgPoolOptions::new())
                        .max_connections(1)
                        .acquire_timeout(Duration::from_secs(2))
                        .connect_with(options)
                        .await?;
                    let result = async {
                        saga_postgres::migrate(&pool).await?;
                        PostgresOrders::migrate(&pool).await
                    }
                    .await;
                    pool.close().await;
                    result.map_err(saga_core::BoxError::from)
                })
            });
        let _ = done.send(result);
    });
    Box::pin(async move {
        spawned?;
        migrated
            .await
            .map_err(|_| "the migration thread stopped without an answer")?
    })
}

/// Unsent outbox messages: a count over the outbox's partial index of unsent rows.
async fn outbox_backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await
}

/// Unfinished order sagas in the store (the `saga_instances_unfinished`
/// index holds only those).
async fn sagas_in_flight(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM saga_instances \
         WHERE status IN ('running', 'compensating', 'needs_attention') AND definition = $1",
    )
    .bind(ORDER_SAGA)
    .fetch_one(pool)
    .await
}

/// Refreshes the outbox backlog and sagas-in-flight gauges until `shutdown`.
async fn report_backlog(pool: PgPool, shutdown: CancellationToken) {
    loop {
        match outbox_backlog(&pool).await {
            Ok(unsent) => telemetry::outbox_backlog(u64::try_from(unsent).unwrap_or(0)),
            Err(error) => tracing::debug!(%error, "cannot count the outbox backlog"),
        }
        match sagas_in_flight(&pool).await {
            Ok(unfinished) => telemetry::sagas_in_flight(u64::try_from(unfinished).unwrap_or(0)),
            Err(error) => tracing::debug!(%error, "cannot count the sagas in flight"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(BACKLOG_INTERVAL) => {}
        }
    }
}

impl Workers {
    /// The engine the workers drive.
    fn engine(&self) -> &Engine {
        match self {
            Self::Ready(running) => &running.engine,
            Self::Production(start) => &start.engine,
        }
    }

    /// Set once the store can be used: at once in embedded mode, once the
    /// database is migrated in production.
    fn open(&self) -> Arc<AtomicBool> {
        match self {
            Self::Ready(_) => Arc::new(AtomicBool::new(true)),
            Self::Production(start) => Arc::clone(&start.open),
        }
    }

    /// What the admin API operates on.
    fn operations(&self) -> Operations {
        let dead_letters = match self {
            Self::Ready(running) => running.dead_letters.clone(),
            Self::Production(start) => start.dead_letters.clone(),
        };
        Operations::new(self.engine().clone(), dead_letters, self.open())
    }

    /// Waits for the backends (production mode), reports readiness, and runs
    /// the relay, consumers and deadline scanner until `shutdown`.
    async fn run(self, readiness: Readiness, shutdown: CancellationToken) {
        match self {
            Self::Ready(running) => {
                readiness.set(true).await;
                running.run(shutdown).await;
            }
            Self::Production(start) => (*start).run(readiness, shutdown).await,
        }
    }
}

impl Running {
    async fn run(self, shutdown: CancellationToken) {
        let Self {
            engine,
            relay,
            consumers,
            deadline_interval,
            dead_letters: _,
            store,
            retention,
        } = self;
        let mut tasks = JoinSet::new();
        tasks.spawn(purge_in_memory(store, retention, shutdown.clone()));
        tasks.spawn(relay.run(shutdown.clone()));
        for consumer in consumers {
            tasks.spawn(consumer.run(shutdown.clone()));
        }
        {
            let shutdown = shutdown.clone();
            tasks.spawn(async move { engine.run_deadlines(deadline_interval, shutdown).await });
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "a background task failed");
            }
        }
    }
}

/// Forgets, every `RETENTION_INTERVAL`, what production's retention would
/// delete from its tables, so a long-running embedded service does not grow
/// with every saga it has finished.
async fn purge_in_memory(store: InMemoryStore, retention: Retention, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(retention.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once, when nothing is old yet.
    every.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let started = std::time::Instant::now();
        let purged = store.purge(retention.store.inbox, retention.store.finished_instances);
        telemetry::memory_retention_purged(&purged, started.elapsed());
    }
}

impl ProductionStart {
    async fn run(self, readiness: Readiness, shutdown: CancellationToken) {
        let Self {
            saga,
            database_url,
            rabbitmq_url,
            pool,
            store,
            retention_interval,
            reply_concurrency,
            engine,
            open,
            dead_letters,
        } = self;
        let names = &saga.names;
        tracing::info!(database = %database_url, broker = %rabbitmq_url, "connecting");
        if wait_for("PostgreSQL", &database_url, &shutdown, || migrate(database_url.clone()))
            .await
            .is_none()
        {
            return;
        }
        open.store(true, Ordering::Release);
        tracing::info!("PostgreSQL migrated; accepting orders");

        // Deadlines and the backlog gauge need only the database.
        let mut tasks = JoinSet::new();
        {
            let (engine, shutdown) = (engine.clone(), shutdown.clone());
            let interval = deadline_interval(&saga);
            tasks.spawn(async move { engine.run_deadlines(interval, shutdown).await });
        }
        tasks.spawn(report_backlog(pool.clone(), shutdown.clone()));
        {
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                store
                    .run_retention_reporting(retention_interval, shutdown, telemetry::retention_purged)
                    .await;
            });
        }

        let topology = Topology::new()
            .exchange(&names.orders_exchange, ExchangeKind::Fanout)
            .exchange(&names.stock_update_exchange, ExchangeKind::Fanout)
            // Events nobody may listen to yet (OrderCancelled is new to the
            // platform): an unbound exchange must not jam the outbox with
            // retries, so the broker may drop them.
            .with_exchange(ExchangeConfig::new(&names.order_confirmed_exchange, ExchangeKind::Fanout).allow_unrouted())
            .with_exchange(ExchangeConfig::new(&names.order_cancelled_exchange, ExchangeKind::Fanout).allow_unrouted())
            .queue(&names.stock_update_queue)
            .bind(&names.stock_update_exchange, &names.stock_update_queue, "");
        let mut amqp = AmqpConfig::new(rabbitmq_url.expose(), topology);
        amqp.connection_name = "order-service".to_owned();
        let connecting = || Box::pin(AmqpTransport::connect(amqp.clone()));
        let connected = wait_for("RabbitMQ", &rabbitmq_url, &shutdown, connecting).await;
        if let Some(transport) = connected {
            let transport = Arc::new(transport);
            tracing::info!("RabbitMQ topology declared");
            dead_letters.connect(transport.clone());
            // The engine's own store: its commits hand their messages to
            // this relay directly (no claim), and wake it without a NOTIFY.
            let store: Arc<dyn saga_core::OutboxStore> = engine.store().clone();
            let publisher = Arc::new(TracedPublisher::new(transport.clone()));
            tasks.spawn(Relay::new(store, publisher, RelayConfig::default()).run(shutdown.clone()));
            let handler = engine;
            let consumer = Consumer::new(
                Arc::new(TracedHandler::new(Arc::new(handler))),
                transport.clone(),
                // The platform's product service may leave the AMQP `type` unset.
                reply_consumer_config(&names.stock_update_queue, reply_concurrency)
                    .with_default_kind(STOCK_UPDATE_RESULT),
            );
            tasks.spawn(consumer.run(shutdown.clone()));
            readiness.set(true).await;
            let check_options = PgConnectOptions::clone(&pool.connect_options());
            tasks.spawn(watch_database(check_options, readiness.clone(), shutdown.clone()));
            while let Some(joined) = tasks.join_next().await {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a background task failed");
                }
            }
            transport.close().await;
        }
        while tasks.join_next().await.is_some() {}
    }
}

async fn metrics(State(ops): State<Ops>) -> String {
    (ops.refresh)();
    telemetry::render(&ops.prometheus)
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_replies_are_handled_as_many_at_once_as_configured() {
        assert_eq!(reply_consumer_config("q", 48).concurrency, 48);
    }

    #[test]
    fn stock_reply_handlers_get_their_grace_within_the_services() {
        assert!(reply_consumer_config("q", 1).shutdown_grace < SHUTDOWN_GRACE);
    }

    #[test]
    fn stock_replies_ride_out_a_database_restart_of_a_few_minutes() {
        let policy = reply_consumer_config("q", 1).retry;
        let mut waited = Duration::ZERO;
        let mut attempts = 1;
        while policy.allows_another(attempts) {
            waited += policy.backoff(attempts);
            attempts += 1;
        }
        assert!(waited >= Duration::from_secs(180), "dead-lettered after {waited:?}");
        assert!(waited <= Duration::from_secs(600), "retried for {waited:?}");
    }

    #[tokio::test]
    async fn grpc_connections_send_small_writes_at_once() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address = listener.local_addr().expect("bound");
        let mut incoming = grpc_incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.expect("connects");
        let accepted = incoming.next().await.expect("a connection").expect("accepted");
        assert!(
            accepted.nodelay().expect("readable"),
            "Nagle would hold a response's trailers"
        );
    }
}
