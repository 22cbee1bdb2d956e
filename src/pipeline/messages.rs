//! The table-less outbox: events a service emits into the WAL with
//! `pg_logical_emit_message(true, '<prefix>', <JSON object>)` inside its transaction — no row, no
//! vacuum, no clean-up job; the event exists only if the transaction commits.
//!
//! With `--message-prefix PREFIX`, a transactional message with that prefix is published like an
//! outbox row, in its place in commit order. Its content is a JSON object whose members play the
//! columns: the mapping flags mean the same (`--subject-template`'s `{aggregate_type}` reads the
//! member `aggregate_type`, `--payload-column` names the member holding the body, and so on). A
//! member holding a string is the column's text; any other value is its JSON text; a missing
//! member is NULL. The event id is the `--id-column` member when that flag is given, else
//! `<commit LSN>:<row index>`: unique, and the same whenever the WAL is read again. The event's
//! `Outbox-Table` is `message.<prefix>`.
//!
//! Messages emitted outside a transaction (`pg_logical_emit_message(false, …)`) are sent even
//! when the transaction aborts: they are skipped and counted, never published. Content that is
//! not a JSON object is a poison row (`--on-error`).

use super::mapping::{MappingConfig, TableMapping};
use crate::source::pgoutput::{Relation, RelationColumn};

/// PostgreSQL's type OID for `text`: every member is handed over as text.
const TEXT_OID: u32 = 25;

/// The namespace of the synthetic relation: `Outbox-Table` reads `message.<prefix>`.
const NAMESPACE: &str = "message";

/// One prefix's mapping, bound to the columns the mapping flags name.
#[derive(Debug, Clone)]
pub struct MessageMapping {
    pub prefix: String,
    /// The members the mapping reads, in the order of the synthetic relation's columns.
    members: Vec<String>,
    pub mapping: TableMapping,
}

impl MessageMapping {
    /// Binds `config` to the members it names. `qualify_ids` as for tables.
    pub fn bind(
        config: &MappingConfig,
        prefix: &str,
        qualify_ids: bool,
    ) -> Result<MessageMapping, super::mapping::MissingColumn> {
        let mut names: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        };
        if let Some(id) = &config.id_column {
            add(id);
        }
        add(&config.payload_column);
        add(config.headers_column.as_deref().unwrap_or("headers"));
        if let Some(subject) = &config.subject_column {
            add(subject);
        }
        if let Some(template) = &config.subject_template {
            template.columns().for_each(&mut add);
        }
        let relation = Relation {
            id: 0,
            namespace: NAMESPACE.to_owned(),
            name: prefix.to_owned(),
            columns: names
                .iter()
                .map(|name| RelationColumn {
                    name: name.clone(),
                    type_oid: TEXT_OID,
                    flags: 0,
                })
                .collect(),
        };
        let mapping = TableMapping::bind(config, &relation, qualify_ids)?;
        Ok(MessageMapping {
            prefix: prefix.to_owned(),
            members: names,
            mapping,
        })
    }

    /// The message's content as a row of the members the mapping reads (see
    /// [`super::mapping::RowValues`]); why not, when the content is not a JSON object.
    pub fn row(&self, content: &[u8]) -> Result<Vec<Option<String>>, String> {
        let object = match serde_json::from_slice::<serde_json::Value>(content) {
            Ok(serde_json::Value::Object(object)) => object,
            Ok(_) => return Err("the message's content is not a JSON object".into()),
            Err(e) => return Err(format!("the message's content is not JSON: {e}")),
        };
        Ok(self
            .members
            .iter()
            .map(|member| match object.get(member) {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(other) => Some(other.to_string()),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::mapping::TransactionContext;

    #[test]
    fn members_play_the_columns() {
        let mapping = MessageMapping::bind(&MappingConfig::default(), "outbox", false).unwrap();
        let row = mapping
            .row(
                br#"{"aggregate_type":"order","event_type":"paid","payload":{"total":10},
                     "headers":{"trace-id":"abc"},"extra":1}"#,
            )
            .unwrap();
        let txn = TransactionContext::new("0/10".parse().unwrap(), 0);
        let event = mapping.mapping.map(&row[..], &txn, 2).unwrap();
        assert_eq!(event.subject.as_str(), "outbox.order.paid");
        assert_eq!(&event.payload[..], br#"{"total":10}"#);
        assert_eq!(
            event.id.as_str(),
            "0/10:2",
            "no --id-column: commit LSN and row index"
        );
        let header = |name: &str| event.headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(header("trace-id").as_deref(), Some("abc"));
        assert_eq!(header("Outbox-Table").as_deref(), Some("message.outbox"));

        for (bad, why) in [(&b"[1]"[..], "not a JSON object"), (b"{nope", "not JSON")] {
            assert!(mapping.row(bad).unwrap_err().contains(why));
        }
        let missing = mapping
            .row(br#"{"event_type":"paid","payload":1}"#)
            .unwrap();
        let err = mapping.mapping.map(&missing[..], &txn, 0).unwrap_err();
        assert!(err.reason.contains("`{aggregate_type}` is NULL"), "{err}");
    }
}
