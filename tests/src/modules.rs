//! The module graph of a crate, read from its source, and the import
//! cycles in it. Modules that import each other in a circle have no order
//! to read or change them in; `modules_form_no_cycle` keeps every crate of
//! the workspace free of them.
//!
//! The rule: among the modules that share a parent, `a` imports `b` when
//! `a` or any module below it names `crate::b…` or `super::b…` (the
//! parent's `mod.rs` is where children are assembled, so naming a parent
//! or a child is no edge). Test modules at the end of a file
//! (`#[cfg(test)] mod tests`) may use anything and are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A crate's modules by path (`apiserver::http`), each with the modules it
/// imports among its siblings.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads the modules under `src` (a crate's source folder).
pub fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut sources = BTreeMap::new();
    read_dir(src, src, &mut sources)?;
    let known: BTreeSet<String> = sources.keys().cloned().collect();
    let mut graph: Graph = known.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for (module, text) in &sources {
        for target in references(text, module, &known) {
            if let Some((from, to)) = sibling_edge(module, &target) {
                graph.entry(from).or_default().insert(to);
            }
        }
    }
    Ok(graph)
}

fn read_dir(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            read_dir(root, &path, out)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(root).unwrap_or(&path).with_extension("");
        let mut parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] || parts.is_empty() {
            continue;
        }
        out.insert(parts.join("::"), std::fs::read_to_string(&path)?);
    }
    Ok(())
}

/// The known modules `text` (the source of `module`) names.
fn references(text: &str, module: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let text = without_comments(text);
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    let parent: Vec<&str> = module.split("::").collect();
    let parent = &parent[..parent.len() - 1];
    let mut found = BTreeSet::new();
    for (at, keyword) in text
        .match_indices("crate::")
        .chain(text.match_indices("super::"))
    {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let prefix: Vec<String> = if keyword == "crate::" {
            Vec::new()
        } else {
            parent.iter().map(|s| s.to_string()).collect()
        };
        for path in expand(&text[at + keyword.len()..], prefix) {
            if let Some(module) = resolve(&path, known) {
                found.insert(module);
            }
        }
    }
    found
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a `use`-style path starting at `rest` names: `a::b`, or each
/// of `a::{b, c::d}`.
fn expand(rest: &str, prefix: Vec<String>) -> Vec<Vec<String>> {
    let mut segments = prefix;
    let mut rest = rest;
    loop {
        let trimmed = rest.trim_start();
        if let Some(inner) = trimmed.strip_prefix('{') {
            return group_items(inner)
                .into_iter()
                .flat_map(|item| expand(item, segments.clone()))
                .collect();
        }
        let end = trimmed
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(trimmed.len());
        if end == 0 {
            break;
        }
        segments.push(trimmed[..end].to_string());
        match trimmed[end..].strip_prefix("::") {
            Some(next) => rest = next,
            None => break,
        }
    }
    vec![segments]
}

/// The comma-separated items of a `{…}` group whose opening brace is
/// already consumed.
fn group_items(inner: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (at, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&inner[start..at]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

/// The longest known module at the start of `path`.
fn resolve(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| known.contains(candidate))
}

/// The edge `from → to` between siblings that a reference from `module`
/// to `target` makes, if any.
fn sibling_edge(module: &str, target: &str) -> Option<(String, String)> {
    let (a, b): (Vec<&str>, Vec<&str>) =
        (module.split("::").collect(), target.split("::").collect());
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    // A parent (or the module itself), or a child: no edge.
    if shared >= a.len() || shared >= b.len() {
        return None;
    }
    Some((a[..=shared].join("::"), b[..=shared].join("::")))
}

/// Every cycle in `graph` as its set of modules (strongly connected
/// components of more than one module).
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = graph
        .iter()
        .flat_map(|(from, tos)| std::iter::once(from).chain(tos))
        .collect();
    let reaches = |from: &String| -> BTreeSet<String> {
        let (mut seen, mut stack) = (BTreeSet::new(), vec![from.clone()]);
        while let Some(next) = stack.pop() {
            for to in graph.get(&next).into_iter().flatten() {
                if seen.insert(to.clone()) {
                    stack.push(to.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reaches(n))).collect();
    let mut found: Vec<Vec<String>> = Vec::new();
    for node in &nodes {
        let component: Vec<String> = nodes
            .iter()
            .filter(|other| reach[node].contains(**other) && reach[**other].contains(*node))
            .map(|n| n.to_string())
            .collect();
        if component.len() > 1 && !found.contains(&component) {
            found.push(component);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn modules_form_no_cycle() {
        let crates = [
            "xds-proto/src",
            "certs/src",
            "control/src",
            "proxy/src",
            "apiserver/src",
            "lab/src",
            "cli/src",
            "perf/src",
            "examples/echo/src",
        ];
        let mut failures = Vec::new();
        for src in crates {
            let graph = graph(&workspace().join(src)).unwrap();
            assert!(
                !graph.is_empty() || src.starts_with("xds-proto") || src.starts_with("examples"),
                "{src}: no module read"
            );
            for cycle in cycles(&graph) {
                failures.push(format!("{src}: {}", cycle.join(" ↔ ")));
            }
        }
        assert!(
            failures.is_empty(),
            "modules that import each other in a circle:\n{}",
            failures.join("\n")
        );
    }

    #[test]
    fn the_reader_sees_imports_in_every_form() {
        let known: BTreeSet<String> = ["a", "b", "c", "d", "p::x", "p::y", "p"]
            .into_iter()
            .map(String::from)
            .collect();
        let text = "use crate::a::Thing;\nuse crate::{b, c::{self, More}};\n\
                    fn f() { crate::d::call(); }\n// crate::p::x in a comment\n\
                    #[cfg(test)]\nmod tests { use crate::p::y; }";
        let found = references(text, "m", &known);
        assert_eq!(found, ["a", "b", "c", "d"].map(String::from).into());
        let nested = references("use super::y::Y;", "p::x", &known);
        assert_eq!(nested, ["p::y"].map(String::from).into());
        assert_eq!(
            sibling_edge("p::x", "p::y"),
            Some(("p::x".into(), "p::y".into()))
        );
        assert_eq!(sibling_edge("p::x", "p"), None, "a parent");
        assert_eq!(sibling_edge("p", "p::x"), None, "a child");
        assert_eq!(sibling_edge("p::x", "a"), Some(("p".into(), "a".into())));
    }

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let graph = |edges: &[(&str, &str)]| {
            let mut g = Graph::new();
            for (a, b) in edges {
                g.entry(a.to_string()).or_default().insert(b.to_string());
            }
            g
        };
        assert!(cycles(&graph(&[("a", "b"), ("b", "c")])).is_empty());
        assert_eq!(
            cycles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
            vec![vec!["a".to_string(), "b".into(), "c".into()]]
        );
    }
}
