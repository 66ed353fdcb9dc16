//! `GET /metrics` over a plain TCP connection, for the tests of services
//! that serve it (shared by the test binaries through `#[path]`).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The whole HTTP response to `GET /metrics` on `127.0.0.1:port`, if it
/// comes within `patience`.
pub async fn get_metrics(port: u16, patience: Duration) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    };
    tokio::time::timeout(patience, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
