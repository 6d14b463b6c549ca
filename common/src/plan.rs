//! The partition planner: a scope (range or list) and a grain become the exact list of
//! partitions, each a half-open interval [start, end). Pure functions, property-tested.

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde::Serialize;

use crate::spec::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grain {
    Day,
    Hour,
}

impl Grain {
    pub fn step(self) -> Duration {
        match self {
            Grain::Day => Duration::days(1),
            Grain::Hour => Duration::hours(1),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Day => "day",
            Grain::Hour => "hour",
        }
    }
}

/// One partition: its label (`2024-03-01` or `2024-03-01T05`) and its half-open interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub key: String,
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
}

impl Partition {
    pub fn new(grain: Grain, start: NaiveDateTime) -> Partition {
        Partition {
            key: partition_key(grain, start),
            start,
            end: start + grain.step(),
        }
    }
}

pub fn partition_key(grain: Grain, start: NaiveDateTime) -> String {
    match grain {
        Grain::Day => start.format("%Y-%m-%d").to_string(),
        Grain::Hour => start.format("%Y-%m-%dT%H").to_string(),
    }
}

/// The value bound for a partition boundary: `2024-03-01` for days, `2024-03-01 05:00:00` for
/// hours; each dialect casts it to its date or timestamp type.
pub fn bound_value(grain: Grain, at: NaiveDateTime) -> String {
    match grain {
        Grain::Day => at.format("%Y-%m-%d").to_string(),
        Grain::Hour => at.format("%Y-%m-%d %H:%M:%S").to_string(),
    }
}

/// Years a partition may start in: what every supported warehouse stores as a date, leaving
/// room for the end of the last partition (chrono's calendar stops in year 262142, and
/// planning the partition after its last day would overflow).
pub const PARTITION_YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// Parses the start of a partition; `None` when the text is not aligned to the grain or lies
/// outside `PARTITION_YEARS`.
pub fn parse_partition_start(grain: Grain, value: &str) -> Option<NaiveDateTime> {
    parse_aligned_start(grain, value).filter(|start| PARTITION_YEARS.contains(&start.year()))
}

fn parse_aligned_start(grain: Grain, value: &str) -> Option<NaiveDateTime> {
    match grain {
        Grain::Day => NaiveDate::parse_from_str(value, "%Y-%m-%d")
            .ok()
            .map(|d| d.and_time(NaiveTime::MIN)),
        Grain::Hour => {
            let value = value.replace(' ', "T");
            let parsed = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
                .iter()
                .find_map(|f| NaiveDateTime::parse_from_str(&value, f).ok())
                .or_else(|| {
                    NaiveDateTime::parse_from_str(&format!("{value}:00"), "%Y-%m-%dT%H:%M").ok()
                })?;
            (parsed.minute() == 0 && parsed.second() == 0).then_some(parsed)
        }
    }
}

/// How many partitions a scope holds, without materialising them.
pub fn count(grain: Grain, scope: &Scope) -> usize {
    match scope {
        Scope::Range { first, last } => {
            let steps = (*last - *first).num_seconds() / grain.step().num_seconds();
            (steps.max(0) + 1) as usize
        }
        Scope::List(starts) => starts.len(),
    }
}

pub fn partitions(grain: Grain, scope: &Scope) -> Vec<Partition> {
    match scope {
        Scope::Range { first, last } => {
            let mut out = Vec::with_capacity(count(grain, scope));
            let mut at = *first;
            while at <= *last {
                out.push(Partition::new(grain, at));
                at += grain.step();
            }
            out
        }
        Scope::List(starts) => starts.iter().map(|s| Partition::new(grain, *s)).collect(),
    }
}

/// Adjacent partitions merged into maximal half-open ranges; used to describe "the window"
/// to SQL with as few predicates as possible.
pub fn coalesce_ranges(partitions: &[Partition]) -> Vec<(NaiveDateTime, NaiveDateTime)> {
    let mut sorted: Vec<_> = partitions.iter().map(|p| (p.start, p.end)).collect();
    sorted.sort();
    let mut out: Vec<(NaiveDateTime, NaiveDateTime)> = Vec::new();
    for (start, end) in sorted {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn day(offset: i64) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2020, 1, 1)
            .unwrap()
            .and_time(NaiveTime::MIN)
            + Duration::days(offset)
    }

    proptest! {
        #[test]
        fn ranges_have_no_gaps_or_overlaps(first in 0i64..3000, len in 0i64..400, hourly in any::<bool>()) {
            let grain = if hourly { Grain::Hour } else { Grain::Day };
            let first = day(first);
            let last = first + grain.step() * (len as i32);
            let scope = Scope::Range { first, last };
            let parts = partitions(grain, &scope);
            prop_assert_eq!(parts.len(), count(grain, &scope));
            prop_assert_eq!(parts.len() as i64, len + 1);
            prop_assert_eq!(parts[0].start, first);
            prop_assert_eq!(parts.last().unwrap().start, last);
            for pair in parts.windows(2) {
                prop_assert_eq!(pair[0].end, pair[1].start, "no gap, no overlap");
                prop_assert!(pair[0].key < pair[1].key, "keys sort like time");
            }
            for p in &parts {
                prop_assert_eq!(p.end - p.start, grain.step());
                prop_assert_eq!(parse_partition_start(grain, &p.key), Some(p.start), "keys round-trip");
            }
            prop_assert_eq!(coalesce_ranges(&parts), vec![(first, last + grain.step())]);
        }

        #[test]
        fn lists_cover_exactly_the_listed_partitions(offsets in proptest::collection::btree_set(0i64..1000, 1..50)) {
            let starts: Vec<_> = offsets.iter().map(|o| day(*o)).collect();
            let parts = partitions(Grain::Day, &Scope::List(starts.clone()));
            prop_assert_eq!(parts.iter().map(|p| p.start).collect::<Vec<_>>(), starts);
            let ranges = coalesce_ranges(&parts);
            // every partition lies inside exactly one range, ranges are disjoint and not adjacent
            for p in &parts {
                prop_assert_eq!(ranges.iter().filter(|(s, e)| *s <= p.start && p.end <= *e).count(), 1);
            }
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].1 < pair[1].0);
            }
            let covered: i64 = ranges.iter().map(|(s, e)| (*e - *s).num_days()).sum();
            prop_assert_eq!(covered, parts.len() as i64);
        }
    }

    #[test]
    fn hour_keys_parse_in_several_forms() {
        let expect = parse_partition_start(Grain::Hour, "2024-03-01T05").unwrap();
        assert_eq!(
            parse_partition_start(Grain::Hour, "2024-03-01T05:00:00"),
            Some(expect)
        );
        assert_eq!(
            parse_partition_start(Grain::Hour, "2024-03-01 05:00"),
            Some(expect)
        );
        assert_eq!(parse_partition_start(Grain::Hour, "2024-03-01T05:30"), None);
        assert_eq!(parse_partition_start(Grain::Day, "2024-02-30"), None);
        assert_eq!(parse_partition_start(Grain::Day, "+262142-12-31"), None);
        assert_eq!(parse_partition_start(Grain::Day, "0000-12-31"), None);
        assert!(parse_partition_start(Grain::Hour, "9999-12-31T23").is_some());
    }
}
