//! One conformance suite for every `TaskQueue`: the in-memory queue (embedded mode) and the
//! RabbitMQ queue (distributed mode). Plus what only the broker path sees: forged, unsigned,
//! oversized, unknown-version and undecodable messages, each dead-lettered with its reason
//! while the consumer keeps going.

use std::time::Duration;

use backfill_common::broker::{Broker, RabbitTaskQueue};
use backfill_common::control::PartitionTask;
use backfill_common::envelope::{
    HEADER_KEY_ID, HEADER_SIGNATURE, Keyring, Message, SigningKey, TaskMessage,
};
use backfill_common::queue::{DeadLetter, Delivery, InMemoryQueue, TaskQueue};
use backfill_tests::*;
use lapin::types::{AMQPValue, FieldTable, LongString};

const WAREHOUSE: &str = "conformance";
const LIMIT: u32 = 2;

fn message(partition: &str) -> TaskMessage {
    TaskMessage {
        task: PartitionTask {
            run_id: "run00001".into(),
            spec_hash: "a".repeat(64),
            partition_key: partition.into(),
            range_start: partition.into(),
            range_end: partition.into(),
            attempt: 1,
            fencing_token: 1,
        },
        warehouse: WAREHOUSE.into(),
        control_schema: "backfill".into(),
        reply_to: "results.run00001".into(),
    }
}

fn keyring() -> Keyring {
    Keyring::new(SigningKey::new("test", b"conformance-secret-key".to_vec()).unwrap())
}

/// What the suite needs beyond the trait: reading the dead letters back, and cleanup.
trait Harness: TaskQueue {
    async fn dead(&self) -> Vec<DeadLetter>;
    async fn cleanup(&self) {}
}

impl Harness for InMemoryQueue {
    async fn dead(&self) -> Vec<DeadLetter> {
        self.dead_letters()
    }
}

struct Rabbit {
    broker: Broker,
    queue: RabbitTaskQueue,
}

impl TaskQueue for Rabbit {
    async fn publish(&self, message: TaskMessage) -> Result<(), backfill_common::BackfillError> {
        self.queue.publish(message).await
    }
    async fn receive(&self) -> Result<Option<Delivery>, backfill_common::BackfillError> {
        self.queue.receive().await
    }
}

impl Harness for Rabbit {
    async fn dead(&self) -> Vec<DeadLetter> {
        // dead-lettering is asynchronous in the broker: give it a moment
        for _ in 0..50 {
            let letters = self.broker.dead_letters(WAREHOUSE, 100).await.unwrap();
            if !letters.is_empty() {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        vec![]
    }
    async fn cleanup(&self) {
        self.queue.close().await;
        self.broker.delete_topology(WAREHOUSE).await.unwrap();
        self.broker.close().await;
    }
}

async fn rabbit() -> Rabbit {
    let broker = Broker::connect(&broker_url(), &unique_prefix("queue"), keyring(), LIMIT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "RabbitMQ must be running at {} for this test: {e}",
                broker_url()
            )
        });
    broker.declare_warehouse(WAREHOUSE).await.unwrap();
    let queue = broker
        .task_queue(WAREHOUSE, 1, "conformance")
        .await
        .unwrap();
    Rabbit { broker, queue }
}

async fn in_memory() -> InMemoryQueue {
    InMemoryQueue::with_delivery_limit(LIMIT)
}

async fn receive(queue: &impl TaskQueue) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), queue.receive())
        .await
        .expect("a message arrives")
        .unwrap()
        .expect("the queue is open")
}

async fn delivers_in_order_and_acks<Q: Harness>(queue: Q) {
    for p in ["p1", "p2", "p3"] {
        queue.publish(message(p)).await.unwrap();
    }
    for p in ["p1", "p2", "p3"] {
        let delivery = receive(&queue).await;
        assert_eq!(delivery.message, message(p));
        assert_eq!(delivery.delivery_count, 1);
        delivery.ack().await.unwrap();
    }
    queue.cleanup().await;
}

async fn requeue_counts_deliveries_then_dead_letters<Q: Harness>(queue: Q) {
    queue.publish(message("p1")).await.unwrap();
    let first = receive(&queue).await;
    assert_eq!(first.delivery_count, 1);
    first.nack(true).await.unwrap();
    let second = receive(&queue).await;
    assert_eq!(second.delivery_count, 2, "redelivery is counted");
    second.nack(true).await.unwrap();
    // past the delivery limit: dead-lettered, not redelivered
    let dead = queue.dead().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "delivery_limit");
    assert_eq!(
        dead[0]
            .message
            .as_ref()
            .map(|m| m.task.partition_key.as_str()),
        Some("p1")
    );
    queue.cleanup().await;
}

async fn dead_letter_keeps_the_reason<Q: Harness>(queue: Q) {
    queue.publish(message("p1")).await.unwrap();
    queue.publish(message("p2")).await.unwrap();
    receive(&queue)
        .await
        .dead_letter("permanent_error", "division by zero".into())
        .await
        .unwrap();
    let next = receive(&queue).await;
    assert_eq!(
        next.message.task.partition_key, "p2",
        "the consumer goes on"
    );
    next.ack().await.unwrap();
    let dead = queue.dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].detail.as_str()),
        ("permanent_error", "division by zero")
    );
    assert_eq!(dead[0].message, Some(message("p1")));
    queue.cleanup().await;
}

/// A stopping worker hands back a task it never started: that is not a delivery, however often
/// it happens (a fleet restarted many times in a row), and the count a task already had carries
/// over.
async fn hand_back_keeps_the_delivery_count<Q: Harness>(queue: Q) {
    queue.publish(message("p1")).await.unwrap();
    for _ in 0..LIMIT + 2 {
        let delivery = receive(&queue).await;
        assert_eq!(delivery.delivery_count, 1, "a hand-back is not a delivery");
        assert_eq!(delivery.message, message("p1"));
        delivery.hand_back().await.unwrap();
    }
    receive(&queue).await.nack(true).await.unwrap();
    let second = receive(&queue).await;
    assert_eq!(second.delivery_count, 2, "a failed delivery counts");
    second.hand_back().await.unwrap();
    let again = receive(&queue).await;
    assert_eq!(
        again.delivery_count, 2,
        "the count carries over a hand-back"
    );
    assert_eq!(again.message, message("p1"));
    again.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), queue.receive())
            .await
            .is_err(),
        "one task, delivered until acked, never twice"
    );
    assert_eq!(queue.dead().await, vec![]);
    queue.cleanup().await;
}

macro_rules! queue_conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delivers_in_order_and_acks() {
                super::delivers_in_order_and_acks($make.await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn requeue_counts_deliveries_then_dead_letters() {
                super::requeue_counts_deliveries_then_dead_letters($make.await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_letter_keeps_the_reason() {
                super::dead_letter_keeps_the_reason($make.await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn hand_back_keeps_the_delivery_count() {
                super::hand_back_keeps_the_delivery_count($make.await).await;
            }
        }
    };
}

queue_conformance!(in_memory_queue, in_memory());
queue_conformance!(rabbit_queue, rabbit());

/// A broker that lost its state, or never saw the warehouse, has no dead-letter queue: listing
/// or purging its letters finds none instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warehouse_never_declared_has_no_dead_letters() {
    let broker = Broker::connect(&broker_url(), &unique_prefix("queue"), keyring(), LIMIT)
        .await
        .unwrap();
    assert_eq!(broker.dead_letters("undeclared", 10).await.unwrap(), vec![]);
    assert_eq!(
        broker
            .purge_dead_letters("undeclared", "run00001")
            .await
            .unwrap(),
        0
    );
    broker.close().await;
}

fn headers(key_id: Option<&str>, signature: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(id) = key_id {
        headers.insert(
            HEADER_KEY_ID.into(),
            AMQPValue::LongString(LongString::from(id.as_bytes().to_vec())),
        );
    }
    if let Some(signature) = signature {
        headers.insert(
            HEADER_SIGNATURE.into(),
            AMQPValue::LongString(LongString::from(signature.as_bytes().to_vec())),
        );
    }
    headers
}

/// Every kind of bad message lands in the dead-letter queue with its reason; the consumer
/// survives them all and delivers the good message behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_their_reason() {
    let queue = rabbit().await;
    let broker = &queue.broker;
    let good = keyring();
    let signer = SigningKey::new("test", b"conformance-secret-key".to_vec()).unwrap();
    let (body, id, signature) = good.seal(&Message::Task(message("p1")));
    let forger = Keyring::new(SigningKey::new("test", b"not-the-real-secret!!".to_vec()).unwrap());
    let (forged, _, forged_signature) = forger.seal(&Message::Task(message("p1")));
    let future = rmp_serde_body(2);
    let garbage = b"\x92\x01\xc1garbage".to_vec();
    let huge = vec![7u8; 70 * 1024];
    let mut truncated = body.clone();
    truncated.truncate(body.len() / 2);
    let misrouted = {
        let mut m = message("p1");
        m.warehouse = "elsewhere".into();
        good.seal(&Message::Task(m))
    };
    let cases: Vec<(&str, Vec<u8>, FieldTable)> = vec![
        ("unsigned", body.clone(), headers(None, None)),
        (
            "unknown_key",
            body.clone(),
            headers(Some("k9"), Some(&signature)),
        ),
        (
            "bad_signature",
            forged.clone(),
            headers(Some(&id), Some(&forged_signature)),
        ),
        (
            "bad_signature",
            body.clone(),
            headers(Some(&id), Some(&"0".repeat(64))),
        ),
        (
            "unknown_version",
            future.clone(),
            headers(Some(&id), Some(&signer.sign(&future))),
        ),
        (
            "undecodable",
            garbage.clone(),
            headers(Some(&id), Some(&signer.sign(&garbage))),
        ),
        (
            "undecodable",
            truncated.clone(),
            headers(Some(&id), Some(&signer.sign(&truncated))),
        ),
        (
            "too_large",
            huge.clone(),
            headers(Some(&id), Some(&signer.sign(&huge))),
        ),
        (
            "misrouted",
            misrouted.0.clone(),
            headers(Some(&misrouted.1), Some(&misrouted.2)),
        ),
    ];
    for (_, body, headers) in &cases {
        broker
            .publish_unchecked(WAREHOUSE, body, headers.clone())
            .await
            .unwrap();
    }
    queue.publish(message("good")).await.unwrap();
    let delivery = receive(&queue).await;
    assert_eq!(
        delivery.message.task.partition_key, "good",
        "the consumer survives every bad message"
    );
    delivery.ack().await.unwrap();
    let mut dead = Vec::new();
    for _ in 0..50 {
        dead = broker.dead_letters(WAREHOUSE, 100).await.unwrap();
        if dead.len() >= cases.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let expected: Vec<&str> = cases.iter().map(|c| c.0).collect();
    assert_eq!(
        reasons, expected,
        "each bad message is parked with its reason, in order"
    );
    assert!(
        dead.iter().all(|d| !d.detail.is_empty()),
        "each has a human-readable detail"
    );
    assert!(
        dead.iter()
            .all(|d| !d.detail.contains("conformance-secret-key")),
        "no secret in the detail"
    );
    queue.cleanup().await;
}

fn rmp_serde_body(version: u16) -> Vec<u8> {
    rmp_serde::to_vec(&(version, Message::Task(message("p1")))).unwrap()
}
