//! The hourly workloads of sections 2-4: partitions start at 2024-01-01T00, one hour each,
//! over a `readings` table recomputed from `src` (one row per hour).

use chrono::NaiveDateTime;

pub fn first_hour() -> NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(2024, 1, 1)
        .expect("date")
        .and_hms_opt(0, 0, 0)
        .expect("time")
}

/// The spec's `partition.last` for `partitions` hours from `first_hour`.
pub fn last_hour(partitions: usize) -> String {
    (first_hour() + chrono::Duration::hours(partitions as i64 - 1))
        .format("%Y-%m-%dT%H")
        .to_string()
}

/// Schema `schema` with `src` (the recomputed values, one row per hour) and `readings` (the
/// target, every value off by one), both indexed on the hour.
pub fn readings_setup(schema: &str, partitions: usize) -> String {
    format!(
        "
CREATE SCHEMA {schema};
CREATE TABLE {schema}.src (id bigint PRIMARY KEY, at timestamp NOT NULL, v int NOT NULL);
INSERT INTO {schema}.src SELECT g, TIMESTAMP '2024-01-01' + (g - 1) * interval '1 hour', g % 1000 FROM generate_series(1, {partitions}) g;
CREATE INDEX ON {schema}.src (at);
CREATE TABLE {schema}.readings (id bigint PRIMARY KEY, at timestamp NOT NULL, v int NOT NULL);
INSERT INTO {schema}.readings SELECT id, at, v - 1 FROM {schema}.src;
CREATE INDEX ON {schema}.readings (at);
ANALYZE;
"
    )
}
