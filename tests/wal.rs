//! What only log tailing has: big transactions streamed with bounded memory, the slot moving
//! while the outbox is idle, insert-then-delete, `pg_logical_emit_message`, and its set-up
//! errors.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_event_transaction_is_streamed_with_bounded_relay_memory() {
    let s = Scenario::of(Mode::Wal, Broker::Kafka, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    relay
        .expect_log("streaming the outbox from the WAL", Duration::from_secs(30))
        .await;
    // 100,000 events of ~1.5 KB (150 MB of payload) over 1,000 aggregates, in ONE transaction.
    let rows = s
        .db
        .client()
        .await
        .query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, traceparent, tracestate) \
             SELECT gen_random_uuid(), 'wallet', 'big-' || (g % 1000), 'Happened', \
                    jsonb_build_object('aggregate_id', 'big-' || (g % 1000), 'n', g / 1000, 'pad', repeat('x', 1500)), \
                    '{\"tenant\": \"acme\"}', $1, 'vendor=1' \
             FROM generate_series(0, 99999) g RETURNING id::text, aggregate_id, (payload->>'n')::bigint",
            &[&WRITER_TRACEPARENT],
        )
        .await
        .unwrap();
    let written: Vec<Written> = rows
        .iter()
        .map(|r| Written {
            id: r.get(0),
            aggregate_id: r.get(1),
            n: r.get::<_, i64>(2) as u64,
        })
        .collect();
    let started = Instant::now();
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &received);
    let peak_kib = peak_rss_kib(relay.pid()).unwrap_or(0);
    eprintln!(
        "100k-event transaction: {t:?} in {:?}; relay peak RSS {} MiB",
        started.elapsed(),
        peak_kib / 1024
    );
    t.assert_complete_and_ordered();
    // Holding the transaction whole would take more than its 150 MB of payload.
    assert!(peak_kib > 0, "cannot read the relay's memory");
    assert!(
        peak_kib < 100 * 1024,
        "relay peak RSS {peak_kib} KiB: the transaction was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_advances_while_the_outbox_is_idle_and_other_tables_take_100_mb() {
    let mut s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.extra_toml = format!(
        "[wal]\nslot = \"{}\"\nstatus_interval = \"500ms\"\n",
        s.slot
    );
    let slot = s.slot.clone();
    s.migrate();
    let relay = s.start_relay();
    relay
        .expect_log("streaming the outbox from the WAL", Duration::from_secs(30))
        .await;
    let client = s.db.client().await;
    client
        // Stored out of line and uncompressed, so every byte goes through the WAL.
        .batch_execute(
            "CREATE TABLE filler (id bigserial PRIMARY KEY, body text); \
             ALTER TABLE filler ALTER body SET STORAGE EXTERNAL",
        )
        .await
        .unwrap();
    let before = current_wal_lsn(&s.db).await;
    // About 100 MB of WAL from another table, in 12 transactions; not one outbox event.
    for _ in 0..12 {
        client
            .batch_execute(
                "INSERT INTO filler (body) SELECT repeat(md5(g::text), 64) FROM generate_series(1, 4000) g",
            )
            .await
            .unwrap();
    }
    let after = current_wal_lsn(&s.db).await;
    let written_mb = (after - before) / 1_000_000;
    assert!(written_mb >= 90, "only {written_mb} MB of WAL written");
    let advanced = eventually(Duration::from_secs(60), || async {
        slot_position(&s.db, &slot).await.0 >= after
    })
    .await;
    // restart_lsn (what the slot retains) follows the confirmed position at the next
    // running-transactions record, which Postgres writes every 15 s while WAL is busy.
    let released = eventually(Duration::from_secs(60), || async {
        slot_position(&s.db, &slot).await.1 < 16 * 1024 * 1024
    })
    .await;
    let (confirmed, retained) = slot_position(&s.db, &slot).await;
    eprintln!(
        "idle outbox, {written_mb} MB of WAL from another table: slot confirmed {} MB past the start, retained WAL {retained} bytes",
        (confirmed.saturating_sub(before)) / 1_000_000
    );
    assert!(
        advanced,
        "the slot did not advance: confirmed {confirmed}, WAL end {after}"
    );
    assert!(released, "retained WAL stays at {retained} bytes");
}

/// Saving the progress row writes WAL, and the next keepalive reports that WAL as a position
/// to save: an idle relay must not feed on its own writes (it once saved the row 20 times a
/// second, for ever, at the default `wal.status_interval` of 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_does_not_keep_rewriting_its_progress_row() {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    let slot = s.slot.clone();
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let mut written = write_numbered(&s.db, "idle-1", 1, 3).await;
    let mut client = s.db.client().await;
    // A fourth event, and a WAL position its commit record comes after.
    let tx = client.transaction().await.unwrap();
    written.push(insert_wallet_event(&tx, "idle-1", 4).await);
    let before_commit: String = tx
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    // Events still move the saved position at once (`wal.status_interval`), not every 10 s.
    assert!(
        eventually(Duration::from_secs(3), || async {
            client
                .query_opt(
                    "SELECT 1 FROM outbox_relay_progress WHERE slot_name = $1 \
                     AND confirmed_lsn > $2::text::pg_lsn",
                    &[&slot, &before_commit],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await,
        "the progress row did not pass the events' commit within 3 s"
    );
    let saved = || async {
        client
            .query_opt(
                "SELECT confirmed_lsn::text FROM outbox_relay_progress WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    // Then the outbox is idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut last = saved().await;
    let mut changes = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = saved().await;
        if now != last {
            changes += 1;
            last = now;
        }
    }
    eprintln!("idle relay: progress row changed {changes} times in 6 s");
    assert!(
        changes <= 1,
        "the progress row changed {changes} times in 6 s of an idle outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_deleted_in_its_own_transaction_is_still_published() {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let mut client = s.db.client().await;
    let tx = client.transaction().await.unwrap();
    let written = vec![insert_wallet_event(&tx, "w-1", 0).await];
    tx.execute(
        "DELETE FROM outbox WHERE id = $1::text::uuid",
        &[&written[0].id],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    let rows: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the service's delete stands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_with_pg_logical_emit_message_are_published() {
    let s = Scenario::of(Mode::Wal, Broker::Kafka, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let client = s.db.client().await;
    let mut written = vec![];
    for n in 0..20u64 {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::json!({
            "id": id, "aggregate_type": "wallet", "aggregate_id": "tableless", "event_type": "Happened",
            "payload": {"aggregate_id": "tableless", "n": n},
            "headers": {"tenant": "acme"}, "traceparent": WRITER_TRACEPARENT, "tracestate": "vendor=1",
        });
        client
            .execute(
                "SELECT pg_logical_emit_message(true, 'outbox', $1::text)",
                &[&body.to_string()],
            )
            .await
            .unwrap();
        // Another prefix is not ours.
        client
            .execute("SELECT pg_logical_emit_message(true, 'other', '{}')", &[])
            .await
            .unwrap();
        written.push(Written {
            id,
            aggregate_id: "tableless".into(),
            n,
        });
    }
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &got);
    t.assert_complete_and_ordered();
    for r in &got {
        assert_eq!(r.key.as_deref(), Some("tableless"));
        assert_eq!(r.headers["tenant"], "acme");
        assert!(r.headers["traceparent"].contains(TRACE_ID));
    }
}

/// Runs the relay and expects it to fail with `fragments` in its one error line.
async fn expect_error(s: &Scenario, env: &[(&str, &str)], fragments: &[&str]) {
    let log = std::env::temp_dir().join(unique("wal_error"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("run")
        .arg("--config")
        .arg(s.config_path())
        .envs(s.env())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            panic!(
                "relay kept running: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success());
    let line = stderr
        .lines()
        .find(|l| l.starts_with("outbox-relay: error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for f in fragments {
        assert!(line.contains(f), "`{f}` missing from: {line}");
    }
    eprintln!("{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_setup_errors_name_the_fix() {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.migrate();
    let client = s.db.client().await;
    let publication = "outbox_relay_outbox";

    // A role without REPLICATION.
    let role = unique("norepl");
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    let url = pg_url(&role, &s.db.name);
    expect_error(
        &s,
        &[("DATABASE_URL", &url)],
        &[&role, "ALTER ROLE", "REPLICATION"],
    )
    .await;
    client
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();

    // A publication that does not cover the outbox.
    client
        .batch_execute(&format!(
            "DROP PUBLICATION {publication}; CREATE TABLE other (id int); CREATE PUBLICATION {publication} FOR TABLE other"
        ))
        .await
        .unwrap();
    expect_error(
        &s,
        &[],
        &[publication, "does not cover table `outbox`", "ADD TABLE"],
    )
    .await;

    // No publication at all.
    client
        .batch_execute(&format!("DROP PUBLICATION {publication}"))
        .await
        .unwrap();
    expect_error(&s, &[], &[publication, "does not exist", "migrate"]).await;
    s.migrate();

    // The slot held by another process.
    let mut holder = pg_client("pg_recvlogical")
        .args([
            "-d",
            &s.db.name,
            "--slot",
            &s.slot,
            "--start",
            "-f",
            "/dev/null",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={publication}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.db.client()
                .await
                .query_one(
                    "SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = $1",
                    &[&s.slot],
                )
                .await
                .is_ok_and(|r| r.get(0))
        })
        .await,
        "pg_recvlogical did not take the slot"
    );
    expect_error(
        &s,
        &[("RELAY_WAL__SLOT_WAIT", "2s")],
        &[&s.slot, "is active in process", "pg_terminate_backend"],
    )
    .await;
    let _ = holder.kill();
    let _ = holder.wait();
}

/// A throwaway Postgres cluster of our own (wal_level=replica), stopped and removed on drop.
struct ScratchCluster {
    dir: std::path::PathBuf,
    port: u16,
}

fn bin(name: &str) -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).max())
        .map(|p| p.join("bin").join(name).display().to_string())
        .unwrap_or_else(|| name.to_string())
}

fn as_postgres(args: &[&str]) -> bool {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl ScratchCluster {
    fn start(settings: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("scratch_pg"));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            Command::new("chown")
                .args(["postgres:postgres", &dir.display().to_string()])
                .status()
                .unwrap()
                .success()
        );
        let port = 20000 + (std::process::id() % 20000) as u16;
        let d = dir.display().to_string();
        assert!(
            as_postgres(&[&bin("initdb"), "-D", &d, "-A", "trust", "-U", "postgres"]),
            "initdb failed"
        );
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -k {d} {settings}");
        assert!(
            as_postgres(&[&bin("pg_ctl"), "-D", &d, "-o", &opts, "-w", "start"]),
            "pg_ctl start failed"
        );
        Self { dir, port }
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let d = self.dir.display().to_string();
        as_postgres(&[&bin("pg_ctl"), "-D", &d, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_reported_with_the_fix() {
    let cluster = ScratchCluster::start("-c wal_level=replica");
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    // The table exists (made by a poll-mode migrate), so the first thing wrong is wal_level.
    let migrate = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["migrate", "--config"])
        .arg(s.config_path())
        .envs(s.env())
        .env("DATABASE_URL", &url)
        .env("RELAY_SOURCE", "poll")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    expect_error(
        &s,
        &[("DATABASE_URL", &url)],
        &[
            "wal_level is `replica`",
            "ALTER SYSTEM SET wal_level = logical",
            "RELAY_SOURCE=poll",
        ],
    )
    .await;
    drop(cluster);
}

/// Writes `n` events for aggregate `agg` with n starting at `first`, one transaction each.
async fn write_numbered(db: &TestDb, agg: &str, first: u64, n: u64) -> Vec<Written> {
    let client = db.client().await;
    let mut out = vec![];
    for i in first..first + n {
        out.push(insert_wallet_event(&client, agg, i).await);
    }
    out
}

/// Starts a relay on a lost slot; returns once it has begun publishing the gap from the table.
async fn start_repairing(s: &Scenario) -> Relay {
    let relay = s.start_relay();
    relay
        .expect_log(
            "publishing the outbox rows created since then",
            Duration::from_secs(30),
        )
        .await;
    relay
}

/// The slot disappears while the relay is down (an operator dropped it, or the database was
/// restored from a backup without it): events committed in the gap are published from the
/// table, then streaming resumes on a new slot.
pub async fn lost_slot_is_repaired(invalidate: bool) {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "[wal]\nslot_wait = \"5s\"\n").await;
    let mut s = s;
    s.extra_toml = format!(
        "[wal]\nslot = \"{}\"\nslot_wait = \"5s\"\nstatus_interval = \"200ms\"\n",
        s.slot
    );
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let mut relay = s.start_relay();
    let before = write_numbered(&s.db, "A", 0, 20).await;
    let got = reader.read_until(&before, READ_TIMEOUT).await;
    tally(&before, &got).assert_complete_and_ordered();
    // Let the progress (confirmed position and commit time) be saved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.kill();
    let admin = s.db.client().await;
    let gap = write_numbered(&s.db, "A", 20, 30).await;
    if invalidate {
        // Make Postgres invalidate the slot: keep almost no WAL for slots, write more than that.
        // ALTER SYSTEM cannot share a transaction (or a multi-statement string) with anything.
        for sql in [
            "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
            "SELECT pg_reload_conf()",
            "CREATE TABLE filler (body text)",
            "ALTER TABLE filler ALTER body SET STORAGE EXTERNAL",
            "INSERT INTO filler SELECT repeat(md5(g::text), 64) FROM generate_series(1, 40000) g",
            "CHECKPOINT",
        ] {
            admin.batch_execute(sql).await.unwrap();
        }
        let lost = eventually(Duration::from_secs(30), || async {
            let _ = admin
                .batch_execute("SELECT pg_switch_wal(); CHECKPOINT;")
                .await;
            admin
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&s.slot],
                )
                .await
                .map(|r| r.get::<_, Option<String>>(0) == Some("lost".into()))
                .unwrap_or(false)
        })
        .await;
        admin
            .batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            .await
            .unwrap();
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        assert!(lost, "Postgres did not invalidate the slot");
    } else {
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
            .await
            .unwrap();
    }
    let relay = start_repairing(&s).await;
    let after = write_numbered(&s.db, "A", 50, 20).await;
    let all: Vec<Written> = before.iter().chain(&gap).chain(&after).cloned().collect();
    let got = reader.read_until(&all, READ_TIMEOUT).await;
    let t = tally(&all, &got);
    eprintln!(
        "slot {}: {t:?}",
        if invalidate { "invalidated" } else { "dropped" }
    );
    t.assert_complete_and_ordered();
    relay
        .expect_log("repair of the slot's gap complete", Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_recreated_and_its_gap_published_from_the_table() {
    lost_slot_is_repaired(false).await;
}

/// A repair reads the table in creation order while services go on writing. A transaction
/// that began before rows the repair has already read (its `created_at` is its start) but
/// commits after that read is behind it, so it comes from the stream; a later event of its
/// aggregate, committed after it, is ahead of the read. The repair reads one snapshot, taken
/// once the new slot exists, so both come from the stream, in commit order. (Paging through
/// the live table published the later event first, from the table, and the earlier one behind
/// it from the stream: one order violation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_keeps_an_aggregate_in_order_when_an_older_transaction_commits_behind_its_read() {
    let mut s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.extra_toml = format!(
        "[wal]\nslot = \"{}\"\nslot_wait = \"5s\"\nstatus_interval = \"200ms\"\n\
         [delivery]\nbatch_size = 10\nmax_in_flight = 1\n",
        s.slot
    );
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let mut relay = s.start_relay();
    let streamed = write_numbered(&s.db, "S", 0, 5).await;
    let got = reader.read_until(&streamed, READ_TIMEOUT).await;
    tally(&streamed, &got).assert_complete_and_ordered();
    // Let the progress (confirmed position and commit time) be saved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.kill();
    // The gap: 2,000 events, 200 pages of the repair's read.
    let gap = write_numbered(&s.db, "G", 0, 2000).await;
    let admin = s.db.client().await;
    admin
        .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
        .await
        .unwrap();
    let relay = start_repairing(&s).await;
    // The slot exists: a transaction that began when the 100th gap row was written.
    let started: String = admin
        .query_one(
            "SELECT (created_at + interval '1 microsecond')::text FROM outbox WHERE id = $1::text::uuid",
            &[&gap[99].id],
        )
        .await
        .unwrap()
        .get(0);
    let mut older = s.db.client().await;
    let tx = older.transaction().await.unwrap();
    let x0 = uuid::Uuid::new_v4();
    tx.execute(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) \
         VALUES ($1, 'wallet', 'X', 'Happened', jsonb_build_object('n', 0), $2::text::timestamptz)",
        &[&x0, &started],
    )
    .await
    .unwrap();
    // It commits once the repair has read well past it, and the aggregate's next event follows.
    let read_past: Vec<Written> = gap[..500].to_vec();
    let got = reader.read_until(&read_past, READ_TIMEOUT).await;
    assert_eq!(tally(&read_past, &got).missing, 0, "{}", relay.logs());
    tx.commit().await.unwrap();
    let x1 = insert_wallet_event(&admin, "X", 1).await;
    assert!(
        !relay.logs().contains("repair of the slot's gap complete"),
        "the repair ended before the aggregate's next event was written: the case tests nothing"
    );
    let x = vec![
        Written {
            id: x0.to_string(),
            aggregate_id: "X".into(),
            n: 0,
        },
        x1,
    ];
    let all: Vec<Written> = streamed.iter().chain(&gap).chain(&x).cloned().collect();
    let got = reader.read_until(&all, READ_TIMEOUT).await;
    let t = tally(&all, &got);
    eprintln!("{t:?}");
    t.assert_complete_and_ordered();
}

/// A slot lost before the relay confirmed anything from it (a failover moments after the
/// first start, before the standby had any progress of ours) is repaired like any lost slot:
/// the slot's creation left a progress row, so the events committed since are published from
/// the table. Without that row the new primary would look like a first run, and they would be
/// skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_before_its_first_confirmation_is_repaired_from_the_table() {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let written = write_numbered(&s.db, "A", 0, 20).await;
    s.db.client()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
        .await
        .unwrap();
    let relay = s.start_relay();
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &got);
    assert!(t.missing == 0, "{t:?}; relay log:\n{}", relay.logs());
    t.assert_complete_and_ordered();
    assert!(
        relay
            .logs()
            .contains("publishing the outbox rows created since then"),
        "{}",
        relay.logs()
    );
}

/// A progress row that another cluster wrote (the database was copied with its tables, the
/// slot made anew) holds an LSN that means nothing here: the relay must not start from it,
/// even when it lies within this cluster's WAL. And `migrate` must not recreate a slot that
/// was streamed before: that is `run`'s job, which first publishes the gap from the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_row_from_another_cluster_is_ignored_and_migrate_leaves_a_lost_slot_to_run() {
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, "").await;
    s.migrate();
    let client = s.db.client().await;
    // Forged: a position 16 kB ahead, which the events below will pass, from another cluster.
    client
        .execute(
            "INSERT INTO outbox_relay_progress (slot_name, confirmed_lsn, commit_time, system_identifier) \
             VALUES ($1, pg_current_wal_lsn() + 16384, now(), '42') \
             ON CONFLICT (slot_name) DO UPDATE SET confirmed_lsn = EXCLUDED.confirmed_lsn, \
                 system_identifier = EXCLUDED.system_identifier",
            &[&s.slot],
        )
        .await
        .unwrap();
    let mut reader = s.reader(&["wallet"]).await;
    let written = write_events(&s.db.url, "wallet", 10, 20, 2).await;
    let mut relay = s.start_relay();
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    assert!(
        !relay.logs().contains("starting from the saved position"),
        "{}",
        relay.logs()
    );
    assert!(relay.terminate(Duration::from_secs(15)).is_some());
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&s.slot])
        .await
        .unwrap();
    let out = s.command(&["migrate"]);
    assert!(out.status.success(), "{}", out.stderr);
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&s.slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "migrate recreated a slot that `run` must repair");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("left replication slot"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

/// Slots are cluster-wide: two services with the same table in two databases of one cluster
/// must not share (and fight over) one slot when both keep the default settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_on_one_cluster_each_get_their_own_default_slot() {
    let defaults = "[wal]\ncreate_slot = true\n";
    let a = Scenario::of(Mode::Wal, Broker::Kafka, defaults).await;
    let b = Scenario::of(Mode::Wal, Broker::Kafka, defaults).await;
    for s in [&a, &b] {
        let out = s.command(&["migrate"]);
        assert!(out.status.success(), "{}", out.stderr);
        let slot = format!("outbox_relay_{}_outbox", s.db.name);
        assert!(
            out.stderr
                .contains(&format!("created replication slot {slot}")),
            "{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    let mut readers = [a.reader(&["wallet"]).await, b.reader(&["wallet"]).await];
    let relays = [a.start_relay(), b.start_relay()];
    for relay in &relays {
        relay
            .expect_log("streaming the outbox from the WAL", Duration::from_secs(30))
            .await;
    }
    for (i, s) in [&a, &b].into_iter().enumerate() {
        let written = write_events(&s.db.url, "wallet", 5, 4, 1).await;
        let received = readers[i].read_until(&written, READ_TIMEOUT).await;
        let t = tally(&written, &received);
        assert_eq!(t.missing, 0, "database {i}: {t:?}\n{}", relays[i].logs());
        t.assert_complete_and_ordered();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_configured_slot_of_another_database_with_the_message_run_gives() {
    let a = Scenario::of(Mode::Wal, Broker::Kafka, "").await;
    a.migrate();
    let b = Scenario::of(
        Mode::Wal,
        Broker::Kafka,
        &format!("[wal]\nslot = \"{}\"\n", a.slot),
    )
    .await;
    let out = b.command(&["migrate"]);
    assert!(!out.status.success(), "{}", out.stdout);
    let expected = format!(
        "replication slot `{}` belongs to database `{}`, not `{}`; set wal.slot to a slot of this database",
        a.slot, a.db.name, b.db.name
    );
    assert!(out.stderr.contains(&expected), "{}", out.stderr);
    expect_error(&b, &[], &[&expected]).await;
}

/// Earlier versions named the default slot `outbox_relay_<table>`. A relay upgraded in place
/// keeps streaming from that slot (its position) instead of creating a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_slot_of_the_former_default_name_and_its_position() {
    let table = unique("outbox");
    let s = Scenario::of(
        Mode::Wal,
        Broker::Kafka,
        &format!("[outbox]\ntable = \"{table}\"\n[wal]\ncreate_slot = true\n"),
    )
    .await;
    let former = format!("outbox_relay_{table}");
    let client = s.db.client().await;
    client
        .query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&former],
        )
        .await
        .unwrap();
    let out = s.command(&["migrate"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        !out.stderr.contains("created replication slot"),
        "{}",
        out.stderr
    );
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    relay
        .expect_log(
            "using the replication slot of the former default name",
            Duration::from_secs(30),
        )
        .await;
    let id: String = client
        .query_one(
            &format!(
                "INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload) \
                 VALUES (gen_random_uuid(), 'wallet', 'w1', 'Opened', '{{\"n\": 0}}') RETURNING id::text"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let written = vec![Written {
        id,
        aggregate_id: "w1".into(),
        n: 0,
    }];
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    assert_eq!(tally(&written, &received).missing, 0, "{}", relay.logs());
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "a second slot was created");
}

/// Attempts are kept across restarts in `<table>_relay_attempts`; the rows of events that an
/// instance that died was still retrying must not stay there forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_attempts_nobody_made_for_a_day_are_forgotten_and_recent_ones_kept() {
    let s = Scenario::of(
        Mode::Wal,
        Broker::Kafka,
        &format!(
            "[outbox]\ncleanup_interval = \"200ms\"\n[wal]\nslot = \"{}\"\n",
            unique("slot")
        ),
    )
    .await;
    s.migrate();
    let client = s.db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox_relay_attempts (event_id, attempts, last_error, updated_at) VALUES \
             ('stale', 2, 'refused', now() - interval '2 days'), ('recent', 1, 'refused', now())",
        )
        .await
        .unwrap();
    let relay = s.start_relay();
    let left = || async {
        let rows = client
            .query("SELECT event_id FROM outbox_relay_attempts ORDER BY 1", &[])
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            left().await == vec!["recent".to_string()]
        })
        .await,
        "attempts left: {:?}\n{}",
        left().await,
        relay.logs()
    );
}
