#![doc = include_str!("../README.md")]

mod error;
mod retention;
mod row;
mod store;
mod transaction;

use saga_core::Transaction;
use sqlx::PgConnection;

pub use retention::{Purged, RetentionConfig};
pub use store::{PostgresStore, PostgresStoreConfig};
pub use transaction::PostgresTransaction;

/// The embedded schema migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Creates or upgrades the store's tables. Safe when several replicas start
/// at once: sqlx's migrator holds a PostgreSQL advisory lock while it runs,
/// so one applies the migrations and the others then find them applied.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The PostgreSQL connection of a saga transaction, if `tx` is a
/// [`PostgresTransaction`]: SQL executed on it commits or rolls back
/// together with the transition (use it from an `EffectHandler` or a
/// participant's `CommandHandler`).
pub fn connection(tx: &mut dyn Transaction) -> Option<&mut PgConnection> {
    tx.backend()
        .downcast_mut::<PostgresTransaction>()
        .map(PostgresTransaction::connection)
}
