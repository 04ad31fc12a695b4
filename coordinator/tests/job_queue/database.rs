//! A fresh Postgres database per test on the server of `DATABASE_URL`
//! (which `scripts/test.sh` sets), as `#[sqlx::test]` gives, without sqlx's
//! macros: created empty (the queue applies its own migrations) and dropped
//! once the test has passed; a failed test's database stays for inspection.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

/// A database of its own for one test.
pub(crate) struct TestDatabase {
    admin: PgConnectOptions,
    name: String,
}

impl TestDatabase {
    /// Creates an empty database with a unique name.
    pub(crate) async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL names the test Postgres server (scripts/test.sh starts one and sets it)",
        );
        let admin = PgConnectOptions::from_str(&url).expect("DATABASE_URL is a postgres:// URL");
        let name = format!("capture_queue_test_{}", uuid::Uuid::new_v4().simple());
        Self::execute(&admin, &format!("CREATE DATABASE {name}")).await;
        Self { admin, name }
    }

    /// A pool of `connections` on the database.
    pub(crate) async fn pool(&self, connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(self.admin.clone().database(&self.name))
            .await
            .expect("connect to the test database")
    }

    /// Drops the database (and whatever connections are still open to it).
    pub(crate) async fn drop_database(self) {
        let statement = format!("DROP DATABASE {} WITH (FORCE)", self.name);
        Self::execute(&self.admin, &statement).await;
    }

    async fn execute(admin: &PgConnectOptions, statement: &str) {
        let mut connection = PgConnection::connect_with(admin)
            .await
            .expect("connect to the test Postgres server (DATABASE_URL)");
        connection
            .execute(AssertSqlSafe(statement.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        connection.close().await.ok();
    }
}
