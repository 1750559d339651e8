//! Bad events and a failing database: each ends in a dead letter or a retry, never a panic,
//! never a silent drop (see `docs/bad-input.md` for the whole catalogue).

use std::time::Duration;

use crate::support::*;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

async fn dead_letters_of(db: &TestDb, table: &str) -> Vec<(String, String)> {
    db.client()
        .await
        .query(
            &format!("SELECT event_id, error FROM {table} ORDER BY position"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn dead_letters(db: &TestDb) -> Vec<(String, String)> {
    dead_letters_of(db, "outbox_dead_letters").await
}

/// The dead letters once there is at least one, waiting up to `timeout`; fails without one.
async fn dead_letters_within(db: &TestDb, timeout: Duration) -> Vec<(String, String)> {
    let any = eventually(timeout, || async { !dead_letters(db).await.is_empty() }).await;
    assert!(any, "no dead letter within {timeout:?}");
    dead_letters(db).await
}

/// A hand-made outbox with text columns: payloads that are not JSON, a NULL aggregate id and
/// headers that are not an object are dead-lettered at once; good rows flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_dead_lettered_with_the_reason_and_good_ones_flow() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[outbox]\ntable = \"raw_outbox\"\n",
    )
    .await;
    let client = s.db.client().await;
    client
        .batch_execute(
            "CREATE TABLE raw_outbox (id uuid PRIMARY KEY, aggregate_type text, aggregate_id text, \
             event_type text NOT NULL, payload text NOT NULL, headers text)",
        )
        .await
        .unwrap();
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let rows = [
        ("good-1", Some("a"), "{\"n\": 0}", None),
        ("not-json", Some("b"), "this is not json", None),
        ("null-agg", None, "{\"n\": 0}", None),
        ("bad-headers", Some("c"), "{\"n\": 0}", Some("[1, 2]")),
        (
            "good-2",
            Some("d"),
            "{\"n\": 0}",
            Some("{\"tenant\": \"acme\"}"),
        ),
    ];
    let mut ids = std::collections::HashMap::new();
    for (name, agg, payload, headers) in rows {
        let id = uuid::Uuid::new_v4();
        ids.insert(name, id.to_string());
        client
            .execute(
                "INSERT INTO raw_outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
                 VALUES ($1, 'wallet', $2, 'Happened', $3, $4)",
                &[&id, &agg, &payload, &headers],
            )
            .await
            .unwrap();
    }
    let good: Vec<Written> = ["good-1", "good-2"]
        .iter()
        .map(|n| Written {
            id: ids[n].clone(),
            aggregate_id: String::new(),
            n: 0,
        })
        .collect();
    let got = reader.read_until(&good, READ_TIMEOUT).await;
    assert_eq!(tally(&good, &got).missing, 0);
    assert!(
        eventually(Duration::from_secs(20), || async {
            dead_letters_of(&s.db, "raw_outbox_dead_letters")
                .await
                .len()
                == 3
        })
        .await,
        "{:?}",
        dead_letters_of(&s.db, "raw_outbox_dead_letters").await
    );
    let dl: std::collections::HashMap<String, String> =
        dead_letters_of(&s.db, "raw_outbox_dead_letters")
            .await
            .into_iter()
            .collect();
    assert!(
        dl[&ids["not-json"]].contains("payload is not valid JSON"),
        "{dl:?}"
    );
    assert!(
        dl[&ids["null-agg"]].contains("aggregate_id is empty"),
        "{dl:?}"
    );
    assert!(
        dl[&ids["bad-headers"]].contains("headers must be a JSON object"),
        "{dl:?}"
    );
    let extra = reader.read_for(Duration::from_secs(1)).await;
    assert_eq!(extra.len(), 2, "only the good rows were published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kafka_topic_dead_letters_with_the_fix_when_topics_are_not_created() {
    let mut s = Scenario::of(
        Mode::Poll,
        Broker::Kafka,
        "[delivery]\nmax_attempts = 2\nbackoff_initial = \"50ms\"\n",
    )
    .await;
    let topic_prefix = unique("missing");
    s.extra_toml.push_str(&format!(
        "[kafka]\ntopic = \"{topic_prefix}.{{aggregate_type}}\"\ncreate_topics = false\n"
    ));
    s.migrate();
    let relay = s.start_relay();
    write_events(&s.db.url, "wallet", 1, 1, 1).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            !dead_letters(&s.db).await.is_empty()
        })
        .await,
        "{}",
        relay.logs()
    );
    let dl = dead_letters(&s.db).await;
    assert!(
        dl[0]
            .1
            .contains(&format!("topic `{topic_prefix}.wallet` does not exist"))
            && dl[0].1.contains("kafka.create_topics = true"),
        "{dl:?}"
    );
}

/// Postgres refuses to record progress (as on a full disk: SQLSTATE 53100): the relay keeps
/// running, retries with backoff, and once Postgres recovers every event is there — the events
/// sent meanwhile are duplicates, not losses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_error_from_postgres_is_retried_and_loses_nothing() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[delivery]\nbackoff_initial = \"100ms\"\nbackoff_max = \"500ms\"\n",
    )
    .await;
    s.migrate();
    let client = s.db.client().await;
    client
        .batch_execute(
            "CREATE TABLE disk (is_full boolean NOT NULL); INSERT INTO disk VALUES (true); \
             CREATE FUNCTION pretend_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF (SELECT is_full FROM disk) THEN \
               RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device' USING ERRCODE = '53100'; \
             END IF; RETURN NEW; END $$; \
             CREATE TRIGGER pretend_disk_full BEFORE UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION pretend_disk_full();",
        )
        .await
        .unwrap();
    let mut reader = s.reader(&["wallet"]).await;
    let mut relay = s.start_relay();
    let written = write_events(&s.db.url, "wallet", 10, 5, 2).await;
    relay
        .expect_log("No space left on device", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        relay.exited().is_none(),
        "the relay gave up: {}",
        relay.logs()
    );
    client
        .batch_execute("UPDATE disk SET is_full = false")
        .await
        .unwrap();
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &got);
    eprintln!("disk full for ~2 s: {t:?}");
    t.assert_complete_and_ordered();
    assert!(
        eventually(Duration::from_secs(20), || async {
            pending_count(&s.db).await == 0
        })
        .await,
        "progress never recorded after recovery"
    );
}

/// An AMQP short string over 255 bytes would make the broker close the channel on every try:
/// the event is dead-lettered instead, and other aggregates keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_type_too_long_for_amqp_is_dead_lettered_and_others_flow() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[delivery]\nmax_attempts = 1\non_dead_letter = \"skip\"\n",
    )
    .await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let client = s.db.client().await;
    let long_type = "T".repeat(300);
    client
        .execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES (gen_random_uuid(), 'wallet', 'long', $1, '{}')",
            &[&long_type],
        )
        .await
        .unwrap();
    let written = write_events(&s.db.url, "wallet", 5, 2, 1).await;
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    let dl = dead_letters_within(&s.db, Duration::from_secs(20)).await;
    assert!(dl[0].1.contains("AMQP allows at most 255"), "{dl:?}");
}

/// A bytea payload that is neither JSON nor UTF-8 (it holds a NUL byte) is dead-lettered with
/// its exact bytes, and the relay keeps publishing. A dead-letter table of an older schema
/// (text payload) is refused with the fix, and `migrate` converts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_payload_is_dead_lettered_byte_for_byte() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[outbox]\ntable = \"bin_outbox\"\n",
    )
    .await;
    let client = s.db.client().await;
    client
        .batch_execute(
            "CREATE TABLE bin_outbox (id uuid PRIMARY KEY, aggregate_type text NOT NULL, \
             aggregate_id text NOT NULL, event_type text NOT NULL, payload bytea NOT NULL)",
        )
        .await
        .unwrap();
    s.migrate();
    // An older dead-letter table: text payload. The relay refuses it, migrate converts it.
    client
        .batch_execute(
            "ALTER TABLE bin_outbox_dead_letters ALTER payload TYPE text USING encode(payload, 'escape')",
        )
        .await
        .unwrap();
    let out = s.command(&["run"]);
    assert!(
        !out.status.success()
            && out
                .stderr
                .contains("run `outbox-relay migrate` to convert it"),
        "{}",
        out.stderr
    );
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let relay = s.start_relay();
    let binary: Vec<u8> = vec![0xff, 0x00, b'x', 0xfe];
    let bad = uuid::Uuid::new_v4();
    let good = uuid::Uuid::new_v4();
    for (id, payload) in [(bad, binary.clone()), (good, b"{\"n\": 0}".to_vec())] {
        client
            .execute(
                "INSERT INTO bin_outbox (id, aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ($1, 'wallet', $2, 'Happened', $3)",
                &[&id, &id.to_string(), &payload],
            )
            .await
            .unwrap();
    }
    let want = [Written {
        id: good.to_string(),
        aggregate_id: good.to_string(),
        n: 0,
    }];
    let got = reader.read_until(&want, READ_TIMEOUT).await;
    assert_eq!(tally(&want, &got).missing, 0, "{}", relay.logs());
    assert!(
        eventually(Duration::from_secs(20), || async {
            !dead_letters_of(&s.db, "bin_outbox_dead_letters")
                .await
                .is_empty()
        })
        .await,
        "{}",
        relay.logs()
    );
    let row = client
        .query_one(
            "SELECT payload, error FROM bin_outbox_dead_letters WHERE event_id = $1",
            &[&bad.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), binary);
    assert!(
        row.get::<_, String>(1)
            .contains("payload is not valid JSON"),
        "{}",
        row.get::<_, String>(1)
    );
}

/// AMQP carries a message's properties and headers in one frame it cannot split. A row whose
/// headers would not fit the connection's frame size (16 KiB unless the URL's `frame_max` says
/// otherwise) would make the broker close the connection at every try: it is dead-lettered
/// with the fix instead. A row just under the size is delivered, headers intact (so the
/// relay's estimate of the frame is not below what goes on the wire), and others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_big_for_an_amqp_frame_are_dead_lettered_and_others_flow() {
    let s = Scenario::of(
        Mode::Poll,
        Broker::Rabbitmq,
        "[delivery]\nmax_attempts = 1\non_dead_letter = \"skip\"\n",
    )
    .await;
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    let _relay = s.start_relay();
    let client = s.db.client().await;
    let insert = async |aggregate: &str, header_bytes: usize| -> String {
        let headers = serde_json::json!({ "big": "h".repeat(header_bytes) });
        client
            .query_one(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
                 VALUES (gen_random_uuid(), 'wallet', $1, 'Big', '{\"n\": 0}', $2) RETURNING id::text",
                &[&aggregate, &headers],
            )
            .await
            .unwrap()
            .get(0)
    };
    let fits = Written {
        id: insert("fits", 15_800).await,
        aggregate_id: "fits".into(),
        n: 0,
    };
    let too_big = insert("too-big", 20_000).await;
    let mut written = write_events(&s.db.url, "wallet", 5, 2, 1).await;
    written.push(fits.clone());
    let got = reader.read_until(&written, READ_TIMEOUT).await;
    tally(&written, &got).assert_complete_and_ordered();
    let delivered = got.iter().find(|r| r.id() == fits.id).unwrap();
    assert_eq!(
        delivered.headers.get("big").map(String::len),
        Some(15_800),
        "the headers arrive intact"
    );
    let dl = dead_letters_within(&s.db, Duration::from_secs(20)).await;
    assert_eq!(
        dl.len(),
        1,
        "only the oversized row is a dead letter: {dl:?}"
    );
    assert_eq!(dl[0].0, too_big, "{dl:?}");
    assert!(
        dl[0]
            .1
            .contains("above the connection's AMQP frame size (16384)")
            && dl[0].1.contains("frame_max"),
        "{dl:?}"
    );
}
