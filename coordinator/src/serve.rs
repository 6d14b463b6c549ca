//! `backfill serve`: a long-running HTTP endpoint over the control store for dashboards and
//! probes. `/metrics` reads the runs' partition states, rows and audit verdicts from the
//! control store at each scrape (plus queue depths when a broker is given), so the numbers are
//! the store's, never a second bookkeeping; `/api/runs` and `/api/runs/{run}` return what
//! `backfill status --json` prints (`?dead_letters=true` adds the run's dead letters).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use backfill_common::broker::Broker;
use backfill_common::control::{ControlStore, RunRecord};
use backfill_common::monitoring::{self, Readiness, Refresh};
use backfill_common::warehouse::redact_secrets;
use tokio::sync::Mutex;

use crate::status;

/// Runs shown in the metrics: every open run plus the most recent closed ones (a gauge per
/// run and state; older runs would only grow the series count).
const RECENT_RUNS: usize = 20;

struct Shared {
    store: ControlStore,
    broker: Option<Broker>,
    /// warehouse name by spec hash (specs never change under a hash)
    warehouses: Mutex<HashMap<String, Option<String>>>,
}

/// Serves until the process is stopped. Returns the bound address once listening (through
/// the log), so `--listen 127.0.0.1:0` works for tests.
pub async fn serve(
    store: ControlStore,
    broker: Option<Broker>,
    listen: &str,
) -> Result<std::convert::Infallible, backfill_common::BackfillError> {
    let shared = Arc::new(Shared {
        store,
        broker,
        warehouses: Mutex::new(HashMap::new()),
    });
    let readiness = Readiness::default();
    let refresh: Refresh = {
        let shared = shared.clone();
        Arc::new(move || {
            let shared = shared.clone();
            Box::pin(async move { refresh_gauges(&shared).await })
        })
    };
    let api = axum::Router::new()
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{run}", get(run_status))
        .with_state(shared.clone());
    let router = monitoring::router(readiness.clone(), Some(refresh)).merge(api);
    let bound = monitoring::serve(listen, router).await?;
    // Always shown (not filtered by the log level): operators and tests read the port here.
    let message = format!(
        "backfill serve: listening on http://{bound} (/metrics, /api/runs, /livez, /readyz)"
    );
    match backfill_common::telemetry::log_format() {
        backfill_common::telemetry::LogFormat::Json => {
            eprintln!(
                "{}",
                serde_json::json!({ "level": "INFO", "message": message, "address": bound.to_string() })
            );
        }
        backfill_common::telemetry::LogFormat::Text => eprintln!("{message}"),
    }
    // Ready while the control store answers.
    loop {
        let reachable = shared.store.all_runs().await.is_ok();
        if reachable != readiness.is_ready() {
            tracing::info!(reachable, "control store reachability changed");
        }
        readiness.set(reachable);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn error_response(status: StatusCode, error: &dyn std::fmt::Display) -> Response {
    let body = serde_json::json!({ "error": redact_secrets(&error.to_string()) });
    (status, Json(body)).into_response()
}

async fn list_runs(State(shared): State<Arc<Shared>>) -> Response {
    match shared.store.all_runs().await {
        Ok(runs) => Json(runs).into_response(),
        Err(error) => error_response(StatusCode::SERVICE_UNAVAILABLE, &error),
    }
}

/// `?dead_letters=true` adds the run's dead letters (a sweep of the dead-letter queue: not for
/// every dashboard refresh).
#[derive(serde::Deserialize)]
struct StatusQuery {
    #[serde(default)]
    dead_letters: bool,
}

async fn run_status(
    State(shared): State<Arc<Shared>>,
    Path(run): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Response {
    match shared.store.find_run(&run).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error_response(StatusCode::NOT_FOUND, &format!("no run `{run}`"));
        }
        Err(error) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &error),
    }
    let broker = shared.broker.as_ref().filter(|_| query.dead_letters);
    match status::load_with_broker(&shared.store, &run, broker).await {
        Ok(status) => Json(status).into_response(),
        Err(error) => error_response(StatusCode::SERVICE_UNAVAILABLE, &error),
    }
}

/// The runs the gauges describe: open ones and the most recent others.
fn runs_to_show(mut runs: Vec<RunRecord>) -> Vec<RunRecord> {
    runs.sort_by(|a, b| b.created_at.cmp(&a.created_at));
    let mut shown = Vec::new();
    let mut closed = 0;
    for run in runs {
        if run.state.is_open() {
            shown.push(run);
        } else if closed < RECENT_RUNS {
            closed += 1;
            shown.push(run);
        }
    }
    shown
}

async fn refresh_gauges(shared: &Shared) {
    let Ok(runs) = shared.store.all_runs().await else {
        return;
    };
    let mut queue_warehouses = Vec::new();
    for run in runs_to_show(runs) {
        let Ok(status) = status::load(&shared.store, &run.run_id).await else {
            continue;
        };
        let labels = |extra: (&'static str, String)| {
            vec![
                ("run", run.run_id.clone()),
                ("target", run.target.clone()),
                extra,
            ]
        };
        let c = &status.counts;
        for (state, count) in [
            ("pending", c.pending),
            ("running", c.running),
            ("retrying", c.retrying),
            ("done", c.done),
            ("failed", c.failed),
        ] {
            metrics::gauge!(
                monitoring::RUN_PARTITIONS,
                &labels(("state", state.to_string()))
            )
            .set(count as f64);
        }
        let r = &status.rows;
        for (kind, rows) in [
            ("inserted", r.inserted),
            ("updated", r.updated),
            ("deleted", r.deleted),
            ("unchanged", r.unchanged),
        ] {
            metrics::gauge!(monitoring::RUN_ROWS, &labels(("kind", kind.to_string())))
                .set(rows as f64);
        }
        for verdict in ["pass", "warn", "fail"] {
            let count = status
                .audits
                .iter()
                .filter(|a| a.verdict == verdict)
                .count();
            metrics::gauge!(
                monitoring::RUN_AUDITS,
                &labels(("verdict", verdict.to_string()))
            )
            .set(count as f64);
        }
        if run.state.is_open()
            && let Some(warehouse) = warehouse_of(shared, &run.spec_hash).await
            && !queue_warehouses.contains(&warehouse)
        {
            queue_warehouses.push(warehouse);
        }
    }
    if let Some(broker) = &shared.broker {
        for warehouse in queue_warehouses {
            for (queue, name) in [
                ("tasks", broker.topology.task_queue(&warehouse)),
                ("dead", broker.topology.dead_queue(&warehouse)),
            ] {
                if let Ok(depth) = broker.queue_depth(&name).await {
                    metrics::gauge!(monitoring::QUEUE_DEPTH, "warehouse" => warehouse.clone(), "queue" => queue)
                        .set(f64::from(depth));
                }
            }
        }
    }
}

async fn warehouse_of(shared: &Shared, spec_hash: &str) -> Option<String> {
    let mut known = shared.warehouses.lock().await;
    if let Some(name) = known.get(spec_hash) {
        return name.clone();
    }
    let name = status::run_warehouse(&shared.store, spec_hash)
        .await
        .ok()
        .flatten();
    known.insert(spec_hash.to_string(), name.clone());
    name
}
