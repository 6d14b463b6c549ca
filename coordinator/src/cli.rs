//! The `backfill` command line. Parsing, warehouse URL resolution and printing live here;
//! the work lives in the library modules.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

/// Returns a `Refusal` (exit code 2): the command changed nothing, for a reason to act on.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(Refusal(format!($($arg)*)).into())
    };
}

/// A `Refusal` as an `anyhow::Error`, for `ok_or_else`.
macro_rules! refusal {
    ($($arg:tt)*) => {
        anyhow::Error::from(Refusal(format!($($arg)*)))
    };
}
use backfill_common::control::ControlStore;
use backfill_common::ident::Ident;
use backfill_common::spec::{PublishMode, Spec};
use backfill_common::warehouse::{Warehouse, redact_url};
use backfill_worker::{PartitionOutcome, PartitionReport};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::demo;
use crate::distributed::DistributedOptions;
use crate::publish;
use crate::runner::{Backfill, Executor, Progress, RunOutcome};
use crate::status;
use backfill_common::broker::Broker;
use backfill_common::control::{PartitionState, RunState};
use backfill_common::telemetry::{self, LogFormat};

/// Exit codes scripts can act on.
pub const EXIT_AUDIT_FAILED: i32 = 3;
pub const EXIT_PARTITIONS_FAILED: i32 = 4;
pub const EXIT_BLOCKED_BY_HOOK: i32 = 5;

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
    Traces go to an OTLP collector (e.g. Jaeger) when OTEL_EXPORTER_OTLP_ENDPOINT is set; BACKFILL_LOG\n\
    filters log lines (e.g. info).\n\n\
    Exit codes: 0 success (published, or awaiting approval), 1 error, 2 bad usage or spec,\n\
    3 audits failed, 4 partitions failed, 5 stopped by a before_write/before_publish hook."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text or as JSON objects (one per line; JSON also logs every
    /// state change at info level)
    #[arg(long, env = "BACKFILL_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,
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

/// What `run`, `resume` and `resubmit` share: who, how to show progress, where, and by whom
/// the partitions are executed.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Who runs it, recorded on the run
    #[arg(long, env = "USER", default_value = "unknown")]
    pub owner: String,
    /// No progress bar (for logs and CI)
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub distributed: DistributedArgs,
}

/// Distributed execution: with a broker, partitions go to `backfill-worker` processes.
#[derive(Args, Debug, Clone)]
pub struct DistributedArgs {
    /// RabbitMQ URL; when set, partitions run on backfill-worker processes instead of here
    #[arg(long, env = "BACKFILL_BROKER_URL", hide_env_values = true)]
    pub broker: Option<String>,
    /// Prefix of queue names (one per deployment; the workers must use the same)
    #[arg(long, env = "BACKFILL_QUEUE_PREFIX", default_value = "backfill")]
    pub queue_prefix: String,
    /// Deliveries of a task before the broker dead-letters it
    #[arg(long, env = "BACKFILL_DELIVERY_LIMIT", default_value_t = backfill_common::queue::DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: u32,
    /// The broker's consumer_timeout; tasks must finish well within it
    #[arg(long, env = "BACKFILL_BROKER_CONSUMER_TIMEOUT", default_value = "30m")]
    pub broker_consumer_timeout: String,
}

impl DistributedArgs {
    /// The broker URL from the flag or variable, else from the config file's `[broker] url`.
    fn broker_url(&self, connection: &Connection) -> Result<Option<String>> {
        if self.broker.is_some() {
            return Ok(self.broker.clone());
        }
        backfill_common::config::section_url("broker", connection.config.as_deref())
            .map_err(|e| anyhow!(e))
    }

    fn executor(&self, connection: &Connection) -> Result<Executor> {
        let Some(broker_url) = self.broker_url(connection)? else {
            return Ok(Executor::Embedded);
        };
        let broker_url = &broker_url;
        let consumer_timeout = backfill_common::spec::parse_duration(&self.broker_consumer_timeout)
            .ok_or_else(|| {
                anyhow!(
                    "--broker-consumer-timeout: `{}` is not a duration like 30m",
                    self.broker_consumer_timeout
                )
            })?;
        Ok(Executor::Distributed(DistributedOptions {
            broker_url: broker_url.clone(),
            queue_prefix: self.queue_prefix.clone(),
            keyring: backfill_common::envelope::keyring_from_env().map_err(|e| anyhow!(e))?,
            delivery_limit: self.delivery_limit,
            consumer_timeout,
            reconcile_every: Duration::from_secs(2),
        }))
    }

    async fn broker(&self, connection: &Connection) -> Result<Option<Broker>> {
        let Some(url) = self.broker_url(connection)? else {
            return Ok(None);
        };
        let url = &url;
        let keyring = backfill_common::envelope::keyring_from_env().map_err(|e| anyhow!(e))?;
        Ok(Some(
            Broker::connect(url, &self.queue_prefix, keyring, self.delivery_limit).await?,
        ))
    }
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
        /// The backfill spec (TOML)
        spec: PathBuf,
        /// Carry on the target's open run with this spec's settings when only they changed
        /// (execution bounds, concurrency, audits, approval, retention, hooks, name): done
        /// partitions are kept, an audited run is audited again. A change to what the run
        /// writes (target, partition, source, warehouse, publish mode) is always refused
        #[arg(long)]
        amend: bool,
        #[command(flatten)]
        how: RunArgs,
    },
    /// Resume a run by its id (the spec is read back from the control store)
    Resume {
        run: String,
        #[command(flatten)]
        how: RunArgs,
    },
    /// Republish failed / dead-lettered partitions of a run (new attempt, new fencing token)
    /// and carry the run on to audit and publish
    Resubmit {
        run: String,
        /// Resubmit every partition that failed or was dead-lettered
        #[arg(long, required_unless_present = "partition")]
        dead_lettered: bool,
        /// Resubmit these partitions only (refused for partitions already done)
        #[arg(long, value_delimiter = ',')]
        partition: Vec<String>,
        #[command(flatten)]
        how: RunArgs,
    },
    /// Show a run (partition grid, counts, audits), or list runs when no run is given
    Status {
        run: Option<String>,
        #[arg(long)]
        json: bool,
        /// Redraw the run's grid, counts, throughput and ETA until it stops running
        /// (with --json: one JSON object per line per refresh)
        #[arg(long, requires = "run")]
        watch: bool,
        /// Seconds between refreshes of --watch
        #[arg(long, default_value_t = 2.0, requires = "watch")]
        interval: f64,
        /// Compare the window's current and backfilled versions per partition (rows added,
        /// removed, changed; numeric totals; a sample of changed rows) and save the report as
        /// backfill-diff-<run>.json and .html in --diff-dir
        #[arg(long, requires = "run", conflicts_with = "watch")]
        diff: bool,
        /// Where --diff saves its JSON and HTML reports
        #[arg(long, default_value = ".", requires = "diff")]
        diff_dir: PathBuf,
        /// Changed rows --diff lists with their old and new values
        #[arg(long, default_value_t = 20, requires = "diff")]
        sample: usize,
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        distributed: DistributedArgs,
    },
    /// Publish a run waiting for approval (publish.approval = "manual"), if the target's window
    /// still holds what its audits compared against
    Publish {
        run: String,
        /// Who approves, recorded in the run's events
        #[arg(long, env = "USER", default_value = "unknown")]
        owner: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Restore the table archived by a published run, verifying its checksum
    ///
    /// Refuses (exit 2, nothing changed) when the rows it would replace were written to since
    /// the publish, saying how many; rows outside a `swap_window` window are never touched.
    Rollback {
        run: String,
        /// Roll back even if the table (the window, for swap_window) was written to since the
        /// publish; what it holds now, those writes included, is kept as the run's
        /// `__bf_undone_` table
        #[arg(long)]
        discard_writes_since_publish: bool,
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
    /// Serve /metrics (runs' partitions, rows, audits and queue depths from the control store),
    /// /api/runs, /api/runs/<run>, /livez and /readyz over HTTP, until stopped
    Serve {
        /// Address to listen on (port 0 picks a free port, printed on stderr)
        #[arg(long, env = "BACKFILL_SERVE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        #[command(flatten)]
        connection: Connection,
        #[command(flatten)]
        distributed: DistributedArgs,
    },
    /// Run the lesson's mini challenge on an embedded SQLite warehouse (no server needed)
    ///
    /// With --warehouse-url on the command line, the demo runs on that warehouse
    /// (PostgreSQL, MySQL/MariaDB) instead: it RECREATES the tables fact_order_items,
    /// staging_order_items, expected_order_items and the view daily_quantity in that
    /// database, then runs the mini challenge there (control store: --control-schema).
    /// BACKFILL_WAREHOUSE_URL alone never points the demo at a server.
    Demo {
        /// Where to create the demo's SQLite warehouse (recreated on every demo)
        #[arg(long, default_value = "backfill-demo")]
        dir: PathBuf,
        #[command(flatten)]
        connection: Connection,
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
        return backfill_common::config::warehouse_url(name, connection.config.as_deref())
            .map_err(|e| Refusal(e.to_string()).into());
    }
    // A command that takes a run id names no warehouse: the one configured, if only one is.
    let configured = backfill_common::config::configured_warehouses(connection.config.as_deref())
        .map_err(Refusal)?;
    match configured.as_slice() {
        [only] => {
            return backfill_common::config::warehouse_url(only, connection.config.as_deref())
                .map_err(|e| Refusal(e.to_string()).into());
        }
        [] => {}
        several => refuse!(
            "several warehouses are configured ({}): say which with --warehouse NAME (or pass --warehouse-url)",
            several.join(", ")
        ),
    }
    Err(Refusal(
        "no warehouse given: pass --warehouse-url (or set BACKFILL_WAREHOUSE_URL), or --warehouse NAME with BACKFILL_WAREHOUSE_<NAME>_URL or a config file"
            .to_string(),
    )
    .into())
}

/// A command refused before it changed anything, for a reason the user can act on (bad
/// usage, a missing setting): exit code 2, like a bad spec.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// The exit code of a failed command: 2 when it was refused with nothing changed (a bad spec
/// or usage, or a refusal that names what to do instead: a run in the way, a table that
/// changed, an approval that lapsed), 1 for errors (the warehouse, the broker, a lock wait
/// that ran out: the same command may succeed later).
pub fn exit_code_of(error: &anyhow::Error) -> i32 {
    let refused = error.chain().any(|cause| {
        cause
            .downcast_ref::<backfill_common::spec::SpecError>()
            .is_some()
            || cause.downcast_ref::<Refusal>().is_some()
            || matches!(
                cause.downcast_ref::<backfill_common::BackfillError>(),
                Some(
                    backfill_common::BackfillError::Spec(_)
                        | backfill_common::BackfillError::Conflict(_)
                        | backfill_common::BackfillError::Invalid(_)
                        | backfill_common::BackfillError::ApprovalLapsed(_)
                )
            )
    });
    if refused { 2 } else { 1 }
}

/// Opens an existing run with the spec it is pinned to, read back from the control store.
async fn open_run(connection: &Connection, run_id: &str) -> Result<(Backfill, String)> {
    let store = open_store(connection).await?;
    let run = store
        .find_run(run_id)
        .await?
        .ok_or_else(|| refusal!("no run `{run_id}` in this control store"))?;
    let text = store.spec_source(&run.spec_hash).await?.ok_or_else(|| {
        anyhow!(
            "the spec {} of run {run_id} is missing from the control store",
            run.spec_hash
        )
    })?;
    let spec = Spec::parse(&text)
        .map_err(anyhow::Error::new)
        .context("the stored spec")?;
    let url = resolve_url(connection, None)?;
    Ok((Backfill::open(spec, text, &url).await?, url))
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
        Ident::new(&connection.control_schema).map_err(|e| refusal!("--control-schema: {e}"))?;
    let store = ControlStore::new(warehouse, schema);
    store.migrate().await?;
    Ok(store)
}

/// `status --watch`: redraws the run until it stops running (published, failed, audit failed,
/// rolled back or abandoned), or prints one JSON line per refresh.
async fn watch_run(
    store: &ControlStore,
    run: &str,
    broker: Option<&Broker>,
    json: bool,
    interval: f64,
) -> Result<()> {
    use std::io::IsTerminal as _;
    if !(interval.is_finite() && interval > 0.0) {
        refuse!("--interval must be a positive number of seconds, not {interval}");
    }
    let redraw = std::io::stdout().is_terminal() && !json;
    let mut meter = None;
    // Reading dead letters sweeps the dead-letter queue: at most every 30 s, not every frame.
    let mut dead_letters: Option<(std::time::Instant, Option<Vec<status::DeadLetterView>>)> = None;
    loop {
        let sweep = broker.filter(|_| {
            dead_letters
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= std::time::Duration::from_secs(30))
        });
        let mut status = status::load_with_broker(store, run, sweep).await?;
        if sweep.is_some() {
            dead_letters = Some((std::time::Instant::now(), status.dead_letters.clone()));
        } else if let Some((_, letters)) = &dead_letters {
            status.dead_letters = letters.clone();
        }
        let meter = meter.get_or_insert_with(|| status::PaceMeter::new(&status));
        let pace = meter.pace(&status);
        if json {
            let line = serde_json::json!({ "status": &status, "pace": &pace });
            println!("{line}");
        } else {
            if redraw {
                // clear the screen, cursor home
                print!("\x1b[2J\x1b[H");
            }
            print!("{}{}", status::render(&status), status::render_pace(&pace));
            if !redraw {
                println!();
            }
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        if matches!(
            status.run.state,
            RunState::Published
                | RunState::Failed
                | RunState::AuditFailed
                | RunState::AwaitingApproval
                | RunState::RolledBack
                | RunState::Abandoned
        ) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs_f64(interval)).await;
    }
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
        if telemetry::log_format() == LogFormat::Json {
            // Log pipelines read stderr line by line as JSON: phases are log events there.
            tracing::info!(target: "backfill::progress", "{message}");
        } else if self.bar.is_hidden() {
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
            PartitionOutcome::HandedBack => {}
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
            println!(
                "publish    {} ({})",
                plan.publish_mode.as_str(),
                plan.publish_reason
            );
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
                "archive    {}, kept {} days for rollback",
                match plan.publish_mode {
                    PublishMode::SwapWindow => "the window's current rows",
                    PublishMode::SwapPartitions => "the replaced partitions",
                    _ => "the current table",
                },
                backfill.spec.publish.archive_retention_days
            );
            if let Some(run) = &plan.resumes
                && !plan.amends.is_empty()
            {
                println!(
                    "amends     run {run} with `backfill run --amend` (other settings, same rows):"
                );
                for change in &plan.amends {
                    println!("             {change}");
                }
            } else if let Some(run) = &plan.resumes {
                println!("resumes    run {run} (same spec hash)");
            }
            println!(
                "\nper-partition source SQL ($1 = partition start, $2 = partition end):\n{}",
                plan.partition_sql
            );
            Ok(0)
        }
        Command::Run { spec, amend, how } => {
            let (spec, text) = read_spec(&spec)?;
            let url = resolve_url(&how.connection, Some(&spec.warehouse.name))?;
            let executor = how.distributed.executor(&how.connection)?;
            // Before any connection: a spec that cannot run distributed is refused up front.
            if let Executor::Distributed(options) = &executor {
                options.check_timeouts(&spec)?;
            }
            let backfill = Backfill::open(spec, text, &url).await?.amending(amend);
            carry_on(&backfill, &url, &how, &executor).await
        }
        Command::Resume { run, how } => {
            let executor = how.distributed.executor(&how.connection)?;
            let (backfill, url) = open_run(&how.connection, &run).await?;
            carry_on(&backfill, &url, &how, &executor).await
        }
        Command::Resubmit {
            run,
            dead_lettered,
            partition,
            how,
        } => {
            let executor = how.distributed.executor(&how.connection)?;
            let (backfill, url) = open_run(&how.connection, &run).await?;
            let record = backfill
                .store
                .find_run(&run)
                .await?
                .ok_or_else(|| refusal!("no run `{run}`"))?;
            if !record.state.is_open() {
                refuse!(
                    "run {run} is {}; there is nothing to resubmit",
                    record.state.as_str()
                );
            }
            let partitions = backfill.store.partitions(&run).await?;
            for key in &partition {
                let found = partitions
                    .iter()
                    .find(|p| &p.partition_key == key)
                    .ok_or_else(|| refusal!("run {run} has no partition `{key}`"))?;
                if found.state == PartitionState::Done {
                    refuse!(
                        "partition {key} of run {run} is done; resubmitting it would apply it again, so it is refused"
                    );
                }
            }
            let failed = partitions
                .iter()
                .filter(|p| p.state == PartitionState::Failed)
                .count();
            if dead_lettered && failed == 0 && partition.is_empty() {
                println!("run {run} has no failed or dead-lettered partition; resuming it");
            }
            if let Some(broker) = how.distributed.broker(&how.connection).await? {
                let purged = broker
                    .purge_dead_letters(&backfill.spec.warehouse.name, &run)
                    .await?;
                if purged > 0 {
                    println!(
                        "removed {purged} dead letter(s) of run {run}; their partitions are republished with new tokens"
                    );
                }
                broker.close().await;
            }
            carry_on(&backfill, &url, &how, &executor).await
        }
        Command::Status {
            run: Some(run),
            json,
            diff: true,
            diff_dir,
            sample,
            connection,
            ..
        } => {
            let store = open_store(&connection).await?;
            let report = crate::diff::diff_run(&store, &run, sample).await?;
            let json_path = diff_dir.join(format!("backfill-diff-{run}.json"));
            let html_path = diff_dir.join(format!("backfill-diff-{run}.html"));
            std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", json_path.display()))?;
            std::fs::write(&html_path, crate::diff::render_html(&report))
                .with_context(|| format!("writing {}", html_path.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::diff::render(&report));
                println!(
                    "\nsaved {} and {}",
                    json_path.display(),
                    html_path.display()
                );
            }
            Ok(0)
        }
        Command::Status {
            run,
            json,
            watch,
            interval,
            connection,
            distributed,
            ..
        } => {
            let store = open_store(&connection).await?;
            let broker = distributed.broker(&connection).await?;
            let shown = match run {
                Some(run) if watch => {
                    watch_run(&store, &run, broker.as_ref(), json, interval).await
                }
                Some(run) => {
                    let status = status::load_with_broker(&store, &run, broker.as_ref()).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{}", status::render(&status));
                    }
                    Ok(())
                }
                None => {
                    let runs = store.all_runs().await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&runs)?);
                    } else {
                        print!("{}", status::render_run_list(&runs));
                    }
                    Ok(())
                }
            };
            if let Some(broker) = broker {
                broker.close().await;
            }
            shown.map(|()| 0)
        }
        Command::Serve {
            listen,
            connection,
            distributed,
        } => {
            let store = open_store(&connection).await?;
            let broker = distributed.broker(&connection).await?;
            let stop = async {
                use tokio::signal::unix::{SignalKind, signal};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! {
                served = crate::serve::serve(store, broker, &listen) => {
                    served?;
                    Ok(0)
                }
                () = stop => Ok(0),
            }
        }
        Command::Publish {
            run,
            owner,
            connection,
        } => {
            let (backfill, url) = open_run(&connection, &run).await?;
            let bar = Bar::new(false);
            let outcome = backfill.publish_approved(&run, &owner, &bar).await?;
            Ok(report_outcome(&outcome, &url))
        }
        Command::Rollback {
            run,
            discard_writes_since_publish,
            connection,
        } => {
            let store = open_store(&connection).await?;
            let options = publish::RollbackOptions {
                discard_writes_since_publish,
            };
            let report = publish::rollback_with(&store, &run, options).await?;
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
            for (table, error) in &report.failed {
                eprintln!("could not drop {table}: {error}");
            }
            Ok(if report.failed.is_empty() { 0 } else { 1 })
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
                .ok_or_else(|| refusal!("no run `{run}` in this control store"))?;
            if !record.state.is_open() {
                refuse!(
                    "run {run} is {}; only an unpublished run can be abandoned",
                    record.state.as_str()
                );
            }
            publish::drop_shadow(&store, &record).await?;
            println!("abandoned run {run}; dropped {}", record.shadow_table);
            Ok(0)
        }
        Command::Demo { dir, connection } => {
            let bar = Bar::new(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            // Only a URL typed on this command line may have its tables recreated.
            let typed = std::env::args()
                .any(|a| a == "--warehouse-url" || a.starts_with("--warehouse-url="));
            let report = match &connection.warehouse_url {
                Some(url) if typed => {
                    demo::run_demo_on(url, &connection.control_schema, &bar).await?
                }
                _ => demo::run_demo(&dir, &bar).await?,
            };
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

/// Runs (or resumes) a backfill with a progress bar, prints the outcome, returns the exit code.
async fn carry_on(
    backfill: &Backfill,
    url: &str,
    how: &RunArgs,
    executor: &Executor,
) -> Result<i32> {
    let bar = Bar::new(!how.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let outcome = backfill.run_with(&how.owner, &bar, executor).await?;
    drop(bar);
    Ok(report_outcome(&outcome, url))
}

fn report_outcome(outcome: &RunOutcome, url: &str) -> i32 {
    let flag = format!("--warehouse-url '{}'", redact_url(url));
    match outcome {
        RunOutcome::Published {
            run_id,
            archive,
            partitions,
            publish_mode,
        } => {
            let archived = match publish_mode {
                PublishMode::SwapWindow => "the window's previous rows are archived in",
                PublishMode::SwapPartitions => "the replaced partitions are archived as",
                _ => "the previous table is archived as",
            };
            println!(
                "published run {run_id}: {partitions} partition(s) written, audited and swapped in; {archived} {archive}"
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
            println!(
                "the data is wrong: fix the source and run the same spec again (its partitions are applied again, \
                 writing only rows that changed, then audited)"
            );
            println!(
                "a threshold is wrong, not the data: correct it in the spec and run it with --amend \
                 (the shadow is audited again; no partition is written again)"
            );
            println!("give up on this run: backfill abandon {run_id} {flag}");
            EXIT_AUDIT_FAILED
        }
        RunOutcome::PartitionsFailed { run_id, failures } => {
            if failures
                .iter()
                .any(|(key, _)| key == crate::shadow::SHADOW_WIDE)
            {
                println!(
                    "run {run_id}: an index of the target cannot be built on the shadow; nothing was published. \
                     Resuming cannot change that: `backfill abandon {run_id}`, fix the cause and run the spec again"
                );
            } else {
                println!(
                    "run {run_id}: {} partition(s) failed; fix the cause and run the same command again to resume",
                    failures.len()
                );
            }
            for (partition, error) in failures.iter().take(20) {
                println!("  {partition}: {error}");
            }
            if failures.iter().any(|(_, error)| error.contains("timeout")) {
                println!(
                    "too short a bound? raise execution.partition_timeout (or retries) in the spec and run it with --amend: \
                     the run carries on, its done partitions are kept"
                );
            }
            EXIT_PARTITIONS_FAILED
        }
        RunOutcome::AwaitingApproval {
            run_id,
            publish_mode,
        } => {
            println!(
                "run {run_id}: audits passed; awaiting approval (publish.approval = \"manual\"). Nothing is published yet."
            );
            println!("review:      backfill status {run_id} {flag}");
            println!("publish:     backfill publish {run_id} {flag}   ({publish_mode})");
            println!("or give up:  backfill abandon {run_id} {flag}");
            0
        }
        RunOutcome::Blocked { run_id, reason, .. } => {
            println!("run {run_id}: stopped by a hook, the target was not touched: {reason}");
            println!(
                "fix the hook's cause, then run the same command again (status: backfill status {run_id} {flag})"
            );
            EXIT_BLOCKED_BY_HOOK
        }
    }
}
