//! `backfill status`: a run's state, a per-partition grid, totals and audit results, as text
//! for people or JSON for scripts.

use std::time::{Duration, Instant};

use backfill_common::BackfillError;
use backfill_common::broker::Broker;
use backfill_common::control::{
    AuditRecord, ControlStore, PartitionRecord, PartitionState, RunRecord,
};
use backfill_common::spec::Spec;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunStatus {
    pub run: RunRecord,
    pub counts: StateCounts,
    pub rows: RowTotals,
    pub partitions: Vec<PartitionRecord>,
    pub audits: Vec<AuditRecord>,
    /// The run's tasks in the dead-letter queue (when a broker was given).
    pub dead_letters: Option<Vec<DeadLetterView>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterView {
    pub partition_key: String,
    pub fencing_token: i64,
    pub attempt: i64,
    pub reason: String,
    pub detail: String,
}

impl From<backfill_common::queue::DeadLetter> for DeadLetterView {
    fn from(letter: backfill_common::queue::DeadLetter) -> Self {
        let task = letter.message.map(|m| m.task);
        DeadLetterView {
            partition_key: task
                .as_ref()
                .map(|t| t.partition_key.clone())
                .unwrap_or_default(),
            fencing_token: task.as_ref().map_or(0, |t| t.fencing_token),
            attempt: task.as_ref().map_or(0, |t| t.attempt),
            reason: letter.reason,
            detail: letter.detail,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StateCounts {
    pub pending: usize,
    pub running: usize,
    pub retrying: usize,
    pub done: usize,
    pub failed: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RowTotals {
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub unchanged: i64,
}

pub async fn load(store: &ControlStore, run_id: &str) -> Result<RunStatus, BackfillError> {
    let run = store.find_run(run_id).await?.ok_or_else(|| {
        BackfillError::Invalid(format!(
            "no run `{run_id}` in this control store (see `backfill status` for the list)"
        ))
    })?;
    let partitions = store.partitions(run_id).await?;
    let audits = store.audits(run_id).await?;
    let mut counts = StateCounts::default();
    let mut rows = RowTotals::default();
    for p in &partitions {
        match p.state {
            PartitionState::Pending => counts.pending += 1,
            PartitionState::Running => counts.running += 1,
            PartitionState::Retrying => counts.retrying += 1,
            PartitionState::Done => counts.done += 1,
            PartitionState::Failed => counts.failed += 1,
        }
        if let Some(c) = p.counts {
            rows.inserted += c.inserted;
            rows.updated += c.updated;
            rows.deleted += c.deleted;
            rows.unchanged += c.unchanged;
        }
    }
    Ok(RunStatus {
        run,
        counts,
        rows,
        partitions,
        audits,
        dead_letters: None,
    })
}

/// The status with the run's dead letters read from the broker, when one is given.
pub async fn load_with_broker(
    store: &ControlStore,
    run_id: &str,
    broker: Option<&Broker>,
) -> Result<RunStatus, BackfillError> {
    let mut status = load(store, run_id).await?;
    if let Some(broker) = broker {
        let warehouse = run_warehouse(store, &status.run.spec_hash)
            .await?
            .ok_or_else(|| {
                BackfillError::Invalid(format!(
                    "the spec of run {run_id} is missing from the control store"
                ))
            })?;
        status.dead_letters = Some(
            broker
                .dead_letters(&warehouse, 10_000)
                .await?
                .into_iter()
                .filter(|d| d.message.as_ref().is_some_and(|m| m.task.run_id == run_id))
                .map(DeadLetterView::from)
                .collect(),
        );
    }
    Ok(status)
}

/// The warehouse name of the spec a run is pinned to.
pub async fn run_warehouse(
    store: &ControlStore,
    spec_hash: &str,
) -> Result<Option<String>, BackfillError> {
    Ok(store
        .spec_source(spec_hash)
        .await?
        .and_then(|text| Spec::parse(&text).ok())
        .map(|spec| spec.warehouse.name))
}

fn symbol(state: PartitionState) -> char {
    match state {
        PartitionState::Pending => '.',
        PartitionState::Running => '>',
        PartitionState::Retrying => 'r',
        PartitionState::Done => '#',
        PartitionState::Failed => 'X',
    }
}

pub fn render(status: &RunStatus) -> String {
    let run = &status.run;
    let mut out = String::new();
    out.push_str(&format!(
        "run {}  {}  target {}  spec {} ({})\n",
        run.run_id,
        run.state.as_str(),
        run.target,
        run.spec_name,
        &run.spec_hash[..12.min(run.spec_hash.len())]
    ));
    out.push_str(&format!(
        "created {}  updated {}  owner {}\n",
        run.created_at, run.updated_at, run.owner
    ));
    out.push_str(&format!("shadow {}", run.shadow_table));
    if let Some(archive) = &run.archive_table {
        out.push_str(&format!("  archive {archive}"));
    }
    out.push('\n');
    if let Some(error) = &run.error {
        out.push_str(&format!("note: {error}\n"));
    }
    let c = &status.counts;
    out.push_str(&format!(
        "\npartitions: {} done, {} running, {} retrying, {} pending, {} failed (of {})\n",
        c.done,
        c.running,
        c.retrying,
        c.pending,
        c.failed,
        status.partitions.len()
    ));
    out.push_str("grid (# done, > running, r retrying, . pending, X failed, D dead-lettered):\n");
    let dead: Vec<&str> = status
        .dead_letters
        .iter()
        .flatten()
        .map(|d| d.partition_key.as_str())
        .collect();
    for line in status.partitions.chunks(60) {
        out.push_str(&format!(
            "  {} {}\n",
            line[0].partition_key,
            line.iter()
                .map(|p| {
                    if p.state != PartitionState::Done && dead.contains(&p.partition_key.as_str()) {
                        'D'
                    } else {
                        symbol(p.state)
                    }
                })
                .collect::<String>()
        ));
    }
    let r = &status.rows;
    out.push_str(&format!(
        "rows: {} inserted, {} updated, {} deleted, {} unchanged\n",
        r.inserted, r.updated, r.deleted, r.unchanged
    ));
    let failed: Vec<&PartitionRecord> = status
        .partitions
        .iter()
        .filter(|p| p.error.is_some())
        .collect();
    if !failed.is_empty() {
        out.push_str("\npartition errors:\n");
        for p in failed {
            out.push_str(&format!(
                "  {} [{} attempt {}]: {}\n",
                p.partition_key,
                p.state.as_str(),
                p.attempt,
                p.error.as_deref().unwrap_or("")
            ));
        }
    }
    if let Some(letters) = &status.dead_letters {
        if letters.is_empty() {
            out.push_str("\ndead letters: none\n");
        } else {
            out.push_str(&format!("\ndead letters ({}; `backfill resubmit {} --dead-lettered` after fixing the cause):\n", letters.len(), run.run_id));
            for letter in letters {
                out.push_str(&format!(
                    "  {} [token {}]: {}: {}\n",
                    letter.partition_key, letter.fencing_token, letter.reason, letter.detail
                ));
            }
        }
    }
    if !status.audits.is_empty() {
        out.push_str("\naudits:\n");
        out.push_str(&render_audits(&status.audits, false));
    }
    out
}

/// One line per audit with its worst partitions; `only_failures` lists failing checks only.
pub fn render_audits(audits: &[AuditRecord], only_failures: bool) -> String {
    let mut out = String::new();
    let mut names: Vec<&str> = audits.iter().map(|a| a.audit_name.as_str()).collect();
    names.dedup();
    for name in names {
        let rows: Vec<&AuditRecord> = audits.iter().filter(|a| a.audit_name == name).collect();
        let bad: Vec<&&AuditRecord> = rows.iter().filter(|a| a.verdict != "pass").collect();
        if only_failures && bad.is_empty() {
            continue;
        }
        let verdict = if bad.iter().any(|a| a.verdict == "fail") {
            "FAIL"
        } else if bad.is_empty() {
            "pass"
        } else {
            "warn"
        };
        out.push_str(&format!(
            "  {verdict:4} {name} ({} checked, {} not passing)\n",
            rows.len(),
            bad.len()
        ));
        for a in bad.iter().take(10) {
            out.push_str(&format!(
                "       partition {}: observed {}; allowed {}\n",
                a.partition_key, a.observed, a.allowed
            ));
        }
        if bad.len() > 10 {
            out.push_str(&format!("       … and {} more\n", bad.len() - 10));
        }
    }
    out
}

pub fn render_run_list(runs: &[RunRecord]) -> String {
    if runs.is_empty() {
        return "no runs yet\n".into();
    }
    let mut out = String::from(
        "RUN       STATE         TARGET                          SPEC          CREATED\n",
    );
    for r in runs {
        out.push_str(&format!(
            "{:<9} {:<13} {:<31} {:<13} {}\n",
            r.run_id,
            r.state.as_str(),
            r.target,
            &r.spec_hash[..12.min(r.spec_hash.len())],
            r.created_at
        ));
    }
    out
}

/// Progress between two looks at a run, for `status --watch`: partitions and rows per second
/// since watching began, and the time left at that pace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pace {
    pub partitions_per_second: Option<f64>,
    pub rows_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
}

/// Measures the pace of a run from the first status the watch saw.
pub struct PaceMeter {
    started: Instant,
    settled_at_start: usize,
    rows_at_start: i64,
}

impl PaceMeter {
    pub fn new(first: &RunStatus) -> PaceMeter {
        PaceMeter {
            started: Instant::now(),
            settled_at_start: first.counts.done + first.counts.failed,
            rows_at_start: rows_written(first),
        }
    }

    pub fn pace(&self, now: &RunStatus) -> Pace {
        pace_between(
            self.started.elapsed(),
            now.counts.done + now.counts.failed
                - self
                    .settled_at_start
                    .min(now.counts.done + now.counts.failed),
            rows_written(now) - self.rows_at_start,
            now.partitions.len() - now.counts.done - now.counts.failed,
        )
    }
}

fn rows_written(status: &RunStatus) -> i64 {
    status.rows.inserted + status.rows.updated + status.rows.deleted
}

/// Rates over `elapsed`, and the ETA of `remaining` partitions at that rate; None until
/// something has been measured.
pub fn pace_between(elapsed: Duration, settled: usize, rows: i64, remaining: usize) -> Pace {
    let seconds = elapsed.as_secs_f64();
    if seconds < 0.5 || settled == 0 {
        return Pace {
            partitions_per_second: None,
            rows_per_second: None,
            eta_seconds: (remaining == 0).then_some(0.0),
        };
    }
    let per_second = settled as f64 / seconds;
    Pace {
        partitions_per_second: Some(per_second),
        rows_per_second: Some(rows.max(0) as f64 / seconds),
        eta_seconds: Some(remaining as f64 / per_second),
    }
}

/// The line `status --watch` adds under the grid.
pub fn render_pace(pace: &Pace) -> String {
    match (
        pace.partitions_per_second,
        pace.rows_per_second,
        pace.eta_seconds,
    ) {
        (Some(partitions), Some(rows), Some(eta)) => format!(
            "throughput: {partitions:.2} partitions/s, {rows:.0} rows/s; ETA {}\n",
            human_duration(eta)
        ),
        (_, _, Some(0.0)) => "throughput: -; nothing left to run\n".to_string(),
        _ => "throughput: measuring…\n".to_string(),
    }
}

fn human_duration(seconds: f64) -> String {
    let total = seconds.round() as u64;
    match total {
        0..=59 => format!("{total}s"),
        60..=3599 => format!("{}m{:02}s", total / 60, total % 60),
        _ => format!("{}h{:02}m", total / 3600, (total % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_is_unknown_until_something_settles() {
        let pace = pace_between(Duration::from_secs(10), 0, 0, 5);
        assert_eq!(pace.eta_seconds, None);
        assert!(render_pace(&pace).contains("measuring"));
    }

    #[test]
    fn pace_gives_rates_and_eta() {
        let pace = pace_between(Duration::from_secs(10), 5, 1000, 20);
        assert_eq!(pace.partitions_per_second, Some(0.5));
        assert_eq!(pace.rows_per_second, Some(100.0));
        assert_eq!(pace.eta_seconds, Some(40.0));
        assert_eq!(
            render_pace(&pace),
            "throughput: 0.50 partitions/s, 100 rows/s; ETA 40s\n"
        );
        assert_eq!(human_duration(3725.0), "1h02m");
        assert_eq!(human_duration(61.0), "1m01s");
    }
}
