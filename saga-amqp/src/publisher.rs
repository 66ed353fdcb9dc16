//! Publishing with confirms: a small pool of confirm-mode channels, many
//! confirms in flight on each, for messages the broker may drop when no
//! queue is bound; and `mandatory` messages (unroutable ones come back) one
//! at a time on channels of their own, so a return reaches its own publish.
//! A message whose properties do not fit in one frame is refused before it
//! is sent: the broker would close the connection, failing every confirm
//! in flight on it.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

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
    channels: Vec<Mutex<Option<Open>>>,
    next: AtomicUsize,
    in_flight: Semaphore,
    /// Channels for `mandatory` publishes: idle ones, and a permit for each
    /// one in use (see [`Publishing::exclusive_channel`]).
    idle_exclusive: std::sync::Mutex<Vec<Open>>,
    exclusive: Semaphore,
    /// Exchanges known to exist: publishing to one that does not would close
    /// the channel, failing every confirm in flight on it, so unknown ones are
    /// checked first, on a channel of their own.
    known_exchanges: RwLock<HashSet<String>>,
}

impl Publishing {
    pub(crate) fn new(
        link: Arc<Link>,
        channels: usize,
        exclusive_channels: usize,
        in_flight: usize,
        declared: &[String],
    ) -> Self {
        let mut known: HashSet<String> = declared.iter().cloned().collect();
        // The default exchange always exists.
        known.insert(String::new());
        Self {
            link,
            channels: (0..channels.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            in_flight: Semaphore::new(in_flight.max(1)),
            idle_exclusive: std::sync::Mutex::default(),
            exclusive: Semaphore::new(exclusive_channels.max(1)),
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
    async fn channel(&self) -> Result<Open, TransportError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let mut current = self.channels[slot].lock().await;
        if let Some(open) = current.as_ref().filter(|open| open.channel.status().connected()) {
            return Ok(open.clone());
        }
        let open = self.open_channel().await?;
        *current = Some(open.clone());
        Ok(open)
    }

    /// A channel of its own for one `mandatory` publish: an idle one, or a
    /// new one while fewer than `exclusive_channels` are in use.
    ///
    /// A broker's `basic.return` names no publish, and lapin hands it to
    /// whichever confirm of the channel it resolves next (in no set order
    /// for a `multiple` ack): among concurrent publishes on one channel, a
    /// returned message could be reported confirmed (a relay would mark it
    /// sent, and nothing had received it) and a routed one refused. With one
    /// publish at a time on the channel, the return is its own.
    async fn exclusive_channel(&self) -> Result<Exclusive<'_>, TransportError> {
        let permit = self.exclusive.acquire().await.map_err(|_| TransportError::Closed)?;
        let idle = {
            let mut idle = self.idle_exclusive.lock().unwrap_or_else(PoisonError::into_inner);
            // The most recently used first; closed ones are dropped as they come up.
            std::iter::from_fn(|| idle.pop()).find(|open| open.channel.status().connected())
        };
        let open = match idle {
            Some(open) => open,
            None => self.open_channel().await?,
        };
        Ok(Exclusive {
            open,
            settled: false,
            idle: &self.idle_exclusive,
            _permit: permit,
        })
    }

    /// A new confirm-mode channel on the publishing connection.
    async fn open_channel(&self) -> Result<Open, TransportError> {
        let (channel, frame_max) = self.link.channel_and_frame_max(Wait::No).await?;
        self.link
            .within_unless_blocked(
                "enabling confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?
            .map_err(unavailable)?;
        Ok(Open {
            channel,
            frame_max,
            order: Arc::default(),
        })
    }

    /// The largest frame of the publishing connection (connecting if
    /// needed): a message's properties and headers travel in one content
    /// header frame, which may not exceed it (see [`header_frame_size`]).
    pub(crate) async fn frame_max(&self) -> Result<usize, TransportError> {
        Ok(self.channel().await?.frame_max as usize)
    }

    /// Publishes and waits for the broker's confirm. Concurrent calls share
    /// channels and wait for their confirms independently, except
    /// `mandatory` ones, which each have a channel to themselves until their
    /// confirm (see [`Self::exclusive_channel`]).
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
        let header_frame = header_frame_size(&properties);
        let _slot = self.in_flight.acquire().await.map_err(|_| TransportError::Closed)?;
        let mut exclusive = None;
        let open = if mandatory {
            exclusive.insert(self.exclusive_channel().await?).open()
        } else {
            self.channel().await?
        };
        let Open {
            channel,
            frame_max,
            order,
        } = open;
        if header_frame > frame_max as usize {
            // Nothing was sent: the channel is as it was.
            if let Some(lent) = exclusive.as_mut() {
                lent.settled();
            }
            return Err(rejected(format!(
                "its properties and headers make a header frame of {header_frame} bytes, more than the \
                 connection's frame_max of {frame_max}: the broker would close the connection"
            )));
        }
        let options = BasicPublishOptions {
            mandatory,
            immediate: false,
        };
        let confirmation = async {
            let publish = channel.basic_publish(exchange_name, routing_key, options, body, properties);
            in_order(&order, publish).await?.await
        };
        // Under a resource alarm this waits for the alarm to clear: lapin sends
        // the publish then, so failing it would have the caller send it twice.
        let confirmation = self.link.within_unless_blocked("publishing", confirmation).await?;
        if let Ok(Confirmation::Ack(_) | Confirmation::Nack(_)) = &confirmation {
            // Its confirm (and return, which comes before it) is in: nothing
            // of this publish can reach the next one on the channel.
            if let Some(lent) = exclusive.as_mut() {
                lent.settled();
            }
        }
        match confirmation {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(returned))) => Err(rejected(format!(
                "unroutable: `{exchange}` has no queue bound for this routing key ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Confirmation::Nack(_)) => Err(rejected("the broker did not accept it (negative confirm)".to_owned())),
            // The channel's fault, not the message's.
            Ok(Confirmation::NotRequested) => Err(TransportError::Unavailable(
                "the channel was not in confirm mode".into(),
            )),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {
                // An exchange went away after it was checked, and the broker
                // closed the channel: every publish waiting on it gets this
                // error, not only the one to the missing exchange. So not a
                // refusal (a relay would hold each of them for a lease): the
                // exchange is checked again on the next publish to it, which
                // refuses only that one (`UnknownAddress`).
                self.forget(exchange);
                Err(unavailable(e))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    pub(crate) fn close(&self) {
        self.in_flight.close();
        self.exclusive.close();
    }
}

/// A confirm-mode channel and the largest frame its connection negotiated.
#[derive(Clone)]
struct Open {
    channel: Channel,
    frame_max: u32,
    /// Taken by each publish on the channel while it is numbered and
    /// queued (see [`in_order`]).
    order: Arc<std::sync::Mutex<()>>,
}

/// A channel lent to one `mandatory` publish. Back among the idle ones once
/// its publish has settled (a confirm came, or nothing was sent); otherwise
/// (an error, a timeout, a publish abandoned midway) closed, since a late
/// confirm or return of its publish would reach the next one.
struct Exclusive<'a> {
    open: Open,
    settled: bool,
    idle: &'a std::sync::Mutex<Vec<Open>>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Exclusive<'_> {
    fn open(&self) -> Open {
        self.open.clone()
    }

    fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let open = self.open.clone();
        if !open.channel.status().connected() {
            return;
        }
        if self.settled {
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(open);
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = open.channel.close(200, "a publish on it was abandoned".into()).await;
            });
        }
    }
}

/// Runs `publish` (lapin's `basic_publish`) with its first poll under the
/// channel's `order` lock.
///
/// A confirm is matched to its publish by number: lapin numbers a publish
/// (its delivery tag) and queues its frames in the first poll, each under a
/// lock of its own. Two publishes on one channel from two threads could
/// take their numbers in one order and reach the broker in the other, and
/// each would then be told the other's confirm: a refused message reported
/// accepted, which a relay marks sent and so loses. With both steps in one
/// poll under one lock, numbers follow the wire order. (The test
/// `concurrent_publishes_on_one_channel_each_get_their_own_confirm` saw
/// 126 of 4,000 publishes told another's confirm without it.)
async fn in_order<F: Future>(order: &std::sync::Mutex<()>, publish: F) -> F::Output {
    let mut publish = std::pin::pin!(publish);
    let mut first = true;
    std::future::poll_fn(|cx| {
        if std::mem::take(&mut first) {
            let _numbering = order.lock().unwrap_or_else(PoisonError::into_inner);
            return publish.as_mut().poll(cx);
        }
        publish.as_mut().poll(cx)
    })
    .await
}

/// The framing around a content header's properties: frame type, channel,
/// payload size and end marker (8), class, weight and body size (12).
const HEADER_FRAME_OVERHEAD: usize = 8 + 12;

/// The largest measuring buffer a thread keeps between messages.
const SCRATCH_KEPT: usize = 64 * 1024;

thread_local! {
    /// Reused by [`header_frame_size`], so measuring allocates nothing.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The bytes of the content header frame that carries `properties`, as
/// lapin writes it (the broker refuses frames above `frame_max`).
pub(crate) fn header_frame_size(properties: &BasicProperties) -> usize {
    SCRATCH.with(|scratch| {
        let mut buffer = std::mem::take(&mut *scratch.borrow_mut());
        buffer.clear();
        let serialized = cookie_factory::gen_simple(lapin::protocol::basic::gen_properties(properties), buffer);
        match serialized {
            Ok(buffer) => {
                let size = HEADER_FRAME_OVERHEAD + buffer.len();
                // Kept for the next message, unless an outsized one grew it.
                if buffer.capacity() <= SCRATCH_KEPT {
                    *scratch.borrow_mut() = buffer;
                }
                size
            }
            // Writing to a Vec does not fail; if it did, lapin would fail the same way.
            Err(_) => usize::MAX,
        }
    })
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    use super::*;

    /// The size by the AMQP 0-9-1 grammar: framing (8), class, weight and
    /// body size (12), property flags (2), then the one property set.
    #[test]
    fn a_header_frame_is_measured_byte_for_byte() {
        assert_eq!(header_frame_size(&BasicProperties::default()), 8 + 12 + 2);
        let with_type = BasicProperties::default().with_type(ShortString::from("Kind"));
        assert_eq!(header_frame_size(&with_type), 8 + 12 + 2 + 1 + 4);
        for length in [0_usize, 1, 4_000, 70_000] {
            let mut table = FieldTable::default();
            table.insert(
                ShortString::from("k"),
                AMQPValue::LongString(LongString::from(vec![b'x'; length])),
            );
            let with_header = BasicProperties::default().with_headers(table);
            // Table length (4), key (1 + 1), type tag (1), string length (4).
            assert_eq!(header_frame_size(&with_header), 8 + 12 + 2 + 4 + 2 + 1 + 4 + length);
        }
    }
}
