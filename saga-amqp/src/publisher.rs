//! Publishing with confirms: a small pool of confirm-mode channels, many
//! confirms in flight on each, `mandatory` so unroutable messages come back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use saga_core::TransportError;
use tokio::sync::{Mutex, Semaphore};

use crate::error::{short, soft_error, unavailable};
use crate::link::{Link, Wait};

pub(crate) struct Publishing {
    link: Arc<Link>,
    channels: Vec<Mutex<Option<Channel>>>,
    next: AtomicUsize,
    in_flight: Semaphore,
    /// Exchanges known to exist: publishing to one that does not would close
    /// the channel, failing every confirm in flight on it, so unknown ones are
    /// checked first, on a channel of their own.
    known_exchanges: RwLock<HashSet<String>>,
}

impl Publishing {
    pub(crate) fn new(link: Arc<Link>, channels: usize, in_flight: usize, declared: &[String]) -> Self {
        let mut known: HashSet<String> = declared.iter().cloned().collect();
        // The default exchange always exists.
        known.insert(String::new());
        Self {
            link,
            channels: (0..channels.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            in_flight: Semaphore::new(in_flight.max(1)),
            known_exchanges: RwLock::new(known),
        }
    }

    /// The connection it publishes on (which also declares what is published to).
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    fn is_known(&self, exchange: &str) -> bool {
        self.known_exchanges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(exchange)
    }

    fn forget(&self, exchange: &str) {
        self.known_exchanges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(exchange);
    }

    /// Fails with [`TransportError::UnknownAddress`] when `exchange` does not exist.
    pub(crate) async fn check_exchange(&self, exchange: &str) -> Result<(), TransportError> {
        if self.is_known(exchange) {
            return Ok(());
        }
        let name = short(exchange, "exchange name").map_err(|_| TransportError::UnknownAddress(exchange.to_owned()))?;
        // A passive declaration that fails closes its channel: use a throwaway one.
        let channel = self.link.channel(Wait::No).await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let check = channel.exchange_declare(name, lapin::ExchangeKind::Direct, passive, FieldTable::default());
        match self.link.within_unless_blocked("checking an exchange", check).await? {
            Ok(()) => {
                self.known_exchanges
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(exchange.to_owned());
                Ok(())
            }
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                Err(TransportError::UnknownAddress(exchange.to_owned()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A live confirm-mode channel of the pool, opened again if it closed.
    async fn channel(&self) -> Result<Channel, TransportError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let mut current = self.channels[slot].lock().await;
        if let Some(channel) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.link.channel(Wait::No).await?;
        self.link
            .within_unless_blocked(
                "enabling confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?
            .map_err(unavailable)?;
        *current = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes and waits for the broker's confirm. Concurrent calls share
    /// channels and wait for their confirms independently.
    pub(crate) async fn publish(
        &self,
        id: &str,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let rejected = |reason: String| TransportError::Rejected {
            id: id.to_owned(),
            reason,
        };
        let exchange_name = short(exchange, "exchange name").map_err(rejected)?;
        let routing_key = short(routing_key, "routing key").map_err(rejected)?;
        let _slot = self.in_flight.acquire().await.map_err(|_| TransportError::Closed)?;
        let channel = self.channel().await?;
        let options = BasicPublishOptions {
            mandatory,
            immediate: false,
        };
        let confirmation = async {
            channel
                .basic_publish(exchange_name, routing_key, options, body, properties)
                .await?
                .await
        };
        // Under a resource alarm this waits for the alarm to clear: lapin sends
        // the publish then, so failing it would have the caller send it twice.
        match self.link.within_unless_blocked("publishing", confirmation).await? {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(rejected(format!(
                "unroutable: `{exchange}` has no queue bound for this routing key ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Err(rejected("the broker did not accept it (negative confirm)".to_owned())),
            Ok(Confirmation::NotRequested) => Err(rejected("the channel was not in confirm mode".to_owned())),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                // The exchange went away after it was checked; the channel closed and is reopened next time.
                self.forget(exchange);
                Err(rejected(format!("the channel closed: {e}")))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    pub(crate) fn close(&self) {
        self.in_flight.close();
    }
}
