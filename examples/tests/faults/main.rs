//! The fault-tolerance suite (issue 7): the real `order-service` and
//! `inventory-service` binaries against the machine's PostgreSQL and
//! RabbitMQ, broken on purpose —
//!
//! 1. kill -9 of the order service mid-stream ([`crashes`]),
//! 2. kill -9 of the inventory participant mid-stream ([`crashes`]),
//! 3. a RabbitMQ outage under load ([`outages`]),
//! 4. a PostgreSQL restart under load ([`outages`]),
//! 5. duplicate, reordered, contradicting, late and unknown replies ([`replies`]),
//! 6. two and three replicas, one killed mid-stream ([`replicas`]),
//! 7. a reply deadline passing while the service is down ([`crashes`]),
//! 8. bad input at every edge: gRPC, AMQP, corrupt rows ([`bad_input`]),
//!
//! and a soak with periodic kills ([`soak`], `FAULT_SOAK=30m` for a long one).
//!
//! Every scenario gets a fresh database and RabbitMQ virtual host
//! ([`harness`]), runs the binaries as child processes ([`processes`]), and
//! ends with its accounting ([`ledger`]): orders accepted, finished, lost and
//! duplicated effects, printed and asserted (0 lost, 0 duplicated). The
//! scenarios run one at a time: some stop PostgreSQL or RabbitMQ for the
//! whole machine.
//!
//! `cargo test --workspace` builds the `order-service` binary this suite
//! runs; alone, build it first: `cargo build -p order-service`.

mod amqp;
mod backends;
mod bad_input;
mod crashes;
mod harness;
mod ledger;
mod load;
#[path = "../common/metrics_port.rs"]
mod metrics_port;
mod outages;
mod processes;
mod replicas;
mod replies;
mod shop;
mod soak;
