//! The accounting of a scenario: what the client was told, what the database
//! holds, what was published, and what the stock says — read once the
//! system has gone quiet. Printed as one line per scenario (and appended to
//! `faults-logs/accounting.txt`), then asserted: nothing lost, no effect
//! twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::amqp::{CANCELLED_PROBE, CONFIRMED_PROBE, drain};
use crate::harness::{POLL, Scenario};

/// What an order ended as, in the order service's table.
pub const CONFIRMED: &str = "CONFIRMED";
/// See [`CONFIRMED`].
pub const CANCELLED: &str = "CANCELLED";

const ORDER_CONFIRMED: &str = "OrderConfirmed";
const ORDER_CANCELLED: &str = "OrderCancelled";

/// The stock a scenario's inventory was seeded with.
#[derive(Clone, Debug)]
pub struct Seed(pub BTreeMap<String, i64>);

impl Seed {
    /// `products`, `units` each.
    pub fn uniform(products: &[&str], units: i64) -> Self {
        Self(products.iter().map(|p| ((*p).to_owned(), units)).collect())
    }

    /// As `INVENTORY_SEED` reads it.
    pub fn as_env(&self) -> String {
        self.0
            .iter()
            .map(|(product, units)| format!("{product}={units}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a scenario expects the books to show.
#[derive(Clone, Copy, Default)]
pub struct Expect<'a> {
    /// The orders the client was told were placed.
    pub accepted: &'a [String],
    /// The inventory's seed, when the inventory runs: the stock must add up.
    pub seed: Option<&'a Seed>,
    /// Orders left out of the books (e.g. corrupted on purpose).
    pub set_aside: &'a [String],
}

/// A decision message: its type and id.
type Decision = (String, String);

/// Everything counted at the end of a scenario.
pub struct Ledger {
    title: &'static str,
    accepted: BTreeSet<String>,
    /// Order id → status, every order stored.
    orders: BTreeMap<String, String>,
    /// Order id → decision messages put in the order service's outbox.
    committed: HashMap<String, BTreeSet<Decision>>,
    /// Order id → decision messages taken from the probe queues (every copy).
    published: HashMap<String, Vec<Decision>>,
    stock_problems: Vec<String>,
    unsettled: Option<String>,
    quiet_in: Duration,
    notes: Vec<String>,
}

/// Waits until the scenario is quiet — no order `PENDING`, both outboxes
/// empty and (with a `seed`) the stock adding up — at most `patience`, then
/// reads the ledger. Not quiet in time is reported by the ledger, not here.
pub async fn settle(scenario: &Scenario, expect: &Expect<'_>, patience: Duration) -> Ledger {
    let Expect {
        accepted,
        seed,
        set_aside,
    } = *expect;
    let started = tokio::time::Instant::now();
    let deadline = started + patience;
    let mut unsettled: Option<String> = None;
    loop {
        let now = quiet(&scenario.db, seed, set_aside).await.err();
        if let Some(why) = now.as_ref().filter(|why| Some(*why) != unsettled.as_ref()) {
            println!("faults | {:>5.1} s: waiting: {why}", started.elapsed().as_secs_f64());
        }
        unsettled = now;
        if unsettled.is_none() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let mut orders = orders(&scenario.db).await;
    for id in set_aside {
        orders.remove(id);
    }
    let committed = committed_decisions(&scenario.db).await;
    let mut published: HashMap<String, Vec<Decision>> = HashMap::new();
    for (queue, kind) in [(CONFIRMED_PROBE, ORDER_CONFIRMED), (CANCELLED_PROBE, ORDER_CANCELLED)] {
        for taken in drain(&scenario.amqp_url, queue).await {
            let order = taken.order_id().unwrap_or_default();
            published
                .entry(order)
                .or_default()
                .push((kind.to_owned(), taken.message_id));
        }
    }
    let stock_problems = match seed {
        Some(seed) => stock_problems(&scenario.db, seed).await.unwrap_or_else(|e| vec![e]),
        None => Vec::new(),
    };
    Ledger {
        title: scenario.title,
        accepted: accepted.iter().filter(|id| !set_aside.contains(id)).cloned().collect(),
        orders,
        committed,
        published,
        stock_problems,
        unsettled: unsettled.map(|why| format!("not quiet after {patience:?}: {why}")),
        quiet_in: started.elapsed(),
        notes: vec![format!("quiet {:.1} s after the load", started.elapsed().as_secs_f64())],
    }
}

async fn quiet(db: &PgPool, seed: Option<&Seed>, set_aside: &[String]) -> Result<(), String> {
    let scalar = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(db)
            .await
            .map_err(|e| format!("`{sql}`: {e}"))
    };
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_service.orders WHERE status = 'PENDING' AND NOT (id::text = ANY($1))",
    )
    .bind(set_aside)
    .fetch_one(db)
    .await
    .map_err(|e| format!("pending orders: {e}"))?;
    if pending > 0 {
        return Err(format!("{pending} orders PENDING"));
    }
    let unsent = scalar("SELECT count(*) FROM public.saga_outbox WHERE sent_at IS NULL").await?;
    if unsent > 0 {
        return Err(format!("{unsent} order-service messages unsent"));
    }
    if let Some(seed) = seed {
        let unsent = scalar("SELECT count(*) FROM inventory.saga_outbox WHERE sent_at IS NULL").await?;
        if unsent > 0 {
            return Err(format!("{unsent} inventory messages unsent"));
        }
        let problems = stock_problems(db, seed).await?;
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
    }
    Ok(())
}

async fn orders(db: &PgPool) -> BTreeMap<String, String> {
    sqlx::query("SELECT id::text AS id, status FROM order_service.orders")
        .fetch_all(db)
        .await
        .expect("the orders table is readable")
        .iter()
        .map(|row| (row.get("id"), row.get("status")))
        .collect()
}

async fn committed_decisions(db: &PgPool) -> HashMap<String, BTreeSet<Decision>> {
    let rows = sqlx::query(
        "SELECT saga_id::text AS saga_id, kind, message_id FROM public.saga_outbox \
         WHERE kind IN ('OrderConfirmed', 'OrderCancelled')",
    )
    .fetch_all(db)
    .await
    .expect("the outbox is readable");
    let mut decisions: HashMap<String, BTreeSet<Decision>> = HashMap::new();
    for row in rows {
        let saga: Option<String> = row.get("saga_id");
        decisions
            .entry(saga.unwrap_or_default())
            .or_default()
            .insert((row.get("kind"), row.get("message_id")));
    }
    decisions
}

/// Where the stock does not add up: units appeared or vanished, a product's
/// held units differ from its reservations or from the confirmed orders, or
/// an order's status disagrees with its reservation.
async fn stock_problems(db: &PgPool, seed: &Seed) -> Result<Vec<String>, String> {
    let per_product = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_all(db)
            .await
            .map_err(|e| format!("`{sql}`: {e}"))
            .map(|rows| {
                rows.iter()
                    .map(|row| (row.get::<String, _>(0), row.get::<i64, _>(1)))
                    .collect::<HashMap<String, i64>>()
            })
    };
    let stock = sqlx::query("SELECT product_id, available, reserved FROM inventory.stock")
        .fetch_all(db)
        .await
        .map_err(|e| format!("inventory.stock: {e}"))?;
    let stock: HashMap<String, (i64, i64)> = stock
        .iter()
        .map(|row| (row.get("product_id"), (row.get("available"), row.get("reserved"))))
        .collect();
    let held = per_product(
        "SELECT i.product_id, sum(i.quantity)::bigint FROM inventory.reservation_items i \
         JOIN inventory.reservations r USING (order_id) WHERE r.status = 'reserved' GROUP BY 1",
    )
    .await?;
    let confirmed = per_product(
        "SELECT i.product_id, sum(i.quantity)::bigint FROM order_service.order_items i \
         JOIN order_service.orders o ON o.id = i.order_id WHERE o.status = 'CONFIRMED' GROUP BY 1",
    )
    .await?;
    let mut problems = Vec::new();
    for (product, initial) in &seed.0 {
        let Some(&(available, reserved)) = stock.get(product) else {
            problems.push(format!("`{product}` missing from the stock table"));
            continue;
        };
        let held = held.get(product).copied().unwrap_or(0);
        let confirmed = confirmed.get(product).copied().unwrap_or(0);
        if available + reserved != *initial {
            problems.push(format!(
                "`{product}`: {available} available + {reserved} reserved != {initial} seeded"
            ));
        }
        if reserved != held || held != confirmed {
            problems.push(format!(
                "`{product}`: {reserved} reserved, {held} held by reservations, {confirmed} in confirmed orders"
            ));
        }
    }
    let disagreeing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_service.orders o LEFT JOIN inventory.reservations r ON r.order_id = o.id::text \
         WHERE o.status <> 'PENDING' AND (o.status = 'CONFIRMED') <> (r.status IS NOT DISTINCT FROM 'reserved')",
    )
    .fetch_one(db)
    .await
    .map_err(|e| format!("reservations: {e}"))?;
    if disagreeing > 0 {
        problems.push(format!(
            "{disagreeing} decided orders whose reservation disagrees (confirmed without one, or cancelled still holding)"
        ));
    }
    Ok(problems)
}

impl Ledger {
    /// Every stored order and its status.
    pub fn orders(&self) -> &BTreeMap<String, String> {
        &self.orders
    }

    /// The status of order `id`, if stored.
    pub fn status(&self, id: &str) -> Option<&str> {
        self.orders.get(id).map(String::as_str)
    }

    /// Stored orders with `status`.
    pub fn count(&self, status: &str) -> usize {
        self.orders.values().filter(|s| *s == status).count()
    }

    /// Distinct decision messages of `kind` published for order `id`.
    pub fn published(&self, id: &str, kind: &str) -> usize {
        self.published.get(id).map_or(0, |decisions| {
            decisions
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, message)| message)
                .collect::<HashSet<_>>()
                .len()
        })
    }

    /// How long the scenario took to go quiet once [`settle`] was called.
    pub fn quiet_in(&self) -> Duration {
        self.quiet_in
    }

    /// Adds a remark to the accounting line.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Stored orders the client never saw acknowledged (the call failed or
    /// timed out, e.g. at the kill, but the order was committed).
    fn committed_unseen(&self) -> Vec<&String> {
        self.orders.keys().filter(|id| !self.accepted.contains(*id)).collect()
    }

    /// Orders lost: acknowledged but not stored, stored but never decided,
    /// or decided without the decision's event ever being published.
    fn lost(&self) -> Vec<String> {
        let mut lost = Vec::new();
        for id in &self.accepted {
            if !self.orders.contains_key(id) {
                lost.push(format!("{id} (acknowledged, not stored)"));
            }
        }
        for (id, status) in &self.orders {
            let event = match status.as_str() {
                CONFIRMED => ORDER_CONFIRMED,
                CANCELLED => ORDER_CANCELLED,
                _ => {
                    lost.push(format!("{id} (still {status})"));
                    continue;
                }
            };
            if self.published(id, event) == 0 {
                lost.push(format!("{id} ({status}, but no {event} published)"));
            }
        }
        lost
    }

    /// Orders with more than one effect: two decision messages committed or
    /// published, both kinds, or an event contradicting the stored status.
    fn duplicated(&self) -> Vec<String> {
        let mut duplicated = Vec::new();
        let ids: BTreeSet<&String> = self.committed.keys().chain(self.published.keys()).collect();
        for id in ids {
            let committed = self.committed.get(id).map_or(0, BTreeSet::len);
            let published: BTreeSet<&Decision> = self.published.get(id).into_iter().flatten().collect();
            let kinds: BTreeSet<&str> = self
                .committed
                .get(id)
                .into_iter()
                .flatten()
                .chain(published.iter().copied())
                .map(|(kind, _)| kind.as_str())
                .collect();
            let expected = match self.status(id) {
                Some(CONFIRMED) => Some(ORDER_CONFIRMED),
                Some(CANCELLED) => Some(ORDER_CANCELLED),
                _ => None,
            };
            if committed > 1 || published.len() > 1 || kinds.len() > 1 {
                duplicated.push(format!(
                    "{id} ({committed} committed, {} published: {kinds:?})",
                    published.len()
                ));
            } else if let Some(kind) = kinds.iter().next()
                && expected != Some(*kind)
            {
                duplicated.push(format!("{id} ({kind} but {:?} stored)", self.status(id)));
            }
        }
        duplicated
    }

    /// Copies of one message delivered more than once (allowed: at least once).
    fn extra_copies(&self) -> usize {
        self.published
            .values()
            .map(|decisions| decisions.len() - decisions.iter().collect::<HashSet<_>>().len())
            .sum()
    }

    /// The accounting line.
    pub fn line(&self) -> String {
        let finished = self.count(CONFIRMED) + self.count(CANCELLED);
        let mut line = format!(
            "faults | {}: accepted {} (+{} committed, reply unseen), finished {finished} of {} stored \
             ({} confirmed, {} cancelled), lost {}, duplicated effects {} (redelivered copies {}), stock {}",
            self.title,
            self.accepted.len(),
            self.committed_unseen().len(),
            self.orders.len(),
            self.count(CONFIRMED),
            self.count(CANCELLED),
            self.lost().len(),
            self.duplicated().len(),
            self.extra_copies(),
            if self.stock_problems.is_empty() {
                "ok".to_owned()
            } else {
                format!("{} problems", self.stock_problems.len())
            },
        );
        for note in &self.notes {
            let _ = write!(line, "; {note}");
        }
        line
    }

    /// Prints the accounting line (and appends it to `faults-logs/accounting.txt`),
    /// then asserts nothing was lost or done twice and the stock adds up.
    pub fn print_and_assert(&self) {
        let line = self.line();
        println!("{line}");
        let binaries = std::path::PathBuf::from(env!("CARGO_BIN_EXE_inventory-service"));
        if let Some(dir) = binaries.parent() {
            let path = dir.join("faults-logs").join("accounting.txt");
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(file, "{line}");
            }
        }
        let lost = self.lost();
        let duplicated = self.duplicated();
        let first = |list: &[String]| list.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
        assert!(
            lost.is_empty() && duplicated.is_empty() && self.stock_problems.is_empty() && self.unsettled.is_none(),
            "{line}\nunsettled: {:?}\nlost:\n  {}\nduplicated:\n  {}\nstock:\n  {}",
            self.unsettled,
            first(&lost),
            first(&duplicated),
            self.stock_problems.join("\n  ")
        );
    }
}
