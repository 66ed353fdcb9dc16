//! [`PostgresStore`]: saga-core's `Store` on PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::{
    CancellationToken, DeadlineStore, DueDeadline, InstanceFilter, OutboxEntry, OutboxId, OutboxStore, QueryStore,
    SagaId, SagaInstance, SagaStore, StoreError, Timestamp, Transaction, Transition,
};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OnceCell};

use crate::error::store_error;
use crate::retention::RetentionConfig;
use crate::row::{self, instance_columns};
use crate::transaction::PostgresTransaction;

/// How a [`PostgresStore`] behaves. Table names are fixed; to keep the
/// tables in their own schema, set `search_path` on the pool's connections
/// (`PgConnectOptions::options([("search_path", "my_schema")])`) before
/// [`migrate`](crate::migrate).
#[derive(Clone, Debug)]
pub struct PostgresStoreConfig {
    /// The `LISTEN/NOTIFY` channel that wakes relays when messages were
    /// committed to the outbox (by any replica).
    pub notify_channel: String,
    /// How long consumed-message and sent-message rows, and optionally
    /// finished instances, are kept.
    pub retention: RetentionConfig,
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            notify_channel: "saga_outbox".to_owned(),
            retention: RetentionConfig::default(),
        }
    }
}

/// What the store and its transactions share.
pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) config: PostgresStoreConfig,
    /// Wakes relays of this process at once when this process commits messages.
    local: Notify,
    /// Wakes relays on other replicas' commits (fed by the listener task).
    remote: Arc<Notify>,
    /// A `pg_notify` is about to be sent: later commits need not send their own.
    notify_pending: Arc<AtomicBool>,
    listener: OnceCell<()>,
    shutdown: CancellationToken,
}

impl Shared {
    /// Called after a commit that enqueued messages.
    pub(crate) fn outbox_committed(&self) {
        self.local.notify_one();
        // Sent after the commit, on its own connection and at most one at a
        // time: a NOTIFY inside the transition's transaction would take
        // PostgreSQL's global notify lock through the commit's WAL flush and
        // serialize all committing writers. The flag is cleared before the
        // NOTIFY is sent, so a commit that skips sending is always covered by
        // a NOTIFY sent after it committed.
        if self.notify_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let pending = Arc::clone(&self.notify_pending);
        let pool = self.pool.clone();
        let channel = self.config.notify_channel.clone();
        tokio::spawn(async move {
            pending.store(false, Ordering::Release);
            let sent = sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&pool)
                .await;
            if let Err(e) = sent {
                // Relays poll as well: a lost notification only costs latency.
                tracing::debug!(error = %e, "outbox notification not sent");
            }
        });
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A saga store on PostgreSQL: instances, history, the outbox and the inbox
/// in four tables (see `migrations/`), every transition in one transaction.
///
/// Cheap to clone; clones share the pool. Several stores (several replicas)
/// may share one database: optimistic revisions keep transitions exact, and
/// outbox claims are leased with `FOR UPDATE SKIP LOCKED`.
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

impl PostgresStore {
    /// A store on `pool` with the default configuration. Run
    /// [`migrate`](crate::migrate) first.
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, PostgresStoreConfig::default())
    }

    /// A store on `pool` configured by `config`.
    pub fn with_config(pool: PgPool, config: PostgresStoreConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                pool,
                config,
                local: Notify::new(),
                remote: Arc::new(Notify::new()),
                notify_pending: Arc::new(AtomicBool::new(false)),
                listener: OnceCell::new(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresStoreConfig {
        &self.shared.config
    }

    /// Opens a transaction typed as this backend's, for application code
    /// that wants saga writes and its own SQL together outside the engine.
    /// Nothing is sent to the database yet.
    pub fn begin_postgres(&self) -> PostgresTransaction {
        PostgresTransaction::new(Arc::clone(&self.shared))
    }

    /// Starts, once, the task that turns `NOTIFY`s from any replica into
    /// wake-ups. It holds one pool connection while the store lives.
    async fn ensure_listener(&self) {
        let shared = &self.shared;
        shared
            .listener
            .get_or_init(|| async {
                let pool = shared.pool.clone();
                let channel = shared.config.notify_channel.clone();
                let wake = Arc::clone(&shared.remote);
                let shutdown = shared.shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = listen(pool, channel, wake) => {}
                    }
                });
            })
            .await;
    }
}

/// Forwards notifications on `channel` to `wake`, reconnecting with backoff.
async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            loop {
                listener.recv().await?;
                while listener.next_buffered().is_some() {}
                wake.notify_one();
            }
        };
        let result: Result<(), sqlx::Error> = listener.await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "outbox listener failed; relays poll until it is back");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl SagaStore for PostgresStore {
    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.shared.pool)
        .await
        .map_err(store_error)?;
        row.as_ref().map(row::instance).transpose()
    }

    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, StoreError> {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT id FROM saga_instances WHERE definition = $1 AND key = $2")
                .bind(definition)
                .bind(key)
                .fetch_optional(&self.shared.pool)
                .await
                .map_err(store_error)?;
        Ok(id.map(SagaId::from_uuid))
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, StoreError> {
        Ok(Box::new(self.begin_postgres()))
    }
}

fn db_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A lease in milliseconds, capped at a year (longer ones would overflow
/// PostgreSQL's timestamps for absurd inputs and mean nothing more).
fn lease_millis(lease: Duration) -> f64 {
    const YEAR_MILLIS: u128 = 365 * 24 * 3600 * 1000;
    lease.as_millis().min(YEAR_MILLIS) as f64
}

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // `locked`: available rows in id order, skipping rows other claims,
        // releases or marks are working on. A row is claimed only if every
        // earlier unsent row of its saga is claimed with it: the saga's first
        // unsent row outside `locked` (held by another relay, leased or
        // locked) is a barrier its later rows wait behind, so a saga's
        // messages are never published out of order. Finding the barrier
        // walks the (saga_id, id) index from the start and stops at once.
        let rows = sqlx::query(
            "WITH locked AS ( \
                SELECT id, saga_id FROM saga_outbox \
                WHERE sent_at IS NULL AND (claimed_until IS NULL OR claimed_until <= now()) \
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED \
             ), barrier AS ( \
                SELECT s.saga_id, ( \
                    SELECT p.id FROM saga_outbox p \
                    WHERE p.saga_id = s.saga_id AND p.sent_at IS NULL AND p.id NOT IN (SELECT id FROM locked) \
                    ORDER BY p.id LIMIT 1) AS first_held \
                FROM (SELECT DISTINCT saga_id FROM locked WHERE saga_id IS NOT NULL) s \
             ), ok AS ( \
                SELECT l.id FROM locked l LEFT JOIN barrier b ON b.saga_id = l.saga_id \
                WHERE b.first_held IS NULL OR l.id < b.first_held \
             ) \
             UPDATE saga_outbox o SET claimed_until = now() + $2::float8 * interval '1 millisecond' \
             FROM ok WHERE o.id = ok.id \
             RETURNING o.id, o.saga_id, o.message_id, o.kind, o.destination, o.correlation_id, o.created_at, \
                       o.headers, o.payload",
        )
        .bind(db_limit(limit))
        .bind(lease_millis(lease))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(store_error)?;
        let mut entries = rows.iter().map(row::outbox_entry).collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }

    async fn mark_sent(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let query = if self.shared.config.retention.sent_messages.is_zero() {
            sqlx::query("DELETE FROM saga_outbox WHERE id = ANY($1)")
        } else {
            sqlx::query(
                "UPDATE saga_outbox SET sent_at = now(), claimed_until = NULL WHERE id = ANY($1) AND sent_at IS NULL",
            )
        };
        query.bind(ids).execute(&self.shared.pool).await.map_err(store_error)?;
        Ok(())
    }

    async fn release(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE saga_outbox SET claimed_until = NULL WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(ids)
            .execute(&self.shared.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn wait_for_messages(&self, timeout: Duration) {
        self.ensure_listener().await;
        let shared = &self.shared;
        let _ = tokio::time::timeout(timeout, async {
            tokio::select! {
                () = shared.local.notified() => {}
                () = shared.remote.notified() => {}
            }
        })
        .await;
    }
}

#[async_trait]
impl DeadlineStore for PostgresStore {
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<DueDeadline>, StoreError> {
        // Exactly-once firing comes from the engine's revision check, so a
        // plain read is enough here: two replicas firing the same deadline
        // race on the instance's revision and one of them wins.
        let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
            "SELECT id, deadline FROM saga_instances WHERE deadline <= $1 ORDER BY deadline, id LIMIT $2",
        )
        .bind(now.as_millis())
        .bind(db_limit(limit))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(store_error)?;
        Ok(rows
            .into_iter()
            .map(|(id, due)| DueDeadline {
                saga: SagaId::from_uuid(id),
                due: Timestamp::from_millis(due),
            })
            .collect())
    }
}

#[async_trait]
impl QueryStore for PostgresStore {
    async fn history(&self, id: SagaId) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query(
            "SELECT saga_id, revision, at, cause, before, after, emitted, note FROM saga_history \
             WHERE saga_id = $1 ORDER BY revision",
        )
        .bind(id.as_uuid())
        .fetch_all(&self.shared.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(row::transition).collect()
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<SagaInstance>, StoreError> {
        let limit = if filter.limit == 0 { 100 } else { filter.limit };
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        let rows = sqlx::query(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM saga_instances \
             WHERE ($1::text IS NULL OR definition = $1) \
               AND (cardinality($2::text[]) = 0 OR status = ANY($2)) \
               AND ($3::bigint IS NULL OR updated_at <= $3) \
             ORDER BY updated_at DESC, id DESC LIMIT $4"
        ))
        .bind(filter.definition.as_deref())
        .bind(statuses)
        .bind(filter.updated_before.map(|t| t.as_millis()))
        .bind(db_limit(limit))
        .fetch_all(&self.shared.pool)
        .await
        .map_err(store_error)?;
        rows.iter().map(row::instance).collect()
    }
}
