#![doc = include_str!("../README.md")]

mod error;
mod growth;
#[macro_use]
mod query;
mod retention;
mod row;
mod staged;
mod statement;
mod store;
mod transaction;
mod warm;

use saga_core::{StoreError, Transaction};
use sqlx::PgConnection;

pub use error::is_transient;
pub use retention::{Purged, RetentionConfig};
pub use staged::{StagedWrite, stage};
pub use store::{PostgresStore, PostgresStoreConfig, SHORT_INBOX_RETENTION};
pub use transaction::{CommitBatching, PostgresTransaction};

/// Session settings for the connections of the store's pool, for
/// [`PgConnectOptions::options`](sqlx::postgres::PgConnectOptions::options):
///
/// - `plan_cache_mode = force_generic_plan`: the store's statements are
///   keyed lookups and array-driven writes whose best plan does not depend
///   on the values bound, so each is planned once per connection. In the
///   default mode PostgreSQL keeps custom-planning the shared statements of
///   group commit (their array lengths vary), and planning one took longer
///   than executing it (1.1 against 0.8 ms; see `docs/performance.md`).
///   A cached plan is made again when the tables' statistics change
///   (autovacuum's `ANALYZE`), so plans made on a young, empty database do
///   not stay. (The setting exists from PostgreSQL 12.)
///
/// ```
/// use sqlx::postgres::PgConnectOptions;
///
/// let options = PgConnectOptions::new().options(saga_postgres::SESSION_SETTINGS);
/// # let _ = options;
/// ```
pub const SESSION_SETTINGS: [(&str, &str); 1] = [("plan_cache_mode", "force_generic_plan")];

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
