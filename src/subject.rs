//! NATS subjects: what a publish subject may be, subject filters as streams list them, and
//! `--subject-map FROM=TO` rewriting.
//!
//! In a filter or in FROM, `*` matches one token and a final `>` one or more. In TO, each `*`
//! takes the token the matching `*` of FROM matched, in order, and a final `>` takes what FROM's
//! `>` matched: `order.*=prod.orders.*` sends `order.created` to `prod.orders.created`. The first
//! rule that matches wins; a subject no rule matches is published unchanged.

use std::fmt;
use std::str::FromStr;

/// A valid publish subject: tokens separated by `.`, none empty, no whitespace or control
/// characters, no wildcards.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the subject is empty".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the subject contains whitespace or control characters".into());
    }
    if subject.contains(['*', '>']) {
        return Err("the subject contains a wildcard (`*` or `>`)".into());
    }
    if subject.split('.').any(str::is_empty) {
        return Err("the subject has an empty token (a leading, trailing or double `.`)".into());
    }
    Ok(())
}

/// The rules, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectMap {
    rules: Vec<SubjectRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRule {
    from: Vec<Token>,
    to: Vec<Token>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: one token.
    One,
    /// `>`: one or more tokens, last only.
    Rest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --subject-map `{rule}`: {reason}")]
pub struct SubjectRuleError {
    rule: String,
    reason: String,
}

impl FromStr for SubjectRule {
    type Err = SubjectRuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| SubjectRuleError {
            rule: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (from, to) = text
            .split_once('=')
            .ok_or_else(|| fail("expected FROM=TO, e.g. order.*=prod.orders.*"))?;
        let from = tokens(from.trim()).map_err(|r| fail(&format!("FROM: {r}")))?;
        let to = tokens(to.trim()).map_err(|r| fail(&format!("TO: {r}")))?;
        let stars = |t: &[Token]| t.iter().filter(|t| **t == Token::One).count();
        if stars(&to) > stars(&from) {
            return Err(fail(
                "TO has more `*` than FROM, so some have nothing to take",
            ));
        }
        if to.last() == Some(&Token::Rest) && from.last() != Some(&Token::Rest) {
            return Err(fail("TO ends in `>` but FROM does not"));
        }
        Ok(SubjectRule {
            from,
            to,
            text: text.to_owned(),
        })
    }
}

fn tokens(pattern: &str) -> Result<Vec<Token>, String> {
    if pattern.is_empty() {
        return Err("empty".into());
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".into());
    }
    let parts: Vec<&str> = pattern.split('.').collect();
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "" => Err("has an empty token (a leading, trailing or double `.`)".into()),
            "*" => Ok(Token::One),
            ">" if i + 1 == parts.len() => Ok(Token::Rest),
            ">" => Err("`>` may only be the last token".into()),
            literal if literal.contains(['*', '>']) => {
                Err(format!("`{literal}`: a wildcard must be a whole token"))
            }
            literal => Ok(Token::Literal(literal.to_owned())),
        })
        .collect()
}

impl SubjectRule {
    /// The rewritten subject, when `subject` matches FROM.
    fn apply(&self, subject: &str) -> Option<String> {
        let mut captured: Vec<&str> = Vec::new();
        let mut rest: Option<&str> = None;
        let mut remaining = subject;
        for token in &self.from {
            if *token == Token::Rest {
                if remaining.is_empty() {
                    return None;
                }
                rest = Some(remaining);
                remaining = "";
                break;
            }
            if remaining.is_empty() {
                return None;
            }
            let (head, tail) = remaining.split_once('.').unwrap_or((remaining, ""));
            match token {
                Token::Literal(literal) if literal != head => return None,
                Token::Literal(_) => {}
                Token::One => captured.push(head),
                Token::Rest => unreachable!("handled above"),
            }
            remaining = tail;
        }
        if !remaining.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(subject.len() + 16);
        let mut stars = captured.iter();
        for (i, token) in self.to.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match token {
                Token::Literal(literal) => out.push_str(literal),
                Token::One => out.push_str(stars.next().copied().unwrap_or_default()),
                Token::Rest => out.push_str(rest.unwrap_or_default()),
            }
        }
        Some(out)
    }

    /// TO as a subject filter: every subject this rule can produce.
    fn filter(&self) -> Vec<Token> {
        self.to.clone()
    }
}

impl SubjectMap {
    pub fn new(rules: Vec<SubjectRule>) -> Self {
        SubjectMap { rules }
    }

    /// The subject the first matching rule makes of `subject`; None when no rule matches.
    pub fn apply(&self, subject: &str) -> Option<String> {
        self.rules.iter().find_map(|rule| rule.apply(subject))
    }

    /// Filters that capture everything published: `unmapped` (what the template produces, for
    /// subjects no rule matches) and each rule's TO, without filters another one already covers
    /// (a stream may not list overlapping subjects).
    pub fn capture_filters(&self, unmapped: &str) -> Vec<String> {
        let mut filters: Vec<Vec<Token>> = Vec::new();
        let candidates = tokens(unmapped)
            .into_iter()
            .chain(self.rules.iter().map(SubjectRule::filter));
        for candidate in candidates {
            if filters.iter().any(|f| covers(f, &candidate)) {
                continue;
            }
            filters.retain(|f| !covers(&candidate, f));
            filters.push(candidate);
        }
        filters.iter().map(|f| render(f)).collect()
    }
}

/// A NATS subject filter (`orders.*`, `outbox.>`), as a stream lists its subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectFilter(Vec<Token>);

impl FromStr for SubjectFilter {
    type Err = String;

    fn from_str(filter: &str) -> Result<Self, Self::Err> {
        tokens(filter).map(SubjectFilter)
    }
}

impl SubjectFilter {
    /// Whether `subject` (a subject to publish on, without wildcards) is captured by the filter.
    pub fn matches(&self, subject: &str) -> bool {
        let mut parts = subject.split('.');
        for token in &self.0 {
            let Some(part) = parts.next() else {
                return false;
            };
            match token {
                Token::Rest => return true,
                Token::One => {}
                Token::Literal(literal) if literal == part => {}
                Token::Literal(_) => return false,
            }
        }
        parts.next().is_none()
    }
}

/// Adds `filter` to `filters` unless one of them covers it already (a stream may not list
/// overlapping subjects); filters it covers are dropped.
pub fn add_capture_filter(filters: &mut Vec<String>, filter: &str) {
    let Ok(candidate) = tokens(filter) else {
        return;
    };
    let parsed: Vec<Vec<Token>> = filters.iter().filter_map(|f| tokens(f).ok()).collect();
    if parsed.iter().any(|f| covers(f, &candidate)) {
        return;
    }
    filters.retain(|f| tokens(f).map_or(true, |f| !covers(&candidate, &f)));
    filters.push(filter.to_owned());
}

/// Whether some subject matches both filters (two streams may not capture the same subject).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (tokens(a), tokens(b)) else {
        return false;
    };
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(Token::Rest), Some(_)) | (Some(_), Some(Token::Rest)) => return true,
            (Some(Token::Literal(x)), Some(Token::Literal(y))) if x != y => return false,
            (Some(_), Some(_)) => {}
            _ => return false,
        }
    }
    true
}

/// Whether every subject `inner` matches is matched by `outer`.
fn covers(outer: &[Token], inner: &[Token]) -> bool {
    for (i, o) in outer.iter().enumerate() {
        match (o, inner.get(i)) {
            (Token::Rest, Some(_)) => return true,
            (_, None) => return false,
            (Token::One, Some(Token::One | Token::Literal(_))) => {}
            (Token::Literal(a), Some(Token::Literal(b))) if a == b => {}
            _ => return false,
        }
    }
    outer.len() == inner.len()
}

fn render(tokens: &[Token]) -> String {
    tokens
        .iter()
        .map(|t| match t {
            Token::Literal(l) => l.as_str(),
            Token::One => "*",
            Token::Rest => ">",
        })
        .collect::<Vec<_>>()
        .join(".")
}

impl fmt::Display for SubjectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::filters_overlap;

    #[test]
    fn filters_overlap_when_a_subject_matches_both() {
        for (a, b, overlap) in [
            ("outbox.>", "outbox.billing.>", true),
            ("outbox.*.created", "outbox.order.*", true),
            ("orders.>", "billing.>", false),
            ("outbox.a", "outbox.a.b", false),
            ("outbox.*", "outbox.a.b", false),
            ("outbox.a", "outbox.a", true),
        ] {
            assert_eq!(filters_overlap(a, b), overlap, "{a} {b}");
            assert_eq!(filters_overlap(b, a), overlap, "{b} {a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(rules: &[&str]) -> SubjectMap {
        SubjectMap::new(rules.iter().map(|r| r.parse().unwrap()).collect())
    }

    #[test]
    fn rewrites_with_single_token_wildcards_in_order() {
        let m = map(&["order.*=prod.orders.*", "a.*.b.*=x.*.*"]);
        assert_eq!(
            m.apply("order.created").as_deref(),
            Some("prod.orders.created")
        );
        assert_eq!(m.apply("a.1.b.2").as_deref(), Some("x.1.2"));
        assert_eq!(m.apply("order.created.v2"), None, "`*` is one token");
        assert_eq!(m.apply("order"), None);
        assert_eq!(m.apply("invoice.paid"), None);
    }

    #[test]
    fn rewrites_tails_with_full_wildcards() {
        let m = map(&["outbox.>=prod.>", "x.*.>=y.*.z.>"]);
        assert_eq!(
            m.apply("outbox.order.created").as_deref(),
            Some("prod.order.created")
        );
        assert_eq!(m.apply("outbox"), None, "`>` needs at least one token");
        assert_eq!(m.apply("x.1.2.3").as_deref(), Some("y.1.z.2.3"));
    }

    #[test]
    fn the_first_matching_rule_wins_and_literals_may_drop_tokens() {
        let m = map(&["order.created=orders.new", "order.*=orders.other"]);
        assert_eq!(m.apply("order.created").as_deref(), Some("orders.new"));
        assert_eq!(m.apply("order.paid").as_deref(), Some("orders.other"));
    }

    #[test]
    fn rejects_malformed_rules() {
        for (rule, needle) in [
            ("order.*", "expected FROM=TO"),
            ("order.*=prod.*.*", "more `*`"),
            ("order.*=prod.>", "TO ends in `>`"),
            ("order.>.x=y", "`>` may only be the last"),
            ("ord*=x", "whole token"),
            ("a..b=c", "empty token"),
            ("a b=c", "whitespace"),
            ("=c", "FROM: empty"),
        ] {
            let err = rule.parse::<SubjectRule>().unwrap_err().to_string();
            assert!(err.contains(needle), "{rule}: {err}");
        }
    }

    #[test]
    fn filters_match_subjects_like_nats_does() {
        let filter = |f: &str| f.parse::<SubjectFilter>().unwrap();
        assert!(filter("outbox.>").matches("outbox.order.created"));
        assert!(filter("outbox.>").matches("outbox.x"));
        assert!(!filter("outbox.>").matches("outbox"), "`>` needs a token");
        assert!(!filter("outbox.>").matches("other.order"));
        assert!(filter("a.*.c").matches("a.b.c"));
        assert!(!filter("a.*.c").matches("a.b.c.d"));
        assert!(!filter("a.*.c").matches("a.b"));
        assert!(filter("a.b").matches("a.b"));
        assert!(!filter("a.b").matches("a.bb"));
        assert!("a..b".parse::<SubjectFilter>().is_err());
    }

    #[test]
    fn capture_filters_cover_mapped_and_unmapped_subjects_without_overlap() {
        let m = map(&["outbox.order.*=prod.orders.*", "outbox.a.*=outbox.b.*"]);
        assert_eq!(m.capture_filters("outbox.>"), ["outbox.>", "prod.orders.*"]);
        let m = map(&["x.*=p.*", "y.>=p.>"]);
        assert_eq!(m.capture_filters("x.*"), ["x.*", "p.>"]);
        let mut filters = vec!["outbox.>".to_owned()];
        add_capture_filter(&mut filters, "outbox.dead");
        assert_eq!(filters, ["outbox.>"]);
        add_capture_filter(&mut filters, "dlq.outbox");
        assert_eq!(filters, ["outbox.>", "dlq.outbox"]);
    }
}
