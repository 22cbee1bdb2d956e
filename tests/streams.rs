//! Stream handling: `--stream` creates a missing stream capturing the template's subjects, and a
//! user's stream with a short duplicate window gets a warning at start; the production stream of
//! docs/streams.md (R3 with limits, on a three-node cluster) as the command and as the JSON; a
//! full stream with `discard: new` stops the publisher with an error naming it.

mod support;

use std::time::Duration;

use async_nats::jetstream::stream;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flag_creates_the_stream_with_template_subjects_and_window() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    assert!(
        js.get_stream(&env.stream).await.is_err(),
        "no stream before the start"
    );

    let mut publisher = env.publisher(&["--stream", &env.stream, "--duplicate-window", "15m"]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let info = js
        .get_stream(&env.stream)
        .await
        .expect("--stream created the stream")
        .info()
        .await
        .expect("stream info")
        .config
        .clone();
    // A placeholder value may hold dots, so everything after the literal prefix is captured.
    assert_eq!(info.subjects, vec![format!("{}.>", env.subject_prefix)]);
    assert_eq!(info.duplicate_window, Duration::from_secs(15 * 60));
    assert_eq!(info.storage, stream::StorageType::File);
    assert!(!publisher.log().contains("duplicate window is short"));

    write_events(&env.sql().await, "w", 10, 5).await;
    wait_for_messages(&js, &env.stream, 10, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    // A second start finds the stream and leaves it as it is.
    let mut again = env.publisher(&["--stream", &env.stream, "--duplicate-window", "20m"]);
    again
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let window = js
        .get_stream(&env.stream)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .config
        .duplicate_window;
    assert_eq!(
        window,
        Duration::from_secs(15 * 60),
        "an existing stream is not edited"
    );
    assert!(!again.log().contains("created JetStream stream"));
    assert!(again.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_duplicate_window_is_warned_about() {
    let env = TestEnv::start().await;
    env.jetstream()
        .await
        .create_stream(stream::Config {
            name: env.stream.clone(),
            subjects: vec![format!("{}.>", env.subject_prefix)],
            duplicate_window: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .expect("create stream");
    let mut publisher = env.publisher(&[]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let log = publisher.log();
    let warning = log
        .lines()
        .find(|l| l.contains("duplicate window is short"))
        .unwrap_or_else(|| panic!("no warning about the 30s duplicate window; log:\n{log}"));
    assert!(
        warning.contains(&env.stream),
        "the warning names the stream: {warning}"
    );
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
}

const STREAMS_PAGE: &str = include_str!("../docs/streams.md");
const STREAM_R3_JSON: &str = include_str!("../docs/examples/stream-r3.json");

/// The `outbox-cdc run …` command docs/streams.md gives, as arguments after `run`.
fn documented_run_flags() -> Vec<String> {
    let line = STREAMS_PAGE
        .lines()
        .find(|l| l.starts_with("outbox-cdc run --stream"))
        .expect("docs/streams.md gives an `outbox-cdc run --stream` command");
    line.split_whitespace().skip(2).map(str::to_owned).collect()
}

/// What a stream keeps and how, without its name and subjects.
fn production_settings(config: &stream::Config) -> String {
    format!(
        "replicas {} storage {:?} retention {:?} max_age {:?} max_bytes {} max_msgs {} discard {:?} duplicate_window {:?}",
        config.num_replicas,
        config.storage,
        config.retention,
        config.max_age,
        config.max_bytes,
        config.max_messages.max(-1),
        config.discard,
        config.duplicate_window
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_stream_on_a_three_node_cluster_as_the_docs_give_it() {
    if std::env::var("OUTBOX_CDC_TEST_NATS_URL").is_ok() {
        eprintln!("skipped: starts its own cluster");
        return;
    }
    let mut env = TestEnv::start().await;
    let nodes = nats_cluster().await;
    env.nats_url = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    let js = env.jetstream().await;

    // The documented JSON, as `nats stream add --config` would send it. The cluster elects its
    // JetStream meta leader a moment after it starts: retried until then.
    let documented: stream::Config =
        serde_json::from_str(STREAM_R3_JSON).expect("docs/examples/stream-r3.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let created = loop {
        match js.create_stream(documented.clone()).await {
            Ok(mut created) => break created.info().await.expect("info").config.clone(),
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster never took the documented stream: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    assert_eq!(created.num_replicas, 3);
    assert_eq!(created.discard, stream::DiscardPolicy::New);

    // The documented command, with this test's stream, creates the same stream.
    let mut flags = documented_run_flags();
    let at = flags
        .iter()
        .position(|f| f == "--stream")
        .expect("--stream")
        + 1;
    flags[at] = env.stream.clone();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut publisher = env.publisher(&flags);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    write_events(&env.sql().await, "w", 20, 5).await;
    wait_for_messages(&js, &env.stream, 20, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let ours = js
        .get_stream(&env.stream)
        .await
        .expect("--stream created the stream")
        .cached_info()
        .config
        .clone();
    assert_eq!(
        production_settings(&ours),
        production_settings(&created),
        "`{}` and docs/examples/stream-r3.json differ",
        flags.join(" ")
    );
    assert_eq!(ours.subjects, [format!("{}.>", env.subject_prefix)]);
    // The checkpoint keeps as many copies as the stream.
    let bucket = js
        .get_stream(format!("KV_{}", env.checkpoint_bucket()))
        .await
        .expect("the checkpoint's bucket")
        .cached_info()
        .config
        .num_replicas;
    assert_eq!(bucket, 3, "{}", publisher.log());
    assert!(
        !publisher
            .log()
            .contains("differs from the --stream-* flags")
    );
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    assert_eq!(read_stream(&js, &env.stream).await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_with_discard_new_stops_the_publisher_naming_it() {
    let env = TestEnv::start().await;
    let js = env.jetstream().await;
    let mut publisher = env.publisher(&[
        "--stream",
        &env.stream,
        "--stream-max-bytes",
        "4KiB",
        "--stream-max-age",
        "1h",
    ]);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 40, 1).await;
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    let error = log
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains(&format!("stream `{}` is full", env.stream))
            && error.contains("maximum bytes")
            && error.contains("nothing was lost"),
        "{error}"
    );
    eprintln!("a full stream: {error}");
    assert_eq!(
        log.matches("transient failure").count(),
        0,
        "a full stream is not retried:\n{log}"
    );
    let info = js
        .get_stream(&env.stream)
        .await
        .expect("stream")
        .cached_info()
        .clone();
    assert_eq!(info.config.max_bytes, 4096);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert!(info.state.messages < 40, "{:?}", info.state);

    // Made room for, a restart publishes the rest, in order, none twice.
    let mut config = info.config.clone();
    config.max_bytes = -1;
    js.update_stream(config).await.expect("raise the limit");
    let mut again = env.publisher(&["--stream", &env.stream]);
    wait_for_messages(&js, &env.stream, 40, Duration::from_secs(30), || {
        again.log()
    })
    .await;
    assert!(again.terminate(Duration::from_secs(30)).await.success());
    let stored = read_stream(&js, &env.stream).await;
    assert_eq!(stored.len(), 40);
}
