//! `outbox-cdc run`: its flags, checked into a [`RunConfig`], then the pipeline with its HTTP
//! endpoint until shutdown.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser};
use tokio::sync::watch;

use super::args::{
    CheckpointArgs, ConfigArgs, DatabaseArgs, HttpAddr, MappingArgs, NatsArgs, PoisonArgs,
    PublicationArgs, PublishArgs, SlotArgs, heading, parse_duration, parse_http_addr, sink_config,
};
use super::error::ConfigError;
use super::tables::{TableSections, table_streams};
use crate::http::HttpServer;
use crate::lsn::Lsn;
use crate::pipeline::mapping::{Mappings, TableSettings};
use crate::pipeline::{PipelineSettings, ReplayConfig, RunConfig};
use crate::source::SourceConfig;
use crate::stats::Stats;

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub slot: SlotArgs,

    #[command(flatten)]
    pub publication: PublicationArgs,

    /// Fail instead of creating the slot when it does not exist
    #[arg(long, env = "OUTBOX_CDC_NO_CREATE_SLOT", help_heading = heading::CONNECTION)]
    pub no_create_slot: bool,

    /// Reconnect when PostgreSQL stops streaming to the replication connection for this long
    ///
    /// Also when it does not answer within this long whether it still streams to it (asked over
    /// the SQL connection every third of it). Catches connections lost without notice, such as a
    /// black-holed network path.
    #[arg(long, env = "OUTBOX_CDC_REPLICATION_TIMEOUT", value_name = "DURATION", default_value = "30s",
          value_parser = parse_duration, help_heading = heading::CONNECTION)]
    pub replication_timeout: Duration,

    #[command(flatten)]
    pub mapping: MappingArgs,

    /// Also publish transactional logical decoding messages with this prefix, repeatable
    ///
    /// `pg_logical_emit_message(true, 'PREFIX', '<JSON object>')`, e.g. from outbox_emit() in
    /// sql/outbox_emit.sql: published like outbox rows, in their place in commit order — a
    /// table-less outbox.
    #[arg(long, env = "OUTBOX_CDC_MESSAGE_PREFIX", value_name = "PREFIX", value_delimiter = ',',
          action = clap::ArgAction::Append, help_heading = heading::MAPPING)]
    pub message_prefix: Vec<String>,

    /// Headers for every event of a transaction, from a logical decoding message with this prefix
    ///
    /// `pg_logical_emit_message(true, 'PREFIX', '{"traceparent": "00-…"}')` early in a
    /// transaction (outbox_annotate() in sql/outbox_emit.sql): its members become headers of
    /// every event the transaction publishes after it — W3C trace context without a column.
    #[arg(long, env = "OUTBOX_CDC_ANNOTATION_PREFIX", value_name = "PREFIX", help_heading = heading::MAPPING)]
    pub annotation_prefix: Option<String>,

    #[command(flatten)]
    pub publish: PublishArgs,

    #[command(flatten)]
    pub poison: PoisonArgs,

    /// Publish each transaction as one atomic JetStream batch (nats-server 2.12+)
    ///
    /// Stored whole or not at all, so consumers never see part of a transaction; the streams
    /// need `allow_atomic`. A transaction over --atomic-max-batch events, or whose events go to
    /// several streams, goes out event by event, with a warning and a metric.
    #[arg(long, env = "OUTBOX_CDC_ATOMIC_TRANSACTIONS", help_heading = heading::DELIVERY)]
    pub atomic_transactions: bool,

    /// The most events an atomic batch holds: the server's `max_batch_size`
    #[arg(long, env = "OUTBOX_CDC_ATOMIC_MAX_BATCH", value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(2..), help_heading = heading::DELIVERY)]
    pub atomic_max_batch: u32,

    /// Go on past the gap found at start, once its events were re-published from the table
    ///
    /// A gap: events that may be missing between what the streams hold and where the slot or the
    /// database now is (after a lost slot, a restore, a failover that lost commits). Applies to
    /// this start only; outbox-cdc stops at any later gap.
    #[arg(long, env = "OUTBOX_CDC_ACCEPT_GAP", help_heading = heading::RECOVERY)]
    pub accept_gap: bool,

    /// When creating the slot, first publish the rows this SQL condition selects
    ///
    /// As of the slot's starting point (e.g. `published_at IS NULL`): the switch from a polling
    /// relay, every older unsent row from that snapshot, every newer row from the WAL, none
    /// twice. Ignored when the slot exists.
    #[arg(long, env = "OUTBOX_CDC_INITIAL_BACKFILL", value_name = "SQL", help_heading = heading::RECOVERY)]
    pub initial_backfill: Option<String>,

    /// Skip transactions that committed before this LSN (`X/Y`)
    ///
    /// Fails when the slot can no longer serve it; see --replay-window.
    #[arg(long, env = "OUTBOX_CDC_START_LSN", value_name = "LSN", help_heading = heading::RECOVERY)]
    pub start_lsn: Option<Lsn>,

    /// Hold the slot's confirmed position back by this long, for --start-lsn
    ///
    /// The WAL of that period stays on the server's disk; progress is then checkpointed in the
    /// NATS KV bucket.
    #[arg(long, env = "OUTBOX_CDC_REPLAY_WINDOW", value_name = "DURATION", default_value = "0s",
          value_parser = parse_duration, help_heading = heading::RECOVERY)]
    pub replay_window: Duration,

    #[command(flatten)]
    pub checkpoint: CheckpointArgs,

    /// Copies the checkpoint's KV bucket keeps when created [default: as many as the outbox's streams]
    ///
    /// The most replicas of the streams that capture the events (--stream-replicas for one
    /// --stream creates). An existing bucket is not changed; one with fewer copies is warned
    /// about at start.
    #[arg(long, env = "OUTBOX_CDC_CHECKPOINT_REPLICAS", value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=5), help_heading = heading::RECOVERY)]
    pub checkpoint_replicas: Option<u8>,

    /// How often to report the confirmed position to PostgreSQL
    #[arg(long, env = "OUTBOX_CDC_STATUS_INTERVAL", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration, help_heading = heading::OPERATIONS)]
    pub status_interval: Duration,

    /// How often a standby instance retries taking the slot
    #[arg(long, env = "OUTBOX_CDC_STANDBY_RETRY", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration, help_heading = heading::OPERATIONS)]
    pub standby_retry: Duration,

    /// How long shutdown waits for in-flight acks
    #[arg(long, env = "OUTBOX_CDC_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "30s",
          value_parser = parse_duration, help_heading = heading::OPERATIONS)]
    pub shutdown_timeout: Duration,

    /// Address for /healthz, /readyz and /metrics (`off` disables it; port 0 picks a free one)
    #[arg(long, env = "OUTBOX_CDC_HTTP_ADDR", value_name = "ADDR", default_value = "127.0.0.1:9187",
          value_parser = parse_http_addr, help_heading = heading::OPERATIONS)]
    pub http_addr: HttpAddr,

    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `run`, its flags checked.
#[derive(Debug)]
pub struct Run {
    pub config: RunConfig,
    pub http_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// Parses `run` flags given in code (defaults and environment apply as on the command line).
    pub fn from_flags<'a>(
        flags: impl IntoIterator<Item = &'a str>,
    ) -> Result<RunArgs, clap::Error> {
        #[derive(Parser)]
        struct RunOnly {
            #[command(flatten)]
            args: RunArgs,
        }
        let argv = std::iter::once("outbox-cdc").chain(flags);
        RunOnly::try_parse_from(argv).map(|only| only.args)
    }

    pub fn resolve(self) -> Result<Run, ConfigError> {
        self.resolve_with(&TableSections::default())
    }

    /// Checks the flags, with the config file's per-table `sections`.
    pub fn resolve_with(self, sections: &TableSections) -> Result<Run, ConfigError> {
        let database = self.database.resolve()?;
        // run streams over a replication connection: refused here rather than at connecting.
        if let Some(refusal) = database.replication_refusal() {
            return Err(ConfigError::ReplicationConnection(refusal));
        }
        if self.status_interval < Duration::from_millis(10) {
            return Err(ConfigError::StatusInterval);
        }
        if self.replication_timeout < Duration::from_secs(1) {
            return Err(ConfigError::ReplicationTimeout);
        }
        if self.atomic_transactions && self.publish.no_fencing {
            return Err(ConfigError::AtomicWithoutFencing);
        }
        for (i, prefix) in self.message_prefix.iter().enumerate() {
            if prefix.is_empty() {
                return Err(ConfigError::MessagePrefix(prefix.clone(), "is empty"));
            }
            if self.message_prefix[..i].contains(prefix) {
                return Err(ConfigError::MessagePrefix(prefix.clone(), "is given twice"));
            }
        }
        if let Some(prefix) = &self.annotation_prefix
            && (prefix.is_empty() || self.message_prefix.contains(prefix))
        {
            return Err(ConfigError::MessagePrefix(
                prefix.clone(),
                "is empty, or also a --message-prefix",
            ));
        }
        let default = TableSettings {
            mapping: self.mapping.resolve(&database.dbname)?,
            on_error: self.poison.resolve()?,
        };
        let mappings = Mappings {
            tables: sections.settings(&default)?,
            default,
        };
        let max_in_flight = self.publish.max_in_flight as usize;
        let mut sink = sink_config(
            &self.nats,
            self.publish,
            &mappings,
            &table_streams(sections),
            self.atomic_transactions,
        )?;
        sink.checkpoint_replicas = self.checkpoint_replicas.map(usize::from);
        let config = RunConfig {
            source: SourceConfig {
                database,
                slot: self.slot.slot,
                publication: self.publication.publication,
                create_slot: !self.no_create_slot,
                status_interval: self.status_interval,
                replication_timeout: self.replication_timeout,
            },
            sink,
            pipeline: PipelineSettings {
                mappings,
                max_in_flight,
                shutdown_timeout: self.shutdown_timeout,
                status_interval: self.status_interval,
                message_prefixes: self.message_prefix,
                annotation_prefix: self.annotation_prefix,
                atomic_max_batch: self
                    .atomic_transactions
                    .then_some(self.atomic_max_batch as usize),
            },
            standby_retry: self.standby_retry,
            accept_gap: self.accept_gap,
            initial_backfill: self.initial_backfill,
            replay: ReplayConfig {
                start_lsn: self.start_lsn,
                window: self.replay_window,
                checkpoint_bucket: self.checkpoint.checkpoint_bucket,
            },
        };
        Ok(Run {
            config,
            http_addr: self.http_addr.0,
        })
    }
}

/// Runs the pipeline, and the HTTP endpoint beside it, until `shutdown` turns true or a
/// permanent error.
pub async fn execute(run: Run, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let Run { config, http_addr } = run;
    tracing::info!(
        database = %config.source.database,
        nats = %config.sink.urls,
        slot = %config.source.slot,
        publication = %config.source.publication,
        "starting outbox-cdc {}",
        crate::VERSION
    );
    let stats = Arc::new(Stats::default());
    if let Some(addr) = http_addr {
        let server = HttpServer::bind(addr).await?;
        if let Some(bound) = server.local_addr() {
            tracing::info!("serving /healthz, /readyz and /metrics on http://{bound}");
        }
        tokio::spawn(server.serve(stats.clone(), shutdown.clone()));
    }
    let shutdown_timeout = config.pipeline.shutdown_timeout;
    let result = crate::pipeline::run(config, &stats, shutdown.clone()).await;
    if result.is_err() && http_addr.is_some() {
        await_last_scrape(&stats, shutdown_timeout, shutdown).await;
    }
    result?;
    Ok(())
}

/// A run that fails ends the process, and the counts of its last moments — the poison row that
/// stopped it — reach Prometheus only if `/metrics` is read once more before it exits (a counter
/// Prometheus never saw at 1 has no `increase()`, and its alert cannot fire). When something
/// reads `/metrics`, wait for its next read: as long as between its last two reads and a second
/// more, at most `limit` (`--shutdown-timeout`), or until a signal.
async fn await_last_scrape(stats: &Stats, limit: Duration, shutdown: watch::Receiver<bool>) {
    let Some(interval) = stats.scrape_interval() else {
        return;
    };
    let wait = (interval + Duration::from_secs(1)).min(limit);
    let seen = stats.scrapes();
    tracing::info!(
        ?wait,
        "stopping: waiting for /metrics to be read once more, so that the last counts are seen"
    );
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline && !*shutdown.borrow() {
        if stats.scrapes() > seen {
            // Read: give the answer a moment to leave before the process exits.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        RunArgs::from_flags(args.iter().copied())
    }

    #[test]
    fn defaults_are_sane() {
        let args = parse(&["--database-url", "postgres://u@h/d"]).unwrap();
        let config = args.resolve().unwrap().config;
        assert_eq!(config.source.slot.as_str(), "outbox_cdc");
        assert_eq!(config.source.publication.as_str(), "outbox_pub");
        assert!(config.source.create_slot);
        assert_eq!(config.source.status_interval, Duration::from_secs(1));
        assert_eq!(config.source.replication_timeout, Duration::from_secs(30));
        assert_eq!(config.sink.capture_subjects, ["outbox.>"]);
        assert!(
            config.sink.streams.is_empty(),
            "no --stream, no stream to create"
        );
        assert_eq!(config.sink.checkpoint_replicas, None);
        assert_eq!(
            config.pipeline.mappings.default.mapping.payload_column,
            "payload"
        );
        assert_eq!(config.standby_retry, Duration::from_secs(1));
    }

    #[test]
    fn stream_flags_describe_the_stream_to_create() {
        use crate::sink::Discard;
        let base = ["--database-url", "postgres://u@h/d", "--stream", "OUTBOX"];
        let config = parse(&base).unwrap().resolve().unwrap().config;
        let [spec] = &config.sink.streams[..] else {
            panic!("one stream: {:?}", config.sink.streams)
        };
        assert_eq!(
            (spec.name.as_str(), spec.replicas, spec.limits),
            ("OUTBOX", 1, Default::default())
        );
        assert_eq!(spec.subjects, ["outbox.>"]);
        assert_eq!(spec.duplicate_window, Duration::from_secs(600));
        let production = [
            "--stream-replicas",
            "3",
            "--stream-max-age",
            "7d",
            "--stream-max-bytes",
            "50GiB",
            "--stream-discard",
            "old",
            "--checkpoint-replicas",
            "3",
        ];
        let config = parse(&[&base[..], &production].concat())
            .unwrap()
            .resolve()
            .unwrap()
            .config;
        let spec = &config.sink.streams[0];
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.limits.max_age, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(spec.limits.max_bytes, Some(50 << 30));
        assert_eq!(spec.limits.discard, Discard::Old);
        assert_eq!(config.sink.checkpoint_replicas, Some(3));
        let created = spec.config();
        assert_eq!(
            (created.num_replicas, created.max_bytes, created.max_age),
            (3, 50 << 30, Duration::from_secs(7 * 86400))
        );

        for (extra, needle) in [
            (
                vec!["--stream-replicas", "3"],
                "--stream-replicas describes the stream --stream creates",
            ),
            (vec!["--stream-discard", "old"], "--stream-discard"),
        ] {
            let err = parse(&[&base[..2], &extra[..]].concat())
                .unwrap()
                .resolve()
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{extra:?}: {err}");
        }
        let err = parse(&[&base[..], &["--stream-max-age", "1m"]].concat())
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than --duplicate-window 10m"), "{err}");
        for (flag, value) in [("--stream-replicas", "6"), ("--checkpoint-replicas", "0")] {
            let err = parse(&[&base[..], &[flag, value]].concat())
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn rejects_bad_values_naming_the_flag() {
        for (args, needle) in [
            (vec!["--slot", "Bad-Slot"], "invalid slot name"),
            (vec!["--status-interval", "soon"], "not a duration"),
            (vec!["--max-in-flight", "0"], "max-in-flight"),
            (
                vec!["--subject-template", "a.{"],
                "invalid subject template",
            ),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn too_short_intervals_are_refused() {
        for (flag, value, needle) in [
            (
                "--status-interval",
                "5ms",
                "--status-interval must be at least",
            ),
            (
                "--replication-timeout",
                "500ms",
                "--replication-timeout must be at least",
            ),
        ] {
            let args = parse(&["--database-url", "postgres://u@h/d", flag, value]).unwrap();
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(needle), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn database_url_is_required_and_checked() {
        let args = parse(&["--database-url", "mysql://u:pw@h/d"]).unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("scheme") && !err.contains("pw"), "{err}");
    }

    #[test]
    fn subject_column_without_template_has_no_default_template() {
        let base = [
            "--database-url",
            "postgres://u@h/d",
            "--subject-column",
            "topic",
        ];
        let config = parse(&base).unwrap().resolve().unwrap().config;
        assert_eq!(
            config.pipeline.mappings.default.mapping.subject_template,
            None
        );
        assert!(config.sink.capture_subjects.is_empty());
        let err = parse(&[&base[..], &["--stream", "S"]].concat())
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("create the stream yourself"), "{err}");
    }

    #[test]
    fn a_subject_map_adds_what_it_produces_to_the_stream_subjects() {
        let args = [
            "--database-url",
            "postgres://u@h/d",
            "--subject-map",
            "outbox.order.*=prod.orders.*",
            "--subject-map",
            "outbox.x.>=outbox.y.>",
        ];
        let config = parse(&args).unwrap().resolve().unwrap().config;
        assert_eq!(config.sink.capture_subjects, ["outbox.>", "prod.orders.*"]);
        assert_eq!(config.sink.event_subjects, config.sink.capture_subjects);
        // Dead letters are captured too, but are not events' subjects (they are never batched).
        let mut dead = args.to_vec();
        dead.extend([
            "--on-error",
            "dead-letter",
            "--dead-letter-subject",
            "dlq.outbox",
        ]);
        let config = parse(&dead).unwrap().resolve().unwrap().config;
        assert_eq!(
            config.sink.capture_subjects,
            ["outbox.>", "prod.orders.*", "dlq.outbox"]
        );
        assert_eq!(config.sink.event_subjects, ["outbox.>", "prod.orders.*"]);
        let err = parse(&["--subject-map", "a.*=b.*.*"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more `*`"), "{err}");
    }

    #[test]
    fn a_table_section_can_send_its_table_to_a_stream_of_its_own() {
        let sections = |text: &str| {
            let table: toml::Table = text.parse().unwrap();
            TableSections::parse("f.toml", &table["tables"]).unwrap()
        };
        let args = ["--database-url", "postgres://u@h/d", "--stream", "OUTBOX"];
        let own = sections(
            "[tables.invoices]\nsubject_template = \"billing.{kind}\"\nstream = \"BILLING\"\n",
        );
        let config = parse(&args).unwrap().resolve_with(&own).unwrap().config;
        let streams: Vec<(&str, &[String])> = config
            .sink
            .streams
            .iter()
            .map(|s| (s.name.as_str(), s.subjects.as_slice()))
            .collect();
        assert_eq!(
            streams,
            [
                ("OUTBOX", &["outbox.>".to_owned()][..]),
                ("BILLING", &["billing.>".to_owned()][..])
            ]
        );
        assert_eq!(config.sink.event_subjects, ["outbox.>", "billing.>"]);
        // A table with a stream of its own and the flags' subjects: two streams, one subject.
        let same = sections("[tables.invoices]\nstream = \"BILLING\"\n");
        let err = parse(&args).unwrap().resolve_with(&same).unwrap_err();
        assert!(matches!(err, ConfigError::StreamsOverlap { .. }), "{err}");
        assert!(err.to_string().contains("invoices"), "{err}");
    }
}
