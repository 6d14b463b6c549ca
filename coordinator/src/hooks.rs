//! Isolation hooks: a command or an HTTP webhook run at fixed points of a run, to pause or pin
//! downstream jobs before writing or publishing, resume them after, and post the maintenance
//! notice. Each hook has a timeout and retries with backoff. A failing `before_write` or
//! `before_publish` hook stops the run before it touches the target; `after_publish` and
//! `on_failure` hooks are reported only (the publish already happened, or the run already
//! failed).
//!
//! Commands run without a shell, with the run's details in `BACKFILL_*` environment variables.
//! Webhooks receive a JSON body with the same details and a Slack-compatible `text`.

use std::time::Duration;

use backfill_common::spec::{Hook, HookAction, HookEvent};
use backfill_common::warehouse::redact_secrets;
use backon::{BackoffBuilder, ExponentialBuilder};

/// What a hook is told about the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HookContext {
    pub event: String,
    pub run_id: String,
    pub spec_name: String,
    pub spec_hash: String,
    pub target: String,
    pub shadow: String,
    pub publish_mode: String,
    pub partitions: usize,
    pub window_first: String,
    pub window_last: String,
    /// The archive table (after_publish).
    pub archive: Option<String>,
    /// How the run ended (on_failure): partitions_failed, audit_failed, error, blocked.
    pub outcome: Option<String>,
    /// Why (on_failure), free of secrets.
    pub error: Option<String>,
}

impl HookContext {
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("BACKFILL_EVENT", self.event.clone()),
            ("BACKFILL_RUN_ID", self.run_id.clone()),
            ("BACKFILL_SPEC_NAME", self.spec_name.clone()),
            ("BACKFILL_SPEC_HASH", self.spec_hash.clone()),
            ("BACKFILL_TARGET", self.target.clone()),
            ("BACKFILL_SHADOW", self.shadow.clone()),
            ("BACKFILL_PUBLISH_MODE", self.publish_mode.clone()),
            ("BACKFILL_PARTITIONS", self.partitions.to_string()),
            ("BACKFILL_WINDOW_FIRST", self.window_first.clone()),
            ("BACKFILL_WINDOW_LAST", self.window_last.clone()),
        ];
        for (name, value) in [
            ("BACKFILL_ARCHIVE", &self.archive),
            ("BACKFILL_OUTCOME", &self.outcome),
            ("BACKFILL_ERROR", &self.error),
        ] {
            if let Some(value) = value {
                env.push((name, value.clone()));
            }
        }
        env
    }

    /// The human sentence for chat channels (the webhook's `text`).
    pub fn text(&self) -> String {
        let window = format!("{} .. {}", self.window_first, self.window_last);
        match self.event.as_str() {
            "before_write" => format!(
                ":construction: backfill `{}` run {} starts rewriting {} ({} partitions, {window}); downstream should pause or pin",
                self.spec_name, self.run_id, self.target, self.partitions
            ),
            "before_publish" => format!(
                ":hourglass: backfill `{}` run {} passed its audits and is about to publish {} ({window}, {})",
                self.spec_name, self.run_id, self.target, self.publish_mode
            ),
            "after_publish" => format!(
                ":white_check_mark: backfill `{}` run {} published {} ({window}); the previous version is archived as {}; roll back with `backfill rollback {}`",
                self.spec_name,
                self.run_id,
                self.target,
                self.archive.as_deref().unwrap_or("-"),
                self.run_id
            ),
            _ => format!(
                ":x: backfill `{}` run {} on {} stopped without publishing ({}): {}; the target is unchanged",
                self.spec_name,
                self.run_id,
                self.target,
                self.outcome.as_deref().unwrap_or("failed"),
                self.error.as_deref().unwrap_or("see `backfill status`")
            ),
        }
    }
}

/// A hook that kept failing after its retries.
#[derive(Debug, Clone)]
pub struct HookFailure {
    pub event: HookEvent,
    pub hook: String,
    pub error: String,
}

impl std::fmt::Display for HookFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} hook {} failed: {}",
            self.event.as_str(),
            self.hook,
            self.error
        )
    }
}

/// Runs the hooks of `event` in spec order and stops at the first that keeps failing.
pub async fn run_hooks(
    hooks: &[Hook],
    event: HookEvent,
    context: &HookContext,
) -> Result<(), HookFailure> {
    let mut context = context.clone();
    context.event = event.as_str().to_string();
    for hook in hooks.iter().filter(|h| h.event == event) {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(10))
            .with_max_times(hook.retries as usize)
            .with_jitter()
            .build();
        let name = describe(&hook.action);
        let mut attempt = 1;
        loop {
            let span =
                tracing::info_span!("backfill.hook", event = event.as_str(), hook = %name, attempt);
            let result =
                tracing::Instrument::instrument(run_once(hook, &context), span.clone()).await;
            match result {
                Ok(()) => {
                    tracing::info!(event = event.as_str(), hook = %name, attempt, "hook succeeded");
                    break;
                }
                Err(error) => {
                    let error = redact_secrets(&error);
                    backfill_common::telemetry::record_error(&span, &error);
                    match delays.next() {
                        Some(delay) => {
                            tracing::warn!(event = event.as_str(), hook = %name, attempt, %error, retry_in = ?delay, "hook failed; retrying");
                            tokio::time::sleep(delay).await;
                            attempt += 1;
                        }
                        None => {
                            return Err(HookFailure {
                                event,
                                hook: name,
                                error: format!("{error} (after {attempt} attempt(s))"),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// How a hook is named in messages: the program, or the webhook's host (its path and query
/// are often the secret).
fn describe(action: &HookAction) -> String {
    match action {
        HookAction::Command(command) => format!("`{}`", command[0]),
        HookAction::Webhook(url) => format!("webhook {}", url_host(url)),
        HookAction::WebhookFromEnv(variable) => format!("webhook ${variable}"),
    }
}

fn url_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| format!("{}://{h}", u.scheme())))
        .unwrap_or_else(|| "(invalid URL)".to_string())
}

async fn run_once(hook: &Hook, context: &HookContext) -> Result<(), String> {
    match &hook.action {
        HookAction::Command(command) => {
            run_command(command, &hook.pass_env, hook.timeout, context).await
        }
        HookAction::Webhook(url) => post(url, hook.timeout, context).await,
        HookAction::WebhookFromEnv(variable) => {
            let url = std::env::var(variable).map_err(|_| {
                format!("the environment variable {variable} (the webhook URL) is not set")
            })?;
            post(&url, hook.timeout, context).await
        }
    }
}

/// At most this much of a failing command's output goes into the error.
const OUTPUT_SHOWN: usize = 500;

/// What every command hook inherits from the coordinator's environment.
const INHERITED: [&str; 7] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

async fn run_command(
    command: &[String],
    pass_env: &[String],
    timeout: Duration,
    context: &HookContext,
) -> Result<(), String> {
    let mut process = tokio::process::Command::new(&command[0]);
    // Only what a hook needs: never the coordinator's URLs, passwords or signing key.
    process.env_clear();
    for name in INHERITED
        .iter()
        .copied()
        .chain(pass_env.iter().map(String::as_str))
    {
        if let Some(value) = std::env::var_os(name) {
            process.env(name, value);
        }
    }
    process
        .args(&command[1..])
        .envs(context.env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = process
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", command[0]))?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.map_err(|e| format!("`{}`: {e}", command[0]))?,
        // Dropping the future kills the process (kill_on_drop).
        Err(_) => {
            return Err(format!(
                "`{}` did not finish within {timeout:?}",
                command[0]
            ));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let mut shown = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if shown.is_empty() {
        shown = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    if shown.len() > OUTPUT_SHOWN {
        let cut = (0..=OUTPUT_SHOWN)
            .rev()
            .find(|i| shown.is_char_boundary(*i))
            .unwrap_or(0);
        shown = format!("{}…", &shown[..cut]);
    }
    Err(format!(
        "`{}` exited with {}: {shown}",
        command[0], output.status
    ))
}

async fn post(url: &str, timeout: Duration, context: &HookContext) -> Result<(), String> {
    let mut body = serde_json::to_value(context).map_err(|e| e.to_string())?;
    body["text"] = serde_json::Value::String(context.text());
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let host = url_host(url);
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        // reqwest's errors quote the URL: name the host only.
        .map_err(|e| {
            let kind = if e.is_timeout() {
                format!("no answer within {timeout:?}")
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                "request failed".to_string()
            };
            format!("POST to {host}: {kind}")
        })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST to {host} answered {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_are_named_by_host_only() {
        assert_eq!(
            describe(&HookAction::Webhook(
                "https://hooks.slack.com/services/T000/B000/SECRET".into()
            )),
            "webhook https://hooks.slack.com"
        );
    }

    #[test]
    fn the_text_says_what_happened() {
        let context = HookContext {
            event: "on_failure".into(),
            run_id: "r1".into(),
            spec_name: "fix".into(),
            target: "public.orders".into(),
            outcome: Some("audit_failed".into()),
            error: Some("2 audit check(s) failed".into()),
            ..HookContext::default()
        };
        let text = context.text();
        assert!(
            text.contains("audit_failed") && text.contains("unchanged"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_output_and_a_slow_one_is_killed() {
        let context = HookContext::default();
        let error = run_command(
            &[
                "sh".into(),
                "-c".into(),
                "echo no downstream >&2; exit 3".into(),
            ],
            &[],
            Duration::from_secs(5),
            &context,
        )
        .await
        .unwrap_err();
        assert!(
            error.contains("no downstream") && error.contains('3'),
            "{error}"
        );
        let started = std::time::Instant::now();
        let error = run_command(
            &["sleep".into(), "30".into()],
            &[],
            Duration::from_millis(200),
            &context,
        )
        .await
        .unwrap_err();
        assert!(error.contains("did not finish"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn commands_see_only_what_they_are_given() {
        // Names no other test uses: the environment is shared by the test threads.
        unsafe {
            std::env::set_var("BFTEST_HOOK_SECRET", "hunter2");
            std::env::set_var("BFTEST_HOOK_TOKEN", "visible");
        }
        run_command(
            &[
                "sh".into(),
                "-c".into(),
                "test -z \"$BFTEST_HOOK_SECRET\" && test \"$BFTEST_HOOK_TOKEN\" = visible && test -n \"$PATH\"".into(),
            ],
            &["BFTEST_HOOK_TOKEN".into()],
            Duration::from_secs(5),
            &HookContext::default(),
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn commands_see_the_run_in_their_environment() {
        let context = HookContext {
            run_id: "abc123".into(),
            target: "public.orders".into(),
            ..HookContext::default()
        };
        run_command(
            &[
                "sh".into(),
                "-c".into(),
                "test \"$BACKFILL_RUN_ID\" = abc123 && test \"$BACKFILL_TARGET\" = public.orders"
                    .into(),
            ],
            &[],
            Duration::from_secs(5),
            &context,
        )
        .await
        .unwrap();
    }
}
