//! The `backfill` command line. Parsing, warehouse URL resolution and printing live here;
//! the work lives in the library modules.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use backfill_common::control::ControlStore;
use backfill_common::ident::Ident;
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Warehouse, redact_url};
use backfill_worker::{PartitionOutcome, PartitionReport};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::demo;
use crate::publish;
use crate::runner::{Backfill, Progress, RunOutcome};
use crate::status;

/// Exit codes scripts can act on.
pub const EXIT_AUDIT_FAILED: i32 = 3;
pub const EXIT_PARTITIONS_FAILED: i32 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "backfill",
    version,
    about = "Safe historical backfills: scoped, idempotent, audited, atomically published, reversible",
    long_about = "backfill recomputes a window of partitions of a table from a source query, safely:\n\
    it writes into a shadow table partition by partition (idempotent merge, per-partition checkpoint,\n\
    bounded concurrency, timeouts, retries), audits the shadow against the current table, publishes it\n\
    with one atomic swap, and keeps the old table as an archive for one-command rollback.\n\n\
    Start with `backfill demo` (no server needed), then write a spec (see examples/) and run\n\
    `backfill plan SPEC` followed by `backfill run SPEC`.",
    after_help = "Warehouse URLs come from --warehouse-url (or BACKFILL_WAREHOUSE_URL), from\n\
    BACKFILL_WAREHOUSE_<NAME>_URL for the spec's warehouse.name, or from the config file\n\
    (--config / BACKFILL_CONFIG) under [warehouses.<name>] url = \"…\". Passwords are never printed.\n\n\
    Exit codes: 0 success, 1 error, 2 bad usage or spec, 3 audits failed, 4 partitions failed."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// Warehouse URL, e.g. postgres://user@host/db or sqlite:///path/to/file.db
    #[arg(
        long,
        env = "BACKFILL_WAREHOUSE_URL",
        hide_env_values = true,
        global = true
    )]
    pub warehouse_url: Option<String>,
    /// Warehouse name to look up in BACKFILL_WAREHOUSE_<NAME>_URL or the config file
    #[arg(long, global = true)]
    pub warehouse: Option<String>,
    /// Config file with [warehouses.<name>] url = "…" entries
    #[arg(long, env = "BACKFILL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Schema (PostgreSQL) or table prefix (SQLite) of the control store
    #[arg(long, default_value = "backfill", global = true)]
    pub control_schema: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a spec against the warehouse and show partitions, SQL and spec hash; writes nothing
    Plan {
        /// The backfill spec (TOML)
        spec: PathBuf,
        /// Print the plan as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Run a backfill: shadow, partitions, audits, publish. Running it again resumes
    Run {
        spec: PathBuf,
        /// Who runs it, recorded on the run
        #[arg(long, env = "USER", default_value = "unknown")]
        owner: String,
        /// No progress bar (for logs and CI)
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a run (partition grid, counts, audits), or list runs when no run is given
    Status {
        run: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Restore the table archived by a published run, verifying its checksum
    Rollback {
        run: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Drop archives whose retention has passed
    Gc {
        /// Only list what would be dropped
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// List archives with their retention and checksum
    Archives {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Give up an unpublished run and drop its shadow, so another spec can run on its target
    Abandon {
        run: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Run the lesson's mini challenge on an embedded SQLite warehouse (no server needed)
    Demo {
        /// Where to create the demo warehouse (recreated on every demo)
        #[arg(long, default_value = "backfill-demo")]
        dir: PathBuf,
    },
}

/// Resolves the URL: explicit flag/env first, then the named warehouse's variable, then the
/// config file. The error lists every way to provide it.
pub fn resolve_url(connection: &Connection, spec_warehouse: Option<&str>) -> Result<String> {
    if let Some(url) = &connection.warehouse_url {
        return Ok(url.clone());
    }
    let name = connection.warehouse.as_deref().or(spec_warehouse);
    if let Some(name) = name {
        let variable = format!(
            "BACKFILL_WAREHOUSE_{}_URL",
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                })
                .collect::<String>()
        );
        if let Ok(url) = std::env::var(&variable) {
            return Ok(url);
        }
        if let Some(path) = &connection.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let config: toml::Table = text
                .parse()
                .with_context(|| format!("parsing config file {}", path.display()))?;
            if let Some(url) = config
                .get("warehouses")
                .and_then(|w| w.get(name))
                .and_then(|w| w.get("url"))
                .and_then(|u| u.as_str())
            {
                return Ok(url.to_string());
            }
            bail!(
                "config file {} has no [warehouses.{name}] url",
                path.display()
            );
        }
        bail!(
            "no URL for warehouse `{name}`: pass --warehouse-url, set {variable}, or give a config file with [warehouses.{name}] url = \"…\""
        );
    }
    bail!(
        "no warehouse given: pass --warehouse-url (or set BACKFILL_WAREHOUSE_URL), or --warehouse NAME with BACKFILL_WAREHOUSE_<NAME>_URL or a config file"
    )
}

fn read_spec(path: &PathBuf) -> Result<(Spec, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading spec {}", path.display()))?;
    // Keep the SpecError in the chain: main maps it to exit code 2.
    let spec = Spec::parse(&text)
        .map_err(anyhow::Error::new)
        .with_context(|| path.display().to_string())?;
    Ok((spec, text))
}

async fn open_store(connection: &Connection) -> Result<ControlStore> {
    let url = resolve_url(connection, None)?;
    let warehouse = Warehouse::connect(&url, 4).await?;
    let schema =
        Ident::new(&connection.control_schema).map_err(|e| anyhow!("--control-schema: {e}"))?;
    let store = ControlStore::new(warehouse, schema);
    store.migrate().await?;
    Ok(store)
}

/// Progress as an indicatif bar on stderr (or plain lines without a terminal).
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new(visible: bool) -> Bar {
        let bar = if visible {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} partitions  {per_sec}  eta {eta}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn phase(&self, message: &str) {
        if self.bar.is_hidden() {
            eprintln!("{message}");
        } else {
            self.bar.println(message);
        }
    }
    fn partitions(&self, total: usize, already_done: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(already_done as u64);
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }
    fn partition_finished(&self, report: &PartitionReport) {
        match &report.outcome {
            PartitionOutcome::Done { counts, .. } => {
                self.bar.inc(1);
                self.bar.set_message(format!(
                    "{} +{} ~{} -{}",
                    report.task.partition_key, counts.inserted, counts.updated, counts.deleted
                ));
            }
            PartitionOutcome::Stale => self.bar.inc(1),
            PartitionOutcome::Failed { error, .. } => self.phase(&format!(
                "partition {} failed: {error}",
                report.task.partition_key
            )),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Runs a command; returns the process exit code.
pub async fn execute(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Plan {
            spec,
            json,
            connection,
        } => {
            let (spec, text) = read_spec(&spec)?;
            let url = resolve_url(&connection, Some(&spec.warehouse.name))?;
            let backfill = Backfill::open(spec, text, &url).await?;
            let plan = backfill.plan().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
                return Ok(0);
            }
            println!("spec       {} ({})", plan.spec_name, plan.spec_hash);
            println!("warehouse  {} ({})", redact_url(&url), plan.dialect);
            println!("target     {}", plan.target);
            println!("shadow     {}", plan.shadow_template);
            let first = plan
                .partitions
                .first()
                .map(|p| p.key.as_str())
                .unwrap_or("-");
            let last = plan
                .partitions
                .last()
                .map(|p| p.key.as_str())
                .unwrap_or("-");
            println!(
                "partitions {} by {} from {first} to {last}",
                plan.partitions.len(),
                plan.grain.as_str()
            );
            if plan.partitions.len() <= 48 {
                println!(
                    "           {}",
                    plan.partitions
                        .iter()
                        .map(|p| p.key.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            println!("columns    {}", plan.source_columns.join(", "));
            println!(
                "concurrency {} on warehouse `{}`",
                backfill.spec.warehouse.concurrency, backfill.spec.warehouse.name
            );
            println!(
                "audits     {}",
                backfill
                    .spec
                    .audits
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "publish    swap_table, archive kept {} days",
                backfill.spec.publish.archive_retention_days
            );
            if let Some(run) = &plan.resumes {
                println!("resumes    run {run} (same spec hash)");
            }
            println!(
                "\nper-partition source SQL ($1 = partition start, $2 = partition end):\n{}",
                plan.partition_sql
            );
            Ok(0)
        }
        Command::Run {
            spec,
            owner,
            no_progress,
            connection,
        } => {
            let (spec, text) = read_spec(&spec)?;
            let url = resolve_url(&connection, Some(&spec.warehouse.name))?;
            let backfill = Backfill::open(spec, text, &url).await?;
            let bar =
                Bar::new(!no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()));
            let outcome = backfill.run(&owner, &bar).await?;
            drop(bar);
            Ok(report_outcome(&outcome, &url))
        }
        Command::Status {
            run,
            json,
            connection,
        } => {
            let store = open_store(&connection).await?;
            match run {
                Some(run) => {
                    let status = status::load(&store, &run).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{}", status::render(&status));
                    }
                }
                None => {
                    let runs = store.all_runs().await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&runs)?);
                    } else {
                        print!("{}", status::render_run_list(&runs));
                    }
                }
            }
            Ok(0)
        }
        Command::Rollback { run, connection } => {
            let store = open_store(&connection).await?;
            let report = publish::rollback(&store, &run).await?;
            println!(
                "rolled back run {}: {} restored from {} (checksum {} verified); the backfilled table is kept as {}",
                report.run_id, report.target, report.restored_from, report.checksum, report.kept_as
            );
            Ok(0)
        }
        Command::Gc {
            dry_run,
            connection,
        } => {
            let store = open_store(&connection).await?;
            let report = publish::gc(&store, chrono::Utc::now(), dry_run).await?;
            let verb = if dry_run { "would drop" } else { "dropped" };
            for table in &report.dropped {
                println!("{verb} {table}");
            }
            println!(
                "{verb} {} archive(s); {} still within retention",
                report.dropped.len(),
                report.kept
            );
            Ok(0)
        }
        Command::Archives { json, connection } => {
            let store = open_store(&connection).await?;
            let archives = store.archives().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&archives)?);
            } else if archives.is_empty() {
                println!("no archives");
            } else {
                println!(
                    "{:<48} {:<9} {:<12} {:>10} {:<25} STATE",
                    "ARCHIVE", "RUN", "KIND", "ROWS", "EXPIRES"
                );
                for a in archives {
                    let state = if a.dropped_at.is_some() {
                        "dropped"
                    } else if a.restored_at.is_some() {
                        "restored"
                    } else {
                        "kept"
                    };
                    println!(
                        "{:<48} {:<9} {:<12} {:>10} {:<25} {state}",
                        a.archive_table, a.run_id, a.kind, a.row_count, a.expires_at
                    );
                }
            }
            Ok(0)
        }
        Command::Abandon { run, connection } => {
            let store = open_store(&connection).await?;
            let record = store
                .find_run(&run)
                .await?
                .ok_or_else(|| anyhow!("no run `{run}` in this control store"))?;
            if !record.state.is_open() {
                bail!(
                    "run {run} is {}; only an unpublished run can be abandoned",
                    record.state.as_str()
                );
            }
            publish::drop_shadow(&store, &record).await?;
            println!("abandoned run {run}; dropped {}", record.shadow_table);
            Ok(0)
        }
        Command::Demo { dir } => {
            let bar = Bar::new(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            let report = demo::run_demo(&dir, &bar).await?;
            drop(bar);
            println!(
                "\nmini challenge: quantity was doubled on {} in fact_order_items",
                demo::BUG_DAYS.join(", ")
            );
            println!("the dashboard view daily_quantity, before and after the backfill:\n");
            println!(
                "{:<12} {:>10} {:>10} {:>7} {:>7}",
                "day", "before", "after", "items", "items"
            );
            for (b, a) in report.before.iter().zip(report.after.iter()) {
                let mark = if b.total_quantity != a.total_quantity {
                    "  <- fixed"
                } else {
                    ""
                };
                println!(
                    "{:<12} {:>10} {:>10} {:>7} {:>7}{mark}",
                    b.day, b.total_quantity, a.total_quantity, b.items, a.items
                );
            }
            println!();
            let code = report_outcome(&report.outcome, &report.warehouse_url);
            Ok(code)
        }
    }
}

fn report_outcome(outcome: &RunOutcome, url: &str) -> i32 {
    let flag = format!("--warehouse-url '{}'", redact_url(url));
    match outcome {
        RunOutcome::Published {
            run_id,
            archive,
            partitions,
        } => {
            println!(
                "published run {run_id}: {partitions} partition(s) written, audited and swapped in; the previous table is archived as {archive}"
            );
            println!("status:      backfill status {run_id} {flag}");
            println!("roll back:   backfill rollback {run_id} {flag}");
            0
        }
        RunOutcome::AlreadyPublished { run_id } => {
            println!(
                "run {run_id} already published this exact spec; nothing to do (status: backfill status {run_id} {flag})"
            );
            0
        }
        RunOutcome::AuditFailed { run_id, failures } => {
            println!(
                "run {run_id}: audits failed, nothing was published; the shadow is kept for inspection"
            );
            print!("{}", status::render_audits(failures, true));
            println!("details: backfill status {run_id} {flag}");
            EXIT_AUDIT_FAILED
        }
        RunOutcome::PartitionsFailed { run_id, failures } => {
            println!(
                "run {run_id}: {} partition(s) failed; fix the cause and run the same command again to resume",
                failures.len()
            );
            for (partition, error) in failures.iter().take(20) {
                println!("  {partition}: {error}");
            }
            EXIT_PARTITIONS_FAILED
        }
    }
}
