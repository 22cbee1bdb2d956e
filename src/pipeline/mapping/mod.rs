//! Outbox row → JetStream message: subject, headers, body, event id.
//!
//! The user points the tool at their own table: which column holds the event id, the payload,
//! optional headers and the subject. [`MappingConfig`] is that choice; [`TableMapping`] is it
//! bound to one table's columns (from its pgoutput Relation message), checked once so that mapping
//! a row is only a few lookups. Rows come as [`RowValues`], whatever they were read from.

mod cloudevents;
mod headers;
mod ids;
mod row;
mod template;

use std::str::FromStr;
use std::sync::Arc;

use async_nats::Subject;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use super::poison::ErrorPolicy;
use crate::event::{EventRef, OutboxEvent, header};
use crate::lsn::Lsn;
use crate::source::pgoutput::Relation;
use crate::subject::{SubjectMap, validate_subject};

pub use cloudevents::{CloudEventsConfig, CloudEventsMode};
pub use headers::{RESERVED_NATS_WORDS, copy_header_object, reserved};
pub use ids::EventIds;
pub use row::{RowValues, WalRow};
pub use template::{DEFAULT_SUBJECT_TEMPLATE, SubjectTemplate, Template, TemplateError};

use cloudevents::BoundCloudEvents;
use ids::fallback_id;
use row::utf8;
use template::BoundTemplate;

/// PostgreSQL's type OID for `bytea`.
const BYTEA_OID: u32 = 17;

/// Which columns of the user's table mean what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingConfig {
    /// The event id column; `None` means `id` when the table has one, else an id derived from
    /// the commit LSN and the row's index in its transaction.
    pub id_column: Option<String>,
    pub payload_column: String,
    /// The headers column; `None` means `headers` when the table has one.
    pub headers_column: Option<String>,
    /// `None` only with a subject column: a NULL there is then an unmappable row.
    pub subject_template: Option<SubjectTemplate>,
    /// Takes the subject from this column when it is not NULL.
    pub subject_column: Option<String>,
    /// Rewrites the subject (from the template or the column) before publishing.
    pub subject_map: SubjectMap,
    /// Publish CloudEvents (`--cloudevents`).
    pub cloudevents: Option<CloudEventsConfig>,
}

impl Default for MappingConfig {
    fn default() -> Self {
        MappingConfig {
            id_column: None,
            payload_column: "payload".into(),
            headers_column: None,
            subject_template: Some(
                SubjectTemplate::from_str(DEFAULT_SUBJECT_TEMPLATE)
                    .expect("the default template is valid"),
            ),
            subject_column: None,
            subject_map: SubjectMap::default(),
            cloudevents: None,
        }
    }
}

/// How one table's rows are published: its mapping, and what becomes of its poison rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableSettings {
    pub mapping: MappingConfig,
    pub on_error: ErrorPolicy,
}

/// Every table's settings: the flags' for all tables, and those of the config file's
/// `[tables."schema.table"]` sections for the tables they name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mappings {
    pub default: TableSettings,
    /// (the table's name as the section gives it — `schema.table`, or `table` alone — and
    /// its settings).
    pub tables: Vec<(String, TableSettings)>,
}

impl Mappings {
    /// The flags' settings for every table.
    pub fn new(default: TableSettings) -> Mappings {
        Mappings {
            default,
            tables: Vec::new(),
        }
    }

    /// `relation`'s settings.
    pub fn for_table(&self, relation: &Relation) -> &TableSettings {
        self.section(relation).unwrap_or(&self.default)
    }

    /// The section that names `relation`, if one does.
    fn section(&self, relation: &Relation) -> Option<&TableSettings> {
        let qualified = relation.qualified_name();
        self.tables
            .iter()
            .find(|(name, _)| *name == qualified)
            .or_else(|| self.tables.iter().find(|(name, _)| *name == relation.name))
            .map(|(_, settings)| settings)
    }

    /// The sections that name none of `tables` (a misspelt table, or one the publication does
    /// not publish).
    pub fn unmatched<'a>(&'a self, tables: &'a [Relation]) -> impl Iterator<Item = &'a str> {
        self.tables
            .iter()
            .filter(|(name, _)| {
                !tables
                    .iter()
                    .any(|t| *name == t.qualified_name() || *name == t.name)
            })
            .map(|(name, _)| name.as_str())
    }

    /// Every table's settings, the flags' first.
    pub fn all(&self) -> impl Iterator<Item = &TableSettings> {
        std::iter::once(&self.default).chain(self.tables.iter().map(|(_, s)| s))
    }
}

/// A configured column the table does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "table `{table}` has no column `{column}` (configured by {flag}); its columns are: {}",
    available.join(", ")
)]
pub struct MissingColumn {
    pub table: String,
    pub column: String,
    pub flag: &'static str,
    pub available: Vec<String>,
}

impl MissingColumn {
    pub fn new(relation: &Relation, column: &str, flag: &'static str) -> MissingColumn {
        MissingColumn {
            table: relation.qualified_name(),
            column: column.to_owned(),
            flag,
            available: relation
                .column_names()
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }
}

/// The mapping bound to one table.
#[derive(Debug, Clone)]
pub struct TableMapping {
    table: Arc<str>,
    table_header: HeaderValue,
    ids: EventIds,
    payload: usize,
    payload_is_bytea: bool,
    headers: Option<(usize, String)>,
    subject_column: Option<(usize, String)>,
    template: Option<BoundTemplate>,
    subject_map: SubjectMap,
    cloudevents: Option<BoundCloudEvents>,
}

impl TableMapping {
    /// Binds `config` to `relation`; every configured column must exist. With `qualify_ids`
    /// (the publication has more than one table) event ids are `schema.table:<id>`.
    pub fn bind(
        config: &MappingConfig,
        relation: &Relation,
        qualify_ids: bool,
    ) -> Result<Self, MissingColumn> {
        let table = relation.qualified_name();
        let find = |column: &str, flag: &'static str| {
            relation
                .column_index(column)
                .ok_or_else(|| MissingColumn::new(relation, column, flag))
        };
        let ids = EventIds::bind(config.id_column.as_deref(), relation, qualify_ids)?;
        let payload = find(&config.payload_column, "--payload-column")?;
        // (index, how errors name it)
        let headers = match &config.headers_column {
            Some(column) => Some((
                find(column, "--headers-column")?,
                format!("headers column `{column}`"),
            )),
            None => relation
                .column_index("headers")
                .map(|i| (i, "headers column `headers`".to_owned())),
        };
        let subject_column = match &config.subject_column {
            Some(column) => Some((find(column, "--subject-column")?, column.clone())),
            None => None,
        };
        let template = config
            .subject_template
            .as_ref()
            .map(|template| template.bind(relation, "--subject-template"))
            .transpose()?;
        let cloudevents = config
            .cloudevents
            .as_ref()
            .map(|ce| BoundCloudEvents::bind(ce, relation, payload))
            .transpose()?;
        let table_header = HeaderValue::from_str(&table).unwrap_or_default();
        Ok(TableMapping {
            table: Arc::from(table),
            table_header,
            ids,
            payload,
            payload_is_bytea: relation.columns[payload].type_oid == BYTEA_OID,
            headers,
            subject_column,
            template,
            subject_map: config.subject_map.clone(),
            cloudevents,
        })
    }

    /// `schema.table`.
    pub fn table(&self) -> &Arc<str> {
        &self.table
    }

    /// Maps one inserted row.
    pub fn map<R: RowValues + ?Sized>(
        &self,
        row: &R,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<OutboxEvent, UnmappableRow> {
        let event_id = self
            .ids
            .of(row, txn, row_index)
            .map_err(|reason| self.unmappable(txn, row_index, None, None, reason))?;
        let fail = |subject: Option<String>, reason: String| {
            self.unmappable(
                txn,
                row_index,
                Some(&event_id),
                subject.map(Subject::from),
                reason,
            )
        };

        let subject = self.subject(row).map_err(|reason| fail(None, reason))?;
        let subject = self.subject_map.apply(&subject).unwrap_or(subject);
        if let Err(reason) = validate_subject(&subject) {
            return Err(fail(Some(subject), reason));
        }

        let mut headers = HeaderMap::new();
        if let Some((index, origin)) = &self.headers {
            match row.text(*index) {
                Ok(Some(json)) => {
                    if let Err(reason) = copy_header_object(json, origin, &mut headers) {
                        return Err(fail(Some(subject), reason));
                    }
                }
                Ok(None) => {}
                Err(reason) => return Err(fail(Some(subject), reason)),
            }
        }
        // The tool's own headers win over user headers of the same name.
        // Names from `from_static`: inserting them allocates no copy of the name.
        headers.insert(header::MSG_ID, event_id.clone());
        txn.insert_headers(&mut headers, row_index);
        headers.insert(
            HeaderName::from_static(header::TABLE),
            self.table_header.clone(),
        );

        let payload = match row.text(self.payload) {
            Ok(Some(text)) if self.payload_is_bytea => match decode_bytea_hex(text) {
                Ok(bytes) => Bytes::from(bytes),
                Err(reason) => return Err(fail(Some(subject), reason)),
            },
            Ok(Some(text)) => row.body(text),
            // A NULL payload is published as an empty body (documented in the README).
            Ok(None) => Bytes::new(),
            Err(reason) => return Err(fail(Some(subject), reason)),
        };

        let mut event = OutboxEvent {
            subject: Subject::from(subject),
            headers,
            payload,
            id: event_id,
        };
        if let Some(cloudevents) = &self.cloudevents
            && let Err(reason) = cloudevents.apply(&mut event, row, txn)
        {
            let subject = Some(event.subject.clone());
            return Err(self.unmappable(txn, row_index, Some(&event.id), subject, reason));
        }
        Ok(event)
    }

    /// Which row `message` is, for error messages, dead letters and the resume point.
    pub fn event_ref(&self, message: &OutboxEvent, commit_lsn: Lsn, row_index: u32) -> EventRef {
        EventRef {
            event_id: message.id.as_str().to_owned(),
            table: self.table.clone(),
            subject: Some(message.subject.clone()),
            commit_lsn,
            row_index,
        }
    }

    fn qualified(&self, id: &str) -> HeaderValue {
        self.ids.qualified(id)
    }

    /// The row's body as best it can be read, for a dead letter: empty when it cannot be.
    pub fn raw_payload<R: RowValues + ?Sized>(&self, row: &R) -> Bytes {
        match row.text(self.payload) {
            Ok(Some(text)) if self.payload_is_bytea => decode_bytea_hex(text)
                .map(Bytes::from)
                .unwrap_or_else(|_| row.body(text)),
            Ok(Some(text)) => row.body(text),
            _ => Bytes::new(),
        }
    }

    fn subject<R: RowValues + ?Sized>(&self, row: &R) -> Result<String, String> {
        if let Some((index, _)) = &self.subject_column
            && let Some(subject) = row.text(*index)?
        {
            return utf8(subject, "the subject column").map(str::to_owned);
        }
        let Some(template) = &self.template else {
            let name = self.subject_column.as_ref().map_or("", |(_, name)| name);
            return Err(format!(
                "the subject column `{name}` is NULL and no --subject-template is set to fall back on"
            ));
        };
        template.render(row, "subject")
    }

    /// A row that is unmappable before its columns can be read (for a message whose content
    /// is not a JSON object): its id is the fallback one.
    pub fn unreadable(
        &self,
        txn: &TransactionContext,
        row_index: u32,
        reason: String,
    ) -> UnmappableRow {
        self.unmappable(txn, row_index, None, None, reason)
    }

    fn unmappable(
        &self,
        txn: &TransactionContext,
        row_index: u32,
        event_id: Option<&HeaderValue>,
        subject: Option<Subject>,
        reason: String,
    ) -> UnmappableRow {
        UnmappableRow {
            event: EventRef {
                event_id: event_id
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_else(|| {
                        self.qualified(&fallback_id(txn.commit_lsn, row_index))
                            .as_str()
                            .to_owned()
                    }),
                table: self.table.clone(),
                subject,
                commit_lsn: txn.commit_lsn,
                row_index,
            },
            reason,
        }
    }
}

/// Values shared by every row of a transaction, formatted once: a transaction read from the
/// WAL, or rows read again from the table (a backfill), which have no commit LSN.
#[derive(Debug, Clone)]
pub struct TransactionContext {
    /// `Lsn::ZERO` for a backfill.
    pub commit_lsn: Lsn,
    pub commit_time: std::time::SystemTime,
    headers: OriginHeaders,
}

#[derive(Debug, Clone)]
enum OriginHeaders {
    Wal {
        commit_lsn: HeaderValue,
        commit_time: HeaderValue,
    },
    Backfill,
}

impl TransactionContext {
    /// `commit_time_micros` counts from 2000-01-01 UTC, as PostgreSQL sends it.
    pub fn new(commit_lsn: Lsn, commit_time_micros: i64) -> Self {
        TransactionContext {
            commit_lsn,
            commit_time: pg_timestamp_to_system_time(commit_time_micros),
            headers: OriginHeaders::Wal {
                commit_lsn: HeaderValue::from(commit_lsn.to_string()),
                commit_time: HeaderValue::from(format_pg_timestamp(commit_time_micros)),
            },
        }
    }

    /// Rows read from the table by `outbox-cdc backfill`: marked as such, with no commit LSN.
    pub fn backfill() -> Self {
        TransactionContext {
            commit_lsn: Lsn::ZERO,
            commit_time: std::time::SystemTime::now(),
            headers: OriginHeaders::Backfill,
        }
    }

    /// The commit time, RFC 3339; None for a backfilled row.
    pub fn commit_time_text(&self) -> Option<&str> {
        match &self.headers {
            OriginHeaders::Wal { commit_time, .. } => Some(commit_time.as_str()),
            OriginHeaders::Backfill => None,
        }
    }

    pub(super) fn is_wal(&self) -> bool {
        matches!(self.headers, OriginHeaders::Wal { .. })
    }

    /// The headers saying where the row comes from.
    fn insert_headers(&self, headers: &mut HeaderMap, row_index: u32) {
        match &self.headers {
            OriginHeaders::Wal {
                commit_lsn,
                commit_time,
            } => {
                // Names from `from_static`: inserting them allocates no copy of the name.
                headers.insert(
                    HeaderName::from_static(header::COMMIT_LSN),
                    commit_lsn.clone(),
                );
                headers.insert(
                    HeaderName::from_static(header::COMMIT_TIME),
                    commit_time.clone(),
                );
                headers.insert(
                    HeaderName::from_static(header::ROW_INDEX),
                    HeaderValue::from(itoa::Buffer::new().format(row_index)),
                );
            }
            OriginHeaders::Backfill => {
                headers.insert(HeaderName::from_static(header::BACKFILL), "true");
            }
        }
    }
}

/// PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC, this many seconds
/// after the Unix epoch.
const PG_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

fn pg_timestamp_to_system_time(micros: i64) -> std::time::SystemTime {
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECONDS);
    let offset = std::time::Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        epoch + offset
    } else {
        epoch - offset
    }
}

/// A row that cannot become a message; never dropped silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot map outbox row, {event}: {reason}. The row is not skipped: fix its data (or the \
     mapping flags) and restart"
)]
pub struct UnmappableRow {
    pub event: EventRef,
    pub reason: String,
}

/// Decodes PostgreSQL's hex `bytea` output (`\x0a1b…`) into raw bytes.
pub fn decode_bytea_hex(text: &[u8]) -> Result<Vec<u8>, String> {
    let hex = text.strip_prefix(b"\\x").ok_or_else(|| {
        "bytea payload is not in hex format (`\\x…`); set bytea_output = 'hex'".to_owned()
    })?;
    if hex.len() % 2 != 0 {
        return Err("bytea payload has an odd number of hex digits".into());
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(format!(
            "bytea payload has a non-hex character {:?}",
            char::from(b)
        )),
    };
    hex.chunks_exact(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// RFC 3339 text of a PostgreSQL timestamp.
pub fn format_pg_timestamp(micros_since_2000: i64) -> String {
    let unix_micros = i128::from(micros_since_2000) + i128::from(PG_EPOCH_UNIX_SECONDS) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_micros * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::{Message, decode, encode};

    const TEXT: u32 = 25;
    const JSONB: u32 = 3802;
    const UUID: u32 = 2950;

    fn relation(columns: &[(&str, u32)]) -> Relation {
        let bytes = encode::relation(1, "public", "outbox", columns);
        match decode(&bytes).unwrap() {
            Message::Relation(r) => r,
            _ => unreachable!(),
        }
    }

    fn standard() -> Relation {
        relation(&[
            ("id", UUID),
            ("aggregate_type", TEXT),
            ("aggregate_id", TEXT),
            ("event_type", TEXT),
            ("payload", JSONB),
            ("headers", JSONB),
        ])
    }

    fn map_row(
        mapping: &TableMapping,
        values: &[Option<&[u8]>],
    ) -> Result<OutboxEvent, UnmappableRow> {
        let frame = Bytes::from(encode::insert(1, values));
        let Message::Insert(insert) = decode(&frame).unwrap() else {
            unreachable!()
        };
        let txn = TransactionContext::new("0/16B3748".parse().unwrap(), 0);
        let row = WalRow {
            tuple: insert.tuple,
            frame: &frame,
        };
        mapping.map(&row, &txn, 3)
    }

    fn header<'a>(event: &'a OutboxEvent, name: &str) -> Option<&'a str> {
        event.headers.get(name).map(HeaderValue::as_str)
    }

    #[test]
    fn maps_the_recommended_table() {
        let mapping = TableMapping::bind(&MappingConfig::default(), &standard(), false).unwrap();
        let event = map_row(
            &mapping,
            &[
                Some(b"6f1c"),
                Some(b"order"),
                Some(b"42"),
                Some(b"created"),
                Some(br#"{"total":10}"#),
                Some(br#"{"trace-id":"abc","attempt":2,"Nats-ish":"y","outboxer":"z"}"#),
            ],
        )
        .unwrap();
        assert_eq!(event.subject.as_str(), "outbox.order.created");
        assert_eq!(&event.payload[..], br#"{"total":10}"#);
        assert_eq!(header(&event, "Nats-Msg-Id"), Some("6f1c"));
        assert_eq!(header(&event, "trace-id"), Some("abc"));
        assert_eq!(header(&event, "attempt"), Some("2"));
        assert_eq!(
            header(&event, "Nats-ish"),
            Some("y"),
            "not the `Nats-` prefix"
        );
        assert_eq!(
            header(&event, "outboxer"),
            Some("z"),
            "not the `Outbox-` prefix"
        );
        assert_eq!(header(&event, "Outbox-Commit-Lsn"), Some("0/16B3748"));
        assert_eq!(header(&event, "Outbox-Table"), Some("public.outbox"));
        assert_eq!(
            header(&event, "Outbox-Commit-Time"),
            Some("2000-01-01T00:00:00Z")
        );
    }

    #[test]
    fn a_row_read_from_the_table_maps_as_its_wal_row_does() {
        let mapping = TableMapping::bind(&MappingConfig::default(), &standard(), false).unwrap();
        let values: [Option<&[u8]>; 6] = [
            Some(b"6f1c"),
            Some(b"order"),
            Some(b"42"),
            Some(b"created"),
            Some(br#"{"total":10}"#),
            Some(br#"{"trace-id":"abc"}"#),
        ];
        let from_wal = map_row(&mapping, &values).unwrap();
        let text: Vec<Option<String>> = values
            .iter()
            .map(|v| v.map(|b| String::from_utf8(b.to_vec()).unwrap()))
            .collect();
        let txn = TransactionContext::new("0/16B3748".parse().unwrap(), 0);
        let from_table = mapping.map(&text[..], &txn, 3).unwrap();
        assert_eq!(from_table.subject, from_wal.subject);
        assert_eq!(from_table.payload, from_wal.payload);
        assert_eq!(from_table.headers, from_wal.headers);
        assert_eq!(from_table.id, from_wal.id);
        let short: Vec<Option<String>> = text[..2].to_vec();
        let err = mapping.map(&short[..], &txn, 0).unwrap_err();
        assert!(err.reason.contains("column 3 is missing"), "{err}");
    }

    #[test]
    fn derives_a_replay_stable_id_without_an_id_column() {
        let rel = relation(&[
            ("aggregate_type", TEXT),
            ("event_type", TEXT),
            ("payload", TEXT),
        ]);
        let mapping = TableMapping::bind(&MappingConfig::default(), &rel, false).unwrap();
        let event = map_row(&mapping, &[Some(b"a"), Some(b"b"), Some(b"x")]).unwrap();
        assert_eq!(header(&event, "Nats-Msg-Id"), Some("0/16B3748:3"));
        assert_eq!(event.headers.get("headers"), None);
    }

    #[test]
    fn names_a_missing_configured_column_and_lists_the_table() {
        let config = MappingConfig {
            payload_column: "body".into(),
            ..MappingConfig::default()
        };
        let err = TableMapping::bind(&config, &standard(), false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no column `body`"), "{text}");
        assert!(text.contains("--payload-column"), "{text}");
        assert!(text.contains("id, aggregate_type, aggregate_id, event_type, payload, headers"));

        let config = MappingConfig {
            subject_template: Some("x.{tenant}".parse().unwrap()),
            ..MappingConfig::default()
        };
        let err = TableMapping::bind(&config, &standard(), false).unwrap_err();
        assert!(err.to_string().contains("no column `tenant`"));

        let config = MappingConfig {
            id_column: Some("event_id".into()),
            ..MappingConfig::default()
        };
        assert!(TableMapping::bind(&config, &standard(), false).is_err());
    }

    #[test]
    fn subject_column_wins_when_not_null() {
        let rel = relation(&[("id", TEXT), ("topic", TEXT), ("payload", TEXT)]);
        let config = MappingConfig {
            subject_column: Some("topic".into()),
            subject_template: Some("fallback.{id}".parse().unwrap()),
            ..MappingConfig::default()
        };
        let mapping = TableMapping::bind(&config, &rel, false).unwrap();
        let event = map_row(&mapping, &[Some(b"7"), Some(b"billing.paid"), Some(b"{}")]).unwrap();
        assert_eq!(event.subject.as_str(), "billing.paid");
        let event = map_row(&mapping, &[Some(b"7"), None, Some(b"{}")]).unwrap();
        assert_eq!(event.subject.as_str(), "fallback.7");
    }

    #[test]
    fn rejects_rows_that_cannot_become_a_subject() {
        let mapping = TableMapping::bind(&MappingConfig::default(), &standard(), false).unwrap();
        let row = |agg: Option<&'static [u8]>| {
            map_row(
                &mapping,
                &[
                    Some(b"e1"),
                    agg,
                    Some(b"1"),
                    Some(b"created"),
                    Some(b"{}"),
                    None,
                ],
            )
        };
        let err = row(None).unwrap_err();
        assert_eq!(err.event.event_id, "e1");
        assert!(err.reason.contains("`{aggregate_type}` is NULL"), "{err}");
        assert!(err.to_string().contains("commit LSN 0/16B3748"), "{err}");

        for (bad, why) in [
            (&b"order items"[..], "whitespace"),
            (b"orders.*", "wildcard"),
            (b"a>", "wildcard"),
            (b"", "empty token"),
            (b"a..b", "empty token"),
        ] {
            let err = row(Some(bad)).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {err}");
            assert!(err.event.subject.is_some());
        }
    }

    #[test]
    fn rejects_headers_that_are_not_a_json_object() {
        let mapping = TableMapping::bind(&MappingConfig::default(), &standard(), false).unwrap();
        for (headers, why) in [
            (&b"[1,2]"[..], "an array"),
            (b"\"x\"", "a string"),
            (b"{not json", "not valid JSON"),
            (br#"{"bad name":"x"}"#, "not allowed"),
            (br#"{"a:b":"x"}"#, "not allowed"),
            (br#"{"x":"line\nbreak"}"#, "line break"),
        ] {
            let err = map_row(
                &mapping,
                &[
                    Some(b"e1"),
                    Some(b"o"),
                    Some(b"1"),
                    Some(b"c"),
                    Some(b"{}"),
                    Some(headers),
                ],
            )
            .unwrap_err();
            assert!(err.reason.contains(why), "{headers:?}: {err}");
        }
        let ok = map_row(
            &mapping,
            &[
                Some(b"e1"),
                Some(b"o"),
                Some(b"1"),
                Some(b"c"),
                Some(b"{}"),
                Some(b"null"),
            ],
        );
        assert!(ok.is_ok(), "JSON null means no headers");
    }

    #[test]
    fn a_row_cannot_set_a_header_of_the_broker_or_of_outbox_cdc() {
        let mapping = TableMapping::bind(&MappingConfig::default(), &standard(), false).unwrap();
        for name in [
            "Nats-Rollup",
            "nats-ttl",
            "NATS-EXPECTED-LAST-SEQUENCE",
            "Nats-Batch-Id",
            "Nats-Msg-Id",
            "Outbox-Commit-Lsn",
            "outbox-backfill",
            "OUTBOX-ROW-INDEX",
        ] {
            let headers = format!(r#"{{"trace-id":"abc","{name}":"all"}}"#);
            let err = map_row(
                &mapping,
                &[
                    Some(b"e1"),
                    Some(b"o"),
                    Some(b"1"),
                    Some(b"c"),
                    Some(b"{}"),
                    Some(headers.as_bytes()),
                ],
            )
            .unwrap_err();
            assert!(
                err.reason.contains(&format!("header `{name}`")) && err.reason.contains("reserved"),
                "{name}: {err}"
            );
            assert_eq!(err.event.event_id, "e1");
        }
        assert_eq!(reserved("Nats"), None);
        assert_eq!(reserved("Nats-ish"), None);
        assert_eq!(reserved("Natsy-Rollup"), None);
        assert_eq!(reserved("Outbox"), None);
        assert_eq!(reserved("outboxer"), None);
        assert_eq!(reserved("outbox-"), Some("Outbox-"));
        assert_eq!(reserved("nats-schedule-target"), Some("Nats-"));
        assert_eq!(reserved("NATS-MSG-ID"), Some("Nats-"));
    }

    #[test]
    fn decodes_a_bytea_payload_and_publishes_null_as_empty() {
        let rel = relation(&[("id", 20), ("event_type", TEXT), ("payload", BYTEA_OID)]);
        let config = MappingConfig {
            subject_template: Some("ev.{event_type}".parse().unwrap()),
            ..MappingConfig::default()
        };
        let mapping = TableMapping::bind(&config, &rel, false).unwrap();
        let event = map_row(&mapping, &[Some(b"1"), Some(b"t"), Some(b"\\x00ff10")]).unwrap();
        assert_eq!(&event.payload[..], &[0x00, 0xff, 0x10]);
        let event = map_row(&mapping, &[Some(b"1"), Some(b"t"), None]).unwrap();
        assert!(event.payload.is_empty());
    }

    #[test]
    fn bytea_hex_decoding() {
        assert_eq!(decode_bytea_hex(b"\\x").unwrap(), Vec::<u8>::new());
        assert_eq!(
            decode_bytea_hex(b"\\xDEADbeef").unwrap(),
            [0xde, 0xad, 0xbe, 0xef]
        );
        assert!(decode_bytea_hex(b"\\x0").unwrap_err().contains("odd"));
        assert!(decode_bytea_hex(b"\\xzz").unwrap_err().contains("non-hex"));
        assert!(
            decode_bytea_hex(b"\\001")
                .unwrap_err()
                .contains("hex format")
        );
    }

    #[test]
    fn formats_commit_times_as_rfc3339() {
        assert_eq!(format_pg_timestamp(0), "2000-01-01T00:00:00Z");
        assert_eq!(format_pg_timestamp(1_500_000), "2000-01-01T00:00:01.5Z");
        assert_eq!(format_pg_timestamp(-1_000_000), "1999-12-31T23:59:59Z");
    }

    fn cloudevents(mode: CloudEventsMode) -> MappingConfig {
        MappingConfig {
            cloudevents: Some(CloudEventsConfig {
                mode,
                source: None,
                database: "app".into(),
                type_template: None,
                subject_column: None,
            }),
            ..MappingConfig::default()
        }
    }

    const ROW: [Option<&[u8]>; 6] = [
        Some(b"6f1c"),
        Some(b"order"),
        Some(b"42"),
        Some(b"paid"),
        Some(br#"{"total":10}"#),
        Some(br#"{"ce-type":"overridden","trace-id":"abc"}"#),
    ];

    #[test]
    fn cloudevents_binary_mode_puts_the_attributes_in_headers() {
        let mapping =
            TableMapping::bind(&cloudevents(CloudEventsMode::Binary), &standard(), false).unwrap();
        let event = map_row(&mapping, &ROW).unwrap();
        assert_eq!(header(&event, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&event, "ce-id"), Some("6f1c"));
        assert_eq!(
            header(&event, "ce-source"),
            Some("/outbox-cdc/app/public.outbox")
        );
        assert_eq!(
            header(&event, "ce-type"),
            Some("paid"),
            "the event type wins"
        );
        assert_eq!(header(&event, "ce-subject"), Some("42"));
        assert_eq!(header(&event, "ce-time"), Some("2000-01-01T00:00:00Z"));
        assert_eq!(header(&event, "content-type"), Some("application/json"));
        assert_eq!(header(&event, "trace-id"), Some("abc"));
        assert_eq!(
            &event.payload[..],
            br#"{"total":10}"#,
            "the body is the payload"
        );

        let config = MappingConfig {
            cloudevents: Some(CloudEventsConfig {
                source: Some("urn:shop".into()),
                type_template: Some("com.shop.{aggregate_type}.{event_type}".parse().unwrap()),
                subject_column: Some("id".into()),
                ..cloudevents(CloudEventsMode::Binary).cloudevents.unwrap()
            }),
            ..MappingConfig::default()
        };
        let event = map_row(
            &TableMapping::bind(&config, &standard(), false).unwrap(),
            &ROW,
        )
        .unwrap();
        assert_eq!(header(&event, "ce-source"), Some("urn:shop"));
        assert_eq!(header(&event, "ce-type"), Some("com.shop.order.paid"));
        assert_eq!(header(&event, "ce-subject"), Some("6f1c"));
        let missing = MappingConfig {
            cloudevents: Some(CloudEventsConfig {
                subject_column: Some("tenant".into()),
                ..cloudevents(CloudEventsMode::Binary).cloudevents.unwrap()
            }),
            ..MappingConfig::default()
        };
        let err = TableMapping::bind(&missing, &standard(), false).unwrap_err();
        assert!(
            err.to_string().contains("--cloudevents-subject-column"),
            "{err}"
        );
    }

    #[test]
    fn cloudevents_structured_mode_puts_the_event_in_the_body() {
        let mapping = TableMapping::bind(
            &cloudevents(CloudEventsMode::Structured),
            &standard(),
            false,
        )
        .unwrap();
        let event = map_row(&mapping, &ROW).unwrap();
        assert_eq!(
            header(&event, "content-type"),
            Some("application/cloudevents+json; charset=utf-8")
        );
        let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "specversion": "1.0", "id": "6f1c", "source": "/outbox-cdc/app/public.outbox",
                "type": "paid", "time": "2000-01-01T00:00:00Z", "subject": "42",
                "datacontenttype": "application/json", "data": {"total": 10}
            })
        );
        assert_eq!(header(&event, "Nats-Msg-Id"), Some("6f1c"), "ids as ever");
        // Bytes go base64; a backfilled row has no commit time.
        let rel = relation(&[("id", TEXT), ("event_type", TEXT), ("payload", 17)]);
        let config = MappingConfig {
            subject_template: Some("ev.{event_type}".parse().unwrap()),
            ..cloudevents(CloudEventsMode::Structured)
        };
        let mapping = TableMapping::bind(&config, &rel, false).unwrap();
        let row: Vec<Option<String>> =
            vec![Some("1".into()), Some("t".into()), Some("\\x00ff".into())];
        let event = mapping
            .map(&row[..], &TransactionContext::backfill(), 0)
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
        assert_eq!(body["data_base64"], "AP8=");
        assert_eq!(body["datacontenttype"], "application/octet-stream");
        assert_eq!(body.get("time"), None);
        assert_eq!(body["type"], "t");
    }
}
