//! The real binaries as child processes: `backfill` (the coordinator, embedded or distributed)
//! and `backfill-worker`. Each child is waited for with `wait4`, which returns that child's own
//! resource usage: its peak resident set (`ru_maxrss`, the kernel's VmHWM at exit) and CPU time.
//! A distributed cluster gets a unique queue prefix and Redis key prefix, and its queues,
//! exchanges and keys are deleted when it stops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use backfill_common::broker::Broker;
use backfill_common::envelope::{Keyring, SigningKey};
use chrono::{DateTime, Utc};

/// Where the servers are.
#[derive(Debug, Clone)]
pub struct Services {
    pub pg_admin: String,
    pub redis: String,
    pub broker: String,
    /// The message signing key every process of this harness run shares.
    pub hmac_key: String,
}

impl Services {
    pub fn keyring(&self) -> Keyring {
        Keyring::new(SigningKey::new("k1", self.hmac_key.as_bytes().to_vec()).expect("key"))
    }
}

#[derive(Debug, Clone)]
pub struct Binaries {
    pub backfill: PathBuf,
    pub worker: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, or next to this harness (target/release or target/debug).
    pub fn locate(dir: Option<PathBuf>) -> Result<Binaries> {
        let dir = match dir {
            Some(dir) => dir,
            None => std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow!("the harness executable has no directory"))?
                .to_path_buf(),
        };
        let binaries = Binaries {
            backfill: dir.join("backfill"),
            worker: dir.join("backfill-worker"),
        };
        for bin in [&binaries.backfill, &binaries.worker] {
            if !bin.exists() {
                bail!(
                    "{} is missing: build the binaries first (`cargo build --release --bins`), or pass --bin-dir",
                    bin.display()
                );
            }
        }
        Ok(binaries)
    }
}

/// How a child process ended and what it used.
#[derive(Debug, Clone)]
pub struct Finished {
    pub code: Option<i32>,
    pub wall: Duration,
    pub started_at: DateTime<Utc>,
    /// Peak resident set size in KiB (`ru_maxrss` from `wait4`).
    pub max_rss_kib: i64,
    pub cpu_seconds: f64,
    pub stdout: String,
    pub stderr: String,
    pub stderr_path: PathBuf,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn max_rss_mib(&self) -> f64 {
        self.max_rss_kib as f64 / 1024.0
    }

    /// The process's output, for error messages.
    pub fn output(&self) -> String {
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr (last 40 lines; all in {})\n{}",
            self.code,
            tail(&self.stdout),
            self.stderr_path.display(),
            tail(&self.stderr)
        )
    }
}

/// A running child whose pid this harness owns until it is reaped.
pub struct Running {
    pid: i32,
    started: Instant,
    started_at: DateTime<Utc>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    reaped: bool,
}

/// Starts `command` with its output in `<logs>/<name>.out` and `.err`.
pub fn spawn(mut command: Command, logs: &Path, name: &str) -> Result<Running> {
    let stdout_path = logs.join(format!("{name}.out"));
    let stderr_path = logs.join(format!("{name}.err"));
    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?);
    let started_at = Utc::now();
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let pid = child.id() as i32;
    // No pipes to keep: from here on the pid is managed with kill/wait4 below.
    drop(child);
    Ok(Running {
        pid,
        started,
        started_at,
        stdout_path,
        stderr_path,
        reaped: false,
    })
}

/// `wait4(pid)`: blocks until the child exits; returns its wait status and resource usage.
fn wait4_blocking(pid: i32) -> Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it for the child `pid` we spawned.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; pid is our own unreaped child.
        let result = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if result == pid {
            return Ok((status, usage));
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(anyhow!("wait4({pid}): {error}"));
        }
    }
}

impl Running {
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    pub fn signal(&self, signal: i32) {
        if !self.reaped {
            // SAFETY: sending a signal to our own unreaped child.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Whether the child has already exited (without reaping it).
    pub fn has_exited(&self) -> bool {
        if self.reaped {
            return true;
        }
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: WNOWAIT leaves the child waitable; info is a local.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is set when waitid reports a child.
        result == 0 && unsafe { info.si_pid() } == self.pid
    }

    /// Waits for the child to exit (killing it after `limit`) and collects what it used.
    pub async fn wait(mut self, limit: Duration) -> Result<Finished> {
        let pid = self.pid;
        let mut waiter = tokio::task::spawn_blocking(move || wait4_blocking(pid));
        let (status, usage) = match tokio::time::timeout(limit, &mut waiter).await {
            Ok(joined) => joined??,
            Err(_) => {
                self.signal(libc::SIGKILL);
                let _ = waiter.await;
                self.reaped = true;
                bail!(
                    "pid {pid} did not finish within {limit:?}; killed (its log: {})",
                    self.stderr_path.display()
                );
            }
        };
        let wall = self.started.elapsed();
        self.reaped = true;
        let code = if libc::WIFEXITED(status) {
            Some(libc::WEXITSTATUS(status))
        } else {
            None
        };
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1_000_000.0;
        Ok(Finished {
            code,
            wall,
            started_at: self.started_at,
            max_rss_kib: usage.ru_maxrss,
            cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            stdout: std::fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            stderr_path: self.stderr_path.clone(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            let _ = wait4_blocking(self.pid);
        }
    }
}

/// Environment every `backfill` process of this harness gets: the named warehouse's URL and
/// nothing inherited that could point it elsewhere.
pub fn clean_env(command: &mut Command, warehouse: &str, warehouse_url: &str) {
    for name in [
        "BACKFILL_WAREHOUSE_URL",
        "BACKFILL_BROKER_URL",
        "BACKFILL_REDIS_URL",
        "BACKFILL_QUEUE_PREFIX",
        "BACKFILL_CONFIG",
        "BACKFILL_LOG",
        "BACKFILL_LOG_FORMAT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        command.env_remove(name);
    }
    command.env(
        backfill_common::config::warehouse_env_var(warehouse),
        warehouse_url,
    );
}

/// `backfill <args>` in the embedded mode.
pub fn embedded(binaries: &Binaries, warehouse: &str, url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(&binaries.backfill);
    clean_env(&mut command, warehouse, url);
    command.args(args);
    command
}

/// Workers and coordinators sharing one queue prefix (also their Redis key prefix).
pub struct Cluster {
    pub prefix: String,
    pub warehouse: String,
    warehouse_url: String,
    services: Services,
    binaries: Binaries,
    logs: PathBuf,
    workers: Vec<Running>,
    cleaned: bool,
}

impl Cluster {
    pub fn new(
        services: &Services,
        binaries: &Binaries,
        prefix: String,
        warehouse: &str,
        warehouse_url: &str,
        logs: &Path,
    ) -> Cluster {
        Cluster {
            prefix,
            warehouse: warehouse.to_string(),
            warehouse_url: warehouse_url.to_string(),
            services: services.clone(),
            binaries: binaries.clone(),
            logs: logs.to_path_buf(),
            workers: Vec::new(),
            cleaned: false,
        }
    }

    fn env(&self, command: &mut Command) {
        clean_env(command, &self.warehouse, &self.warehouse_url);
        command
            .env("BACKFILL_BROKER_URL", &self.services.broker)
            .env("BACKFILL_REDIS_URL", &self.services.redis)
            .env("BACKFILL_QUEUE_PREFIX", &self.prefix)
            .env("BACKFILL_HMAC_KEY", &self.services.hmac_key)
            .env("BACKFILL_HMAC_KEY_ID", "k1");
    }

    /// The application_name of worker `index` in pg_stat_activity.
    pub fn worker_id(&self, index: usize) -> String {
        format!("{}-worker-{index}", self.prefix)
    }

    /// Starts `count` workers with `slots` each and waits until every one says it is ready.
    /// `extra` adds environment (e.g. JSON logs).
    pub async fn start_workers(
        &mut self,
        count: usize,
        slots: u32,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let first = self.workers.len();
        for index in first..first + count {
            let mut command = Command::new(&self.binaries.worker);
            self.env(&mut command);
            command
                .env("BACKFILL_WORKER_WAREHOUSES", &self.warehouse)
                .env("BACKFILL_WORKER_SLOTS", slots.to_string())
                .env("BACKFILL_WORKER_ID", self.worker_id(index))
                .env("BACKFILL_LOG", "info");
            for (key, value) in extra {
                command.env(key, value);
            }
            let name = format!("{}-worker-{index}", self.prefix);
            self.workers.push(spawn(command, &self.logs, &name)?);
        }
        let started = Instant::now();
        for worker in &self.workers[first..] {
            loop {
                let log = std::fs::read_to_string(worker.stderr_path()).unwrap_or_default();
                if log.contains("worker ready") {
                    break;
                }
                if worker.has_exited() || started.elapsed() > Duration::from_secs(60) {
                    bail!("a worker did not become ready:\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// `backfill <args>` as this cluster's coordinator.
    pub fn coordinator(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binaries.backfill);
        self.env(&mut command);
        command.args(args);
        command
    }

    /// The Redis semaphore's record of the most leases held at once on the warehouse.
    pub async fn peak_holders(&self) -> Result<u64> {
        let semaphore = backfill_common::redis_semaphore::RedisSemaphore::connect(
            &self.services.redis,
            &self.prefix,
            Duration::from_secs(30),
            "bench-probe",
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        semaphore
            .peak_holders(&self.warehouse)
            .await
            .map_err(|e| anyhow!("{e}"))
    }

    /// Stops the workers (SIGTERM: finish the task in hand, exit 0) and collects what each
    /// used, then deletes the cluster's queues, exchanges and Redis keys.
    pub async fn stop(mut self) -> Result<Vec<Finished>> {
        let workers = std::mem::take(&mut self.workers);
        for worker in &workers {
            worker.signal(libc::SIGTERM);
        }
        let mut finished = Vec::new();
        let mut failure = None;
        for worker in workers {
            match worker.wait(Duration::from_secs(30)).await {
                Ok(done) => finished.push(done),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        self.cleanup().await?;
        match failure {
            Some(error) => Err(error),
            None => Ok(finished),
        }
    }

    async fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        delete_cluster_state(&self.services, &self.prefix, &self.warehouse).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Killed (by Running's drop) before the queues go.
        self.workers.clear();
        if !self.cleaned {
            let (services, prefix, warehouse) = (
                self.services.clone(),
                self.prefix.clone(),
                self.warehouse.clone(),
            );
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(delete_cluster_state(&services, &prefix, &warehouse))
            })
            .join();
        }
    }
}

/// Deletes the warehouse's task and dead-letter queues, the exchanges, any result queue left
/// behind, and every Redis key under the prefix.
async fn delete_cluster_state(services: &Services, prefix: &str, warehouse: &str) -> Result<()> {
    let broker = Broker::connect(&services.broker, prefix, services.keyring(), 5)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let _ = broker.delete_topology(warehouse).await;
    broker.close().await;
    let client = redis::Client::open(services.redis.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut connection)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut connection)
            .await?;
    }
    Ok(())
}
