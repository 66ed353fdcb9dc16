//! Application writes carried in the transition's own statement.
//!
//! [`connection`](crate::connection) opens a database transaction: `BEGIN`,
//! one round trip per application statement, the saga's statement, `COMMIT`.
//! A [`StagedWrite`] instead travels inside the saga's single statement as
//! one more data-modifying CTE: the transition costs one round trip however
//! many writes it stages, and they commit or roll back with it. If the
//! saga's part does not apply (a stale revision, a message consumed before)
//! the statement raises and nothing is written, the staged writes included.

use saga_core::{StoreError, Transaction};
use sqlx::Postgres;

use crate::transaction::{PgBatched, PgWritten, PostgresTransaction};

/// One bound value, which can be bound again: to a transition's own
/// statement, or to a statement shared by several (group commit), and to
/// its own statement after a shared one failed.
trait Bound: Send + Sync {
    fn bind_alone(&self, query: PgWritten) -> PgWritten;
    fn bind_batched(&self, query: PgBatched) -> PgBatched;
}

impl<T> Bound for T
where
    T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Clone + Send + Sync + 'static,
{
    fn bind_alone(&self, query: PgWritten) -> PgWritten {
        query.bind(self.clone())
    }

    fn bind_batched(&self, query: PgBatched) -> PgBatched {
        query.bind(self.clone())
    }
}

/// One `INSERT`, `UPDATE` or `DELETE` on the application's tables, written
/// in the saga's commit statement (see [`stage`]).
///
/// The SQL numbers its parameters from `$1`, as if it ran alone; they are
/// renumbered to follow the saga's. It must be a single data-modifying
/// statement that PostgreSQL accepts in a `WITH` clause, without
/// dollar-quoted strings. Writes of one statement do not see each other's
/// rows (they share a snapshot); foreign keys between them are checked at
/// its end, so a parent and its children may be staged together.
///
/// ```
/// use saga_postgres::StagedWrite;
///
/// let write = StagedWrite::new("UPDATE orders SET status = $2 WHERE id = $1")
///     .bind(uuid::Uuid::nil())
///     .bind("CONFIRMED");
/// assert_eq!(write.parameters(), 2);
/// ```
pub struct StagedWrite {
    sql: String,
    binders: Vec<Box<dyn Bound>>,
}

impl StagedWrite {
    /// A write of `sql`, parameters bound next, in order.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            binders: Vec::new(),
        }
    }

    /// Binds the next parameter. The value is cloned when bound: a write
    /// whose shared statement failed is bound again to a statement of its own.
    #[must_use]
    pub fn bind<T>(mut self, value: T) -> Self
    where
        T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Clone + Send + Sync + 'static,
    {
        self.binders.push(Box::new(value));
        self
    }

    /// The parameters bound so far.
    pub fn parameters(&self) -> usize {
        self.binders.len()
    }

    /// The write as a CTE named `name`, its parameters numbered from
    /// `offset + 1`.
    pub(crate) fn cte(&self, name: &str, offset: usize) -> String {
        format!("{name} AS ({})", renumber(&self.sql, offset))
    }

    /// The SQL as written, before renumbering.
    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// Binds the write's parameters after those bound to `query` already.
    pub(crate) fn bind_to(&self, query: PgWritten) -> PgWritten {
        self.binders.iter().fold(query, |query, value| value.bind_alone(query))
    }

    /// Binds the write's parameters to a shared statement.
    pub(crate) fn bind_to_batch(&self, query: PgBatched) -> PgBatched {
        self.binders
            .iter()
            .fold(query, |query, value| value.bind_batched(query))
    }
}

impl std::fmt::Debug for StagedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SQL only: bound values may be personal data.
        f.debug_struct("StagedWrite")
            .field("sql", &self.sql)
            .field("parameters", &self.binders.len())
            .finish()
    }
}

/// Stages `write` in `tx`, a saga transaction on PostgreSQL: it is written by
/// the transition's commit statement, atomically with the saga's rows. Use
/// it from an `EffectHandler` or a participant's `CommandHandler` instead of
/// [`connection`](crate::connection) when the writes need not read anything
/// back. Once [`connection`](crate::connection) was asked for, staged writes
/// run in that transaction's statement all the same.
///
/// [`StoreError::Backend`] if `tx` is not a [`PostgresTransaction`].
pub fn stage(tx: &mut dyn Transaction, write: StagedWrite) -> Result<(), StoreError> {
    match tx.backend().downcast_mut::<PostgresTransaction>() {
        Some(tx) => {
            tx.stage(write);
            Ok(())
        }
        None => Err(StoreError::Backend(
            "the transaction is not a PostgresTransaction".into(),
        )),
    }
}

/// `sql` with each parameter `$n` outside quotes turned into `$(n + offset)`.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                match digits.parse::<usize>() {
                    Ok(n) => out.push_str(&format!("${}", n + offset)),
                    Err(_) => {
                        out.push('$');
                        out.push_str(&digits);
                    }
                }
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_saga_s_and_quoted_text_is_left_alone() {
        assert_eq!(
            renumber("UPDATE t SET a = $1, b = '$2', \"c$3\" = $3::int WHERE id = $12", 40),
            "UPDATE t SET a = $41, b = '$2', \"c$3\" = $43::int WHERE id = $52"
        );
        assert_eq!(renumber("SELECT 'it''s $1', $1", 2), "SELECT 'it''s $1', $3");
    }

    #[test]
    fn bound_values_stay_out_of_debug_output() {
        let write = StagedWrite::new("UPDATE t SET secret = $1").bind("hunter2".to_owned());
        let shown = format!("{write:?}");
        assert!(shown.contains("UPDATE t") && !shown.contains("hunter2"), "{shown}");
    }
}
