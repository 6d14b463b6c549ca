//! Whole-window audits after the barrier, each with pass/fail thresholds. Row audits
//! (not-null, expression, accepted range and values, referential integrity) and
//! per-partition comparisons (row counts, aggregates) each cost one grouped scan of the
//! window, whatever the number of audits; custom SQL audits run one query each. Verdicts are
//! plain functions of the measured numbers.

use std::collections::BTreeMap;

use backfill_common::BackfillError;
use backfill_common::control::AuditRecord;
use backfill_common::engine::Engine;
use backfill_common::ident::{Ident, TableName};
use backfill_common::plan::Partition;
use backfill_common::spec::{
    AggregateBounds, AggregateFunction, Audit, AuditCheck, PublishMode, Severity, Spec,
};
use backfill_common::warehouse::{Bind, Session, Warehouse, fetch_all, fetch_one, get};

use crate::window::window_condition;

pub const PASS: &str = "pass";
pub const FAIL: &str = "fail";
pub const WARN: &str = "warn";

/// Partition label used for audits about the whole window rather than one partition.
pub const WHOLE_WINDOW: &str = "*";

/// Whether the spec's audits can run on this engine and against this target; checked before
/// anything is written.
pub fn check_supported(spec: &Spec, engine: &dyn Engine) -> Result<(), BackfillError> {
    for audit in &spec.audits {
        let AuditCheck::Aggregate {
            function,
            column,
            bounds,
        } = &audit.check
        else {
            continue;
        };
        if matches!(
            function,
            AggregateFunction::Median | AggregateFunction::Percentile(_)
        ) && !engine.capabilities().percentiles
        {
            return Err(BackfillError::Invalid(format!(
                "audit `{}`: median and percentile need PostgreSQL; {} cannot compute them in SQL (use avg, min or max instead)",
                audit.name,
                engine.name()
            )));
        }
        let compares_with_current = bounds.max_change_pct.is_some()
            || bounds.min_ratio.is_some()
            || bounds.max_ratio.is_some();
        if let Some(column) = column
            && is_added_column(spec, column)
            && compares_with_current
        {
            return Err(BackfillError::Invalid(format!(
                "audit `{}`: `{column}` is a new column (target.add_columns), so the current table has nothing to compare it with; \
                 bound it with min_value / max_value instead of max_change_pct / min_ratio / max_ratio",
                audit.name
            )));
        }
    }
    Ok(())
}

fn is_added_column(spec: &Spec, column: &Ident) -> bool {
    spec.target.add_columns.iter().any(|c| &c.name == column)
}

pub async fn run_audits(
    warehouse: &Warehouse,
    conn: &mut dyn Session,
    spec: &Spec,
    target: &TableName,
    shadow: &TableName,
    partitions: &[Partition],
    mode: PublishMode,
) -> Result<Vec<AuditRecord>, BackfillError> {
    let engine = warehouse.engine();
    let grain = spec.partition.grain;
    let group = engine.partition_group(&format!("t.{}", spec.partition.column.quoted()), grain);
    let label = engine.group_label(&group, grain);
    let (window, window_binds) = crate::window::spec_window(engine, spec, partitions);
    let mut records = Vec::new();

    // Unique key over the window (keys outside it were copied from the current table).
    for audit in spec
        .audits
        .iter()
        .filter(|a| matches!(a.check, AuditCheck::UniqueKey))
    {
        let keys = spec
            .target
            .key
            .iter()
            .map(|k| format!("t.{}", k.quoted()))
            .collect::<Vec<_>>()
            .join(", ");
        if mode == PublishMode::SwapWindow {
            // The shadow holds the window only: a new key must not exist outside the window
            // of the target, where the merge would collide with it.
            let key_match = spec
                .target
                .key
                .iter()
                .map(|k| format!("o.{k} = t.{k}", k = k.quoted()))
                .collect::<Vec<_>>()
                .join(" AND ");
            let (outside_o, outside_binds) = window_condition(
                engine,
                grain,
                &spec.partition.column,
                "o",
                partitions,
                window_binds.len() + 1,
            );
            let mut binds = window_binds.clone();
            binds.extend(outside_binds);
            let sql = format!(
                "SELECT count(*) FROM {} AS t WHERE {window} AND EXISTS (SELECT 1 FROM {} AS o WHERE {key_match} AND NOT coalesce({outside_o}, false))",
                shadow.quoted(),
                target.quoted()
            );
            let row = fetch_one(conn, &sql, &binds).await?;
            let collisions: i64 = get(&row, 0)?;
            if collisions > 0 {
                records.push(record(
                    audit,
                    WHOLE_WINDOW,
                    false,
                    format!("{collisions} key(s) of the window also exist outside it in {target}"),
                    "0 keys shared with rows outside the window".into(),
                ));
                continue;
            }
        }
        // A valid, non-partial unique index on exactly the key (NULL keys are refused in every
        // partition) is a proof, not a sample: no need to scan and group the window.
        if crate::shadow::has_unique_index_on(warehouse, conn, shadow, &spec.target.key).await? {
            records.push(record(
                audit,
                WHOLE_WINDOW,
                true,
                "0 duplicated keys (enforced by a unique index on the key)".into(),
                "0 duplicated keys".into(),
            ));
            continue;
        }
        let sql = format!(
            "SELECT count(*) FROM (SELECT {keys} FROM {} AS t WHERE {window} GROUP BY {keys} HAVING count(*) > 1) AS d",
            shadow.quoted()
        );
        let row = fetch_one(conn, &sql, &window_binds).await?;
        let duplicates: i64 = get(&row, 0)?;
        records.push(record(
            audit,
            WHOLE_WINDOW,
            duplicates == 0,
            format!("{duplicates} duplicated key(s)"),
            "0 duplicated keys".into(),
        ));
    }

    // Row audits: conditions counted per partition in the shadow scan below.
    let row_audits: Vec<(&Audit, String, Vec<Bind>, u64)> = spec
        .audits
        .iter()
        .filter_map(|audit| match &audit.check {
            AuditCheck::NotNull { columns } => Some((
                audit,
                columns
                    .iter()
                    .map(|c| format!("t.{} IS NULL", c.quoted()))
                    .collect::<Vec<_>>()
                    .join(" OR "),
                vec![],
                0,
            )),
            AuditCheck::Expression {
                expression,
                max_failing_rows,
            } => Some((
                audit,
                format!("NOT coalesce(({expression}), false)"),
                vec![],
                *max_failing_rows,
            )),
            AuditCheck::AcceptedRange {
                column,
                min,
                max,
                max_failing_rows,
            } => {
                let col = format!("t.{}", column.quoted());
                let mut parts = Vec::new();
                let mut binds = Vec::new();
                if let Some(min) = min {
                    binds.push(Bind::Float(*min));
                    parts.push(format!("{col} < {{{}}}", binds.len() - 1));
                }
                if let Some(max) = max {
                    binds.push(Bind::Float(*max));
                    parts.push(format!("{col} > {{{}}}", binds.len() - 1));
                }
                Some((audit, parts.join(" OR "), binds, *max_failing_rows))
            }
            AuditCheck::AcceptedValues {
                column,
                values,
                max_failing_rows,
            } => {
                let col = format!("t.{}", column.quoted());
                let placeholders = (0..values.len())
                    .map(|i| format!("{{{i}}}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                Some((
                    audit,
                    format!(
                        "{col} IS NOT NULL AND {} NOT IN ({placeholders})",
                        engine.as_text(&col)
                    ),
                    values.iter().map(|v| Bind::Text(v.clone())).collect(),
                    *max_failing_rows,
                ))
            }
            AuditCheck::Referential {
                column,
                table,
                references,
                max_failing_rows,
            } => Some((
                audit,
                format!(
                    "t.{c} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {} AS r WHERE r.{} = t.{c})",
                    table.quoted(),
                    references.quoted(),
                    c = column.quoted()
                ),
                vec![],
                *max_failing_rows,
            )),
            _ => None,
        })
        .collect();
    // Per-partition comparisons against the current table.
    let comparisons: Vec<&Audit> = spec
        .audits
        .iter()
        .filter(|a| {
            matches!(
                a.check,
                AuditCheck::RowcountDelta { .. } | AuditCheck::Aggregate { .. }
            )
        })
        .collect();
    // Aggregates over the shadow, and the same over the current table, where a column the
    // backfill adds reads as NULL.
    let mut on_shadow = Vec::new();
    let mut on_current = Vec::new();
    for audit in &comparisons {
        if let AuditCheck::Aggregate {
            function, column, ..
        } = &audit.check
        {
            let expr = aggregate_sql(
                engine,
                *function,
                column.as_ref().map(|c| format!("t.{}", c.quoted())),
            )?;
            let absent = column.as_ref().is_some_and(|c| is_added_column(spec, c));
            on_current.push(if absent {
                engine.as_float("NULL")
            } else {
                expr.clone()
            });
            on_shadow.push(expr);
        }
    }
    let aggregate_count = on_shadow.len();

    // The shadow is scanned once for everything: row count, aggregates and the failing rows
    // of every row audit, grouped per partition.
    let mut shadow_binds = window_binds.clone();
    let mut shadow_extras = on_shadow;
    for (_, condition, audit_binds, _) in &row_audits {
        // Renumber this audit's {i} placeholders after the binds already taken.
        let mut condition = condition.clone();
        for (i, bind) in audit_binds.iter().enumerate().rev() {
            // Highest index first, so `{1}` is not replaced inside `{10}`.
            let placeholder = engine.placeholder(shadow_binds.len() + i + 1);
            let typed = match bind {
                Bind::Text(_) => engine.as_text(&placeholder),
                _ => engine.as_float(&placeholder),
            };
            condition = condition.replace(&format!("{{{i}}}"), &typed);
        }
        shadow_binds.extend(audit_binds.iter().cloned());
        shadow_extras.push(engine.as_float(&format!(
            "coalesce(sum(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"
        )));
    }
    // Custom SQL: the spec's query over the window's new rows (`backfilled`) and its current
    // rows (`current`) returns the failing rows; count them.
    for audit in &spec.audits {
        let AuditCheck::CustomSql {
            sql,
            max_failing_rows,
        } = &audit.check
        else {
            continue;
        };
        let (current_window, current_binds) = window_condition(
            engine,
            grain,
            &spec.partition.column,
            "t",
            partitions,
            window_binds.len() + 1,
        );
        let mut binds = window_binds.clone();
        binds.extend(current_binds);
        let query = format!(
            "WITH backfilled AS (SELECT * FROM {} AS t WHERE {window}), current AS (SELECT * FROM {} AS t WHERE {current_window}) \
             SELECT count(*) FROM ({sql}) AS failing",
            shadow.quoted(),
            target.quoted()
        );
        let row = fetch_one(conn, &query, &binds)
            .await
            .map_err(|e| e.context(format!("audit `{}` (custom_sql)", audit.name)))?;
        let failing: i64 = get(&row, 0)?;
        records.push(record(
            audit,
            WHOLE_WINDOW,
            failing as u64 <= *max_failing_rows,
            format!("{failing} failing row(s)"),
            format!("at most {max_failing_rows}"),
        ));
    }
    if row_audits.is_empty() && comparisons.is_empty() {
        return Ok(records);
    }
    let proposed = partition_stats(
        conn,
        shadow,
        &label,
        &group,
        &window,
        &shadow_binds,
        &shadow_extras,
    );
    let (proposed, current) = if comparisons.is_empty() {
        (proposed.await?, Stats::new())
    } else if engine.capabilities().parallel_scans {
        // The two scans are independent: on a second connection of the pool they run at
        // the same time (each is one backend's work; the run's other connections are idle).
        let mut other = warehouse.acquire().await?;
        let current = partition_stats(
            &mut other,
            target,
            &label,
            &group,
            &window,
            &window_binds,
            &on_current,
        );
        tokio::try_join!(proposed, current)?
    } else {
        let proposed = proposed.await?;
        let current = partition_stats(
            conn,
            target,
            &label,
            &group,
            &window,
            &window_binds,
            &on_current,
        )
        .await?;
        (proposed, current)
    };

    for (i, (audit, _, _, allowed)) in row_audits.iter().enumerate() {
        for partition in partitions {
            let observed = proposed
                .get(&partition.key)
                .and_then(|(_, values)| values[aggregate_count + i])
                .map_or(0, |v| v as i64);
            records.push(record(
                audit,
                &partition.key,
                observed as u64 <= *allowed,
                format!("{observed} failing row(s)"),
                format!("at most {allowed}"),
            ));
        }
    }
    for partition in partitions {
        let (current_rows, current_values) = current
            .get(&partition.key)
            .cloned()
            .unwrap_or_else(|| (0, vec![None; aggregate_count]));
        let (shadow_rows, shadow_values) = proposed
            .get(&partition.key)
            .cloned()
            .unwrap_or_else(|| (0, vec![None; shadow_extras.len()]));
        let mut aggregate_index = 0;
        for audit in &comparisons {
            match &audit.check {
                AuditCheck::RowcountDelta {
                    max_change_pct,
                    max_change_rows,
                } => {
                    let (ok, observed, allowed) = rowcount_verdict(
                        current_rows,
                        shadow_rows,
                        *max_change_pct,
                        *max_change_rows,
                    );
                    records.push(record(audit, &partition.key, ok, observed, allowed));
                }
                AuditCheck::Aggregate { bounds, .. } => {
                    let (ok, observed, allowed) = aggregate_verdict(
                        current_values[aggregate_index],
                        shadow_values[aggregate_index],
                        bounds,
                    );
                    aggregate_index += 1;
                    records.push(record(audit, &partition.key, ok, observed, allowed));
                }
                _ => {}
            }
        }
    }
    Ok(records)
}

/// Puts the audit results into the trace and the metrics: one child span of `audit_span` per
/// audit (the audits share one scan of the shadow, so these spans carry results, not timings)
/// with its verdict and how many partitions it checked and failed.
pub fn trace_results(audit_span: &tracing::Span, records: &[AuditRecord]) {
    let mut names: Vec<&str> = records.iter().map(|r| r.audit_name.as_str()).collect();
    names.dedup();
    let mut failed_checks = 0;
    for name in names {
        let checks: Vec<&AuditRecord> = records.iter().filter(|r| r.audit_name == name).collect();
        let failing = checks.iter().filter(|r| r.verdict != PASS).count();
        let verdict = if checks.iter().any(|r| r.verdict == FAIL) {
            FAIL
        } else if failing > 0 {
            WARN
        } else {
            PASS
        };
        let span = tracing::info_span!(
            parent: audit_span,
            "backfill.audit_check",
            audit = name,
            verdict,
            checked = checks.len(),
            failing
        );
        if verdict == FAIL {
            failed_checks += failing;
            backfill_common::telemetry::record_error(
                &span,
                &format!("audit {name} failed on {failing} partition(s)"),
            );
        }
    }
    audit_span.record("checks", records.len());
    audit_span.record("failed", failed_checks);
    if failed_checks > 0 {
        backfill_common::telemetry::record_error(audit_span, "audits failed");
    }
}

fn record(
    audit: &Audit,
    partition: &str,
    ok: bool,
    observed: String,
    allowed: String,
) -> AuditRecord {
    let verdict = match (ok, audit.severity) {
        (true, _) => PASS,
        (false, Severity::Error) => FAIL,
        (false, Severity::Warn) => WARN,
    };
    AuditRecord {
        audit_name: audit.name.clone(),
        partition_key: partition.to_string(),
        severity: match audit.severity {
            Severity::Error => "error".into(),
            Severity::Warn => "warn".into(),
        },
        verdict: verdict.to_string(),
        observed,
        allowed,
    }
}

fn aggregate_sql(
    engine: &dyn Engine,
    function: AggregateFunction,
    column: Option<String>,
) -> Result<String, BackfillError> {
    let column = column.unwrap_or_else(|| "*".to_string());
    let expr = match function {
        AggregateFunction::Sum => format!("sum({column})"),
        AggregateFunction::Count => format!("count({column})"),
        AggregateFunction::CountDistinct => format!("count(DISTINCT {column})"),
        AggregateFunction::Avg => format!("avg({column})"),
        AggregateFunction::Min => format!("min({column})"),
        AggregateFunction::Max => format!("max({column})"),
        AggregateFunction::Median => engine.percentile(0.5, &column).ok_or_else(|| {
            BackfillError::Invalid(format!("median needs PostgreSQL, not {}", engine.name()))
        })?,
        AggregateFunction::Percentile(p) => engine.percentile(p, &column).ok_or_else(|| {
            BackfillError::Invalid(format!(
                "percentiles need PostgreSQL, not {}",
                engine.name()
            ))
        })?,
    };
    Ok(engine.as_float(&expr))
}

type Stats = BTreeMap<String, (i64, Vec<Option<f64>>)>;

async fn partition_stats(
    conn: &mut dyn Session,
    table: &TableName,
    label: &str,
    group: &str,
    window: &str,
    binds: &[Bind],
    aggregates: &[String],
) -> Result<Stats, BackfillError> {
    let extra: String = aggregates.iter().map(|a| format!(", {a}")).collect();
    let sql = format!(
        "SELECT {label} AS p, count(*){extra} FROM {} AS t WHERE {window} GROUP BY {group}",
        table.quoted()
    );
    let rows = fetch_all(conn, &sql, binds).await?;
    let mut stats = Stats::new();
    for row in &rows {
        let p: Option<String> = get(row, 0)?;
        let n: i64 = get(row, 1)?;
        let values = (0..aggregates.len())
            .map(|i| get::<Option<f64>>(row, i + 2))
            .collect::<Result<Vec<_>, _>>()?;
        stats.insert(p.unwrap_or_else(|| "NULL".into()), (n, values));
    }
    Ok(stats)
}

/// Row count of one partition, shadow vs current.
pub fn rowcount_verdict(
    current: i64,
    shadow: i64,
    max_change_pct: Option<f64>,
    max_change_rows: Option<u64>,
) -> (bool, String, String) {
    let delta = shadow - current;
    let pct = if current == 0 {
        if shadow == 0 { 0.0 } else { f64::INFINITY }
    } else {
        delta.unsigned_abs() as f64 * 100.0 / current as f64
    };
    let mut ok = true;
    let mut allowed = Vec::new();
    if let Some(max) = max_change_pct {
        ok &= pct <= max;
        allowed.push(format!("within {max}%"));
    }
    if let Some(max) = max_change_rows {
        ok &= delta.unsigned_abs() <= max;
        allowed.push(format!("within {max} rows"));
    }
    (
        ok,
        format!("{current} -> {shadow} rows ({delta:+}, {pct:.2}%)"),
        allowed.join(" and "),
    )
}

/// One aggregate of one partition, shadow vs current.
pub fn aggregate_verdict(
    current: Option<f64>,
    shadow: Option<f64>,
    bounds: &AggregateBounds,
) -> (bool, String, String) {
    let show = |v: Option<f64>| v.map_or("NULL".to_string(), |v| format!("{v}"));
    let mut ok = true;
    let mut allowed = Vec::new();
    let ratio = match (current, shadow) {
        (Some(c), Some(s)) if c != 0.0 => Some(s / c),
        (Some(c), Some(s)) if c == 0.0 && s == 0.0 => Some(1.0),
        _ => None,
    };
    if let Some(max) = bounds.max_change_pct {
        let change = ratio.map(|r| (r - 1.0).abs() * 100.0);
        ok &= change.is_some_and(|c| c <= max) || current == shadow;
        allowed.push(format!("change within {max}%"));
    }
    if let Some(min) = bounds.min_ratio {
        ok &= ratio.is_some_and(|r| r >= min);
        allowed.push(format!("ratio >= {min}"));
    }
    if let Some(max) = bounds.max_ratio {
        ok &= ratio.is_some_and(|r| r <= max);
        allowed.push(format!("ratio <= {max}"));
    }
    if let Some(min) = bounds.min_value {
        ok &= shadow.is_some_and(|s| s >= min);
        allowed.push(format!("value >= {min}"));
    }
    if let Some(max) = bounds.max_value {
        ok &= shadow.is_some_and(|s| s <= max);
        allowed.push(format!("value <= {max}"));
    }
    let ratio_text = ratio.map_or(String::new(), |r| format!(" (ratio {r:.4})"));
    (
        ok,
        format!("{} -> {}{ratio_text}", show(current), show(shadow)),
        allowed.join(" and "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowcount_verdicts() {
        assert!(rowcount_verdict(1000, 1005, Some(1.0), None).0);
        assert!(!rowcount_verdict(1000, 1011, Some(1.0), None).0);
        assert!(!rowcount_verdict(0, 5, Some(50.0), None).0);
        assert!(rowcount_verdict(0, 0, Some(0.0), None).0);
        assert!(!rowcount_verdict(100, 90, None, Some(5)).0);
    }

    #[test]
    fn aggregate_verdicts() {
        let halved = AggregateBounds {
            min_ratio: Some(0.45),
            max_ratio: Some(0.55),
            ..Default::default()
        };
        assert!(aggregate_verdict(Some(200.0), Some(100.0), &halved).0);
        assert!(!aggregate_verdict(Some(200.0), Some(200.0), &halved).0);
        assert!(!aggregate_verdict(None, Some(1.0), &halved).0);
        let stable = AggregateBounds {
            max_change_pct: Some(2.0),
            ..Default::default()
        };
        assert!(aggregate_verdict(Some(100.0), Some(101.0), &stable).0);
        assert!(!aggregate_verdict(Some(100.0), Some(103.0), &stable).0);
        assert!(aggregate_verdict(None, None, &stable).0);
    }
}
