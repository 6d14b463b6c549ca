//! Faults of the services themselves, each on a private RabbitMQ node or Redis server
//! (`backfill_tests::services`), so breaking them disturbs no other test: a broker that comes
//! back without its queues, a Redis that comes back without its leases.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backfill_common::redis_semaphore::RedisSemaphore;
use backfill_common::semaphore::Semaphore;
use backfill_tests::services::PrivateRedis;
use backfill_tests::*;

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
