//! Mapping sqlx errors onto saga-core's [`StoreError`].

use saga_core::StoreError;

/// SQLSTATEs that mean "try again": sqlx classifies constraint violations
/// (`ErrorKind`) but not these, so they are named here once. Besides
/// connection trouble, the ways a production server fails for a while: a
/// failover's demoted primary (read-only), `statement_timeout` and
/// `lock_timeout` under overload, running out of disk or memory. Taking
/// them for permanent would dead-letter every message of the outage.
const TRANSIENT_SQLSTATES: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "40003", // statement_completion_unknown
    "25006", // read_only_sql_transaction
    "25P03", // idle_in_transaction_session_timeout
    "55P03", // lock_not_available
    "57014", // query_canceled
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "57P05", // idle_session_timeout
    "53000", // insufficient_resources
    "53100", // disk_full
    "53200", // out_of_memory
    "53300", // too_many_connections
    "08000", // connection_exception
    "08003", // connection_does_not_exist
    "08006", // connection_failure
    "08001", // sqlclient_unable_to_establish_sqlconnection
    "08004", // sqlserver_rejected_establishment_of_sqlconnection
    "08P01", // protocol_violation
];

/// Whether `error` is worth retrying as is (connection trouble, a server
/// restarting or failing over, a timeout, a serialization failure or
/// deadlock): the store's own classification, for an application's reads
/// of its tables beside the store.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed | sqlx::Error::Tls(_) => true,
        // A connection cut mid-exchange (e.g. during the TLS request at
        // connect) shows up as a protocol error; a fresh connection cures it.
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| TRANSIENT_SQLSTATES.contains(&code.as_ref())),
        _ => false,
    }
}

/// The general mapping: transient → `Unavailable`, undecodable → `Corrupt`,
/// the rest → `Backend`.
pub(crate) fn store_error(error: sqlx::Error) -> StoreError {
    if is_transient(&error) {
        return StoreError::Unavailable(Box::new(error));
    }
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt {
                what: "a row".to_owned(),
                source: Box::new(error),
            }
        }
        other => StoreError::Backend(Box::new(other)),
    }
}

/// A row that cannot be read back as what it should be.
pub(crate) fn corrupt(what: impl Into<String>, source: impl Into<saga_core::BoxError>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_pool_timeouts_are_retryable() {
        let io = sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(store_error(io).is_retryable());
        assert!(store_error(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(store_error(sqlx::Error::Protocol("unexpected response from SSLRequest".into())).is_retryable());
        assert!(!store_error(sqlx::Error::RowNotFound).is_retryable());
        assert!(matches!(
            store_error(sqlx::Error::Decode("bad".into())),
            StoreError::Corrupt { .. }
        ));
    }
}
