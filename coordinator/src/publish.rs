//! Publishing and taking back: the atomic `swap_table` (archive the current table, rename the
//! shadow in, carry dependent views, grants and the table comment over), `swap_window` (the
//! table stays; its window rows are archived and merged from the shadow: only changed rows
//! are written), `rollback` (put the archive back and prove its checksum), and `gc` (drop
//! archives past retention).
//!
//! Each is one transaction. PostgreSQL views bind to a table's OID, so the views that read the
//! target are re-created from their own definitions inside the swap; SQLite views bind by
//! name, so the swap runs with `legacy_alter_table` so that renames leave views alone.

use backfill_common::BackfillError;
use backfill_common::control::{
    ArchiveMark, ArchiveRecord, ControlStore, OPEN_STATES, RunRecord, RunState, now_text,
};
use backfill_common::dialect::Dialect;
use backfill_common::ident::TableName;
use backfill_common::sql::string_literal;
use backfill_common::warehouse::{Checksum, RowHash, execute, fetch_all, fetch_one, get};
use chrono::{Duration, Utc};
use sqlx::{AnyConnection, Connection};

use crate::shadow::quote_catalog_name;

fn archive_suffix(run_id: &str) -> String {
    format!("__bf_archive_{run_id}")
}

fn undone_suffix(run_id: &str) -> String {
    format!("__bf_undone_{run_id}")
}

pub fn archive_name(target: &TableName, run_id: &str) -> Result<TableName, BackfillError> {
    target
        .with_suffix(&archive_suffix(run_id))
        .map_err(|e| BackfillError::Invalid(e.to_string()))
}

pub fn undone_name(target: &TableName, run_id: &str) -> Result<TableName, BackfillError> {
    target
        .with_suffix(&undone_suffix(run_id))
        .map_err(|e| BackfillError::Invalid(e.to_string()))
}

/// The checksum of the target's rows outside the window recorded when the shadow was built,
/// with the condition that selects them: publish refuses if they changed since.
pub struct OutsideGuard {
    pub filter: String,
    pub binds: Vec<backfill_common::warehouse::Bind>,
    pub expected: String,
}

/// The checksum of the target's window rows the audits compared against (an approval gate):
/// publish refuses if they changed since.
pub struct WindowGuard {
    pub filter: String,
    pub binds: Vec<backfill_common::warehouse::Bind>,
    pub expected: String,
}

/// Archive kinds in the control store.
pub const ARCHIVE_TABLE: &str = "pre_publish";
pub const ARCHIVE_WINDOW: &str = "pre_publish_window";
pub const ARCHIVE_PARTITION: &str = "pre_publish_partition";

async fn check_window_guard(
    warehouse: &backfill_common::warehouse::Warehouse,
    conn: &mut AnyConnection,
    target: &TableName,
    guard: Option<&WindowGuard>,
) -> Result<(), BackfillError> {
    let Some(guard) = guard else {
        return Ok(());
    };
    let now = warehouse
        .checksum_like(
            conn,
            target,
            Some(&guard.filter),
            &guard.binds,
            &guard.expected,
        )
        .await?;
    if now.to_string() != guard.expected {
        return Err(BackfillError::Conflict(format!(
            "{target} changed inside the window since the audits compared against it ({} then, {now} now): \
             the approval no longer holds. Nothing was published; run the same spec again to audit the new state",
            guard.expected
        )));
    }
    Ok(())
}

/// What must follow the target across a rename in PostgreSQL.
struct Dependents {
    /// The old table's owner when it is not the role running the backfill.
    owner: Option<String>,
    views: Vec<ViewDefinition>,
    grants: Vec<(String, String)>,
    comment: Option<String>,
}

struct ViewDefinition {
    name: String,
    definition: String,
    options: Option<String>,
}

/// Locks the target and reads what depends on it. Refuses targets whose dependents a rename
/// would strand: materialized views and foreign keys pointing at the target.
async fn read_dependents(
    conn: &mut AnyConnection,
    target: &TableName,
) -> Result<Dependents, BackfillError> {
    let target_text = target.quoted();
    execute(
        conn,
        &format!("LOCK TABLE {target_text} IN ACCESS EXCLUSIVE MODE"),
        &[],
    )
    .await?;
    let row = fetch_one(conn, "SELECT current_setting('search_path')", &[]).await?;
    let search_path: String = get(&row, 0)?;
    // With only pg_catalog on the path, view definitions come back fully qualified.
    execute(
        conn,
        "SELECT set_config('search_path', 'pg_catalog', true)",
        &[],
    )
    .await?;
    let views = fetch_all(
        conn,
        "SELECT DISTINCT CAST(quote_ident(vn.nspname) || '.' || quote_ident(v.relname) AS text), CAST(v.relkind AS text), \
         pg_get_viewdef(v.oid), CAST(array_to_string(v.reloptions, ', ') AS text) \
         FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class \
         JOIN pg_namespace vn ON vn.oid = v.relnamespace \
         WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = CAST($1 AS regclass) AND v.oid <> CAST($1 AS regclass)",
        &[target_text.as_str().into()],
    )
    .await;
    execute(
        conn,
        "SELECT set_config('search_path', $1, true)",
        &[search_path.into()],
    )
    .await?;
    let mut definitions = Vec::new();
    for row in views? {
        let name: String = get(&row, 0)?;
        let kind: String = get(&row, 1)?;
        if kind == "m" {
            return Err(BackfillError::Invalid(format!(
                "materialized view {name} reads {target}; swap_table would leave it on the archive. Drop it and re-create it after publish"
            )));
        }
        let definition: String = get(&row, 2)?;
        definitions.push(ViewDefinition {
            name,
            definition: definition.trim().trim_end_matches(';').to_string(),
            options: get::<Option<String>>(&row, 3)?.filter(|o| !o.is_empty()),
        });
    }
    let foreign_keys = fetch_all(
        conn,
        "SELECT CAST(conname AS text), CAST(CAST(conrelid AS regclass) AS text) FROM pg_constraint WHERE contype = 'f' AND confrelid = CAST($1 AS regclass)",
        &[target_text.as_str().into()],
    )
    .await?;
    if let Some(row) = foreign_keys.first() {
        let (name, table): (String, String) = (get(row, 0)?, get(row, 1)?);
        return Err(BackfillError::Invalid(format!(
            "foreign key {name} on {table} references {target}; swap_table would leave it pointing at the archive"
        )));
    }
    let grants = fetch_all(
        conn,
        "SELECT CAST(grantee AS text), CAST(privilege_type AS text) FROM information_schema.role_table_grants \
         WHERE table_schema = $1 AND table_name = $2 AND grantee <> current_user",
        &[backfill_common::warehouse::schema_of(target).into(), target.name.as_str().into()],
    )
    .await?;
    let grants = grants
        .iter()
        .map(|r| Ok((get::<String>(r, 0)?, get::<String>(r, 1)?)))
        .collect::<Result<Vec<_>, BackfillError>>()?;
    let row = fetch_one(
        conn,
        "SELECT obj_description(CAST($1 AS regclass), 'pg_class')",
        &[target_text.as_str().into()],
    )
    .await?;
    let comment: Option<String> = get(&row, 0)?;
    let row = fetch_one(
        conn,
        "SELECT CAST(pg_get_userbyid(relowner) AS text), CAST(current_user AS text) FROM pg_class WHERE oid = CAST($1 AS regclass)",
        &[target_text.as_str().into()],
    )
    .await?;
    let (owner, me): (String, String) = (get(&row, 0)?, get(&row, 1)?);
    Ok(Dependents {
        owner: (owner != me).then_some(owner),
        views: definitions,
        grants,
        comment,
    })
}

/// Re-points views at the table now called `target`, and gives it the grants and comment the
/// old table had.
async fn restore_dependents(
    conn: &mut AnyConnection,
    target: &TableName,
    dependents: &Dependents,
    with_grants: bool,
) -> Result<(), BackfillError> {
    if with_grants {
        if let Some(owner) = &dependents.owner {
            execute(
                conn,
                &format!(
                    "ALTER TABLE {} OWNER TO {}",
                    target.quoted(),
                    quote_catalog_name(owner)
                ),
                &[],
            )
            .await
            .map_err(|e| e.context(format!("giving {target} back to its owner {owner}")))?;
        }
        for (grantee, privilege) in &dependents.grants {
            let grantee = if grantee == "PUBLIC" {
                "PUBLIC".to_string()
            } else {
                quote_catalog_name(grantee)
            };
            if !privilege
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == ' ')
            {
                continue;
            }
            execute(
                conn,
                &format!("GRANT {privilege} ON {} TO {grantee}", target.quoted()),
                &[],
            )
            .await?;
        }
        if let Some(comment) = &dependents.comment {
            execute(
                conn,
                &format!(
                    "COMMENT ON TABLE {} IS {}",
                    target.quoted(),
                    string_literal(comment)
                ),
                &[],
            )
            .await?;
        }
    }
    for view in &dependents.views {
        let options = view
            .options
            .as_ref()
            .map(|o| format!(" WITH ({o})"))
            .unwrap_or_default();
        execute(
            conn,
            &format!(
                "CREATE OR REPLACE VIEW {}{options} AS {}",
                view.name, view.definition
            ),
            &[],
        )
        .await
        .map_err(|e| e.context(format!("re-pointing view {} at {target}", view.name)))?;
    }
    Ok(())
}

async fn rename(
    conn: &mut AnyConnection,
    from: &TableName,
    to: &TableName,
) -> Result<(), BackfillError> {
    execute(
        conn,
        &format!(
            "ALTER TABLE {} RENAME TO {}",
            from.quoted(),
            to.name.quoted()
        ),
        &[],
    )
    .await
    .map_err(|e| e.context(format!("renaming {from} to {}", to.name)))?;
    Ok(())
}

/// PostgreSQL's longest identifier, in bytes (longer names are silently truncated).
const MAX_IDENTIFIER_BYTES: usize = 63;

/// One index of a table: its name, its schema-qualified quoted name (for renames, whatever the
/// search path), and what it is apart from its name and table (so the same index on two
/// tables has the same signature).
struct IndexSignature {
    name: String,
    schema: String,
    signature: String,
    constraint: bool,
    /// The comment on the constraint the index backs (`COMMENT ON CONSTRAINT`).
    constraint_comment: Option<String>,
}

/// The indexes of a table with their signatures: `pg_get_indexdef` without the `CREATE …
/// INDEX <name> ON <table>` head, plus the kind of constraint the index backs. An index whose
/// definition does not have the expected head is left out (and keeps its name).
async fn index_signatures(
    conn: &mut AnyConnection,
    table: &TableName,
) -> Result<Vec<IndexSignature>, BackfillError> {
    let rows = fetch_all(
        conn,
        "SELECT CAST(ic.relname AS text), quote_ident(CAST(ic.relname AS text)), pg_catalog.pg_get_indexdef(i.indexrelid), \
         quote_ident(CAST(n.nspname AS text)) || '.' || quote_ident(CAST(tc.relname AS text)), \
         quote_ident(CAST(tc.relname AS text)), coalesce(CAST(con.contype AS text), ''), CAST(n.nspname AS text), \
         pg_catalog.obj_description(con.oid, 'pg_constraint') \
         FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
         JOIN pg_catalog.pg_class tc ON tc.oid = i.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = tc.relnamespace \
         LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x') \
         WHERE i.indrelid = CAST($1 AS regclass) ORDER BY ic.relname",
        &[table.quoted().into()],
    )
    .await?;
    let mut out = Vec::new();
    for row in &rows {
        let name: String = get(row, 0)?;
        let quoted_name: String = get(row, 1)?;
        let definition: String = get(row, 2)?;
        let qualified_table: String = get(row, 3)?;
        let bare_table: String = get(row, 4)?;
        let constraint: String = get(row, 5)?;
        let schema: String = get(row, 6)?;
        let constraint_comment: Option<String> = get(row, 7)?;
        let rest = ["CREATE UNIQUE INDEX ", "CREATE INDEX "]
            .iter()
            .find_map(|head| definition.strip_prefix(head))
            .and_then(|rest| rest.strip_prefix(quoted_name.as_str()))
            .and_then(|rest| rest.strip_prefix(" ON "))
            .map(|rest| rest.strip_prefix("ONLY ").unwrap_or(rest))
            .and_then(|rest| {
                rest.strip_prefix(qualified_table.as_str())
                    .or_else(|| rest.strip_prefix(bare_table.as_str()))
            });
        match rest {
            Some(rest) => {
                let unique = definition.starts_with("CREATE UNIQUE");
                out.push(IndexSignature {
                    signature: format!("{unique}|{constraint}|{rest}"),
                    constraint: !constraint.is_empty(),
                    constraint_comment,
                    name,
                    schema,
                });
            }
            None => {
                tracing::warn!(index = %name, %definition, "an index definition has an unexpected form; the index keeps its name")
            }
        }
    }
    Ok(out)
}

/// The names an index may step aside to, in order of preference: `<name><suffix>`, then the
/// name shortened and numbered (`<name…>_<n><suffix>`), all within PostgreSQL's 63 bytes.
fn stepped_aside_names(name: &str, suffix: &str) -> impl Iterator<Item = String> {
    let whole = format!("{name}{suffix}");
    let whole = (whole.len() <= MAX_IDENTIFIER_BYTES).then_some(whole);
    let (name, suffix) = (name.to_string(), suffix.to_string());
    whole.into_iter().chain((1..=999).map(move |ordinal| {
        let tail = format!("_{ordinal}{suffix}");
        let mut end = MAX_IDENTIFIER_BYTES
            .saturating_sub(tail.len())
            .min(name.len());
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}{tail}", &name[..end])
    }))
}

/// After a swap (PostgreSQL), the incoming table's indexes take the names of the outgoing
/// table's matching indexes (the same definition and constraint kind), and the outgoing ones
/// step aside to `<name><suffix>`. Migrations, monitoring and `pg_stat_user_indexes` name
/// indexes: a backfill must not rename them. Renaming an index renames the constraint it backs.
/// Only incoming indexes `takes_names` accepts are renamed (a rollback renames only indexes
/// that carry the archive's suffix, so an archive made before names were handed over keeps
/// its own). An index with no match keeps its name (a warning says so for a constraint's).
async fn hand_over_index_names(
    conn: &mut AnyConnection,
    outgoing: &TableName,
    incoming: &TableName,
    suffix: &str,
    takes_names: impl Fn(&str) -> bool,
) -> Result<(), BackfillError> {
    let old = index_signatures(conn, outgoing).await?;
    let mut new = index_signatures(conn, incoming).await?;
    new.retain(|index| takes_names(&index.name));
    let mut pairs = Vec::new();
    for index in old {
        match new.iter().position(|n| n.signature == index.signature) {
            Some(at) => {
                let taker = new.remove(at);
                if taker.name != index.name {
                    pairs.push((index, taker));
                }
            }
            None if index.constraint => {
                tracing::warn!(index = %index.name, table = %outgoing, "no index of the new table matches this constraint's index; its name is not handed over")
            }
            None => {}
        }
    }
    let qualified = |schema: &str, name: &str| {
        format!(
            "{}.{}",
            quote_catalog_name(schema),
            quote_catalog_name(name)
        )
    };
    let mut handed = Vec::new();
    for (index, taker) in pairs {
        let mut aside = None;
        for candidate in stepped_aside_names(&index.name, suffix) {
            let taken = !fetch_all(
                conn,
                "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relname = $1 AND n.nspname = $2",
                &[candidate.clone().into(), index.schema.clone().into()],
            )
            .await?
            .is_empty();
            if !taken {
                aside = Some(candidate);
                break;
            }
        }
        let Some(aside) = aside else {
            tracing::warn!(index = %index.name, "an index keeps its name: no free name to step aside to");
            continue;
        };
        execute(
            conn,
            &format!(
                "ALTER INDEX {} RENAME TO {}",
                qualified(&index.schema, &index.name),
                quote_catalog_name(&aside)
            ),
            &[],
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "renaming index {} of {outgoing} to {aside}",
                index.name
            ))
        })?;
        handed.push((index.name, index.constraint_comment, taker));
    }
    for (name, comment, taker) in handed {
        execute(
            conn,
            &format!(
                "ALTER INDEX {} RENAME TO {}",
                qualified(&taker.schema, &taker.name),
                quote_catalog_name(&name)
            ),
            &[],
        )
        .await
        .map_err(|e| {
            e.context(format!(
                "renaming index {} of {incoming} to {name}",
                taker.name
            ))
        })?;
        // A key constraint's comment does not travel with `CREATE TABLE … LIKE`: carry it.
        if let (Some(comment), None) = (&comment, &taker.constraint_comment) {
            execute(
                conn,
                &format!(
                    "COMMENT ON CONSTRAINT {} ON {} IS {}",
                    quote_catalog_name(&name),
                    incoming.quoted(),
                    string_literal(comment)
                ),
                &[],
            )
            .await?;
        }
    }
    Ok(())
}

/// Lets SQLite renames leave views alone (they then resolve by name at query time).
async fn set_sqlite_legacy_alter(conn: &mut AnyConnection, on: bool) -> Result<(), BackfillError> {
    execute(
        conn,
        &format!(
            "PRAGMA legacy_alter_table = {}",
            if on { "ON" } else { "OFF" }
        ),
        &[],
    )
    .await?;
    Ok(())
}

/// Archives the current target and renames the shadow in, in one transaction. Records the
/// archive with the old table's checksum (for rollback) and marks the run published.
pub async fn swap_table(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    retention_days: u32,
    outside: Option<OutsideGuard>,
    window: Option<WindowGuard>,
) -> Result<ArchiveRecord, BackfillError> {
    let warehouse = &store.warehouse;
    let archive = archive_name(target, &run.run_id)?;
    let mut conn = warehouse.acquire().await?;
    let dialect = warehouse.dialect;
    if dialect == Dialect::Sqlite {
        set_sqlite_legacy_alter(&mut conn, true).await?;
    }
    let result = async {
        let mut tx = conn.begin().await?;
        if dialect == Dialect::Postgres {
            execute(
                &mut tx,
                "SELECT set_config('lock_timeout', '30s', true)",
                &[],
            )
            .await?;
        }
        if dialect == Dialect::Postgres {
            // Block writers but not readers while checksumming; the exclusive lock for the
            // renames comes after, in read_dependents.
            execute(&mut tx, &format!("LOCK TABLE {} IN SHARE MODE", target.quoted()), &[]).await?;
        }
        check_window_guard(warehouse, &mut tx, target, window.as_ref()).await?;
        // One scan: the whole table for the archive record, and its rows outside the window
        // to compare with what the shadow was built from.
        let old = match &outside {
            Some(guard) => {
                let (old, now) = warehouse.checksum_with_subset(&mut tx, target, &guard.filter, &guard.binds, RowHash::of_stored(&guard.expected)).await?;
                if now.to_string() != guard.expected {
                return Err(BackfillError::Conflict(format!(
                    "{target} changed outside the window since the shadow was built ({} then, {now} now): publishing would discard those writes. \
                     Nothing was published; pause the writers (or backfill their partitions too), abandon this run and run again",
                    guard.expected
                )));
                }
                old
            }
            None => warehouse.checksum(&mut tx, target, None, &[]).await?,
        };
        let dependents = match dialect {
            Dialect::Postgres => Some(read_dependents(&mut tx, target).await?),
            Dialect::Sqlite => None,
        };
        rename(&mut tx, target, &archive).await?;
        rename(&mut tx, shadow, target).await?;
        if let Some(dependents) = &dependents {
            restore_dependents(&mut tx, target, dependents, true).await?;
            hand_over_index_names(&mut tx, &archive, target, &archive_suffix(&run.run_id), |_| true).await?;
        }
        let record = archive_record(&run.run_id, &archive, target, ARCHIVE_TABLE, &old, Duration::days(retention_days as i64));
        store.insert_archive(&mut tx, &record).await?;
        record_published(store, &mut tx, &run.run_id, &archive.to_string()).await?;
        store
            .set_pinned_run_state(&mut tx, run, &PUBLISHABLE, RunState::Published, None)
            .await?;
        tx.commit().await?;
        Ok::<_, BackfillError>(record)
    }
    .await;
    if dialect == Dialect::Sqlite {
        set_sqlite_legacy_alter(&mut conn, false).await?;
    }
    result
}

/// States a run publishes from: audited, or audited and approved.
const PUBLISHABLE: [RunState; 3] = [
    RunState::Auditing,
    RunState::AuditFailed,
    RunState::AwaitingApproval,
];

/// The columns `swap_window` writes, and the statements that make the target's window equal
/// to another table's rows (the shadow at publish, the archive at rollback): delete the keys
/// that are gone, update the rows that changed, insert the new keys. Rows that did not change
/// are not written.
struct WindowMerge {
    delete_vanished: String,
    update_changed: String,
    insert_new: String,
}

fn window_merge(
    dialect: Dialect,
    target: &TableName,
    from: &TableName,
    columns: &[String],
    text_compared: &[String],
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
) -> WindowMerge {
    let key_names: Vec<String> = key.iter().map(|k| k.as_str().to_string()).collect();
    let key_match = |a: &str, b: &str| {
        key.iter()
            .map(|k| format!("{a}.{k} = {b}.{k}", k = k.quoted()))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let non_key: Vec<&String> = columns.iter().filter(|c| !key_names.contains(c)).collect();
    let column_list = columns
        .iter()
        .map(|c| quote_catalog_name(c))
        .collect::<Vec<_>>()
        .join(", ");
    let delete_vanished = format!(
        "DELETE FROM {target} AS t WHERE {window_on_t} AND NOT EXISTS (SELECT 1 FROM {from} AS s WHERE {})",
        key_match("s", "t"),
        target = target.quoted(),
        from = from.quoted(),
    );
    let update_changed = if non_key.is_empty() {
        // Only key columns: a matched row cannot differ.
        "SELECT 1 WHERE 1 = 0".to_string()
    } else {
        format!(
            "UPDATE {target} AS t SET {} FROM {from} AS s WHERE {} AND {window_on_t} AND ({})",
            non_key
                .iter()
                .map(|c| format!("{c} = s.{c}", c = quote_catalog_name(c)))
                .collect::<Vec<_>>()
                .join(", "),
            key_match("t", "s"),
            non_key
                .iter()
                .map(|c| {
                    let quoted = quote_catalog_name(c);
                    if text_compared.contains(c) {
                        // json has no equality operator: compare its text
                        dialect.distinct(
                            &format!("CAST(t.{quoted} AS text)"),
                            &format!("CAST(s.{quoted} AS text)"),
                        )
                    } else {
                        dialect.distinct(&format!("t.{quoted}"), &format!("s.{quoted}"))
                    }
                })
                .collect::<Vec<_>>()
                .join(" OR "),
            target = target.quoted(),
            from = from.quoted(),
        )
    };
    let insert_new = format!(
        "INSERT INTO {target} ({column_list}) SELECT {} FROM {from} AS s WHERE NOT EXISTS (SELECT 1 FROM {target} AS t WHERE {})",
        columns
            .iter()
            .map(|c| format!("s.{}", quote_catalog_name(c)))
            .collect::<Vec<_>>()
            .join(", "),
        key_match("t", "s"),
        target = target.quoted(),
        from = from.quoted(),
    );
    WindowMerge {
        delete_vanished,
        update_changed,
        insert_new,
    }
}

/// Columns without an equality operator (PostgreSQL `json`), compared as text by merges.
async fn json_columns(
    dialect: Dialect,
    conn: &mut AnyConnection,
    table: &TableName,
) -> Result<Vec<String>, BackfillError> {
    if dialect != Dialect::Postgres {
        return Ok(Vec::new());
    }
    let rows = fetch_all(
        conn,
        "SELECT CAST(attname AS text) FROM pg_attribute WHERE attrelid = CAST($1 AS regclass) AND attnum > 0 \
         AND NOT attisdropped AND atttypid = CAST('json' AS regtype)",
        &[table.quoted().into()],
    )
    .await?;
    rows.iter().map(|r| get::<String>(r, 0)).collect()
}

/// Refuses a window whose new keys exist outside it in the target: merging would skip those
/// rows (a row moved between partitions: both partitions belong in the window).
async fn check_no_key_outside_window(
    conn: &mut AnyConnection,
    target: &TableName,
    from: &TableName,
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<(), BackfillError> {
    let key_match = key
        .iter()
        .map(|k| format!("t.{k} = s.{k}", k = k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    let row = fetch_one(
        conn,
        &format!(
            "SELECT count(*) FROM {} AS s WHERE EXISTS (SELECT 1 FROM {} AS t WHERE {key_match} AND NOT coalesce({window_on_t}, false))",
            from.quoted(),
            target.quoted()
        ),
        binds,
    )
    .await?;
    let collisions: i64 = get(&row, 0)?;
    if collisions > 0 {
        return Err(BackfillError::Conflict(format!(
            "{collisions} key(s) of the new window already exist outside it in {target} (rows moved between partitions?): \
             merging would skip them. Nothing was published; include the partitions those rows come from in the window"
        )));
    }
    Ok(())
}

/// Rows written by a window merge.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WindowWrites {
    pub deleted: u64,
    pub updated: u64,
    pub inserted: u64,
}

async fn apply_window_merge(
    conn: &mut AnyConnection,
    merge: &WindowMerge,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<WindowWrites, BackfillError> {
    let deleted = execute(conn, &merge.delete_vanished, binds).await?;
    let updated = execute(conn, &merge.update_changed, binds).await?;
    let inserted = execute(conn, &merge.insert_new, &[]).await?;
    Ok(WindowWrites {
        deleted,
        updated,
        inserted,
    })
}

/// Blocks writers of the target (readers go on, seeing the old rows until commit).
async fn lock_against_writers(
    dialect: Dialect,
    conn: &mut AnyConnection,
    target: &TableName,
) -> Result<(), BackfillError> {
    if dialect == Dialect::Postgres {
        execute(conn, "SELECT set_config('lock_timeout', '30s', true)", &[]).await?;
        execute(
            conn,
            &format!("LOCK TABLE {} IN EXCLUSIVE MODE", target.quoted()),
            &[],
        )
        .await?;
    }
    Ok(())
}

/// Publishes a shadow that holds only the window, in one transaction: copies the target's
/// window rows to the archive, merges the shadow into the window (only changed rows are
/// written), drops the shadow. The table keeps its identity: views, grants, foreign keys,
/// indexes and statistics are untouched. Readers see the old window or the new one.
#[allow(clippy::too_many_arguments)]
pub async fn swap_window(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    key: &[backfill_common::ident::Ident],
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
    retention_days: u32,
    guard: Option<WindowGuard>,
) -> Result<(ArchiveRecord, WindowWrites), BackfillError> {
    let warehouse = &store.warehouse;
    let dialect = warehouse.dialect;
    let archive = archive_name(target, &run.run_id)?;
    let mut tx = warehouse.pool.begin().await?;
    lock_against_writers(dialect, &mut tx, target).await?;
    check_window_guard(warehouse, &mut tx, target, guard.as_ref()).await?;
    let columns = warehouse.table_columns(&mut tx, target).await?;
    copy_window(dialect, &mut tx, target, &archive, window_on_t, binds).await?;
    let old = warehouse.checksum(&mut tx, &archive, None, &[]).await?;
    check_no_key_outside_window(&mut tx, target, shadow, key, window_on_t, binds).await?;
    let json = json_columns(dialect, &mut tx, target).await?;
    let merge = window_merge(dialect, target, shadow, &columns, &json, key, window_on_t);
    let writes = apply_window_merge(&mut tx, &merge, binds).await?;
    execute(&mut tx, &format!("DROP TABLE {}", shadow.quoted()), &[]).await?;
    let record = archive_record(
        &run.run_id,
        &archive,
        target,
        ARCHIVE_WINDOW,
        &old,
        Duration::days(retention_days as i64),
    );
    store.insert_archive(&mut tx, &record).await?;
    record_published(store, &mut tx, &run.run_id, &archive.to_string()).await?;
    store
        .record_event(
            &mut tx,
            &run.run_id,
            None,
            "window_merged",
            &format!(
                "deleted {} updated {} inserted {}",
                writes.deleted, writes.updated, writes.inserted
            ),
        )
        .await?;
    store
        .set_pinned_run_state(&mut tx, run, &PUBLISHABLE, RunState::Published, None)
        .await?;
    tx.commit().await?;
    Ok((record, writes))
}

/// The condition selecting the rows of these partitions (alias `t`) of a partitioned table.
pub fn in_partitions(partitions: &[TableName]) -> String {
    format!(
        "t.tableoid IN ({})",
        partitions
            .iter()
            .map(|p| format!("CAST({} AS regclass)", string_literal(&p.quoted())))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The shadow's partitions, each with the target partition it replaces and its bound.
async fn shadow_partitions(
    conn: &mut AnyConnection,
    shadow: &TableName,
    run_id: &str,
) -> Result<Vec<(TableName, TableName, String)>, BackfillError> {
    let rows = fetch_all(
        conn,
        "SELECT CAST(n.nspname AS text), CAST(c.relname AS text), pg_get_expr(c.relpartbound, c.oid) \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE i.inhparent = CAST($1 AS regclass) ORDER BY 2",
        &[shadow.quoted().into()],
    )
    .await?;
    let suffix = format!("__bfs_{run_id}");
    let mut out = Vec::new();
    for row in &rows {
        let (schema, name, bound): (String, String, String) =
            (get(row, 0)?, get(row, 1)?, get(row, 2)?);
        let replaces = name.strip_suffix(&suffix).ok_or_else(|| {
            BackfillError::Invalid(format!("unexpected partition {schema}.{name} in {shadow}"))
        })?;
        let parse = |n: &str| {
            TableName::parse(&format!("{schema}.{n}"))
                .map_err(|e| BackfillError::Invalid(e.to_string()))
        };
        out.push((parse(&name)?, parse(replaces)?, bound));
    }
    Ok(out)
}

/// Publishes a partitioned shadow (natively partitioned PostgreSQL targets), in one
/// transaction: for each partition the window touches, the target's partition is detached and
/// kept as `<partition>__bf_archive_<run>`, and the shadow's partition (its rows outside the
/// window copied, the window recomputed) is renamed in and attached with the same bounds. The
/// other partitions, the parent, its views and grants are untouched.
pub async fn swap_partitions(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    shadow: &TableName,
    retention_days: u32,
    outside: Option<OutsideGuard>,
    window: Option<WindowGuard>,
) -> Result<Vec<ArchiveRecord>, BackfillError> {
    let warehouse = &store.warehouse;
    let mut tx = warehouse.pool.begin().await?;
    execute(
        &mut tx,
        "SELECT set_config('lock_timeout', '30s', true)",
        &[],
    )
    .await?;
    // Writers wait from here; readers go on until the first DETACH, which holds the parent
    // exclusively until commit (renames and attaches only: the new partitions carry CHECK
    // constraints equal to their bounds, so attaching them scans nothing).
    execute(
        &mut tx,
        &format!("LOCK TABLE {} IN SHARE MODE", target.quoted()),
        &[],
    )
    .await?;
    check_window_guard(warehouse, &mut tx, target, window.as_ref()).await?;
    let pairs = shadow_partitions(&mut tx, shadow, &run.run_id).await?;
    if pairs.is_empty() {
        return Err(BackfillError::Invalid(format!(
            "{shadow} has no partitions to publish"
        )));
    }
    let replaced: Vec<TableName> = pairs.iter().map(|(_, old, _)| old.clone()).collect();
    if let Some(guard) = &outside {
        let filter = format!("{} AND {}", in_partitions(&replaced), guard.filter);
        let now = warehouse
            .checksum_like(
                &mut tx,
                target,
                Some(&filter),
                &guard.binds,
                &guard.expected,
            )
            .await?;
        if now.to_string() != guard.expected {
            return Err(BackfillError::Conflict(format!(
                "the partitions {} of {target} changed outside the window since the shadow was built ({} then, {now} now): \
                 publishing would discard those writes. Nothing was published; abandon this run and run again",
                replaced
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                guard.expected
            )));
        }
    }
    let mut records = Vec::new();
    // Everything that reads whole partitions happens before the first DETACH, which locks
    // the parent against readers until commit.
    let mut old_checksums = Vec::new();
    for (_, old_partition, _) in &pairs {
        old_checksums.push(
            warehouse
                .checksum(&mut tx, old_partition, None, &[])
                .await?,
        );
    }
    for ((new_partition, old_partition, bound), old) in pairs.iter().zip(old_checksums) {
        let archive = archive_name(old_partition, &run.run_id)?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                shadow.quoted(),
                new_partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                target.quoted(),
                old_partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                old_partition.quoted(),
                archive.name.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                new_partition.quoted(),
                old_partition.name.quoted()
            ),
            &[],
        )
        .await?;
        hand_over_index_names(
            &mut tx,
            &archive,
            old_partition,
            &archive_suffix(&run.run_id),
            |_| true,
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} ATTACH PARTITION {} {bound}",
                target.quoted(),
                old_partition.quoted()
            ),
            &[],
        )
        .await?;
        // The shadow partition's copy of the bound (it made ATTACH skip its scan).
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                old_partition.quoted(),
                crate::shadow::BOUND_CHECK
            ),
            &[],
        )
        .await?;
        let record = archive_record(
            &run.run_id,
            &archive,
            old_partition,
            ARCHIVE_PARTITION,
            &old,
            Duration::days(retention_days as i64),
        );
        store.insert_archive(&mut tx, &record).await?;
        records.push(record);
    }
    execute(&mut tx, &format!("DROP TABLE {}", shadow.quoted()), &[]).await?;
    record_published(
        store,
        &mut tx,
        &run.run_id,
        &records
            .iter()
            .map(|r| r.archive_table.clone())
            .collect::<Vec<_>>()
            .join(","),
    )
    .await?;
    store
        .set_pinned_run_state(&mut tx, run, &PUBLISHABLE, RunState::Published, None)
        .await?;
    tx.commit().await?;
    Ok(records)
}

/// Puts swap_partitions archives back: each current partition is detached and kept as
/// `<partition>__bf_undone_<run>`, its archive renamed back and attached with the same bounds;
/// every restored partition's checksum must equal the one recorded at publish, or nothing
/// changes.
async fn rollback_partitions(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    archives: &[ArchiveRecord],
) -> Result<RollbackReport, BackfillError> {
    let warehouse = &store.warehouse;
    let mut tx = warehouse.pool.begin().await?;
    execute(
        &mut tx,
        "SELECT set_config('lock_timeout', '30s', true)",
        &[],
    )
    .await?;
    let mut restored_from = Vec::new();
    let mut kept_as = Vec::new();
    let mut checksums = Vec::new();
    for archive in archives {
        let archive_table = TableName::parse(&archive.archive_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        let partition = TableName::parse(&archive.source_table)
            .map_err(|e| BackfillError::Invalid(e.to_string()))?;
        if !warehouse.table_exists(&mut tx, &archive_table).await? {
            return Err(BackfillError::Invalid(format!(
                "the archive table {archive_table} no longer exists"
            )));
        }
        let row = fetch_one(
            &mut tx,
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid \
             WHERE c.oid = CAST($1 AS regclass) AND i.inhparent = CAST($2 AS regclass)",
            &[partition.quoted().into(), target.quoted().into()],
        )
        .await
        .map_err(|e| e.context(format!("{partition} is no longer a partition of {target}")))?;
        let bound: String = get(&row, 0)?;
        let undone = undone_name(&partition, &run.run_id)?;
        let current = warehouse.checksum(&mut tx, &partition, None, &[]).await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} DETACH PARTITION {}",
                target.quoted(),
                partition.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                partition.quoted(),
                undone.name.quoted()
            ),
            &[],
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} RENAME TO {}",
                archive_table.quoted(),
                partition.name.quoted()
            ),
            &[],
        )
        .await?;
        let archived = archive_suffix(&run.run_id);
        hand_over_index_names(
            &mut tx,
            &undone,
            &partition,
            &undone_suffix(&run.run_id),
            |name| name.ends_with(&archived),
        )
        .await?;
        execute(
            &mut tx,
            &format!(
                "ALTER TABLE {} ATTACH PARTITION {} {bound}",
                target.quoted(),
                partition.quoted()
            ),
            &[],
        )
        .await?;
        let restored = warehouse
            .checksum_like(&mut tx, &partition, None, &[], &archive.checksum)
            .await?;
        if restored.to_string() != archive.checksum {
            tx.rollback().await?;
            return Err(BackfillError::Conflict(format!(
                "the archive {archive_table} has checksum {restored} but {} was recorded at publish; nothing was restored",
                archive.checksum
            )));
        }
        record_restore(
            store,
            &mut tx,
            &run.run_id,
            archive,
            &undone,
            &partition,
            &current,
        )
        .await?;
        restored_from.push(archive_table.to_string());
        kept_as.push(undone.to_string());
        checksums.push(restored.to_string());
    }
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &[RunState::Published],
            RunState::RolledBack,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(RollbackReport {
        run_id: run.run_id.clone(),
        target: target.to_string(),
        restored_from: restored_from.join(", "),
        kept_as: kept_as.join(", "),
        checksum: checksums.join(", "),
    })
}

/// Copies the target's window rows (alias `t`) into the new plain table `into`: the archive of
/// a window publish, or the backfilled rows a window rollback keeps.
async fn copy_window(
    dialect: Dialect,
    conn: &mut AnyConnection,
    target: &TableName,
    into: &TableName,
    window_on_t: &str,
    binds: &[backfill_common::warehouse::Bind],
) -> Result<(), BackfillError> {
    let create = match dialect {
        Dialect::Postgres => format!("CREATE TABLE {} (LIKE {})", into.quoted(), target.quoted()),
        Dialect::Sqlite => format!(
            "CREATE TABLE {} AS SELECT * FROM {} WHERE 1 = 0",
            into.quoted(),
            target.quoted()
        ),
    };
    execute(conn, &create, &[]).await?;
    execute(
        conn,
        &format!(
            "INSERT INTO {} SELECT * FROM {} AS t WHERE {window_on_t}",
            into.quoted(),
            target.quoted()
        ),
        binds,
    )
    .await?;
    Ok(())
}

/// Notes on the run where its old version went and when it was published.
async fn record_published(
    store: &ControlStore,
    conn: &mut AnyConnection,
    run_id: &str,
    archive: &str,
) -> Result<(), BackfillError> {
    execute(
        conn,
        &format!(
            "UPDATE {} SET archive_table = $2, published_at = $3 WHERE run_id = $1",
            store.table("runs")
        ),
        &[run_id.into(), archive.into(), now_text().into()],
    )
    .await?;
    Ok(())
}

/// The record of an archive: `table` keeps what `source` held (`checksum`) for `retention`.
fn archive_record(
    run_id: &str,
    table: &TableName,
    source: &TableName,
    kind: &str,
    checksum: &Checksum,
    retention: Duration,
) -> ArchiveRecord {
    ArchiveRecord {
        archive_table: table.to_string(),
        run_id: run_id.to_string(),
        source_table: source.to_string(),
        kind: kind.to_string(),
        row_count: checksum.rows,
        checksum: checksum.to_string(),
        created_at: now_text(),
        expires_at: (Utc::now() + retention).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        restored_at: None,
        dropped_at: None,
    }
}

/// Marks `archive` restored and records what the restore replaced (`undone`, holding
/// `current`), kept as long as the archive itself was to be kept.
async fn record_restore(
    store: &ControlStore,
    conn: &mut AnyConnection,
    run_id: &str,
    archive: &ArchiveRecord,
    undone: &TableName,
    source: &TableName,
    current: &Checksum,
) -> Result<(), BackfillError> {
    store
        .mark_archive(conn, &archive.archive_table, ArchiveMark::Restored)
        .await?;
    let parse =
        |text: &str| chrono::DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc));
    let retention = match (parse(&archive.expires_at), parse(&archive.created_at)) {
        (Ok(expires), Ok(created)) => expires - created,
        _ => Duration::days(30),
    };
    store
        .insert_archive(
            conn,
            &archive_record(run_id, undone, source, "rolled_back", current, retention),
        )
        .await
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RollbackReport {
    pub run_id: String,
    pub target: String,
    pub restored_from: String,
    pub kept_as: String,
    pub checksum: String,
}

/// Swaps the archive of `run` back in, keeping the backfilled table as `__bf_undone_<run>`
/// (same retention), and proves the restored table's checksum equals the one recorded at
/// publish; on a mismatch nothing changes.
pub async fn rollback(store: &ControlStore, run_id: &str) -> Result<RollbackReport, BackfillError> {
    let run = store.find_run(run_id).await?.ok_or_else(|| {
        BackfillError::Invalid(format!("no run `{run_id}` in this control store"))
    })?;
    if run.state != RunState::Published {
        return Err(BackfillError::Conflict(format!(
            "run {run_id} is {}; only a published run can be rolled back",
            run.state.as_str()
        )));
    }
    let target =
        TableName::parse(&run.target).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let runs = store.runs_for_target(&run.target).await?;
    if let Some(open) = runs.iter().find(|r| r.state.is_open()) {
        return Err(BackfillError::Conflict(format!(
            "run {} on {} is {} and its shadow was built from the current table; rolling back now would be undone when it publishes. \
             Abandon it first (`backfill abandon {}`), then roll back",
            open.run_id,
            run.target,
            open.state.as_str(),
            open.run_id
        )));
    }
    let later = runs
        .into_iter()
        .find(|r| r.state == RunState::Published && r.published_at > run.published_at);
    if let Some(later) = later {
        return Err(BackfillError::Conflict(format!(
            "run {} published {} after run {run_id}; roll that one back first",
            later.run_id, run.target
        )));
    }
    let archives: Vec<ArchiveRecord> = store
        .archives()
        .await?
        .into_iter()
        .filter(|a| {
            a.run_id == run.run_id
                && [ARCHIVE_TABLE, ARCHIVE_WINDOW, ARCHIVE_PARTITION].contains(&a.kind.as_str())
        })
        .collect();
    if let Some(dropped) = archives.iter().find(|a| a.dropped_at.is_some()) {
        return Err(BackfillError::Conflict(format!(
            "the archive {} of run {run_id} was dropped by gc on {}; it cannot be restored",
            dropped.archive_table,
            dropped.dropped_at.clone().unwrap_or_default()
        )));
    }
    if !archives.is_empty() && archives.iter().all(|a| a.kind == ARCHIVE_PARTITION) {
        return rollback_partitions(store, &run, &target, &archives).await;
    }
    let archive = archives
        .into_iter()
        .next()
        .ok_or_else(|| BackfillError::Invalid(format!("run {run_id} has no archive record")))?;
    if archive.dropped_at.is_some() {
        return Err(BackfillError::Conflict(format!(
            "the archive {} of run {run_id} was dropped by gc on {}; it cannot be restored",
            archive.archive_table,
            archive.dropped_at.unwrap_or_default()
        )));
    }
    let archive_table = TableName::parse(&archive.archive_table)
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let undone = undone_name(&target, run_id)?;
    if archive.kind == ARCHIVE_WINDOW {
        return rollback_window(store, &run, &target, &archive, &archive_table, &undone).await;
    }
    let warehouse = &store.warehouse;
    let dialect = warehouse.dialect;
    let mut conn = warehouse.acquire().await?;
    if dialect == Dialect::Sqlite {
        set_sqlite_legacy_alter(&mut conn, true).await?;
    }
    let result = async {
        let mut tx = conn.begin().await?;
        if dialect == Dialect::Postgres {
            execute(&mut tx, "SELECT set_config('lock_timeout', '30s', true)", &[]).await?;
        }
        if !warehouse.table_exists(&mut tx, &archive_table).await? {
            return Err(BackfillError::Invalid(format!("the archive table {archive_table} no longer exists")));
        }
        let dependents = match dialect {
            Dialect::Postgres => Some(read_dependents(&mut tx, &target).await?),
            Dialect::Sqlite => None,
        };
        let current = warehouse.checksum(&mut tx, &target, None, &[]).await?;
        rename(&mut tx, &target, &undone).await?;
        rename(&mut tx, &archive_table, &target).await?;
        if let Some(dependents) = &dependents {
            restore_dependents(&mut tx, &target, dependents, false).await?;
            let archived = archive_suffix(&run.run_id);
            hand_over_index_names(&mut tx, &undone, &target, &undone_suffix(&run.run_id), |name| name.ends_with(&archived)).await?;
        }
        let restored: Checksum = warehouse
            .checksum_like(&mut tx, &target, None, &[], &archive.checksum)
            .await?;
        if restored.to_string() != archive.checksum {
            tx.rollback().await?;
            return Err(BackfillError::Conflict(format!(
                "the archive {archive_table} has checksum {restored} but {} was recorded at publish; it changed since, so nothing was restored",
                archive.checksum
            )));
        }
        record_restore(store, &mut tx, &run.run_id, &archive, &undone, &target, &current).await?;
        store.set_run_state(&mut tx, &run.run_id, &[RunState::Published], RunState::RolledBack, None).await?;
        tx.commit().await?;
        Ok(RollbackReport {
            run_id: run.run_id.clone(),
            target: target.to_string(),
            restored_from: archive_table.to_string(),
            kept_as: undone.to_string(),
            checksum: restored.to_string(),
        })
    }
    .await;
    if dialect == Dialect::Sqlite {
        set_sqlite_legacy_alter(&mut conn, false).await?;
    }
    result
}

/// Puts a `swap_window` archive back: the window's current rows are kept as
/// `__bf_undone_<run>`, then the window is merged from the archive and its checksum must equal
/// the one recorded at publish, or nothing changes.
async fn rollback_window(
    store: &ControlStore,
    run: &RunRecord,
    target: &TableName,
    archive: &ArchiveRecord,
    archive_table: &TableName,
    undone: &TableName,
) -> Result<RollbackReport, BackfillError> {
    let warehouse = &store.warehouse;
    let dialect = warehouse.dialect;
    let text = store.spec_source(&run.spec_hash).await?.ok_or_else(|| {
        BackfillError::Invalid(format!(
            "the spec of run {} is missing from the control store",
            run.run_id
        ))
    })?;
    let spec = backfill_common::spec::Spec::parse(&text).map_err(|e| {
        BackfillError::Invalid(format!(
            "the stored spec of run {} no longer parses: {e}",
            run.run_id
        ))
    })?;
    let (window, binds) = crate::window::window_condition(
        dialect,
        spec.partition.grain,
        &spec.partition.column,
        "t",
        &spec.planned_partitions(),
        1,
    );
    let mut tx = warehouse.pool.begin().await?;
    lock_against_writers(dialect, &mut tx, target).await?;
    if !warehouse.table_exists(&mut tx, archive_table).await? {
        return Err(BackfillError::Invalid(format!(
            "the archive table {archive_table} no longer exists"
        )));
    }
    copy_window(dialect, &mut tx, target, undone, &window, &binds).await?;
    let current = warehouse.checksum(&mut tx, undone, None, &[]).await?;
    let columns = warehouse.table_columns(&mut tx, target).await?;
    let json = json_columns(dialect, &mut tx, target).await?;
    let merge = window_merge(
        dialect,
        target,
        archive_table,
        &columns,
        &json,
        &spec.target.key,
        &window,
    );
    apply_window_merge(&mut tx, &merge, &binds).await?;
    let restored = warehouse
        .checksum_like(&mut tx, target, Some(&window), &binds, &archive.checksum)
        .await?;
    if restored.to_string() != archive.checksum {
        tx.rollback().await?;
        return Err(BackfillError::Conflict(format!(
            "restoring {archive_table} gives the window checksum {restored} but {} was recorded at publish; nothing was restored",
            archive.checksum
        )));
    }
    record_restore(
        store,
        &mut tx,
        &run.run_id,
        archive,
        undone,
        target,
        &current,
    )
    .await?;
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &[RunState::Published],
            RunState::RolledBack,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(RollbackReport {
        run_id: run.run_id.clone(),
        target: target.to_string(),
        restored_from: archive_table.to_string(),
        kept_as: undone.to_string(),
        checksum: restored.to_string(),
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GcReport {
    pub dropped: Vec<String>,
    pub kept: usize,
    /// Expired archives that could not be dropped, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Drops archives whose retention has passed. An archive that was renamed back into place by
/// a rollback (swap_table, swap_partitions) is the live table again and never dropped; a
/// swap_window archive is only copied from, so it expires like any other. An archive that
/// cannot be dropped (e.g. a view still reads it) is reported and the others still go.
/// `dry_run` only lists them.
pub async fn gc(
    store: &ControlStore,
    now: chrono::DateTime<Utc>,
    dry_run: bool,
) -> Result<GcReport, BackfillError> {
    let mut dropped = Vec::new();
    let mut failed = Vec::new();
    let mut kept = 0;
    for archive in store.archives().await? {
        let live_again = archive.restored_at.is_some() && archive.kind != ARCHIVE_WINDOW;
        if archive.dropped_at.is_some() || live_again {
            continue;
        }
        let expired = chrono::DateTime::parse_from_rfc3339(&archive.expires_at)
            .map(|e| e.with_timezone(&Utc) <= now)
            .unwrap_or(false);
        if !expired {
            kept += 1;
            continue;
        }
        if !dry_run && let Err(error) = drop_archive(store, &archive).await {
            failed.push((archive.archive_table, error.to_string()));
            continue;
        }
        dropped.push(archive.archive_table);
    }
    Ok(GcReport {
        dropped,
        kept,
        failed,
    })
}

async fn drop_archive(store: &ControlStore, archive: &ArchiveRecord) -> Result<(), BackfillError> {
    let table = TableName::parse(&archive.archive_table)
        .map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let mut tx = store.warehouse.pool.begin().await?;
    execute(
        &mut tx,
        &format!("DROP TABLE IF EXISTS {}", table.quoted()),
        &[],
    )
    .await?;
    store
        .mark_archive(&mut tx, &archive.archive_table, ArchiveMark::Dropped)
        .await?;
    store
        .record_event(
            &mut tx,
            &archive.run_id,
            None,
            "archive_dropped",
            &archive.archive_table,
        )
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Drops the shadow of a run that will never publish.
pub async fn drop_shadow(store: &ControlStore, run: &RunRecord) -> Result<(), BackfillError> {
    let shadow =
        TableName::parse(&run.shadow_table).map_err(|e| BackfillError::Invalid(e.to_string()))?;
    let mut tx = store.warehouse.pool.begin().await?;
    execute(
        &mut tx,
        &format!("DROP TABLE IF EXISTS {}", shadow.quoted()),
        &[],
    )
    .await?;
    store
        .set_run_state(
            &mut tx,
            &run.run_id,
            &OPEN_STATES,
            RunState::Abandoned,
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stepped_aside_name_fits_postgres_and_keeps_the_suffix() {
        let first = |name: &str, suffix: &str| stepped_aside_names(name, suffix).next().unwrap();
        assert_eq!(
            first("orders_pkey", "__bf_archive_ab12cd34"),
            "orders_pkey__bf_archive_ab12cd34"
        );
        let long = "x".repeat(63);
        let names: Vec<String> = stepped_aside_names(&long, "__bf_archive_ab12cd34")
            .take(3)
            .collect();
        assert_eq!(names.len(), 3);
        for (n, name) in names.iter().enumerate() {
            assert_eq!(name.len(), 63);
            assert!(
                name.ends_with(&format!("_{}__bf_archive_ab12cd34", n + 1)),
                "{name}"
            );
        }
        // never cut inside a character
        let accented = "é".repeat(31);
        let aside = first(&accented, "__bf_undone_ab12cd34");
        assert!(
            aside.len() <= 63 && aside.ends_with("_1__bf_undone_ab12cd34"),
            "{aside}"
        );
        assert!(aside.starts_with("éé"));
        // a short name that fits is tried first, then numbered ones
        let mut short = stepped_aside_names("a", "_s");
        assert_eq!(short.next().unwrap(), "a_s");
        assert_eq!(short.next().unwrap(), "a_1_s");
    }
}
