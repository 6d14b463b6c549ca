//! The lesson's mini challenge end to end, on SQLite and PostgreSQL: the fixed table equals
//! the expected data, untouched days are byte-identical, the view reads the new data, a rerun
//! changes nothing, and rollback restores the exact pre-publish content.

use backfill_common::spec::Spec;
use backfill_coordinator::demo::{self, BUG_DAYS};
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

const DAY_FILTER_PG: &str = "t.order_date = CAST('{day}' AS date)";
const DAY_FILTER_SQLITE: &str = "t.order_date = '{day}'";

async fn mini_challenge_end_to_end(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let day_filter = if db.typed_dates() {
        DAY_FILTER_PG
    } else {
        DAY_FILTER_SQLITE
    };
    let untouched: Vec<String> = (0..demo::DAYS)
        .map(demo::day)
        .filter(|d| !BUG_DAYS.contains(&d.as_str()))
        .collect();
    let mut untouched_before = Vec::new();
    for day in &untouched {
        untouched_before.push(
            checksum(
                &warehouse,
                "fact_order_items",
                Some(&day_filter.replace("{day}", day)),
            )
            .await,
        );
    }
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let window_before = checksum(
        &warehouse,
        "fact_order_items",
        Some(&window_filter(db.typed_dates())),
    )
    .await;
    let before_recorded = product_checksum(&warehouse, "fact_order_items", None).await;
    let window_before_recorded = product_checksum(
        &warehouse,
        "fact_order_items",
        Some(&window_filter(db.typed_dates())),
    )
    .await;
    let view_before = demo::daily_totals(&warehouse).await.unwrap();

    let spec_text = demo::MINI_CHALLENGE_SPEC.to_string();
    let spec = Spec::parse(&spec_text).unwrap();
    let backfill = Backfill::open(spec, spec_text.clone(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id,
        archive,
        partitions,
        publish_mode,
    } = outcome
    else {
        panic!("expected a publish, got {outcome:?}");
    };
    assert_eq!(partitions, 4);
    assert_eq!(
        publish_mode,
        backfill_common::spec::PublishMode::SwapTable,
        "the mode the spec names"
    );

    // The data: exactly the expected corrected table, no duplicates, untouched days identical.
    let after = checksum(&warehouse, "fact_order_items", None).await;
    let expected = checksum(&warehouse, "expected_order_items", None).await;
    assert_eq!(
        after, expected,
        "the fixed table must equal the expected data"
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
    for (day, before) in untouched.iter().zip(&untouched_before) {
        let now = checksum(
            &warehouse,
            "fact_order_items",
            Some(&day_filter.replace("{day}", day)),
        )
        .await;
        assert_eq!(&now, before, "untouched day {day} must be byte-identical");
    }
    let mode = control_store(&warehouse)
        .run_note(&run_id, backfill_common::control::RunNote::PublishMode)
        .await
        .unwrap();
    if mode.as_deref() == Some("swap_window") {
        assert_eq!(
            checksum(&warehouse, &archive, None).await,
            window_before,
            "the archive is the old window"
        );
    } else {
        assert_eq!(
            checksum(&warehouse, &archive, None).await,
            before,
            "the archive is the old table"
        );
    }

    // The dashboard view reads the new data.
    let view_after = demo::daily_totals(&warehouse).await.unwrap();
    for (b, a) in view_before.iter().zip(&view_after) {
        if BUG_DAYS.contains(&b.day.as_str()) {
            assert!(
                a.total_quantity * 2 <= b.total_quantity,
                "{}: {} -> {}",
                b.day,
                b.total_quantity,
                a.total_quantity
            );
        } else {
            assert_eq!(a, b);
        }
    }

    // Checkpoints: every partition applied exactly once, counts add up.
    let store = control_store(&warehouse);
    let records = store.partitions(&run_id).await.unwrap();
    assert_eq!(records.len(), 4);
    let expected_window_rows = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM expected_order_items AS t WHERE {}",
            window_filter(db.typed_dates())
        ),
    )
    .await;
    assert_eq!(records.iter().map(|p| p.times_applied).sum::<i64>(), 4);
    assert_eq!(
        records
            .iter()
            .map(|p| p.counts.unwrap().inserted)
            .sum::<i64>(),
        expected_window_rows
    );

    // A rerun of a finished run changes nothing.
    let backfill = Backfill::open(Spec::parse(&spec_text).unwrap(), spec_text.clone(), &db.url)
        .await
        .unwrap();
    let again = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(again, RunOutcome::AlreadyPublished { run_id: ref r } if *r == run_id),
        "{again:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        expected
    );

    // Rollback restores the exact pre-publish content, and the view works again.
    let report = publish::rollback(&store, &run_id).await.unwrap();
    if mode.as_deref() == Some("swap_window") {
        assert_eq!(
            report.checksum, window_before_recorded,
            "the window restored"
        );
    } else {
        assert_eq!(report.checksum, before_recorded, "the table restored");
    }
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    assert_eq!(demo::daily_totals(&warehouse).await.unwrap(), view_before);
    assert!(
        table_exists(&warehouse, &report.kept_as).await,
        "the backfilled table is kept after rollback"
    );
    let second = publish::rollback(&store, &run_id)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        second.contains("only a published run can be rolled back"),
        "{second}"
    );
}

fn window_filter(typed_dates: bool) -> String {
    if typed_dates {
        "t.order_date BETWEEN CAST('2024-03-03' AS date) AND CAST('2024-03-06' AS date)".into()
    } else {
        "t.order_date BETWEEN '2024-03-03' AND '2024-03-06'".into()
    }
}

on_engines!(mini_challenge_end_to_end: sqlite, postgres, mysql);

/// PostgreSQL: grants and the table comment carry over to the published table, and a view
/// keeps reading the target through the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_swap_keeps_grants_comment_and_views() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let role = format!(
        "bf_reader_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    exec(&warehouse, &format!("CREATE ROLE {role}")).await;
    exec(
        &warehouse,
        &format!("GRANT SELECT ON fact_order_items TO {role}"),
    )
    .await;
    exec(
        &warehouse,
        "COMMENT ON TABLE fact_order_items IS 'order items, one row per item'",
    )
    .await;
    let backfill = Backfill::open(
        Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap(),
        demo::MINI_CHALLENGE_SPEC.into(),
        &db.url,
    )
    .await
    .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    let granted = count(
        &warehouse,
        &format!(
            "SELECT CAST(has_table_privilege('{role}', 'fact_order_items', 'SELECT') AS integer)"
        ),
    )
    .await;
    let comment = count(
        &warehouse,
        "SELECT CAST(obj_description(CAST('fact_order_items' AS regclass), 'pg_class') = 'order items, one row per item' AS integer)",
    )
    .await;
    // the view must depend on the live table, not on the archive
    let view_on_live = count(
        &warehouse,
        "SELECT count(*) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
         WHERE r.ev_class = CAST('daily_quantity' AS regclass) AND d.refobjid = CAST('fact_order_items' AS regclass)",
    )
    .await;
    exec(&warehouse, &format!("DROP OWNED BY {role}")).await;
    exec(&warehouse, &format!("DROP ROLE {role}")).await;
    assert_eq!(granted, 1, "SELECT grant must follow the published table");
    assert_eq!(
        comment, 1,
        "the table comment must follow the published table"
    );
    assert!(
        view_on_live > 0,
        "daily_quantity must read the published table"
    );
}

/// Migrations, monitoring and dashboards name indexes and constraints: publishing a
/// `swap_table` backfill and rolling it back leave the live table's index and constraint names
/// as they were (a primary key, a named unique constraint whose name is the longest PostgreSQL
/// allows, a partial expression index); the archive's and the undone table's step aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_swap_and_rollback_keep_index_and_constraint_names() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let long_name = format!("fact_order_items_sku_item_unique_{}", "x".repeat(30));
    assert_eq!(long_name.len(), 63);
    exec(
        &warehouse,
        &format!("ALTER TABLE fact_order_items ADD CONSTRAINT {long_name} UNIQUE (order_id, item_id, sku)"),
    )
    .await;
    exec(
        &warehouse,
        "CREATE INDEX \"Big Quantities\" ON fact_order_items (lower(sku)) WHERE quantity > 10",
    )
    .await;
    // Storage parameters of a key index survive the deferred rebuild (and let the name match).
    exec(
        &warehouse,
        "ALTER INDEX fact_order_items_pkey SET (fillfactor = 70)",
    )
    .await;
    let before = index_names(&warehouse, "fact_order_items").await;
    assert_eq!(before.len(), 4, "{before:?}");
    let fillfactor = "SELECT count(*) FROM pg_class WHERE oid = CAST('fact_order_items_pkey' AS regclass) \
                      AND reloptions = ARRAY['fillfactor=70']";

    let backfill = Backfill::open(
        Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap(),
        demo::MINI_CHALLENGE_SPEC.into(),
        &db.url,
    )
    .await
    .unwrap();
    let RunOutcome::Published {
        run_id, archive, ..
    } = backfill.run("test", &Quiet).await.unwrap()
    else {
        panic!("expected a publish");
    };
    assert_eq!(
        index_names(&warehouse, "fact_order_items").await,
        before,
        "the published table has the names the live table had"
    );
    assert_eq!(
        count(&warehouse, fillfactor).await,
        1,
        "the key keeps its fillfactor"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    let archived = index_names(&warehouse, &archive).await;
    assert_eq!(archived.len(), 4, "{archived:?}");
    for name in &archived {
        let index = name.rsplit_once(' ').unwrap().0;
        assert!(
            index.ends_with(&format!("__bf_archive_{run_id}")) && index.len() <= 63,
            "archive index {name} steps aside: {archived:?}"
        );
    }

    let store = control_store(&warehouse);
    let report = publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(
        index_names(&warehouse, "fact_order_items").await,
        before,
        "rollback gives the restored table its names back"
    );
    let undone = index_names(&warehouse, &report.kept_as).await;
    assert_eq!(undone.len(), 4, "{undone:?}");
    assert!(
        undone.iter().all(|n| n
            .rsplit_once(' ')
            .unwrap()
            .0
            .ends_with(&format!("__bf_undone_{run_id}"))),
        "{undone:?}"
    );
    // The names are not only names: the constraint still holds on the restored table.
    let duplicate = "INSERT INTO fact_order_items SELECT * FROM fact_order_items LIMIT 1";
    let mut conn = warehouse.acquire().await.unwrap();
    let error = backfill_common::warehouse::execute(&mut conn, duplicate, &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("fact_order_items_pkey"), "{error}");
}
