//! The engine, relay and participants running on PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::TestDb;
use saga_core::memory::InMemoryTransport;
use saga_core::{
    CancellationToken, Command, CommandHandler, EffectHandler, Engine, EngineError, Handled, Handling, Message,
    Participant, Relay, RelayConfig, ReplyOutcome, SagaDefinition, SagaInstance, SagaStatus, SagaStore, Step,
    StepError, Store, Transaction,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Tally {
    count: u32,
}

/// A saga whose only step keeps accepting `Tick` replies, each counting one.
fn tally_definition() -> SagaDefinition<Tally> {
    SagaDefinition::builder("tally")
        .step(
            Step::remote("collect", |_: &Tally| {
                Command::json("Collect", "collector", &()).map_err(StepError::from)
            })
            .on_reply("Tick", |t: &mut Tally, _: serde_json::Value| {
                t.count += 1;
                ReplyOutcome::Pending
            }),
        )
        .build()
        .expect("valid definition")
}

/// Handles `message`, retrying what is retryable, within a bound.
async fn handle(engine: &Engine, message: &Message) -> Handled {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match engine.handle(message).await {
            Ok(handled) => return handled,
            Err(e) if e.is_retryable() && Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("handling {} failed: {e}", message.id),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replies_from_two_replicas_each_apply_exactly_once() {
    const REPLIES: usize = 60;
    const TASKS: usize = 8;
    let db = TestDb::new().await;
    let replica_a: Arc<dyn Store> = Arc::new(db.store(6).await);
    let replica_b: Arc<dyn Store> = Arc::new(db.store(6).await);
    let engine_a = Engine::builder(Arc::clone(&replica_a))
        .register(tally_definition())
        .build()
        .expect("engine");
    let engine_b = Engine::builder(Arc::clone(&replica_b))
        .register(tally_definition())
        .build()
        .expect("engine");
    let saga = engine_a.start("tally", Tally::default()).await.expect("start");

    // Every reply is delivered twice, to different replicas.
    let ticks: Vec<Message> = (0..REPLIES)
        .map(|i| {
            Message::json("Tick", "engine", &i)
                .expect("json")
                .with_correlation_id(saga.to_string())
        })
        .collect();
    let mut deliveries: Vec<(usize, Message)> = Vec::new();
    for (i, tick) in ticks.iter().enumerate() {
        deliveries.push((i, tick.clone()));
        deliveries.push((i + 1, tick.clone()));
    }
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let mine: Vec<(usize, Message)> = deliveries.iter().skip(task).step_by(TASKS).cloned().collect();
        let (a, b) = (engine_a.clone(), engine_b.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for (n, message) in mine {
                let engine = if n % 2 == 0 { &a } else { &b };
                outcomes.push(handle(engine, &message).await);
            }
            outcomes
        }));
    }
    let mut applied = 0;
    let mut duplicates = 0;
    for task in tasks {
        for outcome in tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("bounded")
            .expect("task")
        {
            match outcome {
                Handled::Applied { .. } => applied += 1,
                Handled::Duplicate => duplicates += 1,
                Handled::Ignored(reason) => panic!("a tick was ignored: {reason}"),
            }
        }
    }
    assert_eq!(applied, REPLIES, "each distinct reply causes exactly one transition");
    assert_eq!(duplicates, REPLIES, "each second delivery is a duplicate");
    let instance = replica_b.load(saga).await.expect("load").expect("instance");
    let tally: Tally = serde_json::from_str(&instance.data).expect("data");
    assert_eq!(tally.count as usize, REPLIES, "no lost update");
    assert_eq!(instance.revision as usize, REPLIES + 1);
    assert_eq!(replica_a.history(saga).await.expect("history").len(), REPLIES + 1);
}

// ---- end to end: an order saga writing the application's own tables ----

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    id: Uuid,
    items: Vec<String>,
}

/// What the order saga does to the `orders` and `order_items` tables.
#[derive(Debug)]
enum OrderEffect {
    Create,
    Confirm,
}

struct OrderTables {
    fail: bool,
}

#[async_trait]
impl EffectHandler<OrderEffect> for OrderTables {
    async fn apply(
        &self,
        tx: &mut dyn Transaction,
        saga: &SagaInstance,
        effects: Vec<OrderEffect>,
    ) -> Result<(), StepError> {
        let order: Order = serde_json::from_str(&saga.data).map_err(StepError::from)?;
        let conn = saga_postgres::connection(tx)
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        for effect in effects {
            match effect {
                OrderEffect::Create => {
                    sqlx::query("INSERT INTO orders (id, status) VALUES ($1, 'pending')")
                        .bind(order.id)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| StepError::retryable(e.to_string()))?;
                    sqlx::query("INSERT INTO order_items (order_id, sku) SELECT $1, unnest($2::text[])")
                        .bind(order.id)
                        .bind(&order.items)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| StepError::retryable(e.to_string()))?;
                }
                OrderEffect::Confirm => {
                    sqlx::query("UPDATE orders SET status = 'confirmed' WHERE id = $1")
                        .bind(order.id)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| StepError::retryable(e.to_string()))?;
                }
            }
        }
        if self.fail {
            return Err(StepError::retryable("the application refused"));
        }
        Ok(())
    }
}

fn order_definition() -> SagaDefinition<Order, OrderEffect> {
    SagaDefinition::builder("order")
        .step(Step::local("create", |_: &mut Order, ctx| {
            ctx.effect(OrderEffect::Create);
            Ok(())
        }))
        .step(
            Step::remote("reserve", |o: &Order| {
                Command::json("Reserve", "inventory", &o.items).map_err(StepError::from)
            })
            .on_reply("Reserved", |_: &mut Order, ok: bool| {
                if ok {
                    ReplyOutcome::Success
                } else {
                    ReplyOutcome::Failure("out of stock".into())
                }
            }),
        )
        .step(Step::local("confirm", |_: &mut Order, ctx| {
            ctx.effect(OrderEffect::Confirm);
            Ok(())
        }))
        .build()
        .expect("valid definition")
}

/// The inventory participant: records reservations in its own table.
struct Inventory;

#[async_trait]
impl CommandHandler for Inventory {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let items: Vec<String> = command.decode().map_err(StepError::from)?;
        let conn = saga_postgres::connection(tx)
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        sqlx::query("INSERT INTO reservations (command_id, skus) VALUES ($1, $2)")
            .bind(command.id.as_str())
            .bind(&items)
            .execute(&mut *conn)
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        Ok(vec![
            Command::json("Reserved", "replies", &true).map_err(StepError::from)?,
        ])
    }
}

async fn create_application_tables(pool: &sqlx::PgPool) {
    for sql in [
        "CREATE TABLE orders (id uuid PRIMARY KEY, status text NOT NULL)",
        "CREATE TABLE order_items (order_id uuid NOT NULL REFERENCES orders (id), sku text NOT NULL)",
        "CREATE TABLE reservations (command_id text PRIMARY KEY, skus text[] NOT NULL)",
    ] {
        sqlx::query(sql).execute(pool).await.expect("application table");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_saga_runs_to_completion_writing_application_tables() {
    let db = TestDb::new().await;
    let store = db.store(8).await;
    let pool = store.pool().clone();
    create_application_tables(&pool).await;
    let store: Arc<dyn Store> = Arc::new(store);
    let engine = Engine::builder(Arc::clone(&store))
        .register_with_effects(order_definition(), OrderTables { fail: false })
        .build()
        .expect("engine");
    let inventory = Participant::new("inventory", Arc::clone(&store) as Arc<dyn SagaStore>, Inventory);
    let transport = InMemoryTransport::new();
    transport.bind("inventory", "inventory").bind("replies", "replies");
    let shutdown = CancellationToken::new();
    let relay = Relay::new(
        Arc::clone(&store) as Arc<dyn saga_core::OutboxStore>,
        Arc::new(transport.clone()),
        RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    );
    let relaying = tokio::spawn(relay.run(shutdown.clone()));

    let order = Order {
        id: Uuid::now_v7(),
        items: vec!["apple".into(), "pear".into()],
    };
    let saga = engine.start("order", order.clone()).await.expect("start");
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order.id)
        .fetch_one(&pool)
        .await
        .expect("the order row is written with the saga's first transition");
    assert_eq!(status, "pending");

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut finished = None;
    while Instant::now() < deadline {
        for command in transport.take("inventory") {
            inventory.handle(&command).await.expect("inventory handles the command");
        }
        for reply in transport.take("replies") {
            engine.handle(&reply).await.expect("the engine handles the reply");
        }
        let instance = store.load(saga).await.expect("load").expect("instance");
        if instance.status.is_terminal() {
            finished = Some(instance);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let _ = relaying.await;
    let instance = finished.expect("the saga finishes within the time limit");
    assert_eq!(instance.status, SagaStatus::Completed);
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(order.id)
        .fetch_one(&pool)
        .await
        .expect("order");
    assert_eq!(status, "confirmed");
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM order_items WHERE order_id = $1")
        .bind(order.id)
        .fetch_one(&pool)
        .await
        .expect("items");
    assert_eq!(items, 2);
    let reserved: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(reserved, 1, "the participant wrote its table once");
    assert_eq!(
        store.history(saga).await.expect("history").len(),
        2,
        "start, then the reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_effect_rolls_the_whole_transition_back() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let pool = store.pool().clone();
    create_application_tables(&pool).await;
    let engine = Engine::builder(Arc::new(store))
        .register_with_effects(order_definition(), OrderTables { fail: true })
        .build()
        .expect("engine");
    let order = Order {
        id: Uuid::now_v7(),
        items: vec!["fig".into()],
    };
    let result = engine.start("order", order).await;
    assert!(
        matches!(&result, Err(e @ EngineError::Effects(_)) if e.is_retryable()),
        "{result:?}"
    );
    for table in [
        "SELECT count(*) FROM orders",
        "SELECT count(*) FROM order_items",
        "SELECT count(*) FROM saga_instances",
        "SELECT count(*) FROM saga_history",
        "SELECT count(*) FROM saga_outbox",
    ] {
        let n: i64 = sqlx::query_scalar(table).fetch_one(&pool).await.expect("count");
        assert_eq!(n, 0, "`{table}` must find nothing after the rollback");
    }
}

/// A participant whose table write succeeds only once per command.
struct AppendOnlyInventory;

#[async_trait]
impl CommandHandler for AppendOnlyInventory {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let conn = saga_postgres::connection(tx)
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        // A redelivered command meets its own reservation: a terminal error
        // that must not reach the caller, since the command was handled.
        sqlx::query("INSERT INTO reservations (command_id, skus) VALUES ($1, '{}')")
            .bind(command.id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(|e| StepError::terminal(e.to_string()))?;
        Ok(vec![
            Command::json("Reserved", "replies", &true).map_err(StepError::from)?,
        ])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_finds_a_redelivered_command_a_duplicate_at_commit_or_after_its_handler_failed() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let pool = store.pool().clone();
    create_application_tables(&pool).await;
    let store: Arc<dyn SagaStore> = Arc::new(store);
    let command = Message::json("Reserve", "inventory", &vec!["apple".to_owned()]).expect("encodable");

    // The plain handler writes again on redelivery; the commit finds the duplicate.
    let inventory = Participant::new("inventory", Arc::clone(&store), Inventory);
    let handled = inventory.handle(&command).await.expect("first delivery");
    assert_eq!(handled, Handling::Handled { replies: 1 });
    let other = Message::json("Reserve", "inventory", &vec!["pear".to_owned()]).expect("encodable");
    sqlx::query("DELETE FROM reservations")
        .execute(&pool)
        .await
        .expect("clear");
    let again = inventory.handle(&command).await.expect("redelivery");
    assert_eq!(again, Handling::Duplicate, "the commit meets the inbox record");
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(reservations, 0, "the duplicate's write rolled back");

    // A handler that fails on redelivery: still a duplicate, not an error.
    let strict = Participant::new("strict", Arc::clone(&store), AppendOnlyInventory);
    assert_eq!(
        strict.handle(&other).await.expect("first delivery"),
        Handling::Handled { replies: 1 }
    );
    assert_eq!(strict.handle(&other).await.expect("redelivery"), Handling::Duplicate);
    // A command it never handled, failing: the error is reported.
    let fresh = Message::json("Reserve", "inventory", &vec!["fig".to_owned()]).expect("encodable");
    sqlx::query("INSERT INTO reservations (command_id, skus) VALUES ($1, '{}')")
        .bind(fresh.id.as_str())
        .execute(&pool)
        .await
        .expect("a reservation in the way");
    assert!(
        matches!(strict.handle(&fresh).await, Err(EngineError::Step(_))),
        "a failing command not consumed before is an error"
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_outbox")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(outbox, 2, "one reply per command handled");
}

/// Records each command with the id of the transaction that handled it;
/// a command named `hold` first waits at the gate.
struct Recording {
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl CommandHandler for Recording {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        let name: String = command.decode().map_err(StepError::from)?;
        if name == "hold" {
            self.entered.notify_one();
            self.gate
                .acquire()
                .await
                .map_err(|e| StepError::retryable(e.to_string()))?
                .forget();
        }
        let conn = saga_postgres::connection(tx)
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        // A row in the way aborts the whole PostgreSQL transaction.
        sqlx::query("INSERT INTO handled (command_id, txid) VALUES ($1, txid_current())")
            .bind(command.id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(|e| StepError::terminal(e.to_string()))?;
        Ok(vec![
            Command::json("Reserved", "replies", &name).map_err(StepError::from)?,
        ])
    }
}

#[tokio::test]
async fn a_batched_participant_shares_transactions_and_each_command_fares_as_alone() {
    let db = TestDb::new().await;
    let store = db.store(4).await;
    let pool = store.pool().clone();
    sqlx::query("CREATE TABLE handled (command_id text PRIMARY KEY, txid bigint NOT NULL)")
        .execute(&pool)
        .await
        .expect("application table");
    let recording = Recording {
        entered: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let (entered, gate) = (Arc::clone(&recording.entered), Arc::clone(&recording.gate));
    let participant = Arc::new(
        Participant::new("inventory", Arc::new(store) as Arc<dyn SagaStore>, recording)
            .with_batching(saga_core::CommandBatching::up_to(16)),
    );
    let send = |message: &Message| {
        let (participant, message) = (Arc::clone(&participant), message.clone());
        tokio::spawn(async move { participant.handle(&message).await })
    };
    // Sends `commands` while a held command occupies the transaction, so
    // they queue (this test's runtime has one thread: each queues before
    // it yields), then lets it go; the outcomes in order.
    let behind_a_held_command = |commands: Vec<Message>| {
        // Bounded: a command left waiting fails the test instead of hanging it.
        let hold = Message::json("Reserve", "inventory", "hold").expect("encodable");
        let held = send(&hold);
        let (entered, gate, send) = (Arc::clone(&entered), Arc::clone(&gate), &send);
        let outcomes = async move {
            // The held command runs alone; what is sent now waits behind it.
            entered.notified().await;
            let tasks: Vec<_> = commands.iter().map(send).collect();
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            gate.add_permits(1);
            held.await.expect("no panic").expect("the held command is handled");
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.expect("no panic"));
            }
            outcomes
        };
        async move {
            tokio::time::timeout(Duration::from_secs(60), outcomes)
                .await
                .expect("every command answered within 60 s")
        }
    };
    let commands = |prefix: &str| -> Vec<Message> {
        (0..10)
            .map(|n| Message::json("Reserve", "inventory", &format!("{prefix}-{n}")).expect("encodable"))
            .collect()
    };
    let transactions = |ids: Vec<String>| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT txid) FROM handled WHERE command_id = ANY($1)")
                .bind(ids)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    let ids = |messages: &[Message]| messages.iter().map(|m| m.id.as_str().to_owned()).collect::<Vec<_>>();

    // Ten commands behind a held one: one transaction for the ten.
    let first = commands("first");
    let outcomes = behind_a_held_command(first.clone()).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(Handling::Handled { replies: 1 }))),
        "{outcomes:?}"
    );
    assert_eq!(transactions(ids(&first)).await, 1, "the ten shared one transaction");

    // A statement failing in the fourth aborts the shared transaction:
    // that command fails on its own, the other nine commit alone.
    let second = commands("second");
    sqlx::query("INSERT INTO handled (command_id, txid) VALUES ($1, 0)")
        .bind(second[3].id.as_str())
        .execute(&pool)
        .await
        .expect("a row in the way");
    let outcomes = behind_a_held_command(second.clone()).await;
    for (n, outcome) in outcomes.iter().enumerate() {
        match n {
            3 => assert!(matches!(outcome, Err(EngineError::Step(_))), "{outcome:?}"),
            _ => assert!(
                matches!(outcome, Ok(Handling::Handled { replies: 1 })),
                "{n}: {outcome:?}"
            ),
        }
    }
    assert_eq!(
        transactions(ids(&second)).await,
        10,
        "nine alone, and the row in the way"
    );

    // A command handled before, delivered again in a batch: the shared
    // commit meets its inbox row; it is a duplicate, the others commit.
    let mut third = commands("third");
    third[5] = first[5].clone();
    let outcomes = behind_a_held_command(third.clone()).await;
    for (n, outcome) in outcomes.iter().enumerate() {
        match n {
            5 => assert!(matches!(outcome, Ok(Handling::Duplicate)), "{outcome:?}"),
            _ => assert!(
                matches!(outcome, Ok(Handling::Handled { replies: 1 })),
                "{n}: {outcome:?}"
            ),
        }
    }

    // Every command handled has its inbox row and one reply; none twice.
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_inbox WHERE consumer = 'inventory'")
        .fetch_one(&pool)
        .await
        .expect("count");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_outbox")
        .fetch_one(&pool)
        .await
        .expect("count");
    let handled = 3 + 10 + 9 + 9;
    assert_eq!(
        (inbox, outbox),
        (handled, handled),
        "three held commands, 10, 9 and 9 behind them"
    );
}
