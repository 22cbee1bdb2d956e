//! NATS authentication against servers configured for it: a token and a user/password in the
//! URL, an NKey seed file, TLS with a CA and mutual TLS; wrong credentials fail at once, and no
//! secret reaches the log.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use outbox_cdc::embedded::EmbeddedNats;
use support::*;

async fn start_nats(config: String) -> EmbeddedNats {
    tokio::task::spawn_blocking(move || EmbeddedNats::start_with_config(&config))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("start NATS: {e}"))
}

/// Publisher arguments pointing at `nats_url` instead of the environment's server, creating
/// the test's stream itself.
fn args_for(env: &TestEnv, nats_url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = env.publisher_args();
    set_arg(&mut args, "--nats-url", nats_url);
    args.extend(["--stream".to_owned(), env.stream.clone()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn publish_and_check(
    env: &TestEnv,
    js: &jetstream::Context,
    args: &[String],
    expect_total: u64,
    secret: &str,
) {
    let mut publisher = Publisher::start(args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 10, 5).await;
    wait_for_messages(
        js,
        &env.stream,
        expect_total,
        Duration::from_secs(30),
        || publisher.log(),
    )
    .await;
    let status = publisher.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", publisher.log());
    assert!(
        !publisher.log().contains(secret),
        "the secret reached the log:\n{}",
        publisher.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_the_url_authenticates_and_a_wrong_one_fails_clearly() {
    const TOKEN: &str = "s3cr3t-t0ken";
    let env = TestEnv::start().await;
    let nats = start_nats(format!("authorization {{ token: \"{TOKEN}\" }}")).await;
    let client = async_nats::ConnectOptions::with_token(TOKEN.into())
        .connect(nats.url())
        .await
        .expect("connect with the token");
    let js = jetstream::new(client);

    let url = format!("nats://{TOKEN}@127.0.0.1:{}", nats.port());
    publish_and_check(&env, &js, &args_for(&env, &url, &[]), 10, TOKEN).await;

    let wrong = format!("nats://not-{TOKEN}@127.0.0.1:{}", nats.port());
    let mut publisher = Publisher::start(&args_for(&env, &wrong, &[]));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains("cannot connect to NATS"), "{log}");
    assert!(log.contains("***@127.0.0.1"), "{log}");
    assert!(!log.contains(TOKEN), "the token reached the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_in_the_url_and_an_nkey_seed_file_authenticate() {
    const PASSWORD: &str = "p@ss:w/rd";
    let env = TestEnv::start().await;
    let user_key = nkeys::KeyPair::new_user();
    let seed = user_key.seed().expect("seed");
    let nats = start_nats(format!(
        "authorization {{ users = [ {{ user: \"app\", password: \"{PASSWORD}\" }}, {{ nkey: \"{}\" }} ] }}",
        user_key.public_key()
    ))
    .await;
    let client = async_nats::ConnectOptions::with_user_and_password("app".into(), PASSWORD.into())
        .connect(nats.url())
        .await
        .expect("connect as app");
    let js = jetstream::new(client);

    // The password needs percent-encoding in a URL.
    let url = format!("nats://app:p%40ss%3Aw%2Frd@127.0.0.1:{}", nats.port());
    publish_and_check(&env, &js, &args_for(&env, &url, &[]), 10, "w%2Frd").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let seed_file = dir.path().join("outbox-cdc.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
    let args = args_for(
        &env,
        &nats.url(),
        &["--nats-nkey", seed_file.to_str().expect("utf-8 path")],
    );
    publish_and_check(&env, &js, &args, 20, &seed).await;

    // Without credentials the server refuses, and the tool says so instead of retrying forever.
    let mut publisher = Publisher::start(&args_for(&env, &nats.url(), &[]));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains("cannot connect to NATS"), "{log}");

    let stream = read_stream(&js, &env.stream).await;
    assert_eq!(stream.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file_and_a_clear_error_without_it() {
    // Both ring and aws-lc-rs are linked into this test: pick one, as the binary does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certificates();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.pem"), &ca).expect("write");
    std::fs::write(path("server.pem"), cert).expect("write");
    std::fs::write(path("server.key"), key).expect("write");
    let nats = start_nats(format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        path("server.pem"),
        path("server.key")
    ))
    .await;
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(path("ca.pem").into())
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("connect over TLS");
    let js = jetstream::new(client);

    let args = args_for(&env, &nats.url(), &["--nats-tls-ca", &path("ca.pem")]);
    publish_and_check(&env, &js, &args, 10, "no secret here").await;

    // Without the CA the server's certificate is unknown: a configuration error, not a retry loop.
    let mut publisher = Publisher::start(&args_for(&env, &nats.url(), &[]));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains("cannot connect to NATS"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate_and_a_clear_error_without_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new();
    let path = |name: &str| dir.path().join(name).display().to_string();
    for (name, pem) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server_cert),
        ("server.key", &pki.server_key),
        ("client.pem", &pki.client_cert),
        ("client.key", &pki.client_key),
    ] {
        std::fs::write(path(name), pem).expect("write");
    }
    // verify: the server refuses clients without a certificate its CA signed.
    let nats = start_nats(format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    ))
    .await;
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(path("ca.pem").into())
        .add_client_certificate(path("client.pem").into(), path("client.key").into())
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("connect with a client certificate");
    let js = jetstream::new(client);

    let with_certificate = args_for(
        &env,
        &nats.url(),
        &[
            "--nats-tls-ca",
            &path("ca.pem"),
            "--nats-tls-cert",
            &path("client.pem"),
            "--nats-tls-key",
            &path("client.key"),
        ],
    );
    let key_material = pki.client_key.lines().nth(1).expect("a PEM body line");
    publish_and_check(&env, &js, &with_certificate, 10, key_material).await;

    // Without the client certificate the server ends the handshake: a configuration error, not
    // a retry loop.
    let mut publisher = Publisher::start(&args_for(
        &env,
        &nats.url(),
        &["--nats-tls-ca", &path("ca.pem")],
    ));
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert!(log.contains("cannot connect to NATS"), "{log}");
    assert!(log.contains("--nats-tls-cert"), "{log}");
}
