//! The `backfill` binary as a user runs it: plan writes nothing, run publishes and prints the
//! rollback command, status --json reports counts, exit codes tell scripts what happened,
//! passwords never appear, and `demo` works with no server.

use std::process::{Command, Output};

use backfill_coordinator::demo;
use backfill_tests::*;

fn backfill(args: &[&str], url: Option<&str>) -> Output {
    let mut command = Command::new(backfill_bin());
    command
        .args(args)
        .env_remove("BACKFILL_WAREHOUSE_URL")
        .env_remove("BACKFILL_WAREHOUSE_DEMO_URL");
    if let Some(url) = url {
        command
            .env("BACKFILL_WAREHOUSE_DEMO_URL", url)
            .env("BACKFILL_WAREHOUSE_URL", url);
    }
    command.output().expect("run backfill")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_run_status_and_exit_codes() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let spec = spec.to_str().unwrap();

    // plan: partitions, SQL and hash; writes nothing.
    let tables_before = count(&warehouse, "SELECT count(*) FROM sqlite_master").await;
    let output = backfill(&["plan", spec], Some(&db.url));
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    let hash = backfill_common::spec::Spec::parse(demo::MINI_CHALLENGE_SPEC)
        .unwrap()
        .hash();
    assert!(shown.contains(&hash), "plan prints the spec hash: {shown}");
    assert!(
        shown.contains("shadow     fact_order_items__bf_shadow_<run>"),
        "the shadow line names the shadow: {shown}"
    );
    assert_eq!(
        shown.lines().filter(|l| l.starts_with("publish ")).count(),
        1,
        "one publish line, the mode chosen: {shown}"
    );
    assert!(
        shown.contains("archive    the current table, kept 30 days for rollback"),
        "{shown}"
    );
    assert!(
        shown.contains("partitions 4 by day from 2024-03-03 to 2024-03-06"),
        "{shown}"
    );
    assert!(
        shown.contains("order_date >= $1 AND order_date < $2"),
        "plan prints the SQL with bound parameters: {shown}"
    );
    assert_eq!(
        count(&warehouse, "SELECT count(*) FROM sqlite_master").await,
        tables_before,
        "plan must not write"
    );

    // run: publishes, prints the rollback command.
    let output = backfill(&["run", spec, "--no-progress"], Some(&db.url));
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    let run_id = shown
        .split("published run ")
        .nth(1)
        .and_then(|s| s.get(..8))
        .expect("run id in output")
        .to_string();
    assert!(
        shown.contains(&format!("backfill rollback {run_id}")),
        "{shown}"
    );

    // status --json: machine-readable counts.
    let output = backfill(&["status", &run_id, "--json"], Some(&db.url));
    assert!(output.status.success(), "{}", text(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["run"]["state"], "published");
    assert_eq!(status["counts"]["done"], 4);
    assert_eq!(status["rows"]["inserted"], 1199);
    assert!(
        status["audits"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["verdict"] == "pass")
    );
    let output = backfill(&["status", &run_id], Some(&db.url));
    assert!(
        text(&output).contains("####"),
        "the grid shows 4 done partitions: {}",
        text(&output)
    );

    // exit code 3 when audits fail, and the report names the audit and partition.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        mini_challenge_spec(&[(
            "SELECT order_id, item_id, order_date, sku, quantity,",
            "SELECT order_id, item_id, order_date, sku, quantity * 2 AS quantity,",
        )]),
    )
    .unwrap();
    let output = backfill(
        &["run", bad.to_str().unwrap(), "--no-progress"],
        Some(&db.url),
    );
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(3), "{shown}");
    assert!(
        shown.contains("FAIL total_quantity_halved") && shown.contains("partition 2024-03-04"),
        "{shown}"
    );

    // exit code 2 for a bad spec, with the field named.
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(
        &invalid,
        demo::MINI_CHALLENGE_SPEC.replace("grain = \"day\"", "grain = \"week\""),
    )
    .unwrap();
    let output = backfill(&["plan", invalid.to_str().unwrap()], Some(&db.url));
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("`partition.grain`: got `week`"),
        "{}",
        text(&output)
    );

    // no URL anywhere: the error says every way to give one (bad usage: exit 2).
    let output = backfill(&["plan", spec], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("BACKFILL_WAREHOUSE_DEMO_URL"),
        "{}",
        text(&output)
    );
}

#[test]
fn passwords_never_appear_in_errors() {
    let output = backfill(
        &[
            "status",
            "--warehouse-url",
            "postgres://bob:hunter2secret@127.0.0.1:5432/nowhere",
        ],
        None,
    );
    let shown = text(&output);
    assert!(!output.status.success());
    assert!(!shown.contains("hunter2secret"), "password leaked: {shown}");
    assert!(shown.contains("bob:***@127.0.0.1:5432"), "{shown}");
    // a password as a query parameter, or with a `/` in it, is hidden too
    for url in [
        "postgres://bob@127.0.0.1:5432/nowhere?password=hunter2secret&sslmode=disable",
        "postgres://bob:hunter2/secret@127.0.0.1:5432/nowhere",
    ] {
        let output = backfill(&["status", "--warehouse-url", url], None);
        let shown = text(&output);
        assert!(!output.status.success());
        assert!(!shown.contains("hunter2"), "password leaked: {shown}");
    }
}

#[test]
fn demo_runs_without_any_server() {
    let dir = tempfile::tempdir().unwrap();
    let output = backfill(&["demo", "--dir", dir.path().to_str().unwrap()], None);
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    for day in demo::BUG_DAYS {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(day) && l.ends_with("<- fixed")),
            "{day} fixed: {shown}"
        );
    }
    assert!(
        shown.contains("2024-03-04         1800        900"),
        "{shown}"
    );
    assert!(shown.contains("backfill rollback"), "{shown}");
    // the printed rollback command works
    let url = format!(
        "sqlite://{}/warehouse.db?mode=rwc",
        dir.path().canonicalize().unwrap().display()
    );
    let run_id = shown
        .split("published run ")
        .nth(1)
        .and_then(|s| s.get(..8))
        .unwrap();
    let output = backfill(&["rollback", run_id, "--warehouse-url", &url], None);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("verified"), "{}", text(&output));
}

/// `demo --warehouse-url` seeds the mini challenge on a server and fixes it there; a second
/// demo is a run of its own (not "nothing to do"), and the printed rollback command works.
async fn demo_runs_on_a_server(db: TestDatabase) {
    let warehouse = db.warehouse().await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let output = backfill(&["demo", "--warehouse-url", &db.url], None);
        let shown = text(&output);
        assert!(output.status.success(), "{shown}");
        assert!(
            shown.contains("2024-03-04         1800        900"),
            "{shown}"
        );
        assert_eq!(
            checksum(&warehouse, "fact_order_items", None).await,
            checksum(&warehouse, "expected_order_items", None).await,
            "the demo fixed the table on the server"
        );
        let run_id = shown
            .split("published run ")
            .nth(1)
            .and_then(|s| s.get(..8))
            .unwrap()
            .to_string();
        runs.push(run_id);
    }
    assert_ne!(runs[0], runs[1], "each demo is a run of its own");
    let output = backfill(&["rollback", &runs[1], "--warehouse-url", &db.url], None);
    assert!(output.status.success(), "{}", text(&output));
    let day = if db.typed_dates() {
        "t.order_date = CAST('2024-03-04' AS date)"
    } else {
        "t.order_date = '2024-03-04'"
    };
    assert_eq!(
        count(
            &warehouse,
            &format!(
                "SELECT {} FROM fact_order_items AS t WHERE {day}",
                warehouse.engine().as_bigint("sum(quantity)")
            )
        )
        .await,
        1800,
        "rolled back to the seeded (doubled) data"
    );
    // BACKFILL_WAREHOUSE_URL alone never points the demo at a server.
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(backfill_bin())
        .args(["demo", "--dir", dir.path().to_str().unwrap()])
        .env("BACKFILL_WAREHOUSE_URL", &db.url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("sqlite://"), "{}", text(&output));
}

on_engines!(demo_runs_on_a_server: postgres, mysql);

#[test]
fn help_teaches() {
    let output = backfill(&["--help"], None);
    let shown = text(&output);
    for word in [
        "plan",
        "run",
        "status",
        "rollback",
        "gc",
        "demo",
        "Exit codes",
        "BACKFILL_WAREHOUSE_<NAME>_URL",
    ] {
        assert!(shown.contains(word), "--help mentions {word}: {shown}");
    }
}

/// Logs into a pipe or a file carry no colour codes (and neither does a terminal with
/// `NO_COLOR`): the text a log collector or `grep` reads is the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_into_a_pipe_carry_no_colour_codes() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fix.toml");
    std::fs::write(&spec, demo::MINI_CHALLENGE_SPEC).unwrap();
    let output = Command::new(backfill_bin())
        .args(["run", spec.to_str().unwrap(), "--warehouse-url", &db.url])
        .env("BACKFILL_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("INFO"), "info logs were written: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "no escape codes: {stderr:?}");
}

/// Commands that take a run id find the warehouse when exactly one is configured, and name
/// the choices (exit 2) when several are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_id_commands_find_the_one_configured_warehouse() {
    let db = TestDatabase::sqlite();
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let backfill = backfill_coordinator::runner::Backfill::open(
        backfill_common::spec::Spec::parse(demo::MINI_CHALLENGE_SPEC).unwrap(),
        demo::MINI_CHALLENGE_SPEC.to_string(),
        &db.url,
    )
    .await
    .unwrap();
    let backfill_coordinator::runner::RunOutcome::Published { run_id, .. } = backfill
        .run("test", &backfill_coordinator::runner::Quiet)
        .await
        .unwrap()
    else {
        panic!("not published")
    };
    let status = |vars: &[(&str, &str)]| {
        let mut command = Command::new(backfill_bin());
        command
            .args(["status", &run_id])
            .env_remove("BACKFILL_CONFIG");
        for (name, _) in std::env::vars() {
            if name.starts_with("BACKFILL_WAREHOUSE_") {
                command.env_remove(name);
            }
        }
        command.envs(vars.iter().copied());
        command.output().unwrap()
    };
    let output = status(&[("BACKFILL_WAREHOUSE_DEMO_URL", &db.url)]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(text(&output).contains(&run_id), "{}", text(&output));
    let output = status(&[
        ("BACKFILL_WAREHOUSE_DEMO_URL", &db.url),
        ("BACKFILL_WAREHOUSE_EU_URL", &db.url),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("several warehouses are configured (demo, eu)")
            && text(&output).contains("--warehouse NAME"),
        "{}",
        text(&output)
    );
}
