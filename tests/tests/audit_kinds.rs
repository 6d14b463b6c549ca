//! The audit kinds added for publishing decisions, each failing on data crafted to fail it and
//! passing on clean data, with the report naming it: accepted_values, referential, custom_sql
//! (over `backfilled` and `current`). And the lesson's worked example 2: gross margin from SCD
//! costs valid at order_date, with its expression audits.

use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

const SCD_SPEC: &str = include_str!("../../examples/gross_margin_scd.toml");

async fn run_spec(db: &TestDatabase, spec: &str) -> RunOutcome {
    Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap()
}

fn with_audit(audit: &str) -> String {
    format!("{}\n[[audit]]\n{audit}\n", demo::MINI_CHALLENGE_SPEC)
}

/// Runs the mini challenge with one extra audit on a fresh copy of the data: Ok(()) when it
/// published, Err(observed) naming the failing audit otherwise (the target then untouched).
async fn verdict(db: TestDatabase, setup: &[&str], audit: &str, name: &str) -> Result<(), String> {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    for sql in setup {
        exec(&warehouse, sql).await;
    }
    let before = checksum(&warehouse, "fact_order_items", None).await;
    match run_spec(&db, &with_audit(audit)).await {
        RunOutcome::Published { .. } => Ok(()),
        RunOutcome::AuditFailed { failures, .. } => {
            assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
            assert!(
                failures.iter().all(|f| f.audit_name == name),
                "only {name} fails: {failures:?}"
            );
            Err(failures[0].observed.clone())
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_values() {
    let all = "kind = \"accepted_values\"\ncolumn = \"quantity\"\nvalues = [1, 2, 3, 4, 5]";
    assert_eq!(
        verdict(
            TestDatabase::postgres().await,
            &[],
            all,
            "accepted_values_quantity"
        )
        .await,
        Ok(())
    );
    assert_eq!(
        verdict(TestDatabase::sqlite(), &[], all, "accepted_values_quantity").await,
        Ok(())
    );
    let missing_five = "kind = \"accepted_values\"\ncolumn = \"quantity\"\nvalues = [1, 2, 3, 4]";
    let observed = verdict(
        TestDatabase::postgres().await,
        &[],
        missing_five,
        "accepted_values_quantity",
    )
    .await
    .unwrap_err();
    assert!(observed.contains("failing row"), "{observed}");
    verdict(
        TestDatabase::sqlite(),
        &[],
        missing_five,
        "accepted_values_quantity",
    )
    .await
    .unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referential() {
    let dim = "CREATE TABLE dim_sku AS SELECT DISTINCT sku FROM staging_order_items";
    let audit = "kind = \"referential\"\ncolumn = \"sku\"\nreferences = \"dim_sku.sku\"";
    assert_eq!(
        verdict(
            TestDatabase::postgres().await,
            &[dim],
            audit,
            "referential_sku"
        )
        .await,
        Ok(())
    );
    assert_eq!(
        verdict(TestDatabase::sqlite(), &[dim], audit, "referential_sku").await,
        Ok(())
    );
    // One sku sold in the window is missing from the dimension.
    let orphan = "DELETE FROM dim_sku WHERE sku = (SELECT min(sku) FROM staging_order_items WHERE order_date = '2024-03-04')";
    let observed = verdict(
        TestDatabase::postgres().await,
        &[dim, orphan],
        audit,
        "referential_sku",
    )
    .await
    .unwrap_err();
    assert!(observed.contains("failing row"), "{observed}");
    verdict(
        TestDatabase::sqlite(),
        &[dim, orphan],
        audit,
        "referential_sku",
    )
    .await
    .unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_sql_compares_backfilled_with_current() {
    // The fix halves doubled quantities: no backfilled row may exceed its current version.
    let never_more = "kind = \"custom_sql\"\nname = \"never_more_than_before\"\nsql = \"SELECT b.order_id FROM backfilled b JOIN current c ON c.order_id = b.order_id AND c.item_id = b.item_id WHERE b.quantity > c.quantity\"";
    assert_eq!(
        verdict(
            TestDatabase::postgres().await,
            &[],
            never_more,
            "never_more_than_before"
        )
        .await,
        Ok(())
    );
    assert_eq!(
        verdict(
            TestDatabase::sqlite(),
            &[],
            never_more,
            "never_more_than_before"
        )
        .await,
        Ok(())
    );
    // Crafted to fail: demands an increase, which the fix never makes.
    let always_more = never_more.replace("b.quantity > c.quantity", "b.quantity <= c.quantity");
    let observed = verdict(
        TestDatabase::postgres().await,
        &[],
        &always_more,
        "never_more_than_before",
    )
    .await
    .unwrap_err();
    assert!(observed.contains("failing row"), "{observed}");
    verdict(
        TestDatabase::sqlite(),
        &[],
        &always_more,
        "never_more_than_before",
    )
    .await
    .unwrap_err();
}

/// Orders of 2023-12 .. 2024-04, costs per sku changing on 2024-02-15, and a fact table whose
/// cost used the latest price for every day (the bug). The rows come from a recursive CTE,
/// the one series generator PostgreSQL and MySQL share.
async fn seed_scd(db: &TestDatabase, warehouse: &backfill_common::warehouse::Warehouse) {
    let mysql = db.engine() == "mysql";
    // Day arithmetic and the series, as each engine writes them.
    let plus_days = |days: &str| {
        if mysql {
            format!("DATE '2023-12-01' + INTERVAL ({days}) DAY")
        } else {
            format!("DATE '2023-12-01' + ({days})")
        }
    };
    // Up to 10,000 rows from two hundred-row recursions (MariaDB stops recursion at 1,000).
    let series = |to: u32| {
        format!(
            "WITH RECURSIVE d(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM d WHERE n < 99), \
             series(g) AS (SELECT a.n * 100 + b.n + 1 FROM d a CROSS JOIN d b WHERE a.n * 100 + b.n < {to})"
        )
    };
    let text = if mysql { "varchar(20)" } else { "text" };
    let statements = [
        format!(
            "CREATE TABLE staging_orders (order_id bigint PRIMARY KEY, order_date date NOT NULL, sku {text} NOT NULL, quantity integer NOT NULL, revenue numeric(12,2) NOT NULL)"
        ),
        format!(
            "INSERT INTO staging_orders {} SELECT g, {}, 'SKU-' || (g % 20), 1 + g % 4, (1 + g % 4) * (20 + g % 20) FROM series",
            series(6000),
            plus_days("g % 150")
        ),
        format!(
            "CREATE TABLE dim_costs_scd (sku {text} NOT NULL, unit_cost numeric(12,2) NOT NULL, effective_from date NOT NULL, effective_to date, PRIMARY KEY (sku, effective_from))"
        ),
        format!(
            "INSERT INTO dim_costs_scd {} SELECT 'SKU-' || (g - 1), 10 + (g - 1) % 5, DATE '2020-01-01', DATE '2024-02-15' FROM series",
            series(20)
        ),
        format!(
            "INSERT INTO dim_costs_scd {} SELECT 'SKU-' || (g - 1), 12 + (g - 1) % 5, DATE '2024-02-15', NULL FROM series",
            series(20)
        ),
        format!(
            "CREATE TABLE fact_orders_daily (order_id bigint PRIMARY KEY, order_date date NOT NULL, sku {text} NOT NULL, quantity integer NOT NULL, revenue numeric(12,2) NOT NULL, cost numeric(12,2), margin numeric(8,4))"
        ),
        // The bug: the current cost for every date.
        "INSERT INTO fact_orders_daily SELECT o.order_id, o.order_date, o.sku, o.quantity, o.revenue, o.quantity * c.unit_cost, (o.revenue - o.quantity * c.unit_cost) / o.revenue \
         FROM staging_orders o JOIN dim_costs_scd c ON c.sku = o.sku AND c.effective_to IS NULL"
            .to_string(),
    ];
    for sql in statements {
        exec(warehouse, &sql).await;
    }
}

async fn worked_example_2_gross_margin_with_scd_costs(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    seed_scd(&db, &warehouse).await;
    let outcome = run_spec(&db, SCD_SPEC).await;
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    // Every order of the window carries the cost valid at its date (computed here with a
    // correlated subquery, independently of the spec's join); orders outside keep the bug.
    let wrong = count(
        &warehouse,
        "SELECT count(*) FROM fact_orders_daily f WHERE f.order_date BETWEEN DATE '2024-01-01' AND DATE '2024-03-31' \
         AND f.cost <> f.quantity * (SELECT c.unit_cost FROM dim_costs_scd c WHERE c.sku = f.sku AND c.effective_from <= f.order_date \
         ORDER BY c.effective_from DESC LIMIT 1)",
    )
    .await;
    assert_eq!(wrong, 0);
    let untouched = count(
        &warehouse,
        "SELECT count(*) FROM fact_orders_daily f JOIN dim_costs_scd c ON c.sku = f.sku AND c.effective_to IS NULL \
         WHERE f.order_date NOT BETWEEN DATE '2024-01-01' AND DATE '2024-03-31' AND f.cost = f.quantity * c.unit_cost",
    )
    .await;
    assert_eq!(
        untouched,
        count(&warehouse, "SELECT count(*) FROM fact_orders_daily WHERE order_date NOT BETWEEN DATE '2024-01-01' AND DATE '2024-03-31'").await
    );
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM fact_orders_daily").await,
        6000
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_orders_daily", "order_id").await,
        0
    );
}

/// A cost above the selling price for one sku in January: revenue_covers_cost fails, names
/// itself, and nothing is published.
async fn worked_example_2_refuses_costs_above_revenue(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    seed_scd(&db, &warehouse).await;
    exec(&warehouse, "UPDATE dim_costs_scd SET unit_cost = 500 WHERE sku = 'SKU-3' AND effective_from = DATE '2020-01-01'").await;
    let before = checksum(&warehouse, "fact_orders_daily", None).await;
    let outcome = run_spec(&db, SCD_SPEC).await;
    let RunOutcome::AuditFailed { failures, .. } = outcome else {
        panic!("{outcome:?}")
    };
    let names: std::collections::BTreeSet<&str> =
        failures.iter().map(|f| f.audit_name.as_str()).collect();
    assert!(names.contains("revenue_covers_cost"), "{names:?}");
    assert!(
        names.contains("margin_in_range"),
        "negative margins too: {names:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_orders_daily", None).await,
        before
    );
}

on_engines!(worked_example_2_gross_margin_with_scd_costs: postgres, mysql);
on_engines!(worked_example_2_refuses_costs_above_revenue: postgres, mysql);
