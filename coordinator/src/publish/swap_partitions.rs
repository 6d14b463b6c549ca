//! `swap_partitions` (PostgreSQL native partitions): the window's partitions of the target are
//! detached and archived, the shadow's attached in their place, in one transaction; and its
//! rollback. Reached only where `Capabilities::partition_exchange` holds.

use super::*;
use backfill_common::engine::NativePartitions;
use backfill_common::ident::Ident;

/// The `swap_partitions` strategy.
pub struct SwapPartitions;

#[async_trait::async_trait]
impl PublishStrategy for SwapPartitions {
    /// Nothing before the fill: the partitioned shadow's DDL and copy are one step, inside
    /// the run's first transaction (PostgreSQL's DDL is transactional).
    async fn create_shadow(
        &self,
        _request: ShadowRequest<'_>,
        _conn: &mut dyn Session,
    ) -> Result<crate::shadow::ShadowTable, BackfillError> {
        Ok(crate::shadow::ShadowTable::created_with_fill())
    }

    async fn fill_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
        _table: crate::shadow::ShadowTable,
    ) -> Result<crate::shadow::BuiltShadow, BackfillError> {
        let outside = crate::shadow::build_partitioned_shadow(
            request.warehouse,
            conn,
            request.spec,
            request.target,
            request.shadow,
            request.partitions,
        )
        .await?;
        Ok(crate::shadow::BuiltShadow {
            outside: Some(outside),
            deferred_indexes: Vec::new(),
        })
    }

    async fn publish(&self, request: PublishRequest<'_>) -> Result<Published, BackfillError> {
        let archives = swap_partitions(
            request.store,
            request.run,
            request.target,
            request.shadow,
            &request.spec.publish,
            request.outside_guard(),
            request.window_guard,
        )
        .await?;
        let names = archives
            .iter()
            .map(|a| a.archive_table.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let mut archive = archives
            .into_iter()
            .next()
            .ok_or_else(|| BackfillError::Invalid("swap_partitions archived nothing".into()))?;
        archive.archive_table = names;
        Ok(Published {
            archive,
            writes: None,
        })
    }

    async fn rollback(
        &self,
        request: RollbackRequest<'_>,
    ) -> Result<RollbackReport, BackfillError> {
        rollback_partitions(request).await
    }
}

/// The engine's native partitions, which `swap_partitions` is only chosen with.
pub(super) fn native(engine: &dyn Engine) -> Result<&dyn NativePartitions, BackfillError> {
    engine.native_partitions().ok_or_else(|| {
        BackfillError::Invalid(format!(
            "swap_partitions: {} has no native partitions",
            engine.name()
        ))
    })
}

/// The shadow's partitions, each with the target partition it replaces and its bound.
pub(super) async fn shadow_partitions(
    native: &dyn NativePartitions,
    conn: &mut dyn Session,
    shadow: &TableName,
    run_id: &str,
) -> Result<Vec<(TableName, TableName, String)>, BackfillError> {
    let suffix = format!("__bfs_{run_id}");
    let mut out = Vec::new();
    for of in native.partitions_of(conn, shadow).await? {
        let name = of.table.name.as_str();
        let replaces = name.strip_suffix(&suffix).ok_or_else(|| {
            BackfillError::Invalid(format!("unexpected partition {} in {shadow}", of.table))
        })?;
        let replaces = TableName {
            schema: of.table.schema.clone(),
            name: Ident::new(replaces).map_err(|e| BackfillError::Invalid(e.to_string()))?,
        };
        out.push((of.table, replaces, of.bound));
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
    publish: &backfill_common::spec::Publish,
    outside: Option<OutsideGuard>,
    window: Option<WindowGuard>,
) -> Result<Vec<ArchiveRecord>, BackfillError> {
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let native = native(engine)?;
    let mut tx = warehouse.begin().await?;
    // Writers wait from here; readers go on until the first DETACH, which holds the parent
    // exclusively until commit (renames and attaches only: the new partitions carry CHECK
    // constraints equal to their bounds, so attaching them scans nothing).
    engine
        .lock_against_writers(&mut tx, target, WriterLock::Shared, publish.lock_wait)
        .await?;
    check_window_guard(warehouse, &mut tx, target, window.as_ref()).await?;
    let pairs = shadow_partitions(native, &mut tx, shadow, &run.run_id).await?;
    if pairs.is_empty() {
        return Err(BackfillError::Invalid(format!(
            "{shadow} has no partitions to publish"
        )));
    }
    let replaced: Vec<TableName> = pairs.iter().map(|(_, old, _)| old.clone()).collect();
    if let Some(guard) = &outside {
        let filter = format!("{} AND {}", native.in_partitions(&replaced), guard.filter);
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
    for (new_partition, old_partition, _) in &pairs {
        let old = warehouse
            .checksum(&mut tx, old_partition, None, &[])
            .await?;
        // What the partition will hold: a rollback that finds otherwise has seen writes.
        let published = warehouse
            .checksum_like(&mut tx, new_partition, None, &[], &old.to_string())
            .await?;
        old_checksums.push((old, published));
    }
    // The views over the parent, then the parent, as its readers take them.
    engine
        .lock_for_swap(&mut tx, target, publish.lock_wait)
        .await?;
    for ((new_partition, old_partition, bound), (old, published)) in pairs.iter().zip(old_checksums)
    {
        let archive = archive_name(old_partition, &run.run_id)?;
        execute(&mut tx, &native.detach(shadow, new_partition), &[]).await?;
        execute(&mut tx, &native.detach(target, old_partition), &[]).await?;
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
        execute(&mut tx, &native.attach(target, old_partition, bound), &[]).await?;
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
        let record = ArchiveRecord {
            published_checksum: Some(published.to_string()),
            ..archive_record(
                &run.run_id,
                &archive,
                old_partition,
                ARCHIVE_PARTITION,
                &old,
                Duration::days(publish.archive_retention_days as i64),
            )
        };
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
pub(super) async fn rollback_partitions(
    request: RollbackRequest<'_>,
) -> Result<RollbackReport, BackfillError> {
    let RollbackRequest {
        store,
        run,
        spec,
        target,
        archives,
        ..
    } = request;
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let native = native(engine)?;
    let mut tx = warehouse.begin().await?;
    // The views over the parent, then the parent: the order its readers take them.
    engine
        .lock_for_swap(&mut tx, target, spec.publish.lock_wait)
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
        let bound = native
            .bound_of(&mut tx, &partition, target)
            .await?
            .ok_or_else(|| {
                BackfillError::Invalid(format!("{partition} is no longer a partition of {target}"))
            })?;
        let undone = undone_name(&partition, &run.run_id)?;
        let current = request
            .unchanged_since_publish(
                &mut tx,
                archive,
                &partition,
                &partition.to_string(),
                &undone,
            )
            .await?;
        execute(&mut tx, &native.detach(target, &partition), &[]).await?;
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
        execute(&mut tx, &native.attach(target, &partition, &bound), &[]).await?;
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
