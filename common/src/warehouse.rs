//! A connection to a warehouse: a pool, its dialect, and the handful of catalog questions
//! the pipeline asks (does a table exist, what are its columns, what does a query return,
//! what is a table's checksum). Execution goes through sqlx's Any driver so one code path
//! serves every dialect; SQL is built from validated, quoted identifiers and bound values.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::AnyConnection;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Connection, Executor, Row, SqlSafeStr, Statement};

use crate::dialect::Dialect;
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};

#[derive(Clone)]
pub struct Warehouse {
    pub pool: AnyPool,
    pub dialect: Dialect,
    url: String,
}

impl std::fmt::Debug for Warehouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warehouse")
            .field("dialect", &self.dialect)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// A bound parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Text(String),
    Int(i64),
    Float(f64),
    Null,
}

impl From<&str> for Bind {
    fn from(value: &str) -> Self {
        Bind::Text(value.to_string())
    }
}
impl From<String> for Bind {
    fn from(value: String) -> Self {
        Bind::Text(value)
    }
}
impl From<&String> for Bind {
    fn from(value: &String) -> Self {
        Bind::Text(value.clone())
    }
}
impl From<i64> for Bind {
    fn from(value: i64) -> Self {
        Bind::Int(value)
    }
}
impl From<Option<String>> for Bind {
    fn from(value: Option<String>) -> Self {
        value.map_or(Bind::Null, Bind::Text)
    }
}

fn query_with(
    sql: &str,
    binds: &[Bind],
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    let mut query = sqlx::query(AssertSqlSafe(sql.to_string()));
    for bind in binds {
        query = match bind {
            Bind::Text(v) => query.bind(v.clone()),
            Bind::Int(v) => query.bind(*v),
            Bind::Float(v) => query.bind(*v),
            Bind::Null => query.bind(Option::<String>::None),
        };
    }
    query
}

/// Runs one statement on a connection (or transaction); returns rows affected.
pub async fn execute(
    conn: &mut AnyConnection,
    sql: &str,
    binds: &[Bind],
) -> Result<u64, BackfillError> {
    Ok(query_with(sql, binds)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

pub async fn fetch_all(
    conn: &mut AnyConnection,
    sql: &str,
    binds: &[Bind],
) -> Result<Vec<AnyRow>, BackfillError> {
    Ok(query_with(sql, binds).fetch_all(&mut *conn).await?)
}

pub async fn fetch_optional(
    conn: &mut AnyConnection,
    sql: &str,
    binds: &[Bind],
) -> Result<Option<AnyRow>, BackfillError> {
    Ok(query_with(sql, binds).fetch_optional(&mut *conn).await?)
}

pub async fn fetch_one(
    conn: &mut AnyConnection,
    sql: &str,
    binds: &[Bind],
) -> Result<AnyRow, BackfillError> {
    Ok(query_with(sql, binds).fetch_one(&mut *conn).await?)
}

/// Reads a column, turning a decode failure into a permanent warehouse error.
pub fn get<T>(row: &AnyRow, index: usize) -> Result<T, BackfillError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    Ok(row.try_get::<T, _>(index)?)
}

/// Order-independent content checksum of a set of rows, with their count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checksum {
    pub rows: i64,
    pub digest: String,
}

impl std::fmt::Display for Checksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.rows, self.digest)
    }
}

/// How PostgreSQL hashes one row for a checksum. A stored checksum says which it used (a
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

/// Whether a PostgreSQL table's rows may be hashed by `hash_record_extended`: the server is
/// 14 or newer and every column's type (a domain's base type, an array's element type) is
/// one whose hash tells stored values apart exactly, not merely values its equality treats as
/// equal. Hashes follow equality, so numeric without a fixed scale (1.0 = 1.00), interval
/// ('1 day' = '24 hours'), jsonb (numbers compare by value), unpadded bpchar, citext and text
/// under a nondeterministic collation would let a checksum miss a change; those tables, and
/// every type not listed (json, xml, geometric, ranges, composites, extensions), hash text.
/// Floats hash -0 as 0: the one identity the record hash does not see. `$1` is the quoted
/// table name; the table must exist.
const RECORD_HASHABLE_SQL: &str = "SELECT CAST(current_setting('server_version_num') AS integer) >= 140000 AND NOT EXISTS (\
     SELECT 1 FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
     JOIN pg_catalog.pg_type e ON e.oid = CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 AND b.typlen = -1 THEN b.typelem ELSE b.oid END \
     LEFT JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation \
     WHERE a.attrelid = CAST($1 AS regclass) AND a.attnum > 0 AND NOT a.attisdropped AND NOT (\
       (e.typtype = 'e' OR (e.typnamespace = CAST('pg_catalog' AS regnamespace) AND e.typname IN \
         ('int2', 'int4', 'int8', 'bool', 'date', 'timestamp', 'timestamptz', 'time', 'timetz', 'uuid', 'bytea', 'text', 'varchar', \
          'name', 'char', 'oid', 'float4', 'float8', 'inet', 'cidr', 'macaddr', 'macaddr8', 'numeric', 'bpchar'))) \
       AND (e.typname NOT IN ('numeric', 'bpchar') OR (CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END) <> -1) \
       AND coalesce(c.collisdeterministic, true)))";

impl Warehouse {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Warehouse, BackfillError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::from_url(url).ok_or_else(|| {
            BackfillError::Invalid(format!(
                "warehouse URL `{}` is not supported: use postgres://… or sqlite://…",
                redact_url(url)
            ))
        })?;
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(15));
        if dialect == Dialect::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    // Partition writers take turns on SQLite's single write lock; waiting is
                    // the right answer, not an error.
                    conn.execute("PRAGMA busy_timeout = 60000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(url).await.map_err(|e| {
            BackfillError::from(e).context(format!("connecting to {}", redact_url(url)))
        })?;
        if dialect == Dialect::Sqlite {
            let mut conn = pool.acquire().await?;
            execute(&mut conn, "PRAGMA journal_mode = WAL", &[])
                .await
                .ok();
        }
        Ok(Warehouse {
            pool,
            dialect,
            url: url.to_string(),
        })
    }

    pub fn display_url(&self) -> String {
        redact_url(&self.url)
    }

    pub async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, BackfillError> {
        Ok(self.pool.acquire().await?)
    }

    /// Fills in the schema of an unqualified PostgreSQL table name (the session's current
    /// schema), so the name stays right whatever search_path later sessions have.
    pub async fn resolve_table(&self, table: &TableName) -> Result<TableName, BackfillError> {
        if table.schema.is_some() || self.dialect == Dialect::Sqlite {
            return Ok(table.clone());
        }
        let mut conn = self.acquire().await?;
        let row = fetch_one(&mut conn, "SELECT CAST(current_schema() AS text)", &[]).await?;
        let schema: String = get(&row, 0)?;
        Ok(TableName {
            schema: Some(Ident::new(&schema).map_err(|e| BackfillError::Invalid(e.to_string()))?),
            name: table.name.clone(),
        })
    }

    pub async fn table_exists(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
    ) -> Result<bool, BackfillError> {
        let count: i64 = match self.dialect {
            Dialect::Postgres => {
                let row = fetch_one(
                    conn,
                    "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = coalesce($1, current_schema()) AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[pg_schema_bind(table), table.name.as_str().into()],
                )
                .await?;
                get(&row, 0)?
            }
            Dialect::Sqlite => {
                let row = fetch_one(
                    conn,
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
                    &[table.name.as_str().into()],
                )
                .await?;
                get(&row, 0)?
            }
        };
        Ok(count > 0)
    }

    /// Column names of a table, in table order.
    pub async fn table_columns(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        let rows = match self.dialect {
            Dialect::Postgres => {
                fetch_all(
                    conn,
                    "SELECT CAST(a.attname AS text) FROM pg_catalog.pg_attribute a \
                     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = coalesce($1, current_schema()) AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    &[pg_schema_bind(table), table.name.as_str().into()],
                )
                .await?
            }
            Dialect::Sqlite => {
                fetch_all(conn, "SELECT name FROM pragma_table_info($1) ORDER BY cid", &[table.name.as_str().into()]).await?
            }
        };
        rows.iter().map(|r| get::<String>(r, 0)).collect()
    }

    /// The table's numeric columns (integers, decimals, floats), in column order: what a
    /// diff report sums per partition.
    pub async fn numeric_columns(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        let rows = match self.dialect {
            Dialect::Postgres => {
                fetch_all(
                    conn,
                    "SELECT CAST(a.attname AS text) FROM pg_catalog.pg_attribute a \
                     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid \
                     WHERE n.nspname = coalesce($1, current_schema()) AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                     AND ty.typcategory = 'N' ORDER BY a.attnum",
                    &[pg_schema_bind(table), table.name.as_str().into()],
                )
                .await?
            }
            Dialect::Sqlite => {
                // SQLite's type affinity rules: INT, REAL, FLOA, DOUB, NUM, DEC.
                fetch_all(
                    conn,
                    "SELECT name FROM pragma_table_info($1) WHERE upper(type) LIKE '%INT%' OR upper(type) LIKE '%REAL%' \
                     OR upper(type) LIKE '%FLOA%' OR upper(type) LIKE '%DOUB%' OR upper(type) LIKE '%NUM%' OR upper(type) LIKE '%DEC%' ORDER BY cid",
                    &[table.name.as_str().into()],
                )
                .await?
            }
        };
        rows.iter().map(|r| get::<String>(r, 0)).collect()
    }

    /// The column names a query returns, asked of the server without running the query.
    /// The Any driver cannot describe columns of types it does not read (date, numeric), so
    /// this opens one native connection.
    pub async fn describe_columns(&self, sql: &str) -> Result<Vec<String>, BackfillError> {
        let names = match self.dialect {
            Dialect::Postgres => {
                let mut conn = sqlx::postgres::PgConnection::connect(&self.url).await?;
                let statement = conn
                    .prepare(AssertSqlSafe(sql.to_string()).into_sql_str())
                    .await?;
                let names = statement
                    .columns()
                    .iter()
                    .map(|c| sqlx::Column::name(c).to_string())
                    .collect();
                conn.close().await.ok();
                names
            }
            Dialect::Sqlite => {
                let mut conn = sqlx::sqlite::SqliteConnection::connect(&self.url).await?;
                let statement = conn
                    .prepare(AssertSqlSafe(sql.to_string()).into_sql_str())
                    .await?;
                let names = statement
                    .columns()
                    .iter()
                    .map(|c| sqlx::Column::name(c).to_string())
                    .collect();
                conn.close().await.ok();
                names
            }
        };
        Ok(names)
    }

    /// Whether a unique, non-partial index covers exactly the key columns.
    pub async fn has_unique_index_on(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
        key: &[Ident],
    ) -> Result<bool, BackfillError> {
        let mut wanted: Vec<&str> = key.iter().map(|k| k.as_str()).collect();
        wanted.sort();
        let wanted = wanted.join(",");
        let found: Vec<String> = match self.dialect {
            Dialect::Postgres => {
                let rows = fetch_all(
                    conn,
                    "SELECT (SELECT string_agg(CAST(a.attname AS text), ',' ORDER BY a.attname) FROM pg_catalog.pg_attribute a \
                     WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) \
                     FROM pg_catalog.pg_index i WHERE i.indrelid = CAST($1 AS regclass) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL",
                    &[table.quoted().into()],
                )
                .await?;
                rows.iter()
                    .map(|r| get::<Option<String>>(r, 0).map(|v| v.unwrap_or_default()))
                    .collect::<Result<_, _>>()?
            }
            Dialect::Sqlite => {
                let rows = fetch_all(
                    conn,
                    "SELECT (SELECT group_concat(name, ',') FROM (SELECT ii.name FROM pragma_index_info(il.name) ii ORDER BY ii.name)) \
                     FROM pragma_index_list($1) il WHERE il.\"unique\" = 1 AND il.partial = 0",
                    &[table.name.as_str().into()],
                )
                .await?;
                rows.iter()
                    .map(|r| get::<Option<String>>(r, 0).map(|v| v.unwrap_or_default()))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(found.contains(&wanted))
    }

    /// How checksums of `table` hash its rows: by record where every column type allows it
    /// (PostgreSQL 14+), else by text. SQLite hashes rows here and ignores it.
    pub async fn row_hash(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
    ) -> Result<RowHash, BackfillError> {
        if self.dialect != Dialect::Postgres {
            return Ok(RowHash::Text);
        }
        let row = fetch_one(conn, RECORD_HASHABLE_SQL, &[table.quoted().into()]).await?;
        Ok(if get::<bool>(&row, 0)? {
            RowHash::Record
        } else {
            RowHash::Text
        })
    }

    /// Checksum of the rows of `table` matching `filter` (SQL condition over alias `t`, with
    /// `binds`), hashed the fastest way the table allows. PostgreSQL hashes each row on the
    /// server; SQLite, which has no hash function, streams each row's quoted values and
    /// hashes them here.
    pub async fn checksum(
        &self,
        conn: &mut AnyConnection,
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
        conn: &mut AnyConnection,
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
        conn: &mut AnyConnection,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<Checksum, BackfillError> {
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        match self.dialect {
            Dialect::Postgres => {
                let sql = format!(
                    "SELECT count(*), CAST(coalesce(sum({}), 0) AS text) FROM {} AS t{filter}",
                    how.expr("t"),
                    table.quoted()
                );
                let row = fetch_one(conn, &sql, binds).await?;
                Ok(Checksum {
                    rows: get(&row, 0)?,
                    digest: how.digest(get(&row, 1)?),
                })
            }
            Dialect::Sqlite => {
                let row_text = self.sqlite_row_text(conn, table).await?;
                let sql = format!("SELECT {row_text} FROM {} AS t{filter}", table.quoted());
                // Streamed: memory stays flat whatever the table's size.
                let mut rows = query_with(&sql, binds).fetch(&mut *conn);
                let mut sum: u128 = 0;
                let mut count: i64 = 0;
                while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
                    sum = sum.wrapping_add(row_hash(&get::<Vec<u8>>(&row, 0)?));
                    count += 1;
                }
                Ok(Checksum {
                    rows: count,
                    digest: format!("{sum:x}"),
                })
            }
        }
    }

    /// The checksum of a whole table and, in the same scan, of the rows matching `subset`
    /// (a condition over alias `t`): equal to what `checksum_by(table, Some(subset), how)`
    /// returns.
    pub async fn checksum_with_subset(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
        subset: &str,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<(Checksum, Checksum), BackfillError> {
        match self.dialect {
            Dialect::Postgres => {
                let sql = format!(
                    "SELECT count(*), CAST(coalesce(sum(h), 0) AS text), count(*) FILTER (WHERE s), CAST(coalesce(sum(h) FILTER (WHERE s), 0) AS text) \
                     FROM (SELECT {} AS h, coalesce(({subset}), false) AS s FROM {} AS t) AS x",
                    how.expr("t"),
                    table.quoted()
                );
                let row = fetch_one(conn, &sql, binds).await?;
                Ok((
                    Checksum {
                        rows: get(&row, 0)?,
                        digest: how.digest(get(&row, 1)?),
                    },
                    Checksum {
                        rows: get(&row, 2)?,
                        digest: how.digest(get(&row, 3)?),
                    },
                ))
            }
            Dialect::Sqlite => {
                let row_text = self.sqlite_row_text(conn, table).await?;
                let sql = format!(
                    "SELECT {row_text}, CASE WHEN coalesce(({subset}), 0) THEN 1 ELSE 0 END FROM {} AS t",
                    table.quoted()
                );
                let mut rows = query_with(&sql, binds).fetch(&mut *conn);
                let (mut all, mut all_count, mut part, mut part_count) = (0u128, 0i64, 0u128, 0i64);
                while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
                    let hash = row_hash(&get::<Vec<u8>>(&row, 0)?);
                    all = all.wrapping_add(hash);
                    all_count += 1;
                    if get::<i64>(&row, 1)? == 1 {
                        part = part.wrapping_add(hash);
                        part_count += 1;
                    }
                }
                Ok((
                    Checksum {
                        rows: all_count,
                        digest: format!("{all:x}"),
                    },
                    Checksum {
                        rows: part_count,
                        digest: format!("{part:x}"),
                    },
                ))
            }
        }
    }
}

impl Warehouse {
    /// SQLite: one row of `table` (alias `t`) as bytes, every value `quote()`d, for hashing
    /// here. Bytes, not text: SQLite's TEXT may hold bytes that are not UTF-8, which the
    /// driver cannot decode as a string (the checksum then failed every partition).
    async fn sqlite_row_text(
        &self,
        conn: &mut AnyConnection,
        table: &TableName,
    ) -> Result<String, BackfillError> {
        let columns = self.table_columns(conn, table).await?;
        let quoted = columns
            .iter()
            .map(|c| format!("quote(t.\"{}\")", c.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        Ok(format!("CAST({quoted} AS BLOB)"))
    }
}

/// A row's contribution to a SQLite checksum: the first 8 bytes of its SHA-256.
fn row_hash(row: &[u8]) -> u128 {
    let digest = Sha256::digest(row);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) as u128
}

/// The schema of a PostgreSQL table name as a bind; NULL (the current schema) when unqualified.
fn pg_schema_bind(table: &TableName) -> Bind {
    table.schema.as_ref().map(|s| s.as_str().to_string()).into()
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
