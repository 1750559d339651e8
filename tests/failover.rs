//! A Postgres failover under a running relay: a primary and a streaming standby of its own
//! (Debian's Postgres 15 binaries, run as `postgres`, on free ports), the relay given both in a
//! multi-host `DATABASE_URL` with `target_session_attrs=read-write`. The primary is killed
//! (`-m immediate`) mid-stream and the standby promoted; the relay, not restarted, finds the
//! new primary by itself. Postgres 15 has no failover slots, so in wal mode the slot is gone on
//! the new primary and the relay repairs it from the table: nothing lost, the gap sent again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::proxy::free_port;
use crate::support::*;

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// One Postgres server in a directory of its own; stopped (immediately) when dropped.
struct Server {
    dir: PathBuf,
    port: u16,
}

fn as_postgres(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{BIN}/{program}")])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Server {
    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn configure(&self) {
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             hot_standby = on\nfsync = off\nwal_keep_size = '256MB'\n",
            self.port,
            self.dir.display()
        );
        let path = self.dir.join("data/postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&path, existing).unwrap();
    }

    fn start(&self) {
        let log = self.dir.join("server.log").display().to_string();
        as_postgres("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "start"]);
    }

    /// A primary, freshly initialised.
    fn primary(root: &Path) -> Self {
        let s = Self {
            dir: root.join("primary"),
            port: free_port(),
        };
        std::fs::create_dir_all(&s.dir).unwrap();
        chown(root);
        as_postgres(
            "initdb",
            &[
                "-D",
                &s.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        s.configure();
        s.start();
        s
    }

    /// A streaming standby of `primary`.
    fn standby(root: &Path, primary: &Server) -> Self {
        let s = Self {
            dir: root.join("standby"),
            port: free_port(),
        };
        std::fs::create_dir_all(&s.dir).unwrap();
        chown(root);
        as_postgres(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &s.data(),
                "-R",
                "-X",
                "stream",
                // An immediate checkpoint: the default spread one takes a minute and more.
                "-c",
                "fast",
            ],
        );
        s.configure();
        s.start();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl")])
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

fn chown(dir: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres", &dir.display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn failover_loses_nothing(mode: Mode) {
    let root = std::env::temp_dir().join(unique("relay_failover"));
    std::fs::create_dir_all(&root).unwrap();
    let primary = Server::primary(&root);
    connect(&primary.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE app")
        .await
        .unwrap();
    let standby = Server::standby(&root, &primary);
    let mut s = Scenario::of(mode, Broker::Rabbitmq, "").await;
    let multi = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/app?target_session_attrs=read-write",
        primary.port, standby.port
    );
    s.extra_env.push(("DATABASE_URL".into(), multi));
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let before = write_events(&primary.url("app"), "wallet", 4, 10, 2).await;
    let got = reader.read_until(&before, Duration::from_secs(60)).await;
    tally(&before, &got).assert_complete_and_ordered();

    // The primary dies; the standby takes over.
    let killed = Instant::now();
    drop(primary);
    as_postgres("pg_ctl", &["-D", &standby.data(), "-w", "promote"]);
    let promoted = killed.elapsed();
    let after = write_events(&standby.url("app"), "wallet", 4, 10, 2).await;
    let all: Vec<Written> = before.into_iter().chain(after).collect();
    let got = reader.read_until(&all, Duration::from_secs(90)).await;
    let resumed = killed.elapsed();
    let t = tally(&all, &got);
    eprintln!(
        "{mode:?} failover (PG 15, no failover slot): promoted after {promoted:?}, all delivered {resumed:?} after the kill: {t:?}"
    );
    assert!(
        t.missing == 0,
        "events lost across the failover: {t:?}; relay log:\n{}",
        relay.logs()
    );
    t.assert_complete_and_ordered();
    drop(relay);
    drop(standby);
    let _ = std::fs::remove_dir_all(&root);
}

for_both_sources! {
    fault_a_primary_failover_with_a_multi_host_url_loses_nothing_without_a_restart => failover_loses_nothing;
}
