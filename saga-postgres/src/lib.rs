#![doc = include_str!("../README.md")]

mod error;
mod query;
mod retention;
mod row;
mod staged;
mod statement;
mod store;
mod transaction;

use saga_core::{StoreError, Transaction};
use sqlx::PgConnection;

pub use retention::{Purged, RetentionConfig};
pub use staged::{StagedWrite, stage};
pub use store::{PostgresStore, PostgresStoreConfig};
pub use transaction::{CommitBatching, PostgresTransaction};

/// The embedded schema migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Creates or upgrades the store's tables. Safe when several replicas start
/// at once: sqlx's migrator holds a PostgreSQL advisory lock while it runs,
/// so one applies the migrations and the others then find them applied.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The PostgreSQL connection of a saga transaction: SQL executed on it
/// commits or rolls back together with the transition. Use it from an
/// `EffectHandler` or a participant's `CommandHandler`.
///
/// The first call opens the database transaction (`BEGIN`); transitions
/// that never ask for the connection commit in a single statement.
/// [`StoreError::Backend`] if `tx` is not a [`PostgresTransaction`];
/// [`StoreError::Unavailable`] if the database cannot be reached.
pub async fn connection(tx: &mut dyn Transaction) -> Result<&mut PgConnection, StoreError> {
    match tx.backend().downcast_mut::<PostgresTransaction>() {
        Some(tx) => tx.connection().await,
        None => Err(StoreError::Backend(
            "the transaction is not a PostgresTransaction".into(),
        )),
    }
}
