//! The admin API, `saga.admin.v1.SagaAdmin` (`proto/saga_admin.proto`): for
//! operators and `sagactl`, separate from the public order API.
//!
//! - Instances: list (by definition, status, age, stuck), read one with its
//!   history, and the operator actions retry, cancel and resume, each
//!   recorded in the instance's history by saga-core's engine.
//! - Unsent messages (the outbox): list them, and give up one the broker
//!   will never take, recorded in its saga's history.
//! - Dead letters of the queues the service consumes: list, and replay to
//!   their original exchange. Production mode reads RabbitMQ's `<queue>.dlq`;
//!   embedded mode answers from the in-process transport's dead-letter
//!   queues (which live and die with the process, like everything there).
//!
//! Every call needs `authorization: Bearer <ADMIN_TOKEN>` ([`BearerAuth`],
//! compared in constant time); without `ADMIN_TOKEN` the service is not
//! served at all. Requests are parsed here and errors mapped to a
//! `tonic::Status` in one place ([`AdminError`]).

mod convert;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use saga_core::{
    DeadLetterPage, DeadLetterQueue, Engine, EngineError, InstanceFilter, MessageId, OperatorAction, ReplayReport,
    ReplaySelection, SagaId, SagaInstance, SagaStatus, Store, StoreError, Transition, TransportError, UnsentFilter,
    UnsentMessage,
};
use tonic::metadata::MetadataMap;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::config::AdminToken;
use proto::saga_admin_server::{SagaAdmin, SagaAdminServer};

pub mod proto {
    //! Generated protobuf and gRPC code for `proto/saga_admin.proto`
    //! (clients included, for `sagactl` and tests).
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("saga.admin.v1");
    include!(concat!(env!("OUT_DIR"), "/clients/saga.admin.v1.rs"));

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("saga_admin_descriptor");
}

/// Instances listed per page when the request does not say.
pub const DEFAULT_PAGE: usize = 50;
/// The largest page.
pub const MAX_PAGE: usize = 500;
/// Dead letters shown per queue when the request does not say.
pub const DEFAULT_DEAD_LETTERS: usize = 20;
/// The most dead letters shown per queue.
pub const MAX_DEAD_LETTERS: usize = 1000;
/// An instance's unsent messages shown with it.
pub const UNSENT_OF_INSTANCE: usize = 20;
/// The longest reason an operator may give for giving up a message.
pub const MAX_REASON_CHARS: usize = 500;

/// A page's `limit` field: 0 for [`DEFAULT_PAGE`], at most [`MAX_PAGE`].
fn page_limit(limit: u32) -> Result<usize, AdminError> {
    match limit as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(AdminError::invalid("limit", format!("at most {MAX_PAGE}"))),
        n => Ok(n),
    }
}

/// One instance as operators read it: `GetInstance` and the dashboard's
/// saga page.
pub(crate) struct InstanceRecord {
    /// The instance.
    pub instance: SagaInstance,
    /// Its history, oldest first.
    pub history: Vec<Transition>,
    /// The first [`UNSENT_OF_INSTANCE`] of its unsent messages.
    pub unsent: Vec<UnsentMessage>,
    /// Whether it has more unsent messages than those.
    pub more_unsent: bool,
}

/// Saga `id` with its history and unsent messages, the instance and its
/// history read at once; `None` when there is no such instance. Unsent
/// messages are asked for only for an instance that exists: for one that
/// does not, the store may read its whole backlog to find none.
pub(crate) async fn read_instance(store: &dyn Store, id: SagaId) -> Result<Option<InstanceRecord>, StoreError> {
    let (instance, history) = tokio::try_join!(store.load(id), store.history(id))?;
    let Some(instance) = instance else {
        return Ok(None);
    };
    let mut unsent = store
        .unsent_messages(&UnsentFilter {
            saga: Some(id),
            // One more tells whether there are more.
            limit: UNSENT_OF_INSTANCE + 1,
            ..UnsentFilter::default()
        })
        .await?;
    let more_unsent = unsent.len() > UNSENT_OF_INSTANCE;
    unsent.truncate(UNSENT_OF_INSTANCE);
    Ok(Some(InstanceRecord {
        instance,
        history,
        unsent,
        more_unsent,
    }))
}

/// Why an admin call failed. Each variant is one gRPC status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// A request field is unusable: fix it (`INVALID_ARGUMENT`, naming the field).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No saga instance has this id (`NOT_FOUND`).
    #[error("saga {0} not found")]
    NotFound(SagaId),
    /// The request does not apply to things as they stand, e.g. cancelling a
    /// finished saga (`FAILED_PRECONDITION`; the message says why).
    #[error("{0}")]
    Precondition(String),
    /// The database or broker is away, or the service is starting: retry
    /// shortly (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data (`INTERNAL`; logged, not shown).
    #[error("internal error: {0}")]
    Internal(#[source] saga_core::BoxError),
}

impl AdminError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// The wire status of every admin error, in one place.
impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            AdminError::NotFound(_) => Status::not_found(error.to_string()),
            AdminError::Precondition(_) => Status::failed_precondition(error.to_string()),
            AdminError::Unavailable(_) => Status::unavailable(error.to_string()),
            AdminError::Internal(_) => {
                tracing::error!(error = %error, "admin call failed");
                Status::internal("internal error")
            }
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> Self {
        if error.is_retryable() {
            Self::Unavailable(format!("the saga store is unavailable, try again later: {error}"))
        } else {
            Self::Internal(Box::new(error))
        }
    }
}

impl From<TransportError> for AdminError {
    fn from(error: TransportError) -> Self {
        match error {
            TransportError::UnknownAddress(queue) => {
                Self::Precondition(format!("the dead-letter queue `{queue}` does not exist on the broker"))
            }
            TransportError::Unavailable(_) | TransportError::Closed | TransportError::Rejected { .. } => {
                Self::Unavailable(format!("the broker is unavailable, try again later: {error}"))
            }
            other => Self::Internal(Box::new(other)),
        }
    }
}

/// `error`, from acting on saga `id`.
fn engine_error(id: SagaId, error: EngineError) -> AdminError {
    match error {
        EngineError::UnknownSaga { .. } => AdminError::NotFound(id),
        EngineError::Store(error) => error.into(),
        EngineError::InvalidAction { .. }
        | EngineError::UnknownDefinition { .. }
        | EngineError::NotResumable { .. }
        | EngineError::Decode { .. } => AdminError::Precondition(error.to_string()),
        error if error.is_retryable() => AdminError::Unavailable(format!("try again: {error}")),
        error => AdminError::Internal(Box::new(error)),
    }
}

/// Where dead letters are read from: the in-process transport at once, or
/// RabbitMQ once production mode has connected to it.
#[derive(Clone, Default)]
pub struct DeadLetterSource {
    queues: Vec<String>,
    handle: Arc<OnceLock<Arc<dyn DeadLetterQueue>>>,
}

impl DeadLetterSource {
    /// The dead letters of `queues`, read through `dead_letters`.
    pub fn ready(queues: Vec<String>, dead_letters: Arc<dyn DeadLetterQueue>) -> Self {
        let source = Self::pending(queues);
        source.connect(dead_letters);
        source
    }

    /// The dead letters of `queues`, readable once [`connect`](Self::connect)ed.
    pub fn pending(queues: Vec<String>) -> Self {
        Self {
            queues,
            handle: Arc::new(OnceLock::new()),
        }
    }

    /// Reads dead letters through `dead_letters` from now on (the first call wins).
    pub fn connect(&self, dead_letters: Arc<dyn DeadLetterQueue>) {
        // A second connection (there is none today) would read the same queues.
        let _ = self.handle.set(dead_letters);
    }

    fn get(&self) -> Result<&Arc<dyn DeadLetterQueue>, AdminError> {
        self.handle.get().ok_or_else(|| {
            AdminError::Unavailable("the service is not connected to RabbitMQ yet; try again shortly".to_owned())
        })
    }

    /// `queue` if given (it must be one of ours), else all of ours.
    fn chosen(&self, queue: &str) -> Result<Vec<String>, AdminError> {
        if queue.is_empty() {
            return Ok(self.queues.clone());
        }
        if self.queues.iter().any(|q| q == queue) {
            Ok(vec![queue.to_owned()])
        } else {
            Err(AdminError::invalid(
                "queue",
                format!(
                    "`{queue}` is not a queue this service consumes ({})",
                    self.queues.join(", ")
                ),
            ))
        }
    }
}

/// What the admin API operates on.
#[derive(Clone)]
pub struct Operations {
    engine: Engine,
    dead_letters: DeadLetterSource,
    /// False while production mode waits for its database.
    open: Arc<AtomicBool>,
}

impl Operations {
    /// Sagas run by `engine`, dead letters from `dead_letters`; calls fail
    /// with `UNAVAILABLE` until `open` is set (production mode sets it once
    /// the database is migrated).
    pub fn new(engine: Engine, dead_letters: DeadLetterSource, open: Arc<AtomicBool>) -> Self {
        Self {
            engine,
            dead_letters,
            open,
        }
    }

    fn check_open(&self) -> Result<(), AdminError> {
        if self.open.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(AdminError::Unavailable(
                "the service is starting and waiting for its database; try again shortly".to_owned(),
            ))
        }
    }

    async fn act(&self, id: SagaId, action: OperatorAction) -> Result<SagaInstance, AdminError> {
        self.check_open()?;
        let instance = self.engine.act(id, action).await.map_err(|e| engine_error(id, e))?;
        tracing::info!(saga_id = %id, %action, status = %instance.status, "operator action applied");
        Ok(instance)
    }

    /// Gives up saga `id`'s unsent message `outbox_id` (the engine logs it
    /// and records it in the saga's history).
    async fn discard(&self, id: SagaId, outbox_id: i64, reason: &str) -> Result<SagaInstance, AdminError> {
        self.check_open()?;
        self.engine
            .discard_unsent(id, outbox_id, reason)
            .await
            .map_err(|e| engine_error(id, e))
    }

    /// The dead letters of `queues`, each with its own page.
    async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<(String, DeadLetterPage)>, AdminError> {
        let queues = self.dead_letters.chosen(queue)?;
        let source = self.dead_letters.get()?;
        let mut pages = Vec::with_capacity(queues.len());
        for queue in queues {
            let page = source.dead_letters(&queue, limit).await?;
            pages.push((queue, page));
        }
        Ok(pages)
    }

    /// Replays `selection` from each of the chosen queues; an id counts as
    /// not found only when no queue had it.
    async fn replay(&self, queue: &str, selection: &ReplaySelection) -> Result<ReplayReport, AdminError> {
        let queues = self.dead_letters.chosen(queue)?;
        let source = self.dead_letters.get()?;
        let mut total = ReplayReport::default();
        for queue in queues {
            let report = source.replay(&queue, selection).await?;
            tracing::info!(
                %queue,
                replayed = report.replayed.len(),
                failed = report.failed.len(),
                "dead letters replayed"
            );
            total.replayed.extend(report.replayed);
            total.failed.extend(report.failed);
        }
        total.not_found = selection.missing(&total);
        Ok(total)
    }
}

/// Checks `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<AdminToken>,
}

impl BearerAuth {
    /// Accepts calls that present `token`.
    pub fn new(token: AdminToken) -> Self {
        Self { token: Arc::new(token) }
    }

    fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let presented = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <ADMIN_TOKEN>` metadata"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not ASCII"))?;
        let (scheme, token) = presented
            .split_once(' ')
            .ok_or_else(|| Status::unauthenticated("expected `authorization: Bearer <ADMIN_TOKEN>`"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Status::unauthenticated("expected a Bearer token"));
        }
        if constant_time_eq(token.trim().as_bytes(), self.token.expose().as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("wrong admin token"))
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Whether `presented` equals `expected`, in a time that depends only on
/// `expected`'s length (not on where they differ, nor on `presented`).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(presented.len() != expected.len());
    for (i, byte) in expected.iter().enumerate() {
        difference |= byte ^ presented.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(difference) == 0
}

/// `saga.admin.v1.SagaAdmin` over [`Operations`].
#[derive(Clone)]
pub struct AdminGrpc {
    operations: Operations,
}

/// The served admin service: [`AdminGrpc`] behind [`BearerAuth`].
pub type AdminServer = InterceptedService<SagaAdminServer<AdminGrpc>, BearerAuth>;

impl AdminGrpc {
    /// The service, behind the token check, ready to add to a tonic server.
    pub fn server(operations: Operations, token: AdminToken) -> AdminServer {
        SagaAdminServer::with_interceptor(Self { operations }, BearerAuth::new(token))
    }

    async fn list(&self, request: proto::ListInstancesRequest) -> Result<proto::ListInstancesResponse, AdminError> {
        let ops = &self.operations;
        ops.check_open()?;
        let now = ops.engine.now();
        let limit = page_limit(request.limit)?;
        let statuses = request
            .statuses
            .iter()
            .map(|&status| convert::status_from_proto(status))
            .collect::<Result<Vec<SagaStatus>, _>>()?;
        let older_than = request
            .older_than
            .map(|d| convert::duration("older_than", d))
            .transpose()?;
        let stuck_for = request
            .stuck_for
            .map(|d| convert::duration("stuck_for", d))
            .transpose()?;
        let filter = InstanceFilter {
            definition: Some(request.definition).filter(|d| !d.is_empty()),
            statuses,
            created_before: older_than.map(|age: Duration| now - age),
            stuck_since: stuck_for.map(|age| now - age),
            after: convert::page_token(&request.page_token)?,
            // One more than asked tells whether there is a next page.
            limit: limit + 1,
            ..InstanceFilter::default()
        };
        let mut found = ops.engine.store().list(&filter).await?;
        let next_page_token = if found.len() > limit {
            found.truncate(limit);
            found.last().map(convert::page_token_of).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(proto::ListInstancesResponse {
            instances: found.iter().map(|i| convert::instance(&ops.engine, i)).collect(),
            next_page_token,
        })
    }

    async fn get(&self, request: proto::GetInstanceRequest) -> Result<proto::GetInstanceResponse, AdminError> {
        let ops = &self.operations;
        ops.check_open()?;
        let id = convert::saga_id("id", &request.id)?;
        let InstanceRecord {
            instance,
            history,
            unsent,
            more_unsent,
        } = read_instance(ops.engine.store().as_ref(), id)
            .await?
            .ok_or(AdminError::NotFound(id))?;
        let steps = ops
            .engine
            .step_names(&instance.definition, instance.definition_version)
            .unwrap_or_default();
        Ok(proto::GetInstanceResponse {
            history: history.iter().map(|t| convert::transition(&steps, t)).collect(),
            instance: Some(convert::instance(&ops.engine, &instance)),
            steps,
            unsent: unsent.into_iter().map(convert::unsent_message).collect(),
            more_unsent,
        })
    }

    async fn unsent(
        &self,
        request: proto::ListUnsentMessagesRequest,
    ) -> Result<proto::ListUnsentMessagesResponse, AdminError> {
        let ops = &self.operations;
        ops.check_open()?;
        let limit = page_limit(request.limit)?;
        let saga = match request.saga_id.trim() {
            "" => None,
            id => Some(convert::saga_id("saga_id", id)?),
        };
        let older_than = request
            .older_than
            .map(|d| convert::duration("older_than", d))
            .transpose()?;
        let filter = UnsentFilter {
            saga,
            created_before: older_than.map(|age| ops.engine.now() - age),
            limit,
        };
        let unsent = ops.engine.store().unsent_messages(&filter).await?;
        Ok(proto::ListUnsentMessagesResponse {
            messages: unsent.into_iter().map(convert::unsent_message).collect(),
        })
    }

    async fn act(
        &self,
        request: proto::OperatorActionRequest,
        action: OperatorAction,
    ) -> Result<proto::OperatorActionResponse, AdminError> {
        let id = convert::saga_id("id", &request.id)?;
        let instance = self.operations.act(id, action).await?;
        Ok(proto::OperatorActionResponse {
            instance: Some(convert::instance(&self.operations.engine, &instance)),
        })
    }

    async fn discard(
        &self,
        request: proto::DiscardUnsentMessageRequest,
    ) -> Result<proto::OperatorActionResponse, AdminError> {
        let id = convert::saga_id("saga_id", &request.saga_id)?;
        if request.outbox_id <= 0 {
            return Err(AdminError::invalid(
                "outbox_id",
                "required: the message's outbox_id, as ListUnsentMessages shows it",
            ));
        }
        let reason = request.reason.trim();
        if reason.is_empty() {
            return Err(AdminError::invalid("reason", "required: why, for the saga's history"));
        }
        if reason.chars().count() > MAX_REASON_CHARS {
            return Err(AdminError::invalid(
                "reason",
                format!("at most {MAX_REASON_CHARS} characters"),
            ));
        }
        let instance = self.operations.discard(id, request.outbox_id, reason).await?;
        Ok(proto::OperatorActionResponse {
            instance: Some(convert::instance(&self.operations.engine, &instance)),
        })
    }

    async fn dead_letters(
        &self,
        request: proto::ListDeadLettersRequest,
    ) -> Result<proto::ListDeadLettersResponse, AdminError> {
        let limit = match request.limit as usize {
            0 => DEFAULT_DEAD_LETTERS,
            n if n > MAX_DEAD_LETTERS => {
                return Err(AdminError::invalid("limit", format!("at most {MAX_DEAD_LETTERS}")));
            }
            n => n,
        };
        let pages = self.operations.dead_letters(&request.queue, limit).await?;
        Ok(proto::ListDeadLettersResponse {
            queues: pages
                .into_iter()
                .map(|(queue, page)| convert::dead_letter_queue(queue, page))
                .collect(),
        })
    }

    async fn replay(
        &self,
        request: proto::ReplayDeadLettersRequest,
    ) -> Result<proto::ReplayDeadLettersResponse, AdminError> {
        let selection = match (request.all, request.message_ids.is_empty()) {
            (true, true) => ReplaySelection::All,
            (false, false) => {
                if let Some(blank) = request.message_ids.iter().position(|id| id.trim().is_empty()) {
                    return Err(AdminError::invalid("message_ids", format!("entry {blank} is empty")));
                }
                ReplaySelection::Ids(request.message_ids.into_iter().map(MessageId::from).collect())
            }
            (true, false) => {
                return Err(AdminError::invalid(
                    "message_ids",
                    "give either message ids or `all`, not both",
                ));
            }
            (false, true) => {
                return Err(AdminError::invalid(
                    "message_ids",
                    "give the ids of the messages to replay, or set `all`",
                ));
            }
        };
        let report = self.operations.replay(&request.queue, &selection).await?;
        Ok(convert::replay_report(report))
    }
}

#[tonic::async_trait]
impl SagaAdmin for AdminGrpc {
    async fn list_instances(
        &self,
        request: Request<proto::ListInstancesRequest>,
    ) -> Result<Response<proto::ListInstancesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_instance(
        &self,
        request: Request<proto::GetInstanceRequest>,
    ) -> Result<Response<proto::GetInstanceResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn retry(
        &self,
        request: Request<proto::OperatorActionRequest>,
    ) -> Result<Response<proto::OperatorActionResponse>, Status> {
        Ok(Response::new(
            self.act(request.into_inner(), OperatorAction::Retry).await?,
        ))
    }

    async fn cancel(
        &self,
        request: Request<proto::OperatorActionRequest>,
    ) -> Result<Response<proto::OperatorActionResponse>, Status> {
        Ok(Response::new(
            self.act(request.into_inner(), OperatorAction::Cancel).await?,
        ))
    }

    async fn resume(
        &self,
        request: Request<proto::OperatorActionRequest>,
    ) -> Result<Response<proto::OperatorActionResponse>, Status> {
        Ok(Response::new(
            self.act(request.into_inner(), OperatorAction::Resume).await?,
        ))
    }

    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        Ok(Response::new(self.dead_letters(request.into_inner()).await?))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<proto::ReplayDeadLettersRequest>,
    ) -> Result<Response<proto::ReplayDeadLettersResponse>, Status> {
        Ok(Response::new(self.replay(request.into_inner()).await?))
    }

    async fn list_unsent_messages(
        &self,
        request: Request<proto::ListUnsentMessagesRequest>,
    ) -> Result<Response<proto::ListUnsentMessagesResponse>, Status> {
        Ok(Response::new(self.unsent(request.into_inner()).await?))
    }

    async fn discard_unsent_message(
        &self,
        request: Request<proto::DiscardUnsentMessageRequest>,
    ) -> Result<Response<proto::OperatorActionResponse>, Status> {
        Ok(Response::new(self.discard(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    fn metadata(value: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(value) = value {
            metadata.insert("authorization", MetadataValue::try_from(value).expect("ASCII"));
        }
        metadata
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let auth = BearerAuth::new(AdminToken::new("s3cret-token"));
        assert!(auth.check(&metadata(Some("Bearer s3cret-token"))).is_ok());
        assert!(
            auth.check(&metadata(Some("bearer s3cret-token"))).is_ok(),
            "the scheme is case-insensitive"
        );
        for refused in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cret-token-and-more"),
            Some("Bearer s3cret-toke"),
            Some("Bearer "),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
        ] {
            let status = auth.check(&metadata(refused)).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
            assert!(!status.message().contains("s3cret"), "never echoes the token");
        }
    }

    #[test]
    fn comparison_needs_equal_length_and_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc\0", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn every_error_has_its_status() {
        let code = |e: AdminError| Status::from(e).code();
        assert_eq!(
            code(AdminError::invalid("limit", "at most 500")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(code(AdminError::NotFound(SagaId::new())), tonic::Code::NotFound);
        assert_eq!(
            code(AdminError::Precondition("no".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(code(AdminError::Unavailable("later".into())), tonic::Code::Unavailable);
        assert_eq!(code(AdminError::Internal("bug".into())), tonic::Code::Internal);
        let invalid = Status::from(AdminError::invalid("limit", "at most 500"));
        assert!(
            invalid.message().starts_with("limit: "),
            "names the field: {}",
            invalid.message()
        );
        let id = SagaId::new();
        let refused = EngineError::InvalidAction {
            id,
            action: "cancel",
            reason: "the saga has finished".into(),
        };
        let status = Status::from(engine_error(id, refused));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("the saga has finished"),
            "{}",
            status.message()
        );
        let unknown = engine_error(
            id,
            EngineError::UnknownSaga {
                kind: "retry".into(),
                key: None,
            },
        );
        assert!(matches!(unknown, AdminError::NotFound(found) if found == id));
        assert_eq!(
            code(TransportError::UnknownAddress("q.dlq".into()).into()),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(code(TransportError::Closed.into()), tonic::Code::Unavailable);
    }

    #[test]
    fn only_our_queues_can_be_chosen() {
        let source = DeadLetterSource::pending(vec!["a".into(), "b".into()]);
        assert_eq!(source.chosen("").expect("all"), ["a", "b"]);
        assert_eq!(source.chosen("b").expect("one"), ["b"]);
        let error = source.chosen("other").expect_err("not ours");
        assert!(error.to_string().starts_with("queue: "), "{error}");
        assert!(
            matches!(source.get(), Err(AdminError::Unavailable(_))),
            "not connected yet"
        );
    }
}
