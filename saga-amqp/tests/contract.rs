//! saga-core's transport and dead-letter contract suites, unchanged, over
//! RabbitMQ with classic and with quorum queues.

#[path = "support/broker.rs"]
mod broker;

use std::sync::{Arc, Mutex};

use saga_amqp::{AmqpTransport, QueueType};
use saga_core::testkit::dead_letter_contract;
use saga_core::testkit::transport_contract::{self, Fixture};

async fn contract(queue_type: QueueType) {
    let transports: Arc<Mutex<Vec<AmqpTransport>>> = Arc::default();
    transport_contract::run_all(|| {
        let transports = Arc::clone(&transports);
        async move {
            let name = broker::unique("contract");
            let config = broker::config(&name, queue_type);
            let queue = format!("{name}.queue");
            let transport = broker::connect(config).await;
            transports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(transport.clone());
            Fixture {
                transport: Arc::new(transport),
                destination: name,
                queue,
            }
        }
    })
    .await;
    let transports = std::mem::take(&mut *transports.lock().unwrap_or_else(|p| p.into_inner()));
    for transport in transports {
        broker::clean_up(&transport).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_meet_the_transport_contract() {
    contract(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_meet_the_transport_contract() {
    contract(QueueType::Quorum).await;
}

async fn dead_letter_contract(queue_type: QueueType) {
    let transports: Arc<Mutex<Vec<AmqpTransport>>> = Arc::default();
    dead_letter_contract::run_all(|| {
        let transports = Arc::clone(&transports);
        async move {
            let name = broker::unique("dead-letters");
            let config = broker::config(&name, queue_type);
            let queue = format!("{name}.queue");
            let transport = broker::connect(config).await;
            transports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(transport.clone());
            let transport = Arc::new(transport);
            dead_letter_contract::Fixture {
                transport: transport.clone(),
                dead_letters: transport,
                destination: name,
                queue,
            }
        }
    })
    .await;
    let transports = std::mem::take(&mut *transports.lock().unwrap_or_else(|p| p.into_inner()));
    for transport in transports {
        broker::clean_up(&transport).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_meet_the_dead_letter_contract() {
    dead_letter_contract(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_meet_the_dead_letter_contract() {
    dead_letter_contract(QueueType::Quorum).await;
}
