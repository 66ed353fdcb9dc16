//! Application writes carried in the transition's own statement.
//!
//! [`connection`](crate::connection) opens a database transaction: `BEGIN`,
//! one round trip per application statement, the saga's statement, `COMMIT`.
//! A [`StagedWrite`] instead travels inside the saga's single statement as
//! one more data-modifying CTE: the transition costs one round trip however
//! many writes it stages, and they commit or roll back with it. If the
//! saga's part does not apply (a stale revision, a message consumed before)
//! the statement raises and nothing is written, the staged writes included.

use std::any::Any;

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

/// A bound column of a row-wise write (see [`StagedWrite::rows`]): an
/// array, one element per row, to which another write's column of the same
/// type can be appended.
trait Column: Bound {
    fn rows(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    /// This column followed by `more`; `None` if one of them holds another type.
    fn appended(&self, more: &[&dyn Column]) -> Option<Box<dyn Column>>;
}

impl<T> Column for Vec<T>
where
    Vec<T>: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres>,
    T: Clone + Send + Sync + 'static,
{
    fn rows(&self) -> usize {
        self.len()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn appended(&self, more: &[&dyn Column]) -> Option<Box<dyn Column>> {
        let mut all = self.clone();
        for column in more {
            all.extend_from_slice(column.as_any().downcast_ref::<Vec<T>>()?);
        }
        Some(Box::new(all))
    }
}

enum Parameter {
    Value(Box<dyn Bound>),
    Column(Box<dyn Column>),
}

impl Parameter {
    fn bound(&self) -> &dyn Bound {
        match self {
            Self::Value(value) => value.as_ref(),
            Self::Column(column) => column.as_ref(),
        }
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
///
/// Prefer [`rows`](Self::rows) for writes that many transitions make.
///
/// **Writes that change existing rows name them.** Under load, concurrent
/// transitions share one statement (group commit), and PostgreSQL applies
/// only one of two changes a statement makes to the same row, without an
/// error. So a transition whose staged writes `UPDATE` or `DELETE` (or
/// upsert) shares a statement only with transitions whose writes declare
/// other rows with [`touching`](Self::touching); one that declares none is
/// written alone, beside transitions that only insert or stage nothing.
/// Plain `INSERT`s need no declaration: two of one key in a statement fail
/// it, and each transition is then written alone.
pub struct StagedWrite {
    sql: String,
    parameters: Vec<Parameter>,
    row_wise: bool,
    /// Whether it may change existing rows (read off the SQL once).
    changes_rows: bool,
    /// The application rows it changes, as declared (see [`touching`](Self::touching)).
    touches: Vec<String>,
}

impl StagedWrite {
    /// A write of `sql`, parameters bound next, in order.
    pub fn new(sql: impl Into<String>) -> Self {
        let sql = sql.into();
        Self {
            changes_rows: changes_rows(&sql),
            sql,
            parameters: Vec::new(),
            row_wise: false,
            touches: Vec::new(),
        }
    }

    /// A row-wise write of `sql`: every parameter is a [`column`](Self::column)
    /// (an array, one element per row, all of one length), and the SQL writes
    /// each row as it would write it alone, typically `INSERT … SELECT … FROM
    /// UNNEST($1::uuid[], …)`.
    ///
    /// When transitions share a statement (group commit), their row-wise
    /// writes of the same SQL travel as one write holding all their rows.
    /// The statement's text then depends on which writes it carries, not on
    /// how many transitions: PostgreSQL plans it once per connection instead
    /// of once per statement (planning a shared statement costs more than
    /// executing it).
    ///
    /// Find the rows an `UPDATE` or `DELETE` touches by `= ANY($n)` rather
    /// than by joining the arrays: a generic plan guesses ten rows for an
    /// `UNNEST` of a parameter and, on a table that was small when planned,
    /// joins it to a sequential scan.
    ///
    /// ```
    /// use saga_postgres::StagedWrite;
    ///
    /// let write = StagedWrite::rows(
    ///     "UPDATE orders SET status = ($2::text[])[array_position($1::uuid[], id)] \
    ///      WHERE id = ANY($1::uuid[])",
    /// )
    /// .column(vec![uuid::Uuid::nil()])
    /// .column(vec!["CONFIRMED"]);
    /// assert_eq!(write.parameters(), 2);
    /// ```
    pub fn rows(sql: impl Into<String>) -> Self {
        Self {
            row_wise: true,
            ..Self::new(sql)
        }
    }

    /// Binds the next parameter. The value is cloned when bound: a write
    /// whose shared statement failed is bound again to a statement of its own.
    #[must_use]
    pub fn bind<T>(mut self, value: T) -> Self
    where
        T: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres> + Clone + Send + Sync + 'static,
    {
        self.parameters.push(Parameter::Value(Box::new(value)));
        self
    }

    /// Binds the next parameter as a column of a [`rows`](Self::rows)
    /// write: one element per row. (A write with any other parameter, or
    /// with columns of different lengths, is still written, but never
    /// merged with others.)
    #[must_use]
    pub fn column<T>(mut self, values: Vec<T>) -> Self
    where
        Vec<T>: for<'a> sqlx::Encode<'a, Postgres> + sqlx::Type<Postgres>,
        T: Clone + Send + Sync + 'static,
    {
        self.parameters.push(Parameter::Column(Box::new(values)));
        self
    }

    /// Declares an application row this write may change, by a name of the
    /// caller's choosing that is the same for every write of that row (say
    /// `"orders/<id>"`). Transitions whose writes change rows share a
    /// statement only if they declare different rows (see [`StagedWrite`]);
    /// declare every row the write may change, or none.
    #[must_use]
    pub fn touching(mut self, row: impl Into<String>) -> Self {
        self.touches.push(row.into());
        self
    }

    /// The parameters bound so far.
    pub fn parameters(&self) -> usize {
        self.parameters.len()
    }

    /// Whether it may change rows that exist (see [`changes_rows`]).
    pub(crate) fn changes_rows(&self) -> bool {
        self.changes_rows
    }

    /// The rows it declared it changes (see [`touching`](Self::touching)).
    pub(crate) fn touches(&self) -> &[String] {
        &self.touches
    }

    /// The SQL under which this write merges with others of it: a row-wise
    /// write whose parameters are all columns of one length.
    pub(crate) fn merges_as(&self) -> Option<&str> {
        let mut rows = self.parameters.iter().map(|parameter| match parameter {
            Parameter::Column(column) => Some(column.rows()),
            Parameter::Value(_) => None,
        });
        let first = rows.next()?;
        (self.row_wise && first.is_some() && rows.all(|n| n == first)).then_some(self.sql.as_str())
    }

    /// The row-wise writes `writes`, all merging as one SQL (see
    /// [`merges_as`](Self::merges_as)), as one write of all their rows;
    /// `None` if their columns' types differ.
    pub(crate) fn merged(writes: &[&StagedWrite]) -> Option<StagedWrite> {
        let (first, rest) = writes.split_first()?;
        if rest
            .iter()
            .any(|write| write.parameters.len() != first.parameters.len())
        {
            // Alone, the one with the wrong count fails; merged, it must too.
            return None;
        }
        let mut parameters = Vec::with_capacity(first.parameters.len());
        for (index, parameter) in first.parameters.iter().enumerate() {
            let Parameter::Column(column) = parameter else {
                return None;
            };
            let more = rest
                .iter()
                .map(|write| match write.parameters.get(index) {
                    Some(Parameter::Column(column)) => Some(column.as_ref()),
                    _ => None,
                })
                .collect::<Option<Vec<&dyn Column>>>()?;
            parameters.push(Parameter::Column(column.appended(&more)?));
        }
        Some(StagedWrite {
            sql: first.sql.clone(),
            parameters,
            row_wise: true,
            changes_rows: first.changes_rows,
            touches: writes.iter().flat_map(|write| write.touches.iter().cloned()).collect(),
        })
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
        self.parameters
            .iter()
            .fold(query, |query, parameter| parameter.bound().bind_alone(query))
    }

    /// Binds the write's parameters to a shared statement.
    pub(crate) fn bind_to_batch(&self, query: PgBatched) -> PgBatched {
        self.parameters
            .iter()
            .fold(query, |query, parameter| parameter.bound().bind_batched(query))
    }
}

impl std::fmt::Debug for StagedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The SQL only: bound values may be personal data.
        f.debug_struct("StagedWrite")
            .field("sql", &self.sql)
            .field("parameters", &self.parameters.len())
            .field("row_wise", &self.row_wise)
            .field("touches", &self.touches.len())
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

/// Whether `sql` may change rows that exist: anything but a plain
/// `INSERT` (an upsert's `DO UPDATE` changes the row it meets; a leading
/// comment or `WITH` counts as changing, to be safe).
fn changes_rows(sql: &str) -> bool {
    let mut words = sql.split_whitespace();
    let inserts = words.next().is_some_and(|first| first.eq_ignore_ascii_case("INSERT"));
    let mut previous = "";
    let upserts = words.any(|word| {
        let upsert = previous.eq_ignore_ascii_case("DO") && word.eq_ignore_ascii_case("UPDATE");
        previous = word;
        upsert
    });
    !inserts || upserts
}

/// Where [`renumber`] is in the SQL text.
#[derive(Clone, Copy, PartialEq)]
enum Lexed {
    Code,
    /// In `'…'` or `"…"` (a doubled quote leaves and re-enters).
    Quoted(char),
    /// In `E'…'`, where a backslash escapes the next character.
    Escaped,
    /// In `-- …` up to the line's end.
    LineComment,
    /// In `/* … */`, which nest.
    BlockComment(usize),
}

/// `sql` with each parameter `$n` in code (not in a string, a quoted
/// identifier or a comment) turned into `$(n + offset)`.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut state = Lexed::Code;
    // The character before, in code, and the one before it: `E'` opens an
    // escape string unless the `E` ends a word (`LIKE'x'`), and `$` after
    // an identifier character belongs to the identifier.
    let mut before: Option<char> = None;
    let mut before_that: Option<char> = None;
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
    while let Some(c) = chars.next() {
        out.push(c);
        let next = chars.peek().copied();
        state = match state {
            Lexed::Code => match c {
                '-' if next == Some('-') => Lexed::LineComment,
                '/' if next == Some('*') => {
                    out.push('*');
                    chars.next();
                    Lexed::BlockComment(1)
                }
                '\'' if matches!(before, Some('E' | 'e')) && !word(before_that) => Lexed::Escaped,
                '\'' | '"' => Lexed::Quoted(c),
                '$' if next.is_some_and(|d| d.is_ascii_digit()) && !word(before) => {
                    out.pop();
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
                    before_that = Some('$');
                    before = digits.chars().last();
                    continue;
                }
                _ => Lexed::Code,
            },
            Lexed::Quoted(q) if c == q => Lexed::Code,
            Lexed::Escaped if c == '\\' => {
                if let Some(escaped) = chars.next() {
                    out.push(escaped);
                }
                Lexed::Escaped
            }
            // A doubled quote is a quote, in escape strings too.
            Lexed::Escaped if c == '\'' && next == Some('\'') => {
                out.push('\'');
                chars.next();
                Lexed::Escaped
            }
            Lexed::Escaped if c == '\'' => Lexed::Code,
            Lexed::LineComment if c == '\n' => Lexed::Code,
            Lexed::BlockComment(depth) if c == '*' && next == Some('/') => {
                out.push('/');
                chars.next();
                if depth == 1 {
                    Lexed::Code
                } else {
                    Lexed::BlockComment(depth - 1)
                }
            }
            Lexed::BlockComment(depth) if c == '/' && next == Some('*') => {
                out.push('*');
                chars.next();
                Lexed::BlockComment(depth + 1)
            }
            other => other,
        };
        before_that = before;
        before = (state == Lexed::Code).then_some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_inserts_change_no_existing_row() {
        let changes = |sql: &str| StagedWrite::new(sql).changes_rows();
        assert!(!changes("INSERT INTO t (id) VALUES ($1)"));
        assert!(!changes("  insert into t (id) values ($1) on conflict do nothing"));
        assert!(changes(
            "INSERT INTO t (id, n) VALUES ($1, 1) ON CONFLICT (id) DO\n  update SET n = t.n + 1"
        ));
        assert!(changes("UPDATE t SET n = n + 1 WHERE id = $1"));
        assert!(changes("DELETE FROM t WHERE id = $1"));
        assert!(
            changes("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x"),
            "unknown: taken as changing"
        );
    }

    #[test]
    fn parameters_follow_the_saga_s_and_quoted_text_is_left_alone() {
        assert_eq!(
            renumber("UPDATE t SET a = $1, b = '$2', \"c$3\" = $3::int WHERE id = $12", 40),
            "UPDATE t SET a = $41, b = '$2', \"c$3\" = $43::int WHERE id = $52"
        );
        assert_eq!(renumber("SELECT 'it''s $1', $1", 2), "SELECT 'it''s $1', $3");
    }

    #[test]
    fn comments_and_escape_strings_are_left_alone_and_the_rest_renumbered() {
        assert_eq!(
            renumber(
                "UPDATE t SET s = $2  -- the customer's status, not $9\nWHERE id = $1",
                40
            ),
            "UPDATE t SET s = $42  -- the customer's status, not $9\nWHERE id = $41"
        );
        assert_eq!(
            renumber(
                "SELECT /* it's /* nested $1 */ still */ $1, E'can\\'t $1', e'\\\\', $2",
                10
            ),
            "SELECT /* it's /* nested $1 */ still */ $11, E'can\\'t $1', e'\\\\', $12"
        );
        assert_eq!(
            renumber("SELECT a$1, 'x'||$1, 3-$1, $1", 1),
            "SELECT a$1, 'x'||$2, 3-$2, $2"
        );
        // A word ending in `e` against a quote opens a plain string; a
        // doubled quote stays inside an escape string.
        assert_eq!(
            renumber("SELECT s LIKE'x\\' AND t = $1, E'it''s $1', $2", 5),
            "SELECT s LIKE'x\\' AND t = $6, E'it''s $1', $7"
        );
    }

    #[test]
    fn row_wise_writes_of_one_sql_merge_their_rows() {
        let sql = "INSERT INTO t (id, n) SELECT * FROM UNNEST($1::uuid[], $2::int8[])";
        let one = StagedWrite::rows(sql)
            .column(vec![uuid::Uuid::nil()])
            .column(vec![1_i64]);
        let two = StagedWrite::rows(sql)
            .column(vec![uuid::Uuid::max(), uuid::Uuid::nil()])
            .column(vec![2_i64, 3]);
        assert_eq!(one.merges_as(), Some(sql));
        let merged = StagedWrite::merged(&[&one, &two]).expect("same types");
        assert_eq!(merged.merges_as(), Some(sql));
        let lengths: Vec<usize> = merged
            .parameters
            .iter()
            .map(|p| match p {
                Parameter::Column(c) => c.rows(),
                Parameter::Value(_) => 0,
            })
            .collect();
        assert_eq!(lengths, [3, 3]);
        let ns = match &merged.parameters[1] {
            Parameter::Column(c) => c.as_any().downcast_ref::<Vec<i64>>().cloned(),
            Parameter::Value(_) => None,
        };
        assert_eq!(ns, Some(vec![1, 2, 3]));
    }

    #[test]
    fn only_row_wise_writes_of_whole_columns_merge() {
        let sql = "UPDATE t SET n = u.n FROM UNNEST($1::int8[], $2::int8[]) AS u(id, n) WHERE t.id = u.id";
        assert_eq!(
            StagedWrite::new(sql)
                .column(vec![1_i64])
                .column(vec![2_i64])
                .merges_as(),
            None
        );
        assert_eq!(StagedWrite::rows(sql).column(vec![1_i64]).bind(2_i64).merges_as(), None);
        assert_eq!(
            StagedWrite::rows(sql)
                .column(vec![1_i64])
                .column(vec![2_i64, 3])
                .merges_as(),
            None
        );
        assert_eq!(StagedWrite::rows(sql).merges_as(), None);
        let ints = StagedWrite::rows(sql).column(vec![1_i64]).column(vec![2_i64]);
        let texts = StagedWrite::rows(sql).column(vec![1_i64]).column(vec!["2".to_owned()]);
        assert!(StagedWrite::merged(&[&ints, &texts]).is_none());
        let more = StagedWrite::rows(sql)
            .column(vec![1_i64])
            .column(vec![2_i64])
            .column(vec![3_i64]);
        assert!(StagedWrite::merged(&[&ints, &more]).is_none());
        assert!(StagedWrite::merged(&[&more, &ints]).is_none());
    }

    #[test]
    fn bound_values_stay_out_of_debug_output() {
        let write = StagedWrite::new("UPDATE t SET secret = $1").bind("hunter2".to_owned());
        let shown = format!("{write:?}");
        assert!(shown.contains("UPDATE t") && !shown.contains("hunter2"), "{shown}");
    }
}
