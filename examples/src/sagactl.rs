//! `sagactl`: the operator's command line for the admin API
//! (`saga.admin.v1.SagaAdmin`) of a saga service such as the order service.
//!
//! ```text
//! sagactl list [--definition order] [--status running]... [--stuck-for 5m] [--older-than 1h] [--limit 50]
//! sagactl show <SAGA_ID>
//! sagactl retry <SAGA_ID> | cancel <SAGA_ID> | resume <SAGA_ID>
//! sagactl dlq list [--queue Q] [--limit 20]
//! sagactl dlq replay [--queue Q] (<MESSAGE_ID>... | --all)
//! sagactl outbox [--saga SAGA_ID] [--older-than 1m] [--limit 50]
//! sagactl discard <SAGA_ID> <OUTBOX_ID> --reason "headers too large"
//! ```
//!
//! The address comes from `--addr` or `SAGA_ADMIN_ADDR` (default
//! `http://127.0.0.1:50054`), the token from `--token` or `ADMIN_TOKEN`.
//! Output is a human-readable table, or JSON with `--json`.
//!
//! [`Sagactl`] is the parsed command line; [`run`] executes it, printing to
//! any writer, so tests run it in-process.

mod render;

use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use order_service::admin::proto::saga_admin_client::SagaAdminClient;
use order_service::admin::proto::{
    self as admin, DiscardUnsentMessageRequest, GetInstanceRequest, ListDeadLettersRequest, ListInstancesRequest,
    ListUnsentMessagesRequest, OperatorActionRequest, ReplayDeadLettersRequest,
};
use saga_core::SagaStatus;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// The admin API's address when neither `--addr` nor `SAGA_ADMIN_ADDR` is given.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50054";

/// How long connecting and each call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Inspect and repair sagas, replay dead letters (the saga.admin.v1 API)"
)]
pub struct Sagactl {
    /// The service's gRPC address.
    #[arg(long, global = true, env = "SAGA_ADMIN_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// The admin token the service was started with (its `ADMIN_TOKEN`).
    #[arg(long, global = true, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List saga instances, most recently changed first.
    List(ListArgs),
    /// Show an instance and its timeline.
    Show {
        /// The saga id.
        id: String,
    },
    /// Run the current step (or compensation) again now; a needs-attention
    /// instance resumes its compensation.
    Retry {
        /// The saga id.
        id: String,
    },
    /// Force compensation of a running instance.
    Cancel {
        /// The saga id.
        id: String,
    },
    /// Resume a needs-attention instance after its cause was fixed.
    Resume {
        /// The saga id.
        id: String,
    },
    /// Dead letters of the queues the service consumes.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Messages committed but not yet confirmed by the broker, oldest first
    /// (a message the broker refuses stays here, holding its saga back).
    Outbox(OutboxArgs),
    /// Give up an unsent message the broker will never take (its outbox id
    /// as `outbox` lists it): it is never published, and its saga's later
    /// messages go. Recorded in the saga's history with the reason.
    Discard {
        /// The saga the message belongs to.
        saga_id: String,
        /// The message's outbox id.
        outbox_id: i64,
        /// Why, for the saga's history.
        #[arg(long)]
        reason: String,
    },
}

/// `outbox`'s filters.
#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// Only this saga's messages.
    #[arg(long)]
    pub saga: Option<String>,
    /// Only messages created at least this long ago (e.g. `1m`): those that
    /// should have left by now.
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// At most this many (the service's default: 50; at most 500).
    #[arg(long)]
    pub limit: Option<u32>,
}

/// `list`'s filters.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this saga definition.
    #[arg(long)]
    pub definition: Option<String>,
    /// Only this status (repeat for several): running, compensating,
    /// completed, compensated, needs_attention.
    #[arg(long = "status")]
    pub statuses: Vec<StatusArg>,
    /// Only stuck instances: needing attention, or running / compensating
    /// without change for this long (e.g. `5m`).
    #[arg(long, value_parser = parse_age)]
    pub stuck_for: Option<Duration>,
    /// Only instances started at least this long ago (e.g. `1h`).
    #[arg(long, value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// At most this many (the service's default: 50; at most 500).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Continue a listing: the token a previous page printed.
    #[arg(long)]
    pub page_token: Option<String>,
}

/// `dlq`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters: id, type, reason, origin, a preview of the body.
    List {
        /// Only this queue's dead letters (default: every queue the service consumes).
        #[arg(long)]
        queue: Option<String>,
        /// At most this many per queue (the service's default: 20).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Re-publish dead letters to the exchange they were first published to.
    Replay {
        /// Only from this queue's dead letters (default: every queue the service consumes).
        #[arg(long)]
        queue: Option<String>,
        /// Every dead letter there now.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
        /// The messages to replay.
        #[arg(required_unless_present = "all")]
        message_ids: Vec<String>,
    },
}

/// A `--status` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusArg(pub SagaStatus);

impl FromStr for StatusArg {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        value
            .trim()
            .to_ascii_lowercase()
            .replace('-', "_")
            .parse()
            .map(Self)
            .map_err(|_| {
                format!("`{value}` is not a status (running, compensating, completed, compensated, needs_attention)")
            })
    }
}

/// A duration as operators write it: a whole number and a unit, `ms`, `s`,
/// `m`, `h` or `d` (`0s`, `90s`, `5m`, `2d`).
pub fn parse_age(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{value}` is not a duration like 90s, 5m, 2h or 1d"))?;
    let unit_millis: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{value}`: the unit must be ms, s, m, h or d")),
    };
    number
        .checked_mul(unit_millis)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{value}` is too long"))
}

/// Why a command failed. Each is printed as one line; the process exits non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagactlError {
    /// No token: set `ADMIN_TOKEN` or pass `--token`.
    #[error("no admin token: set ADMIN_TOKEN (the token the service was started with) or pass --token")]
    MissingToken,
    /// The token cannot travel as gRPC metadata (printable ASCII only).
    #[error("the admin token must be printable ASCII")]
    InvalidToken,
    /// `--addr` is not a URI.
    #[error("--addr `{addr}` is not a valid address (expected e.g. {DEFAULT_ADDR})")]
    InvalidAddress {
        /// What was given.
        addr: String,
    },
    /// Nothing answers at the address: start the service, or fix `--addr`.
    #[error("cannot reach the service at {addr}: {source}; is it running?")]
    Unreachable {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The service refused the call; the message says why, with a hint.
    #[error("{code:?}: {message}{}", hint(*code))]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// The service answered without what it should have (a broken server).
    #[error("the service answered without {0}")]
    Incomplete(&'static str),
    /// A replay left messages behind (listed above the error).
    #[error("{0} message(s) were not replayed")]
    NotReplayed(usize),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn hint(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unauthenticated => " (is ADMIN_TOKEN / --token the token the service was started with?)",
        tonic::Code::Unimplemented => {
            " (the service runs without the admin API: start it with ADMIN_TOKEN set, or check --addr)"
        }
        tonic::Code::Unavailable => " (try again shortly)",
        _ => "",
    }
}

impl From<tonic::Status> for SagactlError {
    fn from(status: tonic::Status) -> Self {
        Self::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// A connected admin client that presents the token on every call.
struct Client {
    inner: SagaAdminClient<Channel>,
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl Client {
    async fn connect(addr: &str, token: Option<&str>) -> Result<Self, SagactlError> {
        let token = token
            .filter(|t| !t.trim().is_empty())
            .ok_or(SagactlError::MissingToken)?;
        let authorization = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| SagactlError::InvalidToken)?;
        let endpoint = Channel::from_shared(addr.to_owned())
            .map_err(|_| SagactlError::InvalidAddress { addr: addr.to_owned() })?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|source| SagactlError::Unreachable {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Self {
            inner: SagaAdminClient::new(channel),
            authorization,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }
}

/// Runs `cli`, printing to `out`.
pub async fn run(cli: Sagactl, out: &mut (dyn Write + Send)) -> Result<(), SagactlError> {
    let mut client = Client::connect(&cli.addr, cli.token.as_deref()).await?;
    let json = cli.json;
    let mut visible = render::Visible(out);
    let out: &mut (dyn Write + Send) = if json { visible.0 } else { &mut visible };
    match cli.command {
        Command::List(args) => {
            let request = list_request(args);
            let response = client.inner.list_instances(client.request(request)).await?.into_inner();
            render::instances(out, &response, json)?;
        }
        Command::Show { id } => {
            let request = client.request(GetInstanceRequest { id });
            let response = client.inner.get_instance(request).await?.into_inner();
            render::instance_with_history(out, &response, json)?;
        }
        Command::Retry { id } => act(&mut client, out, Action::Retry, id, json).await?,
        Command::Cancel { id } => act(&mut client, out, Action::Cancel, id, json).await?,
        Command::Resume { id } => act(&mut client, out, Action::Resume, id, json).await?,
        Command::Dlq(DlqCommand::List { queue, limit }) => {
            let request = client.request(ListDeadLettersRequest {
                queue: queue.unwrap_or_default(),
                limit: limit.unwrap_or(0),
            });
            let response = client.inner.list_dead_letters(request).await?.into_inner();
            render::dead_letters(out, &response, json)?;
        }
        Command::Dlq(DlqCommand::Replay {
            queue,
            all,
            message_ids,
        }) => {
            let request = client.request(ReplayDeadLettersRequest {
                queue: queue.unwrap_or_default(),
                message_ids,
                all,
            });
            let report = client.inner.replay_dead_letters(request).await?.into_inner();
            render::replay(out, &report, json)?;
            let left = report.not_found.len() + report.failed.len();
            if left > 0 {
                return Err(SagactlError::NotReplayed(left));
            }
        }
        Command::Outbox(args) => {
            let request = client.request(outbox_request(args));
            let response = client.inner.list_unsent_messages(request).await?.into_inner();
            render::unsent(out, &response.messages, json)?;
        }
        Command::Discard {
            saga_id,
            outbox_id,
            reason,
        } => {
            let request = client.request(DiscardUnsentMessageRequest {
                saga_id,
                outbox_id,
                reason,
            });
            let response = client.inner.discard_unsent_message(request).await?.into_inner();
            let instance = response.instance.ok_or(SagactlError::Incomplete("the instance"))?;
            render::discarded(out, outbox_id, &instance, json)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The request `list` sends.
pub fn list_request(args: ListArgs) -> ListInstancesRequest {
    ListInstancesRequest {
        definition: args.definition.unwrap_or_default(),
        statuses: args.statuses.iter().map(|s| render::status_to_proto(s.0)).collect(),
        // Only durations beyond 292 billion years fail to convert.
        older_than: args.older_than.and_then(|d| d.try_into().ok()),
        stuck_for: args.stuck_for.and_then(|d| d.try_into().ok()),
        limit: args.limit.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
    }
}

/// The request `outbox` sends.
pub fn outbox_request(args: OutboxArgs) -> ListUnsentMessagesRequest {
    ListUnsentMessagesRequest {
        saga_id: args.saga.unwrap_or_default(),
        older_than: args.older_than.and_then(|d| d.try_into().ok()),
        limit: args.limit.unwrap_or(0),
    }
}

#[derive(Clone, Copy)]
enum Action {
    Retry,
    Cancel,
    Resume,
}

async fn act(
    client: &mut Client,
    out: &mut (dyn Write + Send),
    action: Action,
    id: String,
    json: bool,
) -> Result<(), SagactlError> {
    let request = client.request(OperatorActionRequest { id });
    let response = match action {
        Action::Retry => client.inner.retry(request).await?,
        Action::Cancel => client.inner.cancel(request).await?,
        Action::Resume => client.inner.resume(request).await?,
    };
    let instance: admin::SagaInstance = response
        .into_inner()
        .instance
        .ok_or(SagactlError::Incomplete("the instance"))?;
    let done = match action {
        Action::Retry => "retried",
        Action::Cancel => "cancelled",
        Action::Resume => "resumed",
    };
    render::acted(out, done, &instance, json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Sagactl, clap::Error> {
        Sagactl::try_parse_from(std::iter::once("sagactl").chain(args.iter().copied()))
    }

    #[test]
    fn list_takes_filters() {
        let cli = parse(&[
            "list",
            "--definition",
            "order",
            "--status",
            "running",
            "--status",
            "needs-attention",
            "--stuck-for",
            "5m",
            "--limit",
            "10",
        ])
        .expect("valid");
        let Command::List(args) = cli.command else {
            panic!("a list command")
        };
        assert_eq!(
            args.statuses,
            [StatusArg(SagaStatus::Running), StatusArg(SagaStatus::NeedsAttention)]
        );
        let request = list_request(args);
        assert_eq!(request.definition, "order");
        assert_eq!(request.stuck_for.map(|d| d.seconds), Some(300));
        assert_eq!(request.older_than, None);
        assert_eq!(request.limit, 10);
    }

    #[test]
    fn outbox_takes_filters() {
        let cli = parse(&["outbox", "--saga", "s-1", "--older-than", "90s", "--limit", "5"]).expect("valid");
        let Command::Outbox(args) = cli.command else {
            panic!("an outbox command")
        };
        let request = outbox_request(args);
        assert_eq!(request.saga_id, "s-1");
        assert_eq!(request.older_than.map(|d| d.seconds), Some(90));
        assert_eq!(request.limit, 5);
        let Command::Outbox(args) = parse(&["outbox"]).expect("valid").command else {
            panic!("an outbox command")
        };
        assert_eq!(outbox_request(args), ListUnsentMessagesRequest::default(), "no filters");
    }

    #[test]
    fn discard_takes_the_saga_the_outbox_id_and_a_reason() {
        let cli = parse(&["discard", "s-1", "7", "--reason", "headers too large"]).expect("valid");
        let Command::Discard {
            saga_id,
            outbox_id,
            reason,
        } = cli.command
        else {
            panic!("a discard command")
        };
        assert_eq!(
            (saga_id.as_str(), outbox_id, reason.as_str()),
            ("s-1", 7, "headers too large")
        );
    }

    #[test]
    fn ages_take_a_unit() {
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_age("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_age("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_age("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "m", "-5m", "5 weeks", "1.5h", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &["list", "--status", "paused"][..],
            &["list", "--stuck-for", "soon"],
            &["show"],
            &["dlq", "replay"],
            &["dlq", "replay", "m-1", "--all"],
            &["dlq"],
            &["outbox", "--older-than", "soon"],
            &["discard", "s-1", "7"],
            &["discard", "s-1", "seven", "--reason", "why"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        let replay = parse(&["dlq", "replay", "--all"]).expect("valid");
        assert!(matches!(
            replay.command,
            Command::Dlq(DlqCommand::Replay { all: true, .. })
        ));
    }

    #[test]
    fn refusals_carry_a_hint() {
        let error = SagactlError::from(tonic::Status::unauthenticated("wrong admin token"));
        assert!(error.to_string().contains("ADMIN_TOKEN"), "{error}");
        let error = SagactlError::from(tonic::Status::unimplemented(""));
        assert!(error.to_string().contains("without the admin API"), "{error}");
    }
}
