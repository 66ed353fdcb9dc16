//! What one saga costs each component, sampled twice while the load runs
//! (so the warm-up, the tail and PostgreSQL's statistics delay of about a
//! second fall outside the window): PostgreSQL transactions in the run's
//! database, CPU of its backends, of the RabbitMQ server and of this
//! process, and WAL written (cluster-wide: other databases' writes count
//! too). Deterministic counts like transactions per saga do not depend on
//! what else the machine runs; CPU per saga much less than throughput does.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::Connection;

use super::usage;

/// One reading of the counters.
#[derive(Clone, Debug)]
pub(crate) struct CostSample {
    at: Instant,
    completed: u64,
    transactions: Option<i64>,
    backend_cpu_ns: Option<i64>,
    wal_bytes: Option<f64>,
    broker_cpu: Option<Duration>,
    process_cpu: Option<Duration>,
    batches: Option<Batches>,
}

/// The participant batching counters of this process's recorder (the
/// in-process inventory's): commands committed in shared transactions and
/// how many such transactions.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Batches {
    commands: f64,
    transactions: f64,
}

impl Batches {
    /// Read off Prometheus text: the `saga_participant_batch_size`
    /// histogram's sum and count (rendered as a summary). `None` before any
    /// shared transaction, or with the inventory in another process.
    fn from_prometheus(text: &str) -> Option<Self> {
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        };
        Some(Self {
            commands: value("saga_participant_batch_size_sum")?,
            transactions: value("saga_participant_batch_size_count")?,
        })
    }
}

/// Per completed saga, between two samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SagaCosts {
    /// Sagas completed between the samples.
    pub sagas: u64,
    /// Seconds between the samples.
    pub seconds: f64,
    /// Committed and rolled-back transactions in the run's database.
    pub transactions_per_saga: Option<f64>,
    /// CPU milliseconds of the PostgreSQL backends connected to the run's
    /// database (read from `/proc` through `pg_read_file`: needs a superuser).
    pub postgres_cpu_ms_per_saga: Option<f64>,
    /// CPU milliseconds of the RabbitMQ server (`beam.smp`, when it runs on
    /// this machine; other users of the broker count too).
    pub rabbitmq_cpu_ms_per_saga: Option<f64>,
    /// CPU milliseconds of this process (services, load generator, observer).
    pub process_cpu_ms_per_saga: Option<f64>,
    /// WAL bytes, cluster-wide.
    pub wal_bytes_per_saga: Option<f64>,
    /// Of the in-process inventory's commands, the share handled in a
    /// transaction shared with others (`INVENTORY_BATCH`; the load orders
    /// only, so one command per saga).
    pub inventory_commands_shared: Option<f64>,
    /// Commands per shared inventory transaction.
    pub inventory_commands_per_shared_transaction: Option<f64>,
}

/// Reads the counters through `conn` (a connection to the run's database).
pub(crate) async fn sample(conn: &mut sqlx::PgConnection, completed: u64) -> CostSample {
    let transactions: Option<i64> = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await
    .ok();
    let backend_cpu_ns: Option<i64> = sqlx::query_scalar(
        "SELECT sum(split_part(pg_read_file('/proc/' || pid || '/schedstat'), ' ', 1)::bigint)::bigint \
         FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut *conn)
    .await
    .ok()
    .flatten();
    let wal_bytes: Option<f64> = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8")
        .fetch_one(&mut *conn)
        .await
        .ok();
    CostSample {
        at: Instant::now(),
        completed,
        transactions,
        backend_cpu_ns,
        wal_bytes,
        broker_cpu: usage::cpu_of_command("beam.smp"),
        process_cpu: usage::cpu(None, "").map(|c| c.process),
        batches: Batches::from_prometheus(&order_service::telemetry::prometheus().render()),
    }
}

/// Opens the connection [`sample`] reads through.
pub(crate) async fn connect(database_url: &str) -> Option<sqlx::PgConnection> {
    sqlx::PgConnection::connect(database_url).await.ok()
}

impl SagaCosts {
    /// The costs between `before` and `after`; `None` if no saga completed.
    pub(crate) fn between(before: &CostSample, after: &CostSample) -> Option<Self> {
        let sagas = after.completed.checked_sub(before.completed).filter(|n| *n > 0)?;
        let per = |value: f64| value / sagas as f64;
        // No shared transaction before the window: all of them fell in it.
        let shared = after.batches.map(|after| {
            let before = before.batches.unwrap_or(Batches {
                commands: 0.0,
                transactions: 0.0,
            });
            (
                after.commands - before.commands,
                after.transactions - before.transactions,
            )
        });
        let ms = |a: Option<Duration>, b: Option<Duration>| {
            a.zip(b).map(|(a, b)| per(b.saturating_sub(a).as_secs_f64() * 1000.0))
        };
        Some(Self {
            sagas,
            seconds: after.at.saturating_duration_since(before.at).as_secs_f64(),
            transactions_per_saga: before
                .transactions
                .zip(after.transactions)
                .map(|(a, b)| per((b - a) as f64)),
            postgres_cpu_ms_per_saga: before
                .backend_cpu_ns
                .zip(after.backend_cpu_ns)
                .map(|(a, b)| per((b - a) as f64 / 1e6)),
            rabbitmq_cpu_ms_per_saga: ms(before.broker_cpu, after.broker_cpu),
            process_cpu_ms_per_saga: ms(before.process_cpu, after.process_cpu),
            wal_bytes_per_saga: before.wal_bytes.zip(after.wal_bytes).map(|(a, b)| per(b - a)),
            inventory_commands_shared: shared.map(|(commands, _)| per(commands)),
            inventory_commands_per_shared_transaction: shared
                .filter(|(_, transactions)| *transactions > 0.0)
                .map(|(commands, transactions)| commands / transactions),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_read_off_the_summary_lines() {
        let text = "# TYPE saga_participant_batch_size summary\n\
                    saga_participant_batch_size{quantile=\"0.5\"} 4\n\
                    saga_participant_batch_size_sum 120\n\
                    saga_participant_batch_size_count 30\n\
                    saga_participant_batch_size_sums 1\n";
        assert_eq!(
            Batches::from_prometheus(text),
            Some(Batches {
                commands: 120.0,
                transactions: 30.0
            })
        );
        assert_eq!(Batches::from_prometheus("saga_messages_total 3\n"), None);
    }
}
