//! Decoder for the pgoutput logical replication protocol, version 1.
//!
//! `pgwire-replication` already turns Begin and Commit into events of their own; every other
//! pgoutput message reaches us as the raw bytes of an XLogData frame, decoded here. Only what the
//! outbox needs is decoded in full (Relation, Insert); the rest is recognised and skipped.
//! Insert column values borrow from the frame: decoding allocates nothing.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

use std::fmt;

/// One decoded pgoutput message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Relation(Relation),
    Insert(Insert<'a>),
    /// A message the outbox does not act on (update, delete, truncate, type, origin, …).
    Skipped(SkippedKind),
}

/// Messages that are recognised and deliberately not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkippedKind {
    Update,
    Delete,
    Truncate,
    Type,
    Origin,
    LogicalMessage,
    /// A tag this decoder does not know (a newer protocol version, for instance).
    Unknown(u8),
}

impl SkippedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SkippedKind::Update => "update",
            SkippedKind::Delete => "delete",
            SkippedKind::Truncate => "truncate",
            SkippedKind::Type => "type",
            SkippedKind::Origin => "origin",
            SkippedKind::LogicalMessage => "logical_message",
            SkippedKind::Unknown(_) => "unknown",
        }
    }
}

/// The schema of a published table, sent before its first change in each session and again after
/// every schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// `schema.table`, as in the `Outbox-Table` header.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_str()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    pub name: String,
    pub type_oid: u32,
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
}

/// An inserted row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insert<'a> {
    pub relation_id: u32,
    pub tuple: Tuple<'a>,
}

/// A row's column values, decoded lazily, in the relation's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    column_count: u16,
    data: &'a [u8],
}

/// One column value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnValue<'a> {
    Null,
    /// An unchanged TOASTed value; pgoutput only sends it in updates, never in inserts.
    Unchanged,
    /// The value in PostgreSQL's text output format.
    Text(&'a [u8]),
    /// The value in binary format (only with the `binary` option, which we do not use).
    Binary(&'a [u8]),
}

impl<'a> Tuple<'a> {
    pub fn len(&self) -> usize {
        usize::from(self.column_count)
    }

    pub fn is_empty(&self) -> bool {
        self.column_count == 0
    }

    /// The column values in order; an error when the data is truncated or malformed.
    pub fn values(&self) -> TupleValues<'a> {
        TupleValues {
            remaining: self.column_count,
            data: self.data,
        }
    }
}

pub struct TupleValues<'a> {
    remaining: u16,
    data: &'a [u8],
}

impl<'a> Iterator for TupleValues<'a> {
    type Item = Result<ColumnValue<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let mut reader = Reader::new(self.data);
        let value = (|| {
            let value = match reader.u8("column kind")? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::Unchanged,
                b't' => ColumnValue::Text(reader.length_prefixed("text value")?),
                b'b' => ColumnValue::Binary(reader.length_prefixed("binary value")?),
                other => {
                    return Err(DecodeError::new(format!(
                        "unknown column kind {other:#04x}"
                    )));
                }
            };
            Ok(value)
        })();
        match value {
            Ok(value) => {
                self.data = reader.rest();
                Some(Ok(value))
            }
            Err(err) => {
                self.remaining = 0;
                Some(Err(err))
            }
        }
    }
}

/// A pgoutput message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {reason}")]
pub struct DecodeError {
    reason: String,
}

impl DecodeError {
    fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
    }
}

/// Decodes one pgoutput message (the data of an XLogData frame).
pub fn decode(data: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut reader = Reader::new(data);
    let tag = reader.u8("message tag")?;
    let message = match tag {
        b'R' => Message::Relation(decode_relation(&mut reader)?),
        b'I' => {
            let relation_id = reader.u32("relation id")?;
            match reader.u8("tuple marker")? {
                b'N' => {}
                other => {
                    return Err(DecodeError::new(format!(
                        "insert: expected new-tuple marker 'N', found {other:#04x}"
                    )));
                }
            }
            let column_count = reader.u16("column count")?;
            Message::Insert(Insert {
                relation_id,
                tuple: Tuple {
                    column_count,
                    data: reader.rest(),
                },
            })
        }
        b'U' => Message::Skipped(SkippedKind::Update),
        b'D' => Message::Skipped(SkippedKind::Delete),
        b'T' => Message::Skipped(SkippedKind::Truncate),
        b'Y' => Message::Skipped(SkippedKind::Type),
        b'O' => Message::Skipped(SkippedKind::Origin),
        b'M' => Message::Skipped(SkippedKind::LogicalMessage),
        other => Message::Skipped(SkippedKind::Unknown(other)),
    };
    Ok(message)
}

fn decode_relation(reader: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = reader.u32("relation id")?;
    let namespace = reader.cstring("namespace")?;
    let name = reader.cstring("relation name")?;
    let _replica_identity = reader.u8("replica identity")?;
    let column_count = reader.u16("column count")?;
    let mut columns = Vec::with_capacity(usize::from(column_count).min(1600));
    for _ in 0..column_count {
        let flags = reader.u8("column flags")?;
        let name = reader.cstring("column name")?;
        let type_oid = reader.u32("column type")?;
        let _type_modifier = reader.u32("column type modifier")?;
        columns.push(RelationColumn {
            name,
            type_oid,
            flags,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        columns,
    })
}

/// A cursor over big-endian protocol fields that never panics on short input.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn rest(&self) -> &'a [u8] {
        self.data
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::new(format!(
                "truncated {what}: needs {n} bytes, {} left",
                self.data.len()
            )));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn length_prefixed(&mut self, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= i32::MAX as usize)
            .ok_or_else(|| DecodeError::new(format!("{what}: negative length")))?;
        self.take(len, what)
    }

    fn cstring(&mut self, what: &str) -> Result<String, DecodeError> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError::new(format!("{what}: missing NUL terminator")))?;
        let bytes = self.take(end + 1, what)?;
        String::from_utf8(bytes[..end].to_vec())
            .map_err(|_| DecodeError::new(format!("{what}: not valid UTF-8")))
    }
}

impl fmt::Display for SkippedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkippedKind::Unknown(tag) => write!(f, "unknown message {:?}", char::from(*tag)),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Encoders: the bytes PostgreSQL would send. `backfill` maps rows read from the table through
/// them, exactly as rows read from the WAL; tests and benchmarks build messages with them.
pub mod encode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_relation() {
        let bytes = encode::relation(
            16384,
            "public",
            "outbox",
            &[("id", 2950), ("payload", 3802)],
        );
        let Message::Relation(rel) = decode(&bytes).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, 16384);
        assert_eq!(rel.qualified_name(), "public.outbox");
        assert_eq!(rel.column_names(), ["id", "payload"]);
        assert_eq!(rel.columns[1].type_oid, 3802);
        assert_eq!(rel.column_index("payload"), Some(1));
        assert_eq!(rel.column_index("nope"), None);
    }

    #[test]
    fn decodes_an_insert_without_copying() {
        let bytes = encode::insert(7, &[Some(b"abc"), None, Some(b"")]);
        let Message::Insert(insert) = decode(&bytes).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(insert.relation_id, 7);
        assert_eq!(insert.tuple.len(), 3);
        let values: Vec<_> = insert.tuple.values().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            values,
            [
                ColumnValue::Text(b"abc"),
                ColumnValue::Null,
                ColumnValue::Text(b"")
            ]
        );
        let ColumnValue::Text(text) = values[0] else {
            unreachable!()
        };
        let range = bytes.as_ptr_range();
        assert!(
            range.contains(&text.as_ptr()),
            "value borrows from the frame"
        );
    }

    #[test]
    fn decodes_unchanged_and_binary_values() {
        let mut bytes = encode::insert(1, &[]);
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(&2u16.to_be_bytes());
        bytes.push(b'u');
        bytes.push(b'b');
        bytes.extend_from_slice(&2u32.to_be_bytes());
        bytes.extend_from_slice(&[0xde, 0xad]);
        let Message::Insert(insert) = decode(&bytes).unwrap() else {
            panic!()
        };
        let values: Vec<_> = insert.tuple.values().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            values,
            [ColumnValue::Unchanged, ColumnValue::Binary(&[0xde, 0xad])]
        );
    }

    #[test]
    fn skips_changes_the_outbox_does_not_publish() {
        for (tag, kind) in [
            (b'U', SkippedKind::Update),
            (b'D', SkippedKind::Delete),
            (b'T', SkippedKind::Truncate),
            (b'Y', SkippedKind::Type),
            (b'O', SkippedKind::Origin),
            (b'M', SkippedKind::LogicalMessage),
            (b'Z', SkippedKind::Unknown(b'Z')),
        ] {
            assert_eq!(decode(&[tag, 1, 2, 3]).unwrap(), Message::Skipped(kind));
        }
    }

    #[test]
    fn reports_truncation_instead_of_panicking() {
        let full = encode::insert(7, &[Some(b"hello")]);
        for cut in 0..full.len() {
            let result = decode(&full[..cut]).and_then(|m| match m {
                Message::Insert(i) => i.tuple.values().collect::<Result<Vec<_>, _>>().map(|_| ()),
                _ => Ok(()),
            });
            assert!(result.is_err(), "cut at {cut} must be an error");
        }
        let rel = encode::relation(1, "s", "t", &[("a", 25)]);
        for cut in 0..rel.len() {
            assert!(decode(&rel[..cut]).is_err(), "relation cut at {cut}");
        }
    }

    #[test]
    fn rejects_a_wrong_tuple_marker_and_column_kind() {
        let mut bytes = encode::insert(7, &[Some(b"x")]);
        bytes[5] = b'O';
        assert!(
            decode(&bytes)
                .unwrap_err()
                .to_string()
                .contains("new-tuple marker")
        );

        let mut bytes = encode::insert(7, &[Some(b"x")]);
        bytes[8] = b'?';
        let Message::Insert(insert) = decode(&bytes).unwrap() else {
            panic!()
        };
        let err = insert.tuple.values().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("unknown column kind"));
    }

    #[test]
    fn rejects_a_negative_length() {
        let mut bytes = encode::insert(7, &[Some(b"x")]);
        bytes[9..13].copy_from_slice(&(-5i32).to_be_bytes());
        let Message::Insert(insert) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert!(insert.tuple.values().next().unwrap().is_err());
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(Message::Insert(insert)) = decode(&bytes) {
                    for value in insert.tuple.values() {
                        let _ = value;
                    }
                }
            }

            #[test]
            fn never_panics_on_tagged_bytes(tag in prop::sample::select(vec![b'R', b'I']),
                                            rest in proptest::collection::vec(any::<u8>(), 0..128)) {
                let mut bytes = vec![tag];
                bytes.extend(rest);
                if let Ok(Message::Insert(insert)) = decode(&bytes) {
                    for value in insert.tuple.values() {
                        let _ = value;
                    }
                }
            }

            #[test]
            fn round_trips_text_inserts(values in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)), 0..16)) {
                let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
                let bytes = encode::insert(42, &refs);
                let Ok(Message::Insert(insert)) = decode(&bytes) else { panic!("not an insert") };
                let decoded: Vec<_> = insert.tuple.values().collect::<Result<_, _>>().unwrap();
                prop_assert_eq!(decoded.len(), refs.len());
                for (d, v) in decoded.iter().zip(&refs) {
                    match (d, v) {
                        (ColumnValue::Null, None) => {}
                        (ColumnValue::Text(t), Some(v)) => prop_assert_eq!(t, v),
                        other => prop_assert!(false, "mismatch {:?}", other),
                    }
                }
            }
        }
    }
}
