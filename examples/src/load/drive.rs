//! Offering orders and seeing them finish: `CreateOrder` over gRPC, and the
//! order service's `OrderConfirmed` / `OrderCancelled` events consumed from
//! queues of the run's own, matched by order id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, OrderItem};
use saga_core::{CancellationToken, Settlement, Subscription};
use serde::Deserialize;
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use uuid::Uuid;

/// How a saga ended, as its event said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// `OrderConfirmed`.
    Confirmed,
    /// `OrderCancelled`.
    Cancelled,
}

/// An order sent and not yet seen finished.
struct Waiting {
    sent: Instant,
    done: Option<oneshot::Sender<Outcome>>,
}

#[derive(Default)]
struct Tally {
    waiting: HashMap<String, Waiting>,
    /// Events seen before their `CreateOrder` answer arrived.
    early: HashMap<String, (Outcome, Instant)>,
    latencies_us: Vec<u64>,
    answer_latencies_us: Vec<u64>,
    /// Each confirmed order, in the form the run reports it: a long run
    /// keeps one per saga, in this process beside the services it measures,
    /// so no second copy is made at its end (and no string per order).
    confirmations: Vec<Confirmation>,
    /// Both clocks read as the run began, to tell whether the system clock
    /// was stepped during it.
    began: SystemClock,
    confirmed: u64,
    cancelled: u64,
    last_completion: Option<Instant>,
}

/// Places instants on the system clock (the services' clock) through a
/// reading of both, taken anew for each saga as it is recorded: a VM's
/// system clock can be stepped during a run, and a reading taken once
/// would shift every later saga's legs by the step (runs here showed
/// sent -> start decided at 150 ms), not only the sagas in flight across it.
struct SystemClock {
    at: Instant,
    unix_ms: f64,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::now()
    }
}

impl SystemClock {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            unix_ms: unix_ms(SystemTime::now()),
        }
    }

    /// How far the system clock moved against the monotonic one since
    /// `earlier`, in milliseconds (0 when nobody stepped it).
    fn moved_since(&self, earlier: &SystemClock) -> f64 {
        let wall = self.unix_ms - earlier.unix_ms;
        let monotonic = self.at.saturating_duration_since(earlier.at).as_secs_f64() * 1000.0;
        wall - monotonic
    }

    fn unix_ms_at(&self, at: Instant) -> f64 {
        let (ahead, ago) = (
            at.saturating_duration_since(self.at),
            self.at.saturating_duration_since(at),
        );
        self.unix_ms + (ahead.as_secs_f64() - ago.as_secs_f64()) * 1000.0
    }
}

/// Matches events to the orders sent, and records latencies.
#[derive(Default)]
pub(crate) struct Tracker {
    tally: Mutex<Tally>,
    changed: Notify,
}

/// What one run saw.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// Orders accepted by `CreateOrder`.
    pub sent: u64,
    /// `CreateOrder` calls that failed.
    pub errors: u64,
    /// Sagas seen confirmed.
    pub confirmed: u64,
    /// Sagas seen cancelled.
    pub cancelled: u64,
    /// Orders accepted whose event was not seen within the drain timeout.
    pub unobserved: u64,
    /// Open loop: orders scheduled that were neither accepted nor refused,
    /// because no call slot came free before the run gave up or their call
    /// was still open then: the slowest orders of an overloaded run.
    pub unsent: u64,
    /// From the first send to the last completion seen.
    pub elapsed: Duration,
    /// Create → confirmed, microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Create → `CreateOrder` answered (the saga started and committed),
    /// microseconds, sorted.
    pub answer_latencies_us: Vec<u64>,
    /// Each confirmed order: when it was sent and its event seen, in Unix
    /// milliseconds (the services' clock), for the run's legs.
    pub confirmations: Vec<Confirmation>,
    /// How far the system clock moved against the monotonic clock during
    /// the run, ms: a VM's clock can be stepped (e.g. around a snapshot),
    /// and the legs of sagas in flight across a step are off by it.
    pub system_clock_step_ms: f64,
}

/// When the load generator sent one order and saw it confirmed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Confirmation {
    pub order_id: Uuid,
    pub sent_ms: f64,
    pub seen_ms: f64,
}

impl Tracker {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // A panic while holding the lock leaves plain counters behind; keep going.
        self.tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets everything (between runs).
    fn reset(&self) {
        *self.tally() = Tally::default();
    }

    fn record(tally: &mut Tally, id: String, sent: Instant, outcome: Outcome, at: Instant) {
        match outcome {
            Outcome::Confirmed => {
                tally.confirmed += 1;
                tally.latencies_us.push(micros_between(sent, at));
                // The order service's ids are UUIDs; another would only
                // leave its saga out of the legs.
                if let Ok(order_id) = Uuid::parse_str(&id) {
                    let clock = SystemClock::now();
                    let confirmation = Confirmation {
                        order_id,
                        sent_ms: clock.unix_ms_at(sent),
                        seen_ms: clock.unix_ms_at(at),
                    };
                    tally.confirmations.push(confirmation);
                }
            }
            Outcome::Cancelled => tally.cancelled += 1,
        }
        tally.last_completion = Some(tally.last_completion.map_or(at, |last| last.max(at)));
    }

    /// Order `id`, sent at `sent`, was accepted at `answered`; `done` hears
    /// how it ended.
    fn register(&self, id: String, sent: Instant, answered: Instant, done: Option<oneshot::Sender<Outcome>>) {
        let mut tally = self.tally();
        tally.answer_latencies_us.push(micros_between(sent, answered));
        if let Some((outcome, at)) = tally.early.remove(&id) {
            Self::record(&mut tally, id, sent, outcome, at);
            if let Some(done) = done {
                let _ = done.send(outcome);
            }
        } else {
            tally.waiting.insert(id, Waiting { sent, done });
        }
        drop(tally);
        self.changed.notify_waiters();
    }

    /// The event for order `id` arrived at `at`.
    fn observe(&self, id: String, outcome: Outcome, at: Instant) {
        let mut tally = self.tally();
        if let Some(waiting) = tally.waiting.remove(&id) {
            Self::record(&mut tally, id, waiting.sent, outcome, at);
            if let Some(done) = waiting.done {
                let _ = done.send(outcome);
            }
        } else if tally.early.len() < 1_000_000 {
            // Not answered yet (or a redelivery, or an order of an earlier run).
            tally.early.insert(id, (outcome, at));
        }
        drop(tally);
        self.changed.notify_waiters();
    }

    /// Waits until every accepted order has been seen finished, or `deadline`.
    async fn drain(&self, deadline: Instant) {
        for _ in 0..10_000_000u64 {
            let changed = self.changed.notified();
            if self.tally().waiting.is_empty() || Instant::now() >= deadline {
                return;
            }
            // Woken by every event; re-checked at least every 100 ms.
            let wake = deadline.min(Instant::now() + Duration::from_millis(100));
            let _ = tokio::time::timeout_at(wake, changed).await;
        }
    }

    /// Sagas seen finished so far in this run.
    pub(crate) fn completed(&self) -> u64 {
        let tally = self.tally();
        tally.confirmed + tally.cancelled
    }

    /// What the run saw; its records move out (each is a figure per saga).
    fn take_seen(&self, started: Instant, sent: u64, errors: u64) -> Seen {
        let mut tally = self.tally();
        let mut latencies_us = std::mem::take(&mut tally.latencies_us);
        latencies_us.sort_unstable();
        let mut answer_latencies_us = std::mem::take(&mut tally.answer_latencies_us);
        answer_latencies_us.sort_unstable();
        let confirmations = std::mem::take(&mut tally.confirmations);
        let system_clock_step_ms = SystemClock::now().moved_since(&tally.began);
        Seen {
            sent,
            errors,
            confirmed: tally.confirmed,
            cancelled: tally.cancelled,
            unobserved: tally.waiting.len() as u64,
            unsent: 0,
            elapsed: tally
                .last_completion
                .map_or(Duration::ZERO, |last| last.saturating_duration_since(started)),
            latencies_us,
            answer_latencies_us,
            confirmations,
            system_clock_step_ms,
        }
    }
}

pub(crate) fn unix_ms(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

fn micros_between(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX)
}

/// The body fields the observer needs of `OrderConfirmed` / `OrderCancelled`.
#[derive(Deserialize)]
struct EventBody {
    order_id: String,
}

/// Consumes one event queue until `stop`, acking each event after noting it.
pub(crate) async fn observe(
    mut events: Box<dyn Subscription>,
    outcome: Outcome,
    tracker: Arc<Tracker>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = events.next() => next,
        };
        match next {
            None => return,
            Some(Err(error)) => {
                // The transport reconnects by itself; wait a little and go on.
                tracing::warn!(%error, "the event subscription failed; consuming again");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            Some(Ok(delivery)) => {
                let at = Instant::now();
                match delivery.message.decode::<EventBody>() {
                    Ok(body) => tracker.observe(body.order_id, outcome, at),
                    Err(error) => tracing::warn!(%error, "an event without an order id"),
                }
                let _ = delivery.settle.settle(Settlement::Ack).await;
            }
        }
    }
}

/// The clients placing orders.
#[derive(Clone)]
pub(crate) struct Orders {
    channels: Arc<Vec<Channel>>,
    products: Arc<Vec<String>>,
    next: Arc<AtomicU64>,
    tracker: Arc<Tracker>,
}

impl Orders {
    /// Orders over `channels` (round-robin) for `products` (round-robin).
    pub(crate) fn new(channels: Vec<Channel>, products: Vec<String>, tracker: Arc<Tracker>) -> Self {
        Self {
            channels: Arc::new(channels),
            products: Arc::new(products),
            next: Arc::new(AtomicU64::new(0)),
            tracker,
        }
    }

    /// Places one order; its id, or why not.
    async fn place(&self) -> Result<String, tonic::Status> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let pick = |len: usize| usize::try_from(n % len.max(1) as u64).unwrap_or(0);
        let channel = self.channels[pick(self.channels.len())].clone();
        let request = CreateOrderRequest {
            user_id: format!("load-user-{}", n % 1000),
            items: vec![OrderItem {
                product_id: self.products[pick(self.products.len())].clone(),
                quantity: 1,
                price: 9.99,
            }],
        };
        let response = OrderServiceClient::new(channel).create_order(request).await?;
        response
            .into_inner()
            .order
            .map(|order| order.id)
            .ok_or_else(|| tonic::Status::internal("CreateOrder answered without an order"))
    }

    /// Closed loop: `clients` each place an order and wait for its event
    /// before the next, for `duration` or `max_orders` orders.
    pub(crate) async fn closed(&self, clients: usize, duration: Duration, max_orders: u64, drain: Duration) -> Seen {
        self.tracker.reset();
        let started = Instant::now();
        let end = started + duration;
        let budget = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            let (orders, budget, sent, errors) = (self.clone(), budget.clone(), sent.clone(), errors.clone());
            tasks.spawn(async move {
                while Instant::now() < end && budget.fetch_add(1, Ordering::Relaxed) < max_orders {
                    let at = Instant::now();
                    match orders.place().await {
                        Ok(id) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            let (done, finished) = oneshot::channel();
                            orders.tracker.register(id, at, Instant::now(), Some(done));
                            // Not seen within the drain time: this client stops (counted unobserved).
                            if tokio::time::timeout(drain, finished).await.is_err() {
                                return;
                            }
                        }
                        Err(status) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                tracing::warn!(%status, "CreateOrder failed");
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            });
        }
        let _ = tokio::time::timeout_at(end + drain * 2, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
        self.tracker.drain(Instant::now() + drain).await;
        self.tracker
            .take_seen(started, sent.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
    }

    /// Open loop: orders at `rate` per second for `duration` (or `max_orders`),
    /// at most `clients` calls open at once; latency counts from each order's
    /// scheduled time.
    pub(crate) async fn open(
        &self,
        rate: f64,
        clients: usize,
        duration: Duration,
        max_orders: u64,
        drain: Duration,
    ) -> Seen {
        self.tracker.reset();
        let planned = (rate * duration.as_secs_f64()).ceil();
        let total = if (1.0..1e12).contains(&planned) {
            planned as u64
        } else {
            1
        }
        .min(max_orders);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let started = Instant::now();
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let open_calls = Arc::new(Semaphore::new(clients));
        let give_up = started + duration + drain;
        let mut tasks = JoinSet::new();
        for i in 0..total {
            let at = started + interval.mul_f64(i as f64);
            tokio::time::sleep_until(at).await;
            let Ok(Ok(permit)) = tokio::time::timeout_at(give_up, open_calls.clone().acquire_owned()).await else {
                break;
            };
            let (orders, sent, errors) = (self.clone(), sent.clone(), errors.clone());
            tasks.spawn(async move {
                let _permit = permit;
                match orders.place().await {
                    Ok(id) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        orders.tracker.register(id, at, Instant::now(), None);
                    }
                    Err(status) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            tracing::warn!(%status, "CreateOrder failed");
                        }
                    }
                }
            });
            // Reap finished calls as we go so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
        let _ = tokio::time::timeout_at(give_up, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
        self.tracker.drain(Instant::now() + drain).await;
        let (sent, errors) = (sent.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        Seen {
            unsent: total.saturating_sub(sent + errors),
            ..self.tracker.take_seen(started, sent, errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_match_orders_whichever_arrives_first() {
        let tracker = Tracker::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let [a, b, c] = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        tracker.register(a.to_string(), t0, t0 + ms(2), None);
        tracker.observe(a.to_string(), Outcome::Confirmed, t0 + ms(5));
        // The event before the CreateOrder answer.
        tracker.observe(b.to_string(), Outcome::Cancelled, t0 + ms(7));
        tracker.register(b.to_string(), t0, t0 + ms(8), None);
        tracker.register(c.to_string(), t0, t0 + ms(1), None);
        let seen = tracker.take_seen(t0, 3, 0);
        assert_eq!((seen.confirmed, seen.cancelled, seen.unobserved), (1, 1, 1));
        assert_eq!(seen.latencies_us, vec![5000]);
        assert_eq!(seen.answer_latencies_us, vec![1000, 2000, 8000], "every answer, sorted");
        assert_eq!(seen.elapsed, ms(7));
        let [only] = seen.confirmations.as_slice() else {
            panic!("one confirmation: {:?}", seen.confirmations);
        };
        assert_eq!(only.order_id, a);
        let between = only.seen_ms - only.sent_ms;
        assert!(
            (between - 5.0).abs() < 0.01,
            "5 ms apart on the system clock: {between}"
        );
    }

    #[test]
    fn a_saga_is_placed_on_the_system_clock_as_it_is_recorded() {
        let tracker = Tracker::default();
        let ms = Duration::from_millis;
        let id = Uuid::new_v4();
        let before = unix_ms(SystemTime::now());
        let seen_at = Instant::now();
        let sent_at = seen_at - ms(40);
        tracker.register(id.to_string(), sent_at, sent_at + ms(3), None);
        tracker.observe(id.to_string(), Outcome::Confirmed, seen_at);
        let after = unix_ms(SystemTime::now());
        let seen = tracker.take_seen(sent_at, 1, 0);
        let [only] = seen.confirmations.as_slice() else {
            panic!("one confirmation: {:?}", seen.confirmations);
        };
        // Seen between the two readings; sent 40 ms earlier.
        assert!(
            only.seen_ms <= after + 1.0 && only.seen_ms >= before - 1.0,
            "seen at {} between {before} and {after}",
            only.seen_ms
        );
        let between = only.seen_ms - only.sent_ms;
        assert!((between - 40.0).abs() < 0.01, "40 ms apart: {between}");
    }

    #[test]
    fn a_step_of_the_system_clock_is_what_it_moved_beyond_the_monotonic_one() {
        let ms = Duration::from_millis;
        let began = SystemClock::now();
        let later = |monotonic: Duration, wall: f64| SystemClock {
            at: began.at + monotonic,
            unix_ms: began.unix_ms + wall,
        };
        assert!(later(ms(500), 500.0).moved_since(&began).abs() < 1e-6, "no step");
        let stepped = later(ms(500), 650.0).moved_since(&began);
        assert!((stepped - 150.0).abs() < 1e-6, "stepped forward: {stepped}");
        let back = later(ms(500), 300.0).moved_since(&began);
        assert!((back + 200.0).abs() < 1e-6, "stepped back: {back}");
        let quiet = Tracker::default().take_seen(Instant::now(), 0, 0).system_clock_step_ms;
        assert!(quiet.abs() < 50.0, "a run nobody stepped the clock in: {quiet}");
    }
}
