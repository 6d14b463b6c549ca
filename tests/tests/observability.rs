//! Observability of a distributed backfill, with real processes: one trace across the
//! coordinator and two workers collected by an OTLP receiver running in the test (gRPC for some
//! processes, HTTP for the other), structured JSON logs with one line per state change, and
//! Prometheus metrics scraped during and after a run that match the control store. Secrets
//! given to the processes (a warehouse password, the HMAC key) appear in none of it.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backfill_common::control::PartitionState;
use backfill_coordinator::demo;
use backfill_tests::cluster::{Cluster, HMAC_KEY};
use backfill_tests::otlp::{OtlpReceiver, ReceivedSpan};
use backfill_tests::*;

const PASSWORD: &str = "pw-must-not-leak-7f3a";

/// The test database's URL with a password in it (trust authentication ignores it), so every
/// output can be searched for it.
fn url_with_password(db: &TestDatabase) -> String {
    db.url
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1)
}

fn mini_challenge_spec(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    spec
}

async fn wait_for_worker_ready(cluster: &Cluster, index: usize) {
    let started = Instant::now();
    while !cluster.worker_log(index).contains("worker ready") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "worker {index} never became ready:\n{}",
            cluster.worker_log(index)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [PASSWORD, HMAC_KEY] {
        assert!(
            !text.contains(secret),
            "{what} contains a secret ({secret}):\n{text}"
        );
    }
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
        .collect()
}

fn descendants<'a>(spans: &'a [ReceivedSpan], root: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(span) = frontier.pop() {
        for child in children(spans, span) {
            found.push(child);
            frontier.push(child);
        }
    }
    found
}

/// A coordinator exporting over gRPC and two workers (one over HTTP, one over gRPC, named by
/// the two standard variables): one trace id across the three processes with the shape
/// run -> plan / shadow / partitions (-> semaphore wait, claim, merge -> checks, checkpoint)
/// / barrier / audit (-> each audit) / publish; JSON logs with a state-change line per
/// partition transition; no secret anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_coordinator_and_workers() {
    let receiver = OtlpReceiver::start().await;
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &url_with_password(&db));
    let fast_export = ("OTEL_BSP_SCHEDULE_DELAY", "200");
    cluster.start_worker(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            receiver.http_endpoint.as_str(),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "bf-worker-http"),
        ("BACKFILL_LOG_FORMAT", "json"),
        fast_export,
    ]);
    cluster.start_worker(&[
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            receiver.grpc_endpoint.as_str(),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=bf-worker-grpc,deployment.environment=test",
        ),
        ("BACKFILL_LOG_FORMAT", "json"),
        fast_export,
    ]);
    wait_for_worker_ready(&cluster, 0).await;
    wait_for_worker_ready(&cluster, 1).await;

    let dir = tempfile::tempdir().unwrap();
    let spec = mini_challenge_spec(&dir);
    let output = cluster
        .backfill(&[
            "run",
            spec.to_str().unwrap(),
            "--no-progress",
            "--log-format",
            "json",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc_endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("BACKFILL_LOG", "info")
        .output()
        .unwrap();
    let coordinator_log = String::from_utf8_lossy(&output.stderr).to_string();
    let coordinator_out = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{coordinator_out}{coordinator_log}"
    );
    // SIGTERM flushes the workers' last spans.
    for index in 0..2 {
        assert_eq!(
            cluster.terminate(index, Duration::from_secs(15)),
            Some(0),
            "{}",
            cluster.worker_log(index)
        );
    }

    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    let partitions = store.partitions(&run.run_id).await.unwrap();
    assert_eq!(partitions.len(), 4);

    // Wait for the coordinator's batch (sent at its exit) and the workers' last ones.
    let started = Instant::now();
    let spans = loop {
        let spans = receiver.spans();
        let partitions_seen = spans
            .iter()
            .filter(|s| s.name == "backfill.partition")
            .count();
        let run_seen = spans.iter().any(|s| s.name == "backfill.run");
        if (partitions_seen >= 4 && run_seen) || started.elapsed() > Duration::from_secs(20) {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let summary: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {} <- {}",
                s.service, s.name, s.span_id, s.parent_span_id
            )
        })
        .collect();
    let summary = summary.join("\n");

    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "backfill.run").collect();
    assert_eq!(roots.len(), 1, "one run span:\n{summary}");
    let root = roots[0];
    assert_eq!(root.service, "backfill-coordinator");
    assert_eq!(root.parent_span_id, "", "the run span is the trace's root");
    assert_eq!(root.attribute("run.id"), Some(run.run_id.as_str()));
    assert_eq!(root.attribute("outcome"), Some("published"));
    assert!(
        spans.iter().all(|s| s.trace_id == root.trace_id),
        "every span of every process is in the run's trace:\n{summary}"
    );

    let phases: Vec<&str> = children(&spans, root)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    for phase in [
        "backfill.plan",
        "backfill.shadow",
        "backfill.barrier",
        "backfill.audit",
        "backfill.publish",
    ] {
        assert!(phases.contains(&phase), "{phase} under run:\n{summary}");
    }

    let partition_spans: Vec<&ReceivedSpan> = children(&spans, root)
        .into_iter()
        .filter(|s| s.name == "backfill.partition")
        .collect();
    assert_eq!(partition_spans.len(), 4, "{summary}");
    let services: std::collections::BTreeSet<&str> =
        partition_spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        ["bf-worker-grpc", "bf-worker-http"].into_iter().collect(),
        "partitions ran on both workers, each exporting its own way"
    );
    let mut inserted_by_spans = 0;
    for span in &partition_spans {
        let key = span.attribute("partition").expect("partition attribute");
        let record = partitions
            .iter()
            .find(|p| p.partition_key == key)
            .expect("partition span names a partition of the run");
        assert_eq!(span.attribute("run.id"), Some(run.run_id.as_str()));
        assert_eq!(span.attribute("outcome"), Some("done"));
        let inserted: i64 = span.attribute("rows.inserted").unwrap().parse().unwrap();
        assert_eq!(Some(inserted), record.counts.map(|c| c.inserted));
        inserted_by_spans += inserted;
        let below: Vec<&str> = descendants(&spans, span)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        for step in [
            "backfill.semaphore_wait",
            "backfill.claim",
            "backfill.merge",
            "backfill.checks",
            "backfill.checkpoint",
        ] {
            assert!(below.contains(&step), "{step} under {key}: {below:?}");
        }
    }
    assert!(inserted_by_spans > 0);

    let audit = spans.iter().find(|s| s.name == "backfill.audit").unwrap();
    let audit_checks = children(&spans, audit);
    assert!(!audit_checks.is_empty(), "one span per audit:\n{summary}");
    assert!(
        audit_checks
            .iter()
            .all(|s| s.name == "backfill.audit_check" && s.attribute("verdict") == Some("pass"))
    );

    // No secret in any span attribute or status.
    for span in &spans {
        let text = format!("{:?} {}", span.attributes, span.status_message);
        assert_no_secret(&format!("span {}", span.name), &text);
    }

    // JSON logs: every line parses; state changes carry run and partition.
    let mut changes: HashMap<String, Vec<String>> = HashMap::new();
    for (who, log) in [
        ("coordinator", coordinator_log.clone()),
        ("worker 0", cluster.worker_log(0)),
        ("worker 1", cluster.worker_log(1)),
    ] {
        assert_no_secret(who, &log);
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: a log line is not JSON ({e}): {line}"));
            if value["target"] == "backfill::state" {
                assert_eq!(value["run"], run.run_id.as_str(), "{line}");
                changes
                    .entry(value["partition"].as_str().unwrap_or("").to_string())
                    .or_default()
                    .push(value["change"].as_str().unwrap_or("").to_string());
            }
        }
    }
    for partition in &partitions {
        let seen = changes
            .get(&partition.partition_key)
            .cloned()
            .unwrap_or_default();
        assert!(
            seen.contains(&"partition_running".to_string())
                && seen.contains(&"partition_done".to_string()),
            "state changes of {}: {seen:?}",
            partition.partition_key
        );
    }
    let run_changes = changes.get("").cloned().unwrap_or_default();
    assert!(
        run_changes.contains(&"run_auditing".to_string())
            && run_changes.contains(&"run_published".to_string()),
        "run state changes: {run_changes:?}"
    );
    assert_no_secret("coordinator stdout", &coordinator_out);
}

/// Tracing pointed at a port where nothing listens: the run succeeds and the log is not
/// flooded with exporter errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_collector_neither_fails_nor_floods_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let output = std::process::Command::new(workspace_bin("backfill"))
        .args(["demo", "--dir", dir.path().to_str().unwrap()])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{closed_port}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("BACKFILL_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // stderr holds the demo's progress lines and nothing about the exporter.
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("export") && !lower.contains("otlp"),
        "no exporter error spam on stderr:\n{stderr}"
    );
    assert!(stderr.lines().count() <= 10, "{stderr}");
}

/// Prometheus text: the sum of the samples of `name` whose labels include all of `labels`;
/// None when no sample matches (so a zero can be told from a missing series).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// `sample`, for series that must exist.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels)
        .unwrap_or_else(|| panic!("no sample of {name} {labels:?} in:\n{text}"))
}

async fn get_text(url: &str) -> (u16, String) {
    let client_url = url.to_string();
    tokio::task::spawn_blocking(move || http_get(&client_url))
        .await
        .unwrap()
}

/// A tiny HTTP/1.0 GET, enough for the probe and metrics endpoints.
fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = match std::net::TcpStream::connect(host) {
        Ok(stream) => stream,
        Err(_) => return (0, String::new()),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The address `backfill serve --listen 127.0.0.1:0` says it listens on.
fn served_address(serve: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let stderr = serve.stderr.take().expect("serve's stderr is piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        let line = lines.next().expect("serve prints its address").unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            return rest.split_whitespace().next().unwrap().to_string();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two workers serving /metrics, scraped while the coordinator runs and after: counters never
/// go down, and at the end the workers' partitions, rows and semaphore waits add up to what
/// the control store recorded; `backfill serve` reports the run's partitions by state, rows and
/// audits from the store, and its API returns the run's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_control_store() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::new("demo", &db.url);
    let addresses: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    for address in &addresses {
        cluster.start_worker(&[("BACKFILL_WORKER_LISTEN", address.as_str())]);
    }
    for (index, address) in addresses.iter().enumerate() {
        wait_for_worker_ready(&cluster, index).await;
        assert_eq!(get_text(&format!("http://{address}/livez")).await.0, 200);
        let started = Instant::now();
        loop {
            let (status, _) = get_text(&format!("http://{address}/readyz")).await;
            if status == 200 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "readyz {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let spec = mini_challenge_spec(&dir);
    let mut coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut last_done = 0.0;
    let mut scrapes = 0;
    loop {
        let mut done = 0.0;
        for address in &addresses {
            let (status, text) = get_text(&format!("http://{address}/metrics")).await;
            assert_eq!(status, 200);
            done +=
                sample(&text, "backfill_partitions_total", &[("outcome", "done")]).unwrap_or(0.0);
        }
        scrapes += 1;
        assert!(
            done >= last_done,
            "a counter went down: {last_done} -> {done}"
        );
        last_done = done;
        if coordinator.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = coordinator.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(scrapes >= 1);

    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    let partitions = store.partitions(&run.run_id).await.unwrap();
    let total = |f: fn(&backfill_common::control::MergeCounts) -> i64| -> f64 {
        partitions
            .iter()
            .filter_map(|p| p.counts.as_ref())
            .map(f)
            .sum::<i64>() as f64
    };
    let mut scraped = String::new();
    for address in &addresses {
        scraped.push_str(&get_text(&format!("http://{address}/metrics")).await.1);
    }
    let done = partitions
        .iter()
        .filter(|p| p.state == PartitionState::Done)
        .count() as f64;
    assert_eq!(done, 4.0);
    assert_eq!(
        metric(
            &scraped,
            "backfill_partitions_total",
            &[("outcome", "done"), ("warehouse", "demo")]
        ),
        done,
        "{scraped}"
    );
    assert_eq!(
        metric(
            &scraped,
            "backfill_rows_written_total",
            &[("kind", "inserted")]
        ),
        total(|c| c.inserted)
    );
    assert_eq!(
        metric(
            &scraped,
            "backfill_rows_written_total",
            &[("kind", "updated")]
        ),
        total(|c| c.updated)
    );
    assert_eq!(
        metric(
            &scraped,
            "backfill_rows_written_total",
            &[("kind", "deleted")]
        ),
        total(|c| c.deleted)
    );
    assert_eq!(
        metric(&scraped, "backfill_semaphore_wait_seconds_count", &[]),
        done,
        "one lease per attempt, no retries in this run"
    );
    assert_eq!(metric(&scraped, "backfill_semaphore_holders", &[]), 0.0);
    assert_eq!(
        metric(&scraped, "backfill_partition_duration_seconds_count", &[]),
        done
    );
    // Counted only when something is dead-lettered: absent here, never positive.
    assert_eq!(sample(&scraped, "backfill_dead_letters_total", &[]), None);

    // backfill serve: the store's view.
    let mut serve = cluster
        .backfill(&["serve", "--listen", "127.0.0.1:0"])
        .env("BACKFILL_WAREHOUSE_URL", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = served_address(&mut serve);
    let started = Instant::now();
    while get_text(&format!("http://{address}/readyz")).await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, text) = get_text(&format!("http://{address}/metrics")).await;
    assert_eq!(status, 200);
    let run_id = run.run_id.as_str();
    assert_eq!(
        metric(
            &text,
            "backfill_run_partitions",
            &[("run", run_id), ("state", "done")]
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "backfill_run_partitions",
            &[("run", run_id), ("state", "pending")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "backfill_run_rows",
            &[("run", run_id), ("kind", "inserted")]
        ),
        total(|c| c.inserted)
    );
    let audits = store.audits(run_id).await.unwrap();
    assert_eq!(
        metric(
            &text,
            "backfill_run_audits",
            &[("run", run_id), ("verdict", "pass")]
        ),
        audits.iter().filter(|a| a.verdict == "pass").count() as f64
    );
    let (status, body) = get_text(&format!("http://{address}/api/runs/{run_id}")).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["run"]["state"], "published");
    assert_eq!(json["counts"]["done"], 4);
    let (status, _) = get_text(&format!("http://{address}/api/runs/nosuchrun")).await;
    assert_eq!(status, 404);
    let (status, body) = get_text(&format!("http://{address}/api/runs")).await;
    assert_eq!(status, 200);
    assert!(body.contains(run_id));
    let _ = serve.kill();
    let _ = serve.wait();

    // status --watch on a run that has stopped running: one frame with the grid, then exit.
    let watched = cluster
        .backfill(&["status", run_id, "--watch", "--interval", "0.2"])
        .env("BACKFILL_WAREHOUSE_URL", &db.url)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&watched.stdout);
    assert!(
        watched.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(shown.contains("####"), "grid of 4 done partitions: {shown}");
    assert!(shown.contains("throughput:"), "{shown}");
    let watched = cluster
        .backfill(&["status", run_id, "--watch", "--json"])
        .env("BACKFILL_WAREHOUSE_URL", &db.url)
        .output()
        .unwrap();
    assert!(watched.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["status"]["counts"]["done"], 4);
    assert!(lines[0]["pace"].is_object());
}

/// A partition that fails (division by zero on one day), embedded: its span and the run's
/// span carry the error status, the other partitions are fine, and the recorded message names
/// the database error without any secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_recorded_on_spans() {
    let receiver = OtlpReceiver::start().await;
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    let failing = demo::MINI_CHALLENGE_SPEC.replacen(
        "SELECT order_id, item_id, order_date, sku, quantity,",
        "SELECT order_id, item_id, order_date, sku, quantity / (CASE WHEN order_date = CAST('2024-03-05' AS date) THEN 0 ELSE 1 END) AS quantity,",
        1,
    );
    assert_ne!(failing, demo::MINI_CHALLENGE_SPEC);
    std::fs::write(&spec, failing).unwrap();
    let output = std::process::Command::new(workspace_bin("backfill"))
        .args(["run", spec.to_str().unwrap(), "--no-progress"])
        .env("BACKFILL_WAREHOUSE_URL", url_with_password(&db))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http_endpoint)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "partitions failed");
    let started = Instant::now();
    let spans = loop {
        let spans = receiver.spans();
        if spans.iter().any(|s| s.name == "backfill.run")
            || started.elapsed() > Duration::from_secs(20)
        {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let run = spans
        .iter()
        .find(|s| s.name == "backfill.run")
        .expect("run span");
    assert_eq!(run.status_code, 2, "the run span is an error");
    assert_eq!(run.attribute("outcome"), Some("partitions_failed"));
    let partitions: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "backfill.partition")
        .collect();
    assert_eq!(partitions.len(), 4);
    for span in partitions {
        assert_eq!(span.trace_id, run.trace_id);
        if span.attribute("partition") == Some("2024-03-05") {
            assert_eq!(span.status_code, 2);
            assert_eq!(span.attribute("outcome"), Some("failed"));
            assert!(span.status_message.contains("division by zero"), "{span:?}");
        } else {
            assert_eq!(span.status_code, 0, "{span:?}");
            assert_eq!(span.attribute("outcome"), Some("done"));
        }
    }
    for span in &spans {
        assert_no_secret(
            &span.name,
            &format!("{:?} {}", span.attributes, span.status_message),
        );
    }
    assert_no_secret("stderr", &String::from_utf8_lossy(&output.stderr));
}

/// While a distributed run waits for workers (none are running), `backfill serve` reports the
/// run's pending partitions and the depth of the warehouse's task queue from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_queue_depth_of_open_runs() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let cluster = Cluster::new("demo", &db.url);
    let dir = tempfile::tempdir().unwrap();
    let spec = mini_challenge_spec(&dir);
    let mut coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let broker = cluster.broker().await;
    let queue = broker.topology.task_queue("demo");
    let started = Instant::now();
    while broker.queue_depth(&queue).await.unwrap_or(0) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tasks never published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut serve = cluster
        .backfill(&["serve", "--listen", "127.0.0.1:0"])
        .env("BACKFILL_WAREHOUSE_URL", &db.url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = served_address(&mut serve);
    let (status, text) = get_text(&format!("http://{address}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &text,
            "backfill_queue_depth",
            &[("warehouse", "demo"), ("queue", "tasks")]
        ),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "backfill_queue_depth",
            &[("warehouse", "demo"), ("queue", "dead")]
        ),
        0.0
    );
    let run = control_store(&warehouse)
        .all_runs()
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        metric(
            &text,
            "backfill_run_partitions",
            &[("run", run.run_id.as_str()), ("state", "pending")]
        ),
        4.0
    );
    let _ = serve.kill();
    let _ = serve.wait();
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}
