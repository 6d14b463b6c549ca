//! Amending a run in progress (`backfill run --amend`): a spec that writes the same rows with
//! other settings (a longer partition timeout, a corrected audit threshold) carries on the open
//! run instead of starting over; its done partitions are never written again. Without
//! `--amend` the run is left alone and the message lists the changes; a change to what the run
//! writes is refused even with it. A worker that receives a task issued before an amendment
//! acks it as stale.

use std::time::Duration;

use backfill_common::control::{PartitionTask, RunState};
use backfill_common::envelope::{ResultKind, TaskMessage};
use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::cluster::Cluster;
use backfill_tests::*;

async fn open(db: &TestDatabase, spec_text: &str, amend: bool) -> Backfill {
    Backfill::open(
        Spec::parse(spec_text).unwrap(),
        spec_text.to_string(),
        &db.url,
    )
    .await
    .unwrap()
    .amending(amend)
}

/// Runs `spec_text` with `--amend`: the open run `run_id` must carry on and publish.
async fn publish_amended(db: &TestDatabase, spec_text: &str, run_id: &str) {
    let outcome = open(db, spec_text, true)
        .await
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::Published {
        run_id: published, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(published, run_id, "the same run carried on");
}

/// The mini challenge with 2024-03-06 sleeping 2 s in its source query, no retries, and the
/// given partition timeout.
fn slow_last_day(timeout: &str) -> String {
    mini_challenge_spec(&[
        (
            "FROM staging_order_items\n",
            "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(CASE WHEN CAST(:partition_start AS date) = DATE '2024-03-06' THEN 2 ELSE 0 END)) AS slow\n",
        ),
        (
            "partition_timeout = \"5m\"",
            &format!("partition_timeout = \"{timeout}\""),
        ),
        ("retries = 3", "retries = 0"),
    ])
}

/// A partition times out; the same spec with a longer timeout carries the run on with
/// `--amend`, writing only that partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_partition_resumes_with_an_amended_timeout() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let first = slow_last_day("1s");
    let outcome = open(&db, &first, false)
        .await
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::PartitionsFailed { run_id, failures } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "2024-03-06");

    // Without --amend: refused, the changes listed, nothing changed.
    let longer = slow_last_day("30s");
    let refused = open(&db, &longer, false)
        .await
        .run("test", &Quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&run_id)
            && refused.contains("execution.partition_timeout: 1000ms → 30000ms")
            && refused.contains("--amend"),
        "{refused}"
    );
    // A change to what the run writes: refused even with --amend.
    let rewritten = longer.replace("sku, quantity,", "sku, quantity + 0 AS quantity,");
    assert_ne!(rewritten, longer);
    let refused = open(&db, &rewritten, true)
        .await
        .run("test", &Quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("source.query") && refused.contains("never takes such a change"),
        "{refused}"
    );
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.spec_hash, Spec::parse(&first).unwrap().hash());
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);

    publish_amended(&db, &longer, &run_id).await;
    assert_mini_challenge_published_once(&warehouse, &run_id).await;
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let amended_hash = Spec::parse(&longer).unwrap().hash();
    assert_eq!(run.spec_hash, amended_hash);
    let amended = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND kind = 'spec_amended' \
             AND detail LIKE 'from {} to {amended_hash}: %partition_timeout%'",
            store.table("events"),
            Spec::parse(&first).unwrap().hash()
        ),
    )
    .await;
    assert_eq!(amended, 1, "the amendment is on the run's record");
    // The stored spec is the amended one: `resume` and the workers read it back.
    assert_eq!(
        store.spec_source(&amended_hash).await.unwrap().as_deref(),
        Some(longer.as_str())
    );
}

/// A process still driving the run under the spec it was amended from (a second coordinator
/// started with `--amend` while the first one runs) stops at its next state change: it can
/// neither fail, audit nor publish the run under the old settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_driving_the_old_spec_stops_at_its_next_state_change() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let first = slow_last_day("1s");
    let outcome = open(&db, &first, false)
        .await
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::PartitionsFailed { run_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let store = control_store(&warehouse);
    let old = store.find_run(&run_id).await.unwrap().unwrap();
    let longer = Spec::parse(&slow_last_day("30s")).unwrap();
    let amended = store
        .amend_run_spec(
            &old,
            &longer.hash(),
            &longer.name,
            &longer.canonical(),
            &slow_last_day("30s"),
            &["execution.partition_timeout: 1000ms → 30000ms".to_string()],
        )
        .await
        .unwrap();
    let refused = store
        .set_pinned_run_state_now(&old, &[RunState::Failed], RunState::Running, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("was amended"), "{refused}");
    // A second amendment from the same stale record is refused too.
    assert!(
        store
            .amend_run_spec(
                &old,
                &longer.hash(),
                &longer.name,
                &longer.canonical(),
                "",
                &[]
            )
            .await
            .is_err()
    );
    store
        .set_pinned_run_state_now(&amended, &[RunState::Failed], RunState::Running, None)
        .await
        .unwrap();
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Running
    );
}

/// An audit threshold set too tight fails the run; the corrected threshold, amended, audits
/// the same shadow again and publishes without writing any partition again.
async fn a_failed_audit_is_audited_again_with_an_amended_threshold(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let strict = mini_challenge_spec(&[
        ("min_ratio = 0.45", "min_ratio = 0.30"),
        ("max_ratio = 0.55", "max_ratio = 0.40"),
    ]);
    let outcome = open(&db, &strict, false)
        .await
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::AuditFailed { run_id, failures } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        failures
            .iter()
            .all(|f| f.audit_name == "total_quantity_halved"),
        "{failures:?}"
    );
    publish_amended(&db, demo::MINI_CHALLENGE_SPEC, &run_id).await;
    assert_mini_challenge_published_once(&warehouse, &run_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_audit_is_audited_again_with_an_amended_threshold_on_postgres() {
    a_failed_audit_is_audited_again_with_an_amended_threshold(TestDatabase::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_audit_is_audited_again_with_an_amended_threshold_on_sqlite() {
    a_failed_audit_is_audited_again_with_an_amended_threshold(TestDatabase::sqlite()).await;
}

fn output_text(output: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a spec file through the CLI of `cluster` (distributed), `--amend` when asked.
fn run_spec(
    cluster: &Cluster,
    dir: &std::path::Path,
    name: &str,
    text: &str,
    amend: bool,
) -> std::process::Output {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let mut args = vec!["run", path.to_str().unwrap(), "--no-progress"];
    if amend {
        args.push("--amend");
    }
    output_within(
        &mut cluster.backfill(&args),
        Duration::from_secs(90),
        "the run",
    )
}

/// Distributed, through the CLI: the run fails on its slow partition, is amended once (still
/// too short), and a task issued under the first spec then reaches a worker: acked as stale,
/// not dead-lettered, nothing written. A second amendment completes the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_issued_before_an_amendment_is_stale_for_workers() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    cluster.start_worker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let first = slow_last_day("1s");
    let output = run_spec(&cluster, dir.path(), "first.toml", &first, false);
    assert_eq!(output.status.code(), Some(4), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("raise execution.partition_timeout"),
        "the failure says how to carry on: {}",
        output_text(&output)
    );

    let still_short = slow_last_day("1500ms");
    let output = run_spec(&cluster, dir.path(), "second.toml", &still_short, false);
    assert_ne!(output.status.code(), Some(0), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("--amend"),
        "{}",
        output_text(&output)
    );
    let output = run_spec(&cluster, dir.path(), "second.toml", &still_short, true);
    assert_eq!(output.status.code(), Some(4), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("amending run"),
        "{}",
        output_text(&output)
    );

    // Tasks of the first spec arrive late: at the worker that ran the first spec (its cached
    // context is refused by the claim) and at a fresh worker (refused when loading the run).
    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    assert_eq!(run.spec_hash, Spec::parse(&still_short).unwrap().hash());
    let partition = store
        .partitions(&run.run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.partition_key == "2024-03-06")
        .unwrap();
    let shadow_before = checksum(&warehouse, &run.shadow_table, None).await;
    let broker = cluster.broker().await;
    let mut results = broker.results(&run.run_id).await.unwrap();
    let late = TaskMessage {
        task: PartitionTask {
            run_id: run.run_id.clone(),
            spec_hash: Spec::parse(&first).unwrap().hash(),
            partition_key: partition.partition_key.clone(),
            range_start: partition.range_start.clone(),
            range_end: partition.range_end.clone(),
            attempt: partition.attempt,
            // the current token: only the spec tells this task apart
            fencing_token: partition.fencing_token,
        },
        warehouse: "demo".into(),
        control_schema: "backfill".into(),
        reply_to: broker.topology.results_queue(&run.run_id),
    };
    // The failed runs dead-lettered their give-ups: the late tasks must add none.
    let dead_before = broker.dead_letters("demo", 100).await.unwrap();
    assert!(
        dead_before.iter().all(|d| d.reason == "retries_exhausted"),
        "{dead_before:?}"
    );
    for worker in [0, 1] {
        if worker == 1 {
            assert_eq!(cluster.terminate(0, Duration::from_secs(15)), Some(0));
            cluster.start_worker(&[]);
        }
        broker.publish_task(&late).await.unwrap();
        // Results of the failed runs may still wait in the queue: skip to the late task's.
        let late_hash = late.task.spec_hash.clone();
        let result = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let result = results.next().await.unwrap();
                if result.task.spec_hash == late_hash {
                    return result;
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no result for the late task\n{}",
                cluster.worker_log(worker)
            )
        });
        assert_eq!(
            (result.kind, result.task.partition_key.as_str()),
            (ResultKind::Stale, "2024-03-06"),
            "worker {worker}: {result:?}\n{}",
            cluster.worker_log(worker)
        );
        assert_eq!(
            broker.dead_letters("demo", 100).await.unwrap().len(),
            dead_before.len(),
            "the late task was not dead-lettered"
        );
        assert_eq!(
            checksum(&warehouse, &run.shadow_table, None).await,
            shadow_before
        );
    }
    assert!(
        cluster.worker_log(1).contains("superseded"),
        "{}",
        cluster.worker_log(1)
    );
    let _ = broker
        .delete_queue(&broker.topology.results_queue(&run.run_id))
        .await;
    broker.close().await;

    let output = run_spec(
        &cluster,
        dir.path(),
        "third.toml",
        &slow_last_day("30s"),
        true,
    );
    assert_eq!(output.status.code(), Some(0), "{}", output_text(&output));
    assert_mini_challenge_published_once(&warehouse, &run.run_id).await;
    assert_eq!(cluster.terminate(1, Duration::from_secs(15)), Some(0));
}
