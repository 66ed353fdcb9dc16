//! Group commit: concurrent transitions of the engine's common shape share
//! one statement.
//!
//! Under load, what a transition costs PostgreSQL is mostly per statement
//! (starting the plan's execution, opening each table and index, the round
//! trip, the commit's WAL flush), not per row. So while earlier commits are
//! under way, transitions that arrive wait in a queue, and the next statement
//! takes all of them. Each transition's rows are written, or none, exactly as
//! its own statement would write them, and each caller returns only after
//! the statement carrying its transition has committed: durability is the
//! same, only the statement is shared.
//!
//! Only the engine's common transition is batched: one instance written
//! (inserted, or updated at an expected revision), one history row of it,
//! which may record the consumed message, at most one outbox message of
//! that saga, and any staged application writes. A transition the shared
//! statement did not write (a stale revision, a message consumed before, an
//! instance that exists) runs again on its own statement, which reports why
//! exactly as without batching; so does every transition of a batch whose
//! statement failed (a unique violation by a concurrent consumer aborts the
//! whole statement). Each caller runs its own again, so those statements
//! neither wait for one another nor hold up the next shared one. If the
//! pool gives no connection within its acquire timeout, though, or the
//! server fails the statement for its own state (a read-only primary, a
//! lost connection), every transition of the batch fails at once as
//! `Unavailable`, as each would on its own. A lock or statement timeout may
//! be one member's (its row held outside): those run alone too.
//!
//! Staged writes are not conditional on their transition being written, so
//! a statement carrying any raises (`saga_abort`) unless it wrote every
//! transition: then nothing of it is written, and each runs alone.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use saga_core::{Arrivals, Linger, OutboxEntry, StoreError};
use tokio::sync::oneshot;

use super::{InstanceValues, InstanceWrite, PgBatched, Rest, write_alone};
use crate::staged::StagedWrite;
use crate::statement::{INSTANCE_COLUMNS, Rows, awaited_predecessor, not_recorded, predecessor_sent};
use crate::store::Shared;

/// A transition waiting for a statement.
pub(crate) struct Batched {
    write: InstanceWrite,
    /// Settled: a consumed message is on the history row.
    rest: Rest,
}

impl Batched {
    /// The transition as a batch member: its shape must be the one batched
    /// (see [`fits`]).
    pub(crate) fn new(write: InstanceWrite, rest: Rest) -> Self {
        Self { write, rest }
    }

    /// Whether its message (if any) was kept for the hand-off.
    fn keeps_message(&self) -> bool {
        self.rest.o_id.len() == 1 && self.rest.messages.len() == 1
    }

    /// Whether it carries application writes that do not merge with other
    /// members' (see [`StagedWrite::rows`]): each adds to the statement's text.
    fn stages_apart(&self) -> bool {
        self.rest.staged.iter().any(|write| write.merges_as().is_none())
    }

    /// The application rows its staged writes change (see [`Changes`]).
    fn changes(&self) -> Changes<'_> {
        let mut rows = Vec::new();
        for write in self.rest.staged.iter().filter(|write| write.changes_rows()) {
            if write.touches().is_empty() {
                return Changes::Undeclared;
            }
            rows.extend(write.touches().iter().map(String::as_str));
        }
        Changes::Rows(rows)
    }

    /// Orders members by the SQL of their staged writes, so that members
    /// alike stand together and a mix of kinds has one statement text.
    fn by_staged_sql(&self, other: &Self) -> std::cmp::Ordering {
        self.rest
            .staged
            .iter()
            .map(StagedWrite::sql)
            .cmp(other.rest.staged.iter().map(StagedWrite::sql))
    }
}

/// The existing application rows a member's staged writes change. Of two
/// changes to one row in a statement PostgreSQL applies one and says
/// nothing, so members that may change the same row never share one.
enum Changes<'a> {
    /// These rows (none: it only inserts, or stages nothing).
    Rows(Vec<&'a str>),
    /// Some rows, not declared (`StagedWrite::touching`): it may share a
    /// statement only with members that change none.
    Undeclared,
}

/// The rows the members of a statement change, as members join it.
#[derive(Default)]
struct Changed<'a> {
    rows: std::collections::HashSet<&'a str>,
    undeclared: bool,
}

impl<'a> Changed<'a> {
    /// Adds a member's changes, unless they may meet another member's.
    fn admit(&mut self, changes: Changes<'a>) -> bool {
        match changes {
            Changes::Undeclared if self.rows.is_empty() && !self.undeclared => {
                self.undeclared = true;
                true
            }
            Changes::Rows(rows) if rows.is_empty() => true,
            Changes::Rows(rows) if !self.undeclared && rows.iter().all(|row| !self.rows.contains(row)) => {
                self.rows.extend(rows);
                true
            }
            _ => false,
        }
    }
}

/// Transitions with staged writes that do not merge in one statement, at
/// most: each adds its writes to the statement's text, so this bounds the
/// texts prepared.
const STAGED_PER_STATEMENT: usize = 8;

/// The staged writes of a shared statement, one CTE each: the members'
/// row-wise writes merged into one per SQL, in the order of their SQL
/// (`merged`), then every other write as it is, member by member (`apart`).
struct StagedWrites<'a> {
    merged: Vec<StagedWrite>,
    apart: Vec<&'a StagedWrite>,
    /// Members' writes that travel merged with others (groups of two or more).
    merged_members: usize,
}

impl<'a> StagedWrites<'a> {
    fn of(items: &'a [Batched]) -> Self {
        let mut by_sql: BTreeMap<&str, Vec<&StagedWrite>> = BTreeMap::new();
        let mut others = Vec::new();
        for write in items.iter().flat_map(|item| &item.rest.staged) {
            match write.merges_as() {
                Some(sql) => by_sql.entry(sql).or_default().push(write),
                None => others.push(write),
            }
        }
        let mut writes = Self {
            merged: Vec::new(),
            apart: Vec::new(),
            merged_members: 0,
        };
        for group in by_sql.into_values() {
            match StagedWrite::merged(&group) {
                Some(write) => {
                    if group.len() > 1 {
                        writes.merged_members += group.len();
                    }
                    writes.merged.push(write);
                }
                // Columns of different types under one SQL: each as it is.
                None => writes.apart.extend(group),
            }
        }
        writes.apart.extend(others);
        writes
    }

    fn is_empty(&self) -> bool {
        self.merged.is_empty() && self.apart.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &StagedWrite> {
        self.merged.iter().chain(self.apart.iter().copied())
    }
}

/// Whether a transition has the shape batched: one instance written, one
/// history row of it, at most one outbox message of it, no inbox row
/// (`rest` settled).
pub(crate) fn fits(write: &InstanceWrite, rest: &Rest) -> bool {
    let id = write.values().id;
    rest.i_message.is_empty()
        && rest.h_saga.len() == 1
        && rest.h_saga[0] == id
        && rest.o_id.len() <= 1
        && rest.o_saga.iter().all(|saga| *saga == Some(id))
}

/// Whether a shared statement's `error` would fail each of its transitions
/// alone too: transient, and not one that a single member may have caused
/// (SQLSTATEs in [`ONE_MEMBERS_DOING`]).
fn fails_alike(error: &sqlx::Error) -> bool {
    let one_members = match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| ONE_MEMBERS_DOING.contains(&code.as_ref())),
        _ => false,
    };
    crate::error::is_transient(error) && !one_members
}

/// Failures of a shared statement that may be one member's alone, so its
/// members run alone: a serialization failure or deadlock (the mix of
/// transitions), and a lock or statement timeout (one member's row held by
/// a transaction outside, an operator's open session say: the others would
/// commit on their own).
const ONE_MEMBERS_DOING: &[&str] = &["40001", "40P01", "55P03", "57014"];

/// What the runner answers a waiting transition.
enum Answer {
    /// Written, or failed, by the runner's statement: the outbox rows
    /// leased for the hand-off.
    Done(Result<Vec<OutboxEntry>, StoreError>),
    /// The shared statement did not write it: the caller writes it alone,
    /// which reports why (callers do so at once, without holding the runner).
    Alone(Box<Batched>),
}

type Reply = oneshot::Sender<Answer>;

/// Transitions waiting, and how many statements are carrying others.
pub(crate) struct Batcher {
    state: Mutex<Queue>,
    /// Ends a lingering runner's wait when a transition arrives.
    arrivals: Arrivals,
    shared_statements: AtomicU64,
    batched_transitions: AtomicU64,
    retried_alone: AtomicU64,
    merged_writes: AtomicU64,
}

/// How a store's commits were batched since it was created (see
/// `PostgresStoreConfig::commit_batch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitBatching {
    /// Statements that committed two or more transitions.
    pub shared_statements: u64,
    /// Transitions those statements committed.
    pub batched_transitions: u64,
    /// Transitions a shared statement did not write (a conflict, a
    /// duplicate, a failed statement) that then ran on their own.
    pub retried_alone: u64,
    /// Staged row-wise writes that shared statements wrote merged with
    /// others of their SQL (see `StagedWrite::rows`).
    pub merged_writes: u64,
}

struct Queue {
    waiting: VecDeque<(Batched, Reply)>,
    /// Tasks sending statements; at most `commits_in_flight`.
    runners: usize,
    linger: Linger,
}

impl Queue {
    /// Moves waiting transitions into `batch` while it has room for `most`,
    /// at most [`STAGED_PER_STATEMENT`] of them stage writes apart, and no
    /// two may change the same application row (see [`Changes`]). In
    /// order: the first that does not fit waits for the next statement.
    fn take(&mut self, batch: &mut Vec<(Batched, Reply)>, most: usize) {
        let mut staged = batch.iter().filter(|(item, _)| item.stages_apart()).count();
        let mut changed = Changed::default();
        for (item, _) in batch.iter() {
            changed.admit(item.changes());
        }
        let mut taken = 0;
        while batch.len() + taken < most
            && let Some((item, _)) = self.waiting.get(taken)
        {
            if item.stages_apart() {
                if staged == STAGED_PER_STATEMENT {
                    break;
                }
                staged += 1;
            }
            if !changed.admit(item.changes()) {
                break;
            }
            taken += 1;
        }
        batch.extend(self.waiting.drain(..taken));
    }
}

impl Batcher {
    /// Lone transitions wait up to `linger` for company (see [`Linger`]).
    pub(crate) fn new(linger: Duration) -> Self {
        Self {
            state: Mutex::new(Queue {
                waiting: VecDeque::new(),
                runners: 0,
                linger: Linger::new(linger),
            }),
            arrivals: Arrivals::default(),
            shared_statements: AtomicU64::default(),
            batched_transitions: AtomicU64::default(),
            retried_alone: AtomicU64::default(),
            merged_writes: AtomicU64::default(),
        }
    }

    pub(crate) fn stats(&self) -> CommitBatching {
        CommitBatching {
            shared_statements: self.shared_statements.load(Ordering::Relaxed),
            batched_transitions: self.batched_transitions.load(Ordering::Relaxed),
            retried_alone: self.retried_alone.load(Ordering::Relaxed),
            merged_writes: self.merged_writes.load(Ordering::Relaxed),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Commits `item` in the next statement with room, returning the outbox
/// rows leased to this process's relay (as [`write_all`](super::write_all) does).
pub(crate) async fn commit(shared: &Arc<Shared>, item: Batched) -> Result<Vec<OutboxEntry>, StoreError> {
    let (reply, answer) = oneshot::channel();
    let start_runner = {
        let mut queue = shared.batcher.queue();
        queue.linger.arrived(tokio::time::Instant::now());
        queue.waiting.push_back((item, reply));
        let start = queue.runners < shared.config.commits_in_flight.max(1);
        if start {
            queue.runners += 1;
        }
        start
    };
    shared.batcher.arrivals.arrived();
    if start_runner {
        // A task of its own: a caller that gives up waiting does not strand
        // the others whose transitions its statement carries.
        tokio::spawn(run(Arc::clone(shared)));
    }
    match answer.await {
        Ok(Answer::Done(result)) => result,
        Ok(Answer::Alone(item)) => {
            shared.batcher.retried_alone.fetch_add(1, Ordering::Relaxed);
            alone(shared, *item).await
        }
        Err(_) => Err(StoreError::Backend("the commit task ended without an answer".into())),
    }
}

/// Sends statements while transitions wait.
async fn run(shared: Arc<Shared>) {
    let most = shared.config.commit_batch.max(1);
    loop {
        let (mut batch, linger): (Vec<(Batched, Reply)>, _) = {
            let mut queue = shared.batcher.queue();
            if queue.waiting.is_empty() {
                queue.runners -= 1;
                return;
            }
            let mut batch = Vec::new();
            queue.take(&mut batch, most);
            let linger = queue.linger.wait(batch.len(), most);
            (batch, linger)
        };
        if !linger.is_zero() {
            // The runner keeps its place meanwhile, so what arrives queues
            // for this statement.
            let batcher = &shared.batcher;
            batcher
                .arrivals
                .wait_for_company(linger, || !batcher.queue().waiting.is_empty())
                .await;
            batcher.queue().take(&mut batch, most);
            let joined = if batch.len() > 1 { "true" } else { "false" };
            metrics::counter!("saga_postgres_commit_lingers_total", "joined" => joined).increment(1);
        }
        batch.sort_by(|(a, _), (b, _)| a.by_staged_sql(b));
        if let [_] = batch.as_slice() {
            if let Some((item, reply)) = batch.into_iter().next() {
                let began = tokio::time::Instant::now();
                let done = alone(&shared, item).await;
                shared.batcher.queue().linger.ran(began.elapsed());
                let _ = reply.send(Answer::Done(done));
            }
            continue;
        }
        let (items, replies): (Vec<Batched>, Vec<Reply>) = batch.into_iter().unzip();
        let began = tokio::time::Instant::now();
        let outcomes = together(&shared, &items).await;
        shared.batcher.queue().linger.ran(began.elapsed());
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(unavailable) => {
                // No connection within the acquire timeout, or the server
                // failed the statement for its own state: each alone would
                // wait as long to hear the same.
                let reason = unavailable.to_string();
                for reply in replies {
                    let _ = reply.send(Answer::Done(Err(StoreError::Unavailable(reason.clone().into()))));
                }
                continue;
            }
        };
        let written = outcomes.iter().filter(|o| o.is_some()).count() as u64;
        let stats = &shared.batcher;
        if written > 0 {
            stats.shared_statements.fetch_add(1, Ordering::Relaxed);
            stats.batched_transitions.fetch_add(written, Ordering::Relaxed);
            metrics::histogram!("saga_postgres_commit_batch_size").record(written as f64);
        }
        for ((item, reply), outcome) in items.into_iter().zip(replies).zip(outcomes) {
            let _ = reply.send(match outcome {
                Some(handed) => Answer::Done(Ok(handed)),
                // Not written by the shared statement: its own says why.
                None => Answer::Alone(Box::new(item)),
            });
        }
    }
}

/// One transition in a statement of its own.
async fn alone(shared: &Shared, item: Batched) -> Result<Vec<OutboxEntry>, StoreError> {
    write_alone(None, shared, Some(item.write), item.rest).await
}

/// Writes `items` in one statement. For each item: the outbox rows leased
/// for the hand-off if it was written, `None` if it was not (or the
/// statement failed for a reason its own statement may not share). Fails,
/// with the error, when the pool gave no connection or the server failed
/// the statement for its own state ([`fails_alike`]).
async fn together(shared: &Shared, items: &[Batched]) -> Result<Vec<Option<Vec<OutboxEntry>>>, sqlx::Error> {
    let lease = shared.handoff_lease_millis();
    fn values(item: &Batched) -> &InstanceValues {
        item.write.values()
    }
    let instance = |f: fn(&InstanceValues) -> Option<String>| items.iter().map(|i| f(values(i))).collect::<Vec<_>>();
    let number = |f: fn(&InstanceValues) -> i64| items.iter().map(|i| f(values(i))).collect::<Vec<_>>();
    let history = |f: fn(&Rest) -> Option<String>| items.iter().map(|i| f(&i.rest)).collect::<Vec<_>>();
    let outbox = |f: fn(&Rest) -> Option<String>| items.iter().map(|i| f(&i.rest)).collect::<Vec<_>>();
    let writes = StagedWrites::of(items);
    let staged = !writes.is_empty();
    let query: PgBatched = if staged {
        sqlx::query_as(sqlx::AssertSqlSafe(staged_sql(&writes)))
    } else {
        sqlx::query_as(sql())
    };
    let query = query
        .bind(items.iter().map(|i| values(i).id).collect::<Vec<_>>())
        .bind(instance(|v| Some(v.definition.clone())))
        .bind(number(|v| v.definition_version))
        .bind(instance(|v| v.key.clone()))
        .bind(instance(|v| Some(v.status.to_owned())))
        .bind(number(|v| v.step))
        .bind(number(|v| v.attempt))
        .bind(instance(|v| v.awaiting.clone()))
        .bind(items.iter().map(|i| values(i).deadline).collect::<Vec<_>>())
        .bind(instance(|v| v.failure.clone()))
        .bind(instance(|v| Some(v.data.clone())))
        .bind(number(|v| v.data_version))
        .bind(number(|v| v.revision))
        .bind(number(|v| v.created_at))
        .bind(number(|v| v.updated_at))
        .bind(items.iter().map(|i| i.write.expected()).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.rest.h_revision[0]).collect::<Vec<_>>())
        .bind(items.iter().map(|i| i.rest.h_at[0]).collect::<Vec<_>>())
        .bind(history(|r| r.h_cause.first().cloned()))
        .bind(history(|r| r.h_before[0].clone()))
        .bind(history(|r| r.h_after.first().cloned()))
        .bind(history(|r| r.h_emitted.first().cloned()))
        .bind(history(|r| r.h_note[0].clone()))
        .bind(history(|r| r.h_consumer[0].clone()))
        .bind(history(|r| r.h_message[0].clone()))
        .bind(outbox(|r| r.o_id.first().cloned()))
        .bind(outbox(|r| r.o_kind.first().cloned()))
        .bind(outbox(|r| r.o_destination.first().cloned()))
        .bind(outbox(|r| r.o_correlation.first().cloned().flatten()))
        .bind(
            items
                .iter()
                .map(|i| i.rest.o_created.first().copied())
                .collect::<Vec<_>>(),
        )
        .bind(outbox(|r| r.o_headers.first().cloned()))
        .bind(
            items
                .iter()
                .map(|i| i.rest.o_payload.first().cloned())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|i| lease.filter(|_| i.keeps_message()))
                .collect::<Vec<_>>(),
        )
        .bind(shared.published_unmarked());
    let query = match staged {
        true => writes
            .iter()
            .fold(query, |query, write| write.bind_to_batch(query))
            .bind(i64::try_from(items.len()).unwrap_or(i64::MAX)),
        false => query,
    };
    let mut outcomes: Vec<Option<Vec<OutboxEntry>>> = (0..items.len()).map(|_| None).collect();
    let mut conn = match shared.connections.acquire().await {
        Ok(conn) => conn,
        Err(error @ sqlx::Error::PoolTimedOut) => {
            tracing::debug!(%error, size = items.len(), "a shared commit statement got no connection");
            return Err(error);
        }
        Err(error) => {
            tracing::debug!(%error, size = items.len(), "a shared commit statement got no connection; each transition runs alone");
            return Ok(outcomes);
        }
    };
    let rows = match query.fetch_all(&mut *conn).await {
        Ok(rows) => {
            shared.connections.release(conn);
            rows
        }
        // The server's state, not the mix of transitions (a read-only
        // primary, a lost connection, the server shutting down): each alone
        // would fail alike, all at once, and crowd the pool meanwhile.
        // Deadlocks, serialization failures and lock or statement timeouts
        // may be one member's doing: those run alone.
        Err(error) if fails_alike(&error) => {
            tracing::debug!(%error, size = items.len(), "a shared commit statement failed on the server's state; its transitions fail with it");
            return Err(error);
        }
        Err(error) => {
            tracing::debug!(%error, size = items.len(), "a shared commit statement failed; each transition runs alone");
            return Ok(outcomes);
        }
    };
    let merged = u64::try_from(writes.merged_members).unwrap_or(u64::MAX);
    shared.batcher.merged_writes.fetch_add(merged, Ordering::Relaxed);
    for (n, outbox_id, handed, awaits) in rows {
        if let Some(predecessor) = awaits {
            shared.await_confirm(predecessor);
        }
        // The guard's row of a statement with staged writes has no position.
        let Some(index) = n.and_then(|n| usize::try_from(n).ok()).and_then(|n| n.checked_sub(1)) else {
            continue;
        };
        let (Some(item), Some(outcome)) = (items.get(index), outcomes.get_mut(index)) else {
            continue;
        };
        let entries = match (outbox_id, handed, item.rest.messages.first()) {
            (Some(id), true, Some((saga, message))) if item.keeps_message() => vec![OutboxEntry {
                id,
                saga: *saga,
                message: message.clone(),
            }],
            _ => Vec::new(),
        };
        *outcome = Some(entries);
    }
    Ok(outcomes)
}

/// What the shared statement returns: a row per transition written (see
/// [`sql`]).
fn written() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let awaits = awaited_predecessor("f.handed OR f.oid IS NULL OR f.expected IS NULL", "f.id", PUBLISHED);
        format!("SELECT f.n, f.oid, f.handed, {awaits} FROM fresh f JOIN written w ON w.n = f.n")
    })
}

/// The parameters [`ctes`] takes.
const CTE_PARAMETERS: usize = 34;

/// The last of them: the messages published but not yet marked sent.
const PUBLISHED: &str = "$34";

/// The shared statement. Parameters are arrays, one element per transition:
/// the instance's 15 columns and its expected revision (`NULL` to insert);
/// the history row's columns but the saga; the outbox row's columns but the
/// saga (`NULL`s without a message) and its hand-off lease in milliseconds;
/// then one array, not per transition: the messages published but not yet
/// marked sent, which the hand-off check ([`predecessor_sent`]) counts as sent.
/// It returns a row per transition written: its position, its outbox row's
/// id, whether that row was leased for the hand-off, and if it was not
/// because its saga's previous message was not sent, that message's id. A
/// transition whose message was consumed before, recorded either way, is
/// left out rather
/// than left to the unique index, whose error would send every transition
/// of the statement alone. Of two starts of one saga, the first inserts and
/// the second is not written, for the same reason.
fn sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| format!("{} {}", ctes(), written()))
}

/// The shared statement for members of which some stage writes: [`sql`]
/// with the staged `writes` as further CTEs
/// (parameters after the arrays, write by write), and one more row, the
/// guard, which raises unless every member was written (its parameter: how
/// many there are).
fn staged_sql(writes: &StagedWrites<'_>) -> String {
    let mut offset = CTE_PARAMETERS;
    let mut sql = ctes().to_owned();
    for (index, write) in writes.iter().enumerate() {
        sql.push_str(", ");
        sql.push_str(&write.cte(&format!("staged_{index}"), offset));
        offset += write.parameters();
    }
    let _ = write!(
        sql,
        " {} UNION ALL SELECT CASE WHEN (SELECT count(*) FROM written) <> ${} \
         THEN saga_abort('conflict') END, NULL::int8, false, NULL::int8",
        written(),
        offset + 1
    );
    sql
}

/// The shared statement's CTEs (see [`sql`]).
fn ctes() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        // A batch member's value of an instance column, cast where needed.
        let value = |column: &str| {
            if column == "data" {
                format!("f.{column}::json")
            } else {
                format!("f.{column}")
            }
        };
        let updated = INSTANCE_COLUMNS
            .iter()
            .skip(1)
            .map(|column| format!("{column} = {}", value(column)))
            .collect::<Vec<_>>()
            .join(", ");
        let inserted = INSTANCE_COLUMNS.iter().map(|column| value(column)).collect::<Vec<_>>().join(", ");
        // An update with a message writes only if its saga's pointer is
        // still the one `fresh` read (see `statement::pointer_unmoved`): a
        // member whose saga another transaction wrote a message for
        // meanwhile is not written, and runs alone.
        format!(
            "WITH item AS (SELECT * FROM UNNEST(\
               $1::uuid[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::text[], \
               $9::int8[], $10::text[], $11::text[], $12::int8[], $13::int8[], $14::int8[], $15::int8[], $16::int8[], \
               $17::int8[], $18::int8[], $19::text[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], \
               $25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::int8[], $31::text[], $32::bytea[], \
               $33::float8[]) WITH ORDINALITY AS u({columns}, expected, \
               h_revision, h_at, h_cause, h_before, h_after, h_emitted, h_note, h_consumer, h_message, \
               o_message_id, o_kind, o_destination, o_correlation, o_created, o_headers, o_payload, o_lease, n)), \
             fresh AS MATERIALIZED (SELECT u.*, \
               CASE WHEN u.o_message_id IS NOT NULL THEN nextval('saga_outbox_id_seq') END AS oid, \
               u.o_lease IS NOT NULL AND u.o_message_id IS NOT NULL AND (u.expected IS NULL OR {handoff}) AS handed, \
               CASE WHEN u.o_message_id IS NOT NULL AND u.expected IS NOT NULL \
               THEN (SELECT i.last_outbox_id FROM saga_instances i WHERE i.id = u.id) END AS pointer \
               FROM item u WHERE u.h_message IS NULL OR ({not_in_inbox} AND {not_in_history}) \
               ORDER BY u.n), \
             upd AS (UPDATE saga_instances s SET {updated}, last_outbox_id = coalesce(f.oid, s.last_outbox_id) \
               FROM fresh f WHERE f.expected IS NOT NULL AND s.id = f.id AND s.revision = f.expected \
               AND (f.oid IS NULL OR s.last_outbox_id IS NOT DISTINCT FROM f.pointer) RETURNING f.n), \
             ins AS (INSERT INTO saga_instances ({names}, last_outbox_id) SELECT {inserted}, f.oid \
               FROM fresh f WHERE f.expected IS NULL ORDER BY f.n ON CONFLICT DO NOTHING RETURNING id), \
             written AS (SELECT n FROM upd UNION ALL \
               (SELECT DISTINCT ON (f.id) f.n FROM fresh f JOIN ins ON ins.id = f.id WHERE f.expected IS NULL \
               ORDER BY f.id, f.n)), \
             history AS (INSERT INTO saga_history \
               (saga_id, revision, at, cause, before, after, emitted, note, consumer, message_id) \
               SELECT f.id, f.h_revision, f.h_at, f.h_cause::jsonb, f.h_before::jsonb, f.h_after::jsonb, \
               f.h_emitted::jsonb, f.h_note, f.h_consumer, f.h_message FROM fresh f JOIN written w ON w.n = f.n), \
             outbox AS (INSERT INTO saga_outbox (id, saga_id, message_id, kind, destination, correlation_id, \
               created_at, headers, payload, claimed_until) \
               SELECT f.oid, f.id, f.o_message_id, f.o_kind, f.o_destination, f.o_correlation, f.o_created, \
               f.o_headers::jsonb, f.o_payload, \
               CASE WHEN f.handed THEN clock_timestamp() + f.o_lease * interval '1 millisecond' END \
               FROM fresh f JOIN written w ON w.n = f.n WHERE f.oid IS NOT NULL ORDER BY f.n)",
            columns = INSTANCE_COLUMNS.join(", "),
            names = INSTANCE_COLUMNS.join(", "),
            handoff = predecessor_sent("u.id", PUBLISHED),
            not_in_inbox = not_recorded(Rows::One, "saga_inbox", "u.h_consumer", "u.h_message"),
            not_in_history = not_recorded(Rows::One, "saga_history", "u.h_consumer", "u.h_message"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_in_order_without_gaps() {
        let sql = sql();
        if std::env::var_os("PRINT_BATCH_SQL").is_some() {
            println!("{sql}");
        }
        for n in 1..=CTE_PARAMETERS {
            assert!(sql.contains(&format!("${n}::")), "lacks ${n}: {sql}");
        }
        assert!(!sql.contains(&format!("${}", CTE_PARAMETERS + 1)), "{sql}");
    }
}
