//! Scenario 8: bad input at every edge — malformed and oversized gRPC
//! requests, malformed and oversized AMQP messages, and saga rows corrupted
//! in the database. Each is refused or reported; the service keeps serving
//! everything else.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut};
use order_service::proto::{CreateOrderRequest, GetOrderRequest, OrderItem};
use saga_amqp::lapin::BasicProperties;
use saga_amqp::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use saga_core::MessageId;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::amqp::{Answer, RawPublisher, TestParticipant, declare_probes, names};
use crate::harness::{Scenario, eventually};
use crate::ledger::{CANCELLED, CONFIRMED, Expect, settle};
use crate::load::USER;
use crate::processes::OrderService;
use crate::replies::{place_orders, wait_for_dead_letters, wait_for_status};
use crate::shop::{NO_DEADLINE, PATIENCE};

const MIB: usize = 1 << 20;

fn item(product: &str, quantity: i32, price: f64) -> OrderItem {
    OrderItem {
        product_id: product.to_owned(),
        quantity,
        price,
    }
}

fn create(user: &str, items: Vec<OrderItem>) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user.to_owned(),
        items,
    }
}

/// Sends raw bytes as a gRPC message body, whatever they are.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// `CreateOrder` with `body` as the request message.
async fn create_raw(channel: Channel, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static("/order.OrderService/CreateOrder"),
        RawBytes,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_requests_are_refused_and_the_service_keeps_serving() {
    let scenario = Scenario::new("8a. malformed gRPC requests", "bad_grpc").await;
    declare_probes(&scenario.amqp_url).await;
    let participant = TestParticipant::start(&scenario.amqp_url, |_| Answer::Reserve).await;
    let mut service = OrderService::start(&scenario, "order-service", NO_DEADLINE).await;
    let client = service.client();
    let mut accepted = Vec::new();
    let place_a_good_order = async |accepted: &mut Vec<String>| {
        let order = client
            .clone()
            .create_order(create(USER, vec![item("p0", 1, 1.5)]))
            .await
            .expect("a good order is still placed")
            .into_inner()
            .order
            .expect("an order");
        accepted.push(order.id);
    };
    place_a_good_order(&mut accepted).await;

    let huge = "u".repeat(MIB);
    let requests: Vec<(&str, CreateOrderRequest)> = vec![
        ("empty user", create("", vec![item("p0", 1, 1.0)])),
        ("blank user", create("   ", vec![item("p0", 1, 1.0)])),
        ("1 MiB user", create(&huge, vec![item("p0", 1, 1.0)])),
        ("user with NUL", create("a\0b", vec![item("p0", 1, 1.0)])),
        ("no items", create(USER, vec![])),
        ("10,000 items", create(USER, vec![item("p0", 1, 1.0); 10_000])),
        ("empty product", create(USER, vec![item("", 1, 1.0)])),
        ("1 MiB product", create(USER, vec![item(&huge, 1, 1.0)])),
        ("product with NUL", create(USER, vec![item("p\u{0}0", 1, 1.0)])),
        ("zero quantity", create(USER, vec![item("p0", 0, 1.0)])),
        ("negative quantity", create(USER, vec![item("p0", -1, 1.0)])),
        ("i32::MIN quantity", create(USER, vec![item("p0", i32::MIN, 1.0)])),
        ("i32::MAX quantity", create(USER, vec![item("p0", i32::MAX, 1.0)])),
        ("NaN price", create(USER, vec![item("p0", 1, f64::NAN)])),
        ("infinite price", create(USER, vec![item("p0", 1, f64::INFINITY)])),
        ("-infinite price", create(USER, vec![item("p0", 1, f64::NEG_INFINITY)])),
        ("negative price", create(USER, vec![item("p0", 1, -0.01)])),
        ("1e300 price", create(USER, vec![item("p0", 1, 1e300)])),
        (
            "one bad item among good ones",
            create(USER, vec![item("p0", 1, 1.0), item("p1", 1, f64::NAN)]),
        ),
    ];
    let refused = requests.len();
    for (what, request) in requests {
        let status = client.clone().create_order(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        service.assert_alive(what);
    }

    // A request larger than the server takes at all.
    let oversize = create(&"x".repeat(5 * MIB), vec![item("p0", 1, 1.0)]);
    let status = client.clone().create_order(oversize).await.expect_err("oversize");
    // tonic answers an over-limit message with OUT_OF_RANGE.
    assert!(
        matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
        "oversize: {status:?}"
    );

    // Bytes that are no CreateOrderRequest.
    let garbage: [(&str, Vec<u8>); 5] = [
        ("0xff bytes", vec![0xff; 64]),
        ("user id as a varint", vec![0x08, 0x01]),
        ("truncated string", vec![0x0a, 0x7f, b'a']),
        ("user id not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("item not a message", vec![0x12, 0x02, 0xff, 0xff]),
    ];
    for (what, body) in garbage {
        let status = create_raw(service.channel(), body).await.expect_err(what);
        // The caller's error, not the server's (tonic-prost would say INTERNAL).
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        service.assert_alive(what);
    }

    // Reads with bad arguments.
    let reads: [(&str, GetOrderRequest, &[Code]); 4] = [
        (
            "malformed id",
            GetOrderRequest {
                order_id: "not-a-uuid".to_owned(),
                user_id: USER.to_owned(),
            },
            &[Code::InvalidArgument, Code::NotFound],
        ),
        (
            "1 MiB id",
            GetOrderRequest {
                order_id: huge.clone(),
                user_id: USER.to_owned(),
            },
            &[Code::InvalidArgument, Code::NotFound],
        ),
        (
            "empty user",
            GetOrderRequest {
                order_id: accepted[0].clone(),
                user_id: String::new(),
            },
            &[Code::InvalidArgument],
        ),
        (
            "unknown id",
            GetOrderRequest {
                order_id: uuid::Uuid::new_v4().to_string(),
                user_id: USER.to_owned(),
            },
            &[Code::NotFound],
        ),
    ];
    for (what, request, codes) in reads {
        let status = client.clone().get_order(request).await.expect_err(what);
        assert!(codes.contains(&status.code()), "{what}: {status:?}");
    }

    // An idempotency key far too long.
    let mut request = tonic::Request::new(create(USER, vec![item("p0", 1, 1.0)]));
    request
        .metadata_mut()
        .insert("idempotency-key", "k".repeat(4096).parse().expect("ASCII"));
    let status = client.clone().create_order(request).await.expect_err("long key");
    assert_eq!(status.code(), Code::InvalidArgument, "long idempotency key: {status:?}");

    // Still serving, and nothing of the above was stored.
    place_a_good_order(&mut accepted).await;
    service.assert_alive("after the bad requests");
    let expect = Expect {
        accepted: &accepted,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, PATIENCE).await;
    participant.stop().await;
    ledger.note(format!(
        "{} malformed requests refused (+1 oversize, 5 undecodable, 4 bad reads, 1 long key), none stored",
        refused
    ));
    ledger.print_and_assert();
    assert_eq!(ledger.orders().len(), accepted.len(), "a refused request was stored");
    assert_eq!(ledger.count(CONFIRMED), accepted.len(), "{}", ledger.line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_amqp_messages_are_dead_lettered_and_the_consumer_continues() {
    let scenario = Scenario::new("8b. malformed and oversized AMQP messages", "bad_amqp").await;
    declare_probes(&scenario.amqp_url).await;
    let mut service = OrderService::start(&scenario, "order-service", NO_DEADLINE).await;
    let publisher = RawPublisher::connect(&scenario.amqp_url).await;
    let before = place_orders(&service, 2).await;

    let exchange = names().stock_update_exchange;
    let mut dead = BTreeSet::new();
    let unknown_order = uuid::Uuid::new_v4().to_string();
    let deeply_nested = "[".repeat(100_000);
    let huge_garbage: Vec<u8> = (0..8 * MIB).map(|n| (n % 251) as u8).collect();
    let huge_json = format!(
        r#"{{"order_id":"{unknown_order}","success":false,"reason":"{}"}}"#,
        "r".repeat(8 * MIB)
    );
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"not json".to_vec()),
        ("empty", Vec::new()),
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x80]),
        ("wrong types", br#"{"order_id":42,"success":"yes"}"#.to_vec()),
        (
            "wrong shape for a real order",
            format!(r#"{{"order_id":"{}","success":null}}"#, before[0]).into_bytes(),
        ),
        ("100,000 nested arrays", deeply_nested.into_bytes()),
        ("8 MiB of garbage", huge_garbage),
        ("8 MiB reply for an unknown order", huge_json.into_bytes()),
    ];
    for (_, body) in &bodies {
        let message = MessageId::new();
        publisher.reply_raw(body, &message).await;
        dead.insert(message.to_string());
    }
    // Typed as something the service does not handle, about a real order.
    let typed_wrong = MessageId::new();
    publisher
        .publish(
            &exchange,
            format!(r#"{{"order_id":"{}","success":true}}"#, before[0]).as_bytes(),
            BasicProperties::default()
                .with_type(ShortString::from("SomethingElse"))
                .with_message_id(ShortString::from(typed_wrong.as_str())),
        )
        .await;
    dead.insert(typed_wrong.to_string());
    // Odd properties: a negative retry count as text, a nested table, a
    // timestamp far in the future, a correlation id that is no saga id.
    let odd = MessageId::new();
    let mut nested = FieldTable::default();
    nested.insert(ShortString::from("k"), AMQPValue::LongLongInt(-1));
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(saga_amqp::RETRIES_HEADER),
        AMQPValue::LongString(LongString::from("-1")),
    );
    headers.insert(ShortString::from("x-nested"), AMQPValue::FieldTable(nested));
    headers.insert(
        ShortString::from("traceparent"),
        AMQPValue::LongString(LongString::from("garbage")),
    );
    publisher
        .publish(
            &exchange,
            format!(r#"{{"order_id":"{unknown_order}","success":true}}"#).as_bytes(),
            BasicProperties::default()
                .with_message_id(ShortString::from(odd.as_str()))
                .with_timestamp(u64::MAX)
                .with_correlation_id(ShortString::from("\u{1F4A5}"))
                .with_headers(headers),
        )
        .await;
    dead.insert(odd.to_string());

    // The consumer carries on: real replies after the poison decide their orders.
    let after = place_orders(&service, 2).await;
    let oversized_reason = place_orders(&service, 1).await;
    for id in before.iter().chain(&after) {
        publisher.reply(id, true, &MessageId::new()).await;
    }
    // A valid reply with a 1 MiB reason: decided, like any refusal.
    let long_refusal = format!(
        r#"{{"order_id":"{}","success":false,"reason":"{}"}}"#,
        oversized_reason[0],
        "no ".repeat(MIB / 3)
    );
    publisher.reply_raw(long_refusal.as_bytes(), &MessageId::new()).await;
    publisher.close().await;

    let good: Vec<String> = before.iter().chain(&after).cloned().collect();
    wait_for_status(&scenario, &good, CONFIRMED).await;
    wait_for_status(&scenario, &oversized_reason, CANCELLED).await;
    let dead_lettered = wait_for_dead_letters(&scenario, dead.len()).await;
    assert_eq!(
        dead_lettered, dead,
        "every poison message is dead-lettered, nothing else"
    );
    service.assert_alive("after the poison messages");

    let accepted: Vec<String> = good.iter().chain(&oversized_reason).cloned().collect();
    let expect = Expect {
        accepted: &accepted,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, PATIENCE).await;
    ledger.note(format!("{} poison messages dead-lettered", dead_lettered.len()));
    ledger.print_and_assert();
}

/// Copies of a saga of an unknown definition version, all due.
const BROKEN_COPIES: i32 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_saga_rows_are_reported_and_block_no_other_saga() {
    let scenario = Scenario::new("8c. corrupt saga rows", "corrupt_rows").await;
    declare_probes(&scenario.amqp_url).await;
    // Long enough for the answered orders' replies on a busy machine.
    let mut service = OrderService::start(&scenario, "order-service", "8s").await;
    let publisher = RawPublisher::connect(&scenario.amqp_url).await;

    // Placed first, so their deadlines come first in every scan.
    let corrupt = place_orders(&service, 3).await;
    // Written as any writer of saga rows must write them: with a new
    // revision, which tells an engine keeping a copy of the saga that its
    // copy is stale (an edit in place would be overwritten from the copy).
    let corruptions = [
        "UPDATE saga_instances SET data = '{\"garbage\": true}', revision = revision + 1 WHERE id = $1::uuid",
        // A version no build registers (older than the service's: a
        // newer one is a deployment under way, its replies handed back).
        "UPDATE saga_instances SET definition_version = 0, revision = revision + 1 WHERE id = $1::uuid",
        "UPDATE saga_instances SET status = 'zombie', revision = revision + 1 WHERE id = $1::uuid",
    ];
    for (id, corruption) in corrupt.iter().zip(corruptions) {
        let updated = sqlx::query(corruption)
            .bind(id)
            .execute(&scenario.db)
            .await
            .expect("the saga row is corrupted")
            .rows_affected();
        assert_eq!(updated, 1, "{corruption}");
    }
    // More broken sagas due than one deadline scan takes (256): a scanner
    // that tried them again every time would never reach a healthy one.
    let copies = sqlx::query(
        "INSERT INTO saga_instances (id, definition, definition_version, key, status, step, attempt, awaiting, \
         deadline, failure, data, data_version, revision, created_at, updated_at) \
         SELECT gen_random_uuid(), definition, definition_version, NULL, status, step, attempt, awaiting, \
         deadline, failure, data, data_version, revision, created_at, updated_at \
         FROM saga_instances, generate_series(1, $2) WHERE id = $1::uuid",
    )
    .bind(&corrupt[1])
    .bind(BROKEN_COPIES)
    .execute(&scenario.db)
    .await
    .expect("the broken saga is copied")
    .rows_affected();
    assert_eq!(copies, BROKEN_COPIES as u64);
    let left_to_the_deadline = place_orders(&service, 3).await;
    let answered = place_orders(&service, 3).await;
    let mut dead = BTreeSet::new();
    for id in &corrupt {
        let message = MessageId::new();
        publisher.reply(id, true, &message).await;
        dead.insert(message.to_string());
    }
    for id in &answered {
        publisher.reply(id, true, &MessageId::new()).await;
    }
    publisher.close().await;

    wait_for_status(&scenario, &answered, CONFIRMED).await;
    wait_for_status(&scenario, &left_to_the_deadline, CANCELLED).await;
    let dead_lettered = wait_for_dead_letters(&scenario, dead.len()).await;
    assert_eq!(dead_lettered, dead, "replies for the corrupt sagas are dead-lettered");

    // Each corrupt saga is named in an error the operator sees.
    for id in &corrupt {
        eventually(&format!("an error naming saga {id}"), PATIENCE, || async {
            let reported = service
                .log()
                .matching(|line| line.contains(id.as_str()) && line.contains("ERROR"));
            (!reported.is_empty()).then_some(())
        })
        .await;
    }
    // The scanner keeps running past them.
    let later = place_orders(&service, 2).await;
    wait_for_status(&scenario, &later, CANCELLED).await;
    service.assert_alive("with corrupt rows in its store");

    let accepted: Vec<String> = [&left_to_the_deadline, &answered, &later, &corrupt]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let expect = Expect {
        accepted: &accepted,
        set_aside: &corrupt,
        ..Expect::default()
    };
    let mut ledger = settle(&scenario, &expect, PATIENCE).await;
    ledger.note(format!(
        "{} corrupt sagas (+{BROKEN_COPIES} copies of one) reported and set aside, their replies dead-lettered",
        corrupt.len()
    ));
    ledger.print_and_assert();
}
