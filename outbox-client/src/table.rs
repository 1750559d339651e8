//! Table names that are interpolated into SQL: validated once, then always quoted.

use std::fmt;

use crate::Error;

/// A validated `table` or `schema.table` name, rendered quoted (`"schema"."table"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Parses `table` or `schema.table`; each part must be a plain identifier (letters, digits,
    /// `_`, not starting with a digit, at most 63 bytes), because it is spliced into SQL.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidTableName(raw.to_string());
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let mut parts = raw.split('.');
        let (first, second) = (parts.next().ok_or_else(invalid)?, parts.next());
        if parts.next().is_some() {
            return Err(invalid());
        }
        let (schema, name) = match second {
            Some(table) => (Some(first), table),
            None => (None, first),
        };
        if !ident_ok(name) || schema.is_some_and(|s| !ident_ok(s)) {
            return Err(invalid());
        }
        Ok(Self {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The unqualified table name, unquoted (for deriving index or constraint names).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "\"{schema}\".")?;
        }
        write!(f, "\"{}\"", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_qualified_names_are_quoted() {
        assert_eq!(
            TableName::parse("outbox").unwrap().to_string(),
            "\"outbox\""
        );
        assert_eq!(
            TableName::parse("billing.outbox").unwrap().to_string(),
            "\"billing\".\"outbox\""
        );
    }

    #[test]
    fn names_that_could_inject_sql_are_refused() {
        for bad in [
            "",
            "a.b.c",
            "outbox; drop table x",
            "\"outbox\"",
            "1outbox",
            ".outbox",
            "outbox.",
            &"x".repeat(64),
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
