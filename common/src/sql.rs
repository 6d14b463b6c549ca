//! A small SQL lexer for the pieces of SQL a spec carries (source query, expressions): finds
//! `:name` parameters outside literals, comments and `::` casts, detects a second statement,
//! and rewrites parameters into the dialect's bound placeholders. Values are never spliced.

/// Parameters a source query may use. Each is bound per partition.
pub const SOURCE_PARAMETERS: &[&str] = &["partition_start", "partition_end"];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Parameter names in order of appearance (with repeats).
    pub names: Vec<String>,
    pub has_statement_separator: bool,
}

/// Piece of a lexed query: literal SQL text or a `:name` parameter.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Parameter(&'a str),
}

fn lex(sql: &str) -> Result<(Vec<Piece<'_>>, bool), String> {
    let bytes = sql.as_bytes();
    let mut pieces = Vec::new();
    let mut separator = false;
    let mut text_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' | b'"' | b'`' => {
                let quote = bytes[i];
                i += 1;
                loop {
                    if i >= bytes.len() {
                        return Err(format!("unterminated {} quote", quote as char));
                    }
                    if bytes[i] == quote {
                        if bytes.get(i + 1) == Some(&quote) {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..].find("*/").ok_or("unterminated /* comment")?;
                i += 2 + end + 2;
            }
            b'$' => {
                // PostgreSQL dollar quoting: $tag$ ... $tag$
                let tag_end = sql[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(end)
                        if bytes[end] == b'$'
                            && !sql[i + 1..end].starts_with(|c: char| c.is_ascii_digit()) =>
                    {
                        let tag = &sql[i..=end];
                        let close = sql[end + 1..]
                            .find(tag)
                            .ok_or("unterminated dollar-quoted string")?;
                        i = end + 1 + close + tag.len();
                    }
                    _ => i += 1,
                }
            }
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes
                .get(i + 1)
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_') =>
            {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len()
                    && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_')
                {
                    end += 1;
                }
                pieces.push(Piece::Text(&sql[text_start..i]));
                pieces.push(Piece::Parameter(&sql[start..end]));
                i = end;
                text_start = end;
            }
            b';' => {
                // A trailing `;` followed only by whitespace/comments is still a second
                // statement boundary; we refuse it to keep the query embeddable.
                separator = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    pieces.push(Piece::Text(&sql[text_start..]));
    Ok((pieces, separator))
}

pub fn scan_placeholders(sql: &str) -> Result<Scan, String> {
    let (pieces, has_statement_separator) = lex(sql)?;
    let names = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Parameter(name) => Some(name.to_string()),
            Piece::Text(_) => None,
        })
        .collect();
    Ok(Scan {
        names,
        has_statement_separator,
    })
}

/// Replaces each `:name` with `placeholder(name)`. The caller binds the values.
pub fn rewrite_parameters(
    sql: &str,
    placeholder: impl Fn(&str) -> String,
) -> Result<String, String> {
    let (pieces, _) = lex(sql)?;
    let mut out = String::with_capacity(sql.len() + 32);
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Parameter(name) => out.push_str(&placeholder(name)),
        }
    }
    Ok(out)
}

/// The query without leading whitespace and comments, to see which statement it is.
pub fn strip_leading_comments(sql: &str) -> &str {
    let mut rest = sql.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix("--") {
            rest = after
                .find('\n')
                .map_or("", |n| &after[n + 1..])
                .trim_start();
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after
                .find("*/")
                .map_or("", |n| &after[n + 2..])
                .trim_start();
        } else {
            return rest;
        }
    }
}

/// A string literal for SQL text that is ours, not the user's (e.g. a view definition read
/// back from the catalog). Doubles quotes.
pub fn string_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_parameters_outside_literals_comments_and_casts() {
        let sql = "SELECT ':x', \"a:b\", c::date, $$ :y $$ -- :z\n FROM t /* :w */ WHERE d >= :partition_start AND d < :partition_end";
        let scan = scan_placeholders(sql).unwrap();
        assert_eq!(scan.names, vec!["partition_start", "partition_end"]);
        assert!(!scan.has_statement_separator);
        let rewritten = rewrite_parameters(sql, |n| {
            if n == "partition_start" {
                "$1".into()
            } else {
                "$2".into()
            }
        })
        .unwrap();
        assert!(rewritten.ends_with("WHERE d >= $1 AND d < $2"));
        assert!(rewritten.contains("c::date"));
    }

    #[test]
    fn detects_second_statement_and_unterminated_literals() {
        assert!(
            scan_placeholders("SELECT 1; DROP TABLE x")
                .unwrap()
                .has_statement_separator
        );
        assert!(
            !scan_placeholders("SELECT ';'")
                .unwrap()
                .has_statement_separator
        );
        assert!(scan_placeholders("SELECT 'abc").is_err());
    }

    #[test]
    fn strips_leading_comments() {
        assert_eq!(
            strip_leading_comments("  -- hi\n /* x */ SELECT 1"),
            "SELECT 1"
        );
    }
}
