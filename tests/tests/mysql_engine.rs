//! What is MySQL's own, on the local MariaDB. Its table swap is a cut-over (its DDL commits
//! on its own): a writer held during the checks lands in the published table, never in the
//! archive; failed checks change nothing and never drop a table that holds data; a publish
//! that stopped after the rename but before its record is recorded by the next publish or
//! run, and cannot be abandoned. Changes a case-insensitive collation calls equal are
//! published.

use std::time::Duration;

use async_trait::async_trait;
use backfill_common::BackfillError;
use backfill_common::control::RunState;
use backfill_common::engine::{Engine, SwapGuard, TableSwap, mysql::Mysql};
use backfill_common::ident::TableName;
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Checksum, Session, Warehouse, execute};
use backfill_coordinator::demo;
use backfill_coordinator::publish;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn two_tables(warehouse: &Warehouse) {
    exec(warehouse, "CREATE TABLE t (id bigint PRIMARY KEY, v text)").await;
    exec(warehouse, "CREATE TABLE s (id bigint PRIMARY KEY, v text)").await;
    exec(warehouse, "INSERT INTO t VALUES (1, 'old'), (2, 'old')").await;
    exec(warehouse, "INSERT INTO s VALUES (1, 'new'), (2, 'new')").await;
}

/// `current` steps aside to `aside`, `replacement` takes its name.
fn swap_of<'a>(
    current: &'a TableName,
    aside: &'a TableName,
    replacement: &'a TableName,
) -> TableSwap<'a> {
    TableSwap {
        current,
        aside,
        replacement,
        aside_suffix: "_archive",
        carry_grants: true,
        takes_index_names: &|_| true,
        lock_wait: backfill_common::spec::DEFAULT_LOCK_WAIT,
    }
}

/// During the checks, another session writes to the target: it waits for the lock.
struct WriterDuringChecks {
    warehouse: Warehouse,
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[async_trait]
impl SwapGuard for WriterDuringChecks {
    async fn check(&self, session: &mut dyn Session) -> Result<Checksum, BackfillError> {
        let warehouse = self.warehouse.clone();
        let writer = tokio::spawn(async move {
            let mut conn = warehouse.acquire().await.unwrap();
            execute(
                &mut conn,
                "INSERT INTO t VALUES (3, 'written during the swap')",
                &[],
            )
            .await
            .unwrap();
        });
        *self.writer.lock().unwrap() = Some(writer);
        // Long enough for the writer to queue behind the lock.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let table = table("t");
        self.warehouse.checksum(session, &table, None, &[]).await
    }
}

struct FailingChecks;

#[async_trait]
impl SwapGuard for FailingChecks {
    async fn check(&self, _session: &mut dyn Session) -> Result<Checksum, BackfillError> {
        Err(BackfillError::Conflict("the target changed".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_held_by_the_cut_over_lands_in_the_published_table() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    two_tables(&warehouse).await;
    let guard = WriterDuringChecks {
        warehouse: warehouse.clone(),
        writer: std::sync::Mutex::new(None),
    };
    let (t, s, a) = (table("t"), table("s"), table("t_archive"));
    let swap = swap_of(&t, &a, &s);
    let checked = Mysql
        .cut_over(warehouse.pool(), &swap, &guard)
        .await
        .unwrap();
    assert_eq!(checked.rows, 2, "the checks saw the table before the write");
    let writer = guard.writer.lock().unwrap().take().unwrap();
    writer.await.unwrap();
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM t WHERE v = 'new'").await,
        2
    );
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM t WHERE id = 3").await,
        1,
        "the held write went to the published table"
    );
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM t_archive").await,
        2,
        "the archive is the table the checks saw, nothing more"
    );
    assert_eq!(
        checksum(&warehouse, "t_archive", None).await.to_string(),
        checked.to_string()
    );
    assert!(!table_exists(&warehouse, "s").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checks_change_nothing_and_leave_no_sentry() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    two_tables(&warehouse).await;
    let before = checksum(&warehouse, "t", None).await;
    // A sentry left by an attempt that stopped before its rename does not block the next.
    exec(&warehouse, "CREATE TABLE t_archive (bf_sentry int)").await;
    let (t, s, a) = (table("t"), table("s"), table("t_archive"));
    let swap = swap_of(&t, &a, &s);
    let error = Mysql
        .cut_over(warehouse.pool(), &swap, &FailingChecks)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("the target changed"), "{error}");
    assert_eq!(checksum(&warehouse, "t", None).await, before);
    assert!(table_exists(&warehouse, "s").await);
    assert!(
        !table_exists(&warehouse, "t_archive").await,
        "no sentry left"
    );
    // The pooled sessions hold no table locks: the table is writable.
    exec(&warehouse, "INSERT INTO t VALUES (9, 'after')").await;
}

/// A publish that stopped after its rename committed but before the run was recorded: the
/// next publish finds the names changed and records what happened, data intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_without_its_record_is_recorded_by_the_approved_publish() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let text =
        demo::MINI_CHALLENGE_SPEC.replace("[publish]\n", "[publish]\napproval = \"manual\"\n");
    let backfill = Backfill::open(Spec::parse(&text).unwrap(), text.clone(), &db.url)
        .await
        .unwrap();
    let RunOutcome::AwaitingApproval { run_id, .. } = backfill.run("test", &Quiet).await.unwrap()
    else {
        panic!("expected the approval gate");
    };
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let target = table("fact_order_items");
    let archive = publish::archive_name(&target, &run_id).unwrap();
    // What the cut-over's rename does, then the process stops.
    exec(
        &warehouse,
        &format!(
            "RENAME TABLE fact_order_items TO {}, {} TO fact_order_items",
            archive.quoted(),
            table(&run.shadow_table).quoted()
        ),
    )
    .await;
    let outcome = backfill
        .publish_approved(&run_id, "test", &Quiet)
        .await
        .unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Published);
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    let archives = store.archives().await.unwrap();
    assert_eq!(archives.len(), 1);
    assert_eq!(
        archives[0].checksum,
        product_checksum(&warehouse, &archive.to_string(), None).await
    );
    assert_eq!(
        checksum(&warehouse, &archive.to_string(), None).await,
        before
    );
    // The diff report needs FULL OUTER JOIN: refused with the way out, not a syntax error.
    let refused = backfill_coordinator::diff::diff_run(&store, &run_id, 5)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("FULL OUTER JOIN") && refused.contains(&archive.to_string()),
        "{refused}"
    );
    // And it rolls back like any publish.
    publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
}

/// The same stop on a run whose audits had passed (state `auditing`): `abandon` refuses it
/// (it would leave the table published without a way back) and says to resume; running the
/// spec again records the publish without auditing a shadow that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_without_its_record_is_recorded_by_the_next_run() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    // Stop the run before publish (a failing audit), then put it where a publish that was
    // interrupted after its rename leaves it: audits passed, tables swapped, nothing recorded.
    let text = mini_challenge_spec(&[(
        "[publish]",
        "[[audit]]\nkind = \"expression\"\nname = \"stop_here\"\nexpression = \"1 = 0\"\n\n[publish]",
    )]);
    let backfill = Backfill::open(Spec::parse(&text).unwrap(), text.clone(), &db.url)
        .await
        .unwrap();
    let RunOutcome::AuditFailed { run_id, .. } = backfill.run("test", &Quiet).await.unwrap() else {
        panic!("expected the audit to stop the run");
    };
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    exec(
        &warehouse,
        &format!(
            "UPDATE {} SET state = 'auditing' WHERE run_id = '{run_id}'",
            store.table("runs")
        ),
    )
    .await;
    let archive = publish::archive_name(&table("fact_order_items"), &run_id).unwrap();
    exec(
        &warehouse,
        &format!(
            "RENAME TABLE fact_order_items TO {}, {} TO fact_order_items",
            archive.quoted(),
            table(&run.shadow_table).quoted()
        ),
    )
    .await;

    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let refused = publish::drop_shadow(&store, &run)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("backfill resume") && refused.contains(&archive.to_string()),
        "{refused}"
    );
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Auditing
    );

    let outcome = backfill.run("test", &Quiet).await.unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    assert_eq!(
        checksum(&warehouse, &archive.to_string(), None).await,
        before
    );
    publish::rollback(&store, &run_id).await.unwrap();
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
}

/// MySQL's usual collations call `usa` and `USA` (and `a` and `a `) equal; a backfill that
/// fixes the case or the padding must still write it, and say it updated those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_case_insensitive_collation_calls_equal_are_published() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    for table in ["accounts", "staging_accounts"] {
        exec(
            &warehouse,
            &format!(
                "CREATE TABLE {table} (id bigint PRIMARY KEY, day date NOT NULL, \
                 country varchar(20) COLLATE utf8mb4_general_ci NOT NULL)"
            ),
        )
        .await;
    }
    exec(
        &warehouse,
        "INSERT INTO accounts VALUES (1, '2024-05-01', 'usa'), (2, '2024-05-01', 'fr'), (3, '2024-05-02', 'de')",
    )
    .await;
    exec(
        &warehouse,
        "INSERT INTO staging_accounts VALUES (1, '2024-05-01', 'USA'), (2, '2024-05-01', 'fr '), (3, '2024-05-02', 'de')",
    )
    .await;
    let spec = r#"
name = "fix_country_case"
[target]
table = "accounts"
key = ["id"]
[partition]
column = "day"
grain = "day"
first = "2024-05-01"
last = "2024-05-02"
[source]
query = "SELECT id, day, country FROM staging_accounts WHERE day >= :partition_start AND day < :partition_end"
[warehouse]
name = "accounts"
[publish]
mode = "swap_window"
"#;
    let outcome = Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap();
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        count(
            &warehouse,
            "SELECT count(*) FROM accounts a JOIN staging_accounts s ON s.id = a.id \
             WHERE CAST(a.country AS BINARY) = CAST(s.country AS BINARY)"
        )
        .await,
        3,
        "every value is the source's, byte for byte"
    );
    let store = control_store(&warehouse);
    let events = fetch_all_texts(
        &warehouse,
        &format!(
            "SELECT detail FROM {} WHERE kind = 'window_merged'",
            store.table("events")
        ),
    )
    .await;
    assert_eq!(events, vec!["deleted 0 updated 2 inserted 0".to_string()]);
}

async fn fetch_all_texts(warehouse: &Warehouse, sql: &str) -> Vec<String> {
    let mut conn = warehouse.acquire().await.unwrap();
    backfill_common::warehouse::fetch_all(&mut conn, sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| backfill_common::warehouse::get(r, 0).unwrap())
        .collect()
}

/// MySQL has no partial index: "one open run per target" is a unique index on a stored
/// generated column that holds the target only while the run is open. Two open runs of one
/// target are refused as a duplicate key; finished runs of it are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_open_run_per_target_without_partial_indexes() {
    let db = TestDatabase::mysql().await;
    let warehouse = db.warehouse().await;
    let store = control_store(&warehouse);
    store.migrate().await.unwrap();
    let insert = |run_id: &str, state: &str| {
        format!(
            "INSERT INTO {} (run_id, spec_hash, spec_name, target, state, tool_version, owner, shadow_table, created_at, updated_at) \
             VALUES ('{run_id}', 'h', 'n', 'db.t', '{state}', 'v', 'o', 'db.t__bf_shadow_{run_id}', 'now', 'now')",
            store.table("runs")
        )
    };
    for (run_id, state) in [("p1", "published"), ("p2", "published"), ("r1", "running")] {
        exec(&warehouse, &insert(run_id, state)).await;
    }
    let mut conn = warehouse.acquire().await.unwrap();
    let error = backfill_common::warehouse::execute(&mut conn, &insert("r2", "auditing"), &[])
        .await
        .unwrap_err();
    assert!(error.is_unique_violation(), "{error:?}");
    drop(conn);
    exec(
        &warehouse,
        &format!(
            "UPDATE {} SET state = 'abandoned' WHERE run_id = 'r1'",
            store.table("runs")
        ),
    )
    .await;
    exec(&warehouse, &insert("r2", "auditing")).await;
}
