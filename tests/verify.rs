//! `outbox-cdc verify` passes a clean stream and finds a gap, a duplicate, a reorder and the
//! differences from the table planted in one.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::*;

fn verify(env: &TestEnv, extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec![
        "verify",
        "--stream",
        &env.stream,
        "--nats-url",
        &env.nats_url,
        "--database-url",
        &env.database_url,
    ];
    args.extend_from_slice(extra);
    let output = run_command(&args);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        output_text(&output),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_a_clean_stream_and_finds_what_was_planted() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    // A short duplicate window, so that a duplicate can be planted.
    js.create_stream(stream::Config {
        name: env.stream.clone(),
        subjects: vec![format!("{}.>", env.subject_prefix)],
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    write_events(&sql, "w", 100, 10).await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    let (code, _, text) = tokio::task::block_in_place(|| verify(&env, &[]));
    assert_eq!(code, Some(0), "{text}");
    for needle in [
        "100 messages checked",
        "ok  commit LSNs never go backwards",
        "ok  every predecessor named is the message before",
        "ok  no event id twice",
        "ok  all 100 table rows are in the stream",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }

    // A gap (a message lost from the middle), a duplicate, a reorder, and a row deleted.
    let messages = read_stream(&js, &env.stream).await;
    let stream = js.get_stream(&env.stream).await.expect("stream");
    stream.delete_message(50).await.expect("delete a message");
    let lost_id = messages[49].id.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plant = |id: &str, lsn: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        headers.insert("Outbox-Commit-Lsn", lsn);
        headers.insert("Outbox-Table", "public.outbox");
        headers
    };
    let newest = header(&messages[99], "Outbox-Commit-Lsn")
        .expect("lsn")
        .to_owned();
    let oldest = header(&messages[0], "Outbox-Commit-Lsn")
        .expect("lsn")
        .to_owned();
    let subject = messages[0].subject.clone();
    for headers in [plant(&messages[10].id, &newest), plant("planted", &oldest)] {
        js.publish_with_headers(subject.clone(), headers, "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    sql.execute(
        "DELETE FROM outbox WHERE id::text = $1",
        &[&messages[20].id],
    )
    .await
    .expect("delete a row");

    let (code, json, text) = tokio::task::block_in_place(|| verify(&env, &["--json"]));
    assert_eq!(code, Some(1), "{text}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(report["messages"], 101, "{report}");
    assert_eq!(report["chain_breaks_count"], 1, "{report}");
    assert_eq!(report["duplicate_ids_count"], 1, "{report}");
    assert_eq!(report["lsn_backwards_count"], 1, "{report}");
    assert_eq!(
        report["rows_missing"],
        serde_json::json!([lost_id]),
        "{report}"
    );
    let extra = report["unchecked_events"].as_array().expect("list");
    assert!(
        extra.contains(&serde_json::json!(messages[20].id)),
        "{report}"
    );
    assert!(extra.contains(&serde_json::json!("planted")), "{report}");
    assert!(text.contains("finding(s)"), "{text}");

    // From a later sequence the gap is behind.
    let (_, json, _) = tokio::task::block_in_place(|| {
        verify(
            &env,
            &["--json", "--since-sequence", "60", "--where", "true"],
        )
    });
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(report["chain_breaks_count"], 0, "{report}");
}

/// The README's clean-up deletes published rows; `verify --database-url` then compares the rows
/// the table still holds, and counts the events it could not compare — a healthy outbox passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_after_the_clean_up_deletes_published_rows() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let sql = env.sql().await;
    write_events(&sql, "old", 60, 10).await;
    wait_for_messages(&js, &env.stream, 60, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    // The periodic clean-up of sql/outbox.sql: rows published a while ago go.
    sql.execute("DELETE FROM outbox WHERE aggregate_id LIKE 'old-%'", &[])
        .await
        .expect("clean up");
    write_events(&sql, "new", 40, 10).await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let (code, _, text) = tokio::task::block_in_place(|| verify(&env, &[]));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("ok  all 40 table rows are in the stream"),
        "{text}"
    );
    assert!(
        text.contains("60 events whose rows the table no longer holds"),
        "{text}"
    );
    // A row that never reached the stream is still found.
    sql.execute("SELECT pg_drop_replication_slot('outbox_cdc')", &[])
        .await
        .expect("drop the slot");
    write_events(&sql, "lost", 1, 1).await;
    let (code, _, text) = tokio::task::block_in_place(|| verify(&env, &[]));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("1 table rows the stream lacks"), "{text}");
}
