//! Bad configuration and unreachable dependencies: one clear message, a non-zero exit, no
//! panic, no secret in the output.

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use crate::support::*;

struct Case {
    name: &'static str,
    toml: &'static str,
    env: Vec<(&'static str, String)>,
    unset: Vec<&'static str>,
    migrate_first: bool,
    expect: &'static [&'static str],
}

fn case(name: &'static str, expect: &'static [&'static str]) -> Case {
    Case {
        name,
        toml: "",
        env: vec![],
        unset: vec![],
        migrate_first: true,
        expect,
    }
}

async fn check(c: Case, broker: Broker) {
    let s = Scenario::with_toml(broker, c.toml).await;
    if c.migrate_first {
        s.migrate();
    }
    let stderr_path = std::env::temp_dir().join(unique("config_case"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.arg("run")
        .arg("--config")
        .arg(s.config_path())
        .envs(s.env())
        .envs(c.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        // A file, not a pipe: a pipe nobody reads would block a chatty child.
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    for var in &c.unset {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            panic!("{}: the relay kept running instead of failing", c.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = CommandOutput {
        status: child.wait().unwrap(),
        stdout: String::new(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&stderr_path);
    assert!(
        !out.status.success(),
        "{}: exit status {:?}",
        c.name,
        out.status
    );
    assert!(
        !out.stderr.contains("panicked"),
        "{}: panic: {}",
        c.name,
        out.stderr
    );
    let message: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("outbox-relay: error:"))
        .collect();
    assert_eq!(
        message.len(),
        1,
        "{}: one error line expected: {}",
        c.name,
        out.stderr
    );
    for fragment in c.expect {
        assert!(
            message[0].contains(fragment),
            "{}: `{fragment}` missing from: {}",
            c.name,
            message[0]
        );
    }
    assert!(
        !out.stderr.contains("s3cret"),
        "{}: secret leaked: {}",
        c.name,
        out.stderr
    );
    eprintln!("{}: {}", c.name, message[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_gives_one_clear_message_and_a_non_zero_exit() {
    let cases = vec![
        Case {
            toml: "[poll]\nbatchsize = 5\n",
            migrate_first: false,
            ..case(
                "unknown key",
                &[
                    "unknown key `poll.batchsize`",
                    "batch_size (moved to `delivery.batch_size`)",
                ],
            )
        },
        Case {
            env: vec![
                ("RELAY_POLL__BATCH_SIZE", "7".into()),
                ("RELAY_DELIVERY__BATCH_SIZE", "8".into()),
            ],
            migrate_first: false,
            ..case(
                "deprecated key disagreeing with its new key",
                &[
                    "`RELAY_POLL__BATCH_SIZE` = 7",
                    "`RELAY_DELIVERY__BATCH_SIZE` = 8",
                    "keep only `delivery.batch_size`",
                ],
            )
        },
        Case {
            env: vec![("RELAY_SOURCE", "bogus".into())],
            migrate_first: false,
            ..case(
                "bad source",
                &["`source` = `bogus` is not valid", "poll, wal"],
            )
        },
        Case {
            toml: "[kafka]\ntopic = \"x.{aggregatetype}\"\n",
            ..case(
                "template names a column the table lacks",
                &[
                    "kafka.topic names {aggregatetype}",
                    "has no column `aggregatetype`",
                    "{aggregate_type}",
                ],
            )
        },
        Case {
            toml: "[kafka]\nkey = \"{partition}\"\n",
            migrate_first: false,
            ..case(
                "{partition} in a Kafka template",
                &["kafka.key", "{partition}", "rabbitmq.partitions"],
            )
        },
        Case {
            unset: vec!["DATABASE_URL"],
            ..case("no database url", &["DATABASE_URL is not set"])
        },
        Case {
            env: vec![("DATABASE_URL", pg_url("postgres:s3cret", "no_such_db"))],
            ..case(
                "database missing",
                &["cannot connect to Postgres", "no_such_db", "does not exist"],
            )
        },
        Case {
            env: vec![(
                "DATABASE_URL",
                "postgres://postgres:s3cret@127.0.0.1:1/app".into(),
            )],
            ..case(
                "postgres unreachable",
                &["cannot connect to Postgres at postgres://postgres:***@127.0.0.1:1/app"],
            )
        },
        Case {
            migrate_first: false,
            ..case(
                "not migrated",
                &["outbox", "does not exist", "outbox-relay migrate"],
            )
        },
        Case {
            // Through the generic env override, so `migrate` (run with the file) made the
            // default table.
            env: vec![("RELAY_OUTBOX__COLUMNS__AGGREGATE_ID", "aggregateid".into())],
            ..case(
                "wrong column mapping",
                &["no column `aggregateid`", "outbox.columns.aggregate_id"],
            )
        },
        Case {
            toml: "[outbox]\ntable = \"outbox; drop table x\"\n",
            migrate_first: false,
            ..case(
                "identifier injection",
                &["outbox.table", "not a plain SQL identifier"],
            )
        },
        Case {
            toml: "[kafka.properties]\nacks = \"1\"\n",
            migrate_first: false,
            ..case(
                "weakened acks",
                &["kafka.properties.acks cannot be changed", "acks=all"],
            )
        },
        Case {
            env: vec![("RELAY_KAFKA_BROKERS", "127.0.0.1:1".into())],
            ..case(
                "kafka unreachable",
                &["cannot reach Kafka at 127.0.0.1:1", "RELAY_KAFKA_BROKERS"],
            )
        },
        Case {
            env: vec![("RELAY_SOURCE", "wal".into())],
            ..case(
                "wal without its publication",
                &[
                    "publication `outbox_relay_outbox` does not exist",
                    "RELAY_SOURCE=wal",
                ],
            )
        },
    ];
    for c in cases {
        check(c, Broker::Kafka).await;
    }
}

/// The OTLP exporter's variables are checked at start-up: an unknown protocol or a malformed
/// list is one message naming the variable (and the accepted values), never a header's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_otlp_settings_give_one_clear_message_at_start_up() {
    let endpoint = (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://127.0.0.1:4318".to_string(),
    );
    let mut cases = vec![
        Case {
            env: vec![
                endpoint.clone(),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/xml".into()),
            ],
            migrate_first: false,
            ..case(
                "unknown protocol",
                &[
                    "OTEL_EXPORTER_OTLP_PROTOCOL=`http/xml` is not an OTLP protocol",
                    "`http/protobuf` (the default)",
                    "`http/json`",
                ],
            )
        },
        Case {
            // Wrong even with no endpoint set: found before it matters.
            env: vec![("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "protobuf".into())],
            migrate_first: false,
            ..case(
                "unknown traces protocol without an endpoint",
                &["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=`protobuf` is not an OTLP protocol"],
            )
        },
        Case {
            env: vec![
                endpoint.clone(),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=Bearer s3cret,s3cret".into(),
                ),
            ],
            migrate_first: false,
            ..case(
                "malformed headers",
                &[
                    "OTEL_EXPORTER_OTLP_HEADERS: entry 2 has no `=`",
                    "key1=value1",
                ],
            )
        },
        Case {
            env: vec![(
                "OTEL_RESOURCE_ATTRIBUTES",
                "team=billing,region=eu%2".into(),
            )],
            migrate_first: false,
            ..case(
                "malformed resource attributes",
                &["OTEL_RESOURCE_ATTRIBUTES: the value of `region` has a `%`"],
            )
        },
        Case {
            env: vec![(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "otel-collector:4318".into(),
            )],
            migrate_first: false,
            ..case(
                "endpoint without a scheme",
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=`otel-collector:4318` is not an http",
                    "http://otel-collector:4318/v1/traces",
                ],
            )
        },
        Case {
            env: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://api.vendor.example".into(),
            )],
            migrate_first: false,
            ..case(
                "https endpoint without TLS in the build",
                &[
                    "OTEL_EXPORTER_OTLP_ENDPOINT=`https://api.vendor.example`",
                    "without TLS",
                    "http://",
                ],
            )
        },
    ];
    if !cfg!(feature = "otlp-grpc") {
        cases.push(Case {
            env: vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into())],
            migrate_first: false,
            ..case(
                "grpc not built in",
                &[
                    "OTEL_EXPORTER_OTLP_PROTOCOL=`grpc`",
                    "without OTLP/gRPC",
                    "`http/json`",
                ],
            )
        });
    }
    for c in cases {
        check(c, Broker::Rabbitmq).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rabbitmq_settings_give_one_clear_message() {
    let cases = vec![
        Case {
            env: vec![(
                "RELAY_AMQP_URL",
                "amqp://guest:s3cret@127.0.0.1:5672/%2f".into(),
            )],
            ..case(
                "wrong credentials",
                &[
                    "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:5672/%2f",
                    "RELAY_AMQP_URL",
                ],
            )
        },
        Case {
            env: vec![(
                "RELAY_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            )],
            ..case("rabbitmq unreachable", &["RabbitMQ", "127.0.0.1:1"])
        },
        Case {
            toml: "[rabbitmq]\nexchange = \"no_such_exchange_for_relay\"\ndeclare_exchange = false\n",
            ..case(
                "exchange missing",
                &[
                    "exchange `no_such_exchange_for_relay` does not exist",
                    "declare_exchange",
                ],
            )
        },
        Case {
            env: vec![("RELAY_AMQP_URL", "http://127.0.0.1:5672".into())],
            ..case("not an amqp url", &["RELAY_AMQP_URL", "amqp://"])
        },
        Case {
            toml: "[rabbitmq]\nrouting_key = \"{aggregate_type}.{partition}\"\npartitions = 0\n",
            migrate_first: false,
            ..case(
                "zero partitions",
                &["rabbitmq.partitions = 0", "at least 1"],
            )
        },
        Case {
            toml: "[rabbitmq]\nrouting_key = \"{aggregate_type}.{partition}\"\n",
            migrate_first: false,
            ..case(
                "{partition} without partitions",
                &["rabbitmq.routing_key", "needs rabbitmq.partitions"],
            )
        },
        Case {
            toml: "[rabbitmq]\nrouting_key = \"{aggregate_type}.{region}\"\n",
            ..case(
                "routing key names a column the table lacks",
                &[
                    "rabbitmq.routing_key names {region}",
                    "has no column `region`",
                ],
            )
        },
        Case {
            toml: "[message]\nformat = \"avro\"\n",
            migrate_first: false,
            ..case("unknown message format", &["message.format", "avro"])
        },
    ];
    for c in cases {
        check(c, Broker::Rabbitmq).await;
    }
}

/// Settings that moved out of `[poll]` keep working under their old env name for a while: the
/// value takes effect, and start-up says once what to set instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_poll_batch_size_env_key_still_works_and_warns_once_that_it_will_be_removed() {
    let mut s = Scenario::new(Broker::Rabbitmq).await;
    s.extra_env
        .push(("RELAY_POLL__BATCH_SIZE".into(), "3".into()));
    s.migrate();
    let mut reader = s.reader(&["wallet"]).await;
    // Written before the relay starts, so its first read finds more than 3 pending events.
    let written = write_events(&s.db.url, "wallet", 4, 3, 1).await;
    let relay = s.start_relay();
    let received = reader.read_until(&written, Duration::from_secs(60)).await;
    tally(&written, &received).assert_complete_and_ordered();
    let logs = relay.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("is deprecated"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one deprecation warning expected: {logs}"
    );
    for fragment in [
        "WARN",
        "`RELAY_POLL__BATCH_SIZE` is deprecated and will be removed",
        "set `RELAY_DELIVERY__BATCH_SIZE` instead",
    ] {
        assert!(
            warnings[0].contains(fragment),
            "`{fragment}` missing from: {}",
            warnings[0]
        );
    }
    // The old key's value is the batch size in force: no read took more than 3 events.
    let reads: Vec<usize> = logs
        .lines()
        .filter(|l| l.contains("read pending events"))
        .filter_map(|l| {
            l.split(" read=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        reads.iter().max(),
        Some(&3),
        "batch sizes read: {reads:?}\n{logs}"
    );
}
