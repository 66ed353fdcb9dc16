//! The engine's decision: a pure function from (definition, instance, event,
//! time) to (new instance, messages to send, effects, history entry). No I/O
//! happens here; the driver in [`engine`](crate::engine) commits the result.

use std::fmt;

use crate::clock::Timestamp;
use crate::definition::{Action, SagaData, SagaDefinition, StepContext};
use crate::error::{EngineError, StepError};
use crate::id::{MessageId, SagaId};
use crate::instance::{Cause, Position, SagaInstance, SagaStatus, Transition};
use crate::message::{Command, IN_REPLY_TO, Message};

/// What an operator can do to an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    /// Run the current step (or compensation) again now: skips a retry backoff,
    /// or re-sends a remote step's command.
    Retry,
    /// Force compensation of a running instance.
    Cancel,
    /// Resume the compensation of an instance that needs attention, with a
    /// fresh retry budget.
    Resume,
}

impl OperatorAction {
    /// The action's name, as recorded in the history.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Cancel => "cancel",
            Self::Resume => "resume",
        }
    }
}

impl fmt::Display for OperatorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happens to an instance.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A message arrived for it.
    Message(&'a Message),
    /// Its deadline `due` came.
    Deadline(Timestamp),
    /// An operator acted.
    Operator(OperatorAction),
}

/// The result of a transition that changes the instance.
#[derive(Debug)]
pub struct Decision<E> {
    /// The instance after the transition (revision bumped).
    pub instance: SagaInstance,
    /// Messages to publish, with their final ids.
    pub messages: Vec<Message>,
    /// Application effects to apply in the same transaction.
    pub effects: Vec<E>,
    /// The history entry.
    pub transition: Transition,
}

/// Whether an event changes the instance.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // Built once per event and moved straight into a commit; boxing would only add an allocation.
pub enum Outcome<E> {
    /// It does; commit this.
    Changed(Decision<E>),
    /// It does not (a late, stray or stale event); the reason says why.
    Ignored(&'static str),
}

/// The first transition of a new instance: runs local steps until the first
/// remote step has sent its command, or the saga ends.
pub fn start<D: SagaData, E: Send + 'static>(
    definition: &SagaDefinition<D, E>,
    id: SagaId,
    data: D,
    now: Timestamp,
) -> Result<Decision<E>, EngineError> {
    let key = definition.key.as_ref().map(|key| key(&data));
    let instance = SagaInstance {
        id,
        definition: definition.name.clone(),
        definition_version: definition.version,
        key,
        status: SagaStatus::Running,
        step: 0,
        attempt: 0,
        awaiting: None,
        deadline: None,
        failure: None,
        data: String::new(),
        data_version: definition.data_version,
        revision: 0,
        created_at: now,
        updated_at: now,
    };
    let mut run = Run::new(definition, instance, data, now);
    run.advance();
    run.finish(Cause::Started, None)
}

/// Decides what `event` does to `instance`.
pub fn decide<D: SagaData, E: Send + 'static>(
    definition: &SagaDefinition<D, E>,
    instance: &SagaInstance,
    event: Event<'_>,
    now: Timestamp,
) -> Result<Outcome<E>, EngineError> {
    if instance.status.is_terminal() {
        return Ok(Outcome::Ignored("the saga has finished"));
    }
    decide_owned(definition, instance.clone(), event, now)
}

/// [`decide`] on an instance the caller no longer needs (saves a copy).
pub(crate) fn decide_owned<D: SagaData, E: Send + 'static>(
    definition: &SagaDefinition<D, E>,
    instance: SagaInstance,
    event: Event<'_>,
    now: Timestamp,
) -> Result<Outcome<E>, EngineError> {
    if instance.status.is_terminal() {
        return Ok(Outcome::Ignored("the saga has finished"));
    }
    if let Some(reason) = misplaced(definition, &instance) {
        return Err(EngineError::NotResumable {
            id: instance.id,
            reason,
        });
    }
    let data: D = serde_json::from_str(&instance.data).map_err(|source| EngineError::Decode {
        what: format!("data of saga {}", instance.id),
        source,
    })?;
    let before = Position::of(&instance);
    let mut run = Run::new(definition, instance, data, now);
    let cause = match event {
        Event::Message(message) => {
            if let Some(reason) = run.on_message(message)? {
                return Ok(Outcome::Ignored(reason));
            }
            Cause::Message {
                id: message.id.clone(),
                kind: message.kind.clone(),
            }
        }
        Event::Deadline(due) => {
            if let Some(reason) = run.on_deadline(due) {
                return Ok(Outcome::Ignored(reason));
            }
            Cause::Deadline { due }
        }
        Event::Operator(action) => {
            run.on_operator(action)?;
            Cause::Operator {
                action: action.as_str().to_owned(),
            }
        }
    };
    run.advance();
    run.finish(cause, Some(before)).map(Outcome::Changed)
}

/// Why `instance` stands where `definition` has no step, if it does: a row
/// written under another definition of the same name and version (a
/// redeploy that dropped steps without a new version), or by hand. Deciding
/// on it would run past the steps.
pub(crate) fn misplaced<D: SagaData, E: Send + 'static>(
    definition: &SagaDefinition<D, E>,
    instance: &SagaInstance,
) -> Option<String> {
    let steps = &definition.steps;
    let step = instance.step as usize;
    match instance.status {
        SagaStatus::Running => match steps.get(step) {
            None => Some(format!("it runs step {step}, which does not exist")),
            Some(current) if instance.awaiting.is_some() && !current.is_remote() => {
                Some(format!("it awaits a reply at step `{}`, which is local", current.name))
            }
            Some(_) => None,
        },
        SagaStatus::Compensating | SagaStatus::NeedsAttention if step > steps.len() => {
            Some(format!("it compensates from step {step}, which does not exist"))
        }
        _ => None,
    }
}

struct Run<'d, D, E> {
    definition: &'d SagaDefinition<D, E>,
    instance: SagaInstance,
    data: D,
    now: Timestamp,
    messages: Vec<Message>,
    effects: Vec<E>,
    note: Option<String>,
}

impl<'d, D: SagaData, E: Send + 'static> Run<'d, D, E> {
    fn new(definition: &'d SagaDefinition<D, E>, instance: SagaInstance, data: D, now: Timestamp) -> Self {
        Self {
            definition,
            instance,
            data,
            now,
            messages: Vec::new(),
            effects: Vec::new(),
            note: None,
        }
    }

    fn on_message(&mut self, message: &Message) -> Result<Option<&'static str>, EngineError> {
        if self.instance.status != SagaStatus::Running {
            return Ok(Some("the saga is not running forward"));
        }
        let index = self.instance.step as usize;
        let Some(step) = self.definition.steps.get(index) else {
            return Ok(Some("the saga has no current step"));
        };
        let Action::Remote { replies, .. } = &step.action else {
            return Ok(Some("the current step awaits no reply"));
        };
        let Some(awaiting) = &self.instance.awaiting else {
            return Ok(Some("the current step awaits no reply"));
        };
        let Some(route) = replies.iter().find(|r| r.kind == message.kind) else {
            return Ok(Some("the current step does not handle this reply type"));
        };
        if message.header(IN_REPLY_TO).is_some_and(|to| to != awaiting.as_str()) {
            return Ok(Some("the reply answers an earlier command"));
        }
        let outcome = (route.handle)(&mut self.data, message).map_err(|source| EngineError::Decode {
            what: format!("`{}` message {}", message.kind, message.id),
            source,
        })?;
        match outcome {
            crate::ReplyOutcome::Success => {
                self.instance.awaiting = None;
                self.instance.deadline = None;
                self.instance.attempt = 0;
                self.instance.step += 1;
            }
            crate::ReplyOutcome::Failure(reason) => {
                self.fail(index, format!("step `{}` failed: {reason}", step.name));
            }
            crate::ReplyOutcome::Pending => {}
        }
        Ok(None)
    }

    fn on_deadline(&mut self, due: Timestamp) -> Option<&'static str> {
        if self.instance.deadline != Some(due) {
            return Some("the deadline has changed");
        }
        if due > self.now {
            return Some("the deadline has not come yet");
        }
        self.instance.deadline = None;
        match self.instance.status {
            SagaStatus::Running if self.instance.awaiting.is_some() => {
                let index = self.instance.step as usize;
                let name = self.definition.steps.get(index).map_or("?", |s| s.name.as_str());
                self.fail(index, format!("step `{name}` got no reply before its deadline"));
                None
            }
            // A retry backoff ended: `advance` runs the action again.
            SagaStatus::Running | SagaStatus::Compensating => None,
            _ => Some("the saga waits for nothing"),
        }
    }

    fn on_operator(&mut self, action: OperatorAction) -> Result<(), EngineError> {
        let invalid = |reason: &str| EngineError::InvalidAction {
            id: self.instance.id,
            action: action.as_str(),
            reason: reason.to_owned(),
        };
        let status = self.instance.status;
        match (action, status) {
            (OperatorAction::Retry, SagaStatus::Running | SagaStatus::Compensating) => {
                // Forget the outstanding command so `advance` sends it anew.
                self.instance.awaiting = None;
                self.instance.deadline = None;
            }
            (OperatorAction::Retry | OperatorAction::Resume, SagaStatus::NeedsAttention) => {
                self.instance.status = SagaStatus::Compensating;
                self.instance.attempt = 0;
            }
            (OperatorAction::Cancel, SagaStatus::Running) => {
                let index = self.instance.step as usize;
                self.fail(index, "cancelled by an operator".to_owned());
            }
            (OperatorAction::Resume, _) => return Err(invalid("only an instance that needs attention can be resumed")),
            (OperatorAction::Cancel, _) => return Err(invalid("only a running instance can be cancelled")),
            (OperatorAction::Retry, _) => return Err(invalid("the instance has finished")),
        }
        self.note = Some(format!("operator: {action}"));
        Ok(())
    }

    /// Starts compensating the steps before `failed`.
    fn fail(&mut self, failed: usize, reason: String) {
        self.instance.status = SagaStatus::Compensating;
        self.instance.step = failed as u32;
        self.instance.attempt = 0;
        self.instance.awaiting = None;
        self.instance.deadline = None;
        self.note = Some(reason.clone());
        self.instance.failure = Some(reason);
    }

    /// Runs local work until the saga must wait (for a reply or a retry) or ends.
    fn advance(&mut self) {
        let steps = &self.definition.steps;
        loop {
            match self.instance.status {
                SagaStatus::Running => {
                    let index = self.instance.step as usize;
                    let Some(step) = steps.get(index) else {
                        self.instance.status = SagaStatus::Completed;
                        self.instance.deadline = None;
                        self.instance.attempt = 0;
                        return;
                    };
                    let result = match &step.action {
                        Action::Local(action) => self.run_action(action.as_ref()),
                        Action::Remote { command, timeout, .. } => {
                            if self.instance.awaiting.is_some() {
                                return;
                            }
                            match command(&self.data) {
                                Ok(command) => {
                                    let id = self.emit(command);
                                    self.instance.awaiting = Some(id);
                                    self.instance.deadline = timeout.map(|t| self.now + t);
                                    // The command is out: failures to build it
                                    // are behind, and a retry starts afresh.
                                    self.instance.attempt = 0;
                                    return;
                                }
                                Err(error) => Err(error),
                            }
                        }
                    };
                    match result {
                        Ok(()) => {
                            self.instance.step += 1;
                            self.instance.attempt = 0;
                            self.instance.deadline = None;
                        }
                        Err(error) => {
                            let made = self.instance.attempt.saturating_add(1);
                            if error.is_retryable() && step.retry.allows_another(made) {
                                self.wait_for_retry(made, step.retry.backoff(made), &step.name, &error);
                                return;
                            }
                            self.fail(index, format!("step `{}` failed: {}", step.name, error.reason()));
                        }
                    }
                }
                SagaStatus::Compensating => {
                    if self.instance.step == 0 {
                        self.instance.status = SagaStatus::Compensated;
                        self.instance.deadline = None;
                        self.instance.attempt = 0;
                        return;
                    }
                    let index = self.instance.step as usize - 1;
                    let step = &steps[index];
                    let Some(compensation) = &step.compensation else {
                        self.instance.step -= 1;
                        continue;
                    };
                    match self.run_action(compensation.as_ref()) {
                        Ok(()) => {
                            self.instance.step -= 1;
                            self.instance.attempt = 0;
                            self.instance.deadline = None;
                        }
                        Err(error) => {
                            let made = self.instance.attempt.saturating_add(1);
                            if error.is_retryable() && step.compensation_retry.allows_another(made) {
                                let backoff = step.compensation_retry.backoff(made);
                                self.wait_for_retry(made, backoff, &step.name, &error);
                            } else {
                                let reason = format!(
                                    "compensation of `{}` failed after {made} attempt(s): {}",
                                    step.name,
                                    error.reason()
                                );
                                self.instance.status = SagaStatus::NeedsAttention;
                                self.instance.attempt = made;
                                self.instance.deadline = None;
                                self.note = Some(reason.clone());
                                // Keep the original failure: it is why compensation ran at all.
                                self.instance.failure = Some(match self.instance.failure.take() {
                                    Some(cause) => format!("{cause}; then {reason}"),
                                    None => reason,
                                });
                            }
                            return;
                        }
                    }
                }
                SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::NeedsAttention => return,
            }
        }
    }

    fn wait_for_retry(&mut self, made: u32, backoff: std::time::Duration, step: &str, error: &StepError) {
        self.instance.attempt = made;
        self.instance.deadline = Some(self.now + backoff);
        self.note = Some(format!("`{step}` attempt {made} failed, retrying: {}", error.reason()));
    }

    /// Runs an action on a copy of the data; its outputs count only if it succeeds.
    fn run_action(&mut self, action: &crate::definition::LocalAction<D, E>) -> Result<(), StepError> {
        let mut data = self.data.clone();
        let failure = match self.instance.status {
            SagaStatus::Running => None,
            _ => self.instance.failure.clone(),
        };
        let mut context = StepContext::new(self.now, self.instance.attempt, failure);
        action(&mut data, &mut context)?;
        self.data = data;
        for command in context.commands {
            self.emit(command);
        }
        self.effects.extend(context.effects);
        Ok(())
    }

    fn emit(&mut self, command: Command) -> MessageId {
        let id = MessageId::derived(self.instance.id, self.instance.revision + 1, self.messages.len());
        self.messages.push(Message {
            id: id.clone(),
            kind: command.kind,
            destination: command.destination,
            correlation_id: Some(self.instance.id.to_string()),
            timestamp: self.now,
            headers: Default::default(),
            payload: command.payload,
        });
        id
    }

    fn finish(mut self, cause: Cause, before: Option<Position>) -> Result<Decision<E>, EngineError> {
        self.instance.data = serde_json::to_string(&self.data).map_err(|source| EngineError::Decode {
            what: format!("data of saga {}", self.instance.id),
            source,
        })?;
        self.instance.revision += 1;
        self.instance.updated_at = self.now;
        let transition = Transition {
            saga_id: self.instance.id,
            revision: self.instance.revision,
            at: self.now,
            cause,
            before,
            after: Position::of(&self.instance),
            emitted: self.messages.iter().map(|m| (m.id.clone(), m.kind.clone())).collect(),
            note: self.note,
        };
        Ok(Decision {
            instance: self.instance,
            messages: self.messages,
            effects: self.effects,
            transition,
        })
    }
}
