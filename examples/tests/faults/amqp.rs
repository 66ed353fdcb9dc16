//! The test's own side of RabbitMQ, in a scenario's virtual host: probe
//! queues bound to the order service's event exchanges (drained at the end,
//! so every copy ever published is counted), replies published as the
//! platform's product service would, raw messages with any body and
//! properties, the dead-letter queue, and a scriptable stock participant.

use std::sync::Arc;
use std::time::Duration;

use order_service::wire::{OrderCreated, StockUpdateResult, WireNames};
use saga_amqp::lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use saga_amqp::lapin::types::ShortString;
use saga_amqp::lapin::{BasicProperties, Channel, Connection};
use saga_amqp::{AmqpConfig, AmqpTransport, ExchangeKind, Topology};
use saga_core::{CancellationToken, Message, MessageId, Publisher, Settlement, Subscriber};
use saga_examples::inventory::InventoryNames;
use tokio::task::JoinHandle;

use crate::backends::START_BACKENDS;

/// The probe queue bound to `order_confirmed_exchange`.
pub const CONFIRMED_PROBE: &str = "faults_probe_order_confirmed";
/// The probe queue bound to `order_cancelled_exchange`.
pub const CANCELLED_PROBE: &str = "faults_probe_order_cancelled";
/// The queue the test participant consumes `OrderCreated` from.
const PARTICIPANT_QUEUE: &str = "faults_test_stock";

/// The platform's names (the binaries run with their defaults).
pub fn names() -> WireNames {
    WireNames::default()
}

/// One message taken from a queue.
#[derive(Clone, Debug)]
pub struct Taken {
    /// Its AMQP `message_id` (empty if it had none).
    pub message_id: String,
    /// Its body.
    pub body: Vec<u8>,
}

impl Taken {
    /// The `order_id` of a JSON body, if it has one.
    pub fn order_id(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body.get("order_id")?.as_str().map(str::to_owned)
    }
}

/// A plain connection to the scenario's virtual host.
async fn connect(url: &str) -> Connection {
    Connection::connect(url, Default::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {url} ({e}); {START_BACKENDS}"))
}

/// Declares the event exchanges (as the order service does: fanout,
/// durable) and the probe queues bound to them, before any order is placed;
/// and the product service's queue on the orders exchange, as the platform
/// always has it, whether or not a participant consumes it (`OrderCreated`
/// is published mandatory: without a bound queue it is retried, and the
/// saga's later messages wait behind it).
pub async fn declare_probes(url: &str) {
    let names = names();
    let product_service = InventoryNames::default().orders_queue;
    let topology = Topology::new()
        .exchange(&names.orders_exchange, ExchangeKind::Fanout)
        .exchange(&names.order_confirmed_exchange, ExchangeKind::Fanout)
        .exchange(&names.order_cancelled_exchange, ExchangeKind::Fanout)
        .queue(&product_service)
        .queue(CONFIRMED_PROBE)
        .queue(CANCELLED_PROBE)
        .bind(&names.orders_exchange, &product_service, "")
        .bind(&names.order_confirmed_exchange, CONFIRMED_PROBE, "")
        .bind(&names.order_cancelled_exchange, CANCELLED_PROBE, "");
    let transport = AmqpTransport::connect(AmqpConfig::new(url, topology))
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {url} ({e}); {START_BACKENDS}"));
    transport.close().await;
}

/// Takes (and acks) every message now in `queue`.
pub async fn drain(url: &str, queue: &str) -> Vec<Taken> {
    let conn = connect(url).await;
    let channel = conn.create_channel().await.expect("a channel");
    let mut taken = Vec::new();
    while let Some(got) = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: false })
        .await
        .unwrap_or_else(|e| panic!("basic.get on `{queue}`: {e}"))
    {
        taken.push(Taken {
            message_id: got
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            body: got.delivery.data.clone(),
        });
        got.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("the message is acked");
    }
    let _ = conn.close(0, "drained".into()).await;
    taken
}

/// Publishes raw messages (any body, any properties) with publisher confirms.
pub struct RawPublisher {
    conn: Connection,
    channel: Channel,
}

impl RawPublisher {
    /// Connects to the virtual host at `url`.
    pub async fn connect(url: &str) -> Self {
        let conn = connect(url).await;
        let channel = conn.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("publisher confirms");
        Self { conn, channel }
    }

    /// Publishes `body` with `properties` to `exchange` and waits for the broker's confirm.
    pub async fn publish(&self, exchange: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(""),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
    }

    /// Publishes a reply body the way the platform's product service does:
    /// untyped, JSON, persistent, with message id `id`.
    pub async fn reply_raw(&self, body: &[u8], id: &MessageId) {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/json"))
            .with_message_id(ShortString::from(id.as_str()));
        self.publish(&names().stock_update_exchange, body, properties).await;
    }

    /// Publishes a `StockUpdateResult` for `order_id` with message id `id`.
    pub async fn reply(&self, order_id: &str, success: bool, id: &MessageId) {
        let result = StockUpdateResult {
            order_id: order_id.to_owned(),
            success,
            reason: (!success).then(|| "the test said no".to_owned()),
        };
        self.reply_raw(&serde_json::to_vec(&result).expect("JSON"), id).await;
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.conn.close(0, "done".into()).await;
    }
}

/// How the test participant answers an order, by its first product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Stock reserved.
    Reserve,
    /// Refused ("out of stock").
    Refuse,
    /// Never answered: the order's deadline decides.
    Ignore,
}

/// Answers `OrderCreated` like the platform's product service (untyped
/// replies), each order as `script` says by its first product.
pub struct TestParticipant {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestParticipant {
    /// Declares its queue (bound to the orders exchange) and starts answering.
    pub async fn start(url: &str, script: fn(&str) -> Answer) -> Self {
        let names = names();
        let topology = Topology::new()
            .exchange(&names.orders_exchange, ExchangeKind::Fanout)
            .exchange(&names.stock_update_exchange, ExchangeKind::Fanout)
            .queue(PARTICIPANT_QUEUE)
            .bind(&names.orders_exchange, PARTICIPANT_QUEUE, "");
        let transport = Arc::new(
            AmqpTransport::connect(AmqpConfig::new(url, topology))
                .await
                .unwrap_or_else(|e| panic!("RabbitMQ is not reachable at {url} ({e}); {START_BACKENDS}")),
        );
        let mut deliveries = transport
            .subscribe(PARTICIPANT_QUEUE)
            .await
            .expect("the participant's queue is consumable");
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = stopping.cancelled() => break,
                    next = deliveries.next() => next,
                };
                let delivery = match next {
                    None => break,
                    Some(Err(_)) => continue,
                    Some(Ok(delivery)) => delivery,
                };
                if let Ok(order) = delivery.message.decode::<OrderCreated>() {
                    let first = order.items.first().map_or("", |i| i.product_id.as_str());
                    let success = match script(first) {
                        Answer::Reserve => Some(true),
                        Answer::Refuse => Some(false),
                        Answer::Ignore => None,
                    };
                    if let Some(success) = success {
                        let result = StockUpdateResult {
                            order_id: order.order_id,
                            success,
                            reason: (!success).then(|| format!("out of stock: {first}")),
                        };
                        let body = serde_json::to_vec(&result).expect("JSON");
                        let reply = Message::new("", names.stock_update_exchange.clone(), body);
                        if transport.publish(&reply).await.is_err() {
                            // Not acked: redelivered, answered again.
                            continue;
                        }
                    }
                }
                let _ = delivery.settle.settle(Settlement::Ack).await;
            }
            drop(deliveries);
            transport.close().await;
        });
        Self { stop, task: Some(task) }
    }

    /// Stops answering.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
