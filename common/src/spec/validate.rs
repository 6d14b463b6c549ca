//! From the file as written to the validated `Spec`: every error names the field, the bad
//! value and what would be allowed. Audits have a module of their own (`audits`).

use super::*;

pub(super) fn toml_message(error: &toml::de::Error) -> String {
    // toml's message already names the key and shows the offending line; keep it on one line
    // per fact so it reads well in a terminal.
    error.to_string().trim_end().to_string()
}

pub(super) fn validate(raw: RawSpec) -> Result<Spec, SpecError> {
    let name = match raw.name {
        Some(name) if name.trim().is_empty() => {
            return Err(field_error(
                "name",
                "an empty string",
                "give the backfill a short name or leave the field out",
            ));
        }
        Some(name) => name,
        None => raw.target.table.clone(),
    };

    if raw.target.table.matches('.').count() > 1 {
        return Err(field_error(
            "target.table",
            format!("`{}`", raw.target.table),
            "allowed: `table` or `schema.table` (the warehouse comes from warehouse.name)",
        ));
    }
    let table = TableName::parse(&raw.target.table).map_err(|e| {
        field_error(
            "target.table",
            format!("`{}`", raw.target.table),
            e.to_string(),
        )
    })?;
    if raw.target.key.is_empty() {
        return Err(field_error(
            "target.key",
            "an empty list",
            "list the column(s) that identify a row, e.g. key = [\"order_id\"]",
        ));
    }
    if table.name.as_str().len() > MAX_TARGET_NAME_LEN {
        return Err(field_error(
            "target.table",
            format!(
                "`{}` ({} characters)",
                table.name,
                table.name.as_str().len()
            ),
            format!(
                "at most {MAX_TARGET_NAME_LEN} characters, so that its shadow and archive tables (`<table>__bf_archive_<run>`) fit in 63"
            ),
        ));
    }
    let key = idents("target.key", &raw.target.key)?;
    let mut add_columns: Vec<NewColumn> = Vec::new();
    for (i, column) in raw.target.add_columns.iter().enumerate() {
        let field = format!("target.add_columns[{i}]");
        let name = ident(&format!("{field}.name"), &column.name)?;
        if add_columns.iter().any(|c| c.name == name) {
            return Err(field_error(
                &format!("{field}.name"),
                format!("`{name}` twice"),
                "add each new column once",
            ));
        }
        add_columns.push(NewColumn {
            name,
            sql_type: sql_type(&format!("{field}.type"), &column.sql_type)?,
        });
    }

    let column = ident("partition.column", &raw.partition.column)?;
    let grain = match raw.partition.grain.as_str() {
        "day" => Grain::Day,
        "hour" => Grain::Hour,
        other => {
            return Err(field_error(
                "partition.grain",
                format!("`{other}`"),
                "allowed: \"day\" or \"hour\"",
            ));
        }
    };
    let scope = scope(&raw.partition, grain)?;
    let max_partitions = raw
        .partition
        .max_partitions
        .unwrap_or(DEFAULT_MAX_PARTITIONS);
    let count = plan::count(grain, &scope);
    if count > max_partitions {
        return Err(field_error(
            "partition",
            format!("{count} partitions"),
            format!(
                "at most {max_partitions} are allowed; if you really mean it, set partition.max_partitions = {count}"
            ),
        ));
    }

    let query = source_query(&raw.source.query)?;
    let dedupe_order_by = match raw.source.dedupe_order_by {
        Some(order) => Some(sql_fragment("source.dedupe_order_by", &order)?),
        None => None,
    };

    if raw.warehouse.name.is_empty()
        || !raw
            .warehouse
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(field_error(
            "warehouse.name",
            format!("`{}`", raw.warehouse.name),
            "allowed: letters, digits, `_` and `-` (the URL comes from BACKFILL_WAREHOUSE_<NAME>_URL, --warehouse-url or the config file)",
        ));
    }
    let concurrency = raw.warehouse.concurrency.unwrap_or(2);
    if !(1..=256).contains(&concurrency) {
        return Err(field_error(
            "warehouse.concurrency",
            concurrency,
            "allowed: 1 to 256 partitions at a time",
        ));
    }
    let control_schema = ident(
        "warehouse.control_schema",
        raw.warehouse
            .control_schema
            .as_deref()
            .unwrap_or("backfill"),
    )?;

    let execution = Execution {
        partition_timeout: duration(
            "execution.partition_timeout",
            raw.execution
                .partition_timeout
                .as_deref()
                .unwrap_or(DEFAULT_PARTITION_TIMEOUT),
        )?,
        retries: raw.execution.retries.unwrap_or(3),
        backoff_initial: duration(
            "execution.backoff_initial",
            raw.execution.backoff_initial.as_deref().unwrap_or("1s"),
        )?,
        backoff_max: duration(
            "execution.backoff_max",
            raw.execution.backoff_max.as_deref().unwrap_or("60s"),
        )?,
    };
    if execution.retries > 20 {
        return Err(field_error(
            "execution.retries",
            execution.retries,
            "allowed: 0 to 20",
        ));
    }
    if execution.partition_timeout < Duration::from_secs(1) {
        return Err(field_error(
            "execution.partition_timeout",
            raw.execution.partition_timeout.unwrap_or_default(),
            "allowed: at least 1s",
        ));
    }
    if execution.backoff_max < execution.backoff_initial {
        return Err(field_error(
            "execution.backoff_max",
            format!("{:?}", execution.backoff_max),
            format!(
                "must be at least execution.backoff_initial ({:?}); raise backoff_max or lower backoff_initial",
                execution.backoff_initial
            ),
        ));
    }

    let mut audits = Vec::new();
    for (i, audit) in raw.audits.into_iter().enumerate() {
        audits.push(validate_audit(i, audit)?);
    }
    for (i, audit) in audits.iter().enumerate() {
        if let Some(first) = audits[..i].iter().position(|a| a.name == audit.name) {
            return Err(field_error(
                &format!("audit[{i}].name"),
                format!("`{}`, already the name of audit[{first}]", audit.name),
                "each audit needs its own name (unnamed audits are named after their kind and column): set `name`",
            ));
        }
    }

    let mode_name = raw.publish.mode.as_deref().unwrap_or("auto");
    let mode = PublishMode::parse(mode_name).ok_or_else(|| {
        field_error(
            "publish.mode",
            format!("`{mode_name}`"),
            "allowed: \"auto\" (the default: `plan` says which mode and why), \"swap_table\", \"swap_window\", \"swap_partitions\"",
        )
    })?;
    if mode == PublishMode::SwapWindow && !add_columns.is_empty() {
        return Err(field_error(
            "publish.mode",
            "`swap_window` with target.add_columns",
            "swap_window keeps the table and only replaces the window's rows, so it cannot add columns: use \"swap_table\" (or \"auto\")",
        ));
    }
    let approval = match raw.publish.approval.as_deref().unwrap_or("auto") {
        "auto" => Approval::Auto,
        "manual" => Approval::Manual,
        other => {
            return Err(field_error(
                "publish.approval",
                format!("`{other}`"),
                "allowed: \"auto\" (publish when the audits pass) or \"manual\" (stop in awaiting_approval until `backfill publish <run>`)",
            ));
        }
    };
    let hooks = raw
        .hooks
        .iter()
        .enumerate()
        .map(|(i, hook)| parse_hook(i, hook))
        .collect::<Result<Vec<_>, _>>()?;
    let archive_retention_days = raw
        .publish
        .archive_retention_days
        .unwrap_or(DEFAULT_RETENTION_DAYS);
    if archive_retention_days < MIN_RETENTION_DAYS {
        return Err(field_error(
            "publish.archive_retention_days",
            archive_retention_days,
            format!(
                "at least {MIN_RETENTION_DAYS} days, so a bad publish can still be rolled back (the usual range is 14 to 30)"
            ),
        ));
    }
    let lock_wait = match raw.publish.lock_wait.as_deref() {
        Some(text) => duration("publish.lock_wait", text)?,
        None => DEFAULT_LOCK_WAIT,
    };
    if lock_wait < Duration::from_secs(1) {
        return Err(field_error(
            "publish.lock_wait",
            format!("`{}`", raw.publish.lock_wait.as_deref().unwrap_or_default()),
            "at least 1s: the publish waits for sessions reading or writing the target to let go, in short attempts (the default is 60s)",
        ));
    }

    Ok(Spec {
        name,
        description: raw.description,
        target: Target {
            table,
            key,
            add_columns,
        },
        partition: Partitioning {
            column,
            grain,
            scope,
            max_partitions,
        },
        source: Source {
            query,
            dedupe_order_by,
        },
        warehouse: WarehouseRef {
            name: raw.warehouse.name,
            concurrency,
            control_schema,
        },
        execution,
        audits,
        publish: Publish {
            mode,
            approval,
            archive_retention_days,
            lock_wait,
        },
        hooks,
    })
}

/// Longest a hook may run: hooks pause dashboards or post notices, they are not jobs.
pub(super) const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(600);

pub(super) fn parse_hook(index: usize, raw: &RawHook) -> Result<Hook, SpecError> {
    let field = |name: &str| format!("hook[{index}].{name}");
    let event = match raw.on.as_str() {
        "before_write" => HookEvent::BeforeWrite,
        "before_publish" => HookEvent::BeforePublish,
        "after_publish" => HookEvent::AfterPublish,
        "on_failure" => HookEvent::OnFailure,
        other => {
            return Err(field_error(
                &field("on"),
                format!("`{other}`"),
                "allowed: before_write, before_publish, after_publish, on_failure",
            ));
        }
    };
    let action = match (&raw.command, &raw.url, &raw.url_env) {
        (Some(command), None, None) => {
            if command.is_empty() || command[0].trim().is_empty() {
                return Err(field_error(
                    &field("command"),
                    "an empty command",
                    "give the program and its arguments, e.g. [\"./pause_dashboards.sh\", \"orders\"] (no shell is involved)",
                ));
            }
            HookAction::Command(command.clone())
        }
        (None, Some(url), None) => {
            let parsed = url::Url::parse(url).map_err(|e| {
                field_error(
                    &field("url"),
                    "an invalid URL",
                    format!("{e}; e.g. https://hooks.example.com/backfill"),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(field_error(
                    &field("url"),
                    format!("a {} URL", parsed.scheme()),
                    "allowed: http or https",
                ));
            }
            HookAction::Webhook(url.clone())
        }
        (None, None, Some(variable)) => {
            if variable.is_empty()
                || !variable
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(field_error(
                    &field("url_env"),
                    format!("`{variable}`"),
                    "the name of an environment variable holding the webhook URL, e.g. SLACK_WEBHOOK_URL",
                ));
            }
            HookAction::WebhookFromEnv(variable.clone())
        }
        _ => {
            return Err(field_error(
                &field("command"),
                "none or several of command, url, url_env",
                "give exactly one: command = [\"program\", \"arg\"], url = \"https://…\", or url_env = \"VARIABLE\" (keeps a secret webhook URL out of the spec)",
            ));
        }
    };
    let timeout = match &raw.timeout {
        Some(text) => duration(&field("timeout"), text)?,
        None => Duration::from_secs(30),
    };
    if timeout.is_zero() || timeout > MAX_HOOK_TIMEOUT {
        return Err(field_error(
            &field("timeout"),
            format!("{timeout:?}"),
            "between 1ms and 10m",
        ));
    }
    let retries = raw.retries.unwrap_or(2);
    if retries > 10 {
        return Err(field_error(&field("retries"), retries, "at most 10"));
    }
    let pass_env = raw.pass_env.clone().unwrap_or_default();
    if !matches!(action, HookAction::Command(_)) && !pass_env.is_empty() {
        return Err(field_error(
            &field("pass_env"),
            "a list on a webhook",
            "pass_env only applies to command hooks",
        ));
    }
    for name in &pass_env {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(field_error(
                &field("pass_env"),
                format!("`{name}`"),
                "names of environment variables, e.g. [\"DASHBOARD_API_TOKEN\"]",
            ));
        }
        if name.starts_with("BACKFILL_") {
            return Err(field_error(
                &field("pass_env"),
                format!("`{name}`"),
                "BACKFILL_* variables hold the coordinator's own settings and secrets and are never passed to hooks",
            ));
        }
    }
    Ok(Hook {
        event,
        action,
        timeout,
        retries,
        pass_env,
    })
}

pub(super) fn ident(field: &str, value: &str) -> Result<Ident, SpecError> {
    Ident::new(value).map_err(|e| field_error(field, format!("`{value}`"), e.to_string()))
}

pub(super) fn idents(field: &str, values: &[String]) -> Result<Vec<Ident>, SpecError> {
    let mut out = Vec::new();
    for (i, value) in values.iter().enumerate() {
        let id = ident(&format!("{field}[{i}]"), value)?;
        if out.contains(&id) {
            return Err(field_error(
                field,
                format!("`{value}` twice"),
                "list each column once",
            ));
        }
        out.push(id);
    }
    Ok(out)
}

/// A column type for `ALTER TABLE … ADD COLUMN`: a type name, optional words that belong to
/// multi-word types (`double precision`, `timestamp with time zone`, `character varying`),
/// optional `(n)` / `(p, s)` and `[]`. Nothing else, so no clause can ride along.
pub(super) fn sql_type(field: &str, value: &str) -> Result<String, SpecError> {
    const CONTINUATIONS: &[&str] = &["precision", "varying", "with", "without", "time", "zone"];
    let refuse = || {
        Err(field_error(
            field,
            format!("`{value}`"),
            "allowed: a plain SQL type such as integer, bigint, numeric(12,2), text, double precision, timestamp with time zone",
        ))
    };
    let trimmed = value.trim();
    let (head, rest) = match trimmed.find('(') {
        Some(open) => (&trimmed[..open], &trimmed[open..]),
        None => (trimmed, ""),
    };
    let mut words = head.split_whitespace();
    let first_ok = words.next().is_some_and(|w| {
        w.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    let words_ok = words.all(|w| CONTINUATIONS.contains(&w.to_ascii_lowercase().as_str()));
    let rest = rest.strip_suffix("[]").unwrap_or(rest);
    let modifiers_ok = rest.is_empty()
        || (rest.starts_with('(')
            && rest.ends_with(')')
            && rest[1..rest.len() - 1]
                .split(',')
                .all(|n| !n.trim().is_empty() && n.trim().chars().all(|c| c.is_ascii_digit())));
    if first_ok && words_ok && modifiers_ok && trimmed.len() <= 64 {
        Ok(trimmed.to_string())
    } else {
        refuse()
    }
}

pub(super) fn scope(raw: &RawPartition, grain: Grain) -> Result<Scope, SpecError> {
    let parse = |field: &str, value: &str| {
        plan::parse_partition_start(grain, value).ok_or_else(|| {
            field_error(
                field,
                format!("`{value}`"),
                partition_value_hint(grain, value),
            )
        })
    };
    match (&raw.first, &raw.last, &raw.list) {
        (Some(first), Some(last), None) => {
            let f = parse("partition.first", first)?;
            let l = parse("partition.last", last)?;
            if l < f {
                return Err(field_error(
                    "partition.last",
                    format!("`{last}`"),
                    format!("must not be before partition.first (`{first}`)"),
                ));
            }
            Ok(Scope::Range { first: f, last: l })
        }
        (None, None, Some(list)) => {
            if list.is_empty() {
                return Err(field_error(
                    "partition.list",
                    "an empty list",
                    "list at least one partition",
                ));
            }
            let mut starts = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let start = parse(&format!("partition.list[{i}]"), item)?;
                starts.push(start);
            }
            starts.sort();
            starts.dedup();
            Ok(Scope::List(starts))
        }
        (first, last, list) => {
            let got = match (first.is_some() || last.is_some(), list.is_some()) {
                (true, true) => "both a range (`first`/`last`) and a `list`",
                (true, false) if first.is_some() => "`first` without `last`",
                (true, false) => "`last` without `first`",
                _ => "neither a range nor a list",
            };
            Err(field_error(
                "partition",
                got,
                "give either `first` and `last` (both included) or `list` (explicit partitions), not both",
            ))
        }
    }
}

/// Why a partition value did not parse, as precisely as we can tell.
pub(super) fn partition_value_hint(grain: Grain, value: &str) -> String {
    let shaped_like_date = value.len() >= 10
        && value.as_bytes()[..10].iter().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                *b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    let real_date = shaped_like_date && parse_date(&value[..10]).is_some();
    let has_offset = real_date
        && value.len() > 10
        && (value.ends_with(['Z', 'z']) || value[10..].contains(['+', '-']));
    match grain {
        _ if has_offset => {
            "a partition start has no time zone offset: write it without `Z` or `+hh:mm`, e.g. 2024-03-01T05 (hour) or 2024-03-01 (day)"
                .to_string()
        }
        Grain::Day if shaped_like_date && !real_date => {
            format!("`{}` is not a calendar date", &value[..10])
        }
        Grain::Day => "expected a date like 2024-03-01".to_string(),
        Grain::Hour if shaped_like_date && !real_date => {
            format!("`{}` is not a calendar date", &value[..10])
        }
        Grain::Hour if real_date && value.len() > 13 => {
            "hour partitions start on the hour: expected e.g. 2024-03-01T05 or 2024-03-01T05:00:00"
                .to_string()
        }
        Grain::Hour => "expected an hour like 2024-03-01T05 (or 2024-03-01T05:00:00)".to_string(),
    }
}

pub(super) fn source_query(query: &str) -> Result<String, SpecError> {
    let trimmed = query.trim();
    let body = sql::strip_leading_comments(trimmed)
        .trim_start_matches(|c: char| c == '(' || c.is_whitespace());
    // `get`, not indexing: the query may start with a multi-byte character.
    let starts_like_select = ["select", "with"].iter().any(|kw| {
        body.get(..kw.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(kw))
            && body[kw.len()..]
                .chars()
                .next()
                .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
    });
    if !starts_like_select {
        let first_word: String = body
            .chars()
            .take_while(|c| !c.is_whitespace())
            .take(20)
            .collect();
        return Err(field_error(
            "source.query",
            format!("a statement starting with `{first_word}`"),
            "the source must be one SELECT (or WITH ... SELECT) query",
        ));
    }
    let scan =
        sql::scan_placeholders(trimmed).map_err(|e| field_error("source.query", "the query", e))?;
    if scan.has_statement_separator {
        return Err(field_error(
            "source.query",
            "a `;`",
            "the source must be a single query without `;`",
        ));
    }
    const WRITES: &[&str] = &[
        "insert", "update", "delete", "merge", "truncate", "drop", "alter", "create", "grant",
        "revoke", "copy", "call", "vacuum",
    ];
    if let Some(word) = scan.words.iter().find(|w| WRITES.contains(&w.as_str())) {
        return Err(field_error(
            "source.query",
            format!("`{}`", word.to_ascii_uppercase()),
            "the source must only read: one SELECT (or WITH ... SELECT) without data-modifying statements",
        ));
    }
    for name in &scan.names {
        if !sql::SOURCE_PARAMETERS.contains(&name.as_str()) {
            return Err(field_error(
                "source.query",
                format!("the parameter `:{name}`"),
                format!(
                    "allowed parameters: {}",
                    sql::SOURCE_PARAMETERS
                        .iter()
                        .map(|p| format!(":{p}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    for required in ["partition_start", "partition_end"] {
        if !scan.names.iter().any(|n| n == required) {
            return Err(field_error(
                "source.query",
                format!("a query without `:{required}`"),
                "filter on the partition, e.g. WHERE order_date >= :partition_start AND order_date < :partition_end, so that each task reads exactly one partition",
            ));
        }
    }
    Ok(sql::embeddable(trimmed))
}

pub(super) fn sql_fragment(field: &str, value: &str) -> Result<String, SpecError> {
    let scan =
        sql::scan_placeholders(value).map_err(|e| field_error(field, format!("`{value}`"), e))?;
    if scan.has_statement_separator || !scan.names.is_empty() || value.trim().is_empty() {
        return Err(field_error(
            field,
            format!("`{value}`"),
            "allowed: one SQL expression, without `;` or parameters",
        ));
    }
    Ok(sql::embeddable(value.trim()))
}

pub(super) fn duration(field: &str, value: &str) -> Result<Duration, SpecError> {
    parse_duration(value).ok_or_else(|| {
        field_error(
            field,
            format!("`{value}`"),
            "allowed: a number with a unit, e.g. 500ms, 30s, 10m, 2h",
        )
    })
}
