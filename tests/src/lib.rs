//! Test harness shared by the integration tests: throwaway PostgreSQL databases and SQLite
//! files with unique names, the `backfill` binary, and data assertions (checksums,
//! duplicates). Tests that need PostgreSQL fail loudly when it is not running; they never
//! skip.

pub mod cluster;
pub mod otlp;
pub mod services;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use backfill_common::control::ControlStore;
use backfill_common::ident::{Ident, TableName};
use backfill_common::warehouse::{Checksum, Warehouse, execute, fetch_all, fetch_one, get};

/// The local Redis; override with BACKFILL_TEST_REDIS_URL.
pub fn redis_url() -> String {
    std::env::var("BACKFILL_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// The local RabbitMQ; override with BACKFILL_TEST_BROKER_URL.
pub fn broker_url() -> String {
    std::env::var("BACKFILL_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A name no other test run uses, for Redis key prefixes and queue names.
pub fn unique_prefix(what: &str) -> String {
    format!(
        "bft-{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Admin URL of the local PostgreSQL; override with BACKFILL_TEST_PG_URL.
pub fn pg_admin_url() -> String {
    std::env::var("BACKFILL_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Admin URL of the local MariaDB / MySQL; override with BACKFILL_TEST_MYSQL_URL.
pub fn mysql_admin_url() -> String {
    std::env::var("BACKFILL_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_string())
}

/// A database that exists for one test and is dropped (or deleted) afterwards.
pub struct TestDatabase {
    pub url: String,
    kind: Kind,
}

enum Kind {
    Postgres { name: String },
    Mysql { name: String },
    Sqlite { _dir: tempfile::TempDir },
}

impl TestDatabase {
    pub async fn postgres() -> TestDatabase {
        let name = format!(
            "bf_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let admin = Warehouse::connect(&pg_admin_url(), 2)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL must be running at {} for this test: {e}",
                    pg_admin_url()
                )
            });
        let mut conn = admin.acquire().await.expect("admin connection");
        execute(&mut conn, &format!("CREATE DATABASE {name}"), &[])
            .await
            .expect("create test database");
        drop(conn);
        admin.close().await;
        let base = pg_admin_url();
        let url = match base.rfind('/') {
            Some(slash) => format!("{}/{name}", &base[..slash]),
            None => panic!("cannot derive a database URL from {base}"),
        };
        TestDatabase {
            url,
            kind: Kind::Postgres { name },
        }
    }

    /// A fresh database on the local MariaDB (utf8mb4 with its default collation, as MySQL 8
    /// creates them).
    pub async fn mysql() -> TestDatabase {
        let name = format!(
            "bf_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let admin = Warehouse::connect(&mysql_admin_url(), 2)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "MariaDB or MySQL must be running at {} for this test: {e}",
                    mysql_admin_url()
                )
            });
        let mut conn = admin.acquire().await.expect("admin connection");
        execute(
            &mut conn,
            &format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"),
            &[],
        )
        .await
        .expect("create test database");
        drop(conn);
        admin.close().await;
        let base = mysql_admin_url();
        let url = match base.rfind('/') {
            Some(slash) => format!("{}/{name}", &base[..slash]),
            None => panic!("cannot derive a database URL from {base}"),
        };
        TestDatabase {
            url,
            kind: Kind::Mysql { name },
        }
    }

    pub fn sqlite() -> TestDatabase {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("warehouse.db").display()
        );
        TestDatabase {
            url,
            kind: Kind::Sqlite { _dir: dir },
        }
    }

    /// Dates are typed (PostgreSQL), not ISO text (SQLite): literals compare as
    /// `CAST('2024-03-01' AS date)`.
    pub fn typed_dates(&self) -> bool {
        !matches!(self.kind, Kind::Sqlite { .. })
    }

    /// A fresh database of the named engine (`sqlite`, `postgres`), as the conformance
    /// suite's macro asks for one.
    pub async fn of(engine: &str) -> TestDatabase {
        match engine {
            "sqlite" => TestDatabase::sqlite(),
            "postgres" => TestDatabase::postgres().await,
            "mysql" => TestDatabase::mysql().await,
            other => panic!("no test database for engine `{other}`"),
        }
    }

    /// The engine's name, as `on_engines!` spells it.
    pub fn engine(&self) -> &'static str {
        match self.kind {
            Kind::Postgres { .. } => "postgres",
            Kind::Mysql { .. } => "mysql",
            Kind::Sqlite { .. } => "sqlite",
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }

    pub async fn warehouse(&self) -> Warehouse {
        Warehouse::connect(&self.url, 4)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, drop) = match &self.kind {
            Kind::Postgres { name } => (
                pg_admin_url(),
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ),
            Kind::Mysql { name } => (mysql_admin_url(), format!("DROP DATABASE IF EXISTS {name}")),
            Kind::Sqlite { .. } => return,
        };
        {
            // Drop runs outside any runtime guarantee: use a private one on its own thread.
            let handle = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    if let Ok(admin) = Warehouse::connect(&admin_url, 2).await
                        && let Ok(mut conn) = admin.acquire().await
                    {
                        let _ = execute(&mut conn, &drop, &[]).await;
                    }
                });
            });
            let _ = handle.join();
        }
    }
}

/// The conformance suite: runs a scenario (an `async fn(TestDatabase)`) once per engine, as a
/// module named after the scenario with one test per engine:
/// `on_engines!(mini_challenge_end_to_end: sqlite, postgres);` makes
/// `mini_challenge_end_to_end::sqlite` and `::postgres`. A new engine is one more name on
/// the lines of the scenarios it passes.
#[macro_export]
macro_rules! on_engines {
    ($scenario:ident: $($engine:ident),+ $(,)?) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $engine() {
                    super::$scenario($crate::TestDatabase::of(stringify!($engine)).await).await;
                }
            )+
        }
    };
}

pub fn table(name: &str) -> TableName {
    TableName::parse(name).expect("valid table name")
}

/// Content checksum for comparing tables with each other: always the row-text hash, so two
/// tables whose column types differ (numeric(12,2) against numeric) compare by what they
/// hold, not by which hash the product would pick for each.
pub async fn checksum(warehouse: &Warehouse, table_name: &str, filter: Option<&str>) -> Checksum {
    let mut conn = warehouse.acquire().await.expect("connection");
    warehouse
        .checksum_by(
            &mut conn,
            &table(table_name),
            filter,
            &[],
            backfill_common::warehouse::RowHash::Text,
        )
        .await
        .expect("checksum")
}

/// The checksum the product itself computes and records for a table (hash method chosen by
/// its column types): for comparing with checksums in the control store.
pub async fn product_checksum(
    warehouse: &Warehouse,
    table_name: &str,
    filter: Option<&str>,
) -> String {
    let mut conn = warehouse.acquire().await.expect("connection");
    warehouse
        .checksum(&mut conn, &table(table_name), filter, &[])
        .await
        .expect("checksum")
        .to_string()
}

/// Number of key values that occur more than once.
pub async fn duplicate_keys(warehouse: &Warehouse, table_name: &str, key: &str) -> i64 {
    let mut conn = warehouse.acquire().await.expect("connection");
    let row = fetch_one(
        &mut conn,
        &format!("SELECT count(*) FROM (SELECT {key} FROM {table_name} GROUP BY {key} HAVING count(*) > 1) AS d"),
        &[],
    )
    .await
    .expect("duplicate query");
    get(&row, 0).expect("count")
}

pub async fn count(warehouse: &Warehouse, sql: &str) -> i64 {
    let mut conn = warehouse.acquire().await.expect("connection");
    let row = fetch_one(&mut conn, sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    get(&row, 0).expect("count")
}

/// The names of a table's indexes with the constraint each backs (`-` for none), sorted.
pub async fn index_names(warehouse: &Warehouse, table: &str) -> Vec<String> {
    let mut conn = warehouse.acquire().await.unwrap();
    let rows = fetch_all(
        &mut conn,
        "SELECT CAST(ic.relname AS text) || ' ' || coalesce(CAST(con.conname AS text), '-') \
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid \
         WHERE i.indrelid = CAST($1 AS regclass) ORDER BY 1",
        &[table.to_string().into()],
    )
    .await
    .unwrap();
    rows.iter().map(|r| get(r, 0).unwrap()).collect()
}

/// The mini challenge published once: every partition of the run done and written exactly
/// once, `fact_order_items` equal to `expected_order_items` without a duplicate key, and one
/// archive.
pub async fn assert_mini_challenge_published_once(warehouse: &Warehouse, run_id: &str) {
    let store = control_store(warehouse);
    for p in store.partitions(run_id).await.unwrap() {
        assert_eq!(
            (p.state, p.times_applied),
            (backfill_common::control::PartitionState::Done, 1),
            "partition {} applied once",
            p.partition_key
        );
    }
    assert_eq!(
        checksum(warehouse, "fact_order_items", None).await,
        checksum(warehouse, "expected_order_items", None).await
    );
    assert_eq!(
        duplicate_keys(warehouse, "fact_order_items", "order_id, item_id").await,
        0
    );
    let archives: Vec<_> = store
        .archives()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.run_id == run_id)
        .collect();
    assert_eq!(archives.len(), 1, "published exactly once: {archives:?}");
}

/// A task of the mini challenge's warehouse `demo` for the day 2024-03-04 of run `run_id`, under a
/// spec no run has (all zeros), first attempt and token, replying nowhere: what tests publish
/// to a worker that must refuse it or cannot run it.
pub fn unknown_spec_task(run_id: &str) -> backfill_common::envelope::TaskMessage {
    backfill_common::envelope::TaskMessage {
        task: backfill_common::control::PartitionTask {
            run_id: run_id.into(),
            spec_hash: "0".repeat(64),
            partition_key: "2024-03-04".into(),
            range_start: "2024-03-04".into(),
            range_end: "2024-03-05".into(),
            attempt: 1,
            fencing_token: 1,
        },
        warehouse: "demo".into(),
        control_schema: "backfill".into(),
        reply_to: "nowhere".into(),
    }
}

pub async fn exec(warehouse: &Warehouse, sql: &str) {
    let mut conn = warehouse.acquire().await.expect("connection");
    execute(&mut conn, sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Runs `sql` on a session the test holds (a transaction left open across calls).
pub async fn exec_on(session: &mut dyn backfill_common::warehouse::Session, sql: &str) {
    execute(session, sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub async fn table_exists(warehouse: &Warehouse, table_name: &str) -> bool {
    let mut conn = warehouse.acquire().await.expect("connection");
    warehouse
        .table_exists(&mut conn, &table(table_name))
        .await
        .expect("table_exists")
}

pub fn control_store(warehouse: &Warehouse) -> ControlStore {
    ControlStore::new(warehouse.clone(), Ident::new("backfill").expect("ident"))
}

/// A binary of this workspace (`backfill`, `backfill-worker`), built on first use when the
/// test runner did not build it.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILD: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir")
        .to_path_buf();
    let bin = profile_dir.join(name);
    if !bin.exists() {
        BUILD.get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--bins"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    assert!(
        bin.exists(),
        "the {name} binary is missing at {}",
        bin.display()
    );
    bin
}

/// The `backfill` binary.
pub fn backfill_bin() -> PathBuf {
    workspace_bin("backfill")
}

/// The mini challenge spec with changes applied as (from, to) text replacements.
pub fn mini_challenge_spec(replacements: &[(&str, &str)]) -> String {
    let mut text = backfill_coordinator::demo::MINI_CHALLENGE_SPEC.to_string();
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "the mini challenge spec has no `{from}`"
        );
        text = text.replace(from, to);
    }
    text
}

/// Loads `bench/reference-workload.sql` (the benchmark's data: `staging.orders` and the
/// production table `analytics.fact_orders` computed with the old pricing) at a small scale.
pub async fn load_reference_workload(warehouse: &Warehouse, days: u32, per_day: u32) {
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../bench/reference-workload.sql"
    ))
    .expect("the reference workload's SQL");
    let sql = sql
        .replace(":days", &days.to_string())
        .replace(":per_day", &per_day.to_string());
    let mut conn = warehouse.acquire().await.expect("connection");
    for statement in sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.lines().all(|l| l.trim_start().starts_with("--")))
    {
        execute(&mut conn, statement, &[])
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// Rows and an order-independent hash of a table with the reference workload's columns,
/// without `updated_at` (the source stamps now()).
pub async fn reference_content(warehouse: &Warehouse, table_name: &str) -> (i64, String) {
    let mut conn = warehouse.acquire().await.expect("connection");
    let row = fetch_one(
        &mut conn,
        &format!(
            "SELECT count(*), CAST(sum(hashtextextended(CAST(ROW(order_id, order_date, customer_id, sku, quantity, revenue) AS text), 0)) AS text) FROM {table_name}"
        ),
        &[],
    )
    .await
    .expect("reference content");
    (get(&row, 0).expect("count"), get(&row, 1).expect("hash"))
}

/// Waits for a process at most `within`: a hung process fails the test at once, killed, with
/// what it printed, instead of running into the test runner's timeout.
pub fn wait_within(mut child: Child, within: Duration, what: &str) -> Output {
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the process") {
            break Some(status);
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output {
        status: status.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(9)),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(
        status.is_some(),
        "{what} did not finish within {within:?}; killed. It printed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command to its end, at most `within` (see `wait_within`).
pub fn output_within(command: &mut Command, within: Duration, what: &str) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    wait_within(child, within, what)
}
