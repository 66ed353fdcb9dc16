//! `order-cli`: a small client of the order service — place an order, read
//! it, watch it until stock decides it.
//!
//! ```text
//! order-cli create --user alice --item apple:2:10.25 --item book:1:12 [--idempotency-key K]
//! order-cli get <ORDER_ID> --user alice
//! order-cli watch <ORDER_ID> --user alice [--timeout 30s]
//! ```
//!
//! [`Cli`] is the parsed command line; [`run`] executes it, printing to any
//! writer, so tests run it in-process.

use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use order_service::config::parse_duration;
use order_service::proto::order_service_client::OrderServiceClient;
use order_service::proto::{CreateOrderRequest, GetOrderRequest, Order, OrderItem, OrderStatus};
use tonic::transport::Channel;

/// The order service's address when `--addr` is not given.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50054";

/// How long connecting and each call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "order-cli", version, about = "A client of the order service")]
pub struct Cli {
    /// The order service's gRPC address.
    #[arg(long, global = true, env = "ORDER_SERVICE_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Place an order; prints it (PENDING) with its id.
    Create {
        /// The user placing the order.
        #[arg(long)]
        user: String,
        /// An item as `PRODUCT:QUANTITY:PRICE`, e.g. `apple:2:10.25`; repeat for more.
        #[arg(long = "item", required = true)]
        items: Vec<ItemArg>,
        /// Sent as `idempotency-key` metadata: a retry with the same key returns the same order.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Print an order.
    Get {
        /// The order id.
        order_id: String,
        /// Its owner.
        #[arg(long)]
        user: String,
    },
    /// Poll an order until it is CONFIRMED or CANCELLED, printing each status change.
    Watch {
        /// The order id.
        order_id: String,
        /// Its owner.
        #[arg(long)]
        user: String,
        /// Give up after this long (e.g. `30s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
        /// Time between polls.
        #[arg(long, default_value = "250ms", value_parser = parse_duration)]
        interval: Duration,
    },
}

/// One `--item PRODUCT:QUANTITY:PRICE`.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemArg {
    /// The product id (may itself contain `:`).
    pub product_id: String,
    /// Units, at least 1.
    pub quantity: i32,
    /// Unit price: finite, not negative.
    pub price: f64,
}

impl FromStr for ItemArg {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let usage = || format!("`{value}` is not PRODUCT:QUANTITY:PRICE (e.g. apple:2:10.25)");
        let (rest, price) = value.rsplit_once(':').ok_or_else(usage)?;
        let (product_id, quantity) = rest.rsplit_once(':').ok_or_else(usage)?;
        if product_id.trim().is_empty() {
            return Err(format!("`{value}`: the product id is empty"));
        }
        let quantity: i32 = quantity
            .trim()
            .parse()
            .ok()
            .filter(|q| *q >= 1)
            .ok_or_else(|| format!("`{value}`: the quantity must be a whole number of at least 1"))?;
        let price: f64 = price
            .trim()
            .parse()
            .ok()
            .filter(|p: &f64| p.is_finite() && *p >= 0.0)
            .ok_or_else(|| format!("`{value}`: the price must be a number of at least 0"))?;
        Ok(Self {
            product_id: product_id.to_owned(),
            quantity,
            price,
        })
    }
}

/// Why a command failed. Each is printed as one line; the process exits non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// `--addr` is not a URI: give e.g. `http://127.0.0.1:50054`.
    #[error("--addr `{addr}` is not a valid address (expected e.g. {DEFAULT_ADDR})")]
    InvalidAddress {
        /// What was given.
        addr: String,
    },
    /// Nothing answers at the address: start the order service (`cargo run -p order-service`).
    #[error("cannot reach the order service at {addr}: {source}; is it running? (`cargo run -p order-service`)")]
    Unreachable {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The service refused the call: read its message.
    #[error("the order service answered {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// The idempotency key cannot travel as gRPC metadata (printable ASCII only).
    #[error("--idempotency-key must be printable ASCII")]
    InvalidKey,
    /// The service answered without an order (a broken server).
    #[error("the order service answered without an order")]
    MissingOrder,
    /// `watch` gave up: the order is still undecided.
    #[error("order {order_id} is still {status} after {timeout:?}")]
    Timeout {
        /// The order.
        order_id: String,
        /// Its last status.
        status: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Runs `cli`, printing to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let mut client = connect(&cli.addr).await?;
    match cli.command {
        CliCommand::Create {
            user,
            items,
            idempotency_key,
        } => {
            let mut request = tonic::Request::new(CreateOrderRequest {
                user_id: user,
                items: items
                    .into_iter()
                    .map(|i| OrderItem {
                        product_id: i.product_id,
                        quantity: i.quantity,
                        price: i.price,
                    })
                    .collect(),
            });
            if let Some(key) = idempotency_key {
                let value = key.parse().map_err(|_| CliError::InvalidKey)?;
                request.metadata_mut().insert("idempotency-key", value);
            }
            let order = client.create_order(request).await?.into_inner().order;
            print_order(out, &order.ok_or(CliError::MissingOrder)?)?;
        }
        CliCommand::Get { order_id, user } => {
            let order = get(&mut client, &order_id, &user).await?;
            print_order(out, &order)?;
        }
        CliCommand::Watch {
            order_id,
            user,
            timeout,
            interval,
        } => {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last: Option<OrderStatus> = None;
            loop {
                let order = get(&mut client, &order_id, &user).await?;
                let status = order.status();
                if last != Some(status) {
                    writeln!(out, "{}  {}", order.id, status.as_str_name())?;
                    out.flush()?;
                    last = Some(status);
                }
                if matches!(status, OrderStatus::Confirmed | OrderStatus::Cancelled) {
                    print_order(out, &order)?;
                    return Ok(());
                }
                if tokio::time::Instant::now() + interval > deadline {
                    return Err(CliError::Timeout {
                        order_id,
                        status: status.as_str_name().to_owned(),
                        timeout,
                    });
                }
                tokio::time::sleep(interval).await;
            }
        }
    }
    Ok(())
}

async fn connect(addr: &str) -> Result<OrderServiceClient<Channel>, CliError> {
    let endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|_| CliError::InvalidAddress { addr: addr.to_owned() })?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|source| CliError::Unreachable {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(OrderServiceClient::new(channel))
}

async fn get(client: &mut OrderServiceClient<Channel>, order_id: &str, user: &str) -> Result<Order, CliError> {
    let request = GetOrderRequest {
        order_id: order_id.to_owned(),
        user_id: user.to_owned(),
    };
    client
        .get_order(request)
        .await?
        .into_inner()
        .order
        .ok_or(CliError::MissingOrder)
}

/// Prints `order`: a header line, then one line per item.
pub fn print_order(out: &mut (dyn Write + Send), order: &Order) -> std::io::Result<()> {
    writeln!(
        out,
        "order {}  user {}  status {}  total {:.2}",
        order.id,
        order.user_id,
        order.status().as_str_name(),
        order.total_price
    )?;
    for item in &order.items {
        writeln!(out, "  {} x{} @ {}", item.product_id, item.quantity, item.price)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_parsed() {
        assert_eq!(
            "p1:2:10.25".parse::<ItemArg>(),
            Ok(ItemArg {
                product_id: "p1".into(),
                quantity: 2,
                price: 10.25
            })
        );
        assert_eq!(
            "sku:42:3:0".parse::<ItemArg>().map(|i| i.product_id),
            Ok("sku:42".into())
        );
        for bad in [
            "p1", "p1:2", ":2:1", "p1:0:1", "p1:-1:1", "p1:x:1", "p1:2:-1", "p1:2:NaN", "p1:2:inf",
        ] {
            assert!(bad.parse::<ItemArg>().is_err(), "{bad}");
        }
    }
}
