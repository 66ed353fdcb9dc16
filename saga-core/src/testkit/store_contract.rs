//! The [`Store`] contract. Every backend runs [`run_all`] with a factory of
//! fresh, empty stores; each case panics with a message saying what broke.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::id::{MessageId, SagaId};
use crate::instance::{Cause, Position, SagaInstance, SagaStatus, Transition};
use crate::message::Message;
use crate::store::{InstanceCursor, InstanceFilter, OutboxEntry, Store, StoreError, UnsentFilter};
use crate::summary::{MinuteOutcomes, SummaryQuery};

/// Runs every case, each on a fresh store from `fresh`.
pub async fn run_all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    inserted_instance_loads_back(fresh().await).await;
    ids_and_keys_are_unique(fresh().await).await;
    stale_update_conflicts(fresh().await).await;
    dropped_transaction_leaves_nothing(fresh().await).await;
    inbox_deduplicates(fresh().await).await;
    consumption_checked_at_commit_writes_nothing_for_a_duplicate(fresh().await).await;
    concurrent_consumers_of_one_message_commit_once(fresh().await).await;
    concurrent_updates_apply_once(fresh().await).await;
    outbox_keeps_order_and_fields(fresh().await).await;
    outbox_claims_are_exclusive_until_released_or_expired(fresh().await).await;
    a_sagas_later_message_waits_while_an_earlier_one_is_claimed(fresh().await).await;
    unsent_messages_are_listed_oldest_first(fresh().await).await;
    an_unsent_message_given_up_no_longer_holds_its_saga_back(fresh().await).await;
    deadlines_come_due_in_order(fresh().await).await;
    history_and_listing(fresh().await).await;
    listing_finds_stuck_and_old_instances_and_pages(fresh().await).await;
    summary_counts_outcomes_and_lists_recent_and_stuck(fresh().await).await;
}

/// A running instance with `key`, at revision 1.
pub fn sample_instance(definition: &str, key: Option<&str>) -> SagaInstance {
    let now = Timestamp::from_millis(1_700_000_000_000);
    SagaInstance {
        id: SagaId::new(),
        definition: definition.to_owned(),
        definition_version: 1,
        key: key.map(str::to_owned),
        status: SagaStatus::Running,
        step: 0,
        attempt: 0,
        awaiting: None,
        deadline: None,
        failure: None,
        data: r#"{"n":1}"#.to_owned(),
        data_version: 1,
        revision: 1,
        created_at: now,
        updated_at: now,
    }
}

fn transition(instance: &SagaInstance, note: &str) -> Transition {
    Transition {
        saga_id: instance.id,
        revision: instance.revision,
        at: instance.updated_at,
        cause: Cause::Started,
        before: None,
        after: Position {
            status: instance.status,
            step: instance.step,
        },
        emitted: vec![(
            MessageId::derived(instance.id, instance.revision, 0),
            "Emitted".to_owned(),
        )],
        note: Some(note.to_owned()),
    }
}

async fn insert(store: &dyn Store, instance: &SagaInstance) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    tx.insert(instance).await?;
    tx.commit().await
}

async fn update(store: &dyn Store, instance: &SagaInstance, expected: u64) -> Result<(), StoreError> {
    let mut tx = store.begin().await?;
    tx.update(instance, expected).await?;
    tx.commit().await
}

fn must<T>(result: Result<T, StoreError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Insert, load, find by key.
pub async fn inserted_instance_loads_back(store: Arc<dyn Store>) {
    let mut instance = sample_instance("orders", Some("order-1"));
    instance.deadline = Some(Timestamp::from_millis(1_700_000_005_000));
    instance.failure = Some("a reason with 'quotes' and ünïcode".to_owned());
    instance.awaiting = Some(MessageId::new());
    must(insert(store.as_ref(), &instance).await, "insert");
    let loaded = must(store.load(instance.id).await, "load");
    assert_eq!(
        loaded.as_ref(),
        Some(&instance),
        "a loaded instance must equal the inserted one"
    );
    let found = must(store.find_by_key("orders", "order-1").await, "find_by_key");
    assert_eq!(
        found,
        Some(instance.id),
        "find_by_key must find the instance by its key"
    );
    assert_eq!(
        must(store.find_by_key("other", "order-1").await, "find_by_key"),
        None,
        "keys are per definition"
    );
    assert_eq!(
        must(store.load(SagaId::new()).await, "load"),
        None,
        "an unknown id loads nothing"
    );
}

/// A second insert with the same id, or the same key under the same definition, fails.
pub async fn ids_and_keys_are_unique(store: Arc<dyn Store>) {
    let first = sample_instance("orders", Some("k"));
    must(insert(store.as_ref(), &first).await, "insert");
    let same_id = SagaInstance {
        key: Some("other".into()),
        ..first.clone()
    };
    assert!(
        matches!(
            insert(store.as_ref(), &same_id).await,
            Err(StoreError::AlreadyExists { .. })
        ),
        "a duplicate id must be AlreadyExists"
    );
    let same_key = sample_instance("orders", Some("k"));
    assert!(
        matches!(
            insert(store.as_ref(), &same_key).await,
            Err(StoreError::AlreadyExists { .. })
        ),
        "a duplicate key under one definition must be AlreadyExists"
    );
    let other_definition = sample_instance("payments", Some("k"));
    must(
        insert(store.as_ref(), &other_definition).await,
        "the same key under another definition",
    );
}

/// An update with a stale revision is a conflict and changes nothing.
pub async fn stale_update_conflicts(store: Arc<dyn Store>) {
    let instance = sample_instance("orders", None);
    must(insert(store.as_ref(), &instance).await, "insert");
    let mut next = instance.clone();
    next.revision = 2;
    next.step = 1;
    must(update(store.as_ref(), &next, 1).await, "update at the right revision");
    let mut stale = instance.clone();
    stale.revision = 2;
    stale.step = 7;
    match update(store.as_ref(), &stale, 1).await {
        Err(StoreError::Conflict { expected: 1, .. }) => {}
        other => panic!("a stale update must be a Conflict, got {other:?}"),
    }
    let loaded = must(store.load(instance.id).await, "load");
    assert_eq!(
        loaded.map(|i| i.step),
        Some(1),
        "a conflicting update must not overwrite"
    );
}

/// A transaction dropped before commit writes nothing.
pub async fn dropped_transaction_leaves_nothing(store: Arc<dyn Store>) {
    let instance = sample_instance("orders", Some("dropped"));
    let message_id = MessageId::new();
    {
        let mut tx = must(store.begin().await, "begin");
        assert!(must(tx.consume("c", &message_id).await, "consume"));
        must(tx.insert(&instance).await, "insert");
        must(tx.record(&transition(&instance, "x")).await, "record");
        must(
            tx.enqueue(Some(instance.id), &[Message::new("M", "d", b"{}".to_vec())])
                .await,
            "enqueue",
        );
    }
    assert_eq!(
        must(store.load(instance.id).await, "load"),
        None,
        "no instance after rollback"
    );
    assert_eq!(
        must(store.find_by_key("orders", "dropped").await, "find"),
        None,
        "no key after rollback"
    );
    assert!(
        must(store.claim(10, Duration::from_secs(30)).await, "claim").is_empty(),
        "no outbox rows after rollback"
    );
    assert!(
        must(store.history(instance.id).await, "history").is_empty(),
        "no history after rollback"
    );
    let mut tx = must(store.begin().await, "begin");
    assert!(
        must(tx.consume("c", &message_id).await, "consume"),
        "no inbox row after rollback"
    );
}

/// A consumed message is recognised as a duplicate, per consumer.
pub async fn inbox_deduplicates(store: Arc<dyn Store>) {
    let id = MessageId::new();
    let mut tx = must(store.begin().await, "begin");
    assert!(must(tx.consume("engine", &id).await, "consume"), "first consumption");
    must(tx.commit().await, "commit");
    let mut tx = must(store.begin().await, "begin");
    assert!(
        !must(tx.consume("engine", &id).await, "consume"),
        "the second consumption must report a duplicate"
    );
    drop(tx);
    let mut tx = must(store.begin().await, "begin");
    assert!(
        must(tx.consume("participant", &id).await, "consume"),
        "another consumer has its own inbox"
    );
    must(tx.commit().await, "commit");
}

/// A message consumed already makes a transaction that consumes it at
/// commit fail as a whole.
pub async fn consumption_checked_at_commit_writes_nothing_for_a_duplicate(store: Arc<dyn Store>) {
    let instance = sample_instance("orders", None);
    must(insert(store.as_ref(), &instance).await, "insert");
    let id = MessageId::new();
    let mut tx = must(store.begin().await, "begin");
    must(tx.consume_at_commit("engine", &id).await, "consume at commit");
    let mut next = instance.clone();
    next.revision = 2;
    must(tx.update(&next, 1).await, "update");
    must(tx.commit().await, "the first consumption commits");

    let mut tx = must(store.begin().await, "begin");
    let mut again = next.clone();
    again.revision = 3;
    again.step = 9;
    let outcome = async {
        tx.consume_at_commit("engine", &id).await?;
        tx.update(&again, 2).await?;
        tx.enqueue(Some(instance.id), &[Message::new("M", "d", b"{}".to_vec())])
            .await?;
        tx.commit().await
    }
    .await;
    assert!(
        matches!(outcome, Err(StoreError::ConsumedConcurrently { .. })),
        "a second consumption must fail as ConsumedConcurrently, got {outcome:?}"
    );
    let loaded = must(store.load(instance.id).await, "load");
    assert_eq!(
        loaded.map(|i| i.revision),
        Some(2),
        "the duplicate's update must not be written"
    );
    assert!(
        must(store.claim(10, Duration::from_secs(30)).await, "claim").is_empty(),
        "nor its messages"
    );
    let mut tx = must(store.begin().await, "begin");
    assert!(
        !must(tx.consume("engine", &id).await, "consume"),
        "the inbox holds the message"
    );
}

/// Two transactions consuming the same message: at most one commits having
/// consumed it.
pub async fn concurrent_consumers_of_one_message_commit_once(store: Arc<dyn Store>) {
    let id = MessageId::new();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let store = Arc::clone(&store);
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = store.begin().await?;
            if !tx.consume("engine", &id).await? {
                return Ok(false);
            }
            tx.commit().await.map(|()| true)
        }));
    }
    let mut committed = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(true)) => committed += 1,
            Ok(Ok(false)) => {}
            Ok(Err(e)) if e.is_conflict() => {}
            Ok(Err(e)) => panic!("unexpected error consuming concurrently: {e}"),
            Err(e) => panic!("task failed: {e}"),
        }
    }
    assert_eq!(committed, 1, "exactly one transaction may commit a consumption");
}

/// Many writers updating from the same revision: exactly one wins.
pub async fn concurrent_updates_apply_once(store: Arc<dyn Store>) {
    let instance = sample_instance("orders", None);
    must(insert(store.as_ref(), &instance).await, "insert");
    let mut tasks = Vec::new();
    for writer in 0..8u32 {
        let store = Arc::clone(&store);
        let mut next = instance.clone();
        next.revision = 2;
        next.step = writer + 1;
        tasks.push(tokio::spawn(async move { update(store.as_ref(), &next, 1).await }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => wins += 1,
            Ok(Err(e)) if e.is_conflict() => {}
            Ok(Err(e)) => panic!("unexpected error updating concurrently: {e}"),
            Err(e) => panic!("task failed: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one concurrent update may win");
    let loaded = must(store.load(instance.id).await, "load");
    assert_eq!(loaded.map(|i| i.revision), Some(2));
}

/// Outbox messages come back whole and in order.
pub async fn outbox_keeps_order_and_fields(store: Arc<dyn Store>) {
    let saga = SagaId::new();
    let messages: Vec<Message> = (0..5)
        .map(|i| {
            Message::new(format!("Kind{i}"), "dest", format!("{{\"i\":{i}}}").into_bytes())
                .with_correlation_id(saga.to_string())
                .with_header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        })
        .collect();
    let mut tx = must(store.begin().await, "begin");
    must(tx.enqueue(Some(saga), &messages[..3]).await, "enqueue");
    must(tx.enqueue(None, &messages[3..]).await, "enqueue");
    must(tx.commit().await, "commit");
    let claimed = must(store.claim(10, Duration::from_secs(30)).await, "claim");
    let got: Vec<&Message> = claimed.iter().map(|e| &e.message).collect();
    assert_eq!(
        got,
        messages.iter().collect::<Vec<_>>(),
        "messages must come back whole, in enqueue order"
    );
    assert!(claimed[..3].iter().all(|e| e.saga == Some(saga)), "the saga is kept");
    assert!(claimed[3..].iter().all(|e| e.saga.is_none()), "no saga is kept as none");
    assert!(claimed.windows(2).all(|w| w[0].id < w[1].id), "outbox ids increase");
}

/// Claimed messages are invisible to other claims until released, marked
/// sent (gone for good) or the lease runs out.
pub async fn outbox_claims_are_exclusive_until_released_or_expired(store: Arc<dyn Store>) {
    let mut tx = must(store.begin().await, "begin");
    let messages: Vec<Message> = (0..4).map(|i| Message::new("M", "d", vec![b'0' + i])).collect();
    must(tx.enqueue(None, &messages).await, "enqueue");
    must(tx.commit().await, "commit");
    let first = must(store.claim(2, Duration::from_secs(60)).await, "claim");
    assert_eq!(first.len(), 2, "a claim takes at most its limit");
    let second = must(store.claim(10, Duration::from_secs(60)).await, "claim");
    assert_eq!(second.len(), 2, "claimed messages are not claimed again");
    assert!(must(store.claim(10, Duration::from_secs(60)).await, "claim").is_empty());
    must(store.mark_sent(&[first[0].id]).await, "mark_sent");
    must(store.release(&[first[1].id]).await, "release");
    let third = must(store.claim(10, Duration::ZERO).await, "claim");
    assert_eq!(
        third.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![first[1].id],
        "a released message is claimable again; a sent one never"
    );
    // The zero lease has run out already.
    let fourth = must(store.claim(10, Duration::from_secs(60)).await, "claim");
    assert_eq!(
        fourth.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![first[1].id],
        "an expired lease frees the message"
    );
}

/// A saga's messages go out in order: while one is claimed (being
/// published, or refused and left leased) its saga's later messages are not
/// claimable, and other sagas' messages are. Marking or releasing ids that
/// are unknown or already sent changes nothing.
pub async fn a_sagas_later_message_waits_while_an_earlier_one_is_claimed(store: Arc<dyn Store>) {
    let (saga, other) = (SagaId::new(), SagaId::new());
    let mut tx = must(store.begin().await, "begin");
    let ours = [
        Message::new("First", "d", b"1".to_vec()),
        Message::new("Second", "d", b"2".to_vec()),
    ];
    must(tx.enqueue(Some(saga), &ours).await, "enqueue");
    must(tx.commit().await, "commit");
    let mut tx = must(store.begin().await, "begin");
    must(
        tx.enqueue(Some(other), &[Message::new("Other", "d", b"3".to_vec())])
            .await,
        "enqueue",
    );
    must(tx.commit().await, "commit");
    let kinds = |claimed: &[OutboxEntry]| claimed.iter().map(|e| e.message.kind.clone()).collect::<Vec<_>>();
    let lease = Duration::from_secs(600);

    let first = must(store.claim(1, lease).await, "claim");
    assert_eq!(kinds(&first), ["First"]);
    let behind = must(store.claim(10, lease).await, "claim");
    assert_eq!(kinds(&behind), ["Other"], "Second waits behind First; Other does not");
    must(store.release(&[first[0].id]).await, "release");
    let both = must(store.claim(10, lease).await, "claim");
    assert_eq!(
        kinds(&both),
        ["First", "Second"],
        "given back, First goes first, Second with it"
    );

    must(store.mark_sent(&[both[0].id]).await, "mark_sent");
    must(store.release(&[both[1].id]).await, "release");
    let unknown = both[1].id + 1_000_000;
    must(
        store.mark_sent(&[both[0].id, unknown]).await,
        "marking again, and an unknown id",
    );
    must(
        store.release(&[both[0].id, unknown]).await,
        "releasing a sent and an unknown id",
    );
    let last = must(store.claim(10, lease).await, "claim");
    assert_eq!(
        kinds(&last),
        ["Second"],
        "a sent message stays sent; Second goes once First is"
    );
}

/// The operator's view of the outbox: every message not marked sent,
/// oldest first, whole, with its lease; filtered by saga and age, bounded by
/// the limit; looking claims nothing.
pub async fn unsent_messages_are_listed_oldest_first(store: Arc<dyn Store>) {
    let (saga, other) = (SagaId::new(), SagaId::new());
    let old = Timestamp::now() - Duration::from_secs(3600);
    // Kind2 (another saga's) and Kind0 were created an hour ago.
    let messages: Vec<Message> = (0..5u8)
        .map(|i| {
            let message = Message::new(format!("Kind{i}"), "dest", vec![b'0' + i]).with_header("n", i.to_string());
            match i {
                0 | 2 => Message {
                    timestamp: old,
                    ..message
                },
                _ => message,
            }
        })
        .collect();
    let mut tx = must(store.begin().await, "begin");
    must(tx.enqueue(Some(saga), &messages[..2]).await, "enqueue");
    must(tx.enqueue(Some(other), &messages[2..3]).await, "enqueue");
    must(tx.enqueue(None, &messages[3..]).await, "enqueue");
    must(tx.commit().await, "commit");

    let all = must(store.unsent_messages(&UnsentFilter::default()).await, "unsent");
    let kinds = |listed: &[crate::store::UnsentMessage]| {
        listed.iter().map(|u| u.entry.message.kind.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        kinds(&all),
        ["Kind0", "Kind1", "Kind2", "Kind3", "Kind4"],
        "oldest first"
    );
    assert!(all.windows(2).all(|w| w[0].entry.id < w[1].entry.id), "in outbox order");
    assert_eq!(
        all.iter().map(|u| u.entry.saga).collect::<Vec<_>>(),
        [Some(saga), Some(saga), Some(other), None, None],
        "each message's saga, or none"
    );
    assert_eq!(
        all.iter().map(|u| &u.entry.message).collect::<Vec<_>>(),
        messages.iter().collect::<Vec<_>>(),
        "messages come back whole"
    );
    assert!(all.iter().all(|u| u.claimed_until.is_none()), "nothing is claimed yet");

    // Claimed: the lease shows; looking took nothing from the claim.
    let claimed = must(store.claim(2, Duration::from_secs(600)).await, "claim");
    assert_eq!(
        claimed.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![all[0].entry.id, all[1].entry.id],
        "listing claims nothing: the claim takes the two oldest"
    );
    must(store.mark_sent(&[claimed[0].id]).await, "mark_sent");
    let listed = must(store.unsent_messages(&UnsentFilter::default()).await, "unsent");
    assert_eq!(
        kinds(&listed),
        ["Kind1", "Kind2", "Kind3", "Kind4"],
        "a sent message is gone"
    );
    let leased = listed[0].claimed_until.expect("a claimed message shows its lease");
    assert!(
        leased > Timestamp::now() + Duration::from_secs(300),
        "the lease runs out about 600 s from now, found {leased:?}"
    );
    assert!(listed[1].claimed_until.is_none(), "an unclaimed message has no lease");
    // Given back, it has none; claimed for no time, its lease shows, past.
    must(store.release(&[claimed[1].id]).await, "release");
    let listed = must(store.unsent_messages(&UnsentFilter::default()).await, "unsent");
    assert_eq!(listed[0].claimed_until, None, "a released message has no lease");
    let again = must(store.claim(1, Duration::ZERO).await, "claim");
    assert_eq!(again.iter().map(|e| e.id).collect::<Vec<_>>(), vec![claimed[1].id]);
    let listed = must(store.unsent_messages(&UnsentFilter::default()).await, "unsent");
    let ended = listed[0].claimed_until.expect("an ended lease still shows");
    assert!(
        ended <= Timestamp::now() + Duration::from_secs(1),
        "an ended lease is in the past, found {ended:?}"
    );

    let of_saga = must(
        store
            .unsent_messages(&UnsentFilter {
                saga: Some(saga),
                ..UnsentFilter::default()
            })
            .await,
        "unsent",
    );
    assert_eq!(kinds(&of_saga), ["Kind1"], "only the saga's own");
    let old_ones = must(
        store
            .unsent_messages(&UnsentFilter {
                created_before: Some(old + Duration::from_secs(60)),
                ..UnsentFilter::default()
            })
            .await,
        "unsent",
    );
    assert_eq!(kinds(&old_ones), ["Kind2"], "only those created before the time");
    let first_two = must(
        store
            .unsent_messages(&UnsentFilter {
                limit: 2,
                ..UnsentFilter::default()
            })
            .await,
        "unsent",
    );
    assert_eq!(kinds(&first_two), ["Kind1", "Kind2"], "at most the limit, oldest first");
}

/// An operator gives up a message the broker refuses: returned whole,
/// given up only if the transaction commits, never twice, never a sent one,
/// only the saga's oldest unsent one; its saga's later message, which a
/// relay left leased behind it, can then be claimed at once.
pub async fn an_unsent_message_given_up_no_longer_holds_its_saga_back(store: Arc<dyn Store>) {
    let saga = SagaId::new();
    let messages = [
        Message::new("Refused", "nowhere", b"r".to_vec()).with_header("n", "1"),
        Message::new("Later", "dest", b"l".to_vec()),
    ];
    let mut tx = must(store.begin().await, "begin");
    must(tx.enqueue(Some(saga), &messages).await, "enqueue");
    must(tx.commit().await, "commit");
    // A round claimed both; the broker refused the first, so the round left
    // both leased.
    let refused = must(store.claim(2, Duration::from_secs(600)).await, "claim");
    assert_eq!(refused.len(), 2, "the claim takes both messages");
    assert!(must(store.claim(10, Duration::from_secs(600)).await, "claim").is_empty());

    let mut tx = must(store.begin().await, "begin");
    assert_eq!(
        must(tx.discard_unsent(refused[1].id).await, "discard"),
        None,
        "a message behind an unsent one of its saga cannot be given up: order would break"
    );
    let given_up = must(tx.discard_unsent(refused[0].id).await, "discard");
    assert_eq!(given_up.as_ref(), Some(&refused[0]), "the message comes back whole");
    drop(tx);
    let kinds =
        |listed: Vec<crate::store::UnsentMessage>| listed.into_iter().map(|u| u.entry.message.kind).collect::<Vec<_>>();
    assert_eq!(
        kinds(must(store.unsent_messages(&UnsentFilter::default()).await, "unsent")),
        ["Refused", "Later"],
        "a transaction dropped uncommitted gives nothing up"
    );

    let mut tx = must(store.begin().await, "begin");
    assert!(must(tx.discard_unsent(refused[0].id).await, "discard").is_some());
    assert_eq!(
        must(tx.discard_unsent(refused[0].id).await, "discard"),
        None,
        "a message is given up once"
    );
    must(tx.commit().await, "commit");
    assert_eq!(
        kinds(must(store.unsent_messages(&UnsentFilter::default()).await, "unsent")),
        ["Later"],
        "a message given up is no longer unsent"
    );
    let later = must(store.claim(10, Duration::from_secs(600)).await, "claim");
    assert_eq!(
        later.iter().map(|e| e.message.kind.as_str()).collect::<Vec<_>>(),
        ["Later"],
        "the later message's lease is given back, so it goes at once; the one given up never does"
    );

    must(store.mark_sent(&[later[0].id]).await, "mark_sent");
    let mut tx = must(store.begin().await, "begin");
    assert_eq!(
        must(tx.discard_unsent(later[0].id).await, "discard"),
        None,
        "a sent message cannot be given up"
    );
    assert_eq!(
        must(tx.discard_unsent(later[0].id + 1_000).await, "discard"),
        None,
        "nor one never written"
    );
    drop(tx);

    // Given up together, a saga's two leased messages; another saga's keeps
    // its lease.
    let (two, other) = (SagaId::new(), SagaId::new());
    let mut tx = must(store.begin().await, "begin");
    must(tx.enqueue(Some(two), &messages).await, "enqueue");
    must(
        tx.enqueue(Some(other), &[Message::new("Other", "dest", b"o".to_vec())])
            .await,
        "enqueue",
    );
    must(tx.commit().await, "commit");
    let held = must(store.claim(3, Duration::from_secs(600)).await, "claim");
    assert_eq!(held.len(), 3, "the claim takes all three");
    let mut tx = must(store.begin().await, "begin");
    assert!(must(tx.discard_unsent(held[0].id).await, "discard").is_some());
    assert!(
        must(tx.discard_unsent(held[1].id).await, "discard").is_some(),
        "behind one given up in the same transaction, a message can be given up"
    );
    must(tx.commit().await, "commit");
    assert_eq!(
        kinds(must(store.unsent_messages(&UnsentFilter::default()).await, "unsent")),
        ["Other"]
    );
    assert!(
        must(store.claim(10, Duration::from_secs(600)).await, "claim").is_empty(),
        "another saga's message keeps its lease"
    );
}

/// Due deadlines come earliest first, follow updates, and respect the limit.
pub async fn deadlines_come_due_in_order(store: Arc<dyn Store>) {
    let base = Timestamp::from_millis(1_700_000_000_000);
    let mut instances = Vec::new();
    for offset in [30u64, 10, 20, 40] {
        let mut instance = sample_instance("orders", None);
        instance.deadline = Some(base + Duration::from_secs(offset));
        must(insert(store.as_ref(), &instance).await, "insert");
        instances.push(instance);
    }
    let due = must(store.due(base + Duration::from_secs(30), 10).await, "due");
    let dues: Vec<Timestamp> = due.iter().map(|d| d.due).collect();
    assert_eq!(
        dues,
        vec![
            base + Duration::from_secs(10),
            base + Duration::from_secs(20),
            base + Duration::from_secs(30)
        ],
        "due deadlines, earliest first, none later than now"
    );
    assert_eq!(due[0].saga, instances[1].id);
    assert_eq!(
        must(store.due(base + Duration::from_secs(30), 2).await, "due").len(),
        2,
        "the limit holds"
    );
    let mut cleared = instances[1].clone();
    cleared.deadline = None;
    cleared.revision = 2;
    must(update(store.as_ref(), &cleared, 1).await, "update");
    let due = must(store.due(base + Duration::from_secs(30), 10).await, "due");
    assert_eq!(due.len(), 2, "a cleared deadline is no longer due");
    assert!(due.iter().all(|d| d.saga != cleared.id));
}

/// History comes back in order; listing filters and orders.
pub async fn history_and_listing(store: Arc<dyn Store>) {
    let mut a = sample_instance("orders", None);
    let mut b = sample_instance("orders", None);
    let c = sample_instance("payments", None);
    b.updated_at = a.updated_at + Duration::from_secs(5);
    for instance in [&a, &b, &c] {
        let mut tx = must(store.begin().await, "begin");
        must(tx.insert(instance).await, "insert");
        must(tx.record(&transition(instance, "started")).await, "record");
        must(tx.commit().await, "commit");
    }
    let mut next = a.clone();
    next.revision = 2;
    next.status = SagaStatus::Completed;
    next.updated_at = a.updated_at + Duration::from_secs(1);
    let mut tx = must(store.begin().await, "begin");
    must(tx.update(&next, 1).await, "update");
    must(tx.record(&transition(&next, "completed")).await, "record");
    must(tx.commit().await, "commit");
    a = next;
    let history = must(store.history(a.id).await, "history");
    assert_eq!(
        history.iter().map(|t| (t.revision, t.note.clone())).collect::<Vec<_>>(),
        vec![(1, Some("started".into())), (2, Some("completed".into()))],
        "history in commit order"
    );
    assert_eq!(
        history[0],
        transition(&sample_like(&a, 1), "started"),
        "a transition comes back whole"
    );
    let running = must(
        store
            .list(&InstanceFilter {
                definition: Some("orders".into()),
                statuses: vec![SagaStatus::Running],
                ..InstanceFilter::default()
            })
            .await,
        "list",
    );
    assert_eq!(
        running.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![b.id],
        "filter by definition and status"
    );
    let all = must(store.list(&InstanceFilter::default()).await, "list");
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].id, b.id, "most recently changed first");
}

/// Stuck means needing attention, or unfinished and unchanged since a time;
/// `created_before` filters by age; a cursor continues a listing without
/// repeating or skipping an instance, also among equal change times.
pub async fn listing_finds_stuck_and_old_instances_and_pages(store: Arc<dyn Store>) {
    let base = Timestamp::from_millis(1_700_000_000_000);
    let at = |secs: u64| base + Duration::from_secs(secs);
    let make = |status: SagaStatus, created: u64, updated: u64| SagaInstance {
        status,
        created_at: at(created),
        updated_at: at(updated),
        ..sample_instance("orders", None)
    };
    let old_running = make(SagaStatus::Running, 0, 10);
    let old_compensating = make(SagaStatus::Compensating, 0, 20);
    let fresh_running = make(SagaStatus::Running, 50, 100);
    let attention = make(SagaStatus::NeedsAttention, 50, 100);
    let old_completed = make(SagaStatus::Completed, 0, 10);
    let old_compensated = make(SagaStatus::Compensated, 0, 10);
    let all = [
        &old_running,
        &old_compensating,
        &fresh_running,
        &attention,
        &old_completed,
        &old_compensated,
    ];
    for instance in all {
        let mut tx = must(store.begin().await, "begin");
        must(tx.insert(instance).await, "insert");
        must(tx.commit().await, "commit");
    }
    let ids = |found: Vec<SagaInstance>| {
        let mut ids: Vec<SagaId> = found.iter().map(|i| i.id).collect();
        ids.sort();
        ids
    };
    let sorted = |mut expected: Vec<SagaId>| {
        expected.sort();
        expected
    };
    let stuck = must(
        store
            .list(&InstanceFilter {
                stuck_since: Some(at(60)),
                ..InstanceFilter::default()
            })
            .await,
        "list stuck",
    );
    assert_eq!(
        ids(stuck),
        sorted(vec![old_running.id, old_compensating.id, attention.id]),
        "stuck: unfinished and unchanged since the threshold, or needing attention whenever it changed"
    );
    let stuck_running = must(
        store
            .list(&InstanceFilter {
                stuck_since: Some(at(60)),
                statuses: vec![SagaStatus::Running],
                ..InstanceFilter::default()
            })
            .await,
        "list stuck running",
    );
    assert_eq!(ids(stuck_running), vec![old_running.id], "stuck combines with statuses");
    let old = must(
        store
            .list(&InstanceFilter {
                created_before: Some(at(10)),
                ..InstanceFilter::default()
            })
            .await,
        "list old",
    );
    assert_eq!(
        ids(old),
        sorted(vec![
            old_running.id,
            old_compensating.id,
            old_completed.id,
            old_compensated.id
        ]),
        "created_before filters by start time"
    );

    // Pages of two: every instance once, in listing order.
    let everything = must(store.list(&InstanceFilter::default()).await, "list all");
    let mut paged = Vec::new();
    let mut after = None;
    for _ in 0..all.len() {
        let page = must(
            store
                .list(&InstanceFilter {
                    after,
                    limit: 2,
                    ..InstanceFilter::default()
                })
                .await,
            "list a page",
        );
        let Some(last) = page.last() else { break };
        after = Some(InstanceCursor::of(last));
        paged.extend(page.iter().map(|i| i.id));
    }
    assert_eq!(
        paged,
        everything.iter().map(|i| i.id).collect::<Vec<_>>(),
        "paging with a cursor lists every instance once, in order"
    );
}

fn sample_like(instance: &SagaInstance, revision: u64) -> SagaInstance {
    SagaInstance {
        revision,
        status: SagaStatus::Running,
        updated_at: instance.created_at,
        ..instance.clone()
    }
}

/// The summary counts unfinished instances per status and outcomes per
/// minute (entries into a final or attention status, from `since` on), and
/// lists the most recently changed and the stuck instances, bounded by the
/// limit.
pub async fn summary_counts_outcomes_and_lists_recent_and_stuck(store: Arc<dyn Store>) {
    use SagaStatus::{Compensated, Compensating, Completed, NeedsAttention, Running};
    // A whole minute, so outcomes fall in the minutes `base` and `base + 60 s`.
    let base = Timestamp::from_millis(1_700_000_040_000);
    let at = |secs: i64| Timestamp::from_millis(base.as_millis() + secs * 1000);
    let store = store.as_ref();

    let running = start(store, Running, at(10)).await;
    let old_running = start(store, Running, at(0)).await;
    let compensating = advance(store, start(store, Running, at(1)).await, Compensating, at(2)).await;
    let attention = start(store, Running, at(3)).await;
    let attention = advance(store, attention, Compensating, at(4)).await;
    let attention = advance(store, attention, NeedsAttention, at(61)).await;
    // Still needing attention after a failed retry: not a new outcome.
    let attention = advance(store, attention, NeedsAttention, at(62)).await;
    let completed = advance(store, start(store, Running, at(5)).await, Completed, at(20)).await;
    let completed_later = advance(store, start(store, Running, at(30)).await, Completed, at(70)).await;
    let failed_at_once = start(store, Compensated, at(65)).await;
    let before_since = advance(store, start(store, Running, at(-120)).await, Completed, at(-60)).await;

    let query = SummaryQuery {
        since: base,
        stuck_since: at(5),
        limit: 0,
    };
    let summary = must(store.summary(&query).await, "summary");
    assert_eq!(
        summary.unfinished,
        vec![(Running, 2), (Compensating, 1), (NeedsAttention, 1)],
        "unfinished instances per status"
    );
    assert_eq!(
        summary.per_minute,
        vec![
            MinuteOutcomes {
                minute: base,
                completed: 1,
                compensated: 0,
                needs_attention: 0,
            },
            MinuteOutcomes {
                minute: at(60),
                completed: 1,
                compensated: 1,
                needs_attention: 1,
            },
        ],
        "outcomes per minute since {base:?}"
    );
    let ids = |instances: &[SagaInstance]| instances.iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&summary.recent),
        ids(&[
            completed_later.clone(),
            failed_at_once.clone(),
            attention.clone(),
            completed,
            running,
            compensating.clone(),
            old_running.clone(),
            before_since,
        ]),
        "every instance, most recently changed first"
    );
    assert_eq!(summary.recent[0], completed_later, "instances come back whole");
    assert_eq!(
        ids(&summary.stuck),
        ids(&[old_running.clone(), compensating.clone(), attention.clone()]),
        "stuck: needing attention, or unfinished and unchanged since {:?}; longest unchanged first",
        query.stuck_since
    );

    let bounded = must(store.summary(&SummaryQuery { limit: 2, ..query }).await, "summary");
    assert_eq!(
        ids(&bounded.recent),
        ids(&[completed_later, failed_at_once]),
        "recent, limited"
    );
    assert_eq!(ids(&bounded.stuck), ids(&[old_running, compensating]), "stuck, limited");
    assert_eq!(
        bounded.per_minute, summary.per_minute,
        "the limit bounds lists, not counts"
    );
    let later = must(store.summary(&SummaryQuery { since: at(61), ..query }).await, "summary");
    assert_eq!(
        later.per_minute,
        vec![MinuteOutcomes {
            minute: at(60),
            completed: 1,
            compensated: 1,
            needs_attention: 1,
        }],
        "outcomes before `since` are left out"
    );
}

/// Starts an instance in `status` at `at`, with its first transition, as the engine does.
async fn start(store: &dyn Store, status: SagaStatus, at: Timestamp) -> SagaInstance {
    let instance = SagaInstance {
        status,
        created_at: at,
        updated_at: at,
        ..sample_instance("orders", None)
    };
    let mut first = transition(&instance, "started");
    first.at = at;
    let mut tx = must(store.begin().await, "begin");
    must(tx.insert(&instance).await, "insert");
    must(tx.record(&first).await, "record");
    must(tx.commit().await, "commit");
    instance
}

/// Moves `instance` to `status` at `at`, recording the transition.
async fn advance(store: &dyn Store, instance: SagaInstance, status: SagaStatus, at: Timestamp) -> SagaInstance {
    let next = SagaInstance {
        status,
        revision: instance.revision + 1,
        updated_at: at,
        ..instance.clone()
    };
    let step = Transition {
        saga_id: next.id,
        revision: next.revision,
        at,
        cause: Cause::Deadline { due: at },
        before: Some(Position {
            status: instance.status,
            step: instance.step,
        }),
        after: Position {
            status,
            step: next.step,
        },
        emitted: Vec::new(),
        note: None,
    };
    let mut tx = must(store.begin().await, "begin");
    must(tx.update(&next, instance.revision).await, "update");
    must(tx.record(&step).await, "record");
    must(tx.commit().await, "commit");
    next
}
