//! A connection to a warehouse: its engine, a pool of sessions, and the handful of catalog
//! questions the pipeline asks (does a table exist, what are its columns, what does a query
//! return, what is a table's checksum). The engine answers each; SQL is built from
//! validated, quoted identifiers and bound values.

use crate::engine::{self, Engine};
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};

pub use crate::engine::session::{
    Bind, Conn, Pool, Row, Session, Tx, Value, execute, fetch, fetch_all, fetch_one,
    fetch_optional, get,
};

#[derive(Clone)]
pub struct Warehouse {
    pool: Pool,
    engine: &'static dyn Engine,
    url: String,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse")
            .field("engine", &self.engine.name())
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// Order-independent content checksum of a set of rows, with their count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checksum {
    pub rows: i64,
    pub digest: String,
}

impl Checksum {
    /// A checksum as stored (`rows:digest`).
    pub fn parse(stored: &str) -> Option<Checksum> {
        let (rows, digest) = stored.split_once(':')?;
        Some(Checksum {
            rows: rows.parse().ok()?,
            digest: digest.to_string(),
        })
    }
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.rows, self.digest)
    }
}

/// How an engine hashes one row for a checksum (PostgreSQL; SQLite hashes rows itself). A stored checksum says which it used (a
/// digest starting with `h` is [`RowHash::Record`]), so one recorded by an earlier version,
/// or for a table with other column types, is verified the way it was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowHash {
    /// `hashtextextended(CAST(row AS text))`: works for every column type, but turning each
    /// row into text is most of a checksum's cost.
    Text,
    /// `hash_record_extended(row)` (PostgreSQL 14+): each column's own extended hash
    /// function, the ones hash partitioning uses; about twice as fast. Needs one for every
    /// column's type (json, xml, point, ranges, composites have none).
    Record,
}

impl RowHash {
    /// The SQL expression hashing the row `alias` (a table alias or a CTE name).
    pub fn expr(self, alias: &str) -> String {
        match self {
            RowHash::Text => format!("hashtextextended(CAST({alias} AS text), 0)"),
            RowHash::Record => format!("hash_record_extended({alias}, 0)"),
        }
    }

    /// The digest of a checksum from the SQL sum of the hashes (a decimal number).
    pub fn digest(self, sum: String) -> String {
        match self {
            RowHash::Text => sum,
            RowHash::Record => format!("h{sum}"),
        }
    }

    /// How the stored checksum `rows:digest` was computed. SQLite digests are hexadecimal
    /// and never start with `h`.
    pub fn of_stored(stored: &str) -> RowHash {
        match stored.split_once(':') {
            Some((_, digest)) if digest.starts_with('h') => RowHash::Record,
            _ => RowHash::Text,
        }
    }
}

impl Warehouse {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Warehouse, BackfillError> {
        let engine = engine::for_url(url)?;
        let pool = engine
            .open(url, max_connections)
            .await
            .map_err(|e| e.context(format!("connecting to {}", redact_url(url))))?;
        Ok(Warehouse {
            pool,
            engine,
            url: url.to_string(),
        })
    }

    /// The engine this warehouse runs on.
    pub fn engine(&self) -> &'static dyn Engine {
        self.engine
    }

    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    /// A connection from the pool; it goes back when dropped.
    /// The pool itself, for engine steps that need sessions of their own (a cut-over).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn acquire(&self) -> Result<Conn, BackfillError> {
        self.pool.acquire().await
    }

    /// A transaction on a connection of its own from the pool.
    pub async fn begin(&self) -> Result<Tx<'static>, BackfillError> {
        self.pool.begin().await
    }

    /// Closes every connection of the pool and waits for those in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Fills in the schema of an unqualified table name (the session's current schema, on
    /// engines with schemas), so the name stays right whatever search path later sessions have.
    pub async fn resolve_table(&self, table: &TableName) -> Result<TableName, BackfillError> {
        if table.schema.is_some() {
            return Ok(table.clone());
        }
        let mut conn = self.acquire().await?;
        let Some(schema) = self.engine.current_schema(&mut conn).await? else {
            return Ok(table.clone());
        };
        Ok(TableName {
            schema: Some(Ident::new(&schema).map_err(|e| BackfillError::Invalid(e.to_string()))?),
            name: table.name.clone(),
        })
    }

    pub async fn table_exists(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<bool, BackfillError> {
        self.engine.table_exists(conn, table).await
    }

    /// Column names of a table, in table order.
    pub async fn table_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        self.engine.table_columns(conn, table).await
    }

    /// The table's numeric columns (integers, decimals, floats), in column order: what a
    /// diff report sums per partition.
    pub async fn numeric_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        self.engine.numeric_columns(conn, table).await
    }

    /// The column names a query returns, asked of the server without running the query.
    pub async fn describe_columns(&self, sql: &str) -> Result<Vec<String>, BackfillError> {
        self.engine.describe_columns(&self.url, sql).await
    }

    /// Whether a unique, non-partial index covers exactly the key columns.
    pub async fn has_unique_index_on(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        key: &[Ident],
    ) -> Result<bool, BackfillError> {
        let mut wanted: Vec<&str> = key.iter().map(|k| k.as_str()).collect();
        wanted.sort();
        let wanted = wanted.join(",");
        Ok(self
            .engine
            .unique_index_columns(conn, table)
            .await?
            .contains(&wanted))
    }

    /// How checksums of `table` hash its rows (see `RowHash`).
    pub async fn row_hash(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<RowHash, BackfillError> {
        self.engine.row_hash(conn, table).await
    }

    /// Checksum of the rows of `table` matching `filter` (SQL condition over alias `t`, with
    /// `binds`), hashed the fastest way the table allows.
    pub async fn checksum(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
    ) -> Result<Checksum, BackfillError> {
        let how = self.row_hash(conn, table).await?;
        self.checksum_by(conn, table, filter, binds, how).await
    }

    /// The checksum to compare with `stored`, computed the way `stored` was.
    pub async fn checksum_like(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        stored: &str,
    ) -> Result<Checksum, BackfillError> {
        self.checksum_by(conn, table, filter, binds, RowHash::of_stored(stored))
            .await
    }

    /// [`Warehouse::checksum`] with the row hash given.
    pub async fn checksum_by(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<Checksum, BackfillError> {
        self.engine.checksum(conn, table, filter, binds, how).await
    }

    /// The checksum of a whole table and, in the same scan, of the rows matching `subset`
    /// (a condition over alias `t`): equal to what `checksum_by(table, Some(subset), how)`
    /// returns.
    pub async fn checksum_with_subset(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        subset: &str,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<(Checksum, Checksum), BackfillError> {
        self.engine
            .checksum_with_subset(conn, table, subset, binds, how)
            .await
    }
}

/// The schema of a resolved table name ("main" in SQLite, where there is only one).
pub fn schema_of(table: &TableName) -> String {
    table
        .schema
        .as_ref()
        .map_or_else(|| "main".to_string(), |s| s.as_str().to_string())
}

/// `postgres://user:secret@host/db` becomes `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    redact_secrets(url)
}

/// Hides the password of every `scheme://user:password@` in a text (error messages from
/// drivers sometimes echo the URL).
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The URL runs to the next whitespace or quote; a password may contain `/` or `@`.
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '\'' | '"' | '<' | '>' | '`'))
            .unwrap_or(tail.len());
        out.push_str(&redact_url_token(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Redacts one URL without its scheme: the password of `user:password@host`, and query
/// parameters that carry secrets (`password=`, `sslpassword=`, …).
fn redact_url_token(token: &str) -> String {
    let (authority_and_path, query) = match token.find('?') {
        // A `?` inside the userinfo would be unusual; only treat it as the query start when
        // it comes after the last `@`.
        Some(q) if token.rfind('@').is_none_or(|at| at < q) => (&token[..q], Some(&token[q + 1..])),
        _ => (token, None),
    };
    let mut out = match authority_and_path.rfind('@') {
        Some(at) => {
            let userinfo = &authority_and_path[..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{}", &userinfo[..colon], &authority_and_path[at..]),
                None => authority_and_path.to_string(),
            }
        }
        None => authority_and_path.to_string(),
    };
    if let Some(query) = query {
        const SECRET_PARAMETERS: &[&str] = &[
            "password",
            "sslpassword",
            "pass",
            "pwd",
            "secret",
            "token",
            "sslkey",
        ];
        let parameters: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if SECRET_PARAMETERS.contains(&name.to_ascii_lowercase().as_str()) =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&parameters.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://bob:s3cr3t@db:5432/x"),
            "postgres://bob:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        assert_eq!(
            redact_secrets("failed to connect to postgres://a:b@h/d and amqp://u:p@q"),
            "failed to connect to postgres://a:***@h/d and amqp://u:***@q"
        );
        assert_eq!(
            redact_url("sqlite:///tmp/x.db?mode=rwc"),
            "sqlite:///tmp/x.db?mode=rwc"
        );
    }
}
