//! SQLite: one file, one writer at a time, no schemas (control tables carry a name prefix),
//! no server-side statement timeout, no hash function (checksums hash rows here). DDL is
//! transactional; views bind by name, so a swap runs with `legacy_alter_table` and leaves
//! them alone.

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use super::{
    Capabilities, DeferredIndex, Engine, ErrorClass, FindingKind, NameFilter, PartitionMerge,
    ShapeFinding, SqlType, SwapGuard, TableSwap, ViewBinding, WriterLock, fetch_texts,
    quote_catalog_name,
};
use crate::engine::session::{Conn, Pool};
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};
use crate::plan::Grain;
use crate::warehouse::{
    Bind, Checksum, RowHash, Session, execute, fetch, fetch_all, fetch_one, get,
};

/// Result codes the pipeline acts on. sqlx reports the extended code as a decimal string;
/// the primary code is its low byte.
pub mod codes {
    pub const BUSY: i64 = 5;
    pub const LOCKED: i64 = 6;
    pub const CONSTRAINT_PRIMARYKEY: i64 = 1555;
    pub const CONSTRAINT_UNIQUE: i64 = 2067;
}

/// The SQLite engine.
#[derive(Debug, Clone, Copy)]
pub struct Sqlite;

#[async_trait]
impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn accepts_url(&self, url: &str) -> bool {
        url.starts_with("sqlite:")
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            data_modifying_cte: false,
            transactional_ddl: true,
            merge: false,
            views_bind: ViewBinding::ByName,
            partition_exchange: false,
            statement_timeout: false,
            percentiles: false,
            parallel_scans: false,
            full_outer_join: true,
        }
    }

    /// BUSY and LOCKED, with their extended codes, are transient.
    /// No native partitions that can be exchanged.
    fn native_partitions(&self) -> Option<&dyn super::NativePartitions> {
        None
    }

    fn classify(&self, code: &str) -> ErrorClass {
        let Ok(code) = code.parse::<i64>() else {
            return ErrorClass::Permanent;
        };
        match code {
            codes::CONSTRAINT_PRIMARYKEY | codes::CONSTRAINT_UNIQUE => ErrorClass::UniqueViolation,
            _ if matches!(code & 0xff, codes::BUSY | codes::LOCKED) => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }

    async fn open(&self, url: &str, max_connections: u32) -> Result<Pool, BackfillError> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(15))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // Partition writers take turns on SQLite's single write lock; waiting is
                    // the right answer, not an error.
                    conn.execute("PRAGMA busy_timeout = 60000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let pool = Pool::from_sqlx(pool);
        let mut conn: Conn = pool.acquire().await?;
        execute(&mut conn, "PRAGMA journal_mode = WAL", &[])
            .await
            .ok();
        Ok(pool)
    }

    async fn describe_columns(&self, url: &str, sql: &str) -> Result<Vec<String>, BackfillError> {
        crate::engine::session::describe_with_native::<sqlx::sqlite::SqliteConnection>(url, sql)
            .await
    }

    fn placeholder(&self, n: usize) -> String {
        format!("${n}")
    }

    /// Dates are ISO-8601 text, which compares correctly as text.
    fn partition_bound(&self, _grain: Grain, n: usize) -> String {
        format!("${n}")
    }

    /// Timestamps are text in either `2024-03-01 05:00:00` or `2024-03-01T05:00:00` form,
    /// which do not sort together (`T` > ` `); `datetime()` brings both to the form the
    /// bounds use. Day bounds (`2024-03-01`) compare correctly with either form as they are.
    fn partition_column(&self, column: &str, grain: Grain) -> String {
        match grain {
            Grain::Hour => format!("datetime({column})"),
            Grain::Day => column.to_string(),
        }
    }

    fn distinct(&self, a: &str, b: &str) -> String {
        format!("{a} IS NOT {b}")
    }

    fn partition_group(&self, column: &str, grain: Grain) -> String {
        self.partition_label(column, grain)
    }

    fn group_label(&self, group: &str, _grain: Grain) -> String {
        group.to_string()
    }

    fn partition_label(&self, column: &str, grain: Grain) -> String {
        match grain {
            Grain::Day => format!("strftime('%Y-%m-%d', {column})"),
            Grain::Hour => format!("strftime('%Y-%m-%dT%H', {column})"),
        }
    }

    fn as_float(&self, expr: &str) -> String {
        format!("CAST({expr} AS REAL)")
    }

    fn as_bigint(&self, expr: &str) -> String {
        format!("CAST({expr} AS INTEGER)")
    }

    fn as_text(&self, expr: &str) -> String {
        format!("CAST({expr} AS TEXT)")
    }

    fn joined_values(&self, columns: &[String]) -> String {
        columns
            .iter()
            .map(|c| format!("coalesce({}, 'NULL')", self.as_text(c)))
            .collect::<Vec<_>>()
            .join(" || ', ' || ")
    }

    fn joined_distinct(&self, expr: &str) -> String {
        format!(
            "replace(group_concat(DISTINCT {}), ',', ', ')",
            self.as_text(expr)
        )
    }

    fn analyze(&self, table: &TableName) -> String {
        super::standard::analyze(table)
    }

    fn delete_from(&self, table: &TableName, alias: &str) -> String {
        super::standard::delete_from(table, alias)
    }

    fn update_from(
        &self,
        target: &TableName,
        from: &TableName,
        set: &[(String, String)],
        condition: &str,
    ) -> String {
        super::standard::update_from(target, from, set, condition)
    }

    fn partial_unique_index(
        &self,
        index: &str,
        table: &TableName,
        column: &str,
        condition: &str,
    ) -> Vec<String> {
        super::standard::partial_unique_index(index, table, column, condition)
    }

    fn drop_partial_unique_index(&self, index: &str, _table: &TableName) -> Vec<String> {
        vec![format!("DROP INDEX {}", quote_catalog_name(index))]
    }

    fn sql_type(&self, sql_type: SqlType) -> &'static str {
        match sql_type {
            SqlType::BigInt => "INTEGER",
            SqlType::Double | SqlType::Amount => "REAL",
            SqlType::Date | SqlType::Timestamp => "TEXT",
            SqlType::SerialPrimaryKey => "INTEGER PRIMARY KEY AUTOINCREMENT",
            SqlType::Text | SqlType::KeyText => "TEXT",
        }
    }

    fn percentile(&self, _p: f64, _column: &str) -> Option<String> {
        None
    }

    /// One database file has no schemas: the control schema becomes a name prefix.
    fn control_table(&self, schema: &Ident, table: &str) -> TableName {
        TableName {
            schema: None,
            name: Ident::new(&format!("{schema}_{table}"))
                .expect("control table names are valid identifiers"),
        }
    }

    fn temp_table_from_query(&self, name: &str, query: &str) -> (String, Option<String>) {
        (
            format!("CREATE TEMP TABLE {name} AS {query}"),
            Some(format!("DROP TABLE IF EXISTS temp.{name}")),
        )
    }

    /// An upsert: a conflict with a row of another partition updates nothing, and the row
    /// count check after the merge then reports the collision.
    fn merge_partition(&self, merge: &PartitionMerge<'_>) -> Vec<String> {
        let non_key = merge.non_key();
        let shadow_name = merge.shadow.name.quoted();
        let action = if non_key.is_empty() {
            "DO NOTHING".to_string()
        } else {
            let changed = non_key
                .iter()
                .map(|c| {
                    self.distinct(
                        &format!("{shadow_name}.{}", c.quoted()),
                        &format!("excluded.{}", c.quoted()),
                    )
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            format!(
                "DO UPDATE SET {} WHERE ({changed}) AND {}",
                non_key
                    .iter()
                    .map(|c| format!("{c} = excluded.{c}", c = c.quoted()))
                    .collect::<Vec<_>>()
                    .join(", "),
                (merge.in_partition)(&shadow_name)
            )
        };
        let columns = merge.column_list();
        vec![format!(
            "INSERT INTO {} ({columns}) SELECT {columns} FROM {} WHERE true ON CONFLICT ({}) {action}",
            merge.shadow.quoted(),
            merge.source,
            merge.key_list()
        )]
    }

    fn create_table_like(&self, table: &TableName, like: &TableName) -> String {
        format!(
            "CREATE TABLE {} AS SELECT * FROM {} WHERE 1 = 0",
            table.quoted(),
            like.quoted()
        )
    }

    /// Takes the write lock first, so two migrators do not both see version 0.
    async fn lock_control_store(
        &self,
        tx: &mut dyn Session,
        _schema: &Ident,
    ) -> Result<(), BackfillError> {
        execute(
            tx,
            "CREATE TABLE IF NOT EXISTS bf_migration_lock (x INTEGER)",
            &[],
        )
        .await?;
        execute(tx, "DELETE FROM bf_migration_lock", &[]).await?;
        Ok(())
    }

    /// The lock ends with the transaction.
    async fn unlock_control_store(&self, _conn: &mut dyn Session) -> Result<(), BackfillError> {
        Ok(())
    }

    /// Lock waits are bounded per connection (`busy_timeout`).
    async fn set_lock_timeout(
        &self,
        _tx: &mut dyn Session,
        _timeout: Duration,
    ) -> Result<(), BackfillError> {
        Ok(())
    }

    /// No statement timeout and no session to cancel: the partition timeout bounds how long
    /// the run waits.
    async fn begin_partition(
        &self,
        _tx: &mut dyn Session,
        _timeout: Duration,
    ) -> Result<Option<i64>, BackfillError> {
        Ok(None)
    }

    /// `begin_partition` names no session.
    async fn cancel_session(&self, _conn: &mut dyn Session, _id: i64) -> Result<(), BackfillError> {
        Ok(())
    }

    /// A write transaction already holds the file's one write lock.
    async fn lock_against_writers(
        &self,
        _tx: &mut dyn Session,
        _table: &TableName,
        _lock: WriterLock,
        _wait: Duration,
    ) -> Result<(), BackfillError> {
        Ok(())
    }

    /// Renames leave views alone with `legacy_alter_table` (they then resolve by name at
    /// query time, reading the new table).
    /// A write transaction already holds the file's one write lock.
    async fn lock_for_swap(
        &self,
        _tx: &mut dyn Session,
        _table: &TableName,
        _wait: Duration,
    ) -> Result<(), BackfillError> {
        Ok(())
    }

    async fn prepare_swap(&self, conn: &mut dyn Session, on: bool) -> Result<(), BackfillError> {
        let value = if on { "ON" } else { "OFF" };
        execute(conn, &format!("PRAGMA legacy_alter_table = {value}"), &[]).await?;
        Ok(())
    }

    /// SQLite cannot rename an index without rebuilding it: the new table's indexes keep
    /// their names.
    async fn swap_tables(
        &self,
        tx: &mut dyn Session,
        swap: &TableSwap<'_>,
    ) -> Result<(), BackfillError> {
        for (from, to) in [(swap.current, swap.aside), (swap.replacement, swap.current)] {
            execute(
                tx,
                &format!(
                    "ALTER TABLE {} RENAME TO {}",
                    from.quoted(),
                    to.name.quoted()
                ),
                &[],
            )
            .await
            .map_err(|e| e.context(format!("renaming {from} to {}", to.name)))?;
        }
        Ok(())
    }
    /// DDL is transactional: `swap_tables` swaps inside the publish's transaction.
    async fn cut_over(
        &self,
        _pool: &Pool,
        swap: &TableSwap<'_>,
        _guard: &dyn SwapGuard,
    ) -> Result<Checksum, BackfillError> {
        Err(BackfillError::Invalid(format!(
            "{} swaps {} inside the publish transaction, not by a cut-over",
            self.name(),
            swap.current
        )))
    }

    /// Renaming an index means rebuilding it: indexes keep their names.
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
        _conn: &mut dyn Session,
    ) -> Result<Option<String>, BackfillError> {
        Ok(None)
    }

    async fn table_exists(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<bool, BackfillError> {
        let row = fetch_one(
            conn,
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
            &[table.name.as_str().into()],
        )
        .await?;
        Ok(get::<i64>(&row, 0)? > 0)
    }

    async fn table_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            "SELECT name FROM pragma_table_info($1) ORDER BY cid",
            &[table.name.as_str().into()],
        )
        .await
    }

    /// SQLite's type affinity rules: INT, REAL, FLOA, DOUB, NUM, DEC.
    async fn numeric_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            "SELECT name FROM pragma_table_info($1) WHERE upper(type) LIKE '%INT%' OR upper(type) LIKE '%REAL%' \
             OR upper(type) LIKE '%FLOA%' OR upper(type) LIKE '%DOUB%' OR upper(type) LIKE '%NUM%' OR upper(type) LIKE '%DEC%' ORDER BY cid",
            &[table.name.as_str().into()],
        )
        .await
    }

    /// Every SQLite value compares with `IS NOT`.
    async fn text_compared_columns(
        &self,
        _conn: &mut dyn Session,
        _table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        Ok(Vec::new())
    }

    async fn unique_index_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        let rows = fetch_all(
            conn,
            "SELECT (SELECT group_concat(name, ',') FROM (SELECT ii.name FROM pragma_index_info(il.name) ii ORDER BY ii.name)) \
             FROM pragma_index_list($1) il WHERE il.\"unique\" = 1 AND il.partial = 0",
            &[table.name.as_str().into()],
        )
        .await?;
        rows.iter()
            .map(|r| get::<Option<String>>(r, 0).map(|v| v.unwrap_or_default()))
            .collect()
    }

    async fn index_names(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        fetch_texts(
            conn,
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = $1",
            &[table.name.as_str().into()],
        )
        .await
    }

    async fn shape_findings(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
    ) -> Result<Vec<ShapeFinding>, BackfillError> {
        let table = target.name.as_str();
        let checks: [(&str, &'static str); 2] = [
            (
                "SELECT 'trigger ' || name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = $1",
                "triggers would stay with the archive",
            ),
            (
                "SELECT DISTINCT 'foreign key on ' || m.name FROM sqlite_master m, pragma_foreign_key_list(m.name) f \
                 WHERE m.type = 'table' AND f.\"table\" = $1 AND m.name <> $1",
                "foreign keys referencing the target would follow it to the archive",
            ),
        ];
        let mut findings = Vec::new();
        for (sql, why) in checks {
            for row in fetch_all(conn, sql, &[table.into()]).await? {
                if let Some(what) = get::<Option<String>>(&row, 0)? {
                    findings.push(ShapeFinding {
                        kind: FindingKind::Other,
                        what,
                        why,
                        blocks_swap_table: true,
                        blocks_swap_window: false,
                    });
                }
            }
        }
        Ok(findings)
    }

    async fn create_shadow(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
        shadow: &TableName,
    ) -> Result<(), BackfillError> {
        create_shadow_from_ddl(conn, target, shadow).await
    }

    /// Index maintenance is cheap next to SQLite's single writer: nothing is deferred.
    async fn defer_indexes(
        &self,
        _conn: &mut dyn Session,
        _shadow: &TableName,
    ) -> Result<Vec<DeferredIndex>, BackfillError> {
        Ok(Vec::new())
    }

    /// Rows are hashed here (SQLite has no hash function), whatever `RowHash` says.
    async fn row_hash(
        &self,
        _conn: &mut dyn Session,
        _table: &TableName,
    ) -> Result<RowHash, BackfillError> {
        Ok(RowHash::Text)
    }

    /// Streams each row's quoted values and hashes them here: memory stays flat whatever the
    /// table's size.
    /// Digests are a wrapping sum of 128-bit row hashes, in hexadecimal.
    fn add_checksums(&self, a: &Checksum, b: &Checksum) -> Option<Checksum> {
        let (x, y) = (
            u128::from_str_radix(&a.digest, 16).ok()?,
            u128::from_str_radix(&b.digest, 16).ok()?,
        );
        Some(Checksum {
            rows: a.rows.checked_add(b.rows)?,
            digest: format!("{:x}", x.wrapping_add(y)),
        })
    }

    async fn checksum(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        _how: RowHash,
    ) -> Result<Checksum, BackfillError> {
        let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
        let row_bytes = row_bytes(self, conn, table).await?;
        let sql = format!("SELECT {row_bytes} FROM {} AS t{filter}", table.quoted());
        let mut rows = fetch(conn, &sql, binds);
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

    async fn checksum_with_subset(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        subset: &str,
        binds: &[Bind],
        _how: RowHash,
    ) -> Result<(Checksum, Checksum), BackfillError> {
        let row_bytes = row_bytes(self, conn, table).await?;
        let sql = format!(
            "SELECT {row_bytes}, CASE WHEN coalesce(({subset}), 0) THEN 1 ELSE 0 END FROM {} AS t",
            table.quoted()
        );
        let mut rows = fetch(conn, &sql, binds);
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

/// One row of `table` (alias `t`) as bytes, every value `quote()`d, for hashing here. Bytes,
/// not text: SQLite's TEXT may hold bytes that are not UTF-8, which the driver cannot decode
/// as a string (the checksum then failed every partition).
async fn row_bytes(
    engine: &Sqlite,
    conn: &mut dyn Session,
    table: &TableName,
) -> Result<String, BackfillError> {
    let columns = engine.table_columns(conn, table).await?;
    let quoted = columns
        .iter()
        .map(|c| format!("quote(t.{})", quote_catalog_name(c)))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    Ok(format!("CAST({quoted} AS BLOB)"))
}

/// A row's contribution to a checksum: the first 8 bytes of its SHA-256.
fn row_hash(row: &[u8]) -> u128 {
    let digest = Sha256::digest(row);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) as u128
}

/// SQLite has no `CREATE TABLE … LIKE`: replay the target's own DDL under the shadow's name,
/// then its explicit indexes.
async fn create_shadow_from_ddl(
    conn: &mut dyn Session,
    target: &TableName,
    shadow: &TableName,
) -> Result<(), BackfillError> {
    let row = fetch_one(
        conn,
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1",
        &[target.name.as_str().into()],
    )
    .await?;
    let ddl: String = get(&row, 0)?;
    let body = ddl
        .find('(')
        .map(|i| &ddl[i..])
        .ok_or_else(|| BackfillError::Invalid(format!("cannot read the definition of {target}")))?;
    execute(
        conn,
        &format!("CREATE TABLE {} {body}", shadow.quoted()),
        &[],
    )
    .await?;
    let indexes = fetch_all(
        conn,
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
        &[target.name.as_str().into()],
    )
    .await?;
    for index in &indexes {
        let name: String = get(index, 0)?;
        let sql: String = get(index, 1)?;
        let columns = sql
            .rfind(" ON ")
            .or_else(|| sql.to_ascii_uppercase().rfind(" ON "))
            .and_then(|on| sql[on..].find('(').map(|p| &sql[on + p..]))
            .ok_or_else(|| {
                BackfillError::Invalid(format!("cannot read the definition of index {name}"))
            })?;
        let unique = if sql
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("CREATE UNIQUE")
        {
            "UNIQUE "
        } else {
            ""
        };
        let base = name.rsplit("__bfx_").next().unwrap_or(&name);
        let new_name = quote_catalog_name(&format!("{}__bfx_{base}", shadow.name));
        execute(
            conn,
            &format!(
                "CREATE {unique}INDEX {new_name} ON {} {columns}",
                shadow.quoted()
            ),
            &[],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_are_classified() {
        for code in ["5", "517", "6", "262"] {
            assert_eq!(Sqlite.classify(code), ErrorClass::Transient, "{code}");
        }
        assert_eq!(Sqlite.classify("2067"), ErrorClass::UniqueViolation);
        assert_eq!(Sqlite.classify("1555"), ErrorClass::UniqueViolation);
        // The all-digit SQLSTATEs whose low byte is BUSY or LOCKED are not SQLite codes here.
        for code in ["19", "1", "787", "42P01"] {
            assert_eq!(Sqlite.classify(code), ErrorClass::Permanent, "{code}");
        }
    }
}
