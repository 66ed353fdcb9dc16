//! One transition's transaction: the inbox row is written at once (its answer
//! is needed at once); the instance, history and outbox writes are buffered
//! and sent as a single statement at commit, so a transition costs four round
//! trips (`BEGIN`, inbox, state, `COMMIT`) whatever it writes.

use std::any::Any;

use async_trait::async_trait;
use saga_core::{Message, MessageId, SagaId, SagaInstance, StoreError, Transaction, Transition};
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use crate::error::{insert_error, store_error};
use crate::store::Shared;
use std::sync::Arc;

/// The history and outbox CTEs, their parameters numbered from `$n`. After
/// an instance write they insert only if the write matched a row (`GUARD`):
/// that also makes them wait for it, so a stale transition reports its
/// conflict instead of colliding with the winner's history row.
macro_rules! rest_ctes {
    (1) => {
        rest_ctes!(@ "", "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8",
                     "$9", "$10", "$11", "$12", "$13", "$14", "$15", "$16")
    };
    (16) => {
        rest_ctes!(@ GUARD, "$16", "$17", "$18", "$19", "$20", "$21", "$22", "$23",
                     "$24", "$25", "$26", "$27", "$28", "$29", "$30", "$31")
    };
    (17) => {
        rest_ctes!(@ GUARD, "$17", "$18", "$19", "$20", "$21", "$22", "$23", "$24",
                     "$25", "$26", "$27", "$28", "$29", "$30", "$31", "$32")
    };
    (@ GUARD, $($rest:literal),*) => {
        rest_ctes!(@ " WHERE EXISTS (SELECT 1 FROM written)", $($rest),*)
    };
    (@ $guard:literal, $h1:literal, $h2:literal, $h3:literal, $h4:literal, $h5:literal, $h6:literal, $h7:literal, $h8:literal,
       $o1:literal, $o2:literal, $o3:literal, $o4:literal, $o5:literal, $o6:literal, $o7:literal, $o8:literal) => {
        concat!(
            "history AS (INSERT INTO saga_history (saga_id, revision, at, cause, before, after, emitted, note) \
             SELECT * FROM UNNEST(", $h1, "::uuid[], ", $h2, "::bigint[], ", $h3, "::bigint[], ", $h4,
            "::text[]::jsonb[], ", $h5, "::text[]::jsonb[], ", $h6, "::text[]::jsonb[], ", $h7,
            "::text[]::jsonb[], ", $h8, "::text[])", $guard, "), ",
            "outbox AS (INSERT INTO saga_outbox (saga_id, message_id, kind, destination, correlation_id, \
             created_at, headers, payload) \
             SELECT s, m, k, d, c, t, h, p FROM UNNEST(", $o1, "::uuid[], ", $o2, "::text[], ", $o3,
            "::text[], ", $o4, "::text[], ", $o5, "::text[], ", $o6, "::bigint[], ", $o7,
            "::text[]::jsonb[], ", $o8, "::bytea[]) WITH ORDINALITY AS u(s, m, k, d, c, t, h, p, n)", $guard,
            " ORDER BY n)"
        )
    };
}

/// A saga store transaction on PostgreSQL.
///
/// Reach it from an [`EffectHandler`](saga_core::EffectHandler) or a
/// [`CommandHandler`](saga_core::CommandHandler) with [`connection`](crate::connection)
/// (or by downcasting [`Transaction::backend`]) to write the application's
/// own tables in the same transaction.
///
/// The saga's own writes (instance, history, outbox) are buffered and reach
/// the database at [`commit`](Transaction::commit), or earlier with
/// [`flush`](Self::flush) if application SQL must see them.
pub struct PostgresTransaction {
    tx: sqlx::Transaction<'static, Postgres>,
    shared: Arc<Shared>,
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
    pub(crate) fn new(tx: sqlx::Transaction<'static, Postgres>, shared: Arc<Shared>) -> Self {
        Self {
            tx,
            shared,
            instances: Vec::new(),
            rest: Rest::default(),
            enqueued: false,
        }
    }

    /// The connection the transaction runs on: application SQL executed on
    /// it commits or rolls back with the saga's writes.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Sends the buffered saga writes now (they are otherwise sent at
    /// commit). A stale revision is reported here as [`StoreError::Conflict`].
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let instances = std::mem::take(&mut self.instances);
        let rest = std::mem::take(&mut self.rest);
        if instances.is_empty() && rest.is_empty() {
            return Ok(());
        }
        let count = instances.len();
        let mut rest = Some(rest);
        for (index, write) in instances.into_iter().enumerate() {
            // The last instance write travels with the history and outbox rows.
            let rest = if index + 1 == count { rest.take() } else { None };
            self.write_instance(write, rest.unwrap_or_default()).await?;
        }
        if let Some(rest) = rest {
            let query = rest.bind(sqlx::query(concat!("WITH ", rest_ctes!(1), " SELECT 1::bigint")));
            query.execute(&mut *self.tx).await.map_err(store_error)?;
        }
        Ok(())
    }

    async fn write_instance(&mut self, write: InstanceWrite, rest: Rest) -> Result<(), StoreError> {
        match write {
            InstanceWrite::Insert(values) => {
                let id = SagaId::from_uuid(values.id);
                let query = sqlx::query(concat!(
                    "WITH written AS (INSERT INTO saga_instances (id, definition, definition_version, key, status, \
                     step, attempt, awaiting, deadline, failure, data, data_version, revision, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::json, $12, $13, $14, $15) RETURNING 1), ",
                    rest_ctes!(16),
                    " SELECT count(*) FROM written"
                ));
                let query = rest.bind(values.bind(query));
                query
                    .execute(&mut *self.tx)
                    .await
                    .map_err(|e| insert_error(e, id))?;
            }
            InstanceWrite::Update(values, expected) => {
                let id = values.id;
                let expected_db = i64::try_from(expected).map_err(|e| StoreError::Backend(Box::new(e)))?;
                let query = sqlx::query_scalar::<_, i64>(concat!(
                    "WITH written AS (UPDATE saga_instances SET definition = $2, definition_version = $3, key = $4, \
                     status = $5, step = $6, attempt = $7, awaiting = $8, deadline = $9, failure = $10, \
                     data = $11::json, data_version = $12, revision = $13, created_at = $14, updated_at = $15 \
                     WHERE id = $1 AND revision = $16 RETURNING 1), ",
                    rest_ctes!(17),
                    " SELECT count(*) FROM written"
                ));
                let query = rest.bind(values.bind(query).bind(expected_db));
                let updated = query.fetch_one(&mut *self.tx).await.map_err(store_error)?;
                if updated == 0 {
                    // A fresh statement sees the winner's commit.
                    let actual: Option<i64> = sqlx::query_scalar("SELECT revision FROM saga_instances WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&mut *self.tx)
                        .await
                        .map_err(store_error)?;
                    return Err(StoreError::Conflict {
                        id: SagaId::from_uuid(id),
                        expected,
                        actual: actual.and_then(|r| u64::try_from(r).ok()),
                    });
                }
            }
        }
        Ok(())
    }
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
        self.h_saga.is_empty() && self.o_id.is_empty()
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
        q.bind_value(self.h_saga)
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
        // A concurrent transaction holding the same key makes this wait for
        // it; once it commits, nothing is inserted and this is a duplicate.
        let inserted = sqlx::query(
            "INSERT INTO saga_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(message.as_str())
        .execute(&mut *self.tx)
        .await
        .map_err(store_error)?;
        Ok(inserted.rows_affected() == 1)
    }

    async fn insert(&mut self, instance: &SagaInstance) -> Result<(), StoreError> {
        self.instances.push(InstanceWrite::Insert(InstanceValues::new(instance)?));
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
        self.flush().await?;
        let this = *self;
        this.tx.commit().await.map_err(store_error)?;
        if this.enqueued {
            this.shared.outbox_committed();
        }
        Ok(())
    }

    fn backend(&mut self) -> &mut (dyn Any + Send) {
        self
    }
}
