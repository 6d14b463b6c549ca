//! One conformance suite for every `Semaphore`: the in-memory one (embedded mode) and the Redis
//! one (distributed mode), so the fake can never drift from the real thing. Plus what only the
//! Redis one must do: survive a holder that dies without releasing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backfill_common::redis_semaphore::RedisSemaphore;
use backfill_common::semaphore::{InMemorySemaphore, Semaphore};
use backfill_tests::*;

/// Many tasks compete for 3 slots: never more than 3 at once, and every task gets one.
async fn limit_holds_under_contention<S: Semaphore + Clone>(semaphore: S, resource: &str) {
    let current = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..24 {
        let (semaphore, current, peak, resource) = (
            semaphore.clone(),
            current.clone(),
            peak.clone(),
            resource.to_string(),
        );
        handles.push(tokio::spawn(async move {
            let _lease = semaphore.acquire(&resource, 3).await.unwrap();
            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(15)).await;
            current.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for handle in handles {
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("every task gets a slot")
            .unwrap();
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "the limit is reached and never exceeded"
    );
}

/// Dropping a lease frees its slot for the next holder promptly.
async fn released_slots_are_reused<S: Semaphore>(semaphore: S, resource: &str) {
    for _ in 0..5 {
        let lease = tokio::time::timeout(Duration::from_secs(5), semaphore.acquire(resource, 1))
            .await
            .expect("slot available")
            .unwrap();
        drop(lease);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Resources are independent: a saturated warehouse does not block another.
async fn resources_are_independent<S: Semaphore>(semaphore: S, resource: &str) {
    let _held = semaphore.acquire(resource, 1).await.unwrap();
    let other = format!("{resource}-other");
    let lease = tokio::time::timeout(Duration::from_secs(5), semaphore.acquire(&other, 1)).await;
    assert!(lease.is_ok(), "another warehouse's slot is free");
}

macro_rules! semaphore_conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn limit_holds_under_contention() {
                let (semaphore, resource) = $make.await;
                super::limit_holds_under_contention(semaphore.clone(), &resource).await;
                semaphore.cleanup(&resource).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn released_slots_are_reused() {
                let (semaphore, resource) = $make.await;
                super::released_slots_are_reused(semaphore.clone(), &resource).await;
                semaphore.cleanup(&resource).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn resources_are_independent() {
                let (semaphore, resource) = $make.await;
                super::resources_are_independent(semaphore.clone(), &resource).await;
                semaphore.cleanup(&resource).await;
            }
        }
    };
}

/// Removes what a test left in the semaphore's store.
trait Cleanup {
    async fn cleanup(&self, resource: &str);
}

impl Cleanup for InMemorySemaphore {
    async fn cleanup(&self, _resource: &str) {}
}

impl Cleanup for RedisSemaphore {
    async fn cleanup(&self, resource: &str) {
        // leases are released on drop, asynchronously
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.clear(resource).await.unwrap();
        self.clear(&format!("{resource}-other")).await.unwrap();
    }
}

async fn in_memory() -> (InMemorySemaphore, String) {
    (InMemorySemaphore::new(), "warehouse".to_string())
}

async fn redis(ttl: Duration) -> (RedisSemaphore, String) {
    let prefix = unique_prefix("sem");
    let semaphore = RedisSemaphore::connect(&redis_url(), &prefix, ttl, "test")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "Redis must be running at {} for this test: {e}",
                redis_url()
            )
        });
    (semaphore, "warehouse".to_string())
}

semaphore_conformance!(in_memory_semaphore, in_memory());
semaphore_conformance!(redis_semaphore, redis(Duration::from_secs(10)));

/// A holder that dies without releasing (its runtime vanishes: no heartbeat, no release)
/// loses its slot when the lease expires, and the slot is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_of_a_dead_holder_expires() {
    let prefix = unique_prefix("sem");
    let ttl = Duration::from_millis(900);
    let url = redis_url();
    let dead_prefix = prefix.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let semaphore = RedisSemaphore::connect(&url, &dead_prefix, ttl, "doomed")
                .await
                .unwrap();
            let lease = semaphore.acquire("warehouse", 1).await.unwrap();
            std::mem::forget(lease); // the process "dies" holding it
        });
        // the runtime is dropped here: the heartbeat task dies with it
    })
    .join()
    .unwrap();
    let semaphore = RedisSemaphore::connect(&redis_url(), &prefix, ttl, "survivor")
        .await
        .unwrap();
    assert_eq!(
        semaphore.holders("warehouse").await.unwrap(),
        1,
        "the dead holder still has its slot"
    );
    let started = Instant::now();
    let lease = tokio::time::timeout(Duration::from_secs(10), semaphore.acquire("warehouse", 1))
        .await
        .expect("the slot comes back")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "it had to wait for the expiry ({waited:?})"
    );
    drop(lease);
    semaphore.clear("warehouse").await.unwrap();
}

/// A live holder keeps its lease past the TTL thanks to the heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_heartbeat_keeps_a_long_lease() {
    let (semaphore, resource) = redis(Duration::from_millis(600)).await;
    let lease = semaphore.acquire(&resource, 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(semaphore.holders(&resource).await.unwrap(), 1);
    let second =
        tokio::time::timeout(Duration::from_millis(500), semaphore.acquire(&resource, 1)).await;
    assert!(second.is_err(), "the slot is still taken");
    drop(lease);
    let third = tokio::time::timeout(Duration::from_secs(5), semaphore.acquire(&resource, 1)).await;
    assert!(third.is_ok(), "released on drop");
    assert_eq!(semaphore.peak_holders(&resource).await.unwrap(), 1);
    drop(third);
    tokio::time::sleep(Duration::from_millis(100)).await;
    semaphore.clear(&resource).await.unwrap();
}
