use std::fmt;

/// Input that does not make a valid domain value. `field` names the offending
/// field as the API spells it (`user_id`, `items[2].price`); reject the
/// request with it (gRPC `INVALID_ARGUMENT`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    /// The field, as a path from the request root.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidInput {
    /// `field` is invalid because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// The same error one level down: `within("items[2]")` turns `price` into `items[2].price`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}
