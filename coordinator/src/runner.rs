//! The run state machine: plan -> shadow -> partitions -> barrier -> audits -> publish.
//! Every step records its state in the control store first, so running the same command
//! again resumes where the last process stopped, and a changed spec never joins a run.

use std::sync::Arc;

use backfill_common::control::PartitionTask;
use backfill_common::control::{
    AuditRecord, ControlStore, PartitionState, RunNote, RunRecord, RunState, now_text,
};
use backfill_common::envelope::TaskMessage;
use backfill_common::ident::TableName;
use backfill_common::plan::{Grain, Partition};
use backfill_common::queue::{InMemoryQueue, TaskQueue};
use backfill_common::semaphore::InMemorySemaphore;
use backfill_common::spec::{Approval, HookEvent, PublishMode, Spec, SpecChanges};
use backfill_common::telemetry;
use backfill_common::warehouse::{Bind, Checksum, Session, Warehouse, execute, redact_secrets};
use backfill_common::{BackfillError, TOOL_VERSION};
use backfill_worker::{
    FixedContext, PartitionContext, PartitionOutcome, PartitionReport, consume, shadow_facts,
};
use tracing::Instrument as _;

use crate::audit::{self, FAIL};
use crate::hooks::{self, HookContext};
use crate::publish;
use crate::shadow;

/// Everything `plan` finds out without writing anything.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub spec_name: String,
    pub spec_hash: String,
    pub target: String,
    pub dialect: String,
    pub grain: Grain,
    pub partitions: Vec<Partition>,
    pub source_columns: Vec<String>,
    pub target_columns: Vec<String>,
    pub partition_sql: String,
    pub shadow_template: String,
    /// The open run this spec would resume, if any.
    pub resumes: Option<String>,
    /// The settings in which this spec differs from the open run's (resuming then needs
    /// `--amend`), as `field: before → after`.
    pub amends: Vec<String>,
    /// How a new run would publish (`auto` resolved), and why.
    pub publish_mode: PublishMode,
    pub publish_reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RunOutcome {
    Published {
        run_id: String,
        archive: String,
        partitions: usize,
        /// The mode it published with (what the archive holds depends on it).
        publish_mode: PublishMode,
    },
    AlreadyPublished {
        run_id: String,
    },
    AuditFailed {
        run_id: String,
        failures: Vec<AuditRecord>,
    },
    PartitionsFailed {
        run_id: String,
        failures: Vec<(String, String)>,
    },
    /// Audits passed; `publish.approval = "manual"` waits for `backfill publish <run>`.
    AwaitingApproval {
        run_id: String,
        publish_mode: String,
    },
    /// A before_write or before_publish hook kept failing: the target was not touched.
    Blocked {
        run_id: String,
        event: String,
        reason: String,
    },
}

impl RunOutcome {
    /// A short name for logs, traces and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            RunOutcome::Published { .. } => "published",
            RunOutcome::AlreadyPublished { .. } => "already_published",
            RunOutcome::AuditFailed { .. } => "audit_failed",
            RunOutcome::PartitionsFailed { .. } => "partitions_failed",
            RunOutcome::AwaitingApproval { .. } => "awaiting_approval",
            RunOutcome::Blocked { .. } => "blocked",
        }
    }
}

impl RunOutcome {
    pub fn run_id(&self) -> &str {
        match self {
            RunOutcome::Published { run_id, .. }
            | RunOutcome::AlreadyPublished { run_id }
            | RunOutcome::AuditFailed { run_id, .. }
            | RunOutcome::PartitionsFailed { run_id, .. }
            | RunOutcome::AwaitingApproval { run_id, .. }
            | RunOutcome::Blocked { run_id, .. } => run_id,
        }
    }
}

/// Who runs the partitions.
pub enum Executor {
    /// In this process: in-memory queue and semaphore, `concurrency` worker tasks.
    Embedded,
    /// `backfill-worker` processes, through RabbitMQ (the semaphore lives in Redis, on the
    /// workers' side).
    Distributed(crate::distributed::DistributedOptions),
}

/// Progress callbacks, so the CLI can draw a bar and tests can stay quiet.
pub trait Progress: Send + Sync {
    fn phase(&self, _message: &str) {}
    fn partitions(&self, _total: usize, _already_done: usize) {}
    fn partition_finished(&self, _report: &PartitionReport) {}
}

pub struct Quiet;
impl Progress for Quiet {}

pub struct Backfill {
    pub spec: Spec,
    pub spec_text: String,
    pub store: ControlStore,
    pub target: TableName,
    /// Whether an open run started with other settings (same identity) takes this spec's.
    pub amend: bool,
}

impl Backfill {
    /// Connects and resolves the target. Writes nothing: the control store is created or
    /// migrated by `run`, so `plan` stays read-only.
    pub async fn open(
        spec: Spec,
        spec_text: String,
        warehouse_url: &str,
    ) -> Result<Backfill, BackfillError> {
        let warehouse = Warehouse::connect(warehouse_url, spec.warehouse.concurrency + 2).await?;
        audit::check_supported(&spec, warehouse.engine())?;
        let store = ControlStore::new(warehouse, spec.warehouse.control_schema.clone());
        let target = store.warehouse.resolve_table(&spec.target.table).await?;
        Ok(Backfill {
            spec,
            spec_text,
            store,
            target,
            amend: false,
        })
    }

    /// Lets an open run of this target that was started with other settings (the same rows
    /// to write) carry on with this spec's: `backfill run --amend`.
    pub fn amending(mut self, amend: bool) -> Backfill {
        self.amend = amend;
        self
    }

    /// The open run of this target, if any, with how this spec differs from the one it is
    /// pinned to.
    async fn open_run_and_changes(
        &self,
    ) -> Result<Option<(RunRecord, SpecChanges)>, BackfillError> {
        let runs = self.store.runs_for_target(&self.target.to_string()).await?;
        let Some(open) = runs.into_iter().find(|r| r.state.is_open()) else {
            return Ok(None);
        };
        if open.spec_hash == self.spec.hash() {
            return Ok(Some((open, SpecChanges::default())));
        }
        let text = self
            .store
            .spec_source(&open.spec_hash)
            .await?
            .ok_or_else(|| {
                BackfillError::Invalid(format!(
                    "the spec {} of run {} is missing from the control store",
                    open.spec_hash, open.run_id
                ))
            })?;
        let pinned = Spec::parse(&text).map_err(|e| {
            BackfillError::Invalid(format!("the stored spec of run {}: {e}", open.run_id))
        })?;
        let changes = self.spec.changes_since(&pinned);
        if changes.is_empty() {
            // Another hash for the same fields: the binaries canonicalise specs differently.
            return Err(BackfillError::Conflict(format!(
                "run {} is pinned to spec {}, which this version of backfill reads as the same spec but hashes to {}: \
                 it was started by another version. Carry it on with the version that started it, \
                 or abandon it (`backfill abandon {}`) and run the spec again",
                open.run_id,
                &open.spec_hash[..open.spec_hash.len().min(12)],
                &self.spec.hash()[..12],
                open.run_id
            )));
        }
        Ok(Some((open, changes)))
    }

    /// The source query as the warehouse will run it (parameters as placeholders).
    fn partition_sql(&self) -> Result<String, BackfillError> {
        backfill_worker::context::source_sql(&self.spec, self.store.engine())
    }

    /// Checks the spec against the warehouse and describes what a run would do. Writes
    /// nothing, not even the control store's tables.
    pub async fn plan(&self) -> Result<Plan, BackfillError> {
        let warehouse = &self.store.warehouse;
        let mut conn = warehouse.acquire().await?;
        if !warehouse.table_exists(&mut conn, &self.target).await? {
            return Err(BackfillError::Invalid(format!(
                "target.table: {} does not exist in the warehouse",
                self.target
            )));
        }
        let has_control_store = warehouse
            .table_exists(&mut conn, &self.store.table_name("runs"))
            .await?;
        let (resumes, amends) = match has_control_store {
            true => match self.open_run_and_changes().await? {
                Some((run, changes)) if changes.identity.is_empty() => {
                    (Some(run), changes.settings)
                }
                _ => (None, Vec::new()),
            },
            false => (None, Vec::new()),
        };
        let (publish_mode, publish_reason) = match &resumes {
            // The run's mode was chosen when it started; its shadow is built for it.
            Some(run) => (
                self.frozen_publish_mode(run).await?,
                format!("chosen when run {} started", run.run_id),
            ),
            None => self.choose_publish_mode(&mut conn).await?,
        };
        let resumes = resumes.map(|r| r.run_id);
        let target_columns = warehouse.table_columns(&mut conn, &self.target).await?;
        drop(conn);
        let partition_sql = self.partition_sql()?;
        let source_columns = warehouse
            .describe_columns(&partition_sql)
            .await
            .map_err(|e| e.context("checking source.query against the warehouse"))?;
        let mut known: Vec<String> = target_columns.clone();
        known.extend(
            self.spec
                .target
                .add_columns
                .iter()
                .map(|c| c.name.to_string()),
        );
        for column in &source_columns {
            if !known.contains(column) {
                return Err(BackfillError::Invalid(format!(
                    "source.query returns column `{column}`, which {} does not have (its columns: {}); rename it in the query or declare it in target.add_columns",
                    self.target,
                    known.join(", ")
                )));
            }
        }
        for required in self
            .spec
            .target
            .key
            .iter()
            .chain(std::iter::once(&self.spec.partition.column))
        {
            if !source_columns.iter().any(|c| c == required.as_str()) {
                return Err(BackfillError::Invalid(format!(
                    "source.query must return the column `{required}` (key and partition columns identify each row)"
                )));
            }
        }
        shadow_name(&self.target, "00000000")?;
        publish::undone_name(&self.target, "00000000")?;
        Ok(Plan {
            spec_name: self.spec.name.clone(),
            spec_hash: self.spec.hash(),
            target: self.target.to_string(),
            dialect: self.store.engine().name().to_string(),
            grain: self.spec.partition.grain,
            partitions: self.spec.planned_partitions(),
            source_columns,
            target_columns,
            partition_sql,
            // `<run>` is no identifier: the template is text, the name a run gets checked.
            shadow_template: shadow_name(&self.target, "0")
                .map(|_| format!("{}__bf_shadow_<run>", self.target))?,
            resumes,
            amends,
            publish_mode,
            publish_reason,
        })
    }

    /// The publish mode a new run would use, and why (`auto` weighs the target's shape and
    /// the window's share of it).
    async fn choose_publish_mode(
        &self,
        conn: &mut dyn Session,
    ) -> Result<(PublishMode, String), BackfillError> {
        let warehouse = &self.store.warehouse;
        let findings =
            shadow::target_findings(warehouse, conn, &self.target, &self.spec.target.key).await?;
        let (window_rows, table_rows) = if self.spec.publish.mode == PublishMode::Auto {
            self.count_window_rows(conn).await?
        } else {
            (0, 0)
        };
        let partitioned = findings
            .iter()
            .any(|f| f.kind == backfill_common::engine::FindingKind::NativePartitioning);
        let partition_swap = if partitioned
            && matches!(
                self.spec.publish.mode,
                PublishMode::Auto | PublishMode::SwapPartitions
            ) {
            Some(self.rows_beside_the_window(conn).await?)
        } else {
            None
        };
        shadow::choose_publish_mode(
            &self.spec,
            &self.target,
            &findings,
            window_rows,
            table_rows,
            partition_swap,
        )
    }

    /// For a natively partitioned target: the rows the partitions touched by the window hold
    /// outside it (what swap_partitions would copy), or why swap_partitions cannot be used.
    async fn rows_beside_the_window(
        &self,
        conn: &mut dyn Session,
    ) -> Result<Result<i64, String>, BackfillError> {
        let partitions = self.spec.planned_partitions();
        let affected = match shadow::partitions_in_window(
            self.store.engine(),
            conn,
            &self.spec,
            &self.target,
            &partitions,
        )
        .await
        {
            Ok(affected) => affected,
            Err(BackfillError::Invalid(why)) => return Ok(Err(why)),
            Err(other) => return Err(other),
        };
        let tables: Vec<TableName> = affected.into_iter().map(|p| p.table).collect();
        let (outside, binds) = shadow::outside_window(self.store.engine(), &self.spec, &partitions);
        let Some(native) = self.store.engine().native_partitions() else {
            return Ok(Err(format!(
                "{} has no native partitions",
                self.store.engine().name()
            )));
        };
        let row = backfill_common::warehouse::fetch_one(
            conn,
            &format!(
                "SELECT {} FROM {} AS t WHERE {} AND {outside}",
                self.store.engine().as_bigint("count(*)"),
                self.target.quoted(),
                native.in_partitions(&tables)
            ),
            &binds,
        )
        .await?;
        Ok(Ok(backfill_common::warehouse::get(&row, 0)?))
    }

    /// The target's rows in the window and in all, for `auto` to weigh the publish modes.
    async fn count_window_rows(&self, conn: &mut dyn Session) -> Result<(i64, i64), BackfillError> {
        let (window, binds) = self.window_on_t(&self.spec.planned_partitions());
        let row = backfill_common::warehouse::fetch_one(
            conn,
            &format!(
                "SELECT {}, {} FROM {} AS t",
                self.store.engine().as_bigint(&format!(
                    "coalesce(sum(CASE WHEN {window} THEN 1 ELSE 0 END), 0)"
                )),
                self.store.engine().as_bigint("count(*)"),
                self.target.quoted()
            ),
            &binds,
        )
        .await?;
        Ok((
            backfill_common::warehouse::get(&row, 0)?,
            backfill_common::warehouse::get(&row, 1)?,
        ))
    }

    /// Runs (or resumes) the backfill to publish, embedded: in-process queue, semaphore and
    /// `concurrency` worker tasks running the worker library.
    pub async fn run(
        &self,
        owner: &str,
        progress: &dyn Progress,
    ) -> Result<RunOutcome, BackfillError> {
        self.run_with(owner, progress, &Executor::Embedded).await
    }

    /// Runs (or resumes) the backfill to publish, with partitions executed embedded or by
    /// distributed workers. Everything but the partition phase is the same code.
    /// The whole run is one span, the root of the backfill's trace: plan, shadow, every
    /// partition (on whichever worker), barrier, audits and publish are its descendants.
    pub async fn run_with(
        &self,
        owner: &str,
        progress: &dyn Progress,
        executor: &Executor,
    ) -> Result<RunOutcome, BackfillError> {
        let span = tracing::info_span!(
            "backfill.run",
            run.id = tracing::field::Empty,
            target = %self.target,
            spec.name = %self.spec.name,
            spec.hash = %self.spec.hash(),
            warehouse = %self.spec.warehouse.name,
            executor = match executor {
                Executor::Embedded => "embedded",
                Executor::Distributed(_) => "distributed",
            },
            partitions = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let result = self
            .run_phases(owner, progress, executor)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(outcome) => {
                span.record("outcome", outcome.name());
                if !matches!(
                    outcome,
                    RunOutcome::Published { .. }
                        | RunOutcome::AlreadyPublished { .. }
                        | RunOutcome::AwaitingApproval { .. }
                ) {
                    telemetry::record_error(&span, outcome.name());
                }
            }
            Err(error) => {
                span.record("outcome", "error");
                telemetry::record_error(&span, &redact_secrets(&error.to_string()));
            }
        }
        result
    }

    async fn run_phases(
        &self,
        owner: &str,
        progress: &dyn Progress,
        executor: &Executor,
    ) -> Result<RunOutcome, BackfillError> {
        if let Executor::Distributed(options) = executor {
            options.check_timeouts(&self.spec)?;
        }
        self.store.migrate().await?;
        let plan = self
            .plan()
            .instrument(tracing::info_span!("backfill.plan"))
            .await?;
        let run_span = tracing::Span::current();
        run_span.record("partitions", plan.partitions.len());
        let run = match self.find_or_create_run(&plan, owner, progress).await? {
            Ok(run) => run,
            Err(outcome) => return Ok(outcome),
        };
        run_span.record("run.id", run.run_id.as_str());
        let mode = self.frozen_publish_mode(&run).await?;
        let hooks = self.hook_context(&run, &plan.partitions, mode);
        let ctx = RunContext {
            run: &run,
            partitions: &plan.partitions,
            mode,
            hooks: &hooks,
            progress,
        };
        let result = self.drive(ctx, &plan, executor).await;
        self.report_failure(ctx, &result).await;
        result
    }

    /// Write, barrier, audit, then publish or wait for approval.
    async fn drive(
        &self,
        ctx: RunContext<'_>,
        plan: &Plan,
        executor: &Executor,
    ) -> Result<RunOutcome, BackfillError> {
        let RunContext {
            run,
            mode,
            progress,
            ..
        } = ctx;
        if run.state == RunState::AwaitingApproval {
            return Ok(RunOutcome::AwaitingApproval {
                run_id: run.run_id.clone(),
                publish_mode: mode.as_str().to_string(),
            });
        }
        if matches!(run.state, RunState::Running | RunState::Failed)
            && let Some(outcome) = self.write_partitions(ctx, plan, executor).await?
        {
            return Ok(outcome);
        }

        if mode == PublishMode::SwapTable
            && publish::swap_done_unrecorded(&self.store.warehouse, run).await?
        {
            // The audits passed and the names changed; only the record is missing.
            progress.phase(
                "the shadow was swapped in by a publish that stopped before recording it; recording it",
            );
            return self.publish_audited(ctx, None).await;
        }
        progress.phase("auditing the shadow against the current table");
        let shadow = TableName::parse(&run.shadow_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        let audit_span = tracing::info_span!(
            "backfill.audit",
            checks = tracing::field::Empty,
            failed = tracing::field::Empty
        );
        let mut conn = self.store.warehouse.acquire().await?;
        let records = audit::run_audits(
            &self.store.warehouse,
            &mut conn,
            &self.spec,
            &self.target,
            &shadow,
            &plan.partitions,
            mode,
        )
        .instrument(audit_span.clone())
        .await?;
        drop(conn);
        audit::trace_results(&audit_span, &records);
        let failures: Vec<AuditRecord> = records
            .iter()
            .filter(|r| r.verdict == FAIL)
            .cloned()
            .collect();
        let mut tx = self.store.warehouse.begin().await?;
        self.store
            .replace_audits(&mut tx, &run.run_id, &records)
            .await?;
        if !failures.is_empty() {
            let message = format!(
                "{} audit check(s) failed; nothing was published and {} is kept for inspection",
                failures.len(),
                run.shadow_table
            );
            self.store
                .set_pinned_run_state(
                    &mut tx,
                    run,
                    &[RunState::Auditing, RunState::AuditFailed],
                    RunState::AuditFailed,
                    Some(&message),
                )
                .await?;
            tx.commit().await?;
            return Ok(RunOutcome::AuditFailed {
                run_id: run.run_id.clone(),
                failures,
            });
        }
        if self.spec.publish.approval == Approval::Manual {
            // What the audits compared against: `backfill publish` refuses if it changed.
            let (window, binds) = self.window_on_t(&plan.partitions);
            let seen = self
                .store
                .warehouse
                .checksum(&mut tx, &self.target, Some(&window), &binds)
                .await?;
            self.store
                .set_run_note(
                    &mut tx,
                    &run.run_id,
                    RunNote::WindowChecksum,
                    &seen.to_string(),
                )
                .await?;
            self.store
                .set_pinned_run_state(
                    &mut tx,
                    run,
                    &[RunState::Auditing, RunState::AuditFailed],
                    RunState::AwaitingApproval,
                    None,
                )
                .await?;
            tx.commit().await?;
            return Ok(RunOutcome::AwaitingApproval {
                run_id: run.run_id.clone(),
                publish_mode: mode.as_str().to_string(),
            });
        }
        tx.commit().await?;
        self.publish_audited(ctx, None).await
    }

    /// The partition phase: reissue what is not done, run it (embedded or on workers), and
    /// hold the barrier. Returns an outcome when the run stops here.
    async fn write_partitions(
        &self,
        ctx: RunContext<'_>,
        plan: &Plan,
        executor: &Executor,
    ) -> Result<Option<RunOutcome>, BackfillError> {
        let RunContext {
            run,
            hooks,
            progress,
            ..
        } = ctx;
        let facts = shadow_facts(&self.store, &self.spec, run).await?;
        let ctx = Arc::new(PartitionContext::new(
            self.store.clone(),
            &self.spec,
            run,
            &plan.source_columns,
            facts,
        )?);
        if run.state == RunState::Failed {
            self.store
                .set_pinned_run_state_now(run, &[RunState::Failed], RunState::Running, None)
                .await?;
        }
        let tasks = self.reissue_unfinished(run, progress).await?;
        if !tasks.is_empty()
            && let Err(failure) =
                hooks::run_hooks(&self.spec.hooks, HookEvent::BeforeWrite, hooks).await
        {
            return self
                .block(run, &[RunState::Running], failure)
                .await
                .map(Some);
        }
        progress.partitions(plan.partitions.len(), plan.partitions.len() - tasks.len());
        progress.phase(&format!(
            "writing {} partition(s) into {}",
            tasks.len(),
            run.shadow_table
        ));
        match executor {
            Executor::Embedded => {
                // Retries happen inside the worker; a task out of retries is not redelivered.
                let queue = Arc::new(InMemoryQueue::with_delivery_limit(EMBEDDED_DELIVERY_LIMIT));
                for task in tasks {
                    queue.publish(self.task_message(task)).await?;
                }
                queue.close();
                run_embedded_workers(
                    ctx.clone(),
                    queue,
                    self.spec.warehouse.concurrency,
                    progress,
                )
                .instrument(barrier_span(&run.run_id))
                .await?;
            }
            Executor::Distributed(options) => {
                let messages = tasks.into_iter().map(|t| self.task_message(t)).collect();
                crate::distributed::run_partitions(&self.store, run, messages, options, progress)
                    .await?;
            }
        }
        // The barrier: the control store, not the reports, decides whether all are done.
        let partitions = self.store.partitions(&run.run_id).await?;
        let failures: Vec<(String, String)> = partitions
            .iter()
            .filter(|p| p.state != PartitionState::Done)
            .map(|p| {
                (
                    p.partition_key.clone(),
                    p.error
                        .clone()
                        .unwrap_or_else(|| p.state.as_str().to_string()),
                )
            })
            .collect();
        if !failures.is_empty() {
            let message = format!(
                "{} partition(s) failed; fix the cause and run the same spec again",
                failures.len()
            );
            return self
                .partitions_failed(run, &message, failures)
                .await
                .map(Some);
        }
        if let Some(deferred) = self
            .store
            .run_note(&run.run_id, RunNote::DeferredIndexes)
            .await?
        {
            let deferred: Vec<shadow::DeferredIndex> = serde_json::from_str(&deferred)
                .map_err(|e| BackfillError::Invalid(format!("the run's deferred indexes: {e}")))?;
            progress.phase(&format!(
                "building {} index(es) of {}",
                deferred.len(),
                run.shadow_table
            ));
            let built = shadow::build_deferred_indexes(
                &self.store.warehouse,
                &self.spec,
                &ctx.shadow,
                &deferred,
            )
            .instrument(tracing::info_span!(
                "backfill.indexes",
                count = deferred.len()
            ))
            .await?;
            if let Err(failures) = built {
                // Partitions holding a duplicated key are marked failed: once the source is
                // fixed, resuming re-applies them over what they wrote.
                let mut reopened = 0;
                for (partition, message) in &failures {
                    if plan.partitions.iter().any(|p| &p.key == partition)
                        && self
                            .store
                            .fail_done_partition(&run.run_id, partition, message)
                            .await?
                    {
                        reopened += 1;
                    }
                }
                let message = if reopened > 0 {
                    format!(
                        "the shadow has duplicate keys, so its unique index cannot be built; nothing was published. \
                         {reopened} partition(s) holding them are marked failed: fix the source, then resume the run \
                         (or abandon it and run the spec again)"
                    )
                } else {
                    "an index of the target cannot be built on the shadow (see the failures); nothing was published. \
                     Resuming cannot change that: abandon this run, fix the cause and run the spec again"
                        .to_string()
                };
                return self
                    .partitions_failed(run, &message, failures)
                    .await
                    .map(Some);
            }
        }
        self.store
            .set_pinned_run_state_now(run, &[RunState::Running], RunState::Auditing, None)
            .await?;
        Ok(None)
    }

    /// Marks a running run failed with `message` and reports its failed partitions.
    async fn partitions_failed(
        &self,
        run: &RunRecord,
        message: &str,
        failures: Vec<(String, String)>,
    ) -> Result<RunOutcome, BackfillError> {
        self.store
            .set_pinned_run_state_now(run, &[RunState::Running], RunState::Failed, Some(message))
            .await?;
        Ok(RunOutcome::PartitionsFailed {
            run_id: run.run_id.clone(),
            failures,
        })
    }

    /// Publishes an audited run: before_publish hooks (a failure blocks the publish and leaves
    /// the target untouched), the publish itself in the run's mode, after_publish hooks.
    async fn publish_audited(
        &self,
        ctx: RunContext<'_>,
        window_guard: Option<publish::WindowGuard>,
    ) -> Result<RunOutcome, BackfillError> {
        let RunContext {
            run,
            partitions,
            mode,
            hooks,
            progress,
        } = ctx;
        if let Err(failure) =
            hooks::run_hooks(&self.spec.hooks, HookEvent::BeforePublish, hooks).await
        {
            return self
                .block(
                    run,
                    &[
                        RunState::Auditing,
                        RunState::AuditFailed,
                        RunState::AwaitingApproval,
                    ],
                    failure,
                )
                .await;
        }
        let shadow = TableName::parse(&run.shadow_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        progress.phase(&format!(
            "publishing with {}: {} into {}",
            mode.as_str(),
            run.shadow_table,
            self.target
        ));
        let publish_span = tracing::info_span!(
            "backfill.publish",
            mode = mode.as_str(),
            shadow = %run.shadow_table,
            rows.deleted = tracing::field::Empty,
            rows.updated = tracing::field::Empty,
            rows.inserted = tracing::field::Empty,
        );
        let outside_checksum = self
            .store
            .run_note(&run.run_id, RunNote::OutsideChecksum)
            .await?;
        let published = publish::strategy(mode)
            .publish(publish::PublishRequest {
                store: &self.store,
                spec: &self.spec,
                run,
                target: &self.target,
                shadow: &shadow,
                partitions,
                outside_checksum,
                window_guard,
            })
            .instrument(publish_span.clone())
            .await?;
        if let Some(writes) = published.writes {
            publish_span.record("rows.deleted", writes.deleted);
            publish_span.record("rows.updated", writes.updated);
            publish_span.record("rows.inserted", writes.inserted);
        }
        let archive = published.archive;
        let mut published = hooks.clone();
        published.archive = Some(archive.archive_table.clone());
        if let Err(failure) =
            hooks::run_hooks(&self.spec.hooks, HookEvent::AfterPublish, &published).await
        {
            // The publish stands; say so loudly.
            progress.phase(&format!("published, but {failure}"));
            tracing::warn!(run = %run.run_id, %failure, "after_publish hook failed");
        }
        Ok(RunOutcome::Published {
            run_id: run.run_id.clone(),
            archive: archive.archive_table,
            partitions: partitions.len(),
            publish_mode: mode,
        })
    }

    /// `backfill publish <run>`: publishes a run that waits for approval, if the target's
    /// window still holds what the audits compared against.
    pub async fn publish_approved(
        &self,
        run_id: &str,
        approver: &str,
        progress: &dyn Progress,
    ) -> Result<RunOutcome, BackfillError> {
        let run = self.store.find_run(run_id).await?.ok_or_else(|| {
            BackfillError::Invalid(format!("no run `{run_id}` in this control store"))
        })?;
        if run.state != RunState::AwaitingApproval {
            return Err(BackfillError::Conflict(format!(
                "run {run_id} is {}, not awaiting_approval: only a run whose audits passed under publish.approval = \"manual\" can be published this way",
                run.state.as_str()
            )));
        }
        let partitions = self.spec.planned_partitions();
        let mode = self.frozen_publish_mode(&run).await?;
        let expected = self
            .store
            .run_note(run_id, RunNote::WindowChecksum)
            .await?
            .ok_or_else(|| {
                BackfillError::Invalid(format!(
                    "run {run_id} has no record of what its audits saw; run the same spec again to audit it"
                ))
            })?;
        let (filter, binds) = self.window_on_t(&partitions);
        let guard = publish::WindowGuard {
            filter,
            binds,
            expected,
        };
        let hooks = self.hook_context(&run, &partitions, mode);
        {
            let mut conn = self.store.warehouse.acquire().await?;
            self.store
                .record_event(&mut conn, run_id, None, "publish_approved", approver)
                .await?;
        }
        let span = tracing::info_span!("backfill.approved_publish", run.id = %run_id);
        let ctx = RunContext {
            run: &run,
            partitions: &partitions,
            mode,
            hooks: &hooks,
            progress,
        };
        let result = self
            .publish_audited(ctx, Some(guard))
            .instrument(span)
            .await;
        if let Err(BackfillError::ApprovalLapsed(message)) = &result {
            // The audits saw another window: audit again on the next run of the spec.
            self.store
                .set_run_state_now(
                    run_id,
                    &[RunState::AwaitingApproval],
                    RunState::Auditing,
                    Some(message),
                )
                .await?;
        }
        self.report_failure(ctx, &result).await;
        result
    }

    /// A blocking hook failed: the run stops (state failed, with the reason) before touching
    /// the target; running the same spec again retries from here.
    async fn block(
        &self,
        run: &RunRecord,
        from: &[RunState],
        failure: hooks::HookFailure,
    ) -> Result<RunOutcome, BackfillError> {
        let message = format!(
            "{failure}; the target was not touched. Fix the hook's cause and run the same spec again"
        );
        self.store
            .set_pinned_run_state_now(run, from, RunState::Failed, Some(&message))
            .await?;
        Ok(RunOutcome::Blocked {
            run_id: run.run_id.clone(),
            event: failure.event.as_str().to_string(),
            reason: failure.to_string(),
        })
    }

    /// Runs the on_failure hooks when a run stops without publishing.
    async fn report_failure(
        &self,
        ctx: RunContext<'_>,
        result: &Result<RunOutcome, BackfillError>,
    ) {
        let RunContext {
            hooks, progress, ..
        } = ctx;
        let (outcome, error) = match result {
            Ok(RunOutcome::PartitionsFailed { failures, .. }) => (
                "partitions_failed",
                format!("{} partition(s) failed", failures.len()),
            ),
            Ok(RunOutcome::AuditFailed { failures, .. }) => (
                "audit_failed",
                format!("{} audit check(s) failed", failures.len()),
            ),
            Ok(RunOutcome::Blocked { reason, .. }) => ("blocked", reason.clone()),
            Ok(_) => return,
            Err(error) => ("error", redact_secrets(&error.to_string())),
        };
        let mut context = hooks.clone();
        context.outcome = Some(outcome.to_string());
        context.error = Some(error);
        if let Err(failure) =
            hooks::run_hooks(&self.spec.hooks, HookEvent::OnFailure, &context).await
        {
            progress.phase(&failure.to_string());
            tracing::warn!(%failure, "on_failure hook failed");
        }
    }

    /// The publish mode of a run: the one recorded when it was created (`auto` is resolved
    /// once; a resumed run never switches modes under its shadow).
    async fn frozen_publish_mode(&self, run: &RunRecord) -> Result<PublishMode, BackfillError> {
        Ok(
            match self
                .store
                .run_note(&run.run_id, RunNote::PublishMode)
                .await?
            {
                Some(text) => match PublishMode::parse(&text) {
                    Some(PublishMode::Auto) | None => {
                        return Err(BackfillError::Invalid(format!(
                            "run {} records the publish mode `{text}`, which this version cannot publish; \
                             finish it with the version that started it, or abandon it",
                            run.run_id
                        )));
                    }
                    Some(mode) => mode,
                },
                // Runs created before publish modes existed copied the whole table.
                None => PublishMode::SwapTable,
            },
        )
    }

    /// Whether the target's window still holds what the published run `done` wrote there
    /// (its partitions' checksums, added up); a description of the change when not. A run
    /// whose partition checksums cannot be added up counts as unchanged.
    async fn window_changed_since(
        &self,
        done: &RunRecord,
        plan: &Plan,
    ) -> Result<Option<String>, BackfillError> {
        let records = self.store.partitions(&done.run_id).await?;
        let Some(published) = publish::added_up(
            self.store.engine(),
            records
                .iter()
                .map(|r| r.checksum.as_deref().and_then(Checksum::parse)),
        ) else {
            return Ok(None);
        };
        let (window, binds) = self.window_on_t(&plan.partitions);
        let mut conn = self.store.warehouse.acquire().await?;
        let now = self
            .store
            .warehouse
            .checksum_like(
                &mut conn,
                &self.target,
                Some(&window),
                &binds,
                &published.to_string(),
            )
            .await?;
        Ok((now.to_string() != published.to_string()).then(|| {
            format!(
                "{} rows published, {} there now; checksum {published} then, {now} now",
                published.rows, now.rows
            )
        }))
    }

    /// The window (alias `t`) of this spec as a condition with its binds.
    fn window_on_t(&self, partitions: &[Partition]) -> (String, Vec<Bind>) {
        crate::window::spec_window(self.store.engine(), &self.spec, partitions)
    }

    fn hook_context(
        &self,
        run: &RunRecord,
        partitions: &[Partition],
        mode: PublishMode,
    ) -> HookContext {
        HookContext {
            event: String::new(),
            run_id: run.run_id.clone(),
            spec_name: self.spec.name.clone(),
            spec_hash: run.spec_hash.clone(),
            target: self.target.to_string(),
            shadow: run.shadow_table.clone(),
            publish_mode: mode.as_str().to_string(),
            partitions: partitions.len(),
            window_first: partitions
                .first()
                .map(|p| p.key.clone())
                .unwrap_or_default(),
            window_last: partitions.last().map(|p| p.key.clone()).unwrap_or_default(),
            archive: None,
            outcome: None,
            error: None,
        }
    }

    /// Reissues unfinished partitions. A statement of a killed process may still hold a
    /// partition row (PostgreSQL runs it to its end or its statement timeout): wait for it,
    /// saying so, up to the partition timeout.
    async fn reissue_unfinished(
        &self,
        run: &RunRecord,
        progress: &dyn Progress,
    ) -> Result<Vec<PartitionTask>, BackfillError> {
        let started = std::time::Instant::now();
        let mut told = false;
        loop {
            match self.store.reissue_unfinished(run).await {
                Ok(tasks) => return Ok(tasks),
                Err(error)
                    if error.is_transient()
                        && started.elapsed() < self.spec.execution.partition_timeout =>
                {
                    if !told {
                        progress.phase(&format!(
                            "waiting for a statement of an earlier process on run {} to end (it holds a partition; up to execution.partition_timeout = {:?})",
                            run.run_id, self.spec.execution.partition_timeout
                        ));
                        told = true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// A task as the queue carries it: where its warehouse and control store are, and where
    /// its result goes.
    fn task_message(&self, task: PartitionTask) -> TaskMessage {
        TaskMessage {
            reply_to: results_queue_name(&task.run_id),
            task,
            warehouse: self.spec.warehouse.name.clone(),
            control_schema: self.spec.warehouse.control_schema.to_string(),
        }
    }

    /// The open run of this spec, or a new one with its shadow built; or, when the spec was
    /// already published, that outcome. Refuses to start while another spec's run is open.
    async fn find_or_create_run(
        &self,
        plan: &Plan,
        owner: &str,
        progress: &dyn Progress,
    ) -> Result<Result<RunRecord, RunOutcome>, BackfillError> {
        let hash = self.spec.hash();
        if let Some((open, changes)) = self.open_run_and_changes().await? {
            let listed = |lines: &[String]| {
                lines
                    .iter()
                    .take(10)
                    .map(|l| format!("\n  {l}"))
                    .collect::<String>()
            };
            if !changes.identity.is_empty() {
                return Err(BackfillError::Conflict(format!(
                    "run {} on {} is {} with spec {}, and this spec ({}) changes what it writes:{}\n\
                     A run in progress never takes such a change. Finish that run with its own spec \
                     (`backfill resume {}`), or abandon it (`backfill abandon {}`) and run this spec",
                    open.run_id,
                    self.target,
                    open.state.as_str(),
                    &open.spec_hash[..12],
                    &hash[..12],
                    listed(&changes.identity),
                    open.run_id,
                    open.run_id
                )));
            }
            if !changes.settings.is_empty() && !self.amend {
                return Err(BackfillError::Conflict(format!(
                    "run {} on {} is {} with spec {}; this spec ({}) writes the same rows with other settings:{}\n\
                     Run it again with --amend to carry on run {} with them (its done partitions are kept; \
                     an audited run is audited again), or resume it unchanged (`backfill resume {}`)",
                    open.run_id,
                    self.target,
                    open.state.as_str(),
                    &open.spec_hash[..12],
                    &hash[..12],
                    listed(&changes.settings),
                    open.run_id,
                    open.run_id
                )));
            }
            let open = if changes.settings.is_empty() {
                open
            } else {
                progress.phase(&format!(
                    "amending run {}:{}",
                    open.run_id,
                    listed(&changes.settings)
                ));
                self.store
                    .amend_run_spec(
                        &open,
                        &hash,
                        &self.spec.name,
                        &self.spec.canonical(),
                        &self.spec_text,
                        &changes.settings,
                    )
                    .await?
            };
            if open.state == RunState::AuditFailed && changes.settings.is_empty() {
                // The same spec again after failed audits: the source was fixed (a threshold
                // would come with --amend, audited again as it is). Audit a shadow that
                // reflects the fix, not the one that failed.
                progress.phase(&format!(
                    "run {} failed its audits; applying its partitions from the source again \
                     (only rows that changed are written), then auditing again",
                    open.run_id
                ));
                return Ok(Ok(self.store.reopen_audit_failed(&open).await?));
            }
            progress.phase(&format!(
                "resuming run {} ({})",
                open.run_id,
                open.state.as_str()
            ));
            return Ok(Ok(open));
        }
        let runs = self.store.runs_for_target(&self.target.to_string()).await?;
        if let Some(done) = runs
            .iter()
            .find(|r| r.state == RunState::Published && r.spec_hash == hash)
        {
            match self.window_changed_since(done, plan).await? {
                None => {
                    return Ok(Err(RunOutcome::AlreadyPublished {
                        run_id: done.run_id.clone(),
                    }));
                }
                Some(change) => progress.phase(&format!(
                    "run {} published this spec, but the window of {} no longer holds what it published ({change}): \
                     the table was re-created or written since; starting a new run",
                    done.run_id, self.target
                )),
            }
        }
        let run_id = new_run_id();
        let shadow = shadow_name(&self.target, &run_id)?;
        let now = now_text();
        let run = RunRecord {
            run_id: run_id.clone(),
            spec_hash: hash,
            spec_name: self.spec.name.clone(),
            target: self.target.to_string(),
            state: RunState::Running,
            tool_version: TOOL_VERSION.to_string(),
            owner: owner.to_string(),
            shadow_table: shadow.to_string(),
            archive_table: None,
            error: None,
            created_at: now.clone(),
            updated_at: now,
            published_at: None,
        };
        progress.phase(&format!(
            "run {run_id}: building shadow {shadow}{}",
            match plan.publish_mode {
                PublishMode::SwapWindow => " (the window only: the table keeps its other rows)",
                PublishMode::SwapPartitions =>
                    " (the window's partitions, their rows beside the window copied)",
                _ => " (copying the rows outside the window)",
            }
        ));
        // Run, partitions and shadow appear together or not at all. Where DDL commits (MySQL),
        // the shadow is built first and the run that names it recorded after: a crash in
        // between leaves a shadow no run names, never a run without its shadow.
        let shadow_span = || {
            tracing::info_span!(
                "backfill.shadow",
                shadow = %shadow,
                publish_mode = plan.publish_mode.as_str()
            )
        };
        // Only the DDL goes first: the copy and its checksum run in the run's transaction
        // (one consistent read of the target).
        let strategy = publish::strategy(plan.publish_mode);
        let request = publish::ShadowRequest {
            warehouse: &self.store.warehouse,
            spec: &self.spec,
            target: &self.target,
            shadow: &shadow,
            partitions: &plan.partitions,
        };
        let ddl_in_tx = self.store.engine().capabilities().transactional_ddl;
        let table_before = if ddl_in_tx {
            None
        } else {
            let mut conn = self.store.warehouse.acquire().await?;
            Some(
                strategy
                    .create_shadow(request, &mut conn)
                    .instrument(shadow_span())
                    .await?,
            )
        };
        let mut tx = self.store.warehouse.begin().await?;
        let inserted = self
            .store
            .insert_run(
                &mut tx,
                &run,
                &self.spec.canonical(),
                &self.spec_text,
                &plan.partitions,
                self.spec.partition.grain,
            )
            .await
            .map_err(|e| match &e {
                // The partial unique index on open runs: another process started one first.
                _ if e.is_unique_violation() => {
                    BackfillError::Conflict(format!(
                        "another backfill of {} started at the same moment; only one run per target may be open. See `backfill status`",
                        self.target
                    ))
                }
                _ => e,
            });
        if let Err(error) = inserted {
            drop(tx);
            if table_before.is_some() {
                let mut conn = self.store.warehouse.acquire().await?;
                execute(
                    &mut conn,
                    &format!("DROP TABLE IF EXISTS {}", shadow.quoted()),
                    &[],
                )
                .await?;
            }
            return Err(error);
        }
        let built = async {
            let table = match table_before {
                Some(table) => table,
                None => strategy.create_shadow(request, &mut tx).await?,
            };
            strategy.fill_shadow(request, &mut tx, table).await
        }
        .instrument(shadow_span())
        .await?;
        if let Some(outside) = built.outside {
            self.store
                .set_run_note(
                    &mut tx,
                    &run.run_id,
                    RunNote::OutsideChecksum,
                    &outside.to_string(),
                )
                .await?;
        }
        if !built.deferred_indexes.is_empty() {
            let json = serde_json::to_string(&built.deferred_indexes)
                .map_err(|e| BackfillError::Invalid(format!("deferred indexes: {e}")))?;
            self.store
                .set_run_note(&mut tx, &run.run_id, RunNote::DeferredIndexes, &json)
                .await?;
        }
        self.store
            .set_run_note(
                &mut tx,
                &run.run_id,
                RunNote::PublishMode,
                plan.publish_mode.as_str(),
            )
            .await?;
        tx.commit().await?;
        Ok(Ok(run))
    }
}

/// What every phase of one run is given, instead of the same arguments passed by hand: the
/// run, its partitions, its frozen publish mode, the hooks' context, where progress goes.
#[derive(Clone, Copy)]
struct RunContext<'a> {
    run: &'a RunRecord,
    partitions: &'a [Partition],
    mode: PublishMode,
    hooks: &'a HookContext,
    progress: &'a dyn Progress,
}

pub fn shadow_name(target: &TableName, run_id: &str) -> Result<TableName, BackfillError> {
    target.with_suffix(&format!("__bf_shadow_{run_id}")).map_err(|_| {
        BackfillError::Invalid(format!(
            "target.table: `{}` is too long to name its shadow and archive tables (at most 42 characters)",
            target.name
        ))
    })
}

/// The queue a run's results come back on (distributed mode).
pub fn results_queue_name(run_id: &str) -> String {
    format!("results.{run_id}")
}

/// The embedded queue delivers each task once: `run_partition` already retried it.
const EMBEDDED_DELIVERY_LIMIT: u32 = 1;

/// Eight hex characters: short enough to type in `backfill rollback <run>`.
/// The span of the wait for every partition to settle.
pub(crate) fn barrier_span(run_id: &str) -> tracing::Span {
    tracing::info_span!("backfill.barrier", run.id = %run_id)
}

pub fn new_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

async fn run_embedded_workers(
    ctx: Arc<PartitionContext>,
    queue: Arc<InMemoryQueue>,
    concurrency: u32,
    progress: &dyn Progress,
) -> Result<(), BackfillError> {
    let semaphore = Arc::new(InMemorySemaphore::new());
    let contexts = Arc::new(FixedContext(ctx));
    let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reports = Arc::new(reports);
    // Embedded workers stop when the queue is drained, never on a signal.
    let (_never_stop, stop) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        workers.push(tokio::spawn(consume(
            queue.clone(),
            semaphore.clone(),
            contexts.clone(),
            reports.clone(),
            EMBEDDED_DELIVERY_LIMIT,
            None,
            stop.clone(),
        )));
    }
    drop(reports);
    while let Some(report) = received.recv().await {
        if let PartitionOutcome::Failed { error, .. } = &report.outcome {
            tracing::error!(partition = %report.task.partition_key, %error, "partition failed");
        }
        progress.partition_finished(&report);
    }
    for worker in workers {
        worker
            .await
            .map_err(|e| BackfillError::Invalid(format!("worker task crashed: {e}")))??;
    }
    Ok(())
}
