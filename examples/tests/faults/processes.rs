//! The real binaries as child processes: started with a scenario's database
//! and virtual host, killed with SIGKILL, restarted on the same ports. Their
//! output goes to a log file per process (and stays in memory for the test
//! to search); a failing test prints the tail. Children are killed when
//! dropped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_service::proto::order_service_client::OrderServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{POLL, Scenario};
use crate::metrics_port::get_metrics;

/// How long a process may take to start serving (the first start migrates).
const START_PATIENCE: Duration = Duration::from_secs(60);

/// How many log lines a failing test prints per process.
const TAIL: usize = 40;

/// The order-service binary: `cargo test --workspace` builds it beside the
/// inventory-service binary this test target depends on.
pub fn order_service_binary() -> PathBuf {
    let inventory = PathBuf::from(env!("CARGO_BIN_EXE_inventory-service"));
    let path = inventory.with_file_name(format!("order-service{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p order-service` (`cargo test --workspace` builds it)",
        path.display()
    );
    path
}

/// Everything a process wrote, by incarnation, also copied to its log file.
pub struct LogBook {
    lines: Mutex<Vec<(u32, String)>>,
    file: Mutex<Option<File>>,
    path: PathBuf,
}

impl LogBook {
    fn new(path: PathBuf) -> Self {
        let file = File::create(&path).ok();
        Self {
            lines: Mutex::new(Vec::new()),
            file: Mutex::new(file),
            path,
        }
    }

    fn push(&self, incarnation: u32, line: String) {
        if let Some(file) = self.file.lock().expect("not poisoned").as_mut() {
            let _ = writeln!(file, "[{incarnation}] {line}");
        }
        self.lines.lock().expect("not poisoned").push((incarnation, line));
    }

    /// The first line of `incarnation` matching `predicate`.
    pub fn find(&self, incarnation: u32, predicate: impl Fn(&str) -> bool) -> Option<String> {
        self.lines
            .lock()
            .expect("not poisoned")
            .iter()
            .find(|(n, line)| *n == incarnation && predicate(line))
            .map(|(_, line)| line.clone())
    }

    /// Lines of any incarnation matching `predicate`.
    pub fn matching(&self, predicate: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, line)| predicate(line))
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("not poisoned");
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .map(|(incarnation, line)| format!("  [{incarnation}] {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn copy_lines(stream: impl AsyncRead + Unpin, log: Arc<LogBook>, incarnation: u32) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(incarnation, line);
    }
}

/// A restartable child process.
struct Process {
    label: String,
    program: PathBuf,
    env: Vec<(String, String)>,
    log: Arc<LogBook>,
    child: Option<Child>,
    incarnation: u32,
}

/// Variables of the environment the test runs in that must not leak into a child.
const SCRUBBED: &[&str] = &[
    "DATABASE_URL",
    "RABBITMQ_URL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "ADMIN_TOKEN",
    "GRPC_PORT",
    "METRICS_PORT",
    "STOCK_REPLY_TIMEOUT",
    "INVENTORY_SEED",
    "INVENTORY_SCHEMA",
    "RUST_LOG",
];

impl Process {
    fn new(scenario: &Scenario, label: &str, program: PathBuf, env: Vec<(String, String)>) -> Self {
        Self {
            label: label.to_owned(),
            program,
            env,
            log: Arc::new(LogBook::new(scenario.logs.join(format!("{label}.log")))),
            child: None,
            incarnation: 0,
        }
    }

    fn set(&mut self, name: &str, value: String) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value));
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.label);
        self.incarnation += 1;
        let mut command = Command::new(&self.program);
        for name in SCRUBBED {
            command.env_remove(name);
        }
        let mut child = command
            .envs(self.env.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{} ({}) could not start: {e}", self.label, self.program.display()));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(copy_lines(stdout, self.log.clone(), self.incarnation));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(copy_lines(stderr, self.log.clone(), self.incarnation));
        }
        self.child = Some(child);
    }

    /// SIGKILL, and waits until it is gone.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .unwrap_or_else(|e| panic!("{} could not be killed: {e}", self.label));
        }
    }

    /// Panics (with the log's tail) if the process has exited.
    fn assert_alive(&mut self, doing: &str) {
        let exited = match self.child.as_mut() {
            None => Some("not running".to_owned()),
            Some(child) => child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| format!("exited ({status})")),
        };
        if let Some(how) = exited {
            panic!(
                "{} {how} while {doing}; its log ({}):\n{}",
                self.label,
                self.log.path().display(),
                self.log.tail(TAIL)
            );
        }
    }

    /// Waits until this incarnation logs a line matching `predicate`.
    async fn wait_for_line(&mut self, what: &str, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        loop {
            if let Some(line) = self.log.find(self.incarnation, &predicate) {
                return line;
            }
            self.assert_alive(what);
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {what} not within {START_PATIENCE:?}; its log:\n{}",
                self.label,
                self.log.tail(TAIL)
            );
            tokio::time::sleep(POLL / 2).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}), last {TAIL} lines:\n{}",
                self.label,
                self.log.path().display(),
                self.log.tail(TAIL)
            );
        }
    }
}

/// The order-service binary in production mode on the scenario's database
/// and virtual host, on loopback ports kept across restarts.
pub struct OrderService {
    process: Process,
    channel: Channel,
    metrics_port: u16,
}

impl OrderService {
    /// Starts it with `STOCK_REPLY_TIMEOUT=stock_reply_timeout` (e.g. `60s`)
    /// and waits until it is SERVING.
    pub async fn start(scenario: &Scenario, label: &str, stock_reply_timeout: &str) -> Self {
        let env = vec![
            ("DATABASE_URL".to_owned(), scenario.database_url.clone()),
            ("RABBITMQ_URL".to_owned(), scenario.amqp_url.clone()),
            ("GRPC_PORT".to_owned(), "127.0.0.1:0".to_owned()),
            ("METRICS_PORT".to_owned(), "127.0.0.1:0".to_owned()),
            ("STOCK_REPLY_TIMEOUT".to_owned(), stock_reply_timeout.to_owned()),
            ("LOG_FORMAT".to_owned(), "json".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        let mut process = Process::new(scenario, label, order_service_binary(), env);
        process.spawn();
        let started = process
            .wait_for_line("listening", |line| line.contains("\"grpc_port\""))
            .await;
        let event: serde_json::Value = serde_json::from_str(&started).unwrap_or_default();
        let port = |name: &str| {
            event
                .get(name)
                .or_else(|| event.get("fields").and_then(|f| f.get(name)))
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("no {name} in the start-up line `{started}`"))
        };
        let (grpc_port, metrics_port) = (port("grpc_port"), port("metrics_port"));
        // Restarts come back on the same ports, so clients reconnect by themselves.
        process.set("GRPC_PORT", format!("127.0.0.1:{grpc_port}"));
        process.set("METRICS_PORT", format!("127.0.0.1:{metrics_port}"));
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{grpc_port}"))
            .expect("a valid URI")
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        let mut service = Self {
            process,
            channel,
            metrics_port,
        };
        service.wait_until_serving().await;
        service
    }

    /// The value of the unlabelled metric `name` on its `/metrics`, if it
    /// answers and shows it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let response = get_metrics(self.metrics_port, Duration::from_secs(5)).await.ok()?;
        response
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A client (sharing one connection, which reconnects after restarts).
    pub fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel.clone())
    }

    /// The gRPC channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// What it logged.
    pub fn log(&self) -> &LogBook {
        &self.process.log
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts it again (same ports, same environment) and waits until it is SERVING.
    pub async fn restart(&mut self) {
        self.process.spawn();
        self.wait_until_serving().await;
    }

    /// Panics, with its log, if it is no longer running.
    pub fn assert_alive(&mut self, doing: &str) {
        self.process.assert_alive(doing);
    }

    async fn wait_until_serving(&mut self) {
        let deadline = tokio::time::Instant::now() + START_PATIENCE;
        loop {
            let request = HealthCheckRequest { service: String::new() };
            let status = HealthClient::new(self.channel.clone())
                .check(request)
                .await
                .map(|response| response.into_inner().status());
            if matches!(status, Ok(ServingStatus::Serving)) {
                return;
            }
            self.process.assert_alive("starting");
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not SERVING within {START_PATIENCE:?} ({status:?}); its log:\n{}",
                self.process.label,
                self.process.log.tail(TAIL)
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The inventory-service example binary on the scenario's database (schema
/// `inventory`) and virtual host.
pub struct InventoryService {
    process: Process,
}

impl InventoryService {
    /// Starts it seeded with `seed` (`p1=100,p2=5`) and waits until it is ready.
    pub async fn start(scenario: &Scenario, seed: &str) -> Self {
        let env = vec![
            ("DATABASE_URL".to_owned(), scenario.database_url.clone()),
            ("RABBITMQ_URL".to_owned(), scenario.amqp_url.clone()),
            ("INVENTORY_SEED".to_owned(), seed.to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
            ("NO_COLOR".to_owned(), "1".to_owned()),
        ];
        let program = PathBuf::from(env!("CARGO_BIN_EXE_inventory-service"));
        let mut service = Self {
            process: Process::new(scenario, "inventory-service", program, env),
        };
        service.process.spawn();
        service.wait_until_ready().await;
        service
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Panics, with its log, if it is no longer running.
    pub fn assert_alive(&mut self, doing: &str) {
        self.process.assert_alive(doing);
    }

    /// Starts it again and waits until it is ready.
    pub async fn restart(&mut self) {
        self.process.spawn();
        self.wait_until_ready().await;
    }

    async fn wait_until_ready(&mut self) {
        self.process
            .wait_for_line("ready", |line| line.trim_end().ends_with(" ready"))
            .await;
    }
}
