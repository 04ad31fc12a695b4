//! Embeds the job queue's SQL migrations (`migrations/postgres`,
//! `migrations/sqlite`) in the crate: writes `$OUT_DIR/migrations.rs`, one
//! `include_str!` per `VERSION_DESCRIPTION.sql` file in version order, and
//! reruns when a file of `migrations/` changes. (What `sqlx::migrate!` does,
//! without compiling sqlx's macros and both database drivers a second time
//! for the compiler; `queue::migrations` builds the migrators from it.)

use std::error::Error;
use std::fmt::Write;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("../migrations");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut out = String::new();
    for backend in ["postgres", "sqlite"] {
        writeln!(
            out,
            "const {}: &[EmbeddedMigration] = &[",
            backend.to_uppercase()
        )?;
        for file in migrations(&root.join(backend))? {
            writeln!(
                out,
                "    EmbeddedMigration {{ version: {}, description: {:?}, sql: include_str!({:?}) }},",
                file.version,
                file.description,
                file.path.display().to_string()
            )?;
        }
        writeln!(out, "];")?;
    }
    let generated = Path::new(&std::env::var("OUT_DIR")?).join("migrations.rs");
    std::fs::write(generated, out)?;
    Ok(())
}

/// One `VERSION_DESCRIPTION.sql` file.
struct MigrationFile {
    version: i64,
    /// The name after the version, `_` as spaces (as sqlx names it).
    description: String,
    /// Absolute.
    path: PathBuf,
}

/// The `.sql` files of `dir`, in version order.
fn migrations(dir: &Path) -> Result<Vec<MigrationFile>, Box<dyn Error>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry?.path().canonicalize()?;
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let parsed = stem
            .split_once('_')
            .and_then(|(version, description)| Some((version.parse::<i64>().ok()?, description)));
        let Some((version, description)) = parsed else {
            return Err(format!(
                "{}: a migration is named VERSION_DESCRIPTION.sql (e.g. 0003_worker_pools.sql)",
                path.display()
            )
            .into());
        };
        if description.ends_with(".up") || description.ends_with(".down") {
            return Err(format!(
                "{}: reversible migrations are not supported; add the next number instead",
                path.display()
            )
            .into());
        }
        found.push(MigrationFile {
            version,
            description: description.replace('_', " "),
            path,
        });
    }
    found.sort_by_key(|file| file.version);
    if let Some(pair) = found
        .windows(2)
        .find(|pair| pair[0].version == pair[1].version)
    {
        return Err(format!(
            "{} and {} have the same version",
            pair[0].path.display(),
            pair[1].path.display()
        )
        .into());
    }
    Ok(found)
}
