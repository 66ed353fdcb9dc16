//! Configuration from environment variables, parsed once into typed values.
//! A bad value is a [`ConfigError`] naming the variable.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::time::Duration;

use saga_postgres::{RetentionConfig, SHORT_INBOX_RETENTION};

use crate::saga::DEFAULT_STOCK_REPLY_TIMEOUT;
use crate::wire::WireNames;

/// A variable that does not hold a usable value. Fix the variable and restart.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: Cow<'static, str>,
    /// What is wrong with its value (never the value of a secret).
    pub reason: String,
}

impl ConfigError {
    /// `variable` holds no usable value, because `reason`.
    pub fn new(variable: &'static str, reason: impl fmt::Display) -> Self {
        Self {
            variable: Cow::Borrowed(variable),
            reason: reason.to_string(),
        }
    }
}

/// Runs `read` (a `from_lookup`) over the process environment. A variable
/// set to bytes that are not UTF-8 is an error naming it, not taken for
/// unset: an unreadable `ADMIN_TOKEN` would otherwise leave the dashboard
/// open, and unreadable URLs would start embedded mode.
pub fn from_process_env<T>(
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let unreadable = RefCell::new(None);
    let lookup = |name: &str| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            unreadable.borrow_mut().get_or_insert_with(|| name.to_owned());
            None
        }
    };
    let read = read(&lookup);
    match unreadable.into_inner() {
        Some(variable) => Err(ConfigError {
            variable: Cow::Owned(variable),
            reason: "is not valid UTF-8".to_owned(),
        }),
        None => read,
    }
}

/// Where to listen: `:50054` (every interface), `host:port` or `[::1]:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenAddr {
    /// Host name or IP address.
    pub host: String,
    /// Port; 0 picks a free one.
    pub port: u16,
}

impl ListenAddr {
    /// Every interface, `port`.
    pub fn any(port: u16) -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            port,
        }
    }

    /// The loopback interface, `port` (0 for tests).
    pub fn localhost(port: u16) -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port,
        }
    }

    /// Listens here; returns the listener and the port it got (the one
    /// asked for, or a free one for port 0).
    pub async fn bind(&self) -> std::io::Result<(tokio::net::TcpListener, u16)> {
        let listener = tokio::net::TcpListener::bind((self.host.as_str(), self.port)).await?;
        let port = listener.local_addr()?.port();
        Ok((listener, port))
    }

    /// Parses `value` of the environment variable `variable` (named in the
    /// error): `:port`, `port`, `host:port` or `[v6]:port`.
    pub fn parse(variable: &'static str, value: &str) -> Result<Self, ConfigError> {
        let invalid = |why: &str| {
            ConfigError::new(
                variable,
                format_args!("{why} (expected `:port` or `host:port`, got `{value}`)"),
            )
        };
        let (host, port) = match value.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => ("", value),
        };
        let port: u16 = port.parse().map_err(|_| invalid("not a port number"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.contains(char::is_whitespace) {
            return Err(invalid("not a host name"));
        }
        Ok(Self {
            host: if host.is_empty() {
                "0.0.0.0".to_owned()
            } else {
                host.to_owned()
            },
            port,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A connection URL that may hold a password: shown with the password masked.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL as given, password included: pass it to the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The user's password masked as saga-amqp masks the broker's (up to
        // the last `@`, so an unescaped `/`, `?` or `#` in it does not end
        // the part masked), then a `password` parameter, which PostgreSQL's
        // URLs take as well.
        let shown = saga_amqp::RedactedUrl(&self.0).to_string();
        let Some((base, query)) = shown.split_once('?') else {
            return f.write_str(&shown);
        };
        f.write_str(base)?;
        for (index, parameter) in query.split('&').enumerate() {
            f.write_str(if index == 0 { "?" } else { "&" })?;
            match parameter.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => write!(f, "{name}=***")?,
                _ => f.write_str(parameter)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// A bearer token (`ADMIN_TOKEN`): never shown in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// `ADMIN_TOKEN`'s value, if a caller could ever present it: gRPC
    /// metadata and HTTP headers carry visible ASCII only, so a token with
    /// other characters would lock everyone out.
    fn parse(token: String) -> Result<Self, ConfigError> {
        if token.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(token))
        } else {
            Err(ConfigError::new(
                "ADMIN_TOKEN",
                "must be visible ASCII characters only (no spaces or other characters): callers send it in a header",
            ))
        }
    }

    /// The token as given: compare it with what a caller presents, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Where state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// In-memory store and in-process transport with a demo stock service:
    /// nothing is durable.
    Embedded,
    /// PostgreSQL and RabbitMQ.
    Production {
        /// `DATABASE_URL`.
        database_url: SecretUrl,
        /// `RABBITMQ_URL`.
        rabbitmq_url: SecretUrl,
    },
}

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// OpenTelemetry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtelConfig {
    /// `OTEL_SERVICE_NAME` (default `order-service`).
    pub service_name: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: traces are exported only when set.
    pub endpoint: Option<String>,
}

/// Everything the service is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `GRPC_PORT` (default `:50054`).
    pub grpc: ListenAddr,
    /// `METRICS_PORT` (default `:9004`): `/metrics`, `/healthz`, `/readyz`.
    pub metrics: ListenAddr,
    /// `DATABASE_URL` + `RABBITMQ_URL`, or neither for embedded mode.
    pub backend: Backend,
    /// `STOCK_REPLY_TIMEOUT` (default `30s`).
    pub stock_reply_timeout: Duration,
    /// `LOG_FORMAT`: `human` (default) or `json`.
    pub log_format: LogFormat,
    /// `RUST_LOG`: which events are logged (default `info`), checked here so
    /// that a typo stops the service instead of being replaced by `info`.
    pub log_filter: Option<String>,
    /// `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otel: OtelConfig,
    /// Exchange and queue names (the platform's).
    pub names: WireNames,
    /// `ADMIN_TOKEN`: the bearer token of the admin API and the dashboard.
    /// While it is unset the admin API is not served and the read-only
    /// dashboard asks for no token.
    pub admin_token: Option<AdminToken>,
    /// `DASHBOARD_STUCK_AFTER` (default `5m`): running or compensating
    /// orders unchanged this long are listed as stuck on the dashboard.
    pub dashboard_stuck_after: Duration,
    /// `DASHBOARD_WINDOW_MINUTES` (default 15, 1 to 60): the minutes the
    /// dashboard charts outcomes over.
    pub dashboard_window_minutes: u32,
    /// What the saga store deletes, and how often (production mode).
    pub retention: Retention,
    /// `CACHED_INSTANCES` (`0` keeps none): live sagas the engine keeps as
    /// it committed them, so a reply is decided without reading its saga
    /// back. Unset: 4,096 in production mode, none in embedded mode, where
    /// a read is no dearer than a copy (`saga_core::EngineConfig::cached_instances`).
    pub cached_instances: Option<usize>,
    /// `COMMIT_LINGER` (default `1ms`, `0` never waits): how long a commit
    /// that would go alone waits for another to share its statement (it
    /// goes as soon as one has), while
    /// commits arrive that densely, or faster than statements finish
    /// (production mode;
    /// `saga_postgres::PostgresStoreConfig::commit_linger`).
    pub commit_linger: Duration,
    /// `STOCK_REPLY_CONCURRENCY` (default 64, 1 to 1,024): `StockUpdateResult`
    /// messages handled at once (production mode). Replies in flight
    /// together share the engine's group commits, so near the machine's
    /// limit more of them mean fewer, larger statements.
    pub stock_reply_concurrency: usize,
    /// `DATABASE_MAX_CONNECTIONS` (default 10, 2 to 1,000): the most
    /// PostgreSQL connections the service opens (production mode). The saga
    /// store's listener for other replicas' commits holds one of them.
    pub database_max_connections: u32,
}

/// How long the saga store keeps rows it no longer needs, so its tables do
/// not grow without end (production mode's tables; embedded mode's store in
/// memory the same way, where sent messages are gone once sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// `INBOX_RETENTION` (default `7d`, at least `1h`): ids of consumed
    /// messages that changed no saga kept this long (a message that moved a
    /// saga is recorded on its history row, kept with the saga).
    /// `SENT_MESSAGE_RETENTION` (default `24h`; `0` deletes them once sent):
    /// sent outbox messages kept this long, for inspection.
    /// `FINISHED_SAGA_RETENTION` (unset by default: kept; at least `1h`):
    /// completed and compensated sagas, with their history, deleted this
    /// long after their last change. The orders themselves are never deleted.
    pub store: RetentionConfig,
    /// `RETENTION_INTERVAL` (default `1h`): how often the store is purged.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            store: RetentionConfig::default(),
            interval: Duration::from_secs(3600),
        }
    }
}

/// The shortest `STOCK_REPLY_TIMEOUT`: the relay's lease.
const SHORTEST_STOCK_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest `RETENTION_INTERVAL`.
const SHORTEST_RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest `FINISHED_SAGA_RETENTION`: the dashboard charts up to an
/// hour of outcomes. (`INBOX_RETENTION`'s floor is saga-postgres's
/// [`SHORT_INBOX_RETENTION`].)
const SHORTEST_FINISHED_SAGA_RETENTION: Duration = Duration::from_secs(3600);

impl Retention {
    /// Reads the process environment, as [`from_lookup`](Self::from_lookup).
    pub fn from_env() -> Result<Self, ConfigError> {
        from_process_env(|lookup| Self::from_lookup(lookup))
    }

    /// Reads `INBOX_RETENTION`, `SENT_MESSAGE_RETENTION`,
    /// `FINISHED_SAGA_RETENTION` and `RETENTION_INTERVAL` through `lookup`
    /// (unset and blank: the default), so a participant's service reads them
    /// alike.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut retention = Self::default();
        if let Some(value) = get("INBOX_RETENTION") {
            retention.store.inbox = retention_at_least(
                "INBOX_RETENTION",
                &value,
                SHORT_INBOX_RETENTION,
                "a message redelivered after its id was forgotten would be applied twice",
            )?;
        }
        if let Some(value) = get("SENT_MESSAGE_RETENTION") {
            retention.store.sent_messages =
                parse_retention(&value).map_err(|why| ConfigError::new("SENT_MESSAGE_RETENTION", why))?;
        }
        if let Some(value) = get("FINISHED_SAGA_RETENTION") {
            retention.store.finished_instances = Some(retention_at_least(
                "FINISHED_SAGA_RETENTION",
                &value,
                SHORTEST_FINISHED_SAGA_RETENTION,
                "the dashboard charts up to the last hour of outcomes",
            )?);
        }
        if let Some(value) = get("RETENTION_INTERVAL") {
            retention.interval = duration_at_least(
                "RETENTION_INTERVAL",
                &value,
                SHORTEST_RETENTION_INTERVAL,
                "each round deletes on every replica; more often only loads the database",
            )?;
        }
        Ok(retention)
    }
}

impl Default for Config {
    /// Embedded mode on the platform's default ports.
    fn default() -> Self {
        Self {
            grpc: ListenAddr::any(50054),
            metrics: ListenAddr::any(9004),
            backend: Backend::Embedded,
            stock_reply_timeout: DEFAULT_STOCK_REPLY_TIMEOUT,
            log_format: LogFormat::Human,
            log_filter: None,
            otel: OtelConfig {
                service_name: "order-service".to_owned(),
                endpoint: None,
            },
            names: WireNames::default(),
            admin_token: None,
            dashboard_stuck_after: Duration::from_secs(5 * 60),
            dashboard_window_minutes: 15,
            retention: Retention::default(),
            cached_instances: None,
            commit_linger: DEFAULT_LINGER,
            stock_reply_concurrency: DEFAULT_STOCK_REPLY_CONCURRENCY,
            database_max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        from_process_env(|lookup| Self::from_lookup(lookup))
    }

    /// Reads variables through `lookup`; unset and empty are the same.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let defaults = Self::default();
        let grpc = match get("GRPC_PORT") {
            Some(value) => ListenAddr::parse("GRPC_PORT", &value)?,
            None => defaults.grpc,
        };
        let metrics = match get("METRICS_PORT") {
            Some(value) => ListenAddr::parse("METRICS_PORT", &value)?,
            None => defaults.metrics,
        };
        let backend = match (get("DATABASE_URL"), get("RABBITMQ_URL")) {
            (None, None) => Backend::Embedded,
            (Some(database), Some(rabbitmq)) => Backend::Production {
                database_url: parse_url("DATABASE_URL", database, &["postgres", "postgresql"], |url| {
                    url.parse::<sqlx::postgres::PgConnectOptions>().is_ok()
                })
                .and_then(known_database_parameters)?,
                rabbitmq_url: parse_url("RABBITMQ_URL", rabbitmq, &["amqp", "amqps"], |url| {
                    url.parse::<saga_amqp::lapin::uri::AMQPUri>().is_ok()
                })?,
            },
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "RABBITMQ_URL",
                    "is not set but DATABASE_URL is: set both (PostgreSQL + RabbitMQ) or neither (embedded mode)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "DATABASE_URL",
                    "is not set but RABBITMQ_URL is: set both (PostgreSQL + RabbitMQ) or neither (embedded mode)",
                ));
            }
        };
        let stock_reply_timeout = match get("STOCK_REPLY_TIMEOUT") {
            Some(value) => duration_at_least(
                "STOCK_REPLY_TIMEOUT",
                &value,
                SHORTEST_STOCK_REPLY_TIMEOUT,
                "an OrderCreated a crashed relay leased waits that long to be published, so orders would be \
                 cancelled before the product service could answer",
            )?,
            None => defaults.stock_reply_timeout,
        };
        let log_format = match get("LOG_FORMAT").map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("human") | Some("text") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format_args!("expected `human` or `json`, got `{other}`"),
                ));
            }
        };
        let log_filter = get("RUST_LOG");
        if let Some(directives) = &log_filter {
            crate::telemetry::log_filter(Some(directives))
                .map_err(|e| ConfigError::new("RUST_LOG", format_args!("{e} (in `{directives}`)")))?;
        }
        let otel = OtelConfig {
            service_name: get("OTEL_SERVICE_NAME").unwrap_or(defaults.otel.service_name),
            endpoint: match get("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(endpoint) if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) => {
                    return Err(ConfigError::new(
                        "OTEL_EXPORTER_OTLP_ENDPOINT",
                        "expected an http:// or https:// URL",
                    ));
                }
                endpoint => endpoint,
            },
        };
        let dashboard_stuck_after = match get("DASHBOARD_STUCK_AFTER") {
            Some(value) => parse_duration(&value).map_err(|why| ConfigError::new("DASHBOARD_STUCK_AFTER", why))?,
            None => defaults.dashboard_stuck_after,
        };
        let dashboard_window_minutes = match get("DASHBOARD_WINDOW_MINUTES") {
            Some(value) => parse_count("DASHBOARD_WINDOW_MINUTES", &value, 1..=60, "minutes")?,
            None => defaults.dashboard_window_minutes,
        };
        let cached_instances = match get("CACHED_INSTANCES") {
            Some(value) => Some(value.parse::<usize>().map_err(|_| {
                ConfigError::new(
                    "CACHED_INSTANCES",
                    format_args!("expected a whole number of sagas (0 keeps none), got `{value}`"),
                )
            })?),
            None => defaults.cached_instances,
        };
        let commit_linger = match get("COMMIT_LINGER") {
            Some(value) => parse_linger(&value).map_err(|why| ConfigError::new("COMMIT_LINGER", why))?,
            None => defaults.commit_linger,
        };
        let stock_reply_concurrency = match get("STOCK_REPLY_CONCURRENCY") {
            Some(value) => parse_count(
                "STOCK_REPLY_CONCURRENCY",
                &value,
                1..=MAX_STOCK_REPLY_CONCURRENCY,
                "messages",
            )?,
            None => defaults.stock_reply_concurrency,
        };
        let database_max_connections = match get("DATABASE_MAX_CONNECTIONS") {
            Some(value) => parse_count("DATABASE_MAX_CONNECTIONS", &value, 2..=1000, "connections")?,
            None => defaults.database_max_connections,
        };
        Ok(Self {
            grpc,
            metrics,
            backend,
            stock_reply_timeout,
            log_format,
            log_filter,
            otel,
            names: defaults.names,
            admin_token: get("ADMIN_TOKEN").map(AdminToken::parse).transpose()?,
            dashboard_stuck_after,
            dashboard_window_minutes,
            retention: Retention::from_lookup(get)?,
            cached_instances,
            commit_linger,
            stock_reply_concurrency,
            database_max_connections,
        })
    }
}

/// A whole number of `unit` within `range`, or an error naming `variable`
/// and the range.
fn parse_count<T>(
    variable: &'static str,
    value: &str,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match value.parse::<T>() {
        Ok(count) if range.contains(&count) => Ok(count),
        _ => Err(ConfigError::new(
            variable,
            format_args!(
                "expected a whole number of {unit} from {} to {}, got `{value}`",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// A URL of one of `schemes` that its client parses (`parses`), so that a
/// malformed one stops the service at start rather than in a retry loop.
fn parse_url(
    variable: &'static str,
    value: String,
    schemes: &[&str],
    parses: impl Fn(&str) -> bool,
) -> Result<SecretUrl, ConfigError> {
    let scheme = value.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    // Never echo the value: it may hold a password.
    match scheme {
        Some(scheme) if schemes.contains(&scheme.as_str()) => {
            if parses(&value) {
                Ok(SecretUrl(value))
            } else {
                Err(ConfigError::new(
                    variable,
                    "does not parse as a URL (percent-encode special characters such as `/`, `@` or `:` in the user name and password)",
                ))
            }
        }
        _ => Err(ConfigError::new(
            variable,
            format_args!("expected a URL starting with {}://", schemes.join("://, ")),
        )),
    }
}

/// The connection parameters sqlx reads from a PostgreSQL URL's query.
const DATABASE_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url`, if its query holds only parameters sqlx reads: sqlx logs any other
/// with its value, and `PASSWORD=` or `sslpassword=` would put a secret in
/// the log (again at every retry, the connection failing without it).
fn known_database_parameters(url: SecretUrl) -> Result<SecretUrl, ConfigError> {
    let query = url.expose().split_once('?').map_or("", |(_, query)| query);
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        // Without `=` the whole pair may be a secret pasted in the wrong place.
        let Some((key, _)) = pair.split_once('=') else {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "has a query parameter without `=` (not shown: it may be a secret)",
            ));
        };
        let known = DATABASE_URL_PARAMETERS.contains(&key) || key.starts_with("options[") && key.ends_with(']');
        if !known {
            // The key only: a value may be a secret, a key is not.
            return Err(ConfigError::new(
                "DATABASE_URL",
                format_args!(
                    "has a parameter the PostgreSQL driver does not know: `{}` (known: {}, options[…])",
                    key.escape_debug(),
                    DATABASE_URL_PARAMETERS.join(", ")
                ),
            ));
        }
    }
    Ok(url)
}

/// Parses `30s`, `500ms`, `2m`, `1h` (a whole number and a unit); at least
/// 1 ms, at most a day.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = parse_span(value, "ms, s, m or h")?;
    if duration.is_zero() || duration > Duration::from_secs(86_400) {
        return Err(format!("`{value}` must be between 1ms and 24h"));
    }
    Ok(duration)
}

/// Stock replies handled at once by default ([`Config::stock_reply_concurrency`]):
/// in the load test's closed loop 16 held it at 2,481 sagas/s, replies
/// queueing for the engine; 48 gave 2,728–2,754 (docs/performance.md).
pub const DEFAULT_STOCK_REPLY_CONCURRENCY: usize = 64;

/// `DATABASE_MAX_CONNECTIONS` when unset: sqlx's own default.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: u32 = 10;

/// The most stock replies handled at once `STOCK_REPLY_CONCURRENCY` accepts.
const MAX_STOCK_REPLY_CONCURRENCY: usize = 1024;

/// The services' default linger of a lone commit (see
/// [`Config::commit_linger`]).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

/// Parses a linger: `0` (never wait) or `1ms` up to `100ms`.
pub fn parse_linger(value: &str) -> Result<Duration, String> {
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let linger = parse_span(value, "ms")?;
    if linger > Duration::from_millis(100) {
        return Err(format!(
            "`{value}` is more than 100ms: every lone commit would wait that long"
        ));
    }
    Ok(linger)
}

/// `value` of `variable` as a retention of at least `floor`, or an error
/// saying `why` it may not be shorter.
fn retention_at_least(
    variable: &'static str,
    value: &str,
    floor: Duration,
    why: &str,
) -> Result<Duration, ConfigError> {
    at_least(variable, parse_retention(value), value, floor, why)
}

/// `value` of `variable` as a duration (`parse_duration`) of at least
/// `floor`, or an error saying `why` it may not be shorter.
fn duration_at_least(variable: &'static str, value: &str, floor: Duration, why: &str) -> Result<Duration, ConfigError> {
    at_least(variable, parse_duration(value), value, floor, why)
}

/// `parsed` (of `value`), refused naming `variable` when it did not parse
/// or is shorter than `floor` (shown in whole hours when it is some).
fn at_least(
    variable: &'static str,
    parsed: Result<Duration, String>,
    value: &str,
    floor: Duration,
    why: &str,
) -> Result<Duration, ConfigError> {
    let duration = parsed.map_err(|reason| ConfigError::new(variable, reason))?;
    if duration < floor {
        let secs = floor.as_secs();
        let floor = if secs > 0 && secs.is_multiple_of(3600) {
            format!("{}h", secs / 3600)
        } else {
            format!("{secs}s")
        };
        return Err(ConfigError::new(
            variable,
            format_args!("`{value}` is shorter than {floor}: {why}"),
        ));
    }
    Ok(duration)
}

/// Parses how long rows are kept: `0`, or a whole number and a unit up to
/// days (`12h`, `7d`), at most ten years.
fn parse_retention(value: &str) -> Result<Duration, String> {
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let duration = parse_span(value, "s, m, h or d")?;
    if duration > Duration::from_secs(3650 * 86_400) {
        return Err(format!("`{value}` is more than ten years"));
    }
    Ok(duration)
}

/// A whole number and a unit (`ms`, `s`, `m`, `h`, `d`).
fn parse_span(value: &str, units: &str) -> Result<Duration, String> {
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like `30s` or `500ms`, got `{value}`"))?;
    let seconds = |per_unit: u64| Duration::from_secs(number.saturating_mul(per_unit));
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(seconds(1)),
        "m" | "min" => Ok(seconds(60)),
        "h" => Ok(seconds(3600)),
        "d" => Ok(seconds(86_400)),
        "" => Err(format!("`{value}` needs a unit: {units}")),
        other => Err(format!("unknown unit `{other}` in `{value}` (use {units})")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn no_variables_means_embedded_mode_on_the_platform_ports() {
        assert_eq!(config(&[]), Ok(Config::default()));
        let defaults = Config::default();
        assert_eq!(defaults.grpc.to_string(), "0.0.0.0:50054");
        assert_eq!(defaults.metrics.to_string(), "0.0.0.0:9004");
        assert_eq!(defaults.backend, Backend::Embedded);
    }

    #[test]
    fn listen_addresses_take_the_platform_forms() {
        let parsed = |v: &str| config(&[("GRPC_PORT", v)]).map(|c| c.grpc.to_string());
        assert_eq!(parsed(":50054"), Ok("0.0.0.0:50054".to_owned()));
        assert_eq!(parsed("127.0.0.1:7000"), Ok("127.0.0.1:7000".to_owned()));
        assert_eq!(parsed("localhost:7000"), Ok("localhost:7000".to_owned()));
        assert_eq!(parsed("[::1]:7000"), Ok("[::1]:7000".to_owned()));
        assert_eq!(parsed("7000"), Ok("0.0.0.0:7000".to_owned()));
        for bad in [":abc", "host:", ":70000", "a b:1"] {
            assert_eq!(parsed(bad).expect_err("invalid").variable, "GRPC_PORT", "{bad}");
        }
        assert_eq!(
            config(&[("METRICS_PORT", "x")]).expect_err("invalid").variable,
            "METRICS_PORT"
        );
    }

    #[test]
    fn both_urls_or_neither() {
        let only_db = config(&[("DATABASE_URL", "postgres://u:p@db/orders")]).expect_err("invalid");
        assert_eq!(only_db.variable, "RABBITMQ_URL");
        let only_mq = config(&[("RABBITMQ_URL", "amqp://u:p@mq/%2f")]).expect_err("invalid");
        assert_eq!(only_mq.variable, "DATABASE_URL");
        let both = config(&[
            ("DATABASE_URL", "postgres://u:p@db/orders"),
            ("RABBITMQ_URL", "amqp://mq"),
        ])
        .expect("valid");
        assert!(matches!(both.backend, Backend::Production { .. }));
        // PostgreSQL on the same host, through its Unix socket (README).
        let socket = config(&[
            (
                "DATABASE_URL",
                "postgres://orders@localhost/orders?host=/var/run/postgresql",
            ),
            ("RABBITMQ_URL", "amqp://mq"),
        ])
        .expect("a socket URL is valid");
        assert!(matches!(socket.backend, Backend::Production { .. }));
        assert_eq!(
            config(&[("DATABASE_URL", ""), ("RABBITMQ_URL", " ")]),
            Ok(Config::default())
        );
    }

    #[test]
    fn a_url_its_client_cannot_parse_is_refused_at_start_without_its_password() {
        // A generated password with a `/` in it, not percent-encoded.
        let mq = config(&[
            ("DATABASE_URL", "postgres://u:p@db/orders"),
            ("RABBITMQ_URL", "amqp://orders:ab/cd@mq:5672/%2f"),
        ])
        .expect_err("malformed");
        assert_eq!(mq.variable, "RABBITMQ_URL");
        let db = config(&[
            ("DATABASE_URL", "postgres://orders:ab/cd@db/orders"),
            ("RABBITMQ_URL", "amqp://mq"),
        ])
        .expect_err("malformed");
        assert_eq!(db.variable, "DATABASE_URL");
        for error in [mq, db] {
            assert!(!error.to_string().contains("ab/cd"), "{error}");
            assert!(error.to_string().contains("percent-encode"), "{error}");
        }
        let encoded = config(&[
            ("DATABASE_URL", "postgres://orders:ab%2Fcd@db/orders"),
            ("RABBITMQ_URL", "amqp://orders:ab%2Fcd@mq:5672/%2f"),
        ]);
        assert!(encoded.is_ok(), "{encoded:?}");
    }

    #[test]
    fn secrets_never_show() {
        let bad =
            config(&[("DATABASE_URL", "mysql://u:hunter2@db"), ("RABBITMQ_URL", "amqp://mq")]).expect_err("invalid");
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
        let url = SecretUrl("postgres://orders:hunter2@db:5432/orders?sslmode=require".to_owned());
        assert_eq!(url.to_string(), "postgres://orders:***@db:5432/orders?sslmode=require");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            SecretUrl("amqp://mq:5672/%2f".to_owned()).to_string(),
            "amqp://mq:5672/%2f"
        );
        // A password with an unescaped `/`, `?` or `#`, or given as a parameter.
        for url in [
            "postgres://orders:hun/ter2@db:5432/orders",
            "postgres://orders:hun?ter2@db:5432/orders",
            "postgres://orders:hun#ter2@db:5432/orders",
            "postgres://orders@db:5432/orders?sslmode=require&password=hunter2",
            "postgres://orders@db:5432/orders?PASSWORD=hunter2#frag",
        ] {
            let shown = SecretUrl(url.to_owned()).to_string();
            assert!(!shown.contains("ter2"), "{url} shows as {shown}");
        }
        assert_eq!(
            SecretUrl("postgres://orders@db/orders?sslmode=require&password=hunter2".to_owned()).to_string(),
            "postgres://orders@db/orders?sslmode=require&password=***"
        );
    }

    #[test]
    fn database_url_parameters_the_driver_does_not_read_are_refused_by_name_only() {
        let production = |database: &str| config(&[("DATABASE_URL", database), ("RABBITMQ_URL", "amqp://mq:5672/%2f")]);
        for fine in [
            "postgres://orders@db/orders",
            "postgres://orders@db/orders?sslmode=require&application_name=orders",
            "postgres://orders@db/orders?password=hunter2&options[statement_timeout]=5s",
        ] {
            assert!(production(fine).is_ok(), "{fine}");
        }
        for (bad, named) in [
            ("postgres://orders@db/orders?PASSWORD=hunter2", "`PASSWORD`"),
            (
                "postgres://orders@db/orders?sslmode=require&sslpassword=hunter2",
                "`sslpassword`",
            ),
            ("postgres://orders@db/orders?hunter2", "without `=`"),
        ] {
            let error = production(bad).expect_err("refused");
            assert_eq!(error.variable, "DATABASE_URL");
            assert!(error.reason.contains(named), "{error}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn an_admin_token_no_caller_could_send_is_refused() {
        for bad in ["pässwort", "two words", "tab\there"] {
            let error = config(&[("ADMIN_TOKEN", bad)]).expect_err("refused");
            assert_eq!(error.variable, "ADMIN_TOKEN", "{bad}");
            assert!(!error.reason.contains(bad), "{error}");
        }
    }

    #[test]
    fn the_admin_token_is_optional_and_never_shown() {
        assert_eq!(config(&[]).map(|c| c.admin_token), Ok(None));
        let config = config(&[("ADMIN_TOKEN", " s3cret ")]).expect("valid");
        assert_eq!(config.admin_token.as_ref().map(AdminToken::expose), Some("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn the_dashboard_thresholds_come_from_the_environment() {
        let set = config(&[("DASHBOARD_STUCK_AFTER", "90s"), ("DASHBOARD_WINDOW_MINUTES", "30")]).expect("valid");
        assert_eq!(set.dashboard_stuck_after, Duration::from_secs(90));
        assert_eq!(set.dashboard_window_minutes, 30);
        for bad in ["0", "61", "ten"] {
            let error = config(&[("DASHBOARD_WINDOW_MINUTES", bad)]).expect_err(bad);
            assert!(error.to_string().contains("DASHBOARD_WINDOW_MINUTES"), "{error}");
        }
        let error = config(&[("DASHBOARD_STUCK_AFTER", "soon")]).expect_err("not a duration");
        assert!(error.to_string().contains("DASHBOARD_STUCK_AFTER"), "{error}");
    }

    #[test]
    fn kept_sagas_come_from_the_environment() {
        assert_eq!(config(&[]).map(|c| c.cached_instances), Ok(None));
        assert_eq!(
            config(&[("CACHED_INSTANCES", "0")]).map(|c| c.cached_instances),
            Ok(Some(0))
        );
        for bad in ["-1", "lots", "1e3"] {
            let error = config(&[("CACHED_INSTANCES", bad)]).expect_err(bad);
            assert!(error.to_string().contains("CACHED_INSTANCES"), "{error}");
        }
    }

    #[test]
    fn stock_replies_in_flight_are_bounded() {
        assert_eq!(
            config(&[]).map(|c| c.stock_reply_concurrency),
            Ok(DEFAULT_STOCK_REPLY_CONCURRENCY)
        );
        assert_eq!(
            config(&[("STOCK_REPLY_CONCURRENCY", "1")]).map(|c| c.stock_reply_concurrency),
            Ok(1)
        );
        assert_eq!(
            config(&[("STOCK_REPLY_CONCURRENCY", "1024")]).map(|c| c.stock_reply_concurrency),
            Ok(1024)
        );
        for bad in ["0", "1025", "-1", "many"] {
            let error = config(&[("STOCK_REPLY_CONCURRENCY", bad)]).expect_err(bad);
            assert_eq!(error.variable, "STOCK_REPLY_CONCURRENCY", "{bad}");
            assert!(error.to_string().contains("1 to 1024"), "{error}");
        }
    }

    #[test]
    fn the_database_pool_is_bounded_and_leaves_room_beside_the_listener() {
        assert_eq!(
            config(&[]).map(|c| c.database_max_connections),
            Ok(DEFAULT_DATABASE_MAX_CONNECTIONS)
        );
        assert_eq!(
            config(&[("DATABASE_MAX_CONNECTIONS", "2")]).map(|c| c.database_max_connections),
            Ok(2)
        );
        assert_eq!(
            config(&[("DATABASE_MAX_CONNECTIONS", " 1000 ")]).map(|c| c.database_max_connections),
            Ok(1000)
        );
        for bad in ["1", "0", "1001", "-4", "ten"] {
            let error = config(&[("DATABASE_MAX_CONNECTIONS", bad)]).expect_err(bad);
            assert_eq!(error.variable, "DATABASE_MAX_CONNECTIONS", "{bad}");
            assert!(error.to_string().contains("2 to 1000"), "{error}");
        }
    }

    #[test]
    fn the_commit_linger_is_off_by_zero_and_bounded() {
        assert_eq!(config(&[]).map(|c| c.commit_linger), Ok(DEFAULT_LINGER));
        assert_eq!(
            config(&[("COMMIT_LINGER", "0")]).map(|c| c.commit_linger),
            Ok(Duration::ZERO)
        );
        assert_eq!(
            config(&[("COMMIT_LINGER", "3ms")]).map(|c| c.commit_linger),
            Ok(Duration::from_millis(3))
        );
        for bad in ["1", "101ms", "soon", "-1ms"] {
            let error = config(&[("COMMIT_LINGER", bad)]).expect_err(bad);
            assert_eq!(error.variable, "COMMIT_LINGER", "{bad}");
        }
    }

    #[test]
    fn durations_are_humane() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "30", "s", "0s", "-1s", "1.5s", "30 parsecs", "25h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let error = config(&[("STOCK_REPLY_TIMEOUT", "soon")]).expect_err("invalid");
        assert_eq!(error.variable, "STOCK_REPLY_TIMEOUT");
        assert_eq!(
            config(&[("STOCK_REPLY_TIMEOUT", "5s")]).map(|c| c.stock_reply_timeout),
            Ok(Duration::from_secs(5))
        );
        // Shorter than the relay's lease: orders cancelled before an answer could come.
        let error = config(&[("STOCK_REPLY_TIMEOUT", "4999ms")]).expect_err("too short");
        assert!(error.reason.contains("shorter than 5s"), "{error}");
    }

    #[test]
    fn retention_is_configurable_and_refuses_a_forgetful_inbox() {
        let defaults = config(&[]).expect("valid").retention;
        assert_eq!(defaults, Retention::default());
        assert_eq!(defaults.store.inbox, Duration::from_secs(7 * 86_400));
        assert_eq!(defaults.store.finished_instances, None, "finished sagas are kept");
        let set = config(&[
            ("INBOX_RETENTION", "30d"),
            ("SENT_MESSAGE_RETENTION", "0"),
            ("FINISHED_SAGA_RETENTION", "90d"),
            ("RETENTION_INTERVAL", "10m"),
        ])
        .expect("valid")
        .retention;
        assert_eq!(set.store.inbox, Duration::from_secs(30 * 86_400));
        assert_eq!(set.store.sent_messages, Duration::ZERO, "0: deleted once sent");
        assert_eq!(set.store.finished_instances, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(set.interval, Duration::from_secs(600));
        for (variable, bad) in [
            ("INBOX_RETENTION", "30m"),
            ("INBOX_RETENTION", "0"),
            ("SENT_MESSAGE_RETENTION", "a week"),
            ("FINISHED_SAGA_RETENTION", "20000d"),
            ("FINISHED_SAGA_RETENTION", "10m"),
            ("RETENTION_INTERVAL", "0"),
            ("RETENTION_INTERVAL", "2d"),
            ("RETENTION_INTERVAL", "59s"),
        ] {
            let error = config(&[(variable, bad)]).expect_err(bad);
            assert_eq!(error.variable, variable, "{bad}: {error}");
        }
    }

    #[test]
    fn a_log_filter_with_a_typo_stops_the_service_naming_rust_log() {
        let error = config(&[("RUST_LOG", "info,saga_core=verbose")]).expect_err("a typo");
        assert_eq!(error.variable, "RUST_LOG", "{error}");
        assert_eq!(
            config(&[("RUST_LOG", "warn,order_service=debug")]).map(|c| c.log_filter),
            Ok(Some("warn,order_service=debug".to_owned()))
        );
    }

    #[test]
    fn log_format_is_human_or_json() {
        assert_eq!(
            config(&[("LOG_FORMAT", "json")]).map(|c| c.log_format),
            Ok(LogFormat::Json)
        );
        assert_eq!(
            config(&[("LOG_FORMAT", "xml")]).expect_err("invalid").variable,
            "LOG_FORMAT"
        );
    }
}
