//! SIGKILL the `backfill run` process after some partitions have checkpointed, run the same
//! command again: it finishes the remaining partitions only, every partition is applied
//! exactly once, and the result equals an uninterrupted run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backfill_common::control::PartitionState;
use backfill_coordinator::demo;
use backfill_tests::*;

fn spec(slow_join: &str) -> String {
    format!(
        r#"
name = "resume_after_kill"
[target]
table = "fact_order_items"
key = ["order_id", "item_id"]
[partition]
column = "order_date"
grain = "day"
first = "2024-03-01"
last = "2024-03-10"
[source]
query = """
SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at
FROM staging_order_items CROSS JOIN {slow_join}
WHERE order_date >= :partition_start AND order_date < :partition_end
"""
dedupe_order_by = "updated_at DESC"
[warehouse]
name = "killtest"
concurrency = 1
[[audit]]
kind = "unique_key"
[[audit]]
kind = "rowcount_delta"
max_change_pct = 1.0
"#
    )
}

async fn kill_and_resume(db: TestDatabase, slow_join: &str) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(&spec_path, spec(slow_join)).unwrap();
    let run = || {
        let mut command = Command::new(backfill_bin());
        command
            .args(["run", spec_path.to_str().unwrap(), "--no-progress"])
            .env("BACKFILL_WAREHOUSE_KILLTEST_URL", &db.url)
            .env_remove("BACKFILL_WAREHOUSE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };

    let mut child = run().spawn().unwrap();
    let store = control_store(&warehouse);
    let started = Instant::now();
    let done_before_kill = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run never checkpointed 3 partitions"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        let runs = store.all_runs().await.unwrap_or_default();
        if let Some(run) = runs.first() {
            let done = store
                .partitions(&run.run_id)
                .await
                .unwrap()
                .iter()
                .filter(|p| p.state == PartitionState::Done)
                .count();
            if done >= 3 {
                break done;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let run_id = store.all_runs().await.unwrap()[0].run_id.clone();
    let after_kill = store.partitions(&run_id).await.unwrap();
    let done_after_kill: Vec<String> = after_kill
        .iter()
        .filter(|p| p.state == PartitionState::Done)
        .map(|p| p.partition_key.clone())
        .collect();
    assert!(
        done_after_kill.len() >= done_before_kill && done_after_kill.len() < 10,
        "killed mid-run: {} done",
        done_after_kill.len()
    );
    assert!(table_exists(&warehouse, "fact_order_items").await);
    assert_ne!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await,
        "nothing is published before all partitions are done"
    );

    // The same command again resumes and publishes.
    let output = run().output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "resume failed: {stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("resuming run {run_id}")),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("published run {run_id}")),
        "{stdout}"
    );

    // Exactly once: every partition applied once, one checkpoint event each.
    let partitions = store.partitions(&run_id).await.unwrap();
    assert_eq!(partitions.len(), 10);
    for p in &partitions {
        assert_eq!(p.state, PartitionState::Done);
        assert_eq!(
            p.times_applied, 1,
            "partition {} applied {} times",
            p.partition_key, p.times_applied
        );
        let events = count(
            &warehouse,
            &format!("SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND partition_key = '{}' AND kind = 'partition_done'", store.table("events"), p.partition_key),
        )
        .await;
        assert_eq!(
            events, 1,
            "partition {} checkpointed {events} times",
            p.partition_key
        );
    }
    let total_inserted: i64 = partitions.iter().map(|p| p.counts.unwrap().inserted).sum();
    assert_eq!(
        total_inserted,
        count(&warehouse, "SELECT count(*) FROM expected_order_items").await
    );
    // The result equals an uninterrupted run's: the expected table.
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_resume_on_postgres() {
    kill_and_resume(
        TestDatabase::postgres().await,
        "(SELECT pg_sleep(0.15)) AS slow",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_resume_on_mysql() {
    kill_and_resume(
        TestDatabase::mysql().await,
        "(SELECT SLEEP(0.15) AS bf_slept) AS slow",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_resume_on_sqlite() {
    kill_and_resume(
        TestDatabase::sqlite(),
        "(SELECT count(*) AS n FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400000) SELECT x FROM c)) AS slow",
    )
    .await;
}

/// Killed in the middle of a partition whose statement keeps running on the server: the rerun
/// says it is waiting for that statement instead of hanging silently, then completes with
/// every partition applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_waits_for_a_statement_of_the_killed_process() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.toml");
    // One partition whose statement outlasts the rerun's start-up plus the 5 s lock timeout
    // of its first try, even on a loaded machine (9 s was not enough once, with the whole
    // suite running on 2 cores).
    let one_day = spec("(SELECT pg_sleep(15)) AS slow")
        .replace("last = \"2024-03-10\"", "last = \"2024-03-01\"");
    std::fs::write(&spec_path, one_day).unwrap();
    let run = || {
        let mut command = Command::new(backfill_bin());
        command
            .args(["run", spec_path.to_str().unwrap(), "--no-progress"])
            .env("BACKFILL_WAREHOUSE_KILLTEST_URL", &db.url)
            .env_remove("BACKFILL_WAREHOUSE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };
    let mut child = run().spawn().unwrap();
    let busy = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep(15)%' AND query NOT LIKE '%pg_stat_activity%'";
    let started = Instant::now();
    while count(&warehouse, busy).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no partition started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let output = run().output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for a statement of an earlier process"),
        "{stderr}"
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap()[0].run_id.clone();
    let partitions = store.partitions(&run_id).await.unwrap();
    assert_eq!(partitions.len(), 1);
    assert!(
        partitions
            .iter()
            .all(|p| p.times_applied == 1 && p.state == PartitionState::Done)
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
}
