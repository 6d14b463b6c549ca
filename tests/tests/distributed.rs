//! Distributed execution with real processes: a `backfill run --broker …` coordinator and
//! `backfill-worker` processes over the real RabbitMQ, Redis and PostgreSQL.

use std::process::Stdio;
use std::time::{Duration, Instant};

use backfill_common::control::PartitionState;
use backfill_common::control::PartitionTask;
use backfill_common::envelope::{Message, TaskMessage};
use backfill_coordinator::demo;
use backfill_tests::cluster::Cluster;
use backfill_tests::*;

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The mini challenge through a coordinator and 3 workers: the published table equals the
/// embedded run's result (the expected table), every partition applied once; workers stop
/// cleanly on SIGTERM.
async fn mini_challenge_with_three_workers(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    for _ in 0..3 {
        cluster.start_worker(&[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let output = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    let shown = text(&output);
    assert!(
        output.status.success(),
        "{shown}\n{}",
        cluster.worker_log(0)
    );
    assert!(shown.contains("published"), "{shown}");

    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    let partitions = store.partitions(&run.run_id).await.unwrap();
    assert!(
        partitions
            .iter()
            .all(|p| p.state == PartitionState::Done && p.times_applied == 1),
        "{partitions:?}"
    );
    // The work was spread: partitions were checkpointed by worker processes, not the coordinator.
    let logs: String = (0..3).map(|i| cluster.worker_log(i)).collect();
    assert!(logs.contains("worker ready"), "{logs}");

    for index in 0..3 {
        assert_eq!(
            cluster.terminate(index, Duration::from_secs(10)),
            Some(0),
            "SIGTERM: clean exit\n{}",
            cluster.worker_log(index)
        );
    }
    let broker = cluster.broker().await;
    assert_eq!(
        broker
            .queue_depth(&broker.topology.task_queue("demo"))
            .await
            .unwrap(),
        0,
        "no message left behind"
    );
    broker.close().await;
}

on_engines!(mini_challenge_with_three_workers: postgres, mysql);

/// With a limit of 2 and 6 workers, at no moment do more than 2 partitions run against the
/// warehouse: sampled from pg_stat_activity while partitions sleep inside their transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_limit_holds_across_workers() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    for _ in 0..6 {
        cluster.start_worker(&[]);
    }
    let spec_text = mini_challenge_spec(&[
        (
            "FROM staging_order_items\n",
            "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(0.4)) AS slow\n",
        ),
        (
            "first = \"2024-03-03\"\nlast = \"2024-03-06\"",
            "first = \"2024-03-01\"\nlast = \"2024-03-10\"",
        ),
        (
            "[[audit]]\n# the fix halves",
            "[[audit]]\nseverity = \"warn\"\n# the fix halves",
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("slow.toml");
    std::fs::write(&spec, spec_text).unwrap();
    let mut coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut peak = 0;
    let mut samples = 0;
    let sample = format!(
        // Only partition writes: a worker describing the source query (no lease needed) shows
        // the same text while it prepares it.
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '{}-worker-%' AND state = 'active' \
         AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%'",
        cluster.prefix
    );
    while coordinator.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not finish"
        );
        peak = peak.max(count(&warehouse, &sample).await);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let output = coordinator.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(samples > 20, "sampled during the run ({samples})");
    assert_eq!(peak, 2, "the limit is reached and never exceeded");
    let broker_peak = backfill_common::redis_semaphore::RedisSemaphore::connect(
        &redis_url(),
        &cluster.prefix,
        Duration::from_secs(3),
        "probe",
    )
    .await
    .unwrap()
    .peak_holders("demo")
    .await
    .unwrap();
    assert!(
        broker_peak <= 2,
        "Redis never granted more than 2 leases ({broker_peak})"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

/// A correctly signed task for a run nobody knows, and a forged one, are dead-lettered with
/// their reasons; the worker keeps running and completes the real run afterwards. `status
/// --broker` shows the run's dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_bad_tasks_and_reports_reasons() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    control_store(&warehouse).migrate().await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let broker = cluster.broker().await;
    broker.declare_warehouse("demo").await.unwrap();
    let ghost = unknown_spec_task("ghost001");
    broker.publish_task(&ghost).await.unwrap();
    let forged = backfill_common::envelope::Keyring::new(
        backfill_common::envelope::SigningKey::new("k1", b"a forger's own key!!".to_vec()).unwrap(),
    );
    let (body, key_id, signature) = forged.seal(&Message::Task(ghost.clone()));
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-bf-key-id".into(),
        lapin::types::AMQPValue::LongString(key_id.into_bytes().into()),
    );
    headers.insert(
        "x-bf-signature".into(),
        lapin::types::AMQPValue::LongString(signature.into_bytes().into()),
    );
    broker
        .publish_unchecked("demo", &body, headers)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let output = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        cluster.worker_log(0)
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );

    let dead = broker.dead_letters("demo", 100).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons, vec!["unknown_run", "bad_signature"], "{dead:?}");
    assert!(dead[0].detail.contains("ghost001"), "{}", dead[0].detail);
    assert!(
        cluster.workers[0].try_wait().unwrap().is_none(),
        "the worker is still running"
    );
    broker.close().await;
}

/// A partition whose SQL fails permanently is dead-lettered with the database's message;
/// `status --broker` lists it; after the cause is fixed, `resubmit --dead-lettered`
/// republishes it with a new token and the run publishes. Resubmitting a done partition is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_partition_is_resubmitted_after_the_fix() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    // The source reads a lookup table that is broken for one day: a permanent error there.
    exec(
        &warehouse,
        "CREATE TABLE divisor (order_date date PRIMARY KEY, d integer NOT NULL)",
    )
    .await;
    exec(&warehouse, "INSERT INTO divisor SELECT DATE '2024-03-01' + g, CASE WHEN g = 4 THEN 0 ELSE 1 END FROM generate_series(0, 9) g").await;
    let spec_text = mini_challenge_spec(&[(
        "SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at\nFROM staging_order_items\n",
        "SELECT order_id, item_id, order_date, sku, quantity / (SELECT d FROM divisor v WHERE v.order_date = s.order_date) AS quantity, unit_price, updated_at\nFROM staging_order_items s\n",
    )]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("broken.toml");
    std::fs::write(&spec, spec_text).unwrap();
    let output = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(4), "partitions failed: {shown}");
    assert!(
        shown.contains("2024-03-05") && shown.contains("division by zero"),
        "{shown}"
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;

    let output = cluster
        .backfill(&["status", &run_id, "--warehouse", "demo"])
        .output()
        .unwrap();
    let shown = text(&output);
    assert!(
        shown.contains("dead letters (1;")
            && shown.contains("2024-03-05")
            && shown.contains("permanent_error"),
        "{shown}"
    );

    let refused = cluster
        .backfill(&[
            "resubmit",
            &run_id,
            "--partition",
            "2024-03-03",
            "--warehouse",
            "demo",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("is done; resubmitting it would apply it again"),
        "{}",
        text(&refused)
    );

    exec(&warehouse, "UPDATE divisor SET d = 1").await;
    let output = cluster
        .backfill(&[
            "resubmit",
            &run_id,
            "--dead-lettered",
            "--no-progress",
            "--warehouse",
            "demo",
        ])
        .output()
        .unwrap();
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains("removed 1 dead letter(s)")
            && shown.contains(&format!("published run {run_id}")),
        "{shown}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    let partitions = store.partitions(&run_id).await.unwrap();
    assert!(
        partitions.iter().all(|p| p.times_applied == 1),
        "each partition applied exactly once: {partitions:?}"
    );
    let broker = cluster.broker().await;
    assert!(
        broker.dead_letters("demo", 100).await.unwrap().is_empty(),
        "the dead letter was consumed by the resubmit"
    );
    broker.close().await;
}

/// The whole 10-day window, each partition sleeping inside its transaction, so processes can
/// be killed mid-run.
fn slow_spec(seconds: f64, concurrency: u32) -> String {
    slow_spec_on("postgres", seconds, concurrency)
}

/// `slow_spec` with the engine's sleep function.
fn slow_spec_on(engine: &str, seconds: f64, concurrency: u32) -> String {
    let sleep = if engine == "mysql" {
        "SLEEP"
    } else {
        "pg_sleep"
    };
    mini_challenge_spec(&[
        (
            "FROM staging_order_items\n",
            &format!(
                "FROM staging_order_items CROSS JOIN (SELECT {sleep}({seconds}) AS bf_slept) AS slow\n"
            ),
        ),
        (
            "first = \"2024-03-03\"\nlast = \"2024-03-06\"",
            "first = \"2024-03-01\"\nlast = \"2024-03-10\"",
        ),
        (
            "[[audit]]\n# the fix halves",
            "[[audit]]\nseverity = \"warn\"\n# the fix halves",
        ),
        ("concurrency = 2", &format!("concurrency = {concurrency}")),
    ])
}

async fn assert_applied_once_and_correct(
    warehouse: &backfill_common::warehouse::Warehouse,
    run_id: &str,
) {
    assert_eq!(
        control_store(warehouse)
            .partitions(run_id)
            .await
            .unwrap()
            .len(),
        10
    );
    assert_mini_challenge_published_once(warehouse, run_id).await;
}

/// SIGKILL a worker in the middle of a partition: its task is redelivered to the other worker,
/// which gets the slot once the dead worker's lease expires (limit 1); every partition is
/// applied once and the data is right.
async fn killed_worker_mid_partition(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("slow.toml");
    std::fs::write(&spec, slow_spec_on(db.engine(), 0.6, 1)).unwrap();
    let coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until worker 0 is inside a partition, then kill it (the only worker yet).
    let busy = if db.engine() == "mysql" {
        "SELECT count(*) FROM information_schema.processlist WHERE command = 'Execute' \
         AND info LIKE '%INSERT INTO%' AND info LIKE '%SLEEP%' AND db = DATABASE()"
            .to_string()
    } else {
        format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}-worker-0' AND state = 'active' AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%'",
            cluster.prefix
        )
    };
    let started = Instant::now();
    while count(&warehouse, &busy).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "worker 0 never started a partition\n{}",
            cluster.worker_log(0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(0);
    let killed_at = Instant::now();
    cluster.start_worker(&[]);
    let output = tokio::task::spawn_blocking(move || coordinator.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        cluster.worker_log(1)
    );
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "the survivor had to wait for the dead worker's 3 s lease"
    );
    let run_id = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0)
        .run_id;
    assert_applied_once_and_correct(&warehouse, &run_id).await;
}

on_engines!(killed_worker_mid_partition: postgres, mysql);

/// SIGKILL the coordinator mid-run and resume it: the run completes and publishes once;
/// tasks of the first coordinator still queued are stale and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_completes_the_run_once() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("slow.toml");
    std::fs::write(&spec, slow_spec(0.3, 2)).unwrap();
    let mut first = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = control_store(&warehouse);
    let started = Instant::now();
    let run_id = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no partition finished"
        );
        if let Some(run) = store.all_runs().await.unwrap_or_default().first() {
            let done = store
                .partitions(&run.run_id)
                .await
                .unwrap()
                .iter()
                .filter(|p| p.state == PartitionState::Done)
                .count();
            if done >= 2 {
                break run.run_id.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill().unwrap();
    first.wait().unwrap();
    let output = cluster
        .backfill(&["resume", &run_id, "--no-progress", "--warehouse", "demo"])
        .output()
        .unwrap();
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("published run {run_id}")),
        "{shown}"
    );
    assert_applied_once_and_correct(&warehouse, &run_id).await;
    // Leftover tasks of the first coordinator drain as no-ops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_applied_once_and_correct(&warehouse, &run_id).await;
}

/// A spec whose tasks could be held longer than the broker's consumer timeout is refused
/// before anything is written (not even a connection: the warehouse here does not exist),
/// with the numbers.
#[test]
fn consumer_timeout_is_checked_at_start() {
    let cluster = Cluster::new(
        "demo",
        "postgres://postgres@127.0.0.1:5432/no_such_database",
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("long.toml");
    std::fs::write(
        &spec,
        mini_challenge_spec(&[("partition_timeout = \"5m\"", "partition_timeout = \"20m\"")]),
    )
    .unwrap();
    let output = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    let shown = text(&output);
    assert!(!output.status.success());
    assert!(
        shown.contains("consumer timeout") && shown.contains("execution.partition_timeout"),
        "{shown}"
    );
}

/// The reference workload (scaled down: 120 days of 100 orders, 90 partitions) run embedded
/// and run by a coordinator with 3 workers publishes the same table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_workload_distributed_equals_embedded() {
    let spec_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/reference_workload.toml"
    ))
    .unwrap();
    let embedded_db = TestDatabase::postgres().await;
    let embedded = embedded_db.warehouse().await;
    load_reference_workload(&embedded, 120, 100).await;
    let backfill = backfill_coordinator::runner::Backfill::open(
        backfill_common::spec::Spec::parse(&spec_text).unwrap(),
        spec_text.clone(),
        &embedded_db.url,
    )
    .await
    .unwrap();
    let outcome = backfill
        .run("test", &backfill_coordinator::runner::Quiet)
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            backfill_coordinator::runner::RunOutcome::Published { .. }
        ),
        "{outcome:?}"
    );

    let distributed_db = TestDatabase::postgres().await;
    let distributed = distributed_db.warehouse().await;
    load_reference_workload(&distributed, 120, 100).await;
    let before = reference_content(&distributed, "analytics.fact_orders").await;
    let mut cluster = Cluster::new("bench", &distributed_db.url);
    for _ in 0..3 {
        cluster.start_worker(&[]);
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("reference.toml");
    std::fs::write(&spec, &spec_text).unwrap();
    let output = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));

    let result = reference_content(&distributed, "analytics.fact_orders").await;
    assert_ne!(result, before, "revenue was recomputed");
    assert_eq!(
        result,
        reference_content(&embedded, "analytics.fact_orders").await,
        "distributed equals embedded"
    );
    assert_eq!(result.0, 12_000);
    let store = control_store(&distributed);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    let partitions = store.partitions(&run_id).await.unwrap();
    assert_eq!(partitions.len(), 90);
    assert!(partitions.iter().all(|p| p.times_applied == 1));
}

/// Closes every broker connection of this cluster (the coordinator's and the workers'), as a
/// broker restart would.
fn close_cluster_connections(prefix: &str) -> usize {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&listing.stdout);
    // rabbitmqctl takes about a second per call: close them all at once.
    let closing: Vec<_> = text
        .lines()
        .filter(|l| l.contains(&format!("backfill {prefix}")))
        .map(|line| {
            let pid = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            std::process::Command::new("rabbitmqctl")
                .args(["close_connection", &pid, "test: simulated broker failure"])
                .stdout(Stdio::null())
                .spawn()
                .expect("rabbitmqctl")
        })
        .collect();
    closing
        .into_iter()
        .filter_map(|mut child| child.wait().ok())
        .filter(|status| status.success())
        .count()
}

/// Every broker connection drops mid-run: workers and the coordinator reconnect by themselves,
/// the run completes, and every partition is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_dropped_mid_run() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("slow.toml");
    // 10 partitions of 1.5 s on 2 workers: the run outlasts rabbitmqctl's own slowness.
    std::fs::write(&spec, slow_spec(1.5, 2)).unwrap();
    let coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let store = control_store(&warehouse);
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no partition finished"
        );
        if let Some(run) = store.all_runs().await.unwrap_or_default().first()
            && store
                .partitions(&run.run_id)
                .await
                .unwrap()
                .iter()
                .filter(|p| p.state == PartitionState::Done)
                .count()
                >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed = close_cluster_connections(&cluster.prefix);
    assert!(
        closed >= 3,
        "closed the coordinator's and both workers' connections ({closed})"
    );
    let output = tokio::task::spawn_blocking(move || coordinator.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let shown = text(&output);
    assert!(
        output.status.success(),
        "{shown}\n{}\n{}",
        cluster.worker_log(0),
        cluster.worker_log(1)
    );
    assert!(
        shown.contains("lost the broker"),
        "the coordinator noticed and reconnected: {shown}"
    );
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    assert_applied_once_and_correct(&warehouse, &run_id).await;
    let logs = format!("{}{}", cluster.worker_log(0), cluster.worker_log(1));
    assert!(logs.contains("reconnecting"), "workers reconnected: {logs}");
    for index in 0..2 {
        assert!(
            cluster.workers[index].try_wait().unwrap().is_none(),
            "worker {index} is still running"
        );
    }
}

/// Everything but the signing key can come from a config file: a worker started with only
/// `--config` (no URL variables) and a coordinator reading the same file complete a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_from_a_file() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let cluster = Cluster::new("demo", &db.url);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backfill.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n[warehouses.demo]\nurl = \"{}\"\n",
            broker_url(),
            redis_url(),
            db.url
        ),
    )
    .unwrap();
    let strip = |command: &mut std::process::Command| {
        command
            .env_remove("BACKFILL_BROKER_URL")
            .env_remove("BACKFILL_REDIS_URL")
            .env_remove(backfill_common::config::warehouse_env_var("demo"))
            .env("BACKFILL_CONFIG", &config);
    };
    let mut worker = std::process::Command::new(workspace_bin("backfill-worker"));
    cluster.env(&mut worker);
    strip(&mut worker);
    let mut worker = worker
        .env("BACKFILL_WORKER_WAREHOUSES", "demo")
        .env(
            "BACKFILL_WORKER_ID",
            format!("{}-worker-file", cluster.prefix),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let mut coordinator = cluster.backfill(&["run", spec.to_str().unwrap(), "--no-progress"]);
    strip(&mut coordinator);
    let output = coordinator.output().unwrap();
    let _ = worker.kill();
    let worker_output = worker.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        String::from_utf8_lossy(&worker_output.stderr)
    );
    assert!(
        text(&output).contains("published 4 task(s)"),
        "the coordinator ran distributed: {}",
        text(&output)
    );
    assert!(String::from_utf8_lossy(&worker_output.stderr).contains("worker ready"));
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

/// A cluster with one worker running the mini challenge over 10 days at concurrency 1, the
/// first day (2024-03-01) holding the warehouse for 5 s; returns once that partition runs on
/// worker 0, with the coordinator process and the query that counts it running. `edit`
/// changes the spec first.
async fn one_slow_day_running(
    db: &TestDatabase,
    warehouse: &backfill_common::warehouse::Warehouse,
    edit: impl Fn(String) -> String,
) -> (Cluster, std::process::Child, String) {
    demo::seed_mini_challenge(warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let spec = cluster.log_path("slow.toml");
    let one_slow_day = edit(slow_spec(0.0, 1).replace(
        "CROSS JOIN (SELECT pg_sleep(0) AS bf_slept) AS slow",
        "CROSS JOIN (SELECT pg_sleep(CASE WHEN CAST(:partition_start AS date) = DATE '2024-03-01' THEN 5 ELSE 0 END) AS bf_slept) AS slow",
    ));
    assert!(one_slow_day.contains("THEN 5"), "{one_slow_day}");
    std::fs::write(&spec, one_slow_day).unwrap();
    let coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let slow_running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}-worker-0' AND state = 'active' AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%'",
        cluster.prefix
    );
    let started = Instant::now();
    while count(warehouse, &slow_running).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the slow partition never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (cluster, coordinator, slow_running)
}

/// Limit 1, one partition (2024-03-01, the first) that holds the warehouse for 5 s: a worker
/// starts on it, then a second worker joins, takes the next task and waits for the lease.
/// SIGTERM to that second worker makes it hand the task back and exit while the slow partition
/// is still running (it does not wait for the lease); the run still completes, every partition
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waiting_for_a_lease_stops_promptly_and_hands_its_task_back() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    let (mut cluster, coordinator, slow_running) =
        one_slow_day_running(&db, &warehouse, |spec| spec).await;
    // Worker 1 joins, takes the next task and waits for the lease worker 0 holds.
    cluster.start_worker(&[]);
    let started = Instant::now();
    while !cluster.worker_log(1).contains("worker ready") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "worker 1 never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 10 tasks: worker 0 holds one; worker 1 has taken its own once 8 are left ready.
    let broker = cluster.broker().await;
    let queue = broker.topology.task_queue("demo");
    let started = Instant::now();
    while broker.queue_depth(&queue).await.unwrap() > 8 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "worker 1 took no task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.close().await;
    // It now waits for the lease (the slow partition holds it for seconds).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        cluster.terminate(1, Duration::from_secs(30)),
        Some(0),
        "{}",
        cluster.worker_log(1)
    );
    assert_eq!(
        count(&warehouse, &slow_running).await,
        1,
        "worker 1 stopped while the slow partition was still running\n{}",
        cluster.worker_log(1)
    );
    assert!(
        cluster.worker_log(1).contains("handed back"),
        "{}",
        cluster.worker_log(1)
    );
    let output = tokio::task::spawn_blocking(move || coordinator.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let run_id = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0)
        .run_id;
    assert_applied_once_and_correct(&warehouse, &run_id).await;
}

/// A task that arrives after its run was published (a worker died after its checkpoint but
/// before its ack, and the broker redelivered it late) goes to a worker that has never seen
/// the run. The shadow is gone by then (renamed into the target): the worker must still
/// recognise the task as stale, ack it and report it so, not dead-letter it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_redelivered_after_publish_is_stale_for_a_fresh_worker() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let output = output_within(
        &mut cluster.backfill(&["run", spec.to_str().unwrap(), "--no-progress"]),
        Duration::from_secs(60),
        "the run",
    );
    assert!(output.status.success(), "{}", text(&output));
    let published = checksum(&warehouse, "fact_order_items", None).await;
    assert_eq!(cluster.terminate(0, Duration::from_secs(15)), Some(0));
    cluster.start_worker(&[]);

    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    let partition = store.partitions(&run.run_id).await.unwrap().remove(0);
    let broker = cluster.broker().await;
    let mut results = broker.results(&run.run_id).await.unwrap();
    let late = TaskMessage {
        task: PartitionTask {
            run_id: run.run_id.clone(),
            spec_hash: run.spec_hash.clone(),
            partition_key: partition.partition_key.clone(),
            range_start: partition.range_start.clone(),
            range_end: partition.range_end.clone(),
            attempt: 1,
            fencing_token: partition.fencing_token,
        },
        warehouse: "demo".into(),
        control_schema: "backfill".into(),
        reply_to: broker.topology.results_queue(&run.run_id),
    };
    broker.publish_task(&late).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), results.next())
        .await
        .unwrap_or_else(|_| panic!("no result for the late task\n{}", cluster.worker_log(1)))
        .unwrap();
    assert_eq!(
        (result.kind, result.task.partition_key.as_str()),
        (
            backfill_common::envelope::ResultKind::Stale,
            partition.partition_key.as_str()
        ),
        "{result:?}\n{}",
        cluster.worker_log(1)
    );
    assert!(broker.dead_letters("demo", 10).await.unwrap().is_empty());
    let after = store.partitions(&run.run_id).await.unwrap().remove(0);
    assert_eq!(
        (after.state, after.times_applied),
        (PartitionState::Done, 1)
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        published
    );
    let _ = broker
        .delete_queue(&broker.topology.results_queue(&run.run_id))
        .await;
    broker.close().await;
    assert_eq!(cluster.terminate(1, Duration::from_secs(15)), Some(0));
}

/// Limit 1 and a first partition that holds the warehouse for 5 s: a second worker whose
/// broker consumer timeout leaves it under a second of lease wait per delivery (12 s, 90% of
/// it, less a partition_timeout of 10 s) takes tasks, cannot get the lease in time and hands
/// each back instead of holding it until the broker closes its channel. Hand-backs are not
/// deliveries: nothing is dead-lettered, the run completes, every partition once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_lease_in_time_hands_the_task_back_uncounted() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    let (mut cluster, coordinator, _) = one_slow_day_running(&db, &warehouse, |spec| {
        spec.replace("partition_timeout = \"5m\"", "partition_timeout = \"10s\"")
    })
    .await;
    cluster.start_worker(&[("BACKFILL_BROKER_CONSUMER_TIMEOUT", "12s")]);
    let output = tokio::task::spawn_blocking(move || coordinator.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let log = cluster.worker_log(1);
    assert!(
        log.contains("no lease in time") && log.contains("handed back before it started"),
        "{log}"
    );
    let broker = cluster.broker().await;
    assert!(broker.dead_letters("demo", 10).await.unwrap().is_empty());
    broker.close().await;
    let run_id = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0)
        .run_id;
    assert_applied_once_and_correct(&warehouse, &run_id).await;
    for index in [0, 1] {
        assert_eq!(cluster.terminate(index, Duration::from_secs(30)), Some(0));
    }
}
