//! [`PostgresStore`]: saga-core's `Store` on PostgreSQL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use saga_core::{
    CancellationToken, DeadlineStore, DueDeadline, InstanceFilter, OutboxEntry, OutboxId, OutboxStore, QueryStore,
    SagaId, SagaInstance, SagaStore, StoreError, Summary, SummaryQuery, Timestamp, Transaction, Transition,
    UnsentFilter, UnsentMessage,
};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OnceCell, oneshot};

use crate::error::store_error;
use crate::growth::Growth;
use crate::retention::RetentionConfig;
use crate::row::{self, instance_columns};
use crate::transaction::{Batcher, CommitBatching, PostgresTransaction};
use crate::warm::Connections;

/// How a [`PostgresStore`] behaves. Table names are fixed; to keep the
/// tables in their own schema, set `search_path` on the pool's connections
/// (`PgConnectOptions::options([("search_path", "my_schema")])`) before
/// [`migrate`](crate::migrate).
#[derive(Clone, Debug)]
pub struct PostgresStoreConfig {
    /// The `LISTEN/NOTIFY` channel that wakes relays when messages were
    /// committed to the outbox (by any replica).
    pub notify_channel: String,
    /// The shortest time between two `NOTIFY`s from this store. The first
    /// commit after a quiet spell notifies at once; commits within the
    /// interval after it share one trailing `NOTIFY`, so a busy store sends
    /// one statement per interval rather than one per commit. Relays of this
    /// process are woken at once regardless.
    pub notify_interval: Duration,
    /// Whether the messages this store commits while a relay claims from
    /// it are leased to that relay as they are written (for the lease its
    /// claims ask for), so its next claim takes them from memory: no claim
    /// statement, no read back. A saga's message is handed off only if all
    /// earlier ones of the saga are sent, so order is kept; rows the relay
    /// does not publish in time (it stopped, the process died) are claimed
    /// like any other once the lease ends.
    pub handoff: bool,
    /// The most transitions one statement commits. While earlier commits
    /// are under way, the engine's transitions that arrive meanwhile share
    /// the next statement (group commit; each still returns only once its
    /// own rows are committed), staged writes included. `1` sends every
    /// transition on its own.
    pub commit_batch: usize,
    /// The most statements carrying transitions at once when they are
    /// batched ([`commit_batch`](Self::commit_batch) above 1). Fewer make
    /// larger batches under load, and statements that do not contend for
    /// the same index pages; one (the default) served the end-to-end load
    /// test with fewer statements per saga than two. More can help when the
    /// database is far away (a round trip of several milliseconds).
    pub commits_in_flight: usize,
    /// How long a statement that would commit a single transition waits
    /// for another to join it ([`commit_batch`](Self::commit_batch) above
    /// 1), while transitions have lately been arriving on average no further
    /// apart than this, or than a statement takes (see
    /// [`saga_core::Linger`]). It goes as soon as one has joined. `ZERO`
    /// (the default) never waits. About a millisecond saves statements, and
    /// CPU, near a deployment's limit, where transitions arrive densely but
    /// often find no statement under way to queue behind.
    pub commit_linger: Duration,
    /// How long marking messages sent waits to gather more relay rounds'
    /// messages into its statement. Meanwhile, messages confirmed but not
    /// yet marked count as sent for their saga's next message (this process
    /// published them, in order): for its hand-off, and for this process's
    /// claims, which are woken when the relay round that published a message
    /// such a message waits for ends. Other replicas' claims wait for the
    /// mark, and then for their next poll or notification. `ZERO` marks at
    /// once.
    pub mark_delay: Duration,
    /// How long consumed-message and sent-message rows, and optionally
    /// finished instances, are kept.
    pub retention: RetentionConfig,
    /// After this many commits, and at each doubling of it (six times), the
    /// store runs `ANALYZE` (of the columns its statements look rows up by,
    /// at a statistics target of 10) on those of its tables that hold four
    /// times the rows PostgreSQL's statistics count in them, or were never
    /// analyzed. A new deployment's tables start empty: the plans its
    /// connections cache are made for empty tables and read whole tables
    /// until autovacuum analyzes them, up to a minute or more under full
    /// load. `ANALYZE` makes every connection plan again. `None` leaves it
    /// to autovacuum.
    pub analyze_while_growing: Option<u64>,
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            notify_channel: "saga_outbox".to_owned(),
            notify_interval: Duration::from_millis(10),
            handoff: true,
            commit_batch: 64,
            commits_in_flight: 1,
            commit_linger: Duration::ZERO,
            mark_delay: Duration::from_millis(20),
            retention: RetentionConfig::default(),
            analyze_while_growing: Some(1_000),
        }
    }
}

/// What the store and its transactions share.
pub(crate) struct Shared {
    /// The pool, with the connection of the last statement kept warm.
    pub(crate) connections: Connections,
    pub(crate) config: PostgresStoreConfig,
    /// Wakes relays of this process at once when this process commits
    /// messages, or confirms one that a message left to claims waits for.
    local: Notify,
    /// Wakes relays on other replicas' commits (fed by the listener task).
    remote: Arc<Notify>,
    /// A notification came since claims last read the table.
    remote_dirty: Arc<AtomicBool>,
    /// Coalesces the `NOTIFY`s of this store's commits.
    notifier: Arc<Notifier>,
    /// Messages leased to this process's relay at commit.
    handoff: Mutex<HandOff>,
    /// Mark-sent requests of concurrent relay rounds.
    marks: Mutex<Marks>,
    /// Transitions waiting to share a statement.
    pub(crate) batcher: Batcher,
    /// Counts commits, to analyze tables while they first grow.
    pub(crate) growth: Growth,
    listener: OnceCell<()>,
    shutdown: CancellationToken,
}

/// Messages committed and leased to this store's relay, waiting for its next claim.
struct HandOff {
    /// In commit order, each with the time its lease ends (as seen here).
    queue: VecDeque<(OutboxEntry, Instant)>,
    /// A relay claimed or waited for messages lately: until then, commits
    /// lease their messages to it.
    attached_until: Option<Instant>,
    /// The lease that relay's claims ask for.
    lease: Duration,
    /// When claims last read the outbox table.
    last_read: Option<Instant>,
    /// This process committed (or released) messages it did not hand off,
    /// or confirmed one that such a message waits for, since then.
    table_dirty: bool,
    /// When a claim was last served from hand-offs.
    served: Option<Instant>,
}

/// Hand-offs waiting beyond this many: commits leave their messages to claims.
const HANDOFF_CAPACITY: usize = 10_000;

/// A relay that has not asked for messages for this long (beyond its poll
/// wait) is taken as gone.
const RELAY_GRACE: Duration = Duration::from_secs(2);

/// While hand-offs keep a relay busy, its claims still read the table this
/// often: other replicas' messages, and those left by processes that died.
const READ_TABLE_EVERY: Duration = Duration::from_millis(250);

/// How long a message left to claims behind its saga's unconfirmed previous
/// one is sure to have that confirm wake the relay (see
/// [`Shared::await_confirm`]): older entries make room for new ones. Without
/// a wake, the relay's next read of the table finds it.
const AWAIT_CONFIRM: Duration = Duration::from_secs(1);

/// The most such confirms awaited at once; beyond, the same fallback.
const AWAITED_CAPACITY: usize = 1_024;

impl Shared {
    fn marks(&self) -> MutexGuard<'_, Marks> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn handoff(&self) -> MutexGuard<'_, HandOff> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether commits now lease their messages to this store's relay.
    pub(crate) fn hands_off(&self) -> bool {
        self.handoff_lease().is_some()
    }

    /// The relay's lease, if commits now hand their messages to it.
    fn handoff_lease(&self) -> Option<Duration> {
        if !self.config.handoff {
            return None;
        }
        let handoff = self.handoff();
        let now = Instant::now();
        let attached = handoff.attached_until.is_some_and(|until| now < until);
        // A relay that lets hand-offs wait is not keeping up: leave new
        // messages to claims (batches) until it has caught up.
        let lease = handoff.lease;
        let keeping_up = handoff
            .queue
            .front()
            .is_none_or(|(_, until)| *until > now + lease - lease / 8);
        (attached && keeping_up && handoff.queue.len() < HANDOFF_CAPACITY && !lease.is_zero()).then_some(lease)
    }

    /// The lease for messages being committed, in milliseconds, if they are
    /// to be handed off.
    pub(crate) fn handoff_lease_millis(&self) -> Option<f64> {
        self.handoff_lease().map(lease_millis)
    }

    /// Messages this process's relay published, the broker confirmed, and
    /// whose marking sent has not committed yet: for the hand-off check they
    /// are sent (a saga's next message may follow them).
    pub(crate) fn published_unmarked(&self) -> Vec<i64> {
        let marks = self.marks();
        marks.pending.iter().chain(&marks.in_statement).copied().collect()
    }

    /// A message was written behind `predecessor`, its saga's previous one,
    /// and left to claims: neither marked sent nor known here as confirmed.
    /// When this process's relay has it confirmed (at the end of the round
    /// that published it, when the round asks for its marks), the relay is
    /// woken, and its claim counts it as sent (as the hand-off check does),
    /// rather than waiting for the mark's delay. A confirm that came already
    /// needs nothing: the claim after the commit counts it.
    pub(crate) fn await_confirm(&self, predecessor: OutboxId) {
        let mut marks = self.marks();
        if marks.pending.contains(&predecessor) || marks.in_statement.contains(&predecessor) {
            return;
        }
        let now = Instant::now();
        if marks.awaited.len() >= AWAITED_CAPACITY / 2 {
            marks
                .awaited
                .retain(|_, since| now.duration_since(*since) < AWAIT_CONFIRM);
        }
        if marks.awaited.len() < AWAITED_CAPACITY {
            marks.awaited.insert(predecessor, now);
        }
    }

    /// Has this process's relays claim from the table at once.
    fn wake_claims(&self) {
        self.handoff().table_dirty = true;
        self.local.notify_one();
    }

    /// Queues committed messages that were leased to this store's relay.
    pub(crate) fn hand_off(&self, entries: Vec<OutboxEntry>) {
        if entries.is_empty() {
            return;
        }
        let mut handoff = self.handoff();
        let lease = handoff.lease;
        // The lease began at the statement; it ends no later than this here.
        let until = Instant::now() + lease;
        handoff.queue.extend(entries.into_iter().map(|e| (e, until)));
    }

    /// Messages given up by a committed transaction, with their sagas:
    /// this process's relay takes neither them nor their sagas' later
    /// messages from its hand-offs (the transaction gave those leases back:
    /// they are claimed from the table, once), and every replica's relays
    /// read the table at once.
    pub(crate) fn discarded(&self, given_up: &[(OutboxId, Option<SagaId>)]) {
        self.handoff().queue.retain(|(entry, _)| {
            !given_up
                .iter()
                .any(|(id, saga)| entry.id == *id || (saga.is_some() && entry.saga == *saga && entry.id > *id))
        });
        self.outbox_committed(false);
    }

    /// Called after a commit that enqueued messages; `handed_off` if all
    /// of them went to this store's relay (no other relay need know).
    pub(crate) fn outbox_committed(&self, handed_off: bool) {
        self.local.notify_one();
        if handed_off {
            return;
        }
        self.handoff().table_dirty = true;
        // Sent after the commit, on its own connection, by one task at a
        // time: a NOTIFY inside the transition's transaction would take
        // PostgreSQL's global notify lock through the commit's WAL flush and
        // serialize all committing writers, and one NOTIFY per commit would
        // double the statements a busy store sends.
        let notifier = &self.notifier;
        notifier.dirty.store(true, Ordering::SeqCst);
        if notifier.running.swap(true, Ordering::SeqCst) {
            return; // the running task sends a NOTIFY after this commit
        }
        let notifier = Arc::clone(notifier);
        let pool = self.connections.pool().clone();
        let channel = self.config.notify_channel.clone();
        let interval = self.config.notify_interval;
        tokio::spawn(async move {
            loop {
                // Every commit that marked `dirty` before this swap is covered
                // by the NOTIFY sent next (it runs after those commits).
                if notifier.dirty.swap(false, Ordering::SeqCst) {
                    let sent = sqlx::query("SELECT pg_notify($1, '')")
                        .bind(&channel)
                        .execute(&pool)
                        .await;
                    if let Err(e) = sent {
                        // Relays poll as well: a lost notification only costs latency.
                        tracing::debug!(error = %e, "outbox notification not sent");
                    }
                    tokio::time::sleep(interval).await;
                    continue;
                }
                notifier.running.store(false, Ordering::SeqCst);
                // A commit between the swap and this store found the task
                // running and left its NOTIFY to it: take the task back.
                if !notifier.dirty.load(Ordering::SeqCst) || notifier.running.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }
}

/// The state behind [`Shared::outbox_committed`]'s coalescing.
#[derive(Default)]
struct Notifier {
    /// Commits happened that no NOTIFY sent yet covers.
    dirty: AtomicBool,
    /// A task is sending NOTIFYs.
    running: AtomicBool,
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

/// Below this inbox retention, [`PostgresStore::with_config`] warns: broker
/// redeliveries and relays re-sending after a crash can come that late.
pub const SHORT_INBOX_RETENTION: Duration = Duration::from_secs(3600);

impl PostgresStore {
    /// A store on `pool` with the default configuration. Run
    /// [`migrate`](crate::migrate) first.
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, PostgresStoreConfig::default())
    }

    /// A store on `pool` configured by `config`. An inbox retention under
    /// [`SHORT_INBOX_RETENTION`] is logged as a warning: a message
    /// redelivered after its id was purged would be applied again.
    pub fn with_config(pool: PgPool, config: PostgresStoreConfig) -> Self {
        if config.retention.inbox < SHORT_INBOX_RETENTION {
            tracing::warn!(
                inbox_retention = ?config.retention.inbox,
                "inbox retention under {SHORT_INBOX_RETENTION:?}: a message redelivered after its id is purged \
                 would be applied again"
            );
        }
        let batcher = Batcher::new(config.commit_linger);
        let growth = Growth::new(config.analyze_while_growing);
        Self {
            shared: Arc::new(Shared {
                connections: Connections::new(pool),
                config,
                local: Notify::new(),
                remote: Arc::new(Notify::new()),
                remote_dirty: Arc::new(AtomicBool::new(false)),
                notifier: Arc::new(Notifier::default()),
                handoff: Mutex::new(HandOff {
                    queue: VecDeque::new(),
                    attached_until: None,
                    lease: Duration::ZERO,
                    last_read: None,
                    table_dirty: false,
                    served: None,
                }),
                marks: Mutex::new(Marks::default()),
                batcher,
                growth,
                listener: OnceCell::new(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        self.shared.connections.pool()
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresStoreConfig {
        &self.shared.config
    }

    /// How this store's commits shared statements so far.
    pub fn commit_batching(&self) -> CommitBatching {
        self.shared.batcher.stats()
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
                let pool = shared.connections.pool().clone();
                let channel = shared.config.notify_channel.clone();
                let wake = Arc::clone(&shared.remote);
                let dirty = Arc::clone(&shared.remote_dirty);
                let shutdown = shared.shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = listen(pool, channel, wake, dirty) => {}
                    }
                });
            })
            .await;
    }
}

/// Forwards notifications on `channel` to `wake`, reconnecting with backoff.
async fn listen(pool: PgPool, channel: String, wake: Arc<Notify>, dirty: Arc<AtomicBool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            // Notifications may have been missed while not listening.
            dirty.store(true, Ordering::SeqCst);
            loop {
                listener.recv().await?;
                while listener.next_buffered().is_some() {}
                dirty.store(true, Ordering::SeqCst);
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
        .fetch_optional(self.shared.connections.pool())
        .await
        .map_err(store_error)?;
        row.as_ref().map(row::instance).transpose()
    }

    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, StoreError> {
        let id: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT id FROM saga_instances WHERE definition = $1 AND key = $2")
                .bind(definition)
                .bind(key)
                .fetch_optional(self.shared.connections.pool())
                .await
                .map_err(store_error)?;
        Ok(id.map(SagaId::from_uuid))
    }

    async fn load_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaInstance>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE definition = $1 AND key = $2"
        ))
        .bind(definition)
        .bind(key)
        .fetch_optional(self.shared.connections.pool())
        .await
        .map_err(store_error)?;
        row.as_ref().map(row::instance).transpose()
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
    lease.min(LONGEST_WAIT).as_millis() as f64
}

/// The longest lease or wait taken as given; longer ones (`Duration::MAX`
/// meant as "for ever") would overflow the clock's arithmetic.
const LONGEST_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Mark-sent requests waiting for the statement that writes them.
#[derive(Default)]
pub(crate) struct Marks {
    pending: Vec<OutboxId>,
    /// Taken from `pending`, in the statement being written.
    in_statement: Vec<OutboxId>,
    /// Messages that messages left to claims wait for, and since when (see
    /// [`Shared::await_confirm`]).
    awaited: HashMap<OutboxId, Instant>,
    waiting: Vec<oneshot::Sender<Result<(), (bool, String)>>>,
    /// A caller is writing marks (and writes what comes in meanwhile).
    writing: bool,
}

/// Hands the writing over if the writer's task is cancelled: requests it
/// had not taken fail (their rows stay leased, and are published again).
/// The second field is set once the writer finished normally.
struct Writing<'a>(&'a Shared, bool);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.1 {
            return;
        }
        let mut marks = self.0.marks();
        marks.writing = false;
        marks.pending.clear();
        marks.in_statement.clear();
        marks.waiting.clear();
    }
}

impl PostgresStore {
    /// Marks rows sent: deletes them when sent messages are not kept.
    async fn write_marks(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let query = if self.shared.config.retention.sent_messages.is_zero() {
            sqlx::query("DELETE FROM saga_outbox WHERE id = ANY($1)")
        } else {
            sqlx::query(
                "UPDATE saga_outbox SET sent_at = now(), claimed_until = NULL WHERE id = ANY($1) AND sent_at IS NULL",
            )
        };
        self.shared
            .connections
            .run(async |conn| query.bind(ids).execute(conn).await)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Claims unsent rows from the table (see [`OutboxStore::claim`]).
    ///
    /// Each pass reads a window of available rows past the last one read; a
    /// window that held only rows waiting behind their saga's held message
    /// would otherwise end the claim with nothing, however many other
    /// sagas' rows lie beyond it. The windows grow, and the passes are few.
    async fn claim_from_table(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut entries = Vec::new();
        let mut after = i64::MIN;
        let mut window = limit;
        for _ in 0..CLAIM_PASSES {
            let wanted = limit.saturating_sub(entries.len());
            if wanted == 0 {
                break;
            }
            let pass = self.claim_window(window, wanted, after, lease).await?;
            entries.extend(pass.entries);
            match pass.full_up_to {
                Some(last) => after = last,
                // The window was not full: there is nothing further on.
                None => break,
            }
            window = window.saturating_mul(2);
        }
        entries.sort_by_key(|e| e.id);
        Ok(entries)
    }

    /// One pass of [`claim_from_table`](Self::claim_from_table): claims up to
    /// `wanted` of the first `window` available rows with ids above `after`.
    async fn claim_window(
        &self,
        window: usize,
        wanted: usize,
        after: i64,
        lease: Duration,
    ) -> Result<ClaimedWindow, StoreError> {
        // `locked`: available rows in id order, skipping rows other claims,
        // releases or marks are working on. A row is claimed only if every
        // earlier unsent row of its saga is claimed with it: the saga's first
        // unsent row outside `locked` (held by another relay, leased, locked,
        // or claimed by an earlier pass) is a barrier its later rows wait
        // behind, so a saga's messages are never published out of order. A
        // barrier that matters has a smaller id than some row of `locked`,
        // so finding the barriers reads the unsent-rows index only up to the
        // window's last id. A row this process published and had confirmed,
        // waiting to be marked (`$3`), is no barrier: the hand-off check
        // counts it as sent too. The window's extent comes back on every
        // row, and on a row of its own when nothing was claimed.
        let claim = sqlx::query(
            "WITH locked AS ( \
                SELECT id, saga_id FROM saga_outbox \
                WHERE sent_at IS NULL AND (claimed_until IS NULL OR claimed_until <= now()) AND id > $4 \
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED \
             ), barrier AS ( \
                SELECT p.saga_id, min(p.id) AS first_held FROM saga_outbox p \
                WHERE p.sent_at IS NULL AND p.id < (SELECT max(id) FROM locked) \
                  AND p.saga_id IN (SELECT saga_id FROM locked) \
                  AND p.id NOT IN (SELECT id FROM locked) AND p.id <> ALL($3::int8[]) \
                GROUP BY p.saga_id \
             ), ok AS ( \
                SELECT l.id FROM locked l LEFT JOIN barrier b ON b.saga_id = l.saga_id \
                WHERE b.first_held IS NULL OR l.id < b.first_held \
                ORDER BY l.id LIMIT $5 \
             ), claimed AS ( \
                UPDATE saga_outbox o SET claimed_until = now() + $2::float8 * interval '1 millisecond' \
                FROM ok WHERE o.id = ok.id \
                RETURNING o.id, o.saga_id, o.message_id, o.kind, o.destination, o.correlation_id, o.created_at, \
                          o.headers, o.payload \
             ) \
             SELECT c.*, w.scanned, w.last_scanned \
             FROM (SELECT count(*) AS scanned, max(id) AS last_scanned FROM locked) w \
             LEFT JOIN claimed c ON true",
        )
        .bind(db_limit(window))
        .bind(lease_millis(lease))
        .bind(self.shared.published_unmarked())
        .bind(after)
        .bind(db_limit(wanted));
        let rows = self
            .shared
            .connections
            .run(async |conn| claim.fetch_all(conn).await)
            .await
            .map_err(store_error)?;
        // Every row carries the window's extent (there is always one).
        let full_up_to = match rows.first() {
            Some(row) if row::get::<i64>(row, "scanned")? >= db_limit(window) => row::get(row, "last_scanned")?,
            _ => None,
        };
        let mut pass = ClaimedWindow {
            entries: Vec::with_capacity(rows.len()),
            full_up_to,
        };
        for row in &rows {
            // The window's own row: nothing was claimed.
            if row::get::<Option<i64>>(row, "id")?.is_none() {
                continue;
            }
            match row::outbox_entry(row) {
                Ok(entry) => pass.entries.push(entry),
                // One unreadable row (written by another tool) must not hold
                // back the rows claimed with it: it stays leased, unsent, and
                // comes round again, reported, when its lease ends. Later
                // messages of its saga wait behind it, as order requires.
                Err(error) => {
                    tracing::error!(%error, "an outbox row cannot be read; it stays unsent for an operator");
                    metrics::counter!("saga_postgres_outbox_unreadable_total").increment(1);
                }
            }
        }
        Ok(pass)
    }
}

/// What one window of a claim took.
struct ClaimedWindow {
    entries: Vec<OutboxEntry>,
    /// The window's last id, when it was full: there may be more beyond.
    full_up_to: Option<i64>,
}

/// How many windows one claim reads at most. Each is twice the last, so a
/// claim of 256 looks past up to 65,280 rows waiting behind their sagas'
/// held messages before it gives up until the next round.
const CLAIM_PASSES: usize = 8;

#[async_trait]
impl OutboxStore for PostgresStore {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lease = lease.min(LONGEST_WAIT);
        // Messages handed off at commit first; the table too when there are
        // none, or it has not been read for a while.
        let now = Instant::now();
        let handed = {
            let mut handoff = self.shared.handoff();
            handoff.attached_until = Some(now + RELAY_GRACE);
            handoff.lease = lease;
            // A relay publishes for at most three quarters of its lease: an
            // entry with less left is given back to the table's claims.
            let enough = now + lease.mul_f64(0.75) + Duration::from_millis(10);
            let mut handed: Vec<OutboxEntry> = Vec::new();
            let mut stale: Vec<OutboxId> = Vec::new();
            loop {
                // A transition's messages stay in one batch, so concurrent
                // rounds never hold two of one saga.
                let same_saga = |next: &OutboxEntry| {
                    handed
                        .last()
                        .is_some_and(|last| last.saga.is_some() && last.saga == next.saga)
                };
                match handoff.queue.front() {
                    Some((next, _)) if handed.len() < limit || same_saga(next) => {}
                    _ => break,
                }
                match handoff.queue.pop_front() {
                    Some((entry, until)) if until >= enough => handed.push(entry),
                    Some((entry, _)) => stale.push(entry.id),
                    None => break,
                }
            }
            // While hand-offs serve the relay, the table is read only when
            // there may be rows they do not cover: this process committed or
            // released some, another replica notified, or it is time to look.
            let due = handoff.last_read.is_none_or(|at| now >= at + READ_TABLE_EVERY);
            let dirty = handoff.table_dirty || self.shared.remote_dirty.load(Ordering::SeqCst);
            if !handed.is_empty() {
                handoff.served = Some(now);
            }
            let serving = handoff.served.is_some_and(|at| now < at + READ_TABLE_EVERY);
            let read = due || dirty || !serving || !stale.is_empty();
            if read {
                handoff.last_read = Some(now);
                handoff.table_dirty = false;
                self.shared.remote_dirty.store(false, Ordering::SeqCst);
            }
            if !read {
                return Ok(handed);
            }
            (handed, stale)
        };
        let (handed, stale) = handed;
        if !stale.is_empty() {
            // Claimable again at once (rather than when their lease ends),
            // by the claim below among others.
            self.release(&stale).await?;
        }
        // A transition's messages stay together, so `handed` may be over the limit.
        let mut entries = self.claim_from_table(limit.saturating_sub(handed.len()), lease).await?;
        if !handed.is_empty() {
            entries.extend(handed);
            entries.sort_by_key(|e| e.id);
        }
        Ok(entries)
    }

    async fn mark_sent(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Rounds running at once share statements: the first writes, and
        // keeps writing what the others add meanwhile (one commit each).
        let (done, rx) = oneshot::channel();
        let (writer, awaited) = {
            let mut marks = self.shared.marks();
            marks.pending.extend_from_slice(ids);
            marks.waiting.push(done);
            let mut awaited = false;
            if !marks.awaited.is_empty() {
                for id in ids {
                    awaited |= marks.awaited.remove(id).is_some();
                }
            }
            (!std::mem::replace(&mut marks.writing, true), awaited)
        };
        if awaited {
            // Confirmed, so what waits behind it may go now: the claim
            // counts it as sent from `pending`.
            self.shared.wake_claims();
        }
        if writer {
            let mut writing = Writing(&self.shared, false);
            let delay = self.shared.config.mark_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            loop {
                let (ids, waiting) = {
                    let mut marks = self.shared.marks();
                    marks.in_statement.clear();
                    if marks.pending.is_empty() {
                        // Under the lock: a request after this finds no writer and writes.
                        marks.writing = false;
                        writing.1 = true;
                        break;
                    }
                    let ids = std::mem::take(&mut marks.pending);
                    marks.in_statement.clone_from(&ids);
                    (ids, std::mem::take(&mut marks.waiting))
                };
                let written = self
                    .write_marks(&ids)
                    .await
                    .map_err(|e| (e.is_retryable(), e.to_string()));
                for waiter in waiting {
                    let _ = waiter.send(written.clone());
                }
            }
            drop(writing);
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((true, e))) => Err(StoreError::Unavailable(e.into())),
            Ok(Err((false, e))) => Err(StoreError::Backend(e.into())),
            // The writer went away (its task was cancelled): the rows stay
            // leased and are published again after it, which is allowed.
            Err(_) => Err(StoreError::Unavailable("marking sent was interrupted".into())),
        }
    }

    async fn release(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE saga_outbox SET claimed_until = NULL WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(ids)
            .execute(self.shared.connections.pool())
            .await
            .map_err(store_error)?;
        // Back in the table: the next claim reads it.
        self.shared.handoff().table_dirty = true;
        Ok(())
    }

    async fn wait_for_messages(&self, timeout: Duration) {
        let timeout = timeout.min(LONGEST_WAIT);
        self.ensure_listener().await;
        let shared = &self.shared;
        shared.handoff().attached_until = Some(Instant::now() + timeout + RELAY_GRACE);
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
        .fetch_all(self.shared.connections.pool())
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
        .fetch_all(self.shared.connections.pool())
        .await
        .map_err(store_error)?;
        rows.iter().map(row::transition).collect()
    }

    async fn list(&self, filter: &InstanceFilter) -> Result<Vec<SagaInstance>, StoreError> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        // The stuck rule is `InstanceFilter::is_stuck`; the cursor compares
        // (updated_at, id) as a row, like the ORDER BY.
        let rows = sqlx::query(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM saga_instances \
             WHERE ($1::text IS NULL OR definition = $1) \
               AND (cardinality($2::text[]) = 0 OR status = ANY($2)) \
               AND ($3::bigint IS NULL OR updated_at <= $3) \
               AND ($5::bigint IS NULL OR created_at <= $5) \
               AND ($6::bigint IS NULL OR status = 'needs_attention' \
                    OR (status IN ('running', 'compensating') AND updated_at <= $6)) \
               AND ($7::bigint IS NULL OR (updated_at, id) < ($7, $8::uuid)) \
             ORDER BY updated_at DESC, id DESC LIMIT $4"
        ))
        .bind(filter.definition.as_deref())
        .bind(statuses)
        .bind(filter.updated_before.map(|t| t.as_millis()))
        .bind(db_limit(filter.effective_limit()))
        .bind(filter.created_before.map(|t| t.as_millis()))
        .bind(filter.stuck_since.map(|t| t.as_millis()))
        .bind(filter.after.map(|c| c.updated_at.as_millis()))
        .bind(filter.after.map(|c| *c.id.as_uuid()))
        .fetch_all(self.shared.connections.pool())
        .await
        .map_err(store_error)?;
        rows.iter().map(row::instance).collect()
    }
    async fn summary(&self, query: &SummaryQuery) -> Result<Summary, StoreError> {
        self.summarize(query).await
    }

    async fn unsent_messages(&self, filter: &UnsentFilter) -> Result<Vec<UnsentMessage>, StoreError> {
        // Along the unsent-rows index, in id order. No index leads from a
        // saga to its unsent rows, so a saga's listing first asks its
        // instance for its newest message (`last_outbox_id`): as a saga's
        // messages are marked sent in order, none, or that one sent (or
        // deleted by retention), means all are, and the listing ends at
        // once (a one-time filter: no column in it). Only a saga with
        // something unsent (or rows but no instance), or a listing of all,
        // reads the backlog; an age filter with nothing that old reads all
        // of it.
        let rows = sqlx::query(
            "SELECT id, saga_id, message_id, kind, destination, correlation_id, created_at, headers, payload, \
                    floor(extract(epoch FROM claimed_until) * 1000)::int8 AS claimed_until \
             FROM saga_outbox \
             WHERE sent_at IS NULL \
               AND ($1::uuid IS NULL OR saga_id = $1) \
               AND ($1::uuid IS NULL OR NOT EXISTS ( \
                    SELECT 1 FROM saga_instances i LEFT JOIN saga_outbox newest ON newest.id = i.last_outbox_id \
                    WHERE i.id = $1 AND (newest.id IS NULL OR newest.sent_at IS NOT NULL))) \
               AND ($2::bigint IS NULL OR created_at <= $2) \
             ORDER BY id LIMIT $3",
        )
        .bind(filter.saga.map(|s| *s.as_uuid()))
        .bind(filter.created_before.map(|t| t.as_millis()))
        .bind(db_limit(filter.effective_limit()))
        .fetch_all(self.shared.connections.pool())
        .await
        .map_err(store_error)?;
        rows.iter().map(row::unsent_message).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::RetentionConfig;

    /// Log lines written while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let lines = Arc::clone(&lines);
            move || SharedBuffer(Arc::clone(&lines))
        };
        let subscriber = tracing_subscriber::fmt().with_writer(writer).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = lines.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Ok(mut lines) = self.0.lock() {
                lines.extend_from_slice(buf);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn store_keeping_inbox_ids(inbox: Duration) -> String {
        logged(|| {
            // A lazy pool: nothing connects, the store is only built.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://127.0.0.1:1/never")
                .expect("a well-formed URL");
            let config = PostgresStoreConfig {
                retention: RetentionConfig {
                    inbox,
                    ..RetentionConfig::default()
                },
                ..PostgresStoreConfig::default()
            };
            drop(PostgresStore::with_config(pool, config));
        })
    }

    #[tokio::test]
    async fn a_forgetful_inbox_is_warned_about() {
        let short = store_keeping_inbox_ids(Duration::from_secs(60));
        assert!(short.contains("WARN"), "{short}");
        assert!(short.contains("would be applied again"), "{short}");
        let default = store_keeping_inbox_ids(RetentionConfig::default().inbox);
        assert!(!default.contains("inbox retention"), "{default}");
    }
}
