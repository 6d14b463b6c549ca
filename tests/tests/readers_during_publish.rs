//! Publishing is atomic for readers: a reader querying the target and the dashboard view in a
//! loop while a backfill runs and publishes sees no error and only the old or the new totals,
//! never a mix or a missing table. Same during rollback. For every publish mode.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backfill_common::spec::Spec;
use backfill_common::warehouse::{Warehouse, fetch_one, get};
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn read_totals(warehouse: &Warehouse) -> Result<(i64, i64), String> {
    let engine = warehouse.engine();
    let totals = format!(
        "SELECT {}, {}",
        engine.as_bigint("(SELECT sum(quantity) FROM fact_order_items)"),
        engine.as_bigint("(SELECT sum(total_quantity) FROM daily_quantity)")
    );
    let mut conn = warehouse.acquire().await.map_err(|e| e.to_string())?;
    let row = fetch_one(&mut conn, &totals, &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        get(&row, 0).map_err(|e| e.to_string())?,
        get(&row, 1).map_err(|e| e.to_string())?,
    ))
}

/// Reads in a loop until `stop`; returns every observation.
fn spawn_reader(
    warehouse: Warehouse,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Result<(i64, i64), String>>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            seen.push(read_totals(&warehouse).await);
        }
        seen
    })
}

fn assert_only(seen: &[Result<(i64, i64), String>], allowed: &[i64]) {
    assert!(
        seen.len() > 5,
        "the reader ran during the operation ({} reads)",
        seen.len()
    );
    for observation in seen {
        match observation {
            Ok((table, view)) => {
                assert_eq!(table, view, "table and view agree");
                assert!(
                    allowed.contains(table),
                    "saw total {table}, allowed {allowed:?}"
                );
            }
            Err(error) => panic!("a reader saw an error: {error}"),
        }
    }
}

async fn readers_never_see_a_mix(db: TestDatabase, mode: &str) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let old = read_totals(&warehouse).await.unwrap().0;
    let new = count(
        &warehouse,
        &format!(
            "SELECT {} FROM expected_order_items",
            warehouse.engine().as_bigint("sum(quantity)")
        ),
    )
    .await;
    assert_ne!(old, new);

    let reader_pool = Warehouse::connect(&db.url, 2).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(reader_pool.clone(), stop.clone());
    let spec =
        demo::MINI_CHALLENGE_SPEC.replace("mode = \"swap_table\"", &format!("mode = \"{mode}\""));
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    // keep reading a little after the publish
    for _ in 0..10 {
        read_totals(&warehouse).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let RunOutcome::Published { run_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_only(&seen, &[old, new]);
    assert!(
        seen.iter().any(|s| s.as_ref().is_ok_and(|t| t.0 == old)),
        "the reader saw the old version first"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(reader_pool, stop.clone());
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    publish::rollback(&control_store(&warehouse), &run_id)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert_only(&seen, &[old, new]);
    assert_eq!(read_totals(&warehouse).await.unwrap(), (old, old));
}

async fn readers_during_swap_table(db: TestDatabase) {
    readers_never_see_a_mix(db, "swap_table").await;
}

async fn readers_during_swap_window(db: TestDatabase) {
    readers_never_see_a_mix(db, "swap_window").await;
}

// On MySQL the swap is a cut-over: readers go on under its LOCK TABLES … READ and wait, for
// the instant of the rename, behind it; never an error.
on_engines!(readers_during_swap_table: sqlite, postgres, mysql);
on_engines!(readers_during_swap_window: sqlite, postgres, mysql);
