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

// ---------------------------------------------------------------------------------------------
// The file as written (serde), before validation.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Option<String>,
    description: Option<String>,
    target: RawTarget,
    partition: RawPartition,
    source: RawSource,
    warehouse: RawWarehouse,
    #[serde(default)]
    execution: RawExecution,
    #[serde(default, rename = "audit")]
    audits: Vec<RawAudit>,
    #[serde(default)]
    publish: RawPublish,
    #[serde(default, rename = "hook")]
    hooks: Vec<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    table: String,
    key: Vec<String>,
    #[serde(default)]
    add_columns: Vec<RawColumn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: String,
    #[serde(rename = "type")]
    sql_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartition {
    column: String,
    grain: String,
    first: Option<PartitionValue>,
    last: Option<PartitionValue>,
    list: Option<Vec<PartitionValue>>,
    max_partitions: Option<usize>,
}

/// A partition start as written in the spec: a string (`"2024-03-03"`) or, since TOML has them
/// and users write them, an unquoted date or local date-time literal (`2024-03-03`,
/// `2024-03-03T05:00:00`), kept as its text and parsed like the string.
#[derive(Debug)]
struct PartitionValue(String);

impl<'de> Deserialize<'de> for PartitionValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(deserializer)? {
            toml::Value::String(text) => Ok(PartitionValue(text)),
            toml::Value::Datetime(datetime) => Ok(PartitionValue(datetime.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "expected a partition start such as \"2024-03-03\" (day) or \"2024-03-03T05\" (hour), got `{other}`"
            ))),
        }
    }
}

impl std::ops::Deref for PartitionValue {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PartitionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    query: String,
    dedupe_order_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWarehouse {
    name: String,
    concurrency: Option<u32>,
    control_schema: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecution {
    partition_timeout: Option<String>,
    retries: Option<u32>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    kind: String,
    name: Option<String>,
    severity: Option<String>,
    columns: Option<Vec<String>>,
    column: Option<String>,
    expression: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
    max_failing_rows: Option<u64>,
    max_change_pct: Option<f64>,
    max_change_rows: Option<u64>,
    function: Option<String>,
    percentile: Option<f64>,
    min_ratio: Option<f64>,
    max_ratio: Option<f64>,
    min_value: Option<f64>,
    max_value: Option<f64>,
    values: Option<Vec<toml::Value>>,
    references: Option<String>,
    sql: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    on: String,
    command: Option<Vec<String>>,
    url: Option<String>,
    url_env: Option<String>,
    timeout: Option<String>,
    retries: Option<u32>,
    pass_env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublish {
    mode: Option<String>,
    approval: Option<String>,
    archive_retention_days: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// The validated spec.
// ---------------------------------------------------------------------------------------------

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

fn toml_message(error: &toml::de::Error) -> String {
    // toml's message already names the key and shows the offending line; keep it on one line
    // per fact so it reads well in a terminal.
    error.to_string().trim_end().to_string()
}

fn validate(raw: RawSpec) -> Result<Spec, SpecError> {
    let name = match raw.name {
        Some(name) if name.trim().is_empty() => {
            return Err(field_error(
                "name",
                "an empty string",
                "give the backfill a short name or leave the field out",
            ));
        }
        Some(name) => name,
        None => raw.target.table.clone(),
    };

    if raw.target.table.matches('.').count() > 1 {
        return Err(field_error(
            "target.table",
            format!("`{}`", raw.target.table),
            "allowed: `table` or `schema.table` (the warehouse comes from warehouse.name)",
        ));
    }
    let table = TableName::parse(&raw.target.table).map_err(|e| {
        field_error(
            "target.table",
            format!("`{}`", raw.target.table),
            e.to_string(),
        )
    })?;
    if raw.target.key.is_empty() {
        return Err(field_error(
            "target.key",
            "an empty list",
            "list the column(s) that identify a row, e.g. key = [\"order_id\"]",
        ));
    }
    if table.name.as_str().len() > MAX_TARGET_NAME_LEN {
        return Err(field_error(
            "target.table",
            format!(
                "`{}` ({} characters)",
                table.name,
                table.name.as_str().len()
            ),
            format!(
                "at most {MAX_TARGET_NAME_LEN} characters, so that its shadow and archive tables (`<table>__bf_archive_<run>`) fit in 63"
            ),
        ));
    }
    let key = idents("target.key", &raw.target.key)?;
    let mut add_columns: Vec<NewColumn> = Vec::new();
    for (i, column) in raw.target.add_columns.iter().enumerate() {
        let field = format!("target.add_columns[{i}]");
        let name = ident(&format!("{field}.name"), &column.name)?;
        if add_columns.iter().any(|c| c.name == name) {
            return Err(field_error(
                &format!("{field}.name"),
                format!("`{name}` twice"),
                "add each new column once",
            ));
        }
        add_columns.push(NewColumn {
            name,
            sql_type: sql_type(&format!("{field}.type"), &column.sql_type)?,
        });
    }

    let column = ident("partition.column", &raw.partition.column)?;
    let grain = match raw.partition.grain.as_str() {
        "day" => Grain::Day,
        "hour" => Grain::Hour,
        other => {
            return Err(field_error(
                "partition.grain",
                format!("`{other}`"),
                "allowed: \"day\" or \"hour\"",
            ));
        }
    };
    let scope = scope(&raw.partition, grain)?;
    let max_partitions = raw
        .partition
        .max_partitions
        .unwrap_or(DEFAULT_MAX_PARTITIONS);
    let count = plan::count(grain, &scope);
    if count > max_partitions {
        return Err(field_error(
            "partition",
            format!("{count} partitions"),
            format!(
                "at most {max_partitions} are allowed; if you really mean it, set partition.max_partitions = {count}"
            ),
        ));
    }

    let query = source_query(&raw.source.query)?;
    let dedupe_order_by = match raw.source.dedupe_order_by {
        Some(order) => Some(sql_fragment("source.dedupe_order_by", &order)?),
        None => None,
    };

    if raw.warehouse.name.is_empty()
        || !raw
            .warehouse
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(field_error(
            "warehouse.name",
            format!("`{}`", raw.warehouse.name),
            "allowed: letters, digits, `_` and `-` (the URL comes from BACKFILL_WAREHOUSE_<NAME>_URL, --warehouse-url or the config file)",
        ));
    }
    let concurrency = raw.warehouse.concurrency.unwrap_or(2);
    if !(1..=256).contains(&concurrency) {
        return Err(field_error(
            "warehouse.concurrency",
            concurrency,
            "allowed: 1 to 256 partitions at a time",
        ));
    }
    let control_schema = ident(
        "warehouse.control_schema",
        raw.warehouse
            .control_schema
            .as_deref()
            .unwrap_or("backfill"),
    )?;

    let execution = Execution {
        partition_timeout: duration(
            "execution.partition_timeout",
            raw.execution
                .partition_timeout
                .as_deref()
                .unwrap_or(DEFAULT_PARTITION_TIMEOUT),
        )?,
        retries: raw.execution.retries.unwrap_or(3),
        backoff_initial: duration(
            "execution.backoff_initial",
            raw.execution.backoff_initial.as_deref().unwrap_or("1s"),
        )?,
        backoff_max: duration(
            "execution.backoff_max",
            raw.execution.backoff_max.as_deref().unwrap_or("60s"),
        )?,
    };
    if execution.retries > 20 {
        return Err(field_error(
            "execution.retries",
            execution.retries,
            "allowed: 0 to 20",
        ));
    }
    if execution.partition_timeout < Duration::from_secs(1) {
        return Err(field_error(
            "execution.partition_timeout",
            raw.execution.partition_timeout.unwrap_or_default(),
            "allowed: at least 1s",
        ));
    }
    if execution.backoff_max < execution.backoff_initial {
        return Err(field_error(
            "execution.backoff_max",
            format!("{:?}", execution.backoff_max),
            format!(
                "must be at least execution.backoff_initial ({:?}); raise backoff_max or lower backoff_initial",
                execution.backoff_initial
            ),
        ));
    }

    let mut audits = Vec::new();
    for (i, audit) in raw.audits.into_iter().enumerate() {
        audits.push(validate_audit(i, audit)?);
    }
    for (i, audit) in audits.iter().enumerate() {
        if let Some(first) = audits[..i].iter().position(|a| a.name == audit.name) {
            return Err(field_error(
                &format!("audit[{i}].name"),
                format!("`{}`, already the name of audit[{first}]", audit.name),
                "each audit needs its own name (unnamed audits are named after their kind and column): set `name`",
            ));
        }
    }

    let mode_name = raw.publish.mode.as_deref().unwrap_or("auto");
    let mode = PublishMode::parse(mode_name).ok_or_else(|| {
        field_error(
            "publish.mode",
            format!("`{mode_name}`"),
            "allowed: \"auto\" (the default: `plan` says which mode and why), \"swap_table\", \"swap_window\", \"swap_partitions\"",
        )
    })?;
    if mode == PublishMode::SwapWindow && !add_columns.is_empty() {
        return Err(field_error(
            "publish.mode",
            "`swap_window` with target.add_columns",
            "swap_window keeps the table and only replaces the window's rows, so it cannot add columns: use \"swap_table\" (or \"auto\")",
        ));
    }
    let approval = match raw.publish.approval.as_deref().unwrap_or("auto") {
        "auto" => Approval::Auto,
        "manual" => Approval::Manual,
        other => {
            return Err(field_error(
                "publish.approval",
                format!("`{other}`"),
                "allowed: \"auto\" (publish when the audits pass) or \"manual\" (stop in awaiting_approval until `backfill publish <run>`)",
            ));
        }
    };
    let hooks = raw
        .hooks
        .iter()
        .enumerate()
        .map(|(i, hook)| parse_hook(i, hook))
        .collect::<Result<Vec<_>, _>>()?;
    let archive_retention_days = raw
        .publish
        .archive_retention_days
        .unwrap_or(DEFAULT_RETENTION_DAYS);
    if archive_retention_days < MIN_RETENTION_DAYS {
        return Err(field_error(
            "publish.archive_retention_days",
            archive_retention_days,
            format!(
                "at least {MIN_RETENTION_DAYS} days, so a bad publish can still be rolled back (the usual range is 14 to 30)"
            ),
        ));
    }

    Ok(Spec {
        name,
        description: raw.description,
        target: Target {
            table,
            key,
            add_columns,
        },
        partition: Partitioning {
            column,
            grain,
            scope,
            max_partitions,
        },
        source: Source {
            query,
            dedupe_order_by,
        },
        warehouse: WarehouseRef {
            name: raw.warehouse.name,
            concurrency,
            control_schema,
        },
        execution,
        audits,
        publish: Publish {
            mode,
            approval,
            archive_retention_days,
        },
        hooks,
    })
}

/// Longest a hook may run: hooks pause dashboards or post notices, they are not jobs.
const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(600);

fn parse_hook(index: usize, raw: &RawHook) -> Result<Hook, SpecError> {
    let field = |name: &str| format!("hook[{index}].{name}");
    let event = match raw.on.as_str() {
        "before_write" => HookEvent::BeforeWrite,
        "before_publish" => HookEvent::BeforePublish,
        "after_publish" => HookEvent::AfterPublish,
        "on_failure" => HookEvent::OnFailure,
        other => {
            return Err(field_error(
                &field("on"),
                format!("`{other}`"),
                "allowed: before_write, before_publish, after_publish, on_failure",
            ));
        }
    };
    let action = match (&raw.command, &raw.url, &raw.url_env) {
        (Some(command), None, None) => {
            if command.is_empty() || command[0].trim().is_empty() {
                return Err(field_error(
                    &field("command"),
                    "an empty command",
                    "give the program and its arguments, e.g. [\"./pause_dashboards.sh\", \"orders\"] (no shell is involved)",
                ));
            }
            HookAction::Command(command.clone())
        }
        (None, Some(url), None) => {
            let parsed = url::Url::parse(url).map_err(|e| {
                field_error(
                    &field("url"),
                    "an invalid URL",
                    format!("{e}; e.g. https://hooks.example.com/backfill"),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(field_error(
                    &field("url"),
                    format!("a {} URL", parsed.scheme()),
                    "allowed: http or https",
                ));
            }
            HookAction::Webhook(url.clone())
        }
        (None, None, Some(variable)) => {
            if variable.is_empty()
                || !variable
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(field_error(
                    &field("url_env"),
                    format!("`{variable}`"),
                    "the name of an environment variable holding the webhook URL, e.g. SLACK_WEBHOOK_URL",
                ));
            }
            HookAction::WebhookFromEnv(variable.clone())
        }
        _ => {
            return Err(field_error(
                &field("command"),
                "none or several of command, url, url_env",
                "give exactly one: command = [\"program\", \"arg\"], url = \"https://…\", or url_env = \"VARIABLE\" (keeps a secret webhook URL out of the spec)",
            ));
        }
    };
    let timeout = match &raw.timeout {
        Some(text) => duration(&field("timeout"), text)?,
        None => Duration::from_secs(30),
    };
    if timeout.is_zero() || timeout > MAX_HOOK_TIMEOUT {
        return Err(field_error(
            &field("timeout"),
            format!("{timeout:?}"),
            "between 1ms and 10m",
        ));
    }
    let retries = raw.retries.unwrap_or(2);
    if retries > 10 {
        return Err(field_error(&field("retries"), retries, "at most 10"));
    }
    let pass_env = raw.pass_env.clone().unwrap_or_default();
    if !matches!(action, HookAction::Command(_)) && !pass_env.is_empty() {
        return Err(field_error(
            &field("pass_env"),
            "a list on a webhook",
            "pass_env only applies to command hooks",
        ));
    }
    for name in &pass_env {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(field_error(
                &field("pass_env"),
                format!("`{name}`"),
                "names of environment variables, e.g. [\"DASHBOARD_API_TOKEN\"]",
            ));
        }
        if name.starts_with("BACKFILL_") {
            return Err(field_error(
                &field("pass_env"),
                format!("`{name}`"),
                "BACKFILL_* variables hold the coordinator's own settings and secrets and are never passed to hooks",
            ));
        }
    }
    Ok(Hook {
        event,
        action,
        timeout,
        retries,
        pass_env,
    })
}

fn ident(field: &str, value: &str) -> Result<Ident, SpecError> {
    Ident::new(value).map_err(|e| field_error(field, format!("`{value}`"), e.to_string()))
}

fn idents(field: &str, values: &[String]) -> Result<Vec<Ident>, SpecError> {
    let mut out = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let id = ident(&format!("{field}[{i}]"), value)?;
        if out.contains(&id) {
            return Err(field_error(
                field,
                format!("`{value}` twice"),
                "list each column once",
            ));
        }
        out.push(id);
    }
    Ok(out)
}

/// A column type for `ALTER TABLE … ADD COLUMN`: a type name, optional words that belong to
/// multi-word types (`double precision`, `timestamp with time zone`, `character varying`),
/// optional `(n)` / `(p, s)` and `[]`. Nothing else, so no clause can ride along.
fn sql_type(field: &str, value: &str) -> Result<String, SpecError> {
    const CONTINUATIONS: &[&str] = &["precision", "varying", "with", "without", "time", "zone"];
    let refuse = || {
        Err(field_error(
            field,
            format!("`{value}`"),
            "allowed: a plain SQL type such as integer, bigint, numeric(12,2), text, double precision, timestamp with time zone",
        ))
    };
    let trimmed = value.trim();
    let (head, rest) = match trimmed.find('(') {
        Some(open) => (&trimmed[..open], &trimmed[open..]),
        None => (trimmed, ""),
    };
    let mut words = head.split_whitespace();
    let first_ok = words.next().is_some_and(|w| {
        w.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    let words_ok = words.all(|w| CONTINUATIONS.contains(&w.to_ascii_lowercase().as_str()));
    let rest = rest.strip_suffix("[]").unwrap_or(rest);
    let modifiers_ok = rest.is_empty()
        || (rest.starts_with('(')
            && rest.ends_with(')')
            && rest[1..rest.len() - 1]
                .split(',')
                .all(|n| !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())));
    if first_ok && words_ok && modifiers_ok && trimmed.len() <= 64 {
        Ok(trimmed.to_string())
    } else {
        refuse()
    }
}

fn scope(raw: &RawPartition, grain: Grain) -> Result<Scope, SpecError> {
    let parse = |field: &str, value: &str| {
        plan::parse_partition_start(grain, value).ok_or_else(|| {
            field_error(
                field,
                format!("`{value}`"),
                partition_value_hint(grain, value),
            )
        })
    };
    match (&raw.first, &raw.last, &raw.list) {
        (Some(first), Some(last), None) => {
            let f = parse("partition.first", first)?;
            let l = parse("partition.last", last)?;
            if l < f {
                return Err(field_error(
                    "partition.last",
                    format!("`{last}`"),
                    format!("must not be before partition.first (`{first}`)"),
                ));
            }
            Ok(Scope::Range { first: f, last: l })
        }
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err(field_error(
                    "partition.list",
                    "an empty list",
                    "list at least one partition",
                ));
            }
            let mut starts = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let start = parse(&format!("partition.list[{i}]"), item)?;
                starts.push(start);
            }
            starts.sort();
            starts.dedup();
            Ok(Scope::List(starts))
        }
        (first, last, list) => {
            let got = match (first.is_some() || last.is_some(), list.is_some()) {
                (true, true) => "both a range (`first`/`last`) and a `list`",
                (true, false) if first.is_some() => "`first` without `last`",
                (true, false) => "`last` without `first`",
                _ => "neither a range nor a list",
            };
            Err(field_error(
                "partition",
                got,
                "give either `first` and `last` (both included) or `list` (explicit partitions), not both",
            ))
        }
    }
}

/// Why a partition value did not parse, as precisely as we can tell.
fn partition_value_hint(grain: Grain, value: &str) -> String {
    let shaped_like_date = value.len() >= 10
        && value.as_bytes()[..10].iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    let real_date = shaped_like_date && parse_date(&value[..10]).is_some();
    let has_offset = real_date
        && value.len() > 10
        && (value.ends_with(['Z', 'z']) || value[10..].contains(['+', '-']));
    match grain {
        _ if has_offset => {
            "a partition start has no time zone offset: write it without `Z` or `+hh:mm`, e.g. 2024-03-01T05 (hour) or 2024-03-01 (day)"
                .to_string()
        }
        Grain::Day if shaped_like_date && !real_date => {
            format!("`{}` is not a calendar date", &value[..10])
        }
        Grain::Day => "expected a date like 2024-03-01".to_string(),
        Grain::Hour if shaped_like_date && !real_date => {
            format!("`{}` is not a calendar date", &value[..10])
        }
        Grain::Hour if real_date && value.len() > 13 => {
            "hour partitions start on the hour: expected e.g. 2024-03-01T05 or 2024-03-01T05:00:00"
                .to_string()
        }
        Grain::Hour => "expected an hour like 2024-03-01T05 (or 2024-03-01T05:00:00)".to_string(),
    }
}

fn source_query(query: &str) -> Result<String, SpecError> {
    let trimmed = query.trim();
    let body = sql::strip_leading_comments(trimmed)
        .trim_start_matches(|c: char| c == '(' || c.is_whitespace());
    // `get`, not indexing: the query may start with a multi-byte character.
    let starts_like_select = ["select", "with"].iter().any(|kw| {
        body.get(..kw.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(kw))
            && body[kw.len()..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
    });
    if !starts_like_select {
        let first_word: String = body
            .chars()
            .take_while(|c| !c.is_whitespace())
            .take(20)
            .collect();
        return Err(field_error(
            "source.query",
            format!("a statement starting with `{first_word}`"),
            "the source must be one SELECT (or WITH ... SELECT) query",
        ));
    }
    let scan =
        sql::scan_placeholders(trimmed).map_err(|e| field_error("source.query", "the query", e))?;
    if scan.has_statement_separator {
        return Err(field_error(
            "source.query",
            "a `;`",
            "the source must be a single query without `;`",
        ));
    }
    const WRITES: &[&str] = &[
        "insert", "update", "delete", "merge", "truncate", "drop", "alter", "create", "grant",
        "revoke", "copy", "call", "vacuum",
    ];
    if let Some(word) = scan.words.iter().find(|w| WRITES.contains(&w.as_str())) {
        return Err(field_error(
            "source.query",
            format!("`{}`", word.to_ascii_uppercase()),
            "the source must only read: one SELECT (or WITH ... SELECT) without data-modifying statements",
        ));
    }
    for name in &scan.names {
        if !sql::SOURCE_PARAMETERS.contains(&name.as_str()) {
            return Err(field_error(
                "source.query",
                format!("the parameter `:{name}`"),
                format!(
                    "allowed parameters: {}",
                    sql::SOURCE_PARAMETERS
                        .iter()
                        .map(|p| format!(":{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    for required in ["partition_start", "partition_end"] {
        if !scan.names.iter().any(|n| n == required) {
            return Err(field_error(
                "source.query",
                format!("a query without `:{required}`"),
                "filter on the partition, e.g. WHERE order_date >= :partition_start AND order_date < :partition_end, so that each task reads exactly one partition",
            ));
        }
    }
    Ok(sql::embeddable(trimmed))
}

fn sql_fragment(field: &str, value: &str) -> Result<String, SpecError> {
    let scan =
        sql::scan_placeholders(value).map_err(|e| field_error(field, format!("`{value}`"), e))?;
    if scan.has_statement_separator || !scan.names.is_empty() || value.trim().is_empty() {
        return Err(field_error(
            field,
            format!("`{value}`"),
            "allowed: one SQL expression, without `;` or parameters",
        ));
    }
    Ok(sql::embeddable(value.trim()))
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

fn duration(field: &str, value: &str) -> Result<Duration, SpecError> {
    parse_duration(value).ok_or_else(|| {
        field_error(
            field,
            format!("`{value}`"),
            "allowed: a number with a unit, e.g. 500ms, 30s, 10m, 2h",
        )
    })
}

fn validate_audit(index: usize, raw: RawAudit) -> Result<Audit, SpecError> {
    let field = |name: &str| format!("audit[{index}].{name}");
    let severity = match raw.severity.as_deref().unwrap_or("error") {
        "error" => Severity::Error,
        "warn" => Severity::Warn,
        other => {
            return Err(field_error(
                &field("severity"),
                format!("`{other}`"),
                "allowed: \"error\" (blocks publish) or \"warn\" (reports only)",
            ));
        }
    };
    reject_fields_that_do_not_apply(index, &raw)?;
    for (name, value) in [
        ("min", raw.min),
        ("max", raw.max),
        ("max_change_pct", raw.max_change_pct),
        ("percentile", raw.percentile),
        ("min_ratio", raw.min_ratio),
        ("max_ratio", raw.max_ratio),
        ("min_value", raw.min_value),
        ("max_value", raw.max_value),
    ] {
        if let Some(v) = value
            && !v.is_finite()
        {
            return Err(field_error(&field(name), v, "allowed: a finite number"));
        }
    }
    for (low, high, low_name, high_name) in [
        (raw.min_ratio, raw.max_ratio, "min_ratio", "max_ratio"),
        (raw.min_value, raw.max_value, "min_value", "max_value"),
    ] {
        if let (Some(low), Some(high)) = (low, high)
            && low > high
        {
            return Err(field_error(
                &field(high_name),
                high,
                format!("must be at least {low_name} ({low})"),
            ));
        }
    }
    for (name, value) in [("min_ratio", raw.min_ratio), ("max_ratio", raw.max_ratio)] {
        non_negative(&field(name), value)?;
    }
    let require = |value: Option<String>, name: &str, hint: &str| {
        value.ok_or_else(|| {
            field_error(
                &field(name),
                "nothing",
                format!("the {} audit needs `{name}`: {hint}", raw.kind),
            )
        })
    };
    let (default_name, check) = match raw.kind.as_str() {
        "unique_key" => ("unique_key".to_string(), AuditCheck::UniqueKey),
        "not_null" => {
            let columns = raw.columns.clone().ok_or_else(|| {
                field_error(
                    &field("columns"),
                    "nothing",
                    "the not_null audit needs `columns`, e.g. columns = [\"event_time\"]",
                )
            })?;
            if columns.is_empty() {
                return Err(field_error(
                    &field("columns"),
                    "an empty list",
                    "list at least one column",
                ));
            }
            let columns = idents(&field("columns"), &columns)?;
            (
                format!(
                    "not_null_{}",
                    columns
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join("_")
                ),
                AuditCheck::NotNull { columns },
            )
        }
        "expression" => {
            let expression = require(
                raw.expression.clone(),
                "expression",
                "a SQL condition every row must meet, e.g. \"quantity >= 0\"",
            )?;
            let expression = sql_fragment(&field("expression"), &expression)?;
            (
                "expression".to_string(),
                AuditCheck::Expression {
                    expression,
                    max_failing_rows: raw.max_failing_rows.unwrap_or(0),
                },
            )
        }
        "accepted_range" => {
            let column = require(raw.column.clone(), "column", "the column to check")?;
            let column = ident(&field("column"), &column)?;
            if raw.min.is_none() && raw.max.is_none() {
                return Err(field_error(
                    &field("min"),
                    "nothing",
                    "the accepted_range audit needs `min`, `max` or both",
                ));
            }
            if let (Some(min), Some(max)) = (raw.min, raw.max)
                && min > max
            {
                return Err(field_error(
                    &field("max"),
                    max,
                    format!("must be at least min ({min})"),
                ));
            }
            (
                format!("accepted_range_{column}"),
                AuditCheck::AcceptedRange {
                    column,
                    min: raw.min,
                    max: raw.max,
                    max_failing_rows: raw.max_failing_rows.unwrap_or(0),
                },
            )
        }
        "rowcount_delta" => {
            if raw.max_change_pct.is_none() && raw.max_change_rows.is_none() {
                return Err(field_error(
                    &field("max_change_pct"),
                    "nothing",
                    "the rowcount_delta audit needs `max_change_pct` (e.g. 1.0 for 1%) and/or `max_change_rows`",
                ));
            }
            non_negative(&field("max_change_pct"), raw.max_change_pct)?;
            (
                "rowcount_delta".to_string(),
                AuditCheck::RowcountDelta {
                    max_change_pct: raw.max_change_pct,
                    max_change_rows: raw.max_change_rows,
                },
            )
        }
        "aggregate" => {
            let function_name = require(
                raw.function.clone(),
                "function",
                "one of sum, count, count_distinct, avg, min, max, median, percentile",
            )?;
            let function = match function_name.as_str() {
                "sum" => AggregateFunction::Sum,
                "count" => AggregateFunction::Count,
                "count_distinct" => AggregateFunction::CountDistinct,
                "avg" => AggregateFunction::Avg,
                "min" => AggregateFunction::Min,
                "max" => AggregateFunction::Max,
                "median" => AggregateFunction::Median,
                "percentile" => {
                    let p = raw.percentile.ok_or_else(|| {
                        field_error(
                            &field("percentile"),
                            "nothing",
                            "the percentile function needs `percentile` between 0 and 1, e.g. 0.9",
                        )
                    })?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(field_error(
                            &field("percentile"),
                            p,
                            "allowed: between 0 and 1",
                        ));
                    }
                    AggregateFunction::Percentile(p)
                }
                other => {
                    return Err(field_error(
                        &field("function"),
                        format!("`{other}`"),
                        "allowed: sum, count, count_distinct, avg, min, max, median, percentile",
                    ));
                }
            };
            let column = match (&raw.column, function) {
                (None, AggregateFunction::Count) => None,
                (None, _) => {
                    return Err(field_error(
                        &field("column"),
                        "nothing",
                        format!("the {function_name} aggregate needs `column`"),
                    ));
                }
                (Some(c), _) => Some(ident(&field("column"), c)?),
            };
            let bounds = AggregateBounds {
                max_change_pct: raw.max_change_pct,
                min_ratio: raw.min_ratio,
                max_ratio: raw.max_ratio,
                min_value: raw.min_value,
                max_value: raw.max_value,
            };
            non_negative(&field("max_change_pct"), bounds.max_change_pct)?;
            if bounds.max_change_pct.is_none()
                && bounds.min_ratio.is_none()
                && bounds.max_ratio.is_none()
                && bounds.min_value.is_none()
                && bounds.max_value.is_none()
            {
                return Err(field_error(
                    &field("max_change_pct"),
                    "no bound",
                    "give at least one of max_change_pct, min_ratio, max_ratio (shadow / current), min_value, max_value",
                ));
            }
            let name = match &column {
                Some(c) => format!("{function_name}_{c}"),
                None => function_name.clone(),
            };
            (
                name,
                AuditCheck::Aggregate {
                    function,
                    column,
                    bounds,
                },
            )
        }
        "accepted_values" => {
            let column = require(raw.column.clone(), "column", "the column to check")?;
            let column = ident(&field("column"), &column)?;
            let values = raw.values.clone().ok_or_else(|| {
                field_error(
                    &field("values"),
                    "nothing",
                    "the accepted_values audit needs `values`, e.g. values = [\"paid\", \"refunded\"]",
                )
            })?;
            if values.is_empty() {
                return Err(field_error(
                    &field("values"),
                    "an empty list",
                    "list at least one value",
                ));
            }
            let values = values
                .iter()
                .map(|value| match value {
                    toml::Value::String(text) => Ok(text.clone()),
                    toml::Value::Integer(number) => Ok(number.to_string()),
                    toml::Value::Boolean(flag) => Ok(flag.to_string()),
                    other => Err(field_error(
                        &field("values"),
                        format!("`{other}`"),
                        "strings, integers or booleans (values are compared as text)",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            (
                format!("accepted_values_{column}"),
                AuditCheck::AcceptedValues {
                    column,
                    values,
                    max_failing_rows: raw.max_failing_rows.unwrap_or(0),
                },
            )
        }
        "referential" => {
            let column = require(
                raw.column.clone(),
                "column",
                "the column holding the reference",
            )?;
            let column = ident(&field("column"), &column)?;
            let references = require(
                raw.references.clone(),
                "references",
                "the referenced table and column, e.g. \"analytics.dim_customer.customer_id\"",
            )?;
            let (table_text, referenced) = references.rsplit_once('.').ok_or_else(|| {
                field_error(
                    &field("references"),
                    format!("`{references}`"),
                    "write it as table.column or schema.table.column",
                )
            })?;
            let table = TableName::parse(table_text).map_err(|e| {
                field_error(
                    &field("references"),
                    format!("`{references}`"),
                    e.to_string(),
                )
            })?;
            let references = ident(&field("references"), referenced)?;
            (
                format!("referential_{column}"),
                AuditCheck::Referential {
                    column,
                    table,
                    references,
                    max_failing_rows: raw.max_failing_rows.unwrap_or(0),
                },
            )
        }
        "custom_sql" => {
            let sql = require(
                raw.sql.clone(),
                "sql",
                "a SELECT over `backfilled` (and `current`) returning the failing rows",
            )?;
            let sql = sql_fragment(&field("sql"), &sql)?;
            let starts_with_select = sql::strip_leading_comments(&sql)
                .get(..6)
                .is_some_and(|head| head.eq_ignore_ascii_case("select"))
                || sql::strip_leading_comments(&sql)
                    .get(..4)
                    .is_some_and(|head| head.eq_ignore_ascii_case("with"));
            if !starts_with_select {
                return Err(field_error(
                    &field("sql"),
                    "a statement that is not a query",
                    "a SELECT (or WITH … SELECT) returning the failing rows, e.g. \"SELECT * FROM backfilled WHERE revenue < cost\"",
                ));
            }
            (
                "custom_sql".to_string(),
                AuditCheck::CustomSql {
                    sql,
                    max_failing_rows: raw.max_failing_rows.unwrap_or(0),
                },
            )
        }
        other => {
            return Err(field_error(
                &field("kind"),
                format!("`{other}`"),
                "allowed: unique_key, not_null, expression, accepted_range, accepted_values, referential, rowcount_delta, aggregate, custom_sql",
            ));
        }
    };
    let name = match raw.name {
        Some(name) => {
            Ident::new(&name)
                .map_err(|e| field_error(&field("name"), format!("`{name}`"), e.to_string()))?;
            name
        }
        None => default_name,
    };
    Ok(Audit {
        name,
        severity,
        check,
    })
}

/// Fields that mean nothing for an audit kind are refused rather than silently ignored: a
/// `columns` on unique_key most likely means the author expects another key to be checked.
fn reject_fields_that_do_not_apply(index: usize, raw: &RawAudit) -> Result<(), SpecError> {
    let allowed: &[&str] = match raw.kind.as_str() {
        "unique_key" => &[],
        "not_null" => &["columns"],
        "expression" => &["expression", "max_failing_rows"],
        "accepted_range" => &["column", "min", "max", "max_failing_rows"],
        "rowcount_delta" => &["max_change_pct", "max_change_rows"],
        "accepted_values" => &["column", "values", "max_failing_rows"],
        "referential" => &["column", "references", "max_failing_rows"],
        "custom_sql" => &["sql", "max_failing_rows"],
        "aggregate" => &[
            "function",
            "column",
            "percentile",
            "max_change_pct",
            "min_ratio",
            "max_ratio",
            "min_value",
            "max_value",
        ],
        _ => return Ok(()),
    };
    let present = [
        ("columns", raw.columns.is_some()),
        ("column", raw.column.is_some()),
        ("expression", raw.expression.is_some()),
        ("min", raw.min.is_some()),
        ("max", raw.max.is_some()),
        ("max_failing_rows", raw.max_failing_rows.is_some()),
        ("max_change_pct", raw.max_change_pct.is_some()),
        ("max_change_rows", raw.max_change_rows.is_some()),
        ("function", raw.function.is_some()),
        ("percentile", raw.percentile.is_some()),
        ("min_ratio", raw.min_ratio.is_some()),
        ("max_ratio", raw.max_ratio.is_some()),
        ("min_value", raw.min_value.is_some()),
        ("max_value", raw.max_value.is_some()),
        ("values", raw.values.is_some()),
        ("references", raw.references.is_some()),
        ("sql", raw.sql.is_some()),
    ];
    for (name, is_set) in present {
        if is_set && !allowed.contains(&name) {
            let hint = if raw.kind == "unique_key" && matches!(name, "columns" | "column") {
                "unique_key always checks target.key; to check other columns use a custom expression or change target.key".to_string()
            } else if allowed.is_empty() {
                format!(
                    "the {} audit takes no settings besides name and severity",
                    raw.kind
                )
            } else {
                format!("the {} audit takes: {}", raw.kind, allowed.join(", "))
            };
            return Err(field_error(
                &format!("audit[{index}].{name}"),
                "a value",
                hint,
            ));
        }
    }
    if raw.kind == "aggregate"
        && raw.percentile.is_some()
        && raw.function.as_deref() != Some("percentile")
    {
        return Err(field_error(
            &format!("audit[{index}].percentile"),
            "a value",
            "`percentile` only applies with function = \"percentile\"",
        ));
    }
    Ok(())
}

fn non_negative(field: &str, value: Option<f64>) -> Result<(), SpecError> {
    match value {
        Some(v) if v.is_nan() || v < 0.0 => Err(field_error(field, v, "allowed: zero or more")),
        _ => Ok(()),
    }
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
