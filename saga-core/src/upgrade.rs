//! Definition versioning: an instance continues under the version that
//! started it, unless an explicit, typed [`Upgrade`] moves it to a newer one.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::EngineError;
use crate::instance::{SagaInstance, SagaStatus};

type Migrate = dyn Fn(&str) -> Result<String, serde_json::Error> + Send + Sync;
type MapStep = dyn Fn(u32, SagaStatus) -> u32 + Send + Sync;

/// Moves instances of one saga from definition version `from` to `to`,
/// converting their data from `Old` to `New`.
///
/// The engine applies it when it loads an instance still at `from`, before
/// deciding the next event; the upgraded instance is committed with that
/// transition. Register the target version beside it.
///
/// ```
/// use saga_core::Upgrade;
/// #[derive(serde::Deserialize)] struct V1 { total: f64 }
/// #[derive(serde::Serialize)] struct V2 { total_cents: u64 }
/// let upgrade = Upgrade::new("orders", 1, 2, |old: V1| V2 { total_cents: (old.total * 100.0).round() as u64 });
/// # let _ = upgrade;
/// ```
#[derive(Clone)]
pub struct Upgrade {
    pub(crate) saga: String,
    pub(crate) from: u32,
    pub(crate) to: u32,
    migrate: Arc<Migrate>,
    map_step: Option<Arc<MapStep>>,
}

impl Upgrade {
    /// An upgrade of `saga` from version `from` to `to`, converting the data with `convert`.
    pub fn new<Old, New>(
        saga: impl Into<String>,
        from: u32,
        to: u32,
        convert: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> Self
    where
        Old: DeserializeOwned + 'static,
        New: Serialize + 'static,
    {
        let migrate = move |data: &str| {
            let old: Old = serde_json::from_str(data)?;
            serde_json::to_string(&convert(old))
        };
        Self {
            saga: saga.into(),
            from,
            to,
            migrate: Arc::new(migrate),
            map_step: None,
        }
    }

    /// Maps an instance's step counter (see [`SagaInstance::step`]) when the
    /// new version inserted or removed steps. Without it the counter is kept.
    pub fn map_step(mut self, map: impl Fn(u32, SagaStatus) -> u32 + Send + Sync + 'static) -> Self {
        self.map_step = Some(Arc::new(map));
        self
    }

    /// The step counter an instance at `step` with `status` has once upgraded.
    pub(crate) fn mapped_step(&self, step: u32, status: SagaStatus) -> u32 {
        self.map_step.as_ref().map_or(step, |map| map(step, status))
    }

    /// The upgraded copy of `instance` (which must be at version `from`).
    pub(crate) fn apply(&self, mut instance: SagaInstance, data_version: u32) -> Result<SagaInstance, EngineError> {
        instance.data = (self.migrate)(&instance.data).map_err(|source| EngineError::Decode {
            what: format!(
                "data of saga {} while upgrading `{}` v{} to v{}",
                instance.id, self.saga, self.from, self.to
            ),
            source,
        })?;
        instance.step = self.mapped_step(instance.step, instance.status);
        instance.definition_version = self.to;
        instance.data_version = data_version;
        Ok(instance)
    }
}
