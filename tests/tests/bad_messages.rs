//! The corpus of bad messages in `tests/bad_messages`, run through the real RabbitMQ queue
//! and a real `backfill-worker` process. Each `NAME.toml` says how to build one message
//! (which task it starts from, how its body, signature and key id are made, which fields are
//! overridden) and what must become of it: a dead letter with a reason and a detail, or an ack
//! as stale that writes nothing. The messages go in in file-name order, followed by one good
//! task; the worker must refuse each bad one as expected, keep running, and apply the good one.
//! Afterwards the data proves nothing else was written.
//!
//! `body`: sealed (default), truncated, flipped (one bit), empty, nested, version:N, result,
//! json (the `json` text, with $RUN, $SPEC_HASH and $TOKEN filled in, as msgpack), file:NAME.
//! `signature`: valid (over the body sent; default), of_sealed (over the body before it was
//! tampered with), foreign_key, zeros, not_hex, not_a_string, absent. `key_id`: k1 (default),
//! absent, or any text. `task`: done (a done partition's task, replayed), current (the task of
//! a reissued partition), superseded (that partition's task before it was reissued), ghost (a
//! run nobody knows).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backfill_common::control::{ControlStore, PartitionTask};
use backfill_common::envelope::{
    HEADER_KEY_ID, HEADER_SIGNATURE, Message, ResultKind, ResultMessage, SigningKey, TaskMessage,
};
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Warehouse, execute};
use backfill_coordinator::demo;
use backfill_coordinator::runner::{Backfill, Quiet, RunOutcome};
use backfill_tests::cluster::{Cluster, HMAC_KEY};
use backfill_tests::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::Deserialize;

/// The corpus must not shrink silently.
const MIN_CASES: usize = 25;
/// The partition the `current` and `superseded` tasks name.
const REISSUED: &str = "2024-03-04";
/// The done partition the `done` task replays.
const DONE: &str = "2024-03-03";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    message: MessageRecipe,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageRecipe {
    task: String,
    #[serde(default = "sealed")]
    body: String,
    #[serde(default = "valid")]
    signature: String,
    #[serde(default = "k1")]
    key_id: String,
    json: Option<String>,
    #[serde(default)]
    fields: toml::Table,
    #[serde(default)]
    repeat: BTreeMap<String, Repeat>,
}

fn sealed() -> String {
    "sealed".into()
}
fn valid() -> String {
    "valid".into()
}
fn k1() -> String {
    "k1".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Repeat {
    text: String,
    times: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// dead_letter or stale
    verdict: String,
    reason: Option<String>,
    #[serde(default)]
    detail: Vec<String>,
    max_detail_chars: Option<usize>,
    /// What the worker reports on the run's result queue: none, stale or failed. Defaults:
    /// stale for a stale verdict, none for a dead letter.
    result: Option<String>,
}

struct Case {
    name: String,
    file: CaseFile,
}

impl Case {
    fn expected_result(&self) -> &str {
        match (&self.file.expect.result, self.file.expect.verdict.as_str()) {
            (Some(result), _) => result,
            (None, "stale") => "stale",
            _ => "none",
        }
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bad_messages")
}

fn load_corpus() -> Vec<Case> {
    let dir = corpus_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("entry").path())
        .collect();
    paths.sort();
    let mut cases = Vec::new();
    for path in &paths {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => {
                let text = std::fs::read_to_string(path).unwrap();
                let file: CaseFile = toml::from_str(&text)
                    .unwrap_or_else(|e| panic!("{name} is not a valid case: {e}"));
                assert!(
                    matches!(file.expect.verdict.as_str(), "dead_letter" | "stale"),
                    "{name}: verdict must be dead_letter or stale"
                );
                assert_eq!(
                    file.expect.verdict == "dead_letter",
                    file.expect.reason.is_some(),
                    "{name}: a dead letter needs a reason, a stale task has none"
                );
                cases.push(Case {
                    name: name.trim_end_matches(".toml").to_string(),
                    file,
                });
            }
            Some("bin") => {
                let referenced = paths.iter().any(|p| {
                    std::fs::read_to_string(p).is_ok_and(|t| t.contains(&format!("file:{name}")))
                });
                assert!(referenced, "{name} is used by no case");
            }
            _ => panic!("{name}: the corpus holds .toml cases and the .bin bodies they use"),
        }
    }
    assert!(
        cases.len() >= MIN_CASES,
        "{} holds {} cases; expected at least {MIN_CASES}",
        dir.display(),
        cases.len()
    );
    cases
}

/// The tasks cases start from.
struct Tasks {
    done: TaskMessage,
    current: TaskMessage,
    superseded: TaskMessage,
    ghost: TaskMessage,
}

fn signer() -> SigningKey {
    SigningKey::new("k1", HMAC_KEY.as_bytes().to_vec()).unwrap()
}

fn text_header(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn apply_fields(case: &str, task: &mut TaskMessage, fields: &toml::Table) {
    for (field, value) in fields {
        let text = || {
            value
                .as_str()
                .unwrap_or_else(|| panic!("{case}: {field} takes text"))
                .to_string()
        };
        let number = || {
            value
                .as_integer()
                .unwrap_or_else(|| panic!("{case}: {field} takes a number"))
        };
        match field.as_str() {
            "run_id" => task.task.run_id = text(),
            "spec_hash" => task.task.spec_hash = text(),
            "partition_key" => task.task.partition_key = text(),
            "range_start" => task.task.range_start = text(),
            "range_end" => task.task.range_end = text(),
            "attempt" => task.task.attempt = number(),
            "fencing_token" => task.task.fencing_token = number(),
            "warehouse" => task.warehouse = text(),
            "control_schema" => task.control_schema = text(),
            "reply_to" => task.reply_to = text(),
            other => panic!("{case}: unknown task field `{other}`"),
        }
    }
}

/// Builds a case's message: body, headers, and the task it carries (for stale results).
fn build(case: &Case, tasks: &Tasks) -> (Vec<u8>, FieldTable, TaskMessage) {
    let recipe = &case.file.message;
    let name = &case.name;
    let mut task = match recipe.task.as_str() {
        "done" => tasks.done.clone(),
        "current" => tasks.current.clone(),
        "superseded" => tasks.superseded.clone(),
        "ghost" => tasks.ghost.clone(),
        other => panic!("{name}: unknown task `{other}`"),
    };
    apply_fields(name, &mut task, &recipe.fields);
    let mut key_id = recipe.key_id.clone();
    let mut repeated = toml::Table::new();
    for (field, repeat) in &recipe.repeat {
        let value = repeat.text.repeat(repeat.times);
        if field == "key_id" {
            key_id = value;
        } else {
            repeated.insert(field.clone(), toml::Value::String(value));
        }
    }
    apply_fields(name, &mut task, &repeated);

    let keyring = Cluster::keyring();
    let sealed = keyring.seal(&Message::Task(task.clone())).0;
    let body = match recipe.body.as_str() {
        "sealed" => sealed.clone(),
        "truncated" => sealed[..sealed.len() / 2].to_vec(),
        "flipped" => {
            let mut body = sealed.clone();
            *body.last_mut().unwrap() ^= 1;
            body
        }
        "empty" => Vec::new(),
        "nested" => {
            let mut body = vec![0x92, 0x01];
            body.extend(std::iter::repeat_n(0x91, 65_000));
            body.push(0xc0);
            body
        }
        "result" => {
            keyring
                .seal(&Message::Result(ResultMessage {
                    task: task.task.clone(),
                    kind: ResultKind::Done,
                    error: None,
                    worker: "forger".into(),
                }))
                .0
        }
        "json" => {
            let json = recipe
                .json
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: body = \"json\" needs `json`"))
                .replace("$RUN", &task.task.run_id)
                .replace("$SPEC_HASH", &task.task.spec_hash)
                .replace("$TOKEN", &task.task.fencing_token.to_string());
            let value: serde_json::Value = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{name}: `json` is not JSON: {e}"));
            rmp_serde::to_vec(&value).unwrap()
        }
        other => {
            if let Some(version) = other.strip_prefix("version:") {
                let version: u16 = version.parse().expect("version:N");
                rmp_serde::to_vec(&(version, Message::Task(task.clone()))).unwrap()
            } else if let Some(file) = other.strip_prefix("file:") {
                std::fs::read(corpus_dir().join(file))
                    .unwrap_or_else(|e| panic!("{name}: cannot read {file}: {e}"))
            } else {
                panic!("{name}: unknown body `{other}`")
            }
        }
    };
    let mut headers = FieldTable::default();
    let signature = match recipe.signature.as_str() {
        "valid" => Some(text_header(&signer().sign(&body))),
        "of_sealed" => Some(text_header(&signer().sign(&sealed))),
        "foreign_key" => Some(text_header(
            &SigningKey::new("k1", b"a forger's very own key".to_vec())
                .unwrap()
                .sign(&body),
        )),
        "zeros" => Some(text_header(&"0".repeat(64))),
        "not_hex" => Some(text_header(&"zz".repeat(32))),
        "not_a_string" => Some(AMQPValue::LongLongInt(42)),
        "absent" => None,
        other => panic!("{name}: unknown signature `{other}`"),
    };
    if let Some(signature) = signature {
        headers.insert(HEADER_SIGNATURE.into(), signature);
    }
    if key_id != "absent" {
        headers.insert(HEADER_KEY_ID.into(), text_header(&key_id));
    }
    (body, headers, task)
}

/// The mini challenge run to its audits, held open by an audit that always fails, so the
/// shadow is complete and a worker can still be handed its tasks. Then REISSUED is issued
/// again with a new fencing token, as a resubmit does.
async fn open_run(db: &TestDatabase) -> (Warehouse, ControlStore, String, Tasks) {
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let text = mini_challenge_spec(&[(
        "[publish]",
        "[[audit]]\nkind = \"expression\"\nname = \"hold_the_run_open\"\nexpression = \"1 = 0\"\n\n[publish]",
    )]);
    let outcome = Backfill::open(Spec::parse(&text).unwrap(), text.clone(), &db.url)
        .await
        .unwrap()
        .run("test", &Quiet)
        .await
        .unwrap();
    let RunOutcome::AuditFailed { run_id, .. } = outcome else {
        panic!("the holding audit fails: {outcome:?}");
    };
    let store = control_store(&warehouse);
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let task_of = |partition: &backfill_common::control::PartitionRecord| TaskMessage {
        task: PartitionTask {
            run_id: run_id.clone(),
            spec_hash: run.spec_hash.clone(),
            partition_key: partition.partition_key.clone(),
            range_start: partition.range_start.clone(),
            range_end: partition.range_end.clone(),
            attempt: partition.attempt + 1,
            fencing_token: partition.fencing_token,
        },
        warehouse: "demo".into(),
        control_schema: "backfill".into(),
        reply_to: backfill_coordinator::runner::results_queue_name(&run_id),
    };
    let find = |partitions: &[backfill_common::control::PartitionRecord], key: &str| {
        partitions
            .iter()
            .find(|p| p.partition_key == key)
            .cloned()
            .unwrap()
    };
    let before = store.partitions(&run_id).await.unwrap();
    let superseded = task_of(&find(&before, REISSUED));
    let mut conn = warehouse.acquire().await.unwrap();
    execute(
        &mut conn,
        &format!(
            "UPDATE {} SET fencing_token = fencing_token + 1, state = 'pending' WHERE run_id = $1 AND partition_key = $2",
            store.table("partitions")
        ),
        &[run_id.as_str().into(), REISSUED.into()],
    )
    .await
    .unwrap();
    drop(conn);
    let after = store.partitions(&run_id).await.unwrap();
    let current = task_of(&find(&after, REISSUED));
    let done = task_of(&find(&after, DONE));
    let mut ghost = current.clone();
    ghost.task.run_id = "ghost001".into();
    ghost.task.spec_hash = "0".repeat(64);
    (
        warehouse,
        store,
        run_id,
        Tasks {
            done,
            current,
            superseded,
            ghost,
        },
    )
}

/// Every bad message gets its verdict from a real worker, which survives them all and then
/// applies a good task; nothing else is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_message_gets_its_verdict_and_the_worker_carries_on() {
    let cases = load_corpus();
    let db = TestDatabase::postgres().await;
    let (warehouse, store, run_id, tasks) = open_run(&db).await;
    let run = store.find_run(&run_id).await.unwrap().unwrap();
    let shadow_before = checksum(&warehouse, &run.shadow_table, None).await;
    let target_before = checksum(&warehouse, "fact_order_items", None).await;
    let applied_before: BTreeMap<String, i64> = store
        .partitions(&run_id)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.partition_key, p.times_applied))
        .collect();

    let mut cluster = Cluster::new("demo", &db.url);
    let broker = cluster.broker().await;
    broker.declare_warehouse("demo").await.unwrap();
    let mut results = broker.results(&run_id).await.unwrap();
    let mut built = Vec::new();
    for case in &cases {
        let (body, headers, task) = build(case, &tasks);
        broker
            .publish_unchecked("demo", &body, headers)
            .await
            .unwrap_or_else(|e| panic!("{}: could not publish: {e}", case.name));
        built.push(task);
    }
    broker.publish_task(&tasks.current).await.unwrap();
    cluster.start_worker(&[]);

    // Results arrive in processing order; the good task's Done closes the list.
    let mut received = Vec::new();
    let started = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), results.next()).await;
        match next {
            Ok(result) => {
                let result = result.unwrap();
                let good = result.kind == ResultKind::Done
                    && result.task.fencing_token == tasks.current.task.fencing_token;
                received.push(result);
                if good {
                    break;
                }
            }
            Err(_) => assert!(
                cluster.workers[0].try_wait().unwrap().is_none(),
                "the worker died:\n{}",
                cluster.worker_log(0)
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the good task was not applied; results so far: {received:?}\n{}",
            cluster.worker_log(0)
        );
    }
    let good = received.pop().unwrap();
    assert_eq!(good.task.partition_key, REISSUED);

    let mut problems = Vec::new();
    // What the worker reported, case by case, in order.
    let expected_results: Vec<(String, &str, &TaskMessage)> = cases
        .iter()
        .zip(&built)
        .filter(|(case, _)| case.expected_result() != "none")
        .map(|(case, task)| (case.name.clone(), case.expected_result(), task))
        .collect();
    if received.len() != expected_results.len() {
        problems.push(format!(
            "expected {} result(s) ({:?}), got {}: {received:?}",
            expected_results.len(),
            expected_results.iter().map(|r| &r.0).collect::<Vec<_>>(),
            received.len()
        ));
    }
    for ((name, kind, task), result) in expected_results.iter().zip(&received) {
        let kind_matches = matches!(
            (*kind, result.kind),
            ("stale", ResultKind::Stale) | ("failed", ResultKind::Failed)
        );
        if !kind_matches
            || result.task.partition_key != task.task.partition_key
            || result.task.fencing_token != task.task.fencing_token
        {
            problems.push(format!("{name}: expected {kind}, got {result:?}"));
        }
    }
    // The dead letters, case by case, in order.
    let dead_cases: Vec<&Case> = cases
        .iter()
        .filter(|c| c.file.expect.verdict == "dead_letter")
        .collect();
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = broker.dead_letters("demo", 500).await.unwrap();
        if dead.len() >= dead_cases.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if dead.len() != dead_cases.len() {
        problems.push(format!(
            "expected {} dead letter(s), found {}: {:?}",
            dead_cases.len(),
            dead.len(),
            dead.iter().map(|d| &d.reason).collect::<Vec<_>>()
        ));
    }
    for (case, letter) in dead_cases.iter().zip(&dead) {
        let expect = &case.file.expect;
        if Some(&letter.reason) != expect.reason.as_ref() {
            problems.push(format!(
                "{}: reason `{}`, expected `{}` ({})",
                case.name,
                letter.reason,
                expect.reason.as_deref().unwrap_or_default(),
                letter.detail
            ));
        }
        for fragment in &expect.detail {
            if !letter.detail.contains(fragment.as_str()) {
                problems.push(format!(
                    "{}: detail lacks `{fragment}`: {}",
                    case.name, letter.detail
                ));
            }
        }
        if letter.detail.trim().is_empty() {
            problems.push(format!("{}: no detail", case.name));
        }
        let limit = expect.max_detail_chars.unwrap_or(2000);
        if letter.detail.chars().count() > limit {
            problems.push(format!(
                "{}: detail of {} characters, more than {limit}",
                case.name,
                letter.detail.chars().count()
            ));
        }
        if letter.detail.contains(HMAC_KEY) {
            problems.push(format!("{}: the signing key is in the detail", case.name));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with {} bad message case(s):\n- {}\n\nworker log:\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n- "),
        cluster.worker_log(0)
    );

    // The worker is alive and well.
    assert!(cluster.workers[0].try_wait().unwrap().is_none());
    assert!(!cluster.worker_log(0).contains("panicked"));
    // Nothing was written but the good task: the shadow holds the same data (re-applying the
    // same source changes nothing), only REISSUED was applied again, the target is untouched.
    assert_eq!(
        checksum(&warehouse, &run.shadow_table, None).await,
        shadow_before
    );
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        target_before
    );
    for partition in store.partitions(&run_id).await.unwrap() {
        let before = applied_before[&partition.partition_key];
        let expected = before + i64::from(partition.partition_key == REISSUED);
        assert_eq!(
            partition.times_applied, expected,
            "partition {}",
            partition.partition_key
        );
    }
    let checkpoints = count(
        &warehouse,
        &format!(
            "SELECT count(*) FROM {} WHERE run_id = '{run_id}' AND kind = 'partition_done'",
            store.table("events")
        ),
    )
    .await;
    assert_eq!(checkpoints, applied_before.values().sum::<i64>() + 1);

    assert_eq!(cluster.terminate(0, Duration::from_secs(15)), Some(0));
    assert_eq!(
        broker
            .queue_depth(&broker.topology.task_queue("demo"))
            .await
            .unwrap(),
        0
    );
    broker
        .delete_queue(&broker.topology.results_queue(&run_id))
        .await
        .unwrap();
    broker.close().await;
}
