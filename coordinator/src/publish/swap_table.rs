//! `swap_table`: the current table is archived and the shadow renamed into its place, with
//! what depends on the table following the name (the engine's `swap_tables`, inside one
//! transaction with the archive's record), or by the engine's cut-over where DDL commits on
//! its own; and its rollback, the archive renamed back.

use super::*;

/// The `swap_table` strategy.
pub struct SwapTable;

#[async_trait::async_trait]
impl PublishStrategy for SwapTable {
    async fn create_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
    ) -> Result<crate::shadow::ShadowTable, BackfillError> {
        request.create_table(conn, true).await
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
        let published = request.published_checksum(true).await?;
        let archive = swap_table(
            &published,
            request.store,
            request.run,
            request.target,
            request.shadow,
            &request.spec.publish,
            request.outside_guard(),
            request.window_guard,
        )
        .await?;
        Ok(Published {
            archive,
            writes: None,
        })
    }

    async fn rollback(
        &self,
        request: RollbackRequest<'_>,
    ) -> Result<RollbackReport, BackfillError> {
        let (archive, archive_table, undone) =
            single_archive(request.run, request.target, request.archives)?;
        rollback_swap_table(request, &archive, &archive_table, &undone).await
    }
}

/// What a `swap_table` publish checks while writers are held: the window as the audits saw
/// it (an approval gate) and the rows outside the window as the shadow copied them. Returns
/// the whole target's checksum (one scan) for the archive record.
pub(super) struct PublishGuard<'a> {
    run: &'a str,
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
                 Nothing was published. Writers are live on {target}: `swap_window` replaces only the window's rows and leaves \
                 the others as the writers left them (set publish.mode = \"swap_window\", `backfill abandon {run}`, run again); \
                 or pause the writers, `backfill abandon {run}` and run again",
                guard.expected,
                run = self.run,
            )));
        }
        Ok(old)
    }
}

/// A rollback's guard: the table it replaces still holds what the publish put there (or the
/// caller said to discard writes since); its checksum is what the rollback records of it.
pub(super) struct Unchanged<'a> {
    request: RollbackRequest<'a>,
    archive: &'a ArchiveRecord,
    undone: &'a TableName,
}

#[async_trait::async_trait]
impl SwapGuard for Unchanged<'_> {
    async fn check(&self, session: &mut dyn Session) -> Result<Checksum, BackfillError> {
        let target = self.request.target;
        self.request
            .unchanged_since_publish(
                session,
                self.archive,
                target,
                &target.to_string(),
                self.undone,
            )
            .await
    }
}

/// Archives the current target and renames the shadow in. Where DDL is transactional, in one
/// transaction with the archive's record (the old table's checksum, for rollback) and the
/// run marked published; elsewhere by the engine's cut-over, recorded once the names have
/// changed (a publish that finds them changed records it).
#[allow(clippy::too_many_arguments)]
pub async fn swap_table(
    published: &Checksum,
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    publish: &backfill_common::spec::Publish,
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
        lock_wait: publish.lock_wait,
    };
    let guard = PublishGuard {
        run: &run.run_id,
        warehouse,
        target,
        outside: outside.as_ref(),
        window: window.as_ref(),
    };
    let record = |old: &Checksum| ArchiveRecord {
        published_checksum: Some(published.to_string()),
        ..archive_record(
            &run.run_id,
            &archive,
            target,
            ARCHIVE_TABLE,
            old,
            Duration::days(publish.archive_retention_days as i64),
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
            .lock_against_writers(&mut tx, target, WriterLock::Shared, publish.lock_wait)
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

/// Rollback of a `swap_table` publish: the archive renamed back into the target's place and
/// the backfilled table kept as `undone`, in one transaction whose restored checksum must be
/// the one recorded at publish (by a cut-over where DDL commits on its own).
pub(super) async fn rollback_swap_table(
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
    if !engine.capabilities().transactional_ddl {
        return rollback_by_cut_over(request, archive, archive_table, undone).await;
    }
    let mut conn = warehouse.acquire().await?;
    engine.prepare_swap(&mut conn, true).await?;
    let result = async {
        let mut tx = conn.begin().await?;
        if !warehouse.table_exists(&mut tx, archive_table).await? {
            return Err(BackfillError::Invalid(format!("the archive table {archive_table} no longer exists")));
        }
        // Writers wait while the table that steps aside is checksummed; readers go on until
        // the swap takes the views and the table.
        engine
            .lock_against_writers(&mut tx, target, WriterLock::Shared, spec.publish.lock_wait)
            .await?;
        let current = request
            .unchanged_since_publish(&mut tx, archive, target, &target.to_string(), undone)
            .await?;
        let archived = archive_suffix(&run.run_id);
        engine
            .swap_tables(
                &mut tx,
                &TableSwap {
                    current: target,
                    aside: undone,
                    replacement: archive_table,
                    aside_suffix: &undone_suffix(&run.run_id),
                    carry_grants: false,
                    takes_index_names: &|name| name.ends_with(&archived),
                    lock_wait: spec.publish.lock_wait,
                },
            )
            .await?;
        let restored: Checksum = warehouse
            .checksum_like(&mut tx, target, None, &[], &archive.checksum)
            .await?;
        if restored.to_string() != archive.checksum {
            tx.rollback().await?;
            return Err(BackfillError::Conflict(format!(
                "the archive {archive_table} has checksum {restored} but {} was recorded at publish; it changed since, so nothing was restored",
                archive.checksum
            )));
        }
        commit_rollback(store, tx, run, Restored { archive, archive_table, undone, target, current: &current, restored: restored.to_string() }).await
    }
    .await;
    engine.prepare_swap(&mut conn, false).await?;
    result
}

/// Rollback of a `swap_table` publish where DDL commits on its own: the archive is checked
/// first (nobody writes it: it must still hold what publish recorded), then swapped back by
/// the engine's cut-over, then recorded. A rollback that finds the swap done records it.
pub(super) async fn rollback_by_cut_over(
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
                lock_wait: spec.publish.lock_wait,
            };
            warehouse
                .engine()
                .cut_over(
                    warehouse.pool(),
                    &swap,
                    &Unchanged {
                        request,
                        archive,
                        undone,
                    },
                )
                .await?
        }
    };
    let tx = warehouse.begin().await?;
    let restored = Restored {
        archive,
        archive_table,
        undone,
        target,
        current: &current,
        restored: archive.checksum.clone(),
    };
    commit_rollback(store, tx, run, restored).await
}
