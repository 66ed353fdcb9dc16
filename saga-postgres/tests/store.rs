//! PostgreSQL-specific behaviour of the store: claims across replicas,
//! notifications, failures halfway, retention, migrations, error mapping.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDb;
use saga_core::memory::InMemoryTransport;
use saga_core::testkit::store_contract::sample_instance;
use saga_core::{
    Cause, Message, MessageId, OutboxEntry, OutboxStore, Position, QueryStore, Relay, RelayConfig, SagaId,
    SagaInstance, SagaStatus, SagaStore, StoreError, Timestamp, Transaction as _, Transition, UnsentFilter,
};
use saga_postgres::{PostgresStoreConfig, RetentionConfig, StagedWrite};

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

/// The kinds of `entries`, in order.
fn kinds_of(entries: &[OutboxEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.message.kind.as_str()).collect()
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
async fn messages_waiting_behind_their_sagas_do_not_hide_other_sagas_messages_from_a_claim() {
    let db = TestDb::new().await;
    // No relay is attached to the writer: every row is left to claims.
    let (writer, relay) = (db.store(2).await, db.store(2).await);
    let sagas: Vec<SagaId> = (0..3).map(|_| SagaId::new()).collect();
    for kind in ["Head", "Follower"] {
        let mut tx = writer.begin().await.expect("begin");
        for saga in &sagas {
            let message = Message::new(kind, "d", b"{}".to_vec()).with_correlation_id(saga.to_string());
            tx.enqueue(Some(*saga), &[message]).await.expect("enqueue");
        }
        tx.commit().await.expect("commit");
    }
    let free = SagaId::new();
    let mut tx = writer.begin().await.expect("begin");
    tx.enqueue(Some(free), &messages(Some(free), 1, "d"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    // The heads are held (say the broker refuses them): each saga's
    // follower waits behind its head, and the first three available rows
    // are all followers.
    let heads = relay.claim(3, Duration::from_secs(600)).await.expect("claim");
    assert_eq!(kinds_of(&heads), ["Head"; 3]);
    let next = relay.claim(3, Duration::from_secs(600)).await.expect("claim");
    assert_eq!(
        next.iter().map(|e| e.saga).collect::<Vec<_>>(),
        [Some(free)],
        "the other saga's message is claimed past the waiting ones: {next:?}"
    );
    assert!(
        relay
            .claim(3, Duration::from_secs(600))
            .await
            .expect("claim")
            .is_empty()
    );
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

/// Whether a notification arrives on `listener` within 20 s.
async fn notified(listener: &mut sqlx::postgres::PgListener) -> bool {
    tokio::time::timeout(Duration::from_secs(20), listener.recv())
        .await
        .is_ok_and(|n| n.is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_within_the_notify_interval_share_a_trailing_notify() {
    let db = TestDb::new().await;
    let writer = db
        .store_with(
            2,
            PostgresStoreConfig {
                notify_interval: Duration::from_millis(500),
                ..PostgresStoreConfig::default()
            },
        )
        .await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool(1).await)
        .await
        .expect("listener connects");
    listener.listen("saga_outbox").await.expect("LISTEN");
    let commit = || async {
        let mut tx = writer.begin().await.expect("begin");
        tx.enqueue(None, &messages(None, 1, "d")).await.expect("enqueue");
        tx.commit().await.expect("commit");
    };
    commit().await;
    assert!(notified(&mut listener).await, "the first commit notifies at once");
    // Within the interval: no NOTIFY each, but one after them.
    commit().await;
    commit().await;
    assert!(
        notified(&mut listener).await,
        "commits within the interval must still be followed by a NOTIFY"
    );
}

/// The next revision of `instance`, caused by message `cause`, with its history entry.
fn caused_by(instance: &SagaInstance, cause: &MessageId) -> (SagaInstance, Transition) {
    let mut next = instance.clone();
    next.revision += 1;
    next.step += 1;
    let transition = Transition {
        saga_id: next.id,
        revision: next.revision,
        at: next.updated_at,
        cause: Cause::Message {
            id: cause.clone(),
            kind: "Reply".to_owned(),
        },
        before: Some(Position {
            status: instance.status,
            step: instance.step,
        }),
        after: Position {
            status: next.status,
            step: next.step,
        },
        emitted: Vec::new(),
        note: None,
    };
    (next, transition)
}

/// Commits a transition of `instance` caused by `message`, consuming it as
/// the engine does; `record` false leaves out the history entry (so the
/// consumption goes to the inbox).
async fn consume_in_transition(
    store: &saga_postgres::PostgresStore,
    instance: &SagaInstance,
    message: &MessageId,
    record: bool,
) -> Result<SagaInstance, StoreError> {
    let (next, transition) = caused_by(instance, message);
    let mut tx = store.begin().await?;
    tx.consume_at_commit("engine", message).await?;
    tx.update(&next, instance.revision).await?;
    if record {
        tx.record(&transition).await?;
    }
    tx.commit().await.map(|()| next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_consumed_by_its_transition_is_recorded_on_the_history_and_is_a_duplicate_both_ways() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let pool = store.pool().clone();
    let instance = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    tx.commit().await.expect("commit");

    let message = MessageId::new();
    let next = consume_in_transition(&store, &instance, &message, true)
        .await
        .expect("the first consumption commits");
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_inbox").await, 0, "no inbox row");
    let recorded: Option<(String, String)> =
        sqlx::query_as("SELECT consumer, message_id FROM saga_history WHERE message_id IS NOT NULL")
            .fetch_optional(&pool)
            .await
            .expect("history readable");
    assert_eq!(
        recorded,
        Some(("engine".to_owned(), message.as_str().to_owned())),
        "the history row records the consumption"
    );

    let mut tx = store.begin().await.expect("begin");
    assert!(
        !tx.consume("engine", &message).await.expect("consume"),
        "a read of the inbox finds it on the history"
    );
    drop(tx);
    let again = consume_in_transition(&store, &next, &message, true).await;
    assert!(
        matches!(again, Err(StoreError::ConsumedConcurrently { .. })),
        "a second transition caused by it must fail as ConsumedConcurrently, got {again:?}"
    );
    let plain = consume_in_transition(&store, &next, &message, false).await;
    assert!(
        matches!(plain, Err(StoreError::ConsumedConcurrently { .. })),
        "consuming it into the inbox must fail too, got {plain:?}"
    );
    let loaded = store.load(instance.id).await.expect("load").expect("instance");
    assert_eq!(loaded.revision, next.revision, "the duplicates wrote nothing");
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_inbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_the_inbox_is_a_duplicate_for_a_transition_it_would_cause() {
    // E.g. consumed before migration 0004, when the engine's consumptions went to the inbox.
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let instance = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    tx.commit().await.expect("commit");
    let message = MessageId::new();
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.consume("engine", &message).await.expect("consume"));
    tx.commit().await.expect("commit");

    let outcome = consume_in_transition(&store, &instance, &message, true).await;
    assert!(
        matches!(outcome, Err(StoreError::ConsumedConcurrently { .. })),
        "the transition must fail as ConsumedConcurrently, got {outcome:?}"
    );
    let loaded = store.load(instance.id).await.expect("load").expect("instance");
    assert_eq!(loaded.revision, instance.revision, "nothing written");
    assert!(store.history(instance.id).await.expect("history").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_writing_several_rows_of_each_kind_writes_them_all() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let pool = store.pool().clone();
    let instance = sample_instance("orders", None);
    let (first, caused) = (MessageId::new(), MessageId::new());
    let (second_instance, mut second) = caused_by(&instance, &caused);
    second.revision = instance.revision + 1;
    let (_, mut third) = caused_by(&second_instance, &MessageId::new());
    third.revision = instance.revision + 2;
    let saga = instance.id;
    let mut tx = store.begin().await.expect("begin");
    tx.consume_at_commit("engine", &first).await.expect("consume");
    tx.consume_at_commit("engine", &caused).await.expect("consume");
    tx.insert(&instance).await.expect("insert");
    tx.record(&second).await.expect("record");
    tx.record(&third).await.expect("record");
    tx.enqueue(Some(saga), &messages(Some(saga), 3, "d"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    assert_eq!(
        count(&pool, "SELECT count(*) FROM saga_inbox").await,
        1,
        "`first` caused nothing recorded"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_history").await, 2);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM saga_history WHERE message_id IS NOT NULL").await,
        1,
        "`caused` is on the history row of the transition it caused"
    );
    let claimed = store.claim(10, Duration::from_secs(60)).await.expect("claim");
    let kinds = kinds_of(&claimed);
    assert_eq!(kinds, ["M0", "M1", "M2"], "in order");

    // Without an instance write, both again: each is a duplicate.
    for message in [&first, &caused] {
        let mut tx = store.begin().await.expect("begin");
        tx.consume_at_commit("engine", message).await.expect("consume");
        tx.consume_at_commit("engine", &MessageId::new())
            .await
            .expect("consume");
        tx.enqueue(None, &messages(None, 2, "d")).await.expect("enqueue");
        let outcome = tx.commit().await;
        assert!(
            matches!(outcome, Err(StoreError::ConsumedConcurrently { .. })),
            "consuming {message} again must fail, got {outcome:?}"
        );
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM saga_outbox").await,
        3,
        "the duplicates wrote nothing"
    );
}

/// Whether outbox row `id` is leased (claimed and not expired).
async fn leased(pool: &sqlx::PgPool, id: i64) -> bool {
    sqlx::query_scalar("SELECT claimed_until > now() FROM saga_outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .map(|leased: Option<bool>| leased.unwrap_or(false))
        .expect("outbox row readable")
}

/// The id of the outbox row of `kind` (one per test).
async fn outbox_id(pool: &sqlx::PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM saga_outbox WHERE kind = $1")
        .bind(kind)
        .fetch_one(pool)
        .await
        .expect("outbox readable")
}

/// Commits a transition of `instance` (inserted when `insert`) that emits
/// one message; returns the instance as committed.
async fn emit(store: &saga_postgres::PostgresStore, instance: &SagaInstance, insert: bool, kind: &str) -> SagaInstance {
    let mut tx = store.begin().await.expect("begin");
    let next = if insert {
        tx.insert(instance).await.expect("insert");
        instance.clone()
    } else {
        let mut next = instance.clone();
        next.revision += 1;
        tx.update(&next, instance.revision).await.expect("update");
        next
    };
    let message = Message::new(kind, "d", b"{}".to_vec()).with_correlation_id(instance.id.to_string());
    tx.enqueue(Some(instance.id), &[message]).await.expect("enqueue");
    tx.commit().await.expect("commit");
    next
}

/// Keeps `store`'s relay attached, as a relay waiting for messages does,
/// without taking what was handed to it: on a slow machine, more than the
/// relay's grace may have passed since the test's last claim, and a commit
/// then leaves its messages to claims (and has pending marks written).
async fn keep_relay_attached(store: &saga_postgres::PostgresStore) {
    store.wait_for_messages(Duration::ZERO).await;
}

/// Attaches a relay to `store` (a claim), starts a saga emitting `M1`, and
/// claims again: the saga and what was handed over, `M1` alone.
async fn first_message_handed_over(store: &saga_postgres::PostgresStore) -> (SagaInstance, Vec<OutboxEntry>) {
    assert!(
        store
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty()
    );
    let instance = emit(store, &sample_instance("orders", None), true, "M1").await;
    let first = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    assert_eq!(first.len(), 1, "the commit's message is handed over");
    (instance, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_committed_while_a_relay_claims_are_handed_to_it_in_saga_order() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let other = db.store(2).await;
    let pool = store.pool().clone();
    let (instance, first) = first_message_handed_over(&store).await;
    assert_eq!(first[0].message.kind, "M1");
    assert_eq!(first[0].saga, Some(instance.id));
    assert!(
        leased(&pool, first[0].id).await,
        "a handed-off row is leased in the table"
    );
    assert!(
        other
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "another relay does not get a handed-off row"
    );

    // M1 is not sent yet: M2 must wait for it, so it is not handed off.
    let instance = emit(&store, &instance, false, "M2").await;
    let unsent: Vec<(i64, bool)> =
        sqlx::query_as("SELECT id, claimed_until IS NOT NULL FROM saga_outbox WHERE kind = 'M2'")
            .fetch_all(&pool)
            .await
            .expect("outbox readable");
    assert_eq!(unsent.len(), 1);
    assert!(
        !unsent[0].1,
        "a message behind an unsent one of its saga is left to claims"
    );
    assert!(
        other
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "nor is it claimed before the earlier one is sent"
    );
    store.mark_sent(&[first[0].id]).await.expect("mark_sent");
    let _ = emit(&store, &instance, false, "M3").await;
    let rest = other.claim(10, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&rest);
    assert_eq!(kinds, ["M2", "M3"], "the rest follow in order once M1 is sent");
}

/// A message handed to this process's relay and given up before the relay
/// took it is not published from memory, and the saga's next message is
/// handed off behind it as behind a sent one; another replica hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_given_up_before_its_relay_took_it_is_never_handed_out() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let pool = store.pool().clone();
    assert!(
        store
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty()
    );
    let instance = emit(&store, &sample_instance("orders", None), true, "M1").await;
    let id = outbox_id(&pool, "M1").await;
    assert!(leased(&pool, id).await, "M1 was handed to the relay");

    // Another replica's ear, on a connection of its own.
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool(1).await)
        .await
        .expect("listener");
    listener
        .listen(&PostgresStoreConfig::default().notify_channel)
        .await
        .expect("listen");
    let mut tx = store.begin().await.expect("begin");
    let given_up = tx.discard_unsent(id).await.expect("discard");
    assert_eq!(given_up.map(|e| e.message.kind), Some("M1".to_owned()));
    tx.commit().await.expect("commit");
    assert!(
        notified(&mut listener).await,
        "other replicas' relays are told to look at the table"
    );
    let discarded: Option<bool> =
        sqlx::query_scalar("SELECT sent_at IS NOT NULL AND discarded_at IS NOT NULL FROM saga_outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("outbox readable");
    assert_eq!(discarded, Some(true), "the row says it was given up");

    keep_relay_attached(&store).await;
    assert!(
        store
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "the relay does not take a message given up from its hand-offs"
    );
    let _ = emit(&store, &instance, false, "M2").await;
    assert!(
        leased(&pool, outbox_id(&pool, "M2").await).await,
        "the next message is handed off: the one before it counts as sent"
    );
    let next = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    assert_eq!(kinds_of(&next), ["M2"]);
}

/// Commits a transition of `instance` emitting one message of `kind`,
/// returning the commit's outcome.
async fn try_emit(store: &saga_postgres::PostgresStore, instance: &SagaInstance, kind: &str) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    let mut next = instance.clone();
    next.revision += 1;
    tx.update(&next, instance.revision).await?;
    let message = Message::new(kind, "d", b"{}".to_vec()).with_correlation_id(instance.id.to_string());
    tx.enqueue(Some(instance.id), &[message]).await?;
    tx.commit().await
}

/// Waits until a statement of the test's database waits for a row lock.
async fn until_a_statement_waits_for_a_lock(pool: &sqlx::PgPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity readable");
        if waiting > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no statement waits for the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes a message of kind `kind` for `saga` in a transaction that does
/// not update the saga (a foreign row), and leaves the transaction open,
/// holding the saga's row.
async fn foreign_write_holding(
    store: &saga_postgres::PostgresStore,
    saga: &SagaInstance,
    kind: &str,
) -> saga_postgres::PostgresTransaction {
    let mut foreign = store.begin_postgres();
    let message = Message::new(kind, "d", b"{}".to_vec());
    foreign.enqueue(Some(saga.id), &[message]).await.expect("enqueue");
    foreign.connection().await.expect("BEGIN");
    foreign.flush().await.expect("flushed");
    foreign
}

/// Another transaction writes a message of a saga it does not update (a
/// foreign row; the store's `Transaction` allows it) and commits while the
/// saga's own transition waits for the saga's row. The transition read the
/// saga's newest message (sent) before the foreign one existed, so handing
/// its message off would let it overtake the foreign one: it conflicts
/// instead, and decided again, its message waits behind the foreign one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_waited_for_a_foreign_write_of_its_saga_does_not_overtake_it() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let (instance, first) = first_message_handed_over(&store).await;
    store.mark_sent(&[first[0].id]).await.expect("mark_sent");

    let foreign = foreign_write_holding(&store, &instance, "F").await;

    keep_relay_attached(&store).await;
    let own = {
        let (store, instance) = (store.clone(), instance.clone());
        tokio::spawn(async move { try_emit(&store, &instance, "M2").await })
    };
    until_a_statement_waits_for_a_lock(store.pool()).await;
    Box::new(foreign).commit().await.expect("the foreign write commits");
    let outcome = own.await.expect("no panic");
    assert!(
        matches!(outcome, Err(StoreError::Conflict { .. })),
        "the waiting transition must not commit on the pointer it read before the foreign write: {outcome:?}"
    );

    keep_relay_attached(&store).await;
    try_emit(&store, &instance, "M2")
        .await
        .expect("decided again, it commits");
    let claimed = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&claimed);
    assert_eq!(kinds, ["F", "M2"], "the foreign message first, then the saga's own");
}

/// As above, with the transition in a statement shared with another
/// saga's: the shared statement does not write it, and alone, its message
/// waits behind the foreign one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_statement_does_not_let_a_transition_overtake_a_foreign_write_it_waited_for() {
    let db = TestDb::new().await;
    let store = batching_store(&db).await;
    let lease = Duration::from_secs(30);
    assert!(
        store.claim(64, lease).await.expect("claim").is_empty(),
        "a relay is attached"
    );
    // X, the foreign write's saga; Y, sharing X's statement; Z, holding the
    // one statement in flight while X's and Y's gather behind it.
    let sagas: Vec<SagaInstance> = (0..3).map(|_| sample_instance("orders", None)).collect();
    for saga in &sagas {
        keep_relay_attached(&store).await;
        start(&store, saga).await.expect("started");
    }
    let first = store.claim(64, lease).await.expect("claim");
    assert_eq!(first.len(), 3, "each start's message is handed over");
    store
        .mark_sent(&first.iter().map(|e| e.id).collect::<Vec<_>>())
        .await
        .expect("mark_sent");
    let (x, y, z) = (&sagas[0], &sagas[1], &sagas[2]);
    let foreign_x = foreign_write_holding(&store, x, "FX").await;
    let foreign_z = foreign_write_holding(&store, z, "FZ").await;

    keep_relay_attached(&store).await;
    let transition = |saga: &SagaInstance| {
        let (store, saga) = (store.clone(), saga.clone());
        tokio::spawn(async move { engine_transition(&store, &saga, &MessageId::new()).await })
    };
    let plug = transition(z);
    until_a_statement_waits_for_a_lock(store.pool()).await;
    let before = store.commit_batching();
    let (own_x, own_y) = (transition(x), transition(y));
    // Time for both to queue behind Z's statement (the shared statement
    // assertion below says if they did not).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Attached as X's and Y's statement is made, so it hands off.
    keep_relay_attached(&store).await;
    Box::new(foreign_z).commit().await.expect("FZ commits");
    let plugged = plug.await.expect("no panic");
    assert!(
        matches!(plugged, Err(StoreError::Conflict { .. })),
        "Z's transition waited for FZ alone: {plugged:?}"
    );
    until_a_statement_waits_for_a_lock(store.pool()).await;
    Box::new(foreign_x).commit().await.expect("FX commits");
    own_x.await.expect("no panic").expect("X's transition commits");
    own_y.await.expect("no panic").expect("Y's transition commits");
    let after = store.commit_batching();
    assert!(
        after.shared_statements > before.shared_statements,
        "X's and Y's transitions shared a statement: {before:?} → {after:?}"
    );

    keep_relay_attached(&store).await;
    let handed: Option<bool> = sqlx::query_scalar(
        "SELECT claimed_until IS NOT NULL FROM saga_outbox WHERE saga_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(x.id.as_uuid())
    .fetch_one(store.pool())
    .await
    .expect("X's newest message");
    assert_eq!(
        handed,
        Some(false),
        "X's message is left to claims behind FX, not handed off ahead of it"
    );
    let claimed = store.claim(64, lease).await.expect("claim");
    let of_x: Vec<&str> = claimed
        .iter()
        .filter(|e| e.saga == Some(x.id))
        .map(|e| e.message.kind.as_str())
        .collect();
    assert_eq!(of_x, ["FX", "M0"], "X's own message waits behind the foreign one");
}

/// A transaction that updates saga W and writes a message for saga X
/// draws that message's id while it has yet to take W's row, which another
/// transaction holds; X's own transition commits meanwhile. Had the id been
/// drawn before X's row was locked, the foreign message, committed after
/// X's, would sort before it: X's pointer would name X's message, and once
/// that is sent, X's next message could be handed off ahead of the foreign
/// one. Locking X's row first makes X's transition wait, and a saga's
/// messages sort in the order they commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_is_ordered_after_the_messages_of_its_saga_committed_before_it() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let (x, first) = first_message_handed_over(&store).await;
    store.mark_sent(&[first[0].id]).await.expect("mark_sent");
    let w = sample_instance("orders", None);
    start(&store, &w).await.expect("W started");

    // Another transaction holds W's row.
    let mut holder = store.pool().begin().await.expect("BEGIN");
    sqlx::query("SELECT 1 FROM saga_instances WHERE id = $1 FOR UPDATE")
        .bind(w.id.as_uuid())
        .execute(&mut *holder)
        .await
        .expect("W's row held");
    let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let conflicts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let foreign = {
        let (store, w, x, committed) = (store.clone(), w.clone(), x.id, Arc::clone(&committed));
        tokio::spawn(async move {
            let mut tx = store.begin().await?;
            let mut next = w.clone();
            next.revision += 1;
            tx.update(&next, w.revision).await?;
            tx.enqueue(Some(x), &[Message::new("F", "d", b"{}".to_vec())]).await?;
            tx.commit().await?;
            committed.lock().expect("unpoisoned").push("F");
            Ok::<_, StoreError>(())
        })
    };
    until_a_statement_waits_for_a_lock(store.pool()).await;
    let own = {
        let (store, x, committed) = (store.clone(), x.clone(), Arc::clone(&committed));
        let conflicts = Arc::clone(&conflicts);
        tokio::spawn(async move {
            // Decided again on a conflict, as the engine does.
            let mut instance = x;
            for _ in 0..3 {
                match try_emit(&store, &instance, "M2").await {
                    Ok(()) => {
                        committed.lock().expect("unpoisoned").push("M2");
                        return Ok(());
                    }
                    Err(StoreError::Conflict { .. }) => {
                        conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        instance = store.load(instance.id).await?.expect("X exists");
                    }
                    Err(e) => return Err(e),
                }
            }
            panic!("X's transition kept conflicting");
        })
    };
    // Either X's transition commits at once, or it waits for the foreign
    // write: give it the time to do the first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.rollback().await.expect("W's row released");
    foreign.await.expect("no panic").expect("the foreign write commits");
    own.await.expect("no panic").expect("X's transition commits");

    let order = committed.lock().expect("unpoisoned").clone();
    let ids: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, kind FROM saga_outbox WHERE saga_id = $1 AND kind IN ('F', 'M2') ORDER BY id")
            .bind(x.id.as_uuid())
            .fetch_all(store.pool())
            .await
            .expect("X's messages");
    let by_id: Vec<&str> = ids.iter().map(|(_, kind)| kind.as_str()).collect();
    assert_eq!(by_id, order, "X's messages sort in the order they committed");
    assert_eq!(
        (order.as_slice(), conflicts.load(std::sync::atomic::Ordering::Relaxed)),
        (&["F", "M2"][..], 1),
        "X's transition waited for the foreign write, then was decided again"
    );
}

/// A lease or a wait meant as "for ever" is taken as a year, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_lease_or_wait_does_not_overflow() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let waited = tokio::time::timeout(Duration::from_millis(200), store.wait_for_messages(Duration::MAX)).await;
    assert!(waited.is_err(), "nothing committed: it waits, without panicking");
    assert!(store.claim(10, Duration::MAX).await.expect("claim").is_empty());
    let _ = emit(&store, &sample_instance("orders", None), true, "M1").await;
    let claimed = store.claim(10, Duration::MAX).await.expect("claim");
    assert_eq!(claimed.len(), 1, "handed over under the endless lease");
}

/// An outbox row another tool wrote badly does not hold back the rows
/// claimed with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_row_does_not_hold_back_the_others() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let mut tx = store.begin().await.expect("begin");
    tx.enqueue(None, &messages(None, 2, "d")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE saga_outbox SET headers = '[1, 2]' WHERE kind = 'M0'")
        .execute(store.pool())
        .await
        .expect("spoil a row");
    let claimed = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&claimed);
    assert_eq!(kinds, ["M1"]);
    let unsent = count(
        store.pool(),
        "SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL AND kind = 'M0'",
    )
    .await;
    assert_eq!(unsent, 1, "the unreadable row stays for an operator");
    // The operator's listing shows it, headers as they are, and does not fail.
    let listed = store.unsent_messages(&UnsentFilter::default()).await.expect("listed");
    let kinds: Vec<&str> = listed.iter().map(|u| u.entry.message.kind.as_str()).collect();
    assert_eq!(kinds, ["M0", "M1"], "M1, claimed, is unsent too until marked");
    assert_eq!(
        listed[0]
            .entry
            .message
            .headers
            .get("(unreadable headers)")
            .map(String::as_str),
        Some("[1,2]")
    );
}

/// A transition's messages stay in one batch even past the claim's limit,
/// and the table, read in the same claim, adds nothing past it (the claim
/// once subtracted past zero there: a panic in a debug build, the whole
/// table leased at once in a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transitions_messages_handed_over_past_the_limit_stay_together() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    assert!(store.claim(1, Duration::from_secs(30)).await.expect("claim").is_empty());
    let instance = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    tx.enqueue(Some(instance.id), &messages(Some(instance.id), 3, "d"))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    // Another saga's message, left to the table (it came from elsewhere).
    sqlx::query(
        "INSERT INTO saga_outbox (saga_id, message_id, kind, destination, created_at, headers, payload) \
         SELECT gen_random_uuid(), gen_random_uuid()::text, 'Other', destination, created_at, headers, payload \
         FROM saga_outbox LIMIT 1",
    )
    .execute(store.pool())
    .await
    .expect("insert another row");
    // Long enough for the next claim to read the table as well.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claimed = store.claim(1, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&claimed);
    assert_eq!(kinds, ["M0", "M1", "M2"], "one transition's messages, together");
}

/// A store whose marks wait longer than any test (nothing is marked in
/// it), and a saga whose first message, `M1`, was handed over and
/// confirmed: its mark waits for the delay (abort the task at the end).
async fn first_message_published_and_waiting_to_be_marked(
    db: &TestDb,
) -> (
    saga_postgres::PostgresStore,
    SagaInstance,
    Vec<OutboxEntry>,
    tokio::task::JoinHandle<Result<(), StoreError>>,
) {
    let config = PostgresStoreConfig {
        mark_delay: Duration::from_secs(30),
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(2, config).await;
    let (instance, first) = first_message_handed_over(&store).await;
    let marking = {
        let (store, id) = (store.clone(), first[0].id);
        tokio::spawn(async move { store.mark_sent(&[id]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!marking.is_finished(), "marking waits for its delay");
    (store, instance, first, marking)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_behind_one_published_and_waiting_to_be_marked_is_handed_off() {
    let db = TestDb::new().await;
    let (store, instance, _first, marking) = first_message_published_and_waiting_to_be_marked(&db).await;
    let pool = store.pool().clone();

    // M2 follows a message this process published: handed off at once.
    keep_relay_attached(&store).await;
    let instance = emit(&store, &instance, false, "M2").await;
    let second = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&second);
    assert_eq!(kinds, ["M2"], "handed off behind a published message");
    assert!(leased(&pool, second[0].id).await);
    assert!(!marking.is_finished(), "M1 was still waiting to be marked");

    // M3 follows M2, handed off but not yet published: left to claims.
    let _ = emit(&store, &instance, false, "M3").await;
    let third: i64 = sqlx::query_scalar("SELECT id FROM saga_outbox WHERE kind = 'M3'")
        .fetch_one(&pool)
        .await
        .expect("outbox readable");
    assert!(!leased(&pool, third).await, "M3 is left to claims behind M2");
    assert!(
        store
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "M3 waits while M2 is unconfirmed"
    );

    // M2 confirmed: its confirm wakes the relay, whose claim takes M3 while
    // neither M1 nor M2 is marked yet (their marks wait for the delay).
    let (claimed, marking_second) = confirm_and_claim(&store, second[0].id, "M2").await;
    let kinds = kinds_of(&claimed);
    assert_eq!(kinds, ["M3"], "claimed behind M2, confirmed and waiting to be marked");
    assert!(
        !marking.is_finished() && !marking_second.is_finished(),
        "M1 and M2 were still waiting to be marked"
    );
    // Their rows stay leased, as a stopped relay's would.
    marking.abort();
    marking_second.abort();
}

/// A message published and waiting to be marked is given up (the operator
/// was a moment late): the saga's next message, handed off behind it, has
/// its lease given back and goes from the table, once, not also from the
/// relay's hand-offs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_message_of_a_saga_whose_message_was_given_up_is_claimed_once() {
    let db = TestDb::new().await;
    let (store, instance, first, marking) = first_message_published_and_waiting_to_be_marked(&db).await;
    keep_relay_attached(&store).await;
    let _ = emit(&store, &instance, false, "M2").await;
    assert!(
        leased(store.pool(), outbox_id(store.pool(), "M2").await).await,
        "M2 is handed off behind the published M1"
    );

    let mut tx = store.begin().await.expect("begin");
    assert!(tx.discard_unsent(first[0].id).await.expect("discard").is_some());
    tx.commit().await.expect("commit");
    keep_relay_attached(&store).await;
    let claimed = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    assert_eq!(kinds_of(&claimed), ["M2"], "once, from the table");
    marking.abort();
}

/// With hand-offs off, every message goes through the table: a message
/// behind its saga's unconfirmed previous one still goes once that is
/// confirmed, not when it is marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hand_offs_a_confirm_still_lets_the_message_behind_it_go() {
    let db = TestDb::new().await;
    let config = PostgresStoreConfig {
        handoff: false,
        // Far longer than the test: nothing is marked in it.
        mark_delay: Duration::from_secs(30),
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(2, config).await;
    let instance = emit(&store, &sample_instance("orders", None), true, "M1").await;
    let first = store.claim(10, Duration::from_secs(30)).await.expect("claim");
    let kinds = kinds_of(&first);
    assert_eq!(kinds, ["M1"]);
    let _ = emit(&store, &instance, false, "M2").await;
    assert!(
        store
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "M2 waits while M1 is unconfirmed"
    );

    let (second, marking) = confirm_and_claim(&store, first[0].id, "M1").await;
    let kinds = kinds_of(&second);
    assert_eq!(kinds, ["M2"], "claimed behind M1, confirmed and waiting to be marked");
    assert!(!marking.is_finished(), "M1 was still waiting to be marked");
    marking.abort();
}

/// Has `store`'s relay confirm message `id` (`mark_sent`, whose marking
/// then waits for the store's delay: the task comes back unfinished) while
/// a relay waits for messages, and returns what that relay, woken by the
/// confirm, claims. `what` names the message if no relay is woken.
async fn confirm_and_claim(
    store: &saga_postgres::PostgresStore,
    id: i64,
    what: &str,
) -> (Vec<OutboxEntry>, tokio::task::JoinHandle<Result<(), StoreError>>) {
    drain_wake_ups(store).await;
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_messages(Duration::from_secs(60)).await })
    };
    let marking = {
        let store = store.clone();
        tokio::spawn(async move { store.mark_sent(&[id]).await })
    };
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap_or_else(|_| panic!("{what}'s confirm wakes a relay waiting for messages"))
        .expect("waiting task");
    let claimed = store.claim(64, Duration::from_secs(60)).await.expect("claim");
    (claimed, marking)
}

/// Takes the wake-ups `store`'s commits left for its relay (this
/// process's, and the `NOTIFY` through its listener), so that what wakes a
/// relay next is what the test does: waits until a wait of 300 ms passes
/// without one (at most ten).
async fn drain_wake_ups(store: &saga_postgres::PostgresStore) {
    for _ in 0..10 {
        let began = Instant::now();
        store.wait_for_messages(Duration::from_millis(300)).await;
        if began.elapsed() >= Duration::from_millis(290) {
            return;
        }
    }
    panic!("the relay kept being woken with nothing committed");
}

/// Two stores (replicas) on one database, a relay attached to the first
/// by a claim with `lease` (which found nothing): the first store's commits
/// hand it their messages, leased for as long.
async fn attached_and_other(
    db: &TestDb,
    lease: Duration,
) -> (saga_postgres::PostgresStore, saga_postgres::PostgresStore) {
    let store = db.store(2).await;
    let other = db.store(2).await;
    assert!(store.claim(10, lease).await.expect("claim").is_empty());
    (store, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_off_messages_no_relay_takes_are_claimed_once_their_lease_ends() {
    let db = TestDb::new().await;
    // The relay's claims ask for a short lease (longer than a commit and a
    // claim take); commits lease for as long.
    let (store, other) = attached_and_other(&db, Duration::from_secs(3)).await;
    let _ = emit(&store, &sample_instance("orders", None), true, "M1").await;
    assert!(
        other
            .claim(10, Duration::from_secs(30))
            .await
            .expect("claim")
            .is_empty(),
        "leased to the first store's relay"
    );
    // That relay never claims it (it stopped): another relay does after the lease.
    let deadline = Instant::now() + Duration::from_secs(20);
    let claimed = loop {
        let claimed = other.claim(10, Duration::from_secs(30)).await.expect("claim");
        if !claimed.is_empty() || Instant::now() > deadline {
            break claimed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(claimed.len(), 1, "the row must be claimable once its lease ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_lease_runs_from_the_commit_not_from_the_transaction_s_start() {
    let db = TestDb::new().await;
    let (store, other) = attached_and_other(&db, Duration::from_secs(1)).await;
    // Application work holds the transaction open longer than the lease.
    let instance = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    let conn = saga_postgres::connection(tx.as_mut()).await.expect("connection");
    sqlx::query("SELECT pg_sleep(1.2)").execute(conn).await.expect("slept");
    tx.insert(&instance).await.expect("insert");
    tx.record(&started(&instance)).await.expect("record");
    tx.enqueue(Some(instance.id), &messages(Some(instance.id), 1, "d"))
        .await
        .expect("enqueue");
    keep_relay_attached(&store).await;
    tx.commit().await.expect("commit");
    // Handed to the first store's relay for a whole lease from now: no
    // other relay may claim it at once (both would publish it).
    let claimed = other.claim(10, Duration::from_secs(30)).await.expect("claim");
    assert!(
        claimed.is_empty(),
        "claimed by another relay inside the lease: {claimed:?}"
    );
    assert_eq!(store.claim(10, Duration::from_secs(1)).await.expect("claim").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_s_replies_are_handed_to_its_relay() {
    // Replies of no saga, without an instance write: no ordering to keep,
    // so the local relay takes them from memory (no claim, no NOTIFY).
    let db = TestDb::new().await;
    let (store, other) = attached_and_other(&db, Duration::from_secs(30)).await;
    let mut tx = store.begin().await.expect("begin");
    tx.consume_at_commit("stock", &MessageId::new()).await.expect("consume");
    tx.enqueue(None, &messages(None, 1, "replies")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let claimed = other.claim(10, Duration::from_secs(30)).await.expect("claim");
    assert!(claimed.is_empty(), "leased to the first store's relay: {claimed:?}");
    assert_eq!(store.claim(10, Duration::from_secs(30)).await.expect("claim").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_no_saga_beside_a_transition_is_not_taken_for_the_saga_s_newest() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let instance = sample_instance("orders", None);
    start(&store, &instance).await.expect("start");
    let (next, transition) = caused_by(&instance, &MessageId::new());
    let mut tx = store.begin().await.expect("begin");
    tx.update(&next, instance.revision).await.expect("update");
    tx.record(&transition).await.expect("record");
    tx.enqueue(None, &messages(None, 1, "n")).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let id = *instance.id.as_uuid();
    let pointer: Option<i64> = sqlx::query_scalar("SELECT last_outbox_id FROM saga_instances WHERE id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("the pointer");
    let own: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM saga_outbox WHERE saga_id = $1")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("the saga's newest");
    assert!(own.is_some());
    assert_eq!(
        pointer, own,
        "the saga's own newest message, which orders its next ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_loads_by_its_key_under_its_definition_only() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let instance = sample_instance("orders", Some("order-7"));
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    tx.commit().await.expect("commit");
    let loaded = store.load_by_key("orders", "order-7").await.expect("load_by_key");
    assert_eq!(loaded, Some(instance), "the instance, whole");
    assert_eq!(
        store.load_by_key("payments", "order-7").await.expect("load_by_key"),
        None
    );
    assert_eq!(store.load_by_key("orders", "order-8").await.expect("load_by_key"), None);
}

/// A store, and an application table `orders` beside its tables.
async fn store_with_orders_table(db: &TestDb) -> saga_postgres::PostgresStore {
    let store = db.store(4).await;
    sqlx::query("CREATE TABLE orders (id uuid PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("create table");
    store
}

/// A caller that goes on to commit after a failed flush gets an error, not
/// a commit of the part that was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_a_failed_flush_fails_and_writes_nothing() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let instance = sample_instance("orders", None);
    let mut tx = store.begin_postgres();
    use saga_core::Transaction as _;
    tx.insert(&instance).await.expect("insert");
    tx.flush().await.expect("flush");
    let ghost = sample_instance("orders", None);
    tx.update(&ghost, 1).await.expect("buffered");
    assert!(matches!(tx.flush().await, Err(StoreError::Conflict { .. })));
    let committed = Box::new(tx).commit().await;
    assert!(committed.is_err(), "{committed:?}");
    assert_eq!(count(store.pool(), "SELECT count(*) FROM saga_instances").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_failing_halfway_leaves_nothing() {
    let db = TestDb::new().await;
    let store = store_with_orders_table(&db).await;
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
    let at = |status, hours_ago: u64| {
        let mut instance = sample_instance("orders", None);
        instance.status = status;
        instance.updated_at = now - Duration::from_secs(hours_ago * 3600);
        instance
    };
    // In the order their outcomes are walked: one that stays (it needs
    // attention) before two that go, so a walk in batches of one must move on.
    let old_attention = at(SagaStatus::NeedsAttention, 4);
    let old_done = at(SagaStatus::Completed, 3);
    let old_compensated = at(SagaStatus::Compensated, 3);
    let old_running = at(SagaStatus::Running, 3);
    let new_done = at(SagaStatus::Compensated, 0);
    for instance in [&old_attention, &old_done, &old_compensated, &old_running, &new_done] {
        tx.insert(instance).await.expect("insert");
        tx.record(&reached(instance)).await.expect("record");
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
        5,
        "instances are kept by default"
    );

    let drops_instances = db.store_with(2, config(Some(hour))).await;
    let purged = drops_instances.purge().await.expect("purge");
    assert_eq!(
        purged.instances, 2,
        "only the old completed and compensated instances go"
    );
    for gone in [&old_done, &old_compensated] {
        assert!(drops_instances.load(gone.id).await.expect("load").is_none());
        assert!(drops_instances.history(gone.id).await.expect("history").is_empty());
    }
    for kept in [&old_attention, &old_running, &new_done] {
        assert!(drops_instances.load(kept.id).await.expect("load").is_some());
        assert_eq!(drops_instances.history(kept.id).await.expect("history").len(), 1);
    }
}

/// The engine records a consumed message on its transition's history row;
/// purging the finished saga moves that record to the inbox, where the inbox
/// retention governs it, so a late redelivery is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_finished_saga_keeps_what_it_consumed_known_as_consumed() {
    let db = TestDb::new().await;
    let store = db.store(2).await;
    let pool = store.pool().clone();
    let mut instance = sample_instance("orders", None);
    instance.status = SagaStatus::Completed;
    instance.updated_at = Timestamp::now() - Duration::from_secs(3 * 3600);
    let start = MessageId::from("start-command");
    let mut tx = store.begin().await.expect("begin");
    tx.consume_at_commit("engine", &start).await.expect("consume");
    let by_start = |transition: Transition| Transition {
        cause: Cause::Message {
            id: start.clone(),
            kind: "Start".to_owned(),
        },
        ..transition
    };
    tx.insert(&instance).await.expect("insert");
    tx.record(&by_start(reached(&instance))).await.expect("record");
    tx.commit().await.expect("commit");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM saga_history WHERE message_id = 'start-command'"
        )
        .await,
        1,
        "recorded on the history row"
    );

    let config = PostgresStoreConfig {
        retention: RetentionConfig {
            finished_instances: Some(Duration::from_secs(3600)),
            ..RetentionConfig::default()
        },
        ..PostgresStoreConfig::default()
    };
    let purging = db.store_with(2, config).await;
    assert_eq!(purging.purge().await.expect("purge").instances, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_history").await, 0);

    // Redelivered after the purge, the start command is still a duplicate.
    let mut tx = purging.begin().await.expect("begin");
    tx.consume_at_commit("engine", &start).await.expect("consume");
    let again = sample_instance("orders", None);
    tx.insert(&again).await.expect("insert");
    tx.record(&by_start(started(&again))).await.expect("record");
    let outcome = tx.commit().await;
    assert!(
        matches!(outcome, Err(StoreError::ConsumedConcurrently { .. })),
        "{outcome:?}"
    );
}

/// The history entry of `instance` reaching its status from `running`, as
/// the engine records it (for a running instance: its start).
fn reached(instance: &SagaInstance) -> Transition {
    if instance.status == SagaStatus::Running {
        return started(instance);
    }
    Transition {
        at: instance.updated_at,
        before: Some(Position {
            status: SagaStatus::Running,
            step: instance.step,
        }),
        ..started(instance)
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_an_outage_to_ride_out() {
    // A failover's demoted primary answers writes with 25006: the message
    // must go back to its queue, not to the dead letters.
    let db = TestDb::new().await;
    let store = db.store(1).await;
    sqlx::query("SET default_transaction_read_only = on")
        .execute(store.pool())
        .await
        .expect("set on the pool's one connection");
    let committed = start(&store, &sample_instance("orders", None)).await;
    match committed {
        Err(e @ StoreError::Unavailable(_)) => assert!(e.is_retryable()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// Commits `instance`'s next revision caused by `message`, emitting one
/// message, as the engine does; `expected` is the revision it expects.
async fn engine_transition(
    store: &saga_postgres::PostgresStore,
    instance: &SagaInstance,
    message: &MessageId,
) -> Result<SagaInstance, StoreError> {
    engine_transition_staging(store, instance, message, None).await
}

/// [`engine_transition`], with `staged` written in its statement.
async fn engine_transition_staging(
    store: &saga_postgres::PostgresStore,
    instance: &SagaInstance,
    message: &MessageId,
    staged: Option<StagedWrite>,
) -> Result<SagaInstance, StoreError> {
    let (next, transition) = caused_by(instance, message);
    let mut tx = store.begin().await?;
    tx.consume_at_commit("engine", message).await?;
    tx.update(&next, instance.revision).await?;
    tx.record(&transition).await?;
    tx.enqueue(Some(next.id), &messages(Some(next.id), 1, "d")).await?;
    if let Some(write) = staged {
        saga_postgres::stage(&mut *tx, write)?;
    }
    tx.commit().await.map(|()| next)
}

/// A store whose commits wait for one statement at a time, so concurrent
/// ones gather into batches.
async fn batching_store(db: &TestDb) -> saga_postgres::PostgresStore {
    let config = PostgresStoreConfig {
        commits_in_flight: 1,
        ..PostgresStoreConfig::default()
    };
    db.store_with(8, config).await
}

/// [`batching_store`], its connections' `setting` set to `value`.
async fn batching_store_where(db: &TestDb, setting: &str, value: &str) -> saga_postgres::PostgresStore {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(db.options.clone().options([(setting, value)]))
        .await
        .expect("pool");
    let config = PostgresStoreConfig {
        commits_in_flight: 1,
        ..PostgresStoreConfig::default()
    };
    saga_postgres::PostgresStore::with_config(pool, config)
}

/// The write a transition stages, by its index among those run at once.
type WriteOf = fn(usize) -> StagedWrite;

/// Runs one transition for each of `instances` at once, each staging
/// `write(index)`, and returns the store's batching afterwards.
async fn transitions_staging(
    store: &saga_postgres::PostgresStore,
    instances: &[SagaInstance],
    write: impl Fn(usize) -> StagedWrite,
) -> saga_postgres::CommitBatching {
    let mut transitions = tokio::task::JoinSet::new();
    for (index, instance) in instances.iter().enumerate() {
        let (store, instance, write) = (store.clone(), instance.clone(), write(index));
        transitions
            .spawn(async move { engine_transition_staging(&store, &instance, &MessageId::new(), Some(write)).await });
    }
    for committed in transitions.join_all().await {
        committed.expect("each transition commits");
    }
    store.commit_batching()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transitions_changing_one_application_row_each_change_it() {
    // PostgreSQL applies one of two changes a statement makes to a row and
    // drops the other silently: such transitions must not share one.
    let db = TestDb::new().await;
    let store = batching_store(&db).await;
    let pool = store.pool().clone();
    sqlx::query("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::query("INSERT INTO counters SELECT g, 0 FROM generate_series(1, 32) g")
        .execute(&pool)
        .await
        .expect("seed");
    let sagas = 32;
    let instances: Vec<SagaInstance> = (0..sagas).map(|_| sample_instance("orders", None)).collect();
    for instance in &instances {
        start(&store, instance).await.expect("start");
    }
    let mut instances = instances;
    const BUMP: &str = "UPDATE counters SET n = n + 1 WHERE id = $1";
    const BUMP_ROWS: &str = "UPDATE counters SET n = n + 1 WHERE id = ANY($1::int4[])";
    let variants: [(&str, WriteOf); 3] = [
        ("undeclared", |_| StagedWrite::new(BUMP).bind(1_i32)),
        ("undeclared, row-wise", |_| {
            StagedWrite::rows(BUMP_ROWS).column(vec![1_i32])
        }),
        ("declared", |_| {
            StagedWrite::new(BUMP).bind(1_i32).touching("counters/1")
        }),
    ];
    for (round, (name, write)) in variants.into_iter().enumerate() {
        transitions_staging(&store, &instances, write).await;
        for instance in &mut instances {
            instance.revision += 1;
        }
        let n = count(&pool, "SELECT n::bigint FROM counters WHERE id = 1").await;
        assert_eq!(
            n,
            sagas as i64 * (round as i64 + 1),
            "{name}: every change of the row applies"
        );
    }
    // Declared different rows: the transitions still share statements.
    let before = store.commit_batching().batched_transitions;
    let after = transitions_staging(&store, &instances, |index| {
        let id = i32::try_from(index + 1).expect("small");
        StagedWrite::new(BUMP).bind(id).touching(format!("counters/{id}"))
    })
    .await;
    let distinct = count(&pool, "SELECT count(*) FROM counters WHERE n = 1").await;
    assert_eq!(distinct, sagas as i64 - 1, "each other row changed once");
    assert!(
        after.batched_transitions > before,
        "declared apart, they share statements: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_statement_the_server_fails_for_its_state_fails_its_transitions_at_once() {
    let db = TestDb::new().await;
    let writable = db.store(2).await;
    let instances: Vec<SagaInstance> = (0..16).map(|_| sample_instance("orders", None)).collect();
    for instance in &instances {
        start(&writable, instance).await.expect("start");
    }
    // A demoted primary: every statement of the session is refused.
    let store = batching_store_where(&db, "default_transaction_read_only", "on").await;
    let mut transitions = tokio::task::JoinSet::new();
    for instance in &instances {
        let (store, instance) = (store.clone(), instance.clone());
        transitions.spawn(async move { engine_transition(&store, &instance, &MessageId::new()).await });
    }
    for committed in transitions.join_all().await {
        assert!(matches!(committed, Err(StoreError::Unavailable(_))), "{committed:?}");
    }
    assert_eq!(
        store.commit_batching().retried_alone,
        0,
        "no transition of a failed shared statement was tried again alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_on_one_transitions_row_fails_that_transition_only() {
    let db = TestDb::new().await;
    let store = batching_store_where(&db, "lock_timeout", "500ms").await;
    sqlx::query("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)")
        .execute(store.pool())
        .await
        .expect("create");
    sqlx::query("INSERT INTO counters SELECT g, 0 FROM generate_series(0, 16) g")
        .execute(store.pool())
        .await
        .expect("rows");
    let instances: Vec<SagaInstance> = (0..17).map(|_| sample_instance("orders", None)).collect();
    for instance in &instances {
        start(&store, instance).await.expect("start");
    }
    // An operator's open transaction holds counter 0's row throughout, and
    // another counter 16's for a moment.
    let operators = db.pool(2).await;
    let lock = async |id: i32| {
        let mut operator = operators.acquire().await.expect("a connection");
        sqlx::query("BEGIN").execute(&mut *operator).await.expect("begin");
        sqlx::query("SELECT n FROM counters WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *operator)
            .await
            .expect("locked");
        operator
    };
    let mut held = lock(0).await;
    let mut moment = lock(16).await;
    let transition = |index: usize| {
        let (store, instance) = (store.clone(), instances[index].clone());
        let id = i32::try_from(index).expect("small");
        let write = StagedWrite::new("UPDATE counters SET n = n + 1 WHERE id = $1")
            .bind(id)
            .touching(format!("counters/{id}"));
        async move {
            let committed = engine_transition_staging(&store, &instance, &MessageId::new(), Some(write)).await;
            (id, committed)
        }
    };
    // Counter 16's transition holds the one statement in flight while the
    // others arrive, so they share the next, counter 0's among them.
    let mut transitions = tokio::task::JoinSet::new();
    transitions.spawn(transition(16));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for index in 0..16 {
        transitions.spawn(transition(index));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqlx::query("ROLLBACK").execute(&mut *moment).await.expect("released");
    for (id, committed) in transitions.join_all().await {
        if id == 0 {
            assert!(matches!(committed, Err(StoreError::Unavailable(_))), "{committed:?}");
        } else {
            assert!(
                committed.is_ok(),
                "counter {id}'s transition waits for no lock: {committed:?}"
            );
        }
    }
    sqlx::query("ROLLBACK").execute(&mut *held).await.expect("released");
    let counted = count(store.pool(), "SELECT count(*) FROM counters WHERE n = 1").await;
    assert_eq!(counted, 16, "every transition but the locked one's wrote its row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transitions_share_statements_and_each_is_decided_as_alone() {
    let db = TestDb::new().await;
    let store = batching_store(&db).await;
    let pool = store.pool().clone();
    let sagas = 40;
    let instances: Vec<SagaInstance> = (0..sagas).map(|_| sample_instance("orders", None)).collect();

    // Starts, one of them twice (not the first, which likely commits alone,
    // so both copies share a statement): exactly one AlreadyExists.
    let mut starts = tokio::task::JoinSet::new();
    for instance in instances.iter().chain(instances.get(sagas / 2)) {
        let (store, instance) = (store.clone(), instance.clone());
        starts.spawn(async move { start(&store, &instance).await });
    }
    let started = starts.join_all().await;
    assert_eq!(started.iter().filter(|r| r.is_ok()).count(), sagas);
    assert!(
        matches!(
            started.iter().find(|r| r.is_err()),
            Some(Err(StoreError::AlreadyExists { .. }))
        ),
        "the second start of one saga is AlreadyExists: {started:?}"
    );
    let batching = store.commit_batching();
    assert!(
        batching.retried_alone <= 1,
        "only the second start runs alone: {batching:?}"
    );

    // One saga's message consumed before: its redelivery is a duplicate.
    let consumed = MessageId::new();
    let first = engine_transition(&store, &instances[0], &consumed)
        .await
        .expect("a transition commits");
    let mut current = instances.clone();
    current[0] = first;

    // A reply per saga, two for the first five (same revision expected):
    // one of each pair wins. And the redelivered message.
    let mut replies = tokio::task::JoinSet::new();
    for (i, instance) in current.iter().enumerate() {
        let copies = if i < 5 { 2 } else { 1 };
        for _ in 0..copies {
            let (store, instance) = (store.clone(), instance.clone());
            replies.spawn(async move { engine_transition(&store, &instance, &MessageId::new()).await });
        }
    }
    {
        let (store, instance) = (store.clone(), current[0].clone());
        let consumed = consumed.clone();
        replies.spawn(async move { engine_transition(&store, &instance, &consumed).await });
    }
    let decided = replies.join_all().await;
    let won = decided.iter().filter(|r| r.is_ok()).count();
    let conflicts = decided
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict { .. })))
        .count();
    let duplicates = decided
        .iter()
        .filter(|r| matches!(r, Err(StoreError::ConsumedConcurrently { .. })))
        .count();
    // The redelivery and saga 0's two replies compete for one revision.
    assert_eq!(won, sagas, "one reply per saga wins: {decided:?}");
    assert_eq!(conflicts + duplicates, 6, "{decided:?}");
    assert!(duplicates <= 1, "only the redelivery can be a duplicate: {decided:?}");

    for instance in &current {
        let loaded = store.load(instance.id).await.expect("load").expect("instance");
        assert_eq!(loaded.revision, instance.revision + 1, "one transition each");
    }
    let history = count(&pool, "SELECT count(*) FROM saga_history").await;
    let outbox = count(&pool, "SELECT count(*) FROM saga_outbox").await;
    assert_eq!(
        history,
        (sagas + 1 + sagas) as i64,
        "starts, the first transition, the winners"
    );
    assert_eq!(outbox, history, "one message per recorded transition");
    let consumptions = count(
        &pool,
        "SELECT count(DISTINCT message_id) FROM saga_history WHERE message_id IS NOT NULL",
    )
    .await;
    assert_eq!(consumptions, (1 + sagas) as i64);

    // A round with no revision conflicts, one reply per saga but saga 0's,
    // which gets the consumed message again at its current revision (as
    // after a crash between commit and ack). The redelivery is left out of
    // the shared statements (at most it is retried alone); everything else
    // shares them.
    let before = store.commit_batching();
    let mut latest = Vec::with_capacity(sagas);
    for instance in &current {
        latest.push(store.load(instance.id).await.expect("load").expect("instance"));
    }
    let mut round = tokio::task::JoinSet::new();
    for (i, instance) in latest.into_iter().enumerate().rev() {
        let store = store.clone();
        let message = if i == 0 { consumed.clone() } else { MessageId::new() };
        round.spawn(async move { (i, engine_transition(&store, &instance, &message).await) });
    }
    for (i, result) in round.join_all().await {
        match i {
            0 => assert!(
                matches!(result, Err(StoreError::ConsumedConcurrently { .. })),
                "the redelivery is a duplicate: {result:?}"
            ),
            _ => assert!(result.is_ok(), "no conflict, it commits: {result:?}"),
        }
    }
    let after = store.commit_batching();
    let shared = after.shared_statements - before.shared_statements;
    let batched = after.batched_transitions - before.batched_transitions;
    assert!(
        shared > 0 && batched >= 2 * shared,
        "concurrent transitions shared statements: {before:?} -> {after:?}"
    );
    assert!(
        after.retried_alone - before.retried_alone <= 1,
        "only the redelivery runs alone: {before:?} -> {after:?}"
    );
}

/// With a linger, while transitions arrive densely, a statement that would
/// commit one waits for another to join it, and goes as soon as one has;
/// one that nobody joins commits once the linger is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_transition_lingers_for_others_to_share_its_statement() {
    let db = TestDb::new().await;
    // Far longer than a commit takes, even on a busy machine.
    let linger = Duration::from_secs(3);
    let config = PostgresStoreConfig {
        commits_in_flight: 1,
        commit_linger: linger,
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(8, config).await;
    // Arrivals to judge by: a burst, microseconds apart.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (store, instance) = (store.clone(), sample_instance("orders", None));
        burst.spawn(async move { start(&store, &instance).await });
    }
    for started in burst.join_all().await {
        started.expect("a start of the burst");
    }
    let before = store.commit_batching();

    let (first, second) = (sample_instance("orders", None), sample_instance("orders", None));
    let began = Instant::now();
    let first_start = {
        let store = store.clone();
        tokio::spawn(async move { start(&store, &first).await })
    };
    // Well inside the first one's linger.
    let apart = Duration::from_millis(100);
    tokio::time::sleep(apart).await;
    start(&store, &second).await.expect("the second start");
    first_start.await.expect("no panic").expect("the first start");
    let waited = began.elapsed();
    assert!(
        waited >= apart && waited < linger,
        "the second's arrival ended the first's linger: {waited:?}"
    );
    let after = store.commit_batching();
    assert_eq!(
        (
            after.shared_statements - before.shared_statements,
            after.batched_transitions - before.batched_transitions
        ),
        (1, 2),
        "the second joined the first's statement: {before:?} then {after:?}"
    );

    let began = Instant::now();
    start(&store, &sample_instance("orders", None))
        .await
        .expect("a lone start");
    assert!(began.elapsed() >= linger, "it waited for company first");
    assert_eq!(store.commit_batching(), after, "and then committed alone");
    let history = count(store.pool(), "SELECT count(*) FROM saga_history").await;
    assert_eq!(history, 4 + 3, "all started");
}

/// When the database cannot be reached, a shared statement's transitions
/// all fail at once as `Unavailable`: none runs again alone, each waiting
/// out its own connection attempt while later commits queue behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_sharing_a_statement_all_fail_at_once_when_the_database_is_out_of_reach() {
    // A loopback port nothing listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port();
    let options = sqlx::postgres::PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username("postgres");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options);
    let config = PostgresStoreConfig {
        commits_in_flight: 1,
        ..PostgresStoreConfig::default()
    };
    let store = saga_postgres::PostgresStore::with_config(pool, config);

    // The first commit's statement waits out the acquire timeout; the
    // others gather behind it into one shared statement.
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (store, instance) = (store.clone(), sample_instance("orders", None));
        starts.spawn(async move { start(&store, &instance).await });
    }
    let failed = starts.join_all().await;
    assert!(
        failed.iter().all(|r| matches!(r, Err(StoreError::Unavailable(_)))),
        "every commit is Unavailable: {failed:?}"
    );
    for error in failed.iter().filter_map(|r| r.as_ref().err()) {
        let text = error.to_string();
        assert_eq!(text.matches("unavailable").count(), 1, "said once: {text}");
    }
    let batching = store.commit_batching();
    assert_eq!(batching.retried_alone, 0, "no transition ran again alone: {batching:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_consumed_by_concurrent_transitions_of_many_sagas_takes_effect_once() {
    let db = TestDb::new().await;
    let store = batching_store(&db).await;
    let instances: Vec<SagaInstance> = (0..12).map(|_| sample_instance("orders", None)).collect();
    for instance in &instances {
        let mut tx = store.begin().await.expect("begin");
        tx.insert(instance).await.expect("insert");
        tx.commit().await.expect("commit");
    }
    // A shared statement carrying two of them fails on the consumption's
    // unique key as a whole; each transition then runs alone.
    let message = MessageId::new();
    let mut replies = tokio::task::JoinSet::new();
    for instance in instances {
        let (store, message) = (store.clone(), message.clone());
        replies.spawn(async move { engine_transition(&store, &instance, &message).await });
    }
    let decided = replies.join_all().await;
    assert_eq!(decided.iter().filter(|r| r.is_ok()).count(), 1, "{decided:?}");
    assert!(
        decided
            .iter()
            .all(|r| r.is_ok() || matches!(r, Err(StoreError::ConsumedConcurrently { .. }))),
        "{decided:?}"
    );
    let pool = store.pool();
    assert_eq!(count(pool, "SELECT count(*) FROM saga_outbox").await, 1, "one effect");
    assert_eq!(
        count(pool, "SELECT count(*) FROM saga_instances WHERE revision > 1").await,
        1
    );
}

/// Creates the application tables the staged-write tests write.
async fn app_tables(pool: &sqlx::PgPool) {
    for sql in [
        "CREATE TABLE app_orders (id uuid PRIMARY KEY, status text NOT NULL)",
        "CREATE TABLE app_items (order_id uuid NOT NULL REFERENCES app_orders (id), position int NOT NULL, \
         product text NOT NULL, PRIMARY KEY (order_id, position))",
    ] {
        sqlx::query(sql).execute(pool).await.expect("application table");
    }
}

/// An order row and its items, staged.
fn stage_order(tx: &mut dyn saga_core::Transaction, id: uuid::Uuid, products: &[&str]) {
    saga_postgres::stage(
        tx,
        StagedWrite::new("INSERT INTO app_orders (id, status) VALUES ($1, 'PENDING')").bind(id),
    )
    .expect("a PostgreSQL transaction");
    saga_postgres::stage(
        tx,
        StagedWrite::new(
            "INSERT INTO app_items (order_id, position, product) \
             SELECT $1, p.n, p.product FROM UNNEST($2::text[]) WITH ORDINALITY AS p(product, n)",
        )
        .bind(id)
        .bind(products.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()),
    )
    .expect("a PostgreSQL transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_writes_commit_in_the_transition_s_statement_or_not_at_all() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let pool = store.pool().clone();
    app_tables(&pool).await;

    // Started with an order and two items, in one statement.
    let instance = sample_instance("orders", None);
    let order = *instance.id.as_uuid();
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&instance).await.expect("insert");
    stage_order(&mut *tx, order, &["apple", "book"]);
    tx.commit().await.expect("the start commits");
    assert_eq!(count(&pool, "SELECT count(*) FROM app_orders").await, 1);
    assert_eq!(count(&pool, "SELECT count(*) FROM app_items").await, 2);

    // A reply that moves the saga also confirms the order.
    let confirm = |id: uuid::Uuid| {
        StagedWrite::new("UPDATE app_orders SET status = $2 WHERE id = $1")
            .bind(id)
            .bind("CONFIRMED".to_owned())
    };
    let reply = MessageId::new();
    let (next, transition) = caused_by(&instance, &reply);
    let mut tx = store.begin().await.expect("begin");
    tx.consume_at_commit("engine", &reply).await.expect("consume");
    tx.update(&next, instance.revision).await.expect("update");
    tx.record(&transition).await.expect("record");
    saga_postgres::stage(&mut *tx, confirm(order)).expect("stage");
    tx.commit().await.expect("the reply commits");
    let status: String = sqlx::query_scalar("SELECT status FROM app_orders")
        .fetch_one(&pool)
        .await
        .expect("order");
    assert_eq!(status, "CONFIRMED");

    // A stale revision writes nothing, the staged write included.
    sqlx::query("UPDATE app_orders SET status = 'PENDING'")
        .execute(&pool)
        .await
        .expect("reset");
    let (stale, transition) = caused_by(&instance, &MessageId::new());
    let mut tx = store.begin().await.expect("begin");
    tx.update(&stale, instance.revision).await.expect("update");
    tx.record(&transition).await.expect("record");
    saga_postgres::stage(&mut *tx, confirm(order)).expect("stage");
    let result = tx.commit().await;
    assert!(
        matches!(result, Err(StoreError::Conflict { expected, .. }) if expected == instance.revision),
        "a stale revision is a conflict: {result:?}"
    );

    // So does a message consumed before.
    let (again, transition) = caused_by(&next, &reply);
    let mut tx = store.begin().await.expect("begin");
    tx.consume_at_commit("engine", &reply).await.expect("consume");
    tx.update(&again, next.revision).await.expect("update");
    tx.record(&transition).await.expect("record");
    saga_postgres::stage(&mut *tx, confirm(order)).expect("stage");
    let result = tx.commit().await;
    assert!(
        matches!(result, Err(StoreError::ConsumedConcurrently { .. })),
        "a duplicate: {result:?}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM app_orders")
        .fetch_one(&pool)
        .await
        .expect("order");
    assert_eq!(status, "PENDING", "neither aborted statement wrote the order");

    // A staged write that fails takes the saga's rows down with it.
    let other = sample_instance("orders", None);
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&other).await.expect("insert");
    tx.enqueue(Some(other.id), &messages(Some(other.id), 1, "d"))
        .await
        .expect("enqueue");
    stage_order(&mut *tx, order, &["twice"]);
    let result = tx.commit().await;
    assert!(result.is_err(), "the order exists already: {result:?}");
    assert!(store.load(other.id).await.expect("load").is_none(), "no instance");
    assert_eq!(count(&pool, "SELECT count(*) FROM saga_outbox").await, 0, "no message");
    assert_eq!(count(&pool, "SELECT count(*) FROM app_items").await, 2);

    // Beside SQL run on the transaction's connection.
    let third = sample_instance("orders", None);
    let third_order = *third.id.as_uuid();
    let mut tx = store.begin().await.expect("begin");
    tx.insert(&third).await.expect("insert");
    let conn = saga_postgres::connection(&mut *tx).await.expect("connection");
    sqlx::query("INSERT INTO app_orders (id, status) VALUES ($1, 'NEW')")
        .bind(third_order)
        .execute(&mut *conn)
        .await
        .expect("insert on the connection");
    saga_postgres::stage(&mut *tx, confirm(third_order)).expect("stage");
    tx.commit().await.expect("commits");
    let status: String = sqlx::query_scalar("SELECT status FROM app_orders WHERE id = $1")
        .bind(third_order)
        .fetch_one(&pool)
        .await
        .expect("order");
    assert_eq!(status, "CONFIRMED", "the staged write saw the connection's row");
}

/// The history entry of `instance`'s start.
fn started(instance: &SagaInstance) -> Transition {
    Transition {
        saga_id: instance.id,
        revision: instance.revision,
        at: instance.created_at,
        cause: Cause::Started,
        before: None,
        after: Position {
            status: instance.status,
            step: instance.step,
        },
        emitted: Vec::new(),
        note: None,
    }
}

/// How a test stages its application writes.
#[derive(Clone, Copy, Debug)]
enum Staging {
    /// `StagedWrite::new`: one CTE per write in a shared statement.
    Plain,
    /// `StagedWrite::rows`: the writes of one SQL merged in a shared statement.
    RowWise,
}

/// A saga started with one message, in a transaction of its own.
async fn start(store: &saga_postgres::PostgresStore, instance: &SagaInstance) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    tx.insert(instance).await?;
    tx.record(&started(instance)).await?;
    tx.enqueue(Some(instance.id), &messages(Some(instance.id), 1, "d"))
        .await?;
    tx.commit().await
}

/// A start with an order and its items staged.
async fn start_with_order(
    store: &saga_postgres::PostgresStore,
    instance: &SagaInstance,
    staging: Staging,
) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    tx.insert(instance).await?;
    tx.record(&started(instance)).await?;
    tx.enqueue(Some(instance.id), &messages(Some(instance.id), 1, "d"))
        .await?;
    let id = *instance.id.as_uuid();
    match staging {
        Staging::Plain => stage_order(&mut *tx, id, &["apple", "book"]),
        Staging::RowWise => {
            let order = StagedWrite::rows(
                "INSERT INTO app_orders (id, status) SELECT o.id, 'PENDING' FROM UNNEST($1::uuid[]) AS o(id)",
            )
            .column(vec![id]);
            let items = StagedWrite::rows(
                "INSERT INTO app_items (order_id, position, product) \
                 SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[])",
            )
            .column(vec![id; 2])
            .column(vec![1_i32, 2])
            .column(vec!["apple".to_owned(), "book".to_owned()]);
            saga_postgres::stage(&mut *tx, order)?;
            saga_postgres::stage(&mut *tx, items)?;
        }
    }
    tx.commit().await
}

/// An engine transition consuming `reply` that records the reply against
/// its order (staged).
async fn confirm_with_reply(
    store: &saga_postgres::PostgresStore,
    instance: &SagaInstance,
    reply: &MessageId,
    staging: Staging,
) -> Result<(), StoreError> {
    let (order, text) = (*instance.id.as_uuid(), reply.as_str().to_owned());
    let record = match staging {
        Staging::Plain => StagedWrite::new("INSERT INTO app_replies (order_id, reply) VALUES ($1, $2)")
            .bind(order)
            .bind(text),
        Staging::RowWise => {
            StagedWrite::rows("INSERT INTO app_replies (order_id, reply) SELECT * FROM UNNEST($1::uuid[], $2::text[])")
                .column(vec![order])
                .column(vec![text])
        }
    };
    engine_transition_staging(store, instance, reply, Some(record))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_with_staged_writes_share_statements_and_a_losing_one_writes_nothing() {
    transitions_share_statements_and_a_losing_one_writes_nothing(Staging::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_wise_staged_writes_merge_in_shared_statements_and_a_losing_one_writes_nothing() {
    transitions_share_statements_and_a_losing_one_writes_nothing(Staging::RowWise).await;
}

async fn transitions_share_statements_and_a_losing_one_writes_nothing(staging: Staging) {
    let db = TestDb::new().await;
    let store = batching_store(&db).await;
    let pool = store.pool().clone();
    app_tables(&pool).await;
    sqlx::query("CREATE TABLE app_replies (order_id uuid NOT NULL REFERENCES app_orders (id), reply text NOT NULL)")
        .execute(&pool)
        .await
        .expect("application table");
    let sagas = 24;
    let instances: Vec<SagaInstance> = (0..sagas).map(|_| sample_instance("orders", None)).collect();

    // Concurrent starts, one of them twice: its second start writes no order.
    let mut starts = tokio::task::JoinSet::new();
    for instance in instances.iter().chain(instances.first()) {
        let (store, instance) = (store.clone(), instance.clone());
        starts.spawn(async move { start_with_order(&store, &instance, staging).await });
    }
    let started = starts.join_all().await;
    assert_eq!(started.iter().filter(|r| r.is_ok()).count(), sagas, "{started:?}");
    assert!(
        started
            .iter()
            .any(|r| matches!(r, Err(StoreError::AlreadyExists { .. }))),
        "{started:?}"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM app_orders").await, sagas as i64);
    assert_eq!(count(&pool, "SELECT count(*) FROM app_items").await, 2 * sagas as i64);
    // Whether the starts shared statements is luck: the duplicate's
    // statement fails, and all it carried run again alone.
    let after_starts = store.commit_batching();

    // A reply per saga for all but the first six, at once: they share
    // statements (a statement with a member that is not written keeps
    // nothing, so the contended pairs below would make that a matter of luck).
    let mut replies = tokio::task::JoinSet::new();
    for instance in &instances[6..] {
        let (store, instance) = (store.clone(), instance.clone());
        replies.spawn(async move { confirm_with_reply(&store, &instance, &MessageId::new(), staging).await });
    }
    let decided = replies.join_all().await;
    assert!(decided.iter().all(Result::is_ok), "{decided:?}");
    let after_replies = store.commit_batching();
    assert!(
        after_replies.batched_transitions > after_starts.batched_transitions,
        "replies with staged writes shared statements: {after_replies:?}"
    );
    match staging {
        Staging::Plain => assert_eq!(after_replies.merged_writes, 0, "{after_replies:?}"),
        Staging::RowWise => assert!(
            after_replies.merged_writes > after_starts.merged_writes,
            "the replies' row-wise writes merged: {after_replies:?}"
        ),
    }

    // Two replies at the same revision for each of the first six: one of
    // each pair wins, and the loser's staged write is not kept.
    let mut replies = tokio::task::JoinSet::new();
    for instance in &instances[..6] {
        for _ in 0..2 {
            let (store, instance) = (store.clone(), instance.clone());
            replies.spawn(async move { confirm_with_reply(&store, &instance, &MessageId::new(), staging).await });
        }
    }
    let decided = replies.join_all().await;
    assert_eq!(decided.iter().filter(|r| r.is_ok()).count(), 6, "{decided:?}");
    assert_eq!(
        decided
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Conflict { .. })))
            .count(),
        6,
        "{decided:?}"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM (SELECT order_id FROM app_replies GROUP BY order_id HAVING count(*) = 1) o"
        )
        .await,
        sagas as i64,
        "one reply recorded per order"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM app_replies").await, sagas as i64);
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM app_replies r JOIN saga_history h ON h.message_id = r.reply"
        )
        .await,
        sagas as i64,
        "each recorded reply is the one its saga consumed"
    );
}

/// The hand-off check of shared statements: a saga's next message is handed
/// to the relay behind one marked sent, or one published and waiting to be
/// marked; behind one still unsent it is left to claims, and its statement
/// names that one, whose confirm then wakes the relay and lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_statements_hand_off_only_behind_a_sent_or_published_message() {
    let db = TestDb::new().await;
    let config = PostgresStoreConfig {
        commits_in_flight: 1,
        // Far longer than the test: nothing is marked in it.
        mark_delay: Duration::from_secs(30),
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(8, config).await;
    let pool = store.pool().clone();
    let lease = Duration::from_secs(60);
    assert!(
        store.claim(64, lease).await.expect("claim").is_empty(),
        "a relay is attached"
    );
    let instances: Vec<SagaInstance> = (0..18).map(|_| sample_instance("orders", None)).collect();
    keep_relay_attached(&store).await;
    let mut starts = tokio::task::JoinSet::new();
    for instance in &instances {
        let (store, instance) = (store.clone(), instance.clone());
        starts.spawn(async move { start(&store, &instance).await });
    }
    let started = starts.join_all().await;
    assert!(started.iter().all(Result::is_ok), "{started:?}");
    let first = store.claim(64, lease).await.expect("claim");
    assert_eq!(first.len(), instances.len(), "each start's message is handed over");
    let ids = |sagas: &[SagaInstance]| -> Vec<i64> {
        sagas
            .iter()
            .filter_map(|saga| first.iter().find(|e| e.saga == Some(saga.id)).map(|e| e.id))
            .collect()
    };

    // The first six marked sent (as another replica would have), the next
    // six published and waiting to be marked, the last six not yet sent.
    let sent = ids(&instances[..6]);
    assert_eq!(sent.len(), 6);
    sqlx::query("UPDATE saga_outbox SET sent_at = now(), claimed_until = NULL WHERE id = ANY($1)")
        .bind(&sent)
        .execute(&pool)
        .await
        .expect("marked");
    let published = ids(&instances[6..12]);
    assert_eq!(published.len(), 6);
    let marking = {
        let store = store.clone();
        tokio::spawn(async move { store.mark_sent(&published).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!marking.is_finished(), "marking waits for its delay");

    let reply_to_all = |sagas: &[SagaInstance]| {
        let mut replies = tokio::task::JoinSet::new();
        for instance in sagas {
            let (store, instance) = (store.clone(), instance.clone());
            replies.spawn(async move { engine_transition(&store, &instance, &MessageId::new()).await });
        }
        replies.join_all()
    };
    let before = store.commit_batching();
    keep_relay_attached(&store).await;
    let decided = reply_to_all(&instances[..12]).await;
    assert!(decided.iter().all(Result::is_ok), "{decided:?}");
    assert!(
        store.commit_batching().batched_transitions > before.batched_transitions,
        "the replies shared statements"
    );
    assert!(
        !marking.is_finished(),
        "the published ones were still waiting to be marked"
    );
    let before = store.commit_batching();
    let decided = reply_to_all(&instances[12..]).await;
    assert!(decided.iter().all(Result::is_ok), "{decided:?}");
    assert!(
        store.commit_batching().batched_transitions > before.batched_transitions,
        "the last replies shared statements too"
    );
    let handed_over = store.claim(64, lease).await.expect("claim");
    assert_eq!(handed_over.len(), 12, "the replies handed off are handed over");

    let newest: Vec<(uuid::Uuid, bool)> = sqlx::query_as(
        "SELECT DISTINCT ON (saga_id) saga_id, claimed_until IS NOT NULL FROM saga_outbox ORDER BY saga_id, id DESC",
    )
    .fetch_all(&pool)
    .await
    .expect("outbox readable");
    for (i, instance) in instances.iter().enumerate() {
        let handed = newest
            .iter()
            .find(|(saga, _)| saga == instance.id.as_uuid())
            .map(|(_, handed)| *handed);
        assert_eq!(
            handed,
            Some(i < 12),
            "saga {i}: handed off behind a sent or published message only"
        );
    }

    // The last six's first messages confirmed one by one: each confirm
    // wakes the relay, whose claim takes the reply left behind it (each
    // statement named what its reply waits for), none marked yet.
    let mut marking = vec![marking];
    for (i, instance) in instances.iter().enumerate().skip(12) {
        let [predecessor] = ids(std::slice::from_ref(instance))[..] else {
            panic!("saga {i}: no first message");
        };
        let (claimed, marked) = confirm_and_claim(&store, predecessor, &format!("saga {i}: its first message")).await;
        marking.push(marked);
        let sagas: Vec<SagaId> = claimed.iter().filter_map(|e| e.saga).collect();
        assert_eq!(
            sagas,
            [instance.id],
            "saga {i}: its reply, once what it follows is confirmed"
        );
    }
    assert!(marking.iter().all(|m| !m.is_finished()), "nothing was marked yet");
    for task in marking {
        task.abort();
    }
}

/// Turns autovacuum off for `saga_instances`: only the stores analyze it.
async fn instances_left_to_the_stores(pool: &sqlx::PgPool) {
    sqlx::query("ALTER TABLE saga_instances SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .expect("autovacuum off");
}

/// The rows `saga_instances`' statistics count (-1 before its first `ANALYZE`).
async fn instances_counted(pool: &sqlx::PgPool) -> f32 {
    sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'saga_instances'::regclass")
        .fetch_one(pool)
        .await
        .expect("pg_class readable")
}

/// A store analyzes its tables when it has committed `analyze_while_growing`
/// times if they outgrew their statistics, so plans cached while they were
/// empty are made again; with `None` it leaves that to autovacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_that_outgrow_their_statistics_are_analyzed_as_they_grow() {
    let db = TestDb::new().await;
    let unwatched = PostgresStoreConfig {
        analyze_while_growing: None,
        ..PostgresStoreConfig::default()
    };
    let idle = db.store_with(2, unwatched).await;
    let pool = idle.pool().clone();
    instances_left_to_the_stores(&pool).await;
    let counted = || instances_counted(&pool);
    assert!(counted().await < 0.0, "never analyzed yet");

    for _ in 0..30 {
        start(&idle, &sample_instance("orders", None)).await.expect("start");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        counted().await < 0.0,
        "a store told not to leaves the table to autovacuum"
    );

    let watched = PostgresStoreConfig {
        analyze_while_growing: Some(25),
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(2, watched).await;
    for _ in 0..25 {
        start(&store, &sample_instance("orders", None)).await.expect("start");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while counted().await < 55.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        counted().await,
        55.0,
        "analyzed at the 25th commit: all 55 rows counted"
    );
    // A light analysis: 55 distinct ids would give 55 histogram bounds at
    // the server's default target (100), 11 at the store's (10).
    let bounds: Option<i32> = sqlx::query_scalar(
        "SELECT array_length(histogram_bounds::text::text[], 1) FROM pg_stats \
         WHERE tablename = 'saga_instances' AND attname = 'id' AND schemaname = current_schema()",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_stats readable");
    assert_eq!(
        bounds,
        Some(11),
        "the growth analysis samples at a statistics target of 10"
    );
}

/// Once analyzed, a table is analyzed again only when it holds four times
/// the rows its statistics count: each `ANALYZE` makes every connection plan
/// again, and a table that grew by less keeps plans that fit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_is_analyzed_again_only_when_it_outgrew_its_statistics_fourfold() {
    let db = TestDb::new().await;
    let unwatched = PostgresStoreConfig {
        analyze_while_growing: None,
        ..PostgresStoreConfig::default()
    };
    let reader = db.store_with(1, unwatched.clone()).await;
    let pool = reader.pool().clone();
    instances_left_to_the_stores(&pool).await;
    let counted = || instances_counted(&pool);
    let fill = |n: usize| {
        let unwatched = unwatched.clone();
        let db = &db;
        async move {
            let filler = db.store_with(2, unwatched).await;
            for _ in 0..n {
                start(&filler, &sample_instance("orders", None)).await.expect("start");
            }
            // A backend reports its row counts to the statistics when it
            // exits (an idle one may wait ten seconds).
            filler.pool().close().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    fill(30).await;
    sqlx::query("ANALYZE saga_instances")
        .execute(&pool)
        .await
        .expect("analyze");
    assert_eq!(counted().await, 30.0);

    let watched = PostgresStoreConfig {
        analyze_while_growing: Some(5),
        ..PostgresStoreConfig::default()
    };
    let store = db.store_with(2, watched).await;
    // Three times the rows counted: the check at the 5th commit leaves it.
    fill(60).await;
    for _ in 0..5 {
        start(&store, &sample_instance("orders", None)).await.expect("start");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counted().await, 30.0, "grown threefold: not analyzed again");

    // Four times and more: the check at the 10th commit analyzes it.
    fill(30).await;
    for _ in 0..5 {
        start(&store, &sample_instance("orders", None)).await.expect("start");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while counted().await < 130.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted().await, 130.0, "grown fourfold: analyzed, all 130 rows counted");
}

/// A store runs its next statement on the connection it used last, not on
/// the pool's oldest idle one, so a backend stays warm; and once the store
/// is idle, it gives that connection back for the pool's other users.
///
/// On one thread: the kept connection goes back after 20 ms, and a second
/// thread could run that between a commit and the next transaction.
#[tokio::test]
async fn a_store_reuses_its_last_connection_and_gives_it_back_when_idle() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let pool = store.pool().clone();
    // Three idle connections in the pool, which hands out the oldest first.
    let mut opened = Vec::new();
    for _ in 0..3 {
        opened.push(pool.acquire().await.expect("acquire"));
    }
    drop(opened);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut backends = Vec::new();
    for n in 0..5 {
        let mut tx = store.begin_postgres();
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(tx.connection().await.expect("connection"))
            .await
            .expect("backend pid");
        backends.push(backend);
        let instance = sample_instance("orders", Some(&format!("warm-{n}")));
        use saga_core::Transaction as _;
        tx.insert(&instance).await.expect("insert");
        Box::new(tx).commit().await.expect("commit");
    }
    assert!(
        backends.windows(2).all(|pair| pair[0] == pair[1]),
        "one backend for consecutive transactions: {backends:?}"
    );

    // All four connections of the pool, the store's among them.
    let mut held = Vec::new();
    for n in 0..4 {
        let conn = tokio::time::timeout(Duration::from_secs(20), pool.acquire())
            .await
            .unwrap_or_else(|_| panic!("connection {n} given within 20 s"))
            .expect("acquire");
        held.push(conn);
    }
    assert_eq!(pool.size(), 4);
}

/// `saga_postgres_connections_taken_total{from}` tells an operator whether
/// the store's statements run on its kept connection or the pool's.
#[test]
fn a_store_counts_the_connections_it_takes_kept_and_from_the_pool() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let db = TestDb::new().await;
            let store = db.store(4).await;
            for n in 0..5 {
                let mut tx = store.begin_postgres();
                let instance = sample_instance("orders", Some(&format!("counted-{n}")));
                use saga_core::Transaction as _;
                tx.insert(&instance).await.expect("insert");
                Box::new(tx).commit().await.expect("commit");
            }
        });
    });
    // One snapshot: taking one resets the recorder's counters.
    let snapshot = snapshotter.snapshot().into_vec();
    let taken = |from: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                let key = key.key();
                key.name() == "saga_postgres_connections_taken_total"
                    && key.labels().any(|label| label.key() == "from" && label.value() == from)
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let (kept, pool) = (taken("kept"), taken("pool"));
    assert!(
        pool >= 1,
        "the first transaction's connection came from the pool: {pool}"
    );
    assert!(
        kept >= 4,
        "the next four ran on the kept connection: kept {kept}, pool {pool}"
    );
}

/// A kept connection the server closed fails one statement at most, as a
/// pooled one would, and is not kept again: the retry gets another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_server_closed_fails_once_and_is_replaced() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let backend_of_next_transaction = || async {
        let mut tx = store.begin_postgres();
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(tx.connection().await.expect("connection"))
            .await
            .expect("backend pid");
        use saga_core::Transaction as _;
        Box::new(tx).commit().await.expect("commit");
        backend
    };
    let kept = backend_of_next_transaction().await;
    let admin = db.pool(1).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(kept)
        .fetch_one(&admin)
        .await
        .expect("terminate");
    assert!(terminated, "backend {kept} terminated");

    let first = start(&store, &sample_instance("orders", Some("after-kill-1"))).await;
    assert!(
        matches!(first, Ok(()) | Err(StoreError::Unavailable(_))),
        "the dead connection's statement is retryable: {first:?}"
    );
    start(&store, &sample_instance("orders", Some("after-kill-2")))
        .await
        .expect("the next statement runs on a live connection");
    assert_ne!(backend_of_next_transaction().await, kept);
}

/// An inbox read that fails inside a transaction the application opened
/// leaves that transaction as it is: the commit fails, nothing of it is
/// written, and the connection is not handed on mid-transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_read_failing_in_an_open_transaction_fails_its_commit() {
    let db = TestDb::new().await;
    let store = store_with_orders_table(&db).await;
    let instance = sample_instance("orders", Some("aborted"));
    let mut tx = store.begin_postgres();
    use saga_core::Transaction as _;
    sqlx::query("INSERT INTO orders (id) VALUES ($1)")
        .bind(instance.id.as_uuid())
        .execute(tx.connection().await.expect("connection"))
        .await
        .expect("application write");
    // The application's next statement fails: PostgreSQL aborts the transaction.
    let failed = sqlx::query("SELECT 1 / 0")
        .execute(tx.connection().await.expect("connection"))
        .await;
    assert!(failed.is_err(), "division by zero fails");
    let read = tx.consume("participant", &MessageId::new()).await;
    assert!(
        read.is_err(),
        "the inbox read fails in the aborted transaction: {read:?}"
    );
    tx.insert(&instance).await.expect("insert");
    let committed = Box::new(tx).commit().await;
    assert!(
        committed.is_err(),
        "the commit of an aborted transaction fails: {committed:?}"
    );

    let pool = store.pool();
    assert_eq!(count(pool, "SELECT count(*) FROM orders").await, 0);
    assert_eq!(count(pool, "SELECT count(*) FROM saga_instances").await, 0);
}
