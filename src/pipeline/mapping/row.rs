//! One row's values as the mapping reads them, whatever they were read from.

use bytes::Bytes;

use crate::source::pgoutput::{ColumnValue, Tuple};

/// One row's values, as the mapping reads them: column by column, in its relation's column
/// order, in PostgreSQL's text format. Rows from the WAL ([`WalRow`]), rows read from the
/// table with SQL (`[Option<String>]`: backfill, verify) and the members of a logical decoding
/// message ([`crate::pipeline::messages`]) are each one, so each is decoded once and mapped by the same
/// code.
pub trait RowValues {
    /// The text of column `index`, None when it is NULL; why it cannot be read otherwise.
    fn text(&self, index: usize) -> Result<Option<&[u8]>, String>;
    /// Part of the row's text, as [`RowValues::text`] returned it, as a message body: a slice
    /// of the row's own buffer where it has one, no copy.
    fn body(&self, text: &[u8]) -> Bytes;
}

/// A row as pgoutput sends it: an Insert's tuple, borrowing from its frame.
#[derive(Debug, Clone, Copy)]
pub struct WalRow<'a> {
    pub tuple: Tuple<'a>,
    pub frame: &'a Bytes,
}

impl RowValues for WalRow<'_> {
    fn text(&self, index: usize) -> Result<Option<&[u8]>, String> {
        match self.tuple.values().nth(index) {
            Some(Ok(ColumnValue::Text(text))) => Ok(Some(text)),
            Some(Ok(ColumnValue::Null)) => Ok(None),
            Some(Ok(ColumnValue::Unchanged)) => Err(format!(
                "column {index} is an unchanged TOAST value, which an insert never carries"
            )),
            Some(Ok(ColumnValue::Binary(_))) => Err(format!(
                "column {index} is in binary format, which outbox-cdc never asks for"
            )),
            Some(Err(err)) => Err(err.to_string()),
            None => Err(format!(
                "the row has {} columns, column {index} is missing",
                self.tuple.len()
            )),
        }
    }

    fn body(&self, text: &[u8]) -> Bytes {
        self.frame.slice_ref(text)
    }
}

/// A row read with SQL, each value as text (None: NULL).
impl RowValues for [Option<String>] {
    fn text(&self, index: usize) -> Result<Option<&[u8]>, String> {
        self.get(index)
            .map(|value| value.as_deref().map(str::as_bytes))
            .ok_or_else(|| {
                format!(
                    "the row has {} columns, column {index} is missing",
                    self.len()
                )
            })
    }

    fn body(&self, text: &[u8]) -> Bytes {
        Bytes::copy_from_slice(text)
    }
}

/// `bytes` as text, or an error naming `what`.
pub fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{what} is not valid UTF-8"))
}
