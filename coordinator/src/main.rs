use clap::Parser;

use backfill_common::telemetry::{self, LogFormat};

/// `backfill status <run> | head`: once the reader has gone, printing fails; end quietly as
/// Unix tools do (exit 141, as if killed by SIGPIPE), not with a panic and a stack trace.
fn exit_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    exit_quietly_when_stdout_closes();
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
            backfill_coordinator::cli::exit_code_of(&e)
        }
    };
    telemetry.shutdown();
    std::process::exit(code);
}
