//! Text with `{column}` placeholders filled from a row: the subject (`--subject-template`,
//! checked to make a valid NATS subject) and the CloudEvents type (`--cloudevents-type`).

use std::fmt;
use std::str::FromStr;

use super::MissingColumn;
use super::row::{RowValues, utf8};
use crate::source::pgoutput::Relation;
use crate::subject::validate_subject;

pub const DEFAULT_SUBJECT_TEMPLATE: &str = "outbox.{aggregate_type}.{event_type}";

/// Text with `{column}` placeholders, such as `{aggregate_type}.{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Column(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{template}`: {reason}")]
pub struct TemplateError {
    kind: &'static str,
    template: String,
    reason: String,
}

impl FromStr for Template {
    type Err = TemplateError;

    fn from_str(template: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| TemplateError {
            kind: "template",
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
        Ok(Template {
            source: template.to_owned(),
            segments,
        })
    }
}

impl Template {
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

    /// Binds the template to `relation`'s columns; `flag` names the setting in an error.
    pub fn bind(
        &self,
        relation: &Relation,
        flag: &'static str,
    ) -> Result<BoundTemplate, MissingColumn> {
        let segments = self
            .segments
            .iter()
            .map(|segment| {
                Ok(match segment {
                    Segment::Literal(l) => BoundSegment::Literal(l.clone()),
                    Segment::Column(name) => BoundSegment::Column {
                        index: relation
                            .column_index(name)
                            .ok_or_else(|| MissingColumn::new(relation, name, flag))?,
                        name: name.clone(),
                    },
                })
            })
            .collect::<Result<Vec<_>, MissingColumn>>()?;
        Ok(BoundTemplate {
            source: self.source.clone(),
            segments,
        })
    }

    /// The template with every placeholder replaced by `fill`.
    fn with_placeholders(&self, fill: &str) -> String {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Column(_) => fill,
            })
            .collect()
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A template bound to one table's columns.
#[derive(Debug, Clone)]
pub struct BoundTemplate {
    source: String,
    segments: Vec<BoundSegment>,
}

#[derive(Debug, Clone)]
enum BoundSegment {
    Literal(String),
    Column { index: usize, name: String },
}

impl BoundTemplate {
    /// The text for `row`; an error naming the placeholder when its column is NULL.
    pub fn render<R: RowValues + ?Sized>(&self, row: &R, what: &str) -> Result<String, String> {
        let mut out = String::with_capacity(64);
        for segment in &self.segments {
            match segment {
                BoundSegment::Literal(l) => out.push_str(l),
                BoundSegment::Column { index, name } => match row.text(*index)? {
                    Some(value) => out.push_str(utf8(value, name)?),
                    None => {
                        return Err(format!(
                            "{what} placeholder `{{{name}}}` is NULL (template `{}`)",
                            self.source
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

/// A subject with `{column}` placeholders, such as `outbox.{aggregate_type}.{event_type}`: a
/// [`Template`] whose text, placeholders filled, is a valid NATS subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate(Template);

impl FromStr for SubjectTemplate {
    type Err = TemplateError;

    fn from_str(template: &str) -> Result<Self, Self::Err> {
        let parsed = Template::from_str(template).map_err(|e| TemplateError {
            kind: "subject template",
            ..e
        })?;
        if let Err(reason) = validate_subject(&parsed.with_placeholders("x")) {
            return Err(TemplateError {
                kind: "subject template",
                template: template.to_owned(),
                reason,
            });
        }
        Ok(SubjectTemplate(parsed))
    }
}

impl std::ops::Deref for SubjectTemplate {
    type Target = Template;

    fn deref(&self) -> &Template {
        &self.0
    }
}

impl SubjectTemplate {
    /// The NATS subject filter that captures every subject this template can produce: each token
    /// with a placeholder becomes `*`, or the rest becomes `>` when a placeholder value could add
    /// tokens of its own.
    pub fn capture_filter(&self) -> String {
        let rendered = self.0.with_placeholders("\u{0}");
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
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Any text is a template; only a subject template must make a subject.
        let t: Template = "com.example {event_type}/v1".parse().unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["event_type"]);
    }
}
