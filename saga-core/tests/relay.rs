//! The relay's run loop with several rounds in flight, over the in-memory
//! store: every message published, each saga's in outbox order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::memory::InMemoryStore;
use saga_core::{CancellationToken, Message, Publisher, Relay, RelayConfig, SagaId, SagaStore, TransportError};

/// Records the order messages are published in; some confirm slowly, so
/// rounds overlap.
#[derive(Default)]
struct SlowPublisher {
    published: Mutex<Vec<(String, u32)>>,
}

#[async_trait]
impl Publisher for SlowPublisher {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        let saga = message.correlation_id.clone().unwrap_or_default();
        let seq: u32 = message.kind.parse().unwrap_or(u32::MAX);
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((saga, seq));
        // Every third message takes its time to confirm.
        if seq.is_multiple_of(3) {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_in_flight_keep_each_sagas_messages_in_order() {
    let store = InMemoryStore::new();
    let sagas: Vec<SagaId> = (0..6).map(|_| SagaId::new()).collect();
    // Interleaved, as concurrent sagas would commit them.
    for seq in 0..5u32 {
        for saga in &sagas {
            let mut tx = store.begin().await.expect("begin");
            let message = Message::new(seq.to_string(), "d", b"{}".to_vec()).with_correlation_id(saga.to_string());
            tx.enqueue(Some(*saga), &[message]).await.expect("enqueue");
            tx.commit().await.expect("commit");
        }
    }
    let publisher = Arc::new(SlowPublisher::default());
    let relay = Relay::new(
        Arc::new(store.clone()),
        publisher.clone(),
        RelayConfig {
            batch_size: 4,
            rounds_in_flight: 4,
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let expected = sagas.len() * 5;
    loop {
        let count = publisher
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if count >= expected || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the relay stops, finishing its rounds")
        .expect("the relay did not panic");

    let published = publisher
        .published
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    assert_eq!(published.len(), expected, "every message published once: {published:?}");
    let mut per_saga: HashMap<String, Vec<u32>> = HashMap::new();
    for (saga, seq) in published {
        per_saga.entry(saga).or_default().push(seq);
    }
    for (saga, seqs) in per_saga {
        assert_eq!(seqs, vec![0, 1, 2, 3, 4], "saga {saga} published out of order");
    }
}

/// The in-memory outbox, except that marking messages sent fails.
struct MarksFail(InMemoryStore);

#[async_trait]
impl saga_core::OutboxStore for MarksFail {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<saga_core::OutboxEntry>, saga_core::StoreError> {
        self.0.claim(limit, lease).await
    }
    async fn mark_sent(&self, _ids: &[saga_core::OutboxId]) -> Result<(), saga_core::StoreError> {
        Err(saga_core::StoreError::Unavailable("marking is down".into()))
    }
    async fn release(&self, ids: &[saga_core::OutboxId]) -> Result<(), saga_core::StoreError> {
        self.0.release(ids).await
    }
}

/// Refuses messages of kind `refused`.
struct Refuses;

#[async_trait]
impl Publisher for Refuses {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        if message.kind == "refused" {
            return Err(TransportError::Unavailable("the broker said no".into()));
        }
        Ok(())
    }
}

async fn enqueue(store: &InMemoryStore, kind: &str) {
    let saga = SagaId::new();
    let mut tx = store.begin().await.expect("begin");
    let message = Message::new(kind, "d", b"{}".to_vec()).with_correlation_id(saga.to_string());
    tx.enqueue(Some(saga), &[message]).await.expect("enqueue");
    tx.commit().await.expect("commit");
}

#[tokio::test]
async fn a_round_whose_marks_fail_still_gives_back_what_failed_to_publish() {
    use saga_core::OutboxStore;
    let store = InMemoryStore::new();
    enqueue(&store, "accepted").await;
    enqueue(&store, "refused").await;
    let relay = Relay::new(
        Arc::new(MarksFail(store.clone())),
        Arc::new(Refuses),
        RelayConfig::default(),
    );
    assert!(relay.run_once().await.is_err(), "marking failed");
    // The refused message is claimable at once, not after the lease.
    let again = store.claim(10, Duration::from_secs(60)).await.expect("claim");
    let kinds: Vec<&str> = again.iter().map(|e| e.message.kind.as_str()).collect();
    assert_eq!(kinds, ["refused"]);
}

#[tokio::test]
async fn a_relay_configured_to_claim_none_claims_one() {
    let store = InMemoryStore::new();
    enqueue(&store, "m").await;
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(Refuses),
        RelayConfig {
            batch_size: 0,
            ..RelayConfig::default()
        },
    );
    let round = relay.run_once().await.expect("round");
    assert_eq!((round.claimed, round.sent), (1, 1));
}

#[tokio::test]
async fn a_relay_configured_with_no_lease_takes_the_shortest_and_still_publishes() {
    let store = InMemoryStore::new();
    // Confirmed after 30 ms: within the shortest lease's budget, not within none.
    enqueue(&store, "3").await;
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(SlowPublisher::default()),
        RelayConfig {
            lease: Duration::ZERO,
            poll_interval: Duration::ZERO,
            ..RelayConfig::default()
        },
    );
    let round = relay.run_once().await.expect("round");
    assert_eq!((round.claimed, round.sent, round.failed), (1, 1, 0));
    assert!(saga_core::MIN_LEASE.mul_f64(0.75) > Duration::from_millis(30));
}

/// Counts what it publishes; while `held` its broker holds publishing back.
#[derive(Default)]
struct HeldBack {
    held: std::sync::atomic::AtomicBool,
    published: Mutex<Vec<String>>,
}

#[async_trait]
impl Publisher for HeldBack {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(message.kind.clone());
        Ok(())
    }

    fn is_held_back(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[tokio::test(start_paused = true)]
async fn a_relay_claims_nothing_while_the_broker_holds_publishing_back() {
    use std::sync::atomic::Ordering;
    let store = InMemoryStore::new();
    for kind in ["a", "b", "c"] {
        enqueue(&store, kind).await;
    }
    let publisher = Arc::new(HeldBack::default());
    publisher.held.store(true, Ordering::Release);
    let relay = Relay::new(Arc::new(store.clone()), publisher.clone(), RelayConfig::default());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    let published = || {
        let mut kinds = publisher
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        kinds.sort();
        kinds
    };

    // Several leases long, on the paused clock.
    tokio::time::sleep(RelayConfig::default().lease * 3).await;
    assert!(published().is_empty(), "published while held back: {:?}", published());

    publisher.held.store(false, Ordering::Release);
    for _ in 0..100 {
        if published().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await.expect("the relay did not panic");
    assert_eq!(published(), ["a", "b", "c"], "each once, once let go");
}

/// Refuses messages of kind `unroutable`, as a broker does one no queue is
/// bound for, counting the tries; publishes the rest.
#[derive(Default)]
struct Unroutable {
    tries: std::sync::atomic::AtomicUsize,
    published: Mutex<Vec<String>>,
}

#[async_trait]
impl Publisher for Unroutable {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        if message.kind == "unroutable" {
            self.tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(TransportError::Rejected {
                id: message.id.to_string(),
                reason: "no queue is bound".to_owned(),
            });
        }
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(message.kind.clone());
        Ok(())
    }
}

/// A message the broker refuses is one message's trouble: it keeps its
/// lease and is tried again when that ends, its saga's later message waits
/// behind it, and every other message goes on being published. Given back
/// at once, it was claimed again at once, and each round that met it held
/// the relay in its back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_tried_once_a_lease_and_holds_back_only_its_saga() {
    let store = InMemoryStore::new();
    let refused_saga = SagaId::new();
    let mut tx = store.begin().await.expect("begin");
    let messages = [
        Message::new("unroutable", "d", b"{}".to_vec()),
        Message::new("behind", "d", b"{}".to_vec()),
    ];
    tx.enqueue(Some(refused_saga), &messages).await.expect("enqueue");
    tx.commit().await.expect("commit");
    let lease = Duration::from_millis(400);
    let publisher = Arc::new(Unroutable::default());
    let relay = Relay::new(
        Arc::new(store.clone()),
        publisher.clone(),
        RelayConfig {
            lease,
            poll_interval: Duration::from_millis(20),
            ..RelayConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    let started = std::time::Instant::now();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    // Other sagas' messages, committed while the refused one keeps failing.
    let others = 40;
    for _ in 0..others {
        enqueue(&store, "other").await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let published = || {
        publisher
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    };
    for _ in 0..100 {
        if published().len() >= others {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the relay stops")
        .expect("the relay did not panic");
    let ran = started.elapsed();

    let published = published();
    assert_eq!(published.len(), others, "every other message published: {published:?}");
    assert!(
        published.iter().all(|kind| kind == "other"),
        "the refused message's saga waits behind it: {published:?}"
    );
    // Tried at the start and when each lease ended (given back at once, it
    // was tried every 50 ms or so: 21 times in a second).
    let tries = publisher.tries.load(std::sync::atomic::Ordering::Relaxed);
    // Less 10 ms: leases end by the store's clock, in whole milliseconds.
    let leases = (ran.as_secs_f64() / (lease.as_secs_f64() - 0.010)).floor() as usize;
    assert!(
        (1..=leases + 1).contains(&tries),
        "the refused message was tried {tries} times in {ran:?}, {leases} leases of {lease:?}"
    );
    assert_eq!(store.unsent(), 2, "both stay in the outbox");
}

/// A broker that cannot be reached: every publish fails, counted.
#[derive(Default)]
struct Unreachable {
    tries: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Publisher for Unreachable {
    async fn publish(&self, _message: &Message) -> Result<(), TransportError> {
        self.tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(TransportError::Unavailable("connection refused".into()))
    }
}

/// Each failed round gives its messages back, and the next claim takes them
/// at once: were the back-off reset by that claim, as it was, the relay
/// would claim, publish and give back every 50 ms for the whole outage.
#[tokio::test(start_paused = true)]
async fn a_relay_backs_off_further_while_the_broker_stays_unreachable() {
    let store = InMemoryStore::new();
    enqueue(&store, "m").await;
    let publisher = Arc::new(Unreachable::default());
    let relay = Relay::new(Arc::new(store.clone()), publisher.clone(), RelayConfig::default());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    shutdown.cancel();
    running.await.expect("the relay did not panic");
    // 50 ms doubling: tried at 0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15, 6.35 s.
    let tries = publisher.tries.load(std::sync::atomic::Ordering::Relaxed);
    assert!((6..=10).contains(&tries), "tried {tries} times in 10 s");
    assert_eq!(store.unsent(), 1, "still in the outbox");
}

/// Confirms `accepted` at once, refuses `refused`, and never answers for
/// `slow` (a confirm that does not come).
struct Mixed;

#[async_trait]
impl Publisher for Mixed {
    async fn publish(&self, message: &Message) -> Result<(), TransportError> {
        match message.kind.as_str() {
            "refused" => Err(TransportError::Rejected {
                id: message.id.to_string(),
                reason: "no queue is bound".to_owned(),
            }),
            "slow" => std::future::pending().await,
            _ => Ok(()),
        }
    }
}

/// A round cut short by its budget keeps what it learnt: the confirmed
/// message stays sent and the refused one keeps its lease; only the one
/// without an answer is given back. (The whole batch used to be given
/// back: the confirmed one went out twice, the refused one at once again.)
#[tokio::test(start_paused = true)]
async fn a_round_out_of_time_gives_back_only_what_has_no_answer() {
    use saga_core::OutboxStore;
    let store = InMemoryStore::new();
    for kind in ["accepted", "refused", "slow"] {
        enqueue(&store, kind).await;
    }
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(Mixed),
        RelayConfig {
            lease: Duration::from_secs(60),
            ..RelayConfig::default()
        },
    );
    let round = relay.run_once().await.expect("round");
    assert_eq!((round.claimed, round.sent, round.refused, round.failed), (3, 1, 1, 1));
    let again = store.claim(10, Duration::from_secs(60)).await.expect("claim");
    let kinds: Vec<&str> = again.iter().map(|e| e.message.kind.as_str()).collect();
    assert_eq!(kinds, ["slow"]);
    assert_eq!(store.unsent(), 2, "the refused and the slow one");
}

/// `saga_outbox_published_total` counts messages kept as sent: one whose
/// mark failed goes out again when its lease ends, and is counted then.
#[test]
fn a_message_whose_mark_failed_is_not_counted_as_published() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let store = InMemoryStore::new();
            enqueue(&store, "accepted").await;
            let relay = Relay::new(Arc::new(MarksFail(store)), Arc::new(Refuses), RelayConfig::default());
            assert!(relay.run_once().await.is_err(), "marking failed");
        });
    });
    let counted = |name: &str| -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counted("saga_outbox_published_total"), 0);
}
