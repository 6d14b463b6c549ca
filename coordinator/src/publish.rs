//! Publishing and taking back: the atomic `swap_table` (archive the current table, rename the
//! shadow in, carry dependent views, grants and the table comment over), `swap_window` (the
//! table stays; its window rows are archived and merged from the shadow: only changed rows
//! are written), `rollback` (put the archive back and prove its checksum), and `gc` (drop
//! archives past retention).
//!
//! Each is one transaction. PostgreSQL views bind to a table's OID, so the views that read the
//! target are re-created from their own definitions inside the swap; SQLite views bind by
//! name, so the swap runs with `legacy_alter_table` so that renames leave views alone.

use backfill_common::BackfillError;
use backfill_common::control::{
    ArchiveMark, ArchiveRecord, ControlStore, OPEN_STATES, RunRecord, RunState, now_text,
};
use backfill_common::engine::{Engine, SwapGuard, TableSwap, WriterLock};
use backfill_common::ident::TableName;
use backfill_common::sql::string_literal;
use backfill_common::warehouse::{Checksum, RowHash, Session, execute, fetch_all, fetch_one, get};
use chrono::{Duration, Utc};

use backfill_common::engine::quote_catalog_name;

fn archive_suffix(run_id: &str) -> String {
    format!("__bf_archive_{run_id}")
}

fn undone_suffix(run_id: &str) -> String {
    format!("__bf_undone_{run_id}")
}

pub fn archive_name(target: &TableName, run_id: &str) -> Result<TableName, BackfillError> {
    target
        .with_suffix(&archive_suffix(run_id))
        .map_err(|e| BackfillError::Invalid(e.to_string()))
}

pub fn undone_name(target: &TableName, run_id: &str) -> Result<TableName, BackfillError> {
    target
        .with_suffix(&undone_suffix(run_id))
        .map_err(|e| BackfillError::Invalid(e.to_string()))
}

/// The checksum of the target's rows outside the window recorded when the shadow was built,
/// with the condition that selects them: publish refuses if they changed since.
pub struct OutsideGuard {
    pub filter: String,
    pub binds: Vec<backfill_common::warehouse::Bind>,
    pub expected: String,
}

/// The checksum of the target's window rows the audits compared against (an approval gate):
/// publish refuses if they changed since.
pub struct WindowGuard {
    pub filter: String,
    pub binds: Vec<backfill_common::warehouse::Bind>,
    pub expected: String,
}

/// Archive kinds in the control store.
pub const ARCHIVE_TABLE: &str = "pre_publish";
pub const ARCHIVE_WINDOW: &str = "pre_publish_window";
pub const ARCHIVE_PARTITION: &str = "pre_publish_partition";

async fn check_window_guard(
    warehouse: &backfill_common::warehouse::Warehouse,
    conn: &mut dyn Session,
    target: &TableName,
    guard: Option<&WindowGuard>,
) -> Result<(), BackfillError> {
    let Some(guard) = guard else {
        return Ok(());
    };
    let now = warehouse
        .checksum_like(
            conn,
            target,
            Some(&guard.filter),
            &guard.binds,
            &guard.expected,
        )
        .await?;
    if now.to_string() != guard.expected {
        return Err(BackfillError::ApprovalLapsed(format!(
            "{target} changed inside the window since the audits compared against it ({} then, {now} now): \
             the approval no longer holds. Nothing was published; run the same spec again to audit the new state",
            guard.expected
        )));
    }
    Ok(())
}

/// What a `swap_table` publish checks while writers are held: the window as the audits saw
/// it (an approval gate) and the rows outside the window as the shadow copied them. Returns
/// the whole target's checksum (one scan) for the archive record.
struct PublishGuard<'a> {
    warehouse: &'a backfill_common::warehouse::Warehouse,
    target: &'a TableName,
    outside: Option<&'a OutsideGuard>,
    window: Option<&'a WindowGuard>,
}

#[async_trait::async_trait]
impl SwapGuard for PublishGuard<'_> {
    async fn check(&self, session: &mut dyn Session) -> Result<Checksum, BackfillError> {
        let (warehouse, target) = (self.warehouse, self.target);
        check_window_guard(warehouse, session, target, self.window).await?;
        // One scan: the whole table for the archive record, and its rows outside the window
        // to compare with what the shadow was built from.
        let Some(guard) = self.outside else {
            return warehouse.checksum(session, target, None, &[]).await;
        };
        let (old, now) = warehouse
            .checksum_with_subset(
                session,
                target,
                &guard.filter,
                &guard.binds,
                RowHash::of_stored(&guard.expected),
            )
            .await?;
        if now.to_string() != guard.expected {
            return Err(BackfillError::Conflict(format!(
                "{target} changed outside the window since the shadow was built ({} then, {now} now): publishing would discard those writes. \
                 Nothing was published; pause the writers (or backfill their partitions too), abandon this run and run again",
                guard.expected
            )));
        }
        Ok(old)
    }
}

/// The checksum of a table, as a guard: what a rollback records of the table it replaces.
struct ChecksumOf<'a>(&'a backfill_common::warehouse::Warehouse, &'a TableName);

#[async_trait::async_trait]
impl SwapGuard for ChecksumOf<'_> {
    async fn check(&self, session: &mut dyn Session) -> Result<Checksum, BackfillError> {
        self.0.checksum(session, self.1, None, &[]).await
    }
}

/// Whether a swap of `replacement` into `current`'s place, with `current` stepping aside to
/// `aside`, already happened: where DDL commits on its own, a process can stop between the
/// swap and its record. The swap is atomic, so `replacement` gone and `aside` present means
/// it did; the table at `aside` was not written since.
async fn swapped_unrecorded(
    warehouse: &backfill_common::warehouse::Warehouse,
    aside: &TableName,
    replacement: &TableName,
) -> Result<Option<Checksum>, BackfillError> {
    if warehouse.engine().capabilities().transactional_ddl {
        return Ok(None);
    }
    let mut conn = warehouse.acquire().await?;
    if warehouse.table_exists(&mut conn, replacement).await?
        || !warehouse.table_exists(&mut conn, aside).await?
    {
        return Ok(None);
    }
    tracing::warn!(%aside, %replacement, "the tables were swapped by an attempt that stopped before recording it; recording it now");
    Ok(Some(warehouse.checksum(&mut conn, aside, None, &[]).await?))
}

/// Whether `run`'s `swap_table` publish renamed the tables and stopped before recording it
/// (possible only where DDL commits on its own): its shadow is gone and its archive exists.
pub async fn swap_done_unrecorded(
    warehouse: &backfill_common::warehouse::Warehouse,
    run: &RunRecord,
) -> Result<bool, BackfillError> {
    if warehouse.engine().capabilities().transactional_ddl || !run.state.is_open() {
        return Ok(false);
    }
    let target =
        TableName::parse(&run.target).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let shadow =
        TableName::parse(&run.shadow_table).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let archive = archive_name(&target, &run.run_id)?;
    let mut conn = warehouse.acquire().await?;
    Ok(!warehouse.table_exists(&mut conn, &shadow).await?
        && warehouse.table_exists(&mut conn, &archive).await?)
}

/// Archives the current target and renames the shadow in. Where DDL is transactional, in one
/// transaction with the archive's record (the old table's checksum, for rollback) and the
/// run marked published; elsewhere by the engine's cut-over, recorded once the names have
/// changed (a publish that finds them changed records it).
pub async fn swap_table(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    retention_days: u32,
    outside: Option<OutsideGuard>,
    window: Option<WindowGuard>,
) -> Result<ArchiveRecord, BackfillError> {
    let warehouse = &store.warehouse;
    let archive = archive_name(target, &run.run_id)?;
    let engine = warehouse.engine();
    let aside_suffix = archive_suffix(&run.run_id);
    let swap = TableSwap {
        current: target,
        aside: &archive,
        replacement: shadow,
        aside_suffix: &aside_suffix,
        carry_grants: true,
        takes_index_names: &|_| true,
    };
    let guard = PublishGuard {
        warehouse,
        target,
        outside: outside.as_ref(),
        window: window.as_ref(),
    };
    let record = |old: &Checksum| {
        archive_record(
            &run.run_id,
            &archive,
            target,
            ARCHIVE_TABLE,
            old,
            Duration::days(retention_days as i64),
        )
    };
    let record_publish = async |tx: &mut dyn Session, record: &ArchiveRecord| {
        store.insert_archive(tx, record).await?;
        record_published(store, tx, &run.run_id, &archive.to_string()).await?;
        store
            .set_pinned_run_state(tx, run, &PUBLISHABLE, RunState::Published, None)
            .await
    };
    if !engine.capabilities().transactional_ddl {
        let old = match swapped_unrecorded(warehouse, &archive, shadow).await? {
            Some(old) => old,
            None => engine.cut_over(warehouse.pool(), &swap, &guard).await?,
        };
        let record = record(&old);
        let mut tx = warehouse.begin().await?;
        record_publish(&mut tx, &record).await?;
        tx.commit().await?;
        return Ok(record);
    }
    let mut conn = warehouse.acquire().await?;
    engine.prepare_swap(&mut conn, true).await?;
    let result = async {
        let mut tx = conn.begin().await?;
        // Block writers but not readers while checksumming; the lock for the renames comes
        // after, in the swap.
        engine
            .lock_against_writers(&mut tx, target, WriterLock::Shared)
            .await?;
        let old = guard.check(&mut tx).await?;
        engine.swap_tables(&mut tx, &swap).await?;
        let record = record(&old);
        record_publish(&mut tx, &record).await?;
        tx.commit().await?;
        Ok::<_, BackfillError>(record)
    }
    .await;
    engine.prepare_swap(&mut conn, false).await?;
    result
}

/// States a run publishes from: audited, or audited and approved.
const PUBLISHABLE: [RunState; 3] = [
    RunState::Auditing,
    RunState::AuditFailed,
    RunState::AwaitingApproval,
];

/// The columns `swap_window` writes, and the statements that make the target's window equal
/// to another table's rows (the shadow at publish, the archive at rollback): delete the keys
/// that are gone, update the rows that changed, insert the new keys. Rows that did not change
/// are not written.
struct WindowMerge {
    delete_vanished: String,
    update_changed: String,
    insert_new: String,
}

fn window_merge(
    engine: &dyn Engine,
    target: &TableName,
    from: &TableName,
    columns: &[String],
    text_compared: &[String],
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
) -> WindowMerge {
    let key_names: Vec<String> = key.iter().map(|k| k.as_str().to_string()).collect();
    let key_match = |a: &str, b: &str| {
        key.iter()
            .map(|k| format!("{a}.{k} = {b}.{k}", k = k.quoted()))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let non_key: Vec<&String> = columns.iter().filter(|c| !key_names.contains(c)).collect();
    let column_list = columns
        .iter()
        .map(|c| quote_catalog_name(c))
        .collect::<Vec<_>>()
        .join(", ");
    let delete_vanished = format!(
        "{} WHERE {window_on_t} AND NOT EXISTS (SELECT 1 FROM {from} AS s WHERE {})",
        engine.delete_from(target, "t"),
        key_match("s", "t"),
        from = from.quoted(),
    );
    let update_changed = if non_key.is_empty() {
        // Only key columns: a matched row cannot differ.
        "SELECT 1 WHERE 1 = 0".to_string()
    } else {
        let set = non_key
            .iter()
            .map(|c| {
                let quoted = quote_catalog_name(c);
                (quoted.clone(), format!("s.{quoted}"))
            })
            .collect::<Vec<_>>();
        let condition = format!(
            "{} AND {window_on_t} AND ({})",
            key_match("t", "s"),
            non_key
                .iter()
                .map(|c| {
                    let quoted = quote_catalog_name(c);
                    if text_compared.contains(c) {
                        // json has no equality operator: compare its text
                        engine.distinct(
                            &engine.as_text(&format!("t.{quoted}")),
                            &engine.as_text(&format!("s.{quoted}")),
                        )
                    } else {
                        engine.distinct(&format!("t.{quoted}"), &format!("s.{quoted}"))
                    }
                })
                .collect::<Vec<_>>()
                .join(" OR "),
        );
        engine.update_from(target, from, &set, &condition)
    };
    let insert_new = format!(
        "INSERT INTO {target} ({column_list}) SELECT {} FROM {from} AS s WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {})",
        columns
            .iter()
            .map(|c| format!("s.{}", quote_catalog_name(c)))
            .collect::<Vec<_>>()
            .join(", "),
        key_match("t", "s"),
        target = target.quoted(),
        from = from.quoted(),
    );
    WindowMerge {
        delete_vanished,
        update_changed,
        insert_new,
    }
}

/// Refuses a window whose new keys exist outside it in the target: merging would skip those
/// rows (a row moved between partitions: both partitions belong in the window).
async fn check_no_key_outside_window(
    conn: &mut dyn Session,
    target: &TableName,
    from: &TableName,
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<(), BackfillError> {
    let key_match = key
        .iter()
        .map(|k| format!("t.{k} = s.{k}", k = k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    let row = fetch_one(
        conn,
        &format!(
            "SELECT count(*) FROM {} AS s WHERE EXISTS (SELECT 1 FROM {} AS t WHERE {key_match} AND NOT coalesce({window_on_t}, false))",
            from.quoted(),
            target.quoted()
        ),
        binds,
    )
    .await?;
    let collisions: i64 = get(&row, 0)?;
    if collisions > 0 {
        return Err(BackfillError::Conflict(format!(
            "{collisions} key(s) of the new window already exist outside it in {target} (rows moved between partitions?): \
             merging would skip them. Nothing was published; include the partitions those rows come from in the window"
        )));
    }
    Ok(())
}

/// Rows written by a window merge.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WindowWrites {
    pub deleted: u64,
    pub updated: u64,
    pub inserted: u64,
}

async fn apply_window_merge(
    conn: &mut dyn Session,
    merge: &WindowMerge,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<WindowWrites, BackfillError> {
    let deleted = execute(conn, &merge.delete_vanished, binds).await?;
    let updated = execute(conn, &merge.update_changed, binds).await?;
    let inserted = execute(conn, &merge.insert_new, &[]).await?;
    Ok(WindowWrites {
        deleted,
        updated,
        inserted,
    })
}

/// Publishes a shadow that holds only the window, in one transaction: copies the target's
/// window rows to the archive, merges the shadow into the window (only changed rows are
/// written), drops the shadow. The table keeps its identity: views, grants, foreign keys,
/// indexes and statistics are untouched. Readers see the old window or the new one.
#[allow(clippy::too_many_arguments)]
pub async fn swap_window(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
    retention_days: u32,
    guard: Option<WindowGuard>,
) -> Result<(ArchiveRecord, WindowWrites), BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let archive = archive_name(target, &run.run_id)?;
    let create_archive = create_window_copy_before(warehouse, target, &archive).await?;
    let mut tx = warehouse.begin().await?;
    // Writers wait; readers go on, seeing the old rows until commit.
    engine
        .lock_against_writers(&mut tx, target, WriterLock::Exclusive)
        .await?;
    check_window_guard(warehouse, &mut tx, target, guard.as_ref()).await?;
    let columns = warehouse.table_columns(&mut tx, target).await?;
    copy_window(
        engine,
        &mut tx,
        target,
        &archive,
        create_archive,
        window_on_t,
        binds,
    )
    .await?;
    let old = warehouse.checksum(&mut tx, &archive, None, &[]).await?;
    check_no_key_outside_window(&mut tx, target, shadow, key, window_on_t, binds).await?;
    let json = engine.text_compared_columns(&mut tx, target).await?;
    let merge = window_merge(engine, target, shadow, &columns, &json, key, window_on_t);
    let writes = apply_window_merge(&mut tx, &merge, binds).await?;
    let shadow_left = drop_with(engine, &mut tx, shadow).await?;
    let record = archive_record(
        &run.run_id,
        &archive,
        target,
        ARCHIVE_WINDOW,
        &old,
        Duration::days(retention_days as i64),
    );
    store.insert_archive(&mut tx, &record).await?;
    record_published(store, &mut tx, &run.run_id, &archive.to_string()).await?;
    store
        .record_event(
            &mut tx,
            &run.run_id,
            None,
            "window_merged",
            &format!(
                "deleted {} updated {} inserted {}",
                writes.deleted, writes.updated, writes.inserted
            ),
        )
        .await?;
    store
        .set_pinned_run_state(&mut tx, run, &PUBLISHABLE, RunState::Published, None)
        .await?;
    tx.commit().await?;
    drop_after_commit(warehouse, shadow_left).await;
    Ok((record, writes))
}

/// The condition selecting the rows of these partitions (alias `t`) of a partitioned table.
pub fn in_partitions(partitions: &[TableName]) -> String {
    format!(
        "t.tableoid IN ({})",
        partitions
            .iter()
            .map(|p| format!("CAST({} AS regclass)", string_literal(&p.quoted())))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The shadow's partitions, each with the target partition it replaces and its bound.
async fn shadow_partitions(
    conn: &mut dyn Session,
    shadow: &TableName,
    run_id: &str,
) -> Result<Vec<(TableName, TableName, String)>, BackfillError> {
    let rows = fetch_all(
        conn,
        "SELECT CAST(n.nspname AS text), CAST(c.relname AS text), pg_get_expr(c.relpartbound, c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE i.inhparent = CAST($1 AS regclass) ORDER BY 2",
        &[shadow.quoted().into()],
    )
    .await?;
    let suffix = format!("__bfs_{run_id}");
    let mut out = Vec::new();
    for row in &rows {
        let (schema, name, bound): (String, String, String) =
            (get(row, 0)?, get(row, 1)?, get(row, 2)?);
        let replaces = name.strip_suffix(&suffix).ok_or_else(|| {
            BackfillError::Invalid(format!("unexpected partition {schema}.{name} in {shadow}"))
        })?;
        let parse = |n: &str| {
            TableName::parse(&format!("{schema}.{n}"))
                .map_err(|e| BackfillError::Invalid(e.to_string()))
        };
        out.push((parse(&name)?, parse(replaces)?, bound));
    }
    Ok(out)
}

/// Publishes a partitioned shadow (natively partitioned PostgreSQL targets), in one
/// transaction: for each partition the window touches, the target's partition is detached and
/// kept as `<partition>__bf_archive_<run>`, and the shadow's partition (its rows outside the
/// window copied, the window recomputed) is renamed in and attached with the same bounds. The
/// other partitions, the parent, its views and grants are untouched.
pub async fn swap_partitions(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    retention_days: u32,
    outside: Option<OutsideGuard>,
    window: Option<WindowGuard>,
) -> Result<Vec<ArchiveRecord>, BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let mut tx = warehouse.begin().await?;
    execute(
        &mut tx,
        "SELECT set_config('lock_timeout', '30s', true)",
        &[],
    )
    .await?;
    // Writers wait from here; readers go on until the first DETACH, which holds the parent
    // exclusively until commit (renames and attaches only: the new partitions carry CHECK
    // constraints equal to their bounds, so attaching them scans nothing).
    execute(
        &mut tx,
        &format!("LOCK TABLE {} IN SHARE MODE", target.quoted()),
        &[],
    )
    .await?;
    check_window_guard(warehouse, &mut tx, target, window.as_ref()).await?;
    let pairs = shadow_partitions(&mut tx, shadow, &run.run_id).await?;
    if pairs.is_empty() {
        return Err(BackfillError::Invalid(format!(
            "{shadow} has no partitions to publish"
        )));
    }
    let replaced: Vec<TableName> = pairs.iter().map(|(_, old, _)| old.clone()).collect();
    if let Some(guard) = &outside {
        let filter = format!("{} AND {}", in_partitions(&replaced), guard.filter);
        let now = warehouse
            .checksum_like(
                &mut tx,
                target,
                Some(&filter),
                &guard.binds,
                &guard.expected,
            )
            .await?;
        if now.to_string() != guard.expected {
            return Err(BackfillError::Conflict(format!(
                "the partitions {} of {target} changed outside the window since the shadow was built ({} then, {now} now): \
                 publishing would discard those writes. Nothing was published; abandon this run and run again",
                replaced
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                guard.expected
            )));
        }
    }
    let mut records = Vec::new();
    // Everything that reads whole partitions happens before the first DETACH, which locks
    // the parent against readers until commit.
    let mut old_checksums = Vec::new();
    for (_, old_partition, _) in &pairs {
        old_checksums.push(
            warehouse
                .checksum(&mut tx, old_partition, None, &[])
                .await?,
        );
    }
    for ((new_partition, old_partition, bound), old) in pairs.iter().zip(old_checksums) {
        let archive = archive_name(old_partition, &run.run_id)?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                shadow.quoted(),
                new_partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                target.quoted(),
                old_partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                old_partition.quoted(),
                archive.name.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                new_partition.quoted(),
                old_partition.name.quoted()
            ),
            &[],
        )
        .await?;
        engine
            .hand_over_index_names(
                &mut tx,
                &archive,
                old_partition,
                &archive_suffix(&run.run_id),
                &|_| true,
            )
            .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} ATTACH PARTITION {} {bound}",
                target.quoted(),
                old_partition.quoted()
            ),
            &[],
        )
        .await?;
        // The shadow partition's copy of the bound (it made ATTACH skip its scan).
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                old_partition.quoted(),
                crate::shadow::BOUND_CHECK
            ),
            &[],
        )
        .await?;
        let record = archive_record(
            &run.run_id,
            &archive,
            old_partition,
            ARCHIVE_PARTITION,
            &old,
            Duration::days(retention_days as i64),
        );
        store.insert_archive(&mut tx, &record).await?;
        records.push(record);
    }
    execute(&mut tx, &format!("DROP TABLE {}", shadow.quoted()), &[]).await?;
    record_published(
        store,
        &mut tx,
        &run.run_id,
        &records
            .iter()
            .map(|r| r.archive_table.clone())
            .collect::<Vec<_>>()
            .join(","),
    )
    .await?;
    store
        .set_pinned_run_state(&mut tx, run, &PUBLISHABLE, RunState::Published, None)
        .await?;
    tx.commit().await?;
    Ok(records)
}

/// Puts swap_partitions archives back: each current partition is detached and kept as
/// `<partition>__bf_undone_<run>`, its archive renamed back and attached with the same bounds;
/// every restored partition's checksum must equal the one recorded at publish, or nothing
/// changes.
async fn rollback_partitions(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    archives: &[ArchiveRecord],
) -> Result<RollbackReport, BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let mut tx = warehouse.begin().await?;
    execute(
        &mut tx,
        "SELECT set_config('lock_timeout', '30s', true)",
        &[],
    )
    .await?;
    let mut restored_from = Vec::new();
    let mut kept_as = Vec::new();
    let mut checksums = Vec::new();
    for archive in archives {
        let archive_table = TableName::parse(&archive.archive_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        let partition = TableName::parse(&archive.source_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        if !warehouse.table_exists(&mut tx, &archive_table).await? {
            return Err(BackfillError::Invalid(format!(
                "the archive table {archive_table} no longer exists"
            )));
        }
        let row = fetch_one(
            &mut tx,
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid \
             WHERE c.oid = CAST($1 AS regclass) AND i.inhparent = CAST($2 AS regclass)",
            &[partition.quoted().into(), target.quoted().into()],
        )
        .await
        .map_err(|e| e.context(format!("{partition} is no longer a partition of {target}")))?;
        let bound: String = get(&row, 0)?;
        let undone = undone_name(&partition, &run.run_id)?;
        let current = warehouse.checksum(&mut tx, &partition, None, &[]).await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                target.quoted(),
                partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                partition.quoted(),
                undone.name.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                archive_table.quoted(),
                partition.name.quoted()
            ),
            &[],
        )
        .await?;
        let archived = archive_suffix(&run.run_id);
        engine
            .hand_over_index_names(
                &mut tx,
                &undone,
                &partition,
                &undone_suffix(&run.run_id),
                &|name| name.ends_with(&archived),
            )
            .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} ATTACH PARTITION {} {bound}",
                target.quoted(),
                partition.quoted()
            ),
            &[],
        )
        .await?;
        let restored = warehouse
            .checksum_like(&mut tx, &partition, None, &[], &archive.checksum)
            .await?;
        if restored.to_string() != archive.checksum {
            tx.rollback().await?;
            return Err(BackfillError::Conflict(format!(
                "the archive {archive_table} has checksum {restored} but {} was recorded at publish; nothing was restored",
                archive.checksum
            )));
        }
        record_restore(
            store,
            &mut tx,
            &run.run_id,
            archive,
            &undone,
            &partition,
            &current,
        )
        .await?;
        restored_from.push(archive_table.to_string());
        kept_as.push(undone.to_string());
        checksums.push(restored.to_string());
    }
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &[RunState::Published],
            RunState::RolledBack,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(RollbackReport {
        run_id: run.run_id.clone(),
        target: target.to_string(),
        restored_from: restored_from.join(", "),
        kept_as: kept_as.join(", "),
        checksum: checksums.join(", "),
    })
}

/// Creates `into`, the plain table a window publish archives the target's window rows in (or
/// a window rollback keeps the backfilled rows in), before the transaction that fills it
/// where DDL would commit that transaction (`transactional_ddl`), on a session of its own. A
/// table of that name left by an attempt that did not commit is replaced: no record names it
/// until the filling transaction commits. Returns whether `copy_window` still creates it.
async fn create_window_copy_before(
    warehouse: &backfill_common::warehouse::Warehouse,
    target: &TableName,
    into: &TableName,
) -> Result<bool, BackfillError> {
    let engine = warehouse.engine();
    if engine.capabilities().transactional_ddl {
        return Ok(true);
    }
    let mut conn = warehouse.acquire().await?;
    execute(
        &mut conn,
        &format!("DROP TABLE IF EXISTS {}", into.quoted()),
        &[],
    )
    .await?;
    execute(&mut conn, &engine.create_table_like(into, target), &[]).await?;
    Ok(false)
}

/// Drops `table` inside `tx` where DDL is transactional; otherwise returns it, to be dropped
/// once `tx` committed (a crash in between leaves a table no open run needs).
async fn drop_with(
    engine: &dyn Engine,
    tx: &mut dyn Session,
    table: &TableName,
) -> Result<Option<TableName>, BackfillError> {
    if !engine.capabilities().transactional_ddl {
        return Ok(Some(table.clone()));
    }
    execute(tx, &format!("DROP TABLE {}", table.quoted()), &[]).await?;
    Ok(None)
}

/// Drops what `drop_with` left for after the commit. The publish or rollback has committed:
/// a failure here is logged, not returned (nothing needs the table any more; it is named in the log).
async fn drop_after_commit(
    warehouse: &backfill_common::warehouse::Warehouse,
    table: Option<TableName>,
) {
    let Some(table) = table else {
        return;
    };
    let dropped = async {
        let mut conn = warehouse.acquire().await?;
        execute(
            &mut conn,
            &format!("DROP TABLE IF EXISTS {}", table.quoted()),
            &[],
        )
        .await
    }
    .await;
    if let Err(error) = dropped {
        tracing::warn!(%error, %table, "could not drop the table after the commit; nothing needs it: drop it by hand");
    }
}

/// Copies the target's window rows (alias `t`) into the plain table `into` (created here when
/// `create`): the archive of a window publish, or the backfilled rows a window rollback keeps.
async fn copy_window(
    engine: &dyn Engine,
    conn: &mut dyn Session,
    target: &TableName,
    into: &TableName,
    create: bool,
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<(), BackfillError> {
    if create {
        execute(conn, &engine.create_table_like(into, target), &[]).await?;
    }
    execute(
        conn,
        &format!(
            "INSERT INTO {} SELECT * FROM {} AS t WHERE {window_on_t}",
            into.quoted(),
            target.quoted()
        ),
        binds,
    )
    .await?;
    Ok(())
}

/// Notes on the run where its old version went and when it was published.
async fn record_published(
    store: &ControlStore,
    conn: &mut dyn Session,
    run_id: &str,
    archive: &str,
) -> Result<(), BackfillError> {
    execute(
        conn,
        &format!(
            "UPDATE {} SET archive_table = $2, published_at = $3 WHERE run_id = $1",
            store.table("runs")
        ),
        &[run_id.into(), archive.into(), now_text().into()],
    )
    .await?;
    Ok(())
}

/// The record of an archive: `table` keeps what `source` held (`checksum`) for `retention`.
fn archive_record(
    run_id: &str,
    table: &TableName,
    source: &TableName,
    kind: &str,
    checksum: &Checksum,
    retention: Duration,
) -> ArchiveRecord {
    ArchiveRecord {
        archive_table: table.to_string(),
        run_id: run_id.to_string(),
        source_table: source.to_string(),
        kind: kind.to_string(),
        row_count: checksum.rows,
        checksum: checksum.to_string(),
        created_at: now_text(),
        expires_at: (Utc::now() + retention).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        restored_at: None,
        dropped_at: None,
    }
}

/// Marks `archive` restored and records what the restore replaced (`undone`, holding
/// `current`), kept as long as the archive itself was to be kept.
async fn record_restore(
    store: &ControlStore,
    conn: &mut dyn Session,
    run_id: &str,
    archive: &ArchiveRecord,
    undone: &TableName,
    source: &TableName,
    current: &Checksum,
) -> Result<(), BackfillError> {
    store
        .mark_archive(conn, &archive.archive_table, ArchiveMark::Restored)
        .await?;
    let parse =
        |text: &str| chrono::DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc));
    let retention = match (parse(&archive.expires_at), parse(&archive.created_at)) {
        (Ok(expires), Ok(created)) => expires - created,
        _ => Duration::days(30),
    };
    store
        .insert_archive(
            conn,
            &archive_record(run_id, undone, source, "rolled_back", current, retention),
        )
        .await
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RollbackReport {
    pub run_id: String,
    pub target: String,
    pub restored_from: String,
    pub kept_as: String,
    pub checksum: String,
}

/// Swaps the archive of `run` back in, keeping the backfilled table as `__bf_undone_<run>`
/// (same retention), and proves the restored table's checksum equals the one recorded at
/// publish; on a mismatch nothing changes.
pub async fn rollback(store: &ControlStore, run_id: &str) -> Result<RollbackReport, BackfillError> {
    let run = store.find_run(run_id).await?.ok_or_else(|| {
        BackfillError::Invalid(format!("no run `{run_id}` in this control store"))
    })?;
    if run.state != RunState::Published {
        return Err(BackfillError::Conflict(format!(
            "run {run_id} is {}; only a published run can be rolled back",
            run.state.as_str()
        )));
    }
    let target =
        TableName::parse(&run.target).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let runs = store.runs_for_target(&run.target).await?;
    if let Some(open) = runs.iter().find(|r| r.state.is_open()) {
        return Err(BackfillError::Conflict(format!(
            "run {} on {} is {} and its shadow was built from the current table; rolling back now would be undone when it publishes. \
             Abandon it first (`backfill abandon {}`), then roll back",
            open.run_id,
            run.target,
            open.state.as_str(),
            open.run_id
        )));
    }
    let later = runs
        .into_iter()
        .find(|r| r.state == RunState::Published && r.published_at > run.published_at);
    if let Some(later) = later {
        return Err(BackfillError::Conflict(format!(
            "run {} published {} after run {run_id}; roll that one back first",
            later.run_id, run.target
        )));
    }
    let archives: Vec<ArchiveRecord> = store
        .archives()
        .await?
        .into_iter()
        .filter(|a| {
            a.run_id == run.run_id
                && [ARCHIVE_TABLE, ARCHIVE_WINDOW, ARCHIVE_PARTITION].contains(&a.kind.as_str())
        })
        .collect();
    if let Some(dropped) = archives.iter().find(|a| a.dropped_at.is_some()) {
        return Err(BackfillError::Conflict(format!(
            "the archive {} of run {run_id} was dropped by gc on {}; it cannot be restored",
            dropped.archive_table,
            dropped.dropped_at.clone().unwrap_or_default()
        )));
    }
    if !archives.is_empty() && archives.iter().all(|a| a.kind == ARCHIVE_PARTITION) {
        return rollback_partitions(store, &run, &target, &archives).await;
    }
    let archive = archives
        .into_iter()
        .next()
        .ok_or_else(|| BackfillError::Invalid(format!("run {run_id} has no archive record")))?;
    if archive.dropped_at.is_some() {
        return Err(BackfillError::Conflict(format!(
            "the archive {} of run {run_id} was dropped by gc on {}; it cannot be restored",
            archive.archive_table,
            archive.dropped_at.unwrap_or_default()
        )));
    }
    let archive_table = TableName::parse(&archive.archive_table)
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let undone = undone_name(&target, run_id)?;
    if archive.kind == ARCHIVE_WINDOW {
        return rollback_window(store, &run, &target, &archive, &archive_table, &undone).await;
    }
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    if !engine.capabilities().transactional_ddl {
        return rollback_by_cut_over(store, &run, &target, &archive, &archive_table, &undone).await;
    }
    let mut conn = warehouse.acquire().await?;
    engine.prepare_swap(&mut conn, true).await?;
    let result = async {
        let mut tx = conn.begin().await?;
        if !warehouse.table_exists(&mut tx, &archive_table).await? {
            return Err(BackfillError::Invalid(format!("the archive table {archive_table} no longer exists")));
        }
        engine.lock_for_swap(&mut tx, &target).await?;
        let current = warehouse.checksum(&mut tx, &target, None, &[]).await?;
        let archived = archive_suffix(&run.run_id);
        engine
            .swap_tables(
                &mut tx,
                &TableSwap {
                    current: &target,
                    aside: &undone,
                    replacement: &archive_table,
                    aside_suffix: &undone_suffix(&run.run_id),
                    carry_grants: false,
                    takes_index_names: &|name| name.ends_with(&archived),
                },
            )
            .await?;
        let restored: Checksum = warehouse
            .checksum_like(&mut tx, &target, None, &[], &archive.checksum)
            .await?;
        if restored.to_string() != archive.checksum {
            tx.rollback().await?;
            return Err(BackfillError::Conflict(format!(
                "the archive {archive_table} has checksum {restored} but {} was recorded at publish; it changed since, so nothing was restored",
                archive.checksum
            )));
        }
        record_restore(store, &mut tx, &run.run_id, &archive, &undone, &target, &current).await?;
        store.set_run_state(&mut tx, &run.run_id, &[RunState::Published], RunState::RolledBack, None).await?;
        tx.commit().await?;
        Ok(RollbackReport {
            run_id: run.run_id.clone(),
            target: target.to_string(),
            restored_from: archive_table.to_string(),
            kept_as: undone.to_string(),
            checksum: restored.to_string(),
        })
    }
    .await;
    engine.prepare_swap(&mut conn, false).await?;
    result
}

/// Rollback of a `swap_table` publish where DDL commits on its own: the archive is checked
/// first (nobody writes it: it must still hold what publish recorded), then swapped back by
/// the engine's cut-over, then recorded. A rollback that finds the swap done records it.
async fn rollback_by_cut_over(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    archive: &ArchiveRecord,
    archive_table: &TableName,
    undone: &TableName,
) -> Result<RollbackReport, BackfillError> {
    let warehouse = &store.warehouse;
    let current = match swapped_unrecorded(warehouse, undone, archive_table).await? {
        Some(current) => current,
        None => {
            let mut conn = warehouse.acquire().await?;
            if !warehouse.table_exists(&mut conn, archive_table).await? {
                return Err(BackfillError::Invalid(format!(
                    "the archive table {archive_table} no longer exists"
                )));
            }
            let held = warehouse
                .checksum_like(&mut conn, archive_table, None, &[], &archive.checksum)
                .await?;
            if held.to_string() != archive.checksum {
                return Err(BackfillError::Conflict(format!(
                    "the archive {archive_table} has checksum {held} but {} was recorded at publish; it changed since, so nothing was restored",
                    archive.checksum
                )));
            }
            drop(conn);
            let archived = archive_suffix(&run.run_id);
            let swap = TableSwap {
                current: target,
                aside: undone,
                replacement: archive_table,
                aside_suffix: &undone_suffix(&run.run_id),
                carry_grants: false,
                takes_index_names: &|name| name.ends_with(&archived),
            };
            warehouse
                .engine()
                .cut_over(warehouse.pool(), &swap, &ChecksumOf(warehouse, target))
                .await?
        }
    };
    let mut tx = warehouse.begin().await?;
    record_restore(
        store,
        &mut tx,
        &run.run_id,
        archive,
        undone,
        target,
        &current,
    )
    .await?;
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &[RunState::Published],
            RunState::RolledBack,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(RollbackReport {
        run_id: run.run_id.clone(),
        target: target.to_string(),
        restored_from: archive_table.to_string(),
        kept_as: undone.to_string(),
        checksum: archive.checksum.clone(),
    })
}

/// Puts a `swap_window` archive back: the window's current rows are kept as
/// `__bf_undone_<run>`, then the window is merged from the archive and its checksum must equal
/// the one recorded at publish, or nothing changes.
async fn rollback_window(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    archive: &ArchiveRecord,
    archive_table: &TableName,
    undone: &TableName,
) -> Result<RollbackReport, BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let text = store.spec_source(&run.spec_hash).await?.ok_or_else(|| {
        BackfillError::Invalid(format!(
            "the spec of run {} is missing from the control store",
            run.run_id
        ))
    })?;
    let spec = backfill_common::spec::Spec::parse(&text).map_err(|e| {
        BackfillError::Invalid(format!(
            "the stored spec of run {} no longer parses: {e}",
            run.run_id
        ))
    })?;
    let (window, binds) = crate::window::window_condition(
        engine,
        spec.partition.grain,
        &spec.partition.column,
        "t",
        &spec.planned_partitions(),
        1,
    );
    let create_undone = create_window_copy_before(warehouse, target, undone).await?;
    let mut tx = warehouse.begin().await?;
    // Writers wait; readers go on, seeing the old rows until commit.
    engine
        .lock_against_writers(&mut tx, target, WriterLock::Exclusive)
        .await?;
    if !warehouse.table_exists(&mut tx, archive_table).await? {
        return Err(BackfillError::Invalid(format!(
            "the archive table {archive_table} no longer exists"
        )));
    }
    copy_window(
        engine,
        &mut tx,
        target,
        undone,
        create_undone,
        &window,
        &binds,
    )
    .await?;
    let current = warehouse.checksum(&mut tx, undone, None, &[]).await?;
    let columns = warehouse.table_columns(&mut tx, target).await?;
    let json = engine.text_compared_columns(&mut tx, target).await?;
    let merge = window_merge(
        engine,
        target,
        archive_table,
        &columns,
        &json,
        &spec.target.key,
        &window,
    );
    apply_window_merge(&mut tx, &merge, &binds).await?;
    let restored = warehouse
        .checksum_like(&mut tx, target, Some(&window), &binds, &archive.checksum)
        .await?;
    if restored.to_string() != archive.checksum {
        tx.rollback().await?;
        return Err(BackfillError::Conflict(format!(
            "restoring {archive_table} gives the window checksum {restored} but {} was recorded at publish; nothing was restored",
            archive.checksum
        )));
    }
    record_restore(
        store,
        &mut tx,
        &run.run_id,
        archive,
        undone,
        target,
        &current,
    )
    .await?;
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &[RunState::Published],
            RunState::RolledBack,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(RollbackReport {
        run_id: run.run_id.clone(),
        target: target.to_string(),
        restored_from: archive_table.to_string(),
        kept_as: undone.to_string(),
        checksum: restored.to_string(),
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GcReport {
    pub dropped: Vec<String>,
    pub kept: usize,
    /// Expired archives that could not be dropped, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Drops archives whose retention has passed. An archive that was renamed back into place by
/// a rollback (swap_table, swap_partitions) is the live table again and never dropped; a
/// swap_window archive is only copied from, so it expires like any other. An archive that
/// cannot be dropped (e.g. a view still reads it) is reported and the others still go.
/// `dry_run` only lists them.
pub async fn gc(
    store: &ControlStore,
    now: chrono::DateTime<Utc>,
    dry_run: bool,
) -> Result<GcReport, BackfillError> {
    let mut dropped = Vec::new();
    let mut failed = Vec::new();
    let mut kept = 0;
    for archive in store.archives().await? {
        let live_again = archive.restored_at.is_some() && archive.kind != ARCHIVE_WINDOW;
        if archive.dropped_at.is_some() || live_again {
            continue;
        }
        let expired = chrono::DateTime::parse_from_rfc3339(&archive.expires_at)
            .map(|e| e.with_timezone(&Utc) <= now)
            .unwrap_or(false);
        if !expired {
            kept += 1;
            continue;
        }
        if !dry_run && let Err(error) = drop_archive(store, &archive).await {
            failed.push((archive.archive_table, error.to_string()));
            continue;
        }
        dropped.push(archive.archive_table);
    }
    Ok(GcReport {
        dropped,
        kept,
        failed,
    })
}

async fn drop_archive(store: &ControlStore, archive: &ArchiveRecord) -> Result<(), BackfillError> {
    let table = TableName::parse(&archive.archive_table)
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let mut tx = store.warehouse.begin().await?;
    execute(
        &mut tx,
        &format!("DROP TABLE IF EXISTS {}", table.quoted()),
        &[],
    )
    .await?;
    store
        .mark_archive(&mut tx, &archive.archive_table, ArchiveMark::Dropped)
        .await?;
    store
        .record_event(
            &mut tx,
            &archive.run_id,
            None,
            "archive_dropped",
            &archive.archive_table,
        )
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Drops the shadow of a run that will never publish.
pub async fn drop_shadow(store: &ControlStore, run: &RunRecord) -> Result<(), BackfillError> {
    let shadow =
        TableName::parse(&run.shadow_table).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    if swap_done_unrecorded(&store.warehouse, run).await? {
        return Err(BackfillError::Conflict(format!(
            "run {run_id} was swapped in: {} holds the backfilled rows and {} the old table, but the publish stopped \
             before recording it. Abandoning would leave it published without a way back: run `backfill resume {run_id}` \
             to record it, then `backfill rollback {run_id}` if it should not stay",
            run.target,
            TableName::parse(&run.target)
                .ok()
                .and_then(|target| archive_name(&target, &run.run_id).ok())
                .map_or_else(|| "its archive".to_string(), |archive| archive.to_string()),
            run_id = run.run_id
        )));
    }
    let mut tx = store.warehouse.begin().await?;
    execute(
        &mut tx,
        &format!("DROP TABLE IF EXISTS {}", shadow.quoted()),
        &[],
    )
    .await?;
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &OPEN_STATES,
            RunState::Abandoned,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(())
}
