//! The provisioning database (`spec/provisioning.md` §7): SQLite in WAL mode, migrations
//! embedded and applied at open.
//!
//! Every state change that matters is one statement whose `WHERE` clause is the check
//! (`instance_id IS NULL`, `nonce = ? AND licence_id = ?`, `total_queries <= max - n`),
//! so concurrent requests cannot both pass it. A write transaction always starts with its
//! write: a deferred SQLite transaction that reads first cannot wait for the lock and
//! would fail under contention instead.

use std::path::Path;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{SqlSafeStr, Sqlite, Transaction};

use crate::Error;

/// The database file in the data directory.
pub const DB_FILE: &str = "mlcapsule.db";

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in the pool; SQLite serialises writers, readers run in parallel.
const MAX_CONNECTIONS: u32 = 4;

/// The schema's migrations, `migrations/*.sql`, embedded: what `sqlx::migrate!` would
/// make at compile time (the same versions, descriptions and checksums), without
/// sqlx's macros, which build a second SQLite for the compiler (50-64 s of one core
/// in every clean build and `cargo clippy`). A new file in `migrations/` goes here too.
fn migrator() -> Migrator {
    let migration = |version, description: &'static str, sql: &'static str| {
        Migration::new(
            version,
            description.into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    Migrator::with_migrations(vec![
        migration(
            1,
            "provisioning",
            include_str!("../migrations/0001_provisioning.sql"),
        ),
        migration(
            2,
            "detections",
            include_str!("../migrations/0002_detections.sql"),
        ),
    ])
}

/// `sqlx::FromRow` for a row struct whose fields are columns of the same names, as
/// `#[derive(sqlx::FromRow)]` would implement it (see [`migrator`] for why not the
/// derive). The field list must name every field: the struct literal checks it.
macro_rules! from_row {
    ($row:ident { $($field:ident),* $(,)? }) => {
        impl sqlx::FromRow<'_, sqlx::sqlite::SqliteRow> for $row {
            fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Self, sqlx::Error> {
                Ok($row {
                    $($field: sqlx::Row::try_get(row, stringify!($field))?,)*
                })
            }
        }
    };
}

/// A registered model.
pub(crate) struct ModelRow {
    pub name: String,
    pub sealed_key: Vec<u8>,
    pub max_queries: Option<i64>,
    pub expires: Option<String>,
}

from_row!(ModelRow {
    name,
    sealed_key,
    max_queries,
    expires
});

/// What the client-facing endpoints need of a licence.
pub(crate) struct LicenceRow {
    pub id: String,
    pub expires: Option<String>,
    pub instance_id: Option<String>,
}

from_row!(LicenceRow {
    id,
    expires,
    instance_id
});

/// A licence as an administrator sees it.
pub(crate) struct LicenceStatusRow {
    pub id: String,
    pub model_id: String,
    pub model_name: String,
    pub total_queries: i64,
    pub expires: Option<String>,
    pub created_at: i64,
    pub instance_id: Option<String>,
    pub platform: Option<String>,
    pub measurement: Option<String>,
    pub platform_id: Option<String>,
    pub provisioned_at: Option<i64>,
    pub topup_seq: i64,
    pub last_used: Option<i64>,
    pub last_used_at: Option<i64>,
    pub detections: Option<String>,
    pub detections_at: Option<i64>,
}

from_row!(LicenceStatusRow {
    id,
    model_id,
    model_name,
    total_queries,
    expires,
    created_at,
    instance_id,
    platform,
    measurement,
    platform_id,
    provisioned_at,
    topup_seq,
    last_used,
    last_used_at,
    detections,
    detections_at
});

/// What a setup needs to build the grant, read inside the provisioning transaction.
pub(crate) struct ProvisionRow {
    pub model_id: String,
    pub sealed_key: Vec<u8>,
    pub total_queries: i64,
    pub expires: Option<String>,
}

from_row!(ProvisionRow {
    model_id,
    sealed_key,
    total_queries,
    expires
});

/// The binding a successful setup records.
pub(crate) struct Binding<'a> {
    pub licence_id: &'a str,
    pub instance_id: &'a str,
    pub enclave_key: &'a str,
    pub platform: &'a str,
    pub measurement: &'a str,
    pub platform_id: &'a str,
    pub now: i64,
}

/// A top-up as issued.
pub(crate) struct TopUpRow {
    pub topup_seq: i64,
    pub total_queries: i64,
    pub expires: Option<String>,
}

from_row!(TopUpRow {
    topup_seq,
    total_queries,
    expires
});

/// Why a grant of more queries did not happen.
pub(crate) enum GrantRefusal {
    NoSuchLicence,
    ExceedsPolicy,
}

/// The database.
#[derive(Clone)]
pub(crate) struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies the migrations.
    pub(crate) async fn open(path: &Path) -> Result<Store, Error> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL, not NORMAL: a budget change must survive a power cut once answered.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        migrator().run(&pool).await?;
        Ok(Store { pool })
    }

    /// Closes every connection (checkpointing the WAL).
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts a model unless its id exists; `true` if inserted.
    pub(crate) async fn insert_model(
        &self,
        id: &str,
        name: &str,
        sealed_key: &[u8],
        max_queries: Option<i64>,
        expires: Option<&str>,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO models (id, name, sealed_key, max_queries, expires, created_at)
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(sealed_key)
        .bind(max_queries)
        .bind(expires)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The model with this id.
    pub(crate) async fn model(&self, id: &str) -> Result<Option<ModelRow>, sqlx::Error> {
        sqlx::query_as("SELECT name, sealed_key, max_queries, expires FROM models WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Inserts a new licence.
    pub(crate) async fn insert_licence(
        &self,
        id: &str,
        model_id: &str,
        token_sha256: &[u8],
        total_queries: i64,
        expires: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO licences (id, model_id, token_sha256, total_queries, expires, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(model_id)
        .bind(token_sha256)
        .bind(total_queries)
        .bind(expires)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Adds `queries` to a licence's total in one statement, unless that would pass the
    /// model's `max_queries` (or `i64::MAX`). Returns the new total.
    pub(crate) async fn grant(
        &self,
        licence_id: &str,
        queries: i64,
    ) -> Result<Result<i64, GrantRefusal>, sqlx::Error> {
        let total: Option<i64> = sqlx::query_scalar(
            "UPDATE licences SET total_queries = total_queries + ?1
             WHERE id = ?2
               AND total_queries <= 9223372036854775807 - ?1
               AND total_queries + ?1 <= COALESCE(
                     (SELECT max_queries FROM models WHERE models.id = licences.model_id),
                     9223372036854775807)
             RETURNING total_queries",
        )
        .bind(queries)
        .bind(licence_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(total) = total {
            return Ok(Ok(total));
        }
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM licences WHERE id = ?")
            .bind(licence_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(Err(if exists.is_some() {
            GrantRefusal::ExceedsPolicy
        } else {
            GrantRefusal::NoSuchLicence
        }))
    }

    /// The licence whose token has this SHA-256.
    pub(crate) async fn licence_by_token(
        &self,
        token_sha256: &[u8],
    ) -> Result<Option<LicenceRow>, sqlx::Error> {
        sqlx::query_as("SELECT id, expires, instance_id FROM licences WHERE token_sha256 = ?")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await
    }

    /// A licence's full status.
    pub(crate) async fn licence_status(
        &self,
        id: &str,
    ) -> Result<Option<LicenceStatusRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT l.id, l.model_id, m.name AS model_name, l.total_queries, l.expires,
                    l.created_at, l.instance_id, l.platform, l.measurement, l.platform_id,
                    l.provisioned_at, l.topup_seq, l.last_used, l.last_used_at,
                    l.detections, l.detections_at
             FROM licences l JOIN models m ON m.id = l.model_id
             WHERE l.id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Stores a fresh setup nonce for a licence, first dropping every expired nonce.
    pub(crate) async fn insert_nonce(
        &self,
        nonce: &[u8],
        licence_id: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM setup_nonces WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO setup_nonces (nonce, licence_id, expires_at) VALUES (?, ?, ?)")
            .bind(nonce)
            .bind(licence_id)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes the nonce if it was issued for this licence and has not expired; `true` if
    /// it was. One statement: of two requests with the same nonce, exactly one gets `true`.
    pub(crate) async fn consume_nonce(
        &self,
        nonce: &[u8],
        licence_id: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM setup_nonces WHERE nonce = ? AND licence_id = ? AND expires_at > ?",
        )
        .bind(nonce)
        .bind(licence_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Binds the licence to an instance if no instance holds it, and reads what the grant
    /// needs, in one transaction that the caller commits once the grant is sealed (so a
    /// failure there leaves the licence unprovisioned). `None` if it was already bound.
    pub(crate) async fn begin_provision(
        &self,
        b: &Binding<'_>,
    ) -> Result<Option<(Transaction<'static, Sqlite>, ProvisionRow)>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE licences
             SET instance_id = ?, enclave_key = ?, platform = ?, measurement = ?,
                 platform_id = ?, provisioned_at = ?
             WHERE id = ? AND instance_id IS NULL",
        )
        .bind(b.instance_id)
        .bind(b.enclave_key)
        .bind(b.platform)
        .bind(b.measurement)
        .bind(b.platform_id)
        .bind(b.now)
        .bind(b.licence_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let row: ProvisionRow = sqlx::query_as(
            "SELECT m.id AS model_id, m.sealed_key, l.total_queries, l.expires
             FROM licences l JOIN models m ON m.id = l.model_id
             WHERE l.id = ?",
        )
        .bind(b.licence_id)
        .fetch_one(&mut *tx)
        .await?;
        Ok(Some((tx, row)))
    }

    /// Issues the next top-up for the licence if `instance_id` holds it: increments the
    /// sequence number and records the reported usage in one statement, returning the new
    /// sequence number with the total and expiry it goes with. `None` if the instance
    /// does not hold the licence.
    pub(crate) async fn next_topup(
        &self,
        licence_id: &str,
        instance_id: &str,
        used: Option<i64>,
        detections: Option<&str>,
        now: i64,
    ) -> Result<Option<TopUpRow>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE licences
             SET topup_seq = topup_seq + 1,
                 last_used = COALESCE(?, last_used),
                 last_used_at = CASE WHEN ? IS NULL THEN last_used_at ELSE ? END,
                 detections = COALESCE(?, detections),
                 detections_at = CASE WHEN ? IS NULL THEN detections_at ELSE ? END
             WHERE id = ? AND instance_id = ?
             RETURNING topup_seq, total_queries, expires",
        )
        .bind(used)
        .bind(used)
        .bind(now)
        .bind(detections)
        .bind(detections)
        .bind(now)
        .bind(licence_id)
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `migrations/` is embedded, with the version, description and SQL
    /// that `sqlx::migrate!` would take from it (`0001_some_name.sql`: version 1,
    /// "some name"), and nothing else is.
    #[test]
    fn the_embedded_migrations_are_the_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<(i64, String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                let (version, rest) = name.split_once('_').unwrap();
                let description = rest.strip_suffix(".sql").unwrap().replace('_', " ");
                let sql = std::fs::read_to_string(&path).unwrap();
                (version.parse().unwrap(), description, sql)
            })
            .collect();
        files.sort();
        let embedded: Vec<(i64, String, String)> = migrator()
            .iter()
            .map(|m| {
                (
                    m.version,
                    m.description.to_string(),
                    m.sql.as_str().to_owned(),
                )
            })
            .collect();
        assert_eq!(embedded, files);
    }
}
