//! A row's own headers (the headers column, or a message's `headers` member): a JSON object whose
//! members become NATS headers — except the names JetStream and outbox-cdc give meaning to.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};

/// Adds the members of `json`, a JSON object (or null: none), to `headers`. `origin` says where
/// it came from in errors (`headers column `headers``); a name JetStream or outbox-cdc gives
/// meaning to ([`reserved`]) is refused, as are names and values NATS cannot carry.
pub fn copy_header_object(
    json: &[u8],
    origin: &str,
    headers: &mut HeaderMap,
) -> Result<(), String> {
    let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(json) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(serde_json::Value::Null) => return Ok(()),
        Ok(other) => {
            return Err(format!(
                "{origin} must hold a JSON object, found {}",
                json_kind(&other)
            ));
        }
        Err(e) => return Err(format!("{origin} is not valid JSON: {e}")),
    };
    for (name, value) in object {
        if let Some(owner) = reserved(&name) {
            return Err(format!(
                "header `{name}` in {origin} is reserved: `{owner}` names belong \
                 to {} (a row cannot steer them); rename it",
                if owner == "Nats-" {
                    "the broker (JetStream directives such as Nats-Rollup, Nats-TTL, Nats-Expected-*)"
                } else {
                    "outbox-cdc (the event's position and origin)"
                }
            ));
        }
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

/// Header names a row cannot set, compared without case: outbox-cdc's own (`Outbox-…`), and
/// JetStream's — `Nats-` followed by a word NATS gives meaning to (`Nats-Rollup`, `Nats-TTL`,
/// `Nats-Expected-…`, `Nats-Batch-…`, `Nats-Schedule…`, `Nats-Msg-Id`, …: every family
/// nats-server 2.15 and the NATS clients use). A name that only starts with the same letters
/// (`Nats-ish`, `outboxer`) is the row's own.
pub fn reserved(name: &str) -> Option<&'static str> {
    const OUTBOX: &str = "Outbox-";
    const NATS: &str = "Nats-";
    let starts = |prefix: &str| {
        name.len() >= prefix.len()
            && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    if starts(OUTBOX) {
        return Some(OUTBOX);
    }
    if starts(NATS) {
        let word = name[NATS.len()..].split('-').next().unwrap_or_default();
        if RESERVED_NATS_WORDS
            .iter()
            .any(|w| w.eq_ignore_ascii_case(word))
        {
            return Some(NATS);
        }
    }
    None
}

/// The words after `Nats-` that make a header name JetStream's (see [`reserved`]).
pub const RESERVED_NATS_WORDS: [&str; 24] = [
    "Msg",
    "Expected",
    "Rollup",
    "TTL",
    "Marker",
    "Batch",
    "Schedule",
    "Scheduler",
    "Required",
    "Incr",
    "Counter",
    "Trace",
    "Stream",
    "Sequence",
    "Time",
    "Subject",
    "Last",
    "Num",
    "Pending",
    "Pin",
    "Service",
    "Consumer",
    "Domain",
    "Api",
];

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
