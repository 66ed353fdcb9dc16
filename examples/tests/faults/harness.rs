//! One scenario's world: a fresh PostgreSQL database and a fresh RabbitMQ
//! virtual host (so the binaries run with the platform's default exchange
//! and queue names), a directory for the processes' logs, and the turn:
//! scenarios run one at a time, since some of them stop PostgreSQL or
//! RabbitMQ for the whole machine. Everything is removed when the scenario
//! is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use tokio::sync::{Mutex, MutexGuard};

use crate::backends::{self, START_BACKENDS, amqp_url_of, database_url_of, rabbitmqctl};

/// Scenarios take turns: one at a time in this process.
static TURN: Mutex<()> = Mutex::const_new(());

/// Time between polls.
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `probe` every [`POLL`] until it returns `Some`, at most `patience`;
/// then panics saying `what` did not happen.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {patience:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A scenario's database, virtual host and log directory.
pub struct Scenario {
    /// Its title, as printed in the accounting line.
    pub title: &'static str,
    /// The fresh database, for the services.
    pub database_url: String,
    /// The fresh virtual host, for the services and the test's own clients.
    pub amqp_url: String,
    /// A small pool on the fresh database, for the test's reads.
    pub db: PgPool,
    /// Where the processes write their logs.
    pub logs: PathBuf,
    database: String,
    vhost: String,
    _turn: MutexGuard<'static, ()>,
}

impl Scenario {
    /// Waits for its turn, then creates the database and the virtual host.
    /// Fails saying what to start when PostgreSQL or RabbitMQ is not there.
    pub async fn new(title: &'static str, slug: &str) -> Self {
        let turn = TURN.lock().await;
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let database = format!("saga_faults_{slug}_{}", &suffix[suffix.len() - 12..]);
        let vhost = database.clone();

        let mut admin = sqlx::PgConnection::connect(&backends::admin_database_url())
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at DATABASE_URL ({e}); {START_BACKENDS}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .expect("the scenario's database is created");
        let _ = admin.close().await;

        rabbitmqctl(&["add_vhost", &vhost])
            .await
            .unwrap_or_else(|e| panic!("{e}; {START_BACKENDS}"));
        let scenario = Self {
            title,
            database_url: database_url_of(&database),
            amqp_url: amqp_url_of(&vhost),
            db: PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy(&database_url_of(&database))
                .expect("a valid database URL"),
            logs: logs_dir(slug),
            database,
            vhost,
            _turn: turn,
        };
        rabbitmqctl(&["set_permissions", "-p", &scenario.vhost, "guest", ".*", ".*", ".*"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(&scenario.logs);
        std::fs::create_dir_all(&scenario.logs).expect("the log directory is created");
        scenario
    }
}

impl Scenario {
    /// Messages in each queue of the virtual host, ready and being handled
    /// (unacknowledged) together.
    pub async fn queue_totals(&self) -> HashMap<String, u64> {
        let output = tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "-p",
                &self.vhost,
                "name",
                "messages",
            ])
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl list_queues: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let (name, count) = line.rsplit_once('\t')?;
                Some((name.trim().to_owned(), count.trim().parse().ok()?))
            })
            .collect()
    }
}

/// `<target>/debug/faults-logs/<slug>`, beside the binaries under test.
fn logs_dir(slug: &str) -> PathBuf {
    let binaries = PathBuf::from(env!("CARGO_BIN_EXE_inventory-service"));
    binaries
        .parent()
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join("faults-logs")
        .join(slug)
}

impl Drop for Scenario {
    /// Drops the database and deletes the virtual host, on a thread of its
    /// own (this one may be inside the test's runtime).
    fn drop(&mut self) {
        let database = self.database.clone();
        let vhost = self.vhost.clone();
        let pool = self.db.clone();
        let cleaning = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                pool.close().await;
                let cleaning = async {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&backends::admin_database_url()).await {
                        let drop = format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
                        let _ = conn.close().await;
                    }
                    let _ = rabbitmqctl(&["delete_vhost", &vhost]).await;
                };
                let _ = tokio::time::timeout(Duration::from_secs(60), cleaning).await;
            });
        });
        let _ = cleaning.join();
    }
}
