//! Routing for parallel consumers: outbox-cdc puts the aggregate id in the subject, and the
//! stream's subject transform with `partition(N, …)` spreads aggregates over N partitions. A
//! consumer per partition then sees each aggregate's events in commit order, and the partitions
//! together hold every event once. (Stream subject transforms need nats-server 2.10+.)

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures::StreamExt;
use support::*;

const PARTITIONS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_transform_gives_each_aggregate_one_partition_in_commit_order() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    let p = &env.subject_prefix;
    // outbox-cdc publishes <p>.<aggregate_type>.<aggregate_id>.<event_type>; the stream stores
    // it as <p>.<aggregate_type>.<partition>.<aggregate_id>.<event_type>.
    let created = js
        .create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{p}.>")],
            subject_transform: Some(stream::SubjectTransform {
                source: format!("{p}.*.*.*"),
                destination: format!(
                    "{p}.{{{{wildcard(1)}}}}.{{{{partition({PARTITIONS},2)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}"
                ),
            }),
            ..Default::default()
        })
        .await;
    // nats-server 2.9 takes the option and ignores it: its answer says so.
    let transforms = created
        .as_ref()
        .is_ok_and(|s| s.cached_info().config.subject_transform.is_some());
    if !transforms {
        eprintln!("skipped: this nats-server has no stream subject transforms (2.10+)");
        return;
    }
    let mut args = env.publisher_args();
    set_arg(
        &mut args,
        "--subject-template",
        &format!("{p}.{{aggregate_type}}.{{aggregate_id}}.{{event_type}}"),
    );
    let publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    // 20 aggregates, 10 events each, interleaved across transactions.
    let sql = env.sql().await;
    for round in 0..10 {
        sql.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'order', 'o' || g, 'changed', jsonb_build_object('version', $1::int)
               FROM generate_series(1, 20) g",
            &[&round],
        )
        .await
        .expect("insert");
    }
    wait_for_messages(&js, &env.stream, 200, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;

    let mut partition_of: HashMap<String, u32> = HashMap::new();
    let mut seen = HashSet::new();
    for partition in 0..PARTITIONS {
        let consumer = js
            .get_stream(&env.stream)
            .await
            .expect("stream")
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{p}.order.{partition}.>"),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let mut versions: HashMap<String, i64> = HashMap::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
            let Ok(Some(Ok(message))) = next else { break };
            let subject = message.subject.to_string();
            let aggregate = subject.split('.').nth(3).expect("aggregate id").to_owned();
            let payload: serde_json::Value =
                serde_json::from_slice(&message.payload).expect("JSON");
            let version = payload["version"].as_i64().expect("version");
            assert_eq!(
                *partition_of.entry(aggregate.clone()).or_insert(partition),
                partition,
                "aggregate {aggregate} in two partitions"
            );
            let last = versions.insert(aggregate.clone(), version);
            assert!(
                last.is_none_or(|v| v + 1 == version),
                "{aggregate}: version {version} after {last:?} in partition {partition}"
            );
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .expect("id")
                .to_string();
            assert!(seen.insert(id), "an event in two partitions");
        }
    }
    assert_eq!(seen.len(), 200, "the partitions hold every event");
    let used: HashSet<u32> = partition_of.values().copied().collect();
    assert!(used.len() > 1, "20 aggregates spread over the partitions");
}
