//! The PostgreSQL table swap: what depends on a table by its OID (views), by ownership and
//! grants, and by name (indexes and the key constraints they back) follows the name across
//! the renames, inside the swap's transaction.

use super::locks::{Lock, lock_patiently};
use crate::engine::{NameFilter, TableSwap, quote_catalog_name};
use crate::error::BackfillError;
use crate::ident::TableName;
use crate::sql::string_literal;
use crate::warehouse::{Session, execute, fetch_all, fetch_one, get, schema_of};

/// `swap.current` → `swap.aside`, `swap.replacement` → `swap.current`, with its dependents.
pub(super) async fn swap_tables(
    conn: &mut dyn Session,
    swap: &TableSwap<'_>,
) -> Result<(), BackfillError> {
    lock_views_then_table(conn, swap.current, swap.lock_wait).await?;
    let dependents = read_dependents(conn, swap.current).await?;
    rename(conn, swap.current, swap.aside).await?;
    rename(conn, swap.replacement, swap.current).await?;
    restore_dependents(conn, swap.current, &dependents, swap.carry_grants).await?;
    hand_over_index_names(
        conn,
        swap.aside,
        swap.current,
        swap.aside_suffix,
        swap.takes_index_names,
    )
    .await
}

/// What must follow the target across a rename.
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

/// The views that read `table` directly (by OID), as quoted qualified names in OID order.
async fn views_on(conn: &mut dyn Session, table: &TableName) -> Result<Vec<String>, BackfillError> {
    let rows = fetch_all(
        conn,
        "SELECT DISTINCT CAST(v.oid AS bigint), CAST(quote_ident(vn.nspname) || '.' || quote_ident(v.relname) AS text) \
         FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid \
         JOIN pg_catalog.pg_class v ON v.oid = r.ev_class JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace \
         WHERE d.classid = CAST('pg_catalog.pg_rewrite' AS regclass) AND d.refobjid = CAST($1 AS regclass) \
         AND v.oid <> CAST($1 AS regclass) ORDER BY 1",
        &[table.quoted().into()],
    )
    .await?;
    rows.iter().map(|row| get::<String>(row, 1)).collect()
}

/// Takes the locks the renames and the views' re-creation need, in the order a reader of a
/// view takes them (the view, then the table it reads), in attempts that give way to
/// readers (`locks::lock_patiently`): a publish that held the table and then waited for a
/// view that a reader held while waiting for the table would deadlock with it. Taken inside
/// a savepoint, so that if a view appeared between the catalog read and the locks (it can't
/// once the table is locked) they are released and taken again with it.
pub(super) async fn lock_views_then_table(
    conn: &mut dyn Session,
    table: &TableName,
    wait: std::time::Duration,
) -> Result<(), BackfillError> {
    let started = std::time::Instant::now();
    loop {
        execute(conn, "SAVEPOINT bf_swap_locks", &[]).await?;
        let views = views_on(conn, table).await?;
        let mut locks: Vec<Lock> = views
            .iter()
            .map(|view| Lock {
                relation: view.clone(),
                mode: "ACCESS EXCLUSIVE",
            })
            .collect();
        locks.push(Lock {
            relation: table.quoted(),
            mode: "ACCESS EXCLUSIVE",
        });
        lock_patiently(conn, &locks, wait.saturating_sub(started.elapsed())).await?;
        if views_on(conn, table).await? == views {
            execute(conn, "RELEASE SAVEPOINT bf_swap_locks", &[]).await?;
            return Ok(());
        }
        execute(conn, "ROLLBACK TO SAVEPOINT bf_swap_locks", &[]).await?;
    }
}

/// Reads what depends on the target (locked by `lock_views_then_table`). Refuses targets
/// whose dependents a rename would strand: materialized views and foreign keys pointing at
/// the target.
async fn read_dependents(
    conn: &mut dyn Session,
    target: &TableName,
) -> Result<Dependents, BackfillError> {
    let target_text = target.quoted();
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
        &[schema_of(target).into(), target.name.as_str().into()],
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
    conn: &mut dyn Session,
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
    conn: &mut dyn Session,
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
    conn: &mut dyn Session,
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
pub(super) async fn hand_over_index_names(
    conn: &mut dyn Session,
    outgoing: &TableName,
    incoming: &TableName,
    suffix: &str,
    takes_names: &NameFilter<'_>,
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
