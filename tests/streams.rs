//! Stream handling: `--stream` creates a missing stream capturing the template's subjects, and a
//! user's stream with a short duplicate window gets a warning at start.

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
