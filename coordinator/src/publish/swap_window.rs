//! `swap_window`: the table stays; its window rows are archived and merged from the shadow
//! (only changed rows are written) in one transaction; and its rollback, the window merged
//! back from the archive.

use super::*;

/// The `swap_window` strategy.
pub struct SwapWindow;

#[async_trait::async_trait]
impl PublishStrategy for SwapWindow {
    async fn create_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
    ) -> Result<crate::shadow::ShadowTable, BackfillError> {
        request.create_table(conn, false).await
    }

    async fn fill_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
        table: crate::shadow::ShadowTable,
    ) -> Result<crate::shadow::BuiltShadow, BackfillError> {
        request.fill_table(conn, table).await
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Result<Published, BackfillError> {
        let (window, binds) = request.window();
        let published = request.published_checksum(false).await?;
        let (archive, writes) = swap_window(
            &published,
            request.store,
            request.run,
            request.target,
            request.shadow,
            &request.spec.target.key,
            &window,
            &binds,
            &request.spec.publish,
            request.window_guard,
        )
        .await?;
        Ok(Published {
            archive,
            writes: Some(writes),
        })
    }

    async fn rollback(
        &self,
        request: RollbackRequest<'_>,
    ) -> Result<RollbackReport, BackfillError> {
        let (archive, archive_table, undone) =
            single_archive(request.run, request.target, request.archives)?;
        rollback_window(request, &archive, &archive_table, &undone).await
    }
}

/// The columns `swap_window` writes, and the statements that make the target's window equal
/// to another table's rows (the shadow at publish, the archive at rollback): delete the keys
/// that are gone, update the rows that changed, insert the new keys. Rows that did not change
/// are not written.
pub(super) struct WindowMerge {
    delete_vanished: String,
    update_changed: String,
    insert_new: String,
}

pub(super) fn window_merge(
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
pub(super) async fn check_no_key_outside_window(
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

pub(super) async fn apply_window_merge(
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
    published: &Checksum,
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
    publish: &backfill_common::spec::Publish,
    guard: Option<WindowGuard>,
) -> Result<(ArchiveRecord, WindowWrites), BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let archive = archive_name(target, &run.run_id)?;
    let create_archive = create_window_copy_before(warehouse, target, &archive).await?;
    let mut tx = warehouse.begin().await?;
    // Writers wait; readers go on, seeing the old rows until commit.
    engine
        .lock_against_writers(&mut tx, target, WriterLock::Exclusive, publish.lock_wait)
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
    let record = ArchiveRecord {
        published_checksum: Some(published.to_string()),
        ..archive_record(
            &run.run_id,
            &archive,
            target,
            ARCHIVE_WINDOW,
            &old,
            Duration::days(publish.archive_retention_days as i64),
        )
    };
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

/// Creates `into`, the plain table a window publish archives the target's window rows in (or
/// a window rollback keeps the backfilled rows in), before the transaction that fills it
/// where DDL would commit that transaction (`transactional_ddl`), on a session of its own. A
/// table of that name left by an attempt that did not commit is replaced: no record names it
/// until the filling transaction commits. Returns whether `copy_window` still creates it.
pub(super) async fn create_window_copy_before(
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
pub(super) async fn drop_with(
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
pub(super) async fn drop_after_commit(
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
pub(super) async fn copy_window(
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

/// Puts a `swap_window` archive back: the window's current rows are kept as
/// `__bf_undone_<run>`, then the window is merged from the archive and its checksum must equal
/// the one recorded at publish, or nothing changes.
pub(super) async fn rollback_window(
    request: RollbackRequest<'_>,
    archive: &ArchiveRecord,
    archive_table: &TableName,
    undone: &TableName,
) -> Result<RollbackReport, BackfillError> {
    let RollbackRequest {
        store,
        run,
        spec,
        target,
        ..
    } = request;
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let (window, binds) = crate::window::spec_window(engine, spec, &spec.planned_partitions());
    let create_undone = create_window_copy_before(warehouse, target, undone).await?;
    let mut tx = warehouse.begin().await?;
    // Writers wait; readers go on, seeing the old rows until commit.
    engine
        .lock_against_writers(
            &mut tx,
            target,
            WriterLock::Exclusive,
            spec.publish.lock_wait,
        )
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
    // Rows outside the window are left as they are: only writes inside it could be lost.
    let current = match request
        .unchanged_since_publish(
            &mut tx,
            archive,
            undone,
            &format!("the window of {target}"),
            undone,
        )
        .await
    {
        Ok(current) => current,
        Err(refused) => {
            tx.rollback().await?;
            if !engine.capabilities().transactional_ddl {
                let mut conn = warehouse.acquire().await?;
                execute(
                    &mut conn,
                    &format!("DROP TABLE IF EXISTS {}", undone.quoted()),
                    &[],
                )
                .await?;
            }
            return Err(refused);
        }
    };
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
    let restored = Restored {
        archive,
        archive_table,
        undone,
        target,
        current: &current,
        restored: restored.to_string(),
    };
    commit_rollback(store, tx, run, restored).await
}
