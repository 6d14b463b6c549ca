//! SQL identifiers. Every table and column name that reaches SQL passes through `Ident`, which
//! accepts only plain identifiers and always emits them quoted, so nothing from a spec or a
//! message is spliced into SQL unquoted.

use std::fmt;

/// Longest identifier PostgreSQL keeps without truncating (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Ident(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{value}` is not a valid identifier: {reason} (allowed: a letter or `_`, then letters, digits or `_`, at most {MAX_IDENT_LEN} characters)"
)]
pub struct IdentError {
    pub value: String,
    pub reason: &'static str,
}

impl Ident {
    pub fn new(value: &str) -> Result<Self, IdentError> {
        let fail = |reason| {
            Err(IdentError {
                value: value.to_string(),
                reason,
            })
        };
        let mut chars = value.chars();
        match chars.next() {
            None => return fail("it is empty"),
            Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                return fail("it must start with a letter or `_`");
            }
            _ => {}
        }
        if value.len() > MAX_IDENT_LEN {
            return fail("it is too long");
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return fail("it contains a character other than letters, digits and `_`");
        }
        Ok(Ident(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier in double quotes. Validation guarantees there is no quote inside.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A table name with an optional schema: `orders` or `analytics.orders`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TableName {
    pub schema: Option<Ident>,
    pub name: Ident,
}

impl TableName {
    pub fn parse(value: &str) -> Result<Self, IdentError> {
        match value.split_once('.') {
            Some((schema, name)) => Ok(TableName {
                schema: Some(Ident::new(schema)?),
                name: Ident::new(name)?,
            }),
            None => Ok(TableName {
                schema: None,
                name: Ident::new(value)?,
            }),
        }
    }

    /// A sibling table in the same schema, e.g. the shadow or archive of this table.
    pub fn sibling(&self, name: Ident) -> TableName {
        TableName {
            schema: self.schema.clone(),
            name,
        }
    }

    /// A sibling named `<name><suffix>`, refused when the result would be too long.
    pub fn with_suffix(&self, suffix: &str) -> Result<TableName, IdentError> {
        Ok(self.sibling(Ident::new(&format!("{}{}", self.name, suffix))?))
    }

    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", schema.quoted(), self.name.quoted()),
            None => self.name.quoted(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers_and_quotes_them() {
        assert_eq!(Ident::new("order_id").unwrap().quoted(), "\"order_id\"");
        assert_eq!(
            TableName::parse("analytics.fact_orders").unwrap().quoted(),
            "\"analytics\".\"fact_orders\""
        );
    }

    #[test]
    fn rejects_injection_and_odd_names() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "x\"; DROP TABLE t; --",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(Ident::new(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(TableName::parse("a.b.c").is_err());
    }
}
