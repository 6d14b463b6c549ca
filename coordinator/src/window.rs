//! "The window" (the partitions a run backfills) as a SQL condition with bound values.

use backfill_common::engine::Engine;
use backfill_common::ident::Ident;
use backfill_common::plan::{self, Grain, Partition};
use backfill_common::warehouse::Bind;

/// The window of `spec` over `partitions` on its partition column, alias `t`, placeholders
/// from `$1`: what most statements about the window use.
pub fn spec_window(
    engine: &dyn Engine,
    spec: &backfill_common::spec::Spec,
    partitions: &[Partition],
) -> (String, Vec<Bind>) {
    window_condition(
        engine,
        spec.partition.grain,
        &spec.partition.column,
        "t",
        partitions,
        1,
    )
}

/// `(t.col >= $a AND t.col < $b) OR …` over the coalesced ranges of `partitions`, with
/// placeholders numbered from `first_placeholder`.
pub fn window_condition(
    engine: &dyn Engine,
    grain: Grain,
    column: &Ident,
    alias: &str,
    partitions: &[Partition],
    first_placeholder: usize,
) -> (String, Vec<Bind>) {
    let mut binds = Vec::new();
    let mut parts = Vec::new();
    for (start, end) in plan::coalesce_ranges(partitions) {
        let lo = engine.partition_bound(grain, first_placeholder + binds.len());
        binds.push(Bind::Text(plan::bound_value(grain, start)));
        let hi = engine.partition_bound(grain, first_placeholder + binds.len());
        binds.push(Bind::Text(plan::bound_value(grain, end)));
        let col = engine.partition_column(&format!("{alias}.{}", column.quoted()), grain);
        parts.push(format!("({col} >= {lo} AND {col} < {hi})"));
    }
    if parts.is_empty() {
        return ("1 = 0".to_string(), binds);
    }
    (format!("({})", parts.join(" OR ")), binds)
}
