//! `backfill-worker`: a stateless worker. Consumes partition tasks of the given warehouses
//! from RabbitMQ, takes a Redis semaphore lease per attempt, runs the partition in the
//! warehouse, reports the result. Scale it horizontally; kill it at any time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use backfill_common::broker::Broker;
use backfill_common::envelope::{Keyring, keyring_from_env};
use backfill_common::monitoring::{self, Readiness};
use backfill_common::queue::DEFAULT_DELIVERY_LIMIT;
use backfill_common::redis_semaphore::RedisSemaphore;
use backfill_common::spec::parse_duration;
use backfill_common::telemetry::{self, LogFormat};
use backfill_common::warehouse::redact_secrets;
use backfill_worker::consume;
use backfill_worker::distributed::{ResultPublisher, StoreContexts};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "backfill-worker",
    version,
    about = "Stateless backfill worker: runs partition tasks from RabbitMQ under a Redis concurrency limit",
    after_help = "Every setting can come from the environment. Warehouse URLs come from\n\
    BACKFILL_WAREHOUSE_<NAME>_URL or the config file; the message signing key from\n\
    BACKFILL_HMAC_KEY or BACKFILL_HMAC_KEY_FILE (the same as the coordinator's).\n\
    SIGTERM or SIGINT: stop taking tasks, finish the ones in hand, exit 0.\n\n\
    Traces go to an OTLP collector when OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_SERVICE_NAME,\n\
    OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf are honoured).\n\
    BACKFILL_LOG filters log lines (e.g. info,backfill_worker=debug)."
)]
struct Args {
    /// RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2f
    #[arg(long, env = "BACKFILL_BROKER_URL", hide_env_values = true)]
    broker: Option<String>,
    /// Redis URL for the per-warehouse semaphore, e.g. redis://host:6379
    #[arg(long, env = "BACKFILL_REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// Warehouses whose tasks this worker runs (repeat, or comma-separated)
    #[arg(
        long = "warehouse",
        env = "BACKFILL_WORKER_WAREHOUSES",
        value_delimiter = ',',
        required = true
    )]
    warehouses: Vec<String>,
    /// Partitions this worker runs at once, per warehouse
    #[arg(long, env = "BACKFILL_WORKER_SLOTS", default_value_t = 1)]
    slots: u16,
    /// Prefix of queue names and Redis keys (one per deployment)
    #[arg(long, env = "BACKFILL_QUEUE_PREFIX", default_value = "backfill")]
    queue_prefix: String,
    /// Deliveries of a task before it is dead-lettered
    #[arg(long, env = "BACKFILL_DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT)]
    delivery_limit: u32,
    /// How long a semaphore lease outlives a silent (dead) worker
    #[arg(long, env = "BACKFILL_LEASE_TTL", default_value = "30s")]
    lease_ttl: String,
    /// The broker's consumer_timeout: a task is held at most 90% of it (lease waits included;
    /// a task that never got a lease in time is handed back, uncounted, to the queue)
    #[arg(long, env = "BACKFILL_BROKER_CONSUMER_TIMEOUT", default_value = "30m")]
    broker_consumer_timeout: String,
    /// Name in logs, results and pg_stat_activity (default: backfill-worker-<pid>)
    #[arg(long, env = "BACKFILL_WORKER_ID")]
    worker_id: Option<String>,
    /// Config file with [warehouses.<name>] url = "…"
    #[arg(long, env = "BACKFILL_CONFIG")]
    config: Option<PathBuf>,
    /// Serve /livez, /readyz (ready while consuming) and /metrics on this address, e.g. 0.0.0.0:9464
    #[arg(long, env = "BACKFILL_WORKER_LISTEN")]
    listen: Option<String>,
    /// Log lines as text or as JSON objects (one per line)
    #[arg(long, env = "BACKFILL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() {
    let args = Args::parse();
    let runtime = telemetry::runtime_or_exit();
    let format: LogFormat = args.log_format.parse().unwrap_or_default();
    let telemetry = {
        let _context = runtime.enter();
        telemetry::init("backfill-worker", "info", format)
    };
    let result = runtime.block_on(run(args));
    if let Err(e) = &result {
        let message = redact_secrets(&format!("{e:#}"));
        match format {
            LogFormat::Json => tracing::error!(error = %message, "backfill-worker failed"),
            LogFormat::Text => eprintln!("error: {message}"),
        }
    }
    telemetry.shutdown();
    if result.is_err() {
        std::process::exit(1);
    }
}

/// A URL from its flag (or variable), else from the config file's `[<section>] url`.
fn required_url(
    flag: &Option<String>,
    section: &str,
    variable: &str,
    config: Option<&std::path::Path>,
) -> Result<String> {
    if let Some(url) = flag {
        return Ok(url.clone());
    }
    backfill_common::config::section_url(section, config)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("no {section} URL: pass --{section}, set {variable}, or give a config file with [{section}] url = \"…\""))
}

async fn run(mut args: Args) -> Result<()> {
    args.broker = Some(required_url(
        &args.broker,
        "broker",
        "BACKFILL_BROKER_URL",
        args.config.as_deref(),
    )?);
    args.redis = Some(required_url(
        &args.redis,
        "redis",
        "BACKFILL_REDIS_URL",
        args.config.as_deref(),
    )?);
    let worker_id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("backfill-worker-{}", std::process::id()));
    let keyring = keyring_from_env().map_err(|e| anyhow!(e))?;
    let lease_ttl = parse_duration(&args.lease_ttl).ok_or_else(|| {
        anyhow!(
            "--lease-ttl: `{}` is not a duration like 30s",
            args.lease_ttl
        )
    })?;
    delivery_budget(&args)?;
    let readiness = Readiness::default();
    if let Some(address) = &args.listen {
        let bound = monitoring::serve(address, monitoring::router(readiness.clone(), None))
            .await
            .context("starting the probe and metrics server")?;
        tracing::info!(%bound, "serving /livez, /readyz and /metrics");
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_shutdown_signal().await;
        tracing::info!("shutdown requested: finishing the tasks in hand");
        let _ = stop_sender.send(true);
    });

    let semaphore = Arc::new(
        RedisSemaphore::connect(
            args.redis.as_deref().unwrap_or_default(),
            &args.queue_prefix,
            lease_ttl,
            &worker_id,
        )
        .await
        .context("connecting to Redis")?,
    );
    let contexts = Arc::new(StoreContexts::new(
        args.config.clone(),
        &worker_id,
        u32::from(args.slots) + 2,
    ));
    // The broker may restart or drop connections: reconnect with backoff until told to stop.
    let mut delay = Duration::from_secs(1);
    loop {
        let connected_at = std::time::Instant::now();
        match serve(
            &args,
            &worker_id,
            &keyring,
            &semaphore,
            &contexts,
            &readiness,
            stop.clone(),
        )
        .await
        {
            Ok(()) => {
                tracing::info!("worker stopped cleanly");
                return Ok(());
            }
            Err(error) if *stop.borrow() => {
                tracing::warn!(error = %redact_secrets(&format!("{error:#}")), "stopping after an error during shutdown");
                return Ok(());
            }
            Err(error) => {
                if connected_at.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_secs(1);
                }
                tracing::warn!(error = %redact_secrets(&format!("{error:#}")), retry_in = ?delay, "lost the broker; reconnecting");
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// How long one delivery may be held: 90% of the broker's consumer timeout.
fn delivery_budget(args: &Args) -> Result<Duration> {
    let timeout = parse_duration(&args.broker_consumer_timeout).ok_or_else(|| {
        anyhow!(
            "--broker-consumer-timeout: `{}` is not a duration like 30m",
            args.broker_consumer_timeout
        )
    })?;
    Ok(timeout * 9 / 10)
}

/// One connection's worth of work: declare the topology, consume until stopped (Ok) or until
/// the broker goes away (Err).
async fn serve(
    args: &Args,
    worker_id: &str,
    keyring: &Keyring,
    semaphore: &Arc<RedisSemaphore>,
    contexts: &Arc<StoreContexts>,
    readiness: &Readiness,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let broker = Arc::new(
        Broker::connect(
            args.broker.as_deref().unwrap_or_default(),
            &args.queue_prefix,
            keyring.clone(),
            args.delivery_limit,
        )
        .await
        .context("connecting to RabbitMQ")?,
    );
    let reports = Arc::new(ResultPublisher {
        broker: broker.clone(),
        worker: worker_id.to_string(),
    });
    // Consumers of this connection stop together: on shutdown, or as soon as one of them
    // fails (a closed channel would otherwise leave this worker a slot short, silently).
    let (local_stop_sender, local_stop) = tokio::sync::watch::channel(false);
    let local_stop_sender = Arc::new(local_stop_sender);
    let forward_stop = {
        let (mut stop, sender) = (stop.clone(), local_stop_sender.clone());
        tokio::spawn(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
            let _ = sender.send(true);
        })
    };
    let budget = delivery_budget(args)?;
    let mut consumers = tokio::task::JoinSet::new();
    let mut queues = Vec::new();
    for warehouse in &args.warehouses {
        broker
            .declare_warehouse(warehouse)
            .await
            .with_context(|| format!("declaring the queues of warehouse `{warehouse}`"))?;
        for slot in 0..args.slots {
            // One channel per slot with prefetch 1: a worker never holds more tasks than it runs.
            let queue = Arc::new(
                broker
                    .task_queue(warehouse, 1, &format!("{worker_id}-{warehouse}-{slot}"))
                    .await?,
            );
            queues.push(queue.clone());
            consumers.spawn(consume(
                queue,
                semaphore.clone(),
                contexts.clone(),
                reports.clone(),
                args.delivery_limit,
                Some(budget),
                local_stop.clone(),
            ));
        }
    }
    tracing::info!(worker = %worker_id, warehouses = ?args.warehouses, slots = args.slots, "worker ready");
    readiness.set(true);
    let mut failure = None;
    while let Some(finished) = consumers.join_next().await {
        let error = match finished {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => anyhow!(e),
            Err(e) => anyhow!("a consumer crashed: {e}"),
        };
        // The others finish the task in hand, then the worker reconnects.
        readiness.set(false);
        let _ = local_stop_sender.send(true);
        failure.get_or_insert(error);
    }
    readiness.set(false);
    forward_stop.abort();
    for queue in queues {
        queue.close().await;
    }
    // let lease releases spawned on drop reach Redis
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.close().await;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
