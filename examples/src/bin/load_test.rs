//! `load-test`: the end-to-end load benchmark (see `examples/README.md`,
//! "Load benchmark").
//!
//! Run: `cargo run --release -p saga-examples --bin load-test -- --mode closed --clients 32 --duration 20`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use order_service::config::{Retention, SecretUrl, parse_linger};
use saga_examples::load::competitor::{self, Competing};
use saga_examples::load::{self, DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, LoadConfig, Mode};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// Each client waits for its saga to finish before the next order.
    Closed,
    /// Orders on a schedule at `--rate` / `--rates`.
    Open,
}

/// End-to-end load benchmark of the order service (production mode) with the inventory service.
#[derive(Debug, Parser)]
#[command(name = "load-test")]
struct Args {
    /// Closed loop (maximum throughput) or open loop (fixed rates).
    #[arg(long, value_enum, default_value = "closed")]
    mode: ModeArg,
    /// Concurrent clients (closed), the cap on open calls (open), and the raw measurements' concurrency.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds orders are offered per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Open loop: orders per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: several rates, one run each (e.g. `100,250,500`); plots latency against them.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// At most this many orders per run.
    #[arg(long)]
    max_orders: Option<u64>,
    /// Unmeasured orders placed first; the database is analyzed after seven
    /// eighths of them.
    #[arg(long, default_value_t = 2000)]
    warmup: u64,
    /// Seconds each raw ceiling is measured; 0 skips them.
    #[arg(long, default_value_t = 5.0)]
    raw_duration: f64,
    /// Products ordered round-robin (seeded with ample stock).
    #[arg(long, default_value_t = 64)]
    products: usize,
    /// Use an order service already running here (platform exchange names) instead of starting one.
    #[arg(long)]
    grpc_addr: Option<String>,
    /// With `--grpc-addr`: the service's pid, for its CPU time and peak RSS.
    #[arg(long)]
    service_pid: Option<u32>,
    /// Where `<timestamp>.json` and `.svg` are written.
    #[arg(long, default_value = "results")]
    results: PathBuf,
    /// PostgreSQL; a fresh database is created there and dropped afterwards.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    database_url: String,
    /// RabbitMQ.
    #[arg(long, env = "RABBITMQ_URL", default_value = DEFAULT_RABBITMQ_URL, hide_env_values = true)]
    rabbitmq_url: String,
    /// Commands the in-process inventory lets share a transaction at most (1: each its own;
    /// default: the inventory's own).
    #[arg(long, env = "INVENTORY_BATCH", value_parser = clap::value_parser!(u16).range(1..=256))]
    inventory_batch: Option<u16>,
    /// Deliveries the in-process inventory handles at once per queue (default: the
    /// inventory's own).
    #[arg(long, env = "INVENTORY_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=1024))]
    inventory_concurrency: Option<u16>,
    /// Stock replies the in-process order service handles at once (default: the
    /// service's own).
    #[arg(long, env = "STOCK_REPLY_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=1024))]
    stock_reply_concurrency: Option<u16>,
    /// How long both services let a lone commit wait for company (`0`, or `1ms` up to
    /// `100ms`; default: the services' own).
    #[arg(long)]
    linger: Option<String>,
    /// Starts a process beside the run that spins this share of every 10 ms on one core (more
    /// than 0, at most 1): the goals on a machine with less CPU to spare.
    #[arg(long)]
    competing_cpu: Option<f64>,
}

fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("--{name}: {value} is not a number of seconds"))
}

fn config(args: Args) -> Result<LoadConfig, String> {
    let mode = match args.mode {
        ModeArg::Closed => Mode::Closed,
        ModeArg::Open => {
            let mut rates = args.rates;
            rates.extend(args.rate);
            Mode::Open { rates }
        }
    };
    let raw = seconds("raw-duration", args.raw_duration)?;
    let defaults = LoadConfig::default();
    let config = LoadConfig {
        database_url: SecretUrl::new(args.database_url),
        rabbitmq_url: SecretUrl::new(args.rabbitmq_url),
        grpc_addr: args.grpc_addr,
        service_pid: args.service_pid,
        mode,
        clients: args.clients,
        duration: seconds("duration", args.duration)?,
        max_orders: args.max_orders,
        warmup_orders: args.warmup,
        raw_duration: (!raw.is_zero()).then_some(raw),
        products: (0..args.products).map(|i| format!("load-{i}")).collect(),
        results_dir: Some(args.results),
        // The hosted services purge as they would when started alone.
        retention: Retention::from_env().map_err(|e| e.to_string())?,
        inventory_batch: args.inventory_batch.map_or(defaults.inventory_batch, usize::from),
        inventory_concurrency: args
            .inventory_concurrency
            .map_or(defaults.inventory_concurrency, usize::from),
        stock_reply_concurrency: args
            .stock_reply_concurrency
            .map_or(defaults.stock_reply_concurrency, usize::from),
        linger: match args.linger {
            Some(value) => parse_linger(&value).map_err(|why| format!("--linger: {why}"))?,
            None => defaults.linger,
        },
        competing: match args.competing_cpu {
            Some(share) => Some(Competing {
                share,
                program: std::env::current_exe().map_err(|e| format!("--competing-cpu: this program's path: {e}"))?,
            }),
            None => None,
        },
        ..defaults
    };
    config.validate()?;
    Ok(config)
}

// jemalloc, as in the order service and inventory binaries: 5-10 % less
// CPU per saga than glibc's malloc under load (docs/performance.md), for a
// few MiB more resident memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Started by a run as its competing process (`--competing-cpu`).
    match competitor::requested() {
        Some(Ok(share)) => {
            competitor::spin(share);
            return ExitCode::SUCCESS;
        }
        Some(Err(error)) => {
            eprintln!("load-test: {error}");
            return ExitCode::from(2);
        }
        None => {}
    }
    let config = match config(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("load-test: {error}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,lapin=off")))
        .init();
    let results = config.results_dir.clone();
    let report = match load::run(config).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("load-test: {error}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", report.render());
    if let Some(dir) = results {
        match report.write(&dir) {
            Ok(paths) => {
                for path in paths {
                    println!("wrote {}", path.display());
                }
            }
            Err(error) => {
                eprintln!("load-test: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
