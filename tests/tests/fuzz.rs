//! Fuzz targets for the two parsers that take input from outside the process: the spec parser
//! (a file a person wrote) and the envelope decoder (bytes from the broker). proptest drives
//! them with arbitrary input and with structure-aware mutations of valid specs and sealed
//! messages.
//!
//! The suite runs a few hundred cases per target; `scripts/fuzz.sh SECONDS` runs them with many
//! more, seed after seed, until the time is up, and prints each seed (`PROPTEST_RNG_SEED`) so a
//! failure replays. Failing inputs proptest finds are kept in `fuzz.regressions` next to this
//! file and replayed first on every run; each crash found so far is also a named test at the
//! end of this file.

use backfill_common::control::PartitionTask;
use backfill_common::envelope::{
    ENVELOPE_VERSION, Keyring, MAX_MESSAGE_BYTES, Message, Rejection, ResultKind, ResultMessage,
    SigningKey, TaskMessage,
};
use backfill_common::plan;
use backfill_common::spec::{AuditCheck, Spec, SpecError};
use backfill_common::sql;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// Cases per target in a normal test run; `PROPTEST_CASES` overrides it (the fuzz script).
const SUITE_CASES: u32 = 300;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SUITE_CASES);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The spec parser
// ---------------------------------------------------------------------------------------------

/// Valid specs the structure-aware mutations start from: every example shipped.
const SEED_SPECS: [&str; 3] = [
    include_str!("../../examples/mini_challenge.toml"),
    include_str!("../../examples/events_session_length.toml"),
    include_str!("../../examples/reference_workload.toml"),
];

/// Top-level sections and fields a spec error may name.
const SPEC_FIELDS: [&str; 9] = [
    "name",
    "description",
    "target",
    "partition",
    "source",
    "warehouse",
    "execution",
    "audit",
    "publish",
];

/// Text that has broken parsers before, or could: injection, quoting, multi-byte characters
/// at awkward offsets, dates at the ends of the calendar, durations that overflow.
const NASTY: &[&str] = &[
    "",
    " ",
    "x\"; DROP TABLE t; --",
    "'; DELETE FROM t; --",
    "SELECT 1; SELECT 2",
    "SELECT * FROM t WHERE d >= :partition_start AND d < :partition_end; DROP TABLE t",
    ":partition_start",
    "::date",
    "$$",
    "$a$ unterminated",
    "/*",
    "--",
    "E'\\''",
    "é",
    "abcdeé",
    "abcé",
    "(((((((((",
    "with",
    "selecté",
    "\u{202e}evil",
    "日本語のテーブル",
    "a\u{0}b",
    "\u{feff}SELECT 1",
    "+262143-12-31",
    "-262143-01-01",
    "+262142-12-31T23",
    "+262142-12-31",
    "9999-12-31",
    "0000-01-01",
    "2024-02-30",
    "2024-03-01T24",
    "2024-03-01T05:30",
    "99999999999999999999s",
    "18446744073709551615ms",
    "5000000000000000h",
    "0s",
    "1d",
    "NaN",
    "inf",
];

#[derive(Debug, Clone)]
enum Hostile {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    List(Vec<String>),
    EmptyTable,
}

impl Hostile {
    fn to_toml(&self) -> toml::Value {
        match self {
            Hostile::Text(text) => toml::Value::String(text.clone()),
            Hostile::Integer(n) => toml::Value::Integer(*n),
            Hostile::Float(x) => toml::Value::Float(*x),
            Hostile::Bool(b) => toml::Value::Boolean(*b),
            Hostile::List(items) => toml::Value::Array(
                items
                    .iter()
                    .map(|s| toml::Value::String(s.clone()))
                    .collect(),
            ),
            Hostile::EmptyTable => toml::Value::Table(toml::Table::new()),
        }
    }
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        2 => prop::sample::select(NASTY).prop_map(str::to_string),
        1 => "[a-zA-Z_][a-zA-Z0-9_]{0,70}",
        1 => "[+-]?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}(T[0-9]{1,2}(:[0-9]{2}){0,2})?",
        1 => "[0-9]{0,21}(ms|s|m|h|d)?",
        2 => ("[ -~]{0,24}", "[ -~é日]{0,24}").prop_map(|(before, after)| format!(
            "SELECT {before} FROM t WHERE d >= :partition_start AND d < :partition_end {after}"
        )),
    ]
}

/// Partition bounds: plausible, malformed, and at the ends of the calendar.
fn date_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[+-]?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}(T[0-9]{1,2}(:[0-9]{2}){0,2})?",
        "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])(T[01][0-9])?",
        prop::sample::select(
            &[
                "+262142-12-31",
                "+262142-12-31T23",
                "-262143-01-01",
                "-262144-01-01T00",
                "9999-12-31",
                "0000-01-01",
                "+262143-01-01"
            ][..]
        )
        .prop_map(str::to_string),
    ]
}

fn hostile_value() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        4 => hostile_text().prop_map(Hostile::Text),
        2 => prop_oneof![
            any::<i64>(),
            Just(0i64),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(u32::MAX as i64 + 1),
            0i64..30,
        ].prop_map(Hostile::Integer),
        1 => prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0)].prop_map(Hostile::Float),
        1 => any::<bool>().prop_map(Hostile::Bool),
        1 => prop::collection::vec(hostile_text(), 0..4).prop_map(Hostile::List),
        1 => Just(Hostile::EmptyTable),
    ]
}

/// One edit of a spec's TOML tree; `at` picks the node among all keys and list items.
#[derive(Debug, Clone)]
enum TreeEdit {
    Replace {
        at: usize,
        value: Hostile,
    },
    Remove {
        at: usize,
    },
    AddField {
        at: usize,
        key: String,
        value: Hostile,
    },
    /// Text spliced into a string value at a character offset (keeps the rest intact).
    Splice {
        at: usize,
        offset: usize,
        text: String,
    },
    /// The partition window replaced: `first` and `last`, or a `list` when `last` is None.
    Window {
        first: String,
        last: Option<String>,
    },
}

/// One edit of the spec's text after the tree edits (what a stray keystroke does).
#[derive(Debug, Clone)]
enum TextEdit {
    Insert { at: usize, text: String },
    Delete { at: usize, chars: usize },
    Truncate { at: usize },
    DuplicateLine { at: usize },
}

fn tree_edit() -> impl Strategy<Value = TreeEdit> {
    prop_oneof![
        5 => (any::<usize>(), hostile_value()).prop_map(|(at, value)| TreeEdit::Replace { at, value }),
        2 => any::<usize>().prop_map(|at| TreeEdit::Remove { at }),
        1 => (any::<usize>(), prop_oneof!["[a-z_]{1,12}", any::<String>()], hostile_value())
            .prop_map(|(at, key, value)| TreeEdit::AddField { at, key, value }),
        4 => (any::<usize>(), prop_oneof![0usize..8, any::<usize>()], hostile_text())
            .prop_map(|(at, offset, text)| TreeEdit::Splice { at, offset, text }),
        1 => (date_text(), proptest::option::of(date_text()))
            .prop_map(|(first, last)| TreeEdit::Window { first, last }),
    ]
}

fn text_edit() -> impl Strategy<Value = TextEdit> {
    prop_oneof![
        (
            any::<usize>(),
            prop_oneof![
                any::<String>(),
                prop::sample::select(
                    &["\"", "'''", "[", "]", "=", "\n[target]\n", "#", "\\u", "\n"][..]
                )
                .prop_map(str::to_string)
            ]
        )
            .prop_map(|(at, text)| TextEdit::Insert { at, text }),
        (any::<usize>(), 1usize..40).prop_map(|(at, chars)| TextEdit::Delete { at, chars }),
        any::<usize>().prop_map(|at| TextEdit::Truncate { at }),
        any::<usize>().prop_map(|at| TextEdit::DuplicateLine { at }),
    ]
}

/// Where a node sits in the tree: keys of tables and indexes of arrays.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node_paths(value: &toml::Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match value {
        toml::Value::Table(table) => {
            for (key, child) in table {
                prefix.push(Step::Key(key.clone()));
                out.push(prefix.clone());
                node_paths(child, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                prefix.push(Step::Index(index));
                out.push(prefix.clone());
                node_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// The parent container of the node at `path`, and the node's last step.
fn parent_of<'a>(root: &'a mut toml::Value, path: &[Step]) -> Option<(&'a mut toml::Value, Step)> {
    let (last, parents) = path.split_last()?;
    let mut node = root;
    for step in parents {
        node = match (step, node) {
            (Step::Key(key), toml::Value::Table(table)) => table.get_mut(key)?,
            (Step::Index(index), toml::Value::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    Some((node, last.clone()))
}

fn apply_tree_edit(root: &mut toml::Value, edit: &TreeEdit) {
    let mut paths = Vec::new();
    node_paths(root, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return;
    }
    let at = match edit {
        TreeEdit::Replace { at, .. }
        | TreeEdit::Remove { at }
        | TreeEdit::AddField { at, .. }
        | TreeEdit::Splice { at, .. } => *at,
        TreeEdit::Window { .. } => 0,
    };
    if let TreeEdit::Window { first, last } = edit {
        if let Some(toml::Value::Table(partition)) = root.get_mut("partition") {
            for field in ["first", "last", "list"] {
                partition.remove(field);
            }
            match last {
                Some(last) => {
                    partition.insert("first".into(), toml::Value::String(first.clone()));
                    partition.insert("last".into(), toml::Value::String(last.clone()));
                }
                None => {
                    partition.insert(
                        "list".into(),
                        toml::Value::Array(vec![toml::Value::String(first.clone())]),
                    );
                }
            }
        }
        return;
    }
    let path = &paths[at % paths.len()];
    let Some((parent, last)) = parent_of(root, path) else {
        return;
    };
    match (edit, parent, last) {
        (TreeEdit::Replace { value, .. }, toml::Value::Table(table), Step::Key(key)) => {
            table.insert(key, value.to_toml());
        }
        (TreeEdit::Replace { value, .. }, toml::Value::Array(items), Step::Index(index)) => {
            items[index] = value.to_toml();
        }
        (TreeEdit::Remove { .. }, toml::Value::Table(table), Step::Key(key)) => {
            table.remove(&key);
        }
        (TreeEdit::Remove { .. }, toml::Value::Array(items), Step::Index(index)) => {
            items.remove(index);
        }
        (TreeEdit::AddField { key, value, .. }, toml::Value::Table(table), _) => {
            table.insert(key.clone(), value.to_toml());
        }
        (TreeEdit::Splice { offset, text, .. }, toml::Value::Table(table), Step::Key(key)) => {
            if let Some(toml::Value::String(value)) = table.get_mut(&key) {
                splice(value, *offset, text);
            }
        }
        (TreeEdit::Splice { offset, text, .. }, toml::Value::Array(items), Step::Index(index)) => {
            if let toml::Value::String(value) = &mut items[index] {
                splice(value, *offset, text);
            }
        }
        _ => {}
    }
}

fn splice(value: &mut String, offset: usize, text: &str) {
    let at = value
        .char_indices()
        .nth(offset % (value.chars().count() + 1))
        .map_or(value.len(), |(i, _)| i);
    value.insert_str(at, text);
}

fn char_boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply_text_edit(text: &mut String, edit: &TextEdit) {
    match edit {
        TextEdit::Insert { at, text: inserted } => {
            let at = char_boundary(text, *at);
            text.insert_str(at, inserted);
        }
        TextEdit::Delete { at, chars } => {
            let start = char_boundary(text, *at);
            let end = text[start..]
                .char_indices()
                .nth(*chars)
                .map_or(text.len(), |(i, _)| start + i);
            text.replace_range(start..end, "");
        }
        TextEdit::Truncate { at } => {
            let at = char_boundary(text, *at);
            text.truncate(at);
        }
        TextEdit::DuplicateLine { at } => {
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let line = lines[at % lines.len()].to_string();
                let at = char_boundary(text, *at);
                let at = text[..at].rfind('\n').map_or(0, |n| n + 1);
                text.insert_str(at, &format!("{line}\n"));
            }
        }
    }
}

/// A valid spec, edited as a tree and then as text.
fn mutated_spec(seed: usize, tree: &[TreeEdit], text: &[TextEdit]) -> String {
    let original = SEED_SPECS[seed % SEED_SPECS.len()];
    let mut root: toml::Value = toml::from_str(original).expect("the examples parse as TOML");
    for edit in tree {
        apply_tree_edit(&mut root, edit);
    }
    let mut written = toml::to_string(&root).unwrap_or_else(|_| original.to_string());
    for edit in text {
        apply_text_edit(&mut written, edit);
    }
    written
}

fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// What every parse must satisfy: no panic (proptest reports one as a failure); an error
/// names the field, or the line, that is wrong; an accepted spec only holds plain identifiers,
/// a single read-only query with both partition parameters, and a plan that matches its count.
fn check_spec_text(text: &str) -> Result<(), TestCaseError> {
    match Spec::parse(text) {
        Err(SpecError::Field {
            field,
            value,
            allowed,
        }) => {
            let root = field.split(['.', '[']).next().unwrap_or_default();
            prop_assert!(
                SPEC_FIELDS.contains(&root),
                "error names an unknown field `{field}` (value {value}, {allowed})"
            );
            prop_assert!(
                !allowed.trim().is_empty(),
                "error on `{field}` says nothing about what is allowed"
            );
        }
        Err(SpecError::Syntax(message)) => {
            prop_assert!(
                message.contains("line ") || message.contains('`'),
                "a syntax error must say where (a line or a field): {message}"
            );
        }
        Ok(spec) => check_accepted_spec(&spec)?,
    }
    Ok(())
}

fn check_accepted_spec(spec: &Spec) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        spec.hash(),
        spec.hash(),
        "the hash is a function of the spec"
    );
    let mut identifiers: Vec<&str> = vec![spec.target.table.name.as_str()];
    identifiers.extend(spec.target.table.schema.as_ref().map(|s| s.as_str()));
    identifiers.extend(spec.target.key.iter().map(|k| k.as_str()));
    identifiers.extend(spec.target.add_columns.iter().map(|c| c.name.as_str()));
    identifiers.push(spec.partition.column.as_str());
    identifiers.push(spec.warehouse.control_schema.as_str());
    // Audit names are data (bound values), not identifiers: only their columns count.
    for audit in &spec.audits {
        match &audit.check {
            AuditCheck::NotNull { columns } => {
                identifiers.extend(columns.iter().map(|c| c.as_str()))
            }
            AuditCheck::AcceptedRange { column, .. } => identifiers.push(column.as_str()),
            AuditCheck::Aggregate {
                column: Some(column),
                ..
            } => identifiers.push(column.as_str()),
            _ => {}
        }
    }
    for name in identifiers {
        prop_assert!(
            is_plain_identifier(name),
            "accepted an identifier that is not plain: {name:?}"
        );
    }
    let scan = sql::scan_placeholders(&spec.source.query)
        .map_err(|e| TestCaseError::fail(format!("accepted a query that does not lex: {e}")))?;
    prop_assert!(!scan.has_statement_separator);
    for name in ["partition_start", "partition_end"] {
        prop_assert!(scan.names.iter().any(|n| n == name), "missing :{name}");
    }
    prop_assert!(
        scan.names
            .iter()
            .all(|n| sql::SOURCE_PARAMETERS.contains(&n.as_str()))
    );
    let count = plan::count(spec.partition.grain, &spec.partition.scope);
    prop_assert!(count >= 1 && count <= spec.partition.max_partitions);
    if count <= 50_000 {
        let partitions = spec.planned_partitions();
        prop_assert_eq!(partitions.len(), count);
        for pair in partitions.windows(2) {
            prop_assert!(
                pair[0].end <= pair[1].start,
                "partitions overlap or are unsorted"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary text: never a panic, and every refusal says where.
    #[test]
    fn spec_parser_survives_arbitrary_text(text in prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        check_spec_text(&text)?;
    }

    /// Valid specs with values replaced by hostile ones, fields removed or added, then the
    /// text cut, duplicated or spliced.
    #[test]
    fn spec_parser_survives_mutated_specs(
        seed in 0usize..SEED_SPECS.len(),
        tree in prop::collection::vec(tree_edit(), 0..5),
        text in prop::collection::vec(text_edit(), 0..2),
    ) {
        check_spec_text(&mutated_spec(seed, &tree, &text))?;
    }
}

// ---------------------------------------------------------------------------------------------
// The envelope decoder
// ---------------------------------------------------------------------------------------------

const CURRENT_SECRET: &[u8] = b"fuzz-current-secret-key";
const PREVIOUS_SECRET: &[u8] = b"fuzz-previous-secret-key";

/// A receiver during a key rotation: signs with k1, accepts k1 and k0.
fn keyring() -> Keyring {
    Keyring::new(SigningKey::new("k1", CURRENT_SECRET.to_vec()).expect("key"))
        .accept(SigningKey::new("k0", PREVIOUS_SECRET.to_vec()).expect("key"))
}

fn key_secret(id: &str) -> Option<&'static [u8]> {
    match id {
        "k1" => Some(CURRENT_SECRET),
        "k0" => Some(PREVIOUS_SECRET),
        _ => None,
    }
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    SigningKey::new("any", secret.to_vec())
        .expect("key")
        .sign(body)
}

fn task_message() -> impl Strategy<Value = TaskMessage> {
    (
        (
            hostile_text(),
            "[0-9a-f]{64}",
            hostile_text(),
            hostile_text(),
            hostile_text(),
        ),
        (any::<i64>(), any::<i64>()),
        (hostile_text(), hostile_text(), hostile_text()),
    )
        .prop_map(
            |(
                (run_id, spec_hash, partition_key, range_start, range_end),
                (attempt, fencing_token),
                (warehouse, control_schema, reply_to),
            )| TaskMessage {
                task: PartitionTask {
                    run_id,
                    spec_hash,
                    partition_key,
                    range_start,
                    range_end,
                    attempt,
                    fencing_token,
                },
                warehouse,
                control_schema,
                reply_to,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        3 => task_message().prop_map(Message::Task),
        1 => (task_message(), prop::sample::select(vec![ResultKind::Done, ResultKind::Stale, ResultKind::Failed, ResultKind::DeadLettered]), proptest::option::of(hostile_text()), hostile_text())
            .prop_map(|(t, kind, error, worker)| Message::Result(ResultMessage { task: t.task, kind, error, worker })),
    ]
}

/// What an attacker (or a bad network, or a bad disk) can do to a sealed message.
#[derive(Debug, Clone)]
enum Tamper {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        byte: u8,
    },
    InsertByte {
        at: usize,
        byte: u8,
    },
    DeleteByte {
        at: usize,
    },
    Truncate {
        at: usize,
    },
    Append(Vec<u8>),
    SignatureChar {
        at: usize,
        c: char,
    },
    SignatureText(String),
    KeyId(Option<String>),
    DropSignature,
    /// Re-sign the tampered body with a key the receiver does not hold, under a known id.
    ResignWithForeignKey,
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Tamper::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Tamper::SetByte { at, byte }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Tamper::InsertByte { at, byte }),
        any::<usize>().prop_map(|at| Tamper::DeleteByte { at }),
        any::<usize>().prop_map(|at| Tamper::Truncate { at }),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Tamper::Append),
        (any::<usize>(), any::<char>()).prop_map(|(at, c)| Tamper::SignatureChar { at, c }),
        prop_oneof!["[0-9a-fA-F]{64}", any::<String>()].prop_map(Tamper::SignatureText),
        proptest::option::of(prop_oneof![
            Just("k0".to_string()),
            Just("k1".to_string()),
            any::<String>()
        ])
        .prop_map(Tamper::KeyId),
        Just(Tamper::DropSignature),
        Just(Tamper::ResignWithForeignKey),
    ]
}

/// A received message: body and the two signature headers.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    body: Vec<u8>,
    key_id: Option<String>,
    signature: Option<String>,
}

fn apply_tamper(received: &mut Received, tamper: &Tamper) {
    let body = &mut received.body;
    let index = |at: usize, len: usize| if len == 0 { 0 } else { at % len };
    match tamper {
        Tamper::FlipBit { at, bit } if !body.is_empty() => {
            let i = index(*at, body.len());
            body[i] ^= 1 << bit;
        }
        Tamper::SetByte { at, byte } if !body.is_empty() => {
            let i = index(*at, body.len());
            body[i] = *byte;
        }
        Tamper::InsertByte { at, byte } => {
            let i = index(*at, body.len() + 1);
            body.insert(i, *byte);
        }
        Tamper::DeleteByte { at } if !body.is_empty() => {
            let i = index(*at, body.len());
            body.remove(i);
        }
        Tamper::Truncate { at } => {
            let i = index(*at, body.len() + 1);
            body.truncate(i);
        }
        Tamper::Append(bytes) => body.extend_from_slice(bytes),
        Tamper::SignatureChar { at, c } => {
            if let Some(signature) = &mut received.signature {
                let mut chars: Vec<char> = signature.chars().collect();
                if !chars.is_empty() {
                    let i = index(*at, chars.len());
                    chars[i] = *c;
                    *signature = chars.into_iter().collect();
                }
            }
        }
        Tamper::SignatureText(text) => received.signature = Some(text.clone()),
        Tamper::KeyId(id) => received.key_id = id.clone(),
        Tamper::DropSignature => received.signature = None,
        Tamper::ResignWithForeignKey => {
            received.signature = Some(sign(b"a forger's very own key", &received.body))
        }
        _ => {}
    }
}

/// The receiver's rule: a message is accepted only when it carries a known key id and a valid
/// HMAC of exactly the bytes received, under that key.
fn signature_is_valid(received: &Received) -> bool {
    let (Some(id), Some(signature)) = (&received.key_id, &received.signature) else {
        return false;
    };
    key_secret(id)
        .is_some_and(|secret| signature.eq_ignore_ascii_case(&sign(secret, &received.body)))
}

fn open(received: &Received) -> Result<Message, Rejection> {
    keyring().open(
        &received.body,
        received.key_id.as_deref(),
        received.signature.as_deref(),
    )
}

/// A JSON-like tree; encoded as msgpack it stands for any structure a body might hold.
fn value_tree() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        hostile_text().prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(5, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(hostile_text(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Edits the JSON form of a valid message: a field replaced by another structure, removed,
/// renamed; then it is encoded as the body of a correctly signed envelope.
fn mutated_structure(
    message: &Message,
    at: usize,
    replacement: serde_json::Value,
    remove: bool,
) -> serde_json::Value {
    let mut root = serde_json::to_value(message).expect("messages serialise");
    let mut paths = Vec::new();
    json_paths(&root, &mut Vec::new(), &mut paths);
    if let Some(path) = paths.get(at % paths.len().max(1)).cloned()
        && let Some((last, parents)) = path.split_last()
    {
        let mut node = &mut root;
        for step in parents {
            node = match node {
                serde_json::Value::Object(map) => map.get_mut(step).expect("path exists"),
                _ => return root,
            };
        }
        if let serde_json::Value::Object(map) = node {
            if remove {
                map.remove(last);
            } else {
                map.insert(last.clone(), replacement);
            }
        }
    }
    root
}

fn json_paths(value: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let serde_json::Value::Object(map) = value {
        for (key, child) in map {
            prefix.push(key.clone());
            out.push(prefix.clone());
            json_paths(child, prefix, out);
            prefix.pop();
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes with any headers: never a panic; accepted only with a valid signature.
    #[test]
    fn envelope_survives_arbitrary_bytes_and_headers(
        body in prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..1024),
            1 => prop::collection::vec(any::<u8>(), MAX_MESSAGE_BYTES - 8..MAX_MESSAGE_BYTES + 8),
        ],
        key_id in proptest::option::of(prop_oneof![Just("k0".to_string()), Just("k1".to_string()), any::<String>()]),
        signature in proptest::option::of(prop_oneof!["[0-9a-f]{64}", "[0-9a-f]{0,70}", any::<String>()]),
    ) {
        let received = Received { body, key_id, signature };
        if open(&received).is_ok() {
            prop_assert!(signature_is_valid(&received), "accepted without a valid signature: {received:?}");
        }
    }

    /// A sealed message, tampered with: refused, unless the tampering left the body and the
    /// signature's meaning intact (e.g. upper-case hex), and then it opens to the same message.
    #[test]
    fn envelope_refuses_tampered_messages(
        message in message(),
        tampers in prop::collection::vec(tamper(), 1..4),
    ) {
        let (body, key_id, signature) = keyring().seal(&message);
        let original = Received { body, key_id: Some(key_id), signature: Some(signature) };
        let mut received = original.clone();
        for tamper in &tampers {
            apply_tamper(&mut received, tamper);
        }
        match open(&received) {
            Ok(opened) => {
                prop_assert!(signature_is_valid(&received));
                prop_assert_eq!(&received.body, &original.body, "a changed body was accepted");
                prop_assert_eq!(opened, message);
            }
            Err(rejection) => prop_assert!(!rejection.as_str().is_empty()),
        }
    }

    /// Bodies a holder of the key could sign (or a bug could produce before signing): any
    /// bytes, any msgpack structure, valid messages with fields replaced or removed. Never a
    /// panic; what opens re-seals to the same message.
    #[test]
    fn envelope_decoder_survives_signed_garbage(
        message in message(),
        raw in prop::collection::vec(any::<u8>(), 0..512),
        tree in value_tree(),
        at in any::<usize>(),
        remove in any::<bool>(),
        version in prop_oneof![Just(ENVELOPE_VERSION), any::<u16>()],
        shape in 0u8..4,
    ) {
        let body = match shape {
            0 => raw,
            1 => rmp_serde::to_vec(&(version, &tree)).expect("encode"),
            2 => rmp_serde::to_vec(&(version, mutated_structure(&message, at, tree, remove))).expect("encode"),
            _ => rmp_serde::to_vec_named(&(version, &message)).expect("encode"),
        };
        let received = Received { signature: Some(sign(CURRENT_SECRET, &body)), key_id: Some("k1".into()), body };
        match open(&received) {
            Ok(opened) => {
                let (body, id, signature) = keyring().seal(&opened);
                prop_assert_eq!(keyring().open(&body, Some(&id), Some(&signature)), Ok(opened));
            }
            Err(rejection) => prop_assert!(
                matches!(rejection, Rejection::Undecodable(_) | Rejection::UnknownVersion(_) | Rejection::TooLarge(_)),
                "a correctly signed body can only be refused for its content: {rejection:?}"
            ),
        }
    }

    /// Every message survives its own trip: seal then open gives it back.
    #[test]
    fn sealed_messages_round_trip(message in message()) {
        let (body, id, signature) = keyring().seal(&message);
        prop_assert_eq!(keyring().open(&body, Some(&id), Some(&signature)), Ok(message));
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: inputs that broke a parser once, and inputs aimed at known weak spots.
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread with the stack size of a tokio worker (2 MiB), where the worker
/// decodes messages: a recursion too deep for it is a crash, not a refusal.
fn on_worker_sized_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(f)
        .expect("thread")
        .join()
        .expect("no crash")
}

/// A correctly signed body of 64 KiB of nested arrays: refused as undecodable (msgpack's depth
/// limit), not a stack overflow that would kill the worker and every task in its hands.
#[test]
fn deeply_nested_body_is_refused_not_a_crash() {
    for nesting in [0x91u8, 0x81] {
        let mut body = vec![0x92, 0x01];
        body.extend(std::iter::repeat_n(nesting, MAX_MESSAGE_BYTES - 3));
        body.push(0xc0);
        let signature = sign(CURRENT_SECRET, &body);
        let refused = on_worker_sized_stack(move || {
            keyring()
                .open(&body, Some("k1"), Some(&signature))
                .map(|_| ())
        });
        assert!(
            matches!(refused, Err(Rejection::Undecodable(_))),
            "{refused:?}"
        );
    }
}

/// Multi-byte characters where the parser looks for `SELECT` / `WITH`: it sliced the query at
/// a byte offset and panicked (found by `spec_parser_survives_mutated_specs`).
#[test]
fn source_query_with_multibyte_characters_is_refused_not_a_panic() {
    for query in ["abcdeé", "abcé", "ab𞄀", "日本語のテーブルから選ぶ"] {
        let text = include_str!("../../examples/mini_challenge.toml").replacen(
            "SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at\nFROM staging_order_items\nWHERE",
            &format!("{query}\nWHERE"),
            1,
        );
        let error = Spec::parse(&text).expect_err(query).to_string();
        assert!(error.contains("`source.query`"), "{query}: {error}");
    }
}

/// Partition bounds at the ends of the calendar: planning the partition after the last day
/// chrono knows overflowed and panicked (found by `spec_parser_survives_mutated_specs`).
/// Partitions now start in years 1 to 9999.
#[test]
fn partitions_at_the_end_of_the_calendar_are_refused_not_a_panic() {
    for (grain, first, last) in [
        ("day", "+262142-12-31", "+262142-12-31"),
        ("hour", "+262142-12-31T23", "+262142-12-31T23"),
        ("day", "-262143-01-01", "-262143-01-01"),
        ("day", "0000-12-31", "0000-12-31"),
    ] {
        let text = include_str!("../../examples/mini_challenge.toml")
            .replacen("grain = \"day\"", &format!("grain = \"{grain}\""), 1)
            .replacen("first = \"2024-03-03\"", &format!("first = \"{first}\""), 1)
            .replacen("last = \"2024-03-06\"", &format!("last = \"{last}\""), 1);
        let error = Spec::parse(&text).expect_err(first).to_string();
        assert!(error.contains("`partition.first`"), "{error}");
    }
}
