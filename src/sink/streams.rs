//! The streams events go to: the ones outbox-cdc creates ([`StreamSpec`], from `--stream`), the
//! duplicate windows of those that capture the outbox's subjects, and their ends, which fencing
//! reads.
//!
//! Only streams the outbox's subjects touch are read: their names (`$JS.API.STREAM.NAMES` with
//! a subject filter), then each one's info and last message. A NATS user allowed those streams
//! alone is enough (docs/permissions.md).

use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};

use super::error::{api_error, get_stream_error};
use super::fence::{Fence, StoredEvent, StreamEnd, StreamSummary};
use super::{JetStreamSink, MIN_SAFE_DUPLICATE_WINDOW, SinkConfig, SinkError};
use crate::event::header;

/// A stream outbox-cdc creates when it is missing: `--stream NAME` and the `--stream-*` flags.
/// [`SinkConfig::streams`] holds a list of them, each capturing its own subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    /// The subjects it captures.
    pub subjects: Vec<String>,
    /// Copies of each message in a JetStream cluster (1 on a single server).
    pub replicas: usize,
    pub limits: StreamLimits,
    /// JetStream drops a message whose `Nats-Msg-Id` it stored this recently: it should outlast
    /// the longest restart, so that what a restart re-sends is recognised.
    pub duplicate_window: Duration,
    /// It takes atomic batches (`--atomic-transactions`).
    pub allow_atomic: bool,
}

/// How much a stream keeps, and what it does when full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamLimits {
    /// Messages older than this are removed, whether consumers read them or not (None: kept).
    pub max_age: Option<Duration>,
    /// The most bytes the stream holds (None: no limit of its own).
    pub max_bytes: Option<u64>,
    /// What happens at `max_bytes`.
    pub discard: Discard,
}

/// What a full stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// It refuses new messages: outbox-cdc stops with [`SinkError::StreamFull`], and the events
    /// wait in the replication slot. Nothing is removed.
    #[default]
    New,
    /// It removes its oldest messages, whether consumers read them or not.
    Old,
}

impl StreamSpec {
    /// The JetStream configuration that creates it: file storage, limits retention.
    pub fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            duplicate_window: self.duplicate_window,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            max_age: self.limits.max_age.unwrap_or(Duration::ZERO),
            max_bytes: self
                .limits
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            discard: match self.limits.discard {
                Discard::New => stream::DiscardPolicy::New,
                Discard::Old => stream::DiscardPolicy::Old,
            },
            allow_atomic_publish: self.allow_atomic,
            ..Default::default()
        }
    }

    /// Where an existing stream of this name differs from the spec, each as `what: has, asked`.
    /// outbox-cdc does not edit a stream it did not create.
    pub fn differences(&self, existing: &stream::Config) -> Vec<String> {
        let wanted = self.config();
        let unlimited = |bytes: i64| bytes <= 0;
        let mut found = Vec::new();
        let mut differ = |what: &str, has: String, asked: String| {
            if has != asked {
                found.push(format!("{what} {has}, not {asked}"));
            }
        };
        differ(
            "replicas",
            existing.num_replicas.max(1).to_string(),
            wanted.num_replicas.to_string(),
        );
        let age = |d: Duration| match d {
            Duration::ZERO => "unlimited".to_owned(),
            d => humantime::format_duration(d).to_string(),
        };
        differ("max age", age(existing.max_age), age(wanted.max_age));
        let bytes = |b: i64| match unlimited(b) {
            true => "unlimited".to_owned(),
            false => b.to_string(),
        };
        differ(
            "max bytes",
            bytes(existing.max_bytes),
            bytes(wanted.max_bytes),
        );
        let discard = |d: stream::DiscardPolicy| format!("{d:?}").to_lowercase();
        differ(
            "discard",
            discard(existing.discard),
            discard(wanted.discard),
        );
        found
    }
}

impl<T> JetStreamSink<T> {
    /// Creates the configured streams that are missing, checks the duplicate windows of the
    /// streams that will receive our subjects, and (with fencing) reads those streams' ends. A
    /// subject the server refuses this user fails it at once, named.
    pub async fn prepare(&mut self, config: &SinkConfig) -> Result<(), SinkError> {
        let denials = self.denials.clone();
        denials.guard(self.prepare_streams(config)).await
    }

    async fn prepare_streams(&mut self, config: &SinkConfig) -> Result<(), SinkError> {
        if config.atomic && !self.client.is_server_compatible(2, 12, 0) {
            return Err(SinkError::AtomicUnsupported {
                version: self.client.server_info().version,
            });
        }
        for spec in &config.streams {
            self.ensure_stream(spec).await?;
        }
        let names = self
            .streams_capturing(config, &config.capture_subjects)
            .await?;
        if names.is_empty() && !config.capture_subjects.is_empty() {
            tracing::warn!(subjects = ?config.capture_subjects,
                "no JetStream stream captures the outbox subjects yet; publishing will fail until one does");
        }
        // Dead letters always go out one by one: only the events' streams take batches.
        let batched = if config.atomic {
            self.streams_capturing(config, &config.event_subjects)
                .await?
        } else {
            Vec::new()
        };
        // The checkpoint keeps as many copies as the outbox's streams, unless told otherwise.
        let mut replicas = 1;
        let mut infos = Vec::with_capacity(names.len());
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
            replicas = replicas.max(info.config.num_replicas);
            if batched.contains(&name) && !info.config.allow_atomic_publish {
                return Err(SinkError::AtomicDisabled { stream: name });
            }
            let window = info.config.duplicate_window;
            if window < MIN_SAFE_DUPLICATE_WINDOW {
                tracing::warn!(stream = %name, duplicate_window = ?window,
                    recommended = ?MIN_SAFE_DUPLICATE_WINDOW,
                    "the stream's duplicate window is short: events re-sent after a restart or failover \
                     that takes longer than this are stored twice; raise it (e.g. `nats stream edit {name} --dupe-window 10m`)");
            } else {
                tracing::info!(stream = %name, duplicate_window = ?window, "JetStream stream ready");
            }
            infos.push(info.clone());
        }
        self.replicas = config.checkpoint_replicas.unwrap_or(replicas);
        if config.fencing {
            if config.capture_subjects.is_empty() {
                // Subjects from a column: any stream of the account may capture them.
                infos.clear();
                for name in self.stream_names(None).await? {
                    let stream = self
                        .context
                        .get_stream(&name)
                        .await
                        .map_err(|e| get_stream_error(&name, e))?;
                    infos.push(stream.cached_info().clone());
                }
            }
            self.fence = self.read_fence(infos).await?;
        }
        Ok(())
    }

    /// Creates the stream `spec` describes if it does not exist; an existing one is left as it
    /// is, with a warning where it differs from the spec.
    async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), SinkError> {
        let name = &spec.name;
        match self.context.get_stream(name).await {
            Ok(stream) => {
                let differences = spec.differences(&stream.cached_info().config);
                if !differences.is_empty() {
                    tracing::warn!(stream = %name, differences = %differences.join("; "),
                        "stream `{name}` exists and differs from the --stream-* flags, which apply \
                         only when outbox-cdc creates it; it is left as it is (change it with \
                         `nats stream edit {name}`)");
                }
                Ok(())
            }
            Err(err)
                if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                self.context
                    .create_stream(spec.config())
                    .await
                    .map_err(|e| {
                        let detail = format!("creating stream `{name}`: {e}");
                        match e.kind() {
                            jetstream::context::CreateStreamErrorKind::TimedOut
                            | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
                                SinkError::StreamUnavailable(detail)
                            }
                            jetstream::context::CreateStreamErrorKind::JetStream(e) => {
                                api_error(detail, &e)
                            }
                            _ => SinkError::Stream(detail),
                        }
                    })?;
                tracing::info!(stream = %name, subjects = ?spec.subjects, replicas = spec.replicas,
                    max_age = ?spec.limits.max_age, max_bytes = ?spec.limits.max_bytes,
                    discard = ?spec.limits.discard, duplicate_window = ?spec.duplicate_window,
                    "created JetStream stream");
                Ok(())
            }
            Err(err) => Err(get_stream_error(name, err)),
        }
    }

    /// The configured streams and those that capture any of `subjects`, each once.
    async fn streams_capturing(
        &self,
        config: &SinkConfig,
        subjects: &[String],
    ) -> Result<Vec<String>, SinkError> {
        let mut names: Vec<String> = config.streams.iter().map(|s| s.name.clone()).collect();
        for subject in subjects {
            for name in self.stream_names(Some(subject)).await? {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        Ok(names)
    }

    /// The names of the streams whose subjects overlap `filter` (all without one):
    /// `$JS.API.STREAM.NAMES`, page by page.
    async fn stream_names(&self, filter: Option<&str>) -> Result<Vec<String>, SinkError> {
        #[derive(serde::Deserialize)]
        struct Page {
            total: usize,
            streams: Option<Vec<String>>,
        }
        let mut names = Vec::new();
        loop {
            let request = serde_json::json!({ "offset": names.len(), "subject": filter });
            let response: jetstream::response::Response<Page> = self
                .context
                .request("STREAM.NAMES", &request)
                .await
                .map_err(|e| {
                    SinkError::StreamUnavailable(format!(
                        "listing the streams that capture `{}`: {e}",
                        filter.unwrap_or(">")
                    ))
                })?;
            let page = match response {
                jetstream::response::Response::Ok(page) => page,
                jetstream::response::Response::Err { error } => {
                    let detail = format!(
                        "listing the streams that capture `{}`: {error}",
                        filter.unwrap_or(">")
                    );
                    return Err(api_error(detail, &error));
                }
            };
            let streams = page.streams.unwrap_or_default();
            let last_page = streams.is_empty();
            names.extend(streams);
            if last_page || names.len() >= page.total {
                return Ok(names);
            }
        }
    }

    /// The streams that capture the outbox's subjects, with their subjects and last messages
    /// (`infos`, read by [`JetStreamSink::prepare`]): publishes are fenced within the stream that
    /// captures them (subjects never overlap between streams), and what a stream holds already
    /// is not sent again. Streams created later are learnt by the next session; until then
    /// their subjects go out unfenced.
    async fn read_fence(&mut self, infos: Vec<stream::Info>) -> Result<Fence, SinkError> {
        let mut streams = Vec::with_capacity(infos.len());
        for info in infos {
            let name = info.config.name;
            let last = if info.state.messages == 0 || info.config.subjects.is_empty() {
                None
            } else {
                match self.last_message(&name, info.state.last_sequence).await? {
                    Some(headers) if headers.get(header::BACKFILL).is_some() => {
                        Some(self.behind_backfill(&name, &headers, &info.state).await?)
                    }
                    Some(headers) => Some(StoredEvent::from_headers(&headers)),
                    None => None,
                }
            };
            streams.push(StreamSummary {
                name,
                subjects: info.config.subjects,
                last,
                last_sequence: info.state.last_sequence,
                allow_atomic: info.config.allow_atomic_publish,
            });
        }
        let fence = Fence::new(streams);
        tracing::debug!(streams = ?fence.stream_names().collect::<Vec<_>>(), end = ?fence.end(),
            "fencing publishes with Nats-Expected-Last-Msg-Id");
        Ok(fence)
    }

    /// The headers of the message at `sequence`; None when it is gone (deleted, or removed by
    /// the stream's limits meanwhile).
    async fn last_message(
        &self,
        name: &str,
        sequence: u64,
    ) -> Result<Option<HeaderMap>, SinkError> {
        let stream = self
            .context
            .get_stream_no_info(name)
            .await
            .map_err(|e| get_stream_error(name, e))?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(message.headers)),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(SinkError::StreamUnavailable(format!(
                "reading the last message of stream `{name}`: {e}"
            ))),
        }
    }

    /// A stream whose last message is a backfilled one (`last`): that message has no WAL
    /// position, so the stream's resume point is the newest message before it that has one.
    /// Fencing makes the stream a chain, so everything before that message is stored too.
    /// The predecessor the next publish names stays the stream's last message. Searched
    /// backwards, headers-only, over at most [`BACKFILL_SEARCH_LIMIT`] messages; when none
    /// carries a position, the checkpoint and the duplicate window are what is left, and a
    /// warning says so.
    async fn behind_backfill(
        &self,
        name: &str,
        last: &HeaderMap,
        state: &stream::State,
    ) -> Result<StoredEvent, SinkError> {
        let mut resume = StoredEvent::from_headers(last);
        let mut span = 256;
        loop {
            let from = state
                .last_sequence
                .saturating_sub(span - 1)
                .max(state.first_sequence);
            let mut newest = None;
            read_headers(&self.context, name, StreamStart::Sequence(from), |stored| {
                if stored.sequence <= state.last_sequence {
                    let event = StoredEvent::from_headers(&stored.headers);
                    if event.commit_lsn.is_some() {
                        newest = Some(event);
                    }
                }
            })
            .await?;
            if let Some(newest) = newest {
                resume.commit_lsn = newest.commit_lsn;
                resume.row_index = newest.row_index;
                resume.commit_time = newest.commit_time;
                return Ok(resume);
            }
            if from == state.first_sequence || span >= BACKFILL_SEARCH_LIMIT {
                tracing::warn!(stream = %name, searched = state.last_sequence - from + 1,
                    "stream `{name}` ends with backfilled messages and none of the last {} \
                     carries a WAL position: what the slot repeats is skipped up to the \
                     checkpoint, and after that only JetStream's duplicate window keeps it \
                     from being stored twice",
                    state.last_sequence - from + 1);
                return Ok(resume);
            }
            span = (span * 16).min(BACKFILL_SEARCH_LIMIT);
        }
    }

    /// How many copies the checkpoint's bucket keeps when it is created: `--checkpoint-replicas`,
    /// else the most any stream capturing the outbox's subjects keeps, so that a cluster that
    /// serves the outbox's streams serves it too.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The newest outbox event any stream held when the session started (None with fencing
    /// off: the streams are then not read).
    pub fn stream_end(&self) -> Option<StreamEnd> {
        self.fence.end()
    }

    /// The name of the stream that captures `subject`, among those known when the session
    /// started.
    pub fn stream_name_of(&mut self, subject: &str) -> Option<String> {
        let stream = self.fence.stream_of(subject)?;
        self.fence.name(stream).map(str::to_owned)
    }

    /// The `Nats-Msg-Id` of every message stream `name` stored since `since` (all of them
    /// without), read headers-only.
    pub async fn stored_ids(
        &self,
        name: &str,
        since: Option<time::OffsetDateTime>,
    ) -> Result<HashSet<String>, SinkError> {
        let start = since.map_or(StreamStart::First, StreamStart::Time);
        let mut ids = HashSet::new();
        let read = read_headers(&self.context, name, start, |stored| {
            if let Some(id) = stored.headers.get(crate::event::header::MSG_ID) {
                ids.insert(id.as_str().to_owned());
            }
        });
        self.denials.guard(read).await?;
        Ok(ids)
    }
}

/// How far back a session looks, past a backfill at a stream's end, for the newest event with
/// a WAL position: reading 65,536 messages' headers takes about a second.
const BACKFILL_SEARCH_LIMIT: u64 = 65_536;

/// Where to start reading a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    First,
    Sequence(u64),
    Time(time::OffsetDateTime),
}

/// A stored message's place, subject and headers (its body is not read).
#[derive(Debug, Clone)]
pub struct StoredHeaders {
    pub sequence: u64,
    pub subject: String,
    pub headers: HeaderMap,
}

/// Reads stream `name` headers-only from `start` to its end, handing each message to `each`;
/// returns how many it read.
pub async fn read_headers(
    context: &jetstream::Context,
    name: &str,
    start: StreamStart,
    mut each: impl FnMut(StoredHeaders),
) -> Result<u64, SinkError> {
    use futures::StreamExt;
    let unavailable = |e: &dyn std::fmt::Display| {
        SinkError::StreamUnavailable(format!("reading stream `{name}`: {e}"))
    };
    let mut stream = context
        .get_stream(name)
        .await
        .map_err(|e| get_stream_error(name, e))?;
    let state = stream
        .info()
        .await
        .map_err(|e| unavailable(&e))?
        .state
        .clone();
    let nothing = state.messages == 0
        || match start {
            StreamStart::First => false,
            StreamStart::Sequence(sequence) => state.last_sequence < sequence,
            StreamStart::Time(time) => state.last_timestamp < time,
        };
    if nothing {
        return Ok(0);
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            headers_only: true,
            deliver_policy: match start {
                StreamStart::First => consumer::DeliverPolicy::All,
                StreamStart::Sequence(start_sequence) => {
                    consumer::DeliverPolicy::ByStartSequence { start_sequence }
                }
                StreamStart::Time(start_time) => {
                    consumer::DeliverPolicy::ByStartTime { start_time }
                }
            },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| unavailable(&e))?;
    let mut read = 0;
    loop {
        let message = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(unavailable(&e)),
            Ok(None) => break,
            Err(_) => return Err(unavailable(&"no message within 10 s")),
        };
        let info = message.info().map_err(|e| unavailable(&e))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        read += 1;
        each(StoredHeaders {
            sequence,
            subject: message.subject.to_string(),
            headers: message.headers.clone().unwrap_or_default(),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(read)
}
