//! PostgreSQL-specific behaviour of the store: claims across replicas,
//! notifications, failures halfway, retention, migrations, error mapping.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use saga_core::memory::InMemoryTransport;
use saga_core::testkit::store_contract::sample_instance;
use saga_core::{
    Message, MessageId, OutboxStore, QueryStore, Relay, RelayConfig, SagaId, SagaStatus, SagaStore, StoreError,
    Timestamp,
};
use saga_postgres::{PostgresStoreConfig, RetentionConfig};

fn messages(saga: Option<SagaId>, n: usize, destination: &str) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let m = Message::new(format!("M{i}"), destination, format!("{{\"i\":{i}}}").into_bytes());
            match saga {
                Some(s) => m.with_correlation_id(s.to_string()),
                None => m,
            }
        })
        .collect()
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect("count query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_held_by_one_replica_is_not_claimed_by_another() {
    let db = TestDb::new().await;
    let a = db.store(2).await;
    let b = db.store(2).await;
    let saga = SagaId::new();
    let mut tx = a.begin().await.expect("begin");
    tx.enqueue(Some(saga), &messages(Some(saga), 3, "d"))
        .await
        .expect("enqueue");
    tx.enqueue(None, &messages(None, 1, "d")).await.expect("enqueue");
    tx.commit().await.expect("commit");

    let first = a.claim(1, Duration::from_secs(60)).await.expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].saga, Some(saga));
    let second = b.claim(10, Duration::from_secs(60)).await.expect("claim");
    assert!(
        second.iter().all(|e| e.saga != Some(saga)),
        "later messages of a saga whose earlier one is claimed must wait: {second:?}"
    );
    assert_eq!(second.len(), 1, "other sagas' messages are claimed");
    a.mark_sent(&[first[0].id]).await.expect("mark_sent");
    let third = b.claim(10, Duration::from_secs(60)).await.expect("claim");
    assert_eq!(third.len(), 2, "once the earlier message is sent the rest follow");
    assert!(third.windows(2).all(|w| w[0].id < w[1].id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_hand_out_a_message_twice() {
    let db = TestDb::new().await;
    let store = db.store(8).await;
    let mut tx = store.begin().await.expect("begin");
    for _ in 0..20 {
        let saga = SagaId::new();
        tx.enqueue(Some(saga), &messages(Some(saga), 5, "d"))
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(
            async move { store.claim(7, Duration::from_secs(60)).await },
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for task in tasks {
        for entry in task.await.expect("task").expect("claim") {
            assert!(seen.insert(entry.id), "message {} claimed twice", entry.id);
        }
    }
    assert!(!seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_one_replica_wakes_a_relay_waiting_on_another() {
    let db = TestDb::new().await;
    let writer = db.store(2).await;
    let relay_side = db.store(2).await;
    // The first wait starts the listener; give it a moment to LISTEN.
    relay_side.wait_for_messages(Duration::from_millis(300)).await;
    let waiter = {
        let relay_side = relay_side.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            relay_side.wait_for_messages(Duration::from_secs(20)).await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tx = writer.begin().await.expect("begin");
    tx.enqueue(None, &messages(None, 1, "d")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let waited = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the wait ends by its timeout at the latest")
        .expect("task");
    assert!(
        waited < Duration::from_secs(10),
        "NOTIFY must wake the other replica (waited {waited:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_failing_halfway_leaves_nothing() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    sqlx::query("CREATE TABLE orders (id uuid PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("create table");
    let instance = sample_instance("orders", Some("halfway"));
    let message = MessageId::new();
    let mut tx = store.begin_postgres();
    use saga_core::Transaction as _;
    assert!(tx.consume("engine", &message).await.expect("consume"));
    tx.insert(&instance).await.expect("insert");
    tx.enqueue(Some(instance.id), &messages(Some(instance.id), 2, "d"))
        .await
        .expect("enqueue");
    sqlx::query("INSERT INTO orders (id) VALUES ($1)")
        .bind(instance.id.as_uuid())
        .execute(tx.connection().await.expect("connection"))
        .await
        .expect("application write");
    tx.flush().await.expect("flush");
    // Then something fails: an update of an instance nobody has.
    let ghost = sample_instance("orders", None);
    tx.update(&ghost, 1).await.expect("buffered");
    let failed = tx.flush().await;
    assert!(
        matches!(failed, Err(StoreError::Conflict { actual: None, .. })),
        "{failed:?}"
    );
    drop(tx);

    let pool = store.pool();
    assert_eq!(count(pool, "SELECT count(*) FROM saga_instances").await, 0);
    assert_eq!(count(pool, "SELECT count(*) FROM saga_outbox").await, 0);
    assert_eq!(count(pool, "SELECT count(*) FROM saga_inbox").await, 0);
    assert_eq!(count(pool, "SELECT count(*) FROM orders").await, 0);
    let mut tx = store.begin().await.expect("begin");
    assert!(
        tx.consume("engine", &message).await.expect("consume"),
        "the message is not consumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_but_unpublished_messages_are_published_by_a_new_relay() {
    let db = TestDb::new().await;
    let before_crash = db.store(2).await;
    let saga = SagaId::new();
    let mut tx = before_crash.begin().await.expect("begin");
    tx.enqueue(Some(saga), &messages(Some(saga), 5, "events"))
        .await
        .expect("enqueue");
    tx.enqueue(None, &messages(None, 3, "events")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    // A relay claimed part of it and died before publishing.
    let claimed = before_crash.claim(4, Duration::from_secs(1)).await.expect("claim");
    assert_eq!(claimed.len(), 4);
    before_crash.pool().close().await;
    drop(before_crash);

    let after_restart = db.store(4).await;
    let transport = InMemoryTransport::new();
    transport.bind("events", "events");
    let shutdown = saga_core::CancellationToken::new();
    let relay = Relay::new(
        Arc::new(after_restart.clone()),
        Arc::new(transport.clone()),
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    );
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut published = Vec::new();
    while published.len() < 8 && Instant::now() < deadline {
        published.extend(transport.take("events"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let _ = running.await;
    assert_eq!(
        published.len(),
        8,
        "every committed message is published after the restart"
    );
    let of_saga: Vec<&str> = published
        .iter()
        .filter(|m| m.correlation_id.as_deref() == Some(saga.to_string().as_str()))
        .map(|m| m.kind.as_str())
        .collect();
    assert_eq!(
        of_saga,
        ["M0", "M1", "M2", "M3", "M4"],
        "a saga's messages keep their order"
    );
    assert_eq!(
        count(
            after_restart.pool(),
            "SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_inbox_and_sent_rows_and_only_configured_instances() {
    let db = TestDb::new().await;
    let keep_everything = db.store(2).await;
    let pool = keep_everything.pool().clone();
    // Two inbox rows and two sent messages, one of each old.
    let mut tx = keep_everything.begin().await.expect("begin");
    tx.consume("c", &MessageId::from("old")).await.expect("consume");
    tx.consume("c", &MessageId::from("new")).await.expect("consume");
    tx.enqueue(None, &messages(None, 2, "d")).await.expect("enqueue");
    let now = Timestamp::now();
    let mut old_done = sample_instance("orders", None);
    old_done.status = SagaStatus::Completed;
    old_done.updated_at = now - Duration::from_secs(3 * 3600);
    let mut old_running = sample_instance("orders", None);
    old_running.updated_at = old_done.updated_at;
    let mut new_done = sample_instance("orders", None);
    new_done.status = SagaStatus::Compensated;
    new_done.updated_at = now;
    for instance in [&old_done, &old_running, &new_done] {
        tx.insert(instance).await.expect("insert");
    }
    tx.commit().await.expect("commit");
    let claimed = keep_everything.claim(10, Duration::from_secs(60)).await.expect("claim");
    keep_everything
        .mark_sent(&claimed.iter().map(|e| e.id).collect::<Vec<_>>())
        .await
        .expect("mark_sent");
    sqlx::query("UPDATE saga_inbox SET consumed_at = now() - interval '2 hours' WHERE message_id = 'old'")
        .execute(&pool)
        .await
        .expect("backdate");
    sqlx::query("UPDATE saga_outbox SET sent_at = now() - interval '2 hours' WHERE id = $1")
        .bind(claimed[0].id)
        .execute(&pool)
        .await
        .expect("backdate");

    let hour = Duration::from_secs(3600);
    let config = |finished| PostgresStoreConfig {
        retention: RetentionConfig {
            inbox: hour,
            sent_messages: hour,
            finished_instances: finished,
            batch_size: 1,
        },
        ..PostgresStoreConfig::default()
    };
    let keeps_instances = db.store_with(2, config(None)).await;
    let purged = keeps_instances.purge().await.expect("purge");
    assert_eq!((purged.inbox, purged.sent_messages, purged.instances), (1, 1, 0));
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_inbox").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_outbox").await, 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM saga_instances").await,
        3,
        "instances are kept by default"
    );

    let drops_instances = db.store_with(2, config(Some(hour))).await;
    let purged = drops_instances.purge().await.expect("purge");
    assert_eq!(purged.instances, 1, "only the old finished instance goes");
    assert!(drops_instances.load(old_done.id).await.expect("load").is_none());
    assert!(drops_instances.load(old_running.id).await.expect("load").is_some());
    assert!(drops_instances.load(new_done.id).await.expect("load").is_some());
    assert!(drops_instances.history(old_done.id).await.expect("history").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_sent_retention_deletes_messages_when_marked_sent() {
    let db = TestDb::new().await;
    let config = PostgresStoreConfig {
        retention: RetentionConfig {
            sent_messages: Duration::ZERO,
            ..RetentionConfig::default()
        },
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(2, config).await;
    let mut tx = store.begin().await.expect("begin");
    tx.enqueue(None, &messages(None, 3, "d")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let claimed = store.claim(10, Duration::from_secs(60)).await.expect("claim");
    store
        .mark_sent(&claimed.iter().map(|e| e.id).collect::<Vec<_>>())
        .await
        .expect("mark_sent");
    assert_eq!(count(store.pool(), "SELECT count(*) FROM saga_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_migrating_at_once_both_succeed() {
    let db = TestDb::empty().await;
    let (a, b) = (db.pool(2).await, db.pool(2).await);
    let (ra, rb) = tokio::join!(saga_postgres::migrate(&a), saga_postgres::migrate(&b));
    ra.expect("first replica migrates");
    rb.expect("second replica migrates");
    saga_postgres::migrate(&a).await.expect("migrating again is a no-op");
    assert_eq!(count(&a, "SELECT count(*) FROM saga_instances").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_is_corrupt_not_a_panic() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let instance = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE saga_instances SET status = 'paused', step = -1")
        .execute(store.pool())
        .await
        .expect("break the row");
    let loaded = store.load(instance.id).await;
    assert!(matches!(loaded, Err(StoreError::Corrupt { .. })), "{loaded:?}");
    let listed = store.list(&Default::default()).await;
    assert!(matches!(listed, Err(StoreError::Corrupt { .. })), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_retryable() {
    // Nothing listens on port 1: connecting fails like a database that is down.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .expect("lazy pool");
    let store = saga_postgres::PostgresStore::new(pool);
    let result = store.load(SagaId::new()).await;
    match result {
        Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // `begin` sends nothing; the first statement finds the database down.
    let mut tx = store.begin().await.expect("begin is lazy");
    let consumed = tx.consume("engine", &MessageId::new()).await;
    assert!(matches!(consumed, Err(StoreError::Unavailable(_))), "{consumed:?}");
}
