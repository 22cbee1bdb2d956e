//! /healthz, /readyz and /metrics of a leader, a standby, and a leader that lost NATS.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Polls `path` until its status is `want`; returns the body.
async fn wait_for_status(addr: &str, path: &str, want: u16, publisher: &Publisher) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (addr_owned, path_owned) = (addr.to_owned(), path.to_owned());
        let (status, body) =
            tokio::task::spawn_blocking(move || http_get(&addr_owned, &path_owned))
                .await
                .expect("join");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answered {status} {body:?}, not {want}; log:\n{}",
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_standby_report_health_readiness_and_metrics() {
    let mut env = TestEnv::start().await;
    env.create_stream().await;
    let mut leader = env.publisher(&[]);
    let leader_addr = leader.http_addr().await;
    assert_eq!(
        wait_for_status(&leader_addr, "/readyz", 200, &leader).await,
        "leader\n"
    );

    write_events(&env.sql().await, "w", 50, 10).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 50, Duration::from_secs(30), || {
        leader.log()
    })
    .await;
    // Counters follow the acks and the commits, which may be read after the last row's ack:
    // poll until both are counted.
    wait_for_metric(&leader, "outbox_cdc_transactions_total", 5.0).await;
    let text = wait_for_metric(&leader, "outbox_cdc_events_published_total", 50.0).await;
    assert_eq!(
        metric(&text, "outbox_cdc_events_published_total"),
        Some(50.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_cdc_transactions_total"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "outbox_cdc_role{role=\"leader\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "outbox_cdc_in_flight"), Some(0.0), "{text}");
    assert!(
        metric(&text, "outbox_cdc_confirmed_lsn").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        metric(&text, "outbox_cdc_last_acked_commit_lsn").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        metric(&text, "outbox_cdc_commit_to_ack_seconds_count").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(text.contains("outbox_cdc_slot_lag_bytes"), "{text}");
    assert!(
        !text.contains(&env.subject_prefix),
        "no per-subject labels:\n{text}"
    );
    assert_eq!(
        wait_for_status(&leader_addr, "/healthz", 200, &leader).await,
        "ok\n"
    );

    let mut standby = env.publisher(&[]);
    let standby_addr = standby.http_addr().await;
    standby
        .wait_for_log("this instance is standby", Duration::from_secs(30))
        .await;
    assert_eq!(
        wait_for_status(&standby_addr, "/readyz", 200, &standby).await,
        "standby\n"
    );
    assert!(standby.terminate(Duration::from_secs(30)).await.success());

    // NATS gone: the leader is alive but not ready.
    env.embedded_nats().expect("embedded NATS").kill();
    assert_eq!(
        wait_for_status(&leader_addr, "/readyz", 503, &leader).await,
        "reconnecting\n"
    );
    assert_eq!(
        wait_for_status(&leader_addr, "/healthz", 200, &leader).await,
        "ok\n"
    );
    env.embedded_nats()
        .expect("embedded NATS")
        .restart()
        .expect("restart NATS");
    assert_eq!(
        wait_for_status(&leader_addr, "/readyz", 200, &leader).await,
        "leader\n"
    );
    assert!(leader.terminate(Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_port_is_a_clear_start_error() {
    let env = TestEnv::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut args = env.publisher_args();
    set_arg(&mut args, "--http-addr", &addr);
    let mut publisher = Publisher::start(&args);
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        publisher
            .log()
            .contains(&format!("cannot listen on --http-addr {addr}")),
        "{}",
        publisher.log()
    );
}
