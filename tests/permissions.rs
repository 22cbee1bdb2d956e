//! docs/permissions.md, as written: each command runs as a NATS user with exactly the
//! permissions its block lists (the block is read from the page, so page and test cannot
//! drift), and with any one of them taken away it stops at once with an error naming the
//! subject. The page's PostgreSQL roles are created as written and `setup --apply`, `run`,
//! `backfill`, `verify` and `status` run as them; `backfill` without `SELECT` names the table.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use outbox_cdc::embedded::EmbeddedNats;
use support::*;

const PAGE: &str = include_str!("../docs/permissions.md");
const PASSWORD: &str = "t3st-pw";
const ADMIN: &str = "{ user: \"admin\", password: \"admin\" }";

/// The fenced blocks of the page whose first line is `<comment> outbox-cdc <command>…`.
fn blocks(comment: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut lines = PAGE.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") || line.len() == 3 {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let head = format!("{comment} outbox-cdc ");
        if let Some(command) = body.first().and_then(|first| first.strip_prefix(&head)) {
            found.push((command.to_owned(), body.join("\n")));
        }
    }
    found
}

fn block(comment: &str, command: &str) -> String {
    blocks(comment)
        .into_iter()
        .find(|(c, _)| c.split([' ', ',']).next() == Some(command))
        .map(|(_, text)| text)
        .unwrap_or_else(|| {
            panic!("docs/permissions.md has no `{comment} outbox-cdc {command}` block")
        })
}

/// A NATS block of the page with the test's names in place of the defaults it documents.
struct NatsBlock {
    text: String,
    user: String,
}

/// One permission of a block: its list and subject.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Permission {
    list: &'static str,
    subject: String,
}

impl NatsBlock {
    fn of(command: &str, env: &TestEnv) -> NatsBlock {
        let bucket = env.checkpoint_bucket();
        let text = block("#", command)
            .replace("$OUTBOX_CDC_NATS_PASSWORD", &format!("\"{PASSWORD}\""))
            .replace("\"outbox.>\"", &format!("\"{}.>\"", env.subject_prefix))
            .replace("KV_outbox_cdc", &format!("KV_{bucket}"))
            .replace("$KV.outbox_cdc.", &format!("$KV.{bucket}."))
            .replace("OUTBOX", &env.stream);
        let user = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("user: "))
            .expect("a user")
            .trim_matches('"')
            .to_owned();
        NatsBlock { text, user }
    }

    fn permissions(&self) -> Vec<Permission> {
        let mut list = "";
        let mut found = Vec::new();
        for line in self.text.lines().map(str::trim) {
            if line.starts_with("publish:") {
                list = "publish";
            } else if line.starts_with("subscribe:") {
                list = "subscribe";
            } else if line.len() > 2 && line.starts_with('"') && line.ends_with('"') {
                found.push(Permission {
                    list,
                    subject: line.trim_matches('"').to_owned(),
                });
            }
        }
        assert!(!found.is_empty(), "no permissions in\n{}", self.text);
        found
    }

    /// The server's configuration: the block, without `missing`, plus an administrator. (An
    /// allow list left empty would allow everything: it then names a subject nobody uses.)
    fn config(&self, missing: Option<&Permission>) -> String {
        let mut text = String::new();
        let alone = missing.is_some_and(|m| {
            self.permissions()
                .iter()
                .filter(|p| p.list == m.list)
                .count()
                == 1
        });
        for line in self.text.lines() {
            let dropped = missing.is_some_and(|m| line.trim() == format!("\"{}\"", m.subject));
            if !dropped {
                text.push_str(line);
                text.push('\n');
            } else if alone {
                text.push_str("\"permissions-test.nothing\"\n");
            }
            if line.trim() == "users = [" {
                text.push_str(ADMIN);
                text.push('\n');
            }
        }
        text
    }

    fn url(&self, nats: &EmbeddedNats) -> String {
        format!("nats://{}:{PASSWORD}@127.0.0.1:{}", self.user, nats.port())
    }
}

async fn start_nats(config: String) -> EmbeddedNats {
    tokio::task::spawn_blocking(move || EmbeddedNats::start_with_config(&config))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("start NATS: {e}"))
}

/// Has the server take `config`, and waits until it says it did.
async fn reload(nats: &mut EmbeddedNats, config: &str) {
    let path = nats.log_path();
    let log = || std::fs::read_to_string(&path).unwrap_or_default();
    let reloads = |text: &str| text.matches("Reloaded server configuration").count();
    let before = reloads(&log());
    nats.reload_with_config(config).expect("reload NATS");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&log()) == before {
        assert!(
            Instant::now() < deadline,
            "nats-server never reloaded:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin(nats: &EmbeddedNats) -> jetstream::Context {
    let client = async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin".into())
        .connect(nats.url())
        .await
        .expect("connect as admin");
    jetstream::new(client)
}

/// Whether NATS subject filter `filter` covers `subject` (whose wildcards count as tokens).
fn covers(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// The refusal the output reports: the list and the subject it names.
fn named_refusal(output: &str) -> Option<Permission> {
    let (_, rest) = output.split_once("denied this user permission to ")?;
    let list = if rest.starts_with("subscribe") {
        "subscribe"
    } else {
        "publish"
    };
    let subject = rest.split('`').nth(1)?.to_owned();
    Some(Permission { list, subject })
}

/// Asserts that `output` is the refusal of `missing`: its list, a subject it covers, what to do.
fn assert_names(output: &str, missing: &Permission) {
    let named = named_refusal(output)
        .unwrap_or_else(|| panic!("no refusal named without {missing:?}:\n{output}"));
    assert!(
        named.list == missing.list && covers(&missing.subject, &named.subject),
        "without {missing:?} the error names {named:?}:\n{output}"
    );
    assert!(
        output.contains(&format!(
            "add it to the user's `{}` permissions",
            missing.list
        )),
        "{output}"
    );
}

fn command(args: Vec<String>) -> impl FnOnce() -> std::process::Output {
    move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_command(&args)
    }
}

async fn outbox_cdc(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(command(args))
        .await
        .expect("join")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `run` with `missing` taken from the user: a new event is written (for the permission only
/// publishing needs), and the process must stop at once naming it.
async fn run_refused(
    nats: &mut EmbeddedNats,
    block: &NatsBlock,
    args: &[String],
    sql: &tokio_postgres::Client,
    missing: &Permission,
) {
    reload(nats, &block.config(Some(missing))).await;
    let mut publisher = Publisher::start(args);
    write_events(sql, "w", 1, 1).await;
    let status = publisher.wait_exit(Duration::from_secs(30)).await;
    let log = publisher.log();
    assert_eq!(exit_code(status), Some(1), "{log}");
    assert_names(&log, missing);
    eprintln!("run without {missing:?}: stopped naming it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_needs_exactly_the_documented_nats_permissions() {
    let env = TestEnv::start().await;
    let block = NatsBlock::of("run", &env);
    let permissions = block.permissions();
    let mut nats = start_nats(block.config(None)).await;
    let js = admin(&nats).await;
    let mut args = env.publisher_args();
    set_arg(&mut args, "--nats-url", &block.url(&nats));
    args.extend(["--stream".to_owned(), env.stream.clone()]);
    let sql = env.sql().await;

    // Each permission taken away: the process stops at once naming it. The creating ones while
    // nothing exists yet (stream first: without the bucket's, the stream is created).
    let creating = |p: &&Permission| p.subject.contains("STREAM.CREATE");
    let mut order: Vec<&Permission> = permissions.iter().filter(creating).collect();
    order.sort_by_key(|p| p.subject.contains("KV_"));
    // (The events these write commit before the slot exists: no slot, no events.)
    for missing in order {
        run_refused(&mut nats, &block, &args, &sql, missing).await;
    }

    // All of them: events flow, and a restart reads the stream's end and the checkpoint.
    reload(&mut nats, &block.config(None)).await;
    for round in 1..=2 {
        let mut publisher = Publisher::start(&args);
        publisher
            .wait_for_log("this instance is the leader", Duration::from_secs(30))
            .await;
        write_events(&sql, "w", 5, 5).await;
        wait_for_messages(&js, &env.stream, 5 * round, Duration::from_secs(30), || {
            publisher.log()
        })
        .await;
        assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    }
    // A backfilled event at the stream's end: a start reads past it with a consumer.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "backfilled-1");
    headers.insert("Outbox-Backfill", "true");
    js.publish_with_headers(
        format!("{}.order.created", env.subject_prefix),
        headers,
        "{}".into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let mut refused = 0;
    for missing in permissions.iter().filter(|p| !creating(p)) {
        run_refused(&mut nats, &block, &args, &sql, missing).await;
        refused += 1;
    }

    // Nothing was lost meanwhile: the events written while refused follow.
    let total = 5 + 5 + 1 + refused;
    reload(&mut nats, &block.config(None)).await;
    let mut publisher = Publisher::start(&args);
    wait_for_messages(&js, &env.stream, total, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    let stream = read_stream(&js, &env.stream).await;
    let ids: std::collections::HashSet<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), stream.len(), "no event twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_verify_and_status_need_exactly_the_documented_nats_permissions() {
    let env = TestEnv::start().await;
    let blocks: Vec<NatsBlock> = ["backfill", "verify", "status"]
        .iter()
        .map(|c| NatsBlock::of(c, &env))
        .collect();
    let mut nats = start_nats(blocks[0].config(None)).await;
    let js = admin(&nats).await;
    // The stream, the slot and the checkpoint, made by `run` as the administrator; then rows
    // the stream does not hold.
    let mut args = env.publisher_args();
    let admin_url = format!("nats://admin:admin@127.0.0.1:{}", nats.port());
    set_arg(&mut args, "--nats-url", &admin_url);
    args.extend(["--stream".to_owned(), env.stream.clone()]);
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 5, 5).await;
    wait_for_messages(&js, &env.stream, 5, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());
    write_events(&env.sql().await, "late", 3, 3).await;

    let commands: [(&NatsBlock, Vec<String>); 3] = [
        (&blocks[0], {
            let mut a = strings(&["backfill"]);
            a.extend(env.backfill_args());
            a.extend(strings(&["--where", "true"]));
            a
        }),
        (
            &blocks[1],
            strings(&[
                "verify",
                "--stream",
                &env.stream,
                "--database-url",
                &env.database_url,
            ]),
        ),
        (
            &blocks[2],
            strings(&[
                "status",
                "--database-url",
                &env.database_url,
                "--checkpoint-bucket",
                &env.checkpoint_bucket(),
            ]),
        ),
    ];
    for (block, args) in commands {
        let mut args = args;
        let url = block.url(&nats);
        match args.iter().position(|a| a == "--nats-url") {
            Some(at) => args[at + 1] = url,
            None => args.extend(["--nats-url".to_owned(), url]),
        }
        let command = args[0].clone();
        for missing in block.permissions() {
            reload(&mut nats, &block.config(Some(&missing))).await;
            let output = outbox_cdc(args.clone()).await;
            let text = output_text(&output);
            if command == "status" {
                // The slot is shown; the checkpoint's note says why it was not read.
                assert!(output.status.success(), "{text}");
                assert!(text.contains("not read: the NATS server denied"), "{text}");
            } else {
                assert_eq!(output.status.code(), Some(1), "{command}: {text}");
            }
            assert_names(&text, &missing);
            eprintln!("{command} without {missing:?}: named");
        }
        reload(&mut nats, &block.config(None)).await;
        let output = outbox_cdc(args.clone()).await;
        let text = output_text(&output);
        assert!(output.status.success(), "{command}: {text}");
        assert!(!text.contains("denied"), "{command}: {text}");
        match command.as_str() {
            "backfill" => assert!(
                text.contains("published 3, already in the stream 5"),
                "{text}"
            ),
            "verify" => assert!(
                text.contains("all 8 table rows are in the stream"),
                "{text}"
            ),
            _ => assert!(
                text.lines()
                    .any(|l| l.starts_with("checkpoint") && l.contains('/')),
                "{text}"
            ),
        }
    }
}

/// The role the page's SQL block for `command` creates, and that block run as the superuser.
async fn create_role(env: &TestEnv, command: &str) -> String {
    let sql = block("--", command)
        .replace("'change-me'", &format!("'{PASSWORD}'"))
        .replace("DATABASE app ", &format!("DATABASE {} ", env.database));
    env.sql()
        .await
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    sql.split_whitespace()
        .skip_while(|w| *w != "ROLE")
        .nth(1)
        .expect("CREATE ROLE name")
        .to_owned()
}

fn url_as(env: &TestEnv, role: &str) -> String {
    let mut url = url::Url::parse(&env.database_url).expect("database URL");
    url.set_username(role).expect("a user");
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_runs_as_the_documented_postgresql_role() {
    let env = TestEnv::start_bare(Default::default()).await;
    let setup_role = create_role(&env, "setup").await;
    let output = outbox_cdc(strings(&[
        "setup",
        "--database-url",
        &url_as(&env, &setup_role),
        "--apply",
    ]))
    .await;
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("++  create the outbox table")
            && text.contains("++  create publication")
            && text.contains("++  create replication slot"),
        "{text}"
    );

    let run_role = create_role(&env, "run").await;
    let reader = create_role(&env, "backfill").await;
    let mut args = env.publisher_args();
    set_arg(&mut args, "--database-url", &url_as(&env, &run_role));
    args.extend(["--stream".to_owned(), env.stream.clone()]);
    let mut publisher = Publisher::start(&args);
    publisher
        .wait_for_log("this instance is the leader", Duration::from_secs(30))
        .await;
    write_events(&env.sql().await, "w", 5, 5).await;
    let js = env.jetstream().await;
    wait_for_messages(&js, &env.stream, 5, Duration::from_secs(30), || {
        publisher.log()
    })
    .await;
    assert!(publisher.terminate(Duration::from_secs(30)).await.success());

    let as_reader = url_as(&env, &reader);
    let mut backfill = strings(&["backfill"]);
    backfill.extend(env.backfill_args());
    set_arg(&mut backfill, "--database-url", &as_reader);
    backfill.extend(strings(&["--where", "true"]));
    let output = outbox_cdc(backfill.clone()).await;
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("already in the stream 5"), "{text}");
    for args in [
        strings(&[
            "verify",
            "--stream",
            &env.stream,
            "--nats-url",
            &env.nats_url,
            "--database-url",
            &as_reader,
        ]),
        strings(&[
            "status",
            "--nats-url",
            &env.nats_url,
            "--database-url",
            &as_reader,
            "--checkpoint-bucket",
            &env.checkpoint_bucket(),
        ]),
    ] {
        let output = outbox_cdc(args).await;
        let text = output_text(&output);
        assert!(output.status.success(), "{text}");
    }

    // Without SELECT the error names the table.
    env.sql()
        .await
        .batch_execute(&format!("REVOKE SELECT ON public.outbox FROM {reader}"))
        .await
        .expect("revoke");
    let output = outbox_cdc(backfill).await;
    let text = output_text(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("permission denied for table outbox"),
        "{text}"
    );
    eprintln!(
        "backfill without SELECT: {}",
        text.lines().last().unwrap_or_default()
    );
}

#[test]
fn the_page_has_a_block_for_each_command_and_subject_filters_match_as_nats_does() {
    let nats: Vec<String> = blocks("#").into_iter().map(|(c, _)| c).collect();
    for command in ["run", "backfill", "verify", "status"] {
        assert!(
            nats.iter()
                .any(|c| c.split_whitespace().next() == Some(command)),
            "{nats:?}"
        );
    }
    let sql: Vec<String> = blocks("--").into_iter().map(|(c, _)| c).collect();
    assert_eq!(sql.len(), 3, "{sql:?}");
    assert!(covers("_INBOX.>", "_INBOX.abc.*"));
    assert!(covers(
        "$JS.API.CONSUMER.MSG.NEXT.S.*",
        "$JS.API.CONSUMER.MSG.NEXT.S.c1"
    ));
    assert!(!covers("$JS.API.STREAM.INFO.S", "$JS.API.STREAM.INFO.KV_b"));
    assert!(!covers("a.>", "a"));
    assert_eq!(
        named_refusal(
            "error: the NATS server denied this user permission to subscribe to `_INBOX.x.*`: add"
        ),
        Some(Permission {
            list: "subscribe",
            subject: "_INBOX.x.*".into()
        })
    );
}
