//! Throughput on the local PostgreSQL, all measured in one run:
//! 1. raw single-row INSERT commits/s through sqlx (the physical limit),
//! 2. saga transitions/s through `PostgresStore` (inbox + state + history +
//!    outbox in one transaction, as `Engine` commits them), and through a
//!    full `Engine::handle` (load + decide + commit),
//! 3. relay publishing rows/s to an in-process transport.
//!
//! `cargo bench -p saga-postgres --bench throughput` (release). Environment:
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `BENCH_WRITERS` (16), `BENCH_SECS` (5), `BENCH_ROUNDS` (3: raw and store
//! are measured alternately, and the median round's ratio is reported, so a
//! change in the machine's load affects both sides), `BENCH_RELAY_ROWS`
//! (50000), `BENCH_PING` (1; 0 disables sqlx's ping on pool acquire for both
//! sides).
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use saga_core::memory::InMemoryTransport;
use saga_core::{
    Cause, Command, Engine, Message, MessageId, OutboxStore, Position, Relay, RelayConfig, ReplyOutcome,
    SagaDefinition, SagaId, SagaInstance, SagaStatus, SagaStore, Step, StepError, Timestamp, Transition,
};
use saga_postgres::PostgresStore;
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
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let counted = done.load(Ordering::Relaxed) - start_count;
    let wal_after = wal(pool).await;
    let per_op = |i: usize| (wal_after[i] - wal_before[i]) / counted.max(1) as f64;
    println!(
        "  WAL per operation: {:.1} records, {:.2} full-page images, {:.0} bytes; {:.1} operations per WAL sync",
        per_op(0),
        per_op(1),
        per_op(2),
        1.0 / per_op(3)
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

/// One transition the way `Engine` commits it: inbox, state, history, outbox.
async fn store_writer(store: PostgresStore, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut current = instance(SagaId::new());
    let mut tx = store.begin().await.unwrap();
    tx.insert(&current).await.unwrap();
    tx.commit().await.unwrap();
    while !stop.load(Ordering::Relaxed) {
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
        current = next;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
struct Tally {
    count: u64,
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

async fn raw_writer(pool: PgPool, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        sqlx::query("INSERT INTO bench_raw (payload) VALUES ($1)")
            .bind("0192a3b4-c5d6-7e8f-9012-3456789abcde")
            .execute(&pool)
            .await
            .unwrap();
        done.fetch_add(1, Ordering::Relaxed);
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

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list
    }
    let writers: usize = env("BENCH_WRITERS", 16);
    let secs: u64 = env("BENCH_SECS", 5);
    let relay_rows: usize = env("BENCH_RELAY_ROWS", 50_000);
    let rounds: usize = env("BENCH_ROUNDS", 3).max(1);
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
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
    let store = PostgresStore::new(pool.clone());

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
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, raw, transitions) = ratios[ratios.len() / 2];
    println!(
        "median round: raw {raw:.0}/s, store {transitions:.0}/s, ratio {:.0} %",
        100.0 * ratio
    );
    let engine = Engine::builder(Arc::new(store.clone()))
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
        .unwrap();
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
