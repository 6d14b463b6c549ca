//! The diff report between the current and the backfilled version of a run's window: per
//! partition, rows added / removed / changed and the totals of every numeric column before and
//! after, plus a sample of changed rows with their old and new values. Before publishing it
//! compares the target with the shadow; after publishing, the archive with the target (so a
//! reviewer can still see what a published run changed). Printed by
//! `backfill status <run> --diff`, and saved as JSON and as a self-contained HTML page with a
//! per-partition chart of old vs new totals.

use backfill_common::BackfillError;
use backfill_common::control::{ControlStore, RunRecord, RunState};
use backfill_common::ident::TableName;
use backfill_common::spec::Spec;
use backfill_common::warehouse::{fetch_all, get};

use crate::window::window_condition;
use backfill_common::engine::quote_catalog_name;

/// At most this many numeric columns are summed per partition.
const MAX_TOTALED_COLUMNS: usize = 6;

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiffReport {
    pub run_id: String,
    pub target: String,
    /// What "old" and "new" are read from.
    pub old_source: String,
    pub new_source: String,
    pub key: Vec<String>,
    pub totaled_columns: Vec<String>,
    pub partitions: Vec<PartitionDiff>,
    pub totals: PartitionDiff,
    pub sample: Vec<ChangedRow>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionDiff {
    pub partition: String,
    pub old_rows: i64,
    pub new_rows: i64,
    pub added: i64,
    pub removed: i64,
    pub changed: i64,
    /// Per totaled column: (old sum, new sum).
    pub sums: Vec<(Option<f64>, Option<f64>)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangedRow {
    pub key: Vec<(String, String)>,
    /// Columns whose value differs: (column, old, new); None is SQL NULL.
    pub changes: Vec<(String, Option<String>, Option<String>)>,
}

impl ChangedRow {
    /// `order_id=301, item_id=1`
    fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where the old and new versions of the window are, for this run's state.
fn sources(run: &RunRecord, target: &TableName) -> Result<(TableName, TableName), BackfillError> {
    let parse =
        |name: &str| TableName::parse(name).map_err(|e| BackfillError::Invalid(e.to_string()));
    match run.state {
        RunState::Published => {
            let archive = run.archive_table.as_deref().ok_or_else(|| {
                BackfillError::Invalid(format!("run {} has no archive recorded", run.run_id))
            })?;
            if archive.contains(',') {
                return Err(BackfillError::Invalid(format!(
                    "run {} was published with swap_partitions: its old version is spread over the archives {archive}; \
                     a diff after such a publish is not available yet (review it before publishing, with publish.approval = \"manual\")",
                    run.run_id
                )));
            }
            Ok((parse(archive)?, target.clone()))
        }
        state if state.is_open() => Ok((target.clone(), parse(&run.shadow_table)?)),
        other => Err(BackfillError::Conflict(format!(
            "run {} is {}: its shadow and its archive are no longer the window's two versions, so there is nothing to compare",
            run.run_id,
            other.as_str()
        ))),
    }
}

/// Computes the report. `sample` bounds the changed rows listed.
pub async fn diff_run(
    store: &ControlStore,
    run_id: &str,
    sample: usize,
) -> Result<DiffReport, BackfillError> {
    let run = store.find_run(run_id).await?.ok_or_else(|| {
        BackfillError::Invalid(format!("no run `{run_id}` in this control store"))
    })?;
    let text = store.spec_source(&run.spec_hash).await?.ok_or_else(|| {
        BackfillError::Invalid(format!(
            "the spec of run {run_id} is missing from the control store"
        ))
    })?;
    let spec = Spec::parse(&text)
        .map_err(|e| BackfillError::Invalid(format!("the stored spec no longer parses: {e}")))?;
    let target =
        TableName::parse(&run.target).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let engine = store.engine();
    if !engine.capabilities().full_outer_join {
        return Err(BackfillError::Invalid(format!(
            "the diff report pairs old and new rows with FULL OUTER JOIN, which {} does not have; \
             compare the archive ({}) with {target} in your own query",
            engine.name(),
            run.archive_table.as_deref().unwrap_or("not published yet")
        )));
    }
    let (old, new) = sources(&run, &target)?;
    let warehouse = &store.warehouse;
    let engine = warehouse.engine();
    let mut conn = warehouse.acquire().await?;
    for table in [&old, &new] {
        if !warehouse.table_exists(&mut conn, table).await? {
            return Err(BackfillError::Invalid(format!(
                "{table} no longer exists (dropped by gc or abandon): nothing to compare"
            )));
        }
    }
    let partitions = spec.planned_partitions();
    let grain = spec.partition.grain;
    let key: Vec<String> = spec
        .target
        .key
        .iter()
        .map(|k| k.as_str().to_string())
        .collect();
    let old_columns = warehouse.table_columns(&mut conn, &old).await?;
    let new_columns = warehouse.table_columns(&mut conn, &new).await?;
    // Columns both versions have (a backfill may add columns: they show as added values).
    let common: Vec<String> = new_columns
        .iter()
        .filter(|c| old_columns.contains(c) && !key.contains(c))
        .cloned()
        .collect();
    let totaled: Vec<String> = warehouse
        .numeric_columns(&mut conn, &new)
        .await?
        .into_iter()
        .filter(|c| old_columns.contains(c) && !key.contains(c))
        .take(MAX_TOTALED_COLUMNS)
        .collect();

    let (old_window, mut binds) =
        window_condition(engine, grain, &spec.partition.column, "t", &partitions, 1);
    let (new_window, new_binds) = window_condition(
        engine,
        grain,
        &spec.partition.column,
        "t",
        &partitions,
        binds.len() + 1,
    );
    binds.extend(new_binds);
    let key_match = key
        .iter()
        .map(|k| format!("o.{k} = n.{k}", k = quote_catalog_name(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let first_key = quote_catalog_name(&key[0]);
    let differs = if common.is_empty() {
        "1 = 0".to_string()
    } else {
        common
            .iter()
            .map(|c| {
                let c = quote_catalog_name(c);
                engine.distinct(&format!("o.{c}"), &format!("n.{c}"))
            })
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let column = quote_catalog_name(spec.partition.column.as_str());
    // A row that moved between partitions counts in its new partition.
    let group = engine.partition_group(&format!("coalesce(n.{column}, o.{column})"), grain);
    let label = engine.group_label(&group, grain);
    let sums = totaled
        .iter()
        .map(|c| {
            let c = quote_catalog_name(c);
            format!(
                ", {}, {}",
                engine.as_float(&format!("sum(o.{c})")),
                engine.as_float(&format!("sum(n.{c})"))
            )
        })
        .collect::<String>();
    let joined = format!(
        "(SELECT * FROM {old} AS t WHERE {old_window}) AS o FULL OUTER JOIN (SELECT * FROM {new} AS t WHERE {new_window}) AS n ON {key_match}",
        old = old.quoted(),
        new = new.quoted(),
    );
    let sql = format!(
        "SELECT {label}, {}, {}, {}, {}, {}{sums} FROM {joined} GROUP BY {group} ORDER BY 1",
        engine.as_bigint(&format!("count(o.{first_key})")),
        engine.as_bigint(&format!("count(n.{first_key})")),
        engine.as_bigint(&format!("sum(CASE WHEN o.{first_key} IS NULL THEN 1 ELSE 0 END)")),
        engine.as_bigint(&format!("sum(CASE WHEN n.{first_key} IS NULL THEN 1 ELSE 0 END)")),
        engine.as_bigint(&format!(
            "sum(CASE WHEN o.{first_key} IS NOT NULL AND n.{first_key} IS NOT NULL AND ({differs}) THEN 1 ELSE 0 END)"
        )),
    );
    let rows = fetch_all(&mut conn, &sql, &binds).await?;
    let mut report_partitions = Vec::new();
    for row in &rows {
        let mut diff = PartitionDiff {
            partition: get::<Option<String>>(row, 0)?.unwrap_or_default(),
            old_rows: get(row, 1)?,
            new_rows: get(row, 2)?,
            added: get(row, 3)?,
            removed: get(row, 4)?,
            changed: get(row, 5)?,
            sums: Vec::new(),
        };
        for i in 0..totaled.len() {
            diff.sums.push((get(row, 6 + 2 * i)?, get(row, 7 + 2 * i)?));
        }
        report_partitions.push(diff);
    }
    // Partitions with no rows on either side still appear, as zeros.
    let mut all = Vec::new();
    for partition in &partitions {
        all.push(
            report_partitions
                .iter()
                .find(|d| d.partition == partition.key)
                .cloned()
                .unwrap_or_else(|| PartitionDiff {
                    partition: partition.key.clone(),
                    sums: vec![(None, None); totaled.len()],
                    ..PartitionDiff::default()
                }),
        );
    }
    let totals = total(&all, totaled.len());

    let sample_rows = if sample == 0 || common.is_empty() {
        Vec::new()
    } else {
        let text =
            |side: &str, c: &str| engine.as_text(&format!("{side}.{}", quote_catalog_name(c)));
        let mut select: Vec<String> = key.iter().map(|k| text("n", k)).collect();
        for c in &common {
            select.push(text("o", c));
            select.push(text("n", c));
        }
        let sql = format!(
            "SELECT {} FROM {joined} WHERE o.{first_key} IS NOT NULL AND n.{first_key} IS NOT NULL AND ({differs}) ORDER BY {} LIMIT {sample}",
            select.join(", "),
            key.iter()
                .map(|k| format!("n.{}", quote_catalog_name(k)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = fetch_all(&mut conn, &sql, &binds).await?;
        let mut out = Vec::new();
        for row in &rows {
            let mut changed = ChangedRow {
                key: Vec::new(),
                changes: Vec::new(),
            };
            for (i, k) in key.iter().enumerate() {
                changed.key.push((
                    k.clone(),
                    get::<Option<String>>(row, i)?.unwrap_or_default(),
                ));
            }
            for (i, c) in common.iter().enumerate() {
                let before: Option<String> = get(row, key.len() + 2 * i)?;
                let after: Option<String> = get(row, key.len() + 2 * i + 1)?;
                if before != after {
                    changed.changes.push((c.clone(), before, after));
                }
            }
            out.push(changed);
        }
        out
    };
    Ok(DiffReport {
        run_id: run.run_id.clone(),
        target: run.target.clone(),
        old_source: old.to_string(),
        new_source: new.to_string(),
        key,
        totaled_columns: totaled,
        partitions: all,
        totals,
        sample: sample_rows,
    })
}

fn total(partitions: &[PartitionDiff], columns: usize) -> PartitionDiff {
    let mut totals = PartitionDiff {
        partition: "total".into(),
        sums: vec![(None, None); columns],
        ..PartitionDiff::default()
    };
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    for p in partitions {
        totals.old_rows += p.old_rows;
        totals.new_rows += p.new_rows;
        totals.added += p.added;
        totals.removed += p.removed;
        totals.changed += p.changed;
        for (i, (old, new)) in p.sums.iter().enumerate() {
            totals.sums[i] = (add(totals.sums[i].0, *old), add(totals.sums[i].1, *new));
        }
    }
    totals
}

fn number(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn delta(old: Option<f64>, new: Option<f64>) -> String {
    match (old, new) {
        (Some(o), Some(n)) if o != 0.0 => format!("{:+.1}%", (n - o) / o.abs() * 100.0),
        (Some(o), Some(n)) if o == n => "0".into(),
        _ => "-".into(),
    }
}

/// The report as a terminal table.
pub fn render(report: &DiffReport) -> String {
    let mut out = format!(
        "diff of run {} on {}: old = {}, new = {}\n",
        report.run_id, report.target, report.old_source, report.new_source
    );
    let mut header = format!(
        "{:<14} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "partition", "old rows", "new rows", "added", "removed", "changed"
    );
    for c in &report.totaled_columns {
        header.push_str(&format!(" {:>24}", format!("sum({c}) old -> new")));
    }
    out.push_str(&header);
    out.push('\n');
    for p in report
        .partitions
        .iter()
        .chain(std::iter::once(&report.totals))
    {
        let mut line = format!(
            "{:<14} {:>9} {:>9} {:>8} {:>8} {:>8}",
            p.partition, p.old_rows, p.new_rows, p.added, p.removed, p.changed
        );
        for (old, new) in &p.sums {
            line.push_str(&format!(
                " {:>24}",
                format!(
                    "{} -> {} ({})",
                    number(*old),
                    number(*new),
                    delta(*old, *new)
                )
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if !report.sample.is_empty() {
        out.push_str(&format!(
            "\nsample of changed rows ({} shown):\n",
            report.sample.len()
        ));
        for row in &report.sample {
            let key = row.key_text();
            let changes = row
                .changes
                .iter()
                .map(|(c, old, new)| {
                    format!(
                        "{c}: {} -> {}",
                        old.as_deref().unwrap_or("NULL"),
                        new.as_deref().unwrap_or("NULL")
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            out.push_str(&format!("  {key}: {changes}\n"));
        }
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An inline SVG line chart of old vs new values per partition.
fn chart(title: &str, labels: &[String], old: &[f64], new: &[f64]) -> String {
    let (width, height, pad) = (760.0, 220.0, 40.0);
    let max = old
        .iter()
        .chain(new.iter())
        .cloned()
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let min = old
        .iter()
        .chain(new.iter())
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .min(0.0);
    let n = labels.len().max(2) as f64;
    let x = |i: usize| pad + i as f64 * (width - 2.0 * pad) / (n - 1.0);
    let y = |v: f64| height - pad - (v - min) / (max - min) * (height - 2.0 * pad);
    let line = |values: &[f64]| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\">",
        escape(title)
    );
    svg.push_str(&format!(
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#999\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"#999\"/>",
        height - pad,
        width - pad
    ));
    svg.push_str(&format!(
        "<text x=\"4\" y=\"{:.1}\" font-size=\"10\">{}</text><text x=\"4\" y=\"{:.1}\" font-size=\"10\">{}</text>",
        y(max) + 4.0,
        number(Some(max)),
        y(min),
        number(Some(min))
    ));
    for (i, label) in labels.iter().enumerate() {
        if labels.len() <= 16 || i % (labels.len() / 16 + 1) == 0 {
            svg.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
                x(i),
                height - pad + 14.0,
                escape(label)
            ));
        }
    }
    svg.push_str(&format!(
        "<polyline class=\"old\" fill=\"none\" stroke=\"#999\" stroke-width=\"2\" points=\"{}\"/>",
        line(old)
    ));
    svg.push_str(&format!(
        "<polyline class=\"new\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\" points=\"{}\"/>",
        line(new)
    ));
    svg.push_str("</svg><div class=\"legend\"><span class=\"o\">old</span> <span class=\"n\">new</span></div></figure>");
    svg
}

/// A self-contained HTML page: the table, one chart per totaled column (and row counts), the
/// sample. No external resources.
pub fn render_html(report: &DiffReport) -> String {
    let labels: Vec<String> = report
        .partitions
        .iter()
        .map(|p| p.partition.clone())
        .collect();
    let mut charts = chart(
        "rows per partition",
        &labels,
        &report
            .partitions
            .iter()
            .map(|p| p.old_rows as f64)
            .collect::<Vec<_>>(),
        &report
            .partitions
            .iter()
            .map(|p| p.new_rows as f64)
            .collect::<Vec<_>>(),
    );
    for (i, column) in report.totaled_columns.iter().enumerate() {
        charts.push_str(&chart(
            &format!("sum({column}) per partition"),
            &labels,
            &report
                .partitions
                .iter()
                .map(|p| p.sums[i].0.unwrap_or(0.0))
                .collect::<Vec<_>>(),
            &report
                .partitions
                .iter()
                .map(|p| p.sums[i].1.unwrap_or(0.0))
                .collect::<Vec<_>>(),
        ));
    }
    let mut table = String::from(
        "<table><thead><tr><th>partition</th><th>old rows</th><th>new rows</th><th>added</th><th>removed</th><th>changed</th>",
    );
    for c in &report.totaled_columns {
        table.push_str(&format!(
            "<th>sum({0}) old</th><th>sum({0}) new</th><th>change</th>",
            escape(c)
        ));
    }
    table.push_str("</tr></thead><tbody>");
    for p in report
        .partitions
        .iter()
        .chain(std::iter::once(&report.totals))
    {
        table.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(&p.partition),
            p.old_rows,
            p.new_rows,
            p.added,
            p.removed,
            p.changed
        ));
        for (old, new) in &p.sums {
            table.push_str(&format!(
                "<td>{}</td><td>{}</td><td>{}</td>",
                number(*old),
                number(*new),
                delta(*old, *new)
            ));
        }
        table.push_str("</tr>");
    }
    table.push_str("</tbody></table>");
    let mut sample = String::new();
    if !report.sample.is_empty() {
        sample.push_str("<h2>Sample of changed rows</h2><table><thead><tr><th>key</th><th>column</th><th>old</th><th>new</th></tr></thead><tbody>");
        for row in &report.sample {
            let key = row.key_text();
            for (column, old, new) in &row.changes {
                sample.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&key),
                    escape(column),
                    escape(old.as_deref().unwrap_or("NULL")),
                    escape(new.as_deref().unwrap_or("NULL"))
                ));
            }
        }
        sample.push_str("</tbody></table>");
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>backfill diff {run}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right;font-size:13px}}td:first-child,th:first-child{{text-align:left}}\
         tbody tr:last-child{{font-weight:bold}}figure{{margin:1em 0}}.legend .o{{color:#999}}.legend .n{{color:#1f6feb}}</style></head>\
         <body><h1>Backfill run {run}: {target}</h1><p>old: <code>{old}</code> &middot; new: <code>{new}</code></p>{charts}{table}{sample}</body></html>\n",
        run = escape(&report.run_id),
        target = escape(&report.target),
        old = escape(&report.old_source),
        new = escape(&report.new_source),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_and_numbers_read_well() {
        assert_eq!(delta(Some(200.0), Some(100.0)), "-50.0%");
        assert_eq!(delta(Some(0.0), Some(0.0)), "0");
        assert_eq!(delta(None, Some(1.0)), "-");
        assert_eq!(number(Some(12.0)), "12");
        assert_eq!(number(Some(12.345)), "12.35");
    }

    #[test]
    fn html_is_escaped_and_self_contained() {
        let report = DiffReport {
            run_id: "r1".into(),
            target: "public.<script>".into(),
            old_source: "a".into(),
            new_source: "b".into(),
            key: vec!["id".into()],
            totaled_columns: vec!["amount".into()],
            partitions: vec![PartitionDiff {
                partition: "2024-03-01".into(),
                old_rows: 2,
                new_rows: 2,
                changed: 1,
                sums: vec![(Some(10.0), Some(5.0))],
                ..PartitionDiff::default()
            }],
            totals: PartitionDiff::default(),
            sample: vec![],
        };
        let html = render_html(&report);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("<svg") && html.contains("polyline"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
