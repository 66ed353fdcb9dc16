//! Participants with batching: commands that arrive together share a
//! transaction, and every command fares as it would alone (handled once,
//! its replies sent once, its error reported to its own caller).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use saga_core::memory::{InMemoryStore, InMemoryTransaction};
use saga_core::{
    Command, CommandBatching, CommandHandler, EngineError, Handling, IN_REPLY_TO, Message, OutboxStore, Participant,
    SagaId, SagaInstance, SagaStore, StepError, StoreError, Transaction,
};

/// What a test command asks of the handler.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Order {
    id: String,
    /// Wait at the gate before handling (holds the transaction open).
    hold: bool,
    fail: bool,
    panic: bool,
}

fn order(id: &str) -> Order {
    Order {
        id: id.to_owned(),
        ..Order::default()
    }
}

fn command(order: &Order) -> Message {
    Message::json("Reserve", "stock", order).expect("encodable")
}

/// Replies `Reserved` and notes each order as committed when (and only
/// when) its transaction commits.
#[derive(Clone)]
struct Keeper {
    entered: Arc<Notify>,
    gate: Arc<Semaphore>,
    committed: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl CommandHandler for Keeper {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let order: Order = command.decode().map_err(|e| StepError::terminal(e.to_string()))?;
        if order.hold {
            self.entered.notify_one();
            self.gate
                .acquire()
                .await
                .map_err(|e| StepError::retryable(e.to_string()))?
                .forget();
        }
        if order.fail {
            return Err(StepError::terminal(format!("order {} refused", order.id)));
        }
        assert!(!order.panic, "order {} makes the handler panic", order.id);
        let committed = Arc::clone(&self.committed);
        let id = order.id.clone();
        tx.backend()
            .downcast_mut::<InMemoryTransaction>()
            .expect("the in-memory store's transaction")
            .on_commit(move || committed.lock().expect("not poisoned").push(id));
        Ok(vec![Command::json("Reserved", "replies", &order.id)?])
    }
}

/// The in-memory store, counting the transactions begun.
#[derive(Clone, Default)]
struct Begins {
    store: InMemoryStore,
    begun: Arc<AtomicUsize>,
}

#[async_trait]
impl SagaStore for Begins {
    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, StoreError> {
        self.store.load(id).await
    }

    async fn find_by_key(&self, definition: &str, key: &str) -> Result<Option<SagaId>, StoreError> {
        self.store.find_by_key(definition, key).await
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, StoreError> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.store.begin().await
    }
}

struct Fixture {
    store: Begins,
    keeper: Keeper,
    participant: Arc<Participant>,
}

fn fixture(batching: CommandBatching) -> Fixture {
    let store = Begins::default();
    let keeper = Keeper {
        entered: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
        committed: Arc::default(),
    };
    let participant =
        Arc::new(Participant::new("stock", Arc::new(store.clone()), keeper.clone()).with_batching(batching));
    Fixture {
        store,
        keeper,
        participant,
    }
}

impl Fixture {
    fn send(&self, message: &Message) -> JoinHandle<Result<Handling, EngineError>> {
        let (participant, message) = (Arc::clone(&self.participant), message.clone());
        tokio::spawn(async move { participant.handle(&message).await })
    }

    /// Starts a command that holds its transaction open until [`release`]d,
    /// and waits until its handler runs: what is sent next queues up.
    async fn hold(&self) -> JoinHandle<Result<Handling, EngineError>> {
        let held = self.send(&command(&Order {
            hold: true,
            ..order("held")
        }));
        tokio::time::timeout(Duration::from_secs(30), self.keeper.entered.notified())
            .await
            .expect("the held command's handler runs");
        held
    }

    /// Lets the held command go once the commands sent meanwhile have
    /// queued (on the test's single thread, each queues before it yields).
    async fn release(&self) {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        self.keeper.gate.add_permits(1);
    }

    /// Sends `count` orders that succeed (`o-0`, `o-1`, …) behind a held
    /// one; each is handled. Returns their commands.
    async fn handle_behind_a_held_one(&self, count: usize) -> Vec<Message> {
        let held = self.hold().await;
        let commands: Vec<Message> = (0..count).map(|n| command(&order(&format!("o-{n}")))).collect();
        let tasks: Vec<_> = commands.iter().map(|c| self.send(c)).collect();
        self.release().await;
        outcome(held).await.expect("held");
        for task in tasks {
            assert_eq!(outcome(task).await.expect("handled"), Handling::Handled { replies: 1 });
        }
        commands
    }

    fn begun(&self) -> usize {
        self.store.begun.load(Ordering::SeqCst)
    }

    fn committed(&self) -> Vec<String> {
        let mut committed = self.keeper.committed.lock().expect("not poisoned").clone();
        committed.sort();
        committed
    }

    /// The replies in the outbox, as the ids of the commands they answer.
    async fn answered(&self) -> Vec<String> {
        let claimed = self
            .store
            .store
            .claim(100, Duration::from_secs(1))
            .await
            .expect("claim");
        let mut answered: Vec<String> = claimed
            .iter()
            .map(|entry| entry.message.header(IN_REPLY_TO).expect("a reply").to_owned())
            .collect();
        answered.sort();
        answered
    }
}

/// The caller's outcome, within a bound: a stranded command fails the test.
async fn outcome(task: JoinHandle<Result<Handling, EngineError>>) -> Result<Handling, EngineError> {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("answered within 30 s")
        .expect("the caller's task does not panic")
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn commands_arriving_while_one_is_handled_share_the_next_transaction() {
    let fixture = fixture(CommandBatching::up_to(16));
    let held = fixture.hold().await;
    let commands: Vec<Message> = (0..10).map(|n| command(&order(&format!("o-{n}")))).collect();
    let tasks: Vec<_> = commands.iter().map(|c| fixture.send(c)).collect();
    fixture.release().await;

    assert_eq!(outcome(held).await.expect("held"), Handling::Handled { replies: 1 });
    for task in tasks {
        assert_eq!(outcome(task).await.expect("handled"), Handling::Handled { replies: 1 });
    }
    assert_eq!(
        fixture.begun(),
        2,
        "the held command's transaction, then one for the ten behind it"
    );
    let mut expected: Vec<String> = (0..10).map(|n| format!("o-{n}")).collect();
    expected.push("held".to_owned());
    assert_eq!(fixture.committed(), sorted(expected), "each order committed once");
    let answered = fixture.answered().await;
    assert_eq!(answered.len(), 11, "one reply per command");
    for command in &commands {
        assert!(
            answered.contains(&command.id.as_str().to_owned()),
            "no reply to {}",
            command.id
        );
    }

    // Delivered again, each is a duplicate, batched or not.
    let again: Vec<_> = commands.iter().map(|c| fixture.send(c)).collect();
    for task in again {
        assert_eq!(outcome(task).await.expect("again"), Handling::Duplicate);
    }
    assert!(fixture.answered().await.is_empty(), "no second replies");
}

#[tokio::test]
async fn batches_take_at_most_max_commands() {
    let fixture = fixture(CommandBatching::up_to(4));
    fixture.handle_behind_a_held_one(10).await;
    assert_eq!(
        fixture.begun(),
        1 + 3,
        "ten commands behind the held one in batches of 4, 4 and 2"
    );
    assert_eq!(fixture.committed().len(), 11);
}

#[tokio::test]
async fn a_failing_command_fails_alone_and_the_rest_of_its_batch_commits() {
    let fixture = fixture(CommandBatching::up_to(16));
    let held = fixture.hold().await;
    let orders: Vec<Order> = (0..5)
        .map(|n| Order {
            fail: n == 2,
            ..order(&format!("o-{n}"))
        })
        .collect();
    let commands: Vec<Message> = orders.iter().map(command).collect();
    let tasks: Vec<_> = commands.iter().map(|c| fixture.send(c)).collect();
    fixture.release().await;
    outcome(held).await.expect("held");

    for (n, task) in tasks.into_iter().enumerate() {
        match (n, outcome(task).await) {
            (2, Err(EngineError::Step(error))) => {
                assert!(!error.is_retryable(), "the handler's own error: {error}");
                assert!(error.to_string().contains("order o-2 refused"), "{error}");
            }
            (2, other) => panic!("the failing order's caller got {other:?}"),
            (_, handled) => assert_eq!(handled.expect("handled"), Handling::Handled { replies: 1 }),
        }
    }
    // The batch rolled back (its hooks never ran), then each ran alone.
    let expected = vec!["held", "o-0", "o-1", "o-3", "o-4"];
    assert_eq!(
        fixture.committed(),
        expected,
        "every other order committed exactly once"
    );
    let mut replied: Vec<String> = [0, 1, 3, 4]
        .iter()
        .map(|&n| commands[n].id.as_str().to_owned())
        .collect();
    let answered = fixture.answered().await;
    replied.retain(|id| answered.contains(id));
    assert_eq!(replied.len(), 4, "a reply for each order handled");
    assert_eq!(answered.len(), 5, "and the held one's; none for the refused order");

    // The refused order was not consumed: delivered again, it fails again.
    assert!(matches!(
        fixture.participant.handle(&commands[2]).await,
        Err(EngineError::Step(_))
    ));
}

#[tokio::test]
async fn a_command_delivered_twice_in_one_batch_is_handled_once() {
    let fixture = fixture(CommandBatching::up_to(16));
    let before = command(&order("before"));
    assert_eq!(
        fixture.participant.handle(&before).await.expect("handled"),
        Handling::Handled { replies: 1 }
    );
    let twice = command(&order("twice"));
    let held = fixture.hold().await;
    let tasks = [fixture.send(&twice), fixture.send(&twice), fixture.send(&before)];
    fixture.release().await;
    outcome(held).await.expect("held");

    let outcomes: Vec<Handling> = {
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(outcome(task).await.expect("no error"));
        }
        outcomes
    };
    assert_eq!(
        outcomes,
        [
            Handling::Handled { replies: 1 },
            Handling::Duplicate,
            Handling::Duplicate
        ]
    );
    assert_eq!(fixture.committed(), ["before", "held", "twice"]);
    assert_eq!(fixture.answered().await.len(), 3, "one reply per distinct command");
}

/// A keeper doing a batch's work in one call (as a handler saving round
/// trips would): it notes each batch's orders, and answers each command
/// with a reply naming its order. `miscount` answers one command too few.
#[derive(Clone)]
struct BatchKeeper {
    keeper: Keeper,
    batches: Arc<Mutex<Vec<Vec<String>>>>,
    miscount: bool,
}

#[async_trait]
impl CommandHandler for BatchKeeper {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        self.keeper.handle(tx, command).await
    }

    async fn handle_batch(
        &self,
        _tx: &mut dyn Transaction,
        commands: &[&Message],
    ) -> Result<Vec<Vec<Command>>, StepError> {
        let orders = commands
            .iter()
            .map(|c| c.decode::<Order>().map(|o| o.id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StepError::terminal(e.to_string()))?;
        self.batches.lock().expect("not poisoned").push(orders.clone());
        let answered = orders.len() - usize::from(self.miscount);
        orders[..answered]
            .iter()
            .map(|id| Ok(vec![Command::json("Reserved", "replies", &format!("{id} in a batch"))?]))
            .collect()
    }
}

fn batch_fixture(miscount: bool) -> (Fixture, Arc<Mutex<Vec<Vec<String>>>>) {
    let fixture = fixture(CommandBatching::up_to(16));
    let batches = Arc::default();
    let handler = BatchKeeper {
        keeper: fixture.keeper.clone(),
        batches: Arc::clone(&batches),
        miscount,
    };
    let participant =
        Participant::new("stock", Arc::new(fixture.store.clone()), handler).with_batching(CommandBatching::up_to(16));
    (
        Fixture {
            participant: Arc::new(participant),
            ..fixture
        },
        batches,
    )
}

#[tokio::test]
async fn a_handler_may_handle_a_whole_batch_in_one_call() {
    let (fixture, batches) = batch_fixture(false);
    let before = command(&order("before"));
    fixture.participant.handle(&before).await.expect("handled alone");
    let held = fixture.hold().await;
    let commands: Vec<Message> = (0..5).map(|n| command(&order(&format!("o-{n}")))).collect();
    let mut tasks: Vec<_> = commands.iter().map(|c| fixture.send(c)).collect();
    // Consumed before, and twice in the batch: neither reaches the handler.
    tasks.push(fixture.send(&before));
    tasks.push(fixture.send(&commands[1]));
    fixture.release().await;
    outcome(held).await.expect("held");
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(outcome(task).await.expect("no error"));
    }

    let handled = Handling::Handled { replies: 1 };
    assert_eq!(outcomes[..5], vec![handled; 5]);
    let batches = batches.lock().expect("not poisoned").clone();
    assert_eq!(
        batches,
        vec![vec!["o-0", "o-1", "o-2", "o-3", "o-4"]],
        "the batch's fresh commands, in order, in one call"
    );
    assert_eq!(outcomes[5..], [Handling::Duplicate, Handling::Duplicate]);
    assert_eq!(
        fixture.answered().await.len(),
        5 + 2,
        "one reply each, and the held one's and before's"
    );
    assert_eq!(
        fixture.committed(),
        ["before", "held"],
        "`handle` ran only for those two"
    );
}

#[tokio::test]
async fn each_reply_of_a_batch_call_answers_its_own_command() {
    let (fixture, batches) = batch_fixture(false);
    let commands = fixture.handle_behind_a_held_one(4).await;
    assert_eq!(batches.lock().expect("not poisoned").len(), 1, "one call for the four");

    let claimed = fixture
        .store
        .store
        .claim(100, Duration::from_secs(1))
        .await
        .expect("claim");
    let mut pairs: Vec<(String, String)> = claimed
        .iter()
        .map(|e| {
            let answer: String = e.message.decode().expect("a reply");
            (e.message.header(IN_REPLY_TO).expect("a reply").to_owned(), answer)
        })
        // The held order's reply came from `handle`.
        .filter(|(_, answer)| answer != "held")
        .collect();
    pairs.sort();
    let mut expected: Vec<(String, String)> = commands
        .iter()
        .enumerate()
        .map(|(n, c)| (c.id.as_str().to_owned(), format!("o-{n} in a batch")))
        .collect();
    expected.sort();
    assert_eq!(pairs, expected);
}

#[tokio::test]
async fn a_batch_call_answering_too_few_commands_hands_each_to_handle() {
    let (fixture, batches) = batch_fixture(true);
    fixture.handle_behind_a_held_one(3).await;
    assert_eq!(
        batches.lock().expect("not poisoned").len(),
        1,
        "the batch was tried once"
    );
    assert_eq!(
        fixture.committed(),
        ["held", "o-0", "o-1", "o-2"],
        "then each committed alone"
    );
    assert_eq!(fixture.answered().await.len(), 4);
}

#[tokio::test]
async fn a_panicking_handler_does_not_strand_the_commands_behind_it() {
    let fixture = fixture(CommandBatching::up_to(2));
    let held = fixture.hold().await;
    let panicking = command(&Order {
        panic: true,
        ..order("panics")
    });
    let beside = command(&order("beside"));
    let behind = [command(&order("behind-1")), command(&order("behind-2"))];
    let tasks = [
        fixture.send(&panicking),
        fixture.send(&beside),
        fixture.send(&behind[0]),
        fixture.send(&behind[1]),
    ];
    fixture.release().await;
    outcome(held).await.expect("held");

    let [panicked, beside_task, behind_1, behind_2] = tasks;
    // Its batch handles each command alone: the panic reaches its own
    // caller (as without batching), the command beside it is handled.
    let panic = tokio::time::timeout(Duration::from_secs(30), panicked)
        .await
        .expect("answered within 30 s");
    assert!(
        panic.is_err_and(|e| e.is_panic()),
        "the panicking command's caller panics"
    );
    assert_eq!(
        outcome(beside_task).await.expect("handled"),
        Handling::Handled { replies: 1 }
    );
    // The batch behind it gets a runner of its own.
    for task in [behind_1, behind_2] {
        assert_eq!(outcome(task).await.expect("handled"), Handling::Handled { replies: 1 });
    }
    // And the participant goes on.
    let after = command(&order("after"));
    assert_eq!(
        fixture.participant.handle(&after).await.expect("handled"),
        Handling::Handled { replies: 1 }
    );
    assert_eq!(fixture.committed(), ["after", "behind-1", "behind-2", "beside", "held"]);
}

/// Sends `first`, then `second` `after` later, and waits for both.
async fn two_apart(fixture: &Fixture, after: Duration) {
    let first = fixture.send(&command(&order("first")));
    tokio::time::sleep(after).await;
    let second = fixture.send(&command(&order("second")));
    assert_eq!(outcome(first).await.expect("first"), Handling::Handled { replies: 1 });
    assert_eq!(outcome(second).await.expect("second"), Handling::Handled { replies: 1 });
}

/// Sends `count` commands at one instant and waits for them: arrivals as
/// dense as they come.
async fn burst(fixture: &Fixture, count: usize) {
    let tasks: Vec<_> = (0..count)
        .map(|n| fixture.send(&command(&order(&format!("burst-{n}")))))
        .collect();
    for task in tasks {
        assert_eq!(outcome(task).await.expect("burst"), Handling::Handled { replies: 1 });
    }
}

#[tokio::test(start_paused = true)]
async fn while_commands_arrive_densely_a_lone_one_lingers_for_company() {
    // The test's runtime has one thread: every task records here.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let linger = Duration::from_millis(10);
    let fixture = fixture(CommandBatching::up_to(16).with_linger(linger));

    // The first command ever has no arrivals to judge by: it does not wait.
    let began = tokio::time::Instant::now();
    burst(&fixture, 1).await;
    assert_eq!(began.elapsed(), Duration::ZERO);
    burst(&fixture, 4).await;

    let (began, before) = (tokio::time::Instant::now(), fixture.begun());
    two_apart(&fixture, linger / 2).await;
    assert_eq!(fixture.begun() - before, 1, "the second joined the first's transaction");
    let waited = began.elapsed();
    assert!(
        waited >= linger / 2 && waited < linger,
        "the second's arrival ended the first's wait: {waited:?}"
    );

    // Nobody joins: the command commits alone once the linger is over.
    let (began, before) = (tokio::time::Instant::now(), fixture.begun());
    burst(&fixture, 1).await;
    assert_eq!(fixture.begun() - before, 1);
    assert!(began.elapsed() >= linger, "it waited for company first");
    assert_eq!(fixture.committed().len(), 1 + 4 + 2 + 1, "each committed once");

    let mut lingers = (0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() != "saga_participant_lingers_total" {
            continue;
        }
        let DebugValue::Counter(count) = value else {
            panic!("a counter: {value:?}");
        };
        match key.labels().find(|l| l.key() == "joined").map(|l| l.value()) {
            Some("true") => lingers.0 += count,
            Some("false") => lingers.1 += count,
            other => panic!("joined is true or false, not {other:?}"),
        }
    }
    assert_eq!(lingers, (1, 1), "lingers joined and not joined");
}

#[tokio::test(start_paused = true)]
async fn without_a_linger_a_lone_command_does_not_wait() {
    let fixture = fixture(CommandBatching::up_to(16));
    burst(&fixture, 4).await;
    let (began, before) = (tokio::time::Instant::now(), fixture.begun());
    two_apart(&fixture, Duration::from_millis(5)).await;
    assert_eq!(
        fixture.begun() - before,
        2,
        "the first had committed when the second came"
    );
    assert_eq!(began.elapsed(), Duration::from_millis(5), "only the test's own wait");
}

#[tokio::test]
async fn without_batching_each_command_has_its_own_transaction() {
    let fixture = fixture(CommandBatching::default());
    fixture.handle_behind_a_held_one(3).await;
    assert_eq!(fixture.begun(), 4);
}

/// How each delivery of a command ended, per command: what any order of
/// handling them one by one gives.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fates {
    handled: usize,
    duplicates: usize,
    failed: usize,
}

/// Delivers `deliveries` (indices into `orders`) behind a held command,
/// after handling `before` alone; the fates per order, the orders committed
/// and the commands answered.
async fn deliver(
    batching: CommandBatching,
    orders: &[Order],
    before: &[usize],
    deliveries: &[usize],
) -> (Vec<Fates>, Vec<String>, usize) {
    let fixture = fixture(batching);
    let commands: Vec<Message> = orders.iter().map(command).collect();
    let mut fates: Vec<Fates> = orders.iter().map(|_| Fates::default()).collect();
    let mut note = |index: usize, outcome: Result<Handling, EngineError>| match outcome {
        Ok(Handling::Handled { replies: 1 }) => fates[index].handled += 1,
        Ok(Handling::Duplicate) => fates[index].duplicates += 1,
        Err(EngineError::Step(_)) => fates[index].failed += 1,
        other => panic!("order {index}: unexpected {other:?}"),
    };
    for &index in before {
        note(index, fixture.participant.handle(&commands[index]).await);
    }
    let held = fixture.hold().await;
    let tasks: Vec<_> = deliveries
        .iter()
        .map(|&index| (index, fixture.send(&commands[index])))
        .collect();
    fixture.release().await;
    outcome(held).await.expect("held");
    for (index, task) in tasks {
        note(index, outcome(task).await);
    }
    let answered = fixture.answered().await.len();
    let committed = fixture.committed().into_iter().filter(|id| id != "held").collect();
    (fates, committed, answered - 1)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 128,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/participant.txt",
        ))),
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever the batch size, duplicates and failures, every command
    /// fares as it does with each delivery handled alone: handled once if
    /// its handler succeeds (every other delivery a duplicate), failed on
    /// every delivery if it does not, one reply and one commit per command
    /// handled.
    #[test]
    fn batched_commands_fare_as_they_would_alone(
        failing in proptest::collection::vec(proptest::bool::weighted(0.2), 1..12),
        before in proptest::collection::vec(0usize..12, 0..4),
        deliveries in proptest::collection::vec(0usize..12, 1..40),
        max_commands in 1usize..10,
    ) {
        let orders: Vec<Order> = failing
            .iter()
            .enumerate()
            .map(|(n, &fail)| Order { fail, ..order(&format!("o-{n:02}")) })
            .collect();
        let clamp = |indices: Vec<usize>| indices.into_iter().map(|i| i % orders.len()).collect::<Vec<_>>();
        let (before, deliveries) = (clamp(before), clamp(deliveries));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let batched = runtime.block_on(deliver(CommandBatching::up_to(max_commands), &orders, &before, &deliveries));
        let alone = runtime.block_on(deliver(CommandBatching::default(), &orders, &before, &deliveries));

        let mut expected = Vec::new();
        for (index, order) in orders.iter().enumerate() {
            let delivered = before.iter().chain(&deliveries).filter(|&&i| i == index).count();
            expected.push(match (order.fail, delivered) {
                (_, 0) => Fates::default(),
                (true, n) => Fates { failed: n, ..Fates::default() },
                (false, n) => Fates { handled: 1, duplicates: n - 1, failed: 0 },
            });
        }
        let handled: Vec<String> = orders
            .iter()
            .zip(&expected)
            .filter(|(_, fate)| fate.handled == 1)
            .map(|(order, _)| order.id.clone())
            .collect();
        proptest::prop_assert_eq!(&batched.0, &expected);
        proptest::prop_assert_eq!(&alone.0, &expected);
        proptest::prop_assert_eq!(&batched.1, &handled, "each handled order committed once");
        proptest::prop_assert_eq!(batched.2, handled.len(), "one reply per handled order");
        proptest::prop_assert_eq!(alone, batched);
    }
}
