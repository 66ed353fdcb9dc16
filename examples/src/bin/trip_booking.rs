//! A three-step saga with compensations, over the in-memory backends:
//!
//! 1. `create-booking` (local; compensation: mark the booking cancelled)
//! 2. `reserve-hotel` (remote; compensation: send `CancelHotel`)
//! 3. `charge-card` (remote, 5 s deadline)
//!
//! Two hotel and payment participants, written with the participant API,
//! answer over an in-process transport. The first trip completes; the second
//! is too expensive, its card is declined, and the saga compensates. Every
//! transition is printed from the instance's history.
//!
//! Run: `cargo run -p saga-examples --bin trip-booking`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use saga_core::memory::{InMemoryStore, InMemoryTransport};
use saga_core::{
    CancellationToken, Cause, Command, CommandHandler, Consumer, ConsumerConfig, Engine, Message, Participant,
    QueryStore, Relay, RelayConfig, ReplyOutcome, SagaDefinition, SagaId, SagaStatus, SagaStore, Step, StepError,
    Transaction,
};

const HOTEL: &str = "hotel-commands";
const PAYMENTS: &str = "payment-commands";
const REPLIES: &str = "trip-replies";
const CARD_LIMIT: u64 = 1_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Trip {
    traveller: String,
    nights: u32,
    price: u64,
    booking: Option<String>,
    hotel_confirmation: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct HotelReply {
    confirmation: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PaymentReply {
    charged: bool,
}

fn command<T: Serialize>(kind: &str, destination: &str, body: &T) -> Result<Command, StepError> {
    Command::json(kind, destination, body).map_err(|e| StepError::terminal(e.to_string()))
}

fn trip_saga() -> Result<SagaDefinition<Trip>, saga_core::DefinitionError> {
    SagaDefinition::builder("trip-booking")
        .step(
            Step::local("create-booking", |trip: &mut Trip, _| {
                trip.booking = Some(format!("B-{}-{}", trip.traveller, trip.nights));
                Ok(())
            })
            .compensate(|trip: &mut Trip, _| {
                trip.booking = None;
                Ok(())
            }),
        )
        .step(
            Step::remote("reserve-hotel", |trip: &Trip| {
                command("ReserveHotel", HOTEL, &trip.nights)
            })
            .on_reply("HotelReply", |trip: &mut Trip, reply: HotelReply| {
                match reply.confirmation {
                    Some(confirmation) => {
                        trip.hotel_confirmation = Some(confirmation);
                        ReplyOutcome::Success
                    }
                    None => ReplyOutcome::Failure("no room".into()),
                }
            })
            .timeout(Duration::from_secs(5))
            .compensate(|trip: &mut Trip, ctx| {
                ctx.send(command("CancelHotel", HOTEL, &trip.hotel_confirmation)?);
                Ok(())
            }),
        )
        .step(
            Step::remote("charge-card", |trip: &Trip| {
                command("ChargeCard", PAYMENTS, &trip.price)
            })
            .on_reply("PaymentReply", |_: &mut Trip, reply: PaymentReply| {
                if reply.charged {
                    ReplyOutcome::Success
                } else {
                    ReplyOutcome::Failure("card declined".into())
                }
            })
            .timeout(Duration::from_secs(5)),
        )
        .build()
}

/// The hotel: reserves rooms, and cancels them on request.
struct Hotel;

#[async_trait]
impl CommandHandler for Hotel {
    async fn handle(&self, _tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        match command.kind.as_str() {
            "ReserveHotel" => {
                let nights: u32 = command.decode().map_err(|e| StepError::terminal(e.to_string()))?;
                let reply = HotelReply {
                    confirmation: Some(format!("H-{nights}")),
                };
                Ok(vec![
                    saga_core::Command::json("HotelReply", REPLIES, &reply)
                        .map_err(|e| StepError::terminal(e.to_string()))?,
                ])
            }
            "CancelHotel" => {
                println!("    hotel: reservation cancelled");
                Ok(Vec::new())
            }
            other => Err(StepError::terminal(format!("hotel does not know `{other}`"))),
        }
    }
}

/// The payment service: charges up to a limit.
struct Payments;

#[async_trait]
impl CommandHandler for Payments {
    async fn handle(&self, _tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let price: u64 = command.decode().map_err(|e| StepError::terminal(e.to_string()))?;
        let reply = PaymentReply {
            charged: price <= CARD_LIMIT,
        };
        Ok(vec![
            Command::json("PaymentReply", REPLIES, &reply).map_err(|e| StepError::terminal(e.to_string()))?,
        ])
    }
}

async fn wait_until_finished(store: &InMemoryStore, id: SagaId) -> Result<SagaStatus, String> {
    for _ in 0..500 {
        if let Some(instance) = store.load(id).await.map_err(|e| e.to_string())?
            && instance.status.is_terminal()
        {
            return Ok(instance.status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("saga {id} did not finish within 5 s"))
}

async fn print_history(store: &InMemoryStore, id: SagaId) -> Result<(), String> {
    for t in store.history(id).await.map_err(|e| e.to_string())? {
        let cause = match &t.cause {
            Cause::Started => "started".to_owned(),
            Cause::Message { kind, .. } => format!("{kind} arrived"),
            Cause::Deadline { .. } => "deadline".to_owned(),
            Cause::Operator { action } => format!("operator {action}"),
        };
        let before = t
            .before
            .as_ref()
            .map_or("-".to_owned(), |p| format!("{} @{}", p.status, p.step));
        let sent: Vec<&str> = t.emitted.iter().map(|(_, kind)| kind.as_str()).collect();
        println!(
            "    r{} {cause:<20} {before:>16} -> {} @{}  sent {sent:?}{}",
            t.revision,
            t.after.status,
            t.after.step,
            t.note.map(|n| format!("  ({n})")).unwrap_or_default()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = InMemoryStore::new();
    let transport = InMemoryTransport::new();
    for queue in [HOTEL, PAYMENTS, REPLIES] {
        transport.bind(queue, queue);
    }
    let definition = trip_saga()?;
    println!("The saga:\n{}", definition.to_mermaid());
    let engine = Engine::builder(Arc::new(store.clone())).register(definition).build()?;

    let shutdown = CancellationToken::new();
    let transport = Arc::new(transport);
    let mut tasks = tokio::task::JoinSet::new();
    let relay = Relay::new(Arc::new(store.clone()), transport.clone(), RelayConfig::default());
    tasks.spawn(relay.run(shutdown.clone()));
    let consumers: [(Arc<dyn saga_core::MessageHandler>, &str); 3] = [
        (Arc::new(engine.clone()), REPLIES),
        (
            Arc::new(Participant::new("hotel", Arc::new(store.clone()), Hotel)),
            HOTEL,
        ),
        (
            Arc::new(Participant::new("payments", Arc::new(store.clone()), Payments)),
            PAYMENTS,
        ),
    ];
    for (handler, queue) in consumers {
        let consumer = Consumer::new(handler, transport.clone(), ConsumerConfig::new(queue));
        tasks.spawn(consumer.run(shutdown.clone()));
    }
    let deadlines = engine.clone();
    let token = shutdown.clone();
    tasks.spawn(async move { deadlines.run_deadlines(Duration::from_millis(100), token).await });

    let mut failures = Vec::new();
    for (traveller, price, expected) in [
        ("ada", 600, SagaStatus::Completed),
        ("bob", 4_000, SagaStatus::Compensated),
    ] {
        let trip = Trip {
            traveller: traveller.into(),
            nights: 3,
            price,
            booking: None,
            hotel_confirmation: None,
        };
        let id = engine.start("trip-booking", trip).await?;
        let status = wait_until_finished(&store, id).await?;
        println!("\n{traveller}'s trip ({price}): {status}");
        print_history(&store, id).await?;
        if status != expected {
            failures.push(format!("{traveller}'s trip ended {status}, expected {expected}"));
        }
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
