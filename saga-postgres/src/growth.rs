//! Statistics for tables that are growing from nearly nothing.
//!
//! The store's connections keep generic plans (`SESSION_SETTINGS`), made
//! with the statistics of the moment. A new deployment's tables start
//! empty, so its first plans read whole tables where an index would find a
//! row, and they stay until autovacuum analyzes the tables (up to a minute,
//! more with many databases), while the tables grow by thousands of rows a
//! second. `ANALYZE` invalidates the plans that use a table, so each
//! connection plans again with the table's real size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sqlx::PgPool;

/// The store's tables whose size its statements' plans depend on, each with
/// the columns its statements look rows up by: statistics of those, and the
/// table's size, are what the plans need. (The JSON columns, the costly
/// part of a whole-table `ANALYZE`, are left to autovacuum.)
const TABLES: [(&str, &str); 4] = [
    ("saga_instances", "id, definition, key, status, deadline, revision"),
    ("saga_outbox", "id, saga_id, sent_at, claimed_until"),
    ("saga_history", "saga_id, revision, at, consumer, message_id"),
    ("saga_inbox", "consumer, message_id"),
];

/// Checks stop after this many doublings of the first threshold: past a few
/// tens of thousands of rows, index lookups win whatever the statistics
/// say, and autovacuum keeps them within 10 % of the table.
const DOUBLINGS: u32 = 6;

/// The statistics target of these analyses (PostgreSQL's default is 100):
/// a sample of 3,000 rows gives the table's size and its columns' rough
/// shape, which is what the store's plans (key lookups, partial indexes)
/// need, and takes about a third of the time of the default's 30,000
/// (131–140 against 43–62 ms at 16,000 commits in the load test), time in
/// which PostgreSQL serves the transitions less. Autovacuum's analyses
/// later use the server's target.
const STATISTICS_TARGET: u32 = 10;

/// A table is analyzed when it holds this many times the rows its
/// statistics count. Plans change with a table's size by factors, not by
/// percents; and each `ANALYZE` makes every connection plan its statements
/// again, a burst of work that holds up the transitions under way. (Rows
/// changed since the last `ANALYZE`, updates and deletes included, would
/// pass the table's size at nearly every check of a busy store.)
const OUTGROWN: f64 = 4.0;

/// Counts a store's commits and, when the count reaches the first threshold
/// and each doubling of it, analyzes the tables that hold [`OUTGROWN`] times
/// the rows their statistics count (or were never analyzed).
pub(crate) struct Growth {
    first: Option<u64>,
    commits: AtomicU64,
    running: Arc<AtomicBool>,
}

impl Growth {
    /// Checks at `first` commits and its doublings; `None` never checks.
    pub(crate) fn new(first: Option<u64>) -> Self {
        Self {
            first: first.filter(|&n| n > 0),
            commits: AtomicU64::new(0),
            running: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts one commit; at a threshold, checks (in the background) and
    /// analyzes the tables that outgrew their statistics.
    pub(crate) fn committed(&self, pool: &PgPool) {
        let Some(first) = self.first else { return };
        let count = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if !is_threshold(first, count) || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, running) = (pool.clone(), Arc::clone(&self.running));
        tokio::spawn(async move {
            let began = std::time::Instant::now();
            match analyze_outgrown(&pool).await {
                Ok(tables) if !tables.is_empty() => {
                    tracing::info!(
                        commits = count,
                        ?tables,
                        took_ms = began.elapsed().as_millis() as u64,
                        "analyzed tables that outgrew their statistics"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "could not check the saga tables' statistics"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// `first`, `2 × first`, `4 × first`, … up to [`DOUBLINGS`] doublings.
fn is_threshold(first: u64, count: u64) -> bool {
    count.is_multiple_of(first) && {
        let multiple = count / first;
        multiple.is_power_of_two() && multiple.trailing_zeros() <= DOUBLINGS
    }
}

/// Analyzes those of [`TABLES`] that hold [`OUTGROWN`] times the rows their
/// statistics count, or hold rows and were never analyzed; returns their
/// names.
async fn analyze_outgrown(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    // The tables as the connection's search_path finds them. `reltuples` is
    // -1 until a table is first analyzed.
    let outgrown: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM unnest($1::text[]) AS t(name) \
         JOIN pg_class c ON c.oid = to_regclass(t.name) \
         JOIN pg_stat_all_tables s ON s.relid = c.oid \
         WHERE s.n_live_tup > 0 AND s.n_live_tup >= $2 * greatest(c.reltuples, 0) ORDER BY c.relname",
    )
    .bind(TABLES.map(|(table, _)| table).as_slice())
    .bind(OUTGROWN)
    .fetch_all(pool)
    .await?;
    let analyzed: Vec<String> = TABLES
        .iter()
        .filter(|(table, _)| outgrown.iter().any(|name| name == table))
        .map(|(table, columns)| format!("{table} ({columns})"))
        .collect();
    if !analyzed.is_empty() {
        // Names from the fixed list above, never from input.
        let statement = format!("ANALYZE {}", analyzed.join(", "));
        let mut tx = pool.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL default_statistics_target = {STATISTICS_TARGET}"
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(outgrown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_the_first_and_its_doublings() {
        let hits: Vec<u64> = (1..=10_000).filter(|&n| is_threshold(100, n)).collect();
        assert_eq!(hits, [100, 200, 400, 800, 1_600, 3_200, 6_400]);
        assert!(is_threshold(1_000, 64_000));
        assert!(!is_threshold(1_000, 128_000), "no checks past six doublings");
        assert!(!is_threshold(1_000, 3_000));
    }
}
