//! The spec file as written (serde), before validation.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpec {
    pub(super) name: Option<String>,
    pub(super) description: Option<String>,
    pub(super) target: RawTarget,
    pub(super) partition: RawPartition,
    pub(super) source: RawSource,
    pub(super) warehouse: RawWarehouse,
    #[serde(default)]
    pub(super) execution: RawExecution,
    #[serde(default, rename = "audit")]
    pub(super) audits: Vec<RawAudit>,
    #[serde(default)]
    pub(super) publish: RawPublish,
    #[serde(default, rename = "hook")]
    pub(super) hooks: Vec<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) table: String,
    pub(super) key: Vec<String>,
    #[serde(default)]
    pub(super) add_columns: Vec<RawColumn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawColumn {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) sql_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPartition {
    pub(super) column: String,
    pub(super) grain: String,
    pub(super) first: Option<PartitionValue>,
    pub(super) last: Option<PartitionValue>,
    pub(super) list: Option<Vec<PartitionValue>>,
    pub(super) max_partitions: Option<usize>,
}

/// A partition start as written in the spec: a string (`"2024-03-03"`) or, since TOML has them
/// and users write them, an unquoted date or local date-time literal (`2024-03-03`,
/// `2024-03-03T05:00:00`), kept as its text and parsed like the string.
#[derive(Debug)]
pub(super) struct PartitionValue(pub(super) String);

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
pub(super) struct RawSource {
    pub(super) query: String,
    pub(super) dedupe_order_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWarehouse {
    pub(super) name: String,
    pub(super) concurrency: Option<u32>,
    pub(super) control_schema: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExecution {
    pub(super) partition_timeout: Option<String>,
    pub(super) retries: Option<u32>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) kind: String,
    pub(super) name: Option<String>,
    pub(super) severity: Option<String>,
    pub(super) columns: Option<Vec<String>>,
    pub(super) column: Option<String>,
    pub(super) expression: Option<String>,
    pub(super) min: Option<f64>,
    pub(super) max: Option<f64>,
    pub(super) max_failing_rows: Option<u64>,
    pub(super) max_change_pct: Option<f64>,
    pub(super) max_change_rows: Option<u64>,
    pub(super) function: Option<String>,
    pub(super) percentile: Option<f64>,
    pub(super) min_ratio: Option<f64>,
    pub(super) max_ratio: Option<f64>,
    pub(super) min_value: Option<f64>,
    pub(super) max_value: Option<f64>,
    pub(super) values: Option<Vec<toml::Value>>,
    pub(super) references: Option<String>,
    pub(super) sql: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    pub(super) on: String,
    pub(super) command: Option<Vec<String>>,
    pub(super) url: Option<String>,
    pub(super) url_env: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) retries: Option<u32>,
    pub(super) pass_env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublish {
    pub(super) mode: Option<String>,
    pub(super) approval: Option<String>,
    pub(super) archive_retention_days: Option<u32>,
    pub(super) lock_wait: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated spec.
// ---------------------------------------------------------------------------------------------
