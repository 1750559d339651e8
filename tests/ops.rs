//! Operator commands end to end: status, replay, purge, dead letters — against real Postgres,
//! RabbitMQ and Kafka, with the daemon running next to them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(90);

fn json(out: &CommandOutput) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

fn assert_ok(out: &CommandOutput) {
    assert!(
        out.status.success(),
        "command failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// Non-zero exit and exactly one `outbox-relay: error:` line, which mentions `needle`.
fn assert_one_error(out: &CommandOutput, needle: &str) {
    assert!(
        !out.status.success(),
        "expected a failure: {}\n{}",
        out.stdout,
        out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("outbox-relay: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error message: {}", out.stderr);
    assert!(
        errors[0].contains(needle),
        "error should mention `{needle}`: {}",
        errors[0]
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// The replay id a `replay` run announced on stderr.
fn replay_id(out: &CommandOutput) -> String {
    out.stderr
        .split(|c: char| c.is_whitespace() || c == '`' || c == ':')
        .find(|w| w.starts_with("replay-"))
        .unwrap_or_else(|| panic!("no replay id in: {}", out.stderr))
        .to_string()
}

async fn insert(db: &TestDb, aggregate_id: &str, event_type: &str, n: u64) -> Written {
    let id = uuid::Uuid::new_v4();
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers, traceparent, tracestate) \
             VALUES ($1, 'wallet', $2, $3, $4, '{\"tenant\": \"acme\"}', $5, 'vendor=1')",
            &[&id, &aggregate_id, &event_type, &serde_json::json!({ "n": n }), &WRITER_TRACEPARENT],
        )
        .await
        .unwrap();
    Written {
        id: id.to_string(),
        aggregate_id: aggregate_id.into(),
        n,
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

async fn wait_published(db: &TestDb, n: i64) {
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(
                db,
                "SELECT count(*) FROM outbox WHERE relay_published_at IS NOT NULL",
            )
            .await
                >= n
        })
        .await,
        "the relay did not mark {n} events published"
    );
}

/// Reads until `n` messages tagged with `replay` = `id` arrived (or `timeout`), then a little
/// longer to catch any extra copy.
async fn read_replayed(
    reader: &mut AnyReader,
    id: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Received> {
    let tagged = |all: Vec<Received>| -> Vec<Received> {
        all.into_iter()
            .filter(|r| r.headers.get("replay").map(String::as_str) == Some(id))
            .collect()
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tagged(reader.read_for(Duration::from_millis(500)).await).len() >= n {
            break;
        }
    }
    tagged(reader.read_for(Duration::from_secs(2)).await)
}

/// Adds a binding to the reader's queue, so more routing keys reach it (and become routable).
async fn bind_more(reader: &AnyReader, routing_key: &str) {
    let AnyReader::Amqp(r) = reader else {
        panic!("an AMQP reader")
    };
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_bind(
        &r.queue,
        &r.exchange,
        routing_key,
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(0, "bound").await;
}

/// A dead letter holds aggregate A (its later event waits), B flows; status, list and retry
/// while the relay runs; after the retry, A's events arrive in order: the retried one first.
async fn dead_letter_lifecycle(mode: Mode) {
    let s = Scenario::of(
        mode,
        Broker::Rabbitmq,
        "[delivery]\nmax_attempts = 2\nbackoff_initial = \"50ms\"\n",
    )
    .await;
    s.migrate();
    let before = json(&s.command(&["status", "--json"]));
    assert!(before["active_instance"].is_null(), "{before}");
    // Only `wallet.Happened` is routed: `wallet.Unroutable` comes back as basic.return.
    let mut reader = AnyReader::Amqp(s.amqp_reader("wallet.Happened").await);
    let relay = s.start_relay();
    let a1 = insert(&s.db, "A", "Happened", 0).await;
    let poison = insert(&s.db, "A", "Unroutable", 1).await;
    let a3 = insert(&s.db, "A", "Happened", 2).await;
    let mut b = vec![];
    for n in 0..5 {
        b.push(insert(&s.db, "B", "Happened", n).await);
    }
    let first: Vec<Written> = std::iter::once(a1.clone()).chain(b.clone()).collect();
    // A3 may have been in flight with the poison's first attempt, before its refusal was known
    // (then it reached the broker once); it is not confirmed and waits behind the dead letter.
    let without_early_a3 = |got: Vec<Received>| -> Vec<Received> {
        let first_a3 = got.iter().position(|r| r.id() == a3.id);
        let first_poison = got.iter().position(|r| r.id() == poison.id);
        let early = first_a3.filter(|&i| first_poison.is_none_or(|p| i < p));
        got.into_iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != early)
            .map(|(_, r)| r)
            .collect()
    };
    let got = reader.read_until(&first, READ_TIMEOUT).await;
    assert!(
        got.iter()
            .filter(|r| r.id() == a3.id && !r.redelivered)
            .count()
            <= 1,
        "A3 sent more than once behind the poison"
    );
    tally(&first, &without_early_a3(got)).assert_complete_and_ordered();
    let dead = || async {
        count(
            &s.db,
            "SELECT count(*) FROM outbox_dead_letters WHERE holds_aggregate",
        )
        .await
            >= if mode == Mode::Wal { 2 } else { 1 }
    };
    assert!(
        eventually(Duration::from_secs(30), dead).await,
        "poison not dead-lettered: {}",
        relay.logs()
    );

    let status = json(&s.command(&["status", "--json"]));
    eprintln!("{status:#}");
    assert_eq!(status["held_aggregates"], 1, "{status}");
    // The leader session names the relay, and the RabbitMQ node its sink uses.
    let name = status["active_instance"]["application_name"]
        .as_str()
        .unwrap_or_default();
    assert!(name.starts_with("outbox-relay"), "{status}");
    match mode {
        Mode::Poll => {
            assert_eq!(status["dead_letters"], 1, "{status}");
            assert_eq!(status["pending"], 1, "a3 waits: {status}");
            assert_eq!(status["pending_held"], 1, "{status}");
            assert!(status["published_last_minute"].as_i64().unwrap() >= 6);
            assert!(status["slot"].is_null());
        }
        Mode::Wal => {
            assert_eq!(status["dead_letters"], 2, "poison and parked a3: {status}");
            assert_eq!(status["parked_held_events"], 1, "{status}");
            assert!(status["pending"].is_null());
            let slot = &status["slot"];
            assert_eq!(slot["name"], s.slot.as_str());
            assert!(slot["active_pid"].as_i64().is_some(), "{status}");
            assert!(slot["confirmed_flush_lsn"].as_str().is_some());
            assert!(slot["retained_wal_bytes"].as_i64().is_some());
            assert!(slot["lag_bytes"].as_i64().is_some());
        }
    }
    let table = s.command(&["status"]);
    assert_ok(&table);
    eprintln!("status ({mode:?}):\n{}", table.stdout);
    for row in [
        "outbox",
        "active instance",
        "dead letters",
        "1 aggregate held",
    ] {
        assert!(table.stdout.contains(row), "{}", table.stdout);
    }

    let list = json(&s.command(&["dead-letters", "list", "--json"]));
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters[0]["event_id"], poison.id.as_str());
    assert_eq!(letters[0]["attempts"], 2);
    assert_eq!(letters[0]["holds_aggregate"], true);
    assert!(
        letters[0]["error"].as_str().unwrap().contains("unroutable"),
        "{list}"
    );
    let listed = s.command(&["dead-letters", "list"]);
    assert_ok(&listed);
    eprintln!("dead letters ({mode:?}):\n{}", listed.stdout);
    assert!(listed.stdout.contains(&poison.id));

    // Make the poison routable, then retry A: it comes first, then what waited behind it.
    bind_more(&reader, "wallet.Unroutable").await;
    let retried = s.command(&["dead-letters", "retry", "--aggregate-id", "A"]);
    assert_ok(&retried);
    eprintln!("retry ({mode:?}): {}", retried.stdout);
    assert!(
        retried.stdout.contains("released 1 aggregate"),
        "{}",
        retried.stdout
    );
    let all: Vec<Written> = [a1.clone(), poison.clone(), a3.clone()]
        .into_iter()
        .chain(b.clone())
        .collect();
    let mut got = reader.read_until(&all, READ_TIMEOUT).await;
    // An early copy of A3 counts as seen: wait for the one sent behind the retried poison too.
    for _ in 0..20 {
        if without_early_a3(got.clone())
            .iter()
            .any(|r| r.id() == a3.id)
        {
            break;
        }
        got = reader.read_for(Duration::from_secs(1)).await;
    }
    let got = without_early_a3(got);
    let t = tally(&all, &got);
    eprintln!("after retry ({mode:?}): {t:?}");
    t.assert_complete_and_ordered();
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM outbox_dead_letters").await,
        0
    );
    // Events written after the retry flow normally.
    let a4 = insert(&s.db, "A", "Happened", 3).await;
    let all: Vec<Written> = all.into_iter().chain([a4]).collect();
    tally(
        &all,
        &without_early_a3(reader.read_until(&all, READ_TIMEOUT).await),
    )
    .assert_complete_and_ordered();
    let after = json(&s.command(&["status", "--json"]));
    assert_eq!(after["held_aggregates"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_list_and_retry_release_a_held_aggregate_in_order_poll() {
    dead_letter_lifecycle(Mode::Poll).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_list_and_retry_release_a_held_aggregate_in_order_wal() {
    dead_letter_lifecycle(Mode::Wal).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_needs_confirmation_and_releases_the_held_events() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[delivery]\nmax_attempts = 1\nbackoff_initial = \"50ms\"\n",
    )
    .await;
    s.migrate();
    let mut reader = AnyReader::Amqp(s.amqp_reader("wallet.Happened").await);
    let _relay = s.start_relay();
    let a1 = insert(&s.db, "A", "Happened", 0).await;
    let poison = insert(&s.db, "A", "Unroutable", 1).await;
    let a3 = insert(&s.db, "A", "Happened", 2).await;
    tally(
        std::slice::from_ref(&a1),
        &reader
            .read_until(std::slice::from_ref(&a1), READ_TIMEOUT)
            .await,
    )
    .assert_complete_and_ordered();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&s.db, "SELECT count(*) FROM outbox_dead_letters").await == 1
        })
        .await
    );
    // No --yes and no answer on stdin: refused, nothing changed.
    let refused = s.command(&["dead-letters", "discard", "--id", &poison.id]);
    assert_one_error(&refused, "--yes");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM outbox_dead_letters").await,
        1
    );
    let unknown = s.command(&[
        "dead-letters",
        "discard",
        "--yes",
        "--id",
        &uuid::Uuid::new_v4().to_string(),
    ]);
    assert_one_error(&unknown, "no dead letter with event id");
    let done = s.command(&["dead-letters", "discard", "--yes", "--id", &poison.id]);
    assert_ok(&done);
    assert!(
        done.stdout.contains("released 1 aggregate"),
        "{}",
        done.stdout
    );
    let want = vec![a1, a3];
    let got = reader.read_until(&want, READ_TIMEOUT).await;
    tally(&want, &got).assert_complete_and_ordered();
    assert!(got.iter().all(|r| r.id() != poison.id));
}

/// Replays `aggregate` while the relay runs: the same ids again, tagged, in order, once.
async fn replay_of_one_aggregate(broker: Broker) {
    let s = Scenario::of(Mode::Poll, broker, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 6, 20, 2).await;
    tally(&written, &reader.read_until(&written, READ_TIMEOUT).await).assert_complete_and_ordered();
    wait_published(&s.db, written.len() as i64).await;
    let target = written[0].aggregate_id.clone();
    let selected: Vec<Written> = written
        .iter()
        .filter(|w| w.aggregate_id == target)
        .cloned()
        .collect();

    let dry = s.command(&["replay", "--aggregate-id", &target, "--dry-run"]);
    assert_ok(&dry);
    eprintln!("{}", dry.stdout);
    assert!(
        dry.stdout.contains("dry run: 20 events of 1 aggregate "),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains(&selected[0].id),
        "the sample starts with the first"
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM outbox_replays").await,
        0,
        "a dry run records nothing"
    );

    let out = s.command(&["replay", "--aggregate-id", &target, "--batch-size", "7"]);
    assert_ok(&out);
    eprintln!("{}{}", out.stderr, out.stdout);
    let id = replay_id(&out);
    assert!(out.stdout.contains("20 events sent"), "{}", out.stdout);
    let again = read_replayed(&mut reader, &id, selected.len(), READ_TIMEOUT).await;
    let t = tally(&selected, &again);
    eprintln!("replayed {target}: {t:?}");
    t.assert_complete_and_ordered();
    assert_eq!(t.duplicates, 0, "{t:?}");
    assert_eq!(again.len(), selected.len());
    for r in &again {
        assert_eq!(r.headers["aggregate_id"], target);
        assert_eq!(r.headers["tenant"], "acme", "row headers are kept");
        if let Some(p) = &r.amqp {
            assert_eq!(p.message_id.as_deref(), Some(r.id()), "original id");
        }
    }
    let status = json(&s.command(&["status", "--json"]));
    assert!(
        status["unfinished_replays"].as_array().unwrap().is_empty(),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_an_aggregate_sends_each_event_again_once_kafka() {
    replay_of_one_aggregate(Broker::Kafka).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_an_aggregate_sends_each_event_again_once_rabbitmq() {
    replay_of_one_aggregate(Broker::Rabbitmq).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_another_kafka_topic_and_by_time_range() {
    let s = Scenario::of(Mode::Poll, Broker::Kafka, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let early = write_events(&s.db.url, "wallet", 3, 5, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mark = count(&s.db, "SELECT (extract(epoch FROM now()) * 1000)::bigint").await;
    let late = write_events(&s.db.url, "wallet", 3, 5, 1).await;
    let all: Vec<Written> = early.iter().chain(&late).cloned().collect();
    tally(&all, &reader.read_until(&all, READ_TIMEOUT).await).assert_complete_and_ordered();
    wait_published(&s.db, all.len() as i64).await;
    drop(relay);

    // The other topic must exist: create it.
    let other = format!("{}.replayed", s.destination);
    crate::support::kafka::create_topic(&other, 1).await;
    let since = {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(mark as u64);
        humantime::format_rfc3339_millis(t).to_string()
    };
    let out = s.command(&["replay", "--since", &since, "--topic", &other]);
    assert_ok(&out);
    let id = replay_id(&out);
    let mut other_reader = crate::support::kafka::Reader::new(KAFKA_BROKERS);
    other_reader.add_topic(other.clone());
    let mut other_reader = AnyReader::Kafka(other_reader);
    let got = read_replayed(&mut other_reader, &id, late.len(), READ_TIMEOUT).await;
    let t = tally(&late, &got);
    eprintln!("replayed since {since} to {other}: {t:?}");
    t.assert_complete_and_ordered();
    assert_eq!(t.duplicates, 0);
    assert!(got.iter().all(|r| r.destination == other));
    // Nothing extra went to the original topic.
    let original = reader.read_for(Duration::from_secs(2)).await;
    assert!(
        original.iter().all(|r| !r.headers.contains_key("replay")),
        "replay went to the configured topic too"
    );
}

/// Interrupted once by `--stop-after` (poll, Kafka) or by SIGINT (wal, RabbitMQ), then resumed:
/// every selected event is sent exactly once more.
async fn interrupted_replay_resumes(mode: Mode, broker: Broker, sigint: bool) {
    let s = Scenario::of(mode, broker, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 4, 300, 4).await;
    tally(&written, &reader.read_until(&written, READ_TIMEOUT).await).assert_complete_and_ordered();
    if mode == Mode::Poll {
        wait_published(&s.db, written.len() as i64).await;
    }

    let first = if sigint {
        let log = std::env::temp_dir().join(unique("replay_stderr"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["replay", "--aggregate-type", "wallet", "--batch-size", "4"])
            .arg("--config")
            .arg(s.config_path())
            .envs(s.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Interrupt once it has started sending.
        let started = eventually(Duration::from_secs(30), || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Ctrl-C stops it")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            started,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        let stderr = std::fs::read_to_string(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
        CommandOutput {
            status,
            stdout,
            stderr,
        }
    } else {
        s.command(&[
            "replay",
            "--aggregate-type",
            "wallet",
            "--batch-size",
            "100",
            "--stop-after",
            "500",
        ])
    };
    eprintln!("interrupted: {}", first.stderr);
    assert_one_error(&first, "--resume");
    let id = replay_id(&first);
    let sent: i64 = count(
        &s.db,
        &format!("SELECT sent FROM outbox_replays WHERE replay_id = '{id}'"),
    )
    .await;
    assert!(
        sent > 0 && sent < written.len() as i64,
        "interrupted mid-way: {sent}"
    );
    let status = s.command(&["status"]);
    assert!(status.stdout.contains(&id), "{}", status.stdout);

    let resumed = s.command(&["replay", "--resume", &id]);
    assert_ok(&resumed);
    eprintln!("resumed: {}{}", resumed.stderr, resumed.stdout);
    assert!(
        resumed.stderr.contains("resuming after"),
        "{}",
        resumed.stderr
    );
    let again = read_replayed(&mut reader, &id, written.len(), READ_TIMEOUT).await;
    let t = tally(&written, &again);
    eprintln!("{mode:?} -> {broker:?}: replay interrupted after {sent}, resumed: {t:?}");
    t.assert_complete_and_ordered();
    assert_eq!(t.duplicates, 0, "nothing sent twice: {t:?}");
    assert_eq!(again.len(), written.len());
    let finished = s.command(&["replay", "--resume", &id]);
    assert_one_error(&finished, "already finished");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_stopped_midway_resumes_without_sending_anything_twice_poll_kafka() {
    interrupted_replay_resumes(Mode::Poll, Broker::Kafka, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_interrupted_with_sigint_resumes_without_sending_anything_twice_wal_rabbitmq() {
    interrupted_replay_resumes(Mode::Wal, Broker::Rabbitmq, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_published_events_and_asks_before_unpublished_ones() {
    let s = Scenario::of(Mode::Poll, Broker::Kafka, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let mut relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 5, 10, 1).await;
    tally(&written, &reader.read_until(&written, READ_TIMEOUT).await).assert_complete_and_ordered();
    wait_published(&s.db, 50).await;

    // While the relay runs: nothing is an hour old yet.
    let out = s.command(&["purge", "--older-than", "1h", "--dry-run"]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("dry run: 0 published events"),
        "{}",
        out.stdout
    );
    let out = s.command(&["purge", "--older-than", "0s", "--dry-run"]);
    assert_ok(&out);
    eprintln!("{}", out.stdout);
    assert!(
        out.stdout.contains("dry run: 50 published events"),
        "{}",
        out.stdout
    );
    assert_eq!(count(&s.db, "SELECT count(*) FROM outbox").await, 50);
    // One aggregate by selection, then everything by age.
    let one = &written[0].aggregate_id;
    let out = s.command(&["purge", "--aggregate-id", one]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("deleted 10 published events"),
        "{}",
        out.stdout
    );
    let out = s.command(&["purge", "--older-than", "0s"]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("deleted 40 published events"),
        "{}",
        out.stdout
    );
    assert_eq!(count(&s.db, "SELECT count(*) FROM outbox").await, 0);

    // Unpublished events: the relay is stopped, so these stay pending.
    relay.terminate(Duration::from_secs(30));
    let a = insert(&s.db, "U1", "Happened", 0).await;
    insert(&s.db, "U1", "Happened", 1).await;
    insert(&s.db, "U2", "Happened", 0).await;
    let out = s.command(&["purge", "--aggregate-type", "wallet"]);
    assert_one_error(&out, "--include-unpublished");
    assert!(
        out.stderr.contains("3 unpublished events of 2 aggregates"),
        "{}",
        out.stderr
    );
    let out = s.command(&["purge", "--id", &a.id]);
    assert_one_error(&out, "--include-unpublished");
    let out = s.command(&[
        "purge",
        "--aggregate-type",
        "wallet",
        "--include-unpublished",
    ]);
    assert_one_error(&out, "--yes");
    assert_eq!(pending_count(&s.db).await, 3, "nothing was deleted");
    let out = s.command(&[
        "purge",
        "--aggregate-id",
        "U1",
        "--include-unpublished",
        "--dry-run",
    ]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("2 UNPUBLISHED events of 1 aggregate"),
        "{}",
        out.stdout
    );
    let out = s.command(&[
        "purge",
        "--aggregate-id",
        "U1",
        "--include-unpublished",
        "--yes",
    ]);
    assert_ok(&out);
    eprintln!("{}", out.stdout);
    assert!(
        out.stdout.contains("deleted 2 events") && out.stdout.contains("of 1 aggregate"),
        "{}",
        out.stdout
    );
    assert_eq!(pending_count(&s.db).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_retention_cleanup_and_purge_of_dead_letters() {
    // The daemon deletes published rows past retention with the statement purge uses.
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[outbox]\nretention = \"1s\"\ncleanup_interval = \"1s\"\n\
         [delivery]\nmax_attempts = 1\nbackoff_initial = \"50ms\"\n",
    )
    .await;
    s.migrate();
    let mut reader = AnyReader::Amqp(s.amqp_reader("wallet.Happened").await);
    let _relay = s.start_relay();
    let ok = insert(&s.db, "A", "Happened", 0).await;
    let poison = insert(&s.db, "B", "Unroutable", 0).await;
    tally(
        std::slice::from_ref(&ok),
        &reader
            .read_until(std::slice::from_ref(&ok), READ_TIMEOUT)
            .await,
    )
    .assert_complete_and_ordered();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&s.db, "SELECT count(*) FROM outbox").await == 0
        })
        .await,
        "published row not cleaned up past retention"
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM outbox_dead_letters").await,
        1
    );
    let out = s.command(&["purge", "--dead-letters", "--older-than", "1h", "--yes"]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("no dead letters match"),
        "{}",
        out.stdout
    );
    let out = s.command(&["purge", "--dead-letters", "--older-than", "0s"]);
    assert_one_error(&out, "--yes");
    let out = s.command(&["purge", "--dead-letters", "--id", &poison.id, "--yes"]);
    assert_ok(&out);
    assert!(
        out.stdout
            .contains("deleted 1 dead letter; 1 aggregate no longer held"),
        "{}",
        out.stdout
    );
}

for_both_sources! {
    the_retention_cleanup_keeps_up_with_more_than_one_batch_per_interval => retention_cleanup_catches_up;
}

/// A round of the daemon's cleanup deletes at most 10,000 rows. 25,000 rows past retention
/// must all go long before the next interval (an hour here): a cleanup paced only by the
/// interval deletes 10,000 rows per hour and lets a busy outbox grow without end.
async fn retention_cleanup_catches_up(mode: Mode) {
    let s = Scenario::of(
        mode,
        Broker::Kafka,
        "[outbox]\nretention = \"1s\"\ncleanup_interval = \"1h\"\n",
    )
    .await;
    s.migrate();
    // Past retention: published an hour ago (poll), created a day ago (wal: older than any
    // repair of the slot could need).
    let (created, columns, published) = match mode {
        Mode::Poll => (
            "now() - interval '1 hour'",
            ", relay_published_at",
            ", now() - interval '1 hour'",
        ),
        Mode::Wal => ("now() - interval '1 day'", "", ""),
    };
    s.db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at{columns}) \
             SELECT gen_random_uuid(), 'wallet', 'old-' || (i % 100), 'Happened', \
                 jsonb_build_object('n', i), {created}{published} \
             FROM generate_series(1, 25000) AS i"
        ))
        .await
        .unwrap();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    // Delivery goes on meanwhile.
    let written = write_events(&s.db.url, "wallet", 5, 20, 1).await;
    // (wal: the old rows were committed after the slot was made, so they are sent too.)
    let t = tally(&written, &reader.read_until(&written, READ_TIMEOUT).await);
    assert_eq!((t.missing, t.order_violations), (0, 0), "{t:?}");
    let old = || {
        count(
            &s.db,
            "SELECT count(*) FROM outbox WHERE aggregate_id LIKE 'old-%'",
        )
    };
    assert!(
        eventually(Duration::from_secs(60), || async { old().await == 0 }).await,
        "{} of 25,000 rows past retention left after 60 s\n{}",
        old().await,
        relay.logs()
    );
    assert!(
        relay.logs().contains("deleted outbox rows past retention"),
        "{}",
        relay.logs()
    );
}

/// Bad input: one clear message, non-zero exit, nothing changed, nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_one_clear_error_and_changes_nothing() {
    let s = Scenario::of(Mode::Poll, Broker::Kafka, "").await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 2, 5, 1).await;
    tally(&written, &reader.read_until(&written, READ_TIMEOUT).await).assert_complete_and_ordered();
    wait_published(&s.db, 10).await;
    drop(relay);
    let pending = insert(&s.db, "P", "Happened", 0).await;
    let snapshot = || async {
        (
            count(&s.db, "SELECT count(*) FROM outbox").await,
            count(
                &s.db,
                "SELECT count(*) FROM outbox WHERE relay_published_at IS NULL",
            )
            .await,
            count(&s.db, "SELECT count(*) FROM outbox_replays").await,
        )
    };
    let before = snapshot().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["replay", "--id", &unknown], "no event with id"),
        (vec!["replay", "--id", "not-a-uuid"], "not an event id"),
        (vec!["replay", "--id", &pending.id], "not published yet"),
        (
            vec![
                "replay",
                "--since",
                "2024-05-01T12:00:00Z",
                "--until",
                "2024-05-01T12:00:00Z",
            ],
            "time range is empty",
        ),
        (
            vec!["replay", "--since", "1h", "--until", "2h"],
            "time range is inverted",
        ),
        (
            vec!["replay", "--since", "yesterday-ish"],
            "--since `yesterday-ish`",
        ),
        (
            vec!["purge", "--older-than", "5 parsecs"],
            "is not a duration",
        ),
        (
            vec!["purge", "--older-than", "3 fortnights"],
            "is not a duration",
        ),
        (
            vec![
                "replay",
                "--aggregate-type",
                "wallet",
                "--topic",
                "no.such.topic.anywhere",
            ],
            "`no.such.topic.anywhere` does not exist",
        ),
        (
            vec!["replay", "--aggregate-type", "wallet", "--exchange", "x"],
            "--exchange is for RabbitMQ",
        ),
        (
            vec![
                "replay",
                "--aggregate-type",
                "wallet",
                "--topic",
                "x.{aggregatetype}",
            ],
            "has no column `aggregatetype`",
        ),
        (vec!["replay"], "say which events to replay"),
        (
            vec!["replay", "--aggregate-id", "nobody"],
            "no retained events",
        ),
        (
            vec!["replay", "--resume", "replay-000000000000"],
            "there is no replay",
        ),
        (vec!["purge", "--id", &pending.id], "--include-unpublished"),
        (vec!["purge"], "say what to purge"),
        (
            vec!["purge", "--before", "2999-01-01T00:00:00Z"],
            "is in the future",
        ),
        (vec!["dead-letters", "retry"], "say which dead letters"),
        (
            vec!["dead-letters", "retry", "--id", &unknown],
            "no dead letter",
        ),
    ];
    for (args, needle) in &cases {
        let out = s.command(args);
        eprintln!("{}: {}", args.join(" "), out.stderr.trim());
        assert_one_error(&out, needle);
        assert_eq!(
            snapshot().await,
            before,
            "`{}` changed something",
            args.join(" ")
        );
    }
    let extra = reader.read_for(Duration::from_secs(2)).await;
    assert_eq!(extra.len(), written.len(), "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_table_without_created_at_cannot_be_replayed_and_says_why() {
    let toml = r#"
[outbox]
table = "shop.dbz_outbox"
[outbox.columns]
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
"#;
    let s = Scenario::of(Mode::Wal, Broker::Rabbitmq, toml).await;
    s.db.client()
        .await
        .batch_execute(
            "CREATE SCHEMA shop; CREATE TABLE shop.dbz_outbox (id uuid PRIMARY KEY, \
             aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, \
             type varchar(255) NOT NULL, payload jsonb); \
             INSERT INTO shop.dbz_outbox VALUES (gen_random_uuid(), 'order', 'o-1', 'OrderCreated', '{}')",
        )
        .await
        .unwrap();
    s.migrate();
    let out = s.command(&["replay", "--aggregate-id", "o-1"]);
    assert_one_error(&out, "cannot be replayed");
    let status = json(&s.command(&["status", "--json"]));
    assert_eq!(status["retained"], 1, "{status}");
    assert_eq!(status["slot"]["name"], s.slot.as_str());
    assert_eq!(status["slot"]["exists"], true);
    // Purge by selection works without created_at (and never loses a wal event).
    let out = s.command(&["purge", "--aggregate-id", "o-1"]);
    assert_ok(&out);
    assert!(out.stdout.contains("deleted 1 event"), "{}", out.stdout);
}
