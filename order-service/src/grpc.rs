//! The gRPC edge: decodes requests, parses them into domain values (wire
//! doubles become exact [`Money`](crate::domain::Money) here, once), calls
//! [`Orders`], and maps [`OrderError`] to a `tonic::Status` in one place.
//! Generated code stays in this module and [`crate::proto`].

use std::time::Instant;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::domain::{IdempotencyKey, InvalidInput, MAX_ITEMS, Order, OrderId, OrderItem, OrderStatus, UserId};
use crate::orders::{OrderError, Orders};
use crate::proto;
use crate::proto::order_service_server::{OrderService, OrderServiceServer};
use crate::telemetry;

mod codec;
pub use codec::{RequestCodec, RequestDecoder};

/// The request metadata entry that makes `CreateOrder` idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// `order.OrderService` over [`Orders`].
#[derive(Clone)]
pub struct OrderGrpc {
    orders: Orders,
}

impl OrderGrpc {
    /// The service, ready to add to a tonic server.
    pub fn server(orders: Orders) -> OrderServiceServer<Self> {
        OrderServiceServer::new(Self { orders })
    }

    async fn create(&self, request: Request<proto::CreateOrderRequest>) -> Result<proto::Order, OrderError> {
        let key = idempotency_key(request.metadata())?;
        let request = request.into_inner();
        let user = UserId::parse(request.user_id)?;
        if request.items.len() > MAX_ITEMS {
            return Err(InvalidInput::new(
                "items",
                format_args!("must contain at most {MAX_ITEMS} items (got {})", request.items.len()),
            )
            .into());
        }
        let items = request
            .items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                OrderItem::parse(item.product_id, item.quantity, item.price)
                    .map_err(|e| e.within(&format!("items[{index}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let order = self.orders.place(user, items, key).await?;
        Ok(to_proto(&order))
    }

    async fn get(&self, request: Request<proto::GetOrderRequest>) -> Result<proto::Order, OrderError> {
        let request = request.into_inner();
        let user = UserId::parse(request.user_id)?;
        let id: OrderId = request.order_id.parse()?;
        let order = self.orders.get(id, &user).await?;
        Ok(to_proto(&order))
    }
}

#[tonic::async_trait]
impl OrderService for OrderGrpc {
    async fn create_order(
        &self,
        request: Request<proto::CreateOrderRequest>,
    ) -> Result<Response<proto::CreateOrderResponse>, Status> {
        let started = Instant::now();
        let span = telemetry::grpc_span("CreateOrder", request.metadata());
        let result = self
            .create(request)
            .instrument(span.clone())
            .await
            .map_err(Status::from);
        observe("CreateOrder", &span, &result, started);
        result.map(|order| Response::new(proto::CreateOrderResponse { order: Some(order) }))
    }

    async fn get_order(
        &self,
        request: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::GetOrderResponse>, Status> {
        let started = Instant::now();
        let span = telemetry::grpc_span("GetOrder", request.metadata());
        let result = self.get(request).instrument(span.clone()).await.map_err(Status::from);
        observe("GetOrder", &span, &result, started);
        result.map(|order| Response::new(proto::GetOrderResponse { order: Some(order) }))
    }
}

fn observe<T>(method: &'static str, span: &tracing::Span, result: &Result<T, Status>, started: Instant) {
    let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
    telemetry::grpc_request(method, code, started.elapsed());
    span.record("rpc.grpc.status_code", code as i32);
    let _entered = span.enter();
    if let Err(status) = result
        && matches!(code, tonic::Code::Internal | tonic::Code::Unavailable)
    {
        tracing::warn!(method, code = ?code, message = status.message(), "request failed");
    }
}

/// The wire status of every error, in one place.
impl From<OrderError> for Status {
    fn from(error: OrderError) -> Self {
        match error {
            OrderError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            OrderError::NotFound(_) => Status::not_found(error.to_string()),
            OrderError::IdempotencyKeyReused => Status::invalid_argument(error.to_string()),
            OrderError::Starting => Status::unavailable(
                "the order service is starting and waiting for its database (PostgreSQL); try again shortly",
            ),
            OrderError::Unavailable(_) => {
                tracing::warn!(error = %error, "store unavailable");
                Status::unavailable("the order database (PostgreSQL) is unavailable; try again later")
            }
            other => {
                tracing::error!(error = %other, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

fn idempotency_key(metadata: &MetadataMap) -> Result<Option<IdempotencyKey>, InvalidInput> {
    let Some(value) = metadata.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| InvalidInput::new(IDEMPOTENCY_KEY, "must be printable ASCII"))?;
    IdempotencyKey::parse(text).map(Some)
}

fn to_proto(order: &Order) -> proto::Order {
    proto::Order {
        id: order.id.to_string(),
        user_id: order.user_id.to_string(),
        items: order
            .items
            .iter()
            .map(|item| proto::OrderItem {
                product_id: item.product_id.to_string(),
                // Bounded by MAX_QUANTITY when parsed.
                quantity: i32::try_from(item.quantity.get()).unwrap_or(i32::MAX),
                price: item.price.to_f64(),
            })
            .collect(),
        total_price: order.total.to_f64(),
        status: match order.status {
            OrderStatus::Pending => proto::OrderStatus::Pending,
            OrderStatus::Confirmed => proto::OrderStatus::Confirmed,
            OrderStatus::Cancelled => proto::OrderStatus::Cancelled,
        } as i32,
    }
}
