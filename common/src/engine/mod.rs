//! Everything that differs between warehouse engines, and how statements run on them.
//!
//! An [`Engine`] owns every piece of SQL text and every behaviour that is not the same on
//! every warehouse: connecting and session settings, partition bounds, the partition merge,
//! catalog reads, checksums, locks, the table swap, the control store's column types, and
//! how its error codes read. Each engine is one module (`postgres`, `sqlite`,
//! `mysql`); outside them
//! no code asks which engine it runs on. Where the pipeline takes a different road on some
//! engines it asks a named [`Capabilities`] flag. No method has a default body: an engine
//! that forgets a decision does not compile.

pub mod mysql;
pub mod postgres;
pub mod session;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

use crate::error::BackfillError;
use crate::ident::{Ident, TableName};
use crate::plan::Grain;
use crate::warehouse::{Bind, Checksum, RowHash};
use session::Session;

pub use session::Pool;

/// The engine a warehouse URL names, or why none does.
pub fn for_url(url: &str) -> Result<&'static dyn Engine, BackfillError> {
    const ENGINES: [&dyn Engine; 3] = [&postgres::Postgres, &sqlite::Sqlite, &mysql::Mysql];
    ENGINES
        .into_iter()
        .find(|engine| engine.accepts_url(url))
        .ok_or_else(|| {
            BackfillError::Invalid(format!(
                "warehouse URL `{}` is not supported: use postgres://…, mysql://… (or mariadb://…) or sqlite://…",
                crate::warehouse::redact_url(url)
            ))
        })
}

/// What an engine can do, where the pipeline's road depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `WITH x AS (INSERT … RETURNING …) SELECT … FROM x`: a write that reports on the rows
    /// it wrote in the same statement (partition checks and checksums in one pass).
    pub data_modifying_cte: bool,
    /// DDL (CREATE, ALTER … RENAME, DROP) commits or rolls back with the transaction.
    pub transactional_ddl: bool,
    /// `MERGE INTO … USING …`.
    pub merge: bool,
    /// How views refer to the tables they read: a swap by renames strands views bound to
    /// the table's identity, and leaves views bound by name reading the new table.
    pub views_bind: ViewBinding,
    /// Native range partitions that can be detached and attached in one transaction
    /// (`swap_partitions`; the engine's `native_partitions` answers how).
    pub partition_exchange: bool,
    /// The server bounds a statement's time itself; otherwise the partition timeout bounds
    /// how long the run waits, not the statement.
    pub statement_timeout: bool,
    /// Percentiles (median, `percentile`) computed in SQL.
    pub percentiles: bool,
    /// Independent scans gain from running at once on two sessions (each is one server
    /// process's work).
    pub parallel_scans: bool,
    /// `FULL OUTER JOIN` (the diff report of `status --diff`).
    pub full_outer_join: bool,
}

/// How views refer to the tables they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewBinding {
    /// By the table's identity (PostgreSQL: OID): a view follows a renamed table.
    ByIdentity,
    /// By name, resolved when queried (SQLite).
    ByName,
}

/// What an engine's error code means to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection loss, serialization failure, deadlock, lock or statement timeout, busy.
    Transient,
    /// A unique index or key refused a row.
    UniqueViolation,
    /// An exclusion constraint refused a row.
    ExclusionViolation,
    /// Anything else: retrying gives the same answer.
    Permanent,
}

/// Column types the pipeline itself creates (control store, demo data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    BigInt,
    Double,
    Date,
    Timestamp,
    /// An exact amount with two decimals, where the engine has one.
    Amount,
    /// A bigint key the engine numbers itself.
    SerialPrimaryKey,
    /// Text of any length.
    Text,
    /// Text that is a key or indexed (names, ids, states): some engines index only bounded
    /// text.
    KeyText,
}

/// How strongly a publish holds the target against writers; readers go on under both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterLock {
    /// Writers wait; other sessions may hold the same lock (a guard's checksum).
    Shared,
    /// Writers and other publishers wait (a window merge).
    Exclusive,
}

/// The pieces of a re-applied partition's merge: the deduplicated source materialised in
/// `source`, matched by key inside the partition only.
pub struct PartitionMerge<'a> {
    pub shadow: &'a TableName,
    pub source: &'a str,
    pub columns: &'a [Ident],
    pub key: &'a [Ident],
    /// The condition that a row (by alias) lies in the partition, over bounds `$1`/`$2`.
    pub in_partition: &'a (dyn Fn(&str) -> String + Sync),
}

impl PartitionMerge<'_> {
    pub fn non_key(&self) -> Vec<&Ident> {
        self.columns
            .iter()
            .filter(|c| !self.key.contains(c))
            .collect()
    }

    pub fn column_list(&self) -> String {
        quoted_list(self.columns)
    }

    pub fn key_list(&self) -> String {
        quoted_list(self.key)
    }

    /// `t.k = s.k AND …` over the key.
    pub fn key_match(&self, a: &str, b: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}", k = k.quoted()))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// `"a", "b"`.
pub fn quoted_list(columns: &[Ident]) -> String {
    columns
        .iter()
        .map(|c| c.quoted())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which index names a table takes over (a closure over the name).
pub type NameFilter<'a> = dyn Fn(&str) -> bool + Sync + 'a;

/// One table renamed aside and another renamed into its name, inside a transaction.
pub struct TableSwap<'a> {
    /// The table that has the name now.
    pub current: &'a TableName,
    /// Where it goes.
    pub aside: &'a TableName,
    /// The table that takes the name.
    pub replacement: &'a TableName,
    /// Suffix that names of the outgoing table's indexes step aside with.
    pub aside_suffix: &'a str,
    /// Whether the owner, grants and comment of `current` are given to `replacement` (a
    /// publish; a rollback's archive still has its own).
    pub carry_grants: bool,
    /// Which of the replacement's indexes take the names of the outgoing ones.
    pub takes_index_names: &'a NameFilter<'a>,
    /// Longest the swap waits for the locks it needs (`publish.lock_wait`).
    pub lock_wait: Duration,
}

/// What a swap checks while writers are held, just before the names change: that the rows a
/// publish must not discard are as recorded. Returns the checksum of the table that steps
/// aside (the archive's record).
#[async_trait]
pub trait SwapGuard: Send + Sync {
    async fn check(&self, session: &mut dyn Session) -> Result<Checksum, BackfillError>;
}

/// What a shape finding is about, where the pipeline takes a decision on it (never on its
/// text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// The target is natively partitioned: `swap_partitions` may publish it.
    NativePartitioning,
    /// The key has no unique index in the target.
    NoUniqueKey,
    /// Anything else (triggers, foreign keys, policies, …): only its blocking flags matter.
    Other,
}

/// How a table is natively partitioned (`NativePartitions::partition_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionKey {
    pub by_range: bool,
    pub columns: i64,
    pub first_column: Option<String>,
}

/// A partition of a natively partitioned table.
#[derive(Debug, Clone)]
pub struct PartitionOf {
    pub table: TableName,
    /// The bound as the engine spells it (reused verbatim to attach).
    pub bound: String,
    /// The default partition (no bound).
    pub is_default: bool,
    /// Itself partitioned.
    pub partitioned: bool,
}

/// Native range partitions that can be detached and attached in one transaction
/// (`swap_partitions`): the catalog questions and the statements, where an engine has them.
#[async_trait]
pub trait NativePartitions: Send + Sync {
    /// How `table` is partitioned; None if it is not.
    async fn partition_key(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Option<PartitionKey>, BackfillError>;
    /// The partitions of `parent`, by name.
    async fn partitions_of(
        &self,
        conn: &mut dyn Session,
        parent: &TableName,
    ) -> Result<Vec<PartitionOf>, BackfillError>;
    /// The bound of `partition` if it is a partition of `parent`.
    async fn bound_of(
        &self,
        conn: &mut dyn Session,
        partition: &TableName,
        parent: &TableName,
    ) -> Result<Option<String>, BackfillError>;
    /// What is attached to `partition` itself, not inherited from its parent (views,
    /// triggers, foreign keys, indexes, grants): it would stay with an archived partition.
    async fn own_dependents(
        &self,
        conn: &mut dyn Session,
        partition: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// The range `[from, to)` of a single-column range bound, None for another bound.
    fn bound_range(&self, bound: &str) -> Option<(chrono::NaiveDateTime, chrono::NaiveDateTime)>;
    /// A CHECK condition equal to `bound` on `column`, so that attaching needs no validation
    /// scan; None where the bound's literals cannot be restated safely.
    fn bound_check(&self, column: &Ident, bound: &str) -> Option<String>;
    /// The condition that a row (alias `t`) of a partitioned table lies in `partitions`.
    fn in_partitions(&self, partitions: &[TableName]) -> String;
    /// A new table with the columns, keys and indexes of `like`, partitioned by range on
    /// `column`.
    fn create_partitioned_like(
        &self,
        table: &TableName,
        like: &TableName,
        column: &Ident,
    ) -> String;
    fn create_partition_of(&self, partition: &TableName, parent: &TableName, bound: &str)
    -> String;
    fn detach(&self, parent: &TableName, partition: &TableName) -> String;
    fn attach(&self, parent: &TableName, partition: &TableName, bound: &str) -> String;
}

/// Something about the target that a publish mode cannot carry over.
#[derive(Debug, Clone)]
pub struct ShapeFinding {
    pub kind: FindingKind,
    pub what: String,
    pub why: &'static str,
    /// `swap_table` cannot publish the target safely.
    pub blocks_swap_table: bool,
    /// `swap_window` cannot publish the target safely.
    pub blocks_swap_window: bool,
}

/// A shadow index dropped while the partitions are written (every row of a `swap_table`
/// shadow is new, and one bulk build is far cheaper than maintaining it row by row); the
/// barrier builds it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeferredIndex {
    pub name: String,
    pub create: String,
    /// `COMMENT ON INDEX …` when the index had a comment.
    #[serde(default)]
    pub comment: Option<String>,
}

/// One warehouse engine. See the module documentation.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The engine's name in messages and `plan` (`postgres`, `sqlite`).
    fn name(&self) -> &'static str;
    fn accepts_url(&self, url: &str) -> bool;
    fn capabilities(&self) -> Capabilities;
    /// What one of the engine's error codes (SQLSTATE, result code) means.
    fn classify(&self, code: &str) -> ErrorClass;
    /// Native partitions `swap_partitions` can exchange, where the engine has them.
    fn native_partitions(&self) -> Option<&dyn NativePartitions>;

    // Connecting.

    /// A pool of `max_connections` sessions with the engine's session settings.
    async fn open(&self, url: &str, max_connections: u32) -> Result<Pool, BackfillError>;
    /// The column names a query returns, asked of the server without running it.
    async fn describe_columns(&self, url: &str, sql: &str) -> Result<Vec<String>, BackfillError>;

    // SQL text.

    /// The n-th (1-based) bound parameter.
    fn placeholder(&self, n: usize) -> String;
    /// A bound partition boundary, typed as partition columns are compared with.
    fn partition_bound(&self, grain: Grain, n: usize) -> String;
    /// The partition column as compared with partition bounds.
    fn partition_column(&self, column: &str, grain: Grain) -> String;
    /// `a` and `b` differ, treating NULL as a value.
    fn distinct(&self, a: &str, b: &str) -> String;
    /// What grouped audit queries group by: one value per partition, cheap per row.
    fn partition_group(&self, column: &str, grain: Grain) -> String;
    /// The partition label (`2024-03-01`, `2024-03-01T05`) of a `partition_group` value.
    fn group_label(&self, group: &str, grain: Grain) -> String;
    /// The partition label computed from a column.
    fn partition_label(&self, column: &str, grain: Grain) -> String;
    /// A numeric expression read back as a float.
    fn as_float(&self, expr: &str) -> String;
    /// An integer expression (a count, a sum of counts) read back as a 64-bit integer.
    fn as_bigint(&self, expr: &str) -> String;
    /// Any expression read back as text.
    fn as_text(&self, expr: &str) -> String;
    fn sql_type(&self, sql_type: SqlType) -> &'static str;
    /// Text aggregates of a grouped query: the values of `columns` joined with `, ` in one
    /// row, and the distinct values of `expr` over a group joined with `, `.
    fn joined_values(&self, columns: &[String]) -> String;
    fn joined_distinct(&self, expr: &str) -> String;
    /// The statement refreshing the planner's statistics of `table`.
    fn analyze(&self, table: &TableName) -> String;
    /// The head of a DELETE of `table` whose rows the rest of the statement names `alias`.
    fn delete_from(&self, table: &TableName, alias: &str) -> String;
    /// An UPDATE of `target` (alias `t`) from the matching rows of `from` (alias `s`):
    /// each `(column, expression)` of `set` assigns a column of `t`; `condition` matches and
    /// filters the rows.
    fn update_from(
        &self,
        target: &TableName,
        from: &TableName,
        set: &[(String, String)],
        condition: &str,
    ) -> String;
    /// The statements creating a unique index on `column` of the rows matching `condition`
    /// only (one open run per target); `index` is the index's bare name.
    fn partial_unique_index(
        &self,
        index: &str,
        table: &TableName,
        column: &str,
        condition: &str,
    ) -> Vec<String>;
    /// The statements dropping what `partial_unique_index` created.
    fn drop_partial_unique_index(&self, index: &str, table: &TableName) -> Vec<String>;
    /// A percentile of a column within a group, where the engine computes one.
    fn percentile(&self, p: f64, column: &str) -> Option<String>;
    /// Where a control-store table lives (a schema, or a name prefix).
    fn control_table(&self, schema: &Ident, table: &str) -> TableName;
    /// The statements creating (and, where the engine does not drop it at commit, dropping:
    /// `IF EXISTS`, as it also runs before the create) a temporary table holding a query's
    /// rows.
    fn temp_table_from_query(&self, name: &str, query: &str) -> (String, Option<String>);
    /// The statements merging a partition's materialised source into the shadow: update the
    /// rows whose non-key columns differ, insert new keys, inside the partition only. The
    /// rows they affect, summed, are the rows inserted or updated.
    fn merge_partition(&self, merge: &PartitionMerge<'_>) -> Vec<String>;
    /// A new empty table with the columns (names and types) of `like`, nothing else.
    fn create_table_like(&self, table: &TableName, like: &TableName) -> String;

    // Sessions and locks.

    /// Serialises control-store migrators inside `tx` (and creates what the store lives in).
    async fn lock_control_store(
        &self,
        tx: &mut dyn Session,
        schema: &Ident,
    ) -> Result<(), BackfillError>;
    /// Releases what `lock_control_store` took, on the same session after its transaction
    /// ended, where the lock outlives transactions (a session's named lock).
    async fn unlock_control_store(&self, conn: &mut dyn Session) -> Result<(), BackfillError>;
    /// Bounds how long statements of this transaction wait for a lock.
    async fn set_lock_timeout(
        &self,
        tx: &mut dyn Session,
        timeout: Duration,
    ) -> Result<(), BackfillError>;
    /// Starts a partition's transaction: statement and lock timeouts set to `timeout`.
    /// Returns the server's id of the session, when it has one that can be cancelled.
    async fn begin_partition(
        &self,
        tx: &mut dyn Session,
        timeout: Duration,
    ) -> Result<Option<i64>, BackfillError>;
    /// Cancels the statement running in the session `begin_partition` named.
    async fn cancel_session(&self, conn: &mut dyn Session, id: i64) -> Result<(), BackfillError>;
    /// Holds `table` against writers until the transaction ends; readers go on. Waits at
    /// most `wait` for sessions holding it, and in a way that never makes their queries fail
    /// (they hold the table, we give way and try again).
    async fn lock_against_writers(
        &self,
        tx: &mut dyn Session,
        table: &TableName,
        lock: WriterLock,
        wait: Duration,
    ) -> Result<(), BackfillError>;
    /// Holds `table` against everyone, as renames and partition detaches need, with the
    /// views that read it taken first (the order readers of a view take them), waiting at
    /// most `wait` and never in a way that fails a reader's query.
    async fn lock_for_swap(
        &self,
        tx: &mut dyn Session,
        table: &TableName,
        wait: Duration,
    ) -> Result<(), BackfillError>;
    /// Session settings a swap needs, set before its transaction (`on`) and after (`off`).
    async fn prepare_swap(&self, conn: &mut dyn Session, on: bool) -> Result<(), BackfillError>;
    /// Renames `current` aside and `replacement` into its name, inside a transaction, with
    /// what depends on the table (views bound by identity, owner, grants, comment, index
    /// names) following the name. Refuses a target whose dependents would be stranded.
    async fn swap_tables(
        &self,
        tx: &mut dyn Session,
        swap: &TableSwap<'_>,
    ) -> Result<(), BackfillError>;
    /// Where DDL is not transactional (`transactional_ddl` false): swaps the tables of `swap`
    /// in one step that no write can slip into, with `guard`'s checks run while writers are
    /// held. When it returns Ok the names have changed and the guard's checksum is returned;
    /// on an error they have not. Engines with transactional DDL swap inside the publish's
    /// transaction (`swap_tables`) and refuse this.
    async fn cut_over(
        &self,
        pool: &Pool,
        swap: &TableSwap<'_>,
        guard: &dyn SwapGuard,
    ) -> Result<Checksum, BackfillError>;
    /// After `incoming` took `outgoing`'s place (a partition swap), its indexes that
    /// `takes_names` accepts take the names of `outgoing`'s matching ones, which step aside
    /// with `suffix`: migrations and monitoring name indexes.
    async fn hand_over_index_names(
        &self,
        tx: &mut dyn Session,
        outgoing: &TableName,
        incoming: &TableName,
        suffix: &str,
        takes_names: &NameFilter<'_>,
    ) -> Result<(), BackfillError>;

    // Catalog.

    /// The schema unqualified names resolve to, where the engine has schemas.
    async fn current_schema(&self, conn: &mut dyn Session)
    -> Result<Option<String>, BackfillError>;
    async fn table_exists(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<bool, BackfillError>;
    /// Column names in table order.
    async fn table_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// Numeric columns (integers, decimals, floats), in column order.
    async fn numeric_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// Columns without an equality operator, which merges compare as text.
    async fn text_compared_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// The sorted, comma-joined columns of each unique, non-partial index on plain columns.
    async fn unique_index_columns(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// The names of a table's indexes.
    async fn index_names(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Vec<String>, BackfillError>;
    /// What about the target a publish mode cannot carry over.
    async fn shape_findings(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
    ) -> Result<Vec<ShapeFinding>, BackfillError>;
    /// Creates `shadow` with the columns, keys and indexes of `target` and no rows.
    async fn create_shadow(
        &self,
        conn: &mut dyn Session,
        target: &TableName,
        shadow: &TableName,
    ) -> Result<(), BackfillError>;
    /// Drops the shadow's indexes to be built after the last partition, where that is
    /// faster; returns how to build them again.
    async fn defer_indexes(
        &self,
        conn: &mut dyn Session,
        shadow: &TableName,
    ) -> Result<Vec<DeferredIndex>, BackfillError>;

    // Checksums.

    /// How checksums of `table` hash its rows.
    async fn row_hash(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<RowHash, BackfillError>;
    /// The checksum of two disjoint sets of rows hashed alike, from theirs (checksums are
    /// sums of row hashes); None when they were not hashed alike.
    fn add_checksums(&self, a: &Checksum, b: &Checksum) -> Option<Checksum> {
        add_decimal_checksums(a, b)
    }
    /// Checksum of the rows of `table` (alias `t`) matching `filter`.
    async fn checksum(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        filter: Option<&str>,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<Checksum, BackfillError>;
    /// Checksum of the whole table and, in the same scan, of the rows matching `subset`.
    async fn checksum_with_subset(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
        subset: &str,
        binds: &[Bind],
        how: RowHash,
    ) -> Result<(Checksum, Checksum), BackfillError>;
}

impl std::fmt::Debug for dyn Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for dyn Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Statement text in standard SQL, for the engines that speak it (PostgreSQL, SQLite).
pub(crate) mod standard {
    use super::quote_catalog_name;
    use crate::ident::TableName;

    pub fn analyze(table: &TableName) -> String {
        format!("ANALYZE {}", table.quoted())
    }

    pub fn delete_from(table: &TableName, alias: &str) -> String {
        format!("DELETE FROM {} AS {alias}", table.quoted())
    }

    /// `UPDATE target AS t SET … FROM from AS s WHERE …`.
    pub fn update_from(
        target: &TableName,
        from: &TableName,
        set: &[(String, String)],
        condition: &str,
    ) -> String {
        format!(
            "UPDATE {} AS t SET {} FROM {} AS s WHERE {condition}",
            target.quoted(),
            set.iter()
                .map(|(column, value)| format!("{column} = {value}"))
                .collect::<Vec<_>>()
                .join(", "),
            from.quoted()
        )
    }

    pub fn partial_unique_index(
        index: &str,
        table: &TableName,
        column: &str,
        condition: &str,
    ) -> Vec<String> {
        vec![format!(
            "CREATE UNIQUE INDEX {} ON {} ({column}) WHERE {condition}",
            quote_catalog_name(index),
            table.quoted()
        )]
    }
}

/// A table's schema and name as the binds of a catalog query: the schema NULL (the session's
/// current schema or database) when the name is unqualified.
/// `add_checksums` for digests written as a method prefix (letters) and an exact decimal sum.
pub(crate) fn add_decimal_checksums(a: &Checksum, b: &Checksum) -> Option<Checksum> {
    let split = |digest: &str| {
        let at = digest
            .find(|c: char| c.is_ascii_digit() || c == '-')
            .unwrap_or(digest.len());
        let (prefix, sum) = digest.split_at(at);
        Some((prefix.to_string(), sum.parse::<i128>().ok()?))
    };
    let ((prefix_a, sum_a), (prefix_b, sum_b)) = (split(&a.digest)?, split(&b.digest)?);
    (prefix_a == prefix_b).then_some(())?;
    Some(Checksum {
        rows: a.rows.checked_add(b.rows)?,
        digest: format!("{prefix_a}{}", sum_a.checked_add(sum_b)?),
    })
}

pub(crate) fn table_binds(table: &TableName) -> [Bind; 2] {
    [
        table.schema.as_ref().map(|s| s.as_str().to_string()).into(),
        table.name.as_str().into(),
    ]
}

/// The first column of every row a catalog query returns, as text.
pub(crate) async fn fetch_texts(
    conn: &mut dyn Session,
    sql: &str,
    binds: &[Bind],
) -> Result<Vec<String>, BackfillError> {
    session::fetch_all(conn, sql, binds)
        .await?
        .iter()
        .map(|r| session::get::<String>(r, 0))
        .collect()
}

/// Quotes a name read from the catalog (not validated as an `Ident`: the target may have
/// names our identifier rules would not accept).
pub fn quote_catalog_name(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
