//! Dashboards read the target through views, on sessions they keep open. A publish or a
//! rollback never makes one of their queries fail: not with a deadlock (the reader locks the
//! view, then the table; a publish that locked the table first and then re-created the view
//! would close the circle), not with a lock timeout, not with a missing relation. Views one
//! and two deep, every publish mode, several runs and rollbacks in a row: 0 reader errors,
//! and every read is the old or the new total.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backfill_common::spec::Spec;
use backfill_common::warehouse::{Warehouse, execute, fetch_one, get};
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

/// Runs and rollbacks per scenario: the deadlock the readers provoked showed in every run
/// with persistent sessions, in one of six with a polling reader.
const ROUNDS: usize = 3;

/// Readers per view, each on its own session for the whole scenario.
const READERS_PER_VIEW: usize = 3;

/// Reader sessions reading `queries` in a loop until stopped, each query on its own; what
/// each read returned (or the error it saw).
struct Readers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Result<i64, String>>>>,
}

impl Readers {
    async fn start(url: &str, queries: &[String]) -> Readers {
        let pool = Warehouse::connect(url, (queries.len() * READERS_PER_VIEW) as u32)
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for query in queries {
            for _ in 0..READERS_PER_VIEW {
                let (pool, stop, query) = (pool.clone(), stop.clone(), query.clone());
                // The session is taken once and kept: a dashboard's connection.
                let mut session = pool.acquire().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let read = fetch_one(&mut session, &query, &[])
                            .await
                            .and_then(|row| get::<i64>(&row, 0))
                            .map_err(|e| e.to_string());
                        seen.push(read);
                    }
                    drop(pool);
                    seen
                }));
            }
        }
        Readers { stop, tasks }
    }

    /// Stops the readers; panics on any error a reader saw or a total not in `allowed`.
    async fn finish(self, what: &str, allowed: &[i64]) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let mut reads = 0;
        for task in self.tasks {
            for read in task.await.unwrap() {
                reads += 1;
                match read {
                    Ok(total) => assert!(
                        allowed.contains(&total),
                        "{what}: a reader saw total {total}, allowed {allowed:?}"
                    ),
                    Err(error) => panic!("{what}: a reader saw an error: {error}"),
                }
            }
        }
        reads
    }
}

/// Runs `spec` and rolls it back `ROUNDS` times under readers of `views`, whose total is
/// `old` before each publish and `new` after it.
async fn rounds_under_readers(
    db: &TestDatabase,
    spec: &str,
    views: &[String],
    old: i64,
    new: i64,
    mode: &str,
) {
    let warehouse = db.warehouse().await;
    for round in 0..ROUNDS {
        let readers = Readers::start(&db.url, views).await;
        let backfill = Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
            .await
            .unwrap();
        let outcome = backfill.run("test", &Quiet).await.unwrap();
        let RunOutcome::Published { run_id, .. } = outcome else {
            panic!("{mode} round {round}: {outcome:?}")
        };
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let reads = readers
            .finish(&format!("{mode} publish, round {round}"), &[old, new])
            .await;
        assert!(reads > 10, "the readers ran during the publish ({reads})");
        for view in views {
            assert_eq!(count(&warehouse, view).await, new, "{view} after publish");
        }

        let readers = Readers::start(&db.url, views).await;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        publish::rollback(&control_store(&warehouse), &run_id)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        readers
            .finish(&format!("{mode} rollback, round {round}"), &[old, new])
            .await;
        for view in views {
            assert_eq!(count(&warehouse, view).await, old, "{view} after rollback");
        }
    }
}

/// The mini challenge's `daily_quantity` view (one deep) and a view over it (two deep).
async fn mini_challenge_under_view_readers(db: TestDatabase, mode: &str) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE VIEW busy_days AS SELECT order_date, total_quantity FROM daily_quantity WHERE items > 0",
    )
    .await;
    let engine = warehouse.engine();
    let views = [
        format!(
            "SELECT {} FROM daily_quantity",
            engine.as_bigint("sum(total_quantity)")
        ),
        format!(
            "SELECT {} FROM busy_days",
            engine.as_bigint("sum(total_quantity)")
        ),
    ];
    let old = count(&warehouse, &views[0]).await;
    let new = count(
        &warehouse,
        &format!(
            "SELECT {} FROM expected_order_items",
            engine.as_bigint("sum(quantity)")
        ),
    )
    .await;
    assert_ne!(old, new);
    let spec =
        demo::MINI_CHALLENGE_SPEC.replace("mode = \"swap_table\"", &format!("mode = \"{mode}\""));
    assert!(spec.contains(&format!("mode = \"{mode}\"")));
    rounds_under_readers(&db, &spec, &views, old, new, mode).await;
}

async fn swap_table_under_view_readers(db: TestDatabase) {
    mini_challenge_under_view_readers(db, "swap_table").await;
}

async fn swap_window_under_view_readers(db: TestDatabase) {
    mini_challenge_under_view_readers(db, "swap_window").await;
}

on_engines!(swap_table_under_view_readers: sqlite, postgres, mysql);
on_engines!(swap_window_under_view_readers: sqlite, postgres, mysql);

/// A natively partitioned table (PostgreSQL): February's partition is swapped under readers
/// of a view over the parent and of a view over that view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_partitions_under_view_readers() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    for sql in [
        "CREATE TABLE sales (id bigint NOT NULL, day date NOT NULL, amount bigint NOT NULL, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
        "CREATE TABLE sales_2024_01 PARTITION OF sales FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')",
        "CREATE TABLE sales_2024_02 PARTITION OF sales FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')",
        "CREATE TABLE sales_2024_03 PARTITION OF sales FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')",
        "INSERT INTO sales SELECT g, DATE '2024-01-01' + CAST((g - 1) / 100 AS integer), g % 500 FROM generate_series(1, 91 * 100) AS g",
        "CREATE VIEW monthly_sales AS SELECT date_trunc('month', day) AS month, sum(amount) AS total FROM sales GROUP BY 1",
        "CREATE VIEW big_months AS SELECT month, total FROM monthly_sales WHERE total > 0",
        "CREATE TABLE sales_fixed AS SELECT id, day, amount * 2 AS amount FROM sales WHERE day >= DATE '2024-02-01' AND day < DATE '2024-03-01'",
    ] {
        exec(&warehouse, sql).await;
    }
    let views = [
        "SELECT CAST(sum(total) AS bigint) FROM monthly_sales".to_string(),
        "SELECT CAST(sum(total) AS bigint) FROM big_months".to_string(),
    ];
    let old = count(&warehouse, &views[0]).await;
    let new = old
        + count(
            &warehouse,
            "SELECT CAST(sum(amount) AS bigint) FROM sales WHERE day >= DATE '2024-02-01' AND day < DATE '2024-03-01'",
        )
        .await;
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
concurrency = 2

[publish]
mode = "swap_partitions"

[[audit]]
kind = "unique_key"
"#;
    rounds_under_readers(&db, spec, &views, old, new, "swap_partitions").await;
}

/// Readers whose transactions read the table, then the view (PostgreSQL): a publish waiting
/// for the table while holding the view would be waited on by them in turn. Each of their
/// transactions must commit, whatever the publish does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_in_transactions_across_table_and_view() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let old = count(
        &warehouse,
        "SELECT CAST(sum(quantity) AS bigint) FROM fact_order_items",
    )
    .await;
    let new = count(
        &warehouse,
        "SELECT CAST(sum(quantity) AS bigint) FROM expected_order_items",
    )
    .await;
    let pool = Warehouse::connect(&db.url, 4).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for order in [
        ["fact_order_items", "daily_quantity"],
        ["daily_quantity", "fact_order_items"],
    ] {
        for _ in 0..2 {
            let (pool, stop) = (pool.clone(), stop.clone());
            let mut session = pool.acquire().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut seen: Vec<Result<(i64, i64), String>> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let read = async {
                        let mut tx = session.begin().await?;
                        let mut totals = Vec::new();
                        for relation in order {
                            let column = if relation == "daily_quantity" {
                                "total_quantity"
                            } else {
                                "quantity"
                            };
                            let row = fetch_one(
                                &mut tx,
                                &format!("SELECT CAST(sum({column}) AS bigint) FROM {relation}"),
                                &[],
                            )
                            .await?;
                            totals.push(get::<i64>(&row, 0)?);
                        }
                        tx.commit().await?;
                        Ok::<_, backfill_common::error::BackfillError>((totals[0], totals[1]))
                    }
                    .await
                    .map_err(|e| e.to_string());
                    seen.push(read);
                    // A dashboard's next query comes a moment later; without any gap, readers
                    // taking the table then the view keep the publish giving way for long.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                seen
            }));
        }
    }
    let spec = demo::MINI_CHALLENGE_SPEC;
    for round in 0..2 {
        let backfill = Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
            .await
            .unwrap();
        let RunOutcome::Published { run_id, .. } = backfill.run("test", &Quiet).await.unwrap()
        else {
            panic!("round {round} did not publish")
        };
        publish::rollback(&control_store(&warehouse), &run_id)
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let mut reads = 0;
    for task in tasks {
        for read in task.await.unwrap() {
            reads += 1;
            let (first, second) =
                read.unwrap_or_else(|e| panic!("a reader's transaction failed: {e}"));
            // READ COMMITTED: each statement sees the latest commit, so a transaction can
            // straddle a publish; each total is still a whole version.
            for total in [first, second] {
                assert!(
                    total == old || total == new,
                    "saw {total}, allowed {old} or {new}"
                );
            }
        }
    }
    assert!(reads > 10, "the readers ran ({reads})");
}

/// A session that keeps the target locked (a transaction left open) holds a publish up to
/// `publish.lock_wait`, no longer: the publish stops with nothing changed and names the
/// session, and the same command publishes once the session is done. The open session's own
/// queries never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_waits_for_a_session_holding_the_table_then_gives_up_cleanly() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let spec = demo::MINI_CHALLENGE_SPEC.replace("[publish]\n", "[publish]\nlock_wait = \"2s\"\n");
    assert!(spec.contains("lock_wait"));

    let holder_pool = Warehouse::connect(&db.url, 2).await.unwrap();
    let mut holder = holder_pool.acquire().await.unwrap();
    execute(&mut holder, "BEGIN", &[]).await.unwrap();
    execute(&mut holder, "SELECT count(*) FROM daily_quantity", &[])
        .await
        .unwrap();

    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = backfill.run("test", &Quiet).await.unwrap_err();
    let waited = started.elapsed();
    let message = error.to_string();
    assert!(
        matches!(error, backfill_common::error::BackfillError::LockWait(_)),
        "{error:?}"
    );
    assert!(
        message.contains("within 2s") && message.contains("pid "),
        "{message}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(2),
        "waited {waited:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        before,
        "nothing published"
    );
    // The holder's session is unharmed.
    execute(&mut holder, "SELECT count(*) FROM fact_order_items", &[])
        .await
        .unwrap();
    execute(&mut holder, "COMMIT", &[]).await.unwrap();

    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}
