//! Names PostgreSQL objects must have for outbox-cdc: checked once, when parsed.

use std::fmt;
use std::str::FromStr;

/// A replication slot name: PostgreSQL allows lowercase letters, digits and underscores.
/// (`pgwire-replication` does not quote it in `START_REPLICATION`, so this check also keeps the
/// command well-formed.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotName(String);

impl FromStr for SlotName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(SlotName(s.to_owned()))
        } else {
            Err(format!(
                "invalid slot name `{s}`: use 1 to 63 lowercase letters, digits and underscores"
            ))
        }
    }
}

impl SlotName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A publication name (the replication command takes a comma-separated list, so no commas).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicationName(String);

impl FromStr for PublicationName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 63 || s.contains([',', '\0']) {
            Err(format!(
                "invalid publication name `{s}`: 1 to 63 characters, no commas"
            ))
        } else {
            Ok(PublicationName(s.to_owned()))
        }
    }
}

impl PublicationName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_plain_identifiers() {
        assert!("outbox_cdc_1".parse::<SlotName>().is_ok());
        for bad in ["", "Outbox", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            let err = bad.parse::<SlotName>().unwrap_err();
            assert!(err.contains("invalid slot name"), "{bad}");
        }
    }

    #[test]
    fn publication_names_cannot_hold_commas() {
        assert!("outbox_pub".parse::<PublicationName>().is_ok());
        assert!("a,b".parse::<PublicationName>().is_err());
        assert!("".parse::<PublicationName>().is_err());
    }
}
