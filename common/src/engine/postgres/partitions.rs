//! PostgreSQL's declarative range partitions, for `swap_partitions`: the catalog
//! (`pg_partitioned_table`, `pg_inherits`, `pg_get_expr(relpartbound)`), bounds as PostgreSQL
//! prints them, and DETACH / ATTACH.

use async_trait::async_trait;
use chrono::NaiveDateTime;

use crate::engine::{NativePartitions, PartitionKey, PartitionOf};
use crate::error::BackfillError;
use crate::ident::{Ident, TableName};
use crate::sql::string_literal;
use crate::warehouse::{Session, fetch_all, fetch_optional, get};

/// PostgreSQL's native partitions.
pub struct PgPartitions;

/// `CAST('"schema"."table"' AS regclass)`: the table's OID, for catalog queries.
fn regclass(table: &TableName) -> String {
    format!("CAST({} AS regclass)", string_literal(&table.quoted()))
}

fn parse_table(schema: &str, name: &str) -> Result<TableName, BackfillError> {
    TableName::parse(&format!("{schema}.{name}"))
        .map_err(|e| BackfillError::Invalid(format!("partition {schema}.{name}: {e}")))
}

/// Parses one bound value of `FOR VALUES FROM ('2024-01-01') TO (MAXVALUE)`.
fn bound_value(text: &str) -> Option<NaiveDateTime> {
    let text = text.trim();
    match text {
        "MINVALUE" => return Some(NaiveDateTime::MIN),
        "MAXVALUE" => return Some(NaiveDateTime::MAX),
        _ => {}
    }
    let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
    if let Ok(day) = chrono::NaiveDate::parse_from_str(inner, "%Y-%m-%d") {
        return day.and_hms_opt(0, 0, 0);
    }
    [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%#z",
    ]
    .iter()
    .find_map(|format| NaiveDateTime::parse_from_str(inner, format).ok())
}

/// `FOR VALUES FROM (a) TO (b)` split into `a` and `b`.
fn bound_ends(bound: &str) -> Option<(&str, &str)> {
    let rest = bound.trim().strip_prefix("FOR VALUES FROM (")?;
    let (from, rest) = rest.split_once(") TO (")?;
    Some((from, rest.strip_suffix(')')?))
}

#[async_trait]
impl NativePartitions for PgPartitions {
    async fn partition_key(
        &self,
        conn: &mut dyn Session,
        table: &TableName,
    ) -> Result<Option<PartitionKey>, BackfillError> {
        let row = fetch_optional(
            conn,
            "SELECT CAST(p.partstrat AS text), CAST(p.partnatts AS bigint), CAST(a.attname AS text) FROM pg_partitioned_table p \
             LEFT JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0] WHERE p.partrelid = CAST($1 AS regclass)",
            &[table.quoted().into()],
        )
        .await?;
        row.map(|row| {
            Ok(PartitionKey {
                by_range: get::<String>(&row, 0)? == "r",
                columns: get(&row, 1)?,
                first_column: get(&row, 2)?,
            })
        })
        .transpose()
    }

    async fn partitions_of(
        &self,
        conn: &mut dyn Session,
        parent: &TableName,
    ) -> Result<Vec<PartitionOf>, BackfillError> {
        let rows = fetch_all(
            conn,
            "SELECT CAST(n.nspname AS text), CAST(c.relname AS text), pg_get_expr(c.relpartbound, c.oid), CAST(c.relkind AS text) \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE i.inhparent = CAST($1 AS regclass) ORDER BY 2",
            &[parent.quoted().into()],
        )
        .await?;
        rows.iter()
            .map(|row| {
                let (schema, name, bound, kind): (String, String, String, String) =
                    (get(row, 0)?, get(row, 1)?, get(row, 2)?, get(row, 3)?);
                Ok(PartitionOf {
                    table: parse_table(&schema, &name)?,
                    is_default: bound.trim() == "DEFAULT",
                    bound,
                    partitioned: kind == "p",
                })
            })
            .collect()
    }

    async fn bound_of(
        &self,
        conn: &mut dyn Session,
        partition: &TableName,
        parent: &TableName,
    ) -> Result<Option<String>, BackfillError> {
        let row = fetch_optional(
            conn,
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid \
             WHERE c.oid = CAST($1 AS regclass) AND i.inhparent = CAST($2 AS regclass)",
            &[partition.quoted().into(), parent.quoted().into()],
        )
        .await?;
        row.map(|row| get(&row, 0)).transpose()
    }

    async fn own_dependents(
        &self,
        conn: &mut dyn Session,
        partition: &TableName,
    ) -> Result<Vec<String>, BackfillError> {
        let rows = fetch_all(
            conn,
            "SELECT DISTINCT 'view ' || CAST(CAST(v.oid AS regclass) AS text) FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid \
             JOIN pg_class v ON v.oid = r.ev_class WHERE d.classid = CAST('pg_rewrite' AS regclass) AND d.refobjid = CAST($1 AS regclass) AND v.oid <> CAST($1 AS regclass) \
             UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgrelid = CAST($1 AS regclass) AND NOT tgisinternal AND tgparentid = 0 \
             UNION ALL SELECT 'foreign key ' || conname || ' on ' || CAST(CAST(conrelid AS regclass) AS text) FROM pg_constraint WHERE confrelid = CAST($1 AS regclass) AND contype = 'f' AND conparentid = 0 \
             UNION ALL SELECT 'index ' || CAST(CAST(i.indexrelid AS regclass) AS text) FROM pg_index i WHERE i.indrelid = CAST($1 AS regclass) \
               AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid) \
             UNION ALL SELECT 'grants' FROM pg_class WHERE oid = CAST($1 AS regclass) AND relacl IS NOT NULL",
            &[partition.quoted().into()],
        )
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| get::<Option<String>>(r, 0).ok().flatten())
            .collect())
    }

    fn bound_range(&self, bound: &str) -> Option<(NaiveDateTime, NaiveDateTime)> {
        let (from, to) = bound_ends(bound)?;
        if from.contains(',') || to.contains(',') {
            return None;
        }
        Some((bound_value(from)?, bound_value(to)?))
    }

    /// Only plain date/time literals as PostgreSQL prints them are restated.
    fn bound_check(&self, column: &Ident, bound: &str) -> Option<String> {
        let (from, to) = bound_ends(bound)?;
        let literal = |text: &str| {
            let inner = text.strip_prefix('\'')?.strip_suffix('\'')?;
            inner
                .chars()
                .all(|c| c.is_ascii_digit() || " -:.+T".contains(c))
                .then(|| format!("'{inner}'"))
        };
        let column = column.quoted();
        let mut parts = vec![format!("{column} IS NOT NULL")];
        if from.trim() != "MINVALUE" {
            parts.push(format!("{column} >= {}", literal(from.trim())?));
        }
        if to.trim() != "MAXVALUE" {
            parts.push(format!("{column} < {}", literal(to.trim())?));
        }
        Some(parts.join(" AND "))
    }

    fn in_partitions(&self, partitions: &[TableName]) -> String {
        format!(
            "t.tableoid IN ({})",
            partitions
                .iter()
                .map(regclass)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn create_partitioned_like(
        &self,
        table: &TableName,
        like: &TableName,
        column: &Ident,
    ) -> String {
        format!(
            "CREATE TABLE {} (LIKE {} INCLUDING ALL) PARTITION BY RANGE ({})",
            table.quoted(),
            like.quoted(),
            column.quoted()
        )
    }

    fn create_partition_of(
        &self,
        partition: &TableName,
        parent: &TableName,
        bound: &str,
    ) -> String {
        format!(
            "CREATE TABLE {} PARTITION OF {} {bound}",
            partition.quoted(),
            parent.quoted()
        )
    }

    fn detach(&self, parent: &TableName, partition: &TableName) -> String {
        format!(
            "ALTER TABLE {} DETACH PARTITION {}",
            parent.quoted(),
            partition.quoted()
        )
    }

    fn attach(&self, parent: &TableName, partition: &TableName, bound: &str) -> String {
        format!(
            "ALTER TABLE {} ATTACH PARTITION {} {bound}",
            parent.quoted(),
            partition.quoted()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bounds_are_read_as_postgresql_prints_them() {
        let day = |d: &str| {
            chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
        };
        assert_eq!(
            PgPartitions.bound_range("FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')"),
            Some((day("2024-02-01"), day("2024-03-01")))
        );
        assert_eq!(
            PgPartitions.bound_range("FOR VALUES FROM (MINVALUE) TO ('2024-01-01 00:00:00')"),
            Some((NaiveDateTime::MIN, day("2024-01-01")))
        );
        assert_eq!(
            PgPartitions.bound_range("FOR VALUES FROM (1, 2) TO (3, 4)"),
            None
        );
        assert_eq!(PgPartitions.bound_range("DEFAULT"), None);
        let column = Ident::new("d").unwrap();
        assert_eq!(
            PgPartitions
                .bound_check(&column, "FOR VALUES FROM ('2024-02-01') TO (MAXVALUE)")
                .as_deref(),
            Some("\"d\" IS NOT NULL AND \"d\" >= '2024-02-01'")
        );
        assert_eq!(
            PgPartitions.bound_check(&column, "FOR VALUES FROM ('x''; DROP') TO (MAXVALUE)"),
            None
        );
    }
}
