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

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::config::secret::Secret;
use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Which of the settings that notice a vanished server `DATABASE_URL` sets itself.
///
/// A server that goes away without closing the connection (its host lost power, a failover
/// moved its address, a NAT or load balancer forgot the connection) sends nothing more, and by
/// default the operating system notices only after about two hours of silence. Unless the URL
/// says otherwise the relay's connections ask the kernel to notice within about 30 s: keep-alive
/// probes after 10 s of silence, every 5 s, 3 unanswered ones end the connection
/// (`keepalives_idle`, `keepalives_interval`, `keepalives_retries` or libpq's
/// `keepalives_count`), and data the server has not acknowledged for 30 s ends it too
/// (`tcp_user_timeout`, ms, Linux). The relay then reconnects as after any lost connection.
#[derive(Debug, Default)]
struct DeadPeer {
    /// `keepalives_idle` and `keepalives_interval` are in the URL (tokio-postgres reads them).
    idle: bool,
    interval: bool,
    /// `keepalives_retries`, or libpq's `keepalives_count`.
    retries: Option<u32>,
    /// `tcp_user_timeout` in milliseconds; `0`: the system's default (no limit).
    user_timeout_ms: Option<u64>,
}

impl DeadPeer {
    const IDLE: Duration = Duration::from_secs(10);
    const INTERVAL: Duration = Duration::from_secs(5);
    const RETRIES: u32 = 3;
    const USER_TIMEOUT: Duration = Duration::from_secs(30);

    fn apply(&self, config: &mut tokio_postgres::Config) {
        if !self.idle {
            config.keepalives_idle(Self::IDLE);
        }
        if !self.interval {
            config.keepalives_interval(Self::INTERVAL);
        }
        config.keepalives_retries(self.retries.unwrap_or(Self::RETRIES));
        match self.user_timeout_ms {
            None => {
                config.tcp_user_timeout(Self::USER_TIMEOUT);
            }
            Some(0) => {}
            Some(ms) => {
                config.tcp_user_timeout(Duration::from_millis(ms));
            }
        }
    }
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
        let mut primary = false;
        let mut dead_peer = DeadPeer::default();
        let mut take = |key: &str, value: &str| -> Result<bool, String> {
            match key {
                "sslmode" => ssl = mode(value)?,
                "sslrootcert" => root_cert = Some(PathBuf::from(value)),
                // Read by tokio-postgres; only noted here, so the default is not applied.
                "keepalives_idle" => {
                    dead_peer.idle = true;
                    return Ok(false);
                }
                "keepalives_interval" => {
                    dead_peer.interval = true;
                    return Ok(false);
                }
                // libpq calls it `keepalives_count`, tokio-postgres `keepalives_retries`.
                "keepalives_count" | "keepalives_retries" => {
                    let n = value
                        .parse()
                        .map_err(|_| format!("{key} `{value}` is not a number of probes"))?;
                    dead_peer.retries = Some(n);
                }
                // Milliseconds, as in libpq (tokio-postgres would read seconds).
                "tcp_user_timeout" => {
                    let ms = value.parse().map_err(|_| {
                        format!("tcp_user_timeout `{value}` is not a number of milliseconds")
                    })?;
                    dead_peer.user_timeout_ms = Some(ms);
                }
                // libpq's values; tokio-postgres knows `any` and `read-write`. `primary` (a
                // server not in recovery) is what read-write finds too; a standby cannot
                // serve the relay, which writes.
                "target_session_attrs" => match value {
                    "any" | "read-write" => return Ok(false),
                    "primary" => primary = true,
                    "read-only" | "standby" | "prefer-standby" => {
                        return Err(format!(
                            "target_session_attrs={value} would connect to a standby, but the relay writes (bookkeeping, the slot, marking rows): use target_session_attrs=read-write (or primary)"
                        ));
                    }
                    other => {
                        return Err(format!(
                            "target_session_attrs `{other}` is not one of any, read-write, primary"
                        ));
                    }
                },
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
                    if primary {
                        kept.push("target_session_attrs=read-write");
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
            if primary {
                kept.push("target_session_attrs=read-write");
            }
            kept.join(" ")
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(e.to_string()))?;
        if config.get_hosts().len() > 1
            && config.get_target_session_attrs()
                != tokio_postgres::config::TargetSessionAttrs::ReadWrite
        {
            return Err(bad(
                "it names several hosts without target_session_attrs=read-write: the relay writes (bookkeeping, slot), so add ?target_session_attrs=read-write to connect to the primary among them".into(),
            ));
        }
        dead_peer.apply(&mut config);
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

    /// The configured `(host, port)` pairs, in order (libpq: one port for all hosts, or one
    /// per host; 5432 when none).
    pub fn hosts(&self) -> Vec<(String, u16)> {
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                (host, port)
            })
            .collect()
    }

    /// The TLS connector for tokio-postgres: no verification for `prefer`/`require` (libpq's
    /// meaning), the CA for `verify-ca`, CA and host name for `verify-full`.
    ///
    /// The CA file is read and checked here, so a bad one is a start-up error; the OpenSSL
    /// context is only built when a server accepts TLS, once per process for each (mode, CA):
    /// building one loads the system's CA bundle, about 0.15 s of CPU, which a relay talking
    /// to a server without TLS (`prefer`, the default) never needs.
    pub fn connector(&self) -> Result<LazyTls, Error> {
        let pem = match &self.root_cert {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::Config(format!(
                        "sslrootcert `{}` cannot be read: {e}",
                        path.display()
                    ))
                })?;
                native_tls::Certificate::from_pem(&pem).map_err(|e| {
                    Error::Config(format!(
                        "sslrootcert `{}` is not a PEM certificate: {e}",
                        path.display()
                    ))
                })?;
                Some(pem)
            }
            None => None,
        };
        Ok(LazyTls {
            key: Arc::new((self.ssl, pem)),
        })
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

type TlsKey = (SslMode, Option<Vec<u8>>);

/// tokio-postgres's TLS set-up that builds the OpenSSL context on first use (see
/// [`PgTarget::connector`]).
#[derive(Clone)]
pub struct LazyTls {
    key: Arc<TlsKey>,
}

/// One server's handshake, for [`LazyTls`].
pub struct LazyTlsConnect {
    key: Arc<TlsKey>,
    domain: String,
}

fn built_connector(key: &TlsKey) -> Result<native_tls::TlsConnector, native_tls::Error> {
    static BUILT: OnceLock<Mutex<Vec<(TlsKey, native_tls::TlsConnector)>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = built.iter().find(|(k, _)| k == key) {
        return Ok(c.clone());
    }
    let (ssl, pem) = key;
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(pem) = pem {
        builder.add_root_certificate(native_tls::Certificate::from_pem(pem)?);
    }
    match ssl {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            builder.danger_accept_invalid_certs(true);
        }
        SslMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    let connector = builder.build()?;
    built.push((key.clone(), connector.clone()));
    Ok(connector)
}

impl<S> MakeTlsConnect<S> for LazyTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = postgres_native_tls::TlsStream<S>;
    type TlsConnect = LazyTlsConnect;
    type Error = native_tls::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<LazyTlsConnect, native_tls::Error> {
        Ok(LazyTlsConnect {
            key: self.key.clone(),
            domain: domain.to_string(),
        })
    }
}

impl<S> TlsConnect<S> for LazyTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = postgres_native_tls::TlsStream<S>;
    type Error = native_tls::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Stream, native_tls::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = built_connector(&self.key)?;
            postgres_native_tls::TlsConnector::new(connector, &self.domain)
                .connect(stream)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// keepalives_idle, keepalives_interval, keepalives_retries, tcp_user_timeout as
    /// tokio-postgres gets them.
    fn dead_peer(url: &str) -> (Duration, Option<Duration>, Option<u32>, Option<Duration>) {
        let c = PgTarget::parse(&Secret::new(url)).unwrap().config;
        assert!(c.get_keepalives(), "{url}");
        (
            c.get_keepalives_idle(),
            c.get_keepalives_interval(),
            c.get_keepalives_retries(),
            c.get_tcp_user_timeout().copied(),
        )
    }

    #[test]
    fn a_vanished_server_is_noticed_within_about_30_s_unless_the_url_says_otherwise() {
        let secs = Duration::from_secs;
        for url in ["postgres://u@db/app", "host=db user=u dbname=app"] {
            let defaults = (secs(10), Some(secs(5)), Some(3), Some(secs(30)));
            assert_eq!(dead_peer(url), defaults, "{url}");
        }
        // libpq's names and units: keepalives_count, tcp_user_timeout in milliseconds.
        for url in [
            "postgres://u@db/app?keepalives_idle=60&keepalives_interval=20&keepalives_count=9&tcp_user_timeout=1500",
            "host=db keepalives_idle=60 keepalives_interval=20 keepalives_count=9 tcp_user_timeout=1500",
        ] {
            let set = (
                secs(60),
                Some(secs(20)),
                Some(9),
                Some(Duration::from_millis(1500)),
            );
            assert_eq!(dead_peer(url), set, "{url}");
        }
        let c = PgTarget::parse(&Secret::new(
            "postgres://u@db/app?keepalives=0&keepalives_retries=4&tcp_user_timeout=0",
        ))
        .unwrap()
        .config;
        assert!(!c.get_keepalives());
        assert_eq!(c.get_keepalives_retries(), Some(4));
        assert_eq!(c.get_tcp_user_timeout(), None);
        for (url, error) in [
            (
                "postgres://u:pw@db/app?tcp_user_timeout=30s",
                "tcp_user_timeout `30s` is not a number of milliseconds",
            ),
            (
                "host=db password=pw keepalives_count=many",
                "keepalives_count `many` is not a number of probes",
            ),
        ] {
            let e = PgTarget::parse(&Secret::new(url)).unwrap_err().to_string();
            assert!(e.contains(error) && !e.contains("pw"), "{e}");
        }
    }

    #[test]
    fn target_session_attrs_primary_is_read_write_and_a_standby_is_refused() {
        use tokio_postgres::config::TargetSessionAttrs;
        for url in [
            "postgresql://u@h1,h2/app?target_session_attrs=primary",
            "host=h1,h2 dbname=app target_session_attrs=primary",
        ] {
            let t = PgTarget::parse(&Secret::new(url)).unwrap();
            assert_eq!(
                t.config.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite,
                "{url}"
            );
        }
        for value in ["prefer-standby", "standby", "read-only"] {
            let err = PgTarget::parse(&Secret::new(format!(
                "postgresql://u@h1,h2/app?target_session_attrs={value}"
            )))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!(
                    "target_session_attrs={value} would connect to a standby"
                )) && err.contains("use target_session_attrs=read-write"),
                "{err}"
            );
        }
    }

    #[test]
    fn several_hosts_need_read_write_and_keep_their_ports() {
        let t = PgTarget::parse(&Secret::new(
            "postgresql://u:pw@h1:5617,h2:5627/app?target_session_attrs=read-write",
        ))
        .unwrap();
        assert_eq!(
            t.hosts(),
            [("h1".to_string(), 5617), ("h2".to_string(), 5627)]
        );
        let one_port = PgTarget::parse(&Secret::new(
            "host=a,b port=6000 dbname=app target_session_attrs=read-write",
        ))
        .unwrap();
        assert_eq!(
            one_port.hosts(),
            [("a".to_string(), 6000), ("b".to_string(), 6000)]
        );
        let err = PgTarget::parse(&Secret::new("postgresql://u:pw@h1:5617,h2:5627/app"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("target_session_attrs=read-write"), "{err}");
        assert!(!err.contains("pw@"), "{err}");
    }

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
