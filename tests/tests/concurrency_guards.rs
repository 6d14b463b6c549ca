//! Guards against a second writer: writes to the target after the shadow was built block the
//! publish instead of being discarded; two specs cannot run on one target at once; a stale
//! process cannot move a run's state backwards; rollback waits for open runs.

use std::time::Duration;

use backfill_common::control::RunState;
use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

fn slow_spec() -> String {
    mini_challenge_spec(&[(
        "FROM staging_order_items\n",
        "FROM staging_order_items CROSS JOIN (SELECT pg_sleep(0.5)) AS slow\n",
    )])
}

async fn wait_for_open_run(db: &TestDatabase) -> String {
    let store = control_store(&db.warehouse().await);
    for _ in 0..200 {
        if let Ok(runs) = store.all_runs().await
            && let Some(run) = runs.first()
        {
            return run.run_id.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no run appeared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_the_shadow_block_the_publish() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let text = slow_spec();
    let url = db.url.clone();
    let running = tokio::spawn(async move {
        let backfill = Backfill::open(Spec::parse(&text).unwrap(), text, &url)
            .await
            .unwrap();
        backfill.run("test", &Quiet).await
    });
    let run_id = wait_for_open_run(&db).await;
    // A late write outside the window, while partitions are being written.
    exec(&warehouse, "INSERT INTO fact_order_items VALUES (99999, 1, DATE '2024-03-09', 'SKU-LATE', 1, 1.0, TIMESTAMP '2024-03-21 00:00:00')").await;
    let error = running.await.unwrap().unwrap_err().to_string();
    assert!(
        error.contains("changed outside the window since the shadow was built")
            && error.contains("Nothing was published"),
        "{error}"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM fact_order_items WHERE order_id = 99999"
        )
        .await,
        1,
        "the late write survives"
    );
    let store = control_store(&warehouse);
    assert!(
        store.archives().await.unwrap().is_empty(),
        "nothing was archived"
    );
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Auditing
    );
    // The advice is one that keeps the writers' rows: swap_window, or pausing them; never
    // widening the window over them (which would replace their rows with the recompute).
    assert!(
        error.contains("swap_window")
            && error.contains(&format!("backfill abandon {run_id}"))
            && !error.contains("backfill their partitions"),
        "{error}"
    );
    // Following it: abandon, swap_window, run again. The late write is kept, the window fixed.
    let record = store.find_run(&run_id).await.unwrap().unwrap();
    backfill_coordinator::publish::drop_shadow(&store, &record)
        .await
        .unwrap();
    let text = demo::MINI_CHALLENGE_SPEC.replace("mode = \"swap_table\"", "mode = \"swap_window\"");
    let outcome = Backfill::open(Spec::parse(&text).unwrap(), text.clone(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            backfill_coordinator::runner::RunOutcome::Published { .. }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM fact_order_items WHERE order_id = 99999"
        )
        .await,
        1,
        "the late write survives the publish"
    );
    exec(
        &warehouse,
        "DELETE FROM fact_order_items WHERE order_id = 99999",
    )
    .await;
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_specs_cannot_run_on_one_target_at_once() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    control_store(&warehouse).migrate().await.unwrap();
    // Both start while the target is locked, so both pass the "no open run" check.
    let mut lock = warehouse.begin().await.unwrap();
    backfill_common::warehouse::execute(
        &mut lock,
        "LOCK TABLE fact_order_items IN ACCESS EXCLUSIVE MODE",
        &[],
    )
    .await
    .unwrap();
    let mut handles = Vec::new();
    for (first, last) in [("2024-03-03", "2024-03-04"), ("2024-03-05", "2024-03-06")] {
        let text = mini_challenge_spec(&[
            ("first = \"2024-03-03\"", &format!("first = \"{first}\"")),
            ("last = \"2024-03-06\"", &format!("last = \"{last}\"")),
        ]);
        let url = db.url.clone();
        handles.push(tokio::spawn(async move {
            let backfill = Backfill::open(Spec::parse(&text).unwrap(), text, &url)
                .await
                .unwrap();
            backfill.run("test", &Quiet).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lock.commit().await.unwrap();
    let mut published = 0;
    let mut refused = Vec::new();
    for handle in handles {
        match handle.await.unwrap() {
            Ok(RunOutcome::Published { .. }) => published += 1,
            Ok(other) => panic!("{other:?}"),
            Err(error) => refused.push(error.to_string()),
        }
    }
    assert_eq!(published, 1, "exactly one publishes: {refused:?}");
    assert!(
        refused[0].contains("only one run per target may be open")
            || refused[0].contains("never joins a run in progress"),
        "{refused:?}"
    );
    assert_eq!(control_store(&warehouse).archives().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_process_cannot_move_a_run_backwards_and_rollback_waits_for_open_runs() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let backfill = Backfill::open(
        Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap(),
        demo::MINI_CHALLENGE_SPEC.into(),
        &db.url,
    )
    .await
    .unwrap();
    let RunOutcome::Published { run_id, .. } = backfill.run("test", &Quiet).await.unwrap() else {
        panic!()
    };
    let store = control_store(&warehouse);
    // A stale coordinator that still believes the run is writing partitions:
    let error = store
        .set_run_state_now(&run_id, &[RunState::Running], RunState::Auditing, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("is published now") && error.contains("another backfill process"),
        "{error}"
    );
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Published
    );

    // An open run (audits fail) blocks the rollback of the earlier one.
    let holding = mini_challenge_spec(&[(
        "[publish]",
        "[[audit]]\nkind = \"expression\"\nname = \"hold\"\nexpression = \"1 = 0\"\n\n[publish]",
    )]);
    let open = Backfill::open(Spec::parse(&holding).unwrap(), holding.clone(), &db.url)
        .await
        .unwrap();
    let RunOutcome::AuditFailed {
        run_id: open_id, ..
    } = open.run("test", &Quiet).await.unwrap()
    else {
        panic!()
    };
    let refused = publish::rollback(&store, &run_id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains(&open_id) && refused.contains("Abandon it first"),
        "{refused}"
    );
    let record = store.find_run(&open_id).await.unwrap().unwrap();
    publish::drop_shadow(&store, &record).await.unwrap();
    publish::rollback(&store, &run_id).await.unwrap();
}

/// A control store migrated by a newer version (here: a migration this binary does not
/// know) is refused, on both dialects, before anything is read or written: an older binary
/// would misread what the newer one recorded. The refusal says to upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_store_from_a_newer_version_is_refused() {
    for db in [
        TestDatabase::postgres().await,
        TestDatabase::sqlite(),
        TestDatabase::mysql().await,
    ] {
        let warehouse = db.warehouse().await;
        let store = control_store(&warehouse);
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        exec(
            &warehouse,
            &format!(
                "INSERT INTO {} (version, description, applied_at) VALUES (999, 'from the future', '2030-01-01')",
                store.table("schema_migrations")
            ),
        )
        .await;
        let error = store.migrate().await.unwrap_err().to_string();
        assert!(
            error.contains("migrated by a newer backfill (version 999")
                && error.contains("upgrade this binary"),
            "{error}"
        );
    }
}

/// Processes that start at once on a fresh warehouse all migrate its control store: one
/// applies each version, the others wait for it (PostgreSQL's advisory lock, SQLite's write
/// lock, MySQL's named lock, which outlives the commits its DDL makes and is released after),
/// and each version is recorded once. A migrator that comes later finds nothing to do at once.
async fn migrators_starting_together_apply_each_version_once(db: TestDatabase) {
    let mut handles = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        handles.push(tokio::spawn(async move {
            let warehouse = backfill_common::warehouse::Warehouse::connect(&url, 2)
                .await
                .unwrap();
            control_store(&warehouse).migrate().await
        }));
    }
    for handle in handles {
        handle.await.unwrap().unwrap();
    }
    let warehouse = db.warehouse().await;
    let store = control_store(&warehouse);
    let versions = count(
        &warehouse,
        &format!("SELECT count(*) FROM {}", store.table("schema_migrations")),
    )
    .await;
    let distinct = count(
        &warehouse,
        &format!(
            "SELECT count(DISTINCT version) FROM {}",
            store.table("schema_migrations")
        ),
    )
    .await;
    assert_eq!((versions, distinct), (5, 5), "versions 1 to 5, each once");
    let started = std::time::Instant::now();
    store.migrate().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "no lock was left behind"
    );
}

on_engines!(migrators_starting_together_apply_each_version_once: sqlite, postgres, mysql);
