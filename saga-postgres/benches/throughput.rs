//! Throughput on the local PostgreSQL, all measured in one run:
//! 1. raw single-row INSERT commits/s through sqlx (the physical limit),
//! 2. saga transitions/s through `PostgresStore` (inbox + state + history +
//!    outbox in one transaction, as `Engine` commits them), and through a
//!    full `Engine::handle` (load + decide + commit),
//! 3. relay publishing rows/s to an in-process transport.
//!
//! `cargo bench -p saga-postgres --bench throughput` (release). Environment:
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `BENCH_WRITERS` (16), `BENCH_SECS` (5), `BENCH_ROUNDS` (3: raw and store
//! are measured alternately, and the median round's ratio is reported, so a
//! change in the machine's load affects both sides), `BENCH_RELAY_ROWS`
//! (50000), `BENCH_PING` (1; 0 disables sqlx's ping on pool acquire for both
//! sides), `BENCH_COMMIT_BATCH` and `BENCH_COMMITS_IN_FLIGHT` (the store's
//! `commit_batch` and `commits_in_flight`; `BENCH_COMMIT_BATCH=1` turns
//! batching off).
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use saga_core::memory::InMemoryTransport;
use saga_core::{
    Cause, Command, Engine, Message, MessageId, OutboxStore, Position, Relay, RelayConfig, ReplyOutcome,
    SagaDefinition, SagaId, SagaInstance, SagaStatus, SagaStore, Step, StepError, Timestamp, Transition,
};
use saga_postgres::{PostgresStore, PostgresStoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Cluster-wide WAL counters (`pg_stat_wal`): records, full-page images, bytes, syncs.
async fn wal(pool: &PgPool) -> [f64; 4] {
    let (records, fpi, bytes, syncs): (i64, i64, f64, i64) =
        sqlx::query_as("SELECT wal_records, wal_fpi, wal_bytes::float8, wal_sync FROM pg_stat_wal")
            .fetch_one(pool)
            .await
            .unwrap();
    [records as f64, fpi as f64, bytes, syncs as f64]
}

/// Runs `writers` copies of `body` for `secs`, prints the WAL written per
/// operation in the counted window, and returns operations per second.
async fn measure<F, Fut>(pool: &PgPool, writers: usize, secs: u64, body: F) -> f64
where
    F: Fn(usize, Arc<AtomicBool>, Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..writers)
        .map(|w| tokio::spawn(body(w, Arc::clone(&stop), Arc::clone(&done))))
        .collect();
    // Warm up (connections, prepared statements), then count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let wal_before = wal(pool).await;
    let backends_before = backends_cpu_ns(pool).await;
    let client_before = client_cpu_ns();
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let counted = done.load(Ordering::Relaxed) - start_count;
    let client_after = client_cpu_ns();
    let backends_after = backends_cpu_ns(pool).await;
    let wal_after = wal(pool).await;
    let per_op = |i: usize| (wal_after[i] - wal_before[i]) / counted.max(1) as f64;
    let cpu_us = |before: u64, after: u64| after.saturating_sub(before) as f64 / counted.max(1) as f64 / 1000.0;
    println!(
        "  per operation: WAL {:.1} records, {:.2} full-page images, {:.0} bytes, {:.1} operations per WAL sync; \
         CPU {:.0} µs in this database's backends, {:.0} µs in this process",
        per_op(0),
        per_op(1),
        per_op(2),
        1.0 / per_op(3),
        cpu_us(backends_before, backends_after),
        cpu_us(client_before, client_after),
    );
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    counted as f64 / elapsed
}

fn instance(id: SagaId) -> SagaInstance {
    let now = Timestamp::now();
    SagaInstance {
        id,
        definition: "bench".into(),
        definition_version: 1,
        key: Some(id.to_string()),
        status: SagaStatus::Running,
        step: 1,
        attempt: 0,
        awaiting: Some(MessageId::new()),
        deadline: Some(now + Duration::from_secs(30)),
        failure: None,
        data: r#"{"order_id":"0192a3b4-c5d6-7e8f-9012-3456789abcde","items":[{"sku":"apple","qty":2},{"sku":"pear","qty":1}],"total_cents":1234}"#.into(),
        data_version: 1,
        revision: 1,
        created_at: now,
        updated_at: now,
    }
}

/// One transition the way `Engine` commits it: inbox, state, history,
/// outbox. Returns the instance as committed.
async fn store_transition(store: &PostgresStore, current: &SagaInstance) -> SagaInstance {
    let message = MessageId::new();
    let mut next = current.clone();
    next.revision += 1;
    next.step = (next.step + 1) % 5;
    next.updated_at = Timestamp::now();
    let emitted = Message::new("Reserve", "inventory", br#"{"items":["apple","pear"]}"#.to_vec())
        .with_id(MessageId::derived(next.id, next.revision, 0))
        .with_correlation_id(next.id.to_string());
    let transition = Transition {
        saga_id: next.id,
        revision: next.revision,
        at: next.updated_at,
        cause: Cause::Message {
            id: message.clone(),
            kind: "Reply".into(),
        },
        before: Some(Position {
            status: current.status,
            step: current.step,
        }),
        after: Position {
            status: next.status,
            step: next.step,
        },
        emitted: vec![(emitted.id.clone(), emitted.kind.clone())],
        note: None,
    };
    let mut tx = store.begin().await.unwrap();
    tx.consume_at_commit("saga-engine", &message).await.unwrap();
    tx.update(&next, current.revision).await.unwrap();
    tx.record(&transition).await.unwrap();
    tx.enqueue(Some(next.id), &[emitted]).await.unwrap();
    tx.commit().await.unwrap();
    next
}

async fn insert_instance(store: &PostgresStore) -> SagaInstance {
    let current = instance(SagaId::new());
    let mut tx = store.begin().await.unwrap();
    tx.insert(&current).await.unwrap();
    tx.commit().await.unwrap();
    current
}

async fn store_writer(store: PostgresStore, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut current = insert_instance(&store).await;
    while !stop.load(Ordering::Relaxed) {
        current = store_transition(&store, &current).await;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct Tally {
    count: u64,
}

fn tally_engine(store: &PostgresStore) -> Engine {
    Engine::builder(Arc::new(store.clone()))
        .register(
            SagaDefinition::<Tally>::builder("tally")
                .step(
                    Step::remote("collect", |_: &Tally| {
                        Command::json("Collect", "collector", &()).map_err(StepError::from)
                    })
                    .on_reply("Tick", |t: &mut Tally, _: u64| {
                        t.count += 1;
                        ReplyOutcome::Pending
                    }),
                )
                .build()
                .unwrap(),
        )
        .build()
        .unwrap()
}

async fn engine_writer(engine: Engine, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let saga = engine.start("tally", Tally::default()).await.unwrap();
    while !stop.load(Ordering::Relaxed) {
        let reply = Message::json("Tick", "engine", &1)
            .unwrap()
            .with_correlation_id(saga.to_string());
        engine.handle(&reply).await.unwrap();
        done.fetch_add(1, Ordering::Relaxed);
    }
}

async fn raw_insert(pool: &PgPool) {
    sqlx::query("INSERT INTO bench_raw (payload) VALUES ($1)")
        .bind("0192a3b4-c5d6-7e8f-9012-3456789abcde")
        .execute(pool)
        .await
        .unwrap();
}

async fn raw_writer(pool: PgPool, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        raw_insert(&pool).await;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one operation costs, measured one at a time on one connection.
struct Cost {
    /// CPU time of the PostgreSQL backend (from its `/proc/<pid>/schedstat`).
    server_us: f64,
    /// CPU time of this process, all threads.
    client_us: f64,
    /// WAL records and bytes written for this database (plus its commits).
    wal: Option<(f64, f64)>,
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server CPU {:>6.1} µs, client CPU {:>6.1} µs",
            self.server_us, self.client_us
        )?;
        match self.wal {
            Some((records, bytes)) => write!(f, ", WAL {records:.2} records / {bytes:.0} bytes"),
            None => write!(f, ", WAL n/a (pg_walinspect missing)"),
        }
    }
}

/// CPU nanoseconds this process has run, over all its threads.
fn client_cpu_ns() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            total += stat
                .split_whitespace()
                .next()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// CPU nanoseconds run so far by the backends connected to this database
/// (a backend that disconnects in between takes its share with it; the
/// measured pools keep theirs).
async fn backends_cpu_ns(pool: &PgPool) -> u64 {
    let ns: Option<i64> = sqlx::query_scalar(
        "SELECT sum(split_part(pg_read_file('/proc/' || pid || '/schedstat'), ' ', 1)::bigint)::bigint \
         FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(None);
    ns.unwrap_or(0) as u64
}

/// CPU nanoseconds the backend of the probe pool's one connection has run.
async fn server_cpu_ns(probe: &PgPool) -> u64 {
    let ns: i64 = sqlx::query_scalar(
        "SELECT split_part(pg_read_file('/proc/' || pg_backend_pid() || '/schedstat'), ' ', 1)::bigint",
    )
    .fetch_one(probe)
    .await
    .unwrap();
    ns as u64
}

/// Runs `op` `ops` times one after the other on `probe` (a pool of one
/// connection, so the same backend serves every statement) and returns its
/// CPU and WAL cost per operation. Deterministic enough to compare designs
/// on a busy machine, where throughput is not.
async fn probe<F, Fut>(probe: &PgPool, ops: usize, mut op: F) -> Cost
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..ops / 10 {
        op().await; // warm up: prepared statements, caches
    }
    let database: String = sqlx::query_scalar(
        "SELECT '%rel ' || (SELECT oid FROM pg_tablespace WHERE spcname = 'pg_default') || '/' || \
         (SELECT oid FROM pg_database WHERE datname = current_database()) || '/%'",
    )
    .fetch_one(probe)
    .await
    .unwrap();
    let lsn_before: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(probe)
        .await
        .unwrap();
    let server_before = server_cpu_ns(probe).await;
    let client_before = client_cpu_ns();
    for _ in 0..ops {
        op().await;
    }
    let client_after = client_cpu_ns();
    let server_after = server_cpu_ns(probe).await;
    let lsn_after: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(probe)
        .await
        .unwrap();
    // The probe session commits asynchronously: wait for the walwriter, as
    // only flushed WAL can be read back.
    let flushed_by = Instant::now() + Duration::from_secs(10);
    while Instant::now() < flushed_by {
        let flushed: bool = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
            .bind(&lsn_after)
            .fetch_one(probe)
            .await
            .unwrap();
        if flushed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // This database's records, and the commit records of the transactions that wrote them.
    let wal: Option<(i64, f64)> = sqlx::query_as(
        "WITH r AS (SELECT * FROM pg_get_wal_records_info($1::pg_lsn, $2::pg_lsn)), \
              ours AS (SELECT DISTINCT xid::text AS xid FROM r WHERE block_ref LIKE $3 AND xid::text <> '0') \
         SELECT count(*), coalesce(sum(record_length), 0)::float8 FROM r \
         WHERE block_ref LIKE $3 OR (resource_manager = 'Transaction' AND xid::text IN (SELECT xid FROM ours))",
    )
    .bind(&lsn_before)
    .bind(&lsn_after)
    .bind(&database)
    .fetch_optional(probe)
    .await
    .unwrap_or_else(|e| {
        println!("  (no WAL figures: {e})");
        None
    });
    let n = ops as f64;
    Cost {
        server_us: (server_after - server_before) as f64 / n / 1000.0,
        client_us: (client_after - client_before) as f64 / n / 1000.0,
        wal: wal.map(|(records, bytes)| (records as f64 / n, bytes / n)),
    }
}

async fn relay_bench(store: PostgresStore, rows: usize) -> f64 {
    // Fill the outbox: 1000 sagas, messages interleaved as concurrent sagas would write them.
    let sagas: Vec<SagaId> = (0..1000).map(|_| SagaId::new()).collect();
    let mut written = 0;
    while written < rows {
        let mut tx = store.begin().await.unwrap();
        for saga in &sagas {
            if written >= rows {
                break;
            }
            let message = Message::new("Reserve", "inventory", br#"{"items":["apple","pear"]}"#.to_vec())
                .with_correlation_id(saga.to_string());
            tx.enqueue(Some(*saga), &[message]).await.unwrap();
            written += 1;
        }
        tx.commit().await.unwrap();
    }
    // Earlier measurements left their outbox rows too: relay everything.
    let rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL")
        .fetch_one(store.pool())
        .await
        .unwrap() as usize;
    let transport = InMemoryTransport::new();
    transport.bind("inventory", "inventory").bind("collector", "inventory");
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(transport.clone()),
        RelayConfig::default(),
    );
    let started = Instant::now();
    let mut sent = 0;
    while sent < rows {
        let round = relay.run_once().await.unwrap();
        if round.sent == 0 {
            break;
        }
        sent += round.sent;
        transport.take("inventory");
    }
    assert_eq!(sent, rows, "every row is published");
    let unsent = store.claim(1, Duration::from_secs(1)).await.unwrap();
    assert!(unsent.is_empty());
    sent as f64 / started.elapsed().as_secs_f64()
}

/// Prints what one raw insert, one store transition and one
/// `Engine::handle` cost, one at a time on one connection: CPU of the
/// backend and of this process, and WAL. The probe session runs with
/// `synchronous_commit = off` so that the time the backend spends flushing
/// WAL itself (which 16 concurrent writers share through group commit) does
/// not blur the comparison; the throughput figures below keep it on.
async fn cost_probe(admin_options: &PgConnectOptions, database: &str, ops: usize) {
    let probe_pool = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(env("BENCH_PING", 1) != 0)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET synchronous_commit = off").execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(admin_options.clone().database(database))
        .await
        .unwrap();
    let walinspect = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .execute(&probe_pool)
        .await
        .is_ok();
    if !walinspect {
        println!("(pg_walinspect unavailable: no WAL figures in the probe)");
    }
    let store = PostgresStore::new(probe_pool.clone());
    println!("cost per operation, one at a time on one connection ({ops} operations):");
    let raw = probe(&probe_pool, ops, || raw_insert(&probe_pool)).await;
    println!("  raw single-row INSERT: {raw}");
    let current = Arc::new(std::sync::Mutex::new(insert_instance(&store).await));
    let transition = probe(&probe_pool, ops, || {
        let store = store.clone();
        let current = Arc::clone(&current);
        async move {
            let previous = current.lock().unwrap().clone();
            let next = store_transition(&store, &previous).await;
            *current.lock().unwrap() = next;
        }
    })
    .await;
    println!("  store transition:      {transition}");
    let engine = tally_engine(&store);
    let saga = engine.start("tally", Tally::default()).await.unwrap();
    let handled = probe(&probe_pool, ops, || {
        let engine = engine.clone();
        async move {
            let reply = Message::json("Tick", "engine", &1)
                .unwrap()
                .with_correlation_id(saga.to_string());
            engine.handle(&reply).await.unwrap();
        }
    })
    .await;
    println!("  Engine::handle:        {handled}");
    // sqlx prepares every statement; one PostgreSQL keeps re-planning
    // (custom plans) costs a planner run per execution.
    let replanned: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT left(regexp_replace(statement, '\\s+', ' ', 'g'), 70), generic_plans, custom_plans \
         FROM pg_prepared_statements ORDER BY custom_plans DESC",
    )
    .fetch_all(&probe_pool)
    .await
    .unwrap_or_default();
    for (statement, generic, custom) in replanned {
        println!("  planned at every execution: {custom} custom plans, {generic} generic: {statement}");
    }
    println!(
        "  CPU (server + client) of a transition: {:.0} % of the raw insert's; server only: {:.0} %",
        100.0 * (transition.server_us + transition.client_us) / (raw.server_us + raw.client_us),
        100.0 * transition.server_us / raw.server_us
    );
    probe_pool.close().await;
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list
    }
    let writers: usize = env("BENCH_WRITERS", 16);
    let secs: u64 = env("BENCH_SECS", 5);
    let relay_rows: usize = env("BENCH_RELAY_ROWS", 50_000);
    let rounds: usize = env("BENCH_ROUNDS", 3).max(1);
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin_options: PgConnectOptions = url.parse().unwrap();
    let mut admin = PgConnection::connect_with(&admin_options).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach PostgreSQL at {url} ({e}); start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    });
    let name = format!("saga_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    // BENCH_PING=0 turns off sqlx's liveness ping on every pool acquire
    // (`test_before_acquire`), for both sides alike.
    let pool = PgPoolOptions::new()
        .max_connections(writers as u32 + 4)
        .test_before_acquire(env("BENCH_PING", 1) != 0)
        .connect_with(admin_options.clone().database(&name))
        .await
        .unwrap();
    saga_postgres::migrate(&pool).await.unwrap();
    sqlx::query("CREATE TABLE bench_raw (id bigserial PRIMARY KEY, payload text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    // BENCH_COMMIT_BATCH=1 sends every transition on its own statement.
    let defaults = PostgresStoreConfig::default();
    let store = PostgresStore::with_config(
        pool.clone(),
        PostgresStoreConfig {
            commit_batch: env("BENCH_COMMIT_BATCH", defaults.commit_batch),
            commits_in_flight: env("BENCH_COMMITS_IN_FLIGHT", defaults.commits_in_flight),
            ..defaults
        },
    );

    let probe_ops: usize = env("BENCH_PROBE_OPS", 2000);
    if probe_ops > 0 {
        cost_probe(&admin_options, &name, probe_ops).await;
    }

    println!("writers: {writers}, {secs} s per measurement, {rounds} rounds of raw then store");
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let raw = {
            let writer_pool = pool.clone();
            measure(&pool, writers, secs, move |_, stop, done| {
                raw_writer(writer_pool.clone(), stop, done)
            })
            .await
        };
        println!("round {round}: raw single-row INSERT commits/s: {raw:>9.0}");
        let transitions = {
            let store = store.clone();
            measure(&pool, writers, secs, move |_, stop, done| {
                store_writer(store.clone(), stop, done)
            })
            .await
        };
        println!(
            "round {round}: store transitions/s (inbox+state+history+outbox): {transitions:>9.0}  ({:.0} % of raw)",
            100.0 * transitions / raw
        );
        ratios.push((transitions / raw, raw, transitions));
    }
    let batching = store.commit_batching();
    println!(
        "commit batching: {} shared statements carried {} transitions ({:.1} each), {} retried alone",
        batching.shared_statements,
        batching.batched_transitions,
        batching.batched_transitions as f64 / batching.shared_statements.max(1) as f64,
        batching.retried_alone
    );
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, raw, transitions) = ratios[ratios.len() / 2];
    println!(
        "median round: raw {raw:.0}/s, store {transitions:.0}/s, ratio {:.0} %",
        100.0 * ratio
    );
    // Every pooled connection's prepared statements: one that PostgreSQL
    // keeps planning anew (custom plans) costs a planner run per execution.
    let mut held = Vec::new();
    let mut planned: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    while let Some(mut conn) = pool.try_acquire() {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT left(regexp_replace(statement, '\\s+', ' ', 'g'), 70), generic_plans, custom_plans \
             FROM pg_prepared_statements",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap_or_default();
        for (statement, generic, custom) in rows {
            let entry = planned.entry(statement).or_default();
            entry.0 += generic;
            entry.1 += custom;
        }
        held.push(conn);
    }
    drop(held);
    for (statement, (generic, custom)) in planned {
        if custom > 100 {
            println!("planned for each execution ({custom} custom plans, {generic} generic): {statement}");
        }
    }
    let (updates, hot): (i64, i64) =
        sqlx::query_as("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'saga_instances'")
            .fetch_one(&pool)
            .await
            .unwrap_or((0, 0));
    println!(
        "saga_instances updates so far: {updates}, of which HOT: {:.0} % (statistics lag by up to a second)",
        100.0 * hot as f64 / updates.max(1) as f64
    );
    let engine = tally_engine(&store);
    let handled = measure(&pool, writers, secs, move |_, stop, done| {
        engine_writer(engine.clone(), stop, done)
    })
    .await;
    println!(
        "Engine::handle transitions/s (load+decide+commit, no outbox): {handled:>9.0}  ({:.0} % of raw)",
        100.0 * handled / raw
    );
    let relayed = relay_bench(store, relay_rows).await;
    println!("relay rows/s (outbox drained, batch 256): {relayed:>9.0}");

    pool.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await;
}
