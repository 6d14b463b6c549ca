//! The task queue as a capability trait: publish partition tasks, receive them one at a time,
//! and settle each delivery: ack after the checkpoint commits, hand it back (nack), or
//! dead-letter it with a reason. The in-memory queue serves the embedded mode and has the same
//! contract as the RabbitMQ queue of the distributed mode, delivery limit included; one
//! conformance suite (tests/tests/queue_conformance.rs) runs against both.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::envelope::TaskMessage;
use crate::error::BackfillError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How many times a task is delivered before it is dead-lettered (RabbitMQ's
/// `x-delivery-limit` says the same to the broker).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// Settles one delivery.
pub trait Settle: Send {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>>;
    fn nack(self: Box<Self>, requeue: bool) -> BoxFuture<'static, Result<(), BackfillError>>;
    /// Returns a task that never started (its worker is stopping, got no lease in time, or
    /// cannot reach the warehouse) without counting this delivery: the next one carries the
    /// same `delivery_count`. A rolling restart of the whole fleet must not use up a task's
    /// deliveries. Should the queue deliver it twice after a
    /// failure half-way, the second copy is stale (claims fence it), never lost.
    fn hand_back(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>>;
    /// Moves the message to the dead-letter queue with a reason, and acks it.
    fn dead_letter(
        self: Box<Self>,
        reason: &'static str,
        detail: String,
    ) -> BoxFuture<'static, Result<(), BackfillError>>;
}

pub struct Delivery {
    pub message: TaskMessage,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub delivery_count: u32,
    /// The W3C trace context of the span that published the task (`traceparent`, …), so the
    /// partition's span joins the run's trace. Empty when tracing is off.
    pub trace_context: HashMap<String, String>,
    settle: Box<dyn Settle>,
}

impl Delivery {
    pub fn new(message: TaskMessage, delivery_count: u32, settle: Box<dyn Settle>) -> Delivery {
        Delivery {
            message,
            delivery_count,
            trace_context: HashMap::new(),
            settle,
        }
    }

    pub fn with_trace_context(mut self, trace_context: HashMap<String, String>) -> Delivery {
        self.trace_context = trace_context;
        self
    }

    pub async fn ack(self) -> Result<(), BackfillError> {
        self.settle.ack().await
    }

    pub async fn nack(self, requeue: bool) -> Result<(), BackfillError> {
        self.settle.nack(requeue).await
    }

    /// See [`Settle::hand_back`].
    pub async fn hand_back(self) -> Result<(), BackfillError> {
        self.settle.hand_back().await
    }

    pub async fn dead_letter(
        self,
        reason: &'static str,
        detail: String,
    ) -> Result<(), BackfillError> {
        self.settle.dead_letter(reason, detail).await
    }
}

pub trait TaskQueue: Send + Sync + 'static {
    /// Publishes a task with the current span's trace context.
    fn publish(
        &self,
        message: TaskMessage,
    ) -> impl Future<Output = Result<(), BackfillError>> + Send;
    /// The next task, or None once the queue is closed and drained (the RabbitMQ queue is
    /// never closed by its consumers: it waits).
    fn receive(&self) -> impl Future<Output = Result<Option<Delivery>, BackfillError>> + Send;
}

/// A dead-lettered message with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: Option<TaskMessage>,
    pub reason: String,
    pub detail: String,
}

/// FIFO queue inside one process.
#[derive(Clone)]
pub struct InMemoryQueue {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<QueueState>,
    notify: tokio::sync::Notify,
    delivery_limit: u32,
}

/// A task waiting in the in-memory queue: the message, its deliveries so far, its trace context.
type Ready = (TaskMessage, u32, HashMap<String, String>);

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Ready>,
    unacked: usize,
    closed: bool,
    dead: Vec<DeadLetter>,
}

impl Default for InMemoryQueue {
    fn default() -> Self {
        Self::with_delivery_limit(DEFAULT_DELIVERY_LIMIT)
    }
}

impl InMemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_delivery_limit(delivery_limit: u32) -> Self {
        InMemoryQueue {
            inner: Arc::new(Inner {
                state: Mutex::new(QueueState::default()),
                notify: tokio::sync::Notify::new(),
                delivery_limit: delivery_limit.max(1),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// No more tasks will be published: receivers get None once the queue is drained.
    pub fn close(&self) {
        self.state().closed = true;
        self.inner.notify.notify_waiters();
    }

    /// Tasks published and not yet settled (ready or in flight).
    pub fn outstanding(&self) -> usize {
        let state = self.state();
        state.ready.len() + state.unacked
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state().dead.clone()
    }
}

struct InMemorySettle {
    inner: Arc<Inner>,
    message: TaskMessage,
    delivery_count: u32,
    trace_context: HashMap<String, String>,
}

/// How an in-memory delivery is settled.
enum Settlement {
    Ack,
    Requeue,
    /// Requeued without counting the delivery.
    HandBack,
    Dead(String, String),
}

impl InMemorySettle {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let inner = self.inner.clone();
        {
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.unacked -= 1;
            let InMemorySettle {
                message,
                delivery_count,
                trace_context,
                ..
            } = *self;
            match settlement {
                Settlement::Ack => {}
                Settlement::Dead(reason, detail) => state.dead.push(DeadLetter {
                    message: Some(message),
                    reason,
                    detail,
                }),
                Settlement::Requeue if delivery_count >= inner.delivery_limit => {
                    state.dead.push(DeadLetter {
                        message: Some(message),
                        reason: "delivery_limit".into(),
                        detail: format!("delivered {delivery_count} times"),
                    })
                }
                Settlement::Requeue => {
                    state
                        .ready
                        .push_back((message, delivery_count, trace_context))
                }
                Settlement::HandBack => {
                    state
                        .ready
                        .push_back((message, delivery_count - 1, trace_context))
                }
            }
        }
        // Wake every receiver: one may take the requeued task, and receivers of a closed
        // queue finish once nothing is in flight.
        inner.notify.notify_waiters();
    }
}

impl Settle for InMemorySettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            self.settle(Settlement::Ack);
            Ok(())
        })
    }

    fn nack(self: Box<Self>, requeue: bool) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            self.settle(if requeue {
                Settlement::Requeue
            } else {
                Settlement::Ack
            });
            Ok(())
        })
    }

    fn hand_back(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            self.settle(Settlement::HandBack);
            Ok(())
        })
    }

    fn dead_letter(
        self: Box<Self>,
        reason: &'static str,
        detail: String,
    ) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            self.settle(Settlement::Dead(reason.to_string(), detail));
            Ok(())
        })
    }
}

impl TaskQueue for InMemoryQueue {
    async fn publish(&self, message: TaskMessage) -> Result<(), BackfillError> {
        {
            let mut state = self.state();
            if state.closed {
                return Err(BackfillError::Queue("queue is closed".into()));
            }
            state
                .ready
                .push_back((message, 0, crate::telemetry::current_trace_context()));
        }
        self.inner.notify.notify_one();
        Ok(())
    }

    async fn receive(&self) -> Result<Option<Delivery>, BackfillError> {
        loop {
            let notified = self.inner.notify.notified();
            {
                let mut state = self.state();
                if let Some((message, deliveries, trace_context)) = state.ready.pop_front() {
                    state.unacked += 1;
                    let settle = InMemorySettle {
                        inner: self.inner.clone(),
                        message: message.clone(),
                        delivery_count: deliveries + 1,
                        trace_context: trace_context.clone(),
                    };
                    return Ok(Some(
                        Delivery::new(message, deliveries + 1, Box::new(settle))
                            .with_trace_context(trace_context),
                    ));
                }
                if state.closed && state.unacked == 0 {
                    return Ok(None);
                }
            }
            notified.await;
        }
    }
}
