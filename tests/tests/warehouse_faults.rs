//! Warehouse faults on PostgreSQL, each classified as designed and each ending with the right
//! data: transient errors (connection loss, serialization failure, deadlock, lock timeout,
//! statement timeout, too many connections) are retried with backoff and the partition is
//! applied once; permanent ones stop the partition at its first attempt and publish nothing.
//!
//! Raised errors come from a plpgsql function in the source query that fails a set number of
//! times (counted by a sequence, which a rollback does not undo). Real faults run against real
//! worker processes: a backend terminated in the middle of a partition, a lock held on the
//! partition's row, a statement slower than its timeout on every delivery until the task is
//! dead-lettered, then resubmitted once the cause is gone.

use std::process::Stdio;
use std::time::{Duration, Instant};

use backfill_common::control::{PartitionRecord, PartitionState, RunState};
use backfill_common::spec::Spec;
use backfill_common::warehouse::Warehouse;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::cluster::Cluster;
use backfill_tests::*;

/// The day whose partition the faults hit.
const FAULT_DAY: &str = "2024-03-04";

/// Creates `bf_fault(day)`: for FAULT_DAY, its first `times` calls raise SQLSTATE `code`.
async fn install_fault(warehouse: &Warehouse, code: &str, times: u32) {
    exec(warehouse, "CREATE SEQUENCE bf_fault_calls").await;
    exec(
        warehouse,
        &format!(
            "CREATE FUNCTION bf_fault(day date) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$ \
             BEGIN \
               IF day = DATE '{FAULT_DAY}' THEN \
                 IF nextval('bf_fault_calls') <= {times} THEN \
                   RAISE EXCEPTION 'injected fault {code}' USING ERRCODE = '{code}'; \
                 END IF; \
               END IF; \
               RETURN 0; \
             END $$"
        ),
    )
    .await;
}

fn spec_calling_the_fault() -> String {
    mini_challenge_spec(&[(
        "FROM staging_order_items\n",
        "FROM staging_order_items CROSS JOIN (SELECT bf_fault(:partition_start)) AS fault\n",
    )])
}

async fn fault_calls(warehouse: &Warehouse) -> i64 {
    count(
        warehouse,
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM bf_fault_calls",
    )
    .await
}

/// `(kind, detail, at)` of a partition's events, oldest first.
async fn partition_events(
    warehouse: &Warehouse,
    run_id: &str,
    partition: &str,
) -> Vec<(String, String, chrono::DateTime<chrono::FixedOffset>)> {
    let store = control_store(warehouse);
    let mut conn = warehouse.acquire().await.unwrap();
    let rows = backfill_common::warehouse::fetch_all(
        &mut conn,
        &format!(
            "SELECT kind, coalesce(detail, ''), at FROM {} WHERE run_id = $1 AND partition_key = $2 ORDER BY id",
            store.table("events")
        ),
        &[run_id.into(), partition.into()],
    )
    .await
    .unwrap();
    rows.iter()
        .map(|row| {
            let at: String = backfill_common::warehouse::get(row, 2).unwrap();
            (
                backfill_common::warehouse::get(row, 0).unwrap(),
                backfill_common::warehouse::get(row, 1).unwrap(),
                chrono::DateTime::parse_from_rfc3339(&at).unwrap(),
            )
        })
        .collect()
}

async fn partition(warehouse: &Warehouse, run_id: &str, key: &str) -> PartitionRecord {
    control_store(warehouse)
        .partitions(run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == key)
        .unwrap_or_else(|| panic!("no partition {key}"))
}

async fn assert_published_correctly(warehouse: &Warehouse, run_id: &str) {
    assert_eq!(
        checksum(warehouse, "fact_order_items", None).await,
        checksum(warehouse, "expected_order_items", None).await,
        "the published table is the expected one"
    );
    assert_eq!(
        duplicate_keys(warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
    let store = control_store(warehouse);
    for p in store.partitions(run_id).await.unwrap() {
        assert_eq!(
            (p.state, p.times_applied),
            (PartitionState::Done, 1),
            "partition {} applied once",
            p.partition_key
        );
    }
    assert_eq!(
        count(
            warehouse,
            &format!(
                "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND kind = 'partition_done'",
                store.table("events")
            )
        )
        .await,
        store.partitions(run_id).await.unwrap().len() as i64,
        "one checkpoint per partition"
    );
}

/// One raised SQLSTATE, embedded run: transient codes fail the partition twice, then it
/// succeeds on its third attempt after backoff; permanent ones fail it once, for good.
async fn raised_sqlstate(code: &str, transient: bool) {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    install_fault(&warehouse, code, 2).await;
    let text = spec_calling_the_fault();
    let outcome = Backfill::open(Spec::parse(&text).unwrap(), text.clone(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap();
    let run_id = match &outcome {
        RunOutcome::Published { run_id, .. } | RunOutcome::PartitionsFailed { run_id, .. } => {
            run_id.clone()
        }
        other => panic!("{code}: {other:?}"),
    };
    let events = partition_events(&warehouse, &run_id, FAULT_DAY).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    let record = partition(&warehouse, &run_id, FAULT_DAY).await;
    if transient {
        assert!(
            matches!(outcome, RunOutcome::Published { .. }),
            "{code} is transient: retried, then published: {outcome:?}"
        );
        assert_eq!(
            record.attempt, 3,
            "{code}: two failed attempts, then success"
        );
        assert_eq!(fault_calls(&warehouse).await, 3, "{code}: no extra attempt");
        let retries: Vec<_> = events
            .iter()
            .filter(|e| e.0 == "partition_retrying")
            .collect();
        assert_eq!(retries.len(), 2, "{code}: {kinds:?}");
        assert!(
            retries
                .iter()
                .all(|e| e.1.contains(&format!("injected fault {code}"))),
            "{code}: the database's message is recorded: {retries:?}"
        );
        // backoff_initial is 200ms: the second attempt started at least that long after the first failed.
        let gap = retries[1].2 - retries[0].2;
        assert!(
            gap >= chrono::Duration::milliseconds(200),
            "{code}: retried after {gap:?}, less than the 200ms backoff"
        );
        assert_published_correctly(&warehouse, &run_id).await;
    } else {
        let RunOutcome::PartitionsFailed { failures, .. } = &outcome else {
            panic!("{code} is permanent: {outcome:?}");
        };
        assert_eq!(failures.len(), 1, "{code}: {failures:?}");
        assert!(
            failures[0].1.contains(&format!("injected fault {code}")),
            "{failures:?}"
        );
        assert_eq!(
            (record.state, record.attempt, record.times_applied),
            (PartitionState::Failed, 1, 0),
            "{code}: one attempt, nothing applied"
        );
        assert_eq!(fault_calls(&warehouse).await, 1, "{code}: not retried");
        assert!(!kinds.contains(&"partition_retrying"), "{code}: {kinds:?}");
        assert_eq!(
            checksum(&warehouse, "fact_order_items", None).await,
            before,
            "{code}: nothing published"
        );
    }
}

/// Serialization failure, deadlock, lock not available, statement timeout or cancel,
/// connection failure, too many connections: retried with backoff, applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_sqlstates_are_retried_with_backoff() {
    for code in ["40001", "40P01", "55P03", "57014", "08006", "53300"] {
        raised_sqlstate(code, true).await;
    }
}

/// Insufficient privilege, a character not in the database's encoding, internal error: not
/// retried; the partition fails with the database's message and nothing is published.
/// (42501 and 22021 were retried: read as SQLite codes they end in SQLITE_BUSY's byte.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_sqlstates_fail_at_once() {
    for code in ["42501", "22021", "XX000"] {
        raised_sqlstate(code, false).await;
    }
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn write_spec(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Waits until `sql` (a count) is positive.
async fn wait_for(warehouse: &Warehouse, sql: &str, what: &str, cluster: &Cluster) {
    let started = Instant::now();
    while count(warehouse, sql).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} never happened\n{}",
            cluster.worker_log(0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_queues_empty(cluster: &mut Cluster) {
    let broker = cluster.broker().await;
    assert!(
        broker.dead_letters("demo", 100).await.unwrap().is_empty(),
        "no dead letter left"
    );
    for index in 0..cluster.workers.len() {
        if cluster.workers[index].try_wait().unwrap().is_none() {
            assert_eq!(cluster.terminate(index, Duration::from_secs(15)), Some(0));
        }
    }
    assert_eq!(
        broker
            .queue_depth(&broker.topology.task_queue("demo"))
            .await
            .unwrap(),
        0,
        "no task left, none unacked"
    );
    broker.close().await;
}

/// The worker's backend is terminated (`pg_terminate_backend`) while it writes a partition:
/// the connection loss is transient, the partition is retried on a new connection and
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_mid_partition_is_retried() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        &dir,
        &mini_challenge_spec(&[
            (
                "FROM staging_order_items\n",
                "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(0.8)) AS slow\n",
            ),
            ("concurrency = 2", "concurrency = 1"),
        ]),
    );
    let coordinator = cluster
        .backfill(&["run", &spec, "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writing = format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '{}-worker-0' AND state = 'active' \
         AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%' AND query NOT LIKE '%pg_stat_activity%'",
        cluster.prefix
    );
    wait_for(
        &warehouse,
        &format!("SELECT count(*) FROM ({writing}) AS w"),
        "a partition write",
        &cluster,
    )
    .await;
    let terminated = count(
        &warehouse,
        &format!("SELECT count(*) FROM ({writing}) AS w WHERE pg_terminate_backend(w.pid)"),
    )
    .await;
    assert_eq!(
        terminated, 1,
        "terminated the backend writing the partition"
    );
    let output = tokio::task::spawn_blocking(move || {
        wait_within(coordinator, Duration::from_secs(60), "the coordinator")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        cluster.worker_log(0)
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    let partitions = store.partitions(&run_id).await.unwrap();
    let retried: Vec<&PartitionRecord> = partitions.iter().filter(|p| p.attempt > 1).collect();
    assert_eq!(
        retried.len(),
        1,
        "one partition lost its connection: {partitions:?}"
    );
    let events = partition_events(&warehouse, &run_id, &retried[0].partition_key).await;
    assert!(
        events
            .iter()
            .any(|(kind, detail, _)| kind == "partition_retrying"
                && detail.contains("terminating connection due to administrator command")),
        "the connection loss was retried: {events:?}"
    );
    assert_published_correctly(&warehouse, &run_id).await;
    assert_queues_empty(&mut cluster).await;
}

/// Another session holds the lock on a partition's row in the control store (as a statement
/// of a killed process does until it ends): the worker's claim gives up at the lock timeout
/// (transient, with its statement cancelled, not abandoned at the client timeout), the worker
/// retries with backoff, does the other partitions meanwhile, and applies the locked one
/// once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_partition_row_hits_the_lock_timeout_and_is_retried() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        &dir,
        &mini_challenge_spec(&[
            ("partition_timeout = \"5m\"", "partition_timeout = \"1s\""),
            ("retries = 3", "retries = 20"),
            ("backoff_max = \"5s\"", "backoff_max = \"300ms\""),
            ("concurrency = 2", "concurrency = 1"),
        ]),
    );
    // The coordinator creates the run and publishes its tasks; no worker runs yet.
    let coordinator = cluster
        .backfill(&["run", &spec, "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let store = control_store(&warehouse);
    wait_for(
        &warehouse,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'backfill' AND tablename = 'partitions'",
        "the control store",
        &cluster,
    )
    .await;
    // Wait for the coordinator's reissue (fencing token 2), which updates the partition rows:
    // taking the lock before it would block the coordinator, not the worker (seen under load
    // in CI: no task was ever published while the test held the lock).
    wait_for(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {} WHERE partition_key = '{FAULT_DAY}' AND fencing_token = 2",
            store.table("partitions")
        ),
        "the run's partitions issued",
        &cluster,
    )
    .await;
    let mut locker = warehouse.begin().await.unwrap();
    backfill_common::warehouse::execute(
        &mut locker,
        &format!(
            "SELECT 1 FROM {} WHERE partition_key = '{FAULT_DAY}' FOR UPDATE",
            store.table("partitions")
        ),
        &[],
    )
    .await
    .unwrap();
    // Two slots: one keeps running into the lock, the other does the other partitions.
    cluster.start_worker(&[("BACKFILL_WORKER_SLOTS", "2")]);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    let started = Instant::now();
    loop {
        let partitions = store.partitions(&run_id).await.unwrap();
        let done = partitions
            .iter()
            .filter(|p| p.state == PartitionState::Done)
            .count();
        let log = cluster.worker_log(0);
        let lock_timeouts = log
            .matches("canceling statement due to lock timeout")
            .count();
        if done == 3 && lock_timeouts >= 2 {
            break;
        }
        assert!(
            // A hang guard, not a timing assertion: a loaded CI machine is slow.
            started.elapsed() < Duration::from_secs(120),
            "with the partition row locked: {done} other partition(s) done, {lock_timeouts} lock timeout(s)\n{partitions:?}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    locker.rollback().await.unwrap();
    let output = tokio::task::spawn_blocking(move || {
        wait_within(coordinator, Duration::from_secs(60), "the coordinator")
    })
    .await
    .unwrap();
    let log = cluster.worker_log(0);
    assert!(output.status.success(), "{}\n{log}", text(&output));
    assert!(
        !log.contains("timed out after"),
        "no attempt was left to the client-side timeout: {log}"
    );
    assert!(
        partition(&warehouse, &run_id, FAULT_DAY).await.attempt >= 3,
        "retried until the lock was gone"
    );
    assert_published_correctly(&warehouse, &run_id).await;
    assert_queues_empty(&mut cluster).await;
}

/// A partition slower than its timeout on every delivery: the server cancels it (statement
/// timeout, transient), the worker hands the task back, and on its last delivery dead-letters
/// it as `retries_exhausted` and records the partition as failed; the coordinator reports it.
/// Once the cause is gone, `resubmit --dead-lettered` completes the run, each partition once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_on_every_delivery_is_dead_lettered_then_resubmitted() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE TABLE slowness (day date PRIMARY KEY, seconds double precision NOT NULL)",
    )
    .await;
    exec(
        &warehouse,
        &format!("INSERT INTO slowness VALUES (DATE '{FAULT_DAY}', 4)"),
    )
    .await;
    let limit = ("BACKFILL_DELIVERY_LIMIT", "2");
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[limit]);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        &dir,
        &mini_challenge_spec(&[
            (
                "FROM staging_order_items\n",
                "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(coalesce((SELECT seconds FROM slowness WHERE day = :partition_start), 0))) AS slow\n",
            ),
            ("partition_timeout = \"5m\"", "partition_timeout = \"1s\""),
            ("retries = 3", "retries = 0"),
        ]),
    );
    let output = output_within(
        cluster
            .backfill(&["run", &spec, "--no-progress"])
            .env(limit.0, limit.1),
        Duration::from_secs(60),
        "the run",
    );
    let shown = text(&output);
    assert_eq!(
        output.status.code(),
        Some(4),
        "partitions failed: {shown}\n{}",
        cluster.worker_log(0)
    );
    assert!(
        shown.contains(FAULT_DAY) && shown.contains("statement timeout"),
        "{shown}"
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    let failed = partition(&warehouse, &run_id, FAULT_DAY).await;
    assert_eq!(
        (failed.state, failed.times_applied),
        (PartitionState::Failed, 0)
    );
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 2 deliveries")
                && e.contains("canceling statement due to statement timeout")),
        "{failed:?}"
    );
    let broker = cluster.broker().await;
    let dead = broker.dead_letters("demo", 100).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "retries_exhausted");
    assert_eq!(
        dead[0]
            .message
            .as_ref()
            .map(|m| m.task.partition_key.as_str()),
        Some(FAULT_DAY)
    );
    broker.close().await;
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Failed
    );

    // The cause goes away; the dead letter is resubmitted and the run completes.
    exec(&warehouse, "UPDATE slowness SET seconds = 0").await;
    let output = output_within(
        cluster
            .backfill(&[
                "resubmit",
                &run_id,
                "--dead-lettered",
                "--no-progress",
                "--warehouse",
                "demo",
            ])
            .env(limit.0, limit.1),
        Duration::from_secs(60),
        "the resubmit",
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        cluster.worker_log(0)
    );
    assert_published_correctly(&warehouse, &run_id).await;
    assert_queues_empty(&mut cluster).await;
}

/// The broker gives up on a task, not a worker: every worker that takes the fault day's task
/// dies inside it (SIGKILL mid-statement), so no worker can dead-letter it with a reason;
/// after its last delivery (limit 2) RabbitMQ dead-letters it itself. The barrier finds it
/// in the dead-letter queue, records the partition failed ("gave up" by the broker), and
/// the coordinator exits 4 once the others are done. Once the cause is gone, `resubmit
/// --dead-lettered` completes the run, each partition applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_workers_keep_dying_is_dead_lettered_by_the_broker() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE TABLE slowness (day date PRIMARY KEY, seconds double precision NOT NULL)",
    )
    .await;
    exec(
        &warehouse,
        &format!("INSERT INTO slowness VALUES (DATE '{FAULT_DAY}', 60)"),
    )
    .await;
    let limit = ("BACKFILL_DELIVERY_LIMIT", "2");
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[limit]);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        &dir,
        &mini_challenge_spec(&[
            (
                "FROM staging_order_items\n",
                "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(coalesce((SELECT seconds FROM slowness WHERE day = :partition_start), 0))) AS slow\n",
            ),
            // An orphaned backend's statement ends by its own timeout and frees the row.
            ("partition_timeout = \"5m\"", "partition_timeout = \"4s\""),
        ]),
    );
    let coordinator = cluster
        .backfill(&["run", &spec, "--no-progress"])
        .env(limit.0, limit.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Two deliveries, two deaths: kill whichever worker is inside the fault day's statement.
    for delivery in 0..2 {
        let worker = cluster.workers.len() - 1;
        let inside = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}-worker-{worker}' \
             AND state = 'active' AND wait_event = 'PgSleep' AND query LIKE '%INSERT INTO%'",
            cluster.prefix
        );
        // Only the fault day sleeps (the others call pg_sleep(0), which does not wait).
        wait_for(
            &warehouse,
            &inside,
            &format!("delivery {} of the fault day", delivery + 1),
            &cluster,
        )
        .await;
        cluster.kill(worker);
        cluster.start_worker(&[limit]);
    }
    let output = tokio::task::spawn_blocking(move || {
        wait_within(coordinator, Duration::from_secs(90), "the coordinator")
    })
    .await
    .unwrap();
    let shown = text(&output);
    assert_eq!(
        output.status.code(),
        Some(4),
        "partitions failed: {shown}\n{}",
        cluster.worker_log(cluster.workers.len() - 1)
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    let failed = partition(&warehouse, &run_id, FAULT_DAY).await;
    assert_eq!(
        (failed.state, failed.times_applied),
        (PartitionState::Failed, 0),
        "{failed:?}"
    );
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("dead-lettered (delivery_limit)")),
        "{failed:?}\n{}",
        (0..cluster.workers.len())
            .map(|i| format!("--- worker {i}\n{}", cluster.worker_log(i)))
            .collect::<String>()
    );
    for p in store.partitions(&run_id).await.unwrap() {
        if p.partition_key != FAULT_DAY {
            assert_eq!(
                (p.state, p.times_applied),
                (PartitionState::Done, 1),
                "{p:?}"
            );
        }
    }
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Failed
    );
    assert_ne!(
        count(&warehouse, "SELECT count(*) FROM fact_order_items").await,
        0
    );

    // The cause goes away; the broker's dead letter is resubmitted and the run completes.
    exec(&warehouse, "UPDATE slowness SET seconds = 0").await;
    let output = output_within(
        cluster
            .backfill(&[
                "resubmit",
                &run_id,
                "--dead-lettered",
                "--no-progress",
                "--warehouse",
                "demo",
            ])
            .env(limit.0, limit.1),
        Duration::from_secs(60),
        "the resubmit",
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output),
        cluster.worker_log(cluster.workers.len() - 1)
    );
    assert_published_correctly(&warehouse, &run_id).await;
    assert_queues_empty(&mut cluster).await;
}

/// A worker that cannot reach the task's warehouse (connection refused) hands the task back
/// without counting a delivery, again and again: an outage longer than the delivery limit
/// ends with the task still queued for when the warehouse is back, not dead-lettered. (Slow:
/// each attempt waits out the connection pool's 15 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_outage_never_uses_up_a_tasks_deliveries() {
    let refused = "postgres://postgres@127.0.0.1:1/db";
    let mut cluster = Cluster::new("demo", refused);
    // A delivery limit of 1: one counted return would dead-letter the task.
    cluster.start_worker(&[("BACKFILL_DELIVERY_LIMIT", "1")]);
    let started = std::time::Instant::now();
    while !cluster.worker_log(0).contains("worker ready") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{}",
            cluster.worker_log(0)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let broker = cluster.broker().await;
    let task = unknown_spec_task("outage01");
    broker.publish_task(&task).await.unwrap();
    let started = std::time::Instant::now();
    while cluster
        .worker_log(0)
        .matches("cannot reach the task's warehouse")
        .count()
        < 2
    {
        // each attempt to connect gives up after the pool's 15 s
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "{}",
            cluster.worker_log(0)
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Two deliveries against a limit of 1, neither counted.
    assert!(broker.dead_letters("demo", 10).await.unwrap().is_empty());
    assert!(
        !cluster.worker_log(0).contains("dead-letter"),
        "{}",
        cluster.worker_log(0)
    );
    cluster.kill(0);
    broker.close().await;
}
