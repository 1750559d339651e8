//! The relay against a three-node RabbitMQ cluster (`scripts/services rabbitmq-cluster`:
//! rabbit-1..3@localhost on 127.0.0.1:5701-5703). `RELAY_AMQP_URL` lists the three nodes; the
//! consumer reads a quorum queue through another node. Mid-stream the node the relay is
//! connected to is stopped for real (the Erlang node) and started again: the relay moves on
//! to the next node, sends again what was unconfirmed, and loses nothing.
//!
//! The tests are `fault_` tests: they stop shared nodes, so they run one at a time.

use std::time::{Duration, Instant};

use crate::support::*;

const NODES: [u16; 3] = [5701, 5702, 5703];
const READ_TIMEOUT: Duration = Duration::from_secs(60);

fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The `/readyz` field `broker_node`, once the relay reports one.
async fn broker_node(base: &str) -> Option<String> {
    let (_, body) = http_get(&format!("{base}/readyz")).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["broker_node"].as_str().map(str::to_string)
}

async fn node_in_use(base: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let node = broker_node(base).await;
        if node.is_some() || Instant::now() >= deadline {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// poll: the longest gap between two consecutive confirmations (`relay_published_at`, set when
/// the broker confirmed), the relay's own stall; wal marks no rows, so `None`.
async fn confirmation_stall(db: &TestDb, mode: Mode) -> Option<Duration> {
    if mode != Mode::Poll {
        return None;
    }
    let row = db
        .client()
        .await
        .query_one(
            "SELECT extract(epoch FROM max(gap))::float8 FROM ( \
               SELECT relay_published_at - lag(relay_published_at) OVER (ORDER BY relay_published_at) AS gap \
               FROM outbox WHERE relay_published_at IS NOT NULL) g",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, Option<f64>>(0).map(Duration::from_secs_f64)
}

async fn node_stop_loses_nothing(mode: Mode) {
    let mut s = Scenario::of(mode, Broker::Rabbitmq, "").await;
    let list: Vec<String> = NODES.iter().map(|p| node_url(*p)).collect();
    s.extra_env.push(("RELAY_AMQP_URL".into(), list.join(",")));
    s.migrate();
    // The consumer reads through the last node; its queue is replicated over all three.
    let mut reader = AnyReader::Amqp(
        amqp::Reader::bind_on(&node_url(NODES[2]), &s.destination, "#", true)
            .await
            .expect("the RabbitMQ cluster on 127.0.0.1:5701-5703 is not running: run scripts/services rabbitmq-cluster"),
    );
    let relay = s.start_relay();
    let base = relay.http_base().await;
    let first = node_in_use(&base, Duration::from_secs(30)).await;
    assert_eq!(
        first.as_deref(),
        Some("127.0.0.1:5701"),
        "the relay should start on the first node of the list; relay log:\n{}",
        relay.logs()
    );
    let url = s.db.url.clone();
    // About 30 s of writing (3 writers, 3,000 transactions each, 10 ms apart): the stream must
    // span the node's stop (a graceful `rabbitmqctl stop` takes seconds) and the move to the
    // next node, which the relay makes when it next sends.
    let writers = tokio::spawn(async move {
        write_events_paced(&url, "wallet", 30, 300, 3, Some(Duration::from_millis(10))).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = Instant::now();
    services(&["stop-node", "rabbit-1"]);
    assert!(
        !writers.is_finished(),
        "the writers were done before rabbit-1 stopped ({:?} after the stop began): the test would not test a stop mid-stream",
        stopped.elapsed()
    );
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:5701".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_err(),
        "rabbit-1 still accepts connections on 127.0.0.1:5701 after scripts/services stop-node"
    );
    // Back at full rate on another node while rabbit-1 is down.
    let moved = loop {
        let node = broker_node(&base).await;
        if node.as_deref().is_some_and(|n| n != "127.0.0.1:5701") {
            break node;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "the relay did not move to another node within 30 s of rabbit-1's stop; /readyz broker_node {node:?}; end of the relay log:\n{}",
            relay.logs_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let moved_after = stopped.elapsed();
    // `status` (another process) sees it through the leader session, updated by the engine.
    let mut status = serde_json::Value::Null;
    for _ in 0..50 {
        let out = s.command(&["status", "--json"]);
        status = serde_json::from_str(&out.stdout).unwrap_or_default();
        if status["active_instance"]["broker_node"].as_str() == moved.as_deref() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    services(&["start-node", "rabbit-1"]);
    let written = writers.await.unwrap();
    let received = reader.read_until(&written, READ_TIMEOUT).await;
    let t = tally(&written, &received);
    let stall = confirmation_stall(&s.db, mode).await;
    eprintln!(
        "{mode:?}: RabbitMQ node rabbit-1 (in use) stopped mid-stream; the relay was on {moved:?} {moved_after:?} later; longest gap between confirmations {stall:?}: {t:?}"
    );
    t.assert_complete_and_ordered();
    assert_eq!(
        status["active_instance"]["broker_node"].as_str(),
        moved.as_deref(),
        "status names the node in use: {status}"
    );
}

for_both_sources! {
    fault_a_rabbitmq_cluster_node_in_use_stopped_mid_stream_loses_nothing => node_stop_loses_nothing;
}
