//! The documents cannot drift from the code: every error message outbox-cdc can print has its
//! entry in docs/troubleshooting.md (found by the message's opening words, read from the
//! `#[error(...)]` attributes in `src/`), and every link in README.md, docs/ and deploy/ to a
//! document of this repository, and to a heading in it, resolves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The text of every `#[error(...)]` attribute in `path` that is not `transparent`.
fn error_attributes(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[error(") {
        let body = &rest[at + "#[error(".len()..];
        let (mut depth, mut in_string, mut escaped, mut end) = (1, false, false, 0);
        for (i, c) in body.char_indices() {
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let attribute = body[..end].trim();
        if attribute != "transparent" {
            found.push(attribute.to_owned());
        }
        rest = &body[end..];
    }
    found
}

/// The message's first string literal, line continuations joined.
fn message_literal(attribute: &str) -> Option<String> {
    let start = attribute.find('"')? + 1;
    let mut text = String::new();
    let mut chars = attribute[start..].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(text),
            '\\' => match chars.next() {
                Some('\n') => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                Some(escaped) => text.push(escaped),
                None => return None,
            },
            c => text.push(c),
        }
    }
    None
}

/// The words a person would search the document for: the first run of three or more words
/// between placeholders and backticks (at most eight of them), else the longest run.
fn key_phrase(message: &str) -> Option<String> {
    let mut runs = Vec::new();
    let mut run = String::new();
    let mut depth = 0;
    for c in message.chars() {
        match c {
            '{' => {
                depth += 1;
                runs.push(std::mem::take(&mut run));
            }
            '}' => depth -= 1,
            '`' if depth == 0 => runs.push(std::mem::take(&mut run)),
            c if depth == 0 => run.push(c),
            _ => {}
        }
    }
    runs.push(run);
    let trim = |words: &[&str]| {
        words
            .join(" ")
            .trim_matches(|c: char| " .,;:(".contains(c))
            .to_owned()
    };
    for run in &runs {
        let words: Vec<&str> = run.split_whitespace().collect();
        if words.len() >= 3 {
            return Some(trim(&words[..words.len().min(8)]));
        }
    }
    let longest = runs.iter().max_by_key(|r| r.trim().len())?;
    let words: Vec<&str> = longest.split_whitespace().collect();
    let phrase = trim(&words);
    (!phrase.is_empty()).then_some(phrase)
}

fn normalise(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[test]
fn every_error_message_has_an_entry_in_troubleshooting() {
    let doc = std::fs::read_to_string(root().join("docs/troubleshooting.md")).expect("read");
    let doc = normalise(&doc);
    let mut sources = Vec::new();
    files_under(&root().join("src"), &mut sources);
    let mut checked = 0;
    let mut missing = Vec::new();
    for path in sources
        .iter()
        .filter(|p| p.extension() == Some("rs".as_ref()))
    {
        let text = std::fs::read_to_string(path).expect("read source");
        for attribute in error_attributes(&text) {
            let Some(message) = message_literal(&attribute) else {
                panic!("{}: no message in #[error({attribute})]", path.display());
            };
            let Some(phrase) = key_phrase(&message) else {
                continue; // all placeholders: `{}`, `{context}: {detail}`
            };
            checked += 1;
            if !doc.contains(&normalise(&phrase)) {
                let file = path.strip_prefix(root()).unwrap_or(path);
                missing.push(format!(
                    "{}: `{phrase}` (from \"{message}\")",
                    file.display()
                ));
            }
        }
    }
    assert!(checked > 60, "only {checked} error messages found in src/");
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md has no entry for:\n{}",
        missing.join("\n")
    );
    assert!(
        doc.contains("## exit codes"),
        "docs/troubleshooting.md: exit codes"
    );
    for code in ["| 0 |", "| 1 |", "| 2 |"] {
        assert!(doc.contains(code), "docs/troubleshooting.md: exit {code}");
    }
}

#[test]
fn key_phrases_are_the_opening_words_between_placeholders() {
    assert_eq!(
        key_phrase("replication slot `{slot}` is in use by another connection (pid {})").as_deref(),
        Some("is in use by another connection (pid")
    );
    assert_eq!(
        key_phrase("the NATS connection was lost").as_deref(),
        Some("the NATS connection was lost")
    );
    assert_eq!(
        key_phrase("invalid --nats-url `{redacted}`: {reason}").as_deref(),
        Some("invalid --nats-url")
    );
    assert_eq!(key_phrase("{context}: {detail}"), None);
    assert_eq!(
        message_literal("\n    \"a \\\n     b {x:?}\",\n    x = 1").as_deref(),
        Some("a b {x:?}")
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped except `-` and `_`, spaces
/// as `-`; a repeated anchor gets `-1`, `-2`, ….
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        if in_code {
            continue;
        }
        let title = heading.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        anchors.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    anchors
}

/// Links to this repository's documents: `[text](target)` in Markdown, and in any file a
/// path naming README.md or a document under docs/ (as the alert rules' annotations do).
/// Returns (the file the target is relative to, target).
fn links(file: &Path, text: &str) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let base = file.parent().expect("a directory").to_path_buf();
    if file.extension() == Some("md".as_ref()) {
        for (at, _) in text.match_indices("](") {
            let target: String = text[at + 2..].chars().take_while(|&c| c != ')').collect();
            if !target.contains("://") && !target.starts_with("mailto:") {
                found.push((base.clone(), target));
            }
        }
    }
    for prefix in ["README.md", "docs/"] {
        for (at, _) in text.match_indices(prefix) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '/' || c == '.' || c == '(') {
                continue; // part of a longer path, or a Markdown link read above
            }
            let target: String = text[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || "-_./#".contains(*c))
                .collect();
            let target = target.trim_end_matches('.').to_owned();
            if target.contains(".md") {
                found.push((root(), target));
            }
        }
    }
    found
}

#[test]
fn links_to_documents_and_their_headings_resolve() {
    let mut files = vec![root().join("README.md")];
    files_under(&root().join("docs"), &mut files);
    files_under(&root().join("deploy"), &mut files);
    files_under(&root().join("examples"), &mut files);
    let mut checked = 0;
    let mut broken = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (base, target) in links(file, &text) {
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                base.join(path)
            };
            checked += 1;
            let name = file.strip_prefix(root()).unwrap_or(file).display();
            if !resolved.exists() {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor
                && resolved.extension() == Some("md".as_ref())
            {
                let doc = std::fs::read_to_string(&resolved).expect("read");
                if !anchors(&doc).contains(anchor) {
                    broken.push(format!("{name}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_are_githubs() {
    let doc = "# Title\n## It stops at a gap\n```\n# not a heading\n```\n### `--accept-gap`, once\n## It stops at a gap\n";
    let found = anchors(doc);
    for anchor in [
        "title",
        "it-stops-at-a-gap",
        "--accept-gap-once",
        "it-stops-at-a-gap-1",
    ] {
        assert!(found.contains(anchor), "{anchor} in {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
}

/// docs/messages.md lists the header names a row may not set as the code has them.
#[test]
fn messages_lists_the_reserved_header_names() {
    use outbox_cdc::pipeline::mapping::{RESERVED_NATS_WORDS, reserved};
    let doc = std::fs::read_to_string(root().join("docs/messages.md")).expect("read");
    let section = doc
        .split("## Headers a row may not set")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the section");
    let (list, passing) = section
        .split_once("Names that only begin")
        .expect("the names that pass");
    for word in RESERVED_NATS_WORDS {
        assert!(
            list.contains(&format!("`Nats-{word}`")),
            "`Nats-{word}` is not listed"
        );
    }
    let quoted = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.to_lowercase().starts_with("nats-") || s.starts_with("Outbox"))
            .filter(|s| *s != "Nats-") // the prefix itself, named in the sentence
            .map(str::to_owned)
            .collect()
    };
    for name in quoted(list) {
        assert!(
            reserved(&name).is_some(),
            "{name} is listed but not reserved"
        );
    }
    for name in quoted(passing) {
        assert!(reserved(&name).is_none(), "{name} passes in the document");
    }
}
