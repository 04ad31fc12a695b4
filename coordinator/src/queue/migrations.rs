//! The job queue's SQL migrations, embedded at build time (`build.rs` lists
//! `migrations/postgres` and `migrations/sqlite`), as sqlx migrators.
//!
//! Each migration is what sqlx's directory resolver makes of its file (and
//! `sqlx::migrate!` embedded before): same version, description and
//! checksum, so databases migrated by earlier builds stay valid.

use std::borrow::Cow;
use std::sync::LazyLock;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One `VERSION_DESCRIPTION.sql` file.
struct EmbeddedMigration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

fn migrator(files: &[EmbeddedMigration]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|file| {
                Migration::new(
                    file.version,
                    Cow::Borrowed(file.description),
                    MigrationType::Simple,
                    file.sql.into_sql_str(),
                    // sqlx's marker for a migration run outside a transaction
                    file.sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

/// `migrations/postgres`.
pub static POSTGRES_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(POSTGRES));

/// `migrations/sqlite`.
pub static SQLITE_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(SQLITE));

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// What sqlx's own resolver reads from `dir` at run time.
    async fn resolved(dir: &str) -> Migrator {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations")
            .join(dir);
        Migrator::new(dir.as_path()).await.unwrap()
    }

    #[tokio::test]
    async fn embedded_migrations_are_the_files_as_sqlx_reads_them() {
        for (embedded, dir) in [
            (&*POSTGRES_MIGRATOR, "postgres"),
            (&*SQLITE_MIGRATOR, "sqlite"),
        ] {
            let files = resolved(dir).await;
            let view = |m: &Migrator| -> Vec<_> {
                m.iter()
                    .map(|m| {
                        (
                            m.version,
                            m.description.to_string(),
                            m.migration_type,
                            m.sql.as_str().to_owned(),
                            m.checksum.to_vec(),
                            m.no_tx,
                        )
                    })
                    .collect()
            };
            assert!(files.iter().count() >= 2, "{dir}: no migrations found");
            assert_eq!(view(embedded), view(&files), "{dir}");
        }
    }
}
