//! One transition's transaction, optimistic like the engine it serves.
//!
//! Round trips are what a transition costs on PostgreSQL, so the engine's
//! case takes one: [`commit`](Transaction::commit) sends one statement that
//! records the consumed message, writes the instance (checking its
//! revision), appends the history and the outbox rows. A single statement is
//! atomic on its own, so no `BEGIN`/`COMMIT` is needed. A message consumed
//! before comes back as [`StoreError::ConsumedConcurrently`] (a unique index
//! catches a concurrent one); a stale revision writes nothing and comes back
//! as [`StoreError::Conflict`].
//!
//! Where a consumed message is recorded: if it caused a transition recorded
//! in the same transaction (the engine's case), on that history row
//! (`consumer`, `message_id`, unique), which is written anyway; otherwise
//! (participants) in `saga_inbox`. Every duplicate check looks both ways, so
//! a message recorded one way is a duplicate the other way too; of two
//! *concurrent* consumers of one message, the unique index catches the second
//! when both record it the same way, which they do: the engine always
//! records on the history, a participant always in the inbox.
//!
//! When application code asks for the connection ([`crate::connection`]),
//! a real transaction is opened (`BEGIN`) and the same statement runs in it
//! at commit, before `COMMIT`: the application's writes and the saga's
//! commit or roll back together.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use saga_core::{
    Cause, Message, MessageId, OutboxEntry, OutboxId, SagaId, SagaInstance, StoreError, Transaction, Transition,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgTransactionManager;
use sqlx::{PgConnection, Postgres};
use sqlx_core::transaction::TransactionManager as _;
use uuid::Uuid;

use crate::error::store_error;
use crate::staged::StagedWrite;
use crate::statement::{InstanceRow, Rows, Shape};
use crate::store::Shared;

mod batch;

pub(crate) use batch::Batcher;
pub use batch::CommitBatching;

/// A saga store transaction on PostgreSQL.
///
/// Reach it from an [`EffectHandler`](saga_core::EffectHandler) or a
/// [`CommandHandler`](saga_core::CommandHandler) with [`connection`](crate::connection)
/// to write the application's own tables in the same transaction.
///
/// The saga's own writes (inbox, instance, history, outbox) are buffered and
/// reach the database at [`commit`](Transaction::commit), or earlier with
/// [`flush`](Self::flush) if application SQL must see them.
pub struct PostgresTransaction {
    shared: Arc<Shared>,
    /// The connection, taken by the inbox read or the first application
    /// statement and kept to the commit, so a transition acquires one once.
    held: Option<PoolConnection<Postgres>>,
    /// Whether `held` is in a transaction (`BEGIN` sent). Opened only when
    /// application code needs the connection, or the writes do not fit in
    /// one statement. Driven with sqlx's transaction manager rather than a
    /// `sqlx::Transaction`, which would give the connection back to the pool
    /// and not to the store's warm slot; nested `begin`s on it still become
    /// savepoints.
    open: bool,
    instances: Vec<InstanceWrite>,
    rest: Rest,
    /// Messages enqueued.
    enqueued: usize,
    /// Outbox rows leased to this process's relay by statements sent so
    /// far, handed to it once the transaction has committed.
    handed_off: Vec<OutboxEntry>,
    /// Why a write sent early ([`flush`](PostgresTransaction::flush))
    /// failed: the transaction cannot commit any more, only roll back.
    failed: Option<String>,
    /// Outbox rows given up, with their sagas, dropped from this process's
    /// hand-offs (with their sagas' later rows) once the transaction has
    /// committed.
    discarded: Vec<(OutboxId, Option<SagaId>)>,
}

/// A buffered instance write, already turned into column values.
enum InstanceWrite {
    Insert(InstanceValues),
    Update(InstanceValues, u64),
}

impl InstanceWrite {
    fn values(&self) -> &InstanceValues {
        match self {
            Self::Insert(values) | Self::Update(values, _) => values,
        }
    }

    /// The revision an update expects; `None` for an insert.
    fn expected(&self) -> Option<i64> {
        match self {
            Self::Insert(_) => None,
            Self::Update(_, expected) => i64::try_from(*expected).ok(),
        }
    }
}

impl PostgresTransaction {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            held: None,
            open: false,
            instances: Vec::new(),
            rest: Rest::default(),
            enqueued: 0,
            handed_off: Vec::new(),
            failed: None,
            discarded: Vec::new(),
        }
    }

    /// The connection of this transaction, opening it (`BEGIN`) on first
    /// use: application SQL executed on it commits or rolls back with the
    /// saga's writes.
    pub async fn connection(&mut self) -> Result<&mut PgConnection, StoreError> {
        let mut conn = take_held(&mut self.held, &self.shared).await?;
        if !self.open {
            // On failure the connection goes to the pool, which checks it
            // (sqlx queued the rollback if `BEGIN` went through).
            PgTransactionManager::begin(&mut conn, None)
                .await
                .map_err(store_error)?;
            self.open = true;
        }
        Ok(&mut **self.held.insert(conn))
    }

    /// Stages an application write for the commit statement (see
    /// [`stage`](crate::stage)).
    pub fn stage(&mut self, write: StagedWrite) {
        self.rest.staged.push(write);
    }

    /// Sends the buffered saga writes now, in this transaction (opening it
    /// if needed); they are otherwise sent at commit. A stale revision is
    /// reported here as [`StoreError::Conflict`].
    ///
    /// Once a flush has failed, the transaction only rolls back: a later
    /// flush or commit returns an error, never a commit of part of it.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(reason) = &self.failed {
            return Err(StoreError::Backend(
                format!("an earlier write of this transaction failed ({reason}); it rolls back").into(),
            ));
        }
        if self.instances.is_empty() && self.rest.is_empty() {
            return Ok(());
        }
        // The connection first: if none comes, the writes stay buffered and
        // a retried flush sends them.
        self.connection().await?;
        let instances = std::mem::take(&mut self.instances);
        let rest = std::mem::take(&mut self.rest);
        let shared = Arc::clone(&self.shared);
        let conn = self.connection().await?;
        let written = async {
            let count = instances.len();
            let mut rest = Some(rest);
            let mut handed_off = Vec::new();
            for (index, write) in instances.into_iter().enumerate() {
                // The last instance write travels with the inbox, history and outbox rows.
                let rest = if index + 1 == count { rest.take() } else { None };
                handed_off.extend(write_all(&mut *conn, &shared, Some(write), rest.unwrap_or_default()).await?);
            }
            if let Some(rest) = rest {
                handed_off.extend(write_all(&mut *conn, &shared, None, rest).await?);
            }
            Ok::<_, StoreError>(handed_off)
        }
        .await;
        match written {
            Ok(handed_off) => {
                self.handed_off.extend(handed_off);
                Ok(())
            }
            Err(e) => Err(self.failing(e)),
        }
    }

    /// Records that a write failed (the transaction only rolls back now)
    /// and returns the error.
    fn failing(&mut self, error: StoreError) -> StoreError {
        self.failed = Some(error.to_string());
        error
    }
}

/// The connection in `held`, else one of the store's.
async fn take_held(
    held: &mut Option<PoolConnection<Postgres>>,
    shared: &Shared,
) -> Result<PoolConnection<Postgres>, StoreError> {
    match held.take() {
        Some(conn) => Ok(conn),
        None => shared.connections.acquire().await.map_err(store_error),
    }
}

/// Runs one combined statement on `held`, or on a connection of the store's
/// own, then keeps the connection warm for the next statement.
async fn write_alone(
    mut held: Option<PoolConnection<Postgres>>,
    shared: &Shared,
    write: Option<InstanceWrite>,
    rest: Rest,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut conn = take_held(&mut held, shared).await?;
    let written = write_all(&mut *conn, shared, write, rest).await;
    if left_connection_usable(&written) {
        shared.connections.release(conn);
    }
    written
}

/// Whether a connection is fit for the next statement after this outcome of
/// a statement on it: after success, or a refusal the database decided.
/// Anything else (the connection may be broken) goes back to the pool,
/// which gives it out again only after its usual checks.
fn left_connection_usable<T>(outcome: &Result<T, StoreError>) -> bool {
    matches!(
        outcome,
        Ok(_)
            | Err(StoreError::Conflict { .. }
                | StoreError::ConsumedConcurrently { .. }
                | StoreError::AlreadyExists { .. })
    )
}

/// Runs one combined statement (see [`crate::statement`]); maps "nothing
/// matched" to a conflict and "consumed before" to `ConsumedConcurrently`.
/// Returns the outbox rows it leased to this process's relay (to hand over
/// once committed).
async fn write_all<'e, E>(
    executor: E,
    shared: &Shared,
    write: Option<InstanceWrite>,
    rest: Rest,
) -> Result<Vec<OutboxEntry>, StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let mut rest = rest.settled();
    let first_consumed = rest
        .i_message
        .iter()
        .chain(rest.h_message.iter().flatten())
        .next()
        .cloned();
    let (instance, values, expected) = match write {
        None => (InstanceRow::None, None, None),
        Some(InstanceWrite::Insert(values)) => (InstanceRow::Insert, Some(values), None),
        Some(InstanceWrite::Update(values, expected)) => (InstanceRow::Update, Some(values), Some(expected)),
    };
    let id = values.as_ref().map(|v| v.id);
    // A row of no saga beside an instance write is foreign too: it must
    // not become the saga's newest (the hand-off's predecessor check would
    // take it for the saga's own once it is sent). Without one (a
    // participant's replies) such rows are handed off as they are.
    let foreign = rest.o_saga.iter().any(|saga| match saga {
        Some(saga) => Some(*saga) != id || instance == InstanceRow::None,
        None => instance != InstanceRow::None,
    });
    // Leased for the hand-off only if the relay takes them (and they were kept).
    let lease = if foreign || rest.messages.len() != rest.o_id.len() {
        None
    } else {
        shared.handoff_lease_millis()
    };
    let messages = std::mem::take(&mut rest.messages);
    let shape = Shape {
        instance,
        inbox: Rows::of(rest.i_message.len()),
        history: Rows::of(rest.h_saga.len()),
        history_consumes: rest.h_message.iter().any(Option::is_some),
        outbox: Rows::of(rest.o_id.len()),
        foreign,
    };
    let outboxed = shape.outbox != Rows::None;
    let staged = std::mem::take(&mut rest.staged);
    let mut query: PgWritten = if staged.is_empty() {
        sqlx::query_as(shape.sql())
    } else {
        let mut offset = shape.parameters();
        let ctes: Vec<String> = staged
            .iter()
            .enumerate()
            .map(|(index, write)| {
                let cte = write.cte(&format!("staged_{index}"), offset);
                offset += write.parameters();
                cte
            })
            .collect();
        sqlx::query_as(sqlx::AssertSqlSafe(shape.staged_sql(&ctes)))
    };
    if let Some(values) = values {
        query = values.bind(query);
    }
    if let Some(expected) = expected {
        query = query.bind(i64::try_from(expected).map_err(|e| StoreError::Backend(Box::new(e)))?);
    }
    let mut query = rest.bind(query, &shape);
    if outboxed {
        // Read only where the hand-off check uses them (no lock otherwise).
        let published = match shape.hands_off_after_predecessor() {
            true => shared.published_unmarked(),
            false => Vec::new(),
        };
        query = query.bind(lease).bind(published);
    }
    let query = staged.iter().fold(query, |query, write| write.bind_to(query));
    let (written, fresh, handed, ids, awaits) = query
        .fetch_one(executor)
        .await
        .map_err(|e| classify(e, id, expected, first_consumed.clone()))?;
    if !fresh {
        return Err(StoreError::ConsumedConcurrently {
            id: MessageId::from(first_consumed.unwrap_or_default()),
        });
    }
    if let (Some(expected), Some(id), 0) = (expected, id, written) {
        return Err(StoreError::Conflict {
            id: SagaId::from_uuid(id),
            expected,
            // Found out by the caller when it matters (see `Conflict`).
            actual: None,
        });
    }
    if let Some(predecessor) = awaits {
        shared.await_confirm(predecessor);
    }
    if handed && ids.len() == messages.len() {
        Ok(ids
            .into_iter()
            .zip(messages)
            .map(|(id, (saga, message))| OutboxEntry { id, saga, message })
            .collect())
    } else {
        Ok(Vec::new())
    }
}

/// Unique violations of the combined statement: the instance's id or key
/// (`AlreadyExists`), or the inbox (a concurrent consumer committed first).
fn classify(error: sqlx::Error, id: Option<Uuid>, expected: Option<u64>, consumed: Option<String>) -> StoreError {
    // Raised by `saga_abort` (migration 0006) in a statement carrying staged writes.
    if let sqlx::Error::Database(db) = &error {
        match (db.code().as_deref(), id, &consumed) {
            (Some("SG001"), Some(id), _) => {
                return StoreError::Conflict {
                    id: SagaId::from_uuid(id),
                    expected: expected.unwrap_or_default(),
                    // Found out by the caller when it matters (see `Conflict`).
                    actual: None,
                };
            }
            (Some("SG002"), _, Some(message)) => {
                return StoreError::ConsumedConcurrently {
                    id: MessageId::from(message.clone()),
                };
            }
            _ => {}
        }
    }
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        match (db.constraint(), id, consumed) {
            (Some("saga_instances_pkey" | "saga_instances_key"), Some(id), _) => {
                return StoreError::AlreadyExists {
                    id: SagaId::from_uuid(id),
                };
            }
            (Some("saga_inbox_pkey" | "saga_history_consumed"), _, Some(message)) => {
                return StoreError::ConsumedConcurrently {
                    id: MessageId::from(message),
                };
            }
            _ => {}
        }
    }
    store_error(error)
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;
/// The commit statement's query: it returns the row `Shape::sql` describes.
pub(crate) type PgWritten =
    sqlx::query::QueryAs<'static, Postgres, (i64, bool, bool, Vec<i64>, Option<i64>), sqlx::postgres::PgArguments>;
/// A shared commit statement's query (see `batch`): a row per transition
/// written (its position, its outbox row, whether that was handed off, the
/// predecessor it waits for if not).
pub(crate) type PgBatched =
    sqlx::query::QueryAs<'static, Postgres, (Option<i64>, Option<i64>, bool, Option<i64>), sqlx::postgres::PgArguments>;

/// Something parameters can be bound to in order.
trait Bind: Sized {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Send + 'static;
}

impl Bind for PgQuery<'_> {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Send + 'static,
    {
        self.bind(value)
    }
}

impl Bind for PgWritten {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Send + 'static,
    {
        self.bind(value)
    }
}

/// An instance as column values.
struct InstanceValues {
    id: Uuid,
    definition: String,
    definition_version: i64,
    key: Option<String>,
    status: &'static str,
    step: i64,
    attempt: i64,
    awaiting: Option<String>,
    deadline: Option<i64>,
    failure: Option<String>,
    data: String,
    data_version: i64,
    revision: i64,
    created_at: i64,
    updated_at: i64,
}

impl InstanceValues {
    fn new(i: &SagaInstance) -> Result<Self, StoreError> {
        Ok(Self {
            id: *i.id.as_uuid(),
            definition: i.definition.clone(),
            definition_version: i64::from(i.definition_version),
            key: i.key.clone(),
            status: i.status.as_str(),
            step: i64::from(i.step),
            attempt: i64::from(i.attempt),
            awaiting: i.awaiting.as_ref().map(|m| m.as_str().to_owned()),
            deadline: i.deadline.map(|d| d.as_millis()),
            failure: i.failure.clone(),
            data: i.data.clone(),
            data_version: i64::from(i.data_version),
            revision: i64::try_from(i.revision).map_err(|e| StoreError::Backend(Box::new(e)))?,
            created_at: i.created_at.as_millis(),
            updated_at: i.updated_at.as_millis(),
        })
    }

    fn bind<Q: Bind>(self, q: Q) -> Q {
        q.bind_value(self.id)
            .bind_value(self.definition)
            .bind_value(self.definition_version)
            .bind_value(self.key)
            .bind_value(self.status)
            .bind_value(self.step)
            .bind_value(self.attempt)
            .bind_value(self.awaiting)
            .bind_value(self.deadline)
            .bind_value(self.failure)
            .bind_value(self.data)
            .bind_value(self.data_version)
            .bind_value(self.revision)
            .bind_value(self.created_at)
            .bind_value(self.updated_at)
    }
}

/// Inbox, history and outbox rows as column arrays (for `UNNEST`).
#[derive(Default)]
struct Rest {
    /// Consumed messages; [`settled`](Self::settled) moves those that caused
    /// a transition recorded here onto its history row.
    i_consumer: Vec<String>,
    i_message: Vec<String>,
    h_saga: Vec<Uuid>,
    h_revision: Vec<i64>,
    h_at: Vec<i64>,
    h_cause: Vec<String>,
    h_before: Vec<Option<String>>,
    h_after: Vec<String>,
    h_emitted: Vec<String>,
    h_note: Vec<Option<String>>,
    /// The id of the message that caused the transition, if one did.
    h_caused_by: Vec<Option<String>>,
    h_consumer: Vec<Option<String>>,
    h_message: Vec<Option<String>>,
    o_saga: Vec<Option<Uuid>>,
    o_id: Vec<String>,
    o_kind: Vec<String>,
    o_destination: Vec<String>,
    o_correlation: Vec<Option<String>>,
    o_created: Vec<i64>,
    o_headers: Vec<String>,
    o_payload: Vec<Vec<u8>>,
    /// The messages themselves, kept (when the store hands off) to give
    /// the relay what it would otherwise read back.
    messages: Vec<(Option<SagaId>, Message)>,
    /// Application writes carried in the statement.
    staged: Vec<StagedWrite>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(Box::new(e)))
}

impl Rest {
    fn is_empty(&self) -> bool {
        self.i_message.is_empty() && self.h_saga.is_empty() && self.o_id.is_empty() && self.staged.is_empty()
    }

    fn consumes(&self, consumer: &str, message: &str) -> bool {
        self.i_consumer
            .iter()
            .zip(&self.i_message)
            .any(|(c, m)| c == consumer && m == message)
    }

    fn push_transition(&mut self, t: &Transition) -> Result<(), StoreError> {
        let revision = i64::try_from(t.revision).map_err(|e| StoreError::Backend(Box::new(e)))?;
        let before = t.before.as_ref().map(to_json).transpose()?;
        let (cause, after, emitted) = (to_json(&t.cause)?, to_json(&t.after)?, to_json(&t.emitted)?);
        self.h_saga.push(*t.saga_id.as_uuid());
        self.h_revision.push(revision);
        self.h_at.push(t.at.as_millis());
        self.h_cause.push(cause);
        self.h_before.push(before);
        self.h_after.push(after);
        self.h_emitted.push(emitted);
        self.h_note.push(t.note.clone());
        self.h_caused_by.push(match &t.cause {
            Cause::Message { id, .. } => Some(id.as_str().to_owned()),
            _ => None,
        });
        self.h_consumer.push(None);
        self.h_message.push(None);
        Ok(())
    }

    fn push_message(&mut self, saga: Option<SagaId>, m: &Message, keep: bool) -> Result<(), StoreError> {
        if keep {
            self.messages.push((saga, m.clone()));
        }
        let headers = to_json(&m.headers)?;
        self.o_saga.push(saga.map(|s| *s.as_uuid()));
        self.o_id.push(m.id.as_str().to_owned());
        self.o_kind.push(m.kind.clone());
        self.o_destination.push(m.destination.clone());
        self.o_correlation.push(m.correlation_id.clone());
        self.o_created.push(m.timestamp.as_millis());
        self.o_headers.push(headers);
        self.o_payload.push(m.payload.clone());
        Ok(())
    }

    /// Moves each consumed message that caused a transition recorded here
    /// from the inbox rows onto that transition's history row.
    fn settled(mut self) -> Self {
        let mut index = 0;
        while index < self.i_message.len() {
            let cause =
                self.h_caused_by.iter().zip(&self.h_message).position(|(cause, taken)| {
                    taken.is_none() && cause.as_deref() == Some(self.i_message[index].as_str())
                });
            match cause {
                Some(row) => {
                    self.h_consumer[row] = Some(self.i_consumer.remove(index));
                    self.h_message[row] = Some(self.i_message.remove(index));
                }
                None => index += 1,
            }
        }
        self
    }

    /// Binds the inbox, history and outbox parts `shape` has: a part of one
    /// row as scalars, of several as arrays.
    fn bind<Q: Bind>(self, q: Q, shape: &Shape) -> Q {
        /// Binds one column of a part.
        fn column<Q: Bind, T>(q: Q, rows: Rows, values: Vec<T>) -> Q
        where
            T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Send + 'static,
            Vec<T>: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres>,
            Option<T>: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres>,
        {
            match rows {
                Rows::None => q,
                Rows::One => q.bind_value(values.into_iter().next()),
                Rows::Many => q.bind_value(values),
            }
        }
        let (i, h, o) = (shape.inbox, shape.history, shape.outbox);
        let q = column(q, i, self.i_consumer);
        let q = column(q, i, self.i_message);
        let q = column(q, h, self.h_saga);
        let q = column(q, h, self.h_revision);
        let q = column(q, h, self.h_at);
        let q = column(q, h, self.h_cause);
        let q = column(q, h, self.h_before);
        let q = column(q, h, self.h_after);
        let q = column(q, h, self.h_emitted);
        let q = column(q, h, self.h_note);
        let q = column(q, h, self.h_consumer);
        let q = column(q, h, self.h_message);
        let q = column(q, o, self.o_saga);
        let q = column(q, o, self.o_id);
        let q = column(q, o, self.o_kind);
        let q = column(q, o, self.o_destination);
        let q = column(q, o, self.o_correlation);
        let q = column(q, o, self.o_created);
        let q = column(q, o, self.o_headers);
        column(q, o, self.o_payload)
    }
}

#[async_trait]
impl Transaction for PostgresTransaction {
    async fn consume(&mut self, consumer: &str, message: &MessageId) -> Result<bool, StoreError> {
        if self.rest.consumes(consumer, message.as_str()) {
            return Ok(false);
        }
        // Optimistic: a read now, the insert at commit (where a concurrent
        // consumer that committed first makes it fail).
        let query = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM saga_inbox WHERE consumer = $1 AND message_id = $2) \
             OR EXISTS (SELECT 1 FROM saga_history WHERE consumer = $1 AND message_id = $2)",
        )
        .bind(consumer)
        .bind(message.as_str());
        let conn = take_held(&mut self.held, &self.shared).await?;
        let seen = match query.fetch_one(&mut **self.held.insert(conn)).await {
            Ok(seen) => seen,
            Err(error) => {
                // The connection may be broken: back to the pool, which
                // checks it. Inside a transaction it stays, so the commit
                // fails rather than write the rest without what came before.
                if !self.open {
                    drop(self.held.take());
                }
                return Err(store_error(error));
            }
        };
        if seen {
            return Ok(false);
        }
        self.rest.i_consumer.push(consumer.to_owned());
        self.rest.i_message.push(message.as_str().to_owned());
        Ok(true)
    }

    async fn consume_at_commit(&mut self, consumer: &str, message: &MessageId) -> Result<(), StoreError> {
        if self.rest.consumes(consumer, message.as_str()) {
            return Err(StoreError::ConsumedConcurrently { id: message.clone() });
        }
        // No read: the inbox row goes into the commit's single statement,
        // whose unique key rejects a message consumed before.
        self.rest.i_consumer.push(consumer.to_owned());
        self.rest.i_message.push(message.as_str().to_owned());
        Ok(())
    }

    async fn insert(&mut self, instance: &SagaInstance) -> Result<(), StoreError> {
        self.instances
            .push(InstanceWrite::Insert(InstanceValues::new(instance)?));
        Ok(())
    }

    async fn update(&mut self, instance: &SagaInstance, expected_revision: u64) -> Result<(), StoreError> {
        let values = InstanceValues::new(instance)?;
        self.instances.push(InstanceWrite::Update(values, expected_revision));
        Ok(())
    }

    async fn record(&mut self, transition: &Transition) -> Result<(), StoreError> {
        self.rest.push_transition(transition)
    }

    async fn enqueue(&mut self, saga: Option<SagaId>, messages: &[Message]) -> Result<(), StoreError> {
        let keep = self.shared.hands_off();
        for message in messages {
            self.rest.push_message(saga, message, keep)?;
        }
        self.enqueued += messages.len();
        Ok(())
    }

    async fn discard_unsent(&mut self, id: OutboxId) -> Result<Option<OutboxEntry>, StoreError> {
        // In the open transaction: the row, and the saga's later unsent rows
        // whose leases it gives back, stay locked until it ends. A relay's
        // mark or release of them waits that long (and with it the store's
        // mark writer; an operator's transaction is short); one that locked
        // a later row first and waits for this one is a deadlock PostgreSQL
        // ends by failing one side (the operator's: unavailable, try again;
        // the relay's: its messages go again). A rollback leaves the rows as
        // they were. Only the saga's oldest unsent row: the hand-off check
        // takes the saga's newest row being sent to mean all are. Finding
        // the older and the later rows reads the unsent rows on either side
        // (there is no index by saga): an operator's action, its cost in
        // proportion to the backlog. Read back as operators see rows: a row
        // the relay cannot read is given up too.
        let query = sqlx::query(
            "WITH given AS ( \
                UPDATE saga_outbox o SET sent_at = now(), discarded_at = now() \
                WHERE o.id = $1 AND o.sent_at IS NULL AND NOT EXISTS ( \
                    SELECT 1 FROM saga_outbox p \
                    WHERE p.sent_at IS NULL AND p.id < o.id AND p.saga_id = o.saga_id) \
                RETURNING o.id, o.saga_id, o.message_id, o.kind, o.destination, o.correlation_id, o.created_at, \
                          o.headers, o.payload \
             ), released AS ( \
                UPDATE saga_outbox l SET claimed_until = NULL FROM given g \
                WHERE l.sent_at IS NULL AND l.id > g.id AND l.saga_id = g.saga_id \
             ) \
             SELECT * FROM given",
        )
        .bind(id);
        let row = match query.fetch_optional(self.connection().await?).await {
            Ok(row) => row,
            // PostgreSQL would answer a later COMMIT with a rollback.
            Err(error) => return Err(self.failing(store_error(error))),
        };
        let Some(row) = row else {
            return Ok(None);
        };
        match crate::row::shown_outbox_entry(&row) {
            Ok(entry) => {
                self.discarded.push((id, entry.saga));
                Ok(Some(entry))
            }
            // Given up in the table already: this transaction must not commit.
            Err(error) => Err(self.failing(error)),
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let result = if !self.open && self.instances.len() <= 1 {
            // Everything fits in one statement: it is its own transaction.
            let write = self.instances.pop();
            let rest = std::mem::take(&mut self.rest);
            let held = self.held.take();
            let shared = Arc::clone(&self.shared);
            let written = if write.is_none() && rest.is_empty() {
                Ok(Vec::new())
            } else if held.is_none()
                && shared.config.commit_batch > 1
                && let Some(write) = write
            {
                let rest = rest.settled();
                if batch::fits(&write, &rest) {
                    // Shares a statement with concurrent transitions.
                    batch::commit(&shared, batch::Batched::new(write, rest)).await
                } else {
                    write_alone(held, &shared, Some(write), rest).await
                }
            } else {
                write_alone(held, &shared, write, rest).await
            };
            written.map(|handed| self.handed_off.extend(handed))
        } else {
            match self.flush().await {
                Ok(()) => self.commit_open().await,
                Err(e) => Err(e),
            }
        };
        // Give the connection back before reading with another one.
        self.give_back();
        let result = self.with_actual_revision(result).await;
        if result.is_ok() {
            self.shared.growth.committed(self.shared.connections.pool());
        }
        if result.is_ok() && self.enqueued > 0 {
            let handed_off = std::mem::take(&mut self.handed_off);
            let all = handed_off.len() == self.enqueued;
            self.shared.hand_off(handed_off);
            self.shared.outbox_committed(all);
        }
        if result.is_ok() && !self.discarded.is_empty() {
            self.shared.discarded(&self.discarded);
        }
        result
    }

    fn backend(&mut self) -> &mut (dyn Any + Send) {
        self
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl PostgresTransaction {
    /// Commits the transaction `held` is in, if it is in one.
    async fn commit_open(&mut self) -> Result<(), StoreError> {
        let Some(conn) = self.held.as_mut().filter(|_| self.open) else {
            return Ok(());
        };
        PgTransactionManager::commit(conn).await.map_err(store_error)?;
        self.open = false;
        Ok(())
    }

    /// Gives the held connection back: to the store's warm slot when no
    /// transaction is left open on it, else to the pool with its rollback
    /// queued (as a dropped `sqlx::Transaction` does).
    fn give_back(&mut self) {
        let Some(mut conn) = self.held.take() else {
            return;
        };
        if self.open {
            PgTransactionManager::start_rollback(&mut conn);
            self.open = false;
        } else {
            self.shared.connections.release(conn);
        }
    }

    /// Fills in the revision a conflicting writer left, read after the fact.
    async fn with_actual_revision(&self, result: Result<(), StoreError>) -> Result<(), StoreError> {
        match result {
            Err(StoreError::Conflict { id, expected, .. }) => {
                let actual: Option<i64> = sqlx::query_scalar("SELECT revision FROM saga_instances WHERE id = $1")
                    .bind(id.as_uuid())
                    .fetch_optional(self.shared.connections.pool())
                    .await
                    .map_err(store_error)?;
                Err(StoreError::Conflict {
                    id,
                    expected,
                    actual: actual.and_then(|r| u64::try_from(r).ok()),
                })
            }
            other => other,
        }
    }
}
