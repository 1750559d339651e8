//! Shared helpers of the end-to-end suite: a database per test, the real `outbox-relay` binary
//! as a child process, concurrent writers, plain Kafka and AMQP consumers, and the checker that
//! counts every event.
//!
//! Services (Postgres, RabbitMQ, tansu) are expected on their fixed local ports; `scripts/test`
//! starts them with `scripts/services`. Postgres is 127.0.0.1:5432 unless `OUTBOX_TEST_PG_PORT`
//! names another port (the version matrix of `scripts/test` runs on 5416, 5417 and 5418). With
//! `OUTBOX_TEST_PG_MAJOR` set too, every test database checks that the server is that major
//! version, so a matrix run can never silently test another Postgres.

#![allow(dead_code)]

/// One test per source for a scenario `fn(Mode) -> impl Future`: the poll and wal suites share
/// their scenario code.
macro_rules! for_both_sources {
    ($($name:ident => $scenario:expr;)+) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poll() {
                ($scenario)(Mode::Poll).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn wal() {
                ($scenario)(Mode::Wal).await
            }
        }
    )+};
}

pub mod amqp;
pub mod kafka;
pub mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const WRITER_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The port of the tests' Postgres: `OUTBOX_TEST_PG_PORT`, else 5432 (Debian's 15). Every URL and
/// `psql` call of the suite takes it from here, so the version matrix reaches the server it names.
pub fn pg_port() -> u16 {
    match std::env::var("OUTBOX_TEST_PG_PORT") {
        Ok(port) => port
            .parse()
            .unwrap_or_else(|_| panic!("OUTBOX_TEST_PG_PORT={port:?} is not a port number")),
        Err(_) => 5432,
    }
}

/// `postgres://{user}@127.0.0.1:{pg_port()}/{database}`; `user` may carry `:password`.
pub fn pg_url(user: &str, database: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{}/{database}", pg_port())
}

/// The superuser's connection to the maintenance database.
pub fn pg_admin_url() -> String {
    pg_url("postgres", "postgres")
}

/// `psql` (or another libpq client such as `pg_recvlogical`) as the superuser on the tests'
/// Postgres; add `-d` and what to run.
pub fn pg_client(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg_port().to_string(),
        "-U",
        "postgres",
    ]);
    cmd
}

/// Runs `scripts/services <args>` (starting and stopping cluster nodes); panics with its
/// output when it fails.
pub fn services(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    let out = Command::new(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/services {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the relay of `s`, which must stop by itself within `within` with a non-zero exit and
/// exactly one error line (the start-up error, or an error-level event): that line, and the
/// whole log.
pub fn refused_start(s: &Scenario, within: Duration) -> (String, String) {
    let mut relay = s.start_relay();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = relay.exited() {
            break status;
        }
        assert!(
            started.elapsed() < within,
            "the relay kept running for {within:?} instead of stopping at start-up:\n{}",
            relay.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let logs = relay.logs();
    assert!(!status.success(), "the relay exited with {status}:\n{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.starts_with("outbox-relay: error"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{logs}");
    (errors[0].to_string(), logs.clone())
}

/// Starts the relay of `s` and reads with `reader` until every one of `written` arrived (or
/// `timeout`): all of them, in order per aggregate, or the relay's log is printed and the test
/// fails. The relay is returned, still running.
pub async fn relay_delivers_all(
    s: &Scenario,
    reader: &mut AnyReader,
    written: &[Written],
    timeout: Duration,
) -> Relay {
    let relay = s.start_relay();
    let got = reader.read_until(written, timeout).await;
    let t = tally(written, &got);
    if t.missing > 0 {
        eprintln!("{}", relay.logs());
    }
    t.assert_complete_and_ordered();
    relay
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}; run scripts/services"));
    tokio::spawn(conn);
    client
}

/// A database of its own, dropped (forcefully) at the end of the test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    /// A replication slot to drop with the database.
    pub slot: Option<String>,
    /// Roles to drop after the database.
    pub roles: Vec<String>,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = unique("relay_test");
        let admin = connect(&pg_admin_url()).await;
        if let Ok(major) = std::env::var("OUTBOX_TEST_PG_MAJOR") {
            let version: String = admin
                .query_one("SELECT current_setting('server_version_num')", &[])
                .await
                .expect("server_version_num")
                .get(0);
            assert!(
                version.len() == 6 && version.starts_with(&major),
                "OUTBOX_TEST_PG_MAJOR={major}, but Postgres on port {} is {version}",
                pg_port()
            );
        }
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        Self {
            url: pg_url("postgres", &name),
            name,
            slot: None,
            roles: vec![],
        }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops `role` once the database is gone.
    pub fn drop_role_later(&mut self, role: String) {
        self.roles.push(role);
    }
}

fn psql(sql: &str) -> bool {
    pg_client("psql")
        .args(["-d", "postgres", "-qc", sql])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // A slot keeps its database alive: drop it first (its walsender may take a moment to
        // notice that the relay is gone).
        for _ in 0..50 {
            if psql(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{0}' AND active_pid IS NOT NULL; \
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{0}'",
                self.name
            )) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
        for role in &self.roles {
            psql(&format!("DROP ROLE IF EXISTS {role}"));
        }
    }
}

/// Where the relay reads the outbox from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Poll,
    Wal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Kafka,
    Rabbitmq,
}

/// One relay set-up: database, broker, unique destination names and the config file.
pub struct Scenario {
    pub db: TestDb,
    pub mode: Mode,
    pub broker: Broker,
    /// Replication slot of this scenario (wal mode); slots are cluster-wide, so unique.
    pub slot: String,
    /// Kafka topic prefix (`<prefix>.{aggregate_type}`) or AMQP exchange name.
    pub destination: String,
    pub kafka_brokers: String,
    pub extra_toml: String,
    pub extra_env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Scenario {
    pub async fn new(broker: Broker) -> Self {
        Self::with_toml(broker, "").await
    }

    /// `extra_toml` is appended to the generated config (sections must not repeat).
    pub async fn with_toml(broker: Broker, extra_toml: &str) -> Self {
        Self::of(Mode::Poll, broker, extra_toml).await
    }

    pub async fn of(mode: Mode, broker: Broker, extra_toml: &str) -> Self {
        let mut db = TestDb::create().await;
        let slot = unique("slot");
        db.slot = Some(slot.clone());
        let dir = std::env::temp_dir().join(unique("relay_scenario"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            destination: unique("t"),
            db,
            mode,
            slot,
            broker,
            kafka_brokers: KAFKA_BROKERS.into(),
            extra_toml: extra_toml.into(),
            extra_env: vec![],
            dir,
        }
    }

    /// A scenario whose extra TOML is built from its unique destination name (a topic prefix
    /// or an exchange), for sections that replace the generated `[kafka]` or `[rabbitmq]`.
    pub async fn with_destination(
        mode: Mode,
        broker: Broker,
        toml: impl Fn(&str) -> String,
    ) -> Self {
        let mut s = Self::of(mode, broker, "").await;
        s.extra_toml = toml(&s.destination);
        s
    }

    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.destination)
    }

    pub fn config_toml(&self) -> String {
        let mut toml = String::new();
        toml.push_str(&self.extra_toml);
        toml.push('\n');
        match self.broker {
            Broker::Kafka if !self.extra_toml.contains("[kafka]") => toml.push_str(&format!(
                "[kafka]\ntopic = \"{}.{{aggregate_type}}\"\ncreate_topics = true\npartitions = 3\nmessage_timeout = \"10s\"\n",
                self.destination
            )),
            Broker::Rabbitmq if !self.extra_toml.contains("[rabbitmq]") => toml.push_str(
                &format!("[rabbitmq]\nexchange = \"{}\"\n", self.destination),
            ),
            _ => {}
        }
        if self.mode == Mode::Wal && !self.extra_toml.contains("[wal]") {
            toml.push_str(&format!("[wal]\nslot = \"{}\"\n", self.slot));
        }
        toml
    }

    pub fn config_path(&self) -> PathBuf {
        let path = self.dir.join("relay.toml");
        // Written aside and renamed over: a relay started a moment before may be reading it
        // (a plain write truncates first, and a chaos run's relay once started with an empty
        // config, all defaults, publishing to a topic that did not exist).
        let aside = self
            .dir
            .join(format!("relay.toml.{}", Uuid::new_v4().simple()));
        std::fs::write(&aside, self.config_toml()).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        path
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_string(), self.db.url.clone()),
            (
                "RELAY_SOURCE".into(),
                match self.mode {
                    Mode::Poll => "poll".into(),
                    Mode::Wal => "wal".into(),
                },
            ),
            (
                "RELAY_SINK".into(),
                match self.broker {
                    Broker::Kafka => "kafka".into(),
                    Broker::Rabbitmq => "rabbitmq".into(),
                },
            ),
            ("RELAY_KAFKA_BROKERS".into(), self.kafka_brokers.clone()),
            ("RELAY_AMQP_URL".into(), AMQP_URL.into()),
            // Many relays run at once: each takes an ephemeral port (logged at start-up).
            ("RELAY_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            (
                "RUST_LOG".into(),
                "info,outbox_relay=debug,rdkafka=warn,lapin=error".into(),
            ),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// Runs `outbox-relay <args>` to completion.
    pub fn command(&self, args: &[&str]) -> CommandOutput {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .envs(self.env())
            .output()
            .expect("run outbox-relay");
        CommandOutput::from(out)
    }

    pub fn migrate(&self) {
        let out = self.command(&["migrate"]);
        assert!(out.status.success(), "migrate failed: {}", out.stderr);
    }

    pub fn start_relay(&self) -> Relay {
        Relay::start(self, &format!("relay-{}", Uuid::new_v4().simple()))
    }

    pub async fn kafka_reader(&self) -> kafka::Reader {
        kafka::Reader::new(&self.kafka_brokers)
    }

    pub async fn amqp_reader(&self, binding: &str) -> amqp::Reader {
        amqp::Reader::bind(&self.destination, binding).await
    }

    /// A reader for this scenario's broker, subscribed to every event of `aggregate_types`.
    pub async fn reader(&self, aggregate_types: &[&str]) -> AnyReader {
        match self.broker {
            Broker::Kafka => {
                let mut r = self.kafka_reader().await;
                for t in aggregate_types {
                    r.add_topic(self.topic(t));
                }
                AnyReader::Kafka(r)
            }
            Broker::Rabbitmq => AnyReader::Amqp(self.amqp_reader("#").await),
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // A failed test keeps its relays' logs and config for the post-mortem.
        if std::thread::panicking() {
            eprintln!("scenario kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for CommandOutput {
    fn from(o: std::process::Output) -> Self {
        Self {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The relay binary running as a child process, logging to a file.
pub struct Relay {
    child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl Relay {
    fn start(s: &Scenario, name: &str) -> Self {
        let log = s.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .arg("run")
            .arg("--config")
            .arg(s.config_path())
            .envs(s.env())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start outbox-relay");
        Self {
            child: Some(child),
            log,
            name: name.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log: where a failure message shows what the relay did last
    /// (CI prints the head of a long message).
    pub fn logs_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let skipped = lines.len().saturating_sub(n);
        let mut out = if skipped > 0 {
            format!("[{skipped} earlier lines left out]\n")
        } else {
            String::new()
        };
        out.push_str(&lines[skipped..].join("\n"));
        out
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Waits for `needle` in the relay's log; fails the test with the log if it does not come.
    pub async fn expect_log(&self, needle: &str, timeout: Duration) {
        assert!(
            self.wait_for_log(needle, timeout).await,
            "the relay did not log `{needle}` within {timeout:?}:\n{}",
            self.logs()
        );
    }
}

impl Relay {
    /// The relay's HTTP address, from its start-up log line.
    pub async fn http_base(&self) -> String {
        assert!(
            self.wait_for_log("serving /metrics", Duration::from_secs(30))
                .await,
            "{}",
            self.logs()
        );
        let logs = self.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("serving /metrics"))
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap()
            .to_string();
        format!("http://{addr}")
    }

    /// Whether `/readyz` says this instance is the active relay (false when unreachable).
    pub async fn is_active(&self, base: &str) -> bool {
        http_get(&format!("{base}/readyz"))
            .await
            .1
            .contains("\"active\":true")
    }
}

/// A plain HTTP/1.1 GET: status and body; status 0 when the server is unreachable.
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url.strip_prefix("http://").unwrap_or(url);
    let (addr, path) = url.split_once('/').unwrap_or((url, ""));
    let Ok(Ok(mut sock)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await
    else {
        return (0, String::new());
    };
    let request = format!("GET /{path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    if sock.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_string(&mut out)).await;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An event a writer committed.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: String,
    pub aggregate_id: String,
    pub n: u64,
}

/// Inserts one `wallet` event (`Happened`, payload `{"n": n}`) through `client`, typically an
/// open transaction the test commits (or not) itself.
pub async fn insert_wallet_event(
    client: &impl tokio_postgres::GenericClient,
    aggregate_id: &str,
    n: u64,
) -> Written {
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, 'wallet', $2, 'Happened', jsonb_build_object('n', $3::bigint))",
            &[&id, &aggregate_id, &(n as i64)],
        )
        .await
        .unwrap();
    Written {
        id: id.to_string(),
        aggregate_id: aggregate_id.into(),
        n,
    }
}

/// Writes `per_aggregate` events for each of `aggregates` aggregates of type `aggregate_type`,
/// from `writers` concurrent connections, one transaction per event. Each aggregate belongs to
/// one writer, so its events commit in `n` order. A failed transaction (Postgres restarting) is
/// retried with the same event id until it is known to be committed.
pub async fn write_events(
    url: &str,
    aggregate_type: &str,
    aggregates: usize,
    per_aggregate: u64,
    writers: usize,
) -> Vec<Written> {
    write_events_paced(
        url,
        aggregate_type,
        aggregates,
        per_aggregate,
        writers,
        None,
    )
    .await
}

/// Like [`write_events`], sleeping `pause` between transactions of each writer.
pub async fn write_events_paced(
    url: &str,
    aggregate_type: &str,
    aggregates: usize,
    per_aggregate: u64,
    writers: usize,
    pause: Option<Duration>,
) -> Vec<Written> {
    let mut tasks = Vec::new();
    let prefix = unique("agg");
    for w in 0..writers {
        let url = url.to_string();
        let aggregate_type = aggregate_type.to_string();
        let mine: Vec<String> = (0..aggregates)
            .filter(|a| a % writers == w)
            .map(|a| format!("{prefix}-{a}"))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            let mut client = connect(&url).await;
            for n in 0..per_aggregate {
                for aggregate_id in &mine {
                    let id = Uuid::new_v4();
                    loop {
                        match insert_event(&client, &id, &aggregate_type, aggregate_id, n).await {
                            Ok(()) => break,
                            Err(e) if e.code().map(|c| c.code()) == Some("23505") => break,
                            Err(_) => {
                                // Postgres is restarting: reconnect and try the same id again.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                if let Ok((c, conn)) = tokio_postgres::connect(&url, NoTls).await {
                                    tokio::spawn(conn);
                                    client = c;
                                }
                            }
                        }
                    }
                    written.push(Written {
                        id: id.to_string(),
                        aggregate_id: aggregate_id.clone(),
                        n,
                    });
                    if let Some(p) = pause {
                        tokio::time::sleep(p).await;
                    }
                }
            }
            written
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer task"));
    }
    all
}

async fn insert_event(
    client: &Client,
    id: &Uuid,
    aggregate_type: &str,
    aggregate_id: &str,
    n: u64,
) -> Result<(), tokio_postgres::Error> {
    let payload = serde_json::json!({ "aggregate_id": aggregate_id, "n": n });
    client
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, traceparent, tracestate) \
             VALUES ($1, $2, $3, 'Happened', $4, '{\"tenant\": \"acme\"}', $5, 'vendor=1')",
            &[id, &aggregate_type, &aggregate_id, &payload, &WRITER_TRACEPARENT],
        )
        .await
        .map(|_| ())
}

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: Option<String>,
    /// Topic (Kafka) or routing key (AMQP).
    pub destination: String,
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
    /// The body's bytes as they arrived; `None` for a Kafka record with a null value.
    pub body: Option<Vec<u8>>,
    /// Kafka: the partition the record is in.
    pub partition: Option<i32>,
    pub amqp: Option<AmqpProps>,
    /// The broker redelivered it to the consumer (AMQP `redelivered`): a consumer-side
    /// duplicate, not one the relay sent.
    pub redelivered: bool,
}

#[derive(Debug, Clone)]
pub struct AmqpProps {
    pub message_id: Option<String>,
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
}

impl Received {
    /// The event id: the `id` header, a CloudEvent's `id` attribute in either binding's
    /// headers, or in a structured-mode document.
    pub fn id(&self) -> &str {
        let structured = self.content_type() == Some("application/cloudevents+json");
        ["id", "ce_id", "ce-id"]
            .iter()
            .find_map(|k| self.headers.get(*k))
            .map(String::as_str)
            .or_else(|| {
                structured
                    .then(|| self.payload.get("id").and_then(|v| v.as_str()))
                    .flatten()
            })
            .unwrap_or("")
    }

    /// The content type: AMQP's property, or Kafka's `content-type` header.
    pub fn content_type(&self) -> Option<&str> {
        match &self.amqp {
            Some(p) => p.content_type.as_deref(),
            None => self.headers.get("content-type").map(String::as_str),
        }
    }
}

#[allow(clippy::large_enum_variant)] // one per test: size does not matter
pub enum AnyReader {
    Kafka(kafka::Reader),
    Amqp(amqp::Reader),
}

impl AnyReader {
    /// Reads until every id of `expected` has been seen or `timeout` passes; returns all
    /// messages read, duplicates included.
    pub async fn read_until(&mut self, expected: &[Written], timeout: Duration) -> Vec<Received> {
        let want: HashSet<&str> = expected.iter().map(|w| w.id.as_str()).collect();
        match self {
            AnyReader::Kafka(r) => r.read_until(&want, timeout).await,
            AnyReader::Amqp(r) => r.read_until(&want, timeout).await,
        }
    }

    /// Everything that arrives within `window`.
    pub async fn read_for(&mut self, window: Duration) -> Vec<Received> {
        let none = HashSet::from(["\u{0}never"]);
        match self {
            AnyReader::Kafka(r) => r.read_until(&none, window).await,
            AnyReader::Amqp(r) => r.read_until(&none, window).await,
        }
    }
}

/// The ids of `want` not among `seen`.
fn remaining(want: &HashSet<&str>, seen: &[Received]) -> HashSet<String> {
    let seen: HashSet<&str> = seen.iter().map(|r| r.id()).collect();
    want.iter()
        .filter(|id| !seen.contains(*id))
        .map(|id| id.to_string())
        .collect()
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: usize,
    pub received: usize,
    pub unique: usize,
    pub duplicates: usize,
    /// Of the duplicates, those the broker redelivered to our consumer (not the relay's).
    pub consumer_redeliveries: usize,
    pub missing: usize,
    pub unexpected: usize,
    pub order_violations: usize,
    /// Aggregates whose received messages do not hold all of their events in order, copies
    /// aside: a consumer that applies an aggregate's event only when it is the next one (and
    /// drops the rest) would miss one. An event that overtook an earlier one that failed is an
    /// order violation above, but not one here when it was sent again behind that one.
    pub unordered_aggregates: usize,
}

impl Tally {
    fn assert_complete(&self) {
        assert_eq!(self.missing, 0, "events lost: {self:?}");
        assert_eq!(self.unexpected, 0, "unknown events received: {self:?}");
    }

    /// Every event arrived, and each aggregate's events arrived in order at least once: what
    /// was delivered ahead of an earlier event of its aggregate was delivered again behind it.
    /// (What the relay promises when a broker may write a message whose delivery report said
    /// it failed; see `assert_complete_and_ordered` for runs where that cannot happen.)
    pub fn assert_complete_with_in_order_copies(&self) {
        self.assert_complete();
        assert_eq!(
            self.unordered_aggregates, 0,
            "an event overtook an earlier one of its aggregate and was never sent again behind it: {self:?}"
        );
    }

    pub fn assert_complete_and_ordered(&self) {
        self.assert_complete();
        assert_eq!(
            self.order_violations, 0,
            "per-aggregate order broken: {self:?}"
        );
    }
}

/// Counts every event: missing, duplicates, and per-aggregate order among first deliveries.
pub fn tally(expected: &[Written], received: &[Received]) -> Tally {
    let by_id: HashMap<&str, &Written> = expected.iter().map(|w| (w.id.as_str(), w)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut last_n: HashMap<&str, u64> = HashMap::new();
    let mut t = Tally {
        sent: expected.len(),
        received: received.len(),
        ..Default::default()
    };
    for r in received {
        let Some(w) = by_id.get(r.id()) else {
            t.unexpected += 1;
            continue;
        };
        if !seen.insert(w.id.as_str()) {
            t.duplicates += 1;
            if r.redelivered {
                t.consumer_redeliveries += 1;
            }
            continue;
        }
        if let Some(prev) = last_n.get(w.aggregate_id.as_str())
            && *prev >= w.n
        {
            t.order_violations += 1;
        }
        last_n.insert(w.aggregate_id.as_str(), w.n);
    }
    t.unique = seen.len();
    t.missing = expected.len() - t.unique;
    // Per aggregate, the events it should hold in order, checked against everything received
    // (copies included): a greedy pass finds an in-order subsequence if there is one.
    let mut wanted: HashMap<&str, Vec<u64>> = HashMap::new();
    for w in expected {
        wanted.entry(w.aggregate_id.as_str()).or_default().push(w.n);
    }
    for ns in wanted.values_mut() {
        ns.sort_unstable();
    }
    let mut next: HashMap<&str, usize> = HashMap::new();
    for r in received {
        let Some(w) = by_id.get(r.id()) else { continue };
        let agg = w.aggregate_id.as_str();
        let i = next.entry(agg).or_default();
        if wanted[agg].get(*i) == Some(&w.n) {
            *i += 1;
        }
    }
    t.unordered_aggregates = wanted
        .iter()
        .filter(|(agg, ns)| next.get(*agg).copied().unwrap_or(0) < ns.len())
        .count();
    t
}

/// Waits until `cond` holds, polling every 100 ms; false on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The slot's confirmed position and the WAL it retains, in bytes.
pub async fn slot_position(db: &TestDb, slot: &str) -> (u64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    (row.get::<_, i64>(0) as u64, row.get(1))
}

pub async fn current_wal_lsn(db: &TestDb) -> u64 {
    db.client()
        .await
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64
}

/// Peak resident memory of a process, in KiB (Linux `VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Rows still waiting to be published.
pub async fn pending_count(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM outbox WHERE relay_published_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
