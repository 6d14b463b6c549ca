//! The control store: the run's memory, kept in the warehouse itself so that a partition's
//! merge and its checkpoint commit in one transaction. Tables: runs, specs, partitions,
//! audits, archives, events, plus schema_migrations for versioned migrations.

use chrono::{SecondsFormat, Utc};
use serde::Serialize;

use crate::engine::{Engine, SqlType};
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};
use crate::plan::Partition;
use crate::warehouse::{
    Bind, Conn, Row, Session, Warehouse, execute, fetch_all, fetch_one, fetch_optional, get,
};

pub fn now_text() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Versioned migrations; each runs once, in order, inside one transaction where the engine's
/// DDL is transactional.
fn migrations(
    engine: &dyn Engine,
    t: &dyn Fn(&str) -> TableName,
) -> Vec<(i64, &'static str, Vec<String>)> {
    let bigint = engine.sql_type(SqlType::BigInt);
    let double = engine.sql_type(SqlType::Double);
    let serial = engine.sql_type(SqlType::SerialPrimaryKey);
    let text = engine.sql_type(SqlType::Text);
    let key = engine.sql_type(SqlType::KeyText);
    let runs = t("runs");
    let one_open_per_target = |states: &str| {
        engine.partial_unique_index(
            "runs_one_open_per_target",
            &runs,
            "target",
            &format!("state IN ({states})"),
        )
    };
    let mut v2 = one_open_per_target("'planned', 'running', 'failed', 'auditing', 'audit_failed'");
    v2.push(format!(
        "ALTER TABLE {} ADD COLUMN outside_checksum {text}",
        runs.quoted()
    ));
    let mut v3 = engine.drop_partial_unique_index("runs_one_open_per_target", &runs);
    v3.extend(one_open_per_target(
        "'planned', 'running', 'failed', 'auditing', 'audit_failed', 'awaiting_approval'",
    ));
    v3.push(format!(
        "ALTER TABLE {} ADD COLUMN publish_mode {text}",
        runs.quoted()
    ));
    v3.push(format!(
        "ALTER TABLE {} ADD COLUMN window_checksum {text}",
        runs.quoted()
    ));
    vec![
        (
            1,
            "runs, specs, partitions, audits, archives, events",
            vec![
                format!(
                    "CREATE TABLE {} (spec_hash {key} PRIMARY KEY, canonical {text} NOT NULL, source_text {text} NOT NULL, created_at {text} NOT NULL)",
                    t("specs").quoted()
                ),
                format!(
                    "CREATE TABLE {} (run_id {key} PRIMARY KEY, spec_hash {key} NOT NULL, spec_name {text} NOT NULL, target {key} NOT NULL, \
                 state {key} NOT NULL, tool_version {text} NOT NULL, owner {text} NOT NULL, shadow_table {text} NOT NULL, \
                 archive_table {text}, error {text}, created_at {text} NOT NULL, updated_at {text} NOT NULL, published_at {text})",
                    runs.quoted()
                ),
                format!(
                    "CREATE INDEX \"runs_target_state\" ON {} (target, state)",
                    runs.quoted()
                ),
                format!(
                    "CREATE TABLE {} (run_id {key} NOT NULL, partition_key {key} NOT NULL, range_start {text} NOT NULL, range_end {text} NOT NULL, \
                 state {text} NOT NULL, attempt {bigint} NOT NULL DEFAULT 0, fencing_token {bigint} NOT NULL DEFAULT 1, \
                 times_applied {bigint} NOT NULL DEFAULT 0, inserted {bigint}, updated {bigint}, deleted {bigint}, unchanged {bigint}, \
                 rows_after {bigint}, checksum {text}, seconds {double}, error {text}, started_at {text}, finished_at {text}, \
                 PRIMARY KEY (run_id, partition_key))",
                    t("partitions").quoted()
                ),
                format!(
                    "CREATE TABLE {} (run_id {key} NOT NULL, audit_name {key} NOT NULL, partition_key {key} NOT NULL, severity {text} NOT NULL, \
                 verdict {text} NOT NULL, observed {text} NOT NULL, allowed {text} NOT NULL, checked_at {text} NOT NULL, \
                 PRIMARY KEY (run_id, audit_name, partition_key))",
                    t("audits").quoted()
                ),
                format!(
                    "CREATE TABLE {} (archive_table {key} PRIMARY KEY, run_id {key} NOT NULL, source_table {text} NOT NULL, kind {text} NOT NULL, \
                 row_count {bigint} NOT NULL, checksum {text} NOT NULL, created_at {text} NOT NULL, expires_at {text} NOT NULL, \
                 restored_at {text}, dropped_at {text})",
                    t("archives").quoted()
                ),
                format!(
                    "CREATE TABLE {} (id {serial}, run_id {key} NOT NULL, partition_key {text}, kind {text} NOT NULL, detail {text}, at {text} NOT NULL)",
                    t("events").quoted()
                ),
            ],
        ),
        (
            2,
            "one open run per target; checksum of the rows outside the window at shadow build",
            v2,
        ),
        (
            3,
            "approval gate (awaiting_approval is open; window checksum) and frozen publish mode",
            v3,
        ),
        (
            4,
            "indexes of a swap_table shadow deferred until its partitions are written",
            vec![format!(
                "ALTER TABLE {} ADD COLUMN deferred_indexes {text}",
                runs.quoted()
            )],
        ),
        (
            5,
            "checksum of what a publish put in an archive's place, so a rollback sees writes since",
            vec![format!(
                "ALTER TABLE {} ADD COLUMN published_checksum {text}",
                t("archives").quoted()
            )],
        ),
    ]
}

/// States in which a run still owns its target (see `RunState::is_open`).
pub const OPEN_STATES: [RunState; 6] = [
    RunState::Planned,
    RunState::Running,
    RunState::Failed,
    RunState::Auditing,
    RunState::AuditFailed,
    RunState::AwaitingApproval,
];

/// Facts a run keeps beside its state, one column each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunNote {
    /// Checksum of the target's rows outside the window when the shadow was built
    /// (`swap_table` refuses to publish if they changed since).
    OutsideChecksum,
    /// The publish mode the run was planned with (`auto` resolved), frozen for resumes.
    PublishMode,
    /// Checksum of the target's window rows the audits compared against, for an approval
    /// gate: `backfill publish` refuses if they changed since.
    WindowChecksum,
    /// The shadow's index and key-constraint definitions (JSON), dropped while partitions
    /// are written and built again after the last one.
    DeferredIndexes,
}

impl RunNote {
    fn column(self) -> &'static str {
        match self {
            RunNote::OutsideChecksum => "outside_checksum",
            RunNote::PublishMode => "publish_mode",
            RunNote::WindowChecksum => "window_checksum",
            RunNote::DeferredIndexes => "deferred_indexes",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Run row and partitions recorded, shadow being built.
    Planned,
    /// Shadow built; partitions being written.
    Running,
    /// A partition failed permanently; running the same spec again retries it.
    Failed,
    /// All partitions checkpointed; audits running.
    Auditing,
    /// An error-severity audit failed: nothing published, shadow kept for inspection.
    AuditFailed,
    /// Audits passed; the spec asks for a manual approval (`backfill publish <run>`).
    AwaitingApproval,
    Published,
    RolledBack,
    /// Replaced by a run of another spec; its shadow may be dropped.
    Abandoned,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Planned => "planned",
            RunState::Running => "running",
            RunState::Failed => "failed",
            RunState::Auditing => "auditing",
            RunState::AuditFailed => "audit_failed",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Published => "published",
            RunState::RolledBack => "rolled_back",
            RunState::Abandoned => "abandoned",
        }
    }

    pub fn parse(value: &str) -> Option<RunState> {
        [
            RunState::Planned,
            RunState::Running,
            RunState::Failed,
            RunState::Auditing,
            RunState::AuditFailed,
            RunState::AwaitingApproval,
            RunState::Published,
            RunState::RolledBack,
            RunState::Abandoned,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }

    /// States in which the run still owns its target: a run of another spec must not start.
    pub fn is_open(self) -> bool {
        OPEN_STATES.contains(&self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    Pending,
    Running,
    Retrying,
    Done,
    Failed,
}

impl PartitionState {
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Pending => "pending",
            PartitionState::Running => "running",
            PartitionState::Retrying => "retrying",
            PartitionState::Done => "done",
            PartitionState::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<PartitionState> {
        [
            PartitionState::Pending,
            PartitionState::Running,
            PartitionState::Retrying,
            PartitionState::Done,
            PartitionState::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub spec_hash: String,
    pub spec_name: String,
    pub target: String,
    pub state: RunState,
    pub tool_version: String,
    pub owner: String,
    pub shadow_table: String,
    pub archive_table: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub published_at: Option<String>,
}

const RUN_COLUMNS: &str = "run_id, spec_hash, spec_name, target, state, tool_version, owner, shadow_table, archive_table, error, created_at, updated_at, published_at";

fn run_from_row(row: &Row) -> Result<RunRecord, BackfillError> {
    let state: String = get(row, 4)?;
    Ok(RunRecord {
        run_id: get(row, 0)?,
        spec_hash: get(row, 1)?,
        spec_name: get(row, 2)?,
        target: get(row, 3)?,
        state: RunState::parse(&state).ok_or_else(|| {
            BackfillError::Invalid(format!("unknown run state `{state}` in the control store"))
        })?,
        tool_version: get(row, 5)?,
        owner: get(row, 6)?,
        shadow_table: get(row, 7)?,
        archive_table: get(row, 8)?,
        error: get(row, 9)?,
        created_at: get(row, 10)?,
        updated_at: get(row, 11)?,
        published_at: get(row, 12)?,
    })
}

/// What a partition's checkpoint records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MergeCounts {
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub unchanged: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionRecord {
    pub partition_key: String,
    pub range_start: String,
    pub range_end: String,
    pub state: PartitionState,
    pub attempt: i64,
    pub fencing_token: i64,
    pub times_applied: i64,
    pub counts: Option<MergeCounts>,
    pub rows_after: Option<i64>,
    pub checksum: Option<String>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub audit_name: String,
    pub partition_key: String,
    pub severity: String,
    pub verdict: String,
    pub observed: String,
    pub allowed: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveRecord {
    pub archive_table: String,
    pub run_id: String,
    pub source_table: String,
    pub kind: String,
    pub row_count: i64,
    pub checksum: String,
    pub created_at: String,
    pub expires_at: String,
    pub restored_at: Option<String>,
    pub dropped_at: Option<String>,
    /// The checksum of what the publish put in the archive's place (the table, the window,
    /// the partition) when it committed: a rollback that finds another has seen writes made
    /// since. None for archives recorded before this was kept.
    pub published_checksum: Option<String>,
}

/// A unit of work as the queue carries it: which partition, which attempt, which token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PartitionTask {
    pub run_id: String,
    pub spec_hash: String,
    pub partition_key: String,
    pub range_start: String,
    pub range_end: String,
    pub attempt: i64,
    pub fencing_token: i64,
}

#[derive(Clone, Debug)]
pub struct ControlStore {
    pub warehouse: Warehouse,
    pub schema: Ident,
}

impl ControlStore {
    pub fn new(warehouse: Warehouse, schema: Ident) -> ControlStore {
        ControlStore { warehouse, schema }
    }

    pub fn engine(&self) -> &'static dyn Engine {
        self.warehouse.engine()
    }

    /// Quoted name of a control table.
    pub fn table(&self, name: &str) -> String {
        self.table_name(name).quoted()
    }

    pub fn table_name(&self, name: &str) -> TableName {
        self.engine().control_table(&self.schema, name)
    }

    /// Brings the control store to the latest version. Safe to call from many processes at
    /// once: each engine serialises migrators (PostgreSQL with an advisory lock, SQLite with
    /// its write lock, MySQL with a named lock).
    ///
    /// A migrator that loses a race it cannot wait out (SQLite answers "database is locked" at
    /// once to a reading transaction that would deadlock with another writer) tries again.
    pub async fn migrate(&self) -> Result<(), BackfillError> {
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let mut conn = self.warehouse.acquire().await?;
            let result = self.migrate_on(&mut conn).await;
            if result.is_err() {
                // A lock that outlives transactions must not go back to the pool with the
                // session.
                conn.close_on_drop();
            }
            match result {
                Err(error) if error.is_transient() && attempt < 10 => {
                    drop(conn);
                    tracing::info!(attempt, %error, "control-store migration raced another migrator; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn migrate_on(&self, conn: &mut Conn) -> Result<(), BackfillError> {
        let engine = self.engine();
        let mut tx = conn.begin().await?;
        let migrations_table = self.table("schema_migrations");
        engine.lock_control_store(&mut tx, &self.schema).await?;
        execute(
            &mut tx,
            &format!(
                "CREATE TABLE IF NOT EXISTS {migrations_table} (version {} PRIMARY KEY, description {} NOT NULL, applied_at {} NOT NULL)",
                engine.sql_type(SqlType::BigInt),
                engine.sql_type(SqlType::Text),
                engine.sql_type(SqlType::Text)
            ),
            &[],
        )
        .await?;
        let row = fetch_one(
            &mut tx,
            &format!(
                "SELECT {} FROM {migrations_table}",
                engine.as_bigint("coalesce(max(version), 0)")
            ),
            &[],
        )
        .await?;
        let current: i64 = get(&row, 0)?;
        let t = |name: &str| self.table_name(name);
        let migrations = migrations(engine, &t);
        let known = migrations.last().map_or(0, |(version, _, _)| *version);
        if current > known {
            // An older binary would misread what a newer one recorded (e.g. a run whose
            // shadow's indexes are deferred) and could publish it wrong.
            return Err(BackfillError::Invalid(format!(
                "the control store {} was migrated by a newer backfill (version {current}; this binary knows up to {known}): \
                 upgrade this binary rather than run an older one against it",
                self.schema
            )));
        }
        for (version, description, statements) in migrations {
            if version <= current {
                continue;
            }
            for statement in statements {
                execute(&mut tx, &statement, &[]).await.map_err(|e| {
                    e.context(format!("applying control-store migration {version}"))
                })?;
            }
            execute(
                &mut tx,
                &format!("INSERT INTO {migrations_table} (version, description, applied_at) VALUES ($1, $2, $3)"),
                &[version.into(), description.into(), now_text().into()],
            )
            .await?;
        }
        tx.commit().await?;
        engine.unlock_control_store(conn).await
    }

    pub async fn find_run(&self, run_id: &str) -> Result<Option<RunRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let row = fetch_optional(
            &mut conn,
            &format!(
                "SELECT {RUN_COLUMNS} FROM {} WHERE run_id = $1",
                self.table("runs")
            ),
            &[run_id.into()],
        )
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    /// Runs on a target, newest first.
    pub async fn runs_for_target(&self, target: &str) -> Result<Vec<RunRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!("SELECT {RUN_COLUMNS} FROM {} WHERE target = $1 ORDER BY created_at DESC, run_id DESC", self.table("runs")),
            &[target.into()],
        )
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    pub async fn all_runs(&self) -> Result<Vec<RunRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!(
                "SELECT {RUN_COLUMNS} FROM {} ORDER BY created_at DESC, run_id DESC",
                self.table("runs")
            ),
            &[],
        )
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// Stores a spec's text under its hash, once.
    async fn insert_spec(
        &self,
        conn: &mut dyn Session,
        spec_hash: &str,
        canonical_spec: &str,
        source_text: &str,
    ) -> Result<(), BackfillError> {
        let specs = self.table("specs");
        let exists = fetch_optional(
            conn,
            &format!("SELECT spec_hash FROM {specs} WHERE spec_hash = $1"),
            &[spec_hash.into()],
        )
        .await?;
        if exists.is_none() {
            execute(
                conn,
                &format!("INSERT INTO {specs} (spec_hash, canonical, source_text, created_at) VALUES ($1, $2, $3, $4)"),
                &[spec_hash.into(), canonical_spec.into(), source_text.into(), now_text().into()],
            )
            .await?;
        }
        Ok(())
    }

    /// Pins an open run to an amended spec (the same identity, other settings), if it is still
    /// pinned to `from_hash`, and records the change as a `spec_amended` event whose detail
    /// starts with `from <old hash> to <new hash>`. An audited run goes back to auditing, so
    /// that nothing is published without the amended audits.
    pub async fn amend_run_spec(
        &self,
        run: &RunRecord,
        to_hash: &str,
        spec_name: &str,
        canonical_spec: &str,
        source_text: &str,
        changes: &[String],
    ) -> Result<RunRecord, BackfillError> {
        let mut tx = self.warehouse.begin().await?;
        self.insert_spec(&mut tx, to_hash, canonical_spec, source_text)
            .await?;
        let state = if run.state == RunState::AwaitingApproval {
            RunState::Auditing
        } else {
            run.state
        };
        let updated = execute(
            &mut tx,
            &format!(
                "UPDATE {} SET spec_hash = $2, spec_name = $3, state = $4, updated_at = $5 \
                 WHERE run_id = $1 AND spec_hash = $6 AND state = $7",
                self.table("runs")
            ),
            &[
                run.run_id.as_str().into(),
                to_hash.into(),
                spec_name.into(),
                state.as_str().into(),
                now_text().into(),
                run.spec_hash.as_str().into(),
                run.state.as_str().into(),
            ],
        )
        .await?;
        if updated != 1 {
            return Err(BackfillError::Conflict(format!(
                "run {} changed while it was being amended (another backfill process is driving it); nothing was amended",
                run.run_id
            )));
        }
        self.record_event(
            &mut tx,
            &run.run_id,
            None,
            "spec_amended",
            &format!(
                "from {} to {to_hash}: {}",
                run.spec_hash,
                changes.join("; ")
            ),
        )
        .await?;
        tx.commit().await?;
        let mut amended = run.clone();
        amended.spec_hash = to_hash.to_string();
        amended.spec_name = spec_name.to_string();
        amended.state = state;
        Ok(amended)
    }

    /// Whether `spec_hash` is one the run was pinned to before an amendment.
    pub async fn spec_amended_from(
        &self,
        run_id: &str,
        spec_hash: &str,
    ) -> Result<bool, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!(
                "SELECT detail FROM {} WHERE run_id = $1 AND kind = 'spec_amended'",
                self.table("events")
            ),
            &[run_id.into()],
        )
        .await?;
        let prefix = format!("from {spec_hash} ");
        for row in &rows {
            let detail: String = get(row, 0)?;
            if detail.starts_with(&prefix) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records a new run, its frozen spec and all its partitions (state pending, token 1).
    /// The caller supplies the transaction so that the shadow can be built in the same one.
    pub async fn insert_run(
        &self,
        conn: &mut dyn Session,
        run: &RunRecord,
        canonical_spec: &str,
        source_text: &str,
        partitions: &[Partition],
        grain: crate::plan::Grain,
    ) -> Result<(), BackfillError> {
        self.insert_spec(conn, &run.spec_hash, canonical_spec, source_text)
            .await?;
        execute(
            conn,
            &format!(
                "INSERT INTO {} ({RUN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                self.table("runs")
            ),
            &[
                run.run_id.as_str().into(),
                run.spec_hash.as_str().into(),
                run.spec_name.as_str().into(),
                run.target.as_str().into(),
                run.state.as_str().into(),
                run.tool_version.as_str().into(),
                run.owner.as_str().into(),
                run.shadow_table.as_str().into(),
                run.archive_table.clone().into(),
                run.error.clone().into(),
                run.created_at.as_str().into(),
                run.updated_at.as_str().into(),
                run.published_at.clone().into(),
            ],
        )
        .await?;
        // Multi-row inserts keep planning 10,000 partitions to a handful of round trips.
        const CHUNK: usize = 500;
        let partitions_table = self.table("partitions");
        for chunk in partitions.chunks(CHUNK) {
            let mut sql = format!(
                "INSERT INTO {partitions_table} (run_id, partition_key, range_start, range_end, state) VALUES "
            );
            let mut binds: Vec<Bind> = vec![run.run_id.as_str().into()];
            for (i, p) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let n = binds.len();
                sql.push_str(&format!(
                    "($1, ${}, ${}, ${}, 'pending')",
                    n + 1,
                    n + 2,
                    n + 3
                ));
                binds.push(p.key.as_str().into());
                binds.push(crate::plan::bound_value(grain, p.start).into());
                binds.push(crate::plan::bound_value(grain, p.end).into());
            }
            execute(conn, &sql, &binds).await?;
        }
        self.record_event(
            conn,
            &run.run_id,
            None,
            "run_planned",
            &format!("{} partitions, spec {}", partitions.len(), run.spec_hash),
        )
        .await
    }

    /// Moves a run to `to`, but only from one of the states in `from`: a compare-and-set, so
    /// a second process driving the same run (a stale coordinator waking from a backoff, an
    /// `abandon` racing a `run`) cannot overwrite a newer state. Refused transitions say
    /// what the state is now.
    pub async fn set_run_state(
        &self,
        conn: &mut dyn Session,
        run_id: &str,
        from: &[RunState],
        to: RunState,
        error: Option<&str>,
    ) -> Result<(), BackfillError> {
        self.change_run_state(conn, run_id, None, from, to, error)
            .await
    }

    /// [`Self::set_run_state`], only while the run is still pinned to `run.spec_hash`: a
    /// process driving a run under a spec the run was since amended from stops at its next
    /// state change instead of failing, auditing or publishing it under the old settings.
    pub async fn set_pinned_run_state(
        &self,
        conn: &mut dyn Session,
        run: &RunRecord,
        from: &[RunState],
        to: RunState,
        error: Option<&str>,
    ) -> Result<(), BackfillError> {
        self.change_run_state(conn, &run.run_id, Some(&run.spec_hash), from, to, error)
            .await
    }

    /// [`Self::set_pinned_run_state`] in its own transaction.
    pub async fn set_pinned_run_state_now(
        &self,
        run: &RunRecord,
        from: &[RunState],
        to: RunState,
        error: Option<&str>,
    ) -> Result<(), BackfillError> {
        let mut tx = self.warehouse.begin().await?;
        self.set_pinned_run_state(&mut tx, run, from, to, error)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn change_run_state(
        &self,
        conn: &mut dyn Session,
        run_id: &str,
        spec_hash: Option<&str>,
        from: &[RunState],
        to: RunState,
        error: Option<&str>,
    ) -> Result<(), BackfillError> {
        let allowed = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let updated = execute(
            conn,
            &format!(
                "UPDATE {} SET state = $2, error = $3, updated_at = $4 WHERE run_id = $1 AND state IN ({allowed}) \
                 AND ($5 IS NULL OR spec_hash = $5)",
                self.table("runs")
            ),
            &[
                run_id.into(),
                to.as_str().into(),
                error.map(str::to_string).into(),
                now_text().into(),
                spec_hash.map(str::to_string).into(),
            ],
        )
        .await?;
        if updated != 1 {
            let row = fetch_optional(
                conn,
                &format!(
                    "SELECT state, spec_hash FROM {} WHERE run_id = $1",
                    self.table("runs")
                ),
                &[run_id.into()],
            )
            .await?;
            let now: Option<String> = row.as_ref().map(|r| get(r, 0)).transpose()?;
            let pinned: Option<String> = row.as_ref().map(|r| get(r, 1)).transpose()?;
            if let (Some(expected), Some(pinned)) = (spec_hash, &pinned)
                && expected != pinned
            {
                return Err(BackfillError::Conflict(format!(
                    "run {run_id} was amended to spec {} while this process drove it under spec {}: \
                     this process stops here and leaves the run to the amended spec",
                    &pinned[..pinned.len().min(12)],
                    &expected[..expected.len().min(12)]
                )));
            }
            return Err(BackfillError::Conflict(format!(
                "run {run_id} is {} now, not {}: another backfill process is driving it, so this one stops here",
                now.as_deref().unwrap_or("gone"),
                from.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        self.record_event(
            conn,
            run_id,
            None,
            &format!("run_{}", to.as_str()),
            error.unwrap_or(""),
        )
        .await
    }

    pub async fn set_run_state_now(
        &self,
        run_id: &str,
        from: &[RunState],
        to: RunState,
        error: Option<&str>,
    ) -> Result<(), BackfillError> {
        let mut tx = self.warehouse.begin().await?;
        self.set_run_state(&mut tx, run_id, from, to, error).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn record_event(
        &self,
        conn: &mut dyn Session,
        run_id: &str,
        partition: Option<&str>,
        kind: &str,
        detail: &str,
    ) -> Result<(), BackfillError> {
        execute(
            conn,
            &format!("INSERT INTO {} (run_id, partition_key, kind, detail, at) VALUES ($1, $2, $3, $4, $5)", self.table("events")),
            &[run_id.into(), partition.map(str::to_string).into(), kind.into(), detail.into(), now_text().into()],
        )
        .await?;
        // The partition checkpoint's line is written by the worker once it committed.
        if kind != "partition_done" {
            log_state_change(run_id, partition, kind, detail);
        }
        Ok(())
    }

    /// Issues every unfinished partition again with a new fencing token, so any attempt still
    /// in flight from an earlier process can no longer checkpoint, and returns their tasks.
    pub async fn reissue_unfinished(
        &self,
        run: &RunRecord,
    ) -> Result<Vec<PartitionTask>, BackfillError> {
        let mut tx = self.warehouse.begin().await?;
        let partitions = self.table("partitions");
        // A partition row stays locked while a statement of a killed process still runs:
        // give up quickly (transient) rather than hang silently; the caller retries.
        self.engine()
            .set_lock_timeout(&mut tx, std::time::Duration::from_secs(5))
            .await?;
        execute(
            &mut tx,
            &format!("UPDATE {partitions} SET fencing_token = fencing_token + 1, state = 'pending', error = NULL WHERE run_id = $1 AND state <> 'done'"),
            &[run.run_id.as_str().into()],
        )
        .await?;
        let rows = fetch_all(
            &mut tx,
            &format!("SELECT partition_key, range_start, range_end, attempt, fencing_token FROM {partitions} WHERE run_id = $1 AND state <> 'done' ORDER BY partition_key"),
            &[run.run_id.as_str().into()],
        )
        .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                Ok(PartitionTask {
                    run_id: run.run_id.clone(),
                    spec_hash: run.spec_hash.clone(),
                    partition_key: get(row, 0)?,
                    range_start: get(row, 1)?,
                    range_end: get(row, 2)?,
                    attempt: get::<i64>(row, 3)? + 1,
                    fencing_token: get(row, 4)?,
                })
            })
            .collect()
    }

    /// Every partition of an audit-failed run is to be applied again (the source was fixed):
    /// all back to pending with new fencing tokens (a re-application merges, writing only
    /// rows that changed and deleting vanished keys), the run back to running. Conditional on
    /// the run still being audit-failed under its spec.
    pub async fn reopen_audit_failed(&self, run: &RunRecord) -> Result<RunRecord, BackfillError> {
        let mut tx = self.warehouse.begin().await?;
        self.set_pinned_run_state(
            &mut tx,
            run,
            &[RunState::AuditFailed],
            RunState::Running,
            None,
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "UPDATE {} SET fencing_token = fencing_token + 1, state = 'pending', error = NULL WHERE run_id = $1",
                self.table("partitions")
            ),
            &[run.run_id.as_str().into()],
        )
        .await?;
        tx.commit().await?;
        Ok(RunRecord {
            state: RunState::Running,
            error: None,
            ..run.clone()
        })
    }

    /// First statement of a partition transaction: claims the partition if the task's fencing
    /// token is still current, the partition is not done and the run is still pinned to the
    /// task's spec (an amendment re-pins it; a worker's cached context must not outlive that).
    /// Being a write, it also takes the row lock (PostgreSQL) or the write lock (SQLite) for
    /// the rest of the transaction.
    /// Returns how many times the partition was applied before, or None for a stale task.
    pub async fn claim_partition(
        &self,
        conn: &mut dyn Session,
        task: &PartitionTask,
    ) -> Result<Option<i64>, BackfillError> {
        let claimed = execute(
            conn,
            &format!(
                "UPDATE {} SET state = 'running', attempt = $4, started_at = $5 \
                 WHERE run_id = $1 AND partition_key = $2 AND fencing_token = $3 AND state <> 'done' \
                 AND EXISTS (SELECT 1 FROM {} WHERE run_id = $1 AND spec_hash = $6)",
                self.table("partitions"),
                self.table("runs")
            ),
            &[task.run_id.as_str().into(), task.partition_key.as_str().into(), task.fencing_token.into(), task.attempt.into(), now_text().into(), task.spec_hash.as_str().into()],
        )
        .await?;
        if claimed == 0 {
            return Ok(None);
        }
        // The update holds the row's lock until the transaction ends: this reads what it left.
        let row = fetch_one(
            conn,
            &format!(
                "SELECT times_applied FROM {} WHERE run_id = $1 AND partition_key = $2",
                self.table("partitions")
            ),
            &[
                task.run_id.as_str().into(),
                task.partition_key.as_str().into(),
            ],
        )
        .await?;
        log_state_change(
            &task.run_id,
            Some(&task.partition_key),
            "partition_running",
            &format!("attempt {} token {}", task.attempt, task.fencing_token),
        );
        get::<i64>(&row, 0).map(Some)
    }

    pub async fn checkpoint_partition(
        &self,
        conn: &mut dyn Session,
        task: &PartitionTask,
        counts: MergeCounts,
        rows_after: i64,
        checksum: &str,
        seconds: f64,
    ) -> Result<(), BackfillError> {
        let updated = execute(
            conn,
            &format!(
                "UPDATE {} SET state = 'done', times_applied = times_applied + 1, inserted = $4, updated = $5, deleted = $6, unchanged = $7, \
                 rows_after = $8, checksum = $9, seconds = $10, error = NULL, finished_at = $11 \
                 WHERE run_id = $1 AND partition_key = $2 AND fencing_token = $3",
                self.table("partitions")
            ),
            &[
                task.run_id.as_str().into(),
                task.partition_key.as_str().into(),
                task.fencing_token.into(),
                counts.inserted.into(),
                counts.updated.into(),
                counts.deleted.into(),
                counts.unchanged.into(),
                rows_after.into(),
                checksum.into(),
                Bind::Float(seconds),
                now_text().into(),
            ],
        )
        .await?;
        if updated != 1 {
            return Err(BackfillError::Conflict(format!(
                "partition {} lost its fencing token before checkpoint",
                task.partition_key
            )));
        }
        self.record_event(
            conn,
            &task.run_id,
            Some(&task.partition_key),
            "partition_done",
            &format!(
                "attempt {} token {}: inserted {} updated {} deleted {} unchanged {}",
                task.attempt,
                task.fencing_token,
                counts.inserted,
                counts.updated,
                counts.deleted,
                counts.unchanged
            ),
        )
        .await
    }

    /// Records a failed attempt outside the (rolled back) partition transaction. Fenced: a
    /// stale attempt cannot overwrite a newer one's state.
    pub async fn record_partition_error(
        &self,
        task: &PartitionTask,
        state: PartitionState,
        error: &str,
    ) -> Result<(), BackfillError> {
        let error = &crate::warehouse::redact_secrets(error);
        let mut tx = self.warehouse.begin().await?;
        // The row may be locked by the very statement that failed (a killed process's) or
        // by another session: recording is bookkeeping, never a reason to hang a worker.
        self.engine()
            .set_lock_timeout(&mut tx, std::time::Duration::from_secs(2))
            .await?;
        let updated = execute(
            &mut tx,
            &format!(
                "UPDATE {} SET state = $4, attempt = $5, error = $6, finished_at = $7 WHERE run_id = $1 AND partition_key = $2 AND fencing_token = $3 AND state <> 'done'",
                self.table("partitions")
            ),
            &[
                task.run_id.as_str().into(),
                task.partition_key.as_str().into(),
                task.fencing_token.into(),
                state.as_str().into(),
                task.attempt.into(),
                error.into(),
                now_text().into(),
            ],
        )
        .await?;
        if updated == 1 {
            self.record_event(
                &mut tx,
                &task.run_id,
                Some(&task.partition_key),
                &format!("partition_{}", state.as_str()),
                error,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks a done partition failed (its applied rows are wrong, e.g. they hold a key that
    /// another partition holds too): resuming the run reissues it with a new fencing token
    /// and re-applies it over what it wrote. Returns whether it was done.
    pub async fn fail_done_partition(
        &self,
        run_id: &str,
        partition_key: &str,
        error: &str,
    ) -> Result<bool, BackfillError> {
        let error = &crate::warehouse::redact_secrets(error);
        let mut tx = self.warehouse.begin().await?;
        let updated = execute(
            &mut tx,
            &format!(
                "UPDATE {} SET state = 'failed', error = $3, finished_at = $4 WHERE run_id = $1 AND partition_key = $2 AND state = 'done'",
                self.table("partitions")
            ),
            &[
                run_id.into(),
                partition_key.into(),
                error.into(),
                now_text().into(),
            ],
        )
        .await?;
        if updated == 1 {
            self.record_event(
                &mut tx,
                run_id,
                Some(partition_key),
                "partition_failed",
                error,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    pub async fn partitions(&self, run_id: &str) -> Result<Vec<PartitionRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!(
                "SELECT partition_key, range_start, range_end, state, attempt, fencing_token, times_applied, inserted, updated, deleted, unchanged, \
                 rows_after, checksum, seconds, error FROM {} WHERE run_id = $1 ORDER BY partition_key",
                self.table("partitions")
            ),
            &[run_id.into()],
        )
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = get(row, 3)?;
                let inserted: Option<i64> = get(row, 7)?;
                let counts = match inserted {
                    Some(inserted) => Some(MergeCounts {
                        inserted,
                        updated: get::<Option<i64>>(row, 8)?.unwrap_or(0),
                        deleted: get::<Option<i64>>(row, 9)?.unwrap_or(0),
                        unchanged: get::<Option<i64>>(row, 10)?.unwrap_or(0),
                    }),
                    None => None,
                };
                Ok(PartitionRecord {
                    partition_key: get(row, 0)?,
                    range_start: get(row, 1)?,
                    range_end: get(row, 2)?,
                    state: PartitionState::parse(&state).ok_or_else(|| {
                        BackfillError::Invalid(format!("unknown partition state `{state}`"))
                    })?,
                    attempt: get(row, 4)?,
                    fencing_token: get(row, 5)?,
                    times_applied: get(row, 6)?,
                    counts,
                    rows_after: get(row, 11)?,
                    checksum: get(row, 12)?,
                    seconds: get(row, 13)?,
                    error: get(row, 14)?,
                })
            })
            .collect()
    }

    pub async fn replace_audits(
        &self,
        conn: &mut dyn Session,
        run_id: &str,
        audits: &[AuditRecord],
    ) -> Result<(), BackfillError> {
        let table = self.table("audits");
        execute(
            conn,
            &format!("DELETE FROM {table} WHERE run_id = $1"),
            &[run_id.into()],
        )
        .await?;
        let checked_at = now_text();
        // Multi-row inserts: 10,000 partitions times a few audits stay a few round trips.
        for chunk in audits.chunks(200) {
            let mut sql = format!(
                "INSERT INTO {table} (run_id, audit_name, partition_key, severity, verdict, observed, allowed, checked_at) VALUES "
            );
            let mut binds: Vec<Bind> = vec![run_id.into(), checked_at.as_str().into()];
            for (i, audit) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let n = binds.len();
                sql.push_str(&format!(
                    "($1, ${}, ${}, ${}, ${}, ${}, ${}, $2)",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5,
                    n + 6
                ));
                binds.extend([
                    audit.audit_name.as_str().into(),
                    audit.partition_key.as_str().into(),
                    audit.severity.as_str().into(),
                    audit.verdict.as_str().into(),
                    audit.observed.as_str().into(),
                    audit.allowed.as_str().into(),
                ]);
            }
            execute(conn, &sql, &binds).await?;
        }
        Ok(())
    }

    pub async fn audits(&self, run_id: &str) -> Result<Vec<AuditRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!("SELECT audit_name, partition_key, severity, verdict, observed, allowed FROM {} WHERE run_id = $1 ORDER BY audit_name, partition_key", self.table("audits")),
            &[run_id.into()],
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    audit_name: get(row, 0)?,
                    partition_key: get(row, 1)?,
                    severity: get(row, 2)?,
                    verdict: get(row, 3)?,
                    observed: get(row, 4)?,
                    allowed: get(row, 5)?,
                })
            })
            .collect()
    }

    pub async fn insert_archive(
        &self,
        conn: &mut dyn Session,
        archive: &ArchiveRecord,
    ) -> Result<(), BackfillError> {
        execute(
            conn,
            &format!(
                "INSERT INTO {} (archive_table, run_id, source_table, kind, row_count, checksum, created_at, expires_at, published_checksum) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                self.table("archives")
            ),
            &[
                archive.archive_table.as_str().into(),
                archive.run_id.as_str().into(),
                archive.source_table.as_str().into(),
                archive.kind.as_str().into(),
                archive.row_count.into(),
                archive.checksum.as_str().into(),
                archive.created_at.as_str().into(),
                archive.expires_at.as_str().into(),
                archive.published_checksum.clone().into(),
            ],
        )
        .await?;
        Ok(())
    }

    pub async fn archives(&self) -> Result<Vec<ArchiveRecord>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let rows = fetch_all(
            &mut conn,
            &format!(
                "SELECT archive_table, run_id, source_table, kind, row_count, checksum, created_at, expires_at, restored_at, dropped_at, published_checksum FROM {} ORDER BY created_at DESC",
                self.table("archives")
            ),
            &[],
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ArchiveRecord {
                    archive_table: get(row, 0)?,
                    run_id: get(row, 1)?,
                    source_table: get(row, 2)?,
                    kind: get(row, 3)?,
                    row_count: get(row, 4)?,
                    checksum: get(row, 5)?,
                    created_at: get(row, 6)?,
                    expires_at: get(row, 7)?,
                    restored_at: get(row, 8)?,
                    dropped_at: get(row, 9)?,
                    published_checksum: get(row, 10)?,
                })
            })
            .collect()
    }

    pub async fn mark_archive(
        &self,
        conn: &mut dyn Session,
        archive_table: &str,
        column: ArchiveMark,
    ) -> Result<(), BackfillError> {
        let column = match column {
            ArchiveMark::Restored => "restored_at",
            ArchiveMark::Dropped => "dropped_at",
        };
        execute(
            conn,
            &format!(
                "UPDATE {} SET {column} = $2 WHERE archive_table = $1",
                self.table("archives")
            ),
            &[archive_table.into(), now_text().into()],
        )
        .await?;
        Ok(())
    }

    /// Records one of the facts a run keeps beside its state (see `RunNote`).
    pub async fn set_run_note(
        &self,
        conn: &mut dyn Session,
        run_id: &str,
        note: RunNote,
        value: &str,
    ) -> Result<(), BackfillError> {
        execute(
            conn,
            &format!(
                "UPDATE {} SET {} = $2 WHERE run_id = $1",
                self.table("runs"),
                note.column()
            ),
            &[run_id.into(), value.into()],
        )
        .await?;
        Ok(())
    }

    pub async fn run_note(
        &self,
        run_id: &str,
        note: RunNote,
    ) -> Result<Option<String>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let row = fetch_optional(
            &mut conn,
            &format!(
                "SELECT {} FROM {} WHERE run_id = $1",
                note.column(),
                self.table("runs")
            ),
            &[run_id.into()],
        )
        .await?;
        Ok(row
            .as_ref()
            .map(|r| get::<Option<String>>(r, 0))
            .transpose()?
            .flatten())
    }

    pub async fn spec_source(&self, spec_hash: &str) -> Result<Option<String>, BackfillError> {
        let mut conn = self.warehouse.acquire().await?;
        let row = fetch_optional(
            &mut conn,
            &format!(
                "SELECT source_text FROM {} WHERE spec_hash = $1",
                self.table("specs")
            ),
            &[spec_hash.into()],
        )
        .await?;
        row.as_ref().map(|r| get::<String>(r, 0)).transpose()
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ArchiveMark {
    Restored,
    Dropped,
}

/// One log line per state change, under the `backfill::state` target, with the run and the
/// partition as fields: what a log pipeline follows. `detail` never holds a secret (errors are
/// redacted before they are recorded).
pub fn log_state_change(run_id: &str, partition: Option<&str>, kind: &str, detail: &str) {
    tracing::info!(
        target: "backfill::state",
        run = run_id,
        partition = partition.unwrap_or(""),
        change = kind,
        detail,
        "state change"
    );
}
