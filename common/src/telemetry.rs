//! Process set-up shared by both binaries: logs (text or JSON lines on stderr, filtered by
//! `BACKFILL_LOG`), traces exported over OTLP when the standard `OTEL_*` variables ask for it,
//! the W3C trace context carried with each task, and the async runtime.
//!
//! Tracing is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off again. The
//! protocol comes from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`grpc` or `http/protobuf`); when neither is set, an endpoint on port 4317 (the OTLP gRPC
//! port) means gRPC and anything else HTTP, the specification's default.
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the process in the trace.
//! The exporter's own errors (no collector there) are not logged unless `BACKFILL_LOG` asks
//! for the `opentelemetry` targets: a missing collector must not flood a worker's log.

use std::collections::HashMap;
use std::str::FromStr;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Targets silenced by default: sqlx's per-statement logging (its slow-statement warnings fire
/// on every partition) and the OpenTelemetry exporter's connection errors.
/// `lapin::channels` logs an ERROR for every channel still open when a connection is closed,
/// ours included, at the end of a successful run; broker failures reach us as errors of the
/// operations that hit them, with context.
const QUIET_TARGETS: &str = "lapin::channels=off,sqlx=error,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,opentelemetry_http=off,tonic=off,h2=off,hyper=off,reqwest=off";

/// The crates whose spans make up a backfill's trace.
const TRACED_CRATES: [&str; 3] = ["backfill_common", "backfill_worker", "backfill_coordinator"];

/// How log lines look on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one readable line per event.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line, the current span's fields included.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}`: use text or json")),
        }
    }
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The log format `init` set up (text before it): whoever writes to stderr outside the log,
/// like a progress display, must keep JSON logs parseable.
pub fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// Keeps the trace exporter alive; `shutdown` flushes the spans still buffered.
#[must_use = "call shutdown() before the process exits, or buffered spans are lost"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn tracing_enabled(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Exports the spans still buffered (bounded by the exporter's timeout). Call it outside
    /// the async runtime but while the runtime still exists: the gRPC exporter runs on it.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            let _ = provider.shutdown();
        }
    }
}

/// Sets up logging and, when configured, trace export for the process named `service`
/// (unless `OTEL_SERVICE_NAME` names it). `default_filter` applies when `BACKFILL_LOG` is not
/// set. Call it inside the runtime's context (`runtime.enter()`): the gRPC exporter needs it.
/// A broken tracing configuration is reported on stderr and tracing stays off: a backfill
/// never fails because its traces cannot be sent.
pub fn init(service: &str, default_filter: &str, format: LogFormat) -> Telemetry {
    let _ = LOG_FORMAT.set(format);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKFILL_LOG")
        .unwrap_or_else(|_| format!("{default_filter},{QUIET_TARGETS}").into());
    let log_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour_on_stderr())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (tracer_provider, problem) = match tracer_provider(service) {
        Ok(provider) => (provider, None),
        Err(problem) => (None, Some(problem)),
    };
    let trace_layer = tracer_provider.as_ref().map(|provider| {
        let traced = TRACED_CRATES.iter().fold(
            tracing_subscriber::filter::Targets::new(),
            |targets, name| targets.with_target(*name, tracing::Level::INFO),
        );
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("backfill"))
            .with_location(false)
            .with_threads(false)
            .with_filter(traced)
    });
    tracing_subscriber::registry()
        .with(log_layer.with_filter(filter))
        .with(trace_layer)
        .init();
    if let Some(problem) = problem {
        tracing::warn!("tracing is off: {problem}");
    }
    Telemetry { tracer_provider }
}

/// Logs only, no trace export: for tests and tools.
pub fn init_logging(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BACKFILL_LOG")
                .unwrap_or_else(|_| format!("{default_filter},{QUIET_TARGETS}").into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .try_init();
}

/// Colour only for a person at a terminal: never into a file or a pipe, never with
/// `NO_COLOR` set (https://no-color.org).
pub fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && !env_set("NO_COLOR")
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|value| !value.trim().is_empty())
}

/// What the `OTEL_*` variables ask for: None when tracing is off.
fn tracer_provider(service: &str) -> Result<Option<SdkTracerProvider>, String> {
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    let protocol = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()));
    let grpc = match protocol.as_deref().map(str::trim) {
        Some("grpc") => true,
        Some("http/protobuf") => false,
        Some(other) => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL `{other}` is not supported: use grpc or http/protobuf"
            ));
        }
        None => url::Url::parse(&endpoint).is_ok_and(|url| url.port() == Some(4317)),
    };
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = if grpc {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
    }
    .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named_by_env = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named_by_env {
        resource = resource.with_service_name(service.to_string());
    }
    resource = resource.with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// The W3C trace context (`traceparent`, `tracestate`) of the current span, to send along with
/// a task. Empty when tracing is off.
pub fn current_trace_context() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MapCarrier(&mut carrier));
    carrier
}

/// Makes `span` a child of the span that sent `carrier` (a task's trace context). Nothing
/// happens when the carrier holds no valid context: the span starts its own trace.
pub fn set_remote_parent(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let mut carrier = carrier.clone();
    let context = TraceContextPropagator::new().extract(&MapCarrier(&mut carrier));
    let _ = span.set_parent(context);
}

/// Marks `span` as failed with `message` (which must already be free of secrets).
pub fn record_error(span: &tracing::Span, message: &str) {
    span.set_status(opentelemetry::trace::Status::error(message.to_string()));
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for MapCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_name_the_valid_ones() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse::<LogFormat>(), Ok(LogFormat::Text));
        let error = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(error.contains("text or json"), "{error}");
    }

    #[test]
    fn a_carrier_without_context_leaves_the_span_alone() {
        // No subscriber: the span is disabled; neither call may panic.
        let span = tracing::info_span!("x");
        set_remote_parent(&span, &HashMap::new());
        let mut forged = HashMap::new();
        forged.insert("traceparent".to_string(), "not-a-traceparent".to_string());
        set_remote_parent(&span, &forged);
        assert!(current_trace_context().is_empty());
    }
}
