//! Process set-up shared by both binaries: logs to stderr, filtered by `BACKFILL_LOG`
//! (tracing's env-filter syntax), and the async runtime.

/// Logs to stderr at `default` unless `BACKFILL_LOG` says otherwise. sqlx's own per-statement
/// logging stays at `error` by default: its slow-statement warnings fire on every partition.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKFILL_LOG")
                .unwrap_or_else(|_| format!("{default},sqlx=error").into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The multi-threaded runtime, or exit 1 with the reason.
pub fn runtime_or_exit() -> tokio::runtime::Runtime {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}
