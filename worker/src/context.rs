//! Everything a worker needs to run one run's partitions, derived once per run from the frozen
//! spec and the shadow table: the SQL of the fast insert, the merge and the checks, with
//! identifiers quoted and partition bounds as bound parameters.

use std::time::Duration;

use backfill_common::control::{ControlStore, RunRecord};
use backfill_common::engine::{Engine, PartitionMerge};
use backfill_common::ident::{Ident, TableName};
use backfill_common::plan::Grain;
use backfill_common::spec::Spec;
use backfill_common::warehouse::RowHash;
use backfill_common::{BackfillError, sql};

#[derive(Debug, Clone)]
pub struct PartitionContext {
    pub store: ControlStore,
    pub run_id: String,
    pub spec_hash: String,
    pub warehouse_name: String,
    pub concurrency: u32,
    pub grain: Grain,
    pub shadow: TableName,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `INSERT INTO shadow (cols) <deduplicated source>`; $1/$2 are the partition bounds. On
    /// PostgreSQL it also returns (rows, rows outside the partition, NULL keys, checksum) of
    /// what it inserted.
    pub fast_insert_sql: String,
    /// Rows of the shadow in the partition, and how many have a NULL key column.
    pub partition_rows_sql: String,
    pub merge: MergeSql,
    /// Filter over alias `t` selecting one partition of the shadow ($1/$2).
    pub partition_filter: String,
    /// How checksums hash the shadow's rows (see `Warehouse::row_hash`).
    pub row_hash: RowHash,
}

/// What the partition SQL depends on in the run's shadow table, asked of the warehouse.
#[derive(Debug, Clone, Copy)]
pub struct ShadowFacts {
    /// How checksums hash its rows.
    pub row_hash: RowHash,
    /// Whether a unique index on the key guards it now. While the partitions are written
    /// into a `swap_table` shadow its indexes are deferred (built once, after the last
    /// partition, which is much faster than maintaining them row by row); the first
    /// application of a partition then counts duplicate keys itself.
    pub unique_key_index: bool,
}

/// The statements of the general merge path, used when the partition may already hold rows.
#[derive(Debug, Clone)]
pub struct MergeSql {
    pub create_source: String,
    pub source_checks: String,
    pub count_new: String,
    /// The merge's statements (one on most engines); their affected rows add up.
    pub merge: Vec<String>,
    pub delete_vanished: String,
    pub drop_source: Option<String>,
}

/// The source query as the warehouse runs it for one partition: `:partition_start` and
/// `:partition_end` become bound, typed placeholders ($1 and $2).
pub fn source_sql(spec: &Spec, engine: &dyn Engine) -> Result<String, BackfillError> {
    let grain = spec.partition.grain;
    sql::rewrite_parameters(&spec.source.query, |name| match name {
        "partition_start" => engine.partition_bound(grain, 1),
        _ => engine.partition_bound(grain, 2),
    })
    .map_err(BackfillError::Invalid)
}

/// The facts of `run`'s shadow table the partition SQL depends on.
pub async fn shadow_facts(
    store: &ControlStore,
    spec: &Spec,
    run: &RunRecord,
) -> Result<ShadowFacts, BackfillError> {
    let shadow =
        TableName::parse(&run.shadow_table).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let mut conn = store.warehouse.acquire().await?;
    if !store.warehouse.table_exists(&mut conn, &shadow).await? {
        // Published (renamed into the target), rolled back or abandoned: no partition of the
        // run can be claimed any more, so a task that still arrives is acked as stale.
        return Ok(ShadowFacts {
            row_hash: RowHash::Text,
            unique_key_index: true,
        });
    }
    Ok(ShadowFacts {
        row_hash: store.warehouse.row_hash(&mut conn, &shadow).await?,
        unique_key_index: store
            .warehouse
            .has_unique_index_on(&mut conn, &shadow, &spec.target.key)
            .await?,
    })
}

impl PartitionContext {
    /// Builds the context for `run`. `source_columns` are the columns the source query
    /// returns (described at plan time); they must all exist in the shadow. `shadow` is what
    /// `shadow_facts` answers.
    pub fn new(
        store: ControlStore,
        spec: &Spec,
        run: &RunRecord,
        source_columns: &[String],
        shadow_facts: ShadowFacts,
    ) -> Result<PartitionContext, BackfillError> {
        let row_hash = shadow_facts.row_hash;
        let engine = store.engine();
        let shadow = TableName::parse(&run.shadow_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        let columns: Vec<Ident> = source_columns
            .iter()
            .map(|c| {
                Ident::new(c).map_err(|e| BackfillError::Invalid(format!("source column: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let grain = spec.partition.grain;
        let source = source_sql(spec, engine)?;
        let column_list = columns
            .iter()
            .map(|c| c.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        let key_list = spec
            .target
            .key
            .iter()
            .map(|c| c.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        let deduped = match &spec.source.dedupe_order_by {
            Some(order) => format!(
                "SELECT {column_list} FROM (SELECT bf_q.*, ROW_NUMBER() OVER (PARTITION BY {key_list} ORDER BY {order}) AS bf_rn FROM ({source}) AS bf_q) AS bf_d WHERE bf_rn = 1"
            ),
            None => format!("SELECT {column_list} FROM ({source}) AS bf_q"),
        };
        let part = spec.partition.column.quoted();
        let lo = engine.partition_bound(grain, 1);
        let hi = engine.partition_bound(grain, 2);
        let in_partition = |alias: &str| {
            let col = engine.partition_column(&format!("{alias}.{part}"), grain);
            format!("{col} >= {lo} AND {col} < {hi}")
        };
        let any_key_null = |alias: &str| {
            spec.target
                .key
                .iter()
                .map(|k| format!("{alias}.{} IS NULL", k.quoted()))
                .collect::<Vec<_>>()
                .join(" OR ")
        };
        let key_match = |a: &str, b: &str| {
            spec.target
                .key
                .iter()
                .map(|k| format!("{a}.{k} = {b}.{k}", k = k.quoted()))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let shadow_q = shadow.quoted();
        // Where a write can report on what it wrote, one statement inserts, checks every
        // inserted row and checksums them: no second read of the partition. Without a unique
        // index (deferred) it also counts duplicate keys among them.
        let fast_insert_sql = if engine.capabilities().data_modifying_cte {
            format!(
                "WITH ins AS (INSERT INTO {shadow_q} ({column_list}) {deduped} RETURNING *) \
                 SELECT count(*), coalesce(sum(CASE WHEN ins.{part} IS NULL OR NOT ({}) THEN 1 ELSE 0 END), 0), \
                 coalesce(sum(CASE WHEN {} THEN 1 ELSE 0 END), 0), \
                 CAST(coalesce(sum({}), 0) AS text), {} FROM ins",
                in_partition("ins"),
                any_key_null("ins"),
                row_hash.expr("ins"),
                if shadow_facts.unique_key_index {
                    "0".to_string()
                } else {
                    format!(
                        "count(*) - count(DISTINCT ({}))",
                        spec.target
                            .key
                            .iter()
                            .map(|k| format!("ins.{}", k.quoted()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        } else {
            format!("INSERT INTO {shadow_q} ({column_list}) {deduped}")
        };
        let partition_rows_sql = format!(
            "SELECT count(*), {} FROM {shadow_q} AS t WHERE {}",
            engine.as_bigint(&format!(
                "coalesce(sum(CASE WHEN {} THEN 1 ELSE 0 END), 0)",
                any_key_null("t")
            )),
            in_partition("t")
        );

        let source_table = "bf_src";
        let (create_source, drop_source) = engine.temp_table_from_query(source_table, &deduped);
        let source_checks = format!(
            "SELECT count(*), {}, {} FROM {source_table} AS s",
            engine.as_bigint(&format!(
                "coalesce(sum(CASE WHEN s.{part} IS NULL OR NOT ({}) THEN 1 ELSE 0 END), 0)",
                in_partition("s")
            )),
            engine.as_bigint(&format!(
                "coalesce(sum(CASE WHEN {} THEN 1 ELSE 0 END), 0)",
                any_key_null("s")
            ))
        );
        // Matching is confined to this partition: a key that exists in another partition is a
        // collision (an error), never a silent move of that row into this one.
        let count_new = format!(
            "SELECT count(*) FROM {source_table} AS s WHERE NOT EXISTS (SELECT 1 FROM {shadow_q} AS t WHERE {} AND {})",
            key_match("t", "s"),
            in_partition("t")
        );
        let merge = engine.merge_partition(&PartitionMerge {
            shadow: &shadow,
            source: source_table,
            columns: &columns,
            key: &spec.target.key,
            in_partition: &in_partition,
        });
        let delete_vanished = format!(
            "{} WHERE {} AND NOT EXISTS (SELECT 1 FROM {source_table} AS s WHERE {})",
            engine.delete_from(&shadow, "t"),
            in_partition("t"),
            key_match("s", "t")
        );
        let partition_filter = in_partition("t");
        Ok(PartitionContext {
            store,
            run_id: run.run_id.clone(),
            spec_hash: run.spec_hash.clone(),
            warehouse_name: spec.warehouse.name.clone(),
            concurrency: spec.warehouse.concurrency,
            grain,
            shadow,
            timeout: spec.execution.partition_timeout,
            retries: spec.execution.retries,
            backoff_initial: spec.execution.backoff_initial,
            backoff_max: spec.execution.backoff_max,
            fast_insert_sql,
            partition_rows_sql,
            merge: MergeSql {
                create_source,
                source_checks,
                count_new,
                merge,
                delete_vanished,
                drop_source,
            },
            partition_filter,
            row_hash,
        })
    }
}
