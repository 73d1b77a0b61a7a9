//! Label and field selectors, parsed once per request.
//!
//! Label grammar as kube-apiserver accepts it: `k=v`, `k==v`, `k!=v`,
//! `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, joined by commas.

use std::collections::BTreeMap;

use super::status::ApiError;
use super::store::Object;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_terms(text)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_term(term)?);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object with these labels is selected; `get` looks one up.
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, ApiError> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(bad(text, "unbalanced parentheses"));
        }
    }
    if depth != 0 {
        return Err(bad(text, "unbalanced parentheses"));
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn parse_term(term: &str) -> Result<Requirement, ApiError> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(term, key)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key_of(term, k)?, value_of(term, v)?));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key_of(term, k)?, value_of(term, v)?));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((k, rest)) = term.split_once(op) {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| bad(term, "expected a parenthesised set of values"))?;
            let values = inner
                .split(',')
                .map(|v| value_of(term, v))
                .collect::<Result<Vec<_>, _>>()?;
            let key = key_of(term, k)?;
            return Ok(if notin {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    Ok(Requirement::Exists(key_of(term, term)?))
}

fn key_of(term: &str, key: &str) -> Result<String, ApiError> {
    let key = key.trim();
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(key.to_string())
    } else {
        Err(bad(term, "invalid label key"))
    }
}

fn value_of(term: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid
        .then(|| value.to_string())
        .ok_or_else(|| bad(term, "invalid label value"))
}

fn bad(selector: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement {selector:?}: {why}"))
}

/// Field selectors: weft's clients (and kubectl) use `metadata.name` and
/// `metadata.namespace`; anything else is refused as the real server refuses
/// unsupported fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(BTreeMap<String, (bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut fields = BTreeMap::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, negated, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {term:?}: expected field=value"
                )));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            fields.insert(field.to_string(), (negated, value.trim().to_string()));
        }
        Ok(FieldSelector(fields))
    }

    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        self.0.iter().all(|(field, (negated, value))| {
            let actual = if field == "metadata.name" {
                name
            } else {
                namespace
            };
            (actual == value) != *negated
        })
    }
}

/// Whether a stored object (`id` is its namespace and name) is selected
/// by both selectors.
pub fn matches(
    id: &(String, String),
    object: &Object,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> bool {
    labels.matches(|k| object.label(k)) && fields.matches(&id.0, &id.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(json!({"app": "echo", "version": "v1", "weft.io/multicluster": "true"}));
        let m = |s: &str| {
            LabelSelector::parse(s)
                .unwrap()
                .matches(|k| l.get(k).and_then(Value::as_str))
        };
        assert!(m(""));
        assert!(m("app=echo"));
        assert!(m("app==echo"));
        assert!(!m("app=other"));
        assert!(m("app!=other"));
        assert!(m("version in (v1, v2)"));
        assert!(!m("version notin (v1,v2)"));
        assert!(m("version notin (v3)"));
        assert!(m("weft.io/multicluster=true,app"));
        assert!(m("!missing"));
        assert!(!m("missing"));
        assert!(!m("app=echo,missing in (x)"));
        assert!(m("missing notin (x)"));
        assert!(!LabelSelector::parse("app=echo").unwrap().matches(|_| None));
    }

    #[test]
    fn label_selector_garbage_is_a_400() {
        for bad in ["app in (a", "a b=c", "app in a,b", "=x", "app=a b"] {
            let err = LabelSelector::parse(bad).unwrap_err();
            assert_eq!(err.code, 400, "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let f = FieldSelector::parse("metadata.name=echo,metadata.namespace!=kube-system").unwrap();
        assert!(f.matches("demo", "echo"));
        assert!(!f.matches("kube-system", "echo"));
        assert!(!f.matches("demo", "other"));
        assert_eq!(
            FieldSelector::parse("spec.nodeName=x").unwrap_err().code,
            400
        );
    }
}
