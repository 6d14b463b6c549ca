//! Archives past retention dropped (`gc`), and the shadow of an abandoned run.

use super::*;

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

pub(super) async fn drop_archive(
    store: &ControlStore,
    archive: &ArchiveRecord,
) -> Result<(), BackfillError> {
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
