//! The streams events go to: the one `--stream` creates, their duplicate windows checked, and
//! the account's stream list that fencing needs.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};

use super::error::get_stream_error;
use super::fence::{Fence, StoredEvent, StreamEnd, StreamSummary};
use super::{JetStreamSink, MIN_SAFE_DUPLICATE_WINDOW, SinkConfig, SinkError};
use crate::event::header;

impl<T> JetStreamSink<T> {
    /// Creates the configured stream if missing, checks the duplicate window of the streams
    /// that will receive our subjects, and (with fencing) learns every stream's subjects.
    pub async fn prepare(&mut self, config: &SinkConfig) -> Result<(), SinkError> {
        if config.atomic && !self.client.is_server_compatible(2, 12, 0) {
            return Err(SinkError::AtomicUnsupported {
                version: self.client.server_info().version,
            });
        }
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
                            allow_atomic_publish: config.atomic,
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
        let names = self
            .streams_capturing(config.stream.as_ref(), &config.capture_subjects)
            .await;
        if names.is_empty() && !config.capture_subjects.is_empty() {
            tracing::warn!(subjects = ?config.capture_subjects,
                "no JetStream stream captures the outbox subjects yet; publishing will fail until one does");
        }
        // Dead letters always go out one by one: only the events' streams take batches.
        let batched = if config.atomic {
            self.streams_capturing(config.stream.as_ref(), &config.event_subjects)
                .await
        } else {
            Vec::new()
        };
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
        }
        if config.fencing {
            self.fence = self.read_fence().await?;
        }
        Ok(())
    }

    /// `stream` and the streams that capture `subjects`, each once.
    async fn streams_capturing(&self, stream: Option<&String>, subjects: &[String]) -> Vec<String> {
        let mut names: Vec<String> = stream.into_iter().cloned().collect();
        for subject in subjects {
            if let Ok(name) = self.context.stream_by_subject(subject.clone()).await
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
        names
    }

    /// Every stream of the account with its subjects and its last message: publishes are
    /// fenced within the stream that captures them (subjects never overlap between streams),
    /// and what a stream holds already is not sent again. Streams created later are learnt by
    /// the next session; until then their subjects go out unfenced.
    async fn read_fence(&mut self) -> Result<Fence, SinkError> {
        use futures::TryStreamExt;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            SinkError::StreamUnavailable(format!("{what}: {e}"))
        };
        let infos: Vec<stream::Info> = self.context.streams().try_collect().await.map_err(|e| {
            unavailable(
                "listing the streams to fence publishes (`$JS.API.STREAM.LIST`; without that \
                     permission, run with --no-fencing)",
                &e,
            )
        })?;
        self.replicas = infos
            .iter()
            .map(|info| info.config.num_replicas)
            .max()
            .unwrap_or(1);
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

    /// The most copies any stream of the account keeps: the checkpoint keeps as many, so that
    /// a cluster that serves the outbox's streams serves it too.
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
        read_headers(&self.context, name, start, |stored| {
            if let Some(id) = stored.headers.get(crate::event::header::MSG_ID) {
                ids.insert(id.as_str().to_owned());
            }
        })
        .await?;
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
