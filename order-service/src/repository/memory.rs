use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use saga_core::memory::InMemoryTransaction;
use saga_core::{EffectHandler, SagaId, SagaInstance, SagaStore, StepError, Transaction};

use super::{OrderRepository, RepositoryError};
use crate::domain::{Order, OrderId, UserId};
use crate::saga::OrderEffect;

/// The orders table of embedded mode: a map next to the
/// [`InMemoryStore`](saga_core::memory::InMemoryStore), written by the order
/// saga's effects when (and only when) the saga transition commits.
/// Nothing survives the process.
#[derive(Clone, Default)]
pub struct InMemoryOrders {
    orders: Arc<RwLock<HashMap<OrderId, Order>>>,
}

impl InMemoryOrders {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many orders the table holds.
    pub fn len(&self) -> usize {
        self.orders.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn contains(&self, id: OrderId) -> bool {
        self.orders.read().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }

    fn apply(orders: &RwLock<HashMap<OrderId, Order>>, effects: Vec<OrderEffect>) {
        // Writers never panic while holding the lock, so a poisoned map is still consistent.
        let mut orders = orders.write().unwrap_or_else(|p| p.into_inner());
        for effect in effects {
            match effect {
                OrderEffect::Insert(order) => {
                    // Refused before the commit (see `apply` below); never overwrite.
                    orders.entry(order.id).or_insert(order);
                }
                OrderEffect::SetStatus(id, status) => match orders.get_mut(&id) {
                    Some(order) => order.status = status,
                    None => {
                        tracing::error!(order_id = %id, %status, "status change for an order that was never stored")
                    }
                },
            }
        }
    }
}

#[async_trait]
impl EffectHandler<OrderEffect> for InMemoryOrders {
    async fn apply(
        &self,
        tx: &mut dyn Transaction,
        _saga: &SagaInstance,
        effects: Vec<OrderEffect>,
    ) -> Result<(), StepError> {
        let tx = tx
            .backend()
            .downcast_mut::<InMemoryTransaction>()
            .ok_or_else(|| StepError::terminal("the in-memory orders table needs the in-memory saga store"))?;
        // An order is placed once, as the table's primary key ensures in
        // production: a retry whose finished saga retention forgot must not
        // start it again. (While its saga is held, the commit refuses the
        // second start: `AlreadyStarted`.)
        for effect in &effects {
            if let OrderEffect::Insert(order) = effect
                && self.contains(order.id)
                && matches!(tx.store().load(SagaId::from_uuid(*order.id.as_uuid())).await, Ok(None))
            {
                return Err(StepError::terminal(format!(
                    "order {} exists already; its finished saga was forgotten",
                    order.id
                )));
            }
        }
        let orders = Arc::clone(&self.orders);
        tx.on_commit(move || Self::apply(&orders, effects));
        Ok(())
    }
}

#[async_trait]
impl OrderRepository for InMemoryOrders {
    async fn get(&self, id: OrderId, owner: &UserId) -> Result<Option<Order>, RepositoryError> {
        let orders = self.orders.read().unwrap_or_else(|p| p.into_inner());
        Ok(orders.get(&id).filter(|order| order.is_owned_by(owner)).cloned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use saga_core::memory::InMemoryStore;
    use saga_core::{EngineError, Message, SagaId, SagaStatus};

    use super::*;
    use crate::domain::{OrderItem, OrderStatus, UserId};
    use crate::saga::{ORDER_SAGA, OrderSagaConfig, OrderSagaData, order_saga};
    use crate::wire::{STOCK_UPDATE_RESULT, StockUpdateResult};

    fn engine(store: &InMemoryStore, orders: &InMemoryOrders) -> saga_core::Engine {
        let definition = order_saga(&OrderSagaConfig::default()).expect("well formed");
        saga_core::Engine::builder(Arc::new(store.clone()))
            .register_with_effects(definition, orders.clone())
            .build()
            .expect("engine")
    }

    fn order() -> Order {
        let items = vec![OrderItem::parse("apple".to_owned(), 1, 2.5).expect("valid")];
        Order::place(OrderId::new(), UserId::parse("alice").expect("valid"), items).expect("valid")
    }

    fn reply(order_id: String, success: bool) -> Message {
        let body = StockUpdateResult {
            order_id,
            success,
            reason: None,
        };
        Message::json(STOCK_UPDATE_RESULT, "stock_update_exchange", &body).expect("JSON")
    }

    #[tokio::test]
    async fn the_order_row_commits_with_the_saga_and_follows_it() {
        let (store, orders) = (InMemoryStore::new(), InMemoryOrders::new());
        let engine = engine(&store, &orders);
        let order = order();
        let saga = SagaId::from_uuid(*order.id.as_uuid());
        engine
            .start_with_id(ORDER_SAGA, saga, OrderSagaData::new(order.clone()))
            .await
            .expect("started");
        assert_eq!(
            orders.get(order.id, &order.user_id).await.expect("read"),
            Some(order.clone())
        );
        let stranger = UserId::parse("mallory").expect("a user id");
        assert_eq!(
            orders.get(order.id, &stranger).await.expect("read"),
            None,
            "only its owner's"
        );

        // The reply carries no correlation id: the order id in the body finds the saga.
        let handled = engine
            .handle(&reply(order.id.to_string(), true))
            .await
            .expect("handled");
        assert_eq!(
            handled,
            saga_core::Handled::Applied {
                saga,
                status: SagaStatus::Completed
            }
        );
        let stored = orders
            .get(order.id, &order.user_id)
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(stored.status, OrderStatus::Confirmed);
    }

    #[tokio::test]
    async fn starting_the_same_order_twice_stores_it_once() {
        let (store, orders) = (InMemoryStore::new(), InMemoryOrders::new());
        let engine = engine(&store, &orders);
        let order = order();
        let saga = SagaId::from_uuid(*order.id.as_uuid());
        let data = OrderSagaData::new(order.clone());
        engine
            .start_with_id(ORDER_SAGA, saga, data.clone())
            .await
            .expect("started");
        let again = engine.start_with_id(ORDER_SAGA, saga, data).await;
        assert!(matches!(again, Err(EngineError::AlreadyStarted { .. })), "{again:?}");
        assert_eq!(orders.len(), 1);
        assert_eq!(store.unsent(), 1, "one OrderCreated in the outbox");
    }

    #[tokio::test]
    async fn a_reply_for_an_unknown_order_is_refused() {
        let (store, orders) = (InMemoryStore::new(), InMemoryOrders::new());
        let engine = engine(&store, &orders);
        let unknown = engine.handle(&reply(OrderId::new().to_string(), true)).await;
        assert!(matches!(unknown, Err(EngineError::UnknownSaga { .. })), "{unknown:?}");
        assert!(orders.is_empty());
    }
}
