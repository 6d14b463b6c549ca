//! Retention: archives stay until their expiry, `gc` drops them afterwards (never a restored
//! one), and a rollback whose archive was collected is refused with the reason.

use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;
use chrono::{Duration, Utc};

async fn gc_honours_retention(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let text =
        mini_challenge_spec(&[("archive_retention_days = 30", "archive_retention_days = 14")]);
    let backfill = Backfill::open(Spec::parse(&text).unwrap(), text, &db.url)
        .await
        .unwrap();
    let RunOutcome::Published {
        run_id, archive, ..
    } = backfill.run("test", &Quiet).await.unwrap()
    else {
        panic!("not published")
    };
    let store = control_store(&warehouse);

    // Within retention: kept.
    let report = publish::gc(&store, Utc::now() + Duration::days(13), false)
        .await
        .unwrap();
    assert!(report.dropped.is_empty() && report.kept == 1, "{report:?}");
    assert!(table_exists(&warehouse, &archive).await);

    // Past retention, dry run: listed, not dropped.
    let report = publish::gc(&store, Utc::now() + Duration::days(15), true)
        .await
        .unwrap();
    assert_eq!(report.dropped, vec![archive.clone()]);
    assert!(table_exists(&warehouse, &archive).await);

    // Past retention: dropped and recorded; rollback is then refused with the reason.
    let report = publish::gc(&store, Utc::now() + Duration::days(15), false)
        .await
        .unwrap();
    assert_eq!(report.dropped, vec![archive.clone()]);
    assert!(!table_exists(&warehouse, &archive).await);
    assert!(
        store
            .archives()
            .await
            .unwrap()
            .iter()
            .all(|a| a.dropped_at.is_some())
    );
    let refused = publish::rollback(&store, &run_id)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("dropped by gc"), "{refused}");
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    // Nothing left to collect.
    assert!(
        publish::gc(&store, Utc::now() + Duration::days(60), false)
            .await
            .unwrap()
            .dropped
            .is_empty()
    );
}

async fn restored_archives_are_never_collected(db: TestDatabase) {
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
        panic!("not published")
    };
    let store = control_store(&warehouse);
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let rolled = publish::rollback(&store, &run_id).await.unwrap();
    let restored = checksum(&warehouse, "fact_order_items", None).await;
    assert_ne!(before, restored);
    // gc collects the rolled-back (backfilled) table, never the restored live table.
    let report = publish::gc(&store, Utc::now() + Duration::days(31), false)
        .await
        .unwrap();
    assert_eq!(report.dropped, vec![rolled.kept_as.clone()]);
    assert!(table_exists(&warehouse, "fact_order_items").await);
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        restored
    );
    assert_eq!(
        demo::daily_totals(&warehouse).await.unwrap().len(),
        demo::DAYS as usize
    );
}

on_engines!(gc_honours_retention: sqlite, postgres, mysql);
on_engines!(restored_archives_are_never_collected: sqlite, postgres, mysql);
