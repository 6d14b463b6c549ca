//! Typed errors that know whether retrying can help. Retrying code asks `retry()` instead of
//! matching message strings.

use std::fmt;

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Connection loss, serialization failure, deadlock, lock or statement timeout: the same
    /// work may succeed if tried again after a pause.
    Transient,
    /// Bad SQL, failed check, constraint violation: trying again gives the same answer.
    Permanent,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("invalid spec: {0}")]
    Spec(#[from] crate::spec::SpecError),
    #[error("warehouse error{context}: {message}")]
    Warehouse {
        context: Context,
        message: String,
        retry: Retry,
        sqlstate: Option<String>,
    },
    #[error("partition {partition} timed out after {seconds:.1}s")]
    Timeout { partition: String, seconds: f64 },
    #[error("partition check failed for {partition}: {message}")]
    PartitionCheck { partition: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("semaphore: {0}")]
    Semaphore(String),
    #[error("queue: {0}")]
    Queue(String),
}

/// Optional " while doing X" text so warehouse errors say what was being done.
#[derive(Debug, Default, Clone)]
pub struct Context(pub Option<String>);

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(what) => write!(f, " while {what}"),
            None => Ok(()),
        }
    }
}

impl BackfillError {
    pub fn retry(&self) -> Retry {
        match self {
            BackfillError::Warehouse { retry, .. } => *retry,
            BackfillError::Timeout { .. } => Retry::Transient,
            BackfillError::Semaphore(_) | BackfillError::Queue(_) => Retry::Transient,
            _ => Retry::Permanent,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }

    /// Adds " while <what>" to a warehouse error; other errors pass through unchanged.
    pub fn context(self, what: impl Into<String>) -> Self {
        match self {
            BackfillError::Warehouse {
                message,
                retry,
                sqlstate,
                ..
            } => BackfillError::Warehouse {
                context: Context(Some(what.into())),
                message,
                retry,
                sqlstate,
            },
            other => other,
        }
    }
}

impl From<sqlx::Error> for BackfillError {
    fn from(error: sqlx::Error) -> Self {
        let (retry, sqlstate) = classify_sqlx_error(&error);
        BackfillError::Warehouse {
            context: Context(None),
            message: crate::warehouse::redact_secrets(&error.to_string()),
            retry,
            sqlstate,
        }
    }
}

/// Classifies a driver error as transient or permanent.
///
/// PostgreSQL SQLSTATE classes: 08 (connection), 40001 (serialization), 40P01 (deadlock),
/// 55P03 (lock not available), 57014 (statement timeout / cancel), 57P01..57P03 (admin
/// shutdown, crash shutdown, cannot connect now), 53 (insufficient resources).
/// SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6) and their extended codes.
///
/// Each rule applies to its own database only: read as a SQLite code, the all-digit SQLSTATEs
/// 42501 (insufficient privilege), 22021 (character not in repertoire) and 22022 end in the
/// byte of SQLITE_BUSY or SQLITE_LOCKED, and were retried as transient.
pub fn classify_sqlx_error(error: &sqlx::Error) -> (Retry, Option<String>) {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string());
            let postgres = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some();
            let transient = code.as_deref().is_some_and(|c| {
                if postgres {
                    is_transient_sqlstate(c)
                } else {
                    is_transient_sqlite_code(c)
                }
            });
            let retry = if transient {
                Retry::Transient
            } else {
                Retry::Permanent
            };
            (retry, code)
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => (Retry::Transient, None),
        _ => (Retry::Permanent, None),
    }
}

fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03"
        )
}

fn is_transient_sqlite_code(code: &str) -> bool {
    // sqlx reports SQLite's extended result code as a decimal string; the primary code is the
    // low byte.
    code.parse::<i64>()
        .map(|c| matches!(c & 0xff, 5 | 6))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        assert!(is_transient_sqlstate("40001"));
        assert!(is_transient_sqlstate("08006"));
        assert!(is_transient_sqlstate("57014"));
        assert!(is_transient_sqlstate("57P01"));
        assert!(!is_transient_sqlstate("23505"));
        assert!(!is_transient_sqlstate("42P01"));
        assert!(is_transient_sqlite_code("5"));
        assert!(is_transient_sqlite_code("517"));
        assert!(!is_transient_sqlite_code("19"));
        assert!(!is_transient_sqlite_code("2067"));
    }
}
