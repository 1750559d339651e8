//! Reading configuration from the environment, with messages that name the variable.

use std::str::FromStr;
use std::time::Duration;

/// The variable's value, or `default` when it is unset or empty.
pub fn string(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The first of `names` that is set (and not empty).
pub fn first_of(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// A parsed variable, or `default` when unset.
pub fn parsed<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match first_of(&[name]) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?} is invalid: {e}")),
    }
}

/// A duration such as `500ms` or `2s`, or `default` when unset.
pub fn duration(name: &str, default: Duration) -> anyhow::Result<Duration> {
    match first_of(&[name]) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|e| {
            anyhow::anyhow!("{name}={v:?} is not a duration like `500ms` or `2s`: {e}")
        }),
    }
}

/// Hides the password of a `scheme://user:password@host` URL in messages.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("amqp://guest:secret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact("postgres://app@db/app"), "postgres://app@db/app");
    }
}
