//! MySQL and MariaDB (`mysql://`, `mariadb://`), InnoDB tables.
//!
//! Sessions run with `ANSI_QUOTES` (double quotes name identifiers, as everywhere else in the
//! pipeline and in standard SQL; strings take single quotes), `NO_BACKSLASH_ESCAPES` (a
//! string literal means what it says: a value ending in a backslash cannot run into the next
//! token) and `PIPES_AS_CONCAT`. A schema is a database; the control store lives in the
//! URL's database under a name prefix, beside the data it checkpoints.
//!
//! DDL is not transactional: `CREATE`, `DROP`, `ALTER` and `RENAME` commit what came before.
//! The pipeline asks `transactional_ddl` and, where it is false, creates tables before the
//! transaction that records them and drops them after the one that retires them, so that a
//! crash leaves at most a table no run names. `RENAME TABLE` cannot run in the transaction
//! that checked the target, so a table swap is a cut-over (`cut_over`: a sentry table, a
//! `LOCK TABLES … READ` and a queued rename, as gh-ost does it), recorded once the names
//! have changed; a publish that finds the names already changed records what happened (see
//! ARCHITECTURE.md, "Crash safety without transactional DDL").

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use super::{
    Capabilities, DeferredIndex, Engine, ErrorClass, FindingKind, NameFilter, PartitionMerge,
    ShapeFinding, SqlType, SwapGuard, TableSwap, ViewBinding, WriterLock, fetch_texts,
    quote_catalog_name, table_binds,
};
use crate::engine::session::Pool;
use crate::engine::session::execute_unprepared;
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};
use crate::plan::Grain;
use crate::warehouse::{Bind, Checksum, RowHash, Session, execute, fetch_one, get};

/// Server error numbers the pipeline acts on (sqlx reports them as the error's code here; the
/// SQLSTATE 23000 would not tell a duplicate key from a NULL in a NOT NULL column).
pub mod codes {
    pub const DUP_ENTRY: u16 = 1062;
    pub const DUP_UNIQUE: u16 = 1169;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    pub const LOCK_DEADLOCK: u16 = 1213;
    pub const QUERY_INTERRUPTED: u16 = 1317;
    pub const SERVER_SHUTDOWN: u16 = 1053;
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    pub const CONNECTION_KILLED: u16 = 1927;
    /// MariaDB's `max_statement_time` and MySQL's `max_execution_time`.
    pub const STATEMENT_TIMEOUT_MARIADB: u16 = 1969;
    pub const STATEMENT_TIMEOUT_MYSQL: u16 = 3024;
    pub const UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;
}

/// What every session sets before its first statement.
const SESSION_SQL_MODE: &str = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES,NO_BACKSLASH_ESCAPES,PIPES_AS_CONCAT')";

/// The MySQL / MariaDB engine.
#[derive(Debug, Clone, Copy)]
pub struct Mysql;

/// sqlx knows the scheme `mysql://` only; `mariadb://` names the same protocol.
fn driver_url(url: &str) -> String {
    match url.strip_prefix("mariadb:") {
        Some(rest) => format!("mysql:{rest}"),
        None => url.to_string(),
    }
}

/// `table_schema = …` of the table's database, or the session's.
const IN_SCHEMA: &str = "table_schema = coalesce($1, DATABASE()) AND table_name = $2";

/// One row of `t` as text every value of which is quoted (`QUOTE(NULL)` is the bare word
/// NULL, so a NULL and the string 'NULL' differ), hashed to 60 bits.
fn row_hash_expr(columns: &[String]) -> String {
    let quoted = columns
        .iter()
        // As bytes: columns of different collations cannot be concatenated as text.
        .map(|c| format!("CAST(QUOTE(t.{}) AS BINARY)", quote_catalog_name(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("CAST(CONV(LEFT(MD5(CONCAT_WS('|', {quoted})), 15), 16, 10) AS UNSIGNED)")
}

#[async_trait]
impl Engine for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn accepts_url(&self, url: &str) -> bool {
        url.starts_with("mysql:") || url.starts_with("mariadb:")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            data_modifying_cte: false,
            transactional_ddl: false,
            merge: false,
            views_bind: ViewBinding::ByName,
            partition_exchange: false,
            statement_timeout: false,
            percentiles: false,
            parallel_scans: true,
            full_outer_join: false,
        }
    }

    /// No native partitions that can be exchanged.
    fn native_partitions(&self) -> Option<&dyn super::NativePartitions> {
        None
    }

    fn classify(&self, code: &str) -> ErrorClass {
        let Ok(number) = code.parse::<u16>() else {
            return ErrorClass::Permanent;
        };
        match number {
            codes::DUP_ENTRY | codes::DUP_UNIQUE => ErrorClass::UniqueViolation,
            codes::LOCK_WAIT_TIMEOUT
            | codes::LOCK_DEADLOCK
            | codes::QUERY_INTERRUPTED
            | codes::SERVER_SHUTDOWN
            | codes::TOO_MANY_CONNECTIONS
            | codes::CONNECTION_KILLED
            | codes::STATEMENT_TIMEOUT_MARIADB
            | codes::STATEMENT_TIMEOUT_MYSQL => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }

    async fn open(&self, url: &str, max_connections: u32) -> Result<Pool, BackfillError> {
        let parsed = url::Url::parse(url).map_err(|e| {
            BackfillError::Invalid(format!(
                "warehouse URL `{}`: {e}",
                crate::warehouse::redact_url(url)
            ))
        })?;
        if parsed.path().trim_matches('/').is_empty() {
            return Err(BackfillError::Invalid(format!(
                "warehouse URL `{}` names no database: use mysql://user@host/<database>",
                crate::warehouse::redact_url(url)
            )));
        }
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(15))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(SESSION_SQL_MODE).await?;
                    // MySQL 8 cuts GROUP_CONCAT at 1024 bytes: a wide index's column list
                    // would read as another index.
                    conn.execute("SET SESSION group_concat_max_len = 1048576")
                        .await?;
                    Ok(())
                })
            })
            .connect(&driver_url(url))
            .await?;
        Ok(Pool::from_sqlx(pool))
    }

    async fn describe_columns(&self, url: &str, sql: &str) -> Result<Vec<String>, BackfillError> {
        use sqlx::{Connection as _, SqlSafeStr as _, Statement as _};
        let mut conn = sqlx::mysql::MySqlConnection::connect(&driver_url(url)).await?;
        conn.execute(SESSION_SQL_MODE).await?;
        // The spec's placeholders are `$n` in the text; MySQL prepares `?`.
        let (sql, _) = crate::sql::positional_placeholders(sql).map_err(BackfillError::Invalid)?;
        let names = conn
            .prepare(sqlx::AssertSqlSafe(sql).into_sql_str())
            .await?
            .columns()
            .iter()
            .map(|c| sqlx::Column::name(c).to_string())
            .collect();
        conn.close().await.ok();
        Ok(names)
    }

    fn placeholder(&self, n: usize) -> String {
        format!("${n}")
    }

    fn partition_bound(&self, grain: Grain, n: usize) -> String {
        match grain {
            Grain::Day => format!("CAST(${n} AS DATE)"),
            Grain::Hour => format!("CAST(${n} AS DATETIME)"),
        }
    }

    fn partition_column(&self, column: &str, _grain: Grain) -> String {
        column.to_string()
    }

    /// `<=>` is MySQL's NULL-safe equality; compared as bytes, because the usual collations
    /// ignore case, accents or trailing spaces and a backfill that fixes `usa` into `USA`
    /// must write it.
    fn distinct(&self, a: &str, b: &str) -> String {
        format!("NOT (CAST({a} AS BINARY) <=> CAST({b} AS BINARY))")
    }

    fn partition_group(&self, column: &str, grain: Grain) -> String {
        self.partition_label(column, grain)
    }

    fn group_label(&self, group: &str, _grain: Grain) -> String {
        group.to_string()
    }

    fn partition_label(&self, column: &str, grain: Grain) -> String {
        match grain {
            Grain::Day => format!("DATE_FORMAT({column}, '%Y-%m-%d')"),
            Grain::Hour => format!("DATE_FORMAT({column}, '%Y-%m-%dT%H')"),
        }
    }

    fn as_float(&self, expr: &str) -> String {
        format!("CAST({expr} AS DOUBLE)")
    }

    fn as_bigint(&self, expr: &str) -> String {
        format!("CAST({expr} AS SIGNED)")
    }

    fn as_text(&self, expr: &str) -> String {
        format!("CAST({expr} AS CHAR)")
    }

    fn sql_type(&self, sql_type: SqlType) -> &'static str {
        match sql_type {
            SqlType::BigInt => "BIGINT",
            SqlType::Double => "DOUBLE",
            SqlType::Date => "DATE",
            SqlType::Timestamp => "DATETIME(6)",
            SqlType::Amount => "DECIMAL(12,2)",
            SqlType::SerialPrimaryKey => "BIGINT AUTO_INCREMENT PRIMARY KEY",
            SqlType::Text => "LONGTEXT",
            // InnoDB indexes at most 3072 bytes per key: 255 characters of utf8mb4, three
            // of them in the widest key.
            SqlType::KeyText => "VARCHAR(255)",
        }
    }

    fn percentile(&self, _p: f64, _column: &str) -> Option<String> {
        None
    }

    /// The control store lives in the URL's database, its tables prefixed with the schema
    /// name: a database is what MySQL users are granted.
    fn control_table(&self, schema: &Ident, table: &str) -> TableName {
        TableName {
            schema: None,
            name: Ident::new(&format!("{schema}_{table}"))
                .expect("control table names are valid identifiers"),
        }
    }

    /// Temporary tables do not commit the transaction (other DDL does), and they outlive a
    /// rolled-back one: the drop also runs before the create.
    fn temp_table_from_query(&self, name: &str, query: &str) -> (String, Option<String>) {
        (
            format!("CREATE TEMPORARY TABLE {name} AS {query}"),
            Some(format!("DROP TEMPORARY TABLE IF EXISTS {name}")),
        )
    }

    /// An update of the changed rows of the partition, then an insert of the keys the
    /// shadow does not hold. `INSERT … ON DUPLICATE KEY UPDATE` would assign every matched
    /// row and evaluate later assignments against earlier ones: two statements say exactly
    /// which rows changed. A key held by another partition is neither updated nor inserted;
    /// the row count after the merge reports the collision.
    fn merge_partition(&self, merge: &PartitionMerge<'_>) -> Vec<String> {
        let shadow = merge.shadow.quoted();
        let non_key = merge.non_key();
        let mut statements = Vec::new();
        if !non_key.is_empty() {
            let changed = non_key
                .iter()
                .map(|c| self.distinct(&format!("t.{}", c.quoted()), &format!("s.{}", c.quoted())))
                .collect::<Vec<_>>()
                .join(" OR ");
            statements.push(format!(
                "UPDATE {shadow} AS t JOIN {} AS s ON {} AND {} AND ({changed}) SET {}",
                merge.source,
                merge.key_match("t", "s"),
                (merge.in_partition)("t"),
                non_key
                    .iter()
                    .map(|c| format!("t.{c} = s.{c}", c = c.quoted()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        statements.push(format!(
            "INSERT INTO {shadow} ({}) SELECT {} FROM {} AS s WHERE NOT EXISTS (SELECT 1 FROM {shadow} AS t WHERE {})",
            merge.column_list(),
            merge
                .columns
                .iter()
                .map(|c| format!("s.{}", c.quoted()))
                .collect::<Vec<_>>()
                .join(", "),
            merge.source,
            merge.key_match("t", "s")
        ));
        statements
    }

    fn create_table_like(&self, table: &TableName, like: &TableName) -> String {
        format!(
            "CREATE TABLE {} AS SELECT * FROM {} WHERE 1 = 0",
            table.quoted(),
            like.quoted()
        )
    }

    fn joined_values(&self, columns: &[String]) -> String {
        format!(
            "CONCAT_WS(', ', {})",
            columns
                .iter()
                .map(|c| self.as_text(c))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn joined_distinct(&self, expr: &str) -> String {
        format!(
            "GROUP_CONCAT(DISTINCT {} SEPARATOR ', ')",
            self.as_text(expr)
        )
    }

    fn analyze(&self, table: &TableName) -> String {
        format!("ANALYZE TABLE {}", table.quoted())
    }

    /// Single-table DELETE takes no alias on MariaDB; the multi-table form does.
    fn delete_from(&self, table: &TableName, alias: &str) -> String {
        format!("DELETE {alias} FROM {} AS {alias}", table.quoted())
    }

    fn update_from(
        &self,
        target: &TableName,
        from: &TableName,
        set: &[(String, String)],
        condition: &str,
    ) -> String {
        format!(
            "UPDATE {} AS t JOIN {} AS s ON {condition} SET {}",
            target.quoted(),
            from.quoted(),
            set.iter()
                .map(|(column, value)| format!("t.{column} = {value}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// No partial indexes: a stored generated column holds the value where the condition
    /// holds and NULL elsewhere, and a unique index on it admits any number of NULLs.
    fn partial_unique_index(
        &self,
        index: &str,
        table: &TableName,
        column: &str,
        condition: &str,
    ) -> Vec<String> {
        let generated = quote_catalog_name(&format!("{index}_key"));
        vec![
            format!(
                "ALTER TABLE {} ADD COLUMN {generated} {} AS (CASE WHEN {condition} THEN {column} END) STORED",
                table.quoted(),
                self.sql_type(SqlType::KeyText)
            ),
            format!(
                "CREATE UNIQUE INDEX {} ON {} ({generated})",
                quote_catalog_name(index),
                table.quoted()
            ),
        ]
    }

    fn drop_partial_unique_index(&self, index: &str, table: &TableName) -> Vec<String> {
        vec![format!(
            "ALTER TABLE {} DROP INDEX {}, DROP COLUMN {}",
            table.quoted(),
            quote_catalog_name(index),
            quote_catalog_name(&format!("{index}_key"))
        )]
    }

    /// A named lock: migrations' DDL commits, and a named lock outlives commits (it is
    /// released by `unlock_control_store` or when the session ends).
    async fn lock_control_store(
        &self,
        tx: &mut dyn Session,
        schema: &Ident,
    ) -> Result<(), BackfillError> {
        let row = fetch_one(
            tx,
            "SELECT CAST(coalesce(GET_LOCK(LEFT(CONCAT('backfill:', DATABASE(), ':', $1), 64), 120), 0) AS SIGNED)",
            &[schema.as_str().into()],
        )
        .await?;
        if get::<i64>(&row, 0)? != 1 {
            return Err(BackfillError::Warehouse {
                context: crate::error::Context(None),
                message: "another process held the control store's migration lock for 120 s"
                    .to_string(),
                class: ErrorClass::Transient,
                sqlstate: None,
            });
        }
        Ok(())
    }

    async fn unlock_control_store(&self, conn: &mut dyn Session) -> Result<(), BackfillError> {
        // RELEASE_ALL_LOCKS: the lock's name is not at hand, and the session holds no other.
        fetch_one(conn, "SELECT CAST(RELEASE_ALL_LOCKS() AS SIGNED)", &[]).await?;
        Ok(())
    }

    /// Row locks (`innodb_lock_wait_timeout`) and metadata locks (`lock_wait_timeout`).
    /// Session variables: the pooled session keeps the last bound set, always a bound.
    async fn set_lock_timeout(
        &self,
        tx: &mut dyn Session,
        timeout: Duration,
    ) -> Result<(), BackfillError> {
        let seconds = timeout.as_secs().max(1);
        execute(
            tx,
            &format!(
                "SET SESSION innodb_lock_wait_timeout = {seconds}, SESSION lock_wait_timeout = {seconds}"
            ),
            &[],
        )
        .await?;
        Ok(())
    }

    /// Lock waits bounded by the timeout; the statement itself is bounded by the run, which
    /// kills the query (`cancel_session`) when the partition's time is up.
    async fn begin_partition(
        &self,
        tx: &mut dyn Session,
        timeout: Duration,
    ) -> Result<Option<i64>, BackfillError> {
        self.set_lock_timeout(tx, timeout).await?;
        let row = fetch_one(tx, "SELECT CAST(CONNECTION_ID() AS SIGNED)", &[]).await?;
        Ok(Some(get(&row, 0)?))
    }

    async fn cancel_session(&self, conn: &mut dyn Session, id: i64) -> Result<(), BackfillError> {
        execute_unprepared(conn, &format!("KILL QUERY {id}")).await?;
        Ok(())
    }

    /// `LOCK TABLES` would commit the transaction: locking reads hold every row (and the gaps
    /// between them) until it ends. Plain reads go on, as on the other engines.
    async fn lock_against_writers(
        &self,
        tx: &mut dyn Session,
        table: &TableName,
        lock: WriterLock,
        wait: Duration,
    ) -> Result<(), BackfillError> {
        self.set_lock_timeout(tx, wait).await?;
        let mode = match lock {
            WriterLock::Shared => "LOCK IN SHARE MODE",
            WriterLock::Exclusive => "FOR UPDATE",
        };
        fetch_one(
            tx,
            &format!("SELECT count(*) FROM {} {mode}", table.quoted()),
            &[],
        )
        .await?;
        Ok(())
    }

    /// `RENAME TABLE` takes its own metadata locks (and swaps go through `cut_over`).
    async fn lock_for_swap(
        &self,
        _tx: &mut dyn Session,
        _table: &TableName,
        _wait: Duration,
    ) -> Result<(), BackfillError> {
        Ok(())
    }

    async fn prepare_swap(&self, _conn: &mut dyn Session, _on: bool) -> Result<(), BackfillError> {
        Ok(())
    }

    /// DDL commits: swaps go through `cut_over`, never inside a transaction.
    async fn swap_tables(
        &self,
        _tx: &mut dyn Session,
        swap: &TableSwap<'_>,
    ) -> Result<(), BackfillError> {
        Err(BackfillError::Invalid(format!(
            "{} cannot be renamed inside a transaction on MySQL (RENAME TABLE commits it); the swap is a cut-over",
            swap.current
        )))
    }

    /// The cut-over gh-ost made known. A sentry table takes the name the current table will
    /// step aside to; one session locks the current table against writers (`LOCK TABLES …
    /// READ`: readers go on) and the sentry, and runs the guard's checks. A second session
    /// queues `RENAME TABLE current TO aside, replacement TO current`, which waits for the
    /// lock. Once it is seen waiting, the first drops the sentry and unlocks: the server
    /// grants the waiting rename before the writers waiting since the checks, so their writes
    /// land in the new table, none in the archive. If the checks fail, or the rename is not
    /// seen waiting in time, the sentry stays and the rename fails on it: nothing changes.
    /// Whatever stops the process, the rename happened entirely or not at all.
    async fn cut_over(
        &self,
        pool: &Pool,
        swap: &TableSwap<'_>,
        guard: &dyn SwapGuard,
    ) -> Result<Checksum, BackfillError> {
        let (current, aside, replacement) = (swap.current, swap.aside, swap.replacement);
        let mut holder = pool.acquire().await?;
        if !self.table_exists(&mut holder, replacement).await? {
            return Err(BackfillError::Invalid(format!(
                "{replacement} no longer exists: there is nothing to swap in for {current}"
            )));
        }
        // The replacement is still there, so no rename happened: a table under the aside
        // name is the sentry of an attempt that stopped before it. Anything else under that
        // name holds data and is never dropped.
        drop_sentry(&mut holder, aside).await?;
        execute(
            &mut holder,
            &format!("CREATE TABLE {} ({SENTRY_COLUMN} int)", aside.quoted()),
            &[],
        )
        .await?;
        self.set_lock_timeout(&mut holder, swap.lock_wait).await?;
        // Under LOCK TABLES a statement may use only the names and aliases locked: the
        // guard's checks read the target as `t` (a table named `t` is its own alias).
        let as_t = if current.name.as_str().eq_ignore_ascii_case("t") {
            String::new()
        } else {
            format!(", {} AS t READ", current.quoted())
        };
        // Over the text protocol: MySQL 8 does not prepare LOCK TABLES.
        let locked = execute_unprepared(
            &mut holder,
            &format!(
                "LOCK TABLES {} READ{as_t}, {} WRITE",
                current.quoted(),
                aside.quoted()
            ),
        )
        .await;
        let held = match locked {
            Ok(_) => hold_and_rename(pool, &mut holder, swap, guard).await,
            Err(error) => Held {
                checked: Err(error.context(format!("locking {current} for the swap"))),
                released: false,
                rename: None,
            },
        };
        // Never leave the pooled session holding table locks.
        if execute_unprepared(&mut holder, "UNLOCK TABLES")
            .await
            .is_err()
        {
            holder.close_on_drop();
        }
        // The rename, once queued, is awaited before anything else touches the sentry, and
        // its result decides: a rename that succeeded swapped the names.
        let renamed = match held.rename {
            Some(task) => Some(task.await.unwrap_or_else(|e| {
                Err(BackfillError::Invalid(format!(
                    "the rename's task stopped: {e}"
                )))
            })),
            None => None,
        };
        match (held.checked, renamed) {
            (Ok(checked), Some(Ok(_))) => Ok(checked),
            // The rename failed on its own (a lock wait bound, a lost session): atomic, it
            // changed nothing. The sentry is gone if it was released.
            (Ok(_), Some(Err(error))) => {
                if !held.released {
                    drop_sentry(&mut holder, aside).await.ok();
                }
                Err(error.context(format!("renaming {replacement} into {current}")))
            }
            (Ok(_), None) => Err(BackfillError::Invalid("the rename was never queued".into())),
            (Err(error), _) => {
                // The checks failed or the rename did not queue in time: the sentry kept the
                // rename from happening. Remove it.
                drop_sentry(&mut holder, aside).await.ok();
                Err(error)
            }
        }
    }

    /// Index names belong to their table: a table made `LIKE` another has its index names.
    async fn hand_over_index_names(
        &self,
        _tx: &mut dyn Session,
        _outgoing: &TableName,
        _incoming: &TableName,
        _suffix: &str,
        _takes_names: &NameFilter<'_>,
    ) -> Result<(), BackfillError> {
        Ok(())
    }

    async fn current_schema(
        &self,
        conn: &mut dyn Session,
    ) -> Result<Option<String>, BackfillError> {
        let row = fetch_one(conn, "SELECT DATABASE()", &[]).await?;
        get(&row, 0)
    }

    async fn table_exists(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<bool, BackfillError> {
        let row = fetch_one(
            conn,
            &format!(
                "SELECT count(*) FROM information_schema.tables WHERE {IN_SCHEMA} AND table_type IN ('BASE TABLE', 'SYSTEM VERSIONED')"
            ),
            &table_binds(table),
        )
        .await?;
        Ok(get::<i64>(&row, 0)? > 0)
    }

    /// Generated columns are left out: they cannot be written. (MySQL 8 also says
    /// `DEFAULT_GENERATED` of a column with an expression default, which is written.)
    async fn table_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            &format!(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns WHERE {IN_SCHEMA} \
                 AND extra NOT REGEXP 'VIRTUAL|STORED|PERSISTENT' ORDER BY ordinal_position"
            ),
            &table_binds(table),
        )
        .await
    }

    async fn numeric_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            &format!(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns WHERE {IN_SCHEMA} \
                 AND data_type IN ('tinyint', 'smallint', 'mediumint', 'int', 'bigint', 'decimal', 'float', 'double') \
                 ORDER BY ordinal_position"
            ),
            &table_binds(table),
        )
        .await
    }

    /// JSON is text on MariaDB and compares as such; every other type has `<=>`.
    async fn text_compared_columns(
        &self,
        _conn: &mut dyn Session,
        _table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        Ok(Vec::new())
    }

    /// Unique indexes whose every column is indexed whole (no prefix length).
    async fn unique_index_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            &format!(
                "SELECT CAST(GROUP_CONCAT(column_name ORDER BY column_name SEPARATOR ',') AS CHAR) \
                 FROM information_schema.statistics WHERE {IN_SCHEMA} AND non_unique = 0 \
                 GROUP BY index_name HAVING sum(sub_part IS NOT NULL) = 0"
            ),
            &table_binds(table),
        )
        .await
    }

    async fn index_names(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            &format!(
                "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics WHERE {IN_SCHEMA}"
            ),
            &table_binds(table),
        )
        .await
    }

    async fn shape_findings(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
    ) -> Result<Vec<ShapeFinding>, BackfillError> {
        let mut findings = Vec::new();
        let checks: [(&str, &'static str); 2] = [
            (
                "SELECT CAST(CONCAT('trigger ', trigger_name) AS CHAR) FROM information_schema.triggers \
                 WHERE event_object_schema = coalesce($1, DATABASE()) AND event_object_table = $2",
                "triggers would stay with the archive",
            ),
            (
                "SELECT DISTINCT CAST(CONCAT('foreign key ', constraint_name, ' on ', table_name) AS CHAR) \
                 FROM information_schema.referential_constraints \
                 WHERE unique_constraint_schema = coalesce($1, DATABASE()) AND referenced_table_name = $2",
                "foreign keys referencing the target would follow it to the archive",
            ),
        ];
        for (sql, why) in checks {
            for what in fetch_texts(conn, sql, &table_binds(target)).await? {
                findings.push(ShapeFinding {
                    kind: FindingKind::Other,
                    what,
                    why,
                    blocks_swap_table: true,
                    blocks_swap_window: false,
                });
            }
        }
        Ok(findings)
    }

    /// `CREATE TABLE … LIKE` carries columns, keys, indexes and the table's options.
    async fn create_shadow(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
        shadow: &TableName,
    ) -> Result<(), BackfillError> {
        execute(
            conn,
            &format!("CREATE TABLE {} LIKE {}", shadow.quoted(), target.quoted()),
            &[],
        )
        .await?;
        Ok(())
    }

    /// Only `swap_table` shadows defer indexes, and it is refused here.
    async fn defer_indexes(
        &self,
        _conn: &mut dyn Session,
        _shadow: &TableName,
    ) -> Result<Vec<DeferredIndex>, BackfillError> {
        Ok(Vec::new())
    }

    /// Rows are hashed by `checksum` itself, whatever `RowHash` says.
    async fn row_hash(
        &self,
        _conn: &mut dyn Session,
        _table: &TableName,
    ) -> Result<RowHash, BackfillError> {
        Ok(RowHash::Text)
    }

    /// The exact (DECIMAL) sum of every row's 60-bit hash, on the server.
    async fn checksum(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        _how: RowHash,
    ) -> Result<Checksum, BackfillError> {
        let columns = self.table_columns(conn, table).await?;
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        let row = fetch_one(
            conn,
            &format!(
                "SELECT count(*), CAST(coalesce(sum({}), 0) AS CHAR) FROM {} AS t{filter}",
                row_hash_expr(&columns),
                table.quoted()
            ),
            binds,
        )
        .await?;
        Ok(Checksum {
            rows: get(&row, 0)?,
            digest: format!("m{}", get::<String>(&row, 1)?),
        })
    }

    async fn checksum_with_subset(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        subset: &str,
        binds: &[Bind],
        _how: RowHash,
    ) -> Result<(Checksum, Checksum), BackfillError> {
        let columns = self.table_columns(conn, table).await?;
        let row = fetch_one(
            conn,
            &format!(
                "SELECT count(*), CAST(coalesce(sum(h), 0) AS CHAR), CAST(coalesce(sum(p), 0) AS SIGNED), \
                 CAST(coalesce(sum(CASE WHEN p = 1 THEN h ELSE 0 END), 0) AS CHAR) \
                 FROM (SELECT {} AS h, CASE WHEN coalesce(({subset}), false) THEN 1 ELSE 0 END AS p FROM {} AS t) AS bf_c",
                row_hash_expr(&columns),
                table.quoted()
            ),
            binds,
        )
        .await?;
        Ok((
            Checksum {
                rows: get(&row, 0)?,
                digest: format!("m{}", get::<String>(&row, 1)?),
            },
            Checksum {
                rows: get(&row, 2)?,
                digest: format!("m{}", get::<String>(&row, 3)?),
            },
        ))
    }
}

type RenameTask = tokio::task::JoinHandle<Result<u64, BackfillError>>;

/// The one column of a sentry table: a table under the aside name with exactly this column is
/// ours to drop.
const SENTRY_COLUMN: &str = "bf_sentry";

/// Drops the sentry under `aside`, if there is one; refuses to drop anything else there.
async fn drop_sentry(
    conn: &mut crate::engine::session::Conn,
    aside: &TableName,
) -> Result<(), BackfillError> {
    if !Mysql.table_exists(conn, aside).await? {
        return Ok(());
    }
    let columns = Mysql.table_columns(conn, aside).await?;
    if columns != [SENTRY_COLUMN] {
        return Err(BackfillError::Conflict(format!(
            "{aside} exists and holds data (columns {}): a swap would rename the table into its name. \
             Nothing was swapped; rename or drop it, then publish again",
            columns.join(", ")
        )));
    }
    execute(conn, &format!("DROP TABLE {}", aside.quoted()), &[]).await?;
    Ok(())
}

/// What holding the locks came to: the guard's checksum (or why the swap must not happen),
/// whether the sentry was released (dropped), and the rename once queued.
struct Held {
    checked: Result<Checksum, BackfillError>,
    released: bool,
    rename: Option<RenameTask>,
}

/// With `holder` holding the locks: runs the guard's checks, queues the rename on a session
/// of its own, waits until the server shows it waiting for the locks, drops the sentry. The
/// rename completes once the locks are released.
async fn hold_and_rename(
    pool: &Pool,
    holder: &mut crate::engine::session::Conn,
    swap: &TableSwap<'_>,
    guard: &dyn SwapGuard,
) -> Held {
    let refused = |checked| Held {
        checked,
        released: false,
        rename: None,
    };
    let checked = match guard.check(holder).await {
        Ok(checked) => checked,
        Err(error) => return refused(Err(error)),
    };
    let queued = async {
        let mut renamer = pool.acquire().await?;
        let row = fetch_one(&mut renamer, "SELECT CAST(CONNECTION_ID() AS SIGNED)", &[]).await?;
        let renamer_id: i64 = get(&row, 0)?;
        Mysql
            .set_lock_timeout(&mut renamer, Duration::from_secs(60))
            .await?;
        Ok::<_, BackfillError>((renamer, renamer_id))
    }
    .await;
    let (mut renamer, renamer_id) = match queued {
        Ok(pair) => pair,
        Err(error) => return refused(Err(error)),
    };
    let rename = format!(
        "RENAME TABLE {} TO {}, {} TO {}",
        swap.current.quoted(),
        swap.aside.quoted(),
        swap.replacement.quoted(),
        swap.current.quoted()
    );
    let task: RenameTask = tokio::spawn(async move { execute(&mut renamer, &rename, &[]).await });
    let waiting = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let row = fetch_one(
                holder,
                "SELECT count(*) FROM information_schema.processlist WHERE id = $1 AND state LIKE 'Waiting for table metadata lock%'",
                &[renamer_id.into()],
            )
            .await?;
            if get::<i64>(&row, 0)? > 0 {
                return Ok(());
            }
            if task.is_finished() || std::time::Instant::now() > deadline {
                return Err(BackfillError::Warehouse {
                    context: crate::error::Context(None),
                    message: format!(
                        "the rename of {} did not queue for its locks within 20 s; nothing was swapped",
                        swap.replacement
                    ),
                    class: ErrorClass::Transient,
                    sqlstate: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    if let Err(error) = waiting {
        // Keep the sentry: the rename fails on it once the locks are released.
        return Held {
            checked: Err(error),
            released: false,
            rename: Some(task),
        };
    }
    // Only a rename seen waiting may go ahead: then the sentry goes.
    let released = execute(holder, &format!("DROP TABLE {}", swap.aside.quoted()), &[]).await;
    Held {
        // Had the drop failed on the server, the rename fails on the sentry; had it reached the
        // server before the session was lost, the rename succeeds: the rename's result decides.
        checked: Ok(checked),
        released: released.is_ok(),
        rename: Some(task),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_numbers_are_classified() {
        assert_eq!(Mysql.classify("1062"), ErrorClass::UniqueViolation);
        for code in ["1205", "1213", "1969", "1927"] {
            assert_eq!(Mysql.classify(code), ErrorClass::Transient, "{code}");
        }
        // 1048 (column cannot be null) shares SQLSTATE 23000 with a duplicate key.
        for code in ["1048", "1064", "23000", "x"] {
            assert_eq!(Mysql.classify(code), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn mariadb_urls_reach_the_mysql_driver() {
        assert_eq!(driver_url("mariadb://root@h/db"), "mysql://root@h/db");
        assert_eq!(driver_url("mysql://root@h/db"), "mysql://root@h/db");
        assert!(Mysql.accepts_url("mariadb://root@h/db"));
        assert!(!Mysql.accepts_url("postgres://h/db"));
    }
}
