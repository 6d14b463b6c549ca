//! The per-warehouse concurrency limit as a capability trait. A lease is one slot; dropping it
//! frees the slot. The in-memory implementation serves the embedded mode and tests; the Redis
//! implementation (distributed mode) has the same contract.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::BackfillError;

/// One held slot of a semaphore. Dropping it releases the slot.
pub struct Lease {
    _inner: Box<dyn Send + Sync>,
    lost: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Lease {
    pub fn new(inner: impl Send + Sync + 'static) -> Lease {
        Lease {
            _inner: Box::new(inner),
            lost: None,
        }
    }

    /// A lease that can be lost before it is dropped (e.g. it expired in Redis): `lost` turns
    /// true then, and whoever holds the lease must stop the work it guards.
    pub fn with_loss_signal(
        inner: impl Send + Sync + 'static,
        lost: tokio::sync::watch::Receiver<bool>,
    ) -> Lease {
        Lease {
            _inner: Box::new(inner),
            lost: Some(lost),
        }
    }

    /// Resolves when the lease is lost; never, for leases that cannot be lost.
    pub async fn lost(&self) {
        match &self.lost {
            Some(lost) => {
                let mut lost = lost.clone();
                let _ = lost.wait_for(|lost| *lost).await;
                if !*lost.borrow() {
                    // the sender is gone without reporting a loss: the lease ended normally
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

pub trait Semaphore: Send + Sync + 'static {
    /// Waits for a slot of `resource` (a warehouse name) whose limit is `limit`.
    fn acquire(
        &self,
        resource: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Lease, BackfillError>> + Send;
}

/// Counting semaphore inside one process. Also records the highest number of simultaneous
/// holders per resource, which tests use to prove the limit held.
#[derive(Default, Clone)]
pub struct InMemorySemaphore {
    inner: Arc<Mutex<HashMap<String, Arc<Slot>>>>,
}

struct Slot {
    semaphore: Arc<tokio::sync::Semaphore>,
    limit: u32,
    holders: AtomicUsize,
    peak: AtomicUsize,
}

struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    slot: Arc<Slot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slot.holders.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InMemorySemaphore {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, resource: &str, limit: u32) -> Arc<Slot> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(resource.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    semaphore: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
                    limit,
                    holders: AtomicUsize::new(0),
                    peak: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Highest number of leases held at once on `resource`.
    pub fn peak_holders(&self, resource: &str) -> usize {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(resource)
            .map_or(0, |s| s.peak.load(Ordering::SeqCst))
    }
}

impl Semaphore for InMemorySemaphore {
    async fn acquire(&self, resource: &str, limit: u32) -> Result<Lease, BackfillError> {
        let slot = self.slot(resource, limit);
        if slot.limit != limit {
            return Err(BackfillError::Semaphore(format!(
                "warehouse {resource} is already limited to {} in this process; a second limit of {limit} would break the first",
                slot.limit
            )));
        }
        let permit = slot
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackfillError::Semaphore("semaphore closed".into()))?;
        let now = slot.holders.fetch_add(1, Ordering::SeqCst) + 1;
        slot.peak.fetch_max(now, Ordering::SeqCst);
        Ok(Lease::new(Held {
            _permit: permit,
            slot,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_more_holders_than_the_limit() {
        let semaphore = InMemorySemaphore::new();
        let mut handles = Vec::new();
        for _ in 0..20 {
            let s = semaphore.clone();
            handles.push(tokio::spawn(async move {
                let _lease = s.acquire("wh", 3).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(semaphore.peak_holders("wh"), 3);
    }
}
