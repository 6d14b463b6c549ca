//! Section 3: scale. Plan and run N hourly partitions (one row each) with concurrency 2,
//! embedded and distributed (2 workers): the coordinator's peak resident set (`ru_maxrss` of
//! the child from `wait4`, i.e. the kernel's VmHWM when it exits) and partitions per second.

use std::time::Duration;

use anyhow::{Result, bail};
use sqlx::Connection;

use crate::context::{Ctx, Section};
use crate::facts;
use crate::pg;
use crate::procs::{self, Cluster, Finished};
use crate::stats::secs;

const RSS_TARGET_MIB: f64 = 100.0;

fn setup(partitions: usize) -> String {
    crate::hourly::readings_setup("sc", partitions)
}

fn spec(partitions: usize) -> String {
    format!(
        r#"name = "bench_scale"

[target]
table = "sc.readings"
key = ["id"]

[partition]
column = "at"
grain = "hour"
first = "2024-01-01T00"
last = "{}"

[source]
query = "SELECT id, at, v FROM sc.src WHERE at >= :partition_start AND at < :partition_end"

[warehouse]
name = "bench"
concurrency = 2

[[audit]]
kind = "unique_key"

[[audit]]
kind = "rowcount_delta"
max_change_rows = 0
"#,
        crate::hourly::last_hour(partitions)
    )
}

struct Measured {
    what: &'static str,
    coordinator: Finished,
    workers_rss_mib: Option<f64>,
    partition_phase: Option<f64>,
}

pub async fn run(ctx: &Ctx, partitions: usize) -> Result<Section> {
    let mut section = Section::new("3. Scale");
    let load_before = crate::machine::load_average();
    let template = ctx.dbs.create("scale_tmpl").await?;
    {
        let mut conn = pg::connect(&ctx.dbs.url(&template)?).await?;
        pg::exec(&mut conn, &setup(partitions)).await?;
        conn.close().await?;
    }
    let spec_path = ctx.write_spec("scale", &spec(partitions))?;
    let mut runs = Vec::new();
    for what in ["plan", "embedded", "distributed"] {
        eprintln!("scale: {what} ({partitions} partitions)");
        let db = ctx.dbs.copy(&template, &format!("scale_{what}")).await?;
        let url = ctx.dbs.url(&db)?;
        runs.push(run_one(ctx, &url, &spec_path, what, partitions).await?);
        ctx.dbs.drop_database(&db).await?;
    }
    ctx.dbs.drop_database(&template).await?;
    let load_after = crate::machine::load_average();

    section.line(format!(
        "{partitions} hour partitions of one row each (`sc.readings`, recomputed from `sc.src`), concurrency 2; \
         audits unique key and per-partition rowcount delta. Peak RSS is the coordinator process's `ru_maxrss` \
         returned by `wait4` for that child (the kernel's high-water mark of its resident set). \
         Partitions per second: over the whole run (wall time) and over the partition phase (first partition \
         started to last finished, from the control store). Load average before: {load_before}; after: {load_after}."
    ));
    section.line("");
    section.line("| command | wall time | coordinator peak RSS | coordinator CPU | partitions/s (whole run) | partitions/s (partition phase) | worker peak RSS |");
    section.line("|---|---|---|---|---|---|---|");
    for run in &runs {
        let wall = run.coordinator.wall.as_secs_f64();
        let (whole, phase) = if run.what == "plan" {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.0}", partitions as f64 / wall),
                run.partition_phase
                    .map(|p| format!("{:.0}", partitions as f64 / p))
                    .unwrap_or_else(|| "-".into()),
            )
        };
        let label = match run.what {
            "plan" => "`backfill plan`",
            "embedded" => "`backfill run`, embedded",
            _ => "`backfill run`, distributed, 2 workers",
        };
        section.line(format!(
            "| {label} | {} | {:.1} MiB | {} | {whole} | {phase} | {} |",
            secs(wall),
            run.coordinator.max_rss_mib(),
            secs(run.coordinator.cpu_seconds),
            run.workers_rss_mib
                .map(|v| format!("{v:.1} MiB"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    let worst = runs
        .iter()
        .map(|r| r.coordinator.max_rss_mib())
        .fold(0.0, f64::max);
    section.target(
        &format!(
            "coordinator peak RSS, {partitions} partitions (plan, run embedded, run distributed)"
        ),
        &format!("<= {RSS_TARGET_MIB:.0} MiB"),
        format!("{worst:.1} MiB at most"),
        worst <= RSS_TARGET_MIB,
    );
    for run in runs.iter().filter(|r| r.what != "plan") {
        section.target(
            &format!("partitions per second, {}", run.what),
            "reported (no target)",
            format!(
                "{:.0}/s whole run, {:.0}/s partition phase",
                partitions as f64 / run.coordinator.wall.as_secs_f64(),
                run.partition_phase
                    .map(|p| partitions as f64 / p)
                    .unwrap_or(f64::NAN)
            ),
            true,
        );
    }
    Ok(section)
}

async fn run_one(
    ctx: &Ctx,
    url: &str,
    spec: &str,
    what: &'static str,
    partitions: usize,
) -> Result<Measured> {
    let name = format!("scale-{what}");
    let limit = Duration::from_secs(7200);
    let (coordinator, workers_rss_mib) = match what {
        "plan" => {
            let command = procs::embedded(&ctx.binaries, "bench", url, &["plan", spec, "--json"]);
            (
                procs::spawn(command, &ctx.logs, &name)?.wait(limit).await?,
                None,
            )
        }
        "embedded" => {
            let command =
                procs::embedded(&ctx.binaries, "bench", url, &["run", spec, "--no-progress"]);
            (
                procs::spawn(command, &ctx.logs, &name)?.wait(limit).await?,
                None,
            )
        }
        _ => {
            let mut cluster = Cluster::new(
                &ctx.services,
                &ctx.binaries,
                ctx.prefix(&name),
                "bench",
                url,
                &ctx.logs,
            );
            cluster.start_workers(2, 1, &[]).await?;
            let finished = procs::spawn(
                cluster.coordinator(&["run", spec, "--no-progress"]),
                &ctx.logs,
                &name,
            )?
            .wait(limit)
            .await?;
            let workers = cluster.stop().await?;
            let rss = workers.iter().map(|w| w.max_rss_mib()).fold(0.0, f64::max);
            (finished, Some(rss))
        }
    };
    if !coordinator.success() {
        bail!("`backfill` {what} failed:\n{}", coordinator.output());
    }
    if what == "plan" {
        let plan: serde_json::Value = serde_json::from_str(&coordinator.stdout)?;
        let planned = plan["partitions"].as_array().map(Vec::len).unwrap_or(0);
        if planned != partitions {
            bail!("the plan lists {planned} partitions, expected {partitions}");
        }
        return Ok(Measured {
            what,
            coordinator,
            workers_rss_mib,
            partition_phase: None,
        });
    }
    if !coordinator.stdout.contains("published run") {
        bail!("{what} did not publish:\n{}", coordinator.output());
    }
    let mut conn = pg::connect(url).await?;
    let run = facts::read_run(&mut conn).await?;
    let published = pg::checksum(&mut conn, "sc.readings", "id, at, v").await?;
    let expected = pg::checksum(&mut conn, "sc.src", "id, at, v").await?;
    conn.close().await?;
    run.check_published(partitions)?;
    if published != expected {
        bail!("{what} published {published}, expected {expected}");
    }
    Ok(Measured {
        what,
        coordinator,
        workers_rss_mib,
        partition_phase: Some(run.partition_seconds()?),
    })
}
