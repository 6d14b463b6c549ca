//! The mini challenge from the lesson as data, and `backfill demo`, which runs it end to end
//! on an embedded SQLite warehouse: no server needed. Tests use the same data on PostgreSQL.

use std::path::Path;

use backfill_common::BackfillError;
use backfill_common::engine::{Engine, SqlType};
use backfill_common::plan::Grain;
use backfill_common::spec::Spec;
use backfill_common::warehouse::{Bind, Session, Warehouse, execute, fetch_all, get};

use crate::runner::{Backfill, Progress, RunOutcome};

pub const MINI_CHALLENGE_SPEC: &str = include_str!("../../examples/mini_challenge.toml");

pub const DAYS: u32 = 10;
pub const ORDERS_PER_DAY: i64 = 150;
pub const BUG_DAYS: [&str; 4] = ["2024-03-03", "2024-03-04", "2024-03-05", "2024-03-06"];
/// One item cancelled in staging after the bug: its key vanishes from the fixed table.
pub const CANCELLED: (i64, i64) = (450, 1);

#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub order_id: i64,
    pub item_id: i64,
    pub order_date: String,
    pub sku: String,
    pub quantity: i64,
    pub unit_price: f64,
    pub updated_at: String,
}

/// Three versions of the data: production with the bug, staging (corrected, with stale
/// duplicate versions of some rows), and the expected production after a correct backfill.
pub struct MiniChallenge {
    pub production: Vec<ItemRow>,
    pub staging: Vec<ItemRow>,
    pub expected: Vec<ItemRow>,
}

pub fn day(index: u32) -> String {
    (chrono::NaiveDate::from_ymd_opt(2024, 3, 1).expect("valid date")
        + chrono::Duration::days(index as i64))
    .format("%Y-%m-%d")
    .to_string()
}

pub fn mini_challenge_data() -> MiniChallenge {
    let mut production = Vec::new();
    let mut staging = Vec::new();
    let mut expected = Vec::new();
    for d in 0..DAYS {
        let date = day(d);
        let bug_day = BUG_DAYS.contains(&date.as_str());
        for n in 0..ORDERS_PER_DAY {
            let order_id = d as i64 * ORDERS_PER_DAY + n + 1;
            for item_id in 1..=(1 + order_id % 3) {
                let correct = ItemRow {
                    order_id,
                    item_id,
                    order_date: date.clone(),
                    sku: format!("SKU-{:04}", (order_id * 7 + item_id * 13) % 500),
                    quantity: 1 + (order_id * 7 + item_id) % 5,
                    unit_price: 2.5 + (order_id % 40) as f64,
                    updated_at: format!("{date} 08:00:00"),
                };
                let mut stored = correct.clone();
                if bug_day {
                    stored.quantity *= 2;
                }
                production.push(stored.clone());
                if (order_id, item_id) == CANCELLED {
                    continue;
                }
                if bug_day && order_id % 10 == 0 {
                    // an older version of the row, still carrying the bug: dedupe must drop it
                    let mut stale = stored.clone();
                    stale.updated_at = format!("{date} 07:00:00");
                    staging.push(stale);
                }
                let mut fixed = correct.clone();
                if bug_day {
                    fixed.updated_at = "2024-03-20 09:00:00".into();
                }
                staging.push(fixed.clone());
                expected.push(if bug_day { fixed } else { stored });
            }
        }
    }
    MiniChallenge {
        production,
        staging,
        expected,
    }
}

/// Creates `fact_order_items` (production, with the bug), `staging_order_items`,
/// `expected_order_items` (what a correct fix yields) and the `daily_quantity` view.
pub async fn seed_mini_challenge(warehouse: &Warehouse) -> Result<(), BackfillError> {
    let data = mini_challenge_data();
    let engine = warehouse.engine();
    let (date, price, ts) = (
        engine.sql_type(SqlType::Date),
        engine.sql_type(SqlType::Amount),
        engine.sql_type(SqlType::Timestamp),
    );
    let mut conn = warehouse.acquire().await?;
    execute(&mut conn, "DROP VIEW IF EXISTS daily_quantity", &[]).await?;
    for table in [
        "fact_order_items",
        "staging_order_items",
        "expected_order_items",
    ] {
        execute(&mut conn, &format!("DROP TABLE IF EXISTS {table}"), &[]).await?;
        let key = if table == "staging_order_items" {
            ""
        } else {
            ", PRIMARY KEY (order_id, item_id)"
        };
        execute(
            &mut conn,
            &format!(
                "CREATE TABLE {table} (order_id bigint NOT NULL, item_id integer NOT NULL, order_date {date} NOT NULL, sku text NOT NULL, \
                 quantity integer NOT NULL, unit_price {price} NOT NULL, updated_at {ts} NOT NULL{key})"
            ),
            &[],
        )
        .await?;
        let rows = match table {
            "fact_order_items" => &data.production,
            "staging_order_items" => &data.staging,
            _ => &data.expected,
        };
        insert_rows(&mut conn, engine, table, rows).await?;
    }
    execute(
        &mut conn,
        "CREATE INDEX fact_order_items_order_date ON fact_order_items (order_date)",
        &[],
    )
    .await?;
    execute(
        &mut conn,
        "CREATE INDEX staging_order_items_order_date ON staging_order_items (order_date)",
        &[],
    )
    .await?;
    execute(
        &mut conn,
        "CREATE VIEW daily_quantity AS SELECT order_date, sum(quantity) AS total_quantity, count(*) AS items FROM fact_order_items GROUP BY order_date",
        &[],
    )
    .await?;
    Ok(())
}

async fn insert_rows(
    conn: &mut dyn Session,
    engine: &dyn Engine,
    table: &str,
    rows: &[ItemRow],
) -> Result<(), BackfillError> {
    for chunk in rows.chunks(200) {
        let mut sql = format!(
            "INSERT INTO {table} (order_id, item_id, order_date, sku, quantity, unit_price, updated_at) VALUES "
        );
        let mut binds = Vec::new();
        for (i, row) in chunk.iter().enumerate() {
            let n = binds.len();
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, {}, ${}, ${}, ${}, {})",
                n + 1,
                n + 2,
                engine.partition_bound(Grain::Day, n + 3),
                n + 4,
                n + 5,
                n + 6,
                engine.partition_bound(Grain::Hour, n + 7)
            ));
            binds.extend([
                Bind::Int(row.order_id),
                Bind::Int(row.item_id),
                Bind::Text(row.order_date.clone()),
                Bind::Text(row.sku.clone()),
                Bind::Int(row.quantity),
                Bind::Float(row.unit_price),
                Bind::Text(row.updated_at.clone()),
            ]);
        }
        execute(conn, &sql, &binds).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DayTotal {
    pub day: String,
    pub total_quantity: i64,
    pub items: i64,
}

/// What the dashboard sees: the `daily_quantity` view.
pub async fn daily_totals(warehouse: &Warehouse) -> Result<Vec<DayTotal>, BackfillError> {
    let mut conn = warehouse.acquire().await?;
    let rows = fetch_all(
        &mut conn,
        &format!(
            "SELECT {}, {}, {} FROM daily_quantity ORDER BY 1",
            warehouse.engine().partition_label("order_date", Grain::Day),
            warehouse.engine().as_bigint("total_quantity"),
            warehouse.engine().as_bigint("items")
        ),
        &[],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DayTotal {
                day: get(r, 0)?,
                total_quantity: get(r, 1)?,
                items: get(r, 2)?,
            })
        })
        .collect()
}

pub struct DemoReport {
    pub warehouse_url: String,
    pub before: Vec<DayTotal>,
    pub after: Vec<DayTotal>,
    pub outcome: RunOutcome,
}

/// Runs the mini challenge on the warehouse at `url` (PostgreSQL, MySQL/MariaDB, SQLite):
/// recreates the demo's tables there (`fact_order_items`, `staging_order_items`,
/// `expected_order_items`, the view `daily_quantity`), then runs the example spec with the
/// control store in `control_schema`. Each demo is a run of its own (its spec's description
/// names the time), so a second demo publishes again instead of finding the first.
pub async fn run_demo_on(
    url: &str,
    control_schema: &str,
    progress: &dyn Progress,
) -> Result<DemoReport, BackfillError> {
    let warehouse = Warehouse::connect(url, 4).await?;
    progress.phase(&format!(
        "seeding the mini challenge in {}: 10 days of fact_order_items, quantity doubled on 2024-03-03..06",
        backfill_common::warehouse::redact_url(url)
    ));
    seed_mini_challenge(&warehouse).await?;
    let before = daily_totals(&warehouse).await?;
    let text = demo_spec(control_schema)?;
    let backfill = Backfill::open(Spec::parse(&text)?, text, url).await?;
    let outcome = backfill.run("demo", progress).await?;
    let after = daily_totals(&warehouse).await?;
    warehouse.close().await;
    Ok(DemoReport {
        warehouse_url: url.to_string(),
        before,
        after,
        outcome,
    })
}

/// The example spec as a demo on a server runs it: its control schema, and a description
/// that makes each demo's spec (and run) its own.
fn demo_spec(control_schema: &str) -> Result<String, BackfillError> {
    let schema = backfill_common::ident::Ident::new(control_schema)
        .map_err(|e| BackfillError::Invalid(format!("--control-schema: {e}")))?;
    let mut text = MINI_CHALLENGE_SPEC.replacen(
        "description = \"",
        &format!(
            "description = \"demo of {}: ",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        1,
    );
    if schema.as_str() != "backfill" {
        text = text.replacen(
            "[warehouse]\n",
            &format!("[warehouse]\ncontrol_schema = \"{schema}\"\n"),
            1,
        );
    }
    Ok(text)
}

/// Builds a fresh SQLite warehouse in `dir` and runs the mini challenge through it.
pub async fn run_demo(dir: &Path, progress: &dyn Progress) -> Result<DemoReport, BackfillError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BackfillError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| BackfillError::Invalid(format!("cannot resolve {}: {e}", dir.display())))?;
    let path = dir.join("warehouse.db");
    for suffix in ["", "-wal", "-shm"] {
        let file = dir.join(format!("warehouse.db{suffix}"));
        if file.exists() {
            std::fs::remove_file(&file).map_err(|e| {
                BackfillError::Invalid(format!(
                    "cannot remove the old demo file {}: {e}",
                    file.display()
                ))
            })?;
        }
    }
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let warehouse = Warehouse::connect(&url, 4).await?;
    progress.phase("seeding the mini challenge: 10 days of fact_order_items, quantity doubled on 2024-03-03..06");
    seed_mini_challenge(&warehouse).await?;
    let before = daily_totals(&warehouse).await?;
    let spec = Spec::parse(MINI_CHALLENGE_SPEC)?;
    let backfill = Backfill::open(spec, MINI_CHALLENGE_SPEC.to_string(), &url).await?;
    let outcome = backfill.run("demo", progress).await?;
    let after = daily_totals(&warehouse).await?;
    Ok(DemoReport {
        warehouse_url: url,
        before,
        after,
        outcome,
    })
}
