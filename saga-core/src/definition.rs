//! Declaring a saga: typed data, steps in order, compensations, reply
//! deadlines and retries. A definition is checked when it is built.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::clock::Timestamp;
use crate::error::{DefinitionError, RetryPolicy, StepError};
use crate::message::{Command, Message};

/// Data a saga carries: stored as JSON with the instance, cloned so a failed
/// action leaves no trace.
pub trait SagaData: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> SagaData for T {}

/// What a local action or compensation may do besides changing the data:
/// send messages and emit application effects. Both are discarded if the
/// action fails, and committed atomically with the transition if it succeeds.
pub struct StepContext<E> {
    now: Timestamp,
    attempt: u32,
    failure: Option<String>,
    pub(crate) commands: Vec<Command>,
    pub(crate) effects: Vec<E>,
}

impl<E> StepContext<E> {
    pub(crate) fn new(now: Timestamp, attempt: u32, failure: Option<String>) -> Self {
        Self {
            now,
            attempt,
            failure,
            commands: Vec::new(),
            effects: Vec::new(),
        }
    }

    /// The engine's clock reading for this transition.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Attempts of this action already made and failed (0 on the first try).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// In a compensation: why the saga is compensating (the failed step's
    /// reason, a missed deadline, or an operator's cancel). `None` in forward steps.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Sends `command` when the transition commits.
    pub fn send(&mut self, command: Command) {
        self.commands.push(command);
    }

    /// Applies `effect` to the application's own tables in the transition's transaction.
    pub fn effect(&mut self, effect: E) {
        self.effects.push(effect);
    }
}

/// How a reply ends (or does not end) a remote step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyOutcome {
    /// The step succeeded; the saga moves on.
    Success,
    /// The step failed; compensation starts.
    Failure(String),
    /// More replies are expected; keep waiting (the data change is kept).
    Pending,
}

pub(crate) type LocalAction<D, E> = dyn Fn(&mut D, &mut StepContext<E>) -> Result<(), StepError> + Send + Sync;
pub(crate) type LocalFn<D, E> = Arc<LocalAction<D, E>>;
pub(crate) type CommandFn<D> = Arc<dyn Fn(&D) -> Result<Command, StepError> + Send + Sync>;
pub(crate) type ReplyFn<D> = Arc<dyn Fn(&mut D, &Message) -> Result<ReplyOutcome, serde_json::Error> + Send + Sync>;
/// Extracts the correlation key from a reply payload.
pub(crate) type MessageKeyFn = Arc<dyn Fn(&Message) -> Result<String, serde_json::Error> + Send + Sync>;
pub(crate) type DataKeyFn<D> = Arc<dyn Fn(&D) -> String + Send + Sync>;

/// How a reply finds its saga instance.
#[derive(Clone)]
pub(crate) enum Correlation {
    /// The message's `correlation_id` is the saga id.
    SagaId,
    /// A key read from the payload equals the saga's business key.
    Key(MessageKeyFn),
}

pub(crate) struct ReplyRoute<D> {
    pub(crate) kind: String,
    pub(crate) correlation: Correlation,
    pub(crate) handle: ReplyFn<D>,
}

pub(crate) enum Action<D, E> {
    Local(LocalFn<D, E>),
    Remote {
        command: CommandFn<D>,
        replies: Vec<ReplyRoute<D>>,
        timeout: Option<Duration>,
    },
}

/// One step of a saga. Build it with [`Step::local`] or [`Step::remote`].
pub struct Step<D, E = ()> {
    pub(crate) name: String,
    pub(crate) action: Action<D, E>,
    pub(crate) compensation: Option<LocalFn<D, E>>,
    pub(crate) retry: RetryPolicy,
    pub(crate) compensation_retry: RetryPolicy,
    /// A reply handler was added to a local step; `build` reports it.
    reply_on_local: Option<String>,
    /// A timeout was given to a local step; `build` reports it.
    timeout_on_local: bool,
}

impl<D: SagaData, E: Send + 'static> Step<D, E> {
    /// A step that runs `action` on the saga data inside the engine's transition.
    ///
    /// The action must be deterministic given the data and context: after a
    /// crash it may run again, and only the committed run counts.
    pub fn local(
        name: impl Into<String>,
        action: impl Fn(&mut D, &mut StepContext<E>) -> Result<(), StepError> + Send + Sync + 'static,
    ) -> Self {
        Self::new(name, Action::Local(Arc::new(action)))
    }

    /// A step that sends the command `command` builds and waits for a reply
    /// (add handlers with [`on_reply`](Self::on_reply) / [`on_reply_keyed`](Self::on_reply_keyed)).
    pub fn remote(
        name: impl Into<String>,
        command: impl Fn(&D) -> Result<Command, StepError> + Send + Sync + 'static,
    ) -> Self {
        Self::new(
            name,
            Action::Remote {
                command: Arc::new(command),
                replies: Vec::new(),
                timeout: None,
            },
        )
    }

    fn new(name: impl Into<String>, action: Action<D, E>) -> Self {
        Self {
            name: name.into(),
            action,
            compensation: None,
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::default(),
            reply_on_local: None,
            timeout_on_local: false,
        }
    }

    /// Handles replies of type `kind` whose `correlation_id` is the saga id.
    pub fn on_reply<R: DeserializeOwned + 'static>(
        self,
        kind: impl Into<String>,
        handler: impl Fn(&mut D, R) -> ReplyOutcome + Send + Sync + 'static,
    ) -> Self {
        self.add_reply(kind.into(), Correlation::SagaId, handler)
    }

    /// Handles replies of type `kind` that carry no saga id: `key` reads the
    /// saga's business key (see [`SagaBuilder::key`]) from the decoded reply.
    pub fn on_reply_keyed<R: DeserializeOwned + 'static>(
        self,
        kind: impl Into<String>,
        key: impl Fn(&R) -> String + Send + Sync + 'static,
        handler: impl Fn(&mut D, R) -> ReplyOutcome + Send + Sync + 'static,
    ) -> Self {
        let key: MessageKeyFn = Arc::new(move |message: &Message| message.decode::<R>().map(|r| key(&r)));
        self.add_reply(kind.into(), Correlation::Key(key), handler)
    }

    fn add_reply<R: DeserializeOwned + 'static>(
        mut self,
        kind: String,
        correlation: Correlation,
        handler: impl Fn(&mut D, R) -> ReplyOutcome + Send + Sync + 'static,
    ) -> Self {
        let handle: ReplyFn<D> =
            Arc::new(move |data: &mut D, message: &Message| message.decode::<R>().map(|r| handler(data, r)));
        match &mut self.action {
            Action::Remote { replies, .. } => replies.push(ReplyRoute {
                kind,
                correlation,
                handle,
            }),
            Action::Local(_) => self.reply_on_local = Some(kind),
        }
        self
    }

    /// Fails the step if no deciding reply arrives within `timeout` of
    /// sending the command (at least a millisecond; remote steps only).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        match &mut self.action {
            Action::Remote { timeout: t, .. } => *t = Some(timeout),
            Action::Local(_) => self.timeout_on_local = true,
        }
        self
    }

    /// What undoes this step when a later step fails: a local action that may
    /// also send messages through the context.
    pub fn compensate(
        mut self,
        compensation: impl Fn(&mut D, &mut StepContext<E>) -> Result<(), StepError> + Send + Sync + 'static,
    ) -> Self {
        self.compensation = Some(Arc::new(compensation));
        self
    }

    /// Retries of the forward local action (default: 5 attempts, 200 ms doubling).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Retries of the compensation before the saga needs attention.
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the step waits for a reply.
    pub fn is_remote(&self) -> bool {
        matches!(self.action, Action::Remote { .. })
    }

    /// Whether the step has a compensation.
    pub fn is_compensable(&self) -> bool {
        self.compensation.is_some()
    }

    /// The reply deadline of a remote step.
    pub fn reply_timeout(&self) -> Option<Duration> {
        match &self.action {
            Action::Remote { timeout, .. } => *timeout,
            Action::Local(_) => None,
        }
    }

    pub(crate) fn reply_kinds(&self) -> Vec<&str> {
        match &self.action {
            Action::Remote { replies, .. } => replies.iter().map(|r| r.kind.as_str()).collect(),
            Action::Local(_) => Vec::new(),
        }
    }
}

/// A checked saga definition: name, version, typed data `D`, steps in order,
/// and the application effect type `E` its steps emit (`()` for none).
pub struct SagaDefinition<D, E = ()> {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) data_version: u32,
    pub(crate) key: Option<DataKeyFn<D>>,
    pub(crate) steps: Vec<Step<D, E>>,
}

impl<D: SagaData, E: Send + 'static> SagaDefinition<D, E> {
    /// Starts declaring a saga named `name` (version 1).
    pub fn builder(name: impl Into<String>) -> SagaBuilder<D, E> {
        SagaBuilder {
            name: name.into(),
            version: 1,
            data_version: 1,
            key: None,
            steps: Vec::new(),
        }
    }

    /// The saga's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The definition's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The schema version of the data.
    pub fn data_version(&self) -> u32 {
        self.data_version
    }

    /// The steps in order.
    pub fn steps(&self) -> &[Step<D, E>] {
        &self.steps
    }

    /// The definition as a Mermaid flowchart: forward steps, where a failure
    /// leads, and the compensations in reverse order.
    ///
    /// ```
    /// use saga_core::{SagaDefinition, Step};
    ///
    /// let definition: SagaDefinition<u32> = SagaDefinition::builder("trip")
    ///     .step(Step::local("book-hotel", |_: &mut u32, _| Ok(())).compensate(|_, _| Ok(())))
    ///     .step(Step::local("book-flight", |_: &mut u32, _| Ok(())))
    ///     .build()?;
    /// let chart = definition.to_mermaid();
    /// assert!(chart.starts_with("flowchart"));
    /// assert!(chart.contains("book-hotel") && chart.contains("book-flight"));
    /// # Ok::<(), saga_core::DefinitionError>(())
    /// ```
    pub fn to_mermaid(&self) -> String {
        mermaid(&self.steps)
    }
}

/// Builds a [`SagaDefinition`]; [`build`](Self::build) checks it.
pub struct SagaBuilder<D, E = ()> {
    name: String,
    version: u32,
    data_version: u32,
    key: Option<DataKeyFn<D>>,
    steps: Vec<Step<D, E>>,
}

impl<D: SagaData, E: Send + 'static> SagaBuilder<D, E> {
    /// The definition's version (default 1). Instances continue under the
    /// version that started them.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// The schema version of the saga data (default 1), stored with each instance.
    pub fn data_version(mut self, version: u32) -> Self {
        self.data_version = version;
        self
    }

    /// The business key of an instance (unique per definition), for replies
    /// correlated by payload (e.g. an order id).
    pub fn key(mut self, key: impl Fn(&D) -> String + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(key));
        self
    }

    /// Appends a step.
    pub fn step(mut self, step: Step<D, E>) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks the definition.
    pub fn build(self) -> Result<SagaDefinition<D, E>, DefinitionError> {
        let saga = self.name.clone();
        if saga.trim().is_empty() {
            return Err(DefinitionError::MissingName);
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps { saga });
        }
        let mut names = HashSet::new();
        let mut reply_owner: HashMap<&str, &str> = HashMap::new();
        for (index, step) in self.steps.iter().enumerate() {
            if step.name.trim().is_empty() {
                return Err(DefinitionError::UnnamedStep { saga, index });
            }
            if !names.insert(step.name.as_str()) {
                return Err(DefinitionError::DuplicateStep {
                    saga,
                    step: step.name.clone(),
                });
            }
            if step.retry.max_attempts == 0 || step.compensation_retry.max_attempts == 0 {
                return Err(DefinitionError::ZeroAttempts {
                    saga,
                    step: step.name.clone(),
                });
            }
            if let Some(kind) = &step.reply_on_local {
                return Err(DefinitionError::ReplyOnLocalStep {
                    saga,
                    step: step.name.clone(),
                    kind: kind.clone(),
                });
            }
            if step.timeout_on_local {
                return Err(DefinitionError::TimeoutOnLocalStep {
                    saga,
                    step: step.name.clone(),
                });
            }
            if let Action::Remote { replies, timeout, .. } = &step.action {
                // Deadlines count whole milliseconds: less would expire as
                // the command is sent, before any reply could come.
                if timeout.is_some_and(|t| t < Duration::from_millis(1)) {
                    return Err(DefinitionError::ZeroTimeout {
                        saga,
                        step: step.name.clone(),
                    });
                }
                if replies.is_empty() {
                    return Err(DefinitionError::NoReplyHandler {
                        saga,
                        step: step.name.clone(),
                    });
                }
                for route in replies {
                    if matches!(route.correlation, Correlation::Key(_)) && self.key.is_none() {
                        return Err(DefinitionError::MissingKey {
                            saga,
                            step: step.name.clone(),
                        });
                    }
                }
            }
            for kind in step.reply_kinds() {
                if let Some(first) = reply_owner.insert(kind, &step.name) {
                    return Err(DefinitionError::AmbiguousReply {
                        saga,
                        kind: kind.to_owned(),
                        first: first.to_owned(),
                        second: step.name.clone(),
                    });
                }
            }
        }
        Ok(SagaDefinition {
            name: self.name,
            version: self.version,
            data_version: self.data_version,
            key: self.key,
            steps: self.steps,
        })
    }
}

fn mermaid<D: SagaData, E: Send + 'static>(steps: &[Step<D, E>]) -> String {
    let mut out = String::from("flowchart TD\n    start([start])\n");
    for (i, step) in steps.iter().enumerate() {
        let label = escape(&step.name);
        let _ = match &step.action {
            Action::Local(_) => writeln!(out, "    s{i}[\"{label}\"]"),
            Action::Remote { replies, timeout, .. } => {
                let kinds: Vec<String> = replies.iter().map(|r| escape(&r.kind)).collect();
                let deadline = timeout.map(|t| format!(" ≤ {}", humane(t))).unwrap_or_default();
                writeln!(
                    out,
                    "    s{i}[/\"{label}<br/>awaits {}{deadline}\"/]",
                    kinds.join(" | ")
                )
            }
        };
        if let Some(_c) = &step.compensation {
            let _ = writeln!(out, "    c{i}[\"undo {label}\"]");
        }
    }
    out.push_str("    completed([Completed])\n    compensated([Compensated])\n");
    let _ = writeln!(out, "    start --> s0");
    for i in 0..steps.len() {
        let next = if i + 1 < steps.len() {
            format!("s{}", i + 1)
        } else {
            "completed".to_owned()
        };
        let _ = writeln!(out, "    s{i} --> {next}");
        // A step that can fail hands over to the compensation of the nearest earlier compensable step.
        let _ = writeln!(out, "    s{i} -. fails .-> {}", compensation_below(steps, i));
        if steps[i].compensation.is_some() {
            let _ = writeln!(out, "    c{i} --> {}", compensation_below(steps, i));
        }
    }
    out
}

fn compensation_below<D, E>(steps: &[Step<D, E>], index: usize) -> String {
    (0..index)
        .rev()
        .find(|&j| steps[j].compensation.is_some())
        .map(|j| format!("c{j}"))
        .unwrap_or_else(|| "compensated".to_owned())
}

fn escape(text: &str) -> String {
    text.replace('"', "#quot;")
}

fn humane(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &mut u32, _: &mut StepContext<()>) -> Result<(), StepError> {
        Ok(())
    }

    fn cmd(_: &u32) -> Result<Command, StepError> {
        Ok(Command {
            kind: "Cmd".into(),
            destination: "out".into(),
            payload: b"{}".to_vec(),
        })
    }

    #[test]
    fn rejects_malformed_definitions() {
        let none = SagaDefinition::<u32>::builder("s").build();
        assert!(matches!(none, Err(DefinitionError::NoSteps { .. })));

        let dup = SagaDefinition::<u32>::builder("s")
            .step(Step::local("a", ok))
            .step(Step::local("a", ok))
            .build();
        assert!(matches!(dup, Err(DefinitionError::DuplicateStep { step, .. }) if step == "a"));

        let no_reply = SagaDefinition::<u32>::builder("s").step(Step::remote("r", cmd)).build();
        assert!(matches!(no_reply, Err(DefinitionError::NoReplyHandler { .. })));

        let no_key = SagaDefinition::<u32>::builder("s")
            .step(Step::remote("r", cmd).on_reply_keyed(
                "Reply",
                |r: &String| r.clone(),
                |_, _: String| ReplyOutcome::Success,
            ))
            .build();
        assert!(matches!(no_key, Err(DefinitionError::MissingKey { .. })));

        let ambiguous = SagaDefinition::<u32>::builder("s")
            .step(Step::remote("r1", cmd).on_reply("Reply", |_, _: bool| ReplyOutcome::Success))
            .step(Step::remote("r2", cmd).on_reply("Reply", |_, _: bool| ReplyOutcome::Success))
            .build();
        assert!(matches!(ambiguous, Err(DefinitionError::AmbiguousReply { .. })));

        let misplaced = SagaDefinition::<u32>::builder("s")
            .step(Step::local("a", ok).on_reply("Reply", |_, _: bool| ReplyOutcome::Success))
            .build();
        assert!(matches!(misplaced, Err(DefinitionError::ReplyOnLocalStep { .. })));

        let local_timeout = SagaDefinition::<u32>::builder("s")
            .step(Step::local("a", ok).timeout(Duration::from_secs(5)))
            .build();
        assert!(matches!(local_timeout, Err(DefinitionError::TimeoutOnLocalStep { .. })));

        let replying = || Step::remote("r", cmd).on_reply("Reply", |_, _: bool| ReplyOutcome::Success);
        for instant in [Duration::ZERO, Duration::from_micros(999)] {
            let zero = SagaDefinition::<u32>::builder("s")
                .step(replying().timeout(instant))
                .build();
            assert!(matches!(zero, Err(DefinitionError::ZeroTimeout { .. })), "{instant:?}");
        }
        let shortest = SagaDefinition::<u32>::builder("s")
            .step(replying().timeout(Duration::from_millis(1)))
            .build();
        assert!(shortest.is_ok());

        let zero = SagaDefinition::<u32>::builder("s")
            .step(Step::local("a", ok).retry(RetryPolicy::attempts(0)))
            .build();
        assert!(matches!(zero, Err(DefinitionError::ZeroAttempts { .. })));
        assert!(matches!(
            SagaDefinition::<u32>::builder(" ").step(Step::local("a", ok)).build(),
            Err(DefinitionError::MissingName)
        ));
    }

    #[test]
    fn mermaid_shows_steps_failures_and_compensations() {
        let def = SagaDefinition::<u32>::builder("orders")
            .step(Step::local("create", ok).compensate(ok))
            .step(
                Step::remote("reserve", cmd)
                    .on_reply("Reserved", |_, _: bool| ReplyOutcome::Success)
                    .timeout(Duration::from_secs(30)),
            )
            .step(Step::local("confirm", ok))
            .build()
            .expect("valid definition");
        let chart = def.to_mermaid();
        assert!(chart.starts_with("flowchart TD"));
        assert!(chart.contains("s1[/\"reserve<br/>awaits Reserved ≤ 30s\"/]"), "{chart}");
        assert!(chart.contains("s1 -. fails .-> c0"), "{chart}");
        assert!(chart.contains("c0 --> compensated"), "{chart}");
        assert!(chart.contains("s2 --> completed"), "{chart}");
    }
}
