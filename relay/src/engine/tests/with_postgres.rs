//! The engine with the real polling source, against the tests' Postgres (127.0.0.1, port
//! `OUTBOX_TEST_PG_PORT` or 5432, user `postgres`, trust), and the scripted sink: what only
//! shows with the source's own reads, such as rows parked behind an answer that is slow to come.

use tokio_postgres::NoTls;

use super::*;
use crate::config::SourceKind;
use crate::config::secret::Secret;
use crate::source::poll::PollSource;

fn pg_url(database: &str) -> String {
    let port = std::env::var("OUTBOX_TEST_PG_PORT").unwrap_or_else(|_| "5432".into());
    format!("postgres://postgres@127.0.0.1:{port}/{database}")
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to {url} (start it with scripts/services): {e}")
        });
    tokio::spawn(conn);
    client
}

/// A database of its own, dropped at the end.
struct Db {
    name: String,
    url: String,
}

impl Db {
    async fn create() -> Self {
        let name = format!(
            "relay_engine_{}_{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        connect(&pg_url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        Self {
            url: pg_url(&name),
            name,
        }
    }

    async fn drop(self) {
        let _ = connect(&pg_url("postgres"))
            .await
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await;
    }
}

/// A migrated database of its own, the engine's test configuration for the polling source
/// on it, and a connection.
async fn migrated() -> (Db, Config, tokio_postgres::Client) {
    let db = Db::create().await;
    let mut config = config(OnDeadLetter::Hold, 3);
    config.source = SourceKind::Poll;
    config.database_url = Secret::new(db.url.clone());
    let mut client = connect(&db.url).await;
    crate::outbox::migrate(&mut client, &config)
        .await
        .expect("migrate");
    (db, config, client)
}

/// Scans of the pending index so far (the polling read walks it).
async fn pending_reads(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'outbox_relay_pending_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// While a batch's answer is slow the engine asks the source again every 50 ms; on an outbox
/// with nothing else pending the polling source must not read the table each time (at most
/// once per `poll.interval` until a commit is notified or an answer applied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asked_again_while_an_answer_is_slow_an_idle_outbox_is_not_read_each_time() {
    let (db, config, client) = migrated().await;
    client
        .batch_execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'wallet', 'slow', 'E', '{}' FROM generate_series(1, 10)",
        )
        .await
        .unwrap();
    let world = Arc::new(Mutex::new(World::default()));
    let source = PollSource::open(&config).await.expect("open the source");
    let slow_answer = Duration::from_secs(3);
    let started = Instant::now();
    let result = run_source(
        source,
        world.clone(),
        config,
        ok(),
        vec![slow_answer],
        move |w: &World| w.broker.len() >= 10 && started.elapsed() > slow_answer,
        |_, _| {},
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    // The relay's session has ended, so its statistics are in.
    let reads = pending_reads(&client).await;
    drop(client);
    db.drop().await;
    // 3 s at one read per 50 ms would be about 60; once per second (poll.interval) about 4.
    assert!(
        reads <= 12,
        "the pending index was read {reads} times in 3 s while nothing else was pending"
    );
}

/// One aggregate's first batch is slow to be answered while it has more rows pending than the
/// park holds (3 batches). Batches are settled oldest first, so nothing is confirmed behind the
/// slow one meanwhile, but the other `max_in_flight - 1` batches must go out: the source reads
/// on, parks the slow aggregate's rows, and once the park is full reads past them. None of the
/// slow aggregate's later events goes out ahead of its answer; after it, everything goes, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_holds_up_only_its_own_aggregate_while_other_batches_go_out() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("outbox_relay=debug")
        .with_test_writer()
        .try_init();
    let (db, config, client) = migrated().await;
    // 100 rows of `slow` first (the first batch, 10 of them, is the send never answered),
    // then 200 rows of 40 other aggregates.
    client
        .batch_execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'wallet', 'slow', 'E', '{}' FROM generate_series(1, 100); \
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'wallet', 'fast-' || (i % 40), 'E', '{}' \
             FROM generate_series(1, 200) AS i",
        )
        .await
        .unwrap();
    let aggregate_of: HashMap<i64, String> = client
        .query("SELECT relay_seq, aggregate_id FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let fast: HashSet<i64> = aggregate_of
        .iter()
        .filter(|(_, a)| *a != "slow")
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(fast.len(), 200);
    let world = Arc::new(Mutex::new(World::default()));
    let source = PollSource::open(&config).await.expect("open the source");
    // The first send's answers take 3 s; every later send is answered at once. What the
    // broker took just before that answer is noted.
    let slow_answer = Duration::from_secs(3);
    let mut delays = vec![slow_answer];
    delays.extend(std::iter::repeat_n(Duration::ZERO, 10_000));
    let started = Instant::now();
    let before_answer: Arc<Mutex<Vec<i64>>> = Arc::default();
    let all_sent = {
        let before_answer = before_answer.clone();
        move |w: &World| {
            if started.elapsed() < slow_answer - Duration::from_millis(300) {
                *before_answer.lock().unwrap() = w.broker.clone();
            }
            w.broker.iter().collect::<HashSet<_>>().len() >= 300
        }
    };
    let result = run_source(
        source,
        world.clone(),
        config,
        ok(),
        delays,
        all_sent,
        |_, _| {},
    )
    .await;
    let published: HashSet<i64> = client
        .query(
            "SELECT relay_seq FROM outbox WHERE relay_published_at IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    db.drop().await;
    assert!(result.is_ok(), "{result:?}");
    let before_answer = before_answer.lock().unwrap().clone();
    let (fast_before, slow_before): (Vec<i64>, Vec<i64>) =
        before_answer.iter().partition(|s| fast.contains(s));
    assert_eq!(
        (slow_before.len(), fast_before.len()),
        (10, 30),
        "before the slow batch was answered, the broker should have taken that batch and the \
         3 batches of other aggregates that fit beside it; slow aggregate's events: \
         {slow_before:?}, others: {fast_before:?}"
    );
    assert_eq!(
        published.len(),
        300,
        "after the slow answer every event is published"
    );
    let w = world.lock().unwrap();
    assert_eq!(
        w.overtaking_sends, 0,
        "an aggregate was in two sends at once"
    );
    let mut last: HashMap<&str, i64> = HashMap::new();
    for seq in &w.broker {
        let aggregate = aggregate_of[seq].as_str();
        if let Some(prev) = last.insert(aggregate, *seq) {
            assert!(prev < *seq, "{aggregate}: {seq} sent after {prev}");
        }
    }
}

/// The pending read skips the run of rows out through the pending index: two ranges of it,
/// merged in order, and no sort (which would read both ranges to their limit), even on a fresh
/// backlog whose statistics still describe an empty table. It returns the rows that are not
/// out, in order, whether they lie below, inside the gaps of, or above what is out.
#[tokio::test]
async fn the_pending_read_merges_two_ranges_of_the_index_and_leaves_out_every_row_out() {
    let (db, config, client) = migrated().await;
    client
        .batch_execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'wallet', (g % 50)::text, 'E', '{}' \
             FROM generate_series(1, 5000) g",
        )
        .await
        .unwrap();
    client
        .batch_execute(crate::source::poll::READ_SETTINGS)
        .await
        .unwrap();
    let outbox = crate::outbox::Outbox::inspect(&client, &config, true)
        .await
        .unwrap();
    // Out: 101..=2000 (the run), 5 and 2002 (the rest); 2001 is a gap.
    let out_seqs: Vec<i64> = (101..=2000).chain([5, 2002]).collect();
    let out = crate::outbox::OutSeqs::split(out_seqs.iter().copied());
    assert_eq!(out.run, (101, 2000));
    let keys: Vec<String> = Vec::new();
    let plan: Vec<String> = client
        .query(
            &format!("EXPLAIN (COSTS OFF) {}", outbox.fetch_sql()),
            &[&1000i64, &out.rest, &keys, &out.run.0, &out.run.1],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("Merge Append"), "{plan}");
    assert_eq!(
        plan.matches("Index Scan using outbox_relay_pending_idx")
            .count(),
        2,
        "{plan}"
    );
    assert!(
        !plan
            .lines()
            .any(|l| l.trim_start().trim_start_matches("->").trim() == "Sort"),
        "{plan}"
    );
    let statements = outbox.prepare_poll(&client).await.unwrap();
    let read = outbox
        .fetch_pending(&client, &statements, 1000, &out, std::iter::empty())
        .await
        .unwrap();
    let seqs: Vec<i64> = read.iter().map(|e| e.seq).collect();
    let expected: Vec<i64> = (1..=100)
        .filter(|s| *s != 5)
        .chain([2001])
        .chain(2003..)
        .take(1000)
        .collect();
    assert_eq!(seqs, expected);
    // Nothing out: every row from the first, once.
    let none = crate::outbox::OutSeqs::split([]);
    let read = outbox
        .fetch_pending(&client, &statements, 1000, &none, std::iter::empty())
        .await
        .unwrap();
    let seqs: Vec<i64> = read.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<i64>>());
    drop(client);
    db.drop().await;
}
