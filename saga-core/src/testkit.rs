//! Testing helpers (feature `testkit`):
//! - [`store_contract`] and [`transport_contract`]: the backend contract
//!   suites every backend runs unchanged;
//! - [`SagaTest`]: given a definition and state, when a reply, timeout or
//!   duplicate arrives, then expect this state and these messages — on
//!   virtual time, without a store.

mod saga_test;
pub mod store_contract;
pub mod transport_contract;

pub use saga_test::SagaTest;
