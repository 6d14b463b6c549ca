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
    /// Lower-cased keywords and identifiers outside literals and comments, in order.
    pub words: Vec<String>,
}

/// Piece of a lexed query: SQL code, a quoted literal or comment, or a `:name` parameter.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Code(&'a str),
    Quoted(&'a str),
    Parameter(&'a str),
}

/// "line L, column C" of a byte offset, for errors a user has to find in a long query.
fn position(sql: &str, offset: usize) -> String {
    let before = &sql[..offset.min(sql.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// End (exclusive) of the quoted string opening at `start`. `backslash_escapes` is for
/// PostgreSQL's E'...' strings, where \' does not close the string.
fn quoted_end(sql: &str, start: usize, backslash_escapes: bool) -> Result<usize, String> {
    let bytes = sql.as_bytes();
    let quote = bytes[start];
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => {
                return Err(format!(
                    "unterminated {} quote opened at {}",
                    quote as char,
                    position(sql, start)
                ));
            }
            Some(b'\\') if backslash_escapes => i += 2,
            Some(&c) if c == quote => {
                if bytes.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Ok(i + 1);
                }
            }
            Some(_) => i += 1,
        }
    }
}

fn lex(sql: &str) -> Result<(Vec<Piece<'_>>, bool), String> {
    let bytes = sql.as_bytes();
    let mut pieces = Vec::new();
    let mut separator = false;
    let mut code_start = 0;
    let mut i = 0;
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < bytes.len() {
        let quoted_until = match bytes[i] {
            b'\'' | b'"' | b'`' => {
                let escapes = bytes[i] == b'\''
                    && i > 0
                    && matches!(bytes[i - 1], b'E' | b'e')
                    && (i < 2 || !is_ident(bytes[i - 2]));
                Some(quoted_end(sql, i, escapes)?)
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                Some(sql[i..].find('\n').map_or(sql.len(), |n| i + n))
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..].find("*/").ok_or_else(|| {
                    format!("unterminated /* comment opened at {}", position(sql, i))
                })?;
                Some(i + 2 + end + 2)
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
                        let close = sql[end + 1..].find(tag).ok_or_else(|| {
                            format!(
                                "unterminated dollar-quoted string opened at {}",
                                position(sql, i)
                            )
                        })?;
                        Some(end + 1 + close + tag.len())
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(end) = quoted_until {
            pieces.push(Piece::Code(&sql[code_start..i]));
            pieces.push(Piece::Quoted(&sql[i..end]));
            i = end;
            code_start = end;
            continue;
        }
        match bytes[i] {
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes
                .get(i + 1)
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_') =>
            {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && is_ident(bytes[end]) {
                    end += 1;
                }
                pieces.push(Piece::Code(&sql[code_start..i]));
                pieces.push(Piece::Parameter(&sql[start..end]));
                i = end;
                code_start = end;
            }
            b';' => {
                // Even a trailing `;` is refused: the query is embedded as a subquery.
                separator = true;
                i += 1;
            }
            _ => i += 1,
        }
    }
    pieces.push(Piece::Code(&sql[code_start..]));
    Ok((pieces, separator))
}

pub fn scan_placeholders(sql: &str) -> Result<Scan, String> {
    let (pieces, has_statement_separator) = lex(sql)?;
    let mut names = Vec::new();
    let mut words = Vec::new();
    for piece in &pieces {
        match piece {
            Piece::Parameter(name) => names.push(name.to_string()),
            Piece::Code(code) => words.extend(
                code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty())
                    .map(|w| w.to_ascii_lowercase()),
            ),
            Piece::Quoted(_) => {}
        }
    }
    Ok(Scan {
        names,
        has_statement_separator,
        words,
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
            Piece::Code(text) | Piece::Quoted(text) => out.push_str(text),
            Piece::Parameter(name) => out.push_str(&placeholder(name)),
        }
    }
    Ok(out)
}

/// The statement with each `$n` placeholder outside literals and comments replaced by `?`,
/// and the 0-based index of the bind each `?` takes, in order (a `$n` used twice binds twice).
/// For engines whose drivers number parameters by position only (MySQL): the pipeline writes
/// `$n` everywhere, and the session translates.
pub fn positional_placeholders(sql: &str) -> Result<(String, Vec<usize>), String> {
    let (pieces, _) = lex(sql)?;
    let mut out = String::with_capacity(sql.len());
    let mut order = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Quoted(text) => out.push_str(text),
            // A spec's `:name` has been rewritten before it reaches a session; keep it as is.
            Piece::Parameter(name) => {
                out.push(':');
                out.push_str(name);
            }
            Piece::Code(text) => {
                let bytes = text.as_bytes();
                let mut i = 0;
                let mut copied = 0;
                while i < bytes.len() {
                    let preceded_by_word =
                        i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                    if bytes[i] == b'$' && !preceded_by_word {
                        let digits = bytes[i + 1..]
                            .iter()
                            .take_while(|c| c.is_ascii_digit())
                            .count();
                        if digits > 0 {
                            let n: usize = text[i + 1..i + 1 + digits].parse().map_err(|_| {
                                format!("placeholder {} is too large", &text[i..i + 1 + digits])
                            })?;
                            if n == 0 {
                                return Err("placeholders are numbered from $1".into());
                            }
                            out.push_str(&text[copied..i]);
                            out.push('?');
                            order.push(n - 1);
                            i += 1 + digits;
                            copied = i;
                            continue;
                        }
                    }
                    i += 1;
                }
                out.push_str(&text[copied..]);
            }
        }
    }
    Ok((out, order))
}

/// The fragment as it can be embedded in a larger statement: a fragment that ends in a `--`
/// comment gets a newline, or the comment would swallow whatever the statement puts after it
/// (a closing parenthesis, `AS bf_q`, the rest of the query).
pub fn embeddable(fragment: &str) -> String {
    let ends_in_line_comment = lex(fragment).is_ok_and(|(pieces, _)| {
        pieces
            .iter()
            .rev()
            .find(|piece| !matches!(piece, Piece::Code(code) if code.is_empty()))
            .is_some_and(|piece| matches!(piece, Piece::Quoted(text) if text.starts_with("--")))
    });
    if ends_in_line_comment {
        format!("{fragment}\n")
    } else {
        fragment.to_string()
    }
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
    fn backslash_escapes_in_e_strings_do_not_hide_statements() {
        let sql = "SELECT 1 FROM t WHERE a <> E'\\'' ; DROP TABLE x; -- '";
        assert!(scan_placeholders(sql).unwrap().has_statement_separator);
        let sql = "SELECT 1 FROM t WHERE a <> E'\\'' AND d = :day -- '";
        assert_eq!(scan_placeholders(sql).unwrap().names, vec!["day"]);
        // a plain string ending in a backslash is not an escape
        assert!(
            !scan_placeholders("SELECT 'a\\' AS x")
                .unwrap()
                .has_statement_separator
        );
    }

    #[test]
    fn words_skip_literals_and_comments() {
        let scan = scan_placeholders(
            "WITH g AS (DELETE FROM t RETURNING *) SELECT 'update' /* insert */ FROM g",
        )
        .unwrap();
        assert!(scan.words.contains(&"delete".to_string()));
        assert!(!scan.words.contains(&"update".to_string()));
        assert!(!scan.words.contains(&"insert".to_string()));
    }

    #[test]
    fn unterminated_literals_say_where() {
        let error = scan_placeholders("SELECT 1\nFROM t WHERE a = 'x").unwrap_err();
        assert!(error.contains("line 2, column 18"), "{error}");
    }

    #[test]
    fn fragments_ending_in_a_line_comment_get_a_newline() {
        assert_eq!(embeddable("a DESC -- newest"), "a DESC -- newest\n");
        assert_eq!(embeddable("a -- x\nAND b"), "a -- x\nAND b");
        assert_eq!(embeddable("a /* -- */"), "a /* -- */");
        assert_eq!(embeddable("a = '--'"), "a = '--'");
        assert_eq!(embeddable("a--"), "a--\n");
    }

    #[test]
    fn numbered_placeholders_become_positional_outside_literals() {
        let (sql, order) = positional_placeholders(
            "SELECT '$1', \"a$2\", $2 -- $3\n FROM t /* $4 */ WHERE a = $1 AND b = $10 AND c = $1",
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT '$1', \"a$2\", ? -- $3\n FROM t /* $4 */ WHERE a = ? AND b = ? AND c = ?"
        );
        assert_eq!(order, vec![1, 0, 9, 0]);
        // `$` inside a word is not a placeholder; `$0` is refused.
        assert_eq!(
            positional_placeholders("SELECT a$1").unwrap().1,
            Vec::<usize>::new()
        );
        assert!(positional_placeholders("SELECT $0").is_err());
    }

    #[test]
    fn strips_leading_comments() {
        assert_eq!(
            strip_leading_comments("  -- hi\n /* x */ SELECT 1"),
            "SELECT 1"
        );
    }
}
