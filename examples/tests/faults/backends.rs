//! The machine's PostgreSQL and RabbitMQ: where they are, how to reach them
//! from a scenario, and how to take them down and bring them back (the
//! outage scenarios). Stopping either one affects the whole machine, so the
//! guards here always start it again, also when a test panics.

use std::process::Command as StdCommand;
use std::time::Duration;

use tokio::process::Command;

/// What to start when a backend is missing.
pub const START_BACKENDS: &str = "start PostgreSQL (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) \
     main start`) and RabbitMQ (`rabbitmq-server -detached`); DATABASE_URL / RABBITMQ_URL choose them";

/// How long a backend may take to come back after it was started again.
const COME_BACK: Duration = Duration::from_secs(60);

/// The admin database URL: used to create and drop each scenario's database.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `DATABASE_URL` with its database replaced by `database`.
pub fn database_url_of(database: &str) -> String {
    let admin = admin_database_url();
    let (base, query) = admin
        .split_once('?')
        .map_or((admin.as_str(), None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(base, _)| base);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// `RABBITMQ_URL` with its virtual host replaced by `vhost` (a plain name:
/// letters, digits and `_`, so it needs no escaping).
pub fn amqp_url_of(vhost: &str) -> String {
    let url = std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url.as_str()));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    format!("{scheme}://{authority}/{vhost}")
}

/// Runs `rabbitmqctl args…`; the error carries its output.
pub async fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("rabbitmqctl {args:?} could not run ({e}); is RabbitMQ installed here?"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The same, blocking (for `Drop`).
fn rabbitmqctl_blocking(args: &[&str]) -> bool {
    StdCommand::new("rabbitmqctl")
        .args(args)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The local PostgreSQL cluster's version (the directory under `/etc/postgresql`).
fn postgres_version() -> Result<String, String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no /etc/postgresql ({e}): the PostgreSQL outage needs a local Debian-style cluster"))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| "no cluster under /etc/postgresql".to_owned())
}

fn pg_ctlcluster(version: &str, action: &str) -> Result<(), String> {
    let mut command = StdCommand::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", version, "main", action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    let output = command
        .output()
        .map_err(|e| format!("pg_ctlcluster could not run ({e})"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "pg_ctlcluster {version} main {action} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Whether PostgreSQL accepts connections on loopback.
fn postgres_ready() -> bool {
    StdCommand::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1"])
        .status()
        .is_ok_and(|status| status.success())
}

/// Waits (blocking) until PostgreSQL accepts connections, at most [`COME_BACK`].
fn wait_for_postgres() -> bool {
    let deadline = std::time::Instant::now() + COME_BACK;
    while std::time::Instant::now() < deadline {
        if postgres_ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// PostgreSQL stopped (`pg_ctlcluster … stop -m fast`). Started again by
/// [`start`](Self::start), or when dropped (a failing test included).
pub struct PostgresOutage {
    version: String,
    over: bool,
}

impl PostgresOutage {
    /// Stops the local cluster (every connection on the machine is cut).
    pub async fn begin() -> Self {
        let version = postgres_version().unwrap_or_else(|e| panic!("{e}"));
        let stopping = version.clone();
        tokio::task::spawn_blocking(move || pg_ctlcluster(&stopping, "stop"))
            .await
            .expect("pg_ctlcluster ran")
            .unwrap_or_else(|e| panic!("PostgreSQL could not be stopped: {e}"));
        Self { version, over: false }
    }

    /// Starts it again and waits until it accepts connections.
    pub async fn end(mut self) {
        self.over = true;
        let version = self.version.clone();
        let started = tokio::task::spawn_blocking(move || {
            pg_ctlcluster(&version, "start")?;
            if wait_for_postgres() {
                Ok(())
            } else {
                Err(format!("PostgreSQL not ready within {COME_BACK:?} of starting"))
            }
        })
        .await
        .expect("pg_ctlcluster ran");
        started.unwrap_or_else(|e| panic!("PostgreSQL could not be started again: {e}; {START_BACKENDS}"));
    }
}

impl Drop for PostgresOutage {
    fn drop(&mut self) {
        if !self.over {
            if let Err(e) = pg_ctlcluster(&self.version, "start") {
                eprintln!("faults: PostgreSQL could not be started again: {e}; {START_BACKENDS}");
            }
            if !wait_for_postgres() {
                eprintln!("faults: PostgreSQL is not back; {START_BACKENDS}");
            }
        }
    }
}

/// RabbitMQ's application stopped (`rabbitmqctl stop_app`; the Erlang node
/// stays up). Started again by [`end`](Self::end), or when dropped.
pub struct BrokerOutage {
    over: bool,
}

impl BrokerOutage {
    /// Stops the broker application (every connection on the machine is cut).
    pub async fn begin() -> Self {
        rabbitmqctl(&["stop_app"])
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ could not be stopped: {e}"));
        Self { over: false }
    }

    /// Starts it again and waits until it is up.
    pub async fn end(mut self) {
        self.over = true;
        rabbitmqctl(&["start_app"])
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ could not be started again: {e}; {START_BACKENDS}"));
        rabbitmqctl(&["await_startup"])
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ did not come back: {e}; {START_BACKENDS}"));
    }
}

impl Drop for BrokerOutage {
    fn drop(&mut self) {
        if self.over {
            return;
        }
        let back = rabbitmqctl_blocking(&["start_app"]) && rabbitmqctl_blocking(&["await_startup"]);
        if !back {
            eprintln!("faults: RabbitMQ could not be started again; {START_BACKENDS}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_point_at_the_scenario() {
        if std::env::var_os("DATABASE_URL").is_none() {
            assert_eq!(
                database_url_of("saga_faults_x"),
                "postgres://postgres@127.0.0.1:5432/saga_faults_x"
            );
        }
        if std::env::var_os("RABBITMQ_URL").is_none() {
            assert_eq!(
                amqp_url_of("saga_faults_x"),
                "amqp://guest:guest@127.0.0.1:5672/saga_faults_x"
            );
        }
    }
}
