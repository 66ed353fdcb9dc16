//! Testing helpers (feature `testkit`):
//! - [`store_contract`] and [`transport_contract`]: the backend contract
//!   suites every backend runs unchanged, and [`dead_letter_contract`] for
//!   transports that offer [`DeadLetterQueue`](crate::DeadLetterQueue);
//! - [`SagaTest`]: given a definition and state, when a reply, timeout or
//!   duplicate arrives, then expect this state and these messages — on
//!   virtual time, without a store.

pub mod dead_letter_contract;
mod saga_test;
pub mod store_contract;
pub mod transport_contract;

pub use saga_test::SagaTest;

use crate::engine::Engine;
use crate::instance::SagaInstance;

/// Asserts that every stored instance in `samples` can continue under
/// `engine`'s definitions and upgrades (see [`Engine::check_resumable`]).
/// Run it in CI with instances saved from production before deploying a new
/// definition version.
///
/// # Panics
/// Listing every instance that cannot resume, and why.
pub fn assert_resumable(engine: &Engine, samples: &[SagaInstance]) {
    let problems: Vec<String> = samples
        .iter()
        .filter_map(|instance| engine.check_resumable(instance).err().map(|e| format!("- {e}")))
        .collect();
    assert!(
        problems.is_empty(),
        "{} stored instance(s) cannot resume:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
