#![doc = include_str!("../README.md")]

mod clock;
mod consumer;
mod dead_letter;
mod decide;
mod definition;
mod engine;
mod error;
mod id;
mod instance;
mod linger;
mod message;
mod participant;
mod relay;
mod signal;
mod store;
mod summary;
mod transport;
mod upgrade;

pub mod memory;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use consumer::{Consumer, ConsumerConfig, MAX_DEAD_LETTER_REASON_BYTES, MessageHandler, settlement_for, shortened};
pub use dead_letter::{
    DeadLetter, DeadLetterPage, DeadLetterQueue, Origin, ReplayFailure, ReplayReport, ReplaySelection,
};
pub use decide::{Decision, Event, OperatorAction, Outcome, decide, start};
pub use definition::{ReplyOutcome, SagaBuilder, SagaData, SagaDefinition, Step, StepContext};
pub use engine::{
    CACHED_INSTANCES, DEADLINE_RETRY_BACKOFF, DEADLINE_RETRY_BACKOFF_MAX, EffectHandler, Engine, EngineBuilder,
    EngineConfig, Handled,
};
pub use error::{BoxError, DefinitionError, EngineError, RetryPolicy, StepError};
pub use id::{MessageId, SagaId};
pub use instance::{Cause, Position, SagaInstance, SagaStatus, Transition, UnknownStatus};
pub use linger::{Arrivals, Linger};
pub use message::{Command, IN_REPLY_TO, Message};
pub use participant::{CommandBatching, CommandHandler, Handling, Participant};
pub use relay::{MIN_LEASE, MIN_POLL_INTERVAL, Relay, RelayConfig, RelayRound};
pub use signal::cancel_on_signal;
pub use store::{
    DeadlineStore, DueDeadline, InstanceCursor, InstanceFilter, OutboxEntry, OutboxId, OutboxStore, QueryStore,
    SagaStore, Store, StoreError, Transaction, UnsentFilter, UnsentMessage,
};
pub use summary::{MINUTE, MinuteOutcomes, Summary, SummaryQuery, UNFINISHED};
pub use transport::{
    DEAD_LETTER_REASON, Delivery, Publisher, Settle, Settlement, Subscriber, Subscription, Transport, TransportError,
};
pub use upgrade::Upgrade;

pub use tokio_util::sync::CancellationToken;
