//! `InMemoryStore::purge`: an embedded service forgets what saga-postgres's
//! retention deletes, and nothing it still needs.

use std::time::Duration;

use saga_core::memory::{InMemoryStore, Purged};
use saga_core::testkit::store_contract::sample_instance;
use saga_core::{
    Cause, Clock, ManualClock, MessageId, Position, QueryStore, SagaInstance, SagaStatus, SagaStore, Timestamp,
    Transition,
};

const HOUR: Duration = Duration::from_secs(3600);

/// Commits `instance` with a transition caused by `message`, consumed by `consumer`.
async fn moved_by(store: &InMemoryStore, instance: &SagaInstance, consumer: &str, message: &MessageId) {
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.consume(consumer, message).await.expect("consume"), "not seen before");
    tx.insert(instance).await.expect("insert");
    tx.record(&Transition {
        saga_id: instance.id,
        revision: instance.revision,
        at: instance.updated_at,
        cause: Cause::Message {
            id: message.clone(),
            kind: "Reply".to_owned(),
        },
        before: None,
        after: Position {
            status: instance.status,
            step: instance.step,
        },
        emitted: Vec::new(),
        note: None,
    })
    .await
    .expect("record");
    tx.commit().await.expect("commit");
}

/// Whether `message` would still be taken for a duplicate by `consumer`.
async fn known(store: &InMemoryStore, consumer: &str, message: &MessageId) -> bool {
    let mut tx = store.begin().await.expect("begin");
    !tx.consume(consumer, message).await.expect("consume")
}

/// Commits a message consumed by `consumer` that changed no saga (a participant's command).
async fn consumed_alone(store: &InMemoryStore, consumer: &str) -> MessageId {
    let message = MessageId::new();
    let mut tx = store.begin().await.expect("begin");
    assert!(tx.consume(consumer, &message).await.expect("consume"));
    tx.commit().await.expect("commit");
    message
}

#[tokio::test]
async fn purge_forgets_old_consumed_ids_and_old_finished_sagas_and_nothing_else() {
    let start = Timestamp::from_millis(1_700_000_000_000);
    let clock = ManualClock::new(start);
    let store = InMemoryStore::with_clock(clock.clone());
    let mut finished = sample_instance("orders", Some("done"));
    finished.status = SagaStatus::Completed;
    finished.updated_at = start;
    let mut running = sample_instance("orders", Some("open"));
    running.updated_at = start;
    let (finishing, moving) = (MessageId::new(), MessageId::new());
    moved_by(&store, &finished, "engine", &finishing).await;
    moved_by(&store, &running, "engine", &moving).await;
    let old_command = consumed_alone(&store, "stock").await;

    assert_eq!(store.purge(HOUR, Some(HOUR)), Purged::default(), "nothing is old yet");

    clock.advance(2 * HOUR);
    let new_command = consumed_alone(&store, "stock").await;
    assert_eq!(
        store.purge(HOUR, None),
        Purged { inbox: 1, instances: 0 },
        "only the command that moved no saga; the finished saga is kept when not asked"
    );
    assert!(
        !known(&store, "stock", &old_command).await,
        "an old command is forgotten"
    );
    assert!(
        known(&store, "stock", &new_command).await,
        "a recent one is still a duplicate"
    );
    assert!(known(&store, "engine", &finishing).await, "it moved a saga still held");

    assert_eq!(store.purge(HOUR, Some(HOUR)), Purged { inbox: 1, instances: 1 });
    assert_eq!(store.load(finished.id).await.expect("load"), None);
    assert_eq!(store.find_by_key("orders", "done").await.expect("find"), None);
    assert!(store.history(finished.id).await.expect("history").is_empty());
    assert!(
        !known(&store, "engine", &finishing).await,
        "its saga gone, the old message that finished it is forgotten too"
    );

    assert_eq!(
        store.load(running.id).await.expect("load"),
        Some(running.clone()),
        "running: kept"
    );
    assert_eq!(
        store.find_by_key("orders", "open").await.expect("find"),
        Some(running.id)
    );
    assert_eq!(store.history(running.id).await.expect("history").len(), 1);
    assert!(known(&store, "engine", &moving).await, "it moved a saga still held");

    let mut again = sample_instance("orders", Some("done"));
    again.updated_at = clock.now();
    moved_by(&store, &again, "engine", &MessageId::new()).await;
    assert_eq!(
        store.find_by_key("orders", "done").await.expect("find"),
        Some(again.id),
        "the key of a forgotten saga is free"
    );
}
