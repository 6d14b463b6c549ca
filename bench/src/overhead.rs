//! Section 2: per-partition overhead. Hour partitions whose source query returns no rows, at
//! concurrency 1, so partitions run strictly one after another and the time between two
//! consecutive partitions finishing is everything one partition costs: taking the task,
//! the semaphore lease, the transaction (claim, the partition's SQL, checkpoint, commit),
//! reporting it and settling the delivery. Those instants come from the `partition_done`
//! state-change lines of the JSON log (microsecond timestamps) of whoever ran the partitions:
//! the coordinator (embedded) or the one worker (distributed). The SQL itself is measured
//! by the harness running the same source statement (an INSERT … SELECT of that hour, bounds
//! bound as parameters, autocommit) once per partition on one connection; the overhead of
//! a partition is its cycle time minus the median SQL time.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sqlx::Connection;

use crate::context::{Ctx, Section};
use crate::facts;
use crate::pg;
use crate::procs::{self, Cluster};
use crate::stats::{median, ms, quantile, secs};

const SETUP: &str = "
CREATE SCHEMA ovh;
CREATE TABLE ovh.src (id bigint PRIMARY KEY, at timestamp NOT NULL, v int NOT NULL);
CREATE INDEX ON ovh.src (at);
CREATE TABLE ovh.events (id bigint PRIMARY KEY, at timestamp NOT NULL, v int NOT NULL);
CREATE INDEX ON ovh.events (at);
INSERT INTO ovh.events SELECT g, TIMESTAMP '2023-12-01' + g * interval '1 minute', g % 100 FROM generate_series(1, 1000) g;
CREATE TABLE ovh.sql_probe (LIKE ovh.events INCLUDING ALL);
ANALYZE;
";

const SOURCE: &str =
    "SELECT id, at, v FROM ovh.src WHERE at >= :partition_start AND at < :partition_end";

fn spec(partitions: usize) -> String {
    format!(
        r#"name = "bench_empty_partitions"

[target]
table = "ovh.events"
key = ["id"]

[partition]
column = "at"
grain = "hour"
first = "2024-01-01T00"
last = "{}"

[source]
query = "{SOURCE}"

[warehouse]
name = "bench"
concurrency = 1

[[audit]]
kind = "unique_key"
"#,
        crate::hourly::last_hour(partitions)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Embedded,
    Distributed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Distributed => "distributed (1 worker, 1 slot)",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Distributed => "distributed",
        }
    }
    fn target_seconds(self) -> f64 {
        match self {
            Mode::Embedded => 0.005,
            Mode::Distributed => 0.020,
        }
    }
}

struct Measured {
    mode: Mode,
    round: usize,
    /// Seconds between consecutive partition completions.
    cycles: Vec<f64>,
    /// From each claim to its checkpoint (inside the transaction).
    claim_to_checkpoint: Vec<f64>,
    /// From each checkpoint to the next claim.
    checkpoint_to_claim: Vec<f64>,
    /// The SQL alone, per partition, measured in the same round.
    sql: Vec<f64>,
    wall: f64,
    partition_phase: f64,
}

pub async fn run(ctx: &Ctx, partitions: usize, rounds: usize) -> Result<Section> {
    let mut section = Section::new("2. Per-partition overhead");
    let load_before = crate::machine::load_average();
    let template = ctx.dbs.create("ovh_tmpl").await?;
    {
        let mut conn = pg::connect(&ctx.dbs.url(&template)?).await?;
        pg::exec(&mut conn, SETUP).await?;
        conn.close().await?;
    }
    let spec_path = ctx.write_spec("empty_partitions", &spec(partitions))?;
    let mut runs = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Embedded, Mode::Distributed]
        } else {
            [Mode::Distributed, Mode::Embedded]
        };
        for mode in order {
            eprintln!("overhead: round {} {}", round + 1, mode.short());
            let db = ctx
                .dbs
                .copy(&template, &format!("ovh_r{round}_{}", mode.short()))
                .await?;
            let url = ctx.dbs.url(&db)?;
            let sql = sql_alone(&url, partitions).await?;
            let mut measured = run_mode(ctx, &url, &spec_path, mode, round, partitions).await?;
            measured.sql = sql;
            ctx.dbs.drop_database(&db).await?;
            runs.push(measured);
        }
    }
    ctx.dbs.drop_database(&template).await?;
    let load_after = crate::machine::load_average();

    section.line(format!(
        "{partitions} hour partitions whose source query (`{SOURCE}`) returns no rows, concurrency 1, \
         {rounds} round(s) alternating the modes. Load average before: {load_before}; after: {load_after}."
    ));
    section.line("");
    section.line("Method: at concurrency 1 partitions run one after another, so the time between two consecutive \
                  `partition_done` state changes (JSON log lines, microsecond timestamps, written by the process running \
                  the partitions) is the whole cost of one partition: task hand-off, semaphore lease, transaction \
                  (claim, the partition's SQL with its checks and checksum, checkpoint, commit), report, ack. \
                  The SQL itself is the same source statement (`INSERT INTO … SELECT id, at, v FROM ovh.src WHERE at >= $1 AND at < $2`, \
                  autocommit, bounds bound) issued by the harness once per partition on one connection in the same round. \
                  Overhead of a partition = its cycle time - the median SQL time. The `partition_running` line (written at the claim, \
                  the transaction's first statement) splits the cycle in two: claim to checkpoint (inside the transaction: \
                  the partition's SQL, checks, checksum, checkpoint) and checkpoint to the next claim (commit, report, \
                  settling the delivery, taking the next task, the semaphore lease, BEGIN).");
    section.line("");
    section.line("| mode | round | cycle p50 | cycle p99 | SQL alone p50 | SQL alone p99 | overhead p50 | overhead p99 | claim to checkpoint p50 | checkpoint to next claim p50 | run wall time | partition phase |");
    section.line("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in &runs {
        let sql_median = median(&run.sql).unwrap_or(0.0);
        let overhead: Vec<f64> = run.cycles.iter().map(|c| c - sql_median).collect();
        section.line(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.mode.short(),
            run.round + 1,
            ms(quantile(&run.cycles, 0.5).unwrap_or(f64::NAN)),
            ms(quantile(&run.cycles, 0.99).unwrap_or(f64::NAN)),
            ms(quantile(&run.sql, 0.5).unwrap_or(f64::NAN)),
            ms(quantile(&run.sql, 0.99).unwrap_or(f64::NAN)),
            ms(quantile(&overhead, 0.5).unwrap_or(f64::NAN)),
            ms(quantile(&overhead, 0.99).unwrap_or(f64::NAN)),
            ms(quantile(&run.claim_to_checkpoint, 0.5).unwrap_or(f64::NAN)),
            ms(quantile(&run.checkpoint_to_claim, 0.5).unwrap_or(f64::NAN)),
            secs(run.wall),
            secs(run.partition_phase),
        ));
    }
    section.line("");
    for mode in [Mode::Embedded, Mode::Distributed] {
        let of: Vec<&Measured> = runs.iter().filter(|r| r.mode == mode).collect();
        let p50s: Vec<f64> = of
            .iter()
            .map(|r| {
                let sql_median = median(&r.sql).unwrap_or(0.0);
                let overhead: Vec<f64> = r.cycles.iter().map(|c| c - sql_median).collect();
                quantile(&overhead, 0.5).unwrap_or(f64::NAN)
            })
            .collect();
        let p99s: Vec<f64> = of
            .iter()
            .map(|r| {
                let sql_median = median(&r.sql).unwrap_or(0.0);
                let overhead: Vec<f64> = r.cycles.iter().map(|c| c - sql_median).collect();
                quantile(&overhead, 0.99).unwrap_or(f64::NAN)
            })
            .collect();
        let p50 = median(&p50s).unwrap_or(f64::NAN);
        let p99 = median(&p99s).unwrap_or(f64::NAN);
        section.line(format!(
            "- {}: overhead p50 {} and p99 {} per partition (medians over rounds).",
            mode.name(),
            ms(p50),
            ms(p99)
        ));
        section.target(
            &format!("overhead per empty partition, {}", mode.short()),
            &format!("p50 < {}", ms(mode.target_seconds())),
            format!("p50 {}, p99 {}", ms(p50), ms(p99)),
            p50 < mode.target_seconds(),
        );
    }
    Ok(section)
}

/// The partition's SQL alone, once per partition, as a hand-written loop would issue it.
async fn sql_alone(url: &str, partitions: usize) -> Result<Vec<f64>> {
    let mut conn = pg::connect(url).await?;
    let mut times = Vec::with_capacity(partitions);
    for i in 0..partitions {
        let start = crate::hourly::first_hour() + chrono::Duration::hours(i as i64);
        let end = start + chrono::Duration::hours(1);
        let began = Instant::now();
        pg::query(
            "INSERT INTO ovh.sql_probe (id, at, v) SELECT id, at, v FROM ovh.src \
             WHERE at >= (SELECT CAST($1 AS timestamp)) AND at < (SELECT CAST($2 AS timestamp))",
        )
        .bind(start.format("%Y-%m-%d %H:%M:%S").to_string())
        .bind(end.format("%Y-%m-%d %H:%M:%S").to_string())
        .execute(&mut conn)
        .await?;
        times.push(began.elapsed().as_secs_f64());
    }
    conn.close().await?;
    Ok(times)
}

async fn run_mode(
    ctx: &Ctx,
    url: &str,
    spec: &str,
    mode: Mode,
    round: usize,
    partitions: usize,
) -> Result<Measured> {
    let name = format!("ovh-r{round}-{}", mode.short());
    let json_state = [
        ("BACKFILL_LOG_FORMAT", "json"),
        (
            "BACKFILL_LOG",
            "warn,backfill::state=info,backfill_worker=info",
        ),
    ];
    let (finished, log) = match mode {
        Mode::Embedded => {
            let mut command =
                procs::embedded(&ctx.binaries, "bench", url, &["run", spec, "--no-progress"]);
            command.envs(json_state);
            let finished = procs::spawn(command, &ctx.logs, &name)?
                .wait(Duration::from_secs(3600))
                .await?;
            let log = finished.stderr.clone();
            (finished, log)
        }
        Mode::Distributed => {
            let mut cluster = Cluster::new(
                &ctx.services,
                &ctx.binaries,
                ctx.prefix(&name),
                "bench",
                url,
                &ctx.logs,
            );
            cluster.start_workers(1, 1, &json_state).await?;
            let finished = procs::spawn(
                cluster.coordinator(&["run", spec, "--no-progress"]),
                &ctx.logs,
                &name,
            )?
            .wait(Duration::from_secs(3600))
            .await?;
            let workers = cluster.stop().await?;
            let log = workers
                .first()
                .map(|w| w.stderr.clone())
                .unwrap_or_default();
            (finished, log)
        }
    };
    if !finished.success() || !finished.stdout.contains("published run") {
        bail!("{} did not publish:\n{}", mode.name(), finished.output());
    }
    let mut conn = pg::connect(url).await?;
    let run = facts::read_run(&mut conn).await?;
    let unchanged = pg::checksum(&mut conn, "ovh.events", "id, at, v").await?;
    let sql_probe_rows = pg::scalar_i64(&mut conn, "SELECT count(*) FROM ovh.sql_probe").await?;
    conn.close().await?;
    run.check_published(partitions)?;
    if !unchanged.starts_with("1000 rows") || sql_probe_rows != 0 {
        bail!("the empty partitions changed data: events {unchanged}, probe rows {sql_probe_rows}");
    }
    let times = facts::serial_times(&facts::state_changes_from_json_log(&log)?);
    if times.done != partitions {
        bail!(
            "{} partition_done lines in the log, expected {partitions}",
            times.done
        );
    }
    Ok(Measured {
        mode,
        round,
        cycles: times.cycles,
        claim_to_checkpoint: times.claim_to_checkpoint,
        checkpoint_to_claim: times.checkpoint_to_claim,
        sql: Vec::new(),
        wall: finished.wall.as_secs_f64(),
        partition_phase: run.partition_seconds()?,
    })
}
