//! `order-cli`: argument parsing, and its commands against an embedded-mode
//! order service in this process.

use std::net::SocketAddr;

use clap::Parser;
use order_service::config::ListenAddr;
use order_service::{Application, Config};
use saga_core::CancellationToken;
use saga_examples::cli::{Cli, CliCommand, CliError, ItemArg, run};

use crate::helpers::PATIENCE;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("order-cli").chain(args.iter().copied()))
}

#[test]
fn create_takes_items_as_product_quantity_price() {
    let cli = parse(&[
        "create",
        "--user",
        "alice",
        "--item",
        "p1:2:10.25",
        "--item",
        "p2:1:0",
        "--idempotency-key",
        "k-1",
    ])
    .expect("valid arguments");
    assert_eq!(cli.addr, "http://127.0.0.1:50054");
    let CliCommand::Create {
        user,
        items,
        idempotency_key,
    } = cli.command
    else {
        panic!("a create command");
    };
    assert_eq!(user, "alice");
    assert_eq!(
        items,
        vec![
            ItemArg {
                product_id: "p1".into(),
                quantity: 2,
                price: 10.25
            },
            ItemArg {
                product_id: "p2".into(),
                quantity: 1,
                price: 0.0
            },
        ]
    );
    assert_eq!(idempotency_key.as_deref(), Some("k-1"));
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        &["create", "--user", "alice"][..],
        &["create", "--user", "alice", "--item", "p1:0:1"],
        &["create", "--user", "alice", "--item", "p1:2"],
        &["get", "some-id"],
        &["watch", "some-id", "--user", "alice", "--timeout", "soon"],
    ] {
        assert!(parse(args).is_err(), "{args:?}");
    }
    let cli = parse(&["--addr", "http://127.0.0.1:1", "get", "o-1", "--user", "bob"]).expect("valid");
    assert_eq!(cli.addr, "http://127.0.0.1:1");
}

/// Runs the CLI with `args` against `addr`, returning what it printed.
async fn order_cli(addr: &str, args: &[&str]) -> Result<String, CliError> {
    let mut all = vec!["--addr", addr];
    all.extend_from_slice(args);
    let cli = parse(&all).expect("valid arguments");
    let mut out = Vec::new();
    run(cli, &mut out).await?;
    Ok(String::from_utf8(out).expect("UTF-8 output"))
}

#[tokio::test]
async fn create_get_and_watch_against_an_embedded_order_service() {
    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        ..Config::default()
    };
    let app = Application::build(config).await.expect("the embedded service builds");
    let addr = format!("http://{}", SocketAddr::from(([127, 0, 0, 1], app.grpc_port())));
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let created = order_cli(&addr, &["create", "--user", "alice", "--item", "apple:2:10.25"])
        .await
        .expect("create succeeds");
    let id = created
        .split_whitespace()
        .nth(1)
        .expect("`order <id> ...` on the first line")
        .to_owned();
    assert!(created.contains("status PENDING"), "{created}");
    assert!(created.contains("total 20.50"), "{created}");

    let got = order_cli(&addr, &["get", &id, "--user", "alice"])
        .await
        .expect("get succeeds");
    assert!(got.starts_with(&format!("order {id}  user alice  status ")), "{got}");
    assert!(got.contains("apple x2 @ 10.25"), "{got}");

    let watched = order_cli(&addr, &["watch", &id, "--user", "alice", "--timeout", "20s"])
        .await
        .expect("watch sees the order decided");
    assert!(watched.contains(&format!("{id}  CONFIRMED")), "{watched}");

    let error = order_cli(&addr, &["get", &id, "--user", "mallory"])
        .await
        .expect_err("not the owner");
    assert!(
        matches!(&error, CliError::Refused { code, .. } if *code == tonic::Code::NotFound),
        "{error}"
    );

    shutdown.cancel();
    tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the service stops in time")
        .expect("no panic")
        .expect("a clean stop");
}

#[tokio::test]
async fn an_unreachable_service_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let error = order_cli("http://127.0.0.1:1", &["get", "o-1", "--user", "alice"])
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, CliError::Unreachable { .. }), "{error}");
    assert!(error.to_string().contains("is it running?"), "{error}");
}
