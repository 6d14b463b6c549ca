//! Section 1: the reference workload (`bench/reference-workload.sql`, the spec
//! `examples/reference_workload.toml`): `backfill run` embedded and distributed against the
//! hand-written SQL of `shared/bench/raw-wap-smart.sh` (the lower bound) and
//! `raw-wap-naive.sh`, issued by this harness. Every measured run starts from a file copy of
//! the same loaded database; the systems alternate in each round (ABCD, then DCBA) so drift
//! over time affects all of them alike; every run's published table is checksummed and must
//! equal the lower bound's, which must equal the result computed independently.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::NaiveDate;
use sqlx::Connection;

use crate::context::{Ctx, Section};
use crate::facts;
use crate::pg;
use crate::procs::{self, Cluster};
use crate::stats::{median, ratio, secs};

const WORKLOAD_SQL: &str = include_str!("../reference-workload.sql");
const SPEC: &str = include_str!("../../examples/reference_workload.toml");
/// The window of the reference backfill: 90 days from 2024-01-01 (the spec's first..last).
const START: (i32, u32, u32) = (2024, 1, 1);
const WINDOW_DAYS: i64 = 90;
const CONCURRENCY: usize = 2;
/// The columns that say whether two published tables hold the same result (`updated_at` is
/// the time of the run that wrote the row).
const RESULT_COLUMNS: &str = "order_id, order_date, customer_id, sku, quantity, revenue";

/// One day of the naive pipeline: `shared/bench/raw-merge-day.sql` with the day spliced in
/// where psql substitutes `:'d'`.
const MERGE_DAY: &str = "MERGE INTO analytics.fact_orders__shadow t
USING (SELECT order_id, order_date, customer_id, sku, quantity,
              round(quantity * unit_price * (1 - discount), 2) AS revenue
       FROM staging.orders WHERE order_date >= DATE '{d}' AND order_date < DATE '{d}' + 1) s
ON t.order_id = s.order_id
WHEN MATCHED AND (t.revenue IS DISTINCT FROM s.revenue OR t.quantity IS DISTINCT FROM s.quantity
                  OR t.customer_id IS DISTINCT FROM s.customer_id OR t.sku IS DISTINCT FROM s.sku
                  OR t.order_date IS DISTINCT FROM s.order_date) THEN
  UPDATE SET revenue = s.revenue, quantity = s.quantity, customer_id = s.customer_id, sku = s.sku,
             order_date = s.order_date, updated_at = now()
WHEN NOT MATCHED THEN
  INSERT (order_id, order_date, customer_id, sku, quantity, revenue, updated_at)
  VALUES (s.order_id, s.order_date, s.customer_id, s.sku, s.quantity, s.revenue, now())";

/// The audit query both shell scripts run before the swap.
const AUDIT: &str = "SELECT count(*) FILTER (WHERE abs(coalesce(s.n,0) - coalesce(p.n,0)) > 0.02 * greatest(p.n,1)) AS bad_days
FROM (SELECT order_date, count(*) n, sum(revenue) r FROM analytics.fact_orders GROUP BY 1) p
FULL JOIN (SELECT order_date, count(*) n, sum(revenue) r FROM analytics.fact_orders__shadow GROUP BY 1) s USING (order_date)";

const SWAP: [&str; 5] = [
    "BEGIN",
    "DROP TABLE IF EXISTS analytics.fact_orders__archive",
    "ALTER TABLE analytics.fact_orders RENAME TO fact_orders__archive",
    "ALTER TABLE analytics.fact_orders__shadow RENAME TO fact_orders",
    "COMMIT",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Smart,
    Embedded,
    Distributed,
    Naive,
}

impl System {
    const ALL: [System; 4] = [
        System::Smart,
        System::Embedded,
        System::Distributed,
        System::Naive,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Smart => "hand-written smart WAP (lower bound)",
            System::Embedded => "`backfill run`, embedded",
            System::Distributed => "`backfill run`, distributed (2 workers)",
            System::Naive => "hand-written naive WAP (clone + per-day MERGE)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            System::Smart => "smart",
            System::Embedded => "embedded",
            System::Distributed => "distributed",
            System::Naive => "naive",
        }
    }
}

#[derive(Debug, Clone)]
struct Measured {
    system: System,
    round: usize,
    wall: f64,
    phases: Vec<(&'static str, f64)>,
    checksum: String,
    coordinator_rss_mib: Option<f64>,
    worker_rss_mib: Option<f64>,
}

pub struct Sizes {
    pub days: u32,
    pub per_day: u32,
    pub rounds: usize,
    /// Which systems to measure (the lower bound always runs: every ratio needs it).
    pub systems: Vec<String>,
}

fn day(offset: i64) -> NaiveDate {
    NaiveDate::from_ymd_opt(START.0, START.1, START.2).expect("date")
        + chrono::Duration::days(offset)
}

pub async fn run(ctx: &Ctx, sizes: &Sizes) -> Result<Section> {
    let mut section = Section::new("1. Reference workload");
    let load_before = crate::machine::load_average();
    eprintln!(
        "reference: loading {} orders ({} days x {})",
        sizes.days * sizes.per_day,
        sizes.days,
        sizes.per_day
    );
    let template = ctx.dbs.create("ref_tmpl").await?;
    let template_url = ctx.dbs.url(&template)?;
    let loaded = Instant::now();
    let expected = load_workload(&template_url, sizes).await?;
    let load_seconds = loaded.elapsed().as_secs_f64();
    let spec_path = ctx.write_spec("reference_workload", SPEC)?;

    let mut runs: Vec<Measured> = Vec::new();
    for round in 0..sizes.rounds {
        let mut order: Vec<System> = System::ALL
            .into_iter()
            .filter(|s| {
                *s == System::Smart
                    || sizes.systems.is_empty()
                    || sizes.systems.iter().any(|n| n == s.short())
            })
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for system in order {
            eprintln!("reference: round {} {}", round + 1, system.short());
            let db = ctx
                .dbs
                .copy(&template, &format!("ref_r{round}_{}", system.short()))
                .await?;
            let url = ctx.dbs.url(&db)?;
            let mut measured = match system {
                System::Smart => hand_written(&url, false).await?,
                System::Naive => hand_written(&url, true).await?,
                System::Embedded | System::Distributed => {
                    run_backfill(ctx, &url, &spec_path, system, round).await?
                }
            };
            measured.round = round;
            let mut conn = pg::connect(&url).await?;
            measured.checksum =
                pg::checksum(&mut conn, "analytics.fact_orders", RESULT_COLUMNS).await?;
            conn.close().await?;
            if measured.checksum != expected {
                bail!(
                    "{} published a wrong result: {} instead of {expected}",
                    system.name(),
                    measured.checksum
                );
            }
            ctx.dbs.drop_database(&db).await?;
            runs.push(measured);
        }
    }
    ctx.dbs.drop_database(&template).await?;
    let load_after = crate::machine::load_average();

    // Report.
    let orders = sizes.days as u64 * sizes.per_day as u64;
    section.line(format!(
        "{orders} orders over {} days (`bench/reference-workload.sql`, days={}, per_day={}, loaded in {}); \
         recompute revenue for {WINDOW_DAYS} days (2024-01-01 .. 2024-03-30), concurrency {CONCURRENCY}, \
         spec `examples/reference_workload.toml` (audits: unique key, not null, per-day rowcount delta, per-day revenue ratio). \
         {} round(s); in each the four systems run one after another, in the order ABCD then DCBA, \
         each on its own file copy of the loaded database (`CREATE DATABASE … TEMPLATE … STRATEGY FILE_COPY`, then `CHECKPOINT`). \
         Load average (1/5/15 min) before: {load_before}; after: {load_after}.",
        sizes.days,
        sizes.days,
        sizes.per_day,
        secs(load_seconds),
        sizes.rounds,
    ));
    section.line("");
    section.line(format!(
        "Every run's published `analytics.fact_orders` is checksummed over ({RESULT_COLUMNS}) and must equal \
         the lower bound's, which must equal the result computed independently from `staging.orders` \
         (`{expected}`): all {} runs matched.",
        runs.len()
    ));
    section.line("");
    section.line("| system | median wall time | min .. max | vs lower bound (median of per-round ratios) | coordinator peak RSS |");
    section.line("|---|---|---|---|---|");
    let walls = |system: System| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.system == system)
            .map(|r| r.wall)
            .collect()
    };
    let ratios = |system: System| -> Vec<f64> {
        (0..sizes.rounds)
            .filter_map(|round| {
                let of = |s: System| {
                    runs.iter()
                        .find(|r| r.system == s && r.round == round)
                        .map(|r| r.wall)
                };
                Some(of(system)? / of(System::Smart)?)
            })
            .collect()
    };
    let mut summary = Vec::new();
    for system in System::ALL {
        let w = walls(system);
        if w.is_empty() {
            continue;
        }
        let r = median(&ratios(system)).unwrap_or(f64::NAN);
        let rss: Vec<f64> = runs
            .iter()
            .filter(|m| m.system == system)
            .filter_map(|m| m.coordinator_rss_mib)
            .collect();
        let rss = median(&rss)
            .map(|v| format!("{v:.0} MiB"))
            .unwrap_or_else(|| "-".into());
        let min = w.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = w.iter().cloned().fold(0.0, f64::max);
        section.line(format!(
            "| {} | {} | {} .. {} | {} | {rss} |",
            system.name(),
            secs(median(&w).unwrap_or(f64::NAN)),
            secs(min),
            secs(max),
            ratio(r)
        ));
        summary.push((system, r));
    }
    let installed: Vec<&str> = ["dbt", "sqlmesh"]
        .into_iter()
        .filter(|p| on_path(p))
        .collect();
    section.line(if installed.is_empty() {
        "| dbt-core microbatch, SQLMesh | not measured: neither `dbt` nor `sqlmesh` is installed on this machine | | | |".to_string()
    } else {
        format!(
            "| dbt-core microbatch, SQLMesh | not measured: `{}` is installed, but this harness does not drive it | | | |",
            installed.join("`, `")
        )
    });
    section.line("");
    section.line("Wall time of every run, in the order measured:");
    section.line("");
    section.line("| round | system | wall time | ratio to the round's lower bound |");
    section.line("|---|---|---|---|");
    for run in &runs {
        let smart = runs
            .iter()
            .find(|r| r.system == System::Smart && r.round == run.round)
            .map(|r| r.wall)
            .unwrap_or(f64::NAN);
        section.line(format!(
            "| {} | {} | {} | {} |",
            run.round + 1,
            run.system.short(),
            secs(run.wall),
            ratio(run.wall / smart)
        ));
    }
    section.line("");
    section.line("Where the time goes (medians over rounds). Hand-written pipelines are timed by the harness statement by statement; \
                  `backfill` phases come from its control store (run events, partition timestamps, audit times; millisecond precision) \
                  and the process's start and exit:");
    section.line("");
    for system in System::ALL {
        let of: Vec<&Measured> = runs.iter().filter(|r| r.system == system).collect();
        let Some(first) = of.first() else { continue };
        let cells: Vec<String> = first
            .phases
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let values: Vec<f64> = of
                    .iter()
                    .filter_map(|m| m.phases.get(i).map(|p| p.1))
                    .collect();
                format!("{name} {}", secs(median(&values).unwrap_or(f64::NAN)))
            })
            .collect();
        section.line(format!("- {}: {}", system.short(), cells.join(", ")));
    }
    let worker_rss: Vec<f64> = runs.iter().filter_map(|m| m.worker_rss_mib).collect();
    if let Some(rss) = median(&worker_rss) {
        section.line(format!(
            "- distributed: worker peak RSS {rss:.0} MiB (median of the largest worker per run)"
        ));
    }
    section.line("");
    section.line("The harness issues the hand-written SQL itself over 2 persistent sessions: the shell scripts start one `psql` \
                  process (and connection) per day, so the lower bound here is a little tighter than the scripts'. \
                  The scripts' final renames that restore production for the next run are not timed (each run gets a fresh copy). \
                  Distributed: the 2 workers are started and ready before the coordinator starts; only `backfill run` is timed.");
    for (system, r) in summary {
        if matches!(system, System::Embedded | System::Distributed) {
            section.target(
                &format!("reference workload, {}", system.short()),
                "<= 1.10x the lower bound",
                ratio(r),
                r <= 1.10,
            );
        }
    }
    Ok(section)
}

/// Whether `program` is an executable file in one of PATH's directories.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Loads the workload into `url` and returns the checksum of the correct result, computed
/// independently of every system measured: outside the window the production rows as they
/// are, inside it the revenue recomputed from `staging.orders`.
async fn load_workload(url: &str, sizes: &Sizes) -> Result<String> {
    let sql = WORKLOAD_SQL
        .replace(":per_day", &sizes.per_day.to_string())
        .replace(":days", &sizes.days.to_string());
    let mut conn = pg::connect(url).await?;
    pg::exec(&mut conn, &sql)
        .await
        .context("loading bench/reference-workload.sql")?;
    let (start, end) = (day(0), day(WINDOW_DAYS));
    let expected = pg::checksum(
        &mut conn,
        &format!(
            "(SELECT f.order_id, f.order_date, f.customer_id, f.sku, f.quantity, \
             CASE WHEN f.order_date >= DATE '{start}' AND f.order_date < DATE '{end}' \
                  THEN CAST(round(s.quantity * s.unit_price * (1 - s.discount), 2) AS numeric(14,2)) ELSE f.revenue END AS revenue \
             FROM analytics.fact_orders f JOIN staging.orders s USING (order_id)) AS expected"
        ),
        RESULT_COLUMNS,
    )
    .await?;
    conn.close().await?;
    Ok(expected)
}

/// `raw-wap-smart.sh` (naive = false) or `raw-wap-naive.sh` (naive = true), statement by
/// statement as psql sends them (each its own transaction unless inside BEGIN/COMMIT), the
/// per-day statements over CONCURRENCY sessions taking the next day as they finish.
async fn hand_written(url: &str, naive: bool) -> Result<Measured> {
    let (start, end) = (day(0), day(WINDOW_DAYS));
    let started = Instant::now();
    let mut conn = pg::connect(url).await?;
    let mut phases = Vec::new();
    let mut mark = Instant::now();
    let shadow: Vec<String> = if naive {
        vec![
            "DROP TABLE IF EXISTS analytics.fact_orders__shadow".into(),
            "CREATE TABLE analytics.fact_orders__shadow (LIKE analytics.fact_orders INCLUDING ALL)"
                .into(),
            "INSERT INTO analytics.fact_orders__shadow SELECT * FROM analytics.fact_orders".into(),
            "ANALYZE analytics.fact_orders__shadow".into(),
        ]
    } else {
        vec![
            "DROP TABLE IF EXISTS analytics.fact_orders__shadow".into(),
            "CREATE TABLE analytics.fact_orders__shadow (LIKE analytics.fact_orders INCLUDING ALL)"
                .into(),
            format!(
                "INSERT INTO analytics.fact_orders__shadow SELECT * FROM analytics.fact_orders \
                 WHERE NOT (order_date >= DATE '{start}' AND order_date < DATE '{end}')"
            ),
        ]
    };
    for statement in &shadow {
        pg::exec(&mut conn, statement).await?;
    }
    phases.push((if naive { "clone" } else { "shadow" }, lap(&mut mark)));

    let next = Arc::new(AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, url) = (next.clone(), url.to_string());
        sessions.push(tokio::spawn(async move {
            let mut session = pg::connect(&url).await?;
            loop {
                let offset = next.fetch_add(1, Ordering::SeqCst);
                if offset >= WINDOW_DAYS as usize {
                    break;
                }
                let d = day(offset as i64);
                let statement = if naive {
                    MERGE_DAY.replace("{d}", &d.to_string())
                } else {
                    format!(
                        "INSERT INTO analytics.fact_orders__shadow (order_id, order_date, customer_id, sku, quantity, revenue, updated_at) \
                         SELECT order_id, order_date, customer_id, sku, quantity, round(quantity * unit_price * (1 - discount), 2), now() \
                         FROM staging.orders WHERE order_date >= DATE '{d}' AND order_date < DATE '{d}' + 1"
                    )
                };
                pg::exec(&mut session, &statement).await?;
            }
            session.close().await?;
            anyhow::Ok(())
        }));
    }
    for session in sessions {
        session.await??;
    }
    phases.push(("days", lap(&mut mark)));

    if !naive {
        pg::exec(&mut conn, "ANALYZE analytics.fact_orders__shadow").await?;
    }
    let bad_days = pg::scalar_i64(&mut conn, AUDIT).await?;
    if bad_days != 0 {
        bail!("the hand-written audit found {bad_days} bad day(s)");
    }
    phases.push(("audit", lap(&mut mark)));
    for statement in SWAP {
        pg::exec(&mut conn, statement).await?;
    }
    phases.push(("swap", lap(&mut mark)));
    let wall = started.elapsed().as_secs_f64();
    conn.close().await?;
    Ok(Measured {
        system: if naive { System::Naive } else { System::Smart },
        round: 0,
        wall,
        phases,
        checksum: String::new(),
        coordinator_rss_mib: None,
        worker_rss_mib: None,
    })
}

fn lap(mark: &mut Instant) -> f64 {
    let seconds = mark.elapsed().as_secs_f64();
    *mark = Instant::now();
    seconds
}

async fn run_backfill(
    ctx: &Ctx,
    url: &str,
    spec: &str,
    system: System,
    round: usize,
) -> Result<Measured> {
    let name = format!("ref-r{round}-{}", system.short());
    let args = ["run", spec, "--no-progress"];
    let (finished, workers) = if system == System::Distributed {
        let mut cluster = Cluster::new(
            &ctx.services,
            &ctx.binaries,
            ctx.prefix(&name),
            "bench",
            url,
            &ctx.logs,
        );
        cluster.start_workers(2, 1, &[]).await?;
        let running = procs::spawn(cluster.coordinator(&args), &ctx.logs, &name)?;
        let finished = running.wait(Duration::from_secs(3600)).await?;
        let workers = cluster.stop().await?;
        (finished, Some(workers))
    } else {
        let running = procs::spawn(
            procs::embedded(&ctx.binaries, "bench", url, &args),
            &ctx.logs,
            &name,
        )?;
        (running.wait(Duration::from_secs(3600)).await?, None)
    };
    if !finished.success() || !finished.stdout.contains("published run") {
        bail!("{} did not publish:\n{}", system.name(), finished.output());
    }
    let mut conn = pg::connect(url).await?;
    let run = facts::read_run(&mut conn).await?;
    conn.close().await?;
    run.check_published(WINDOW_DAYS as usize)?;
    let wall = finished.wall.as_secs_f64();
    Ok(Measured {
        system,
        round,
        wall,
        phases: run.phases(finished.started_at, wall)?,
        checksum: String::new(),
        coordinator_rss_mib: Some(finished.max_rss_mib()),
        worker_rss_mib: workers.map(|w| w.iter().map(|f| f.max_rss_mib()).fold(0.0, f64::max)),
    })
}
