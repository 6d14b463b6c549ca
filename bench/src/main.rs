//! `backfill-bench`: measures `backfill` side by side with hand-written SQL and writes a
//! markdown report (bench/RESULTS.md by default). It drives the real `backfill` and
//! `backfill-worker` binaries found next to it (build them in release mode for numbers that
//! mean something) against the real PostgreSQL, RabbitMQ and Redis, and cleans up everything
//! it creates: databases, queues, exchanges, Redis keys.
//!
//! `--quick` runs every section at a smoke size: CI uses it to keep the harness working and
//! to check every run's result, never its timings.

mod context;
mod facts;
mod hourly;
mod machine;
mod overhead;
mod pg;
mod procs;
mod reference;
mod scale;
mod scaling;
mod stats;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

use context::{Ctx, Section};
use procs::{Binaries, Services};

#[derive(Parser, Debug)]
#[command(
    name = "backfill-bench",
    about = "Benchmarks backfill against hand-written SQL on the real servers and writes a markdown report",
    after_help = "Build the binaries first: cargo build --release --bins. Then:\n  \
    cargo run --release -p backfill-bench             # full size, writes bench/RESULTS.md (long)\n  \
    cargo run -p backfill-bench -- --quick            # smoke size, writes target/bench-quick/RESULTS.md\n\
    Check the machine's load first (uptime): the report records it."
)]
struct Args {
    /// Smoke size: every section, small data, one or two rounds
    #[arg(long)]
    quick: bool,
    /// Where the report goes (default: bench/RESULTS.md, or <target dir>/bench-quick/RESULTS.md with --quick)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sections to run (default: all)
    #[arg(long, value_delimiter = ',', value_parser = ["reference", "overhead", "scale", "scaling"])]
    sections: Vec<String>,
    /// Rounds of the reference workload (default 3, or 2 with --quick)
    #[arg(long)]
    rounds: Option<usize>,
    /// Systems of the reference workload besides the lower bound (default: all)
    #[arg(long, value_delimiter = ',', value_parser = ["embedded", "distributed", "naive"])]
    systems: Vec<String>,
    /// Orders per day of the reference workload (default 20000, or 100 with --quick)
    #[arg(long)]
    per_day: Option<u32>,
    /// Slots per worker in the scaling section (default 3)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    scaling_slots: u32,
    /// Worker counts of the scaling section (default 1,2,4,8)
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    scaling_workers: Vec<usize>,
    /// Directory holding the backfill and backfill-worker binaries (default: next to this one)
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// PostgreSQL admin URL (a superuser: databases are created, copied and dropped)
    #[arg(
        long,
        env = "BACKFILL_TEST_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pg_url: String,
    /// Redis URL (the workers' semaphore)
    #[arg(
        long,
        env = "BACKFILL_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// RabbitMQ URL
    #[arg(
        long,
        env = "BACKFILL_TEST_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    broker_url: String,
}

struct Sizes {
    reference: reference::Sizes,
    overhead_partitions: usize,
    overhead_rounds: usize,
    scale_partitions: usize,
    scaling: scaling::Plan,
}

impl Sizes {
    fn for_args(args: &Args) -> Sizes {
        let mut sizes = if args.quick {
            Sizes {
                reference: reference::Sizes {
                    days: 120,
                    per_day: 100,
                    rounds: 2,
                    systems: args.systems.clone(),
                },
                overhead_partitions: 100,
                overhead_rounds: 2,
                scale_partitions: 300,
                scaling: scaling::Plan {
                    partitions: 32,
                    rounds: 1,
                    slots: args.scaling_slots,
                    workers: args.scaling_workers.clone(),
                },
            }
        } else {
            Sizes {
                reference: reference::Sizes {
                    days: 120,
                    per_day: 20_000,
                    rounds: 3,
                    systems: args.systems.clone(),
                },
                overhead_partitions: 2_000,
                overhead_rounds: 2,
                scale_partitions: 10_000,
                scaling: scaling::Plan {
                    partitions: 480,
                    rounds: 2,
                    slots: args.scaling_slots,
                    workers: args.scaling_workers.clone(),
                },
            }
        };
        if let Some(rounds) = args.rounds {
            sizes.reference.rounds = rounds.max(1);
        }
        if let Some(per_day) = args.per_day {
            sizes.reference.per_day = per_day.max(1);
        }
        sizes
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the sections, writes the report (also when a section failed) and cleans up.
/// Ok(false) when a section failed.
async fn run(args: Args) -> Result<bool> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let services = Services {
        pg_admin: args.pg_url.clone(),
        redis: args.redis_url.clone(),
        broker: args.broker_url.clone(),
        hmac_key: format!("bench-{}", uuid::Uuid::new_v4().simple()),
    };
    let binaries = Binaries::locate(args.bin_dir.clone())?;
    // The target directory the binaries were built in (target/release -> target).
    let target = binaries
        .backfill
        .parent()
        .and_then(|dir| dir.parent())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    // The full report is the committed bench/RESULTS.md; a smoke report never replaces it.
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            target.join("bench-quick/RESULTS.md")
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md")
        }
    });
    // Process logs next to the binaries (target/bench-logs/<id>), not in a shared /tmp.
    let logs = target
        .join("bench-logs")
        .join(format!("backfill-bench-{run_id}"));
    std::fs::create_dir_all(&logs)?;
    let machine = machine::describe(&services.pg_admin, &services.redis).await?;
    let sizes = Sizes::for_args(&args);
    let ctx = Ctx {
        dbs: pg::Databases::new(&services.pg_admin, &run_id),
        services,
        binaries,
        logs: logs.clone(),
        run_id,
    };
    let wanted = |name: &str| args.sections.is_empty() || args.sections.iter().any(|s| s == name);
    let load_start = machine::load_average();
    eprintln!(
        "backfill-bench{}: load average {load_start}; process logs in {}",
        if args.quick { " --quick" } else { "" },
        logs.display()
    );
    let started = Instant::now();
    let mut sections: Vec<Section> = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    let work = async {
        let steps: [(&str, bool); 4] = [
            ("reference", wanted("reference")),
            ("overhead", wanted("overhead")),
            ("scale", wanted("scale")),
            ("scaling", wanted("scaling")),
        ];
        for (name, enabled) in steps {
            if !enabled {
                continue;
            }
            let result = match name {
                "reference" => reference::run(&ctx, &sizes.reference).await,
                "overhead" => {
                    overhead::run(&ctx, sizes.overhead_partitions, sizes.overhead_rounds).await
                }
                "scale" => scale::run(&ctx, sizes.scale_partitions).await,
                _ => scaling::run(&ctx, &sizes.scaling).await,
            };
            match result {
                Ok(section) => sections.push(section),
                Err(error) => {
                    let error = error.context(format!("section {name}"));
                    let mut failed = Section::new(&format!("{name}: FAILED"));
                    failed.line(format!("```\n{error:#}\n```"));
                    sections.push(failed);
                    failure = Some(error);
                    break;
                }
            }
        }
    };
    let interrupted = tokio::select! {
        () = work => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    // Whatever happened: no database of this run survives it.
    let dropped = ctx.dbs.drop_all().await;
    if interrupted {
        eprintln!("interrupted; databases, queues and keys cleaned up");
        return Ok(false);
    }
    dropped.context("dropping the benchmark databases")?;
    let total = started.elapsed().as_secs_f64();
    let report = render(
        &machine,
        &load_start,
        &machine::load_average(),
        total,
        &args,
        &sections,
    );
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "report written to {} ({})",
        out.display(),
        stats::secs(total)
    );
    match failure {
        Some(error) => {
            eprintln!(
                "error: {error:#}\nprocess logs kept in {}",
                ctx.logs.display()
            );
            Ok(false)
        }
        None => {
            let _ = std::fs::remove_dir_all(&ctx.logs);
            Ok(true)
        }
    }
}

fn render(
    machine: &machine::Machine,
    load_start: &str,
    load_end: &str,
    total: f64,
    args: &Args,
    sections: &[Section],
) -> String {
    let mut text = String::new();
    let mut line = |s: &str| {
        text.push_str(s);
        text.push('\n');
    };
    line("# Benchmark results");
    line("");
    line(&format!(
        "Written by `backfill-bench{}` (`bench/`, see [bench/README.md](README.md) for the method and the analysis); \
         every figure below was measured in this one run. Do not edit by hand: run the harness again.",
        if args.quick { " --quick" } else { "" }
    ));
    if args.quick {
        line("");
        line(
            "**Smoke size (`--quick`)**: the data is tiny, so these timings say nothing about the tool; they only show the harness works.",
        );
    }
    line("");
    line("## Machine");
    line("");
    line(&format!(
        "- CPU: {} ({} cores)",
        machine.cpu_model, machine.cores
    ));
    line(&format!(
        "- RAM: {:.1} GiB; {}",
        machine.ram_gib, machine.kernel
    ));
    line(&format!(
        "- {}; RabbitMQ {}; Redis {}",
        machine.postgres, machine.rabbitmq, machine.redis
    ));
    line(&format!(
        "- Date: {}; commit {}; {} build",
        machine.date, machine.commit, machine.build
    ));
    line(&format!(
        "- Load average (1/5/15 min) at start: {load_start}; at end: {load_end}. The machine is shared \
         with other work, so the ratios of systems measured side by side matter more than absolute times."
    ));
    line(&format!("- Total harness time: {}", stats::secs(total)));
    line("");
    line("## Targets");
    line("");
    line("| figure | target | measured | |");
    line("|---|---|---|---|");
    for section in sections {
        for target in &section.targets {
            line(&format!(
                "| {} | {} | {} | {} |",
                target.what,
                target.target,
                target.measured,
                stats::verdict(target.met)
            ));
        }
    }
    for section in sections {
        line("");
        line(&format!("## {}", section.title));
        line("");
        text_push(&mut line, &section.body);
    }
    text
}

fn text_push(line: &mut impl FnMut(&str), body: &str) {
    for l in body.lines() {
        line(l);
    }
}
