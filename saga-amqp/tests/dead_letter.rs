//! Dead letters on a real broker, beyond saga-core's contract: the routing
//! key a message was published with survives dead-lettering and replay;
//! dead letters that do not say where they came from (older ones, raw ones,
//! ones whose exchange is gone) are reported and stay; the broker's own
//! `x-death` record is an origin too; browsing a quorum queue's dead letters
//! again and again loses none.

#[path = "support/broker.rs"]
mod broker;

use std::collections::BTreeMap;
use std::time::Duration;

use saga_amqp::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use saga_amqp::lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use saga_amqp::lapin::{BasicProperties, Connection, ConnectionProperties};
use saga_amqp::{
    AmqpConfig, AmqpTransport, DESTINATION_HEADER, ExchangeConfig, ExchangeKind, QueueConfig, QueueType,
    ROUTING_KEY_HEADER, Topology,
};
use saga_core::{
    DeadLetterQueue, Delivery, Message, MessageId, Origin, Publisher, ReplaySelection, Settlement, Subscriber,
    Subscription,
};

const WAIT: Duration = Duration::from_secs(15);

async fn next(subscription: &mut Box<dyn Subscription>, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("{what}: receiving failed: {e}"),
        Ok(None) => panic!("{what}: the subscription closed"),
        Err(_) => panic!("{what}: nothing arrived within {WAIT:?}"),
    }
}

/// Publishes `message`, receives it from `subscription` and dead-letters
/// it; returns it as it was received, and its retries.
async fn dead_letter(
    transport: &AmqpTransport,
    subscription: &mut Box<dyn Subscription>,
    message: &Message,
) -> (Message, u32) {
    transport.publish(message).await.expect("published");
    let delivery = next(subscription, "the message to dead-letter").await;
    assert_eq!(delivery.message.id, message.id);
    let received = (delivery.message.clone(), delivery.retries);
    delivery
        .settle
        .settle(Settlement::DeadLetter {
            reason: "handler refused it".into(),
        })
        .await
        .expect("dead-lettered");
    received
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

/// Publishes a message straight into `queue` (through the default
/// exchange), as another client or an older version would have left it.
async fn publish_raw(queue: &str, id: &str, headers: BTreeMap<ShortString, AMQPValue>) {
    let properties = BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(headers));
    publish_raw_with(queue, properties).await;
}

/// Publishes a message of type `Raw` with `properties` straight into `queue`.
async fn publish_raw_with(queue: &str, properties: BasicProperties) {
    let connection = Connection::connect(&broker::url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable: {e}. Start it with `rabbitmq-server -detached`."));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{\"raw\":true}",
            properties.with_type("Raw".into()),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    let _ = connection.close(200, "done".into()).await;
}

/// A direct exchange bound to `<name>.queue` for messages of type `Routed`,
/// and one such message dead-lettered from that queue.
struct Routed {
    name: String,
    queue: String,
    transport: AmqpTransport,
    subscription: Box<dyn Subscription>,
    message: Message,
}

impl Routed {
    async fn dead_lettered(prefix: &str, exchange: impl FnOnce(ExchangeConfig) -> ExchangeConfig) -> Self {
        let name = broker::unique(prefix);
        let queue = format!("{name}.queue");
        let topology = Topology::new()
            .with_exchange(exchange(ExchangeConfig::new(&name, ExchangeKind::Direct)))
            .queue(&queue)
            .bind(&name, &queue, "Routed");
        let mut config = AmqpConfig::new(broker::url(), topology);
        config.operation_timeout = Duration::from_secs(5);
        let transport = broker::connect(config).await;
        let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
        let message = Message::new("Routed", name.clone(), b"{}".to_vec());
        dead_letter(&transport, &mut subscription, &message).await;
        Self {
            name,
            queue,
            transport,
            subscription,
            message,
        }
    }
}

/// Deliveries whose own headers fill nearly all of a frame. Retrying or
/// dead-lettering one adds headers, and so does the broker when a delayed
/// retry comes back (`x-death`): a frame past `frame_max` closes the
/// connection that sends it, or that receives it, and the message would
/// come back for ever. Each is dead-lettered, as it came if need be (its
/// reason and origin are logged, not recorded), and an operator sees it
/// whole. A header frame here holds 8,192 bytes: the raw messages' own
/// take 48 bytes (an id of 7) or 39 (no id, not persistent) besides the
/// padding; the retry headers about 128 more, the broker's `x-death`
/// about 400, an id and persistence 38.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_with_no_room_left_in_its_header_frame_is_dead_lettered_as_it_came() {
    let name = broker::unique("crowded");
    let queue = format!("{name}.queue");
    let mut config = broker::config(&name, QueueType::Classic);
    config.frame_max = Some(8 * 1024);
    let transport = broker::connect(config).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let padded = |length: usize| {
        let table = BTreeMap::from([(ShortString::from("pad"), text(&"x".repeat(length)))]);
        BasicProperties::default().with_headers(FieldTable::from(table))
    };
    let persistent_with_id = |id: &str, length: usize| padded(length).with_message_id(id.into()).with_delivery_mode(2);
    let refused = || Settlement::DeadLetter {
        reason: "handler refused it".into(),
    };
    let cases = [
        // 8,108 bytes: no room for the dead-letter reason and origin.
        ("refused", persistent_with_id("refused", 8_060), refused(), 8_060),
        // No room for the retry count.
        (
            "retried",
            persistent_with_id("retried", 8_060),
            Settlement::Retry { delay: Duration::ZERO },
            8_060,
        ),
        // 8,076 bytes with the retry headers: room for them, not for `x-death` on the way back.
        (
            "delayed",
            persistent_with_id("delayed", 7_900),
            Settlement::Retry {
                delay: Duration::from_millis(50),
            },
            7_900,
        ),
        // 8,179 bytes: not even room for an id and persistence.
        ("bare", padded(8_140), refused(), 8_140),
    ];
    let mut expected = Vec::new();
    for (what, properties, settlement, padding) in cases {
        publish_raw_with(&queue, properties).await;
        let delivery = next(&mut subscription, what).await;
        expected.push((delivery.message.id.clone(), padding));
        delivery
            .settle
            .settle(settlement)
            .await
            .unwrap_or_else(|e| panic!("`{what}` settled: {e}"));
    }

    match tokio::time::timeout(Duration::from_secs(1), subscription.next()).await {
        Err(_) => {}
        Ok(back) => panic!(
            "nothing comes back to the queue, got {:?}",
            back.map(|d| d.map(|d| d.message.id))
        ),
    }
    let page = transport.dead_letters(&queue, 10).await.expect("browsed");
    let found: Vec<(MessageId, usize)> = page
        .letters
        .iter()
        .map(|l| (l.message.id.clone(), l.message.header("pad").map_or(0, str::len)))
        .collect();
    assert_eq!(found, expected, "each dead-lettered with its own headers whole");
    for letter in &page.letters {
        assert_eq!(letter.message.payload, b"{\"raw\":true}");
    }
    // The delayed one had room for the dead-letter headers, not for the
    // broker's on a round through the delay queue; the others had none.
    let recorded: Vec<Option<&str>> = page.letters.iter().map(|l| l.reason.as_deref()).collect();
    assert_eq!(
        recorded,
        [
            None,
            None,
            Some("its headers leave no room in a frame for a retry's headers, so it was not retried"),
            None
        ]
    );
    assert!(
        page.letters[2].origin.is_some(),
        "recorded where it was first published"
    );

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_the_routing_key_of_a_direct_exchange() {
    // Only messages of type `Routed` reach the queue: a replay that lost the
    // routing key would be unroutable.
    let Routed {
        name,
        queue,
        transport,
        mut subscription,
        message,
    } = Routed::dead_lettered("routed", |exchange| exchange).await;

    let page = transport.dead_letters(&queue, 10).await.expect("browsed");
    assert_eq!(page.total, 1);
    assert_eq!(
        page.letters[0].origin,
        Some(Origin {
            destination: name.clone(),
            routing_key: Some("Routed".to_owned()),
        }),
        "the exchange and the routing key it was published with"
    );
    assert_eq!(page.letters[0].reason.as_deref(), Some("handler refused it"));

    let report = transport
        .replay(&queue, &ReplaySelection::Ids(vec![message.id.clone()]))
        .await
        .expect("replayed");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(report.replayed, vec![message.id.clone()]);
    let again = next(&mut subscription, "the replayed message").await;
    assert_eq!(again.message.id, message.id);
    again.settle.settle(Settlement::Ack).await.expect("acked");
    assert_eq!(transport.dead_letters(&queue, 10).await.expect("browsed").total, 0);

    drop(subscription);
    broker::clean_up(&transport).await;
}

/// An exchange that lets the broker drop unrouted messages: the relay's
/// publishes may go nowhere, an operator's replay may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_nothing_would_receive_stays_a_dead_letter() {
    let Routed {
        name,
        queue,
        transport,
        subscription,
        ..
    } = Routed::dead_lettered("unrouted", ExchangeConfig::allow_unrouted).await;

    // The binding is gone by the time of the replay.
    let connection = Connection::connect(&broker::url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ is not reachable: {e}. Start it with `rabbitmq-server -detached`."));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_unbind(
            queue.as_str().into(),
            name.as_str().into(),
            "Routed".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbound");
    let _ = connection.close(200, "done".into()).await;

    let report = transport.replay(&queue, &ReplaySelection::All).await.expect("replayed");
    assert!(report.replayed.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(
        transport.dead_letters(&queue, 10).await.expect("browsed").total,
        1,
        "the dead letter is still there"
    );

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_without_a_usable_origin_are_reported_and_stay() {
    let name = broker::unique("origins");
    let queue = format!("{name}.queue");
    let dlq = format!("{queue}.dlq");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    let gone = broker::unique("gone");

    // No record at all (another client put it there).
    publish_raw(&dlq, "raw-nothing", BTreeMap::new()).await;
    // The exchange but not the routing key (dead-lettered by an older
    // version), to an exchange this transport knows: its rule gives the key.
    publish_raw(
        &dlq,
        "raw-known-exchange",
        BTreeMap::from([(ShortString::from(DESTINATION_HEADER), text(&name))]),
    )
    .await;
    // The same, to an exchange it does not know: the key cannot be told.
    publish_raw(
        &dlq,
        "raw-unknown-exchange",
        BTreeMap::from([(ShortString::from(DESTINATION_HEADER), text(&gone))]),
    )
    .await;
    // Both recorded, but the exchange no longer exists.
    publish_raw(
        &dlq,
        "raw-gone-exchange",
        BTreeMap::from([
            (ShortString::from(DESTINATION_HEADER), text(&gone)),
            (ShortString::from(ROUTING_KEY_HEADER), text("")),
        ]),
    )
    .await;

    let page = transport.dead_letters(&queue, 10).await.expect("browsed");
    let origins: Vec<(String, Option<Origin>)> = page
        .letters
        .iter()
        .map(|l| (l.message.id.to_string(), l.origin.clone()))
        .collect();
    assert_eq!(
        origins,
        [
            ("raw-nothing".to_owned(), None),
            (
                "raw-known-exchange".to_owned(),
                Some(Origin {
                    destination: name.clone(),
                    routing_key: Some(String::new()),
                })
            ),
            ("raw-unknown-exchange".to_owned(), None),
            (
                "raw-gone-exchange".to_owned(),
                Some(Origin {
                    destination: gone.clone(),
                    routing_key: Some(String::new()),
                })
            ),
        ]
    );

    let report = transport.replay(&queue, &ReplaySelection::All).await.expect("replayed");
    assert_eq!(report.replayed, [MessageId::from("raw-known-exchange")]);
    let failed: Vec<(&str, &str)> = report
        .failed
        .iter()
        .map(|f| (f.id.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    for (id, reason) in &failed[..2] {
        assert!(
            reason.contains("does not record where it was first published"),
            "{id}: {reason}"
        );
    }
    assert_eq!(failed[2].0, "raw-gone-exchange");
    assert!(
        failed[2].1.contains(&gone),
        "names the missing exchange: {}",
        failed[2].1
    );

    let replayed = next(&mut subscription, "the replayable message").await;
    assert_eq!(replayed.message.id.as_str(), "raw-known-exchange");
    assert_eq!(replayed.message.header(DESTINATION_HEADER), None);
    replayed.settle.settle(Settlement::Ack).await.expect("acked");

    let left = transport.dead_letters(&queue, 10).await.expect("browsed");
    let ids: Vec<&str> = left.letters.iter().map(|l| l.message.id.as_str()).collect();
    assert_eq!(
        ids,
        ["raw-nothing", "raw-unknown-exchange", "raw-gone-exchange"],
        "what could not be replayed stays, in order"
    );

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_s_forged_origin_and_retry_count_are_not_taken_for_the_transport_s_own() {
    let name = broker::unique("forged");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");

    // Published to the queue's exchange with bookkeeping headers of its own:
    // a replay of its dead letter must not go where they say.
    let forged = Message::new("Forged", name.clone(), b"{}".to_vec())
        .with_header(DESTINATION_HEADER, "somewhere-else")
        .with_header(ROUTING_KEY_HEADER, "a-victim-queue")
        .with_header(saga_amqp::RETRIES_HEADER, "1000");
    let (received, retries) = dead_letter(&transport, &mut subscription, &forged).await;
    let destination = received.destination;
    let page = transport.dead_letters(&queue, 10).await.expect("browsed");
    drop(subscription);
    broker::clean_up(&transport).await;

    assert_eq!(retries, 0, "a first delivery has not been retried");
    assert_eq!(destination, name, "where it was published");
    assert_eq!(
        page.letters.iter().map(|l| l.origin.clone()).collect::<Vec<_>>(),
        [Some(Origin {
            destination: name.clone(),
            routing_key: Some(String::new()),
        })],
        "replayed to where it came from"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_s_x_death_record_is_an_origin() {
    let name = broker::unique("x-death");
    let queue = format!("{name}.queue");
    let transport = broker::connect(broker::config(&name, QueueType::Classic)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    // What RabbitMQ writes when it dead-letters from `queue` by itself (a
    // quorum queue's delivery limit), after an earlier death elsewhere.
    let death = |queue: &str, exchange: &str, key: &str| {
        AMQPValue::FieldTable(FieldTable::from(BTreeMap::from([
            (ShortString::from("queue"), text(queue)),
            (ShortString::from("exchange"), text(exchange)),
            (
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(FieldArray::from(vec![text(key)])),
            ),
            (ShortString::from("reason"), text("delivery_limit")),
            (ShortString::from("count"), AMQPValue::LongLongInt(1)),
        ])))
    };
    let deaths = AMQPValue::FieldArray(FieldArray::from(vec![
        death("elsewhere", "other-exchange", "other-key"),
        death(&queue, &name, ""),
    ]));
    publish_raw(
        &format!("{queue}.dlq"),
        "broker-dead-lettered",
        BTreeMap::from([(ShortString::from("x-death"), deaths)]),
    )
    .await;

    let page = transport.dead_letters(&queue, 10).await.expect("browsed");
    assert_eq!(
        page.letters[0].origin,
        Some(Origin {
            destination: name.clone(),
            routing_key: Some(String::new()),
        }),
        "the death record of this queue, not another"
    );
    let report = transport.replay(&queue, &ReplaySelection::All).await.expect("replayed");
    assert_eq!(report.replayed, [MessageId::from("broker-dead-lettered")], "{report:?}");
    let replayed = next(&mut subscription, "the replayed message").await;
    assert_eq!(replayed.message.id.as_str(), "broker-dead-lettered");
    assert_eq!(
        replayed.message.header("x-death"),
        None,
        "the death record stays behind"
    );
    replayed.settle.settle(Settlement::Ack).await.expect("acked");

    drop(subscription);
    broker::clean_up(&transport).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_a_quorum_dead_letter_queue_again_and_again_loses_nothing() {
    let name = broker::unique("browse-often");
    let queue = format!("{name}.queue");
    let topology = Topology::new()
        .exchange(&name, ExchangeKind::Fanout)
        .with_queue(QueueConfig::new(&queue).with_type(QueueType::Quorum))
        .bind(&name, &queue, "");
    let transport = broker::connect(AmqpConfig::new(broker::url(), topology)).await;
    let mut subscription = transport.subscribe(&queue).await.expect("subscribed");
    for n in 0..2 {
        let message = Message::new("Kept", name.clone(), format!("{{\"n\":{n}}}").into_bytes());
        dead_letter(&transport, &mut subscription, &message).await;
    }
    // More looks than RabbitMQ 4's default quorum delivery limit (20).
    for look in 0..30 {
        let page = transport.dead_letters(&queue, 10).await.expect("browsed");
        assert_eq!(page.total, 2, "look {look}: the count");
        assert_eq!(page.letters.len(), 2, "look {look}: the messages");
    }
    let report = transport.replay(&queue, &ReplaySelection::All).await.expect("replayed");
    assert_eq!(report.replayed.len(), 2, "{report:?}");
    for _ in 0..2 {
        let delivery = next(&mut subscription, "a replayed message").await;
        delivery.settle.settle(Settlement::Ack).await.expect("acked");
    }

    drop(subscription);
    broker::clean_up(&transport).await;
}
