//! The distributed worker's two collaborators: contexts loaded from the control store by spec
//! hash (never from the message), and results published to the run's result queue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use backfill_common::broker::Broker;
use backfill_common::config;
use backfill_common::control::{ControlStore, RunState};
use backfill_common::envelope::{Rejection, ResultKind, ResultMessage, TaskMessage, excerpt};
use backfill_common::ident::Ident;
use backfill_common::spec::Spec;
use backfill_common::warehouse::Warehouse;
use backfill_common::{BackfillError, Retry};
use tokio::sync::Mutex;

use crate::context::{PartitionContext, shadow_facts, source_sql};
use crate::execute::{ContextError, ContextSource, PartitionOutcome, PartitionReport, ReportSink};

/// Loads and caches one context per (run, spec hash), and one pool per warehouse.
pub struct StoreContexts {
    config: Option<PathBuf>,
    application_name: String,
    max_connections: u32,
    warehouses: Mutex<HashMap<String, Warehouse>>,
    contexts: Mutex<HashMap<(String, String), Arc<PartitionContext>>>,
}

impl StoreContexts {
    pub fn new(
        config: Option<PathBuf>,
        application_name: &str,
        max_connections: u32,
    ) -> StoreContexts {
        StoreContexts {
            config,
            application_name: application_name.to_string(),
            max_connections,
            warehouses: Mutex::new(HashMap::new()),
            contexts: Mutex::new(HashMap::new()),
        }
    }

    async fn warehouse(&self, name: &str) -> Result<Warehouse, ContextError> {
        let mut warehouses = self.warehouses.lock().await;
        if let Some(warehouse) = warehouses.get(name) {
            return Ok(warehouse.clone());
        }
        let url = config::warehouse_url(name, self.config.as_deref()).map_err(|e| {
            ContextError::Reject(Rejection::Permanent(format!(
                "this worker cannot serve the task: {e}"
            )))
        })?;
        let url = config::with_application_name(&url, &self.application_name);
        let warehouse = Warehouse::connect(&url, self.max_connections)
            .await
            .map_err(ContextError::Unavailable)?;
        warehouses.insert(name.to_string(), warehouse.clone());
        Ok(warehouse)
    }

    async fn load(&self, message: &TaskMessage) -> Result<Arc<PartitionContext>, ContextError> {
        let task = &message.task;
        let reject = |text: String| ContextError::Reject(Rejection::UnknownRun(text));
        let unavailable = ContextError::Unavailable;
        let schema = Ident::new(&message.control_schema).map_err(|e| {
            ContextError::Reject(Rejection::Permanent(format!(
                "control schema `{}` is not a valid identifier: {}",
                excerpt(&message.control_schema),
                e.reason
            )))
        })?;
        let warehouse = self.warehouse(&message.warehouse).await?;
        let store = ControlStore::new(warehouse.clone(), schema);
        let run = store
            .find_run(&task.run_id)
            .await
            .map_err(|e| match e.retry() {
                Retry::Transient => unavailable(e),
                // e.g. the control tables do not exist in this warehouse
                Retry::Permanent => reject(format!(
                    "cannot read run {} from the control store: {e}",
                    excerpt(&task.run_id)
                )),
            })?
            .ok_or_else(|| {
                reject(format!(
                    "run {} is unknown to the control store of warehouse `{}`",
                    excerpt(&task.run_id),
                    message.warehouse
                ))
            })?;
        if run.spec_hash != task.spec_hash {
            if store
                .spec_amended_from(&run.run_id, &task.spec_hash)
                .await
                .map_err(unavailable)?
            {
                return Err(ContextError::Superseded(format!(
                    "run {} was amended from spec {} to {}",
                    run.run_id, task.spec_hash, run.spec_hash
                )));
            }
            return Err(reject(format!(
                "run {} is pinned to spec {}, the task names spec {}",
                run.run_id,
                run.spec_hash,
                excerpt(&task.spec_hash)
            )));
        }
        if run.state == RunState::Abandoned {
            return Err(reject(format!("run {} was abandoned", run.run_id)));
        }
        let text = store
            .spec_source(&task.spec_hash)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| {
                reject(format!(
                    "spec {} is not in the control store",
                    task.spec_hash
                ))
            })?;
        let spec = Spec::parse(&text).map_err(|e| {
            reject(format!(
                "stored spec {} no longer parses: {e}",
                task.spec_hash
            ))
        })?;
        if spec.hash() != task.spec_hash {
            return Err(reject(format!(
                "stored spec text hashes to {}, not {}: this worker's version canonicalises specs differently",
                spec.hash(),
                task.spec_hash
            )));
        }
        let columns = warehouse
            .describe_columns(&source_sql(&spec, warehouse.engine())?)
            .await
            .map_err(|e| match e.retry() {
                Retry::Transient => unavailable(e),
                Retry::Permanent => ContextError::Reject(Rejection::Permanent(format!(
                    "describing the source query: {e}"
                ))),
            })?;
        let facts = shadow_facts(&store, &spec, &run).await?;
        let ctx = PartitionContext::new(store, &spec, &run, &columns, facts)
            .map_err(|e| ContextError::Reject(Rejection::Permanent(e.to_string())))?;
        Ok(Arc::new(ctx))
    }
}

impl From<BackfillError> for ContextError {
    fn from(error: BackfillError) -> Self {
        match error.retry() {
            Retry::Transient => ContextError::Unavailable(error),
            Retry::Permanent => ContextError::Reject(Rejection::Permanent(error.to_string())),
        }
    }
}

impl ContextSource for StoreContexts {
    async fn context(&self, message: &TaskMessage) -> Result<Arc<PartitionContext>, ContextError> {
        let key = (message.task.run_id.clone(), message.task.spec_hash.clone());
        if let Some(ctx) = self.contexts.lock().await.get(&key) {
            return Ok(ctx.clone());
        }
        let ctx = self.load(message).await?;
        self.contexts.lock().await.insert(key, ctx.clone());
        Ok(ctx)
    }
}

/// Publishes each outcome to the run's result queue. A lost result is harmless: the
/// coordinator reconciles from the control store.
pub struct ResultPublisher {
    pub broker: Arc<Broker>,
    pub worker: String,
}

impl ReportSink for ResultPublisher {
    async fn report(&self, report: PartitionReport) {
        let (kind, error) = match &report.outcome {
            PartitionOutcome::Done { .. } => (ResultKind::Done, None),
            PartitionOutcome::Stale => (ResultKind::Stale, None),
            PartitionOutcome::Failed { error, .. } => (ResultKind::Failed, Some(error.clone())),
            // Nothing happened; the task is back in the queue.
            PartitionOutcome::HandedBack => return,
        };
        let queue = self.broker.topology.results_queue(&report.task.run_id);
        let message = ResultMessage {
            task: report.task,
            kind,
            error,
            worker: self.worker.clone(),
        };
        if let Err(error) = self.broker.publish_result(&queue, &message).await {
            tracing::warn!(%error, %queue, "could not publish a result; the coordinator will reconcile from the control store");
        }
    }
}
