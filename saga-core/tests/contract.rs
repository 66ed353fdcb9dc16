//! The backend contract suites over the in-memory backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use saga_core::memory::{InMemoryStore, InMemoryTransport};
use saga_core::testkit::{dead_letter_contract, store_contract, transport_contract};

#[tokio::test]
async fn in_memory_store_meets_the_store_contract() {
    store_contract::run_all(|| async { Arc::new(InMemoryStore::new()) as Arc<dyn saga_core::Store> }).await;
}

#[tokio::test]
async fn in_memory_transport_meets_the_transport_contract() {
    let counter = AtomicU32::new(0);
    transport_contract::run_all(|| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let transport = InMemoryTransport::new();
            let destination = format!("contract-{n}");
            let queue = format!("contract-{n}-queue");
            transport.bind(&destination, &queue);
            transport_contract::Fixture {
                transport: Arc::new(transport),
                destination,
                queue,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn in_memory_transport_meets_the_dead_letter_contract() {
    let counter = AtomicU32::new(0);
    dead_letter_contract::run_all(|| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let transport = Arc::new(InMemoryTransport::new());
            let destination = format!("dead-letters-{n}");
            let queue = format!("dead-letters-{n}-queue");
            transport.bind(&destination, &queue);
            dead_letter_contract::Fixture {
                transport: transport.clone(),
                dead_letters: transport,
                destination,
                queue,
            }
        }
    })
    .await;
}
