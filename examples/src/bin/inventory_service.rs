//! `inventory-service`: the platform's stock service as a saga participant
//! on PostgreSQL + RabbitMQ. Configuration from the environment (see
//! `examples/README.md`); stops cleanly on SIGINT or SIGTERM.
//!
//! Run: `cargo run -p saga-examples --bin inventory-service`

use std::process::ExitCode;

use saga_core::CancellationToken;
use saga_examples::inventory::{InventoryConfig, InventoryService};
use tracing_subscriber::EnvFilter;

// jemalloc: 5-10 % less CPU per saga than glibc's malloc under load
// (docs/performance.md), for a few MiB more resident memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match InventoryConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("inventory-service: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    // lapin logs a returned message whole (see saga-amqp's
    // RETURNED_MESSAGES_LOG_TARGET): off unless RUST_LOG names it.
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let quiet = saga_amqp::RETURNED_MESSAGES_LOG_TARGET;
    let mut filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    if !directives.contains(quiet)
        && let Ok(off) = format!("{quiet}=off").parse()
    {
        filter = filter.add_directive(off);
    }
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let service = match InventoryService::build(config).await {
        Ok(service) => service,
        Err(error) => {
            eprintln!("inventory-service: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(saga_core::cancel_on_signal(shutdown.clone()));
    service.run_until_stopped(shutdown).await;
    ExitCode::SUCCESS
}
