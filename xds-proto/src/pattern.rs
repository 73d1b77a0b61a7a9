//! What a `ValueMatch.regex` on the wire means, in one place: the control
//! plane compiles each pattern with this before it sends it (and refuses it
//! on the object's status when this does), and the proxy compiles it with
//! the same call, so a pattern that reaches a proxy is one it accepts.
//!
//! The engine is `regex-lite`: RE2's syntax less Unicode classes (`\pL`)
//! and Unicode case folding. Its `\d`, `\w`, `\s` and `\b` are ASCII, as
//! RE2's are. It is a small fraction of `regex`'s code, and every sidecar
//! carries it whether or not a route uses a regex: code is most of a
//! sidecar's resident memory (docs/proxy.md). Matching is slower than
//! `regex`'s, which a header or path of a few dozen bytes does not feel
//! (`cargo bench -p weft-proxy --bench routing`).

pub use regex_lite::{Error, Regex};

/// The longest pattern accepted, in bytes.
pub const MAX_LEN: usize = 1024;

/// The most memory one compiled pattern may take.
const SIZE_LIMIT: usize = 1 << 20;

/// A pattern's whole-value matcher, or why it is refused.
pub fn whole_value(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_LEN {
        return Err(format!("a regular expression over {MAX_LEN} characters"));
    }
    regex_lite::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(SIZE_LIMIT)
        .build()
        .map_err(|e| {
            format!(
                "not a regular expression weft supports (RE2 syntax without Unicode classes): {e}"
            )
        })
}

/// `text` as a pattern that matches exactly it.
pub fn escape(text: &str) -> String {
    regex_lite::escape(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_matches_the_whole_value_with_ascii_classes() {
        let re = whole_value(r"/items/\d+").unwrap();
        assert!(re.is_match("/items/42"));
        assert!(!re.is_match("/items/42/more"), "anchored at the end");
        assert!(!re.is_match("x/items/42"), "anchored at the start");
        assert!(!re.is_match("/items/٤٢"), "\\d is ASCII, as in RE2");
        let alternation = whole_value("a|b").unwrap();
        assert!(
            !alternation.is_match("ab"),
            "an alternation is grouped whole"
        );
        assert!(whole_value(&escape("a.b+c")).unwrap().is_match("a.b+c"));
        assert!(!whole_value(&escape("a.b")).unwrap().is_match("axb"));
    }

    #[test]
    fn a_pattern_weft_cannot_run_is_refused_with_the_reason() {
        let unicode = whole_value(r"\p{Greek}+").unwrap_err();
        assert!(unicode.contains("Unicode"), "{unicode}");
        assert!(
            whole_value("([")
                .unwrap_err()
                .contains("not a regular expression")
        );
        let long = "a".repeat(MAX_LEN + 1);
        assert!(whole_value(&long).unwrap_err().contains("over 1024"));
        // Short, but its program would be far over the size limit.
        let huge = whole_value("(((a{100}){100}){100})").unwrap_err();
        assert!(huge.contains("not a regular expression"), "{huge}");
    }
}
