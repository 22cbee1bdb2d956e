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
    set_arg(&mut args, "--database-url", url);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_with_sslrootcert_and_scram() {
    let (env, url) = scram_env().await;
    let pg = env.embedded_postgres().expect("embedded server");
    // Turn TLS on: certificate files in the data directory, owned by the server's user.
    let data = pg.socket_dir().join("data");
    let (ca, cert, key) = certificates();
    std::fs::write(data.join("server.crt"), cert).expect("write cert");
    std::fs::write(data.join("server.key"), key).expect("write key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod key");
    }
    let owner = std::process::Command::new("chown")
        .arg("--reference")
        .arg(&data)
        .arg(data.join("server.crt"))
        .arg(data.join("server.key"))
        .status()
        .expect("chown");
    assert!(owner.success());
    match pg.psql("ALTER SYSTEM SET ssl = on") {
        // The PyPI build of PostgreSQL 18 (OUTBOX_CDC_PG_BIN) has no TLS; the client side this
        // tests is the same whatever the server's version.
        Err(e) if e.to_string().contains("SSL is not supported by this build") => {
            eprintln!("skipped: this PostgreSQL build has no SSL support");
            return;
        }
        other => other
            .and_then(|_| pg.psql("SELECT pg_reload_conf()"))
            .expect("enable ssl"),
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).expect("write CA");
    let tls_url = url.replace(
        "sslmode=disable",
        &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
    );
    env.create_stream().await;
    let mut publisher = Publisher::start(&args_with_url(&env, &tls_url));
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 10, 5).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 10, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    let encrypted: bool = env
        .sql()
        .await
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(encrypted, "the replication connection is not encrypted");
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    assert!(!publisher.log().contains(PASSWORD));

    // A CA that did not sign the server's certificate: refused, clearly, without retrying.
    let (other_ca, _, _) = certificates();
    std::fs::write(&ca_file, other_ca).expect("write other CA");
    let mut publisher = Publisher::start(&args_with_url(&env, &tls_url));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.to_lowercase().contains("certificate"), "{log}");
}
