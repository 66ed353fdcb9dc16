//! The built binary refuses configuration it cannot use safely: it exits
//! with status 2 and a message naming the variable, never its value.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

/// Runs the binary in embedded mode with `vars` set, on ports of its own,
/// and returns how it ended (a service that started is killed first).
async fn run_with(vars: &[(&str, &OsStr)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("RABBITMQ_URL")
        .env_remove("ADMIN_TOKEN")
        .env("GRPC_PORT", "127.0.0.1:0")
        .env("METRICS_PORT", "127.0.0.1:0")
        .kill_on_drop(true);
    for (name, value) in vars {
        command.env(name, value);
    }
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("a refused configuration ends the process at once")
        .expect("the order-service binary runs")
}

#[tokio::test]
async fn an_admin_token_that_is_not_utf8_stops_the_service_rather_than_leaving_it_open() {
    let token = OsStr::from_bytes(b"s3cret\xff\xfe-token");
    let output = run_with(&[("ADMIN_TOKEN", token)]).await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ADMIN_TOKEN: is not valid UTF-8"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the value is never shown: {stderr}");
}

#[tokio::test]
async fn a_database_url_parameter_the_driver_would_log_stops_the_service_without_showing_it() {
    let url = OsStr::new("postgres://orders@127.0.0.1:5432/orders?sslmode=disable&PASSWORD=hunter2");
    let output = run_with(&[
        ("DATABASE_URL", url),
        ("RABBITMQ_URL", OsStr::new("amqp://127.0.0.1:5672/%2f")),
    ])
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL") && stderr.contains("`PASSWORD`"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the value is never shown: {stderr}");
}
