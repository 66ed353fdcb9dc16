//! One transition's transaction, optimistic like the engine it serves.
//!
//! Round trips are what a transition costs on PostgreSQL, so the common case
//! takes two: [`consume`](Transaction::consume) reads the inbox, and
//! [`commit`](Transaction::commit) sends one statement that inserts the inbox
//! row, writes the instance (checking its revision), appends the history and
//! the outbox rows. A single statement is atomic on its own, so no
//! `BEGIN`/`COMMIT` is needed. A duplicate committed concurrently between the
//! read and the commit hits the inbox's primary key and comes back as
//! [`StoreError::ConsumedConcurrently`]; a stale revision writes nothing and
//! comes back as [`StoreError::Conflict`].
//!
//! When application code asks for the connection ([`crate::connection`]),
//! a real transaction is opened (`BEGIN`) and the same statement runs in it
//! at commit, before `COMMIT`: the application's writes and the saga's
//! commit or roll back together.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use saga_core::{Message, MessageId, SagaId, SagaInstance, StoreError, Transaction, Transition};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use crate::error::store_error;
use crate::store::Shared;

/// The inbox, history and outbox CTEs (parameters `$1`–`$18`), inserting
/// only if the instance write matched a row when `guarded`. The guard also
/// makes them wait for that write, so a stale transition reports its
/// conflict instead of colliding with the winner's rows.
macro_rules! rest_ctes {
    (guarded) => {
        rest_ctes!(@ " WHERE EXISTS (SELECT 1 FROM written)")
    };
    (unguarded) => {
        rest_ctes!(@ "")
    };
    (@ $guard:literal) => {
        concat!(
            "inbox AS (INSERT INTO saga_inbox (consumer, message_id) \
             SELECT * FROM UNNEST($1::text[], $2::text[])", $guard, "), ",
            "history AS (INSERT INTO saga_history (saga_id, revision, at, cause, before, after, emitted, note) \
             SELECT * FROM UNNEST($3::uuid[], $4::bigint[], $5::bigint[], $6::text[]::jsonb[], \
             $7::text[]::jsonb[], $8::text[]::jsonb[], $9::text[]::jsonb[], $10::text[])", $guard, "), ",
            "outbox AS (INSERT INTO saga_outbox (saga_id, message_id, kind, destination, correlation_id, \
             created_at, headers, payload) \
             SELECT s, m, k, d, c, t, h, p FROM UNNEST($11::uuid[], $12::text[], $13::text[], $14::text[], \
             $15::text[], $16::bigint[], $17::text[]::jsonb[], $18::bytea[]) \
             WITH ORDINALITY AS u(s, m, k, d, c, t, h, p, n)", $guard, " ORDER BY n)"
        )
    };
}

const INSERT_SQL: &str = concat!(
    "WITH written AS (INSERT INTO saga_instances (id, definition, definition_version, key, status, \
     step, attempt, awaiting, deadline, failure, data, data_version, revision, created_at, updated_at) \
     VALUES ($19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29::json, $30, $31, $32, $33) RETURNING 1), ",
    rest_ctes!(guarded),
    " SELECT count(*) FROM written"
);

const UPDATE_SQL: &str = concat!(
    "WITH written AS (UPDATE saga_instances SET definition = $20, definition_version = $21, key = $22, \
     status = $23, step = $24, attempt = $25, awaiting = $26, deadline = $27, failure = $28, \
     data = $29::json, data_version = $30, revision = $31, created_at = $32, updated_at = $33 \
     WHERE id = $19 AND revision = $34 RETURNING 1), ",
    rest_ctes!(guarded),
    " SELECT count(*) FROM written"
);

const REST_SQL: &str = concat!("WITH ", rest_ctes!(unguarded), " SELECT 1::bigint");

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
    /// The pool connection, taken by the inbox read and kept to the commit,
    /// so a transition acquires (and sqlx pings) a connection once.
    held: Option<PoolConnection<Postgres>>,
    /// Opened only when application code needs the connection, or the
    /// writes do not fit in one statement.
    tx: Option<sqlx::Transaction<'static, Postgres>>,
    instances: Vec<InstanceWrite>,
    rest: Rest,
    enqueued: bool,
}

/// A buffered instance write, already turned into column values.
enum InstanceWrite {
    Insert(InstanceValues),
    Update(InstanceValues, u64),
}

impl PostgresTransaction {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            held: None,
            tx: None,
            instances: Vec::new(),
            rest: Rest::default(),
            enqueued: false,
        }
    }

    /// The connection of this transaction, opening it (`BEGIN`) on first
    /// use: application SQL executed on it commits or rolls back with the
    /// saga's writes.
    pub async fn connection(&mut self) -> Result<&mut PgConnection, StoreError> {
        let tx = match self.tx.take() {
            Some(tx) => tx,
            None => {
                let conn = match self.held.take() {
                    Some(conn) => conn,
                    None => self.shared.pool.acquire().await.map_err(store_error)?,
                };
                sqlx::Transaction::begin(conn, None).await.map_err(store_error)?
            }
        };
        Ok(&mut **self.tx.insert(tx))
    }

    /// Sends the buffered saga writes now, in this transaction (opening it
    /// if needed); they are otherwise sent at commit. A stale revision is
    /// reported here as [`StoreError::Conflict`].
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        if self.instances.is_empty() && self.rest.is_empty() {
            return Ok(());
        }
        let instances = std::mem::take(&mut self.instances);
        let rest = std::mem::take(&mut self.rest);
        let conn = self.connection().await?;
        let count = instances.len();
        let mut rest = Some(rest);
        for (index, write) in instances.into_iter().enumerate() {
            // The last instance write travels with the inbox, history and outbox rows.
            let rest = if index + 1 == count { rest.take() } else { None };
            write_all(&mut *conn, Some(write), rest.unwrap_or_default()).await?;
        }
        if let Some(rest) = rest {
            write_all(&mut *conn, None, rest).await?;
        }
        Ok(())
    }
}

/// Runs one combined statement; maps "nothing matched" to a conflict.
async fn write_all<'e, E>(executor: E, write: Option<InstanceWrite>, rest: Rest) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let first_consumed = rest.i_message.first().cloned();
    let (sql, values, expected, id) = match write {
        None => (REST_SQL, None, None, None),
        Some(InstanceWrite::Insert(values)) => {
            let id = values.id;
            (INSERT_SQL, Some(values), None, Some(id))
        }
        Some(InstanceWrite::Update(values, expected)) => {
            let id = values.id;
            (UPDATE_SQL, Some(values), Some(expected), Some(id))
        }
    };
    let mut query = rest.bind(sqlx::query_scalar::<_, i64>(sql));
    if let Some(values) = values {
        query = values.bind(query);
    }
    if let Some(expected) = expected {
        query = query.bind(i64::try_from(expected).map_err(|e| StoreError::Backend(Box::new(e)))?);
    }
    let written = query
        .fetch_one(executor)
        .await
        .map_err(|e| classify(e, id, first_consumed))?;
    match (expected, id) {
        (Some(expected), Some(id)) if written == 0 => Err(StoreError::Conflict {
            id: SagaId::from_uuid(id),
            expected,
            // Found out by the caller when it matters (see `Conflict`).
            actual: None,
        }),
        _ => Ok(()),
    }
}

/// Unique violations of the combined statement: the instance's id or key
/// (`AlreadyExists`), or the inbox (a concurrent consumer committed first).
fn classify(error: sqlx::Error, id: Option<Uuid>, consumed: Option<String>) -> StoreError {
    if let sqlx::Error::Database(db) = &error
        && db.is_unique_violation()
    {
        match (db.constraint(), id, consumed) {
            (Some("saga_instances_pkey" | "saga_instances_key"), Some(id), _) => {
                return StoreError::AlreadyExists {
                    id: SagaId::from_uuid(id),
                };
            }
            (Some("saga_inbox_pkey"), _, Some(message)) => {
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
type PgScalar<'q> = sqlx::query::QueryScalar<'q, Postgres, i64, sqlx::postgres::PgArguments>;

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

impl Bind for PgScalar<'_> {
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

/// History and outbox rows as column arrays (for `UNNEST`).
#[derive(Default)]
struct Rest {
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
    o_saga: Vec<Option<Uuid>>,
    o_id: Vec<String>,
    o_kind: Vec<String>,
    o_destination: Vec<String>,
    o_correlation: Vec<Option<String>>,
    o_created: Vec<i64>,
    o_headers: Vec<String>,
    o_payload: Vec<Vec<u8>>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Backend(Box::new(e)))
}

impl Rest {
    fn is_empty(&self) -> bool {
        self.i_message.is_empty() && self.h_saga.is_empty() && self.o_id.is_empty()
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
        Ok(())
    }

    fn push_message(&mut self, saga: Option<SagaId>, m: &Message) -> Result<(), StoreError> {
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

    fn bind<Q: Bind>(self, q: Q) -> Q {
        q.bind_value(self.i_consumer)
            .bind_value(self.i_message)
            .bind_value(self.h_saga)
            .bind_value(self.h_revision)
            .bind_value(self.h_at)
            .bind_value(self.h_cause)
            .bind_value(self.h_before)
            .bind_value(self.h_after)
            .bind_value(self.h_emitted)
            .bind_value(self.h_note)
            .bind_value(self.o_saga)
            .bind_value(self.o_id)
            .bind_value(self.o_kind)
            .bind_value(self.o_destination)
            .bind_value(self.o_correlation)
            .bind_value(self.o_created)
            .bind_value(self.o_headers)
            .bind_value(self.o_payload)
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
            "SELECT EXISTS (SELECT 1 FROM saga_inbox WHERE consumer = $1 AND message_id = $2)",
        )
        .bind(consumer)
        .bind(message.as_str());
        let seen = match &mut self.tx {
            Some(tx) => query.fetch_one(&mut **tx).await,
            None => {
                let conn = match &mut self.held {
                    Some(conn) => conn,
                    None => self.held.insert(self.shared.pool.acquire().await.map_err(store_error)?),
                };
                query.fetch_one(&mut **conn).await
            }
        }
        .map_err(store_error)?;
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
        for message in messages {
            self.rest.push_message(saga, message)?;
        }
        self.enqueued |= !messages.is_empty();
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let result = if self.tx.is_none() && self.instances.len() <= 1 {
            // Everything fits in one statement: it is its own transaction.
            let write = self.instances.pop();
            let rest = std::mem::take(&mut self.rest);
            let held = self.held.take();
            if write.is_none() && rest.is_empty() {
                Ok(())
            } else if let Some(mut conn) = held {
                write_all(&mut *conn, write, rest).await
            } else {
                write_all(&self.shared.pool, write, rest).await
            }
        } else {
            match self.flush().await {
                Ok(()) => match self.tx.take() {
                    Some(tx) => tx.commit().await.map_err(store_error),
                    None => Ok(()),
                },
                Err(e) => Err(e),
            }
        };
        // Give the connection back before reading with another one.
        drop(self.held.take());
        let result = self.with_actual_revision(result).await;
        if result.is_ok() && self.enqueued {
            self.shared.outbox_committed();
        }
        result
    }

    fn backend(&mut self) -> &mut (dyn Any + Send) {
        self
    }
}

impl PostgresTransaction {
    /// Fills in the revision a conflicting writer left, read after the fact.
    async fn with_actual_revision(&self, result: Result<(), StoreError>) -> Result<(), StoreError> {
        match result {
            Err(StoreError::Conflict { id, expected, .. }) => {
                let actual: Option<i64> = sqlx::query_scalar("SELECT revision FROM saga_instances WHERE id = $1")
                    .bind(id.as_uuid())
                    .fetch_optional(&self.shared.pool)
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
