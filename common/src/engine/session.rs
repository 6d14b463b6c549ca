//! How statements run, whatever the engine: a [`Session`] is a pooled connection ([`Conn`])
//! or a transaction on one ([`Tx`]); rows come back as our own [`Row`] of [`Value`]s. The
//! pipeline talks to these types only, never to a driver's, so an engine that sqlx does not
//! drive (DuckDB) can stand behind the same calls. PostgreSQL, SQLite and MySQL run through
//! sqlx's Any driver.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{Any, AnyConnection, AssertSqlSafe, Connection, Row as _, ValueRef as _};

use super::{Engine, ErrorClass};
use crate::error::BackfillError;

/// Something statements run on: a pooled connection or an open transaction. Functions that
/// only run statements take `&mut dyn Session`, so they serve both.
pub trait Session: Send {
    /// The driver connection underneath. Only this module matches on it.
    #[doc(hidden)]
    fn backend(&mut self) -> Backend<'_>;
}

/// The driver connection a session runs on.
#[doc(hidden)]
pub enum Backend<'a> {
    Sqlx(&'a mut AnyConnection),
}

/// A warehouse's pool of sessions, opened by its engine.
#[derive(Clone)]
pub struct Pool {
    inner: PoolInner,
}

#[derive(Clone)]
enum PoolInner {
    Sqlx(sqlx::AnyPool),
}

impl Pool {
    pub(crate) fn from_sqlx(pool: sqlx::AnyPool) -> Pool {
        Pool {
            inner: PoolInner::Sqlx(pool),
        }
    }

    /// A connection from the pool; it goes back when dropped.
    pub async fn acquire(&self) -> Result<Conn, BackfillError> {
        match &self.inner {
            PoolInner::Sqlx(pool) => Ok(Conn {
                inner: ConnInner::Sqlx(pool.acquire().await?),
            }),
        }
    }

    /// A transaction on a connection of its own.
    pub async fn begin(&self) -> Result<Tx<'static>, BackfillError> {
        match &self.inner {
            PoolInner::Sqlx(pool) => Ok(Tx {
                inner: TxInner::Sqlx(pool.begin().await?),
            }),
        }
    }

    /// Closes every connection and waits for those in use to come back.
    pub async fn close(&self) {
        match &self.inner {
            PoolInner::Sqlx(pool) => pool.close().await,
        }
    }
}

/// A connection taken from a warehouse's pool; it goes back when dropped.
pub struct Conn {
    inner: ConnInner,
}

enum ConnInner {
    Sqlx(sqlx::pool::PoolConnection<Any>),
}

impl Conn {
    /// Starts a transaction on this connection; dropping it uncommitted rolls it back.
    pub async fn begin(&mut self) -> Result<Tx<'_>, BackfillError> {
        match &mut self.inner {
            ConnInner::Sqlx(conn) => Ok(Tx {
                inner: TxInner::Sqlx(Connection::begin(&mut **conn).await?),
            }),
        }
    }

    /// Closes the connection instead of returning it to the pool (after a session setting
    /// that must not outlive this use, or a statement that may still be running).
    pub fn close_on_drop(&mut self) {
        match &mut self.inner {
            ConnInner::Sqlx(conn) => conn.close_on_drop(),
        }
    }
}

impl Session for Conn {
    fn backend(&mut self) -> Backend<'_> {
        match &mut self.inner {
            ConnInner::Sqlx(conn) => Backend::Sqlx(conn),
        }
    }
}

/// An open transaction. `commit` makes it durable; dropping it, or `rollback`, undoes it.
pub struct Tx<'c> {
    inner: TxInner<'c>,
}

enum TxInner<'c> {
    Sqlx(sqlx::Transaction<'c, Any>),
}

impl Tx<'_> {
    pub async fn commit(self) -> Result<(), BackfillError> {
        match self.inner {
            TxInner::Sqlx(tx) => Ok(tx.commit().await?),
        }
    }

    pub async fn rollback(self) -> Result<(), BackfillError> {
        match self.inner {
            TxInner::Sqlx(tx) => Ok(tx.rollback().await?),
        }
    }
}

impl Session for Tx<'_> {
    fn backend(&mut self) -> Backend<'_> {
        match &mut self.inner {
            TxInner::Sqlx(tx) => Backend::Sqlx(tx),
        }
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

/// One value read back. Statements cast what they read to these few types in SQL (the
/// engine's `bigint`, `double`, text), so every engine returns the same shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One row read back, its values in select-list order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    pub fn new(values: Vec<Value>) -> Row {
        Row { values }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn value(&self, index: usize) -> Option<&Value> {
        self.values.get(index)
    }
}

/// A Rust type a [`Value`] can be read as. Reading is strict, as the drivers are: an integer
/// is not read as text, nor a float as an integer.
pub trait FromValue: Sized {
    /// The type's name, for errors.
    const NAME: &'static str;
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    const NAME: &'static str = "an integer";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    const NAME: &'static str = "a float";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Float(v) => Some(*v),
            _ => None,
        }
    }
}

impl FromValue for bool {
    const NAME: &'static str = "a boolean";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(v) => Some(*v),
            _ => None,
        }
    }
}

impl FromValue for String {
    const NAME: &'static str = "text";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    const NAME: &'static str = "bytes";
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bytes(v) => Some(v.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const NAME: &'static str = T::NAME;
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// Reads a column, turning a missing column or another type into a permanent warehouse error.
pub fn get<T: FromValue>(row: &Row, index: usize) -> Result<T, BackfillError> {
    let value = row.values.get(index).ok_or_else(|| {
        BackfillError::warehouse_permanent(format!(
            "column {index} is out of bounds (the row has {})",
            row.values.len()
        ))
    })?;
    T::from_value(value).ok_or_else(|| {
        BackfillError::warehouse_permanent(format!(
            "column {index}: expected {}, got {value:?}",
            T::NAME
        ))
    })
}

/// The statement as the connection's driver takes it. The pipeline numbers parameters
/// (`$1`, `$2`, a number used twice binds one value twice); MySQL's protocol takes `?` in
/// order, so there each `$n` becomes `?` and the binds follow the order of use.
fn sqlx_query<'q>(
    conn: &AnyConnection,
    sql: &str,
    binds: &[Bind],
) -> Result<sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>, BackfillError> {
    if conn.backend_name() == <sqlx::MySql as sqlx::Database>::NAME {
        let (sql, order) = crate::sql::positional_placeholders(sql).map_err(|e| {
            BackfillError::warehouse_permanent(format!(
                "cannot bind this statement's parameters: {e}"
            ))
        })?;
        let ordered = order
            .iter()
            .map(|&i| {
                binds.get(i).cloned().ok_or_else(|| {
                    BackfillError::warehouse_permanent(format!(
                        "the statement uses ${} but {} value(s) are bound",
                        i + 1,
                        binds.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(bind_all(sqlx::query(AssertSqlSafe(sql)), &ordered));
    }
    Ok(bind_all(sqlx::query(AssertSqlSafe(sql.to_string())), binds))
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
    binds: &[Bind],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments> {
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

fn from_sqlx_row(row: &AnyRow) -> Result<Row, BackfillError> {
    let mut values = Vec::with_capacity(row.columns().len());
    for index in 0..row.columns().len() {
        let raw = row.try_get_raw(index)?;
        if raw.is_null() {
            values.push(Value::Null);
            continue;
        }
        let kind = raw.type_info().kind();
        values.push(match kind {
            AnyTypeInfoKind::Null => Value::Null,
            AnyTypeInfoKind::Bool => Value::Bool(row.try_get(index)?),
            AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
                Value::Int(row.try_get(index)?)
            }
            AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => Value::Float(row.try_get(index)?),
            AnyTypeInfoKind::Text => Value::Text(row.try_get(index)?),
            AnyTypeInfoKind::Blob => Value::Bytes(row.try_get(index)?),
        });
    }
    Ok(Row { values })
}

/// Runs one statement; returns the rows it affected.
pub async fn execute(
    session: &mut dyn Session,
    sql: &str,
    binds: &[Bind],
) -> Result<u64, BackfillError> {
    match session.backend() {
        Backend::Sqlx(conn) => Ok(sqlx_query(conn, sql, binds)?
            .execute(&mut *conn)
            .await?
            .rows_affected()),
    }
}

/// Runs one statement over the text protocol, unprepared and without parameters: for the
/// few statements a server refuses to prepare (MySQL 8: `LOCK TABLES`, `UNLOCK TABLES`).
pub async fn execute_unprepared(
    session: &mut dyn Session,
    sql: &str,
) -> Result<u64, BackfillError> {
    match session.backend() {
        Backend::Sqlx(conn) => Ok(sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut *conn)
            .await?
            .rows_affected()),
    }
}

pub async fn fetch_all(
    session: &mut dyn Session,
    sql: &str,
    binds: &[Bind],
) -> Result<Vec<Row>, BackfillError> {
    match session.backend() {
        Backend::Sqlx(conn) => sqlx_query(conn, sql, binds)?
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(from_sqlx_row)
            .collect(),
    }
}

pub async fn fetch_optional(
    session: &mut dyn Session,
    sql: &str,
    binds: &[Bind],
) -> Result<Option<Row>, BackfillError> {
    match session.backend() {
        Backend::Sqlx(conn) => sqlx_query(conn, sql, binds)?
            .fetch_optional(&mut *conn)
            .await?
            .as_ref()
            .map(from_sqlx_row)
            .transpose(),
    }
}

pub async fn fetch_one(
    session: &mut dyn Session,
    sql: &str,
    binds: &[Bind],
) -> Result<Row, BackfillError> {
    fetch_optional(session, sql, binds).await?.ok_or_else(|| {
        BackfillError::warehouse_permanent("a statement expected to return a row returned none")
    })
}

/// The rows of a query as a stream: memory stays flat whatever the result's size.
pub fn fetch<'a>(
    session: &'a mut dyn Session,
    sql: &'a str,
    binds: &'a [Bind],
) -> BoxStream<'a, Result<Row, BackfillError>> {
    match session.backend() {
        Backend::Sqlx(conn) => match sqlx_query(conn, sql, binds) {
            Ok(query) => query.fetch(conn).map(|row| from_sqlx_row(&row?)).boxed(),
            Err(error) => futures_util::stream::once(async move { Err(error) }).boxed(),
        },
    }
}

/// What a sqlx error means, asked of the engine that raised it (each engine reads only its
/// own codes: read as a SQLite code, the SQLSTATE 42501 ends in the byte of SQLITE_BUSY).
pub(crate) fn classify_sqlx_error(error: &sqlx::Error) -> (ErrorClass, Option<String>) {
    match error {
        sqlx::Error::Database(db) => {
            let sqlstate = || db.code().map(|c| c.to_string());
            let (engine, code): (Option<&dyn Engine>, Option<String>) =
                if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                    // The server's error number, not the SQLSTATE (23000 is any integrity error).
                    (Some(&super::mysql::Mysql), Some(mysql.number().to_string()))
                } else if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    (Some(&super::postgres::Postgres), sqlstate())
                } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    (Some(&super::sqlite::Sqlite), sqlstate())
                } else {
                    (None, sqlstate())
                };
            let class = match (engine, &code) {
                (Some(engine), Some(code)) => engine.classify(code),
                _ => ErrorClass::Permanent,
            };
            (class, code)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => (ErrorClass::Transient, None),
        _ => (ErrorClass::Permanent, None),
    }
}

/// The column names a query returns, asked of the server over one native sqlx connection of
/// type `C` without running the query (the Any driver cannot describe columns of types it
/// does not read, such as date and numeric).
pub(crate) async fn describe_with_native<C>(
    url: &str,
    sql: &str,
) -> Result<Vec<String>, BackfillError>
where
    C: Connection,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
{
    use sqlx::{Executor as _, SqlSafeStr as _, Statement as _};
    let mut conn = C::connect(url).await?;
    let names = conn
        .prepare(AssertSqlSafe(sql.to_string()).into_sql_str())
        .await?
        .columns()
        .iter()
        .map(|c| sqlx::Column::name(c).to_string())
        .collect();
    conn.close().await.ok();
    Ok(names)
}
