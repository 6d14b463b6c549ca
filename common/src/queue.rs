//! The task queue as a capability trait: publish partition tasks, receive them one at a time,
//! acknowledge after the checkpoint commits or hand them back. The in-memory queue serves the
//! embedded mode; the RabbitMQ queue (distributed mode) has the same contract.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::control::PartitionTask;
use crate::error::BackfillError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Settles one delivery: ack after the checkpoint committed, nack to hand it back.
pub trait Settle: Send {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>>;
    fn nack(self: Box<Self>, requeue: bool) -> BoxFuture<'static, Result<(), BackfillError>>;
}

pub struct Delivery {
    pub task: PartitionTask,
    settle: Box<dyn Settle>,
}

impl Delivery {
    pub fn new(task: PartitionTask, settle: Box<dyn Settle>) -> Delivery {
        Delivery { task, settle }
    }

    pub async fn ack(self) -> Result<(), BackfillError> {
        self.settle.ack().await
    }

    pub async fn nack(self, requeue: bool) -> Result<(), BackfillError> {
        self.settle.nack(requeue).await
    }
}

pub trait TaskQueue: Send + Sync + 'static {
    fn publish(
        &self,
        task: PartitionTask,
    ) -> impl Future<Output = Result<(), BackfillError>> + Send;
    /// The next task, or None once the queue is closed and drained.
    fn receive(&self) -> impl Future<Output = Result<Option<Delivery>, BackfillError>> + Send;
}

/// FIFO queue inside one process.
#[derive(Clone, Default)]
pub struct InMemoryQueue {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<QueueState>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<PartitionTask>,
    unacked: usize,
    closed: bool,
}

impl InMemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// No more tasks will be published: receivers get None once the queue is drained.
    pub fn close(&self) {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.inner.notify.notify_waiters();
    }

    /// Tasks published and not yet acknowledged (ready or in flight).
    pub fn outstanding(&self) -> usize {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.ready.len() + state.unacked
    }
}

struct InMemorySettle {
    inner: Arc<Inner>,
    task: Option<PartitionTask>,
}

impl Settle for InMemorySettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            self.inner
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unacked -= 1;
            // Receivers waiting on a closed queue finish once nothing is in flight.
            self.inner.notify.notify_waiters();
            Ok(())
        })
    }

    fn nack(mut self: Box<Self>, requeue: bool) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            {
                let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                state.unacked -= 1;
                if requeue && let Some(task) = self.task.take() {
                    state.ready.push_back(task);
                }
            }
            self.inner.notify.notify_waiters();
            Ok(())
        })
    }
}

impl TaskQueue for InMemoryQueue {
    async fn publish(&self, task: PartitionTask) -> Result<(), BackfillError> {
        {
            let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.closed {
                return Err(BackfillError::Queue("queue is closed".into()));
            }
            state.ready.push_back(task);
        }
        self.inner.notify.notify_one();
        Ok(())
    }

    async fn receive(&self) -> Result<Option<Delivery>, BackfillError> {
        loop {
            let notified = self.inner.notify.notified();
            {
                let mut state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(task) = state.ready.pop_front() {
                    state.unacked += 1;
                    let settle = InMemorySettle {
                        inner: self.inner.clone(),
                        task: Some(task.clone()),
                    };
                    return Ok(Some(Delivery::new(task, Box::new(settle))));
                }
                if state.closed && state.unacked == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(key: &str) -> PartitionTask {
        PartitionTask {
            run_id: "r".into(),
            spec_hash: "h".into(),
            partition_key: key.into(),
            range_start: key.into(),
            range_end: key.into(),
            attempt: 1,
            fencing_token: 1,
        }
    }

    #[tokio::test]
    async fn nacked_tasks_come_back_and_close_drains() {
        let queue = InMemoryQueue::new();
        queue.publish(task("a")).await.unwrap();
        queue.publish(task("b")).await.unwrap();
        queue.close();
        let first = queue.receive().await.unwrap().unwrap();
        assert_eq!(first.task.partition_key, "a");
        first.nack(true).await.unwrap();
        let second = queue.receive().await.unwrap().unwrap();
        assert_eq!(second.task.partition_key, "b");
        second.ack().await.unwrap();
        let again = queue.receive().await.unwrap().unwrap();
        assert_eq!(again.task.partition_key, "a");
        again.ack().await.unwrap();
        assert!(queue.receive().await.unwrap().is_none());
        assert_eq!(queue.outstanding(), 0);
    }
}
