//! Password authentication with SCRAM-SHA-256, on both the SQL and the replication connection;
//! the password never reaches the log.

mod support;

use std::time::Duration;

use outbox_cdc::embedded::PostgresOptions;
use support::*;

const PASSWORD: &str = "s3cr3t-P4ss";

async fn scram_env() -> (TestEnv, String) {
    let env = TestEnv::start_bare(PostgresOptions {
        settings: vec![("password_encryption".into(), "'scram-sha-256'".into())],
        password_user: Some(("app".into(), PASSWORD.into())),
        ..Default::default()
    })
    .await;
    env.sql().await.batch_execute(OUTBOX_SQL).await.unwrap();
    let port = env.embedded_postgres().expect("embedded server").port();
    let url = format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable");
    (env, url)
}

fn args_with_url(env: &TestEnv, url: &str) -> Vec<String> {
    let mut args = env.publisher_args();
    let i = args.iter().position(|a| a == "--database-url").unwrap();
    args[i + 1] = url.to_owned();
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_password_authentication() {
    let (env, url) = scram_env().await;
    env.create_stream().await;
    let mut publisher = Publisher::start(&args_with_url(&env, &url));
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "scram", 100, 10).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 100, Duration::from_secs(60), || {
        publisher.log()
    })
    .await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success());
    let log = publisher.log();
    assert!(
        !log.contains(PASSWORD),
        "the password leaked into the log:\n{log}"
    );
    assert!(log.contains("postgres://app:***@127.0.0.1"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_permanent_error() {
    let (env, url) = scram_env().await;
    let wrong = url.replace(PASSWORD, "wrong-password");
    let mut publisher = Publisher::start(&args_with_url(&env, &wrong));
    let status = publisher.wait_exit(Duration::from_secs(60)).await;
    let log = publisher.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("password authentication failed for user \"app\""),
        "{log}"
    );
    assert!(!log.contains("wrong-password"), "{log}");
}
