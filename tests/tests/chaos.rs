//! Chaos: the reference workload, scaled down, run by a coordinator and 3 workers while a
//! driver, at random moments chosen by a seed, SIGKILLs and restarts workers, SIGKILLs the
//! coordinator and carries the run on (`run` again or `resume`), closes every broker
//! connection, restarts the RabbitMQ application, stops and restarts the whole RabbitMQ node
//! (durable queues survive) or restarts it with its database wiped (every queue and message
//! lost), and kills and restarts Redis (every semaphore lease lost). Afterwards the run must
//! have completed (or been carried to completion: `resubmit --dead-lettered` if the broker
//! gave up on a task), with the reference result: checksum equal to the expected table, no
//! duplicate key, every partition checkpointed exactly once, the concurrency limit never
//! exceeded (Redis's recorded peak, read before each Redis restart, and active partition
//! writes sampled in pg_stat_activity), no task left in the queue or unacked, no dead letter,
//! no panic.
//!
//! The test runs its own RabbitMQ node and Redis server (`backfill_tests::services`) on free
//! ports, so breaking them disturbs no other test: it runs in the normal suite, in parallel.
//!
//! Each seed is printed; `BACKFILL_CHAOS_SEED=<seed>` replays that fault schedule (process
//! timing still varies), `BACKFILL_CHAOS_RUNS=<n>` runs n random seeds (default 2).

use std::fs::File;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use backfill_common::control::{PartitionState, RunState};
use backfill_common::redis_semaphore::RedisSemaphore;
use backfill_common::warehouse::Warehouse;
use backfill_tests::cluster::Cluster;
use backfill_tests::services::{PrivateBroker, PrivateRedis};
use backfill_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WAREHOUSE: &str = "bench";
const CONCURRENCY: i64 = 2;
const WORKERS: usize = 3;
/// Days of data; the window is the first PARTITIONS of them.
const DAYS: u32 = 40;
const PER_DAY: u32 = 150;
const PARTITIONS: usize = 30;
const WORKER_KILLS: u32 = 6;
const COORDINATOR_KILLS: u32 = 2;
const CONNECTION_CLOSES: u32 = 2;
const REDIS_RESTARTS: u32 = 2;
/// Broker restarts of any kind (application, node, node wiped): each costs seconds.
const BROKER_RESTARTS: u32 = 2;
/// Faults are injected during this long at most; then the run is left to finish.
const FAULT_WINDOW: Duration = Duration::from_secs(30);
/// A hang guard: the whole seed, faults and recovery (a node restart alone takes up to 20 s
/// on a loaded machine), must end within this.
const SEED_DEADLINE: Duration = Duration::from_secs(150);

fn spec() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/reference_workload.toml"
    ))
    .unwrap();
    let replacements = [
        ("last = \"2024-03-30\"", "last = \"2024-01-30\""),
        (
            "FROM staging.orders\n",
            "FROM staging.orders CROSS JOIN (SELECT pg_sleep(0.25)) AS slow\n",
        ),
        (
            "partition_timeout = \"5m\"\nretries = 3",
            "partition_timeout = \"10s\"\nretries = 3\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"",
        ),
    ];
    replacements.iter().fold(text, |text, (from, to)| {
        assert!(text.contains(from), "the reference spec has no `{from}`");
        text.replace(from, to)
    })
}

/// The table a correct run publishes: the window recomputed with the discount, the other
/// days as they were.
async fn build_expected_table(warehouse: &Warehouse) {
    exec(
        warehouse,
        "CREATE TABLE chaos_expected AS SELECT order_id, order_date, customer_id, sku, quantity, \
         CAST(CASE WHEN order_date < DATE '2024-01-31' THEN round(quantity * unit_price * (1 - discount), 2) \
         ELSE round(quantity * unit_price, 2) END AS numeric(14,2)) AS revenue FROM staging.orders",
    )
    .await;
}

/// Where a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillWorker,
    KillCoordinator,
    /// `rabbitmqctl close_all_connections`
    CloseBrokerConnections,
    /// `rabbitmqctl stop_app` + `start_app`: connections drop, queues stay.
    RestartBrokerApp,
    /// The node stops and starts again from its database: durable queues stay.
    RestartBrokerNode,
    /// The node stops and starts again with its database deleted: every queue is lost.
    WipeBroker,
    /// redis-server SIGKILLed and started again without persistence: every lease is lost.
    RestartRedis,
}

#[derive(Debug, Default)]
struct Figures {
    worker_kills: u32,
    coordinator_kills: u32,
    connection_closes: u32,
    broker_app_restarts: u32,
    broker_node_restarts: u32,
    broker_wipes: u32,
    redis_restarts: u32,
    coordinators_started: u32,
    resubmits: u32,
    workers_started: u32,
}

impl Figures {
    fn broker_restarts(&self) -> u32 {
        self.broker_app_restarts + self.broker_node_restarts + self.broker_wipes
    }
}

/// One seed's run: the cluster, the coordinator in flight, the schedule's random source.
struct Chaos<'s> {
    seed: u64,
    rng: StdRng,
    broker: &'s mut PrivateBroker,
    redis: &'s mut PrivateRedis,
    /// Highest Redis peak read before Redis restarts (a restart loses the recorded peak).
    redis_peak: u64,
    cluster: Cluster,
    spec_path: String,
    logs: tempfile::TempDir,
    coordinator: Option<Child>,
    coordinator_logs: Vec<std::path::PathBuf>,
    unexpected_exits: Vec<String>,
    figures: Figures,
}

impl Chaos<'_> {
    fn live_workers(&mut self) -> Vec<usize> {
        (0..self.cluster.workers.len())
            .filter(|&i| self.cluster.workers[i].try_wait().ok().flatten().is_none())
            .collect()
    }

    fn keep_workers_up(&mut self) {
        for _ in self.live_workers().len()..WORKERS {
            self.cluster.start_worker(&[]);
            self.figures.workers_started += 1;
        }
    }

    /// Starts a coordinator: the first `run`, then `run` again or `resume` (chosen by the
    /// seed), or `resubmit --dead-lettered` after partitions were given up on.
    fn start_coordinator(&mut self, run_id: Option<&str>, after_failed_partitions: bool) {
        let mut args: Vec<String> = match (run_id, after_failed_partitions) {
            (Some(run), true) => {
                self.figures.resubmits += 1;
                vec!["resubmit".into(), run.into(), "--dead-lettered".into()]
            }
            (Some(run), false) if self.rng.random_bool(0.5) => vec!["resume".into(), run.into()],
            _ => vec!["run".into(), self.spec_path.clone()],
        };
        args.extend([
            "--no-progress".into(),
            "--warehouse".into(),
            WAREHOUSE.into(),
        ]);
        let log_path = self
            .logs
            .path()
            .join(format!("coordinator-{}.log", self.coordinator_logs.len()));
        let log = File::create(&log_path).unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .cluster
            .backfill(&args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.coordinator_logs.push(log_path);
        self.coordinator = Some(child);
        self.figures.coordinators_started += 1;
    }

    fn last_coordinator_log(&self) -> String {
        self.coordinator_logs
            .last()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    fn choose_fault(&mut self) -> Option<Fault> {
        let mut choices = Vec::new();
        if self.figures.worker_kills < WORKER_KILLS {
            choices.extend([Fault::KillWorker; 3]);
        }
        if self.figures.coordinator_kills < COORDINATOR_KILLS && self.coordinator.is_some() {
            choices.push(Fault::KillCoordinator);
        }
        if self.figures.connection_closes < CONNECTION_CLOSES {
            choices.push(Fault::CloseBrokerConnections);
        }
        if self.figures.redis_restarts < REDIS_RESTARTS {
            choices.push(Fault::RestartRedis);
        }
        if self.figures.broker_restarts() < BROKER_RESTARTS {
            choices.push(Fault::RestartBrokerApp);
            // A node restart costs several seconds: at most one per seed, kept or wiped.
            if self.figures.broker_node_restarts + self.figures.broker_wipes == 0 {
                choices.extend([Fault::RestartBrokerNode, Fault::WipeBroker]);
            }
        }
        if choices.is_empty() || self.rng.random_bool(0.25) {
            return None;
        }
        Some(choices[self.rng.random_range(0..choices.len())])
    }

    fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::KillWorker => {
                let live = self.live_workers();
                if let Some(&index) = live.get(self.rng.random_range(0..live.len().max(1))) {
                    self.cluster.kill(index);
                    self.figures.worker_kills += 1;
                }
            }
            Fault::KillCoordinator => {
                if let Some(mut coordinator) = self.coordinator.take() {
                    let _ = coordinator.kill();
                    let _ = coordinator.wait();
                    self.figures.coordinator_kills += 1;
                }
            }
            // The services are stopped and started by blocking commands (seconds each): keep
            // the runtime's other thread for the pg_stat_activity sampler.
            Fault::CloseBrokerConnections => {
                tokio::task::block_in_place(|| self.broker.close_connections());
                self.figures.connection_closes += 1;
            }
            Fault::RestartBrokerApp => {
                tokio::task::block_in_place(|| self.broker.restart_app());
                self.figures.broker_app_restarts += 1;
            }
            Fault::RestartBrokerNode => {
                tokio::task::block_in_place(|| self.broker.restart_node(false));
                self.figures.broker_node_restarts += 1;
            }
            Fault::WipeBroker => {
                tokio::task::block_in_place(|| self.broker.restart_node(true));
                self.figures.broker_wipes += 1;
            }
            Fault::RestartRedis => {
                self.redis_peak = self.redis_peak.max(self.read_redis_peak());
                tokio::task::block_in_place(|| self.redis.restart());
                self.figures.redis_restarts += 1;
            }
        }
    }

    /// The semaphore's recorded peak in the private Redis (since its last restart).
    fn read_redis_peak(&self) -> u64 {
        let url = self.redis.url();
        let prefix = self.cluster.prefix.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                RedisSemaphore::connect(&url, &prefix, Duration::from_secs(3), "probe")
                    .await
                    .unwrap()
                    .peak_holders(WAREHOUSE)
                    .await
                    .unwrap()
            })
        })
    }
}

/// Samples pg_stat_activity until stopped; returns the most partition writes seen at once.
fn sample_active_writes(
    warehouse: Warehouse,
    prefix: String,
    stop: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<(i64, u32)> {
    tokio::spawn(async move {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{prefix}-worker-%' \
             AND state = 'active' AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%'"
        );
        let (mut peak, mut samples) = (0, 0);
        while stop.load(Ordering::SeqCst) == 0 {
            if let Ok(mut conn) = warehouse.acquire().await
                && let Ok(row) = backfill_common::warehouse::fetch_one(&mut conn, &sql, &[]).await
            {
                peak = peak.max(backfill_common::warehouse::get::<i64>(&row, 0).unwrap_or(0));
                samples += 1;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        (peak, samples)
    })
}

async fn chaos_run(seed: u64, broker: &mut PrivateBroker, redis: &mut PrivateRedis) {
    println!("chaos: seed {seed} (replay with BACKFILL_CHAOS_SEED={seed})");
    let started = Instant::now();
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    load_reference_workload(&warehouse, DAYS, PER_DAY).await;
    build_expected_table(&warehouse).await;
    let expected = reference_content(&warehouse, "chaos_expected").await;
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("reference.toml");
    std::fs::write(&spec_path, spec()).unwrap();
    let cluster = Cluster::with_services(WAREHOUSE, &db.url, &broker.url(), &redis.url());
    let mut chaos = Chaos {
        seed,
        rng: StdRng::seed_from_u64(seed),
        broker,
        redis,
        redis_peak: 0,
        cluster,
        spec_path: spec_path.to_str().unwrap().to_string(),
        logs: tempfile::tempdir().unwrap(),
        coordinator: None,
        coordinator_logs: Vec::new(),
        unexpected_exits: Vec::new(),
        figures: Figures::default(),
    };
    let stop_sampling = Arc::new(AtomicI64::new(0));
    let sampler = sample_active_writes(
        warehouse.clone(),
        chaos.cluster.prefix.clone(),
        stop_sampling.clone(),
    );
    chaos.keep_workers_up();
    chaos.start_coordinator(None, false);
    let store = control_store(&warehouse);

    let published_run = loop {
        assert!(
            started.elapsed() < SEED_DEADLINE,
            "seed {seed}: the run did not complete within {SEED_DEADLINE:?} ({:?})\nlast coordinator:\n{}",
            chaos.figures,
            chaos.last_coordinator_log()
        );
        let pause = chaos.rng.random_range(200..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let run = store
            .all_runs()
            .await
            .ok()
            .and_then(|runs| runs.into_iter().next());
        // The coordinator's fate since the last tick.
        let mut failed_partitions = false;
        if let Some(coordinator) = chaos.coordinator.as_mut()
            && let Some(status) = coordinator.try_wait().unwrap()
        {
            chaos.coordinator = None;
            match status.code() {
                Some(0) => {
                    if let Some(run) = &run
                        && run.state == RunState::Published
                    {
                        break run.clone();
                    }
                }
                Some(4) => failed_partitions = true,
                other => chaos
                    .unexpected_exits
                    .push(format!("exit {other:?}:\n{}", chaos.last_coordinator_log())),
            }
        }
        if started.elapsed() < FAULT_WINDOW
            && run.as_ref().is_none_or(|r| r.state != RunState::Published)
            && let Some(fault) = chaos.choose_fault()
        {
            chaos.inject(fault);
        }
        chaos.keep_workers_up();
        if chaos.coordinator.is_none() {
            let run_id = run.map(|r| r.run_id);
            chaos.start_coordinator(run_id.as_deref(), failed_partitions);
        }
    };
    let run_id = published_run.run_id.clone();

    // Leftover tasks of killed coordinators drain as stale; then the workers stop cleanly.
    let broker = chaos.cluster.broker().await;
    let task_queue = broker.topology.task_queue(WAREHOUSE);
    let draining = Instant::now();
    while broker.queue_depth(&task_queue).await.unwrap() > 0 {
        assert!(
            draining.elapsed() < Duration::from_secs(20),
            "seed {seed}: stale tasks did not drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_sampling.store(1, Ordering::SeqCst);
    let (sampled_peak, samples) = sampler.await.unwrap();
    for index in chaos.live_workers() {
        assert_eq!(
            chaos.cluster.terminate(index, Duration::from_secs(15)),
            Some(0),
            "seed {seed}: worker {index} stops cleanly\n{}",
            chaos.cluster.worker_log(index)
        );
    }
    let redis_peak = chaos.redis_peak.max(chaos.read_redis_peak());

    // The invariants.
    let context = format!("seed {seed} ({:?})", chaos.figures);
    assert!(
        chaos.unexpected_exits.is_empty(),
        "{context}: coordinators failed:\n{}",
        chaos.unexpected_exits.join("\n")
    );
    let runs = store.all_runs().await.unwrap();
    assert_eq!(runs.len(), 1, "{context}: one run, carried on: {runs:?}");
    assert_eq!(
        store.archives().await.unwrap().len(),
        1,
        "{context}: published once"
    );
    let content = reference_content(&warehouse, "analytics.fact_orders").await;
    assert_eq!(content, expected, "{context}: the reference result");
    assert_eq!(content.0, i64::from(DAYS * PER_DAY));
    assert_eq!(
        duplicate_keys(&warehouse, "analytics.fact_orders", "order_id").await,
        0,
        "{context}"
    );
    let partitions = store.partitions(&run_id).await.unwrap();
    assert_eq!(partitions.len(), PARTITIONS);
    for p in &partitions {
        assert_eq!(
            (p.state, p.times_applied),
            (PartitionState::Done, 1),
            "{context}: partition {} checkpointed once",
            p.partition_key
        );
    }
    let checkpoints = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND kind = 'partition_done'",
            store.table("events")
        ),
    )
    .await;
    assert_eq!(
        checkpoints, PARTITIONS as i64,
        "{context}: one checkpoint each"
    );
    assert!(
        redis_peak as i64 <= CONCURRENCY,
        "{context}: Redis granted {redis_peak} leases at once"
    );
    assert!(
        samples > 20 && sampled_peak <= CONCURRENCY,
        "{context}: {sampled_peak} partition writes at once in {samples} samples"
    );
    assert_eq!(
        broker.queue_depth(&task_queue).await.unwrap(),
        0,
        "{context}: no task left"
    );
    assert!(
        broker
            .dead_letters(WAREHOUSE, 100)
            .await
            .unwrap()
            .is_empty(),
        "{context}: no dead letter left"
    );
    assert_eq!(
        broker
            .queue_depth(&broker.topology.results_queue(&run_id))
            .await
            .unwrap(),
        0,
        "{context}: no result left"
    );
    let _ = broker
        .delete_queue(&broker.topology.results_queue(&run_id))
        .await;
    broker.close().await;
    for index in 0..chaos.cluster.workers.len() {
        assert!(
            !chaos.cluster.worker_log(index).contains("panicked"),
            "{context}: worker {index} panicked:\n{}",
            chaos.cluster.worker_log(index)
        );
    }
    for path in &chaos.coordinator_logs {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "{context}: a coordinator panicked:\n{log}"
        );
    }
    println!(
        "chaos: seed {} passed in {:.1}s: {} worker kills, {} coordinator kills, {} connection closes, {} broker app restarts, \
         {} broker node restarts, {} broker wipes, {} Redis restarts, {} coordinators and {} workers started, {} resubmits; \
         {} partitions checkpointed once, {} rows verified, peak {} leases (Redis) / {} writes (sampled {} times)",
        chaos.seed,
        started.elapsed().as_secs_f64(),
        chaos.figures.worker_kills,
        chaos.figures.coordinator_kills,
        chaos.figures.connection_closes,
        chaos.figures.broker_app_restarts,
        chaos.figures.broker_node_restarts,
        chaos.figures.broker_wipes,
        chaos.figures.redis_restarts,
        chaos.figures.coordinators_started,
        chaos.figures.workers_started,
        chaos.figures.resubmits,
        partitions.len(),
        content.0,
        redis_peak,
        sampled_peak,
        samples
    );
}

/// Runs the seeds: `BACKFILL_CHAOS_SEED` alone, or `BACKFILL_CHAOS_RUNS` random ones (2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_and_service_chaos_keeps_every_invariant() {
    let seeds: Vec<u64> = match std::env::var("BACKFILL_CHAOS_SEED") {
        Ok(seed) => vec![seed.parse().expect("BACKFILL_CHAOS_SEED is a number")],
        Err(_) => {
            let runs = std::env::var("BACKFILL_CHAOS_RUNS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(2);
            (0..runs).map(|_| rand::random::<u64>() >> 1).collect()
        }
    };
    // One private RabbitMQ node and Redis server for all seeds (each seed has its own queue
    // and key prefix); both are stopped when dropped, also when a seed fails.
    let (mut broker, mut redis) =
        tokio::task::block_in_place(|| (PrivateBroker::start(), PrivateRedis::start()));
    for seed in seeds {
        chaos_run(seed, &mut broker, &mut redis).await;
    }
    tokio::task::block_in_place(move || {
        drop(broker);
        drop(redis);
    });
}
