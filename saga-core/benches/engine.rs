#![allow(missing_docs)] // criterion_group! generates undocumented items.
//! Engine throughput over the in-memory backends, on one core (a
//! current-thread runtime).
//!
//! - `three_step_saga`: start → reply → reply, with the relay publishing the
//!   outbox to the in-process transport every 256 sagas: the full durable
//!   path of a three-step saga (local, remote, remote), 3 transitions.
//! - `transition/decide`: the pure decision function alone, one reply.
//! - `transition/engine_handle`: one reply through the engine (load, decide,
//!   commit of state + history + outbox + inbox).
//!
//! Run: `cargo bench -p saga-core --bench engine`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};

use saga_core::memory::{InMemoryStore, InMemoryTransport};
use saga_core::{
    Command, Engine, Event, Message, Relay, RelayConfig, ReplyOutcome, SagaDefinition, SagaId, SagaStore, Step,
    StepError, Timestamp,
};

#[derive(Clone, Serialize, Deserialize)]
struct Booking {
    customer: String,
    amount: u64,
    reserved: bool,
    charged: bool,
}

#[derive(Serialize, Deserialize)]
struct Ack {
    ok: bool,
}

fn command(kind: &str) -> Result<Command, StepError> {
    Ok(Command {
        kind: kind.to_owned(),
        destination: "participants".to_owned(),
        payload: br#"{"amount":100}"#.to_vec(),
    })
}

fn three_steps() -> SagaDefinition<Booking> {
    SagaDefinition::builder("booking")
        .step(Step::local("validate", |b: &mut Booking, _| {
            if b.amount == 0 {
                return Err(StepError::terminal("nothing to book"));
            }
            Ok(())
        }))
        .step(
            Step::remote("reserve", |_: &Booking| command("Reserve"))
                .on_reply("Reserved", |b: &mut Booking, a: Ack| {
                    b.reserved = a.ok;
                    if a.ok {
                        ReplyOutcome::Success
                    } else {
                        ReplyOutcome::Failure("no".into())
                    }
                })
                .timeout(Duration::from_secs(30))
                .compensate(|_: &mut Booking, ctx| {
                    ctx.send(command("Release")?);
                    Ok(())
                }),
        )
        .step(
            Step::remote("charge", |_: &Booking| command("Charge"))
                .on_reply("Charged", |b: &mut Booking, a: Ack| {
                    b.charged = a.ok;
                    if a.ok {
                        ReplyOutcome::Success
                    } else {
                        ReplyOutcome::Failure("declined".into())
                    }
                })
                .timeout(Duration::from_secs(30)),
        )
        .build()
        .expect("valid definition")
}

fn booking() -> Booking {
    Booking {
        customer: "ada".to_owned(),
        amount: 100,
        reserved: false,
        charged: false,
    }
}

fn reply(kind: &str, saga: SagaId) -> Message {
    Message::new(kind, "replies", br#"{"ok":true}"#.to_vec()).with_correlation_id(saga.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_sagas(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("three_step_saga");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::from_parameter("in_memory"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let store = InMemoryStore::new();
                let transport = InMemoryTransport::new();
                transport.bind("participants", "participant-queue");
                let engine = Engine::builder(Arc::new(store.clone()))
                    .register(three_steps())
                    .build()
                    .expect("engine");
                let relay = Relay::new(
                    Arc::new(store.clone()),
                    Arc::new(transport.clone()),
                    RelayConfig::default(),
                );
                let start = Instant::now();
                for i in 0..iters {
                    let id = engine.start("booking", booking()).await.expect("start");
                    engine.handle(&reply("Reserved", id)).await.expect("reserved");
                    engine.handle(&reply("Charged", id)).await.expect("charged");
                    if i % 256 == 255 {
                        while relay.run_once().await.expect("relay").claimed > 0 {}
                        transport.take("participant-queue");
                    }
                }
                while relay.run_once().await.expect("relay").claimed > 0 {}
                let elapsed = start.elapsed();
                assert_eq!(transport.take("participant-queue").len() as u64 % 2, 0);
                elapsed
            })
        });
    });
    group.finish();
}

fn bench_transition(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("transition");
    group.throughput(Throughput::Elements(1));
    let definition = three_steps();
    let now = Timestamp::now();
    let started = saga_core::start(&definition, SagaId::new(), booking(), now)
        .expect("start")
        .instance;
    let message = reply("Reserved", started.id);
    group.bench_function("decide", |b| {
        b.iter(|| saga_core::decide(&definition, &started, Event::Message(&message), now).expect("decide"))
    });
    group.bench_function("engine_handle", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let store = InMemoryStore::new();
                let engine = Engine::builder(Arc::new(store.clone()))
                    .register(three_steps())
                    .build()
                    .expect("engine");
                let mut ids = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    ids.push(engine.start("booking", booking()).await.expect("start"));
                }
                let messages: Vec<Message> = ids.iter().map(|id| reply("Reserved", *id)).collect();
                let start = Instant::now();
                for message in &messages {
                    engine.handle(message).await.expect("handle");
                }
                let elapsed = start.elapsed();
                assert!(store.load(ids[0]).await.expect("load").is_some());
                elapsed
            })
        });
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench_sagas, bench_transition
}
criterion_main!(benches);
