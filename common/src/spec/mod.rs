//! The backfill spec: one TOML file that says what to recompute, where, how fast and how to
//! check and publish it. `Spec::parse` validates everything up front; every error names the
//! field, the bad value and what would be allowed. The validated spec has a canonical form
//! whose SHA-256 pins a run to exactly this spec.

use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ident::{Ident, TableName};
use crate::plan::{self, Grain};
use crate::sql;

mod audits;
mod raw;
mod validate;

use audits::*;
use raw::*;
use validate::*;

/// Retention the lesson asks for: keep the previous version 14 to 30 days.
pub const MIN_RETENTION_DAYS: u32 = 14;

pub const DEFAULT_RETENTION_DAYS: u32 = 30;

/// Plans larger than this need `partition.max_partitions` raised explicitly.
pub const DEFAULT_MAX_PARTITIONS: usize = 20_000;

/// Default per-partition timeout. With the default 3 retries and 60 s maximum backoff a task
/// is held at most 23 minutes, inside RabbitMQ's default 30-minute consumer timeout.
pub const DEFAULT_PARTITION_TIMEOUT: &str = "5m";

/// Longest target name whose `__bf_undone_<run>` sibling still fits PostgreSQL's 63.
pub const MAX_TARGET_NAME_LEN: usize = 42;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the spec: {0}")]
    Syntax(String),
    #[error("`{field}`: got {value}; {allowed}")]
    Field {
        field: String,
        value: String,
        allowed: String,
    },
}

fn field_error(
    field: &str,
    value: impl std::fmt::Display,
    allowed: impl Into<String>,
) -> SpecError {
    SpecError::Field {
        field: field.to_string(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub name: String,
    pub description: Option<String>,
    pub target: Target,
    pub partition: Partitioning,
    pub source: Source,
    pub warehouse: WarehouseRef,
    pub execution: Execution,
    pub audits: Vec<Audit>,
    pub publish: Publish,
    pub hooks: Vec<Hook>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub table: TableName,
    pub key: Vec<Ident>,
    pub add_columns: Vec<NewColumn>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NewColumn {
    pub name: Ident,
    pub sql_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Partitioning {
    pub column: Ident,
    pub grain: Grain,
    pub scope: Scope,
    pub max_partitions: usize,
}

/// Which partitions a backfill touches: an inclusive range, or an explicit list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub enum Scope {
    Range {
        first: NaiveDateTime,
        last: NaiveDateTime,
    },
    List(Vec<NaiveDateTime>),
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The query as written, with `:partition_start` / `:partition_end` placeholders.
    pub query: String,
    pub dedupe_order_by: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WarehouseRef {
    pub name: String,
    pub concurrency: u32,
    pub control_schema: Ident,
}

#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    #[serde(with = "duration_ms")]
    pub partition_timeout: Duration,
    pub retries: u32,
    #[serde(with = "duration_ms")]
    pub backoff_initial: Duration,
    #[serde(with = "duration_ms")]
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warn,
}

#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub name: String,
    pub severity: Severity,
    pub check: AuditCheck,
}

#[derive(Debug, Clone, Serialize)]
pub enum AuditCheck {
    /// No two rows of the shadow share a key.
    UniqueKey,
    /// None of these columns is NULL in the backfilled partitions.
    NotNull { columns: Vec<Ident> },
    /// Every backfilled row satisfies a SQL boolean expression.
    Expression {
        expression: String,
        max_failing_rows: u64,
    },
    /// A column stays within [min, max] in the backfilled partitions.
    AcceptedRange {
        column: Ident,
        min: Option<f64>,
        max: Option<f64>,
        max_failing_rows: u64,
    },
    /// Per partition, the shadow's row count stays close to the current table's.
    RowcountDelta {
        max_change_pct: Option<f64>,
        max_change_rows: Option<u64>,
    },
    /// Per partition, an aggregate of the shadow compared with the current table.
    Aggregate {
        function: AggregateFunction,
        column: Option<Ident>,
        bounds: AggregateBounds,
    },
    /// A column only holds these values (compared as text; NULL passes, use not_null).
    AcceptedValues {
        column: Ident,
        values: Vec<String>,
        max_failing_rows: u64,
    },
    /// Every non-NULL value of a column exists in another table's column.
    Referential {
        column: Ident,
        table: TableName,
        references: Ident,
        max_failing_rows: u64,
    },
    /// A SELECT over `backfilled` (the window's new rows) and `current` (the window's current
    /// rows) that returns the failing rows.
    CustomSql { sql: String, max_failing_rows: u64 },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum AggregateFunction {
    Sum,
    Count,
    CountDistinct,
    Avg,
    Min,
    Max,
    Median,
    Percentile(f64),
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct AggregateBounds {
    pub max_change_pct: Option<f64>,
    pub min_ratio: Option<f64>,
    pub max_ratio: Option<f64>,
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// Chosen at plan time from the target's shape and size (`plan` says which and why).
    Auto,
    /// Rename the shadow (a full copy) into place; the old table becomes the archive.
    SwapTable,
    /// The shadow holds only the window: the old window rows move to the archive and the new
    /// ones replace them, in one transaction; the table keeps its identity.
    SwapWindow,
    /// Natively partitioned PostgreSQL targets: detach the old partitions, attach new ones.
    SwapPartitions,
}

impl PublishMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishMode::Auto => "auto",
            PublishMode::SwapTable => "swap_table",
            PublishMode::SwapWindow => "swap_window",
            PublishMode::SwapPartitions => "swap_partitions",
        }
    }

    pub fn parse(value: &str) -> Option<PublishMode> {
        [
            PublishMode::Auto,
            PublishMode::SwapTable,
            PublishMode::SwapWindow,
            PublishMode::SwapPartitions,
        ]
        .into_iter()
        .find(|m| m.as_str() == value)
    }
}

/// Whether a run publishes as soon as its audits pass, or waits for `backfill publish`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    Auto,
    Manual,
}

#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    pub mode: PublishMode,
    pub approval: Approval,
    pub archive_retention_days: u32,
    /// Longest a publish (or rollback) waits, in short attempts, for the locks its swap
    /// needs while sessions hold the target: past it the publish stops, nothing changed,
    /// and names the sessions in the way. Left out of the canonical form at its default.
    #[serde(with = "duration_ms", skip_serializing_if = "is_default_lock_wait")]
    pub lock_wait: Duration,
}

/// The default `publish.lock_wait`.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(60);

fn is_default_lock_wait(wait: &Duration) -> bool {
    *wait == DEFAULT_LOCK_WAIT
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// After the shadow is built, before partitions are written (pause or pin downstream).
    BeforeWrite,
    /// After the audits pass, before publishing; a failure blocks the publish.
    BeforePublish,
    /// After the publish committed (resume downstream, post the notice).
    AfterPublish,
    /// When a run stops without publishing (partitions or audits failed, an error, a blocking
    /// hook failed).
    OnFailure,
}

impl HookEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::BeforeWrite => "before_write",
            HookEvent::BeforePublish => "before_publish",
            HookEvent::AfterPublish => "after_publish",
            HookEvent::OnFailure => "on_failure",
        }
    }

    /// A failing hook of these events stops the run; the others are reported only.
    pub fn blocks(self) -> bool {
        matches!(self, HookEvent::BeforeWrite | HookEvent::BeforePublish)
    }
}

/// What a hook does.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HookAction {
    /// A program and its arguments (no shell), with the run's details in `BACKFILL_*`
    /// environment variables.
    Command(Vec<String>),
    /// POST a JSON body (with a Slack-compatible `text`) to this URL.
    Webhook(String),
    /// POST to the URL held by this environment variable (webhook URLs are secrets).
    WebhookFromEnv(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Hook {
    pub event: HookEvent,
    pub action: HookAction,
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    pub retries: u32,
    /// Environment variables a command hook may see besides its `BACKFILL_*` run details and
    /// PATH, HOME, LANG, TZ, TMPDIR, USER (the coordinator's secrets are never passed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<String>,
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }
}

impl Spec {
    /// Parses and validates a spec file's text.
    pub fn parse(text: &str) -> Result<Spec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Syntax(toml_message(&e)))?;
        validate(raw)
    }

    /// The canonical text of the validated spec: defaults filled in, fields in a fixed order,
    /// formatting and comments of the file gone. Two files that mean the same thing have the
    /// same canonical text.
    /// The canonical form the hash is taken of. Fields added after runs existed are left out
    /// while they hold their default (no hooks, automatic approval), so a spec that does not
    /// use them hashes as it did before they existed and its open run can still be resumed.
    pub fn canonical(&self) -> String {
        let mut value = serde_json::to_value(self).expect("a validated spec always serialises");
        if let Some(object) = value.as_object_mut() {
            if self.hooks.is_empty() {
                object.remove("hooks");
            }
            if self.publish.approval == Approval::Auto
                && let Some(publish) = object.get_mut("publish").and_then(|p| p.as_object_mut())
            {
                publish.remove("approval");
            }
        }
        serde_json::to_string(&value).expect("a JSON value always serialises")
    }

    /// SHA-256 of the canonical text, in hex. A run pins this.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// SHA-256 of what decides the rows a run writes: target, partitioning, source, warehouse
    /// and control schema, publish mode. Two specs with the same identity build the same
    /// shadow; the rest (execution bounds, concurrency, audits, approval, retention, hooks,
    /// name, description) may change between attempts of one run, when asked to
    /// (`backfill run --amend`).
    pub fn identity_hash(&self) -> String {
        let value = serde_json::to_value(self).expect("a validated spec always serialises");
        let identity: serde_json::Map<String, serde_json::Value> = flatten(&value)
            .into_iter()
            .filter(|(path, _)| is_identity(path))
            .collect();
        let text = serde_json::to_string(&identity).expect("a JSON value always serialises");
        let digest = Sha256::digest(text.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What differs from `earlier`, one `field: before → after` line each, split into
    /// changes of what the run writes (identity) and changes of settings.
    pub fn changes_since(&self, earlier: &Spec) -> SpecChanges {
        let before = flatten(&serde_json::to_value(earlier).expect("serialises"));
        let after = flatten(&serde_json::to_value(self).expect("serialises"));
        let mut paths: Vec<&String> = before.keys().chain(after.keys()).collect();
        paths.sort();
        paths.dedup();
        let mut changes = SpecChanges::default();
        for path in paths {
            let (old, new) = (before.get(path), after.get(path));
            if old == new {
                continue;
            }
            let show = |value: Option<&serde_json::Value>| match value {
                None => "(none)".to_string(),
                Some(serde_json::Value::Number(n)) if is_duration_path(path) => {
                    format!("{n}ms")
                }
                Some(value) => {
                    let text = value.to_string();
                    if text.chars().count() > 80 {
                        format!("{}…", text.chars().take(80).collect::<String>())
                    } else {
                        text
                    }
                }
            };
            let line = format!("{path}: {} → {}", show(old), show(new));
            if is_identity(path) {
                changes.identity.push(line);
            } else {
                changes.settings.push(line);
            }
        }
        changes
    }

    pub fn planned_partitions(&self) -> Vec<plan::Partition> {
        plan::partitions(self.partition.grain, &self.partition.scope)
    }
}

/// How two specs differ: `field: before → after` lines.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpecChanges {
    /// Changes of what a run writes: a run in progress can never take them.
    pub identity: Vec<String>,
    /// Changes of settings: a run in progress takes them when asked to.
    pub settings: Vec<String>,
}

impl SpecChanges {
    pub fn is_empty(&self) -> bool {
        self.identity.is_empty() && self.settings.is_empty()
    }
}

/// Whether a flattened spec field decides what a run writes. Settings are listed; every
/// other field (and any field added later, until it is listed here) is identity.
fn is_identity(path: &str) -> bool {
    let under = |top: &str| {
        path == top || path.starts_with(&format!("{top}.")) || path.starts_with(&format!("{top}["))
    };
    let setting = ["name", "description", "execution", "audits", "hooks"]
        .iter()
        .any(|top| under(top))
        || [
            "warehouse.concurrency",
            "publish.approval",
            "publish.archive_retention_days",
            "publish.lock_wait",
        ]
        .contains(&path);
    !setting
}

/// Fields serialised as milliseconds.
fn is_duration_path(path: &str) -> bool {
    path.ends_with(".partition_timeout")
        || path.ends_with(".backoff_initial")
        || path.ends_with(".backoff_max")
        || path.ends_with(".timeout")
        || path.ends_with(".lock_wait")
}

/// A JSON value as `path → leaf`: objects by key (`execution.retries`), array elements by
/// their `name` when they have one (`audits[not_null_quantity].severity`), else by index.
fn flatten(value: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
    fn walk(
        prefix: &str,
        value: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        let join = |key: &str| {
            if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            }
        };
        match value {
            serde_json::Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    walk(&join(key), child, out);
                }
            }
            serde_json::Value::Array(items) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    let label = item
                        .get("name")
                        .and_then(|n| n.as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| i.to_string());
                    walk(&format!("{prefix}[{label}]"), item, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// Parses `500ms`, `30s`, `10m`, `2h`.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => number,
        "s" => number.checked_mul(1_000)?,
        "m" => number.checked_mul(60_000)?,
        "h" => number.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// Day partitions accept `2024-03-01`; hour partitions `2024-03-01T05`, `2024-03-01T05:00` or
/// `2024-03-01T05:00:00`. Exposed for the CLI and tests.
pub fn parse_date(value: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
[target]
table = "fact_order_items"
key = ["order_id", "item_id"]

[partition]
column = "order_date"
grain = "day"
first = "2024-03-03"
last = "2024-03-06"

[source]
query = "SELECT * FROM staging_order_items WHERE order_date >= :partition_start AND order_date < :partition_end"

[warehouse]
name = "demo"
"#;

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = Spec::parse(MINIMAL).unwrap();
        assert_eq!(spec.warehouse.concurrency, 2);
        assert_eq!(spec.publish.archive_retention_days, 30);
        assert_eq!(spec.planned_partitions().len(), 4);
        assert_eq!(spec.hash().len(), 64);
    }

    #[test]
    fn unquoted_toml_dates_mean_the_same_as_strings() {
        let quoted = Spec::parse(MINIMAL).unwrap();
        let unquoted = Spec::parse(
            &MINIMAL
                .replace("first = \"2024-03-03\"", "first = 2024-03-03")
                .replace("last = \"2024-03-06\"", "last = 2024-03-06"),
        )
        .unwrap();
        assert_eq!(unquoted.planned_partitions(), quoted.planned_partitions());
        assert_eq!(unquoted.hash(), quoted.hash());

        let hourly = MINIMAL.replace("grain = \"day\"", "grain = \"hour\"");
        let listed = Spec::parse(&hourly.replace(
            "first = \"2024-03-03\"\nlast = \"2024-03-06\"",
            "list = [2024-03-03T05:00:00, \"2024-03-03T07\", 2024-03-03 06:00:00]",
        ))
        .unwrap();
        let starts: Vec<String> = listed
            .planned_partitions()
            .iter()
            .map(|p| p.start.to_string())
            .collect();
        assert_eq!(
            starts,
            [
                "2024-03-03 05:00:00",
                "2024-03-03 06:00:00",
                "2024-03-03 07:00:00"
            ]
        );
    }

    #[test]
    fn partition_values_of_the_wrong_kind_say_what_is_expected() {
        let offset = Spec::parse(
            &MINIMAL
                .replace("grain = \"day\"", "grain = \"hour\"")
                .replace("first = \"2024-03-03\"", "first = 2024-03-03T05:00:00Z")
                .replace("last = \"2024-03-06\"", "last = 2024-03-06T05:00:00Z"),
        )
        .unwrap_err()
        .to_string();
        assert!(offset.contains("partition.first"), "{offset}");
        assert!(offset.contains("no time zone offset"), "{offset}");

        let number = Spec::parse(&MINIMAL.replace("first = \"2024-03-03\"", "first = 20240303"))
            .unwrap_err()
            .to_string();
        assert!(number.contains("expected a partition start"), "{number}");
        assert!(
            number.contains("first = 20240303"),
            "the line is shown: {number}"
        );
    }

    #[test]
    fn settings_change_the_hash_but_not_the_identity() {
        let first = Spec::parse(MINIMAL).unwrap();
        let amended = Spec::parse(&format!(
            "{MINIMAL}\n[execution]\npartition_timeout = \"15m\"\n\n[[audit]]\nkind = \"unique_key\"\n"
        ))
        .unwrap();
        assert_ne!(amended.hash(), first.hash());
        assert_eq!(amended.identity_hash(), first.identity_hash());
        let changes = amended.changes_since(&first);
        assert_eq!(changes.identity, Vec::<String>::new());
        assert!(
            changes
                .settings
                .contains(&"execution.partition_timeout: 300000ms → 900000ms".to_string()),
            "{changes:?}"
        );
        assert!(
            changes
                .settings
                .iter()
                .any(|c| c.starts_with("audits[unique_key]")),
            "{changes:?}"
        );

        let rewritten =
            Spec::parse(&MINIMAL.replace("SELECT *", "SELECT order_id, item_id, order_date"))
                .unwrap();
        assert_ne!(rewritten.identity_hash(), first.identity_hash());
        let changes = rewritten.changes_since(&first);
        assert_eq!(changes.identity.len(), 1, "{changes:?}");
        assert!(
            changes.identity[0].starts_with("source.query: "),
            "{changes:?}"
        );
        assert!(changes.settings.is_empty());

        let wider = Spec::parse(&MINIMAL.replace("2024-03-06", "2024-03-07")).unwrap();
        assert_ne!(wider.identity_hash(), first.identity_hash());
        assert!(!wider.changes_since(&first).identity.is_empty());
        assert!(first.changes_since(&first).is_empty());
    }

    #[test]
    fn hash_ignores_formatting_but_not_meaning() {
        let a = Spec::parse(MINIMAL).unwrap();
        let reformatted = format!(
            "# a comment\n{}",
            MINIMAL.replace("grain = \"day\"", "grain   =   \"day\"")
        );
        let b = Spec::parse(&reformatted).unwrap();
        assert_eq!(a.hash(), b.hash());
        let changed = Spec::parse(&MINIMAL.replace("2024-03-06", "2024-03-07")).unwrap();
        assert_ne!(a.hash(), changed.hash());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("ten minutes"), None);
    }
}
