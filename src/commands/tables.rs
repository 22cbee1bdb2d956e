//! The config file's per-table sections: several outbox tables of one publication, each mapped
//! its own way, read by one instance from one slot.
//!
//! ```toml
//! [tables."billing.invoice_outbox"]      # or [tables.invoice_outbox]
//! subject_template = "billing.{kind}"
//! id_column = "event_id"
//! payload_column = "body"
//! on_error = "dead-letter"
//! dead_letter_subject = "billing.dead"
//! stream = "BILLING"                    # created like --stream's, for this table's subjects
//! ```
//!
//! A section's keys are the mapping and poison-row flags without dashes; what a section does not
//! set, the flags (and the file's top-level keys) set for it, as for every table without a
//! section. A leaf: it imports no command module but [`super::error`].

use std::str::FromStr;

use serde::Deserialize;

use super::error::ConfigError;
use crate::pipeline::mapping::{CloudEventsConfig, SubjectTemplate, TableSettings, Template};
use crate::pipeline::poison::ErrorPolicy;
use crate::subject::{SubjectMap, SubjectRule, validate_subject};

/// The `[tables.…]` sections of the config file, in the file's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableSections {
    file: String,
    sections: Vec<(String, TableSection)>,
    /// As the file wrote them, for `--print-config`.
    raw: Option<toml::Value>,
}

/// One table's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSection {
    id_column: Option<String>,
    payload_column: Option<String>,
    headers_column: Option<String>,
    subject_column: Option<String>,
    subject_template: Option<String>,
    subject_map: Option<Vec<String>>,
    on_error: Option<String>,
    dead_letter_subject: Option<String>,
    /// A stream of its own, created like `--stream`'s when missing.
    stream: Option<String>,
    cloudevents_type: Option<String>,
    cloudevents_source: Option<String>,
    cloudevents_subject_column: Option<String>,
}

impl TableSections {
    /// The `tables` key of the file `file`, when it has one.
    pub fn parse(file: &str, value: &toml::Value) -> Result<TableSections, ConfigError> {
        let invalid = |key: String, detail: String| ConfigError::InvalidValue {
            file: file.to_owned(),
            key,
            detail,
        };
        let toml::Value::Table(tables) = value else {
            return Err(invalid(
                "tables".into(),
                "must be sections, `[tables.\"schema.table\"]`".into(),
            ));
        };
        let mut sections = Vec::with_capacity(tables.len());
        for (name, keys) in tables {
            let section = TableSection::deserialize(keys.clone())
                .map_err(|e| invalid(format!("tables.{name}"), e.to_string()))?;
            sections.push((name.clone(), section));
        }
        Ok(TableSections {
            file: file.to_owned(),
            sections,
            raw: Some(value.clone()),
        })
    }

    /// The sections as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let mut table = toml::Table::new();
        if let Some(raw) = &self.raw {
            table.insert("tables".to_owned(), raw.clone());
        }
        toml::to_string(&table).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Each named table's settings: `base` (the flags') with its section's keys.
    pub fn settings(
        &self,
        base: &TableSettings,
    ) -> Result<Vec<(String, TableSettings)>, ConfigError> {
        self.sections
            .iter()
            .map(|(name, section)| {
                let settings =
                    section
                        .apply(base)
                        .map_err(|(key, detail)| ConfigError::InvalidValue {
                            file: self.file.clone(),
                            key: format!("tables.{name}.{key}"),
                            detail,
                        })?;
                Ok((name.clone(), settings))
            })
            .collect()
    }

    /// Each named table's own stream, where its section names one.
    pub fn streams(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sections.iter().filter_map(|(name, section)| {
            section
                .stream
                .as_deref()
                .map(|stream| (name.as_str(), stream))
        })
    }

    /// Each named table's id column, where its section sets one.
    pub fn id_columns(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sections.iter().filter_map(|(name, section)| {
            section
                .id_column
                .as_deref()
                .map(|column| (name.as_str(), column))
        })
    }
}

impl TableSection {
    /// `base` with this section's keys; (key, why) when one is wrong.
    fn apply(&self, base: &TableSettings) -> Result<TableSettings, (&'static str, String)> {
        let mut settings = base.clone();
        let mapping = &mut settings.mapping;
        if let Some(column) = &self.id_column {
            mapping.id_column = Some(column.clone());
        }
        if let Some(column) = &self.payload_column {
            mapping.payload_column = column.clone();
        }
        if let Some(column) = &self.headers_column {
            mapping.headers_column = Some(column.clone());
        }
        if let Some(column) = &self.subject_column {
            mapping.subject_column = Some(column.clone());
            // As for the flags: with a subject column, a template is only what the section
            // gives as the fallback.
            mapping.subject_template = None;
        }
        if let Some(template) = &self.subject_template {
            mapping.subject_template = Some(
                SubjectTemplate::from_str(template)
                    .map_err(|e| ("subject_template", e.to_string()))?,
            );
        }
        if let Some(rules) = &self.subject_map {
            let rules = rules
                .iter()
                .map(|rule| SubjectRule::from_str(rule))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ("subject_map", e.to_string()))?;
            mapping.subject_map = SubjectMap::new(rules);
        }
        if self.cloudevents_type.is_some()
            || self.cloudevents_source.is_some()
            || self.cloudevents_subject_column.is_some()
        {
            let Some(cloudevents) = &mut mapping.cloudevents else {
                return Err((
                    "cloudevents_type",
                    "CloudEvents settings need --cloudevents".into(),
                ));
            };
            apply_cloudevents(self, cloudevents)?;
        }
        let dead_letter = match (&self.dead_letter_subject, &base.on_error) {
            (Some(subject), _) => Some(subject.clone()),
            (None, ErrorPolicy::DeadLetter { subject }) => Some(subject.clone()),
            (None, ErrorPolicy::Fail) => None,
        };
        settings.on_error = match (self.on_error.as_deref(), dead_letter) {
            (None, _) if matches!(base.on_error, ErrorPolicy::Fail) => ErrorPolicy::Fail,
            (Some("fail"), _) => ErrorPolicy::Fail,
            (None | Some("dead-letter"), Some(subject)) => {
                validate_subject(&subject).map_err(|reason| ("dead_letter_subject", reason))?;
                ErrorPolicy::DeadLetter { subject }
            }
            (Some("dead-letter"), None) => {
                return Err((
                    "on_error",
                    "`dead-letter` needs a dead_letter_subject (in the section or as a flag)"
                        .into(),
                ));
            }
            (Some(other), _) => {
                return Err((
                    "on_error",
                    format!("`{other}` is neither `fail` nor `dead-letter`"),
                ));
            }
            (None, None) => ErrorPolicy::Fail,
        };
        Ok(settings)
    }
}

/// Each named table's own stream, as `sink_config` takes them: (table, stream).
pub fn table_streams(sections: &TableSections) -> Vec<(String, String)> {
    sections
        .streams()
        .map(|(table, stream)| (table.to_owned(), stream.to_owned()))
        .collect()
}

fn apply_cloudevents(
    section: &TableSection,
    cloudevents: &mut CloudEventsConfig,
) -> Result<(), (&'static str, String)> {
    if let Some(template) = &section.cloudevents_type {
        cloudevents.type_template =
            Some(Template::from_str(template).map_err(|e| ("cloudevents_type", e.to_string()))?);
    }
    if let Some(source) = &section.cloudevents_source {
        cloudevents.source = Some(source.clone());
    }
    if let Some(column) = &section.cloudevents_subject_column {
        cloudevents.subject_column = Some(column.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::mapping::MappingConfig;

    fn sections(text: &str) -> Result<TableSections, ConfigError> {
        let table: toml::Table = text.parse().unwrap();
        TableSections::parse("f.toml", &table["tables"])
    }

    #[test]
    fn a_section_overrides_the_flags_for_its_table_only() {
        let base = TableSettings {
            mapping: MappingConfig {
                payload_column: "body".into(),
                ..MappingConfig::default()
            },
            on_error: ErrorPolicy::DeadLetter {
                subject: "dead".into(),
            },
        };
        let parsed = sections(
            r#"
            [tables."billing.invoices"]
            subject_template = "billing.{kind}"
            id_column = "event_id"
            on_error = "fail"

            [tables.shipments]
            subject_column = "topic"
            headers_column = "meta"
            "#,
        )
        .unwrap();
        let settings = parsed.settings(&base).unwrap();
        let (name, invoices) = &settings[0];
        assert_eq!(name, "billing.invoices");
        assert_eq!(
            invoices
                .mapping
                .subject_template
                .as_ref()
                .map(|t| t.as_str()),
            Some("billing.{kind}")
        );
        assert_eq!(invoices.mapping.id_column.as_deref(), Some("event_id"));
        assert_eq!(invoices.mapping.payload_column, "body", "inherited");
        assert_eq!(invoices.on_error, ErrorPolicy::Fail);
        let (_, shipments) = &settings[1];
        assert_eq!(shipments.mapping.subject_column.as_deref(), Some("topic"));
        assert_eq!(shipments.mapping.subject_template, None);
        assert_eq!(shipments.on_error, base.on_error, "inherited");
        assert_eq!(
            parsed.id_columns().collect::<Vec<_>>(),
            [("billing.invoices", "event_id")]
        );
    }

    #[test]
    fn a_wrong_key_or_value_is_named() {
        let base = TableSettings::default();
        for (text, needle) in [
            (
                "[tables.t]\nsubject_tempalte = \"x\"",
                "unknown field `subject_tempalte`",
            ),
            (
                "[tables.t]\nsubject_template = \"a b.{x}\"",
                "tables.t.subject_template",
            ),
            (
                "[tables.t]\non_error = \"dead-letter\"",
                "needs a dead_letter_subject",
            ),
            (
                "[tables.t]\non_error = \"ignore\"",
                "neither `fail` nor `dead-letter`",
            ),
            ("[tables.t]\ncloudevents_type = \"x\"", "need --cloudevents"),
            ("tables = 3", "must be sections"),
        ] {
            let err = match sections(text) {
                Ok(parsed) => parsed.settings(&base).unwrap_err(),
                Err(err) => err,
            };
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}
