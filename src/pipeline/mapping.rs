//! Outbox row → JetStream message: subject, headers, body, event id.
//!
//! The user points the tool at their own table: which column holds the event id, the payload,
//! optional headers and the subject. [`MappingConfig`] is that choice; [`TableMapping`] is it
//! bound to one table's columns (from its pgoutput Relation message), checked once so that mapping
//! a row is only a few lookups.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_nats::Subject;
use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

use crate::event::{EventRef, OutboxEvent, header};
use crate::lsn::Lsn;
use crate::source::pgoutput::{ColumnValue, Relation, Tuple};
use crate::subject::{SubjectMap, validate_subject};

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
        }
    }
}

pub const DEFAULT_SUBJECT_TEMPLATE: &str = "outbox.{aggregate_type}.{event_type}";

/// A subject with `{column}` placeholders, such as `outbox.{aggregate_type}.{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Column(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject template `{template}`: {reason}")]
pub struct TemplateError {
    template: String,
    reason: String,
}

impl FromStr for SubjectTemplate {
    type Err = TemplateError;

    fn from_str(template: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(err("`}` without `{`")),
                Some(open) => {
                    if open > 0 {
                        segments.push(Segment::Literal(rest[..open].to_owned()));
                    }
                    let after = &rest[open + 1..];
                    let close = after.find('}').ok_or_else(|| err("`{` without `}`"))?;
                    let name = &after[..close];
                    if name.is_empty() || name.contains('{') {
                        return Err(err("a placeholder must name a column, like `{event_type}`"));
                    }
                    segments.push(Segment::Column(name.to_owned()));
                    rest = &after[close + 1..];
                }
                None => {
                    segments.push(Segment::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if segments.is_empty() {
            return Err(err("it is empty"));
        }
        let literal: String = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Column(_) => "x",
            })
            .collect();
        if let Err(reason) = validate_subject(&literal) {
            return Err(err(&reason));
        }
        Ok(SubjectTemplate {
            source: template.to_owned(),
            segments,
        })
    }
}

impl SubjectTemplate {
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The columns the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Column(c) => Some(c.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// The NATS subject filter that captures every subject this template can produce: each token
    /// with a placeholder becomes `*`, or the rest becomes `>` when a placeholder value could add
    /// tokens of its own.
    pub fn capture_filter(&self) -> String {
        let rendered: String = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Column(_) => "\u{0}",
            })
            .collect();
        let mut tokens = Vec::new();
        for token in rendered.split('.') {
            if token.contains('\u{0}') {
                tokens.push(">");
                break;
            }
            tokens.push(token);
        }
        tokens.join(".")
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
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
    template: Option<Vec<BoundSegment>>,
    subject_map: SubjectMap,
}

#[derive(Debug, Clone)]
enum BoundSegment {
    Literal(String),
    Column { index: usize, name: String },
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
            relation.column_index(column).ok_or_else(|| MissingColumn {
                table: table.clone(),
                column: column.to_owned(),
                flag,
                available: relation
                    .column_names()
                    .into_iter()
                    .map(String::from)
                    .collect(),
            })
        };
        let ids = EventIds::bind(config.id_column.as_deref(), relation, qualify_ids)?;
        let payload = find(&config.payload_column, "--payload-column")?;
        let headers = match &config.headers_column {
            Some(column) => Some((find(column, "--headers-column")?, column.clone())),
            None => relation
                .column_index("headers")
                .map(|i| (i, "headers".to_owned())),
        };
        let subject_column = match &config.subject_column {
            Some(column) => Some((find(column, "--subject-column")?, column.clone())),
            None => None,
        };
        let template = config
            .subject_template
            .as_ref()
            .map(|template| {
                template
                    .segments
                    .iter()
                    .map(|segment| {
                        Ok(match segment {
                            Segment::Literal(l) => BoundSegment::Literal(l.clone()),
                            Segment::Column(name) => BoundSegment::Column {
                                index: find(name, "--subject-template")?,
                                name: name.clone(),
                            },
                        })
                    })
                    .collect::<Result<Vec<_>, MissingColumn>>()
            })
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
        })
    }

    /// `schema.table`.
    pub fn table(&self) -> &Arc<str> {
        &self.table
    }

    /// Maps one inserted row. `frame` is the XLogData buffer the tuple borrows from, so that a text
    /// payload becomes a slice of it rather than a copy.
    pub fn map(
        &self,
        tuple: &Tuple<'_>,
        frame: &Bytes,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<OutboxEvent, UnmappableRow> {
        let event_id = self
            .event_id(tuple, txn, row_index)
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

        let subject = self.subject(tuple).map_err(|reason| fail(None, reason))?;
        let subject = self.subject_map.apply(&subject).unwrap_or(subject);
        if let Err(reason) = validate_subject(&subject) {
            return Err(fail(Some(subject), reason));
        }

        let mut headers = HeaderMap::new();
        if let Some((index, name)) = &self.headers {
            match column(tuple, *index) {
                Ok(ColumnValue::Text(json)) => {
                    if let Err(reason) = copy_json_headers(json, name, &mut headers) {
                        return Err(fail(Some(subject), reason));
                    }
                }
                Ok(_) => {}
                Err(reason) => return Err(fail(Some(subject), reason)),
            }
        }
        // The tool's own headers win over user headers of the same name.
        // Names from `from_static`: inserting them allocates no copy of the name.
        headers.insert(HeaderName::from_static(header::MSG_ID), event_id.clone());
        txn.insert_headers(&mut headers, row_index);
        headers.insert(
            HeaderName::from_static(header::TABLE),
            self.table_header.clone(),
        );

        let payload = match column(tuple, self.payload) {
            Ok(ColumnValue::Text(text)) if self.payload_is_bytea => match decode_bytea_hex(text) {
                Ok(bytes) => Bytes::from(bytes),
                Err(reason) => return Err(fail(Some(subject), reason)),
            },
            Ok(ColumnValue::Text(text)) => frame.slice_ref(text),
            // A NULL payload is published as an empty body (documented in the README).
            Ok(_) => Bytes::new(),
            Err(reason) => return Err(fail(Some(subject), reason)),
        };

        Ok(OutboxEvent {
            subject: Subject::from(subject),
            headers,
            payload,
            id: event_id,
        })
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

    fn event_id(
        &self,
        tuple: &Tuple<'_>,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<HeaderValue, String> {
        self.ids.of(tuple, txn, row_index)
    }

    fn qualified(&self, id: &str) -> HeaderValue {
        self.ids.qualified(id)
    }

    /// The row's body as best it can be read, for a dead letter: empty when it cannot be.
    pub fn raw_payload(&self, tuple: &Tuple<'_>, frame: &Bytes) -> Bytes {
        match column(tuple, self.payload) {
            Ok(ColumnValue::Text(text)) if self.payload_is_bytea => decode_bytea_hex(text)
                .map(Bytes::from)
                .unwrap_or_else(|_| frame.slice_ref(text)),
            Ok(ColumnValue::Text(text)) => frame.slice_ref(text),
            _ => Bytes::new(),
        }
    }

    fn subject(&self, tuple: &Tuple<'_>) -> Result<String, String> {
        if let Some((index, _)) = &self.subject_column
            && let ColumnValue::Text(subject) = column(tuple, *index)?
        {
            return utf8(subject, "the subject column").map(str::to_owned);
        }
        let Some(template) = &self.template else {
            let name = self.subject_column.as_ref().map_or("", |(_, name)| name);
            return Err(format!(
                "the subject column `{name}` is NULL and no --subject-template is set to fall back on"
            ));
        };
        let mut subject = String::with_capacity(64);
        for segment in template {
            match segment {
                BoundSegment::Literal(l) => subject.push_str(l),
                BoundSegment::Column { index, name } => match column(tuple, *index)? {
                    ColumnValue::Text(value) => subject.push_str(utf8(value, name)?),
                    _ => {
                        return Err(format!(
                            "subject placeholder `{{{name}}}` is NULL (template `{}`)",
                            self.template_source()
                        ));
                    }
                },
            }
        }
        Ok(subject)
    }

    fn template_source(&self) -> String {
        self.template
            .iter()
            .flatten()
            .map(|s| match s {
                BoundSegment::Literal(l) => l.clone(),
                BoundSegment::Column { name, .. } => format!("{{{name}}}"),
            })
            .collect()
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

/// How a table's rows get their event ids.
#[derive(Debug, Clone)]
pub struct EventIds {
    /// The event id's column, with its name.
    column: Option<(usize, String)>,
    /// `schema.table:`, put before every event id when the publication has more than one table,
    /// so that two tables' ids cannot collide in JetStream's de-duplication.
    prefix: Option<String>,
}

impl EventIds {
    /// `column` (by default `id` when the table has it) of `relation`; with `qualify`, ids are
    /// `schema.table:<id>`.
    pub fn bind(
        column: Option<&str>,
        relation: &Relation,
        qualify: bool,
    ) -> Result<EventIds, MissingColumn> {
        let column = match column {
            Some(name) => Some((
                relation.column_index(name).ok_or_else(|| MissingColumn {
                    table: relation.qualified_name(),
                    column: name.to_owned(),
                    flag: "--id-column",
                    available: relation
                        .column_names()
                        .into_iter()
                        .map(String::from)
                        .collect(),
                })?,
                name.to_owned(),
            )),
            None => relation.column_index("id").map(|i| (i, "id".to_owned())),
        };
        Ok(EventIds {
            column,
            prefix: qualify.then(|| format!("{}:", relation.qualified_name())),
        })
    }

    /// The event id: the id column's text, or without one `<commit LSN>:<row index>` (the same
    /// for every replay of the WAL); qualified by the table when the publication has several.
    pub fn of(
        &self,
        tuple: &Tuple<'_>,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<HeaderValue, String> {
        let id = match &self.column {
            Some((index, name)) => match column(tuple, *index)? {
                ColumnValue::Text(id) => std::str::from_utf8(id)
                    .map_err(|_| format!("the id column `{name}` is not valid UTF-8"))?,
                _ => return Err(format!("the id column `{name}` is NULL")),
            },
            None if txn.is_wal() => {
                return Ok(self.qualified(&fallback_id(txn.commit_lsn, row_index)));
            }
            None => {
                return Err(
                    "the table has no id column, and ids made of the commit LSN cannot be made \
                     again from the table: give --id-column"
                        .into(),
                );
            }
        };
        let id = match &self.prefix {
            Some(prefix) => HeaderValue::from_str(&format!("{prefix}{id}")),
            None => HeaderValue::from_str(id),
        };
        id.map_err(|_| "the id is not a valid header value (it contains a line break)".into())
    }

    fn qualified(&self, id: &str) -> HeaderValue {
        match &self.prefix {
            Some(prefix) => HeaderValue::from(format!("{prefix}{id}")),
            None => HeaderValue::from(id),
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

    fn is_wal(&self) -> bool {
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

/// PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
fn pg_timestamp_to_system_time(micros: i64) -> std::time::SystemTime {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let epoch = std::time::UNIX_EPOCH + std::time::Duration::from_secs(PG_EPOCH_UNIX_SECS);
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

/// The id used when the table has no id column: stable across replays of the same WAL.
fn fallback_id(commit_lsn: Lsn, row_index: u32) -> String {
    format!("{commit_lsn}:{row_index}")
}

fn column<'a>(tuple: &Tuple<'a>, index: usize) -> Result<ColumnValue<'a>, String> {
    match tuple.values().nth(index) {
        Some(Ok(ColumnValue::Unchanged)) => Err(format!(
            "column {index} is an unchanged TOAST value, which an insert never carries"
        )),
        Some(Ok(value)) => Ok(value),
        Some(Err(err)) => Err(err.to_string()),
        None => Err(format!(
            "the row has {} columns, column {index} is missing",
            tuple.len()
        )),
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{what} is not valid UTF-8"))
}

fn copy_json_headers(json: &[u8], column: &str, headers: &mut HeaderMap) -> Result<(), String> {
    let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(json) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(serde_json::Value::Null) => return Ok(()),
        Ok(other) => {
            return Err(format!(
                "headers column `{column}` must hold a JSON object, found {}",
                json_kind(&other)
            ));
        }
        Err(e) => return Err(format!("headers column `{column}` is not valid JSON: {e}")),
    };
    for (name, value) in object {
        let header_name = HeaderName::try_from(name.as_str()).map_err(|_| {
            format!(
                "header name `{name}` is not allowed by NATS (control characters, non-ASCII or `:`)"
            )
        })?;
        let text = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let header_value = HeaderValue::from_str(&text)
            .map_err(|_| format!("header `{name}` has a value with a line break"))?;
        headers.insert(header_name, header_value);
    }
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
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

/// PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

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
        mapping.map(&insert.tuple, &frame, &txn, 3)
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
                Some(br#"{"trace-id":"abc","attempt":2,"Nats-Msg-Id":"spoof"}"#),
            ],
        )
        .unwrap();
        assert_eq!(event.subject.as_str(), "outbox.order.created");
        assert_eq!(&event.payload[..], br#"{"total":10}"#);
        assert_eq!(header(&event, "Nats-Msg-Id"), Some("6f1c"));
        assert_eq!(header(&event, "trace-id"), Some("abc"));
        assert_eq!(header(&event, "attempt"), Some("2"));
        assert_eq!(header(&event, "Outbox-Commit-Lsn"), Some("0/16B3748"));
        assert_eq!(header(&event, "Outbox-Table"), Some("public.outbox"));
        assert_eq!(
            header(&event, "Outbox-Commit-Time"),
            Some("2000-01-01T00:00:00Z")
        );
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
    fn subject_templates_parse_and_capture() {
        let t: SubjectTemplate = "outbox.{aggregate_type}.{event_type}".parse().unwrap();
        assert_eq!(
            t.columns().collect::<Vec<_>>(),
            ["aggregate_type", "event_type"]
        );
        assert_eq!(t.capture_filter(), "outbox.>");
        let t: SubjectTemplate = "static.subject".parse().unwrap();
        assert_eq!(t.capture_filter(), "static.subject");
        assert_eq!(t.columns().count(), 0);
        for bad in [
            "", "a.{", "a.}", "a.{}", "a b.{x}", "a.*.{x}", ".{x}", "{x}..y",
        ] {
            assert!(bad.parse::<SubjectTemplate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_commit_times_as_rfc3339() {
        assert_eq!(format_pg_timestamp(0), "2000-01-01T00:00:00Z");
        assert_eq!(format_pg_timestamp(1_500_000), "2000-01-01T00:00:01.5Z");
        assert_eq!(format_pg_timestamp(-1_000_000), "1999-12-31T23:59:59Z");
    }
}
