//! TLS to Postgres, following libpq's `sslmode` (`disable`, `prefer` — the default —,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert` in `DATABASE_URL`
//! (<https://www.postgresql.org/docs/15/libpq-ssl.html>).
//!
//! tokio-postgres itself knows only `disable`/`prefer`/`require` and no `sslrootcert`, so the
//! URL is read here first: the two settings are taken out, the rest goes to tokio-postgres, and
//! the same settings drive the replication connection of the wal source.
//!
//! Kafka (`kafka.properties`: `security.protocol`, `ssl.ca.location`, `sasl.mechanisms`, ...)
//! and RabbitMQ (`amqps://` URLs) take their TLS settings from their own configuration.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use crate::config::Secret;
use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// `DATABASE_URL`, split into what tokio-postgres takes and the TLS settings.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub ssl: SslMode,
    pub root_cert: Option<PathBuf>,
}

fn mode(value: &str) -> Result<SslMode, String> {
    Ok(match value {
        "disable" | "allow" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(format!(
                "sslmode `{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ));
        }
    })
}

impl PgTarget {
    pub fn parse(url: &Secret) -> Result<Self, Error> {
        let bad = |e: String| {
            Error::Config(format!(
                "DATABASE_URL `{}` is not a valid Postgres connection string: {e}",
                url.redacted()
            ))
        };
        let raw = url.expose();
        let mut ssl = SslMode::Prefer;
        let mut root_cert = None;
        let mut take = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                "sslmode" => ssl = mode(value)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(value)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
            match raw.split_once('?') {
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(k, v).map_err(bad)? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() {
                        base.to_string()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
                None => raw.to_string(),
            }
        } else {
            let mut kept = Vec::new();
            for pair in raw.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if !take(k, v.trim_matches('\'')).map_err(bad)? {
                    kept.push(pair);
                }
            }
            kept.join(" ")
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(e.to_string()))?;
        config.ssl_mode(match ssl {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Self {
            config,
            ssl,
            root_cert,
        })
    }

    /// The TLS connector for tokio-postgres: no verification for `prefer`/`require` (libpq's
    /// meaning), the CA for `verify-ca`, CA and host name for `verify-full`.
    ///
    /// Built once per process for each (mode, CA certificate): setting one up loads the
    /// system's CA bundle, which cost more CPU than a whole batch of events when it was done
    /// for every connection. The CA file is read each time, so a replaced one is picked up.
    pub fn connector(&self) -> Result<postgres_native_tls::MakeTlsConnector, Error> {
        type Key = (SslMode, Option<Vec<u8>>);
        static BUILT: OnceLock<Mutex<Vec<(Key, postgres_native_tls::MakeTlsConnector)>>> =
            OnceLock::new();
        let pem = match &self.root_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                Error::Config(format!(
                    "sslrootcert `{}` cannot be read: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let key = (self.ssl, pem);
        let built = BUILT.get_or_init(Default::default);
        let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = built.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let connector = self.build_connector(key.1.as_deref())?;
        built.push((key, connector.clone()));
        Ok(connector)
    }

    fn build_connector(
        &self,
        pem: Option<&[u8]>,
    ) -> Result<postgres_native_tls::MakeTlsConnector, Error> {
        let mut builder = native_tls::TlsConnector::builder();
        if let (Some(pem), Some(path)) = (pem, &self.root_cert) {
            let cert = native_tls::Certificate::from_pem(pem).map_err(|e| {
                Error::Config(format!(
                    "sslrootcert `{}` is not a PEM certificate: {e}",
                    path.display()
                ))
            })?;
            builder.add_root_certificate(cert);
        }
        match self.ssl {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => {
                builder.danger_accept_invalid_certs(true);
            }
            SslMode::VerifyCa => {
                builder.danger_accept_invalid_hostnames(true);
            }
            SslMode::VerifyFull => {}
        }
        let connector = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot set up TLS for Postgres: {e}")))?;
        Ok(postgres_native_tls::MakeTlsConnector::new(connector))
    }

    /// The same settings for the replication connection (pgwire-replication, rustls).
    pub fn replication_tls(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        match self.ssl {
            // Replication has no fallback: `prefer` stays plain, as most local set-ups expect;
            // set sslmode=require (or verify-*) to encrypt both connections.
            SslMode::Disable | SslMode::Prefer => TlsConfig::disabled(),
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(self.root_cert.clone()),
            SslMode::VerifyFull => TlsConfig::verify_full(self.root_cert.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_libpq_tls_settings_out_of_the_url() {
        let t = PgTarget::parse(&Secret::new(
            "postgres://relay:pw@db:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x",
        ))
        .unwrap();
        assert_eq!(t.ssl, SslMode::VerifyFull);
        assert_eq!(
            t.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(t.config.get_dbname(), Some("app"));
        let kv = PgTarget::parse(&Secret::new("host=db user=relay sslmode=require")).unwrap();
        assert_eq!(kv.ssl, SslMode::Require);
        assert_eq!(
            PgTarget::parse(&Secret::new("postgres://db/app"))
                .unwrap()
                .ssl,
            SslMode::Prefer
        );
    }

    #[test]
    fn a_bad_sslmode_is_a_clear_error_without_the_password() {
        let e = PgTarget::parse(&Secret::new("postgres://u:hunter2@db/app?sslmode=always"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode `always`"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
