//! Failure modes provoked on purpose, on both dialects: a failing audit never touches the
//! target and keeps the shadow; a changed spec refuses to join the open run; a permanent
//! partition error stops that partition with the database's message and no retries.

use backfill_common::control::{PartitionState, RunState};
use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn open(db: &TestDatabase, spec_text: &str) -> Backfill {
    Backfill::open(
        Spec::parse(spec_text).unwrap(),
        spec_text.to_string(),
        &db.url,
    )
    .await
    .unwrap()
}

async fn failing_audit_leaves_target_untouched(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    // A bad source: negative quantities.
    let bad = mini_challenge_spec(&[(
        "SELECT order_id, item_id, order_date, sku, quantity,",
        "SELECT order_id, item_id, order_date, sku, -quantity AS quantity,",
    )]);
    let outcome = open(&db, &bad).await.run("test", &Quiet).await.unwrap();
    let RunOutcome::AuditFailed { run_id, failures } = outcome else {
        panic!("expected the audits to fail, got {outcome:?}");
    };
    // The report names the audit, the partition, observed vs allowed.
    let negative: Vec<_> = failures
        .iter()
        .filter(|f| f.audit_name == "non_negative_quantity")
        .collect();
    assert_eq!(negative.len(), 4, "{failures:?}");
    assert!(
        negative.iter().any(|f| f.partition_key == "2024-03-04"
            && f.observed.contains("300 failing")
            && f.allowed == "at most 0"),
        "{negative:?}"
    );
    assert!(
        failures
            .iter()
            .any(|f| f.audit_name == "total_quantity_halved"),
        "the ratio audit fails too: {failures:?}"
    );

    // Nothing published; the shadow is kept for inspection and holds the bad rows.
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::AuditFailed);
    assert!(run.archive_table.is_none());
    assert_eq!(
        count(
            &warehouse,
            &format!(
                "SELECT count(*) FROM {} WHERE quantity < 0",
                table(&run.shadow_table).quoted()
            )
        )
        .await,
        1199
    );
    assert!(store.archives().await.unwrap().is_empty());

    // A changed spec never joins the open run, and says so.
    let fixed = demo::MINI_CHALLENGE_SPEC;
    let refused = open(&db, fixed)
        .await
        .run("test", &Quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&run_id)
            && refused.contains("source.query")
            && refused.contains("never takes such a change")
            && refused.contains("backfill abandon"),
        "{refused}"
    );

    // Abandon drops the shadow; then the fixed spec runs and publishes the expected data.
    publish::drop_shadow(&store, &run).await.unwrap();
    assert!(!table_exists(&warehouse, &run.shadow_table).await);
    let outcome = open(&db, fixed).await.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

async fn permanent_partition_error_is_not_retried(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    // Division by zero on one day only: a permanent error for that partition.
    let day = if db.is_postgres() {
        "CAST('2024-03-05' AS date)"
    } else {
        "'2024-03-05'"
    };
    let spec = mini_challenge_spec(&[(
        "SELECT order_id, item_id, order_date, sku, quantity,",
        &format!(
            "SELECT order_id, item_id, order_date, sku, quantity / (CASE WHEN order_date = {day} THEN 0 ELSE 1 END) AS quantity,"
        ),
    )]);
    let outcome = open(&db, &spec).await.run("test", &Quiet).await.unwrap();
    let RunOutcome::PartitionsFailed { run_id, failures } = outcome else {
        // SQLite returns NULL for division by zero; the NOT NULL column then refuses the row.
        panic!("expected a failed partition, got {outcome:?}");
    };
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "2024-03-05");
    let message = &failures[0].1;
    assert!(
        message.to_lowercase().contains("division by zero")
            || message.contains("Division by 0")
            || message.contains("NOT NULL"),
        "the database's message is kept: {message}"
    );
    let store = control_store(&warehouse);
    let partitions = store.partitions(&run_id).await.unwrap();
    let failed = partitions
        .iter()
        .find(|p| p.partition_key == "2024-03-05")
        .unwrap();
    assert_eq!(failed.state, PartitionState::Failed);
    assert_eq!(failed.attempt, 1, "permanent errors are not retried");
    assert_eq!(failed.times_applied, 0);
    assert_eq!(
        partitions
            .iter()
            .filter(|p| p.state == PartitionState::Done)
            .count(),
        3
    );
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Failed
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        before,
        "nothing published"
    );
}

on_engines!(failing_audit_leaves_target_untouched: sqlite, postgres, mysql);
on_engines!(permanent_partition_error_is_not_retried: sqlite, postgres, mysql);

/// A partition slower than its timeout: the server cancels the statement (transient), the
/// worker retries with backoff, then gives up with the database's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_retried_then_reported() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let spec = mini_challenge_spec(&[
        (
            "FROM staging_order_items\n",
            "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(3)) AS slow\n",
        ),
        ("partition_timeout = \"5m\"", "partition_timeout = \"1s\""),
        ("retries = 3", "retries = 1"),
        ("first = \"2024-03-03\"", "first = \"2024-03-06\""),
    ]);
    let outcome = open(&db, &spec).await.run("test", &Quiet).await.unwrap();
    let RunOutcome::PartitionsFailed { run_id, failures } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(failures.len(), 1);
    assert!(failures[0].1.contains("statement timeout"), "{failures:?}");
    let partition = control_store(&warehouse)
        .partitions(&run_id)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(partition.attempt, 2, "one retry, then give up");
    assert_eq!(partition.state, PartitionState::Failed);
    assert_eq!(partition.times_applied, 0);
}
