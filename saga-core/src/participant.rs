//! The participant side: a service that receives a command and replies.
//! Each command is handled once per message id, and the replies commit in
//! the same transaction as the participant's own changes.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument;

use crate::error::{EngineError, StepError};
use crate::id::MessageId;
use crate::message::{Command, IN_REPLY_TO, Message};
use crate::store::{SagaStore, StoreError, Transaction};
use crate::telemetry;

mod batch;

use batch::Batches;
pub use batch::CommandBatching;

/// Handles commands for a participant. Make your changes through `tx` (downcast
/// `tx.backend()` to your store's transaction) and return the replies; all of
/// it commits together, or none of it.
#[async_trait]
pub trait CommandHandler: Send + Sync + 'static {
    /// Handles one command. A retryable error makes the message be delivered
    /// again later; a terminal one dead-letters it.
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError>;

    /// Handles the commands of a shared transaction (see
    /// [`CommandBatching`]; never none), in order, returning each one's
    /// replies in the same order. It must have the effect of [`handle`](Self::handle) on
    /// each, one after another, in `tx`; the default does exactly that.
    /// Override it to do the work of several commands in fewer round
    /// trips. An error rolls the whole transaction back, after which each
    /// command is handled alone, so it may fail the batch for any one
    /// command's sake.
    async fn handle_batch(
        &self,
        tx: &mut dyn Transaction,
        commands: &[&Message],
    ) -> Result<Vec<Vec<Command>>, StepError> {
        let mut replies = Vec::with_capacity(commands.len());
        for command in commands {
            replies.push(self.handle(tx, command).await?);
        }
        Ok(replies)
    }
}

/// How a participant treated a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handling {
    /// Handled and committed, with this many replies.
    Handled {
        /// Replies enqueued.
        replies: usize,
    },
    /// Already handled before: nothing done.
    Duplicate,
}

/// Runs a [`CommandHandler`] with inbox deduplication and an outbox for replies.
///
/// A command delivered twice (the broker redelivers after a lost ack) is
/// handled once: the second delivery finds its id in the inbox.
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use saga_core::memory::InMemoryStore;
/// use saga_core::{Command, CommandHandler, Handling, Message, OutboxStore, Participant, StepError, Transaction};
///
/// struct Stock;
///
/// #[async_trait]
/// impl CommandHandler for Stock {
///     async fn handle(&self, _tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
///         let order: serde_json::Value = serde_json::from_slice(&command.payload)
///             .map_err(|e| StepError::terminal(format!("undecodable command: {e}")))?;
///         let reply = serde_json::json!({"order_id": order["order_id"], "success": true});
///         Ok(vec![Command::json("StockUpdateResult", "stock_update_exchange", &reply)?])
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = InMemoryStore::new();
/// let stock = Participant::new("stock", Arc::new(store.clone()), Stock);
/// let command = Message::json("OrderCreated", "orders_exchange", &serde_json::json!({"order_id": "o-1"}))?;
///
/// assert_eq!(stock.handle(&command).await?, Handling::Handled { replies: 1 });
/// assert_eq!(stock.handle(&command).await?, Handling::Duplicate);
/// let claimed = store.claim(10, std::time::Duration::from_secs(5)).await?;
/// assert_eq!(claimed.len(), 1, "one reply in the outbox");
/// # Ok(()) }
/// ```
pub struct Participant {
    core: Arc<Core>,
    /// Commands waiting to share a transaction; `None` handles each alone.
    batches: Option<Arc<Batches>>,
}

/// What handling a command needs, shared with the batch runners.
struct Core {
    name: String,
    store: Arc<dyn SagaStore>,
    handler: Arc<dyn CommandHandler>,
}

impl Participant {
    /// A participant named `name` (its inbox consumer name).
    pub fn new(name: impl Into<String>, store: Arc<dyn SagaStore>, handler: impl CommandHandler) -> Self {
        Self {
            core: Arc::new(Core {
                name: name.into(),
                store,
                handler: Arc::new(handler),
            }),
            batches: None,
        }
    }

    /// Lets commands that arrive while others are being handled share one
    /// transaction (see [`CommandBatching`]); off by default.
    pub fn with_batching(mut self, batching: CommandBatching) -> Self {
        self.batches = (batching.max_commands > 1).then(|| Arc::new(Batches::new(batching)));
        self
    }

    /// Handles `command` once: handler, replies to the outbox, and the
    /// inbox record of the command, committed together.
    ///
    /// The command is consumed at commit ([`Transaction::consume_at_commit`]):
    /// backends that check there save a read per command, and a duplicate
    /// is found when the commit meets the earlier record; what the handler
    /// wrote through `tx` then rolls back. A handler error is reported only
    /// for a command not consumed before, so a redelivered command that now
    /// fails is still a duplicate.
    ///
    /// Replies get ids derived from the command's id, the command's
    /// correlation id, and an `in-reply-to` header naming the command.
    ///
    /// With [batching](Self::with_batching), the command may share its
    /// transaction with others; the outcome is the one it would have alone.
    pub async fn handle(&self, command: &Message) -> Result<Handling, EngineError> {
        match &self.batches {
            Some(batches) => batch::handle(&self.core, batches, command).await,
            None => self.core.alone(command).await,
        }
    }
}

/// Why a command could not join a transaction.
enum Refused {
    Store(StoreError),
    Handler(StepError),
}

impl Core {
    /// Adds `command` to `tx`: its inbox record, the handler's writes and
    /// its replies. A command this transaction or an earlier one consumed
    /// is a duplicate, and adds nothing.
    async fn add(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Handling, Refused> {
        if !self.consume(tx, command).await.map_err(Refused::Store)? {
            return Ok(Handling::Duplicate);
        }
        let commands = self.handler.handle(tx, command).await.map_err(Refused::Handler)?;
        enqueue_replies(&self.name, tx, command, commands)
            .await
            .map_err(Refused::Store)
    }

    /// Records `command` as consumed at commit; false if this transaction
    /// or an earlier one consumed it already (a duplicate, adding nothing).
    async fn consume(&self, tx: &mut dyn Transaction, command: &Message) -> Result<bool, StoreError> {
        match tx.consume_at_commit(&self.name, &command.id).await {
            Err(StoreError::ConsumedConcurrently { .. }) => Ok(false),
            other => other.map(|()| true),
        }
    }

    /// Handles `command` in a transaction of its own.
    async fn alone(&self, command: &Message) -> Result<Handling, EngineError> {
        let began = Instant::now();
        let mut tx = self.store.begin().await?;
        let handling = match self.add(tx.as_mut(), command).await {
            Ok(Handling::Duplicate) => return Ok(Handling::Duplicate),
            Ok(handling) => handling,
            Err(Refused::Store(error)) => return Err(error.into()),
            Err(Refused::Handler(error)) => {
                drop(tx);
                return match self.consumed_before(command).await? {
                    true => Ok(Handling::Duplicate),
                    false => Err(EngineError::Step(error)),
                };
            }
        };
        match tx.commit().await {
            Err(StoreError::ConsumedConcurrently { .. }) => Ok(Handling::Duplicate),
            other => other
                .map(|()| {
                    self.committed(began);
                    handling
                })
                .map_err(Into::into),
        }
    }

    /// Handles `commands` in one transaction, in order, through the
    /// handler's [`handle_batch`](CommandHandler::handle_batch) (in a span
    /// that follows from each command's). `None` when that did not commit
    /// (a handler or the store failed, or the commit met a command consumed
    /// before): nothing of it was written, and each command's own
    /// transaction tells how it fares.
    async fn together(&self, commands: &[(&Message, &tracing::Span)]) -> Option<Vec<Handling>> {
        let began = Instant::now();
        let mut tx = self.store.begin().await.ok()?;
        let mut handlings = vec![Handling::Duplicate; commands.len()];
        let mut fresh = Vec::with_capacity(commands.len());
        for (index, (command, _)) in commands.iter().enumerate() {
            if self.consume(tx.as_mut(), command).await.ok()? {
                fresh.push(index);
            }
        }
        let messages: Vec<&Message> = fresh.iter().map(|&index| commands[index].0).collect();
        if messages.is_empty() {
            // Only duplicates: nothing to handle, nothing to commit.
            return Some(handlings);
        }
        let span = tracing::info_span!("command_batch", participant = %self.name, commands = messages.len());
        for (_, command_span) in commands {
            span.follows_from(*command_span);
        }
        let replies = self
            .handler
            .handle_batch(tx.as_mut(), &messages)
            .instrument(span)
            .await
            .ok()?;
        if replies.len() != messages.len() {
            tracing::error!(
                commands = messages.len(),
                answers = replies.len(),
                "handle_batch answered a different number of commands; handling each alone"
            );
            return None;
        }
        for (index, answer) in fresh.into_iter().zip(replies) {
            handlings[index] = enqueue_replies(&self.name, tx.as_mut(), commands[index].0, answer)
                .await
                .ok()?;
        }
        tx.commit().await.ok()?;
        self.committed(began);
        Some(handlings)
    }

    /// Records a committed transaction that `began`: its handler's writes
    /// and the store's commit, the participant's share of a saga's latency.
    fn committed(&self, began: Instant) {
        metrics::histogram!(telemetry::PARTICIPANT_COMMIT_SECONDS, "participant" => self.name.clone())
            .record(began.elapsed().as_secs_f64());
    }

    /// Whether `command` was consumed by this participant already.
    async fn consumed_before(&self, command: &Message) -> Result<bool, EngineError> {
        let mut tx = self.store.begin().await?;
        Ok(!tx.consume(&self.name, &command.id).await?)
    }
}

/// Enqueues the replies participant `by`'s handler returned for `command`.
async fn enqueue_replies(
    by: &str,
    tx: &mut dyn Transaction,
    command: &Message,
    commands: Vec<Command>,
) -> Result<Handling, StoreError> {
    let replies = replies_to(by, command, commands);
    if !replies.is_empty() {
        tx.enqueue(None, &replies).await?;
    }
    Ok(Handling::Handled { replies: replies.len() })
}

/// The replies participant `by`'s handler returned, as messages answering `command`.
fn replies_to(by: &str, command: &Message, replies: Vec<Command>) -> Vec<Message> {
    replies
        .into_iter()
        .enumerate()
        .map(|(index, reply)| reply_to(command, reply, MessageId::derived_from(by, &command.id, index)))
        .collect()
}

fn reply_to(command: &Message, reply: Command, id: MessageId) -> Message {
    let mut message = Message::new(reply.kind, reply.destination, reply.payload).with_id(id);
    message.correlation_id = command.correlation_id.clone();
    message.with_header(IN_REPLY_TO, command.id.as_str())
}

#[async_trait]
impl crate::consumer::MessageHandler for Participant {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        Participant::handle(self, message).await.map(|_| ())
    }
}
