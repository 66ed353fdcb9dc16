//! Clean-up of what a run or a test declared on the broker.

use saga_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

/// Deletes `queues` (with their `.dlq`) and `exchanges` on the broker at
/// `url`, best effort: what cannot be deleted is left, and nothing fails.
pub async fn delete_topology(url: &str, queues: &[String], exchanges: &[String]) {
    let Ok(conn) = saga_amqp::lapin::Connection::connect(url, Default::default()).await else {
        return;
    };
    if let Ok(channel) = conn.create_channel().await {
        for queue in queues {
            for name in [queue.clone(), format!("{queue}.dlq")] {
                let _ = channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for exchange in exchanges {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(0, "done".into()).await;
}
