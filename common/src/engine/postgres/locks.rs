//! Taking the locks a publish needs without ever failing a reader's or a writer's query.
//!
//! A dashboard's query on a view locks the view, then the table. A publish that held the
//! table and then waited for the view would close a circle with it, and PostgreSQL's
//! deadlock detector, which runs in whichever of the two has waited `deadlock_timeout`,
//! would cancel one of them, often the reader. So a publish takes its locks in the order
//! readers do (views before the table, see `swap`), and waits for each set of locks in
//! short attempts inside a savepoint: an attempt ends (`lock_timeout`) well before
//! `deadlock_timeout`, so when the publish is the one closing a circle it gives way first,
//! and when a reader would close it the publish was waiting longer and gives way first too.
//! A failed attempt rolls back to the savepoint, which releases what it took and keeps what
//! the transaction held before (the writers' lock under which the guard checksummed). Then a
//! pause, and another attempt, until the budget is spent; then the publish stops, nothing
//! changed, naming the sessions in the way.

use std::time::{Duration, Instant};

use super::codes::LOCK_NOT_AVAILABLE;
use crate::error::BackfillError;
use crate::ident::TableName;
use crate::warehouse::{Bind, Session, execute, fetch_all, fetch_one, get};

/// A lock to take: a table or view, and the mode (`ACCESS EXCLUSIVE`, `SHARE`, …).
pub(super) struct Lock {
    /// The relation's quoted, schema-qualified name.
    pub relation: String,
    pub mode: &'static str,
}

/// The longest one attempt waits: far below the usual `deadlock_timeout` (1 s).
const LONGEST_ATTEMPT: Duration = Duration::from_millis(250);
/// The pause after a failed attempt doubles from this up to `LONGEST_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// Takes `locks` in order, in attempts bounded below the server's `deadlock_timeout`, for at
/// most `budget` in all; see the module's text. On success the locks are held until the
/// transaction ends and `lock_timeout` is as it was.
pub(super) async fn lock_patiently(
    tx: &mut dyn Session,
    locks: &[Lock],
    budget: Duration,
) -> Result<(), BackfillError> {
    if locks.is_empty() {
        return Ok(());
    }
    let row = fetch_one(
        tx,
        "SELECT CAST(current_setting('lock_timeout') AS text), \
         CAST((SELECT setting FROM pg_catalog.pg_settings WHERE name = 'deadlock_timeout') AS bigint)",
        &[],
    )
    .await?;
    let (previous, deadlock_ms): (String, i64) = (get(&row, 0)?, get(&row, 1)?);
    let attempt = Duration::from_millis((deadlock_ms.max(4) / 4) as u64).min(LONGEST_ATTEMPT);
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        execute(tx, "SAVEPOINT bf_lock_attempt", &[]).await?;
        execute(
            tx,
            "SELECT set_config('lock_timeout', $1, true)",
            &[Bind::Text(format!("{}ms", attempt.as_millis().max(1)))],
        )
        .await?;
        let mut outcome = Ok(());
        for lock in locks {
            outcome = execute(
                tx,
                &format!("LOCK TABLE {} IN {} MODE", lock.relation, lock.mode),
                &[],
            )
            .await
            .map(|_| ());
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            Ok(()) => {
                execute(tx, "RELEASE SAVEPOINT bf_lock_attempt", &[]).await?;
                execute(
                    tx,
                    "SELECT set_config('lock_timeout', $1, true)",
                    &[Bind::Text(previous)],
                )
                .await?;
                if attempts > 1 {
                    tracing::info!(
                        attempts,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "took the publish's locks after giving way to other sessions"
                    );
                }
                return Ok(());
            }
            Err(error) if error.sqlstate() == Some(LOCK_NOT_AVAILABLE) => {
                execute(tx, "ROLLBACK TO SAVEPOINT bf_lock_attempt", &[]).await?;
                if started.elapsed() >= budget {
                    let holders = holders(tx, locks).await.unwrap_or_default();
                    return Err(BackfillError::LockWait(format!(
                        "could not lock {} within {:.0?} ({attempts} attempts, each giving way to readers and writers before theirs could fail): \
                         other sessions held it{holders}. Nothing changed; run the same command again when they are done, \
                         or raise publish.lock_wait",
                        locks
                            .iter()
                            .map(|l| l.relation.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        budget,
                    )));
                }
                // Jitter, so two publishes that gave way together do not retry together.
                let spread = pause.as_millis() as u64 / 2 + 1;
                let jitter =
                    Duration::from_millis((uuid::Uuid::new_v4().as_u128() % spread as u128) as u64);
                tokio::time::sleep((pause + jitter).min(budget.saturating_sub(started.elapsed())))
                    .await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            Err(error) => return Err(error),
        }
    }
}

/// The sessions holding locks on `locks`' relations, as text for an error message.
async fn holders(tx: &mut dyn Session, locks: &[Lock]) -> Result<String, BackfillError> {
    let relations: Vec<String> = locks.iter().map(|l| l.relation.clone()).collect();
    let rows = fetch_all(
        tx,
        "SELECT DISTINCT CAST(a.pid AS bigint), CAST(coalesce(a.usename, '') AS text), CAST(coalesce(a.state, '') AS text), \
         CAST(coalesce(left(a.query, 80), '') AS text) \
         FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
         WHERE l.granted AND a.pid <> pg_backend_pid() \
         AND l.relation IN (SELECT CAST(CAST(r AS regclass) AS oid) FROM unnest(CAST($1 AS text[])) AS r) \
         ORDER BY 1 LIMIT 5",
        &[Bind::Text(format!(
            "{{{}}}",
            relations
                .iter()
                .map(|r| format!("\"{}\"", r.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(",")
        ))],
    )
    .await?;
    let mut text = String::new();
    for row in &rows {
        let (pid, user, state, query): (i64, String, String, String) =
            (get(row, 0)?, get(row, 1)?, get(row, 2)?, get(row, 3)?);
        text.push_str(&format!("\n  pid {pid} ({user}, {state}): {query}"));
    }
    if !text.is_empty() {
        text.insert(0, ':');
    }
    Ok(text)
}

/// The locks that hold `table` against writers (readers go on).
pub(super) fn against_writers(table: &TableName, mode: &'static str) -> Vec<Lock> {
    vec![Lock {
        relation: table.quoted(),
        mode,
    }]
}
