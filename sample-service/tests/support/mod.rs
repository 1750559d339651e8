//! Shared test helpers: a database per test, child processes that die with the test, a tiny
//! HTTP client, and the `outbox-relay` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// The tests' Postgres port: `OUTBOX_TEST_PG_PORT`, else 5432 (as in the relay's e2e suite).
pub fn pg_port() -> String {
    std::env::var("OUTBOX_TEST_PG_PORT").unwrap_or_else(|_| "5432".into())
}

/// `postgres://postgres@127.0.0.1:{pg_port()}`, without a database.
pub fn pg() -> String {
    format!("postgres://postgres@127.0.0.1:{}", pg_port())
}

/// `psql` as the superuser on the tests' Postgres; add `-d` and what to run.
pub fn psql() -> Command {
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &pg_port(), "-U", "postgres"]);
    cmd
}
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A database of its own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(prefix: &str) -> Self {
        let name = unique(prefix);
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg()))
            .await
            .expect(
                "Postgres on 127.0.0.1 (OUTBOX_TEST_PG_PORT, default 5432); run scripts/services",
            );
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        Self {
            url: format!("{}/{name}", pg()),
            name,
        }
    }

    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = psql()
            .args(["-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The `outbox-relay` binary: `$OUTBOX_RELAY_BIN`, else the one next to this test binary
/// (`cargo nextest run --workspace` builds it), else built with `cargo build -p outbox-relay`.
pub fn relay_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("OUTBOX_RELAY_BIN") {
        return bin.into();
    }
    // target/<profile>/deps/samples-<hash> -> target/<profile>/outbox-relay
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let candidate = profile_dir.join("outbox-relay");
    if candidate.exists() {
        return candidate;
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-p", "outbox-relay"])
        .env(
            "CARGO_TARGET_DIR",
            profile_dir.parent().unwrap().as_os_str(),
        )
        .status()
        .expect("run cargo build -p outbox-relay");
    assert!(status.success(), "cargo build -p outbox-relay failed");
    candidate
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped; its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[&str], env: &[(&str, String)]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's log when it already exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.output());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free local address for a service to listen on (bound, then released). Taken below the
/// kernel's ephemeral range (32768-60999): a port the kernel handed out for `:0` was sometimes
/// taken again, by an outgoing connection of a test running beside, before the service bound it
/// ("Address already in use").
pub fn free_addr() -> String {
    use std::hash::{BuildHasher, RandomState};
    for attempt in 0u64.. {
        let port = 20_000 + (RandomState::new().hash_one(attempt) % 12_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap().to_string();
        }
    }
    unreachable!()
}

/// A response of [`http`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client (one request per connection), enough for the wallet API.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    })
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
