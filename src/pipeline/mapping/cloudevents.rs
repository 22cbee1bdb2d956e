//! CloudEvents (`--cloudevents binary|structured`), as the NATS protocol binding of CloudEvents
//! 1.0 lays them out, so that Knative, Dapr, Debezium's outbox router and the CloudEvents SDKs
//! read the events as they are.
//!
//! - **binary**: the body stays the row's payload; the attributes are headers — `ce-specversion`
//!   (`1.0`), `ce-id` (the event id), `ce-source`, `ce-type`, `ce-time` (the commit time; none
//!   for a backfilled row), `ce-subject` (the aggregate id, when there is one) — and
//!   `content-type` is the data's (`application/json` for json/jsonb and for text that is JSON,
//!   `application/octet-stream` for bytea, `text/plain` otherwise). Values outside printable ASCII, space, `"` and `%` are
//!   percent-encoded, as the binding prescribes.
//! - **structured**: the body is the event in the JSON event format (`data` the payload's JSON,
//!   or `data_base64` for bytes), `content-type: application/cloudevents+json`.
//!
//! outbox-cdc's own headers (`Nats-Msg-Id`, `Outbox-…`) and the row's stay as they are; the
//! attributes win over a row header of the same name.

use async_nats::header::{HeaderMap, HeaderValue};
use bytes::Bytes;

use super::row::{RowValues, utf8};
use super::template::{BoundTemplate, Template};
use super::{MissingColumn, TransactionContext};
use crate::event::OutboxEvent;
use crate::source::pgoutput::Relation;

/// How events carry their CloudEvents attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudEventsMode {
    Binary,
    Structured,
}

/// `--cloudevents` and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventsConfig {
    pub mode: CloudEventsMode,
    /// `ce-source`; by default `/outbox-cdc/<database>/<schema.table>`.
    pub source: Option<String>,
    /// The database's name, for the default source.
    pub database: String,
    /// `ce-type`; by default the `event_type` column, else `<schema.table>`.
    pub type_template: Option<Template>,
    /// `ce-subject`; by default the `aggregate_id` column when the table has one.
    pub subject_column: Option<String>,
}

/// PostgreSQL's type OIDs for json, jsonb and bytea.
const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;
const BYTEA_OID: u32 = 17;

/// The settings bound to one table.
#[derive(Debug, Clone)]
pub(super) struct BoundCloudEvents {
    mode: CloudEventsMode,
    source: String,
    kind: EventType,
    subject: Option<usize>,
    data: Data,
}

#[derive(Debug, Clone)]
enum EventType {
    Template(BoundTemplate),
    Fixed(String),
}

/// What the payload column holds: JSON (json, jsonb), bytes (bytea), or text — which is
/// JSON when it parses as JSON (a text column holding JSON, a message's object member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    Json,
    Bytes,
    Text,
}

impl Data {
    /// What this payload is.
    fn of(self, payload: &[u8]) -> Data {
        match self {
            Data::Text if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() => {
                Data::Json
            }
            data => data,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Data::Json => "application/json",
            Data::Bytes => "application/octet-stream",
            Data::Text => "text/plain; charset=utf-8",
        }
    }
}

impl BoundCloudEvents {
    pub(super) fn bind(
        config: &CloudEventsConfig,
        relation: &Relation,
        payload: usize,
    ) -> Result<BoundCloudEvents, MissingColumn> {
        let table = relation.qualified_name();
        let kind = match &config.type_template {
            Some(template) => EventType::Template(template.bind(relation, "--cloudevents-type")?),
            None if relation.column_index("event_type").is_some() => EventType::Template(
                "{event_type}"
                    .parse::<Template>()
                    .map_err(|_| MissingColumn::new(relation, "event_type", "--cloudevents-type"))?
                    .bind(relation, "--cloudevents-type")?,
            ),
            None => EventType::Fixed(table.clone()),
        };
        let subject = match &config.subject_column {
            Some(column) => Some(relation.column_index(column).ok_or_else(|| {
                MissingColumn::new(relation, column, "--cloudevents-subject-column")
            })?),
            None => relation.column_index("aggregate_id"),
        };
        let data = match relation.columns[payload].type_oid {
            JSON_OID | JSONB_OID => Data::Json,
            BYTEA_OID => Data::Bytes,
            _ => Data::Text,
        };
        Ok(BoundCloudEvents {
            mode: config.mode,
            source: config
                .source
                .clone()
                .unwrap_or_else(|| format!("/outbox-cdc/{}/{table}", config.database)),
            kind,
            subject,
            data,
        })
    }

    /// Lays `event` out as a CloudEvent; why not, when an attribute cannot be made.
    pub(super) fn apply<R: RowValues + ?Sized>(
        &self,
        event: &mut OutboxEvent,
        row: &R,
        txn: &TransactionContext,
    ) -> Result<(), String> {
        let kind = match &self.kind {
            EventType::Template(template) => template.render(row, "CloudEvents type")?,
            EventType::Fixed(kind) => kind.clone(),
        };
        let subject = match self.subject {
            Some(index) => row
                .text(index)?
                .map(|text| utf8(text, "the CloudEvents subject column"))
                .transpose()?,
            None => None,
        };
        let time = txn.commit_time_text();
        let data = self.data.of(&event.payload);
        match self.mode {
            CloudEventsMode::Binary => {
                let headers = &mut event.headers;
                insert(headers, "ce-specversion", "1.0");
                insert(headers, "ce-id", event.id.as_str());
                insert(headers, "ce-source", &self.source);
                insert(headers, "ce-type", &kind);
                if let Some(time) = time {
                    insert(headers, "ce-time", time);
                }
                if let Some(subject) = subject {
                    insert(headers, "ce-subject", subject);
                }
                headers.insert("content-type", data.content_type());
            }
            CloudEventsMode::Structured => {
                let mut envelope = serde_json::Map::new();
                let mut put = |key: &str, value: &str| {
                    envelope.insert(key.to_owned(), serde_json::Value::from(value));
                };
                put("specversion", "1.0");
                put("id", event.id.as_str());
                put("source", &self.source);
                put("type", &kind);
                if let Some(time) = time {
                    put("time", time);
                }
                if let Some(subject) = subject {
                    put("subject", subject);
                }
                put("datacontenttype", data.content_type());
                let payload = &event.payload;
                let (key, data) = match data {
                    Data::Json if payload.is_empty() => ("data", serde_json::Value::Null),
                    Data::Json => (
                        "data",
                        serde_json::from_slice(payload)
                            .map_err(|e| format!("the payload is not JSON: {e}"))?,
                    ),
                    Data::Text => (
                        "data",
                        serde_json::Value::from(utf8(payload, "the payload")?),
                    ),
                    Data::Bytes => ("data_base64", serde_json::Value::from(base64(payload))),
                };
                envelope.insert(key.to_owned(), data);
                event.payload = Bytes::from(serde_json::Value::Object(envelope).to_string());
                event.headers.insert(
                    "content-type",
                    "application/cloudevents+json; charset=utf-8",
                );
            }
        }
        Ok(())
    }
}

/// A `ce-` attribute header, its value encoded as the binding says.
fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    headers.insert(name, HeaderValue::from(percent_encode(value).as_ref()));
}

/// The binding's header value encoding: space, `"`, `%` and anything outside printable ASCII
/// as `%XX` of its UTF-8 bytes.
fn percent_encode(value: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%';
    if value.bytes().all(plain) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Standard base64 with padding (RFC 4648), for `data_base64`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_header_values_and_bytes_as_the_binding_says() {
        assert_eq!(percent_encode("order.paid"), "order.paid");
        assert_eq!(percent_encode("a b\"%é"), "a%20b%22%25%C3%A9");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0xff, 0x00, 0x10, 0x20]), "/wAQIA==");
    }
}
