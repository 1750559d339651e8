//! Values that must never reach a log line, an error message or `status` output: passwords in
//! connection URLs. [`Secret`] holds such a value and formats itself redacted; [`redact_url`]
//! is the one place that knows where a password sits in a URL or a libpq key/value string.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that must never appear in logs, errors or `status` output (passwords in URLs).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The real value, for handing to a client library. Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The URL with any password replaced by `***`, for messages; each URL of a
    /// comma-separated list on its own.
    pub fn redacted(&self) -> String {
        split_url_list(&self.0)
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URLs of a comma-separated list (`RELAY_AMQP_URL` naming several nodes), each a
    /// `Secret` of its own; a value without a list is one URL.
    pub fn split(&self) -> Vec<Secret> {
        split_url_list(&self.0)
            .into_iter()
            .map(|u| Secret::new(u.trim()))
            .collect()
    }
}

/// Splits `a://…,b://…` at the commas that start another URL. A comma elsewhere stays: in a
/// password, or between the hosts of a libpq multi-host URL (`postgres://h1:5432,h2:5432/db`),
/// where the piece after it names no scheme.
fn split_url_list(value: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let next = value[i + 1..].trim_start();
        let scheme = next.split("://").next().unwrap_or_default();
        if next.contains("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            urls.push(&value[start..i]);
            start = i + 1;
        }
    }
    urls.push(&value[start..]);
    urls
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL (and a `password=` pair of a
/// key/value connection string) with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // The password may hold `/`, `?` or `#` unencoded: the user info ends at the last `@`.
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|pair| {
            if pair.to_ascii_lowercase().starts_with("password=") {
                "password=***".to_string()
            } else {
                pair.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://relay:s3cret@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
        assert_eq!(
            redact_url("postgres://u:pa/ss?w#x@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("host=db password=hunter2 user=x"),
            "host=db password=*** user=x"
        );
    }

    #[test]
    fn a_list_of_urls_is_split_at_the_commas_that_start_a_url() {
        let list = Secret::new(
            "amqp://guest:a,b@127.0.0.1:5701/%2f, amqp://guest:c@127.0.0.1:5702/%2f,amqps://h3",
        );
        let parts: Vec<String> = list
            .split()
            .iter()
            .map(|s| s.expose().to_string())
            .collect();
        assert_eq!(
            parts,
            [
                "amqp://guest:a,b@127.0.0.1:5701/%2f",
                "amqp://guest:c@127.0.0.1:5702/%2f",
                "amqps://h3"
            ]
        );
        assert_eq!(
            list.redacted(),
            "amqp://guest:***@127.0.0.1:5701/%2f, amqp://guest:***@127.0.0.1:5702/%2f,amqps://h3"
        );
        let pg = Secret::new("postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write");
        assert_eq!(pg.split().len(), 1);
        assert_eq!(
            pg.redacted(),
            "postgres://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write"
        );
    }

    #[test]
    fn secret_debug_never_shows_the_password() {
        let s = Secret::new("postgres://u:topsecret@h/db");
        assert!(!format!("{s:?}").contains("topsecret"));
    }
}
