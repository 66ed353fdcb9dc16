//! Property tests over generated definitions and schedules (see the README's
//! "Guarantees"). Each case runs a schedule twice over the in-memory
//! backends — once with crashes injected, once without — and checks:
//! 1. every instance ends Completed or Compensated, or NeedsAttention only
//!    when a compensation keeps failing past its limit;
//! 2. exactly the completed compensable steps are compensated, once each,
//!    in reverse order;
//! 3. no forward action or compensation is applied twice;
//! 4. the messages published are exactly those the transitions emitted
//!    (re-publications carry the same id and content);
//! 5. the final state with crashes equals the final state without;
//! 6. instances and data survive a serialization round trip.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use saga_core::memory::{InMemoryStore, InMemoryTransaction, InMemoryTransport};
use saga_core::{
    Command, EffectHandler, Engine, EngineConfig, IN_REPLY_TO, ManualClock, Message, MessageId, OutboxStore, Publisher,
    QueryStore, Relay, RelayConfig, ReplyOutcome, RetryPolicy, SagaDefinition, SagaId, SagaInstance, SagaStatus,
    SagaStore, Step, StepError, Timestamp, Transaction, Transition,
};

const MAX_ATTEMPTS: u32 = 3;
const PARTICIPANT: &str = "participant";
const PARTICIPANT_QUEUE: &str = "participant-queue";
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
struct StepSpec {
    remote: bool,
    compensable: bool,
    deadline: bool,
    /// Retryable failures of the local action before it succeeds (≥ MAX_ATTEMPTS: it fails).
    failures: u32,
    /// The local action fails terminally.
    fatal: bool,
    /// Retryable failures of the compensation (≥ MAX_ATTEMPTS: needs attention).
    compensation_failures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Success,
    Failure,
    Silence,
}

#[derive(Clone, Debug)]
struct ReplyPlan {
    answer: Answer,
    /// Extra copies of the reply, same id.
    duplicates: u8,
    /// A second, contradicting reply with another id.
    contradict: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Relay,
    RelayCrash,
    Participant,
    Deliver(usize),
    DeliverDuplicate(usize),
    DeliverCrashAfterCommit(usize),
    Tick(u64),
    CrashEngine,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Data {
    forward: Vec<usize>,
    compensated: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    step: usize,
    compensation: bool,
}

#[derive(Deserialize)]
struct ReplyBody {
    ok: bool,
}

type EffectLog = Arc<Mutex<Vec<(SagaId, Applied)>>>;

struct LogEffects(EffectLog);

#[async_trait]
impl EffectHandler<Applied> for LogEffects {
    async fn apply(
        &self,
        tx: &mut dyn Transaction,
        saga: &SagaInstance,
        effects: Vec<Applied>,
    ) -> Result<(), StepError> {
        let tx = tx
            .backend()
            .downcast_mut::<InMemoryTransaction>()
            .ok_or_else(|| StepError::terminal("not an in-memory transaction"))?;
        let log = Arc::clone(&self.0);
        let id = saga.id;
        tx.on_commit(move || {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.extend(effects.into_iter().map(|e| (id, e)));
        });
        Ok(())
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: MAX_ATTEMPTS,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(1),
        multiplier: 1,
    }
}

fn definition(specs: &[StepSpec]) -> SagaDefinition<Data, Applied> {
    let mut builder = SagaDefinition::<Data, Applied>::builder("generated");
    for (i, spec) in specs.iter().enumerate() {
        let mut step = if spec.remote {
            let step = Step::remote(format!("step-{i}"), move |_: &Data| {
                Command::json(format!("Cmd{i}"), PARTICIPANT, &i).map_err(|e| StepError::terminal(e.to_string()))
            })
            .on_reply(format!("Reply{i}"), |_: &mut Data, reply: ReplyBody| {
                if reply.ok {
                    ReplyOutcome::Success
                } else {
                    ReplyOutcome::Failure("refused".into())
                }
            });
            if spec.deadline { step.timeout(DEADLINE) } else { step }
        } else {
            let spec = spec.clone();
            Step::local(format!("step-{i}"), move |data: &mut Data, ctx| {
                if spec.fatal {
                    return Err(StepError::terminal("fatal"));
                }
                if ctx.attempt() < spec.failures {
                    return Err(StepError::retryable("busy"));
                }
                data.forward.push(i);
                ctx.effect(Applied {
                    step: i,
                    compensation: false,
                });
                Ok(())
            })
        };
        if spec.compensable {
            let failures = spec.compensation_failures;
            step = step.compensate(move |data: &mut Data, ctx| {
                if ctx.attempt() < failures {
                    return Err(StepError::retryable("compensation busy"));
                }
                data.compensated.push(i);
                ctx.effect(Applied {
                    step: i,
                    compensation: true,
                });
                ctx.send(
                    Command::json(format!("Undo{i}"), PARTICIPANT, &i)
                        .map_err(|e| StepError::terminal(e.to_string()))?,
                );
                Ok(())
            });
        }
        builder = builder.step(step.retry(policy()).compensation_retry(policy()));
    }
    builder
        .build()
        .unwrap_or_else(|e| panic!("generated definition is invalid: {e}"))
}

struct World {
    specs: Vec<StepSpec>,
    plans: Vec<Vec<ReplyPlan>>,
    ids: Vec<SagaId>,
    clock: ManualClock,
    store: InMemoryStore,
    transport: InMemoryTransport,
    /// Replicas of the engine over the one store, taking turns on messages
    /// and deadlines: each keeps its own copies of instances, which go stale
    /// as the others move sagas on.
    engines: Vec<Engine>,
    /// Turns taken so far, which pick the replica.
    turns: usize,
    log: EffectLog,
    network: Vec<Message>,
    redeliveries: Vec<Message>,
    seen_commands: HashSet<MessageId>,
    published: Vec<Message>,
    crashes: bool,
}

impl World {
    fn new(specs: &[StepSpec], plans: &[Vec<ReplyPlan>], crashes: bool, replicas: usize) -> Self {
        let clock = ManualClock::new(Timestamp::from_millis(1_700_000_000_000));
        let store = InMemoryStore::with_clock(clock.clone());
        let transport = InMemoryTransport::new();
        transport.bind(PARTICIPANT, PARTICIPANT_QUEUE);
        let log = EffectLog::default();
        let engines = (0..replicas.max(1))
            .map(|_| Self::engine(specs, &store, &clock, &log))
            .collect();
        let ids = (0..plans.len())
            .map(|i| SagaId::from_uuid(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + i as u128)))
            .collect();
        Self {
            specs: specs.to_vec(),
            plans: plans.to_vec(),
            ids,
            clock,
            store,
            transport,
            engines,
            turns: 0,
            log,
            network: Vec::new(),
            redeliveries: Vec::new(),
            seen_commands: HashSet::new(),
            published: Vec::new(),
            crashes,
        }
    }

    fn engine(specs: &[StepSpec], store: &InMemoryStore, clock: &ManualClock, log: &EffectLog) -> Engine {
        Engine::builder(Arc::new(store.clone()))
            .clock(clock.clone())
            // Copies of instances, which the in-memory store would not need.
            .config(EngineConfig {
                cached_instances: Some(64),
                ..EngineConfig::default()
            })
            .register_with_effects(definition(specs), LogEffects(Arc::clone(log)))
            .build()
            .unwrap_or_else(|e| panic!("engine: {e}"))
    }

    /// The replica whose turn it is.
    fn replica(&mut self) -> &Engine {
        self.turns += 1;
        &self.engines[self.turns % self.engines.len()]
    }

    async fn start_all(&mut self) {
        for id in self.ids.clone() {
            self.replica()
                .start_with_id("generated", id, Data::default())
                .await
                .unwrap_or_else(|e| panic!("start: {e}"));
        }
    }

    async fn relay(&mut self, crash: bool) {
        if crash && self.crashes {
            // Publish, then die before marking: the rows stay unsent and are
            // published again (same ids) by a later round.
            let claimed = self.store.claim(64, Duration::ZERO).await.unwrap_or_default();
            for entry in claimed {
                self.transport
                    .publish(&entry.message)
                    .await
                    .unwrap_or_else(|e| panic!("publish: {e}"));
            }
        } else {
            let relay = Relay::new(
                Arc::new(self.store.clone()),
                Arc::new(self.transport.clone()),
                RelayConfig::default(),
            );
            relay.run_once().await.unwrap_or_else(|e| panic!("relay: {e}"));
        }
    }

    fn participant(&mut self) {
        let mut commands = self.transport.take(PARTICIPANT_QUEUE);
        // The relay publishes different sagas' messages concurrently, so their
        // interleaving is arbitrary; only per-saga order is promised. Fix one
        // interleaving so both runs of a schedule see the same replies.
        commands.sort_by(|a, b| a.correlation_id.cmp(&b.correlation_id));
        for command in commands {
            self.published.push(command.clone());
            if !self.seen_commands.insert(command.id.clone()) {
                continue;
            }
            let Some(step) = command.kind.strip_prefix("Cmd").and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            let saga = command.correlation_id.as_deref().and_then(|c| c.parse::<SagaId>().ok());
            let Some(instance) = saga.and_then(|s| self.ids.iter().position(|id| *id == s)) else {
                continue;
            };
            let plan = &self.plans[instance][step];
            let mut answer = plan.answer;
            if answer == Answer::Silence && !self.specs[step].deadline {
                answer = Answer::Failure;
            }
            let reply = |ok: bool, index: usize| {
                Message::new(
                    format!("Reply{step}"),
                    "engine",
                    format!("{{\"ok\":{ok}}}").into_bytes(),
                )
                .with_id(MessageId::derived_from("participant", &command.id, index))
                .with_correlation_id(command.correlation_id.clone().unwrap_or_default())
                .with_header(IN_REPLY_TO, command.id.as_str())
            };
            if answer != Answer::Silence {
                let ok = answer == Answer::Success;
                for _ in 0..=plan.duplicates {
                    self.network.push(reply(ok, 0));
                }
                if plan.contradict {
                    self.network.push(reply(!ok, 1));
                }
            }
        }
    }

    async fn deliver(&mut self, message: &Message) {
        match self.replica().handle(message).await {
            Ok(_) => {}
            Err(e) => panic!("handling {} failed: {e}", message.kind),
        }
    }

    async fn tick(&mut self, millis: u64) {
        self.clock.advance(Duration::from_millis(millis));
        self.replica()
            .fire_due_deadlines()
            .await
            .unwrap_or_else(|e| panic!("deadlines: {e}"));
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Relay => self.relay(false).await,
            Op::RelayCrash => self.relay(true).await,
            Op::Participant => self.participant(),
            Op::Deliver(i) if !self.network.is_empty() => {
                let message = self.network.remove(i % self.network.len());
                self.deliver(&message).await;
            }
            Op::DeliverDuplicate(i) if !self.network.is_empty() => {
                let message = self.network[i % self.network.len()].clone();
                self.deliver(&message).await;
            }
            Op::DeliverCrashAfterCommit(i) if !self.network.is_empty() => {
                let message = self.network.remove(i % self.network.len());
                self.deliver(&message).await;
                if self.crashes {
                    // The commit happened but the ack was lost: the broker redelivers.
                    self.redeliveries.push(message);
                }
            }
            Op::Tick(millis) => self.tick(millis).await,
            Op::CrashEngine => {
                if self.crashes {
                    for engine in &mut self.engines {
                        *engine = Self::engine(&self.specs, &self.store, &self.clock, &self.log);
                    }
                }
            }
            Op::Deliver(_) | Op::DeliverDuplicate(_) | Op::DeliverCrashAfterCommit(_) => {}
        }
    }

    async fn settled(&self) -> bool {
        for id in &self.ids {
            let instance = self.store.load(*id).await.ok().flatten();
            match instance.map(|i| i.status) {
                Some(SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::NeedsAttention) => {}
                _ => return false,
            }
        }
        self.store.unsent() == 0 && self.network.is_empty() && self.redeliveries.is_empty()
    }

    async fn drain(&mut self) {
        for _ in 0..64 {
            self.relay(false).await;
            self.participant();
            while !self.network.is_empty() {
                let message = self.network.remove(0);
                self.deliver(&message).await;
            }
            for message in std::mem::take(&mut self.redeliveries) {
                self.deliver(&message).await;
            }
            self.relay(false).await;
            self.participant();
            if self.settled().await {
                return;
            }
            self.tick(3_600_000).await;
        }
        panic!("the schedule did not settle within 64 drain rounds");
    }

    async fn finals(&self) -> Vec<(SagaInstance, Vec<Transition>)> {
        let mut out = Vec::new();
        for id in &self.ids {
            let instance = self
                .store
                .load(*id)
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("instance {id} lost"));
            let history = self.store.history(*id).await.unwrap_or_default();
            out.push((instance, history));
        }
        out
    }
}

async fn simulate(specs: &[StepSpec], plans: &[Vec<ReplyPlan>], ops: &[Op], crashes: bool, replicas: usize) -> World {
    let mut world = World::new(specs, plans, crashes, replicas);
    world.start_all().await;
    for op in ops {
        world.apply(op).await;
    }
    world.drain().await;
    world
}

fn check(world: &World, specs: &[StepSpec]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let finals = runtime.block_on(world.finals());
    let log = world.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut emitted: BTreeMap<MessageId, String> = BTreeMap::new();
    for (instance, history) in &finals {
        // 1. Terminal, or stuck only on a compensation that keeps failing.
        let status = instance.status;
        prop_assert!(
            matches!(
                status,
                SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::NeedsAttention
            ),
            "instance ended {status}"
        );
        // Where the forward run stopped: the step that failed, or all of them.
        // (The failure record names it: "step `step-K` ...".)
        let failed_at = instance.failure.as_deref().and_then(|f| {
            let rest = f.strip_prefix("step `step-")?;
            rest[..rest.find('`')?].parse::<usize>().ok()
        });
        let _ = history;
        let reached = failed_at.unwrap_or(specs.len());
        let locals: Vec<usize> = (0..reached).filter(|&i| !specs[i].remote).collect();
        let mut to_compensate: Vec<usize> = (0..reached).rev().filter(|&i| specs[i].compensable).collect();
        match status {
            SagaStatus::Completed => {
                prop_assert!(failed_at.is_none(), "a completed saga never compensated");
                to_compensate.clear();
            }
            SagaStatus::NeedsAttention => {
                let stuck = instance.step as usize - 1;
                prop_assert!(
                    specs[stuck].compensation_failures >= MAX_ATTEMPTS,
                    "needs attention only when a compensation exhausts its retries (step {stuck})"
                );
                let done = to_compensate
                    .iter()
                    .position(|&i| i == stuck)
                    .unwrap_or(to_compensate.len());
                to_compensate.truncate(done);
            }
            _ => prop_assert!(failed_at.is_some(), "a compensated saga had a failure"),
        }
        // 2 + 3. Effects applied exactly once each, forward in order then compensations in reverse.
        let mine: Vec<Applied> = log
            .iter()
            .filter(|(id, _)| *id == instance.id)
            .map(|(_, a)| *a)
            .collect();
        let forward: Vec<usize> = mine.iter().filter(|a| !a.compensation).map(|a| a.step).collect();
        let compensated: Vec<usize> = mine.iter().filter(|a| a.compensation).map(|a| a.step).collect();
        prop_assert_eq!(&forward, &locals, "forward actions applied");
        prop_assert_eq!(&compensated, &to_compensate, "compensations applied");
        let data: Data = serde_json::from_str(&instance.data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&data.forward, &locals);
        prop_assert_eq!(&data.compensated, &to_compensate);
        // 6. Round trips.
        let text = serde_json::to_string(instance).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: SagaInstance = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, instance);
        for transition in history {
            for (id, kind) in &transition.emitted {
                prop_assert!(
                    emitted.insert(id.clone(), kind.clone()).is_none(),
                    "message id {} emitted twice",
                    id
                );
            }
        }
    }
    // 4. Published = emitted, by id; re-publications identical.
    let mut published: BTreeMap<MessageId, &Message> = BTreeMap::new();
    for message in &world.published {
        if let Some(earlier) = published.insert(message.id.clone(), message) {
            prop_assert_eq!(earlier, message, "a re-publication must be the same message");
        }
    }
    let published_ids: BTreeSet<&MessageId> = published.keys().collect();
    let emitted_ids: BTreeSet<&MessageId> = emitted.keys().collect();
    prop_assert_eq!(published_ids, emitted_ids, "published messages = emitted messages");
    Ok(())
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u32..5,
        prop::bool::weighted(0.1),
        prop::sample::select(vec![0u32, 0, 0, 1, 2, 3, 5]),
    )
        .prop_map(
            |(remote, compensable, deadline, failures, fatal, compensation_failures)| StepSpec {
                remote,
                compensable,
                deadline,
                failures: if failures >= 3 {
                    failures * 2 / 3 + 1
                } else {
                    failures.min(1) * failures
                },
                fatal,
                compensation_failures,
            },
        )
}

fn reply_plan() -> impl Strategy<Value = ReplyPlan> {
    (
        prop_oneof![6 => Just(Answer::Success), 2 => Just(Answer::Failure), 2 => Just(Answer::Silence)],
        0u8..3,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(answer, duplicates, contradict)| ReplyPlan {
            answer,
            duplicates,
            contradict,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Relay),
        1 => Just(Op::RelayCrash),
        4 => Just(Op::Participant),
        6 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::DeliverDuplicate),
        2 => any::<usize>().prop_map(Op::DeliverCrashAfterCommit),
        3 => (0u64..15_000).prop_map(Op::Tick),
        1 => Just(Op::CrashEngine),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/properties.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn sagas_end_correctly_under_any_schedule_and_crashes(
        specs in prop::collection::vec(step_spec(), 1..=8),
        plans in prop::collection::vec(prop::collection::vec(reply_plan(), 8), 1..=3),
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let crashed = runtime.block_on(simulate(&specs, &plans, &ops, true, 1));
        let calm = runtime.block_on(simulate(&specs, &plans, &ops, false, 1));
        let replicated = runtime.block_on(simulate(&specs, &plans, &ops, false, 2));
        check(&crashed, &specs)?;
        check(&calm, &specs)?;
        check(&replicated, &specs)?;
        // 5. Crashes change nothing that was decided.
        let crashed_finals = runtime.block_on(crashed.finals());
        let calm_finals = runtime.block_on(calm.finals());
        prop_assert_eq!(&crashed_finals, &calm_finals, "final states with and without crashes differ");
        // 6. Neither do replicas taking turns, each deciding on its own
        // (often stale) copies of the instances.
        let replicated_finals = runtime.block_on(replicated.finals());
        prop_assert_eq!(replicated_finals, calm_finals, "final states of one engine and of two replicas differ");
    }
}
