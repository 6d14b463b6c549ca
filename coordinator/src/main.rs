use clap::Parser;

fn main() {
    let cli = backfill_coordinator::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKFILL_LOG")
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(backfill_coordinator::cli::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "error: {}",
                backfill_common::warehouse::redact_secrets(&format!("{e:#}"))
            );
            if e.chain().any(|c| {
                c.downcast_ref::<backfill_common::spec::SpecError>()
                    .is_some()
            }) {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}
