//! Testing helpers (feature `testkit`):
//! - [`store_contract`] and [`transport_contract`]: the backend contract
//!   suites every backend runs unchanged, and [`dead_letter_contract`] for
//!   transports that offer [`DeadLetterQueue`](crate::DeadLetterQueue);
//! - [`SagaTest`]: given a definition and state, when a reply, timeout or
//!   duplicate arrives, then expect this state and these messages — on
//!   virtual time, without a store;
//! - [`assert_resumable`] for a deployment's CI, and [`strand`] for tests
//!   of operator tooling.

pub mod dead_letter_contract;
mod saga_test;
pub mod store_contract;
pub mod transport_contract;

pub use saga_test::SagaTest;

use crate::clock::Timestamp;
use crate::engine::Engine;
use crate::id::{MessageId, SagaId};
use crate::instance::{Cause, Position, SagaInstance, SagaStatus, Transition};
use crate::store::{SagaStore, StoreError};

/// How long one step of a contract suite (subscribe, publish, settle,
/// browse) may take before the suite fails naming it: a backend that hangs
/// shows as a message, not as a stuck test.
const STEP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `future`'s output, or a panic naming `step` if it takes longer than
/// [`STEP_LIMIT`].
async fn within<T>(step: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_LIMIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("{step}: no answer within {STEP_LIMIT:?}"),
    }
}

/// Puts instance `id` where a compensation that kept failing would leave it:
/// needing attention at `step`, with `failure` as its failure and the note
/// of a transition recorded in its history (caused by a message of type
/// `Test`). For tests of operator tooling: finding, showing and resuming
/// such an instance. Returns the instance as stored, `None` if there is no
/// such instance, [`StoreError::Conflict`] if it moved meanwhile.
pub async fn strand(
    store: &dyn SagaStore,
    id: SagaId,
    step: u32,
    failure: &str,
) -> Result<Option<SagaInstance>, StoreError> {
    let Some(mut instance) = store.load(id).await? else {
        return Ok(None);
    };
    let before = Position {
        status: instance.status,
        step: instance.step,
    };
    let expected_revision = instance.revision;
    instance.status = SagaStatus::NeedsAttention;
    instance.step = step;
    instance.awaiting = None;
    instance.deadline = None;
    instance.failure = Some(failure.to_owned());
    instance.revision += 1;
    // Just now: needing attention counts as stuck whatever the threshold.
    instance.updated_at = Timestamp::now();
    let mut tx = store.begin().await?;
    tx.update(&instance, expected_revision).await?;
    tx.record(&Transition {
        saga_id: id,
        revision: instance.revision,
        at: instance.updated_at,
        cause: Cause::Message {
            id: MessageId::new(),
            kind: "Test".into(),
        },
        before: Some(before),
        after: Position {
            status: instance.status,
            step: instance.step,
        },
        emitted: Vec::new(),
        note: Some(failure.to_owned()),
    })
    .await?;
    tx.commit().await?;
    Ok(Some(instance))
}

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

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "publishing: no answer within 10s")]
    async fn a_contract_step_that_never_answers_fails_naming_it() {
        super::within("publishing", std::future::pending::<()>()).await;
    }
}
