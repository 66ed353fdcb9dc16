//! The demo stock service of embedded mode: a stand-in for the platform's
//! product service, written as a saga-core [`Participant`](saga_core::Participant).
//! It reserves all items of an `OrderCreated` or none, answers with
//! `StockUpdateResult`, releases a reservation on `OrderCancelled`, and keeps
//! it on `OrderConfirmed`. Its catalogue lives in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use saga_core::memory::InMemoryTransaction;
use saga_core::{Command, CommandHandler, Message, StepError, Transaction};

use crate::wire::{
    ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_CREATED, OrderCancelled, OrderConfirmed, OrderCreated, STOCK_UPDATE_RESULT,
    StockUpdateResult,
};

/// The catalogue embedded mode starts with: product id → units in stock.
pub const DEMO_CATALOGUE: &[(&str, u32)] = &[
    ("apple", 100),
    ("banana", 100),
    ("coffee", 50),
    ("book", 20),
    ("laptop", 5),
];

#[derive(Default)]
struct Shelves {
    stock: HashMap<String, u32>,
    /// Order id → what it holds, until the order is confirmed or cancelled.
    reservations: HashMap<String, Vec<(String, u32)>>,
}

/// The demo stock service's command handler. Run it behind a participant
/// consumer with concurrency 1: checks and reservations of one command are
/// then never interleaved with another's.
#[derive(Clone)]
pub struct DemoStock {
    shelves: Arc<Mutex<Shelves>>,
    reply_to: String,
}

impl DemoStock {
    /// A stock service holding `catalogue`, replying to `reply_to` (the stock update exchange).
    pub fn new<'a>(catalogue: impl IntoIterator<Item = &'a (&'a str, u32)>, reply_to: impl Into<String>) -> Self {
        let stock = catalogue
            .into_iter()
            .map(|(id, units)| ((*id).to_owned(), *units))
            .collect();
        Self {
            shelves: Arc::new(Mutex::new(Shelves {
                stock,
                reservations: HashMap::new(),
            })),
            reply_to: reply_to.into(),
        }
    }

    /// Units of `product` in stock (not reserved).
    pub fn in_stock(&self, product: &str) -> u32 {
        self.shelves().stock.get(product).copied().unwrap_or(0)
    }

    fn shelves(&self) -> MutexGuard<'_, Shelves> {
        self.shelves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why `order` cannot be reserved in full, if it cannot.
    fn shortage(&self, order: &OrderCreated) -> Option<String> {
        let shelves = self.shelves();
        let mut wanted: HashMap<&str, u64> = HashMap::new();
        for item in &order.items {
            *wanted.entry(item.product_id.as_str()).or_default() += u64::from(item.quantity);
        }
        let mut products: Vec<_> = wanted.into_iter().collect();
        products.sort();
        products
            .into_iter()
            .find_map(|(product, quantity)| match shelves.stock.get(product) {
                None => Some(format!("unknown product `{product}`")),
                Some(&units) if u64::from(units) < quantity => Some(format!(
                    "insufficient stock for `{product}`: {units} left, {quantity} wanted"
                )),
                Some(_) => None,
            })
    }

    fn on_commit(tx: &mut dyn Transaction, hook: impl FnOnce() + Send + 'static) -> Result<(), StepError> {
        tx.backend()
            .downcast_mut::<InMemoryTransaction>()
            .ok_or_else(|| StepError::terminal("the demo stock service needs the in-memory store"))?
            .on_commit(hook);
        Ok(())
    }
}

#[async_trait]
impl CommandHandler for DemoStock {
    async fn handle(&self, tx: &mut dyn Transaction, command: &Message) -> Result<Vec<Command>, StepError> {
        match command.kind.as_str() {
            ORDER_CREATED => {
                let order: OrderCreated = command.decode()?;
                // Held already: the order's command sent again (an
                // operator's retry sends it under a new id), answered again.
                let held = self.shelves().reservations.contains_key(&order.order_id);
                let shortage = if held { None } else { self.shortage(&order) };
                if !held && shortage.is_none() {
                    let shelves = Arc::clone(&self.shelves);
                    let order = order.clone();
                    Self::on_commit(tx, move || {
                        let mut shelves = shelves.lock().unwrap_or_else(|p| p.into_inner());
                        if shelves.reservations.contains_key(&order.order_id) {
                            return;
                        }
                        let mut held = Vec::new();
                        for item in &order.items {
                            if let Some(units) = shelves.stock.get_mut(&item.product_id) {
                                *units = units.saturating_sub(item.quantity);
                                held.push((item.product_id.clone(), item.quantity));
                            }
                        }
                        shelves.reservations.insert(order.order_id.clone(), held);
                    })?;
                }
                tracing::info!(order_id = %order.order_id, reserved = shortage.is_none(), reason = ?shortage, "demo stock answered");
                let result = StockUpdateResult {
                    order_id: order.order_id,
                    success: shortage.is_none(),
                    reason: shortage,
                };
                Ok(vec![Command::json(STOCK_UPDATE_RESULT, &self.reply_to, &result)?])
            }
            ORDER_CANCELLED => {
                let cancelled: OrderCancelled = command.decode()?;
                let shelves = Arc::clone(&self.shelves);
                Self::on_commit(tx, move || {
                    let mut shelves = shelves.lock().unwrap_or_else(|p| p.into_inner());
                    for (product, units) in shelves.reservations.remove(&cancelled.order_id).unwrap_or_default() {
                        *shelves.stock.entry(product).or_default() += units;
                    }
                })?;
                Ok(Vec::new())
            }
            ORDER_CONFIRMED => {
                let confirmed: OrderConfirmed = command.decode()?;
                let shelves = Arc::clone(&self.shelves);
                Self::on_commit(tx, move || {
                    let mut shelves = shelves.lock().unwrap_or_else(|p| p.into_inner());
                    shelves.reservations.remove(&confirmed.order_id);
                })?;
                Ok(Vec::new())
            }
            other => Err(StepError::terminal(format!(
                "the demo stock service does not handle `{other}`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use saga_core::SagaStore;
    use saga_core::memory::InMemoryStore;

    use super::*;
    use crate::wire::OrderCreatedItem;

    #[tokio::test]
    async fn an_order_s_command_sent_again_under_a_new_id_reserves_once() {
        let stock = DemoStock::new(&[("apple", 10)], "replies");
        let store = InMemoryStore::new();
        let order = OrderCreated {
            order_id: "order-1".to_owned(),
            user_id: "alice".to_owned(),
            total_price: 3.0,
            items: vec![OrderCreatedItem {
                product_id: "apple".to_owned(),
                quantity: 3,
                price: 1.0,
            }],
        };
        for _ in 0..2 {
            // A new message id each time, as an operator's retry sends it.
            let command = Message::json(ORDER_CREATED, "orders", &order).expect("JSON");
            let mut tx = store.begin().await.expect("begin");
            let replies = stock.handle(tx.as_mut(), &command).await.expect("handled");
            tx.commit().await.expect("committed");
            let reply: StockUpdateResult = serde_json::from_slice(&replies[0].payload).expect("a reply");
            assert!(reply.success, "{reply:?}");
        }
        assert_eq!(stock.in_stock("apple"), 7, "reserved once");
    }
}
