//! Where a saga's time goes, read off the run's database once a run has
//! ended: the rows each step wrote carry when it happened, and the message
//! ids tie them to one saga; the load generator adds when it sent the order
//! and saw it confirmed.
//!
//! - *to the start*: `CreateOrder` sent → the order service decided to start
//!   the saga. gRPC, the request's checks, the engine.
//! - *to the inventory*: the order service decided to start the saga (its
//!   first history row) → the inventory's transaction handling `OrderCreated`
//!   began (its inbox row's `now()`). The start's commit, the relay's
//!   publish, the broker, the inventory's consumer and its wait for a
//!   transaction.
//! - *in the inventory*: that transaction began → it wrote its
//!   `StockUpdateResult` (the outbox row's creation time).
//! - *back to the order service*: the reply written → the order service
//!   decided the transition it caused (the history row that consumed it).
//!   The inventory's commit, its relay, the broker, the order service's
//!   consumer.
//! - *to the confirmation*: the decision → the load generator saw
//!   `OrderConfirmed`. The decision's commit, the relay, the broker, the
//!   load generator's consumer.
//!
//! The engine and the inventory stamp milliseconds of the system clock,
//! PostgreSQL and the load generator finer fractions of the same clock (the
//! services run in this process, on this machine): a leg may show up to a
//! millisecond below zero. A step of the system clock during a run shifts
//! the legs of the sagas in flight across it, and only theirs. Outbox and
//! inbox rows deleted by retention (e.g. `SENT_MESSAGE_RETENTION=0`) leave
//! their sagas out.

use std::time::Duration;

use serde::Serialize;

use super::drive::Confirmation;
use super::machine::{MachineLoad, Trace};
use super::report::Percentiles;

/// The legs' percentiles over the run's sagas found in the database.
#[derive(Clone, Debug, Serialize)]
pub struct Legs {
    /// Sagas whose every step was found.
    pub sagas: u64,
    /// `CreateOrder` sent → the start decided (confirmed sagas only).
    pub to_start_ms: Option<Percentiles>,
    /// Start decided → the inventory's transaction began.
    pub to_inventory_ms: Percentiles,
    /// The inventory's transaction began → its reply written.
    pub in_inventory_ms: Percentiles,
    /// The reply written → the order service decided its transition.
    pub back_to_order_service_ms: Percentiles,
    /// Start decided → the transition decided: the three legs between.
    pub start_to_decision_ms: Percentiles,
    /// The transition decided → `OrderConfirmed` seen (confirmed sagas only).
    pub to_confirmation_ms: Option<Percentiles>,
    /// The slowest 1 % of the confirmed sagas: where their time went.
    pub slowest: Option<Slowest>,
}

/// The confirmed sagas at or above the run's 99th percentile (sent → seen):
/// the mean of each leg, which add up to their mean latency, and how
/// bunched in time they were sent. A tail that queues behind a busy core is
/// spread over the run and over the legs; one that waits for a stall (a
/// checkpoint, a periodic task) is sent in a few bursts and sits in one leg.
#[derive(Clone, Debug, Serialize)]
pub struct Slowest {
    /// How many sagas.
    pub sagas: u64,
    /// Their mean sent → seen.
    pub mean_ms: f64,
    pub to_start_ms: f64,
    pub to_inventory_ms: f64,
    pub in_inventory_ms: f64,
    pub back_to_order_service_ms: f64,
    pub to_confirmation_ms: f64,
    /// In how many of the run's 100 ms windows (from the first saga sent)
    /// they were sent.
    pub sent_in_windows: u64,
    /// How many 100 ms windows the run's confirmed sagas were sent in.
    pub windows: u64,
    /// The windows that held the most of them (up to three, most first):
    /// when a stall came, to line up with what ran then.
    pub bursts: Vec<Burst>,
    /// When the run's first saga was sent (system clock, Unix
    /// milliseconds): the windows count from it.
    pub first_sent_unix_ms: f64,
    /// What the machine did in a typical 200 ms of the run (each figure's
    /// median), to hold each burst's [`Burst::machine`] against.
    pub typical_machine: Option<MachineLoad>,
}

/// A 100 ms window in which some of the slowest sagas were sent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Burst {
    /// The window's start, in seconds after the run's first saga was sent.
    pub at_s: f64,
    /// How many of the slowest sagas were sent in it.
    pub sagas: u64,
    /// What the machine did in the window and the next one (200 ms).
    pub machine: Option<MachineLoad>,
}

/// A statement over a long run's rows should take well under this.
const PATIENCE: Duration = Duration::from_secs(30);

/// The legs of the sagas the order service started in `[from_ms, to_ms)`
/// (Unix milliseconds), with the load generator's `confirmations`; the
/// inventory's tables are in `inventory_schema`. `None` if none was found
/// complete, or the database could not say.
pub(crate) async fn measure(
    database_url: &str,
    inventory_schema: &str,
    from_ms: i64,
    to_ms: i64,
    confirmations: &[Confirmation],
) -> Option<Legs> {
    let order_ids: Vec<uuid::Uuid> = confirmations.iter().map(|c| c.order_id).collect();
    let sent: Vec<f64> = confirmations.iter().map(|c| c.sent_ms).collect();
    let seen: Vec<f64> = confirmations.iter().map(|c| c.seen_ms).collect();
    let read = async {
        let mut conn = super::costs::connect(database_url).await?;
        // The statistics may still be the warm-up's (a few rows): planned on
        // them, the joins become nested loops over the whole run's rows.
        let _ = sqlx::query("SET enable_nestloop = off").execute(&mut conn).await;
        // What that costs the planner's estimates would start a JIT compile
        // of a statement that runs in milliseconds.
        let _ = sqlx::query("SET jit = off").execute(&mut conn).await;
        let row = sqlx::query_as::<_, LegRow>(sqlx::AssertSqlSafe(statement(inventory_schema)))
            .bind(from_ms)
            .bind(to_ms)
            .bind(order_service::wire::ORDER_CREATED)
            .bind(saga_core::IN_REPLY_TO)
            .bind(&order_ids)
            .bind(&sent)
            .bind(&seen)
            .fetch_one(&mut conn)
            .await;
        let _ = sqlx::Connection::close(conn).await;
        row.map_err(|error| tracing::warn!(%error, "could not read the legs of the run's sagas"))
            .ok()
    };
    let row = tokio::time::timeout(PATIENCE, read).await.ok().flatten()?;
    row.into_legs()
}

/// `schema` is the inventory's validated schema name (letters, digits, `_`).
fn statement(schema: &str) -> String {
    format!(
        "WITH steps AS ( \
           SELECT c.sent, c.seen, h1.at::float8 AS started, \
                  extract(epoch FROM ii.consumed_at)::float8 * 1000 AS taken, \
                  io.created_at::float8 AS replied, \
                  h2.at::float8 AS decided, \
                  floor((c.sent - min(c.sent) OVER ()) / 100) AS w \
           FROM saga_history h1 \
           JOIN saga_outbox o ON o.saga_id = h1.saga_id AND o.kind = $3 \
           JOIN {schema}.saga_inbox ii ON ii.message_id = o.message_id \
           JOIN {schema}.saga_outbox io ON io.headers->>$4 = o.message_id \
           JOIN saga_history h2 ON h2.message_id = io.message_id \
           LEFT JOIN unnest($5::uuid[], $6::float8[], $7::float8[]) AS c(order_id, sent, seen) \
             ON c.order_id = h1.saga_id \
           WHERE h1.revision = 1 AND h1.at >= $1 AND h1.at < $2 \
         ), cut AS ( \
           SELECT percentile_disc(0.99) WITHIN GROUP (ORDER BY seen - sent) AS at FROM steps \
         ), slowest AS ( \
           SELECT * FROM steps WHERE seen - sent >= (SELECT at FROM cut) \
         ), bursts AS ( \
           SELECT w, count(*) AS n FROM slowest GROUP BY w ORDER BY n DESC, w LIMIT 3 \
         ) \
         SELECT count(*) AS sagas, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY started - sent) AS to_start, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY taken - started) AS to_inventory, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY replied - taken) AS in_inventory, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY decided - replied) AS back, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY decided - started) AS whole, \
           percentile_disc(ARRAY[0.5, 0.95, 0.99, 1]) WITHIN GROUP (ORDER BY seen - decided) AS to_confirmation, \
           count(DISTINCT w) AS windows, \
           (SELECT ARRAY[count(*), avg(seen - sent), avg(started - sent), avg(taken - started), \
                         avg(replied - taken), avg(decided - replied), avg(seen - decided), \
                         count(DISTINCT w)]::float8[] FROM slowest) AS slowest, \
           (SELECT array_agg(w / 10 ORDER BY n DESC, w) FROM bursts)::float8[] AS burst_at_s, \
           (SELECT array_agg(n ORDER BY n DESC, w) FROM bursts)::float8[] AS burst_sagas, \
           min(sent) AS first_sent \
         FROM steps"
    )
}

#[derive(sqlx::FromRow)]
struct LegRow {
    sagas: i64,
    to_start: Option<Vec<f64>>,
    to_inventory: Option<Vec<f64>>,
    in_inventory: Option<Vec<f64>>,
    back: Option<Vec<f64>>,
    whole: Option<Vec<f64>>,
    to_confirmation: Option<Vec<f64>>,
    windows: i64,
    slowest: Option<Vec<Option<f64>>>,
    burst_at_s: Option<Vec<f64>>,
    burst_sagas: Option<Vec<f64>>,
    first_sent: Option<f64>,
}

impl LegRow {
    fn into_legs(self) -> Option<Legs> {
        let percentiles = |values: Option<Vec<f64>>| match values.as_deref() {
            Some(&[p50, p95, p99, max]) => Some(Percentiles { p50, p95, p99, max }),
            _ => None,
        };
        Some(Legs {
            sagas: u64::try_from(self.sagas).ok().filter(|n| *n > 0)?,
            to_start_ms: percentiles(self.to_start),
            to_inventory_ms: percentiles(self.to_inventory)?,
            in_inventory_ms: percentiles(self.in_inventory)?,
            back_to_order_service_ms: percentiles(self.back)?,
            start_to_decision_ms: percentiles(self.whole)?,
            to_confirmation_ms: percentiles(self.to_confirmation),
            slowest: self.slowest.as_deref().and_then(|values| {
                let bursts = bursts(
                    self.burst_at_s.unwrap_or_default(),
                    self.burst_sagas.unwrap_or_default(),
                );
                slowest(values, self.windows, bursts, self.first_sent?)
            }),
        })
    }
}

/// The bursts' two columns, window starts and counts, paired.
fn bursts(at_s: Vec<f64>, sagas: Vec<f64>) -> Vec<Burst> {
    at_s.into_iter()
        .zip(sagas)
        .map(|(at_s, sagas)| Burst {
            at_s,
            sagas: sagas as u64,
            machine: None,
        })
        .collect()
}

/// The slowest sagas' row: a count, seven means and a window count; none
/// when no saga had both client times.
fn slowest(values: &[Option<f64>], windows: i64, bursts: Vec<Burst>, first_sent_unix_ms: f64) -> Option<Slowest> {
    let &[
        Some(sagas),
        Some(mean),
        Some(start),
        Some(inventory),
        Some(inside),
        Some(back),
        Some(confirmation),
        Some(sent_in),
    ] = values
    else {
        return None;
    };
    Some(Slowest {
        sagas: (sagas >= 1.0).then_some(sagas as u64)?,
        mean_ms: mean,
        to_start_ms: start,
        to_inventory_ms: inventory,
        in_inventory_ms: inside,
        back_to_order_service_ms: back,
        to_confirmation_ms: confirmation,
        sent_in_windows: sent_in as u64,
        windows: u64::try_from(windows).unwrap_or(0),
        bursts,
        first_sent_unix_ms,
        typical_machine: None,
    })
}

impl Legs {
    /// Adds what the machine did (`trace`, recorded through the run) to the
    /// slowest sagas' bursts.
    pub(crate) fn line_up(&mut self, trace: &Trace) {
        let Some(slowest) = &mut self.slowest else { return };
        for burst in &mut slowest.bursts {
            burst.machine = trace.span(slowest.first_sent_unix_ms + burst.at_s * 1000.0);
        }
        slowest.typical_machine = trace.typical();
    }
}

#[cfg(test)]
mod tests {
    use super::super::machine::Sample;
    use super::*;

    #[test]
    fn a_row_without_sagas_or_percentiles_is_no_legs() {
        let row = |sagas, values: Option<Vec<f64>>| LegRow {
            sagas,
            to_start: None,
            to_confirmation: values.clone(),
            to_inventory: values.clone(),
            in_inventory: values.clone(),
            back: values.clone(),
            whole: values,
            windows: 0,
            slowest: None,
            burst_at_s: None,
            burst_sagas: None,
            first_sent: None,
        };
        assert!(row(0, None).into_legs().is_none());
        assert!(row(3, Some(vec![1.0, 2.0])).into_legs().is_none());
        let legs = row(3, Some(vec![1.0, 2.0, 3.0, 4.0])).into_legs().expect("complete");
        assert_eq!(legs.sagas, 3);
        assert_eq!(legs.back_to_order_service_ms.p99, 3.0);
        assert_eq!(legs.start_to_decision_ms.max, 4.0);
        assert!(legs.to_start_ms.is_none(), "no client times: no outer legs");
        assert_eq!(legs.to_confirmation_ms.map(|p| p.p50), Some(1.0));
        assert!(legs.slowest.is_none());
    }

    #[test]
    fn the_slowest_sagas_need_a_count_and_every_mean() {
        let full = [1.0, 30.0, 2.0, 12.0, 1.0, 5.0, 10.0, 1.0].map(Some);
        let found = slowest(&full, 100, bursts(vec![4.0, 0.3], vec![23.0, 5.0]), 5e3).expect("complete");
        assert_eq!((found.sagas, found.sent_in_windows, found.windows), (1, 1, 100));
        let burst = |at_s, sagas| Burst {
            at_s,
            sagas,
            machine: None,
        };
        assert_eq!(found.bursts, [burst(4.0, 23), burst(0.3, 5)]);
        assert_eq!(found.first_sent_unix_ms, 5e3);
        assert_eq!(found.to_inventory_ms, 12.0);
        assert_eq!(found.to_confirmation_ms, 10.0);
        let mut empty = full;
        empty[0] = Some(0.0);
        assert!(slowest(&empty, 100, Vec::new(), 0.0).is_none(), "no sagas");
        let mut missing = full;
        missing[3] = None;
        assert!(slowest(&missing, 100, Vec::new(), 0.0).is_none(), "a mean missing");
        assert!(slowest(&full[..7], 100, Vec::new(), 0.0).is_none(), "too short");
    }

    #[test]
    fn each_burst_is_lined_up_with_the_machine_from_the_first_saga_sent() {
        let full = [1.0, 30.0, 2.0, 12.0, 1.0, 5.0, 10.0, 1.0].map(Some);
        let found = slowest(&full, 100, bursts(vec![0.5, 1.5], vec![40.0, 2.0]), 10_000.0);
        let mut legs = Legs {
            sagas: 1,
            to_start_ms: None,
            to_inventory_ms: Percentiles::default(),
            in_inventory_ms: Percentiles::default(),
            back_to_order_service_ms: Percentiles::default(),
            start_to_decision_ms: Percentiles::default(),
            to_confirmation_ms: None,
            slowest: found,
        };
        // The disk writes 1 MiB per 100 ms from 10 s on, and 50 MiB more
        // between 10.5 and 10.6 s.
        let samples = (0..20u32)
            .map(|i| Sample {
                unix_ms: 10_000.0 + f64::from(i) * 100.0,
                totals: MachineLoad {
                    disk_written_mib: Some(f64::from(i) + if i > 5 { 50.0 } else { 0.0 }),
                    ..MachineLoad::default()
                },
            })
            .collect();
        legs.line_up(&Trace::new(samples));
        let slowest = legs.slowest.expect("kept");
        let written: Vec<Option<f64>> = slowest
            .bursts
            .iter()
            .map(|b| b.machine.as_ref().and_then(|m| m.disk_written_mib))
            .collect();
        assert_eq!(
            written,
            [Some(52.0), Some(2.0)],
            "0.5 s in holds the burst, 1.5 s in does not"
        );
        let typical = slowest.typical_machine.expect("a long trace");
        assert_eq!(typical.disk_written_mib, Some(2.0));
        assert_eq!(typical.io_stalled_ms, None, "a counter absent from the samples");
    }
}
