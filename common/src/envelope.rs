//! Wire messages between the coordinator and workers: a versioned msgpack envelope, signed
//! with HMAC-SHA256. Verification happens before decoding, in a fixed order (size, signature
//! headers, known key, valid signature, version, body), and every refusal has a reason that
//! travels with the message to the dead-letter queue.
//!
//! The body says which partition to run; it never carries the spec. Workers load the spec by
//! hash from the control store.

use std::collections::HashMap;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::control::PartitionTask;

pub const ENVELOPE_VERSION: u16 = 1;
/// Largest message a worker accepts; a task is a few hundred bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const HEADER_KEY_ID: &str = "x-bf-key-id";
pub const HEADER_SIGNATURE: &str = "x-bf-signature";
pub const HEADER_REASON: &str = "x-bf-reason";
pub const HEADER_DETAIL: &str = "x-bf-detail";
/// Deliveries a task had before a worker handed it back unstarted and published it again (the
/// broker's own count starts over for the copy). Outside the signature: a forged value can only
/// make the task give up sooner, never later.
pub const HEADER_PRIOR_DELIVERIES: &str = "x-bf-prior-deliveries";

/// What a coordinator asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub task: PartitionTask,
    /// Warehouse name: the worker looks its URL up in its own configuration.
    pub warehouse: String,
    pub control_schema: String,
    /// Queue the coordinator collects results from.
    pub reply_to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultKind {
    Done,
    Stale,
    Failed,
    DeadLettered,
}

/// What a worker reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub task: PartitionTask,
    pub kind: ResultKind,
    pub error: Option<String>,
    pub worker: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Task(TaskMessage),
    Result(ResultMessage),
}

/// Why a message was refused. `as_str` is the dead-letter reason header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message is not signed (no {HEADER_KEY_ID} / {HEADER_SIGNATURE} header)")]
    Unsigned,
    #[error("message is signed with unknown key id `{0}`")]
    UnknownKey(String),
    #[error("message signature does not verify")]
    BadSignature,
    #[error("message envelope version {0} is not supported (this build speaks {ENVELOPE_VERSION})")]
    UnknownVersion(u16),
    #[error("message body does not decode: {0}")]
    Undecodable(String),
    #[error("{0}")]
    UnknownRun(String),
    #[error("{0}")]
    Permanent(String),
    #[error("{0}")]
    Misrouted(String),
}

impl Rejection {
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::TooLarge(_) => "too_large",
            Rejection::Unsigned => "unsigned",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::UnknownVersion(_) => "unknown_version",
            Rejection::Undecodable(_) => "undecodable",
            Rejection::UnknownRun(_) => "unknown_run",
            Rejection::Permanent(_) => "permanent_error",
            Rejection::Misrouted(_) => "misrouted",
        }
    }
}

/// A value taken from a message, as an error may quote it: at most 64 characters, and how
/// long it was when it is longer, so a huge field cannot crowd out the rest of the reason.
pub fn excerpt(value: &str) -> String {
    const LONGEST: usize = 64;
    let length = value.chars().count();
    if length <= LONGEST {
        value.to_string()
    } else {
        let head: String = value.chars().take(LONGEST).collect();
        format!("{head}… ({length} characters)")
    }
}

/// A signing key with its id. Its Debug never shows the secret.
#[derive(Clone)]
pub struct SigningKey {
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("secret", &"***")
            .finish()
    }
}

impl SigningKey {
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<SigningKey, String> {
        let secret = secret.into();
        if secret.len() < 16 {
            return Err("the HMAC key must be at least 16 bytes".into());
        }
        Ok(SigningKey {
            id: id.into(),
            secret,
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .expect("HMAC takes keys of any length")
    }

    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The keys a receiver accepts (several during a key rotation) and the one it signs with.
#[derive(Clone, Debug)]
pub struct Keyring {
    signing: SigningKey,
    accepted: HashMap<String, SigningKey>,
}

impl Keyring {
    pub fn new(signing: SigningKey) -> Keyring {
        let mut accepted = HashMap::new();
        accepted.insert(signing.id.clone(), signing.clone());
        Keyring { signing, accepted }
    }

    /// Also accept messages signed with `key` (e.g. the previous key during rotation).
    pub fn accept(mut self, key: SigningKey) -> Keyring {
        self.accepted.insert(key.id.clone(), key);
        self
    }

    pub fn signing_key_id(&self) -> &str {
        &self.signing.id
    }

    /// Encodes and signs: returns the body and the (key id, signature) headers.
    pub fn seal(&self, message: &Message) -> (Vec<u8>, String, String) {
        let body = rmp_serde::to_vec(&(ENVELOPE_VERSION, message)).expect("messages always encode");
        let signature = self.signing.sign(&body);
        (body, self.signing.id.clone(), signature)
    }

    /// Verifies and decodes a received body with its signature headers.
    pub fn open(
        &self,
        body: &[u8],
        key_id: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Message, Rejection> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(Rejection::TooLarge(body.len()));
        }
        let (Some(key_id), Some(signature)) = (key_id, signature) else {
            return Err(Rejection::Unsigned);
        };
        let key = self
            .accepted
            .get(key_id)
            .ok_or_else(|| Rejection::UnknownKey(excerpt(key_id)))?;
        let signature = decode_hex(signature).ok_or(Rejection::BadSignature)?;
        let mut mac = key.mac();
        mac.update(body);
        mac.verify_slice(&signature)
            .map_err(|_| Rejection::BadSignature)?;
        let (version, _): (u16, serde::de::IgnoredAny) = decode(body)?;
        if version != ENVELOPE_VERSION {
            return Err(Rejection::UnknownVersion(version));
        }
        let (_, message): (u16, Message) = decode(body)?;
        Ok(message)
    }
}

/// How deep a body may nest. A message is 4 levels deep; msgpack's own limit (1024) lets a
/// 64 KiB body of nested arrays overflow a worker thread's stack, which aborts the process.
const MAX_BODY_DEPTH: usize = 16;

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Rejection> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(body);
    deserializer.set_max_depth(MAX_BODY_DEPTH);
    T::deserialize(&mut deserializer).map_err(|e| Rejection::Undecodable(e.to_string()))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Reads the signing key from the environment: `BACKFILL_HMAC_KEY` (the secret itself) or
/// `BACKFILL_HMAC_KEY_FILE` (a file holding it), with `BACKFILL_HMAC_KEY_ID` (default "k1").
/// `BACKFILL_HMAC_PREVIOUS_KEY` or `BACKFILL_HMAC_PREVIOUS_KEY_FILE`, with `_ID` (default
/// "k0"), add a second accepted key during a rotation.
pub fn keyring_from_env() -> Result<Keyring, String> {
    let id = std::env::var("BACKFILL_HMAC_KEY_ID").unwrap_or_else(|_| "k1".into());
    let secret = secret_from_env("BACKFILL_HMAC_KEY", "BACKFILL_HMAC_KEY_FILE")?.ok_or(
        "no message signing key: set BACKFILL_HMAC_KEY or BACKFILL_HMAC_KEY_FILE (at least 16 bytes), the same on the coordinator and every worker",
    )?;
    let mut keyring = Keyring::new(SigningKey::new(id, secret)?);
    if let Some(previous) = secret_from_env(
        "BACKFILL_HMAC_PREVIOUS_KEY",
        "BACKFILL_HMAC_PREVIOUS_KEY_FILE",
    )? {
        let previous_id =
            std::env::var("BACKFILL_HMAC_PREVIOUS_KEY_ID").unwrap_or_else(|_| "k0".into());
        keyring = keyring.accept(SigningKey::new(previous_id, previous)?);
    }
    Ok(keyring)
}

/// A secret from the variable `name`, or from the file named by the variable `file`
/// (trailing whitespace, such as the newline of a mounted Kubernetes secret, trimmed). Both
/// names are spelled out at the call sites, where deployment tooling can find them.
fn secret_from_env(name: &str, file: &str) -> Result<Option<Vec<u8>>, String> {
    if let Ok(secret) = std::env::var(name) {
        return Ok(Some(secret.into_bytes()));
    }
    let Ok(path) = std::env::var(file) else {
        return Ok(None);
    };
    let mut bytes = std::fs::read(&path).map_err(|e| format!("cannot read {file} {path}: {e}"))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_the_variable_or_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("previous");
        std::fs::write(&path, "rotated-key-0123456789\n").unwrap();
        // Names no other test uses: the environment is shared by the test threads.
        unsafe {
            std::env::set_var("BFTEST_ENVELOPE_SECRET_FILE", &path);
            std::env::set_var("BFTEST_ENVELOPE_DIRECT", "direct-value");
        }
        assert_eq!(
            secret_from_env("BFTEST_ENVELOPE_SECRET", "BFTEST_ENVELOPE_SECRET_FILE").unwrap(),
            Some(b"rotated-key-0123456789".to_vec()),
            "read from the file, newline trimmed"
        );
        assert_eq!(
            secret_from_env("BFTEST_ENVELOPE_DIRECT", "BFTEST_ENVELOPE_DIRECT_FILE").unwrap(),
            Some(b"direct-value".to_vec())
        );
        assert_eq!(
            secret_from_env("BFTEST_ENVELOPE_ABSENT", "BFTEST_ENVELOPE_ABSENT_FILE").unwrap(),
            None
        );
        unsafe {
            std::env::set_var("BFTEST_ENVELOPE_MISSING_FILE", dir.path().join("nope"));
        }
        let error =
            secret_from_env("BFTEST_ENVELOPE_MISSING", "BFTEST_ENVELOPE_MISSING_FILE").unwrap_err();
        assert!(error.contains("BFTEST_ENVELOPE_MISSING_FILE"), "{error}");
    }

    fn keyring(secret: &str) -> Keyring {
        Keyring::new(SigningKey::new("k1", secret.as_bytes().to_vec()).unwrap())
    }

    fn task_message() -> Message {
        Message::Task(TaskMessage {
            task: PartitionTask {
                run_id: "ab12cd34".into(),
                spec_hash: "f".repeat(64),
                partition_key: "2024-03-04".into(),
                range_start: "2024-03-04".into(),
                range_end: "2024-03-05".into(),
                attempt: 1,
                fencing_token: 3,
            },
            warehouse: "demo".into(),
            control_schema: "backfill".into(),
            reply_to: "backfill.results.ab12cd34".into(),
        })
    }

    #[test]
    fn sealed_messages_open() {
        let keys = keyring("0123456789abcdef0123");
        let (body, id, signature) = keys.seal(&task_message());
        assert_eq!(
            keys.open(&body, Some(&id), Some(&signature)).unwrap(),
            task_message()
        );
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let keys = keyring("0123456789abcdef0123");
        let (body, id, signature) = keys.seal(&task_message());
        let open =
            |b: &[u8], i: Option<&str>, s: Option<&str>| keys.open(b, i, s).unwrap_err().as_str();
        assert_eq!(open(&body, None, None), "unsigned");
        assert_eq!(open(&body, Some("k9"), Some(&signature)), "unknown_key");
        assert_eq!(
            open(&body, Some(&id), Some(&"0".repeat(64))),
            "bad_signature"
        );
        assert_eq!(open(&body, Some(&id), Some("zz")), "bad_signature");
        let forged = keyring("another key, same id!").seal(&task_message());
        assert_eq!(open(&forged.0, Some(&id), Some(&forged.2)), "bad_signature");
        let mut tampered = body.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&tampered, Some(&id), Some(&signature)),
            "bad_signature"
        );
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(open(&huge, Some(&id), Some(&signature)), "too_large");
        // correctly signed, but from the future or garbage
        let future = rmp_serde::to_vec(&(2u16, task_message())).unwrap();
        assert_eq!(
            open(&future, Some(&id), Some(&keys.signing.sign(&future))),
            "unknown_version"
        );
        let garbage = b"\x92\x01\xc1".to_vec();
        assert_eq!(
            open(&garbage, Some(&id), Some(&keys.signing.sign(&garbage))),
            "undecodable"
        );
        let truncated = body[..body.len() / 2].to_vec();
        assert_eq!(
            open(&truncated, Some(&id), Some(&keys.signing.sign(&truncated))),
            "undecodable"
        );
    }

    #[test]
    fn rotation_accepts_the_previous_key() {
        let old = SigningKey::new("k0", b"the old secret key!!".to_vec()).unwrap();
        let sender = Keyring::new(old.clone());
        let receiver = keyring("the new secret key!!").accept(old);
        let (body, id, signature) = sender.seal(&task_message());
        assert!(receiver.open(&body, Some(&id), Some(&signature)).is_ok());
        assert!(
            format!("{receiver:?}").contains("***")
                && !format!("{receiver:?}").contains("secret key")
        );
    }

    #[test]
    fn excerpts_say_how_long_a_value_was() {
        assert_eq!(excerpt("ab12cd34"), "ab12cd34");
        let long = "é".repeat(100);
        assert_eq!(
            excerpt(&long),
            format!("{}… (100 characters)", "é".repeat(64))
        );
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(SigningKey::new("k", b"short".to_vec()).is_err());
    }
}
