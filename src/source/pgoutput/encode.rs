//! pgoutput messages as PostgreSQL sends them.

/// A Relation message.
pub fn relation(id: u32, namespace: &str, name: &str, columns: &[(&str, u32)]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&id.to_be_bytes());
    for s in [namespace, name] {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    out.push(b'd');
    out.extend_from_slice(&(columns.len() as u16).to_be_bytes());
    for (name, oid) in columns {
        out.push(0);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(&oid.to_be_bytes());
        out.extend_from_slice(&(-1i32).to_be_bytes());
    }
    out
}

/// An Insert message whose values are text (`Some`) or NULL (`None`).
pub fn insert(relation_id: u32, values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&relation_id.to_be_bytes());
    out.push(b'N');
    out.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for value in values {
        match value {
            None => out.push(b'n'),
            Some(v) => {
                out.push(b't');
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}
