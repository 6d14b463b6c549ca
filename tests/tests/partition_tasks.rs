//! The partition task itself, driven through the worker library on both dialects: the merge
//! path on re-application (update only changed rows, insert new keys, delete vanished keys,
//! idempotent), fencing (stale and racing attempts never apply twice) and retries of
//! transient errors (PostgreSQL lock timeout).

use std::sync::Arc;
use std::time::Duration;

use backfill_common::control::{ControlStore, MergeCounts, PartitionTask};
use backfill_common::semaphore::InMemorySemaphore;
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Warehouse, execute};
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;
use backfill_worker::{
    PartitionContext, PartitionOutcome, run_partition, run_partition_until, shadow_facts,
};

/// Runs the mini challenge with an extra audit that always fails, so the run stays open with
/// a complete shadow; returns the worker context for that run.
async fn open_run_with_complete_shadow(
    db: &TestDatabase,
    extra: &[(&str, &str)],
) -> (Warehouse, ControlStore, Arc<PartitionContext>, String) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut replacements = vec![(
        "[publish]",
        "[[audit]]\nkind = \"expression\"\nname = \"hold_the_run_open\"\nexpression = \"1 = 0\"\n\n[publish]",
    )];
    replacements.extend_from_slice(extra);
    let text = mini_challenge_spec(&replacements);
    let spec = Spec::parse(&text).unwrap();
    let backfill = Backfill::open(spec.clone(), text, &db.url).await.unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::AuditFailed { run_id, .. } = outcome else {
        panic!("expected the holding audit to fail, got {outcome:?}");
    };
    let plan = backfill.plan().await.unwrap();
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let facts = shadow_facts(&store, &spec, &run).await.unwrap();
    let ctx = Arc::new(
        PartitionContext::new(store.clone(), &spec, &run, &plan.source_columns, facts).unwrap(),
    );
    (warehouse, store, ctx, run_id)
}

/// Issues a partition again, as a resubmit would: new fencing token, state pending.
async fn reissue(
    warehouse: &Warehouse,
    store: &ControlStore,
    run_id: &str,
    partition: &str,
) -> PartitionTask {
    let mut conn = warehouse.acquire().await.unwrap();
    execute(
        &mut conn,
        &format!("UPDATE {} SET fencing_token = fencing_token + 1, state = 'pending' WHERE run_id = $1 AND partition_key = $2", store.table("partitions")),
        &[run_id.into(), partition.into()],
    )
    .await
    .unwrap();
    let record = store
        .partitions(run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == partition)
        .unwrap();
    let run = store.find_run(run_id).await.unwrap().unwrap();
    PartitionTask {
        run_id: run_id.into(),
        spec_hash: run.spec_hash,
        partition_key: partition.into(),
        range_start: record.range_start,
        range_end: record.range_end,
        attempt: record.attempt + 1,
        fencing_token: record.fencing_token,
    }
}

fn day_literal(db: &TestDatabase, day: &str) -> String {
    if db.is_postgres() {
        format!("CAST('{day}' AS date)")
    } else {
        format!("'{day}'")
    }
}

async fn merge_path_updates_only_what_changed(db: TestDatabase) {
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(&db, &[]).await;
    let semaphore = InMemorySemaphore::new();
    let day = day_literal(&db, "2024-03-04");
    let shadow = ctx.shadow.quoted();
    let rows_before = count(
        &warehouse,
        &format!("SELECT count(*) FROM {shadow} WHERE order_date = {day}"),
    )
    .await;

    // Staging changes for that day: some quantities, one cancelled item, one new item.
    let changed_keys = count(&warehouse, &format!("SELECT count(DISTINCT order_id * 10 + item_id) FROM staging_order_items WHERE order_date = {day} AND order_id % 7 = 0")).await;
    exec(&warehouse, &format!("UPDATE staging_order_items SET quantity = quantity + 1 WHERE order_date = {day} AND order_id % 7 = 0")).await;
    exec(
        &warehouse,
        &format!("DELETE FROM staging_order_items WHERE order_date = {day} AND order_id = 451"),
    )
    .await;
    let vanished = count(
        &warehouse,
        &format!("SELECT count(*) FROM {shadow} WHERE order_id = 451"),
    )
    .await;
    exec(
        &warehouse,
        &format!(
            "INSERT INTO staging_order_items VALUES (9999, 1, {day}, 'SKU-NEW', 3, 9.5, {})",
            if db.is_postgres() {
                "CAST('2024-03-21 10:00:00' AS timestamp)"
            } else {
                "'2024-03-21 10:00:00'"
            }
        ),
    )
    .await;

    let task = reissue(&warehouse, &store, &run_id, "2024-03-04").await;
    let report = run_partition(&ctx, &semaphore, task.clone()).await;
    let PartitionOutcome::Done { counts, rows_after } = report.outcome else {
        panic!("expected the merge to succeed: {:?}", report.outcome);
    };
    assert_eq!(counts.inserted, 1);
    assert_eq!(counts.deleted, vanished);
    assert_eq!(counts.updated, changed_keys);
    assert_eq!(counts.unchanged, rows_before - vanished - changed_keys);
    assert_eq!(rows_after, rows_before - vanished + 1);

    // The partition now equals the deduplicated staging rows of that day.
    let staging_latest = format!(
        "SELECT order_id, item_id, quantity FROM (SELECT s.*, ROW_NUMBER() OVER (PARTITION BY order_id, item_id ORDER BY updated_at DESC) AS rn \
         FROM staging_order_items s WHERE order_date = {day}) d WHERE rn = 1"
    );
    // Both ways (no FULL OUTER JOIN: MySQL has none): every staging row is in the partition
    // with its quantity, and the partition holds no other key.
    let missing_or_different = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM ({staging_latest}) s WHERE NOT EXISTS (SELECT 1 FROM {shadow} t \
             WHERE t.order_date = {day} AND t.order_id = s.order_id AND t.item_id = s.item_id AND t.quantity = s.quantity)"
        ),
    )
    .await;
    let extra = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {shadow} t WHERE t.order_date = {day} AND NOT EXISTS \
             (SELECT 1 FROM ({staging_latest}) s WHERE s.order_id = t.order_id AND s.item_id = t.item_id)"
        ),
    )
    .await;
    assert_eq!((missing_or_different, extra), (0, 0));
    assert_eq!(
        duplicate_keys(&warehouse, &shadow, "order_id, item_id").await,
        0
    );

    // Applying the same partition again changes nothing: idempotent.
    let checksum_after_merge = checksum(&warehouse, &ctx.shadow.to_string(), None).await;
    let again = reissue(&warehouse, &store, &run_id, "2024-03-04").await;
    let report = run_partition(&ctx, &semaphore, again).await;
    assert_eq!(
        report.outcome,
        PartitionOutcome::Done {
            counts: MergeCounts {
                inserted: 0,
                updated: 0,
                deleted: 0,
                unchanged: rows_after
            },
            rows_after
        }
    );
    assert_eq!(
        checksum(&warehouse, &ctx.shadow.to_string(), None).await,
        checksum_after_merge
    );

    // The old task (stale fencing token) writes nothing.
    let report = run_partition(&ctx, &semaphore, task).await;
    assert_eq!(report.outcome, PartitionOutcome::Stale);
    let record = store
        .partitions(&run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == "2024-03-04")
        .unwrap();
    assert_eq!(
        record.times_applied, 3,
        "first run, merge, idempotent re-merge"
    );
}

async fn racing_attempts_apply_once(db: TestDatabase) {
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(&db, &[]).await;
    let before = checksum(&warehouse, &ctx.shadow.to_string(), None).await;
    let task = reissue(&warehouse, &store, &run_id, "2024-03-05").await;
    let semaphore = Arc::new(InMemorySemaphore::new());
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (ctx, semaphore, task) = (ctx.clone(), semaphore.clone(), task.clone());
        handles.push(tokio::spawn(async move {
            run_partition(&ctx, semaphore.as_ref(), task).await.outcome
        }));
    }
    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(handle.await.unwrap());
    }
    let done = outcomes
        .iter()
        .filter(|o| matches!(o, PartitionOutcome::Done { .. }))
        .count();
    let stale = outcomes
        .iter()
        .filter(|o| **o == PartitionOutcome::Stale)
        .count();
    assert_eq!((done, stale), (1, 3), "{outcomes:?}");
    let record = store
        .partitions(&run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == "2024-03-05")
        .unwrap();
    assert_eq!(record.times_applied, 2);
    let done_events = count(
        &warehouse,
        &format!("SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND partition_key = '2024-03-05' AND kind = 'partition_done'", store.table("events")),
    )
    .await;
    assert_eq!(done_events, 2, "one checkpoint per issued token");
    assert_eq!(
        checksum(&warehouse, &ctx.shadow.to_string(), None).await,
        before,
        "re-applying unchanged data changes nothing"
    );
    assert!(
        semaphore.peak_holders("demo") <= 2,
        "the concurrency limit holds"
    );
}

on_engines!(merge_path_updates_only_what_changed: sqlite, postgres, mysql);
on_engines!(racing_attempts_apply_once: sqlite, postgres, mysql);
on_engines!(key_moved_across_partitions_is_a_collision: sqlite, postgres, mysql);

/// A lock held on the shadow makes attempts hit the lock timeout (transient): the worker
/// retries with backoff and succeeds once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_is_retried_with_backoff() {
    let db = TestDatabase::postgres().await;
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(
        &db,
        &[
            ("partition_timeout = \"5m\"", "partition_timeout = \"1s\""),
            ("retries = 3", "retries = 8"),
            ("backoff_max = \"5s\"", "backoff_max = \"1s\""),
        ],
    )
    .await;
    let task = reissue(&warehouse, &store, &run_id, "2024-03-03").await;
    let mut locker = warehouse.begin().await.unwrap();
    execute(
        &mut locker,
        &format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            ctx.shadow.quoted()
        ),
        &[],
    )
    .await
    .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        locker.commit().await.unwrap();
    });
    let report = run_partition(&ctx, &InMemorySemaphore::new(), task.clone()).await;
    release.await.unwrap();
    assert!(
        matches!(report.outcome, PartitionOutcome::Done { .. }),
        "{:?}",
        report.outcome
    );
    assert!(
        report.task.attempt > task.attempt,
        "it took more than one attempt"
    );
    let retries = count(
        &warehouse,
        &format!("SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND partition_key = '2024-03-03' AND kind = 'partition_retrying'", store.table("events")),
    )
    .await;
    assert!(retries >= 1, "retries are recorded as events");
    let record = store
        .partitions(&run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == "2024-03-03")
        .unwrap();
    assert_eq!(record.times_applied, 2);
    assert!(
        record.error.is_none(),
        "a successful attempt clears the error"
    );
}

/// A worker told to stop hands back a task that never ran (waiting for its first lease), but
/// one whose attempt already failed (backing off before the retry) reports that failure: the
/// queue counts it as a delivery, so a fleet that keeps restarting cannot retry a failing
/// partition forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_hands_back_only_a_task_that_never_ran() {
    use backfill_common::semaphore::Semaphore;
    let db = TestDatabase::postgres().await;
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(
        &db,
        &[
            ("partition_timeout = \"5m\"", "partition_timeout = \"1s\""),
            ("backoff_initial = \"200ms\"", "backoff_initial = \"60s\""),
            ("backoff_max = \"5s\"", "backoff_max = \"60s\""),
        ],
    )
    .await;
    let (stop_sender, stop) = tokio::sync::watch::channel(false);

    // Never ran: every slot is taken, the stop comes while it waits.
    let semaphore = InMemorySemaphore::new();
    let mut held = Vec::new();
    for _ in 0..ctx.concurrency {
        held.push(
            semaphore
                .acquire(&ctx.warehouse_name, ctx.concurrency)
                .await
                .unwrap(),
        );
    }
    let task = reissue(&warehouse, &store, &run_id, "2024-03-03").await;
    let waiting = {
        let (ctx, semaphore, stop) = (ctx.clone(), semaphore.clone(), stop.clone());
        tokio::spawn(
            async move { run_partition_until(&ctx, &semaphore, task, Some(&stop), None).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_sender.send(true).unwrap();
    let report = waiting.await.unwrap();
    assert!(
        matches!(report.outcome, PartitionOutcome::HandedBack),
        "{:?}",
        report.outcome
    );
    drop(held);

    // Ran and failed: the shadow is locked past the 1 s timeout, the stop comes in the 60 s
    // backoff.
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let task = reissue(&warehouse, &store, &run_id, "2024-03-04").await;
    let mut locker = warehouse.begin().await.unwrap();
    execute(
        &mut locker,
        &format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            ctx.shadow.quoted()
        ),
        &[],
    )
    .await
    .unwrap();
    let running = {
        let (ctx, semaphore, stop) = (ctx.clone(), semaphore.clone(), stop.clone());
        tokio::spawn(
            async move { run_partition_until(&ctx, &semaphore, task, Some(&stop), None).await },
        )
    };
    let retrying = format!(
        "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND partition_key = '2024-03-04' AND kind = 'partition_retrying'",
        store.table("events")
    );
    let started = std::time::Instant::now();
    while count(&warehouse, &retrying).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the attempt never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_sender.send(true).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the backoff is cut short by the stop")
        .unwrap();
    locker.commit().await.unwrap();
    match &report.outcome {
        PartitionOutcome::Failed { retry, error } => {
            assert_eq!(*retry, backfill_common::Retry::Transient);
            assert!(error.contains("timeout"), "{error}");
        }
        other => panic!("expected the failed attempt, got {other:?}"),
    }
}

/// A key that moved from another partition into this one is a collision: the partition fails
/// with a message that says so, and the row in the other partition is left alone (the merge
/// never moves rows across partitions).
async fn key_moved_across_partitions_is_a_collision(db: TestDatabase) {
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(&db, &[]).await;
    let shadow = ctx.shadow.quoted();
    let (from, to) = (
        day_literal(&db, "2024-03-02"),
        day_literal(&db, "2024-03-03"),
    );
    let before = checksum(&warehouse, &ctx.shadow.to_string(), None).await;
    let items = count(
        &warehouse,
        &format!("SELECT count(*) FROM {shadow} WHERE order_id = 151 AND order_date = {from}"),
    )
    .await;
    assert!(items > 0);
    exec(
        &warehouse,
        &format!("UPDATE staging_order_items SET order_date = {to} WHERE order_id = 151"),
    )
    .await;
    let task = reissue(&warehouse, &store, &run_id, "2024-03-03").await;
    let report = run_partition(&ctx, &InMemorySemaphore::new(), task).await;
    let PartitionOutcome::Failed { error, retry } = report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert_eq!(retry, backfill_common::Retry::Permanent);
    assert!(
        error.contains("another partition") || error.contains("collides with a row outside it"),
        "{error}"
    );
    assert_eq!(
        checksum(&warehouse, &ctx.shadow.to_string(), None).await,
        before,
        "nothing changed"
    );
    assert_eq!(
        count(
            &warehouse,
            &format!("SELECT count(*) FROM {shadow} WHERE order_id = 151 AND order_date = {from}")
        )
        .await,
        items
    );
}

/// The Redis lease disappears while a partition runs (Redis restarted or flushed): the attempt
/// is stopped and rolled back, its statement cancelled on the server, and the partition is
/// retried under a new lease and applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_stops_the_attempt() {
    let db = TestDatabase::postgres().await;
    let (warehouse, store, ctx, run_id) = open_run_with_complete_shadow(
        &db,
        &[
            (
                "FROM staging_order_items\n",
                "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(1.5)) AS slow\n",
            ),
            ("backoff_initial = \"200ms\"", "backoff_initial = \"100ms\""),
        ],
    )
    .await;
    let semaphore = backfill_common::redis_semaphore::RedisSemaphore::connect(
        &redis_url(),
        &unique_prefix("lease"),
        Duration::from_millis(900),
        "test",
    )
    .await
    .unwrap();
    let task = reissue(&warehouse, &store, &run_id, "2024-03-04").await;
    let before = checksum(&warehouse, &ctx.shadow.to_string(), None).await;
    let running = {
        let (ctx, semaphore, task) = (ctx.clone(), semaphore.clone(), task.clone());
        tokio::spawn(async move { run_partition(&ctx, &semaphore, task).await })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    semaphore.clear("demo").await.unwrap(); // the lease vanishes under the running attempt
    let report = running.await.unwrap();
    assert!(
        matches!(report.outcome, PartitionOutcome::Done { .. }),
        "{:?}",
        report.outcome
    );
    assert!(report.task.attempt > task.attempt, "a second attempt ran");
    let lost = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND partition_key = '2024-03-04' AND kind = 'partition_retrying' AND detail LIKE '%lease%'",
            store.table("events")
        ),
    )
    .await;
    assert_eq!(lost, 1, "the lost lease was recorded");
    let record = store
        .partitions(&run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == "2024-03-04")
        .unwrap();
    assert_eq!(
        record.times_applied, 2,
        "applied by the first run and once by this task"
    );
    assert_eq!(
        checksum(&warehouse, &ctx.shadow.to_string(), None).await,
        before,
        "re-applying the same data changed nothing"
    );
    semaphore.clear("demo").await.unwrap();
}
