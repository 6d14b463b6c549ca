//! The diff report of a run, on the mini challenge: before publishing (target vs shadow, a run
//! waiting for approval) and after (archive vs target) it reports per partition exactly the
//! rows added, removed and changed and the quantity totals that SQL computed independently on
//! the seeded data says, lists changed rows with old and new values, and saves JSON and a
//! self-contained HTML page with the chart.

use backfill_coordinator::demo;
use backfill_tests::*;

async fn expected_per_day(
    warehouse: &backfill_common::warehouse::Warehouse,
    day: &str,
) -> (i64, i64, i64, i64, i64) {
    let q = |sql: String| async move { count(warehouse, &sql).await };
    let old_rows = q(format!(
        "SELECT count(*) FROM fact_order_items WHERE order_date = '{day}'"
    ))
    .await;
    let new_rows = q(format!(
        "SELECT count(*) FROM expected_order_items WHERE order_date = '{day}'"
    ))
    .await;
    let removed = q(format!(
        "SELECT count(*) FROM fact_order_items f WHERE f.order_date = '{day}' AND NOT EXISTS \
         (SELECT 1 FROM expected_order_items e WHERE e.order_id = f.order_id AND e.item_id = f.item_id)"
    ))
    .await;
    let changed = q(format!(
        "SELECT count(*) FROM fact_order_items f JOIN expected_order_items e ON e.order_id = f.order_id AND e.item_id = f.item_id \
         WHERE f.order_date = '{day}' AND (f.quantity <> e.quantity OR f.unit_price <> e.unit_price OR f.sku <> e.sku OR f.updated_at <> e.updated_at)"
    ))
    .await;
    let new_quantity = q(format!(
        "SELECT CAST(coalesce(sum(quantity), 0) AS bigint) FROM expected_order_items WHERE order_date = '{day}'"
    ))
    .await;
    (old_rows, new_rows, removed, changed, new_quantity)
}

async fn diff_matches_the_data(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut expected = Vec::new();
    for day in demo::BUG_DAYS {
        expected.push((day, expected_per_day(&warehouse, day).await));
    }
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("fix.toml");
    std::fs::write(
        &spec_path,
        demo::MINI_CHALLENGE_SPEC.replace("[publish]\n", "[publish]\napproval = \"manual\"\n"),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(workspace_bin("backfill"))
            .args(args)
            .env("BACKFILL_WAREHOUSE_URL", &db.url)
            .output()
            .unwrap();
        let shown = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "{args:?}: {shown}");
        shown
    };
    cli(&["run", spec_path.to_str().unwrap(), "--no-progress"]);
    let run_id = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0)
        .run_id;
    let out_dir = dir.path().to_str().unwrap().to_string();

    for phase in ["before publish", "after publish"] {
        let shown = cli(&[
            "status",
            &run_id,
            "--diff",
            "--diff-dir",
            &out_dir,
            "--sample",
            "5",
        ]);
        assert!(
            shown.contains("sample of changed rows (5 shown)"),
            "{phase}: {shown}"
        );
        assert!(shown.contains("quantity: "), "{shown}");
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("backfill-diff-{run_id}.json")))
                .unwrap(),
        )
        .unwrap();
        let partitions = report["partitions"].as_array().unwrap();
        assert_eq!(partitions.len(), 4, "{phase}");
        let quantity = report["totaled_columns"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c == "quantity")
            .expect("quantity is totaled");
        for (day, (old_rows, new_rows, removed, changed, new_quantity)) in &expected {
            let p = partitions.iter().find(|p| p["partition"] == *day).unwrap();
            assert_eq!(p["old_rows"], *old_rows, "{phase} {day}");
            assert_eq!(p["new_rows"], *new_rows, "{phase} {day}");
            assert_eq!(p["removed"], *removed, "{phase} {day}");
            assert_eq!(p["added"], 0, "{phase} {day}");
            assert_eq!(p["changed"], *changed, "{phase} {day}");
            assert_eq!(
                p["sums"][quantity][1].as_f64().unwrap() as i64,
                *new_quantity,
                "{phase} {day}"
            );
        }
        assert_eq!(report["sample"].as_array().unwrap().len(), 5);
        let html = std::fs::read_to_string(dir.path().join(format!("backfill-diff-{run_id}.html")))
            .unwrap();
        assert!(
            html.contains("<svg") && html.contains("2024-03-04") && html.contains("sum(quantity)")
        );
        if phase == "before publish" {
            cli(&["publish", &run_id]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_report_on_postgres() {
    diff_matches_the_data(TestDatabase::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_report_on_sqlite() {
    diff_matches_the_data(TestDatabase::sqlite()).await;
}
