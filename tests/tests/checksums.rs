//! Checksums on PostgreSQL hash rows with `hash_record_extended` where every column type has
//! an extended hash function, and fall back to hashing the row's text where one does not.
//! A stored checksum says how it was computed, so checksums recorded by earlier versions
//! (text) still verify: a rollback of an archive recorded that way succeeds, and a wrong one
//! is still refused.

use backfill_common::spec::Spec;
use backfill_common::warehouse::{RowHash, Warehouse};
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn row_hash(warehouse: &Warehouse, name: &str) -> RowHash {
    let mut conn = warehouse.acquire().await.unwrap();
    warehouse.row_hash(&mut conn, &table(name)).await.unwrap()
}

async fn checksum_by(warehouse: &Warehouse, name: &str, how: RowHash) -> String {
    let mut conn = warehouse.acquire().await.unwrap();
    warehouse
        .checksum_by(&mut conn, &table(name), None, &[], how)
        .await
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_hash_follows_the_column_types() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    exec(&warehouse, "CREATE TYPE mood AS ENUM ('sad', 'happy')").await;
    exec(
        &warehouse,
        "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
    )
    .await;
    exec(&warehouse, "CREATE TYPE pair AS (a integer, b text)").await;
    exec(&warehouse, "CREATE DOMAIN money2 AS numeric(12,2)").await;
    exec(
        &warehouse,
        "CREATE COLLATION case_blind (provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
    )
    .await;
    // Every column's hash tells stored values apart: a domain's base type, an array's
    // element, an enum, numeric with a fixed scale (also through a domain), padded char.
    exec(
        &warehouse,
        "CREATE TABLE hashable (id bigint, n numeric(12,2), s text, v varchar(20), c char(3), d date, \
         ts timestamptz, u uuid, b bytea, f double precision, ok boolean, tags text[], m mood, p positive, prices numeric(8,2)[], ip inet, m2 money2)",
    )
    .await;
    exec(
        &warehouse,
        "INSERT INTO hashable VALUES \
         (1, 1.50, 'a', 'b', 'c', '2024-01-01', '2024-01-01 10:00+00', '8c0c3a1e-0000-4000-8000-000000000001', '\\x00ff', 1.5, true, '{x,y}', 'happy', 3, '{1.50,2}', '10.0.0.1', 2.5), \
         (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    )
    .await;
    assert_eq!(row_hash(&warehouse, "hashable").await, RowHash::Record);
    let record = checksum_by(&warehouse, "hashable", RowHash::Record).await;
    let text = checksum_by(&warehouse, "hashable", RowHash::Text).await;
    assert!(record.starts_with("2:h"), "{record}");
    assert!(!text.contains(":h"), "{text}");
    assert_eq!(RowHash::of_stored(&record), RowHash::Record);
    assert_eq!(RowHash::of_stored(&text), RowHash::Text);
    // The default checksum takes the fast way here.
    assert_eq!(product_checksum(&warehouse, "hashable", None).await, record);

    // One changed value changes both kinds of checksum.
    exec(
        &warehouse,
        "UPDATE hashable SET tags = '{x,z}' WHERE id = 1",
    )
    .await;
    assert_ne!(
        checksum_by(&warehouse, "hashable", RowHash::Record).await,
        record
    );
    assert_ne!(
        checksum_by(&warehouse, "hashable", RowHash::Text).await,
        text
    );

    // One column whose type has no extended hash function, or whose hash follows an equality
    // coarser than the stored value (1.0 = 1.00, '1 day' = '24 hours', case-blind text),
    // sends the whole table to text hashing, and the checksum still works.
    for (name, column) in [
        ("with_json", "json"),
        ("with_jsonb", "jsonb"),
        ("with_interval", "interval"),
        ("with_free_numeric", "numeric"),
        ("with_free_numeric_array", "numeric[]"),
        ("with_case_blind_text", "text COLLATE case_blind"),
        ("with_unpadded_bpchar", "bpchar"),
        ("with_hashable_composite", "pair"),
        ("with_xml", "xml"),
        ("with_point", "point"),
        ("with_range", "int4range"),
        ("with_range_array", "int4range[]"),
        ("with_multirange", "datemultirange"),
        ("with_json_array", "json[]"),
        ("with_money", "money"),
    ] {
        exec(
            &warehouse,
            &format!("CREATE TABLE {name} (id bigint, x {column})"),
        )
        .await;
        exec(&warehouse, &format!("INSERT INTO {name} VALUES (1, NULL)")).await;
        assert_eq!(row_hash(&warehouse, name).await, RowHash::Text, "{column}");
        let sum = product_checksum(&warehouse, name, None).await;
        assert!(
            sum.starts_with("1:") && !sum.contains(":h"),
            "{column}: {sum}"
        );
    }
    drop(db);
}

/// A run's partition checksums (computed over the rows an INSERT returned) equal the
/// checksums of those partitions in the published table, and the archive's checksum is the
/// old table's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_archive_checksums_match_the_tables() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = product_checksum(&warehouse, "fact_order_items", None).await;
    assert!(before.contains(":h"), "{before}");
    let spec = Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap();
    let backfill = Backfill::open(spec, demo::MINI_CHALLENGE_SPEC.into(), &db.url)
        .await
        .unwrap();
    let RunOutcome::Published { run_id, .. } = backfill.run("test", &Quiet).await.unwrap() else {
        panic!("not published")
    };
    let store = control_store(&warehouse);
    let partitions = store.partitions(&run_id).await.unwrap();
    assert_eq!(partitions.len(), 4);
    for partition in &partitions {
        let filter = format!(
            "order_date >= DATE '{}' AND order_date < DATE '{}'",
            partition.range_start, partition.range_end
        );
        let published = product_checksum(&warehouse, "fact_order_items", Some(&filter)).await;
        assert_eq!(
            partition.checksum.as_deref(),
            Some(published.as_str()),
            "partition {}",
            partition.partition_key
        );
    }
    let archive = store
        .archives()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.run_id == run_id)
        .unwrap();
    assert_eq!(archive.checksum, before);
    drop(db);
}

/// An archive whose checksum was recorded by an earlier version (hashing row text) is
/// verified that way at rollback; a wrong checksum of either kind is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_recorded_with_text_checksums_still_roll_back() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let spec = Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap();
    let backfill = Backfill::open(spec, demo::MINI_CHALLENGE_SPEC.into(), &db.url)
        .await
        .unwrap();
    let RunOutcome::Published { run_id, .. } = backfill.run("test", &Quiet).await.unwrap() else {
        panic!("not published")
    };
    let store = control_store(&warehouse);
    let archive = store
        .archives()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.run_id == run_id)
        .unwrap();
    let legacy = checksum_by(&warehouse, &archive.archive_table, RowHash::Text).await;
    assert_ne!(legacy, archive.checksum);
    let set_checksum = |value: String| {
        let warehouse = warehouse.clone();
        let table = archive.archive_table.clone();
        async move {
            exec(
                &warehouse,
                &format!(
                    "UPDATE backfill.archives SET checksum = '{value}' WHERE archive_table = '{table}'"
                ),
            )
            .await
        }
    };
    // Wrong, in either format: refused, nothing restored.
    for wrong in ["1:h12345".to_string(), "1:12345".to_string()] {
        set_checksum(wrong.clone()).await;
        let error = publish::rollback(&store, &run_id).await.unwrap_err();
        assert!(
            error.to_string().contains("was recorded at publish"),
            "{wrong}: {error}"
        );
    }
    set_checksum(legacy.clone()).await;
    let report = publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(report.checksum, legacy);
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    drop(db);
}
