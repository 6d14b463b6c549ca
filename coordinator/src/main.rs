use clap::Parser;

fn main() {
    let cli = backfill_coordinator::cli::Cli::parse();
    backfill_common::telemetry::init_logging("warn");
    let runtime = backfill_common::telemetry::runtime_or_exit();
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
