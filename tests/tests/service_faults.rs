//! Faults of the services themselves, each on a private RabbitMQ node or Redis server
//! (`backfill_tests::services`), so breaking them disturbs no other test: a broker that comes
//! back without its queues, a Redis that comes back without its leases.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backfill_common::control::PartitionState;
use backfill_common::redis_semaphore::RedisSemaphore;
use backfill_common::semaphore::Semaphore;
use backfill_coordinator::demo;
use backfill_tests::cluster::Cluster;
use backfill_tests::services::{PrivateBroker, PrivateRedis};
use backfill_tests::*;

/// The mini challenge's whole 10-day window, each partition sleeping inside its transaction.
fn slow_spec(seconds: f64) -> String {
    mini_challenge_spec(&[
        (
            "FROM staging_order_items\n",
            &format!("FROM staging_order_items CROSS JOIN (SELECT pg_sleep({seconds})) AS slow\n"),
        ),
        (
            "first = \"2024-03-03\"\nlast = \"2024-03-06\"",
            "first = \"2024-03-01\"\nlast = \"2024-03-10\"",
        ),
        (
            "[[audit]]\n# the fix halves",
            "[[audit]]\nseverity = \"warn\"\n# the fix halves",
        ),
    ])
}

/// The coordinator published its tasks, then the broker restarted without its database: the
/// tasks, the queues and the run's result queue are gone. The coordinator notices (its result
/// queue is missing when it reconnects), publishes the unsettled partitions' tasks again, and
/// the run completes with every partition applied once. Before the fix it waited at its
/// barrier for good: nothing would ever run the lost tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_queues_gets_the_unsettled_tasks_again() {
    let (mut broker, redis) =
        tokio::task::block_in_place(|| (PrivateBroker::start(), PrivateRedis::start()));
    let db = TestDatabase::postgres().await;
    let warehouse = db.warehouse().await;
    demo::seed_mini_challenge(&warehouse).await.unwrap();
    let mut cluster = Cluster::with_services("demo", &db.url, &broker.url(), &redis.url());
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("slow.toml");
    std::fs::write(&spec, slow_spec(0.2)).unwrap();
    let coordinator = cluster
        .backfill(&["run", spec.to_str().unwrap(), "--no-progress"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // No worker yet: wait until the 10 tasks sit in the queue.
    let probe = cluster.broker().await;
    let task_queue = probe.topology.task_queue("demo");
    let started = Instant::now();
    while probe.queue_depth(&task_queue).await.unwrap() < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the coordinator did not publish its tasks"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    probe.close().await;
    tokio::task::block_in_place(|| broker.restart_node(true));
    let probe = cluster.broker().await;
    assert_eq!(
        probe.queue_depth(&task_queue).await.unwrap(),
        0,
        "the wiped broker lost the tasks"
    );
    probe.close().await;
    cluster.start_worker(&[]);
    cluster.start_worker(&[]);
    let output = tokio::task::spawn_blocking(move || {
        wait_within(coordinator, Duration::from_secs(120), "the coordinator")
    })
    .await
    .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains("lost the run's queues"),
        "the coordinator saw the loss: {shown}"
    );
    let store = control_store(&warehouse);
    let run_id = store.all_runs().await.unwrap().remove(0).run_id;
    for p in store.partitions(&run_id).await.unwrap() {
        assert_eq!(
            (p.state, p.times_applied),
            (PartitionState::Done, 1),
            "partition {} applied once",
            p.partition_key
        );
    }
    assert_eq!(
        checksum(&warehouse, "fact_order_items", None).await,
        checksum(&warehouse, "expected_order_items", None).await
    );
    assert_eq!(store.archives().await.unwrap().len(), 1, "published once");
    drop(cluster);
    tokio::task::block_in_place(move || {
        drop(broker);
        drop(redis);
    });
}

/// A worker holds the only slot; Redis is killed and restarted empty, so the lease is gone
/// while the work it guards goes on. Another worker asking for the slot must not get it
/// before the first one has given its work up (its renewal finds the lease gone). Before the
/// fix the restarted server granted the slot at once: two holders of a limit of 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_no_lease_is_granted_before_the_lost_ones_are_given_up() {
    let mut redis = tokio::task::block_in_place(PrivateRedis::start);
    let prefix = unique_prefix("restart");
    let ttl = Duration::from_millis(1500);
    let first = RedisSemaphore::connect(&redis.url(), &prefix, ttl, "first")
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(30), first.acquire("warehouse", 1))
        .await
        .expect("a fresh server grants a lease within its first TTL or so")
        .unwrap();
    tokio::task::block_in_place(|| redis.restart());
    // Who came first: 1 = the holder gave up, 2 = the other got the slot.
    let order = Arc::new(AtomicU32::new(0));
    let sequence = Arc::new(AtomicU32::new(0));
    let second = RedisSemaphore::connect(&redis.url(), &prefix, ttl, "second")
        .await
        .unwrap();
    let granted = {
        let (order, sequence) = (order.clone(), sequence.clone());
        tokio::spawn(async move {
            let lease = second.acquire("warehouse", 1).await.unwrap();
            let n = sequence.fetch_add(1, Ordering::SeqCst);
            order.fetch_or(if n == 0 { 2 } else { 0 }, Ordering::SeqCst);
            lease
        })
    };
    tokio::time::timeout(Duration::from_secs(30), held.lost())
        .await
        .expect("the holder learns that its lease is gone");
    let n = sequence.fetch_add(1, Ordering::SeqCst);
    if n == 0 {
        order.fetch_or(1, Ordering::SeqCst);
    }
    let _second_lease = tokio::time::timeout(Duration::from_secs(30), granted)
        .await
        .expect("the slot is granted again once the lost lease was given up")
        .unwrap();
    assert_eq!(
        order.load(Ordering::SeqCst),
        1,
        "the holder gave its work up before the slot was granted again"
    );
    drop(held);
    tokio::task::block_in_place(move || drop(redis));
}
