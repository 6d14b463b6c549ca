//! Secrets never leave the process that holds them. One test runs a distributed backfill
//! (coordinator and two workers logging at debug level) with a warehouse password and a known
//! HMAC key, through a failing partition, its dead letter, `status` (text and JSON), `serve`,
//! a resubmit and the publish; then the failing paths: a warehouse host that refuses
//! connections, a database that does not exist, an unreachable broker and Redis (both with
//! passwords), a worker that cannot reach its warehouse, a config file that does not parse, a
//! spec with a URL where its warehouse name goes, a command line clap refuses. Every output of
//! every process, every dead letter, every row of the control store and every API answer is
//! searched for every secret (and for a panic). Traces are searched by
//! `observability::one_trace_across_coordinator_and_workers`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backfill_coordinator::demo;
use backfill_tests::cluster::Cluster;
use backfill_tests::*;

/// The warehouse password, `Pw-7Hq2x/s3cr@t`: its `/` and `@` are percent-encoded in the URL,
/// so both the raw and the encoded form are searched for (`7Hq2x`, `s3cr@t`).
const WAREHOUSE_PASSWORD_ENCODED: &str = "Pw-7Hq2x%2Fs3cr%40t";
const BROKER_PASSWORD: &str = "brokerpw-9zK4";
const REDIS_PASSWORD: &str = "redispw-Vb81";
const SPEC_URL_PASSWORD: &str = "specurlpw-Tq3";

/// Text that must never appear: each secret, or a telling part of it.
const NEEDLES: [&str; 6] = [
    "7Hq2x",
    "s3cr@t",
    "hmac-key-0123456789",
    "brokerpw-9zK4",
    "redispw-Vb81",
    "specurlpw-Tq3",
];

#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    fn command(&mut self, what: &str, output: &std::process::Output) {
        self.add(
            format!("{what} (stdout)"),
            String::from_utf8_lossy(&output.stdout),
        );
        self.add(
            format!("{what} (stderr)"),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    /// Every secret and every panic found, with where.
    fn leaks(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (what, text) in &self.0 {
            for needle in NEEDLES {
                if let Some(at) = text.find(needle) {
                    let start = text[..at]
                        .char_indices()
                        .rev()
                        .nth(80)
                        .map_or(0, |(i, _)| i);
                    let end = (at + needle.len() + 80).min(text.len());
                    let end = (end..=text.len())
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap_or(text.len());
                    found.push(format!("{what}: `{needle}` in …{}…", &text[start..end]));
                }
            }
            if text.contains("panicked at") {
                found.push(format!("{what}: a panic:\n{text}"));
            }
        }
        found
    }
}

fn url_with_password(db: &TestDatabase) -> String {
    db.url.replacen(
        "postgres@",
        &format!("postgres:{WAREHOUSE_PASSWORD_ENCODED}@"),
        1,
    )
}

fn backfill_command(cluster: &Cluster, args: &[&str]) -> Command {
    let mut command = cluster.backfill(args);
    command.env("BACKFILL_LOG", "debug").stdin(Stdio::null());
    command
}

fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("serve answers");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// `backfill serve` on a free port: its API and metrics pages, and its own output.
fn serve_pages(cluster: &Cluster, run_id: &str, outputs: &mut Outputs) {
    let mut serve = backfill_command(
        cluster,
        &["serve", "--listen", "127.0.0.1:0", "--warehouse", "demo"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let started = Instant::now();
    let mut log = String::new();
    let address = loop {
        let line = receiver
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("serve did not start:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{log}");
    };
    for path in [
        "/api/runs".to_string(),
        format!("/api/runs/{run_id}"),
        "/metrics".to_string(),
    ] {
        let page = http_get(&address, &path);
        assert!(
            page.starts_with("HTTP/1.") && page.contains(" 200 "),
            "{path}: {page}"
        );
        outputs.add(format!("serve {path}"), page);
    }
    let _ = serve.kill();
    let _ = serve.wait();
    while let Ok(line) = receiver.try_recv() {
        log.push_str(&line);
        log.push('\n');
    }
    outputs.add("serve (stderr)", log);
}

/// Every row of every control table, as JSON text.
async fn control_store_rows(warehouse: &backfill_common::warehouse::Warehouse) -> String {
    let mut text = String::new();
    for table in [
        "runs",
        "specs",
        "partitions",
        "audits",
        "archives",
        "events",
    ] {
        let mut conn = warehouse.acquire().await.unwrap();
        let rows = backfill_common::warehouse::fetch_all(
            &mut conn,
            &format!("SELECT CAST(row_to_json(t) AS text) FROM backfill.{table} AS t"),
            &[],
        )
        .await
        .unwrap();
        for row in rows {
            text.push_str(&backfill_common::warehouse::get::<String>(&row, 0).unwrap());
            text.push('\n');
        }
    }
    text
}

/// A command that must fail; its outputs are kept.
fn failing(what: &str, mut command: Command, outputs: &mut Outputs) {
    let output = output_within(&mut command, Duration::from_secs(60), what);
    assert!(
        !output.status.success(),
        "{what} should fail: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    outputs.command(what, &output);
}

/// Starts a command that must fail but takes its time (a refused connection is retried until
/// the pool's 15 s acquire timeout); `finish_failing` collects it.
fn start_failing(what: &str, mut command: Command) -> (String, std::process::Child) {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (what.to_string(), child)
}

fn finish_failing(started: Vec<(String, std::process::Child)>, outputs: &mut Outputs) {
    for (what, child) in started {
        let output = wait_within(child, Duration::from_secs(60), &what);
        assert!(
            !output.status.success(),
            "{what} should fail: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.command(&what, &output);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_output_of_a_run_or_its_failures() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    exec(
        &warehouse,
        "CREATE TABLE divisor (order_date date PRIMARY KEY, d integer NOT NULL)",
    )
    .await;
    exec(&warehouse, "INSERT INTO divisor SELECT DATE '2024-03-01' + g, CASE WHEN g = 4 THEN 0 ELSE 1 END FROM generate_series(0, 9) g").await;
    let mut outputs = Outputs::default();
    let debug = ("BACKFILL_LOG", "debug");
    let mut cluster = Cluster::new("demo", &url_with_password(&db));
    cluster.start_worker(&[debug]);
    cluster.start_worker(&[debug, ("BACKFILL_LOG_FORMAT", "json")]);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("broken.toml");
    std::fs::write(
        &spec,
        mini_challenge_spec(&[(
            "SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at\nFROM staging_order_items\n",
            "SELECT order_id, item_id, order_date, sku, quantity / (SELECT d FROM divisor v WHERE v.order_date = s.order_date) AS quantity, unit_price, updated_at\nFROM staging_order_items s\n",
        )]),
    )
    .unwrap();
    let spec = spec.to_str().unwrap().to_string();

    // The slow failures run meanwhile: a warehouse host that refuses connections (with the
    // password), and a worker that cannot reach Redis (with its password).
    let refused = format!("postgres://postgres:{WAREHOUSE_PASSWORD_ENCODED}@127.0.0.1:1/db");
    let mut slow_failures = Vec::new();
    let mut command = Command::new(backfill_bin());
    command
        .args(["run", &spec, "--no-progress"])
        .env("BACKFILL_WAREHOUSE_URL", &refused)
        .env("BACKFILL_LOG", "debug");
    slow_failures.push(start_failing("run against a refused warehouse", command));
    let mut command = Command::new(backfill_bin());
    command.args(["status", "--json", "--warehouse-url", &refused]);
    slow_failures.push(start_failing("status against a refused warehouse", command));
    let mut command = Command::new(workspace_bin("backfill-worker"));
    cluster.env(&mut command);
    command
        .env(
            "BACKFILL_REDIS_URL",
            format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1"),
        )
        .env("BACKFILL_WORKER_WAREHOUSES", "demo")
        .env("BACKFILL_LOG", "debug");
    slow_failures.push(start_failing("worker with an unreachable Redis", command));

    // The run: one partition fails (division by zero) and is dead-lettered.
    let output = output_within(
        &mut backfill_command(&cluster, &["run", &spec, "--no-progress"]),
        Duration::from_secs(60),
        "the run",
    );
    outputs.command("run", &output);
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let run_id = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0)
        .run_id;
    let broker = cluster.broker().await;
    let dead = broker.dead_letters("demo", 100).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    outputs.add("dead letters", format!("{dead:?}"));
    for args in [
        vec!["status", run_id.as_str(), "--warehouse", "demo"],
        vec!["status", run_id.as_str(), "--json", "--warehouse", "demo"],
        vec!["status", "--warehouse", "demo"],
        vec!["status", "--json", "--warehouse", "demo"],
        vec!["plan", spec.as_str()],
    ] {
        let output = output_within(
            &mut backfill_command(&cluster, &args),
            Duration::from_secs(60),
            &args.join(" "),
        );
        assert!(output.status.success(), "{args:?}: {output:?}");
        outputs.command(&args.join(" "), &output);
    }
    serve_pages(&cluster, &run_id, &mut outputs);

    // Fixed, resubmitted, published.
    exec(&warehouse, "UPDATE divisor SET d = 1").await;
    let output = output_within(
        &mut backfill_command(
            &cluster,
            &[
                "resubmit",
                &run_id,
                "--dead-lettered",
                "--no-progress",
                "--warehouse",
                "demo",
            ],
        ),
        Duration::from_secs(60),
        "the resubmit",
    );
    outputs.command("resubmit", &output);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for args in [
        vec!["archives", "--warehouse", "demo"],
        vec!["status", run_id.as_str(), "--json", "--warehouse", "demo"],
    ] {
        let output = output_within(
            &mut backfill_command(&cluster, &args),
            Duration::from_secs(60),
            &args.join(" "),
        );
        outputs.command(&args.join(" "), &output);
    }
    outputs.add("control store", control_store_rows(&warehouse).await);
    assert!(
        outputs
            .0
            .iter()
            .any(|(_, text)| text.contains("division by zero")),
        "the failure's message was captured"
    );

    // Failing paths. A database that does not exist, with the password (a host that refuses
    // connections was started at the beginning).
    let missing = url_with_password(&db).replace("/bf_test_", "/bf_missing_");
    let mut command = Command::new(backfill_bin());
    command
        .args(["run", &spec, "--no-progress"])
        .env("BACKFILL_WAREHOUSE_URL", &missing)
        .env("BACKFILL_LOG", "debug");
    failing("run against a missing database", command, &mut outputs);
    let mut command = Command::new(backfill_bin());
    command.args(["status", "--json", "--warehouse-url", &missing]);
    failing("status against a missing database", command, &mut outputs);
    // clap refuses the command line; the URL was on it.
    let mut command = Command::new(backfill_bin());
    command.args(["status", "--warehouse-url", &refused, "--no-such-flag"]);
    failing("clap error", command, &mut outputs);
    // A coordinator that cannot reach the broker, starting a run (of another spec).
    let unreachable_broker = format!("amqp://guest:{BROKER_PASSWORD}@127.0.0.1:1/%2f");
    let renamed = dir.path().join("renamed.toml");
    std::fs::write(
        &renamed,
        std::fs::read_to_string(&spec).unwrap().replacen(
            "name = \"fix_doubled_quantity\"",
            "name = \"renamed\"",
            1,
        ),
    )
    .unwrap();
    let mut command = backfill_command(
        &cluster,
        &["run", renamed.to_str().unwrap(), "--no-progress"],
    );
    command.env("BACKFILL_BROKER_URL", &unreachable_broker);
    failing("run with an unreachable broker", command, &mut outputs);
    let (_, shown) = outputs.0.last().unwrap();
    assert!(
        shown.contains("amqp://guest:***@127.0.0.1:1"),
        "the broker's URL is named, redacted: {shown}"
    );
    // A worker that cannot reach the broker keeps trying.
    let mut command = Command::new(workspace_bin("backfill-worker"));
    cluster.env(&mut command);
    let mut retrying = command
        .env("BACKFILL_BROKER_URL", &unreachable_broker)
        .env("BACKFILL_WORKER_WAREHOUSES", "demo")
        .env("BACKFILL_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A worker whose warehouse refuses connections, handed a task: it hands the task back
    // (warehouse unavailable) and says why.
    let mut unreachable_warehouse = Cluster::new("demo", &refused);
    unreachable_warehouse.start_worker(&[debug]);
    let other_broker = unreachable_warehouse.broker().await;
    other_broker.declare_warehouse("demo").await.unwrap();
    let task = unknown_spec_task(&run_id);
    other_broker.publish_task(&task).await.unwrap();
    let started = Instant::now();
    while !unreachable_warehouse
        .worker_log(0)
        .contains("cannot reach the task's warehouse")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            unreachable_warehouse.worker_log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    other_broker.close().await;
    unreachable_warehouse.kill(0);
    outputs.add(
        "worker with an unreachable warehouse",
        unreachable_warehouse.worker_log(0),
    );
    let _ = retrying.kill();
    let output = retrying.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(log.contains("reconnecting"), "{log}");
    outputs.command("worker with an unreachable broker", &output);
    // A config file that does not parse, holding the password.
    let config = dir.path().join("backfill.toml");
    std::fs::write(
        &config,
        format!("[warehouses.demo]\nurl = \"{refused}\"\nthis is not toml\n"),
    )
    .unwrap();
    let mut command = Command::new(backfill_bin());
    command
        .args(["status", "--warehouse", "demo", "--config"])
        .arg(&config);
    failing("config file that does not parse", command, &mut outputs);
    // The URL pasted where the spec names its warehouse.
    let pasted = dir.path().join("pasted.toml");
    std::fs::write(
        &pasted,
        mini_challenge_spec(&[(
            "name = \"demo\"",
            &format!("name = \"postgres://admin:{SPEC_URL_PASSWORD}@db.internal/analytics\""),
        )]),
    )
    .unwrap();
    let mut command = Command::new(backfill_bin());
    command.arg("plan").arg(&pasted);
    failing("spec with a URL as warehouse name", command, &mut outputs);

    finish_failing(slow_failures, &mut outputs);

    // Every process's own log, then the search.
    for index in 0..cluster.workers.len() {
        assert_eq!(cluster.terminate(index, Duration::from_secs(15)), Some(0));
        outputs.add(format!("worker {index}"), cluster.worker_log(index));
    }
    broker.close().await;
    let captured: usize = outputs.0.iter().map(|(_, text)| text.len()).sum();
    assert!(
        captured > 50_000,
        "debug logs and outputs were captured ({captured} bytes)"
    );
    let leaks = outputs.leaks();
    assert!(
        leaks.is_empty(),
        "{} leak(s) in {} outputs:\n{}",
        leaks.len(),
        outputs.0.len(),
        leaks.join("\n")
    );
}
