//! Publishing and taking back: the atomic `swap_table` (archive the current table, rename the
//! shadow in, carry dependent views, grants and the table comment over), `swap_window` (the
//! table stays; its window rows are archived and merged from the shadow: only changed rows
//! are written), `rollback` (put the archive back and prove its checksum), and `gc` (drop
//! archives past retention).
//!
//! One module per publish mode (`swap_table`, `swap_window`, `swap_partitions`), each with its
//! rollback; `gc` for archives. This module holds what they share: archive names and
//! records, the guards, the rollback's dispatch by archive kind, and the recovery of a swap
//! that happened but was not recorded (engines whose DDL commits on its own).

use backfill_common::BackfillError;
use backfill_common::control::{
    ArchiveMark, ArchiveRecord, ControlStore, OPEN_STATES, RunRecord, RunState, now_text,
};
use backfill_common::engine::{Engine, SwapGuard, TableSwap, WriterLock};
use backfill_common::ident::TableName;
use backfill_common::warehouse::{Checksum, RowHash, Session, execute, fetch_one, get};
use chrono::{Duration, Utc};

use backfill_common::engine::quote_catalog_name;

mod gc;
mod swap_partitions;
mod swap_table;
mod swap_window;

pub use gc::{GcReport, drop_shadow, gc};
use swap_partitions::SwapPartitions;
use swap_table::SwapTable;
use swap_window::SwapWindow;
pub use swap_window::WindowWrites;

use backfill_common::plan::Partition;
use backfill_common::spec::{PublishMode, Spec};

/// What a publish mode is given: the audited run, its shadow, the window, and what the
/// target held when the shadow was built and when the audits compared against it.
pub struct PublishRequest<'a> {
    pub store: &'a ControlStore,
    pub spec: &'a Spec,
    pub run: &'a RunRecord,
    pub target: &'a TableName,
    pub shadow: &'a TableName,
    pub partitions: &'a [Partition],
    /// The checksum of the target's rows outside the window recorded at shadow build.
    pub outside_checksum: Option<String>,
    /// A manual approval's view of the window, to hold at publish.
    pub window_guard: Option<WindowGuard>,
}

impl PublishRequest<'_> {
    /// The window's rows of the target (alias `t`) as a condition with its binds.
    fn window(&self) -> (String, Vec<backfill_common::warehouse::Bind>) {
        crate::window::spec_window(self.store.engine(), self.spec, self.partitions)
    }

    /// The guard on the rows outside the window, where the shadow build recorded them.
    fn outside_guard(&self) -> Option<OutsideGuard> {
        self.outside_checksum.clone().map(|expected| {
            let (filter, binds) =
                crate::shadow::outside_window(self.store.engine(), self.spec, self.partitions);
            OutsideGuard {
                filter,
                binds,
                expected,
            }
        })
    }
}

/// What a publish did: the archive's record (several archives' names joined, for
/// `swap_partitions`) and, for a window merge, the rows it wrote.
pub struct Published {
    pub archive: ArchiveRecord,
    pub writes: Option<WindowWrites>,
}

/// One publish mode: how the audited shadow replaces what the target held, and how that is
/// taken back. Each mode is a module of its own (`swap_table`, `swap_window`,
/// `swap_partitions`); `strategy` and `rollback` choose one.
/// What building a shadow is given.
#[derive(Clone, Copy)]
pub struct ShadowRequest<'a> {
    pub warehouse: &'a backfill_common::warehouse::Warehouse,
    pub spec: &'a Spec,
    pub target: &'a TableName,
    pub shadow: &'a TableName,
    pub partitions: &'a [Partition],
}

impl ShadowRequest<'_> {
    /// A shadow with the target's columns, keys and indexes (`shadow::create_shadow_table`);
    /// `copies`: the rows outside the window will be copied into it.
    async fn create_table(
        &self,
        conn: &mut dyn Session,
        copies: bool,
    ) -> Result<crate::shadow::ShadowTable, BackfillError> {
        crate::shadow::create_shadow_table(
            self.warehouse,
            conn,
            self.spec,
            self.target,
            self.shadow,
            copies,
        )
        .await
    }

    /// `shadow::fill_shadow` of what `create_table` made.
    async fn fill_table(
        &self,
        conn: &mut dyn Session,
        table: crate::shadow::ShadowTable,
    ) -> Result<crate::shadow::BuiltShadow, BackfillError> {
        crate::shadow::fill_shadow(
            self.warehouse,
            conn,
            self.spec,
            self.target,
            self.shadow,
            self.partitions,
            table,
        )
        .await
    }
}

#[async_trait::async_trait]
pub trait PublishStrategy: Send + Sync {
    /// The shadow's DDL. Where DDL commits on its own this runs before the run's first
    /// transaction, on a session of its own; `fill_shadow` runs inside it.
    async fn create_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
    ) -> Result<crate::shadow::ShadowTable, BackfillError>;
    /// Copies into the shadow what this mode keeps beside the window (and returns its
    /// checksum, for the publish guard), in the run's first transaction.
    async fn fill_shadow(
        &self,
        request: ShadowRequest<'_>,
        conn: &mut dyn Session,
        table: crate::shadow::ShadowTable,
    ) -> Result<crate::shadow::BuiltShadow, BackfillError>;
    /// Publishes the shadow and records the archive and the run's new state.
    async fn publish(&self, request: PublishRequest<'_>) -> Result<Published, BackfillError>;
    /// Puts the archives of a published run back, its checksums verified.
    async fn rollback(&self, request: RollbackRequest<'_>)
    -> Result<RollbackReport, BackfillError>;
}

/// What a rollback works from: the published run, its frozen spec, its archives.
#[derive(Clone, Copy)]
pub struct RollbackRequest<'a> {
    pub store: &'a ControlStore,
    pub run: &'a RunRecord,
    /// The spec the run published with (as frozen in the control store).
    pub spec: &'a Spec,
    pub target: &'a TableName,
    pub archives: &'a [ArchiveRecord],
    /// Roll back even though the rows to be replaced changed since publish (they are kept in
    /// the `undone` table either way).
    pub discard_writes_since_publish: bool,
}

impl RollbackRequest<'_> {
    /// The checksum of `table`, which holds `what` the rollback is about to replace (hashed
    /// as the publish recorded it for `archive`); refuses unless it is what the publish put
    /// there, or the caller said to discard writes since publish (kept in `undone`).
    async fn unchanged_since_publish(
        &self,
        conn: &mut dyn Session,
        archive: &ArchiveRecord,
        table: &TableName,
        what: &str,
        undone: &TableName,
    ) -> Result<Checksum, BackfillError> {
        let warehouse = &self.store.warehouse;
        let Some(published) = &archive.published_checksum else {
            return warehouse.checksum(conn, table, None, &[]).await;
        };
        let now = warehouse
            .checksum_like(conn, table, None, &[], published)
            .await?;
        if *published != now.to_string() {
            if !self.discard_writes_since_publish {
                return Err(writes_since_publish(
                    self.run, what, published, &now, undone,
                ));
            }
            tracing::warn!(run_id = %self.run.run_id, %what, %published, now = %now, kept_as = %undone,
                "rolling back over writes made since publish, as asked; they are kept in the undone table");
        }
        Ok(now)
    }
}

/// How `rollback_with` goes about it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RollbackOptions {
    pub discard_writes_since_publish: bool,
}

/// The strategy of a (resolved) publish mode; `auto` is resolved at plan time and publishes
/// as `swap_table` only if a run recorded no mode.
pub fn strategy(mode: PublishMode) -> &'static dyn PublishStrategy {
    match mode {
        PublishMode::SwapWindow => &SwapWindow,
        PublishMode::SwapPartitions => &SwapPartitions,
        PublishMode::SwapTable | PublishMode::Auto => &SwapTable,
    }
}

/// The strategy that took the archives of this kind.
fn strategy_for_archive(kind: &str) -> &'static dyn PublishStrategy {
    match kind {
        ARCHIVE_WINDOW => &SwapWindow,
        ARCHIVE_PARTITION => &SwapPartitions,
        _ => &SwapTable,
    }
}

/// The one archive of a run published by table or window (refused if gc dropped it), its
/// table, and where a rollback keeps what it replaces.
fn single_archive(
    run: &RunRecord,
    target: &TableName,
    archives: &[ArchiveRecord],
) -> Result<(ArchiveRecord, TableName, TableName), BackfillError> {
    let archive = archives.first().cloned().ok_or_else(|| {
        BackfillError::Invalid(format!("run {} has no archive record", run.run_id))
    })?;
    if archive.dropped_at.is_some() {
        return Err(BackfillError::Conflict(format!(
            "the archive {} of run {} was dropped by gc on {}; it cannot be restored",
            archive.archive_table,
            run.run_id,
            archive.dropped_at.clone().unwrap_or_default()
        )));
    }
    let archive_table = TableName::parse(&archive.archive_table)
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let undone = undone_name(target, &run.run_id)?;
    Ok((archive, archive_table, undone))
}

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

/// Whether a swap of `replacement` into `current`'s place, with `current` stepping aside to
/// `aside`, already happened: where DDL commits on its own, a process can stop between the
/// swap and its record. The swap is atomic, so `replacement` gone and `aside` present means
/// it did; the table at `aside` was not written since.
async fn swapped_unrecorded(
    warehouse: &backfill_common::warehouse::Warehouse,
    aside: &TableName,
    replacement: &TableName,
) -> Result<Option<Checksum>, BackfillError> {
    if !renamed_unrecorded(warehouse, aside, replacement).await? {
        return Ok(None);
    }
    tracing::warn!(%aside, %replacement, "the tables were swapped by an attempt that stopped before recording it; recording it now");
    let mut conn = warehouse.acquire().await?;
    Ok(Some(warehouse.checksum(&mut conn, aside, None, &[]).await?))
}

/// The catalog's side of `swapped_unrecorded`: where DDL commits on its own, `replacement`
/// gone and `aside` present (elsewhere the swap and its record are one transaction).
async fn renamed_unrecorded(
    warehouse: &backfill_common::warehouse::Warehouse,
    aside: &TableName,
    replacement: &TableName,
) -> Result<bool, BackfillError> {
    if warehouse.engine().capabilities().transactional_ddl {
        return Ok(false);
    }
    let mut conn = warehouse.acquire().await?;
    Ok(!warehouse.table_exists(&mut conn, replacement).await?
        && warehouse.table_exists(&mut conn, aside).await?)
}

/// Whether `run`'s `swap_table` publish renamed the tables and stopped before recording it
/// (possible only where DDL commits on its own): its shadow is gone and its archive exists.
pub async fn swap_done_unrecorded(
    warehouse: &backfill_common::warehouse::Warehouse,
    run: &RunRecord,
) -> Result<bool, BackfillError> {
    if !run.state.is_open() {
        return Ok(false);
    }
    let target =
        TableName::parse(&run.target).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let shadow =
        TableName::parse(&run.shadow_table).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let archive = archive_name(&target, &run.run_id)?;
    renamed_unrecorded(warehouse, &archive, &shadow).await
}

/// States a run publishes from: audited, or audited and approved.
const PUBLISHABLE: [RunState; 3] = [
    RunState::Auditing,
    RunState::AuditFailed,
    RunState::AwaitingApproval,
];

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
        published_checksum: None,
    }
}

impl PublishRequest<'_> {
    /// The checksum of what this publish puts in place of the archived rows: the window's
    /// partitions as the workers checksummed them when they wrote them, plus, where the
    /// shadow holds the rows outside the window too, their checksum at shadow build (the
    /// publish guard proves the target still holds them). Read from the shadow (before any
    /// lock on the target: nothing writes an audited shadow) where those cannot be added up
    /// (new columns, a run recorded before partitions had checksums).
    async fn published_checksum(&self, with_outside: bool) -> Result<Checksum, BackfillError> {
        // The shadow's rows beside the window hash like the target's only without new columns.
        let outside = match (with_outside, self.spec.target.add_columns.is_empty()) {
            (false, _) => Some(None),
            (true, true) => Some(Some(
                self.outside_checksum.as_deref().and_then(Checksum::parse),
            )),
            (true, false) => None,
        };
        if let Some(outside) = outside {
            let records = self.store.partitions(&self.run.run_id).await?;
            let partitions = self.partitions.iter().map(|partition| {
                records
                    .iter()
                    .find(|r| r.partition_key == partition.key)
                    .and_then(|r| r.checksum.as_deref())
                    .and_then(Checksum::parse)
            });
            if let Some(total) =
                added_up(self.store.engine(), outside.into_iter().chain(partitions))
            {
                return Ok(total);
            }
        }
        let mut conn = self.store.warehouse.acquire().await?;
        self.store
            .warehouse
            .checksum(&mut conn, self.shadow, None, &[])
            .await
    }
}

/// The checksum of the rows of several checksums together (disjoint sets hashed alike, such
/// as a run's partitions); None when one is missing, none is given, or they cannot be added.
pub(crate) fn added_up(
    engine: &dyn Engine,
    checksums: impl IntoIterator<Item = Option<Checksum>>,
) -> Option<Checksum> {
    let mut total: Option<Checksum> = None;
    for checksum in checksums {
        let checksum = checksum?;
        total = Some(match total {
            None => checksum,
            Some(sum) => engine.add_checksums(&sum, &checksum)?,
        });
    }
    total
}

/// What a rollback does when the rows it is about to replace are not what the publish put
/// there: someone wrote to the target since.
fn writes_since_publish(
    run: &RunRecord,
    what: &str,
    published: &str,
    now: &Checksum,
    undone: &TableName,
) -> BackfillError {
    let rows_then = Checksum::parse(published).map_or(-1, |c| c.rows);
    let change = match now.rows - rows_then {
        0 => format!("{} rows then and now, some of them changed", now.rows),
        more if more > 0 => format!("{rows_then} rows then, {} now ({more} more)", now.rows),
        fewer => format!("{rows_then} rows then, {} now ({} fewer)", now.rows, -fewer),
    };
    BackfillError::Conflict(format!(
        "{what} changed since run {run} published it ({change}; checksum {published} then, {now} now): \
         rolling back would discard those writes. Nothing was changed. Stop the writers and roll back, then write again \
         what they wrote; or roll back anyway with `backfill rollback {run} --discard-writes-since-publish`, which keeps \
         {what} as it is now, those writes included, as {undone}",
        run = run.run_id
    ))
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

/// What a table or window rollback put back, for its record.
struct Restored<'a> {
    archive: &'a ArchiveRecord,
    archive_table: &'a TableName,
    /// Where what the archive replaced is kept.
    undone: &'a TableName,
    target: &'a TableName,
    /// The checksum of what the archive replaced.
    current: &'a Checksum,
    /// The checksum the restored rows were verified with.
    restored: String,
}

/// The end of a table or window rollback, in its transaction: the archive marked restored,
/// what it replaced recorded (kept as long as the archive was to be kept), the run rolled
/// back; then the commit.
async fn commit_rollback(
    store: &ControlStore,
    mut tx: backfill_common::warehouse::Tx<'_>,
    run: &RunRecord,
    restored: Restored<'_>,
) -> Result<RollbackReport, BackfillError> {
    record_restore(
        store,
        &mut tx,
        &run.run_id,
        restored.archive,
        restored.undone,
        restored.target,
        restored.current,
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
        target: restored.target.to_string(),
        restored_from: restored.archive_table.to_string(),
        kept_as: restored.undone.to_string(),
        checksum: restored.restored,
    })
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
    rollback_with(store, run_id, RollbackOptions::default()).await
}

/// `rollback`, with options (`--discard-writes-since-publish`).
pub async fn rollback_with(
    store: &ControlStore,
    run_id: &str,
    options: RollbackOptions,
) -> Result<RollbackReport, BackfillError> {
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
    let kind = match archives.first() {
        // swap_partitions archives one table per partition; the others one table.
        Some(first) if archives.iter().all(|a| a.kind == first.kind) => first.kind.clone(),
        Some(_) => {
            return Err(BackfillError::Invalid(format!(
                "run {run_id} has archives of several kinds; restore them by hand"
            )));
        }
        None => {
            return Err(BackfillError::Invalid(format!(
                "run {run_id} has no archive record"
            )));
        }
    };
    let spec = frozen_spec(store, &run).await?;
    strategy_for_archive(&kind)
        .rollback(RollbackRequest {
            store,
            run: &run,
            spec: &spec,
            target: &target,
            archives: &archives,
            discard_writes_since_publish: options.discard_writes_since_publish,
        })
        .await
}

/// The spec a run was frozen with, from the control store.
async fn frozen_spec(store: &ControlStore, run: &RunRecord) -> Result<Spec, BackfillError> {
    let text = store.spec_source(&run.spec_hash).await?.ok_or_else(|| {
        BackfillError::Invalid(format!(
            "the spec of run {} is missing from the control store",
            run.run_id
        ))
    })?;
    Spec::parse(&text).map_err(|e| {
        BackfillError::Invalid(format!(
            "the stored spec of run {} no longer parses: {e}",
            run.run_id
        ))
    })
}
