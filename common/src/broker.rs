//! RabbitMQ: the topology, publishing with confirms, and the `TaskQueue` of the distributed
//! mode.
//!
//! Per warehouse: a durable quorum queue `<prefix>.tasks.<warehouse>` with `x-delivery-limit`
//! and dead-lettering (at-least-once) into `<prefix>.dead.<warehouse>`, so a saturated or
//! poisoned warehouse never starves another. Per run: `<prefix>.results.<run>` for results.
//! Every publish waits for the broker's confirm. A worker acks only after the checkpoint
//! committed; messages it refuses are re-published to the dead-letter exchange with an
//! `x-bf-reason` header, then acked. Declaring is idempotent: both binaries do it at start.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::envelope::{
    HEADER_DETAIL, HEADER_KEY_ID, HEADER_PRIOR_DELIVERIES, HEADER_REASON, HEADER_SIGNATURE,
    Keyring, Message, Rejection, ResultMessage, TaskMessage,
};
use crate::error::BackfillError;
use crate::queue::{BoxFuture, DeadLetter, Delivery, Settle, TaskQueue};
use crate::warehouse::redact_secrets;

/// The W3C trace-context headers a task carries.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];
/// Longer trace headers are dropped, not parsed (W3C tracestate is at most 512 characters).
const MAX_TRACE_HEADER_LEN: usize = 1024;
/// How long closing a connection or channel may wait for the broker.
const CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

fn broker_error(error: lapin::Error) -> BackfillError {
    BackfillError::Queue(redact_secrets(&error.to_string()))
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn header_number(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(*n as i64),
        AMQPValue::LongUInt(n) => Some(*n as i64),
        AMQPValue::ShortInt(n) => Some(*n as i64),
        AMQPValue::ShortUInt(n) => Some(*n as i64),
        AMQPValue::ShortShortInt(n) => Some(*n as i64),
        AMQPValue::ShortShortUInt(n) => Some(*n as i64),
        _ => None,
    }
}

/// Names of everything a deployment declares, under one prefix (tests use a unique one).
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn task_queue(&self, warehouse: &str) -> String {
        format!("{}.tasks.{warehouse}", self.prefix)
    }
    pub fn dead_queue(&self, warehouse: &str) -> String {
        format!("{}.dead.{warehouse}", self.prefix)
    }
    pub fn results_queue(&self, run_id: &str) -> String {
        format!("{}.results.{run_id}", self.prefix)
    }
}

pub struct Broker {
    connection: std::sync::Arc<Connection>,
    publisher: Channel,
    pub topology: Topology,
    pub keyring: Keyring,
    pub delivery_limit: u32,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("topology", &self.topology)
            .finish()
    }
}

impl Broker {
    pub async fn connect(
        url: &str,
        prefix: &str,
        keyring: Keyring,
        delivery_limit: u32,
    ) -> Result<Broker, BackfillError> {
        // Named after the deployment prefix, so operators (and tests) can tell connections apart.
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("backfill {prefix}").into_bytes()));
        let connection = Connection::connect(url, properties).await.map_err(|e| {
            BackfillError::Queue(format!(
                "connecting to {}: {}",
                redact_secrets(url),
                redact_secrets(&e.to_string())
            ))
        })?;
        let publisher = connection.create_channel().await.map_err(broker_error)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_error)?;
        Ok(Broker {
            connection: std::sync::Arc::new(connection),
            publisher,
            topology: Topology {
                prefix: prefix.to_string(),
            },
            keyring,
            delivery_limit: delivery_limit.max(1),
        })
    }

    /// Closes the connection, waiting at most `CLOSE_WITHIN` for the broker's answer: closing
    /// is best effort, and lapin's close can wait forever when the socket goes away during
    /// the handshake (a coordinator hung there after its barrier, with its run done).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_WITHIN, self.connection.close(200, "bye".into())).await;
    }

    /// Declares the exchanges and a warehouse's task and dead-letter queues. Idempotent.
    pub async fn declare_warehouse(&self, warehouse: &str) -> Result<(), BackfillError> {
        let t = &self.topology;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let channel = &self.publisher;
        channel
            .exchange_declare(
                t.tasks_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        channel
            .exchange_declare(
                t.dead_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), text("quorum"));
        let mut dead_args = quorum.clone();
        dead_args.insert("x-queue-type".into(), text("quorum"));
        let mut task_args = quorum;
        // RabbitMQ counts returns, not deliveries: a limit of n returns allows n + 1 deliveries.
        task_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32 - 1),
        );
        task_args.insert("x-dead-letter-exchange".into(), text(&t.dead_exchange()));
        task_args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        task_args.insert("x-overflow".into(), text("reject-publish"));
        let queue_options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(t.dead_queue(warehouse).into(), queue_options, dead_args)
            .await
            .map_err(broker_error)?;
        channel
            .queue_bind(
                t.dead_queue(warehouse).into(),
                t.dead_exchange().into(),
                warehouse.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        channel
            .queue_declare(t.task_queue(warehouse).into(), queue_options, task_args)
            .await
            .map_err(|e| {
                BackfillError::Queue(format!(
                    "declaring {}: {} (if it exists with other arguments, delete it or use another --queue-prefix)",
                    t.task_queue(warehouse),
                    redact_secrets(&e.to_string())
                ))
            })?;
        channel
            .queue_bind(
                t.task_queue(warehouse).into(),
                t.tasks_exchange().into(),
                warehouse.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    /// Declares the durable queue a run's results come back on. Idempotent, so a restarted
    /// coordinator finds the results sent while it was away.
    pub async fn declare_results(&self, run_id: &str) -> Result<String, BackfillError> {
        let name = self.topology.results_queue(run_id);
        self.publisher
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        Ok(name)
    }

    pub async fn delete_queue(&self, name: &str) -> Result<(), BackfillError> {
        self.publisher
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .map_err(broker_error)?;
        Ok(())
    }

    /// Removes a warehouse's queues and the exchanges (tests clean up with it).
    pub async fn delete_topology(&self, warehouse: &str) -> Result<(), BackfillError> {
        let t = &self.topology;
        self.delete_queue(&t.task_queue(warehouse)).await?;
        self.delete_queue(&t.dead_queue(warehouse)).await?;
        for exchange in [t.tasks_exchange(), t.dead_exchange()] {
            self.publisher
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await
                .map_err(broker_error)?;
        }
        Ok(())
    }

    /// Messages waiting in a queue (0 when it does not exist).
    pub async fn queue_depth(&self, name: &str) -> Result<u32, BackfillError> {
        // A failed passive declare closes its channel: use a throwaway one.
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        let depth = match channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(queue) => queue.message_count(),
            Err(_) => 0,
        };
        let _ = channel.close(200, "done".into()).await;
        Ok(depth)
    }

    /// Whether a queue exists. Only a broker's "not found" answers false; losing the
    /// connection is an error, not an answer.
    pub async fn queue_exists(&self, name: &str) -> Result<bool, BackfillError> {
        // A failed passive declare closes its channel: use a throwaway one.
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        let declared = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                let _ = tokio::time::timeout(CLOSE_WITHIN, channel.close(200, "done".into())).await;
                Ok(true)
            }
            Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404) => {
                Ok(false)
            }
            Err(error) => Err(broker_error(error)),
        }
    }

    async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BackfillError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(ShortString::from("application/msgpack"))
            .with_headers(headers);
        let confirmation = self
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .map_err(broker_error)?
            .await
            .map_err(broker_error)?;
        match confirmation {
            lapin::Confirmation::Ack(None) => Ok(()),
            lapin::Confirmation::Ack(Some(_)) => Err(BackfillError::Queue(format!(
                "the broker could not route a message to `{routing_key}` on `{exchange}`: is the queue declared?"
            ))),
            _ => Err(BackfillError::Queue(format!(
                "the broker refused a message for `{routing_key}` (nack)"
            ))),
        }
    }

    /// Signs and publishes a message, waiting for the broker's confirm.
    pub async fn publish_message(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<(), BackfillError> {
        self.publish_signed(exchange, routing_key, message, FieldTable::default())
            .await
    }

    /// Signs `message` and publishes it with `headers` plus the signature headers.
    async fn publish_signed(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &Message,
        mut headers: FieldTable,
    ) -> Result<(), BackfillError> {
        let (body, key_id, signature) = self.keyring.seal(message);
        headers.insert(HEADER_KEY_ID.into(), text(&key_id));
        headers.insert(HEADER_SIGNATURE.into(), text(&signature));
        self.publish_raw(exchange, routing_key, &body, headers)
            .await
    }

    /// Signs and publishes a task; the current span's W3C trace context travels in the
    /// `traceparent` / `tracestate` headers (outside the signature: it only links traces).
    pub async fn publish_task(&self, message: &TaskMessage) -> Result<(), BackfillError> {
        let mut headers = FieldTable::default();
        for (name, value) in crate::telemetry::current_trace_context() {
            if TRACE_HEADERS.contains(&name.as_str()) {
                headers.insert(name.as_str().into(), text(&value));
            }
        }
        self.publish_signed(
            &self.topology.tasks_exchange(),
            &message.warehouse,
            &Message::Task(message.clone()),
            headers,
        )
        .await
    }

    pub async fn publish_result(
        &self,
        queue: &str,
        message: &ResultMessage,
    ) -> Result<(), BackfillError> {
        self.publish_message("", queue, &Message::Result(message.clone()))
            .await
    }

    /// Publishes an arbitrary body with arbitrary headers to a warehouse's task queue. Only for
    /// tests that forge messages.
    pub async fn publish_unchecked(
        &self,
        warehouse: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<(), BackfillError> {
        self.publish_raw(&self.topology.tasks_exchange(), warehouse, body, headers)
            .await
    }

    /// Re-publishes a refused message to the warehouse's dead-letter queue with the reason.
    async fn dead_letter(
        &self,
        warehouse: &str,
        body: &[u8],
        headers: Option<&FieldTable>,
        reason: &str,
        detail: &str,
    ) -> Result<(), BackfillError> {
        let mut headers = headers.cloned().unwrap_or_default();
        headers.insert(HEADER_REASON.into(), text(reason));
        // Details travel to operators: never let a secret ride along.
        headers.insert(
            HEADER_DETAIL.into(),
            text(
                &redact_secrets(detail)
                    .chars()
                    .take(2000)
                    .collect::<String>(),
            ),
        );
        self.publish_raw(&self.topology.dead_exchange(), warehouse, body, headers)
            .await
    }

    /// The task a parked message carries, if it verifies (forged ones carry nothing usable).
    fn verified_task(&self, delivery: &lapin::message::Delivery) -> Option<TaskMessage> {
        let headers = delivery.properties.headers().as_ref();
        match self.keyring.open(
            &delivery.data,
            header_text(headers, HEADER_KEY_ID).as_deref(),
            header_text(headers, HEADER_SIGNATURE).as_deref(),
        ) {
            Ok(Message::Task(task)) => Some(task),
            _ => None,
        }
    }

    /// Reads the dead-letter queue of a warehouse without consuming it (messages go back).
    /// Messages the broker dead-lettered itself carry `x-death` instead of our reason.
    pub async fn dead_letters(
        &self,
        warehouse: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BackfillError> {
        let swept = self.sweep_dead_letters(warehouse, limit, |_| false).await?;
        Ok(swept.into_iter().map(|(letter, _)| letter).collect())
    }

    /// Removes dead letters of the given run (after a resubmit republished them).
    pub async fn purge_dead_letters(
        &self,
        warehouse: &str,
        run_id: &str,
    ) -> Result<usize, BackfillError> {
        let swept = self
            .sweep_dead_letters(warehouse, usize::MAX, |letter| {
                letter
                    .message
                    .as_ref()
                    .is_some_and(|m| m.task.run_id == run_id)
            })
            .await?;
        Ok(swept.iter().filter(|(_, removed)| *removed).count())
    }

    /// Takes up to `limit` messages of a warehouse's dead-letter queue, acks (removes) those
    /// `remove` picks and puts the others back; returns each letter with whether it was removed.
    async fn sweep_dead_letters(
        &self,
        warehouse: &str,
        limit: usize,
        remove: impl Fn(&DeadLetter) -> bool,
    ) -> Result<Vec<(DeadLetter, bool)>, BackfillError> {
        // A broker that lost its state (or never saw this warehouse) has no dead-letter queue
        // until a worker or coordinator declares it again: no queue, no letters.
        if !self
            .queue_exists(&self.topology.dead_queue(warehouse))
            .await?
        {
            return Ok(Vec::new());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        let mut swept = Vec::new();
        let mut last_kept = None;
        while swept.len() < limit {
            let Some(got) = channel
                .basic_get(
                    self.topology.dead_queue(warehouse).into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(broker_error)?
            else {
                break;
            };
            let delivery = got.delivery;
            let headers = delivery.properties.headers().as_ref();
            let letter = DeadLetter {
                message: self.verified_task(&delivery),
                reason: header_text(headers, HEADER_REASON)
                    .unwrap_or_else(|| broker_death_reason(headers)),
                detail: header_text(headers, HEADER_DETAIL).unwrap_or_default(),
            };
            let removed = remove(&letter);
            if removed {
                settled(delivery.acker.ack(BasicAckOptions::default()).await)?;
            } else {
                last_kept = Some(delivery.delivery_tag);
            }
            swept.push((letter, removed));
        }
        // One multiple nack of the last kept tag puts back every message taken and not removed
        // (the removed ones are already acked).
        if let Some(last) = last_kept {
            channel
                .basic_nack(
                    last,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(broker_error)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(swept)
    }

    /// A consumer of a warehouse's task queue on its own channel, `prefetch` messages at most
    /// in flight (one per partition the worker may run at once).
    pub async fn task_queue(
        &self,
        warehouse: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<RabbitTaskQueue, BackfillError> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(broker_error)?;
        let consumer = channel
            .basic_consume(
                self.topology.task_queue(warehouse).into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        Ok(RabbitTaskQueue {
            broker: self.clone_handle().await?,
            warehouse: warehouse.to_string(),
            consumer: tokio::sync::Mutex::new(consumer),
            channel,
        })
    }

    /// A consumer of a run's result queue.
    pub async fn results(&self, run_id: &str) -> Result<ResultStream, BackfillError> {
        let queue = self.declare_results(run_id).await?;
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        channel
            .basic_qos(100, BasicQosOptions::default())
            .await
            .map_err(broker_error)?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "coordinator".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error)?;
        Ok(ResultStream {
            consumer,
            keyring: self.keyring.clone(),
            _channel: channel,
        })
    }

    /// Another handle on the same connection, with its own confirm-mode publishing channel.
    async fn clone_handle(&self) -> Result<std::sync::Arc<Broker>, BackfillError> {
        let publisher = self
            .connection
            .create_channel()
            .await
            .map_err(broker_error)?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker_error)?;
        Ok(std::sync::Arc::new(Broker {
            connection: self.connection.clone(),
            publisher,
            topology: self.topology.clone(),
            keyring: self.keyring.clone(),
            delivery_limit: self.delivery_limit,
        }))
    }
}

/// Why the broker itself dead-lettered a message (`x-death[0].reason`, e.g. delivery_limit).
fn broker_death_reason(headers: Option<&FieldTable>) -> String {
    let reason = headers.and_then(|h| match h.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(death) => header_text(Some(death), "reason"),
            _ => None,
        }),
        _ => None,
    });
    reason.unwrap_or_else(|| "unknown".to_string())
}

/// The task queue of one warehouse, as a worker consumes it.
pub struct RabbitTaskQueue {
    broker: std::sync::Arc<Broker>,
    warehouse: String,
    consumer: tokio::sync::Mutex<lapin::Consumer>,
    channel: Channel,
}

impl RabbitTaskQueue {
    /// Stops receiving (SIGTERM): the broker redelivers nothing more to this consumer;
    /// unacked deliveries go back to the queue when the channel closes.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            CLOSE_WITHIN,
            self.channel.close(200, "worker stopping".into()),
        )
        .await;
    }
}

struct RabbitSettle {
    acker: lapin::Acker,
    broker: std::sync::Arc<Broker>,
    warehouse: String,
    body: Vec<u8>,
    headers: Option<FieldTable>,
    delivery_count: u32,
}

/// A handed-back task's prior deliveries are capped: the header is outside the signature.
const MAX_PRIOR_DELIVERIES: i64 = 1000;

/// The headers a message is published again with: its own (signature, trace context), without
/// what the broker added on its way (delivery count, deaths), and with how many deliveries it
/// had before.
fn republished_headers(headers: Option<&FieldTable>, prior_deliveries: u32) -> FieldTable {
    let mut out = FieldTable::default();
    for (name, value) in headers.map(|h| h.inner().iter()).into_iter().flatten() {
        let name_text = name.as_str();
        if name_text == "x-delivery-count"
            || name_text == HEADER_PRIOR_DELIVERIES
            || name_text.starts_with("x-death")
            || name_text.starts_with("x-first-death")
            || name_text.starts_with("x-last-death")
        {
            continue;
        }
        out.insert(name.clone(), value.clone());
    }
    if prior_deliveries > 0 {
        out.insert(
            HEADER_PRIOR_DELIVERIES.into(),
            AMQPValue::LongLongInt(prior_deliveries.into()),
        );
    }
    out
}

/// lapin answers `Ok(false)` when the channel is already closed: the broker will requeue
/// the message, and the caller must know the settlement did not happen.
fn settled(result: Result<bool, lapin::Error>) -> Result<(), BackfillError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(BackfillError::Queue(
            "the channel closed before the delivery was settled; the broker will redeliver it"
                .into(),
        )),
        Err(error) => Err(broker_error(error)),
    }
}

impl Settle for RabbitSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move { settled(self.acker.ack(BasicAckOptions::default()).await) })
    }

    fn nack(self: Box<Self>, requeue: bool) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            settled(
                self.acker
                    .nack(BasicNackOptions {
                        multiple: false,
                        requeue,
                    })
                    .await,
            )
        })
    }

    /// Publishes a copy (confirmed) that remembers this delivery's predecessors, then acks this
    /// one: the broker's count starts over for the copy, ours carries on. If the copy cannot be
    /// published, the delivery is handed back the ordinary way (counted, never lost).
    fn hand_back(self: Box<Self>) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            let headers = republished_headers(self.headers.as_ref(), self.delivery_count - 1);
            let published = self
                .broker
                .publish_raw(
                    &self.broker.topology.tasks_exchange(),
                    &self.warehouse,
                    &self.body,
                    headers,
                )
                .await;
            match published {
                Ok(()) => settled(self.acker.ack(BasicAckOptions::default()).await),
                Err(error) => {
                    tracing::warn!(%error, "could not publish the handed-back task again; returning it to the queue");
                    self.nack(true).await
                }
            }
        })
    }

    fn dead_letter(
        self: Box<Self>,
        reason: &'static str,
        detail: String,
    ) -> BoxFuture<'static, Result<(), BackfillError>> {
        Box::pin(async move {
            match self
                .broker
                .dead_letter(
                    &self.warehouse,
                    &self.body,
                    self.headers.as_ref(),
                    reason,
                    &detail,
                )
                .await
            {
                Ok(()) => settled(self.acker.ack(BasicAckOptions::default()).await),
                // Could not park it: hand it back rather than lose it.
                Err(error) => {
                    self.acker
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await
                        .map_err(broker_error)?;
                    Err(error)
                }
            }
        })
    }
}

impl TaskQueue for RabbitTaskQueue {
    async fn publish(&self, message: TaskMessage) -> Result<(), BackfillError> {
        self.broker.publish_task(&message).await
    }

    /// The next verified task. Refused messages (forged, undecodable, unknown version,
    /// oversized, misrouted) are dead-lettered with their reason here, and the loop goes on.
    async fn receive(&self) -> Result<Option<Delivery>, BackfillError> {
        loop {
            let next = self.consumer.lock().await.next().await;
            let delivery = match next {
                None => {
                    return Err(BackfillError::Queue(
                        "the broker closed the consumer".into(),
                    ));
                }
                Some(Err(error)) => return Err(broker_error(error)),
                Some(Ok(delivery)) => delivery,
            };
            let headers = delivery.properties.headers().clone();
            // Quorum queues count earlier failed deliveries in x-delivery-count; a task a
            // stopping worker handed back carries the count it had in HEADER_PRIOR_DELIVERIES.
            let delivery_count = header_number(headers.as_ref(), "x-delivery-count")
                .map_or(1, |n| n.clamp(0, i64::from(u32::MAX / 2)) as u32 + 1)
                + header_number(headers.as_ref(), HEADER_PRIOR_DELIVERIES)
                    .map_or(0, |n| n.clamp(0, MAX_PRIOR_DELIVERIES) as u32);
            let opened = self.broker.keyring.open(
                &delivery.data,
                header_text(headers.as_ref(), HEADER_KEY_ID).as_deref(),
                header_text(headers.as_ref(), HEADER_SIGNATURE).as_deref(),
            );
            let settle = RabbitSettle {
                acker: delivery.acker.clone(),
                broker: self.broker.clone(),
                warehouse: self.warehouse.clone(),
                body: delivery.data.clone(),
                headers: headers.clone(),
                delivery_count,
            };
            let rejection = match opened {
                Ok(Message::Task(message)) if message.warehouse == self.warehouse => {
                    let trace_context = TRACE_HEADERS
                        .iter()
                        .filter_map(|name| {
                            header_text(headers.as_ref(), name)
                                .filter(|value| value.len() <= MAX_TRACE_HEADER_LEN)
                                .map(|value| (name.to_string(), value))
                        })
                        .collect();
                    return Ok(Some(
                        Delivery::new(message, delivery_count, Box::new(settle))
                            .with_trace_context(trace_context),
                    ));
                }
                Ok(Message::Task(message)) => Rejection::Misrouted(format!(
                    "task for warehouse `{}` arrived on the queue of `{}`",
                    crate::envelope::excerpt(&message.warehouse),
                    self.warehouse
                )),
                Ok(Message::Result(_)) => {
                    Rejection::Misrouted("a result message arrived on a task queue".into())
                }
                Err(rejection) => rejection,
            };
            tracing::warn!(reason = rejection.as_str(), %rejection, queue = %self.broker.topology.task_queue(&self.warehouse), "message refused and dead-lettered");
            Box::new(settle)
                .dead_letter(rejection.as_str(), rejection.to_string())
                .await?;
        }
    }
}

/// Results of a run as the coordinator receives them; unverifiable ones are dropped (acked)
/// with a warning, since the control store is the source of truth anyway.
pub struct ResultStream {
    consumer: lapin::Consumer,
    keyring: Keyring,
    _channel: Channel,
}

/// A result message received but not yet acknowledged: [`ResultStream::recv`] hands it out,
/// [`ResultStream::open`] acks and verifies it.
pub struct ResultDelivery(lapin::message::Delivery);

impl ResultStream {
    /// The next result message that verifies.
    pub async fn next(&mut self) -> Result<ResultMessage, BackfillError> {
        loop {
            let delivery = self.recv().await?;
            if let Some(result) = self.open(delivery).await? {
                return Ok(result);
            }
        }
    }

    /// The next delivery, not yet acknowledged. Cancel-safe (a `select!` may drop it): the
    /// consumer keeps a delivery that was not handed out.
    pub async fn recv(&mut self) -> Result<ResultDelivery, BackfillError> {
        match self.consumer.next().await {
            None => Err(BackfillError::Queue(
                "the broker closed the result consumer".into(),
            )),
            Some(Err(error)) => Err(broker_error(error)),
            Some(Ok(delivery)) => Ok(ResultDelivery(delivery)),
        }
    }

    /// Acks a delivery and returns its result, or None when it does not verify (logged and
    /// dropped: results are hints, the control store decides).
    pub async fn open(
        &self,
        delivery: ResultDelivery,
    ) -> Result<Option<ResultMessage>, BackfillError> {
        let delivery = delivery.0;
        let headers = delivery.properties.headers().as_ref();
        let opened = self.keyring.open(
            &delivery.data,
            header_text(headers, HEADER_KEY_ID).as_deref(),
            header_text(headers, HEADER_SIGNATURE).as_deref(),
        );
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker_error)?;
        match opened {
            Ok(Message::Result(result)) => return Ok(Some(result)),
            Ok(Message::Task(_)) => {
                tracing::warn!("a task message arrived on a result queue; ignored")
            }
            Err(rejection) => {
                tracing::warn!(reason = rejection.as_str(), %rejection, "result message refused; ignored")
            }
        }
        Ok(None)
    }
}
