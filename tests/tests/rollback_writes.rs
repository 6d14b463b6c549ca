//! A rollback never loses a write silently. Rows written to the target after a publish are
//! either kept (rows outside a `swap_window` window, which a window rollback does not touch)
//! or make the rollback refuse with nothing changed, saying how many rows changed, until
//! the user says `--discard-writes-since-publish`; the table as it was is then kept as the
//! run's `__bf_undone_` table, the writes in it. For every mode, writes inside and outside
//! the window, on every engine.

use backfill_common::error::BackfillError;
use backfill_common::spec::Spec;
use backfill_common::warehouse::Warehouse;
use backfill_coordinator::demo;
use backfill_coordinator::publish::{self, RollbackOptions};
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

/// A row of the mini challenge's target on `day`.
fn new_item(order_id: i64, day: &str) -> String {
    format!(
        "INSERT INTO fact_order_items (order_id, item_id, order_date, sku, quantity, unit_price, updated_at) \
         VALUES ({order_id}, 1, '{day}', 'LATE', 7, 1.5, '{day} 23:00:00')"
    )
}

async fn items_of(warehouse: &Warehouse, order_id: i64, table: &str) -> i64 {
    count(
        warehouse,
        &format!("SELECT count(*) FROM {table} WHERE order_id = {order_id}"),
    )
    .await
}

/// Publishes the mini challenge (seeded by `prepare`) in `mode`; returns the run id.
async fn publish_mini_challenge(db: &TestDatabase, mode: &str) -> String {
    let spec =
        demo::MINI_CHALLENGE_SPEC.replace("mode = \"swap_table\"", &format!("mode = \"{mode}\""));
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    match backfill.run("test", &Quiet).await.unwrap() {
        RunOutcome::Published { run_id, .. } => run_id,
        other => panic!("{other:?}"),
    }
}

async fn undone_table(warehouse: &Warehouse, run_id: &str) -> String {
    let report = control_store(warehouse)
        .archives()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.run_id == run_id && a.kind == "rolled_back")
        .expect("the rollback recorded what it replaced");
    report.archive_table
}

/// A write at `day` after the publish makes the rollback refuse; the table is unchanged;
/// with `--discard-writes-since-publish` it rolls back and the write is in the undone table.
async fn refuses_then_discards_when_asked(db: TestDatabase, mode: &str, day: &str) {
    let run_id = publish_mini_challenge(&db, mode).await;
    let warehouse = db.warehouse().await;
    exec(&warehouse, &new_item(9001, day)).await;
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let store = control_store(&warehouse);
    let refused = publish::rollback(&store, &run_id).await.unwrap_err();
    let message = refused.to_string();
    assert!(matches!(refused, BackfillError::Conflict(_)), "{refused:?}");
    assert!(
        message.contains("changed since run")
            && message.contains("1 more")
            && message.contains("--discard-writes-since-publish"),
        "{message}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        before,
        "a refused rollback changes nothing"
    );
    assert_eq!(
        store
            .find_run(&run_id)
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str(),
        "published"
    );

    publish::rollback_with(
        &store,
        &run_id,
        RollbackOptions {
            discard_writes_since_publish: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "production_before", None).await,
        "the pre-publish table is back"
    );
    let undone = undone_table(&warehouse, &run_id).await;
    assert_eq!(
        items_of(&warehouse, 9001, &undone).await,
        1,
        "the discarded write is kept in {undone}"
    );
}

/// Keeps a copy of the target as it is before the publish, to compare with after rollback.
async fn keep_production(db: &TestDatabase) {
    let warehouse = db.warehouse().await;
    exec(
        &warehouse,
        "CREATE TABLE production_before AS SELECT * FROM fact_order_items",
    )
    .await;
}

async fn swap_table_refuses_over_a_write_outside_the_window(db: TestDatabase) {
    prepare(&db).await;
    refuses_then_discards_when_asked(db, "swap_table", "2024-03-09").await;
}

async fn swap_table_refuses_over_a_write_inside_the_window(db: TestDatabase) {
    prepare(&db).await;
    refuses_then_discards_when_asked(db, "swap_table", "2024-03-04").await;
}

async fn swap_window_refuses_over_a_write_inside_the_window(db: TestDatabase) {
    prepare(&db).await;
    refuses_then_discards_when_asked(db, "swap_window", "2024-03-04").await;
}

/// A window rollback leaves the rows outside the window as they are: a write there after the
/// publish survives the rollback, which goes ahead.
async fn swap_window_keeps_a_write_outside_the_window(db: TestDatabase) {
    prepare(&db).await;
    let run_id = publish_mini_challenge(&db, "swap_window").await;
    let warehouse = db.warehouse().await;
    exec(&warehouse, &new_item(9002, "2024-03-09")).await;
    publish::rollback(&control_store(&warehouse), &run_id)
        .await
        .unwrap();
    assert_eq!(items_of(&warehouse, 9002, "fact_order_items").await, 1);
    exec(
        &warehouse,
        "DELETE FROM fact_order_items WHERE order_id = 9002",
    )
    .await;
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "production_before", None).await
    );
}

/// The seed, and a copy of the target before any publish.
async fn prepare(db: &TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    keep_production(db).await;
}

on_engines!(swap_table_refuses_over_a_write_outside_the_window: sqlite, postgres, mysql);
on_engines!(swap_table_refuses_over_a_write_inside_the_window: sqlite, postgres, mysql);
on_engines!(swap_window_refuses_over_a_write_inside_the_window: sqlite, postgres, mysql);
on_engines!(swap_window_keeps_a_write_outside_the_window: sqlite, postgres, mysql);

/// swap_partitions (PostgreSQL): a write into a swapped partition makes the rollback refuse;
/// a write into another partition is kept, and the rollback goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_partitions_rollback_over_writes() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    for sql in [
        "CREATE TABLE sales (id bigint NOT NULL, day date NOT NULL, amount bigint NOT NULL, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
        "CREATE TABLE sales_2024_01 PARTITION OF sales FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')",
        "CREATE TABLE sales_2024_02 PARTITION OF sales FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')",
        "INSERT INTO sales SELECT g, DATE '2024-01-01' + CAST((g - 1) / 50 AS integer), g % 500 FROM generate_series(1, 59 * 50) AS g",
        "CREATE TABLE sales_fixed AS SELECT id, day, amount * 2 AS amount FROM sales WHERE day >= DATE '2024-02-01'",
        "CREATE TABLE sales_before AS SELECT * FROM sales",
    ] {
        exec(&warehouse, sql).await;
    }
    let spec = r#"
name = "fix_sales"

[target]
table = "sales"
key = ["id", "day"]

[partition]
column = "day"
grain = "day"
first = "2024-02-01"
last = "2024-02-29"

[source]
query = "SELECT id, day, amount FROM sales_fixed WHERE day >= :partition_start AND day < :partition_end"

[warehouse]
name = "sales"

[publish]
mode = "swap_partitions"
"#;
    let publish_once = || async {
        let backfill = Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
            .await
            .unwrap();
        match backfill.run("test", &Quiet).await.unwrap() {
            RunOutcome::Published { run_id, .. } => run_id,
            other => panic!("{other:?}"),
        }
    };
    let store = control_store(&warehouse);

    let run_id = publish_once().await;
    exec(
        &warehouse,
        "INSERT INTO sales VALUES (900001, DATE '2024-02-10', 5)",
    )
    .await;
    let refused = publish::rollback(&store, &run_id).await.unwrap_err();
    assert!(
        refused.to_string().contains("sales_2024_02") && refused.to_string().contains("1 more"),
        "{refused}"
    );
    exec(&warehouse, "DELETE FROM sales WHERE id = 900001").await;
    // January was not swapped: a write there is kept by the rollback.
    exec(
        &warehouse,
        "INSERT INTO sales VALUES (900002, DATE '2024-01-10', 5)",
    )
    .await;
    publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM sales WHERE id = 900002").await,
        1
    );
    exec(&warehouse, "DELETE FROM sales WHERE id = 900002").await;
    assert_eq!(
        checksum(&warehouse, "sales", None).await,
        checksum(&warehouse, "sales_before", None).await
    );
}

/// The command line: `backfill rollback` over a write since publish exits 2 and says what to
/// run; with `--discard-writes-since-publish` it rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollback_command_refuses_with_exit_2_then_discards_when_asked() {
    let db = TestDatabase::sqlite();
    prepare(&db).await;
    let run_id = publish_mini_challenge(&db, "swap_table").await;
    let warehouse = db.warehouse().await;
    exec(&warehouse, &new_item(9003, "2024-03-08")).await;
    let rollback = |extra: &[&str]| {
        let mut command = std::process::Command::new(backfill_bin());
        command
            .args(["rollback", &run_id, "--warehouse-url", &db.url])
            .args(extra);
        command.output().unwrap()
    };
    let output = rollback(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("1 more") && stderr.contains("--discard-writes-since-publish"),
        "{stderr}"
    );
    assert_eq!(items_of(&warehouse, 9003, "fact_order_items").await, 1);
    let output = rollback(&["--discard-writes-since-publish"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(items_of(&warehouse, 9003, "fact_order_items").await, 0);
    let undone = undone_table(&warehouse, &run_id).await;
    assert_eq!(items_of(&warehouse, 9003, &undone).await, 1);
}
