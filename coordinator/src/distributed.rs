//! The coordinator's side of distributed execution: publish one task per partition to the
//! warehouse's queue, then hold the barrier. Results arrive as messages, but the control store
//! decides: every few seconds the coordinator reconciles from it, so a lost result never hangs
//! the run, and a restarted coordinator picks up where the last one was. Dead letters of the
//! run's current tasks count as failed partitions, so a task the broker gave up on does not
//! hang the run either.

use std::collections::HashSet;
use std::time::Duration;

use backfill_common::BackfillError;
use backfill_common::broker::{Broker, ResultStream};
use backfill_common::control::{ControlStore, PartitionState, RunRecord};
use backfill_common::envelope::{Keyring, ResultKind, TaskMessage};
use backfill_common::spec::Spec;
use backfill_worker::{PartitionOutcome, PartitionReport};
use tracing::Instrument as _;

use crate::runner::Progress;

/// RabbitMQ's default consumer timeout (30 minutes) on the broker this project targets.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Debug)]
pub struct DistributedOptions {
    pub broker_url: String,
    pub queue_prefix: String,
    pub keyring: Keyring,
    pub delivery_limit: u32,
    /// The broker's consumer timeout: a task held longer is taken back by the broker.
    pub consumer_timeout: Duration,
    /// How often the barrier reconciles from the control store.
    pub reconcile_every: Duration,
}

impl DistributedOptions {
    /// A worker holds a task unacked for at most its attempts and backoffs; that must stay
    /// well under the broker's consumer timeout, or the broker redelivers tasks that are
    /// still running.
    pub fn check_timeouts(&self, spec: &Spec) -> Result<(), BackfillError> {
        let execution = &spec.execution;
        let attempts = execution.retries + 1;
        let worst =
            execution.partition_timeout * attempts + execution.backoff_max * execution.retries;
        if worst * 10 > self.consumer_timeout * 9 {
            return Err(BackfillError::Invalid(format!(
                "a task may be held {:?} ({} attempts of execution.partition_timeout {:?} plus backoff), which is not safely under the broker's consumer timeout of {:?}; \
                 lower execution.partition_timeout or execution.retries, or raise the broker's consumer_timeout and pass --broker-consumer-timeout",
                worst, attempts, execution.partition_timeout, self.consumer_timeout
            )));
        }
        Ok(())
    }
}

/// Publishes the tasks and waits until every partition of the run is done or has failed for
/// good.
///
/// The first connection must succeed (a wrong URL or a broker that is down is reported at
/// once). From then on, losing the broker at any step (publishing, waiting for confirms,
/// holding the barrier) means reconnecting with backoff and carrying on: the tasks not yet
/// confirmed are published again, and when the broker came back without the run's result
/// queue, it lost its state (restarted without its database), so the current task of every
/// partition not settled yet is published again. The same fencing tokens travel, so a copy
/// that survived somewhere is a duplicate that applies at most once.
pub async fn run_partitions(
    store: &ControlStore,
    run: &RunRecord,
    tasks: Vec<TaskMessage>,
    options: &DistributedOptions,
    progress: &dyn Progress,
) -> Result<(), BackfillError> {
    let mut broker = connect(options).await?;
    let warehouse = match tasks.first() {
        Some(task) => task.warehouse.clone(),
        None => {
            // Everything was done before this coordinator came: only the result queue a
            // previous coordinator may have left behind remains to clean up.
            let _ = broker
                .delete_queue(&broker.topology.results_queue(&run.run_id))
                .await;
            broker.close().await;
            return Ok(());
        }
    };
    let mut unconfirmed: Vec<&TaskMessage> = tasks.iter().collect();
    let mut unreported: HashSet<String> =
        tasks.iter().map(|t| t.task.partition_key.clone()).collect();
    let mut reconnected = false;
    let mut reconnect_delay = Duration::from_secs(1);
    loop {
        let session = async {
            if reconnected {
                let results_queue = broker.topology.results_queue(&run.run_id);
                if !broker.queue_exists(&results_queue).await? {
                    let settled = settled_partitions(store, run).await?;
                    let lost: Vec<&TaskMessage> = tasks
                        .iter()
                        .filter(|t| !settled.contains(&t.task.partition_key))
                        .collect();
                    progress.phase(&format!(
                        "the broker lost the run's queues (restarted without its data?); publishing the {} unsettled task(s) again",
                        lost.len()
                    ));
                    unconfirmed = lost;
                }
            }
            broker.declare_warehouse(&warehouse).await?;
            let results = broker.results(&run.run_id).await?;
            let republishing = reconnected && !unconfirmed.is_empty();
            let count = unconfirmed.len();
            while let Some(task) = unconfirmed.first() {
                broker.publish_task(task).await?;
                unconfirmed.remove(0);
            }
            if !reconnected {
                progress.phase(&format!(
                    "published {} task(s) to {}; waiting for workers",
                    tasks.len(),
                    broker.topology.task_queue(&warehouse)
                ));
            } else if republishing {
                progress.phase(&format!("published {count} task(s) again"));
            }
            hold_barrier(
                store,
                run,
                &warehouse,
                &broker,
                results,
                &mut unreported,
                options,
                progress,
            )
                .instrument(crate::runner::barrier_span(&run.run_id))
                .await
        }
        .await;
        match session {
            Ok(()) => break,
            // The broker went away (restart, dropped connection): the control store still
            // knows everything; reconnect and carry on.
            Err(BackfillError::Queue(error)) => {
                progress.phase(&format!(
                    "lost the broker ({error}); reconnecting in {reconnect_delay:?}"
                ));
                broker.close().await;
                loop {
                    tokio::time::sleep(reconnect_delay).await;
                    reconnect_delay = (reconnect_delay * 2).min(MAX_RECONNECT_DELAY);
                    match connect(options).await {
                        Ok(fresh) => {
                            broker = fresh;
                            reconnect_delay = Duration::from_secs(1);
                            break;
                        }
                        Err(BackfillError::Queue(_)) => {}
                        Err(error) => return Err(error),
                    }
                }
                reconnected = true;
            }
            Err(error) => return Err(error),
        }
    }
    let _ = broker
        .delete_queue(&broker.topology.results_queue(&run.run_id))
        .await;
    broker.close().await;
    Ok(())
}

/// The longest wait between two attempts to reach a broker that went away.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(8);

async fn connect(options: &DistributedOptions) -> Result<Broker, BackfillError> {
    Broker::connect(
        &options.broker_url,
        &options.queue_prefix,
        options.keyring.clone(),
        options.delivery_limit,
    )
    .await
}

/// Partitions of the run that are done or failed for good.
async fn settled_partitions(
    store: &ControlStore,
    run: &RunRecord,
) -> Result<HashSet<String>, BackfillError> {
    Ok(store
        .partitions(&run.run_id)
        .await?
        .into_iter()
        .filter(|p| matches!(p.state, PartitionState::Done | PartitionState::Failed))
        .map(|p| p.partition_key)
        .collect())
}

/// Waits for every partition to settle, counting results as they come. Returns a queue error
/// as soon as the broker goes away (the caller reconnects). `unreported` are the partitions
/// whose tasks this coordinator published and that no result has reported on yet.
///
/// Results are hints, the control store decides; reading it costs a scan of the run's
/// partitions (and of the dead-letter queue), so it is read on the reconcile tick and once
/// every published partition has reported, not after each result (which made a run of N
/// partitions read N² partition rows).
#[allow(clippy::too_many_arguments)]
async fn hold_barrier(
    store: &ControlStore,
    run: &RunRecord,
    warehouse: &str,
    broker: &Broker,
    mut results: ResultStream,
    unreported: &mut HashSet<String>,
    options: &DistributedOptions,
    progress: &dyn Progress,
) -> Result<(), BackfillError> {
    let mut ticker = tokio::time::interval(options.reconcile_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // `recv` is cancel-safe: when the tick wins, no result is lost.
            delivery = results.recv() => {
                let Some(result) = results.open(delivery?).await? else {
                    continue;
                };
                if result.task.run_id != run.run_id {
                    continue;
                }
                    let outcome = match result.kind {
                        ResultKind::Done => Some(PartitionOutcome::Done { counts: Default::default(), rows_after: 0 }),
                        ResultKind::Stale => None,
                        ResultKind::Failed | ResultKind::DeadLettered => Some(PartitionOutcome::Failed {
                            error: result.error.unwrap_or_default(),
                            retry: backfill_common::Retry::Permanent,
                        }),
                    };
                let Some(outcome) = outcome else {
                    continue;
                };
                unreported.remove(&result.task.partition_key);
                progress.partition_finished(&PartitionReport { task: result.task, outcome });
                if !unreported.is_empty() {
                    continue;
                }
            }
            _ = ticker.tick() => {}
        }
        if barrier_reached(store, broker, run, warehouse).await? {
            return Ok(());
        }
    }
}

/// True once no partition can still change: each is done, or failed (recorded by a worker
/// that dead-lettered its task, or found here in the dead-letter queue when the broker
/// dead-lettered it after too many deliveries).
async fn barrier_reached(
    store: &ControlStore,
    broker: &Broker,
    run: &RunRecord,
    warehouse: &str,
) -> Result<bool, BackfillError> {
    let partitions = store.partitions(&run.run_id).await?;
    // Workers record a partition as failed before they dead-letter its task, so the control
    // store alone settles done and failed partitions.
    let unsettled: Vec<_> = partitions
        .iter()
        .filter(|p| !matches!(p.state, PartitionState::Done | PartitionState::Failed))
        .collect();
    if unsettled.is_empty() {
        return Ok(true);
    }
    // Only the broker's own dead-lettering (e.g. delivery limit after worker crashes) is not
    // in the store: look for the unsettled partitions' current tasks in the dead-letter queue.
    let dead = broker.dead_letters(warehouse, 10_000).await?;
    let mut open = 0;
    for partition in unsettled {
        let letter = dead.iter().find(|d| {
            d.message.as_ref().is_some_and(|m| {
                m.task.run_id == run.run_id
                    && m.task.partition_key == partition.partition_key
                    && m.task.fencing_token == partition.fencing_token
            })
        });
        match letter.and_then(|l| l.message.as_ref().map(|m| (l, m))) {
            Some((letter, message)) => {
                let error = format!("dead-lettered ({}): {}", letter.reason, letter.detail);
                match store
                    .record_partition_error(&message.task, PartitionState::Failed, &error)
                    .await
                {
                    Ok(()) => {}
                    // The partition's row may still be locked by a statement of a killed
                    // worker (until its statement timeout): record it on a later tick.
                    Err(error) if error.retry() == backfill_common::Retry::Transient => {
                        tracing::info!(partition = %partition.partition_key, %error, "dead letter not recorded yet; retrying");
                        open += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
            None => open += 1,
        }
    }
    Ok(open == 0)
}
