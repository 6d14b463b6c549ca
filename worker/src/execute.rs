//! One partition, end to end: lease, transaction, claim, merge, checks, checkpoint; and the
//! consume loop that feeds tasks from a queue through it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_common::control::{MergeCounts, PartitionState, PartitionTask};
use backfill_common::envelope::{Rejection, TaskMessage};
use backfill_common::monitoring;
use backfill_common::queue::{Delivery, TaskQueue};
use backfill_common::semaphore::Semaphore;
use backfill_common::telemetry;
use backfill_common::warehouse::{Bind, Session, execute, fetch_one, get};
use backfill_common::{BackfillError, Retry};
use backon::{BackoffBuilder, ExponentialBuilder};
use tracing::Instrument as _;

use crate::context::PartitionContext;

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum PartitionOutcome {
    /// Applied and checkpointed by this call.
    Done {
        counts: MergeCounts,
        rows_after: i64,
    },
    /// The partition was already done or the task's fencing token is no longer current:
    /// nothing was written.
    Stale,
    /// A permanent error, or transient errors past the retry budget.
    Failed { error: String, retry: Retry },
    /// The task never ran: the worker is stopping, or the delivery's time budget ran out,
    /// while it waited for its first lease. It goes back to the queue for another worker
    /// without counting a delivery. Stopping or running out of time after a failed attempt
    /// reports that failure instead.
    HandedBack,
}

/// What a worker reports to the coordinator's barrier.
#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub task: PartitionTask,
    pub outcome: PartitionOutcome,
}

/// Runs one task with retries: each attempt holds a semaphore lease and one transaction;
/// between attempts the lease is released while backing off.
pub async fn run_partition<S: Semaphore>(
    ctx: &PartitionContext,
    semaphore: &S,
    task: PartitionTask,
) -> PartitionReport {
    run_partition_until(ctx, semaphore, task, None, None).await
}

/// `run_partition` that stops waiting when `stop` turns true: a stopping worker never holds
/// a delivery for an unbounded wait (an attempt already running is finished). Stopped while
/// waiting for its first lease, the task is handed back (it never ran); stopped while backing
/// off after a failed attempt, that failure is the outcome.
///
/// With a `deadline` (the broker's consumer timeout for the delivery, less a margin), a lease
/// is waited for only as long as an attempt can still finish before it; a backoff that would
/// leave no time for the next attempt is not slept. Out of time, the outcome is the same as
/// stopping: a task that never ran is handed back, one whose attempt failed reports that
/// failure. The broker therefore never closes the channel over a delivery held too long.
pub async fn run_partition_until<S: Semaphore>(
    ctx: &PartitionContext,
    semaphore: &S,
    mut task: PartitionTask,
    stop: Option<&tokio::sync::watch::Receiver<bool>>,
    deadline: Option<Instant>,
) -> PartitionReport {
    if task.run_id != ctx.run_id || task.spec_hash != ctx.spec_hash {
        let error = format!(
            "task for run {} spec {} does not belong to run {} spec {}",
            task.run_id, task.spec_hash, ctx.run_id, ctx.spec_hash
        );
        return PartitionReport {
            task,
            outcome: PartitionOutcome::Failed {
                error,
                retry: Retry::Permanent,
            },
        };
    }
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(ctx.backoff_initial)
        .with_max_delay(ctx.backoff_max)
        .with_max_times(ctx.retries as usize)
        .with_jitter()
        .build();
    let warehouse = ctx.warehouse_name.clone();
    // Once an attempt has failed, stopping is that failure (the delivery counts), not a
    // hand-back of a task that never ran.
    let mut last_error: Option<String> = None;
    let stopped_outcome = |last_error: &Option<String>| match last_error {
        Some(error) => PartitionOutcome::Failed {
            error: error.clone(),
            retry: Retry::Transient,
        },
        None => PartitionOutcome::HandedBack,
    };
    loop {
        let result = {
            let waiting = Instant::now();
            let acquire = semaphore
                .acquire(&ctx.warehouse_name, ctx.concurrency)
                .instrument(tracing::info_span!(
                    "backfill.semaphore_wait",
                    warehouse = %ctx.warehouse_name,
                    limit = ctx.concurrency
                ));
            // How long a lease may be waited for: the time left, less one whole attempt.
            let wait_limit = deadline.map(|deadline| {
                deadline
                    .saturating_duration_since(Instant::now())
                    .saturating_sub(ctx.timeout)
            });
            let lease = tokio::select! {
                lease = acquire => lease,
                () = stopped(stop) => {
                    return PartitionReport { task, outcome: stopped_outcome(&last_error) };
                }
                () = sleep_at_most(wait_limit) => {
                    tracing::info!(
                        partition = %task.partition_key,
                        waited = ?waiting.elapsed(),
                        "no lease in time for an attempt within the delivery's time budget (the broker's consumer timeout)"
                    );
                    return PartitionReport { task, outcome: stopped_outcome(&last_error) };
                }
            };
            metrics::histogram!(monitoring::SEMAPHORE_WAIT_SECONDS, "warehouse" => warehouse.clone())
                .record(waiting.elapsed().as_secs_f64());
            match lease {
                Ok(lease) => {
                    let holders = metrics::gauge!(monitoring::SEMAPHORE_HOLDERS, "warehouse" => warehouse.clone());
                    holders.increment(1.0);
                    let result = attempt_with_timeout(ctx, &task, &lease).await;
                    holders.decrement(1.0);
                    result
                }
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(outcome) => return PartitionReport { task, outcome },
            Err(error) => {
                let message = error.to_string();
                let retry = error.retry();
                let next = if retry == Retry::Transient {
                    delays.next()
                } else {
                    None
                };
                // Out of retries on a transient error, the task goes back to the queue (or to
                // the dead-letter queue if this was its last delivery: `consume` decides).
                let state = if retry == Retry::Transient {
                    PartitionState::Retrying
                } else {
                    PartitionState::Failed
                };
                tracing::warn!(partition = %task.partition_key, attempt = task.attempt, ?retry, error = %message, "partition attempt failed");
                if let Err(record_error) = ctx
                    .store
                    .record_partition_error(&task, state, &message)
                    .await
                {
                    tracing::warn!(partition = %task.partition_key, error = %record_error, "could not record the partition error");
                }
                match next {
                    Some(delay)
                        if deadline.is_some_and(|deadline| {
                            Instant::now() + delay + ctx.timeout > deadline
                        }) =>
                    {
                        // No time left in this delivery for the backoff and another attempt:
                        // give it up now (the queue counts it and delivers it again).
                        return PartitionReport {
                            task,
                            outcome: PartitionOutcome::Failed {
                                error: message,
                                retry,
                            },
                        };
                    }
                    Some(delay) => {
                        metrics::counter!(monitoring::RETRIES, "warehouse" => warehouse.clone())
                            .increment(1);
                        last_error = Some(message);
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = stopped(stop) => {
                                return PartitionReport { task, outcome: stopped_outcome(&last_error) };
                            }
                        }
                        task.attempt += 1;
                    }
                    None => {
                        return PartitionReport {
                            task,
                            outcome: PartitionOutcome::Failed {
                                error: message,
                                retry,
                            },
                        };
                    }
                }
            }
        }
    }
}

/// Resolves once `stop` is true; never without a stop signal.
async fn stopped(stop: Option<&tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(stop) => {
            let mut stop = stop.clone();
            if stop.wait_for(|stopped| *stopped).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// The client-side bound: a little longer than the server's statement timeout, so the
/// server's own error normally arrives first and the connection stays usable.
async fn attempt_with_timeout(
    ctx: &PartitionContext,
    task: &PartitionTask,
    lease: &backfill_common::semaphore::Lease,
) -> Result<PartitionOutcome, BackfillError> {
    let client_timeout = ctx.timeout + Duration::from_secs(2);
    let backend = std::sync::atomic::AtomicI64::new(0);
    let work = attempt(ctx, task, &backend);
    tokio::pin!(work);
    let abandoned = tokio::select! {
        result = &mut work => return result,
        _ = tokio::time::sleep(client_timeout) => BackfillError::Timeout {
            partition: task.partition_key.clone(),
            seconds: client_timeout.as_secs_f64(),
        },
        // Losing the lease mid-attempt (it expired in Redis) stops the attempt: its
        // transaction rolls back and the task is retried under a new lease, so the limit
        // holds.
        _ = lease.lost() => BackfillError::Semaphore(format!(
            "the semaphore lease for warehouse {} was lost during partition {}; the attempt was rolled back",
            ctx.warehouse_name, task.partition_key
        )),
    };
    // The abandoned statement would otherwise keep running on the server (and keep the
    // warehouse busy) until its statement timeout: cancel it while this attempt still holds
    // its connection, so the cancel cannot hit a later user of that connection.
    let pid = backend.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0
        && let Ok(mut conn) = ctx.store.warehouse.acquire().await
    {
        let _ = ctx.store.engine().cancel_session(&mut conn, pid).await;
    }
    // `work` (and with it the transaction, rolled back) is dropped on return, after the cancel.
    Err(abandoned)
}

/// One attempt in one transaction. Dropping the transaction on any error rolls it back, so
/// the shadow and the checkpoint move together or not at all.
async fn attempt(
    ctx: &PartitionContext,
    task: &PartitionTask,
    backend: &std::sync::atomic::AtomicI64,
) -> Result<PartitionOutcome, BackfillError> {
    let started = Instant::now();
    let mut tx = ctx.store.warehouse.begin().await?;
    // The timeouts come first: the claim waits for the partition's row lock, which a
    // statement of a killed process may hold for minutes. Unbounded, it ran into the
    // client-side timeout, which cannot cancel a statement whose backend it does not know.
    if let Some(id) = ctx
        .store
        .engine()
        .begin_partition(&mut tx, ctx.timeout)
        .await?
    {
        backend.store(id, std::sync::atomic::Ordering::SeqCst);
    }
    let claimed = ctx
        .store
        .claim_partition(&mut tx, task)
        .instrument(tracing::info_span!(
            "backfill.claim",
            fencing_token = task.fencing_token
        ))
        .await?;
    let Some(times_applied) = claimed else {
        tx.rollback().await?;
        return Ok(PartitionOutcome::Stale);
    };
    let bounds = [
        Bind::Text(task.range_start.clone()),
        Bind::Text(task.range_end.clone()),
    ];
    let merge_span = tracing::info_span!(
        "backfill.merge",
        first_application = times_applied == 0,
        rows.inserted = tracing::field::Empty,
        rows.updated = tracing::field::Empty,
        rows.deleted = tracing::field::Empty,
        rows.unchanged = tracing::field::Empty,
    );
    let (counts, rows_after, checksum) =
        if times_applied == 0 && ctx.store.engine().capabilities().data_modifying_cte {
            fast_insert_checked(ctx, &mut tx, task, &bounds)
                .instrument(merge_span.clone())
                .await?
        } else {
            let (counts, rows_after) = if times_applied == 0 {
                fast_insert(ctx, &mut tx, task, &bounds)
                    .instrument(merge_span.clone())
                    .await?
            } else {
                merge(ctx, &mut tx, task, &bounds)
                    .instrument(merge_span.clone())
                    .await?
            };
            let checksum = ctx
                .store
                .warehouse
                .checksum_by(
                    &mut tx,
                    &ctx.shadow,
                    Some(&ctx.partition_filter),
                    &bounds,
                    ctx.row_hash,
                )
                .instrument(tracing::info_span!("backfill.checksum"))
                .await
                .map_err(|e| e.context(format!("checksumming partition {}", task.partition_key)))?;
            (counts, rows_after, checksum.to_string())
        };
    record_counts(&merge_span, &counts);
    async {
        ctx.store
            .checkpoint_partition(
                &mut tx,
                task,
                counts,
                rows_after,
                &checksum,
                started.elapsed().as_secs_f64(),
            )
            .await?;
        tx.commit().await
    }
    .instrument(tracing::info_span!("backfill.checkpoint", rows_after))
    .await?;
    // Logged once committed: a checkpoint rolled back with its attempt is no state change.
    backfill_common::control::log_state_change(
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
    );
    Ok(PartitionOutcome::Done { counts, rows_after })
}

/// First application on PostgreSQL: one statement inserts the deduplicated source and reports
/// on exactly the rows it inserted (how many, how many outside the partition, how many with a
/// NULL key, their checksum). The partition is known to be empty: the shadow was built
/// without the window, and the fenced claim says it was never applied.
async fn fast_insert_checked(
    ctx: &PartitionContext,
    tx: &mut dyn Session,
    task: &PartitionTask,
    bounds: &[Bind],
) -> Result<(MergeCounts, i64, String), BackfillError> {
    let row = fetch_one(tx, &ctx.fast_insert_sql, bounds)
        .await
        .map_err(|e| {
            explain_constraint(e, task)
                .context(format!("inserting partition {}", task.partition_key))
        })?;
    let (inserted, outside, null_keys, digest, duplicates): (i64, i64, i64, String, i64) = (
        get(&row, 0)?,
        get(&row, 1)?,
        get(&row, 2)?,
        get(&row, 3)?,
        get(&row, 4)?,
    );
    check_source_rows(task, outside, null_keys)?;
    if duplicates > 0 {
        return Err(check_failed(
            task,
            format!(
                "the source returned the same key twice ({duplicates} duplicate row(s) in this partition): \
                 set source.dedupe_order_by to keep one row per key"
            ),
        ));
    }
    let counts = MergeCounts {
        inserted,
        ..MergeCounts::default()
    };
    Ok((
        counts,
        inserted,
        format!("{inserted}:{}", ctx.row_hash.digest(digest)),
    ))
}

/// First application: the shadow was built without the window's partitions, so this one is
/// empty and the deduplicated source goes in with a plain INSERT. The row count afterwards
/// proves it: it must equal what was inserted (more means the partition was not empty, fewer
/// means the source returned rows outside the partition).
async fn fast_insert(
    ctx: &PartitionContext,
    tx: &mut dyn Session,
    task: &PartitionTask,
    bounds: &[Bind],
) -> Result<(MergeCounts, i64), BackfillError> {
    let inserted = execute(tx, &ctx.fast_insert_sql, bounds)
        .await
        .map_err(|e| {
            explain_constraint(e, task)
                .context(format!("inserting partition {}", task.partition_key))
        })? as i64;
    let row = fetch_one(tx, &ctx.partition_rows_sql, bounds).await?;
    let (rows, null_keys): (i64, i64) = (get(&row, 0)?, get(&row, 1)?);
    check_source_rows(task, (inserted - rows).max(0), null_keys)?;
    if rows > inserted {
        return Err(check_failed(
            task,
            format!(
                "the shadow already held {} row(s) in this partition before its first application",
                rows - inserted
            ),
        ));
    }
    Ok((
        MergeCounts {
            inserted,
            ..MergeCounts::default()
        },
        rows,
    ))
}

/// Re-application: the partition may hold rows, so merge. Materialise the deduplicated
/// source once, check it, then update only changed rows, insert new keys, delete keys that
/// vanished from the source.
async fn merge(
    ctx: &PartitionContext,
    tx: &mut dyn Session,
    task: &PartitionTask,
    bounds: &[Bind],
) -> Result<(MergeCounts, i64), BackfillError> {
    let sql = &ctx.merge;
    if let Some(drop) = &sql.drop_source {
        // Left by an attempt that failed on this session (MySQL keeps temporary tables
        // through a rollback).
        execute(tx, drop, &[]).await?;
    }
    execute(tx, &sql.create_source, bounds).await.map_err(|e| {
        e.context(format!(
            "reading the source for partition {}",
            task.partition_key
        ))
    })?;
    let row = fetch_one(tx, &sql.source_checks, bounds).await?;
    let (source_rows, outside, null_keys): (i64, i64, i64) =
        (get(&row, 0)?, get(&row, 1)?, get(&row, 2)?);
    check_source_rows(task, outside, null_keys)?;
    let row = fetch_one(tx, &sql.count_new, bounds).await?;
    let inserted: i64 = get(&row, 0)?;
    let mut affected = 0;
    for statement in &sql.merge {
        affected += execute(tx, statement, bounds).await.map_err(|e| {
            explain_constraint(e, task).context(format!("merging partition {}", task.partition_key))
        })? as i64;
    }
    let deleted = execute(tx, &sql.delete_vanished, bounds).await? as i64;
    if let Some(drop) = &sql.drop_source {
        execute(tx, drop, &[]).await?;
    }
    let row = fetch_one(tx, &ctx.partition_rows_sql, bounds).await?;
    let rows_after: i64 = get(&row, 0)?;
    if rows_after != source_rows {
        return Err(check_failed(
            task,
            format!(
                "after the merge the partition holds {rows_after} rows but the source has {source_rows}; a key of this partition collides with a row outside it"
            ),
        ));
    }
    Ok((
        MergeCounts {
            inserted,
            updated: affected - inserted,
            deleted,
            unchanged: source_rows - affected,
        },
        rows_after,
    ))
}

/// The partition checks on what the source produced: every row inside the partition, no
/// NULL key column.
fn check_source_rows(
    task: &PartitionTask,
    outside: i64,
    null_keys: i64,
) -> Result<(), BackfillError> {
    let span = tracing::info_span!("backfill.checks", rows_outside = outside, null_keys);
    let _entered = span.enter();
    if outside > 0 {
        return Err(check_failed(
            task,
            format!(
                "the source query returned {outside} row(s) outside [{}, {}); it must filter on :partition_start and :partition_end",
                task.range_start, task.range_end
            ),
        ));
    }
    if null_keys > 0 {
        return Err(check_failed(
            task,
            format!("{null_keys} source row(s) have a NULL key column"),
        ));
    }
    Ok(())
}

fn check_failed(task: &PartitionTask, message: String) -> BackfillError {
    BackfillError::PartitionCheck {
        partition: task.partition_key.clone(),
        message,
    }
}

/// A unique violation while writing a partition means the source has duplicate keys: say how
/// to fix it instead of only quoting the constraint.
fn explain_constraint(error: BackfillError, task: &PartitionTask) -> BackfillError {
    if let BackfillError::Warehouse { message, .. } = &error
        && error.is_unique_violation()
    {
        return check_failed(
            task,
            format!(
                "a key of this partition already exists in the shadow ({message}): either the source returned the same key twice \
                 (set source.dedupe_order_by to keep one row per key) or the key belongs to a row of another partition \
                 (a row moved between partitions: include both partitions in the window)"
            ),
        );
    }
    error
}

/// Where a worker gets the context of a task's run: fixed in the embedded mode, loaded from
/// the control store by spec hash in the distributed mode. A task that cannot be placed is
/// rejected with a reason.
pub trait ContextSource: Send + Sync + 'static {
    fn context(
        &self,
        message: &TaskMessage,
    ) -> impl Future<Output = Result<Arc<PartitionContext>, ContextError>> + Send;
}

/// Why a task has no context.
#[derive(Debug)]
pub enum ContextError {
    /// The task can never run here (unknown run, spec mismatch, …): dead-letter it.
    Reject(Rejection),
    /// Not now (the warehouse is unreachable): hand the task back.
    Unavailable(BackfillError),
    /// The task was issued under a spec its run has since been amended from; the amendment
    /// issued the partition again, so this task is stale: ack it.
    Superseded(String),
}

/// Where a worker reports outcomes: the embedded barrier's channel, or the run's result queue.
pub trait ReportSink: Send + Sync + 'static {
    fn report(&self, report: PartitionReport) -> impl Future<Output = ()> + Send;
}

/// The embedded mode's context: one run, known up front.
pub struct FixedContext(pub Arc<PartitionContext>);

impl ContextSource for FixedContext {
    async fn context(&self, message: &TaskMessage) -> Result<Arc<PartitionContext>, ContextError> {
        if message.task.run_id == self.0.run_id && message.task.spec_hash == self.0.spec_hash {
            Ok(self.0.clone())
        } else {
            Err(ContextError::Reject(Rejection::UnknownRun(format!(
                "task for run {} spec {} does not belong to run {}",
                message.task.run_id, message.task.spec_hash, self.0.run_id
            ))))
        }
    }
}

impl ReportSink for tokio::sync::mpsc::UnboundedSender<PartitionReport> {
    async fn report(&self, report: PartitionReport) {
        let _ = self.send(report);
    }
}

/// Consumes tasks until the queue is closed and drained or `stop` turns true (then the task
/// in hand is finished first). Each delivery is settled after its outcome is durable:
/// - done or stale: ack;
/// - permanent failure: dead-letter with the database's message;
/// - transient failure past the retry budget: back to the queue, or, on its last allowed
///   delivery, dead-letter (the partition is then recorded as failed).
pub async fn consume<Q: TaskQueue, S: Semaphore, C: ContextSource, R: ReportSink>(
    queue: Arc<Q>,
    semaphore: Arc<S>,
    contexts: Arc<C>,
    reports: Arc<R>,
    delivery_limit: u32,
    delivery_budget: Option<Duration>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), BackfillError> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let delivery = tokio::select! {
            delivery = queue.receive() => delivery?,
            _ = stop.changed() => continue,
        };
        let Some(delivery) = delivery else {
            return Ok(());
        };
        let span = partition_span(&delivery);
        handle_delivery(
            delivery,
            semaphore.as_ref(),
            contexts.as_ref(),
            reports.as_ref(),
            delivery_limit,
            delivery_budget.map(|budget| Instant::now() + budget),
            &stop,
        )
        .instrument(span)
        .await?;
    }
}

/// The span of one delivery: a child of the span that published the task (the run's, on the
/// coordinator), so one trace shows the whole backfill across processes.
fn partition_span(delivery: &Delivery) -> tracing::Span {
    let task = &delivery.message.task;
    let span = tracing::info_span!(
        "backfill.partition",
        otel.kind = "consumer",
        run.id = %task.run_id,
        partition = %task.partition_key,
        warehouse = %delivery.message.warehouse,
        attempt = task.attempt,
        fencing_token = task.fencing_token,
        delivery = delivery.delivery_count,
        outcome = tracing::field::Empty,
        rows.inserted = tracing::field::Empty,
        rows.updated = tracing::field::Empty,
        rows.deleted = tracing::field::Empty,
        rows.unchanged = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, &delivery.trace_context);
    span
}

/// Sleeps for `limit`, or forever without one.
async fn sleep_at_most(limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
}

/// Runs one delivery and settles it once its outcome is durable.
async fn handle_delivery<S: Semaphore, C: ContextSource, R: ReportSink>(
    delivery: Delivery,
    semaphore: &S,
    contexts: &C,
    reports: &R,
    delivery_limit: u32,
    deadline: Option<Instant>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<(), BackfillError> {
    let span = tracing::Span::current();
    let warehouse = delivery.message.warehouse.clone();
    let ctx = match contexts.context(&delivery.message).await {
        Ok(ctx) => ctx,
        Err(ContextError::Reject(rejection)) => {
            tracing::warn!(reason = rejection.as_str(), %rejection, "task rejected");
            span.record("outcome", "rejected");
            metrics::counter!(monitoring::PARTITIONS, "warehouse" => warehouse.clone(), "outcome" => "rejected")
                .increment(1);
            telemetry::record_error(&span, &rejection.to_string());
            count_dead_letter(&warehouse, rejection.as_str());
            return delivery
                .dead_letter(rejection.as_str(), rejection.to_string())
                .await;
        }
        Err(ContextError::Superseded(why)) => {
            tracing::info!(%why, "task superseded by an amended spec; acked as stale");
            span.record("outcome", "stale");
            metrics::counter!(monitoring::PARTITIONS, "warehouse" => warehouse.clone(), "outcome" => "stale")
                .increment(1);
            reports
                .report(PartitionReport {
                    task: delivery.message.task.clone(),
                    outcome: PartitionOutcome::Stale,
                })
                .await;
            return delivery.ack().await;
        }
        Err(ContextError::Unavailable(error)) => {
            // The task never ran: an outage of its warehouse is not a failed delivery, so a
            // long outage ends with the backfill carrying on, not in dead letters.
            tracing::warn!(%error, "cannot reach the task's warehouse; handing the task back");
            span.record("outcome", "requeued");
            metrics::counter!(monitoring::REQUEUED, "warehouse" => warehouse).increment(1);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            return delivery.hand_back().await;
        }
    };
    let started = Instant::now();
    let report = run_partition_until(
        &ctx,
        semaphore,
        delivery.message.task.clone(),
        Some(stop),
        deadline,
    )
    .await;
    let requeued = matches!(
        report.outcome,
        PartitionOutcome::Failed {
            retry: Retry::Transient,
            ..
        }
    ) && delivery.delivery_count < delivery_limit;
    record_outcome(
        &span,
        &warehouse,
        &report.outcome,
        requeued,
        started.elapsed(),
    );
    match &report.outcome {
        PartitionOutcome::HandedBack => {
            if *stop.borrow() {
                tracing::info!(partition = %report.task.partition_key, "stopping: task handed back before it started");
            } else {
                tracing::info!(partition = %report.task.partition_key, "task handed back before it started: another worker may get a lease sooner");
                // Not straight back into the queue's hands: a worker whose budget leaves no
                // room for waiting would otherwise spin on the same tasks.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            delivery.hand_back().await
        }
        PartitionOutcome::Done { .. } | PartitionOutcome::Stale => {
            reports.report(report).await;
            delivery.ack().await
        }
        PartitionOutcome::Failed {
            error,
            retry: Retry::Permanent,
        } => {
            let error = error.clone();
            reports.report(report).await;
            count_dead_letter(&warehouse, "permanent_error");
            delivery.dead_letter("permanent_error", error).await
        }
        PartitionOutcome::Failed {
            error,
            retry: Retry::Transient,
        } => {
            if delivery.delivery_count >= delivery_limit {
                let error = format!(
                    "gave up after {} deliveries: {error}",
                    delivery.delivery_count
                );
                if let Err(record) = ctx
                    .store
                    .record_partition_error(&report.task, PartitionState::Failed, &error)
                    .await
                {
                    tracing::warn!(error = %record, "could not record the partition failure");
                }
                reports.report(report).await;
                count_dead_letter(&warehouse, "retries_exhausted");
                delivery.dead_letter("retries_exhausted", error).await
            } else {
                metrics::counter!(monitoring::REQUEUED, "warehouse" => warehouse).increment(1);
                delivery.nack(true).await
            }
        }
    }
}

/// Outcome metrics and span attributes of one finished task.
fn record_outcome(
    span: &tracing::Span,
    warehouse: &str,
    outcome: &PartitionOutcome,
    requeued: bool,
    elapsed: Duration,
) {
    let name = match outcome {
        PartitionOutcome::Done { counts, .. } => {
            record_counts(span, counts);
            metrics::histogram!(monitoring::PARTITION_SECONDS, "warehouse" => warehouse.to_string())
                .record(elapsed.as_secs_f64());
            for (kind, rows) in [
                ("inserted", counts.inserted),
                ("updated", counts.updated),
                ("deleted", counts.deleted),
            ] {
                metrics::counter!(monitoring::ROWS_WRITTEN, "warehouse" => warehouse.to_string(), "kind" => kind)
                    .increment(rows.max(0) as u64);
            }
            "done"
        }
        PartitionOutcome::Stale => "stale",
        PartitionOutcome::HandedBack => "handed_back",
        PartitionOutcome::Failed { error, .. } => {
            telemetry::record_error(span, error);
            if requeued { "requeued" } else { "failed" }
        }
    };
    span.record("outcome", name);
    metrics::counter!(monitoring::PARTITIONS, "warehouse" => warehouse.to_string(), "outcome" => name)
        .increment(1);
}

fn record_counts(span: &tracing::Span, counts: &MergeCounts) {
    span.record("rows.inserted", counts.inserted);
    span.record("rows.updated", counts.updated);
    span.record("rows.deleted", counts.deleted);
    span.record("rows.unchanged", counts.unchanged);
}

fn count_dead_letter(warehouse: &str, reason: &'static str) {
    metrics::counter!(monitoring::DEAD_LETTERS, "warehouse" => warehouse.to_string(), "reason" => reason)
        .increment(1);
}
