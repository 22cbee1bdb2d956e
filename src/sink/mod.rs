//! The NATS JetStream sink: publishes with headers and hands back the ack future, so the
//! pipeline can keep many publishes in flight and consume their acks in order.
//!
//! One connection is one *session*: the client is built never to reconnect on its own. If the
//! connection drops, publishes queued behind the lost ones would otherwise go out on the new
//! connection and land in the stream before the lost ones are re-sent — out of commit order.
//! Instead the sink reports the disconnect, the pipeline ends the session, and the next session
//! re-sends from the slot's confirmed position on a fresh connection (JetStream drops what it
//! already has by `Nats-Msg-Id`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Event, Subject};
use tokio::sync::watch;

use crate::lsn::Lsn;
use crate::mapping::OutboxEvent;
use crate::secret::Secret;

mod acks;
mod fence;

pub use acks::{Ack, AckError, AckOutcome};
pub use fence::Fence;

/// Duplicate windows shorter than this warn at start: a restart or failover slower than the window
/// would re-publish events JetStream no longer recognises.
pub const MIN_SAFE_DUPLICATE_WINDOW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Comma-separated server URLs; credentials in a URL are secret.
    pub urls: Secret,
    pub auth: NatsAuth,
    /// A stream to create when missing, capturing `capture_subjects`.
    pub stream: Option<String>,
    pub capture_subjects: Vec<String>,
    pub duplicate_window: Duration,
    pub ack_timeout: Duration,
    pub max_in_flight: usize,
    /// Name each publish's predecessor in its stream (`Nats-Expected-Last-Msg-Id`); see
    /// [`fence`].
    pub fencing: bool,
}

/// How to authenticate to NATS and verify it, besides credentials in the URL
/// (`nats://user:password@host`, `nats://token@host`).
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A `.creds` file (user JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// CA certificate(s) to verify the server with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl NatsAuth {
    /// Connect options for `urls`, and the server addresses with their credentials taken out
    /// (async-nats ignores credentials inside a URL, so they become options here).
    pub async fn connect_options(
        &self,
        urls: &Secret,
    ) -> Result<(async_nats::ConnectOptions, Vec<async_nats::ServerAddr>), SinkError> {
        let invalid = |detail: String| SinkError::Connect {
            target: redact_nats_url(urls.expose()),
            detail,
            transient: false,
        };
        let mut options = async_nats::ConnectOptions::new();
        let mut addresses = Vec::new();
        let mut url_credentials: Option<(String, Option<String>)> = None;
        for text in urls
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let with_scheme = if text.contains("://") {
                text.to_owned()
            } else {
                format!("nats://{text}")
            };
            let mut url = url::Url::parse(&with_scheme)
                .map_err(|e| invalid(format!("`{}` is not a URL: {e}", redact_nats_url(text))))?;
            if !url.username().is_empty() {
                let decode = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8_lossy()
                        .into_owned()
                };
                let found = (decode(url.username()), url.password().map(decode));
                if url_credentials.as_ref().is_some_and(|c| *c != found) {
                    return Err(invalid(
                        "the URLs carry different credentials; give every server the same".into(),
                    ));
                }
                url_credentials = Some(found);
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            let address = url
                .as_str()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid(format!("`{}`: {e}", redact_nats_url(text))))?;
            addresses.push(address);
        }
        if addresses.is_empty() {
            return Err(invalid("no server URL given".into()));
        }
        match url_credentials {
            Some((user, Some(password))) => options = options.user_and_password(user, password),
            Some((token, None)) => options = options.token(token),
            None => {}
        }
        if let Some(path) = &self.creds_file {
            options = options.credentials_file(path).await.map_err(|e| {
                invalid(format!(
                    "reading the credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        if let Some(path) = &self.nkey_file {
            let seed = std::fs::read_to_string(path).map_err(|e| {
                invalid(format!(
                    "reading the NKey seed file {}: {e}",
                    path.display()
                ))
            })?;
            let seed = seed.trim();
            if !seed.starts_with('S') {
                return Err(invalid(format!(
                    "{} does not hold an NKey seed (it starts with `S`, e.g. SUAM…)",
                    path.display()
                )));
            }
            options = options.nkey(seed.to_owned());
        }
        if let Some(path) = &self.tls_ca {
            require_file(path, "--nats-tls-ca").map_err(invalid)?;
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                require_file(cert, "--nats-tls-cert").map_err(invalid)?;
                require_file(key, "--nats-tls-key").map_err(invalid)?;
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "--nats-tls-cert and --nats-tls-key go together".into(),
                ));
            }
        }
        Ok((options, addresses))
    }
}

fn require_file(path: &Path, flag: &str) -> Result<(), String> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| format!("{flag} {}: {e}", path.display()))
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to NATS at {target}: {detail}")]
    Connect {
        target: String,
        detail: String,
        transient: bool,
    },
    #[error("the NATS connection was lost")]
    Disconnected,
    #[error("JetStream stream setup: {0}")]
    Stream(String),
    /// JetStream did not answer a stream request in time, or answered that it is unavailable
    /// (a cluster electing a leader, a server starting): retried.
    #[error("JetStream is not answering stream requests yet: {0}")]
    StreamUnavailable(String),
    #[error("checkpoint in KV bucket `{bucket}`: {detail}")]
    Checkpoint { bucket: String, detail: String },
    #[error(
        "no JetStream stream captures subject `{subject}` (event id `{event_id}`, commit LSN {commit_lsn}); \
         create a stream for it (e.g. `nats stream add OUTBOX --subjects '{subject}'`) or start with --stream NAME"
    )]
    NoStream {
        subject: String,
        event_id: String,
        commit_lsn: String,
    },
    #[error(
        "event `{event_id}` (subject `{subject}`, commit LSN {commit_lsn}): its {size}-byte payload plus headers is over \
         the NATS server's max_payload of {max} bytes; raise max_payload on the server or make the event smaller"
    )]
    TooLarge {
        event_id: String,
        subject: String,
        commit_lsn: String,
        size: usize,
        max: usize,
    },
    #[error(
        "JetStream rejected event `{event_id}` (subject `{subject}`, commit LSN {commit_lsn}): {detail}; \
         fix the row (or the stream's limits) and restart, or run with --on-error dead-letter"
    )]
    Rejected {
        event_id: String,
        subject: String,
        commit_lsn: String,
        detail: String,
    },
    /// The stream's last message was not the publish before this one: that one was lost, or
    /// another publisher wrote into the stream. Transient: the session restarts from the slot.
    #[error(
        "JetStream refused event `{event_id}` (subject `{subject}`, commit LSN {commit_lsn}) because the message \
         before it in the stream is not the one outbox-cdc published before it ({detail}): a publish was lost on \
         the way (e.g. in a stream leader change) or another publisher wrote into the stream; re-sending from the \
         slot, in order. If other publishers share this stream, run with --no-fencing"
    )]
    Fenced {
        event_id: String,
        subject: String,
        commit_lsn: String,
        detail: String,
    },
    #[error(
        "publishing event `{event_id}` (subject `{subject}`, commit LSN {commit_lsn}) failed: {detail}"
    )]
    Publish {
        event_id: String,
        subject: String,
        commit_lsn: String,
        detail: String,
        transient: bool,
    },
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Connect { transient, .. } | SinkError::Publish { transient, .. } => {
                *transient
            }
            SinkError::Disconnected
            | SinkError::Checkpoint { .. }
            | SinkError::StreamUnavailable(_)
            | SinkError::Fenced { .. } => true,
            SinkError::Stream(_)
            | SinkError::NoStream { .. }
            | SinkError::TooLarge { .. }
            | SinkError::Rejected { .. } => false,
        }
    }

    /// The `kind` label of the publish-errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Connect { .. } => "connect",
            SinkError::Disconnected => "disconnected",
            SinkError::Stream(_) | SinkError::StreamUnavailable(_) => "stream_setup",
            SinkError::Checkpoint { .. } => "checkpoint",
            SinkError::NoStream { .. } => "no_stream",
            SinkError::TooLarge { .. } => "too_large",
            SinkError::Rejected { .. } => "rejected",
            SinkError::Fenced { .. } => "fenced",
            SinkError::Publish { .. } => "publish",
        }
    }
}

/// The newest published position, kept in a NATS KV bucket under the slot's name, so that a
/// restart with a replay window resumes after what was published instead of replaying the window.
pub struct Checkpoint {
    store: jetstream::kv::Store,
    bucket: String,
    key: String,
    saved: Lsn,
}

impl Checkpoint {
    /// Opens (creating if missing) the bucket; returns it with the saved position, if any.
    pub async fn open(
        context: &jetstream::Context,
        bucket: &str,
        key: &str,
    ) -> Result<(Checkpoint, Option<Lsn>), SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let store = match context.get_key_value(bucket).await {
            Ok(store) => store,
            Err(_) => {
                // The bucket's backing stream is created directly: async-nats's
                // `create_key_value` first reads the account info, whose shape on servers
                // before 2.10 it fails to parse. This is the stream it would create.
                context
                    .get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        description: Some(
                            "outbox-cdc: newest published LSN per replication slot".into(),
                        ),
                        max_messages_per_subject: 1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        storage: stream::StorageType::File,
                        duplicate_window: Duration::from_secs(120),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| fail(format!("creating the bucket: {e}")))?;
                context
                    .get_key_value(bucket)
                    .await
                    .map_err(|e| fail(format!("opening the bucket: {e}")))?
            }
        };
        let saved =
            match store.get(key).await {
                Ok(Some(value)) => {
                    let text = String::from_utf8_lossy(&value);
                    Some(text.parse::<Lsn>().map_err(|e| {
                        fail(format!("key `{key}` holds `{text}`, not an LSN: {e}"))
                    })?)
                }
                Ok(None) => None,
                Err(e) => return Err(fail(format!("reading key `{key}`: {e}"))),
            };
        let checkpoint = Checkpoint {
            store,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            saved: saved.unwrap_or(Lsn::ZERO),
        };
        Ok((checkpoint, saved))
    }

    /// Reads the saved position without creating anything (for `status`): None when the bucket
    /// or the key does not exist.
    pub async fn read(
        urls: &Secret,
        auth: &NatsAuth,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Lsn>, SinkError> {
        let fail = |detail: String| SinkError::Checkpoint {
            bucket: bucket.to_owned(),
            detail,
        };
        let (options, addresses) = auth.connect_options(urls).await?;
        let client = options
            .connection_timeout(Duration::from_secs(5))
            .connect(addresses)
            .await
            .map_err(|e| SinkError::Connect {
                target: redact_nats_url(urls.expose()),
                detail: e.to_string(),
                transient: true,
            })?;
        let context = jetstream::new(client);
        let store = match context.get_key_value(bucket).await {
            Ok(store) => store,
            Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                return Ok(None);
            }
            Err(e) => return Err(fail(format!("opening the bucket: {e}"))),
        };
        match store.get(key).await {
            Ok(Some(value)) => {
                let text = String::from_utf8_lossy(&value);
                text.parse::<Lsn>()
                    .map(Some)
                    .map_err(|e| fail(format!("key `{key}` holds `{text}`, not an LSN: {e}")))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(fail(format!("reading key `{key}`: {e}"))),
        }
    }

    /// Saves `lsn` when it is newer than what was saved.
    pub async fn save(&mut self, lsn: Lsn) -> Result<(), SinkError> {
        if lsn <= self.saved {
            return Ok(());
        }
        self.store
            .put(&self.key, lsn.to_string().into())
            .await
            .map_err(|e| SinkError::Checkpoint {
                bucket: self.bucket.clone(),
                detail: format!("writing key `{}`: {e}", self.key),
            })?;
        self.saved = lsn;
        Ok(())
    }
}

/// Reading a stream failed: transient when the request went unanswered or JetStream said it is
/// unavailable (5xx), permanent otherwise (e.g. an invalid name, no permission).
fn get_stream_error(name: &str, err: jetstream::context::GetStreamError) -> SinkError {
    let detail = format!("reading stream `{name}`: {err}");
    match err.kind() {
        jetstream::context::GetStreamErrorKind::Request => SinkError::StreamUnavailable(detail),
        jetstream::context::GetStreamErrorKind::JetStream(e) if e.code() >= 500 => {
            SinkError::StreamUnavailable(detail)
        }
        _ => SinkError::Stream(detail),
    }
}

/// NATS URLs with credentials hidden: `user:password@` becomes `user:***@`, and a token
/// (`token@`) becomes `***@`. Works on comma-separated lists.
pub fn redact_nats_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let redacted = match rest.rsplit_once('@') {
                Some((credentials, host)) => match credentials.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                redacted
            } else {
                format!("{scheme}://{redacted}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// See [`JetStreamSink::connection_lost`].
pub struct ConnectionLost(watch::Receiver<bool>);

impl ConnectionLost {
    /// Resolves when the connection has dropped (and never otherwise).
    pub async fn wait(&mut self) {
        if self.0.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a publish went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Fenced within its stream, or fencing is off: the next publish may follow at once.
    Pipelined,
    /// Fencing is on, but no stream of the account is known to capture the subject, so nothing
    /// after it can be fenced on it: if no stream takes it, a publish sent after it could be
    /// stored before its dead letter. Nothing may follow it before its ack.
    AwaitAck,
}

/// Identifies a publish in error messages.
#[derive(Debug, Clone)]
pub struct PublishLabel {
    pub subject: Subject,
    pub event_id: String,
    pub commit_lsn: crate::lsn::Lsn,
    pub commit_time: std::time::SystemTime,
    /// Set on a dead letter (with why its row became one), not an event: a dead letter that
    /// cannot be published has nothing left to fall back to.
    pub dead_letter: Option<crate::dead_letter::PoisonKind>,
}

impl PublishLabel {
    /// The label of `event`, a row of the transaction committed at `commit_lsn`.
    pub fn new(
        event: &OutboxEvent,
        commit_lsn: crate::lsn::Lsn,
        commit_time: std::time::SystemTime,
    ) -> Self {
        PublishLabel {
            subject: Subject::from(event.subject.as_str()),
            event_id: event.id.as_str().to_owned(),
            commit_lsn,
            commit_time,
            dead_letter: None,
        }
    }
}

pub struct JetStreamSink {
    client: async_nats::Client,
    /// For stream management, the checkpoint and dead letters; events go out through `acks`.
    context: jetstream::Context,
    acks: acks::Acks,
    fence: Fence,
    /// A publish went out with fencing on but no stream known for its subject (warned once).
    warned_unfenced: bool,
    ack_timeout: Duration,
    disconnected: watch::Receiver<bool>,
}

impl JetStreamSink {
    /// The server's largest accepted message.
    pub fn max_payload(&self) -> usize {
        self.context.client().server_info().max_payload
    }

    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// Connects; one attempt (the caller retries with backoff).
    pub async fn connect(config: &SinkConfig) -> Result<Self, SinkError> {
        let target = redact_nats_url(config.urls.expose());
        let (disconnected_tx, disconnected) = watch::channel(false);
        let connected_once = Arc::new(AtomicBool::new(false));
        let connected_flag = connected_once.clone();
        let (options, addresses) = config.auth.connect_options(&config.urls).await?;
        let options = options
            .name("outbox-cdc")
            .connection_timeout(Duration::from_secs(5))
            // Every in-flight publish's ack waits in the ack subscription's buffer; a full buffer
            // would drop acks (and time the session out).
            .subscription_capacity((config.max_in_flight + 1024).max(64 * 1024))
            .event_callback(move |event| {
                let disconnected_tx = disconnected_tx.clone();
                let connected_flag = connected_flag.clone();
                async move {
                    match event {
                        Event::Connected => connected_flag.store(true, Ordering::SeqCst),
                        Event::Disconnected | Event::Closed => {
                            let _ = disconnected_tx.send(true);
                        }
                        _ => {}
                    }
                }
            })
            // See the module doc: after the first connection, never reconnect inside a session.
            .reconnect_delay_callback(move |_attempt| {
                if connected_once.load(Ordering::SeqCst) {
                    Duration::from_secs(365 * 24 * 3600)
                } else {
                    Duration::ZERO
                }
            });
        let client = options.connect(addresses).await.map_err(|err| {
            let rejected = crate::tls::certificate_rejected(&err);
            let mut detail = err.to_string();
            if rejected && detail.contains("alert") {
                detail.push_str(
                    " (the server refused this client's certificate, or its absence: check \
                         --nats-tls-cert and --nats-tls-key)",
                );
            }
            SinkError::Connect {
                target,
                transient: !rejected
                    && !matches!(
                        err.kind(),
                        async_nats::ConnectErrorKind::Authentication
                            | async_nats::ConnectErrorKind::AuthorizationViolation
                            | async_nats::ConnectErrorKind::ServerParse
                            // A certificate that does not verify, or TLS required on one side only.
                            | async_nats::ConnectErrorKind::Tls
                    ),
                detail,
            }
        })?;
        let acks = acks::Acks::subscribe(&client, config.ack_timeout)
            .await
            .map_err(|e| SinkError::Connect {
                target: redact_nats_url(config.urls.expose()),
                detail: format!("subscribing to JetStream acks: {e}"),
                transient: true,
            })?;
        let context = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .build(client.clone());
        Ok(JetStreamSink {
            client,
            context,
            acks,
            fence: Fence::off(),
            warned_unfenced: false,
            ack_timeout: config.ack_timeout,
            disconnected,
        })
    }

    /// Creates the configured stream if missing, checks the duplicate window of the streams
    /// that will receive our subjects, and (with fencing) learns every stream's subjects.
    pub async fn prepare(&mut self, config: &SinkConfig) -> Result<(), SinkError> {
        if let Some(name) = &config.stream {
            match self.context.get_stream(name).await {
                Ok(_) => {}
                Err(err)
                    if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    self.context
                        .create_stream(stream::Config {
                            name: name.clone(),
                            subjects: config.capture_subjects.clone(),
                            duplicate_window: config.duplicate_window,
                            storage: stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| {
                            let detail = format!("creating stream `{name}`: {e}");
                            match e.kind() {
                                jetstream::context::CreateStreamErrorKind::TimedOut
                                | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
                                    SinkError::StreamUnavailable(detail)
                                }
                                jetstream::context::CreateStreamErrorKind::JetStream(e)
                                    if e.code() >= 500 =>
                                {
                                    SinkError::StreamUnavailable(detail)
                                }
                                _ => SinkError::Stream(detail),
                            }
                        })?;
                    tracing::info!(stream = %name, subjects = ?config.capture_subjects,
                        duplicate_window = ?config.duplicate_window, "created JetStream stream");
                }
                Err(err) => return Err(get_stream_error(name, err)),
            }
        }
        let mut names = Vec::new();
        if let Some(name) = &config.stream {
            names.push(name.clone());
        }
        for subject in &config.capture_subjects {
            if let Ok(name) = self.context.stream_by_subject(subject.clone()).await
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
        if names.is_empty() && !config.capture_subjects.is_empty() {
            tracing::warn!(subjects = ?config.capture_subjects,
                "no JetStream stream captures the outbox subjects yet; publishing will fail until one does");
        }
        for name in names {
            let mut stream = self
                .context
                .get_stream(&name)
                .await
                .map_err(|e| get_stream_error(&name, e))?;
            // A failed info request is a timeout or no responders: the server's state, not ours.
            let info = stream.info().await.map_err(|e| {
                SinkError::StreamUnavailable(format!("reading stream `{name}`: {e}"))
            })?;
            let window = info.config.duplicate_window;
            if window < MIN_SAFE_DUPLICATE_WINDOW {
                tracing::warn!(stream = %name, duplicate_window = ?window,
                    recommended = ?MIN_SAFE_DUPLICATE_WINDOW,
                    "the stream's duplicate window is short: events re-sent after a restart or failover \
                     that takes longer than this are stored twice; raise it (e.g. `nats stream edit {name} --dupe-window 10m`)");
            } else {
                tracing::info!(stream = %name, duplicate_window = ?window, "JetStream stream ready");
            }
        }
        if config.fencing {
            self.fence = self.read_fence().await?;
        }
        Ok(())
    }

    /// Every stream of the account with its subjects: publishes are fenced within the stream
    /// that captures them (subjects never overlap between streams). Streams created later are
    /// learnt by the next session; until then their subjects go out unfenced.
    async fn read_fence(&self) -> Result<Fence, SinkError> {
        use futures::TryStreamExt;
        let streams: Vec<(String, Vec<String>)> = self
            .context
            .streams()
            .map_ok(|info| (info.config.name, info.config.subjects))
            .try_collect()
            .await
            .map_err(|e| {
                SinkError::StreamUnavailable(format!(
                    "listing the streams to fence publishes (`$JS.API.STREAM.LIST`; without that \
                     permission, run with --no-fencing): {e}"
                ))
            })?;
        let fence = Fence::new(streams);
        tracing::debug!(streams = ?fence.stream_names().collect::<Vec<_>>(),
            "fencing publishes with Nats-Expected-Last-Msg-Id");
        Ok(fence)
    }

    /// Sends one event; its ack comes back, in publish order, from [`JetStreamSink::next_ack`].
    /// With `fenced`, and fencing on, it names the previous publish into its stream as the
    /// message the stream must hold last.
    pub async fn publish(
        &mut self,
        event: OutboxEvent,
        label: &PublishLabel,
        fenced: bool,
    ) -> Result<Sent, SinkError> {
        let OutboxEvent {
            mut headers,
            payload,
            id,
            ..
        } = event;
        let size = payload.len();
        let stream = self.fence.stream_of(label.subject.as_str());
        if fenced && let Some(previous) = stream.and_then(|s| self.fence.expected_last(s)) {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                previous.clone(),
            );
        }
        let send = self.client.publish_with_reply_and_headers(
            label.subject.clone(),
            self.acks.reply_subject(),
            headers,
            payload,
        );
        // A server that stops reading (frozen, or a black-holed network) fills the client's
        // buffers, and the send waits; the ack timeout bounds that wait too. The timer is only
        // armed when the send does not complete at once.
        tokio::time::timeout(self.ack_timeout, send)
            .await
            .map_err(|_elapsed| {
                self.publish_error(
                    label,
                    "the NATS connection took no data within the ack timeout".into(),
                    true,
                )
            })?
            .map_err(|err| match err.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => SinkError::TooLarge {
                    event_id: label.event_id.clone(),
                    subject: label.subject.to_string(),
                    commit_lsn: label.commit_lsn.to_string(),
                    size,
                    max: self.max_payload(),
                },
                _ => self.publish_error(label, err.to_string(), true),
            })?;
        // Only what went out is a predecessor: a message refused before sending (too large) is
        // not one, and the next publish still expects the one before it.
        self.acks.sent();
        match stream {
            Some(stream) => self.fence.sent(stream, id),
            None if self.fence.is_on() => {
                if !self.warned_unfenced {
                    self.warned_unfenced = true;
                    tracing::warn!(subject = %label.subject,
                        "no stream of this NATS account is known to capture this subject: its publishes \
                         wait for their ack before the next goes out (slow). A stream created since the \
                         session started is learnt by the next one; if a stream of another account \
                         captures these subjects, run with --no-fencing");
                }
                return Ok(Sent::AwaitAck);
            }
            None => {}
        }
        Ok(Sent::Pipelined)
    }

    /// The ack of the oldest publish still in flight; pending forever when there is none.
    /// Cancel-safe.
    pub async fn next_ack(&mut self) -> AckOutcome {
        self.acks.next().await
    }

    /// Publishes sent whose ack [`JetStreamSink::next_ack`] has not handed out yet.
    pub fn in_flight(&self) -> usize {
        self.acks.pending()
    }

    /// Turns a failed ack into an error that says what to do.
    pub async fn ack_error(&self, label: &PublishLabel, err: AckError) -> SinkError {
        match err {
            // A stream may be missing, or (in a cluster) briefly leaderless.
            AckError::NoResponders => {
                match self
                    .context
                    .stream_by_subject(label.subject.to_string())
                    .await
                {
                    Err(e)
                        if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound =>
                    {
                        SinkError::NoStream {
                            subject: label.subject.to_string(),
                            event_id: label.event_id.clone(),
                            commit_lsn: label.commit_lsn.to_string(),
                        }
                    }
                    _ => self.publish_error(label, err.to_string(), true),
                }
            }
            AckError::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID =>
            {
                SinkError::Fenced {
                    event_id: label.event_id.clone(),
                    subject: label.subject.to_string(),
                    commit_lsn: label.commit_lsn.to_string(),
                    detail: api.to_string(),
                }
            }
            // 400: JetStream refuses this message itself (e.g. headers over 64 KiB); sending it
            // again cannot help. Other codes (503 no leader, 500) are about the server's state.
            AckError::JetStream(api) if api.code() == 400 => SinkError::Rejected {
                event_id: label.event_id.clone(),
                subject: label.subject.to_string(),
                commit_lsn: label.commit_lsn.to_string(),
                detail: api.to_string(),
            },
            _ => self.publish_error(label, err.to_string(), true),
        }
    }

    fn publish_error(&self, label: &PublishLabel, detail: String, transient: bool) -> SinkError {
        SinkError::Publish {
            event_id: label.event_id.clone(),
            subject: label.subject.to_string(),
            commit_lsn: label.commit_lsn.to_string(),
            detail,
            transient,
        }
    }

    /// Resolves when this sink's connection has dropped; held apart from the sink so that it can
    /// be awaited beside [`JetStreamSink::next_ack`].
    pub fn connection_lost(&self) -> ConnectionLost {
        ConnectionLost(self.disconnected.clone())
    }

    /// Flushes what the client buffered, so that shutdown does not wait on unsent publishes.
    pub async fn flush(&self) {
        let _ = self.context.client().flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_nats_credentials() {
        assert_eq!(
            redact_nats_url("nats://alice:s3cret@h1:4222, tls://tok3n@h2:4222,h3:4222"),
            "nats://alice:***@h1:4222,tls://***@h2:4222,h3:4222"
        );
    }

    #[test]
    fn classifies_errors() {
        assert!(SinkError::Disconnected.is_transient());
        assert!(SinkError::StreamUnavailable("timed out".into()).is_transient());
        assert!(!SinkError::Stream("invalid config".into()).is_transient());
        assert!(
            !SinkError::NoStream {
                subject: "a".into(),
                event_id: "1".into(),
                commit_lsn: "0/1".into()
            }
            .is_transient()
        );
    }
}
