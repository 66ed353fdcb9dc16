//! The engine driver over the in-memory backends: routing, deduplication,
//! deadlines, operator actions, versioning, effects and the consumer loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use saga_core::memory::{InMemoryStore, InMemoryTransport};
use saga_core::{
    CancellationToken, Cause, Command, CommandHandler, Consumer, ConsumerConfig, EffectHandler, Engine, EngineError,
    Handled, Handling, IN_REPLY_TO, ManualClock, Message, OperatorAction, OutboxStore, Participant, QueryStore, Relay,
    RelayConfig, ReplyOutcome, RetryPolicy, SagaDefinition, SagaId, SagaInstance, SagaStatus, SagaStore, Step,
    StepError, Transaction, UnsentFilter,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Order {
    id: String,
    parts: u32,
    confirmed: bool,
}

#[derive(Serialize, Deserialize)]
struct Reply {
    order_id: String,
    ok: bool,
}

fn order_saga(version: u32, timeout: Duration) -> SagaDefinition<Order> {
    SagaDefinition::builder("orders")
        .version(version)
        .key(|o: &Order| o.id.clone())
        .step(
            Step::remote("reserve", |o: &Order| Ok(Command::json("Reserve", "stock", &o.id)?))
                .on_reply_keyed(
                    "Reserved",
                    |r: &Reply| r.order_id.clone(),
                    |o: &mut Order, r: Reply| {
                        if !r.ok {
                            return ReplyOutcome::Failure("out of stock".into());
                        }
                        // Parts arrive one reply at a time; three make the step succeed.
                        o.parts += 1;
                        if o.parts >= 3 {
                            ReplyOutcome::Success
                        } else {
                            ReplyOutcome::Pending
                        }
                    },
                )
                .timeout(timeout),
        )
        .step(Step::local("confirm", move |o: &mut Order, _| {
            o.confirmed = version >= 1;
            Ok(())
        }))
        .build()
        .expect("valid definition")
}

fn reply(order: &str, ok: bool) -> Message {
    Message::json(
        "Reserved",
        "replies",
        &Reply {
            order_id: order.into(),
            ok,
        },
    )
    .expect("encodable")
}

fn setup(clock: &ManualClock) -> (InMemoryStore, Engine) {
    let store = InMemoryStore::with_clock(clock.clone());
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    (store, engine)
}

async fn status(store: &InMemoryStore, id: SagaId) -> SagaStatus {
    store.load(id).await.expect("load").expect("exists").status
}

fn order(id: &str) -> Order {
    Order {
        id: id.into(),
        ..Order::default()
    }
}

#[tokio::test]
async fn replies_are_correlated_by_payload_key_and_deduplicated() {
    let clock = ManualClock::default();
    let (store, engine) = setup(&clock);
    let id = engine.start("orders", order("o-1")).await.expect("start");
    let first = reply("o-1", true);
    assert!(matches!(engine.handle(&first).await, Ok(Handled::Applied { .. })));
    assert_eq!(
        engine.handle(&first).await.expect("duplicate"),
        Handled::Duplicate,
        "the inbox drops a redelivery"
    );
    engine.handle(&reply("o-1", true)).await.expect("second part");
    engine.handle(&reply("o-1", true)).await.expect("third part");
    assert_eq!(status(&store, id).await, SagaStatus::Completed);
    let data: Order = serde_json::from_str(&store.load(id).await.expect("load").expect("exists").data).expect("data");
    assert_eq!(data.parts, 3, "each distinct reply counted once");
    assert!(data.confirmed);
    // Late replies for a finished saga change nothing.
    assert!(matches!(
        engine.handle(&reply("o-1", false)).await,
        Ok(Handled::Ignored(_))
    ));
    assert_eq!(
        store.history(id).await.expect("history").len(),
        4,
        "start + three replies"
    );
}

#[tokio::test]
async fn unknown_messages_are_errors_that_say_why() {
    let clock = ManualClock::default();
    let (_store, engine) = setup(&clock);
    let unknown_order = engine.handle(&reply("nope", true)).await;
    assert!(
        matches!(&unknown_order, Err(EngineError::UnknownSaga { key: Some(k), .. }) if k == "nope"),
        "{unknown_order:?}"
    );
    let unknown_kind = engine.handle(&Message::new("Mystery", "x", b"{}".to_vec())).await;
    assert!(matches!(unknown_kind, Err(EngineError::UnhandledKind { .. })));
    let garbage = engine
        .handle(&Message::new("Reserved", "x", b"not json".to_vec()))
        .await;
    assert!(matches!(garbage, Err(EngineError::Decode { .. })));
    for error in [unknown_order, unknown_kind, garbage] {
        assert!(
            !error.expect_err("an error").is_retryable(),
            "these go to the dead-letter queue"
        );
    }
}

#[tokio::test]
async fn a_reply_kind_two_sagas_share_reaches_the_one_that_can_read_it() {
    // `orders` reads `Reserved` by key from a JSON object; `refills` takes
    // `Reserved` by saga id with a bare `true`, which `orders` cannot read.
    let refills = SagaDefinition::builder("refills")
        .step(
            Step::remote("order", |_: &Order| Ok(Command::json("Refill", "supplier", &())?)).on_reply(
                "Reserved",
                |_: &mut Order, ok: bool| {
                    if ok {
                        ReplyOutcome::Success
                    } else {
                        ReplyOutcome::Failure("refused".into())
                    }
                },
            ),
        )
        .build()
        .expect("valid definition");
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(order_saga(1, Duration::from_secs(30)))
        .register(refills)
        .build()
        .expect("engine");
    let id = engine.start("refills", order("r-1")).await.expect("start");
    let reply = Message::json("Reserved", "replies", &true)
        .expect("encodable")
        .with_correlation_id(id.to_string());
    let handled = engine.handle(&reply).await;
    assert!(matches!(handled, Ok(Handled::Applied { .. })), "{handled:?}");
    assert_eq!(status(&store, id).await, SagaStatus::Completed);
    // Readable by neither: still a decoding error, dead-lettered.
    let garbage = engine
        .handle(&Message::new("Reserved", "x", b"not json".to_vec()))
        .await;
    assert!(matches!(garbage, Err(EngineError::Decode { .. })), "{garbage:?}");
}

#[tokio::test]
async fn sagas_whose_deadline_cannot_be_applied_never_crowd_out_the_others() {
    let clock = ManualClock::default();
    let (store, old) = setup(&clock);
    // Three sagas of a version the new engine no longer has, due first.
    for id in ["b-1", "b-2", "b-3"] {
        old.start("orders", order(id)).await.expect("start");
    }
    clock.advance(Duration::from_secs(1));
    let config = saga_core::EngineConfig {
        deadline_batch: 2,
        broken_deadline_retry: Duration::from_secs(60),
        ..saga_core::EngineConfig::default()
    };
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .config(config)
        .register(order_saga(2, Duration::from_secs(30)))
        .build()
        .expect("engine");
    let healthy = [
        engine.start("orders", order("h-1")).await.expect("start"),
        engine.start("orders", order("h-2")).await.expect("start"),
    ];
    clock.advance(Duration::from_secs(60));

    // Each scan tries at most two; the broken ones are reported once, then left out.
    let mut fired = 0;
    for _ in 0..3 {
        fired += engine.fire_due_deadlines().await.expect("scan");
    }
    assert_eq!(fired, 2, "both healthy deadlines fired despite the broken ones");
    for id in healthy {
        assert_eq!(status(&store, id).await, SagaStatus::Compensated);
    }
    // Until they are due for another try, a scan does not touch them.
    assert_eq!(engine.fire_due_deadlines().await.expect("scan"), 0);
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        engine.fire_due_deadlines().await.expect("scan"),
        0,
        "tried again, still broken"
    );
}

#[tokio::test]
async fn a_missed_deadline_fails_the_step_and_a_late_reply_changes_nothing() {
    let clock = ManualClock::default();
    let (store, engine) = setup(&clock);
    let id = engine.start("orders", order("o-2")).await.expect("start");
    clock.advance(Duration::from_secs(29));
    assert_eq!(engine.fire_due_deadlines().await.expect("scan"), 0, "not due yet");
    clock.advance(Duration::from_secs(2));
    assert_eq!(engine.fire_due_deadlines().await.expect("scan"), 1);
    assert_eq!(status(&store, id).await, SagaStatus::Compensated);
    assert_eq!(
        engine.fire_due_deadlines().await.expect("scan"),
        0,
        "a deadline fires once"
    );
    assert!(matches!(
        engine.handle(&reply("o-2", true)).await,
        Ok(Handled::Ignored(_))
    ));

    // The history names the deadline as the cause, once, with its due time.
    let history = store.history(id).await.expect("history");
    let fired: Vec<_> = history
        .iter()
        .filter(|t| matches!(t.cause, Cause::Deadline { .. }))
        .collect();
    assert_eq!(fired.len(), 1, "{history:?}");
    let started = history.first().expect("the start").at;
    let Cause::Deadline { due } = fired[0].cause else {
        unreachable!("filtered on deadlines")
    };
    assert_eq!(due.since(started), Duration::from_secs(30), "due 30 s after the start");
    assert_eq!(fired[0].before.as_ref().map(|p| p.status), Some(SagaStatus::Running));
    assert_eq!(fired[0].after.status, SagaStatus::Compensated);
    assert!(
        fired[0].note.as_deref().is_some_and(|n| n.contains("deadline")),
        "the note says why: {:?}",
        fired[0].note
    );
}

#[tokio::test]
async fn starting_twice_with_one_id_or_key_is_refused() {
    let clock = ManualClock::default();
    let (_store, engine) = setup(&clock);
    let id = SagaId::new();
    engine.start_with_id("orders", id, order("o-3")).await.expect("start");
    assert!(matches!(
        engine.start_with_id("orders", id, order("o-4")).await,
        Err(EngineError::AlreadyStarted { .. })
    ));
    assert!(matches!(
        engine.start("orders", order("o-3")).await,
        Err(EngineError::AlreadyStarted { .. })
    ));
    assert!(
        matches!(engine.start("orders", 42u32).await, Err(EngineError::DataType { .. })),
        "wrong data type"
    );
    assert!(matches!(
        engine.start("nope", order("x")).await,
        Err(EngineError::UnknownDefinition { .. })
    ));
}

#[tokio::test]
async fn instances_continue_under_the_version_that_started_them() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let v1 = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    let old = v1.start("orders", order("old")).await.expect("start");
    // Deploy v2 beside v1 (v2 has a shorter deadline).
    let both = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(order_saga(1, Duration::from_secs(30)))
        .register(order_saga(2, Duration::from_secs(5)))
        .build()
        .expect("engine");
    let new = both.start("orders", order("new")).await.expect("start");
    let version = |i: Option<SagaInstance>| i.expect("exists").definition_version;
    assert_eq!(version(store.load(old).await.expect("load")), 1);
    assert_eq!(version(store.load(new).await.expect("load")), 2);
    clock.advance(Duration::from_secs(6));
    both.fire_due_deadlines().await.expect("scan");
    assert_eq!(status(&store, new).await, SagaStatus::Compensated, "v2's 5 s deadline");
    assert_eq!(
        status(&store, old).await,
        SagaStatus::Running,
        "v1 keeps its 30 s deadline"
    );
    // An engine without v1 cannot advance the old instance, and says so.
    let v2_only = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(order_saga(2, Duration::from_secs(5)))
        .build()
        .expect("engine");
    assert!(matches!(
        v2_only.handle(&reply("old", true)).await,
        Err(EngineError::UnknownDefinition { version: 1, .. })
    ));
    assert!(matches!(
        Engine::builder(Arc::new(store.clone()))
            .register(order_saga(1, Duration::from_secs(30)))
            .register(order_saga(1, Duration::from_secs(30)))
            .build(),
        Err(saga_core::DefinitionError::DuplicateVersion { .. })
    ));
}

fn fragile_saga(broken: Arc<AtomicBool>) -> SagaDefinition<Order> {
    SagaDefinition::builder("fragile")
        .step(
            Step::local("book", |_: &mut Order, _| Ok(()))
                .compensate(move |_: &mut Order, _| {
                    if broken.load(Ordering::SeqCst) {
                        Err(StepError::retryable("ledger down"))
                    } else {
                        Ok(())
                    }
                })
                .compensation_retry(RetryPolicy {
                    max_attempts: 2,
                    initial_backoff: Duration::from_secs(1),
                    max_backoff: Duration::from_secs(1),
                    multiplier: 1,
                }),
        )
        .step(
            Step::remote("wait", |_: &Order| {
                Ok(Command {
                    kind: "Wait".into(),
                    destination: "d".into(),
                    payload: b"{}".to_vec(),
                })
            })
            .on_reply("Done", |_: &mut Order, _: serde_json::Value| ReplyOutcome::Success),
        )
        .build()
        .expect("valid definition")
}

#[tokio::test]
async fn operators_cancel_and_resume_stuck_sagas() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let broken = Arc::new(AtomicBool::new(true));
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(fragile_saga(Arc::clone(&broken)))
        .build()
        .expect("engine");
    let id = engine.start("fragile", Order::default()).await.expect("start");
    let cancelled = engine.act(id, OperatorAction::Cancel).await.expect("cancel");
    assert_eq!(
        cancelled.status,
        SagaStatus::Compensating,
        "the compensation failed once and waits to retry"
    );
    clock.advance(Duration::from_secs(1));
    engine.fire_due_deadlines().await.expect("scan");
    let stuck = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        stuck.status,
        SagaStatus::NeedsAttention,
        "out of retries: visible, not dropped"
    );
    assert!(
        stuck
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("cancelled by an operator") && f.contains("ledger down"))
    );
    assert!(matches!(
        engine.act(id, OperatorAction::Cancel).await,
        Err(EngineError::InvalidAction { .. })
    ));
    broken.store(false, Ordering::SeqCst);
    let resumed = engine.act(id, OperatorAction::Resume).await.expect("resume");
    assert_eq!(resumed.status, SagaStatus::Compensated);
    let actions: Vec<String> = store
        .history(id)
        .await
        .expect("history")
        .into_iter()
        .filter_map(|t| match t.cause {
            saga_core::Cause::Operator { action } => Some(action),
            _ => None,
        })
        .collect();
    assert_eq!(
        actions,
        ["cancel", "resume"],
        "operator actions are recorded in the history"
    );
    let recorded = store.history(id).await.expect("history").len();
    for action in [OperatorAction::Retry, OperatorAction::Cancel, OperatorAction::Resume] {
        let refused = engine.act(id, action).await;
        assert!(
            matches!(&refused, Err(EngineError::InvalidAction { reason, .. }) if reason.contains("finished")),
            "{action} of a finished saga is refused, not silently ignored: {refused:?}"
        );
    }
    assert_eq!(
        store.history(id).await.expect("history").len(),
        recorded,
        "refusals change nothing"
    );
}

#[tokio::test]
async fn a_command_sent_at_last_leaves_its_retry_budget_whole_for_an_operators_retry() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    // The command cannot be built while `failures` is above zero.
    let failures = Arc::new(std::sync::atomic::AtomicU32::new(2));
    let left = Arc::clone(&failures);
    let saga = SagaDefinition::builder("flaky")
        .step(
            Step::remote("ask", move |_: &Order| {
                if left.load(Ordering::SeqCst) > 0 {
                    left.fetch_sub(1, Ordering::SeqCst);
                    return Err(StepError::retryable("catalogue down"));
                }
                Ok(Command::json("Ask", "d", &())?)
            })
            .on_reply("Answer", |_: &mut Order, _: serde_json::Value| ReplyOutcome::Success)
            .retry(RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(1),
                multiplier: 1,
            }),
        )
        .build()
        .expect("valid definition");
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(saga)
        .build()
        .expect("engine");
    let id = engine.start("flaky", Order::default()).await.expect("start");
    for _ in 0..2 {
        clock.advance(Duration::from_secs(1));
        engine.fire_due_deadlines().await.expect("scan");
    }
    let sent = store.load(id).await.expect("load").expect("exists");
    assert!(sent.awaiting.is_some(), "the third attempt sent the command");
    assert_eq!(sent.attempt, 0, "the step's action succeeded: no failed attempts count");

    // No answer comes; an operator retries the step, and building the
    // command fails once more: one failure of three allowed, not the last.
    failures.store(1, Ordering::SeqCst);
    let retried = engine.act(id, OperatorAction::Retry).await.expect("retry");
    assert_eq!(retried.status, SagaStatus::Running, "{:?}", retried.failure);
    assert_eq!(retried.attempt, 1);
    clock.advance(Duration::from_secs(1));
    engine.fire_due_deadlines().await.expect("scan");
    assert!(store.load(id).await.expect("load").expect("exists").awaiting.is_some());
}

struct FailingEffects;

#[async_trait]
impl EffectHandler<u8> for FailingEffects {
    async fn apply(&self, _tx: &mut dyn Transaction, _saga: &SagaInstance, _effects: Vec<u8>) -> Result<(), StepError> {
        Err(StepError::retryable("application table locked"))
    }
}

#[tokio::test]
async fn a_failing_effect_rolls_the_whole_transition_back() {
    let store = InMemoryStore::new();
    let definition = SagaDefinition::<Order, u8>::builder("effects")
        .step(Step::local("write", |_: &mut Order, ctx| {
            ctx.effect(1);
            ctx.send(Command {
                kind: "Written".into(),
                destination: "d".into(),
                payload: b"{}".to_vec(),
            });
            Ok(())
        }))
        .build()
        .expect("valid");
    let engine = Engine::builder(Arc::new(store.clone()))
        .register_with_effects(definition, FailingEffects)
        .build()
        .expect("engine");
    let result = engine.start("effects", Order::default()).await;
    assert!(
        matches!(&result, Err(e @ EngineError::Effects(_)) if e.is_retryable()),
        "{result:?}"
    );
    assert!(store.is_empty(), "no instance");
    assert_eq!(store.unsent(), 0, "no outbox rows");
}

struct Stock;

#[async_trait]
impl CommandHandler for Stock {
    async fn handle(&self, _tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let id: String = command.decode().map_err(|e| StepError::terminal(e.to_string()))?;
        let reply = Reply { order_id: id, ok: true };
        Ok(vec![
            Command::json("Reserved", "replies", &reply).map_err(|e| StepError::terminal(e.to_string()))?,
        ])
    }
}

#[tokio::test]
async fn participants_handle_each_command_once_and_reply_through_the_outbox() {
    let store = InMemoryStore::new();
    let participant = Participant::new("stock", Arc::new(store.clone()), Stock);
    let command = Message::json("Reserve", "stock", "o-9")
        .expect("encodable")
        .with_correlation_id("saga-1");
    assert_eq!(
        participant.handle(&command).await.expect("handle"),
        Handling::Handled { replies: 1 }
    );
    assert_eq!(participant.handle(&command).await.expect("again"), Handling::Duplicate);
    let replies = store.claim(10, Duration::from_secs(1)).await.expect("claim");
    assert_eq!(replies.len(), 1, "one reply for two deliveries");
    let reply = &replies[0].message;
    assert_eq!(reply.header(IN_REPLY_TO), Some(command.id.as_str()));
    assert_eq!(reply.correlation_id.as_deref(), Some("saga-1"));
}

#[tokio::test]
async fn replies_of_participants_that_one_command_fans_out_to_all_reach_the_saga() {
    let clock = ManualClock::default();
    let (store, engine) = setup(&clock);
    let id = engine.start("orders", order("o-fan")).await.expect("start");
    let reserve = store.claim(10, Duration::from_secs(1)).await.expect("claim").remove(0);
    store.mark_sent(&[reserve.id]).await.expect("mark");
    // A fanout destination: three participants get the same command, and
    // the step needs all three parts.
    for name in ["stock-east", "stock-west", "stock-north"] {
        let participant = Participant::new(name, Arc::new(store.clone()), Stock);
        let handled = participant.handle(&reserve.message).await.expect("handle");
        assert_eq!(handled, Handling::Handled { replies: 1 }, "{name}");
    }
    let replies = store.claim(10, Duration::from_secs(1)).await.expect("claim replies");
    let mut ids: Vec<&str> = replies.iter().map(|r| r.message.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each participant's reply has an id of its own");
    for reply in &replies {
        let handled = engine.handle(&reply.message).await.expect("handle reply");
        assert!(matches!(handled, Handled::Applied { .. }), "{handled:?}");
    }
    assert_eq!(status(&store, id).await, SagaStatus::Completed);
}
#[tokio::test]
async fn the_relay_keeps_messages_until_they_can_be_published() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let transport = InMemoryTransport::new();
    transport.declare_destination("stock");
    let engine = Engine::builder(Arc::new(store.clone()))
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    engine.start("orders", order("o-5")).await.expect("start");
    let lease = RelayConfig::default().lease;
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(transport.clone()),
        RelayConfig::default(),
    );
    let round = relay.run_once().await.expect("round");
    assert_eq!(
        (round.sent, round.failed, round.refused),
        (0, 0, 1),
        "nothing is bound to `stock` yet"
    );
    assert_eq!(store.unsent(), 1, "the message stays in the outbox");
    transport.bind("stock", "stock-queue");
    let round = relay.run_once().await.expect("round");
    assert_eq!(round.claimed, 0, "a refused message keeps its lease");
    clock.advance(lease);
    let round = relay.run_once().await.expect("round");
    assert_eq!(round.sent, 1, "tried again once its lease ended");
    assert_eq!(store.unsent(), 0);
    assert_eq!(transport.take("stock-queue").len(), 1);
}

/// Announces the order where no broker takes it, then reserves stock.
fn announcing_saga() -> SagaDefinition<Order> {
    SagaDefinition::builder("announcing")
        .step(Step::local("announce", |_: &mut Order, ctx| {
            ctx.send(Command {
                kind: "Announced".into(),
                destination: "nowhere".into(),
                payload: b"{}".to_vec(),
            });
            Ok(())
        }))
        .step(
            Step::remote("reserve", |o: &Order| Ok(Command::json("Reserve", "stock", &o.id)?))
                .on_reply("Reserved", |_: &mut Order, _: bool| ReplyOutcome::Success),
        )
        .build()
        .expect("valid definition")
}

#[tokio::test]
async fn an_operator_gives_up_a_message_no_broker_takes_and_the_saga_goes_on() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let transport = InMemoryTransport::new();
    transport.declare_destination("stock").bind("stock", "stock-queue");
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register(announcing_saga())
        .build()
        .expect("engine");
    let id = engine.start("announcing", order("o-7")).await.expect("start");
    let other = engine.start("announcing", order("o-8")).await.expect("start");
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(transport.clone()),
        RelayConfig::default(),
    );
    let round = relay.run_once().await.expect("round");
    assert_eq!(
        (round.sent, round.refused),
        (0, 4),
        "each saga's announcement is refused and its reservation waits behind it"
    );
    let unsent = |saga| {
        let store = store.clone();
        async move {
            store
                .unsent_messages(&UnsentFilter {
                    saga: Some(saga),
                    ..UnsentFilter::default()
                })
                .await
                .expect("unsent")
        }
    };
    let announcement = unsent(id).await[0].entry.clone();
    assert_eq!(announcement.message.kind, "Announced");
    let before = store.load(id).await.expect("load").expect("exists");

    let reservation = unsent(id).await[1].entry.id;
    let refusals = [
        (SagaId::new(), announcement.id, "unknown saga"),
        (other, announcement.id, "is another saga's"),
        (id, reservation, "waits behind the saga's older unsent message"),
        (
            id,
            reservation + 1_000,
            "is not an unsent message of the saga (its oldest is",
        ),
    ];
    for (saga, message, why) in refusals {
        let refused = engine.discard_unsent(saga, message, "too large").await;
        let says_why = match &refused {
            Err(EngineError::UnknownSaga { .. }) => why == "unknown saga",
            Err(EngineError::InvalidAction { reason, .. }) => reason.contains(why),
            _ => false,
        };
        assert!(says_why, "{why}: {refused:?}");
    }
    assert_eq!(unsent(id).await.len(), 2, "refusals give nothing up");

    // Less than a lease: the other saga's messages stay leased.
    clock.advance(Duration::from_secs(1));
    let after = engine
        .discard_unsent(id, announcement.id, "headers too large for a frame")
        .await
        .expect("discard");
    assert_eq!(
        (after.status, after.step, after.updated_at, after.revision),
        (before.status, before.step, before.updated_at, before.revision + 1),
        "the saga stands where it stood (and as long), one revision on"
    );
    let history = store.history(id).await.expect("history");
    let last = history.last().expect("a history");
    assert_eq!(
        last.cause,
        Cause::Operator {
            action: "discard".into()
        }
    );
    assert_eq!(last.revision, after.revision);
    let note = last.note.as_deref().unwrap_or_default();
    assert!(
        note.contains(announcement.message.id.as_str())
            && note.contains("Announced to nowhere")
            && note.contains("headers too large for a frame"),
        "the history says what was given up and why: {note}"
    );
    let again = engine.discard_unsent(id, announcement.id, "again").await;
    assert!(
        matches!(&again, Err(EngineError::InvalidAction { reason, .. }) if reason.contains("not an unsent message of the saga")),
        "{again:?}"
    );
    assert_eq!(store.history(id).await.expect("history").len(), history.len());

    // The reservation's lease was given back: it goes at once, while the
    // other saga's messages keep theirs.
    let round = relay.run_once().await.expect("round");
    assert_eq!((round.claimed, round.sent), (1, 1), "the reservation goes");
    let reserved = transport.take("stock-queue");
    assert_eq!(reserved.len(), 1);
    assert_eq!(
        (reserved[0].kind.as_str(), reserved[0].payload.as_slice()),
        ("Reserve", br#""o-7""#.as_slice()),
        "the reservation of the saga whose announcement was given up"
    );
    assert_eq!(unsent(id).await.len(), 0, "nothing of the saga is left in the outbox");
}

/// A broker that takes messages and never confirms them.
struct NeverConfirms;

#[async_trait]
impl saga_core::Publisher for NeverConfirms {
    async fn publish(&self, _message: &Message) -> Result<(), saga_core::TransportError> {
        std::future::pending().await
    }
}

// On the paused clock (nothing here does I/O): the bound is then exact, not
// at the mercy of a busy machine's scheduling.
#[tokio::test(start_paused = true)]
async fn a_round_that_outlasts_its_lease_gives_the_batch_back() {
    let store = InMemoryStore::new();
    let engine = Engine::builder(Arc::new(store.clone()))
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    engine.start("orders", order("o-6")).await.expect("start");
    engine.start("orders", order("o-7")).await.expect("start");
    let lease = Duration::from_millis(200);
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(NeverConfirms),
        RelayConfig {
            lease,
            ..RelayConfig::default()
        },
    );
    let started = tokio::time::Instant::now();
    let round = tokio::time::timeout(Duration::from_secs(5), relay.run_once())
        .await
        .expect("the round ends within its lease, not when the broker answers")
        .expect("round");
    assert!(started.elapsed() < lease, "the round took {:?}", started.elapsed());
    assert_eq!((round.claimed, round.sent, round.failed), (2, 0, 2));
    // Given back at once: another relay need not wait for the lease.
    let again = store.claim(10, Duration::from_secs(1)).await.expect("claim");
    assert_eq!(again.len(), 2, "the batch is claimable again");
}

#[test]
fn a_dead_relays_messages_wait_a_few_seconds_not_a_reply_deadline() {
    let lease = RelayConfig::default().lease;
    assert!(lease <= Duration::from_secs(5), "{lease:?}");
}

#[tokio::test]
async fn the_whole_pipeline_runs_and_poison_messages_are_dead_lettered() {
    let store = InMemoryStore::new();
    let transport = Arc::new(InMemoryTransport::new());
    transport.bind("stock", "stock-queue");
    transport.bind("replies", "reply-queue");
    let engine = Engine::builder(Arc::new(store.clone()))
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Relay::new(Arc::new(store.clone()), transport.clone(), RelayConfig::default()).run(shutdown.clone()));
    tasks.spawn(
        Consumer::new(
            Arc::new(engine.clone()),
            transport.clone(),
            ConsumerConfig::new("reply-queue"),
        )
        .run(shutdown.clone()),
    );
    tasks.spawn(
        Consumer::new(
            Arc::new(Participant::new("stock", Arc::new(store.clone()), Stock)),
            transport.clone(),
            ConsumerConfig::new("stock-queue"),
        )
        .run(shutdown.clone()),
    );
    // Poison first: it must not stop the consumer.
    saga_core::Publisher::publish(
        transport.as_ref(),
        &Message::new("Reserved", "replies", b"{oops".to_vec()),
    )
    .await
    .expect("publish");
    let id = engine.start("orders", order("o-6")).await.expect("start");
    // The stock participant replies once per command; two more parts arrive from elsewhere.
    for _ in 0..2 {
        saga_core::Publisher::publish(transport.as_ref(), &reply("o-6", true))
            .await
            .expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while status(&store, id).await != SagaStatus::Completed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga did not complete in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dead = transport.take("reply-queue.dlq");
    assert_eq!(dead.len(), 1, "the poison message is in the dead-letter queue");
    assert!(
        dead[0]
            .header(saga_core::DEAD_LETTER_REASON)
            .is_some_and(|r| r.contains("cannot decode"))
    );
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
}

#[test]
fn compensations_know_why_the_saga_failed() {
    use saga_core::testkit::SagaTest;
    let definition = SagaDefinition::<Vec<String>>::builder("why")
        .step(
            Step::local("first", |log: &mut Vec<String>, ctx| {
                log.push(format!("forward sees {:?}", ctx.failure()));
                Ok(())
            })
            .compensate(|log: &mut Vec<String>, ctx| {
                log.push(format!("compensation sees {:?}", ctx.failure()));
                Ok(())
            }),
        )
        .step(Step::local("second", |_: &mut Vec<String>, _| {
            Err(StepError::terminal("boom"))
        }))
        .build()
        .expect("valid");
    let mut test = SagaTest::new(definition);
    let id = SagaId::new();
    test.start_with_id(id, Vec::new());
    assert_eq!(test.instance().id, id);
    assert_eq!(test.status(), SagaStatus::Compensated);
    assert_eq!(
        test.data(),
        [
            "forward sees None",
            "compensation sees Some(\"step `second` failed: boom\")"
        ]
    );
}

struct Kinds(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl saga_core::MessageHandler for Kinds {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        self.0.lock().expect("not poisoned").push(message.kind.clone());
        Ok(())
    }
}

#[tokio::test]
async fn untyped_messages_take_the_queues_default_kind() {
    use saga_core::{Publisher, Subscriber};
    let transport = InMemoryTransport::new();
    transport.bind("replies", "reply-queue");
    transport
        .publish(&Message::new("", "replies", b"{}".to_vec()))
        .await
        .expect("publish");
    transport
        .publish(&Message::new("Typed", "replies", b"{}".to_vec()))
        .await
        .expect("publish");
    let handler = Kinds(std::sync::Mutex::new(Vec::new()));
    let config = ConsumerConfig::new("reply-queue").with_default_kind("StockUpdateResult");
    let mut subscription = transport.subscribe("reply-queue").await.expect("subscribe");
    for _ in 0..2 {
        let delivery = subscription.next().await.expect("open").expect("delivery");
        Consumer::process(&handler, delivery, &config).await;
    }
    assert_eq!(*handler.0.lock().expect("not poisoned"), ["StockUpdateResult", "Typed"]);
    assert_eq!(transport.stats("reply-queue").ready, 0, "both acked");
}

#[tokio::test]
async fn the_commit_hook_hears_each_committed_transition_once() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&heard);
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .message_headers(|headers| {
            headers.insert("x-origin".into(), "test".into());
        })
        .on_committed(move |instance, transition| {
            log.lock()
                .expect("not poisoned")
                .push((instance.status, transition.revision));
        })
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine");
    engine.start("orders", order("o-7")).await.expect("start");
    let part = reply("o-7", true);
    engine.handle(&part).await.expect("part");
    engine.handle(&part).await.expect("duplicate");
    engine.handle(&reply("o-7", false)).await.expect("refusal");
    assert_eq!(
        *heard.lock().expect("not poisoned"),
        [
            (SagaStatus::Running, 1),
            (SagaStatus::Running, 2),
            (SagaStatus::Compensated, 3)
        ],
        "start, the first part, the refusal; not the duplicate"
    );
    let sent = store.claim(10, Duration::from_secs(1)).await.expect("claim");
    assert!(
        sent.iter().all(|e| e.message.header("x-origin") == Some("test")),
        "headers added at enqueue"
    );
}

#[tokio::test]
async fn a_stranded_saga_needs_attention_and_resumes_its_compensation() {
    let clock = ManualClock::default();
    let (store, engine) = setup(&clock);
    let id = engine.start("orders", order("o-9")).await.expect("start");
    assert!(
        saga_core::testkit::strand(&store, SagaId::new(), 0, "nothing there")
            .await
            .expect("read")
            .is_none(),
        "an unknown saga is not stranded"
    );
    let stranded = saga_core::testkit::strand(&store, id, 0, "ledger down")
        .await
        .expect("stranded")
        .expect("exists");
    assert_eq!(stranded.status, SagaStatus::NeedsAttention);
    let stored = store.load(id).await.expect("load").expect("exists");
    assert_eq!(
        (stored.status, stored.revision),
        (SagaStatus::NeedsAttention, stranded.revision)
    );
    let last = store.history(id).await.expect("history").pop().expect("a transition");
    assert_eq!(last.note.as_deref(), Some("ledger down"));
    assert_eq!(last.after.status, SagaStatus::NeedsAttention);

    let resumed = engine.act(id, OperatorAction::Resume).await.expect("resume");
    assert_eq!(resumed.status, SagaStatus::Compensated);
}

/// The in-memory store, counting the instance reads and the transactions
/// the engine makes.
#[derive(Clone)]
struct CountingReads {
    store: InMemoryStore,
    reads: Arc<std::sync::atomic::AtomicUsize>,
    transactions: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingReads {
    fn new(store: &InMemoryStore) -> Self {
        Self {
            store: store.clone(),
            reads: Arc::default(),
            transactions: Arc::default(),
        }
    }

    fn transactions(&self) -> usize {
        self.transactions.load(Ordering::SeqCst)
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    fn read(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl SagaStore for CountingReads {
    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, saga_core::StoreError> {
        self.read();
        self.store.load(id).await
    }

    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, saga_core::StoreError> {
        self.read();
        self.store.find_by_key(definition, key).await
    }

    async fn load_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaInstance>, saga_core::StoreError> {
        self.read();
        self.store.load_by_key(definition, key).await
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, saga_core::StoreError> {
        self.transactions.fetch_add(1, Ordering::SeqCst);
        self.store.begin().await
    }
}

#[async_trait]
impl OutboxStore for CountingReads {
    async fn claim(&self, limit: usize, lease: Duration) -> Result<Vec<saga_core::OutboxEntry>, saga_core::StoreError> {
        self.store.claim(limit, lease).await
    }

    async fn mark_sent(&self, ids: &[saga_core::OutboxId]) -> Result<(), saga_core::StoreError> {
        self.store.mark_sent(ids).await
    }

    async fn release(&self, ids: &[saga_core::OutboxId]) -> Result<(), saga_core::StoreError> {
        self.store.release(ids).await
    }
}

#[async_trait]
impl saga_core::DeadlineStore for CountingReads {
    async fn due(
        &self,
        now: saga_core::Timestamp,
        limit: usize,
    ) -> Result<Vec<saga_core::DueDeadline>, saga_core::StoreError> {
        self.store.due(now, limit).await
    }
}

#[async_trait]
impl QueryStore for CountingReads {
    async fn history(&self, id: SagaId) -> Result<Vec<saga_core::Transition>, saga_core::StoreError> {
        self.store.history(id).await
    }

    async fn list(&self, filter: &saga_core::InstanceFilter) -> Result<Vec<SagaInstance>, saga_core::StoreError> {
        self.store.list(filter).await
    }

    async fn summary(&self, query: &saga_core::SummaryQuery) -> Result<saga_core::Summary, saga_core::StoreError> {
        self.store.summary(query).await
    }

    async fn unsent_messages(
        &self,
        filter: &saga_core::UnsentFilter,
    ) -> Result<Vec<saga_core::UnsentMessage>, saga_core::StoreError> {
        self.store.unsent_messages(filter).await
    }
}

/// An engine (a replica) over `store`, keeping `cached` instances.
fn replica(store: Arc<dyn saga_core::Store>, clock: &ManualClock, cached: usize) -> Engine {
    Engine::builder(store)
        .clock(clock.clone())
        .config(saga_core::EngineConfig {
            cached_instances: Some(cached),
            ..saga_core::EngineConfig::default()
        })
        .register(order_saga(1, Duration::from_secs(30)))
        .build()
        .expect("engine")
}

/// A store and two replicas over it, each keeping 16 instances.
fn two_replicas(clock: &ManualClock) -> (InMemoryStore, Engine, Engine) {
    let memory = InMemoryStore::with_clock(clock.clone());
    let store: Arc<dyn saga_core::Store> = Arc::new(memory.clone());
    let (first, second) = (replica(Arc::clone(&store), clock, 16), replica(store, clock, 16));
    (memory, first, second)
}

async fn parts(store: &InMemoryStore, id: SagaId) -> u32 {
    let instance = store.load(id).await.expect("load").expect("exists");
    serde_json::from_str::<Order>(&instance.data).expect("order data").parts
}

#[tokio::test]
async fn replies_to_sagas_this_engine_moved_last_are_decided_without_a_read() {
    let clock = ManualClock::default();
    let memory = InMemoryStore::with_clock(clock.clone());
    for (cached, reads_per_reply) in [(16, 0), (0, 1)] {
        let store = CountingReads::new(&memory);
        let engine = replica(Arc::new(store.clone()), &clock, cached);
        let order_id = format!("o-{cached}");
        let id = engine.start("orders", order(&order_id)).await.expect("start");
        for _ in 0..3 {
            let handled = engine.handle(&reply(&order_id, true)).await.expect("reply");
            assert!(matches!(handled, Handled::Applied { .. }), "{handled:?}");
        }
        assert_eq!(status(&memory, id).await, SagaStatus::Completed);
        assert_eq!(
            store.reads(),
            3 * reads_per_reply,
            "instance reads for three replies, keeping {cached} instances"
        );
        assert_eq!(parts(&memory, id).await, 3);
    }
}

#[tokio::test]
async fn a_replica_decides_on_what_the_store_holds_once_another_moved_the_saga_on() {
    let clock = ManualClock::default();
    let (memory, first, second) = two_replicas(&clock);

    // The first replica keeps the saga as it started it; the second moves it
    // on. The first's next reply is decided on its stale copy, conflicts at
    // commit, and is decided again on the store's.
    let id = first.start("orders", order("o-1")).await.expect("start");
    second.handle(&reply("o-1", true)).await.expect("first part");
    let handled = first.handle(&reply("o-1", true)).await.expect("second part");
    assert!(matches!(handled, Handled::Applied { .. }), "{handled:?}");
    assert_eq!(parts(&memory, id).await, 2, "both parts counted, neither lost");

    // An operator retries the step through the second replica: a new command,
    // which the first's copy does not await. The reply to it must not be
    // ignored on that copy's word.
    let awaited_before = memory.load(id).await.expect("load").expect("exists").awaiting;
    second.act(id, OperatorAction::Retry).await.expect("retry");
    let awaited = memory.load(id).await.expect("load").expect("exists").awaiting;
    assert_ne!(awaited, awaited_before, "the retry sent a new command");
    let answer = reply("o-1", true).with_header(IN_REPLY_TO, awaited.expect("awaits a reply").as_str());
    let handled = first.handle(&answer).await.expect("third part");
    assert_eq!(
        handled,
        Handled::Applied {
            saga: id,
            status: SagaStatus::Completed
        }
    );
    assert_eq!(parts(&memory, id).await, 3);

    // And a reply to the command the retry replaced is ignored, by either.
    let late = reply("o-1", true).with_header(IN_REPLY_TO, awaited_before.expect("awaited").as_str());
    assert!(matches!(first.handle(&late).await, Ok(Handled::Ignored(_))));
}

#[tokio::test]
async fn a_reply_reaches_the_saga_that_took_over_a_purged_sagas_key() {
    let clock = ManualClock::default();
    let (memory, first, second) = two_replicas(&clock);

    // The first replica starts the saga and keeps it; the second finishes it,
    // retention purges it, and a new saga takes its business key.
    let old = first.start("orders", order("k-1")).await.expect("start");
    for _ in 0..3 {
        second.handle(&reply("k-1", true)).await.expect("reply");
    }
    assert_eq!(status(&memory, old).await, SagaStatus::Completed);
    clock.advance(Duration::from_secs(7200));
    let purged = memory.purge(Duration::from_secs(3600), Some(Duration::from_secs(3600)));
    assert_eq!(purged.instances, 1, "the finished saga is purged");
    let new = second
        .start("orders", order("k-1"))
        .await
        .expect("the key is free again");

    // The first replica's copy still maps the key to the purged saga: its
    // reply must reach the new one, not be dead-lettered as unknown.
    let handled = first.handle(&reply("k-1", true)).await;
    assert!(
        matches!(handled, Ok(Handled::Applied { saga, .. }) if saga == new),
        "{handled:?}"
    );
    assert_eq!(parts(&memory, new).await, 1);
}

#[tokio::test]
async fn copies_that_keep_going_stale_are_compared_with_reads_until_they_are_current_again() {
    let clock = ManualClock::default();
    let memory = InMemoryStore::with_clock(clock.clone());
    let store = CountingReads::new(&memory);
    let shared: Arc<dyn saga_core::Store> = Arc::new(store.clone());
    let (first, second) = (
        replica(Arc::clone(&shared), &clock, 1024),
        replica(shared, &clock, 1024),
    );
    // Each saga starts on the first replica and takes three replies, which
    // the replicas take in turns: the second and third find the other
    // replica's copy one transition behind. Each replica judges its copies
    // by the 256: one stale copy a saga each.
    let mut per_saga = Vec::new();
    for n in 0..300 {
        let before = store.transactions();
        let key = format!("turns-{n}");
        first.start("orders", order(&key)).await.expect("start");
        for engine in [&second, &first, &second] {
            let handled = engine.handle(&reply(&key, true)).await.expect("reply");
            assert!(matches!(handled, Handled::Applied { .. }), "{handled:?}");
        }
        per_saga.push(store.transactions() - before);
    }
    assert_eq!(per_saga[0], 6, "two stale copies: two commits conflict");
    assert!(
        per_saga[260..].iter().all(|&n| n == 4),
        "once most copies were stale, no commit conflicts: {:?}",
        &per_saga[260..]
    );

    // One replica alone: its copies are current, and after a window of
    // reads that show it, used again.
    for n in 0..300 {
        let key = format!("alone-{n}");
        first.start("orders", order(&key)).await.expect("start");
        for _ in 0..3 {
            first.handle(&reply(&key, true)).await.expect("reply");
        }
    }
    let reads = store.reads();
    let id = first.start("orders", order("last")).await.expect("start");
    for _ in 0..3 {
        first.handle(&reply("last", true)).await.expect("reply");
    }
    assert_eq!(store.reads(), reads, "replies decided on copies again");
    assert_eq!(parts(&memory, id).await, 3);
}

#[tokio::test]
async fn a_reply_a_stale_copy_would_ignore_is_decided_on_what_the_store_holds() {
    let reply_step = |name: &str, command: &'static str, kind: &'static str| {
        Step::remote(name, move |o: &Order| Ok(Command::json(command, "warehouse", &o.id)?)).on_reply_keyed(
            kind,
            |r: &Reply| r.order_id.clone(),
            |_: &mut Order, r: Reply| {
                if r.ok {
                    ReplyOutcome::Success
                } else {
                    ReplyOutcome::Failure("refused".into())
                }
            },
        )
    };
    let shipping = || {
        SagaDefinition::builder("shipping")
            .key(|o: &Order| o.id.clone())
            .step(reply_step("hold", "Hold", "Held"))
            .step(reply_step("ship", "Ship", "Shipped"))
            .build()
            .expect("valid definition")
    };
    let memory = InMemoryStore::new();
    let replica = || {
        Engine::builder(Arc::new(memory.clone()))
            .config(saga_core::EngineConfig {
                cached_instances: Some(16),
                ..saga_core::EngineConfig::default()
            })
            .register(shipping())
            .build()
            .expect("engine")
    };
    let (first, second) = (replica(), replica());
    let id = first.start("shipping", order("s-1")).await.expect("start");
    let answer = |kind: &str| {
        Message::json(
            kind,
            "replies",
            &Reply {
                order_id: "s-1".into(),
                ok: true,
            },
        )
        .expect("encodable")
    };
    second.handle(&answer("Held")).await.expect("held");
    // The first replica's copy still waits for `Held`, so on its word
    // `Shipped` would be ignored; the store's instance waits for it.
    let handled = first.handle(&answer("Shipped")).await.expect("shipped");
    assert_eq!(
        handled,
        Handled::Applied {
            saga: id,
            status: SagaStatus::Completed
        }
    );
}

/// Fails the effects of sagas whose order id says so: `stuck` retryably
/// (counting the tries), `panic` by panicking.
#[derive(Default)]
struct EffectsByOrder {
    stuck_tries: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl EffectHandler<String> for EffectsByOrder {
    async fn apply(
        &self,
        _tx: &mut dyn Transaction,
        _saga: &SagaInstance,
        effects: Vec<String>,
    ) -> Result<(), StepError> {
        match effects.first().map(String::as_str) {
            Some("stuck") => {
                self.stuck_tries.fetch_add(1, Ordering::SeqCst);
                Err(StepError::retryable("application row locked"))
            }
            Some("panic") => panic!("an effect handler's bug"),
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn one_sagas_failing_or_panicking_deadline_does_not_stop_the_others() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let definition = guarded_saga();
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .register_with_effects(definition, EffectsByOrder::default())
        .build()
        .expect("engine");
    // The failing ones are due first.
    let stuck = engine.start("guarded", order("stuck")).await.expect("start");
    let panicking = engine.start("guarded", order("panic")).await.expect("start");
    clock.advance(Duration::from_secs(1));
    let fine = engine.start("guarded", order("fine")).await.expect("start");
    clock.advance(Duration::from_secs(60));

    let fired = engine.fire_due_deadlines().await.expect("the scan goes on past both");
    assert_eq!(fired, 1);
    assert_eq!(status(&store, fine).await, SagaStatus::Compensated);
    assert_eq!(
        status(&store, stuck).await,
        SagaStatus::Running,
        "rolled back, still due"
    );
    assert_eq!(
        status(&store, panicking).await,
        SagaStatus::Running,
        "rolled back, set aside"
    );
    // Both wait: the retryable one a short backoff, the panicking one longer.
    assert_eq!(engine.fire_due_deadlines().await.expect("scan"), 0);
    assert_eq!(status(&store, stuck).await, SagaStatus::Running);
}

#[tokio::test]
async fn a_deadline_batch_of_zero_fires_one_at_a_time_and_a_backlog_does_not_hold_up_shutdown() {
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let engine_with = |batch: usize| {
        Engine::builder(Arc::new(store.clone()))
            .clock(clock.clone())
            .config(saga_core::EngineConfig {
                deadline_batch: batch,
                ..saga_core::EngineConfig::default()
            })
            .register_with_effects(guarded_saga(), EffectsByOrder::default())
            .build()
            .expect("engine")
    };
    let engine = engine_with(0);
    let mut sagas = Vec::new();
    for i in 0..5 {
        sagas.push(engine.start("guarded", order(&format!("o-{i}"))).await.expect("start"));
    }
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        engine.fire_due_deadlines().await.expect("scan"),
        1,
        "a batch of at least one"
    );

    // Shutdown already asked for: one batch, not the whole backlog.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    tokio::time::timeout(
        Duration::from_secs(10),
        engine_with(1).run_deadlines(Duration::from_millis(10), shutdown),
    )
    .await
    .expect("the deadline loop ends on shutdown");
    let mut compensated = 0;
    for id in sagas {
        compensated += u32::from(status(&store, id).await == SagaStatus::Compensated);
    }
    assert_eq!(compensated, 2, "the first scan's one, and one batch of the loop's");
}

fn guarded_saga() -> SagaDefinition<Order, String> {
    SagaDefinition::<Order, String>::builder("guarded")
        .step(
            Step::local("hold", |_: &mut Order, _| Ok(())).compensate(|o: &mut Order, ctx| {
                ctx.effect(o.id.clone());
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve", |o: &Order| Ok(Command::json("Reserve", "stock", &o.id)?))
                .on_reply("Reserved", |_: &mut Order, _: bool| ReplyOutcome::Success)
                .timeout(Duration::from_secs(30)),
        )
        .build()
        .expect("valid")
}

#[tokio::test]
async fn deadlines_that_keep_failing_retryably_back_off_and_never_crowd_out_the_others() {
    let tried = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let clock = ManualClock::default();
    let store = InMemoryStore::with_clock(clock.clone());
    let engine = Engine::builder(Arc::new(store.clone()))
        .clock(clock.clone())
        .config(saga_core::EngineConfig {
            deadline_batch: 2,
            ..saga_core::EngineConfig::default()
        })
        .register_with_effects(
            guarded_saga(),
            EffectsByOrder {
                stuck_tries: Arc::clone(&tried),
            },
        )
        .build()
        .expect("engine");
    // More failing deadlines than a batch, all due before the healthy one.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(engine.start("guarded", order("stuck")).await.expect("start"));
    }
    clock.advance(Duration::from_secs(1));
    let fine = engine.start("guarded", order("fine")).await.expect("start");
    clock.advance(Duration::from_secs(60));

    // Each scan passes over the ones waiting out a backoff, so the healthy
    // deadline fires within a few scans, with no time passing.
    let mut fired = 0;
    for _ in 0..3 {
        fired += engine.fire_due_deadlines().await.expect("scan");
    }
    assert_eq!(fired, 1);
    assert_eq!(status(&store, fine).await, SagaStatus::Compensated);

    for id in &stuck {
        assert_eq!(status(&store, *id).await, SagaStatus::Running);
    }
    assert_eq!(tried.load(Ordering::SeqCst), 3, "each failing one tried once");

    // They are tried again once their backoff has passed, and wait twice as
    // long after a second failure in a row.
    clock.advance(saga_core::DEADLINE_RETRY_BACKOFF);
    engine.fire_due_deadlines().await.expect("scan");
    engine.fire_due_deadlines().await.expect("scan");
    assert_eq!(tried.load(Ordering::SeqCst), 6, "each tried again after its backoff");
    clock.advance(saga_core::DEADLINE_RETRY_BACKOFF);
    engine.fire_due_deadlines().await.expect("scan");
    assert_eq!(tried.load(Ordering::SeqCst), 6, "a second failure waits longer");
    clock.advance(saga_core::DEADLINE_RETRY_BACKOFF);
    engine.fire_due_deadlines().await.expect("scan");
    engine.fire_due_deadlines().await.expect("scan");
    assert_eq!(tried.load(Ordering::SeqCst), 9);
}

/// Panics on `Boom`; records every other kind.
struct PanicsOnBoom(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl saga_core::MessageHandler for PanicsOnBoom {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        assert!(message.kind != "Boom", "a handler's bug");
        self.0.lock().expect("not poisoned").push(message.kind.clone());
        Ok(())
    }
}

#[tokio::test]
async fn a_message_whose_handler_panics_is_retried_then_dead_lettered_not_redelivered_forever() {
    use saga_core::Publisher;
    let transport = Arc::new(InMemoryTransport::new());
    transport.bind("events", "q");
    let handler = Arc::new(PanicsOnBoom(std::sync::Mutex::new(Vec::new())));
    let config = ConsumerConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            multiplier: 1,
        },
        ..ConsumerConfig::new("q")
    };
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(Consumer::new(handler.clone(), transport.clone(), config).run(shutdown.clone()));
    for kind in ["Boom", "Fine"] {
        transport
            .publish(&Message::new(kind, "events", b"{}".to_vec()))
            .await
            .expect("publish");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let dead = loop {
        let dead = transport.take("q.dlq");
        if !dead.is_empty() {
            break dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the panicking message never reached the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind, "Boom");
    assert!(
        dead[0]
            .header(saga_core::DEAD_LETTER_REASON)
            .is_some_and(|r| r.contains("panicked") && r.contains("a handler's bug")),
        "{:?}",
        dead[0].header(saga_core::DEAD_LETTER_REASON)
    );
    assert_eq!(
        *handler.0.lock().expect("not poisoned"),
        ["Fine"],
        "the other message went through"
    );
    shutdown.cancel();
    consumer.await.expect("the consumer ends");
}

/// Never finishes: a handler stuck on an outage.
struct Stuck(tokio::sync::Notify);

#[async_trait]
impl saga_core::MessageHandler for Stuck {
    async fn handle(&self, _message: &Message) -> Result<(), EngineError> {
        self.0.notify_one();
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_handler_holds_shutdown_for_the_grace_only_and_its_delivery_goes_back() {
    // One handler at a time, all of them stuck: no permit comes back either.
    stuck_handlers_hold_shutdown_for_the_grace_only(1).await;
    stuck_handlers_hold_shutdown_for_the_grace_only(16).await;
}

async fn stuck_handlers_hold_shutdown_for_the_grace_only(concurrency: usize) {
    use saga_core::{Publisher, Subscriber};
    let transport = Arc::new(InMemoryTransport::new());
    transport.bind("events", "q");
    let handler = Arc::new(Stuck(tokio::sync::Notify::new()));
    let grace = Duration::from_secs(3);
    let config = ConsumerConfig {
        shutdown_grace: grace,
        concurrency,
        ..ConsumerConfig::new("q")
    };
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(Consumer::new(handler.clone(), transport.clone(), config).run(shutdown.clone()));
    let message = Message::new("Stuck", "events", b"{}".to_vec());
    transport.publish(&message).await.expect("publish");
    handler.0.notified().await;

    let stopping = tokio::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(grace * 2, consumer)
        .await
        .unwrap_or_else(|_| {
            panic!("with {concurrency} at once, the consumer ends after its grace, not with the handler")
        })
        .expect("no panic");
    assert!(
        stopping.elapsed() >= grace,
        "ended before the grace: {:?}",
        stopping.elapsed()
    );

    let mut again = transport.subscribe("q").await.expect("subscribe");
    let delivery = tokio::time::timeout(Duration::from_secs(1), again.next())
        .await
        .expect("the delivery went back to the queue")
        .expect("open")
        .expect("a delivery");
    assert_eq!(delivery.message.id, message.id);
}

/// The shop's tables, as effects see them: a released order cannot ship.
#[derive(Clone, Default)]
struct Shop {
    released: Arc<AtomicBool>,
}

#[async_trait]
impl EffectHandler<&'static str> for Shop {
    async fn apply(
        &self,
        _tx: &mut dyn Transaction,
        _saga: &SagaInstance,
        effects: Vec<&'static str>,
    ) -> Result<(), StepError> {
        for effect in effects {
            match effect {
                "release" => self.released.store(true, Ordering::SeqCst),
                _ if self.released.load(Ordering::SeqCst) => {
                    return Err(StepError::terminal("the order was released: it cannot ship"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_effect_failing_on_a_stale_copy_is_decided_again_on_the_store_not_dead_lettered() {
    let definition = || {
        SagaDefinition::<Order, &'static str>::builder("shipping")
            .step(
                Step::local("hold", |_: &mut Order, _| Ok(())).compensate(|_: &mut Order, ctx| {
                    ctx.effect("release");
                    Ok(())
                }),
            )
            .step(
                Step::remote("reserve", |o: &Order| Ok(Command::json("Reserve", "stock", &o.id)?))
                    .on_reply("Reserved", |_: &mut Order, _: bool| ReplyOutcome::Success),
            )
            .step(Step::local("ship", |_: &mut Order, ctx| {
                ctx.effect("ship");
                Ok(())
            }))
            .build()
            .expect("valid")
    };
    let store = InMemoryStore::new();
    let shop = Shop::default();
    let engine = |cached| {
        Engine::builder(Arc::new(store.clone()))
            .config(saga_core::EngineConfig {
                cached_instances: Some(cached),
                ..saga_core::EngineConfig::default()
            })
            .register_with_effects(definition(), shop.clone())
            .build()
            .expect("engine")
    };
    let (first, second) = (engine(16), engine(0));
    // The first replica starts the saga and keeps it; an operator cancels
    // it through the second, and its compensation releases the order.
    let id = first.start("shipping", order("o-ship")).await.expect("start");
    let awaited = store.load(id).await.expect("load").expect("exists").awaiting;
    second.act(id, OperatorAction::Cancel).await.expect("cancel");
    assert_eq!(status(&store, id).await, SagaStatus::Compensated);
    // The stock reply reaches the first replica, whose copy still awaits it:
    // decided on the copy, the ship effect fails against the released order.
    let reply = Message::json("Reserved", "replies", &true)
        .expect("encodable")
        .with_correlation_id(id.to_string())
        .with_header(IN_REPLY_TO, awaited.expect("awaits the reply").as_str());
    let handled = first.handle(&reply).await;
    assert!(
        matches!(handled, Ok(Handled::Ignored(_))),
        "decided again on the store: ignored, not an error to dead-letter: {handled:?}"
    );
    assert_eq!(status(&store, id).await, SagaStatus::Compensated);
}
