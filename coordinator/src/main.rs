use clap::Parser;

use backfill_common::telemetry::{self, LogFormat};

fn main() {
    let cli = backfill_coordinator::cli::Cli::parse();
    let runtime = telemetry::runtime_or_exit();
    let format: LogFormat = cli.log_format.parse().unwrap_or_default();
    // People at a terminal see warnings (progress has its own display); log pipelines (JSON)
    // get every state change.
    let default_filter = match format {
        LogFormat::Text => "warn",
        LogFormat::Json => "info",
    };
    let telemetry = {
        let _context = runtime.enter();
        telemetry::init("backfill-coordinator", default_filter, format)
    };
    let result = runtime.block_on(backfill_coordinator::cli::execute(cli));
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let message = backfill_common::warehouse::redact_secrets(&format!("{e:#}"));
            match format {
                LogFormat::Json => tracing::error!(error = %message, "backfill failed"),
                LogFormat::Text => eprintln!("error: {message}"),
            }
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
    telemetry.shutdown();
    std::process::exit(code);
}
