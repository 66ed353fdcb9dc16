use std::fmt;
use std::iter::Sum;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::InvalidInput;

/// An amount of money in the platform's single currency, held exactly as a
/// decimal. Prices arrive as binary `double`s on the wire: they are converted
/// once, at the edge, to the shortest decimal that reads back as the same
/// `double` (so `10.1` is exactly 10.1), and sums are computed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Money(Decimal);

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// The largest unit price accepted.
    pub const MAX_PRICE: Money = Money(Decimal::from_parts(1_000_000_000, 0, 0, false, 0));

    /// Converts a wire `double` into an exact unit price: finite, at least zero,
    /// at most [`MAX_PRICE`](Self::MAX_PRICE). The error names `field`.
    pub fn from_price(value: f64, field: &str) -> Result<Self, InvalidInput> {
        if value.is_nan() {
            return Err(InvalidInput::new(field, "must be a number (got NaN)"));
        }
        if value.is_infinite() {
            return Err(InvalidInput::new(field, "must be finite"));
        }
        if value < 0.0 {
            return Err(InvalidInput::new(
                field,
                format_args!("must not be negative (got {value})"),
            ));
        }
        if value == 0.0 {
            // Also folds -0.0 into zero.
            return Ok(Self::ZERO);
        }
        // Rust prints the shortest decimal that round-trips, never in exponent form.
        let decimal =
            Decimal::from_str(&value.to_string()).map_err(|_| InvalidInput::new(field, "has too many digits"))?;
        let money = Self(decimal.normalize());
        if money == Self::ZERO {
            // Below the 28 decimal places kept: rounded to nothing, it
            // would sell for free.
            return Err(InvalidInput::new(
                field,
                format_args!("is too small to keep exactly (got {value})"),
            ));
        }
        if money > Self::MAX_PRICE {
            return Err(InvalidInput::new(
                field,
                format_args!("must be at most {}", Self::MAX_PRICE),
            ));
        }
        Ok(money)
    }

    /// The nearest `double`, for the wire (responses and JSON messages).
    pub fn to_f64(self) -> f64 {
        // Parsing the exact decimal text rounds correctly, unlike scaling by hand.
        self.0.to_string().parse().unwrap_or(f64::NAN)
    }

    /// `self × quantity`, or `None` on overflow.
    pub fn checked_mul(self, quantity: u32) -> Option<Money> {
        self.0
            .checked_mul(Decimal::from(quantity))
            .map(|d| Money(d.normalize()))
    }

    /// `self + other`, or `None` on overflow.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(|d| Money(d.normalize()))
    }

    /// The exact decimal.
    pub fn as_decimal(&self) -> Decimal {
        self.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'a> Sum<&'a Money> for Option<Money> {
    fn sum<I: Iterator<Item = &'a Money>>(mut iter: I) -> Self {
        iter.try_fold(Money::ZERO, |acc, m| acc.checked_add(*m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(value: f64) -> Money {
        Money::from_price(value, "price").expect("valid price")
    }

    #[test]
    fn prices_convert_to_the_decimal_the_client_meant() {
        assert_eq!(price(10.25).to_string(), "10.25");
        assert_eq!(price(0.1).to_string(), "0.1");
        assert_eq!(price(19.99).to_string(), "19.99");
        assert_eq!(price(-0.0), Money::ZERO);
        assert_eq!(price(1e-7).to_string(), "0.0000001");
        assert_eq!(price(1_000_000_000.0), Money::MAX_PRICE);
    }

    #[test]
    fn sums_are_exact_where_floats_are_not() {
        let total: Option<Money> = [price(0.1), price(0.2)].iter().sum();
        assert_eq!(total.map(|t| t.to_string()), Some("0.3".to_owned()));
        assert_ne!(0.1 + 0.2, 0.3);
        assert_eq!(total.map(Money::to_f64), Some(0.3));
        assert_eq!(price(10.25).checked_mul(2).map(Money::to_f64), Some(20.5));
    }

    #[test]
    fn bad_prices_are_rejected_naming_the_field() {
        for bad in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.01,
            1e9 + 1.0,
            1e300,
            1e-30,
            f64::MIN_POSITIVE,
        ] {
            let error = Money::from_price(bad, "items[2].price").expect_err("invalid price");
            assert_eq!(error.field, "items[2].price", "{bad}");
        }
    }

    #[test]
    fn wire_doubles_round_trip() {
        for value in [0.0, 0.01, 0.3, 10.25, 123.456, 999_999_999.99, 0.30000000000000004] {
            assert_eq!(price(value).to_f64(), value);
        }
    }
}
