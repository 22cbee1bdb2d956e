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

/// Turns TLS on, with a certificate for 127.0.0.1 signed by the returned CA; None when this
/// PostgreSQL build has no TLS.
fn enable_tls(env: &TestEnv) -> Option<String> {
    let pg = env.embedded_postgres().expect("embedded server");
    // Certificate files in the data directory, owned by the server's user.
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
            return None;
        }
        other => other
            .and_then(|_| pg.psql("SELECT pg_reload_conf()"))
            .expect("enable ssl"),
    };
    Some(ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_with_sslrootcert_and_scram() {
    let (env, url) = scram_env().await;
    let Some(ca) = enable_tls(&env) else { return };

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

/// Makes TCP connections of `app` authenticate with `method` (`password`, `md5`, …).
fn authenticate_with(env: &TestEnv, method: &str) {
    let pg = env.embedded_postgres().expect("embedded server");
    let hba = pg.socket_dir().join("data").join("pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 {method}\nhost replication all 127.0.0.1/32 {method}\n"
        ),
    )
    .expect("write pg_hba.conf");
    pg.psql("SELECT pg_reload_conf()").expect("reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_is_never_weakened() {
    let (env, url) = scram_env().await;
    // SCRAM without TLS, then cleartext and md5 passwords: no channel binding to be had. psql
    // refuses ("channel binding required, but server authenticated client without channel
    // binding"), and so does outbox-cdc, on the SQL connection of every command.
    for method in ["scram-sha-256", "password", "md5"] {
        authenticate_with(&env, method);
        let plain = run_command(&["setup", "--database-url", &url]);
        assert!(plain.status.success(), "{method}: {}", output_text(&plain));
        let bound = format!("{url}&channel_binding=require");
        let output = run_command(&["setup", "--database-url", &bound]);
        let text = output_text(&output);
        assert_eq!(output.status.code(), Some(1), "{method}: {text}");
        assert!(
            text.contains("channel_binding=require: the server authenticated the client without channel binding"),
            "{method}: {text}"
        );
        assert!(!text.contains(PASSWORD), "{text}");
    }
    // `run` streams over a replication connection, which cannot bind: refused at start.
    let bound = format!("{url}&channel_binding=require");
    let mut publisher = Publisher::start(&args_with_url(&env, &bound));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.starts_with(
            "error: --database-url: channel_binding=require: the replication connection cannot bind"
        ),
        "{log}"
    );
}

/// `outbox-cdc <args>` with `HOME` set to `home` (libpq's ~/.postgresql).
fn run_with_home(args: &[&str], home: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("HOME", home)
        .output()
        .expect("run outbox-cdc")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_are_applied_as_libpq_applies_them() {
    let (env, url) = scram_env().await;
    let Some(ca) = enable_tls(&env) else { return };
    let (other_ca, _, _) = certificates();
    let home = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let other_ca_file = files.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, &other_ca).expect("write CA");
    let with = |params: &str| url.replace("sslmode=disable", params);
    let setup = |params: &str| {
        let output = run_with_home(&["setup", "--database-url", &with(params)], home.path());
        (output.status.code(), output_text(&output))
    };

    // TLS without verification connects; SCRAM then binds to the channel, as required.
    let (code, text) = setup("sslmode=require&channel_binding=require");
    assert_eq!(code, Some(0), "{text}");
    // With a root certificate, sslmode=require verifies the chain (libpq): not this one.
    let require_other = format!("sslmode=require&sslrootcert={}", other_ca_file.display());
    let (code, text) = setup(&require_other);
    assert_eq!(
        code,
        Some(1),
        "sslmode=require with a root certificate must verify: {text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    // verify-full without sslrootcert: ~/.postgresql/root.crt, refused at start without it.
    let (code, text) = setup("sslmode=verify-full");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("~/.postgresql/root.crt (not found)"),
        "{text}"
    );
    std::fs::create_dir(home.path().join(".postgresql")).expect("mkdir");
    std::fs::write(home.path().join(".postgresql/root.crt"), &ca).expect("write root.crt");
    let (code, text) = setup("sslmode=verify-full");
    assert_eq!(code, Some(0), "{text}");
    // The streaming connection honours the same: it verifies against ~/.postgresql/root.crt.
    env.create_stream().await;
    let home_var = home.path().to_str().expect("utf-8");
    let mut publisher = Publisher::start_with_env(
        &args_with_url(&env, &with("sslmode=verify-full")),
        &[("HOME", home_var)],
    );
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "tls", 10, 5).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 10, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
}
