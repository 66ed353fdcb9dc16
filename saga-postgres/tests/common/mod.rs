//! A fresh PostgreSQL database per test, dropped afterwards.
#![allow(dead_code)]

use std::time::Duration;

use saga_postgres::{PostgresStore, PostgresStoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server the tests use (`DATABASE_URL`, default loopback).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn admin_options() -> PgConnectOptions {
    let url = database_url();
    url.parse::<PgConnectOptions>()
        .unwrap_or_else(|e| panic!("DATABASE_URL `{url}` is not a PostgreSQL URL: {e}"))
        .log_statements(tracing::log::LevelFilter::Off)
}

async fn admin() -> PgConnection {
    match PgConnection::connect_with(&admin_options()).await {
        Ok(conn) => conn,
        // The server answered: it is up, but refuses this database or login.
        Err(e @ sqlx::Error::Database(_)) => panic!(
            "PostgreSQL at {} refused the tests' connection ({e}). They log in as DATABASE_URL \
             says (default: `postgres` without a password, trust auth on 127.0.0.1), to a \
             database that exists, as a role that may create databases.",
            database_url()
        ),
        Err(e) => panic!(
            "cannot reach PostgreSQL at {} ({e}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or point DATABASE_URL at a running server.",
            database_url()
        ),
    }
}

/// A database created for one test; dropped (forcibly) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub options: PgConnectOptions,
}

impl TestDb {
    /// Creates an empty database with the store's schema.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        let pool = db.pool(2).await;
        saga_postgres::migrate(&pool)
            .await
            .unwrap_or_else(|e| panic!("migrate: {e}"));
        pool.close().await;
        db
    }

    /// Creates an empty database without the schema.
    pub async fn empty() -> Self {
        let name = format!("saga_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = admin().await;
        // The name is generated here (hex only), not taken from input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let _ = conn.close().await;
        Self {
            options: admin_options().database(&name),
            name,
        }
    }

    /// A new pool on the test database.
    pub async fn pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(self.options.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {}: {e}", self.name))
    }

    /// A store on a new pool of `size` connections.
    pub async fn store(&self, size: u32) -> PostgresStore {
        PostgresStore::new(self.pool(size).await)
    }

    /// A store on a new pool, configured.
    pub async fn store_with(&self, size: u32, config: PostgresStoreConfig) -> PostgresStore {
        PostgresStore::with_config(self.pool(size).await, config)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: drop the database from a thread with its own runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let Ok(runtime) = runtime else { return };
            runtime.block_on(async move {
                let Ok(mut conn) = PgConnection::connect_with(&admin_options()).await else {
                    return;
                };
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
                let _ = conn.close().await;
            });
        });
        let _ = dropped.join();
    }
}
