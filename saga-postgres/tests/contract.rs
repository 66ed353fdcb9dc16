//! saga-core's store contract suite, unchanged, against PostgreSQL.

mod common;

use std::sync::{Arc, Mutex};

use common::TestDb;
use saga_core::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_meets_the_store_contract() {
    let databases: Arc<Mutex<Vec<TestDb>>> = Arc::default();
    let held = Arc::clone(&databases);
    saga_core::testkit::store_contract::run_all(move || {
        let held = Arc::clone(&held);
        async move {
            let db = TestDb::new().await;
            let store = db.store(8).await;
            held.lock().unwrap_or_else(|p| p.into_inner()).push(db);
            Arc::new(store) as Arc<dyn Store>
        }
    })
    .await;
    // Pools must be closed before their databases are dropped; FORCE does it anyway.
    drop(databases);
}
