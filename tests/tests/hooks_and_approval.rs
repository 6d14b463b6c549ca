//! Isolation hooks and the approval gate, on the mini challenge (PostgreSQL): a local HTTP
//! receiver records the webhook calls in order; a command hook sees the run in its
//! environment; a failing before_publish hook leaves the target untouched (exit code 5) and
//! calls on_failure; a manual approval stops in awaiting_approval until `backfill publish`,
//! which refuses when the target changed since the audits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backfill_common::control::RunState;
use backfill_common::spec::Spec;
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::*;

/// A webhook receiver: records (path, JSON body) of every POST; answers with the status set
/// for the event (200 unless told otherwise).
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<serde_json::Value>>>,
    failing: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let calls: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let failing: Arc<Mutex<Vec<String>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hooks/secret-token-123",
            listener.local_addr().unwrap()
        );
        let (sink, fail) = (calls.clone(), failing.clone());
        let router = axum::Router::new().route(
            "/hooks/{token}",
            axum::routing::post(move |body: String| {
                let (sink, fail) = (sink.clone(), fail.clone());
                async move {
                    let value: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                    let event = value["event"].as_str().unwrap_or("").to_string();
                    sink.lock().unwrap().push(value);
                    if fail.lock().unwrap().contains(&event) {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Receiver {
            url,
            calls,
            failing,
            task,
        }
    }

    fn events(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c["event"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spec_with(extra: &str) -> String {
    format!("{}\n{extra}", demo::MINI_CHALLENGE_SPEC)
}

fn webhooks(url: &str, retries: u32) -> String {
    [
        "before_write",
        "before_publish",
        "after_publish",
        "on_failure",
    ]
    .iter()
    .map(|event| {
        format!(
            "[[hook]]\non = \"{event}\"\nurl = \"{url}\"\ntimeout = \"5s\"\nretries = {retries}\n"
        )
    })
    .collect::<Vec<_>>()
    .join("\n")
}

async fn open(db: &TestDatabase, spec: &str) -> Backfill {
    Backfill::open(Spec::parse(spec).unwrap(), spec.to_string(), &db.url)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_with_the_run_details() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("paused");
    let command_hook = format!(
        "[[hook]]\non = \"before_write\"\ncommand = [\"sh\", \"-c\", \"echo $BACKFILL_EVENT $BACKFILL_RUN_ID $BACKFILL_TARGET $BACKFILL_PARTITIONS > {}\"]\n",
        marker.display()
    );
    let spec = spec_with(&format!("{command_hook}\n{}", webhooks(&receiver.url, 0)));
    let outcome = open(&db, &spec).await.run("test", &Quiet).await.unwrap();
    let RunOutcome::Published {
        run_id, archive, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        receiver.events(),
        ["before_write", "before_publish", "after_publish"],
        "in order, and no on_failure"
    );
    let calls = receiver.calls.lock().unwrap().clone();
    for call in &calls {
        assert_eq!(call["run_id"], run_id.as_str());
        assert_eq!(call["target"], "public.fact_order_items");
        assert_eq!(call["partitions"], 4);
        assert!(call["text"].as_str().unwrap().contains(&run_id), "{call}");
    }
    assert_eq!(calls[2]["archive"], archive.as_str());
    assert!(
        calls[2]["text"]
            .as_str()
            .unwrap()
            .contains("backfill rollback")
    );
    let written = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        written.trim(),
        format!("before_write {run_id} public.fact_order_items 4")
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
}

/// The before_publish webhook answers 500: after its retries the run stops with the target
/// untouched, says why, and the on_failure hook hears of it; once the receiver is fixed, the
/// same command publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_before_publish_hook_blocks_the_publish() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let receiver = Receiver::start().await;
    receiver
        .failing
        .lock()
        .unwrap()
        .push("before_publish".into());
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("fix.toml");
    std::fs::write(&spec_path, spec_with(&webhooks(&receiver.url, 1))).unwrap();
    let run = |path: &std::path::Path| {
        std::process::Command::new(workspace_bin("backfill"))
            .args(["run", path.to_str().unwrap(), "--no-progress"])
            .env("BACKFILL_WAREHOUSE_URL", &db.url)
            .output()
            .unwrap()
    };
    let output = run(&spec_path);
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(5), "{shown}");
    assert!(shown.contains("before_publish hook"), "{shown}");
    assert!(
        !shown.contains("secret-token-123"),
        "the webhook URL's path is a secret: {shown}"
    );
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    assert_eq!(
        receiver.events(),
        [
            "before_write",
            "before_publish",
            "before_publish",
            "on_failure"
        ],
        "one retry, then on_failure"
    );
    let calls = receiver.calls.lock().unwrap().clone();
    assert_eq!(calls[3]["outcome"], "blocked");
    let store = control_store(&warehouse);
    let run_record = store.all_runs().await.unwrap().remove(0);
    assert_eq!(run_record.state, RunState::Failed);
    assert!(
        run_record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("target was not touched")
    );

    receiver.failing.lock().unwrap().clear();
    let output = run(&spec_path);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    // The resumed run wrote nothing again: no before_write, straight to publishing.
    assert_eq!(receiver.events()[4..], ["before_publish", "after_publish"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_hook_that_hangs_is_killed_and_blocks_writing() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let spec = spec_with(
        "[[hook]]\non = \"before_write\"\ncommand = [\"sleep\", \"30\"]\ntimeout = \"300ms\"\nretries = 0\n",
    );
    let started = std::time::Instant::now();
    let outcome = open(&db, &spec).await.run("test", &Quiet).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    let RunOutcome::Blocked { event, reason, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(event, "before_write");
    assert!(reason.contains("did not finish"), "{reason}");
    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    let partitions = store.partitions(&run.run_id).await.unwrap();
    assert!(
        partitions.iter().all(|p| p.times_applied == 0),
        "nothing was written before the hook passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_approval_waits_then_publishes() {
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let before = checksum(&warehouse, "fact_order_items", None).await;
    let spec =
        demo::MINI_CHALLENGE_SPEC.replace("[publish]\n", "[publish]\napproval = \"manual\"\n");
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("fix.toml");
    std::fs::write(&spec_path, &spec).unwrap();
    let backfill_cli = |args: &[&str]| {
        std::process::Command::new(workspace_bin("backfill"))
            .args(args)
            .env("BACKFILL_WAREHOUSE_URL", &db.url)
            .output()
            .unwrap()
    };
    let output = backfill_cli(&["run", spec_path.to_str().unwrap(), "--no-progress"]);
    let shown = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(shown.contains("awaiting approval"), "{shown}");
    assert_eq!(checksum(&warehouse, "fact_order_items", None).await, before);
    let store = control_store(&warehouse);
    let run = store.all_runs().await.unwrap().remove(0);
    assert_eq!(run.state, RunState::AwaitingApproval);
    // Running again does not publish either.
    let output = backfill_cli(&["run", spec_path.to_str().unwrap(), "--no-progress"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("awaiting approval"));

    let output = backfill_cli(&["publish", &run.run_id]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    let output = backfill_cli(&["publish", &run.run_id]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a published run cannot be published again (a refusal)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_is_refused_when_the_target_changed_since_the_audits() {
    for mode in ["swap_table", "swap_window"] {
        let db = TestDatabase::postgres().await;
        let warehouse = db.warehouse().await;
        demo::seed_mini_challenge(&warehouse).await.unwrap();
        let spec = demo::MINI_CHALLENGE_SPEC
            .replace("[publish]\n", "[publish]\napproval = \"manual\"\n")
            .replace("mode = \"swap_table\"", &format!("mode = \"{mode}\""));
        let backfill = open(&db, &spec).await;
        let outcome = backfill.run("test", &Quiet).await.unwrap();
        let RunOutcome::AwaitingApproval {
            run_id,
            publish_mode,
        } = outcome
        else {
            panic!("{outcome:?}")
        };
        assert_eq!(publish_mode, mode);
        // A late write inside the window after the audits.
        exec(
            &warehouse,
            "UPDATE fact_order_items SET quantity = quantity + 100 WHERE order_id = 400 AND item_id = 1",
        )
        .await;
        let changed = checksum(&warehouse, "fact_order_items", None).await;
        let error = backfill
            .publish_approved(&run_id, "test", &Quiet)
            .await
            .unwrap_err();
        assert!(
            matches!(error, backfill_common::BackfillError::ApprovalLapsed(_)),
            "{mode}: {error:?}"
        );
        assert!(
            error.to_string().contains("changed inside the window"),
            "{mode}: {error}"
        );
        assert_eq!(
            checksum(&warehouse, "fact_order_items", None).await,
            changed
        );
        // The advice works: running the same spec again audits the new state, and that
        // approval publishes.
        let outcome = backfill.run("test", &Quiet).await.unwrap();
        let RunOutcome::AwaitingApproval { run_id: again, .. } = outcome else {
            panic!("{mode}: {outcome:?}")
        };
        assert_eq!(again, run_id, "the same run, audited again");
        let outcome = backfill
            .publish_approved(&run_id, "test", &Quiet)
            .await
            .unwrap();
        assert!(
            matches!(outcome, RunOutcome::Published { .. }),
            "{outcome:?}"
        );
        assert_eq!(
            checksum(&warehouse, "fact_order_items", None).await,
            checksum(&warehouse, "expected_order_items", None).await,
            "{mode}: the published window is the backfilled one"
        );
        let approved = count(
            &warehouse,
            &format!("SELECT count(*) FROM backfill.events WHERE run_id = '{run_id}' AND kind = 'publish_approved' AND detail = 'test'"),
        )
        .await;
        assert_eq!(approved, 2, "each approval is recorded with its approver");
    }
}
