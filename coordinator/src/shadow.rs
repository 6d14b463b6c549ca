//! Builds the shadow table: the target's columns, keys and indexes (plus columns the spec
//! adds). For `swap_table` it is filled with the target's rows OUTSIDE the window; for
//! `swap_window` it holds the window only. Either way the window's partitions start empty, so
//! each partition's first application is a plain insert. Also decides which publish modes the
//! target's shape allows, and which one `auto` picks.

use backfill_common::BackfillError;
use backfill_common::engine::{Engine, quote_catalog_name};
use backfill_common::ident::{Ident, TableName};
use backfill_common::plan::Partition;
use backfill_common::spec::{PublishMode, Spec};
use backfill_common::warehouse::{
    Checksum, Session, Warehouse, execute, fetch_all, fetch_one, get,
};
use chrono::NaiveDateTime;

use crate::window::spec_window;

/// What building the shadow leaves for later steps of the run.
#[derive(Debug, Default)]
pub struct BuiltShadow {
    /// Checksum of the target's rows outside the window, for the publish guard.
    pub outside: Option<Checksum>,
    /// Indexes dropped from the shadow until its partitions are written (see
    /// [`build_deferred_indexes`]).
    pub deferred_indexes: Vec<DeferredIndex>,
}

pub use backfill_common::engine::DeferredIndex;

/// The shadow table as its DDL left it, before any row is copied (see [`fill_shadow`]).
#[derive(Debug)]
pub struct ShadowTable {
    target_columns: Vec<String>,
    /// `swap_window` shadows hold the window only: nothing is copied.
    copies: bool,
    deferred_indexes: Vec<DeferredIndex>,
}

impl ShadowTable {
    /// A shadow whose DDL and copy are one step, inside the run's first transaction
    /// (`swap_partitions`, PostgreSQL only): nothing was created before it.
    pub fn created_with_fill() -> ShadowTable {
        ShadowTable {
            target_columns: Vec::new(),
            copies: false,
            deferred_indexes: Vec::new(),
        }
    }
}

/// The shadow's DDL: the table with the target's columns, keys and indexes, `add_columns`, a
/// unique index on the key, and the indexes deferred until its partitions are written. Where
/// DDL commits on its own this runs before the run's first transaction, and [`fill_shadow`]
/// inside it. `copies`: the rows outside the window are copied (`swap_table`), or the shadow
/// holds the window only (`swap_window`). `swap_partitions` builds its own
/// ([`build_partitioned_shadow`]).
pub async fn create_shadow_table(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    spec: &Spec,
    target: &TableName,
    shadow: &TableName,
    copies: bool,
) -> Result<ShadowTable, BackfillError> {
    let target_columns = warehouse.table_columns(conn, target).await?;
    warehouse
        .engine()
        .create_shadow(conn, target, shadow)
        .await?;
    for column in &spec.target.add_columns {
        if target_columns.iter().any(|c| c == column.name.as_str()) {
            return Err(BackfillError::Invalid(format!(
                "target.add_columns: `{}` already exists in {target}; remove it from add_columns",
                column.name
            )));
        }
        execute(
            conn,
            &format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                shadow.quoted(),
                column.name.quoted(),
                column.sql_type
            ),
            &[],
        )
        .await
        .map_err(|e| e.context(format!("adding column {} to the shadow", column.name)))?;
    }
    if !has_unique_index_on(warehouse, conn, shadow, &spec.target.key).await? {
        // Short and unique per run, whatever the length of the target name.
        let index = Ident::new(&format!(
            "bf_key_{}",
            shadow.name.as_str().rsplit('_').next().unwrap_or("run")
        ))
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        let keys = quoted_key_list(spec);
        execute(
            conn,
            &format!(
                "CREATE UNIQUE INDEX {} ON {} ({keys})",
                index.quoted(),
                shadow.quoted()
            ),
            &[],
        )
        .await?;
    }
    if !copies {
        // The window only: publish merges it into the target, which keeps everything else.
        return Ok(ShadowTable {
            target_columns,
            copies: false,
            deferred_indexes: Vec::new(),
        });
    }
    // Every row of a swap_table shadow is new: building its indexes once, after the last
    // partition, costs far less than maintaining them row by row (the reference workload's
    // inserts take half the time without them). The first application of each partition
    // checks its own keys for duplicates meanwhile; the unique index, built again before
    // the audits, proves the whole table has none.
    let deferred_indexes = warehouse.engine().defer_indexes(conn, shadow).await?;
    Ok(ShadowTable {
        target_columns,
        copies: true,
        deferred_indexes,
    })
}

/// Copies the target's rows outside the window into the shadow and returns their checksum
/// (the publish guard's), as one consistent read: one statement where the engine reports
/// on what it inserted, else the copy and the checksum in the caller's transaction (SQLite's
/// write lock, InnoDB's locking read of `INSERT … SELECT`, hold the rows until it ends).
pub async fn fill_shadow(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    spec: &Spec,
    target: &TableName,
    shadow: &TableName,
    partitions: &[Partition],
    table: ShadowTable,
) -> Result<BuiltShadow, BackfillError> {
    let ShadowTable {
        target_columns,
        copies,
        deferred_indexes,
    } = table;
    if !copies {
        return Ok(BuiltShadow::default());
    }
    let column_list = target_columns
        .iter()
        .map(|c| quote_catalog_name(c))
        .collect::<Vec<_>>()
        .join(", ");
    let (window, binds) = spec_window(warehouse.engine(), spec, partitions);
    let copy = format!(
        "INSERT INTO {} ({column_list}) SELECT {} FROM {} AS t WHERE NOT coalesce({window}, false)",
        shadow.quoted(),
        target_columns
            .iter()
            .map(|c| format!("t.{}", quote_catalog_name(c)))
            .collect::<Vec<_>>()
            .join(", "),
        target.quoted()
    );
    let duplicates_outside = || {
        BackfillError::Invalid(format!(
            "{target} already has duplicate keys ({}) outside the window; deduplicate them before backfilling",
            spec.target
                .key
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    let explain = |e: BackfillError| {
        if e.is_unique_violation() {
            duplicates_outside()
        } else {
            e.context(format!(
                "copying the partitions outside the window into {shadow}"
            ))
        }
    };
    // What the copy was taken from: publish compares this with the target again, so that
    // writes to the target after this point are never silently discarded by the swap.
    let outside = if warehouse.engine().capabilities().data_modifying_cte {
        {
            // The copy returns what it inserted (the target's columns, in its order): its
            // checksum is the target's rows outside the window, without a second scan.
            let how = warehouse.row_hash(conn, target).await?;
            let returning = format!(
                "WITH ins AS ({copy} RETURNING {column_list}) SELECT count(*), CAST(coalesce(sum({}), 0) AS text) FROM ins",
                how.expr("ins")
            );
            let row = fetch_one(conn, &returning, &binds).await.map_err(explain)?;
            Checksum {
                rows: get(&row, 0)?,
                digest: how.digest(get(&row, 1)?),
            }
        }
    } else {
        {
            execute(conn, &copy, &binds).await.map_err(explain)?;
            let (outside, binds) = outside_window(warehouse.engine(), spec, partitions);
            warehouse
                .checksum(conn, target, Some(&outside), &binds)
                .await?
        }
    };
    if deferred_indexes.is_empty() {
        // Where DDL commits, so would ANALYZE, in the middle of the caller's transaction:
        // there (InnoDB) statistics follow the inserted rows by themselves.
        if warehouse.engine().capabilities().transactional_ddl {
            execute(conn, &warehouse.engine().analyze(shadow), &[]).await?;
        }
    } else if !has_unique_index_on(warehouse, conn, target, &spec.target.key).await? {
        // Without a unique index on the key, the target itself may hold a key twice: say so
        // now, as the shadow's unique index would have while copying, not after every
        // partition was written.
        let keys = quoted_key_list(spec);
        let duplicated = fetch_all(
            conn,
            &format!(
                "SELECT 1 FROM {} GROUP BY {keys} HAVING count(*) > 1 LIMIT 1",
                shadow.quoted()
            ),
            &[],
        )
        .await?;
        if !duplicated.is_empty() {
            return Err(duplicates_outside());
        }
    }
    Ok(BuiltShadow {
        outside: Some(outside),
        deferred_indexes,
    })
}

/// Builds the shadow's deferred indexes that do not exist yet (a resumed run may have built
/// some), then refreshes its statistics. A unique index that cannot be built means duplicate
/// keys: returns them, a few, with the partitions that hold them.
pub async fn build_deferred_indexes(
    warehouse: &Warehouse,
    spec: &Spec,
    shadow: &TableName,
    deferred: &[DeferredIndex],
) -> Result<Result<(), Vec<(String, String)>>, BackfillError> {
    let mut conn = warehouse.acquire().await?;
    let existing = warehouse.engine().index_names(&mut conn, shadow).await?;
    for index in deferred.iter().filter(|d| !existing.contains(&d.name)) {
        if let Err(error) = execute(&mut conn, &index.create, &[]).await {
            // An earlier attempt's build (a killed process's statement runs on in the server)
            // committed the same index while this one waited for it or just before (the name's
            // catalog row is what was duplicated, or the name exists): the index is there.
            if warehouse
                .engine()
                .index_names(&mut conn, shadow)
                .await?
                .contains(&index.name)
            {
                tracing::info!(index = %index.name, %shadow, "an earlier attempt built this index meanwhile");
                continue;
            }
            if error.is_unique_violation() || error.is_exclusion_violation() {
                let mut failures = duplicate_keys(warehouse, &mut conn, spec, shadow).await?;
                if failures.is_empty() {
                    // Another unique index, or an exclusion constraint: the database's
                    // message names the values.
                    failures.push((
                        SHADOW_WIDE.to_string(),
                        format!(
                            "an index or constraint of the target cannot be built on the new rows ({error}): `{}`; nothing was published",
                            index.create
                        ),
                    ));
                }
                return Ok(Err(failures));
            }
            return Err(error.context(format!("building index {} of {shadow}", index.name)));
        }
        if let Some(comment) = &index.comment {
            execute(&mut conn, comment, &[]).await?;
        }
    }
    execute(&mut conn, &warehouse.engine().analyze(shadow), &[]).await?;
    Ok(Ok(()))
}

/// The key columns, quoted, comma-separated.
fn quoted_key_list(spec: &Spec) -> String {
    spec.target
        .key
        .iter()
        .map(|k| k.quoted())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The failure key of an index that cannot be built for a reason no partition owns.
pub const SHADOW_WIDE: &str = "(shadow)";

/// A few duplicated keys of the shadow, one message per partition holding them.
async fn duplicate_keys(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    spec: &Spec,
    shadow: &TableName,
) -> Result<Vec<(String, String)>, BackfillError> {
    let engine = warehouse.engine();
    let grain = spec.partition.grain;
    let group = engine.partition_group(&format!("t.{}", spec.partition.column.quoted()), grain);
    let label = engine.group_label(&group, grain);
    let keys = spec
        .target
        .key
        .iter()
        .map(|k| format!("t.{}", k.quoted()))
        .collect::<Vec<_>>();
    let key_names = spec
        .target
        .key
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {}, {}, {} FROM {} AS t GROUP BY {} HAVING count(*) > 1 LIMIT 20",
        engine.joined_values(&keys),
        engine.as_bigint("count(*)"),
        engine.joined_distinct(&label),
        shadow.quoted(),
        keys.join(", ")
    );
    let mut failures: Vec<(String, String)> = Vec::new();
    for row in fetch_all(conn, &sql, &[]).await? {
        let key: String = get(&row, 0)?;
        let times: i64 = get(&row, 1)?;
        let partitions: String = get(&row, 2)?;
        for partition in partitions.split(", ") {
            failures.push((
                partition.to_string(),
                format!(
                    "key ({key_names})=({key}) is in the shadow {times} times (partitions {partitions}): a key moved between partitions \
                     (include all of them in the window), the source returned it twice across partitions, or the target already held it \
                     twice outside the window; nothing was published"
                ),
            ));
        }
    }
    Ok(failures)
}

/// The rows outside the window (alias `t`), as a condition with its binds.
pub fn outside_window(
    engine: &dyn backfill_common::engine::Engine,
    spec: &Spec,
    partitions: &[Partition],
) -> (String, Vec<backfill_common::warehouse::Bind>) {
    let (window, binds) = spec_window(engine, spec, partitions);
    (format!("NOT coalesce({window}, false)"), binds)
}

/// Whether `table` has a unique index over exactly the columns `key` (see
/// `Warehouse::has_unique_index_on`).
pub async fn has_unique_index_on(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    table: &TableName,
    key: &[Ident],
) -> Result<bool, BackfillError> {
    warehouse.has_unique_index_on(conn, table, key).await
}

pub use backfill_common::engine::ShapeFinding;

/// What the target has that a publish mode would strand or break. `swap_table` renames a
/// copy into place, so everything attached to the table object matters; `swap_window` keeps
/// the table and only merges the window's rows, so only what those writes would trigger
/// matters (row-level security hiding rows, cascading foreign keys, columns that cannot be
/// written).
pub async fn target_findings(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    target: &TableName,
    key: &[Ident],
) -> Result<Vec<ShapeFinding>, BackfillError> {
    // Merging by key (swap_window) and replacing partitions (swap_partitions, where a unique
    // index must include the partition column) both rely on the key being unique in the
    // target; a copy (swap_table) makes it unique.
    let unique_key = has_unique_index_on(warehouse, conn, target, key).await?;
    let mut findings = warehouse.engine().shape_findings(conn, target).await?;
    if !unique_key {
        findings.push(ShapeFinding {
            kind: backfill_common::engine::FindingKind::NoUniqueKey,
            what: format!(
                "no unique index on the key ({})",
                key.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            why: "rows are merged or moved by key, so the key must be unique in the target",
            blocks_swap_table: false,
            blocks_swap_window: true,
        });
    }
    Ok(findings)
}

/// Refuses a publish mode the target's shape does not allow, naming what would be lost.
pub fn check_mode_allowed(
    target: &TableName,
    mode: PublishMode,
    findings: &[ShapeFinding],
) -> Result<(), BackfillError> {
    let blocking: Vec<String> = findings
        .iter()
        .filter(|f| match mode {
            PublishMode::SwapTable => f.blocks_swap_table,
            PublishMode::SwapWindow | PublishMode::SwapPartitions => f.blocks_swap_window,
            PublishMode::Auto => false,
        })
        .map(|f| format!("{} ({})", f.what, f.why))
        .collect();
    if blocking.is_empty() {
        return Ok(());
    }
    Err(BackfillError::Invalid(format!(
        "{target} cannot be published with {} without losing something: {}. Nothing was written{}",
        mode.as_str(),
        blocking.join("; "),
        if mode == PublishMode::SwapTable && findings.iter().all(|f| !f.blocks_swap_window) {
            "; publish.mode = \"swap_window\" (or \"auto\") keeps the table and would work"
        } else {
            ""
        }
    )))
}

/// Below this many rows a table is copied whole: a full copy is cheap and keeps the old
/// table intact as the archive.
const WINDOW_MODE_MIN_ROWS: i64 = 10_000;

/// `auto`: the mode a run of `spec` will publish with, and why. `window_rows` and
/// `table_rows` are the target's current counts.
/// `partition_swap`: for a natively partitioned target, how many rows the partitions the
/// window touches hold outside it (what swap_partitions copies), or why it cannot be used.
pub fn choose_publish_mode(
    spec: &Spec,
    target: &TableName,
    findings: &[ShapeFinding],
    window_rows: i64,
    table_rows: i64,
    partition_swap: Option<Result<i64, String>>,
) -> Result<(PublishMode, String), BackfillError> {
    match spec.publish.mode {
        PublishMode::SwapPartitions => {
            if !spec.target.add_columns.is_empty() {
                return Err(BackfillError::Invalid(
                    "publish.mode: swap_partitions replaces partitions of the existing table, which cannot gain columns: use swap_table".into(),
                ));
            }
            check_mode_allowed(target, PublishMode::SwapPartitions, findings)?;
            return match partition_swap {
                Some(Ok(_)) => Ok((
                    PublishMode::SwapPartitions,
                    "set in the spec (publish.mode)".into(),
                )),
                Some(Err(why)) => Err(BackfillError::Invalid(why)),
                None => Err(BackfillError::Invalid(format!(
                    "publish.mode: swap_partitions needs a natively partitioned PostgreSQL target; {target} is not: use swap_table or swap_window"
                ))),
            };
        }
        PublishMode::SwapTable | PublishMode::SwapWindow => {
            check_mode_allowed(target, spec.publish.mode, findings)?;
            return Ok((spec.publish.mode, "set in the spec (publish.mode)".into()));
        }
        PublishMode::Auto => {}
    }
    if !spec.target.add_columns.is_empty() {
        check_mode_allowed(target, PublishMode::SwapTable, findings)?;
        return Ok((
            PublishMode::SwapTable,
            "the spec adds columns, which only a new table can have".into(),
        ));
    }
    let window_allowed = check_mode_allowed(target, PublishMode::SwapWindow, findings).is_ok();
    if let Some(Ok(outside_rows)) = partition_swap {
        if outside_rows <= window_rows && window_allowed {
            return Ok((
                PublishMode::SwapPartitions,
                format!(
                    "natively partitioned, and the window fills the partitions it touches ({window_rows} rows in the window, {outside_rows} beside it): \
                     swapping those partitions copies the least"
                ),
            ));
        }
        check_mode_allowed(target, PublishMode::SwapWindow, findings)?;
        return Ok((
            PublishMode::SwapWindow,
            format!(
                "natively partitioned, but the partitions the window touches hold {outside_rows} rows beside its {window_rows}: merging the window writes less than swapping them"
            ),
        ));
    }
    let table_blockers: Vec<&ShapeFinding> =
        findings.iter().filter(|f| f.blocks_swap_table).collect();
    if !table_blockers.is_empty() {
        check_mode_allowed(target, PublishMode::SwapWindow, findings)?;
        return Ok((
            PublishMode::SwapWindow,
            format!(
                "a renamed copy would lose {}; swap_window keeps the table",
                table_blockers
                    .iter()
                    .map(|f| f.what.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let share = if table_rows > 0 {
        window_rows as f64 / table_rows as f64
    } else {
        1.0
    };
    if table_rows >= WINDOW_MODE_MIN_ROWS && share <= 0.25 && window_allowed {
        Ok((
            PublishMode::SwapWindow,
            format!(
                "the window holds {window_rows} of {table_rows} rows ({:.1}%): replacing it writes far less than copying the table",
                share * 100.0
            ),
        ))
    } else {
        Ok((
            PublishMode::SwapTable,
            format!(
                "the window holds {:.0}% of the table's {table_rows} rows: a copy and rename costs about the same and keeps the whole old table as the archive",
                share * 100.0
            ),
        ))
    }
}

/// A partition of a natively partitioned (RANGE, one column) PostgreSQL table.
#[derive(Debug, Clone)]
pub struct NativePartition {
    pub table: TableName,
    /// `FOR VALUES FROM (…) TO (…)`, as PostgreSQL prints it: reused verbatim to attach.
    pub bound: String,
    pub from: NaiveDateTime,
    pub to: NaiveDateTime,
}

impl NativePartition {
    fn overlaps(&self, start: NaiveDateTime, end: NaiveDateTime) -> bool {
        self.from < end && start < self.to
    }
}

/// The shadow's partition standing in for `partition`.
pub fn shadow_partition_name(
    partition: &TableName,
    run_id: &str,
) -> Result<TableName, BackfillError> {
    partition
        .with_suffix(&format!("__bfs_{run_id}"))
        .map_err(|e| BackfillError::Invalid(format!("partition {partition}: {e}")))
}

/// The target's partitions that hold rows of the window, when the target is range-partitioned
/// on the spec's partition column; an error says why swap_partitions cannot be used.
pub async fn partitions_in_window(
    engine: &dyn Engine,
    conn: &mut dyn Session,
    spec: &Spec,
    target: &TableName,
    partitions: &[Partition],
) -> Result<Vec<NativePartition>, BackfillError> {
    let refuse = |why: String| {
        BackfillError::Invalid(format!(
            "publish.mode: swap_partitions cannot publish {target}: {why}; use swap_window"
        ))
    };
    let Some(native) = engine.native_partitions() else {
        return Err(refuse(format!(
            "{} has no native partitions that can be exchanged",
            engine.name()
        )));
    };
    let Some(key) = native.partition_key(conn, target).await? else {
        return Err(refuse("it is not natively partitioned".into()));
    };
    if !key.by_range
        || key.columns != 1
        || key.first_column.as_deref() != Some(spec.partition.column.as_str())
    {
        return Err(refuse(format!(
            "it is not range-partitioned on `{}` alone",
            spec.partition.column
        )));
    }
    let mut affected = Vec::new();
    for of in native.partitions_of(conn, target).await? {
        let table = of.table;
        if of.is_default {
            let (window, binds) = spec_window(engine, spec, partitions);
            let row = fetch_one(
                conn,
                &format!(
                    "SELECT count(*) FROM {} AS t WHERE {window}",
                    table.quoted()
                ),
                &binds,
            )
            .await?;
            if get::<i64>(&row, 0)? > 0 {
                return Err(refuse(format!(
                    "the default partition {table} holds rows of the window"
                )));
            }
            continue;
        }
        let bound = of.bound;
        let (from, to) = native
            .bound_range(&bound)
            .ok_or_else(|| refuse(format!("cannot read the bounds of {table} ({bound})")))?;
        let partition = NativePartition {
            table,
            bound,
            from,
            to,
        };
        if partitions
            .iter()
            .any(|p| partition.overlaps(p.start, p.end))
        {
            if of.partitioned {
                return Err(refuse(format!("{} is itself partitioned", partition.table)));
            }
            affected.push(partition);
        }
    }
    if affected.is_empty() {
        return Err(refuse("none of its partitions covers the window".into()));
    }
    // Every backfilled partition must land in one of them (not in a default partition).
    for partition in partitions {
        if !affected
            .iter()
            .any(|native| native.from <= partition.start && partition.end <= native.to)
        {
            return Err(refuse(format!(
                "{} is not inside one of its partitions (only a default partition, or several, would hold it)",
                partition.key
            )));
        }
    }
    // What is attached to a partition itself (not inherited from the parent) would stay with
    // the archived partition.
    for partition in &affected {
        let found = native.own_dependents(conn, &partition.table).await?;
        if !found.is_empty() {
            return Err(refuse(format!(
                "{} has its own {} that would stay with the archived partition",
                partition.table,
                found.join(", ")
            )));
        }
    }
    Ok(affected)
}

/// The name of the CHECK constraint the engine's `bound_check` adds to a shadow partition.
pub const BOUND_CHECK: &str = "bf_partition_bound";

/// swap_partitions: the shadow is a partitioned table with one partition per target partition
/// the window touches, holding that partition's rows outside the window (the window's rows
/// come from the partition tasks). Returns the checksum of the copied rows, for the publish
/// guard.
pub async fn build_partitioned_shadow(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    spec: &Spec,
    target: &TableName,
    shadow: &TableName,
    partitions: &[Partition],
) -> Result<Checksum, BackfillError> {
    let affected = partitions_in_window(warehouse.engine(), conn, spec, target, partitions).await?;
    let native = warehouse.engine().native_partitions().ok_or_else(|| {
        BackfillError::Invalid(format!(
            "{} has no native partitions",
            warehouse.engine().name()
        ))
    })?;
    execute(
        conn,
        &native.create_partitioned_like(shadow, target, &spec.partition.column),
        &[],
    )
    .await?;
    let run_id = shadow.name.as_str().rsplit('_').next().unwrap_or("run");
    let (outside, binds) = outside_window(warehouse.engine(), spec, partitions);
    let columns = warehouse
        .table_columns(conn, target)
        .await?
        .iter()
        .map(|c| quote_catalog_name(c))
        .collect::<Vec<_>>()
        .join(", ");
    for partition in &affected {
        let child = shadow_partition_name(&partition.table, run_id)?;
        execute(
            conn,
            &native.create_partition_of(&child, shadow, &partition.bound),
            &[],
        )
        .await?;
        if let Some(check) = native.bound_check(&spec.partition.column, &partition.bound) {
            // Checked now, on an empty table; publish attaches without a validation scan.
            execute(
                conn,
                &format!(
                    "ALTER TABLE {} ADD CONSTRAINT {BOUND_CHECK} CHECK ({check})",
                    child.quoted()
                ),
                &[],
            )
            .await?;
        }
        execute(
            conn,
            &format!(
                "INSERT INTO {} ({columns}) SELECT {columns} FROM {} AS t WHERE {outside}",
                shadow.quoted(),
                partition.table.quoted()
            ),
            &binds,
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "copying the rows of {} outside the window",
                partition.table
            ))
        })?;
    }
    execute(conn, &warehouse.engine().analyze(shadow), &[]).await?;
    // What the copy was taken from: the same rows are checksummed again at publish.
    warehouse.checksum(conn, shadow, None, &[]).await
}
