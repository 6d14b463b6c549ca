//! Typed errors that know whether retrying can help. Retrying code asks `retry()` instead of
//! matching message strings; what a database error code means is each engine's to say
//! (`Engine::classify`).

use std::fmt;

use crate::engine::ErrorClass;

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
        /// What the engine's error code means (transient, a unique violation, …).
        class: ErrorClass,
        sqlstate: Option<String>,
    },
    #[error("partition {partition} timed out after {seconds:.1}s")]
    Timeout { partition: String, seconds: f64 },
    #[error("partition check failed for {partition}: {message}")]
    PartitionCheck { partition: String, message: String },
    #[error("{0}")]
    Conflict(String),
    /// A manual approval no longer holds: the target's window changed since the audits
    /// compared against it. The run goes back to auditing.
    #[error("{0}")]
    ApprovalLapsed(String),
    #[error("{0}")]
    Invalid(String),
    /// A publish or rollback could not take its locks within `publish.lock_wait`: other
    /// sessions held the table. Nothing changed; the same command later goes on.
    #[error("{0}")]
    LockWait(String),
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
            BackfillError::Warehouse {
                class: ErrorClass::Transient,
                ..
            } => Retry::Transient,
            BackfillError::Timeout { .. } => Retry::Transient,
            BackfillError::Semaphore(_) | BackfillError::Queue(_) => Retry::Transient,
            BackfillError::LockWait(_) => Retry::Transient,
            _ => Retry::Permanent,
        }
    }

    /// A unique index or key refused a row (duplicate keys), on any engine.
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            BackfillError::Warehouse {
                class: ErrorClass::UniqueViolation,
                ..
            }
        )
    }

    /// An exclusion constraint refused a row.
    pub fn is_exclusion_violation(&self) -> bool {
        matches!(
            self,
            BackfillError::Warehouse {
                class: ErrorClass::ExclusionViolation,
                ..
            }
        )
    }

    /// The SQLSTATE (or the engine's error number) of a warehouse error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            BackfillError::Warehouse { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    pub fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }

    /// A warehouse error that retrying cannot fix, raised by our own reading of its answer
    /// (a row missing, a value of an unexpected type).
    pub fn warehouse_permanent(message: impl Into<String>) -> Self {
        BackfillError::Warehouse {
            context: Context(None),
            message: message.into(),
            class: ErrorClass::Permanent,
            sqlstate: None,
        }
    }

    /// Adds " while <what>" to a warehouse error; other errors pass through unchanged.
    pub fn context(self, what: impl Into<String>) -> Self {
        match self {
            BackfillError::Warehouse {
                message,
                class,
                sqlstate,
                ..
            } => BackfillError::Warehouse {
                context: Context(Some(what.into())),
                message,
                class,
                sqlstate,
            },
            other => other,
        }
    }
}

impl From<sqlx::Error> for BackfillError {
    fn from(error: sqlx::Error) -> Self {
        let (class, sqlstate) = crate::engine::session::classify_sqlx_error(&error);
        BackfillError::Warehouse {
            context: Context(None),
            message: crate::warehouse::redact_secrets(&database_message(&error)),
            class,
            sqlstate,
        }
    }
}

/// What the database said, as its own client would print it: the message, then PostgreSQL's
/// DETAIL and HINT lines, which say which row or what to do (sqlx's text drops them and adds
/// the server's own source line, `at line 948`, which means nothing to a user).
fn database_message(error: &sqlx::Error) -> String {
    let sqlx::Error::Database(db) = error else {
        return error.to_string();
    };
    let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return format!("error returned from database: {db}");
    };
    let mut text = format!("error returned from database: {}", pg.message());
    if let Some(detail) = pg.detail() {
        text.push_str(&format!("\nDETAIL: {detail}"));
    }
    if let Some(hint) = pg.hint() {
        text.push_str(&format!("\nHINT: {hint}"));
    }
    text
}
