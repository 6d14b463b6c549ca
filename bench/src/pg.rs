//! PostgreSQL from the harness: throwaway databases (every name carries the harness run's
//! unique id and is dropped at the end), copies of a loaded template so every measured run
//! starts from the same data, and the checksum that verifies a published table.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

/// Runs `sql` (one statement or several) over the simple query protocol, as psql does.
pub async fn exec(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .map(|_| ())
}

/// A prepared statement for text the harness composed itself.
pub fn query(sql: &str) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    sqlx::query(AssertSqlSafe(sql.to_string()))
}

pub async fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(url)))
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    backfill_common::warehouse::redact_url(url)
}

pub async fn server_version(admin_url: &str) -> Result<String> {
    let mut conn = connect(admin_url).await?;
    let row = sqlx::query("SELECT current_setting('server_version')")
        .fetch_one(&mut conn)
        .await?;
    let version: String = row.try_get(0)?;
    conn.close().await?;
    Ok(format!("PostgreSQL {version}"))
}

/// The URL of database `name` on the admin URL's server.
pub fn database_url(admin_url: &str, name: &str) -> Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let Some(slash) = base.rfind('/').filter(|&i| i > "postgres://".len()) else {
        bail!(
            "cannot derive a database URL from {}: expected postgres://user@host:port/database",
            redact(admin_url)
        );
    };
    let mut url = format!("{}/{name}", &base[..slash]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

/// Databases this harness run created; whatever is still listed at the end is dropped.
pub struct Databases {
    admin_url: String,
    prefix: String,
    created: Mutex<Vec<String>>,
}

impl Databases {
    pub fn new(admin_url: &str, run_id: &str) -> Databases {
        Databases {
            admin_url: admin_url.to_string(),
            prefix: format!("bfbench_{run_id}"),
            created: Mutex::new(Vec::new()),
        }
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    pub fn url(&self, name: &str) -> Result<String> {
        database_url(&self.admin_url, name)
    }

    fn name(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix)
    }

    /// Creates an empty database `<prefix>_<what>` and returns its name.
    pub async fn create(&self, what: &str) -> Result<String> {
        let name = self.name(what);
        let mut admin = connect(&self.admin_url).await?;
        exec(
            &mut admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await?;
        exec(&mut admin, &format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        admin.close().await?;
        self.created.lock().expect("lock").push(name.clone());
        Ok(name)
    }

    /// A file-level copy of `template` (FILE_COPY: no WAL for the copy, and a checkpoint
    /// before it), followed by a checkpoint, so every measured run starts from the same data
    /// with nothing dirty in shared buffers.
    pub async fn copy(&self, template: &str, what: &str) -> Result<String> {
        let name = self.name(what);
        let mut admin = connect(&self.admin_url).await?;
        exec(
            &mut admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await?;
        // A connection to the template that has just closed may linger for a moment.
        let mut tries = 0;
        loop {
            match exec(
                &mut admin,
                &format!("CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY"),
            )
            .await
            {
                Ok(_) => break,
                Err(error) if tries < 50 && error.to_string().contains("being accessed") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("copying {template} to {name}"));
                }
            }
        }
        self.created.lock().expect("lock").push(name.clone());
        exec(&mut admin, "CHECKPOINT").await?;
        admin.close().await?;
        Ok(name)
    }

    pub async fn drop_database(&self, name: &str) -> Result<()> {
        let mut admin = connect(&self.admin_url).await?;
        exec(
            &mut admin,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )
        .await
        .with_context(|| format!("dropping database {name}"))?;
        admin.close().await?;
        self.created.lock().expect("lock").retain(|n| n != name);
        Ok(())
    }

    /// Drops every database still listed (at the end, and after a failure).
    pub async fn drop_all(&self) -> Result<()> {
        let names: Vec<String> = self.created.lock().expect("lock").clone();
        for name in names {
            self.drop_database(&name).await?;
        }
        Ok(())
    }
}

/// Count and order-independent hash of the given columns of `table`: what "the same result"
/// means when comparing one system's published table with another's. Columns that hold
/// `now()` (a timestamp of the run) are left out by the caller.
pub async fn checksum(conn: &mut PgConnection, table: &str, columns: &str) -> Result<String> {
    let row = query(&format!(
        "SELECT count(*), CAST(coalesce(sum(hashtextextended(concat_ws('|', {columns}), 0)), 0) AS text) FROM {table}"
    ))
    .fetch_one(&mut *conn)
    .await
    .with_context(|| format!("checksumming {table}"))?;
    let rows: i64 = row.try_get(0)?;
    let digest: String = row.try_get(1)?;
    Ok(format!("{rows} rows, sum {digest}"))
}

pub async fn scalar_i64(conn: &mut PgConnection, sql: &str) -> Result<i64> {
    let row = query(sql)
        .fetch_one(&mut *conn)
        .await
        .with_context(|| sql.to_string())?;
    Ok(row.try_get(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_host_and_options() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            database_url("postgres://u:p@h/postgres?sslmode=disable", "y").unwrap(),
            "postgres://u:p@h/y?sslmode=disable"
        );
        assert!(database_url("postgres://host", "z").is_err());
    }
}
