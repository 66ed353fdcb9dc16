//! Group commit for participants: commands that arrive while earlier ones
//! are being handled share the next transaction.
//!
//! A participant's command costs its store a transaction whose fixed part
//! (beginning it, the inbox and outbox rows, the commit and its flush)
//! outweighs what most handlers do. So while a transaction is under way,
//! commands that arrive wait in a queue, and the next transaction takes all
//! of them (up to [`CommandBatching::max_commands`]): their handlers run one
//! after another on it, and each caller returns once it has committed.
//!
//! Anything that stops the shared transaction from committing (a handler's
//! error or panic, a store failure, a command consumed before) rolls all of it back,
//! and each of its callers then handles its command alone, which reports
//! exactly what it would have reported without batching. Callers do so at
//! once, without holding up the next shared transaction.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::Instrument;

use super::{Core, Handling};
use crate::error::EngineError;
use crate::linger::{Arrivals, Linger};
use crate::message::Message;
use crate::telemetry;

/// How a [`Participant`](super::Participant) lets commands share a
/// transaction.
///
/// Handlers of one batch run one after another in the same transaction, so
/// each sees what the ones before it wrote, and any locks they take are held
/// until the batch commits. Handlers that lock rows should therefore expect
/// to wait on other batches (`in_flight` above 1, or several replicas) and
/// treat a deadlock as retryable: the batch then runs its commands alone.
/// As with a redelivery, a handler may run more than once for one command:
/// what it wrote through the transaction rolls back in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandBatching {
    /// Commands one transaction takes at most; 1 handles each alone.
    pub max_commands: usize,
    /// Shared transactions under way at once (at least 1).
    pub in_flight: usize,
    /// How long a transaction that would carry a single command waits for
    /// another to join it (it goes as soon as one has), while commands have
    /// lately been arriving on average no further apart than this, or than
    /// a transaction takes (see [`Linger`]). `ZERO` (the default) never waits. About a
    /// millisecond saves transactions, and CPU, near a deployment's limit,
    /// where commands arrive densely but often find no transaction under
    /// way to queue behind.
    pub linger: Duration,
}

impl CommandBatching {
    /// Batches of up to `max_commands`, one transaction at a time: batches
    /// then never wait on each other's locks.
    pub fn up_to(max_commands: usize) -> Self {
        Self {
            max_commands,
            in_flight: 1,
            linger: Duration::ZERO,
        }
    }

    /// The same, with a transaction that would carry one command waiting
    /// `linger` for others (see [`linger`](Self::linger)).
    pub fn with_linger(self, linger: Duration) -> Self {
        Self { linger, ..self }
    }
}

impl Default for CommandBatching {
    /// Each command alone.
    fn default() -> Self {
        Self::up_to(1)
    }
}

/// Commands waiting for a transaction.
pub(super) struct Batches {
    config: CommandBatching,
    queue: Mutex<Queue>,
    /// Ends a lingering runner's wait when a command arrives.
    arrivals: Arrivals,
}

struct Queue {
    waiting: VecDeque<Waiting>,
    /// Tasks running transactions; at most `in_flight`.
    runners: usize,
    linger: Linger,
}

/// A command waiting, with the span it arrived in and where its answer goes.
struct Waiting {
    command: Message,
    span: tracing::Span,
    reply: oneshot::Sender<Answer>,
}

enum Answer {
    Done(Result<Handling, EngineError>),
    /// The shared transaction did not commit: the caller handles it alone.
    Alone,
}

impl Batches {
    pub(super) fn new(config: CommandBatching) -> Self {
        Self {
            config,
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                runners: 0,
                linger: Linger::new(config.linger),
            }),
            arrivals: Arrivals::default(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Plain data behind the lock: a panic elsewhere leaves it usable.
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Handles `command` in the next transaction with room.
pub(super) async fn handle(
    core: &Arc<Core>,
    batches: &Arc<Batches>,
    command: &Message,
) -> Result<Handling, EngineError> {
    let (reply, answer) = oneshot::channel();
    let start_runner = {
        let mut queue = batches.queue();
        queue.linger.arrived(tokio::time::Instant::now());
        queue.waiting.push_back(Waiting {
            command: command.clone(),
            span: tracing::Span::current(),
            reply,
        });
        let start = queue.runners < batches.config.in_flight.max(1);
        if start {
            queue.runners += 1;
        }
        start
    };
    batches.arrivals.arrived();
    if start_runner {
        // A task of its own: a caller that stops waiting does not strand
        // the others whose commands its transaction carries.
        tokio::spawn(run(Arc::clone(core), Arc::clone(batches)));
    }
    match answer.await {
        Ok(Answer::Done(result)) => result,
        // The shared transaction failed, or its task ended without an
        // answer (a handler panicked): it did not commit, so the command is
        // handled alone, and a panicking handler panics in its own caller.
        Ok(Answer::Alone) | Err(_) => {
            metrics::counter!(telemetry::PARTICIPANT_RETRIED_ALONE_TOTAL).increment(1);
            core.alone(command).await
        }
    }
}

/// Runs transactions while commands wait.
async fn run(core: Arc<Core>, batches: Arc<Batches>) {
    // Held to the end: it counts the runner out, however the runner ends.
    let mut place = Place {
        core,
        batches,
        held: true,
    };
    let most = place.batches.config.max_commands.max(1);
    loop {
        let (mut batch, linger): (Vec<Waiting>, _) = {
            let mut queue = place.batches.queue();
            if queue.waiting.is_empty() {
                // Under the lock a caller checks `runners` with.
                queue.runners -= 1;
                place.held = false;
                return;
            }
            let take = queue.waiting.len().min(most);
            (queue.waiting.drain(..take).collect(), queue.linger.wait(take, most))
        };
        if !linger.is_zero() {
            // The runner keeps its place meanwhile, so what arrives queues
            // for this transaction.
            let batches = &place.batches;
            batches
                .arrivals
                .wait_for_company(linger, || !batches.queue().waiting.is_empty())
                .await;
            let mut queue = batches.queue();
            let take = queue.waiting.len().min(most - 1);
            batch.extend(queue.waiting.drain(..take));
            let joined = if batch.len() > 1 { "true" } else { "false" };
            metrics::counter!(telemetry::PARTICIPANT_LINGERS_TOTAL, "joined" => joined).increment(1);
        }
        if let [only] = batch.as_slice() {
            let began = tokio::time::Instant::now();
            let result = place.core.alone(&only.command).instrument(only.span.clone()).await;
            place.batches.queue().linger.ran(began.elapsed());
            if let Some(only) = batch.into_iter().next() {
                let _ = only.reply.send(Answer::Done(result));
            }
            continue;
        }
        let commands: Vec<(&Message, &tracing::Span)> = batch.iter().map(|w| (&w.command, &w.span)).collect();
        let began = tokio::time::Instant::now();
        let handled = place.core.together(&commands).await;
        place.batches.queue().linger.ran(began.elapsed());
        drop(commands);
        match handled {
            Some(handlings) => {
                metrics::histogram!(telemetry::PARTICIPANT_BATCH_SIZE).record(handlings.len() as f64);
                for (waiting, handling) in batch.into_iter().zip(handlings) {
                    let _ = waiting.reply.send(Answer::Done(Ok(handling)));
                }
            }
            None => {
                for waiting in batch {
                    let _ = waiting.reply.send(Answer::Alone);
                }
            }
        }
    }
}

/// A runner's place among the `in_flight`. A handler that panics ends its
/// runner (the callers of that batch then handle their commands alone); the
/// place passes to a new runner for the commands still waiting, which would
/// otherwise wait for the next command to arrive.
struct Place {
    core: Arc<Core>,
    batches: Arc<Batches>,
    held: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let pass_on = {
            let mut queue = self.batches.queue();
            let pass_on = std::thread::panicking() && !queue.waiting.is_empty() && runtime.is_ok();
            if !pass_on {
                queue.runners -= 1;
            }
            pass_on
        };
        if let (true, Ok(runtime)) = (pass_on, runtime) {
            runtime.spawn(run(Arc::clone(&self.core), Arc::clone(&self.batches)));
        }
    }
}
