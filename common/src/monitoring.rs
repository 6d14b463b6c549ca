//! Prometheus metrics and the small HTTP server both binaries expose for probes and scrapes:
//! `GET /livez` (the process answers), `GET /readyz` (it can do its job: connected to the
//! broker, or to the control store), `GET /metrics` (Prometheus text format).
//!
//! Metric names live here, one constant each, so the worker, the coordinator and the tests
//! agree on them. Labels are low-cardinality: warehouse, outcome, reason, kind; `run` only on
//! the per-run gauges `backfill serve` computes from the control store.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Partition tasks this process settled, by `warehouse` and `outcome`: done, stale, failed
/// (dead-lettered), requeued (a transient failure handed back for a later delivery),
/// handed_back (stopping before it started), rejected.
pub const PARTITIONS: &str = "backfill_partitions_total";
/// Wall time of a task from its delivery to its checkpoint (lease waits and retries included),
/// by `warehouse`.
pub const PARTITION_SECONDS: &str = "backfill_partition_duration_seconds";
/// Rows written into shadows, by `warehouse` and `kind` (inserted, updated, deleted).
pub const ROWS_WRITTEN: &str = "backfill_rows_written_total";
/// Time spent waiting for a semaphore lease, by `warehouse`.
pub const SEMAPHORE_WAIT_SECONDS: &str = "backfill_semaphore_wait_seconds";
/// Leases this process holds now, by `warehouse`.
pub const SEMAPHORE_HOLDERS: &str = "backfill_semaphore_holders";
/// Attempts retried after a transient error, by `warehouse`.
pub const RETRIES: &str = "backfill_retries_total";
/// Tasks this process dead-lettered, by `warehouse` and `reason`.
pub const DEAD_LETTERS: &str = "backfill_dead_letters_total";
/// Tasks handed back to the queue (transient failure, warehouse unreachable), by `warehouse`.
pub const REQUEUED: &str = "backfill_tasks_requeued_total";
/// Partitions of a run by `state`, from the control store (`backfill serve`), with `run` and
/// `target`.
pub const RUN_PARTITIONS: &str = "backfill_run_partitions";
/// Rows a run wrote by `kind`, from the control store (`backfill serve`).
pub const RUN_ROWS: &str = "backfill_run_rows";
/// Audit checks of a run by `verdict`, from the control store (`backfill serve`).
pub const RUN_AUDITS: &str = "backfill_run_audits";
/// Messages in a warehouse's `tasks` or `dead` queue (`backfill serve` with a broker).
pub const QUEUE_DEPTH: &str = "backfill_queue_depth";

/// How long a gauge nobody sets stays exported.
const GAUGE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Histogram buckets for durations, in seconds: from a fast empty partition to the longest
/// allowed one.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// The process's Prometheus recorder, installed on first use. Later calls return the same
/// handle (tests run several workers in one process).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Gauges not set for a while (runs no longer shown by `serve`, queues of
            // warehouses without open runs) disappear instead of freezing at a stale value.
            let recorder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder already installed (a test harness): metrics go there instead.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(PARTITIONS, "Partition tasks settled, by outcome");
    describe_histogram!(
        PARTITION_SECONDS,
        Unit::Seconds,
        "Wall time of a task from delivery to checkpoint, lease waits and retries included"
    );
    describe_counter!(ROWS_WRITTEN, "Rows written into shadow tables, by kind");
    describe_histogram!(
        SEMAPHORE_WAIT_SECONDS,
        Unit::Seconds,
        "Time spent waiting for a warehouse semaphore lease"
    );
    describe_gauge!(SEMAPHORE_HOLDERS, "Semaphore leases held by this process");
    describe_counter!(
        RETRIES,
        "Partition attempts retried after a transient error"
    );
    describe_counter!(DEAD_LETTERS, "Tasks dead-lettered, by reason");
    describe_counter!(REQUEUED, "Tasks handed back to the queue");
    describe_gauge!(RUN_PARTITIONS, "Partitions of a run, by state");
    describe_gauge!(RUN_ROWS, "Rows written by a run, by kind");
    describe_gauge!(RUN_AUDITS, "Audit checks of a run, by verdict");
    describe_gauge!(
        QUEUE_DEPTH,
        "Messages waiting in a warehouse's task or dead-letter queue"
    );
}

/// Readiness shared between the component that knows (the consume loop, the control-store
/// probe) and the `/readyz` handler.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs before `/metrics` renders: `backfill serve` reads gauges from the control store here.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Endpoints {
    prometheus: PrometheusHandle,
    readiness: Readiness,
    refresh: Option<Refresh>,
}

/// The probe and metrics routes; merge more routes into it.
pub fn router(readiness: Readiness, refresh: Option<Refresh>) -> Router {
    let endpoints = Endpoints {
        prometheus: prometheus(),
        readiness,
        refresh,
    };
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(endpoints)
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    if endpoints.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    if let Some(refresh) = &endpoints.refresh {
        refresh().await;
    }
    endpoints.prometheus.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        endpoints.prometheus.render(),
    )
}

/// Binds `address` (e.g. `0.0.0.0:9464`, or port 0 for any free port) and serves `router`
/// in the background until the process ends. Returns the bound address.
pub async fn serve(
    address: &str,
    router: Router,
) -> Result<std::net::SocketAddr, crate::BackfillError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| crate::BackfillError::Invalid(format!("cannot listen on {address}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| crate::BackfillError::Invalid(format!("cannot listen on {address}: {e}")))?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the HTTP server stopped");
        }
    });
    Ok(bound)
}
