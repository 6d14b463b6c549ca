//! Scenarios beyond the mini challenge: the lesson's worked example 1 (a derived column added
//! to 7 days of events, median audit, PostgreSQL) and hour-grain partitions on both dialects.

use backfill_common::spec::Spec;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

const EVENTS_SPEC: &str = include_str!("../../examples/events_session_length.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_1_adds_session_length_on_postgres() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    for sql in [
        "CREATE TABLE staging_sessions (session_id bigint PRIMARY KEY, session_start timestamp NOT NULL, session_end timestamp NOT NULL)",
        "INSERT INTO staging_sessions SELECT s, TIMESTAMP '2024-04-01' + s * INTERVAL '7 minutes', \
         TIMESTAMP '2024-04-01' + s * INTERVAL '7 minutes' + (60 + s % 900) * INTERVAL '1 second' FROM generate_series(1, 2000) s",
        "CREATE TABLE staging_events (event_id bigint NOT NULL, event_date date NOT NULL, event_time timestamp NOT NULL, session_id bigint NOT NULL, user_id integer NOT NULL)",
        "INSERT INTO staging_events SELECT g, DATE '2024-04-01' + (g / 200), TIMESTAMP '2024-04-01' + (g / 200) * INTERVAL '1 day' + (g % 200) * INTERVAL '1 minute', \
         1 + g / 2, g % 97 FROM generate_series(0, 1999) g",
        "CREATE TABLE events (event_id bigint NOT NULL, event_date date NOT NULL, event_time timestamp NOT NULL, session_id bigint NOT NULL, user_id integer NOT NULL, PRIMARY KEY (event_id, event_date))",
        "INSERT INTO events SELECT * FROM staging_events",
        "CREATE INDEX ON events (event_date)",
    ] {
        exec(&warehouse, sql).await;
    }
    let before = checksum(&warehouse, "events", None).await;
    let spec = Spec::parse(EVENTS_SPEC).unwrap();
    let backfill = Backfill::open(spec, EVENTS_SPEC.into(), &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id,
        archive,
        partitions,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(partitions, 7);
    assert_eq!(archive, format!("public.events__bf_archive_{run_id}"));
    assert_eq!(
        checksum(&warehouse, &archive, None).await,
        before,
        "the old table is archived untouched"
    );

    // The window has the derived column, computed right; days outside the window keep NULL.
    let wrong = count(
        &warehouse,
        "SELECT count(*) FROM events e JOIN staging_sessions s USING (session_id) WHERE e.event_date >= DATE '2024-04-04' \
         AND e.session_length_sec IS DISTINCT FROM CAST(extract(epoch FROM s.session_end - s.session_start) AS integer)",
    )
    .await;
    assert_eq!(wrong, 0);
    assert_eq!(count(&warehouse, "SELECT count(*) FROM events WHERE event_date < DATE '2024-04-04' AND session_length_sec IS NOT NULL").await, 0);
    assert_eq!(count(&warehouse, "SELECT count(*) FROM events").await, 2000);
    assert_eq!(
        duplicate_keys(&warehouse, "events", "event_id, event_date").await,
        0
    );

    // The median audit ran per partition on the new column and reports the value.
    let audits = control_store(&warehouse).audits(&run_id).await.unwrap();
    let medians: Vec<_> = audits
        .iter()
        .filter(|a| a.audit_name == "median_session_length")
        .collect();
    assert_eq!(medians.len(), 7);
    assert!(
        medians
            .iter()
            .all(|a| a.verdict == "pass" && a.observed.starts_with("NULL -> ")),
        "{medians:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_bounds_on_a_new_column_are_refused_before_any_write() {
    let db = TestDatabase::postgres().await;
    let text = EVENTS_SPEC.replace("min_value = 1\nmax_value = 7200", "max_change_pct = 5.0");
    let error = Backfill::open(Spec::parse(&text).unwrap(), text, &db.url)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("`session_length_sec` is a new column")
            && error.contains("min_value / max_value"),
        "{error}"
    );
}

fn hourly_spec() -> String {
    r#"
[target]
table = "hourly_readings"
key = ["reading_hour", "sensor_id"]
[partition]
column = "reading_hour"
grain = "hour"
first = "2024-05-01T00"
last = "2024-05-01T23"
[source]
query = "SELECT reading_hour, sensor_id, reading FROM staging_readings WHERE reading_hour >= :partition_start AND reading_hour < :partition_end"
[warehouse]
name = "hourly"
concurrency = 3
[[audit]]
kind = "unique_key"
[[audit]]
kind = "rowcount_delta"
max_change_rows = 0
[[audit]]
kind = "aggregate"
function = "sum"
column = "reading"
min_ratio = 0.99
max_ratio = 1.12
"#
    .to_string()
}

async fn hourly_partitions(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    let (ts, real) = match db.engine() {
        "postgres" => ("timestamp", "double precision"),
        "mysql" => ("DATETIME", "DOUBLE"),
        _ => ("TEXT", "REAL"),
    };
    for table in ["hourly_readings", "staging_readings", "expected_readings"] {
        exec(&warehouse, &format!("CREATE TABLE {table} (reading_hour {ts} NOT NULL, sensor_id integer NOT NULL, reading {real} NOT NULL, PRIMARY KEY (reading_hour, sensor_id))")).await;
    }
    // Three days of 10 sensors; the middle day's readings were recorded 10% low.
    let mut production = Vec::new();
    let mut corrected = Vec::new();
    for day in 0..3 {
        for hour in 0..24 {
            for sensor in 0..10 {
                let at = format!(
                    "2024-0{}-{:02} {hour:02}:00:00",
                    if day == 0 { 4 } else { 5 },
                    if day == 0 { 30 } else { day }
                );
                let value = (sensor * 100 + hour) as f64 + 0.5;
                let stored = if day == 1 { value * 0.9 } else { value };
                let cast = |v: &str| match db.engine() {
                    "postgres" => format!("CAST('{v}' AS timestamp)"),
                    "mysql" => format!("CAST('{v}' AS DATETIME)"),
                    _ => format!("'{v}'"),
                };
                production.push(format!("({}, {sensor}, {stored})", cast(&at)));
                corrected.push(format!("({}, {sensor}, {value})", cast(&at)));
            }
        }
    }
    exec(
        &warehouse,
        &format!(
            "INSERT INTO hourly_readings VALUES {}",
            production.join(", ")
        ),
    )
    .await;
    exec(
        &warehouse,
        &format!(
            "INSERT INTO staging_readings VALUES {}",
            corrected.join(", ")
        ),
    )
    .await;
    exec(
        &warehouse,
        &format!(
            "INSERT INTO expected_readings VALUES {}",
            corrected.join(", ")
        ),
    )
    .await;
    let text = hourly_spec();
    let backfill = Backfill::open(Spec::parse(&text).unwrap(), text, &db.url)
        .await
        .unwrap();
    let outcome = backfill.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id, partitions, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(partitions, 24);
    assert_eq!(
        checksum(&warehouse, "hourly_readings", None).await,
        checksum(&warehouse, "expected_readings", None).await
    );
    let records = control_store(&warehouse).partitions(&run_id).await.unwrap();
    assert_eq!(records.first().unwrap().partition_key, "2024-05-01T00");
    assert_eq!(records.last().unwrap().partition_key, "2024-05-01T23");
    assert!(
        records
            .iter()
            .all(|p| p.counts.unwrap().inserted == 10 && p.times_applied == 1)
    );
    let audits = control_store(&warehouse).audits(&run_id).await.unwrap();
    assert_eq!(
        audits
            .iter()
            .filter(|a| a.audit_name == "sum_reading")
            .count(),
        24,
        "one aggregate verdict per hour"
    );
}

on_engines!(hourly_partitions: sqlite, postgres, mysql);

/// SQLite keeps timestamps as text, often ISO-8601 with a `T`, which does not sort with the
/// space-separated bounds. Hour partitions must still select exactly their hour: the rows of
/// other hours and days stay untouched, and a source that compares raw text is caught by the
/// partition check instead of publishing wrong data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_hour_partitions_with_iso_t_timestamps() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    for table in ["hourly_readings", "staging_readings"] {
        exec(&warehouse, &format!("CREATE TABLE {table} (reading_hour TEXT NOT NULL, sensor_id integer NOT NULL, reading REAL NOT NULL, PRIMARY KEY (reading_hour, sensor_id))")).await;
    }
    // every 15 minutes for two days, 'T'-separated
    let mut rows = Vec::new();
    for day in 1..=2 {
        for quarter in 0..96 {
            rows.push(format!(
                "('2024-05-0{day}T{:02}:{:02}:00', 1, {})",
                quarter / 4,
                (quarter % 4) * 15,
                quarter + 1
            ));
        }
    }
    exec(
        &warehouse,
        &format!("INSERT INTO hourly_readings VALUES {}", rows.join(", ")),
    )
    .await;
    exec(&warehouse, "INSERT INTO staging_readings SELECT reading_hour, sensor_id, reading * 10 FROM hourly_readings").await;
    let spec = |source_filter: &str| {
        hourly_spec()
            .replace(
                "first = \"2024-05-01T00\"\nlast = \"2024-05-01T23\"",
                "first = \"2024-05-01T05\"\nlast = \"2024-05-01T06\"",
            )
            .replace(
                "WHERE reading_hour >= :partition_start AND reading_hour < :partition_end",
                source_filter,
            )
            .replace(
                "min_ratio = 0.99\nmax_ratio = 1.12",
                "min_ratio = 9.9\nmax_ratio = 10.1",
            )
    };

    // A source comparing raw text selects no rows for these hours: the audits refuse it and
    // nothing is published.
    let naive = spec("WHERE reading_hour >= :partition_start AND reading_hour < :partition_end");
    let outcome = Backfill::open(Spec::parse(&naive).unwrap(), naive, &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::AuditFailed { run_id, failures } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        failures
            .iter()
            .any(|f| f.audit_name == "rowcount_delta" && f.observed == "4 -> 0 rows (-4, 100.00%)"),
        "{failures:?}"
    );
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    backfill_coordinator::publish::drop_shadow(&store, &run)
        .await
        .unwrap();
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM hourly_readings").await,
        192
    );

    // Normalised on both sides: exactly the 8 readings of hours 05 and 06 change.
    let right = spec(
        "WHERE datetime(reading_hour) >= :partition_start AND datetime(reading_hour) < :partition_end",
    );
    let outcome = Backfill::open(Spec::parse(&right).unwrap(), right, &db.url)
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
        count(&warehouse, "SELECT count(*) FROM hourly_readings").await,
        192,
        "no row lost"
    );
    let changed = count(&warehouse, "SELECT count(*) FROM hourly_readings h JOIN staging_readings s USING (reading_hour, sensor_id) WHERE h.reading = s.reading").await;
    assert_eq!(
        changed, 8,
        "only hours 05 and 06 of May 1st were recomputed"
    );
    assert_eq!(count(&warehouse, "SELECT count(*) FROM hourly_readings WHERE reading_hour >= '2024-05-01T05' AND reading_hour < '2024-05-01T07' AND reading >= 200").await, 8);
}
