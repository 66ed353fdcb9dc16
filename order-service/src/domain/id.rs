use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::InvalidInput;

/// Longest user id, product id or idempotency key accepted, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Namespace for order ids derived from an idempotency key (UUIDv5).
const IDEMPOTENT_ORDER_NAMESPACE: Uuid = Uuid::from_u128(0x3f1e_8a52_7c0d_4b9e_a6d3_51c2_e07b_9a14);

/// Identifies an order; it doubles as the id of the order's saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    /// A fresh, time-ordered id (UUIDv7).
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id an order placed by `user` under idempotency `key` always gets,
    /// so a retry finds the order the first attempt created.
    pub fn for_idempotency_key(user: &UserId, key: &IdempotencyKey) -> Self {
        // Length-prefixing the user id keeps ("a", "bc") and ("ab", "c") apart.
        let name = format!("{}:{}:{}", user.0.len(), user.0, key.0);
        Self(Uuid::new_v5(&IDEMPOTENT_ORDER_NAMESPACE, name.as_bytes()))
    }

    /// Wraps a UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = InvalidInput;

    /// Parses a UUID in any of its textual forms; the error names `order_id`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(InvalidInput::new("order_id", "must not be empty"));
        }
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidInput::new("order_id", "must be a UUID"))
    }
}

/// Checks an identifier-like string: non-blank, bounded, no control characters.
fn parse_identifier(field: &str, value: String) -> Result<String, InvalidInput> {
    if value.trim().is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    let chars = value.chars().count();
    if chars > MAX_ID_CHARS {
        return Err(InvalidInput::new(
            field,
            format_args!("must be at most {MAX_ID_CHARS} characters (got {chars})"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidInput::new(field, "must not contain control characters"));
    }
    Ok(value)
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Parses a `", $field, "`: non-blank, at most 128 characters, no control characters.")]
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidInput> {
                parse_identifier($field, value.into()).map(Self)
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

identifier!(
    /// The user who places and owns an order (issued by the platform's identity service).
    UserId,
    "user_id"
);
identifier!(
    /// A product in the catalogue (owned by the product service).
    ProductId,
    "product_id"
);
identifier!(
    /// A client-chosen key that makes retries of one `CreateOrder` create one order.
    IdempotencyKey,
    "idempotency-key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_non_blank_bounded_and_printable() {
        assert!(UserId::parse("u-1").is_ok());
        assert_eq!(UserId::parse("").expect_err("invalid").field, "user_id");
        assert_eq!(UserId::parse("   ").expect_err("invalid").field, "user_id");
        assert_eq!(
            ProductId::parse("x".repeat(129)).expect_err("invalid").field,
            "product_id"
        );
        assert!(ProductId::parse("é".repeat(128)).is_ok());
        assert!(ProductId::parse("a\nb").is_err());
    }

    #[test]
    fn order_ids_parse_uuids_only() {
        let id = OrderId::new();
        assert_eq!(id.to_string().parse::<OrderId>(), Ok(id));
        assert_eq!("nope".parse::<OrderId>().expect_err("invalid").field, "order_id");
        assert_eq!("".parse::<OrderId>().expect_err("invalid").reason, "must not be empty");
    }

    #[test]
    fn idempotent_ids_depend_on_user_and_key() {
        let key = IdempotencyKey::parse("k-1").expect("valid");
        let alice = UserId::parse("alice").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        assert_eq!(
            OrderId::for_idempotency_key(&alice, &key),
            OrderId::for_idempotency_key(&alice, &key)
        );
        assert_ne!(
            OrderId::for_idempotency_key(&alice, &key),
            OrderId::for_idempotency_key(&bob, &key)
        );
        let (a, bc) = (
            UserId::parse("a").expect("valid"),
            IdempotencyKey::parse("bc").expect("valid"),
        );
        let (ab, c) = (
            UserId::parse("ab").expect("valid"),
            IdempotencyKey::parse("c").expect("valid"),
        );
        assert_ne!(
            OrderId::for_idempotency_key(&a, &bc),
            OrderId::for_idempotency_key(&ab, &c)
        );
    }
}
