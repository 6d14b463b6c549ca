//! Every stop leads somewhere: the states a user reaches after a failure are left by running
//! the same command again, and a spec that was published is run again when its window no
//! longer holds what it published. Data checked, not only outcomes.

use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn run_spec(db: &TestDatabase, spec: &str) -> RunOutcome {
    Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap()
}

/// A negative quantity in the source fails the `non_negative_quantity` audit; once the source
/// is fixed, the same command applies the partitions again (it used to audit the old shadow
/// and fail again, until `abandon` and a full rerun) and publishes the fixed data.
async fn a_rerun_after_a_fixed_source_publishes_the_fix(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    exec(
        &warehouse,
        "UPDATE staging_order_items SET quantity = -quantity WHERE order_id = (SELECT min(order_id) FROM expected_order_items WHERE order_date = '2024-03-04')",
    )
    .await;
    let spec = demo::MINI_CHALLENGE_SPEC;
    let RunOutcome::AuditFailed { run_id, failures } = run_spec(&db, spec).await else {
        panic!("the negative quantity fails an audit")
    };
    assert!(
        failures
            .iter()
            .any(|f| f.audit_name == "non_negative_quantity"),
        "{failures:?}"
    );
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);

    exec(
        &warehouse,
        "UPDATE staging_order_items SET quantity = -quantity WHERE quantity < 0",
    )
    .await;
    let RunOutcome::Published {
        run_id: published, ..
    } = run_spec(&db, spec).await
    else {
        panic!("the rerun after the fix did not publish")
    };
    assert_eq!(published, run_id, "the same run carried on");
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await,
        "the published data is the fixed source's"
    );
}

on_engines!(a_rerun_after_a_fixed_source_publishes_the_fix: sqlite, postgres, mysql);

/// A published spec run again: nothing to do while the window holds what was published; once
/// the target was re-created with the old (buggy) data, or its window rows written over with
/// them, a new run fixes it again.
async fn a_published_spec_fixes_a_re_created_target(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE TABLE production_before AS SELECT * FROM fact_order_items",
    )
    .await;
    let spec = demo::MINI_CHALLENGE_SPEC;
    let RunOutcome::Published { run_id, .. } = run_spec(&db, spec).await else {
        panic!("not published")
    };
    let again = run_spec(&db, spec).await;
    assert!(
        matches!(&again, RunOutcome::AlreadyPublished { run_id: done } if *done == run_id),
        "{again:?}"
    );
    if db.url.starts_with("sqlite") {
        // The window's rows written over with the old ones (re-creating the table under its
        // name fails on SQLite, whose archive keeps the index names).
        exec(
            &warehouse,
            "DELETE FROM fact_order_items WHERE order_date >= '2024-03-03' AND order_date <= '2024-03-06'",
        )
        .await;
        exec(
            &warehouse,
            "INSERT INTO fact_order_items SELECT * FROM production_before WHERE order_date >= '2024-03-03' AND order_date <= '2024-03-06'",
        )
        .await;
    } else {
        // Re-created (the seed drops and re-creates the tables with the bug in them).
        demo::seed_mini_challenge(&warehouse).await.unwrap();
    }
    assert_ne!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    let RunOutcome::Published { run_id: second, .. } = run_spec(&db, spec).await else {
        panic!("a new run was expected")
    };
    assert_ne!(second, run_id, "a new run");
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

on_engines!(a_published_spec_fixes_a_re_created_target: sqlite, postgres, mysql);

/// `backfill status <run> | head`: the reader goes away; the command ends quietly, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_into_a_closed_pipe_ends_quietly() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let RunOutcome::Published { run_id, .. } = run_spec(&db, demo::MINI_CHALLENGE_SPEC).await
    else {
        panic!("not published")
    };
    let mut child = std::process::Command::new(backfill_bin())
        .args(["status", &run_id, "--warehouse-url", &db.url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `head` read its lines and left
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert_eq!(output.status.code(), Some(141), "{stderr}");
}

/// Database errors keep PostgreSQL's DETAIL and HINT lines and drop the server's source line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_keep_detail_and_hint() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    exec(&warehouse, "CREATE TABLE keyed (id bigint PRIMARY KEY)").await;
    exec(&warehouse, "INSERT INTO keyed VALUES (1)").await;
    let mut conn = warehouse.acquire().await.unwrap();
    let error = backfill_common::warehouse::execute(&mut conn, "INSERT INTO keyed VALUES (1)", &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("DETAIL: Key (id)=(1) already exists."),
        "{error}"
    );
    assert!(!error.contains(" at line "), "{error}");
    let error = backfill_common::warehouse::execute(&mut conn, "SELECT * FROM keyd", &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("relation \"keyd\" does not exist") && !error.contains(" at line "),
        "{error}"
    );
}
