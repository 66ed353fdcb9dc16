//! The operators' summary ([`QueryStore::summary`](saga_core::QueryStore::summary))
//! in SQL. Each query reads one of the partial indexes of
//! `migrations/0003_summary_indexes.sql`, whose predicates they repeat word
//! for word (PostgreSQL uses a partial index only when the query's condition
//! visibly implies its predicate), and each is bounded by a `LIMIT` or by the
//! time window.

use std::str::FromStr;

use saga_core::{MinuteOutcomes, SagaInstance, SagaStatus, StoreError, Summary, SummaryQuery, Timestamp, UNFINISHED};

use crate::error::{corrupt, store_error};
use crate::row::{self, instance_columns};
use crate::store::PostgresStore;

/// The predicate of `saga_instances_unfinished`.
macro_rules! unfinished {
    () => {
        "status IN ('running', 'compensating', 'needs_attention')"
    };
}

/// The predicate of `saga_history_outcomes`.
macro_rules! outcome {
    () => {
        "after->>'status' IN ('completed', 'compensated', 'needs_attention') \
         AND (before IS NULL OR before->>'status' IS DISTINCT FROM after->>'status')"
    };
}

impl PostgresStore {
    /// See [`QueryStore::summary`](saga_core::QueryStore::summary).
    pub(crate) async fn summarize(&self, query: &SummaryQuery) -> Result<Summary, StoreError> {
        let limit = i64::try_from(query.effective_limit()).unwrap_or(i64::MAX);
        let pool = self.pool();

        let counts: Vec<(String, i64)> = sqlx::query_as(concat!(
            "SELECT status, count(*) FROM saga_instances WHERE ",
            unfinished!(),
            " GROUP BY status"
        ))
        .fetch_all(pool)
        .await
        .map_err(store_error)?;
        let mut unfinished = UNFINISHED.map(|status| (status, 0));
        for (status, count) in counts {
            let status = parse_status(&status)?;
            if let Some((_, n)) = unfinished.iter_mut().find(|(s, _)| *s == status) {
                *n = u64::try_from(count).unwrap_or(0);
            }
        }

        // Whole minutes, floored also before the epoch (`%` truncates).
        let buckets: Vec<(i64, String, i64)> = sqlx::query_as(concat!(
            "SELECT at - ((at % 60000) + 60000) % 60000 AS minute, after->>'status' AS status, count(*) \
             FROM saga_history WHERE at >= $1 AND ",
            outcome!(),
            " GROUP BY 1, 2 ORDER BY 1"
        ))
        .bind(query.since.as_millis())
        .fetch_all(pool)
        .await
        .map_err(store_error)?;
        let mut per_minute: Vec<MinuteOutcomes> = Vec::new();
        for (minute, status, count) in buckets {
            let minute = Timestamp::from_millis(minute);
            if per_minute.last().is_none_or(|m| m.minute != minute) {
                per_minute.push(MinuteOutcomes::none(minute));
            }
            if let Some(bucket) = per_minute.last_mut() {
                bucket.add(parse_status(&status)?, u64::try_from(count).unwrap_or(0));
            }
        }

        let stuck = sqlx::query(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE ",
            unfinished!(),
            " AND (status = 'needs_attention' OR updated_at <= $1) ORDER BY updated_at, id LIMIT $2"
        ))
        .bind(query.stuck_since.as_millis())
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(store_error)?;
        let stuck = stuck.iter().map(row::instance).collect::<Result<Vec<_>, _>>()?;

        // The most recently changed instances are the most recently changed
        // unfinished ones and the most recently finished ones: a finished
        // instance last changed when it entered its final status, and that
        // transition is the only one of its kind in its history.
        let recent = sqlx::query(concat!(
            "(SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE ",
            unfinished!(),
            " ORDER BY updated_at DESC, id DESC LIMIT $1) \
             UNION ALL \
             (SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE id IN ( \
                 SELECT saga_id FROM saga_history WHERE ",
            outcome!(),
            " AND after->>'status' IN ('completed', 'compensated') \
                 ORDER BY at DESC, saga_id DESC LIMIT $1) \
               AND status IN ('completed', 'compensated'))"
        ))
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(store_error)?;
        let mut recent = recent
            .iter()
            .map(row::instance)
            .collect::<Result<Vec<SagaInstance>, _>>()?;
        recent.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
        recent.truncate(query.effective_limit());

        Ok(Summary {
            unfinished: unfinished.to_vec(),
            per_minute,
            recent,
            stuck,
        })
    }
}

fn parse_status(name: &str) -> Result<SagaStatus, StoreError> {
    SagaStatus::from_str(name).map_err(|e| corrupt(format!("saga status `{name}`"), e))
}
