//! The engine, consumer and relay report Prometheus-style counters through
//! the `metrics` facade.

use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use saga_core::memory::InMemoryStore;
use saga_core::{Engine, ManualClock, Message, ReplyOutcome, SagaDefinition, Step};

/// A counter's name, labels and value.
type CounterRow = Row<u64>;

fn counter(snapshot: &[CounterRow], name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|row| is(row, name, labels))
        .map(|(_, _, v)| *v)
        .sum()
}

/// The counters `work` records, run on a runtime of its own with a
/// recorder of its own (tests run at once must not count into each other).
fn counted(work: impl std::future::Future<Output = ()>) -> Vec<CounterRow> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(work);
    });
    counters(&snapshot(&snapshotter))
}

/// A metric's name, labels and value.
type Row<T> = (String, Vec<(String, String)>, T);

/// Every metric the recorder holds, with its value. A snapshot takes the
/// histograms' samples and the counters' counts: take one, once.
fn snapshot(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<Row<DebugValue>> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

/// The metrics of `snapshot` that `pick` takes, with their values.
fn rows<T>(snapshot: &[Row<DebugValue>], pick: impl Fn(&DebugValue) -> Option<T>) -> Vec<Row<T>> {
    snapshot
        .iter()
        .filter_map(|(name, labels, value)| Some((name.clone(), labels.clone(), pick(value)?)))
        .collect()
}

/// Whether `row` is `name` with (at least) `labels`.
fn is<T>(row: &Row<T>, name: &str, labels: &[(&str, &str)]) -> bool {
    let (n, l, _) = row;
    n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
}

/// The counters of `snapshot`.
fn counters(snapshot: &[Row<DebugValue>]) -> Vec<CounterRow> {
    rows(snapshot, |value| match value {
        DebugValue::Counter(v) => Some(*v),
        _ => None,
    })
}

#[test]
fn a_deadline_left_to_a_replica_with_a_newer_version_is_not_counted_as_failed() {
    let snapshot = counted(async {
        let definition = |version: u32| {
            SagaDefinition::<u32>::builder("rolling")
                .version(version)
                .step(
                    Step::remote("ask", |_: &u32| Ok(saga_core::Command::json("Ask", "d", &())?))
                        .on_reply("Answer", |_: &mut u32, _: bool| ReplyOutcome::Success)
                        .timeout(std::time::Duration::from_secs(5)),
                )
                .build()
                .expect("valid")
        };
        let clock = ManualClock::default();
        let store = InMemoryStore::with_clock(clock.clone());
        let engine = |versions: &[u32]| {
            let mut builder = Engine::builder(Arc::new(store.clone())).clock(clock.clone());
            for &version in versions {
                builder = builder.register(definition(version));
            }
            builder.build().expect("engine")
        };
        // A v2 saga scanned by a replica with v1 only (a deploy under
        // way), and a v1 saga scanned by one with v2 only (v1 is gone).
        engine(&[1, 2]).start("rolling", 0u32).await.expect("start v2");
        engine(&[1]).start("rolling", 0u32).await.expect("start v1");
        clock.advance(std::time::Duration::from_secs(6));
        assert_eq!(
            engine(&[1]).fire_due_deadlines().await.expect("scan"),
            1,
            "its own v1 saga"
        );
        assert_eq!(
            engine(&[2]).fire_due_deadlines().await.expect("scan"),
            1,
            "its own v2 saga"
        );
    });
    // v1-only set the v2 saga aside; v2-only failed nothing (v1's was fired).
    assert_eq!(counter(&snapshot, "saga_deadline_failures_total", &[]), 0);
}

#[test]
fn sagas_started_transitions_and_endings_are_counted() {
    let snapshot = counted(async {
        let definition = SagaDefinition::<u32>::builder("counted")
            .step(
                Step::remote("ask", |_: &u32| Ok(saga_core::Command::json("Ask", "d", &())?)).on_reply(
                    "Answer",
                    |_: &mut u32, ok: bool| {
                        if ok {
                            ReplyOutcome::Success
                        } else {
                            ReplyOutcome::Failure("no".into())
                        }
                    },
                ),
            )
            .build()
            .expect("valid");
        let engine = Engine::builder(Arc::new(InMemoryStore::new()))
            .register(definition)
            .build()
            .expect("engine");
        for ok in [true, false, true] {
            let id = engine.start("counted", 0u32).await.expect("start");
            let answer = Message::json("Answer", "r", &ok)
                .expect("json")
                .with_correlation_id(id.to_string());
            engine.handle(&answer).await.expect("handle");
        }
    });
    assert_eq!(counter(&snapshot, "saga_started_total", &[("saga", "counted")]), 3);
    assert_eq!(counter(&snapshot, "saga_transitions_total", &[("saga", "counted")]), 6);
    assert_eq!(counter(&snapshot, "saga_finished_total", &[("status", "completed")]), 2);
    assert_eq!(
        counter(&snapshot, "saga_finished_total", &[("status", "compensated")]),
        1
    );
}

/// Accepts everything; while `held`, its broker holds publishing back.
#[derive(Default)]
struct HeldBack {
    held: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl saga_core::Publisher for HeldBack {
    async fn publish(&self, _message: &Message) -> Result<(), saga_core::TransportError> {
        Ok(())
    }

    fn is_held_back(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The relays held back, as a Prometheus exporter would show it: the
/// debugging recorder's snapshot gives each gauge's change since the last
/// one (it reads them by swapping in 0), so `level` adds them up.
fn held_back(snapshotter: &metrics_util::debugging::Snapshotter, level: &mut Option<f64>) -> Option<f64> {
    let change = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find_map(|(key, _, _, value)| match value {
            DebugValue::Gauge(v) if key.key().name() == "saga_relay_held_back" => Some(v.into_inner()),
            _ => None,
        });
    if let Some(change) = change {
        *level = Some(level.unwrap_or(0.0) + change);
    }
    *level
}

/// A relay over an empty outbox publishing through `publisher`, running
/// until the returned token is cancelled.
fn run_relay(publisher: &Arc<HeldBack>) -> (saga_core::CancellationToken, tokio::task::JoinHandle<()>) {
    let relay = saga_core::Relay::new(
        Arc::new(InMemoryStore::new()),
        publisher.clone(),
        saga_core::RelayConfig::default(),
    );
    let shutdown = saga_core::CancellationToken::new();
    let running = tokio::spawn(relay.run(shutdown.clone()));
    (shutdown, running)
}

#[test]
fn the_relay_shows_while_the_broker_holds_publishing_back() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let publisher = Arc::new(HeldBack::default());
            let (shutdown, running) = run_relay(&publisher);
            let mut level = None;
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                held_back(&snapshotter, &mut level),
                Some(0.0),
                "reported from the start"
            );

            publisher.held.store(true, Ordering::Release);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(held_back(&snapshotter, &mut level), Some(1.0), "while held back");

            // A second relay of the same process, held back too: they add up.
            let other = Arc::new(HeldBack::default());
            other.held.store(true, Ordering::Release);
            let (other_shutdown, other_running) = run_relay(&other);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(held_back(&snapshotter, &mut level), Some(2.0), "two held back");

            publisher.held.store(false, Ordering::Release);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(held_back(&snapshotter, &mut level), Some(1.0), "one let go");
            shutdown.cancel();
            running.await.expect("the relay did not panic");

            // A relay that stops while held back takes its part with it.
            other_shutdown.cancel();
            other_running.await.expect("the relay did not panic");
            assert_eq!(held_back(&snapshotter, &mut level), Some(0.0), "none left");
        });
    });
}

/// The histograms of `snapshot`, with their samples.
fn histograms(snapshot: &[Row<DebugValue>]) -> Vec<Row<Vec<f64>>> {
    rows(snapshot, |value| match value {
        DebugValue::Histogram(values) => Some(values.iter().map(|v| v.into_inner()).collect()),
        _ => None,
    })
}

/// The samples of histogram `name` with `labels`.
fn samples(snapshot: &[Row<Vec<f64>>], name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    snapshot
        .iter()
        .filter(|row| is(row, name, labels))
        .flat_map(|(_, _, values)| values.iter().copied())
        .collect()
}

/// Answers each message after `delay`, like a broker some way off: a
/// confirm, or a refusal while `refusing`.
struct SlowBroker {
    delay: std::time::Duration,
    refusing: bool,
}

#[async_trait::async_trait]
impl saga_core::Publisher for SlowBroker {
    async fn publish(&self, message: &Message) -> Result<(), saga_core::TransportError> {
        tokio::time::sleep(self.delay).await;
        if self.refusing {
            return Err(saga_core::TransportError::Rejected {
                id: message.id.to_string(),
                reason: "refused".to_owned(),
            });
        }
        Ok(())
    }
}

/// Reserves nothing and answers nothing, a participant's commit alone;
/// refuses commands of type `Refuse`.
struct Accepts;

#[async_trait::async_trait]
impl saga_core::CommandHandler for Accepts {
    async fn handle(
        &self,
        _tx: &mut dyn saga_core::Transaction,
        command: &Message,
    ) -> Result<Vec<saga_core::Command>, saga_core::StepError> {
        if command.kind == "Refuse" {
            return Err(saga_core::StepError::terminal("refused"));
        }
        Ok(Vec::new())
    }
}

#[test]
fn commits_and_publishes_are_timed() {
    let delay = std::time::Duration::from_millis(5);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let definition = SagaDefinition::<u32>::builder("timed")
                .step(
                    Step::remote("ask", |_: &u32| Ok(saga_core::Command::json("Ask", "d", &())?))
                        .on_reply("Answer", |_: &mut u32, _: bool| ReplyOutcome::Success),
                )
                .build()
                .expect("valid");
            let clock = saga_core::ManualClock::default();
            let store = InMemoryStore::with_clock(clock.clone());
            let engine = Engine::builder(Arc::new(store.clone()))
                .register(definition)
                .build()
                .expect("engine");
            for _ in 0..3 {
                let id = engine.start("timed", 0u32).await.expect("start");
                let answer = Message::json("Answer", "r", &true)
                    .expect("json")
                    .with_correlation_id(id.to_string());
                engine.handle(&answer).await.expect("handle");
                // Delivered again: a duplicate, no commit.
                engine.handle(&answer).await.expect("handle again");
            }
            let relay = |refusing| {
                saga_core::Relay::new(
                    Arc::new(store.clone()),
                    Arc::new(SlowBroker { delay, refusing }),
                    saga_core::RelayConfig::default(),
                )
            };
            assert_eq!(relay(true).run_once().await.expect("relay").refused, 3, "refused");
            // Refused messages keep their lease, and go again once it ends.
            clock.advance(saga_core::RelayConfig::default().lease);
            assert_eq!(relay(false).run_once().await.expect("relay").sent, 3, "the three asks");

            let participant = saga_core::Participant::new("keeper", Arc::new(store), Accepts);
            let command = |kind| Message::json(kind, "stock", &()).expect("json");
            let (first, second) = (command("Reserve"), command("Reserve"));
            for handled in [&first, &second, &first] {
                participant.handle(handled).await.expect("handled or a duplicate");
            }
            let refused = participant.handle(&command("Refuse")).await;
            assert!(refused.is_err(), "{refused:?}");
        });
    });
    let taken = snapshot(&snapshotter);
    let snapshot = histograms(&taken);
    let commits = samples(&snapshot, "saga_commit_seconds", &[("saga", "timed")]);
    assert_eq!(
        commits.len(),
        6,
        "a start and a reply for each of three sagas: {commits:?}"
    );
    assert!(commits.iter().all(|s| (0.0..1.0).contains(s)), "{commits:?}");
    let published = samples(&snapshot, "saga_outbox_publish_seconds", &[]);
    assert_eq!(published.len(), 3, "the confirmed only: {published:?}");
    assert!(
        published.iter().all(|s| *s >= delay.as_secs_f64()),
        "each waited for its confirm: {published:?}"
    );
    let participant = samples(
        &snapshot,
        "saga_participant_commit_seconds",
        &[("participant", "keeper")],
    );
    assert_eq!(
        participant.len(),
        2,
        "two committed; a duplicate and a refusal are not: {participant:?}"
    );
    let counted = counters(&taken);
    assert_eq!(
        counter(&counted, "saga_outbox_refused_total", &[]),
        3,
        "the three refused, counted apart"
    );
    assert_eq!(
        counter(&counted, "saga_outbox_publish_failures_total", &[]),
        3,
        "and as failures"
    );
}

#[test]
fn a_message_given_up_counts_as_a_transition_and_a_discard() {
    let snapshot = counted(async {
        let definition = SagaDefinition::<u32>::builder("giving-up")
            .step(
                Step::remote("ask", |_: &u32| Ok(saga_core::Command::json("Ask", "d", &())?))
                    .on_reply("Answer", |_: &mut u32, _: bool| ReplyOutcome::Success),
            )
            .build()
            .expect("valid");
        let store = InMemoryStore::new();
        let engine = Engine::builder(Arc::new(store.clone()))
            .register(definition)
            .build()
            .expect("engine");
        let id = engine.start("giving-up", 0u32).await.expect("start");
        let unsent = saga_core::QueryStore::unsent_messages(&store, &saga_core::UnsentFilter::default())
            .await
            .expect("unsent");
        engine
            .discard_unsent(id, unsent[0].entry.id, "never routable")
            .await
            .expect("given up");
    });
    let transitions = |n| counter(&snapshot, "saga_transitions_total", &[("saga", n)]);
    assert_eq!(transitions("giving-up"), 2, "the start and the discard");
    assert_eq!(counter(&snapshot, "saga_outbox_discarded_total", &[]), 1);
}

/// Settles nothing: the broker refuses what it is asked to do.
struct RefusedSettle;

#[async_trait::async_trait]
impl saga_core::Settle for RefusedSettle {
    async fn settle(self: Box<Self>, _settlement: saga_core::Settlement) -> Result<(), saga_core::TransportError> {
        Err(saga_core::TransportError::Rejected {
            id: "m".into(),
            reason: "the dead-letter queue is full".into(),
        })
    }
}

/// Refuses every message for good.
struct Refuses;

#[async_trait::async_trait]
impl saga_core::MessageHandler for Refuses {
    async fn handle(&self, message: &Message) -> Result<(), saga_core::EngineError> {
        Err(saga_core::EngineError::UnhandledKind {
            kind: message.kind.clone(),
        })
    }
}

#[test]
fn a_settlement_the_transport_could_not_carry_out_is_counted_as_failed_not_as_done() {
    let snapshot = counted(async {
        let config = saga_core::ConsumerConfig::new("q");
        for settle in [
            Box::new(RefusedSettle) as Box<dyn saga_core::Settle>,
            Box::new(Accepted),
        ] {
            let delivery = saga_core::Delivery {
                message: Message::new("Unknown", "q", b"{}".to_vec()),
                retries: 0,
                settle,
            };
            saga_core::Consumer::process(&Refuses, delivery, &config).await;
        }
    });
    let outcome = |outcome: &str| counter(&snapshot, "saga_messages_total", &[("outcome", outcome)]);
    assert_eq!(outcome("settle_failed"), 1, "the refused dead letter");
    assert_eq!(outcome("dead_letter"), 1, "only the one that reached its queue");
}

/// Settles whatever it is asked to.
struct Accepted;

#[async_trait::async_trait]
impl saga_core::Settle for Accepted {
    async fn settle(self: Box<Self>, _settlement: saga_core::Settlement) -> Result<(), saga_core::TransportError> {
        Ok(())
    }
}
