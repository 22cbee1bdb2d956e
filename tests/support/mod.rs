//! Shared integration-test harness: real PostgreSQL and NATS servers, the real binary.
//!
//! By default every test starts its own throwaway servers (see `outbox_cdc::embedded`).
//! `OUTBOX_CDC_TEST_DATABASE_URL` (a superuser URL on a server with wal_level=logical) and
//! `OUTBOX_CDC_TEST_NATS_URL` point the tests at existing servers instead; each test then works
//! in a database, stream and subject prefix of its own.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use outbox_cdc::embedded::{EmbeddedNats, EmbeddedPostgres, PostgresOptions};
use tokio_postgres::NoTls;

pub mod faults;
pub mod proxy;

pub use outbox_cdc::commands::setup::OUTBOX_SQL;

/// A name no other test (or earlier run on a shared server) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{}_{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

enum Backend {
    Embedded(Box<EmbeddedPostgres>),
    External,
}

/// One test's servers: a database with the outbox table, and a NATS server.
pub struct TestEnv {
    _postgres: Backend,
    nats: Option<EmbeddedNats>,
    /// Superuser URL of the test's database.
    pub database_url: String,
    pub nats_url: String,
    pub database: String,
    /// Literal first token of every subject in this test, e.g. `t_123_0_abc`.
    pub subject_prefix: String,
    /// A JetStream stream name of this test's own.
    pub stream: String,
}

impl TestEnv {
    /// Servers with default settings and the recommended outbox table and publication.
    pub async fn start() -> TestEnv {
        let env = Self::start_bare(PostgresOptions::default()).await;
        env.sql()
            .await
            .batch_execute(OUTBOX_SQL)
            .await
            .expect("create outbox");
        env
    }

    /// Servers with an empty database.
    pub async fn start_bare(options: PostgresOptions) -> TestEnv {
        let subject_prefix = unique("t");
        let stream = unique("S").to_uppercase();
        let external_pg = std::env::var("OUTBOX_CDC_TEST_DATABASE_URL").ok();
        let uses_defaults = options.wal_level == "logical"
            && options.settings.is_empty()
            && options.password_user.is_none();
        let (postgres, database_url, database) = match external_pg {
            Some(url) if uses_defaults => {
                let database = unique("outbox_test");
                let (admin, conn) = tokio_postgres::connect(&url, NoTls)
                    .await
                    .expect("connect to OUTBOX_CDC_TEST_DATABASE_URL");
                tokio::spawn(conn);
                admin
                    .batch_execute(&format!("CREATE DATABASE {database}"))
                    .await
                    .expect("create test database");
                let mut parsed = url::Url::parse(&url).expect("OUTBOX_CDC_TEST_DATABASE_URL");
                parsed.set_path(&database);
                (Backend::External, parsed.to_string(), database)
            }
            _ => {
                let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options))
                    .await
                    .expect("join")
                    .unwrap_or_else(|e| panic!("start PostgreSQL: {e}"));
                let url = pg.url("postgres");
                (Backend::Embedded(Box::new(pg)), url, "postgres".to_owned())
            }
        };
        let (nats, nats_url) = match std::env::var("OUTBOX_CDC_TEST_NATS_URL") {
            Ok(url) => (None, url),
            Err(_) => {
                let nats = tokio::task::spawn_blocking(EmbeddedNats::start)
                    .await
                    .expect("join")
                    .unwrap_or_else(|e| panic!("start NATS: {e}"));
                let url = nats.url();
                (Some(nats), url)
            }
        };
        TestEnv {
            _postgres: postgres,
            nats,
            database_url,
            nats_url,
            database,
            subject_prefix,
            stream,
        }
    }

    pub fn embedded_postgres(&self) -> Option<&EmbeddedPostgres> {
        match &self._postgres {
            Backend::Embedded(pg) => Some(pg),
            _ => None,
        }
    }

    /// The embedded NATS server's process id (None with an external server).
    pub fn nats_pid(&self) -> Option<u32> {
        self.nats.as_ref().and_then(EmbeddedNats::pid)
    }

    pub fn embedded_nats(&mut self) -> Option<&mut EmbeddedNats> {
        self.nats.as_mut()
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.database_url, NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(conn);
        client
    }

    /// A SQL connection, or None while the server is unreachable (fault tests).
    pub async fn sql_opt(&self) -> Option<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.database_url, NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(client)
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(server_addrs(&self.nats_url))
            .await
            .expect("connect to NATS");
        jetstream::new(client)
    }

    /// The test's checkpoint bucket.
    pub fn checkpoint_bucket(&self) -> String {
        format!("cp_{}", self.subject_prefix)
    }

    /// The subject template every test uses: `<prefix>.{aggregate_type}.{event_type}`.
    pub fn subject_template(&self) -> String {
        format!("{}.{{aggregate_type}}.{{event_type}}", self.subject_prefix)
    }

    /// Creates the test's stream capturing `<prefix>.>`.
    pub async fn create_stream(&self) -> stream::Stream {
        self.create_stream_on(stream::StorageType::File).await
    }

    /// The test's stream on the given storage.
    pub async fn create_stream_on(&self, storage: stream::StorageType) -> stream::Stream {
        self.jetstream()
            .await
            .create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![format!("{}.>", self.subject_prefix)],
                duplicate_window: Duration::from_secs(600),
                storage,
                ..Default::default()
            })
            .await
            .expect("create stream")
    }

    /// Arguments every publisher in a test gets.
    pub fn publisher_args(&self) -> Vec<String> {
        vec![
            "--database-url".into(),
            self.database_url.clone(),
            "--nats-url".into(),
            self.nats_url.clone(),
            "--subject-template".into(),
            self.subject_template(),
            "--status-interval".into(),
            "200ms".into(),
            // Tests run side by side: each endpoint on a free port (see `Publisher::http_addr`).
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            // A NATS server shared by tests (OUTBOX_CDC_TEST_NATS_URL) holds every test's
            // checkpoint: each in a bucket of its own.
            "--checkpoint-bucket".into(),
            self.checkpoint_bucket(),
        ]
    }

    /// Arguments every `backfill` in a test gets: the servers and `run`'s mapping (backfill takes
    /// only the flags it uses, not the slot's, the status interval or the HTTP endpoint).
    pub fn backfill_args(&self) -> Vec<String> {
        vec![
            "--database-url".into(),
            self.database_url.clone(),
            "--nats-url".into(),
            self.nats_url.clone(),
            "--subject-template".into(),
            self.subject_template(),
        ]
    }

    /// Starts the publisher with the common arguments plus `extra`.
    pub fn publisher(&self, extra: &[&str]) -> Publisher {
        let mut args = self.publisher_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        Publisher::start(&args)
    }

    /// Creates a `test_decoding` slot: the independent record of what committed, in order.
    pub async fn oracle(&self) -> Oracle {
        let slot = unique("oracle");
        self.sql()
            .await
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await
            .expect("create oracle slot");
        Oracle { slot }
    }

    /// The outbox slot's confirmed flush position.
    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Option<u64> {
        let row = self
            .sql()
            .await
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read slot");
        row.and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|v| v as u64)
    }
}

/// Replaces the value of `flag` in publisher arguments (the harness sets every flag it uses).
pub fn set_arg(args: &mut [String], flag: &str, value: &str) {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("the harness does not set {flag}"));
    args[at + 1] = value.to_owned();
}

/// A CA and a server certificate for 127.0.0.1/localhost signed by it: (ca.pem, cert.pem, key.pem).
pub fn certificates() -> (String, String, String) {
    let pki = Pki::new();
    (pki.ca, pki.server_cert, pki.server_key)
}

/// A CA with a server certificate for 127.0.0.1/localhost and a client certificate, both
/// signed by it (PEM).
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let signed = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let params = CertificateParams::new(names).expect("certificate params");
            let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = signed(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = signed(vec!["outbox-cdc".into()]);
        Pki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// Three `nats-server`s in a cluster on loopback (JetStream on each; its meta leader is
/// elected a moment after they start).
pub async fn nats_cluster() -> Vec<EmbeddedNats> {
    let ports: Vec<u16> = (0..3)
        .map(|_| outbox_cdc::embedded::free_port().expect("port"))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let config = format!(
            "server_name: n{i}\ncluster {{ name: outbox_test, listen: 127.0.0.1:{port}, routes: [{}] }}",
            routes.join(", ")
        );
        nodes.push(
            tokio::task::spawn_blocking(move || EmbeddedNats::start_with_config(&config))
                .await
                .expect("join")
                .expect("start cluster node"),
        );
    }
    nodes
}

/// A comma-separated URL list as server addresses.
pub fn server_addrs(urls: &str) -> Vec<async_nats::ServerAddr> {
    urls.split(',')
        .map(|u| u.trim().parse().expect("a NATS URL"))
        .collect()
}

/// One transaction's worth of sample events: $1 names the writer, $2 is the row count.
pub const INSERT_EVENTS: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
     SELECT 'order', $1 || '-' || g, 'created',
            jsonb_build_object('writer', $1::text, 'n', g),
            jsonb_build_object('writer', $1::text)
       FROM generate_series(1, $2::int) g";

/// Inserts `count` events in transactions of `per_txn` rows, as one writer.
pub async fn write_events(
    client: &tokio_postgres::Client,
    writer: &str,
    count: usize,
    per_txn: usize,
) {
    let mut written = 0;
    while written < count {
        let n = per_txn.min(count - written) as i32;
        client
            .execute(INSERT_EVENTS, &[&writer, &n])
            .await
            .expect("insert events");
        written += n as usize;
    }
}

/// The `test_decoding` view of committed outbox inserts.
pub struct Oracle {
    slot: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedRow {
    pub id: String,
    /// End LSN of the row's transaction (test_decoding reports it on COMMIT).
    pub commit_end: u64,
}

impl Oracle {
    /// Every committed outbox insert so far, in commit order.
    pub async fn rows(&self, env: &TestEnv) -> Vec<CommittedRow> {
        self.committed(env, |data| {
            data.contains(".outbox: INSERT:").then(|| {
                data.split_once("id[uuid]:'")
                    .and_then(|(_, rest)| rest.split_once('\''))
                    .map(|(id, _)| id.to_owned())
                    .expect("an id in the oracle row")
            })
        })
        .await
    }

    /// Every committed outbox insert and transactional logical decoding message with
    /// `prefix`, in commit order, with their ids as outbox-cdc qualifies them when it streams
    /// both: `public.outbox:<id>` and `message.<prefix>:<the message's "id" member>`.
    pub async fn rows_and_messages(&self, env: &TestEnv, prefix: &str) -> Vec<CommittedRow> {
        let message = format!("message: transactional: 1 prefix: {prefix}, sz: ");
        self.committed(env, |data| {
            if data.contains(".outbox: INSERT:") {
                let (_, rest) = data.split_once("id[uuid]:'").expect("an id");
                let (id, _) = rest.split_once('\'').expect("an id");
                return Some(format!("public.outbox:{id}"));
            }
            let content = data
                .strip_prefix(message.as_str())?
                .split_once("content:")?
                .1;
            let object: serde_json::Value = serde_json::from_str(content).ok()?;
            let id = object.get("id")?.as_str()?;
            Some(format!("message.{prefix}:{id}"))
        })
        .await
    }

    /// The events `event_id` finds in the slot's committed transactions (each `test_decoding`
    /// line), in commit order.
    pub async fn committed(
        &self,
        env: &TestEnv,
        event_id: impl Fn(&str) -> Option<String>,
    ) -> Vec<CommittedRow> {
        let rows = env
            .sql()
            .await
            .query(
                "SELECT (lsn - '0/0')::bigint, data FROM pg_logical_slot_peek_changes($1, NULL, NULL)",
                &[&self.slot],
            )
            .await
            .expect("read oracle slot");
        let mut committed = Vec::new();
        let mut open: Vec<String> = Vec::new();
        for row in rows {
            let lsn: i64 = row.get(0);
            let data: String = row.get(1);
            if data.starts_with("BEGIN") {
                open.clear();
            } else if data.starts_with("COMMIT") {
                committed.extend(open.drain(..).map(|id| CommittedRow {
                    id,
                    commit_end: lsn as u64,
                }));
            } else if let Some(id) = event_id(&data) {
                open.push(id);
            }
        }
        committed
    }
}

/// The `outbox-cdc run` process, its log captured to a file.
pub struct Publisher {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Publisher {
    pub fn start(args: &[String]) -> Publisher {
        Self::start_with_env(args, &[])
    }

    /// As [`Publisher::start`], with these environment variables set too.
    pub fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Publisher {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("publisher.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,outbox_cdc=debug")
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start outbox-cdc");
        Publisher {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The address of the /healthz, /readyz and /metrics endpoint, from the start-up log.
    pub async fn http_addr(&self) -> String {
        self.wait_for_log("serving /healthz", Duration::from_secs(30))
            .await;
        let log = self.log();
        log.split_once("on http://")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(|addr| {
                addr.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .to_owned()
            })
            .unwrap_or_else(|| panic!("no HTTP address in the log:\n{log}"))
    }

    /// Waits until the log contains `needle`; panics with the log otherwise.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "publisher log never contained {needle:?}; log:\n{}",
            self.log()
        );
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("publisher is running");
        loop {
            if let Some(status) = child.try_wait().expect("wait for publisher") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "publisher did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// User + system CPU time used so far, in seconds, while the process runs.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak resident memory (VmHWM) in KiB, while the process runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// `name` from the environment, parsed, or `default` when it is unset (a size or rate of a
/// benchmark, say); a value that does not parse is a mistake worth stopping for.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (from /proc/stat).
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = ticks.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// User + system CPU time process `pid` has used so far, in seconds (None once it has ended).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until the stream holds `count` messages; panics (showing `context`) after `timeout`.
pub async fn wait_for_messages(
    js: &jetstream::Context,
    stream: &str,
    count: u64,
    timeout: Duration,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    while Instant::now() < deadline {
        if let Ok(mut s) = js.get_stream(stream).await
            && let Ok(info) = s.info().await
        {
            last = info.state.messages;
            if last >= count {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "stream {stream} holds {last} of {count} messages after {timeout:?}\n{}",
        context()
    );
}

pub async fn stream_message_count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// One stored message, as a subscriber sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub id: String,
    pub headers: Vec<(String, String)>,
    pub payload: bytes::Bytes,
}

/// The first value of header `name` of a stored message.
pub fn header<'a>(message: &'a Received, name: &str) -> Option<&'a str> {
    message
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The stream's message count as its leader reports it. In a cluster, while the stream has no
/// leader, its followers answer with what they have applied, which can lag what was acked: such
/// answers are waited out.
pub async fn leader_message_count(js: &jetstream::Context, stream: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = js.get_stream(stream).await {
            let info = s.cached_info();
            let led = info
                .cluster
                .as_ref()
                .is_none_or(|c| c.leader.as_deref().is_some_and(|l| !l.is_empty()));
            if led {
                return info.state.messages;
            }
        }
        assert!(
            Instant::now() < deadline,
            "stream {stream} has no leader after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every message of the stream in stream order: at least as many as its leader counts,
/// and on until the consumer has none pending.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Received> {
    let total = leader_message_count(js, stream).await as usize;
    let mut out = Vec::with_capacity(total);
    let mut next_sequence = 1;
    let mut pending = 0;
    // A consumer the cluster placed on a replica still catching up after a restart can stall
    // (seen on a three-node cluster): read on from where it stopped with a new one.
    let deadline = Instant::now() + Duration::from_secs(180);
    'consumers: while out.len() < total || pending > 0 {
        let mut messages = ordered_consumer_from(js, stream, next_sequence, deadline).await;
        while out.len() < total || pending > 0 {
            let read = match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
                Ok(Some(Ok(message))) => Ok(message),
                Err(_) => Err("nothing for 30 s".to_owned()),
                Ok(None) => Err("its messages ended".to_owned()),
                Ok(Some(Err(e))) => Err(e.to_string()),
            };
            let message = match read {
                Ok(message) => message,
                Err(why) => {
                    assert!(
                        Instant::now() < deadline,
                        "reading stream {stream} timed out at sequence {next_sequence} \
                         ({} of at least {total} read): {why}",
                        out.len()
                    );
                    eprintln!(
                        "reading stream {stream}: the consumer stalled at sequence \
                         {next_sequence} ({why}); reading on with a new one"
                    );
                    continue 'consumers;
                }
            };
            let info = message.info().expect("a JetStream message");
            pending = info.pending;
            next_sequence = info.stream_sequence + 1;
            let headers: Vec<(String, String)> = message
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let id = headers
                .iter()
                .find(|(k, _)| k == "Nats-Msg-Id")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            out.push(Received {
                subject: message.subject.to_string(),
                id,
                headers,
                payload: message.payload.clone(),
            });
        }
    }
    out
}

/// An ordered consumer's messages from stream sequence `start` on. Retried until `deadline`: a
/// cluster that just lost or regained a node may take a moment to answer.
async fn ordered_consumer_from(
    js: &jetstream::Context,
    stream: &str,
    start: u64,
    deadline: Instant,
) -> consumer::pull::Ordered {
    loop {
        let attempt = async {
            js.get_stream(stream)
                .await
                .ok()?
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ..Default::default()
                })
                .await
                .ok()?
                .messages()
                .await
                .ok()
        };
        match attempt.await {
            Some(messages) => return messages,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            None => panic!("cannot create an ordered consumer on {stream}"),
        }
    }
}

/// Asserts the stream is exactly the oracle's rows, once each, in commit order.
pub fn assert_exactly_once_in_order(stream: &[Received], oracle: &[CommittedRow]) {
    let ids: Vec<&str> = stream.iter().map(|m| m.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "the stream holds duplicates");
    let expected: Vec<&str> = oracle.iter().map(|r| r.id.as_str()).collect();
    let missing = expected.iter().filter(|id| !unique.contains(*id)).count();
    assert_eq!(
        missing, 0,
        "{missing} committed events are missing from the stream"
    );
    assert_eq!(
        ids.len(),
        expected.len(),
        "the stream holds events the oracle does not"
    );
    if let Some(i) = ids.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "stream order differs from commit order at position {i}: stream has {}, commit order has {}",
            ids[i], expected[i]
        );
    }
}

/// Counts committed rows whose transaction ended at or before `lsn`.
pub fn rows_committed_through(oracle: &[CommittedRow], lsn: u64) -> usize {
    oracle.iter().take_while(|r| r.commit_end <= lsn).count()
}

pub fn exit_code(status: ExitStatus) -> Option<i32> {
    status.code()
}

/// Runs `outbox-cdc <args>` to completion (blocking the calling thread), with the environment's
/// URL variables removed so only the arguments count.
pub fn run_command(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-cdc"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("OUTBOX_CDC_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox-cdc")
}

/// stdout and stderr of a finished command, for assertions and failure messages.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A plain HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample (`name` including labels, e.g. `x_total{kind="a"}`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` of a running publisher.
pub async fn metrics_of(publisher: &Publisher) -> String {
    let addr = publisher.http_addr().await;
    let (status, text) = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .expect("join");
    assert_eq!(status, 200, "{text}");
    text
}

/// Polls `/metrics` until sample `name` equals `want`; returns the text.
pub async fn wait_for_metric(publisher: &Publisher, name: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics_of(publisher).await;
        if metric(&text, name) == Some(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {:?}, not {want}; metrics:\n{text}\nlog:\n{}",
            metric(&text, name),
            publisher.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Python interpreter with `requirements` (a pip requirements file) installed:
/// `OUTBOX_CDC_PYTHON` when set (it must have every test's requirements), else a virtualenv
/// made once under the target directory (from PyPI) and reused while the file is unchanged.
pub fn python_venv(requirements: &Path, name: &str) -> PathBuf {
    if let Ok(python) = std::env::var("OUTBOX_CDC_PYTHON") {
        return python.into();
    }
    let run_ok = |command: &mut Command| {
        let output = command.output().expect("run a command");
        assert!(
            output.status.success(),
            "{command:?}: {}",
            output_text(&output)
        );
    };
    let wanted = std::fs::read_to_string(requirements).expect("read requirements");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let python = venv.join("bin/python");
    let installed = |dir: &Path| std::fs::read_to_string(dir.join("requirements.txt")).ok();
    if python.exists() && installed(&venv).as_deref() == Some(wanted.as_str()) {
        return python;
    }
    // Built aside and renamed into place: tests run side by side in several processes.
    let fresh = venv.with_extension(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&fresh);
    run_ok(Command::new("python3").args(["-m", "venv"]).arg(&fresh));
    run_ok(
        Command::new(fresh.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(requirements),
    );
    std::fs::write(fresh.join("requirements.txt"), &wanted).expect("stamp");
    if installed(&venv).as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
    }
    if std::fs::rename(&fresh, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&fresh); // another test was first
    }
    python
}
