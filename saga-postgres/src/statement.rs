//! The one statement a transition commits with, in the shape of what it
//! writes.
//!
//! PostgreSQL's cost for a small statement is mostly setting up its plan
//! for execution: each table written opens its relation and indexes, each
//! `UNNEST` builds a function scan per array. So the statement carries only
//! the parts a transition needs (no inbox part when nothing goes to the
//! inbox), and a part that writes one row takes scalar parameters instead of
//! arrays. Each shape's SQL is built once; sqlx prepares it once per
//! connection.
//!
//! Outbox rows can be leased to this process's relay as they are written
//! (see `PostgresStoreConfig::handoff`), so it publishes them without
//! a claim. That is safe for a saga's messages only if none of its earlier
//! messages is still unsent, since a saga's messages are published in order:
//! `saga_instances.last_outbox_id` names the saga's newest outbox row, and
//! as a saga's messages are marked sent in order, that row being sent means
//! all are. Every statement that writes outbox rows of a saga moves the
//! pointer.

use std::sync::OnceLock;

/// How many rows of one kind a statement writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    None,
    /// Scalar parameters.
    One,
    /// Array parameters, `UNNEST`ed.
    Many,
}

impl Rows {
    pub(crate) fn of(count: usize) -> Self {
        match count {
            0 => Self::None,
            1 => Self::One,
            _ => Self::Many,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The instance write of a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InstanceRow {
    None,
    Insert,
    /// Matches only the expected revision.
    Update,
}

/// What one statement writes. Parameters come in this order: the instance
/// (15 columns, then the expected revision for an update), the inbox
/// (consumer, message id), the history (10 columns) and the outbox
/// (8 columns, then the hand-off lease in milliseconds, `NULL` for none,
/// and the ids of messages published but not yet marked sent, which the
/// hand-off check counts as sent), each part present only if it writes rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) instance: InstanceRow,
    pub(crate) inbox: Rows,
    pub(crate) history: Rows,
    /// Whether a history row records a consumed message.
    pub(crate) history_consumes: bool,
    pub(crate) outbox: Rows,
    /// Whether an outbox row belongs to a saga other than the instance
    /// written (or there is no instance write): no hand-off then, and those
    /// sagas' `last_outbox_id` is moved by an update of its own.
    pub(crate) foreign: bool,
}

const SHAPES: usize = 3 * 3 * 3 * 2 * 3 * 2;

/// Columns of `saga_instances`, in parameter order.
pub(crate) const INSTANCE_COLUMNS: [&str; 15] = [
    "id",
    "definition",
    "definition_version",
    "key",
    "status",
    "step",
    "attempt",
    "awaiting",
    "deadline",
    "failure",
    "data",
    "data_version",
    "revision",
    "created_at",
    "updated_at",
];

/// The saga `saga`'s (an SQL expression) newest message, if it is unsent
/// and not among `published` (an `int8[]` expression: published, waiting to
/// be marked): a query of its id, or of none. The predecessor is looked up
/// by its id: planned as a join, PostgreSQL may scan every unsent row per
/// saga and test each against `published`.
fn unsent_predecessor(saga: &str, published: &str) -> String {
    format!(
        "SELECT o.id FROM saga_outbox o \
         WHERE o.id = (SELECT i.last_outbox_id FROM saga_instances i WHERE i.id = {saga}) \
         AND o.sent_at IS NULL AND o.id <> ALL({published}::int8[])"
    )
}

/// A condition on the update of the instance `saga` (an SQL expression):
/// its `last_outbox_id` is still the one this statement's snapshot read.
/// Another saga's transaction may write a message of this saga (a foreign
/// row) and move the pointer without changing the revision; if it commits
/// while this update waits for the row, PostgreSQL re-checks the update on
/// the newer row, where the revision still matches, while the hand-off
/// check read the older pointer, and would let this saga's new message
/// overtake the foreign one. The update then writes nothing: a conflict,
/// decided again on what is stored.
fn pointer_unmoved(saga: &str) -> String {
    format!(
        " AND last_outbox_id IS NOT DISTINCT FROM (SELECT i.last_outbox_id FROM saga_instances i WHERE i.id = {saga})"
    )
}

/// Whether the saga `saga` may have its next message handed off: it has no
/// [`unsent_predecessor`].
pub(crate) fn predecessor_sent(saga: &str, published: &str) -> String {
    format!("NOT EXISTS ({})", unsent_predecessor(saga, published))
}

/// The id of the message the saga `saga`'s new one waits behind, its
/// [`unsent_predecessor`], unless `skip` (it was handed off, or it is no
/// saga's next message). Read in a statement's final `SELECT`, which sees
/// the instance as it was before the statement's own update (one snapshot
/// for all of it), and only for a message not handed off: rare while a
/// relay takes hand-offs, every such statement without one. Its confirm
/// wakes this process's relay (`Shared::await_confirm`).
pub(crate) fn awaited_predecessor(skip: &str, saga: &str, published: &str) -> String {
    format!(
        "CASE WHEN {skip} THEN NULL::int8 ELSE ({}) END",
        unsent_predecessor(saga, published)
    )
}

/// Columns of `saga_history`, in parameter order, with the type a parameter
/// is cast to (`""`: as bound).
const HISTORY_COLUMNS: [(&str, &str); 10] = [
    ("saga_id", ""),
    ("revision", ""),
    ("at", ""),
    ("cause", "jsonb"),
    ("before", "jsonb"),
    ("after", "jsonb"),
    ("emitted", "jsonb"),
    ("note", ""),
    ("consumer", ""),
    ("message_id", ""),
];

/// The element types of the history arrays (`UNNEST`).
const HISTORY_ARRAYS: [&str; 10] = [
    "uuid[]",
    "bigint[]",
    "bigint[]",
    "text[]::jsonb[]",
    "text[]::jsonb[]",
    "text[]::jsonb[]",
    "text[]::jsonb[]",
    "text[]",
    "text[]",
    "text[]",
];

/// Columns of `saga_outbox`, in parameter order, cast as in [`HISTORY_COLUMNS`].
const OUTBOX_COLUMNS: [(&str, &str); 8] = [
    ("saga_id", ""),
    ("message_id", ""),
    ("kind", ""),
    ("destination", ""),
    ("correlation_id", ""),
    ("created_at", ""),
    ("headers", "jsonb"),
    ("payload", ""),
];

/// The element types of the outbox arrays (`UNNEST`).
const OUTBOX_ARRAYS: [&str; 8] = [
    "uuid[]",
    "text[]",
    "text[]",
    "text[]",
    "text[]",
    "bigint[]",
    "text[]::jsonb[]",
    "bytea[]",
];

impl Shape {
    fn index(self) -> usize {
        let instance = self.instance as usize;
        let shape =
            ((instance * 3 + self.inbox.index()) * 3 + self.history.index()) * 2 + usize::from(self.history_consumes);
        (shape * 3 + self.outbox.index()) * 2 + usize::from(self.foreign)
    }

    /// The statement's SQL. It returns one row: the instance rows written;
    /// whether every message consumed was new (if not, nothing is written);
    /// whether the outbox rows were leased for the hand-off; their ids, in
    /// order; and, when they were not leased because the saga's previous
    /// message was not sent, that message's id (see [`awaited_predecessor`]).
    pub(crate) fn sql(self) -> &'static str {
        static SQL: [OnceLock<String>; SHAPES] = [const { OnceLock::new() }; SHAPES];
        SQL[self.index()].get_or_init(|| {
            let parts = self.parts();
            format!(
                "WITH {} SELECT {}, {}, {}",
                parts.ctes, parts.written, parts.fresh, parts.outboxed
            )
        })
    }

    /// The statement's SQL with application writes as further CTEs
    /// (`staged`, each `name AS (...)`, parameters numbered after the
    /// saga's). A stale revision or a message consumed before then raises
    /// (`saga_abort`, migration 0006) instead of writing nothing, so the
    /// application's writes roll back with the saga's.
    pub(crate) fn staged_sql(self, staged: &[String]) -> String {
        let parts = self.parts();
        let mut guards = Vec::new();
        if parts.fresh != "true" {
            guards.push(format!("WHEN NOT {} THEN saga_abort('consumed')", parts.fresh));
        }
        if self.instance != InstanceRow::None {
            guards.push(format!("WHEN {} = 0 THEN saga_abort('conflict')", parts.written));
        }
        let written = if guards.is_empty() {
            parts.written.clone()
        } else {
            format!("CASE {} ELSE {} END", guards.join(" "), parts.written)
        };
        let ctes: Vec<&str> = std::iter::once(parts.ctes.as_str())
            .filter(|ctes| !ctes.is_empty())
            .chain(staged.iter().map(String::as_str))
            .collect();
        format!(
            "WITH {} SELECT {written}, {}, {}",
            ctes.join(", "),
            parts.fresh,
            parts.outboxed
        )
    }

    /// How many parameters the saga's part of the statement takes.
    pub(crate) fn parameters(self) -> usize {
        let rows = |rows: Rows, columns: usize| if rows == Rows::None { 0 } else { columns };
        let instance = match self.instance {
            InstanceRow::None => 0,
            InstanceRow::Insert => 15,
            InstanceRow::Update => 16,
        };
        instance + rows(self.inbox, 2) + rows(self.history, 10) + rows(self.outbox, 10)
    }

    /// Whether the statement hands its message off only once the saga's
    /// previous one is sent (or published, see `published_unmarked`): an
    /// update of a saga that enqueues its own messages.
    pub(crate) fn hands_off_after_predecessor(self) -> bool {
        self.outbox != Rows::None && !self.foreign && self.instance == InstanceRow::Update
    }

    fn parts(self) -> &'static Parts {
        static PARTS: [OnceLock<Parts>; SHAPES] = [const { OnceLock::new() }; SHAPES];
        PARTS[self.index()].get_or_init(|| self.build())
    }

    fn build(self) -> Parts {
        let mut params = Params(0);
        let instance = match self.instance {
            InstanceRow::None => None,
            InstanceRow::Insert => Some(params.take(15)),
            InstanceRow::Update => Some(params.take(16)),
        };
        let inbox = (self.inbox != Rows::None).then(|| params.take(2));
        let history = (self.history != Rows::None).then(|| params.take(10));
        let outbox = (self.outbox != Rows::None).then(|| params.take(8));
        let (lease, published) = match &outbox {
            Some(_) => {
                let mut taken = params.take(2).into_iter();
                (taken.next(), taken.next().unwrap_or_default())
            }
            None => (None, String::new()),
        };

        // A message consumed here that was recorded the other way before
        // (see the transaction module) makes the whole statement write nothing.
        let mut checks = Vec::new();
        if let Some(p) = &inbox {
            checks.push(not_recorded(self.inbox, "saga_history", &p[0], &p[1]));
        }
        if let (true, Some(p)) = (self.history_consumes, &history) {
            checks.push(not_recorded(self.history, "saga_inbox", &p[8], &p[9]));
        }
        let fresh = !checks.is_empty();
        let mut ctes = Vec::new();
        if fresh {
            ctes.push(format!("fresh AS (SELECT {} AS ok)", checks.join(" AND ")));
        }
        const FRESH: &str = "(SELECT ok FROM fresh)";

        // One message of the instance written (the common case): the
        // instance write draws its id and returns it. Otherwise ids first,
        // and the instance write records its saga's newest.
        let single = self.outbox == Rows::One && instance.is_some() && !self.foreign;
        const NEXT_ID: &str = "nextval('saga_outbox_id_seq')";
        if let (Some(p), false) = (&outbox, single) {
            if self.foreign {
                // The other sagas' rows are locked before their messages
                // draw ids, so a transition of one of them that commits
                // meanwhile waits, and a saga's ids grow in commit order,
                // which its pointer (moved below) relies on. The lock is
                // the one `moved` takes anyway.
                let sagas = match self.outbox {
                    Rows::Many => format!("= ANY({}::uuid[])", p[0]),
                    _ => format!("= {}::uuid", p[0]),
                };
                ctes.push(format!(
                    "locked AS (SELECT id FROM saga_instances WHERE id {sagas} ORDER BY id FOR NO KEY UPDATE)"
                ));
            }
            ctes.push(outbox_ids(self.outbox, p, self.foreign));
        }
        let newest = |otherwise: &str| match &instance {
            Some(_) if single => NEXT_ID.to_owned(),
            Some(p) => newest_outbox_id(outbox.is_some(), &p[0], otherwise),
            None => otherwise.to_owned(),
        };
        let returning = if single {
            "RETURNING last_outbox_id AS id"
        } else {
            "RETURNING 1"
        };
        // Hand-off only if the saga's newest earlier message is sent: read
        // before the instance write, from the same version of the row the
        // write then replaces (its revision and, see `pointer_unmoved`, its
        // pointer are checked).
        let handoff = match (&outbox, self.foreign, self.instance, &instance) {
            (None, ..) | (_, true, ..) => None,
            // The case `hands_off_after_predecessor` names.
            (Some(_), false, InstanceRow::Update, Some(p)) => Some(predecessor_sent(&p[0], &published)),
            (Some(_), false, ..) => Some("true".to_owned()),
        };
        if let Some(p) = &instance {
            let only_fresh = |keyword: &str| {
                if fresh {
                    format!(" {keyword} {FRESH}")
                } else {
                    String::new()
                }
            };
            ctes.push(match self.instance {
                InstanceRow::Insert => format!(
                    "written AS (INSERT INTO saga_instances ({}, last_outbox_id) SELECT {}, {}{} {returning})",
                    INSTANCE_COLUMNS.join(", "),
                    instance_values(p).join(", "),
                    newest("NULL::bigint"),
                    only_fresh("WHERE"),
                ),
                _ => format!(
                    "written AS (UPDATE saga_instances SET {}, last_outbox_id = {} \
                     WHERE id = {} AND revision = {}{}{} {returning})",
                    INSTANCE_COLUMNS
                        .iter()
                        .zip(instance_values(p))
                        .skip(1)
                        .map(|(column, value)| format!("{column} = {value}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    newest("last_outbox_id"),
                    p[0],
                    p[15],
                    if self.hands_off_after_predecessor() {
                        pointer_unmoved(&p[0])
                    } else {
                        String::new()
                    },
                    only_fresh("AND"),
                ),
            });
        }
        // Rows other than the instance: only if the instance write matched
        // (which also makes them wait for it, so a stale transition reports
        // its conflict instead of colliding with the winner's rows), or,
        // without one, only if the consumption is fresh.
        let (from, guard) = match (&instance, fresh) {
            (Some(_), _) => (" FROM written", " WHERE EXISTS (SELECT 1 FROM written)".to_owned()),
            (None, true) => ("", format!(" WHERE {FRESH}")),
            (None, false) => ("", String::new()),
        };
        if let Some(p) = &inbox {
            ctes.push(insert(
                "inbox",
                "saga_inbox",
                &[("consumer", ""), ("message_id", "")],
                &["text[]", "text[]"],
                p,
                self.inbox,
                from,
                &guard,
            ));
        }
        if let Some(p) = &history {
            ctes.push(insert(
                "history",
                "saga_history",
                &HISTORY_COLUMNS,
                &HISTORY_ARRAYS,
                p,
                self.history,
                from,
                &guard,
            ));
        }
        if let Some(lease) = &lease {
            let handed = match &handoff {
                // The lease first: without one, the check need not run.
                Some(check) => format!("({lease}::float8 IS NOT NULL AND {check})"),
                None => "false".to_owned(),
            };
            let names = OUTBOX_COLUMNS.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ");
            let leased = format!(
                "CASE WHEN (SELECT ok FROM handoff) THEN clock_timestamp() + {lease}::float8 * interval '1 millisecond' END"
            );
            let source = match (&outbox, single) {
                (Some(p), true) => {
                    let values = p
                        .iter()
                        .zip(OUTBOX_COLUMNS)
                        .map(|(p, (_, cast))| {
                            if cast.is_empty() {
                                p.clone()
                            } else {
                                format!("{p}::{cast}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    format!("SELECT written.id, {values}, {leased} FROM written")
                }
                _ => {
                    let values = (1..=OUTBOX_COLUMNS.len())
                        .map(|i| format!("c{i}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    // With an instance write, joining `written` is the guard.
                    let (from, guard) = if from.is_empty() {
                        ("", guard.as_str())
                    } else {
                        (", written", "")
                    };
                    format!("SELECT id, {values}, {leased} FROM ids{from}{guard} ORDER BY n")
                }
            };
            ctes.push(format!(
                "handoff AS (SELECT {handed} AS ok, {published}::int8[] AS published), \
                 outbox AS (INSERT INTO saga_outbox (id, {names}, claimed_until) {source} RETURNING id, saga_id)"
            ));
            if self.foreign {
                // Other sagas' pointers (never the written instance's: a
                // row is updated once per statement).
                let written = instance
                    .as_ref()
                    .map_or_else(String::new, |p| format!(" AND i.id <> {}", p[0]));
                ctes.push(format!(
                    "moved AS (UPDATE saga_instances i SET last_outbox_id = greatest(i.last_outbox_id, m.id) \
                     FROM (SELECT saga_id, max(id) AS id FROM outbox WHERE saga_id IS NOT NULL GROUP BY saga_id) m \
                     WHERE i.id = m.saga_id{written})"
                ));
            }
        }
        let awaits = match (self.hands_off_after_predecessor(), &instance) {
            (true, Some(p)) => awaited_predecessor("(SELECT ok FROM handoff)", &p[0], &published),
            _ => "NULL::int8".to_owned(),
        };
        let outboxed = lease.is_some();
        Parts {
            ctes: ctes.join(", "),
            written: if instance.is_some() {
                "(SELECT count(*) FROM written)"
            } else {
                "0::bigint"
            }
            .to_owned(),
            fresh: if fresh { FRESH } else { "true" }.to_owned(),
            outboxed: if outboxed {
                format!(
                    "(SELECT ok FROM handoff), coalesce((SELECT array_agg(id ORDER BY id) FROM outbox), '{{}}'), {awaits}"
                )
            } else {
                "false, '{}'::bigint[], NULL::int8".to_owned()
            },
        }
    }
}

/// A statement's CTEs and the expressions of the row it returns.
struct Parts {
    ctes: String,
    /// The instance rows written.
    written: String,
    /// Whether every message consumed was new.
    fresh: String,
    /// Whether the outbox rows were leased for the hand-off, their ids, and
    /// the predecessor they wait for.
    outboxed: String,
}

/// The `ids` CTE: a new outbox id for each row (drawn in row order, so a
/// saga's ids grow with its messages' order) beside the row's values
/// `c1`…`c8` and its position `n`; `after_locked`: drawn only once the
/// `locked` CTE holds its rows (a one-time filter before the first row).
fn outbox_ids(rows: Rows, p: &[String], after_locked: bool) -> String {
    let gate = if after_locked {
        " WHERE (SELECT count(*) FROM locked) >= 0"
    } else {
        ""
    };
    const NEXT: &str = "nextval('saga_outbox_id_seq')";
    match rows {
        Rows::Many => {
            let unnested = p
                .iter()
                .zip(OUTBOX_ARRAYS)
                .map(|(p, t)| format!("{p}::{t}"))
                .collect::<Vec<_>>()
                .join(", ");
            let aliases = (1..=p.len()).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", ");
            format!(
                "ids AS (SELECT {NEXT} AS id, u.* FROM (SELECT * FROM UNNEST({unnested}) \
                 WITH ORDINALITY AS u({aliases}, n) ORDER BY n) u{gate})"
            )
        }
        _ => {
            let values = p
                .iter()
                .zip(OUTBOX_COLUMNS)
                .enumerate()
                .map(|(i, (p, (_, cast)))| {
                    if cast.is_empty() {
                        format!("{p} AS c{}", i + 1)
                    } else {
                        format!("{p}::{cast} AS c{}", i + 1)
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("ids AS (SELECT {NEXT} AS id, {values}, 1 AS n{gate})")
        }
    }
}

/// The instance's new `last_outbox_id`: its saga's newest row written here,
/// else `otherwise`.
fn newest_outbox_id(outbox: bool, saga: &str, otherwise: &str) -> String {
    if outbox {
        format!("coalesce((SELECT max(id) FROM ids WHERE c1 = {saga}), {otherwise})")
    } else {
        otherwise.to_owned()
    }
}

/// Numbers parameters in order.
struct Params(usize);

impl Params {
    fn take(&mut self, count: usize) -> Vec<String> {
        let taken = (self.0 + 1..=self.0 + count).map(|n| format!("${n}")).collect();
        self.0 += count;
        taken
    }
}

/// The instance's values, cast where the column needs it.
fn instance_values(p: &[String]) -> Vec<String> {
    INSTANCE_COLUMNS
        .iter()
        .zip(p)
        .map(|(column, param)| {
            if *column == "data" {
                format!("{param}::json")
            } else {
                param.clone()
            }
        })
        .collect()
}

/// That no consumption given by `consumer` and `message` (scalars or arrays)
/// is recorded in `table`.
pub(crate) fn not_recorded(rows: Rows, table: &str, consumer: &str, message: &str) -> String {
    match rows {
        Rows::Many => format!(
            "NOT EXISTS (SELECT 1 FROM UNNEST({consumer}::text[], {message}::text[]) AS u(c, m) \
             JOIN {table} r ON r.consumer = u.c AND r.message_id = u.m)"
        ),
        _ => format!("NOT EXISTS (SELECT 1 FROM {table} WHERE consumer = {consumer} AND message_id = {message})"),
    }
}

/// A CTE inserting one row from scalar parameters or many from arrays.
#[allow(clippy::too_many_arguments)]
fn insert(
    name: &str,
    table: &str,
    columns: &[(&str, &str)],
    arrays: &[&str],
    params: &[String],
    rows: Rows,
    from: &str,
    guard: &str,
) -> String {
    let names = columns.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ");
    match rows {
        Rows::Many => {
            let unnested = params
                .iter()
                .zip(arrays)
                .map(|(p, t)| format!("{p}::{t}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("{name} AS (INSERT INTO {table} ({names}) SELECT * FROM UNNEST({unnested}){guard})")
        }
        _ => {
            let values = params
                .iter()
                .zip(columns)
                .map(|(p, (_, cast))| {
                    if cast.is_empty() {
                        p.clone()
                    } else {
                        format!("{p}::{cast}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            // With an instance write, joining `written` is the guard.
            let guard = if from.is_empty() { guard } else { "" };
            format!("{name} AS (INSERT INTO {table} ({names}) SELECT {values}{from}{guard})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_shapes() -> Vec<Shape> {
        let rows = [Rows::None, Rows::One, Rows::Many];
        let mut shapes = Vec::new();
        for instance in [InstanceRow::None, InstanceRow::Insert, InstanceRow::Update] {
            for inbox in rows {
                for history in rows {
                    for history_consumes in [false, true] {
                        for outbox in rows {
                            for foreign in [false, true] {
                                shapes.push(Shape {
                                    instance,
                                    inbox,
                                    history,
                                    history_consumes,
                                    outbox,
                                    foreign,
                                });
                            }
                        }
                    }
                }
            }
        }
        shapes
    }

    #[test]
    fn every_shape_has_a_slot_of_its_own() {
        let mut seen = [false; SHAPES];
        for shape in all_shapes() {
            assert!(!seen[shape.index()], "{shape:?} shares a slot");
            seen[shape.index()] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn parameters_are_numbered_in_order_without_gaps() {
        for shape in all_shapes() {
            let sql = shape.sql();
            let expected = match shape.instance {
                InstanceRow::None => 0,
                InstanceRow::Insert => 15,
                InstanceRow::Update => 16,
            } + if shape.inbox == Rows::None { 0 } else { 2 }
                + if shape.history == Rows::None { 0 } else { 10 }
                + if shape.outbox == Rows::None { 0 } else { 10 };
            for n in 1..=expected {
                assert!(sql.contains(&format!("${n}")), "{shape:?} lacks ${n}: {sql}");
            }
            assert!(!sql.contains(&format!("${}", expected + 1)), "{shape:?}: {sql}");
        }
    }

    #[test]
    fn a_transition_writing_one_row_of_each_takes_no_arrays() {
        let sql = Shape {
            instance: InstanceRow::Update,
            inbox: Rows::None,
            history: Rows::One,
            history_consumes: true,
            outbox: Rows::One,
            foreign: false,
        }
        .sql();
        assert!(!sql.contains("UNNEST"), "{sql}");
        assert!(!sql.contains("saga_inbox ("), "no inbox part: {sql}");
    }
}
