//! A small cluster sandbox: real `backfill-worker` processes on loopback, against the real
//! RabbitMQ, Redis and PostgreSQL (the shared servers, or private ones: `with_services`), with
//! a unique queue prefix so runs never collide, and cleanup of queues and keys afterwards.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backfill_common::broker::Broker;
use backfill_common::envelope::{Keyring, SigningKey};

use crate::{broker_url, redis_url, unique_prefix, workspace_bin};

pub const HMAC_KEY: &str = "test-cluster-hmac-key-0123456789";

pub struct Cluster {
    pub prefix: String,
    pub warehouse: String,
    pub warehouse_url: String,
    pub broker_url: String,
    pub redis_url: String,
    pub workers: Vec<Child>,
    log_dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster on the shared RabbitMQ and Redis.
    pub fn new(warehouse: &str, warehouse_url: &str) -> Cluster {
        Cluster::with_services(warehouse, warehouse_url, &broker_url(), &redis_url())
    }

    /// A cluster on the given RabbitMQ and Redis (e.g. `services::PrivateBroker`'s).
    pub fn with_services(
        warehouse: &str,
        warehouse_url: &str,
        broker_url: &str,
        redis_url: &str,
    ) -> Cluster {
        Cluster {
            prefix: unique_prefix("cluster"),
            warehouse: warehouse.to_string(),
            warehouse_url: warehouse_url.to_string(),
            broker_url: broker_url.to_string(),
            redis_url: redis_url.to_string(),
            workers: Vec::new(),
            log_dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn keyring() -> Keyring {
        Keyring::new(SigningKey::new("k1", HMAC_KEY.as_bytes().to_vec()).expect("key"))
    }

    /// Environment shared by the coordinator and the workers.
    pub fn env(&self, command: &mut Command) {
        command
            .env("BACKFILL_BROKER_URL", &self.broker_url)
            .env("BACKFILL_REDIS_URL", &self.redis_url)
            .env("BACKFILL_QUEUE_PREFIX", &self.prefix)
            .env("BACKFILL_HMAC_KEY", HMAC_KEY)
            .env("BACKFILL_HMAC_KEY_ID", "k1")
            .env(
                backfill_common::config::warehouse_env_var(&self.warehouse),
                &self.warehouse_url,
            )
            .env_remove("BACKFILL_WAREHOUSE_URL");
    }

    /// Starts a worker process; its log goes to a file of the sandbox.
    pub fn start_worker(&mut self, extra: &[(&str, &str)]) -> u32 {
        let index = self.workers.len();
        let log = std::fs::File::create(self.log_dir.path().join(format!("worker-{index}.log")))
            .expect("log file");
        let mut command = Command::new(workspace_bin("backfill-worker"));
        self.env(&mut command);
        command
            .env("BACKFILL_WORKER_WAREHOUSES", &self.warehouse)
            .env(
                "BACKFILL_WORKER_ID",
                format!("{}-worker-{index}", self.prefix),
            )
            .env("BACKFILL_LEASE_TTL", "3s")
            .env("BACKFILL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command.spawn().expect("start backfill-worker");
        let pid = child.id();
        self.workers.push(child);
        pid
    }

    /// A path in the cluster's own temporary directory (removed with the cluster), e.g. for
    /// a spec file.
    pub fn log_path(&self, name: &str) -> std::path::PathBuf {
        self.log_dir.path().join(name)
    }

    pub fn worker_log(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_dir.path().join(format!("worker-{index}.log")))
            .unwrap_or_default()
    }

    /// A coordinator command: `backfill <args>` with the cluster's environment.
    pub fn backfill(&self, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_bin("backfill"));
        self.env(&mut command);
        command.args(args);
        command
    }

    pub async fn broker(&self) -> Broker {
        Broker::connect(
            &self.broker_url,
            &self.prefix,
            Self::keyring(),
            backfill_common::queue::DEFAULT_DELIVERY_LIMIT,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ must be running at {} for this test: {e}",
                self.broker_url
            )
        })
    }

    /// Sends SIGTERM to a worker and waits for it to exit; returns its exit code.
    pub fn terminate(&mut self, index: usize, within: Duration) -> Option<i32> {
        let child = &mut self.workers[index];
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self, index: usize) {
        let _ = self.workers[index].kill();
        let _ = self.workers[index].wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        let prefix = self.prefix.clone();
        let warehouse = self.warehouse.clone();
        let warehouse_url = self.warehouse_url.clone();
        let (broker_url, redis_url) = (self.broker_url.clone(), self.redis_url.clone());
        let handle = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                // A coordinator deletes its run's result queue when it is done; one that was
                // killed, or a test that failed, leaves it: delete those of every known run.
                let connect = backfill_common::warehouse::Warehouse::connect(&warehouse_url, 2);
                let runs = match tokio::time::timeout(Duration::from_secs(3), connect).await {
                    Ok(Ok(store)) => {
                        let runs = crate::control_store(&store)
                            .all_runs()
                            .await
                            .unwrap_or_default();
                        store.close().await;
                        runs
                    }
                    _ => Vec::new(),
                };
                if let Ok(broker) =
                    Broker::connect(&broker_url, &prefix, Cluster::keyring(), 5).await
                {
                    let _ = broker.delete_topology(&warehouse).await;
                    for run in runs {
                        let _ = broker
                            .delete_queue(&broker.topology.results_queue(&run.run_id))
                            .await;
                    }
                    broker.close().await;
                }
                if let Ok(client) = redis::Client::open(redis_url)
                    && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}:*"))
                        .query_async(&mut connection)
                        .await
                        .unwrap_or_default();
                    for key in keys {
                        let _: Result<(), _> = redis::cmd("DEL")
                            .arg(key)
                            .query_async(&mut connection)
                            .await;
                    }
                }
            });
        });
        let _ = handle.join();
    }
}
