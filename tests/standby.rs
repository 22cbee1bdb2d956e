//! Two instances on one slot: one streams, the other is standby; kill the first and the second
//! takes over with nothing lost.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leader_dies() {
    let env = TestEnv::start().await;
    env.create_stream().await;
    let oracle = env.oracle().await;
    let js = env.jetstream().await;
    let client = env.sql().await;

    let mut first = env.publisher(&["--standby-retry", "200ms"]);
    first
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    let mut second = env.publisher(&["--standby-retry", "200ms"]);
    second
        .wait_for_log("this instance is standby", Duration::from_secs(30))
        .await;
    // The standby names the walsender that holds the slot.
    let holder: i32 = env
        .sql()
        .await
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_cdc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        second.log().contains(&format!("(pid {holder})")),
        "standby log names the holder pid {holder}:\n{}",
        second.log()
    );

    write_events(&client, "before", 2_000, 10).await;
    wait_for_messages(&js, &env.stream, 2_000, Duration::from_secs(60), || {
        first.log()
    })
    .await;
    assert!(!second.log().contains("is the leader"), "only one leader");

    first.kill9();
    let killed = Instant::now();
    write_events(&client, "after", 2_000, 10).await;
    second
        .wait_for_log("this instance is the leader", Duration::from_secs(60))
        .await;
    wait_for_messages(&js, &env.stream, 4_000, Duration::from_secs(60), || {
        second.log()
    })
    .await;
    println!(
        "standby took over and caught up {:.2}s after the leader was killed",
        killed.elapsed().as_secs_f64()
    );

    let status = second.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", second.log());
    let stream = read_stream(&js, &env.stream).await;
    assert_exactly_once_in_order(&stream, &oracle.rows(&env).await);
}
