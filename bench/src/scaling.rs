//! Section 4: horizontal scaling. Each partition holds a warehouse connection for a fixed time
//! (`pg_sleep`) inside its transaction; the spec's concurrency (the Redis semaphore's limit) is
//! 16 and each worker has 3 slots (by default), so 1, 2 and 4 workers are capped by their
//! slots and 8 workers (more slots than the limit) by the semaphore. Throughput is partitions per second
//! of the partition phase; the most holders at once is read from the semaphore's own peak
//! record in Redis and, independently, by sampling pg_stat_activity every 20 ms.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use sqlx::Connection;

use crate::context::{Ctx, Section};
use crate::facts;
use crate::pg;
use crate::procs::{self, Cluster};
use crate::stats::{median, secs};

pub const LIMIT: u32 = 16;
pub const SLEEP: f64 = 0.2;

/// What to run: partitions per run, rounds, slots per worker, worker counts.
pub struct Plan {
    pub partitions: usize,
    pub rounds: usize,
    pub slots: u32,
    pub workers: Vec<usize>,
}

fn setup(partitions: usize) -> String {
    crate::hourly::readings_setup("sl", partitions)
}

fn spec(partitions: usize) -> String {
    format!(
        r#"name = "bench_scaling"

[target]
table = "sl.readings"
key = ["id"]

[partition]
column = "at"
grain = "hour"
first = "2024-01-01T00"
last = "{}"

[source]
query = """
SELECT s.id, s.at, s.v FROM sl.src AS s CROSS JOIN (SELECT pg_sleep({SLEEP})) AS hold
WHERE s.at >= :partition_start AND s.at < :partition_end
"""

[warehouse]
name = "bench"
concurrency = {LIMIT}

[[audit]]
kind = "unique_key"
"#,
        crate::hourly::last_hour(partitions)
    )
}

/// Concurrency the configuration can reach: its slots, capped by the limit.
fn expected_concurrency(workers: usize, slots: u32) -> f64 {
    (workers as u32 * slots).min(LIMIT) as f64
}

struct Measured {
    workers: usize,
    round: usize,
    throughput: f64,
    phase: f64,
    wall: f64,
    mean_holders: f64,
    redis_peak: u64,
    sampled_peak: i64,
    samples: usize,
}

pub async fn run(ctx: &Ctx, plan: &Plan) -> Result<Section> {
    let (partitions, rounds, slots) = (plan.partitions, plan.rounds, plan.slots);
    let concurrency = |workers: usize| expected_concurrency(workers, slots);
    let mut section = Section::new("4. Horizontal scaling");
    let load_before = crate::machine::load_average();
    let template = ctx.dbs.create("scaling_tmpl").await?;
    {
        let mut conn = pg::connect(&ctx.dbs.url(&template)?).await?;
        pg::exec(&mut conn, &setup(partitions)).await?;
        conn.close().await?;
    }
    let spec_path = ctx.write_spec("scaling", &spec(partitions))?;
    let mut runs = Vec::new();
    for round in 0..rounds {
        let mut order = plan.workers.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for workers in order {
            eprintln!("scaling: round {} {workers} worker(s)", round + 1);
            let db = ctx
                .dbs
                .copy(&template, &format!("scaling_r{round}_w{workers}"))
                .await?;
            let url = ctx.dbs.url(&db)?;
            runs.push(
                run_one(
                    ctx, &db, &url, &spec_path, workers, slots, round, partitions,
                )
                .await?,
            );
            ctx.dbs.drop_database(&db).await?;
        }
    }
    ctx.dbs.drop_database(&template).await?;
    let load_after = crate::machine::load_average();

    let capped: Vec<String> = plan
        .workers
        .iter()
        .map(|&w| {
            let by = if w as u32 * slots > LIMIT {
                "the limit"
            } else {
                "their slots"
            };
            format!("{w} by {by} ({})", concurrency(w))
        })
        .collect();
    section.line(format!(
        "{partitions} hour partitions, each holding its warehouse connection for `pg_sleep({SLEEP})` inside its transaction; \
         semaphore limit (spec concurrency) {LIMIT}; {slots} slots per worker, so the workers are capped: {}. \
         {rounds} round(s), worker counts in ascending then descending order. Throughput = partitions / partition phase \
         (first partition started to last finished, control store). Mean holders = sum of in-transaction seconds / \
         partition phase. Ideal throughput = min(workers x {slots}, {LIMIT}) / {SLEEP} s. Scaling efficiency = \
         (throughput / throughput with the fewest workers) / (expected concurrency / expected concurrency with the fewest workers). \
         Load average before: {load_before}; after: {load_after}. The machine has {} cores: `pg_sleep` holds a connection \
         without using CPU, so the scaling measured is the orchestration's, not the CPU's.",
        capped.join(", "),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    section.line("");
    section.line("| workers | round | partition phase | run wall time | throughput | ideal | of ideal | mean holders | peak holders (Redis) | peak holders (pg_stat_activity, samples) |");
    section.line("|---|---|---|---|---|---|---|---|---|---|");
    for run in &runs {
        let ideal = concurrency(run.workers) / SLEEP;
        section.line(format!(
            "| {} | {} | {} | {} | {:.1}/s | {:.0}/s | {:.0}% | {:.1} | {} | {} ({}) |",
            run.workers,
            run.round + 1,
            secs(run.phase),
            secs(run.wall),
            run.throughput,
            ideal,
            100.0 * run.throughput / ideal,
            run.mean_holders,
            run.redis_peak,
            run.sampled_peak,
            run.samples
        ));
    }
    section.line("");
    section.line("| workers | median throughput | speedup vs the fewest workers | expected speedup | scaling efficiency |");
    section.line("|---|---|---|---|---|");
    let throughput = |workers: usize| {
        median(
            &runs
                .iter()
                .filter(|r| r.workers == workers)
                .map(|r| r.throughput)
                .collect::<Vec<_>>(),
        )
        .unwrap_or(f64::NAN)
    };
    let base = throughput(plan.workers.iter().copied().min().unwrap_or(1));
    let mut worst_efficiency: f64 = 1.0;
    let first = plan.workers.iter().copied().min().unwrap_or(1);
    for &workers in &plan.workers {
        let speedup = throughput(workers) / base;
        let expected = concurrency(workers) / concurrency(first);
        let efficiency = speedup / expected;
        worst_efficiency = worst_efficiency.min(efficiency);
        section.line(format!(
            "| {workers} | {:.1}/s | {speedup:.2}x | {expected:.2}x | {:.0}% |",
            throughput(workers),
            100.0 * efficiency
        ));
    }
    let top_redis = runs.iter().map(|r| r.redis_peak).max().unwrap_or(0);
    let top_sampled = runs.iter().map(|r| r.sampled_peak).max().unwrap_or(0);
    let at_limit: Vec<&Measured> = runs
        .iter()
        .filter(|r| concurrency(r.workers) >= LIMIT as f64)
        .collect();
    let reached = at_limit.iter().all(|r| r.redis_peak == LIMIT as u64);
    section.target(
        &format!(
            "scaling efficiency, {} workers",
            plan.workers
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ),
        ">= 90% up to the limit",
        format!("{:.0}% at worst", 100.0 * worst_efficiency),
        worst_efficiency >= 0.9,
    );
    section.target(
        "most concurrent holders",
        &format!("= {LIMIT} at the limit, never more"),
        format!("Redis peak {top_redis}, sampled {top_sampled}"),
        reached && top_redis <= LIMIT as u64 && top_sampled <= LIMIT as i64,
    );
    if top_redis > LIMIT as u64 || top_sampled > LIMIT as i64 {
        bail!(
            "the semaphore limit {LIMIT} was exceeded: Redis peak {top_redis}, sampled {top_sampled}"
        );
    }
    Ok(section)
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    ctx: &Ctx,
    db: &str,
    url: &str,
    spec: &str,
    workers: usize,
    slots: u32,
    round: usize,
    partitions: usize,
) -> Result<Measured> {
    let name = format!("scaling-r{round}-w{workers}");
    let mut cluster = Cluster::new(
        &ctx.services,
        &ctx.binaries,
        ctx.prefix(&name),
        "bench",
        url,
        &ctx.logs,
    );
    cluster.start_workers(workers, slots, &[]).await?;
    let coordinator = procs::spawn(
        cluster.coordinator(&["run", spec, "--no-progress"]),
        &ctx.logs,
        &name,
    )?;
    // Sample the warehouse's active partition statements of this cluster's workers until the
    // coordinator exits.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        let admin = ctx.dbs.admin_url().to_string();
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND application_name LIKE '{}-worker-%' \
             AND state = 'active' AND query LIKE '%INSERT INTO%' AND query LIKE '%pg_sleep%'",
            cluster.prefix
        );
        tokio::spawn(async move {
            let mut conn = pg::connect(&admin).await?;
            let mut samples = 0usize;
            while !done.load(Ordering::SeqCst) {
                let now = pg::scalar_i64(&mut conn, &sql).await?;
                peak.fetch_max(now, Ordering::SeqCst);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            conn.close().await?;
            anyhow::Ok(samples)
        })
    };
    let finished = coordinator.wait(Duration::from_secs(3600)).await;
    done.store(true, Ordering::SeqCst);
    let samples = sampler.await??;
    let finished = finished?;
    let redis_peak = cluster.peak_holders().await?;
    cluster.stop().await?;
    if !finished.success() || !finished.stdout.contains("published run") {
        bail!(
            "{workers} worker(s): the run did not publish:\n{}",
            finished.output()
        );
    }
    let mut conn = pg::connect(url).await?;
    let run = facts::read_run(&mut conn).await?;
    let published = pg::checksum(&mut conn, "sl.readings", "id, at, v").await?;
    let expected = pg::checksum(&mut conn, "sl.src", "id, at, v").await?;
    conn.close().await?;
    run.check_published(partitions)?;
    if published != expected {
        bail!("{workers} worker(s) published {published}, expected {expected}");
    }
    let phase = run.partition_seconds()?;
    let held: f64 = run.partitions.iter().filter_map(|p| p.seconds).sum();
    Ok(Measured {
        workers,
        round,
        throughput: partitions as f64 / phase,
        phase,
        wall: finished.wall.as_secs_f64(),
        mean_holders: held / phase,
        redis_peak,
        sampled_peak: peak.load(Ordering::SeqCst),
        samples,
    })
}
