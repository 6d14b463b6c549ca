//! Hostile data and hostile SQL text, on every engine. NULL keys and duplicate keys in the
//! source stop their partition with a message that says what to fix, without retrying and
//! without publishing anything. Text that is odd (quotes, SQL and parameter lookalikes, bidi
//! overrides, combining marks, emoji sequences, the last code point, control characters, a
//! megabyte long) and bytes that are not UTF-8 come through the backfill exactly. SQL
//! fragments of the spec that end in a `--` comment do not swallow the statement around them.

use backfill_common::control::{PartitionState, RunState};
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Bind, Warehouse, execute, fetch_all, get};
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

async fn run(db: &TestDatabase, spec_text: &str) -> RunOutcome {
    Backfill::open(
        Spec::parse(spec_text).unwrap(),
        spec_text.to_string(),
        &db.url,
    )
    .await
    .unwrap()
    .run("test", &Quiet)
    .await
    .unwrap()
}

/// The partitions that failed, with their messages; asserts that nothing was published, that
/// each failed on its first attempt (permanent: no retry) and that the others are done.
async fn assert_failed_without_retry_or_publish(
    warehouse: &Warehouse,
    outcome: RunOutcome,
    target_before: &backfill_common::warehouse::Checksum,
) -> Vec<(String, String)> {
    let RunOutcome::PartitionsFailed { run_id, failures } = outcome else {
        panic!("expected failed partitions, got {outcome:?}");
    };
    let store = control_store(warehouse);
    assert_eq!(
        store.find_run(&run_id).await.unwrap().unwrap().state,
        RunState::Failed
    );
    for partition in store.partitions(&run_id).await.unwrap() {
        if failures
            .iter()
            .any(|(key, _)| key == &partition.partition_key)
        {
            assert_eq!(
                (partition.state, partition.attempt, partition.times_applied),
                (PartitionState::Failed, 1, 0),
                "{} fails once, permanently, applying nothing",
                partition.partition_key
            );
        } else {
            assert_eq!(partition.state, PartitionState::Done);
        }
    }
    assert_eq!(
        &checksum(warehouse, "fact_order_items", None).await,
        target_before,
        "nothing published"
    );
    assert!(store.archives().await.unwrap().is_empty());
    failures
}

/// A key column that is NULL in the source. With the target's primary key the database
/// refuses the row; on a target without NOT NULL on the key, the partition check does.
async fn null_keys_stop_their_partition(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let null_key = "SELECT CASE WHEN order_id = 451 THEN NULL ELSE order_id END AS order_id, item_id, order_date, sku, quantity,";
    let spec = mini_challenge_spec(&[(
        "SELECT order_id, item_id, order_date, sku, quantity,",
        null_key,
    )]);
    let failures =
        assert_failed_without_retry_or_publish(&warehouse, run(&db, &spec).await, &before).await;
    assert_eq!(failures.len(), 1, "only the day of order 451: {failures:?}");
    assert_eq!(failures[0].0, "2024-03-04");
    let message = failures[0].1.to_lowercase();
    assert!(
        message.contains("null") && message.contains("order_id"),
        "{message}"
    );

    // The same source into a copy of the table without constraints: the partition check
    // counts the NULL keys.
    exec(
        &warehouse,
        "CREATE TABLE loose_items AS SELECT * FROM fact_order_items",
    )
    .await;
    if db.engine() == "mysql" {
        // MySQL's CREATE TABLE … AS keeps NOT NULL; the point here is a key without it.
        exec(
            &warehouse,
            "ALTER TABLE loose_items MODIFY order_id bigint NULL",
        )
        .await;
    }
    let loose_before = checksum(&warehouse, "loose_items", None).await;
    let spec = mini_challenge_spec(&[
        (
            "SELECT order_id, item_id, order_date, sku, quantity,",
            null_key,
        ),
        ("table = \"fact_order_items\"", "table = \"loose_items\""),
        ("name = \"fix_doubled_quantity\"", "name = \"loose\""),
    ]);
    let RunOutcome::PartitionsFailed { failures, .. } = run(&db, &spec).await else {
        panic!("expected a failed partition");
    };
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0]
            .1
            .contains("source row(s) have a NULL key column"),
        "{failures:?}"
    );
    assert_eq!(
        checksum(&warehouse, "loose_items", None).await,
        loose_before
    );
}

/// Staging holds several versions of some rows; without `dedupe_order_by` the same key
/// arrives twice: the partition fails and says how to fix it.
async fn duplicate_keys_without_dedupe_stop_their_partition(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let duplicated_days = count(
        &warehouse,
        "SELECT count(DISTINCT order_date) FROM (SELECT order_date FROM staging_order_items \
         WHERE order_date >= '2024-03-03' AND order_date < '2024-03-07' \
         GROUP BY order_id, item_id, order_date HAVING count(*) > 1) AS d",
    )
    .await;
    assert!(duplicated_days > 0, "the data has duplicate versions");
    let spec = mini_challenge_spec(&[(
        "dedupe_order_by = \"updated_at DESC\"",
        "# no dedupe_order_by",
    )]);
    let failures =
        assert_failed_without_retry_or_publish(&warehouse, run(&db, &spec).await, &before).await;
    assert_eq!(failures.len() as i64, duplicated_days, "{failures:?}");
    for (_, message) in &failures {
        assert!(
            message.contains("the source returned the same key twice")
                && message.contains("set source.dedupe_order_by"),
            "{message}"
        );
    }
}

/// Text no one would type but someone's data holds.
fn odd_texts() -> Vec<String> {
    vec![
        String::new(),
        "O'Brien \"quoted\" `ticked` \\backslash\\ $$dollar$$".into(),
        "'; DROP TABLE notes; --".into(),
        "Robert'); DELETE FROM staging_notes; --".into(),
        ":partition_start :partition_end $1 ? %s {}".into(),
        "\u{202e}desrever\u{202c} and \u{2066}isolated\u{2069}".into(),
        "e\u{301}\u{301}\u{301} Z\u{36b}\u{36c}\u{36d}a\u{489}".into(),
        "👩🏽‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷".into(),
        "\u{1F600}\u{10FFFF}\u{E000}\u{FFFD}".into(),
        "\u{feff}BOM, zero\u{200b}width, non\u{a0}breaking".into(),
        "tab\tnewline\ncrlf\r\ncontrols \u{1}\u{1f}\u{7f}\u{85}".into(),
        "日本語 中文 한국어 العربية עברית".into(),
        "x".repeat(1_000_000),
        "é".repeat(300_000),
    ]
}

/// Every byte value, and sequences that are not UTF-8.
fn odd_bytes(index: usize) -> Vec<u8> {
    match index % 3 {
        0 => (0..=255u8).collect(),
        1 => vec![
            0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0xf0, 0x90, 0x28, 0xbc, 0xff,
        ],
        _ => vec![0; 16],
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ODD_SPEC: &str = r#"
name = "odd_text"
[target]
table = "notes"
key = ["note_id"]
[partition]
column = "day"
grain = "day"
first = "2024-05-01"
last = "2024-05-03"
[source]
query = """
SELECT note_id, day, note, raw, legacy FROM staging_notes
WHERE day >= :partition_start AND day < :partition_end
"""
[warehouse]
name = "odd"
[[audit]]
kind = "unique_key"
[[audit]]
kind = "rowcount_delta"
max_change_rows = 0
"#;

/// Odd text and bytes go from staging to the published table unchanged: same checksum, same
/// values compared in the database and read back by the client. On SQLite a TEXT column holds
/// bytes that are not UTF-8 too.
async fn odd_text_and_bytes_come_through_exactly(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    let (date, text_type, blob, unhex) = match db.engine() {
        "postgres" => ("date", "text", "bytea", "decode($4, 'hex')"),
        // MySQL's TEXT holds 64 KiB; LONGTEXT is text of any length.
        "mysql" => ("date", "LONGTEXT", "LONGBLOB", "unhex($4)"),
        _ => ("TEXT", "TEXT", "BLOB", "unhex($4)"),
    };
    // On SQLite `legacy` holds text that is not UTF-8 (CAST of bytes); PostgreSQL and MySQL
    // refuse such text at the door, so there it holds an ordinary string.
    let legacy = if db.engine() == "sqlite" {
        "CAST(X'4361666ec3a920c328ff' AS TEXT)"
    } else {
        "'legacy'"
    };
    for table in ["notes", "staging_notes"] {
        let key = if table == "notes" { " PRIMARY KEY" } else { "" };
        exec(
            &warehouse,
            &format!(
                "CREATE TABLE {table} (note_id bigint NOT NULL{key}, day {date} NOT NULL, note {text_type} NOT NULL, raw {blob}, legacy text)"
            ),
        )
        .await;
    }
    let texts = odd_texts();
    let mut conn = warehouse.acquire().await.unwrap();
    for (index, text) in texts.iter().enumerate() {
        let day = format!("2024-05-0{}", 1 + index % 3);
        let day_value = if db.typed_dates() {
            "CAST($2 AS date)"
        } else {
            "$2"
        };
        execute(
            &mut conn,
            &format!("INSERT INTO staging_notes VALUES ($1, {day_value}, $3, {unhex}, {legacy})"),
            &[
                Bind::Int(index as i64),
                Bind::Text(day.clone()),
                Bind::Text(text.clone()),
                Bind::Text(hex(&odd_bytes(index))),
            ],
        )
        .await
        .unwrap();
        execute(
            &mut conn,
            &format!("INSERT INTO notes VALUES ($1, {day_value}, 'old', NULL, NULL)"),
            &[Bind::Int(index as i64), Bind::Text(day)],
        )
        .await
        .unwrap();
    }
    drop(conn);

    let outcome = run(&db, ODD_SPEC).await;
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        checksum(&warehouse, "notes", None).await,
        checksum(&warehouse, "staging_notes", None).await,
        "the published table equals the source"
    );
    let same = if db.engine() != "sqlite" {
        "n.note = s.note AND n.raw = s.raw AND n.legacy = s.legacy AND length(n.note) = length(s.note)"
    } else {
        "n.note = s.note AND n.raw = s.raw AND n.legacy = s.legacy AND CAST(n.legacy AS BLOB) = X'4361666ec3a920c328ff'"
    };
    assert_eq!(
        count(
            &warehouse,
            &format!(
                "SELECT count(*) FROM notes n JOIN staging_notes s ON s.note_id = n.note_id WHERE {same}"
            )
        )
        .await,
        texts.len() as i64,
        "every value compares equal in the database"
    );
    // Read back by the client: the text is what went in, character for character.
    let mut conn = warehouse.acquire().await.unwrap();
    let rows = fetch_all(
        &mut conn,
        "SELECT note_id, note FROM notes ORDER BY note_id",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), texts.len());
    for row in &rows {
        let id: i64 = get(row, 0).unwrap();
        let note: String = get(row, 1).unwrap();
        assert!(
            note == texts[id as usize],
            "note {id} changed ({} bytes, expected {})",
            note.len(),
            texts[id as usize].len()
        );
    }
}

/// A `--` comment at the end of the source query, of `dedupe_order_by` and of an audit
/// expression (common in hand-written SQL) used to comment out the rest of the statement each
/// is embedded in; now the run publishes the expected table.
async fn trailing_comments_do_not_swallow_the_statement(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let spec = mini_challenge_spec(&[
        (
            "AND order_date < :partition_end\n\"\"\"",
            "AND order_date < :partition_end -- one partition\n\"\"\"",
        ),
        (
            "dedupe_order_by = \"updated_at DESC\"",
            "dedupe_order_by = \"updated_at DESC -- newest version wins\"",
        ),
        (
            "expression = \"quantity >= 0\"",
            "expression = \"quantity >= 0 -- never negative\"",
        ),
    ]);
    let outcome = run(&db, &spec).await;
    assert!(
        matches!(outcome, RunOutcome::Published { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

/// NULL is a value to a backfill: NULL to a value and a value to NULL are changes (written,
/// counted as updates), NULL to NULL is not, in the window merge of `swap_window`
/// (`IS DISTINCT FROM` semantics on every engine: `IS NOT` on SQLite, `<=>` on MySQL).
async fn null_to_value_and_back_are_changes(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    let date = if db.typed_dates() { "date" } else { "TEXT" };
    for table in ["notes", "staging_notes"] {
        exec(
            &warehouse,
            &format!(
                "CREATE TABLE {table} (note_id bigint NOT NULL PRIMARY KEY, day {date} NOT NULL, note varchar(20), amount bigint)"
            ),
        )
        .await;
    }
    let day = |d: &str| {
        if db.typed_dates() {
            format!("CAST('{d}' AS date)")
        } else {
            format!("'{d}'")
        }
    };
    let (d1, d2) = (day("2024-05-01"), day("2024-05-02"));
    exec(
        &warehouse,
        &format!(
            "INSERT INTO notes VALUES (1, {d1}, NULL, 5), (2, {d1}, 'was', NULL), (3, {d1}, NULL, NULL), (4, {d2}, 'kept', 7)"
        ),
    )
    .await;
    exec(
        &warehouse,
        &format!(
            "INSERT INTO staging_notes VALUES (1, {d1}, 'now', 5), (2, {d1}, NULL, 9), (3, {d1}, NULL, NULL), (4, {d2}, 'kept', 7)"
        ),
    )
    .await;
    let spec = r#"
name = "null_changes"
[target]
table = "notes"
key = ["note_id"]
[partition]
column = "day"
grain = "day"
first = "2024-05-01"
last = "2024-05-02"
[source]
query = "SELECT note_id, day, note, amount FROM staging_notes WHERE day >= :partition_start AND day < :partition_end"
[warehouse]
name = "notes"
[publish]
mode = "swap_window"
"#;
    let outcome = run(&db, spec).await;
    let RunOutcome::Published { run_id, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        checksum(&warehouse, "notes", None).await,
        checksum(&warehouse, "staging_notes", None).await,
        "every NULL and value is the source's"
    );
    let store = control_store(&warehouse);
    let rows = fetch_all(
        &mut warehouse.acquire().await.unwrap(),
        &format!(
            "SELECT detail FROM {} WHERE run_id = $1 AND kind = 'window_merged'",
            store.table("events")
        ),
        &[Bind::Text(run_id)],
    )
    .await
    .unwrap();
    let detail: String = get(&rows[0], 0).unwrap();
    assert_eq!(
        detail, "deleted 0 updated 2 inserted 0",
        "rows 1 and 2 changed; 3 (NULL to NULL) and 4 did not"
    );
}

on_engines!(null_keys_stop_their_partition: sqlite, postgres, mysql);
on_engines!(null_to_value_and_back_are_changes: sqlite, postgres, mysql);
on_engines!(duplicate_keys_without_dedupe_stop_their_partition: sqlite, postgres, mysql);
on_engines!(odd_text_and_bytes_come_through_exactly: sqlite, postgres, mysql);
on_engines!(trailing_comments_do_not_swallow_the_statement: sqlite, postgres, mysql);
