//! `load-test`: the end-to-end load benchmark of the order service in
//! production mode (PostgreSQL + RabbitMQ) with the inventory service as its
//! participant.
//!
//! A run creates a fresh database and exchange / queue names of its own,
//! starts both services in this process (or uses an external order service),
//! measures the machine's raw ceilings with the same concurrency (single-row
//! INSERT commits; persistent, confirmed, consumed and acked messages) and
//! its latency floor (one commit, one broker hop, each one at a time),
//! offers `CreateOrder` closed-loop or open-loop, sees each saga finish by
//! consuming `OrderConfirmed` / `OrderCancelled` (never by polling), and
//! reports sagas per second, create → confirmed latency percentiles, CPU
//! seconds per 1,000 sagas and peak RSS, the ratio to the ceiling, and
//! where a saga's time goes between the services ([`Legs`]) ([`LoadReport`]). Nothing is relaxed for speed: the services run with
//! their defaults (`synchronous_commit` as the server has it, reported;
//! persistent messages, publisher confirms, acks after commit).

mod bench;
pub mod competitor;
mod config;
mod costs;
mod drive;
mod error;
mod floor;
mod legs;
mod machine;
mod raw;
mod report;
mod settings;
mod stage;
mod usage;

pub use bench::run;
pub use config::{DEFAULT_DATABASE_URL, DEFAULT_RABBITMQ_URL, LoadConfig, Mode};
pub use costs::{ProcessParts, SagaCosts};
pub use error::LoadError;
pub use floor::{LatencyFloor, OneAtATime};
pub use legs::Legs;
pub use raw::{Durability, RawFigure};
pub use report::{COMMITS_PER_SAGA, Ceiling, LoadReport, MESSAGES_PER_SAGA, Percentiles, RunReport};
pub use settings::TailSettings;
