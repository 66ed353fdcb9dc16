use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use crate::clock::{Clock, ManualClock};
use crate::decide::{self, Event, OperatorAction, Outcome};
use crate::definition::{SagaData, SagaDefinition};
use crate::engine::Handled;
use crate::error::EngineError;
use crate::id::{MessageId, SagaId};
use crate::instance::{SagaInstance, SagaStatus, Transition};
use crate::message::{IN_REPLY_TO, Message};

/// Drives one saga instance through its definition's pure decision function,
/// with an inbox and a manual clock, and records what it sends and emits.
///
/// ```
/// use saga_core::{Command, ReplyOutcome, SagaDefinition, SagaStatus, Step, testkit::SagaTest};
/// use std::time::Duration;
///
/// let definition = SagaDefinition::<u32>::builder("ping")
///     .step(
///         Step::remote("ping", |_: &u32| Ok(Command::json("Ping", "pings", &())?))
///             .on_reply("Pong", |n: &mut u32, _: ()| { *n += 1; ReplyOutcome::Success })
///             .timeout(Duration::from_secs(5)),
///     )
///     .build()?;
/// let mut test = SagaTest::new(definition);
/// test.start(0);
/// assert_eq!(test.sent_kinds(), ["Ping"]);
/// test.advance(Duration::from_secs(6));
/// assert_eq!(test.status(), SagaStatus::Compensated);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SagaTest<D, E = ()> {
    definition: SagaDefinition<D, E>,
    clock: ManualClock,
    instance: Option<SagaInstance>,
    inbox: HashSet<MessageId>,
    sent: Vec<Message>,
    effects: Vec<E>,
    history: Vec<Transition>,
}

impl<D: SagaData, E: Send + 'static> SagaTest<D, E> {
    /// A test of `definition` on a manual clock.
    pub fn new(definition: SagaDefinition<D, E>) -> Self {
        Self {
            definition,
            clock: ManualClock::default(),
            instance: None,
            inbox: HashSet::new(),
            sent: Vec::new(),
            effects: Vec::new(),
            history: Vec::new(),
        }
    }

    /// Starts the instance with `data`.
    ///
    /// # Panics
    /// If starting fails (the definition cannot encode its data).
    pub fn start(&mut self, data: D) -> &mut Self {
        self.start_with_id(SagaId::new(), data)
    }

    /// Starts the instance with a chosen id (e.g. a business id).
    ///
    /// # Panics
    /// If starting fails (the definition cannot encode its data).
    pub fn start_with_id(&mut self, id: SagaId, data: D) -> &mut Self {
        let decision = decide::start(&self.definition, id, data, self.clock.now())
            .unwrap_or_else(|e| panic!("starting the saga failed: {e}"));
        self.absorb(decision);
        self
    }

    /// Delivers a reply of type `kind` with `body`, answering the command the
    /// current step sent, and returns what the engine did.
    pub fn reply<T: Serialize>(&mut self, kind: &str, body: &T) -> Result<Handled, EngineError> {
        let instance = self.instance();
        let mut message = Message::json(kind, "test", body)
            .unwrap_or_else(|e| panic!("cannot encode reply: {e}"))
            .with_correlation_id(instance.id.to_string());
        if let Some(command) = &instance.awaiting {
            message = message.with_header(IN_REPLY_TO, command.as_str());
        }
        self.deliver(&message)
    }

    /// Delivers `message` (again, to test duplicates): the inbox drops a repeat.
    pub fn deliver(&mut self, message: &Message) -> Result<Handled, EngineError> {
        if self.inbox.contains(&message.id) {
            return Ok(Handled::Duplicate);
        }
        let outcome = decide::decide(
            &self.definition,
            self.instance(),
            Event::Message(message),
            self.clock.now(),
        )?;
        Ok(match outcome {
            Outcome::Changed(decision) => {
                self.inbox.insert(message.id.clone());
                let status = decision.instance.status;
                let saga = decision.instance.id;
                self.absorb(decision);
                Handled::Applied { saga, status }
            }
            Outcome::Ignored(reason) => Handled::Ignored(reason),
        })
    }

    /// Moves virtual time forward by `by`, firing the deadline if it came.
    pub fn advance(&mut self, by: Duration) -> &mut Self {
        self.clock.advance(by);
        let now = self.clock.now();
        if let Some(due) = self.instance().deadline.filter(|d| *d <= now) {
            self.apply(Event::Deadline(due));
        }
        self
    }

    /// Applies an operator action.
    pub fn operator(&mut self, action: OperatorAction) -> Result<&mut Self, EngineError> {
        let outcome = decide::decide(
            &self.definition,
            self.instance(),
            Event::Operator(action),
            self.clock.now(),
        )?;
        if let Outcome::Changed(decision) = outcome {
            self.absorb(decision);
        }
        Ok(self)
    }

    fn apply(&mut self, event: Event<'_>) {
        let outcome = decide::decide(&self.definition, self.instance(), event, self.clock.now())
            .unwrap_or_else(|e| panic!("the transition failed: {e}"));
        if let Outcome::Changed(decision) = outcome {
            self.absorb(decision);
        }
    }

    fn absorb(&mut self, decision: crate::decide::Decision<E>) {
        self.sent.extend(decision.messages);
        self.effects.extend(decision.effects);
        self.history.push(decision.transition);
        self.instance = Some(decision.instance);
    }

    /// The instance as it stands.
    ///
    /// # Panics
    /// Before [`start`](Self::start).
    pub fn instance(&self) -> &SagaInstance {
        self.instance.as_ref().unwrap_or_else(|| panic!("call start() first"))
    }

    /// The instance's status.
    pub fn status(&self) -> SagaStatus {
        self.instance().status
    }

    /// The saga data as it stands.
    pub fn data(&self) -> D {
        serde_json::from_str(&self.instance().data).unwrap_or_else(|e| panic!("stored data does not decode: {e}"))
    }

    /// Every message sent so far, in order.
    pub fn sent(&self) -> &[Message] {
        &self.sent
    }

    /// The types of the messages sent so far, in order.
    pub fn sent_kinds(&self) -> Vec<&str> {
        self.sent.iter().map(|m| m.kind.as_str()).collect()
    }

    /// Every effect emitted so far, in order.
    pub fn effects(&self) -> &[E] {
        &self.effects
    }

    /// The history so far.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// The clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }
}
