//! What the numbers were measured on: CPU, memory, server versions, the load, the date and the
//! commit. Everything is read from the machine itself at run time.

use std::process::Command;

use anyhow::Result;

#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub ram_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub rabbitmq: String,
    pub redis: String,
    pub date: String,
    pub commit: String,
    pub build: &'static str,
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn ram_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn commit() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let hash = command_output("git", &["-C", root, "rev-parse", "--short=12", "HEAD"])
        .unwrap_or_else(|| "unknown".into());
    let dirty = command_output(
        "git",
        &["-C", root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_some();
    if dirty {
        format!("{hash} (with uncommitted changes)")
    } else {
        hash
    }
}

/// RabbitMQ says its version to `rabbitmqctl version`; when that tool cannot talk to the
/// node (another host, no cookie), the report says so rather than guessing.
fn rabbitmq_version() -> String {
    command_output("rabbitmqctl", &["version"])
        .and_then(|text| text.lines().last().map(str::to_string))
        .unwrap_or_else(|| "unknown (rabbitmqctl could not ask the node)".into())
}

async fn redis_version(url: &str) -> Result<String> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

pub async fn describe(pg_admin_url: &str, redis_url: &str) -> Result<Machine> {
    let postgres = crate::pg::server_version(pg_admin_url).await?;
    Ok(Machine {
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        ram_gib: ram_gib(),
        kernel: command_output("uname", &["-sr"]).unwrap_or_else(|| "unknown".into()),
        postgres,
        rabbitmq: rabbitmq_version(),
        redis: redis_version(redis_url).await?,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        commit: commit(),
        build: if cfg!(debug_assertions) {
            "debug (smoke size only: timings mean nothing)"
        } else {
            "release"
        },
    })
}
