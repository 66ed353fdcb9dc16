//! The connection the store used last, kept aside for its next statement.
//!
//! sqlx's pool hands out its idle connections oldest first, and tests each
//! one it gets back with a round trip to the server. At moderate load every
//! connection of the pool, and the PostgreSQL backend behind it, takes its
//! turn: each statement pays that round trip and runs on a backend whose
//! caches went cold since its last one. Reusing the connection released
//! last keeps most of the store's statements on one warm backend, with no
//! round trip between them (`docs/performance.md`, nineteenth session).
//!
//! Only a connection whose statement went through is kept. It goes back to
//! the pool when the pool has no idle connection left (someone may be
//! waiting for one), and once it has been aside for [`KEPT_AT_MOST`]: an
//! idle store holds no connection the pool's other users could need.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgTransactionManager;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres};
use sqlx_core::transaction::TransactionManager as _;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a connection stays aside unused before it goes back to the pool.
/// Many times the gap between statements of a store under load.
const KEPT_AT_MOST: Duration = Duration::from_millis(20);

/// The pool, and the connection kept aside.
pub(crate) struct Connections {
    pool: PgPool,
    kept: Arc<Kept>,
}

type Aside = Option<(PoolConnection<Postgres>, Instant)>;

struct Kept {
    slot: Mutex<Aside>,
    /// A connection was put aside into an empty slot.
    filled: Notify,
    /// The store is gone: the returner task ends.
    closed: AtomicBool,
    /// The returner task runs (it ends with its runtime too).
    returning: AtomicBool,
}

impl Kept {
    fn take(&self) -> Aside {
        self.slot.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl Connections {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            kept: Arc::new(Kept {
                slot: Mutex::new(None),
                filled: Notify::new(),
                closed: AtomicBool::new(false),
                returning: AtomicBool::new(false),
            }),
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection kept aside if there is one, else one of the pool.
    /// `saga_postgres_connections_taken_total{from}` counts which: mostly
    /// `pool` under steady load means the connection rarely stays warm.
    pub(crate) async fn acquire(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let (conn, from) = match self.kept.take() {
            Some((conn, _)) => (conn, "kept"),
            None => (self.pool.acquire().await?, "pool"),
        };
        metrics::counter!("saga_postgres_connections_taken_total", "from" => from).increment(1);
        Ok(conn)
    }

    /// Runs `statement` on a connection from [`acquire`](Self::acquire),
    /// and keeps it for the next if the statement went through; after a
    /// failure it goes back to the pool, which checks it.
    pub(crate) async fn run<T>(
        &self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let mut conn = self.acquire().await?;
        let outcome = statement(&mut conn).await;
        if outcome.is_ok() {
            self.release(conn);
        }
        outcome
    }

    /// Keeps `conn`, whose last statement went through, for the next
    /// acquire; gives it to the pool instead while the pool has no idle
    /// connection. A connection kept before goes back to the pool. One still
    /// in a transaction (an application's `begin` left open) goes back to
    /// the pool with its rollback queued.
    pub(crate) fn release(&self, mut conn: PoolConnection<Postgres>) {
        if conn.is_in_transaction() {
            PgTransactionManager::start_rollback(&mut conn);
            return;
        }
        let pool = &self.pool;
        let exhausted = pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections();
        if exhausted || pool.is_closed() {
            return;
        }
        // Nothing is kept where no task would give it back.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.kept.returning.swap(true, Ordering::AcqRel) {
            runtime.spawn(give_back_when_unused(Arc::clone(&self.kept)));
        }
        let Ok(mut slot) = self.kept.slot.lock() else {
            return;
        };
        let previous = slot.replace((conn, Instant::now()));
        drop(slot);
        if previous.is_none() {
            self.kept.filled.notify_one();
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.kept.closed.store(true, Ordering::Release);
        drop(self.kept.take());
        self.kept.filled.notify_one();
    }
}

/// Gives the kept connection back to the pool once it has been aside for
/// [`KEPT_AT_MOST`]; ends when the store is gone.
async fn give_back_when_unused(kept: Arc<Kept>) {
    /// Lets the next release start the task again if this one is dropped
    /// with its runtime.
    struct Returning(Arc<Kept>);
    impl Drop for Returning {
        fn drop(&mut self) {
            self.0.returning.store(false, Ordering::Release);
        }
    }
    let returning = Returning(kept);
    let kept = &returning.0;
    loop {
        kept.filled.notified().await;
        loop {
            if kept.closed.load(Ordering::Acquire) {
                return;
            }
            let Some(since) = kept
                .slot
                .lock()
                .ok()
                .and_then(|slot| slot.as_ref().map(|(_, since)| *since))
            else {
                break;
            };
            if since.elapsed() < KEPT_AT_MOST {
                tokio::time::sleep_until(since + KEPT_AT_MOST).await;
                continue;
            }
            let Ok(mut slot) = kept.slot.lock() else {
                return;
            };
            // Unless it was taken and another put aside meanwhile.
            if slot.as_ref().is_some_and(|(_, put)| *put == since) {
                drop(slot.take());
            }
        }
    }
}
