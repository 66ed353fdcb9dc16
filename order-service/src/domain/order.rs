use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{InvalidInput, Money, OrderId, ProductId, UserId};

/// Most items one order may have.
pub const MAX_ITEMS: usize = 100;
/// Largest quantity of one item.
pub const MAX_QUANTITY: u32 = 10_000;

/// How many units of a product: 1 to [`MAX_QUANTITY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    /// Parses a wire `int32`; the error names `quantity`.
    pub fn parse(value: i32) -> Result<Self, InvalidInput> {
        match u32::try_from(value) {
            Ok(q) if (1..=MAX_QUANTITY).contains(&q) => Ok(Self(q)),
            _ if value < 1 => Err(InvalidInput::new(
                "quantity",
                format_args!("must be at least 1 (got {value})"),
            )),
            _ => Err(InvalidInput::new(
                "quantity",
                format_args!("must be at most {MAX_QUANTITY} (got {value})"),
            )),
        }
    }

    /// The count.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// One line of an order: a product, how many, and the unit price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    /// The product.
    pub product_id: ProductId,
    /// How many.
    pub quantity: Quantity,
    /// The unit price.
    pub price: Money,
}

impl OrderItem {
    /// Parses one item from its wire fields; errors name `product_id`, `quantity` or `price`.
    pub fn parse(product_id: String, quantity: i32, price: f64) -> Result<Self, InvalidInput> {
        Ok(Self {
            product_id: ProductId::parse(product_id)?,
            quantity: Quantity::parse(quantity)?,
            price: Money::from_price(price, "price")?,
        })
    }

    /// `price × quantity`, exactly (`None` only past the decimal range, which
    /// the bounds on price and quantity rule out).
    pub fn line_total(&self) -> Option<Money> {
        self.price.checked_mul(self.quantity.get())
    }
}

/// Where an order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Placed; stock not yet reserved.
    Pending,
    /// Stock reserved: the order stands.
    Confirmed,
    /// Stock could not be reserved (or no answer came in time).
    Cancelled,
}

impl OrderStatus {
    /// The stable upper-case name used in storage (`PENDING`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`OrderStatus`]'s (a corrupt row).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown order status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for OrderStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(Self::Pending),
            "CONFIRMED" => Ok(Self::Confirmed),
            "CANCELLED" => Ok(Self::Cancelled),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// An order: who placed it, what, the exact total, and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id (also its saga's id).
    pub id: OrderId,
    /// Who placed and owns it.
    pub user_id: UserId,
    /// What was ordered, in request order (1 to [`MAX_ITEMS`]).
    pub items: Vec<OrderItem>,
    /// The exact sum of price × quantity over the items.
    pub total: Money,
    /// Where it stands.
    pub status: OrderStatus,
}

impl Order {
    /// A new `PENDING` order with its total computed. Errors name `items`.
    pub fn place(id: OrderId, user_id: UserId, items: Vec<OrderItem>) -> Result<Self, InvalidInput> {
        if items.is_empty() {
            return Err(InvalidInput::new("items", "must contain at least one item"));
        }
        if items.len() > MAX_ITEMS {
            return Err(InvalidInput::new(
                "items",
                format_args!("must contain at most {MAX_ITEMS} items (got {})", items.len()),
            ));
        }
        let total = items
            .iter()
            .try_fold(Money::ZERO, |sum, item| sum.checked_add(item.line_total()?))
            .ok_or_else(|| InvalidInput::new("items", "the total price is too large"))?;
        Ok(Self {
            id,
            user_id,
            items,
            total,
            status: OrderStatus::Pending,
        })
    }

    /// Whether `user` owns the order.
    pub fn is_owned_by(&self, user: &UserId) -> bool {
        &self.user_id == user
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product: &str, quantity: i32, price: f64) -> OrderItem {
        OrderItem::parse(product.to_owned(), quantity, price).expect("valid item")
    }

    #[test]
    fn quantities_are_bounded() {
        assert_eq!(Quantity::parse(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::parse(10_000).map(Quantity::get), Ok(10_000));
        for bad in [0, -1, i32::MIN, 10_001, i32::MAX] {
            assert_eq!(Quantity::parse(bad).expect_err("invalid").field, "quantity");
        }
    }

    #[test]
    fn placing_an_order_computes_the_exact_total() {
        let user = UserId::parse("alice").expect("valid user");
        let order = Order::place(
            OrderId::new(),
            user.clone(),
            vec![item("apple", 3, 0.1), item("pear", 2, 10.25)],
        )
        .expect("valid order");
        assert_eq!(order.total.to_string(), "20.8");
        assert_eq!(order.status, OrderStatus::Pending);
        assert!(order.is_owned_by(&user));
    }

    #[test]
    fn an_order_needs_items_but_not_too_many() {
        let user = UserId::parse("alice").expect("valid user");
        let none = Order::place(OrderId::new(), user.clone(), vec![]).expect_err("no items");
        assert_eq!(none.field, "items");
        let many = vec![item("a", 1, 1.0); MAX_ITEMS + 1];
        assert_eq!(
            Order::place(OrderId::new(), user, many).expect_err("too many").field,
            "items"
        );
    }

    #[test]
    fn the_largest_order_still_totals_exactly() {
        let user = UserId::parse("alice").expect("valid user");
        let items = vec![item("a", MAX_QUANTITY as i32, 999_999_999.99); MAX_ITEMS];
        let order = Order::place(OrderId::new(), user, items).expect("valid order");
        assert_eq!(order.total.to_string(), "999999999990000");
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in [OrderStatus::Pending, OrderStatus::Confirmed, OrderStatus::Cancelled] {
            assert_eq!(status.as_str().parse::<OrderStatus>(), Ok(status));
        }
    }
}
