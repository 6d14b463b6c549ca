//! Where URLs and secrets come from, shared by both binaries: flags first, then environment
//! variables, then an optional config file:
//!
//! ```toml
//! [warehouses.demo]
//! url = "postgres://backfill@db/analytics"
//! [broker]
//! url = "amqp://backfill@rabbitmq:5672/%2f"
//! [redis]
//! url = "redis://redis:6379"
//! ```

use std::path::Path;

/// `BACKFILL_WAREHOUSE_<NAME>_URL`, with the name upper-cased and anything but letters and
/// digits turned into `_`.
pub fn warehouse_env_var(name: &str) -> String {
    format!(
        "BACKFILL_WAREHOUSE_{}_URL",
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            })
            .collect::<String>()
    )
}

/// The URL of a named warehouse from the environment or the config file; the error lists
/// every way to provide it.
pub fn warehouse_url(name: &str, config: Option<&Path>) -> Result<String, String> {
    let variable = warehouse_env_var(name);
    if let Ok(url) = std::env::var(&variable) {
        return Ok(url);
    }
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
        let table = parse_config(&text, path)?;
        return table
            .get("warehouses")
            .and_then(|w| w.get(name))
            .and_then(|w| w.get("url"))
            .and_then(|u| u.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                format!(
                    "config file {} has no [warehouses.{name}] url",
                    path.display()
                )
            });
    }
    Err(format!(
        "no URL for warehouse `{name}`: pass --warehouse-url, set {variable}, or give a config file with [warehouses.{name}] url = \"…\""
    ))
}

/// The warehouses configured by name: every `BACKFILL_WAREHOUSE_<NAME>_URL` variable (the
/// name lower-cased) and every `[warehouses.<name>]` of the config file, sorted, each once.
pub fn configured_warehouses(config: Option<&Path>) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = std::env::vars()
        .filter_map(|(variable, _)| {
            let name = variable
                .strip_prefix("BACKFILL_WAREHOUSE_")?
                .strip_suffix("_URL")?;
            (!name.is_empty()).then(|| name.to_ascii_lowercase())
        })
        .collect();
    if let Some(path) = config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
        if let Some(warehouses) = parse_config(&text, path)?
            .get("warehouses")
            .and_then(|w| w.as_table())
        {
            names.extend(warehouses.keys().cloned());
        }
    }
    names.sort();
    names.dedup_by(|a, b| warehouse_env_var(a) == warehouse_env_var(b));
    Ok(names)
}

/// A URL from the config file's `[<section>] url = "…"`, when a config file is given.
pub fn section_url(section: &str, config: Option<&Path>) -> Result<Option<String>, String> {
    let Some(path) = config else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
    let table = parse_config(&text, path)?;
    Ok(table
        .get(section)
        .and_then(|s| s.get("url"))
        .and_then(|u| u.as_str())
        .map(str::to_string))
}

/// Parses a config file. The error names the line but never quotes it: config files hold
/// URLs with passwords, and this message can travel to logs and dead-letter queues.
fn parse_config(text: &str, path: &Path) -> Result<toml::Table, String> {
    toml::from_str::<toml::Table>(text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(line) => format!(
                "config file {} is not valid TOML at line {line}: {}",
                path.display(),
                e.message()
            ),
            None => format!(
                "config file {} is not valid TOML: {}",
                path.display(),
                e.message()
            ),
        }
    })
}

/// Adds `application_name` to a PostgreSQL URL so that sessions show who they are in
/// `pg_stat_activity`; other URLs are returned unchanged.
pub fn with_application_name(url: &str, name: &str) -> String {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        || url.contains("application_name=")
    {
        return url.to_string();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    let safe: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    format!("{url}{separator}application_name={safe}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_never_quote_the_file() {
        let dir = std::env::temp_dir().join(format!("bf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("backfill.toml");
        std::fs::write(
            &path,
            "[warehouses.demo]\nurl = \"postgres://app:S3cretPw@db/wh\" extra\n",
        )
        .unwrap();
        let error = warehouse_url("demo", Some(&path)).unwrap_err();
        assert!(!error.contains("S3cretPw"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn env_names_and_application_names() {
        assert_eq!(
            warehouse_env_var("demo-eu"),
            "BACKFILL_WAREHOUSE_DEMO_EU_URL"
        );
        assert_eq!(
            with_application_name("postgres://h/db", "w-1"),
            "postgres://h/db?application_name=w-1"
        );
        assert_eq!(
            with_application_name("postgres://h/db?sslmode=disable", "w 1"),
            "postgres://h/db?sslmode=disable&application_name=w1"
        );
        assert_eq!(
            with_application_name("sqlite:///x.db", "w"),
            "sqlite:///x.db"
        );
    }
}
