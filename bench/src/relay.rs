//! The relay under test: the real `outbox-relay` binary as a child process, configured the way
//! the end-to-end suite does it (the fixed env names plus a TOML file with unique topic,
//! exchange and slot names), its `/metrics`, and its footprint from `/proc`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::combo::{Combo, SinkKind, SourceKind};

/// Everything that names one relay set-up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub database_url: String,
    pub combo: Combo,
    pub kafka_brokers: String,
    pub amqp_url: String,
    /// Kafka topic prefix (`<destination>.{aggregate_type}`) or AMQP exchange.
    pub destination: String,
    pub slot: String,
    /// Extra relay settings (`RELAY_<SECTION>__<KEY>`), applied last.
    pub extra_env: Vec<(String, String)>,
}

impl Setup {
    pub fn topic(&self) -> String {
        format!("{}.{}", self.destination, crate::pg::AGGREGATE_TYPE)
    }

    fn config_path(&self) -> Result<PathBuf> {
        let mut toml = String::new();
        match self.combo.sink {
            SinkKind::Kafka => toml.push_str(&format!(
                "[kafka]\ntopic = \"{}.{{aggregate_type}}\"\ncreate_topics = true\npartitions = {}\n",
                self.destination,
                crate::kafka::PARTITIONS
            )),
            SinkKind::Rabbitmq => {
                toml.push_str(&format!("[rabbitmq]\nexchange = \"{}\"\n", self.destination))
            }
        }
        if self.combo.source == SourceKind::Wal {
            toml.push_str(&format!("[wal]\nslot = \"{}\"\n", self.slot));
        }
        let path = self.dir.join(format!("{}.toml", self.destination));
        std::fs::write(&path, toml).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    fn command(&self, sub: &str) -> Result<Command> {
        let mut c = Command::new(&self.bin);
        c.arg(sub)
            .arg("--config")
            .arg(self.config_path()?)
            .env("DATABASE_URL", &self.database_url)
            .env("RELAY_SOURCE", self.combo.source.as_str())
            .env("RELAY_SINK", self.combo.sink.as_str())
            .env("RELAY_KAFKA_BROKERS", &self.kafka_brokers)
            .env("RELAY_AMQP_URL", &self.amqp_url)
            .env("RELAY_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info,rdkafka=warn,lapin=error")
            .env_remove("RELAY_LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        Ok(c)
    }

    /// `outbox-relay migrate`: the outbox table; in wal mode also the publication and the slot.
    pub fn migrate(&self) -> Result<()> {
        let out = self
            .command("migrate")?
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "outbox-relay migrate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn start(&self) -> Result<Relay> {
        self.start_instance(0)
    }

    /// Starts the relay with a log of its own: instance 0 logs to `<destination>.log`, later
    /// instances (restarts after a kill) to `<destination>.<n>.log`, so waiting for a start-up
    /// line never finds the previous instance's.
    pub fn start_instance(&self, instance: usize) -> Result<Relay> {
        let log = if instance == 0 {
            self.dir.join(format!("{}.log", self.destination))
        } else {
            self.dir
                .join(format!("{}.{instance}.log", self.destination))
        };
        let file = std::fs::File::create(&log)?;
        let child = self
            .command("run")?
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        Ok(Relay {
            child: Some(child),
            log,
        })
    }
}

pub struct Relay {
    child: Option<Child>,
    pub log: PathBuf,
}

/// Peak resident memory and CPU time of a process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    pub peak_rss_kib: u64,
    pub cpu_seconds: f64,
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Relay {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!(
                "outbox-relay exited ({status}); its log ({}):\n{}",
                self.log.display(),
                tail(&self.logs(), 20)
            );
        }
        Ok(())
    }

    /// Waits for a log line containing `needle`.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "outbox-relay did not log `{needle}` within {timeout:?}; its log:\n{}",
                    tail(&self.logs(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `/metrics` address from the start-up line `serving /metrics ... addr=IP:PORT`;
    /// `None` when this build of the relay does not serve metrics.
    pub async fn metrics_addr(&mut self) -> Option<String> {
        let line = self
            .wait_for_log("serving /metrics", Duration::from_secs(10))
            .await
            .ok()?;
        let at = line.find("addr=")? + "addr=".len();
        let addr: String = line[at..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
            .collect();
        (!addr.is_empty()).then_some(addr)
    }

    pub fn footprint(&self) -> Footprint {
        footprint(self.pid())
    }

    /// SIGKILL, no chance to confirm anything: a crash. Returns once the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (finish in-flight confirmations), then SIGKILL after 15 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `VmHWM` of `/proc/<pid>/status` and `utime + stime` of `/proc/<pid>/stat`.
pub fn footprint(pid: u32) -> Footprint {
    let peak_rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces) start at field 3.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / clock_ticks())
        })
        .unwrap_or(0.0);
    Footprint {
        peak_rss_kib,
        cpu_seconds,
    }
}

/// CPU ticks of every process at one instant, and of the whole machine (`/proc/stat`), to tell
/// where the cores went during a measurement.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// pid → (command name, utime + stime ticks)
    procs: HashMap<u32, (String, u64)>,
    busy: u64,
    total: u64,
}

impl CpuSnapshot {
    pub fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let comm = stat[open + 1..close].to_string();
                let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                let ticks = fields
                    .get(11)
                    .and_then(|u| u.parse::<u64>().ok())
                    .zip(fields.get(12).and_then(|s| s.parse::<u64>().ok()))
                    .map(|(u, s)| u + s)
                    .unwrap_or(0);
                procs.insert(pid, (comm, ticks));
            }
        }
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
                let v: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                let idle = v.get(3)? + v.get(4)?;
                let total: u64 = v.iter().take(8).sum();
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        Self { procs, busy, total }
    }

    /// Average cores used between `before` and `self` over `wall_seconds`, by group: the relay
    /// (`relay_pid`), Postgres, the broker, this harness, and everything else; plus the whole
    /// machine from `/proc/stat`.
    pub fn since(
        &self,
        before: &CpuSnapshot,
        relay_pid: u32,
        wall_seconds: f64,
    ) -> Vec<(String, f64)> {
        let hz = clock_ticks();
        let me = std::process::id();
        let mut groups: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (pid, (comm, ticks)) in &self.procs {
            let old = before
                .procs
                .get(pid)
                .filter(|(c, _)| c == comm)
                .map(|(_, t)| *t)
                .unwrap_or(0);
            let used = ticks.saturating_sub(old) as f64 / hz / wall_seconds;
            let group = if *pid == relay_pid {
                "relay"
            } else if *pid == me {
                "harness (writers, consumer)"
            } else if comm == "postgres" {
                "Postgres"
            } else if comm.starts_with("tansu") {
                "Kafka (tansu)"
            } else if comm.starts_with("beam") || comm.starts_with("erl") || comm == "epmd" {
                "RabbitMQ"
            } else {
                "other processes"
            };
            *groups.entry(group).or_default() += used;
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        let mut out: Vec<(String, f64)> = groups
            .into_iter()
            .filter(|(_, v)| *v >= 0.005)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if self.total > before.total {
            out.push((
                "machine (all cores, /proc/stat)".into(),
                (self.busy - before.busy) as f64 / (self.total - before.total) as f64 * cores,
            ));
        }
        out
    }
}

/// `GET /metrics` over plain HTTP/1.0 (no client library needed for one text page).
pub async fn scrape(addr: &str) -> Result<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .context("metrics connect timed out")??;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body))
        .await
        .context("metrics read timed out")??;
    match body.split_once("\r\n\r\n") {
        Some((head, rest)) if head.starts_with("HTTP/1.") && head.contains(" 200") => {
            Ok(rest.to_string())
        }
        _ => bail!("unexpected /metrics answer: {}", tail(&body, 3)),
    }
}

pub fn ensure_binary(bin: &Path) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "{} does not exist; build it with `cargo build --release -p outbox-relay` (scripts/bench does)",
            bin.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_of_this_process() {
        let f = footprint(std::process::id());
        assert!(f.peak_rss_kib > 0);
        assert!(f.cpu_seconds >= 0.0);
    }
}
