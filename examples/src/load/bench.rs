//! One load run from start to clean-up.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeConfig, ExchangeKind, Topology};
use saga_core::{CancellationToken, Subscriber, Timestamp};
use tokio::task::JoinSet;

use super::competitor::Competitor;
use super::config::{LoadConfig, Mode};
use super::costs::{self, SagaCosts};
use super::drive::{Orders, Outcome, Seen, Tracker, observe};
use super::error::LoadError;
use super::floor::{self, LatencyFloor};
use super::legs;
use super::machine::Trace;
use super::raw::{self, RawFigure};
use super::report::{Ceiling, LoadReport, Percentiles, RunReport};
use super::settings::TailSettings;
use super::stage::{ORDER_SERVICE_THREADS, Services, Stage, connect};
use super::usage;
use crate::inventory::InventoryConfig;

/// gRPC connections the clients share (HTTP/2 multiplexes the calls).
const MAX_CHANNELS: usize = 8;

/// Runs the benchmark `config` describes: creates a fresh database and
/// broker names, starts the services (unless external), measures the raw
/// ceilings, offers the orders, and removes everything it created, also when
/// a step fails.
pub async fn run(config: LoadConfig) -> Result<LoadReport, LoadError> {
    config.validate().map_err(LoadError::Config)?;
    // Held to the end of the run: dropping it stops the process.
    let _competitor = match &config.competing {
        Some(competing) => Some(Competitor::start(competing).map_err(|source| LoadError::Competitor {
            program: competing.program.display().to_string(),
            source,
        })?),
        None => None,
    };
    let started_at = super::report::timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
    );
    let stage = Stage::create(&config).await?;
    let result = on_stage(&config, &stage, started_at).await;
    stage.clean_up().await;
    result
}

async fn on_stage(config: &LoadConfig, stage: &Stage, started_at: String) -> Result<LoadReport, LoadError> {
    // The observer's queues first, so no event of the run is missed.
    let confirmed_exchange = &stage.wire.order_confirmed_exchange;
    let cancelled_exchange = &stage.wire.order_cancelled_exchange;
    let topology = Topology::new()
        .with_exchange(ExchangeConfig::new(confirmed_exchange, ExchangeKind::Fanout).allow_unrouted())
        .with_exchange(ExchangeConfig::new(cancelled_exchange, ExchangeKind::Fanout).allow_unrouted())
        .queue(&stage.confirmed_queue)
        .queue(&stage.cancelled_queue)
        .bind(confirmed_exchange, &stage.confirmed_queue, "")
        .bind(cancelled_exchange, &stage.cancelled_queue, "");
    let mut amqp = AmqpConfig::new(stage.rabbitmq_url.expose(), topology);
    amqp.connection_name = "load-test-observer".to_owned();
    amqp.prefetch = 512;
    let events = AmqpTransport::connect(amqp).await.map_err(|source| LoadError::Broker {
        url: stage.rabbitmq_url.to_string(),
        what: "declaring the observer's queues".to_owned(),
        source: Box::new(source),
    })?;
    let services = match Services::start(config, stage).await {
        Ok(services) => services,
        Err(error) => {
            events.close().await;
            return Err(error);
        }
    };
    let result = measure(config, stage, &services, &events, started_at).await;
    services.stop().await;
    events.close().await;
    result
}

async fn measure(
    config: &LoadConfig,
    stage: &Stage,
    services: &Services,
    events: &AmqpTransport,
    started_at: String,
) -> Result<LoadReport, LoadError> {
    let tracker = Arc::new(Tracker::default());
    let stop = CancellationToken::new();
    let mut observers = JoinSet::new();
    for (queue, outcome) in [
        (&stage.confirmed_queue, Outcome::Confirmed),
        (&stage.cancelled_queue, Outcome::Cancelled),
    ] {
        let subscription = events.subscribe(queue).await.map_err(|source| LoadError::Broker {
            url: stage.rabbitmq_url.to_string(),
            what: format!("consuming {queue}"),
            source: Box::new(source),
        })?;
        observers.spawn(observe(subscription, outcome, tracker.clone(), stop.clone()));
    }
    let result = offer(config, stage, services, tracker, started_at).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while observers.join_next().await.is_some() {}
    })
    .await;
    observers.abort_all();
    result
}

async fn offer(
    config: &LoadConfig,
    stage: &Stage,
    services: &Services,
    tracker: Arc<Tracker>,
    started_at: String,
) -> Result<LoadReport, LoadError> {
    let mut channels = Vec::new();
    for _ in 0..config.clients.min(MAX_CHANNELS) {
        channels.push(connect(&services.grpc_addr).await?);
    }
    let orders = Orders::new(channels, config.products.clone(), Arc::clone(&tracker));
    let tail_settings = TailSettings::read(stage).await?;
    if let Some(relaxed) = tail_settings.durability().relaxed() {
        tracing::warn!(%relaxed, "PostgreSQL runs with durability relaxed: these figures are not the benchmark's");
    }
    let max_orders = config.max_orders.unwrap_or(u64::MAX);

    if config.warmup_orders > 0 {
        // `ANALYZE` makes every connection plan its statements again: the
        // warm-up's last eighth runs after it, so that burst is not measured.
        let settle = config.warmup_orders / 8;
        let mut confirmed = warm_up(&orders, config, config.warmup_orders - settle).await;
        analyze(stage).await?;
        confirmed += warm_up(&orders, config, settle).await;
        tracing::info!(confirmed, "warmed up");
    }

    let first_limits = limits(config, stage).await?;

    let pid = config.service_pid;
    let mut runs = Vec::new();
    let settings: Vec<Option<f64>> = match &config.mode {
        Mode::Closed => vec![None],
        Mode::Open { rates } => rates.iter().copied().map(Some).collect(),
    };
    for rate in settings {
        tracing::info!(?rate, "offering orders");
        if !usage::reset_peak_rss(pid) {
            tracing::warn!("the peak RSS could not be reset: it is the peak since the process started");
        }
        let before = usage::cpu(pid, ORDER_SERVICE_THREADS);
        // The clock the services stamp their rows with.
        let run_started_ms = Timestamp::now().as_millis();
        let offered = async {
            match rate {
                None => {
                    orders
                        .closed(config.clients, config.duration, max_orders, config.drain_timeout)
                        .await
                }
                Some(rate) => {
                    orders
                        .open(rate, config.clients, config.duration, max_orders, config.drain_timeout)
                        .await
                }
            }
        };
        let stop_tracing = CancellationToken::new();
        let traced = async {
            let seen = offered.await;
            stop_tracing.cancel();
            seen
        };
        // The trace first: its first sample comes before the first order.
        let (trace, seen, costs) = tokio::join!(
            Trace::record(stop_tracing.clone()),
            traced,
            sample_costs(stage, &tracker, config.duration)
        );
        let after = usage::cpu(pid, ORDER_SERVICE_THREADS);
        let used = match (before, after) {
            (Some(before), Some(after)) => Some(after.since(&before)),
            _ => None,
        };
        let mut report = run_report(config, rate, &seen, used, pid);
        if config.grpc_addr.is_none() {
            // Read off this run's own database: a service run elsewhere
            // writes to another, and its figures would read as nearly zero.
            report.costs = costs;
            // The services are this run's own: their tables are in its database.
            let inventory = InventoryConfig::default().schema;
            report.legs = legs::measure(
                stage.database_url.expose(),
                inventory.as_str(),
                run_started_ms,
                Timestamp::now().as_millis().saturating_add(1),
                &seen.confirmations,
            )
            .await;
            if let Some(legs) = &mut report.legs {
                legs.line_up(&trace);
            }
        }
        runs.push(report);
    }

    // Measured again after the runs, and pooled with the first: the VM's
    // speed drifts within minutes, and the runs fell between the two.
    let (ceiling, latency_floor) = match (first_limits, limits(config, stage).await?) {
        (Some(first), Some(later)) => {
            let limits = first.pooled(later);
            let ceiling = Ceiling::new(limits.commits, limits.messages, tail_settings.durability());
            for run in &mut runs {
                run.compare_with(&ceiling, &limits.floor);
            }
            (Some(ceiling), Some(limits.floor))
        }
        _ => (None, None),
    };

    let measured_process = match (&config.grpc_addr, pid) {
        (None, _) => "this process: the order service AND the inventory service, the load generator and the \
                      event observer (the order-service threads figure is the service's runtime alone)"
            .to_owned(),
        (Some(_), Some(pid)) => format!("the external order service, pid {pid}"),
        (Some(_), None) => "the load generator only (external service; pass --service-pid for its figures)".to_owned(),
    };
    Ok(LoadReport {
        started_at,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        measured_process,
        competing_cpu: config.competing.as_ref().map(|c| c.share),
        config: config_json(config),
        tail_settings,
        ceiling,
        latency_floor,
        runs,
    })
}

/// The machine's own limits measured once: the raw commits and messages
/// (the ceiling) and the latency floor.
struct Limits {
    commits: RawFigure,
    messages: RawFigure,
    floor: LatencyFloor,
}

impl Limits {
    /// Both measurements as one figure each.
    fn pooled(self, later: Self) -> Self {
        Self {
            commits: self.commits.pooled(later.commits),
            messages: self.messages.pooled(later.messages),
            floor: self.floor.pooled(later.floor),
        }
    }
}

/// The raw PostgreSQL commits and RabbitMQ messages, each for
/// `--raw-duration`, and the latency floor, for that up to [`floor::MOST`];
/// none of them if `--raw-duration` skips them.
async fn limits(config: &LoadConfig, stage: &Stage) -> Result<Option<Limits>, LoadError> {
    let Some(duration) = config.raw_duration else {
        return Ok(None);
    };
    tracing::info!("measuring raw PostgreSQL commits");
    let commits = raw::postgres_commits(stage, config.clients, duration).await?;
    tracing::info!("measuring raw RabbitMQ messages");
    let messages = raw::amqp_messages(stage, config.clients, duration, config.drain_timeout).await?;
    tracing::info!("measuring the latency floor");
    let floor = floor::measure(stage, duration.min(floor::MOST)).await?;
    Ok(Some(Limits {
        commits,
        messages,
        floor,
    }))
}

/// Samples what sagas cost from a fifth into the run to half a second
/// before its end (while the load is steady).
async fn sample_costs(stage: &Stage, tracker: &Tracker, duration: Duration) -> Option<SagaCosts> {
    let started = tokio::time::Instant::now();
    let mut conn = costs::connect(stage.database_url.expose()).await?;
    let from = (duration / 5).max(Duration::from_secs(1));
    let to = duration.saturating_sub(Duration::from_millis(500));
    if to <= from {
        return None;
    }
    tokio::time::sleep_until(started + from).await;
    let before = costs::sample(&mut conn, tracker.completed()).await;
    tokio::time::sleep_until(started + to).await;
    let after = costs::sample(&mut conn, tracker.completed()).await;
    SagaCosts::between(&before, &after)
}

fn run_report(
    config: &LoadConfig,
    rate: Option<f64>,
    seen: &Seen,
    used: Option<usage::CpuSample>,
    pid: Option<u32>,
) -> RunReport {
    let completed = seen.confirmed + seen.cancelled;
    let seconds = seen.elapsed.as_secs_f64();
    let completed_per_second = if seconds > 0.0 { completed as f64 / seconds } else { 0.0 };
    let per_1000 = |cpu: Duration| (completed > 0).then(|| cpu.as_secs_f64() * 1000.0 / completed as f64);
    RunReport {
        mode: if rate.is_some() { "open" } else { "closed" }.to_owned(),
        offered_per_second: rate,
        clients: config.clients,
        sent: seen.sent,
        errors: seen.errors,
        confirmed: seen.confirmed,
        cancelled: seen.cancelled,
        unobserved: seen.unobserved,
        unsent: seen.unsent,
        seconds,
        completed_per_second,
        latency_ms: Percentiles::of_sorted_micros(&seen.latencies_us),
        answer_latency_ms: Percentiles::of_sorted_micros(&seen.answer_latencies_us),
        ratio_of_ceiling: None,
        ratio_of_shared_ceiling: None,
        median_over_floor: None,
        cpu_seconds_per_1000: used.and_then(|u| per_1000(u.process)),
        service_thread_cpu_seconds_per_1000: used.and_then(|u| u.service_threads).and_then(per_1000),
        peak_rss_mib: usage::peak_rss_kib(pid).map(|kib| kib as f64 / 1024.0),
        costs: None,
        legs: None,
        system_clock_step_ms: seen.system_clock_step_ms,
    }
}

fn config_json(config: &LoadConfig) -> serde_json::Value {
    let (mode, rates) = match &config.mode {
        Mode::Closed => ("closed", Vec::new()),
        Mode::Open { rates } => ("open", rates.clone()),
    };
    serde_json::json!({
        "mode": mode,
        "rates": rates,
        "clients": config.clients,
        "duration_s": config.duration.as_secs_f64(),
        "max_orders": config.max_orders,
        "warmup_orders": config.warmup_orders,
        "raw_duration_s": config.raw_duration.map(|d| d.as_secs_f64()),
        "products": config.products.len(),
        "service": config.grpc_addr.clone().unwrap_or_else(|| "in-process (production mode)".to_owned()),
        "database_url": config.database_url.to_string(),
        "rabbitmq_url": config.rabbitmq_url.to_string(),
        "retention": {
            "inbox_s": config.retention.store.inbox.as_secs_f64(),
            "sent_messages_s": config.retention.store.sent_messages.as_secs_f64(),
            "finished_sagas_s": config.retention.store.finished_instances.map(|d| d.as_secs_f64()),
            "interval_s": config.retention.interval.as_secs_f64(),
        },
        "inventory_batch": config.inventory_batch,
        "inventory_concurrency": config.inventory_concurrency,
        "stock_reply_concurrency": config.stock_reply_concurrency,
        "linger_ms": config.linger.as_secs_f64() * 1e3,
    })
}

/// Places `count` unmeasured orders, closed loop; returns how many were
/// confirmed.
async fn warm_up(orders: &Orders, config: &LoadConfig, count: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    let drain = config.drain_timeout;
    orders.closed(config.clients, drain, count, drain).await.confirmed
}

/// Gathers the fresh database's statistics during the warm-up, as
/// autovacuum does in a service that has run a while: plans made for empty
/// tables (sequential scans) would otherwise stay cached on each connection
/// for the whole run.
async fn analyze(stage: &Stage) -> Result<(), LoadError> {
    stage
        .on_database("ANALYZE after the warm-up", async |conn| {
            sqlx::query("ANALYZE").execute(conn).await.map(drop)
        })
        .await
}
