//! Validation of the spec's `[[audit]]` entries.

use super::*;

pub(super) fn validate_audit(index: usize, raw: RawAudit) -> Result<Audit, SpecError> {
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
pub(super) fn reject_fields_that_do_not_apply(
    index: usize,
    raw: &RawAudit,
) -> Result<(), SpecError> {
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

pub(super) fn non_negative(field: &str, value: Option<f64>) -> Result<(), SpecError> {
    match value {
        Some(v) if v.is_nan() || v < 0.0 => Err(field_error(field, v, "allowed: zero or more")),
        _ => Ok(()),
    }
}
