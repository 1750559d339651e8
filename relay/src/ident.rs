//! SQL identifiers from configuration (table, schema and column names).
//!
//! They are validated at start-up and always emitted double-quoted, so a name from a config
//! file can never change the meaning of a statement.

use std::fmt;

/// Postgres truncates identifiers longer than this (NAMEDATALEN - 1).
const MAX_IDENT_LEN: usize = 63;

/// Accepts a letter or `_`, then letters, digits or `_`, at most 63 bytes (what Postgres accepts
/// unquoted, minus `$`, which would end the dollar-quoted bodies of `migrate`).
pub fn validate_ident(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err("an identifier must not be empty".into());
    };
    if name.len() > MAX_IDENT_LEN {
        return Err(format!(
            "`{name}` is longer than {MAX_IDENT_LEN} bytes, which Postgres would truncate"
        ));
    }
    if !(first.is_ascii_alphabetic() || first == '_')
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "`{name}` is not a plain SQL identifier (letters, digits, `_`; not starting with a digit)"
        ));
    }
    Ok(())
}

/// `"name"` with embedded quotes doubled.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A possibly schema-qualified table name such as `billing.outbox`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: Option<String>,
    pub name: String,
}

impl QualifiedName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => (None, name),
            (Some(schema), Some(name), None) => (Some(schema), name),
            _ => return Err(format!("`{s}` is not `table` or `schema.table`")),
        };
        if let Some(schema) = schema {
            validate_ident(schema)?;
        }
        validate_ident(name)?;
        Ok(Self {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The schema, `public` when none was given.
    pub fn schema_or_public(&self) -> &str {
        self.schema.as_deref().unwrap_or("public")
    }

    /// A sibling object in the same schema, e.g. `outbox_dead_letters` next to `outbox`.
    pub fn sibling(&self, suffix: &str) -> Self {
        let mut name = format!("{}{suffix}", self.name);
        name.truncate(MAX_IDENT_LEN);
        Self {
            schema: self.schema.clone(),
            name,
        }
    }

    /// Text form, unquoted (`billing.outbox`), for messages and NOTIFY channel names.
    pub fn display(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for QualifiedName {
    /// Quoted SQL form: `"billing"."outbox"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{}.{}", quote(s), quote(&self.name)),
            None => f.write_str(&quote(&self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_qualified_names() {
        let q = QualifiedName::parse("billing.outbox").unwrap();
        assert_eq!(q.to_string(), "\"billing\".\"outbox\"");
        assert_eq!(
            QualifiedName::parse("Outbox").unwrap().to_string(),
            "\"Outbox\""
        );
    }

    #[test]
    fn rejects_injection_and_odd_names() {
        for bad in [
            "",
            "a.b.c",
            "out box",
            "x; drop table y",
            "1abc",
            "a\"b",
            "x$relay$",
            "a.",
            ".a",
        ] {
            assert!(QualifiedName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(validate_ident(&"a".repeat(64)).is_err());
    }
}
