//! Why a load run could not be carried out.

use order_service::StartError;

use crate::inventory::InventoryError;

/// Why a load run failed. None of these is retried by the run itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A setting makes no sense: fix the argument.
    #[error("invalid setting: {0}")]
    Config(String),
    /// The competing process could not be started.
    #[error("could not start the competing process {program}: {source}")]
    Competitor {
        /// The program started.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// PostgreSQL cannot be reached: start it or set `DATABASE_URL`.
    #[error(
        "PostgreSQL is not reachable at {url} ({source}); start it, e.g. \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or set DATABASE_URL"
    )]
    DatabaseUnreachable {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// PostgreSQL refused a statement of the run (creating the database, the
    /// scratch table): check the role's rights.
    #[error("PostgreSQL ({url}): {what}: {source}")]
    Database {
        /// The URL, password masked.
        url: String,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// RabbitMQ cannot be reached: start it or set `RABBITMQ_URL`.
    #[error(
        "RabbitMQ is not reachable at {url} ({source}); start it: `rabbitmq-server -detached`, or set RABBITMQ_URL"
    )]
    BrokerUnreachable {
        /// The URL, password masked.
        url: String,
        /// The cause.
        #[source]
        source: saga_core::BoxError,
    },
    /// RabbitMQ refused an operation of the run (declaring, consuming).
    #[error("RabbitMQ ({url}): {what}: {source}")]
    Broker {
        /// The URL, password masked.
        url: String,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: saga_core::BoxError,
    },
    /// The in-process order service did not start.
    #[error("the order service did not start: {0}")]
    OrderService(#[source] Box<StartError>),
    /// The in-process inventory service did not start.
    #[error("the inventory service did not start: {0}")]
    Inventory(#[source] Box<InventoryError>),
    /// The order service could not be reached or never became ready.
    #[error("the order service at {addr}: {what}")]
    Grpc {
        /// Its address.
        addr: String,
        /// What went wrong.
        what: String,
    },
    /// A local resource (runtime threads, the results folder) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
