//! The application layer: placing and reading orders, whatever the transport
//! or the storage. One error enum, [`OrderError`], mapped to the wire status
//! by the gRPC layer.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::{Engine, EngineError, SagaId};

use crate::domain::{IdempotencyKey, InvalidInput, Order, OrderId, OrderItem, UserId};
use crate::repository::{OrderRepository, RepositoryError};
use crate::saga::{ORDER_SAGA, OrderSagaData};
use crate::telemetry;

/// Why an order could not be placed or read. Each variant says what the
/// caller should do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The request is malformed: fix the named field (`INVALID_ARGUMENT`).
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// No such order for this user (`NOT_FOUND`; never reveals whether the id
    /// exists for someone else).
    #[error("order {0} not found")]
    NotFound(String),
    /// The idempotency key was used before for a different order: use a new
    /// key (`INVALID_ARGUMENT`, naming `idempotency-key`).
    #[error("idempotency-key: was already used for a different order")]
    IdempotencyKeyReused,
    /// The service is starting and its database is not ready yet: retry
    /// shortly (`UNAVAILABLE`).
    #[error("the service is starting: the order database is not ready yet")]
    Starting,
    /// The store is unreachable: retry later (`UNAVAILABLE`).
    #[error("the order store is unavailable, try again later: {0}")]
    Unavailable(#[source] saga_core::BoxError),
    /// A bug or corrupt data: nothing to do but report it (`INTERNAL`).
    #[error("internal error: {0}")]
    Internal(#[source] saga_core::BoxError),
}

impl From<RepositoryError> for OrderError {
    fn from(error: RepositoryError) -> Self {
        match error {
            RepositoryError::Unavailable(_) => Self::Unavailable(Box::new(error)),
            _ => Self::Internal(Box::new(error)),
        }
    }
}

impl From<EngineError> for OrderError {
    fn from(error: EngineError) -> Self {
        if error.is_retryable() {
            Self::Unavailable(Box::new(error))
        } else {
            Self::Internal(Box::new(error))
        }
    }
}

/// How long a call may wait for the database. The server ends slow
/// statements and lock waits sooner (see the service's session limits);
/// this catches a database that stops answering altogether (a failover
/// that drops packets): the caller gets `UNAVAILABLE`, not a hang. An order
/// placed in that time may still commit; a retry with the same
/// idempotency key returns it.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(6);

/// `call`'s result, or [`OrderError::Unavailable`] past [`ANSWER_WITHIN`].
async fn answered<T>(call: impl Future<Output = Result<T, OrderError>>) -> Result<T, OrderError> {
    tokio::time::timeout(ANSWER_WITHIN, call).await.unwrap_or_else(|_| {
        Err(OrderError::Unavailable(
            format!("the order database did not answer within {ANSWER_WITHIN:?}").into(),
        ))
    })
}

/// Places and reads orders.
#[derive(Clone)]
pub struct Orders {
    engine: Engine,
    repository: Arc<dyn OrderRepository>,
    open: Arc<AtomicBool>,
}

impl Orders {
    /// Orders run by `engine` (with the order saga registered) and read from `repository`.
    pub fn new(engine: Engine, repository: Arc<dyn OrderRepository>) -> Self {
        Self {
            engine,
            repository,
            open: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Like [`new`](Self::new), but every call fails with
    /// [`OrderError::Starting`] until the returned flag is set (once the
    /// database is reachable and migrated).
    pub fn closed(engine: Engine, repository: Arc<dyn OrderRepository>) -> (Self, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        let orders = Self {
            engine,
            repository,
            open: Arc::clone(&open),
        };
        (orders, open)
    }

    fn check_open(&self) -> Result<(), OrderError> {
        if self.open.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(OrderError::Starting)
        }
    }

    /// Places an order: stores it `PENDING` and starts its saga, in one
    /// transaction. With an idempotency key, a retry returns the order the
    /// first attempt placed (as it stands now) and starts nothing.
    pub async fn place(
        &self,
        user: UserId,
        items: Vec<OrderItem>,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<Order, OrderError> {
        self.check_open()?;
        answered(self.place_now(user, items, idempotency_key)).await
    }

    async fn place_now(
        &self,
        user: UserId,
        items: Vec<OrderItem>,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<Order, OrderError> {
        let id = idempotency_key
            .as_ref()
            .map_or_else(OrderId::new, |key| OrderId::for_idempotency_key(&user, key));
        let order = Order::place(id, user, items)?;
        let saga = SagaId::from_uuid(*id.as_uuid());
        match self
            .engine
            .start_with_id(ORDER_SAGA, saga, OrderSagaData::new(order.clone()))
            .await
        {
            Ok(_) => {
                telemetry::saga_started();
                tracing::info!(order_id = %id, user_id = %order.user_id, total = %order.total, "order placed");
                Ok(order)
            }
            // A retry: the saga exists, or only its order does (retention
            // purged the finished saga, and the order row refused the new
            // one: the table's key in production, the effect in memory).
            Err(error @ (EngineError::AlreadyStarted { .. } | EngineError::Store(_) | EngineError::Effects(_)))
                if idempotency_key.is_some() =>
            {
                let Some(existing) = self.repository.get(id, &order.user_id).await? else {
                    return Err(match error {
                        EngineError::AlreadyStarted { .. } => {
                            OrderError::Internal(format!("order {id} has a saga but no order row").into())
                        }
                        error => error.into(),
                    });
                };
                if existing.user_id != order.user_id || existing.items != order.items {
                    return Err(OrderError::IdempotencyKeyReused);
                }
                tracing::info!(order_id = %id, "idempotent retry; returning the existing order");
                Ok(existing)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The order `id`, if `user` owns it.
    pub async fn get(&self, id: OrderId, user: &UserId) -> Result<Order, OrderError> {
        self.check_open()?;
        answered(async { Ok(self.repository.get(id, user).await?) })
            .await?
            .ok_or_else(|| OrderError::NotFound(id.to_string()))
    }
}
