//! Steady `CreateOrder` load over real gRPC: one call every `1 / rate`
//! seconds, round-robin over the targets, a few at once, each bounded by a
//! timeout. It records which orders the service acknowledged and how the
//! other calls failed; whether a failed call's order was stored anyway is
//! for the ledger to find out in the database.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, OrderItem};
use saga_core::CancellationToken;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::Channel;

use crate::harness::eventually;

/// Calls open at once, at most.
const IN_FLIGHT: usize = 8;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The user every order of the suite belongs to.
pub const USER: &str = "faults";

/// What the load saw so far.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    /// Orders the service acknowledged (`CreateOrder` OK), by id.
    pub accepted: Vec<String>,
    /// Failed calls, by gRPC code.
    pub failed: BTreeMap<String, usize>,
}

impl Calls {
    /// Failed calls with `code`.
    pub fn failed_with(&self, code: tonic::Code) -> usize {
        self.failed.get(&format!("{code:?}")).copied().unwrap_or(0)
    }

    /// All failed calls.
    pub fn failures(&self) -> usize {
        self.failed.values().sum()
    }
}

/// The basket of the `n`-th order.
pub type Basket = fn(u64) -> Vec<OrderItem>;

/// Load running in the background.
pub struct Load {
    calls: Arc<Mutex<Calls>>,
    basket: Basket,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    bursts: JoinSet<()>,
}

impl Load {
    /// Starts placing `per_second` orders a second, spread over `targets`.
    pub fn start(targets: Vec<Channel>, per_second: u32, basket: Basket) -> Self {
        assert!(!targets.is_empty() && per_second > 0, "load needs a target and a rate");
        let calls = Arc::new(Mutex::new(Calls::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(generate(
            targets,
            Duration::from_secs(1) / per_second,
            basket,
            calls.clone(),
            stop.clone(),
        ));
        Self {
            calls,
            basket,
            stop,
            task: Some(task),
            bursts: JoinSet::new(),
        }
    }

    /// Sends `count` more calls to `target` at once, besides the steady
    /// load (e.g. so that some are in flight when a fault strikes).
    pub fn burst(&mut self, target: &Channel, count: usize) {
        for n in 0..count {
            let request = CreateOrderRequest {
                user_id: USER.to_owned(),
                items: (self.basket)(u64::try_from(n).unwrap_or(0)),
            };
            self.bursts.spawn(place(
                OrderServiceClient::new(target.clone()),
                request,
                self.calls.clone(),
            ));
        }
    }

    /// What was seen so far.
    pub fn calls(&self) -> Calls {
        self.calls.lock().expect("not poisoned").clone()
    }

    /// Waits until `count` more orders than now are acknowledged.
    pub async fn wait_for_accepted(&self, count: usize, patience: Duration) {
        let target = self.calls().accepted.len() + count;
        eventually(&format!("{count} more orders accepted"), patience, || async {
            (self.calls().accepted.len() >= target).then_some(())
        })
        .await;
    }

    /// Waits until `count` more calls than now failed with `code`.
    pub async fn wait_for_failures(&self, code: tonic::Code, count: usize, patience: Duration) {
        let target = self.calls().failed_with(code) + count;
        eventually(
            &format!("{count} more calls failing with {code:?}"),
            patience,
            || async { (self.calls().failed_with(code) >= target).then_some(()) },
        )
        .await;
    }

    /// Stops placing orders, waits for the calls in flight, and returns everything seen.
    pub async fn stop(mut self) -> Calls {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        while self.bursts.join_next().await.is_some() {}
        self.calls()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn generate(
    targets: Vec<Channel>,
    every: Duration,
    basket: Basket,
    calls: Arc<Mutex<Calls>>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = JoinSet::new();
    for n in 0u64.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let index = usize::try_from(n).unwrap_or(0) % targets.len();
        let client = OrderServiceClient::new(targets[index].clone());
        let calls = calls.clone();
        let request = CreateOrderRequest {
            user_id: USER.to_owned(),
            items: basket(n),
        };
        open.spawn(async move {
            place(client, request, calls).await;
            drop(permit);
        });
        // Reap finished calls as we go.
        while open.try_join_next().is_some() {}
    }
    while open.join_next().await.is_some() {}
}

/// One `CreateOrder` call, its outcome recorded in `calls`.
async fn place(mut client: OrderServiceClient<Channel>, request: CreateOrderRequest, calls: Arc<Mutex<Calls>>) {
    let outcome = tokio::time::timeout(CALL_TIMEOUT, client.create_order(request)).await;
    let mut calls = calls.lock().expect("not poisoned");
    match outcome {
        Ok(Ok(response)) => match response.into_inner().order {
            Some(order) => calls.accepted.push(order.id),
            None => *calls.failed.entry("NoOrderInResponse".to_owned()).or_default() += 1,
        },
        Ok(Err(status)) => *calls.failed.entry(format!("{:?}", status.code())).or_default() += 1,
        Err(_) => *calls.failed.entry("ClientTimeout".to_owned()).or_default() += 1,
    }
}
