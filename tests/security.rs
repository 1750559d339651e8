//! Security: TLS to Postgres, secrets kept out of every output, and the documented
//! least-privileged role running the relay.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(90);

for_both_sources! {
    postgres_connections_are_encrypted_with_sslmode_require => encrypted_with_sslmode_require;
    the_documented_least_privileged_role_runs_the_relay => least_privileged_role_runs_the_relay;
}

/// Every connection of the relay (application_name `outbox-relay`) to `db`, and whether it is
/// encrypted.
async fn relay_connections_ssl(db: &TestDb) -> Vec<bool> {
    db.client()
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'outbox-relay%' AND a.datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn encrypted_with_sslmode_require(mode: Mode) {
    let mut s = Scenario::of(mode, Broker::Rabbitmq, "").await;
    s.migrate();
    s.extra_env = vec![(
        "DATABASE_URL".into(),
        format!("{}?sslmode=require", s.db.url),
    )];
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 5, 4, 1).await;
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    let ssl = relay_connections_ssl(&s.db).await;
    // poll: the relay's connection and the observer's; wal: plus the replication stream.
    let expected = if mode == Mode::Wal { 3 } else { 2 };
    assert!(
        ssl.len() >= expected,
        "relay connections: {ssl:?}\n{}",
        relay.logs()
    );
    assert!(
        ssl.iter().all(|s| *s),
        "unencrypted relay connection: {ssl:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_errors_or_status() {
    const SECRET: &str = "Sup3rS3cretPw";
    let mut s = Scenario::of(Mode::Poll, Broker::Rabbitmq, "").await;
    s.migrate();
    // Postgres here trusts local connections, so the password is sent and ignored: the relay
    // works with it, and must never print it.
    let db_url =
        s.db.url
            .replace("postgres@", &format!("postgres:{SECRET}@"));
    s.extra_env = vec![
        ("DATABASE_URL".into(), db_url.clone()),
        ("RUST_LOG".into(), "debug".into()),
    ];
    let mut outputs = Vec::new();
    let mut reader = s.reader(&["wallet"]).await;
    let mut relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 3, 3, 1).await;
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    relay.terminate(Duration::from_secs(20));
    outputs.push(relay.logs());
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["dead-letters", "list"],
        &["migrate"],
    ] {
        let out = s.command(args);
        outputs.push(out.stdout + &out.stderr);
    }
    // Failing paths: a wrong AMQP password (with the secret in it) and a bad database.
    let failing = [
        (
            "RELAY_AMQP_URL",
            format!("amqp://guest:{SECRET}@127.0.0.1:5672/%2f"),
        ),
        (
            "DATABASE_URL",
            format!("postgres://postgres:{SECRET}@127.0.0.1:1/nowhere"),
        ),
        (
            "DATABASE_URL",
            pg_url(&format!("postgres:{SECRET}"), "missing_db"),
        ),
    ];
    for (var, value) in failing {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["run", "--config"])
            .arg(s.config_path())
            .envs(s.env())
            .env(var, &value)
            .output()
            .unwrap();
        assert!(!out.status.success());
        outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    for (i, text) in outputs.iter().enumerate() {
        assert!(!text.is_empty(), "output {i} is empty");
        assert!(!text.contains(SECRET), "secret in output {i}: {text}");
    }
    assert!(
        outputs.iter().any(|o| o.contains("postgres:***@")),
        "redaction not exercised"
    );
}

async fn least_privileged_role_runs_the_relay(mode: Mode) {
    let mut s = Scenario::of(mode, Broker::Rabbitmq, "").await;
    s.migrate();
    let role = unique("relay_role");
    let sql = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/least-privilege.sql");
    let status = pg_client("psql")
        .args(["-d", &s.db.name, "-v", "ON_ERROR_STOP=1", "-q"])
        .args([
            "-v",
            &format!("relay_role={role}"),
            "-v",
            "relay_password=pw",
        ])
        .args([
            "-v",
            "outbox=outbox",
            "-v",
            "dead_letters=outbox_dead_letters",
        ])
        .args([
            "-v",
            "replays=outbox_replays",
            "-v",
            "replay_items=outbox_replay_items",
        ])
        .args(["-v", "progress=outbox_relay_progress"])
        .args(["-v", "attempts=outbox_relay_attempts"])
        .args(["-f", sql])
        .status()
        .unwrap();
    assert!(status.success(), "docs/least-privilege.sql failed");
    s.extra_env = vec![(
        "DATABASE_URL".into(),
        pg_url(&format!("{role}:pw"), &s.db.name),
    )];
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 10, 5, 2).await;
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &got);
    assert_eq!(t.missing, 0, "{t:?}\n{}", relay.logs());
    t.assert_complete_and_ordered();
    // Status works with the same role.
    let out = s.command(&["status", "--json"]);
    assert!(out.status.success(), "{}", out.stderr);
    drop(relay);
    let admin = s.db.client().await;
    // Slots made by the role go with the database; the role goes now.
    let _ = admin
        .batch_execute(&format!("DROP OWNED BY {role}; "))
        .await;
    s.db.drop_role_later(role);
}
