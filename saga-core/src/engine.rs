//! The driver: load → decide → commit state + history + outbox + inbox +
//! application effects in one transaction. It holds no state of its own
//! beyond a cache of instances it committed lately, so a crashed engine is
//! rebuilt from the store by constructing a new one.

use std::any::{Any, type_name};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::decide::{self, Decision, Event, OperatorAction, Outcome};
use crate::definition::{Correlation, SagaData, SagaDefinition};
use crate::error::{DefinitionError, EngineError, StepError};
use crate::id::{MessageId, SagaId};
use crate::instance::{Cause, Position, SagaInstance, SagaStatus, Transition};
use crate::message::{IN_REPLY_TO, Message};
use crate::store::{OutboxId, Store, StoreError, Transaction, UnsentFilter};
use crate::telemetry;
use crate::upgrade::Upgrade;

mod recent;

use recent::RecentInstances;

/// Applies a definition's application effects (type `E`) inside the
/// transition's transaction, e.g. writing the service's own tables.
///
/// It runs once per committed transition; if the transaction then fails to
/// commit, its writes roll back with it. Downcast `tx.backend()` to the store's
/// transaction type to reach the database.
#[async_trait]
pub trait EffectHandler<E>: Send + Sync + 'static {
    /// Applies `effects`, emitted by the transition that produced `saga`.
    async fn apply(&self, tx: &mut dyn Transaction, saga: &SagaInstance, effects: Vec<E>) -> Result<(), StepError>;
}

/// How the engine treated a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// It caused a transition, now committed.
    Applied {
        /// The instance.
        saga: SagaId,
        /// Its status afterwards.
        status: SagaStatus,
    },
    /// The inbox had it already: nothing changed.
    Duplicate,
    /// It changes nothing (late, stray or for a finished saga): the reason says why.
    Ignored(&'static str),
}

/// Tuning of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The inbox consumer name the engine records messages under.
    pub consumer: String,
    /// How often a transition is re-decided when another writer got there first.
    pub max_conflict_retries: u32,
    /// How many due deadlines one scan fires at most (0 counts as 1).
    pub deadline_batch: usize,
    /// How long a deadline that could not be applied for good (its saga's
    /// row is corrupt, or its definition version is not registered) is left
    /// out of the scans before it is tried, and reported, again. Left out,
    /// such deadlines neither fill every scan's batch nor flood the log.
    pub broken_deadline_retry: Duration,
    /// How many live instances the engine keeps as it committed them, so
    /// the message that follows a transition (a reply) is decided without
    /// reading its instance back. A kept instance another replica has moved
    /// on since costs a failed commit and a read, never a wrong decision:
    /// the commit checks the revision, and whatever else the kept instance
    /// leads to (the message ignored, an error) is decided again on a read.
    /// While more than one in eight copies found turns out stale (replicas
    /// taking turns on one saga's replies), the engine reads instead and
    /// only compares; `saga_instance_copies_total{found}` counts them.
    /// About 1 KiB each, depending on the saga data; `Some(0)` keeps none.
    /// `None` (the default): [`CACHED_INSTANCES`], or none over a store
    /// whose reads cost no more than a copy
    /// ([`SagaStore::reads_are_cheap`](crate::SagaStore::reads_are_cheap),
    /// the in-memory store), where copies would only add work.
    pub cached_instances: Option<usize>,
}

/// How many instances an engine keeps by default (see
/// [`EngineConfig::cached_instances`]).
pub const CACHED_INSTANCES: usize = 4096;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            consumer: "saga-engine".to_owned(),
            max_conflict_retries: 16,
            deadline_batch: 256,
            broken_deadline_retry: Duration::from_secs(300),
            cached_instances: None,
        }
    }
}

#[async_trait]
trait ApplyEffects: Send {
    async fn apply(self: Box<Self>, tx: &mut dyn Transaction, saga: &SagaInstance) -> Result<(), StepError>;
}

struct BoundEffects<E> {
    handler: Arc<dyn EffectHandler<E>>,
    effects: Vec<E>,
}

#[async_trait]
impl<E: Send + 'static> ApplyEffects for BoundEffects<E> {
    async fn apply(self: Box<Self>, tx: &mut dyn Transaction, saga: &SagaInstance) -> Result<(), StepError> {
        self.handler.apply(tx, saga, self.effects).await
    }
}

/// A decision with its effects bound to their handler, ready to commit.
struct Pending {
    instance: SagaInstance,
    messages: Vec<Message>,
    transition: crate::instance::Transition,
    effects: Option<Box<dyn ApplyEffects>>,
}

/// A definition with its data and effect types erased, so the engine can hold many.
trait Runner: Send + Sync {
    fn name(&self) -> &str;
    fn version(&self) -> u32;
    fn routes(&self) -> Vec<(String, Correlation)>;
    fn start(&self, id: SagaId, data: Box<dyn Any + Send>, now: Timestamp) -> Result<Pending, EngineError>;
    /// The transition to commit, or why the event changes nothing.
    fn decide(
        &self,
        instance: SagaInstance,
        event: Event<'_>,
        now: Timestamp,
    ) -> Result<Result<Pending, &'static str>, EngineError>;
    fn mermaid(&self) -> String;
    fn step_names(&self) -> Vec<String>;
    /// The reply types each step waits for (none for a local step).
    fn step_replies(&self) -> Vec<Vec<String>>;
    fn data_version(&self) -> u32;
    /// Why `instance` could not continue under this definition, if it could not.
    fn check(&self, instance: &SagaInstance) -> Result<(), String>;
}

struct TypedRunner<D, E> {
    definition: SagaDefinition<D, E>,
    effects: Option<Arc<dyn EffectHandler<E>>>,
}

impl<D: SagaData, E: Send + 'static> TypedRunner<D, E> {
    fn bind(&self, decision: Decision<E>) -> Pending {
        let effects = match &self.effects {
            Some(handler) if !decision.effects.is_empty() => Some(Box::new(BoundEffects {
                handler: Arc::clone(handler),
                effects: decision.effects,
            }) as Box<dyn ApplyEffects>),
            _ => None,
        };
        Pending {
            instance: decision.instance,
            messages: decision.messages,
            transition: decision.transition,
            effects,
        }
    }
}

impl<D: SagaData, E: Send + 'static> Runner for TypedRunner<D, E> {
    fn name(&self) -> &str {
        &self.definition.name
    }

    fn version(&self) -> u32 {
        self.definition.version
    }

    fn routes(&self) -> Vec<(String, Correlation)> {
        self.definition
            .steps
            .iter()
            .filter_map(|step| match &step.action {
                crate::definition::Action::Remote { replies, .. } => Some(replies),
                crate::definition::Action::Local(_) => None,
            })
            .flatten()
            .map(|route| (route.kind.clone(), route.correlation.clone()))
            .collect()
    }

    fn start(&self, id: SagaId, data: Box<dyn Any + Send>, now: Timestamp) -> Result<Pending, EngineError> {
        let data = data.downcast::<D>().map_err(|_| EngineError::DataType {
            definition: self.definition.name.clone(),
            expected: type_name::<D>(),
        })?;
        decide::start(&self.definition, id, *data, now).map(|d| self.bind(d))
    }

    fn decide(
        &self,
        instance: SagaInstance,
        event: Event<'_>,
        now: Timestamp,
    ) -> Result<Result<Pending, &'static str>, EngineError> {
        Ok(match decide::decide_owned(&self.definition, instance, event, now)? {
            Outcome::Changed(decision) => Ok(self.bind(decision)),
            Outcome::Ignored(reason) => Err(reason),
        })
    }

    fn mermaid(&self) -> String {
        self.definition.to_mermaid()
    }

    fn step_names(&self) -> Vec<String> {
        self.definition.steps.iter().map(|s| s.name.clone()).collect()
    }

    fn step_replies(&self) -> Vec<Vec<String>> {
        self.definition
            .steps
            .iter()
            .map(|s| s.reply_kinds().into_iter().map(str::to_owned).collect())
            .collect()
    }

    fn data_version(&self) -> u32 {
        self.definition.data_version
    }

    fn check(&self, instance: &SagaInstance) -> Result<(), String> {
        if let Err(e) = serde_json::from_str::<D>(&instance.data) {
            return Err(format!("its data does not decode as {}: {e}", type_name::<D>()));
        }
        if instance.data_version != self.definition.data_version {
            return Err(format!(
                "its data is schema version {}, the definition's is {}",
                instance.data_version, self.definition.data_version
            ));
        }
        decide::misplaced(&self.definition, instance).map_or(Ok(()), Err)
    }
}

struct Route {
    definition: String,
    correlation: Correlation,
}

/// Adds headers to a message as it enters the outbox (see
/// [`EngineBuilder::message_headers`]).
type HeaderHook = dyn Fn(&mut BTreeMap<String, String>) + Send + Sync;

/// Told of every committed transition (see [`EngineBuilder::on_committed`]).
type CommitHook = dyn Fn(&SagaInstance, &Transition) + Send + Sync;

/// Builds an [`Engine`]: the store, a clock, and the definitions it runs.
pub struct EngineBuilder {
    store: Arc<dyn Store>,
    message_headers: Option<Arc<HeaderHook>>,
    on_committed: Option<Arc<CommitHook>>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    runners: Vec<Arc<dyn Runner>>,
    upgrades: Vec<Upgrade>,
}

impl EngineBuilder {
    /// The clock deadlines are measured by (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Tuning.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds headers to every message a transition emits, as it enters the
    /// outbox, in the span of the call that caused the transition: e.g. the
    /// trace context, so a message continues the trace of the request or
    /// message that caused it rather than the relay's.
    pub fn message_headers(mut self, hook: impl Fn(&mut BTreeMap<String, String>) + Send + Sync + 'static) -> Self {
        self.message_headers = Some(Arc::new(hook));
        self
    }

    /// Calls `hook` after each transition this engine committed, with the
    /// instance as committed and its history entry: the place for metrics
    /// and notifications that must count a transition once (an effect
    /// handler runs before commit, and again if the transition is retried).
    pub fn on_committed(mut self, hook: impl Fn(&SagaInstance, &Transition) + Send + Sync + 'static) -> Self {
        self.on_committed = Some(Arc::new(hook));
        self
    }

    /// Registers a definition whose steps emit no application effects.
    /// Several versions of one definition may be registered side by side.
    pub fn register<D: SagaData>(mut self, definition: SagaDefinition<D, ()>) -> Self {
        self.runners.push(Arc::new(TypedRunner {
            definition,
            effects: None,
        }));
        self
    }

    /// Registers a definition whose effects `handler` applies.
    pub fn register_with_effects<D: SagaData, E: Send + 'static>(
        mut self,
        definition: SagaDefinition<D, E>,
        handler: impl EffectHandler<E>,
    ) -> Self {
        self.runners.push(Arc::new(TypedRunner {
            definition,
            effects: Some(Arc::new(handler)),
        }));
        self
    }

    /// Registers an upgrade: instances found at its `from` version move to its
    /// `to` version (which must be registered too) at their next transition.
    pub fn upgrade(mut self, upgrade: Upgrade) -> Self {
        self.upgrades.push(upgrade);
        self
    }

    /// Checks that no name and version is registered twice, that every
    /// upgrade leads to a registered version, and builds.
    pub fn build(self) -> Result<Engine, DefinitionError> {
        let mut by_version: HashMap<(String, u32), Arc<dyn Runner>> = HashMap::new();
        let mut latest: HashMap<String, u32> = HashMap::new();
        // Definitions in the order first registered, each with its versions.
        let mut definitions: Vec<(String, Vec<Arc<dyn Runner>>)> = Vec::new();
        for runner in self.runners {
            let key = (runner.name().to_owned(), runner.version());
            if by_version.contains_key(&key) {
                return Err(DefinitionError::DuplicateVersion {
                    saga: key.0,
                    version: key.1,
                });
            }
            let newest = latest.entry(key.0.clone()).or_insert(key.1);
            *newest = (*newest).max(key.1);
            match definitions.iter_mut().find(|(name, _)| *name == key.0) {
                Some((_, versions)) => versions.push(Arc::clone(&runner)),
                None => definitions.push((key.0.clone(), vec![Arc::clone(&runner)])),
            }
            by_version.insert(key, runner);
        }
        // Every registered version's replies find their instances, newest
        // version first: an instance continues under the version that
        // started it, so its replies must still be routed when a newer
        // version renamed them or correlates them differently.
        let mut routes: HashMap<String, Vec<Route>> = HashMap::new();
        for (definition, mut versions) in definitions {
            versions.sort_by_key(|runner| std::cmp::Reverse(runner.version()));
            for runner in versions {
                for (kind, correlation) in runner.routes() {
                    let list = routes.entry(kind).or_default();
                    let by_id = matches!(correlation, Correlation::SagaId);
                    if by_id
                        && list
                            .iter()
                            .any(|r| r.definition == definition && matches!(r.correlation, Correlation::SagaId))
                    {
                        continue;
                    }
                    list.push(Route {
                        definition: definition.clone(),
                        correlation,
                    });
                }
            }
        }
        let mut upgrades = HashMap::new();
        for upgrade in self.upgrades {
            if upgrade.to <= upgrade.from || !by_version.contains_key(&(upgrade.saga.clone(), upgrade.to)) {
                return Err(DefinitionError::BadUpgrade {
                    saga: upgrade.saga,
                    from: upgrade.from,
                    to: upgrade.to,
                });
            }
            let (saga, from) = (upgrade.saga.clone(), upgrade.from);
            // Two from one version: which one an instance took would depend
            // on registration order.
            if upgrades.insert((saga.clone(), from), upgrade).is_some() {
                return Err(DefinitionError::DuplicateUpgrade { saga, from });
            }
        }
        keeps_awaited_replies(&by_version, &upgrades)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                recent: RecentInstances::new(self.config.cached_instances.unwrap_or(if self.store.reads_are_cheap() {
                    0
                } else {
                    CACHED_INSTANCES
                })),
                message_headers: self.message_headers,
                on_committed: self.on_committed,
                store: self.store,
                clock: self.clock,
                // A batch of none would fire nothing, and the loop would spin.
                config: EngineConfig {
                    deadline_batch: self.config.deadline_batch.max(1),
                    ..self.config
                },
                by_version,
                latest,
                routes,
                upgrades,
                set_aside: std::sync::Mutex::default(),
            }),
        })
    }
}

struct Inner {
    message_headers: Option<Arc<HeaderHook>>,
    on_committed: Option<Arc<CommitHook>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    by_version: HashMap<(String, u32), Arc<dyn Runner>>,
    latest: HashMap<String, u32>,
    routes: HashMap<String, Vec<Route>>,
    upgrades: HashMap<(String, u32), Upgrade>,
    /// Deadlines left out of the scans for now, by saga.
    set_aside: std::sync::Mutex<HashMap<SagaId, SetAside>>,
    recent: RecentInstances,
}

/// How long a deadline that failed retryably once waits before it is tried
/// again; each further failure in a row doubles it.
pub const DEADLINE_RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// The longest a deadline that keeps failing retryably waits between tries.
pub const DEADLINE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A deadline the scans leave out until `until`.
struct SetAside {
    due: Timestamp,
    until: Timestamp,
    /// Retryable failures in a row; 0 for one that cannot be applied for good.
    failures: u32,
}

impl SetAside {
    /// The wait after `failures` retryable failures in a row.
    fn backoff(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        DEADLINE_RETRY_BACKOFF
            .saturating_mul(1 << doublings)
            .min(DEADLINE_RETRY_BACKOFF_MAX)
    }

    /// How long past `until` the entry is kept: a retryable failure's count
    /// is remembered for a maximal backoff, so a next failure waits longer.
    fn remembered(&self) -> Duration {
        if self.failures > 0 {
            DEADLINE_RETRY_BACKOFF_MAX
        } else {
            Duration::ZERO
        }
    }
}

/// Checks that every instance an upgrade moves on keeps waiting for the
/// replies it waited for: the engine upgrades an instance before deciding
/// a reply to it, so a remote step whose reply types the upgraded version's
/// step (after the whole chain of upgrades, and `map_step`) does not handle
/// would have its reply ignored, and the saga wait for its deadline.
fn keeps_awaited_replies(
    by_version: &HashMap<(String, u32), Arc<dyn Runner>>,
    upgrades: &HashMap<(String, u32), Upgrade>,
) -> Result<(), DefinitionError> {
    for ((saga, from), old) in by_version {
        if !upgrades.contains_key(&(saga.clone(), *from)) {
            continue;
        }
        let names = old.step_names();
        for (index, kinds) in old.step_replies().into_iter().enumerate() {
            if kinds.is_empty() {
                continue;
            }
            // Follow the chain as `Engine::upgraded` does.
            let (mut version, mut step) = (*from, u32::try_from(index).unwrap_or(u32::MAX));
            while let Some(upgrade) = upgrades.get(&(saga.clone(), version)) {
                step = upgrade.mapped_step(step, SagaStatus::Running);
                version = upgrade.to;
            }
            let handled = by_version
                .get(&(saga.clone(), version))
                .and_then(|new| new.step_replies().into_iter().nth(step as usize))
                .unwrap_or_default();
            if let Some(kind) = kinds.into_iter().find(|kind| !handled.contains(kind)) {
                return Err(DefinitionError::UpgradeDropsReply {
                    saga: saga.clone(),
                    from: *from,
                    to: version,
                    step: names.get(index).cloned().unwrap_or_default(),
                    kind,
                });
            }
        }
    }
    Ok(())
}

/// An instance as the engine found it, and where.
struct Found {
    instance: SagaInstance,
    /// From the engine's cache, so possibly stale (see [`RecentInstances`]).
    cached: bool,
}

impl Found {
    fn cached(instance: SagaInstance) -> Self {
        Self { instance, cached: true }
    }

    fn stored(instance: SagaInstance) -> Self {
        Self {
            instance,
            cached: false,
        }
    }
}

/// Runs sagas: starts instances, feeds them messages, fires their deadlines
/// and applies operator actions, committing each transition atomically.
/// Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts building an engine over `store`.
    pub fn builder(store: Arc<dyn Store>) -> EngineBuilder {
        EngineBuilder {
            message_headers: None,
            on_committed: None,
            store,
            clock: Arc::new(SystemClock),
            config: EngineConfig::default(),
            runners: Vec::new(),
            upgrades: Vec::new(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Starts an instance of the newest registered version of `definition`
    /// with a fresh id.
    pub async fn start<D: Any + Send>(&self, definition: &str, data: D) -> Result<SagaId, EngineError> {
        self.start_with_id(definition, SagaId::new(), data).await
    }

    /// Starts an instance with a chosen id (e.g. the order id). Runs its local
    /// steps up to the first remote one and commits all of it at once.
    /// [`EngineError::AlreadyStarted`] if the id or business key is taken.
    pub async fn start_with_id<D: Any + Send>(
        &self,
        definition: &str,
        id: SagaId,
        data: D,
    ) -> Result<SagaId, EngineError> {
        let span = tracing::info_span!("saga.start", saga = definition, saga_id = %id);
        async {
            let version = self
                .inner
                .latest
                .get(definition)
                .copied()
                .ok_or_else(|| EngineError::UnknownDefinition {
                    id,
                    definition: definition.to_owned(),
                    version: 0,
                })?;
            let runner = self.runner(definition, version, id)?;
            let pending = runner.start(id, Box::new(data), self.now())?;
            let status = pending.instance.status;
            match self.commit(pending, None, None, false).await {
                Ok(_) => {
                    metrics::counter!(telemetry::STARTED_TOTAL, "saga" => definition.to_owned()).increment(1);
                    record_transition(definition, None, status);
                }
                Err(EngineError::Store(StoreError::AlreadyExists { id })) => {
                    return Err(EngineError::AlreadyStarted { id });
                }
                Err(e) => return Err(e),
            }
            tracing::debug!(%status, "saga started");
            Ok(id)
        }
        .instrument(span)
        .await
    }

    /// Applies an incoming message to the instance it belongs to.
    ///
    /// Messages already in the inbox are [`Handled::Duplicate`]; messages that
    /// name no instance are [`EngineError::UnknownSaga`] (dead-letter them).
    pub async fn handle(&self, message: &Message) -> Result<Handled, EngineError> {
        // A copy found by business key may name an instance the store no
        // longer has: finished and purged on another replica's watch, and its
        // key since taken by a new one. The failed decision forgot the copy,
        // so correlating once more reads the store's owner of the key.
        let mut again = true;
        loop {
            let (id, found) = self.correlate(message).await?;
            let from_copy = found.as_ref().is_some_and(|f| f.cached);
            let span =
                tracing::info_span!("saga.handle", saga_id = %id, kind = %message.kind, message_id = %message.id);
            let handled = self
                .transition(id, found, Event::Message(message), Some(&message.id))
                .instrument(span)
                .await;
            if matches!(handled, Err(EngineError::UnknownSaga { .. })) && from_copy && std::mem::take(&mut again) {
                continue;
            }
            return handled;
        }
    }

    /// Fires every deadline that has come (up to the configured batch) and
    /// returns how many caused a transition.
    ///
    /// A deadline that cannot be applied for good (its saga's row does not
    /// decode, its definition version is not registered, handling it
    /// panicked) is reported once and left out of the scans for
    /// [`broken_deadline_retry`](EngineConfig::broken_deadline_retry), so
    /// broken sagas never crowd healthy ones out of the batch; so is one of
    /// a version newer than this process has, with a warning (a replica
    /// that has it applies it). One that failed retryably (an effect to
    /// retry, a contended row) is left out for a backoff that starts at
    /// [`DEADLINE_RETRY_BACKOFF`] and doubles with each failure in a row, up
    /// to [`DEADLINE_RETRY_BACKOFF_MAX`]: however many keep failing, the
    /// others still fire. Only a store out of reach ends the scan with an
    /// error.
    pub async fn fire_due_deadlines(&self) -> Result<usize, EngineError> {
        let now = self.now();
        let batch = self.inner.config.deadline_batch;
        let set_aside = {
            let mut aside = self.set_aside();
            // A retryable failure is remembered a while past its backoff, so
            // the next failure in a row waits longer.
            aside.retain(|_, s| s.until + s.remembered() > now);
            aside.values().filter(|s| s.until > now).count()
        };
        let due = self.inner.store.due(now, batch.saturating_add(set_aside)).await?;
        let mut fired = 0;
        let mut tried = 0;
        for deadline in due {
            if tried >= batch {
                break;
            }
            let waiting = self
                .set_aside()
                .get(&deadline.saga)
                .is_some_and(|s| s.due == deadline.due && s.until > now);
            if waiting {
                continue;
            }
            tried += 1;
            let span = tracing::info_span!("saga.deadline", saga_id = %deadline.saga);
            let handled = EngineError::unless_panicked(
                self.transition(deadline.saga, None, Event::Deadline(deadline.due), None)
                    .instrument(span),
            )
            .await;
            if handled.is_ok() {
                self.set_aside().remove(&deadline.saga);
            }
            match handled {
                Ok(Handled::Applied { .. }) => fired += 1,
                Ok(_) => {}
                // The store is out of reach: the other deadlines would fail alike.
                Err(e @ EngineError::Store(StoreError::Unavailable(_))) => return Err(e),
                // This saga's alone (an effect to retry, a contended row): it
                // waits a backoff, and the others go on.
                Err(e)
                    if e.is_retryable()
                        && !matches!(e, EngineError::Panicked(_) | EngineError::NewerVersion { .. }) =>
                {
                    let mut aside = self.set_aside();
                    let failures = aside
                        .get(&deadline.saga)
                        .filter(|s| s.due == deadline.due)
                        .map_or(0, |s| s.failures)
                        .saturating_add(1);
                    let retry = SetAside::backoff(failures);
                    tracing::warn!(saga_id = %deadline.saga, error = %e, failures, retry_in = ?retry, "deadline not applied yet");
                    aside.insert(
                        deadline.saga,
                        SetAside {
                            due: deadline.due,
                            until: now + retry,
                            failures,
                        },
                    );
                }
                // Set aside for `broken_deadline_retry`, so the others go on:
                // one broken instance, or one of a version this process
                // lacks, newer than its own (a deployment under way: a
                // replica that has it applies the deadline; not a failure).
                Err(e) => {
                    let retry = self.inner.config.broken_deadline_retry;
                    if matches!(e, EngineError::NewerVersion { .. }) {
                        tracing::warn!(
                            saga_id = %deadline.saga,
                            error = %e,
                            retry_in = ?retry,
                            "deadline left to a replica that has the saga's version"
                        );
                    } else {
                        tracing::error!(
                            saga_id = %deadline.saga,
                            error = %e,
                            retry_in = ?retry,
                            "deadline could not be applied; the saga needs an operator"
                        );
                        metrics::counter!(telemetry::DEADLINE_FAILURES_TOTAL).increment(1);
                    }
                    self.set_aside().insert(
                        deadline.saga,
                        SetAside {
                            due: deadline.due,
                            until: now + retry,
                            failures: 0,
                        },
                    );
                }
            }
        }
        Ok(fired)
    }

    fn set_aside(&self) -> std::sync::MutexGuard<'_, HashMap<SagaId, SetAside>> {
        // A panic while holding it leaves a plain map: keep using it.
        self.inner
            .set_aside
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies an operator action, recorded in the instance's history, and
    /// returns the instance afterwards.
    ///
    /// [`EngineError::UnknownSaga`] when there is no such instance;
    /// [`EngineError::InvalidAction`] when the action does not apply to the
    /// instance as it stands (e.g. cancelling a finished one): nothing changed.
    pub async fn act(&self, id: SagaId, action: OperatorAction) -> Result<SagaInstance, EngineError> {
        let span = tracing::info_span!("saga.operator", saga_id = %id, action = action.as_str());
        let handled = self
            .transition(id, None, Event::Operator(action), None)
            .instrument(span)
            .await?;
        if let Handled::Ignored(reason) = handled {
            return Err(EngineError::InvalidAction {
                id,
                action: action.as_str(),
                reason: reason.to_owned(),
            });
        }
        self.inner.store.load(id).await?.ok_or(EngineError::UnknownSaga {
            kind: action.as_str().to_owned(),
            key: Some(id.to_string()),
        })
    }

    /// Gives up the unsent outbox message `message` of saga `id`, for an
    /// operator, when the broker will never take it (headers too large for
    /// a frame, a row no relay can read): it is never published, and the
    /// saga's later messages, which waited behind it to keep their order,
    /// go at once. Only the saga's oldest unsent message can be given up.
    /// One transaction gives it up and records it in the saga's history
    /// (cause `Operator { action: "discard" }`, `reason` and the message in
    /// the note; the instance's status, step and `updated_at` unchanged).
    /// Returns the instance afterwards.
    ///
    /// The saga continues as it would have had the message been lost: a
    /// step waiting for a reply to it runs into its reply timeout, if it
    /// has one, and otherwise waits for an operator to retry or cancel it.
    /// A relay publishing the message at that moment may still get it out.
    ///
    /// [`EngineError::UnknownSaga`] when there is no such instance;
    /// [`EngineError::InvalidAction`] when the message is not the saga's
    /// oldest unsent message (sent, given up before, behind an older one,
    /// another saga's or none; the reason says which): nothing changed.
    pub async fn discard_unsent(
        &self,
        id: SagaId,
        message: OutboxId,
        reason: &str,
    ) -> Result<SagaInstance, EngineError> {
        const ACTION: &str = "discard";
        let span = tracing::info_span!("saga.operator", saga_id = %id, action = ACTION, outbox_id = message);
        async {
            let attempts = self.inner.config.max_conflict_retries.max(1);
            for _ in 0..attempts {
                let before = self.inner.store.load(id).await?.ok_or(EngineError::UnknownSaga {
                    kind: ACTION.to_owned(),
                    key: Some(id.to_string()),
                })?;
                let mut tx = self.inner.store.begin().await?;
                let invalid = |reason: String| EngineError::InvalidAction {
                    id,
                    action: ACTION,
                    reason,
                };
                let entry = match tx.discard_unsent(message).await? {
                    Some(entry) if entry.saga == Some(id) => entry,
                    // Rolled back on drop: nothing is given up.
                    Some(entry) => {
                        return Err(invalid(match entry.saga {
                            Some(_) => format!("outbox message {message} is another saga's"),
                            None => format!("outbox message {message} belongs to no saga"),
                        }));
                    }
                    None => {
                        // Its connection back first: the reason is read on another.
                        drop(tx);
                        return Err(invalid(self.why_not_discarded(id, message).await?));
                    }
                };
                let now = self.now();
                // `updated_at` stays: the saga is no less stuck than it was.
                let after = SagaInstance {
                    revision: before.revision + 1,
                    ..before.clone()
                };
                let transition = Transition {
                    saga_id: id,
                    revision: after.revision,
                    at: now,
                    cause: Cause::Operator {
                        action: ACTION.to_owned(),
                    },
                    before: Some(Position::of(&before)),
                    after: Position::of(&after),
                    emitted: Vec::new(),
                    // The reason first: listings shorten notes.
                    note: Some(format!(
                        "{reason}; gave up unsent {} to {} (message {}, outbox {message})",
                        entry.message.kind, entry.message.destination, entry.message.id
                    )),
                };
                tx.update(&after, before.revision).await?;
                tx.record(&transition).await?;
                match tx.commit().await {
                    Ok(()) => {}
                    Err(e) if e.is_conflict() => {
                        self.inner.recent.forget(id);
                        continue;
                    }
                    Err(e) => {
                        self.inner.recent.forget(id);
                        return Err(e.into());
                    }
                }
                metrics::counter!(telemetry::OUTBOX_DISCARDED_TOTAL).increment(1);
                record_transition(&after.definition, Some(before.status), after.status);
                tracing::warn!(
                    message_id = %entry.message.id,
                    kind = %entry.message.kind,
                    destination = %entry.message.destination,
                    reason,
                    "an operator gave up an unsent message; it will not be published"
                );
                if let Some(hook) = &self.inner.on_committed {
                    hook(&after, &transition);
                }
                self.inner.recent.committed(after.clone());
                return Ok(after);
            }
            Err(EngineError::Contended { id, attempts })
        }
        .instrument(span)
        .await
    }

    /// Why the store gave up none of saga `id`'s message `message`.
    async fn why_not_discarded(&self, id: SagaId, message: OutboxId) -> Result<String, EngineError> {
        let unsent = self
            .inner
            .store
            .unsent_messages(&UnsentFilter {
                saga: Some(id),
                ..UnsentFilter::default()
            })
            .await?;
        let oldest = unsent.first().map(|u| u.entry.id);
        Ok(match oldest {
            Some(oldest) if unsent.iter().any(|u| u.entry.id == message) => format!(
                "outbox message {message} waits behind the saga's older unsent message {oldest}: \
                 only the oldest can be given up, so the saga's messages keep their order"
            ),
            Some(oldest) => {
                format!("outbox message {message} is not an unsent message of the saga (its oldest is {oldest})")
            }
            None => format!(
                "outbox message {message} is not an unsent message of the saga (sent, given up, another saga's, \
                 or none)"
            ),
        })
    }

    /// Fires deadlines every `interval` until `shutdown` is cancelled.
    pub async fn run_deadlines(&self, interval: Duration, shutdown: CancellationToken) {
        loop {
            match self.fire_due_deadlines().await {
                // A full batch: more may be due. Checked for shutdown all the
                // same, so a long backlog does not hold it up.
                Ok(n) if n >= self.inner.config.deadline_batch && !shutdown.is_cancelled() => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "deadline scan failed; will retry"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// The Mermaid diagram of a registered definition.
    pub fn mermaid(&self, definition: &str, version: u32) -> Option<String> {
        self.inner
            .by_version
            .get(&(definition.to_owned(), version))
            .map(|r| r.mermaid())
    }

    /// The step names of a registered definition, in order.
    pub fn step_names(&self, definition: &str, version: u32) -> Option<Vec<String>> {
        self.inner
            .by_version
            .get(&(definition.to_owned(), version))
            .map(|r| r.step_names())
    }

    /// Applies registered upgrades until the instance is at a version without one.
    fn upgraded(&self, mut instance: SagaInstance) -> Result<SagaInstance, EngineError> {
        // Each upgrade raises the version, so this ends.
        while let Some(upgrade) = self
            .inner
            .upgrades
            .get(&(instance.definition.clone(), instance.definition_version))
        {
            let data_version = self.runner(&upgrade.saga, upgrade.to, instance.id)?.data_version();
            instance = upgrade.apply(instance, data_version)?;
        }
        Ok(instance)
    }

    /// Checks that a stored instance can continue under this engine's
    /// definitions (after any registered upgrade): its definition and version
    /// are registered, its data decodes, its step exists. Returns the
    /// instance as it would continue. Run it in CI over samples of stored
    /// instances before deploying a new version (see
    /// `testkit::assert_resumable`).
    pub fn check_resumable(&self, instance: &SagaInstance) -> Result<SagaInstance, EngineError> {
        let upgraded = self.upgraded(instance.clone())?;
        let runner = self.runner(&upgraded.definition, upgraded.definition_version, upgraded.id)?;
        runner.check(&upgraded).map_err(|reason| EngineError::NotResumable {
            id: instance.id,
            reason,
        })?;
        Ok(upgraded)
    }

    fn runner(&self, definition: &str, version: u32, id: SagaId) -> Result<&Arc<dyn Runner>, EngineError> {
        if let Some(runner) = self.inner.by_version.get(&(definition.to_owned(), version)) {
            return Ok(runner);
        }
        match self.inner.latest.get(definition) {
            Some(&newest) if version > newest => Err(EngineError::NewerVersion {
                id,
                definition: definition.to_owned(),
                version,
                newest,
            }),
            _ => Err(EngineError::UnknownDefinition {
                id,
                definition: definition.to_owned(),
                version,
            }),
        }
    }

    /// Finds the instance a message belongs to, in the engine's cache or the
    /// store; returns it too, so the transition need not load it again.
    async fn correlate(&self, message: &Message) -> Result<(SagaId, Option<Found>), EngineError> {
        let recent = &self.inner.recent;
        let routes = self
            .inner
            .routes
            .get(&message.kind)
            .ok_or_else(|| EngineError::UnhandledKind {
                kind: message.kind.clone(),
            })?;
        let mut tried = None;
        // Keys looked up already (versions of a definition often read the same one).
        let mut looked_up: Vec<(&str, String)> = Vec::new();
        // A payload one key route cannot read may be another's (another
        // definition's, or another version's); it is an error only if no
        // route finds the instance.
        let mut undecodable = None;
        for route in routes {
            match &route.correlation {
                Correlation::SagaId => {
                    let Some(raw) = message.correlation_id.as_deref() else {
                        continue;
                    };
                    tried = Some(raw.to_owned());
                    let Ok(id) = raw.parse::<SagaId>() else { continue };
                    // An instance's definition never changes: a copy answers that.
                    match recent.get(id).filter(|i| i.definition == route.definition) {
                        Some(copy) if self.decides(&copy, message) => return Ok((id, Some(Found::cached(copy)))),
                        copy => match self.inner.store.load(id).await? {
                            Some(instance) if instance.definition == route.definition => {
                                recent.compare(copy.map(|c| c.revision), &instance);
                                return Ok((id, Some(Found::stored(instance))));
                            }
                            _ => continue,
                        },
                    }
                }
                Correlation::Key(key_of) => {
                    let key = match key_of(message) {
                        Ok(key) => key,
                        Err(source) => {
                            undecodable.get_or_insert(EngineError::Decode {
                                what: format!("`{}` message {}", message.kind, message.id),
                                source,
                            });
                            continue;
                        }
                    };
                    if looked_up.iter().any(|(d, k)| *d == route.definition && *k == key) {
                        continue;
                    }
                    looked_up.push((&route.definition, key.clone()));
                    // Nor does its key.
                    match recent.get_by_key(&route.definition, &key) {
                        Some(copy) if self.decides(&copy, message) => {
                            return Ok((copy.id, Some(Found::cached(copy))));
                        }
                        copy => {
                            if let Some(instance) = self.inner.store.load_by_key(&route.definition, &key).await? {
                                recent.compare(copy.map(|c| c.revision), &instance);
                                return Ok((instance.id, Some(Found::stored(instance))));
                            }
                        }
                    }
                    tried = Some(key);
                }
            }
        }
        Err(undecodable.unwrap_or_else(|| EngineError::UnknownSaga {
            kind: message.kind.clone(),
            key: tried,
        }))
    }

    /// Whether `message` is decided on `copy`, the instance as this engine
    /// last committed it: copies are trusted now, and `copy` awaits the
    /// command the message answers, if the message names one (a copy that
    /// awaits another is stale, or the message late: a read tells which).
    fn decides(&self, copy: &SagaInstance, message: &Message) -> bool {
        self.inner.recent.trusted()
            && message
                .header(IN_REPLY_TO)
                .is_none_or(|to| copy.awaiting.as_ref().is_some_and(|awaited| awaited.as_str() == to))
    }

    /// Load → decide → commit, re-deciding on optimistic-concurrency conflicts.
    async fn transition(
        &self,
        id: SagaId,
        mut found: Option<Found>,
        event: Event<'_>,
        consumed: Option<&MessageId>,
    ) -> Result<Handled, EngineError> {
        let attempts = self.inner.config.max_conflict_retries.max(1);
        // Optimistic first: the inbox is checked at commit. Only once that
        // reports the message consumed do we ask the inbox up front, which
        // then names the duplicate.
        let mut check_inbox_first = false;
        let mut attempt = 0;
        // The revision of a kept copy decided on, until the store confirms or
        // contradicts it.
        let mut copy = None;
        while attempt < attempts {
            let Found { instance, cached } = match found.take() {
                Some(found) => found,
                None => {
                    let stored = self.inner.store.load(id).await?;
                    if let Some(stored) = &stored {
                        self.inner.recent.compare(copy.take(), stored);
                    }
                    Found::stored(stored.ok_or_else(|| EngineError::UnknownSaga {
                        kind: match event {
                            Event::Message(m) => m.kind.clone(),
                            Event::Deadline(_) => "deadline".to_owned(),
                            Event::Operator(a) => a.as_str().to_owned(),
                        },
                        key: Some(id.to_string()),
                    })?)
                }
            };
            let revision = instance.revision;
            if cached {
                copy = Some(revision);
            }
            let before = instance.status;
            let (pending, runner) = match self.decide(instance, event) {
                Ok((Ok(pending), runner)) => (pending, runner),
                // Only the instance as stored may decide that nothing
                // happens, or that the event cannot be applied.
                _ if cached => {
                    self.inner.recent.forget(id);
                    continue;
                }
                Ok((Err(reason), _)) => {
                    tracing::debug!(reason, "event ignored");
                    return Ok(Handled::Ignored(reason));
                }
                Err(e) => return Err(e),
            };
            attempt += 1;
            let status = pending.instance.status;
            let committed = self.commit(pending, Some(revision), consumed, check_inbox_first).await;
            if committed.is_err() {
                // Whatever went wrong, the kept copy may not be what is
                // stored: retries, and later events, read it.
                self.inner.recent.forget(id);
            }
            match committed {
                Ok(true) => {
                    if copy.is_some() {
                        self.inner.recent.checked(false);
                    }
                    tracing::debug!(%status, "transition committed");
                    record_transition(runner.name(), Some(before), status);
                    return Ok(Handled::Applied { saga: id, status });
                }
                Ok(false) => return Ok(Handled::Duplicate),
                Err(EngineError::Store(StoreError::ConsumedConcurrently { .. })) if consumed.is_some() => {
                    check_inbox_first = true;
                }
                Err(EngineError::Store(e)) if e.is_conflict() => continue,
                // Effects run before the commit checks the revision and the
                // inbox, so their failure may be only that of a stale
                // decision or of a duplicate: decided again on what the
                // store holds, it is one or the other, or it stands.
                Err(EngineError::Effects(error)) => {
                    match self.inner.store.load(id).await? {
                        Some(stored) if stored.revision == revision => {}
                        // Moved on: decided again on what was just read.
                        Some(stored) => {
                            self.inner.recent.compare(copy.take(), &stored);
                            found = Some(Found::stored(stored));
                            continue;
                        }
                        None => continue,
                    }
                    if let Some(message) = consumed
                        && self.consumed_before(message).await?
                    {
                        return Ok(Handled::Duplicate);
                    }
                    return Err(EngineError::Effects(error));
                }
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Contended { id, attempts })
    }

    /// Whether the inbox holds `message` already (a transaction that
    /// commits nothing).
    async fn consumed_before(&self, message: &MessageId) -> Result<bool, EngineError> {
        let mut tx = self.inner.store.begin().await?;
        Ok(!tx.consume(&self.inner.config.consumer, message).await?)
    }

    /// Decides `event` for `instance`, upgraded to its definition's current
    /// version first if an upgrade is registered.
    fn decide(
        &self,
        instance: SagaInstance,
        event: Event<'_>,
    ) -> Result<(Result<Pending, &'static str>, &dyn Runner), EngineError> {
        let id = instance.id;
        let instance = self.upgraded(instance)?;
        let runner = self.runner(&instance.definition, instance.definition_version, id)?;
        Ok((runner.decide(instance, event, self.now())?, runner.as_ref()))
    }

    /// One transaction: inbox, instance, history, outbox, effects. Returns
    /// `false` when the inbox shows the message was consumed already.
    async fn commit(
        &self,
        mut pending: Pending,
        expected_revision: Option<u64>,
        consumed: Option<&MessageId>,
        check_inbox_first: bool,
    ) -> Result<bool, EngineError> {
        let began = std::time::Instant::now();
        let mut tx = self.inner.store.begin().await?;
        if let Some(message) = consumed {
            let consumer = &self.inner.config.consumer;
            if !check_inbox_first {
                tx.consume_at_commit(consumer, message).await?;
            } else if !tx.consume(consumer, message).await? {
                return Ok(false);
            }
        }
        match expected_revision {
            None => tx.insert(&pending.instance).await?,
            Some(revision) => tx.update(&pending.instance, revision).await?,
        }
        tx.record(&pending.transition).await?;
        if !pending.messages.is_empty() {
            if let Some(hook) = &self.inner.message_headers {
                pending.messages.iter_mut().for_each(|m| hook(&mut m.headers));
            }
            tx.enqueue(Some(pending.instance.id), &pending.messages).await?;
        }
        if let Some(effects) = pending.effects {
            effects
                .apply(tx.as_mut(), &pending.instance)
                .await
                .map_err(EngineError::Effects)?;
        }
        tx.commit().await?;
        metrics::histogram!(telemetry::COMMIT_SECONDS, "saga" => pending.instance.definition.clone())
            .record(began.elapsed().as_secs_f64());
        if let Some(hook) = &self.inner.on_committed {
            hook(&pending.instance, &pending.transition);
        }
        self.inner.recent.committed(pending.instance);
        Ok(true)
    }
}

/// Counts a committed transition, and the saga's end when it ended.
fn record_transition(saga: &str, before: Option<SagaStatus>, after: SagaStatus) {
    metrics::counter!(telemetry::TRANSITIONS_TOTAL, "saga" => saga.to_owned()).increment(1);
    let ended = matches!(
        after,
        SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::NeedsAttention
    );
    if ended && before != Some(after) {
        metrics::counter!(telemetry::FINISHED_TOTAL, "saga" => saga.to_owned(), "status" => after.as_str())
            .increment(1);
    }
}

#[async_trait]
impl crate::consumer::MessageHandler for Engine {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        Engine::handle(self, message).await.map(|_| ())
    }
}
