//! Event ids: the id column's text, or `<commit LSN>:<row index>` without one; qualified by the
//! table when the publication has several.

use std::str::FromStr;

use async_nats::header::HeaderValue;

use super::row::RowValues;
use super::{MissingColumn, TransactionContext};
use crate::lsn::Lsn;
use crate::source::pgoutput::Relation;

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
                relation
                    .column_index(name)
                    .ok_or_else(|| MissingColumn::new(relation, name, "--id-column"))?,
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
    pub fn of<R: RowValues + ?Sized>(
        &self,
        row: &R,
        txn: &TransactionContext,
        row_index: u32,
    ) -> Result<HeaderValue, String> {
        let id = match &self.column {
            Some((index, name)) => match row.text(*index)? {
                Some(id) => std::str::from_utf8(id)
                    .map_err(|_| format!("the id column `{name}` is not valid UTF-8"))?,
                None => return Err(format!("the id column `{name}` is NULL")),
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

    pub(super) fn qualified(&self, id: &str) -> HeaderValue {
        match &self.prefix {
            Some(prefix) => HeaderValue::from(format!("{prefix}{id}")),
            None => HeaderValue::from(id),
        }
    }
}

/// The id used when the table has no id column: stable across replays of the same WAL.
pub(super) fn fallback_id(commit_lsn: Lsn, row_index: u32) -> String {
    format!("{commit_lsn}:{row_index}")
}
