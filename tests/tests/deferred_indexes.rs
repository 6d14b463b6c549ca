//! A `swap_table` shadow on PostgreSQL is written without its indexes (building them once at
//! the end costs far less than maintaining them row by row), then gets them all back before
//! the audits. Duplicate keys that the missing unique index did not stop while writing are
//! caught when it is built: the run fails naming the keys and partitions, nothing is
//! published, and a resumed run builds only the indexes still missing.

use backfill_common::control::{PartitionState, RunNote, RunState};
use backfill_common::spec::Spec;
use backfill_common::warehouse::Warehouse;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn run(db: &TestDatabase) -> RunOutcome {
    Backfill::open(
        Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap(),
        demo::MINI_CHALLENGE_SPEC.to_string(),
        &db.url,
    )
    .await
    .unwrap()
    .run("test", &Quiet)
    .await
    .unwrap()
}

/// The table's index definitions without index or table names, and its key constraints.
async fn index_shape(warehouse: &Warehouse, table: &str) -> Vec<String> {
    let mut conn = warehouse.acquire().await.unwrap();
    let rows = backfill_common::warehouse::fetch_all(
        &mut conn,
        "SELECT regexp_replace(pg_get_indexdef(i.indexrelid), 'INDEX \\S+ ON \\S+ ', 'INDEX ON t ') \
         || coalesce(' constraint ' || CAST(c.contype AS text), '') \
         FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid \
         WHERE i.indrelid = CAST($1 AS regclass) ORDER BY 1",
        &[table.into()],
    )
    .await
    .unwrap();
    rows.iter()
        .map(|r| backfill_common::warehouse::get::<String>(r, 0).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_indexes_are_deferred_then_built_before_the_audits() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "COMMENT ON INDEX fact_order_items_order_date IS 'serves the daily dashboard'",
    )
    .await;
    exec(
        &warehouse,
        "COMMENT ON CONSTRAINT fact_order_items_pkey ON fact_order_items IS 'one row per order item'",
    )
    .await;
    let shape = index_shape(&warehouse, "fact_order_items").await;
    assert_eq!(
        shape,
        vec![
            "CREATE INDEX ON t USING btree (order_date)".to_string(),
            "CREATE UNIQUE INDEX ON t USING btree (order_id, item_id) constraint p".to_string(),
        ]
    );
    let RunOutcome::Published { run_id, .. } = run(&db).await else {
        panic!("not published")
    };
    let store = control_store(&warehouse);
    let deferred = store
        .run_note(&run_id, RunNote::DeferredIndexes)
        .await
        .unwrap()
        .expect("the run deferred its shadow's indexes");
    let deferred: serde_json::Value = serde_json::from_str(&deferred).unwrap();
    assert_eq!(deferred.as_array().unwrap().len(), 2, "{deferred}");
    // The published table (the shadow) has the target's indexes and primary key again, and
    // the published content is right.
    assert_eq!(index_shape(&warehouse, "fact_order_items").await, shape);
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM pg_index i WHERE i.indrelid = CAST('fact_order_items' AS regclass) \
             AND obj_description(i.indexrelid, 'pg_class') = 'serves the daily dashboard'"
        )
        .await,
        1,
        "the index comment came back with the index"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM pg_constraint c WHERE c.conrelid = CAST('fact_order_items' AS regclass) \
             AND c.conname = 'fact_order_items_pkey' AND obj_description(c.oid, 'pg_constraint') = 'one row per order item'"
        )
        .await,
        1,
        "the key constraint came back with its name and comment"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    // Statistics were refreshed on the whole new table before it was published.
    assert_eq!(
        count(
            &warehouse,
            "SELECT CAST(reltuples AS bigint) FROM pg_class WHERE relname = 'fact_order_items'"
        )
        .await,
        count(&warehouse, "SELECT count(*) FROM fact_order_items").await
    );
}

/// The same key on two days of the window: each partition alone is fine (no unique index
/// stops the second while writing), the unique index cannot be built, and the run fails
/// saying which key and which partitions, with the target untouched. With the duplicate
/// removed, running the spec again builds the missing index and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_on_two_days_fails_when_the_unique_index_is_built() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let (order_id, item_id): (i64, i64) = (
        count(
            &warehouse,
            "SELECT min(order_id) FROM staging_order_items WHERE order_date = '2024-03-03'",
        )
        .await,
        count(
            &warehouse,
            "SELECT min(item_id) FROM staging_order_items WHERE order_date = '2024-03-03' AND order_id = \
             (SELECT min(order_id) FROM staging_order_items WHERE order_date = '2024-03-03')",
        )
        .await,
    );
    exec(
        &warehouse,
        &format!(
            "INSERT INTO staging_order_items SELECT order_id, item_id, DATE '2024-03-05', sku, quantity, unit_price, updated_at \
             FROM staging_order_items WHERE order_id = {order_id} AND item_id = {item_id} ORDER BY updated_at DESC LIMIT 1"
        ),
    )
    .await;
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let RunOutcome::PartitionsFailed { run_id, failures } = run(&db).await else {
        panic!("expected the run to fail on duplicate keys")
    };
    let mut partitions: Vec<&str> = failures.iter().map(|(p, _)| p.as_str()).collect();
    partitions.sort();
    assert_eq!(partitions, vec!["2024-03-03", "2024-03-05"], "{failures:?}");
    for (_, message) in &failures {
        assert!(
            message.contains(&format!(
                "key (order_id, item_id)=({order_id}, {item_id}) is in the shadow 2 times"
            )) && message.contains("nothing was published"),
            "{message}"
        );
    }
    let store = control_store(&warehouse);
    let failed = store.find_run(&run_id).await.unwrap().unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("duplicate keys"),
        "{failed:?}"
    );
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    // The non-unique index sorts first and was built before the unique one failed.
    let shadow = failed.shadow_table.clone();
    assert_eq!(index_shape(&warehouse, &shadow).await.len(), 1);
    // The partitions holding the key are marked failed, to be re-applied once fixed.
    for p in store.partitions(&run_id).await.unwrap() {
        let expected = if ["2024-03-03", "2024-03-05"].contains(&p.partition_key.as_str()) {
            PartitionState::Failed
        } else {
            PartitionState::Done
        };
        assert_eq!((p.state, p.times_applied), (expected, 1), "{p:?}");
    }

    // Fix the source and run the spec again: the run resumes, re-applies the two
    // partitions over what they wrote, builds only the missing index and publishes.
    exec(
        &warehouse,
        &format!(
            "DELETE FROM staging_order_items WHERE order_id = {order_id} AND item_id = {item_id} AND order_date = '2024-03-05'"
        ),
    )
    .await;
    let RunOutcome::Published {
        run_id: published, ..
    } = run(&db).await
    else {
        panic!("the resumed run did not publish")
    };
    assert_eq!(published, run_id);
    assert_eq!(
        index_shape(&warehouse, "fact_order_items").await,
        vec![
            "CREATE INDEX ON t USING btree (order_date)".to_string(),
            "CREATE UNIQUE INDEX ON t USING btree (order_id, item_id) constraint p".to_string(),
        ]
    );
    assert_eq!(
        duplicate_keys(&warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

/// A unique index of the target other than the key (here: one SKU per order) that the new
/// rows break: the index cannot be built, the run fails with the database's message and the
/// advice that resuming cannot help; nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_unique_index_the_new_rows_break_fails_the_run() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE UNIQUE INDEX one_sku_per_order ON fact_order_items (order_id, sku)",
    )
    .await;
    let order_id = count(
        &warehouse,
        "SELECT min(order_id) FROM staging_order_items WHERE order_date = '2024-03-04' \
         GROUP BY order_id HAVING count(DISTINCT item_id) > 1 ORDER BY 1 LIMIT 1",
    )
    .await;
    exec(
        &warehouse,
        &format!("UPDATE staging_order_items SET sku = 'SAME' WHERE order_id = {order_id}"),
    )
    .await;
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let RunOutcome::PartitionsFailed { run_id, failures } = run(&db).await else {
        panic!("expected the run to fail on the unique index")
    };
    assert_eq!(failures.len(), 1, "{failures:?}");
    let (key, message) = &failures[0];
    assert_eq!(key, backfill_coordinator::shadow::SHADOW_WIDE);
    assert!(
        message.contains("UNIQUE INDEX")
            && message.contains("(order_id, sku)")
            && message.contains("nothing was published"),
        "{message}"
    );
    let store = control_store(&warehouse);
    let failed = store.find_run(&run_id).await.unwrap().unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("Resuming cannot change that"),
        "{failed:?}"
    );
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
}

/// A process killed while building a shadow's index leaves the statement running in the
/// server; the rerun's build of the same index waits for it and, when it commits, fails on
/// the index's name. The rerun sees the index is there and goes on (it failed the run with
/// "resuming cannot change that", though one more rerun published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_an_earlier_attempt_built_meanwhile_is_taken_as_built() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    exec(
        &warehouse,
        "CREATE TABLE shadow_like AS SELECT g AS id, g % 7 AS day FROM generate_series(1, 5000) AS g",
    )
    .await;
    let deferred = backfill_common::engine::DeferredIndex {
        name: "shadow_like_id".to_string(),
        create: "CREATE UNIQUE INDEX shadow_like_id ON shadow_like (id)".to_string(),
        comment: None,
    };
    // The earlier attempt: its build is in flight, uncommitted.
    let earlier_pool = Warehouse::connect(&db.url, 2).await.unwrap();
    let mut earlier = earlier_pool.acquire().await.unwrap();
    exec_on(&mut earlier, "BEGIN").await;
    exec_on(&mut earlier, &deferred.create).await;
    let spec = Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap();
    let rerun = {
        let (warehouse, deferred) = (warehouse.clone(), deferred.clone());
        tokio::spawn(async move {
            backfill_coordinator::shadow::build_deferred_indexes(
                &warehouse,
                &spec,
                &table("shadow_like"),
                &[deferred],
            )
            .await
        })
    };
    // Wait until the rerun's build waits for the earlier one, then let that commit.
    let mut waited = false;
    for _ in 0..200 {
        if count(
            &warehouse,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'CREATE UNIQUE INDEX shadow_like_id%'",
        )
        .await
            > 0
        {
            waited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(waited, "the rerun's build waited for the earlier one");
    exec_on(&mut earlier, "COMMIT").await;
    let result = rerun.await.unwrap().unwrap();
    assert_eq!(
        result,
        Ok(()),
        "the index built meanwhile is taken as built"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'shadow_like_id'"
        )
        .await,
        1
    );
}
