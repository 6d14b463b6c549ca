//! Publish modes on PostgreSQL: `auto` picks `swap_window` for a small window of a large table
//! and says why; `swap_window` writes only the window's changed rows (rows outside the window
//! and unchanged rows inside it are not rewritten: same xmin), keeps the table's identity (OID,
//! views, a foreign key pointing at it) and archives the old window rows; rollback restores the
//! exact checksum. Targets a rename would damage are published with swap_window by `auto`.

use backfill_common::plan::Grain;
use backfill_common::spec::{PublishMode, Spec};
use backfill_common::warehouse::{Warehouse, fetch_all, get};
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

const DAYS: i64 = 200;
const ROWS_PER_DAY: i64 = 500;

/// `events`: 200 days x 500 rows; `events_fixed`: the same, with the amounts of 2024-05-10 ..
/// 2024-05-13 corrected for one row in five, one row of the window deleted and one added.
async fn seed_events(warehouse: &Warehouse) {
    for sql in [
        "CREATE TABLE events (id bigint PRIMARY KEY, day date NOT NULL, customer_id bigint NOT NULL, amount numeric(12,2) NOT NULL, note text)",
        &format!(
            "INSERT INTO events SELECT g, DATE '2024-01-01' + CAST((g - 1) / {ROWS_PER_DAY} AS integer), g % 97, (g % 1000) / 10.0, 'n' || g \
             FROM generate_series(1, {}) AS g",
            DAYS * ROWS_PER_DAY
        ),
        "CREATE VIEW daily_amount AS SELECT day, sum(amount) AS total FROM events GROUP BY day",
        "CREATE TABLE events_fixed AS SELECT * FROM events WHERE day BETWEEN DATE '2024-05-10' AND DATE '2024-05-13'",
        "UPDATE events_fixed SET amount = amount + 1 WHERE id % 5 = 0",
        "DELETE FROM events_fixed WHERE id = (SELECT min(id) FROM events_fixed)",
        "INSERT INTO events_fixed VALUES (999999, DATE '2024-05-11', 1, 42.00, 'late arrival')",
        // What the target must hold afterwards.
        "CREATE TABLE events_expected AS SELECT * FROM events WHERE NOT (day BETWEEN DATE '2024-05-10' AND DATE '2024-05-13') UNION ALL SELECT * FROM events_fixed",
        "ANALYZE events",
    ] {
        exec(warehouse, sql).await;
    }
}

const SPEC: &str = r#"
name = "fix_event_amounts"

[target]
table = "events"
key = ["id"]

[partition]
column = "day"
grain = "day"
first = "2024-05-10"
last = "2024-05-13"

[source]
query = "SELECT id, day, customer_id, amount, note FROM events_fixed WHERE day >= :partition_start AND day < :partition_end"

[warehouse]
name = "events"
concurrency = 2

[[audit]]
kind = "unique_key"

[[audit]]
kind = "rowcount_delta"
max_change_pct = 1.0

[publish]
mode = "auto"
"#;

/// (id, xmin) of the rows matching `filter`: a row rewritten by any statement gets a new xmin.
async fn row_versions(warehouse: &Warehouse, filter: &str) -> Vec<(i64, String)> {
    let mut conn = warehouse.acquire().await.unwrap();
    fetch_all(
        &mut conn,
        &format!("SELECT id, CAST(xmin AS text) FROM events WHERE {filter} ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (get(r, 0).unwrap(), get(r, 1).unwrap()))
    .collect()
}

const WINDOW: &str = "day BETWEEN DATE '2024-05-10' AND DATE '2024-05-13'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_window_writes_only_the_changed_rows_of_the_window() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_events(&warehouse).await;
    let before = checksum(&warehouse, "events", None).await;
    let oid_before = count(
        &warehouse,
        "SELECT CAST(CAST('events' AS regclass) AS oid)::bigint",
    )
    .await;
    let outside_before = row_versions(&warehouse, &format!("NOT ({WINDOW})")).await;
    let inside_before = row_versions(&warehouse, WINDOW).await;
    let changed_ids: Vec<i64> = {
        let mut conn = warehouse.acquire().await.unwrap();
        fetch_all(
            &mut conn,
            "SELECT f.id FROM events_fixed f JOIN events e USING (id) WHERE f.amount <> e.amount ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| get(r, 0).unwrap())
        .collect()
    };
    assert!(changed_ids.len() > 100);

    let backfill = Backfill::open(Spec::parse(SPEC).unwrap(), SPEC.into(), &db.url)
        .await
        .unwrap();
    let plan = backfill.plan().await.unwrap();
    assert_eq!(plan.grain, Grain::Day);
    assert_eq!(
        plan.publish_mode,
        PublishMode::SwapWindow,
        "{}",
        plan.publish_reason
    );
    assert!(
        plan.publish_reason.contains("2000 of 100000 rows"),
        "plan says why: {}",
        plan.publish_reason
    );
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id, archive, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };

    // The data: exactly the expected table.
    assert_eq!(
        checksum(&warehouse, "events", None).await,
        checksum(&warehouse, "events_expected", None).await
    );
    assert_eq!(duplicate_keys(&warehouse, "events", "id").await, 0);
    // Same table (identity kept), its view reads the new data.
    assert_eq!(
        count(
            &warehouse,
            "SELECT CAST(CAST('events' AS regclass) AS oid)::bigint"
        )
        .await,
        oid_before
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT CAST(sum(total) * 100 AS bigint) FROM daily_amount"
        )
        .await,
        count(
            &warehouse,
            "SELECT CAST(sum(amount) * 100 AS bigint) FROM events_expected"
        )
        .await
    );
    // Rows written: nothing outside the window, and inside it only the changed, deleted and
    // added rows.
    assert_eq!(
        row_versions(&warehouse, &format!("NOT ({WINDOW})")).await,
        outside_before,
        "rows outside the window were not rewritten"
    );
    let inside_after = row_versions(&warehouse, WINDOW).await;
    let rewritten: Vec<i64> = inside_after
        .iter()
        .filter(|(id, xmin)| {
            inside_before
                .iter()
                .find(|(before_id, _)| before_id == id)
                .is_none_or(|(_, before_xmin)| before_xmin != xmin)
        })
        .map(|(id, _)| *id)
        .collect();
    let mut expected_rewritten = changed_ids.clone();
    expected_rewritten.push(999_999);
    expected_rewritten.sort();
    assert_eq!(
        rewritten, expected_rewritten,
        "only changed and new rows were written"
    );
    let store = control_store(&warehouse);
    let merged = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM backfill.events WHERE run_id = '{run_id}' AND kind = 'window_merged' \
             AND detail = 'deleted 1 updated {} inserted 1'",
            changed_ids.len()
        ),
    )
    .await;
    assert_eq!(merged, 1, "the publish recorded what it wrote");
    // The archive holds the window's old rows only.
    assert_eq!(
        count(&warehouse, &format!("SELECT count(*) FROM {archive}")).await,
        4 * ROWS_PER_DAY
    );
    let archives = store.archives().await.unwrap();
    assert_eq!(archives[0].kind, publish::ARCHIVE_WINDOW);

    // Rollback restores the exact table.
    let report = publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(checksum(&warehouse, "events", None).await, before);
    assert!(table_exists(&warehouse, &report.kept_as).await);
    assert_eq!(
        count(
            &warehouse,
            &format!("SELECT count(*) FROM {}", report.kept_as)
        )
        .await,
        4 * ROWS_PER_DAY,
        "the backfilled window is kept"
    );
}

/// A foreign key pointing at the target: a rename would leave it on the archive, so `auto`
/// picks swap_window, and swap_table is refused with a pointer to swap_window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_keeps_a_referenced_table_in_place() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_events(&warehouse).await;
    exec(
        &warehouse,
        "CREATE TABLE refunds (refund_id bigint PRIMARY KEY, event_id bigint NOT NULL REFERENCES events (id))",
    )
    .await;
    exec(&warehouse, "INSERT INTO refunds VALUES (1, 2300), (2, 50)").await;

    let small = SPEC.replace("first = \"2024-05-10\"", "first = \"2024-01-01\"");
    // A window of most of the table: without the foreign key auto would copy the table.
    let wide = small.replace("last = \"2024-05-13\"", "last = \"2024-06-30\"");
    let backfill = Backfill::open(Spec::parse(&wide).unwrap(), wide.clone(), &db.url)
        .await
        .unwrap();
    let plan = backfill.plan().await.unwrap();
    assert_eq!(plan.publish_mode, PublishMode::SwapWindow);
    assert!(
        plan.publish_reason.contains("refunds"),
        "{}",
        plan.publish_reason
    );

    let forced = wide.replace("mode = \"auto\"", "mode = \"swap_table\"");
    let backfill = Backfill::open(Spec::parse(&forced).unwrap(), forced.clone(), &db.url)
        .await
        .unwrap();
    let error = backfill.plan().await.unwrap_err().to_string();
    assert!(
        error.contains("refunds") && error.contains("swap_window"),
        "{error}"
    );

    // The window publish keeps the reference valid (the referenced rows keep their keys).
    let backfill = Backfill::open(Spec::parse(SPEC).unwrap(), SPEC.into(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM refunds r JOIN events e ON e.id = r.event_id"
        )
        .await,
        2
    );
}

/// `sales` partitioned by month (and an empty default partition), a view over it.
async fn seed_sales(warehouse: &Warehouse) {
    for sql in [
        "CREATE TABLE sales (id bigint NOT NULL, day date NOT NULL, amount numeric(12,2) NOT NULL, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
        "CREATE TABLE sales_2024_01 PARTITION OF sales FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')",
        "CREATE TABLE sales_2024_02 PARTITION OF sales FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')",
        "CREATE TABLE sales_2024_03 PARTITION OF sales FOR VALUES FROM ('2024-03-01') TO ('2024-04-01')",
        "CREATE TABLE sales_other PARTITION OF sales DEFAULT",
        "INSERT INTO sales SELECT g, DATE '2024-01-01' + CAST((g - 1) / 200 AS integer), (g % 500) / 10.0 FROM generate_series(1, 91 * 200) AS g",
        "CREATE VIEW monthly_sales AS SELECT date_trunc('month', day) AS month, sum(amount) AS total FROM sales GROUP BY 1",
        "CREATE TABLE sales_fixed AS SELECT id, day, amount * 2 AS amount FROM sales WHERE day >= DATE '2024-02-01' AND day < DATE '2024-03-01'",
        "CREATE TABLE sales_expected AS SELECT * FROM sales WHERE NOT (day >= DATE '2024-02-01' AND day < DATE '2024-03-01') UNION ALL SELECT * FROM sales_fixed",
    ] {
        exec(warehouse, sql).await;
    }
}

fn sales_spec(first: &str, last: &str) -> String {
    format!(
        r#"
name = "fix_sales"

[target]
table = "sales"
key = ["id", "day"]

[partition]
column = "day"
grain = "day"
first = "{first}"
last = "{last}"

[source]
query = "SELECT id, day, amount FROM sales_fixed WHERE day >= :partition_start AND day < :partition_end"

[warehouse]
name = "sales"
concurrency = 2

[[audit]]
kind = "unique_key"

[[audit]]
kind = "rowcount_delta"
max_change_rows = 0
"#
    )
}

async fn oid(warehouse: &Warehouse, table: &str) -> i64 {
    count(
        warehouse,
        &format!("SELECT CAST(CAST(CAST('{table}' AS regclass) AS oid) AS bigint)"),
    )
    .await
}

const SALES_TOTAL: &str = "SELECT CAST(sum(amount) * 100 AS bigint) FROM sales";
const VIEW_TOTAL: &str = "SELECT CAST(sum(total) * 100 AS bigint) FROM monthly_sales";

/// A window that fills February: `auto` swaps that one partition (copying nothing beside the
/// window), the other partitions and the view keep their identity, readers see old or new
/// totals only, the old partition is archived with its checksum, and rollback restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_partitions_replaces_only_the_partitions_of_the_window() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_sales(&warehouse).await;
    let before = checksum(&warehouse, "sales", None).await;
    let february_before = checksum(&warehouse, "sales_2024_02", None).await;
    let february_indexes = index_names(&warehouse, "sales_2024_02").await;
    assert_eq!(february_indexes, ["sales_2024_02_pkey sales_2024_02_pkey"]);
    let untouched = [
        oid(&warehouse, "sales_2024_01").await,
        oid(&warehouse, "sales_2024_03").await,
        oid(&warehouse, "monthly_sales").await,
    ];
    let old_total = count(&warehouse, SALES_TOTAL).await;
    let new_total = count(
        &warehouse,
        "SELECT CAST(sum(amount) * 100 AS bigint) FROM sales_expected",
    )
    .await;
    let spec = sales_spec("2024-02-01", "2024-02-29");
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let plan = backfill.plan().await.unwrap();
    assert_eq!(
        plan.publish_mode,
        PublishMode::SwapPartitions,
        "{}",
        plan.publish_reason
    );

    let reader_pool = Warehouse::connect(&db.url, 2).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (reader_pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut conn = pool.acquire().await.unwrap();
                let row = backfill_common::warehouse::fetch_one(
                    &mut conn,
                    &format!("SELECT ({SALES_TOTAL}), ({VIEW_TOTAL})"),
                    &[],
                )
                .await
                .map_err(|e| e.to_string());
                seen.push(row.map(|r| (get::<i64>(&r, 0).unwrap(), get::<i64>(&r, 1).unwrap())));
            }
            seen
        })
    };
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert!(seen.len() > 5);
    for observation in &seen {
        let (table, view) = observation.as_ref().expect("no reader error");
        assert_eq!(table, view);
        assert!(
            *table == old_total || *table == new_total,
            "saw {table}, allowed {old_total} or {new_total}"
        );
    }
    let RunOutcome::Published {
        run_id, archive, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        archive,
        format!("public.sales_2024_02__bf_archive_{run_id}")
    );
    assert_eq!(
        checksum(&warehouse, "sales", None).await,
        checksum(&warehouse, "sales_expected", None).await
    );
    assert_eq!(count(&warehouse, VIEW_TOTAL).await, new_total);
    assert_eq!(
        [
            oid(&warehouse, "sales_2024_01").await,
            oid(&warehouse, "sales_2024_03").await,
            oid(&warehouse, "monthly_sales").await,
        ],
        untouched,
        "other partitions and the view keep their identity"
    );
    assert_eq!(checksum(&warehouse, &archive, None).await, february_before);
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM pg_inherits WHERE inhparent = CAST('sales' AS regclass)"
        )
        .await,
        4,
        "the new February is attached in place of the old one"
    );
    assert_eq!(
        index_names(&warehouse, "sales_2024_02").await,
        february_indexes,
        "the new February has the old one's index names"
    );
    assert_eq!(
        index_names(&warehouse, &archive).await,
        [format!(
            "sales_2024_02_pkey__bf_archive_{run_id} sales_2024_02_pkey__bf_archive_{run_id}"
        )]
    );

    let store = control_store(&warehouse);
    publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(checksum(&warehouse, "sales", None).await, before);
    assert_eq!(count(&warehouse, VIEW_TOTAL).await, old_total);
    assert_eq!(
        index_names(&warehouse, "sales_2024_02").await,
        february_indexes,
        "the restored February has its index names back"
    );
}

/// A few days of a large partition: auto merges the window instead of copying the partition;
/// swap_partitions on a table that is not partitioned is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_merges_a_small_window_of_a_partitioned_table() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_sales(&warehouse).await;
    let spec = sales_spec("2024-02-10", "2024-02-12");
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let plan = backfill.plan().await.unwrap();
    assert_eq!(
        plan.publish_mode,
        PublishMode::SwapWindow,
        "{}",
        plan.publish_reason
    );
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM sales s JOIN sales_fixed f USING (id, day) WHERE s.amount <> f.amount AND s.day BETWEEN DATE '2024-02-10' AND DATE '2024-02-12'").await,
        0
    );

    seed_events(&warehouse).await;
    let forced = SPEC.replace("mode = \"auto\"", "mode = \"swap_partitions\"");
    let backfill = Backfill::open(Spec::parse(&forced).unwrap(), forced.clone(), &db.url)
        .await
        .unwrap();
    let error = backfill.plan().await.unwrap_err().to_string();
    assert!(error.contains("natively partitioned"), "{error}");
}

/// A row the fix moves into the window from a day outside it (same key) would be skipped by
/// the merge: swap_window refuses inside its transaction, even without a unique_key audit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_window_refuses_a_key_that_moved_into_the_window() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_events(&warehouse).await;
    // id 5 lives on 2024-01-01; the fixed source puts it on 2024-05-11.
    exec(&warehouse, "INSERT INTO events_fixed SELECT 5, DATE '2024-05-11', customer_id, amount, note FROM events WHERE id = 5").await;
    let before = checksum(&warehouse, "events", None).await;
    let spec = SPEC
        .replace("[[audit]]\nkind = \"unique_key\"\n\n", "")
        .replace("max_change_pct = 1.0", "max_change_pct = 5.0")
        .replace("mode = \"auto\"", "mode = \"swap_window\"");
    assert!(!spec.contains("unique_key"));
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let error = backfill.run("test", &Quiet).await.unwrap_err().to_string();
    assert!(error.contains("already exist outside it"), "{error}");
    assert_eq!(
        checksum(&warehouse, "events", None).await,
        before,
        "nothing published"
    );
}

/// Without a unique index on the key, merging by key is unsafe (duplicates would survive):
/// auto copies the table instead, and swap_window is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_modes_need_a_unique_key() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_events(&warehouse).await;
    exec(&warehouse, "ALTER TABLE events DROP CONSTRAINT events_pkey").await;
    let backfill = Backfill::open(Spec::parse(SPEC).unwrap(), SPEC.into(), &db.url)
        .await
        .unwrap();
    let plan = backfill.plan().await.unwrap();
    assert_eq!(
        plan.publish_mode,
        PublishMode::SwapTable,
        "{}",
        plan.publish_reason
    );
    let forced = SPEC.replace("mode = \"auto\"", "mode = \"swap_window\"");
    let backfill = Backfill::open(Spec::parse(&forced).unwrap(), forced.clone(), &db.url)
        .await
        .unwrap();
    let error = backfill.plan().await.unwrap_err().to_string();
    assert!(error.contains("no unique index on the key (id)"), "{error}");
}

/// A json column has no equality operator: swap_window compares it as text, publishes, and
/// rolls back exactly; after the rollback, gc drops the expired window archive (it was only
/// copied from) along with the kept backfilled rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_window_with_json_then_rollback_then_gc() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_events(&warehouse).await;
    exec(&warehouse, "ALTER TABLE events ADD COLUMN payload json").await;
    exec(
        &warehouse,
        "UPDATE events SET payload = json_build_object('n', id % 7)",
    )
    .await;
    exec(
        &warehouse,
        "ALTER TABLE events_fixed ADD COLUMN payload json",
    )
    .await;
    exec(
        &warehouse,
        "UPDATE events_fixed SET payload = json_build_object('n', id % 5)",
    )
    .await;
    let before = checksum(&warehouse, "events", None).await;
    let spec = SPEC
        .replace(
            "SELECT id, day, customer_id, amount, note FROM",
            "SELECT id, day, customer_id, amount, note, payload FROM",
        )
        .replace("mode = \"auto\"", "mode = \"swap_window\"");
    let backfill = Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id, archive, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM events e JOIN events_fixed f USING (id) WHERE CAST(e.payload AS text) <> CAST(f.payload AS text)").await,
        0
    );
    let store = control_store(&warehouse);
    let report = publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(checksum(&warehouse, "events", None).await, before);
    let later = chrono::Utc::now() + chrono::Duration::days(400);
    let gc = publish::gc(&store, later, false).await.unwrap();
    assert!(gc.failed.is_empty(), "{gc:?}");
    assert!(gc.dropped.contains(&archive), "{gc:?}");
    assert!(gc.dropped.contains(&report.kept_as), "{gc:?}");
    assert!(!table_exists(&warehouse, &archive).await);
}

/// What swap_partitions cannot carry is refused at plan time and `auto` merges instead: a key
/// without the partition column (nothing would keep a moved key unique), a view reading one
/// partition directly (it would keep reading the archive), and a window that reaches a range
/// only the default partition holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_partitions_refuses_what_it_cannot_carry() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    seed_sales(&warehouse).await;
    let february = sales_spec("2024-02-01", "2024-02-29");
    let plan_of = |spec: String| {
        let url = db.url.clone();
        async move {
            Backfill::open(Spec::parse(&spec).unwrap(), spec.clone(), &url)
                .await
                .unwrap()
                .plan()
                .await
        }
    };
    let forced = |spec: &str| {
        spec.replace(
            "[[audit]]\nkind = \"unique_key\"",
            "[publish]\nmode = \"swap_partitions\"\n\n[[audit]]\nkind = \"unique_key\"",
        )
    };

    // The key without the partition column has no unique index.
    let id_only = february.replace("key = [\"id\", \"day\"]", "key = [\"id\"]");
    let error = plan_of(forced(&id_only)).await.unwrap_err().to_string();
    assert!(error.contains("no unique index on the key (id)"), "{error}");

    // A view on one partition.
    exec(
        &warehouse,
        "CREATE VIEW feb_only AS SELECT * FROM sales_2024_02",
    )
    .await;
    let error = plan_of(forced(&february)).await.unwrap_err().to_string();
    assert!(error.contains("feb_only"), "{error}");
    let plan = plan_of(february.clone()).await.unwrap();
    assert_eq!(
        plan.publish_mode,
        PublishMode::SwapWindow,
        "{}",
        plan.publish_reason
    );
    exec(&warehouse, "DROP VIEW feb_only").await;

    // A window reaching April, which only the default partition holds.
    let april = sales_spec("2024-03-30", "2024-04-02");
    let error = plan_of(forced(&april)).await.unwrap_err().to_string();
    assert!(
        error.contains("2024-04-01") && error.contains("default"),
        "{error}"
    );
}
