//! Cleaning up what is no longer needed: consumed-message (inbox) rows,
//! sent outbox rows, and, only when configured, finished instances.

use std::time::Duration;

use saga_core::{CancellationToken, StoreError, Timestamp};

use crate::error::store_error;
use crate::store::PostgresStore;

/// How long rows are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Inbox rows older than this are deleted. It must exceed the longest
    /// time a message can be redelivered (broker retries, a relay re-sending
    /// after a crash), or a late duplicate would be applied again.
    pub inbox: Duration,
    /// Sent outbox rows older than this are deleted. Zero deletes them as
    /// soon as they are marked sent (no trace kept, least work).
    pub sent_messages: Duration,
    /// Completed or compensated instances (with their history) last changed
    /// longer ago than this are deleted. They are found through the history
    /// row of the transition that finished them, which the engine records;
    /// an instance written without its transitions is kept. The messages
    /// their transitions consumed move to the inbox, so they stay known as
    /// consumed for [`inbox`](Self::inbox), however short this is. `None`
    /// (the default) keeps them: they are the record of what happened.
    pub finished_instances: Option<Duration>,
    /// Rows deleted per statement, to keep each delete's locks short.
    pub batch_size: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            inbox: Duration::from_secs(7 * 24 * 3600),
            sent_messages: Duration::from_secs(24 * 3600),
            finished_instances: None,
            batch_size: 10_000,
        }
    }
}

/// What one [`PostgresStore::purge`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Inbox rows.
    pub inbox: u64,
    /// Sent outbox rows.
    pub sent_messages: u64,
    /// Finished instances (their history went with them).
    pub instances: u64,
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64().min(1e11)
}

impl PostgresStore {
    /// Deletes the rows the retention configuration no longer keeps, in
    /// batches. Safe to run from several replicas at once.
    pub async fn purge(&self) -> Result<Purged, StoreError> {
        let retention = &self.config().retention;
        let batch = i64::try_from(retention.batch_size.max(1)).unwrap_or(i64::MAX);
        let mut purged = Purged {
            inbox: self
                .delete_batched(
                    "DELETE FROM saga_inbox WHERE ctid IN (SELECT ctid FROM saga_inbox \
                     WHERE consumed_at < now() - $1 * interval '1 second' LIMIT $2)",
                    seconds(retention.inbox),
                    batch,
                )
                .await?,
            sent_messages: self
                .delete_batched(
                    "DELETE FROM saga_outbox WHERE id IN (SELECT id FROM saga_outbox \
                     WHERE sent_at < now() - $1 * interval '1 second' LIMIT $2)",
                    seconds(retention.sent_messages),
                    batch,
                )
                .await?,
            instances: 0,
        };
        if let Some(keep) = retention.finished_instances {
            purged.instances = self.delete_finished(Timestamp::now() - keep, batch).await?;
        }
        Ok(purged)
    }

    /// Deletes completed and compensated instances last changed before
    /// `before`, with their history. They are found through their outcome's
    /// history row (`saga_history_outcomes`, in time order), not by scanning
    /// `saga_instances`: a scan for old finished rows would read ever more
    /// of a table that keeps days of sagas, for every batch. The walk moves
    /// on past outcomes whose instance stays (it needs attention, or changed
    /// since), so each round reads each outcome once.
    async fn delete_finished(&self, before: Timestamp, batch: i64) -> Result<u64, StoreError> {
        let before = before.as_millis();
        let (mut after_at, mut after_id) = (i64::MIN, uuid::Uuid::nil());
        let mut total = 0;
        loop {
            let mut tx = self.pool().begin().await.map_err(store_error)?;
            let outcomes: Vec<(i64, uuid::Uuid)> = sqlx::query_as(concat!(
                "SELECT at, saga_id FROM saga_history WHERE ",
                outcome!(),
                " AND at < $1 AND (at, saga_id) > ($2, $3) ORDER BY at, saga_id LIMIT $4"
            ))
            .bind(before)
            .bind(after_at)
            .bind(after_id)
            .bind(batch)
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
            let Some(&(last_at, last_id)) = outcomes.last() else {
                return Ok(total);
            };
            let candidates: Vec<uuid::Uuid> = outcomes.iter().map(|(_, id)| *id).collect();
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
                "DELETE FROM saga_instances WHERE id = ANY($1) \
                 AND status IN ('completed', 'compensated') AND updated_at < $2 RETURNING id",
            )
            .bind(&candidates)
            .bind(before)
            .fetch_all(&mut *tx)
            .await
            .map_err(store_error)?;
            // The messages these sagas consumed are known as consumed by
            // their history rows: moved to the inbox, they stay known for the
            // inbox's retention, and a late redelivery is still a duplicate.
            sqlx::query(
                "INSERT INTO saga_inbox (consumer, message_id, consumed_at) \
                 SELECT consumer, message_id, to_timestamp(at / 1000.0) FROM saga_history \
                 WHERE saga_id = ANY($1) AND message_id IS NOT NULL \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?;
            sqlx::query("DELETE FROM saga_history WHERE saga_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(store_error)?;
            tx.commit().await.map_err(store_error)?;
            total += ids.len() as u64;
            if (outcomes.len() as i64) < batch {
                return Ok(total);
            }
            (after_at, after_id) = (last_at, last_id);
        }
    }

    async fn delete_batched(&self, sql: &'static str, older_than_secs: f64, batch: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(sql)
                .bind(older_than_secs)
                .bind(batch)
                .execute(self.pool())
                .await
                .map_err(store_error)?
                .rows_affected();
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Runs [`purge`](Self::purge) every `interval` until `shutdown` is
    /// cancelled; failures are logged and retried at the next round.
    pub async fn run_retention(&self, interval: Duration, shutdown: CancellationToken) {
        self.run_retention_reporting(interval, shutdown, |_, _| {}).await;
    }

    /// [`run_retention`](Self::run_retention), handing what each round
    /// deleted and how long it took to `report` (for metrics), also when it
    /// deleted nothing.
    pub async fn run_retention_reporting(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
        report: impl Fn(&Purged, Duration) + Send + Sync,
    ) {
        loop {
            let started = std::time::Instant::now();
            match self.purge().await {
                Ok(purged) => {
                    let took = started.elapsed();
                    if purged == Purged::default() {
                        tracing::debug!(took_ms = took.as_millis(), "retention ran: nothing to delete");
                    } else {
                        tracing::info!(
                            inbox = purged.inbox,
                            sent_messages = purged.sent_messages,
                            instances = purged.instances,
                            took_ms = took.as_millis(),
                            "retention deleted rows"
                        );
                    }
                    report(&purged, took);
                }
                Err(e) => tracing::warn!(error = %e, "retention failed; will retry"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}
