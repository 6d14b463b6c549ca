//! What a finished `backfill` run left in its control store (schema `backfill`): per-partition
//! timestamps and in-transaction seconds, the run's state-change events and the audits' time,
//! from which the harness derives the run's phases. Timestamps there have millisecond
//! precision; per-partition overhead uses the JSON log's microsecond timestamps instead.

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

#[derive(Debug, Clone)]
pub struct PartitionFacts {
    pub key: String,
    pub state: String,
    pub times_applied: i64,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds inside the partition's transaction, from BEGIN to just before the checkpoint.
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RunFacts {
    pub run_id: String,
    pub state: String,
    pub partitions: Vec<PartitionFacts>,
    pub events: Vec<(String, DateTime<Utc>)>,
    pub audits_checked_at: Option<DateTime<Utc>>,
}

fn parse_time(text: Option<String>) -> Result<Option<DateTime<Utc>>> {
    text.map(|t| {
        DateTime::parse_from_rfc3339(&t)
            .map(|d| d.with_timezone(&Utc))
            .with_context(|| format!("timestamp `{t}`"))
    })
    .transpose()
}

/// The only run in the database's control store.
pub async fn read_run(conn: &mut PgConnection) -> Result<RunFacts> {
    let runs = sqlx::query("SELECT run_id, state FROM backfill.runs")
        .fetch_all(&mut *conn)
        .await
        .context("reading the control store's runs")?;
    if runs.len() != 1 {
        bail!(
            "expected one run in the control store, found {}",
            runs.len()
        );
    }
    let run_id: String = runs[0].try_get(0)?;
    let state: String = runs[0].try_get(1)?;
    let rows = sqlx::query(
        "SELECT partition_key, state, times_applied, started_at, finished_at, seconds \
         FROM backfill.partitions WHERE run_id = $1 ORDER BY partition_key",
    )
    .bind(&run_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        partitions.push(PartitionFacts {
            key: row.try_get(0)?,
            state: row.try_get(1)?,
            times_applied: row.try_get(2)?,
            started_at: parse_time(row.try_get(3)?)?,
            finished_at: parse_time(row.try_get(4)?)?,
            seconds: row.try_get(5)?,
        });
    }
    let mut events = Vec::new();
    for row in sqlx::query(
        "SELECT kind, at FROM backfill.events WHERE run_id = $1 AND partition_key IS NULL ORDER BY id",
    )
    .bind(&run_id)
    .fetch_all(&mut *conn)
    .await?
    {
        let at = parse_time(Some(row.try_get(1)?))?.expect("some");
        events.push((row.try_get::<String, _>(0)?, at));
    }
    let audits: Option<String> =
        sqlx::query("SELECT max(checked_at) FROM backfill.audits WHERE run_id = $1")
            .bind(&run_id)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
    Ok(RunFacts {
        run_id,
        state,
        partitions,
        events,
        audits_checked_at: parse_time(audits)?,
    })
}

impl RunFacts {
    /// Every partition done and applied exactly once, the run published.
    pub fn check_published(&self, expected_partitions: usize) -> Result<()> {
        if self.state != "published" {
            bail!("run {} is {}, not published", self.run_id, self.state);
        }
        if self.partitions.len() != expected_partitions {
            bail!(
                "run {} has {} partitions, expected {expected_partitions}",
                self.run_id,
                self.partitions.len()
            );
        }
        if let Some(p) = self
            .partitions
            .iter()
            .find(|p| p.state != "done" || p.times_applied != 1)
        {
            bail!(
                "partition {} is {} (applied {} times)",
                p.key,
                p.state,
                p.times_applied
            );
        }
        Ok(())
    }

    pub fn event(&self, kind: &str) -> Option<DateTime<Utc>> {
        self.events
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, at)| *at)
    }

    /// First partition start and last partition finish.
    pub fn partition_window(&self) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
        let first = self
            .partitions
            .iter()
            .filter_map(|p| p.started_at)
            .min()
            .ok_or_else(|| anyhow!("no partition started"))?;
        let last = self
            .partitions
            .iter()
            .filter_map(|p| p.finished_at)
            .max()
            .ok_or_else(|| anyhow!("no partition finished"))?;
        Ok((first, last))
    }

    /// Seconds of the partition phase: first partition start to last partition finish.
    pub fn partition_seconds(&self) -> Result<f64> {
        let (first, last) = self.partition_window()?;
        Ok(seconds_between(first, last))
    }

    /// The run's phases in seconds, from the process start to its exit:
    /// start-up (connect, migrate, plan), shadow (build and copy), partitions, barrier and
    /// indexes (last partition to audits starting: the barrier, then the shadow's deferred
    /// indexes and ANALYZE), audits, publish (up to the publish's commit), and exit.
    pub fn phases(&self, started: DateTime<Utc>, wall: f64) -> Result<Vec<(&'static str, f64)>> {
        let planned = self
            .event("run_planned")
            .ok_or_else(|| anyhow!("no run_planned event"))?;
        let (first, last) = self.partition_window()?;
        let auditing = self
            .event("run_auditing")
            .ok_or_else(|| anyhow!("no run_auditing event"))?;
        let audited = self.audits_checked_at.unwrap_or(auditing);
        let published = self
            .event("run_published")
            .ok_or_else(|| anyhow!("no run_published event"))?;
        let end = started + chrono::Duration::microseconds((wall * 1e6) as i64);
        Ok(vec![
            ("start-up and plan", seconds_between(started, planned)),
            ("shadow", seconds_between(planned, first)),
            ("partitions", seconds_between(first, last)),
            ("barrier and indexes", seconds_between(last, auditing)),
            ("audits", seconds_between(auditing, audited)),
            ("publish", seconds_between(audited, published)),
            ("commit and exit", seconds_between(published, end)),
        ])
    }
}

pub fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// One partition state change read from a JSON log line.
#[derive(Debug, Clone, PartialEq)]
pub struct StateChange {
    pub at: DateTime<Utc>,
    pub change: String,
    pub partition: String,
}

/// The partition state changes (`partition_running` at the claim, `partition_done` at the
/// checkpoint) of a JSON log (one object per line), in time order.
pub fn state_changes_from_json_log(log: &str) -> Result<Vec<StateChange>> {
    let mut changes = Vec::new();
    for line in log.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(change) = value.get("change").and_then(|c| c.as_str()) else {
            continue;
        };
        if !change.starts_with("partition_") {
            continue;
        }
        let stamp = value
            .get("timestamp")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("a state change line has no timestamp: {line}"))?;
        changes.push(StateChange {
            at: DateTime::parse_from_rfc3339(stamp)
                .with_context(|| format!("timestamp `{stamp}`"))?
                .with_timezone(&Utc),
            change: change.to_string(),
            partition: value
                .get("partition")
                .and_then(|p| p.as_str())
                .unwrap_or_default()
                .to_string(),
        });
    }
    changes.sort_by_key(|c| c.at);
    Ok(changes)
}

/// For partitions run one at a time: the seconds between consecutive checkpoints (the whole
/// cost of a partition), from each claim to its checkpoint (inside the transaction), and from
/// each checkpoint to the next claim (commit, report, ack, next task, lease, BEGIN).
pub struct SerialTimes {
    pub cycles: Vec<f64>,
    pub claim_to_checkpoint: Vec<f64>,
    pub checkpoint_to_claim: Vec<f64>,
    pub done: usize,
}

pub fn serial_times(changes: &[StateChange]) -> SerialTimes {
    let mut times = SerialTimes {
        cycles: Vec::new(),
        claim_to_checkpoint: Vec::new(),
        checkpoint_to_claim: Vec::new(),
        done: 0,
    };
    let mut last_done: Option<DateTime<Utc>> = None;
    let mut last_running: Option<&StateChange> = None;
    for change in changes {
        match change.change.as_str() {
            "partition_running" => {
                if let Some(done) = last_done {
                    times
                        .checkpoint_to_claim
                        .push(seconds_between(done, change.at));
                }
                last_running = Some(change);
            }
            "partition_done" => {
                if let Some(running) = last_running.filter(|r| r.partition == change.partition) {
                    times
                        .claim_to_checkpoint
                        .push(seconds_between(running.at, change.at));
                }
                if let Some(done) = last_done {
                    times.cycles.push(seconds_between(done, change.at));
                }
                last_done = Some(change.at);
                times.done += 1;
            }
            _ => {}
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_log_lines_give_serial_partition_times() {
        let log = r#"{"timestamp":"2026-01-01T00:00:00.002500Z","level":"INFO","message":"state change","change":"partition_done","partition":"b"}
not json
{"timestamp":"2026-01-01T00:00:00.000100Z","level":"INFO","message":"state change","change":"partition_running","partition":"a"}
{"timestamp":"2026-01-01T00:00:00.001500Z","level":"INFO","message":"state change","change":"partition_running","partition":"b"}
{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","message":"worker ready"}
{"timestamp":"2026-01-01T00:00:00.001000Z","level":"INFO","message":"state change","change":"partition_done","partition":"a"}"#;
        let changes = state_changes_from_json_log(log).unwrap();
        assert_eq!(changes.len(), 4);
        assert_eq!(changes[0].partition, "a");
        let times = serial_times(&changes);
        assert_eq!(times.done, 2);
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
        };
        assert!(close(&times.cycles, &[0.0015]));
        assert!(close(&times.claim_to_checkpoint, &[0.0009, 0.001]));
        assert!(close(&times.checkpoint_to_claim, &[0.0005]));
    }
}
