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

use super::stage::{AMQP_IO_THREADS, INVENTORY_THREADS, ORDER_SERVICE_THREADS};
use super::usage;

/// The thread groups [`ProcessParts`] splits this process's CPU into, in
/// its field order.
const PROCESS_PARTS: [&str; 3] = [ORDER_SERVICE_THREADS, INVENTORY_THREADS, AMQP_IO_THREADS];

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
    /// The live threads of [`PROCESS_PARTS`], in its order.
    thread_cpu: Option<Vec<Duration>>,
    batches: Option<Batches>,
    /// The running sums and counts of the [`timed`] series, in order.
    timed: [Option<Running>; 3],
}

/// The series [`Waits`] are read from, as Prometheus renders them:
/// saga-core's timings of the order service's commits, the inventory's
/// transactions and the relays' publishes (both services').
fn timed() -> [String; 3] {
    [
        format!("saga_commit_seconds{{saga=\"{}\"}}", order_service::saga::ORDER_SAGA),
        format!(
            "saga_participant_commit_seconds{{participant=\"{}\"}}",
            crate::inventory::PARTICIPANT
        ),
        "saga_outbox_publish_seconds".to_owned(),
    ]
}

/// A histogram's running sum and count.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Running {
    sum: f64,
    count: f64,
}

impl Running {
    /// Read off Prometheus text: `series` is the histogram's name with its
    /// labels, as rendered; its `_sum` and `_count` lines carry them after
    /// the name.
    fn from_prometheus(text: &str, series: &str) -> Option<Self> {
        let (name, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
        let value = |suffix: &str| {
            let line = format!("{name}{suffix}{labels} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str())?.trim().parse::<f64>().ok())
        };
        Some(Self {
            sum: value("_sum")?,
            count: value("_count")?,
        })
    }

    /// The mean in milliseconds of the samples recorded after `before`.
    fn mean_ms_since(&self, before: Option<Running>) -> Option<f64> {
        let before = before.unwrap_or(Running { sum: 0.0, count: 0.0 });
        let count = self.count - before.count;
        (count > 0.0).then(|| (self.sum - before.sum) / count * 1000.0)
    }
}

/// The mean waits on the store and the broker in the window, in
/// milliseconds (saga-core's histograms in this process's recorder).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Waits {
    /// A transition's commit in the order service, from its transaction's
    /// begin: the group commit's wait and statement.
    pub order_service_commit_ms: Option<f64>,
    /// An inventory transaction, from its begin (after the batch's linger)
    /// to its commit.
    pub inventory_transaction_ms: Option<f64>,
    /// A message's publish until the broker's confirm, both services.
    pub publish_to_confirm_ms: Option<f64>,
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
    /// The same, split by thread (read from `/proc`, Linux).
    pub process_cpu_ms_per_saga_by_part: Option<ProcessParts>,
    /// WAL bytes, cluster-wide.
    pub wal_bytes_per_saga: Option<f64>,
    /// Of the in-process inventory's commands, the share handled in a
    /// transaction shared with others (`INVENTORY_BATCH`; the load orders
    /// only, so one command per saga).
    pub inventory_commands_shared: Option<f64>,
    /// Commands per shared inventory transaction.
    pub inventory_commands_per_shared_transaction: Option<f64>,
    /// Where a saga waits on PostgreSQL and RabbitMQ (means, not per saga).
    pub waits: Waits,
}

/// This process's CPU milliseconds per saga, by the threads that spent them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessParts {
    /// The in-process order service's runtime (gRPC, engine, relay, consumer).
    pub order_service: f64,
    /// The in-process inventory's runtime.
    pub inventory: f64,
    /// lapin's I/O threads, one per AMQP connection: both services' and
    /// the observer's.
    pub amqp_io: f64,
    /// The rest: the load generator's runtime (gRPC clients, the observer)
    /// and threads that ended during the window.
    pub load_generator_and_rest: f64,
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
    let metrics = order_service::telemetry::prometheus().render();
    CostSample {
        at: Instant::now(),
        completed,
        transactions,
        backend_cpu_ns,
        wal_bytes,
        broker_cpu: usage::cpu_of_command(usage::BROKER_COMMAND),
        process_cpu: usage::process_cpu(None),
        thread_cpu: usage::thread_cpu(&PROCESS_PARTS),
        batches: Batches::from_prometheus(&metrics),
        timed: timed().map(|series| Running::from_prometheus(&metrics, &series)),
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
        let process_ms = ms(before.process_cpu, after.process_cpu);
        let part_ms = |i: usize| {
            let (a, b) = (before.thread_cpu.as_ref()?, after.thread_cpu.as_ref()?);
            ms(a.get(i).copied(), b.get(i).copied())
        };
        let by_part = process_ms.and_then(|process| {
            let [order_service, inventory, amqp_io] = [part_ms(0)?, part_ms(1)?, part_ms(2)?];
            Some(ProcessParts {
                order_service,
                inventory,
                amqp_io,
                // Ticks are read apart, so the parts may pass the whole by a tick.
                load_generator_and_rest: (process - order_service - inventory - amqp_io).max(0.0),
            })
        });
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
            process_cpu_ms_per_saga: process_ms,
            process_cpu_ms_per_saga_by_part: by_part,
            wal_bytes_per_saga: before.wal_bytes.zip(after.wal_bytes).map(|(a, b)| per(b - a)),
            inventory_commands_shared: shared.map(|(commands, _)| per(commands)),
            inventory_commands_per_shared_transaction: shared
                .filter(|(_, transactions)| *transactions > 0.0)
                .map(|(commands, transactions)| commands / transactions),
            waits: {
                let [order_service_commit_ms, inventory_transaction_ms, publish_to_confirm_ms] =
                    std::array::from_fn(|i| after.timed[i]?.mean_ms_since(before.timed[i]));
                Waits {
                    order_service_commit_ms,
                    inventory_transaction_ms,
                    publish_to_confirm_ms,
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(completed: u64, process_ms: u64, threads_ms: [u64; 3]) -> CostSample {
        CostSample {
            at: Instant::now(),
            completed,
            transactions: Some(0),
            backend_cpu_ns: Some(0),
            wal_bytes: Some(0.0),
            broker_cpu: None,
            process_cpu: Some(Duration::from_millis(process_ms)),
            thread_cpu: Some(threads_ms.map(Duration::from_millis).to_vec()),
            batches: None,
            timed: [None; 3],
        }
    }

    #[test]
    fn the_process_is_split_by_thread_and_the_rest_is_what_no_group_spent() {
        let costs = SagaCosts::between(
            &sample(100, 1_000, [300, 100, 50]),
            &sample(300, 3_000, [1_100, 500, 250]),
        )
        .expect("sagas completed");
        assert_eq!(costs.process_cpu_ms_per_saga, Some(10.0));
        assert_eq!(
            costs.process_cpu_ms_per_saga_by_part,
            Some(ProcessParts {
                order_service: 4.0,
                inventory: 2.0,
                amqp_io: 1.0,
                load_generator_and_rest: 3.0,
            })
        );
        let mut unread = sample(300, 3_000, [0; 3]);
        unread.thread_cpu = None;
        let costs = SagaCosts::between(&sample(100, 1_000, [0; 3]), &unread).expect("sagas completed");
        assert_eq!(
            costs.process_cpu_ms_per_saga_by_part, None,
            "no split without both readings"
        );
    }

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

    /// The series are read off what the service's exporter renders (the
    /// process-wide recorder, with its buckets), not only off the text the
    /// test below writes by hand.
    #[test]
    fn waits_are_read_off_what_the_exporter_renders() {
        let handle = order_service::telemetry::prometheus();
        metrics::histogram!("saga_commit_seconds", "saga" => order_service::saga::ORDER_SAGA).record(0.004);
        metrics::histogram!("saga_participant_commit_seconds", "participant" => crate::inventory::PARTICIPANT)
            .record(0.002);
        metrics::histogram!("saga_outbox_publish_seconds").record(0.001);
        let text = order_service::telemetry::render(&handle);
        for series in timed() {
            let running = Running::from_prometheus(&text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
            assert!(running.count >= 1.0 && running.sum > 0.0, "{series}: {running:?}");
        }
    }

    #[test]
    fn waits_are_the_means_of_the_histograms_between_the_samples() {
        let text = |sum: f64, count: u32| {
            format!(
                "saga_commit_seconds_bucket{{saga=\"order\",le=\"0.001\"}} 1\n\
                 saga_commit_seconds_sum{{saga=\"other\"}} 99\n\
                 saga_commit_seconds_sum{{saga=\"order\"}} {sum}\n\
                 saga_commit_seconds_count{{saga=\"order\"}} {count}\n\
                 saga_outbox_publish_seconds_sum 0.5\n\
                 saga_outbox_publish_seconds_count 100\n"
            )
        };
        let read = |text: &str| timed().map(|series| Running::from_prometheus(text, &series));
        let mut before = sample(100, 1_000, [0; 3]);
        before.timed = read(&text(0.25, 100));
        let mut after = sample(300, 3_000, [0; 3]);
        after.timed = read(&text(1.25, 300));
        let waits = SagaCosts::between(&before, &after).expect("sagas completed").waits;
        // (1.25 - 0.25) s over 200 commits; no publish in the window; no inventory.
        assert_eq!(
            waits,
            Waits {
                order_service_commit_ms: Some(5.0),
                inventory_transaction_ms: None,
                publish_to_confirm_ms: None,
            }
        );
        // Before the first sample of a histogram, all of it is in the window.
        before.timed = [None; 3];
        let waits = SagaCosts::between(&before, &after).expect("sagas completed").waits;
        assert_eq!(waits.publish_to_confirm_ms, Some(5.0));
    }
}
